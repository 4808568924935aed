"""The CLI's output helpers: JSON lines for scripts, escaped text for terminals."""

from __future__ import annotations

import io
import json

from ispf_client.output import emit_json, printable


def test_emit_json_writes_one_compact_object_per_line() -> None:
    buf = io.StringIO()
    emit_json({"b": 1, "a": "x y"}, buf)
    emit_json({"c": [1, 2]}, buf)
    lines = buf.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [{"a": "x y", "b": 1}, {"c": [1, 2]}]
    assert lines[0] == '{"a":"x y","b":1}'


def test_printable_escapes_control_bytes_and_cuts() -> None:
    assert printable("rec\x1b[31m1\r\n") == "rec\\x1b[31m1\\x0d\\x0a"
    assert printable("del\x7f") == "del\\x7f"
    cut = printable("a" * 500, limit=10)
    assert len(cut) == 10 and cut.endswith("…")
