"""The node, put together: its store, keys, pool, policy, sessions and services, wired
once (`Node`), and the gRPC server over them (`create_server`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ispf import note
from ispf import roster as roster_mod
from ispf.auditlog import load_log_signer
from ispf.blinding import backend_status, curve_in_c, select_backend
from ispf.errors import (
    ConfigError,
    UnknownEpoch,
)
from ispf.keys import ForumSalt
from ispf.nodeconfig import NodeConfig
from ispf.records import Label
from ispf.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    internal_pb2,
    internal_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
)
from ispf_server.audit import AuditLog, load_log_keys
from ispf_server.batching import CoalescerStats
from ispf_server.budget import BudgetState, QueryBudget
from ispf_server.clock import utcnow
from ispf_server.guard import Guard
from ispf_server.health import Health, check_node_files
from ispf_server.metrics import NodeMetrics
from ispf_server.peers import PeerChannels
from ispf_server.policy import Policy, PolicyFile
from ispf_server.pool import BlindingPool
from ispf_server.probes import Checker, ProbeAnswerer
from ispf_server.revocation import RevocationList
from ispf_server.salts import SaltRing
from ispf_server.services.audit import AuditServicer
from ispf_server.services.internal import (
    CheckServicer,
    ReconciliationServicer,
    RegistryServicer,
)
from ispf_server.services.peer import PeerServicer
from ispf_server.session.initiator import Ask
from ispf_server.session.launch import Launcher
from ispf_server.session.lifecycle import SessionContext, fail_interrupted
from ispf_server.session.progress import ProgressBoard, Snapshot
from ispf_server.session.responder import Responder
from ispf_server.storage import Store
from ispf_server.storage.pairs.compaction import Compactor
from ispf_server.storage.registry import Registry, StoredRecord
from ispf_server.storage.sessions import Sessions
from ispf_server.tls import TlsFiles

log = logging.getLogger(__name__)
X25519_HEALTH = "ispf.X25519"  # health entry of the X25519 backend's self-checks


class Node:
    def __init__(self, config: NodeConfig, pool: BlindingPool | None = None) -> None:
        self.config = config
        self.province = config.province
        self.tls = TlsFiles(config.tls)
        self.revoked = RevocationList(config.tls.revoked)
        self.salts = SaltRing(config.salt_dir)
        if self.salts.get(config.current_epoch) is None:
            raise UnknownEpoch(
                f"no salt for current epoch {config.current_epoch} in {config.salt_dir} "
                f"(expected file epoch-{config.current_epoch}.salt)"
            )
        check_node_files(config)
        self.roster = (
            roster_mod.load(config.roster, config.tls.ca) if config.roster is not None else None
        )
        self.store = Store(config.store, config.master_key, url=config.store_url)
        self.audit = AuditLog(
            self.store, load_log_signer(config.log_key), config.province, self._log_keys()
        )
        self.policy = PolicyFile(config.policy_file, self._record_policy)
        self._own_pool = pool is None
        self.backend = select_backend(config.backend)  # fails early if a named backend can't load
        self.pool = pool or BlindingPool(config.blinding_workers(), self.backend.name)
        self.metrics = NodeMetrics()
        self.board = ProgressBoard(on_finish=self._session_finished)
        roster_peers = {
            name: e.address
            for name, e in (self.roster.nodes.items() if self.roster is not None else ())
            if name != self.province
        }
        # [peers] in the config, where given, override the roster's addresses.
        self.peers_to = PeerChannels(
            self.province,
            roster_peers | {n: p.address for n, p in config.peers.items()},
            self.tls,
            config.max_message_bytes,
        )
        self.budget = QueryBudget(
            self.store, on_refused=lambda peer: self.metrics.budget_refused.labels(peer).inc()
        )
        self.sessions = SessionContext(
            province=self.province,
            store=self.store,
            audit=self.audit,
            pool=self.pool,
            budget=self.budget,
            chunk_values=config.chunk_values,
        )
        self.launcher = Launcher(
            self.sessions,
            self.board,
            policy=self.policy.current,
            salt=lambda: self.current_salt,
            stub=self.peer_stub,
            call_deadline=config.call_deadline,
            session_deadline=config.session_deadline,
        )
        self.responder = Responder(
            self.sessions,
            salts=self.salts,
            board=self.board,
            policy=self.policy.current,
            idle_timeout=config.session_idle_timeout,
            pair_lock=self.launcher.pair_lock,
        )
        self.probes = ProbeAnswerer(
            store=self.store,
            policy=self.policy.current,
            audit=self.audit,
            sync_with=self.launcher.sync_with,
            on_probe=lambda peer, result, n: self.metrics.probes.labels(peer, result).inc(n),
            backend=self.backend.name,
            budget=self.budget,
        )
        self.checker = Checker(
            province=self.province,
            store=self.store,
            policy=self.policy.current,
            audit=self.audit,
            peers=self.peers_to.names,
            stub_for=self.peer_stub,
            salt=lambda: self.current_salt,
            province_digits=config.province_digits,
            backend=self.backend.name,
        )
        # Online checks: how far concurrent probes share ladder calls (asker, peer).
        for side, stats in (
            ("blind", self.checker.blinder.stats),
            ("reblind", self.probes.reblinder.stats),
        ):
            self.metrics.gauge(
                f"ispf_online_{side}_calls",
                f"Online-check probes whose values this node {side}ed",
                _counted(stats, "calls"),
            )
            self.metrics.gauge(
                f"ispf_online_{side}_batches",
                f"X25519 batches those probes' values were {side}ed in (shared)",
                _counted(stats, "batches"),
            )
        self.metrics.gauge(
            "ispf_online_probe_calls",
            "Online-check probes this node sent, one per check per peer",
            _counted(self.checker.prober.stats, "calls"),
        )
        self.metrics.gauge(
            "ispf_online_probe_batches",
            "Probe calls those probes went in (concurrent checks' probes to a peer shared)",
            _counted(self.checker.prober.stats, "batches"),
        )
        self.metrics.gauge(
            "ispf_registry_records",
            "Records in the registry",
            lambda: float(self.store.registry.stats()[0]),
        )
        self.metrics.gauge(
            "ispf_audit_log_entries",
            "Entries in the signed audit log",
            lambda: float(self.audit.size()),
        )
        compactor = self.store.compactor
        for outcome, meaning in (
            ("compacted", "merged into new sorted runs"),
            ("gave_way", "stopped for a session of the pair, to be tried again"),
            ("failed", "abandoned or failed, the state left as it was"),
        ):
            self.metrics.gauge(
                f"ispf_pair_compactions_{outcome}",
                f"Compactions of pair state {meaning}",
                _compactions(compactor, outcome),
            )
        self.metrics.gauge(
            "ispf_pair_overlay_rows",
            "Rows and tombstones on top of the pairs' sorted runs (compaction keeps it small)",
            lambda: float(self.store.pairs.overlay_rows()),
        )
        self.metrics.gauge(
            "ispf_x25519_healthy",
            "1 if the X25519 backend passed its self-checks (0: fell back or failed a spot check)",
            lambda: float(backend_status().healthy),
        )
        self.metrics.gauge(
            "ispf_x25519_mismatches",
            "X25519 outputs a self-check found different from cryptography's",
            lambda: float(backend_status().mismatches),
        )
        self.metrics.gauge(
            "ispf_x25519_spot_checks",
            "X25519 outputs recomputed with cryptography while serving",
            lambda: float(backend_status().spot_checks),
        )
        self.health = Health(config, self.store, self.salts, self.audit, self.metrics)
        fail_interrupted(self.sessions)
        self.store.sweep_pairs()  # (after: a failed session's staging is its own to drop)
        self._sweeping = threading.Event()
        if self.store.shared:  # (replicas: fail the sessions of one that died)
            threading.Thread(target=self._sweep, name="replica-sweep", daemon=True).start()
        log.info(
            "node %s loaded: epoch %d (salt %s), %d peers, policy version %d, %s blinding, "
            "X25519 backend %s, hash-to-curve in %s; store %s",
            self.province,
            config.current_epoch,
            self.current_salt.fingerprint(),
            len(self.peer_addresses),
            self.policy.current().version,
            self.pool.describe(),
            self.backend.name,
            "C" if curve_in_c() else "Python (native module not built)",
            self.store.db.location
            + (f" (replica {self.store.replica})" if self.store.shared else ""),
        )

    def pinned_certs(self) -> dict[str, str] | None:
        """Peers' node certificate fingerprints from the roster (None: no roster)."""
        if self.roster is None:
            return None
        return {n: e.cert_sha256 for n, e in self.roster.nodes.items()}

    def _log_keys(self) -> dict[str, note.Verifier]:
        """Peers' checkpoint verifier keys: from the signed roster, else the keys folder."""
        if self.roster is not None:
            return self.roster.log_keys()
        assert self.config.log_keys_dir is not None  # (load_config requires one of them)
        return load_log_keys(self.config.log_keys_dir)

    def _session_finished(self, snap: Snapshot) -> None:
        self.metrics.sessions.labels(snap.role, snap.state.lower(), snap.sync or "none").inc()
        self.metrics.values.inc(snap.own_values + snap.peer_values)

    def watch_health(self, set_status: Callable[[bool], None], every: float = 5.0) -> None:
        """Report readiness to the health service now and every `every` seconds."""
        self.health.watch(set_status, every)

    def _record_policy(self, policy: Policy) -> None:
        """Log each policy that takes effect (once per distinct file), with its hash."""
        if self.store.meta.get("policy_sha256") == policy.digest:
            return
        self.audit.record_policy(version=policy.version, sha256=policy.digest, at=utcnow())
        self.store.meta.set("policy_sha256", policy.digest)

    @property
    def current_salt(self) -> ForumSalt:
        salt = self.salts.get(self.config.current_epoch)
        if salt is None:
            raise UnknownEpoch(f"the salt of current epoch {self.config.current_epoch} is gone")
        return salt

    @property
    def peer_addresses(self) -> dict[str, str]:
        """Each peer's address (tests and the demo set them once the ports are known)."""
        return self.peers_to.addresses

    @peer_addresses.setter
    def peer_addresses(self, addresses: dict[str, str]) -> None:
        self.peers_to.addresses = addresses

    def peer_stub(self, peer: str) -> peer_pb2_grpc.PeerServiceStub:
        return self.peers_to.stub(peer)

    # -- what the servicers ask of the node (services.api.NodeApi) -----------

    @property
    def province_digits(self) -> frozenset[str]:
        return self.config.province_digits

    @property
    def registry(self) -> Registry:
        return self.store.registry

    @property
    def results(self) -> Sessions:
        return self.store.sessions

    def new_record(self, record_id: str, nid: str, label: Label) -> StoredRecord:
        return StoredRecord(record_id, nid, label)

    def session_status(self, session_id: str) -> Snapshot | None:
        progress = self.board.get(session_id)
        if progress is not None:
            return progress.snapshot()
        row = self.store.sessions.get(session_id)
        return None if row is None else Snapshot.from_row(row)

    def peers(self) -> list[str]:
        return self.peers_to.names()

    def budgets(self) -> list[BudgetState]:
        """Each policy peer's query budget with this node in the current epoch."""
        policy, epoch = self.policy.current(), self.config.current_epoch
        return [self.budget.state(policy.peers[p], epoch) for p in sorted(policy.peers)]

    def start_session(
        self,
        *,
        peer: str,
        purpose: str,
        mode: int,
        collections: frozenset[str],
        peer_collections: frozenset[str],
        full: bool = False,
    ) -> Snapshot:
        return self.launcher.start(Ask(peer, purpose, mode, collections, peer_collections, full))

    def _sweep(self) -> None:
        while not self._sweeping.wait(self.config.health_interval):
            try:
                self.store.keep_alive()  # (first: our own locks, then others' sessions)
                fail_interrupted(self.sessions, at_start=False)
            except Exception as exc:  # (the database away: the next sweep tries again)
                log.warning("failing the sessions of stopped replicas: %s", type(exc).__name__)

    def close(self) -> None:
        self._sweeping.set()
        self.health.stop()
        self.metrics.close()
        self.checker.close()
        self.probes.log.flush()
        self.launcher.join(timeout=5)
        self.peers_to.close()
        if self._own_pool:
            self.pool.close()
        self.store.close()


def retire_epoch(config: NodeConfig, epoch: int) -> None:
    """Destroy an epoch's salt on this node and log it (the node may be running)."""
    SaltRing(config.salt_dir).retire(epoch, current=config.current_epoch)
    store = Store(config.store, config.master_key, url=config.store_url)
    try:
        erased = store.destroy_epoch(epoch)
        log.info("epoch %d: pair keys and tag state destroyed, %d match tags erased", epoch, erased)
        audit = AuditLog(store, load_log_signer(config.log_key), config.province, {})
        audit.record_epoch_retired(epoch, at=utcnow())
    finally:
        store.close()
    log.info("epoch %d retired on node %s", epoch, config.province)


def _compactions(compactor: Compactor, outcome: str) -> Callable[[], float]:
    return lambda: float(getattr(compactor.counts, outcome))


def _counted(stats: CoalescerStats, what: str) -> Callable[[], float]:
    return lambda: float(getattr(stats, what))


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
        interceptors=[
            *interceptors,
            Guard(
                node.province,
                node.revoked,
                node.metrics,
                pinned=node.pinned_certs(),
                hold=node.audit.require_intact,
            ),
        ],
        options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            # gRPC's default lets a second process bind the same port and take calls
            # at random; a taken address must stop this node instead.
            ("grpc.so_reuseport", 0),
        ],
    )
    peer_pb2_grpc.add_PeerServiceServicer_to_server(
        PeerServicer(node.responder, node.probes), server
    )
    internal_pb2_grpc.add_CheckServiceServicer_to_server(CheckServicer(node.checker), server)
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
        internal_pb2.DESCRIPTOR.services_by_name["CheckService"].full_name,
        audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    ]

    def set_health(ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in [*names, ""]:
            health_servicer.set(name, status)
        # The X25519 backend's own entry: NOT_SERVING once it failed a self-check
        # (the node then computes X25519 with cryptography and serves on).
        x25519_ok = ready and backend_status().healthy
        health_servicer.set(
            X25519_HEALTH,
            health_pb2.HealthCheckResponse.SERVING
            if x25519_ok
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    node.watch_health(set_health, every=cfg.health_interval)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = listen or cfg.listen
    try:
        port = server.add_secure_port(address, node.tls.server_credentials())
    except RuntimeError:  # grpcio >= 1.59 raises where older versions returned 0
        port = 0
    if port == 0:
        raise ConfigError(
            f"cannot listen on {address}: the address is in use by another process "
            "or is not an address of this machine (check `listen` in node.toml)"
        )
    return server, port
