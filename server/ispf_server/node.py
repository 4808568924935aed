"""The node: its store, keys, blinding pool, sessions, and the gRPC server over them."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ispf.errors import ConfigError, PolicyRefused, UnknownEpoch, UnknownPeer
from ispf.keys import ForumSalt
from ispf.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    internal_pb2,
    internal_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
)
from ispf_server.audit import AuditLog, load_log_keys, load_log_signer
from ispf_server.config import NodeConfig
from ispf_server.guard import Guard
from ispf_server.pool import BlindingPool
from ispf_server.services.audit import AuditServicer
from ispf_server.services.internal import ReconciliationServicer, RegistryServicer
from ispf_server.services.peer import PeerServicer
from ispf_server.session.initiator import Deadlines, Initiator, SessionRequest
from ispf_server.session.progress import ProgressBoard, Snapshot
from ispf_server.session.responder import Responder
from ispf_server.store import Store
from ispf_server.tls import TlsMaterial, channel_options

log = logging.getLogger(__name__)
_SALT_FILE = re.compile(r"^epoch-(\d+)\.salt$")


def load_salts(salt_dir: Path) -> dict[int, ForumSalt]:
    """Every epoch-<N>.salt file in the folder (each must be owner-only)."""
    if not salt_dir.is_dir():
        raise ConfigError(f"salt folder {salt_dir} does not exist")
    salts: dict[int, ForumSalt] = {}
    for f in sorted(salt_dir.iterdir()):
        m = _SALT_FILE.match(f.name)
        if m:
            epoch = int(m.group(1))
            salts[epoch] = ForumSalt.from_file(f, epoch)
    return salts


class Node:
    def __init__(self, config: NodeConfig, pool: BlindingPool | None = None) -> None:
        self.config = config
        self.province = config.province
        self.tls = TlsMaterial.load(config.tls)
        self.salts = load_salts(config.salt_dir)
        if config.current_epoch not in self.salts:
            raise UnknownEpoch(
                f"no salt for current epoch {config.current_epoch} in {config.salt_dir} "
                f"(expected file epoch-{config.current_epoch}.salt)"
            )
        self.store = Store(config.store)
        self.audit = AuditLog(
            self.store,
            load_log_signer(config.log_key),
            config.province,
            load_log_keys(config.log_keys_dir),
        )
        self._own_pool = pool is None
        self.pool = pool or BlindingPool(config.blinding_workers())
        self.board = ProgressBoard()
        self.peer_addresses = {name: p.address for name, p in config.peers.items()}
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.responder = Responder(
            province=self.province,
            store=self.store,
            pool=self.pool,
            salts=self.salts,
            board=self.board,
            purposes=config.policy.purposes,
            collections=config.policy.collections,
            max_set_size=config.policy.max_set_size,
            chunk_values=config.chunk_values,
            idle_timeout=config.session_idle_timeout,
            audit=self.audit,
        )
        self._fail_interrupted()
        log.info(
            "node %s ready: epoch %d (salt %s), %d peers, %s blinding",
            self.province,
            config.current_epoch,
            self.salts[config.current_epoch].fingerprint(),
            len(self.peer_addresses),
            f"{self.pool.workers} worker processes" if self.pool.workers else "inline",
        )

    def _fail_interrupted(self) -> None:
        """Sessions left running by a crash are not results: fail them, with their entries."""
        for row in self.store.running_sessions():
            reason = "node restarted during session"
            me, peer = self.province, row.peer
            initiator, responder = (me, peer) if row.role == "initiator" else (peer, me)
            entry = self.audit.session_entry(
                session_id=row.session_id,
                initiator=initiator,
                responder=responder,
                purpose=row.purpose,
                epoch=row.epoch,
                mode=row.mode,
                outcome="failed",
                reason=reason,
            )
            self.store.fail_session(row.session_id, reason, entry)
            log.warning("session %s with %s: %s", row.session_id, peer, reason)
        self.audit.sign_checkpoint()

    @property
    def current_salt(self) -> ForumSalt:
        return self.salts[self.config.current_epoch]

    def peer_stub(self, peer: str) -> peer_pb2_grpc.PeerServiceStub:
        with self._lock:
            address = self.peer_addresses.get(peer)
            if address is None:
                raise UnknownPeer(
                    f"peer '{peer}' is not configured on node {self.province} "
                    f"(known: {', '.join(sorted(self.peer_addresses)) or 'none'})"
                )
            ch = self._channels.get(peer)
            if ch is None:
                ch = grpc.secure_channel(
                    address,
                    self.tls.channel_credentials(),
                    options=channel_options(peer, self.config.max_message_bytes),
                )
                self._channels[peer] = ch
        return peer_pb2_grpc.PeerServiceStub(ch)

    def start_session(
        self,
        *,
        peer: str,
        purpose: str,
        mode: int,
        collections: frozenset[str],
        peer_collections: frozenset[str],
    ) -> Snapshot:
        if peer == self.province:
            raise PolicyRefused("a node cannot reconcile with itself")
        stub = self.peer_stub(peer)
        sid = str(uuid.uuid4())
        salt = self.current_salt
        self.store.begin_session(sid, peer, "initiator", mode, purpose, salt.epoch)
        progress = self.board.open(
            Snapshot(
                session_id=sid,
                peer=peer,
                role="initiator",
                mode=mode,
                purpose=purpose,
                epoch=salt.epoch,
            )
        )
        initiator = Initiator(
            province=self.province,
            request=SessionRequest(sid, peer, purpose, mode, collections, peer_collections),
            stub=stub,
            store=self.store,
            pool=self.pool,
            salt=salt,
            progress=progress,
            chunk_values=self.config.chunk_values,
            max_set_size=self.config.policy.max_set_size,
            deadlines=Deadlines(self.config.call_deadline, self.config.session_deadline),
            audit=self.audit,
        )
        t = threading.Thread(target=initiator.run, name=f"session-{sid[:8]}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return progress.snapshot()

    def close(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=5)
        for ch in self._channels.values():
            ch.close()
        if self._own_pool:
            self.pool.close()
        self.store.close()


def create_server(
    node: Node,
    listen: str | None = None,
    *,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
) -> tuple[grpc.Server, int]:
    """Build the node's gRPC server and bind it; returns (server, bound port). Not started.

    `interceptors` run before the node's own guard (tests use one to record traffic).
    """
    cfg = node.config
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix=f"grpc-{node.province}"),
        interceptors=[*interceptors, Guard(node.province)],
        options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
        ],
    )
    peer_pb2_grpc.add_PeerServiceServicer_to_server(PeerServicer(node.responder), server)
    internal_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(node), server)
    internal_pb2_grpc.add_ReconciliationServiceServicer_to_server(
        ReconciliationServicer(node), server
    )
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(node.audit), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        peer_pb2.DESCRIPTOR.services_by_name["PeerService"].full_name,
        internal_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
        internal_pb2.DESCRIPTOR.services_by_name["ReconciliationService"].full_name,
        audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    ]
    for name in [*names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_secure_port(listen or cfg.listen, node.tls.server_credentials())
    if port == 0:
        raise ConfigError(f"could not bind {listen or cfg.listen}")
    return server, port
