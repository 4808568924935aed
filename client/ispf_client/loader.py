"""Load a registry CSV into a node through the internal API, in batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ispf.v1 import internal_pb2
from ispf_client.csvio import RowProblem, read_registry_csv
from ispf_client.sdk import NodeClient

BATCH = 5_000


@dataclass
class LoadReport:
    rows: int = 0
    accepted: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.problems)


def load_csv(
    client: NodeClient, path: Path, *, on_batch: Callable[[LoadReport], None] | None = None
) -> LoadReport:
    """Send every good row; collect every bad one (from the file or the node) by line."""
    report = LoadReport()
    batch: list[internal_pb2.Record] = []

    def flush() -> None:
        if not batch:
            return
        resp = client.upsert(batch)
        report.accepted += resp.accepted
        report.inserted += resp.inserted
        report.updated += resp.updated
        report.unchanged += resp.unchanged
        report.problems.extend(
            RowProblem(int(e.position), e.record_id, e.code, e.reason) for e in resp.errors
        )
        batch.clear()
        if on_batch:
            on_batch(report)

    for item in read_registry_csv(path):
        if isinstance(item, RowProblem):
            report.problems.append(item)
            report.rows += not item.code.startswith("file.")
            continue
        report.rows += 1
        batch.append(item)
        if len(batch) >= BATCH:
            flush()
    flush()
    report.problems.sort(key=lambda p: p.line)
    return report
