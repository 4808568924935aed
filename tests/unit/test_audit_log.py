"""The node's log: durable ordering of entries and checkpoints, one entry per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from ispf import merkle, note
from ispf.auditlog import Checkpoint, decode_entry, encode_entry, open_checkpoint
from ispf.errors import EntryError
from ispf.v1 import common_pb2
from ispf_server.audit import AuditLog, SessionEntry
from ispf_server.clock import utcnow
from ispf_server.storage import Store
from ispf_server.storage.sessions import SessionTotals


def make_log(path: Path, signer: note.Signer) -> AuditLog:
    return AuditLog(Store(path), signer, "punjab", {})


def test_checkpoint_after_a_crash_covers_exactly_what_is_on_disk(tmp_path: Path) -> None:
    signer = note.Signer.generate("ispf-match/punjab")
    log = make_log(tmp_path / "n.sqlite", signer)
    assert log.size() == 0
    log.store.sessions.begin("s1", "sindh", "initiator", common_pb2.MODE_MUTUAL, "r", 1)
    entry = log.session_entry(
        SessionEntry(
            session_id="s1",
            initiator="punjab",
            responder="sindh",
            purpose="r",
            epoch=1,
            mode=common_pb2.MODE_MUTUAL,
            outcome="completed",
            time=utcnow(),
            match_count=0,
        )
    )
    log.store.complete_session(
        "s1",
        SessionTotals(
            own_records=0,
            own_values=0,
            peer_values=0,
            match_count=0,
            result_digest=b"",
        ),
        matches=[],
        entry=entry,
    )
    # Crash here: the entry is committed, no checkpoint covers it yet.
    log.store.close()
    reopened = make_log(tmp_path / "n.sqlite", signer)
    signed = open_checkpoint(reopened.latest(), signer.verifier())
    assert signed.checkpoint.size == 1
    assert signed.checkpoint.root == merkle.leaf_hash(entry)


def test_a_session_gets_one_entry_even_if_failed_twice(tmp_path: Path) -> None:
    log = make_log(tmp_path / "n.sqlite", note.Signer.generate("ispf-match/punjab"))
    log.store.sessions.begin("s2", "kp", "responder", common_pb2.MODE_MUTUAL, "r", 1)
    assert log.store.fail_session("s2", "peer vanished", b'{"v":1}')
    assert not log.store.fail_session("s2", "again", b'{"v":1}')
    assert len(log.store.audit.entries()) == 1


def test_entries_refuse_id_like_values_and_non_canonical_bytes() -> None:
    with pytest.raises(EntryError, match="13 digits"):
        encode_entry({"v": 1, "type": "session", "note": "3520212345671"})
    with pytest.raises(EntryError, match="integers and strings"):
        encode_entry({"v": 1, "type": "session", "x": 1.5})
    good = encode_entry({"v": 1, "type": "session", "a": 1})
    assert decode_entry(good)["a"] == 1
    with pytest.raises(EntryError, match="canonical"):
        decode_entry(b'{"type":"session", "v":1,"a":1}')


def test_free_text_in_entries_cannot_carry_an_id(tmp_path: Path) -> None:
    log = make_log(tmp_path / "n.sqlite", note.Signer.generate("ispf-match/punjab"))
    entry = log.session_entry(
        SessionEntry(
            session_id="s",
            initiator="punjab",
            responder="sindh",
            purpose="r",
            epoch=1,
            mode=common_pb2.MODE_MUTUAL,
            outcome="failed",
            time=utcnow(),
            reason="bad row 3520212345671\x00",
        )
    )
    assert b"3520212345671" not in entry and b"#" in entry


def test_checkpoint_text_is_the_c2sp_format(tmp_path: Path) -> None:
    signer = note.Signer.generate("ispf-match/punjab")
    log = make_log(tmp_path / "n.sqlite", signer)
    text, _ = note.split(log.latest())
    cp = Checkpoint.parse(text)
    assert text == f"ispf-match/punjab\n0\n{__import__('base64').b64encode(cp.root).decode()}\n"
    assert cp.root == merkle.EMPTY_ROOT
