"""The X25519 backends give identical bytes; the fallback is taken cleanly."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from ispf.errors import BackendUnavailable, InvalidBlindedValue
from ispf.hazmat import backends, curve
from ispf.hazmat.backends import (
    CryptographyBackend,
    IfmaBackend,
    X25519Backend,
    cpu_has_ifma,
)

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "hash_to_curve.json").read_text())


FAST = {"ifma": IfmaBackend.load}


@pytest.fixture(params=sorted(FAST))
def mb(request: pytest.FixtureRequest) -> X25519Backend:
    """Each fast backend in turn, checked against cryptography's."""
    try:
        return FAST[request.param]()
    except BackendUnavailable as exc:
        pytest.skip(f"{request.param} backend unavailable here: {exc.message}")


def test_both_backends_reproduce_the_published_vectors(mb: X25519Backend) -> None:
    a, b = bytes.fromhex(VECTORS["scalar_a"]), bytes.fromhex(VECTORS["scalar_b"])
    us = b"".join(bytes.fromhex(v["u"]) for v in VECTORS["vectors"])
    for impl in (CryptographyBackend(), mb):
        got_a = impl.many(a, us, 32)
        assert got_a.hex() == "".join(v["blinded_a"] for v in VECTORS["vectors"])
        tags = impl.many(b, got_a, 16)
        assert tags.hex() == "".join(v["tag_ab"] for v in VECTORS["vectors"])


# (ifma shares one inversion among 512 values: sizes around that, and past it)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 511, 512, 513, 1001])
def test_identical_bytes_on_random_inputs(n: int, mb: X25519Backend) -> None:
    rng = random.Random(n)
    scalar = rng.randbytes(32)
    salt = rng.randbytes(32)
    points = curve.hash_to_curve_many(
        salt, [f"3520{rng.randrange(10**9):09d}".encode() for _ in range(n)]
    )
    for width in (32, 16):
        assert mb.many(scalar, points, width) == CryptographyBackend().many(scalar, points, width)
    # Arbitrary 32-byte strings too (twist points included).
    raw = os.urandom(32 * n)
    assert mb.many(scalar, raw, 32) == CryptographyBackend().many(scalar, raw, 32)


@pytest.mark.parametrize("position", [0, 5, 8, 13])
def test_low_order_points_are_refused_at_the_same_position(
    position: int, mb: X25519Backend
) -> None:
    good = curve.hash_to_curve_many(b"k" * 32, [f"352021234567{i}".encode() for i in range(16)])
    for u in sorted(curve.LOW_ORDER_U):
        bad = good[: 32 * position] + u.to_bytes(32, "little") + good[32 * position + 32 :]
        messages = []
        for impl in (CryptographyBackend(), mb):
            with pytest.raises(InvalidBlindedValue) as info:
                impl.many(b"s" * 32, bad, 16)
            messages.append(info.value.message)
        assert (
            messages[0]
            == messages[1]
            == (f"value {position} is a low-order point and cannot be blinded")
        )


@pytest.mark.parametrize("position", [511, 512, 700, 1099])
def test_low_order_point_past_the_first_batch_is_refused_at_its_position(
    position: int, mb: X25519Backend
) -> None:
    good = curve.hash_to_curve_many(b"k" * 32, [f"35202{i:08d}".encode() for i in range(1100)])
    bad = good[: 32 * position] + bytes(32) + good[32 * position + 32 :]
    with pytest.raises(InvalidBlindedValue) as info:
        mb.many(b"s" * 32, bad, 16)
    assert info.value.message == f"value {position} is a low-order point and cannot be blinded"


def test_auto_takes_ifma_where_it_runs_else_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_loaded", {})
    # auto takes the native ladder where it runs...
    try:
        IfmaBackend.load()
        assert backends.select("auto").name == "ifma"
    except BackendUnavailable:
        assert backends.select("auto").name == "cryptography"
    # ... and cryptography where the native module is not built.
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(curve, "native", None)
    assert backends.select("auto").name == "cryptography"
    with pytest.raises(BackendUnavailable, match="native module is not built"):
        backends.select("ifma")


def test_the_removed_multibuffer_backend_is_a_clear_config_error() -> None:
    """(Changed: the multibuffer backend is gone; naming it says why and what to use.)"""
    from ispf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"multibuffer backend .* was removed.*use auto, ifma"):
        backends.select("multibuffer")


def test_ifma_is_not_used_on_a_cpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    if curve.native is None:
        pytest.skip("native module not built")
    monkeypatch.setattr(backends, "cpu_has_ifma", lambda: False)
    with pytest.raises(BackendUnavailable, match="lacks AVX-512 IFMA"):
        IfmaBackend.load()


def test_cpu_without_ifma_is_never_asked(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f\n")
    assert not cpu_has_ifma(info)
    info.write_text("processor : 0\nflags : fpu avx512f avx512ifma\n")
    assert cpu_has_ifma(info)


def test_unknown_backend_name_is_a_clear_error() -> None:
    from ispf.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown blinding backend 'gpu'"):
        backends.select("gpu")


def test_every_encoding_of_a_low_order_point_is_refused_by_both(mb: X25519Backend) -> None:
    for enc in sorted(backends.LOW_ORDER_ENCODINGS):
        for impl in (CryptographyBackend(), mb):
            with pytest.raises(InvalidBlindedValue):
                impl.many(b"s" * 32, enc, 32)


RFC7748_PAIRS = [  # RFC 7748, section 5.2: scalar, u, X25519(scalar, u)
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
]


def test_rfc7748_vectors(mb: X25519Backend) -> None:
    for scalar, u, out in RFC7748_PAIRS:
        assert mb.many(bytes.fromhex(scalar), bytes.fromhex(u), 32).hex() == out
    # The iterated test, 1,000 rounds: k, u <- X25519(k, u), k.
    k = u = (9).to_bytes(32, "little")
    for _ in range(1000):
        k, u = mb.many(k, u, 32), k
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


def test_non_canonical_and_high_bit_encodings_match(mb: X25519Backend) -> None:
    """RFC 7748 decoding: the top bit is ignored and values from p up are reduced.
    Also values whose limbs sit at the carry bounds of the ifma code."""
    p = 2**255 - 19
    rng = random.Random(7)
    values = [p + d for d in range(2, 19)] + [rng.randrange(2**255) | 2**255 for _ in range(40)]
    # Values whose 52-bit limbs sit at their bounds (the IFMA code's carries; the
    # top limb holds 47 bits).
    values += [sum(((1 << 52) - 1 - t) << (52 * k) for k in range(5)) % 2**255 for t in range(9)]
    values += [(1 << 52) * j for j in range(1, 9)] + [2**255 - 1 - i for i in range(22, 30)]
    values += [2**m - 1 for m in range(80, 100)] + [p - 2**k - 1 for k in range(2, 120)]
    packed = b"".join(v.to_bytes(32, "little") for v in values)
    for scalar in (rng.randbytes(32), bytes(32), b"\xff" * 32):
        assert mb.many(scalar, packed, 32) == CryptographyBackend().many(scalar, packed, 32)


def rfc7748_ladder(scalar: bytes, u: bytes) -> bytes:
    """X25519 as RFC 7748 writes it, in Python integers: the reference."""
    p = 2**255 - 19
    k = bytearray(scalar)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    n = int.from_bytes(k, "little")
    x1 = (int.from_bytes(u, "little") & (2**255 - 1)) % p
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b, c, d = (x2 + z2) % p, (x2 - z2) % p, (x3 + z3) % p, (x3 - z3) % p
        aa, bb, da, cb = a * a % p, b * b % p, d * a % p, c * b % p
        e = (aa - bb) % p
        x3, z3 = (da + cb) ** 2 % p, x1 * (da - cb) ** 2 % p
        x2, z2 = aa * bb % p, e * (aa + 121665 * e) % p
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, p - 2, p) % p).to_bytes(32, "little")


def test_structured_inputs_the_removed_multibuffer_got_wrong(mb: X25519Backend) -> None:
    """Intel's mbx_x25519_mb8 (the removed multibuffer backend) got X25519(0^32, p - 4)
    and some 2^k - 1 wrong; ifma agrees with cryptography and the RFC's own ladder."""
    p = 2**255 - 19
    for scalar in (bytes(32), b"\x01" * 32):
        for v in (p - 4, 2**88 - 1, 2**255 - 1):
            u = v.to_bytes(32, "little")
            want = rfc7748_ladder(scalar, u)
            assert CryptographyBackend().many(scalar, u, 32) == want
            assert mb.many(scalar, u, 32) == want


def test_self_check_passes_for_the_real_backends(mb: X25519Backend) -> None:
    assert backends.self_check(CryptographyBackend()) is None
    assert backends.self_check(mb) is None


class _OneWrongValue:
    """The native module, but the output at `at` of every batch of `n` or more is wrong."""

    def __init__(self, at: int) -> None:
        self.at = at

    def x25519_many(self, scalar: bytes, packed: bytes, out_bytes: int) -> tuple[bytes, int]:
        out, bad = curve.native.x25519_many(scalar, packed, out_bytes)  # type: ignore[union-attr]
        if bad < 0 and len(out) > out_bytes * self.at:
            i = out_bytes * self.at
            out = out[:i] + bytes([out[i] ^ 0x80]) + out[i + 1 :]
        return out, bad


def test_self_check_finds_a_wrong_structured_value(mb: X25519Backend) -> None:
    """One wrong output among the cross-check's 1,236 values (512 random, 724
    structured) is found and named."""
    broken = IfmaBackend(_OneWrongValue(700), check_every=0)  # type: ignore[arg-type]
    assert broken.many(b"s" * 32, b"\x09" + bytes(31), 32)  # (one value: right)
    assert backends.self_check(broken) == (
        "value 700 of the cross-check against cryptography is wrong"
    )
    assert backends.self_check(IfmaBackend(_OneWrongValue(0), check_every=0)) == (  # type: ignore[arg-type]
        "known answer 0 (RFC 7748) is wrong"
    )


def test_spot_checks_recompute_about_one_output_in_4096(
    mb: X25519Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backends, "STATUS", backends.BackendStatus())
    ifma = IfmaBackend(curve.native)  # type: ignore[arg-type]
    points = curve.hash_to_curve_many(b"k" * 32, [f"35202{i:08d}".encode() for i in range(4096)])
    for _ in range(40):
        ifma.many(b"s" * 32, points, 16)
    assert 10 < backends.STATUS.spot_checks < 90  # 40 expected (Poisson, sd ~6)
    never = IfmaBackend(curve.native, check_every=0)  # type: ignore[arg-type]
    before = backends.STATUS.spot_checks
    never.many(b"s" * 32, points, 16)
    assert backends.STATUS.spot_checks == before


def test_a_spot_check_mismatch_raises_and_falls_back(
    mb: X25519Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ispf.errors import SelfCheckFailed

    monkeypatch.setattr(backends, "STATUS", backends.BackendStatus())
    broken = IfmaBackend(_OneWrongValue(3), check_every=1)  # type: ignore[arg-type]
    points = curve.hash_to_curve_many(b"k" * 32, [f"35202{i:08d}".encode() for i in range(8)])
    with (
        caplog.at_level("ERROR", logger="ispf.hazmat.backends"),
        pytest.raises(SelfCheckFailed, match="disagreed with cryptography on value 3 of"),
    ):
        broken.many(b"s" * 32, points, 32)
    assert not broken.healthy and not backends.STATUS.healthy
    assert backends.STATUS.mismatches == 1
    assert "marked unhealthy" in caplog.text
    # From now on: cryptography's results.
    assert broken.many(b"s" * 32, points, 32) == CryptographyBackend().many(b"s" * 32, points, 32)
