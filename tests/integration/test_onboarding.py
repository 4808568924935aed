"""Onboarding with files only: each province makes its keys, the forum signs requests,
publishes a signed roster and seals the salt to each node; the forum never holds a
private key but its CA's."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest

from ispf.nodeconfig import load_config
from ispf.v1 import internal_pb2
from ispf_client.auditor import AuditProfile, pair, verify
from ispf_client.cli import main
from ispf_client.forum import write_policy
from ispf_client.sdk import ClientProfile, NodeClient
from ispf_server.node import Node, create_server
from ispf_server.pool import BlindingPool

PROVINCES = ["punjab", "sindh", "kp"]
COMPLETED = internal_pb2.SESSION_STATE_COMPLETED
SHARED = "3520212345671"


@dataclass
class Onboarded:
    root: Path
    forum: Path
    nodes: dict[str, Node] = field(default_factory=dict)
    servers: dict[str, grpc.Server] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def node_dir(self, p: str) -> Path:
        return self.root / "sites" / p / "node"

    def client_dir(self, p: str) -> Path:
        return self.root / "sites" / p / "mis"

    @property
    def auditor_dir(self) -> Path:
        return self.root / "auditor"

    def client(self, p: str) -> NodeClient:
        prof = ClientProfile.load(self.client_dir(p) / "profile.toml")
        return NodeClient(replace(prof, address=f"127.0.0.1:{self.ports[p]}"))


def _ok(argv: list[str]) -> None:
    assert main(argv) == 0, argv


def onboard(root: Path) -> Onboarded:
    """The whole exchange, as files handed between the forum and each province."""
    ob = Onboarded(root, root / "forum")
    forum = str(ob.forum)
    _ok(["forum", "ca", "--dir", forum])
    ca = ob.forum / "ca.pem"
    issued = ob.forum / "issued"
    for p in PROVINCES:
        nd, cd = ob.node_dir(p), ob.client_dir(p)
        _ok(["node", "init", "--dir", str(nd), "--province", p, "--address", "127.0.0.1:0"])
        _ok(["forum", "sign", str(nd / "request.json"), "--dir", forum])
        shutil.copy(issued / f"node-{p}.pem", nd / "node.pem")
        shutil.copy(ca, nd / "ca.pem")
        _ok(["forum", "request", "--role", "internal", "--name", p, "--dir", str(cd)])
        _ok(["forum", "sign", str(cd / "request.json"), "--dir", forum])
        shutil.copy(issued / f"internal-{p}.pem", cd / "client.pem")
        shutil.copy(ca, cd / "ca.pem")
        (cd / "profile.toml").write_text(
            f'province = "{p}"\naddress = "127.0.0.1:0"\n\n'
            '[tls]\nca = "ca.pem"\ncert = "client.pem"\nkey = "client.key"\n'
        )
    ad = ob.auditor_dir
    _ok(["forum", "request", "--role", "audit", "--name", "auditor", "--dir", str(ad)])
    _ok(["forum", "sign", str(ad / "request.json"), "--dir", forum])
    shutil.copy(issued / "audit-auditor.pem", ad / "auditor.pem")
    for d in [ob.node_dir(p) for p in PROVINCES] + [ad]:
        shutil.copy(ob.forum / "roster.json", d / "roster.json")
    shutil.copy(ca, ad / "ca.pem")
    _ok(["forum", "salt", "new", "--dir", forum, "--epoch", "1"])
    for p in PROVINCES:
        sealed = ob.forum / "sealed" / "epoch-1" / f"{p}.sealed"
        cfg = ob.node_dir(p) / "node.toml"
        _ok(["node", "salt", "import", str(sealed), "--config", str(cfg), "--epoch", "1"])
        write_policy(ob.node_dir(p) / "policy.toml", [q for q in PROVINCES if q != p])
    return ob


@pytest.fixture
def onboarded(tmp_path: Path) -> Iterator[Onboarded]:
    ob = onboard(tmp_path)
    pool = BlindingPool(0)
    for p in PROVINCES:
        cfg = replace(load_config(ob.node_dir(p) / "node.toml"), chunk_values=64)
        node = Node(cfg, pool=pool)
        server, port = create_server(node, "127.0.0.1:0")
        server.start()
        ob.nodes[p], ob.servers[p], ob.ports[p] = node, server, port
    for p, node in ob.nodes.items():
        assert sorted(node.peer_addresses) == sorted(q for q in PROVINCES if q != p)  # roster
        node.peer_addresses = {q: f"127.0.0.1:{ob.ports[q]}" for q in PROVINCES if q != p}
    yield ob
    for s in ob.servers.values():
        s.stop(grace=None).wait()
    for n in ob.nodes.values():
        n.close()
    pool.close()


def test_three_provinces_onboard_with_files_only_reconcile_and_audit(
    onboarded: Onboarded,
) -> None:
    ob = onboarded
    for i, p in enumerate(PROVINCES):
        with ob.client(p) as c:
            rows = [(f"{p}-1", SHARED), (f"{p}-2", f"35202123456{80 + i}")]
            resp = c.upsert(
                internal_pb2.Record(
                    record_id=r, nid=n, programme="BISP", status="enrolled", position=k + 1
                )
                for k, (r, n) in enumerate(rows)
            )
            assert not resp.errors
    for a, b in [("punjab", "sindh"), ("punjab", "kp"), ("sindh", "kp")]:
        with ob.client(a) as c:
            st = c.wait(c.start_reconciliation(b).session_id, timeout=120)
        assert st.state == COMPLETED and st.match_count == 1, (a, b, st.error)

    # The auditor loads the roster (addresses overridden: the nodes bound port 0).
    prof_path = ob.auditor_dir / "audit.toml"
    lines = ['name = "auditor"', 'roster = "roster.json"', "", "[tls]"]
    lines += ['ca = "ca.pem"', 'cert = "auditor.pem"', 'key = "auditor.key"']
    for p in PROVINCES:
        lines += ["", f"[nodes.{p}]", f'address = "127.0.0.1:{ob.ports[p]}"']
    prof_path.write_text("\n".join(lines) + "\n")
    prof = AuditProfile.load(prof_path)
    reports = {r.node: r for r in verify(prof)}
    assert sorted(reports) == sorted(PROVINCES)
    assert all(r.sessions == 2 for r in reports.values())
    assert pair(prof).ok

    # The forum's folder holds no private key but the CA's, and no clear salt.
    private = [
        f.relative_to(ob.forum)
        for f in ob.forum.rglob("*")
        if f.is_file() and b"PRIVATE" in f.read_bytes()
    ]
    assert [str(f) for f in private] == ["ca.key"]
    assert not list(ob.forum.rglob("*.salt"))
    assert [f.name for f in ob.forum.rglob("*.key")] == ["ca.key"]
    # Each node's checkpoints verify under its own log key, which the forum never had.
    forum_bytes = b"".join(f.read_bytes() for f in ob.forum.rglob("*") if f.is_file())
    for p in PROVINCES:
        signer_line = (ob.node_dir(p) / "log.key").read_text().strip()
        assert signer_line.encode() not in forum_bytes
        # (PRIVATE+KEY+<name>+<hash>+<base64 key>: the key's base64 may hold "+" itself)
        key_b64 = signer_line.split("+", 4)[4]
        assert len(key_b64) > 40 and key_b64.encode() not in forum_bytes  # the key bytes
        assert reports[p].size > 0
        for name in ("node.key", "seal.key", "master.key"):
            secret = (ob.node_dir(p) / name).read_bytes()
            assert secret not in forum_bytes


def test_salt_import_refuses_another_nodes_file_another_epoch_and_a_second_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ob = onboard(tmp_path)
    capsys.readouterr()
    sealed = ob.forum / "sealed" / "epoch-1"
    cfg = str(ob.node_dir("punjab") / "node.toml")
    assert main(["node", "salt", "import", str(sealed / "sindh.sealed"), "--config", cfg]) == 2
    assert "sealed for node 'sindh', not this node (punjab)" in capsys.readouterr().err
    mine = str(sealed / "punjab.sealed")
    assert main(["node", "salt", "import", mine, "--config", cfg, "--epoch", "2"]) == 2
    assert "holds the salt of epoch 1, not epoch 2" in capsys.readouterr().err
    assert main(["node", "salt", "import", mine, "--config", cfg]) == 2
    assert "already exists" in capsys.readouterr().err
    salt = ob.node_dir("punjab") / "salts" / "epoch-1.salt"
    assert salt.stat().st_mode & 0o777 == 0o600


def test_a_node_refuses_a_roster_the_forum_did_not_sign(tmp_path: Path) -> None:
    from ispf.errors import ConfigError

    ob = onboard(tmp_path)
    roster = ob.node_dir("punjab") / "roster.json"
    roster.write_text(roster.read_text().replace("127.0.0.1:0", "203.0.113.9:50051", 1))
    with pytest.raises(ConfigError, match="not signed by the forum CA"):
        Node(load_config(ob.node_dir("punjab") / "node.toml"), pool=BlindingPool(0))


def test_a_node_certificate_the_forum_mints_itself_is_refused_by_roster_nodes(
    onboarded: Onboarded,
) -> None:
    """The CA can sign a 'punjab' certificate for a key of its own; sindh still refuses
    it as a peer, because the roster pins punjab's own certificate."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ispf.v1 import peer_pb2, peer_pb2_grpc
    from ispf_client.forum import ForumLayout, _certificate

    layout = ForumLayout(onboarded.forum)
    key = ec.generate_private_key(ec.SECP256R1())
    forged = _certificate(layout, name="punjab", role="node", public_key=key.public_key())
    genuine_dir = onboarded.node_dir("punjab")

    def sync_state(cert: bytes, key_pem: bytes) -> grpc.StatusCode:
        creds = grpc.ssl_channel_credentials(
            root_certificates=(onboarded.forum / "ca.pem").read_bytes(),
            private_key=key_pem,
            certificate_chain=cert,
        )
        opts = [("grpc.ssl_target_name_override", "sindh.node.ispf")]
        addr = f"127.0.0.1:{onboarded.ports['sindh']}"
        with grpc.secure_channel(addr, creds, options=opts) as ch:
            try:
                peer_pb2_grpc.PeerServiceStub(ch).GetSyncState(
                    peer_pb2.SyncStateRequest(epoch=1), timeout=10
                )
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    forged_pem = forged.public_bytes(serialization.Encoding.PEM)
    forged_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert sync_state(forged_pem, forged_key) == grpc.StatusCode.UNAUTHENTICATED
    genuine = (genuine_dir / "node.pem").read_bytes(), (genuine_dir / "node.key").read_bytes()
    assert sync_state(*genuine) == grpc.StatusCode.OK


def test_certificate_renewal_keeps_the_log_and_sealing_keys_and_updates_the_roster(
    tmp_path: Path,
) -> None:
    import json

    ob = onboard(tmp_path)
    nd = ob.node_dir("sindh")
    before = json.loads((nd / "request.json").read_text())
    old_pin = json.loads((ob.forum / "roster.json").read_text())["roster"]["nodes"]["sindh"]
    args = ["node", "renew", "--dir", str(nd), "--province", "sindh", "--address", "10.0.0.7:1"]
    _ok(args)
    assert (nd / "node.key.new").stat().st_mode & 0o777 == 0o600
    after = json.loads((nd / "request.json").read_text())
    assert (after["log_key"], after["seal_key"]) == (before["log_key"], before["seal_key"])
    assert after["csr"] != before["csr"]
    _ok(["forum", "sign", str(nd / "request.json"), "--dir", str(ob.forum)])
    doc = json.loads((ob.forum / "roster.json").read_text())["roster"]
    assert doc["nodes"]["sindh"]["cert_sha256"] != old_pin["cert_sha256"]
    assert doc["nodes"]["sindh"]["address"] == "10.0.0.7:1"
    assert doc["version"] == 4  # one per node request: three, then this one
    assert main(args) == 2  # a rotation under way is not started over silently


def test_steps_out_of_order_say_what_is_missing_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new province that starts its node, or imports its salt, before copying in
    what the forum sent is told which file is missing (exit 2), not a traceback;
    `node init` makes its folder private even where it existed already."""
    import subprocess
    import sys

    nd = tmp_path / "node"
    nd.mkdir(mode=0o755)
    nd.chmod(0o755)
    _ok(["node", "init", "--dir", str(nd), "--province", "gb", "--address", "127.0.0.1:0"])
    assert (nd.stat().st_mode & 0o777, (nd / "salts").stat().st_mode & 0o777) == (0o700, 0o700)
    started = subprocess.run(
        [str(Path(sys.executable).parent / "ispf-node"), "--config", str(nd / "node.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 2, started.stderr
    (line,) = started.stderr.splitlines()
    assert line.startswith(f"ispf-node: {nd / 'ca.pem'}: no such file (a node needs the forum")
    sealed = tmp_path / "gb.sealed"
    sealed.write_bytes(b"x")
    assert main(["node", "salt", "import", str(sealed), "--config", str(nd / "node.toml")]) != 0
    err = capsys.readouterr().err
    assert f"{nd / 'ca.pem'}: no such file: copy the forum's ca.pem into the node's folder" in err
    assert "Errno" not in err and "Traceback" not in err
