"""`ispf-node --config node.toml`: run a province node until SIGTERM/SIGINT.

`ispf-node --config node.toml --retire-epoch N` destroys epoch N's salt on this
node (and records it in the node's audit log), then exits; a running node
stops accepting that epoch at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from ispf import logs
from ispf.errors import IspfError
from ispf_server.config import load_config
from ispf_server.node import Node, create_server, retire_epoch

log = logging.getLogger("ispf_server")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ispf-node", description="Run an ISPF Match province node.")
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
        node = Node(load_config(args.config))
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
    server.start()
    log.info("node %s serving on port %d", node.province, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("node %s stopping", node.province)
    server.stop(grace=10).wait()
    node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
