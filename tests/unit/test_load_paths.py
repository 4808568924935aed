"""The registry load's faster paths give what the paths they stand in for gave."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from ispf.errors import InvalidNationalId
from ispf.nid import canonical_digits, canonicalise
from ispf_client.csvio import read_registry_csv
from ispf_client.loader import read_ahead

SPELLINGS = [
    "3520212345671",
    "35202-1234567-1",
    "  3520212345671 ",
    "9520212345671",  # unknown province digit
    "95202-1234567-1",
    "352021234567",
    "35202-12345671",
    "3520-21234567-1",
    "٣٥٢٠٢١٢٣٤٥٦٧١",
    "۳۵۲۰۲-۱۲۳۴۵۶۷-۱",
    "3.52021E+12",
    "35202123456x1",
    "35202１234567１",  # full-width digits: isdigit() is true, ASCII is not
    "",
]


def _outcome(fn: object, raw: str, digits: object) -> tuple[str, str]:
    try:
        got = fn(raw, province_digits=digits)  # type: ignore[operator]
    except InvalidNationalId as exc:
        return ("error", f"{exc.reason_code}: {exc.message}")
    return ("ok", getattr(got, "digits", got))


@pytest.mark.parametrize("raw", SPELLINGS)
@pytest.mark.parametrize("digits", [frozenset("1234567"), frozenset("3"), ["3", "4"]])
def test_canonical_digits_is_canonicalise_without_the_object(raw: str, digits: object) -> None:
    assert _outcome(canonical_digits, raw, digits) == _outcome(canonicalise, raw, digits)


def test_the_read_ahead_yields_what_the_reader_does(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    lines = ["record_id,cnic,programme,status"]
    for i in range(12_345):
        lines.append(f"r{i},35202{i:07d}1,BISP,enrolled" if i % 97 else f"r{i},x,y")
    f.write_bytes(("\n".join(lines) + "\n").encode() + b"r\xff,3520212345671,BISP,x\n")
    assert any(getattr(p, "code", "") == "row.encoding" for p in read_registry_csv(f))
    assert list(read_ahead(f)) == list(read_registry_csv(f))


def test_a_caller_that_stops_early_stops_the_reader(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    rows = [f"r{i},35202{i:07d}1,BISP,enrolled" for i in range(50_000)]
    f.write_text("record_id,cnic,programme,status\n" + "\n".join(rows) + "\n")
    with contextlib.closing(read_ahead(f)) as items:
        first = [next(items) for _ in range(10)]
    assert [int(r.position) for r in first] == list(range(2, 12))  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    while any(t.name == "csv-read-ahead" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the reader thread kept going"
        time.sleep(0.01)
