"""An ISPF Match province node: registry store, session engine, gRPC services.

`Node` and `create_server` load on first use, so importing one part of the node
(`ispf_server.storage`, say) does not load all of it.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ispf.nodeconfig import NodeConfig, PeerConfig, load_config

if _TYPE_CHECKING:
    from ispf_server.node import Node, create_server

__all__ = ["Node", "NodeConfig", "PeerConfig", "create_server", "load_config"]


def __getattr__(name: str) -> _Any:
    if name in ("Node", "create_server"):
        from ispf_server import node

        value = globals()[name] = getattr(node, name)  # (once: a plain name after)
        return value
    raise AttributeError(f"module 'ispf_server' has no attribute {name!r}")
