"""`ispf-node backup` / `restore`: the store, copied online and sealed to an operator.

The copy is taken with SQLite's backup API on the node's own store (consistent
while the node runs) and sealed with HPKE to the operator's X25519 backup
public key (`ispf.sealing`), so a backup file is as private as the store
wherever it is kept; it is written 0600 all the same. Restoring opens it with
the backup private key and writes the store file (0600) only where none is.
"""

from __future__ import annotations

from pathlib import Path

from ispf import files, sealing
from ispf.errors import ConfigError, SealedFileError
from ispf.nodeconfig import NodeConfig
from ispf_server.storage import Store
from ispf_server.storage.db import restore_image


def _refuse_postgres(config: NodeConfig) -> None:
    if config.store_url:
        raise ConfigError(
            "this node's store is a PostgreSQL database: back it up and restore it with "
            "PostgreSQL's own tools (pg_dump and pg_restore, or pg_basebackup with WAL "
            "archiving; see docs/operations.md, Replicas); back up the node's key files "
            "(master.key, the salts, log.key) separately, never beside the database's backups"
        )


def backup_store(config: NodeConfig, to: Path, public_key: Path) -> int:
    """Write the sealed backup; returns its size in bytes."""
    _refuse_postgres(config)
    if to.exists():
        raise ConfigError(f"{to} already exists: choose a new backup file")
    key = sealing.load_public_key(public_key)
    if not config.store.exists():
        raise ConfigError(f"no store at {config.store} to back up")
    store = Store(config.store, config.master_key, url=config.store_url)
    try:
        snapshot = store.db.snapshot()
    finally:
        store.close()
    data = sealing.seal_backup(snapshot, province=config.province, to=key)
    files.write_private_bytes(to, data)
    return len(data)


def restore_store(config: NodeConfig, src: Path, private_key: Path) -> None:
    """Write the backup's store to the configured path (there must be none)."""
    _refuse_postgres(config)
    for suffix in ("", "-wal", "-shm"):
        p = config.store.with_name(config.store.name + suffix)
        if p.exists():
            raise ConfigError(
                f"{p} exists: stop the node and move the current store aside before a restore"
            )
    try:
        data = src.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"backup file {src} does not exist") from exc
    payload = sealing.open_backup(
        data, where=str(src), province=config.province, key=sealing.load_private_key(private_key)
    )
    if not restore_image(payload, config.store):
        raise SealedFileError(f"{src} opened but holds no store")
