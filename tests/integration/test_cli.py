"""The CLI as a provincial IT team runs it: forum, load, reconcile, export, demo."""

from __future__ import annotations

import csv
import json
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
from ispf_client.cli import main
from ispf_client.demo import run_demo
from ispf_client.sdk import secure_channel
from ispf_client.synth import generate
from tests.conftest import Federation

MATCH_HEADER = [
    "province",
    "record_id",
    "peer_province",
    "peer_programme",
    "peer_status",
    "session_id",
    "own_programme",
    "own_status",
]


def write_profile(fed: Federation, province: str, tmp: Path) -> Path:
    prof = fed.profile(province)
    path = tmp / f"{province}-profile.toml"
    path.write_text(
        f'province = "{province}"\naddress = "{prof.address}"\n[tls]\n'
        f'ca = "{prof.ca}"\ncert = "{prof.cert}"\nkey = "{prof.key}"\n'
    )
    return path


def test_load_reconcile_all_and_export(
    federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = generate(["punjab", "sindh", "kp"], 300, seed=4)
    for p in ("punjab", "sindh", "kp"):
        (tmp_path / f"{p}.csv").write_text(fed.csv_text(p))
        prof = write_profile(federation, p, tmp_path)
        rc = main(
            [
                "registry",
                "load",
                str(tmp_path / f"{p}.csv"),
                "--profile",
                str(prof),
                "--errors",
                str(tmp_path / f"{p}-errors.csv"),
            ]
        )
        assert rc == 0
        out = capsys.readouterr().out
        assert f"{fed.invalid_rows[p]} rejected" in out
        with (tmp_path / f"{p}-errors.csv").open() as fh:
            assert len(list(csv.reader(fh))) == fed.invalid_rows[p] + 1
    prof = str(tmp_path / "punjab-profile.toml")
    assert main(["reconcile", "--all", "--profile", prof, "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "punjab ⇄ kp: completed" in out and "punjab ⇄ sindh: completed" in out
    with (tmp_path / "rep" / "punjab-matches.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == MATCH_HEADER
    assert {r[2] for r in rows[1:]} == {"sindh", "kp"}
    summary = json.loads((tmp_path / "rep" / "punjab-summary.json").read_text())
    counts = {s["peer"]: s["match_count"] for s in summary["sessions"]}
    assert counts == {
        "sindh": len(fed.planted[("punjab", "sindh")]),
        "kp": len(fed.planted[("punjab", "kp")]),
    }
    assert "deduplicated" in summary["note"]
    # Export of one session from the responder side.
    sid = summary["by_peer"]["sindh"]["session_id"]
    sprof = str(tmp_path / "sindh-profile.toml")
    assert (
        main(
            [
                "results",
                "export",
                "--session",
                sid,
                "--profile",
                sprof,
                "--out",
                str(tmp_path / "sindh-rep"),
            ]
        )
        == 0
    )
    with (tmp_path / "sindh-rep" / "sindh-matches.csv").open() as fh:
        srows = list(csv.reader(fh))[1:]
    assert srows and {r[2] for r in srows} == {"punjab"} and {r[5] for r in srows} == {sid}
    assert main(["sessions", "list", "--profile", prof]) == 0
    assert sid in capsys.readouterr().out


def test_reconcile_all_reports_a_failed_peer_and_exits_non_zero(
    federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    federation.load("punjab", [("A1", "3520212345671", "BISP", "enrolled")])
    federation.stop("kp")
    prof = str(write_profile(federation, "punjab", tmp_path))
    assert (
        main(
            [
                "reconcile",
                "--all",
                "--attempts",
                "2",
                "--profile",
                prof,
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "punjab ⇄ sindh: completed" in out
    assert "FAILED kp:" in out


def test_missing_profile_is_a_clear_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ISPF_PROFILE", raising=False)
    assert main(["registry", "stats"]) == 2
    assert "--profile" in capsys.readouterr().err


def test_demo_with_generated_data_checks_the_planted_truth_and_audits(tmp_path: Path) -> None:
    provinces = ["punjab", "sindh", "kp", "balochistan"]
    res = run_demo(
        provinces=provinces, out=tmp_path / "out", records=400, workers=1, workdir=tmp_path / "work"
    )
    assert res.ok, res.failures
    assert len(res.matrix) == 6
    assert any("planted truth" in c for c in res.checks)
    assert any("audit pair: all 6 sessions" in c for c in res.checks)
    assert any("log verifies, cosigned" in c for c in res.checks)
    # Every byte of every node's log: no ID number of any registry.
    ids = set()
    for p in provinces:
        for line in (tmp_path / "work" / "data" / f"{p}.csv").read_text().splitlines()[1:]:
            digits = line.split(",")[1].replace("-", "")
            if len(digits) == 13 and digits.isdigit():
                ids.add(digits)
    assert len(ids) > 1000
    for p in provinces:
        db = sqlite3.connect(tmp_path / "work" / "forum" / "nodes" / p / "node.sqlite")
        blob = b"".join(bytes(r[0]) for r in db.execute("SELECT entry FROM log_entries"))
        blob += "".join(r[0] for r in db.execute("SELECT note FROM checkpoints")).encode()
        blob += "".join(r[0] for r in db.execute("SELECT note FROM witnessed")).encode()
        db.close()
        assert len(blob) > 1000
        assert not re.search(rb"\d{13}", blob)
        assert not any(i.encode() in blob or i[5:12].encode() in blob for i in ids)
    for p in ("punjab", "sindh", "kp", "balochistan"):
        assert (tmp_path / "out" / f"{p}-matches.csv").exists()
        assert (tmp_path / "out" / f"{p}-load-errors.csv").exists()


def test_demo_with_given_data_reports_invalid_rows_and_finds_true_matches(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "punjab.csv").write_text(
        "record_id,cnic,programme,status\n"
        "P1,35202-1234567-1,BISP,enrolled\n"
        "P2,3520212345671,PSPA,eligible\n"  # same person, second programme
        "P3,42101-7654321-2,BISP,enrolled\n"
        "P4,12345,BISP,enrolled\n"
    )
    (data / "sindh.csv").write_text(
        "\ufeffrecord_id,cnic,programme,status\n"
        "S1,4210176543212,SSPA,enrolled\n"
        "S2,3520212345671,BISP,exited\n"
        "S3,4210100000000,SSPA,enrolled\n"
        "S4,not-a-cnic,SSPA,enrolled\n"
    )
    res = run_demo(provinces=["punjab", "sindh"], out=tmp_path / "out", data=data, workers=1)
    assert res.ok, res.failures
    assert res.matrix == {("punjab", "sindh"): 2}
    assert [p.line for p in res.loads["punjab"].problems] == [5]
    assert [p.line for p in res.loads["sindh"].problems] == [5]
    with (tmp_path / "out" / "punjab-matches.csv").open() as fh:
        rows = {tuple(r[1:5]) for r in list(csv.reader(fh))[1:]}
    assert rows == {
        ("P1", "sindh", "BISP", "exited"),
        ("P2", "sindh", "BISP", "exited"),
        ("P3", "sindh", "SSPA", "enrolled"),
    }


def test_demo_command_exits_non_zero_on_missing_data(tmp_path: Path) -> None:
    assert main(["demo", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_node_process_starts_serves_health_and_refuses_open_keys(tmp_path: Path) -> None:
    assert (
        main(
            [
                "forum",
                "init",
                "--dir",
                str(tmp_path / "forum"),
                "--provinces",
                "punjab,sindh",
                "--base-port",
                "0",
            ]
        )
        == 0
    )
    node_dir = tmp_path / "forum" / "nodes" / "punjab"
    cfg = node_dir / "node.toml"
    exe = [sys.executable, "-m", "ispf_server", "--config", str(cfg)]
    (node_dir / "node.key").chmod(0o644)
    bad = subprocess.run(exe, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "node.key" in bad.stderr and "chmod 600" in bad.stderr
    (node_dir / "node.key").chmod(0o600)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(exe, stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        deadline = time.monotonic() + 60
        assert proc.stderr is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "serving on port" in line:
                port = int(line.rsplit(" ", 1)[1])
        assert port
        from ispf_client.sdk import ClientProfile

        prof = ClientProfile.load(tmp_path / "forum" / "clients" / "punjab" / "profile.toml")
        prof = ClientProfile(prof.province, f"127.0.0.1:{port}", prof.ca, prof.cert, prof.key)
        with secure_channel(prof) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_check_command_reads_ids_from_a_file_or_stdin_never_argv(
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    federation.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    federation.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    assert federation.reconcile("punjab", "sindh").state == internal_pb2.SESSION_STATE_COMPLETED
    prof = str(write_profile(federation, "punjab", tmp_path))
    ids = tmp_path / "ids.txt"
    ids.write_text("35202-1234567-1\n3520299999999\n12345\n")
    assert main(["check", "--profile", prof, "--file", str(ids), "--province", "sindh"]) == 3
    out = capsys.readouterr().out
    assert "#1: sindh: MATCH (SSPA/eligible)" in out
    assert "#2: sindh: no match" in out
    assert "#3: not checked: nid.length" in out
    assert "3520212345671" not in out and "12345" not in out.replace("#3", "")
    monkeypatch.setattr("sys.stdin", io.StringIO("3520299999999\n"))
    assert main(["check", "--profile", prof, "--province", "sindh"]) == 0
    assert "#1: sindh: no match" in capsys.readouterr().out


def test_forum_commands_issue_certificates_and_salts_owner_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography import x509

    forum = tmp_path / "forum"
    assert main(["forum", "init", "--dir", str(forum), "--provinces", "punjab,sindh"]) == 0
    assert (
        main(
            ["forum", "issue", "--dir", str(forum), "--role", "audit", "--name", "auditor-general"]
        )
        == 0
    )
    cert = forum / "auditors" / "auditor-general" / "auditor.pem"
    key = forum / "auditors" / "auditor-general" / "auditor.key"
    subject = x509.load_pem_x509_certificate(cert.read_bytes()).subject.rfc4514_string()
    assert "OU=audit" in subject and "CN=auditor-general" in subject
    assert key.stat().st_mode & 0o777 == 0o600
    assert main(["forum", "salt", "new", "--dir", str(forum), "--epoch", "2"]) == 0
    assert (forum / "salts" / "epoch-2.salt").stat().st_mode & 0o777 == 0o600
    assert main(["forum", "salt", "new", "--dir", str(forum), "--epoch", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["forum", "issue", "--dir", str(forum), "--role", "node", "--name", "Not A Slug"]) == 2
    )
