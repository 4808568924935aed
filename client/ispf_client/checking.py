"""Online checks as a batch job runs them: every ID asked of every province asked,
paced to each province's probe limit, with a verdict a script can trust.

A province that refuses for its rate limit says when to ask again and what its
limit per minute is (`ProvinceAnswer.retry_after_ms`, `limit_per_minute`). The
IDs it refused are asked again of that province alone, at most its limit at a
time, after the wait it named — unless pacing would take longer than the
caller's `max_wait`, which is said at once rather than found out by waiting.
Whatever is still unanswered at the end is reported as not checked, with why.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ispf.protocol import MAX_CHECK_IDS  # (the node's limit per request)
from ispf.v1 import internal_pb2
from ispf_client.sdk import NodeClient

S = internal_pb2
ANSWERED = frozenset({S.PROVINCE_STATUS_MATCH, S.PROVINCE_STATUS_NO_MATCH})
MIN_PAUSE = 0.05


@dataclass
class CheckRun:
    """Every ID's result (answers of all rounds merged) and why anything went unanswered."""

    results: list[internal_pb2.CheckResult]
    gave_up: dict[str, str] = field(default_factory=dict)  # province -> why pacing stopped

    @property
    def matched(self) -> int:
        return sum(1 for r in self.results if _matched(r))

    def unchecked(self) -> list[internal_pb2.CheckResult]:
        return [r for r in self.results if not _fully_answered(r)]

    def reasons(self) -> list[str]:
        """One phrase per cause of unchecked IDs, most common first (no ID in any)."""
        causes: Counter[tuple[str, str]] = Counter()
        sample: dict[tuple[str, str], str] = {}
        for r in self.results:
            if r.error:
                key = ("", "invalid identity number")
                causes[key] += 1
                sample.setdefault(key, r.error.split(":", 1)[0])
                continue
            for a in r.provinces:
                if a.status in ANSWERED:
                    continue
                status = status_name(a.status).replace("_", " ")
                key = (a.province, status)
                causes[key] += 1
                parts = [x for x in (a.detail, self.gave_up.get(a.province, "")) if x]
                sample.setdefault(key, "; ".join(parts))
        out = []
        for (province, status), n in causes.most_common():
            ids = f"{n} ID" + ("" if n == 1 else "s")
            why = sample[(province, status)]
            where = f"{province} {status}" if province else status
            out.append(f"{where}: {ids}" + (f" ({why})" if why else ""))
        return out


def status_name(status: int) -> str:
    return S.ProvinceStatus.Name(status).removeprefix("PROVINCE_STATUS_").lower()  # type: ignore[arg-type]


def _matched(r: internal_pb2.CheckResult) -> bool:
    return any(a.status == S.PROVINCE_STATUS_MATCH for a in r.provinces)


def _fully_answered(r: internal_pb2.CheckResult) -> bool:
    return not r.error and all(a.status in ANSWERED for a in r.provinces)


def check_paced(
    client: NodeClient,
    nids: list[str],
    *,
    purpose: str = "online-check",
    provinces: list[str] | None = None,
    deadline_ms: int = 2000,
    max_wait: float = 300.0,
    on_wait: Callable[[str, float, int, int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> CheckRun:
    """Check `nids` against `provinces` (default: every peer), pacing to rate limits.

    `on_wait(province, seconds, ids, per_minute)` is told before each wait.
    """
    results = [S.CheckResult(position=i + 1) for i in range(len(nids))]
    answers: list[dict[str, internal_pb2.ProvinceAnswer]] = [{} for _ in nids]
    waiting: dict[str, list[int]] = {}
    ready: dict[str, float] = {}
    limit: dict[str, int] = {}
    gave_up: dict[str, str] = {}

    def ask(indices: list[int], only: list[str]) -> int:
        """Ask, record the answers, queue what was rate-limited; returns how many were."""
        resp = client.check(
            [nids[i] for i in indices], purpose=purpose, provinces=only, deadline_ms=deadline_ms
        )
        now = clock()
        refused = 0
        for k, r in enumerate(resp.results):
            i = indices[k]
            if r.error:
                results[i].error = r.error
                continue
            for a in r.provinces:
                answers[i][a.province] = a
                limited = a.status == S.PROVINCE_STATUS_RATE_LIMITED
                if limited and (a.retry_after_ms or a.limit_per_minute):
                    refused += 1
                    waiting.setdefault(a.province, []).append(i)
                    ready[a.province] = max(
                        ready.get(a.province, 0.0), now + a.retry_after_ms / 1000.0
                    )
                    if a.limit_per_minute:
                        limit[a.province] = a.limit_per_minute
        return refused

    for start in range(0, len(nids), MAX_CHECK_IDS):
        ask(list(range(start, min(len(nids), start + MAX_CHECK_IDS))), list(provinces or []))

    give_up_at = clock() + max_wait
    while waiting:
        province = min(waiting, key=lambda p: ready[p])
        queue = waiting[province]
        per_minute = limit.get(province, 0)
        batch = min(len(queue), per_minute or MAX_CHECK_IDS, MAX_CHECK_IDS)
        # After the first batch, the rest arrives at the province's rate.
        eta = ready[province] + (len(queue) - batch) * 60.0 / per_minute if per_minute else 0.0
        if ready[province] > give_up_at:  # e.g. a daily quota used up
            gave_up[province] = (
                f"it asks to wait {ready[province] - clock():.0f} s, more than the "
                f"{max_wait:.0f} s allowed (--max-wait)"
            )
            del waiting[province]
            continue
        if eta > give_up_at:
            gave_up[province] = (
                f"{len(queue)} ID{'' if len(queue) == 1 else 's'} would take about "
                f"{eta - clock():.0f} s at its limit of {per_minute} per minute, more than "
                f"the {max_wait:.0f} s allowed: split the batch or raise --max-wait"
            )
            del waiting[province]
            continue
        pause = max(MIN_PAUSE, ready[province] - clock())
        if on_wait:
            on_wait(province, pause, len(queue), per_minute)
        sleep(pause)
        chunk, waiting[province] = queue[:batch], queue[batch:]
        if not waiting[province]:
            del waiting[province]
        if not ask(chunk, [province]) and province in waiting and per_minute:
            # Accepted: the bucket is spent; the next batch fits once it has refilled.
            ready[province] = clock() + min(len(waiting[province]), per_minute) * 60.0 / per_minute

    for i, r in enumerate(results):
        if not r.error:
            r.provinces.extend(answers[i].values())  # in the order the node first answered
    return CheckRun(results, gave_up)
