"""The tables of pair state: pair keys, the state as rows (what changed since the
pair's last full run, and tombstones over the runs), the sync row, and the runs
(`runs.SCHEMA`). `STATE_TABLES`: every table keyed by (peer, epoch).
"""

from __future__ import annotations

from ispf_server.storage.pairs import runs

SCHEMA = """
-- No scalar here: the pair key is derived from the node's master key file over
-- (peer, epoch, rekey). `created_at`: when the current key came into use.
CREATE TABLE IF NOT EXISTS pair_keys (
    peer       TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    rekey      INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    PRIMARY KEY (peer, epoch)
);
CREATE TABLE IF NOT EXISTS own_tags (
    peer   TEXT NOT NULL,
    epoch  INTEGER NOT NULL,
    nid    TEXT NOT NULL,
    labels TEXT NOT NULL,
    tag    BLOB NOT NULL,
    PRIMARY KEY (peer, epoch, nid)
);
CREATE INDEX IF NOT EXISTS own_tags_tag ON own_tags(peer, epoch, tag);
CREATE TABLE IF NOT EXISTS peer_tags (
    peer   TEXT NOT NULL,
    epoch  INTEGER NOT NULL,
    tag    BLOB NOT NULL,
    labels TEXT NOT NULL,
    PRIMARY KEY (peer, epoch, tag)
);
CREATE TABLE IF NOT EXISTS pair_sync (
    peer     TEXT NOT NULL,
    epoch    INTEGER NOT NULL,
    -- The registry version this node's own tags for the peer reflect.
    version  INTEGER NOT NULL,
    -- Fingerprints of the own and peer tag sets, kept up to date with each delta.
    own_fp   BLOB NOT NULL,
    peer_fp  BLOB NOT NULL,
    -- The policy (for this peer) the own tags were chosen under; a change forces a full run.
    policy   TEXT NOT NULL,
    -- The session whose commit made this state: its match rows are the pair's
    -- current result, which the next incremental run carries over in part.
    session_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (peer, epoch)
);
-- Base entries (in pair_runs) that later changes replaced or removed.
CREATE TABLE IF NOT EXISTS own_gone (
    peer  TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    nid   TEXT NOT NULL,
    PRIMARY KEY (peer, epoch, nid)
);
CREATE TABLE IF NOT EXISTS peer_gone (
    peer  TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    tag   BLOB NOT NULL,
    PRIMARY KEY (peer, epoch, tag)
);
"""
SCHEMA += runs.SCHEMA
STATE_TABLES = (
    "pair_keys",
    "own_tags",
    "peer_tags",
    "pair_sync",
    "own_gone",
    "peer_gone",
    "pair_runs",
    "pair_labelsets",
    "pair_gen",
)
