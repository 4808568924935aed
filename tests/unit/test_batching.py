"""The coalescer that lets concurrent online checks share ladder calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from ispf import blinding
from ispf.errors import DeadlineExceeded, InvalidBlindedValue
from ispf.keys import BlindingKey
from ispf_server.batching import Coalescer


class Gate:
    """A batch function that holds its first call until released, recording batches."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, jobs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        with self.lock:
            first = not self.batches
            self.batches.append((jobs[0][0], [j[1] for j in jobs]))
        if first:
            self.entered.set()
            assert self.release.wait(10)
        return [(group, value * 10) for group, value in jobs]


def _wait_queued(c: Coalescer[object, object], group: object, n: int) -> None:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with c._lock:
            g = c._groups.get(group)
            if g is not None and len(g.pending) >= n:
                return
        time.sleep(0.001)
    raise AssertionError(f"{n} callers never queued")


def test_an_idle_call_runs_at_once_in_the_callers_thread() -> None:
    seen: list[int] = []

    def run(jobs: Sequence[int]) -> list[int]:
        seen.append(threading.get_ident())
        return [j + 1 for j in jobs]

    c: Coalescer[int, int] = Coalescer(run)
    t = time.perf_counter()
    assert c.submit("k", 41) == 42
    assert time.perf_counter() - t < 0.05
    assert seen == [threading.get_ident()]
    assert c.stats.batches == 1 and not c._groups  # (nothing left behind)


def test_callers_arriving_during_a_batch_run_together_as_the_next() -> None:
    gate = Gate()
    c: Coalescer[tuple[str, int], tuple[str, int]] = Coalescer(gate, cap=64)
    with ThreadPoolExecutor(8) as ex:
        first = ex.submit(c.submit, "a", ("a", 0))
        assert gate.entered.wait(10)
        rest = [ex.submit(c.submit, "a", ("a", i)) for i in range(1, 8)]
        _wait_queued(c, "a", 7)
        gate.release.set()
        assert first.result() == ("a", 0)
        assert [f.result() for f in rest] == [("a", i * 10) for i in range(1, 8)]
    assert [len(v) for _, v in gate.batches] == [1, 7]
    assert sorted(gate.batches[1][1]) == list(range(1, 8))


def test_a_batch_holds_at_most_cap_values() -> None:
    gate = Gate()
    c: Coalescer[tuple[str, int], tuple[str, int]] = Coalescer(gate, cap=3)
    with ThreadPoolExecutor(9) as ex:
        first = ex.submit(c.submit, "a", ("a", 0))
        assert gate.entered.wait(10)
        rest = [ex.submit(c.submit, "a", ("a", i)) for i in range(1, 8)]
        _wait_queued(c, "a", 7)
        gate.release.set()
        first.result()
        assert [f.result() for f in rest] == [("a", i * 10) for i in range(1, 8)]
    assert [len(v) for _, v in gate.batches] == [1, 3, 3, 1]
    assert c.stats.largest == 3


def test_concurrent_calls_get_exactly_their_own_results() -> None:
    """Real blinding, many threads, several keys: each caller's values are what
    one-by-one calls give, and no batch ever holds two keys."""
    keys = [BlindingKey.generate() for _ in range(3)]
    batches: list[set[bytes]] = []
    lock = threading.Lock()

    def run(jobs: Sequence[tuple[BlindingKey, bytes]]) -> list[bytes]:
        with lock:
            batches.append({k.unsafe_raw() for k, _ in jobs})
        key = jobs[0][0]
        out = blinding.reblind_many(key, b"".join(v for _, v in jobs), 16, "auto")
        sizes = [len(v) // 32 * 16 for _, v in jobs]
        cuts, at = [], 0
        for s in sizes:
            cuts.append(out[at : at + s])
            at += s
        return cuts

    c: Coalescer[tuple[BlindingKey, bytes], bytes] = Coalescer(
        run, cap=16, size=lambda j: len(j[1]) // 32
    )
    base = bytes.fromhex("09" + "00" * 31)
    values = [
        b"".join(
            blinding.reblind_many(BlindingKey.generate(), base, 32, "cryptography")
            for _ in range(n)
        )
        for n in (1, 2, 3, 1, 5, 1, 2, 8)
        for _ in range(4)
    ]
    jobs = [(keys[i % 3], v) for i, v in enumerate(values)]
    expected = [blinding.reblind_many(k, v, 16, "cryptography") for k, v in jobs]
    with ThreadPoolExecutor(16) as ex:
        for _ in range(5):
            got = list(ex.map(lambda j: c.submit(j[0].unsafe_raw(), j), jobs))
            assert got == expected
    assert all(len(b) == 1 for b in batches)
    assert c.stats.calls == 5 * len(jobs)


def test_a_backend_error_fails_only_that_batchs_callers_with_the_same_error() -> None:
    boom = RuntimeError("ladder on fire")
    entered, release = threading.Event(), threading.Event()
    calls = [0]

    def run(jobs: Sequence[tuple[str, int]]) -> list[int]:
        calls[0] += 1
        if calls[0] == 1:
            entered.set()
            assert release.wait(10)
            return [v for _, v in jobs]
        if jobs[0][0] == "bad":
            raise boom
        return [v for _, v in jobs]

    c: Coalescer[tuple[str, int], int] = Coalescer(run)
    with ThreadPoolExecutor(8) as ex:
        first = ex.submit(c.submit, "bad", ("bad", 0))
        assert entered.wait(10)
        bad = [ex.submit(c.submit, "bad", ("bad", i)) for i in range(1, 5)]
        good = [ex.submit(c.submit, "good", ("good", i)) for i in range(3)]
        _wait_queued(c, "bad", 4)
        assert [f.result() for f in good] == [0, 1, 2]  # (another group: untouched)
        release.set()
        assert first.result() == 0  # (the batch before: its own results)
        errors = []
        for f in bad:
            with pytest.raises(RuntimeError) as got:
                f.result()
            errors.append(got.value)
    assert all(e is boom for e in errors)
    assert not c._groups  # (nothing left waiting)


def test_an_isolated_error_reaches_its_own_caller_only() -> None:
    """A peer's low-order point fails its own probe: the batch is re-run one by one."""
    low = bytes(32)  # u = 0: low order
    key = BlindingKey.generate()
    base = bytes.fromhex("09" + "00" * 31)
    gate = threading.Event()
    entered = threading.Event()

    def run(jobs: Sequence[bytes]) -> list[bytes]:
        if not entered.is_set():
            entered.set()
            assert gate.wait(10)
        out = blinding.reblind_many(key, b"".join(jobs), 16, "auto")
        return [out[16 * i : 16 * (i + 1)] for i in range(len(jobs))]

    c: Coalescer[bytes, bytes] = Coalescer(run, isolate=(InvalidBlindedValue,))
    with ThreadPoolExecutor(6) as ex:
        first = ex.submit(c.submit, "k", base)
        assert entered.wait(10)
        jobs = [base, low, base, base]
        rest = [ex.submit(c.submit, "k", j) for j in jobs]
        _wait_queued(c, "k", 4)
        gate.set()
        want = blinding.reblind_many(key, base, 16, "cryptography")
        assert first.result() == want
        for j, f in zip(jobs, rest, strict=True):
            if j == low:
                with pytest.raises(InvalidBlindedValue, match="value 0 "):
                    f.result()
            else:
                assert f.result() == want


def test_a_caller_still_queued_leaves_at_its_deadline() -> None:
    gate = Gate()
    c: Coalescer[tuple[str, int], tuple[str, int]] = Coalescer(gate)
    with ThreadPoolExecutor(4) as ex:
        first = ex.submit(c.submit, "a", ("a", 0))
        assert gate.entered.wait(10)
        t = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            c.submit("a", ("a", 1), timeout=0.05)
        assert time.perf_counter() - t < 2
        later = ex.submit(c.submit, "a", ("a", 2))
        _wait_queued(c, "a", 1)
        gate.release.set()
        assert first.result() == ("a", 0)
        assert later.result() == ("a", 20)
    assert [v for _, v in gate.batches] == [[0], [2]]  # (the one that left: not run)
    assert not c._groups
