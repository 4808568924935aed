"""Hash-to-curve with resampling, and batched X25519 on packed values.

Hash-to-curve (recipe ``ispf/nid/v1``)::

    for counter = 0, 1, 2, ...:
        h = BLAKE3-keyed(salt, "ispf/nid/v1" || 13 ASCII digits || uint32-LE(counter))
        h[31] &= 0x7f                  # clear the top bit
        u = int.from_bytes(h, "little")
        if u < p and u is not low-order and legendre(u^3 + 486662 u^2 + u, p) >= 0:
            return h, counter

Resampling until the value is on the curve (not its twist) matters: X25519
preserves curve-versus-twist, so without it every blinded value would leak one
bit about the identity number to a peer that holds the salt.
"""

from __future__ import annotations

from collections.abc import Sequence

import blake3
import gmpy2
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ispf.errors import InvalidBlindedValue

P = 2**255 - 19
A = 486662
POINT_BYTES = 32
DOMAIN = b"ispf/nid/v1"
MAX_COUNTER = 1024  # each try succeeds with probability ~1/2; 2^-1024 never happens

# u-coordinates of the points of small order on Curve25519 and its twist (canonical, < p).
LOW_ORDER_U: frozenset[int] = frozenset(
    {
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        P - 1,
    }
)

_P = gmpy2.mpz(P)
_A = gmpy2.mpz(A)


def is_on_curve(u: int) -> bool:
    """True if u is the u-coordinate of a point on Curve25519 (not on its twist)."""
    x = gmpy2.mpz(u)
    f = (x * (x * (x + _A) + 1)) % _P
    return bool(gmpy2.legendre(f, _P) >= 0)


def is_acceptable(u: int) -> bool:
    return u < P and u not in LOW_ORDER_U and is_on_curve(u)


def hash_to_curve(salt: bytes, digits: bytes) -> tuple[bytes, int]:
    """Map canonical digits to a curve point; returns (u as 32 bytes LE, counter used)."""
    prefix = DOMAIN + digits
    for counter in range(MAX_COUNTER):
        h = bytearray(blake3.blake3(prefix + counter.to_bytes(4, "little"), key=salt).digest())
        h[31] &= 0x7F
        if is_acceptable(int.from_bytes(h, "little")):
            return bytes(h), counter
    raise ArithmeticError("hash-to-curve found no point")  # pragma: no cover


def hash_to_curve_many(salt: bytes, digits: Sequence[bytes]) -> bytes:
    return b"".join(hash_to_curve(salt, d)[0] for d in digits)


def x25519_many(scalar: bytes, packed: bytes, out_bytes: int = POINT_BYTES) -> bytes:
    """X25519(scalar, u) for every 32-byte u in `packed`, each output cut to `out_bytes`.

    A low-order input (whose result would be all zeros) raises
    `InvalidBlindedValue` naming its position in `packed`.
    """
    if len(packed) % POINT_BYTES:
        raise InvalidBlindedValue(
            f"packed values are {len(packed)} bytes, not a multiple of {POINT_BYTES}"
        )
    key = X25519PrivateKey.from_private_bytes(scalar)
    exchange = key.exchange
    from_bytes = X25519PublicKey.from_public_bytes
    out = bytearray()
    for pos in range(0, len(packed), POINT_BYTES):
        try:
            out += exchange(from_bytes(packed[pos : pos + POINT_BYTES]))[:out_bytes]
        except ValueError as exc:
            raise InvalidBlindedValue(
                f"value {pos // POINT_BYTES} is a low-order point and cannot be blinded"
            ) from exc
    return bytes(out)


def hash_and_blind_many(salt: bytes, scalar: bytes, digits: Sequence[bytes]) -> bytes:
    return x25519_many(scalar, hash_to_curve_many(salt, digits))
