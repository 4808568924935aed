"""Working out a session's result from both directions' tags: one `Matcher` per
kind of session, chosen in one place (`matcher_for`), the same for both roles."""

import typing

from ispf_server.session.match.count import CountOnly
from ispf_server.session.match.kept import KeptState
from ispf_server.session.match.labelled import OneOffLabelled
from ispf_server.session.match.rows import NOTHING, Matched, Outcome

if typing.TYPE_CHECKING:
    from pathlib import Path

    from ispf_server.records import TagSpool
    from ispf_server.session.match.rows import RowCarry, RowSink
    from ispf_server.session.plan import LabelSet, Plan, SyncSide


class Matcher(typing.Protocol):
    def match(self, own_tags: "TagSpool", peer_tags: "TagSpool") -> Matched:
        """The result (and, with pair state, the new state) from both sides' tags."""
        ...


def matcher_for(
    *,
    labelled: bool,
    counts: bool,
    side: "SyncSide | None",
    plan: "Plan",
    peer_groups: "list[LabelSet]",
    peer_sizes: list[int],
    peer_removed: list[bytes],
    directory: "Path | None",
    stage_rows: "RowSink | None",
    carry_rows: "RowCarry | None" = None,
    session_id: str,
) -> "Matcher | None":
    """Kept state for a sync session; a one-off labelled session's intersection; a
    count-only session's count where this side learns it (`counts`: the initiator).
    None: this side learns nothing (a count-only session's responder). A sync
    session's new runs are staged as `session_id`'s."""
    if side is not None:
        return KeptState(
            side,
            peer_groups,
            peer_sizes,
            peer_removed,
            stage_rows=stage_rows,
            carry_rows=carry_rows,
            session_id=session_id,
        )
    if labelled:
        return OneOffLabelled(
            plan, peer_groups, peer_sizes, directory=directory, stage_rows=stage_rows
        )
    return CountOnly(directory) if counts else None


__all__ = [
    "NOTHING",
    "CountOnly",
    "KeptState",
    "Matched",
    "Matcher",
    "OneOffLabelled",
    "Outcome",
    "matcher_for",
]
