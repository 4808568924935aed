"""The store's own settings and counters, by key (`meta`): the master key's check
value, the registry version, a log key's fingerprint."""

from __future__ import annotations

from ispf_server.storage.db import Database, storage_errors, upsert_sql

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class Meta:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, key: str) -> str | None:
        row = self._db.fetchone("SELECT value FROM meta WHERE key=?", (key,))
        return str(row[0]) if row else None

    @storage_errors
    def set(self, key: str, value: str) -> None:
        self._db.write(upsert_sql("meta", ("key", "value"), ("key",)), (key, value))
