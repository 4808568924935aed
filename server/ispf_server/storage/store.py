"""`Store`: the store file opened, its schema made, and its rooms composed."""

from __future__ import annotations

import logging
from pathlib import Path

from ispf_server.storage import auditlog, budgets, meta, registry, sessions
from ispf_server.storage.auditlog import AuditLog
from ispf_server.storage.budgets import Budgets
from ispf_server.storage.db import Database, storage_errors
from ispf_server.storage.meta import Meta
from ispf_server.storage.pairs import Pairs, keys
from ispf_server.storage.pairs.schema import SCHEMA as PAIR_SCHEMA
from ispf_server.storage.pairs.schema import STATE_TABLES
from ispf_server.storage.registry import Registry
from ispf_server.storage.sessions import Sessions

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
        self.sessions = Sessions(db, after_pair_commit=self.registry.prune_changes)
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
