"""A session's tags on disk: appended in order, read back by position."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ispf.errors import StorageFull
from ispf_server.records import TagSpool, spool


def test_values_come_back_in_order_by_position_and_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(16 * 1000)
    with TagSpool(tmp_path) as s:
        for at in range(0, len(data), 16 * 37):  # appends of any whole number of values
            s.append(data[at : at + 16 * 37])
        assert s.count == 1000
        assert s.getvalue() == data
        assert s.read(10, 20) == data[160:320]
        assert s.read(990, 2000) == data[990 * 16 :]  # (clipped at the end)
        assert s.read(5, 5) == b""
        monkeypatch.setattr(spool, "CHUNK", 64)
        parts = list(s.chunks(3, 500))
        assert b"".join(parts) == data[48 : 500 * 16]
        assert max(len(p) for p in parts) == 64 * 16
    assert list(tmp_path.iterdir()) == []  # nothing left in the store directory


def test_a_partial_value_is_refused(tmp_path: Path) -> None:
    with TagSpool(tmp_path) as s, pytest.raises(ValueError, match="whole 16-byte values"):
        s.append(b"x" * 17)


def test_an_unwritable_directory_is_a_full_store_error(tmp_path: Path) -> None:
    with pytest.raises(StorageFull, match="free space on the node"):
        TagSpool(tmp_path / "missing")


def test_grouped_chunks_follow_the_groups_and_say_where_they_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(16 * 100)
    monkeypatch.setattr(spool, "CHUNK", 7)
    with TagSpool(tmp_path) as s:
        s.append(data)
        sizes = [10, 0, 23, 67]
        got = list(s.grouped(sizes))
        starts = [0, 10, 10, 33]
        for g, at, chunk in got:
            n = len(chunk) // 16
            assert 0 < n <= 7 and starts[g] <= at and at + n <= starts[g] + sizes[g]
            assert chunk == data[16 * at : 16 * (at + n)]
        assert b"".join(c for _, _, c in got) == data
        assert sorted({g for g, _, _ in got}) == [0, 2, 3]  # (an empty group gives none)
