"""A count-only session's result: distinct tags both sides hold."""

from __future__ import annotations

import random

import pytest

from ispf.hazmat.curve import native
from ispf_server.session import core


@pytest.mark.parametrize("module", ["native", "python"])
def test_count_common_counts_distinct_shared_tags(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if module == "python":
        monkeypatch.setattr(core, "native", None)
    elif native is None:
        pytest.skip("the native module is not built here")
    rng = random.Random(5)
    shared = [rng.randbytes(16) for _ in range(300)]
    own = shared + [rng.randbytes(16) for _ in range(700)]
    peer = shared + [rng.randbytes(16) for _ in range(1200)]
    rng.shuffle(own)
    rng.shuffle(peer)
    assert core.count_common(b"".join(own), b"".join(peer)) == 300
    # A tag repeated on one side still counts once (the set path takes over).
    assert core.count_common(b"".join(own + shared[:5]), b"".join(peer)) == 300
    assert core.count_common(b"", b"".join(peer)) == 0
