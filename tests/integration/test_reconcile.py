"""Mutual and count-only sessions between real nodes over mutual TLS."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest

from ispf.v1 import internal_pb2
from ispf_server.pool import BlindingPool
from tests.conftest import Federation, start_federation

Row = tuple[str, str, str, str]
COMPLETED = internal_pb2.SESSION_STATE_COMPLETED
FAILED = internal_pb2.SESSION_STATE_FAILED

# The store backends these tests run on (the `store_backend` fixture, tests/conftest.py).
STORE_BACKENDS = ("sqlite", "postgresql")


def random_registries(seed: int, n: int) -> tuple[list[Row], list[Row]]:
    """Two registries with shared people, duplicates and multi-label IDs."""
    rng = random.Random(seed)
    ids = [f"3{rng.randrange(10**12):012d}" for _ in range(3 * n)]
    a_ids, b_ids = (
        ids[:n] + ids[2 * n : 2 * n + n // 3],
        ids[n : 2 * n] + ids[2 * n : 2 * n + n // 3],
    )
    progs = ["BISP-KAFAALAT", "PSER", "SEHAT"]
    stats = ["enrolled", "eligible", "suspended", "exited"]

    def rows(prefix: str, people: list[str]) -> list[Row]:
        out: list[Row] = []
        for nid in people:
            for _ in range(1 + (rng.random() < 0.15)):  # duplicates of one person
                printed = f"{nid[:5]}-{nid[5:12]}-{nid[12]}" if rng.random() < 0.5 else nid
                out.append((f"{prefix}{len(out)}", printed, rng.choice(progs), rng.choice(stats)))
        return out

    return rows("A", a_ids), rows("B", b_ids)


def reference(own: list[Row], peer: list[Row]) -> set[tuple[str, str, str]]:
    def canon(n: str) -> str:
        return n.replace("-", "")

    peer_labels: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for _, n, p, s in peer:
        peer_labels[canon(n)].add((p, s))
    return {(rid, p, s) for rid, n, _, _ in own for p, s in peer_labels.get(canon(n), ())}


def matches(fed: Federation, province: str, sid: str) -> set[tuple[str, str, str]]:
    return {
        (m.record_id, m.peer_programme, m.peer_status) for m in fed.client(province).matches(sid)
    }


@pytest.mark.parametrize("seed", [1, 2])
def test_mutual_session_finds_exactly_the_true_matches_on_both_sides(
    federation: Federation, seed: int
) -> None:
    a, b = random_registries(seed, 300)
    federation.load("punjab", a)
    federation.load("sindh", b)
    st = federation.reconcile("punjab", "sindh")
    assert st.state == COMPLETED, st.error
    shared = {r[1].replace("-", "") for r in a} & {r[1].replace("-", "") for r in b}
    assert st.match_count == len(shared) == 100
    assert matches(federation, "punjab", st.session_id) == reference(a, b)
    assert matches(federation, "sindh", st.session_id) == reference(b, a)
    # Both directions agree on count and digest.
    mirror = federation.client("sindh").session(st.session_id)
    assert mirror.role == "responder" and mirror.state == COMPLETED
    assert (mirror.match_count, mirror.result_digest) == (st.match_count, st.result_digest)
    # Duplicates: one value per distinct ID, every record reported.
    assert st.own_values == len({r[1].replace("-", "") for r in a}) < st.own_records == len(a)


def test_reverse_direction_gives_the_same_result(federation: Federation) -> None:
    a, b = random_registries(5, 120)
    federation.load("punjab", a)
    federation.load("sindh", b)
    one = federation.reconcile("punjab", "sindh")
    two = federation.reconcile("sindh", "punjab")
    assert one.state == two.state == COMPLETED
    assert one.match_count == two.match_count
    # The pair's keys are fixed per epoch: same tags both ways, nothing left to send.
    assert (one.sync, two.sync) == ("full", "incremental")
    assert two.own_values == two.peer_values == 0
    assert one.result_digest == two.result_digest
    assert matches(federation, "punjab", one.session_id) == matches(
        federation, "punjab", two.session_id
    )
    # A one-off session (filtered) uses fresh keys: other tags, same matches.
    three = federation.reconcile("punjab", "sindh", collections=["BISP-KAFAALAT", "PSER", "SEHAT"])
    assert three.sync == "" and three.match_count == one.match_count
    assert three.result_digest != one.result_digest
    assert matches(federation, "punjab", three.session_id) == matches(
        federation, "punjab", one.session_id
    )


def test_count_only_gives_the_count_to_the_initiator_and_nothing_to_the_responder(
    federation: Federation,
) -> None:
    a, b = random_registries(3, 150)
    federation.load("punjab", a)
    federation.load("sindh", b)
    st = federation.reconcile("punjab", "sindh", count_only=True)
    assert st.state == COMPLETED, st.error
    assert st.match_count == 50
    assert list(federation.client("punjab").matches(st.session_id)) == []
    mirror = federation.client("sindh").session(st.session_id)
    assert mirror.state == COMPLETED and mirror.match_count == 0
    assert list(federation.client("sindh").matches(st.session_id)) == []


def test_collections_filter_limits_both_sides(federation: Federation) -> None:
    federation.load(
        "punjab",
        [("A1", "3520212345671", "BISP", "enrolled"), ("A2", "3520212345672", "PSER", "enrolled")],
    )
    federation.load(
        "sindh",
        [("B1", "3520212345671", "BISP", "eligible"), ("B2", "3520212345672", "SEHAT", "enrolled")],
    )
    st = federation.reconcile("punjab", "sindh", collections=["BISP"], peer_collections=["SEHAT"])
    assert st.state == COMPLETED and st.match_count == 0
    st = federation.reconcile("punjab", "sindh", collections=["PSER"], peer_collections=["SEHAT"])
    assert st.match_count == 1
    assert matches(federation, "punjab", st.session_id) == {("A2", "SEHAT", "enrolled")}


def test_empty_registries_complete_with_no_matches(federation: Federation) -> None:
    st = federation.reconcile("punjab", "kp")
    assert st.state == COMPLETED and st.match_count == 0
    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    st = federation.reconcile("punjab", "kp")
    assert st.state == COMPLETED and st.match_count == 0


def test_multi_label_ids_are_sent_once_and_reported_under_every_label(
    federation: Federation,
) -> None:
    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.load(
        "sindh",
        [
            ("B1", "3520212345671", "BISP", "eligible"),
            ("B2", "35202-1234567-1", "SEHAT", "enrolled"),
            ("B3", "3520212345679", "SEHAT", "enrolled"),
        ],
    )
    st = federation.reconcile("punjab", "sindh")
    assert (st.peer_values, st.match_count) == (2, 1)
    assert matches(federation, "punjab", st.session_id) == {
        ("A1", "BISP", "eligible"),
        ("A1", "SEHAT", "enrolled"),
    }
    assert matches(federation, "sindh", st.session_id) == {
        ("B1", "BISP", "enrolled"),
        ("B2", "BISP", "enrolled"),
    }


def test_process_and_thread_pools_give_the_same_results_as_inline(tmp_path: Path) -> None:
    a, b = random_registries(9, 200)
    results = []
    for workers, threads in ((0, False), (2, False), (2, True)):
        pool = BlindingPool(workers, threads=threads)
        assert pool.describe() == (
            "inline" if not workers else f"2 {'threads' if threads else 'worker processes'}"
        )
        fed = start_federation(tmp_path / f"w{workers}{threads}", ["punjab", "sindh"], pool)
        try:
            fed.load("punjab", a)
            fed.load("sindh", b)
            st = fed.reconcile("punjab", "sindh")
            assert st.state == COMPLETED, st.error
            results.append(matches(fed, "punjab", st.session_id))
        finally:
            fed.close()
            pool.close()
    assert results[0] == results[1] == results[2] == reference(a, b)


def test_stopped_peer_fails_the_session_with_a_reason(federation: Federation) -> None:
    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.stop("kp")
    st = federation.reconcile("punjab", "kp")
    assert st.state == FAILED
    assert "kp" in st.error
    assert federation.client("punjab").session(st.session_id).state == FAILED


def test_every_kind_of_session_gives_the_same_result_when_sorts_spill(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real nodes with a sort budget of a few records: every run, plan, shuffle and
    join goes through spilled pieces merged a record at a time, runs are staged in
    parts of two records, rows in batches of three. Full, incremental, filtered and
    count-only sessions still give exactly the true matches."""
    from ispf_server.records import extsort
    from ispf_server.session.match import kept, labelled
    from ispf_server.storage.pairs import runs as pairruns
    from ispf_server.storage.pairs.staging import StagedRun

    for module, name, value in (
        (extsort, "BUDGET", 64),
        (extsort, "MIN_BLOCK", 1),
        (labelled, "WINDOW", 3),
        (labelled, "ROW_BATCH", 3),
        (kept, "ROW_BATCH", 3),
        (StagedRun, "FLUSH", 1),
        (pairruns, "PART_RECORDS", 2),
    ):
        monkeypatch.setattr(module, name, value)
    a, b = random_registries(7, 150)
    federation.load("punjab", a)
    federation.load("sindh", b)
    full = federation.reconcile("punjab", "sindh")
    assert full.state == COMPLETED and full.sync == "full", full.error
    assert full.match_count == 50
    assert matches(federation, "punjab", full.session_id) == reference(a, b)
    assert matches(federation, "sindh", full.session_id) == reference(b, a)
    again = federation.reconcile("sindh", "punjab")  # (from the spilled runs' state)
    assert again.sync == "incremental" and again.result_digest == full.result_digest
    assert matches(federation, "sindh", again.session_id) == reference(b, a)
    filtered = federation.reconcile(
        "punjab", "sindh", collections=["BISP-KAFAALAT", "PSER", "SEHAT"]
    )
    assert filtered.state == COMPLETED and filtered.match_count == 50, filtered.error
    assert matches(federation, "punjab", filtered.session_id) == reference(a, b)
    assert matches(federation, "sindh", filtered.session_id) == reference(b, a)
    counted = federation.reconcile("punjab", "sindh", count_only=True)
    assert counted.state == COMPLETED and counted.match_count == 50, counted.error
