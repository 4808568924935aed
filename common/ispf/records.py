"""Validation of registry records (the non-ID fields) and of labels."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ispf.errors import InvalidRecord

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()&-]{0,63}$")
MAX_RECORD_ID = 128


@dataclass(frozen=True, slots=True, order=True)
class Label:
    """A programme (collection) and a status within it: ``BISP-KAFAALAT/enrolled``."""

    programme: str
    status: str

    def __str__(self) -> str:
        return f"{self.programme}/{self.status}"


def check_record_id(record_id: str) -> str:
    rid = record_id.strip()
    if not rid:
        raise InvalidRecord("record_id.missing", "record_id is empty")
    if len(rid) > MAX_RECORD_ID:
        raise InvalidRecord(
            "record_id.too_long", f"record_id is {len(rid)} characters, at most {MAX_RECORD_ID}"
        )
    if not rid.isprintable():
        raise InvalidRecord("record_id.control", "record_id contains control characters")
    return rid


def check_name(field: str, value: str) -> str:
    v = value.strip()
    if not v:
        raise InvalidRecord(f"{field}.missing", f"{field} is empty")
    if not _NAME_RE.match(v):
        raise InvalidRecord(
            f"{field}.invalid",
            f"{field} must be 1-64 characters: letters, digits, space and . _ - ( ) &, "
            "starting with a letter or digit",
        )
    return v


def check_label(programme: str, status: str) -> Label:
    return Label(check_name("programme", programme), check_name("status", status).lower())
