"""`Store`: the store file opened, its schema made, and its rooms composed; and the
writes that span rooms, each one transaction: a session's commit and failure
(its row and matches, the pair's state, its audit entry), the pruning of
changes every pair has seen, and an epoch's retirement."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ispf import files
from ispf.errors import ConfigError
from ispf_server.storage import auditlog, budgets, meta, registry, sessions
from ispf_server.storage.auditlog import AuditLog
from ispf_server.storage.budgets import Budgets
from ispf_server.storage.db import (
    Database,
    open_database,
    storage_errors,
    translate,
    upsert_sql,
)
from ispf_server.storage.meta import Meta
from ispf_server.storage.pairs import Pairs, deltas, keys
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.compaction import Compactor
from ispf_server.storage.pairs.schema import SCHEMA as PAIR_SCHEMA
from ispf_server.storage.pairs.schema import STATE_TABLES
from ispf_server.storage.pairs.staging import drop_generation
from ispf_server.storage.pairs.state import PairDelta
from ispf_server.storage.registry import Registry
from ispf_server.storage.sessions import MatchRow, SessionRow, Sessions, SessionTotals

REPLICA_SPACE = 0x15F1  # advisory lock space: a replica's liveness, by replica id
PEER_SPACE = 0x15F2  # advisory lock space: a batch session with a peer, by its name


class PairLock:
    """`threading.Lock`'s acquire and release, held in this process and, where the
    store is shared by replicas, in the database too (a session-level advisory lock,
    which PostgreSQL drops with the holder's connection: a killed replica lets go).

    Work that can stop and come back later (a compaction) takes it giving way
    (`acquire_giving_way`); a session asks such work, waiting for the lock or
    holding it, to let go (`ask_to_give_way`, `acquire_asking`)."""

    POLL = 0.2  # seconds between tries of the database lock while waiting
    ASK_EVERY = 0.25  # seconds between asks while a session waits (`acquire_asking`)

    def __init__(self, db: Database, peer: str) -> None:
        self._db, self._peer = db, peer
        self._local = threading.Lock()
        self._state = threading.Lock()  # (guards the three below)
        self._yielders: set[threading.Event] = set()  # of work that gives way, waiting or holding
        self._held = False  # held in this process
        self._holder: threading.Event | None = None  # the holder's, if it gives way

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._take(blocking, timeout, None)

    def _take(self, blocking: bool, timeout: float, yields: threading.Event | None) -> bool:
        deadline = None if timeout < 0 else time.monotonic() + timeout
        if not self._local.acquire(blocking, timeout if blocking else -1):
            return False
        try:
            while not self._db.try_hold(PEER_SPACE, self._peer):
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    self._local.release()
                    return False
                time.sleep(self.POLL)
        except BaseException:
            self._local.release()
            raise
        with self._state:
            self._held, self._holder = True, yields
        return True

    def acquire_giving_way(self, timeout: float) -> threading.Event | None:
        """Take the lock for work that can stop and come back later (a compaction):
        the event returned is set when a session asks for the lock (`ask_to_give_way`),
        also while this still waited for it, and the holder then stops and releases
        it. None: the lock stayed busy for `timeout` s."""
        give_way = threading.Event()
        with self._state:
            self._yielders.add(give_way)
        held = False
        try:
            held = self._take(True, timeout, give_way)
        finally:
            if not held:
                with self._state:
                    self._yielders.discard(give_way)
        return give_way if held else None

    def stop_giving_way(self) -> None:
        """The holder that took the lock giving way holds it as a session does from now
        on: asked no more (its event stays as it was)."""
        with self._state:
            if self._holder is not None:
                self._yielders.discard(self._holder)
            self._holder = None

    def ask_to_give_way(self) -> bool:
        """Ask the work that gives way, holding the lock or waiting for it, to stop (or
        not to start); False: there was none (the lock is free, or held by a session,
        this process's or another replica's)."""
        with self._state:
            yielders = list(self._yielders)
        for give_way in yielders:
            give_way.set()
        return bool(yielders)

    def _held_by_session(self) -> bool:
        """Whether work that does not give way holds the lock: a session of this
        process, or anything of another replica's (the database lock, while this
        process holds none)."""
        with self._state:
            if self._held:
                return self._holder is None
        return self._db.is_held_elsewhere(PEER_SPACE, self._peer)

    def acquire_asking(self, timeout: float, *, until_refused: bool = False) -> bool:
        """Take the lock for a session within `timeout` s, asking the work that gives
        way to stop, and asking again while waiting (other such work, a compaction
        of another epoch, may take the lock the first let go). `until_refused`: give
        up, asking nothing, as soon as the lock is held by work that does not give
        way (`_held_by_session`), instead of waiting for it to end."""
        if self.acquire(blocking=False):
            return True  # (free: nothing asked)
        deadline = time.monotonic() + timeout
        while True:
            if until_refused and self._held_by_session():
                return False
            self.ask_to_give_way()
            left = deadline - time.monotonic()
            if self.acquire(timeout=max(0.0, min(self.ASK_EVERY, left))):
                return True
            if left <= self.ASK_EVERY:
                return False

    def release(self) -> None:
        with self._state:
            if self._holder is not None:
                self._yielders.discard(self._holder)
            self._held, self._holder = False, None
        try:
            self._db.release(PEER_SPACE, self._peer)
        finally:
            self._local.release()


log = logging.getLogger(__name__)

# The schema's version, kept in `meta` ('schema_version'). Each migration takes a
# store from the version before it to its own; a store newer than this node knows
# is refused (its tables may mean what this code does not know).
SCHEMA_VERSION = 5


def _to_v1(db: Database) -> int:
    """Version 1: every table of this layout (each `IF NOT EXISTS`, so a store made
    before versions were kept gets what it lacks); returns how many pairs' keys an
    older store kept as scalars (erased with their state: `keys.drop_stored_scalars`)."""
    db.create(registry.SCHEMA, sessions.SCHEMA, auditlog.SCHEMA, meta.SCHEMA, budgets.SCHEMA)
    migrated = keys.drop_stored_scalars(db)
    db.create(PAIR_SCHEMA)
    return migrated


def _to_v2(db: Database) -> None:
    """Version 2: sessions name the replica running them (`owner`), so a replica
    fails only the sessions of replicas that are gone, never a live one's."""
    if "owner" not in db.columns("sessions"):
        with db.transaction() as cur:
            cur.execute("ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT ''")


def _to_v3(db: Database) -> None:
    """Version 3: a pair's sync row names the session whose match rows are the pair's
    current result (`pair_sync.session_id`), so an incremental run carries those rows
    over instead of making every one again. A pair synced before it has none: its
    next incremental run makes its rows whole, once.

    The runs' index on their parts' last keys also holds the part numbers, so a
    lookup of many keys finds their parts in one index-only read."""
    added = "session_id" in db.columns("pair_sync")
    with db.transaction() as cur:
        if not added:
            cur.execute("ALTER TABLE pair_sync ADD COLUMN session_id TEXT NOT NULL DEFAULT ''")
        cur.execute("DROP INDEX IF EXISTS pair_runs_last")
        cur.execute("CREATE INDEX pair_runs_last ON pair_runs(peer, epoch, gen, kind, last, part)")


def _to_v4(db: Database) -> None:
    """Version 4: pair runs' generation numbers are the store's, each given out once
    (`pair_gen_last`), instead of the pair's current one plus one. The count starts
    past every generation the store holds, and past a count already there (a store
    run at version 3 by code that kept the count, then by code that did not, holds
    a count behind its generations). (A replica of an older version would number
    generations its own way: the guard in `migrate` keeps it off.)"""
    db.create(PAIR_SCHEMA)
    with db.transaction() as cur:
        row = cur.execute("SELECT gen FROM pair_gen_last WHERE one = 1").fetchone()
        start = max(pairruns.held_generations(cur), 0 if row is None else int(row[0]))
        cur.execute(upsert_sql("pair_gen_last", ("one", "gen"), ("one",)), (1, start))


def _to_v5(db: Database) -> None:
    """Version 5: a sync session records the generation of pair runs it stages
    (`sessions.staged_gen`), so that its failure drops that generation and no other.
    Before, a failing session dropped every staged generation of the pair: on
    PostgreSQL, where a replica whose lock connection dropped can believe it still
    holds a pair's lock, that was another replica's live staging too. (A session
    running at the upgrade has none recorded: what it staged is dropped by the
    pair's next staging, or at the next start.)"""
    if "staged_gen" not in db.columns("sessions"):
        # (PostgreSQL: two replicas of this version started at once both migrate)
        maybe = " IF NOT EXISTS" if db.dialect == "postgresql" else ""
        with db.transaction() as cur:
            cur.execute(f"ALTER TABLE sessions ADD COLUMN{maybe} staged_gen INTEGER")


MIGRATIONS: dict[int, Callable[[Database], object]] = {
    2: _to_v2,
    3: _to_v3,
    4: _to_v4,
    5: _to_v5,
}


def schema_version(db: Database) -> int:
    if "value" not in db.columns("meta"):
        return 0
    row = db.fetchone("SELECT value FROM meta WHERE key='schema_version'")
    return int(str(row[0])) if row else 0


def migrate(db: Database) -> int:
    """Bring a store to `SCHEMA_VERSION` (refusing one newer); returns how many pairs'
    stored scalars a migration erased."""
    found = schema_version(db)
    if found > SCHEMA_VERSION:
        raise ConfigError(
            f"the store {db.location} has schema version {found}, newer than this node "
            f"knows ({SCHEMA_VERSION}): run the ispf-node that wrote it (or a later one); "
            "this one would misread it"
        )
    if 0 < found < SCHEMA_VERSION and (n := db.holders(REPLICA_SPACE)):
        # (A replica of the older version reads the version only when it starts: it
        # would go on writing the old tables' way under the new schema. Replicas of
        # this version started a moment apart: the first has migrated meanwhile.)
        if schema_version(db) == SCHEMA_VERSION:
            return 0
        raise ConfigError(
            f"the store {db.location} has schema version {found} and {n} replica(s) of "
            f"an older ispf-node are running over it: stop every replica, start this "
            f"version on one (it brings the store to version {SCHEMA_VERSION}), then the "
            "others"
        )
    migrated = _to_v1(db)  # (idempotent: also how a store of version 0 gets version 1)
    for version in range(max(found, 1) + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version](db)
        log.info("store %s: migrated to schema version %d", db.location, version)
    if found < SCHEMA_VERSION:
        db.write(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT(key) "
            "DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
    return migrated


class Store:
    """`path`: the store file (SQLite); with `url` (``postgresql://...``), the store is
    that database and `path` only names this node's folder for local files (its
    parent). `master_key`: the node's master key file (default: ``master.key`` in
    that folder), made on first start if the store was never keyed; pair keys
    derive from it.
    """

    def __init__(self, path: Path, master_key: Path | None = None, *, url: str = "") -> None:
        self.path = path
        self.directory = path.parent  # (also where sessions spool their tags)
        if url:  # (SQLite's own file makes its folder private; a replica's spools too)
            files.private_dir(self.directory)
        self.db = db = open_database(url or path)
        try:
            migrated = migrate(db)
        except BaseException as exc:
            db.close()
            mapped = translate(exc) if isinstance(exc, Exception) else None
            if mapped is None:
                raise
            raise mapped from exc
        # This process's name among the replicas of a shared store, held as a lock in
        # the database while it runs (PostgreSQL lets go when the process dies).
        self.replica = ""
        if db.dialect == "postgresql":
            self.replica = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
            db.try_hold(REPLICA_SPACE, self.replica)
        self.meta = Meta(db)
        self.registry = Registry(db)
        self.sessions = Sessions(db, self.replica)
        self.audit = AuditLog(db)
        self.budgets = Budgets(db)
        self.pairs = Pairs(db, self.meta, master_key or path.parent / "master.key")
        self._locks_lock = threading.Lock()
        self._pair_locks: dict[str, PairLock] = {}
        # Pair state merged back into sorted runs after incremental runs, when due.
        self.compactor = Compactor(db, self.pair_lock, self.sessions.any_running)
        if migrated:
            log.warning(
                "store %s: pair keys were kept in the store by an older version; they and "
                "the pair state made under them (%d pairs) are erased, so the next run with "
                "each peer is full under keys derived from %s",
                db.location,
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
                deltas.apply_delta(cur, *pair_delta, session_id=session_id)
            idx = auditlog.append(cur, session_id, entry)
        if pair_delta is not None:  # housekeeping, off the session's path
            threading.Thread(target=self.prune_changes, name="prune-changes", daemon=True).start()
            peer, epoch, delta = pair_delta
            if not delta.reset:  # (a full run leaves nothing on top of its runs)
                self.compactor.after_session(peer, epoch)
        return idx

    @storage_errors
    def fail_session(
        self,
        session_id: str,
        error: str,
        entry: bytes | None,
        *,
        retriable: bool = False,
        keep_staging: bool = False,
    ) -> bool:
        """Mark a running session FAILED, drop its staged match rows and append its
        entry, in one transaction. Does nothing (returns False) if the session is not
        running, so a session never gets two entries.

        Then the pair runs the session staged, the generation it recorded
        (`sessions.record_staging`) and no other, are dropped a piece at a time: never
        the staging of another session or compaction of the pair (on this replica or
        another), whoever holds the pair's lock. A one-off session, or one that never
        got the lock, staged none. `keep_staging`: a matching thread of the session
        may still write its runs; the caller drops them once it has ended
        (`drop_staging`). The session of a gone replica (failed by another) is handled
        alike: its generation is never made current now, nor staged under again."""
        with self.db.transaction() as cur:
            failed = sessions.fail_in(cur, session_id, error, retriable=retriable)
            if failed is not None and entry is not None:
                auditlog.append(cur, session_id, entry)
        if not keep_staging:
            if failed is None:  # (failed meanwhile by another, say a replica's sweep
                # while this one was cut off from the store: parts it went on to write
                # after that drop are its own still, and never made current)
                self.drop_staging(session_id)
            else:
                self._drop_generation(*failed)
        return failed is not None

    def _drop_generation(self, peer: str, epoch: int, gen: int | None) -> None:
        if gen is not None:
            drop_generation(self.db, peer, epoch, gen)

    def _drop_staging_if_free(self, peer: str, epoch: int) -> bool:
        """Drop the pair's staged runs where its lock is free now (nobody stages them);
        False: a session or a compaction of the pair holds it, and its staging stays."""
        lock = self.pair_lock(peer)
        if not lock.acquire(blocking=False):
            return False
        try:
            with self.db.transaction() as cur:
                running = sessions.running_stagings(cur.connection, peer, epoch)
                pairruns.drop_staged(cur, peer, epoch, running)
        finally:
            lock.release()
        return True

    @storage_errors
    def drop_staging(self, session_id: str) -> None:
        """Drop the pair runs a failed session staged, once the matching that staged
        them has ended (`fail_session` with `keep_staging`). (Never the pair's state,
        where the session completed: `drop_generation` checks.)"""
        with self.db.reading() as conn:
            staged = sessions.staging_of(conn, session_id)
        if staged is not None:
            self._drop_generation(*staged)

    @property
    def shared(self) -> bool:
        """Whether other replicas may run over this store (PostgreSQL)."""
        return bool(self.replica)

    def other_replicas(self) -> int:
        """Replicas running over this store now, besides this process (0 for SQLite,
        where `ispf-node` takes the file's lock)."""
        return max(0, self.db.holders(REPLICA_SPACE) - 1) if self.shared else 0

    def keep_alive(self) -> None:
        """Hold this replica's locks again where the database dropped them (it restarted,
        or a firewall cut an idle connection): before other replicas take this one for
        stopped. (Any session of this replica they failed meanwhile cannot complete:
        `sessions.complete_in` refuses a session no longer running.)"""
        if self.shared and self.db.refresh_holds():
            log.error(
                "store %s: this replica could not take its locks again; until it does, "
                "other replicas may fail its sessions",
                self.db.location,
            )

    def orphaned_sessions(self) -> list[SessionRow]:
        """Running sessions whose replica is gone: at a node's start in SQLite, every
        running session (one process has the store); in PostgreSQL, those whose owner
        no longer holds its replica lock (never this replica's own, nor a live one's)."""
        rows = self.sessions.running()
        if not self.shared:
            return rows
        alive: dict[str, bool] = {self.replica: True}
        out = []
        for row in rows:
            if row.owner not in alive:
                alive[row.owner] = bool(row.owner) and self.db.is_held_elsewhere(
                    REPLICA_SPACE, row.owner
                )
            if not alive[row.owner]:
                out.append(row)
        return out

    def pair_lock(self, peer: str) -> PairLock:
        """One batch session with `peer` at a time, across this store's replicas."""
        with self._locks_lock:
            lock = self._pair_locks.get(peer)
            if lock is None:
                lock = self._pair_locks[peer] = PairLock(self.db, peer)
            return lock

    @storage_errors
    def sweep_pairs(self) -> tuple[int, int]:
        """At a node's start, what an earlier one left half-written in pair state: state
        without its pair key (an epoch retired while it was written, `keys.drop_keyless`)
        is erased, and staged generations nobody is writing (a node stopped while a
        session or a compaction staged runs) are dropped, each under its pair's lock
        (a replica staging holds it). Returns (pairs erased, pairs' stagings dropped)."""
        erased = keys.drop_keyless(self.db)
        if erased:
            log.warning(
                "pair state of %d pairs without a pair key erased (an epoch was retired "
                "while it was written)",
                erased,
            )
        with self.db.reading() as conn:
            staged = pairruns.staged_pairs(conn)
        dropped = 0
        for peer, epoch in staged:
            dropped += self._drop_staging_if_free(peer, epoch)
        if dropped:
            log.info("staged pair runs of %d pairs dropped (left by a stopped node)", dropped)
        return erased, dropped

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
        self.compactor.stop()  # (a compaction running is given up at its next read)
        self.db.close()
