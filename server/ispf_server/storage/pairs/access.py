"""`Pairs`: the store's room for pair state (keys, lookups, staging)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from ispf.keys import BlindingKey, MasterKey
from ispf_server.clock import utcnow
from ispf_server.storage.db import Database, storage_errors
from ispf_server.storage.meta import Meta
from ispf_server.storage.pairs import compaction, keys, lookups
from ispf_server.storage.pairs.schema import STATE_TABLES
from ispf_server.storage.pairs.staging import RunStager
from ispf_server.storage.pairs.state import OwnTag, SyncRow

log = logging.getLogger(__name__)


class Pairs:
    """Pair keys, the kept tag state of each pair, and its staging.

    `master_path`: the node's master key file, made on first start if the store
    was never keyed; pair keys derive from it."""

    def __init__(self, db: Database, meta: Meta, master_path: Path) -> None:
        self._db, self._meta = db, meta
        self._master_path = master_path
        self._master: MasterKey = keys.load_master(db, master_path, db.location)

    def oldest_synced_version(self) -> int | None:
        """The oldest registry version any pair's state was synced at (None: no pair
        holds state): registry changes up to it are seen by every pair."""
        row = self._db.fetchone("SELECT MIN(version) FROM pair_sync")
        return None if row is None or row[0] is None else int(row[0])

    @property
    def master_path(self) -> Path:
        return self._master_path

    @storage_errors
    def replace_master_key(self) -> int:
        """A new master key file (the old one overwritten, then replaced) and all pair
        state erased, so no pair key of the old master key is used again. Returns how
        many pairs had keys."""
        with self._db.transaction() as cur:
            pairs = int(cur.execute("SELECT count(*) FROM pair_keys").fetchone()[0])
            for table in STATE_TABLES:
                cur.execute(f"DELETE FROM {table}")  # noqa: S608
        new_path = self._master_path.with_name(self._master_path.name + ".new")
        new_path.unlink(missing_ok=True)
        key = MasterKey.create_file(new_path)
        with self._master_path.open("r+b") as fh:  # overwrite the old key's bytes
            fh.write(b"0" * len(fh.read()))
        new_path.replace(self._master_path)
        self._meta.set("master_kcv", key.check_value())
        self._master = key
        self._db.compact()
        return pairs

    def key(self, peer: str, epoch: int) -> BlindingKey:
        """The pair's key: a read where its row exists (every online-check probe asks),
        a write transaction only the first time (`keys.pair_key` makes the row)."""
        with self._db.reading() as conn:
            rekey = keys.rekey_counter(conn, peer, epoch)
        if rekey is not None:
            return self._master.pair_key(peer, epoch, rekey)
        with self._db.transaction() as cur:
            return keys.pair_key(cur.connection, self._master, peer, epoch, utcnow())

    def synced_keys(self, epoch: int) -> dict[str, BlindingKey]:
        """The keys of the epoch's pairs that hold state (a reconciliation ran), by
        peer, in one read: what an online check needs of every peer it asks. A pair
        missing has no state yet: not synced."""
        with self._db.reading() as conn:
            rekeys = keys.synced_rekeys(conn, epoch)
        return {p: self._master.pair_key(p, epoch, r) for p, r in rekeys.items()}

    def rekey_if_due(self, peer: str, epoch: int, days: int) -> bool:
        """Re-key the pair if its key is `days` old (0: never); True if it did. The
        pair's state goes with the old key, so the next run with the peer is full."""
        if days <= 0:
            return False
        with self._db.transaction() as cur:
            done = keys.rekey_due(cur.connection, peer, epoch, datetime.now(UTC), days)
            if done:
                keys.rekey(cur, peer, epoch, utcnow())
        if done:
            log.info("pair key for %s (epoch %d) renewed after %d days", peer, epoch, days)
        return done

    def rekey_count(self, peer: str, epoch: int) -> int | None:
        """The pair's re-key counter (None: no pair key yet)."""
        with self._db.reading() as conn:
            return keys.rekey_counter(conn, peer, epoch)

    def sync_row(self, peer: str, epoch: int) -> SyncRow | None:
        return SyncRow.of(self._db.fetchone(SyncRow.SELECT, (peer, epoch)))

    @storage_errors
    def overlay_rows(self) -> int:
        """Rows and tombstones on top of every pair's sorted runs (`compaction`)."""
        with self._db.reading() as conn:
            return compaction.overlay_rows(conn)

    def version(self, peer: str, epoch: int) -> int | None:
        """The registry version the own tags for this peer reflect; None: no state."""
        row = self._db.fetchone(
            "SELECT version FROM pair_sync WHERE peer=? AND epoch=?", (peer, epoch)
        )
        return int(row[0]) if row else None

    def own_tags_for(self, peer: str, epoch: int, nids: Iterable[str]) -> dict[str, OwnTag]:
        with self._db.reading() as conn:
            return lookups.own_by_nids(conn, peer, epoch, nids)

    def own_nids_by_tag(self, peer: str, epoch: int, tags: Iterable[bytes]) -> dict[bytes, str]:
        with self._db.reading() as conn:
            found = lookups.own_by_tags(conn, peer, epoch, tags)
        return {t: nid for t, (nid, _) in found.items()}

    def lookup_own_tags(self, peer: str, epoch: int, tags: list[bytes]) -> dict[bytes, str]:
        """Labels of this node's IDs whose tag for `peer` is among `tags` (online checks)."""
        with self._db.reading() as conn:
            found = lookups.own_by_tags(conn, peer, epoch, tags)
        return {t: labels for t, (_, labels) in found.items()}

    def peer_labels_for(self, peer: str, epoch: int, tags: Iterable[bytes]) -> dict[bytes, str]:
        with self._db.reading() as conn:
            return lookups.peer_by_tags(conn, peer, epoch, tags)

    def matched_state(self, peer: str, epoch: int) -> list[tuple[str, bytes, str]]:
        """(nid, tag, peer labels) of own IDs whose tag the peer also holds: the matches."""
        with self._db.reading() as conn:
            return lookups.matched_state(conn, peer, epoch)

    def run_stager(self, peer: str, epoch: int, session_id: str | None) -> RunStager:
        """Stages a full run's sorted runs piece by piece as they are merged, so no
        run is ever whole in memory (`RunStager`, `StagedRun`), as the staging of
        `session_id` (None: of no session)."""
        return RunStager(self._db, peer, epoch, session_id)
