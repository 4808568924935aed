"""Sorting and joining runs of fixed-width records within a fixed memory budget.

A full reconciliation of a registry of tens of millions sorts hundreds of
megabytes of packed records (tags with IDs, a pair's state). Sorting them in
one buffer makes a node's memory grow with its registry. `ExternalSort` takes
records as they come, sorts each budget's worth in place and spills it to an
unlinked temporary file in the node's own store directory (as a session's tags
are spooled: nothing is left behind, even after a crash); the sorted runs are
then merged a block of each at a time (in C where built: `ops`). Memory stays at about the budget
however many records there are; only the temporary disk grows (the records'
own size, once). (The merge reads at least MIN_BLOCK from each run at a time,
so past budget * budget / (2 * MIN_BLOCK) bytes of records, 8 GiB at the
defaults, its blocks outgrow the budget: 64 KiB per budget's worth.)

`join_sorted` joins two such sorted streams on their key as they come (many to
one: the left may repeat a key, the right holds each once), `unique` keeps the
last record of each key of a stream, and `ascending` checks that a stream holds
no key twice, across its chunks too. They run the same with or without the C
module (`ops` chooses), so the session code has one path.
The records are tags, IDs and label-set numbers, never the salt or a key.
"""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ispf.errors import RepeatedKey
from ispf_server.records.ops import (
    has_repeat,
    merge_join,
    merge_sorted,
    select_fields,
    sort_inplace,
    zip_records,
)
from ispf_server.records.spool import TagSpool

Buffer = bytes | bytearray | memoryview

BUDGET = 16 << 20  # bytes one sort holds at a time (its buffer, or its merge's blocks)
MIN_BLOCK = 64 << 10  # bytes read from each spilled run at a time, at least


class ExternalSort:
    """Fixed-width records sorted bytewise, within `budget` bytes of memory.

    `add` records in any order and any amounts, then read them back once, in
    order, from `sorted_chunks`. Input that fits the budget is sorted in memory
    and never touches the disk. Close it (or use it as a context manager) to
    drop its temporary file early; an abandoned sort's file goes with it."""

    def __init__(self, width: int, directory: Path | None, *, budget: int | None = None) -> None:
        if width < 1:
            raise ValueError("records must be at least one byte wide")
        self.width = width
        self.count = 0
        budget = BUDGET if budget is None else budget  # (read here: tests lower it)
        self._cap = max(1, budget // width) * width  # bytes of whole records
        self._buf = bytearray()
        self._directory = directory
        self._spill: TagSpool | None = None
        self._runs: list[tuple[int, int]] = []  # (first, stop) record positions in _spill
        self._read = False

    @property
    def spilled_runs(self) -> int:
        return len(self._runs)

    def add(self, data: Buffer) -> None:
        if self._read:
            raise RuntimeError("records added after the sort was read")
        w = self.width
        if len(data) % w:
            raise ValueError(f"{len(data)} bytes are not whole {w}-byte records")
        view = memoryview(data).cast("B")
        at = 0
        while at < len(view):
            take = view[at : at + self._cap - len(self._buf)]
            self._buf += take
            at += len(take)
            if len(self._buf) == self._cap:
                self._spill_buffer()
        self.count += len(view) // w

    def _spill_buffer(self) -> None:
        if not self._buf:
            return
        sort_inplace(self._buf, self.width)
        if self._spill is None:
            self._spill = TagSpool(self._directory, self.width)
        first = self._spill.count
        self._spill.append(self._buf)
        self._runs.append((first, self._spill.count))
        self._buf = bytearray()

    def sorted_chunks(self) -> Iterator[Buffer]:
        """Every record added, in order, in chunks (each within the budget). Once."""
        if self._read:
            raise RuntimeError("a sort is read once")
        self._read = True
        try:
            if not self._runs:
                buf, self._buf = self._buf, bytearray()
                sort_inplace(buf, self.width)
                if buf:
                    yield buf
                return
            self._spill_buffer()
            yield from self._merged()
        finally:
            self.close()

    def _merged(self) -> Iterator[Buffer]:
        """The spilled runs merged a round at a time: each run holds a block read from
        disk; every record up to the smallest last record of a block whose run goes
        on is final, and those records of all blocks are merged and given out. That
        block's run is then read on, so each round ends at least one block."""
        assert self._spill is not None
        spill, w, runs = self._spill, self.width, self._runs
        block = max(MIN_BLOCK // w, self._cap // w // (2 * len(runs)), 1)
        nxt = [first for first, _ in runs]
        pending: list[memoryview] = [memoryview(b"")] * len(runs)

        def refill(r: int) -> None:
            if not pending[r] and nxt[r] < runs[r][1]:
                stop = min(nxt[r] + block, runs[r][1])
                pending[r] = memoryview(spill.read(nxt[r], stop))
                nxt[r] = stop

        for r in range(len(runs)):
            refill(r)
        while any(pending):
            going_on = [bytes(p[-w:]) for r, p in enumerate(pending) if nxt[r] < runs[r][1]]
            bound = min(going_on) if going_on else None
            pieces = []
            for r, p in enumerate(pending):
                cut = len(p) if bound is None else w * upper_bound(p, w, w, bound)
                if cut:
                    pieces.append(p[:cut])
                    pending[r] = p[cut:]
            yield merge_sorted(pieces, w)
            del pieces
            for r in range(len(runs)):
                refill(r)

    def close(self) -> None:
        self._buf = bytearray()
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def __enter__(self) -> ExternalSort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upper_bound(data: Buffer, width: int, key: int, bound: bytes) -> int:
    """How many records of the sorted `data` have a key (first `key` bytes) <= bound."""
    return bisect_right(
        range(len(data) // width), bound, key=lambda i: bytes(data[i * width : i * width + key])
    )


def ascending(chunks: Iterable[Buffer], width: int, key: int) -> Iterator[Buffer]:
    """The chunks of a sorted stream, as they come; RepeatedKey where a key appears
    twice (within a chunk, or at the end of one and the start of the next)."""
    last: bytes | None = None
    for chunk in chunks:
        if not chunk:
            continue
        first = bytes(chunk[:key])
        if (last is not None and first <= last) or has_repeat(chunk, width, key):
            raise RepeatedKey
        last = bytes(chunk[len(chunk) - width : len(chunk) - width + key])
        yield chunk


def lower_bound(data: Buffer, width: int, key: int, bound: bytes) -> int:
    """How many records of the sorted `data` have a key (first `key` bytes) < bound."""
    return bisect_left(
        range(len(data) // width), bound, key=lambda i: bytes(data[i * width : i * width + key])
    )


def unique(
    chunks: Iterable[Buffer],
    width: int,
    key: int,
    dropped: Callable[[bytes], None] | None = None,
) -> Iterator[Buffer]:
    """The records of a sorted stream, each key once: of records that share a key
    (first `key` bytes), the last, which sorts highest, is kept, within a chunk
    and across chunks alike. The records left out go to `dropped`, if given.

    A chunk without a repeat (`has_repeat`) passes as it is, less its last record,
    held back until the next chunk's first key is seen: then it is given out alone,
    or dropped where that key is the same. Only a chunk with a repeat (a peer that
    sends a tag twice) is read record by record."""
    held = b""  # the last record so far, not given out yet
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        if not view:
            continue
        if held:
            if bytes(view[:key]) == held[:key]:
                if dropped is not None:
                    dropped(held)
            else:
                yield held
        if has_repeat(view, width, key):
            kept, gone = _last_of_each(view, width, key)
            if dropped is not None:
                dropped(gone)
            view = memoryview(kept)
        held = bytes(view[len(view) - width :])
        if len(view) > width:
            yield view[: len(view) - width]
    if held:
        yield held


def _last_of_each(view: memoryview, width: int, key: int) -> tuple[bytes, bytes]:
    """A sorted chunk's records split: the last of each key, and the others."""
    kept, gone = bytearray(), bytearray()
    n = len(view)
    for at in range(0, n, width):
        nxt = at + width
        rec = view[at:nxt]
        if nxt < n and view[nxt : nxt + key] == view[at : at + key]:
            gone += rec
        else:
            kept += rec
    return bytes(kept), bytes(gone)


def join_sorted(
    left: Iterable[Buffer], lw: int, right: Iterable[Buffer], rw: int, key: int
) -> Iterator[bytes]:
    """Two streams of records sorted by their first `key` bytes joined as they come,
    many to one: for each left record whose key the right holds, that record and
    the right one's bytes after the key (as `ops.merge_join`). Left records may
    share a key (each is joined); a key twice on the right raises RepeatedKey
    (`unique` first, where it may). Both streams are read to their end (their
    consumers may be writing them out as they pass). Memory: a chunk of each."""
    lit = iter(chunk for chunk in left if len(chunk))
    rit = iter(ascending(right, rw, key))
    a = b = memoryview(b"")
    while True:
        if not a:
            a = memoryview(next(lit, b"")).cast("B")
        if not b:
            b = memoryview(next(rit, b"")).cast("B")
        if not a or not b:
            break  # one stream is done: nothing more can match
        # Every later right record has a key above its pending chunk's last, and every
        # later left record a key at least its pending chunk's last.
        last_a = bytes(a[len(a) - lw : len(a) - lw + key])
        bound = min(last_a, bytes(b[len(b) - rw : len(b) - rw + key]))
        ca, cb = lw * upper_bound(a, lw, key, bound), rw * upper_bound(b, rw, key, bound)
        joined = merge_join(a[:ca], lw, b[:cb], rw, key)
        if joined:
            yield joined
        if bound == last_a:  # (the right record of that key, if any, waits for more left)
            cb = rw * lower_bound(b, rw, key, bound)
        a, b = a[ca:], b[cb:]
    for _ in lit:
        pass
    for _ in rit:
        pass


def written(chunks: Iterable[Buffer], write: Callable[[Buffer], None]) -> Iterator[Buffer]:
    """The chunks, each handed to `write` as it passes (a run staged as it is joined)."""
    for chunk in chunks:
        write(chunk)
        yield chunk


SHUFFLE_KEY = 12  # random bytes per record: two equal keys are about n^2 / 2^97 likely


def shuffled(chunks: Iterable[Buffer], width: int, directory: Path | None) -> Iterator[bytes]:
    """The records of `chunks` in a random order, within the sort budget: each gets 12
    random bytes from the OS in front and the lot is sorted (an external sort);
    the keys are then cut off. (Two equal keys would keep those two records in
    byte order.)"""
    w = SHUFFLE_KEY + width
    with ExternalSort(w, directory) as out:
        for chunk in chunks:
            n = len(chunk) // width
            keys = os.urandom(SHUFFLE_KEY * n)
            out.add(zip_records(n, (keys, SHUFFLE_KEY), (chunk, width)))
        for part in out.sorted_chunks():
            yield bytes(select_fields(part, w, ((SHUFFLE_KEY, width),)))
