"""Shared fixtures: a throw-away forum and in-process federations on 127.0.0.1:0."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest

from ispf.nodeconfig import load_config
from ispf.v1 import internal_pb2
from ispf_client.forum import ForumLayout, init_forum, write_policy
from ispf_client.sdk import ClientProfile, NodeClient
from ispf_server.node import Node, create_server
from ispf_server.pool import BlindingPool
from tests.pgserver import PgServer, find_bin


@dataclass
class Federation:
    layout: ForumLayout
    nodes: dict[str, Node] = field(default_factory=dict)
    servers: dict[str, grpc.Server] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    clients: dict[str, NodeClient] = field(default_factory=dict)

    def profile(self, province: str) -> ClientProfile:
        prof = ClientProfile.load(self.layout.client_dir(province) / "profile.toml")
        return replace(prof, address=f"127.0.0.1:{self.ports[province]}")

    def client(self, province: str) -> NodeClient:
        if province not in self.clients:
            self.clients[province] = NodeClient(self.profile(province))
        return self.clients[province]

    def load(self, province: str, rows: list[tuple[str, str, str, str]]) -> None:
        resp = self.client(province).upsert(
            internal_pb2.Record(record_id=r, nid=n, programme=p, status=s, position=i + 1)
            for i, (r, n, p, s) in enumerate(rows)
        )
        assert not resp.errors, list(resp.errors)

    def reconcile(self, a: str, b: str, **kw: object) -> internal_pb2.SessionStatus:
        st = self.client(a).start_reconciliation(b, **kw)  # type: ignore[arg-type]
        return self.client(a).wait(st.session_id, timeout=120)

    def stop(self, province: str) -> None:
        self.servers[province].stop(grace=None).wait()

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for s in self.servers.values():
            s.stop(grace=None).wait()
        for n in self.nodes.values():
            n.close()


def start_federation(
    root: Path,
    provinces: list[str],
    pool: BlindingPool,
    interceptors: tuple[object, ...] = (),
    reuse: ForumLayout | None = None,
    policy: dict[str, int] | None = None,
    **overrides: object,
) -> Federation:
    """`reuse`: an existing forum (its nodes start again on their files). `policy`:
    settings for every peer in every node's policy. Tests run tiny sets, so
    `min_set_size` is 1 unless told (the tests of that bound set it)."""
    fed = Federation(reuse or init_forum(root / "forum", provinces, base_port=0))
    for p in provinces:
        if reuse is not None and policy is None:
            break  # (a forum started again keeps its policies as they are)
        write_policy(
            fed.layout.node_dir(p) / "policy.toml",
            sorted(q for q in provinces if q != p),
            settings={"min_set_size": 1, **(policy or {})},
        )
    for p in provinces:
        cfg = load_config(fed.layout.node_dir(p) / "node.toml")
        cfg = replace(cfg, chunk_values=64, **overrides)  # type: ignore[arg-type]
        node = Node(cfg, pool=pool)
        server, port = create_server(node, "127.0.0.1:0", interceptors=interceptors)  # type: ignore[arg-type]
        server.start()
        fed.nodes[p], fed.servers[p], fed.ports[p] = node, server, port
    for p, node in fed.nodes.items():
        node.peer_addresses = {q: f"127.0.0.1:{fed.ports[q]}" for q in provinces if q != p}
    return fed


@pytest.fixture
def inline_pool() -> Iterator[BlindingPool]:
    pool = BlindingPool(0)
    yield pool
    pool.close()


@pytest.fixture
def federation(tmp_path: Path, inline_pool: BlindingPool) -> Iterator[Federation]:
    fed = start_federation(tmp_path, ["punjab", "sindh", "kp"], inline_pool)
    yield fed
    fed.close()


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every log record of the run at DEBUG, for leak checks."""
    caplog.set_level(logging.DEBUG)
    yield caplog


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """One real PostgreSQL server for the whole session (tests/pgserver.py): initdb in
    a temporary folder, a Unix socket only, stopped at the end. Skips where Debian's
    postgresql package is not installed."""
    if find_bin() is None:
        pytest.skip(
            "PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin"
            " or on PATH; `make postgres` installs Debian's postgresql package):"
            " the PostgreSQL-backend tests are skipped"
        )
    server = PgServer.start(tmp_path_factory.mktemp("pgserver"))
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, uniquely named database on the session's server; its libpq URL.
    Dropped after the test (with whatever connections are left on it)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield pg_server.create_database(name)
    pg_server.drop_database(name)
