"""The registry CSV reader: every bad row reported by line, good rows kept."""

from __future__ import annotations

from pathlib import Path

from ispf.v1 import internal_pb2
from ispf_client.csvio import RowProblem, matches_csv_text, neutralise, read_registry_csv


def read(path: Path) -> tuple[list[internal_pb2.Record], list[RowProblem]]:
    rows, problems = [], []
    for item in read_registry_csv(path):
        (problems if isinstance(item, RowProblem) else rows).append(item)
    return rows, problems  # type: ignore[return-value]


def test_bom_quotes_and_aliases(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_bytes(
        "\ufeffRecord_ID,NID,Programme,Status\n"
        'R1,35202-1234567-1,"BISP, KAFAALAT",enrolled\n'
        '"R2",3520212345672,PSER,"eligible"\n'.encode()
    )
    rows, problems = read(f)
    assert problems == []
    assert [(r.record_id, r.programme, r.position) for r in rows] == [
        ("R1", "BISP, KAFAALAT", 2),
        ("R2", "PSER", 3),
    ]


def test_bad_rows_are_reported_by_line_and_good_rows_kept(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_bytes(
        b"record_id,cnic,programme,status\n"
        b"R1,3520212345671,BISP,enrolled\n"
        b"R2,3520212345672,BISP\n"  # too few fields
        b"R3,\xff\xfe3520212345673,BISP,enrolled\n"  # not UTF-8
        b"R4,3520212345674,BISP,enrolled,extra\n"
        b"R5," + b"9" * 5000 + b",BISP,enrolled\n"  # huge field
        b"\n"
        b"R6,3520212345676,BISP,enrolled\n"
    )
    rows, problems = read(f)
    assert [r.record_id for r in rows] == ["R1", "R6"]
    assert [(p.line, p.code) for p in problems] == [
        (3, "row.fields"),
        (4, "row.encoding"),
        (5, "row.fields"),
        (6, "row.unreadable"),
    ]
    assert all("9999999" not in p.reason for p in problems)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("id,cnic,status\nR1,3520212345671,enrolled\n")
    _, problems = read(f)
    assert problems[0].code == "file.header"
    assert "record_id" in problems[0].reason and "programme" in problems[0].reason


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("")
    assert read(f)[1][0].code == "file.empty"


def test_formula_cells_are_neutralised_in_reports() -> None:
    for cell in ("=HYPERLINK(1)", "+1", "-1", "@SUM(A1)", "\tx"):
        assert neutralise(cell).startswith("'")
    assert neutralise("PB-001") == "PB-001"
    text = matches_csv_text(
        "punjab",
        [
            internal_pb2.Match(
                record_id="=cmd()",
                programme="PSPA",
                status="@eligible",
                peer="sindh",
                peer_programme="BISP",
                peer_status="enrolled",
                session_id="s",
            )
        ],
    )
    assert text.splitlines() == [
        "province,record_id,peer_province,peer_programme,peer_status,session_id,"
        "own_programme,own_status",
        "punjab,'=cmd(),sindh,BISP,enrolled,s,PSPA,'@eligible",
    ]
