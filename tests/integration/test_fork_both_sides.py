"""A fork of either node's log, found by either side, fails the session on both sides."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from ispf import merkle, note
from ispf.auditlog import Checkpoint, decode_entry, encode_entry
from ispf.v1 import internal_pb2
from tests.conftest import Federation
from tests.integration.test_cli import write_profile

S = internal_pb2
ISPF = str(Path(sys.executable).parent / "ispf")


def prepared(fed: Federation) -> None:
    fed.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    fed.load("sindh", [("S1", "3520212345671", "SSPA", "eligible")])
    assert fed.reconcile("punjab", "sindh").state == S.SESSION_STATE_COMPLETED


def fork(fed: Federation, province: str) -> None:
    """What a dishonest node can do: rewrite a logged session and re-sign the same size."""
    node = fed.nodes[province]
    db = sqlite3.connect(node.config.store, isolation_level=None)
    rows = db.execute("SELECT idx, entry FROM log_entries ORDER BY idx").fetchall()
    idx, entry = next((i, bytes(e)) for i, e in rows if decode_entry(bytes(e))["type"] == "session")
    forged = decode_entry(entry)
    forged["match_count"] = (forged["match_count"] or 0) + 1
    db.execute("UPDATE log_entries SET entry=? WHERE idx=?", (encode_entry(forged), idx))
    leaves = [
        merkle.leaf_hash(bytes(e))
        for (e,) in db.execute("SELECT entry FROM log_entries ORDER BY idx").fetchall()
    ]
    text = Checkpoint(node.audit.origin, len(leaves), merkle.root(leaves)).text()
    db.execute("DELETE FROM checkpoints WHERE size >= ?", (len(leaves),))
    db.execute("DELETE FROM cosignatures")
    db.execute(
        "INSERT INTO checkpoints VALUES (?,?,?)",
        (len(leaves), note.sign(text, node.audit.signer), "now"),
    )
    db.close()


def reconcile_cli(fed: Federation, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    prof = write_profile(fed, "punjab", tmp_path)
    return subprocess.run(
        [ISPF, "reconcile", "--peer", "sindh", "--profile", str(prof), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def latest(fed: Federation, province: str) -> internal_pb2.SessionStatus:
    return max(fed.client(province).sessions(), key=lambda s: s.started_at)


def test_the_initiator_finds_the_responders_fork_and_both_fail(
    federation: Federation, tmp_path: Path
) -> None:
    prepared(federation)
    fork(federation, "sindh")
    done = reconcile_cli(federation, tmp_path)
    assert done.returncode == 1
    assert "not consistent with the one it signed before" in " ".join(done.stdout.split())
    mine, theirs = latest(federation, "punjab"), latest(federation, "sindh")
    assert mine.session_id == theirs.session_id
    assert mine.state == theirs.state == S.SESSION_STATE_FAILED
    assert "checkpoint of sindh is not consistent" in mine.error
    assert "aborted by punjab" in theirs.error


def test_the_responder_finds_the_initiators_fork_and_both_fail(
    federation: Federation, tmp_path: Path
) -> None:
    prepared(federation)
    fork(federation, "punjab")
    done = reconcile_cli(federation, tmp_path)
    assert done.returncode == 1
    mine, theirs = latest(federation, "punjab"), latest(federation, "sindh")
    assert mine.session_id == theirs.session_id
    assert mine.state == theirs.state == S.SESSION_STATE_FAILED
    assert "checkpoint of punjab is not consistent" in theirs.error
    assert "checkpoint of punjab is not consistent" in mine.error
    assert mine.match_count == 0 and theirs.match_count == 0
