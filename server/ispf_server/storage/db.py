"""The store's database: one SQLite file per node, its connection and lock, its
pragmas, schema creation, and the one way to write: ``with db.transaction() as cur``.

Everything SQLite-specific that the rooms of `storage` share lives here: how a
transaction is begun (``BEGIN IMMEDIATE``, so a writer never upgrades a read
lock and deadlocks), how a full disk or a busy file is reported (as
`StorageFull` and `RetryLater`, in `ispf.errors`' tree), and how the file is
compacted and copied. Nothing above `storage` sees a connection or a cursor.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from ispf import files
from ispf.errors import RetryLater, StorageFull

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

IN_BATCH = 500  # keys per `IN (...)` query: well under SQLite's parameter limit
# The connection's page cache, in KiB (SQLite's default is 2 MiB): a registry's
# indexes are written in ID and record-id order, which a load's rows are not in, so
# each batch touches pages all over them; with 2 MiB most are read back each time.
CACHE_KIB = 64 * 1024
# Pages the WAL may grow to before SQLite copies it back (its default is 1,000):
# a page a load changes batch after batch is copied back once, not once a batch.
WAL_PAGES = 10_000


def _translate(exc: sqlite3.OperationalError) -> Exception | None:
    text = str(exc)
    if "full" in text:
        log.error("store: %s", text)
        return StorageFull(
            "the node's disk is full: nothing of this request was stored; free "
            "space on the node and try again"
        )
    if "locked" in text or "busy" in text:
        return RetryLater("the node's store is busy; try again")
    return None


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
            mapped = _translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    return cast(F, run)


def _rollback(cur: sqlite3.Cursor) -> None:
    # SQLite may already have rolled back (a full disk does): keep the original error.
    if cur.connection.in_transaction:
        cur.execute("ROLLBACK")


class Database:
    """The connection to a store file, with the lock every use of it holds.

    One connection, shared by the node's threads (`check_same_thread=False`),
    in autocommit mode (`isolation_level=None`): transactions are begun only by
    `transaction`."""

    def __init__(self, path: Path) -> None:
        files.private_dir(path.parent)
        files.private_new_file(path)  # SQLite gives -wal and -shm the store's mode
        self.path = path
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.lock = threading.Lock()
        with self.lock:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")

    def create(self, *schemas: str) -> None:
        """Create what the schemas create that does not exist yet (each `IF NOT EXISTS`)."""
        with self.lock:
            for script in schemas:
                self.conn.executescript(script)

    def columns(self, table: str) -> set[str]:
        """The columns a table has (none where it does not exist): for migrations."""
        with self.lock:
            return {str(r[1]) for r in self.conn.execute(f"PRAGMA table_info({table})")}

    @contextmanager
    def transaction(self, *, staging: bool = False) -> Iterator[sqlite3.Cursor]:
        """One write transaction, under the store lock: committed when the block
        ends (unless the block rolled back itself), rolled back when it raises.

        `staging`: what a session writes ahead of its commit (staged runs, match
        rows), which nothing reads unless that commit comes. Such a transaction
        is committed without its own sync to disk (synchronous=NORMAL: in WAL
        mode the store stays consistent, and only these transactions could be
        lost to a power cut). The session's commit is synced, and the WAL is
        appended to in order, so that sync makes everything staged before it
        durable too. A full run stages a hundred or more pieces; a sync each
        cost seconds at registry scale."""
        try:
            with self.lock:
                if staging:
                    self.conn.execute("PRAGMA synchronous=NORMAL")
                cur = self.conn.cursor()
                try:
                    cur.execute("BEGIN IMMEDIATE")
                    try:
                        yield cur
                        if cur.connection.in_transaction:
                            cur.execute("COMMIT")
                    except BaseException:
                        _rollback(cur)
                        raise
                finally:
                    if staging:
                        self.conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.OperationalError as exc:
            mapped = _translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    def write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement in a transaction of its own; returns the rows it changed."""
        with self.transaction() as cur:
            return int(cur.execute(sql, params).rowcount)

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self.lock:
            row: tuple[Any, ...] | None = self.conn.execute(sql, params).fetchone()
        return row  # (rows are tuples: the connection has no row factory)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            rows: list[tuple[Any, ...]] = self.conn.execute(sql, params).fetchall()
        return rows

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection under the store lock, for reads of several statements."""
        with self.lock:
            yield self.conn

    def compact(self, *, checkpoint_first: bool = False) -> None:
        """Vacuum the file, so erased bytes do not linger in free pages, and truncate
        the WAL (also before, with `checkpoint_first`)."""
        with self.lock:
            if checkpoint_first:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def snapshot(self) -> bytes:
        """A consistent copy of the whole store, taken online (SQLite's backup API), as
        a rollback-journal image (header bytes 18-19 = 1; the copy of a WAL store would
        not open in memory)."""
        with self.lock:
            mem = sqlite3.connect(":memory:")
            try:
                self.conn.backup(mem)
                image = bytearray(mem.serialize())
            finally:
                mem.close()
        image[18] = image[19] = 1
        return bytes(image)

    def ping(self) -> None:
        """Raise if the store cannot be read and written (for the health check)."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def restore_image(image: bytes, path: Path) -> bool:
    """Write a `Database.snapshot` image as a new store file at `path` (0600, made
    here); False, and nothing written, where the image holds no store."""
    mem = sqlite3.connect(":memory:")
    try:
        try:
            mem.deserialize(image)
            mem.execute("PRAGMA schema_version").fetchone()
        except sqlite3.DatabaseError:
            return False
        files.private_dir(path.parent)
        files.private_new_file(path)
        out = sqlite3.connect(path)
        try:
            mem.backup(out)
        finally:
            out.close()
    finally:
        mem.close()
    return True
