"""Validation of registry records (the non-ID fields) and of labels."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from ispf.errors import InvalidRecord
from ispf.peertext import has_digit_run

MAX_RECORD_ID = 128
MAX_NAME = 64
NAME_PUNCTUATION = frozenset(" ._()&-")
NAME_RULE = (
    f"1-{MAX_NAME} characters after NFC normalisation: letters (any script), digits, "
    "combining marks, space and . _ - ( ) &, starting with a letter or digit, and no "
    "run of 9 or more digits (up to three other characters between two digits still "
    "count as one run)"
)


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


def _name_char(c: str, first: bool) -> bool:
    cat = unicodedata.category(c)
    if cat[0] == "L" or cat == "Nd":
        return True
    return not first and (cat[0] == "M" or c in NAME_PUNCTUATION)


def check_name(field: str, value: str) -> str:
    """A programme or status name, NFC-normalised; InvalidRecord (with why) otherwise.

    The rule (`NAME_RULE`) holds at load and for every label a peer announces.
    """
    v = unicodedata.normalize("NFC", value).strip()
    if not v:
        raise InvalidRecord(f"{field}.missing", f"{field} is empty")
    if len(v) > MAX_NAME:
        raise InvalidRecord(f"{field}.too_long", f"{field} is {len(v)} characters: {NAME_RULE}")
    if has_digit_run(v):  # (reads as an ID number: never part of a label)
        raise InvalidRecord(
            f"{field}.digits",
            f"{field} holds a run of 9 or more digits (an ID number?): a label holds at most "
            "8 digits in a row (up to three other characters between two digits still count "
            "as one run)",
        )
    if not all(_name_char(c, i == 0) for i, c in enumerate(v)):
        raise InvalidRecord(f"{field}.invalid", f"{field} must be {NAME_RULE}")
    return v


def check_label(programme: str, status: str) -> Label:
    return Label(check_name("programme", programme), check_name("status", status).lower())
