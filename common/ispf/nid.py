"""National identity numbers (CNIC, CRC/B-form, NICOP): canonical form and validation.

All three share NADRA's 13-digit number. Accepted spellings are 13 ASCII digits
(``3520212345671``) or the printed form with dashes after the 5th and 12th digit
(``35202-1234567-1``); surrounding whitespace is ignored. Eastern Arabic
(U+0660-U+0669) and Urdu / Extended Arabic-Indic (U+06F0-U+06F9) digits are
read as the ASCII digits they stand for, so ``٣٥٢٠٢١٢٣٤٥٦٧١`` and
``۳۵۲۰۲۱۲۳۴۵۶۷۱`` are the same number as ``3520212345671``. Anything else is
rejected with a reason that names what is wrong but never echoes the number; a
number a spreadsheet turned into its number format (``3.52021E+12``, whose last
digits are lost) is named as such.

The first digit is the province of issue; the set of allowed digits is
configurable because AJK's prefix is not verified. There is no published
checksum, so none is checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import overload

from ispf.errors import InvalidNationalId

# 1 KP, 2 former FATA, 3 Punjab, 4 Sindh, 5 Balochistan, 6 Islamabad, 7 Gilgit-Baltistan.
DEFAULT_PROVINCE_DIGITS: frozenset[str] = frozenset("1234567")

_DIGITS = frozenset("0123456789")
# Eastern Arabic (U+0660-0669) and Urdu / Extended Arabic-Indic (U+06F0-06F9) digits.
_TO_ASCII = {
    **{0x0660 + d: str(d) for d in range(10)},
    **{0x06F0 + d: str(d) for d in range(10)},
}
_SCIENTIFIC = re.compile(r"[0-9]+(?:[.,][0-9]*)?[eE][+]?[0-9]+")
_DASHED_LEN = 15
_DASHED = re.compile(r"[0-9]{5}-[0-9]{7}-[0-9]")


@dataclass(frozen=True, slots=True)
class NationalId:
    """A validated identity number. `digits` is the canonical 13-digit form.

    `repr` and `str` mask the number so that it cannot end up in a log line by
    accident; use `.digits` where the number is really needed.
    """

    digits: str

    def __repr__(self) -> str:
        return f"NationalId({self.masked()})"

    def __str__(self) -> str:
        return self.masked()

    def masked(self) -> str:
        return f"{self.digits[0]}XXXX-XXXXXXX-X"

    @property
    def province_digit(self) -> str:
        return self.digits[0]

    def encode(self) -> bytes:
        return self.digits.encode("ascii")


def canonicalise(
    raw: str, *, province_digits: Iterable[str] = DEFAULT_PROVINCE_DIGITS
) -> NationalId:
    """Validate `raw` and return its canonical form, or raise `InvalidNationalId`."""
    return NationalId(canonical_digits(raw, province_digits=province_digits))


def canonical_digits(raw: str, *, province_digits: Iterable[str] = DEFAULT_PROVINCE_DIGITS) -> str:
    """`canonicalise`'s 13 digits, without the `NationalId` (a registry load's path:
    the two common spellings are recognised first, then everything else as there)."""
    allowed = province_digits if isinstance(province_digits, frozenset) else None
    text = raw.strip()
    if allowed is not None and text.isascii():
        if len(text) == 13 and text.isdigit():
            if text[0] in allowed:
                return text
        elif len(text) == _DASHED_LEN and _DASHED.fullmatch(text):
            digits = text[:5] + text[6:13] + text[14]
            if digits[0] in allowed:
                return digits
    return _canonical_slow(text, province_digits)


def _canonical_slow(stripped: str, province_digits: Iterable[str]) -> str:
    text = stripped.translate(_TO_ASCII)
    if not text:
        raise InvalidNationalId("nid.empty", "identity number is empty")
    if _SCIENTIFIC.fullmatch(text):
        raise InvalidNationalId(
            "nid.number_format",
            "identity number is in a spreadsheet's number format (like 3.52021E+12), which "
            "has lost its last digits: format the column as text and export the file again",
        )
    for i, ch in enumerate(text, start=1):
        if ch not in _DIGITS and ch != "-":
            if not ch.isascii():
                raise InvalidNationalId(
                    "nid.non_ascii",
                    f"character {i} of the identity number is not an ASCII digit or dash",
                )
            raise InvalidNationalId(
                "nid.non_digit", f"character {i} of the identity number is not a digit"
            )
    if "-" in text:
        dashes = tuple(i for i, ch in enumerate(text, start=1) if ch == "-")
        if len(text) != _DASHED_LEN or dashes != (6, 14):
            raise InvalidNationalId(
                "nid.dash_position",
                "misplaced dash in identity number: expected 13 digits, or the form "
                "NNNNN-NNNNNNN-N",
            )
        digits = text.replace("-", "")
    else:
        digits = text
    if len(digits) != 13:
        raise InvalidNationalId(
            "nid.length", f"identity number has {len(digits)} digits, expected 13"
        )
    allowed = frozenset(province_digits)
    if digits[0] not in allowed:
        raise InvalidNationalId(
            "nid.province",
            "identity number starts with an unknown province digit (allowed: "
            f"{', '.join(sorted(allowed))})",
        )
    return digits


NID_BYTES = 13


class PackedNids:
    """Canonical IDs (13 ASCII digits each) packed back to back in one buffer.

    A registry of millions is one buffer here, not millions of `bytes` objects:
    the native module hashes and shuffles it in place. Indexing gives one ID's
    bytes; slicing gives a view of a range (no copy of the IDs); iterating
    gives each ID's bytes. Like the IDs themselves, never log it."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | memoryview = b"") -> None:
        if len(data) % NID_BYTES:
            raise ValueError(f"packed IDs must be a whole number of {NID_BYTES}-byte records")
        self.data = data

    @classmethod
    def join(cls, nids: Iterable[bytes]) -> PackedNids:
        out = bytearray()
        for n in nids:
            if len(n) != NID_BYTES:
                raise ValueError(f"an ID of {len(n)} bytes among {NID_BYTES}-byte IDs")
            out += n
        return cls(out)

    def __len__(self) -> int:
        return len(self.data) // NID_BYTES

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> PackedNids: ...
    def __getitem__(self, i: int | slice) -> bytes | PackedNids:
        n = len(self)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                raise ValueError("packed IDs slice with step 1 only")
            view = memoryview(self.data)[NID_BYTES * start : NID_BYTES * max(start, stop)]
            return PackedNids(view)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("packed ID index out of range")
        return bytes(self.data[NID_BYTES * i : NID_BYTES * (i + 1)])

    def __iter__(self) -> Iterator[bytes]:
        data = bytes(self.data) if isinstance(self.data, memoryview) else self.data
        for at in range(0, len(data), NID_BYTES):
            yield bytes(data[at : at + NID_BYTES])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PackedNids) and bytes(self.data) == bytes(other.data)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PackedNids({len(self)} IDs)"

    def __reduce__(self) -> tuple[type[PackedNids], tuple[bytes]]:
        return (PackedNids, (bytes(self.data),))  # worker processes get a plain copy
