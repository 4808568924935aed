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


@dataclass
class PairDelta:
    """Changes to one pair's state, applied in one transaction when a session commits."""

    reset: bool
    own_added: dict[str, OwnTag]  # nid -> (labels, tag)
    own_removed: list[str]  # nids
    peer_added: dict[bytes, str]  # tag -> labels
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


def apply_delta(cur: sqlite3.Cursor, peer: str, epoch: int, d: PairDelta) -> None:
    if d.reset:
        cur.execute("DELETE FROM own_tags WHERE peer=? AND epoch=?", (peer, epoch))
        cur.execute("DELETE FROM peer_tags WHERE peer=? AND epoch=?", (peer, epoch))
    cur.executemany(
        "DELETE FROM own_tags WHERE peer=? AND epoch=? AND nid=?",
        ((peer, epoch, n) for n in d.own_removed),
    )
    cur.executemany(
        "INSERT OR REPLACE INTO own_tags VALUES (?,?,?,?,?)",
        ((peer, epoch, n, o.labels, o.tag) for n, o in d.own_added.items()),
    )
    cur.executemany(
        "DELETE FROM peer_tags WHERE peer=? AND epoch=? AND tag=?",
        ((peer, epoch, t) for t in d.peer_removed),
    )
    cur.executemany(
        "INSERT OR REPLACE INTO peer_tags VALUES (?,?,?,?)",
        ((peer, epoch, t, lb) for t, lb in d.peer_added.items()),
    )
    cur.execute(
        "INSERT OR REPLACE INTO pair_sync VALUES (?,?,?,?,?,?)",
        (peer, epoch, d.version, d.own_fp, d.peer_fp, d.policy),
    )
    # Changes every pair has seen are no longer needed.
    cur.execute(
        "DELETE FROM registry_changes WHERE version <= (SELECT MIN(version) FROM pair_sync)"
    )
