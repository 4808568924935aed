"""Load a registry CSV into a node through the internal API, in batches; or sync
the node's registry to it (`sync_csv`: the file is the whole registry).

A load sends batches of `BATCH` rows, each stored whole or not at all. If the
node fails, times out or the load is interrupted part-way, the report says how
many rows were stored before that (`LoadReport.stopped`, `unconfirmed`): a load
is safe to run again, as rows already stored come back unchanged. A load asked
to stop (`stop`, set by a signal handler) finishes the batch the node is storing
and sends no more, so what it reports as stored is exact. A sync is one
change: nothing of it is stored unless all of it is.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ispf.errors import IspfError
from ispf.v1 import internal_pb2
from ispf_client.csvio import RowProblem, read_registry_csv
from ispf_client.sdk import NodeClient

BATCH = 5_000
# Rejected rows a report keeps in memory; the rest are counted (and, with a
# sink, written out as they come), so memory stays bounded whatever the file.
MAX_KEPT_PROBLEMS = 100_000
# Deletions a sync may make without --allow-deletes, as a share of the registry.
DEFAULT_MAX_DELETE_PERCENT = 10.0
_MAYBE_STORED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
# The file is read this far ahead of the batch being sent (`read_ahead`): the next
# batch is parsed while the node stores the last.
_CHUNK = 1_000
_AHEAD_CHUNKS = 2 * BATCH // _CHUNK
_END = object()

Item = internal_pb2.Record | RowProblem


def read_ahead(path: Path) -> Generator[Item, None, None]:
    """`read_registry_csv`'s items, in order, read by a thread of their own up to
    two batches ahead of the caller. Nothing else changes: what the caller takes
    is what it would have read itself (a failure to read is raised here, at the
    point of the file where it happened), and a caller that stops (an interrupt,
    a failed batch) stops the reader too."""
    chunks: queue.Queue[object] = queue.Queue(maxsize=_AHEAD_CHUNKS)
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                chunks.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            with contextlib.closing(read_registry_csv(path)) as items:
                chunk: list[Item] = []
                for item in items:
                    chunk.append(item)
                    if len(chunk) >= _CHUNK:
                        if not put(chunk):
                            return
                        chunk = []
                if chunk and not put(chunk):
                    return
            put(_END)
        except BaseException as exc:  # (handed to the caller, raised there)
            put(exc)

    reader = threading.Thread(target=read, name="csv-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            got = chunks.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            yield from got  # type: ignore[misc]
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # (a reader blocked on a full queue sees the stop at once)
                chunks.get_nowait()


@dataclass
class LoadReport:
    rows: int = 0
    accepted: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    # Why the load ended before the end of the file (the node failed or was out of
    # reach, a deadline passed, the load was interrupted); empty when it did not.
    stopped: str = ""
    # The first line not known to be stored when it stopped.
    stopped_at: int = 0
    # Rows of the batch in flight when it stopped that the node may have stored
    # (it did not answer in time, or the connection dropped): unknown either way.
    unconfirmed: int = 0
    interrupted: bool = False
    # sync only
    deleted: int = 0
    kept: int = 0
    records_before: int = 0
    applied: bool = True
    refused: str = ""
    # Rejected rows counted but not kept in `problems` (over MAX_KEPT_PROBLEMS,
    # or beyond the 10,000 a node lists for a sync)
    unlisted: int = 0
    file_problem: RowProblem | None = None
    # Problems of the file, not of a row (its header, a field that stops the read):
    # kept and written with the rows' problems, but not counted as rejected rows.
    file_problems: int = 0

    @property
    def rejected(self) -> int:
        """Rows rejected (a problem of the file itself is not a row)."""
        return len(self.problems) + self.unlisted - self.file_problems

    def keep(self, problems: list[RowProblem]) -> None:
        for p in problems:
            if p.code.startswith("file."):
                self.file_problems += 1
                if self.file_problem is None:
                    self.file_problem = p
        room = max(0, MAX_KEPT_PROBLEMS - len(self.problems))
        self.problems.extend(problems[:room])
        self.unlisted += len(problems) - min(room, len(problems))

    @property
    def file_refused(self) -> RowProblem | None:
        """The problem that kept the file (or its rest) from being read, if any."""
        return self.file_problem


def _stopped_message(exc: IspfError, stored: int) -> str:
    text = exc.message
    if stored:
        # True of the one request that failed, not of the load: earlier batches were stored.
        text = text.replace("nothing of this request was stored", "this batch was not stored")
    return text


def load_csv(
    client: NodeClient,
    path: Path,
    *,
    on_batch: Callable[[LoadReport], None] | None = None,
    sink: Callable[[list[RowProblem]], None] | None = None,
    stop: threading.Event | None = None,
) -> LoadReport:
    """Send every good row; collect every bad one (from the file or the node) by line.

    With `stop`, the load ends (`LoadReport.interrupted`) before the next batch once
    it is set: never inside a call to the node, so nothing is left in doubt.

    Problems are kept in line order (the first `MAX_KEPT_PROBLEMS`; the rest
    counted) and, with `sink`, handed over batch by batch in line order. A
    failure of the node part-way is reported in `LoadReport.stopped`, not raised."""
    report = LoadReport()
    batch: list[internal_pb2.Record] = []
    pending: list[RowProblem] = []

    def settle() -> None:
        # Every problem so far lies before every row still to come: release them.
        pending.sort(key=lambda p: p.line)
        if sink is not None and pending:
            sink(pending)
        report.keep(pending)
        pending.clear()

    def flush() -> None:
        if not batch:
            return
        try:
            resp = client.upsert(batch)
        except IspfError as exc:
            report.stopped = _stopped_message(exc, report.accepted)
            report.stopped_at = int(batch[0].position)
            if exc.code in _MAYBE_STORED:
                report.unconfirmed = len(batch)
            raise _Stop from None
        except KeyboardInterrupt:
            report.stopped = "interrupted"
            report.interrupted = True
            report.stopped_at = int(batch[0].position)
            report.unconfirmed = len(batch)
            raise _Stop from None
        report.accepted += resp.accepted
        report.inserted += resp.inserted
        report.updated += resp.updated
        report.unchanged += resp.unchanged
        pending.extend(
            RowProblem(int(e.position), e.record_id, e.code, e.reason) for e in resp.errors
        )
        batch.clear()
        settle()
        if on_batch:
            on_batch(report)

    next_line = 2  # the line after the last one read (line 1 is the header)
    asked = stop.is_set if stop is not None else lambda: False

    def stopping() -> None:
        # Interrupted or asked to stop between batches: nothing of `batch` was sent;
        # everything before it was stored (or reported).
        report.stopped, report.interrupted = "interrupted", True
        report.stopped_at = int(batch[0].position) if batch else next_line
        raise _Stop

    try:
        try:
            with contextlib.closing(read_ahead(path)) as items:
                for item in items:
                    if asked():
                        stopping()
                    if isinstance(item, RowProblem):
                        pending.append(item)
                        report.rows += not item.code.startswith("file.")
                        next_line = max(next_line, item.line + 1)
                        continue
                    report.rows += 1
                    batch.append(item)
                    next_line = int(item.position) + 1
                    if len(batch) >= BATCH:
                        if asked():
                            stopping()
                        flush()
        except KeyboardInterrupt:
            stopping()
        if asked() and batch:  # (else everything was stored)
            stopping()
        flush()
    except _Stop:
        pass
    settle()
    return report


class _Stop(Exception):
    pass


def sync_csv(
    client: NodeClient,
    path: Path,
    *,
    max_rejected: Callable[[int], int],
    allow_deletes: int = 0,
    max_delete_percent: float = DEFAULT_MAX_DELETE_PERCENT,
    dry_run: bool = False,
) -> LoadReport:
    """Make the node's registry exactly the file: one change, or none.

    `max_rejected(rows)`: how many rejected rows the sync tolerates for a file of
    `rows` rows. A file that cannot be read to its end is never synced (its
    absent rows would be deleted)."""
    report = LoadReport(applied=False)

    def requests() -> Iterator[internal_pb2.SyncRecordsRequest]:
        batch: list[internal_pb2.Record] = []
        keep: list[str] = []
        for item in read_registry_csv(path):
            if isinstance(item, RowProblem):
                report.keep([item])
                report.rows += not item.code.startswith("file.")
                if item.record_id:
                    keep.append(item.record_id)
                continue
            report.rows += 1
            batch.append(item)
            if len(batch) >= BATCH:
                yield internal_pb2.SyncRecordsRequest(records=batch, keep_record_ids=keep)
                batch, keep = [], []
        if report.file_refused is not None:
            return  # no commit: the node changes nothing
        yield internal_pb2.SyncRecordsRequest(
            records=batch,
            keep_record_ids=keep,
            commit=True,
            client_rejected=report.rejected,
            max_rejected=max_rejected(report.rows),
            allow_deletes=allow_deletes,
            max_delete_percent=max_delete_percent,
            dry_run=dry_run,
        )

    try:
        resp = client.sync(requests())
    except IspfError as exc:
        if report.file_refused is not None:
            report.problems.sort(key=lambda p: p.line)
            report.refused = "the file was not read to its end: nothing was changed"
            return report
        report.stopped = exc.message
        report.refused = "the sync did not complete: nothing was changed"
        report.problems.sort(key=lambda p: p.line)
        return report
    report.applied = resp.applied
    report.refused = resp.refused
    report.records_before = resp.records_before
    report.inserted, report.updated = resp.inserted, resp.updated
    report.unchanged, report.deleted, report.kept = resp.unchanged, resp.deleted, resp.kept
    report.accepted = resp.inserted + resp.updated + resp.unchanged
    report.unlisted += resp.rejected - len(resp.errors)
    report.keep([RowProblem(int(e.position), e.record_id, e.code, e.reason) for e in resp.errors])
    report.problems.sort(key=lambda p: p.line)
    return report
