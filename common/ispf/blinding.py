"""The blinding recipe, one safe call per job.

* `hash_to_curve(salt, nid)`: layer 1, the forum-keyed hash mapped onto the curve.
* `blind(key, salt, nid)`: layer 2, a node's secret X25519 scalar applied to it.
* `reblind(key, value)`: the peer's value blinded once more: a match tag.
* `blind_many`, `reblind_many`: the same on packed batches, with a named X25519
  backend (`ispf.hazmat.backends`; the node picks it once, at start).
* `tag_of(value)`: tags are compared on their first 16 bytes.
* `result_digest(tags)`: what both sides of a session log, identically: a Merkle
  root over the sorted matched tags.
* The node's X25519 backend, the one way into `ispf.hazmat` outside this module:
  `select_backend` (once, at start), `backend_status` (for log, health and
  metrics), `curve_in_c`, `releases_gil`; and, for a blinding pool's worker
  processes (key objects refuse pickling, so only raw bytes travel there),
  `raw_hash_and_blind_many` and `raw_reblind_many`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ispf import merkle
from ispf.errors import BackendUnavailable
from ispf.hazmat import backends, curve
from ispf.hazmat.backends import BackendStatus, X25519Backend
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


# -- the X25519 backend ---------------------------------------------------------


def select_backend(choice: str = "auto") -> X25519Backend:
    """The X25519 backend for this process, by name or "auto" (`ispf.hazmat.backends`:
    the project's own must pass its self-checks first, else `cryptography` is used
    and `backend_status` says why). ConfigError for an unknown or removed name."""
    return backends.select(choice)


def backend_status() -> BackendStatus:
    """The backend in use and its health: name, healthy, reason, mismatches found and
    spot checks made (the node's log, health and metrics read it)."""
    return backends.STATUS


def curve_in_c() -> bool:
    """Whether hash-to-curve and the X25519 batches run in C (the native module)."""
    return curve.native is not None


def releases_gil(choice: str) -> bool:
    """Do hashing and blinding with this backend run without the GIL (threads scale)?"""
    try:
        return curve.native is not None and select_backend(choice).name == "ifma"
    except BackendUnavailable:
        return False


def raw_hash_and_blind_many(
    salt: bytes, key: bytes, digits: Sequence[bytes] | PackedNids, backend: str
) -> bytes:
    """`blind_many` on the raw bytes of the salt and the key: for a blinding pool's
    worker processes only, where key objects cannot travel. The bytes never leave
    the node's own processes."""
    return curve.hash_and_blind_many(salt, key, digits, backend)


def raw_reblind_many(key: bytes, packed: bytes, out_bytes: int, backend: str) -> bytes:
    """`reblind_many` on the raw bytes of the key: for a blinding pool's workers only."""
    return curve.x25519_many(key, packed, out_bytes, backend)
