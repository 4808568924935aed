"""What a pair's incremental overlay costs each run, and what compacting it gives back.

One store (SQLite, a temporary folder), one pair: a full run's state of N own IDs
and N peer tags (a tenth of them shared) written as sorted runs, then night after
night 1% of each side changed as an incremental run leaves it (rows on top of the
runs, tombstones for what they replace). After each night, the state reads an
incremental run makes (the pair's whole matched state, and lookups of 1% of the
IDs and tags) are timed, best of three; then the overlay is compacted and the
same reads timed again. Prints seconds and the ratios, measured in this run.

Then what a compaction does to the reads an online check makes meanwhile (one
ID's own tag and the peer's labels for its tag, in a thread of the same process,
as a node's compaction shares its process with the checks it serves): their
latency while nothing else runs, and while a night's overlay is compacted with
the run writer's 8 MB pieces and with 1 MB pieces (each piece is a write
transaction, holding SQLite's lock).

Asserts nothing: figures, not pass/fail.

    python bench/compaction.py [--n 300000] [--nights 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ispf_server.storage import Store
from ispf_server.storage.pairs import compaction, deltas, lookups
from ispf_server.storage.pairs.staging import StagedRun
from ispf_server.storage.pairs.state import OwnTag
from tests.unit.storage import packing  # (a full run's runs, built in memory)
from tests.unit.storage.pairmodel import (
    LABELS,
    Model,
    delta,
    own_groups,
    peer_groups,
    random_step,
)

PEER, EPOCH = "sindh", 1
FLUSH = StagedRun.FLUSH


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=300_000, help="own IDs and peer tags")
    ap.add_argument("--nights", type=int, default=5, help="nights of 1%% changes")
    args = ap.parse_args()
    n = args.n
    rng = random.Random(1)
    nids = [f"35202{i:08d}" for i in range(int(n * 1.3))]
    tag_of = {x: rng.randbytes(16) for x in nids}
    model = Model()
    for x in rng.sample(nids, n):
        model.own[x] = OwnTag(rng.choice(LABELS), tag_of[x])
    for x in rng.sample(nids, n // 10):
        model.peer[tag_of[x]] = rng.choice(LABELS)
    model.peer.update({rng.randbytes(16): LABELS[0] for _ in range(n - n // 10)})
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "node.sqlite", Path(tmp) / "master.key")
        store.pairs.key(PEER, EPOCH)  # (pair state is written only under the pair's key)
        own, peer = own_groups(model.own), peer_groups(model.peer)
        with store.db.transaction() as cur:
            staged = packing.staged(cur.connection, PEER, EPOCH, own, peer, model.matches())
            deltas.apply_delta(cur, PEER, EPOCH, delta(reset=True, staged=staged))

        def reads() -> tuple[float, float]:
            probe = rng.sample(nids, n // 100)
            tags = [tag_of[x] for x in rng.sample(nids, n // 100)]
            best = (float("inf"), float("inf"))
            for _ in range(3):
                t0 = time.perf_counter()
                with store.db.reading() as conn:
                    lookups.matched_state(conn, PEER, EPOCH)
                t1 = time.perf_counter()
                with store.db.reading() as conn:
                    lookups.own_by_nids(conn, PEER, EPOCH, probe)
                    lookups.own_by_tags(conn, PEER, EPOCH, tags)
                    lookups.peer_by_tags(conn, PEER, EPOCH, tags)
                t2 = time.perf_counter()
                best = (min(best[0], t1 - t0), min(best[1], t2 - t1))
            return best

        fresh = reads()
        print(f"one pair, {n:,} own IDs and {len(model.peer):,} peer tags; SQLite")
        print(f"{'':32} {'matched state s':>16} {'lookups s':>10} {'overlay rows':>13}")
        print(f"{'after the full run':32} {fresh[0]:>16.3f} {fresh[1]:>10.3f} {0:>13,}")
        last = fresh
        for night in range(1, args.nights + 1):
            step = random_step(rng, model, nids, tag_of, n // 100, n // 100)
            with store.db.transaction() as cur:
                deltas.apply_delta(cur, PEER, EPOCH, step)
            last = reads()
            with store.db.reading() as conn:
                rows = compaction.size(conn, PEER, EPOCH).overlay
            label = f"night {night}, not compacted"
            print(f"{label:32} {last[0]:>16.3f} {last[1]:>10.3f} {rows:>13,}")
        t0 = time.perf_counter()
        done = compaction.compact(store.db, PEER, EPOCH)
        took = time.perf_counter() - t0
        after = reads()
        print(f"{'compacted':32} {after[0]:>16.3f} {after[1]:>10.3f} {0:>13,}")
        print()
        merged = done.overlay if done else 0
        records = done.records if done else 0
        print(f"compaction: {took:.2f} s, {merged:,} overlay rows into {records:,} run records")
        print(
            f"after {args.nights} nights the reads cost "
            f"{(last[0] + last[1]) / (after[0] + after[1]):.1f}x the compacted state's "
            f"(the matched state alone {last[0] / after[0]:.1f}x), and "
            f"{(last[0] + last[1]) / (fresh[0] + fresh[1]):.1f}x the full run's"
        )
        probe_latency(store, rng, model, nids, tag_of, n)
        store.close()


def probe_latency(
    store: Store,
    rng: random.Random,
    model: Model,
    nids: list[str],
    tag_of: dict[str, bytes],
    n: int,
) -> None:
    def probes(during: Callable[[], object]) -> list[float]:
        stop, lat = threading.Event(), []

        def probe() -> None:
            pick = random.Random(2)
            while not stop.is_set():
                x = pick.choice(nids)
                t0 = time.perf_counter()
                with store.db.reading() as conn:
                    lookups.own_by_nids(conn, PEER, EPOCH, [x])
                    lookups.peer_by_tags(conn, PEER, EPOCH, [tag_of[x]])
                lat.append(time.perf_counter() - t0)
                time.sleep(0.002)

        t = threading.Thread(target=probe)
        t.start()
        during()
        stop.set()
        t.join()
        return sorted(lat)

    def compacted(flush: int) -> Callable[[], object]:
        step = random_step(rng, model, nids, tag_of, n // 100, n // 100)
        with store.db.transaction() as cur:  # (a night's overlay to compact, before the probes)
            deltas.apply_delta(cur, PEER, EPOCH, step)

        def run() -> object:
            StagedRun.FLUSH = flush
            try:
                return compaction.compact(store.db, PEER, EPOCH)
            finally:
                StagedRun.FLUSH = FLUSH

        return run

    print()
    print("an online check's store reads (one ID, one tag) in a thread, meanwhile:")
    print(f"{'':36} {'reads':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    idle: Callable[[], Callable[[], object]] = lambda: lambda: time.sleep(2.0)  # noqa: E731
    for label, during in (
        ("nothing", idle),
        ("a compaction, 8 MB pieces", lambda: compacted(8 << 20)),
        ("a compaction, 1 MB pieces", lambda: compacted(1 << 20)),
        ("nothing, again", idle),
    ):
        lat = probes(during())
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"{label:36} {len(lat):>6} {p50 * 1e3:>7.2f} {p99 * 1e3:>7.2f} {lat[-1] * 1e3:>7.2f}")


if __name__ == "__main__":
    main()
