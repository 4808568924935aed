"""Client SDK for a province's own systems: talks to its own node's internal API.

Every call has a deadline; every failure is raised as the `ispf.errors` class
the node raised (translated here, in one place).
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc

from ispf.errors import ConfigError, DeadlineExceeded, PeerUnavailable, from_rpc_error
from ispf.identity import node_hostname
from ispf.keys import check_private_file
from ispf.retry import Backoff
from ispf.v1 import audit_pb2, audit_pb2_grpc, common_pb2, internal_pb2, internal_pb2_grpc

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_TIMEOUT = 60.0
SESSION_BACKOFF = Backoff(attempts=4, base=1.0, cap=30.0)
MAX_MESSAGE = 64 * 1024 * 1024
DEFAULT_TIME_ZONE = "Asia/Karachi"


@dataclass(frozen=True)
class ClientProfile:
    """Where the node is and which certificate to present (read from a TOML file)."""

    province: str
    address: str
    ca: Path
    cert: Path
    key: Path
    # The forum's time zone (an IANA name), for the times a report shows.
    time_zone: str = DEFAULT_TIME_ZONE

    @classmethod
    def load(cls, path: Path) -> ClientProfile:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            tls = data["tls"]
            base = path.parent
            profile = cls(
                province=str(data["province"]),
                address=str(data["address"]),
                ca=(base / tls["ca"]).resolve(),
                cert=(base / tls["cert"]).resolve(),
                key=(base / tls["key"]).resolve(),
                time_zone=str(data.get("time_zone", DEFAULT_TIME_ZONE)),
            )
        except FileNotFoundError as exc:
            raise ConfigError(f"client profile {path} does not exist") from exc
        except (KeyError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"client profile {path} is invalid: {exc}") from exc
        try:
            time_zone(profile.time_zone)
        except ConfigError as exc:
            raise ConfigError(f"client profile {path}: {exc.message}") from None
        return profile


def time_zone(name: str) -> ZoneInfo:
    """The zone of an IANA name (e.g. Asia/Karachi), or ConfigError naming it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        shown = name[:64].encode("ascii", "backslashreplace").decode()
        raise ConfigError(
            f"time_zone {shown!r} is not a known time zone: give an IANA name such as "
            f"{DEFAULT_TIME_ZONE}"
        ) from None


def secure_channel(profile: ClientProfile) -> grpc.Channel:
    check_private_file(profile.key)
    creds = grpc.ssl_channel_credentials(
        root_certificates=profile.ca.read_bytes(),
        private_key=profile.key.read_bytes(),
        certificate_chain=profile.cert.read_bytes(),
    )
    return grpc.secure_channel(
        profile.address,
        creds,
        options=[
            ("grpc.ssl_target_name_override", node_hostname(profile.province)),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )


def translated(fn: Callable[P, R]) -> Callable[P, R]:
    """Raise the `ispf.errors` class the server raised instead of a bare RpcError."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _translated_stream(it: Iterable[R]) -> Iterator[R]:
    try:
        yield from it
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


class NodeClient:
    """The internal API of one node. Use as a context manager, or call `close()`."""

    def __init__(self, profile: ClientProfile, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.profile = profile
        self.timeout = timeout
        self._channel = secure_channel(profile)
        self._registry = internal_pb2_grpc.RegistryServiceStub(self._channel)
        self._recon = internal_pb2_grpc.ReconciliationServiceStub(self._channel)
        self._check = internal_pb2_grpc.CheckServiceStub(self._channel)
        self._audit = audit_pb2_grpc.AuditServiceStub(self._channel)

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    @translated
    def upsert(self, records: Iterable[internal_pb2.Record]) -> internal_pb2.UpsertRecordsResponse:
        return self._registry.UpsertRecords(
            internal_pb2.UpsertRecordsRequest(records=list(records)), timeout=self.timeout
        )

    @translated
    def sync(
        self, requests: Iterable[internal_pb2.SyncRecordsRequest], *, timeout: float | None = None
    ) -> internal_pb2.SyncRecordsResponse:
        """Stream a whole registry (`SyncRecords`); the last request carries commit."""
        return self._registry.SyncRecords(iter(requests), timeout=timeout or 24 * 3600.0)

    @translated
    def delete(self, record_ids: Iterable[str]) -> internal_pb2.DeleteRecordsResponse:
        return self._registry.DeleteRecords(
            internal_pb2.DeleteRecordsRequest(record_ids=list(record_ids)), timeout=self.timeout
        )

    @translated
    def stats(self) -> internal_pb2.RegistryStats:
        return self._registry.GetRegistryStats(
            internal_pb2.GetRegistryStatsRequest(), timeout=self.timeout
        )

    @translated
    def checkpoint(self) -> str:
        """The node's latest signed audit checkpoint, with its cosignatures."""
        return str(
            self._audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=self.timeout).note
        )

    @translated
    def peers(self) -> list[str]:
        return list(
            self._recon.ListPeers(internal_pb2.ListPeersRequest(), timeout=self.timeout).peers
        )

    @translated
    def budgets(self) -> list[internal_pb2.PeerBudget]:
        """Each peer's query budget with the node in the current epoch."""
        return list(
            self._recon.ListPeers(internal_pb2.ListPeersRequest(), timeout=self.timeout).budgets
        )

    @translated
    def start_reconciliation(
        self,
        peer: str,
        *,
        purpose: str = "reconciliation",
        count_only: bool = False,
        collections: Iterable[str] = (),
        peer_collections: Iterable[str] = (),
        full: bool = False,
    ) -> internal_pb2.SessionStatus:
        return self._recon.StartReconciliation(
            internal_pb2.StartReconciliationRequest(
                peer=peer,
                purpose=purpose,
                mode=common_pb2.MODE_COUNT_ONLY if count_only else common_pb2.MODE_MUTUAL,
                collections=list(collections),
                peer_collections=list(peer_collections),
                full=full,
            ),
            timeout=self.timeout,
        )

    @translated
    def check(
        self,
        nids: Iterable[str],
        *,
        purpose: str = "online-check",
        provinces: Iterable[str] = (),
        deadline_ms: int = 2000,
    ) -> internal_pb2.CheckResponse:
        """Is each applicant enrolled or eligible in another province? One answer per
        province per ID: MATCH (with programmes and statuses), NO_MATCH, or why not."""
        return self._check.Check(
            internal_pb2.CheckRequest(
                nids=list(nids),
                purpose=purpose,
                provinces=list(provinces),
                deadline_ms=deadline_ms,
            ),
            timeout=deadline_ms / 1000.0 + self.timeout,
        )

    def reconcile(
        self,
        peer: str,
        *,
        attempts: int = 4,
        backoff: Backoff = SESSION_BACKOFF,
        node_wait: float = 120.0,
        watch: Callable[[str], internal_pb2.SessionStatus] | None = None,
        on_retry: Callable[[internal_pb2.SessionStatus, float], None] | None = None,
        **options: Any,
    ) -> internal_pb2.SessionStatus:
        """Reconcile with a peer and see it through; returns the final status.

        A failure that a new session may get past (the peer down or restarted, the
        connection dropped, this node restarted, the pair busy) is retried with a
        new session after an exponential, jittered wait, up to `attempts` sessions.
        Any other failure (policy, salt, a result the two sides disagree on) is
        returned at once. If this node goes away while the session runs, we wait
        up to `node_wait` seconds for it to come back and read what became of it.
        """
        delays = [*backoff.delays(), 0.0]
        last: internal_pb2.SessionStatus | None = None
        for attempt in range(max(1, attempts)):
            sid = self._when_up(
                lambda: self.start_reconciliation(peer, **options).session_id, node_wait
            )
            follow = watch or self.wait
            last = self._when_up(partial(follow, sid), node_wait)
            if last.state == internal_pb2.SESSION_STATE_COMPLETED or not last.retriable:
                return last
            if attempt < attempts - 1:
                if on_retry:
                    on_retry(last, delays[attempt])
                time.sleep(delays[attempt])
        assert last is not None
        return last

    def _when_up(self, call: Callable[[], R], wait: float) -> R:
        """Run `call`, waiting (with backoff) while this node is unreachable."""
        deadline = time.monotonic() + wait
        delay = 0.2
        while True:
            try:
                return call()
            except (PeerUnavailable, DeadlineExceeded):
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def watch(
        self, session_id: str, *, timeout: float = 24 * 3600.0
    ) -> Iterator[internal_pb2.SessionStatus]:
        """Status updates until the session completes or fails."""
        return _translated_stream(
            self._recon.WatchSession(
                internal_pb2.WatchSessionRequest(session_id=session_id), timeout=timeout
            )
        )

    def wait(self, session_id: str, *, timeout: float = 24 * 3600.0) -> internal_pb2.SessionStatus:
        last = None
        for status in self.watch(session_id, timeout=timeout):
            last = status
        if last is None:  # pragma: no cover - the node always sends one status
            raise ConfigError("node sent no session status")
        return last

    @translated
    def session(self, session_id: str) -> internal_pb2.SessionStatus:
        return self._recon.GetSession(
            internal_pb2.WatchSessionRequest(session_id=session_id), timeout=self.timeout
        )

    @translated
    def sessions(self) -> list[internal_pb2.SessionStatus]:
        return list(
            self._recon.ListSessions(
                internal_pb2.ListSessionsRequest(), timeout=self.timeout
            ).sessions
        )

    @translated
    def receipt(self, session_id: str, record_id: str) -> internal_pb2.Receipt:
        return self._recon.GetReceipt(
            internal_pb2.GetReceiptRequest(session_id=session_id, record_id=record_id),
            timeout=self.timeout,
        )

    def matches(self, session_id: str = "") -> Iterator[internal_pb2.Match]:
        """Matches of one session, or of the latest completed session with each peer."""
        for batch in _translated_stream(
            self._recon.GetMatches(
                internal_pb2.GetMatchesRequest(session_id=session_id), timeout=self.timeout
            )
        ):
            yield from batch.matches
