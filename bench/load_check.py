"""Load test: concurrent online checks against three peers for a fixed time.

Four nodes in this process tree; `--callers` threads each run single-ID checks
back to back for `--seconds`. Reports errors (any province answer other than
match / no match), latency percentiles, throughput, and the process's resident
memory sampled every few seconds, to show it stays flat. Asserts nothing.

    python bench/load_check.py [--callers 32] [--seconds 60] [--n 20000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from ispf.identity import KNOWN_PROVINCES
from ispf.nid import DEFAULT_PROVINCE_DIGITS
from ispf.v1 import internal_pb2
from ispf_client.demo import LocalFederation
from ispf_client.forum import init_forum
from ispf_client.loader import load_csv
from ispf_client.sdk import NodeClient
from ispf_client.synth import generate

PROVINCES = ["punjab", "sindh", "kp", "balochistan"]
OK = (internal_pb2.PROVINCE_STATUS_MATCH, internal_pb2.PROVINCE_STATUS_NO_MATCH)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--callers", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--n", type=int, default=20_000, help="records per province")
    args = ap.parse_args()
    digits = frozenset(DEFAULT_PROVINCE_DIGITS | {KNOWN_PROVINCES[p] for p in PROVINCES})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layout = init_forum(work / "forum", PROVINCES, base_port=0)
        for p in PROVINCES:
            pol = layout.node_dir(p) / "policy.toml"
            pol.write_text(
                pol.read_text()
                .replace("probes_per_minute = 60", "probes_per_minute = 10000000")
                .replace("probes_per_day = 10000", "probes_per_day = 1000000000")
            )
        syn = generate(PROVINCES, args.n, seed=9)
        with LocalFederation(layout, PROVINCES, digits, 0) as fed:
            for p in PROVINCES:
                path = work / f"{p}.csv"
                path.write_text(syn.csv_text(p))
                load_csv(fed.clients[p], path)
            for peer in PROVINCES[1:]:
                st = fed.clients["punjab"].reconcile(peer)
                assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
            ids = [
                r[1]
                for p in PROVINCES[1:]
                for r in syn.rows[p][:3000]
                if r[2]
                and r[1].replace("-", "").isdigit()
                and len(r[1].replace("-", "")) == 13
                and r[1][0] != "9"
            ]
            latencies: list[float] = []
            errors = [0]
            kinds: dict[str, int] = {}
            lock = threading.Lock()
            stop = time.monotonic() + args.seconds
            profile = fed.clients["punjab"].profile

            def caller(seed: int) -> None:
                rng = random.Random(seed)
                with NodeClient(profile) as client:
                    while time.monotonic() < stop:
                        t = time.perf_counter()
                        found: list[str] = []
                        try:
                            resp = client.check([rng.choice(ids)], deadline_ms=5000)
                            found = [
                                internal_pb2.ProvinceStatus.Name(a.status) + ": " + a.detail[:60]
                                for a in resp.results[0].provinces
                                if a.status not in OK
                            ]
                        except Exception as exc:
                            found = [type(exc).__name__]
                        bad = len(found)
                        dt = time.perf_counter() - t
                        with lock:
                            latencies.append(dt)
                            errors[0] += bad
                            for k in found:
                                kinds[k] = kinds.get(k, 0) + 1

            threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.callers)]
            samples = [(0.0, rss_mib())]
            start = time.monotonic()
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                time.sleep(min(5.0, args.seconds / 6))
                samples.append((time.monotonic() - start, rss_mib()))
            for t in threads:
                t.join()
            q = statistics.quantiles(latencies, n=100)
            print(
                f"{args.callers} callers for {args.seconds:.0f} s against 3 peers, "
                f"{args.n:,} records per province"
            )
            print(
                f"checks: {len(latencies):,} ({len(latencies) / args.seconds:.0f}/s), "
                f"errors: {errors[0]}"
            )
            print(
                f"latency ms: p50 {statistics.median(latencies) * 1000:.1f}, "
                f"p90 {q[89] * 1000:.1f}, p99 {q[98] * 1000:.1f}, "
                f"max {max(latencies) * 1000:.1f}"
            )
            print("resident memory, MiB: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in samples))
            warm = [m for t, m in samples if t >= args.seconds / 4] or [samples[-1][1]]
            print(
                f"after warm-up: min {min(warm):.0f} MiB, max {max(warm):.0f} MiB "
                f"(growth {max(warm) - min(warm):.0f} MiB)"
            )


if __name__ == "__main__":
    main()
