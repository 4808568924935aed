"""What one side sends in a session: its distinct IDs, grouped by label set, shuffled;
every planner is here.

An ID held under several labels goes once, in the group of its label set, so
the peer learns group sizes and nothing about record order. A full run or a
one-off session (`one_off_plan`) sends everything the policy and the
collections asked for allow: planned from SQLite's coded strings, shuffled by
an external sort and kept on disk (`spooled_plan`), with the record operations
of `ispf_server.records` (in C where the module is built, else in Python). An
incremental run's side (`prepare`) sends only what changed since the pair's
kept state, where both sides hold the same (`state_fingerprints`): few IDs,
grouped in memory (`shuffled_plan`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

from ispf.errors import InvalidRecord, NotPacked, PolicyRefused, ProtocolViolation
from ispf.keys import BlindingKey
from ispf.nid import NID_BYTES, PackedNids
from ispf.records import Label, check_label
from ispf.v1 import common_pb2
from ispf_server.policy import PeerPolicy
from ispf_server.records import (
    SHUFFLE_KEY,
    ExternalSort,
    SpooledNids,
    TagSpool,
    select_fields,
    shuffle,
    shuffle_records,
    sort_inplace,
    split_unique,
    upper_bound,
    zip_records,
)
from ispf_server.session.facts import SyncKind
from ispf_server.storage import Store
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.runs import NID
from ispf_server.storage.pairs.state import EMPTY_FP, labels_of, labels_text
from ispf_server.storage.registry import StoredRecord, code_bytes, code_value

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
    # full run's, `spooled_plan`).
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

    def wire_groups(self, labelled: bool) -> list[common_pb2.LabelGroup]:
        """The groups as the handshake announces them: by label set where labelled, else
        one group of the set's size (a count-only session shows no label)."""
        return self.to_proto() if labelled else [common_pb2.LabelGroup(size=self.total)]

    def to_proto(self) -> list[common_pb2.LabelGroup]:
        return [
            common_pb2.LabelGroup(
                labels=[common_pb2.Label(programme=lb.programme, status=lb.status) for lb in g],
                size=n,
            )
            for g, n in zip(self.groups, self.sizes, strict=True)
        ]


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


# -- sessions with pair state: the sync planner ---------------------------------


def policy_key(pp: PeerPolicy) -> str:
    """What of a peer's policy decides which own IDs and labels it may hold."""
    doc = {"collections": sorted(pp.collections), "disclose": list(pp.disclose)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def state_fingerprints(
    store: Store, peer: str, epoch: int, pp: PeerPolicy
) -> tuple[bytes, bytes] | None:
    """(own set, peer set) fingerprints, or None if no usable state is held.

    State kept under another policy is not usable: which IDs and labels the peer
    may hold changed, so the next run must be full. Nor is state under a pair key
    past the policy's `rekey_after_days`: the key is renewed here and that state
    dropped, so both sides, asking this before a run, agree the run is full.
    """
    if store.pairs.rekey_if_due(peer, epoch, pp.rekey_after_days):
        return None
    row = store.pairs.sync_row(peer, epoch)
    if row is None or row.policy != policy_key(pp):
        return None
    return row.own_fp, row.peer_fp


@dataclass
class SyncSide:
    store: Store
    pp: PeerPolicy
    peer: str
    epoch: int
    key: BlindingKey
    kind: SyncKind  # full or incremental, decided here once
    own_fp: bytes
    peer_fp: bytes
    own_records: int  # records that take part in this run's delta
    plan: Plan  # the IDs sent, by label set (plan.owners is not kept: see finish)
    removed_nids: list[str] = field(repr=False)
    removed_tags: list[bytes]
    version: int
    state_version: int  # the pair's state this was planned against (-1: none)
    # An incremental run's: every own ID whose records changed since the pair's state,
    # whether or not its label set did (their result rows are made again), and the
    # session whose rows are the pair's current result ("": none known).
    touched_nids: list[str] = field(default_factory=list, repr=False)
    base_session: str = ""

    @property
    def removed_wire(self) -> bytes:
        """The tags of this side's removals, as the handshake carries them."""
        return b"".join(self.removed_tags)


class _SetTexts(dict[frozenset[Label], str]):
    """Each distinct label set's text as stored (JSON), encoded once, when first asked."""

    def __missing__(self, key: frozenset[Label]) -> str:
        text = self[key] = labels_text(key)
        return text


def _label_sets(records: Iterable[StoredRecord]) -> dict[str, str]:
    """nid -> its label set as stored (JSON), each distinct set encoded once."""
    by_nid: dict[str, set[Label]] = defaultdict(set)
    for r in records:
        by_nid[r.nid].add(r.label)
    texts = _SetTexts()
    return {nid: texts[frozenset(lbs)] for nid, lbs in by_nid.items()}


def _allowed_labels(store: Store, pp: PeerPolicy, *, labelled: bool = True) -> list[Label]:
    """The labels whose records take part, for the coded pass: in the peer's
    collections and, where labelled, ones it may learn."""
    return [
        lb
        for lb in store.registry.distinct_labels()
        if (pp.may_learn(lb) if labelled else pp.in_collections(lb.programme))
    ]


UNLABELLED = labels_text(())  # a count-only session's one group
_ANY = Label("*", "*")  # (stands for every label where unlabelled)


def _coded_label_sets(
    store: Store, allowed: list[Label], *, labelled: bool = True
) -> Iterator[tuple[str, bytes, int]]:
    """(label set as stored, IDs holding exactly it packed, records they hold), batch
    by batch over the registry, for the IDs with a label in `allowed` (SQLite's
    coded strings, sorted and split in C: only IDs with several records are looked
    at in Python). Unlabelled: every such ID once, in the one group. Raises
    NotPacked where the IDs are not all 13 digits."""
    if not allowed:
        return
    cb = code_bytes(len(allowed))
    coded = NID + cb  # an ID and its label's code
    single = [labels_text((lb,)) if labelled else UNLABELLED for lb in allowed]
    texts = _SetTexts() if labelled else _SetTexts({frozenset({_ANY}): UNLABELLED})
    for once, repeated in _coded_batches(store, allowed):
        for raw, nids in once.items():
            code = code_value(raw, cb)
            if code >= 2:  # (1: a label the peer may not hold)
                yield single[code - 2], nids, len(nids) // NID
        by_text: dict[str, bytearray] = defaultdict(bytearray)
        held: set[Label] = set()
        prev = b""
        count = 0
        for at in range(0, len(repeated), coded):
            nid = repeated[at : at + NID]
            code = code_value(int.from_bytes(repeated[at + NID : at + coded], "big"), cb)
            if nid != prev:
                _add_set(by_text, texts, prev, held)
                prev, held = nid, set()
            if code >= 2:
                held.add(allowed[code - 2] if labelled else _ANY)
                count += 1
        _add_set(by_text, texts, prev, held)
        for text, members in by_text.items():  # (records counted once, with the first set)
            yield text, bytes(members), count
            count = 0


# A full run's plan is shuffled by sorting: label set's number (as met) | 12 random
# bytes | ID. Equal random keys (about n^2 / 2^97 likely) would order by ID.
SHUFFLE = pairruns.Kind("shuffle", 4 + SHUFFLE_KEY + NID, 4)


def spooled_plan(
    store: Store, pp: PeerPolicy, *, labelled: bool = True, owners: OwnerLookup | None = None
) -> Plan:
    """A session's plan, as `shuffled_plan` makes it (groups in label-set order, each
    shuffled with the OS's randomness), within a fixed memory budget: every ID
    goes with its group's number and a random key to an `ExternalSort`, whose
    output is each group shuffled; the groups are then laid out in label-set
    order in a file (`SpooledNids`). Unlabelled (count-only): one group of every
    ID in the peer's collections. NotPacked where an ID is not 13 digits. The record
    operations run in C where the module is built, else in Python (`records`)."""
    allowed = _allowed_labels(store, pp, labelled=labelled)
    w, directory = SHUFFLE.width, store.directory
    numbers: dict[str, int] = {}
    count = 0
    with ExternalSort(w, directory) as sorter:
        for text, nids, records in _coded_label_sets(store, allowed, labelled=labelled):
            n = len(nids) // NID
            number = numbers.setdefault(text, len(numbers)).to_bytes(4, "big")
            keys = os.urandom(SHUFFLE_KEY * n)
            sorter.add(zip_records(n, (number, 4), (keys, SHUFFLE_KEY), (nids, NID)))
            count += records
        # Each group's shuffled IDs, in the order the groups were met.
        met = TagSpool(directory, NID)
        where: dict[bytes, tuple[int, int]] = {}
        for chunk in sorter.sorted_chunks():
            view = memoryview(chunk)
            while view:
                key = bytes(view[:4])
                cut = w * upper_bound(view, w, 4, key)
                first = where.get(key, (met.count, 0))[0]
                met.append(select_fields(view[:cut], w, ((4 + SHUFFLE_KEY, NID),)))
                where[key] = (first, met.count)
                view = view[cut:]
    groups = sorted((labels_of(text), where[n.to_bytes(4, "big")]) for text, n in numbers.items())
    with met:
        order = TagSpool(directory, NID)
        for _, (first, stop) in groups:
            for part in met.chunks(first, stop):
                order.append(part)
    sizes = [stop - first for _, (first, stop) in groups]
    return Plan([g for g, _ in groups], sizes, SpooledNids(order), count, owners)


def _coded_batches(store: Store, labels: list[Label]) -> Iterator[tuple[dict[int, bytes], bytes]]:
    """Every record as its ID and its label's code (`storage.registry.label_code`: of
    i + 2 for labels[i], of 1 for any other), in batches from SQLite, each sorted
    and split (`records`): (IDs held once, by their code's bytes; records of the
    IDs held several times, sorted). Raises NotPacked where an ID is not 13 digits
    (the strings then do not split into IDs: codes are never digits)."""
    cb = code_bytes(len(labels))
    coded = NID + cb
    for text in store.registry.nid_label_codes(labels):
        buf = bytearray(text.encode("latin-1"))
        del text
        if len(buf) % coded:
            raise NotPacked
        sort_inplace(buf, coded)
        once, repeated = split_unique(buf, coded, cb)
        del buf
        if not all(nids.isdigit() for nids in once.values()) or not (
            select_fields(repeated, coded, ((0, NID),)).isdigit() or not repeated
        ):
            raise NotPacked  # (misaligned)
        yield once, repeated


def _add_set(by_text: dict[str, bytearray], texts: _SetTexts, nid: bytes, held: set[Label]) -> None:
    if held:
        by_text[texts[frozenset(held)]] += nid


def prepare(store: Store, pp: PeerPolicy, peer: str, epoch: int, *, incremental: bool) -> SyncSide:
    """What this side sends: IDs whose label set is new or changed, and removed tags."""
    version = store.registry.version()
    # A pair key older than the policy allows is renewed, and the pair's state goes
    # with it: this run is full (the peer finds fingerprints that do not match).
    rekeyed = store.pairs.rekey_if_due(peer, epoch, pp.rekey_after_days)
    row = store.pairs.sync_row(peer, epoch) if incremental and not rekeyed else None
    plan: Plan | None = None
    if row is not None:
        nids = store.registry.changed_since(row.version)
        touched = sorted(nids)
        records = [
            r for rs in owners_of(store, pp, (n.encode() for n in nids)).values() for r in rs
        ]
        current = store.pairs.own_tags_for(peer, epoch, nids)
        desired = _label_sets(records)
        changed = {
            n for n in nids if desired.get(n) != (current[n].labels if n in current else None)
        }
        # Removed tags go on the wire sorted by tag value, never in ID order (which
        # would let the peer bracket them between IDs it knows).
        removed = sorted((current[n].tag, n) for n in changed if n in current)
        removed_tags = [t for t, _ in removed]
        removed_nids = [n for _, n in removed]
        by_text: dict[str, bytearray] = defaultdict(bytearray)
        for n in sorted(changed):
            if n in desired:
                by_text[desired[n]] += n.encode("ascii")
        own_fp, peer_fp, own_records = row.own_fp, row.peer_fp, len(records)
    else:
        plan = spooled_plan(store, pp)
        own_records = plan.own_records
        removed_nids, removed_tags, touched = [], [], []
        own_fp, peer_fp = EMPTY_FP, EMPTY_FP
    if plan is None:
        by_group = {labels_of(text): members for text, members in by_text.items()}
        plan = shuffled_plan(by_group, own_records=own_records)
    return SyncSide(
        store=store,
        pp=pp,
        peer=peer,
        epoch=epoch,
        key=store.pairs.key(peer, epoch),
        kind=SyncKind.INCREMENTAL if row is not None else SyncKind.FULL,
        own_fp=own_fp,
        peer_fp=peer_fp,
        own_records=own_records,
        plan=plan,
        removed_nids=removed_nids,
        removed_tags=removed_tags,
        version=version,
        state_version=row.version if row is not None else -1,
        touched_nids=touched,
        base_session=row.session_id if row is not None else "",
    )


# -- sessions without pair state ------------------------------------------------


def one_off_plan(
    store: Store, pp: PeerPolicy, collections: frozenset[str], *, labelled: bool
) -> Plan:
    """The plan of a session that keeps no pair state: count-only, or limited to some
    collections. As a full run's (`spooled_plan`): IDs packed from SQLite's coded
    strings, shuffled by an external sort and kept on disk. A labelled one groups
    them by label set under the policy narrowed to the collections asked for, and
    looks up the matched IDs' records when matched (`Plan.owners`)."""
    check_collections(pp, collections)
    narrowed = replace(pp, collections=collections) if collections else pp
    owners = partial(owners_of, store, narrowed) if labelled else None
    return spooled_plan(store, narrowed, labelled=labelled, owners=owners)


def owners_of(
    store: Store, pp: PeerPolicy, nids: Iterable[bytes]
) -> dict[bytes, list[StoredRecord]]:
    """The records of these IDs that a labelled session with the peer may name (the
    policy's `may_learn`): a result row each, read when matched. Every way of
    matching names its rows through this lookup (`match.rows.named_rows`)."""
    out: dict[bytes, list[StoredRecord]] = defaultdict(list)
    for r in store.registry.records_by_nids(n.decode("ascii") for n in nids):
        if pp.may_learn(r.label):
            out[r.nid.encode("ascii")].append(r)
    return out
