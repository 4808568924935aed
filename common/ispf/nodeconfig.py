"""Node configuration: one explicit dataclass, built once from a TOML file.

Read by the node (`ispf-node`) and by the onboarding tools that prepare its
folder (`ispf node import-salt`), so it lives in the common package.

Paths in the file are relative to the file's folder. Secrets (TLS key, salts)
are read from the files named here, never from the command line or the
environment. Example (``ispf forum init`` writes one per node)::

    province = "punjab"
    listen = "127.0.0.1:50051"
    store = "punjab.sqlite"
    policy = "policy.toml"        # who may match what (ispf_server.policy), hot-reloaded

    [tls]
    ca = "../../ca.pem"
    cert = "node.pem"
    key = "node.key"
    revoked = "../../revoked.txt"  # the forum's deny list of certificate serials

    [salts]
    dir = "../../salts"          # holds epoch-<N>.salt
    current_epoch = 1

    [log]
    key = "log.key"              # this node's checkpoint signing key (0600)
    keys = "../../logkeys"       # <province>.vkey of every node, to witness peers

    [keys]
    master = "master.key"        # pair keys derive from it (0600; made by `ispf node init`)
    seal = "seal.key"            # X25519: sealed salts are opened with it (`ispf node init`)

    [roster]
    file = "roster.json"         # the forum's signed roster: peers' addresses and log keys

    [blinding]
    workers = 0                  # 0: one per core (threads or processes, see pool.py)
    chunk_values = 4096
    backend = "auto"             # auto | ifma | cryptography

    [metrics]
    listen = "127.0.0.1:9464"    # Prometheus /metrics; omit to serve none

    [peers.sindh]
    address = "127.0.0.1:50052"

A node run as replicas over PostgreSQL names the database in place of the file
(``store = ...`` then goes; see docs/operations.md, "Replicas")::

    [store]
    url = "postgresql:///ispf_punjab?host=/run/postgresql"  # no password here: PGPASSFILE
    local = "."                  # this replica's folder for spooled tags
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ispf.errors import ConfigError
from ispf.identity import PROVINCE_RE
from ispf.nid import DEFAULT_PROVINCE_DIGITS


@dataclass(frozen=True)
class PeerConfig:
    name: str
    address: str


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path
    # The forum's deny list of certificate serials (optional), re-read when it changes.
    revoked: Path | None = None


@dataclass(frozen=True)
class NodeConfig:
    province: str
    listen: str
    store: Path
    tls: TlsConfig
    salt_dir: Path
    current_epoch: int
    log_key: Path
    # <province>.vkey files; None where the roster gives the log keys.
    log_keys_dir: Path | None
    peers: dict[str, PeerConfig] = field(default_factory=dict)
    policy_file: Path = Path("policy.toml")
    workers: int = 0
    chunk_values: int = 4096
    # X25519 implementation: "auto" (the native module's IFMA ladder where it runs
    # and passes its self-check, else cryptography), or "ifma" or "cryptography" by
    # name (required; see ispf.hazmat.backends).
    backend: str = "auto"
    province_digits: frozenset[str] = DEFAULT_PROVINCE_DIGITS
    # Seconds a peer session may stay idle before the responder forgets it.
    session_idle_timeout: float = 600.0
    # Deadline for a whole session's streaming calls, and for unary calls.
    session_deadline: float = 3600.0
    call_deadline: float = 30.0
    max_message_bytes: int = 16 * 1024 * 1024
    # host:port for the Prometheus /metrics endpoint; empty: not served.
    metrics_listen: str = ""
    # Seconds between readiness checks behind gRPC health.
    health_interval: float = 5.0
    # The node's master key file (pair keys derive from it) and sealing key (sealed salts).
    master_key: Path | None = None
    seal_key: Path | None = None
    # The forum's signed roster (peers' addresses, log verifier keys); None: [peers], [log].
    roster: Path | None = None
    # [store] url: a postgresql:// URL (the store is that database, shared by the
    # node's replicas; `store` then only names this replica's folder for local files).
    store_url: str = ""

    def blinding_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)


def _req(table: dict[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: missing required setting '{key}'")
    return table[key]


def _no_log_keys(roster: dict[str, Any], where: str) -> Path | None:
    if "file" not in roster:
        raise ConfigError(f"{where} [log]: missing required setting 'keys' (or a [roster] file)")
    return None


def _store(value: Any, p: Callable[[str], Path], where: str) -> tuple[Path, str]:
    """`store = "node.sqlite"` (the embedded store), or a [store] table with `url`, a
    postgresql:// URL, and `local`, this replica's folder for spools (default: the
    config file's folder)."""
    if isinstance(value, str):
        return p(value), ""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'store' must be a file name or a [store] table")
    url = str(_req(value, "url", f"{where} [store]"))
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"{where} [store]: url must be a postgresql:// URL (the embedded SQLite store "
            'is given as store = "node.sqlite")'
        )
    unknown = set(value) - {"url", "local"}
    if unknown:
        raise ConfigError(f"{where} [store]: unknown settings {', '.join(sorted(unknown))}")
    return p(str(value.get("local", "."))) / "postgresql", url


def load_config(path: Path) -> NodeConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        hint = (
            " (is `store` given twice? a [store] table replaces the `store = ...` line)"
            if "overwrite a value" in str(exc)
            else ""
        )
        raise ConfigError(f"config file {path} is not valid TOML: {exc}{hint}") from exc
    base = path.parent
    where = str(path)

    def p(v: str) -> Path:
        return (base / v).resolve()

    store, store_url = _store(_req(data, "store", where), p, where)
    province = str(_req(data, "province", where))
    if not PROVINCE_RE.match(province):
        raise ConfigError(f"{where}: province '{province}' must be a lowercase slug")
    tls = _req(data, "tls", where)
    salts = _req(data, "salts", where)
    logcfg = _req(data, "log", where)
    blinding = data.get("blinding", {})
    keys = data.get("keys", {})
    roster = data.get("roster", {})
    peers = {
        name: PeerConfig(name=name, address=str(_req(v, "address", f"{where} [peers.{name}]")))
        for name, v in data.get("peers", {}).items()
    }
    return NodeConfig(
        province=province,
        listen=str(data.get("listen", "127.0.0.1:50051")),
        store=store,
        store_url=store_url,
        tls=TlsConfig(
            ca=p(_req(tls, "ca", f"{where} [tls]")),
            cert=p(_req(tls, "cert", f"{where} [tls]")),
            key=p(_req(tls, "key", f"{where} [tls]")),
            revoked=p(tls["revoked"]) if "revoked" in tls else None,
        ),
        salt_dir=p(str(_req(salts, "dir", f"{where} [salts]"))),
        current_epoch=int(_req(salts, "current_epoch", f"{where} [salts]")),
        log_key=p(str(_req(logcfg, "key", f"{where} [log]"))),
        log_keys_dir=p(str(logcfg["keys"])) if "keys" in logcfg else _no_log_keys(roster, where),
        peers=peers,
        policy_file=p(str(_req(data, "policy", where))),
        workers=int(blinding.get("workers", 0)),
        chunk_values=int(blinding.get("chunk_values", 4096)),
        backend=str(blinding.get("backend", "auto")),
        province_digits=frozenset(str(d) for d in data.get("province_digits", "1234567")),
        session_idle_timeout=float(data.get("session_idle_timeout", 600.0)),
        session_deadline=float(data.get("session_deadline", 3600.0)),
        call_deadline=float(data.get("call_deadline", 30.0)),
        health_interval=float(data.get("health_interval", 5.0)),
        metrics_listen=str(data.get("metrics", {}).get("listen", "")),
        master_key=p(str(keys.get("master", "master.key"))),
        seal_key=p(str(keys["seal"])) if "seal" in keys else None,
        roster=p(str(roster["file"])) if "file" in roster else None,
    )
