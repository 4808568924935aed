"""Concurrent online checks share X25519 calls, and each gets its own answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ispf.v1 import internal_pb2
from ispf_server.pool import BlindingPool
from tests.conftest import Federation, start_federation

S = internal_pb2
ENROLLED = {  # ID -> the province it is enrolled in
    **{f"42101{i:07d}1": "sindh" for i in range(6)},
    **{f"17301{i:07d}1": "kp" for i in range(6)},
}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    pool = BlindingPool(0)
    f = start_federation(tmp_path_factory.mktemp("batched"), ["punjab", "sindh", "kp"], pool)
    f.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    for p in ("sindh", "kp"):
        rows = [(f"{p}{i}", n, "BISP", "enrolled") for i, (n, q) in enumerate(ENROLLED.items())]
        f.load(p, [r for r in rows if ENROLLED[r[1]] == p])
        assert f.reconcile("punjab", p).state == S.SESSION_STATE_COMPLETED
    yield f
    f.close()
    pool.close()


def _slowed(coalescer: Any, seconds: float) -> None:
    """Each batch takes a while longer, so that concurrent calls overlap."""
    run = coalescer._run

    def slow(jobs: Sequence[Any]) -> Any:
        time.sleep(seconds)
        return run(jobs)

    coalescer._run = slow


def test_concurrent_checks_share_ladder_calls_and_get_their_own_answers(
    fed: Federation,
) -> None:
    asker = fed.nodes["punjab"].checker.blinder
    peers = [fed.nodes[p].probes.reblinder for p in ("sindh", "kp")]
    for c in (asker, *peers):
        _slowed(c, 0.03)
    ids = [*ENROLLED, *(f"35202{i:07d}1" for i in range(10))]  # 22 checks, each peer's limit
    calls0, batches0 = asker.stats.calls, asker.stats.batches
    with ThreadPoolExecutor(len(ids)) as ex:
        got = list(ex.map(lambda n: (n, fed.client("punjab").check([n])), ids))
    for nid, resp in got:
        by = {a.province: a.status for a in resp.results[0].provinces}
        want = {
            p: S.PROVINCE_STATUS_MATCH if ENROLLED.get(nid) == p else S.PROVINCE_STATUS_NO_MATCH
            for p in ("sindh", "kp")
        }
        assert by == want, nid
    assert asker.stats.calls - calls0 == 2 * len(ids)  # (a probe per peer per check)
    assert asker.stats.batches - batches0 < asker.stats.calls - calls0  # (some shared)
    assert asker.stats.largest > 1 and any(p.stats.largest > 1 for p in peers)


def _federation(root: Any, pool: BlindingPool, policy: dict[str, int]) -> Federation:
    f = start_federation(root, ["punjab", "sindh", "kp"], pool, policy=policy)
    f.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    for p in ("sindh", "kp"):
        rows = [(f"{p}{i}", n, "BISP", "enrolled") for i, (n, q) in enumerate(ENROLLED.items())]
        f.load(p, [r for r in rows if ENROLLED[r[1]] == p])
        assert f.reconcile("punjab", p).state == S.SESSION_STATE_COMPLETED
    return f


def _want(nid: str, provinces: Sequence[str] = ("sindh", "kp")) -> dict[str, int]:
    return {
        p: S.PROVINCE_STATUS_MATCH if ENROLLED.get(nid) == p else S.PROVINCE_STATUS_NO_MATCH
        for p in provinces
    }


def test_concurrent_checks_share_probe_calls_and_each_gets_its_own_hits(
    tmp_path: Any, inline_pool: BlindingPool
) -> None:
    """Checks to a peer that arrive while a Probe to it is on its way go in the next
    one together; each check still gets exactly its own answers, by position,
    including checks of several IDs."""
    fed = _federation(tmp_path, inline_pool, {"probes_per_minute": 6000})
    try:
        prober = fed.nodes["punjab"].checker.prober
        _slowed(prober, 0.05)
        others = [f"35202{i:07d}1" for i in range(12)]
        enrolled = list(ENROLLED)
        checks = [[enrolled[i], others[i]][:: 1 if i % 2 else -1][: 1 + i % 2] for i in range(12)]
        checks += [[others[i], enrolled[i], enrolled[-1 - i]] for i in range(6)]
        with ThreadPoolExecutor(len(checks)) as ex:
            got = list(ex.map(lambda ids: (ids, fed.client("punjab").check(ids)), checks))
        for ids, resp in got:
            assert [r.position for r in resp.results] == list(range(1, len(ids) + 1))
            for nid, result in zip(ids, resp.results, strict=True):
                assert {a.province: a.status for a in result.provinces} == _want(nid), (ids, nid)
        assert prober.stats.calls == 2 * len(checks)  # (a probe per peer per check)
        assert prober.stats.batches < prober.stats.calls and prober.stats.largest > 3
    finally:
        fed.close()


def test_a_shared_probe_refused_for_its_size_is_asked_again_check_by_check(
    tmp_path: Any, inline_pool: BlindingPool
) -> None:
    """A peer's rate limit that refuses the shared Probe (more values than it allows
    now) need not refuse each check in it: each is asked on its own, and answered
    or refused as it would have been alone."""
    fed = _federation(tmp_path, inline_pool, {"probes_per_minute": 3})
    try:
        prober = fed.nodes["punjab"].checker.prober
        _slowed(prober, 0.2)
        ids = [*list(ENROLLED)[:2], "3520200000011", "3520200000021"]
        client = fed.client("punjab")
        with ThreadPoolExecutor(len(ids)) as ex:
            got = list(ex.map(lambda n: (n, client.check([n], provinces=["sindh"])), ids))
        statuses = []
        for nid, resp in got:
            (answer,) = resp.results[0].provinces
            statuses.append(answer.status)
            if answer.status != S.PROVINCE_STATUS_RATE_LIMITED:
                assert answer.status == _want(nid, ["sindh"])["sindh"], nid
        assert statuses.count(S.PROVINCE_STATUS_RATE_LIMITED) == 1, statuses
        assert prober.stats.largest > 1  # (some were sent together first)
    finally:
        fed.close()


SINDH_NID = next(n for n, p in ENROLLED.items() if p == "sindh")


def _three_checks(fed: Federation, short_ms: int, long_ms: int) -> dict[str, tuple[float, int]]:
    """A first check, then a short and a long one that share the next Probe."""
    checker = fed.nodes["punjab"].checker
    out: dict[str, tuple[float, int]] = {}

    def one(name: str, ms: int) -> None:
        t = time.monotonic()
        r = checker.check(S.CheckRequest(nids=[SINDH_NID], provinces=["sindh"], deadline_ms=ms))
        out[name] = (time.monotonic() - t, r.results[0].provinces[0].status)

    threads = []
    for name, ms in (("first", 5000), ("short", short_ms), ("long", long_ms)):
        threads.append(threading.Thread(target=one, args=(name, ms)))
        threads[-1].start()
        time.sleep(0.1)
    for t in threads:
        t.join(20)
    return out


def _peer(fed: Federation, answer: Callable[[int, int], None]) -> list[int]:
    """Sindh's Probe answers, each first through `answer(call number, values)`."""
    answerer = fed.nodes["sindh"].probes
    real = answerer.probe
    calls: list[int] = []

    def peer(req: Any, caller: str, timeout: Any = None) -> Any:
        calls.append(len(req.values) // 32)
        answer(len(calls), calls[-1])
        return real(req, caller, timeout)

    answerer.probe = peer  # type: ignore[method-assign]
    return calls


def test_each_check_in_a_shared_probe_keeps_its_own_deadline(
    tmp_path: Any, inline_pool: BlindingPool
) -> None:
    """A slow peer (1 s a Probe). While a first check's Probe is on its way, a check
    of a 1.5 s deadline and one of 5 s come, and go in the next Probe together, the
    short one leading it. The short one is answered "no answer in time" at its own
    deadline (not when the call ends, past it); the long one gets its hit from
    that same call."""
    fed = _federation(tmp_path, inline_pool, {"probes_per_minute": 6000})
    try:
        _peer(fed, lambda call, n: time.sleep(1.0))
        out = _three_checks(fed, 1500, 5000)
        assert fed.nodes["punjab"].checker.prober.stats.largest == 2  # (short and long shared)
        took, status = out["short"]
        assert status == S.PROVINCE_STATUS_UNAVAILABLE and took < 1.5 + 0.25, out
        for name in ("first", "long"):
            assert out[name][1] == S.PROVINCE_STATUS_MATCH, (name, out)
    finally:
        fed.close()


def test_a_shared_probe_the_budget_refuses_costs_the_rate_limit_one_value(
    tmp_path: Any, inline_pool: BlindingPool
) -> None:
    """Sindh's query budget for Punjab has 2 values left. One check alone takes one;
    the next two share a Probe, which the budget refuses (2 values, 1 left), and
    are asked again one by one: one answered, one refused. A refusal costs one
    value of the rate limit and the daily quota, not all it held: 2 answered, 2
    refusals (the shared Probe's 2 values would have cost 2)."""
    fed = _federation(tmp_path, inline_pool, {"probes_per_minute": 6000})
    try:
        sindh = fed.nodes["sindh"]
        epoch = fed.nodes["punjab"].checker.salt().epoch
        pp = sindh.probes.policy().peers["punjab"]
        allowance = sindh.probes.budget.state(pp, epoch).allowance
        sindh.store.db.write(
            "UPDATE query_budget SET used=? WHERE peer=? AND epoch=?",
            (allowance - 2, "punjab", epoch),
        )
        prober = fed.nodes["punjab"].checker.prober
        _slowed(prober, 0.3)
        day0 = sindh.probes.limiter._day.get("punjab", ("", 0))[1]
        client = fed.client("punjab")
        ids = [next(iter(ENROLLED)), "3520200000011", "3520200000021"]
        got: dict[str, int] = {}

        def one(nid: str) -> None:
            got[nid] = client.check([nid], provinces=["sindh"]).results[0].provinces[0].status

        first = threading.Thread(target=one, args=(ids[0],))
        first.start()
        time.sleep(0.1)  # (its Probe on its way: the next two share one)
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(one, ids[1:]))
        first.join(10)
        assert prober.stats.largest == 2
        assert sorted(got.values()).count(S.PROVINCE_STATUS_RATE_LIMITED) == 1, got
        assert sindh.probes.limiter._day["punjab"][1] - day0 == 2 + 2
    finally:
        fed.close()


def test_probes_refused_all_the_same_stay_rate_limited(
    tmp_path: Any, inline_pool: BlindingPool
) -> None:
    """A peer probing an epoch never reconciled (its choice), or with its budget spent,
    is refused, and each refusal costs at least one value of its rate limit: past
    its 3 a minute it is refused for the rate, before any store read."""
    from ispf.errors import PreconditionFailed, RateLimited
    from ispf.v1 import peer_pb2

    fed = _federation(tmp_path, inline_pool, {"probes_per_minute": 3})
    try:
        answerer = fed.nodes["sindh"].probes
        req = peer_pb2.ProbeRequest(epoch=999, purpose="online-check", values=bytes(32))
        kinds = []
        for _ in range(20):
            try:
                answerer.probe(req, "punjab")
            except RateLimited:
                kinds.append("rate")
            except PreconditionFailed:
                kinds.append("not synced")
        assert kinds.count("not synced") == 3 and kinds.count("rate") == 17, kinds
    finally:
        fed.close()


def test_checks_asked_again_alone_each_wait_for_their_own_answer_only(
    tmp_path: Any, inline_pool: BlindingPool
) -> None:
    """A shared Probe refused for its size: each check is asked again alone, all at
    once, each waiting for its own answer. The short check's comes at once and
    it matches, though the long one's re-ask is slow (3 s)."""
    from ispf.errors import ResourceExhausted

    fed = _federation(tmp_path, inline_pool, {"probes_per_minute": 6000})
    try:

        def answer(call: int, n: int) -> None:
            if call == 1:
                time.sleep(0.4)  # (the first check's Probe: the next two queue)
            elif n > 1:
                raise ResourceExhausted("refused for its size (test)")
            elif call == 4:
                time.sleep(3.0)  # (the second re-ask: a slow peer)

        calls = _peer(fed, answer)
        out = _three_checks(fed, 1500, 5000)
        assert calls[:2] == [1, 2], calls
        assert out["short"][1] == S.PROVINCE_STATUS_MATCH, (out, calls)
        assert out["long"][1] == S.PROVINCE_STATUS_MATCH, (out, calls)
    finally:
        fed.close()


def test_a_shared_probe_refused_after_the_first_deadline_is_still_asked_again_alone(
    tmp_path: Any, inline_pool: BlindingPool
) -> None:
    """Mixed deadlines: the refusal for its size comes after the short check's
    deadline (which answers "no answer in time"); the long check is asked again
    alone, and matches."""
    from ispf.errors import ResourceExhausted

    fed = _federation(tmp_path, inline_pool, {"probes_per_minute": 6000})
    try:

        def answer(call: int, n: int) -> None:
            if call == 1:
                time.sleep(0.25)
            elif n > 1:
                time.sleep(0.6)  # (past the short check's deadline)
                raise ResourceExhausted("refused for its size (test)")

        calls = _peer(fed, answer)
        out = _three_checks(fed, 500, 5000)
        assert calls[:2] == [1, 2], calls
        assert out["short"][1] == S.PROVINCE_STATUS_UNAVAILABLE, (out, calls)
        assert out["long"][1] == S.PROVINCE_STATUS_MATCH, (out, calls)
    finally:
        fed.close()
