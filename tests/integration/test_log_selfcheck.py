"""A node checks its own log against its last checkpoint at start-up, as a real process."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ispf.v1 import internal_pb2
from ispf_client.sdk import ClientProfile, secure_channel
from ispf_server.pool import BlindingPool
from tests.conftest import start_federation

BIN = Path(sys.executable).parent


def start_node(cfg: Path) -> tuple[subprocess.Popen[str], int, list[str]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(BIN / "ispf-node"), "--config", str(cfg)], stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        found = re.search(r"(?:serving|listening) on port (\d+)", line)
        if found:
            return proc, int(found.group(1)), lines
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("".join(lines))


def test_a_tampered_own_log_is_found_at_start_up_and_the_node_serves_nothing(
    tmp_path: Path,
) -> None:
    pool = BlindingPool(0)
    fed = start_federation(tmp_path, ["punjab", "sindh"], pool)
    try:
        fed.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
        fed.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
        assert fed.reconcile("punjab", "sindh").state == internal_pb2.SESSION_STATE_COMPLETED
    finally:
        fed.close()
        pool.close()
    node_dir = fed.layout.node_dir("punjab")
    db = sqlite3.connect(node_dir / "node.sqlite", isolation_level=None)
    idx, entry = db.execute("SELECT idx, entry FROM log_entries ORDER BY idx LIMIT 1").fetchone()
    flipped = bytearray(entry)
    flipped[len(flipped) // 2] ^= 0x01
    db.execute("UPDATE log_entries SET entry=? WHERE idx=?", (bytes(flipped), idx))
    (signed_before,) = db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()
    db.close()

    proc, port, lines = start_node(node_dir / "node.toml")
    try:
        problem = [x for x in lines if "audit log self-check failed" in x]
        assert problem, "".join(lines)
        assert "do not hash to the root of the last signed checkpoint" in problem[0]
        assert "restore the node from a backup" in problem[0]
        # The start-up lines say it is not ready: none says "ready" or "serving on".
        assert not [x for x in lines if re.search(r"node \w+ ready|serving on port", x)], lines
        assert any("NOT ready (health NOT_SERVING)" in x for x in lines), lines
        prof = ClientProfile.load(fed.layout.client_dir("punjab") / "profile.toml")
        prof = ClientProfile(prof.province, f"127.0.0.1:{port}", prof.ca, prof.cert, prof.key)
        with secure_channel(prof) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        profile = tmp_path / "profile.toml"
        profile.write_text(
            f'province = "punjab"\naddress = "127.0.0.1:{port}"\n[tls]\n'
            f'ca = "{prof.ca}"\ncert = "{prof.cert}"\nkey = "{prof.key}"\n'
        )
        done = subprocess.run(
            [str(BIN / "ispf"), "reconcile", "--peer", "sindh", "--profile", str(profile)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode != 0
        assert "audit log self-check failed" in done.stdout + done.stderr
        done = subprocess.run(
            [str(BIN / "ispf"), "check", "--profile", str(profile)],
            input="3520212345671\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1 and "audit log self-check failed" in done.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    db = sqlite3.connect(node_dir / "node.sqlite")
    (signed_after,) = db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()
    db.close()
    assert signed_after == signed_before  # nothing signed over the tampered log


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_a_policy_file_others_can_read_makes_the_node_not_serving(
    tmp_path: Path, mode: int
) -> None:
    subprocess.run(
        [str(BIN / "ispf"), "forum", "init", "--dir", str(tmp_path / "forum"),
         "--provinces", "punjab,sindh", "--base-port", "0"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    node_dir = tmp_path / "forum" / "nodes" / "punjab"
    policy = node_dir / "policy.toml"
    assert policy.stat().st_mode & 0o777 == 0o600  # forum init writes it owner-only
    policy.chmod(mode)
    proc, port, lines = start_node(node_dir / "node.toml")
    try:
        assert any("not ready" in x and "policy.toml" in x for x in lines), "".join(lines)
        prof = ClientProfile.load(tmp_path / "forum" / "clients" / "punjab" / "profile.toml")
        prof = ClientProfile(prof.province, f"127.0.0.1:{port}", prof.ca, prof.cert, prof.key)
        with secure_channel(prof) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        proc.terminate()
        proc.wait(timeout=30)
