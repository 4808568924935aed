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

import os
from collections.abc import Iterable, Sequence
from types import ModuleType

import blake3
import gmpy2

from ispf.nid import NID_BYTES, PackedNids


def _load_native() -> ModuleType | None:
    """The C module built from _native.c, unless absent or ISPF_NATIVE=0."""
    if os.environ.get("ISPF_NATIVE", "1") == "0":
        return None
    try:
        from ispf.hazmat import _native  # type: ignore[attr-defined]
    except ImportError:  # built without a C compiler: the Python code below is used
        return None
    return _native  # type: ignore[no-any-return]


native = _load_native()

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


_MASK = (1 << 255) - 1
_COUNTERS = [c.to_bytes(4, "little") for c in range(8)]


def hash_to_curve_many(salt: bytes, digits: Sequence[bytes] | PackedNids) -> bytes:
    """`hash_to_curve` for many IDs, packed: in C when the native module is built."""
    if native is not None:
        if isinstance(digits, PackedNids):
            return native.hash_to_curve_many(salt, digits.data, -1, NID_BYTES)  # type: ignore[no-any-return]
        return native.hash_to_curve_many(salt, digits)  # type: ignore[no-any-return]
    return hash_to_curve_many_py(salt, digits)


def hash_to_curve_many_py(salt: bytes, digits: Iterable[bytes]) -> bytes:
    """The pure-Python `hash_to_curve_many` (kept lean; the reference for the C code)."""
    out = []
    new, legendre, mpz, from_bytes = blake3.blake3, gmpy2.legendre, gmpy2.mpz, int.from_bytes
    for d in digits:
        prefix = DOMAIN + d
        for counter in range(MAX_COUNTER):
            suffix = _COUNTERS[counter] if counter < 8 else counter.to_bytes(4, "little")
            u = from_bytes(new(prefix + suffix, key=salt).digest(), "little") & _MASK
            if u < P and u not in LOW_ORDER_U:
                x = mpz(u)
                if legendre(x * (x * (x + _A) + 1) % _P, _P) >= 0:
                    out.append(u.to_bytes(32, "little"))
                    break
        else:  # pragma: no cover - each try succeeds with probability ~1/2
            raise ArithmeticError("hash-to-curve found no point")
    return b"".join(out)


def x25519_many(
    scalar: bytes, packed: bytes, out_bytes: int = POINT_BYTES, backend: str = "auto"
) -> bytes:
    """X25519(scalar, u) for every 32-byte u in `packed`, each output cut to `out_bytes`.

    A low-order input (whose result would be all zeros) raises
    `InvalidBlindedValue` naming its position in `packed`. `backend` picks the
    implementation (see `ispf.hazmat.backends`); all give the same bytes.
    """
    from ispf.hazmat.backends import select

    return select(backend).many(scalar, packed, out_bytes)


def hash_and_blind_many(
    salt: bytes, scalar: bytes, digits: Sequence[bytes] | PackedNids, backend: str = "auto"
) -> bytes:
    return x25519_many(scalar, hash_to_curve_many(salt, digits), backend=backend)
