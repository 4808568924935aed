"""What one side sends in a session: its distinct IDs, grouped by label set, shuffled.

An ID held under several labels goes once, in the group of its label set, so
the peer learns group sizes and nothing about record order. `owners` maps each
ID back to every record that holds it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from ispf.errors import InvalidRecord, PolicyRefused, ProtocolViolation
from ispf.nid import NID_BYTES, PackedNids
from ispf.records import Label, check_label
from ispf.v1 import common_pb2
from ispf_server.policy import PeerPolicy
from ispf_server.records import SpooledNids, shuffle, shuffle_records
from ispf_server.storage import Store
from ispf_server.storage.registry import StoredRecord

LabelSet = tuple[Label, ...]
MAX_GROUPS = 10_000
T = TypeVar("T")


def secure_shuffle(items: list[T], rng: random.Random | None = None) -> None:
    """Shuffle in place. Without `rng` (as in sessions) the randomness is from the OS:
    in C (keyed BLAKE3 under a fresh seed) when the native module is built, else
    `secrets.SystemRandom`. A seeded `rng` is for tests only."""
    if rng is not None:
        rng.shuffle(items)
    else:
        shuffle(items)


def shuffle_packed(
    buf: bytearray, rng: random.Random | None = None, *, width: int = NID_BYTES
) -> None:
    """`secure_shuffle` on packed records of `width` bytes (IDs unless told), in place:
    in C, without a Python object per record, where the native module is built."""
    if rng is None:
        shuffle_records(buf, width)
        return
    items = [bytes(buf[i : i + width]) for i in range(0, len(buf), width)]
    secure_shuffle(items, rng)
    buf[:] = b"".join(items)


# The records a result row may name, for some IDs (13 bytes each): read when matched.
OwnerLookup = Callable[[list[bytes]], Mapping[bytes, list[StoredRecord]]]


@dataclass
class Plan:
    groups: list[LabelSet]
    sizes: list[int]
    # Distinct canonical IDs in send order, group after group, packed (on disk: a
    # full run's, `sync.spooled_plan`).
    order: PackedNids | SpooledNids
    own_records: int
    # A labelled one-off session's result rows name the matched IDs' records, looked
    # up once matched (None: a sync session, whose rows come from its pair state).
    owners: OwnerLookup | None = None

    @property
    def total(self) -> int:
        return len(self.order)

    def chunks(self, size: int) -> Iterator[PackedNids]:
        """The IDs in send order, `size` at a time (read from disk where spooled)."""
        for at in range(0, self.total, size):
            yield self.order[at : at + size]

    def close(self) -> None:
        """Drop a spooled order's file (the session is over)."""
        if isinstance(self.order, SpooledNids):
            self.order.close()

    def to_proto(self) -> list[common_pb2.LabelGroup]:
        return [
            common_pb2.LabelGroup(
                labels=[common_pb2.Label(programme=lb.programme, status=lb.status) for lb in g],
                size=n,
            )
            for g, n in zip(self.groups, self.sizes, strict=True)
        ]


def build_plan(
    records: list[StoredRecord],
    rng: random.Random | None = None,
    *,
    labelled: bool,
    owners_of: OwnerLookup | None = None,
) -> Plan:
    """The plan from record objects: `sync.one_off_plan`'s fallback, where the native
    module is not built or its packed pass cannot take the IDs."""
    owners: dict[bytes, list[StoredRecord]] = defaultdict(list)
    for r in records:
        owners[r.nid.encode("ascii")].append(r)
    by_group: dict[LabelSet, bytearray] = defaultdict(bytearray)
    for nid, recs in owners.items():
        if not labelled:
            key: LabelSet = ()
        elif len(recs) == 1:  # the common case: one record per ID
            key = (recs[0].label,)
        else:
            key = tuple(sorted({r.label for r in recs}))
        by_group[key] += nid
    return shuffled_plan(by_group, rng, own_records=len(records), owners=owners_of)


def shuffled_plan(
    by_group: Mapping[LabelSet, bytearray],
    rng: random.Random | None = None,
    *,
    own_records: int,
    owners: OwnerLookup | None = None,
) -> Plan:
    """Groups in label-set order, each shuffled, so positions say nothing of records.

    `by_group` holds each group's IDs packed (13 bytes each); they are shuffled in
    place and then copied into the send order one group at a time."""
    groups = sorted(by_group)
    order = bytearray()
    sizes: list[int] = []
    for g in groups:
        members = by_group[g]
        if len(members) % NID_BYTES:
            raise ValueError(f"label group holds IDs that are not {NID_BYTES} digits")
        shuffle_packed(members, rng)
        order += members
        sizes.append(len(members) // NID_BYTES)
    return Plan(groups, sizes, PackedNids(order), own_records, owners)


def check_collections(pp: PeerPolicy, collections: frozenset[str]) -> None:
    """Collections asked for must be open to the peer (PolicyRefused otherwise)."""
    if collections and pp.collections and not collections <= pp.collections:
        refused = ", ".join(sorted(collections - pp.collections))
        raise PolicyRefused(f"collections not open to {pp.peer} by policy: {refused}")


def eligible_records(
    store: Store, pp: PeerPolicy, collections: frozenset[str], *, labelled: bool
) -> list[StoredRecord]:
    """Own records that may take part in a session with a peer, under its policy.

    Collections asked for must be open to the peer; records whose label the peer
    may not learn stay out of labelled sessions altogether.
    """
    check_collections(pp, collections)
    records = store.registry.records(collections or pp.collections)
    if labelled:
        # Decide each distinct label once (registries: millions of records, few labels).
        allowed = {lb for lb in {r.label for r in records} if pp.may_disclose(lb)}
        records = [r for r in records if r.label in allowed]
    return records


def eligible(pp: PeerPolicy, record: StoredRecord) -> bool:
    """May this record take part in a labelled session with the peer, under its policy?"""
    return pp.in_collections(record.label.programme) and pp.may_disclose(record.label)


def parse_groups(
    groups: list[common_pb2.LabelGroup], *, labelled: bool, max_total: int
) -> tuple[list[LabelSet], list[int]]:
    """Validate a peer's announced groups; raise ProtocolViolation with the reason."""
    if len(groups) > MAX_GROUPS:
        raise ProtocolViolation(f"{len(groups)} label groups announced, at most {MAX_GROUPS}")
    out: list[LabelSet] = []
    sizes: list[int] = []
    for i, g in enumerate(groups):
        if labelled and not g.labels:
            raise ProtocolViolation(f"label group {i} has no labels in a labelled session")
        if not labelled and g.labels:
            raise ProtocolViolation(f"label group {i} carries labels in a count-only session")
        try:
            labels = tuple(sorted({check_label(lb.programme, lb.status) for lb in g.labels}))
        except InvalidRecord as exc:
            raise ProtocolViolation(f"label group {i}: {exc.message}") from exc
        out.append(labels)
        sizes.append(g.size)
    if sum(sizes) > max_total:
        raise ProtocolViolation(f"{sum(sizes)} values announced, at most {max_total}")
    return out, sizes
