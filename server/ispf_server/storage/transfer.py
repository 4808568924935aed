"""Moving a node's store from one database to another (`ispf-node migrate`): every
table of the store copied as it is (registry, change log, sessions and matches,
pair keys' counters and pair state, the audit log, its checkpoints and
cosignatures, budgets, meta), into an empty store, in one transaction, which
commits only once the copy is checked: row counts table by table, and the audit
log's Merkle root recomputed from the copied entries, equal to the source's and
to the root its latest signed checkpoint commits to.

Rows are streamed (SQLite's cursor is lazy; PostgreSQL takes them through COPY),
so a registry of millions moves in fixed memory.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ispf import merkle, note
from ispf.auditlog import Checkpoint
from ispf.errors import ConfigError, LogTampered
from ispf_server.storage.db import Connection, Cursor, Database, insert_rows
from ispf_server.storage.pairs.schema import STATE_TABLES
from ispf_server.storage.store import SCHEMA_VERSION, migrate, schema_version

# Every table that holds the node's data (the sync staging tables hold nothing
# between syncs and are not copied). Parents before children (matches -> sessions).
TABLES = (
    "meta",
    "records",
    "registry_changes",
    "sessions",
    "matches",
    "log_entries",
    "checkpoints",
    "cosignatures",
    "witnessed",
    "query_budget",
    *STATE_TABLES,
)
_BATCH = 10_000


@dataclass(frozen=True)
class Transfer:
    rows: dict[str, int]  # table -> rows copied
    log_size: int
    log_root: bytes
    checkpoint_size: int | None  # the latest signed checkpoint's size (None: none yet)


def check_store_file(path: Path) -> None:
    """Refuse a file that is not a node's SQLite store, touching nothing in it."""
    try:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            tables = {str(r[0]) for r in rows}
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path} is not a node store ({exc})") from None
    if not {"records", "sessions", "log_entries"} <= tables:
        raise ConfigError(f"{path} is not a node store (it has no registry or log tables)")


def _columns(db: Database, table: str) -> list[str]:
    # (in the source's order; the target must have the same set)
    with db.reading() as conn:
        cur: Any = conn.execute(f"SELECT * FROM {table} LIMIT 0")  # noqa: S608
        return [str(d[0]) for d in cur.description or ()]


def _stream(db: Database, table: str, columns: list[str]) -> Iterator[tuple[Any, ...]]:
    with db.reading() as conn:
        cur: Any = conn.execute(f"SELECT {','.join(columns)} FROM {table}")  # noqa: S608
        while batch := cur.fetchmany(_BATCH):
            yield from batch


def _count(db: Connection | Cursor, table: str) -> int:
    row = db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
    return int(row[0]) if row else 0


def _log_root(db: Connection | Cursor) -> tuple[int, bytes, tuple[int, str] | None]:
    """The log's size and Merkle root, and its latest checkpoint (size, signed note)."""
    rows = db.execute("SELECT entry FROM log_entries ORDER BY idx").fetchall()
    row = db.execute("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
    leaves = [merkle.leaf_hash(bytes(r[0])) for r in rows]
    checkpoint = None if row is None else (int(row[0]), str(row[1]))
    if checkpoint is not None:
        size, signed = checkpoint
        text, _ = note.split(signed)
        cp = Checkpoint.parse(text)
        if cp.size != size or cp.size > len(leaves) or merkle.root(leaves[: cp.size]) != cp.root:
            raise LogTampered(
                f"the audit log does not give the root its latest checkpoint (size {size}) "
                "signed: nothing was copied (verify the node's log with the auditor)"
            )
    return len(leaves), merkle.root(leaves), checkpoint


def _is_empty(db: Connection) -> bool:
    for table in TABLES:
        if table == "meta":
            row = db.execute("SELECT count(*) FROM meta WHERE key <> 'schema_version'").fetchone()
            if row is not None and int(row[0]):
                return False
        elif _count(db, table):
            return False
    return True


def copy_store(src: Database, dst: Database) -> Transfer:
    """Copy every table of `src` into `dst` (which must hold no data), and check the
    copy before it is committed. `src` is only read, and must be of this version's
    schema (a node upgrades its store when it starts); `dst` is brought to it.
    Raises `ConfigError` where `dst` holds data, and `LogTampered` where the log's
    root is not what its latest checkpoint signed (in the source, or as copied);
    then nothing is copied."""
    found = schema_version(src)
    if found != SCHEMA_VERSION:
        raise ConfigError(
            f"{src.location} is not a node store of this version (schema {found}, this "
            f"version's is {SCHEMA_VERSION}): start the node on it once with this version "
            "(it upgrades its store), stop it, then migrate; nothing was copied"
        )
    migrate(dst)
    with dst.reading() as conn:
        if not _is_empty(conn):
            raise ConfigError(
                f"the target store {dst.location} already holds data: migrate into a new, "
                "empty database (nothing was copied)"
            )
    with src.reading() as conn:
        size, root, checkpoint = _log_root(conn)
        want = {table: _count(conn, table) for table in TABLES}
    plan = []
    for table in TABLES:
        cols = _columns(src, table)
        if set(cols) != set(_columns(dst, table)):
            raise ConfigError(f"table {table} differs between the two stores: nothing was copied")
        plan.append((table, cols))
    with dst.transaction() as cur:
        cur.execute("DELETE FROM meta")  # (the target's own schema_version row: copied over)
        for table, cols in plan:
            insert_rows(cur, table, cols, _stream(src, table, cols))
        copied = {table: _count(cur, table) for table, _ in plan}
        for table, n in copied.items():
            if n != want[table]:
                raise ConfigError(
                    f"table {table}: {n} rows copied of {want[table]}: nothing was copied"
                )
        if _log_root(cur)[:2] != (size, root):
            raise LogTampered("the copied audit log's root differs from the source's")
    return Transfer(copied, size, root, None if checkpoint is None else checkpoint[0])
