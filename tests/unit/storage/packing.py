"""A full run's sorted runs built in memory from record-level state, for the storage
tests: the same records a session's full run stages as it merges
(`session.match.kept`), here in one piece, so the tests can write any state."""

from __future__ import annotations

import sqlite3

from ispf_server.records import sort_inplace, zip_records
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.runs import MATCHED, OWN_NID, OWN_TAG, PEER_TAG
from ispf_server.storage.pairs.state import OwnGroup, PeerGroup, RunBuilder

NID, TAG = 13, 16


def _canonical(nids: list[str]) -> bool:
    joined = "".join(nids)
    return joined.isascii() and joined.isdigit() and all(len(n) == NID for n in nids)


def pack_runs(
    own_added: list[OwnGroup],
    peer_added: list[PeerGroup],
    matched: dict[str, tuple[bytes, str]],
) -> tuple[dict[str, int], dict[str, bytes]] | None:
    """(label set text -> number, run kind -> sorted records) for this state; None
    where IDs or tags are not canonical (13 digits, 16 bytes)."""
    tags = [t for g in own_added for t in g.tags] + [t for g in peer_added for t in g.tags]
    if not all(_canonical(g.nids) for g in own_added) or any(len(t) != TAG for t in tags):
        return None
    b = RunBuilder()

    def run(records: list[bytes], width: int) -> bytes:
        out = bytearray(b"".join(records))
        sort_inplace(out, width)
        return bytes(out)

    def own(by_tag: bool) -> bytes:
        recs = []
        for g in own_added:
            n, lsid = len(g.nids), b.lsid(g.labels)
            nids, ts = "".join(g.nids).encode("ascii"), b"".join(g.tags)
            cols = ((ts, TAG), (nids, NID)) if by_tag else ((nids, NID), (ts, TAG))
            recs.append(zip_records(n, *cols, (lsid, pairruns.LSID)))
        return run(recs, OWN_TAG.width)

    own_tag = own(by_tag=True)
    peer_tag = run(
        [
            zip_records(len(g.tags), (b"".join(g.tags), TAG), (b.lsid(g.labels), pairruns.LSID))
            for g in peer_added
        ],
        PEER_TAG.width,
    )
    matched_run = run(
        [n.encode("ascii") + t + b.lsid(lbl) for n, (t, lbl) in matched.items()], MATCHED.width
    )
    runs = {
        OWN_NID.name: own(by_tag=False),
        OWN_TAG.name: own_tag,
        PEER_TAG.name: peer_tag,
        MATCHED.name: matched_run,
    }
    return b.texts, runs


def staged(
    conn: sqlite3.Connection,
    peer: str,
    epoch: int,
    own_added: list[OwnGroup],
    peer_added: list[PeerGroup],
    matched: dict[str, tuple[bytes, str]],
) -> pairruns.Staged:
    """The state's runs written as a staged generation (what a full run's delta names
    in `staged`)."""
    packed = pack_runs(own_added, peer_added, matched)
    assert packed is not None, "IDs must be 13 digits and tags 16 bytes to pack"
    return pairruns.stage(conn.cursor(), peer, epoch, *packed)
