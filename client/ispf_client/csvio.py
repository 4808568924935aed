"""Registry CSV in, match reports out.

Input: UTF-8 (a BOM is fine) with a header naming at least ``record_id``,
``cnic`` (or ``nid``), ``programme`` and ``status``. A bad row never stops the
good ones: each is reported by line number with a reason. Messages never
repeat a row's identity number.

Output cells that a spreadsheet would run as a formula (starting with ``=``,
``+``, ``-``, ``@``, tab or carriage return) are prefixed with ``'``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ispf import files
from ispf.v1 import internal_pb2

MAX_FIELD = 4096
REQUIRED = ("record_id", "cnic", "programme", "status")
ALIASES = {"nid": "cnic", "program": "programme", "programme_name": "programme"}
MATCH_COLUMNS = (
    "province",
    "record_id",
    "peer_province",
    "peer_programme",
    "peer_status",
    "session_id",
    # The own record's label (added after the original columns, which keep their order).
    "own_programme",
    "own_status",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class RowProblem:
    line: int
    record_id: str
    code: str
    reason: str


@dataclass
class ParsedCsv:
    """Rows ready to send (position = line number) and problems found while reading."""

    rows: list[internal_pb2.Record] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def read_registry_csv(path: Path) -> Iterator[internal_pb2.Record | RowProblem]:
    """Yield a Record per good row and a RowProblem per unreadable row, in file order."""
    csv.field_size_limit(MAX_FIELD)
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            yield RowProblem(1, "", "file.empty", "file is empty: expected a header row")
            return
        except csv.Error as exc:
            yield RowProblem(1, "", "file.header", f"header row is unreadable: {exc}")
            return
        names = [ALIASES.get(h.strip().lower(), h.strip().lower()) for h in header]
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            yield RowProblem(
                1,
                "",
                "file.header",
                f"header lacks column(s) {', '.join(missing)}; expected {', '.join(REQUIRED)}",
            )
            return
        idx = {c: names.index(c) for c in REQUIRED}
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                reason = str(exc)
                if "field larger" in reason:
                    reason = f"a field is longer than {MAX_FIELD} characters"
                yield RowProblem(line, "", "row.unreadable", f"row is unreadable: {reason}")
                continue
            if not row or all(not c.strip() for c in row):
                continue
            rid = row[idx["record_id"]].strip() if len(row) > idx["record_id"] else ""
            if len(row) != len(names):
                yield RowProblem(
                    line,
                    _safe(rid),
                    "row.fields",
                    f"row has {len(row)} fields, the header has {len(names)}",
                )
                continue
            if any(_has_surrogates(c) for c in row):
                yield RowProblem(line, "", "row.encoding", "row is not valid UTF-8")
                continue
            yield internal_pb2.Record(
                record_id=rid,
                nid=row[idx["cnic"]],
                programme=row[idx["programme"]],
                status=row[idx["status"]],
                position=line,
            )


def _safe(text: str) -> str:
    return text if text.isprintable() and not _has_surrogates(text) else ""


def neutralise(cell: str) -> str:
    """Stop a spreadsheet from running a cell as a formula."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[str]]) -> int:
    n = 0
    with files.private_writer(path, newline="") as fh:  # 0600 whatever the umask
        w = csv.writer(fh)
        w.writerow(list(header))
        for r in rows:
            w.writerow([neutralise(str(c)) for c in r])
            n += 1
    return n


def write_problems(path: Path, problems: Iterable[RowProblem]) -> int:
    return write_csv(
        path,
        ("line", "record_id", "code", "reason"),
        ((str(p.line), p.record_id, p.code, p.reason) for p in problems),
    )


def matches_csv_text(province: str, matches: Iterable[internal_pb2.Match]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(MATCH_COLUMNS)
    for m in matches:
        w.writerow(
            [
                neutralise(c)
                for c in (
                    province,
                    m.record_id,
                    m.peer,
                    m.peer_programme,
                    m.peer_status,
                    m.session_id,
                    m.programme,
                    m.status,
                )
            ]
        )
    return buf.getvalue()
