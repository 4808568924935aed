"""The record operations, each in C (`ispf._records`) where the module is built and
not switched off (ISPF_NATIVE=0), else in Python: the same bytes, slower.

This is the one place in the node that chooses between them: callers call these
functions and never look at the module themselves, and take the same path either
way. Records are packed, fixed-width byte strings (tags, IDs, label-set numbers),
never a key.
"""

from __future__ import annotations

import heapq
import os
import secrets
from collections.abc import Sequence
from itertools import pairwise
from types import ModuleType
from typing import Any, TypeVar

from ispf.errors import RepeatedKey

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")


def _load() -> ModuleType | None:
    """The C module built from common/ispf/_records.c, unless absent or ISPF_NATIVE=0."""
    if os.environ.get("ISPF_NATIVE", "1") == "0":
        return None
    try:
        from ispf import _records  # type: ignore[attr-defined]
    except ImportError:  # built without a C compiler: the Python code below is used
        return None
    return _records  # type: ignore[no-any-return]


native: Any = _load()


def split_records(data: Buffer, width: int) -> list[bytes]:
    """Fixed-width records as a list of byte strings (for paths that need an object
    per record: incremental runs' few changes, a probe's values)."""
    return [bytes(data[i : i + width]) for i in range(0, len(data), width)]


def sort_inplace(buf: bytearray, width: int) -> None:
    """Sort fixed-width records in place: a run of millions needs no second copy to
    sort (in C; Python's sort where the module is not built)."""
    if native is not None:
        native.sort_inplace(buf, width)
    else:
        buf[:] = b"".join(sorted(buf[i : i + width] for i in range(0, len(buf), width)))


def merge_sorted(pieces: Sequence[Buffer], width: int) -> bytes:
    """Sorted runs of fixed-width records merged into one (in C; `heapq.merge` where
    the module is not built)."""
    if native is not None:
        return bytes(native.merge_sorted(pieces, width))
    runs = [[bytes(p[i : i + width]) for i in range(0, len(p), width)] for p in pieces]
    return b"".join(heapq.merge(*runs))


def has_repeat(chunk: Buffer, width: int, key: int) -> bool:
    """Whether two neighbouring records of a sorted run share their first `key` bytes."""
    if native is not None:
        return bool(native.has_repeat(chunk, width, key))
    keys = [bytes(chunk[i : i + key]) for i in range(0, len(chunk), width)]
    return any(a == b for a, b in pairwise(keys))


def merge_join(a: Buffer, lw: int, b: Buffer, rw: int, key: int) -> bytes:
    """Two runs sorted by their first `key` bytes joined, many to one: for each record
    of `a` whose key `b` holds, that record and the bytes after the key of `b`'s.
    Records of `a` may share a key (each is joined); RepeatedKey where `b` holds a
    key twice."""
    if native is not None:
        out = native.merge_join(a, lw, b, rw, key)
        if out is None:
            raise RepeatedKey
        return bytes(out)
    if len(a) % lw or len(b) % rw or not 0 < key <= min(lw, rw):
        raise ValueError("runs must be whole records; key within both widths")
    right = {bytes(b[j : j + key]): bytes(b[j + key : j + rw]) for j in range(0, len(b), rw)}
    if len(right) != len(b) // rw:
        raise RepeatedKey
    parts = []
    for i in range(0, len(a), lw):
        rest = right.get(bytes(a[i : i + key]))
        if rest is not None:
            parts.append(bytes(a[i : i + lw]) + rest)
    return b"".join(parts)


def zip_records(n: int, *parts: tuple[Buffer, int]) -> bytes:
    """n fixed-width records from columns (buf, width): record i is the i-th slice of
    every column in turn (a column of one width is a constant)."""
    if native is not None:
        out: bytes = native.zip_records(n, *parts)
        return out
    cols = [
        [bytes(buf)] * n if len(buf) == w else [bytes(buf[i * w : (i + 1) * w]) for i in range(n)]
        for buf, w in parts
    ]
    return b"".join(b"".join(rec) for rec in zip(*cols, strict=True))


def zip_into(dst: bytearray, at: int, n: int, *parts: tuple[Buffer, int]) -> int:
    """`zip_records` written into dst from byte `at`; returns the byte after the last."""
    width = sum(w for _, w in parts)
    if native is not None:
        native.zip_into(dst, at, n, *parts)
    else:
        dst[at : at + n * width] = zip_records(n, *parts)
    return at + n * width


def select_fields(data: Buffer, width: int, fields: Sequence[tuple[int, int]]) -> bytes:
    """Each width-byte record remade from its fields (offset, length), in that order."""
    if native is not None:
        out: bytes = native.select_fields(data, width, fields)
        return out
    view = memoryview(data).cast("B")
    return b"".join(
        bytes(view[at + off : at + off + n])
        for at in range(0, len(view), width)
        for off, n in fields
    )


def xor_fold(data: Buffer, width: int) -> bytes:
    """The XOR of all width-byte records (big-endian bytes of width bytes)."""
    if native is not None:
        out: bytes = native.xor_fold(data, width)
        return out
    acc = 0
    for i in range(0, len(data), width):
        acc ^= int.from_bytes(data[i : i + width], "big")
    return acc.to_bytes(width, "big")


def split_unique(data: Buffer, width: int, code_bytes: int = 1) -> tuple[dict[int, bytes], bytes]:
    """Records sorted by their key (all but the last `code_bytes` bytes, a code of one
    or two bytes, big-endian): the keys that occur once, back to back by code, and
    the records of keys that occur more than once."""
    if native is not None:
        out: tuple[dict[int, bytes], bytes] = native.split_unique(data, width, code_bytes)
        return out
    if code_bytes not in (1, 2) or width <= code_bytes or len(data) % width:
        raise ValueError("data must be whole records, each a key and a code of 1 or 2 bytes")
    k = width - code_bytes
    recs = [bytes(data[i : i + width]) for i in range(0, len(data), width)]
    once: dict[int, list[bytes]] = {}
    multi: list[bytes] = []
    for i, r in enumerate(recs):
        if (i > 0 and recs[i - 1][:k] == r[:k]) or (i + 1 < len(recs) and recs[i + 1][:k] == r[:k]):
            multi.append(r)
        else:
            once.setdefault(int.from_bytes(r[k:], "big"), []).append(r[:k])
    return {c: b"".join(keys) for c, keys in sorted(once.items())}, b"".join(multi)


def shuffle(items: list[T]) -> None:
    """Shuffle in place, the randomness from the OS: in C (keyed BLAKE3 under a fresh
    seed) when the module is built, else `secrets.SystemRandom`. (A list of one or
    none has one order: no seed drawn, as for each lone online-check probe.)"""
    if len(items) < 2:
        return
    if native is not None:
        native.shuffle(items, os.urandom(32))
    else:
        secrets.SystemRandom().shuffle(items)


def shuffle_records(buf: bytearray, width: int) -> None:
    """`shuffle` on packed records of `width` bytes, in place: in C without a Python
    object per record where the module is built."""
    if native is not None:
        native.shuffle_records(buf, width, os.urandom(32))
        return
    items = [bytes(buf[i : i + width]) for i in range(0, len(buf), width)]
    shuffle(items)
    buf[:] = b"".join(items)
