"""The blinding recipe, one safe call per job.

* `hash_to_curve(salt, nid)`: layer 1, the forum-keyed hash mapped onto the curve.
* `blind(key, salt, nid)`: layer 2, a node's secret X25519 scalar applied to it.
* `reblind(key, value)`: the peer's value blinded once more: a match tag.
* `tag_of(value)`: tags are compared on their first 16 bytes.
* `result_digest(tags)`: what both sides of a session log, identically: a Merkle
  root over the sorted matched tags.
"""

from __future__ import annotations

from collections.abc import Iterable

from ispf import merkle
from ispf.hazmat import curve
from ispf.keys import BlindingKey, ForumSalt
from ispf.nid import NationalId

TAG_BYTES = 16
POINT_BYTES = curve.POINT_BYTES


def hash_to_curve(salt: ForumSalt, nid: NationalId) -> bytes:
    return curve.hash_to_curve(salt.unsafe_raw(), nid.encode())[0]


def blind(key: BlindingKey, salt: ForumSalt, nid: NationalId) -> bytes:
    return curve.hash_and_blind_many(salt.unsafe_raw(), key.unsafe_raw(), [nid.encode()])


def reblind(key: BlindingKey, value: bytes) -> bytes:
    return curve.x25519_many(key.unsafe_raw(), value)


def tag_of(value: bytes) -> bytes:
    return value[:TAG_BYTES]


def result_digest(tags: Iterable[bytes]) -> bytes:
    """RFC 6962 Merkle root over the sorted distinct matched tags (each tag a leaf).

    A tree rather than a flat hash, so that a receipt can prove one tag is in
    a session's result without revealing the others.
    """
    return merkle.root([merkle.leaf_hash(t) for t in sorted(set(tags))])
