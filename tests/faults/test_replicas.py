"""A node run as two replicas over one PostgreSQL database, behind a TCP balancer:
SIGKILL of either replica during a reconciliation (this node initiating, or
answering) and during a load of online checks. Nothing is lost: the session of a
killed replica fails cleanly (swept by the survivor), its retry completes on the
survivor with exactly the true matches, every log verifies, the node's log holds
one entry per completed session and never forks; checks keep being answered
through the surviving replica. The suite's own PostgreSQL server (tests/pgserver.py)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ispf.errors import IspfError
from ispf.v1 import internal_pb2
from ispf.v1.internal_pb2 import ProvinceStatus
from ispf_client.forum import (
    init_forum,
    write_audit_profile,
    write_client_profile,
    write_policy,
)
from ispf_client.sdk import ClientProfile, NodeClient
from tests.faults.harness import (
    FAST_RETRY,
    NodeProcess,
    ReplicaProcess,
    Row,
    TcpProxy,
    check_matches_and_logs,
    fault_config,
    load_registries,
    reconcile_through,
    registries,
    session_entries,
)
from tests.pgserver import PgServer

PROVINCES = ["punjab", "sindh"]
N = 3000
COMPLETED = internal_pb2.SESSION_STATE_COMPLETED


@dataclass
class Replicated:
    root: Path
    url: str  # punjab's database
    replicas: list[ReplicaProcess]  # punjab's
    sindh: NodeProcess
    proxies: dict[str, TcpProxy]
    data: dict[str, list[Row]]

    def client(self, p: str) -> NodeClient:
        return NodeClient(ClientProfile.load(self.root / "forum" / "clients" / p / "profile.toml"))

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def running_replica(self, timeout: float = 30.0) -> ReplicaProcess:
        """The replica whose session is RUNNING in the store (by the pid it recorded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owners = self.query("SELECT owner FROM sessions WHERE state='RUNNING'")
            for (owner,) in owners:
                pid = int(str(owner).split("/")[1])
                for r in self.replicas:
                    if r.pid == pid:
                        return r
            time.sleep(0.02)
        raise AssertionError("no session ran")

    def restart_dead(self) -> None:
        for r in self.replicas:
            if r.pid is None:
                r.start()


@pytest.fixture(scope="module")
def replicated(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PgServer
) -> Iterator[Replicated]:
    root = tmp_path_factory.mktemp("replicas")
    url = pg_server.create_database("replicas_punjab")
    layout = init_forum(root / "forum", PROVINCES, base_port=0)
    proxies = {p: TcpProxy() for p in PROVINCES}
    for p in PROVINCES:
        cfg = layout.node_dir(p) / "node.toml"
        # (the replicated node, punjab: its store is the database)
        text = fault_config(
            cfg.read_text(),
            proxies,
            store_url=url if p == "punjab" else "",
            settings="session_idle_timeout = 20\nhealth_interval = 1",
        )
        cfg.write_text(text)
        write_client_profile(layout, p, proxies[p].address)
        write_policy(  # (checks as fast as the test asks, not a desk's pace)
            layout.node_dir(p) / "policy.toml",
            [q for q in PROVINCES if q != p],
            settings={"min_set_size": 1, "probes_per_minute": 10**6, "probes_per_day": 10**8},
        )
    write_audit_profile(layout, "auditor", {p: proxies[p].address for p in PROVINCES})
    punjab_cfg = layout.node_dir("punjab") / "node.toml"
    replicas = [
        ReplicaProcess(punjab_cfg, proxies["punjab"], root / f"punjab-{i}.log") for i in range(2)
    ]
    sindh = NodeProcess(layout.node_dir("sindh") / "node.toml", proxies["sindh"], root / "s.log")
    data = registries(PROVINCES, N, seed=11)
    c = Replicated(root, url, replicas, sindh, proxies, data)
    try:
        replicas[0].start()  # (the first start keys the store and makes its master key)
        replicas[1].start()
        sindh.start()
        load_registries(c.client, root, data)
        yield c
    finally:
        for r in replicas:
            r.stop()
        sindh.stop()
        for pr in proxies.values():
            pr.close()
        pg_server.drop_database("replicas_punjab")


def punjab_log_sessions(c: Replicated) -> list[str]:
    rows = c.query("SELECT idx, entry FROM log_entries ORDER BY idx")
    assert [int(str(r[0])) for r in rows] == list(range(len(rows)))  # no gap, no fork
    return session_entries([bytes(r[1]) for r in rows])


def check_outcome(c: Replicated, a: str, b: str, st: internal_pb2.SessionStatus, tmp: Path) -> None:
    check_matches_and_logs(c.client, c.root, c.data, a, b, st, tmp)
    ids = punjab_log_sessions(c)
    assert len(ids) == len(set(ids)), "a session has two entries in punjab's log"
    completed = {
        str(r[0]) for r in c.query("SELECT session_id FROM sessions WHERE state='COMPLETED'")
    }
    assert completed <= set(ids), "a completed session has no entry in punjab's log"


def wait_swept(c: Replicated, timeout: float = 30.0) -> None:
    """The killed replica's session fails on the survivor (nothing left RUNNING)."""
    deadline = time.monotonic() + timeout
    while c.query("SELECT 1 FROM sessions WHERE state='RUNNING'"):
        assert time.monotonic() < deadline, "a dead replica's session is still RUNNING"
        time.sleep(0.2)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("victim", ["running", "idle"])
@pytest.mark.parametrize("punjab_is", ["initiator", "responder"])
def test_a_replica_killed_mid_session_and_the_run_completes(
    replicated: Replicated, punjab_is: str, victim: str, seed: int, tmp_path: Path
) -> None:
    c = replicated
    c.restart_dead()
    a, b = ("punjab", "sindh") if punjab_is == "initiator" else ("sindh", "punjab")
    delay = random.Random(seed).uniform(0.05, 0.5)
    killed: list[ReplicaProcess] = []
    orphaned: list[object] = []

    def fault() -> None:
        running = c.running_replica()
        target = running if victim == "running" else next(r for r in c.replicas if r is not running)
        # (a slow link while the fault strikes, so the kill lands inside the session
        # however fast a run of N records has become; the retry runs at full speed)
        for pr in c.proxies.values():
            pr.delay = 0.15
        try:
            time.sleep(delay)
            pid = target.pid
            target.kill()
        finally:
            for pr in c.proxies.values():
                pr.delay = 0.0
        killed.append(target)
        # (what the dead replica had RUNNING stays so until the survivor fails it)
        orphaned.extend(
            r
            for r in c.query("SELECT owner FROM sessions WHERE state='RUNNING'")
            if str(r[0]).split("/")[1] == str(pid)
        )

    swept = "SELECT count(*) FROM sessions WHERE error = 'the replica running it stopped'"
    before = int(str(c.query(swept)[0][0]))
    st = reconcile_through(c.client, a, b, fault)
    check_outcome(c, a, b, st, tmp_path)
    wait_swept(c)
    after = int(str(c.query(swept)[0][0]))
    # The killed replica's session failed on the survivor (the idle one had none).
    assert after - before == len(orphaned) == (1 if victim == "running" else 0)
    states = dict((str(r[0]), str(r[1])) for r in c.query("SELECT session_id, state FROM sessions"))
    assert set(states.values()) <= {"COMPLETED", "FAILED"}
    c.restart_dead()


def test_online_checks_keep_answering_through_the_surviving_replica(
    replicated: Replicated,
) -> None:
    c = replicated
    c.restart_dead()
    with c.client("punjab") as client:
        assert client.reconcile("sindh", attempts=4, backoff=FAST_RETRY).state == COMPLETED
    shared = [nid for _, nid, _, _ in c.data["punjab"] if nid.startswith("35202")][:50]
    stop = threading.Event()
    answered: dict[str, list[float]] = {"punjab": [], "sindh": []}  # when each succeeded
    failed: dict[str, list[float]] = {"punjab": [], "sindh": []}
    wrong: list[str] = []

    def caller(asker: str, peer: str) -> None:
        rng = random.Random(asker)
        client = c.client(asker)
        while not stop.is_set():
            nid = rng.choice(shared)
            try:
                resp = client.check([nid], provinces=[peer])
            except IspfError:  # (the call in flight to a replica killed under it)
                failed[asker].append(time.monotonic())
                client.close()
                client = c.client(asker)
                time.sleep(0.05)
                continue
            status = resp.results[0].provinces[0].status
            if status == ProvinceStatus.PROVINCE_STATUS_MATCH:
                answered[asker].append(time.monotonic())
            elif status == ProvinceStatus.PROVINCE_STATUS_UNAVAILABLE:
                failed[asker].append(time.monotonic())
            else:
                wrong.append(ProvinceStatus.Name(status))
        client.close()

    # punjab's desks ask sindh (a punjab replica answers them); sindh's ask punjab
    # (a punjab replica answers as the peer).
    threads = [threading.Thread(target=caller, args=args) for args in [("punjab", "sindh")] * 2]
    threads += [threading.Thread(target=caller, args=args) for args in [("sindh", "punjab")] * 2]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        for victim in c.replicas:  # either replica, one after the other
            killed_at = time.monotonic()
            victim.kill()
            time.sleep(4.0)
            for asker in answered:
                after = [t for t in answered[asker] if t > killed_at + 2.0]
                assert len(after) >= 5, (
                    asker,
                    [round(t - killed_at, 2) for t in answered[asker] if t > killed_at - 0.5],
                    [round(t - killed_at, 2) for t in failed[asker][-20:]],
                )
            victim.start()
            time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not wrong, f"checks answered wrongly: {sorted(set(wrong))}"
    assert all(answered.values())
