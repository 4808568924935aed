"""Forum PKI (roles, revocation, rotation), salt epochs, and the data-sharing policy."""

from __future__ import annotations

import socket
import ssl
import uuid
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ispf.auditlog import decode_entry
from ispf.errors import KeyFileError, PolicyRefused, UnknownSession
from ispf.identity import node_hostname
from ispf.nodeconfig import load_config
from ispf.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    internal_pb2,
    internal_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
)
from ispf_client.cli import main
from ispf_client.forum import issue_certificate, new_salt, revoke
from ispf_server.node import Node
from ispf_server.pool import BlindingPool
from tests.conftest import Federation

COMPLETED = internal_pb2.SESSION_STATE_COMPLETED
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED


def call_as(fed: Federation, target: str, cert: Path, key: Path, api: str) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(
        root_certificates=fed.layout.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    with grpc.secure_channel(
        f"127.0.0.1:{fed.ports[target]}",
        creds,
        options=[("grpc.ssl_target_name_override", node_hostname(target))],
    ) as ch:
        calls = {
            "peer": lambda: peer_pb2_grpc.PeerServiceStub(ch).Abort(
                peer_pb2.AbortRequest(session_id=str(uuid.uuid4())), timeout=5
            ),
            "registry": lambda: internal_pb2_grpc.RegistryServiceStub(ch).GetRegistryStats(
                internal_pb2.GetRegistryStatsRequest(), timeout=5
            ),
            "reconciliation": lambda: internal_pb2_grpc.ReconciliationServiceStub(ch).ListSessions(
                internal_pb2.ListSessionsRequest(), timeout=5
            ),
            "audit": lambda: audit_pb2_grpc.AuditServiceStub(ch).GetCheckpoint(
                audit_pb2.GetCheckpointRequest(), timeout=5
            ),
            "health": lambda: health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            ),
        }
        try:
            calls[api]()
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            # The peer API answers an unknown session with NOT_FOUND: the call got through.
            return OK if code == grpc.StatusCode.NOT_FOUND else code
        return OK


# Who calls punjab's node, and what each API must answer.
MATRIX = {
    "node of sindh": {
        "peer": OK,
        "registry": DENIED,
        "reconciliation": DENIED,
        "audit": DENIED,
        "health": OK,
    },
    "node of punjab itself": {
        "peer": OK,
        "registry": DENIED,
        "reconciliation": DENIED,
        "audit": DENIED,
        "health": OK,
    },
    "internal of punjab": {
        "peer": DENIED,
        "registry": OK,
        "reconciliation": OK,
        "audit": OK,
        "health": OK,
    },
    "internal of sindh": {
        "peer": DENIED,
        "registry": DENIED,
        "reconciliation": DENIED,
        "audit": DENIED,
        "health": DENIED,
    },
    "auditor": {
        "peer": DENIED,
        "registry": DENIED,
        "reconciliation": DENIED,
        "audit": OK,
        "health": OK,
    },
}


def cert_of(fed: Federation, who: str) -> tuple[Path, Path]:
    lay = fed.layout
    paths = {
        "node of sindh": (lay.node_dir("sindh"), "node"),
        "node of punjab itself": (lay.node_dir("punjab"), "node"),
        "internal of punjab": (lay.client_dir("punjab"), "client"),
        "internal of sindh": (lay.client_dir("sindh"), "client"),
        "auditor": (lay.auditor_dir("auditor"), "auditor"),
    }
    d, stem = paths[who]
    return d / f"{stem}.pem", d / f"{stem}.key"


@pytest.mark.parametrize("who", sorted(MATRIX))
def test_each_role_reaches_only_its_apis(federation: Federation, who: str) -> None:
    got = {
        api: call_as(federation, "punjab", *cert_of(federation, who), api) for api in MATRIX[who]
    }
    assert got == MATRIX[who]


def test_revoked_certificates_are_refused_without_restart(federation: Federation) -> None:
    lay = federation.layout
    assert call_as(federation, "punjab", *cert_of(federation, "auditor"), "audit") == OK
    assert (
        main(
            [
                "forum",
                "revoke",
                "--dir",
                str(lay.root),
                "--cert",
                str(lay.auditor_dir("auditor") / "auditor.pem"),
                "--reason",
                "laptop lost",
            ]
        )
        == 0
    )
    assert call_as(federation, "punjab", *cert_of(federation, "auditor"), "audit") == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    # A revoked node certificate can no longer open sessions with its peers.
    revoke(lay, cert=lay.node_dir("sindh") / "node.pem")
    federation.load("sindh", [("S1", "4210112345671", "SSPA", "enrolled")])
    st = federation.reconcile("sindh", "punjab")
    assert st.state != COMPLETED and "revoked" in st.error
    assert federation.reconcile("kp", "punjab").state == COMPLETED


def served_serial(fed: Federation, province: str) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fed.layout.ca_cert)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    d = fed.layout.client_dir(province)
    ctx.load_cert_chain(d / "client.pem", d / "client.key")
    with (
        socket.create_connection(("127.0.0.1", fed.ports[province]), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname=node_hostname(province)) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_node_certificate_rotates_without_downtime(federation: Federation) -> None:
    lay = federation.layout
    old_pem = lay.node_dir("punjab") / "node.pem"
    old_serial = x509.load_pem_x509_certificate(old_pem.read_bytes()).serial_number
    assert served_serial(federation, "punjab") == old_serial
    issue_certificate(
        lay,
        name="punjab",
        role="node",
        out_dir=lay.node_dir("punjab"),
        stem="node",
        hosts=("127.0.0.1", "localhost"),
    )
    new_serial = x509.load_pem_x509_certificate(old_pem.read_bytes()).serial_number
    # Server side: new handshakes present the new certificate.
    assert served_serial(federation, "punjab") == new_serial != old_serial
    # Client side: with the old one revoked, punjab still reaches its peers.
    revoke(lay, serial=old_serial)
    federation.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    assert federation.reconcile("punjab", "sindh").state == COMPLETED
    assert federation.reconcile("kp", "punjab").state == COMPLETED


def test_epoch_roll_over_and_retirement(federation: Federation) -> None:
    lay = federation.layout
    for p in ("punjab", "sindh", "kp"):
        federation.load(p, [(f"{p}1", "3520212345671", "BISP", "enrolled")])
    assert main(["forum", "salt", "new", "--dir", str(lay.root), "--epoch", "2"]) == 0
    # Roll-over: punjab moves to epoch 2 while sindh is still on 1 but holds both.
    punjab = federation.nodes["punjab"]
    punjab.config = replace(punjab.config, current_epoch=2)
    st = federation.reconcile("punjab", "sindh")
    assert st.state == COMPLETED and st.epoch == 2 and st.match_count == 1
    assert federation.reconcile("sindh", "kp").epoch == 1
    # Everyone moves to 2; epoch 1 is retired on the nodes.
    for p in ("sindh", "kp"):
        federation.nodes[p].config = replace(federation.nodes[p].config, current_epoch=2)
        cfg = lay.node_dir(p) / "node.toml"
        cfg.write_text(cfg.read_text().replace("current_epoch = 1", "current_epoch = 2"))
    salt1 = (lay.salt_dir / "epoch-1.salt").read_text().strip()
    tags_before = [
        m.tag
        for s in federation.nodes["sindh"].store.sessions.all()
        if s.epoch == 1
        for m in federation.nodes["sindh"].store.sessions.matches(s.session_id)
    ]
    assert tags_before
    from ispf_server.__main__ import main as node_main

    assert (
        node_main(["--config", str(lay.node_dir("sindh") / "node.toml"), "--retire-epoch", "1"])
        == 0
    )
    assert not (lay.salt_dir / "epoch-1.salt").exists()
    assert federation.nodes["sindh"].salts.epochs() == [2]
    # A session still on epoch 1 is refused, with the reason.
    creds = grpc.ssl_channel_credentials(
        root_certificates=lay.ca_cert.read_bytes(),
        private_key=(lay.node_dir("punjab") / "node.key").read_bytes(),
        certificate_chain=(lay.node_dir("punjab") / "node.pem").read_bytes(),
    )
    with (
        grpc.secure_channel(
            f"127.0.0.1:{federation.ports['sindh']}",
            creds,
            options=[("grpc.ssl_target_name_override", node_hostname("sindh"))],
        ) as ch,
        pytest.raises(grpc.RpcError) as info,
    ):
        peer_pb2_grpc.PeerServiceStub(ch).Handshake(
            peer_pb2.HandshakeRequest(
                protocol_version=1,
                session_id=str(uuid.uuid4()),
                epoch=1,
                key_check=b"x" * 8,
                purpose="reconciliation",
                mode=common_pb2.MODE_MUTUAL,
            ),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch 1 is not held" in (info.value.details() or "")
    # The salt is gone from the node: not in its store, not in its folder.
    store_bytes = b"".join(f.read_bytes() for f in lay.node_dir("sindh").glob("node.sqlite*"))
    assert bytes.fromhex(salt1) not in store_bytes and salt1.encode() not in store_bytes
    # ... and so are its sessions' match tags (the scalars were never stored).
    sindh = federation.nodes["sindh"].store
    epoch1 = [s.session_id for s in sindh.sessions.all() if s.epoch == 1 and s.match_count]
    assert epoch1 and all(m.tag == b"" for sid in epoch1 for m in sindh.sessions.matches(sid))
    assert all(t not in store_bytes for t in tags_before)
    with pytest.raises(UnknownSession, match="destroyed when its epoch was retired"):
        federation.client("sindh").receipt(
            epoch1[0], next(iter(sindh.sessions.matches(epoch1[0]))).record_id
        )
    logged = [decode_entry(e) for e in federation.nodes["sindh"].store.audit.entries()]
    assert [e["type"] for e in logged[-2:]] == ["epoch", "refusal"]
    assert {"type": "epoch", "epoch": 1, "event": "retired"}.items() <= logged[-2].items()
    # The current epoch cannot be retired.
    assert (
        node_main(["--config", str(lay.node_dir("sindh") / "node.toml"), "--retire-epoch", "2"])
        == 2
    )
    assert federation.reconcile("sindh", "kp").state == COMPLETED


def set_policy(fed: Federation, node: str, peer: str, **settings: object) -> None:
    path = fed.nodes[node].config.policy_file
    text = path.read_text()
    version = int(text.split("version = ")[1].split("\n")[0])
    head, _, rest = text.partition(f"[peers.{peer}]")
    tail = rest[rest.find("\n[") :] if "\n[" in rest else ""
    # (test federations' sets are tiny: keep their min_set_size of 1 unless told)
    body = "\n".join(f"{k} = {v}" for k, v in {"min_set_size": 1, **settings}.items())
    text = head + f"[peers.{peer}]\n{body}\n" + tail
    path.write_text(text.replace(f"version = {version}", f"version = {version + 1}", 1))


ROWS_A = [("A1", "3520212345671", "BISP", "enrolled"), ("A2", "3520212345672", "PSER", "eligible")]
ROWS_B = [("B1", "3520212345671", "BISP", "eligible"), ("B2", "3520212345672", "SEHAT", "exited")]


def test_policy_limits_disclosed_labels_both_ways(federation: Federation) -> None:
    federation.load("punjab", ROWS_A)
    federation.load("sindh", ROWS_B)
    set_policy(federation, "sindh", "punjab", purposes='["reconciliation"]', disclose='["BISP/*"]')
    st = federation.reconcile("punjab", "sindh")
    assert st.state == COMPLETED and st.match_count == 1
    got = {
        (m.record_id, m.peer_programme) for m in federation.client("punjab").matches(st.session_id)
    }
    assert got == {("A1", "BISP")}  # SEHAT is never disclosed to punjab
    # Punjab's own policy binds it as initiator: PSER is not disclosed to sindh.
    set_policy(
        federation, "punjab", "sindh", purposes='["reconciliation"]', disclose='["BISP/enrolled"]'
    )
    st = federation.reconcile("punjab", "sindh")
    sindh_view = {
        (m.record_id, m.peer_programme) for m in federation.client("sindh").matches(st.session_id)
    }
    assert sindh_view == {("B1", "BISP")}


def test_policy_count_only_size_cap_collections_and_unlisted_peers(
    federation: Federation,
) -> None:
    federation.load("punjab", ROWS_A)
    federation.load("sindh", ROWS_B)
    set_policy(federation, "sindh", "punjab", purposes='["statistics"]', count_only="true")
    st = federation.reconcile("punjab", "sindh", purpose="statistics")
    assert st.state != COMPLETED and "only count-only sessions" in st.error
    st = federation.reconcile("punjab", "sindh", purpose="statistics", count_only=True)
    assert st.state == COMPLETED and st.match_count == 2
    set_policy(federation, "sindh", "punjab", purposes='["reconciliation"]', max_set_size=1)
    st = federation.reconcile("punjab", "sindh")
    assert st.state != COMPLETED and "exceeds the policy limit of 1" in st.error
    set_policy(federation, "sindh", "punjab", purposes='["reconciliation"]', collections='["BISP"]')
    st = federation.reconcile("punjab", "sindh", peer_collections=["SEHAT"])
    assert st.state != COMPLETED and "not open to punjab" in st.error
    st = federation.reconcile("punjab", "sindh")
    assert st.state == COMPLETED and st.match_count == 1
    # kp is not in punjab's policy any more: refused both ways.
    path = federation.nodes["punjab"].config.policy_file
    text = path.read_text()
    start = text.index("[peers.kp]")
    end = text.index("[peers.", start + 1)
    path.write_text(text[:start] + text[end:])
    with pytest.raises(PolicyRefused, match="not in this node's policy"):
        federation.client("punjab").start_reconciliation("kp")
    st = federation.reconcile("kp", "punjab")
    assert st.state != COMPLETED and "kp is not in this node's policy" in st.error


@pytest.mark.parametrize("which", ["log.key", "node.key", "salt"])
def test_node_refuses_open_key_files_naming_them(federation: Federation, which: str) -> None:
    lay = federation.layout
    path = (lay.salt_dir / "epoch-1.salt") if which == "salt" else lay.node_dir("kp") / which
    path.chmod(0o640)
    try:
        with pytest.raises(KeyFileError, match=path.name):
            Node(load_config(lay.node_dir("kp") / "node.toml"), pool=BlindingPool(0))
    finally:
        path.chmod(0o600)


def test_new_salt_refuses_to_overwrite(federation: Federation) -> None:
    from ispf.errors import ConfigError

    with pytest.raises(ConfigError, match="already exists"):
        new_salt(federation.layout, 1)
