"""Compaction merges a pair's overlay (rows and tombstones over its sorted runs) into
a new generation of runs: every lookup answers as before, the overlay is empty
after, and a compaction that the pair changed under, or that was stopped,
leaves the state as it was. On both store backends."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ispf.errors import CompactionAbandoned, RepeatedKey, UnknownEpoch
from ispf_server.storage import Store
from ispf_server.storage.pairs import compaction, deltas, keys, staging
from ispf_server.storage.pairs.compaction import Compactor, Size
from ispf_server.storage.pairs.schema import STATE_TABLES
from ispf_server.storage.pairs.staging import RunStager, StagedRun
from ispf_server.storage.pairs.state import OwnTag, PairDelta
from tests.conftest import StoreUrls
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

STORE_BACKENDS = ("sqlite", "postgresql")
PEER, EPOCH = "sindh", 1


@pytest.fixture
def store(tmp_path: Path, store_urls: StoreUrls) -> Iterator[Store]:
    url = store_urls(["punjab"]).get("punjab", "")
    if url:
        s = Store(tmp_path / "postgresql", tmp_path / "master.key", url=url)
    else:
        s = Store(tmp_path / "node.sqlite", tmp_path / "master.key")
    for peer, epoch in ((PEER, EPOCH), ("kp", EPOCH), (PEER, EPOCH + 1)):
        s.pairs.key(peer, epoch)  # (state is written only under a pair's key)
    yield s
    s.close()


def apply(store: Store, d: PairDelta) -> None:
    with store.db.transaction() as cur:
        deltas.apply_delta(cur, PEER, EPOCH, d)


def full_run(store: Store, model: Model) -> None:
    own, peer = own_groups(model.own), peer_groups(model.peer)
    with store.db.transaction() as cur:
        staged = packing.staged(cur.connection, PEER, EPOCH, own, peer, model.matches())
    apply(store, delta(reset=True, staged=staged))


def check(store: Store, model: Model, rng: random.Random, nids: list[str]) -> None:
    with store.db.reading() as conn:
        check_against(conn, model, rng.sample(nids, 400))


def overlay(store: Store) -> int:
    with store.db.reading() as conn:
        return compaction.size(conn, PEER, EPOCH).overlay


def generations(store: Store) -> set[int]:
    return {int(r[0]) for r in store.db.fetchall("SELECT DISTINCT gen FROM pair_runs")}


def sync_row(store: Store) -> tuple[object, ...] | None:
    return store.db.fetchone("SELECT * FROM pair_sync")


def setup(seed: int, store: Store) -> tuple[random.Random, Model, list[str], dict[str, bytes]]:
    """A full run's state: half of 3000 IDs own, a peer holding some of their tags."""
    rng = random.Random(seed)
    nids = [f"35202{i:08d}" for i in range(3000)]
    tag_of = {n: rng.randbytes(16) for n in nids}  # fixed keys: an ID's tag never changes
    model = Model()
    for n in rng.sample(nids, 1500):
        model.own[n] = OwnTag(rng.choice(LABELS), tag_of[n])
    for n in rng.sample(nids, 1200):
        model.peer[tag_of[n]] = rng.choice(LABELS)
    model.peer.update({rng.randbytes(16): LABELS[0] for _ in range(300)})
    full_run(store, model)
    return rng, model, nids, tag_of


@pytest.mark.parametrize("seed", range(3))
def test_a_compacted_state_answers_like_the_model_and_keeps_no_overlay(
    seed: int, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading two parts at a time and staging in small pieces, so the paging of the
    old runs and of the new ones is exercised at this size; another pair, and this
    pair in another epoch, keep their overlays untouched."""
    monkeypatch.setattr(compaction, "PARTS_PER_READ", 2)
    monkeypatch.setattr(staging, "DROP_PARTS", 3)
    monkeypatch.setattr(StagedRun, "FLUSH", 4096)
    rng, model, nids, tag_of = setup(seed, store)
    others = [("kp", EPOCH), (PEER, EPOCH + 1)]
    for peer, epoch in others:
        with store.db.transaction() as cur:
            deltas.apply_delta(
                cur, peer, epoch, random_step(random.Random(seed), Model(), nids, tag_of)
            )

    def other_rows() -> list[object]:
        return [
            store.db.fetchall(
                f"SELECT * FROM {t} WHERE NOT (peer=? AND epoch=?) ORDER BY 1, 2, 3", (PEER, EPOCH)
            )
            for t in compaction.OVERLAY
        ]

    before_others = other_rows()
    for night in range(6):
        apply(store, random_step(rng, model, nids, tag_of))
        check(store, model, rng, nids)
        if night % 2:  # compacted after every other night: runs, then rows on compacted runs
            before = sync_row(store)
            done = compaction.compact(store.db, PEER, EPOCH)
            assert done is not None and done.overlay > 0
            assert overlay(store) == 0
            assert sync_row(store) == before  # the state is the same: fingerprints, session
            assert len(generations(store)) == 1  # the old runs went with the overlay
            check(store, model, rng, nids)
    assert other_rows() == before_others


def test_rows_without_runs_become_runs(store: Store) -> None:
    rng = random.Random(4)
    nids = [f"35202{i:08d}" for i in range(600)]
    tag_of = {n: rng.randbytes(16) for n in nids}
    model = Model()
    apply(store, random_step(rng, model, nids, tag_of))  # a pair whose state is rows only
    apply(store, random_step(rng, model, nids, tag_of))
    assert generations(store) == set()
    assert compaction.compact(store.db, PEER, EPOCH) is not None
    assert overlay(store) == 0 and len(generations(store)) == 1
    check(store, model, rng, nids)
    apply(store, random_step(rng, model, nids, tag_of))  # rows and tombstones on top again
    check(store, model, rng, nids)


def test_a_pair_without_state_is_left_alone(store: Store) -> None:
    assert compaction.compact(store.db, PEER, EPOCH) is None
    assert generations(store) == set()


def test_a_change_made_while_compacting_abandons_it_and_loses_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pair's lock keeps sessions out while a compaction runs; should anything
    change the pair's state meanwhile (an epoch retired, a session's commit), the
    compaction must not clear rows it never merged."""
    rng, model, nids, tag_of = setup(7, store)
    apply(store, random_step(rng, model, nids, tag_of))
    late = random_step(rng, model, nids, tag_of)
    late.version = 2  # (a session's commit writes a new sync row)
    done = RunStager.done

    def commit_first(self: RunStager, labelsets: dict[str, int]) -> int:
        apply(store, late)
        return done(self, labelsets)

    monkeypatch.setattr(RunStager, "done", commit_first)
    with pytest.raises(CompactionAbandoned):
        compaction.compact(store.db, PEER, EPOCH)
    monkeypatch.undo()
    check(store, model, rng, nids)
    assert len(generations(store)) == 1  # the staging was dropped
    assert compaction.compact(store.db, PEER, EPOCH) is not None  # and the next one works
    check(store, model, rng, nids)


def test_a_stopped_compaction_leaves_the_state_as_it_was(store: Store) -> None:
    rng, model, nids, tag_of = setup(8, store)
    apply(store, random_step(rng, model, nids, tag_of))
    rows = overlay(store)
    reads = iter(range(3))
    with pytest.raises(CompactionAbandoned):
        compaction.compact(store.db, PEER, EPOCH, stopping=lambda: next(reads, 99) == 99)
    assert overlay(store) == rows and len(generations(store)) == 1
    check(store, model, rng, nids)


def test_a_broken_invariant_fails_the_compaction_not_the_state(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An overlay entry that a tombstone does not cover would put a key in a run twice:
    the merged runs are checked to ascend, and the compaction fails instead."""
    rng, model, nids, tag_of = setup(9, store)
    apply(store, random_step(rng, model, nids, tag_of))
    store.db.write("DELETE FROM peer_gone")  # (what no delta ever leaves)
    with pytest.raises(RepeatedKey):
        compaction.compact(store.db, PEER, EPOCH)
    assert len(generations(store)) == 1 and overlay(store) > 0
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=0.0)
    compactor.after_session(PEER, EPOCH)  # (in the background: counted, logged, no more)
    compactor.wait(30)
    assert (compactor.counts.failed, compactor.counts.compacted) == (1, 0)
    (warned,) = [r for r in caplog.records if "not compacted" in r.getMessage()]
    assert warned.levelname == "WARNING"  # (a broken invariant, not a pair that changed)
    assert len(generations(store)) == 1 and overlay(store) > 0


def test_due_when_the_overlay_passes_its_share_of_the_base() -> None:
    assert not Size(0, 0).due()
    assert not Size(compaction.MINIMUM - 1, 0).due()
    assert Size(compaction.MINIMUM, 0).due()
    assert not Size(9_999, 1_000_000).due()
    assert Size(10_000, 1_000_000).due()
    assert Size(1, 10).due(share=0.05, minimum=1)


def test_after_a_session_the_compaction_waits_for_the_pairs_lock(store: Store) -> None:
    rng, model, nids, tag_of = setup(10, store)
    apply(store, random_step(rng, model, nids, tag_of))
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=0.0)
    lock = store.pair_lock(PEER)
    assert lock.acquire(timeout=5)  # the session that committed still holds it
    compactor.after_session(PEER, EPOCH)
    threading.Event().wait(0.3)
    assert overlay(store) > 0
    lock.release()
    compactor.wait(30)
    assert overlay(store) == 0
    check(store, model, rng, nids)
    compactor.after_session(PEER, EPOCH)  # nothing due: nothing done
    compactor.wait(30)
    assert len(generations(store)) == 1


def test_a_compaction_waits_for_a_quiet_node(store: Store) -> None:
    """Not while a batch session runs on the node, nor until none has ended for the
    quiet period: a nightly job's next runs with other peers take the CPU first."""
    rng, model, nids, tag_of = setup(11, store)
    apply(store, random_step(rng, model, nids, tag_of))
    busy = threading.Event()
    busy.set()
    compactor = Compactor(store.db, store.pair_lock, busy.is_set, share=0.0, minimum=1, quiet=0.5)
    compactor.after_session(PEER, EPOCH)
    compactor.after_session(PEER, EPOCH)  # (one pending per pair)
    threading.Event().wait(1.0)
    assert overlay(store) > 0  # a session is running
    busy.clear()
    compactor.after_session("kp", EPOCH)  # another session ended just now
    threading.Event().wait(0.2)
    assert overlay(store) > 0  # not quiet for long enough yet
    compactor.wait(30)
    assert overlay(store) == 0
    assert len(compactor.finished) == 1
    check(store, model, rng, nids)


def test_a_stopping_node_gives_up_waiting_compactions(store: Store) -> None:
    rng, model, nids, tag_of = setup(12, store)
    apply(store, random_step(rng, model, nids, tag_of))
    compactor = Compactor(store.db, store.pair_lock, lambda: True, share=0.0, minimum=1)
    compactor.after_session(PEER, EPOCH)
    compactor.stop(timeout=5)
    assert overlay(store) > 0 and not compactor.finished


def test_a_compaction_killed_before_its_commit_leaves_a_staging_nothing_reads(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node killed mid-compaction never reaches its cleanup: the staged generation
    stays in the store, unread, until the pair's next staging drops it."""

    class Killed(BaseException):
        pass

    rng, model, nids, tag_of = setup(13, store)
    apply(store, random_step(rng, model, nids, tag_of))

    def killed(self: RunStager, labelsets: dict[str, int]) -> int:
        raise Killed

    monkeypatch.setattr(RunStager, "done", killed)
    monkeypatch.setattr(compaction, "drop_generation", lambda *a: None)  # (no cleanup)
    with pytest.raises(Killed):
        compaction.compact(store.db, PEER, EPOCH)
    monkeypatch.undo()
    assert len(generations(store)) == 2  # the half-written one is left behind
    check(store, model, rng, nids)  # and never read
    apply(store, random_step(rng, model, nids, tag_of))  # the next run writes on top
    check(store, model, rng, nids)
    assert compaction.compact(store.db, PEER, EPOCH) is not None
    assert len(generations(store)) == 1 and overlay(store) == 0
    check(store, model, rng, nids)


def staged_generation(store: Store) -> bool:
    return len(generations(store)) > 1


def paused_at_a_part(
    monkeypatch: pytest.MonkeyPatch, pause: Callable[[], object], *, once: bool = False
) -> threading.Event:
    """The old runs read with a pause at the fourth part (`pause()`, after setting the
    event returned): a compaction under way, for a session to ask meanwhile; with
    `once`, only the first compaction pauses."""
    parts = compaction._parts
    compacting = threading.Event()

    def slow_parts(*args: object, **kwargs: object) -> Iterator[tuple[bytes, bytes]]:
        for i, part in enumerate(parts(*args, **kwargs)):  # type: ignore[arg-type]
            if i == 3 and not (once and compacting.is_set()):
                compacting.set()
                pause()
            yield part

    monkeypatch.setattr(compaction, "_parts", slow_parts)
    return compacting


def test_a_compaction_gives_way_to_a_session_and_comes_back_after_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session asking for the pair's lock (a peer's Handshake) does not wait for the
    compaction to end, nor is it refused: the compaction stops at its next read,
    lets go, drops what it staged, and runs again once the node is quiet."""
    monkeypatch.setattr(compaction, "PARTS_PER_READ", 1)
    monkeypatch.setattr(StagedRun, "FLUSH", 4096)
    rng, model, nids, tag_of = setup(14, store)
    apply(store, random_step(rng, model, nids, tag_of))
    go_on = threading.Event()
    compacting = paused_at_a_part(monkeypatch, lambda: go_on.wait(10))
    # (quiet: the session takes the lock before the compaction's retry can)
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=1.0)
    compactor.after_session(PEER, EPOCH)
    assert compacting.wait(30)
    lock = store.pair_lock(PEER)
    assert not lock.acquire(blocking=False)
    assert lock.ask_to_give_way()
    go_on.set()
    assert lock.acquire(timeout=10)  # it stopped and let go
    try:
        assert compactor.counts.gave_way == 1 and compactor.counts.compacted == 0
        assert overlay(store) > 0
        # its staging dropped after it let go, while the session goes on
        deadline = time.monotonic() + 10
        while staged_generation(store) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not staged_generation(store)
        check(store, model, rng, nids)
        assert not lock.ask_to_give_way()  # (held by a session now: nothing to ask)
    finally:
        lock.release()
    compactor.wait(30)
    assert compactor.counts.compacted == 1 and compactor.counts.failed == 0
    assert overlay(store) == 0 and not staged_generation(store)
    check(store, model, rng, nids)


def test_an_epoch_retired_while_compacting_leaves_nothing_of_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--retire-epoch` erases the epoch's pair state from another process while the
    node compacts it: every later staging write is refused, so even a node killed
    before its cleanup (none here) leaves no part of the retired epoch behind."""
    monkeypatch.setattr(compaction, "PARTS_PER_READ", 1)
    monkeypatch.setattr(StagedRun, "FLUSH", 4096)
    monkeypatch.setattr(compaction, "drop_generation", lambda *a: None)  # (no cleanup)
    rng, model, nids, tag_of = setup(15, store)
    apply(store, random_step(rng, model, nids, tag_of))
    parts = compaction._parts

    def retired_midway(*args: object, **kwargs: object) -> Iterator[tuple[bytes, bytes]]:
        for i, part in enumerate(parts(*args, **kwargs)):  # type: ignore[arg-type]
            if i == 2 and store.pairs.rekey_count(PEER, EPOCH) is not None:
                store.destroy_epoch(EPOCH)
            yield part

    monkeypatch.setattr(compaction, "_parts", retired_midway)
    with pytest.raises(UnknownEpoch):
        compaction.compact(store.db, PEER, EPOCH)
    for table in STATE_TABLES:
        assert not store.db.fetchall(f"SELECT 1 FROM {table} WHERE epoch=?", (EPOCH,)), table
    assert store.db.fetchall("SELECT 1 FROM own_tags WHERE epoch=?", (EPOCH + 1,)) == []


def test_a_session_of_a_retired_epoch_commits_no_pair_state(store: Store) -> None:
    store.destroy_epoch(EPOCH)
    rng = random.Random(16)
    nids = [f"35202{i:08d}" for i in range(600)]
    with pytest.raises(UnknownEpoch):
        apply(store, random_step(rng, Model(), nids, {n: rng.randbytes(16) for n in nids}))
    with pytest.raises(UnknownEpoch):
        store.pairs.run_stager(PEER, EPOCH, None)
    for table in STATE_TABLES:
        assert not store.db.fetchall(f"SELECT 1 FROM {table} WHERE epoch=?", (EPOCH,)), table


def test_a_nodes_start_sweeps_what_a_killed_one_left_in_pair_state(store: Store) -> None:
    """State without its pair key (written past an epoch's retirement by an older
    node) is erased; a staging nobody writes is dropped; a staging whose pair's lock
    is held (a replica staging now) and every keyed pair's state are kept."""
    rng, model, nids, tag_of = setup(17, store)
    with store.db.transaction() as cur:  # kp: a staging left by a killed node
        packing.staged(cur.connection, "kp", EPOCH, own_groups(model.own), [], {})
    with store.db.transaction() as cur:  # epoch 9: state whose key went
        cur.execute("INSERT INTO pair_keys VALUES ('kp', 9, 0, '2026-01-01')")
        deltas.apply_delta(cur, "kp", 9, random_step(rng, Model(), nids, tag_of))
        cur.execute("DELETE FROM pair_keys WHERE epoch=9")
    apply(store, random_step(rng, model, nids, tag_of))
    with store.db.transaction() as cur:  # sindh: a staging a session is writing now
        packing.staged(cur.connection, PEER, EPOCH, own_groups(model.own), [], {})
    lock = store.pair_lock(PEER)
    assert lock.acquire(timeout=5)
    try:
        assert store.sweep_pairs() == (1, 1)
    finally:
        lock.release()
    for table in STATE_TABLES:
        assert not store.db.fetchall(f"SELECT 1 FROM {table} WHERE epoch=9", ()), table
    assert store.db.fetchall("SELECT DISTINCT gen FROM pair_runs WHERE peer='kp'") == []
    assert staged_generation(store)  # sindh's, whose lock was held
    check(store, model, rng, nids)
    assert store.sweep_pairs() == (0, 1)
    assert not staged_generation(store)
    check(store, model, rng, nids)


def test_dropping_a_generation_never_drops_the_pairs_state(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "DROP_PARTS", 2)
    rng, model, nids, _ = setup(18, store)
    (gen,) = generations(store)
    compaction.drop_generation(store.db, PEER, EPOCH, gen)
    assert generations(store) == {gen}
    check(store, model, rng, nids)


def state_of(store: Store, peer: str, epoch: int) -> list[object]:
    """Every row of a pair's state (runs by generation number aside)."""
    pair = (peer, epoch)
    out: list[object] = [
        store.db.fetchall(f"SELECT * FROM {t} WHERE peer=? AND epoch=? ORDER BY 3", pair)
        for t in ("own_tags", "peer_tags", "own_gone", "peer_gone", "pair_sync")
    ]
    out.append(
        store.db.fetchall(
            "SELECT r.kind, r.part, r.data FROM pair_runs r JOIN pair_gen g ON g.peer = r.peer "
            "AND g.epoch = r.epoch AND g.gen = r.gen WHERE r.peer=? AND r.epoch=? ORDER BY 1, 2",
            pair,
        )
    )
    return out


def with_overlay(seed: int, store: Store, runs: bool) -> tuple[random.Random, Model, list[str]]:
    """A pair's state with an overlay: over a full run's runs, or (`runs` false) rows
    only, as a pair holds before its first compaction when it never ran full."""
    if runs:
        rng, model, nids, tag_of = setup(seed, store)
    else:
        rng, model = random.Random(seed), Model()
        nids = [f"35202{i:08d}" for i in range(3000)]
        tag_of = {n: rng.randbytes(16) for n in nids}
    apply(store, random_step(rng, model, nids, tag_of))
    return rng, model, nids


@pytest.mark.parametrize("runs", [True, False], ids=["runs", "rows-only"])
def test_a_compaction_stopped_at_any_of_its_checks_leaves_the_state_as_it_was(
    store: Store, monkeypatch: pytest.MonkeyPatch, runs: bool
) -> None:
    """Asked to stop, a compaction stops at its next check, wherever it is: reading
    the overlay, reading the old runs, or (a pair whose state is rows only, which
    reads no runs) staging the new ones. A stop at each check in turn leaves every
    row as it was and drops what it staged; past the last, it compacts."""
    monkeypatch.setattr(StagedRun, "FLUSH", 4096)
    monkeypatch.setattr(compaction, "PARTS_PER_READ", 2)
    rng, model, nids = with_overlay(19, store, runs)
    assert bool(generations(store)) == runs
    before, gens = state_of(store, PEER, EPOCH), generations(store)
    stop_at = 0
    while True:
        checks = iter(range(stop_at))
        try:
            done = compaction.compact(
                store.db,
                PEER,
                EPOCH,
                lambda: next(checks, None) is None,  # noqa: B023
            )
        except CompactionAbandoned:
            assert state_of(store, PEER, EPOCH) == before, stop_at
            assert generations(store) == gens, stop_at
            stop_at += 1
            continue
        break
    assert done is not None and overlay(store) == 0
    assert stop_at >= (12 if runs else 8)  # (the overlay's reads, each run's pieces)
    check(store, model, rng, nids)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_compaction_asked_while_it_waits_for_the_lock_gives_way_once_it_has_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session asks while the compaction still waits for the pair's lock (held by
    another session): the ask is not lost. The compaction, once it has the lock,
    lets go at once without compacting, and the asking session gets the lock."""
    rng, model, nids, tag_of = setup(20, store)
    apply(store, random_step(rng, model, nids, tag_of))
    before = state_of(store, PEER, EPOCH)
    sized: list[int] = []
    size = compaction.size
    monkeypatch.setattr(compaction, "size", lambda *a: sized.append(1) or size(*a))
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=0.5)
    lock = store.pair_lock(PEER)
    assert lock.acquire(timeout=5)  # a session
    compactor.after_session(PEER, EPOCH)
    assert wait_for(lock.ask_to_give_way)  # (true once the compaction waits for the lock)
    lock.release()  # the session ends: the compaction has the lock, and lets go
    assert wait_for(lambda: compactor.counts.gave_way == 1)
    assert lock.acquire(timeout=10)  # the session that asked
    try:
        assert compactor.counts.compacted == 0 and not sized  # (it let go before reading)
        assert state_of(store, PEER, EPOCH) == before
    finally:
        lock.release()
    compactor.wait(30)
    assert compactor.counts.compacted == 1 and overlay(store) == 0
    check(store, model, rng, nids)


def test_a_compaction_the_node_stops_while_it_waits_for_the_lock_reads_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node stops while a compaction waits for the pair's lock (held by a
    session, which does not ask it to give way): once it has the lock it lets go
    without a read, and gives up quietly (None, nothing counted)."""
    rng, model, nids, tag_of = setup(22, store)
    apply(store, random_step(rng, model, nids, tag_of))
    before = state_of(store, PEER, EPOCH)
    sized: list[int] = []
    size = compaction.size
    monkeypatch.setattr(compaction, "size", lambda *a: sized.append(1) or size(*a))
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1)
    lock = store.pair_lock(PEER)
    assert lock.acquire(timeout=5)  # a session
    out: list[object] = []
    waiting = threading.Thread(target=lambda: out.append(compactor.run_now(PEER, EPOCH)))
    waiting.start()
    try:
        assert wait_for(lambda: bool(lock._yielders))  # (it waits for the lock)
        compactor.stop(timeout=0)
    finally:
        lock.release()
    waiting.join(10)
    assert out == [None] and not sized
    assert compactor.counts.compacted == compactor.counts.gave_way == 0
    assert compactor.counts.failed == 0
    assert state_of(store, PEER, EPOCH) == before
    check(store, model, rng, nids)


def test_a_session_asks_again_while_it_waits_so_no_compaction_of_the_peer_keeps_it_out(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two compactions of one peer's pairs (two epochs) share the peer's lock: the one
    waiting takes the lock the first let go. The session asks again while it waits,
    so both give way, and neither runs to its end before the session."""
    monkeypatch.setattr(compaction, "PARTS_PER_READ", 1)
    rng, model, nids, tag_of = setup(21, store)
    apply(store, random_step(rng, model, nids, tag_of))
    other = Model()
    for n in rng.sample(nids, 1500):
        other.own[n] = OwnTag(rng.choice(LABELS), tag_of[n])
    with store.db.transaction() as cur:  # the pair in the next epoch: runs and rows
        staged = packing.staged(cur.connection, PEER, EPOCH + 1, own_groups(other.own), [], {})
        deltas.apply_delta(cur, PEER, EPOCH + 1, delta(reset=True, staged=staged))
        deltas.apply_delta(cur, PEER, EPOCH + 1, random_step(rng, other, nids, tag_of))
    # (a long compaction: asks come while it runs)
    compacting = paused_at_a_part(monkeypatch, lambda: time.sleep(0.6))
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=1.0)
    compactor.after_session(PEER, EPOCH)
    compactor.after_session(PEER, EPOCH + 1)
    assert compacting.wait(30)
    lock = store.pair_lock(PEER)
    assert lock.acquire_asking(10)
    try:
        lock.release()  # (a compaction still waiting now sees the ask it had)
        assert lock.acquire_asking(10)
        assert compactor.counts.compacted == 0
    finally:
        lock.release()
    compactor.wait(30)
    assert compactor.counts.gave_way == 2 and compactor.counts.compacted == 2
    assert compactor.counts.failed == 0
    check(store, model, rng, nids)


def test_a_compaction_due_past_its_longest_wait_no_longer_gives_way(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The longest wait counts from when the pair was first found due, not from each
    try after giving way: sessions that follow one another cannot put the merge
    off for ever. Past it, the compaction holds the lock as a session does (a
    peer's Handshake is told to retry), and finishes."""
    monkeypatch.setattr(Compactor, "LONGEST_WAIT", 1.5)
    monkeypatch.setattr(compaction, "PARTS_PER_READ", 1)
    rng, model, nids, tag_of = setup(22, store)
    apply(store, random_step(rng, model, nids, tag_of))
    compacting = paused_at_a_part(monkeypatch, lambda: time.sleep(0.3))
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=0.2)
    due = time.monotonic()
    compactor.after_session(PEER, EPOCH)
    assert compacting.wait(30)
    compacting.clear()
    lock = store.pair_lock(PEER)
    assert lock.acquire_asking(10)  # a session: the compaction gives way
    try:
        assert compactor.counts.gave_way == 1
        time.sleep(max(0.0, due + 1.7 - time.monotonic()))  # past the longest wait
    finally:
        lock.release()
    assert compacting.wait(30)  # tried again, at once: no more waiting for quiet
    assert not lock.ask_to_give_way()
    assert not lock.acquire_asking(5, until_refused=True)  # (refused, not kept waiting)
    compactor.wait(30)
    assert compactor.counts.compacted == 1 and compactor.counts.gave_way == 1
    assert overlay(store) == 0
    check(store, model, rng, nids)


def test_the_old_runs_are_dropped_after_the_compaction_lets_go_of_the_lock(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting the old generation takes many writes at a million records: a session
    of the pair does not wait for them."""
    rng, model, nids, tag_of = setup(23, store)
    apply(store, random_step(rng, model, nids, tag_of))
    (old,) = generations(store)
    dropped, real = [], compaction.drop_generation

    def drop(db: object, peer: str, epoch: int, gen: int, *args: object) -> None:
        lock = store.pair_lock(peer)
        free = lock.acquire(blocking=False)
        if free:
            lock.release()
        dropped.append((gen, free))
        real(db, peer, epoch, gen, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(compaction, "drop_generation", drop)
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1)
    assert compactor.run_now(PEER, EPOCH) is not None
    assert dropped == [(old, True)]
    assert len(generations(store)) == 1 and old not in generations(store)
    check(store, model, rng, nids)


def test_a_staging_is_finished_only_while_its_pair_key_exists(store: Store) -> None:
    """The last write of a staging (its label sets) checks the pair's key too: an
    epoch retired after the runs were written leaves no label sets behind."""
    setup(24, store)
    stager = RunStager(store.db, PEER, EPOCH, None)
    run = stager.writer(compaction.OWN_NID)
    run.append(b"3520200000001" + bytes(16) + compaction.pairruns.lsid(0))
    run.close()
    store.db.write("DELETE FROM pair_keys WHERE peer=? AND epoch=?", (PEER, EPOCH))
    with pytest.raises(UnknownEpoch):
        stager.done({"[]": 0})
    labelsets = "SELECT count(*) FROM pair_labelsets WHERE gen=?"
    assert store.db.fetchone(labelsets, (stager.gen,)) == (0,)


def test_the_start_sweep_keeps_state_keyed_while_it_looked(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """State without a key is erased, a pair with only its generation pointer too;
    but a pair keyed between the sweep's look and its erasure (its first session
    began) keeps its state."""
    rng, model, nids, tag_of = setup(25, store)
    with store.db.transaction() as cur:
        cur.execute("INSERT INTO pair_keys VALUES ('kp', 9, 0, '2026-01-01')")
        deltas.apply_delta(cur, "kp", 9, random_step(rng, Model(), nids, tag_of))
        cur.execute("DELETE FROM pair_keys WHERE epoch=9")
        cur.execute("INSERT INTO pair_gen VALUES ('kp', 8, 5)")  # (only its pointer left)
    transaction = store.db.transaction

    def keyed_meanwhile(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(store.db, "transaction", transaction)
        store.db.write("INSERT INTO pair_keys VALUES ('kp', 9, 0, '2026-01-01')")
        return transaction(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.db, "transaction", keyed_meanwhile)
    assert keys.drop_keyless(store.db) == 1  # kp in epoch 8
    assert store.db.fetchall("SELECT * FROM pair_gen WHERE epoch=8") == []
    assert store.db.fetchone("SELECT count(*) FROM own_tags WHERE epoch=9")[0] > 0  # type: ignore[index]
    check(store, model, rng, nids)


def test_a_session_asks_again_work_that_came_to_wait_after_its_first_ask(store: Store) -> None:
    """Held as compactions hold the peer's lock: the first lets go when asked; the
    second began waiting after the session's first ask, and is asked again."""
    lock = store.pair_lock(PEER)
    first = lock.acquire_giving_way(5)
    assert first is not None
    got: list[bool] = []
    session = threading.Thread(target=lambda: got.append(lock.acquire_asking(10)))
    session.start()
    assert first.wait(5)  # (asked)
    second: list[threading.Event] = []

    def later() -> None:
        give_way = lock.acquire_giving_way(10)  # (waits: registered after the first ask)
        assert give_way is not None
        second.append(give_way)
        give_way.wait(5)  # (holds the lock until asked)
        lock.release()

    other = threading.Thread(target=later)
    other.start()
    time.sleep(0.6)  # (the session asks again meanwhile)
    t0 = time.monotonic()
    lock.release()  # the first lets go
    session.join(10)
    assert got == [True] and time.monotonic() - t0 < 3  # not kept out by the second
    lock.release()
    other.join(10)
    assert second and second[0].is_set()


def test_work_that_gave_up_waiting_is_asked_no_more(store: Store) -> None:
    lock = store.pair_lock(PEER)
    assert lock.acquire(timeout=5)  # a session
    assert lock.acquire_giving_way(0.2) is None  # (busy: it gave up)
    assert not lock.ask_to_give_way()
    assert not lock.acquire_asking(5, until_refused=True)  # (a session holds it: at once)
    lock.release()
    assert lock.acquire_asking(5, until_refused=True)
    lock.release()


def test_a_generation_dropped_while_stopping_is_left_to_the_sweep(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "DROP_PARTS", 1)
    _, model, _, _ = setup(26, store)
    with store.db.transaction() as cur:
        staged = packing.staged(cur.connection, PEER, EPOCH, own_groups(model.own), [], {})
    parts = "SELECT count(*) FROM pair_runs WHERE gen=?"
    left = store.db.fetchone(parts, (staged.gen,))[0]  # type: ignore[index]
    pieces = iter(range(2))
    compaction.drop_generation(
        store.db, PEER, EPOCH, staged.gen, lambda: next(pieces, None) is None
    )
    assert store.db.fetchone(parts, (staged.gen,))[0] == left - 2  # type: ignore[index]
    assert store.sweep_pairs() == (0, 1)
    assert staged.gen not in generations(store)


@pytest.mark.parametrize("runs", [True, False], ids=["runs", "rows-only"])
def test_a_compaction_asked_to_stop_reads_nothing_more(
    store: Store, monkeypatch: pytest.MonkeyPatch, runs: bool
) -> None:
    """Asked to stop before it begins, or during any of its store calls (the sync
    row, each read of the overlay, each batch of the old runs, each piece it
    stages), a compaction makes no further call: a session asking it to give way
    waits for one call at most, not for a phase. Only a stop asked during its
    last piece is too late: the label sets and the commit then follow (two
    calls), and it ends compacted."""
    monkeypatch.setattr(compaction, "PARTS_PER_READ", 2)
    monkeypatch.setattr(StagedRun, "FLUSH", 4096)
    rng, model, nids = with_overlay(27, store, runs)
    calls: list[str] = []
    stop_at = 0
    asked = False

    def counted(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            nonlocal asked
            calls.append(name)
            asked = asked or len(calls) == stop_at  # (asked while this call runs)
            return real(*args, **kwargs)

        return call

    def stopping() -> bool:
        return asked

    monkeypatch.setattr(store.db, "reading", counted("read", store.db.reading))
    monkeypatch.setattr(store.db, "transaction", counted("write", store.db.transaction))
    while True:
        calls.clear()
        asked = stop_at == 0  # (the first time, asked before it begins: no call at all)
        left: list[int] = []
        try:
            done = compaction.compact(store.db, PEER, EPOCH, stopping, left)
            made = list(calls)
        except CompactionAbandoned:
            assert len(calls) == stop_at, f"called again after a stop asked at {stop_at}: {calls}"
            for gen in left:
                compaction.drop_generation(store.db, PEER, EPOCH, gen)
            stop_at += 1
            continue
        break
    assert done is not None and overlay(store) == 0
    assert len(made) == stop_at + 2 and made[-3:] == ["write"] * 3, (stop_at, made)
    assert made.count("write") > 4 + 2  # (pieces of each kind's run, then the last two)
    check(store, model, rng, nids)


def test_a_compaction_stops_within_a_batch_of_old_parts(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop asked while the merged runs are staged is seen before the next part is
    appended, not only at the next read of the old runs (64 parts a read)."""
    monkeypatch.setattr(StagedRun, "FLUSH", 1 << 30)  # (nothing written: counted)
    rng, model, nids, tag_of = setup(28, store)
    apply(store, random_step(rng, model, nids, tag_of))
    with store.db.reading() as conn:
        own_parts = conn.execute(
            "SELECT count(*) FROM pair_runs WHERE kind=?", (compaction.OWN_NID.name,)
        ).fetchone()[0]
    assert own_parts > 2  # (so one read gives out several)
    appended: list[int] = []
    append = StagedRun.append

    def counted(self: StagedRun, data: bytes) -> None:
        appended.append(len(data))
        append(self, data)

    monkeypatch.setattr(StagedRun, "append", counted)
    with pytest.raises(CompactionAbandoned):
        compaction.compact(store.db, PEER, EPOCH, lambda: bool(appended))
    assert len(appended) == 1
    check(store, model, rng, nids)


def test_waiting_for_compactions_waits_for_a_try_after_giving_way(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wait` called while a compaction runs returns only once it has ended, the try
    after giving way to a session included: not when the first try let go."""
    monkeypatch.setattr(compaction, "PARTS_PER_READ", 1)
    rng, model, nids, tag_of = setup(29, store)
    apply(store, random_step(rng, model, nids, tag_of))
    go_on = threading.Event()
    compacting = paused_at_a_part(monkeypatch, lambda: go_on.wait(10), once=True)
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=0.3)
    compactor.after_session(PEER, EPOCH)
    assert compacting.wait(30)
    seen: list[int] = []
    waiter = threading.Thread(
        target=lambda: (compactor.wait(30), seen.append(compactor.counts.compacted))
    )
    waiter.start()
    lock = store.pair_lock(PEER)
    assert not lock.acquire(blocking=False)
    assert lock.ask_to_give_way()
    go_on.set()
    assert lock.acquire(timeout=10)  # a session: the compaction gave way
    time.sleep(0.2)
    lock.release()
    waiter.join(40)
    assert seen == [1] and compactor.counts.gave_way == 1
    assert overlay(store) == 0


@pytest.mark.parametrize("ended", ["compacted", "not-due", "no-state", "abandoned", "failed"])
def test_the_longest_wait_starts_anew_once_a_compaction_has_ended(
    store: Store, monkeypatch: pytest.MonkeyPatch, ended: str
) -> None:
    """A pair's compaction that ended other than by giving way (it compacted, found
    the pair no longer due, found no state to compact (no sync row: the pair's
    state erased meanwhile), was abandoned, or failed), then due again later, gives
    way again: its longest wait counts from when it was due this time, not from
    the first time it was."""
    monkeypatch.setattr(Compactor, "LONGEST_WAIT", 2.5)
    rng, model, nids, tag_of = setup(30, store)
    apply(store, random_step(rng, model, nids, tag_of))
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=0.1)
    real = compaction.compact

    def ends_at_once(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(compaction, "compact", real)
        if ended == "no-state":
            return None
        if ended == "abandoned":
            raise CompactionAbandoned("the pair state changed while it was compacted")
        raise RuntimeError("a failure")

    if ended == "not-due":
        compactor.minimum = 10**9
    elif ended != "compacted":
        monkeypatch.setattr(compaction, "compact", ends_at_once)
    compactor.after_session(PEER, EPOCH)
    compactor.wait(30)
    assert compactor.counts.compacted == (ended == "compacted") and not compactor.counts.gave_way
    compactor.minimum = 1
    time.sleep(2.8)  # (past the longest wait from the first time it was due)
    apply(store, random_step(rng, model, nids, tag_of))
    lock = store.pair_lock(PEER)
    assert lock.acquire(timeout=5)  # a session, while the compaction waits for it
    compactor.after_session(PEER, EPOCH)
    assert wait_for(lock.ask_to_give_way)  # (it waits giving way: within its wait)
    lock.release()
    assert wait_for(lambda: compactor.counts.gave_way == 1)
    compactor.wait(30)
    assert compactor.counts.compacted == 1 + (ended == "compacted")
    assert compactor.counts.failed == (ended in ("abandoned", "failed"))
    check(store, model, rng, nids)


@pytest.mark.parametrize("asked", [False, True], ids=["stopped", "asked-and-stopped"])
def test_a_running_compaction_the_node_stops_is_given_up_not_counted_as_giving_way(
    store: Store, monkeypatch: pytest.MonkeyPatch, asked: bool
) -> None:
    """The node stops while a compaction runs (and, or not, a session asked it to give
    way): it stops at its next read, compacts nothing, leaves the state as it
    was, and is not counted as having given way."""
    monkeypatch.setattr(compaction, "PARTS_PER_READ", 1)
    rng, model, nids, tag_of = setup(33, store)
    apply(store, random_step(rng, model, nids, tag_of))
    go_on = threading.Event()
    compacting = paused_at_a_part(monkeypatch, lambda: go_on.wait(10))
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=0.1)
    compactor.after_session(PEER, EPOCH)
    assert compacting.wait(30)
    if asked:
        assert store.pair_lock(PEER).ask_to_give_way()  # (and then the node stops too)
    stopping = threading.Thread(target=compactor.stop)
    stopping.start()
    assert wait_for(compactor._stopping.is_set)
    go_on.set()
    stopping.join(15)
    assert not stopping.is_alive() and not compactor.finished
    assert compactor.counts.gave_way == 0 and compactor.counts.compacted == 0
    assert overlay(store) > 0
    check(store, model, rng, nids)


def test_the_keys_of_synced_pairs_are_read_together(store: Store) -> None:
    """An online check reads, in one read, the key of every pair of the epoch that
    holds state: the pair's own key; a pair keyed but never reconciled, of another
    epoch, or re-keyed and not reconciled since, is not among them (the check
    answers "not synced")."""
    setup(31, store)  # (sindh, epoch 1: state; kp and sindh in epoch 2: keys only)
    synced = store.pairs.synced_keys(EPOCH)
    assert list(synced) == [PEER]
    key = store.pairs.key(PEER, EPOCH)
    assert synced[PEER].unsafe_raw() == key.unsafe_raw()
    assert store.pairs.synced_keys(EPOCH + 1) == {}
    with store.db.transaction() as cur:  # re-keyed: its state goes with the old key
        keys.rekey(cur, PEER, EPOCH, "2026-12-01T00:00:00Z")
    assert store.pairs.synced_keys(EPOCH) == {}
    full_run(store, Model())  # (its next run is full, under the new key)
    assert store.pairs.synced_keys(EPOCH)[PEER].unsafe_raw() != key.unsafe_raw()


def test_past_its_longest_wait_a_compaction_kept_from_the_lock_gives_up(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past its longest wait a compaction waits for the pair's lock as a session does,
    for `LOCK_WAIT` at most: held all that time, it gives up with a warning and
    leaves the state as it was; the pair's next session starts it again."""
    monkeypatch.setattr(Compactor, "LONGEST_WAIT", 0.0)
    monkeypatch.setattr(Compactor, "LOCK_WAIT", 0.3)
    rng, model, nids, tag_of = setup(32, store)
    apply(store, random_step(rng, model, nids, tag_of))
    before = state_of(store, PEER, EPOCH)
    compactor = Compactor(store.db, store.pair_lock, share=0.0, minimum=1, quiet=0.0)
    lock = store.pair_lock(PEER)
    assert lock.acquire(timeout=5)  # a session that outlasts the compaction's wait
    try:
        with caplog.at_level("WARNING", logger=compaction.__name__):
            compactor.after_session(PEER, EPOCH)
            compactor.wait(10)
        assert "its lock stayed busy" in caplog.text
        assert compactor.counts.compacted == 0 and state_of(store, PEER, EPOCH) == before
    finally:
        lock.release()
    compactor.after_session(PEER, EPOCH)
    compactor.wait(10)
    assert compactor.counts.compacted == 1 and overlay(store) == 0
    check(store, model, rng, nids)
