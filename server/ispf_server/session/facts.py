"""The facts of a session, as far as they are known: one record, kept by its
lifecycle and filled in as the session learns them, from which its audit entry,
its row in the store and its status are all built."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ispf.v1 import common_pb2
from ispf_server.audit import SessionEntry
from ispf_server.session.progress import Snapshot
from ispf_server.storage.sessions import SessionRow, SessionTotals

if TYPE_CHECKING:
    from ispf_server.session.match.rows import Outcome
    from ispf_server.session.plan import Plan, SyncSide

INITIATOR = "initiator"
RESPONDER = "responder"


class SyncKind(enum.Enum):
    """Whether a session runs over the pair's kept state, and how: decided once, when
    its side is planned (`plan.prepare`)."""

    NONE = "none"  # a one-off session: count-only, or limited to some collections
    FULL = "full"  # kept state replaced from empty
    INCREMENTAL = "incremental"  # kept state adjusted by both sides' changes

    @property
    def shown(self) -> str:
        """As the session's row and status show it (none: empty)."""
        return "" if self is SyncKind.NONE else self.value


@dataclass
class SessionFacts:
    """What is known of a session, from this node's side (`role`)."""

    session_id: str
    province: str  # this node
    peer: str
    role: str  # INITIATOR or RESPONDER: this node's
    purpose: str
    epoch: int
    mode: int
    sync: SyncKind = SyncKind.NONE
    own_records: int = 0  # records that take part
    own_values: int = 0
    peer_values: int = 0
    own_groups: int = 0
    peer_groups: int = 0
    own_removed: int = 0
    peer_removed: int = 0
    own_declared: int = 0  # registry sizes declared in the handshake
    peer_declared: int = 0

    @property
    def labelled(self) -> bool:
        return self.mode == common_pb2.MODE_MUTUAL

    def own_side(self, plan: Plan, side: SyncSide | None, held_ids: int) -> None:
        """This side's figures, from what it sends (`plan`), its kept state (`side`,
        sync sessions) and how many distinct IDs its registry holds: both roles alike."""
        self.sync = side.kind if side else SyncKind.NONE
        self.own_records = side.own_records if side else plan.own_records
        self.own_values = plan.total
        self.own_removed = len(side.removed_tags) if side else 0
        # (never below the set sent: the registry may have shrunk since the plan)
        self.own_declared = max(held_ids, plan.total)

    @classmethod
    def from_row(cls, province: str, row: SessionRow) -> SessionFacts:
        """A stored session's facts, as far as its row keeps them (a crashed one's)."""
        return cls(row.session_id, province, row.peer, row.role, row.purpose, row.epoch, row.mode)

    def entry(
        self,
        outcome: str,
        *,
        at: str,
        result: Outcome | None = None,
        reason: str | None = None,
    ) -> SessionEntry:
        """The session's audit entry, at time `at` (the caller's clock)."""
        own_first = self.role == INITIATOR

        def ordered(own: int, peer: int) -> tuple[int, int]:
            return (own, peer) if own_first else (peer, own)

        values = ordered(self.own_values, self.peer_values)
        groups = ordered(self.own_groups, self.peer_groups)
        removed = ordered(self.own_removed, self.peer_removed)
        declared = ordered(self.own_declared, self.peer_declared)
        # (a count-only session's responder learns no count)
        known = result is not None and (self.labelled or own_first)
        return SessionEntry(
            session_id=self.session_id,
            initiator=self.province if own_first else self.peer,
            responder=self.peer if own_first else self.province,
            purpose=self.purpose,
            epoch=self.epoch,
            mode=self.mode,
            outcome=outcome,
            time=at,
            initiator_values=values[0],
            responder_values=values[1],
            initiator_groups=groups[0],
            responder_groups=groups[1],
            match_count=result.match_count if known and result is not None else None,
            result_digest=result.digest if result is not None else b"",
            reason=reason,
            sync=self.sync.value,
            initiator_removed=removed[0],
            responder_removed=removed[1],
            initiator_declared=declared[0],
            responder_declared=declared[1],
        )

    def totals(self, result: Outcome) -> SessionTotals:
        """What the completed session's row records."""
        return SessionTotals(
            own_records=self.own_records,
            own_values=self.own_values,
            peer_values=self.peer_values,
            match_count=result.match_count,
            result_digest=result.digest,
            matched_records=result.matched_records,
            sync=self.sync.shown,
            own_removed=self.own_removed,
            peer_removed=self.peer_removed,
        )

    def status(self) -> dict[str, int | str]:
        """The status fields these facts fill (the counters come as the work goes)."""
        return {
            "own_records": self.own_records,
            "own_values": self.own_values,
            "peer_values": self.peer_values,
            "work_total": self.own_values + self.peer_values,
            "sync": self.sync.shown,
            "own_removed": self.own_removed,
            "peer_removed": self.peer_removed,
        }

    def snapshot(self, phase: str) -> Snapshot:
        return Snapshot(
            session_id=self.session_id,
            peer=self.peer,
            role=self.role,
            mode=self.mode,
            purpose=self.purpose,
            epoch=self.epoch,
            phase=phase,
            **self.status(),  # type: ignore[arg-type]
        )
