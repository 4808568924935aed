"""A full run's input, read in one pass without per-record objects, equals what the
record-by-record path (eligible records, grouped by ID) gives."""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from pathlib import Path

import pytest

from ispf.errors import NotPacked
from ispf.nid import PackedNids
from ispf.records import Label
from ispf_server.policy import PeerPolicy
from ispf_server.records import TagSpool, ops, spool
from ispf_server.session import plan as planning
from ispf_server.session.match import Matched, kept
from ispf_server.session.plan import LabelSet
from ispf_server.storage import Store
from ispf_server.storage.registry import StoredRecord
from ispf_server.storage.sessions import MatchRow, SessionTotals


def eligible_records(
    store: Store, pp: PeerPolicy, collections: frozenset[str], *, labelled: bool
) -> list[StoredRecord]:
    """The reference: every own record a session with the peer may include, one by one."""
    records = store.registry.records(collections or pp.collections)
    return [r for r in records if pp.may_learn(r.label)] if labelled else records


LABELS = [
    Label("BISP", "enrolled"),
    Label("BISP", "eligible"),
    Label("PSER", "eligible"),
    Label("SEHAT", "enrolled"),
]
POLICIES = [
    PeerPolicy("sindh", frozenset()),
    PeerPolicy("sindh", frozenset(), collections=frozenset({"BISP", "PSER"})),
    PeerPolicy("sindh", frozenset(), disclose=("BISP/*", "SEHAT/enrolled")),
    PeerPolicy("sindh", frozenset(), collections=frozenset({"NONE"})),  # nothing may go
]


def spooled(directory: Path, *parts: bytes) -> TagSpool:
    """Tags as a session holds them: spooled to disk as they come."""
    tags = TagSpool(directory)
    for part in parts:
        tags.append(part)
    return tags


def _coded_pass(store: Store, pp: PeerPolicy) -> tuple[dict[str, bytearray], int]:
    """What `planning._coded_label_sets` gives, gathered: IDs by label set, records."""
    allowed = planning._allowed_labels(store, pp)
    assert allowed is not None
    by_text: dict[str, bytearray] = defaultdict(bytearray)
    count = 0
    for text, nids, records in planning._coded_label_sets(store, allowed):
        by_text[text] += nids
        count += records
    return by_text, count


def _gather(into: list[list[MatchRow]], rows: list[MatchRow]) -> bool:
    into.append(rows)
    return True


@pytest.mark.parametrize("batch", [7, 500_000])
@pytest.mark.parametrize("module", ["native", "python"])
@pytest.mark.parametrize("pp", POLICIES)
def test_one_pass_equals_the_record_path(
    tmp_path: Path, pp: PeerPolicy, module: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full-run pass (SQLite's coded strings, sorted and split in C or in Python),
    in batches small and large, gives what the record-by-record path gives."""
    if module == "python":
        monkeypatch.setattr(ops, "native", None)
    elif ops.native is None:
        pytest.skip("the native module is not built here")
    rng = random.Random(5)
    nids = [f"35202{i:08d}" for i in range(300)]
    # Most IDs hold one record; some several, some of them under the same label.
    records = [StoredRecord(f"r{i}", rng.choice(nids), rng.choice(LABELS)) for i in range(900)]
    records += [StoredRecord(f"d{i}", n, LABELS[2]) for i, n in enumerate(nids[:40])]
    # IDs with more records than a small batch holds (batches end on ID boundaries).
    records += [StoredRecord(f"m{i}", nids[i % 2], LABELS[i % 4]) for i in range(30)]
    store = Store(tmp_path / "s.sqlite")
    store.registry.upsert(records)
    monkeypatch.setattr(
        store.registry,
        "nid_label_codes",
        functools.partial(store.registry.nid_label_codes, batch=batch),
    )
    by_text, count = _coded_pass(store, pp)
    got = {n.decode(): text for text, members in by_text.items() for n in PackedNids(members)}
    eligible = eligible_records(store, pp, frozenset(), labelled=True)
    assert got == planning._label_sets(eligible)
    assert count == len(eligible)
    assert sum(len(PackedNids(m)) for m in by_text.values()) == len(got)  # each ID once


@pytest.mark.parametrize("module", ["native", "python"])
def test_more_labels_than_one_character_codes_take_two(
    tmp_path: Path, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 243 labels each label's code takes two characters (none of them a digit
    or NUL); the pass still gives what the record path gives."""
    from ispf_server.storage import registry

    if module == "python":
        monkeypatch.setattr(ops, "native", None)
    elif ops.native is None:
        pytest.skip("the native module is not built here")
    many = [Label(f"P{i:03d}", "enrolled") for i in range(300)]
    rng = random.Random(6)
    nids = [f"35202{i:08d}" for i in range(400)]
    records = [StoredRecord(f"r{i}", rng.choice(nids), rng.choice(many)) for i in range(1200)]
    records += [StoredRecord(f"l{i}", rng.choice(nids), lb) for i, lb in enumerate(many)]
    store = Store(tmp_path / "s.sqlite")
    store.registry.upsert(records)
    pp = PeerPolicy("sindh", frozenset(), disclose=tuple(f"P{i:03d}/*" for i in range(250)))
    allowed = planning._allowed_labels(store, pp)
    assert len(allowed) == 250 and registry.code_bytes(len(allowed)) == 2
    by_text, count = _coded_pass(store, pp)
    got = {n.decode(): text for text, members in by_text.items() for n in PackedNids(members)}
    eligible = eligible_records(store, pp, frozenset(), labelled=True)
    assert got == planning._label_sets(eligible) and count == len(eligible)
    for width in (1, 2):
        top = registry.MAX_CODED_LABELS + 1 if width == 2 else 244
        for value in (1, 2, 48, 57, 244, top):
            code = registry.label_code(value, width).encode("latin-1")
            assert len(code) == width and not any(c == 0 or 0x30 <= c <= 0x39 for c in code)
            assert registry.code_value(int.from_bytes(code, "big"), width) == value
    with pytest.raises(ValueError, match="labels can be coded"):
        registry.code_bytes(registry.MAX_CODED_LABELS + 1)


@pytest.mark.parametrize("budget", [100, 1 << 20])
@pytest.mark.parametrize("pp", POLICIES)
def test_a_spooled_plan_is_the_in_memory_plan_shuffled_on_disk(
    tmp_path: Path, pp: PeerPolicy, budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full run's plan, made by an external sort (spilled in pieces with a small
    budget) and kept on disk, holds the same groups in the same order, the same
    IDs in each, and the same record count as the in-memory plan; each group is
    shuffled afresh; closing it leaves nothing in the store directory."""
    from ispf_server.records import SpooledNids, extsort
    from ispf_server.session.plan import shuffled_plan

    monkeypatch.setattr(extsort, "BUDGET", budget)
    monkeypatch.setattr(extsort, "MIN_BLOCK", 1)
    rng = random.Random(11)
    nids = [f"35202{i:08d}" for i in range(600)]
    records = [StoredRecord(f"r{i}", rng.choice(nids), rng.choice(LABELS)) for i in range(1500)]
    (tmp_path / "store").mkdir()
    store = Store(tmp_path / "store" / "s.sqlite")
    store.registry.upsert(records)
    before = set((tmp_path / "store").iterdir())
    by_text, count = _coded_pass(store, pp)
    want = shuffled_plan({planning.labels_of(t): m for t, m in by_text.items()}, own_records=count)
    plans = [planning.spooled_plan(store, pp) for _ in range(2)]
    for plan in plans:
        assert plan is not None and isinstance(plan.order, SpooledNids)
        assert (plan.groups, plan.sizes, plan.own_records) == (
            want.groups,
            want.sizes,
            want.own_records,
        )
        pos = 0
        for size in plan.sizes:
            assert sorted(plan.order[pos : pos + size]) == sorted(want.order[pos : pos + size])
            pos += size
        assert b"".join(c.data for c in plan.chunks(7)) == bytes(plan.order[0 : plan.total].data)
    if want.total > 100:  # each plan shuffled afresh, not in ID order
        first, second = (list(p.order) for p in plans if p is not None)
        assert first != second and first != sorted(first)
    for plan in plans:
        assert plan is not None
        plan.close()
    assert set((tmp_path / "store").iterdir()) == before  # (the files were unlinked)


def test_full_prepare_plans_every_id_once_in_label_set_groups(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.registry.upsert(
        [
            StoredRecord("a", "3520200000001", LABELS[0]),
            StoredRecord("b", "3520200000001", LABELS[2]),
            StoredRecord("c", "3520200000002", LABELS[0]),
            StoredRecord("d", "3520200000003", LABELS[3]),
        ]
    )
    side = planning.prepare(store, POLICIES[0], "sindh", 1, incremental=False)
    plan = side.plan
    assert side.own_records == 4
    assert sorted(plan.order) == [b"3520200000001", b"3520200000002", b"3520200000003"]
    assert dict(zip(plan.groups, plan.sizes, strict=True)) == {
        (LABELS[0],): 1,
        (LABELS[0], LABELS[2]): 1,
        (LABELS[3],): 1,
    }


def _row_key(m: MatchRow) -> tuple[str, str]:
    return m.record_id, repr(m)  # (its repr leaves out the record)


def _full_run(
    store: Store,
    tag_of: dict[str, bytes],
    groups: list[LabelSet],
    sizes: list[int],
    peer: bytes,
    stage: list[list[MatchRow]] | None,
) -> tuple[Matched, tuple[object, ...]]:
    """A full run's result, and its state as stored once committed."""
    from ispf_server.storage.pairs import deltas, lookups

    side = planning.prepare(store, POLICIES[2], "sindh", 1, incremental=False)
    own = b"".join(tag_of[n.decode()] for n in side.plan.order)
    own_in = spooled(store.directory, own[:160], own[160:])
    res = kept.finish(
        side,
        own_in,
        groups,
        sizes,
        spooled(store.directory, peer),
        [],
        stage_rows=None if stage is None else functools.partial(_gather, stage),
        session_id=None,
    )
    # The runs are staged in the store as they are built (a generation that is not
    # current yet); no per-ID groups are kept.
    assert res.delta is not None and res.delta.staged is not None
    assert not res.delta.own_added and not res.delta.peer_added
    nids = list(tag_of)
    assert lookups.own_by_nids(store.db.conn, "sindh", 1, nids) == {}  # not yet current
    cur = store.db.conn.cursor()
    cur.execute("BEGIN")
    deltas.apply_delta(cur, "sindh", 1, res.delta)
    cur.execute("COMMIT")
    state = (
        lookups.own_by_nids(store.db.conn, "sindh", 1, nids),
        lookups.peer_by_tags(
            store.db.conn,
            "sindh",
            1,
            sorted(set(tag_of.values()) | set(peer[i : i + 16] for i in range(0, len(peer), 16))),
        ),
        sorted(lookups.matched_state(store.db.conn, "sindh", 1)),
    )
    return res, state


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("module", ["native", "python"])
def test_a_full_run_gives_the_expected_result_fingerprints_and_state(
    tmp_path: Path, seed: int, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full run (sorted runs joined on the tag, within the sort budget, with or
    without the C module) gives the result, fingerprints and stored state worked out
    here from the records and the tags: a tag the peer sent twice is stored once,
    with the labels of the last group holding it, and counts once in its
    fingerprint."""
    from ispf.blinding import result_digest
    from ispf_server.records import extsort
    from ispf_server.storage.pairs import runs as pairruns
    from ispf_server.storage.pairs.staging import StagedRun
    from ispf_server.storage.pairs.state import OwnTag, fingerprint, labels_of, labels_text

    if module == "python":
        monkeypatch.setattr(ops, "native", None)
    elif ops.native is None:
        pytest.skip("the native module is not built here")
    rng = random.Random(seed)
    nids = [f"35202{i:08d}" for i in range(400)]
    records = [StoredRecord(f"r{i}", rng.choice(nids), rng.choice(LABELS)) for i in range(700)]
    tag_of = {n: random.Random(n).randbytes(16) for n in nids}
    peer_ids = rng.sample(nids, 250)
    fresh = [tag_of[n] for n in peer_ids] + [rng.randbytes(16) for _ in range(50)]
    groups = [(LABELS[1],), (LABELS[0], LABELS[3])]
    pp = POLICIES[2]
    # The peer sending tags again: some of its first group's in its second (the second's
    # labels are kept), some of the second's twice more.
    again = fresh[:7] + fresh[200:203] * 2
    for peer_tags in (fresh, fresh + again):
        sizes = [120, len(peer_tags) - 120]
        # What to expect, from the records and the tags.
        own_labels: dict[str, list[Label]] = defaultdict(list)
        for r in records:
            if pp.may_learn(r.label):
                own_labels[r.nid].append(r.label)
        own_state = {
            n: OwnTag(labels_text(tuple(sorted(set(v)))), tag_of[n]) for n, v in own_labels.items()
        }
        peer_text: dict[bytes, str] = {}
        pos = 0
        for group, size in zip(groups, sizes, strict=True):
            for t in peer_tags[pos : pos + size]:
                peer_text[t] = labels_text(group)
            pos += size
        matched = sorted(
            (n, tag_of[n], peer_text[tag_of[n]]) for n in own_labels if tag_of[n] in peer_text
        )
        want_rows = sorted(
            (
                MatchRow(r.record_id, r.label, pl, tag_of[r.nid])
                for r in records
                if r.nid in own_labels and tag_of[r.nid] in peer_text and pp.may_learn(r.label)
                for pl in labels_of(peer_text[tag_of[r.nid]])
            ),
            key=_row_key,
        )
        want_fps = fingerprint({tag_of[n] for n in own_labels}) + fingerprint(set(peer_text))
        assert len(matched) > 0
        # The spooled tags read back in large chunks and in small ones (which cross the
        # groups' edges); again with a sort budget of a few records (every run spilled
        # in pieces and merged a record of each at a time, runs staged in parts of a
        # few records) and its rows staged in batches as found.
        for chunk, small in [(spool.CHUNK, False), (7, False), (7, True)]:
            store = Store(tmp_path / f"{len(peer_tags)}-{chunk}{small}.sqlite")
            store.registry.upsert(records)
            with monkeypatch.context() as m:
                m.setattr(spool, "CHUNK", chunk)
                if small:
                    m.setattr(extsort, "BUDGET", 100)
                    m.setattr(extsort, "MIN_BLOCK", 1)
                    m.setattr(kept, "ROW_BATCH", 3)
                    m.setattr(StagedRun, "FLUSH", 1)
                    m.setattr(pairruns, "PART_RECORDS", 2)
                staged: list[list[MatchRow]] = []
                res, state = _full_run(
                    store, tag_of, groups, sizes, b"".join(peer_tags), staged if small else None
                )
            o = res.outcome
            rows = sorted(o.matches, key=_row_key)
            if small:  # the rows went to the store as found, a batch at a time
                assert o.matches == [] and len(staged) > 1
                rows = sorted((m for batch in staged for m in batch), key=_row_key)
                assert o.matched_records == len({m.record_id for m in rows})
            assert o.match_count == len(matched)
            assert o.digest == result_digest([t for _, t, _ in matched])
            assert rows == want_rows
            assert res.state_after == want_fps
            assert state == (own_state, {t: peer_text[t] for t in sorted(peer_text)}, matched)
            store.close()


@pytest.mark.parametrize("module", ["native", "python"])
def test_a_tag_sent_twice_keeps_its_last_group_even_where_label_sets_repeat(
    tmp_path: Path, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer announcing one label set in two groups (an honest one never does) and
    sending a tag in two groups: the tag is stored with the labels of the last
    group that holds it, as where each label set comes once."""
    from ispf_server.storage.pairs.state import fingerprint, labels_text

    if module == "python":
        monkeypatch.setattr(ops, "native", None)
    elif ops.native is None:
        pytest.skip("the native module is not built here")
    nids = [f"35202{i:08d}" for i in range(40)]
    store = Store(tmp_path / "s.sqlite")
    store.registry.upsert([StoredRecord(f"r{i}", n, LABELS[0]) for i, n in enumerate(nids)])
    tag_of = {n: random.Random(n).randbytes(16) for n in nids}
    groups: list[LabelSet] = [(LABELS[1],), (LABELS[2],), (LABELS[1],)]
    t = [tag_of[n] for n in nids[:30]]
    # t[0] in groups 0 and 1 (group 1's labels kept), t[12] in groups 1 and 2 (group 2's),
    # t[25] twice in group 2.
    sent = [t[0:10], [*t[10:20], t[0]], [*t[20:30], t[12], t[25]]]
    peer_text: dict[bytes, str] = {}
    for group, part in zip(groups, sent, strict=True):
        peer_text.update(dict.fromkeys(part, labels_text(group)))
    assert peer_text[t[0]] == labels_text(groups[1]) and peer_text[t[12]] == labels_text(groups[2])
    sizes = [len(p) for p in sent]
    res, (_, peer_state, matched) = _full_run(
        store, tag_of, groups, sizes, b"".join(b"".join(p) for p in sent), None
    )
    assert res.outcome.match_count == 30
    assert peer_state == peer_text
    assert matched == sorted((n, tag_of[n], peer_text[tag_of[n]]) for n in nids[:30])
    assert res.state_after[len(res.state_after) // 2 :] == fingerprint(set(peer_text))


def test_reading_in_batches_misses_and_repeats_nothing(tmp_path: Path) -> None:
    from ispf_server.storage.registry import code_bytes, code_value

    store = Store(tmp_path / "s.sqlite")
    rng = random.Random(3)
    records = [
        StoredRecord(f"r{i}", f"35202{rng.randrange(40):08d}", rng.choice(LABELS))
        for i in range(500)
    ]
    store.registry.upsert(records)
    asked = LABELS[:3]  # (the fourth is "another label")
    want = sorted((r.nid, asked.index(r.label) + 2 if r.label in asked else 1) for r in records)
    cb = code_bytes(len(asked))
    for batch in (1, 7, 64, 499, 500, 501):
        got = []
        for text in store.registry.nid_label_codes(asked, batch=batch):
            data = text.encode("latin-1")
            for at in range(0, len(data), 13 + cb):
                raw = int.from_bytes(data[at + 13 : at + 13 + cb], "big")
                got.append((data[at : at + 13].decode(), code_value(raw, cb)))
        assert sorted(got) == want, batch


def test_staged_match_rows_show_only_once_the_session_completes(tmp_path: Path) -> None:
    from ispf_server.storage.sessions import MatchRow

    store = Store(tmp_path / "s.sqlite")
    rows = [MatchRow("r1", LABELS[0], LABELS[1], b"t" * 16)]
    for sid, completes in (("s-ok", True), ("s-failed", False)):
        store.sessions.begin(sid, "sindh", "initiator", 1, "reconciliation", 1)
        store.sessions.stage_matches(sid, rows)
        assert list(store.sessions.matches(sid)) == [] and store.sessions.matched_tags(sid) == []
        if completes:
            store.complete_session(
                sid,
                SessionTotals(
                    own_records=1,
                    own_values=1,
                    peer_values=1,
                    match_count=1,
                    result_digest=b"d",
                ),
                matches=rows,
                entry=b'{"type":"session"}',
                matches_staged=True,
            )
            assert list(store.sessions.matches(sid)) == rows  # once, not twice
        else:
            assert store.fail_session(sid, "peer gone", None)
            count = store.db.conn.execute(
                "SELECT count(*) FROM matches WHERE session_id=?", (sid,)
            ).fetchone()
            assert count == (0,)  # the staged rows are gone with the session
    # A session already failed stages nothing.
    store.sessions.stage_matches("s-failed", rows)
    assert store.db.conn.execute("SELECT count(*) FROM matches").fetchone() == (1,)


def test_match_rows_staged_in_batches_as_found_count_once_and_go_with_a_failure(
    tmp_path: Path,
) -> None:
    from ispf_server.storage.sessions import MatchRow

    store = Store(tmp_path / "s.sqlite")
    batches = [
        [
            MatchRow("r1", LABELS[0], LABELS[1], b"t" * 16),
            MatchRow("r1", LABELS[0], LABELS[2], b"t" * 16),
        ],
        [MatchRow("r2", LABELS[1], LABELS[1], b"u" * 16)],
    ]
    for sid, completes in (("s-ok", True), ("s-failed", False)):
        store.sessions.begin(sid, "sindh", "initiator", 1, "reconciliation", 1)
        assert all(store.sessions.stage_matches(sid, b) for b in batches)
        assert list(store.sessions.matches(sid)) == []  # not before the session completes
        if completes:
            store.complete_session(
                sid,
                SessionTotals(
                    own_records=2,
                    own_values=2,
                    peer_values=2,
                    match_count=2,
                    result_digest=b"d",
                    matched_records=2,
                ),
                matches=[],
                entry=b'{"type":"session"}',
                matches_staged=True,
            )
            assert sorted(store.sessions.matches(sid), key=repr) == sorted(
                batches[0] + batches[1], key=repr
            )
            row = store.db.conn.execute(
                "SELECT matched_records FROM sessions WHERE session_id=?", (sid,)
            ).fetchone()
            assert row == (2,)
            # Staged pieces are committed without a sync of their own; every other
            # write still is (synchronous=FULL, 2, is back after each staging).
            assert store.db.conn.execute("PRAGMA synchronous").fetchone() == (2,)
        else:
            assert store.fail_session(sid, "peer gone", None)
            # The session is gone: later batches are not written, and those staged went.
            assert not store.sessions.stage_matches(sid, batches[0])
            count = store.db.conn.execute(
                "SELECT count(*) FROM matches WHERE session_id=?", (sid,)
            ).fetchone()
            assert count == (0,)


def test_runs_staged_one_at_a_time_become_state_on_commit_or_go_on_failure(
    tmp_path: Path,
) -> None:
    from ispf_server.storage.pairs import lookups
    from ispf_server.storage.pairs import runs as pairruns

    rng = random.Random(9)
    nids = [f"35202{i:08d}" for i in range(300)]
    records = [StoredRecord(f"r{i}", n, LABELS[1]) for i, n in enumerate(nids)]
    tag_of = {n: rng.randbytes(16) for n in nids}
    peer = b"".join(tag_of[n] for n in nids[:100]) + rng.randbytes(16 * 20)
    store = Store(tmp_path / "s.sqlite")
    store.registry.upsert(records)

    def staged_run(sid: str) -> kept.Matched:
        store.sessions.begin(sid, "sindh", "initiator", 1, "reconciliation", 1)
        side = planning.prepare(store, POLICIES[0], "sindh", 1, incremental=False)
        own = b"".join(tag_of[n.decode()] for n in side.plan.order)
        return kept.finish(
            side,
            spooled(tmp_path, own),
            [(LABELS[0],)],
            [120],
            spooled(tmp_path, peer),
            [],
            session_id=sid,
        )

    def generations() -> set[int]:
        rows = store.db.conn.execute("SELECT DISTINCT gen FROM pair_runs").fetchall()
        return {g for (g,) in rows}

    # A failed session leaves neither its rows nor the runs it staged.
    failed = staged_run("s-failed")
    assert failed.delta.staged is not None and generations() == {failed.delta.staged.gen}
    assert store.fail_session("s-failed", "peer gone", None)
    assert generations() == set() and pairruns.current(store.db.conn, "sindh", 1) is None
    # A completed one makes its staged runs the pair's state.
    ok = staged_run("s-ok")
    store.sessions.stage_matches("s-ok", ok.outcome.matches)
    store.complete_session(
        "s-ok",
        SessionTotals(
            own_records=300,
            own_values=300,
            peer_values=120,
            match_count=ok.outcome.match_count,
            result_digest=ok.outcome.digest,
        ),
        matches=ok.outcome.matches,
        entry=b'{"type":"session"}',
        matches_staged=True,
        pair_delta=("sindh", 1, ok.delta),
    )
    assert ok.outcome.match_count == 100
    assert ok.delta.staged is not None
    assert pairruns.current(store.db.conn, "sindh", 1) == ok.delta.staged.gen
    assert len(lookups.own_by_nids(store.db.conn, "sindh", 1, nids)) == 300


def test_registry_changes_every_pair_has_seen_are_pruned_in_batches(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    for v in range(3):  # three registry versions, 10 changed IDs each
        store.registry.upsert(
            [StoredRecord(f"r{v}-{i}", f"35202{v:04d}{i:04d}", LABELS[0]) for i in range(10)]
        )
    version = store.registry.version()

    def count() -> int:
        return int(store.db.conn.execute("SELECT count(*) FROM registry_changes").fetchone()[0])

    assert count() == 30
    with store.db.lock:
        store.db.conn.executemany(
            "INSERT INTO pair_sync (peer, epoch, version, own_fp, peer_fp, policy) "
            "VALUES (?,?,?,?,?,?)",
            [("sindh", 1, version, b"", b"", "p"), ("kp", 1, version - 1, b"", b"", "p")],
        )
    # kp has not seen the last version: its changes stay for kp's next incremental run.
    assert store.pairs.oldest_synced_version() == version - 1
    assert store.registry.prune_changes(version - 1, batch=4) == 20 and count() == 10
    assert store.registry.prune_changes(None) == 0  # (no pair holds state: none)
    assert store.registry.changed_since(version - 1) == {f"35202{2:04d}{i:04d}" for i in range(10)}
    with store.db.lock:
        store.db.conn.execute("UPDATE pair_sync SET version=? WHERE peer='kp'", (version,))
    assert store.prune_changes() == 10 and count() == 0
    store.close()
    assert store.registry.prune_changes(version) == 0  # a closed store (shutdown): no error


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("batch", [7, 500_000])
@pytest.mark.parametrize("collections", [frozenset(), frozenset({"BISP"}), frozenset({"NONE"})])
@pytest.mark.parametrize("pp", [POLICIES[0], POLICIES[2]])
def test_one_off_plan_packed_equals_the_record_path(
    tmp_path: Path,
    pp: PeerPolicy,
    collections: frozenset[str],
    batch: int,
    labelled: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A one-off session's plan from SQLite's coded strings (no record objects) holds
    the same IDs in the same label-set groups, and counts the same records, as the
    record path; its owners lookup gives the same records as the record path's."""
    if ops.native is None:
        pytest.skip("the native module is not built here")
    rng = random.Random(9)
    nids = [f"35202{i:08d}" for i in range(300)]
    records = [StoredRecord(f"r{i}", rng.choice(nids), rng.choice(LABELS)) for i in range(900)]
    records += [StoredRecord(f"m{i}", nids[i % 2], LABELS[i % 4]) for i in range(30)]
    store = Store(tmp_path / "s.sqlite")
    store.registry.upsert(records)
    monkeypatch.setattr(
        store.registry,
        "nid_label_codes",
        functools.partial(store.registry.nid_label_codes, batch=batch),
    )
    got = planning.one_off_plan(store, pp, collections, labelled=labelled)
    monkeypatch.setattr(ops, "native", None)
    want = planning.one_off_plan(store, pp, collections, labelled=labelled)
    assert got.groups == want.groups and got.sizes == want.sizes
    assert got.own_records == want.own_records
    pos = 0
    for size in got.sizes:  # the same IDs in each group, each once
        assert sorted(got.order[pos : pos + size]) == sorted(want.order[pos : pos + size])
        pos += size
    assert len(set(got.order)) == got.total
    if labelled:
        assert got.owners is not None and want.owners is not None
        ids = list(got.order)
        assert got.owners(ids) == want.owners(ids)
        eligible = eligible_records(store, pp, collections, labelled=True)
        named = [r.record_id for v in got.owners(ids).values() for r in v]
        assert sorted(named) == sorted(r.record_id for r in eligible)
    else:
        assert got.owners is None


def test_ids_that_are_not_13_digits_fail_the_plan_precisely(tmp_path: Path) -> None:
    """The loader stores only 13-digit IDs; a store written around it that holds
    another makes planning fail with NotPacked (naming no ID), never misread."""
    store = Store(tmp_path / "s.sqlite")
    store.registry.upsert(
        [
            StoredRecord("a", "3520212345671", LABELS[0]),
            StoredRecord("b", "352021234567", LABELS[1]),  # 12 digits
        ]
    )
    for labelled in (True, False):
        with pytest.raises(NotPacked) as caught:
            planning.spooled_plan(store, POLICIES[0], labelled=labelled)
        assert "352021234567" not in caught.value.message
    with pytest.raises(NotPacked):
        list(planning._coded_label_sets(store, LABELS))
