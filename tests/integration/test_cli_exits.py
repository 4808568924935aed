"""Exit codes and lines a script relies on, through the installed `ispf` and `ispf-node`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ispf.v1 import internal_pb2
from ispf_server.pool import BlindingPool
from ispf_server.probes import RateLimiter, _until_utc_midnight
from tests.conftest import Federation, start_federation
from tests.integration.test_cli import write_profile

BIN = Path(sys.executable).parent
ISPF = str(BIN / "ispf")
ISPF_NODE = str(BIN / "ispf-node")
ENROLLED = "4210176543212"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    pool = BlindingPool(0)
    f = start_federation(tmp_path_factory.mktemp("exits"), ["punjab", "sindh", "kp"], pool)
    f.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    f.load(
        "sindh", [("S1", ENROLLED, "SSPA", "enrolled"), ("S2", "3520212345671", "BISP", "exited")]
    )
    assert f.reconcile("punjab", "sindh").state == internal_pb2.SESSION_STATE_COMPLETED
    yield f  # kp has never reconciled with punjab: it cannot answer checks yet
    f.close()
    pool.close()


@pytest.fixture(scope="module")
def profile(fed: Federation, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_profile(fed, "punjab", tmp_path_factory.mktemp("prof")))


def ispf(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ISPF, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def limit_sindh(fed: Federation, per_minute: int, per_day: int = 10000) -> str:
    """Set sindh's probe limits for punjab; returns the original policy text."""
    path = fed.nodes["sindh"].config.policy_file
    original = path.read_text()
    head, rest = original.split("[peers.punjab]")
    limited = rest.replace("probes_per_minute = 60", f"probes_per_minute = {per_minute}", 1)
    limited = limited.replace("probes_per_day = 10000", f"probes_per_day = {per_day}", 1)
    path.write_text(head.replace("version = 1", "version = 2") + "[peers.punjab]" + limited)
    fed.nodes["sindh"].probes.limiter = RateLimiter()
    return original


def restore_sindh(fed: Federation, original: str) -> None:
    fed.nodes["sindh"].config.policy_file.write_text(original)
    fed.nodes["sindh"].probes.limiter = RateLimiter()


def refused_by_sindh(fed: Federation) -> int:
    """Probe values sindh refused to punjab, from its audit log."""
    from ispf.auditlog import decode_entry

    sindh = fed.nodes["sindh"]
    sindh.probes.log.flush()
    entries = [decode_entry(e) for e in sindh.store.audit.entries()]
    return sum(e["refused"] for e in entries if e["type"] == "probes" and e["peer"] == "punjab")


def ids(n: int) -> str:
    return "".join(f"17301{i:08d}\n" for i in range(n))


def test_check_exits_0_only_when_every_province_answered_and_none_matched(
    profile: str,
) -> None:
    done = ispf("check", "--profile", profile, "--province", "sindh", stdin="3520299999999\n")
    assert done.returncode == 0, done.stderr
    assert "#1: sindh: no match" in done.stdout
    assert "1 ID: 0 matched, every province answered for every ID" in done.stdout


def test_a_check_deadline_out_of_range_is_a_usage_error_not_a_traceback(profile: str) -> None:
    for bad in ("-1", "60001", str(2**32)):
        done = ispf("check", "--profile", profile, "--deadline-ms", bad, stdin="3520299999999\n")
        assert done.returncode == 2, (bad, done.stderr)
        assert "give 0 to 60000" in done.stderr and "Traceback" not in done.stderr


def test_check_exits_3_when_an_id_matched(profile: str) -> None:
    done = ispf("check", "--profile", profile, "--province", "sindh", stdin=ENROLLED + "\n")
    assert done.returncode == 3
    assert "#1: sindh: MATCH (SSPA/enrolled)" in done.stdout
    assert ENROLLED not in done.stdout + done.stderr


def test_an_invalid_id_is_left_unchecked_exit_4_and_one_summary_line(profile: str) -> None:
    done = ispf("check", "--profile", profile, stdin="123\n")
    assert done.returncode == 4
    assert "#1: not checked: nid.length" in done.stdout
    lines = done.stderr.strip().splitlines()
    assert lines == ["1 ID: 0 matched, 1 not checked: invalid identity number: 1 ID (nid.length)"]
    assert "123" not in done.stderr.replace("1 ID", "")


def test_a_province_that_cannot_answer_leaves_ids_unchecked_exit_4(profile: str) -> None:
    done = ispf("check", "--profile", profile, stdin="3520299999999\n")  # sindh and kp
    assert done.returncode == 4
    assert "sindh: no match" in done.stdout and "kp: not synced" in done.stdout
    assert "1 not checked: kp not synced: 1 ID (no reconciliation with kp" in done.stderr


def test_a_batch_over_the_rate_limit_is_paced_and_every_id_answered(
    fed: Federation, profile: str
) -> None:
    original = limit_sindh(fed, 600)  # 10 per second: the 5 over the limit wait ~0.5 s
    refused_before = refused_by_sindh(fed)
    try:
        t = time.monotonic()
        done = ispf("check", "--profile", profile, "--province", "sindh", stdin=ids(605))
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - t < 60
        assert done.stdout.count(": sindh: no match") == 605
        assert "sindh is rate-limited (its limit: 600 per minute)" in done.stderr
        assert "605 IDs: 0 matched, every province answered for every ID" in done.stdout
        # Only the first ask (605 > 600) was refused: after that it waited for the bucket.
        assert refused_by_sindh(fed) - refused_before == 605
    finally:
        restore_sindh(fed, original)


def test_a_batch_that_pacing_cannot_fit_in_max_wait_is_said_at_once_exit_4(
    fed: Federation, profile: str
) -> None:
    original = limit_sindh(fed, 6)
    try:
        t = time.monotonic()
        done = ispf(
            "check", "--profile", profile, "--province", "sindh", "--max-wait", "5",
            stdin=ids(20),
        )  # fmt: skip
        assert time.monotonic() - t < 30  # no waiting for what cannot succeed
        assert done.returncode == 4
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert "20 not checked: sindh rate limited: 20 IDs" in lines[0]
        assert "at its limit of 6 per minute, more than the 5 s allowed" in lines[0]
        assert "--max-wait" in lines[0]
    finally:
        restore_sindh(fed, original)


def test_a_used_up_daily_quota_is_said_at_once_exit_4(fed: Federation, profile: str) -> None:
    # The quota resets at 00:00 UTC, so the node asks to wait until then; close to
    # midnight that wait fits in the default --max-wait and the client rightly waits.
    # Keep --max-wait under the time left today (after midnight if only a minute is left).
    left = _until_utc_midnight()
    if left < 90:
        time.sleep(left + 1)
        left = _until_utc_midnight()
    max_wait = int(min(300, left - 60))
    original = limit_sindh(fed, 60, per_day=3)
    try:
        t = time.monotonic()
        done = ispf(
            "check", "--profile", profile, "--province", "sindh", "--max-wait", str(max_wait),
            stdin=ids(5),
        )  # fmt: skip
        assert time.monotonic() - t < 30
        assert done.returncode == 4
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("5 IDs: 0 matched, 5 not checked: sindh rate limited: 5 IDs (")
        assert "daily probe quota of 3 for punjab is used up" in line
        assert f"more than the {max_wait} s allowed (--max-wait)" in line
    finally:
        restore_sindh(fed, original)


def test_check_json_is_one_object_per_id_then_a_summary(profile: str) -> None:
    done = ispf(
        "check", "--profile", profile, "--province", "sindh", "--json",
        stdin=f"{ENROLLED}\n3520299999999\n12\n",
    )  # fmt: skip
    assert done.returncode == 3
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 4
    assert rows[0]["matched"] is True
    assert rows[0]["provinces"][0]["status"] == "match"
    assert rows[0]["provinces"][0]["labels"] == [{"programme": "SSPA", "status": "enrolled"}]
    assert rows[1]["provinces"][0]["status"] == "no_match" and not rows[1]["matched"]
    assert rows[2]["error"].startswith("nid.length") and rows[2]["provinces"] == []
    summary = rows[3]["summary"]
    assert summary["ids"] == 3 and summary["matched"] == 1 and summary["unchecked"] == 1
    assert summary["exit"] == 3
    assert ENROLLED not in done.stdout


def test_check_help_documents_the_exit_codes() -> None:
    done = ispf("check", "--help")
    text = " ".join(done.stdout.split())
    assert "0 every ID was answered by every province asked and none matched" in text
    assert "3 some ID matched" in text and "4 nothing matched but something was left" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _forum(tmp_path: Path) -> Path:
    done = ispf(
        "forum", "init", "--dir", str(tmp_path / "forum"), "--provinces", "punjab,sindh",
        "--base-port", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return tmp_path / "forum" / "nodes"


def _listen_on(cfg: Path, address: str) -> None:
    text = cfg.read_text()
    line = next(x for x in text.splitlines() if x.startswith("listen = "))
    cfg.write_text(text.replace(line, f'listen = "{address}"'))


def _serving(cfg: Path) -> subprocess.Popen[str]:
    """An `ispf-node` process over `cfg`, once it says it is serving."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [ISPF_NODE, "--config", str(cfg)], stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    line = ""
    while "serving on port" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
    if "serving on port" not in line:
        proc.kill()
        raise AssertionError(f"{cfg}: the node did not start serving")
    return proc


def test_a_second_node_on_a_taken_port_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    nodes = _forum(tmp_path)
    address = f"127.0.0.1:{_free_port()}"
    for p in ("punjab", "sindh"):
        _listen_on(nodes / p / "node.toml", address)
    first = _serving(nodes / "punjab" / "node.toml")
    try:
        second = subprocess.run(
            [ISPF_NODE, "--config", str(nodes / "sindh" / "node.toml")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 2
        # One line and nothing else: not a half-started node's log, nor gRPC's own.
        assert second.stderr.splitlines() == [
            f"ispf-node: cannot listen on {address}: the address is in use by another process "
            "(check `listen` in node.toml)"
        ]
    finally:
        first.terminate()
        assert first.wait(timeout=30) == 0


def test_an_address_the_machine_lacks_is_one_line_and_exit_2(tmp_path: Path) -> None:
    nodes = _forum(tmp_path)
    cfg = nodes / "punjab" / "node.toml"
    _listen_on(cfg, "203.0.113.7:50051")  # TEST-NET-3: never this machine's
    done = subprocess.run(
        [ISPF_NODE, "--config", str(cfg)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "ispf-node: cannot listen on 203.0.113.7:50051: it is not an address of this machine "
        "(check `listen` in node.toml)"
    ]


def test_a_listen_name_that_does_not_resolve_is_one_line_and_exit_2(tmp_path: Path) -> None:
    nodes = _forum(tmp_path)
    cfg = nodes / "punjab" / "node.toml"
    _listen_on(cfg, "no-such-host.invalid:50051")  # (.invalid never resolves: RFC 2606)
    done = subprocess.run(
        [ISPF_NODE, "--config", str(cfg)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "ispf-node: cannot listen on no-such-host.invalid:50051: 'no-such-host.invalid' is not "
        "a name or address this machine can resolve (check `listen` in node.toml)"
    ]


def test_reconcile_says_at_once_that_its_own_node_is_down(fed: Federation, tmp_path: Path) -> None:
    prof = write_profile(fed, "punjab", tmp_path)
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens there
    prof.write_text(prof.read_text().replace(fed.profile("punjab").address, dead))
    t = time.monotonic()
    done = ispf("reconcile", "--peer", "sindh", "--profile", str(prof), "--out", str(tmp_path))
    assert time.monotonic() - t < 30  # not the 120 s wait for a node coming back
    assert done.returncode == 1
    text = " ".join(done.stderr.split())
    assert text.startswith(f"ispf: own node punjab at {dead} is not answering ("), text
    assert text.endswith("is ispf-node running there, and is `address` in the profile right?")
    assert not list(tmp_path.glob("*-matches.csv"))


def test_forum_init_and_purpose_options_have_help() -> None:
    init = " ".join(ispf("forum", "init", "--help").stdout.split())
    for option in ("--dir", "--provinces", "--epoch", "--host", "--base-port"):
        described = init.split(option, 2)[-1].split("--", 1)[0]
        assert len(described.split()) > 2, f"{option} has no help text"
    rec = " ".join(ispf("reconcile", "--help").stdout.split())
    assert "--purpose PURPOSE purpose of the session" in rec
    chk = " ".join(ispf("check", "--help").stdout.split())
    assert "--purpose PURPOSE purpose the peers' policies allow" in chk


def test_counts_of_one_are_singular(fed: Federation, profile: str, tmp_path: Path) -> None:
    done = ispf("results", "export", "--profile", profile, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "(1 row)" in done.stdout and "1 rows" not in done.stdout
    done = ispf("registry", "stats", "--profile", profile)
    assert "punjab: 1 record, 1 distinct ID" in done.stdout
    done = ispf("sessions", "list", "--profile", profile)
    assert " 1 match " in done.stdout and "1 matches" not in done.stdout


def test_a_taken_metrics_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    nodes = _forum(tmp_path)
    cfg = nodes / "punjab" / "node.toml"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = f"127.0.0.1:{held.getsockname()[1]}"
        cfg.write_text(cfg.read_text() + f'\n[metrics]\nlisten = "{taken}"\n')
        done = subprocess.run(
            [ISPF_NODE, "--config", str(cfg)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "serving on port" not in done.stderr
    assert f"ispf-node: cannot serve metrics on {taken}: Address already in use" in done.stderr


def test_a_second_node_on_the_same_store_refuses_to_start(tmp_path: Path) -> None:
    """Two nodes over one store would both append to one audit log (a fork)."""
    nodes = _forum(tmp_path)
    cfg = nodes / "punjab" / "node.toml"
    _listen_on(cfg, "127.0.0.1:0")
    first = _serving(cfg)
    try:
        second = subprocess.run(
            [ISPF_NODE, "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 2
        assert "serving on port" not in second.stderr
        errors = [x for x in second.stderr.splitlines() if x.startswith("ispf-node:")]
        assert len(errors) == 1 and "is in use by another ispf-node" in errors[0], errors
    finally:
        first.terminate()
        assert first.wait(timeout=30) == 0
    # The lock goes with the process: the node starts again.
    again = _serving(cfg)
    again.terminate()
    assert again.wait(timeout=30) == 0
