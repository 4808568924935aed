"""What the CLI writes for people and for scripts.

Plain output is for people, but cron and journald read it too: when standard
output is not a terminal, lines are never hard-wrapped (a session id is never
split). ``--json`` output is one compact JSON object per line on standard
output, for batch jobs; its keys are documented in ``docs/operators.md``.
Text that came from a file or a peer goes through `printable` before it reaches
a terminal, so a control byte in a record id cannot drive the terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console

__all__ = ["console", "emit_json", "printable"]


def console(*, stderr: bool = False) -> Console:
    """A console that wraps lines only on a terminal (soft wrap everywhere else)."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(stderr=stderr, soft_wrap=not tty, highlight=tty)


def emit_json(obj: Mapping[str, Any], stream: TextIO | None = None) -> None:
    """One JSON object on one line, flushed at once (a job may read it as a stream)."""
    out = stream if stream is not None else sys.stdout
    out.write(json.dumps(obj, separators=(",", ":"), sort_keys=True, default=str) + "\n")
    out.flush()


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def printable(text: str, limit: int = 200) -> str:
    """`text` with control characters escaped and cut to `limit` characters (at a space
    where one is near the end, so no word is cut in two)."""
    cleaned = text.translate(_CONTROL)
    if len(cleaned) <= limit:
        return cleaned
    cut = cleaned[: limit - 1]
    space = cut.rfind(" ", max(0, limit - 40))
    return (cut[:space] if space > 0 else cut) + "…"
