"""The audit tables: log entries exactly as hashed, signed checkpoints over them,
witnesses' cosignatures, and the latest checkpoint verified from each peer."""

from __future__ import annotations

from ispf_server.clock import utcnow
from ispf_server.storage.db import Cursor, Database, storage_errors, upsert_sql

SCHEMA = """
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
-- The latest checkpoint this node verified from each peer.
CREATE TABLE IF NOT EXISTS witnessed (
    peer       TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    note       TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


def append(cur: Cursor, session_id: str, entry: bytes) -> int:
    """Append an entry in the caller's transaction; returns its index in the log."""
    row = cur.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM log_entries").fetchone()
    idx = int(row[0])
    cur.execute("INSERT INTO log_entries VALUES (?,?,?)", (idx, session_id, entry))
    return idx


class AuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    @storage_errors
    def append(self, session_id: str, entry: bytes) -> int:
        with self._db.transaction() as cur:
            return append(cur, session_id, entry)

    def entries(self, start: int = 0, end: int | None = None) -> list[bytes]:
        rows = self._db.fetchall(
            "SELECT entry FROM log_entries WHERE idx >= ? AND idx < ? ORDER BY idx",
            (start, end if end is not None else 2**62),
        )
        return [bytes(r[0]) for r in rows]

    def index_of(self, session_id: str) -> int | None:
        row = self._db.fetchone(
            "SELECT idx FROM log_entries WHERE session_id=? ORDER BY idx LIMIT 1",
            (session_id,),
        )
        return int(row[0]) if row else None

    @storage_errors
    def add_checkpoint(self, size: int, note: str) -> None:
        self._db.write(
            "INSERT INTO checkpoints VALUES (?,?,?) ON CONFLICT DO NOTHING", (size, note, utcnow())
        )

    def checkpoint(self, size: int | None = None) -> tuple[int, str] | None:
        """The checkpoint of a size, or the latest one."""
        if size is None:
            row = self._db.fetchone("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1")
        else:
            row = self._db.fetchone("SELECT size, note FROM checkpoints WHERE size=?", (size,))
        return (int(row[0]), str(row[1])) if row else None

    def recent_checkpoints(self, limit: int) -> list[tuple[int, str]]:
        rows = self._db.fetchall(
            "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT ?", (limit,)
        )
        return [(int(a), str(b)) for a, b in rows]

    @storage_errors
    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        self._db.write(
            upsert_sql("cosignatures", ("size", "witness", "line"), ("size", "witness")),
            (size, witness, line),
        )

    def cosignatures(self, size: int) -> list[str]:
        rows = self._db.fetchall(
            "SELECT line FROM cosignatures WHERE size=? ORDER BY witness", (size,)
        )
        return [str(r[0]) for r in rows]

    @storage_errors
    def set_witnessed(self, peer: str, size: int, note: str) -> None:
        self._db.write(
            upsert_sql("witnessed", ("peer", "size", "note", "updated_at"), ("peer",)),
            (peer, size, note, utcnow()),
        )

    def witnessed(self) -> dict[str, tuple[int, str]]:
        rows = self._db.fetchall("SELECT peer, size, note FROM witnessed")
        return {str(p): (int(s), str(n)) for p, s, n in rows}
