"""The PostgreSQL backend of the store: one database shared by a node's replicas.

`PostgresDatabase` meets `db.Database` over a psycopg 3 connection pool. The SQL
of `storage` is written once, SQLite-style; `to_pg` rewrites it (``?`` to ``%s``,
and in schemas SQLite's types to PostgreSQL's: BYTEA, BIGINT, and TEXT with the
"C" collation, so text sorts by bytes exactly as in SQLite).

Write transactions are one at a time across every replica, as SQLite's are
across a node's threads: each takes a transaction-level advisory lock
(`WRITE_LOCK`) first. So the audit log, whose next index is read inside the
appending transaction, never forks, and every invariant the rooms of `storage`
keep under SQLite's single writer holds here too. Reads take no lock.

Held across transactions, on connections of their own (`try_hold`): session-level
advisory locks, which PostgreSQL releases when the holder's connection ends (a
replica killed with SIGKILL too): a replica's liveness lock, and the lock on a
peer while a batch session with it runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from ispf.errors import ConfigError, PreconditionFailed, RetryLater, StorageFull, StoreUnavailable
from ispf_server.storage import db as dbmod
from ispf_server.storage.db import Connection, Cursor, Database

try:
    import psycopg
    import psycopg.errors
    import psycopg_pool
except ImportError as exc:  # pragma: no cover (the postgresql extra is not installed)
    raise ConfigError(
        "the store is a postgresql:// URL, but psycopg is not installed: install the "
        "node with its PostgreSQL extra (pip install 'ispf-match[postgresql]')"
    ) from exc

log = logging.getLogger(__name__)

# Advisory lock keys (two 32-bit halves: a namespace of this node's, then an object).
LOCK_SPACE = 0x15F0  # "ISPF"
WRITE_LOCK = 1  # every write transaction

POOL_MAX = 12  # connections per replica: sessions, online checks, background work
CONNECT_TIMEOUT = 15.0  # seconds to wait for the database at start
BORROW_TIMEOUT = 8.0  # seconds a request waits for a connection (past it: UNAVAILABLE)
PING_TIMEOUT = 3.0  # seconds the health check waits: past it, the replica is NOT_SERVING


def redact(url: str) -> str:
    """The URL without its password, in the user part or the query (for messages and
    logs); the rest as written."""
    netloc = urlsplit(url).netloc
    userinfo, at, hostport = netloc.rpartition("@")
    out = url
    if at and ":" in userinfo:
        out = out.replace(netloc, f"{userinfo.split(':', 1)[0]}:***@{hostport}", 1)
    return re.sub(r"(?i)([?&]password)=[^&]*", r"\1=***", out)


def has_password(url: str) -> bool:
    return redact(url) != url


def object_key(name: str) -> int:
    """A stable signed 32-bit key for a name (peer, replica id)."""
    v = zlib.crc32(name.encode("utf-8"))
    return v - (1 << 32) if v >= 1 << 31 else v


_DDL_TYPES = (
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bTEXT\b(?!\s+COLLATE)"), 'TEXT COLLATE "C"'),
    (re.compile(r"\s*\bWITHOUT ROWID\b"), ""),
)


def ddl(script: str) -> str:
    """A schema script of SQLite's types in PostgreSQL's."""
    for pattern, repl in _DDL_TYPES:
        script = pattern.sub(repl, script)
    return script


@functools.lru_cache(maxsize=4096)
def to_pg(sql: str, with_params: bool) -> str:
    """A statement of `storage` as PostgreSQL takes it: placeholders, and the row
    address SQLite calls rowid (only ever used within one statement)."""
    if sql.lstrip().upper().startswith(("CREATE TABLE", "ALTER TABLE")):
        sql = ddl(sql)
    sql = re.sub(r"\browid\b", "ctid", sql)
    if with_params:
        sql = sql.replace("%", "%%").replace("?", "%s")
    return sql


def _first_line(exc: BaseException) -> str:
    """libpq's reason (it never holds the password), on one line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()


def _translate_pg(exc: BaseException) -> Exception | None:
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return ConfigError(
            "the store's database refused this node's user "
            f"({exc.diag.message_primary or 'permission denied'}): make the user the "
            "database's owner (createdb -O <user> <database>), see docs/operations.md"
        )
    if isinstance(exc, psycopg.errors.DiskFull | psycopg.errors.OutOfMemory):
        log.error("store: %s", type(exc).__name__)
        return StorageFull(
            "the node's database is out of space: nothing of this request was stored; "
            "free space on the database server and try again"
        )
    if isinstance(
        exc,
        psycopg.errors.SerializationFailure
        | psycopg.errors.DeadlockDetected
        | psycopg.errors.LockNotAvailable
        | psycopg.errors.QueryCanceled,
    ):
        return RetryLater("the node's store is busy; try again")
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
        log.error("store: the database cannot be reached (%s)", type(exc).__name__)
        return StoreUnavailable(
            "the node's database cannot be reached: nothing of this request was stored; "
            "try again (another replica may answer)"
        )
    return None


dbmod.TRANSLATORS.append(_translate_pg)


class PgCursor:
    """A psycopg cursor that takes the SQLite-style statements of `storage`."""

    postgres = True

    def __init__(self, conn: PgConnection, raw: psycopg.Cursor[Any]) -> None:
        self._conn, self.raw = conn, raw

    @property
    def rowcount(self) -> int:
        return int(self.raw.rowcount)

    @property
    def connection(self) -> PgConnection:
        return self._conn

    @property
    def description(self) -> Any:
        return self.raw.description

    def fetchmany(self, size: int) -> list[Any]:
        return self.raw.fetchmany(size) if self.raw.description is not None else []

    def execute(self, sql: str, parameters: Any = (), /) -> PgCursor:
        if parameters:
            self.raw.execute(to_pg(sql, True), parameters)
        else:
            self.raw.execute(to_pg(sql, False))
        return self

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> PgCursor:
        rows = seq_of_parameters if isinstance(seq_of_parameters, list) else list(seq_of_parameters)
        if rows:
            self.raw.executemany(to_pg(sql, True), rows)
        return self

    def copy_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """COPY rows into a table (`db.insert_rows`)."""
        with self.raw.copy(f"COPY {table} ({','.join(columns)}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)

    def fetchone(self) -> Any:
        return self.raw.fetchone() if self.raw.description is not None else None

    def fetchall(self) -> list[Any]:
        return self.raw.fetchall() if self.raw.description is not None else []

    def __iter__(self) -> Iterator[Any]:
        if self.raw.description is None:
            return iter(())
        return iter(self.raw)


class PgConnection:
    """A pooled connection, as `Cursor.connection` and `Database.reading` give it."""

    postgres = True

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def cursor(self) -> PgCursor:
        return PgCursor(self, self.raw.cursor())

    def execute(self, sql: str, parameters: Any = (), /) -> PgCursor:
        return self.cursor().execute(sql, parameters)

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


class PostgresDatabase(Database):
    """A store in one PostgreSQL database, reached by a pool of connections in
    autocommit mode (transactions are begun only by `transaction` and `reading`)."""

    dialect = "postgresql"

    def __init__(self, url: str, *, pool_max: int = POOL_MAX) -> None:
        self.url = url
        self.location = redact(url)
        self._closed = False
        try:  # (one try first: a wrong URL, user or password is told at once)
            psycopg.connect(url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)).close()
        except (psycopg.ProgrammingError, ValueError) as exc:
            raise ConfigError(
                f"[store] url {self.location} is not a PostgreSQL URL libpq takes: "
                f"{_first_line(exc)}"
            ) from None
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(
                f"cannot connect to the store's database {self.location}: {_first_line(exc)} "
                "(check that PostgreSQL runs there, and the URL, user and password or "
                "PGPASSFILE in [store])"
            ) from None
        if has_password(url):
            log.warning(
                "store: the [store] url holds a password; keep it in a PGPASSFILE (0600) "
                "instead, and out of node.toml"
            )
        self.pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = (
            psycopg_pool.ConnectionPool(
                url,
                min_size=1,
                max_size=pool_max,
                kwargs={"autocommit": True, "application_name": "ispf-node"},
                open=False,
                timeout=BORROW_TIMEOUT,
                check=psycopg_pool.ConnectionPool.check_connection,
                name="ispf-store",
            )
        )
        try:
            self.pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except psycopg_pool.PoolTimeout as exc:
            self.pool.close()
            raise StoreUnavailable(
                f"cannot connect to the store's database {self.location} within "
                f"{CONNECT_TIMEOUT:.0f} s: check that PostgreSQL runs there, and the URL, "
                "user and password (or the PGPASSFILE) in [store]"
            ) from exc
        self._held: dict[tuple[int, int], psycopg.Connection[Any]] = {}
        self._held_lock = threading.Lock()
        self._check_version()

    def _check_version(self) -> None:
        row = self.fetchone("SELECT current_setting('server_version_num')::int")
        if row is not None and int(row[0]) < 120000:
            raise ConfigError(
                f"the store's database {self.location} runs PostgreSQL "
                f"{int(row[0]) // 10000}: ISPF Match needs 12 or later"
            )

    @contextmanager
    def _conn(self, timeout: float | None = None) -> Iterator[PgConnection]:
        try:
            with self.pool.connection(timeout=timeout) as raw:
                yield PgConnection(raw)
        except psycopg_pool.PoolClosed:
            raise
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            mapped = dbmod.translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    def create(self, *schemas: str) -> None:
        with self.transaction() as cur:
            for script in schemas:
                cur.execute(ddl(script))

    def columns(self, table: str) -> set[str]:
        rows = self.fetchall(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
        return {str(r[0]) for r in rows}

    @contextmanager
    def transaction(self, *, staging: bool = False) -> Iterator[Cursor]:
        """Begun, then the write lock taken, before the block's first statement.

        `staging` (see `SqliteDatabase.transaction`): committed without waiting
        for its WAL record to reach disk (``synchronous_commit = off``); the
        session's own commit waits, and WAL is flushed in order."""
        with self._conn() as conn:
            cur = conn.cursor()
            cur.raw.execute("BEGIN")
            try:
                cur.raw.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, WRITE_LOCK))
                if staging:
                    cur.raw.execute("SET LOCAL synchronous_commit = off")
                yield cur
                if conn.in_transaction:
                    cur.raw.execute("COMMIT")
            except BaseException:
                if not conn.raw.closed and conn.in_transaction:
                    # (where the connection is gone, the server rolled back)
                    with contextlib.suppress(psycopg.Error):
                        cur.raw.execute("ROLLBACK")
                raise

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._conn() as conn:
            row: tuple[Any, ...] | None = conn.execute(sql, params).fetchone()
        return row

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
        return rows

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """One snapshot for all the block's reads (REPEATABLE READ, read only)."""
        with self._conn() as conn:
            conn.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield conn
            finally:
                if not conn.raw.closed and conn.in_transaction:
                    conn.raw.execute("COMMIT")

    def compact(self, *, checkpoint_first: bool = False) -> None:
        """VACUUM FULL: the tables rewritten, so erased rows' bytes leave the data
        files (PostgreSQL's WAL archive and standbys are the operator's to expire)."""
        with self._conn() as conn:
            conn.raw.execute("VACUUM FULL")

    def snapshot(self) -> bytes:
        raise PreconditionFailed(
            f"the store is the PostgreSQL database {self.location}: back it up with "
            "PostgreSQL's own tools (pg_dump, or pg_basebackup and WAL archiving), "
            "see docs/operations.md"
        )

    def ping(self) -> None:
        """One round trip on a pooled connection; raises `StoreUnavailable` where the
        database cannot be reached or is read-only (a standby after a failover)."""
        with self._conn(timeout=PING_TIMEOUT) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        if row is not None and bool(row[0]):
            raise StoreUnavailable(
                f"the store's database {self.location} is a read-only standby: point "
                "[store] url at the primary"
            )

    # -- locks held across transactions ------------------------------------

    def try_hold(self, space: int, name: str) -> bool:
        """Take a session-level advisory lock on (space, name) on a connection of
        its own, kept until `release`; False where another holds it. PostgreSQL
        releases it when the connection ends, so a replica that dies lets go."""
        key = (space, object_key(name))
        with self._held_lock:
            if key in self._held:
                return False
            try:
                raw = self._lock_connection(key)
            except psycopg.Error as exc:
                mapped = dbmod.translate(exc)
                raise (mapped or exc) from exc
            if raw is None:
                return False
            self._held[key] = raw
            return True

    def _lock_connection(self, key: tuple[int, int]) -> psycopg.Connection[Any] | None:
        """A new connection holding the advisory lock `key`; None where another holds it."""
        raw = psycopg.Connection.connect(
            self.url, autocommit=True, application_name="ispf-node-lock"
        )
        try:
            row = raw.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()
        except BaseException:
            raw.close()
            raise
        if row is None or not row[0]:
            raw.close()
            return None
        return raw

    def refresh_holds(self) -> list[tuple[int, int]]:
        """Take again the locks whose connection broke (the database restarted, or a
        firewall dropped an idle connection: PostgreSQL let go of them). Returns the
        keys that could not be taken again (another now holds them, or the database
        is still away)."""
        with self._held_lock:
            held = list(self._held.items())
        lost = []
        for key, raw in held:
            try:
                if raw.closed:
                    raise psycopg.OperationalError("closed")
                raw.execute("SELECT 1")
                continue
            except psycopg.Error:
                raw.close()
            try:
                fresh = self._lock_connection(key)
            except psycopg.Error:
                fresh = None
            if fresh is None:
                lost.append(key)
                continue
            with self._held_lock:
                if self._held.get(key) is raw:
                    self._held[key] = fresh
                    log.warning("store: a lock lost with its connection was taken again")
                    continue
            fresh.close()  # (released meanwhile)
        return lost

    def release(self, space: int, name: str) -> None:
        key = (space, object_key(name))
        with self._held_lock:
            raw = self._held.pop(key, None)
        if raw is not None:
            raw.close()  # (the lock goes with the connection)

    def _granted(self, space: int, name: str | None = None) -> int:
        """Advisory locks of `space` (on `name` only, where given) granted now in this
        database, to any connection (this process's too)."""
        sql = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid::bigint = ? AND objsubid = 2"
        )
        params: tuple[int, ...] = (space & 0xFFFFFFFF,)
        if name is not None:
            sql += " AND objid::bigint = ?"
            params += (object_key(name) & 0xFFFFFFFF,)
        row = self.fetchone(sql, params)
        return int(row[0]) if row else 0

    def holders(self, space: int) -> int:
        return self._granted(space)

    def is_held_elsewhere(self, space: int, name: str) -> bool:
        return self._granted(space, name) > 0

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        with self._held_lock:
            held, self._held = list(self._held.values()), {}
        for raw in held:
            raw.close()
        self.pool.close()
