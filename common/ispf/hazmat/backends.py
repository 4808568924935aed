"""X25519 backends, one chosen at start-up (`select`).

* ``cryptography``: the portable fallback, one exchange per call (OpenSSL).
* ``ifma``: this project's own eight-lane Montgomery ladder in the optional C
  module (``ispf.hazmat._native``, built at install where a C compiler is
  present), for CPUs with AVX-512 IFMA. Open source like the rest of the
  default install; no third-party library.
* ``multibuffer``: ``mbx_x25519_mb8`` from ``libcrypto_mb.so`` (the ``ipp-crypto``
  wheel, installed with ``pip install .[fast]``), eight exchanges per call with
  AVX-512 IFMA. Its runtime libraries (``intel-cmplr-lib-rt``: libintlc, libsvml,
  libimf, libirng) are loaded explicitly, by path, before it; nothing relies on
  ``LD_LIBRARY_PATH``. Used only if the CPU has AVX-512 IFMA (checked before any
  call: the code would fault without it).

``cryptography`` and ``ifma`` give byte-identical results on every input the
tests try (published vectors, random inputs, limb-boundary values); so does
``multibuffer`` on random inputs, but not on some structured ones (below). All
refuse a low-order input by its position.
``auto`` takes ``ifma`` where it runs, else ``cryptography``; ``multibuffer`` only
when named (it deviates from RFC 7748 on some inputs: see MULTIBUFFER_DEFECT).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ispf.errors import ConfigError, InvalidBlindedValue

log = logging.getLogger(__name__)
POINT = 32
RUNTIME_LIBS = ("libintlc.so.5", "libsvml.so", "libimf.so", "libirng.so")
BASEPOINT = (9).to_bytes(32, "little")  # pads the last call of eight


class BackendUnavailable(ConfigError):
    """The requested backend cannot be used here; the message says why."""


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


def library_dirs() -> list[Path]:
    """Where the ipp-crypto and intel-cmplr-lib-rt wheels put their libraries."""
    dirs = [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


P = 2**255 - 19
# Every 32-byte encoding of a low-order point (the top bit is ignored by X25519, and
# values >= p are reduced): refused before the multi-buffer code sees them, since it
# does not map all of them to zero.
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


class MultiBufferBackend:
    name = "multibuffer"

    def __init__(self, lib: ctypes.CDLL, where: Path) -> None:
        self._fn = lib.mbx_x25519_mb8
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._fn.restype = ctypes.c_uint64
        self._address = ctypes.cast(self._fn, ctypes.c_void_p).value
        self.where = where

    @classmethod
    def load(
        cls, dirs: Iterable[Path] | None = None, *, check_cpu: bool = True
    ) -> MultiBufferBackend:
        if check_cpu and not cpu_has_ifma():
            raise BackendUnavailable("the CPU lacks AVX-512 IFMA")
        for d in dirs if dirs is not None else library_dirs():
            if not (d / "libcrypto_mb.so").exists():
                continue
            try:
                for name in RUNTIME_LIBS:
                    ctypes.CDLL(str(d / name), mode=ctypes.RTLD_GLOBAL)
                return cls(ctypes.CDLL(str(d / "libcrypto_mb.so")), d)
            except OSError as exc:
                raise BackendUnavailable(f"libcrypto_mb.so in {d} does not load: {exc}") from exc
        raise BackendUnavailable(
            "libcrypto_mb.so not found (install the fast extra: pip install '.[fast]')"
        )

    def many(self, scalar: bytes, packed: bytes, out_bytes: int) -> bytes:
        _check_packed(packed)
        from ispf.hazmat.curve import native

        if native is not None:  # the same loop in C, without the GIL
            out, bad_at = native.mb8_many(self._address, scalar, packed, out_bytes)
            if bad_at >= 0:
                raise InvalidBlindedValue(
                    f"value {bad_at} is a low-order point and cannot be blinded"
                )
            return out  # type: ignore[no-any-return]
        return self._many_py(scalar, packed, out_bytes)

    def _many_py(self, scalar: bytes, packed: bytes, out_bytes: int) -> bytes:
        n = len(packed) // POINT
        if n == 0:
            return b""
        bad = LOW_ORDER_ENCODINGS
        for pos in range(0, len(packed), POINT):
            if packed[pos : pos + POINT] in bad:
                raise InvalidBlindedValue(
                    f"value {pos // POINT} is a low-order point and cannot be blinded"
                )
        lanes = -(-n // 8) * 8
        src = ctypes.create_string_buffer(packed + BASEPOINT * (lanes - n), lanes * POINT)
        dst = ctypes.create_string_buffer(lanes * POINT)
        key = ctypes.create_string_buffer(scalar, POINT)
        ptrs = ctypes.c_void_p * lanes
        src_p = ptrs(*range(ctypes.addressof(src), ctypes.addressof(src) + lanes * POINT, POINT))
        dst_p = ptrs(*range(ctypes.addressof(dst), ctypes.addressof(dst) + lanes * POINT, POINT))
        key_p = (ctypes.c_void_p * 8)(*([ctypes.addressof(key)] * 8))
        fn, sp, dp, kp, step = (
            self._fn,
            ctypes.addressof(src_p),
            ctypes.addressof(dst_p),
            ctypes.addressof(key_p),
            8 * ctypes.sizeof(ctypes.c_void_p),
        )
        for k in range(lanes // 8):
            status = fn(dp + k * step, kp, sp + k * step)
            if status:
                lane = next(i for i in range(8) if (status >> (4 * i)) & 0xF)
                pos = k * 8 + lane
                if pos < n:
                    raise InvalidBlindedValue(
                        f"value {pos} is a low-order point and cannot be blinded"
                    )
        raw = dst.raw
        # RFC 7748: an all-zero result means a low-order input; not every such input
        # sets the status, so look at the outputs themselves (aligned 32-byte blocks).
        zero, at = bytes(POINT), raw.find(bytes(POINT))
        while 0 <= at < n * POINT:
            if at % POINT == 0:
                raise InvalidBlindedValue(
                    f"value {at // POINT} is a low-order point and cannot be blinded"
                )
            at = raw.find(zero, at + 1)
        if out_bytes == POINT:
            return raw[: n * POINT]
        return b"".join(raw[i : i + out_bytes] for i in range(0, n * POINT, POINT))


class IfmaBackend:
    """X25519 on eight lanes in the project's own C module (AVX-512 IFMA)."""

    name = "ifma"

    def __init__(self, module: ModuleType) -> None:
        self._native = module

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

    def many(self, scalar: bytes, packed: bytes, out_bytes: int) -> bytes:
        _check_packed(packed)
        out, bad_at = self._native.x25519_many(scalar, packed, out_bytes)
        if bad_at >= 0:
            raise InvalidBlindedValue(f"value {bad_at} is a low-order point and cannot be blinded")
        return out  # type: ignore[no-any-return]


CHOICES = ("auto", "multibuffer", "ifma", "cryptography")
_loaded: dict[str, X25519Backend] = {}


def select(choice: str = "auto") -> X25519Backend:
    """The backend for this process: "auto" (fastest that works), or one by name."""
    if choice in _loaded:
        return _loaded[choice]
    backend: X25519Backend
    if choice == "cryptography":
        backend = CryptographyBackend()
    elif choice == "multibuffer":
        backend = MultiBufferBackend.load()
        log.warning("X25519 backend multibuffer, as configured: %s", MULTIBUFFER_DEFECT)
    elif choice == "ifma":
        backend = IfmaBackend.load()
    elif choice == "auto":
        backend = _first_available()
    else:
        raise ConfigError(f"unknown blinding backend '{choice}' (one of: {', '.join(CHOICES)})")
    _loaded[choice] = backend
    return backend


def _first_available() -> X25519Backend:
    """`ifma` where it runs, else `cryptography`. Never `multibuffer` (see below)."""
    try:
        return IfmaBackend.load()
    except BackendUnavailable as exc:
        log.info("ifma X25519 unavailable (%s): using cryptography", exc.message)
        return CryptographyBackend()


# Intel's mbx_x25519_mb8 (ipp-crypto 2026.2.0 here) returns values that differ from
# RFC 7748 (and from OpenSSL, from this project's ladder and from a textbook one)
# for some inputs: u-coordinates with long runs of one bits, such as p - 4 or
# 2^88 - 1, under some scalars. Uniform inputs (hash-to-curve outputs) did not hit
# it in millions of tries, but a peer chooses the values a node re-blinds, and a
# wrong ladder result under the node's secret scalar is not a risk to take. So it
# is used only where a node's configuration names it.
MULTIBUFFER_DEFECT = (
    "mbx_x25519_mb8 differs from RFC 7748 for some inputs (values a peer can choose); "
    "'auto' does not use it"
)
