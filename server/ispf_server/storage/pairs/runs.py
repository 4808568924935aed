"""Sorted runs: a full run's pair state as packed, sorted, fixed-width records.

A full reconciliation of a registry of millions replaces a pair's state at once.
Writing it as one SQLite row per ID and per tag (with an index each) costs
seconds per hundred thousand; writing sorted runs costs a sort and a few
hundred blob inserts. Lookups find the part whose last key is at or after the
key (an index on `last`) and binary-search inside it.

Record layouts (lsid: the label set's number in `pair_labelsets`, 4 bytes big-endian):

* ``own_nid``:  nid (13 ASCII digits) | tag (16) | lsid   — own state by ID
* ``own_tag``:  tag (16) | nid (13) | lsid                — own state by tag
* ``peer_tag``: tag (16) | lsid                           — the peer's tags
* ``matched``:  nid (13) | tag (16) | lsid of the peer's labels — own ⋈ peer

Runs are the base of the state; later incremental changes go to row tables on
top (see `state` and `deltas`), with tombstones for base entries they replace or remove.

Runs are written under a generation number and become the pair's state when
`pair_gen` points at it. A session stages its runs before the peer has agreed
(while the peer works too), and its commit only flips the pointer; a staged
generation that never became current (a failed session) is dropped by the
next staging for the pair, or with the epoch. Generation numbers are the
store's, each given out once (`new_generation`, `pair_gen_last`). The flip
checks that every part the stager wrote is there (`Staged`), so a generation
something else dropped or wrote into is never made the state.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

from ispf.errors import StagingLost
from ispf_server.storage.db import IN_BATCH, Connection, Cursor, upsert_sql

NID = 13
TAG = 16
LSID = 4
PART_RECORDS = 256  # records per blob (8 KB): a probe reads one part, a few pages


@dataclass(frozen=True)
class Kind:
    name: str
    width: int
    key: int  # leading bytes that are the key


# Fields of the records, by layout: ID-led (own_nid, matched) and tag-led (own_tag).
NID_LED_NID = slice(0, NID)
NID_LED_TAG = slice(NID, NID + TAG)
NID_LED_LSID = slice(NID + TAG, NID + TAG + LSID)
TAG_LED_NID = slice(TAG, TAG + NID)
TAG_LED_LSID = slice(TAG + NID, TAG + NID + LSID)
PEER_LSID = slice(TAG, TAG + LSID)

OWN_NID = Kind("own_nid", NID + TAG + LSID, NID)
OWN_TAG = Kind("own_tag", TAG + NID + LSID, TAG)
PEER_TAG = Kind("peer_tag", TAG + LSID, TAG)
MATCHED = Kind("matched", NID + TAG + LSID, NID)
KINDS = (OWN_NID, OWN_TAG, PEER_TAG, MATCHED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS pair_runs (
    peer  TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    gen   INTEGER NOT NULL,
    kind  TEXT NOT NULL,
    part  INTEGER NOT NULL,
    last  BLOB NOT NULL,   -- the last key in this part
    data  BLOB NOT NULL,   -- sorted fixed-width records
    PRIMARY KEY (peer, epoch, gen, kind, part)
);
CREATE INDEX IF NOT EXISTS pair_runs_last ON pair_runs(peer, epoch, gen, kind, last, part);
CREATE TABLE IF NOT EXISTS pair_labelsets (
    peer   TEXT NOT NULL,
    epoch  INTEGER NOT NULL,
    gen    INTEGER NOT NULL,
    id     INTEGER NOT NULL,
    labels TEXT NOT NULL,
    PRIMARY KEY (peer, epoch, gen, id)
);
-- The generation of runs that is the pair's state.
CREATE TABLE IF NOT EXISTS pair_gen (
    peer  TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    gen   INTEGER NOT NULL,
    PRIMARY KEY (peer, epoch)
);
-- The last generation number given out, for every pair (one row): no number is
-- given out twice (`new_generation`).
CREATE TABLE IF NOT EXISTS pair_gen_last (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    gen  INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Staged:
    """A staged generation, and how many parts each of its runs was written in (kind
    name -> parts; a run with none is left out), which `activate` checks."""

    gen: int
    parts: dict[str, int]
    labelsets: int | None = None  # how many label sets were written (None: not checked)


def lsid(n: int) -> bytes:
    return n.to_bytes(LSID, "big")


Run = bytes | bytearray | memoryview  # a run's sorted records, packed
Buffer = Run


def current(db: Connection, peer: str, epoch: int) -> int | None:
    """The generation that is the pair's state; None: the pair has no runs."""
    row = db.execute("SELECT gen FROM pair_gen WHERE peer=? AND epoch=?", (peer, epoch)).fetchone()
    return int(row[0]) if row else None


def held(db: Connection, peer: str, epoch: int) -> bool:
    return current(db, peer, epoch) is not None


def write_run(cur: Cursor, peer: str, epoch: int, gen: int, kind: Kind, data: Run) -> int:
    """Store the sorted records of `kind` in parts, under generation `gen` (written
    once per generation); returns how many parts."""
    return write_parts(cur, peer, epoch, gen, kind, 0, data)


def write_parts(
    cur: Cursor, peer: str, epoch: int, gen: int, kind: Kind, first: int, data: Run
) -> int:
    """Store sorted records of `kind` as parts numbered from `first` (a run written
    in pieces as it is merged: every piece but the last whole parts); returns the
    next part's number."""
    step = PART_RECORDS * kind.width

    def last_key(at: int) -> bytes:
        start = min(at + step, len(data)) - kind.width
        return bytes(data[start : start + kind.key])

    cur.executemany(
        "INSERT INTO pair_runs VALUES (?,?,?,?,?,?,?)",
        (
            (peer, epoch, gen, kind.name, first + at // step, last_key(at), data[at : at + step])
            for at in range(0, len(data), step)
        ),
    )
    return first + -(-len(data) // step)


def stage(
    cur: Cursor,
    peer: str,
    epoch: int,
    labelsets: dict[str, int],
    runs: dict[str, Run],
) -> Staged:
    """Write sorted runs (by kind name) as a new generation, not yet current; returns
    it. Generations other than the current one (stale stagings) are dropped first."""
    gen = new_generation(cur, peer, epoch)
    parts = {kind.name: write_run(cur, peer, epoch, gen, kind, runs[kind.name]) for kind in KINDS}
    write_labelsets(cur, peer, epoch, gen, labelsets)
    return Staged(gen, {k: n for k, n in parts.items() if n}, len(labelsets))


def new_generation(cur: Cursor, peer: str, epoch: int, keep: Collection[int] = ()) -> int:
    """A generation to stage runs under; stale stagings (any generation but the
    current, and those in `keep`: of running sessions) are dropped first. Nothing
    reads it until `activate`. Its number is
    the store's next (`pair_gen_last`), never given out before, nor dropped and
    given out again: a writer whose staging was dropped under it (two writers of
    one pair) finds its parts missing at `activate`, never another's staging
    under its number."""
    row = cur.execute("SELECT gen FROM pair_gen_last WHERE one = 1").fetchone()
    last = held_generations(cur) if row is None else int(row[0])
    row = cur.execute(
        "SELECT coalesce(max(gen), 0) FROM pair_runs WHERE peer=? AND epoch=?", (peer, epoch)
    ).fetchone()
    if max(int(row[0]), current(cur.connection, peer, epoch) or 0) > last:
        last = held_generations(cur)  # (a count behind what the store holds: never reuse)
    cur.execute(upsert_sql("pair_gen_last", ("one", "gen"), ("one",)), (1, last + 1))
    drop_staged(cur, peer, epoch, keep)  # (after the count: a number it drops is never reused)
    return last + 1


def held_generations(cur: Cursor) -> int:
    """The highest generation number the store holds, of any pair (0: none): where
    the count starts on a store from before it was kept (schema version 4)."""
    return max(
        int(cur.execute(f"SELECT coalesce(max(gen), 0) FROM {table}").fetchone()[0])  # noqa: S608
        for table in ("pair_runs", "pair_labelsets", "pair_gen")
    )


def drop_staged(cur: Cursor, peer: str, epoch: int, keep: Collection[int] = ()) -> int | None:
    """Drop every generation of the pair but the current one and those in `keep`;
    returns the current."""
    now = current(cur.connection, peer, epoch)
    spared = sorted({-1 if now is None else now, *keep})
    marks = ",".join("?" * len(spared))
    for table in ("pair_runs", "pair_labelsets"):
        cur.execute(
            f"DELETE FROM {table} WHERE peer=? AND epoch=? AND gen NOT IN ({marks})",  # noqa: S608
            (peer, epoch, *spared),
        )
    return now


def staged_pairs(db: Connection) -> list[tuple[str, int]]:
    """The pairs holding generations other than their current one: stagings of a
    session or a compaction, running or left by a node that stopped."""
    return [
        (str(p), int(e))
        for p, e in db.execute(
            "SELECT DISTINCT r.peer, r.epoch FROM pair_runs r LEFT JOIN pair_gen g "
            "ON g.peer = r.peer AND g.epoch = r.epoch "
            "WHERE g.gen IS NULL OR r.gen <> g.gen ORDER BY 1, 2"
        )
    ]


def write_labelsets(
    cur: Cursor, peer: str, epoch: int, gen: int, labelsets: dict[str, int]
) -> None:
    cur.executemany(
        "INSERT INTO pair_labelsets VALUES (?,?,?,?,?)",
        ((peer, epoch, gen, n, text) for text, n in labelsets.items()),
    )


def activate(cur: Cursor, peer: str, epoch: int, staged: Staged, *, keep_old: bool = False) -> None:
    """Make a staged generation the pair's state and drop every other one; `StagingLost`
    (nothing changed) where its parts, or its label sets, are not all there as they
    were written.
    `keep_old`: the other generations' parts are left for the caller to drop after
    the commit, a piece at a time (`compaction`), which nothing reads meanwhile."""
    gen = staged.gen
    found = cur.execute(
        "SELECT kind, count(*) FROM pair_runs WHERE peer=? AND epoch=? AND gen=? GROUP BY kind",
        (peer, epoch, gen),
    ).fetchall()
    labelled = cur.execute(
        "SELECT count(*) FROM pair_labelsets WHERE peer=? AND epoch=? AND gen=?",
        (peer, epoch, gen),
    ).fetchone()
    if {str(k): int(n) for k, n in found} != staged.parts or (
        staged.labelsets is not None and int(labelled[0]) != staged.labelsets
    ):
        raise StagingLost(
            f"the staged runs of the pair state with {peer} are not as they were written "
            "(dropped or written into by another writer of the pair): not made current"
        )
    if not keep_old:  # (else the old runs, label sets last, go after: `drop_generation`;
        # and a running session's staging, which a new staging leaves, stays whole)
        for table in ("pair_runs", "pair_labelsets"):
            cur.execute(
                f"DELETE FROM {table} WHERE peer=? AND epoch=? AND gen!=?",  # noqa: S608
                (peer, epoch, gen),
            )
    cur.execute(
        upsert_sql("pair_gen", ("peer", "epoch", "gen"), ("peer", "epoch")), (peer, epoch, gen)
    )


def clear(cur: Cursor, peer: str, epoch: int) -> None:
    for table in ("pair_runs", "pair_labelsets", "pair_gen"):
        cur.execute(f"DELETE FROM {table} WHERE peer=? AND epoch=?", (peer, epoch))  # noqa: S608


def labelsets(db: Connection, peer: str, epoch: int) -> dict[bytes, str]:
    """lsid bytes -> label set text, for this pair's current runs."""
    return {
        lsid(int(n)): str(text)
        for n, text in db.execute(
            "SELECT l.id, l.labels FROM pair_labelsets l JOIN pair_gen g "
            "ON g.peer = l.peer AND g.epoch = l.epoch AND g.gen = l.gen "
            "WHERE l.peer=? AND l.epoch=?",
            (peer, epoch),
        )
    }


# From this many keys on, a lookup finds their parts from the run's last keys, read
# at once from the index, and fetches the parts a batch at a time; below it, one
# indexed query per part.
MANY_KEYS = 256


def _find(data: bytes, kind: Kind, key: bytes) -> bytes | None:
    """The record of `key` in one part's sorted records, if there."""
    w, k = kind.width, kind.key
    n = len(data) // w
    i = bisect_left(range(n), key, key=lambda j: data[j * w : j * w + k])
    if i < n and data[i * w : i * w + k] == key:
        return data[i * w : (i + 1) * w]
    return None


def _lookup_many(
    db: Connection, peer: str, epoch: int, gen: int, kind: Kind, keys: list[bytes]
) -> dict[bytes, bytes]:
    """`lookup` of many sorted keys: the parts' last keys in one index-only read (a
    sixteenth of a percent of the run's bytes), then the parts that may hold a key,
    a batch per query."""
    pair = (peer, epoch, gen, kind.name)
    index = db.execute(
        "SELECT last, part FROM pair_runs WHERE peer=? AND epoch=? AND gen=? AND kind=? "
        "ORDER BY last, part",
        pair,
    ).fetchall()
    lasts = [bytes(r[0]) for r in index]
    by_part: dict[int, list[bytes]] = {}
    for key in keys:
        i = bisect_left(lasts, key)
        if i < len(lasts):
            by_part.setdefault(int(index[i][1]), []).append(key)
    out: dict[bytes, bytes] = {}
    parts = sorted(by_part)
    for at in range(0, len(parts), IN_BATCH):
        batch = parts[at : at + IN_BATCH]
        for part, data in db.execute(
            "SELECT part, data FROM pair_runs WHERE peer=? AND epoch=? AND gen=? "  # noqa: S608
            f"AND kind=? AND part IN ({','.join('?' * len(batch))})",
            (*pair, *batch),
        ):
            blob = bytes(data)
            for key in by_part[int(part)]:
                rec = _find(blob, kind, key)
                if rec is not None:
                    out[key] = rec
    return out


def lookup(
    db: Connection, peer: str, epoch: int, kind: Kind, keys: Iterable[bytes]
) -> dict[bytes, bytes]:
    """key -> its record, for the keys present in the pair's current run of `kind`."""
    out: dict[bytes, bytes] = {}
    keys = sorted(set(keys))
    if not keys:
        return out
    gen = current(db, peer, epoch)
    if gen is None:
        return out
    if len(keys) >= MANY_KEYS:
        return _lookup_many(db, peer, epoch, gen, kind, keys)
    data, last = b"", b""
    for key in keys:
        if not data or key > last:
            row = db.execute(
                "SELECT last, data FROM pair_runs WHERE peer=? AND epoch=? AND gen=? AND kind=? "
                "AND last >= ? ORDER BY last LIMIT 1",
                (peer, epoch, gen, kind.name, key),
            ).fetchone()
            if row is None:
                break  # past the end of the run: no later key is in it either
            last, data = bytes(row[0]), bytes(row[1])
        rec = _find(data, kind, key)
        if rec is not None:
            out[key] = rec
    return out


def scan(db: Connection, peer: str, epoch: int, kind: Kind) -> Iterator[bytes]:
    """Every record of the pair's current run of `kind`, in key order."""
    gen = current(db, peer, epoch)
    rows = db.execute(
        "SELECT data FROM pair_runs WHERE peer=? AND epoch=? AND gen=? AND kind=? ORDER BY part",
        (peer, epoch, gen, kind.name),
    ).fetchall()
    w = kind.width
    for (data,) in rows:
        blob = bytes(data)
        for at in range(0, len(blob), w):
            yield blob[at : at + w]
