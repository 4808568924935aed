"""Blinding throughput: the node's pipeline at 1 process and at all cores, next to
raw `cryptography` X25519 measured in the same run. Prints figures and ratios;
asserts nothing (timings on shared machines are noise, ratios less so).

    python bench/blinding.py [--n 100000] [--chunk 4096]
"""

from __future__ import annotations

import argparse
import os
import time

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ispf.keys import BlindingKey, ForumSalt
from ispf_server.pool import BlindingPool, pipelined
from ispf_server.session.core import chunked


def raw_x25519(n: int) -> float:
    key = X25519PrivateKey.generate()
    peer = X25519PublicKey.from_public_bytes(
        X25519PrivateKey.generate().public_key().public_bytes_raw()
    )
    t = time.perf_counter()
    for _ in range(n):
        key.exchange(peer)
    return n / (time.perf_counter() - t)


def pipeline(workers: int, ids: list[bytes], chunk: int) -> float:
    pool = BlindingPool(workers)
    salt, key = ForumSalt.generate(1), BlindingKey.generate()
    try:
        # Warm the workers up (spawn and import) outside the timing.
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
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000, help="IDs to hash and blind")
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    ids = [f"35202{i:08d}".encode() for i in range(args.n)]
    raw = raw_x25519(min(args.n, 50_000))
    one = pipeline(1, ids, args.chunk)
    full = pipeline(cores, ids, args.chunk)
    print(f"{'measure':44} {'ops/s':>10} {'ratio':>8}")
    print(f"{'raw cryptography X25519, 1 core':44} {raw:>10,.0f} {'1.00':>8}")
    print(f"{'hash-to-curve + blind, 1 process':44} {one:>10,.0f} {one / raw:>8.2f}")
    print(f"{f'hash-to-curve + blind, {cores} processes':44} {full:>10,.0f} {full / raw:>8.2f}")
    print(
        f"scaling {cores} processes / 1 process: {full / one:.2f}x "
        f"(ideal {cores}x); per-core efficiency vs raw: {full / cores / raw:.0%}"
    )


if __name__ == "__main__":
    main()
