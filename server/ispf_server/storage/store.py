"""`Store`: the store file opened, its schema made, and its rooms composed; and the
writes that span rooms, each one transaction: a session's commit and failure
(its row and matches, the pair's state, its audit entry), the pruning of
changes every pair has seen, and an epoch's retirement."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ispf_server.storage import auditlog, budgets, meta, registry, sessions
from ispf_server.storage.auditlog import AuditLog
from ispf_server.storage.budgets import Budgets
from ispf_server.storage.db import Database, storage_errors
from ispf_server.storage.meta import Meta
from ispf_server.storage.pairs import Pairs, deltas, keys
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.schema import SCHEMA as PAIR_SCHEMA
from ispf_server.storage.pairs.schema import STATE_TABLES
from ispf_server.storage.pairs.state import PairDelta
from ispf_server.storage.registry import Registry
from ispf_server.storage.sessions import MatchRow, Sessions, SessionTotals

log = logging.getLogger(__name__)


class Store:
    """`master_key`: the node's master key file (default: ``master.key`` beside the
    store), made on first start if the store was never keyed; pair keys derive from it.
    """

    def __init__(self, path: Path, master_key: Path | None = None) -> None:
        self.path = path
        self.directory = path.parent  # (also where sessions spool their tags)
        self.db = db = Database(path)
        db.create(registry.SCHEMA, sessions.SCHEMA, auditlog.SCHEMA, meta.SCHEMA, budgets.SCHEMA)
        migrated = keys.drop_stored_scalars(db)
        db.create(PAIR_SCHEMA)
        self.meta = Meta(db)
        self.registry = Registry(db)
        self.sessions = Sessions(db)
        self.audit = AuditLog(db)
        self.budgets = Budgets(db)
        self.pairs = Pairs(db, self.meta, master_key or path.parent / "master.key")
        if migrated:
            log.warning(
                "store %s: pair keys were kept in the store by an older version; they and "
                "the pair state made under them (%d pairs) are erased, so the next run with "
                "each peer is full under keys derived from %s",
                path.name,
                migrated,
                self.pairs.master_path.name,
            )

    @storage_errors
    def complete_session(
        self,
        session_id: str,
        totals: SessionTotals,
        *,
        entry: bytes,
        matches: list[MatchRow] | None = None,
        matches_staged: bool = False,
        pair_delta: tuple[str, int, PairDelta] | None = None,
    ) -> int:
        """Store the results, mark the session COMPLETED, make its pair state current
        and append its audit entry, all in one transaction; returns the entry's
        index in the log. With `matches_staged`, the match rows were written ahead
        (`Sessions.stage_matches`); `totals.matched_records`
        counts the records they name (else `matches`)."""
        with self.db.transaction() as cur:
            sessions.complete_in(
                cur, session_id, totals, None if matches_staged else (matches or [])
            )
            if pair_delta is not None:
                deltas.apply_delta(cur, *pair_delta)
            idx = auditlog.append(cur, session_id, entry)
        if pair_delta is not None:  # housekeeping, off the session's path
            threading.Thread(target=self.prune_changes, name="prune-changes", daemon=True).start()
        return idx

    @storage_errors
    def fail_session(
        self, session_id: str, error: str, entry: bytes | None, *, retriable: bool = False
    ) -> bool:
        """Mark a running session FAILED, drop what it staged (match rows, runs) and
        append its entry, in one transaction. Does nothing (returns False) if the
        session is not running, so a session never gets two entries."""
        with self.db.transaction() as cur:
            failed = sessions.fail_in(cur, session_id, error, retriable=retriable)
            if failed is not None:
                pairruns.drop_staged(cur, *failed)
                if entry is not None:
                    auditlog.append(cur, session_id, entry)
        return failed is not None

    def prune_changes(self) -> int:
        """Drop the registry changes every pair has synced past (`Registry.prune_changes`
        up to the pairs' oldest synced version); returns how many."""
        return self.registry.prune_changes(self.pairs.oldest_synced_version())

    @storage_errors
    def destroy_epoch(self, epoch: int) -> int:
        """At an epoch's retirement: erase its pair keys, tag state and sessions' match tags.

        Returns how many match tags were erased. The file is vacuumed so the
        bytes do not linger in free pages.
        """
        with self.db.transaction() as cur:
            erased = sessions.erase_tags(cur, epoch)
            for table in STATE_TABLES:
                cur.execute(f"DELETE FROM {table} WHERE epoch=?", (epoch,))  # noqa: S608
        self.db.compact(checkpoint_first=True)
        return erased

    def close(self) -> None:
        self.db.close()
