"""Blinding throughput: the node's pipeline (hash-to-curve + blind, chunked, through
the process pool) for each X25519 backend at 1 process and at all cores, next to
each raw primitive measured in the same run. Prints figures and ratios; asserts
nothing (timings on shared machines are noise, ratios less so).

    python bench/blinding.py [--n 200000] [--chunk 4096]
"""

from __future__ import annotations

import argparse
import os
import time

from ispf.hazmat.backends import BackendUnavailable, MultiBufferBackend, select
from ispf.hazmat.curve import hash_to_curve_many
from ispf.keys import BlindingKey, ForumSalt
from ispf_server.pool import BlindingPool, pipelined
from ispf_server.session.core import chunked


def raw_rate(backend: str, n: int) -> float:
    """The bare X25519 primitive on pre-hashed points: one exchange per value."""
    impl = select(backend)
    points = hash_to_curve_many(b"k" * 32, [f"35202{i:08d}".encode() for i in range(4096)])
    scalar = os.urandom(32)
    rounds = max(1, n // 4096)
    t = time.perf_counter()
    for _ in range(rounds):
        impl.many(scalar, points, 32)
    return rounds * 4096 / (time.perf_counter() - t)


def pipeline(workers: int, backend: str, ids: list[bytes], chunk: int) -> float:
    pool = BlindingPool(workers, backend)
    salt, key = ForumSalt.generate(1), BlindingKey.generate()
    try:
        # Warm the workers up (spawn, import, library load) outside the timing.
        list(
            pipelined(
                lambda d: pool.hash_and_blind(salt, key, d), [ids[:8]] * max(workers, 1), pool.depth
            )
        )
        t = time.perf_counter()
        for _ in pipelined(
            lambda d: pool.hash_and_blind(salt, key, d), chunked(ids, chunk), pool.depth
        ):
            pass
        return len(ids) / (time.perf_counter() - t)
    finally:
        pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=200_000, help="IDs to hash and blind")
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    ids = [f"35202{i:08d}".encode() for i in range(args.n)]
    backends = ["cryptography"]
    try:
        MultiBufferBackend.load()
        backends.append("multibuffer")
    except BackendUnavailable as exc:
        print(f"(multi-buffer backend unavailable: {exc.message})")
    print(f"{'measure':52} {'ops/s':>10} {'per core':>10} {'vs raw':>7}")
    for b in backends:
        raw = raw_rate(b, min(args.n, 100_000))
        print(f"{f'raw {b} X25519, 1 core':52} {raw:>10,.0f} {raw:>10,.0f} {'1.00':>7}")
        for w in sorted({1, cores}):
            rate = pipeline(w, b, ids, args.chunk)
            print(
                f"{f'{b}: hash-to-curve + blind, {w} process(es)':52} {rate:>10,.0f} "
                f"{rate / w:>10,.0f} {rate / w / raw:>7.2f}"
            )


if __name__ == "__main__":
    main()
