"""The node's own store: registry records, sessions and their results (SQLite).

One file per node. This is the only place raw ID numbers are kept. Every write
is one transaction: a batch of records lands whole or not at all, and a
session's results become visible together with its COMPLETED state, so partial
results are never shown as final.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from ispf import files
from ispf.errors import IspfError, KeyFileError, RetryLater, StorageFull
from ispf.keys import BlindingKey, MasterKey
from ispf.records import Label
from ispf_server import pairruns, pairstate

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    record_id  TEXT PRIMARY KEY,
    nid        TEXT NOT NULL,
    programme  TEXT NOT NULL,
    status     TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
-- By ID, covering labels and record IDs: a full run reads (nid, programme, status)
-- in ID order, and its matched records, from the index alone (3x faster at a
-- million records than through the table).
CREATE INDEX IF NOT EXISTS records_by_nid ON records(nid, programme, status, record_id);
DROP INDEX IF EXISTS records_nid;
CREATE TABLE IF NOT EXISTS sessions (
    session_id      TEXT PRIMARY KEY,
    peer            TEXT NOT NULL,
    role            TEXT NOT NULL,
    mode            INTEGER NOT NULL,
    purpose         TEXT NOT NULL,
    epoch           INTEGER NOT NULL,
    state           TEXT NOT NULL,
    own_records     INTEGER NOT NULL DEFAULT 0,
    own_values      INTEGER NOT NULL DEFAULT 0,
    peer_values     INTEGER NOT NULL DEFAULT 0,
    match_count     INTEGER NOT NULL DEFAULT 0,
    matched_records INTEGER NOT NULL DEFAULT 0,
    result_digest   BLOB,
    error           TEXT NOT NULL DEFAULT '',
    started_at      TEXT NOT NULL,
    finished_at     TEXT NOT NULL DEFAULT '',
    sync            TEXT NOT NULL DEFAULT '',
    own_removed     INTEGER NOT NULL DEFAULT 0,
    peer_removed    INTEGER NOT NULL DEFAULT 0,
    -- A failure a new session may get past (peer down, restart, busy).
    retriable       INTEGER NOT NULL DEFAULT 0,
    -- Responder: its answer to Conclude, for a Conclude repeated after a restart.
    answer          BLOB
);
CREATE TABLE IF NOT EXISTS matches (
    session_id     TEXT NOT NULL REFERENCES sessions(session_id),
    record_id      TEXT NOT NULL,
    programme      TEXT NOT NULL,
    status         TEXT NOT NULL,
    peer_programme TEXT NOT NULL,
    peer_status    TEXT NOT NULL,
    tag            BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS matches_session ON matches(session_id, record_id);
-- The audit log: entries exactly as hashed, and signed checkpoints over them.
CREATE TABLE IF NOT EXISTS log_entries (
    idx        INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    entry      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS log_entries_session ON log_entries(session_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    size       INTEGER PRIMARY KEY,
    note       TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cosignatures (
    size    INTEGER NOT NULL,
    witness TEXT NOT NULL,
    line    TEXT NOT NULL,
    PRIMARY KEY (size, witness)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- The latest checkpoint this node verified from each peer.
CREATE TABLE IF NOT EXISTS witnessed (
    peer       TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    note       TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
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

log = logging.getLogger(__name__)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


_IN_BATCH = 500  # keys per `IN (...)` query: well under SQLite's parameter limit


@dataclass(frozen=True, slots=True)
class StoredRecord:
    record_id: str = field(repr=False)  # (raw IDs stay out of reprs, logs and tracebacks)
    nid: str = field(repr=False)
    label: Label


@dataclass(frozen=True, slots=True)
class UpsertCounts:
    inserted: int
    updated: int
    unchanged: int


@dataclass(frozen=True, slots=True)
class MatchRow:
    record_id: str = field(repr=False)
    label: Label
    peer_label: Label
    tag: bytes = b""


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    peer: str
    role: str
    mode: int
    purpose: str
    epoch: int
    state: str
    own_records: int
    own_values: int
    peer_values: int
    match_count: int
    matched_records: int
    result_digest: bytes
    error: str
    started_at: str
    finished_at: str
    sync: str = ""
    own_removed: int = 0
    peer_removed: int = 0
    retriable: int = 0
    answer: bytes | None = None


@dataclass(frozen=True, slots=True)
class SessionTotals:
    """What a completed session's row records, besides its state and times."""

    own_records: int
    own_values: int
    peer_values: int
    match_count: int
    result_digest: bytes
    matched_records: int | None = None  # (None: count the records `matches` name)
    sync: str = ""
    own_removed: int = 0
    peer_removed: int = 0


F = TypeVar("F", bound=Callable[..., Any])
K = TypeVar("K", str, bytes)
T = TypeVar("T")


def storage_errors(fn: F) -> F:
    """Report a full disk (or a database that cannot be written) as such, not as a crash.

    Every write is one transaction that SQLite rolls back on such an error, so
    nothing half-written is left behind.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "full" in text:
                log.error("store: %s", text)
                raise StorageFull(
                    "the node's disk is full: nothing of this request was stored; free "
                    "space on the node and try again"
                ) from exc
            if "locked" in text or "busy" in text:
                raise RetryLater("the node's store is busy; try again") from exc
            raise

    return cast(F, run)


def _rollback(cur: sqlite3.Cursor) -> None:
    # SQLite may already have rolled back (a full disk does): keep the original error.
    if cur.connection.in_transaction:
        cur.execute("ROLLBACK")


class Store:
    """`master_key`: the node's master key file (default: ``master.key`` beside the
    store), made on first start if the store was never keyed; pair keys derive from it.
    """

    def __init__(self, path: Path, master_key: Path | None = None) -> None:
        files.private_dir(path.parent)
        files.private_new_file(path)  # SQLite gives -wal and -shm the store's mode
        self.path = path
        self.directory = path.parent  # (also where sessions spool their tags)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._pruning = threading.Lock()  # one pruning of registry changes at a time
        self._syncing = threading.Lock()  # one registry sync at a time
        self._counting = threading.Lock()  # one background count of distinct IDs at a time
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            migrated = self._drop_stored_scalars()
            self._db.executescript(pairstate.SCHEMA)
        self._master = self._load_master(master_key or path.parent / "master.key")
        if migrated:
            log.warning(
                "store %s: pair keys were kept in the store by an older version; they and "
                "the pair state made under them (%d pairs) are erased, so the next run with "
                "each peer is full under keys derived from %s",
                path.name,
                migrated,
                self._master_path.name,
            )

    def _drop_stored_scalars(self) -> int:
        """Migration: a pair_keys table with a scalar column goes, with all pair state
        (made under those scalars, which are not derivable); the file is vacuumed so
        the scalars do not linger in free pages. Returns how many pairs had keys."""
        if not pairstate.has_stored_scalars(self._db):
            return 0
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            pairs = int(cur.execute("SELECT count(*) FROM pair_keys").fetchone()[0])
            for table in pairstate.STATE_TABLES:
                if table != "pair_keys":
                    cur.execute(f"DROP TABLE IF EXISTS {table}")  # recreated empty below
            cur.execute("DROP TABLE pair_keys")
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return pairs

    @storage_errors
    def replace_master_key(self) -> int:
        """A new master key file (the old one overwritten, then replaced) and all pair
        state erased, so no pair key of the old master key is used again. Returns how
        many pairs had keys."""

        def step(cur: sqlite3.Cursor) -> int:
            pairs = int(cur.execute("SELECT count(*) FROM pair_keys").fetchone()[0])
            for table in pairstate.STATE_TABLES:
                cur.execute(f"DELETE FROM {table}")  # noqa: S608
            return pairs

        pairs = self._write_tx(step)
        new_path = self._master_path.with_name(self._master_path.name + ".new")
        new_path.unlink(missing_ok=True)
        key = MasterKey.create_file(new_path)
        with self._master_path.open("r+b") as fh:  # overwrite the old key's bytes
            fh.write(b"0" * len(fh.read()))
        new_path.replace(self._master_path)
        self.set_meta("master_kcv", key.check_value())
        self._master = key
        with self._lock:
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return pairs

    def _load_master(self, path: Path) -> MasterKey:
        """The master key; refuse one that is not the key this store was keyed with."""
        self._master_path = path
        row = self._db.execute("SELECT value FROM meta WHERE key='master_kcv'").fetchone()
        if not path.exists() and row is None:
            key = MasterKey.create_file(path)
            log.info("master key created: %s (mode 0600)", path)
        else:
            if not path.exists():
                raise KeyFileError(
                    f"master key {path} is missing, and the store {self.path} was keyed with "
                    "one: restore the node's master key file (the pair keys derive from it)"
                )
            key = MasterKey.from_file(path)
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('master_kcv', ?)", (key.check_value(),))
        elif str(row[0]) != key.check_value():
            raise KeyFileError(
                f"master key {path} is not the key the store {self.path} was keyed with: "
                "restore the right master key file"
            )
        return key

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- registry -----------------------------------------------------------

    @storage_errors
    def upsert(self, records: Iterable[StoredRecord]) -> UpsertCounts:
        """Insert or update records by record id, all in one transaction."""
        ins = upd = same = 0
        now = utcnow()
        changed: set[str] = set()
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for r in records:
                    row = cur.execute(
                        "SELECT nid, programme, status FROM records WHERE record_id=?",
                        (r.record_id,),
                    ).fetchone()
                    new = (r.nid, r.label.programme, r.label.status)
                    if row is None:
                        cur.execute(
                            "INSERT INTO records VALUES (?,?,?,?,?)", (r.record_id, *new, now)
                        )
                        ins += 1
                        changed.add(r.nid)
                    elif tuple(row) != new:
                        cur.execute(
                            "UPDATE records SET nid=?, programme=?, status=?, updated_at=? "
                            "WHERE record_id=?",
                            (*new, now, r.record_id),
                        )
                        upd += 1
                        changed.update((row[0], r.nid))
                    else:
                        same += 1
                self._log_changes(cur, changed)
                cur.execute("COMMIT")
            except BaseException:
                _rollback(cur)
                raise
        return UpsertCounts(ins, upd, same)

    @storage_errors
    def delete(self, record_ids: Iterable[str]) -> tuple[int, list[str]]:
        deleted, missing = 0, []
        changed: set[str] = set()
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for rid in record_ids:
                    row = cur.execute(
                        "DELETE FROM records WHERE record_id=? RETURNING nid", (rid,)
                    ).fetchone()
                    if row:
                        deleted += 1
                        changed.add(row[0])
                    else:
                        missing.append(rid)
                self._log_changes(cur, changed)
                cur.execute("COMMIT")
            except BaseException:
                _rollback(cur)
                raise
        return deleted, missing

    def registry_sync(self) -> RegistrySync:
        """Stage a whole registry, then make the store exactly it in one transaction
        (`RegistrySync`). One at a time: a second raises `RetryLater`."""
        if not self._syncing.acquire(blocking=False):
            raise RetryLater("another registry sync is running on this node; try again after it")
        try:
            return RegistrySync(self)
        except BaseException:
            self._syncing.release()
            raise

    def records(self, programmes: frozenset[str] = frozenset()) -> list[StoredRecord]:
        """Records taking part in a session, ordered by ID (empty filter: all)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT record_id, nid, programme, status FROM records ORDER BY nid, record_id"
            ).fetchall()
        labels: dict[tuple[str, str], Label] = {}  # one object per distinct label
        out = []
        for rid, nid, prog, st in rows:
            if programmes and prog not in programmes:
                continue
            label = labels.get((prog, st))
            if label is None:
                label = labels[(prog, st)] = Label(prog, st)
            out.append(StoredRecord(rid, nid, label))
        return out

    def stats(self) -> tuple[int, int, list[tuple[Label, int]]]:
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            distinct = self._db.execute("SELECT COUNT(DISTINCT nid) FROM records").fetchone()[0]
            labels = self._db.execute(
                "SELECT programme, status, COUNT(*) FROM records GROUP BY programme, status "
                "ORDER BY programme, status"
            ).fetchall()
        return total, distinct, [(Label(p, s), n) for p, s, n in labels]

    # -- sessions -----------------------------------------------------------

    @storage_errors
    def begin_session(
        self, session_id: str, peer: str, role: str, mode: int, purpose: str, epoch: int
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions (session_id, peer, role, mode, purpose, epoch, state, "
                "started_at) VALUES (?,?,?,?,?,?, 'RUNNING', ?)",
                (session_id, peer, role, mode, purpose, epoch, utcnow()),
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
        pair_delta: tuple[str, int, pairstate.PairDelta] | None = None,
    ) -> int:
        """Store the results, mark the session COMPLETED and append its audit entry,
        all in one transaction; returns the entry's index in the log. With
        `matches_staged`, `stage_result` (or `stage_matches`) wrote the match rows
        already; `totals.matched_records` counts the records they name (else
        `matches`)."""
        matches = matches or []
        matched_records = totals.matched_records
        if matched_records is None:
            matched_records = len({m.record_id for m in matches})
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                if not matches_staged:
                    self._insert_matches(cur, session_id, matches)
                cur.execute(
                    "UPDATE sessions SET state='COMPLETED', own_records=?, own_values=?, "
                    "peer_values=?, match_count=?, matched_records=?, result_digest=?, "
                    "finished_at=?, sync=?, own_removed=?, peer_removed=? WHERE session_id=?",
                    (
                        totals.own_records,
                        totals.own_values,
                        totals.peer_values,
                        totals.match_count,
                        matched_records,
                        totals.result_digest,
                        utcnow(),
                        totals.sync,
                        totals.own_removed,
                        totals.peer_removed,
                        session_id,
                    ),
                )
                if pair_delta is not None:
                    pairstate.apply_delta(cur, *pair_delta)
                idx = self._append(cur, session_id, entry)
                cur.execute("COMMIT")
            except BaseException:
                _rollback(cur)
                raise
        if pair_delta is not None:  # housekeeping, off the session's path
            threading.Thread(target=self.prune_changes, name="prune-changes", daemon=True).start()
        return idx

    def prune_changes(self, batch: int = 10_000, pause: float = 0.002) -> int:
        """Drop the registry changes every pair has synced past, a small batch per
        transaction with a pause between (the first sync after loading millions has
        millions to drop, while the session's last calls, the witnessing, and online
        checks go on). Returns how many were dropped."""
        if not self._pruning.acquire(blocking=False):
            return 0  # another sync's pruning is at it
        dropped = 0
        try:
            while True:
                n = self._write_tx(lambda cur: pairstate.prune_changes(cur, batch))
                dropped += n
                if n < batch:
                    return dropped
                time.sleep(pause)  # (the store lock is not fair: let waiting writers in)
        except sqlite3.ProgrammingError:  # the store closed meanwhile (shutdown)
            return dropped
        except (sqlite3.OperationalError, IspfError) as exc:  # (busy, full): the next sync retries
            log.warning("pruning registry changes stopped: %s", exc)
            return dropped
        finally:
            self._pruning.release()

    def run_stager(self, peer: str, epoch: int) -> RunStager:
        """Stages a full run's sorted runs piece by piece as they are merged, so no
        run is ever whole in memory (`RunStager`, `StagedRun`)."""
        return RunStager(self, peer, epoch)

    @storage_errors
    def _write_tx(self, step: Callable[[sqlite3.Cursor], T], *, staging: bool = False) -> T:
        """Run `step` in a transaction of its own, under the store lock.

        `staging`: what a session writes ahead of its commit (staged runs, match
        rows), which nothing reads unless that commit comes. Such a transaction
        is committed without its own sync to disk (synchronous=NORMAL: in WAL
        mode the store stays consistent, and only these transactions could be
        lost to a power cut). The session's commit is synced, and the WAL is
        appended to in order, so that sync makes everything staged before it
        durable too. A full run stages a hundred or more pieces; a sync each
        cost seconds at registry scale."""
        with self._lock:
            if staging:
                self._db.execute("PRAGMA synchronous=NORMAL")
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    out = step(cur)
                    cur.execute("COMMIT")
                except BaseException:
                    _rollback(cur)
                    raise
            finally:
                if staging:
                    self._db.execute("PRAGMA synchronous=FULL")
        return out

    @storage_errors
    def stage_result(
        self,
        session_id: str,
        peer: str,
        epoch: int,
        delta: pairstate.PairDelta,
        matches: list[MatchRow],
    ) -> None:
        """Write a sync session's result ahead of its commit, before the peer agrees:
        the match rows (read only once the session is COMPLETED; `fail_session`
        deletes them) and a full run's sorted runs, as a generation that is not yet
        the pair's state (`complete_session` makes it so). The commit then writes
        almost nothing while the peer waits."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                running = _running(cur, session_id)
                gen = None
                if running:  # (a session failed meanwhile keeps nothing)
                    self._insert_matches(cur, session_id, matches)
                if running and delta.reset and delta.runs is not None:
                    runs = delta.runs
                    gen = pairruns.stage(cur, peer, epoch, runs.labelsets, runs.runs)
                cur.execute("COMMIT")
            except BaseException:
                _rollback(cur)
                raise
        if gen is not None:
            delta.staged, delta.runs = gen, None

    def stage_matches(self, session_id: str, matches: list[MatchRow]) -> bool:
        """Write some of a running session's match rows ahead of its commit, as they
        are found (in batches: a registry's matches are never all in memory). Read
        only once the session is COMPLETED; `fail_session` deletes them. False
        (nothing written) where the session is no longer running."""

        def step(cur: sqlite3.Cursor) -> bool:
            if not _running(cur, session_id):
                return False
            self._insert_matches(cur, session_id, matches)
            return True

        return self._write_tx(step, staging=True)

    @staticmethod
    def _insert_matches(cur: sqlite3.Cursor, session_id: str, matches: list[MatchRow]) -> None:
        cur.executemany(
            "INSERT INTO matches VALUES (?,?,?,?,?,?,?)",
            (
                (
                    session_id,
                    m.record_id,
                    m.label.programme,
                    m.label.status,
                    m.peer_label.programme,
                    m.peer_label.status,
                    m.tag,
                )
                for m in matches
            ),
        )

    @storage_errors
    def set_answer(self, session_id: str, answer: bytes) -> None:
        """Keep the responder's answer to Conclude, for a repeat after a restart."""
        with self._lock:
            self._db.execute(
                "UPDATE sessions SET answer=? WHERE session_id=?", (answer, session_id)
            )

    @storage_errors
    def fail_session(
        self, session_id: str, error: str, entry: bytes | None, *, retriable: bool = False
    ) -> bool:
        """Mark a running session FAILED and append its entry, in one transaction.

        Does nothing (returns False) if the session is not running, so a
        session never gets two entries.
        """
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                changed = cur.execute(
                    "UPDATE sessions SET state='FAILED', error=?, finished_at=?, retriable=? "
                    "WHERE session_id=? AND state='RUNNING'",
                    (error, utcnow(), int(retriable), session_id),
                ).rowcount
                if changed:  # rows and runs staged ahead of a commit that never came
                    cur.execute("DELETE FROM matches WHERE session_id=?", (session_id,))
                    peer, epoch = cur.execute(
                        "SELECT peer, epoch FROM sessions WHERE session_id=?", (session_id,)
                    ).fetchone()
                    pairruns.drop_staged(cur, peer, epoch)
                if changed and entry is not None:
                    self._append(cur, session_id, entry)
                cur.execute("COMMIT")
            except BaseException:
                _rollback(cur)
                raise
        return bool(changed)

    # -- audit log ----------------------------------------------------------

    @staticmethod
    def _append(cur: sqlite3.Cursor, session_id: str, entry: bytes) -> int:
        row = cur.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM log_entries").fetchone()
        idx = int(row[0])
        cur.execute("INSERT INTO log_entries VALUES (?,?,?)", (idx, session_id, entry))
        return idx

    @storage_errors
    def append_entry(self, session_id: str, entry: bytes) -> int:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                idx = self._append(cur, session_id, entry)
                cur.execute("COMMIT")
            except BaseException:
                _rollback(cur)
                raise
        return idx

    def log_entries(self, start: int = 0, end: int | None = None) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT entry FROM log_entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, end if end is not None else 2**62),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def log_index(self, session_id: str) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT idx FROM log_entries WHERE session_id=? ORDER BY idx LIMIT 1",
                (session_id,),
            ).fetchone()
        return int(row[0]) if row else None

    @storage_errors
    def add_checkpoint(self, size: int, note: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO checkpoints VALUES (?,?,?)", (size, note, utcnow())
            )

    def checkpoint(self, size: int | None = None) -> tuple[int, str] | None:
        """The checkpoint of a size, or the latest one."""
        with self._lock:
            if size is None:
                row = self._db.execute(
                    "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1"
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT size, note FROM checkpoints WHERE size=?", (size,)
                ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def recent_checkpoints(self, limit: int) -> list[tuple[int, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT ?", (limit,)
            ).fetchall()
        return [(int(a), str(b)) for a, b in rows]

    @storage_errors
    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO cosignatures VALUES (?,?,?)", (size, witness, line)
            )

    def cosignatures(self, size: int) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT line FROM cosignatures WHERE size=? ORDER BY witness", (size,)
            ).fetchall()
        return [str(r[0]) for r in rows]

    @storage_errors
    def set_witnessed(self, peer: str, size: int, note: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO witnessed VALUES (?,?,?,?)", (peer, size, note, utcnow())
            )

    def witnessed(self) -> dict[str, tuple[int, str]]:
        with self._lock:
            rows = self._db.execute("SELECT peer, size, note FROM witnessed").fetchall()
        return {str(p): (int(s), str(n)) for p, s, n in rows}

    def session(self, session_id: str) -> SessionRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM sessions WHERE session_id=?", (session_id,)
            ).fetchone()
        return SessionRow(*row) if row else None

    @storage_errors
    def destroy_epoch(self, epoch: int) -> int:
        """At an epoch's retirement: erase its pair keys, tag state and sessions' match tags.

        Returns how many match tags were erased. The file is vacuumed so the
        bytes do not linger in free pages.
        """
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                erased = cur.execute(
                    "UPDATE matches SET tag=x'' WHERE length(tag) > 0 AND session_id IN "
                    "(SELECT session_id FROM sessions WHERE epoch=?)",
                    (epoch,),
                ).rowcount
                for table in pairstate.STATE_TABLES:
                    cur.execute(f"DELETE FROM {table} WHERE epoch=?", (epoch,))  # noqa: S608
                cur.execute("COMMIT")
            except BaseException:
                _rollback(cur)
                raise
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return erased

    # -- pair state (incremental reconciliation, online checks) --------------

    def _log_changes(self, cur: sqlite3.Cursor, nids: set[str]) -> None:
        """Bump the registry version and note which IDs changed (for incremental runs)."""
        if not nids:
            return
        cur.execute(
            "INSERT INTO meta VALUES ('registry_version', '1') ON CONFLICT(key) DO UPDATE "
            "SET value = CAST(value AS INTEGER) + 1"
        )
        version = int(
            cur.execute("SELECT value FROM meta WHERE key='registry_version'").fetchone()[0]
        )
        cur.executemany("INSERT INTO registry_changes VALUES (?,?)", ((version, n) for n in nids))

    def changed_since(self, version: int) -> set[str]:
        """IDs whose records changed after a registry version."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT nid FROM registry_changes WHERE version > ?", (version,)
            ).fetchall()
        return {str(r[0]) for r in rows}

    def records_by_nids(self, nids: Iterable[str]) -> list[StoredRecord]:
        """The records of these IDs, in the order given (each ID's in index order)."""
        wanted = list(nids)
        found: dict[str, list[StoredRecord]] = {}
        labels: dict[tuple[str, str], Label] = {}
        with self._lock:
            for at in range(0, len(wanted), _IN_BATCH):
                part = wanted[at : at + _IN_BATCH]
                marks = ",".join("?" * len(part))
                for rid, n, p, s in self._db.execute(
                    "SELECT record_id, nid, programme, status FROM records "  # noqa: S608
                    f"WHERE nid IN ({marks}) ORDER BY nid, programme, status, record_id",
                    part,
                ):
                    label = labels.get((p, s))
                    if label is None:
                        label = labels[(p, s)] = Label(p, s)
                    found.setdefault(n, []).append(StoredRecord(rid, n, label))
        return [r for n in dict.fromkeys(wanted) for r in found.get(n, ())]

    def labelled_records(self, nids: list[str]) -> Iterator[tuple[str, str, Label]]:
        """(record_id, nid, label) of the records of these IDs (sorted, distinct), in
        index order, read from the covering index in batches: a full run's matched
        records, without a record object each."""
        labels: dict[tuple[str, str], Label] = {}
        for at in range(0, len(nids), _IN_BATCH):
            part = nids[at : at + _IN_BATCH]
            marks = ",".join("?" * len(part))
            with self._lock:
                rows = self._db.execute(
                    "SELECT record_id, nid, programme, status FROM records "  # noqa: S608
                    f"WHERE nid IN ({marks}) ORDER BY nid, programme, status, record_id",
                    part,
                ).fetchall()
            for rid, n, p, s in rows:
                label = labels.get((p, s))
                if label is None:
                    label = labels[(p, s)] = Label(p, s)
                yield rid, n, label

    def nid_labels(self, batch: int = 100_000) -> Iterator[tuple[str, str, str]]:
        """(nid, programme, status) of every record, in ID order: a full run's input,
        without a Python object per record. Read in batches along the covering
        index (keyset pagination), the store lock held per batch only, so memory
        stays flat and online checks are answered in between."""
        # Batches end on an ID boundary, so the key is the ID alone: record IDs (long
        # strings) are not read, which halves the cost of the pass.
        start, op = "", ">="
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT nid, programme, status FROM records "  # noqa: S608 (op is ours)
                    f"WHERE nid {op} ? ORDER BY nid, programme, status LIMIT ?",
                    (start, batch),
                ).fetchall()
                full = len(rows) == batch
                if full and rows[0][0] == rows[-1][0]:
                    # one ID holds a batch of records or more: all of them, then on
                    start, op = rows[0][0], ">"
                    rows = self._db.execute(
                        "SELECT nid, programme, status FROM records WHERE nid = ? "
                        "ORDER BY programme, status",
                        (start,),
                    ).fetchall()
                elif full:  # the last ID's records may go on: they come next time
                    start, op = rows[-1][0], ">="
                    while rows[-1][0] == start:
                        rows.pop()
            yield from rows
            if not full:
                return

    def distinct_labels(self) -> list[Label]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT programme, status FROM records").fetchall()
        return sorted(Label(p, s) for p, s in rows)

    def nid_label_codes(self, labels: list[Label], batch: int = 500_000) -> Iterator[str]:
        """Every record as its ID followed by one character: chr(i + 2) for labels[i]
        (at most 254), chr(1) for any other label; concatenated by SQLite in batches
        of about `batch` records that end on an ID boundary, so a full run's pass
        over millions makes a few strings, not a Python object per record. Only
        the store lock is held per batch, so online checks are answered in between."""
        if len(labels) > 254:
            raise ValueError("at most 254 labels have a one-character code")
        case = " ".join("WHEN programme=? AND status=? THEN ?" for _ in labels)
        codes = [x for i, lb in enumerate(labels) for x in (lb.programme, lb.status, chr(i + 2))]
        query = (
            f"SELECT group_concat(nid || CASE {case} ELSE ? END, '') FROM records "  # noqa: S608
            "WHERE nid >= ? AND (? IS NULL OR nid < ?)"
        )
        low = ""
        while True:
            with self._lock:
                row = self._db.execute(
                    "SELECT nid FROM records WHERE nid >= ? ORDER BY nid LIMIT 1 OFFSET ?",
                    (low, batch),
                ).fetchone()
                high = None if row is None else str(row[0])
                if high == low:  # one ID with a batch of records or more: it alone
                    row = self._db.execute(
                        "SELECT nid FROM records WHERE nid > ? ORDER BY nid LIMIT 1", (low,)
                    ).fetchone()
                    high = None if row is None else str(row[0])
                (text,) = self._db.execute(query, (*codes, chr(1), low, high, high)).fetchone()
            if text:
                yield str(text)
            if high is None:
                return
            low = high

    def own_tags_for(
        self, peer: str, epoch: int, nids: Iterable[str]
    ) -> dict[str, pairstate.OwnTag]:
        with self._lock:
            return pairstate.own_by_nids(self._db, peer, epoch, nids)

    def own_nids_by_tag(self, peer: str, epoch: int, tags: Iterable[bytes]) -> dict[bytes, str]:
        with self._lock:
            found = pairstate.own_by_tags(self._db, peer, epoch, tags)
        return {t: nid for t, (nid, _) in found.items()}

    def peer_labels_for(self, peer: str, epoch: int, tags: Iterable[bytes]) -> dict[bytes, str]:
        with self._lock:
            return pairstate.peer_by_tags(self._db, peer, epoch, tags)

    def matched_state(self, peer: str, epoch: int) -> list[tuple[str, bytes, str]]:
        """(nid, tag, peer labels) of own IDs whose tag the peer also holds: the matches."""
        with self._lock:
            return pairstate.matched_state(self._db, peer, epoch)

    def pair_sync(self, peer: str, epoch: int) -> pairstate.SyncRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, own_fp, peer_fp, policy FROM pair_sync WHERE peer=? AND epoch=?",
                (peer, epoch),
            ).fetchone()
        return (
            pairstate.SyncRow(int(row[0]), bytes(row[1]), bytes(row[2]), str(row[3]))
            if row
            else None
        )

    def registry_version(self) -> int:
        return int(self.meta("registry_version") or 0)

    def distinct_ids(self) -> int:
        """Distinct IDs in the registry (the size a node declares in a handshake).

        Counted once; after a change the last count is answered at once and a
        recount runs in the background (a handshake, as for an online check's sync,
        must not wait for a scan of the registry). Callers declare at least the set
        they send, so a count behind by a few changes is harmless."""
        version = self.registry_version()
        cached: tuple[int, int] | None = getattr(self, "_distinct", None)
        if cached is None:
            self._distinct = (version, self._count_distinct())
            return self._distinct[1]
        if cached[0] != version and not self._counting.locked():
            threading.Thread(target=self._recount, name="count-ids", daemon=True).start()
        return cached[1]

    def _count_distinct(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(DISTINCT nid) FROM records").fetchone()[0])

    def _recount(self) -> None:
        if not self._counting.acquire(blocking=False):
            return
        try:
            version = self.registry_version()
            self._distinct = (version, self._count_distinct())
        except sqlite3.Error:  # (closed meanwhile: the next handshake counts again)
            pass
        finally:
            self._counting.release()

    def pair_key(self, peer: str, epoch: int) -> BlindingKey:
        with self._lock:
            return pairstate.pair_key(self._db, self._master, peer, epoch, utcnow())

    def rekey_if_due(self, peer: str, epoch: int, days: int) -> bool:
        """Re-key the pair if its key is `days` old (0: never); True if it did. The
        pair's state goes with the old key, so the next run with the peer is full."""

        def step(cur: sqlite3.Cursor) -> bool:
            if not pairstate.rekey_due(self._db, peer, epoch, datetime.now(UTC), days):
                return False
            pairstate.rekey(cur, peer, epoch, utcnow())
            return True

        if days <= 0:
            return False
        done = self._write_tx(step)
        if done:
            log.info("pair key for %s (epoch %d) renewed after %d days", peer, epoch, days)
        return done

    def rekey_count(self, peer: str, epoch: int) -> int | None:
        """The pair's re-key counter (None: no pair key yet)."""
        with self._lock:
            row = self._db.execute(
                "SELECT rekey FROM pair_keys WHERE peer=? AND epoch=?", (peer, epoch)
            ).fetchone()
        return int(row[0]) if row else None

    def snapshot(self) -> bytes:
        """A consistent copy of the whole store, taken online (SQLite's backup API), as
        a rollback-journal image (header bytes 18-19 = 1; the copy of a WAL store would
        not open in memory)."""
        with self._lock:
            mem = sqlite3.connect(":memory:")
            try:
                self._db.backup(mem)
                image = bytearray(mem.serialize())
            finally:
                mem.close()
        image[18] = image[19] = 1
        return bytes(image)

    def pair_version(self, peer: str, epoch: int) -> int | None:
        """The registry version the own tags for this peer reflect; None: no state."""
        with self._lock:
            row = self._db.execute(
                "SELECT version FROM pair_sync WHERE peer=? AND epoch=?", (peer, epoch)
            ).fetchone()
        return int(row[0]) if row else None

    def lookup_own_tags(self, peer: str, epoch: int, tags: list[bytes]) -> dict[bytes, str]:
        """Labels of this node's IDs whose tag for `peer` is among `tags` (online checks)."""
        with self._lock:
            found = pairstate.own_by_tags(self._db, peer, epoch, tags)
        return {t: labels for t, (_, labels) in found.items()}

    def ping(self) -> None:
        """Raise if the store cannot be read and written (for the health check)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else None

    @storage_errors
    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def running_sessions(self) -> list[SessionRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM sessions WHERE state='RUNNING'").fetchall()
        return [SessionRow(*r) for r in rows]

    def sessions(self) -> list[SessionRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM sessions ORDER BY started_at").fetchall()
        return [SessionRow(*r) for r in rows]

    def latest_completed_sessions(self) -> list[SessionRow]:
        """The latest completed session with each peer."""
        latest: dict[str, SessionRow] = {}
        for s in self.sessions():
            if s.state == "COMPLETED":
                latest[s.peer] = s
        return list(latest.values())

    def matches(self, session_id: str, record_id: str | None = None) -> Iterator[MatchRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT record_id, programme, status, peer_programme, peer_status, tag "
                "FROM matches WHERE session_id=? AND (? IS NULL OR record_id=?) "
                "AND ? IN (SELECT session_id FROM sessions WHERE state='COMPLETED') "
                "ORDER BY record_id, peer_programme, peer_status",
                (session_id, record_id, record_id, session_id),
            ).fetchall()
        for rid, p, s, pp, ps, tag in rows:
            yield MatchRow(rid, Label(p, s), Label(pp, ps), bytes(tag))

    def match_holders(self, session_id: str) -> dict[str, str]:
        """For each record matched in a session and still in the registry, a key of
        the person holding it: the lowest record id among the records with the same
        identity number. Records of one person share the key; it is a record id,
        never the ID number, so the number does not leave the database."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT m.record_id, (SELECT MIN(o.record_id) FROM records o "
                "WHERE o.nid = r.nid) FROM matches m JOIN records r "
                "ON r.record_id = m.record_id WHERE m.session_id=?",
                (session_id,),
            ).fetchall()
        return {str(rid): str(holder) for rid, holder in rows}

    def matched_tags(self, session_id: str) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT tag FROM matches WHERE session_id=? AND ? IN "
                "(SELECT session_id FROM sessions WHERE state='COMPLETED')",
                (session_id, session_id),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    # -- query budgets ------------------------------------------------------

    @storage_errors
    def charge_budget(
        self,
        peer: str,
        epoch: int,
        values: int,
        declared: int,
        today: str,
        allowance: Callable[[int, str], int],
    ) -> BudgetRow:
        """Add `values` to the peer's use in the epoch if `allowance(declared, first_day)`
        allows it, in one transaction; else count a refusal. The size the allowance is
        drawn from is the first non-zero one the peer declared in the epoch: a later
        declaration cannot raise it (a peer that declared a small registry and spent its
        budget must not buy more by declaring a large one; `budget_daily` covers
        growth). Returns the row after (`charged` says which)."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                row = cur.execute(
                    "SELECT declared, used, refused, first_day FROM query_budget "
                    "WHERE peer=? AND epoch=?",
                    (peer, epoch),
                ).fetchone()
                old_declared, used, refused, first_day = row or (0, 0, 0, today)
                size = old_declared or declared
                limit = allowance(size, first_day)
                charged = used + values <= limit
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
                cur.execute("COMMIT")
            except BaseException:
                _rollback(cur)
                raise
        return BudgetRow(peer, epoch, size, used, refused, first_day, limit, charged)

    def budget(self, peer: str, epoch: int) -> tuple[int, int, int, str] | None:
        """(declared, used, refused, first day) of a peer's budget in an epoch, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT declared, used, refused, first_day FROM query_budget "
                "WHERE peer=? AND epoch=?",
                (peer, epoch),
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]), str(row[3]))


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


def _running(cur: sqlite3.Cursor, session_id: str) -> bool:
    row = cur.execute(
        "SELECT 1 FROM sessions WHERE session_id=? AND state='RUNNING'", (session_id,)
    ).fetchone()
    return row is not None


class RunStager:
    """A staged generation of one pair's sorted runs, each written in pieces as merged.

    The generation is not the pair's state until the session commits
    (`complete_session` activates `PairDelta.staged`); a session that fails leaves
    it to be dropped by the pair's next staging. Sessions of a pair never overlap
    (the node holds a lock per peer), so one pair has one staging at a time."""

    def __init__(self, store: Store, peer: str, epoch: int) -> None:
        self.store, self.peer, self.epoch = store, peer, epoch
        self.gen = store._write_tx(
            lambda cur: pairruns.new_generation(cur, peer, epoch), staging=True
        )

    def writer(self, kind: pairruns.Kind) -> StagedRun:
        """A run written as it is merged, piece by piece (`StagedRun`)."""
        return StagedRun(self, kind)

    def done(self, labelsets: dict[str, int]) -> int:
        self.store._write_tx(
            lambda cur: pairruns.write_labelsets(cur, self.peer, self.epoch, self.gen, labelsets),
            staging=True,
        )
        return self.gen


class StagedRun:
    """One run of a staged generation, appended in sorted pieces as an external sort
    or a join gives them out. Pieces are gathered to FLUSH bytes of whole parts
    per transaction (each commit is a sync to disk); `close` writes the rest."""

    FLUSH = 8 << 20

    def __init__(self, stager: RunStager, kind: pairruns.Kind) -> None:
        self.stager, self.kind = stager, kind
        self.part = 0
        self._buf = bytearray()

    def append(self, data: pairruns.Run) -> None:
        self._buf += data
        if len(self._buf) >= self.FLUSH:
            step = pairruns.PART_RECORDS * self.kind.width
            self._flush(len(self._buf) - len(self._buf) % step)

    def close(self) -> None:
        self._flush(len(self._buf))

    def _flush(self, size: int) -> None:
        if not size:
            return
        s, data = self.stager, memoryview(self._buf)[:size]
        try:
            self.part = s.store._write_tx(
                lambda cur: pairruns.write_parts(
                    cur, s.peer, s.epoch, s.gen, self.kind, self.part, data
                ),
                staging=True,
            )
        finally:
            data.release()
        del self._buf[:size]


@dataclass(frozen=True)
class SyncCounts:
    before: int
    inserted: int
    updated: int
    unchanged: int
    deleted: int
    kept: int


class RegistrySync:
    """A registry sync: rows staged in tables of the store itself (never in
    memory whole, never in a file outside the store, never read by sessions),
    then one transaction that inserts, updates and deletes, or nothing at all.
    Staging tables are emptied at the start and end of every sync, so one left
    by a node that died mid-sync is never applied.

    `stage(..., kept)`: record ids of rows of the file that were rejected; their
    stored records (if any) are left as they are, not deleted."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store._write_tx(self._reset, staging=True)

    @staticmethod
    def _reset(cur: sqlite3.Cursor) -> None:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS sync_rows (record_id TEXT PRIMARY KEY, "
            "nid TEXT NOT NULL, programme TEXT NOT NULL, status TEXT NOT NULL)"
        )
        cur.execute("CREATE TABLE IF NOT EXISTS sync_keep (record_id TEXT PRIMARY KEY)")
        cur.execute("DELETE FROM sync_rows")
        cur.execute("DELETE FROM sync_keep")

    def stage(self, records: Iterable[StoredRecord], kept: Iterable[str] = ()) -> None:
        rows = [(r.record_id, r.nid, r.label.programme, r.label.status) for r in records]
        keep = [(k,) for k in kept]

        def step(cur: sqlite3.Cursor) -> None:
            # A record id repeated in the file: the last row wins, as in a load.
            cur.executemany("INSERT OR REPLACE INTO sync_rows VALUES (?,?,?,?)", rows)
            cur.executemany("INSERT OR IGNORE INTO sync_keep VALUES (?)", keep)

        self.store._write_tx(step, staging=True)

    @storage_errors
    def apply(self, decide: Callable[[SyncCounts], bool]) -> tuple[SyncCounts, bool]:
        """Count what the sync changes, ask `decide`, and apply it all if it says so.

        Counting and applying share one write transaction, so nothing can change
        between them."""
        store = self.store
        gone = (
            "FROM records WHERE record_id NOT IN (SELECT record_id FROM sync_rows) "
            "AND record_id NOT IN (SELECT record_id FROM sync_keep)"
        )
        differs = (
            "FROM sync_rows s JOIN records r ON r.record_id = s.record_id "
            "WHERE (r.nid, r.programme, r.status) IS NOT (s.nid, s.programme, s.status)"
        )
        new = "FROM sync_rows s WHERE s.record_id NOT IN (SELECT record_id FROM records)"
        with store._lock:
            cur = store._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:

                def one(q: str) -> int:
                    return int(cur.execute(q).fetchone()[0])

                staged = one("SELECT count(*) FROM sync_rows")
                ins = one(f"SELECT count(*) {new}")
                upd = one(f"SELECT count(*) {differs}")
                counts = SyncCounts(
                    before=one("SELECT count(*) FROM records"),
                    inserted=ins,
                    updated=upd,
                    unchanged=staged - ins - upd,
                    deleted=one(f"SELECT count(*) {gone}"),
                    kept=one(
                        "SELECT count(*) FROM records WHERE record_id IN "
                        "(SELECT record_id FROM sync_keep) AND record_id NOT IN "
                        "(SELECT record_id FROM sync_rows)"
                    ),
                )
                if not decide(counts):
                    cur.execute("ROLLBACK")
                    return counts, False
                changed = {str(r[0]) for r in cur.execute(f"SELECT nid {gone}")}
                for old, nid in cur.execute(f"SELECT r.nid, s.nid {differs}").fetchall():
                    changed.update((str(old), str(nid)))
                changed.update(str(r[0]) for r in cur.execute(f"SELECT s.nid {new}"))
                cur.execute(f"DELETE {gone}")
                now = utcnow()
                cur.execute(
                    "UPDATE records SET nid = s.nid, programme = s.programme, status = s.status, "
                    "updated_at = ? FROM sync_rows s WHERE records.record_id = s.record_id "
                    "AND (records.nid, records.programme, records.status) IS NOT "
                    "(s.nid, s.programme, s.status)",
                    (now,),
                )
                cur.execute(
                    "INSERT INTO records SELECT s.record_id, s.nid, s.programme, s.status, ? "
                    + new,
                    (now,),
                )
                store._log_changes(cur, changed)
                cur.execute("COMMIT")
            except BaseException:
                _rollback(cur)
                raise
        return counts, True

    def close(self) -> None:
        try:
            self.store._write_tx(self._reset, staging=True)
        finally:
            self.store._syncing.release()

    def __enter__(self) -> RegistrySync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
