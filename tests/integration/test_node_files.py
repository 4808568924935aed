"""A node's files are private whatever the umask; the store holds no blinding scalar;
backups are sealed and restore exactly; pair keys are renewed by policy."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ispf.errors import KeyFileError
from ispf.nodeconfig import load_config
from ispf.v1 import internal_pb2
from ispf_client.cli import main as cli_main
from ispf_client.forum import init_forum
from ispf_server.__main__ import main as node_main
from ispf_server.node import Node
from ispf_server.pool import BlindingPool
from ispf_server.storage.pairs.schema import STATE_TABLES
from tests.conftest import Federation, start_federation

COMPLETED = internal_pb2.SESSION_STATE_COMPLETED
ROWS = {
    "punjab": [("P1", "3520212345671"), ("P2", "3520212345672"), ("P3", "3520212345673")],
    "sindh": [("S1", "3520212345671"), ("S2", "3520212345672"), ("S9", "4210112345679")],
}


def _load(fed: Federation) -> None:
    for p, rows in ROWS.items():
        fed.load(p, [(r, n, "BISP", "enrolled") for r, n in rows])


def _modes(root: Path) -> dict[str, int]:
    return {str(f): stat.S_IMODE(f.stat().st_mode) for f in [root, *root.rglob("*")]}


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_under_umask_022_every_file_the_node_and_export_create_is_0600(
    tmp_path: Path, inline_pool: BlindingPool, umask_022: None
) -> None:
    layout = init_forum(tmp_path / "forum", ["punjab", "sindh"], base_port=0)
    # The store lives in a folder of its own that the node creates.
    for p in ("punjab", "sindh"):
        cfg = layout.node_dir(p) / "node.toml"
        cfg.write_text(cfg.read_text().replace('store = "node.sqlite"', 'store = "data/n.sqlite"'))
    before = {p: _modes(layout.node_dir(p)) for p in ("punjab", "sindh")}
    fed = start_federation(tmp_path, ["punjab", "sindh"], inline_pool, reuse=layout)
    try:
        _load(fed)
        assert fed.reconcile("punjab", "sindh").state == COMPLETED
        assert fed.reconcile("punjab", "sindh").sync == "incremental"
        prof = tmp_path / "prof.toml"
        p = fed.profile("punjab")
        prof.write_text(
            f'province = "punjab"\naddress = "{p.address}"\n[tls]\n'
            f'ca = "{p.ca}"\ncert = "{p.cert}"\nkey = "{p.key}"\n'
        )
        out = tmp_path / "reports" / "march"
        assert cli_main(["results", "export", "--profile", str(prof), "--out", str(out)]) == 0
        bad = tmp_path / "bad.csv"
        bad.write_text("record_id,cnic,programme,status\nX1,12,BISP,enrolled\n")
        errors = tmp_path / "reports" / "rejected.csv"
        load = ["registry", "load", str(bad), "--profile", str(prof), "--errors", str(errors)]
        assert cli_main(load) in (0, 1) and errors.exists()
        created = {}
        for p in ("punjab", "sindh"):
            after = _modes(layout.node_dir(p))
            created |= {f: m for f, m in after.items() if f not in before[p]}
        assert any(f.endswith("n.sqlite-wal") for f in created)
        assert any(f.endswith("master.key") for f in created)
        assert sorted(Path(f).name for f in _modes(out) if Path(f).is_file()) == [
            "punjab-matches.csv",
            "punjab-report.html",
            "punjab-summary.json",
        ]
        created |= _modes(tmp_path / "reports")
        wrong = {
            f: oct(m) for f, m in created.items() if m != (0o700 if Path(f).is_dir() else 0o600)
        }
        assert not wrong
    finally:
        fed.close()


@pytest.mark.parametrize("which", ["store", "store-wal", "master.key", "node.key", "log.key"])
def test_node_refuses_to_start_on_a_file_others_can_read(
    tmp_path: Path, inline_pool: BlindingPool, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = init_forum(tmp_path / "forum", ["punjab", "sindh"], base_port=0)
    cfg_path = layout.node_dir("punjab") / "node.toml"
    cfg = load_config(cfg_path)
    Node(cfg, pool=inline_pool).close()  # the first start makes the store and master key
    target = {
        "store": cfg.store,
        "store-wal": cfg.store.with_name(cfg.store.name + "-wal"),
        "master.key": layout.node_dir("punjab") / "master.key",
    }.get(which, layout.node_dir("punjab") / which)
    if not target.exists():
        target.touch(mode=0o600)
    target.chmod(0o644)
    with pytest.raises(KeyFileError) as err:
        Node(cfg, pool=inline_pool)
    assert str(target) in err.value.message and f"chmod 600 {target}" in err.value.message
    assert node_main(["--config", str(cfg_path)]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ispf-node:")]
    assert len(lines) == 1 and f"chmod 600 {target}" in lines[0]


def test_store_searched_byte_by_byte_holds_no_blinding_scalar(
    tmp_path: Path, inline_pool: BlindingPool
) -> None:
    fed = start_federation(tmp_path, ["punjab", "sindh"], inline_pool)
    try:
        _load(fed)
        assert fed.reconcile("punjab", "sindh").state == COMPLETED
        assert fed.client("sindh").check(["3520212345671"])  # probes use the pair key too
        secrets = []
        for p, node in fed.nodes.items():
            peer = "sindh" if p == "punjab" else "punjab"
            secrets.append(node.store.pairs.key(peer, 1).unsafe_raw())
            secrets.append(node.store.pairs._master._raw)
            assert node.store.pairs.rekey_count(peer, 1) == 0  # what the store keeps instead
        for node in fed.nodes.values():
            node.store.db.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            for suffix in ("", "-wal"):
                f = node.config.store.with_name(node.config.store.name + suffix)
                blob = f.read_bytes() if f.exists() else b""
                for s in secrets:
                    assert s not in blob and s.hex().encode() not in blob
    finally:
        fed.close()


def _dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    db = sqlite3.connect(path)
    try:
        tables = ["records", "log_entries", "checkpoints", "sessions", "matches", "meta"]
        return {t: sorted(db.execute(f"SELECT * FROM {t}")) for t in [*tables, *STATE_TABLES]}
    finally:
        db.close()


def _backup_keys(tmp_path: Path) -> tuple[Path, Path]:
    key = X25519PrivateKey.generate()
    priv, pub = tmp_path / "backup.key", tmp_path / "backup.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    priv.chmod(0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


def test_backup_then_restore_gives_identical_registry_log_and_pair_state(
    tmp_path: Path, inline_pool: BlindingPool, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = start_federation(tmp_path, ["punjab", "sindh"], inline_pool)
    priv, pub = _backup_keys(tmp_path)
    cfg_path = fed.layout.node_dir("punjab") / "node.toml"
    out = tmp_path / "bk" / "punjab.backup"
    try:
        _load(fed)
        assert fed.reconcile("punjab", "sindh").state == COMPLETED
        # Online: the node is running while its store is copied.
        rc = node_main(["backup", "--config", str(cfg_path), "--to", str(out), "--key", str(pub)])
        assert rc == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert b"3520212345671" not in out.read_bytes() and b"BISP" not in out.read_bytes()
        fed.nodes["punjab"].store.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        original = _dump(fed.nodes["punjab"].config.store)
    finally:
        fed.close()
    assert original["records"] and original["log_entries"] and original["pair_sync"]
    restored_cfg = cfg_path.with_name("restored.toml")
    restored_cfg.write_text(cfg_path.read_text().replace("node.sqlite", "restored/n.sqlite"))
    args = ["restore", "--config", str(restored_cfg), "--from", str(out), "--key", str(priv)]
    assert node_main(args) == 0
    store = fed.layout.node_dir("punjab") / "restored" / "n.sqlite"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert _dump(store) == original
    # A second restore over a store is refused; so is a backup under another key.
    assert node_main(args) == 2
    assert "move the current store aside" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    other, _ = _backup_keys(tmp_path / "other")
    store.unlink()
    for extra in ("-wal", "-shm"):
        store.with_name(store.name + extra).unlink(missing_ok=True)
    bad = ["restore", "--config", str(restored_cfg), "--from", str(out), "--key", str(other)]
    assert node_main(bad) == 2
    assert "does not open under this backup key" in capsys.readouterr().err
    assert not store.exists()


def test_rekey_after_days_renews_the_pair_key_and_forces_a_full_run(
    tmp_path: Path, inline_pool: BlindingPool
) -> None:
    fed = start_federation(tmp_path, ["punjab", "sindh"], inline_pool)
    try:
        pol = fed.layout.node_dir("punjab") / "policy.toml"
        text = pol.read_text().replace(
            "count_only = false", "count_only = false\nrekey_after_days = 30"
        )
        pol.write_text(text.replace("version = 1", "version = 2"))
        _load(fed)
        first = fed.reconcile("punjab", "sindh")
        assert first.state == COMPLETED and first.sync == "full" and first.match_count == 2
        assert fed.reconcile("punjab", "sindh").sync == "incremental"  # key not yet due
        store = fed.nodes["punjab"].store
        tags_before = {t for _, t, _ in store.pairs.matched_state("sindh", 1)}
        key_before = store.pairs.key("sindh", 1)
        assert store.pairs.rekey_count("sindh", 1) == 0
        old = (datetime.now(UTC) - timedelta(days=31)).isoformat()
        store.db.conn.execute("UPDATE pair_keys SET created_at=? WHERE peer='sindh'", (old,))
        # Due: whichever side starts, the next run is full under a fresh key.
        again = fed.reconcile("sindh", "punjab")
        assert again.state == COMPLETED and again.sync == "full" and again.match_count == 2
        assert store.pairs.rekey_count("sindh", 1) == 1
        assert store.pairs.key("sindh", 1) != key_before
        tags_after = {t for _, t, _ in store.pairs.matched_state("sindh", 1)}
        assert tags_after and not tags_after & tags_before  # the peer cannot link them
        assert fed.reconcile("punjab", "sindh").sync == "incremental"
        assert store.pairs.rekey_count("sindh", 1) == 1
    finally:
        fed.close()


def test_ispf_node_help_lists_its_other_commands_and_exit_codes() -> None:
    import subprocess
    import sys

    node = Path(sys.executable).with_name("ispf-node")
    out = subprocess.run([str(node), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("backup", "restore", "new-master-key"):
        assert f"ispf-node {command} --config" in out
    assert "exit codes:" in out
