"""The blinding recipe, one safe call per job.

* `hash_to_curve(salt, nid)`: layer 1, the forum-keyed hash mapped onto the curve.
* `blind(key, salt, nid)`: layer 2, a node's secret X25519 scalar applied to it.
* `reblind(key, value)`: the peer's value blinded once more: a match tag.
* `tag_of(value)`: tags are compared on their first 16 bytes.
* `result_digest(tags)`: what both sides of a session log, identically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ispf.hazmat import curve
from ispf.keys import BlindingKey, ForumSalt
from ispf.nid import NationalId

TAG_BYTES = 16
POINT_BYTES = curve.POINT_BYTES
_DIGEST_DOMAIN = b"ispf/result/v1"


def hash_to_curve(salt: ForumSalt, nid: NationalId) -> bytes:
    return curve.hash_to_curve(salt.unsafe_raw(), nid.encode())[0]


def blind(key: BlindingKey, salt: ForumSalt, nid: NationalId) -> bytes:
    return curve.hash_and_blind_many(salt.unsafe_raw(), key.unsafe_raw(), [nid.encode()])


def reblind(key: BlindingKey, value: bytes) -> bytes:
    return curve.x25519_many(key.unsafe_raw(), value)


def tag_of(value: bytes) -> bytes:
    return value[:TAG_BYTES]


def result_digest(tags: Iterable[bytes]) -> bytes:
    """SHA-256("ispf/result/v1" || uint64-BE(n) || sorted 16-byte tags)."""
    ordered = sorted(set(tags))
    h = hashlib.sha256(_DIGEST_DOMAIN)
    h.update(len(ordered).to_bytes(8, "big"))
    for t in ordered:
        h.update(t)
    return h.digest()
