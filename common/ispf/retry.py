"""Retries with exponential backoff and full jitter, for retriable gRPC codes only.

Retriable: UNAVAILABLE (peer down, connection dropped) and DEADLINE_EXCEEDED
on calls that are safe to repeat. Everything else is an answer, not a glitch,
and is raised at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class Backoff:
    attempts: int = 5
    base: float = 0.2
    cap: float = 10.0

    def delays(self, rng: random.Random | None = None) -> list[float]:
        """Full jitter: attempt k waits uniform(0, min(cap, base * 2**k))."""
        r = rng or random.Random()
        return [r.uniform(0, min(self.cap, self.base * 2**k)) for k in range(self.attempts - 1)]


def retrying(
    call: Callable[[], T],
    what: str,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `call`; on a retriable status, wait and try again, up to `backoff.attempts`."""
    delays = backoff.delays()
    for attempt in range(backoff.attempts):
        try:
            return call()
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code not in RETRIABLE or attempt == backoff.attempts - 1:
                raise
            log.info("%s: %s, retry %d of %d", what, code, attempt + 1, backoff.attempts - 1)
            sleep(delays[attempt])
    raise AssertionError("unreachable")  # pragma: no cover
