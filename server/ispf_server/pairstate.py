"""What a node keeps per (peer, epoch) so that reconciliation can be incremental and
online checks can be answered: a fixed blinding key, the tags of its own IDs,
and the peer's tags with the peer's labels.

With keys fixed for a (peer, epoch), a tag ``X25519(b, X25519(a, h(id)))`` is the
same in every session, so after a first full run each side only exchanges what
changed. The price, stated in docs/security.md: the peer sees how the tag set
changes between runs. A new epoch re-keys everything; retiring an epoch
destroys its keys and tags (`Store.destroy_epoch`).

The two sides agree on their state by fingerprints: the XOR of the tags, for
the initiator's set and the responder's set. Equal fingerprints on
both sides mean an incremental run is possible; otherwise the run is full and
both sides replace their state for the pair.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from ispf.keys import BlindingKey
from ispf.records import Label

FP_BYTES = 32
EMPTY_FP = bytes(FP_BYTES)

SCHEMA = """
CREATE TABLE IF NOT EXISTS pair_keys (
    peer       TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    scalar     BLOB NOT NULL,
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
"""


def labels_text(labels: Iterable[Label]) -> str:
    return json.dumps(sorted(f"{lb.programme}/{lb.status}" for lb in set(labels)))


def labels_of(text: str) -> tuple[Label, ...]:
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
    nids: list[str]
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


def toggle(fp: bytes, tags: Iterable[bytes]) -> bytes:
    """Add or remove tags from a set fingerprint (XOR is its own inverse)."""
    return (int.from_bytes(fp, "big") ^ int.from_bytes(fingerprint(tags), "big")).to_bytes(
        FP_BYTES, "big"
    )


def pair_key(db: sqlite3.Connection, peer: str, epoch: int, now: str) -> BlindingKey:
    """The node's fixed scalar for this (peer, epoch), created on first use."""
    row = db.execute(
        "SELECT scalar FROM pair_keys WHERE peer=? AND epoch=?", (peer, epoch)
    ).fetchone()
    if row:
        return BlindingKey(bytes(row[0]))
    key = BlindingKey.generate()
    db.execute(
        "INSERT OR IGNORE INTO pair_keys VALUES (?,?,?,?)",
        (peer, epoch, key.unsafe_raw(), now),
    )
    row = db.execute(
        "SELECT scalar FROM pair_keys WHERE peer=? AND epoch=?", (peer, epoch)
    ).fetchone()
    return BlindingKey(bytes(row[0]))


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


def apply_delta(cur: sqlite3.Cursor, peer: str, epoch: int, d: PairDelta) -> None:
    if d.reset:
        cur.execute("DELETE FROM own_tags WHERE peer=? AND epoch=?", (peer, epoch))
        cur.execute("DELETE FROM peer_tags WHERE peer=? AND epoch=?", (peer, epoch))
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
    # Changes every pair has seen are no longer needed.
    cur.execute(
        "DELETE FROM registry_changes WHERE version <= (SELECT MIN(version) FROM pair_sync)"
    )
