"""Structured logs: every line carries a request id (and a session id where there is one).

The guard sets the request id for each RPC (from the caller's ``x-request-id``
metadata, or a new one), session threads carry their session's; lines written
outside both say ``-``. Only the entry points (`ispf-node`, the CLI) configure
logging; library code only calls `logging.getLogger(__name__)`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import secrets
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
SESSION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")
REQUEST_ID_KEY = "x-request-id"


def new_request_id() -> str:
    # Two dash-separated halves: no run of 13 digits, so a log scan for ID numbers
    # never trips on a request id.
    return f"{secrets.token_hex(4)}-{secrets.token_hex(4)}"


@contextmanager
def bound(request_id: str | None = None, session_id: str | None = None) -> Iterator[None]:
    """Set the ids for the lines logged inside the block (this thread only)."""
    tokens = []
    if request_id is not None:
        tokens.append((REQUEST_ID, REQUEST_ID.set(request_id)))
    if session_id is not None:
        tokens.append((SESSION_ID, SESSION_ID.set(session_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.session_id = SESSION_ID.get()
        return True


def safe_traceback(exc_info: tuple[type[BaseException], BaseException, Any] | Any) -> str:
    """Frames and the exception's type, not its message: a message could carry data."""
    etype, _, tb = exc_info
    frames = "".join(traceback.format_tb(tb))
    return f"Traceback (most recent call last):\n{frames}{etype.__name__} (message withheld)"


class TextFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return safe_traceback(ei)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, session_id."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "session_id": getattr(record, "session_id", "-"),
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = safe_traceback(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(session_id)s]: %(message)s"


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
