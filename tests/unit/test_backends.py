"""The X25519 backends give identical bytes; the fallback is taken cleanly."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from ispf.errors import InvalidBlindedValue
from ispf.hazmat import backends, curve
from ispf.hazmat.backends import (
    BackendUnavailable,
    CryptographyBackend,
    MultiBufferBackend,
    cpu_has_ifma,
)

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "hash_to_curve.json").read_text())


def fast() -> MultiBufferBackend:
    try:
        return MultiBufferBackend.load()
    except BackendUnavailable as exc:
        pytest.skip(f"multi-buffer backend unavailable here: {exc.message}")


def test_both_backends_reproduce_the_published_vectors() -> None:
    mb = fast()
    a, b = bytes.fromhex(VECTORS["scalar_a"]), bytes.fromhex(VECTORS["scalar_b"])
    us = b"".join(bytes.fromhex(v["u"]) for v in VECTORS["vectors"])
    for impl in (CryptographyBackend(), mb):
        got_a = impl.many(a, us, 32)
        assert got_a.hex() == "".join(v["blinded_a"] for v in VECTORS["vectors"])
        tags = impl.many(b, got_a, 16)
        assert tags.hex() == "".join(v["tag_ab"] for v in VECTORS["vectors"])


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_identical_bytes_on_random_inputs(n: int) -> None:
    mb = fast()
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
def test_low_order_points_are_refused_at_the_same_position(position: int) -> None:
    mb = fast()
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


def test_fallback_when_the_library_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BackendUnavailable, match="not found"):
        MultiBufferBackend.load([tmp_path], check_cpu=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "libcrypto_mb.so").write_bytes(b"not a library")
    with pytest.raises(BackendUnavailable, match="does not load"):
        MultiBufferBackend.load([broken], check_cpu=False)
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "library_dirs", lambda: [tmp_path])
    assert backends.select("auto").name == "cryptography"
    with pytest.raises(BackendUnavailable):
        backends.select("multibuffer")


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


def test_every_encoding_of_a_low_order_point_is_refused_by_both() -> None:
    mb = fast()
    for enc in sorted(backends.LOW_ORDER_ENCODINGS):
        for impl in (CryptographyBackend(), mb):
            with pytest.raises(InvalidBlindedValue):
                impl.many(b"s" * 32, enc, 32)
