"""The match log as an auditor sees it: verification, tampering, pairing, proofs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ispf import note
from ispf.auditlog import Checkpoint, decode_entry, encode_entry
from ispf.errors import AuditFailure
from ispf.v1 import internal_pb2
from ispf_client.auditor import AuditProfile, pair, verify
from ispf_client.cli import main
from ispf_client.forum import write_audit_profile, write_client_profile
from ispf_server.pool import BlindingPool
from tests.conftest import Federation, RawStore, backend_store_urls, start_federation

IDS = ["3520212345671", "4210198765432", "1730155555550", "3520200000001", "5440012345678"]
COMPLETED = internal_pb2.SESSION_STATE_COMPLETED

# The store backends these tests run on (the `store_backend` fixture, tests/conftest.py).
STORE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="module", params=STORE_BACKENDS)
def audited(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Federation]:
    """Three provinces that reconciled every pair (twice for one pair)."""
    root = tmp_path_factory.mktemp("audit")
    pool = BlindingPool(0)
    provinces = ["punjab", "sindh", "kp"]
    fed = start_federation(root, provinces, pool, store_urls=backend_store_urls(request, provinces))
    fed.load("punjab", [(f"P{i}", n, "BISP", "enrolled") for i, n in enumerate(IDS)])
    fed.load("sindh", [(f"S{i}", n, "SSPA", "eligible") for i, n in enumerate(IDS[1:4])])
    fed.load("kp", [(f"K{i}", n, "SEHAT", "enrolled") for i, n in enumerate(IDS[2:])])
    for a, b in (("punjab", "sindh"), ("punjab", "kp"), ("sindh", "kp"), ("punjab", "sindh")):
        assert fed.reconcile(a, b).state == COMPLETED
    addresses = {p: f"127.0.0.1:{port}" for p, port in fed.ports.items()}
    write_audit_profile(fed.layout, "auditor", addresses)
    for p, a in addresses.items():
        write_client_profile(fed.layout, p, a)
    yield fed
    fed.close()
    pool.close()


def profile_for(fed: Federation, tmp_path: Path) -> AuditProfile:
    """The forum's audit profile, with its state and evidence in this test's folder."""
    from dataclasses import replace

    prof = AuditProfile.load(fed.layout.auditor_dir("auditor") / "audit.toml")
    return replace(prof, state=tmp_path / "state.json", evidence=tmp_path / "evidence")


def test_every_log_verifies_cosigned_and_pairs(audited: Federation, tmp_path: Path) -> None:
    prof = profile_for(audited, tmp_path)
    reports = {r.node: r for r in verify(prof)}
    assert reports["punjab"].sessions == 3 and reports["sindh"].sessions == 3
    assert reports["punjab"].previous_size is None
    assert reports["punjab"].cosigners  # the last peer cosigned its checkpoint
    again = {r.node: r for r in verify(prof)}
    assert again["punjab"].previous_size == reports["punjab"].size
    rep = pair(prof)
    assert rep.ok and rep.paired == 4 and not rep.one_sided and not rep.mismatched


def test_entries_hold_no_id_number(audited: Federation) -> None:
    for node in audited.nodes.values():
        blob = b"".join(node.store.audit.entries())
        blob += "".join(n for _, n in node.store.audit.recent_checkpoints(100)).encode()
        for nid in IDS:
            for form in (nid, f"{nid[:5]}-{nid[5:12]}-{nid[12]}", nid[5:12]):
                assert form.encode() not in blob
        assert re.search(rb"\d{13}", blob) is None
        salt = node.current_salt.unsafe_raw()
        assert salt not in blob and salt.hex().encode() not in blob


@pytest.fixture
def tamper(audited: Federation, tmp_path: Path) -> Iterator[tuple[RawStore, AuditProfile]]:
    """Trust punjab's log as it is, hand the test a raw connection to its store, undo after."""
    prof = profile_for(audited, tmp_path)
    verify(prof, ["punjab"])
    db = RawStore(audited.nodes["punjab"])
    saved = {
        t: db.execute(f"SELECT * FROM {t}").fetchall()
        for t in ("log_entries", "checkpoints", "cosignatures")
    }
    yield db, prof
    for table, rows in saved.items():
        db.execute(f"DELETE FROM {table}")
        if rows:
            marks = ",".join("?" * len(rows[0]))
            db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    db.close()


def entries(db: RawStore) -> list[tuple[int, str, bytes]]:
    return db.execute("SELECT idx, session_id, entry FROM log_entries ORDER BY idx").fetchall()


def rewrite(db: RawStore, rows: list[tuple[str, bytes]]) -> None:
    db.execute("DELETE FROM log_entries")
    db.executemany(
        "INSERT INTO log_entries VALUES (?,?,?)", [(i, sid, e) for i, (sid, e) in enumerate(rows)]
    )


def resign(audited: Federation, db: RawStore) -> None:
    """What a dishonest node can do: sign a checkpoint over its rewritten log."""
    from ispf import merkle

    node = audited.nodes["punjab"]
    leaves = [merkle.leaf_hash(bytes(e)) for _, _, e in entries(db)]
    text = Checkpoint(node.audit.origin, len(leaves), merkle.root(leaves)).text()
    db.execute("DELETE FROM checkpoints WHERE size >= ?", (len(leaves),))
    db.execute("DELETE FROM cosignatures")
    db.execute(
        "INSERT INTO checkpoints VALUES (?,?,?)",
        (len(leaves), note.sign(text, node.audit.signer), "now"),
    )


def first_session(rows: list[tuple[str, bytes]]) -> int:
    return next(i for i, (_, e) in enumerate(rows) if decode_entry(e)["type"] == "session")


def expect(prof: AuditProfile, kind: str) -> AuditFailure:
    with pytest.raises(AuditFailure) as info:
        verify(prof, ["punjab"])
    assert info.value.kind == kind, info.value.message
    return info.value


def test_flipped_bit_is_named_modified(tamper: tuple[RawStore, AuditProfile]) -> None:
    db, prof = tamper
    idx, _, e = entries(db)[1]
    flipped = bytearray(e)
    flipped[len(flipped) // 2] ^= 0x01
    db.execute("UPDATE log_entries SET entry=? WHERE idx=?", (bytes(flipped), idx))
    assert "entry 1 was modified" in expect(prof, "modified").message


def test_deleted_entry_is_named(tamper: tuple[RawStore, AuditProfile]) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    rewrite(db, rows[:1] + rows[2:])
    assert "entry 1" in expect(prof, "deleted").message


def test_inserted_entry_is_named(tamper: tuple[RawStore, AuditProfile]) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    forged = decode_entry(rows[0][1])
    forged["session_id"] = "00000000-0000-4000-8000-000000000000"
    rewrite(db, [*rows[:1], (forged["session_id"], encode_entry(forged)), *rows[1:-1]])
    assert "inserted at index 1" in expect(prof, "inserted").message


def test_reordered_entries_are_named(tamper: tuple[RawStore, AuditProfile]) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    rewrite(db, [rows[1], rows[0], *rows[2:]])
    expect(prof, "reordered")


def test_truncate_and_resign_is_a_rollback_with_evidence(
    audited: Federation,
    tamper: tuple[RawStore, AuditProfile],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    rewrite(db, rows[:-1])
    db.execute("DELETE FROM checkpoints")
    resign(audited, db)
    # As an auditor runs it: non-zero exit, the kind named, the evidence kept.
    cli_profile = tmp_path / "audit.toml"
    text = (audited.layout.auditor_dir("auditor") / "audit.toml").read_text()
    base = audited.layout.auditor_dir("auditor")
    text = text.replace('state = "audit-state.json"', f'state = "{prof.state}"')
    text = text.replace('evidence = "evidence"', f'evidence = "{tmp_path / "cli-evidence"}"')
    text = text.replace('"../../', f'"{base}/../../')
    text = text.replace('"auditor.', f'"{base}/auditor.')
    cli_profile.write_text(text)
    assert main(["audit", "verify", "--profile", str(cli_profile), "--node", "punjab"]) == 1
    err = capsys.readouterr().err
    assert "AUDIT FAILED punjab: rollback" in err and "Evidence kept in" in err
    failure = expect(prof, "rollback")
    assert failure.evidence is not None
    ev = json.loads(failure.evidence.read_text())
    assert ev["kind"] == "rollback"
    assert ev["trusted_checkpoint"] != ev["new_checkpoint"]
    # Both checkpoints in the evidence are signed by the node: proof of its rollback.
    key = prof.nodes["punjab"].key
    for n in (ev["trusted_checkpoint"], ev["new_checkpoint"]):
        note.verify(n, key)


def test_fork_with_the_same_key_is_detected_with_evidence(
    audited: Federation, tamper: tuple[RawStore, AuditProfile]
) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    k = first_session(rows)
    forged = decode_entry(rows[k][1])
    forged["match_count"] = (forged["match_count"] or 0) + 1
    rows[k] = (rows[k][0], encode_entry(forged))
    rewrite(db, rows)
    resign(audited, db)  # same size, other root
    failure = expect(prof, "fork")
    assert failure.evidence is not None and "same key" in failure.message
    # Growing the forked branch does not help: no consistency proof can link them.
    rewrite(db, [*rows, rows[-1]])
    resign(audited, db)
    expect(prof, "fork")


def test_fork_is_caught_by_a_fresh_auditor_through_the_peers_view(
    audited: Federation, tamper: tuple[RawStore, AuditProfile], tmp_path: Path
) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    k = first_session(rows)
    forged = decode_entry(rows[k][1])
    forged["purpose"] = "rewritten"
    rows[k] = (rows[k][0], encode_entry(forged))
    rewrite(db, rows)
    resign(audited, db)
    from dataclasses import replace

    fresh = replace(prof, state=tmp_path / "fresh-state.json")  # never saw punjab before
    with pytest.raises(AuditFailure) as info:
        verify(fresh, ["punjab"])
    assert info.value.kind == "fork" and "verified" in info.value.message


def test_checkpoint_signed_by_another_key_is_refused(
    tamper: tuple[RawStore, AuditProfile],
) -> None:
    db, prof = tamper
    size, signed = db.execute("SELECT size, note FROM checkpoints ORDER BY size DESC").fetchone()
    text, _ = note.split(signed)
    impostor = note.Signer.generate("ispf-match/punjab")
    db.execute("UPDATE checkpoints SET note=? WHERE size=?", (note.sign(text, impostor), size))
    expect(prof, "bad-signature")


def test_pair_lists_a_session_only_one_side_logged(
    audited: Federation, tamper: tuple[RawStore, AuditProfile], tmp_path: Path
) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    rewrite(db, rows[:-1])  # punjab drops its latest session, and re-signs
    db.execute("DELETE FROM checkpoints")
    resign(audited, db)
    rep = pair(prof)
    assert not rep.ok
    assert rep.one_sided and "not by punjab" in rep.one_sided[0]


def test_prove_and_verify_proof_offline(
    audited: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prof_path = audited.layout.auditor_dir("auditor") / "audit.toml"
    sid = audited.client("punjab").sessions()[0].session_id
    bundle = tmp_path / "bundle.json"
    assert (
        main(
            [
                "audit",
                "prove",
                "--profile",
                str(prof_path),
                "--node",
                "sindh",
                "--session",
                sid,
                "--out",
                str(bundle),
            ]
        )
        == 0
    )
    keys = str(audited.layout.log_keys_dir)
    assert main(["audit", "verify-proof", str(bundle), "--keys", keys]) == 0
    assert sid in capsys.readouterr().out
    data = json.loads(bundle.read_text())
    data["entry_index"] += 1
    bundle.write_text(json.dumps(data))
    assert main(["audit", "verify-proof", str(bundle), "--keys", keys]) == 1
    assert "PROOF INVALID" in capsys.readouterr().err


def test_receipt_proves_one_match_without_the_others(
    audited: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = audited.client("punjab")
    done = [s for s in client.sessions() if s.state == COMPLETED and s.match_count > 1]
    sid = done[0].session_id
    rid = next(iter(client.matches(sid))).record_id
    out = tmp_path / "receipt.json"
    profile = str(audited.layout.client_dir("punjab") / "profile.toml")
    assert (
        main(
            [
                "results",
                "receipt",
                "--profile",
                profile,
                "--session",
                sid,
                "--record",
                rid,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    keys = str(audited.layout.log_keys_dir)
    assert main(["audit", "verify-proof", str(out), "--keys", keys]) == 0
    assert "Valid receipt" in capsys.readouterr().out
    receipt = json.loads(out.read_text())
    text = json.dumps(receipt)
    for nid in IDS:
        assert nid not in text
    others = {m.record_id for m in client.matches(sid)} - {rid}
    values = {v for v in receipt.values() if isinstance(v, str)}
    assert receipt["record_id"] == rid and others and not (others & values)
    receipt["tag"] = receipt["tag"][:-4] + ("AAA=" if receipt["tag"][-4:] != "AAA=" else "BBB=")
    out.write_text(json.dumps(receipt))
    assert main(["audit", "verify-proof", str(out), "--keys", keys]) == 1


def test_checkpoint_verifies_with_an_independent_implementation(audited: Federation) -> None:
    nodejs = shutil.which("node")
    if nodejs is None:
        pytest.skip("Node.js is not installed: the independent verifier cannot run")
    node = audited.nodes["sindh"]
    vkey = node.audit.signer.verifier().encode()
    script = Path(__file__).parent.parent / "interop" / "verify_checkpoint.mjs"
    signed = node.audit.latest()  # with cosignatures: unknown lines must be ignored
    assert signed.count("\u2014") >= 2
    ok = subprocess.run(
        [nodejs, str(script), vkey], input=signed, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["ispf-match/sindh", str(node.audit.size())]
    other = note.Signer.generate("ispf-match/sindh").verifier().encode()
    bad = subprocess.run(
        [nodejs, str(script), other], input=signed, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0


def test_policy_change_takes_effect_is_logged_and_refusals_are_logged(
    audited: Federation,
) -> None:
    sindh = audited.nodes["sindh"]
    path = sindh.config.policy_file
    original = path.read_text()
    try:
        # Sindh stops answering punjab's statistics requests: no restart needed.
        head, punjab = original.split("[peers.punjab]")
        punjab = punjab.replace('"statistics", ', "", 1)
        path.write_text(head.replace("version = 1", "version = 2") + "[peers.punjab]" + punjab)
        before = len(sindh.store.audit.entries())
        st = audited.client("punjab").start_reconciliation("sindh", purpose="statistics")
        final = audited.client("punjab").wait(st.session_id)
        assert final.state != COMPLETED
        assert "purpose 'statistics' is not allowed for peer punjab by policy version 2" in (
            final.error
        )
        logged = [decode_entry(e) for e in sindh.store.audit.entries()[before:]]
        assert [e["type"] for e in logged] == ["policy", "refusal"]
        assert logged[0]["version"] == 2 and len(logged[0]["sha256"]) == 44
        assert logged[1]["reason_code"] == "PolicyRefused" and logged[1]["peer"] == "punjab"
        mine = [decode_entry(e) for e in audited.nodes["punjab"].store.audit.entries()]
        assert mine[-1]["outcome"] == "failed" and mine[-1]["session_id"] == st.session_id
        # A broken policy file is refused; the one in force stays.
        path.write_text("version = 3\n[peers.punjab]\npurposes = 7\n")
        st = audited.client("punjab").start_reconciliation("sindh")
        assert audited.client("punjab").wait(st.session_id).state == COMPLETED
    finally:
        path.write_text(original)


def cli_profile(audited: Federation, prof: AuditProfile, tmp_path: Path) -> Path:
    """The forum's audit profile as a file, with this test's state and evidence folder."""
    base = audited.layout.auditor_dir("auditor")
    text = (base / "audit.toml").read_text()
    text = text.replace('state = "audit-state.json"', f'state = "{prof.state}"')
    text = text.replace('evidence = "evidence"', f'evidence = "{prof.evidence}"')
    text = text.replace('"../../', f'"{base}/../../').replace('"auditor.', f'"{base}/auditor.')
    path = tmp_path / "cli-audit.toml"
    path.write_text(text)
    return path


def ispf(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    exe = str(Path(sys.executable).parent / "ispf")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_auditor_reports_every_node_when_one_fails_with_evidence(
    audited: Federation, tamper: tuple[RawStore, AuditProfile], tmp_path: Path
) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    rewrite(db, rows[:1] + rows[2:])
    done = ispf("audit", "verify", "--profile", str(cli_profile(audited, prof, tmp_path)))
    assert done.returncode == 1
    assert "AUDIT FAILED punjab: deleted: entry 1 was deleted" in done.stderr
    # punjab sorts between kp and sindh: both are still checked and reported.
    assert re.search(r"^kp: log of \d+ entries verified", done.stdout, re.M)
    assert re.search(r"^sindh: log of \d+ entries verified", done.stdout, re.M)
    assert "1 node of 3 failed the audit: punjab" in done.stderr
    evidence = list(prof.evidence.glob("punjab-deleted-*.json"))
    assert len(evidence) == 1
    ev = json.loads(evidence[0].read_text())
    assert ev["kind"] == "deleted" and ev["checkpoint"] and ev["served_entries"]
    # JSON: one object per node, the failing one with its kind and evidence.
    done = ispf("audit", "verify", "--json", "--profile", str(cli_profile(audited, prof, tmp_path)))
    got = {o["node"]: o for o in map(json.loads, done.stdout.splitlines())}
    assert done.returncode == 1 and set(got) == {"punjab", "sindh", "kp"}
    assert got["punjab"]["ok"] is False and got["punjab"]["kind"] == "deleted"
    assert got["punjab"]["evidence"] and Path(got["punjab"]["evidence"]).exists()
    assert got["sindh"]["ok"] is True and got["sindh"]["sessions"] >= 3


def test_a_swap_of_the_last_two_entries_is_reordered_not_deleted(
    tamper: tuple[RawStore, AuditProfile],
) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    rewrite(db, [*rows[:-2], rows[-1], rows[-2]])
    failure = expect(prof, "reordered")
    assert f"entry {len(rows) - 2} was moved" in failure.message
    assert failure.evidence is not None and failure.evidence.exists()


def test_a_truncated_tail_is_a_rollback_with_evidence(
    tamper: tuple[RawStore, AuditProfile],
) -> None:
    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    rewrite(db, rows[:-2])  # the signed checkpoint is left as it was
    failure = expect(prof, "rollback")
    assert f"truncated to {len(rows) - 2} entries" in failure.message
    assert failure.evidence is not None
    assert json.loads(failure.evidence.read_text())["kind"] == "rollback"


def test_a_modified_entry_keeps_evidence(tamper: tuple[RawStore, AuditProfile]) -> None:
    db, prof = tamper
    idx, _, e = entries(db)[-1]
    flipped = bytearray(e)
    flipped[len(flipped) // 2] ^= 0x01
    db.execute("UPDATE log_entries SET entry=? WHERE idx=?", (bytes(flipped), idx))
    failure = expect(prof, "modified")
    assert f"entry {idx} was modified" in failure.message
    assert failure.evidence is not None and failure.evidence.exists()


def test_a_fresh_auditor_names_a_deleted_entry_deleted(
    tamper: tuple[RawStore, AuditProfile], tmp_path: Path
) -> None:
    from dataclasses import replace

    db, prof = tamper
    rows = [(s, e) for _, s, e in entries(db)]
    rewrite(db, rows[:2] + rows[3:])
    fresh = replace(prof, state=tmp_path / "never.json")
    with pytest.raises(AuditFailure) as info:
        verify(fresh, ["punjab"])
    assert info.value.kind == "deleted", info.value.message
    assert f"serves {len(rows) - 1} of the {len(rows)} entries" in info.value.message


def test_audit_pair_json_is_one_object(audited: Federation, tmp_path: Path) -> None:
    prof = profile_for(audited, tmp_path)
    done = ispf("audit", "pair", "--json", "--profile", str(cli_profile(audited, prof, tmp_path)))
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    got = json.loads(line)
    assert got["ok"] is True and got["paired"] >= 4 and got["one_sided"] == []
