"""What a node keeps per (peer, epoch) so that reconciliation can be incremental and
online checks can be answered: the re-key counter of its fixed blinding key (the
key itself is derived from the node's master key file, never stored), the tags
of its own IDs, and the peer's tags with the peer's labels.

With keys fixed for a (peer, epoch), a tag ``X25519(b, X25519(a, h(id)))`` is the
same in every session, so after a first full run each side only exchanges what
changed. The price, stated in docs/security.md: the peer sees how the tag set
changes between runs. A new epoch re-keys everything; so does the policy's
`rekey_after_days` for one pair within an epoch (`rekey`); retiring an epoch
destroys its keys and tags (`Store.destroy_epoch`).

The two sides agree on their state by fingerprints: the XOR of the tags, for
the initiator's set and the responder's set. Equal fingerprints on
both sides mean an incremental run is possible; otherwise the run is full and
both sides replace their state for the pair.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from ispf.keys import BlindingKey, MasterKey
from ispf.records import Label
from ispf_server import pairruns
from ispf_server.pairruns import (
    MATCHED,
    NID_LED_LSID,
    NID_LED_NID,
    NID_LED_TAG,
    OWN_NID,
    OWN_TAG,
    PEER_LSID,
    PEER_TAG,
    TAG_LED_LSID,
    TAG_LED_NID,
)
from ispf_server.records import sort_inplace, xor_fold, zip_into, zip_records

FP_BYTES = 32
EMPTY_FP = bytes(FP_BYTES)
K = TypeVar("K")

SCHEMA = """
-- No scalar here: the pair key is derived from the node's master key file over
-- (peer, epoch, rekey). `created_at`: when the current key came into use.
CREATE TABLE IF NOT EXISTS pair_keys (
    peer       TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    rekey      INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    PRIMARY KEY (peer, epoch)
);
CREATE TABLE IF NOT EXISTS own_tags (
    peer   TEXT NOT NULL,
    epoch  INTEGER NOT NULL,
    nid    TEXT NOT NULL,
    labels TEXT NOT NULL,
    tag    BLOB NOT NULL,
    PRIMARY KEY (peer, epoch, nid)
);
CREATE INDEX IF NOT EXISTS own_tags_tag ON own_tags(peer, epoch, tag);
CREATE TABLE IF NOT EXISTS peer_tags (
    peer   TEXT NOT NULL,
    epoch  INTEGER NOT NULL,
    tag    BLOB NOT NULL,
    labels TEXT NOT NULL,
    PRIMARY KEY (peer, epoch, tag)
);
CREATE TABLE IF NOT EXISTS pair_sync (
    peer     TEXT NOT NULL,
    epoch    INTEGER NOT NULL,
    -- The registry version this node's own tags for the peer reflect.
    version  INTEGER NOT NULL,
    -- Fingerprints of the own and peer tag sets, kept up to date with each delta.
    own_fp   BLOB NOT NULL,
    peer_fp  BLOB NOT NULL,
    -- The policy (for this peer) the own tags were chosen under; a change forces a full run.
    policy   TEXT NOT NULL,
    PRIMARY KEY (peer, epoch)
);
-- Which IDs changed at which registry version: an incremental run reads only these.
CREATE TABLE IF NOT EXISTS registry_changes (
    version INTEGER NOT NULL,
    nid     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS registry_changes_version ON registry_changes(version);
-- Base entries (in pair_runs) that later changes replaced or removed.
CREATE TABLE IF NOT EXISTS own_gone (
    peer  TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    nid   TEXT NOT NULL,
    PRIMARY KEY (peer, epoch, nid)
);
CREATE TABLE IF NOT EXISTS peer_gone (
    peer  TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    tag   BLOB NOT NULL,
    PRIMARY KEY (peer, epoch, tag)
);
"""
SCHEMA += pairruns.SCHEMA
STATE_TABLES = (
    "pair_keys",
    "own_tags",
    "peer_tags",
    "pair_sync",
    "own_gone",
    "peer_gone",
    "pair_runs",
    "pair_labelsets",
    "pair_gen",
)


def labels_text(labels: Iterable[Label]) -> str:
    return json.dumps(sorted(f"{lb.programme}/{lb.status}" for lb in set(labels)))


@functools.lru_cache(maxsize=4096)  # registries have few distinct label sets
def labels_of(text: str) -> tuple[Label, ...]:
    """The labels of a stored label set (few distinct sets: each parsed once)."""
    out = []
    for item in json.loads(text):
        prog, _, status = item.rpartition("/")
        out.append(Label(prog, status))
    return tuple(sorted(out))


def fingerprint(tags: Iterable[bytes]) -> bytes:
    """XOR of the tags: they are pseudorandom already (X25519 outputs under secret
    scalars), so the XOR tells two sets apart as well as a hash of each would, and
    a tag added then removed cancels out, which keeps it updatable per change."""
    acc = 0
    for t in tags:
        acc ^= int.from_bytes(t, "big")
    return acc.to_bytes(FP_BYTES, "big")


def fingerprint_packed(packed: bytes) -> bytes:
    """`fingerprint` of 16-byte tags packed end to end (in C where built)."""
    if len(packed) % TAG_LEN == 0:
        return bytes(FP_BYTES - TAG_LEN) + xor_fold(packed, TAG_LEN)
    return fingerprint(packed[i : i + TAG_LEN] for i in range(0, len(packed), TAG_LEN))


@dataclass(frozen=True)
class OwnTag:
    labels: str
    tag: bytes


@dataclass(frozen=True)
class SyncRow:
    version: int
    own_fp: bytes
    peer_fp: bytes
    policy: str


@dataclass(frozen=True)
class OwnGroup:
    """Own IDs added under one label set, and their tags (aligned)."""

    labels: str
    nids: list[str] = field(repr=False)
    tags: list[bytes]


@dataclass(frozen=True)
class PeerGroup:
    """Peer tags added under one label set."""

    labels: str
    tags: list[bytes]


@dataclass
class PairDelta:
    """Changes to one pair's state, applied in one transaction when a session commits.

    Additions come grouped by label set, as the session exchanged them, so that a
    full run of millions is written as a few bulk inserts."""

    reset: bool
    own_added: list[OwnGroup]
    own_removed: list[str]  # nids
    peer_added: list[PeerGroup]
    peer_removed: list[bytes]  # tags
    version: int
    own_fp: bytes
    peer_fp: bytes
    policy: str
    # A full run's state as sorted runs, built before the commit (the CPU-heavy part,
    # done while the peer does the same); once written ahead as a generation
    # (`Store.stage_result`), `staged` names it and the commit only makes it current.
    runs: PackedRuns | None = None
    staged: int | None = None


@dataclass(frozen=True)
class PackedRuns:
    labelsets: dict[str, int]  # label set text -> lsid
    runs: dict[str, Buffer]  # run kind -> sorted records


def xor_fp(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(FP_BYTES, "big")


def toggle(fp: bytes, tags: Iterable[bytes]) -> bytes:
    """Add or remove tags from a set fingerprint (XOR is its own inverse)."""
    return (int.from_bytes(fp, "big") ^ int.from_bytes(fingerprint(tags), "big")).to_bytes(
        FP_BYTES, "big"
    )


def pair_key(
    db: sqlite3.Connection, master: MasterKey, peer: str, epoch: int, now: str
) -> BlindingKey:
    """The node's fixed scalar for this (peer, epoch): derived from the master key over
    the pair's re-key counter (the row is made, counter 0, on first use)."""
    db.execute("INSERT OR IGNORE INTO pair_keys VALUES (?,?,0,?)", (peer, epoch, now))
    row = db.execute(
        "SELECT rekey FROM pair_keys WHERE peer=? AND epoch=?", (peer, epoch)
    ).fetchone()
    return master.pair_key(peer, epoch, int(row[0]))


def rekey_due(db: sqlite3.Connection, peer: str, epoch: int, now: datetime, days: int) -> bool:
    """Whether the pair key has been in use `days` days or more (0: never due)."""
    if days <= 0:
        return False
    row = db.execute(
        "SELECT created_at FROM pair_keys WHERE peer=? AND epoch=?", (peer, epoch)
    ).fetchone()
    return row is not None and now - datetime.fromisoformat(str(row[0])) >= timedelta(days=days)


def rekey(cur: sqlite3.Cursor, peer: str, epoch: int, now: str) -> None:
    """Bump the pair's re-key counter and drop its state (in the caller's transaction)."""
    for table in STATE_TABLES:
        if table != "pair_keys":
            cur.execute(f"DELETE FROM {table} WHERE peer=? AND epoch=?", (peer, epoch))  # noqa: S608
    cur.execute(
        "UPDATE pair_keys SET rekey = rekey + 1, created_at=? WHERE peer=? AND epoch=?",
        (now, peer, epoch),
    )


def has_stored_scalars(db: sqlite3.Connection) -> bool:
    """A store from before master-key derivation (its pair_keys kept the scalars)."""
    cols = {str(r[1]) for r in db.execute("PRAGMA table_info(pair_keys)")}
    return "scalar" in cols


# Bulk inserts run inside SQLite: the tags (and 13-digit IDs) of one label set go in
# as packed blobs and a recursive CTE cuts them into rows, sorted by the key, so
# Python does not bind a million parameter tuples (about twice as fast).
_OWN_BULK = (
    "WITH RECURSIVE i(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM i WHERE k + 1 < :n) "
    "INSERT OR REPLACE INTO own_tags "
    "SELECT :peer, :epoch, CAST(substr(:nids, k * 13 + 1, 13) AS TEXT), :labels, "
    "substr(:tags, k * 16 + 1, 16) FROM i ORDER BY 3"
)
_PEER_BULK = (
    "WITH RECURSIVE i(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM i WHERE k + 1 < :n) "
    "INSERT OR REPLACE INTO peer_tags "
    "SELECT :peer, :epoch, substr(:tags, k * 16 + 1, 16), :labels FROM i ORDER BY 3"
)
NID_BYTES = 13
TAG_LEN = 16


def _insert_own(cur: sqlite3.Cursor, peer: str, epoch: int, added: list[OwnGroup]) -> None:
    for g in added:
        if not g.tags:  # the CTE always yields its first row: never run it for none
            continue
        packed_nids = "".join(g.nids)
        if (
            packed_nids.isascii()
            and all(len(n) == NID_BYTES for n in g.nids)
            and all(len(t) == TAG_LEN for t in g.tags)
        ):
            cur.execute(
                _OWN_BULK,
                {
                    "n": len(g.nids),
                    "peer": peer,
                    "epoch": epoch,
                    "nids": packed_nids.encode("ascii"),
                    "labels": g.labels,
                    "tags": b"".join(g.tags),
                },
            )
        else:  # IDs not in canonical form (older stores, tests): row by row
            cur.executemany(
                "INSERT OR REPLACE INTO own_tags VALUES (?,?,?,?,?)",
                ((peer, epoch, n, g.labels, t) for n, t in zip(g.nids, g.tags, strict=True)),
            )


def _insert_peer(cur: sqlite3.Cursor, peer: str, epoch: int, added: list[PeerGroup]) -> None:
    for g in added:
        if not g.tags:
            continue
        if all(len(t) == TAG_LEN for t in g.tags):
            cur.execute(
                _PEER_BULK,
                {
                    "n": len(g.tags),
                    "peer": peer,
                    "epoch": epoch,
                    "tags": b"".join(g.tags),
                    "labels": g.labels,
                },
            )
        else:
            cur.executemany(
                "INSERT OR REPLACE INTO peer_tags VALUES (?,?,?,?)",
                ((peer, epoch, t, g.labels) for t in g.tags),
            )


Buffer = bytes | bytearray | memoryview


def _zip(n: int, *parts: tuple[Buffer, int]) -> bytes:
    """n fixed-width records from columns (a column of one width is a constant)."""
    return zip_records(n, *parts)


def _zip_into(dst: bytearray, at: int, n: int, *parts: tuple[Buffer, int]) -> int:
    """`_zip` written into dst from byte `at`; returns the byte after the last record."""
    return zip_into(dst, at, n, *parts)


class RunBuilder:
    """A full run's state as sorted runs, from packed columns, one run at a time, in
    memory: the general path's (`pack_runs`), which runs where the packed one
    cannot. Label sets are numbered as they are met (`lsid`), which the packed
    path (`session.match.kept`, sorting externally within a memory budget) uses too."""

    def __init__(self) -> None:
        self.texts: dict[str, int] = {}

    def lsid(self, text: str) -> bytes:
        return pairruns.lsid(self.texts.setdefault(text, len(self.texts)))

    def own(
        self,
        groups: Iterable[tuple[str, Buffer, Buffer]],
        *,
        by_tag: bool,
    ) -> bytearray:
        """From (label set, 13-byte IDs, 16-byte tags) per group: own_tag or own_nid."""
        return self._run(
            (
                (
                    len(tags) // TAG_LEN,
                    ((tags, TAG_LEN), (nids, NID_BYTES))
                    if by_tag
                    else ((nids, NID_BYTES), (tags, TAG_LEN)),
                    labels,
                )
                for labels, nids, tags in groups
            ),
            TAG_LEN + NID_BYTES,
        )

    def peer(self, groups: Iterable[tuple[str, Buffer]]) -> bytearray:
        """From (label set, 16-byte tags) per group: peer_tag."""
        return self._run(
            ((len(tags) // TAG_LEN, ((tags, TAG_LEN),), labels) for labels, tags in groups),
            TAG_LEN,
        )

    def _run(
        self,
        groups: Iterable[tuple[int, tuple[tuple[Buffer, int], ...], str]],
        columns: int,
    ) -> bytearray:
        """Each group's columns (`columns` bytes a value) zipped with its label set's id,
        one group at a time into one buffer, then sorted in place: the run itself is
        the only full-size copy (the groups' columns are views: nothing copied)."""
        todo = list(groups)
        total = sum(n for n, _, _ in todo)
        width = columns + pairruns.LSID
        out = bytearray(width * total)
        at = 0
        for n, cols, labels in todo:
            at = _zip_into(out, at, n, *cols, (self.lsid(labels), pairruns.LSID))
        sort_inplace(out, width)
        return out

    def matched(self, matches: dict[str, tuple[bytes, str]]) -> bytearray:
        """From nid -> (tag, peer labels): matched."""
        out = bytearray()
        for n, (t, lbl) in matches.items():
            out += n.encode("ascii")
            out += t
            out += self.lsid(lbl)
        sort_inplace(out, MATCHED.width)
        return out

    def done(
        self, own_nid: Buffer, own_tag: Buffer, peer_tag: Buffer, matched: Buffer
    ) -> PackedRuns:
        return PackedRuns(
            self.texts,
            {
                OWN_NID.name: own_nid,
                OWN_TAG.name: own_tag,
                PEER_TAG.name: peer_tag,
                MATCHED.name: matched,
            },
        )


def _canonical_nids(nids: list[str]) -> bool:
    joined = "".join(nids)
    return joined.isascii() and joined.isdigit() and all(map(NID_BYTES.__eq__, map(len, nids)))


def pack_runs(
    own_added: list[OwnGroup],
    peer_added: list[PeerGroup],
    matched: dict[str, tuple[bytes, str]],
) -> PackedRuns | None:
    """A full run's state as sorted runs; None where IDs or tags are not canonical
    (then the state is written as rows)."""
    tag_lists = [g.tags for g in own_added] + [g.tags for g in peer_added]
    if not all(_canonical_nids(g.nids) for g in own_added) or not all(
        all(map(TAG_LEN.__eq__, map(len, tags))) for tags in tag_lists
    ):
        return None
    own = [(g.labels, "".join(g.nids).encode("ascii"), b"".join(g.tags)) for g in own_added]
    b = RunBuilder()
    own_tag = b.own(own, by_tag=True)
    peer_tag = b.peer((g.labels, b"".join(g.tags)) for g in peer_added)
    return b.done(b.own(own, by_tag=False), own_tag, peer_tag, b.matched(matched))


def apply_delta(cur: sqlite3.Cursor, peer: str, epoch: int, d: PairDelta) -> None:
    """Write a session's changes to the pair state (inside the session's transaction).

    A full run replaces the state: as sorted runs where the IDs are canonical,
    else as rows. An incremental run writes rows on top, and tombstones the
    run entries it replaces or removes."""
    if d.reset:
        for table in ("own_tags", "peer_tags", "own_gone", "peer_gone"):
            cur.execute(f"DELETE FROM {table} WHERE peer=? AND epoch=?", (peer, epoch))  # noqa: S608
        if d.staged is not None:
            pairruns.activate(cur, peer, epoch, d.staged)
        elif d.runs is not None:
            gen = pairruns.stage(cur, peer, epoch, d.runs.labelsets, d.runs.runs)
            pairruns.activate(cur, peer, epoch, gen)
        else:
            pairruns.clear(cur, peer, epoch)
            _insert_own(cur, peer, epoch, d.own_added)
            _insert_peer(cur, peer, epoch, d.peer_added)
    else:
        if pairruns.held(cur.connection, peer, epoch):
            # Harmless where the run holds no such entry: lookups only consult it there.
            cur.executemany(
                "INSERT OR IGNORE INTO own_gone VALUES (?,?,?)",
                (
                    (peer, epoch, n)
                    for n in [*d.own_removed, *(n for g in d.own_added for n in g.nids)]
                ),
            )
            cur.executemany(
                "INSERT OR IGNORE INTO peer_gone VALUES (?,?,?)",
                (
                    (peer, epoch, t)
                    for t in [*d.peer_removed, *(t for g in d.peer_added for t in g.tags)]
                ),
            )
        cur.executemany(
            "DELETE FROM own_tags WHERE peer=? AND epoch=? AND nid=?",
            ((peer, epoch, n) for n in d.own_removed),
        )
        _insert_own(cur, peer, epoch, d.own_added)
        cur.executemany(
            "DELETE FROM peer_tags WHERE peer=? AND epoch=? AND tag=?",
            ((peer, epoch, t) for t in d.peer_removed),
        )
        _insert_peer(cur, peer, epoch, d.peer_added)
    cur.execute(
        "INSERT OR REPLACE INTO pair_sync VALUES (?,?,?,?,?,?)",
        (peer, epoch, d.version, d.own_fp, d.peer_fp, d.policy),
    )
    # (Changes every pair has seen are dropped after the commit: Store.prune_changes.)


def prune_changes(cur: sqlite3.Cursor, batch: int) -> int:
    """Drop up to `batch` registry changes every pair has seen; returns how many."""
    return cur.execute(
        "DELETE FROM registry_changes WHERE rowid IN (SELECT rowid FROM registry_changes "
        "WHERE version <= (SELECT MIN(version) FROM pair_sync) LIMIT ?)",
        (batch,),
    ).rowcount


# -- reading the state: rows first, then the runs' entries not tombstoned ----------

_IN = 500


def _gone(
    db: sqlite3.Connection, table: str, column: str, peer: str, epoch: int, keys: list[Any]
) -> set[Any]:
    found: set[Any] = set()
    for at in range(0, len(keys), _IN):
        part = keys[at : at + _IN]
        found.update(
            r[0]
            for r in db.execute(
                f"SELECT {column} FROM {table} WHERE peer=? AND epoch=? "  # noqa: S608
                f"AND {column} IN ({','.join('?' * len(part))})",
                (peer, epoch, *part),
            )
        )
    return found


def _rows(
    db: sqlite3.Connection, sql: str, peer: str, epoch: int, keys: Iterable[K]
) -> dict[K, tuple[Any, ...]]:
    out: dict[K, tuple[Any, ...]] = {}
    for key in keys:
        row = db.execute(sql, (peer, epoch, key)).fetchone()
        if row:
            out[key] = tuple(row)
    return out


def own_by_nids(
    db: sqlite3.Connection, peer: str, epoch: int, nids: Iterable[str]
) -> dict[str, OwnTag]:
    wanted = list(nids)
    rows = _rows(
        db,
        "SELECT labels, tag FROM own_tags WHERE peer=? AND epoch=? AND nid=?",
        peer,
        epoch,
        wanted,
    )
    out = {n: OwnTag(str(r[0]), bytes(r[1])) for n, r in rows.items()}
    rest = [n for n in wanted if n not in out and len(n) == NID_BYTES and n.isascii()]
    # The runs, then (only for what they hold) tombstones and label sets: a lookup
    # that finds nothing, like most online checks, costs two indexed reads.
    found = pairruns.lookup(db, peer, epoch, OWN_NID, [n.encode("ascii") for n in rest])
    if found:
        gone = _gone(db, "own_gone", "nid", peer, epoch, [k.decode("ascii") for k in found])
        ls = pairruns.labelsets(db, peer, epoch)
        for key, rec in found.items():
            if key.decode("ascii") not in gone:
                out[key.decode("ascii")] = OwnTag(ls[rec[NID_LED_LSID]], rec[NID_LED_TAG])
    return out


def own_by_tags(
    db: sqlite3.Connection, peer: str, epoch: int, tags: Iterable[bytes]
) -> dict[bytes, tuple[str, str]]:
    """tag -> (nid, labels) of this node's IDs holding these tags for the peer."""
    wanted = list(tags)
    rows = _rows(
        db,
        "SELECT nid, labels FROM own_tags WHERE peer=? AND epoch=? AND tag=?",
        peer,
        epoch,
        wanted,
    )
    out = {t: (str(r[0]), str(r[1])) for t, r in rows.items()}
    rest = [t for t in wanted if t not in out]
    found = pairruns.lookup(db, peer, epoch, OWN_TAG, rest)
    if found:
        nids = {t: rec[TAG_LED_NID].decode("ascii") for t, rec in found.items()}
        gone = _gone(db, "own_gone", "nid", peer, epoch, sorted(set(nids.values())))
        ls = pairruns.labelsets(db, peer, epoch)
        for t, rec in found.items():
            if nids[t] not in gone:
                out[t] = (nids[t], ls[rec[TAG_LED_LSID]])
    return out


def peer_by_tags(
    db: sqlite3.Connection, peer: str, epoch: int, tags: Iterable[bytes]
) -> dict[bytes, str]:
    """tag -> the peer's labels, for the peer tags held among these."""
    wanted = list(tags)
    rows = _rows(
        db, "SELECT labels FROM peer_tags WHERE peer=? AND epoch=? AND tag=?", peer, epoch, wanted
    )
    out = {t: str(r[0]) for t, r in rows.items()}
    rest = [t for t in wanted if t not in out]
    found = pairruns.lookup(db, peer, epoch, PEER_TAG, rest)
    if found:
        gone = _gone(db, "peer_gone", "tag", peer, epoch, list(found))
        ls = pairruns.labelsets(db, peer, epoch)
        for t, rec in found.items():
            if t not in gone:
                out[t] = ls[rec[PEER_LSID]]
    return out


def matched_state(db: sqlite3.Connection, peer: str, epoch: int) -> list[tuple[str, bytes, str]]:
    """(nid, tag, peer labels) of own IDs whose tag the peer also holds: the matches."""
    out: list[tuple[str, bytes, str]] = []
    pair = (peer, epoch)
    held = pairruns.held(db, peer, epoch)
    if held:
        own_gone = {
            str(r[0]) for r in db.execute("SELECT nid FROM own_gone WHERE peer=? AND epoch=?", pair)
        }
        peer_gone = {
            bytes(r[0])
            for r in db.execute("SELECT tag FROM peer_gone WHERE peer=? AND epoch=?", pair)
        }
        ls = pairruns.labelsets(db, peer, epoch)
        for rec in pairruns.scan(db, peer, epoch, MATCHED):
            nid, tag = rec[NID_LED_NID].decode("ascii"), rec[NID_LED_TAG]
            if nid not in own_gone and tag not in peer_gone:
                out.append((nid, tag, ls[rec[NID_LED_LSID]]))
    # Own rows (changed since the run) against the peer's current tags.
    own_rows = [
        (str(n), bytes(t))
        for n, t in db.execute("SELECT nid, tag FROM own_tags WHERE peer=? AND epoch=?", pair)
    ]
    theirs = peer_by_tags(db, peer, epoch, [t for _, t in own_rows])
    out.extend((n, t, theirs[t]) for n, t in own_rows if t in theirs)
    # The peer's rows against own IDs still as the run holds them.
    if held:
        peer_rows = {
            bytes(t): str(lb)
            for t, lb in db.execute(
                "SELECT tag, labels FROM peer_tags WHERE peer=? AND epoch=?", pair
            )
        }
        found = pairruns.lookup(db, peer, epoch, OWN_TAG, peer_rows)
        nids = {t: rec[TAG_LED_NID].decode("ascii") for t, rec in found.items()}
        gone = _gone(db, "own_gone", "nid", peer, epoch, sorted(set(nids.values())))
        out.extend((n, t, peer_rows[t]) for t, n in nids.items() if n not in gone)
    return out
