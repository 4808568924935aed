"""Count-only sessions: how many tags both sides hold, and nothing else."""

from __future__ import annotations

from pathlib import Path

from ispf.blinding import TAG_BYTES
from ispf_server.records import ExternalSort, RepeatedKey, TagSpool, compiled, join_sorted
from ispf_server.session.exchange import split
from ispf_server.session.match.rows import Matched, Outcome


class CountOnly:
    """The initiator's matcher of a count-only session (the responder learns nothing)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def match(self, own_tags: TagSpool, peer_tags: TagSpool) -> Matched:
        return Matched(Outcome(count_common(own_tags, peer_tags, self.directory), b"", []))


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
