"""Writing a session's changes to a pair's state, inside the session's commit."""

from __future__ import annotations

from ispf_server.storage.db import Cursor, is_postgres, upsert_sql
from ispf_server.storage.pairs import keys
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.state import (
    NID_BYTES,
    TAG_LEN,
    OwnGroup,
    PairDelta,
    PeerGroup,
)

_OWN_ROW = upsert_sql(
    "own_tags", ("peer", "epoch", "nid", "labels", "tag"), ("peer", "epoch", "nid")
)
_PEER_ROW = upsert_sql("peer_tags", ("peer", "epoch", "tag", "labels"), ("peer", "epoch", "tag"))

# Bulk inserts run inside SQLite (PostgreSQL takes the rows pipelined): the tags
# (and 13-digit IDs) of one label set go in as packed blobs and a recursive CTE cuts
# them into rows, sorted by the key, so Python does not bind a million parameter
# tuples (about twice as fast).
_OWN_BULK = (
    "WITH RECURSIVE i(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM i WHERE k + 1 < :n) "
    "INSERT OR REPLACE INTO own_tags "
    "SELECT :peer, :epoch, CAST(substr(:nids, k * 13 + 1, 13) AS TEXT), :labels, "
    "substr(:tags, k * 16 + 1, 16) FROM i ORDER BY 3"
)
_PEER_BULK = (
    "WITH RECURSIVE i(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM i WHERE k + 1 < :n) "
    "INSERT OR REPLACE INTO peer_tags "
    "SELECT :peer, :epoch, substr(:tags, k * 16 + 1, 16), :labels FROM i ORDER BY 3"
)


def _insert_own(cur: Cursor, peer: str, epoch: int, added: list[OwnGroup]) -> None:
    for g in added:
        if not g.tags:  # the CTE always yields its first row: never run it for none
            continue
        packed_nids = "".join(g.nids)
        if (
            not is_postgres(cur)
            and packed_nids.isascii()
            and all(len(n) == NID_BYTES for n in g.nids)
            and all(len(t) == TAG_LEN for t in g.tags)
        ):
            cur.execute(
                _OWN_BULK,
                {
                    "n": len(g.nids),
                    "peer": peer,
                    "epoch": epoch,
                    "nids": packed_nids.encode("ascii"),
                    "labels": g.labels,
                    "tags": b"".join(g.tags),
                },
            )
        else:  # PostgreSQL, or IDs not in canonical form (older stores, tests): row by row
            cur.executemany(
                _OWN_ROW,
                ((peer, epoch, n, g.labels, t) for n, t in zip(g.nids, g.tags, strict=True)),
            )


def _insert_peer(cur: Cursor, peer: str, epoch: int, added: list[PeerGroup]) -> None:
    for g in added:
        if not g.tags:
            continue
        if not is_postgres(cur) and all(len(t) == TAG_LEN for t in g.tags):
            cur.execute(
                _PEER_BULK,
                {
                    "n": len(g.tags),
                    "peer": peer,
                    "epoch": epoch,
                    "tags": b"".join(g.tags),
                    "labels": g.labels,
                },
            )
        else:
            cur.executemany(
                _PEER_ROW,
                ((peer, epoch, t, g.labels) for t in g.tags),
            )


def apply_delta(cur: Cursor, peer: str, epoch: int, d: PairDelta, session_id: str = "") -> None:
    """Write a session's changes to the pair state (inside the session's transaction);
    `session_id`: the session committing them, whose match rows become the pair's
    current result.

    A full run replaces the state: with the sorted runs it staged (`d.staged`),
    else as rows. An incremental run writes rows on top, and tombstones the
    run entries it replaces or removes. Only while the pair's key exists
    (`keys.require`): a session whose epoch was retired under it commits nothing."""
    keys.require(cur, peer, epoch)
    if d.reset:
        for table in ("own_tags", "peer_tags", "own_gone", "peer_gone"):
            cur.execute(f"DELETE FROM {table} WHERE peer=? AND epoch=?", (peer, epoch))  # noqa: S608
        if d.staged is not None:
            pairruns.activate(cur, peer, epoch, d.staged)
        else:
            pairruns.clear(cur, peer, epoch)
            _insert_own(cur, peer, epoch, d.own_added)
            _insert_peer(cur, peer, epoch, d.peer_added)
    else:
        if pairruns.held(cur.connection, peer, epoch):
            # Harmless where the run holds no such entry: lookups only consult it there.
            cur.executemany(
                "INSERT INTO own_gone VALUES (?,?,?) ON CONFLICT DO NOTHING",
                (
                    (peer, epoch, n)
                    for n in [*d.own_removed, *(n for g in d.own_added for n in g.nids)]
                ),
            )
            cur.executemany(
                "INSERT INTO peer_gone VALUES (?,?,?) ON CONFLICT DO NOTHING",
                (
                    (peer, epoch, t)
                    for t in [*d.peer_removed, *(t for g in d.peer_added for t in g.tags)]
                ),
            )
        cur.executemany(
            "DELETE FROM own_tags WHERE peer=? AND epoch=? AND nid=?",
            ((peer, epoch, n) for n in d.own_removed),
        )
        _insert_own(cur, peer, epoch, d.own_added)
        cur.executemany(
            "DELETE FROM peer_tags WHERE peer=? AND epoch=? AND tag=?",
            ((peer, epoch, t) for t in d.peer_removed),
        )
        _insert_peer(cur, peer, epoch, d.peer_added)
    cur.execute(
        upsert_sql(
            "pair_sync",
            ("peer", "epoch", "version", "own_fp", "peer_fp", "policy", "session_id"),
            ("peer", "epoch"),
        ),
        (peer, epoch, d.version, d.own_fp, d.peer_fp, d.policy, session_id),
    )
    # (Changes every pair has seen are dropped after the commit: `Store.prune_changes`.)
