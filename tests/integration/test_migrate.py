"""`ispf-node migrate`: a node's SQLite store moved into PostgreSQL serves on as it
did (the same registry, sessions, matches and audit log, which an auditor verifies;
the pair state too, so the next run is incremental); an altered log, or a target
that already holds data, is refused with nothing copied."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from ispf.errors import ConfigError
from ispf.nodeconfig import load_config
from ispf.v1 import internal_pb2
from ispf_client.auditor import AuditProfile, verify
from ispf_client.forum import init_forum, write_audit_profile
from ispf_server.__main__ import main
from ispf_server.pool import BlindingPool
from ispf_server.storage import Store
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


def node_on(tmp_path: Path, url: str) -> Path:
    """A forum node whose node.toml names `url` as its store, as the docs say to."""
    layout = init_forum(tmp_path / "forum", ["punjab", "sindh"], base_port=0)
    cfg = layout.node_dir("punjab") / "node.toml"
    text = cfg.read_text().replace('store = "node.sqlite"\n', "")
    cfg.write_text(text + f'\n[store]\nurl = "{url}"\nlocal = "."\n')
    return cfg


def test_store_settings_are_read_and_checked(tmp_path: Path) -> None:
    cfg = node_on(tmp_path, "postgresql:///ispf_punjab?host=/run/postgresql")
    config = load_config(cfg)
    assert config.store_url == "postgresql:///ispf_punjab?host=/run/postgresql"
    assert config.store.parent == cfg.parent  # (this replica's local folder)
    text = cfg.read_text()
    for bad, said in (
        (text.replace('url = "postgresql', 'url = "sqlite'), "must be a postgresql:// URL"),
        (text.replace('local = "."', "pool = 3"), "unknown settings pool"),
        ('store = "node.sqlite"\n' + text, "is `store` given twice?"),
    ):
        cfg.write_text(bad)
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(cfg)


def test_new_master_key_is_refused_while_another_replica_runs(
    tmp_path: Path, pg_server: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg_server.create_database("rekey_punjab")
    cfg = node_on(tmp_path, url)
    config = load_config(cfg)
    try:
        other = Store(config.store, config.master_key, url=url)  # a running replica
        assert config.master_key is not None
        key = config.master_key.read_bytes()
        try:
            assert main(["new-master-key", "--config", str(cfg)]) == 2
            assert "stop every replica first" in capsys.readouterr().err
            assert config.master_key.read_bytes() == key
        finally:
            other.close()
        assert main(["new-master-key", "--config", str(cfg)]) == 0  # none left: done
        assert config.master_key.read_bytes() != key
    finally:
        pg_server.drop_database("rekey_punjab")
