"""Full vs incremental reconciliation, and online-check latency, on four local nodes.

One process tree on this machine: Punjab reconciles with Sindh, KP and
Balochistan (full, cold), then 1% of every registry changes (relabels, new
records, deletions) and it reconciles again (incremental). Then 1, 8 and 32
concurrent callers run single-ID online checks against the three peers.
Prints figures and ratios; asserts nothing.

    python bench/online_incremental.py [--n 100000] [--change 0.01] [--seconds 10]
                                       [--nights 1]

`--nights N`: N rounds of "change, then reconcile incremental", as night after
night; between them each node's background compaction of pair state (when due)
is let finish, as a day between runs would, and its time printed on its own.
"""

from __future__ import annotations

import argparse
import os
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
from ispf_server.storage.pairs.compaction import Compacted

PROVINCES = ["punjab", "sindh", "kp", "balochistan"]


def reconcile_all(
    fed: LocalFederation, full: bool
) -> tuple[float, list[internal_pb2.SessionStatus]]:
    client = fed.clients["punjab"]
    t = time.perf_counter()
    done = []
    for peer in PROVINCES[1:]:
        st = client.start_reconciliation(peer, full=full)
        final = client.wait(st.session_id, timeout=3600)
        assert final.state == internal_pb2.SESSION_STATE_COMPLETED, final.error
        done.append(final)
    return time.perf_counter() - t, done


def change(
    fed: LocalFederation,
    data: dict[str, list[tuple[str, str, str, str]]],
    share: float,
    rng: random.Random,
) -> int:
    """Relabel, add and delete `share` of each registry, through the internal API."""
    touched = 0
    for p, rows in data.items():
        k = max(1, int(len(rows) * share))
        picks = rng.sample(rows, k)
        third = k // 3
        relabel = [
            (r, n, prog, "suspended" if s != "suspended" else "enrolled")
            for r, n, prog, s in picks[:third]
        ]
        added = [
            (f"NEW-{p}-{i}", n, prog, s)
            for i, (_, n, prog, s) in enumerate(rng.sample(rows, third))
        ]
        client = fed.clients[p]
        for i in range(0, len(relabel + added), 5000):
            batch = (relabel + added)[i : i + 5000]
            client.upsert(
                internal_pb2.Record(record_id=r, nid=n, programme=pg, status=s)
                for r, n, pg, s in batch
            )
        client.delete([r for r, *_ in picks[third : 2 * third]])
        touched += len(relabel) + len(added) + third
    return touched


def settle(fed: LocalFederation) -> list[Compacted]:
    """Wait for the nodes' background compactions (as the day between runs would);
    the ones that ran since the last call."""
    done: list[Compacted] = []
    for node in fed.nodes.values():
        compactor = node.store.compactor
        compactor.wait()
        done.extend(compactor.finished)
        compactor.finished.clear()
    return done


def check_load(
    fed: LocalFederation, ids: list[str], callers: int, seconds: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    profile = fed.clients["punjab"].profile

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        with NodeClient(profile) as client:
            while time.monotonic() < stop:
                t = time.perf_counter()
                resp = client.check([rng.choice(ids)])
                dt = time.perf_counter() - t
                bad = sum(
                    1
                    for a in resp.results[0].provinces
                    if a.status
                    not in (
                        internal_pb2.PROVINCE_STATUS_MATCH,
                        internal_pb2.PROVINCE_STATUS_NO_MATCH,
                    )
                )
                with lock:
                    latencies.append(dt)
                    errors[0] += bad

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=100_000, help="records per province")
    ap.add_argument("--change", type=float, default=0.01, help="share of records changed")
    ap.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    ap.add_argument("--workers", type=int, default=0, help="blinding processes (0: all cores)")
    ap.add_argument("--nights", type=int, default=1, help="rounds of change + incremental run")
    args = ap.parse_args()
    rng = random.Random(7)
    digits = frozenset(DEFAULT_PROVINCE_DIGITS | {KNOWN_PROVINCES[p] for p in PROVINCES})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layout = init_forum(work / "forum", PROVINCES, base_port=0)
        for p in PROVINCES:  # give the bench's probes room: 32 callers x 3 peers
            pol = layout.node_dir(p) / "policy.toml"
            pol.write_text(
                pol.read_text()
                .replace("probes_per_minute = 60", "probes_per_minute = 1000000")
                .replace("probes_per_day = 10000", "probes_per_day = 100000000")
            )
        syn = generate(PROVINCES, args.n, seed=3)
        data = {
            p: [
                r
                for r in syn.rows[p]
                if r[2]
                and len(r[1].replace("-", "")) == 13
                and r[1][0] != "9"
                and r[1].replace("-", "").isdigit()
            ]
            for p in PROVINCES
        }
        print(f"{len(PROVINCES)} nodes, {args.n:,} records per province, {os.cpu_count()} cores")
        with LocalFederation(layout, PROVINCES, digits, args.workers) as fed:
            for p in PROVINCES:
                path = work / f"{p}.csv"
                path.write_text(syn.csv_text(p))
                load_csv(fed.clients[p], path)
            full_s, full = reconcile_all(fed, full=True)
            nights = []
            for _ in range(args.nights):
                touched = change(fed, data, args.change, rng)
                inc_s, inc = reconcile_all(fed, full=False)
                assert all(s.sync == "incremental" for s in inc)
                nights.append((inc_s, inc, touched, settle(fed)))
            print()
            print(f"{'reconciliation, punjab with 3 peers':40} {'seconds':>9} {'values sent':>12}")
            sent_full = sum(s.own_values + s.peer_values for s in full)
            print(f"{'full (cold)':40} {full_s:>9.2f} {sent_full:>12,}")
            for night, (inc_s, inc, _, _) in enumerate(nights, 1):
                sent_inc = sum(s.own_values + s.peer_values for s in inc)
                label = f"incremental after {args.change:.0%} changed" + (
                    f", night {night}" if args.nights > 1 else ""
                )
                print(f"{label:40} {inc_s:>9.2f} {sent_inc:>12,}   {full_s / inc_s:.1f}x")
            inc_s, _, touched, _ = nights[0]
            print(
                f"incremental is {full_s / inc_s:.1f}x faster "
                f"({touched:,} records changed across the 4 registries)"
            )
            for night, (_, _, _, done) in enumerate(nights, 1):
                if done:
                    print(
                        f"after night {night}: {len(done)} pair states compacted in the "
                        f"background, {sum(c.seconds for c in done):.2f} s in all, "
                        f"{sum(c.overlay for c in done):,} overlay rows merged"
                    )
            ids = [r[1] for p in PROVINCES[1:] for r in data[p][:2000]]
            ids += [f"35202{rng.randrange(10**8):08d}" for _ in range(2000)]
            print()
            print(
                f"{'online checks, 1 ID, 3 peers':30} {'callers':>8} {'p50 ms':>8} "
                f"{'p99 ms':>8} {'checks/s':>9} {'errors':>7}"
            )
            for callers in (1, 8, 32):
                lat, errors = check_load(fed, ids, callers, args.seconds)
                q = statistics.quantiles(lat, n=100)
                print(
                    f"{'':30} {callers:>8} {statistics.median(lat) * 1000:>8.1f} "
                    f"{q[98] * 1000:>8.1f} {len(lat) / args.seconds:>9.0f} {errors:>7}"
                )


if __name__ == "__main__":
    main()
