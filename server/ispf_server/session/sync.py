"""Sync sessions: the mutual protocol over a pair's fixed keys and kept tag state.

Each side sends only the IDs added (or relabelled) since the pair last synced
and the tags of those it removed; matches are the kept matches adjusted by both
deltas, so an incremental run gives exactly what a full run would, at a cost in
proportion to the changes (and the matches), not to the registry. A full run
is the same from empty state: everything is added, and the state replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

from ispf.blinding import TAG_BYTES, result_digest
from ispf.errors import ProtocolViolation
from ispf.keys import BlindingKey
from ispf.records import Label
from ispf_server.policy import PeerPolicy
from ispf_server.records import (
    ExternalSort,
    RepeatedKey,
    SpooledNids,
    TagSpool,
    compiled,
    join_sorted,
    select_fields,
    sort_inplace,
    split_unique,
    upper_bound,
    written,
    zip_records,
)
from ispf_server.records.extsort import Buffer
from ispf_server.session.core import ROW_BATCH, Outcome, RowBatches, RowSink, split
from ispf_server.session.plan import (
    LabelSet,
    OwnerLookup,
    Plan,
    build_plan,
    check_collections,
    eligible,
    eligible_records,
    shuffled_plan,
)
from ispf_server.storage import Store
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.runs import (
    LSID,
    MATCHED,
    NID,
    NID_LED_LSID,
    NID_LED_NID,
    NID_LED_TAG,
    OWN_NID,
    OWN_TAG,
    PEER_TAG,
)
from ispf_server.storage.pairs.staging import StagedRun
from ispf_server.storage.pairs.state import (
    EMPTY_FP,
    OwnGroup,
    PairDelta,
    PeerGroup,
    RunBuilder,
    fingerprint,
    fingerprint_packed,
    labels_of,
    labels_text,
    pack_runs,
    toggle,
    xor_fp,
)
from ispf_server.storage.registry import StoredRecord
from ispf_server.storage.sessions import MatchRow

MAX_REMOVED = 1_000_000


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
    incremental: bool
    own_fp: bytes
    peer_fp: bytes
    own_records: int  # records that take part in this run's delta
    plan: Plan  # the IDs sent, by label set (plan.owners is not kept: see finish)
    removed_nids: list[str] = field(repr=False)
    removed_tags: list[bytes]
    version: int
    state_version: int  # the pair's state this was planned against (-1: none)


def _label_sets(records: Iterable[StoredRecord]) -> dict[str, str]:
    """nid -> its label set as stored (JSON), each distinct set encoded once."""
    by_nid: dict[str, set[Label]] = defaultdict(set)
    for r in records:
        by_nid[r.nid].add(r.label)
    texts: dict[frozenset[Label], str] = {}
    out: dict[str, str] = {}
    for nid, lbs in by_nid.items():
        key = frozenset(lbs)
        text = texts.get(key)
        if text is None:
            text = texts[key] = labels_text(lbs)
        out[nid] = text
    return out


CODED = NID + 1  # an ID and its label's one-byte code


def _allowed_labels(store: Store, pp: PeerPolicy, *, labelled: bool = True) -> list[Label] | None:
    """The labels whose records take part, for the coded pass: in the peer's
    collections and, where labelled, ones it may learn. None where the pass
    cannot run (no module, more labels than codes)."""
    if not compiled():
        return None
    allowed = [
        lb
        for lb in store.registry.distinct_labels()
        if pp.in_collections(lb.programme) and (not labelled or pp.may_disclose(lb))
    ]
    return None if len(allowed) > 254 else allowed


UNLABELLED = labels_text(())  # a count-only session's one group
_ANY = Label("*", "*")  # (stands for every label where unlabelled)


def _coded_label_sets(
    store: Store, allowed: list[Label], *, labelled: bool = True
) -> Iterator[tuple[str, bytes, int]]:
    """(label set as stored, IDs holding exactly it packed, records they hold), batch
    by batch over the registry, for the IDs with a label in `allowed` (SQLite's
    coded strings, sorted and split in C: only IDs with several records are looked
    at in Python). Unlabelled: every such ID once, in the one group. Raises
    _NotPacked where the IDs are not all 13 digits."""
    if not allowed:
        return
    single = [labels_text((lb,)) if labelled else UNLABELLED for lb in allowed]
    texts: dict[frozenset[Label], str] = {} if labelled else {frozenset({_ANY}): UNLABELLED}
    for once, repeated in _coded_batches(store, allowed):
        for code, nids in once.items():
            if code >= 2:  # (1: a label the peer may not hold)
                yield single[code - 2], nids, len(nids) // NID
        by_text: dict[str, bytearray] = defaultdict(bytearray)
        held: set[Label] = set()
        prev = b""
        count = 0
        for at in range(0, len(repeated), CODED):
            nid, code = repeated[at : at + NID], repeated[at + NID]
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
SHUFFLE = pairruns.Kind("shuffle", 4 + 12 + NID, 4)


def spooled_plan(
    store: Store, pp: PeerPolicy, *, labelled: bool = True, owners: OwnerLookup | None = None
) -> Plan | None:
    """A session's plan, as `shuffled_plan` makes it (groups in label-set order, each
    shuffled with the OS's randomness), within a fixed memory budget: every ID
    goes with its group's number and a random key to an `ExternalSort`, whose
    output is each group shuffled; the groups are then laid out in label-set
    order in a file (`SpooledNids`). Unlabelled (count-only): one group of every
    ID in the peer's collections. None where the coded pass cannot run: the
    caller then plans in memory."""
    allowed = _allowed_labels(store, pp, labelled=labelled)
    if allowed is None:
        return None
    w, directory = SHUFFLE.width, store.directory
    numbers: dict[str, int] = {}
    count = 0
    with ExternalSort(w, directory) as sorter:
        try:
            for text, nids, records in _coded_label_sets(store, allowed, labelled=labelled):
                n = len(nids) // NID
                number = numbers.setdefault(text, len(numbers)).to_bytes(4, "big")
                sorter.add(zip_records(n, (number, 4), (os.urandom(12 * n), 12), (nids, NID)))
                count += records
        except _NotPacked:
            return None
        # Each group's shuffled IDs, in the order the groups were met.
        met = TagSpool(directory, NID)
        where: dict[bytes, tuple[int, int]] = {}
        for chunk in sorter.sorted_chunks():
            view = memoryview(chunk)
            while view:
                key = bytes(view[:4])
                cut = w * upper_bound(view, w, 4, key)
                first = where.get(key, (met.count, 0))[0]
                met.append(select_fields(view[:cut], w, ((16, NID),)))
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


class _NotPacked(Exception):
    """The coded pass cannot take these IDs (not all 13 digits): the record path runs."""


def _coded_batches(store: Store, labels: list[Label]) -> Iterator[tuple[dict[int, bytes], bytes]]:
    """Every record as its ID and labels' code (chr(i + 2) for labels[i], chr(1) for any
    other), in batches from SQLite, each sorted and split in C: (IDs held once, by
    code; records of the IDs held several times, sorted). Raises _NotPacked where
    the IDs are not all 13 digits (the strings do not split evenly)."""
    for text in store.registry.nid_label_codes(labels):
        buf = bytearray(text.encode("latin-1"))
        del text
        if len(buf) % CODED:
            raise _NotPacked
        sort_inplace(buf, CODED)
        once, repeated = split_unique(buf, CODED)
        del buf
        if not all(nids.isdigit() for nids in once.values()):
            raise _NotPacked  # (misaligned)
        yield once, repeated


def _add_set(
    by_text: dict[str, bytearray], texts: dict[frozenset[Label], str], nid: bytes, held: set[Label]
) -> None:
    if held:
        key = frozenset(held)
        text = texts.get(key)
        if text is None:
            text = texts[key] = labels_text(key)
        by_text[text] += nid


def _all_label_sets_rows(store: Store, pp: PeerPolicy) -> tuple[dict[str, bytearray], int]:
    """Every ID the peer may hold, packed, by label set (as stored), and how many
    records: one pass over (nid, programme, status) rows in ID order. Where the
    coded pass cannot run (no module, more labels than codes, IDs not 13 digits)."""
    allowed: dict[tuple[str, str], Label | None] = {}
    texts: dict[Label | frozenset[Label], str] = {}
    by_text: dict[str, bytearray] = defaultdict(bytearray)
    count = 0
    prev: str | None = None
    held: Label | frozenset[Label] | None = None

    def flush(nid: str, key: Label | frozenset[Label]) -> None:
        text = texts.get(key)
        if text is None:
            text = texts[key] = labels_text(key if isinstance(key, frozenset) else (key,))
        by_text[text] += nid.encode("ascii")

    for nid, prog, status in store.registry.nid_labels():
        pair = (prog, status)
        if pair in allowed:
            label = allowed[pair]
        else:
            candidate = Label(prog, status)
            label = allowed[pair] = (
                candidate if pp.in_collections(prog) and pp.may_disclose(candidate) else None
            )
        if label is None:
            continue
        count += 1
        if nid != prev:
            if prev is not None and held is not None:
                flush(prev, held)
            prev, held = nid, label
        elif isinstance(held, frozenset):
            held = held | {label}
        elif held != label:
            held = frozenset((held, label))  # type: ignore[arg-type]
    if prev is not None and held is not None:
        flush(prev, held)
    return by_text, count


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
        records = [r for r in store.registry.records_by_nids(sorted(nids)) if eligible(pp, r)]
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
        if plan is None:
            by_text, own_records = _all_label_sets_rows(store, pp)
        else:
            own_records = plan.own_records
        removed_nids, removed_tags = [], []
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
        incremental=row is not None,
        own_fp=own_fp,
        peer_fp=peer_fp,
        own_records=own_records,
        plan=plan,
        removed_nids=removed_nids,
        removed_tags=removed_tags,
        version=version,
        state_version=row.version if row is not None else -1,
    )


def parse_removed(
    packed: bytes, held: Callable[[list[bytes]], dict[bytes, str]], who: str
) -> list[bytes]:
    """The peer's removed tags: each must be one we hold for it."""
    if len(packed) % TAG_BYTES:
        raise ProtocolViolation(f"removed tags of {who} are not whole 16-byte tags")
    tags = split(packed, TAG_BYTES)
    if len(tags) > MAX_REMOVED:
        raise ProtocolViolation(f"{len(tags)} removed tags, at most {MAX_REMOVED}")
    if len(set(tags)) != len(tags):
        raise ProtocolViolation(f"{who} removed the same tag twice")
    unknown = len(tags) - len(held(tags)) if tags else 0
    if unknown:
        raise ProtocolViolation(f"{who} removed {unknown} tags this node never held")
    return tags


@dataclass(frozen=True)
class SyncResult:
    outcome: Outcome
    delta: PairDelta
    state_after: bytes  # own fingerprint || peer fingerprint, from this side's view


def _matched_rows(side: SyncSide, matches: dict[str, tuple[bytes, str]]) -> list[MatchRow]:
    """The result rows: only matched IDs' records are read back (a tenth, typically)."""
    rows: list[MatchRow] = []
    allowed: dict[Label, bool] = {}
    pp = side.pp
    for rid, nid, label in side.store.registry.labelled_records(sorted(matches)):
        ok = allowed.get(label)
        if ok is None:
            ok = allowed[label] = pp.in_collections(label.programme) and pp.may_disclose(label)
        if ok:
            tag, labels = matches[nid]
            rows.extend(MatchRow(rid, label, pl, tag) for pl in labels_of(labels))
    return rows


def _fingerprint(tags: TagSpool) -> bytes:
    """`fingerprint_packed`, chunk by chunk (XOR: the parts combine)."""
    fp = EMPTY_FP
    for chunk in tags.chunks():
        fp = xor_fp(fp, fingerprint_packed(chunk))
    return fp


# The join of own_tag and peer_tag: tag | nid | own lsid | peer lsid; and its fields
# as a matched record (nid | tag | peer lsid).
JOINED = pairruns.Kind("joined", OWN_TAG.width + PEER_TAG.width - TAG_BYTES, TAG_BYTES)
JOINED_TO_MATCHED = ((TAG_BYTES, NID), (0, TAG_BYTES), (OWN_TAG.width, LSID))


def _finish_full(
    side: SyncSide,
    own_added_tags: TagSpool,
    peer_groups: list[LabelSet],
    peer_sizes: list[int],
    peer_added_tags: TagSpool,
    stage_rows: RowSink | None,
) -> SyncResult | None:
    """A full run on packed data, within a fixed memory budget however large the
    registry. Each run of the new state is sorted externally (`ExternalSort`:
    budget-sized sorted pieces spilled to the store's directory, then merged) and
    staged piece by piece as it is merged; the own and peer runs are joined on
    the tag as they stream past; the matches go to a sort of their own and, in
    ID order, to the matched run and to the result rows, staged a batch at a time
    (`stage_rows`; without it, as here in tests, rows are gathered). No Python
    object is made per record, and only a batch of them per match. None where
    the data does not allow it (IDs not 13 digits, a tag twice, no native
    module): the general path then runs (what was staged is dropped by it)."""
    plan = side.plan
    if not compiled():
        return None
    directory = side.store.directory
    runs = RunBuilder()  # (numbers the label sets)

    # Each group in chunks of tags and of IDs (each read from disk where spooled),
    # with its label set's number.
    def own_groups() -> Iterator[tuple[bytes, Buffer, bytes]]:
        lsids = [runs.lsid(labels_text(group)) for group in plan.groups]
        for g, at, tags in own_added_tags.grouped(plan.sizes):
            nids = plan.order[at : at + len(tags) // TAG_BYTES].data
            if not bytes(nids).isdigit():
                raise _NotPacked  # (IDs not 13 digits: planned from records)
            yield lsids[g], nids, tags

    def own_sorted(by_tag: bool) -> ExternalSort:
        out = ExternalSort(OWN_TAG.width, directory)
        for lsid, nids, tags in own_groups():
            cols = ((tags, TAG_BYTES), (nids, NID)) if by_tag else ((nids, NID), (tags, TAG_BYTES))
            out.add(zip_records(len(tags) // TAG_BYTES, *cols, (lsid, LSID)))
        return out

    def peer_sorted() -> ExternalSort:
        out = ExternalSort(PEER_TAG.width, directory)
        lsids = [runs.lsid(labels_text(group)) for group in peer_groups]
        for g, _, tags in peer_added_tags.grouped(peer_sizes):
            out.add(zip_records(len(tags) // TAG_BYTES, (tags, TAG_BYTES), (lsids[g], LSID)))
        return out

    try:
        own_by_tag = own_sorted(by_tag=True)
    except _NotPacked:
        return None
    stager = side.store.pairs.run_stager(side.peer, side.epoch)
    rows = RowBatches(stage_rows)
    with (
        own_by_tag,
        peer_sorted() as peer_by_tag,
        ExternalSort(MATCHED.width, directory) as matched,
    ):
        own_run, peer_run = stager.writer(OWN_TAG), stager.writer(PEER_TAG)
        try:
            # tag | nid | own lsid | peer lsid, for every tag on both sides, in tag order
            for joined in join_sorted(
                written(own_by_tag.sorted_chunks(), own_run.append),
                OWN_TAG.width,
                written(peer_by_tag.sorted_chunks(), peer_run.append),
                PEER_TAG.width,
                TAG_BYTES,
            ):
                rows.found(joined, JOINED.width)
                matched.add(select_fields(joined, JOINED.width, JOINED_TO_MATCHED))
        except RepeatedKey:
            return None
        own_run.close()
        peer_run.close()
        names = {pairruns.lsid(n): text for text, n in runs.texts.items()}
        _staged_rows(side, matched.sorted_chunks(), stager.writer(MATCHED), names, rows)
    with own_sorted(by_tag=False) as own_by_nid:
        own_nid_run = stager.writer(OWN_NID)
        for chunk in own_by_nid.sorted_chunks():
            own_nid_run.append(chunk)
        own_nid_run.close()
    staged = stager.done(runs.texts)
    own_fp, peer_fp = _fingerprint(own_added_tags), _fingerprint(peer_added_tags)
    delta = PairDelta(
        reset=True,
        own_added=[],  # (the runs hold them)
        own_removed=[],
        peer_added=[],
        peer_removed=[],
        version=side.version,
        own_fp=own_fp,
        peer_fp=peer_fp,
        policy=policy_key(side.pp),
        staged=staged,
    )
    return SyncResult(rows.outcome(), delta, own_fp + peer_fp)


def _staged_rows(
    side: SyncSide,
    matched: Iterable[Buffer],
    run: StagedRun,
    names: dict[bytes, str],
    out: RowBatches,
) -> None:
    """The matched run (nid | tag | peer lsid, in ID order) staged as it is merged,
    and the result rows of a batch of matched IDs at a time, to `out`. Only the
    matched IDs' records are read back (a tenth, typically)."""
    allowed: dict[Label, bool] = {}
    peer_labels: dict[bytes, tuple[Label, ...]] = {}
    pp = side.pp
    for chunk in matched:
        run.append(chunk)
        for at in range(0, len(chunk), MATCHED.width * ROW_BATCH):
            part = chunk[at : at + MATCHED.width * ROW_BATCH]
            found: dict[str, tuple[bytes, tuple[Label, ...]]] = {}
            for i in range(0, len(part), MATCHED.width):
                rec = bytes(part[i : i + MATCHED.width])
                lsid = rec[NID_LED_LSID]
                labels = peer_labels.get(lsid)
                if labels is None:
                    labels = peer_labels[lsid] = labels_of(names[lsid])
                found[rec[NID_LED_NID].decode("ascii")] = (rec[NID_LED_TAG], labels)
            rows: list[MatchRow] = []
            for rid, nid, label in side.store.registry.labelled_records(list(found)):
                ok = allowed.get(label)
                if ok is None:
                    ok = allowed[label] = pp.in_collections(label.programme) and pp.may_disclose(
                        label
                    )
                if ok:
                    tag, labels = found[nid]
                    rows.extend(MatchRow(rid, label, pl, tag) for pl in labels)
            out.add(rows)
    run.close()


def finish(
    side: SyncSide,
    own_tags_in: TagSpool,
    peer_groups: list[LabelSet],
    peer_sizes: list[int],
    peer_tags_in: TagSpool,
    peer_removed: list[bytes],
    *,
    packed: bool = True,
    stage_rows: RowSink | None = None,
) -> SyncResult:
    """Apply both deltas (in memory) to the kept matches; the state itself changes on commit.

    Each direction's tags are spooled to disk: a full run reads them back in
    chunks; the general path reads them whole. `packed=False` forces the general
    path for a full run (tests compare the two)."""
    store, peer, epoch, plan = side.store, side.peer, side.epoch, side.plan
    if own_tags_in.count != plan.total:
        raise ProtocolViolation(f"{own_tags_in.count} tags for {plan.total} values sent")
    if packed and not side.incremental and not peer_removed:
        fast = _finish_full(side, own_tags_in, peer_groups, peer_sizes, peer_tags_in, stage_rows)
        if fast is not None:
            return fast
    own_added_tags, peer_added_tags = own_tags_in.getvalue(), peer_tags_in.getvalue()
    own_tags = split(own_added_tags, TAG_BYTES)
    own_added: list[OwnGroup] = []
    pos = 0
    for group, size in zip(plan.groups, plan.sizes, strict=True):
        nids = [n.decode("ascii") for n in plan.order[pos : pos + size]]
        own_added.append(OwnGroup(labels_text(group), nids, own_tags[pos : pos + size]))
        pos += size
    peer_added: list[PeerGroup] = []
    peer_index: dict[bytes, str] = {}  # tag -> labels, of the peer's additions
    tags = split(peer_added_tags, TAG_BYTES)
    pos = 0
    for group, size in zip(peer_groups, peer_sizes, strict=True):
        text = labels_text(group)
        part = tags[pos : pos + size]
        peer_added.append(PeerGroup(text, part))
        peer_index.update(dict.fromkeys(part, text))
        pos += size
    gone_own, gone_peer = set(side.removed_nids), set(peer_removed)
    matches: dict[str, tuple[bytes, str]] = {}
    if side.incremental:
        for nid, tag, labels in store.pairs.matched_state(peer, epoch):
            if nid not in gone_own and tag not in gone_peer:
                matches[nid] = (tag, labels)
        for tag, nid in store.pairs.own_nids_by_tag(peer, epoch, peer_index).items():
            if nid not in gone_own:  # new peer tags meeting kept own ones
                matches[nid] = (tag, peer_index[tag])
        kept_peer = store.pairs.peer_labels_for(
            peer, epoch, [t for t in own_tags if t not in peer_index and t not in gone_peer]
        )
    else:
        kept_peer = {}
    for g in own_added:
        for nid, tag in zip(g.nids, g.tags, strict=True):
            found = peer_index.get(tag)
            if found is None:
                found = kept_peer.get(tag)
            if found is not None:
                matches[nid] = (tag, found)
    rows = _matched_rows(side, matches)
    own_fp = xor_fp(toggle(side.own_fp, side.removed_tags), fingerprint_packed(own_added_tags))
    # (A tag the peer sent twice counts once, as it is stored once.)
    added_fp = (
        fingerprint_packed(peer_added_tags)
        if len(peer_index) == len(tags)
        else fingerprint(peer_index)
    )
    peer_fp = xor_fp(toggle(side.peer_fp, peer_removed), added_fp)
    delta = PairDelta(
        reset=not side.incremental,
        own_added=own_added,
        own_removed=side.removed_nids,
        peer_added=peer_added,
        peer_removed=peer_removed,
        version=side.version,
        own_fp=own_fp,
        peer_fp=peer_fp,
        policy=policy_key(side.pp),
        runs=None if side.incremental else pack_runs(own_added, peer_added, matches),
    )
    matched = [t for t, _ in matches.values()]
    return SyncResult(Outcome(len(matched), result_digest(matched), rows), delta, own_fp + peer_fp)


# ------------------------------------------------ sessions without pair state


def one_off_plan(
    store: Store, pp: PeerPolicy, collections: frozenset[str], *, labelled: bool
) -> Plan:
    """The plan of a session that keeps no pair state: count-only, or limited to some
    collections. As a full run's (`spooled_plan`): IDs packed from SQLite's coded
    strings, shuffled by an external sort and kept on disk. A labelled one groups
    them by label set under the policy narrowed to the collections asked for, and
    looks up the matched IDs' records when matched (`Plan.owners`). Without the
    module, from record objects (`build_plan`)."""
    check_collections(pp, collections)
    narrowed = replace(pp, collections=collections) if collections else pp
    owners = partial(eligible_owners, store, narrowed) if labelled else None
    plan = spooled_plan(store, narrowed, labelled=labelled, owners=owners)
    if plan is not None:
        return plan
    records = eligible_records(store, pp, collections, labelled=labelled)
    return build_plan(records, labelled=labelled, owners_of=owners)


def eligible_owners(
    store: Store, pp: PeerPolicy, nids: list[bytes]
) -> dict[bytes, list[StoredRecord]]:
    """The records of these IDs that a labelled session with the peer may name (in its
    collections, labels it may learn): a result row each, read when matched."""
    out: dict[bytes, list[StoredRecord]] = defaultdict(list)
    allowed: dict[Label, bool] = {}
    for rid, nid, label in store.registry.labelled_records(
        sorted({n.decode("ascii") for n in nids})
    ):
        ok = allowed.get(label)
        if ok is None:
            ok = allowed[label] = pp.in_collections(label.programme) and pp.may_disclose(label)
        if ok:
            out[nid.encode("ascii")].append(StoredRecord(rid, nid, label))
    return out
