"""Who may call what, and errors to gRPC status: both in this one interceptor.

Every handler is wrapped so that (1) the caller's certificate role is checked
against the service before any handler code runs, and (2) an `IspfError`
becomes its gRPC status with the class name in trailing metadata, while any
other exception becomes INTERNAL with no detail (it is logged here instead).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc

from ispf import logs
from ispf.errors import (
    ERROR_TYPE_KEY,
    InvalidInput,
    IspfError,
    PermissionDenied,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
)
from ispf.identity import ROLE_AUDIT, ROLE_INTERNAL, ROLE_NODE, Identity, identity_from_pem
from ispf.peertext import untrusted_id
from ispf_server.metrics import NodeMetrics
from ispf_server.revocation import RevocationList

log = logging.getLogger(__name__)

ANY_ROLE = frozenset({ROLE_NODE, ROLE_INTERNAL, ROLE_AUDIT})
# Service -> roles allowed. An internal certificate is accepted only by its own province's node.
ACCESS: dict[str, frozenset[str]] = {
    "ispf.v1.PeerService": frozenset({ROLE_NODE}),
    "ispf.v1.RegistryService": frozenset({ROLE_INTERNAL}),
    "ispf.v1.ReconciliationService": frozenset({ROLE_INTERNAL}),
    "ispf.v1.CheckService": frozenset({ROLE_INTERNAL}),
    "ispf.v1.AuditService": frozenset({ROLE_AUDIT, ROLE_INTERNAL}),
    "grpc.health.v1.Health": ANY_ROLE,
    "grpc.reflection.v1alpha.ServerReflection": ANY_ROLE,
    "grpc.reflection.v1.ServerReflection": ANY_ROLE,
}
# Services a node whose own log failed its self-check stops serving.
HELD = frozenset({"ispf.v1.PeerService", "ispf.v1.ReconciliationService", "ispf.v1.CheckService"})


def caller_identity(context: grpc.ServicerContext) -> Identity:
    """The caller's identity, from the verified TLS client certificate."""
    auth = context.auth_context()
    pems: bytes | list[bytes] = auth.get("x509_pem_cert") or []
    ident = identity_from_pem(pems[0]) if isinstance(pems, list) and pems else None
    if ident is None:
        raise Unauthenticated("no forum client certificate with a role was presented")
    return ident


def _caller_sha256(context: grpc.ServicerContext) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    pems: bytes | list[bytes] = context.auth_context().get("x509_pem_cert") or []
    if not isinstance(pems, list) or not pems:
        return ""
    cert = x509.load_pem_x509_certificate(pems[0])
    return cert.fingerprint(hashes.SHA256()).hex()


def abort_with(context: grpc.ServicerContext, err: IspfError) -> NoReturn:
    extra = err.metadata() if isinstance(err, RateLimited) else ()
    context.set_trailing_metadata(((ERROR_TYPE_KEY, type(err).__name__), *extra))
    context.abort(err.code, err.message)
    raise AssertionError("unreachable")  # pragma: no cover


def _internal(context: grpc.ServicerContext, method: str) -> None:
    if cast(Any, context).code() not in (None, grpc.StatusCode.OK):
        raise  # the handler aborted on purpose: keep its status
    if not context.is_active():
        log.info("%s: the caller went away (cancelled, deadline or connection lost)", method)
        # End the call as aborted: returning would hand gRPC no response, which it then
        # fails to serialise and logs as a traceback ("Exception serializing message!").
        context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, "internal error (see the node log)")


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


def _decoder(deserialize: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    """Parse request bytes here, so a malformed message is INVALID_ARGUMENT, not INTERNAL."""

    def decode(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or worse from hostile bytes
            raise InvalidInput(f"malformed request message for {method}") from exc

    return decode


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == logs.REQUEST_ID_KEY:
            text = value if isinstance(value, str) else value.decode("ascii", "replace")
            if 0 < len(text) <= 64 and untrusted_id(text) == text:
                return text
    return logs.new_request_id()


# Calls that stream into this node from one peer, open at once. Each holds one of the
# server's threads for as long as the peer keeps its stream open, so without a bound
# one peer that opens streams and never sends could hold every thread and starve the
# other provinces (seven peers at 8 each leave the pool of 64 room for the province's
# own systems). An honest peer holds one or two per session.
MAX_PEER_STREAMS = 8


class Guard(_Interceptor):
    """Authorises every call by certificate role and revocation, and maps errors to status."""

    def __init__(
        self,
        province: str,
        revoked: RevocationList,
        metrics: NodeMetrics | None = None,
        pinned: Mapping[str, str] | None = None,
        hold: Callable[[], None] | None = None,
    ) -> None:
        self.province = province
        self.revoked = revoked
        self.metrics = metrics
        # Node certificates' SHA-256 by province, from the forum's signed roster: a
        # peer must present the very certificate the roster names (not merely one the
        # CA signed), so whoever holds the CA key cannot pose as a province.
        self.pinned = pinned
        # Raises while the node must not serve sessions, probes or checks (its own log
        # failed its self-check); the audit API and health stay open.
        self.hold = hold
        self._streams: dict[str, int] = {}
        self._streams_lock = threading.Lock()

    @contextmanager
    def _stream_slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        """One of a peer's `MAX_PEER_STREAMS`, for a call that streams in from it."""
        ident = caller_identity(context)
        if ident.role != ROLE_NODE:
            yield
            return
        with self._streams_lock:
            held = self._streams.get(ident.province, 0)
            if held >= MAX_PEER_STREAMS:
                raise ResourceExhausted(
                    f"{ident.province} already has {held} calls streaming into this node "
                    "(the most a peer may have open at once)"
                )
            self._streams[ident.province] = held + 1
        try:
            yield
        finally:
            with self._streams_lock:
                self._streams[ident.province] -= 1

    @contextmanager
    def _served(
        self, service: str, method: str, context: grpc.ServicerContext, streams_in: bool = False
    ) -> Iterator[None]:
        """Around every handler: request id, authorisation, error to status, latency."""
        start, code = time.perf_counter(), "OK"
        with logs.bound(request_id=_request_id(context)), contextlib.ExitStack() as stack:
            try:
                self._authorize(service, context)
                if streams_in:
                    stack.enter_context(self._stream_slot(context))
                yield
            except IspfError as err:
                code = err.code.name
                abort_with(context, err)
            except Exception:
                code = "INTERNAL"
                _internal(context, method)
            finally:
                if self.metrics is not None:
                    self.metrics.rpc.labels(method, code).observe(time.perf_counter() - start)

    def _authorize(self, service: str, context: grpc.ServicerContext) -> None:
        allowed = ACCESS.get(service)
        ident = caller_identity(context)
        if self.revoked.is_revoked(ident.serial):
            raise Unauthenticated(
                f"certificate {ident.serial:x} of {ident.name} ({ident.role}) is revoked"
            )
        if allowed is None or ident.role not in allowed:
            raise PermissionDenied(f"a certificate with role '{ident.role}' may not call {service}")
        if ident.role == ROLE_NODE and self.pinned is not None:
            pin = self.pinned.get(ident.province)
            if pin is None or _caller_sha256(context) != pin:
                raise Unauthenticated(
                    f"node certificate {ident.serial:x} of {ident.province} is not the one "
                    "the forum's roster names for it"
                )
        if ident.role == ROLE_INTERNAL and ident.province != self.province:
            raise PermissionDenied(
                f"internal API of node {self.province} refused to {ident.role} certificate "
                f"of {ident.province}"
            )
        if self.hold is not None and service in HELD:
            self.hold()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        service = method.split("/")[1] if method.count("/") == 2 else method
        h = handler
        decode = _decoder(h.request_deserializer, method)

        def parsed(request: Any, stream_in: bool) -> Any:
            return (decode(r) for r in request) if stream_in else decode(request)

        served = self._served

        def unary(behaviour: Callable[[Any, grpc.ServicerContext], Any], stream_in: bool) -> Any:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                with served(service, method, context, stream_in):
                    return behaviour(parsed(request, stream_in), context)

            return run

        def streaming(
            behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]], stream_in: bool
        ) -> Any:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with served(service, method, context, stream_in):
                    yield from behaviour(parsed(request, stream_in), context)

            return run

        kw: dict[str, Any] = {
            "request_deserializer": None,
            "response_serializer": h.response_serializer,
        }
        if h.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(h.unary_unary, False), **kw)
        if h.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(h.stream_unary, True), **kw)
        if h.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(h.unary_stream, False), **kw)
        assert h.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(streaming(h.stream_stream, True), **kw)
