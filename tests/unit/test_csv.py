"""The registry CSV reader: every bad row reported by line, good rows kept."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from ispf.v1 import internal_pb2
from ispf_client.csvio import (
    MAX_FIELD,
    MAX_ROW,
    RowProblem,
    matches_csv_text,
    neutralise,
    read_registry_csv,
)


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
        b"\n"
        b"R6,3520212345676,BISP,enrolled\n"
    )
    rows, problems = read(f)
    assert [r.record_id for r in rows] == ["R1", "R6"]
    assert [(p.line, p.code) for p in problems] == [
        (3, "row.fields"),
        (4, "row.encoding"),
        (5, "row.fields"),
    ]


def test_a_field_over_the_limit_rejects_its_row_and_stops_the_file_there(
    tmp_path: Path,
) -> None:
    f = tmp_path / "r.csv"
    f.write_bytes(
        b"record_id,cnic,programme,status\n"
        b"R1,3520212345671,BISP,enrolled\n"
        b"R5," + b"9" * (MAX_FIELD + 1) + b",BISP,enrolled\n"  # huge field
        b"R6,3520212345676,BISP,enrolled\n"
    )
    rows, problems = read(f)
    assert [r.record_id for r in rows] == ["R1"]
    assert [(p.line, p.code) for p in problems] == [(3, "row.too_long"), (3, "file.stopped")]
    assert f"longer than {MAX_FIELD}" in problems[0].reason
    assert "line 3" in problems[1].reason
    assert all("9999999" not in p.reason for p in problems)


def test_csv_lines_inside_a_long_quoted_cell_never_become_records(tmp_path: Path) -> None:
    planted = "".join(f"X{i},35202123456{i % 10}1,BISP,enrolled\n" for i in range(400))
    assert len(planted) > MAX_FIELD
    f = tmp_path / "r.csv"
    f.write_text(
        "record_id,cnic,programme,status\n"
        "R1,3520212345671,BISP,enrolled\n"
        f'R2,3520212345672,"{planted}",enrolled\n'
        "R3,3520212345673,BISP,enrolled\n"
    )
    rows, problems = read(f)
    assert [r.record_id for r in rows] == ["R1"]
    assert [(p.line, p.code) for p in problems] == [(3, "row.too_long"), (3, "file.stopped")]


def test_a_row_of_many_quoted_multi_line_fields_is_bounded_too(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    cells = ",".join('"a\nb"' for _ in range(MAX_ROW // 4))
    f.write_text(f"record_id,cnic,programme,status\nR1,3520212345671,BISP,enrolled\n{cells}\n")
    rows, problems = read(f)
    assert [r.record_id for r in rows] == ["R1"]
    assert [p.code for p in problems] == ["row.too_long", "file.stopped"]
    assert f"longer than {MAX_ROW}" in problems[0].reason


def test_memory_stays_bounded_on_a_huge_field(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    with f.open("w") as fh:
        fh.write('record_id,cnic,programme,status\nR1,3520212345671,"')
        for _ in range(80):
            fh.write(("R9,3520212345679,BISP,enrolled" + "x" * 70 + "\n") * 1000)  # 8 MB
    tracemalloc.start()
    try:
        rows, problems = read(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == [] and [p.code for p in problems] == ["row.too_long", "file.stopped"]
    assert peak < 2_000_000


@pytest.mark.parametrize(
    ("header", "hint"),
    [
        (b"record_id;cnic;programme;status\nR1;3520212345671;BISP;enrolled\n", "semicolons"),
        (b"record_id\tcnic\tprogramme\tstatus\n", "tabs"),
    ],
)
def test_a_header_with_another_delimiter_says_so(tmp_path: Path, header: bytes, hint: str) -> None:
    f = tmp_path / "r.csv"
    f.write_bytes(header)
    _, problems = read(f)
    assert [p.code for p in problems] == ["file.header"]
    assert hint in problems[0].reason and "comma-separated" in problems[0].reason
    assert "found 1 column" in problems[0].reason


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-16-le"])
def test_utf16_files_are_named_as_such(tmp_path: Path, encoding: str) -> None:
    f = tmp_path / "r.csv"
    f.write_bytes("record_id,cnic,programme,status\nR1,3520212345671,BISP,e\n".encode(encoding))
    _, problems = read(f)
    assert [p.code for p in problems] == ["file.encoding"]
    assert "UTF-16" in problems[0].reason and "CSV UTF-8" in problems[0].reason


def test_a_column_named_twice_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("record_id,cnic,programme,status,NID\nR1,3520212345671,BISP,enrolled,x\n")
    rows, problems = read(f)
    assert rows == [] and [p.code for p in problems] == ["file.header"]
    assert "'cnic' twice (columns 2 and 5)" in problems[0].reason


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
