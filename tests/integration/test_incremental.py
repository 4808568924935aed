"""Incremental reconciliation gives exactly what a full run gives, over random changes."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

import pytest

from ispf.v1 import internal_pb2
from ispf_server.pool import BlindingPool
from ispf_server.storage.pairs import compaction
from tests.conftest import Federation, RawStore

COMPLETED = internal_pb2.SESSION_STATE_COMPLETED
PROGS = ["BISP", "PSER", "SEHAT"]
STATS = ["enrolled", "eligible", "suspended", "exited"]
Registry = dict[str, tuple[str, str, str]]  # record_id -> (nid, programme, status)

# The store backends these tests run on (the `store_backend` fixture, tests/conftest.py).
STORE_BACKENDS = ("sqlite", "postgresql")


def reference(own: Registry, peer: Registry) -> set[tuple[str, str, str]]:
    labels: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for nid, p, s in peer.values():
        labels[nid].add((p, s))
    return {(rid, p, s) for rid, (nid, _, _) in own.items() for p, s in labels.get(nid, ())}


def got(fed: Federation, province: str, sid: str) -> set[tuple[str, str, str]]:
    return {
        (m.record_id, m.peer_programme, m.peer_status) for m in fed.client(province).matches(sid)
    }


def mutate(
    rng: random.Random, fed: Federation, province: str, reg: Registry, pool: list[str], tag: str
) -> int:
    """Insert, relabel, re-ID and delete a few records; return how many changed."""
    ops = 0
    upserts: dict[str, tuple[str, str, str]] = {}
    for i in range(rng.randint(1, 6)):  # inserts, some IDs shared with the other side
        upserts[f"{tag}-{len(reg) + i}-{rng.randrange(10**6)}"] = (
            rng.choice(pool),
            rng.choice(PROGS),
            rng.choice(STATS),
        )
    for rid in rng.sample(sorted(reg), min(len(reg), rng.randint(0, 4))):  # relabel
        nid, _, _ = reg[rid]
        upserts[rid] = (nid, rng.choice(PROGS), rng.choice(STATS))
    for rid in rng.sample(sorted(reg), min(len(reg), rng.randint(0, 2))):  # another ID
        upserts[rid] = (rng.choice(pool), *reg[rid][1:])
    fed.load(province, [(rid, n, p, s) for rid, (n, p, s) in upserts.items()])
    reg.update(upserts)
    ops += len(upserts)
    gone = rng.sample(sorted(reg), min(len(reg), rng.randint(0, 3)))
    if gone:
        assert fed.client(province).delete(gone).deleted == len(gone)
        for rid in gone:
            del reg[rid]
        ops += len(gone)
    return ops


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_incremental_equals_full_over_random_changes(federation: Federation, seed: int) -> None:
    rng = random.Random(seed)
    pool = [f"3520{rng.randrange(10**9):09d}" for _ in range(60)]
    regs: dict[str, Registry] = {"punjab": {}, "sindh": {}}
    for p in regs:
        mutate(rng, federation, p, regs[p], pool, p[:1])
    first = federation.reconcile("punjab", "sindh")
    assert first.state == COMPLETED and first.sync == "full"
    for step in range(6):
        for p in regs:
            mutate(rng, federation, p, regs[p], pool, f"{p[:1]}{step}")
        a, b = ("punjab", "sindh") if step % 2 == 0 else ("sindh", "punjab")
        inc = federation.reconcile(a, b)
        assert inc.state == COMPLETED, inc.error
        assert inc.sync == "incremental"
        # Only what changed was blinded and sent.
        assert inc.own_values < len({n for n, _, _ in regs[a].values()}) or len(regs[a]) < 8
        for side, other in (("punjab", "sindh"), ("sindh", "punjab")):
            assert got(federation, side, inc.session_id) == reference(regs[side], regs[other])
        if step % 3 == 2:
            full = federation.reconcile(a, b, full=True)
            assert full.sync == "full" and full.match_count == inc.match_count
            assert full.result_digest == inc.result_digest  # same keys, same state
            for side in regs:
                assert got(federation, side, full.session_id) == got(
                    federation, side, inc.session_id
                )


def test_incremental_runs_over_compacted_state_equal_full_runs(federation: Federation) -> None:
    """Both nodes compact the pair's state after every incremental run (the threshold
    set to nothing): runs then keep answering on the compacted runs, the overlay is
    empty after each compaction, and every result equals the full one. A small pool
    of IDs, so that matches are made, moved and lost at every step."""
    rng = random.Random(21)
    pool = [f"3520{rng.randrange(10**9):09d}" for _ in range(16)]
    regs: dict[str, Registry] = {"punjab": {}, "sindh": {}}
    for p in regs:
        federation.nodes[p].store.compactor.share = 0.0
        federation.nodes[p].store.compactor.minimum = 1
        federation.nodes[p].store.compactor.quiet = 0.0
        for i in range(3):
            mutate(rng, federation, p, regs[p], pool, f"{p[:1]}-{i}")
    assert federation.reconcile("punjab", "sindh").sync == "full"
    seen: list[int] = []
    gens: dict[str, int] = {}
    for step in range(5):
        for p in regs:
            mutate(rng, federation, p, regs[p], pool, f"{p[:1]}{step}")
        a, b = ("punjab", "sindh") if step % 2 == 0 else ("sindh", "punjab")
        inc = federation.reconcile(a, b)
        assert (inc.state, inc.sync) == (COMPLETED, "incremental"), inc.error
        for p in regs:
            store = federation.nodes[p].store
            store.compactor.wait(60)
            gen = store.db.fetchone("SELECT gen FROM pair_gen")
            assert gen is not None and gen[0] > gens.get(p, 0)  # compacted: new runs
            gens[p] = gen[0]
            for table in compaction.OVERLAY:
                assert store.db.fetchone(f"SELECT count(*) FROM {table}") == (0,)
        for side, other in (("punjab", "sindh"), ("sindh", "punjab")):
            assert got(federation, side, inc.session_id) == reference(regs[side], regs[other])
        seen.append(len(reference(regs["punjab"], regs["sindh"])))
    assert min(seen) >= 5, seen  # (the steps had matches to keep, move and lose)
    assert full_equals(federation, "punjab", "sindh", inc)


def test_an_unchanged_registry_sends_nothing(federation: Federation) -> None:
    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.load("kp", [("K1", "3520212345671", "SEHAT", "eligible")])
    assert federation.reconcile("punjab", "kp").sync == "full"
    again = federation.reconcile("kp", "punjab")
    assert (again.sync, again.own_values, again.peer_values, again.match_count) == (
        "incremental",
        0,
        0,
        1,
    )


def test_lost_state_on_one_side_falls_back_to_a_full_run(federation: Federation) -> None:
    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    assert federation.reconcile("punjab", "sindh").sync == "full"
    # Sindh restored an old backup: its state for punjab is gone.
    db = RawStore(federation.nodes["sindh"])
    db.execute("DELETE FROM own_tags")
    db.execute("DELETE FROM pair_sync")
    db.close()
    st = federation.reconcile("punjab", "sindh")
    assert st.state == COMPLETED and st.sync == "full" and st.match_count == 1
    assert federation.reconcile("punjab", "sindh").sync == "incremental"


def test_pair_state_from_before_schema_3_gives_whole_rows_then_carries(
    federation: Federation,
) -> None:
    """A pair synced by a node before schema 3 has no session named as its result
    (`pair_sync.session_id` empty): its next incremental run names every matched ID's
    rows, then names that session, and the run after it carries from it; both equal
    a full run."""
    punjab: Registry = {f"P{i}": (f"35202{i:08d}", "BISP", "enrolled") for i in range(8)}
    sindh: Registry = {f"S{i}": (f"35202{i:08d}", "SEHAT", "eligible") for i in range(6)}
    federation.load("punjab", [(r, *v) for r, v in punjab.items()])
    federation.load("sindh", [(r, *v) for r, v in sindh.items()])
    assert federation.reconcile("punjab", "sindh").sync == "full"
    for p in ("punjab", "sindh"):  # (as a schema-2 node left it)
        db = RawStore(federation.nodes[p])
        db.execute("UPDATE pair_sync SET session_id=''")
        db.close()
    punjab["P1"] = (punjab["P1"][0], "PSER", "suspended")
    federation.load("punjab", [("P1", *punjab["P1"])])
    first = federation.reconcile("punjab", "sindh")
    assert first.sync == "incremental" and first.state == COMPLETED
    assert got(federation, "punjab", first.session_id) == reference(punjab, sindh)
    assert got(federation, "sindh", first.session_id) == reference(sindh, punjab)
    for p in ("punjab", "sindh"):  # (that run's rows are the pair's result now)
        db = RawStore(federation.nodes[p])
        assert [str(r[0]) for r in db.execute("SELECT session_id FROM pair_sync")] == [
            first.session_id
        ]
        db.close()
    sindh["S2"] = (sindh["S2"][0], "SEHAT", "exited")
    federation.load("sindh", [("S2", *sindh["S2"])])
    second = federation.reconcile("punjab", "sindh")
    assert second.sync == "incremental"
    assert got(federation, "punjab", second.session_id) == reference(punjab, sindh)
    assert got(federation, "sindh", second.session_id) == reference(sindh, punjab)
    assert full_equals(federation, "punjab", "sindh", second)


def test_a_policy_change_forces_a_full_run_with_the_new_disclosure(
    federation: Federation,
) -> None:
    federation.load(
        "punjab",
        [("A1", "3520212345671", "BISP", "enrolled"), ("A2", "3520212345672", "PSER", "eligible")],
    )
    federation.load(
        "sindh",
        [("S1", "3520212345671", "SSPA", "eligible"), ("S2", "3520212345672", "SSPA", "enrolled")],
    )
    assert federation.reconcile("punjab", "sindh").match_count == 2
    path = federation.nodes["punjab"].config.policy_file
    text = path.read_text()
    head, rest = text.split("[peers.sindh]")
    path.write_text(
        head.replace("version = 1", "version = 2")
        + "[peers.sindh]"
        + rest.replace('disclose = ["*"]', 'disclose = ["BISP/*"]', 1)
    )
    st = federation.reconcile("punjab", "sindh")
    assert st.sync == "full" and st.match_count == 1
    assert got(federation, "sindh", st.session_id) == {("S1", "BISP", "enrolled")}
    assert federation.reconcile("sindh", "punjab").sync == "incremental"


def test_a_plan_started_early_is_used_only_while_still_valid(federation: Federation) -> None:
    """A responder plans its side when the peer asks for the sync state; the
    Handshake takes that plan only if the registry, policy and pair state are as
    they were, and plans afresh otherwise."""
    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    responder = federation.nodes["sindh"].responder
    pp = federation.nodes["sindh"].policy.current().for_peer("punjab")

    def speculate(incremental: bool) -> None:
        responder._speculate("punjab", 1, pp, incremental=incremental)
        responder._speculative[("punjab", 1)].future.result(timeout=10)

    speculate(False)
    side = responder._speculated("punjab", 1, pp, incremental=False)
    assert side is not None and list(side.plan.order) == [b"3520212345671"]
    assert responder._speculated("punjab", 1, pp, incremental=False) is None  # used once
    speculate(True)  # planned for an incremental run, asked for a full one
    assert responder._speculated("punjab", 1, pp, incremental=False) is None
    speculate(False)
    federation.load("sindh", [("S2", "3520212345672", "SSPA", "eligible")])  # registry moved
    assert responder._speculated("punjab", 1, pp, incremental=False) is None
    # End to end, the run sees the record added after the state was asked for.
    federation.load("punjab", [("A2", "3520212345672", "BISP", "enrolled")])
    st = federation.reconcile("punjab", "sindh")
    assert st.state == COMPLETED and st.match_count == 2
    speculate(True)
    federation.reconcile("kp", "sindh")  # another pair's session leaves this one's plan valid
    assert responder._speculated("punjab", 1, pp, incremental=True) is not None


def test_a_plan_made_before_a_relabel_only_session_of_the_pair_carries_no_stale_rows(
    federation: Federation,
) -> None:
    """Sindh plans its side early for Punjab; before Punjab's run takes that plan, a
    session Sindh starts learns that Punjab relabelled a match. Nothing Sindh holds
    moved (its registry, the pair's version and fingerprints are as they were), but
    that session's rows are now the pair's result: the early plan is not used, and
    Punjab's run lists Punjab's new labels, not those of the result before."""
    punjab: Registry = {f"P{i}": (f"35202{i:08d}", "BISP", "enrolled") for i in range(5)}
    sindh: Registry = {f"S{i}": (f"35202{i:08d}", "SEHAT", "eligible") for i in range(5)}
    federation.load("punjab", [(r, *v) for r, v in punjab.items()])
    federation.load("sindh", [(r, *v) for r, v in sindh.items()])
    assert federation.reconcile("punjab", "sindh").sync == "full"
    responder = federation.nodes["sindh"].responder
    pp = federation.nodes["sindh"].policy.current().for_peer("punjab")
    responder._speculate("punjab", 1, pp, incremental=True)
    responder._speculative[("punjab", 1)].future.result(timeout=10)
    punjab["P2"] = (punjab["P2"][0], "PSER", "suspended")
    federation.load("punjab", [("P2", *punjab["P2"])])
    z = federation.reconcile("sindh", "punjab")  # (Sindh's own run learns the relabel)
    assert z.sync == "incremental" and got(federation, "sindh", z.session_id) == reference(
        sindh, punjab
    )
    st = federation.reconcile("punjab", "sindh")
    assert st.sync == "incremental" and st.state == COMPLETED
    assert got(federation, "sindh", st.session_id) == reference(sindh, punjab)
    assert got(federation, "punjab", st.session_id) == reference(punjab, sindh)
    assert full_equals(federation, "punjab", "sindh", st)


def test_a_carry_from_a_result_the_pair_no_longer_has_is_refused(federation: Federation) -> None:
    """The carry itself checks, in its transaction, that the rows it copies are the
    pair's result now; if not, it writes nothing and the session fails (retriable: a
    new one plans from the pair's state as it is), rather than commit another state's
    rows."""
    from ispf.errors import RetryLater

    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    first = federation.reconcile("punjab", "sindh")
    federation.load("punjab", [("A1", "3520212345671", "BISP", "exited")])
    second = federation.reconcile("punjab", "sindh")
    assert second.sync == "incremental"
    store = federation.nodes["punjab"].store
    sid = "carry-check"
    store.sessions.begin(sid, "sindh", "initiator", 0, "test", 1)
    assert store.sessions.carry_matches(sid, second.session_id, []) == 1
    with pytest.raises(RetryLater):
        store.sessions.carry_matches(sid, first.session_id, [])  # (a result replaced)


def test_an_incremental_run_names_again_only_the_ids_that_changed(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result rows of matches neither side touched are carried over from the run
    before (in the store); only changed IDs' records are read back and named, and the
    result is still exactly the full one: a second record of a matched ID under the
    same labels (its label set unchanged, so no tag moves), a record deleted from a
    matched ID, the peer relabelling and removing, and a new match."""
    from ispf_server.session import plan
    from ispf_server.session.match import kept

    nids = [f"35202{i:08d}" for i in range(20)]
    punjab: Registry = {f"P{i}": (n, "BISP", "enrolled") for i, n in enumerate(nids)}
    punjab["P0b"] = (nids[0], "PSER", "eligible")  # two records of one matched ID
    sindh: Registry = {f"S{i}": (n, "SEHAT", "eligible") for i, n in enumerate(nids[:15])}
    federation.load("punjab", [(r, *v) for r, v in punjab.items()])
    federation.load("sindh", [(r, *v) for r, v in sindh.items()])
    assert federation.reconcile("punjab", "sindh").sync == "full"

    asked: list[set[bytes]] = []
    real = plan.owners_of

    def spy(store, pp, wanted):  # type: ignore[no-untyped-def]
        wanted = list(wanted)
        asked.append(set(wanted))
        return real(store, pp, wanted)

    monkeypatch.setattr(kept, "owners_of", spy)
    changes = {
        "P1x": (nids[1], "BISP", "enrolled"),  # a second record, same labels as P1's
        "P16": (nids[16], "BISP", "enrolled"),  # unchanged: not matched yet
    }
    federation.load("punjab", [(r, *v) for r, v in changes.items()])
    punjab.update(changes)
    assert federation.client("punjab").delete(["P0b"]).deleted == 1  # P0 stays matched
    del punjab["P0b"]
    federation.load(
        "sindh", [("S2", nids[2], "SEHAT", "exited"), ("S16", nids[16], "SEHAT", "eligible")]
    )
    sindh.update({"S2": (nids[2], "SEHAT", "exited"), "S16": (nids[16], "SEHAT", "eligible")})
    assert federation.client("sindh").delete(["S3"]).deleted == 1
    del sindh["S3"]

    for a, b in (("punjab", "sindh"), ("sindh", "punjab")):
        asked.clear()
        inc = federation.reconcile(a, b)
        assert (inc.state, inc.sync) == (COMPLETED, "incremental"), inc.error
        for side, other in (("punjab", "sindh"), ("sindh", "punjab")):
            assert got(federation, side, inc.session_id) == reference(
                {"punjab": punjab, "sindh": sindh}[side], {"punjab": punjab, "sindh": sindh}[other]
            )
        named = set().union(*asked)
        # Each side read back only IDs that changed on either side, never all 16 matched.
        assert named and len(named) <= 5, sorted(named)
        assert full_equals(federation, a, b, inc)
        # The next run changes nothing, and carries everything.
        asked.clear()
        again = federation.reconcile(b, a)
        assert again.sync == "incremental" and again.match_count == inc.match_count
        assert set().union(*asked) == set()
        assert got(federation, "punjab", again.session_id) == got(
            federation, "punjab", inc.session_id
        )
        changes = {"P5": (nids[5], "PSER", "suspended")}  # a matched ID relabelled
        federation.load("punjab", [(r, *v) for r, v in changes.items()])
        punjab.update(changes)


def full_equals(fed: Federation, a: str, b: str, inc: internal_pb2.SessionStatus) -> bool:
    """A full run now finds what the incremental one did, row for row, on both sides."""
    full = fed.reconcile(a, b, full=True)
    assert full.sync == "full" and full.state == COMPLETED
    same = (full.match_count, full.result_digest) == (inc.match_count, inc.result_digest)
    return same and all(
        got(fed, side, full.session_id) == got(fed, side, inc.session_id)
        for side in ("punjab", "sindh")
    )


def test_a_run_goes_ahead_while_a_compaction_holds_the_pairs_lock(
    federation: Federation,
) -> None:
    """A compaction of the pair's state holds the pair's lock on both sides (held here
    as one does): the initiator asks its own to give way, and so does the peer's
    Handshake, instead of waiting for them or being refused. One attempt, and no
    failed session on either side."""
    import threading

    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    held = []
    for own, peer in (("punjab", "sindh"), ("sindh", "punjab")):
        lock = federation.nodes[own].store.pair_lock(peer)
        give_way = lock.acquire_giving_way(5)
        assert give_way is not None
        held.append((lock, give_way))

    def compaction(lock: object, give_way: threading.Event) -> None:
        give_way.wait(60)  # (the compaction's next read sees it)
        lock.release()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=compaction, args=h) for h in held]
    for t in threads:
        t.start()
    st = federation.client("punjab").reconcile("sindh", attempts=1)
    for t in threads:
        t.join()
    assert st.state == COMPLETED, st.error
    assert all(give_way.is_set() for _, give_way in held)
    for province in ("punjab", "sindh"):
        states = federation.nodes[province].store.db.fetchall("SELECT state FROM sessions")
        assert [s for (s,) in states] == ["COMPLETED"], province


def test_a_nodes_start_drops_what_a_killed_node_left_in_pair_state(
    federation: Federation, inline_pool: BlindingPool
) -> None:
    """A node killed while staging runs (a full run, a compaction) leaves a generation
    nothing reads; one killed as an epoch was retired, state without its pair key.
    The node's next start drops both, keeps the pair's state, and runs on it."""
    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    first = federation.reconcile("punjab", "sindh")
    assert first.state == COMPLETED and first.match_count == 1
    federation.stop("punjab")
    federation.nodes["punjab"].close()
    raw = RawStore(federation.nodes["punjab"])
    try:
        (gen,) = raw.execute("SELECT gen FROM pair_gen").fetchall()[0]
        raw.execute(  # a staging left behind: a copy of the runs under another number
            "INSERT INTO pair_runs SELECT peer, epoch, ?, kind, part, last, data FROM pair_runs",
            (gen + 1000,),
        )
        raw.execute(  # state of a pair whose key went
            "INSERT INTO own_tags VALUES ('kp', 9, '3520200000009', '[]', ?)", (bytes(16),)
        )
        before = raw.execute("SELECT kind, part, data FROM pair_runs WHERE gen=?", (gen,))
        before = sorted(before.fetchall())
    finally:
        raw.close()
    federation.restart("punjab", inline_pool)
    raw = RawStore(federation.nodes["punjab"])
    try:
        assert [g for (g,) in raw.execute("SELECT DISTINCT gen FROM pair_runs")] == [gen]
        assert raw.execute("SELECT count(*) FROM own_tags WHERE epoch=9").fetchone()[0] == 0
        after = raw.execute("SELECT kind, part, data FROM pair_runs WHERE gen=?", (gen,))
        assert sorted(after.fetchall()) == before
    finally:
        raw.close()
    again = federation.reconcile("punjab", "sindh")
    assert again.state == COMPLETED and again.sync == "incremental", again.error
    assert (again.match_count, again.result_digest) == (first.match_count, first.result_digest)


def test_a_session_that_fails_holding_the_pairs_lock_drops_what_it_staged(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sides of a full run stage the pair's new runs before they commit. Where the
    commit fails, each side's session fails while it still holds the pair's lock,
    and drops its staging: nothing of it is left in the store."""
    from ispf.errors import PreconditionFailed

    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])

    def refused(*args: object, **kwargs: object) -> int:
        raise PreconditionFailed("the commit is refused (test)")

    for province in ("punjab", "sindh"):
        monkeypatch.setattr(federation.nodes[province].store, "complete_session", refused)
    st = federation.reconcile("punjab", "sindh")
    assert st.state == internal_pb2.SESSION_STATE_FAILED
    for province in ("punjab", "sindh"):
        store = federation.nodes[province].store
        deadline = time.monotonic() + 10  # (the responder fails on the initiator's Abort)
        while store.db.fetchall("SELECT DISTINCT gen FROM pair_runs"):
            assert time.monotonic() < deadline, f"{province} kept a failed session's staging"
            time.sleep(0.05)


def test_a_responder_session_failed_while_its_matching_stages_leaves_no_staging(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The initiator fails after the exchange, before Conclude, and aborts, while
    Sindh's matching still stages the pair's new runs (slowly here). Sindh's
    session fails at once, but keeps the pair's lock until its matching has
    ended, and then drops what it staged: nothing of it is left, and the lock
    is free."""
    from ispf.errors import PreconditionFailed

    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    sindh = federation.nodes["sindh"].store
    real_stager = sindh.pairs.run_stager
    staging = []

    def slow_stager(peer: str, epoch: int, session_id: str | None) -> object:
        st = real_stager(peer, epoch, session_id)
        real_writer = st.writer
        staging.append(st)

        def writer(kind: object) -> object:
            time.sleep(0.5)  # (a large merge)
            return real_writer(kind)  # type: ignore[arg-type]

        st.writer = writer  # type: ignore[method-assign]
        return st

    monkeypatch.setattr(sindh.pairs, "run_stager", slow_stager)

    def refused(*args: object, **kwargs: object) -> object:
        raise PreconditionFailed("the initiator fails before Conclude (test)")

    monkeypatch.setattr(federation.nodes["punjab"].audit, "checkpoint_for", refused)
    st = federation.reconcile("punjab", "sindh")
    assert st.state == internal_pb2.SESSION_STATE_FAILED
    assert staging  # (sindh's matching began staging)
    lock = sindh.pair_lock("punjab")
    assert lock.acquire(timeout=10)  # (let go once its matching had ended)
    try:
        deadline = time.monotonic() + 10
        while any(t.name.startswith("match-") for t in threading.enumerate()):
            assert time.monotonic() < deadline, "sindh's matching never ended"
            time.sleep(0.05)
        rows = sindh.db.fetchall("SELECT gen, kind, count(*) FROM pair_runs GROUP BY gen, kind")
        assert not rows, f"sindh kept a failed session's staging: {rows}"
    finally:
        lock.release()
