"""Online checks against three peers: matches, freshness, outages, limits, leaks."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from ispf.auditlog import decode_entry
from ispf.v1 import internal_pb2
from ispf_server.pool import BlindingPool
from ispf_server.probes import RateLimiter
from tests.conftest import Federation, backend_store_urls, start_federation
from tests.integration.test_security import Recorder

S = internal_pb2
PEERS = ["sindh", "kp", "balochistan"]
ENROLLED_IN_SINDH = "4210176543212"
RECORDER = Recorder()

# The store backends these tests run on (the `store_backend` fixture, tests/conftest.py).
STORE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="module", params=STORE_BACKENDS)
def fed(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Federation]:
    pool = BlindingPool(0)
    provinces = ["punjab", *PEERS]
    f = start_federation(
        tmp_path_factory.mktemp("check"),
        provinces,
        pool,
        interceptors=(RECORDER,),
        store_urls=backend_store_urls(request, provinces),
    )
    f.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    f.load(
        "sindh",
        [
            ("S1", ENROLLED_IN_SINDH, "SSPA-NASHONUMA", "enrolled"),
            ("S2", ENROLLED_IN_SINDH, "BISP", "eligible"),
            ("S3", "4210100000001", "SSPA", "exited"),
        ],
    )
    f.load("kp", [("K1", "1730155555550", "KP-SEHAT", "eligible")])
    for p in ("sindh", "kp"):  # balochistan has never reconciled with punjab
        assert f.reconcile("punjab", p).state == S.SESSION_STATE_COMPLETED
    yield f
    f.close()
    pool.close()


def answers(resp: internal_pb2.CheckResponse, i: int = 0) -> dict[str, internal_pb2.ProvinceAnswer]:
    return {a.province: a for a in resp.results[i].provinces}


def test_an_enrolled_applicant_is_found_with_programme_and_status(fed: Federation) -> None:
    resp = fed.client("punjab").check(["42101-7654321-2"])
    got = answers(resp)
    assert got["sindh"].status == S.PROVINCE_STATUS_MATCH
    assert {(lb.programme, lb.status) for lb in got["sindh"].labels} == {
        ("SSPA-NASHONUMA", "enrolled"),
        ("BISP", "eligible"),
    }
    assert got["kp"].status == S.PROVINCE_STATUS_NO_MATCH
    assert got["balochistan"].status == S.PROVINCE_STATUS_NOT_SYNCED


def test_an_unknown_applicant_matches_nowhere_and_bad_ids_are_named(fed: Federation) -> None:
    resp = fed.client("punjab").check(["3520299999999", "12345"], provinces=["sindh", "kp"])
    assert {a.status for a in resp.results[0].provinces} == {S.PROVINCE_STATUS_NO_MATCH}
    assert resp.results[1].error.startswith("nid.length") and not resp.results[1].provinces
    assert "12345" not in resp.results[1].error


def test_a_check_of_only_invalid_ids_names_each_and_asks_nobody(fed: Federation) -> None:
    resp = fed.client("punjab").check(["3520212345", "35202-1234567-12"])
    assert [r.error.split(":")[0] for r in resp.results] == ["nid.length", "nid.dash_position"]
    assert all(not r.provinces for r in resp.results)


def test_a_record_loaded_a_moment_ago_is_found_and_a_deleted_one_is_not(fed: Federation) -> None:
    fresh = "1730187654321"
    assert answers(fed.client("punjab").check([fresh], provinces=["kp"]))["kp"].status == (
        S.PROVINCE_STATUS_NO_MATCH
    )
    fed.load("kp", [("K9", fresh, "KP-SEHAT", "enrolled")])
    got = answers(fed.client("punjab").check([fresh], provinces=["kp"]))["kp"]
    assert got.status == S.PROVINCE_STATUS_MATCH
    assert [(lb.programme, lb.status) for lb in got.labels] == [("KP-SEHAT", "enrolled")]
    fed.client("kp").delete(["K9"])
    got = answers(fed.client("punjab").check([fresh], provinces=["kp"]))["kp"]
    assert got.status == S.PROVINCE_STATUS_NO_MATCH


def test_not_authorised_purpose(fed: Federation) -> None:
    got = answers(fed.client("punjab").check([ENROLLED_IN_SINDH], purpose="marketing"))
    assert {a.status for a in got.values()} == {S.PROVINCE_STATUS_NOT_AUTHORISED}


def test_rate_limit_refuses_the_excess_and_the_log_counts_it(fed: Federation) -> None:
    kp = fed.nodes["kp"]
    path = kp.config.policy_file
    original = path.read_text()
    head, rest = original.split("[peers.punjab]")
    limited = rest.replace("probes_per_minute = 60", "probes_per_minute = 3", 1)
    path.write_text(head.replace("version = 1", "version = 2") + "[peers.punjab]" + limited)
    try:
        ids = [f"17301{i:08d}" for i in range(3)]
        first = fed.client("punjab").check(ids, provinces=["kp", "sindh"])
        assert {a.status for a in answers(first).values()} == {S.PROVINCE_STATUS_NO_MATCH}
        second = answers(fed.client("punjab").check(ids[:1], provinces=["kp", "sindh"]))
        assert second["kp"].status == S.PROVINCE_STATUS_RATE_LIMITED
        assert "3 per minute" in second["kp"].detail
        assert second["sindh"].status == S.PROVINCE_STATUS_NO_MATCH
        kp.probes.log.flush()
        entries = [decode_entry(e) for e in kp.store.audit.entries()]
        probes = [e for e in entries if e["type"] == "probes" and e["peer"] == "punjab"]
        assert sum(e["refused"] for e in probes) >= 1
        assert sum(e["values"] for e in probes) >= 4
    finally:
        path.write_text(original)
        kp.probes.limiter = RateLimiter()  # a fresh bucket for the tests that follow


def test_a_stopped_peer_is_unavailable_for_that_province_only(
    fed: Federation, tmp_path: object
) -> None:
    from ispf_server.node import create_server

    fed.stop("sindh")
    try:
        t = time.monotonic()
        got = answers(
            fed.client("punjab").check([ENROLLED_IN_SINDH, "1730155555550"], deadline_ms=1500)
        )
        elapsed = time.monotonic() - t
        assert got["sindh"].status == S.PROVINCE_STATUS_UNAVAILABLE
        kp = answers(fed.client("punjab").check(["1730155555550"]))["kp"]
        assert kp.status == S.PROVINCE_STATUS_MATCH
        assert elapsed < 3.0
    finally:
        server, _port = create_server(fed.nodes["sindh"], f"127.0.0.1:{fed.ports['sindh']}")
        server.start()
        fed.servers["sindh"] = server


def test_checks_are_logged_and_carry_no_id(fed: Federation) -> None:
    fed.nodes["punjab"].checker.log.flush()
    entries = [decode_entry(e) for e in fed.nodes["punjab"].store.audit.entries()]
    assert any(
        e["type"] == "checks" and e["peer"] == "sindh" and e["matched"] >= 1 for e in entries
    )
    wire = b"".join(RECORDER.transcript)
    for nid in (ENROLLED_IN_SINDH, "1730155555550", "3520299999999"):
        assert nid.encode() not in wire
    assert not re.search(rb"\d{13}", b"".join(fed.nodes["punjab"].store.audit.entries()))


def test_a_check_without_ids_or_waiting_too_long_is_refused_with_the_reason(
    fed: Federation,
) -> None:
    from ispf.errors import InvalidInput

    client = fed.client("punjab")
    with pytest.raises(InvalidInput, match="1 to"):
        client.check([])
    with pytest.raises(InvalidInput, match="at most 60000 ms"):
        client.check(["3520212345671"], deadline_ms=3_600_000)
    assert client.check(["3520212345671"], deadline_ms=60_000).results
