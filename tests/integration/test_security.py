"""Roles, mutual TLS, salts, and what never leaves a node or enters a log."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ispf.errors import PermissionDenied, PolicyRefused, UnknownPeer
from ispf.identity import node_hostname
from ispf.keys import ForumSalt
from ispf.v1 import common_pb2, internal_pb2, internal_pb2_grpc, peer_pb2, peer_pb2_grpc
from ispf_client.forum import ForumLayout, create_ca, issue_certificate
from ispf_client.sdk import NodeClient
from ispf_server.node import create_server
from ispf_server.pool import BlindingPool
from ispf_server.salts import SaltRing
from tests.conftest import Federation, start_federation

IDS = ["3520212345671", "4210198765432", "1730155555550", "3520200000001"]


def channel(
    fed: Federation, target: str, cert: Path, key: Path, ca: Path | None = None
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca or fed.layout.ca_cert).read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return grpc.secure_channel(
        f"127.0.0.1:{fed.ports[target]}",
        creds,
        options=[("grpc.ssl_target_name_override", node_hostname(target))],
    )


def node_cert(fed: Federation, province: str) -> tuple[Path, Path]:
    d = fed.layout.node_dir(province)
    return d / "node.pem", d / "node.key"


def test_peer_certificate_cannot_call_the_internal_api(federation: Federation) -> None:
    ch = channel(federation, "punjab", *node_cert(federation, "sindh"))
    stub = internal_pb2_grpc.RegistryServiceStub(ch)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRegistryStats(internal_pb2.GetRegistryStatsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "role 'node'" in (info.value.details() or "")
    recon = internal_pb2_grpc.ReconciliationServiceStub(ch)
    with pytest.raises(grpc.RpcError) as info:
        recon.StartReconciliation(internal_pb2.StartReconciliationRequest(peer="kp"), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_nodes_own_certificate_cannot_call_its_internal_api(federation: Federation) -> None:
    ch = channel(federation, "punjab", *node_cert(federation, "punjab"))
    with pytest.raises(grpc.RpcError) as info:
        internal_pb2_grpc.RegistryServiceStub(ch).GetRegistryStats(
            internal_pb2.GetRegistryStatsRequest(), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_internal_certificate_of_another_province_is_refused(federation: Federation) -> None:
    prof = replace(
        federation.profile("sindh"),
        address=f"127.0.0.1:{federation.ports['punjab']}",
        province="punjab",
    )
    with NodeClient(prof) as c, pytest.raises(PermissionDenied, match="sindh"):
        c.stats()


def test_internal_certificate_cannot_call_the_peer_api(federation: Federation) -> None:
    d = federation.layout.client_dir("sindh")
    ch = channel(federation, "punjab", d / "client.pem", d / "client.key")
    with pytest.raises(grpc.RpcError) as info:
        peer_pb2_grpc.PeerServiceStub(ch).Handshake(peer_pb2.HandshakeRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_client_without_a_forum_certificate_is_refused(
    federation: Federation, tmp_path: Path
) -> None:
    rogue = ForumLayout(tmp_path / "rogue")
    create_ca(rogue)
    cert, key = issue_certificate(
        rogue, name="punjab", role="internal", out_dir=tmp_path / "rogue-client", stem="client"
    )
    # Trusts the real CA for the server, but presents a certificate of another CA.
    ch = channel(federation, "punjab", cert, key)
    with pytest.raises(grpc.RpcError) as info:
        internal_pb2_grpc.RegistryServiceStub(ch).GetRegistryStats(
            internal_pb2.GetRegistryStatsRequest(), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # And with no client certificate at all.
    creds = grpc.ssl_channel_credentials(root_certificates=federation.layout.ca_cert.read_bytes())
    ch2 = grpc.secure_channel(
        f"127.0.0.1:{federation.ports['punjab']}",
        creds,
        options=[("grpc.ssl_target_name_override", node_hostname("punjab"))],
    )
    with pytest.raises(grpc.RpcError) as info:
        internal_pb2_grpc.RegistryServiceStub(ch2).GetRegistryStats(
            internal_pb2.GetRegistryStatsRequest(), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_audit_role_cannot_write_or_match(federation: Federation, tmp_path: Path) -> None:
    cert, key = issue_certificate(
        federation.layout,
        name="auditor-general",
        role="audit",
        out_dir=tmp_path / "aud",
        stem="auditor",
    )
    ch = channel(federation, "punjab", cert, key)
    with pytest.raises(grpc.RpcError) as info:
        internal_pb2_grpc.RegistryServiceStub(ch).UpsertRecords(
            internal_pb2.UpsertRecordsRequest(), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_mismatched_salt_fails_with_failed_precondition(federation: Federation) -> None:
    ch = channel(federation, "punjab", *node_cert(federation, "sindh"))
    wrong = ForumSalt.generate(1)
    with pytest.raises(grpc.RpcError) as info:
        peer_pb2_grpc.PeerServiceStub(ch).Handshake(
            peer_pb2.HandshakeRequest(
                protocol_version=1,
                session_id=str(uuid.uuid4()),
                epoch=1,
                key_check=wrong.key_check(),
                purpose="reconciliation",
                mode=common_pb2.MODE_MUTUAL,
            ),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "different salts" in (info.value.details() or "")


def test_mismatched_salt_fails_the_session_cleanly(federation: Federation, tmp_path: Path) -> None:
    other = tmp_path / "other-salts"
    other.mkdir()
    ForumSalt.generate(1).to_file(other / "epoch-1.salt")
    federation.nodes["punjab"].salts = SaltRing(other)  # punjab was given another salt file
    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    st = federation.reconcile("punjab", "sindh")
    assert st.state == internal_pb2.SESSION_STATE_FAILED
    assert "different salts" in st.error


def test_unknown_peer_and_disallowed_purpose(federation: Federation) -> None:
    with pytest.raises(UnknownPeer, match="known: kp, sindh"):
        federation.client("punjab").start_reconciliation("atlantis")
    # Refused by punjab's own policy before anything is sent.
    with pytest.raises(PolicyRefused, match="purpose 'marketing'"):
        federation.client("punjab").start_reconciliation("sindh", purpose="marketing")
    with pytest.raises(PolicyRefused):
        federation.client("punjab").start_reconciliation("punjab")


def test_health_and_reflection_are_served(federation: Federation) -> None:
    d = federation.layout.client_dir("punjab")
    ch = channel(federation, "punjab", d / "client.pem", d / "client.key")
    for service in ("", "ispf.v1.PeerService", "ispf.v1.RegistryService"):
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    answers = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {
        "ispf.v1.PeerService",
        "ispf.v1.RegistryService",
        "ispf.v1.ReconciliationService",
        "grpc.health.v1.Health",
    } <= names


def wire(m: object) -> bytes:
    """A message as sent: requests reach interceptors as raw bytes (the guard parses them)."""
    return m if isinstance(m, bytes) else m.SerializeToString()  # type: ignore[attr-defined]


class Recorder(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Records every serialized message of the peer API, both directions."""

    def __init__(self) -> None:
        self.transcript: list[bytes] = []

    def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        h = continuation(details)
        if h is None or "PeerService" not in details.method:
            return h
        rec = self.transcript

        def req_it(it):  # type: ignore[no-untyped-def]
            for m in it:
                rec.append(wire(m))
                yield m

        def wrap(fn, stream_in, stream_out):  # type: ignore[no-untyped-def]
            def run(req, ctx):  # type: ignore[no-untyped-def]
                if stream_in:
                    req = req_it(req)
                else:
                    rec.append(wire(req))
                out = fn(req, ctx)
                if stream_out:
                    return (rec.append(wire(m)) or m for m in out)
                rec.append(wire(out))
                return out

            return run

        kw = {
            "request_deserializer": h.request_deserializer,
            "response_serializer": h.response_serializer,
        }
        if h.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(h.unary_unary, False, False), **kw)
        if h.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(h.stream_unary, True, False), **kw)
        if h.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(h.unary_stream, False, True), **kw)
        return grpc.stream_stream_rpc_method_handler(wrap(h.stream_stream, True, True), **kw)


def secrets_in(data: bytes, salt: ForumSalt) -> list[str]:
    hits = []
    for nid in IDS:
        for form in (nid, f"{nid[:5]}-{nid[5:12]}-{nid[12]}", nid[5:12]):
            if form.encode() in data:
                hits.append(form)
    raw = salt.unsafe_raw()
    if raw in data or raw.hex().encode() in data:
        hits.append("salt")
    return hits


def test_no_raw_id_or_salt_in_peer_messages_or_logs(
    tmp_path: Path, all_logs: pytest.LogCaptureFixture, inline_pool: BlindingPool
) -> None:
    fed = start_federation(tmp_path, ["punjab", "sindh"], inline_pool)
    recorder = Recorder()
    # Sindh answers through a second server of the same node that records the transcript.
    rec_server, rec_port = create_server(fed.nodes["sindh"], "127.0.0.1:0", interceptors=[recorder])
    rec_server.start()
    fed.nodes["punjab"].peer_addresses["sindh"] = f"127.0.0.1:{rec_port}"
    try:
        fed.load("punjab", [(f"A{i}", n, "BISP", "enrolled") for i, n in enumerate(IDS)])
        fed.load("sindh", [(f"B{i}", n, "PSER", "eligible") for i, n in enumerate(IDS[1:3])])
        bad = fed.client("punjab").upsert(
            [
                internal_pb2.Record(
                    record_id="X", nid="35202-123456-71", programme="BISP", status="enrolled"
                )
            ]
        )
        assert bad.errors and "35202" not in bad.errors[0].reason
        st = fed.reconcile("punjab", "sindh")
        assert st.state == internal_pb2.SESSION_STATE_COMPLETED and st.match_count == 2
        st = fed.reconcile("punjab", "sindh", count_only=True)
        assert st.match_count == 2
    finally:
        rec_server.stop(None)
        fed.close()
    salt = fed.nodes["punjab"].current_salt
    assert len(recorder.transcript) > 10
    assert secrets_in(b"".join(recorder.transcript), salt) == []
    log_text = "\n".join(r.getMessage() for r in all_logs.records).encode()
    assert b"completed" in log_text
    assert secrets_in(log_text, salt) == []
    assert re.search(rb"\d{13}", log_text) is None
