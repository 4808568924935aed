"""Blinding throughput: the node's pipeline (chunked, through the node's pool: threads
for the IFMA backend, processes for `cryptography`) for each X25519
backend at 1 worker and at all cores, next to each raw primitive measured in the
same run. Two workloads:

* hash + blind: own IDs only (hash-to-curve, then X25519): the worst case;
* session mix: what a mutual session does per pair of records, one own ID hashed
  and blinded and one peer value re-blinded; counted in X25519 operations.

Ratios are to the backend's own raw rate. The last line is what the `ifma`
backend's spot checks cost (one output in about 4,096 recomputed with
`cryptography`): its raw rate with and without them. Prints figures and ratios;
asserts nothing (timings on shared machines are noise, ratios less so).

    python bench/blinding.py [--n 200000] [--chunk 4096]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import Future

from ispf.errors import BackendUnavailable
from ispf.hazmat.backends import SPOT_CHECK_EVERY, IfmaBackend, select
from ispf.hazmat.curve import hash_to_curve_many
from ispf.keys import BlindingKey, ForumSalt
from ispf_server.pool import BlindingPool, pipelined, releases_gil
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


def pipeline(workers: int, backend: str, ids: list[bytes], chunk: int, mix: bool) -> float:
    """X25519 operations per second through the pool (each hashed ID is one)."""
    pool = BlindingPool(workers, backend)
    salt, key = ForumSalt.generate(1), BlindingKey.generate()
    peer = hash_to_curve_many(b"p" * 32, ids[:chunk])  # stands in for a peer's chunk

    def task(d: list[bytes]) -> Future[bytes]:
        return pool.hash_and_blind(salt, key, d)

    def mixed(item: tuple[int, list[bytes]]) -> Future[bytes]:
        seq, d = item
        return pool.reblind(key, peer[: 32 * len(d)], 16) if seq % 2 else task(d)

    try:
        # Warm the workers up (spawn, import, library load) outside the timing.
        list(pipelined(task, [ids[:8]] * max(workers, 1), pool.depth))
        t = time.perf_counter()
        if mix:  # chunks alternate: own IDs hashed and blinded, peer values re-blinded
            for _ in pipelined(mixed, enumerate(chunked(ids, chunk)), pool.depth):
                pass
        else:
            for _ in pipelined(task, chunked(ids, chunk), pool.depth):
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
        IfmaBackend.load()
        backends.append(IfmaBackend.name)
    except BackendUnavailable as exc:
        print(f"(ifma backend unavailable: {exc.message})")
    raws = {b: raw_rate(b, min(args.n, 100_000)) for b in backends}

    head = f"{'ops/s':>10} {'per core':>10} {'vs raw':>7}"
    print(f"{'measure (X25519 operations)':58} {head}")
    for b in backends:
        raw = raws[b]
        name = f"raw {b} X25519, 1 core"
        print(f"{name:58} {raw:>10,.0f} {raw:>10,.0f} {'1.00':>7}")
        for mix in (False, True):
            for w in sorted({1, cores}):
                rate = pipeline(w, b, ids, args.chunk, mix)
                what = "session mix" if mix else "hash + blind"
                kind = "threads" if releases_gil(b) else "processes"
                name = f"{b}: {what}, {w} {kind}"
                per = rate / w
                print(f"{name:58} {rate:>10,.0f} {per:>10,.0f} {per / raw:>7.2f}")
    if "ifma" in backends:
        spot_check_cost(min(args.n, 100_000))


def spot_check_cost(n: int) -> None:
    """The raw ifma rate with its spot checks and without (check_every=0)."""
    from ispf.hazmat import curve

    points = hash_to_curve_many(b"k" * 32, [f"35202{i:08d}".encode() for i in range(4096)])
    scalar, rounds = os.urandom(32), max(1, n // 4096)
    rates = {}
    for every in (0, SPOT_CHECK_EVERY, 0, SPOT_CHECK_EVERY):  # alternated, best of two
        impl = IfmaBackend(curve.native, check_every=every)
        t = time.perf_counter()
        for _ in range(rounds):
            impl.many(scalar, points, 32)
        rates[every] = max(rates.get(every, 0.0), rounds * 4096 / (time.perf_counter() - t))
    off, on = rates[0], rates[SPOT_CHECK_EVERY]
    print(
        f"ifma spot checks (1 in 4,096): {on:,.0f}/s with, {off:,.0f}/s without: "
        f"cost {100 * (1 - on / off):.2f}%"
    )


if __name__ == "__main__":
    main()
