"""A plain model of one pair's state, random incremental changes to it, and the check
that the store answers every lookup as the model does: for the pair-state tests."""

from __future__ import annotations

import os
import random
from typing import Any

from ispf_server.storage.pairs import lookups
from ispf_server.storage.pairs.state import EMPTY_FP, OwnGroup, OwnTag, PairDelta, PeerGroup

Conn = Any  # a sqlite3 connection, or the PostgreSQL backend's (both take `?` statements)
LABELS = ['["P/a"]', '["P/b"]', '["P/a","Q/c"]']


def delta(**kw: object) -> PairDelta:
    base: dict[str, object] = {
        "reset": False,
        "own_added": [],
        "own_removed": [],
        "peer_added": [],
        "peer_removed": [],
        "version": 1,
        "own_fp": EMPTY_FP,
        "peer_fp": EMPTY_FP,
        "policy": "p",
    }
    base.update(kw)
    return PairDelta(**base)  # type: ignore[arg-type]


def own_groups(own: dict[str, OwnTag]) -> list[OwnGroup]:
    by: dict[str, OwnGroup] = {}
    for nid, o in own.items():
        by.setdefault(o.labels, OwnGroup(o.labels, [], [])).nids.append(nid)
        by[o.labels].tags.append(o.tag)
    return list(by.values())


def peer_groups(peer: dict[bytes, str]) -> list[PeerGroup]:
    by: dict[str, PeerGroup] = {}
    for tag, labels in peer.items():
        by.setdefault(labels, PeerGroup(labels, [])).tags.append(tag)
    return list(by.values())


class Model:
    """The pair state as plain dicts: what the store must answer after any deltas."""

    def __init__(self) -> None:
        self.own: dict[str, OwnTag] = {}
        self.peer: dict[bytes, str] = {}

    def matches(self) -> dict[str, tuple[bytes, str]]:
        return {n: (o.tag, self.peer[o.tag]) for n, o in self.own.items() if o.tag in self.peer}


def check_against(conn: Conn, model: Model, probe_nids: list[str]) -> None:
    own = lookups.own_by_nids(conn, "sindh", 1, probe_nids)
    assert own == {n: model.own[n] for n in probe_nids if n in model.own}
    all_own_tags = [o.tag for o in model.own.values()] + [os.urandom(16)]
    by_tag = lookups.own_by_tags(conn, "sindh", 1, all_own_tags)
    assert by_tag == {o.tag: (n, o.labels) for n, o in model.own.items()}
    peer_tags = [*model.peer, os.urandom(16)]
    assert lookups.peer_by_tags(conn, "sindh", 1, peer_tags) == model.peer
    got = {n: (t, lb) for n, t, lb in lookups.matched_state(conn, "sindh", 1)}
    assert len(got) == len(lookups.matched_state(conn, "sindh", 1))  # no ID twice
    assert got == model.matches()


def random_step(
    rng: random.Random,
    model: Model,
    nids: list[str],
    tag_of: dict[str, bytes],
    own_changes: int = 200,
    peer_changes: int = 150,
) -> PairDelta:
    """An incremental run's delta, applied to the model too: own IDs added, relabelled
    and removed, and the peer's tags the same."""
    labels = LABELS
    own_added: dict[str, OwnTag] = {}
    own_removed: list[str] = []
    for n in rng.sample(nids, own_changes):
        if n in model.own and rng.random() < 0.4:
            own_removed.append(n)
            del model.own[n]
        else:
            if n in model.own:
                own_removed.append(n)  # a relabel removes and adds
            model.own[n] = own_added[n] = OwnTag(rng.choice(labels), tag_of[n])
    peer_added: dict[bytes, str] = {}
    peer_removed: list[bytes] = []
    for n in rng.sample(nids, peer_changes):
        t = tag_of[n]
        if t in model.peer and rng.random() < 0.5:
            peer_removed.append(t)
            del model.peer[t]
        else:
            if t in model.peer:
                peer_removed.append(t)
            model.peer[t] = peer_added[t] = rng.choice(labels)
    return delta(
        own_added=own_groups(own_added),
        own_removed=own_removed,
        peer_added=peer_groups(peer_added),
        peer_removed=peer_removed,
    )
