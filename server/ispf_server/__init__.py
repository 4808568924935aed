"""An ISPF Match province node: registry store, session engine, gRPC services."""

from ispf.nodeconfig import NodeConfig, PeerConfig, load_config
from ispf_server.node import Node, create_server

__all__ = ["Node", "NodeConfig", "PeerConfig", "create_server", "load_config"]
