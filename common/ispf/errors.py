"""The one error hierarchy of ISPF Match, each class carrying its gRPC status.

::

    IspfError                      INTERNAL
    ├── InvalidInput               INVALID_ARGUMENT
    │   ├── InvalidNationalId
    │   ├── InvalidRecord
    │   └── InvalidBlindedValue
    ├── ProofError                 INVALID_ARGUMENT  (a Merkle proof does not verify)
    ├── ProtocolViolation          INVALID_ARGUMENT  (a peer broke the session protocol)
    ├── NotFound                   NOT_FOUND
    │   ├── UnknownSession
    │   └── UnknownPeer
    ├── PreconditionFailed         FAILED_PRECONDITION
    │   ├── SaltMismatch
    │   ├── UnknownEpoch
    │   ├── VersionMismatch
    │   ├── LogTampered            (this node's own log disagrees with its last checkpoint)
    │   ├── ForkDetected           (a peer's new checkpoint does not extend the one seen)
    │   └── ConfigError
    │       ├── KeyFileError
    │       ├── SealedFileError    (a sealed salt or backup for another node/epoch, or altered)
    │       └── BackendUnavailable (the X25519 backend asked for cannot run here)
    ├── PermissionDenied           PERMISSION_DENIED
    │   └── PolicyRefused
    ├── Unauthenticated            UNAUTHENTICATED
    ├── ResourceExhausted          RESOURCE_EXHAUSTED
    │   ├── StorageFull            (the node's disk is full: nothing was stored)
    │   ├── RateLimited            (probe rate limit or daily quota; says when to retry)
    │   └── BudgetExhausted        (a peer's query budget for the epoch is spent)
    ├── SessionAborted             ABORTED
    │   └── ResultMismatch
    ├── PeerUnavailable            UNAVAILABLE
    │   └── RetryLater             (busy, or state to rebuild: try again shortly)
    │       ├── CompactionAbandoned (a pair's compaction given up: changed, or stopping)
    │       ├── StagingLost        (a pair's staged runs not all there at its commit)
    │       └── StoreUnavailable   (the node's PostgreSQL database cannot be reached)
    ├── DeadlineExceeded           DEADLINE_EXCEEDED
    ├── SelfCheckFailed            INTERNAL  (the X25519 backend disagreed with cryptography)
    ├── EntryError                 INTERNAL  (an audit-log entry is not canonical log data)
    ├── NoteError                  INTERNAL  (a signed note or key is malformed or unverified)
    ├── AuditFailure               INTERNAL  (an auditor found a log failing verification)
    ├── RepeatedKey                INTERNAL  (a sorted stream holds a key twice: the general
    │                                         path runs; caught inside the node, never sent)
    └── NotPacked                  INTERNAL  (the registry holds an ID not 13 digits, which
                                              the loader never stores: a session fails)

The server translates these to gRPC status in one interceptor
(`ispf_server.guard`); the client turns a status back into the same class in
one place (`ispf.errors.from_rpc_error`). Messages never contain an ID number,
a salt or a key: they say what was wrong and where (a position, a field).
"""

from __future__ import annotations

from pathlib import Path

import grpc

from ispf.peertext import untrusted

ERROR_TYPE_KEY = "ispf-error-type"
RETRY_AFTER_KEY = "ispf-retry-after-ms"
LIMIT_KEY = "ispf-limit-per-minute"


class IspfError(Exception):
    """Base class. `code` is the gRPC status a server answers with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(IspfError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidNationalId(InvalidInput):
    """An identity number that is not a valid 13-digit CNIC/CRC/NICOP number.

    `reason_code` is machine-readable (`nid.length`, `nid.non_digit`, ...).
    """

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class InvalidRecord(InvalidInput):
    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class InvalidBlindedValue(InvalidInput):
    pass


class ProofError(IspfError):
    """A Merkle proof does not verify, or cannot be made for the sizes asked."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ProtocolViolation(IspfError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(IspfError):
    code = grpc.StatusCode.NOT_FOUND


class UnknownSession(NotFound):
    pass


class UnknownPeer(NotFound):
    pass


class PreconditionFailed(IspfError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class SaltMismatch(PreconditionFailed):
    pass


class UnknownEpoch(PreconditionFailed):
    pass


class VersionMismatch(PreconditionFailed):
    pass


class LogTampered(PreconditionFailed):
    """The node's own audit log does not match the last checkpoint it signed.

    Found by the node's self-check at start-up; it serves no session, probe or
    check until the store is restored (the audit API stays open to auditors).
    """


class ForkDetected(PreconditionFailed):
    """A peer's new checkpoint is not consistent with the one seen before."""


class ConfigError(PreconditionFailed):
    pass


class KeyFileError(ConfigError):
    pass


class SealedFileError(ConfigError):
    """A sealed file (salt, backup) that is not for this node, forum or epoch, or that
    does not open: refused, with which of these it is."""


class BackendUnavailable(ConfigError):
    """The requested backend cannot be used here; the message says why."""


class PermissionDenied(IspfError):
    code = grpc.StatusCode.PERMISSION_DENIED


class PolicyRefused(PermissionDenied):
    pass


class Unauthenticated(IspfError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(IspfError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StorageFull(ResourceExhausted):
    pass


class RateLimited(ResourceExhausted):
    """A peer's probe limit refused the request; nothing was looked up.

    `retry_after` (seconds) is when the same request may be accepted, and
    `per_minute` the limit, so a caller can pace itself. Both travel as
    trailing metadata (`RETRY_AFTER_KEY`, `LIMIT_KEY`) and are numbers only.
    """

    def __init__(self, message: str, *, retry_after: float = 0.0, per_minute: int = 0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.per_minute = per_minute

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            (RETRY_AFTER_KEY, str(max(0, round(self.retry_after * 1000)))),
            (LIMIT_KEY, str(max(0, self.per_minute))),
        )


class BudgetExhausted(ResourceExhausted):
    """A peer submitted as many values as its per-epoch query budget allows."""


class SessionAborted(IspfError):
    code = grpc.StatusCode.ABORTED


class ResultMismatch(SessionAborted):
    pass


class PeerUnavailable(IspfError):
    code = grpc.StatusCode.UNAVAILABLE


class RetryLater(PeerUnavailable):
    """Not now: the pair is busy with another session, or its state must be rebuilt."""


class CompactionAbandoned(RetryLater):
    """A pair's compaction given up (the pair changed under it, or the node is
    stopping): its state is left as it was, and a later run compacts it."""


class StagingLost(RetryLater):
    """A pair's staged runs were not all there when they were to become its state
    (another writer of the pair dropped or wrote into them): nothing was made
    current, and the run is tried again."""


class StoreUnavailable(RetryLater):
    """The node's database (PostgreSQL) cannot be reached: nothing of the request was
    stored; another replica, or this one once the database is back, can answer it."""


class DeadlineExceeded(IspfError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class SelfCheckFailed(IspfError):
    """A spot check recomputed an X25519 output with `cryptography` and got another
    value: the batch is not trusted and the backend is marked unhealthy."""


class EntryError(IspfError):
    """An entry is not valid canonical log data."""


class NoteError(IspfError):
    """A note or key is malformed, or no trusted signature verifies."""


class AuditFailure(IspfError):
    """A log failed verification. `kind` names what was found; `evidence` is a file."""

    def __init__(self, node: str, kind: str, message: str, evidence: Path | None = None) -> None:
        super().__init__(f"{node}: {kind}: {message}")
        self.node = node
        self.kind = kind
        self.evidence = evidence


class RepeatedKey(IspfError):
    """A sorted stream holds a key twice (`ispf_server.records`): the caller's general
    path runs. Caught inside the node (it never reaches a peer)."""

    def __init__(self, message: str = "a sorted stream holds a key twice") -> None:
        super().__init__(message)


class NotPacked(IspfError):
    """The registry holds an ID that is not 13 digits, so a session cannot plan it: the
    loader canonicalises every ID it stores, so only a store written around it
    does. The session fails with this; the message names no ID."""

    def __init__(
        self,
        message: str = "the registry holds an ID that is not 13 digits (a store written "
        "around the loader): reload the registry with `ispf registry sync`",
    ) -> None:
        super().__init__(message)


def _all_subclasses(cls: type[IspfError]) -> list[type[IspfError]]:
    out: list[type[IspfError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_BY_NAME: dict[str, type[IspfError]] = {c.__name__: c for c in _all_subclasses(IspfError)}
_BY_CODE: dict[grpc.StatusCode, type[IspfError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ABORTED: SessionAborted,
    grpc.StatusCode.UNAVAILABLE: PeerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(err: grpc.RpcError) -> IspfError:
    """Translate a failed call back into the class the server raised."""
    code: grpc.StatusCode = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    # (The details are the other side's text: a peer's, on a node's outbound calls.)
    details = untrusted((err.details() if isinstance(err, grpc.Call) else None) or "", 1000)
    details = details or code.name
    name = None
    numbers: dict[str, int] = {}
    if isinstance(err, grpc.Call):
        for key, value in err.trailing_metadata() or ():
            text = value if isinstance(value, str) else value.decode("ascii", "replace")
            if key == ERROR_TYPE_KEY:
                name = text
            elif key in (RETRY_AFTER_KEY, LIMIT_KEY) and text.isdigit() and len(text) <= 9:
                numbers[key] = int(text)  # numbers only: a peer's text is never trusted
    cls = _BY_NAME.get(name or "") or _BY_CODE.get(code, IspfError)
    if cls in (InvalidNationalId, InvalidRecord):
        return cls("remote", details)
    if cls is RateLimited:
        limited = RateLimited(
            details,
            retry_after=numbers.get(RETRY_AFTER_KEY, 0) / 1000.0,
            per_minute=numbers.get(LIMIT_KEY, 0),
        )
        limited.code = code
        return limited
    out = cls(details)
    out.code = code
    return out
