"""Each peer's query budget per epoch, as the store keeps it (`budget.py` decides
the allowance; this room only counts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ispf_server.storage.db import Database, storage_errors

SCHEMA = """
-- Each peer's query budget per epoch: values it submitted (sessions of every kind
-- and probes), the registry size it last declared, and refusals once spent.
CREATE TABLE IF NOT EXISTS query_budget (
    peer      TEXT NOT NULL,
    epoch     INTEGER NOT NULL,
    declared  INTEGER NOT NULL DEFAULT 0,
    used      INTEGER NOT NULL DEFAULT 0,
    refused   INTEGER NOT NULL DEFAULT 0,
    first_day TEXT NOT NULL,
    PRIMARY KEY (peer, epoch)
);
"""


@dataclass(frozen=True, slots=True)
class BudgetRow:
    peer: str
    epoch: int
    declared: int
    used: int
    refused: int
    first_day: str
    allowance: int
    charged: bool


class Budgets:
    def __init__(self, db: Database) -> None:
        self._db = db

    @storage_errors
    def charge(
        self,
        peer: str,
        epoch: int,
        values: int,
        declared: int,
        today: str,
        allowance: Callable[[int, str], int],
        *,
        check_only: bool = False,
    ) -> BudgetRow:
        """Add `values` to the peer's use in the epoch if `allowance(declared, first_day)`
        allows it, in one transaction; else count a refusal. The size the allowance is
        drawn from is the first non-zero one the peer declared in the epoch: a later
        declaration cannot raise it (a peer that declared a small registry and spent its
        budget must not buy more by declaring a large one; `budget_daily` covers
        growth). Returns the row after (`charged` says which). `check_only`: a refusal
        is counted as ever, but values allowed change nothing (checked, not charged)."""
        with self._db.transaction() as cur:
            row = cur.execute(
                "SELECT declared, used, refused, first_day FROM query_budget "
                "WHERE peer=? AND epoch=?",
                (peer, epoch),
            ).fetchone()
            old_declared, used, refused, first_day = row or (0, 0, 0, today)
            size = old_declared or declared
            limit = allowance(size, first_day)
            charged = used + values <= limit
            if charged and check_only:
                return BudgetRow(peer, epoch, size, used, refused, first_day, limit, charged)
            if charged:
                used += values
            else:
                refused += 1
            cur.execute(
                "INSERT INTO query_budget VALUES (?,?,?,?,?,?) ON CONFLICT(peer, epoch) "
                "DO UPDATE SET declared=excluded.declared, used=excluded.used, "
                "refused=excluded.refused",
                (peer, epoch, size, used, refused, first_day),
            )
        return BudgetRow(peer, epoch, size, used, refused, first_day, limit, charged)

    def get(self, peer: str, epoch: int) -> tuple[int, int, int, str] | None:
        """(declared, used, refused, first day) of a peer's budget in an epoch, if any."""
        row = self._db.fetchone(
            "SELECT declared, used, refused, first_day FROM query_budget WHERE peer=? AND epoch=?",
            (peer, epoch),
        )
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]), str(row[3]))
