"""The node: its store, keys, blinding pool, sessions, and the gRPC server over them."""

from __future__ import annotations

import logging
import stat
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ispf import files, note
from ispf import roster as roster_mod
from ispf.auditlog import load_log_signer
from ispf.errors import (
    ConfigError,
    IspfError,
    PolicyRefused,
    PreconditionFailed,
    UnknownEpoch,
    UnknownPeer,
)
from ispf.hazmat import backends, curve
from ispf.hazmat.backends import select as select_backend
from ispf.keys import ForumSalt, check_private_file
from ispf.nodeconfig import NodeConfig
from ispf.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    internal_pb2,
    internal_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
)
from ispf_server.audit import AuditLog, load_log_keys
from ispf_server.budget import BudgetState, QueryBudget
from ispf_server.guard import Guard
from ispf_server.metrics import NodeMetrics
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
from ispf_server.session.initiator import Deadlines, Initiator, SessionRequest
from ispf_server.session.plan import check_collections
from ispf_server.session.progress import ProgressBoard, Snapshot
from ispf_server.session.responder import Responder
from ispf_server.session.sync import one_off_plan
from ispf_server.storage import Store
from ispf_server.tls import TlsFiles, channel_options

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
        self.store = Store(config.store, config.master_key)
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
        self.peer_addresses = roster_peers | {n: p.address for n, p in config.peers.items()}
        self._channels: dict[str, tuple[int, grpc.Channel]] = {}
        self._pair_locks: dict[str, threading.Lock] = {}
        self._retired_channels: list[grpc.Channel] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.budget = QueryBudget(
            self.store, on_refused=lambda peer: self.metrics.budget_refused.labels(peer).inc()
        )
        self.responder = Responder(
            province=self.province,
            store=self.store,
            pool=self.pool,
            salts=self.salts,
            board=self.board,
            policy=self.policy.current,
            chunk_values=config.chunk_values,
            idle_timeout=config.session_idle_timeout,
            audit=self.audit,
            pair_lock=self.pair_lock,
            budget=self.budget,
        )
        self.probes = ProbeAnswerer(
            store=self.store,
            policy=self.policy.current,
            audit=self.audit,
            sync_with=self.sync_with,
            on_probe=lambda peer, result, n: self.metrics.probes.labels(peer, result).inc(n),
            backend=self.backend.name,
            budget=self.budget,
        )
        self.checker = Checker(
            province=self.province,
            store=self.store,
            policy=self.policy.current,
            audit=self.audit,
            peers=lambda: sorted(self.peer_addresses),
            stub_for=self.peer_stub,
            salt=lambda: self.current_salt,
            province_digits=config.province_digits,
            backend=self.backend.name,
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
        self.metrics.gauge(
            "ispf_x25519_healthy",
            "1 if the X25519 backend passed its self-checks (0: fell back or failed a spot check)",
            lambda: float(backends.STATUS.healthy),
        )
        self.metrics.gauge(
            "ispf_x25519_mismatches",
            "X25519 outputs a self-check found different from cryptography's",
            lambda: float(backends.STATUS.mismatches),
        )
        self.metrics.gauge(
            "ispf_x25519_spot_checks",
            "X25519 outputs recomputed with cryptography while serving",
            lambda: float(backends.STATUS.spot_checks),
        )
        self._health_stop = threading.Event()
        self._fail_interrupted()
        log.info(
            "node %s ready: epoch %d (salt %s), %d peers, policy version %d, %s blinding, "
            "X25519 backend %s, hash-to-curve in %s",
            self.province,
            config.current_epoch,
            self.current_salt.fingerprint(),
            len(self.peer_addresses),
            self.policy.current().version,
            self.pool.describe(),
            self.backend.name,
            "C" if curve.native is not None else "Python (native module not built)",
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

    def readiness(self) -> list[str]:
        """What keeps the node from serving: store, salt, TLS and log keys, policy."""
        problems = []
        try:
            self.store.db.ping()
        except Exception as exc:  # any failure of the store means not ready
            problems.append(f"store: {type(exc).__name__}")
        if self.salts.get(self.config.current_epoch) is None:
            problems.append(f"salt of current epoch {self.config.current_epoch} missing")
        for path in (self.config.tls.key, self.config.log_key, *_key_files(self.config)):
            try:
                check_private_file(path)
            except IspfError as exc:
                problems.append(exc.message)
        policy = self.config.policy_file
        try:
            mode = stat.S_IMODE(policy.stat().st_mode)
        except FileNotFoundError:
            problems.append(f"policy file {policy} missing")
        else:
            if mode & 0o077:
                problems.append(
                    f"policy file {policy} is accessible by group or others (mode {mode:04o}); "
                    f"run: chmod 600 {policy}"
                )
        if self.audit.problem:
            problems.append(self.audit.problem)
        return problems

    def watch_health(self, set_status: Callable[[bool], None], every: float = 5.0) -> None:
        """Report readiness to the health service now and every `every` seconds."""

        def once() -> None:
            problems = self.readiness()
            self.metrics.ready.set(0 if problems else 1)
            if problems:
                log.error("node %s not ready: %s", self.province, "; ".join(problems))
            set_status(not problems)

        def loop() -> None:
            while not self._health_stop.wait(every):
                once()

        once()
        threading.Thread(target=loop, name=f"health-{self.province}", daemon=True).start()

    def _record_policy(self, policy: Policy) -> None:
        """Log each policy that takes effect (once per distinct file), with its hash."""
        if self.store.meta.get("policy_sha256") == policy.digest:
            return
        self.audit.record_policy(version=policy.version, sha256=policy.digest)
        self.store.meta.set("policy_sha256", policy.digest)

    def _fail_interrupted(self) -> None:
        """Sessions left running by a crash are not results: fail them, with their entries."""
        for row in self.store.sessions.running():
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
            self.store.sessions.fail(row.session_id, reason, entry, retriable=True)
            log.warning("session %s with %s: %s", row.session_id, peer, reason)
        self.audit.sign_checkpoint()

    @property
    def current_salt(self) -> ForumSalt:
        salt = self.salts.get(self.config.current_epoch)
        if salt is None:
            raise UnknownEpoch(f"the salt of current epoch {self.config.current_epoch} is gone")
        return salt

    def peer_stub(self, peer: str) -> peer_pb2_grpc.PeerServiceStub:
        """A stub on a channel to the peer, made with the node's current certificate."""
        material = self.tls.current()
        with self._lock:
            address = self.peer_addresses.get(peer)
            if address is None:
                raise UnknownPeer(
                    f"peer '{peer}' is not configured on node {self.province} "
                    f"(known: {', '.join(sorted(self.peer_addresses)) or 'none'})"
                )
            serial, ch = self._channels.get(peer, (None, None))
            if ch is None or serial != material.serial:
                if ch is not None:  # rotated: calls in flight finish on the old channel
                    self._retired_channels.append(ch)
                ch = grpc.secure_channel(
                    address,
                    material.channel_credentials(),
                    options=channel_options(peer, self.config.max_message_bytes),
                )
                self._channels[peer] = (material.serial, ch)
        return peer_pb2_grpc.PeerServiceStub(ch)

    def budgets(self) -> list[BudgetState]:
        """Each policy peer's query budget with this node in the current epoch."""
        policy, epoch = self.policy.current(), self.config.current_epoch
        return [self.budget.state(policy.peers[p], epoch) for p in sorted(policy.peers)]

    def pair_lock(self, peer: str) -> threading.Lock:
        """One session at a time per pair, whichever side started it (sync state)."""
        with self._lock:
            return self._pair_locks.setdefault(peer, threading.Lock())

    def sync_with(self, peer: str) -> None:
        """Run a sync session with the peer in this thread (to freshen the check index)."""
        initiator = self._initiator(
            peer=peer,
            purpose="reconciliation",
            mode=common_pb2.MODE_MUTUAL,
            collections=frozenset(),
            peer_collections=frozenset(),
            full=False,
        )
        initiator.run()
        snap = initiator.progress.snapshot()
        if snap.state != "COMPLETED":
            raise PreconditionFailed(f"sync with {peer} failed: {snap.error}")

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
        initiator = self._initiator(
            peer=peer,
            purpose=purpose,
            mode=mode,
            collections=collections,
            peer_collections=peer_collections,
            full=full,
        )
        sid = initiator.req.session_id
        t = threading.Thread(target=initiator.run, name=f"session-{sid[:8]}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return initiator.progress.snapshot()

    def _initiator(
        self,
        *,
        peer: str,
        purpose: str,
        mode: int,
        collections: frozenset[str],
        peer_collections: frozenset[str],
        full: bool,
    ) -> Initiator:
        if peer == self.province:
            raise PolicyRefused("a node cannot reconcile with itself")
        stub = self.peer_stub(peer)
        count_only = mode == common_pb2.MODE_COUNT_ONLY
        # The node's own policy binds it as initiator too: what the peer may learn.
        pp = self.policy.current().check_session(peer, purpose, count_only)
        # Mutual runs over everything the policy allows keep state, for incremental runs
        # and online checks; filtered or count-only runs are one-offs with fresh keys.
        sync = not count_only and not collections and not peer_collections
        planner = None
        if not sync:  # (collections not open to the peer are refused now, not in the session)
            check_collections(pp, collections)
            planner = partial(one_off_plan, self.store, pp, collections, labelled=not count_only)
        sid = str(uuid.uuid4())
        salt = self.current_salt
        self.store.sessions.begin(sid, peer, "initiator", mode, purpose, salt.epoch)
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
        return Initiator(
            province=self.province,
            request=SessionRequest(sid, peer, purpose, mode, peer_collections, sync, full),
            planner=planner,
            stub=stub,
            store=self.store,
            pool=self.pool,
            salt=salt,
            progress=progress,
            chunk_values=self.config.chunk_values,
            max_set_size=pp.max_set_size,
            deadlines=Deadlines(self.config.call_deadline, self.config.session_deadline),
            audit=self.audit,
            pair_lock=self.pair_lock(peer) if sync else None,
            peer_policy=pp,
            budget=self.budget,
        )

    def close(self) -> None:
        self._health_stop.set()
        self.metrics.close()
        self.checker.close()
        self.probes.log.flush()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=5)
        for _, ch in self._channels.values():
            ch.close()
        for ch in self._retired_channels:
            ch.close()
        if self._own_pool:
            self.pool.close()
        self.store.close()


def _key_files(config: NodeConfig) -> list[Path]:
    return [p for p in (config.master_key, config.seal_key) if p is not None and p.exists()]


def check_node_files(config: NodeConfig) -> None:
    """Refuse to start, naming the file and the chmod to run, when the store (or its
    WAL/SHM) or a key file can be read by others."""
    for path in (config.tls.key, config.log_key, *_key_files(config)):
        check_private_file(path)
    for suffix in ("", "-wal", "-shm"):
        files.check_private(config.store.with_name(config.store.name + suffix), "store file")


def retire_epoch(config: NodeConfig, epoch: int) -> None:
    """Destroy an epoch's salt on this node and log it (the node may be running)."""
    SaltRing(config.salt_dir).retire(epoch, current=config.current_epoch)
    store = Store(config.store, config.master_key)
    try:
        erased = store.destroy_epoch(epoch)
        log.info("epoch %d: pair keys and tag state destroyed, %d match tags erased", epoch, erased)
        audit = AuditLog(store, load_log_signer(config.log_key), config.province, {})
        audit.record_epoch_retired(epoch)
    finally:
        store.close()
    log.info("epoch %d retired on node %s", epoch, config.province)


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
        x25519_ok = ready and backends.STATUS.healthy
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
