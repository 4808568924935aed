"""`ispf-node --config node.toml`: run a province node until SIGTERM/SIGINT.

`ispf-node --config node.toml --retire-epoch N` destroys epoch N's salt on this
node (and records it in the node's audit log), then exits; a running node
stops accepting that epoch at once.

`ispf-node backup --config node.toml --to FILE --key backup.pub` writes a
consistent online copy of the store (SQLite's backup API; the node may be
running), sealed with HPKE to the operator's X25519 backup public key, 0600.
`ispf-node new-master-key --config node.toml` (node stopped) replaces the master
key and erases all pair state (after a leak of the key).
`ispf-node restore --config node.toml --from FILE --key backup.key` puts it back
(the node stopped, no store at the configured path). Key files are not in the
backup: the master key, TLS, log and sealing keys are backed up on their own.
`ispf-node migrate --from node.sqlite --to postgresql://...` moves a stopped node's
store into an empty PostgreSQL database (for replicas: docs/operations.md).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ispf import logs
from ispf.errors import ConfigError, IspfError
from ispf.nodeconfig import load_config
from ispf_server.backup import backup_store, restore_store
from ispf_server.node import Node, create_server, retire_epoch
from ispf_server.storage import Store

log = logging.getLogger("ispf_server")

NODE_EPILOG = """other commands (each with its own --help):
  ispf-node backup --config node.toml --to FILE --key backup.pub
                     a consistent online copy of the store, sealed to the
                     operator's backup key (0600); a SQLite store only (a
                     PostgreSQL one is backed up with pg_dump or pg_basebackup)
  ispf-node restore --config node.toml --from FILE --key backup.key
                     put a backup back (node stopped, no store there)
  ispf-node new-master-key --config node.toml
                     replace the master key and erase all pair state (node stopped;
                     every replica stopped, for a PostgreSQL store)
  ispf-node migrate --from node.sqlite --to postgresql://...
                     move the store into an empty PostgreSQL database, checked
                     (node stopped; the file is only read)

exit codes:
  0    stopped cleanly (SIGTERM/SIGINT), or the command's work was done
  2    did not start or the command failed: configuration, key or file problem,
       or the address is taken or not this machine's (one line says which)"""


def _backup_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"ispf-node {argv[0]}")
    ap.add_argument("--config", required=True, type=Path, help="the node's TOML config file")
    if argv[0] == "backup":
        ap.add_argument("--to", required=True, type=Path, help="the backup file to write (0600)")
        ap.add_argument("--key", required=True, type=Path, help="operator's backup public key")
    else:
        ap.add_argument("--from", dest="src", required=True, type=Path, help="the backup file")
        ap.add_argument("--key", required=True, type=Path, help="operator's backup private key")
    args = ap.parse_args(argv[1:])
    logs.configure("WARNING", "text")
    try:
        config = load_config(args.config)
        if argv[0] == "backup":
            size = backup_store(config, args.to, args.key)
            print(f"ispf-node: store backed up to {args.to} ({size} bytes, sealed, mode 0600)")
        else:
            restore_store(config, args.src, args.key)
            print(f"ispf-node: store restored to {config.store} from {args.src}")
    except IspfError as exc:
        print(f"ispf-node: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _migrate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ispf-node migrate",
        description="Move a node's store (registry, sessions, matches, pair state, audit "
        "log) from its SQLite file into an empty PostgreSQL database, and check the copy "
        "(row counts, the log's Merkle root against its latest signed checkpoint). The "
        "node must be stopped; the SQLite file is left as it was.",
    )
    ap.add_argument("--from", dest="src", required=True, type=Path, help="the node's store file")
    ap.add_argument("--to", dest="dst", required=True, help="postgresql://... of an empty database")
    args = ap.parse_args(argv[1:])
    logs.configure("WARNING", "text")
    from ispf_server.storage.db import SqliteDatabase, is_url, open_database
    from ispf_server.storage.transfer import check_store_file, copy_store

    try:
        if not args.src.is_file():
            raise ConfigError(f"no store file at {args.src}")
        if not is_url(args.dst):
            raise ConfigError("--to must be a postgresql:// URL of an empty database")
        check_store_file(args.src)
        lock = _lock_store(args.src)  # (a running node would go on writing the file)
        src = SqliteDatabase(args.src, read_only=True)
        try:
            dst = open_database(args.dst)
            try:
                done = copy_store(src, dst)
                where = dst.location
            finally:
                dst.close()
        finally:
            src.close()
            os.close(lock)
    except IspfError as exc:
        print(f"ispf-node: {exc.message}", file=sys.stderr)
        return 2
    checkpoint = (
        f"the root its latest checkpoint (size {done.checkpoint_size}) signed, recomputed "
        "and equal (the signature itself is the auditor's to check: ispf audit verify)"
        if done.checkpoint_size is not None
        else "no checkpoint signed yet"
    )
    print(
        f"ispf-node: store moved to {where}: {done.rows['records']} records, "
        f"{done.rows['sessions']} sessions, {done.rows['matches']} match rows, "
        f"{sum(done.rows.values())} rows in all; audit log of {done.log_size} entries, "
        f"root {done.log_root.hex()[:16]}..., {checkpoint}.\n"
        "Next: in node.toml, delete the `store = ...` line and add a [store] table with "
        "url = ... at the end of the file (see docs/operations.md, Replicas); keep "
        "master.key, the salts and log.key; "
        f"keep {args.src} until the node has run on the database."
    )
    return 0


def _new_master_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ispf-node new-master-key")
    ap.add_argument("--config", required=True, type=Path, help="the node's TOML config file")
    args = ap.parse_args(argv[1:])
    logs.configure("WARNING", "text")
    try:
        config = load_config(args.config)
        store = Store(config.store, config.master_key, url=config.store_url)
        try:
            if n := store.other_replicas():
                raise ConfigError(
                    f"other replicas of this node are running over its store ({n}): "
                    "stop every replica first (they hold the old master key in "
                    "memory), then replace the key, copy the new master.key to every "
                    "replica's folder, and start them"
                )
            pairs = store.pairs.replace_master_key()
        finally:
            store.close()
    except IspfError as exc:
        print(f"ispf-node: {exc.message}", file=sys.stderr)
        return 2
    print(
        f"ispf-node: new master key in {config.master_key}; pair state of {pairs} pairs "
        "erased (the next run with each peer is full)"
    )
    return 0


def _lock_store(store: Path) -> int:
    """One serving node per store: two would both append to one audit log and fork it.

    The lock is an exclusive `flock` on `<store>.lock` (0600), released by the kernel
    when the process ends, however it ends; backups and other tools do not take it."""
    path = store.with_name(store.name + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"the store {store} is in use by another ispf-node (it holds {path}): stop that "
            "node first, or give this one its own store"
        ) from None
    return fd


def check_listen(address: str) -> None:
    """Bind the node's address once before anything starts, so a taken or foreign
    address is one line naming it (ConfigError), not a half-started node and
    gRPC's own log. Port 0 (any free port) always binds."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(
            f"listen address {address!r} is not host:port (check `listen` in node.toml)"
        )
    host = host.strip("[]")
    port = int(port_text)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        raise ConfigError(
            f"cannot listen on {address}: {host!r} is not a name or address this machine "
            "can resolve (check `listen` in node.toml)"
        ) from None
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as gRPC binds)
        try:
            probe.bind(where)
        except OSError as exc:
            why = (
                "the address is in use by another process"
                if exc.errno == errno.EADDRINUSE
                else "it is not an address of this machine"
                if exc.errno == errno.EADDRNOTAVAIL
                else exc.strerror or str(exc)
            )
            raise ConfigError(
                f"cannot listen on {address}: {why} (check `listen` in node.toml)"
            ) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("backup", "restore"):
        return _backup_main(argv)
    if argv and argv[0] == "new-master-key":
        return _new_master_main(argv)
    if argv and argv[0] == "migrate":
        return _migrate_main(argv)
    ap = argparse.ArgumentParser(
        prog="ispf-node",
        description="Run an ISPF Match province node.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=NODE_EPILOG,
    )
    ap.add_argument("--config", required=True, type=Path, help="the node's TOML config file")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ap.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one object per line, for log collectors",
    )
    ap.add_argument(
        "--retire-epoch", type=int, metavar="N", help="destroy epoch N's salt on this node and exit"
    )
    args = ap.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        if args.retire_epoch is not None:
            retire_epoch(load_config(args.config), args.retire_epoch)
            print(f"ispf-node: epoch {args.retire_epoch} retired: its salt is destroyed")
            return 0
        config = load_config(args.config)
        if not config.store_url:  # (replicas of a PostgreSQL store coordinate in it)
            _lock_store(config.store)  # (the descriptor stays open: the lock is held until exit)
        check_listen(config.listen)
        node = Node(config)
    except IspfError as exc:
        print(f"ispf-node: {exc.message}", file=sys.stderr)
        return 2
    try:
        server, port = create_server(node)
    except IspfError as exc:
        node.close()
        print(f"ispf-node: {exc.message}", file=sys.stderr)
        return 2
    if node.config.metrics_listen:
        try:
            node.metrics.serve(node.config.metrics_listen)
        except IspfError as exc:
            node.close()
            print(f"ispf-node: {exc.message}", file=sys.stderr)
            return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    problems = node.health.readiness()
    if problems:
        log.error(
            "node %s is listening on port %d but NOT ready (health NOT_SERVING) until fixed: %s",
            node.province,
            port,
            "; ".join(problems),
        )
    else:
        log.info("node %s serving on port %d", node.province, port)
    stop.wait()
    log.info("node %s stopping", node.province)
    server.stop(grace=10).wait()
    node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
