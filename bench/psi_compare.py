"""Side by side on this machine: ISPF Match's cold mutual reconciliation between two
node processes, SecretFlow's PSI (ECDH and RR22), and OpenMined PSI (100k subset),
on the same data, next to the raw X25519 primitive.

Each peer is installed into its own virtual environment under --venvs (their
protobuf pins conflict with ours). Prints a table with wall time, records/s, CPU
time, peak resident memory per node, bytes on the wire per record, and ratios;
with --write, also writes it to docs/benchmarks.md. Asserts nothing. ISPF and
SecretFlow ECDH run --repeat times (default 3), taking turns; rows show medians.

    python bench/psi_compare.py [--n 1000000] [--backend auto] [--peers secretflow,openmined]
                                [--repeat 3] [--session full|count-only|filtered]

--store postgresql runs ISPF twice per repeat, taking turns: on SQLite (the
default store) and on PostgreSQL (a throw-away server started here in a
temporary folder, Debian's postgresql package, as the tests do; or the databases
of --store-url), and prints PostgreSQL's reconciliation and registry-load times
as ratios of SQLite's in the same run, with each node's peak memory (the
database server's own memory is not the node's, and is not counted).

--session count-only runs ISPF's count-only sessions instead (the initiator learns
how many IDs are shared, nothing else), and filtered labelled sessions limited to
a collection; neither keeps pair state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from ispf.hazmat.backends import select
from ispf.v1 import internal_pb2
from ispf_client.forum import init_forum, write_client_profile
from ispf_client.loader import load_csv
from ispf_client.sdk import ClientProfile, NodeClient

HERE = Path(__file__).resolve().parent
PEER_PACKAGES = {"secretflow": "spu==0.9.5", "openmined": "openmined-psi==2.0.6"}


SESSIONS = {
    "full": "labelled mutual",
    "count-only": "count-only",
    "filtered": "labelled, one collection",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingProxy:
    """Forwards TCP to a port and counts the bytes each way (the wire cost)."""

    def __init__(self, target: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.target = target
        self.bytes = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                with self.lock:
                    self.bytes += len(data)
                b.sendall(data)
        except OSError:
            pass


class TreeSampler:
    """Peak resident memory and CPU time of a process and its children (pool workers)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def tree(self) -> list[psutil.Process]:
        return [self.proc, *self.proc.children(recursive=True)]

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, sum(p.memory_info().rss for p in self.tree()))

    def cpu(self, workers_only: bool = False) -> float:
        total = 0.0
        for p in self.tree()[1:] if workers_only else self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total


def data(n: int, seed: int = 1) -> tuple[list[str], list[str]]:
    r = random.Random(seed)

    def nid() -> str:
        return str(r.randint(1, 7)) + f"{r.randrange(10**12):012d}"

    common = [nid() for _ in range(n // 10)]
    a = common + [nid() for _ in range(n - len(common))]
    b = common + [nid() for _ in range(n - len(common))]
    return a, b


def run_ours(
    work: Path,
    a: list[str],
    b: list[str],
    backend: str,
    chunk: int = 4096,
    log_level: str = "WARNING",
    session: str = "full",
    store_urls: dict[str, str] | None = None,
) -> dict[str, float]:
    layout = init_forum(work / "forum", ["punjab", "sindh"], base_port=0)
    ports = {"punjab": free_port(), "sindh": free_port()}
    proxy = CountingProxy(ports["sindh"])  # punjab reaches sindh through it
    for p, q in (("punjab", "sindh"), ("sindh", "punjab")):
        cfg = layout.node_dir(p) / "node.toml"
        addr = f"127.0.0.1:{proxy.port}" if q == "sindh" else f"127.0.0.1:{ports[q]}"
        text = cfg.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{ports[p]}"')
        text = text.replace(
            f'[peers.{q}]\naddress = "127.0.0.1:0"', f'[peers.{q}]\naddress = "{addr}"'
        )
        text = text.replace("chunk_values = 4096", f'chunk_values = {chunk}\nbackend = "{backend}"')
        if store_urls:  # the node's store is a PostgreSQL database
            text = text.replace('store = "node.sqlite"\n', "")
            text += f'\n[store]\nurl = "{store_urls[p]}"\n'
        cfg.write_text(text.replace("max_set_size = 50000000", "max_set_size = 500000000"))
        write_client_profile(layout, p, f"127.0.0.1:{ports[p]}")
    procs = {
        p: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ispf_server",
                "--config",
                str(layout.node_dir(p) / "node.toml"),
                "--log-level",
                log_level,
            ]
        )
        for p in ports
    }
    try:
        clients = {
            p: NodeClient(ClientProfile.load(layout.client_dir(p) / "profile.toml"), timeout=600)
            for p in ports
        }

        def load(p: str, ids: list[str]) -> None:
            csv = work / f"{p}.csv"
            with csv.open("w") as f:
                f.write("record_id,cnic,programme,status\n")
                f.writelines(f"{p[0]}{i},{x},BISP,enrolled\n" for i, x in enumerate(ids))
            clients[p]._when_up(lambda c=clients[p]: c.stats(), 60)
            load_csv(clients[p], csv)

        # Both registries load at once (each node is its own process); a failed load
        # raises here.
        t_load = time.perf_counter()
        with ThreadPoolExecutor(2) as ex:
            for done in [ex.submit(load, "punjab", a), ex.submit(load, "sindh", b)]:
                done.result()
        load_seconds = time.perf_counter() - t_load
        samplers = {p: TreeSampler(procs[p].pid) for p in procs}
        cpu0 = {p: s.cpu() for p, s in samplers.items()}
        work0 = {p: s.cpu(workers_only=True) for p, s in samplers.items()}
        t = time.perf_counter()
        if session == "count-only":  # (one-off sessions: fresh keys, no pair state kept)
            st = clients["punjab"].reconcile("sindh", count_only=True, attempts=1)
        elif session == "filtered":  # (every record is in BISP: the same data)
            st = clients["punjab"].reconcile("sindh", collections=["BISP"], attempts=1)
        else:
            st = clients["punjab"].reconcile("sindh", full=True, attempts=1)
        wall = time.perf_counter() - t
        assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
        cpu = sum(s.cpu() - cpu0[p] for p, s in samplers.items())
        workers = sum(s.cpu(workers_only=True) - work0[p] for p, s in samplers.items())
        # What each node keeps on disk afterwards: its registry, the pair's state (the
        # sorted runs), the session's matches and the audit log (SQLite, WAL included).
        disk = {
            p: sum(f.stat().st_size for f in layout.node_dir(p).rglob("*.sqlite*")) for p in procs
        }
        return {
            "seconds": wall,
            "load_seconds": load_seconds,
            "cpu": cpu,
            "cpu_workers": workers,
            "matches": st.match_count,
            "rss_a": samplers["punjab"].peak / 2**20,
            "rss_b": samplers["sindh"].peak / 2**20,
            "wire": proxy.bytes / (len(a) + len(b)),
            "disk_a": disk["punjab"] / 2**20,
            "disk_b": disk["sindh"] / 2**20,
        }
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(30)


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median wall time (its other figures with it)."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def venv_python(venvs: Path, peer: str) -> Path:
    v = venvs / peer
    py = v / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(v)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", PEER_PACKAGES[peer]], check=True)
    return py


def run_secretflow(
    py: Path, a_csv: Path, b_csv: Path, work: Path, protocol: str
) -> dict[str, float]:
    ports = f"{free_port()},{free_port()}"
    script = HERE / "peers" / "secretflow_psi.py"
    t = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                str(py),
                str(script),
                "--rank",
                str(r),
                "--ports",
                ports,
                "--input",
                str(csv),
                "--output",
                str(work / f"sf{r}.out"),
                "--protocol",
                protocol,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for r, csv in ((0, a_csv), (1, b_csv))
    ]
    samplers = [TreeSampler(p.pid) for p in procs]
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    wall = time.perf_counter() - t
    rep = [json.loads(next(x for x in reversed(o.splitlines()) if x.startswith("{"))) for o in outs]
    return {
        "seconds": wall,
        "matches": rep[0]["intersection"],
        "rss_a": samplers[0].peak / 2**20,
        "rss_b": samplers[1].peak / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1_000_000, help="records per party")
    ap.add_argument("--backend", default="auto", help="auto | ifma | cryptography")
    ap.add_argument("--peers", default="secretflow,openmined")
    ap.add_argument("--venvs", type=Path, default=Path(".bench-venvs"))
    ap.add_argument("--write", action="store_true", help="also write docs/benchmarks.md")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of ISPF and SecretFlow ECDH each (median)"
    )
    ap.add_argument("--chunk", type=int, default=4096, help="values per streamed chunk")
    ap.add_argument(
        "--session",
        choices=SESSIONS,
        default="full",
        help="ISPF's kind of session: full (labelled mutual, keeps pair state: the "
        "comparison), count-only, or filtered (labelled, limited to a collection)",
    )
    ap.add_argument(
        "--node-log-level", default="WARNING", help="INFO shows each session's phase timings"
    )
    ap.add_argument(
        "--store",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="postgresql: ISPF on SQLite and on PostgreSQL, taking turns, with ratios",
    )
    ap.add_argument(
        "--store-url",
        default="",
        help="with --store postgresql: a server to use instead of a throw-away one, as a "
        "libpq URL without the database (postgresql:///?host=/run/postgresql); the bench "
        "creates and drops its databases there",
    )
    args = ap.parse_args()
    if args.store == "postgresql":
        compare_stores(args)
        return
    if args.session != "full" and args.write:
        ap.error("--write records the full (labelled mutual) comparison only")
    peers = [p for p in args.peers.split(",") if p]
    a, b = data(args.n)
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    rows: list[tuple[str, float, str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a_csv, b_csv = work / "a.csv", work / "b.csv"
        a_csv.write_text("id\n" + "\n".join(a) + "\n")
        b_csv.write_text("id\n" + "\n".join(b) + "\n")
        backend = select(args.backend).name
        # ISPF and SecretFlow ECDH (the target's pair) run --repeat times, taking turns,
        # so a slow spell on the shared machine falls on both; each row is the median.
        sf_py = venv_python(args.venvs.resolve(), "secretflow") if "secretflow" in peers else None
        ours_runs: list[dict[str, float]] = []
        ecdh_runs: list[dict[str, float]] = []
        for i in range(args.repeat):
            ours_runs.append(
                run_ours(
                    work / f"ours{i}",
                    a,
                    b,
                    args.backend,
                    args.chunk,
                    args.node_log_level,
                    session=args.session,
                )
            )
            if sf_py is not None:
                ecdh_runs.append(run_secretflow(sf_py, a_csv, b_csv, work, "ECDH"))
        ours = median_run(ours_runs)
        rows.append(
            (
                f"ISPF Match ({backend}), {SESSIONS[args.session]}",
                ours["seconds"],
                f"{ours['cpu']:.1f}",
                f"{ours['rss_a']:.0f} / {ours['rss_b']:.0f}",
                f"{ours['wire']:.0f}",
                f"{ours['matches']:,}",
            )
        )
        results = {"ours": ours["seconds"], "ours_cpu_workers": ours["cpu_workers"]}
        results["disk_a"], results["disk_b"] = ours["disk_a"], ours["disk_b"]
        results["ours_cpu"] = ours["cpu"]
        if sf_py is not None:
            for proto in ("ECDH", "RR22"):
                sf = (
                    median_run(ecdh_runs)
                    if proto == "ECDH"
                    else run_secretflow(sf_py, a_csv, b_csv, work, proto)
                )
                results[f"sf-{proto}"] = sf["seconds"]
                rows.append(
                    (
                        f"SecretFlow {proto}-PSI (spu 0.9.5)",
                        sf["seconds"],
                        "-",
                        f"{sf['rss_a']:.0f} / {sf['rss_b']:.0f}",
                        "-",
                        f"{sf['matches']:,}",
                    )
                )
        if "openmined" in peers:
            py = venv_python(args.venvs.resolve(), "openmined")
            m = min(args.n, 100_000)
            sa, sb = work / "sa.csv", work / "sb.csv"
            sa.write_text("id\n" + "\n".join(a[:m]) + "\n")
            sb.write_text("id\n" + "\n".join(b[:m]) + "\n")
            out = subprocess.run(
                [str(py), str(HERE / "peers" / "openmined_psi.py"), str(sa), str(sb)],
                capture_output=True,
                text=True,
                timeout=3600,
            )
            om = json.loads(next(x for x in reversed(out.stdout.splitlines()) if x.startswith("{")))
            results["om-per-record"] = om["seconds"] / (2 * m)
            rows.append(
                (
                    f"OpenMined PSI 2.0.6 (P-256, {m:,} x {m:,})",
                    om["seconds"],
                    "-",
                    "-",
                    "-",
                    f"{om['intersection']:,}",
                )
            )
    raw = select(args.backend).many
    pts = b"".join(bytes.fromhex("09" + "00" * 31) for _ in range(16384))
    best = float("inf")
    for _ in range(5):  # the best of five: the machine is shared, noise only slows
        t = time.perf_counter()
        raw(os.urandom(32), pts, 32)
        best = min(best, time.perf_counter() - t)
    raw_rate = 16384 / best
    lines = [
        f"Machine: {cpu_model}, {os.cpu_count()} cores. {args.n:,} x {args.n:,} records, "
        f"10% in common, both parties on this machine.",
        "",
        "| run | wall s | records/s | CPU s | peak RSS MiB (each party) | wire bytes/record "
        "| found |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, secs, cpu, rss, wire, found in rows:
        n2 = 2 * (min(args.n, 100_000) if "OpenMined" in name else args.n)
        lines.append(
            f"| {name} | {secs:.1f} | {n2 / secs:,.0f} | {cpu} | {rss} | {wire} | {found} |"
        )
    lines.append("")
    ideal = 4 * args.n / (raw_rate * (os.cpu_count() or 1))
    lines.append(
        f"Raw {backend} X25519 here: {raw_rate:,.0f} ops/s per core; the four "
        f"exchanges per record pair alone take {ideal:.1f} s on all cores "
        f"(ISPF at {ideal / results['ours']:.0%} of that limit)."
    )
    if results["ours_cpu_workers"] > 0.05:
        lines.append(
            f"ISPF CPU: {results['ours_cpu_workers']:.1f} s in the blinding worker processes, "
            f"{results['ours_cpu'] - results['ours_cpu_workers']:.1f} s in the two node "
            "processes (gRPC, planning, matching, storage)."
        )
    else:
        lines.append(
            f"ISPF CPU: {results['ours_cpu']:.1f} s, all in the two node processes "
            "(blinding runs in threads there: hash-to-curve and X25519 in C)."
        )
    per_record = (results["disk_a"] + results["disk_b"]) * 2**20 / (2 * args.n)
    lines.append(
        f"ISPF store on disk after the run: {results['disk_a']:,.0f} / "
        f"{results['disk_b']:,.0f} MiB per node ({per_record:,.0f} bytes per record: "
        "registry, pair state, matches, audit log)."
    )
    for key, label in (("sf-ECDH", "SecretFlow ECDH"), ("sf-RR22", "SecretFlow RR22")):
        if key in results:
            lines.append(f"ISPF / {label}: {results['ours'] / results[key]:.2f}x the time.")
    if "om-per-record" in results:
        per = results["ours"] / (2 * args.n)
        lines.append(
            f"OpenMined per record / ISPF per record: {results['om-per-record'] / per:.1f}x."
        )
    if args.repeat > 1:
        spread = ", ".join(f"{r['seconds']:.1f}" for r in ours_runs)
        lines.append(f"Each of {args.repeat} runs, in seconds: ISPF {spread}")
        if ecdh_runs:
            lines[-1] += "; SecretFlow ECDH " + ", ".join(f"{r['seconds']:.1f}" for r in ecdh_runs)
        lines[-1] += " (taking turns; the table shows the medians)."
    text = "\n".join(lines)
    print(text)
    if args.write:
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        body = doc.read_text()
        section = "## Against other PSI systems (`bench/psi_compare.py`)\n\n" + text + "\n"
        body = re.sub(r"## Against other PSI systems.*", "", body, flags=re.S).rstrip() + "\n\n"
        doc.write_text(body + section)


@contextlib.contextmanager
def pg_databases(url: str, count: int) -> Iterator[list[dict[str, str]]]:
    """`count` pairs of fresh databases (punjab, sindh), on `url`'s server or on a
    throw-away one; dropped at the end."""
    import psycopg

    sys.path.insert(0, str(HERE.parent))
    from tests.pgserver import PgServer, find_bin

    server = None
    if not url:
        if find_bin() is None:
            sys.exit("--store postgresql: PostgreSQL is not installed (make postgres)")
        server = PgServer.start(Path(tempfile.mkdtemp(prefix="ispf-bench-pg-")))
    names = [f"bench_{os.getpid()}_{i}_{p}" for i in range(count) for p in ("punjab", "sindh")]

    def at(name: str) -> str:
        if server is not None:
            return server.url(name)
        base, _, query = url.partition("?")
        return base.rstrip("/").rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")

    admin = server.url("postgres") if server is not None else at("postgres")
    try:
        with psycopg.connect(admin, autocommit=True) as db:
            for n in names:
                db.execute(f"CREATE DATABASE {n} LOCALE 'C' TEMPLATE template0")
        yield [{"punjab": at(names[2 * i]), "sindh": at(names[2 * i + 1])} for i in range(count)]
    finally:
        with psycopg.connect(admin, autocommit=True) as db:
            for n in names:
                db.execute(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
        if server is not None:
            server.stop()


def compare_stores(args: argparse.Namespace) -> None:
    """ISPF on SQLite and on PostgreSQL, --repeat times each, taking turns."""
    a, b = data(args.n)
    runs: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
    with tempfile.TemporaryDirectory() as tmp, pg_databases(args.store_url, args.repeat) as dbs:
        work = Path(tmp)
        for i in range(args.repeat):
            for store in ("sqlite", "postgresql"):
                runs[store].append(
                    run_ours(
                        work / f"{store}{i}",
                        a,
                        b,
                        args.backend,
                        args.chunk,
                        args.node_log_level,
                        session=args.session,
                        store_urls=dbs[i] if store == "postgresql" else None,
                    )
                )
    med = {s: median_run(r) for s, r in runs.items()}
    loads = {s: sorted(r["load_seconds"] for r in runs[s])[len(runs[s]) // 2] for s in runs}
    lines = [
        f"{args.n:,} x {args.n:,} records, 10% in common, {SESSIONS[args.session]}, "
        f"{args.repeat} runs each taking turns (medians).",
        "",
        "| store | load both registries s | reconcile s | peak RSS MiB (each node) | found |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in ("sqlite", "postgresql"):
        m = med[s]
        lines.append(
            f"| {s} | {loads[s]:.1f} | {m['seconds']:.1f} | "
            f"{m['rss_a']:.0f} / {m['rss_b']:.0f} | {m['matches']:,.0f} |"
        )
    ratio = med["postgresql"]["seconds"] / med["sqlite"]["seconds"]
    lines += [
        "",
        f"PostgreSQL / SQLite: reconciliation {ratio:.2f}x "
        f"the time (target at most 1.5x); registry load through COPY "
        f"{loads['sqlite'] / loads['postgresql']:.2f}x SQLite's rate (target at least 1x).",
        "Each run, in seconds (load, reconcile): "
        + "; ".join(
            f"{s} " + ", ".join(f"{r['load_seconds']:.1f}/{r['seconds']:.1f}" for r in runs[s])
            for s in runs
        ),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
