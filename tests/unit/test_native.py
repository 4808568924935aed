"""The optional C module gives the same bytes as the Python reference code."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from ispf.hazmat import backends, curve
from ispf_server.records import ops

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "hash_to_curve.json").read_text())


def native():  # type: ignore[no-untyped-def]
    if curve.native is None:
        if shutil.which("cc") and os.environ.get("ISPF_NATIVE", "1") != "0":
            pytest.fail("a C compiler is here but ispf.hazmat._native was not built")
        pytest.skip("the native module is not built here")
    return curve.native


def records_native():  # type: ignore[no-untyped-def]
    """The record operations' C module (ispf._records), as ispf_server.records loads it."""
    if ops.native is None:
        if shutil.which("cc") and os.environ.get("ISPF_NATIVE", "1") != "0":
            pytest.fail("a C compiler is here but ispf._records was not built")
        pytest.skip("the native module is not built here")
    return ops.native


def test_reproduces_the_published_vectors() -> None:
    mod = native()
    for v in VECTORS["vectors"]:
        got = mod.hash_to_curve_many(bytes.fromhex(v["salt"]), [v["nid"].encode()])
        assert got.hex() == v["u"], v["nid"]


@pytest.mark.parametrize("seed", range(4))
def test_matches_python_on_random_ids(seed: int) -> None:
    # 3000 IDs per seed: counters past 7 (probability 1/256 each) are exercised too.
    mod = native()
    rng = random.Random(seed)
    salt = rng.randbytes(32)
    ids = [f"{rng.randrange(10**13):013d}".encode() for _ in range(3000)]
    ids += [b"", b"1", b"x" * 49]  # any length that fits one BLAKE3 block
    want = curve.hash_to_curve_many_py(salt, ids)
    assert mod.hash_to_curve_many(salt, ids, 0) == want  # scalar Jacobi symbol
    assert mod.hash_to_curve_many(salt, ids, 1) == want  # eight-lane (where the CPU has it)
    assert mod.hash_to_curve_many(salt, ids) == want


@pytest.mark.parametrize("count", [1, 7, 8, 31, 32, 33, 100])
def test_batches_that_do_not_fill_the_lanes(count: int) -> None:
    mod = native()
    ids = [f"4210{i:09d}".encode() for i in range(count)]
    want = curve.hash_to_curve_many_py(b"s" * 32, ids)
    assert mod.hash_to_curve_many(b"s" * 32, ids, 1) == want


def test_reports_whether_the_vector_path_runs() -> None:
    mod = native()
    assert mod.vector_available() == backends.cpu_has_ifma()


def test_counters_beyond_seven_match() -> None:
    mod = native()
    salt = b"\x07" * 32
    deep = [d for i in range(4000) if curve.hash_to_curve(salt, d := str(i).encode())[1] >= 8]
    assert deep, "no ID needed more than eight tries"
    want = curve.hash_to_curve_many_py(salt, deep)
    assert mod.hash_to_curve_many(salt, deep, 0) == want
    assert mod.hash_to_curve_many(salt, deep, 1) == want


def test_bad_arguments_are_errors_not_crashes() -> None:
    mod = native()
    with pytest.raises(ValueError, match="32 bytes"):
        mod.hash_to_curve_many(b"short", [b"1"])
    with pytest.raises(ValueError, match="ID 1 is 50 bytes"):
        mod.hash_to_curve_many(b"k" * 32, [b"1", b"x" * 50])
    with pytest.raises(TypeError):
        mod.hash_to_curve_many(b"k" * 32, ["not bytes"])
    with pytest.raises(TypeError):
        mod.hash_to_curve_many(b"k" * 32, 5)
    assert mod.hash_to_curve_many(b"k" * 32, []) == b""


@pytest.mark.parametrize("n", [0, 1, 100, 5000, 70_000])
@pytest.mark.parametrize("width", [1, 2, 20, 33])
def test_sort_records_equals_sorted(n: int, width: int) -> None:
    mod = records_native()
    rng = random.Random(n * 100 + width)
    data = rng.randbytes(n * width)
    if width >= 13 and n:  # digit-led keys too (the by-ID runs), with repeats
        data = b"".join(
            f"{rng.randrange(10**4):013d}".encode()[:width] + rng.randbytes(width - 13)
            for _ in range(n)
        )
    want = b"".join(sorted(data[i : i + width] for i in range(0, len(data), width)))
    assert mod.sort_records(data, width) == want
    with pytest.raises(ValueError, match="whole records"):
        mod.sort_records(b"abc", 2)
    buf = bytearray(data)
    mod.sort_inplace(buf, width)  # the in-place sort gives the same order
    assert buf == want
    with pytest.raises(ValueError, match="whole records"):
        mod.sort_inplace(bytearray(b"abc"), 2)
    with pytest.raises(TypeError):
        mod.sort_inplace(b"immutable", 1)


def test_zip_records_and_xor_fold_match_python() -> None:
    mod = records_native()
    nids, tags = b"".join(b"%013d" % i for i in range(50)), random.randbytes(16 * 50)
    got = mod.zip_records(50, (tags, 16), (nids, 13), (b"\x00\x00\x00\x07", 4))
    assert got == b"".join(
        tags[16 * i : 16 * i + 16] + nids[13 * i : 13 * i + 13] + b"\x00\x00\x00\x07"
        for i in range(50)
    )
    with pytest.raises(ValueError, match="part 1"):
        mod.zip_records(50, (tags, 16), (nids[:-1], 13))
    dst = bytearray(b"\xee" * (10 + len(got)))
    assert mod.zip_into(dst, 5, 50, (tags, 16), (nids, 13), (b"\x00\x00\x00\x07", 4)) is None
    assert dst == b"\xee" * 5 + got + b"\xee" * 5
    with pytest.raises(ValueError, match="do not fit"):
        mod.zip_into(bytearray(len(got)), 1, 50, (tags, 16), (nids, 13), (b"\x00" * 4, 4))
    with pytest.raises(BufferError):
        mod.zip_into(bytes(len(got)), 0, 50, (tags, 16), (nids, 13), (b"\x00" * 4, 4))
    acc = 0
    for i in range(50):
        acc ^= int.from_bytes(tags[16 * i : 16 * i + 16], "big")
    assert mod.xor_fold(tags, 16) == acc.to_bytes(16, "big")


def test_shuffle_is_a_permutation_and_depends_on_the_seed() -> None:
    mod = records_native()
    items = list(range(1000))
    a, b, c = items[:], items[:], items[:]
    mod.shuffle(a, b"\x01" * 32)
    mod.shuffle(b, b"\x01" * 32)
    mod.shuffle(c, b"\x02" * 32)
    assert sorted(a) == items and a == b and a != c and a != items
    with pytest.raises(ValueError, match="32 bytes"):
        mod.shuffle(items, b"short")


def test_shuffle_is_uniform_over_small_lists() -> None:
    mod = records_native()
    counts: dict[tuple[int, ...], int] = {}
    for i in range(6000):
        items = [0, 1, 2]
        mod.shuffle(items, i.to_bytes(32, "little"))
        counts[tuple(items)] = counts.get(tuple(items), 0) + 1
    # Six orders, 1000 expected each; a biased draw (say, modulo bias) falls far outside.
    assert len(counts) == 6 and all(850 < c < 1150 for c in counts.values()), counts


def test_shuffle_records_is_the_same_permutation_on_packed_records() -> None:
    mod = records_native()
    width = 13
    items = [f"35202{i:08d}".encode() for i in range(500)]
    buf = bytearray(b"".join(items))
    listed = items[:]
    mod.shuffle(listed, b"\x05" * 32)
    mod.shuffle_records(buf, width, b"\x05" * 32)
    # Same seed, same Fisher-Yates draws: the same order as the list shuffle.
    assert bytes(buf) == b"".join(listed) and listed != items
    for bad in ((bytearray(b"x" * 14), 13, b"\x00" * 32), (bytearray(26), 13, b"short")):
        with pytest.raises(ValueError, match="seed must be 32 bytes"):
            mod.shuffle_records(*bad)
    with pytest.raises(TypeError):
        mod.shuffle_records(b"immutable bytes", 1, b"\x00" * 32)


def test_packed_ids_hash_like_a_list() -> None:
    mod = native()
    rng = random.Random(11)
    ids = [f"{rng.randrange(10**13):013d}".encode() for _ in range(333)]
    salt = rng.randbytes(32)
    want = mod.hash_to_curve_many(salt, ids)
    assert mod.hash_to_curve_many(salt, b"".join(ids), -1, 13) == want
    assert mod.hash_to_curve_many(salt, bytearray(b"".join(ids)), 0, 13) == want
    with pytest.raises(ValueError, match="whole number"):
        mod.hash_to_curve_many(salt, b"1" * 14, -1, 13)
    with pytest.raises(ValueError, match="at most"):
        mod.hash_to_curve_many(salt, b"1" * 100, -1, 100)


def test_the_c_screen_refuses_u_from_p_up_and_low_order_u() -> None:
    """hash-to-curve's C test of a candidate (`screen`, then the Jacobi symbol)
    against the Python one: u >= p and the low-order u are refused, curve points
    taken, twist points refused."""
    mod = native()
    p = curve.P
    refused = [p + d for d in range(0, 19)] + sorted(curve.LOW_ORDER_U)
    for u in refused:
        assert not mod.point_acceptable(u.to_bytes(32, "little")), u
        assert not curve.is_acceptable(u)
    rng = random.Random(11)
    randoms = [rng.randrange(2**255) for _ in range(2000)] + [p - d for d in range(2, 60)]
    verdicts = [mod.point_acceptable(u.to_bytes(32, "little")) for u in randoms]
    assert verdicts == [curve.is_acceptable(u) for u in randoms]
    assert 800 < sum(verdicts) < 1200  # about half are on the curve, half on the twist
    with pytest.raises(ValueError, match="top bit clear"):
        mod.point_acceptable(b"\xff" * 32)
    with pytest.raises(ValueError, match="32 bytes"):
        mod.point_acceptable(b"\x01" * 31)


def test_the_c_ladder_refuses_every_low_order_encoding_by_position() -> None:
    """x25519_many in C (not through backends.py): every encoding of a low-order u,
    those from p up included (p, p + 1, and with the ignored top bit), is refused
    at its position, in the first batch of 512 values and past it."""
    mod = native()
    if not mod.vector_available():
        pytest.skip("the CPU lacks AVX-512 IFMA")
    good = curve.hash_to_curve_many(b"k" * 32, [f"35202{i:08d}".encode() for i in range(600)])
    encodings = sorted(backends.LOW_ORDER_ENCODINGS)
    assert len(encodings) == 14
    assert (curve.P).to_bytes(32, "little") in encodings
    for n, enc in enumerate(encodings):
        at = (n * 41) % 600
        bad = good[: 32 * at] + enc + good[32 * at + 32 :]
        out, bad_at = mod.x25519_many(b"s" * 32, bad, 32)
        assert bad_at == at
    out, bad_at = mod.x25519_many(b"s" * 32, good, 16)
    assert bad_at == -1 and len(out) == 16 * 600


@pytest.mark.parametrize("code_bytes", [1, 2])
def test_split_unique_in_c_equals_python(code_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sorted key+code records split into the keys held once, by code, and the records
    of keys held more than once: the same in C and in Python, codes of 1 or 2 bytes."""
    from ispf_server.records import ops

    if ops.native is None:
        pytest.skip("the native module is not built here")
    rng = random.Random(code_bytes)
    keys = [rng.randbytes(5) for _ in range(300)]
    recs = [rng.choice(keys) + rng.randbytes(code_bytes) for _ in range(700)]
    width = 5 + code_bytes
    data = bytearray(b"".join(sorted(recs)))
    got = ops.split_unique(data, width, code_bytes)
    monkeypatch.setattr(ops, "native", None)
    assert got == ops.split_unique(data, width, code_bytes)
    once, multi = got
    assert sum(len(v) for v in once.values()) // 5 + len(multi) // width == len(recs)
    with pytest.raises(ValueError, match="a code of 1 or 2 bytes"):
        ops.split_unique(data, width, 3)
