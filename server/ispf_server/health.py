"""Whether the node may serve: its store, current salt, key files, policy and log,
checked at start (`check_node_files`) and while it runs (`Health`)."""

from __future__ import annotations

import logging
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from ispf import files
from ispf.errors import IspfError
from ispf.keys import check_private_file
from ispf.nodeconfig import NodeConfig
from ispf_server.audit import AuditLog
from ispf_server.metrics import NodeMetrics
from ispf_server.salts import SaltRing
from ispf_server.storage import Store

log = logging.getLogger(__name__)


class Health:
    def __init__(
        self,
        config: NodeConfig,
        store: Store,
        salts: SaltRing,
        audit: AuditLog,
        metrics: NodeMetrics,
    ) -> None:
        self.config = config
        self.store = store
        self.salts = salts
        self.audit = audit
        self.metrics = metrics
        self._stop = threading.Event()

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

    def watch(self, set_status: Callable[[bool], None], every: float = 5.0) -> None:
        """Report readiness to the health service now and every `every` seconds."""

        was_ready = [True]

        def once() -> None:
            problems = self.readiness()
            self.metrics.ready.set(0 if problems else 1)
            if problems:
                log.error("node %s not ready: %s", self.config.province, "; ".join(problems))
            elif not was_ready[0]:
                log.warning("node %s ready again", self.config.province)
            was_ready[0] = not problems
            set_status(not problems)

        def loop() -> None:
            while not self._stop.wait(every):
                once()

        once()
        threading.Thread(target=loop, name=f"health-{self.config.province}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def _key_files(config: NodeConfig) -> list[Path]:
    return [p for p in (config.master_key, config.seal_key) if p is not None and p.exists()]


def check_node_files(config: NodeConfig) -> None:
    """Refuse to start, naming the file and the chmod to run, when the store (or its
    WAL/SHM) or a key file can be read by others."""
    for path in (config.tls.key, config.log_key, *_key_files(config)):
        check_private_file(path)
    if config.store_url:
        return  # (the store is a PostgreSQL database: its files are the server's)
    for suffix in ("", "-wal", "-shm"):
        files.check_private(config.store.with_name(config.store.name + suffix), "store file")
