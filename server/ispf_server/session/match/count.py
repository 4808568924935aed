"""Count-only sessions: how many tags both sides hold, and nothing else."""

from __future__ import annotations

from pathlib import Path

from ispf.blinding import TAG_BYTES
from ispf_server.records import ExternalSort, TagSpool, join_sorted, unique
from ispf_server.session.match.rows import Matched, Outcome


class CountOnly:
    """The initiator's matcher of a count-only session (the responder learns nothing)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def match(self, own_tags: TagSpool, peer_tags: TagSpool) -> Matched:
        return Matched(Outcome(count_common(own_tags, peer_tags, self.directory), b"", []))


def count_common(own_tags: TagSpool, peer_tags: TagSpool, directory: Path | None) -> int:
    """How many distinct tags both sides hold (a count-only session's result): each
    side sorted within the memory budget (`ExternalSort`), each tag kept once
    (`unique`: a side may repeat one) and joined as they stream (in C where the
    module is built: `records` chooses)."""
    with (
        ExternalSort(TAG_BYTES, directory) as own,
        ExternalSort(TAG_BYTES, directory) as peer,
    ):
        for chunk in own_tags.chunks():
            own.add(chunk)
        for chunk in peer_tags.chunks():
            peer.add(chunk)
        joined = join_sorted(
            unique(own.sorted_chunks(), TAG_BYTES, TAG_BYTES),
            TAG_BYTES,
            unique(peer.sorted_chunks(), TAG_BYTES, TAG_BYTES),
            TAG_BYTES,
            TAG_BYTES,
        )
        return sum(len(j) // TAG_BYTES for j in joined)
