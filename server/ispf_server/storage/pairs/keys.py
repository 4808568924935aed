"""Pair keys: the re-key counter of each (peer, epoch)'s fixed blinding key, and the
node's master key file they derive from (the keys themselves are never stored).

Also the migration from stores of an older version, which kept the scalars in
`pair_keys`: those and the state made under them are erased.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from ispf.errors import KeyFileError, UnknownEpoch
from ispf.keys import BlindingKey, MasterKey
from ispf_server.storage.db import Connection, Cursor, Database, is_postgres
from ispf_server.storage.pairs.schema import STATE_TABLES

log = logging.getLogger(__name__)


def rekey_counter(db: Connection, peer: str, epoch: int) -> int | None:
    """The pair's re-key counter; None: the pair has no key yet (or its epoch was retired)."""
    row = db.execute(
        "SELECT rekey FROM pair_keys WHERE peer=? AND epoch=?", (peer, epoch)
    ).fetchone()
    return None if row is None else int(row[0])


def synced_rekeys(db: Connection, epoch: int) -> dict[str, int]:
    """Re-key counters of the epoch's pairs that hold state (a sync row: a
    reconciliation ran), by peer. (State is written only under its pair's key, so
    a pair with state has a key row.)"""
    return {
        str(p): int(r)
        for p, r in db.execute(
            "SELECT s.peer, k.rekey FROM pair_sync s JOIN pair_keys k "
            "ON k.peer = s.peer AND k.epoch = s.epoch WHERE s.epoch=?",
            (epoch,),
        )
    }


def pair_key(db: Connection, master: MasterKey, peer: str, epoch: int, now: str) -> BlindingKey:
    """The node's fixed scalar for this (peer, epoch): derived from the master key over
    the pair's re-key counter (the row is made, counter 0, on first use; in a write
    transaction)."""
    db.execute("INSERT INTO pair_keys VALUES (?,?,0,?) ON CONFLICT DO NOTHING", (peer, epoch, now))
    rekey = rekey_counter(db, peer, epoch)
    assert rekey is not None  # (just made, in this transaction)
    return master.pair_key(peer, epoch, rekey)


def require(cur: Cursor, peer: str, epoch: int) -> None:
    """Pair state is written only while the pair's key exists (its row in `pair_keys`,
    made before any state): an epoch retired (`Store.destroy_epoch`, perhaps from
    another process) while a session or a compaction of the pair was writing fails
    that write, so nothing of a retired epoch is written after its erasure. Write
    transactions take turns on both backends (SQLite's write lock, PostgreSQL's
    advisory write lock), so the check and the write see the same pair_keys; the
    row is also taken FOR SHARE in PostgreSQL, should that ever change."""
    sql = "SELECT 1 FROM pair_keys WHERE peer=? AND epoch=?"
    if is_postgres(cur):
        sql += " FOR SHARE"
    if cur.execute(sql, (peer, epoch)).fetchone() is None:
        raise UnknownEpoch(
            f"epoch {epoch} has no pair key with {peer} on this node (retired, or never "
            "used): its pair state is not written"
        )


def drop_keyless(db: Database) -> int:
    """Erase pair state left without its pair key (written by a node killed while an
    epoch was retired under it: `require` keeps a live one from it); returns how many
    (peer, epoch) pairs it erased. Run at a node's start."""
    keyed = {(str(p), int(e)) for p, e in db.fetchall("SELECT peer, epoch FROM pair_keys")}
    tables = [t for t in STATE_TABLES if t != "pair_keys"]
    orphans: set[tuple[str, int]] = set()
    for table in tables:
        held = db.fetchall(f"SELECT DISTINCT peer, epoch FROM {table}")  # noqa: S608
        orphans |= {(str(p), int(e)) for p, e in held} - keyed
    erased = 0
    if orphans:
        with db.transaction() as cur:
            for pair in sorted(orphans):
                if cur.execute("SELECT 1 FROM pair_keys WHERE peer=? AND epoch=?", pair).fetchone():
                    continue  # (keyed meanwhile: a pair's first session)
                for table in tables:
                    cur.execute(f"DELETE FROM {table} WHERE peer=? AND epoch=?", pair)  # noqa: S608
                erased += 1
    if erased:
        db.compact(checkpoint_first=True)  # (as the erasure would have: no bytes left over)
    return erased


def rekey_due(db: Connection, peer: str, epoch: int, now: datetime, days: int) -> bool:
    """Whether the pair key has been in use `days` days or more (0: never due)."""
    if days <= 0:
        return False
    row = db.execute(
        "SELECT created_at FROM pair_keys WHERE peer=? AND epoch=?", (peer, epoch)
    ).fetchone()
    return row is not None and now - datetime.fromisoformat(str(row[0])) >= timedelta(days=days)


def rekey(cur: Cursor, peer: str, epoch: int, now: str) -> None:
    """Bump the pair's re-key counter and drop its state (in the caller's transaction)."""
    for table in STATE_TABLES:
        if table != "pair_keys":
            cur.execute(f"DELETE FROM {table} WHERE peer=? AND epoch=?", (peer, epoch))  # noqa: S608
    cur.execute(
        "UPDATE pair_keys SET rekey = rekey + 1, created_at=? WHERE peer=? AND epoch=?",
        (now, peer, epoch),
    )


def has_stored_scalars(db: Database) -> bool:
    """A store from before master-key derivation (its pair_keys kept the scalars)."""
    return "scalar" in db.columns("pair_keys")


def drop_stored_scalars(db: Database) -> int:
    """Migration: a pair_keys table with a scalar column goes, with all pair state
    (made under those scalars, which are not derivable); the file is vacuumed so
    the scalars do not linger in free pages. Returns how many pairs had keys.
    Run before the pair schema is created (which makes the tables anew)."""
    if not has_stored_scalars(db):
        return 0
    with db.transaction() as cur:
        pairs = int(cur.execute("SELECT count(*) FROM pair_keys").fetchone()[0])
        for table in STATE_TABLES:
            if table != "pair_keys":
                cur.execute(f"DROP TABLE IF EXISTS {table}")  # recreated empty below
        cur.execute("DROP TABLE pair_keys")
    db.compact()
    return pairs


def load_master(db: Database, path: Path, store_path: str) -> MasterKey:
    """The master key; refuse one that is not the key this store was keyed with."""
    row = db.fetchone("SELECT value FROM meta WHERE key='master_kcv'")
    if not path.exists() and row is None:
        key = MasterKey.create_file(path)
        log.info("master key created: %s (mode 0600)", path)
    else:
        if not path.exists():
            raise KeyFileError(
                f"master key {path} is missing, and the store {store_path} was keyed with "
                "one: restore the node's master key file (the pair keys derive from it)"
            )
        key = MasterKey.from_file(path)
    if row is None:  # (two replicas' first starts at once: the first to write it wins)
        db.write(
            "INSERT INTO meta VALUES ('master_kcv', ?) ON CONFLICT DO NOTHING",
            (key.check_value(),),
        )
        row = db.fetchone("SELECT value FROM meta WHERE key='master_kcv'")
    if row is not None and str(row[0]) != key.check_value():
        raise KeyFileError(
            f"master key {path} is not the key the store {store_path} was keyed with: "
            "restore the right master key file (a replica of a shared store: copy the "
            "node's master.key from the replica that made it)"
        )
    return key
