"""Blinding across all cores.

With the `ifma` backend and the native module, hashing and blinding run
in C without the GIL, so the pool is threads in the node process: no pickling,
no second copy of each chunk. X25519 in `cryptography` holds the GIL, so with
it the node blinds in worker processes (spawned, not forked: forking a process
that runs gRPC is unsafe). Salt and scalar bytes travel to the workers with
each task over the pool's pipe, inside the node; key objects refuse pickling.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

from ispf.blinding import raw_hash_and_blind_many, raw_reblind_many, releases_gil
from ispf.keys import BlindingKey, ForumSalt
from ispf.nid import PackedNids

T = TypeVar("T")


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: leave when the node is gone.

    Every worker holds the write end of the pool's task pipe, so a node killed
    outright (SIGKILL, OOM) would leave them waiting forever; a daemon thread
    notices the re-parenting and exits the worker.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _InlineExecutor(Executor):
    """Runs tasks in the calling thread: for tests and tiny federations."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


class BlindingPool:
    """Hashes and blinds packed chunks of values, `workers` wide (0: inline).

    `threads` (default: where the backend releases the GIL) picks threads over
    worker processes."""

    def __init__(self, workers: int, backend: str = "auto", threads: bool | None = None) -> None:
        self.workers = workers
        self.backend = backend
        self.threads = releases_gil(backend) if threads is None else threads
        self._executor: Executor
        if workers > 0 and self.threads:
            self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blind")
        elif workers > 0:
            self._executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
        else:
            self._executor = _InlineExecutor()

    def describe(self) -> str:
        if self.workers == 0:
            return "inline"
        return f"{self.workers} {'threads' if self.threads else 'worker processes'}"

    @property
    def depth(self) -> int:
        """How many chunks to keep in flight so every worker stays busy."""
        return max(2, 2 * self.workers + 1)

    def hash_and_blind(
        self, salt: ForumSalt, key: BlindingKey, digits: Sequence[bytes] | PackedNids
    ) -> Future[bytes]:
        return self._executor.submit(
            raw_hash_and_blind_many, salt.unsafe_raw(), key.unsafe_raw(), digits, self.backend
        )

    def reblind(self, key: BlindingKey, packed: bytes, out_bytes: int) -> Future[bytes]:
        return self._executor.submit(
            raw_reblind_many, key.unsafe_raw(), packed, out_bytes, self.backend
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def pipelined(
    submit: Callable[[T], Future[bytes]], items: Iterable[T], depth: int
) -> Iterator[tuple[T, bytes]]:
    """Yield (item, result) in input order, keeping up to `depth` tasks in flight."""
    window: deque[tuple[T, Future[bytes]]] = deque()
    try:
        for item in items:
            window.append((item, submit(item)))
            if len(window) >= depth:
                head, fut = window.popleft()
                yield head, fut.result()
        while window:
            head, fut = window.popleft()
            yield head, fut.result()
    finally:
        for _, fut in window:
            fut.cancel()
