"""Fault harness: node processes that can be SIGKILLed and restarted, behind TCP proxies.

Every node is reached (by its peers and by its own clients) through a proxy whose
address never changes; a restarted node binds a new port and the proxy follows.
The proxy can delay traffic or drop every connection, as a flaky WAN would.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


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
