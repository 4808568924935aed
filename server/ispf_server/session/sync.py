"""Sync sessions: the mutual protocol over a pair's fixed keys and kept tag state.

Each side sends only the IDs added (or relabelled) since the pair last synced
and the tags of those it removed; matches are then computed over the whole
state, so an incremental run gives exactly what a full run would. A full run
is the same with empty state: everything is added, and the state replaced.
"""

from __future__ import annotations

import json
import secrets
from collections import defaultdict
from dataclasses import dataclass

from ispf.blinding import TAG_BYTES, result_digest
from ispf.errors import ProtocolViolation
from ispf.keys import BlindingKey
from ispf_server.pairstate import (
    OwnTag,
    PairDelta,
    fingerprint,
    labels_of,
    labels_text,
)
from ispf_server.session.core import Outcome, split
from ispf_server.session.plan import LabelSet, Plan, build_plan
from ispf_server.store import MatchRow, Store, StoredRecord

MAX_REMOVED = 1_000_000


@dataclass
class SyncSide:
    peer: str
    epoch: int
    key: BlindingKey
    incremental: bool
    current: dict[str, OwnTag]
    peer_current: dict[bytes, str]
    desired: dict[str, str]
    records: list[StoredRecord]
    plan: Plan
    removed_nids: list[str]
    removed_tags: list[bytes]
    version: int

    @property
    def own_fp(self) -> bytes:
        return fingerprint(o.tag for o in self.current.values())

    @property
    def peer_fp(self) -> bytes:
        return fingerprint(self.peer_current)


def state_fingerprints(store: Store, peer: str, epoch: int) -> tuple[bytes, bytes] | None:
    """(own set, peer set) fingerprints of the pair's state, or None if none is held."""
    if store.pair_version(peer, epoch) is None:
        return None
    own = fingerprint(o.tag for o in store.own_tags(peer, epoch).values())
    return own, fingerprint(store.peer_tags(peer, epoch))


def prepare(
    store: Store, peer: str, epoch: int, records: list[StoredRecord], *, incremental: bool
) -> SyncSide:
    """What this side sends: IDs whose label set is new or changed, and removed tags."""
    version = store.registry_version()
    by_nid: dict[str, set[str]] = defaultdict(set)
    for r in records:
        by_nid[r.nid].add(f"{r.label.programme}/{r.label.status}")
    desired = {nid: json.dumps(sorted(lbs)) for nid, lbs in by_nid.items()}
    current = store.own_tags(peer, epoch) if incremental else {}
    peer_current = store.peer_tags(peer, epoch) if incremental else {}
    changed = {n for n, lb in desired.items() if n not in current or current[n].labels != lb}
    removed_nids = [n for n, o in current.items() if n not in desired or n in changed]
    removed_tags = [current[n].tag for n in removed_nids]
    plan = build_plan(
        [r for r in records if r.nid in changed], secrets.SystemRandom(), labelled=True
    )
    return SyncSide(
        peer=peer,
        epoch=epoch,
        key=store.pair_key(peer, epoch),
        incremental=incremental,
        current=current,
        peer_current=peer_current,
        desired=desired,
        records=records,
        plan=plan,
        removed_nids=removed_nids,
        removed_tags=removed_tags,
        version=version,
    )


def parse_removed(packed: bytes, known: dict[bytes, str], who: str) -> list[bytes]:
    """The peer's removed tags: each must be one we hold for it."""
    if len(packed) % TAG_BYTES:
        raise ProtocolViolation(f"removed tags of {who} are not whole 16-byte tags")
    tags = split(packed, TAG_BYTES)
    if len(tags) > MAX_REMOVED:
        raise ProtocolViolation(f"{len(tags)} removed tags, at most {MAX_REMOVED}")
    unknown = sum(1 for t in tags if t not in known)
    if unknown:
        raise ProtocolViolation(f"{who} removed {unknown} tags this node never held")
    return tags


@dataclass(frozen=True)
class SyncResult:
    outcome: Outcome
    delta: PairDelta
    state_after: bytes  # own fingerprint || peer fingerprint, from this side's view


def finish(
    side: SyncSide,
    own_added_tags: bytes,
    peer_groups: list[LabelSet],
    peer_sizes: list[int],
    peer_added_tags: bytes,
    peer_removed: list[bytes],
) -> SyncResult:
    """Apply both deltas (in memory) and intersect the whole state."""
    own_added = {
        nid.decode("ascii"): OwnTag(side.desired[nid.decode("ascii")], tag)
        for nid, tag in zip(side.plan.order, split(own_added_tags, TAG_BYTES), strict=True)
    }
    own_after = {n: o for n, o in side.current.items() if n not in set(side.removed_nids)}
    own_after.update(own_added)
    peer_added: dict[bytes, str] = {}
    tags = split(peer_added_tags, TAG_BYTES)
    pos = 0
    for labels, size in zip(peer_groups, peer_sizes, strict=True):
        text = labels_text(labels)
        for t in tags[pos : pos + size]:
            peer_added[t] = text
        pos += size
    gone = set(peer_removed)
    peer_after = {t: lb for t, lb in side.peer_current.items() if t not in gone}
    peer_after.update(peer_added)
    by_nid: dict[str, list[StoredRecord]] = defaultdict(list)
    for r in side.records:
        by_nid[r.nid].append(r)
    matched: list[bytes] = []
    rows: list[MatchRow] = []
    for nid, own in own_after.items():
        peer_labels = peer_after.get(own.tag)
        if peer_labels is None:
            continue
        matched.append(own.tag)
        for rec in by_nid[nid]:
            rows.extend(
                MatchRow(rec.record_id, rec.label, pl, own.tag) for pl in labels_of(peer_labels)
            )
    delta = PairDelta(
        reset=not side.incremental,
        own_added=own_added,
        own_removed=side.removed_nids,
        peer_added=peer_added,
        peer_removed=peer_removed,
        version=side.version,
    )
    state = fingerprint(o.tag for o in own_after.values()) + fingerprint(peer_after)
    return SyncResult(Outcome(len(matched), result_digest(matched), rows), delta, state)
