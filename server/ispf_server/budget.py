"""Per-peer, per-epoch query budgets: how many values a peer may submit to this node.

A peer chooses its own set, so every value it submits is a membership question
about this node's registry. Whatever the kind of call (a full or incremental
run, a count-only or filtered one-off, an online-check probe), the values it
submits are charged to one budget per (peer, epoch), kept in the store (a
restart does not reset it). The allowance is `budget_multiple` times the
registry size the peer declared in its handshake (capped at `max_set_size`)
plus `budget_daily` for each UTC day since its first charge in the epoch. Past
it the node refuses with RESOURCE_EXHAUSTED (`BudgetExhausted`), logs a
warning and counts the refusal in a metric; the caller writes the audit entry.

Values are counted as submitted, not as distinct IDs: the node cannot tell a
re-run from a new set under fresh keys, so every run costs its set again (an
upper bound on what the peer learns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from ispf.errors import BudgetExhausted, ProtocolViolation
from ispf_server.policy import PeerPolicy
from ispf_server.storage import Store

log = logging.getLogger(__name__)

# A declared registry size of a billion or more is refused (no province holds as
# many, and a 13-digit number a peer chose must not reach a log or the store).
MAX_DECLARED = 10**9


def utc_day() -> str:
    return datetime.now(UTC).date().isoformat()


def _days(first_day: str, today: str) -> int:
    """Days since the first charge, that day included (1 on the first day)."""
    return (date.fromisoformat(today) - date.fromisoformat(first_day)).days + 1


@dataclass(frozen=True, slots=True)
class BudgetState:
    peer: str
    epoch: int
    declared: int
    used: int
    allowance: int
    refused: int

    @property
    def left(self) -> int:
        return max(0, self.allowance - self.used)


class QueryBudget:
    """Charges peers' submitted values against their budgets, in the store."""

    def __init__(
        self,
        store: Store,
        on_refused: Callable[[str], None] = lambda peer: None,
        today: Callable[[], str] = utc_day,
    ) -> None:
        self.store = store
        self.on_refused = on_refused
        self.today = today

    def charge(
        self,
        pp: PeerPolicy,
        epoch: int,
        values: int,
        *,
        declared: int = 0,
        what: str,
        check_only: bool = False,
    ) -> BudgetState:
        """Charge `values` submitted by `pp.peer` (for `what`, as said in a refusal);
        raise BudgetExhausted, with the figures, if the budget does not allow them.
        `check_only`: refused as ever where they do not fit, but not charged where
        they do (the charge comes later)."""
        today = self.today()
        row = self.store.budgets.charge(
            pp.peer,
            epoch,
            values,
            declared,
            today,
            lambda size, first: pp.budget_allowance(size, _days(first, today)),
            check_only=check_only,
        )
        state = BudgetState(pp.peer, epoch, row.declared, row.used, row.allowance, row.refused)
        if not row.charged:
            self.on_refused(pp.peer)
            log.warning(
                "query budget of %s in epoch %d is spent: %s of %d values refused (%d of %d used)",
                pp.peer,
                epoch,
                what,
                values,
                row.used,
                row.allowance,
            )
            raise BudgetExhausted(
                f"query budget of {pp.peer} with this node for epoch {epoch} is spent: "
                f"{row.used} of {row.allowance} values used, this {what} would add {values}. "
                f"The budget is {pp.budget_multiple} x the declared registry size "
                f"({row.declared}) plus {pp.budget_daily} a day (policy); it grows again "
                "tomorrow (UTC) or in a new epoch"
            )
        return state

    def state(self, pp: PeerPolicy, epoch: int) -> BudgetState:
        """The peer's budget in the epoch as it stands (nothing charged)."""
        today = self.today()
        held = self.store.budgets.get(pp.peer, epoch)
        declared, used, refused, first = held or (0, 0, 0, today)
        allowance = pp.budget_allowance(declared, _days(first, today))
        return BudgetState(pp.peer, epoch, declared, used, allowance, refused)


def check_declared(who: str, announced: int, declared: int) -> None:
    """A peer's set may not be larger than the registry it declares (nor that
    registry implausibly large): ProtocolViolation."""
    if declared >= MAX_DECLARED:
        raise ProtocolViolation(
            f"the registry size {who} declares is not plausible (a billion or more)"
        )
    if declared and announced > declared:
        raise ProtocolViolation(
            f"the set of {announced} values is larger than the registry of "
            f"{declared} IDs {who} declares"
        )
