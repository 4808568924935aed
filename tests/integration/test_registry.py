"""Loading a registry: idempotent upserts, bad rows reported by line, deletes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ispf.errors import InvalidRecord
from ispf.v1 import internal_pb2
from ispf_client.loader import load_csv
from tests.conftest import Federation

CSV = """record_id,cnic,programme,status
PB-1,35202-1234567-1,BISP-KAFAALAT,enrolled
PB-2,3520212345672,BISP-KAFAALAT,Eligible
PB-3,3520212345,BISP-KAFAALAT,enrolled
PB-4,3520212345674,,enrolled
PB-5,9520212345675,PSER,enrolled
PB-6,35202-1234567-1,PSER,suspended
,3520212345677,PSER,enrolled
PB-8,3520212345678,PSER,enrolled,extra
PB-9,3520A12345679,PSER,enrolled
"""


def test_load_keeps_good_rows_and_reports_every_bad_one_by_line(
    federation: Federation, tmp_path: Path
) -> None:
    f = tmp_path / "punjab.csv"
    f.write_text(CSV)
    client = federation.client("punjab")
    rep = load_csv(client, f)
    assert (rep.rows, rep.accepted, rep.inserted) == (9, 3, 3)
    assert [(p.line, p.code) for p in rep.problems] == [
        (4, "nid.length"),
        (5, "programme.missing"),
        (6, "nid.province"),
        (8, "record_id.missing"),
        (9, "row.fields"),
        (10, "nid.non_digit"),
    ]
    for p in rep.problems:
        assert "352021234567" not in p.reason
    stats = client.stats()
    assert (stats.records, stats.distinct_ids) == (3, 2)
    labels = {(lc.label.programme, lc.label.status): lc.records for lc in stats.labels}
    assert labels[("BISP-KAFAALAT", "eligible")] == 1  # status is normalised to lower case
    # Loading again changes nothing; a changed row is an update.
    again = load_csv(client, f)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 3)
    f.write_text(
        CSV.replace("PB-6,35202-1234567-1,PSER,suspended", "PB-6,3520212345676,PSER,exited")
    )
    third = load_csv(client, f)
    assert (third.inserted, third.updated, third.unchanged) == (0, 1, 2)


def test_delete_reports_unknown_ids(federation: Federation) -> None:
    federation.load("sindh", [("S1", "4210112345671", "BISP", "enrolled")])
    resp = federation.client("sindh").delete(["S1", "S9"])
    assert resp.deleted == 1
    assert list(resp.not_found) == ["S9"]
    assert federation.client("sindh").stats().records == 0


def test_oversized_batch_is_refused_with_a_reason(federation: Federation) -> None:
    recs = [
        internal_pb2.Record(
            record_id=f"R{i}", nid="3520212345671", programme="P", status="enrolled"
        )
        for i in range(50_001)
    ]
    with pytest.raises(InvalidRecord, match="at most 50000"):
        federation.client("kp").upsert(recs)


def test_repeated_record_id_in_one_batch_keeps_the_last_row(federation: Federation) -> None:
    federation.load(
        "kp",
        [("K1", "1730112345671", "BISP", "enrolled"), ("K1", "1730112345671", "BISP", "exited")],
    )
    stats = federation.client("kp").stats()
    assert stats.records == 1
    assert stats.labels[0].label.status == "exited"


def test_a_full_disk_is_reported_and_nothing_is_half_written(federation: Federation) -> None:
    from ispf.errors import StorageFull

    client = federation.client("sindh")
    federation.load("sindh", [(f"S{i}", f"42101{i:08d}", "BISP", "enrolled") for i in range(50)])
    db = federation.nodes["sindh"].store.db.conn
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from now on
    try:
        big = [
            internal_pb2.Record(
                record_id=f"N{i}",
                nid=f"42101{i:08d}",
                programme="BISP",
                status="eligible",
                position=i + 1,
            )
            for i in range(3000)
        ]
        with pytest.raises(StorageFull, match="disk is full: nothing of this request"):
            client.upsert(big)
        assert client.stats().records == 50  # the batch left no trace
    finally:
        db.execute("PRAGMA max_page_count = 1073741823")
    assert client.upsert(big).inserted == 3000  # and works once there is room
