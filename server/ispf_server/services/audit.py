"""The audit API (audit role, or the province's own internal role): read-only."""

from __future__ import annotations

import grpc

from ispf.errors import InvalidInput, UnknownSession
from ispf.protocol import MAX_LOG_ENTRIES
from ispf.v1 import audit_pb2, audit_pb2_grpc
from ispf_server.audit import AuditLog


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.ServicerContext
    ) -> audit_pb2.Checkpoint:
        return audit_pb2.Checkpoint(note=self.audit.latest())

    def _size(self) -> int:
        return self.audit.size()

    def GetEntries(
        self, request: audit_pb2.GetEntriesRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetEntriesResponse:
        if request.end < request.start:
            raise InvalidInput("end must not be before start")
        size = len(self.audit.entries())  # entries may run ahead of a checkpoint
        if request.start > size:
            raise InvalidInput(f"start {request.start} is beyond the log's {size} entries")
        end = min(request.end, request.start + MAX_LOG_ENTRIES, size)
        return audit_pb2.GetEntriesResponse(entries=self.audit.entries(request.start, end))

    def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.Proof:
        size = self._size()
        if not request.index < request.tree_size <= size:
            raise InvalidInput(
                f"need index < tree_size <= {size} (the latest checkpoint's size); got "
                f"index {request.index}, tree_size {request.tree_size}"
            )
        return audit_pb2.Proof(hashes=self.audit.inclusion(request.index, request.tree_size))

    def GetConsistencyProof(
        self, request: audit_pb2.GetConsistencyProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.Proof:
        size = self._size()
        if not request.first <= request.second <= size:
            raise InvalidInput(
                f"need first <= second <= {size} (the latest checkpoint's size); got "
                f"{request.first} and {request.second}"
            )
        return audit_pb2.Proof(hashes=self.audit.consistency(request.first, request.second))

    def FindSession(
        self, request: audit_pb2.FindSessionRequest, context: grpc.ServicerContext
    ) -> audit_pb2.FindSessionResponse:
        idx = self.audit.index_of(request.session_id)
        if idx is None:
            raise UnknownSession("no entry for that session id in this log")
        return audit_pb2.FindSessionResponse(index=idx)

    def GetWitnessed(
        self, request: audit_pb2.GetWitnessedRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetWitnessedResponse:
        return audit_pb2.GetWitnessedResponse(
            checkpoints=[
                audit_pb2.WitnessedCheckpoint(peer=peer, note=signed)
                for peer, (_, signed) in sorted(self.audit.witnessed().items())
            ]
        )
