"""The course of one session, the same whichever side started it: begun (its row
and status), agreed (both results compared), committed or failed (with its one
audit entry), and what sessions of a node share to get there."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from functools import partial

from ispf.errors import ResultMismatch
from ispf.peertext import untrusted
from ispf_server.audit import AuditLog
from ispf_server.budget import QueryBudget
from ispf_server.clock import utcnow
from ispf_server.pool import BlindingPool
from ispf_server.session.facts import INITIATOR, SessionFacts
from ispf_server.session.match import Matched, Matcher, Outcome, matcher_for
from ispf_server.session.match.rows import RowCarry, RowSink
from ispf_server.session.plan import LabelSet, Plan, SyncSide
from ispf_server.session.progress import COMPLETED, FAILED, Progress, ProgressBoard, Stopwatch
from ispf_server.storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionContext:
    """What a node's sessions share, in either role."""

    province: str
    store: Store
    audit: AuditLog
    pool: BlindingPool
    budget: QueryBudget
    chunk_values: int  # values per chunk this node sends


class Lifecycle:
    """One session's row, status and audit entry, kept from its facts."""

    def __init__(self, facts: SessionFacts, ctx: SessionContext, progress: Progress) -> None:
        self.facts = facts
        self.ctx = ctx
        self.progress = progress
        self.clock = Stopwatch()

    @classmethod
    def begin(
        cls, facts: SessionFacts, ctx: SessionContext, board: ProgressBoard, *, phase: str
    ) -> Lifecycle:
        """The session's row (RUNNING) and its status on the board."""
        f = facts
        ctx.store.sessions.begin(f.session_id, f.peer, f.role, f.mode, f.purpose, f.epoch)
        return cls(facts, ctx, board.open(facts.snapshot(phase)))

    def known(self, phase: str) -> None:
        """The facts learnt in the handshake, to the status."""
        self.progress.update(phase=phase, **self.facts.status())

    @property
    def stage_rows(self) -> RowSink:
        """Where result rows go as they are made, ahead of the commit."""
        return partial(self.ctx.store.sessions.stage_matches, self.facts.session_id)

    @property
    def carry_rows(self) -> RowCarry:
        """How an incremental run keeps the result rows of the session before it."""
        return partial(self.ctx.store.sessions.carry_matches, self.facts.session_id)

    def matcher(
        self,
        plan: Plan,
        side: SyncSide | None,
        peer_groups: list[LabelSet],
        peer_sizes: list[int],
        peer_removed: list[bytes],
    ) -> Matcher | None:
        """How this side works out the result (None: it learns none, a count-only
        session's responder)."""
        return matcher_for(
            labelled=self.facts.labelled,
            counts=self.facts.role == INITIATOR,
            side=side,
            plan=plan,
            peer_groups=peer_groups,
            peer_sizes=peer_sizes,
            peer_removed=peer_removed,
            directory=self.ctx.store.directory,
            stage_rows=self.stage_rows,
            carry_rows=self.carry_rows,
            session_id=self.facts.session_id,
        )

    def stage(self, matched: Matched) -> None:
        """With pair state: the result rows written ahead, not yet read (a full run's
        new state was staged as it was built)."""
        if matched.delta is not None:
            self.ctx.store.sessions.stage_matches(self.facts.session_id, matched.outcome.matches)

    def agree(self, mine: Outcome, count: int, digest: bytes, *, also: bool = True) -> None:
        """Both sides must have found the same result (`also`: and whatever else they
        must hold the same) where they both learn it: ResultMismatch if not."""
        if not self.facts.labelled:
            return
        if not (also and count == mine.match_count and hmac.compare_digest(digest, mine.digest)):
            raise ResultMismatch(
                f"result differs: node {self.ctx.province} found {mine.match_count} matches, "
                f"peer {self.facts.peer} found {count}"
            )

    def commit(self, matched: Matched) -> None:
        """Results, the session's row and its entry, in one transaction."""
        f, out = self.facts, matched.outcome
        self.ctx.store.complete_session(
            f.session_id,
            f.totals(out),
            entry=self.ctx.audit.session_entry(f.entry("completed", at=utcnow(), result=out)),
            matches=out.matches,
            matches_staged=matched.delta is not None or out.staged_records is not None,
            pair_delta=(f.peer, f.epoch, matched.delta) if matched.delta is not None else None,
        )

    def completed(self, out: Outcome) -> None:
        """The committed session's status, and its log line."""
        self.progress.finish(
            COMPLETED,
            match_count=out.match_count,
            result_digest=out.digest,
            matched_records=out.matched_records,
        )
        log.info(
            "session %s with %s completed: %d matches (%s)",
            self.facts.session_id,
            self.facts.peer,
            out.match_count,
            self.clock,
        )

    def fail(self, reason: str, *, retriable: bool = False, keep_staging: bool = False) -> str:
        """Mark the session failed, with its entry (once however often it fails); the
        reason as recorded (it may quote what the peer sent). The pair runs it staged
        go with it, unless `keep_staging` (its matching may still write them: the
        caller drops them after, `Store.drop_staging`)."""
        reason = untrusted(reason, 300)
        f = self.facts
        log.warning("session %s with %s failed: %s", f.session_id, f.peer, reason)
        if _record_failure(self.ctx, f, reason, retriable=retriable, keep_staging=keep_staging):
            self.ctx.audit.sign_checkpoint()
        self.progress.finish(FAILED, error=reason, retriable=retriable)
        return reason


def _record_failure(
    ctx: SessionContext,
    facts: SessionFacts,
    reason: str,
    *,
    retriable: bool,
    keep_staging: bool = False,
) -> bool:
    """The session FAILED in the store, with its entry, once (False: it was not running)."""
    entry = ctx.audit.session_entry(facts.entry("failed", at=utcnow(), reason=reason))
    return ctx.store.fail_session(
        facts.session_id,
        reason,
        entry,
        retriable=retriable,
        keep_staging=keep_staging,
    )


def fail_interrupted(ctx: SessionContext, *, at_start: bool = True) -> int:
    """Sessions left running by a crash are not results: fail them, with their entries.

    At a node's start (SQLite: every running session; a replica of a PostgreSQL
    store: those of replicas that are gone), and for a shared store again and again
    while serving (`at_start=False`), so a killed replica's sessions fail on a
    surviving one, where their retries can then run. Returns how many it failed."""
    reason = "node restarted during session" if at_start else "the replica running it stopped"
    failed = 0
    for row in ctx.store.orphaned_sessions():
        facts = SessionFacts.from_row(ctx.province, row)
        if _record_failure(ctx, facts, reason, retriable=True):
            failed += 1
            log.warning("session %s with %s: %s", row.session_id, row.peer, reason)
    if at_start or failed:
        ctx.audit.sign_checkpoint()
    return failed
