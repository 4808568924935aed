"""Pair keys derive from the node's master key; the store keeps only a counter, and
stores from before (scalars in pair_keys) migrate by dropping that state."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from ispf.errors import KeyFileError
from ispf.keys import MasterKey
from ispf_server.storage import Store

OLD_SCALAR = bytes(range(100, 132))


def old_store(path: Path) -> None:
    """A store as the previous version left it: the scalar in pair_keys, with state."""
    Store(path).close()
    (path.parent / "master.key").unlink()
    db = sqlite3.connect(path)
    db.executescript(
        "DROP TABLE pair_keys; DELETE FROM meta WHERE key='master_kcv';"
        "CREATE TABLE pair_keys (peer TEXT NOT NULL, epoch INTEGER NOT NULL, "
        "scalar BLOB NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (peer, epoch));"
    )
    db.execute("INSERT INTO pair_keys VALUES ('sindh', 1, ?, '2026-01-01')", (OLD_SCALAR,))
    db.execute(
        "INSERT INTO pair_sync (peer, epoch, version, own_fp, peer_fp, policy) "
        "VALUES ('sindh', 1, 7, ?, ?, 'p')",
        (b"x" * 32, b"y" * 32),
    )
    db.commit()
    db.close()


def test_pair_keys_derive_per_peer_epoch_and_counter(tmp_path: Path) -> None:
    m = MasterKey.create_file(tmp_path / "master.key")
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    keys = {m.pair_key(p, e, r) for p in ("sindh", "kp") for e in (1, 2) for r in (0, 1)}
    assert len(keys) == 8
    assert MasterKey.from_file(tmp_path / "master.key").pair_key("sindh", 1, 0) == m.pair_key(
        "sindh", 1, 0
    )
    assert "secret" in repr(m) and m.check_value() not in repr(m)


def test_an_old_store_drops_its_scalars_and_pair_state_on_first_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node.sqlite"
    old_store(path)
    caplog.set_level(logging.WARNING)
    store = Store(path)
    try:
        assert store.pairs.sync_row("sindh", 1) is None  # the next run is full
        assert store.pairs.rekey_count("sindh", 1) is None
        key = store.pairs.key("sindh", 1)
        assert store.pairs.rekey_count("sindh", 1) == 0
        assert key.unsafe_raw() != OLD_SCALAR
    finally:
        store.close()
    assert "next run with each peer is full" in caplog.text
    for suffix in ("", "-wal"):
        f = path.with_name(path.name + suffix)
        assert not f.exists() or OLD_SCALAR not in f.read_bytes()


def test_a_store_refuses_a_master_key_it_was_not_keyed_with(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    Store(path).close()
    key = tmp_path / "master.key"
    saved = key.read_bytes()
    key.unlink()
    with pytest.raises(KeyFileError, match="is missing, and the store"):
        Store(path)
    MasterKey.create_file(key)
    with pytest.raises(KeyFileError, match="not the key the store"):
        Store(path)
    key.unlink()
    key.write_bytes(saved)
    key.chmod(0o600)
    Store(path).close()


def test_a_new_master_key_erases_pair_state_and_the_store_accepts_only_it(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    store = Store(path)
    old_key = store.pairs.key("sindh", 1)
    old_file = (tmp_path / "master.key").read_bytes()
    store.db.conn.execute(
        "INSERT INTO pair_sync (peer, epoch, version, own_fp, peer_fp, policy) "
        "VALUES ('sindh', 1, 7, ?, ?, 'p')",
        (b"x" * 32,) * 2,
    )
    assert store.pairs.replace_master_key() == 1
    assert store.pairs.sync_row("sindh", 1) is None and store.pairs.rekey_count("sindh", 1) is None
    assert store.pairs.key("sindh", 1) != old_key
    store.close()
    assert (tmp_path / "master.key").read_bytes() != old_file
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    Store(path).close()  # the new key is the store's key now
