"""Hash-to-curve and blinding against the published vectors and an independent oracle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ispf import BlindingKey, ForumSalt, blind, canonicalise, hash_to_curve
from ispf.blinding import reblind, result_digest, tag_of
from ispf.errors import InvalidBlindedValue
from ispf.hazmat import curve

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "hash_to_curve.json").read_text())
P = 2**255 - 19


def legendre_pure(u: int) -> int:
    """Euler's criterion with plain pow: slow, independent of gmpy2."""
    f = (u * u * u + 486662 * u * u + u) % P
    if f == 0:
        return 0
    return 1 if pow(f, (P - 1) // 2, P) == 1 else -1


def reference_hash(salt: bytes, digits: str) -> tuple[bytes, int]:
    for counter in range(64):
        h = bytearray(
            blake3.blake3(
                b"ispf/nid/v1" + digits.encode() + counter.to_bytes(4, "little"), key=salt
            ).digest()
        )
        h[31] &= 0x7F
        u = int.from_bytes(h, "little")
        if u < P and u not in curve.LOW_ORDER_U and legendre_pure(u) >= 0:
            return bytes(h), counter
    raise AssertionError("no point")


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: f"{v['nid'][:5]}-{v['counter']}")
def test_vectors_match_implementation_and_oracle(v: dict[str, object]) -> None:
    salt = bytes.fromhex(str(v["salt"]))
    u, counter = curve.hash_to_curve(salt, str(v["nid"]).encode())
    assert (u.hex(), counter) == (v["u"], v["counter"])
    assert reference_hash(salt, str(v["nid"])) == (u, counter)
    for t in v["tried"]:  # type: ignore[attr-defined]
        assert t["rejected"] == "twist"
        assert legendre_pure(int.from_bytes(bytes.fromhex(t["u"]), "little")) == -1


@pytest.mark.parametrize("v", VECTORS["vectors"][:8])
def test_vector_blindings_commute(v: dict[str, str]) -> None:
    a, b = bytes.fromhex(VECTORS["scalar_a"]), bytes.fromhex(VECTORS["scalar_b"])
    u = bytes.fromhex(v["u"])
    assert curve.x25519_many(a, u).hex() == v["blinded_a"]
    assert curve.x25519_many(b, u).hex() == v["blinded_b"]
    assert curve.x25519_many(b, bytes.fromhex(v["blinded_a"]))[:16].hex() == v["tag_ab"]
    assert curve.x25519_many(a, bytes.fromhex(v["blinded_b"]))[:16].hex() == v["tag_ab"]


def test_vectors_include_resampled_inputs() -> None:
    assert any(v["counter"] > 0 for v in VECTORS["vectors"])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.text("0123456789", min_size=12, max_size=12))
def test_every_output_is_on_the_curve_never_the_twist(salt: bytes, rest: str) -> None:
    u, _ = curve.hash_to_curve(salt, ("3" + rest).encode())
    n = int.from_bytes(u, "little")
    assert n < P and u[31] & 0x80 == 0
    assert legendre_pure(n) == 1
    assert n not in curve.LOW_ORDER_U


def test_blinded_values_keep_the_curve_so_carry_no_twist_bit() -> None:
    salt = ForumSalt.generate(1)
    key = BlindingKey.generate()
    for i in range(50):
        nid = canonicalise(f"35202{i:07d}1")
        v = blind(key, salt, nid)
        assert legendre_pure(int.from_bytes(v, "little") % P) == 1


def test_low_order_points_are_rejected_not_crashed_on() -> None:
    key = BlindingKey.generate().unsafe_raw()
    for u in sorted(curve.LOW_ORDER_U):
        packed = os.urandom(0) + u.to_bytes(32, "little")
        good = curve.hash_to_curve(b"k" * 32, b"3520212345671")[0]
        with pytest.raises(InvalidBlindedValue, match="value 1 is a low-order point"):
            curve.x25519_many(key, good + packed)
    assert all(not curve.is_acceptable(u) for u in curve.LOW_ORDER_U)


def test_packed_values_of_wrong_length_are_rejected() -> None:
    with pytest.raises(InvalidBlindedValue, match="not a multiple of 32"):
        curve.x25519_many(BlindingKey.generate().unsafe_raw(), b"x" * 33)


def test_commutative_blinding_gives_the_same_tag_from_both_sides() -> None:
    salt = ForumSalt.generate(3)
    nid = canonicalise("42101-9876543-2")
    a, b = BlindingKey.generate(), BlindingKey.generate()
    assert tag_of(reblind(b, blind(a, salt, nid))) == tag_of(reblind(a, blind(b, salt, nid)))
    other = canonicalise("4210198765433")
    assert tag_of(reblind(b, blind(a, salt, nid))) != tag_of(reblind(a, blind(b, salt, other)))


def test_salt_changes_every_value() -> None:
    nid = canonicalise("3520212345671")
    assert hash_to_curve(ForumSalt.generate(1), nid) != hash_to_curve(ForumSalt.generate(1), nid)


def test_result_digest_ignores_order_and_duplicates() -> None:
    tags = [os.urandom(16) for _ in range(10)]
    assert result_digest(tags) == result_digest(list(reversed(tags)) + tags[:3])
    assert result_digest(tags) != result_digest(tags[1:])
    assert result_digest([]) != result_digest([bytes(16)])


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.lists(st.text("0123456789", min_size=12, max_size=12), max_size=20),
)
def test_batch_hashing_equals_one_at_a_time(salt: bytes, rests: list[str]) -> None:
    digits = [("3" + r).encode() for r in rests]
    assert curve.hash_to_curve_many(salt, digits) == b"".join(
        curve.hash_to_curve(salt, d)[0] for d in digits
    )
