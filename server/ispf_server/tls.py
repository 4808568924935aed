"""Mutual-TLS credentials for the node's server and its calls to peers.

The node's certificate and key are re-read when their files change, so a
certificate can be rotated without downtime: new TLS handshakes (server side)
and new sessions (client side) use the new pair; calls in flight finish on the
old one. A new pair that does not load, or whose key does not match its
certificate, is refused and the old pair stays in use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ispf.errors import ConfigError
from ispf.identity import node_hostname
from ispf.keys import check_private_file
from ispf.nodeconfig import TlsConfig

log = logging.getLogger(__name__)


def _read(path: Path) -> bytes:
    """A TLS file's bytes; ConfigError naming it where it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file (a node needs the forum's ca.pem and the certificate "
            "`ispf forum sign` issued for its request, beside node.key: docs/operators.md, "
            "section 2)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None


@dataclass(frozen=True)
class TlsMaterial:
    ca: bytes
    cert: bytes
    key: bytes
    serial: int

    @classmethod
    def load(cls, cfg: TlsConfig) -> TlsMaterial:
        check_private_file(cfg.key)
        ca, cert_pem, key_pem = _read(cfg.ca), _read(cfg.cert), _read(cfg.key)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as exc:
            raise ConfigError(f"{cfg.cert} or {cfg.key} is not a PEM certificate/key") from exc
        raw = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if cert.public_key().public_bytes(der, raw) != key.public_key().public_bytes(der, raw):
            raise ConfigError(f"{cfg.key} is not the key of the certificate {cfg.cert}")
        return cls(ca=ca, cert=cert_pem, key=key_pem, serial=cert.serial_number)

    def __repr__(self) -> str:
        return f"TlsMaterial(serial={self.serial:x}, <secret>)"

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def server_config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], self.ca)


class TlsFiles:
    """The node's TLS material, reloaded from its files when they change."""

    def __init__(self, cfg: TlsConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._material = TlsMaterial.load(cfg)
        self._stamp = self._stat()
        self._served_serial = self._material.serial

    def _stat(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in (self.cfg.ca, self.cfg.cert, self.cfg.key))

    def current(self) -> TlsMaterial:
        with self._lock:
            try:
                stamp = self._stat()
            except FileNotFoundError:
                return self._material
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    new = TlsMaterial.load(self.cfg)
                except (ConfigError, OSError) as exc:
                    msg = exc.message if isinstance(exc, ConfigError) else str(exc)
                    log.error("new TLS certificate refused, keeping the current one: %s", msg)
                    return self._material
                if new.serial != self._material.serial:
                    log.info(
                        "TLS certificate rotated: serial %x -> %x",
                        self._material.serial,
                        new.serial,
                    )
                self._material = new
            return self._material

    def server_credentials(self) -> grpc.ServerCredentials:
        def fetch() -> grpc.ServerCertificateConfiguration | None:
            material = self.current()
            if material.serial == self._served_serial:
                return None  # unchanged
            self._served_serial = material.serial
            return material.server_config()

        # gRPC calls `fetch` before each handshake; None means "unchanged" (the
        # stubs' annotation omits that case).
        return grpc.dynamic_ssl_server_credentials(
            self._material.server_config(),
            cast(Callable[[], grpc.ServerCertificateConfiguration], fetch),
            require_client_authentication=True,
        )


def channel_options(province: str, max_message_bytes: int) -> list[tuple[str, object]]:
    """Verify the peer's certificate names `province`, whatever address it is reached at."""
    return [
        ("grpc.ssl_target_name_override", node_hostname(province)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
    ]
