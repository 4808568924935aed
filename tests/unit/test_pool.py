"""The blinding pool: worker processes (where the backend holds the GIL) and threads
give what the one-call recipe gives, though only raw bytes reach a worker."""

from __future__ import annotations

import pytest

from ispf import blinding
from ispf.keys import BlindingKey, ForumSalt
from ispf.nid import PackedNids
from ispf_server.pool import BlindingPool


@pytest.mark.parametrize("threads", [False, True])
def test_pool_workers_blind_as_the_recipe_does(threads: bool) -> None:
    salt, key = ForumSalt.generate(1), BlindingKey.generate()
    digits = PackedNids(b"".join(f"35202{i:08d}".encode() for i in range(64)))
    pool = BlindingPool(2, "cryptography", threads=threads)
    try:
        assert pool.describe() == f"2 {'threads' if threads else 'worker processes'}"
        points = pool.hash_and_blind(salt, key, digits).result(timeout=60)
        assert points == blinding.blind_many(key, salt, digits, "cryptography")
        tags = pool.reblind(key, points, blinding.TAG_BYTES).result(timeout=60)
        assert tags == blinding.reblind_many(key, points, blinding.TAG_BYTES, "cryptography")
    finally:
        pool.close()


def test_releases_gil_only_for_the_c_ladder() -> None:
    from ispf.errors import BackendUnavailable

    assert not blinding.releases_gil("cryptography")
    try:
        ifma_runs = blinding.curve_in_c() and blinding.select_backend("ifma").name == "ifma"
    except BackendUnavailable:  # (a CPU without AVX-512 IFMA)
        ifma_runs = False
    assert blinding.releases_gil("ifma") == ifma_runs
