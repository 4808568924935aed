"""The one transaction helper: commits at the end of its block, rolls back when the
block raises (or when the block rolled back itself), and reports a full disk or a
busy store as the errors of `ispf.errors`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ispf.errors import RetryLater, StorageFull
from ispf_server.storage.db import SqliteDatabase as Database
from ispf_server.storage.db import restore_image


def test_transaction_commits_or_rolls_back(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.sqlite")
    db.create("CREATE TABLE IF NOT EXISTS t (v INTEGER);")
    with db.transaction() as cur:
        cur.execute("INSERT INTO t VALUES (1)")

    def fails() -> None:
        with db.transaction() as cur:
            cur.execute("INSERT INTO t VALUES (2)")
            raise LookupError("no")

    with pytest.raises(LookupError, match="no"):
        fails()
    with db.transaction() as cur:
        cur.execute("INSERT INTO t VALUES (3)")
        cur.execute("ROLLBACK")  # the block decided against it
    assert db.fetchall("SELECT v FROM t") == [(1,)]
    assert not db.conn.in_transaction
    with db.transaction(staging=True) as cur:
        assert cur.execute("PRAGMA synchronous").fetchone() == (1,)
    assert db.fetchone("PRAGMA synchronous") == (2,)
    db.close()


@pytest.mark.parametrize(
    ("text", "error"),
    [("database or disk is full", StorageFull), ("database is locked", RetryLater)],
)
def test_transaction_reports_storage_errors(
    tmp_path: Path, text: str, error: type[Exception]
) -> None:
    db = Database(tmp_path / "s.sqlite")

    def fails() -> None:
        with db.transaction():
            raise sqlite3.OperationalError(text)

    with pytest.raises(error):
        fails()
    assert not db.conn.in_transaction
    db.close()


def test_restore_image(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.sqlite")
    db.create("CREATE TABLE IF NOT EXISTS t (v INTEGER);")
    db.write("INSERT INTO t VALUES (?)", (7,))
    image = db.snapshot()
    db.close()
    assert not restore_image(b"not a store", tmp_path / "bad.sqlite")
    assert not (tmp_path / "bad.sqlite").exists()
    assert restore_image(image, tmp_path / "copy.sqlite")
    copy = Database(tmp_path / "copy.sqlite")
    assert copy.fetchall("SELECT v FROM t") == [(7,)]
    copy.close()
