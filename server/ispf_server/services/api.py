"""What the servicers ask of the node: `NodeApi`, which `node.Node` provides.

The servicers translate messages to these calls and back; they know the node
and its data only by the shapes written here, never its storage modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from ispf.records import Label
from ispf_server.audit import AuditLog
from ispf_server.budget import BudgetState
from ispf_server.session.progress import ProgressBoard, Snapshot


class Record(Protocol):
    """A registry record (record id, canonical ID, label)."""

    @property
    def record_id(self) -> str: ...


R = TypeVar("R", bound=Record)  # the node's record type
R_in = TypeVar("R_in", bound=Record, contravariant=True)


class Counts(Protocol):
    """What an upsert or a sync did, record by record."""

    @property
    def inserted(self) -> int: ...
    @property
    def updated(self) -> int: ...
    @property
    def unchanged(self) -> int: ...


class SyncCounts(Counts, Protocol):
    @property
    def before(self) -> int: ...
    @property
    def deleted(self) -> int: ...
    @property
    def kept(self) -> int: ...


class RegistrySync(Protocol[R_in]):
    """A registry sync in progress: rows staged, then applied as one, or not at all."""

    def stage(self, records: Iterable[R_in], kept: Iterable[str] = ()) -> None: ...
    def apply(self, decide: Callable[[SyncCounts], bool]) -> tuple[SyncCounts, bool]: ...


class SessionRecord(Protocol):
    """A session as the store keeps it."""

    @property
    def session_id(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def state(self) -> str: ...


class Match(Protocol):
    """A result row: an own record, its label, a peer label, the match's tag."""

    @property
    def record_id(self) -> str: ...
    @property
    def label(self) -> Label: ...
    @property
    def peer_label(self) -> Label: ...
    @property
    def tag(self) -> bytes: ...


class Registry(Protocol[R_in]):
    """The registry, as far as the servicers load, sync and read it."""

    def upsert(self, records: Iterable[R_in]) -> Counts: ...
    def sync(self) -> AbstractContextManager[RegistrySync[R_in]]: ...
    def delete(self, record_ids: Iterable[str]) -> tuple[int, list[str]]: ...
    def stats(self) -> tuple[int, int, list[tuple[Label, int]]]: ...


class Results(Protocol):
    """Sessions and their result rows."""

    def get(self, session_id: str) -> SessionRecord | None: ...
    def all(self) -> Sequence[SessionRecord]: ...
    def latest_completed(self) -> Sequence[SessionRecord]: ...
    def matches(self, session_id: str, record_id: str | None = None) -> Iterator[Match]: ...
    def matched_tags(self, session_id: str) -> list[bytes]: ...
    def match_holders(self, session_id: str) -> dict[str, str]: ...


class NodeApi(Protocol[R]):
    @property
    def province(self) -> str: ...
    @property
    def province_digits(self) -> frozenset[str]: ...
    @property
    def board(self) -> ProgressBoard: ...
    @property
    def audit(self) -> AuditLog: ...
    @property
    def registry(self) -> Registry[R]: ...
    @property
    def results(self) -> Results: ...

    def new_record(self, record_id: str, nid: str, label: Label) -> R:
        """A record to upsert (validated by the caller)."""
        ...

    def session_status(self, session_id: str) -> Snapshot | None:
        """A session's status: live on the board, else as stored (None: unknown)."""
        ...

    def peers(self) -> list[str]: ...
    def budgets(self) -> list[BudgetState]: ...
    def start_session(
        self,
        *,
        peer: str,
        purpose: str,
        mode: int,
        collections: frozenset[str],
        peer_collections: frozenset[str],
        full: bool = False,
    ) -> Snapshot: ...
