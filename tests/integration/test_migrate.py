"""`ispf-node migrate`: a node's SQLite store moved into PostgreSQL serves on as it
did (the same registry, sessions, matches and audit log, which an auditor verifies;
the pair state too, so the next run is incremental); an altered log, or a target
that already holds data, is refused with nothing copied."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from ispf.v1 import internal_pb2
from ispf_client.auditor import AuditProfile, verify
from ispf_client.forum import write_audit_profile
from ispf_server.__main__ import main
from ispf_server.pool import BlindingPool
from tests.conftest import Federation, start_federation
from tests.pgserver import PgServer

COMPLETED = internal_pb2.SESSION_STATE_COMPLETED
SHARED = ["3520212345671", "4210198765432", "1730155555550"]


def matches(fed: Federation, p: str, sid: str) -> set[tuple[str, str, str]]:
    return {(m.record_id, m.peer_programme, m.peer_status) for m in fed.client(p).matches(sid)}


def test_a_migrated_node_serves_on_from_postgresql(
    tmp_path: Path, pg_server: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = BlindingPool(0)
    fed = start_federation(tmp_path, ["punjab", "sindh"], pool)
    fed.load("punjab", [(f"P{i}", n, "BISP", "enrolled") for i, n in enumerate(SHARED)])
    fed.load("punjab", [("P9", "3520200000009", "PSER", "eligible")])
    fed.load("sindh", [(f"S{i}", n, "SSPA", "eligible") for i, n in enumerate(SHARED[1:])])
    first = fed.reconcile("punjab", "sindh")
    assert first.state == COMPLETED and first.sync == "full"
    before = matches(fed, "punjab", first.session_id)
    stats = fed.client("punjab").stats()
    fed.close()
    store = fed.nodes["punjab"].config.store
    url = pg_server.create_database("migrated_punjab")

    before_bytes = store.read_bytes()
    assert main(["migrate", "--from", str(store), "--to", url]) == 0
    out = capsys.readouterr().out
    assert "4 records" in out and "recomputed and equal" in out
    assert store.read_bytes() == before_bytes  # the source is only read
    # Into a database that holds data: refused, and it says so.
    assert main(["migrate", "--from", str(store), "--to", url]) == 2
    assert "already holds data" in capsys.readouterr().err

    fed = start_federation(
        tmp_path, ["punjab", "sindh"], pool, reuse=fed.layout, store_urls={"punjab": url}
    )
    try:
        assert fed.nodes["punjab"].config.store_url == url
        assert matches(fed, "punjab", first.session_id) == before
        assert fed.client("punjab").stats() == stats
        fed.load("sindh", [("S9", SHARED[0], "SSPA", "enrolled")])
        again = fed.reconcile("punjab", "sindh")
        assert again.state == COMPLETED and again.sync == "incremental"  # the pair state moved
        assert ("P0", "SSPA", "enrolled") in matches(fed, "punjab", again.session_id)
        addresses = {p: f"127.0.0.1:{port}" for p, port in fed.ports.items()}
        write_audit_profile(fed.layout, "auditor", addresses)
        prof = AuditProfile.load(fed.layout.auditor_dir("auditor") / "audit.toml")
        prof = replace(prof, state=tmp_path / "audit.json", evidence=tmp_path / "evidence")
        report = {r.node: r for r in verify(prof)}["punjab"]
        assert report.sessions == 2
    finally:
        fed.close()
        pool.close()
        pg_server.drop_database("migrated_punjab")


def test_an_altered_log_is_not_migrated(
    tmp_path: Path, pg_server: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = BlindingPool(0)
    fed = start_federation(tmp_path, ["punjab", "sindh"], pool)
    fed.load("punjab", [("P0", SHARED[0], "BISP", "enrolled")])
    fed.load("sindh", [("S0", SHARED[0], "SSPA", "eligible")])
    assert fed.reconcile("punjab", "sindh").state == COMPLETED
    fed.close()
    pool.close()
    store = fed.nodes["punjab"].config.store
    with sqlite3.connect(store) as db:
        (idx, entry) = db.execute("SELECT idx, entry FROM log_entries ORDER BY idx").fetchone()
        db.execute("UPDATE log_entries SET entry=? WHERE idx=?", (entry[:-1] + b" ", idx))
    url = pg_server.create_database("altered_punjab")
    try:
        assert main(["migrate", "--from", str(store), "--to", url]) == 2
        assert "checkpoint" in capsys.readouterr().err
        with psycopg.connect(url) as db:  # nothing was copied
            assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM log_entries").fetchone() == (0,)
        check_refusals(tmp_path, store, url, capsys)
    finally:
        pg_server.drop_database("altered_punjab")


def check_refusals(
    tmp_path: Path, store: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What is not a store of this version is refused, and left untouched."""
    assert main(["migrate", "--from", str(tmp_path / "none.sqlite"), "--to", url]) == 2
    assert "no store file" in capsys.readouterr().err
    for name, content in (("empty.sqlite", b""), ("text.sqlite", b"not a database" * 100)):
        path = tmp_path / name
        path.write_bytes(content)
        assert main(["migrate", "--from", str(path), "--to", url]) == 2
        assert "is not a node store" in capsys.readouterr().err
        assert path.read_bytes() == content
    old = tmp_path / "old.sqlite"
    old.write_bytes(store.read_bytes())
    with sqlite3.connect(old) as db:
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    assert main(["migrate", "--from", str(old), "--to", url]) == 2
    assert "start the node on it once with this version" in capsys.readouterr().err
