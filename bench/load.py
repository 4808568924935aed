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
import cProfile
import io
import os
import pstats
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ispf.errors import InvalidNationalId
from ispf.nid import DEFAULT_PROVINCE_DIGITS, canonicalise
from ispf_client.csvio import read_registry_csv
from ispf_client.demo import LocalFederation
from ispf_client.forum import init_forum
from ispf_client.loader import BATCH, load_csv, sync_csv
from ispf_client.synth import generate
from ispf_server.storage import meta, registry
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


def plain_upsert(path: Path, rows: list[tuple[str, str, str, str]]) -> float:
    """(a): seconds for the plain bulk upsert of canonical rows into a fresh store file."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
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
        conn.execute(
            "INSERT OR REPLACE INTO meta VALUES ('registry_version', ?)", (str(version),)
        )
        conn.execute("COMMIT")
    dt = time.perf_counter() - t
    conn.close()
    return dt


def timed(fn: Callable[[], Any], profile: cProfile.Profile | None = None) -> tuple[float, Any]:
    t = time.perf_counter()
    if profile is None:
        out = fn()
    else:
        out = profile.runcall(fn)
    return time.perf_counter() - t, out


def show_profile(title: str, prof: cProfile.Profile, top: int = 25) -> None:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"\n--- profile: {title} (by own time; the node's threads are not in it) ---")
    print("\n".join(buf.getvalue().splitlines()[:top + 12]))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=200_000, help="rows in the registry file")
    ap.add_argument("--change", type=float, default=0.01, help="share of rows a sync changes")
    ap.add_argument("--profile", action="store_true", help="cProfile the load (client side)")
    ap.add_argument("--phases", action="store_true", help="time each stage of a load alone")
    args = ap.parse_args()
    rng = random.Random(11)
    digits = frozenset(DEFAULT_PROVINCE_DIGITS)
    rows = valid_rows(args.n, digits)
    canon = [
        (r, canonicalise(n, province_digits=digits).digits, p, s.lower()) for r, n, p, s in rows
    ]
    n = len(rows)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    ) if Path("/proc/cpuinfo").exists() else "unknown CPU"
    print(f"{n:,} rows, batches of {BATCH:,}, {os.cpu_count()} cores, {cpu}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src, alt = work / "registry.csv", work / "changed.csv"
        write_csv(src, rows)
        alt_rows, n_changed = changed(rows, args.change, rng)
        write_csv(alt, alt_rows)

        plain_s = plain_upsert(work / "plain.db", canon)

        layout = init_forum(work / "forum", PROVINCES, base_port=0)
        prof = cProfile.Profile() if args.profile else None
        with LocalFederation(layout, PROVINCES[:1], digits, 1) as fed:
            client = fed.clients["punjab"]
            load_s, rep = timed(lambda: load_csv(client, src), prof)
            assert rep.accepted == n and not rep.stopped, (rep.accepted, rep.stopped)
            reload_s, rep2 = timed(lambda: load_csv(client, src))
            assert rep2.unchanged == n, rep2.unchanged

            def sync(path: Path) -> Any:
                return sync_csv(client, path, max_rejected=lambda rows: 0, allow_deletes=n)

            same_s, srep = timed(lambda: sync(src))
            assert srep.applied and srep.unchanged == n, (srep.applied, srep.refused)
            alt_s, arep = timed(lambda: sync(alt))
            assert arep.applied, arep.refused
            node = fed.nodes["punjab"]

            phases: list[tuple[str, float]] = []
            if args.phases:
                records = list(read_registry_csv(src))
                phases.append(("client: read the CSV", timed(lambda: list(read_registry_csv(src)))[0]))
                svc = _servicer(node)
                phases.append(
                    (
                        "node: validate",
                        timed(
                            lambda: [
                                svc._validate(records[i : i + BATCH])
                                for i in range(0, n, BATCH)
                            ]
                        )[0],
                    )
                )
                store = Store(work / "phase.db")
                goods = [svc._validate(records[i : i + BATCH])[0] for i in range(0, n, BATCH)]
                phases.append(
                    ("node: store upsert", timed(lambda: [store.registry.upsert(g.values()) for g in goods])[0])
                )
                store.close()

        print()
        print(f"{'':44} {'seconds':>8} {'rows/s':>10} {'x plain':>8}")

        def line(what: str, s: float, rows_: int = n) -> None:
            print(f"{what:44} {s:>8.2f} {rows_ / s:>10,.0f} {plain_s / s * rows_ / n:>8.2f}")

        line("(a) plain SQLite upsert", plain_s)
        line("(b) registry load (new rows)", load_s)
        line("    registry load again (all unchanged)", reload_s)
        line("(c) registry sync, nothing changed", same_s)
        line(f"    registry sync, {args.change:.0%} changed ({n_changed:,} rows)", alt_s)
        print(
            f"\nload / plain = {plain_s / load_s:.2f}; sync (same) / plain = {plain_s / same_s:.2f}; "
            f"sync ({args.change:.0%} changed) / plain = {plain_s / alt_s:.2f}; "
            f"sync {args.change:.0%} / full load = {alt_s / load_s:.2f}"
        )
        if phases:
            print("\nwhere a load's time goes (each stage alone, this run):")
            for what, s in phases:
                print(f"  {what:42} {s:>8.2f} s {n / s:>10,.0f} rows/s  {s / load_s:>5.0%} of (b)")
        if prof is not None:
            show_profile("registry load", prof)


def _servicer(node: Any) -> Any:
    from ispf_server.services.internal import RegistryServicer

    return RegistryServicer(node)


if __name__ == "__main__":
    main()
