"""Compaction: a pair's overlay merged back into its sorted runs.

A full run writes the pair's state as sorted runs (`runs`). Each incremental run
writes only what changed, as rows on top (`own_tags`, `peer_tags`) with
tombstones for the run entries they replace or remove (`own_gone`, `peer_gone`).
Lookups merge the two, and every incremental run reads the whole overlay once
(`lookups.overlay_matches`), so as nights pass the overlay adds to the cost of
each run. Once it passes a share of the base (`Size.due`), the node rewrites the
runs from the merged state and clears the overlay (`compact`), in the background
after the session that made it due, under the pair's lock.

The pair's state does not change, only how it is kept: the same entries, the
same fingerprints and sync row, the same result rows. The new generation is
staged piece by piece like a full run's (`RunStager`), reading the old runs a
batch of parts at a time (no store lock held for long, and no run whole in
memory: only the overlay, which compacting at a share of the base keeps small),
and becomes current in one transaction that also clears the overlay, and only if
the pair is still as the compaction found it (same generation, same sync row,
every part staged); otherwise the staging is dropped and the state is left as it
was. The old runs are then deleted a piece at a time, after that transaction,
so no write holds the store's lock for long. A node killed while compacting
leaves a generation that nothing reads, dropped when it starts again
(`Store.sweep_pairs`) or by the pair's next staging.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ispf.errors import CompactionAbandoned as Abandoned
from ispf.errors import IspfError, StagingLost, UnknownEpoch
from ispf_server.records import ascending, merge_sorted
from ispf_server.storage.db import Connection, Database
from ispf_server.storage.pairs import lookups
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.runs import (
    MATCHED,
    NID_LED_TAG,
    OWN_NID,
    OWN_TAG,
    PEER_TAG,
    TAG_LED_NID,
    Kind,
)
from ispf_server.storage.pairs.staging import RunStager, drop_generation
from ispf_server.storage.pairs.state import SyncRow

log = logging.getLogger(__name__)

# A compaction is due when the overlay (rows and tombstones) holds this share of the
# base's entries (own IDs and peer tags in the runs), and at least MINIMUM rows: a
# small pair's overlay costs little to read, and rewriting its runs after every run
# would gain nothing.
SHARE = 0.01
MINIMUM = 4096
PARTS_PER_READ = 64  # parts of a run read per query (and per hold of the store's lock)
OVERLAY = ("own_tags", "peer_tags", "own_gone", "peer_gone")


@dataclass(frozen=True)
class Size:
    overlay: int  # rows and tombstones on top of the runs
    base: int  # own IDs and peer tags in the runs (whole parts, an upper bound)

    def due(self, share: float = SHARE, minimum: int = MINIMUM) -> bool:
        return self.overlay > 0 and self.overlay >= max(minimum, share * self.base)


@dataclass(frozen=True)
class Compacted:
    overlay: int  # rows and tombstones merged away
    records: int  # entries of the new runs (own IDs, own tags, peer tags, matches)
    seconds: float


def size(db: Connection, peer: str, epoch: int) -> Size:
    """How large the pair's overlay is against its base: index-only counts."""
    pair = (peer, epoch)
    overlay = sum(
        int(db.execute(f"SELECT count(*) FROM {t} WHERE peer=? AND epoch=?", pair).fetchone()[0])  # noqa: S608
        for t in OVERLAY
    )
    gen = pairruns.current(db, peer, epoch)
    parts = 0
    if gen is not None:
        parts = int(
            db.execute(
                "SELECT count(*) FROM pair_runs WHERE peer=? AND epoch=? AND gen=? "
                "AND kind IN (?, ?)",
                (*pair, gen, OWN_NID.name, PEER_TAG.name),
            ).fetchone()[0]
        )
    return Size(overlay, parts * pairruns.PART_RECORDS)


def overlay_rows(db: Connection) -> int:
    """Rows and tombstones on top of every pair's runs (what compaction keeps small)."""
    return sum(
        int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # noqa: S608
        for t in OVERLAY
    )


def _sync_row(db: Connection, peer: str, epoch: int) -> SyncRow | None:
    return SyncRow.of(db.execute(SyncRow.SELECT, (peer, epoch)).fetchone())


@dataclass
class _Overlay:
    """The overlay as the new runs' records, each list sorted, and the keys of the
    base's entries to leave out, by run."""

    add: dict[str, list[bytes]]
    drop: dict[str, list[bytes]]
    labelsets: dict[str, int]  # label set text -> number, the base's and the rows'
    rows: int


def _stop_if(stopping: Callable[[], bool]) -> None:
    if stopping():
        raise Abandoned("stopped before it ended")


def _read_overlay(
    db: Database, peer: str, epoch: int, gen: int | None, stopping: Callable[[], bool]
) -> _Overlay:
    pair = (peer, epoch)
    with db.reading() as conn:
        own = [
            (str(n), str(lb), bytes(t))
            for n, lb, t in conn.execute(
                "SELECT nid, labels, tag FROM own_tags WHERE peer=? AND epoch=?", pair
            )
        ]
        peer_rows = [
            (bytes(t), str(lb))
            for t, lb in conn.execute(
                "SELECT tag, labels FROM peer_tags WHERE peer=? AND epoch=?", pair
            )
        ]
        own_gone = sorted(
            str(r[0])
            for r in conn.execute("SELECT nid FROM own_gone WHERE peer=? AND epoch=?", pair)
        )
        peer_gone = sorted(
            bytes(r[0])
            for r in conn.execute("SELECT tag FROM peer_gone WHERE peer=? AND epoch=?", pair)
        )
        base_ls = pairruns.labelsets(conn, peer, epoch) if gen is not None else {}
    _stop_if(stopping)
    with db.reading() as conn:
        matched = lookups.overlay_matches(conn, peer, epoch)
    # The base's entries the tombstones remove, in every run: an own ID's entry by
    # tag too (its tag in the base), and a match by the own ID holding the peer tag
    # that went.
    gone_nids = [n.encode("ascii") for n in own_gone if n.isascii() and len(n) == pairruns.NID]
    _stop_if(stopping)
    with db.reading() as conn:
        own_base = pairruns.lookup(conn, peer, epoch, OWN_NID, gone_nids) if gen is not None else {}
    _stop_if(stopping)
    with db.reading() as conn:
        owners = pairruns.lookup(conn, peer, epoch, OWN_TAG, peer_gone) if gen is not None else {}
    labelsets: dict[str, int] = {}
    for key, text in sorted(base_ls.items()):
        labelsets.setdefault(text, int.from_bytes(key, "big"))

    def lsid(text: str) -> bytes:
        n = labelsets.get(text)
        if n is None:
            n = labelsets[text] = max(labelsets.values(), default=-1) + 1
        return pairruns.lsid(n)

    def ascii_nid(nid: str) -> bytes:
        raw = nid.encode("ascii", "replace")
        if len(raw) != pairruns.NID or not raw.isdigit():
            raise Abandoned(f"an own ID of the pair with {peer} is not 13 digits: not packed")
        return raw

    if any(len(t) != pairruns.TAG for _, _, t in own) or any(
        len(t) != pairruns.TAG for t, _ in peer_rows
    ):
        raise Abandoned(f"a tag of the pair with {peer} is not {pairruns.TAG} bytes: not packed")
    add = {
        OWN_NID.name: [ascii_nid(n) + t + lsid(lb) for n, lb, t in own],
        OWN_TAG.name: [t + ascii_nid(n) + lsid(lb) for n, lb, t in own],
        PEER_TAG.name: [t + lsid(lb) for t, lb in peer_rows],
        MATCHED.name: [ascii_nid(n) + t + lsid(lb) for n, t, lb in matched],
    }
    for recs in add.values():
        recs.sort()
    matched_drop = set(gone_nids) | {rec[TAG_LED_NID] for rec in owners.values()}
    drop = {
        OWN_NID.name: sorted(own_base),
        OWN_TAG.name: sorted(rec[NID_LED_TAG] for rec in own_base.values()),
        PEER_TAG.name: sorted(peer_gone),
        MATCHED.name: sorted(matched_drop),
    }
    rows = len(own) + len(peer_rows) + len(own_gone) + len(peer_gone)
    return _Overlay(add, drop, labelsets, rows)


def _parts(
    db: Database, peer: str, epoch: int, gen: int, kind: Kind, stopping: Callable[[], bool]
) -> Iterator[tuple[bytes, bytes]]:
    """(last key, records) of each part of a run, in order, a batch per read."""
    at = 0
    while True:
        _stop_if(stopping)
        with db.reading() as conn:
            rows = conn.execute(
                "SELECT part, last, data FROM pair_runs WHERE peer=? AND epoch=? AND gen=? "
                "AND kind=? AND part >= ? ORDER BY part LIMIT ?",
                (peer, epoch, gen, kind.name, at, PARTS_PER_READ),
            ).fetchall()
        if not rows:
            return
        for _, last, data in rows:
            yield bytes(last), bytes(data)
        at = int(rows[-1][0]) + 1


def _without(data: bytes, kind: Kind, keys: list[bytes]) -> bytes:
    """A part's sorted records less those whose key is among `keys` (sorted)."""
    w, k = kind.width, kind.key
    n = len(data) // w
    cut: list[int] = []
    lo = 0
    for key in keys:
        i = bisect_left(range(n), key, lo=lo, key=lambda j: data[j * w : j * w + k])
        if i < n and data[i * w : i * w + k] == key:
            cut.append(i)
        lo = i
    if not cut:
        return data
    out, start = bytearray(), 0
    for i in cut:
        out += data[start * w : i * w]
        start = i + 1
    out += data[start * w :]
    return bytes(out)


def merged(
    base: Iterator[tuple[bytes, bytes]], kind: Kind, drop: list[bytes], add: list[bytes]
) -> Iterator[bytes]:
    """A run's sorted records: the base's parts less the dropped keys, with the added
    records (sorted) merged in where they fall."""
    add_keys = [rec[: kind.key] for rec in add]
    d = a = 0
    for last, data in base:
        d_end = bisect_right(drop, last, lo=d)
        if d_end > d:
            data = _without(data, kind, drop[d:d_end])
            d = d_end
        a_end = bisect_right(add_keys, last, lo=a)
        if a_end > a:
            data = merge_sorted([data, b"".join(add[a:a_end])], kind.width)
            a = a_end
        if data:
            yield data
    if a < len(add):
        yield b"".join(add[a:])


def compact(
    db: Database,
    peer: str,
    epoch: int,
    stopping: Callable[[], bool] = lambda: False,
    leftovers: list[int] | None = None,
) -> Compacted | None:
    """Rewrite the pair's runs from its merged state and clear its overlay (see the
    module's notes). The caller holds the pair's lock. None: the pair has no state;
    `Abandoned` where the pair changed meanwhile or `stopping()` became true (its
    state then left as it was). The generation left to drop (the old runs, or this
    one's staging where it failed) is dropped before it returns, or, given
    `leftovers`, put there for the caller to drop once it has let go of the lock
    (`drop_generation`): nothing reads it, nor stages under its number again."""
    t0 = time.perf_counter()
    _stop_if(stopping)
    with db.reading() as conn:
        start = _sync_row(conn, peer, epoch)
        gen = pairruns.current(conn, peer, epoch)
    if start is None:
        return None
    _stop_if(stopping)  # (every read is followed by a check before the next)
    overlay = _read_overlay(db, peer, epoch, gen, stopping)
    _stop_if(stopping)
    stager = RunStager(db, peer, epoch, None)
    left = [] if leftovers is None else leftovers
    records = 0
    try:
        try:
            for kind in pairruns.KINDS:
                base: Iterator[tuple[bytes, bytes]] = (
                    iter(()) if gen is None else _parts(db, peer, epoch, gen, kind, stopping)
                )
                run = stager.writer(kind)
                size = 0
                for chunk in ascending(
                    merged(base, kind, overlay.drop[kind.name], overlay.add[kind.name]),
                    kind.width,
                    kind.key,
                ):
                    _stop_if(stopping)  # (a pair without runs reads none: asked here)
                    run.append(chunk)
                    size += len(chunk)
                _stop_if(stopping)
                run.close()
                records += size // kind.width
            new = stager.done(overlay.labelsets)
            with db.transaction() as cur:
                conn = cur.connection
                same = (
                    _sync_row(conn, peer, epoch) == start
                    and pairruns.current(conn, peer, epoch) == gen
                )
                if not same:
                    raise Abandoned(f"the pair state with {peer} changed while it was compacted")
                # (checks every part staged is there; the old runs go after the commit)
                pairruns.activate(cur, peer, epoch, new, keep_old=True)
                for table in OVERLAY:
                    cur.execute(f"DELETE FROM {table} WHERE peer=? AND epoch=?", (peer, epoch))  # noqa: S608
        except BaseException:
            left.append(stager.gen)
            raise
        if gen is not None:
            left.append(gen)  # (the old runs, no longer read)
    finally:
        if leftovers is None:
            for g in left:
                drop_generation(db, peer, epoch, g)
    return Compacted(overlay.rows, records, time.perf_counter() - t0)


class Lock(Protocol):
    """What a compaction uses of a pair's lock (`PairLock`)."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...

    def acquire_giving_way(self, timeout: float) -> threading.Event | None: ...

    def stop_giving_way(self) -> None: ...

    def release(self) -> None: ...


@dataclass
class Counts:
    """Compactions so far, by how they ended (the node's metrics)."""

    compacted: int = 0
    gave_way: int = 0  # stopped for a session of the pair, tried again after it
    failed: int = 0  # abandoned or failed: the state left as it was


class Compactor:
    """Compactions after sessions, in the background, and their end at shutdown.

    `after_session`: a pair whose incremental run just committed is compacted if due
    (`Size.due`), in a thread of its own, once the node is quiet: no batch session
    running and none ended for `quiet` seconds (a nightly job's runs with its peers
    follow each other; its compactions then wait until the last has ended, and take
    no CPU from them), or `LONGEST_WAIT` after the run that made it due, regardless
    (that time kept until a compaction of the pair ends other than by giving way,
    or finds it not due). It holds the pair's lock while it runs, giving way to a session of
    the pair that asks for it (`PairLock.ask_to_give_way`), also while it still
    waits for the lock: it stops at its next read, lets go, drops what it staged,
    and is tried again once the node is quiet. Past `LONGEST_WAIT` it no longer
    gives way (sessions of the pair then wait for it, and a peer's Handshake is
    asked to retry), so sessions that follow each other without end cannot keep
    the overlay from ever being merged. The generation a compaction leaves (its
    old runs, or its staging) is dropped after it lets go. One compaction per pair
    is pending at a time. `stop`: compactions waiting or running are given up (a
    running one at its next read), and waited for."""

    LOCK_WAIT = 600.0  # seconds a compaction waits for the pair's lock before giving up
    QUIET = 15.0  # seconds without a batch session on the node before compacting
    LONGEST_WAIT = 3600.0  # a pair due this long is compacted anyway, without giving way

    def __init__(
        self,
        db: Database,
        pair_lock: Callable[[str], Lock],
        busy: Callable[[], bool] = lambda: False,
        *,
        share: float = SHARE,
        minimum: int = MINIMUM,
        quiet: float = QUIET,
    ) -> None:
        self._db, self._pair_lock, self._busy = db, pair_lock, busy
        self.share, self.minimum, self.quiet = share, minimum, quiet
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pending: set[tuple[str, int]] = set()
        self._due_since: dict[tuple[str, int], float] = {}  # (kept while it gives way)
        self._last_session = time.monotonic()
        self._guard = threading.Lock()
        self.finished: collections.deque[Compacted] = collections.deque(maxlen=100)
        self.counts = Counts()

    def _count(self, outcome: str) -> None:
        with self._guard:
            setattr(self.counts, outcome, getattr(self.counts, outcome) + 1)

    def after_session(self, peer: str, epoch: int) -> None:
        self._last_session = time.monotonic()
        with self._guard:
            if self._stopping.is_set() or (peer, epoch) in self._pending:
                return
            self._pending.add((peer, epoch))
            self._due_since.setdefault((peer, epoch), time.monotonic())
            t = threading.Thread(
                target=self._run, args=(peer, epoch), name=f"compact-{peer}", daemon=True
            )
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()  # (under the guard: `wait` never sees it listed and not yet alive)

    def _deadline(self, peer: str, epoch: int) -> float:
        """When the pair's compaction stops waiting for quiet and giving way."""
        with self._guard:
            since = self._due_since.get((peer, epoch), time.monotonic())
        return since + self.LONGEST_WAIT

    def _wait_for_quiet(self, deadline: float) -> None:
        while not self._stopping.is_set() and time.monotonic() < deadline:
            idle = time.monotonic() - self._last_session
            if idle >= self.quiet and not self._busy():
                return
            self._stopping.wait(min(1.0, max(0.05, self.quiet - idle)))

    def _take(self, lock: Lock, peer: str, epoch: int) -> threading.Event | None:
        """The pair's lock, giving way unless the pair is past its longest wait (an
        event then that no session sets); None: it stayed busy."""
        if time.monotonic() < self._deadline(peer, epoch):
            give_way = lock.acquire_giving_way(self.LOCK_WAIT)
            if give_way is None or time.monotonic() < self._deadline(peer, epoch):
                return give_way
            lock.stop_giving_way()  # (its longest wait ran out while it waited for the lock)
        elif not lock.acquire(timeout=self.LOCK_WAIT):
            return None
        log.info(
            "pair state with %s (epoch %d) due for compaction for %.0f s: compacting "
            "without giving way to sessions of the pair",
            peer,
            epoch,
            self.LONGEST_WAIT,
        )
        return threading.Event()

    def run_now(self, peer: str, epoch: int) -> Compacted | None:
        """Compact the pair if due, in this thread (waits for the pair's lock)."""
        if self._stopping.is_set():
            return None
        lock = self._pair_lock(peer)
        give_way = self._take(lock, peer, epoch)
        if give_way is None:
            log.warning("pair state with %s not compacted: its lock stayed busy", peer)
            return None
        leftovers: list[int] = []
        gave_way = False
        try:
            try:
                if self._stopping.is_set():
                    return None
                _stop_if(give_way.is_set)  # (asked while it waited for the lock)
                with self._db.reading() as conn:
                    due = size(conn, peer, epoch).due(self.share, self.minimum)
                if not due:
                    self._settled(peer, epoch)
                    return None
                done = compact(
                    self._db,
                    peer,
                    epoch,
                    lambda: self._stopping.is_set() or give_way.is_set(),
                    leftovers,
                )
            except Abandoned:
                gave_way = give_way.is_set() and not self._stopping.is_set()
                if gave_way:  # (counted before it lets go: the session then sees it)
                    self._count("gave_way")
                raise
            finally:
                lock.release()
        except Abandoned:
            if not gave_way:
                self._settled(peer, epoch)
                raise
            log.info(
                "pair state with %s: compaction gave way to a session of the pair; it is "
                "tried again once the node is quiet",
                peer,
            )
            self.after_session(peer, epoch)
            return None
        except BaseException:
            self._settled(peer, epoch)
            raise
        finally:
            for gen in leftovers:  # (after letting go: a session need not wait for it)
                drop_generation(self._db, peer, epoch, gen, self._stopping.is_set)
        self._settled(peer, epoch)
        if done is not None:
            self._count("compacted")
            self.finished.append(done)
            log.info(
                "pair state with %s (epoch %d) compacted: %d overlay rows merged into "
                "%d run records in %.1f s",
                peer,
                epoch,
                done.overlay,
                done.records,
                done.seconds,
            )
        return done

    def _settled(self, peer: str, epoch: int) -> None:
        """The pair's compaction ended other than by giving way: its wait starts anew."""
        with self._guard:
            self._due_since.pop((peer, epoch), None)

    def _run(self, peer: str, epoch: int) -> None:
        try:
            try:
                self._wait_for_quiet(self._deadline(peer, epoch))
            finally:
                with self._guard:
                    self._pending.discard((peer, epoch))  # (a later run's comes after this)
            self.run_now(peer, epoch)
        except IspfError as exc:  # (a message of ours)
            if not self._stopping.is_set():
                self._count("failed")
                # (abandoned, or its epoch retired: expected now and then; anything
                # else, such as a key twice in a run, is a broken invariant)
                expected = isinstance(exc, (Abandoned, StagingLost, UnknownEpoch))
                log.log(
                    logging.INFO if expected else logging.WARNING,
                    "pair state with %s not compacted: %s",
                    peer,
                    exc.message,
                )
        except Exception as exc:  # housekeeping: the state stays as it was, and correct
            self._count("failed")
            if not self._db.closed:
                log.warning(
                    "pair state with %s not compacted (%s); the next run will try again",
                    peer,
                    type(exc).__name__,
                )

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the compactions started so far to end, tries again after giving
        way included (`timeout` s in all)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._guard:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads or (deadline is not None and time.monotonic() >= deadline):
                return
            for t in threads:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 10.0) -> None:
        """Give up the compactions waiting or running; wait `timeout` s for them in all."""
        self._stopping.set()
        self.wait(timeout)
