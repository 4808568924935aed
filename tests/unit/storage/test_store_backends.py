"""The store's rooms behave the same on both backends (the `backend` fixture): the
registry's writes, reads and syncs, sessions and their matches, the audit log,
budgets and meta, schema versions; and, on PostgreSQL, that write transactions
are one at a time across connections (so the log never forks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ispf.errors import (
    ConfigError,
    RetryLater,
    SessionAborted,
    StagingLost,
    StoreUnavailable,
)
from ispf.records import Label
from ispf_server.storage import Store
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.staging import RunStager
from ispf_server.storage.registry import StoredRecord, code_bytes, label_code
from ispf_server.storage.sessions import MatchRow, SessionTotals
from ispf_server.storage.store import SCHEMA_VERSION
from tests.conftest import StoreUrls

STORE_BACKENDS = ("sqlite", "postgresql")

A, B = Label("BISP", "enrolled"), Label("SSPA", "eligible")


def rec(rid: str, nid: str, label: Label = A) -> StoredRecord:
    return StoredRecord(rid, nid, label)


def open_store(tmp_path: Path, url: str) -> Store:
    if url:
        return Store(tmp_path / "postgresql", tmp_path / "master.key", url=url)
    return Store(tmp_path / "node.sqlite", tmp_path / "master.key")


@pytest.fixture
def url(store_urls: StoreUrls) -> str:
    return store_urls(["punjab"]).get("punjab", "")


@pytest.fixture
def store(tmp_path: Path, url: str) -> Iterator[Store]:
    s = open_store(tmp_path, url)
    yield s
    s.close()


def test_registry_writes_and_reads(store: Store) -> None:
    reg = store.registry
    counts = reg.upsert(
        [rec("r1", "3520200000001"), rec("r2", "3520200000002"), rec("r1", "3520200000001", B)]
    )
    assert (counts.inserted, counts.updated, counts.unchanged) == (2, 1, 0)
    v = reg.version()
    assert reg.upsert([rec("r2", "3520200000002")]).unchanged == 1 and reg.version() == v
    reg.upsert([rec("r3", "3520200000003", B), rec("R0", "3520200000001")])
    total, distinct, labels = reg.stats()
    assert (total, distinct) == (4, 3) and dict(labels) == {A: 2, B: 2}
    assert reg.changed_since(v) == {"3520200000003", "3520200000001"}
    got = list(reg.records_by_nids(["3520200000001", "3520200000001", "9"]))
    # By ID, label, record id; text compares by bytes on both ("R0" < "r1").
    assert [(r.record_id, r.label) for r in got] == [("R0", A), ("r1", B)]
    assert reg.distinct_labels() == sorted([A, B])
    deleted, missing = reg.delete(["r2", "nope"])
    assert (deleted, missing) == (1, ["nope"])
    assert reg.distinct_ids() == 2


def test_distinct_ids_are_counted_off_the_index(store: Store) -> None:
    """The distinct-ID count (declared in every handshake, recounted after changes)
    equals COUNT(DISTINCT nid) and, in SQLite, reads the ID index in order with no
    temporary b-tree (20x slower at 1M, and possibly a temporary file of IDs)."""
    from ispf_server.storage.registry import DISTINCT_IDS, DISTINCT_IDS_AFTER

    store.registry.upsert([rec(f"r{i}", f"35202{i % 7:08d}", A if i % 2 else B) for i in range(40)])
    assert store.registry.distinct_ids() == 7 == store.registry.stats()[1]
    if store.db.dialect == "sqlite":
        for sql in (DISTINCT_IDS, DISTINCT_IDS_AFTER):
            plan = " ".join(
                str(r)
                for r in store.db.fetchall("EXPLAIN QUERY PLAN " + sql, ("", 3)[: sql.count("?")])
            )
            assert "TEMP B-TREE" not in plan and "COVERING INDEX" in plan, sql


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 8])
def test_distinct_ids_counted_in_pieces_count_each_id_once(
    store: Store, piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A piece of the index per read (no long hold of the store's lock): an ID whose
    records straddle two pieces is counted once, and a last piece that is full ends
    with an empty one."""
    monkeypatch.setattr(type(store.registry), "COUNT_PIECE", piece)
    store.registry.upsert([rec(f"r{i}", f"35202{i % 7:08d}", A if i % 2 else B) for i in range(40)])
    assert store.registry._count_distinct() == 7


def test_label_codes_concatenate_in_id_order_in_batches(store: Store) -> None:
    nids = [f"35202{i:08d}" for i in range(50)]
    store.registry.upsert(
        [rec(f"r{i}", n, A if i % 2 else B) for i, n in enumerate(reversed(nids))]
    )
    w = code_bytes(1)
    text = "".join(store.registry.nid_label_codes([A], batch=7))
    want = "".join(n + label_code(2 if int(n[-2:]) % 2 != 49 % 2 else 1, w) for n in nids)
    assert len(text) == 50 * 14
    assert [text[i : i + 13] for i in range(0, len(text), 14)] == nids
    assert sorted(text) == sorted(want)


def test_sync_makes_the_registry_exactly_the_file(store: Store) -> None:
    reg = store.registry
    reg.upsert([rec("a", "3520200000001"), rec("b", "3520200000002"), rec("c", "3520200000003")])
    with reg.sync() as sync:
        sync.stage(
            [rec("a", "3520200000001"), rec("b", "3520200000009"), rec("d", "3520200000004")]
        )
        sync.stage([rec("d", "3520200000005", B)], kept=["c"])  # (repeated id: the last wins)
        counts, applied = sync.apply(lambda c: True)
    assert applied
    assert (counts.before, counts.inserted, counts.updated, counts.unchanged) == (3, 1, 1, 1)
    assert (counts.deleted, counts.kept) == (0, 1)
    got = sorted((r.record_id, r.nid, r.label) for r in reg.records())
    assert got == [
        ("a", "3520200000001", A),
        ("b", "3520200000009", A),
        ("c", "3520200000003", A),
        ("d", "3520200000005", B),
    ]
    with reg.sync() as sync:
        sync.stage([rec("a", "3520200000001")])
        counts, applied = sync.apply(lambda c: False)  # refused: nothing changes
    assert not applied and counts.deleted == 3 and len(reg.records()) == 4
    with reg.sync() as sync:
        sync.stage([rec("a", "3520200000001")])
        counts, applied = sync.apply(lambda c: True)
    assert applied and [r.record_id for r in reg.records()] == ["a"]
    assert store.registry.prune_changes(reg.version()) > 0


def test_sessions_matches_and_the_log_commit_together(store: Store) -> None:
    store.registry.upsert([rec("r1", "3520200000001"), rec("r2", "3520200000001", B)])
    ses = store.sessions
    ses.begin("s1", "sindh", "initiator", 1, "dedup", 1)
    assert ses.stage_matches("s1", [MatchRow("r1", A, B, b"\x01" * 16)])
    assert list(ses.matches("s1")) == []  # not shown until the commit
    totals = SessionTotals(2, 1, 3, 1, b"\x07" * 32, matched_records=1)
    idx = store.complete_session("s1", totals, entry=b"entry-1", matches_staged=True)
    assert idx == 0 and store.audit.index_of("s1") == 0
    row = ses.get("s1")
    assert row is not None and row.state == "COMPLETED" and row.result_digest == b"\x07" * 32
    assert [(m.record_id, m.tag) for m in ses.matches("s1", "r1")] == [("r1", b"\x01" * 16)]
    assert list(ses.matches("s1", "r2")) == []
    assert ses.match_holders("s1") == {"r1": "r1"}
    assert ses.matched_tags("s1") == [b"\x01" * 16]
    ses.begin("s2", "kp", "responder", 1, "dedup", 1)
    assert ses.stage_matches("s2", [MatchRow("r2", B, A, b"\x02" * 16)])
    assert store.fail_session("s2", "peer gone", b"entry-2", retriable=True)
    assert not store.fail_session("s2", "again", b"entry-3")  # one entry per session
    failed = ses.get("s2")
    assert failed is not None and failed.state == "FAILED" and failed.retriable == 1
    assert store.audit.entries() == [b"entry-1", b"entry-2"]
    assert [s.session_id for s in ses.latest_completed()] == ["s1"]
    assert ses.running() == []


def test_checkpoints_cosignatures_witnessed_budgets_meta(store: Store) -> None:
    log = store.audit
    log.add_checkpoint(1, "note-1")
    log.add_checkpoint(1, "other")  # (the first stays)
    log.add_checkpoint(2, "note-2")
    assert log.checkpoint() == (2, "note-2") and log.checkpoint(1) == (1, "note-1")
    assert log.recent_checkpoints(5) == [(2, "note-2"), (1, "note-1")]
    log.add_cosignature(2, "sindh", "line-a")
    log.add_cosignature(2, "sindh", "line-b")
    assert log.cosignatures(2) == ["line-b"]
    log.set_witnessed("kp", 3, "n3")
    log.set_witnessed("kp", 4, "n4")
    assert log.witnessed() == {"kp": (4, "n4")}
    row = store.budgets.charge("sindh", 1, 5, 100, "2026-12-01", lambda size, day: size // 10)
    assert row.charged and row.used == 5
    row = store.budgets.charge("sindh", 1, 6, 999, "2026-12-02", lambda size, day: size // 10)
    assert not row.charged and row.declared == 100 and row.refused == 1
    assert store.budgets.get("sindh", 1) == (100, 5, 1, "2026-12-01")
    store.meta.set("k", "v1")
    store.meta.set("k", "v2")
    assert store.meta.get("k") == "v2" and store.meta.get("none") is None


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path, url: str) -> None:
    s = open_store(tmp_path, url)
    assert s.meta.get("schema_version") == str(SCHEMA_VERSION)
    s.meta.set("schema_version", str(SCHEMA_VERSION + 1))
    s.close()
    with pytest.raises(ConfigError, match="newer than this node knows"):
        open_store(tmp_path, url)


def test_a_store_is_not_migrated_under_running_replicas_of_an_older_version(
    tmp_path: Path, url: str
) -> None:
    """A replica reads the schema version only when it starts: one of an older version
    still running would write the old tables' way under the new schema. Another
    replica starting a newer version refuses to migrate until every replica stops."""
    if not url:
        pytest.skip("replicas share a PostgreSQL store only")
    old = open_store(tmp_path, url)
    old.meta.set("schema_version", str(SCHEMA_VERSION - 1))  # (as an older one left it)
    with pytest.raises(ConfigError, match=r"1 replica\(s\) of an older ispf-node"):
        open_store(tmp_path, url)
    old.close()
    new = open_store(tmp_path, url)  # (none running: migrated)
    assert new.meta.get("schema_version") == str(SCHEMA_VERSION)
    new.close()


def test_the_master_key_must_be_the_stores(tmp_path: Path, url: str) -> None:
    from ispf.errors import KeyFileError

    open_store(tmp_path, url).close()
    (tmp_path / "master.key").rename(tmp_path / "old.key")
    with pytest.raises(KeyFileError):
        open_store(tmp_path, url)
    (tmp_path / "old.key").rename(tmp_path / "master.key")
    open_store(tmp_path, url).close()


def test_concurrent_appends_never_fork_the_log(tmp_path: Path, url: str) -> None:
    """Two stores over one database (two replicas' worth; on SQLite, two connections to
    one file) append at once: every index is used exactly once."""
    first = open_store(tmp_path, url)
    second = open_store(tmp_path, url)
    got: list[int] = []
    lock = threading.Lock()

    def append(s: Store, who: str) -> None:
        for i in range(40):
            idx = s.audit.append(f"{who}{i}", f"{who}{i}".encode())
            with lock:
                got.append(idx)

    threads = [
        threading.Thread(target=append, args=(s, w)) for s, w in ((first, "a"), (second, "b"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(80))
    assert len(first.audit.entries()) == 80
    first.close()
    second.close()


def test_a_replica_that_lost_its_lock_cannot_complete_a_session_failed_meanwhile(
    tmp_path: Path, url: str
) -> None:
    """The database restarted (or dropped an idle connection): replica A's liveness
    lock is gone, so B takes A for stopped and fails A's session. A, still running,
    must not then commit a result over that failure (no matches, no second entry);
    A's next keep-alive takes its lock again, and B then leaves A's sessions alone."""
    if not url:
        pytest.skip("replicas share a PostgreSQL store only")
    a, b = open_store(tmp_path, url), open_store(tmp_path, url)
    try:
        assert a.other_replicas() == 1 and b.other_replicas() == 1
        a.registry.upsert([rec("r1", "3520200000001")])
        a.sessions.begin("s1", "sindh", "initiator", 1, "reconciliation", 1)
        assert b.orphaned_sessions() == []  # A is alive
        for raw in list(a.db._held.values()):  # type: ignore[attr-defined]
            raw.close()  # (what a restart of the database does to A's lock)
        deadline = time.monotonic() + 10  # (the server lets go once its backend has exited)
        while not b.orphaned_sessions():
            assert time.monotonic() < deadline, "A's lock was never released"
            time.sleep(0.02)
        assert [s.session_id for s in b.orphaned_sessions()] == ["s1"]
        assert b.fail_session("s1", "the replica running it stopped", b"failed-entry")
        totals = SessionTotals(1, 1, 1, 1, b"\x07" * 32)
        with pytest.raises(RetryLater, match="failed meanwhile"):
            a.complete_session(
                "s1", totals, entry=b"completed-entry", matches=[MatchRow("r1", A, B, b"t")]
            )
        row = a.sessions.get("s1")
        assert row is not None and row.state == "FAILED"
        assert list(a.sessions.matches("s1")) == [] and a.audit.entries() == [b"failed-entry"]
        a.keep_alive()  # (the lock taken again)
        a.sessions.begin("s2", "kp", "initiator", 1, "reconciliation", 1)
        assert b.orphaned_sessions() == []
    finally:
        a.close()
        b.close()


def staged(store: Store, session_id: str | None) -> int:
    """A one-record own-ID run staged for sindh (epoch 1) as `session_id`'s; its
    generation."""
    stager = RunStager(store.db, "sindh", 1, session_id)
    run = stager.writer(pairruns.KINDS[0])
    run.append(b"3520200000001" + bytes(16) + pairruns.lsid(0))
    run.close()
    return stager.gen


def parts_of(store: Store, gen: int) -> int:
    row = store.db.fetchone("SELECT count(*) FROM pair_runs WHERE gen=?", (gen,))
    return int(row[0]) if row else 0


def test_failing_a_gone_replicas_session_leaves_a_live_ones_staging(
    tmp_path: Path, url: str
) -> None:
    """Replica A stopped during a session with sindh that staged runs; B, serving on,
    runs the next session of the pair (it holds the pair's lock and stages runs)
    when its sweep fails A's sessions. What A's session staged is dropped at once,
    lock or no lock (its generation is its own, and never made current now); B's
    staging stays (its commit would otherwise find its parts gone)."""
    if not url:
        pytest.skip("replicas share a PostgreSQL store only")
    a, b = open_store(tmp_path, url), open_store(tmp_path, url)
    try:
        b.pairs.key("sindh", 1)
        a.sessions.begin("s1", "sindh", "initiator", 1, "reconciliation", 1)
        a.sessions.begin("s2", "sindh", "initiator", 1, "reconciliation", 1)
        gone = staged(a, "s1")
        a.close()  # (stopped: its replica lock goes with its connections)
        deadline = time.monotonic() + 10
        while len(b.orphaned_sessions()) < 2:
            assert time.monotonic() < deadline, "A's lock was never released"
            time.sleep(0.02)
        b.sessions.begin("s3", "sindh", "initiator", 1, "reconciliation", 1)
        lock = b.pair_lock("sindh")
        assert lock.acquire(timeout=5)  # B's session of the pair
        try:
            live = staged(b, "s3")  # (A's is left: its session still runs)
            assert parts_of(b, gone) == 1
            assert b.fail_session("s1", "the replica running it stopped", None)
            assert parts_of(b, gone) == 0  # (A's own, dropped)
            assert parts_of(b, live) == 1  # (B's, kept)
            assert b.fail_session("s2", "the replica running it stopped", None)
            assert parts_of(b, live) == 1  # (s2 staged nothing: nothing of B's goes)
        finally:
            lock.release()
    finally:
        b.close()


def test_a_store_url_is_shown_without_its_password() -> None:
    from ispf_server.storage.postgres import redact

    assert redact("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact("postgresql:///x?host=/run&password=s3cret&user=u") == (
        "postgresql:///x?host=/run&password=***&user=u"
    )
    assert (
        redact("postgresql://u:s@[::1]:5/x?PASSWORD=s")
        == "postgresql://u:***@[::1]:5/x?PASSWORD=***"
    )
    assert redact("postgresql:///x?host=/run") == "postgresql:///x?host=/run"


def test_a_database_user_without_rights_is_told_what_to_do(
    tmp_path: Path, pg_server: object, url: str
) -> None:
    if not url:
        pytest.skip("PostgreSQL only")
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP ROLE IF EXISTS ispf_lowpriv")
        db.execute("CREATE ROLE ispf_lowpriv LOGIN")
    low = url.replace("user=ispf", "user=ispf_lowpriv")
    with pytest.raises(ConfigError, match="refused this node's user"):
        open_store(tmp_path, low)
    with pytest.raises(StoreUnavailable, match='invalid integer value "notaport"'):
        open_store(tmp_path, url + "&port=notaport")


def reopened_from_version_3(tmp_path: Path, url: str, *statements: str) -> Store:
    """A store changed by `statements` and marked schema version 3, opened again (so
    migrated to the current version)."""
    s = open_store(tmp_path, url)
    with s.db.transaction() as cur:
        for sql in statements:
            cur.execute(sql)
    s.meta.set("schema_version", "3")
    s.close()
    return open_store(tmp_path, url)


def test_a_store_of_version_3_counts_generations_past_those_it_holds(
    tmp_path: Path, url: str
) -> None:
    """Version 4 numbers pair runs' generations store-wide, each once: a store from
    before starts the count past every generation it holds."""
    s = reopened_from_version_3(
        tmp_path,
        url,
        "INSERT INTO pair_gen VALUES ('sindh', 1, 41)",
        "INSERT INTO pair_labelsets VALUES ('sindh', 2, 57, 0, '[]')",
        "DELETE FROM pair_gen_last",
    )
    try:
        assert s.meta.get("schema_version") == str(SCHEMA_VERSION) == "5"
        assert s.db.fetchone("SELECT gen FROM pair_gen_last") == (57,)
        s.pairs.key("kp", 1)
        with s.db.transaction() as cur:
            assert pairruns.new_generation(cur, "kp", 1) == 58
    finally:
        s.close()


def test_a_version_3_count_behind_the_generations_held_is_moved_past_them(
    tmp_path: Path, url: str
) -> None:
    """A store run at version 3 by code that kept the count, then by code that numbered
    current+1 (both say version 3): the count lags what the store holds. The
    migration starts it past both, and a count that lags anyway (a store edited by
    hand) never numbers a staging as the pair's current generation."""
    s = reopened_from_version_3(
        tmp_path,
        url,
        "INSERT INTO pair_keys VALUES ('sindh', 1, 0, '2026-01-01')",
        "INSERT INTO pair_gen VALUES ('sindh', 1, 41)",
        "UPDATE pair_gen_last SET gen = 40",
    )
    try:
        assert s.db.fetchone("SELECT gen FROM pair_gen_last") == (41,)
        with s.db.transaction() as cur:
            assert pairruns.new_generation(cur, "sindh", 1) == 42
            cur.execute("UPDATE pair_gen_last SET gen = 3")  # (behind again)
            cur.execute(
                "INSERT INTO pair_runs VALUES ('sindh', 1, 42, 'own_nid', 0, ?, ?)",
                (b"k", b"d"),
            )
            assert pairruns.new_generation(cur, "sindh", 1) == 43
    finally:
        s.close()


def test_a_store_of_version_4_records_each_sessions_staging(tmp_path: Path, url: str) -> None:
    """Version 5 adds `sessions.staged_gen`; a session running at the upgrade (it
    staged before its staging was recorded) has none, and its failure drops nothing,
    leaving its runs to the pair's next staging."""
    s = open_store(tmp_path, url)
    s.pairs.key("sindh", 1)
    s.sessions.begin("s1", "sindh", "initiator", 1, "reconciliation", 1)
    gen = staged(s, None)
    with s.db.transaction() as cur:
        cur.execute("ALTER TABLE sessions DROP COLUMN staged_gen")
    s.meta.set("schema_version", "4")
    s.close()
    s = open_store(tmp_path, url)
    try:
        assert s.meta.get("schema_version") == "5" and "staged_gen" in s.db.columns("sessions")
        assert s.sessions.get("s1").staged_gen is None  # type: ignore[union-attr]
        assert s.fail_session("s1", "node restarted during session", None)
        assert parts_of(s, gen) == 1
        s.sessions.begin("s2", "sindh", "initiator", 1, "reconciliation", 1)
        assert parts_of(s, staged(s, "s2")) == 1 and parts_of(s, gen) == 0
    finally:
        s.close()


def test_a_failing_session_drops_what_it_staged_and_nothing_else(store: Store) -> None:
    """Stagings are recorded per session. Session A stages, then loses the pair (on
    PostgreSQL, a replica whose lock connection dropped, while replica B took the
    lock); B stages, and A's staging is left, its session still running. A one-off
    session of the pair (no lock, nothing staged) fails: both stay. A fails,
    believing it still holds the lock: only its own goes, and B can still make its
    staging current. A session that fails drops its own."""
    store.pairs.key("sindh", 1)
    for sid in ("one-off", "a", "b", "c"):
        store.sessions.begin(sid, "sindh", "initiator", 1, "reconciliation", 1)
    first = staged(store, "a")
    second = staged(store, "b")
    assert parts_of(store, first) == 1 and parts_of(store, second) == 1
    assert store.fail_session("one-off", "aborted by sindh: gone", None)
    assert parts_of(store, first) == 1 and parts_of(store, second) == 1
    assert store.fail_session("a", "peer gone", None)
    assert parts_of(store, first) == 0
    assert parts_of(store, second) == 1  # (B's, kept: the old rule dropped it)
    assert store.sessions.get("b").staged_gen == second  # type: ignore[union-attr]
    with store.db.transaction() as cur:
        pairruns.activate(cur, "sindh", 1, pairruns.Staged(second, {"own_nid": 1}))
    assert store.db.fetchone("SELECT gen FROM pair_gen WHERE peer='sindh'") == (second,)
    third = staged(store, "c")
    assert parts_of(store, third) == 1
    assert store.fail_session("c", "peer gone", None)
    assert parts_of(store, third) == 0


def test_a_new_staging_drops_only_stagings_no_running_session_writes(store: Store) -> None:
    """A staging of the pair (a session's or a compaction's) drops what a failed
    session, a stopped node or a compaction left, and leaves a running session's."""
    store.pairs.key("sindh", 1)
    for sid in ("running", "failed", "next"):
        store.sessions.begin(sid, "sindh", "initiator", 1, "reconciliation", 1)
    running = staged(store, "running")
    unrecorded = staged(store, None)  # (a compaction's, say)
    assert parts_of(store, running) == 1 and parts_of(store, unrecorded) == 1
    failed = staged(store, "failed")
    assert parts_of(store, unrecorded) == 0 and parts_of(store, running) == 1
    assert store.fail_session("failed", "peer gone", None, keep_staging=True)  # (kept)
    assert parts_of(store, failed) == 1
    staged(store, "next")
    assert parts_of(store, failed) == 0 and parts_of(store, running) == 1


def test_a_compactions_commit_leaves_a_running_sessions_staging_whole(store: Store) -> None:
    """Session A has staged the pair's runs and their label sets; a compaction of the
    pair (another replica's, while A believes it still holds the lock) stages and
    commits, leaving the old runs to drop after. A's staging is still whole, label
    sets too, so A's commit makes a whole state current; a staging whose label sets
    are gone is never made current (StagingLost)."""
    store.pairs.key("sindh", 1)
    store.sessions.begin("a", "sindh", "initiator", 1, "reconciliation", 1)

    def stage(session_id: str | None) -> pairruns.Staged:
        stager = RunStager(store.db, "sindh", 1, session_id)
        run = stager.writer(pairruns.KINDS[0])
        run.append(b"3520200000001" + bytes(16) + pairruns.lsid(0))
        run.close()
        return stager.done({"[]": 0})

    first = stage("a")
    compacted = stage(None)
    with store.db.transaction() as cur:
        pairruns.activate(cur, "sindh", 1, compacted, keep_old=True)
    labelsets = "SELECT count(*) FROM pair_labelsets WHERE gen=?"
    assert store.db.fetchone(labelsets, (first.gen,)) == (1,)
    with store.db.transaction() as cur:
        pairruns.activate(cur, "sindh", 1, first)
    assert store.db.fetchone("SELECT gen FROM pair_gen WHERE peer='sindh'") == (first.gen,)
    assert store.db.fetchone(labelsets, (first.gen,)) == (1,)
    store.sessions.begin("b", "sindh", "initiator", 1, "reconciliation", 1)
    second = stage("b")
    store.db.write("DELETE FROM pair_labelsets WHERE gen=?", (second.gen,))
    with pytest.raises(StagingLost), store.db.transaction() as cur:
        pairruns.activate(cur, "sindh", 1, second)
    assert store.db.fetchone("SELECT gen FROM pair_gen WHERE peer='sindh'") == (first.gen,)


def test_a_session_failed_by_another_drops_what_it_staged_when_it_fails_itself(
    store: Store,
) -> None:
    """A session failed meanwhile by another (a replica's sweep, while this one was
    cut off from the store) goes on writing runs, then fails itself: `fail_session`
    says it was not running, and drops its staging all the same (never made current
    now)."""
    store.pairs.key("sindh", 1)
    store.sessions.begin("s1", "sindh", "initiator", 1, "reconciliation", 1)
    stager = RunStager(store.db, "sindh", 1, "s1")
    assert store.fail_session("s1", "the replica running it stopped", None)
    run = stager.writer(pairruns.KINDS[0])  # (written on after that drop)
    run.append(b"3520200000001" + bytes(16) + pairruns.lsid(0))
    run.close()
    assert parts_of(store, stager.gen) == 1
    assert not store.fail_session("s1", "peer gone", None)
    assert parts_of(store, stager.gen) == 0
    assert not store.fail_session("unknown", "peer gone", None)  # (no such session)


def test_a_generation_that_could_not_be_dropped_is_logged(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A drop that fails (the database gone for a moment) is not raised into the
    session's failure, but it is not silent either: what is left, and who drops it."""
    from ispf_server.storage.pairs.staging import drop_generation

    store.pairs.key("sindh", 1)
    gen = staged(store, None)

    def gone(*args: object, **kwargs: object) -> object:
        raise StoreUnavailable("the database cannot be reached (test)")

    monkeypatch.setattr(store.db, "transaction", gone)
    with caplog.at_level("WARNING"):
        drop_generation(store.db, "sindh", 1, gen)
    monkeypatch.undo()
    assert parts_of(store, gen) == 1
    assert f"generation {gen} not dropped (StoreUnavailable)" in caplog.text
    assert "next start drops it" in caplog.text


def test_a_session_that_failed_stages_nothing(store: Store) -> None:
    """A session failed (by an Abort, its idle expiry, a sweep) before its matching
    began to stage: the staging is refused, and nothing is written."""
    store.pairs.key("sindh", 1)
    store.sessions.begin("s1", "sindh", "initiator", 1, "reconciliation", 1)
    assert store.fail_session("s1", "aborted by sindh", None)
    last = store.db.fetchone("SELECT gen FROM pair_gen_last")
    with pytest.raises(SessionAborted, match="no longer running"):
        staged(store, "s1")
    assert store.db.fetchone("SELECT count(*) FROM pair_runs") == (0,)
    assert store.db.fetchone("SELECT gen FROM pair_gen_last") == last
    assert store.sessions.get("s1").staged_gen is None  # type: ignore[union-attr]


def test_a_failed_sessions_staging_is_dropped_after_its_matching_ends(store: Store) -> None:
    """`keep_staging`: the session fails, and what it staged stays until the caller
    drops it (`drop_staging`), once its matching thread has ended."""
    store.pairs.key("sindh", 1)
    store.sessions.begin("s1", "sindh", "initiator", 1, "reconciliation", 1)
    gen = staged(store, "s1")
    assert store.fail_session("s1", "idle too long", None, keep_staging=True)
    assert parts_of(store, gen) == 1
    store.drop_staging("s1")
    assert parts_of(store, gen) == 0
