"""Sorting and joining runs within a memory budget: what comes out equals sorting
and joining everything in memory, whatever the budget, block size and chunking;
a key twice is caught wherever it is; nothing is left in the store directory."""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from ispf.errors import StorageFull
from ispf_server.records import (
    ExternalSort,
    RepeatedKey,
    extsort,
    join_sorted,
    ops,
    shuffled,
    written,
)


def chunks_of(data: bytes, width: int, rng: random.Random) -> Iterator[bytes]:
    """Whole records in chunks of random sizes (empty ones too)."""
    at = 0
    while at < len(data):
        n = rng.choice([0, 1, 2, 5, 40, 300])
        yield data[at : at + n * width]
        at += n * width


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("min_block", [1, 64 << 10])
@pytest.mark.parametrize("budget", [1, 9 * 7, 9 * 100, 1 << 20])
def test_records_come_out_sorted_whatever_the_budget(
    tmp_path: Path, seed: int, budget: int, min_block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extsort, "MIN_BLOCK", min_block)
    rng = random.Random(seed)
    width = 9
    records = [rng.randbytes(width) for _ in range(1000)]
    records += records[:50]  # (a sort keeps repeats; only joins refuse them)
    with ExternalSort(width, tmp_path, budget=budget) as s:
        for chunk in chunks_of(b"".join(records), width, rng):
            s.add(chunk)
        assert s.count == len(records)
        out = [bytes(c) for c in s.sorted_chunks()]
        # Memory: no chunk given out is larger than the budget, unless the runs are
        # so many that a block of each (at least MIN_BLOCK, a record) is more.
        floor = s.spilled_runs * max(min_block - min_block % width, width)
        assert max(len(c) for c in out) <= max(budget - budget % width, width, floor)
        if budget < width * len(records):
            assert s.spilled_runs == -(-len(records) // max(1, budget // width))
        else:
            assert s.spilled_runs == 0  # (in memory: the disk is not touched)
    assert b"".join(out) == b"".join(sorted(records))
    assert list(tmp_path.iterdir()) == []  # nothing left in the store directory


def test_an_empty_sort_gives_nothing_and_is_read_once(tmp_path: Path) -> None:
    s = ExternalSort(4, tmp_path, budget=8)
    assert list(s.sorted_chunks()) == []
    with pytest.raises(RuntimeError, match="read once"):
        list(s.sorted_chunks())
    with pytest.raises(RuntimeError, match="added after"):
        s.add(b"abcd")
    with pytest.raises(ValueError, match="whole 3-byte records"):
        ExternalSort(3, tmp_path).add(b"abcd")


def test_a_sort_that_cannot_spill_is_a_full_store_error(tmp_path: Path) -> None:
    s = ExternalSort(4, tmp_path / "missing", budget=8)
    with pytest.raises(StorageFull, match="free space on the node"):
        s.add(b"x" * 16)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("native", [True, False])
def test_merging_sorted_runs_equals_sorting_them(
    seed: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native and ops.native is None:
        pytest.skip("the native module is not built here")
    if not native:
        monkeypatch.setattr(ops, "native", None)
    rng = random.Random(seed)
    runs = [sorted(rng.randbytes(5) for _ in range(rng.randrange(30))) for _ in range(9)]
    runs[3] = runs[2][:4]  # (equal records in two runs)
    merged = ops.merge_sorted([b"".join(r) for r in runs], 5)
    assert merged == b"".join(sorted(x for r in runs for x in r))
    assert ops.merge_sorted([], 5) == b""


def unique_run(rng: random.Random, keys: list[bytes], rest: int) -> bytes:
    return b"".join(k + rng.randbytes(rest) for k in sorted(keys))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("native", [True, False])
def test_joining_streams_equals_joining_whole_runs(
    seed: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native and ops.native is None:
        pytest.skip("the native module is not built here")
    if not native:
        monkeypatch.setattr(ops, "native", None)
    rng = random.Random(seed)
    keys = [rng.randbytes(4) for _ in range(3000)]
    left_keys, right_keys = rng.sample(keys, 1200), rng.sample(keys, 900)
    left, right = unique_run(rng, left_keys, 3), unique_run(rng, right_keys, 2)
    want = []
    right_of = {right[j : j + 4]: right[j + 4 : j + 6] for j in range(0, len(right), 6)}
    for i in range(0, len(left), 7):
        if left[i : i + 4] in right_of:
            want.append(left[i : i + 7] + right_of[left[i : i + 4]])
    seen: dict[str, list[bytes]] = {"left": [], "right": []}
    joined = join_sorted(
        written(chunks_of(left, 7, rng), seen["left"].append),
        7,
        written(chunks_of(right, 6, rng), seen["right"].append),
        6,
        4,
    )
    assert b"".join(joined) == b"".join(want) and len(want) > 0
    # Both streams are read to the end (their runs are staged as they pass).
    assert b"".join(seen["left"]) == left and b"".join(seen["right"]) == right


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("native", [True, False])
def test_left_records_that_share_a_key_are_each_joined(
    seed: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many to one: every left record whose key the right holds is joined to it,
    repeats included, wherever the chunks of either stream end (within a run of
    one key too)."""
    if native and ops.native is None:
        pytest.skip("the native module is not built here")
    if not native:
        monkeypatch.setattr(ops, "native", None)
    rng = random.Random(seed)
    keys = [rng.randbytes(2) for _ in range(800)]  # (many keys repeat)
    left = b"".join(sorted(k + rng.randbytes(3) for k in keys))
    right_keys = sorted(set(rng.sample(keys, 300)) | {rng.randbytes(2) for _ in range(100)})
    right = b"".join(k + rng.randbytes(2) for k in right_keys)
    right_of = {right[j : j + 2]: right[j + 2 : j + 4] for j in range(0, len(right), 4)}
    want = [
        left[i : i + 5] + right_of[left[i : i + 2]]
        for i in range(0, len(left), 5)
        if left[i : i + 2] in right_of
    ]
    assert len(want) > len({w[:2] for w in want}) > 0  # (repeated keys were joined)
    joined = join_sorted(chunks_of(left, 5, rng), 5, chunks_of(right, 4, rng), 4, 2)
    assert b"".join(joined) == b"".join(want)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("where", ["within", "across", "tail"])
def test_a_key_twice_on_the_right_is_caught_wherever_it_is(seed: int, where: str) -> None:
    rng = random.Random(seed)
    keys = sorted(rng.sample(range(1000), 200))
    right = [k.to_bytes(4, "big") + b"R" for k in keys]
    left = [k.to_bytes(4, "big") + b"L" for k in keys[:20]]  # (it ends first)
    at = {"within": 50, "across": 100, "tail": 180}[where]
    right.insert(at, right[at])
    chunks = [b"".join(right[:100]), b"".join(right[100:])]
    with pytest.raises(RepeatedKey):
        list(join_sorted([b"".join(left)], 5, chunks, 5, 4))


@pytest.mark.parametrize("native", [True, False])
def test_merge_join_in_c_and_in_python_agree(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bytes either way: left repeats each joined, a right repeat refused."""
    if native and ops.native is None:
        pytest.skip("the native module is not built here")
    if not native:
        monkeypatch.setattr(ops, "native", None)
    left = b"".join([b"aaL1", b"aaL2", b"bbL3", b"ccL4", b"ccL5", b"ddL6"])
    right = b"".join([b"aaR1", b"ccR2", b"eeR3"])
    assert ops.merge_join(left, 4, right, 4, 2) == b"aaL1R1aaL2R1ccL4R2ccL5R2"
    assert ops.merge_join(b"", 4, right, 4, 2) == b""
    assert ops.merge_join(left, 4, b"", 4, 2) == b""
    with pytest.raises(RepeatedKey):
        ops.merge_join(left, 4, right + b"eeR4", 4, 2)
    with pytest.raises(ValueError, match="whole records"):
        ops.merge_join(left[:-1], 4, right, 4, 2)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("native", [True, False])
def test_unique_keeps_the_last_record_of_each_key(
    seed: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the chunks (a key's records across several, empty chunks too), each key
    once, its last (highest) record kept; the others handed to `dropped`; a stream
    without repeats passes as it is."""
    if native and ops.native is None:
        pytest.skip("the native module is not built here")
    if not native:
        monkeypatch.setattr(ops, "native", None)
    rng = random.Random(seed)
    records = sorted(rng.randbytes(1) + rng.randbytes(2) for _ in range(600))
    data = b"".join(records)
    last: dict[bytes, bytes] = {}
    for r in records:
        last[r[:1]] = r
    gone: list[bytes] = []
    out = b"".join(extsort.unique(chunks_of(data, 3, rng), 3, 1, gone.append))
    assert out == b"".join(last[k] for k in sorted(last))
    dropped = b"".join(gone)
    want_gone = [r for r, nxt in pairwise(records) if nxt[:1] == r[:1]]
    assert [dropped[i : i + 3] for i in range(0, len(dropped), 3)] == want_gone
    assert len(want_gone) == len(records) - len(last) > 0
    distinct = b"".join(sorted(set(last.values())))
    assert b"".join(extsort.unique(chunks_of(distinct, 3, rng), 3, 1)) == distinct
    assert list(extsort.unique([b"", b""], 3, 1)) == []


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("budget", [50, 1 << 20])
def test_shuffled_gives_every_record_once_in_a_fresh_order(
    tmp_path: Path, budget: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native and ops.native is None:
        pytest.skip("the native module is not built here")
    if not native:
        monkeypatch.setattr(ops, "native", None)
    monkeypatch.setattr(extsort, "BUDGET", budget)
    monkeypatch.setattr(extsort, "MIN_BLOCK", 1)
    rng = random.Random(4)
    records = [i.to_bytes(3, "big") for i in range(500)]
    data = b"".join(records)
    runs = [b"".join(shuffled(chunks_of(data, 3, rng), 3, tmp_path)) for _ in range(2)]
    for out in runs:
        assert sorted(out[i : i + 3] for i in range(0, len(out), 3)) == records
    assert runs[0] != runs[1] and data not in runs  # (500! orders: not the input's, twice)
    assert list(tmp_path.iterdir()) == []
