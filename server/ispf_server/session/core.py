"""Pieces both roles of a session use: chunking, stream checks, intersection."""

from __future__ import annotations

import contextvars
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from ispf.blinding import POINT_BYTES, TAG_BYTES, result_digest
from ispf.errors import ProtocolViolation
from ispf.hazmat.curve import native
from ispf.nid import PackedNids
from ispf.v1 import peer_pb2
from ispf_server.session.plan import LabelSet, Plan
from ispf_server.store import MatchRow

PROTOCOL_VERSION = 1
MAX_CHUNK_VALUES = 65_536
T = TypeVar("T")
S = TypeVar("S", list[bytes], PackedNids)


def in_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """Run `fn` in a new thread (with this thread's log context); its result or error."""
    fut: Future[T] = Future()
    ctx = contextvars.copy_context()

    def run() -> None:
        try:
            fut.set_result(ctx.run(fn))
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


class Stopwatch:
    """Seconds spent in each phase of a session, for its completion log line."""

    def __init__(self) -> None:
        self._at = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.phases.append((phase, now - self._at))
        self._at = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {secs:.2f} s" for name, secs in self.phases)


def chunked(items: S, size: int) -> Iterator[S]:
    """Consecutive slices of at most `size` (a list's, or packed IDs' without a copy)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def checked_chunks(
    chunks: Iterable[peer_pb2.BlindedChunk],
    *,
    session_id: str,
    item_bytes: int,
    announced: int,
    what: str,
) -> Iterator[bytes]:
    """Yield chunk payloads, enforcing session id, sequence, size and announced total."""
    total = 0
    for seq, ch in enumerate(chunks):
        if ch.session_id != session_id:
            raise ProtocolViolation(f"{what}: chunk {seq} belongs to another session")
        if ch.seq != seq:
            raise ProtocolViolation(f"{what}: chunk {ch.seq} arrived where chunk {seq} was due")
        n, rem = divmod(len(ch.values), item_bytes)
        if rem or n == 0:
            raise ProtocolViolation(
                f"{what}: chunk {seq} holds {len(ch.values)} bytes, not a positive "
                f"multiple of {item_bytes}"
            )
        if n > MAX_CHUNK_VALUES:
            raise ProtocolViolation(
                f"{what}: chunk {seq} holds {n} values, at most {MAX_CHUNK_VALUES}"
            )
        total += n
        if total > announced:
            raise ProtocolViolation(f"{what}: more than the {announced} values announced")
        yield ch.values
    if total != announced:
        raise ProtocolViolation(f"{what}: stream ended after {total} of {announced} values")


def split(packed: bytes, width: int) -> list[bytes]:
    return [packed[i : i + width] for i in range(0, len(packed), width)]


@dataclass(frozen=True)
class Outcome:
    match_count: int
    digest: bytes
    matches: list[MatchRow]  # the result rows, unless staged to the store as found:
    staged_records: int | None = None  # then how many records they name (a full run's)

    @property
    def matched_records(self) -> int:
        if self.staged_records is not None:
            return self.staged_records
        return len({m.record_id for m in self.matches})


def intersect(
    plan: Plan,
    own_tags: bytes,
    peer_groups: list[LabelSet],
    peer_sizes: list[int],
    peer_tags: bytes,
) -> Outcome:
    """Own records whose tag the peer also holds, with the peer's labels for each: a
    labelled session without pair state. The matched IDs' records are looked up
    once matched (`plan.owners`), so the plan holds no record objects."""
    if plan.owners is None:
        raise ValueError("a labelled one-off plan needs its owners lookup")
    found = _found_packed(plan, own_tags, peer_groups, peer_sizes, peer_tags)
    if found is None:
        found = _found(plan, own_tags, peer_groups, peer_sizes, peer_tags)
    owners = plan.owners([nid for _, nid, _ in found])
    rows: list[MatchRow] = []
    for t, nid, labels in found:
        for rec in owners.get(nid, ()):
            rows.extend(MatchRow(rec.record_id, rec.label, pl, t) for pl in labels)
    return Outcome(len(found), result_digest([t for t, _, _ in found]), rows)


def _found(
    plan: Plan,
    own_tags: bytes,
    peer_groups: list[LabelSet],
    peer_sizes: list[int],
    peer_tags: bytes,
) -> list[tuple[bytes, bytes, LabelSet]]:
    """(tag, ID, peer labels) for each peer tag that is also ours, in the peer's order."""
    index = {t: i for i, t in enumerate(split(own_tags, TAG_BYTES))}
    found: list[tuple[bytes, bytes, LabelSet]] = []
    tags = split(peer_tags, TAG_BYTES)
    pos = 0
    for labels, size in zip(peer_groups, peer_sizes, strict=True):
        for t in tags[pos : pos + size]:
            i = index.get(t)
            if i is not None:
                found.append((t, plan.order[i], labels))
        pos += size
    return found


def _found_packed(
    plan: Plan,
    own_tags: bytes,
    peer_groups: list[LabelSet],
    peer_sizes: list[int],
    peer_tags: bytes,
) -> list[tuple[bytes, bytes, LabelSet]] | None:
    """`_found`, in tag order, without an object per tag: each side's tags zipped with
    a 4-byte position (ours) or group number (theirs), sorted and merged in C. None
    without the module, or where a side repeats a tag (`_found` counts each)."""
    n_own, n_peer = len(own_tags) // TAG_BYTES, sum(peer_sizes)
    if native is None or len(peer_tags) != TAG_BYTES * n_peer:
        return None
    positions = array("I", range(n_own))
    if positions.itemsize != 4:
        return None
    width = TAG_BYTES + 4
    own = bytearray(native.zip_records(n_own, (own_tags, TAG_BYTES), (positions, 4)))
    del positions
    peer, tags, pos = bytearray(width * n_peer), memoryview(peer_tags), 0
    for g, size in enumerate(peer_sizes):
        part = tags[TAG_BYTES * pos : TAG_BYTES * (pos + size)]
        native.zip_into(
            peer, width * pos, size, (part, TAG_BYTES), (g.to_bytes(4, sys.byteorder), 4)
        )
        pos += size
    tags.release()
    native.sort_inplace(own, width)
    native.sort_inplace(peer, width)
    joined = native.merge_join(own, width, peer, width, TAG_BYTES)
    del own, peer
    if joined is None:
        return None
    found: list[tuple[bytes, bytes, LabelSet]] = []
    for at in range(0, len(joined), width + 4):
        rec = joined[at : at + width + 4]
        i = int.from_bytes(rec[TAG_BYTES:width], sys.byteorder)  # (array's own order)
        g = int.from_bytes(rec[width:], sys.byteorder)
        found.append((rec[:TAG_BYTES], plan.order[i], peer_groups[g]))
    return found


def count_common(own_tags: bytes, peer_tags: bytes) -> int:
    """How many distinct tags both sides hold (a count-only session's result): sorted
    and merged packed, in C, without an object per tag where the module is built; a
    set intersection otherwise, or where a side repeats a tag."""
    if native is not None:
        own, peer = bytearray(own_tags), bytearray(peer_tags)
        native.sort_inplace(own, TAG_BYTES)
        native.sort_inplace(peer, TAG_BYTES)
        joined = native.merge_join(own, TAG_BYTES, peer, TAG_BYTES, TAG_BYTES)
        if joined is not None:  # (None: a repeated tag)
            return len(joined) // TAG_BYTES
    return len(set(split(own_tags, TAG_BYTES)) & set(split(peer_tags, TAG_BYTES)))


__all__ = [
    "MAX_CHUNK_VALUES",
    "POINT_BYTES",
    "PROTOCOL_VERSION",
    "TAG_BYTES",
    "Outcome",
    "checked_chunks",
    "chunked",
    "count_common",
    "intersect",
    "split",
]
