"""The vectors in tests/vectors are exact copies of the forum's shared/vectors."""

from __future__ import annotations

from pathlib import Path

import pytest

OURS = Path(__file__).resolve().parents[1] / "vectors"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "vectors"


@pytest.mark.parametrize("kind", ["merkle", "note", "wycheproof"])
def test_copies_match_the_shared_vectors(kind: str) -> None:
    if not (SHARED / kind).is_dir():
        pytest.skip("no shared/vectors beside this checkout to compare with")
    theirs = {
        p.relative_to(SHARED / kind): p.read_bytes()
        for p in (SHARED / kind).rglob("*")
        if p.is_file()
    }
    mine = {
        p.relative_to(OURS / kind): p.read_bytes() for p in (OURS / kind).rglob("*") if p.is_file()
    }
    assert mine == theirs
