"""Shared fixtures: a throw-away forum and in-process federations on 127.0.0.1:0."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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

    def restart(self, province: str, pool: BlindingPool) -> None:
        """Stop a node and start it again on the same files (its store, its keys)."""
        self.stop(province)
        old = self.nodes[province]
        peers = old.peer_addresses
        old.close()
        node = Node(old.config, pool=pool)
        server, port = create_server(node, "127.0.0.1:0")
        server.start()
        node.peer_addresses = peers
        self.nodes[province], self.servers[province], self.ports[province] = node, server, port
        for p, n in self.nodes.items():
            if p != province:
                n.peer_addresses[province] = f"127.0.0.1:{port}"
        client = self.clients.pop(province, None)
        if client is not None:
            client.close()

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for s in self.servers.values():
            s.stop(grace=None).wait()
        for n in self.nodes.values():
            n.close()


# The PostgreSQL databases of the federations started over that backend, by forum
# folder: a forum started again (`reuse`) keeps its nodes' databases.
_STORE_URLS: dict[Path, dict[str, str]] = {}


def start_federation(
    root: Path,
    provinces: list[str],
    pool: BlindingPool,
    interceptors: tuple[object, ...] = (),
    reuse: ForumLayout | None = None,
    policy: dict[str, int] | None = None,
    store_urls: dict[str, str] | None = None,
    **overrides: object,
) -> Federation:
    """`reuse`: an existing forum (its nodes start again on their files, or on their
    databases). `policy`: settings for every peer in every node's policy. Tests run
    tiny sets, so `min_set_size` is 1 unless told (the tests of that bound set it).
    `store_urls`: a PostgreSQL database for each province's store (`store_urls`
    fixture); none: each node's SQLite file."""
    fed = Federation(reuse or init_forum(root / "forum", provinces, base_port=0))
    if store_urls:
        _STORE_URLS[fed.layout.root] = dict(store_urls)
    urls = store_urls or _STORE_URLS.get(fed.layout.root, {})
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
        if p in urls:
            cfg = replace(cfg, store_url=urls[p], store=cfg.store.parent / "postgresql")
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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests that use the `store_backend` fixture (through `federation` or `store_urls`)
    run once per store backend their module names in `STORE_BACKENDS` (default:
    SQLite only)."""
    if "store_backend" in metafunc.fixturenames:
        backends = getattr(metafunc.module, "STORE_BACKENDS", ("sqlite",))
        metafunc.parametrize("store_backend", backends, indirect=True)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    """The store backend of this test's nodes: "sqlite" or "postgresql"."""
    return str(getattr(request, "param", "sqlite"))


StoreUrls = Callable[[list[str]], dict[str, str]]


@pytest.fixture
def store_urls(store_backend: str, request: pytest.FixtureRequest) -> Iterator[StoreUrls]:
    """A function giving each province a fresh PostgreSQL database (on the session's
    server), or nothing where the backend is SQLite; the databases are dropped after."""
    if store_backend == "sqlite":
        yield lambda provinces: {}
        return
    server: PgServer = request.getfixturevalue("pg_server")  # (skips where none)
    made: list[str] = []

    def make(provinces: list[str]) -> dict[str, str]:
        urls = {}
        for p in provinces:
            name = f"t_{uuid.uuid4().hex[:12]}_{p}"
            urls[p] = server.create_database(name)
            made.append(name)
        return urls

    yield make
    for name in made:
        server.drop_database(name)


def backend_store_urls(request: pytest.FixtureRequest, provinces: list[str]) -> dict[str, str]:
    """For a fixture parametrised over backends (``params=STORE_BACKENDS``, any scope): a
    fresh PostgreSQL database per province where its param is "postgresql" (dropped
    when the fixture ends), else nothing (SQLite files)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return {}
    server: PgServer = request.getfixturevalue("pg_server")
    urls = {}
    for p in provinces:
        name = f"t_{uuid.uuid4().hex[:12]}_{p}"
        urls[p] = server.create_database(name)
        request.addfinalizer(lambda n=name: server.drop_database(n))  # type: ignore[misc]
    return urls


class RawStore:
    """A raw connection to a node's store, either backend, taking SQLite-style ``?``
    statements: for tests that tamper with what the node wrote."""

    def __init__(self, node: Node) -> None:
        cfg = node.config
        if cfg.store_url:
            import psycopg

            from ispf_server.storage.postgres import PgConnection

            self._pg = PgConnection(psycopg.connect(cfg.store_url, autocommit=True))
            self._sqlite = None
        else:
            import sqlite3

            self._sqlite = sqlite3.connect(cfg.store, isolation_level=None)

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        if self._sqlite is not None:
            return self._sqlite.execute(sql, params)
        return self._pg.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        if self._sqlite is not None:
            self._sqlite.executemany(sql, rows)
        else:
            self._pg.cursor().executemany(sql, rows)

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        else:
            self._pg.raw.close()


@pytest.fixture
def federation(
    tmp_path: Path, inline_pool: BlindingPool, store_urls: StoreUrls
) -> Iterator[Federation]:
    provinces = ["punjab", "sindh", "kp"]
    fed = start_federation(tmp_path, provinces, inline_pool, store_urls=store_urls(provinces))
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
