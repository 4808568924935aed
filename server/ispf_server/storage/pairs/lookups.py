"""Reading a pair's state: rows first, then the runs' entries not tombstoned."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from ispf_server.storage.db import IN_BATCH, Connection
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.runs import (
    MATCHED,
    NID_LED_LSID,
    NID_LED_NID,
    NID_LED_TAG,
    OWN_NID,
    OWN_TAG,
    PEER_LSID,
    PEER_TAG,
    TAG_LED_LSID,
    TAG_LED_NID,
)
from ispf_server.storage.pairs.state import NID_BYTES, OwnTag

K = TypeVar("K")


def _gone(
    db: Connection, table: str, column: str, peer: str, epoch: int, keys: list[Any]
) -> set[Any]:
    found: set[Any] = set()
    for at in range(0, len(keys), IN_BATCH):
        part = keys[at : at + IN_BATCH]
        found.update(
            r[0]
            for r in db.execute(
                f"SELECT {column} FROM {table} WHERE peer=? AND epoch=? "  # noqa: S608
                f"AND {column} IN ({','.join('?' * len(part))})",
                (peer, epoch, *part),
            )
        )
    return found


def _rows(
    db: Connection, table: str, key: str, columns: str, peer: str, epoch: int, keys: Iterable[K]
) -> dict[K, tuple[Any, ...]]:
    """key -> `columns` of the pair's rows in `table` holding these keys, a batch of
    keys per query (`IN`, on the table's index)."""
    out: dict[K, tuple[Any, ...]] = {}
    wanted = list(dict.fromkeys(keys))
    for at in range(0, len(wanted), IN_BATCH):
        part = wanted[at : at + IN_BATCH]
        given: dict[object, K] = {_plain(k): k for k in part}
        for row in db.execute(
            f"SELECT {key}, {columns} FROM {table} WHERE peer=? AND epoch=? "  # noqa: S608
            f"AND {key} IN ({','.join('?' * len(part))})",
            (peer, epoch, *part),
        ):
            found = given.get(_plain(row[0]))
            if found is not None:
                out[found] = tuple(row[1:])
    return out


def _plain(value: object) -> object:
    """A key as compared: a blob column's value (bytes or a view of them) as bytes."""
    return bytes(value) if isinstance(value, bytearray | memoryview) else value


def own_by_nids(db: Connection, peer: str, epoch: int, nids: Iterable[str]) -> dict[str, OwnTag]:
    wanted = list(nids)
    rows = _rows(db, "own_tags", "nid", "labels, tag", peer, epoch, wanted)
    out = {n: OwnTag(str(r[0]), bytes(r[1])) for n, r in rows.items()}
    rest = [n for n in wanted if n not in out and len(n) == NID_BYTES and n.isascii()]
    # The runs, then (only for what they hold) tombstones and label sets: a lookup
    # that finds nothing, like most online checks, costs two indexed reads.
    found = pairruns.lookup(db, peer, epoch, OWN_NID, [n.encode("ascii") for n in rest])
    if found:
        gone = _gone(db, "own_gone", "nid", peer, epoch, [k.decode("ascii") for k in found])
        ls = pairruns.labelsets(db, peer, epoch)
        for key, rec in found.items():
            if key.decode("ascii") not in gone:
                out[key.decode("ascii")] = OwnTag(ls[rec[NID_LED_LSID]], rec[NID_LED_TAG])
    return out


def own_by_tags(
    db: Connection, peer: str, epoch: int, tags: Iterable[bytes]
) -> dict[bytes, tuple[str, str]]:
    """tag -> (nid, labels) of this node's IDs holding these tags for the peer."""
    wanted = list(tags)
    rows = _rows(db, "own_tags", "tag", "nid, labels", peer, epoch, wanted)
    out = {t: (str(r[0]), str(r[1])) for t, r in rows.items()}
    rest = [t for t in wanted if t not in out]
    found = pairruns.lookup(db, peer, epoch, OWN_TAG, rest)
    if found:
        nids = {t: rec[TAG_LED_NID].decode("ascii") for t, rec in found.items()}
        gone = _gone(db, "own_gone", "nid", peer, epoch, sorted(set(nids.values())))
        ls = pairruns.labelsets(db, peer, epoch)
        for t, rec in found.items():
            if nids[t] not in gone:
                out[t] = (nids[t], ls[rec[TAG_LED_LSID]])
    return out


def peer_by_tags(db: Connection, peer: str, epoch: int, tags: Iterable[bytes]) -> dict[bytes, str]:
    """tag -> the peer's labels, for the peer tags held among these."""
    wanted = list(tags)
    rows = _rows(db, "peer_tags", "tag", "labels", peer, epoch, wanted)
    out = {t: str(r[0]) for t, r in rows.items()}
    rest = [t for t in wanted if t not in out]
    found = pairruns.lookup(db, peer, epoch, PEER_TAG, rest)
    if found:
        gone = _gone(db, "peer_gone", "tag", peer, epoch, list(found))
        ls = pairruns.labelsets(db, peer, epoch)
        for t, rec in found.items():
            if t not in gone:
                out[t] = ls[rec[PEER_LSID]]
    return out


def matched_state(db: Connection, peer: str, epoch: int) -> list[tuple[str, bytes, str]]:
    """(nid, tag, peer labels) of own IDs whose tag the peer also holds: the matches."""
    out: list[tuple[str, bytes, str]] = []
    pair = (peer, epoch)
    if pairruns.held(db, peer, epoch):
        own_gone = {
            str(r[0]) for r in db.execute("SELECT nid FROM own_gone WHERE peer=? AND epoch=?", pair)
        }
        peer_gone = {
            bytes(r[0])
            for r in db.execute("SELECT tag FROM peer_gone WHERE peer=? AND epoch=?", pair)
        }
        ls = pairruns.labelsets(db, peer, epoch)
        for rec in pairruns.scan(db, peer, epoch, MATCHED):
            nid, tag = rec[NID_LED_NID].decode("ascii"), rec[NID_LED_TAG]
            if nid not in own_gone and tag not in peer_gone:
                out.append((nid, tag, ls[rec[NID_LED_LSID]]))
    out.extend(overlay_matches(db, peer, epoch))
    return out


def overlay_matches(db: Connection, peer: str, epoch: int) -> list[tuple[str, bytes, str]]:
    """The matches the rows make (`matched_state` less the matched run's entries
    not tombstoned): own rows against the peer's current tags, and the peer's rows
    against own IDs as the runs hold them. (What a compaction adds to the run.)"""
    pair = (peer, epoch)
    own_rows = [
        (str(n), bytes(t))
        for n, t in db.execute("SELECT nid, tag FROM own_tags WHERE peer=? AND epoch=?", pair)
    ]
    theirs = peer_by_tags(db, peer, epoch, [t for _, t in own_rows])
    out = [(n, t, theirs[t]) for n, t in own_rows if t in theirs]
    if pairruns.held(db, peer, epoch):
        peer_rows = {
            bytes(t): str(lb)
            for t, lb in db.execute(
                "SELECT tag, labels FROM peer_tags WHERE peer=? AND epoch=?", pair
            )
        }
        found = pairruns.lookup(db, peer, epoch, OWN_TAG, peer_rows)
        nids = {t: rec[TAG_LED_NID].decode("ascii") for t, rec in found.items()}
        gone = _gone(db, "own_gone", "nid", peer, epoch, sorted(set(nids.values())))
        out.extend((n, t, peer_rows[t]) for t, n in nids.items() if n not in gone)
    return out
