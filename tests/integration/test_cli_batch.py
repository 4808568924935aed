"""The CLI as a batch job reads it (#17): exit codes, one precise line, --json,
registry sync, through the installed `ispf` against real nodes on port 0."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ispf.errors import InvalidInput, IspfError, RetryLater
from ispf.v1 import internal_pb2
from ispf_client.cli import main
from ispf_client.sdk import NodeClient
from tests.conftest import Federation
from tests.integration.test_cli import write_profile

ISPF = str(Path(sys.executable).parent / "ispf")
HEADER = "record_id,cnic,programme,status\n"


def ispf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ISPF, *args], capture_output=True, text=True, timeout=120)


def rows(n: int, start: int = 1, status: str = "enrolled") -> str:
    return "".join(f"R{i},35202{i:08d},BISP,{status}\n" for i in range(start, start + n))


@pytest.fixture
def prof(federation: Federation, tmp_path: Path) -> str:
    return str(write_profile(federation, "punjab", tmp_path))


def records(federation: Federation) -> int:
    return int(federation.client("punjab").stats().records)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"record_id;cnic;programme;status\nR1;3520212345671;BISP;enrolled\n", "semicolons"),
        (b"record_id\tcnic\tprogramme\tstatus\nR1\t3520212345671\tBISP\tenrolled\n", "tabs"),
        ((HEADER + "R1,3520212345671,BISP,enrolled\n").encode("utf-16"), "UTF-16"),
        (b"id,nid,programme,status\nR1,3520212345671,BISP,enrolled\n", "lacks column(s) record_id"),
        (b"record_id,cnic,programme,status,nid\nR1,3520212345671,BISP,e,x\n", "twice"),
    ],
)
def test_a_file_that_cannot_be_read_exits_1_with_one_precise_line(
    federation: Federation, tmp_path: Path, prof: str, body: bytes, needle: str
) -> None:
    f = tmp_path / "r.csv"
    f.write_bytes(body)
    res = ispf("registry", "load", str(f), "--profile", prof)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ispf: nothing loaded:"), res.stderr
    assert needle in lines[0]
    assert records(federation) == 0


def test_every_row_rejected_exits_1_and_names_the_excel_number_format(
    federation: Federation, tmp_path: Path, prof: str
) -> None:
    f = tmp_path / "r.csv"
    f.write_text(HEADER + "".join(f"R{i},3.52021E+12,BISP,enrolled\n" for i in range(5)))
    res = ispf("registry", "load", str(f), "--profile", prof)
    assert res.returncode == 1
    assert "nothing loaded" in res.stderr and "number format" in res.stderr
    assert "nid.number_format" in res.stderr


def test_max_rejected_count_percentage_and_strict(
    federation: Federation, tmp_path: Path, prof: str
) -> None:
    f = tmp_path / "r.csv"
    f.write_text(HEADER + rows(19) + "RX,12345,BISP,enrolled\n")  # 20 rows, 1 rejected
    assert ispf("registry", "load", str(f), "--profile", prof).returncode == 1  # 1% of 20 = 0
    assert (
        ispf("registry", "load", str(f), "--profile", prof, "--max-rejected", "1").returncode == 0
    )
    assert (
        ispf("registry", "load", str(f), "--profile", prof, "--max-rejected", "5%").returncode == 0
    )
    res = ispf("registry", "load", str(f), "--profile", prof, "--strict")
    assert res.returncode == 1 and "more than --max-rejected allows (0 of 20)" in res.stderr
    bad = ispf("registry", "load", str(f), "--profile", prof, "--max-rejected", "lots")
    assert bad.returncode == 2 and "--max-rejected" in bad.stderr
    assert records(federation) == 19


def test_urdu_and_eastern_arabic_digits_load_and_json_reports_counts(
    federation: Federation, tmp_path: Path, prof: str
) -> None:
    f = tmp_path / "r.csv"
    f.write_text(
        HEADER
        + "U1,۳۵۲۰۲-۱۲۳۴۵۶۷-۱,BISP,enrolled\n"  # Urdu digits
        + "U2,٣٥٢٠٢١٢٣٤٥٦٧٢,BISP,enrolled\n",  # Eastern Arabic digits
        encoding="utf-8",
    )
    res = ispf("registry", "load", str(f), "--profile", prof, "--json")
    assert res.returncode == 0, res
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(out) == 1
    assert (out[0]["loaded"], out[0]["new"], out[0]["rejected"], out[0]["exit"]) == (2, 2, 0, 0)
    st = ispf("registry", "stats", "--profile", prof, "--json")
    stats = json.loads(st.stdout)
    assert (stats["records"], stats["distinct_ids"]) == (2, 2)
    assert stats["labels"] == [{"programme": "BISP", "records": 2, "status": "enrolled"}]
    # The same people in ASCII digits are the same IDs: updates of nothing.
    f.write_text(HEADER + "U1,3520212345671,BISP,enrolled\nU2,3520212345672,BISP,enrolled\n")
    again = json.loads(ispf("registry", "load", str(f), "--profile", prof, "--json").stdout)
    assert (again["unchanged"], again["updated"]) == (2, 0)


def test_control_bytes_in_record_ids_are_never_echoed_raw(
    federation: Federation, tmp_path: Path, prof: str
) -> None:
    f = tmp_path / "r.csv"
    f.write_text(HEADER + rows(200) + "R\x1b[2J,12345,BISP,enrolled\n")
    res = ispf("registry", "load", str(f), "--profile", prof, "--max-rejected", "1")
    assert res.returncode == 0
    assert "\x1b" not in res.stdout + res.stderr
    assert "R\\x1b[2J" in res.stdout


def test_a_csv_file_inside_a_cell_plants_nothing_and_stops_the_load(
    federation: Federation, tmp_path: Path, prof: str
) -> None:
    planted = "".join(f"X{i},3520299{i:06d},BISP,enrolled\n" for i in range(300))
    f = tmp_path / "r.csv"
    f.write_text(HEADER + rows(3) + f'R9,3520212345679,"{planted}",enrolled\n' + rows(3, 10))
    res = ispf("registry", "load", str(f), "--profile", prof)
    assert res.returncode == 1
    assert "line 5" in res.stdout and "longer than 4096" in res.stdout
    assert "reading stopped at line 5" in res.stderr
    assert records(federation) == 3
    with NodeClient(federation.profile("punjab")) as c:
        assert c.stats().records == 3


def test_a_load_stopped_part_way_says_how_many_rows_were_stored(
    federation: Federation,
    tmp_path: Path,
    prof: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    f = tmp_path / "r.csv"
    f.write_text(HEADER + rows(12000))
    real = NodeClient.upsert
    calls: list[int] = []

    def upsert_then_stop_node(self: NodeClient, batch: list[internal_pb2.Record]) -> object:
        if calls:
            federation.stop("punjab")  # the node goes away after the first batch
        calls.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(NodeClient, "upsert", upsert_then_stop_node)
    assert main(["registry", "load", str(f), "--profile", prof]) == 4
    err = capsys.readouterr().err
    assert "load stopped at line 5002" in err
    assert "5000 rows of this file were stored before it" in err
    assert "nothing of this request was stored" not in err
    assert "Run the same load again" in err


def test_sync_makes_the_registry_the_file_and_refuses_mass_deletes(
    federation: Federation, tmp_path: Path, prof: str
) -> None:
    f = tmp_path / "r.csv"
    f.write_text(HEADER + rows(20))
    assert ispf("registry", "load", str(f), "--profile", prof).returncode == 0
    # R19, R20 leave (10% of 20: allowed by default), R18 changes, R21 arrives.
    f.write_text(HEADER + rows(17) + rows(1, 18, "exited") + rows(1, 21))
    res = ispf("registry", "sync", str(f), "--profile", prof, "--json")
    assert res.returncode == 0, res
    out = json.loads(res.stdout)
    assert {k: out[k] for k in ("new", "updated", "unchanged", "deleted", "rejected")} == {
        "new": 1,
        "updated": 1,
        "unchanged": 17,
        "deleted": 2,
        "rejected": 0,
    }
    assert out["applied"] is True and out["records_before"] == 20
    assert records(federation) == 19
    # Only 5 left: 14 of 19 would go. Refused, and nothing changed at all.
    small = tmp_path / "small.csv"
    small.write_text(HEADER + rows(4) + rows(1, 5, "exited"))
    res = ispf("registry", "sync", str(small), "--profile", prof)
    assert res.returncode == 1
    assert "would delete 14 of 19 records" in res.stderr and "--allow-deletes 14" in res.stderr
    stats = federation.client("punjab").stats()
    assert stats.records == 19
    assert {(lc.label.status, lc.records) for lc in stats.labels} == {
        ("enrolled", 18),
        ("exited", 1),
    }
    dry = ispf(
        "registry", "sync", str(small), "--profile", prof, "--allow-deletes", "14", "--dry-run"
    )
    assert dry.returncode == 0 and "would change" in dry.stdout and records(federation) == 19
    res = ispf("registry", "sync", str(small), "--profile", prof, "--allow-deletes", "14")
    assert res.returncode == 0, res
    assert "1 updated, 4 unchanged, 14 deleted, 0 rejected" in res.stdout
    assert records(federation) == 5
    # Nothing staged is left behind in the store, after an applied or a refused sync.
    db = sqlite3.connect(federation.nodes["punjab"].config.store)
    try:
        assert db.execute("SELECT count(*) FROM sync_rows").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM sync_keep").fetchone() == (0,)
    finally:
        db.close()


def test_sync_keeps_records_whose_rows_are_rejected_and_refuses_a_bad_file(
    federation: Federation, tmp_path: Path, prof: str
) -> None:
    f = tmp_path / "r.csv"
    f.write_text(HEADER + rows(10))
    assert ispf("registry", "load", str(f), "--profile", prof).returncode == 0
    # R3's ID is mistyped and R4's row is short: both kept as stored, not deleted.
    text = HEADER + rows(10)
    text = text.replace("R3,3520200000003,", "R3,352020000,").replace(
        "R4,3520200000004,BISP,enrolled", "R4,3520200000004,BISP"
    )
    f.write_text(text)
    res = ispf("registry", "sync", str(f), "--profile", prof, "--max-rejected", "2", "--json")
    assert res.returncode == 0, res
    out = json.loads(res.stdout)
    assert (out["deleted"], out["kept"], out["rejected"], out["unchanged"]) == (0, 2, 2, 8)
    assert records(federation) == 10
    # Too many rejected: nothing changes.
    res = ispf("registry", "sync", str(f), "--profile", prof)
    assert res.returncode == 1 and "2 rows rejected, more than the 0 allowed" in res.stderr
    # A file stopped part-way is never synced (its unread rows would be deleted).
    f.write_text(HEADER + rows(2) + 'R3,3520200000003,"' + "x" * 5000 + '",e\n')
    res = ispf("registry", "sync", str(f), "--profile", prof, "--allow-deletes", "100")
    assert res.returncode == 1 and "nothing changed" in res.stderr
    assert records(federation) == 10
    bad = tmp_path / "bad.csv"
    bad.write_text("a;b;c\n1;2;3\n")
    res = ispf("registry", "sync", str(bad), "--profile", prof, "--allow-deletes", "100")
    assert res.returncode == 1 and "semicolons" in res.stderr
    assert records(federation) == 10


def test_a_sync_stream_that_breaks_off_changes_nothing(federation: Federation) -> None:
    federation.load("punjab", [(f"R{i}", f"35202{i:08d}", "BISP", "enrolled") for i in range(5)])

    def broken() -> object:
        yield internal_pb2.SyncRecordsRequest(
            records=[
                internal_pb2.Record(record_id="N1", nid="3520212345671", programme="P", status="e")
            ]
        )
        raise RuntimeError("the client died")

    client = federation.client("punjab")
    with pytest.raises(IspfError):  # cancelled: the point is what is stored
        client.sync(broken())  # type: ignore[arg-type]
    assert client.stats().records == 5
    # And one that ends without its commit message is refused with a reason. (The
    # node may still be unwinding the cancelled sync: until then it says RetryLater.)
    give_up = time.monotonic() + 30
    while True:
        try:
            with pytest.raises(InvalidInput, match="without its last"):
                client.sync(iter([internal_pb2.SyncRecordsRequest(records=[])]))
            break
        except RetryLater:
            assert time.monotonic() < give_up, "the cancelled sync never let go"
            time.sleep(0.05)
    assert client.stats().records == 5


def test_reconcile_failure_prints_no_stale_report_and_json_lines(
    federation: Federation, tmp_path: Path, prof: str
) -> None:
    federation.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    federation.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    out = str(tmp_path / "rep")
    ok = ispf("reconcile", "--peer", "sindh", "--profile", prof, "--out", out, "--json")
    assert ok.returncode == 0, ok
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    assert lines[0]["peer"] == "sindh" and lines[0]["completed"] is True
    assert lines[-1]["rows"] == 1 and lines[-1]["exit"] == 0
    sid = lines[0]["session_id"]
    bad = ispf("reconcile", "--peer", "atlantis", "--profile", prof, "--out", out)
    assert bad.returncode == 1
    assert "Report:" not in bad.stdout and "FAILED atlantis" in bad.stdout
    assert "No report written" in bad.stdout
    sessions = ispf("sessions", "list", "--profile", prof, "--json")
    listed = [json.loads(line) for line in sessions.stdout.splitlines()]
    assert [s["session_id"] for s in listed] == [sid] and listed[0]["state"] == "completed"
    exp = ispf("results", "export", "--profile", prof, "--out", out, "--session", sid, "--json")
    got = json.loads(exp.stdout)
    assert got["rows"] == 1 and Path(got["matches_csv"]).exists()
    # A session id pasted with a trailing \r is the same session; a wrong one is unknown.
    rec = ispf(
        "results",
        "receipt",
        "--profile",
        prof,
        "--session",
        sid + "\r",
        "--record",
        "P1",
        "--out",
        str(tmp_path / "r.json"),
    )
    assert rec.returncode == 0, rec
    wrong = ispf(
        "results",
        "receipt",
        "--profile",
        prof,
        "--session",
        sid[:-1] + "\r",
        "--record",
        "P1",
        "--out",
        str(tmp_path / "r.json"),
    )
    assert wrong.returncode == 1 and "no session" in wrong.stderr and "\r" not in wrong.stderr


def test_plain_output_is_never_hard_wrapped_off_a_terminal(
    federation: Federation, tmp_path: Path, prof: str
) -> None:
    deep = tmp_path / ("a-long-folder-name-" * 6)
    deep.mkdir()
    f = deep / "registry-export-of-the-whole-province.csv"
    f.write_text(HEADER + rows(3))
    res = ispf("registry", "load", str(f), "--profile", prof)
    assert res.returncode == 0
    first = res.stdout.splitlines()[0]
    assert len(first) > 120 and first.startswith(str(f)) and "3 loaded" in first


def test_a_deadline_that_passes_is_reported_as_maybe_stored_not_as_nothing(
    federation: Federation, tmp_path: Path
) -> None:
    from ispf_client.loader import load_csv

    f = tmp_path / "r.csv"
    f.write_text(HEADER + rows(7000))
    with NodeClient(federation.profile("punjab"), timeout=0.001) as client:
        rep = load_csv(client, f)
    assert rep.stopped and rep.stopped_at == 2
    assert rep.accepted == 0 and rep.unconfirmed == 5000  # the node may have stored it


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_load_killed_with_sigterm_says_how_many_rows_were_stored(
    federation: Federation, tmp_path: Path, prof: str, signame: str
) -> None:
    import signal
    import time

    f = tmp_path / "r.csv"
    f.write_text(HEADER + rows(300_000))
    proc = subprocess.Popen(
        [ISPF, "registry", "load", str(f), "--profile", prof],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while records(federation) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    stored = records(federation)
    assert 0 < stored < 300_000
    m = re.search(r"load stopped at line (\d+): interrupted; (\d+) rows of this file", err)
    assert m, err
    # The batch being stored when the signal came was finished, and no more were sent:
    # what it says was stored is exactly what was, with nothing left in doubt.
    assert int(m.group(2)) == stored and stored % 5000 == 0
    assert int(m.group(1)) == stored + 2
    assert "may or may not" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["registry", "load"],
        ["registry", "sync"],
        ["registry", "stats"],
        ["reconcile"],
        ["sessions", "list"],
        ["results", "export"],
        ["results", "receipt"],
    ],
)
def test_every_batch_command_documents_its_exit_codes_and_json(command: list[str]) -> None:
    res = ispf(*command, "--help")
    assert res.returncode == 0
    assert "exit codes:" in res.stdout and "\n  0 " in res.stdout and "\n  2 " in res.stdout
    if command != ["results", "receipt"]:
        assert "--json" in res.stdout


def test_rejected_rows_past_the_kept_number_are_counted_and_all_written(
    federation: Federation,
    tmp_path: Path,
    prof: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import csv

    from ispf_client import loader

    monkeypatch.setattr(loader, "MAX_KEPT_PROBLEMS", 5)
    monkeypatch.setattr(loader, "BATCH", 7)
    body = "".join(
        f"B{i},12345,BISP,enrolled\n" if i % 2 else f"G{i},35202{i:08d},BISP,enrolled\n"
        for i in range(40)
    )
    f = tmp_path / "r.csv"
    f.write_text(HEADER + body + "S1,3520212345671,BISP\n")  # a file-side problem too
    errors = tmp_path / "errors.csv"
    rc = main(["registry", "load", str(f), "--profile", prof, "--errors", str(errors), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert (out["rejected"], out["loaded"], rc) == (21, 20, 1)
    with errors.open() as fh:
        lines = [int(r[0]) for r in list(csv.reader(fh))[1:]]
    assert lines == [i + 2 for i in range(1, 40, 2)] + [42]
