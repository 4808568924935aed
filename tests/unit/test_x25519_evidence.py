"""The evidence behind the project's own X25519, in Python (docs/security.md, "The
project's own X25519"): Wycheproof's 518 cases and RFC 7748's iterated test
against every backend, and a differential test of the `ifma` ladder against
`cryptography` (OpenSSL) on random and structured inputs, seeded afresh each run.

`make test-slow` runs the long versions (ISPF_X25519_SLOW=1): 1,000,000
iterations and 1,000,000 differential pairs. A failing differential run prints
its seed; ISPF_X25519_SEED=<seed> replays it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from ispf.errors import BackendUnavailable, InvalidBlindedValue
from ispf.hazmat.backends import (
    CryptographyBackend,
    IfmaBackend,
    X25519Backend,
    edge_values,
)

WYCHEPROOF = Path(__file__).parent.parent / "vectors" / "wycheproof" / "x25519_test.json"
SLOW = pytest.mark.skipif(
    os.environ.get("ISPF_X25519_SLOW") != "1", reason="long run: make test-slow"
)


def _ifma() -> X25519Backend:
    try:
        return IfmaBackend.load()
    except BackendUnavailable as exc:
        pytest.skip(f"ifma backend unavailable here: {exc.message}")


@pytest.fixture(params=["cryptography", "ifma"])
def backend(request: pytest.FixtureRequest) -> X25519Backend:
    return CryptographyBackend() if request.param == "cryptography" else _ifma()


def wycheproof_cases() -> Iterator[dict[str, str]]:
    data = json.loads(WYCHEPROOF.read_text())
    for group in data["testGroups"]:
        assert group["curve"] == "curve25519"
        yield from group["tests"]


def test_the_wycheproof_file_is_whole() -> None:
    cases = list(wycheproof_cases())
    assert len(cases) == json.loads(WYCHEPROOF.read_text())["numberOfTests"] == 518
    assert sum(c["shared"] == "00" * 32 for c in cases) == 31  # the refusals below


def test_wycheproof(backend: X25519Backend) -> None:
    """Every case: the expected shared secret, or (all-zero result: a low-order
    input) a refusal naming the value's position."""
    checked = refused = 0
    for case in wycheproof_cases():
        scalar, u = bytes.fromhex(case["private"]), bytes.fromhex(case["public"])
        where = f"Wycheproof tcId {case['tcId']} ({case['comment']})"
        if case["shared"] == "00" * 32:
            with pytest.raises(InvalidBlindedValue) as info:
                backend.many(scalar, u, 32)
            assert info.value.message == "value 0 is a low-order point and cannot be blinded"
            refused += 1
        else:
            assert backend.many(scalar, u, 32).hex() == case["shared"], where
            checked += 1
    assert (checked, refused) == (487, 31)


def test_wycheproof_in_one_batch_refuses_the_first_low_order_value() -> None:
    """The same cases through the eight-lane batches: the results of one scalar's
    many values at once, and the position of a low-order one among them."""
    ifma = _ifma()
    cases = [c for c in wycheproof_cases() if c["shared"] != "00" * 32]
    zero = next(c for c in wycheproof_cases() if c["shared"] == "00" * 32)
    for case in cases[:40]:
        scalar = bytes.fromhex(case["private"])
        values = b"".join(bytes.fromhex(c["public"]) for c in cases)
        want = CryptographyBackend().many(scalar, values, 32)
        assert ifma.many(scalar, values, 32) == want
        bad = values[: 32 * 77] + bytes.fromhex(zero["public"]) + values[32 * 77 :]
        with pytest.raises(InvalidBlindedValue, match=r"^value 77 is a low-order point"):
            ifma.many(scalar, bad, 32)


def iterate(backend: X25519Backend, rounds: int) -> str:
    """RFC 7748 section 5.2: k = u = 9; then k, u = X25519(k, u), k."""
    k = u = (9).to_bytes(32, "little")
    for _ in range(rounds):
        k, u = backend.many(k, u, 32), k
    return k.hex()


def test_rfc7748_iterated_1000(backend: X25519Backend) -> None:
    assert iterate(backend, 1) == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    assert (
        iterate(backend, 1000) == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"
    )


@SLOW
@pytest.mark.x25519_slow
def test_rfc7748_iterated_1000000(backend: X25519Backend) -> None:
    assert (
        iterate(backend, 1_000_000)
        == "7c3911e0ab2586fd864497297e575e6f3bc601c0883c30df5f4dd2d24f665424"
    )


def _seed() -> int:
    seed = int(os.environ.get("ISPF_X25519_SEED") or int.from_bytes(os.urandom(8), "big"))
    print(f"differential test seed: {seed} (ISPF_X25519_SEED={seed} replays it)")
    return seed


def differential(pairs: int, per_scalar: int = 256) -> None:
    """`pairs` random (scalar, u) pairs, `per_scalar` values under each random
    scalar (one eight-lane batch call each), then every structured value under
    structured and random scalars; each compared with cryptography."""
    seed = _seed()
    rng = random.Random(seed)
    ifma, ref = _ifma(), CryptographyBackend()
    for start in range(0, pairs, per_scalar):
        scalar = rng.randbytes(32)
        values = rng.randbytes(32 * min(per_scalar, pairs - start))
        got, want = ifma.many(scalar, values, 32), ref.many(scalar, values, 32)
        if got != want:
            at = next(i for i in range(0, len(got), 32) if got[i : i + 32] != want[i : i + 32])
            pytest.fail(f"seed {seed}: pair {start + at // 32} differs from cryptography")
    edges = b"".join(v.to_bytes(32, "little") for v in edge_values())
    edges += b"".join((v | 2**255).to_bytes(32, "little") for v in edge_values()[:64])
    scalars = [bytes(32), b"\xff" * 32, b"\x01" + bytes(31), bytes(31) + b"\x80"]
    scalars += [rng.randbytes(32) for _ in range(4)]
    for scalar in scalars:
        assert ifma.many(scalar, edges, 32) == ref.many(scalar, edges, 32), f"seed {seed}"


def test_differential_against_cryptography_100000_pairs() -> None:
    differential(100_352)


@SLOW
@pytest.mark.x25519_slow
def test_differential_against_cryptography_1000000_pairs() -> None:
    differential(1_000_000)
