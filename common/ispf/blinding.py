"""The blinding recipe, one safe call per job.

* `hash_to_curve(salt, nid)`: layer 1, the forum-keyed hash mapped onto the curve.
* `blind(key, salt, nid)`: layer 2, a node's secret X25519 scalar applied to it.
* `reblind(key, value)`: the peer's value blinded once more: a match tag.
* `blind_many`, `reblind_many`: the same on packed batches, with a named X25519
  backend (`ispf.hazmat.backends`; the node picks it once, at start).
* `tag_of(value)`: tags are compared on their first 16 bytes.
* `result_digest(tags)`: what both sides of a session log, identically: a Merkle
  root over the sorted matched tags.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ispf import merkle
from ispf.hazmat import curve
from ispf.keys import BlindingKey, ForumSalt
from ispf.nid import NationalId, PackedNids

TAG_BYTES = 16
POINT_BYTES = curve.POINT_BYTES


def hash_to_curve(salt: ForumSalt, nid: NationalId) -> bytes:
    return curve.hash_to_curve(salt.unsafe_raw(), nid.encode())[0]


def blind(key: BlindingKey, salt: ForumSalt, nid: NationalId) -> bytes:
    return curve.hash_and_blind_many(salt.unsafe_raw(), key.unsafe_raw(), [nid.encode()])


def reblind(key: BlindingKey, value: bytes) -> bytes:
    return curve.x25519_many(key.unsafe_raw(), value)


def blind_many(
    key: BlindingKey,
    salt: ForumSalt,
    digits: Sequence[bytes] | PackedNids,
    backend: str = "auto",
) -> bytes:
    """`blind` for many canonical IDs (13 ASCII digits each): 32-byte values, packed."""
    return curve.hash_and_blind_many(salt.unsafe_raw(), key.unsafe_raw(), digits, backend)


def reblind_many(
    key: BlindingKey, packed: bytes, out_bytes: int = POINT_BYTES, backend: str = "auto"
) -> bytes:
    """`reblind` for many 32-byte values packed end to end, each result cut to
    `out_bytes` (TAG_BYTES: the tags themselves)."""
    return curve.x25519_many(key.unsafe_raw(), packed, out_bytes, backend)


def tag_of(value: bytes) -> bytes:
    return value[:TAG_BYTES]


def result_digest(tags: Iterable[bytes]) -> bytes:
    """RFC 6962 Merkle root over the sorted distinct matched tags (each tag a leaf).

    A tree rather than a flat hash, so that a receipt can prove one tag is in
    a session's result without revealing the others.
    """
    return merkle.root([merkle.leaf_hash(t) for t in sorted(set(tags))])
