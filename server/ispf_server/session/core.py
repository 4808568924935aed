"""Pieces both roles of a session use: chunking, stream checks, intersection."""

from __future__ import annotations

import contextvars
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ispf.blinding import POINT_BYTES, TAG_BYTES, result_digest
from ispf.errors import ProtocolViolation
from ispf.merkle import RootBuilder, leaf_hash
from ispf.nid import PackedNids
from ispf.protocol import MAX_CHUNK_VALUES
from ispf.v1 import peer_pb2
from ispf_server.records import (
    ExternalSort,
    RepeatedKey,
    TagSpool,
    compiled,
    join_sorted,
    select_fields,
    zip_records,
)
from ispf_server.session.plan import LabelSet, Plan
from ispf_server.storage.registry import StoredRecord
from ispf_server.storage.sessions import MatchRow

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


RowSink = Callable[[list[MatchRow]], bool]  # stages some result rows; False: session gone
ROW_BATCH = 20_000  # matches whose result rows are made (and staged) at a time
WINDOW = 1 << 16  # IDs of the send order read at a time, to name matches by position


class RowBatches:
    """A session's result as its join finds it: the digest, leaf by leaf in tag
    order (`found`), and the rows, a batch of matched IDs at a time (each ID in
    one batch only; `add`), staged to the store with `stage` (then only how many
    records they name is kept), else gathered for the commit."""

    def __init__(self, stage: RowSink | None) -> None:
        self.stage = stage
        self.gathered: list[MatchRow] = []
        self.named = 0
        self.digest = RootBuilder()
        self._open = True

    def found(self, joined: bytes, width: int) -> None:
        """Matches from a join: records of `width` bytes led by their tag, in tag order."""
        for at in range(0, len(joined), width):
            self.digest.add(leaf_hash(joined[at : at + TAG_BYTES]))

    def add(self, rows: list[MatchRow]) -> None:
        self.named += len({r.record_id for r in rows})
        if self.stage is None:
            self.gathered += rows
        elif self._open:
            self._open = self.stage(rows)  # (False: the session failed; its rows are deleted)

    def outcome(self) -> Outcome:
        staged = None if self.stage is None else self.named
        return Outcome(self.digest.size, self.digest.root(), self.gathered, staged)


def intersect(
    plan: Plan,
    own_tags: TagSpool,
    peer_groups: list[LabelSet],
    peer_sizes: list[int],
    peer_tags: TagSpool,
    *,
    directory: Path | None,
    stage_rows: RowSink | None = None,
) -> Outcome:
    """Own records whose tag the peer also holds, with the peer's labels for each: a
    labelled session without pair state. Within a fixed memory budget
    (`_intersect_sorted`) where the module is built; the matched IDs' records are
    looked up once matched (`plan.owners`), so the plan holds no record objects.
    With `stage_rows`, rows go to the store a batch at a time as they are made
    (else, as in the general path, they come back for the commit)."""
    if plan.owners is None:
        raise ValueError("a labelled one-off plan needs its owners lookup")
    if compiled() and peer_tags.count == sum(peer_sizes):
        try:
            return _intersect_sorted(
                plan, own_tags, peer_groups, peer_sizes, peer_tags, directory, stage_rows
            )
        except RepeatedKey:
            pass  # (a side repeats a tag: the general path counts each)
    found = _found(plan, own_tags.getvalue(), peer_groups, peer_sizes, peer_tags.getvalue())
    rows = _named_rows(found, plan.owners([nid for _, nid, _ in found]))
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


def _positions(first: int, n: int) -> bytes:
    """first, first + 1, ... as 4-byte big-endian numbers (they sort as numbers)."""
    out = array("I", range(first, first + n))
    assert out.itemsize == 4  # (on every platform the module builds for)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


def _intersect_sorted(
    plan: Plan,
    own_tags: TagSpool,
    peer_groups: list[LabelSet],
    peer_sizes: list[int],
    peer_tags: TagSpool,
    directory: Path | None,
    stage_rows: RowSink | None,
) -> Outcome:
    """`intersect` within a fixed memory budget, without an object per tag: each
    side's tags with a 4-byte position (ours) or group number (theirs) sorted
    externally and joined as they stream; the digest is built as the join goes
    (tag order: the sorted tags it is defined on); the matches are sorted by
    position and named from the send order read a window at a time. RepeatedKey
    where a side repeats a tag."""
    if plan.total >= 1 << 32 or len(peer_sizes) >= 1 << 32:
        raise RepeatedKey  # (positions are 4 bytes: the general path takes it)
    width = TAG_BYTES + 4
    rows = RowBatches(stage_rows)
    with (
        ExternalSort(width, directory) as own,
        ExternalSort(width, directory) as peer,
        ExternalSort(width + 4, directory) as by_position,
    ):
        for _, at, tags in own_tags.grouped([own_tags.count]):
            n = len(tags) // TAG_BYTES
            own.add(zip_records(n, (tags, TAG_BYTES), (_positions(at, n), 4)))
        for g, _, tags in peer_tags.grouped(peer_sizes):
            n = len(tags) // TAG_BYTES
            peer.add(zip_records(n, (tags, TAG_BYTES), (g.to_bytes(4, "big"), 4)))
        # tag | position | group, in tag order
        for joined in join_sorted(own.sorted_chunks(), width, peer.sorted_chunks(), width, 16):
            rows.found(joined, width + 4)
            by_position.add(
                select_fields(joined, width + 4, ((TAG_BYTES, 4), (0, TAG_BYTES), (width, 4)))
            )
        _rows_by_position(plan, by_position.sorted_chunks(), peer_groups, rows)
    return rows.outcome()


def _rows_by_position(
    plan: Plan,
    matches: Iterable[bytes | bytearray | memoryview],
    peer_groups: list[LabelSet],
    out: RowBatches,
) -> None:
    """Result rows from matches (position | tag | group) in position order, a batch
    at a time, to `out`."""
    assert plan.owners is not None
    width = 4 + TAG_BYTES + 4
    start, window = 0, PackedNids()
    for chunk in matches:
        for at in range(0, len(chunk), width * ROW_BATCH):
            part = bytes(chunk[at : at + width * ROW_BATCH])
            found: list[tuple[bytes, bytes, LabelSet]] = []
            for i in range(0, len(part), width):
                p = int.from_bytes(part[i : i + 4], "big")
                if not start <= p < start + len(window):
                    start, window = p, plan.order[p : p + WINDOW]
                group = peer_groups[int.from_bytes(part[i + 4 + TAG_BYTES : i + width], "big")]
                found.append((part[i + 4 : i + 4 + TAG_BYTES], window[p - start], group))
            out.add(_named_rows(found, plan.owners([nid for _, nid, _ in found])))


def _named_rows(
    found: list[tuple[bytes, bytes, LabelSet]], owners: Mapping[bytes, list[StoredRecord]]
) -> list[MatchRow]:
    """A row per (own record, peer label) of each match (tag, ID, peer labels)."""
    rows: list[MatchRow] = []
    for t, nid, labels in found:
        for rec in owners.get(nid, ()):
            rows.extend(MatchRow(rec.record_id, rec.label, pl, t) for pl in labels)
    return rows


def count_common(own_tags: TagSpool, peer_tags: TagSpool, directory: Path | None) -> int:
    """How many distinct tags both sides hold (a count-only session's result): each
    side sorted within the memory budget (`ExternalSort`) and joined as they
    stream, in C; a set intersection without the module, or where a side repeats
    a tag."""
    if compiled():
        try:
            with (
                ExternalSort(TAG_BYTES, directory) as own,
                ExternalSort(TAG_BYTES, directory) as peer,
            ):
                for chunk in own_tags.chunks():
                    own.add(chunk)
                for chunk in peer_tags.chunks():
                    peer.add(chunk)
                joined = join_sorted(
                    own.sorted_chunks(), TAG_BYTES, peer.sorted_chunks(), TAG_BYTES, TAG_BYTES
                )
                return sum(len(j) // TAG_BYTES for j in joined)
        except RepeatedKey:
            pass
    mine = set(split(own_tags.getvalue(), TAG_BYTES))
    return len(mine.intersection(split(peer_tags.getvalue(), TAG_BYTES)))


__all__ = [
    "POINT_BYTES",
    "TAG_BYTES",
    "Outcome",
    "checked_chunks",
    "chunked",
    "count_common",
    "intersect",
    "split",
]
