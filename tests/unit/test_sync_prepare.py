"""A full run's input, read in one pass without per-record objects, equals what the
record-by-record path (eligible records, grouped by ID) gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ispf.records import Label
from ispf_server.policy import PeerPolicy
from ispf_server.session import sync
from ispf_server.session.plan import eligible_records
from ispf_server.store import Store, StoredRecord

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
]


@pytest.mark.parametrize("pp", POLICIES)
def test_one_pass_equals_the_record_path(tmp_path: Path, pp: PeerPolicy) -> None:
    rng = random.Random(5)
    nids = [f"35202{i:08d}" for i in range(300)]
    records = [StoredRecord(f"r{i}", rng.choice(nids), rng.choice(LABELS)) for i in range(900)]
    store = Store(tmp_path / "s.sqlite")
    store.upsert(records)
    by_text, count = sync._all_label_sets(store, pp)
    got = {n.decode(): text for text, members in by_text.items() for n in members}
    eligible = eligible_records(store, pp, frozenset(), labelled=True)
    assert got == sync._label_sets(eligible)
    assert count == len(eligible)
    assert sum(len(m) for m in by_text.values()) == len(got)  # each ID once


def test_full_prepare_plans_every_id_once_in_label_set_groups(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.upsert(
        [
            StoredRecord("a", "3520200000001", LABELS[0]),
            StoredRecord("b", "3520200000001", LABELS[2]),
            StoredRecord("c", "3520200000002", LABELS[0]),
            StoredRecord("d", "3520200000003", LABELS[3]),
        ]
    )
    side = sync.prepare(store, POLICIES[0], "sindh", 1, incremental=False)
    plan = side.plan
    assert side.own_records == 4
    assert sorted(plan.order) == [b"3520200000001", b"3520200000002", b"3520200000003"]
    assert dict(zip(plan.groups, plan.sizes, strict=True)) == {
        (LABELS[0],): 1,
        (LABELS[0], LABELS[2]): 1,
        (LABELS[3],): 1,
    }
