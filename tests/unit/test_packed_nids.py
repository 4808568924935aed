"""Packed IDs behave like the list of IDs they hold, and hash the same."""

from __future__ import annotations

import pickle
import random

import pytest

from ispf.hazmat import curve
from ispf.nid import PackedNids
from ispf_server.session.core import chunked
from ispf_server.session.plan import shuffle_packed

IDS = [f"35202{i:08d}".encode() for i in range(40)]


def test_indexing_slicing_and_iteration_follow_the_list() -> None:
    packed = PackedNids.join(IDS)
    assert len(packed) == 40 and list(packed) == IDS
    assert packed[0] == IDS[0] and packed[-1] == IDS[-1]
    assert list(packed[5:9]) == IDS[5:9] and list(packed[38:100]) == IDS[38:]
    assert len(packed[30:10]) == 0
    assert [list(c) for c in chunked(packed, 16)] == [IDS[:16], IDS[16:32], IDS[32:]]
    with pytest.raises(IndexError):
        packed[40]
    with pytest.raises(ValueError, match="step 1"):
        packed[::2]


def test_only_whole_13_digit_records_are_accepted() -> None:
    with pytest.raises(ValueError, match="whole number"):
        PackedNids(b"123")
    with pytest.raises(ValueError, match="12 bytes"):
        PackedNids.join([b"352021234567"])


def test_repr_never_shows_an_id() -> None:
    assert repr(PackedNids.join(IDS)) == "PackedNids(40 IDs)"


def test_a_view_pickles_to_a_plain_copy() -> None:
    part = PackedNids.join(IDS)[3:7]
    assert list(pickle.loads(pickle.dumps(part))) == IDS[3:7]


def test_packed_ids_hash_to_the_same_points_as_a_list() -> None:
    salt = bytes(range(32))
    want = curve.hash_to_curve_many_py(salt, IDS)
    assert curve.hash_to_curve_many(salt, PackedNids.join(IDS)) == want
    assert curve.hash_to_curve_many(salt, PackedNids.join(IDS)[0:40]) == want


def test_shuffle_packed_is_a_permutation_with_or_without_the_native_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ispf_server.records import ops

    for mod in (ops.native, None):
        monkeypatch.setattr(ops, "native", mod)
        buf = bytearray(b"".join(IDS))
        shuffle_packed(buf)
        assert sorted(PackedNids(buf)) == IDS and list(PackedNids(buf)) != IDS
    buf = bytearray(b"".join(IDS))
    shuffle_packed(buf, random.Random(1))  # a seeded shuffle, for tests
    again = bytearray(b"".join(IDS))
    shuffle_packed(again, random.Random(1))
    assert buf == again


def test_shuffle_packed_takes_any_record_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The count-only responder shuffles its 16-byte tags this way."""
    from ispf_server.records import ops

    tags = [bytes([i]) * 16 for i in range(40)]
    for mod in (ops.native, None):
        monkeypatch.setattr(ops, "native", mod)
        buf = bytearray(b"".join(tags))
        shuffle_packed(buf, width=16)
        got = [bytes(buf[i : i + 16]) for i in range(0, len(buf), 16)]
        assert sorted(got) == tags and got != tags
