"""What a node keeps per (peer, epoch) so that reconciliation can be incremental and
online checks can be answered: the re-key counter of its fixed blinding key (the
key itself is derived from the node's master key file, never stored), the tags
of its own IDs, and the peer's tags with the peer's labels.

With keys fixed for a (peer, epoch), a tag ``X25519(b, X25519(a, h(id)))`` is the
same in every session, so after a first full run each side only exchanges what
changed. The price, stated in docs/security.md: the peer sees how the tag set
changes between runs. A new epoch re-keys everything; so does the policy's
`rekey_after_days` for one pair within an epoch (`rekey`); retiring an epoch
destroys its keys and tags (`Store.destroy_epoch`).

The two sides agree on their state by fingerprints: the XOR of the tags, for
the initiator's set and the responder's set. Equal fingerprints on
both sides mean an incremental run is possible; otherwise the run is full and
both sides replace their state for the pair.

This module holds the state's values (fingerprints, label sets, the delta a
session commits, a full run's sorted runs built in memory); `deltas` writes
them, `lookups` reads them, `keys` keeps the pair keys' counters.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from ispf.records import Label
from ispf_server.records import sort_inplace, xor_fold, zip_into, zip_records
from ispf_server.storage.pairs import runs as pairruns
from ispf_server.storage.pairs.runs import MATCHED, OWN_NID, OWN_TAG, PEER_TAG

FP_BYTES = 32
EMPTY_FP = bytes(FP_BYTES)
NID_BYTES = 13
TAG_LEN = 16
Buffer = bytes | bytearray | memoryview


def labels_text(labels: Iterable[Label]) -> str:
    return json.dumps(sorted(f"{lb.programme}/{lb.status}" for lb in set(labels)))


@functools.lru_cache(maxsize=4096)  # registries have few distinct label sets
def labels_of(text: str) -> tuple[Label, ...]:
    """The labels of a stored label set (few distinct sets: each parsed once)."""
    out = []
    for item in json.loads(text):
        prog, _, status = item.rpartition("/")
        out.append(Label(prog, status))
    return tuple(sorted(out))


def fingerprint(tags: Iterable[bytes]) -> bytes:
    """XOR of the tags: they are pseudorandom already (X25519 outputs under secret
    scalars), so the XOR tells two sets apart as well as a hash of each would, and
    a tag added then removed cancels out, which keeps it updatable per change."""
    acc = 0
    for t in tags:
        acc ^= int.from_bytes(t, "big")
    return acc.to_bytes(FP_BYTES, "big")


def fingerprint_packed(packed: bytes) -> bytes:
    """`fingerprint` of 16-byte tags packed end to end (in C where built)."""
    if len(packed) % TAG_LEN == 0:
        return bytes(FP_BYTES - TAG_LEN) + xor_fold(packed, TAG_LEN)
    return fingerprint(packed[i : i + TAG_LEN] for i in range(0, len(packed), TAG_LEN))


@dataclass(frozen=True)
class OwnTag:
    labels: str
    tag: bytes


@dataclass(frozen=True)
class SyncRow:
    version: int
    own_fp: bytes
    peer_fp: bytes
    policy: str


@dataclass(frozen=True)
class OwnGroup:
    """Own IDs added under one label set, and their tags (aligned)."""

    labels: str
    nids: list[str] = field(repr=False)
    tags: list[bytes]


@dataclass(frozen=True)
class PeerGroup:
    """Peer tags added under one label set."""

    labels: str
    tags: list[bytes]


@dataclass
class PairDelta:
    """Changes to one pair's state, applied in one transaction when a session commits.

    Additions come grouped by label set, as the session exchanged them, so that a
    full run of millions is written as a few bulk inserts."""

    reset: bool
    own_added: list[OwnGroup]
    own_removed: list[str] = field(repr=False)  # nids
    peer_added: list[PeerGroup]
    peer_removed: list[bytes]  # tags
    version: int
    own_fp: bytes
    peer_fp: bytes
    policy: str
    # A full run's state as sorted runs, built before the commit (the CPU-heavy part,
    # done while the peer does the same); once written ahead as a generation
    # (`Store.stage_session_result`), `staged` names it and the commit only makes it current.
    runs: PackedRuns | None = field(default=None, repr=False)  # (packed IDs)
    staged: int | None = None


@dataclass(frozen=True)
class PackedRuns:
    labelsets: dict[str, int]  # label set text -> lsid
    runs: dict[str, Buffer] = field(repr=False)  # run kind -> sorted records (IDs)


def xor_fp(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(FP_BYTES, "big")


def toggle(fp: bytes, tags: Iterable[bytes]) -> bytes:
    """Add or remove tags from a set fingerprint (XOR is its own inverse)."""
    return (int.from_bytes(fp, "big") ^ int.from_bytes(fingerprint(tags), "big")).to_bytes(
        FP_BYTES, "big"
    )


def _zip(n: int, *parts: tuple[Buffer, int]) -> bytes:
    """n fixed-width records from columns (a column of one width is a constant)."""
    return zip_records(n, *parts)


def _zip_into(dst: bytearray, at: int, n: int, *parts: tuple[Buffer, int]) -> int:
    """`_zip` written into dst from byte `at`; returns the byte after the last record."""
    return zip_into(dst, at, n, *parts)


class RunBuilder:
    """A full run's state as sorted runs, from packed columns, one run at a time, in
    memory (`pack_runs`: how the storage tests write runs). Label sets are numbered
    as they are met (`lsid`), which a session's full run (`session.match.kept`,
    sorting externally within a memory budget) uses too."""

    def __init__(self) -> None:
        self.texts: dict[str, int] = {}

    def lsid(self, text: str) -> bytes:
        return pairruns.lsid(self.texts.setdefault(text, len(self.texts)))

    def own(
        self,
        groups: Iterable[tuple[str, Buffer, Buffer]],
        *,
        by_tag: bool,
    ) -> bytearray:
        """From (label set, 13-byte IDs, 16-byte tags) per group: own_tag or own_nid."""
        return self._run(
            (
                (
                    len(tags) // TAG_LEN,
                    ((tags, TAG_LEN), (nids, NID_BYTES))
                    if by_tag
                    else ((nids, NID_BYTES), (tags, TAG_LEN)),
                    labels,
                )
                for labels, nids, tags in groups
            ),
            TAG_LEN + NID_BYTES,
        )

    def peer(self, groups: Iterable[tuple[str, Buffer]]) -> bytearray:
        """From (label set, 16-byte tags) per group: peer_tag."""
        return self._run(
            ((len(tags) // TAG_LEN, ((tags, TAG_LEN),), labels) for labels, tags in groups),
            TAG_LEN,
        )

    def _run(
        self,
        groups: Iterable[tuple[int, tuple[tuple[Buffer, int], ...], str]],
        columns: int,
    ) -> bytearray:
        """Each group's columns (`columns` bytes a value) zipped with its label set's id,
        one group at a time into one buffer, then sorted in place: the run itself is
        the only full-size copy (the groups' columns are views: nothing copied)."""
        todo = list(groups)
        total = sum(n for n, _, _ in todo)
        width = columns + pairruns.LSID
        out = bytearray(width * total)
        at = 0
        for n, cols, labels in todo:
            at = _zip_into(out, at, n, *cols, (self.lsid(labels), pairruns.LSID))
        sort_inplace(out, width)
        return out

    def matched(self, matches: dict[str, tuple[bytes, str]]) -> bytearray:
        """From nid -> (tag, peer labels): matched."""
        out = bytearray()
        for n, (t, lbl) in matches.items():
            out += n.encode("ascii")
            out += t
            out += self.lsid(lbl)
        sort_inplace(out, MATCHED.width)
        return out

    def done(
        self, own_nid: Buffer, own_tag: Buffer, peer_tag: Buffer, matched: Buffer
    ) -> PackedRuns:
        return PackedRuns(
            self.texts,
            {
                OWN_NID.name: own_nid,
                OWN_TAG.name: own_tag,
                PEER_TAG.name: peer_tag,
                MATCHED.name: matched,
            },
        )


def _canonical_nids(nids: list[str]) -> bool:
    joined = "".join(nids)
    return joined.isascii() and joined.isdigit() and all(map(NID_BYTES.__eq__, map(len, nids)))


def pack_runs(
    own_added: list[OwnGroup],
    peer_added: list[PeerGroup],
    matched: dict[str, tuple[bytes, str]],
) -> PackedRuns | None:
    """A full run's state as sorted runs; None where IDs or tags are not canonical
    (then the state is written as rows)."""
    tag_lists = [g.tags for g in own_added] + [g.tags for g in peer_added]
    if not all(_canonical_nids(g.nids) for g in own_added) or not all(
        all(map(TAG_LEN.__eq__, map(len, tags))) for tags in tag_lists
    ):
        return None
    own = [(g.labels, "".join(g.nids).encode("ascii"), b"".join(g.tags)) for g in own_added]
    b = RunBuilder()
    own_tag = b.own(own, by_tag=True)
    peer_tag = b.peer((g.labels, b"".join(g.tags)) for g in peer_added)
    return b.done(b.own(own, by_tag=False), own_tag, peer_tag, b.matched(matched))
