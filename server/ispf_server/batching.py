"""Coalescing of concurrent calls under one key: many callers, one backend call.

The node's X25519 (the ``ifma`` backend) computes eight lanes at once: a call with
one value costs about as much as one with eight. Online checks blind (the asker)
and re-blind (the peer) a few values each, many at a time under load, each under
the pair key of (peer, epoch). `Coalescer` lets such calls share a backend call:

* A call that finds no batch of its group in progress runs at once, in the
  caller's own thread: no added latency when idle.
* Calls that arrive while one runs wait, and are run together as the next batch
  (in the thread of the first of them), up to `cap` values; the rest wait for
  the batch after.
* Only jobs of the same group are batched together: the caller names the group,
  which must determine everything the computation depends on besides the job's
  own values (the key, the salt, the backend, the output width), so that a job
  is never computed under another's key. One batch of a group runs at a time;
  groups run independently.
* Each caller gets exactly its own results. If the batch function raises, every
  caller of that batch gets the same exception (callers of other batches are not
  touched), except for exceptions of the `isolate` types (an error a job's own
  values cause, such as a peer's low-order point): the jobs of that batch are
  then run again one by one, so that each caller gets its own answer or error
  and no caller's error reaches another's answer.
* A caller may give a timeout: one still waiting for its batch to begin when it
  runs out leaves the queue with `DeadlineExceeded`; one whose batch is running
  stops waiting (its result is dropped). A caller whose thread must run the batch
  runs it, for the others in it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ispf.errors import DeadlineExceeded

J = TypeVar("J")  # one caller's job
R = TypeVar("R")  # its result

_PENDING, _LEAD, _BATCHED, _DONE = range(4)


@dataclass(eq=False)
class _Slot(Generic[J, R]):
    """One caller's job, from the queue to its result."""

    job: J
    size: int
    state: int = _PENDING
    batch: list[_Slot[J, R]] = field(default_factory=list)  # the batch it leads
    result: R | None = None
    error: BaseException | None = None
    wake: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Group(Generic[J, R]):
    running: bool = False
    pending: list[_Slot[J, R]] = field(default_factory=list)


@dataclass
class CoalescerStats:
    """What a coalescer did (for tests and the benchmark's figures)."""

    calls: int = 0
    batches: int = 0
    values: int = 0
    largest: int = 0


class Coalescer(Generic[J, R]):
    """Runs concurrent `submit`s of one group as one call of `run` (thread-safe).

    `run(jobs)` gets the jobs of one batch, all of one group, and returns one
    result per job, in order. `size(job)` is the number of values a job holds
    (1 by default); a batch holds at most `cap` values, or one job if it alone is
    larger.
    """

    def __init__(
        self,
        run: Callable[[Sequence[J]], Sequence[R]],
        *,
        cap: int = 64,
        size: Callable[[J], int] = lambda job: 1,
        isolate: tuple[type[BaseException], ...] = (),
    ) -> None:
        if cap < 1:
            raise ValueError("a batch holds at least one value")
        self._run = run
        self.cap = cap
        self._size = size
        self._isolate = isolate
        self._lock = threading.Lock()
        self._groups: dict[Hashable, _Group[J, R]] = {}
        self.stats = CoalescerStats()

    def submit(self, group: Hashable, job: J, timeout: float | None = None) -> R:
        """`job`'s result, computed in a batch with other jobs of `group`, or its
        error; DeadlineExceeded if `timeout` seconds pass first."""
        slot: _Slot[J, R] = _Slot(job, max(1, self._size(job)))
        with self._lock:
            self.stats.calls += 1
            g = self._groups.get(group)
            if g is None:
                g = self._groups[group] = _Group()
            if not g.running:  # idle: this caller runs its job at once
                g.running = True
                slot.state, slot.batch = _LEAD, [slot]
            else:
                g.pending.append(slot)
        if slot.state != _LEAD:
            self._await(group, g, slot, timeout)
        if slot.state == _LEAD:
            self._lead(group, g, slot)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _await(
        self, group: Hashable, g: _Group[J, R], slot: _Slot[J, R], timeout: float | None
    ) -> None:
        """Wait until the slot is done, or must lead a batch; or time out."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if end is None else max(0.0, end - time.monotonic())
            slot.wake.wait(left)
            with self._lock:
                if slot.state in (_DONE, _LEAD):
                    return
                if end is not None and time.monotonic() >= end:
                    if slot.state == _PENDING:
                        g.pending.remove(slot)
                    slot.state = _DONE  # (a running batch's result for it is dropped)
                    slot.error = DeadlineExceeded(
                        f"no result within {timeout:.3f} s: the batches before it took longer"
                    )
                    return
                slot.wake.clear()

    def _lead(self, group: Hashable, g: _Group[J, R], slot: _Slot[J, R]) -> None:
        """Run the batch this slot leads, then hand the next one to its first caller."""
        batch = slot.batch
        outcomes: list[tuple[R | None, BaseException | None]] = []
        try:
            outcomes = self._compute([s.job for s in batch])
        except BaseException as exc:  # (not an Exception: every caller gets it too)
            outcomes = [(None, exc)] * len(batch)
            raise
        finally:
            with self._lock:
                self.stats.batches += 1
                values = sum(s.size for s in batch)
                self.stats.values += values
                self.stats.largest = max(self.stats.largest, values)
                for s, (result, error) in zip(batch, outcomes, strict=True):
                    if s.state == _BATCHED or s is slot:  # (not one that timed out)
                        s.state, s.result, s.error = _DONE, result, error
                        s.wake.set()
                nxt = self._take(g)
                if nxt:
                    nxt[0].state, nxt[0].batch = _LEAD, nxt
                    for s in nxt[1:]:
                        s.state = _BATCHED
                    nxt[0].wake.set()
                else:
                    g.running = False
                    del self._groups[group]

    def _take(self, g: _Group[J, R]) -> list[_Slot[J, R]]:
        """The next batch from the queue, first come first: up to `cap` values."""
        taken: list[_Slot[J, R]] = []
        total = 0
        while g.pending and (not taken or total + g.pending[0].size <= self.cap):
            s = g.pending.pop(0)
            taken.append(s)
            total += s.size
        return taken

    def _compute(self, jobs: list[J]) -> list[tuple[R | None, BaseException | None]]:
        """Each job's result or error, in order (raises only what is not an Exception)."""
        try:
            results = list(self._run(jobs))
            if len(results) != len(jobs):
                raise RuntimeError(f"a batch of {len(jobs)} jobs gave {len(results)} results")
        except self._isolate as exc:
            if len(jobs) == 1:
                return [(None, exc)]
            # one by one: each caller its own answer or error
            return [self._compute([job])[0] for job in jobs]
        except Exception as exc:
            return [(None, exc)] * len(jobs)
        return [(r, None) for r in results]
