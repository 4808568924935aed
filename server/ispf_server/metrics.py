"""Prometheus metrics of one node, in its own registry (several nodes may share a process)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ispf.errors import ConfigError

log = logging.getLogger(__name__)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Counter(
            "ispf_sessions",
            "Sessions finished, by role, outcome and kind",
            ["role", "outcome", "sync"],
            registry=r,
        )
        self.values = Counter(
            "ispf_values_blinded",
            "Values this node blinded or re-blinded in sessions",
            registry=r,
        )
        self.probes = Counter(
            "ispf_probes",
            "Online-check probes answered for peers, by peer and result",
            ["peer", "result"],
            registry=r,
        )
        self.checks = Counter(
            "ispf_checks",
            "IDs this node checked with peers, by peer and answer",
            ["peer", "answer"],
            registry=r,
        )
        self.budget_refused = Counter(
            "ispf_query_budget_refused",
            "Sessions and probes refused because the peer's query budget was spent",
            ["peer"],
            registry=r,
        )
        self.rpc = Histogram(
            "ispf_rpc_seconds",
            "gRPC calls served, by method and status code",
            ["method", "code"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
        )
        self.ready = Gauge("ispf_ready", "1 if the node's store and keys are ready", registry=r)

    def gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        Gauge(name, doc, registry=self.registry).set_function(fn)

    def serve(self, listen: str) -> int:
        """Expose /metrics on `host:port` (port 0: any free port); returns the port."""
        host, _, port = listen.rpartition(":")
        try:
            server, _thread = start_http_server(
                int(port), addr=host or "127.0.0.1", registry=self.registry
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot serve metrics on {listen}: {exc.strerror or exc} "
                "(check `[metrics] listen` in node.toml)"
                if isinstance(exc, OSError)
                else f"cannot serve metrics on {listen}: not host:port"
            ) from None
        self._server = server
        bound = int(server.server_port)
        log.info("metrics served on %s:%d/metrics", host or "127.0.0.1", bound)
        return bound

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
