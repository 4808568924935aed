"""The node's clock, in the one format its rows, entries and statuses use: UTC, ISO
8601 to the millisecond. Callers read it and hand the time down (an audit entry or
a cosignature never reads the clock itself)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
