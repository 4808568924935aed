"""Where a load says it stopped when it is interrupted between two batches, or asked
to stop (a signal) while one is being stored."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from ispf.v1 import internal_pb2
from ispf_client.loader import BATCH, LoadReport, load_csv


class _Node:
    def __init__(self) -> None:
        self.stored = 0

    def upsert(self, batch: list[internal_pb2.Record]) -> SimpleNamespace:
        self.stored += len(batch)
        return SimpleNamespace(
            accepted=len(batch), inserted=len(batch), updated=0, unchanged=0, errors=[]
        )


@pytest.mark.parametrize("batches", [1, 2])
def test_an_interrupt_between_batches_names_the_first_line_not_stored(
    tmp_path: Path, batches: int
) -> None:
    f = tmp_path / "r.csv"
    lines = ["record_id,cnic,programme,status"]
    lines += [f"r{i},35202{i:07d}1,BISP,enrolled" for i in range(BATCH * 3)]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    node = _Node()

    def after_batch(rep: LoadReport) -> None:
        if rep.accepted >= BATCH * batches:
            raise KeyboardInterrupt  # (a SIGTERM landing right after a batch was stored)

    rep = load_csv(node, f, on_batch=after_batch)  # type: ignore[arg-type]
    assert rep.interrupted and rep.stopped == "interrupted"
    assert node.stored == rep.accepted == BATCH * batches
    assert rep.stopped_at == rep.accepted + 2  # header on line 1, rows from line 2


@pytest.mark.parametrize("rows", [BATCH * 3, BATCH * 2 + 17])
@pytest.mark.parametrize("batches", [0, 1, 2])
def test_a_load_asked_to_stop_sends_no_more_batches_and_its_count_is_exact(
    tmp_path: Path, batches: int, rows: int
) -> None:
    f = tmp_path / "r.csv"
    lines = ["record_id,cnic,programme,status"]
    lines += [f"r{i},35202{i:07d}1,BISP,enrolled" for i in range(rows)]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    node = _Node()
    stop = threading.Event()
    if batches == 0:
        stop.set()  # (asked to stop before the first batch was sent)

    def after_batch(rep: LoadReport) -> None:
        if rep.accepted >= BATCH * batches:
            stop.set()  # (the signal came while this batch was being stored)

    rep = load_csv(node, f, on_batch=after_batch, stop=stop)  # type: ignore[arg-type]
    assert rep.interrupted and rep.stopped == "interrupted"
    assert node.stored == rep.accepted == BATCH * batches
    assert rep.unconfirmed == 0
    assert rep.stopped_at == rep.accepted + 2


def test_a_stop_never_set_loads_everything(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    lines = ["record_id,cnic,programme,status"]
    lines += [f"r{i},35202{i:07d}1,BISP,enrolled" for i in range(BATCH + 3)]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    node = _Node()
    rep = load_csv(node, f, stop=threading.Event())  # type: ignore[arg-type]
    assert not rep.interrupted and node.stored == rep.accepted == BATCH + 3


def test_a_stop_asked_during_the_last_batch_is_a_load_done(tmp_path: Path) -> None:
    """The file ends on a whole batch, and the signal comes while the node stores it:
    every row was stored, so the load is done (exit 0), not interrupted."""
    f = tmp_path / "r.csv"
    lines = ["record_id,cnic,programme,status"]
    lines += [f"r{i},35202{i:07d}1,BISP,enrolled" for i in range(BATCH * 2)]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    node = _Node()
    stop = threading.Event()

    def after_batch(rep: LoadReport) -> None:
        if rep.accepted == BATCH * 2:
            stop.set()

    rep = load_csv(node, f, on_batch=after_batch, stop=stop)  # type: ignore[arg-type]
    assert not rep.interrupted and not rep.stopped
    assert node.stored == rep.accepted == BATCH * 2
