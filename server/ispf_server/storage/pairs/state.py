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
session commits, the numbering of label sets in a full run's sorted runs);
`staging` writes a full run's runs ahead of its commit, `deltas` writes the
commit, `lookups` reads the state, `keys` keeps the pair keys' counters.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ispf.records import Label
from ispf_server.records import xor_fold
from ispf_server.storage.pairs import runs as pairruns

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
    session_id: str = ""  # the session that made this state ("": not known)

    SELECT: ClassVar[str] = (
        "SELECT version, own_fp, peer_fp, policy, session_id FROM pair_sync "
        "WHERE peer=? AND epoch=?"
    )

    @classmethod
    def of(cls, row: tuple[Any, ...] | None) -> SyncRow | None:
        """The sync row from `SELECT`'s result (None: the pair has none)."""
        if row is None:
            return None
        return cls(int(row[0]), bytes(row[1]), bytes(row[2]), str(row[3]), str(row[4]))


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
    # A full run's state as sorted runs, staged piece by piece before the commit
    # (`pairs.staging`, while the peer does the same): `staged` names the generation,
    # and the commit only makes it current.
    staged: pairruns.Staged | None = None


def xor_fp(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(FP_BYTES, "big")


def toggle(fp: bytes, tags: Iterable[bytes]) -> bytes:
    """Add or remove tags from a set fingerprint (XOR is its own inverse)."""
    return (int.from_bytes(fp, "big") ^ int.from_bytes(fingerprint(tags), "big")).to_bytes(
        FP_BYTES, "big"
    )


class RunBuilder:
    """Label sets numbered as a full run meets them (`lsid`): the numbers its sorted
    runs carry (`session.match.kept`, which sorts within a memory budget), and
    `texts`, each set's text by number, which the runs' staging stores."""

    def __init__(self) -> None:
        self.texts: dict[str, int] = {}

    def lsid(self, text: str) -> bytes:
        return pairruns.lsid(self.texts.setdefault(text, len(self.texts)))
