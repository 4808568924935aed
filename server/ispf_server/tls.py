"""Mutual-TLS credentials for the node's server and its calls to peers."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from ispf.identity import node_hostname
from ispf.keys import check_private_file
from ispf_server.config import TlsConfig


@dataclass(frozen=True)
class TlsMaterial:
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, cfg: TlsConfig) -> TlsMaterial:
        check_private_file(cfg.key)
        return cls(ca=cfg.ca.read_bytes(), cert=cfg.cert.read_bytes(), key=cfg.key.read_bytes())

    def __repr__(self) -> str:
        return "TlsMaterial(<secret>)"

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def channel_options(province: str, max_message_bytes: int) -> list[tuple[str, object]]:
    """Verify the peer's certificate names `province`, whatever address it is reached at."""
    return [
        ("grpc.ssl_target_name_override", node_hostname(province)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
    ]
