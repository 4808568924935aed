"""The node's peers: their addresses (roster, then the config's overrides) and one
channel to each, renewed when the node's certificate rotates."""

from __future__ import annotations

import threading

import grpc

from ispf.errors import UnknownPeer
from ispf.v1 import peer_pb2_grpc
from ispf_server.tls import TlsFiles, channel_options


class PeerChannels:
    def __init__(
        self, province: str, addresses: dict[str, str], tls: TlsFiles, max_message_bytes: int
    ) -> None:
        self.province = province
        self.addresses = addresses
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[int, grpc.Channel]] = {}
        self._retired: list[grpc.Channel] = []

    def names(self) -> list[str]:
        return sorted(self.addresses)

    def stub(self, peer: str) -> peer_pb2_grpc.PeerServiceStub:
        """A stub on a channel to the peer, made with the node's current certificate."""
        material = self.tls.current()
        with self._lock:
            address = self.addresses.get(peer)
            if address is None:
                raise UnknownPeer(
                    f"peer '{peer}' is not configured on node {self.province} "
                    f"(known: {', '.join(sorted(self.addresses)) or 'none'})"
                )
            serial, ch = self._channels.get(peer, (None, None))
            if ch is None or serial != material.serial:
                if ch is not None:  # rotated: calls in flight finish on the old channel
                    self._retired.append(ch)
                ch = grpc.secure_channel(
                    address,
                    material.channel_credentials(),
                    options=channel_options(peer, self.max_message_bytes),
                )
                self._channels[peer] = (material.serial, ch)
        return peer_pb2_grpc.PeerServiceStub(ch)

    def close(self) -> None:
        with self._lock:
            channels = [ch for _, ch in self._channels.values()] + self._retired
        for ch in channels:
            ch.close()
