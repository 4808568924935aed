"""Online checks with each node in its own process: latency, checks/s, node CPU.

Starts `--nodes` province nodes (2 to 4), each an `ispf-node` process of its own,
loads a synthetic registry of `--n` records into each through the internal API,
and reconciles the first node (the asker) with every other one, so that its
checks are synced. Then 1 and 32 concurrent callers (by default; `--callers`)
run single-ID checks (`NodeClient.check`) back to back for `--seconds` each, from
`--client-procs` client processes (threads within each), so that the callers'
own Python is not one GIL. Half the IDs asked are enrolled with a peer.

Prints, per level: p50 and p99 latency, checks/s, errors (any province answer
other than match / no match), each node process's CPU seconds (the process and
its children, from /proc/<pid>/stat) and checks/s per node core (checks per CPU
second of that node: the asker's is the figure the target names), and how
many probes shared each X25519 call and, at the asker, each Probe call (the
nodes' metrics). First, in this
process, the coalescer where the ladder is the bottleneck: 32 threads each
re-blinding one value under one key, alone and through `batching.Coalescer`.
Asserts nothing.

    python bench/checks.py [--nodes 3] [--n 100000] [--seconds 15] [--callers 1,32]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from ispf import blinding
from ispf.keys import BlindingKey
from ispf.v1 import internal_pb2
from ispf_client.forum import init_forum, write_client_profile
from ispf_client.loader import load_csv
from ispf_client.sdk import ClientProfile, NodeClient
from ispf_server.batching import Coalescer

PROVINCES = ["punjab", "sindh", "kp", "balochistan"]
OK = (internal_pb2.PROVINCE_STATUS_MATCH, internal_pb2.PROVINCE_STATUS_NO_MATCH)
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds) of one process, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # (the name may hold spaces)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and its descendants (a node's blinding workers)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)], cpu[int(entry.name)] = _stat(int(entry.name))
            except (OSError, ValueError):
                continue
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(p for p, pp in parents.items() if pp == pid)
    return total


def batching(metrics_port: int) -> tuple[float, ...]:
    """A node's online-check batching so far, from its metrics: probes blinded and
    their batches (asking), probes re-blinded and theirs (answering), probes sent
    and the Probe calls they went in (asking); NaN where the node has no such
    metrics (an older node)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    got = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        got[name] = float(value) if value and not line.startswith("#") else 0.0
    names = (
        "blind_calls",
        "blind_batches",
        "reblind_calls",
        "reblind_batches",
        "probe_calls",
        "probe_batches",
    )
    return tuple(got.get(f"ispf_online_{n}", float("nan")) for n in names)


def ladder_bound(backend: str, seconds: float = 3.0, threads: int = 32) -> str:
    """Re-blinds per second (and per CPU second) of `threads` threads, one value
    each, alone and through a coalescer: the case where X25519 is all the work."""
    key = BlindingKey.generate()
    base = bytes.fromhex("09" + "00" * 31)
    point = blinding.reblind_many(BlindingKey.generate(), base, 32, "cryptography")
    want = blinding.reblind_many(key, point, 16, "cryptography")

    def batch(jobs: list[bytes]) -> list[bytes]:
        out = blinding.reblind_many(key, b"".join(jobs), 16, backend)
        return [out[16 * i : 16 * (i + 1)] for i in range(len(jobs))]

    coalescer: Coalescer[bytes, bytes] = Coalescer(batch, cap=32)

    def rate(fn: Callable[[bytes], bytes]) -> tuple[float, float]:
        fn(point)  # (the backend loaded and self-checked before the clock starts)
        done = [0]
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def work() -> None:
            k = 0
            while time.monotonic() < stop:
                assert fn(point) == want
                k += 1
            with lock:
                done[0] += k

        ts = [threading.Thread(target=work) for _ in range(threads)]
        cpu = time.process_time()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return done[0] / seconds, done[0] / (time.process_time() - cpu)

    alone = rate(lambda v: batch([v])[0])
    shared = rate(lambda v: coalescer.submit("key", v))
    per_call = coalescer.stats.values / max(1, coalescer.stats.batches)
    return (
        f"ladder-bound ({threads} threads, 1 value each, {backend}): alone {alone[0]:,.0f} "
        f"re-blinds/s ({alone[1]:,.0f} per CPU s); coalesced {shared[0]:,.0f}/s "
        f"({shared[1]:,.0f} per CPU s), {per_call:.1f} values per X25519 call"
    )


def start_node(cfg: Path, log_level: str) -> subprocess.Popen[bytes]:
    """An `ispf-node` process over `cfg` (its log to a file beside the config)."""
    node_bin = Path(sys.executable).with_name("ispf-node")
    with (cfg.parent / "node.log").open("wb") as out:
        return subprocess.Popen(
            [str(node_bin), "--config", str(cfg), "--log-level", log_level],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def registries(provinces: list[str], n: int, seed: int = 1) -> dict[str, list[str]]:
    """`n` distinct 13-digit IDs per province, a tenth of them shared by all."""
    r = random.Random(seed)

    def nid() -> str:
        return str(r.randint(1, 7)) + f"{r.randrange(10**12):012d}"

    common = [nid() for _ in range(n // 10)]
    return {p: common + [nid() for _ in range(n - len(common))] for p in provinces}


def callers_in_process(
    profile_path: str, ids: list[str], threads: int, seconds: float, seed: int
) -> tuple[list[float], int, int]:
    """`threads` callers in this (client) process: their latencies, errors, failures."""
    profile = ClientProfile.load(Path(profile_path))
    latencies: list[float] = []
    errors = [0, 0]
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def caller(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with NodeClient(profile) as client:
            client.check([ids[0]])  # (the channel up before the clock starts)
            start.wait()
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    resp = client.check([rng.choice(ids)], deadline_ms=5000)
                    bad = sum(1 for a in resp.results[0].provinces if a.status not in OK)
                    failed = 0
                except Exception:
                    bad, failed = 0, 1
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    errors[0] += bad
                    errors[1] += failed

    with ThreadPoolExecutor(threads) as ex:
        for f in [ex.submit(caller, k) for k in range(threads)]:
            f.result()
    return latencies, errors[0], errors[1]


def run_level(
    profile: Path,
    ids: list[str],
    callers: int,
    seconds: float,
    client_procs: int,
    nodes: dict[str, subprocess.Popen[bytes]],
    metrics: dict[str, int],
) -> dict[str, object]:
    procs = max(1, min(client_procs, callers))
    per = [callers // procs + (1 if i < callers % procs else 0) for i in range(procs)]
    with ProcessPoolExecutor(procs) as ex:
        cpu0 = {p: tree_cpu(proc.pid) for p, proc in nodes.items()}
        batch0 = {p: batching(port) for p, port in metrics.items()}
        t = time.perf_counter()
        futures = [
            ex.submit(callers_in_process, str(profile), ids, k, seconds, i)
            for i, k in enumerate(per)
        ]
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t
        cpu = {p: tree_cpu(proc.pid) - cpu0[p] for p, proc in nodes.items()}
        batch = {
            p: [a - b for a, b in zip(batching(port), batch0[p], strict=True)]
            for p, port in metrics.items()
        }
    lat = sorted(x for r in results for x in r[0])
    return {
        "callers": callers,
        "checks": len(lat),
        "p50": statistics.median(lat) * 1000,
        "p99": statistics.quantiles(lat, n=100)[98] * 1000 if len(lat) > 1 else lat[0] * 1000,
        "rate": len(lat) / seconds,
        "errors": sum(r[1] for r in results),
        "failed": sum(r[2] for r in results),
        "cpu": cpu,
        "wall": wall,
        "batch": batch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, default=3, choices=[2, 3, 4])
    ap.add_argument("--n", type=int, default=100_000, help="records per province")
    ap.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    ap.add_argument("--callers", default="1,32", help="concurrency levels, comma-separated")
    ap.add_argument("--client-procs", type=int, default=4, help="client processes at most")
    ap.add_argument("--backend", default="auto", help="the nodes' X25519: auto | ifma | ...")
    ap.add_argument("--workers", type=int, default=1, help="each node's blinding processes")
    ap.add_argument("--node-log-level", default="WARNING")
    args = ap.parse_args()
    provinces = PROVINCES[: args.nodes]
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    print(ladder_bound(blinding.select_backend(args.backend).name), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layout = init_forum(work / "forum", provinces, base_port=0)
        ports = {p: free_port() for p in provinces}
        metrics = {p: free_port() for p in provinces}
        for p in provinces:
            cfg = layout.node_dir(p) / "node.toml"
            text = cfg.read_text().replace(
                'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{ports[p]}"'
            )
            for q in provinces:
                text = text.replace(
                    f'[peers.{q}]\naddress = "127.0.0.1:0"',
                    f'[peers.{q}]\naddress = "127.0.0.1:{ports[q]}"',
                )
            text = text.replace(
                "workers = 0", f'workers = {args.workers}\nbackend = "{args.backend}"'
            )
            cfg.write_text(text + f'\n[metrics]\nlisten = "127.0.0.1:{metrics[p]}"\n')
            pol = layout.node_dir(p) / "policy.toml"  # room for the bench's probes
            pol.write_text(
                pol.read_text()
                .replace("probes_per_minute = 60", "probes_per_minute = 100000000")
                .replace("probes_per_day = 10000", "probes_per_day = 1000000000")
                .replace("budget_daily = 100000", "budget_daily = 1000000000")
            )
            write_client_profile(layout, p, f"127.0.0.1:{ports[p]}")
        data = registries(provinces, args.n)
        nodes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for p in provinces:
                nodes[p] = start_node(layout.node_dir(p) / "node.toml", args.node_log_level)
            clients = {
                p: NodeClient(
                    ClientProfile.load(layout.client_dir(p) / "profile.toml"), timeout=600
                )
                for p in provinces
            }
            for c in clients.values():  # (serving once it answers)
                c._when_up(c.stats, 120)

            def load(p: str) -> None:
                csv = work / f"{p}.csv"
                with csv.open("w") as f:
                    f.write("record_id,cnic,programme,status\n")
                    f.writelines(f"{p[0]}{i},{x},BISP,enrolled\n" for i, x in enumerate(data[p]))
                report = load_csv(clients[p], csv)
                assert not report.stopped, report.stopped

            t = time.perf_counter()
            with ThreadPoolExecutor(len(provinces)) as ex:
                for f in [ex.submit(load, p) for p in provinces]:
                    f.result()
            asker, peers = provinces[0], provinces[1:]
            for peer in peers:
                st = clients[asker].reconcile(peer, attempts=1)
                assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
            setup = time.perf_counter() - t
            rng = random.Random(5)
            own = args.n - args.n // 10
            ids = [x for q in peers for x in rng.sample(data[q][args.n // 10 :], min(2000, own))]
            ids += [f"35202{rng.randrange(10**8):08d}" for _ in range(len(ids))]
            print(
                f"online checks, nodes in separate processes: {len(provinces)} nodes "
                f"({asker} asks {', '.join(peers)}), {args.n:,} records per province, "
                f"backend {args.backend}, {os.cpu_count()} cores ({cpu_model}); "
                f"load + reconcile {setup:.0f} s; {args.seconds:.0f} s per level"
            )
            print(
                f"{'callers':>7} {'checks':>7} {'p50 ms':>7} {'p99 ms':>7} {'checks/s':>9} "
                f"{'errors':>6} | node CPU s ({', '.join(provinces)}) | "
                "checks/s per node core (asker first) | probes per X25519 call "
                "(asker blind, peers reblind) | probes per Probe call (asker)"
            )
            for callers in (int(c) for c in args.callers.split(",") if c):
                r = run_level(
                    layout.client_dir(asker) / "profile.toml",
                    ids,
                    callers,
                    args.seconds,
                    args.client_procs,
                    nodes,
                    metrics,
                )
                cpu: dict[str, float] = r["cpu"]  # type: ignore[assignment]
                checks: int = r["checks"]  # type: ignore[assignment]
                per_core = [checks / cpu[p] if cpu[p] > 0 else float("inf") for p in provinces]
                print(
                    f"{callers:>7} {checks:>7} {r['p50']:>7.1f} {r['p99']:>7.1f} "
                    f"{r['rate']:>9.0f} {r['errors'] + r['failed']:>6} | "  # type: ignore[operator]
                    + " ".join(f"{cpu[p]:.1f}" for p in provinces)
                    + " | "
                    + " ".join(f"{x:.0f}" for x in per_core)
                    + " | "
                    + " ".join(
                        f"{b[0] / b[1]:.1f}"
                        if p == asker and b[1]
                        else f"{b[2] / b[3]:.1f}"
                        if p != asker and b[3]
                        else "-"
                        for p, b in r["batch"].items()  # type: ignore[attr-defined]
                    )
                    + " | "
                    + " ".join(
                        f"{b[4] / b[5]:.1f}" if b[5] else "-"
                        for p, b in r["batch"].items()  # type: ignore[attr-defined]
                        if p == asker
                    ),
                    flush=True,
                )
        finally:
            for proc in nodes.values():
                proc.terminate()
            for proc in nodes.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
