"""Metrics, structured logs with request ids, and health that reflects readiness."""

from __future__ import annotations

import io
import json
import logging
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ispf import logs
from ispf.errors import IspfError
from ispf.identity import node_hostname
from ispf.v1 import internal_pb2
from ispf_server.pool import BlindingPool
from tests.conftest import Federation, start_federation
from tests.pgserver import PgServer


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Federation]:
    pool = BlindingPool(0)
    f = start_federation(tmp_path, ["punjab", "sindh"], pool, health_interval=0.2)
    yield f
    f.close()
    pool.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_metrics_count_sessions_values_probes_and_rpcs(fed: Federation) -> None:
    port = fed.nodes["sindh"].metrics.serve("127.0.0.1:0")
    fed.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    fed.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    assert fed.reconcile("punjab", "sindh").state == internal_pb2.SESSION_STATE_COMPLETED
    fed.client("punjab").check(["3520212345671"], provinces=["sindh"])
    text = scrape(port)
    assert 'ispf_sessions_total{outcome="completed",role="responder",sync="full"} 1.0' in text
    assert re.search(r"ispf_values_blinded_total [1-9]", text)
    assert 'ispf_probes_total{peer="punjab",result="answered"} 1.0' in text
    assert 'ispf_rpc_seconds_count{code="OK",method="/ispf.v1.PeerService/Handshake"} 1.0' in text
    assert "ispf_ready 1.0" in text and "ispf_registry_records 1.0" in text
    assert "3520212345671" not in text


def test_metrics_count_compactions_and_the_overlay_waiting(fed: Federation) -> None:
    node = fed.nodes["sindh"]
    port = node.metrics.serve("127.0.0.1:0")
    compactor = node.store.compactor
    compactor.share, compactor.minimum, compactor.quiet = 0.0, 1, 5.0
    fed.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    fed.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    assert fed.reconcile("punjab", "sindh").sync == "full"
    fed.load("sindh", [("S2", "3520212345672", "SSPA", "eligible")])
    assert fed.reconcile("punjab", "sindh").sync == "incremental"
    assert "ispf_pair_overlay_rows 0.0" not in scrape(port)  # (compacted once quiet, 5 s)
    compactor.wait(60)
    text = scrape(port)
    assert "ispf_pair_compactions_compacted 1.0" in text
    assert "ispf_pair_compactions_failed 0.0" in text
    assert "ispf_pair_overlay_rows 0.0" in text
    compactor.counts.gave_way, compactor.counts.failed = 2, 3  # (each outcome its own gauge)
    text = scrape(port)
    assert "ispf_pair_compactions_gave_way 2.0" in text
    assert "ispf_pair_compactions_failed 3.0" in text


def test_every_log_line_is_json_with_request_and_session_ids(fed: Federation) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        fed.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
        st = fed.reconcile("punjab", "sindh")
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines
    for doc in lines:
        assert {"time", "level", "logger", "message", "request_id", "session_id"} <= doc.keys()
        assert "3520212345671" not in json.dumps(doc)
    mine = [d for d in lines if d["session_id"] == st.session_id]
    assert len(mine) >= 2  # both sides' lines about the session carry its id
    assert all(d["request_id"] != "-" for d in mine)


def health(fed: Federation, province: str) -> int:
    d = fed.layout.client_dir(province)
    creds = grpc.ssl_channel_credentials(
        root_certificates=fed.layout.ca_cert.read_bytes(),
        private_key=(d / "client.key").read_bytes(),
        certificate_chain=(d / "client.pem").read_bytes(),
    )
    with grpc.secure_channel(
        f"127.0.0.1:{fed.ports[province]}",
        creds,
        options=[("grpc.ssl_target_name_override", node_hostname(province))],
    ) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(resp.status)


def wait_for(fn: object, want: int, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while fn() != want:  # type: ignore[operator]
        assert time.monotonic() < deadline, f"health never became {want}"
        time.sleep(0.05)


def test_health_follows_key_and_salt_readiness(fed: Federation) -> None:
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert health(fed, "punjab") == serving
    salt = fed.layout.salt_dir / "epoch-1.salt"
    kept = salt.read_bytes()
    salt.unlink()  # an operator moved the current salt away
    try:
        wait_for(lambda: health(fed, "punjab"), not_serving)
    finally:
        salt.write_bytes(kept)
        salt.chmod(0o600)
    wait_for(lambda: health(fed, "punjab"), serving)
    key = fed.layout.node_dir("punjab") / "log.key"
    key.chmod(0o644)
    try:
        wait_for(lambda: health(fed, "punjab"), not_serving)
    finally:
        key.chmod(0o600)
    wait_for(lambda: health(fed, "punjab"), serving)


def test_request_ids_never_look_like_an_id_number() -> None:
    for _ in range(2000):
        assert not re.search(r"\d{13}", logs.new_request_id())


def test_a_replica_that_loses_its_database_is_not_serving_until_it_is_back(
    tmp_path: Path, pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL store: the database refuses the node's connections (as when it is
    down or fenced off): health turns NOT_SERVING, so a load balancer sends the node's
    callers to another replica; SERVING again once the database is back."""
    pool = BlindingPool(0)
    name = "health_punjab"
    url = pg_server.create_database(name)
    fed = start_federation(
        tmp_path, ["punjab"], pool, store_urls={"punjab": url}, health_interval=0.2
    )
    admin = pg_server.url("postgres")
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    try:
        wait_for(lambda: health(fed, "punjab"), serving)
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        wait_for(lambda: health(fed, "punjab"), not_serving, seconds=20)
        with pytest.raises(IspfError) as info:  # a call that needs the store: retriable
            fed.client("punjab").upsert(
                [
                    internal_pb2.Record(
                        record_id="r", nid="3520212345671", programme="B", status="e", position=1
                    )
                ]
            )
        assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        wait_for(lambda: health(fed, "punjab"), serving, seconds=20)
        said = [r.getMessage() for r in caplog.records if r.name == "ispf_server.health"]
        assert any("not ready: store: StoreUnavailable" in m for m in said), said
        assert any("ready again" in m for m in said), said
    finally:
        fed.close()
        pool.close()
        pg_server.drop_database(name)
