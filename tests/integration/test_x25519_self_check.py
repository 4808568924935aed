"""The node's X25519 self-checks with real servers: a backend that disagrees with
cryptography at start-up is refused (fallback, log, health, metric); one that
starts disagreeing while serving fails the session precisely and is marked
unhealthy, after which the node computes X25519 with cryptography."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ispf.errors import BackendUnavailable
from ispf.hazmat import backends, curve
from ispf.identity import node_hostname
from ispf.v1 import internal_pb2
from ispf_server.node import X25519_HEALTH
from ispf_server.pool import BlindingPool
from tests.conftest import Federation, start_federation
from tests.integration.test_observability import scrape, wait_for

COMPLETED, FAILED = internal_pb2.SESSION_STATE_COMPLETED, internal_pb2.SESSION_STATE_FAILED
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FaultyLadder:
    """The real native module, except that x25519_many flips one bit of every
    output while `broken` (as a faulty ladder step or a miscompiled build would)."""

    def __init__(self, real: ModuleType, broken: bool) -> None:
        self._real, self.broken = real, broken

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def x25519_many(self, scalar: bytes, packed: bytes, out_bytes: int) -> tuple[bytes, int]:
        out, bad = self._real.x25519_many(scalar, packed, out_bytes)
        if self.broken and bad < 0:
            out = bytes(b ^ (1 if i % out_bytes == 0 else 0) for i, b in enumerate(out))
        return out, bad


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> FaultyLadder:
    try:
        backends.IfmaBackend.load()
    except BackendUnavailable as exc:
        pytest.skip(f"ifma backend unavailable here: {exc.message}")
    ladder = FaultyLadder(curve.native, broken=False)  # type: ignore[arg-type]
    monkeypatch.setattr(curve, "native", ladder)
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "STATUS", backends.BackendStatus())
    return ladder


def _start(tmp_path: Path) -> Iterator[Federation]:
    pool = BlindingPool(0)
    fed = start_federation(tmp_path, ["punjab", "sindh"], pool, health_interval=0.2)
    yield fed
    fed.close()
    pool.close()


def x25519_health(fed: Federation, province: str, service: str = X25519_HEALTH) -> int:
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
        req = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(ch).Check(req, timeout=5).status)


ROWS = [("P1", "3520212345671", "BISP", "enrolled"), ("P2", "3520212345672", "BISP", "enrolled")]


def test_a_backend_failing_its_start_up_check_is_refused_for_cryptography(
    faulty: FaultyLadder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faulty.broken = True
    with caplog.at_level("ERROR", logger="ispf.hazmat.backends"):
        fed_iter = _start(tmp_path)
        fed = next(fed_iter)
    try:
        assert fed.nodes["sindh"].backend.name == "cryptography"
        assert any(
            "ifma failed its start-up self-check (known answer 0 (RFC 7748) is wrong): "
            "using cryptography instead" in r.getMessage()
            for r in caplog.records
        )
        wait_for(lambda: x25519_health(fed, "sindh"), NOT_SERVING)
        assert x25519_health(fed, "sindh", "") == SERVING  # it serves on, with cryptography
        port = fed.nodes["sindh"].metrics.serve("127.0.0.1:0")
        text = scrape(port)
        assert "ispf_x25519_healthy 0.0" in text and "ispf_x25519_mismatches 1.0" in text
        fed.load("punjab", ROWS)
        fed.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
        st = fed.reconcile("punjab", "sindh")
        assert st.state == COMPLETED and st.match_count == 1
    finally:
        next(fed_iter, None)


def test_a_spot_check_mismatch_fails_the_session_and_marks_the_backend_unhealthy(
    faulty: FaultyLadder, tmp_path: Path
) -> None:
    fed_iter = _start(tmp_path)
    fed = next(fed_iter)
    try:
        ifma = fed.nodes["sindh"].backend
        assert isinstance(ifma, backends.IfmaBackend)  # passed its start-up check
        wait_for(lambda: x25519_health(fed, "sindh"), SERVING)
        ifma.check_every, ifma._next_check = 1, 0  # check every output (normally ~1/4096)
        faulty.broken = True
        fed.load("punjab", ROWS)
        fed.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
        st = fed.reconcile("punjab", "sindh")
        assert st.state == FAILED
        assert re.search(
            r"X25519 backend ifma disagreed with cryptography on value \d+ of this batch", st.error
        ), st.error
        assert not ifma.healthy and not backends.STATUS.healthy
        wait_for(lambda: x25519_health(fed, "sindh"), NOT_SERVING)
        port = fed.nodes["sindh"].metrics.serve("127.0.0.1:0")
        assert "ispf_x25519_healthy 0.0" in scrape(port)
        # From now on cryptography computes X25519: the next session is right.
        st = fed.reconcile("punjab", "sindh")
        assert st.state == COMPLETED and st.match_count == 1
    finally:
        next(fed_iter, None)
