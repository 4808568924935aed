"""Concurrent online checks share X25519 calls, and each gets its own answers."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
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
