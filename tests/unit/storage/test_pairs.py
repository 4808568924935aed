"""Pair state writes: the bulk path (packed blobs cut into rows by SQLite) and the
row-by-row path give the same table contents, replacing and deleting as asked."""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ispf.errors import StagingLost
from ispf_server.storage.pairs import deltas, lookups, schema, state
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.state import OwnGroup, OwnTag, PairDelta, PeerGroup
from tests.unit.storage import packing
from tests.unit.storage.pairmodel import (
    LABELS,
    Model,
    check_against,
    delta,
    own_groups,
    peer_groups,
    random_step,
)

# The store backends these tests run on (the `store_backend` fixture, tests/conftest.py).
STORE_BACKENDS = ("sqlite", "postgresql")
Conn = Any  # a sqlite3 connection, or the PostgreSQL backend's (both take `?` statements)


@pytest.fixture
def db(store_backend: str, request: pytest.FixtureRequest) -> Iterator[Callable[[], Conn]]:
    """Makes an empty pair schema in memory (SQLite) or in a fresh database of the
    suite's PostgreSQL server, and gives a connection to it in autocommit mode."""
    made: list[Any] = []

    def make() -> Conn:
        if store_backend == "sqlite":
            conn = sqlite3.connect(":memory:", isolation_level=None)
            conn.executescript(schema.SCHEMA)
            keyed(conn)
            return conn
        import psycopg

        from ispf_server.storage.postgres import PgConnection, ddl

        url = request.getfixturevalue("pg_url")
        raw = psycopg.connect(url, autocommit=True)
        made.append(raw)
        raw.execute(ddl(schema.SCHEMA))
        conn = PgConnection(raw)
        keyed(conn)
        return conn

    yield make
    for raw in made:
        raw.close()


def keyed(conn: Conn) -> None:
    """The pairs these tests write state for have keys (state is written only so)."""
    for peer, epoch in (("sindh", 1), ("sindh", 3), ("punjab", 1)):
        conn.execute("INSERT INTO pair_keys VALUES (?, ?, 0, '2026-01-01')", (peer, epoch))


def rows(conn: Conn) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    own = conn.execute("SELECT peer, epoch, nid, labels, tag FROM own_tags ORDER BY nid").fetchall()
    peer = conn.execute("SELECT peer, epoch, tag, labels FROM peer_tags ORDER BY tag").fetchall()
    return own, peer


def test_bulk_rows_equal_plain_inserts_for_every_shape_of_key(db: Callable[[], Conn]) -> None:
    own = {f"35202{i:08d}": OwnTag(f'["P/s{i % 3}"]', os.urandom(16)) for i in range(500)}
    own["12345"] = OwnTag('["P/odd"]', os.urandom(16))  # not 13 digits: the row path
    peer = {os.urandom(16): f'["Q/e{i % 2}"]' for i in range(400)}
    peer[b"short"] = '["Q/odd"]'
    conn = db()
    d = delta(own_added=own_groups(own), peer_added=[*peer_groups(peer), PeerGroup("[]", [])])
    deltas.apply_delta(conn.cursor(), "sindh", 3, d)
    got_own, got_peer = rows(conn)
    assert got_own == sorted(
        (("sindh", 3, n, o.labels, o.tag) for n, o in own.items()), key=lambda r: r[2]
    )
    assert got_peer == sorted((("sindh", 3, t, lb) for t, lb in peer.items()), key=lambda r: r[2])
    assert all(isinstance(r[2], str) for r in got_own)  # IDs stay text, as the lookups expect


def test_incremental_delta_replaces_and_removes(db: Callable[[], Conn]) -> None:
    conn = db()
    t1, t2, t3 = os.urandom(16), os.urandom(16), os.urandom(16)
    first = delta(
        own_added=[OwnGroup('["P/a"]', ["3520200000001", "3520200000002"], [t1, t2])],
        peer_added=[PeerGroup('["Q/b"]', [t3])],
    )
    deltas.apply_delta(conn.cursor(), "sindh", 1, first)
    t4 = os.urandom(16)
    second = delta(
        own_added=[OwnGroup('["P/c"]', ["3520200000002"], [t4])],
        own_removed=["3520200000001"],
        peer_removed=[t3],
        peer_added=[PeerGroup('["Q/d"]', [t1])],
        version=2,
    )
    deltas.apply_delta(conn.cursor(), "sindh", 1, second)
    own, peer = rows(conn)
    assert own == [("sindh", 1, "3520200000002", '["P/c"]', t4)]
    assert peer == [("sindh", 1, t1, '["Q/d"]')]
    assert conn.execute("SELECT version FROM pair_sync").fetchone() == (2,)


def test_fingerprints_packed_and_not_agree() -> None:
    tags = [os.urandom(16) for _ in range(100)]
    assert state.fingerprint_packed(b"".join(tags)) == state.fingerprint(tags)
    assert state.fingerprint_packed(b"") == state.EMPTY_FP


def test_packing_refuses_ids_that_are_not_13_digits() -> None:
    tag = os.urandom(16)
    assert packing.pack_runs([OwnGroup("[]", ["12345"], [tag])], [], {}) is None
    assert packing.pack_runs([OwnGroup("[]", ["35202123456x1"], [tag])], [], {}) is None
    assert packing.pack_runs([], [PeerGroup("[]", [b"short"])], {}) is None
    packed = packing.pack_runs([OwnGroup("[]", ["3520212345671"], [tag])], [], {})
    assert packed is not None and packed[1]["own_nid"] == b"3520212345671" + tag + bytes(4)


def test_reset_clears_only_this_pair(db: Callable[[], Conn]) -> None:
    conn = db()
    other = delta(own_added=[OwnGroup('["P/a"]', ["3520200000009"], [os.urandom(16)])])
    deltas.apply_delta(conn.cursor(), "punjab", 1, other)
    deltas.apply_delta(conn.cursor(), "sindh", 1, other)
    deltas.apply_delta(conn.cursor(), "sindh", 1, delta(reset=True))
    own, _ = rows(conn)
    assert [r[0] for r in own] == ["punjab"]


@pytest.mark.parametrize("seed", range(6))
def test_runs_plus_rows_answer_like_the_model_after_random_deltas(
    seed: int, db: Callable[[], Conn]
) -> None:
    """A full run writes sorted runs; incremental deltas go on top as rows and
    tombstones. Every lookup must equal a plain model of the state, throughout."""
    rng = random.Random(seed)
    labels = LABELS
    nids = [f"35202{i:08d}" for i in range(3000)]
    tag_of = {n: rng.randbytes(16) for n in nids}  # fixed keys: an ID's tag never changes
    conn = db()
    model = Model()
    # The full run: a random half of the IDs, a peer holding some of the same tags.
    for n in rng.sample(nids, 1500):
        model.own[n] = OwnTag(rng.choice(labels), tag_of[n])
    for n in rng.sample(nids, 1200):
        model.peer[tag_of[n]] = rng.choice(labels)
    model.peer.update({rng.randbytes(16): labels[0] for _ in range(300)})
    own, peer = own_groups(model.own), peer_groups(model.peer)
    full = delta(
        reset=True,
        own_added=own,
        peer_added=peer,
        staged=packing.staged(conn, "sindh", 1, own, peer, model.matches()),
    )
    deltas.apply_delta(conn.cursor(), "sindh", 1, full)
    assert conn.execute("SELECT count(*) FROM own_tags").fetchone() == (0,)  # all in runs
    check_against(conn, model, rng.sample(nids, 400))
    for _ in range(5):  # incremental runs: add, relabel, remove on both sides
        deltas.apply_delta(conn.cursor(), "sindh", 1, random_step(rng, model, nids, tag_of))
        check_against(conn, model, rng.sample(nids, 400))
    # A later full run replaces everything, runs and rows and tombstones alike.
    model = Model()
    model.own = {nids[0]: OwnTag(labels[1], tag_of[nids[0]])}
    model.peer = {tag_of[nids[0]]: labels[2]}
    own, peer = own_groups(model.own), peer_groups(model.peer)
    again = delta(
        reset=True,
        own_added=own,
        peer_added=peer,
        staged=packing.staged(conn, "sindh", 1, own, peer, model.matches()),
    )
    deltas.apply_delta(conn.cursor(), "sindh", 1, again)
    check_against(conn, model, nids[:50])
    for table in ("own_tags", "peer_tags", "own_gone", "peer_gone"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_a_staged_generation_is_invisible_until_its_commit(db: Callable[[], Conn]) -> None:
    conn = db()
    t_old, t_new = os.urandom(16), os.urandom(16)

    def full(tag: bytes) -> PairDelta:
        own = [OwnGroup('["P/a"]', ["3520200000001"], [tag])]
        return delta(
            reset=True, own_added=own, staged=packing.staged(conn, "sindh", 1, own, [], {})
        )

    deltas.apply_delta(conn.cursor(), "sindh", 1, full(t_old))
    full(t_new)  # staged by a session that then failed
    cur = conn.cursor()
    # Written, not current: lookups still see the old state.
    assert lookups.own_by_nids(conn, "sindh", 1, ["3520200000001"])["3520200000001"].tag == t_old
    # A session that failed left it behind: the next staging drops it.
    again = full(t_new)
    assert again.staged is not None
    gen = again.staged.gen
    gens = {r[0] for r in conn.execute("SELECT DISTINCT gen FROM pair_runs")}
    assert gens == {pairruns.current(conn, "sindh", 1), gen}
    deltas.apply_delta(cur, "sindh", 1, again)  # the commit flips to it
    assert lookups.own_by_nids(conn, "sindh", 1, ["3520200000001"])["3520200000001"].tag == t_new
    assert {r[0] for r in conn.execute("SELECT DISTINCT gen FROM pair_runs")} == {gen}


def test_a_staged_generation_missing_a_part_is_never_made_current(db: Callable[[], Conn]) -> None:
    """Should anything drop or add parts of a staging before its commit (another
    writer of the pair), the commit refuses it and the pair keeps its state."""
    conn = db()
    rng = random.Random(5)
    nids = [f"35202{i:08d}" for i in range(2000)]
    old = {n: OwnTag('["P/a"]', rng.randbytes(16)) for n in nids[:1000]}
    new = {n: OwnTag('["P/b"]', rng.randbytes(16)) for n in nids}

    def full(own: dict[str, OwnTag]) -> PairDelta:
        groups = own_groups(own)
        return delta(
            reset=True, own_added=groups, staged=packing.staged(conn, "sindh", 1, groups, [], {})
        )

    deltas.apply_delta(conn.cursor(), "sindh", 1, full(old))
    for damage in (
        "DELETE FROM pair_runs WHERE gen=? AND kind='own_tag' AND part=1",
        "INSERT INTO pair_runs SELECT peer, epoch, gen, kind, 99, last, data FROM pair_runs "
        "WHERE gen=? AND kind='own_nid' AND part=0",
    ):
        again = full(new)
        assert again.staged is not None
        conn.execute(damage, (again.staged.gen,))
        with pytest.raises(StagingLost):
            deltas.apply_delta(conn.cursor(), "sindh", 1, again)
        got = lookups.own_by_nids(conn, "sindh", 1, nids[:3])
        assert {n: o.tag for n, o in got.items()} == {n: old[n].tag for n in nids[:3]}
    again = full(new)
    deltas.apply_delta(conn.cursor(), "sindh", 1, again)
    assert lookups.own_by_nids(conn, "sindh", 1, nids[1999:])[nids[1999]].tag == new[nids[1999]].tag


def test_a_generation_number_is_never_given_out_twice(db: Callable[[], Conn]) -> None:
    """A staging dropped under its writer (by another writer of the pair) and staged
    again with the same parts: the first writer's commit finds its own parts gone,
    not the other's under its number, and refuses; so does the second's once a
    third writer dropped it. Numbers go on past every one given out."""
    conn = db()
    rng = random.Random(6)
    own = {f"35202{i:08d}": OwnTag('["P/a"]', rng.randbytes(16)) for i in range(600)}
    groups = own_groups(own)

    def staged() -> PairDelta:
        return delta(
            reset=True, own_added=groups, staged=packing.staged(conn, "sindh", 1, groups, [], {})
        )

    first = staged()
    second = staged()  # (drops the first's staging, as its next staging does)
    assert first.staged is not None and second.staged is not None
    assert first.staged.parts == second.staged.parts  # the same parts, another number
    assert second.staged.gen > first.staged.gen
    with pytest.raises(StagingLost):
        deltas.apply_delta(conn.cursor(), "sindh", 1, first)
    third = staged()
    assert third.staged is not None and third.staged.gen > second.staged.gen
    with pytest.raises(StagingLost):
        deltas.apply_delta(conn.cursor(), "sindh", 1, second)
    deltas.apply_delta(conn.cursor(), "sindh", 1, third)
    assert pairruns.current(conn, "sindh", 1) == third.staged.gen
    assert staged().staged.gen > third.staged.gen  # type: ignore[union-attr]
    conn.execute("DELETE FROM pair_gen_last")  # (a store from before numbers were kept)
    assert staged().staged.gen > third.staged.gen + 1  # type: ignore[union-attr]


def test_a_lookup_of_many_keys_finds_what_one_key_at_a_time_finds(
    db: Callable[[], Conn],
) -> None:
    """Many keys are looked up from the parts' last keys read at once and the parts
    fetched in batches (`runs.MANY_KEYS`); a few, one query per part. Both find the
    same records: keys present, absent, before the first and after the last, and
    keys at a part's end."""
    rng = random.Random(5)
    conn = db()
    nids = sorted(f"35202{rng.randrange(10**8):08d}" for _ in range(2000))
    own = {n: OwnTag('["P/a"]', rng.randbytes(16)) for n in nids}
    peer = {rng.randbytes(16): '["Q/b"]' for _ in range(1500)}
    groups_own, groups_peer = own_groups(own), peer_groups(peer)
    full = delta(
        reset=True,
        own_added=groups_own,
        peer_added=groups_peer,
        staged=packing.staged(conn, "sindh", 1, groups_own, groups_peer, {}),
    )
    deltas.apply_delta(conn.cursor(), "sindh", 1, full)
    at_ends = nids[pairruns.PART_RECORDS - 1 :: pairruns.PART_RECORDS]
    probes = {
        pairruns.OWN_NID: [
            n.encode() for n in [*rng.sample(nids, 400), *at_ends, "0" * 13, "9" * 13]
        ]
        + [f"35202{rng.randrange(10**8):08d}".encode() for _ in range(200)],
        pairruns.PEER_TAG: [*rng.sample(sorted(peer), 400), bytes(16), b"\xff" * 16]
        + [rng.randbytes(16) for _ in range(200)],
        pairruns.OWN_TAG: [*[o.tag for o in own.values()][:500], rng.randbytes(16)],
    }
    for kind, keys in probes.items():
        assert len(set(keys)) >= pairruns.MANY_KEYS
        many = pairruns.lookup(conn, "sindh", 1, kind, keys)
        one_by_one: dict[bytes, bytes] = {}
        for key in keys:
            one_by_one.update(pairruns.lookup(conn, "sindh", 1, kind, [key]))
        assert many == one_by_one and many
    found = pairruns.lookup(conn, "sindh", 1, pairruns.OWN_NID, probes[pairruns.OWN_NID])
    assert set(found) == {k for k in probes[pairruns.OWN_NID] if k.decode() in own}
