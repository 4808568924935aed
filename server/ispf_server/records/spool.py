"""A session's data on disk: at registry scale it would be most of a node's memory.

Each direction of a session yields 16 bytes per value (160 MB at ten million),
and the send order 13 bytes per ID. A `TagSpool` appends fixed-width values to
an unlinked temporary file in the node's own store directory (so nothing is
left behind, even after a crash) and hands them back by position, in bounded
chunks. Tags are blinded values; `SpooledNids` holds the node's own IDs in send
order, beside the store that holds them anyway. The salt and keys are never in
either. The external sorts (`extsort`) spill to such files too.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import overload

from ispf.blinding import TAG_BYTES
from ispf.errors import StorageFull
from ispf.nid import NID_BYTES, PackedNids

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # values per chunk read back (16 MiB of tags)


class TagSpool:
    """Fixed-width values appended in order, read back by position."""

    def __init__(self, directory: Path | None, width: int = TAG_BYTES) -> None:
        self.width = width
        self.count = 0
        self._lock = threading.Lock()  # (appends and reads may come from other threads)
        try:
            self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (unlinked at once; closed by close)
        except OSError as exc:
            raise _unwritable(exc) from exc

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) % self.width:
            raise ValueError(f"{len(data)} bytes are not whole {self.width}-byte values")
        with self._lock:
            try:
                self._file.seek(0, 2)
                self._file.write(data)
            except OSError as exc:
                raise _unwritable(exc) from exc
            self.count += len(data) // self.width

    def read(self, start: int, stop: int) -> bytes:
        """Values [start, stop), concatenated."""
        start, stop = max(0, start), min(stop, self.count)
        if stop <= start:
            return b""
        with self._lock:
            self._file.seek(start * self.width)
            data = self._file.read((stop - start) * self.width)
        if len(data) != (stop - start) * self.width:
            raise OSError(f"tag spool: read {len(data)} bytes of {(stop - start) * self.width}")
        return data

    def chunks(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """Values [start, stop) in chunks of at most CHUNK values."""
        stop = self.count if stop is None else min(stop, self.count)
        for at in range(start, stop, CHUNK):
            yield self.read(at, min(at + CHUNK, stop))

    def grouped(self, sizes: list[int]) -> Iterator[tuple[int, int, bytes]]:
        """(group number, first position, values) for consecutive groups of these
        sizes, in chunks of at most CHUNK values that never cross a group's edge."""
        pos = 0
        for g, size in enumerate(sizes):
            at = pos
            for chunk in self.chunks(pos, pos + size):
                yield g, at, chunk
                at += len(chunk) // self.width
            pos += size

    def getvalue(self) -> bytes:
        """Every value at once (the general paths; a one-off session's matching)."""
        return self.read(0, self.count)

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> TagSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SpooledNids:
    """A full run's IDs in send order, on disk (13-byte values in a `TagSpool`), so a
    registry of tens of millions is not held in memory for the whole session.
    Indexed and sliced like `PackedNids` (a slice is read into memory: take it in
    chunks); the IDs are the node's own, in its own store directory, as its
    registry is. Closed with the session."""

    def __init__(self, spool: TagSpool) -> None:
        if spool.width != NID_BYTES:
            raise ValueError(f"IDs are {NID_BYTES}-byte values")
        self._spool = spool

    def __len__(self) -> int:
        return self._spool.count

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> PackedNids: ...
    def __getitem__(self, i: int | slice) -> bytes | PackedNids:
        n = len(self)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                raise ValueError("spooled IDs slice with step 1 only")
            return PackedNids(self._spool.read(start, stop))
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("spooled ID index out of range")
        return self._spool.read(i, i + 1)

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._spool.chunks():
            yield from PackedNids(chunk)

    def __repr__(self) -> str:
        return f"SpooledNids({len(self)} IDs)"

    def close(self) -> None:
        self._spool.close()


def _unwritable(exc: OSError) -> StorageFull:
    log.error("tag spool: %s", exc)
    return StorageFull(
        "the node's disk is full or its store directory cannot be written: the "
        "session's tags could not be kept; free space on the node and try again"
    )
