"""Labelled one-off sessions: own records whose tag the peer also holds, with the
peer's labels for each, without pair state."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from pathlib import Path

from ispf.blinding import TAG_BYTES, result_digest
from ispf.nid import PackedNids
from ispf_server.records import (
    ExternalSort,
    RepeatedKey,
    TagSpool,
    compiled,
    join_sorted,
    select_fields,
    zip_records,
)
from ispf_server.session.exchange import split
from ispf_server.session.match.rows import (
    ROW_BATCH,
    Found,
    Matched,
    Outcome,
    RowBatches,
    RowSink,
    named_rows,
)
from ispf_server.session.plan import LabelSet, Plan

WINDOW = 1 << 16  # IDs of the send order read at a time, to name matches by position


class OneOffLabelled:
    """The matcher of a labelled session without pair state (both roles): own records
    whose tag the peer also holds, with the peer's labels for each. Within a fixed
    memory budget (`_sorted`) where the module is built; the matched IDs' records
    are looked up once matched (`plan.owners`), so the plan holds no record objects.
    With `stage_rows`, rows go to the store a batch at a time as they are made
    (else, as in the general path, they come back for the commit)."""

    def __init__(
        self,
        plan: Plan,
        peer_groups: list[LabelSet],
        peer_sizes: list[int],
        *,
        directory: Path | None,
        stage_rows: RowSink | None,
    ) -> None:
        if plan.owners is None:
            raise ValueError("a labelled one-off plan needs its owners lookup")
        self.plan, self.owners = plan, plan.owners
        self.peer_groups, self.peer_sizes = peer_groups, peer_sizes
        self.directory, self.stage_rows = directory, stage_rows

    def match(self, own_tags: TagSpool, peer_tags: TagSpool) -> Matched:
        if compiled() and peer_tags.count == sum(self.peer_sizes):
            try:
                return Matched(self._sorted(own_tags, peer_tags))
            except RepeatedKey:
                pass  # (a side repeats a tag: the general path counts each)
        found = self._found(own_tags.getvalue(), peer_tags.getvalue())
        rows = named_rows(found, self.owners([nid for _, nid, _ in found]))
        return Matched(Outcome(len(found), result_digest([t for t, _, _ in found]), rows))

    def _found(self, own_tags: bytes, peer_tags: bytes) -> list[Found]:
        """(tag, ID, peer labels) for each peer tag that is also ours, in the peer's order."""
        index = {t: i for i, t in enumerate(split(own_tags, TAG_BYTES))}
        found: list[Found] = []
        tags = split(peer_tags, TAG_BYTES)
        pos = 0
        for labels, size in zip(self.peer_groups, self.peer_sizes, strict=True):
            for t in tags[pos : pos + size]:
                i = index.get(t)
                if i is not None:
                    found.append((t, self.plan.order[i], labels))
            pos += size
        return found

    def _sorted(self, own_tags: TagSpool, peer_tags: TagSpool) -> Outcome:
        """The match without an object per tag: each side's tags with a 4-byte
        position (ours) or group number (theirs) sorted externally and joined as
        they stream; the digest is built as the join goes (tag order: the sorted
        tags it is defined on); the matches are sorted by position and named from
        the send order read a window at a time. RepeatedKey where a side repeats a
        tag."""
        if self.plan.total >= 1 << 32 or len(self.peer_sizes) >= 1 << 32:
            raise RepeatedKey  # (positions are 4 bytes: the general path takes it)
        width, directory = TAG_BYTES + 4, self.directory
        rows = RowBatches(self.stage_rows)
        with (
            ExternalSort(width, directory) as own,
            ExternalSort(width, directory) as peer,
            ExternalSort(width + 4, directory) as by_position,
        ):
            for _, at, tags in own_tags.grouped([own_tags.count]):
                n = len(tags) // TAG_BYTES
                own.add(zip_records(n, (tags, TAG_BYTES), (_positions(at, n), 4)))
            for g, _, tags in peer_tags.grouped(self.peer_sizes):
                n = len(tags) // TAG_BYTES
                peer.add(zip_records(n, (tags, TAG_BYTES), (g.to_bytes(4, "big"), 4)))
            # tag | position | group, in tag order
            for joined in join_sorted(own.sorted_chunks(), width, peer.sorted_chunks(), width, 16):
                rows.found(joined, width + 4)
                by_position.add(
                    select_fields(joined, width + 4, ((TAG_BYTES, 4), (0, TAG_BYTES), (width, 4)))
                )
            self._rows_by_position(by_position.sorted_chunks(), rows)
        return rows.outcome()

    def _rows_by_position(
        self, matches: Iterable[bytes | bytearray | memoryview], out: RowBatches
    ) -> None:
        """Result rows from matches (position | tag | group) in position order, a batch
        at a time, to `out`."""
        width = 4 + TAG_BYTES + 4
        start, window = 0, PackedNids()
        for chunk in matches:
            for at in range(0, len(chunk), width * ROW_BATCH):
                part = bytes(chunk[at : at + width * ROW_BATCH])
                found: list[Found] = []
                for i in range(0, len(part), width):
                    p = int.from_bytes(part[i : i + 4], "big")
                    if not start <= p < start + len(window):
                        start, window = p, self.plan.order[p : p + WINDOW]
                    g = int.from_bytes(part[i + 4 + TAG_BYTES : i + width], "big")
                    found.append(
                        (part[i + 4 : i + 4 + TAG_BYTES], window[p - start], self.peer_groups[g])
                    )
                out.add(named_rows(found, self.owners([nid for _, nid, _ in found])))


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
    """`OneOffLabelled`'s outcome, in one call."""
    matcher = OneOffLabelled(
        plan, peer_groups, peer_sizes, directory=directory, stage_rows=stage_rows
    )
    return matcher.match(own_tags, peer_tags).outcome


def _positions(first: int, n: int) -> bytes:
    """first, first + 1, ... as 4-byte big-endian numbers (they sort as numbers)."""
    out = array("I", range(first, first + n))
    assert out.itemsize == 4  # (on every platform the module builds for)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()
