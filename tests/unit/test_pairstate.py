"""Pair state writes: the bulk path (packed blobs cut into rows by SQLite) and the
row-by-row path give the same table contents, replacing and deleting as asked."""

from __future__ import annotations

import os
import sqlite3

from ispf_server import pairstate
from ispf_server.pairstate import EMPTY_FP, OwnGroup, OwnTag, PairDelta, PeerGroup


def db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(pairstate.SCHEMA)
    return conn


def delta(**kw: object) -> PairDelta:
    base: dict[str, object] = {
        "reset": False,
        "own_added": [],
        "own_removed": [],
        "peer_added": [],
        "peer_removed": [],
        "version": 1,
        "own_fp": EMPTY_FP,
        "peer_fp": EMPTY_FP,
        "policy": "p",
    }
    base.update(kw)
    return PairDelta(**base)  # type: ignore[arg-type]


def own_groups(own: dict[str, OwnTag]) -> list[OwnGroup]:
    by: dict[str, OwnGroup] = {}
    for nid, o in own.items():
        by.setdefault(o.labels, OwnGroup(o.labels, [], [])).nids.append(nid)
        by[o.labels].tags.append(o.tag)
    return list(by.values())


def peer_groups(peer: dict[bytes, str]) -> list[PeerGroup]:
    by: dict[str, PeerGroup] = {}
    for tag, labels in peer.items():
        by.setdefault(labels, PeerGroup(labels, [])).tags.append(tag)
    return list(by.values())


def rows(conn: sqlite3.Connection) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    own = conn.execute("SELECT peer, epoch, nid, labels, tag FROM own_tags ORDER BY nid").fetchall()
    peer = conn.execute("SELECT peer, epoch, tag, labels FROM peer_tags ORDER BY tag").fetchall()
    return own, peer


def test_bulk_rows_equal_plain_inserts_for_every_shape_of_key() -> None:
    own = {f"35202{i:08d}": OwnTag(f'["P/s{i % 3}"]', os.urandom(16)) for i in range(500)}
    own["12345"] = OwnTag('["P/odd"]', os.urandom(16))  # not 13 digits: the row path
    peer = {os.urandom(16): f'["Q/e{i % 2}"]' for i in range(400)}
    peer[b"short"] = '["Q/odd"]'
    conn = db()
    d = delta(own_added=own_groups(own), peer_added=[*peer_groups(peer), PeerGroup("[]", [])])
    pairstate.apply_delta(conn.cursor(), "sindh", 3, d)
    got_own, got_peer = rows(conn)
    assert got_own == sorted(
        (("sindh", 3, n, o.labels, o.tag) for n, o in own.items()), key=lambda r: r[2]
    )
    assert got_peer == sorted((("sindh", 3, t, lb) for t, lb in peer.items()), key=lambda r: r[2])
    assert all(isinstance(r[2], str) for r in got_own)  # IDs stay text, as the lookups expect


def test_incremental_delta_replaces_and_removes() -> None:
    conn = db()
    t1, t2, t3 = os.urandom(16), os.urandom(16), os.urandom(16)
    first = delta(
        own_added=[OwnGroup('["P/a"]', ["3520200000001", "3520200000002"], [t1, t2])],
        peer_added=[PeerGroup('["Q/b"]', [t3])],
    )
    pairstate.apply_delta(conn.cursor(), "sindh", 1, first)
    t4 = os.urandom(16)
    second = delta(
        own_added=[OwnGroup('["P/c"]', ["3520200000002"], [t4])],
        own_removed=["3520200000001"],
        peer_removed=[t3],
        peer_added=[PeerGroup('["Q/d"]', [t1])],
        version=2,
    )
    pairstate.apply_delta(conn.cursor(), "sindh", 1, second)
    own, peer = rows(conn)
    assert own == [("sindh", 1, "3520200000002", '["P/c"]', t4)]
    assert peer == [("sindh", 1, t1, '["Q/d"]')]
    assert conn.execute("SELECT version FROM pair_sync").fetchone() == (2,)


def test_reset_clears_only_this_pair() -> None:
    conn = db()
    other = delta(own_added=[OwnGroup('["P/a"]', ["3520200000009"], [os.urandom(16)])])
    pairstate.apply_delta(conn.cursor(), "punjab", 1, other)
    pairstate.apply_delta(conn.cursor(), "sindh", 1, other)
    pairstate.apply_delta(conn.cursor(), "sindh", 1, delta(reset=True))
    own, _ = rows(conn)
    assert [r[0] for r in own] == ["punjab"]
