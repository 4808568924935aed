"""The store's database, as the rooms of `storage` see it: `Database`, with one way
to write (``with db.transaction() as cur``), reads, schema creation, and the
cursor protocol (`Cursor`) both backends' cursors meet. Two backends:
`SqliteDatabase` here (one file per node, the embedded default) and
`postgres.PostgresDatabase` (one PostgreSQL database, shared by a node's replicas).
`open_database` picks by location. Nothing above `storage` sees a connection or a
cursor, or knows which backend it has.

SQL in `storage` is written once, in the dialect both accept (SQLite >= 3.24 and
PostgreSQL: ``INSERT ... ON CONFLICT``, ``CASE``, row values compared with ``<>``,
``?`` placeholders, which the PostgreSQL cursor rewrites); the few statements
that differ ask `is_postgres`.

Everything SQLite-specific lives in `SqliteDatabase`: how a transaction is begun
(``BEGIN IMMEDIATE``, so a writer never upgrades a read lock and deadlocks), how a
full disk or a busy file is reported (as `StorageFull` and `RetryLater`, in
`ispf.errors`' tree), and how the file is compacted and copied.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

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


class Cursor(Protocol):
    """What `storage` uses of a cursor: `sqlite3.Cursor` is one, and so is the
    PostgreSQL backend's (`postgres.PgCursor`)."""

    @property
    def rowcount(self) -> int: ...

    @property
    def connection(self) -> Connection: ...

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor: ...

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> Cursor: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection inside a read (`Database.reading`) or a write (`Cursor.connection`)."""

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor: ...

    @property
    def in_transaction(self) -> bool: ...


def is_postgres(cur: Cursor | Connection) -> bool:
    """Whether a cursor (or connection) is the PostgreSQL backend's: for the few
    statements written twice."""
    return bool(getattr(cur, "postgres", False))


def upsert_sql(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    """``INSERT ... ON CONFLICT (key) DO UPDATE`` of every other column (both dialects)."""
    rest = [c for c in columns if c not in key]
    marks = ",".join("?" * len(columns))
    action = (
        "DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in rest) if rest else "DO NOTHING"
    )
    return (
        f"INSERT INTO {table} ({','.join(columns)}) VALUES ({marks}) "  # noqa: S608
        f"ON CONFLICT ({','.join(key)}) {action}"
    )


def insert_rows(
    cur: Cursor, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Insert many rows (which break no constraint) in the cursor's transaction:
    ``executemany`` in SQLite, COPY in PostgreSQL (`postgres.PgCursor.copy_rows`)."""
    copy = getattr(cur, "copy_rows", None)
    if copy is not None:
        copy(table, columns, rows)
        return
    marks = ",".join("?" * len(columns))
    cur.executemany(f"INSERT INTO {table} ({','.join(columns)}) VALUES ({marks})", rows)  # noqa: S608


# Translators of a backend's exceptions into `ispf.errors` (a full disk, a busy or
# unreachable store), or None for an exception they do not know. The PostgreSQL
# backend adds its own when it is imported.
TRANSLATORS: list[Callable[[BaseException], Exception | None]] = []


def _translate_sqlite(exc: BaseException) -> Exception | None:
    if not isinstance(exc, sqlite3.OperationalError):
        return None
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


TRANSLATORS.append(_translate_sqlite)


def translate(exc: BaseException) -> Exception | None:
    for t in TRANSLATORS:
        mapped = t(exc)
        if mapped is not None:
            return mapped
    return None


def storage_errors(fn: F) -> F:
    """Report a full disk, a busy store or a database that cannot be reached as such,
    not as a crash.

    Every write is one transaction that the database rolls back on such an error, so
    nothing half-written is left behind.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            mapped = translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    return cast(F, run)


class Database:
    """The store's database: what both backends provide."""

    dialect = ""
    # Where the store is, for messages (a file, or a URL without its password).
    location = ""

    def create(self, *schemas: str) -> None:
        """Create what the schemas create that does not exist yet (each `IF NOT EXISTS`)."""
        raise NotImplementedError

    def columns(self, table: str) -> set[str]:
        """The columns a table has (none where it does not exist): for migrations."""
        raise NotImplementedError

    def transaction(self, *, staging: bool = False) -> AbstractContextManager[Cursor]:
        """One write transaction: committed when the block ends (unless the block
        rolled back itself), rolled back when it raises. Write transactions are
        one at a time, across every process sharing the store."""
        raise NotImplementedError

    def write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement in a transaction of its own; returns the rows it changed."""
        with self.transaction() as cur:
            return int(cur.execute(sql, params).rowcount)

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        raise NotImplementedError

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection with one consistent view, for reads of several statements."""
        raise NotImplementedError

    def compact(self, *, checkpoint_first: bool = False) -> None:
        """Give erased bytes back, so they do not linger in free pages."""
        raise NotImplementedError

    def snapshot(self) -> bytes:
        raise NotImplementedError

    def ping(self) -> None:
        """Raise if the store cannot be read and written (for the health check)."""
        raise NotImplementedError

    # -- locks held across transactions (replicas); in SQLite one process has the
    # store (`ispf-node` takes a file lock), so its in-process locks are enough.

    def try_hold(self, space: int, name: str) -> bool:
        """Hold the lock (space, name) until `release`; False where another holds it."""
        return True

    def release(self, space: int, name: str) -> None:
        """Let go of a lock `try_hold` took."""

    def refresh_holds(self) -> list[tuple[int, int]]:
        """Take again held locks lost with their connection; returns those lost for good."""
        return []

    def holders(self, space: int) -> int:
        """How many locks of `space` are held now."""
        return 0

    def is_held_elsewhere(self, space: int, name: str) -> bool:
        """Whether any process holds (space, name) now."""
        return False

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _rollback(cur: sqlite3.Cursor) -> None:
    # SQLite may already have rolled back (a full disk does): keep the original error.
    if cur.connection.in_transaction:
        cur.execute("ROLLBACK")


class SqliteDatabase(Database):
    """The connection to a store file, with the lock every use of it holds.

    One connection, shared by the node's threads (`check_same_thread=False`),
    in autocommit mode (`isolation_level=None`): transactions are begun only by
    `transaction`."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only`: open an existing store only to read it, changing nothing in
        the file (`ispf-node migrate`'s source)."""
        self.path = path
        self.location = str(path)
        self.lock = threading.Lock()
        self._closed = False
        if read_only:
            self.conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
            )
            return
        files.private_dir(path.parent)
        files.private_new_file(path)  # SQLite gives -wal and -shm the store's mode
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with self.lock:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")

    def create(self, *schemas: str) -> None:
        with self.lock:
            for script in schemas:
                self.conn.executescript(script)

    def columns(self, table: str) -> set[str]:
        with self.lock:
            return {str(r[1]) for r in self.conn.execute(f"PRAGMA table_info({table})")}

    @contextmanager
    def transaction(self, *, staging: bool = False) -> Iterator[Cursor]:
        """Under the store lock, begun with ``BEGIN IMMEDIATE``.

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
                        yield cast(Cursor, cur)
                        if cur.connection.in_transaction:
                            cur.execute("COMMIT")
                    except BaseException:
                        _rollback(cur)
                        raise
                finally:
                    if staging:
                        self.conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.OperationalError as exc:
            mapped = _translate_sqlite(exc)
            if mapped is None:
                raise
            raise mapped from exc

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self.lock:
            row: tuple[Any, ...] | None = self.conn.execute(sql, params).fetchone()
        return row  # (rows are tuples: the connection has no row factory)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            rows: list[tuple[Any, ...]] = self.conn.execute(sql, params).fetchall()
        return rows

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """The connection under the store lock (so no write comes in between)."""
        with self.lock:
            yield cast(Connection, self.conn)

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
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("ROLLBACK")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.conn.close()


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_database(location: str | Path) -> Database:
    """A store file (SQLite) or a ``postgresql://`` URL."""
    if is_url(location):
        from ispf_server.storage.postgres import PostgresDatabase

        return PostgresDatabase(str(location))
    return SqliteDatabase(Path(location))


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
