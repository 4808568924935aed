"""The peer API (node role only): sessions answered by this node."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from ispf import logs
from ispf.errors import ProtocolViolation
from ispf.peertext import untrusted_id
from ispf.v1 import peer_pb2, peer_pb2_grpc
from ispf_server.guard import caller_identity
from ispf_server.probes import ProbeAnswerer
from ispf_server.session.exchange import SESSION_KEY
from ispf_server.session.responder import Responder


def _session_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == SESSION_KEY:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    raise ProtocolViolation(f"streaming call without '{SESSION_KEY}' metadata")


class PeerServicer(peer_pb2_grpc.PeerServiceServicer):
    def __init__(self, responder: Responder, probes: ProbeAnswerer) -> None:
        self.r = responder
        self.probes = probes

    def Handshake(
        self, request: peer_pb2.HandshakeRequest, context: grpc.ServicerContext
    ) -> peer_pb2.HandshakeResponse:
        with logs.bound(session_id=untrusted_id(request.session_id)):
            return self.r.handshake(request, caller_identity(context).province)

    def Reblind(
        self, request_iterator: Iterator[peer_pb2.BlindedChunk], context: grpc.ServicerContext
    ) -> Iterator[peer_pb2.BlindedChunk]:
        return self.r.reblind(
            request_iterator, _session_id(context), caller_identity(context).province
        )

    def FetchBlinded(
        self, request: peer_pb2.FetchRequest, context: grpc.ServicerContext
    ) -> Iterator[peer_pb2.BlindedChunk]:
        return self.r.fetch(request, caller_identity(context).province)

    def ReturnTags(
        self, request_iterator: Iterator[peer_pb2.BlindedChunk], context: grpc.ServicerContext
    ) -> peer_pb2.ReturnTagsResponse:
        return self.r.return_tags(
            request_iterator, _session_id(context), caller_identity(context).province
        )

    def Conclude(
        self, request: peer_pb2.ConcludeRequest, context: grpc.ServicerContext
    ) -> peer_pb2.ConcludeResponse:
        with logs.bound(session_id=untrusted_id(request.session_id)):
            return self.r.conclude(request, caller_identity(context).province)

    def Witness(
        self, request: peer_pb2.WitnessRequest, context: grpc.ServicerContext
    ) -> peer_pb2.WitnessResponse:
        return self.r.witness(request, caller_identity(context).province)

    def GetSyncState(
        self, request: peer_pb2.SyncStateRequest, context: grpc.ServicerContext
    ) -> peer_pb2.SyncState:
        return self.r.sync_state(request, caller_identity(context).province)

    def Probe(
        self, request: peer_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> peer_pb2.ProbeResponse:
        return self.probes.probe(
            request, caller_identity(context).province, context.time_remaining()
        )

    def Abort(
        self, request: peer_pb2.AbortRequest, context: grpc.ServicerContext
    ) -> peer_pb2.AbortResponse:
        return self.r.abort(request, caller_identity(context).province)
