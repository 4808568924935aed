"""The leak test: a whole demo run, scanned for every ID in its registries and for the salt.

Scanned: every log line (all loggers, DEBUG and up), everything printed, every
peer-to-peer message in both directions, every audit entry and checkpoint,
every report and error file written, and every error message the run produced.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from rich.console import Console

from ispf_client.demo import run_demo
from tests.integration.test_security import Recorder


def registry_ids(data: Path) -> set[str]:
    ids = set()
    for f in data.glob("*.csv"):
        for line in f.read_text().splitlines()[1:]:
            cnic = line.split(",")[1].replace("-", "")
            if len(cnic) == 13 and cnic.isdigit():
                ids.add(cnic)
    return ids


def test_a_demo_run_leaks_no_id_and_no_salt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    recorder = Recorder()
    printed = io.StringIO()
    work, out = tmp_path / "work", tmp_path / "out"
    res = run_demo(
        provinces=["punjab", "sindh", "kp"],
        out=out,
        records=600,
        workers=1,
        workdir=work,
        interceptors=[recorder],
        console=Console(file=printed, width=120),
    )
    assert res.ok, res.failures
    ids = registry_ids(work / "data")
    assert len(ids) > 1500
    salt_hex = (work / "forum" / "salts" / "epoch-1.salt").read_text().strip()
    salt = bytes.fromhex(salt_hex)
    places: dict[str, bytes] = {
        "log lines": "\n".join(caplog.handler.format(r) for r in caplog.records).encode(),
        "console": printed.getvalue().encode(),
        "peer messages": b"\x00".join(recorder.transcript),
        "reports and error files": b"\x00".join(f.read_bytes() for f in out.iterdir()),
        "session errors and failures": "\n".join(res.failures).encode(),
    }
    import sqlite3

    for node_dir in (work / "forum" / "nodes").iterdir():
        db = sqlite3.connect(node_dir / "node.sqlite")
        places[f"{node_dir.name} audit log"] = b"\x00".join(
            [bytes(r[0]) for r in db.execute("SELECT entry FROM log_entries")]
            + [r[0].encode() for r in db.execute("SELECT note FROM checkpoints")]
            + [r[0].encode() for r in db.execute("SELECT line FROM cosignatures")]
            + [r[0].encode() for r in db.execute("SELECT error FROM sessions")]
        )
        db.close()
    assert len(recorder.transcript) > 30  # 3 sessions: handshakes, chunks, witnessing
    assert len(places["log lines"]) > 1000
    for where, blob in places.items():
        assert salt not in blob and salt_hex.encode() not in blob, f"salt in {where}"
        leaked = [
            i for i in ids if i.encode() in blob or f"{i[:5]}-{i[5:12]}-{i[12]}".encode() in blob
        ]
        assert not leaked, f"{len(leaked)} ID numbers in {where}"
        # A run of 13 digits standing alone. Inside a hex digest or base64 (letters on
        # either side) it is chance: a digest starts with 13 decimal digits once in
        # about 450 (CI met one), and the check above has ruled out every real ID.
        lone = rb"(?<![0-9A-Za-z+/])\d{13}(?![0-9A-Za-z+/])"
        assert not re.search(lone, blob), f"13 digits in {where}"
