"""Registry load and sync against a plain SQLite bulk upsert of the same rows.

One run, one machine: N synthetic rows (the CSV shape `record_id,cnic,programme,
status`, every row valid), then

  (a) plain: the rows upserted straight into a fresh SQLite file with the
      registry's schema and change log (`storage.registry.SCHEMA`), canonical
      IDs precomputed, no validation: `executemany` of INSERT ... ON CONFLICT DO
      UPDATE plus the change-log rows, one transaction per 5,000 rows, with the
      store's pragmas (WAL, synchronous=FULL);
  (b) `ispf registry load` of the file through a real node on loopback (client
      CSV parse, gRPC stream, the node's validation, the store);
  (c) `ispf registry sync` of the same file (nothing changed), and of a copy
      in which 1% of the rows changed.

Prints rows/s of each and the ratios to (a), then where a load's time goes
(the client's parse, the node's validation, the store's upsert, each alone).
Asserts nothing: figures, not pass/fail.

    python bench/load.py [--n 200000] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ispf.errors import InvalidNationalId, IspfError
from ispf.nid import DEFAULT_PROVINCE_DIGITS, canonicalise
from ispf_client.csvio import read_registry_csv
from ispf_client.demo import LocalFederation
from ispf_client.forum import init_forum
from ispf_client.loader import BATCH, load_csv, sync_csv
from ispf_client.sdk import ClientProfile, NodeClient
from ispf_client.synth import generate
from ispf_server.storage import db, meta, registry
from ispf_server.storage.db import utcnow
from ispf_server.storage.store import Store

PROVINCES = ["punjab", "sindh"]
PLAIN_BATCH = 5_000  # (fixed: the reference does not move with the loader's batch)

Row = tuple[str, str, str, str]


def valid_rows(n: int, digits: frozenset[str]) -> list[Row]:
    """`n`-ish synthetic rows of Punjab that a node accepts (as printed: dashes or not)."""
    rows = []
    for rid, nid, prog, status in generate(PROVINCES, n, seed=5).rows["punjab"]:
        try:
            canonicalise(nid, province_digits=digits)
        except InvalidNationalId:
            continue
        if prog and status:
            rows.append((rid, nid, prog, status))
    return rows


def write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("record_id,cnic,programme,status\n")
        fh.writelines(f"{r},{n},{p},{s}\n" for r, n, p, s in rows)


def changed(rows: list[Row], share: float, rng: random.Random) -> tuple[list[Row], int]:
    """A copy with `share` of the rows relabelled (a third), moved to another ID (a
    third) or replaced by a new record (a third)."""
    out = list(rows)
    picks = rng.sample(range(len(rows)), max(3, int(len(rows) * share)))
    for k, i in enumerate(picks):
        rid, nid, prog, status = out[i]
        if k % 3 == 0:
            out[i] = (rid, nid, prog, "suspended" if status != "suspended" else "enrolled")
        elif k % 3 == 1:
            digits = nid.replace("-", "")
            out[i] = (rid, digits[:5] + f"{rng.randrange(10**7):07d}" + digits[12], prog, status)
        else:
            out[i] = (f"NEW-{i}", nid, prog, status)
    return out, len(picks)


def plain_upsert(path: Path, rows: list[tuple[str, str, str, str]], tuned: bool = False) -> float:
    """(a): seconds for the plain bulk upsert of canonical rows into a fresh store file
    (SQLite's defaults but WAL and synchronous=FULL; `tuned`: the node's cache and WAL
    sizes too)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if tuned:
        conn.execute(f"PRAGMA cache_size=-{db.CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint={db.WAL_PAGES}")
    conn.executescript(registry.SCHEMA)
    conn.executescript(meta.SCHEMA)
    t = time.perf_counter()
    now = utcnow()
    for version, at in enumerate(range(0, len(rows), PLAIN_BATCH), start=1):
        part = rows[at : at + PLAIN_BATCH]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO records VALUES (?,?,?,?,?) ON CONFLICT(record_id) DO UPDATE SET "
            "nid=excluded.nid, programme=excluded.programme, status=excluded.status, "
            "updated_at=excluded.updated_at",
            [(*r, now) for r in part],
        )
        conn.executemany(
            "INSERT INTO registry_changes VALUES (?,?)", [(version, r[1]) for r in part]
        )
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('registry_version', ?)", (str(version),))
        conn.execute("COMMIT")
    dt = time.perf_counter() - t
    conn.close()
    return dt


def timed(fn: Callable[[], Any], profile: cProfile.Profile | None = None) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn() if profile is None else profile.runcall(fn)
    return time.perf_counter() - t, out


def show_profile(title: str, prof: cProfile.Profile, top: int = 25) -> None:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"\n--- profile: {title} (by own time; the node's threads are not in it) ---")
    print("\n".join(buf.getvalue().splitlines()[: top + 12]))


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def node_client(work: Path, r: int, how: str, digits: frozenset[str]) -> Iterator[NodeClient]:
    """A fresh Punjab node and a client of it: `ispf-node` in a process of its own
    (as `ispf registry load` meets it), or in this process (`thread`: one GIL)."""
    port = free_port()
    layout = init_forum(work / f"forum{r}", PROVINCES, base_port=port)
    if how == "thread":
        with LocalFederation(layout, PROVINCES[:1], digits, 1) as fed:
            yield fed.clients["punjab"]
        return
    cfg = layout.node_dir("punjab") / "node.toml"
    cfg.write_text(cfg.read_text().replace("workers = 0", "workers = 1"))
    node = subprocess.Popen(
        [str(Path(sys.executable).parent / "ispf-node"), "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        profile = ClientProfile.load(layout.client_dir("punjab") / "profile.toml")
        with NodeClient(profile) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.stats()
                    break
                except IspfError:
                    if time.monotonic() > deadline or node.poll() is not None:
                        raise
                    time.sleep(0.1)
            yield client
    finally:
        node.terminate()
        node.wait(30)


def one_round(
    work: Path,
    r: int,
    src: Path,
    alt: Path,
    n: int,
    digits: frozenset[str],
    how: str,
    prof: cProfile.Profile | None,
) -> dict[str, float]:
    """A fresh node: load, sync the same file, sync the changed one."""
    out: dict[str, float] = {}
    with node_client(work, r, how, digits) as client:
        out["load"], rep = timed(lambda: load_csv(client, src), prof)
        assert rep.accepted == n, (rep.accepted, rep.stopped)

        def sync(path: Path) -> Any:
            return sync_csv(client, path, max_rejected=lambda rows: 0, allow_deletes=n)

        out["sync_same"], srep = timed(lambda: sync(src))
        assert srep.applied, srep.refused
        assert srep.unchanged == n, srep.unchanged
        out["sync_changed"], srep = timed(lambda: sync(alt))
        assert srep.applied, srep.refused
    return out


def phases(work: Path, src: Path, n: int, digits: frozenset[str]) -> list[tuple[str, float]]:
    """Each stage of a load alone: the client's read, the node's checks, the store."""
    from ispf.records import Label
    from ispf_server.services.internal import RegistryServicer
    from ispf_server.storage.registry import StoredRecord

    class _Node:  # (what the servicer's checks ask of a node)
        province_digits = digits

        @staticmethod
        def new_record(rid: str, nid: str, label: Label) -> StoredRecord:
            return StoredRecord(rid, nid, label)

    out = [("client: read the CSV", timed(lambda: list(read_registry_csv(src)))[0])]
    records = list(read_registry_csv(src))
    svc: Any = RegistryServicer(_Node())  # type: ignore[arg-type]
    batches = [records[i : i + BATCH] for i in range(0, n, BATCH)]
    out.append(("node: validate", timed(lambda: [svc._validate(b) for b in batches])[0]))
    goods = [svc._validate(b)[0] for b in batches]
    store = Store(work / "phase.db")
    try:
        out.append(
            (
                "node: store upsert",
                timed(lambda: [store.registry.upsert(g.values()) for g in goods])[0],
            )
        )
    finally:
        store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=200_000, help="rows in the registry file")
    ap.add_argument("--change", type=float, default=0.01, help="share of rows a sync changes")
    ap.add_argument("--rounds", type=int, default=2, help="plain then node, this many times")
    ap.add_argument(
        "--node",
        choices=("process", "thread"),
        default="process",
        help="ispf-node in a process of its own (as in use), or in the bench's",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the first load (client side)")
    ap.add_argument("--phases", action="store_true", help="time each stage of a load alone")
    args = ap.parse_args()
    rng = random.Random(11)
    digits = frozenset(DEFAULT_PROVINCE_DIGITS)
    rows = valid_rows(args.n, digits)
    canon = [
        (r, canonicalise(n, province_digits=digits).digits, p, s.lower()) for r, n, p, s in rows
    ]
    n = len(rows)
    print(f"{n:,} rows, batches of {BATCH:,}, {os.cpu_count()} cores, {cpu_model()}")
    print(
        f"{args.rounds} rounds, each the plain upserts then a fresh node ({args.node}); "
        "ratios within a round"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src, alt = work / "registry.csv", work / "changed.csv"
        write_csv(src, rows)
        alt_rows, n_changed = changed(rows, args.change, rng)
        write_csv(alt, alt_rows)
        prof = cProfile.Profile() if args.profile else None
        rounds = []
        for r in range(args.rounds):
            got = {"plain": plain_upsert(work / f"plain{r}.db", canon)}
            got["tuned"] = plain_upsert(work / f"tuned{r}.db", canon, tuned=True)
            got.update(one_round(work, r, src, alt, n, digits, args.node, prof if r == 0 else None))
            rounds.append(got)
        stages = phases(work, src, n, digits) if args.phases else []

    def med(key: str) -> float:
        return statistics.median(g[key] for g in rounds)

    def ratio(key: str) -> float:  # (median of the rounds' own ratios)
        return statistics.median(g["plain"] / g[key] for g in rounds)

    print()
    print(f"{'median of the rounds':48} {'seconds':>8} {'rows/s':>10} {'x plain':>8}")
    what = {
        "plain": "(a) plain SQLite upsert",
        "tuned": "    plain, with the node's cache and WAL sizes",
        "load": "(b) registry load (new rows)",
        "sync_same": "(c) registry sync, nothing changed",
        "sync_changed": f"    registry sync, {args.change:.0%} changed ({n_changed:,} rows)",
    }
    for key, label in what.items():
        print(f"{label:48} {med(key):>8.2f} {n / med(key):>10,.0f} {ratio(key):>8.2f}")
    print(
        "\nper round (x plain): "
        + "; ".join(
            ", ".join(f"{k} {g['plain'] / g[k]:.2f}" for k in what if k != "plain") for g in rounds
        )
    )
    tuned = statistics.median(g["tuned"] / g["load"] for g in rounds)
    print(
        f"load / plain = {ratio('load'):.2f} (/ tuned plain = {tuned:.2f}); "
        f"sync (nothing changed) / plain = {ratio('sync_same'):.2f}; "
        f"sync ({args.change:.0%} changed) / plain = {ratio('sync_changed'):.2f}; "
        f"sync ({args.change:.0%} changed) / full load = "
        f"{statistics.median(g['sync_changed'] / g['load'] for g in rounds):.2f}"
    )
    if stages:
        print("\nwhere a load's time goes (each stage alone, after the rounds):")
        for label, sec in stages:
            print(f"  {label:42} {sec:>8.2f} s {n / sec:>10,.0f} rows/s")
    if prof is not None:
        show_profile("first registry load", prof)


if __name__ == "__main__":
    main()
