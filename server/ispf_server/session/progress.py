"""Live state of sessions, for WatchSession and the CLI's progress bars."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ispf.v1 import internal_pb2
from ispf_server.clock import utcnow
from ispf_server.storage.sessions import SessionRow

RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"

_STATE = {
    RUNNING: internal_pb2.SESSION_STATE_RUNNING,
    COMPLETED: internal_pb2.SESSION_STATE_COMPLETED,
    FAILED: internal_pb2.SESSION_STATE_FAILED,
}


@dataclass
class Snapshot:
    session_id: str
    peer: str
    role: str
    mode: int
    purpose: str
    epoch: int
    state: str = RUNNING
    phase: str = "handshake"
    own_records: int = 0
    own_values: int = 0
    peer_values: int = 0
    blinded: int = 0
    sent: int = 0
    received: int = 0
    work_done: int = 0
    work_total: int = 0
    match_count: int = 0
    matched_records: int = 0
    result_digest: bytes = b""
    error: str = ""
    started_at: str = field(default_factory=utcnow)
    finished_at: str = ""
    sync: str = ""
    own_removed: int = 0
    peer_removed: int = 0
    retriable: bool = False
    version: int = 0

    def to_proto(self) -> internal_pb2.SessionStatus:
        return internal_pb2.SessionStatus(
            session_id=self.session_id,
            peer=self.peer,
            role=self.role,
            mode=self.mode,  # type: ignore[arg-type]
            purpose=self.purpose,
            state=_STATE[self.state],
            phase=self.phase,
            own_records=self.own_records,
            own_values=self.own_values,
            peer_values=self.peer_values,
            blinded=self.blinded,
            sent=self.sent,
            received=self.received,
            work_done=self.work_done,
            work_total=self.work_total,
            match_count=self.match_count,
            matched_records=self.matched_records,
            result_digest=self.result_digest,
            error=self.error,
            started_at=self.started_at,
            finished_at=self.finished_at,
            epoch=self.epoch,
            sync=self.sync,
            own_removed=self.own_removed,
            peer_removed=self.peer_removed,
            retriable=self.retriable,
        )

    @classmethod
    def from_row(cls, row: SessionRow) -> Snapshot:
        return cls(
            session_id=row.session_id,
            peer=row.peer,
            role=row.role,
            mode=row.mode,
            purpose=row.purpose,
            epoch=row.epoch,
            state=row.state,
            phase="done",
            own_records=row.own_records,
            own_values=row.own_values,
            peer_values=row.peer_values,
            match_count=row.match_count,
            matched_records=row.matched_records,
            result_digest=row.result_digest or b"",
            error=row.error,
            started_at=row.started_at,
            finished_at=row.finished_at,
            sync=row.sync,
            own_removed=row.own_removed,
            peer_removed=row.peer_removed,
            retriable=bool(row.retriable),
        )


class Progress:
    """One session's counters; updates wake up watchers."""

    def __init__(
        self,
        snap: Snapshot,
        cond: threading.Condition,
        on_finish: Callable[[Snapshot], None] | None = None,
    ) -> None:
        self._snap = snap
        self._cond = cond
        self._on_finish = on_finish

    @property
    def session_id(self) -> str:
        return self._snap.session_id

    def update(self, **changes: object) -> None:
        with self._cond:
            self._snap = replace(self._snap, **changes, version=self._snap.version + 1)  # type: ignore[arg-type]
            self._cond.notify_all()

    def add(self, **deltas: int) -> None:
        with self._cond:
            cur = self._snap
            new = {k: getattr(cur, k) + v for k, v in deltas.items()}
            self._snap = replace(cur, **new, version=cur.version + 1)
            self._cond.notify_all()

    def snapshot(self) -> Snapshot:
        with self._cond:
            return self._snap

    def finish(self, state: str, **changes: object) -> None:
        self.update(state=state, phase="done", finished_at=utcnow(), **changes)
        if self._on_finish is not None:
            self._on_finish(self.snapshot())


class ProgressBoard:
    """All sessions this node runs or answers, in memory (the store has the history)."""

    def __init__(self, on_finish: Callable[[Snapshot], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._items: dict[str, Progress] = {}
        self._on_finish = on_finish

    def open(self, snap: Snapshot) -> Progress:
        p = Progress(snap, self._cond, self._on_finish)
        with self._cond:
            self._items[snap.session_id] = p
        return p

    def get(self, session_id: str) -> Progress | None:
        with self._cond:
            return self._items.get(session_id)

    def wait_for_change(self, progress: Progress, version: int, timeout: float) -> Snapshot:
        with self._cond:
            self._cond.wait_for(lambda: progress.snapshot().version != version, timeout=timeout)
            return progress.snapshot()


class Stopwatch:
    """Seconds spent in each phase of a session, for its completion log line."""

    def __init__(self) -> None:
        self._at = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.phases.append((phase, now - self._at))
        self._at = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {secs:.2f} s" for name, secs in self.phases)
