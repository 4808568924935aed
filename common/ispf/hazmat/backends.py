"""X25519 backends, one chosen at start-up (`select`).

* ``cryptography``: the portable fallback, one exchange per call (OpenSSL).
* ``ifma``: this project's own eight-lane Montgomery ladder in the optional C
  module (``ispf.hazmat._native``, built at install where a C compiler is
  present), for CPUs with AVX-512 IFMA. Open source like the rest of the
  default install; no third-party library.

Both give byte-identical results on every input the tests try (RFC 7748's
vectors, Wycheproof's, random and structured inputs, limb-boundary values) and
refuse a low-order input by its position. ``auto`` takes ``ifma`` where it runs,
else ``cryptography``.

``ifma`` proves itself while the node runs (docs/security.md, "The project's own
X25519"): before it is used, known-answer tests and a random cross-check against
``cryptography`` (`self_check`); on any mismatch the node falls back to
``cryptography`` and says so in its log, in health and in a metric
(`STATUS`). While it serves, about one output in `SPOT_CHECK_EVERY` is computed
again with ``cryptography``; a mismatch fails that call (and so the session)
with `SelfCheckFailed` and marks the backend unhealthy: from then on the node
computes X25519 with ``cryptography``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ispf.errors import BackendUnavailable, ConfigError, InvalidBlindedValue, SelfCheckFailed

log = logging.getLogger(__name__)
POINT = 32
SPOT_CHECK_EVERY = 4096  # one output in this many is recomputed with cryptography


class X25519Backend(Protocol):
    name: str

    def many(self, scalar: bytes, packed: bytes, out_bytes: int) -> bytes: ...


def _check_packed(packed: bytes) -> None:
    if len(packed) % POINT:
        raise InvalidBlindedValue(
            f"packed values are {len(packed)} bytes, not a multiple of {POINT}"
        )


class CryptographyBackend:
    name = "cryptography"

    def many(self, scalar: bytes, packed: bytes, out_bytes: int) -> bytes:
        _check_packed(packed)
        key = X25519PrivateKey.from_private_bytes(scalar)
        exchange, from_bytes = key.exchange, X25519PublicKey.from_public_bytes
        out = bytearray()
        for pos in range(0, len(packed), POINT):
            try:
                out += exchange(from_bytes(packed[pos : pos + POINT]))[:out_bytes]
            except ValueError as exc:
                raise InvalidBlindedValue(
                    f"value {pos // POINT} is a low-order point and cannot be blinded"
                ) from exc
        return bytes(out)


def cpu_has_ifma(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "avx512ifma" in line.split() for line in text.splitlines()
    )


P = 2**255 - 19
# u-coordinates of the low-order points (canonical) and every 32-byte encoding of
# them (the top bit is ignored by X25519, and values >= p are reduced).
_LOW_ORDER = (
    0,
    1,
    P - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
)
LOW_ORDER_ENCODINGS = frozenset(
    (v | top).to_bytes(32, "little")
    for u in _LOW_ORDER
    for v in (u, u + P)
    if v < 2**255
    for top in (0, 2**255)
)


@dataclass
class BackendStatus:
    """What the node reports about its X25519 (log, health, metrics)."""

    name: str = "cryptography"
    healthy: bool = True
    reason: str = ""
    mismatches: int = 0  # outputs a self-check found wrong (start-up and sessions)
    spot_checks: int = 0  # outputs recomputed with cryptography while serving


STATUS = BackendStatus()
_status_lock = threading.Lock()


class IfmaBackend:
    """X25519 on eight lanes in the project's own C module (AVX-512 IFMA).

    About one output in `check_every` is recomputed with `cryptography` (0: none);
    a mismatch raises `SelfCheckFailed` and marks this backend unhealthy, after
    which every call is computed with `cryptography` instead."""

    name = "ifma"

    def __init__(self, module: ModuleType, check_every: int = SPOT_CHECK_EVERY) -> None:
        self._native = module
        self.check_every = check_every
        self.healthy = True
        self._rng = random.Random(os.urandom(16))
        self._lock = threading.Lock()
        self._next_check = self._gap()

    @classmethod
    def load(cls, *, check_cpu: bool = True) -> IfmaBackend:
        from ispf.hazmat.curve import native

        if native is None:
            raise BackendUnavailable(
                "the native module is not built (no C compiler at install, or ISPF_NATIVE=0)"
            )
        if check_cpu and not (cpu_has_ifma() and native.vector_available()):
            raise BackendUnavailable("the CPU lacks AVX-512 IFMA")
        return cls(native)

    def _gap(self) -> int:
        """Values until the next spot check: geometric, mean `check_every`."""
        if self.check_every <= 0:
            return 2**62
        if self.check_every == 1:
            return 0
        u = self._rng.random()
        return int(math.log1p(-u) / math.log1p(-1 / self.check_every))

    def many(self, scalar: bytes, packed: bytes, out_bytes: int) -> bytes:
        _check_packed(packed)
        if not self.healthy:
            return CryptographyBackend().many(scalar, packed, out_bytes)
        out, bad_at = self._native.x25519_many(scalar, packed, out_bytes)
        if bad_at >= 0:
            raise InvalidBlindedValue(f"value {bad_at} is a low-order point and cannot be blinded")
        n = len(packed) // POINT
        with self._lock:
            picks = []
            while self._next_check < n:
                picks.append(self._next_check)
                self._next_check += 1 + self._gap()
            self._next_check -= n
        if picks:
            self._spot_check(scalar, packed, out, out_bytes, picks)
        return out  # type: ignore[no-any-return]

    def _spot_check(
        self, scalar: bytes, packed: bytes, out: bytes, out_bytes: int, picks: list[int]
    ) -> None:
        key = X25519PrivateKey.from_private_bytes(scalar)
        with _status_lock:
            STATUS.spot_checks += len(picks)
        for i in picks:
            u = X25519PublicKey.from_public_bytes(packed[POINT * i : POINT * (i + 1)])
            if key.exchange(u)[:out_bytes] != out[out_bytes * i : out_bytes * (i + 1)]:
                self.mark_unhealthy(f"output {i} of a batch of {len(packed) // POINT}")
                raise SelfCheckFailed(
                    f"X25519 backend {self.name} disagreed with cryptography on value {i} "
                    f"of this batch; the result is not trusted, and the node now computes "
                    f"X25519 with cryptography"
                )

    def mark_unhealthy(self, where: str) -> None:
        self.healthy = False
        with _status_lock:
            STATUS.mismatches += 1
            first = STATUS.healthy
            STATUS.healthy = False
            STATUS.reason = f"{self.name} disagreed with cryptography in a session ({where})"
        if first:
            log.error(
                "X25519 backend %s disagreed with cryptography on %s: marked unhealthy, "
                "computing X25519 with cryptography from now on",
                self.name,
                where,
            )


# Known answers (RFC 7748, sections 5.2 and 6.1): scalar, u, X25519(scalar, u).
KNOWN_ANSWERS = (
    (
        "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
        "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
    ),
    (
        "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
        "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
        "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
    ),
    (  # the iterated test after one round: X25519(9, 9)
        "0900000000000000000000000000000000000000000000000000000000000000",
        "0900000000000000000000000000000000000000000000000000000000000000",
        "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079",
    ),
    (  # Alice's public key, then the shared secret with Bob's
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        "0900000000000000000000000000000000000000000000000000000000000000",
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
    ),
    (
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742",
    ),
)


def edge_values() -> list[int]:
    """Structured u-coordinates a peer could choose: near p and 2^255, long runs of
    one bits, and values whose 52-bit limbs sit at the ladder's carry bounds."""
    values = [P + d for d in range(2, 19)] + [P - d for d in range(2, 40)]
    values += [sum(((1 << 52) - 1 - t) << (52 * k) for k in range(5)) % 2**255 for t in range(9)]
    values += [(1 << 52) * j for j in range(1, 9)] + [2**255 - 1 - i for i in range(22, 30)]
    values += [2**m - 1 for m in range(80, 100)] + [P - 2**k - 1 for k in range(2, 120)]
    values += [2**k for k in range(2, 255)] + [2**255 - 2**k for k in range(1, 254)]
    out = []
    for v in values:
        enc = (v % 2**255).to_bytes(32, "little")
        if enc not in LOW_ORDER_ENCODINGS:
            out.append(v % 2**255)
    return out


def self_check(backend: X25519Backend, random_values: int = 512) -> str | None:
    """Known answers, then `random_values` random and the structured values against
    `cryptography` under random scalars; returns what disagreed, or None."""
    for n, (k, u, out) in enumerate(KNOWN_ANSWERS):
        if backend.many(bytes.fromhex(k), bytes.fromhex(u), POINT).hex() != out:
            return f"known answer {n} (RFC 7748) is wrong"
    reference = CryptographyBackend()
    values = os.urandom(POINT * random_values)
    values += b"".join(v.to_bytes(32, "little") for v in edge_values())
    for scalar in (os.urandom(32), b"\xff" * 32, bytes(32)):
        got, want = backend.many(scalar, values, POINT), reference.many(scalar, values, POINT)
        if got != want:
            at = next(i for i in range(0, len(got), POINT) if got[i : i + 32] != want[i : i + 32])
            return f"value {at // POINT} of the cross-check against cryptography is wrong"
    return None


CHOICES = ("auto", "ifma", "cryptography")
REMOVED = {
    "multibuffer": "the multibuffer backend (Intel's mbx_x25519_mb8) was removed: it returned "
    "wrong results for some inputs a peer can choose; use auto, ifma or cryptography"
}
_loaded: dict[str, X25519Backend] = {}


def select(choice: str = "auto") -> X25519Backend:
    """The backend for this process: "auto" (fastest that works), or one by name.

    `ifma`, named or taken by `auto`, must first pass `self_check`; where it does
    not, the node uses `cryptography` and `STATUS` says why."""
    if choice in _loaded:
        return _loaded[choice]
    backend: X25519Backend
    if choice == "cryptography":
        backend = CryptographyBackend()
    elif choice == "ifma":
        backend = _checked(IfmaBackend.load())
    elif choice == "auto":
        backend = _first_available()
    elif choice in REMOVED:
        raise ConfigError(REMOVED[choice])
    else:
        raise ConfigError(f"unknown blinding backend '{choice}' (one of: {', '.join(CHOICES)})")
    _loaded[choice] = backend
    _loaded.setdefault(backend.name, backend)  # one instance per backend: one health
    with _status_lock:
        STATUS.name = backend.name
    return backend


def _checked(backend: IfmaBackend) -> X25519Backend:
    """`backend` if it passes its self-check, else `cryptography` (logged, in STATUS)."""
    problem = self_check(backend)
    if problem is None:
        return backend
    with _status_lock:
        STATUS.healthy = False
        STATUS.mismatches += 1
        STATUS.reason = f"{backend.name} failed its start-up self-check ({problem})"
    log.error(
        "X25519 backend %s failed its start-up self-check (%s): using cryptography instead",
        backend.name,
        problem,
    )
    return CryptographyBackend()


def _first_available() -> X25519Backend:
    """`ifma` where it runs and passes its self-check, else `cryptography`."""
    try:
        return _checked(IfmaBackend.load())
    except BackendUnavailable as exc:
        log.info("ifma X25519 unavailable (%s): using cryptography", exc.message)
        return CryptographyBackend()
