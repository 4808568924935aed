"""Sync sessions: the mutual protocol over a pair's fixed keys and kept tag state.

Each side sends only the IDs added (or relabelled) since the pair last synced
and the tags of those it removed; matches are the kept matches adjusted by both
deltas, so an incremental run gives exactly what a full run would, at a cost in
proportion to the changes (and the matches), not to the registry. A full run
is the same from empty state: everything is added, and the state replaced, on
packed runs sorted within a memory budget (`_finish_full`, with or without the C
module: `records` chooses). (Its side is planned in `plan.prepare`.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ispf.blinding import TAG_BYTES, result_digest
from ispf.errors import NotPacked, ProtocolViolation
from ispf_server.records import (
    ExternalSort,
    TagSpool,
    join_sorted,
    select_fields,
    split_records,
    unique,
    written,
    zip_records,
)
from ispf_server.records.extsort import Buffer
from ispf_server.session.facts import SyncKind
from ispf_server.session.match.rows import (
    ROW_BATCH,
    Found,
    Matched,
    Outcome,
    RowBatches,
    RowCarry,
    RowSink,
    named_rows,
)
from ispf_server.session.plan import LabelSet, SyncSide, owners_of, policy_key
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
    toggle,
    xor_fp,
)


class KeptState:
    """The matcher of a sync session: the pair's kept state and both deltas (both roles)."""

    def __init__(
        self,
        side: SyncSide,
        peer_groups: list[LabelSet],
        peer_sizes: list[int],
        peer_removed: list[bytes],
        *,
        stage_rows: RowSink | None,
        carry_rows: RowCarry | None = None,
        session_id: str,
    ) -> None:
        self.side, self.peer_groups, self.peer_sizes = side, peer_groups, peer_sizes
        self.peer_removed, self.stage_rows, self.carry_rows = peer_removed, stage_rows, carry_rows
        self.session_id = session_id

    def match(self, own_tags: TagSpool, peer_tags: TagSpool) -> Matched:
        return finish(
            self.side,
            own_tags,
            self.peer_groups,
            self.peer_sizes,
            peer_tags,
            self.peer_removed,
            stage_rows=self.stage_rows,
            carry_rows=self.carry_rows,
            session_id=self.session_id,
        )


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
    peer_removed: list[bytes],
    stage_rows: RowSink | None,
    session_id: str | None,
) -> Matched:
    """A full run on packed data, within a fixed memory budget however large the
    registry, with or without the C module (`records` chooses). Each run of the
    new state is sorted externally (`ExternalSort`: budget-sized sorted pieces
    spilled to the store's directory, then merged) and staged piece by piece as it
    is merged; the own and peer runs are joined on the tag as they stream past;
    the matches go to a sort of their own and, in ID order, to the matched run and
    to the result rows, staged a batch at a time (`stage_rows`; without it, as
    here in tests, rows are gathered). In C, no Python object is made per record,
    and only a batch of them per match.

    A tag the peer sent twice is stored once, with the labels of the last group
    that holds it (`unique`: the peer's label sets are numbered in its groups'
    order first, so the last group's sorts highest), and counts once in the
    peer's fingerprint."""
    plan = side.plan
    directory = side.store.directory
    runs = RunBuilder()  # (numbers the label sets: the peer's first, in its groups' order)
    peer_lsids = [runs.lsid(labels_text(group)) for group in peer_groups]
    own_lsids = [runs.lsid(labels_text(group)) for group in plan.groups]
    # Sorted by tag and label set, the last group holding a tag sorts highest, unless
    # the peer announced one label set in two groups (which an honest peer never
    # does): then by tag and group number, each renumbered after `unique`.
    ordered = len(set(peer_lsids)) == len(peer_lsids)
    peer_keys = peer_lsids if ordered else [pairruns.lsid(g) for g in range(len(peer_groups))]

    # Each group in chunks of tags and of IDs (each read from disk where spooled),
    # with its label set's number.
    def own_groups() -> Iterator[tuple[bytes, Buffer, bytes]]:
        for g, at, tags in own_added_tags.grouped(plan.sizes):
            nids = plan.order[at : at + len(tags) // TAG_BYTES].data
            if not bytes(nids).isdigit():  # (IDs are made 13 digits as they are loaded)
                raise NotPacked(f"IDs of own group {g} are not all 13 digits: cannot sync")
            yield own_lsids[g], nids, tags

    def own_sorted(by_tag: bool) -> ExternalSort:
        out = ExternalSort(OWN_TAG.width, directory)
        for lsid, nids, tags in own_groups():
            cols = ((tags, TAG_BYTES), (nids, NID)) if by_tag else ((nids, NID), (tags, TAG_BYTES))
            out.add(zip_records(len(tags) // TAG_BYTES, *cols, (lsid, LSID)))
        return out

    def peer_sorted() -> ExternalSort:
        out = ExternalSort(PEER_TAG.width, directory)
        for g, _, tags in peer_added_tags.grouped(peer_sizes):
            out.add(zip_records(len(tags) // TAG_BYTES, (tags, TAG_BYTES), (peer_keys[g], LSID)))
        return out

    def peer_once(chunks: Iterable[Buffer]) -> Iterator[Buffer]:
        """The peer's sorted records, each tag once (the last group's), labelled."""
        once = unique(chunks, PEER_TAG.width, TAG_BYTES, drop)
        if ordered:
            yield from once
            return
        for chunk in once:  # (group numbers to label sets: record by record)
            out = bytearray(chunk)
            for at in range(TAG_BYTES, len(out), PEER_TAG.width):
                out[at : at + LSID] = peer_lsids[int.from_bytes(out[at : at + LSID], "big")]
            yield out

    repeated = EMPTY_FP  # the tags the peer sent again, XORed: its fingerprint counts each once

    def drop(records: bytes) -> None:
        nonlocal repeated
        repeated = xor_fp(
            repeated, fingerprint_packed(select_fields(records, PEER_TAG.width, ((0, TAG_BYTES),)))
        )

    stager = side.store.pairs.run_stager(side.peer, side.epoch, session_id)
    rows = RowBatches(stage_rows)
    with (
        own_sorted(by_tag=True) as own_by_tag,
        peer_sorted() as peer_by_tag,
        ExternalSort(MATCHED.width, directory) as matched,
    ):
        own_run, peer_run = stager.writer(OWN_TAG), stager.writer(PEER_TAG)
        # tag | nid | own lsid | peer lsid, for every tag on both sides, in tag order
        for joined in join_sorted(
            written(own_by_tag.sorted_chunks(), own_run.append),
            OWN_TAG.width,
            written(peer_once(peer_by_tag.sorted_chunks()), peer_run.append),
            PEER_TAG.width,
            TAG_BYTES,
        ):
            rows.found(joined, JOINED.width)
            matched.add(select_fields(joined, JOINED.width, JOINED_TO_MATCHED))
        own_run.close()
        peer_run.close()
        names = {pairruns.lsid(n): text for text, n in runs.texts.items()}
        _staged_rows(side, matched.sorted_chunks(), stager.writer(MATCHED), names, rows)
    with own_sorted(by_tag=False) as own_by_nid:
        own_nid_run = stager.writer(OWN_NID)
        for chunk in own_by_nid.sorted_chunks():
            own_nid_run.append(chunk)
        own_nid_run.close()
    delta = _new_state(
        side,
        peer_removed,
        _fingerprint(own_added_tags),
        xor_fp(_fingerprint(peer_added_tags), repeated),
        reset=True,
        own_added=[],  # (the runs hold them)
        peer_added=[],
        staged=stager.done(runs.texts),
    )
    return Matched(rows.outcome(), delta, delta.own_fp + delta.peer_fp)


def _new_state(
    side: SyncSide,
    peer_removed: list[bytes],
    own_added_fp: bytes,
    peer_added_fp: bytes,
    *,
    reset: bool,
    own_added: list[OwnGroup],
    peer_added: list[PeerGroup],
    staged: pairruns.Staged | None = None,
) -> PairDelta:
    """The pair's changes, with its new fingerprints: the kept sets' less what each
    side removed, with what it added (XOR: removing is adding again)."""
    return PairDelta(
        reset=reset,
        own_added=own_added,
        own_removed=side.removed_nids,
        peer_added=peer_added,
        peer_removed=peer_removed,
        version=side.version,
        own_fp=xor_fp(toggle(side.own_fp, side.removed_tags), own_added_fp),
        peer_fp=xor_fp(toggle(side.peer_fp, peer_removed), peer_added_fp),
        policy=policy_key(side.pp),
        staged=staged,
    )


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
    peer_labels: dict[bytes, LabelSet] = {}
    for chunk in matched:
        run.append(chunk)
        for at in range(0, len(chunk), MATCHED.width * ROW_BATCH):
            part = chunk[at : at + MATCHED.width * ROW_BATCH]
            found: list[Found] = []
            for i in range(0, len(part), MATCHED.width):
                rec = bytes(part[i : i + MATCHED.width])
                lsid = rec[NID_LED_LSID]
                labels = peer_labels.get(lsid)
                if labels is None:
                    labels = peer_labels[lsid] = labels_of(names[lsid])
                found.append((rec[NID_LED_TAG], rec[NID_LED_NID], labels))
            out.add(named_rows(found, owners_of(side.store, side.pp, [n for _, n, _ in found])))
    run.close()


def finish(
    side: SyncSide,
    own_tags_in: TagSpool,
    peer_groups: list[LabelSet],
    peer_sizes: list[int],
    peer_tags_in: TagSpool,
    peer_removed: list[bytes],
    *,
    stage_rows: RowSink | None = None,
    carry_rows: RowCarry | None = None,
    session_id: str | None,
) -> Matched:
    """Apply both deltas (in memory) to the kept matches; the state itself changes on commit.
    A full run's new runs are staged as `session_id`'s (None: no session's, in tests).

    Each direction's tags are spooled to disk: a full run reads them back in
    chunks (`_finish_full`); an incremental one reads them whole."""
    store, peer, epoch, plan = side.store, side.peer, side.epoch, side.plan
    if own_tags_in.count != plan.total:
        raise ProtocolViolation(f"{own_tags_in.count} tags for {plan.total} values sent")
    if side.kind is SyncKind.FULL:
        return _finish_full(
            side,
            own_tags_in,
            peer_groups,
            peer_sizes,
            peer_tags_in,
            peer_removed,
            stage_rows,
            session_id,
        )
    # An incremental run: the deltas are small, read whole.
    own_added_tags, peer_added_tags = own_tags_in.getvalue(), peer_tags_in.getvalue()
    own_tags = split_records(own_added_tags, TAG_BYTES)
    own_added: list[OwnGroup] = []
    pos = 0
    for group, size in zip(plan.groups, plan.sizes, strict=True):
        nids = [n.decode("ascii") for n in plan.order[pos : pos + size]]
        own_added.append(OwnGroup(labels_text(group), nids, own_tags[pos : pos + size]))
        pos += size
    peer_added: list[PeerGroup] = []
    peer_index: dict[bytes, str] = {}  # tag -> labels, of the peer's additions
    tags = split_records(peer_added_tags, TAG_BYTES)
    pos = 0
    for group, size in zip(peer_groups, peer_sizes, strict=True):
        text = labels_text(group)
        part = tags[pos : pos + size]
        peer_added.append(PeerGroup(text, part))
        peer_index.update(dict.fromkeys(part, text))
        pos += size
    gone_own, gone_peer = set(side.removed_nids), set(peer_removed)
    matches: dict[str, tuple[bytes, str]] = {}
    for nid, tag, labels in store.pairs.matched_state(peer, epoch):
        if nid not in gone_own and tag not in gone_peer:
            matches[nid] = (tag, labels)
    met = store.pairs.own_nids_by_tag(peer, epoch, peer_index)
    for tag, nid in met.items():
        if nid not in gone_own:  # new peer tags meeting kept own ones
            matches[nid] = (tag, peer_index[tag])
    kept_peer = store.pairs.peer_labels_for(
        peer, epoch, [t for t in own_tags if t not in peer_index and t not in gone_peer]
    )
    for g in own_added:
        for nid, tag in zip(g.nids, g.tags, strict=True):
            found = peer_index.get(tag)
            if found is None:
                found = kept_peer.get(tag)
            if found is not None:
                matches[nid] = (tag, found)
    # The result rows. Carried over (`carry_rows`): the rows of the session that made the
    # pair's state, in the store, but for the tags this run may change, whose IDs'
    # records are read back and named again: the IDs either side changed, and those
    # the peer's changes meet. Else every matched ID's records are read back.
    # (Only from the session whose rows are the pair's result now: a plan made early
    # may name one that another session of the pair has since replaced.)
    base = side.base_session
    carried = (
        carry_rows is not None
        and stage_rows is not None
        and bool(base)
        and (now := store.pairs.sync_row(peer, epoch)) is not None
        and now.session_id == base
        and store.sessions.is_completed(base)
    )
    if carried:
        redo = set(side.touched_nids) | {n for g in own_added for n in g.nids}
        redo.update(met.values())
        drop = {*side.removed_tags, *gone_peer, *peer_index}
        drop.update(matches[n][0] for n in redo if n in matches)
        chosen = sorted((n, matches[n]) for n in redo if n in matches)
    else:
        chosen = sorted(matches.items())
    peer_labels: dict[str, LabelSet] = {}
    named: list[Found] = []
    for nid, (tag, text) in chosen:
        peer_set = peer_labels.get(text)
        if peer_set is None:
            peer_set = peer_labels[text] = labels_of(text)
        named.append((tag, nid.encode("ascii"), peer_set))
    rows = named_rows(named, owners_of(store, side.pp, [n for _, n, _ in named]))
    staged: int | None = None
    if carried and carry_rows is not None and stage_rows is not None:
        staged = 0
        if stage_rows(rows):
            staged = carry_rows(base, drop) or 0  # (None: the session failed meanwhile,
            # and its commit is refused)
        rows = []
    # (A tag the peer sent twice counts once, as it is stored once.)
    delta = _new_state(
        side,
        peer_removed,
        fingerprint_packed(own_added_tags),
        fingerprint_packed(peer_added_tags)
        if len(peer_index) == len(tags)
        else fingerprint(peer_index),
        reset=False,
        own_added=own_added,
        peer_added=peer_added,
    )
    matched = [t for t, _ in matches.values()]
    outcome = Outcome(len(matched), result_digest(matched), rows, staged)
    return Matched(outcome, delta, delta.own_fp + delta.peer_fp)
