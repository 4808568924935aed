"""Hypothesis over the registry CSV reader: it never raises, and accounts for every row."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ispf_client.csvio import RowProblem, read_registry_csv

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
