"""Registry CSV in, match reports out.

Input: UTF-8 (a BOM is fine), comma-separated, with a header naming at least
``record_id``, ``cnic`` (or ``nid``), ``programme`` and ``status``, each once.
A bad row never stops the good ones: each is reported by line number with a
reason. Messages never repeat a row's identity number.

Size limits: a field holds at most `MAX_FIELD` (4,096) characters and a row
(all its lines, if quoted fields span lines) at most `MAX_ROW` (65,536). A
field or row over its limit is rejected, and reading stops there with a
``file.stopped`` problem at that line: the parser never resumes inside a field
(a quoted cell holding CSV lines can never become records), and memory stays
bounded whatever the file holds. A header that cannot be right is refused with
the likely cause named: another delimiter (``;``, tab), UTF-16 encoding (a BOM
or NUL bytes), a column named twice.

Output cells that a spreadsheet would run as a formula (starting with ``=``,
``+``, ``-``, ``@``, tab or carriage return) are prefixed with ``'``.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ispf import files
from ispf.v1 import internal_pb2
from ispf_client.output import printable

MAX_FIELD = 4096
MAX_ROW = 16 * MAX_FIELD
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
    record_id: str = field(repr=False)
    code: str
    reason: str


@dataclass
class ParsedCsv:
    """Rows ready to send (position = line number) and problems found while reading."""

    rows: list[internal_pb2.Record] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)


# The characters `surrogateescape` reads undecodable bytes as.
_SURROGATE = re.compile("[\udc80-\udcff]")


def _has_surrogates(text: str) -> bool:
    return _SURROGATE.search(text) is not None


class _TooLong(Exception):
    """A row ran past `MAX_ROW` characters (raised out of the line source)."""


class _Lines:
    """The file's physical lines, each read with a bound, counted per row.

    `fed` is how many characters the current row has taken so far; the reader
    resets it after each row. Past `MAX_ROW` the source raises `_TooLong`, so
    neither one long line nor a quoted field spanning many lines is ever held
    whole."""

    def __init__(self, fh: TextIO) -> None:
        self.fh = fh
        self.fed = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self.fh.readline(MAX_ROW + 1)
        if not line:
            raise StopIteration
        self.fed += len(line)
        if self.fed > MAX_ROW:
            raise _TooLong
        return line


def _encoding_problem(path: Path) -> RowProblem | None:
    with path.open("rb") as fh:
        head = fh.read(4096)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return RowProblem(
            1,
            "",
            "file.encoding",
            "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as "
            "'CSV UTF-8' and load that",
        )
    if b"\x00" in head:
        return RowProblem(
            1,
            "",
            "file.encoding",
            "the file holds NUL bytes: it is probably UTF-16 or not text; save it as "
            "'CSV UTF-8' and load that",
        )
    return None


def _header_problem(header: list[str], names: list[str]) -> RowProblem | None:
    seen: dict[str, int] = {}
    for i, n in enumerate(names, start=1):
        if not n:
            continue
        if n in seen:
            return RowProblem(
                1,
                "",
                "file.header",
                f"header names column {printable(n, 40)!r} twice (columns {seen[n]} and {i}); "
                "each column must be named once",
            )
        seen[n] = i
    missing = [c for c in REQUIRED if c not in names]
    if not missing:
        return None
    hint = ""
    joined = "".join(header)
    for sep, what in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
        if sep in joined:
            hint = (
                f"; the header seems separated by {what}, not commas: save the file as "
                "comma-separated CSV"
            )
            break
    return RowProblem(
        1,
        "",
        "file.header",
        f"header lacks column(s) {', '.join(missing)}; expected {', '.join(REQUIRED)}; "
        f"found {_n(len(header), 'column')}: {printable(','.join(header), 120)}{hint}",
    )


def _n(count: int, one: str) -> str:
    return f"{count} {one if count == 1 else one + 's'}"


def _stop(line: int, why: str) -> list[RowProblem]:
    return [
        RowProblem(line, "", "row.too_long", why),
        RowProblem(
            line,
            "",
            "file.stopped",
            f"reading stopped at line {line}: nothing from this line on was read (look for "
            "an unclosed quote before it, or a cell pasted with a whole file in it)",
        ),
    ]


def read_registry_csv(path: Path) -> Generator[internal_pb2.Record | RowProblem, None, None]:
    """Yield a Record per good row and a RowProblem per unreadable row, in file order.

    A problem whose code starts with ``file.`` means the file (or the rest of
    it) was not read: the header is wrong, or reading stopped at that line."""
    csv.field_size_limit(MAX_FIELD)
    bad = _encoding_problem(path)
    if bad is not None:
        yield bad
        return
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        lines = _Lines(fh)
        reader = csv.reader(lines)
        try:
            header = next(reader)
        except StopIteration:
            yield RowProblem(1, "", "file.empty", "file is empty: expected a header row")
            return
        except _TooLong:
            yield RowProblem(
                1, "", "file.header", f"header row is longer than {MAX_ROW} characters"
            )
            return
        except csv.Error as exc:
            yield RowProblem(1, "", "file.header", f"header row is unreadable: {exc}")
            return
        names = [ALIASES.get(h.strip().lower(), h.strip().lower()) for h in header]
        bad = _header_problem(header, names)
        if bad is not None:
            yield bad
            return
        i_rid, i_nid, i_prog, i_st = (names.index(c) for c in REQUIRED)
        width = len(names)
        while True:
            line = reader.line_num + 1
            lines.fed = 0
            try:
                row = next(reader)
            except StopIteration:
                return
            except _TooLong:
                yield from _stop(line, f"row is longer than {MAX_ROW} characters")
                return
            except csv.Error as exc:
                # The csv module would go on from the next line, which may be inside a
                # quoted field: never resume after it.
                reason = str(exc)
                if "field larger" in reason:
                    reason = f"a field is longer than {MAX_FIELD} characters"
                yield from _stop(line, f"row is unreadable: {reason}")
                return
            joined = "".join(row)
            if not joined.strip():  # (no cell holds more than whitespace)
                continue
            if len(row) != width:
                rid = row[i_rid].strip() if len(row) > i_rid else ""
                yield RowProblem(
                    line,
                    _safe(rid),
                    "row.fields",
                    f"row has {len(row)} fields, the header has {width}",
                )
                continue
            if _has_surrogates(joined):
                yield RowProblem(line, "", "row.encoding", "row is not valid UTF-8")
                continue
            yield internal_pb2.Record(
                record_id=row[i_rid].strip(),
                nid=row[i_nid],
                programme=row[i_prog],
                status=row[i_st],
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


class ProblemWriter:
    """Rejected rows written to a CSV as they come (a load keeps only the first
    in memory), in the columns of `write_problems`; 0600 like every file written
    (`files.private_writer`: in place when closed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._stack = contextlib.ExitStack()
        self._fh = self._stack.enter_context(files.private_writer(path, newline=""))
        self._w = csv.writer(self._fh)
        self._w.writerow(("line", "record_id", "code", "reason"))

    def write(self, problems: Iterable[RowProblem]) -> None:
        for p in problems:
            self._w.writerow([neutralise(c) for c in (str(p.line), p.record_id, p.code, p.reason)])
            self.count += 1

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ProblemWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)


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
