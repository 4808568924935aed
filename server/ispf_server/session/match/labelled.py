"""Labelled one-off sessions: own records whose tag the peer also holds, with the
peer's labels for each, without pair state."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from pathlib import Path

from ispf.blinding import TAG_BYTES
from ispf.errors import ProtocolViolation
from ispf.nid import PackedNids
from ispf_server.records import (
    ExternalSort,
    TagSpool,
    join_sorted,
    select_fields,
    unique,
    zip_records,
)
from ispf_server.session.match.rows import (
    ROW_BATCH,
    Found,
    Matched,
    RowBatches,
    RowSink,
    named_rows,
)
from ispf_server.session.plan import LabelSet, Plan

WINDOW = 1 << 16  # IDs of the send order read at a time, to name matches by position


class OneOffLabelled:
    """The matcher of a labelled session without pair state (both roles): own records
    whose tag the peer also holds, with the peer's labels for each, within a fixed
    memory budget, with or without the C module (`records` chooses). The matched
    IDs' records are looked up once matched (`plan.owners`), so the plan holds no
    record objects. With `stage_rows`, rows go to the store a batch at a time as
    they are made (else they come back for the commit)."""

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
        """Each side's tags with a 4-byte group number (theirs) or position (ours)
        sorted externally and joined as they stream, many to one: every peer tag
        that is also ours is a match, a tag the peer sent twice two (each with its
        group's labels), one leaf of the digest (built as the join goes, in tag
        order: the sorted distinct tags it is defined on). Of an own tag held twice
        (two IDs with one tag) the last position is kept (`unique`). The matches are
        sorted by position and named from the send order read a window at a time."""
        if peer_tags.count != sum(self.peer_sizes):
            raise ProtocolViolation(
                f"{peer_tags.count} peer tags for {sum(self.peer_sizes)} announced"
            )
        if self.plan.total >= 1 << 32 or len(self.peer_sizes) >= 1 << 32:
            raise ValueError(
                f"{self.plan.total} own values or {len(self.peer_sizes)} peer groups: "
                "a labelled one-off match numbers them in 4 bytes (under 2^32 each)"
            )
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
            # tag | group | position, in tag order
            for joined in join_sorted(
                peer.sorted_chunks(),
                width,
                unique(own.sorted_chunks(), width, TAG_BYTES),
                width,
                TAG_BYTES,
            ):
                rows.found(joined, width + 4)
                by_position.add(
                    select_fields(joined, width + 4, ((width, 4), (0, TAG_BYTES), (TAG_BYTES, 4)))
                )
            self._rows_by_position(by_position.sorted_chunks(), rows)
        return Matched(rows.outcome())

    def _rows_by_position(
        self, matches: Iterable[bytes | bytearray | memoryview], out: RowBatches
    ) -> None:
        """Result rows from matches (position | tag | group) in position order, about a
        batch at a time, to `out`; the matches of one position (a tag the peer sent
        twice) in one batch."""
        width = 4 + TAG_BYTES + 4
        start, window = 0, PackedNids()
        found: list[Found] = []
        last = -1
        for chunk in matches:
            for at in range(0, len(chunk), width * ROW_BATCH):
                part = bytes(chunk[at : at + width * ROW_BATCH])
                for i in range(0, len(part), width):
                    p = int.from_bytes(part[i : i + 4], "big")
                    if len(found) >= ROW_BATCH and p != last:
                        out.add(named_rows(found, self.owners([nid for _, nid, _ in found])))
                        found = []
                    last = p
                    if not start <= p < start + len(window):
                        start, window = p, self.plan.order[p : p + WINDOW]
                    g = int.from_bytes(part[i + 4 + TAG_BYTES : i + width], "big")
                    found.append(
                        (part[i + 4 : i + 4 + TAG_BYTES], window[p - start], self.peer_groups[g])
                    )
        if found:
            out.add(named_rows(found, self.owners([nid for _, nid, _ in found])))


def _positions(first: int, n: int) -> bytes:
    """first, first + 1, ... as 4-byte big-endian numbers (they sort as numbers)."""
    out = array("I", range(first, first + n))
    assert out.itemsize == 4  # (on every platform the module builds for)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()
