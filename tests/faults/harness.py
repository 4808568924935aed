"""Fault harness: node processes that can be SIGKILLed and restarted, behind TCP proxies.

Every node is reached (by its peers and by its own clients) through a proxy whose
address never changes; a restarted node binds a new port and the proxy follows.
The proxy can delay traffic or drop every connection, as a flaky WAN would.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ispf.auditlog import decode_entry
from ispf.retry import Backoff
from ispf.v1 import internal_pb2
from ispf_client.auditor import AuditProfile, pair, verify
from ispf_client.loader import load_csv
from ispf_client.sdk import NodeClient


class TcpProxy:
    """One address in front of a node; with `replicas`, a TCP load balancer in front of
    several (each new connection to the next that accepts it, round robin: a gRPC
    channel is one connection, so a peer's session stays on one replica)."""

    def __init__(self) -> None:
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.port = self._listen.getsockname()[1]
        self.target: int | None = None
        self.replicas: list[int] = []
        self._next = 0
        self.delay = 0.0
        self.drop_after: int | None = None  # bytes per connection before it is cut
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            upstream = self._connect()
            if upstream is None:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            budget = [self.drop_after]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, budget), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        with self._lock:
            targets = list(self.replicas) or ([self.target] if self.target is not None else [])
            start, self._next = self._next, self._next + 1
        for i in range(len(targets)):
            try:
                return socket.create_connection(
                    ("127.0.0.1", targets[(start + i) % len(targets)]), timeout=5
                )
            except OSError:
                continue
        return None

    def _pump(self, src: socket.socket, dst: socket.socket, budget: list[int | None]) -> None:
        try:
            while data := src.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                if budget[0] is not None:
                    budget[0] -= len(data)
                    if budget[0] < 0:
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()

    def cut_all(self) -> None:
        """Drop every open connection, as a network outage would."""
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._close(s)

    def close(self) -> None:
        self._stop.set()
        self._listen.close()
        self.cut_all()


class NodeProcess:
    """`ispf-node` in its own process; `kill()` is SIGKILL, `start()` brings it back."""

    def __init__(self, config: Path, proxy: TcpProxy, log: Path) -> None:
        self.config = config
        self.proxy = proxy
        self.log = log
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        seen = self._ports()
        logf = self.log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ispf_server", "--config", str(self.config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = self._ports()
            if len(ports) > len(seen) and self.proc.poll() is None:
                self.proxy.target = int(ports[-1])  # this start's port
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"node did not start: {self.log.read_text()[-2000:]}")

    def _ports(self) -> list[str]:
        text = self.log.read_text() if self.log.exists() else ""
        return re.findall(r"serving on port (\d+)", text)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proxy.target = None
        self.proxy.cut_all()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None or self.proc.poll() is not None else self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ReplicaProcess(NodeProcess):
    """One replica of a node behind the proxy's balancer: started, it joins the
    balancer's targets; killed, it leaves them (and only its own connections drop)."""

    port: int | None = None

    def start(self, timeout: float = 60.0) -> None:
        before = self.proxy.target
        super().start(timeout)
        self.port, self.proxy.target = self.proxy.target, before
        with self.proxy._lock:
            self.proxy.replicas.append(int(self.port or 0))

    def kill(self) -> None:
        assert self.proc is not None
        with self.proxy._lock:
            if self.port in self.proxy.replicas:
                self.proxy.replicas.remove(self.port)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


# -- what both fault suites share: the data, the run under a fault, the outcome ------

Row = tuple[str, str, str, str]  # record id, ID number, programme, status
FAST_RETRY = Backoff(attempts=10, base=0.3, cap=3.0)


def registries(provinces: list[str], n: int, seed: int) -> dict[str, list[Row]]:
    """`n` records per province, a quarter of the IDs shared by all."""
    rng = random.Random(seed)
    shared = [f"35202{rng.randrange(10**8):08d}" for _ in range(n // 4)]
    data: dict[str, list[Row]] = {}
    for i, p in enumerate(provinces):
        own = [f"{i + 1}{rng.randrange(10**12):012d}" for _ in range(n - len(shared))]
        data[p] = [
            (f"{p}-{k}", nid, rng.choice(["BISP", "PSER"]), rng.choice(["enrolled", "eligible"]))
            for k, nid in enumerate(own + shared)
        ]
    return data


def expected(data: dict[str, list[Row]], own: str, peer: str) -> set[tuple[str, str, str]]:
    """The true matches of `own`'s records in `peer`'s registry."""
    labels: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for _, nid, prog, st in data[peer]:
        labels[nid].add((prog, st))
    return {(rid, p, s) for rid, nid, _, _ in data[own] for p, s in labels.get(nid, ())}


def load_registries(
    client_of: Callable[[str], NodeClient], root: Path, data: dict[str, list[Row]]
) -> None:
    for p, rows in data.items():
        csv = root / f"{p}.csv"
        csv.write_text(
            "record_id,cnic,programme,status\n" + "".join(",".join(r) + "\n" for r in rows)
        )
        with client_of(p) as client:
            assert load_csv(client, csv).rejected == 0


def reconcile_through(
    client_of: Callable[[str], NodeClient],
    a: str,
    b: str,
    fault: Callable[[], object],
    **kw: Any,
) -> internal_pb2.SessionStatus:
    """Run a (full) reconciliation while `fault()` strikes; return its final status."""
    out: dict[str, internal_pb2.SessionStatus | BaseException] = {}

    def run() -> None:
        try:
            with client_of(a) as client:
                out["st"] = client.reconcile(
                    b, full=True, attempts=10, backoff=FAST_RETRY, node_wait=60, **kw
                )
        except BaseException as exc:
            out["st"] = exc

    t = threading.Thread(target=run)
    t.start()
    fault()
    t.join(timeout=240)
    assert not t.is_alive(), "the reconciliation never finished"
    st = out["st"]
    assert isinstance(st, internal_pb2.SessionStatus), st
    return st


def check_matches_and_logs(
    client_of: Callable[[str], NodeClient],
    root: Path,
    data: dict[str, list[Row]],
    a: str,
    b: str,
    st: internal_pb2.SessionStatus,
    tmp: Path,
) -> None:
    """The run completed with exactly the true matches on both sides, every node's log
    verifies and both logged every session alike."""
    assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
    for side, other in ((a, b), (b, a)):
        with client_of(side) as client:
            got = {
                (m.record_id, m.peer_programme, m.peer_status)
                for m in client.matches(st.session_id)
            }
        assert got == expected(data, side, other), f"{side}'s matches differ from the truth"
    prof = AuditProfile.load(root / "forum" / "auditors" / "auditor" / "audit.toml")
    prof = replace(prof, state=tmp / "audit-state.json", evidence=tmp / "evidence")
    assert {r.node for r in verify(prof)} == set(data)
    report = pair(prof)
    assert not report.mismatched and not report.one_sided, report


def session_entries(entries: list[bytes]) -> list[str]:
    """The session ids of a log's session entries, in log order."""
    return [
        str(e["session_id"])
        for e in (decode_entry(raw) for raw in entries)
        if e["type"] == "session"
    ]


def fault_config(
    text: str,
    proxies: dict[str, TcpProxy],
    *,
    store_url: str = "",
    settings: str = "session_idle_timeout = 20",
) -> str:
    """A node.toml made for the fault suites: one blinding worker, peers reached
    through their proxies, `settings` at the top level, and the store in `store_url`'s
    PostgreSQL database where given."""
    text = text.replace("workers = 0", "workers = 1")
    for q, proxy in proxies.items():
        text = text.replace(
            f'[peers.{q}]\naddress = "127.0.0.1:0"', f'[peers.{q}]\naddress = "{proxy.address}"'
        )
    text = text.replace("\n[", f"\n{settings}\n\n[", 1)
    if store_url:
        text = text.replace('store = "node.sqlite"\n', "") + f'\n[store]\nurl = "{store_url}"\n'
    return text
