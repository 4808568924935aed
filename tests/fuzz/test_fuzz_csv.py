"""Hypothesis over the registry CSV reader: it never raises, and accounts for every row."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ispf_client.csvio import MAX_FIELD, MAX_ROW, RowProblem, read_registry_csv

EXAMPLES = int(os.environ.get("ISPF_FUZZ_EXAMPLES", "20")) * 10
HEADER = b"record_id,cnic,programme,status\n"
CELLS = st.one_of(
    st.text(max_size=20),
    st.sampled_from(['"', '""', "=1+1", "\r", "\n", "\ufeff", "35202-1234567-1", ",", "\x00"]),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_arbitrary_bytes_never_crash_the_reader(body: bytes, with_header: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.csv"
        path.write_bytes((HEADER if with_header else b"") + body)
        items = list(read_registry_csv(path))
    lines = [i.line if isinstance(i, RowProblem) else i.position for i in items]
    assert lines == sorted(lines)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.lists(CELLS, min_size=0, max_size=6), max_size=15))
def test_every_non_blank_row_is_either_kept_or_reported(rows: list[list[str]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.csv"
        path.write_bytes(HEADER + buf.getvalue().encode("utf-8", "surrogatepass"))
        items = list(read_registry_csv(path))
    for item in items:
        if isinstance(item, RowProblem):
            assert item.code.startswith(("row.", "file."))
            assert "3520212345671" not in item.reason
        else:
            assert item.position >= 2


PLANTED = st.lists(
    st.tuples(
        st.integers(0, 999),
        st.sampled_from(["3520212345671", "35202-1234567-1", "4210176543212"]),
        st.sampled_from(["BISP", '"BISP"', "BISP,X"]),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    PLANTED,
    st.sampled_from([0, 100, MAX_FIELD - 200, MAX_FIELD + 1, MAX_ROW + 1]),
    st.sampled_from(["record_id", "cnic", "programme", "status"]),
    st.sampled_from(["\n", "\r\n"]),
)
def test_a_cell_holding_csv_never_creates_a_record(
    planted: list[tuple[int, str, str]], pad: int, column: str, newline: str
) -> None:
    """Whatever its size, a cell whose text is CSV rows stays one cell of one row."""
    import csv
    import io

    inner = io.StringIO()
    csv.writer(inner, lineterminator=newline).writerows(
        [f"PLANT-{i}", nid, prog, "enrolled"] for i, nid, prog in planted
    )
    cell = inner.getvalue() + "y" * pad
    real = {"record_id": "R2", "cnic": "3520212345672", "programme": "BISP", "status": "e"}
    real[column] = cell
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=newline)
    w.writerow(["R1", "3520212345671", "BISP", "enrolled"])
    w.writerow([real["record_id"], real["cnic"], real["programme"], real["status"]])
    w.writerow(["R3", "3520212345673", "BISP", "enrolled"])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.csv"
        path.write_bytes(HEADER + buf.getvalue().encode())
        items = list(read_registry_csv(path))
    records = [i for i in items if not isinstance(i, RowProblem)]
    planted_ids = {f"PLANT-{i}" for i, _, _ in planted}
    assert not any(r.record_id in planted_ids for r in records)
    assert len(records) <= 3
    assert records[0].record_id == "R1"
    if len(cell) > MAX_FIELD:  # rejected, and nothing after it read
        assert [r.record_id for r in records] == ["R1"]
        assert [i.code for i in items if isinstance(i, RowProblem)][-1] == "file.stopped"
    else:  # one row, the cell whole
        assert [r.position for r in records] == [2, 3, 4 + cell.count("\n")]
        got = getattr(records[1], "nid" if column == "cnic" else column)
        assert got == (cell.strip() if column == "record_id" else cell)
