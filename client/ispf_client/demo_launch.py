"""The demo's launcher: province nodes in this process, for `ispf demo` only.

The one module of the client that imports the node (`ispf_server`): a real
province runs its node on its own machine and the client reaches it over gRPC
(`ispf_client.sdk`). Here, to show a whole federation on one machine, the demo
starts every node itself, each on its own 127.0.0.1 port.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import grpc

from ispf.nodeconfig import load_config
from ispf_client.auditor import AuditProfile
from ispf_client.forum import ForumLayout, write_audit_profile, write_client_profile
from ispf_client.sdk import ClientProfile, NodeClient
from ispf_server.node import Node, create_server
from ispf_server.pool import BlindingPool


class LocalFederation:
    """Province nodes in this process, each on its own 127.0.0.1 port, one blinding pool."""

    def __init__(
        self,
        layout: ForumLayout,
        provinces: list[str],
        digits: frozenset[str],
        workers: int,
        interceptors: Sequence[Any] = (),
    ) -> None:
        self.layout = layout
        self.pool = BlindingPool(workers or (os.cpu_count() or 1))
        self.nodes: dict[str, Node] = {}
        self.servers: dict[str, grpc.Server] = {}
        self.ports: dict[str, int] = {}
        self.clients: dict[str, NodeClient] = {}
        try:
            for p in provinces:
                cfg = load_config(layout.node_dir(p) / "node.toml")
                node = Node(replace(cfg, province_digits=digits), pool=self.pool)
                self.nodes[p] = node
                self.servers[p], self.ports[p] = create_server(
                    node, "127.0.0.1:0", interceptors=interceptors
                )
                self.servers[p].start()
            addresses = {p: self.address(p) for p in provinces}
            for p, node in self.nodes.items():
                node.peer_addresses = {q: a for q, a in addresses.items() if q != p}
                # Profiles on disk name the real ports, for CLI use while serving.
                write_client_profile(layout, p, addresses[p])
                self.clients[p] = NodeClient(
                    ClientProfile.load(layout.client_dir(p) / "profile.toml")
                )
            write_audit_profile(layout, "auditor", addresses)
        except BaseException:
            self.close()
            raise

    def backend_name(self) -> str:
        """The X25519 backend the nodes chose (all the same: one machine, "auto")."""
        return next(iter(self.nodes.values())).backend.name

    def address(self, province: str) -> str:
        return f"127.0.0.1:{self.ports[province]}"

    def audit_profile(self) -> AuditProfile:
        return AuditProfile.load(self.layout.auditor_dir("auditor") / "audit.toml")

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for s in self.servers.values():
            s.stop(grace=1).wait()
        for n in self.nodes.values():
            n.close()
        self.pool.close()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
