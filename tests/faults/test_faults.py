"""Nodes killed mid-session, connections dropped and delayed, nodes restarted between runs:
each run ends with exactly the true matches on both sides and logs that verify."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ispf.v1 import internal_pb2
from ispf_client.forum import init_forum, write_audit_profile, write_client_profile
from ispf_client.loader import load_csv
from ispf_client.sdk import ClientProfile, NodeClient
from tests.conftest import backend_store_urls
from tests.faults.harness import (
    FAST_RETRY,
    NodeProcess,
    Row,
    TcpProxy,
    check_matches_and_logs,
    fault_config,
    load_registries,
    registries,
    session_entries,
)
from tests.faults.harness import reconcile_through as harness_reconcile

PROVINCES = ["punjab", "sindh", "kp"]
N = 6000
COMPLETED = internal_pb2.SESSION_STATE_COMPLETED


@dataclass
class Cluster:
    root: Path
    nodes: dict[str, NodeProcess]
    proxies: dict[str, TcpProxy]
    data: dict[str, list[Row]]
    urls: dict[str, str]  # each node's PostgreSQL database (none: its SQLite file)

    def query(self, p: str, sql: str) -> list[tuple[Any, ...]]:
        """A read of a node's store, straight from its database (either backend)."""
        if self.urls:
            with psycopg.connect(self.urls[p]) as pg:
                return pg.execute(sql).fetchall()
        db = sqlite3.connect(self.root / "forum" / "nodes" / p / "node.sqlite")
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def client(self, p: str) -> NodeClient:
        return NodeClient(ClientProfile.load(self.root / "forum" / "clients" / p / "profile.toml"))


# The store backends these tests run on (tests/conftest.py, `backend_store_urls`).
STORE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="module", params=STORE_BACKENDS)
def cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    urls = backend_store_urls(request, PROVINCES)
    root = tmp_path_factory.mktemp("faults")
    layout = init_forum(root / "forum", PROVINCES, base_port=0)
    proxies = {p: TcpProxy() for p in PROVINCES}
    for p in PROVINCES:
        cfg = layout.node_dir(p) / "node.toml"
        cfg.write_text(fault_config(cfg.read_text(), proxies, store_url=urls.get(p, "")))
        write_client_profile(layout, p, proxies[p].address)
    write_audit_profile(layout, "auditor", {p: proxies[p].address for p in PROVINCES})
    nodes = {
        p: NodeProcess(layout.node_dir(p) / "node.toml", proxies[p], root / f"{p}.log")
        for p in PROVINCES
    }
    data = registries(PROVINCES, N, seed=5)
    c = Cluster(root, nodes, proxies, data, urls)
    try:
        for p in PROVINCES:
            nodes[p].start()
        load_registries(c.client, root, data)
        yield c
    finally:
        for n in nodes.values():
            n.stop()
        for pr in proxies.values():
            pr.close()


def reconcile_through(
    c: Cluster, a: str, b: str, fault: Callable[[], object], **kw: object
) -> internal_pb2.SessionStatus:
    return harness_reconcile(c.client, a, b, fault, **kw)


def check_outcome(
    c: Cluster, a: str, b: str, st: internal_pb2.SessionStatus, tmp_path: Path
) -> None:
    check_matches_and_logs(c.client, c.root, c.data, a, b, st, tmp_path)
    for p in (a, b):  # exactly one entry per session in each log
        ids = session_entries([bytes(r[0]) for r in c.query(p, "SELECT entry FROM log_entries")])
        assert len(ids) == len(set(ids))


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("victim", ["initiator", "responder"])
def test_a_node_killed_mid_session_restarts_and_the_run_completes(
    cluster: Cluster, victim: str, seed: int, tmp_path: Path
) -> None:
    a, b = "punjab", "sindh"
    node = cluster.nodes[a if victim == "initiator" else b]
    delay = random.Random(seed).uniform(0.05, 1.2)

    def fault() -> None:
        time.sleep(delay)
        node.kill()
        node.start()

    st = reconcile_through(cluster, a, b, fault)
    check_outcome(cluster, a, b, st, tmp_path)


@pytest.mark.parametrize("seed", [1, 2])
def test_connections_dropped_mid_session(cluster: Cluster, seed: int, tmp_path: Path) -> None:
    proxy = cluster.proxies["kp"]
    rng = random.Random(seed)

    def fault() -> None:
        for _ in range(3):  # the WAN link drops a few times
            time.sleep(rng.uniform(0.1, 0.6))
            proxy.cut_all()

    st = reconcile_through(cluster, "sindh", "kp", fault)
    check_outcome(cluster, "sindh", "kp", st, tmp_path)


def test_a_slow_link_only_slows_the_run(cluster: Cluster, tmp_path: Path) -> None:
    proxy = cluster.proxies["punjab"]
    proxy.delay = 0.01
    try:
        st = reconcile_through(cluster, "kp", "punjab", lambda: None)
    finally:
        proxy.delay = 0.0
    check_outcome(cluster, "kp", "punjab", st, tmp_path)


def test_a_node_restarted_between_runs_keeps_its_state(cluster: Cluster, tmp_path: Path) -> None:
    with cluster.client("punjab") as client:
        first = client.reconcile("sindh")
    cluster.nodes["sindh"].kill()
    cluster.nodes["sindh"].start()
    with cluster.client("punjab") as client:
        again = client.reconcile("sindh", attempts=4, backoff=FAST_RETRY)
    assert again.sync == "incremental" and again.own_values == again.peer_values == 0
    assert again.match_count == first.match_count
    check_outcome(cluster, "punjab", "sindh", again, tmp_path)


@pytest.mark.parametrize("seed", [1, 2])
def test_killing_a_node_during_a_load_never_leaves_a_mixed_batch(
    cluster: Cluster, seed: int
) -> None:
    node = cluster.nodes["kp"]
    rows = cluster.data["kp"][:4000] + [
        (f"kp-extra-{i}", f"17301{i:08d}", "BISP", "enrolled") for i in range(16000)
    ]
    marker = f"v{seed}"
    csv = cluster.root / f"kp-{marker}.csv"
    csv.write_text(
        "record_id,cnic,programme,status\n"
        + "".join(f"{r},{n},{p},{marker}\n" for r, n, p, _ in rows)
    )
    done = threading.Event()

    def load() -> None:
        try:
            with cluster.client("kp") as client:
                load_csv(client, csv)
        except Exception:  # the node dies under it: expected
            pass
        done.set()

    threading.Thread(target=load, daemon=True).start()
    time.sleep(random.Random(seed).uniform(0.3, 1.0))
    node.kill()
    done.wait(30)
    node.start()
    status = dict(cluster.query("kp", "SELECT record_id, status FROM records"))
    # Batches of 5,000 rows: each is wholly the new version or wholly the old one.
    for k in range(0, len(rows), 5000):
        got = {status.get(r[0]) == marker for r in rows[k : k + 5000]}
        assert len(got) == 1, f"batch starting at row {k} is half-applied"
    # Restore kp's registry for the other tests.
    fixed = cluster.root / "kp-restore.csv"
    fixed.write_text(
        "record_id,cnic,programme,status\n"
        + "".join(",".join(r) + "\n" for r in cluster.data["kp"])
    )
    with cluster.client("kp") as client:
        load_csv(client, fixed)
        extra = [f"kp-extra-{i}" for i in range(16000)]
        client.delete(extra[:8000])
        client.delete(extra[8000:])


def test_blinding_workers_leave_with_a_killed_node(cluster: Cluster) -> None:
    import psutil

    node = cluster.nodes["punjab"]
    assert node.proc is not None
    # The portable backend blinds in worker processes (the fast one in threads).
    original = node.config.read_text()
    node.config.write_text(
        original.replace("chunk_values = 4096", 'chunk_values = 4096\nbackend = "cryptography"')
    )
    try:
        node.stop()
        node.start()
        # Workers start with the first blinding; a reconciliation makes sure there are some.
        reconcile_through(cluster, "punjab", "sindh", lambda: None)
        workers = psutil.Process(node.proc.pid).children()
        assert workers, "the node has no worker processes to check"
        node.kill()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"{len(alive)} worker(s) outlived their node"
    finally:
        node.config.write_text(original)
        node.stop()
        node.start()
