"""Nothing a peer receives is in an order derived from ID numbers.

Punjab answers a real Sindh node through a second server that records every
message it sends and every message it receives. For each stream, both ways (a
full run's values, an incremental run's additions and removed tags, a
count-only session's values and re-blinded answers, a filtered session's
values, probes and their answers) each value on the wire is mapped back to its
ID with the keys the test can see in-process, and the Spearman rank
correlation between wire position and ID order, over 10,000 values, must be
indistinguishable from zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ispf.blinding import POINT_BYTES, TAG_BYTES
from ispf.hazmat import curve
from ispf.keys import BlindingKey
from ispf.v1 import internal_pb2, peer_pb2
from ispf_server.node import create_server
from ispf_server.pool import BlindingPool
from tests.conftest import Federation, start_federation

N = 10_000
BOUND = 0.05


def spearman(pairs: list[tuple[int, int]]) -> float:
    """Rank correlation of (wire position, ID rank) pairs (ranks taken afresh)."""
    n = len(pairs)
    assert n >= N, n
    xs = {v: r for r, v in enumerate(sorted(p for p, _ in pairs))}
    ys = {v: r for r, v in enumerate(sorted(q for _, q in pairs))}
    mean = (n - 1) / 2
    cov = sum((xs[p] - mean) * (ys[q] - mean) for p, q in pairs)
    var = sum((r - mean) ** 2 for r in range(n))
    return cov / var


REQUESTS = {
    "Handshake": peer_pb2.HandshakeRequest,
    "Reblind": peer_pb2.BlindedChunk,
    "Probe": peer_pb2.ProbeRequest,
}


class Recorder(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Keeps every message of the peer API, by method, in order: the responses this
    node sends (`sent`) and the requests it receives from the initiator (`received`)."""

    def __init__(self) -> None:
        self.sent: dict[str, list[Any]] = defaultdict(list)
        self.received: dict[str, list[Any]] = defaultdict(list)

    def clear(self) -> None:
        self.sent.clear()
        self.received.clear()

    def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        h = continuation(details)
        if h is None or "PeerService" not in details.method:
            return h
        name = details.method.rsplit("/", 1)[-1]
        out, inbox = self.sent[name], self.received[name]
        # (The node's guard decodes requests itself: here they are still bytes.)
        kind = REQUESTS.get(name)

        def keep(m):  # type: ignore[no-untyped-def]
            inbox.append(kind.FromString(m) if kind is not None and isinstance(m, bytes) else m)
            return m

        def wrap(fn, stream_out, stream_in):  # type: ignore[no-untyped-def]
            def run(req, ctx):  # type: ignore[no-untyped-def]
                if stream_in:
                    req = (keep(m) for m in req)
                else:
                    keep(req)
                got = fn(req, ctx)
                if stream_out:
                    return (out.append(m) or m for m in got)
                out.append(got)
                return got

            return run

        kw = {
            "request_deserializer": h.request_deserializer,
            "response_serializer": h.response_serializer,
        }
        if h.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(h.unary_unary, False, False), **kw)
        if h.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(h.stream_unary, False, True), **kw)
        if h.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(h.unary_stream, True, False), **kw)
        return grpc.stream_stream_rpc_method_handler(wrap(h.stream_stream, True, True), **kw)


def nid(i: int) -> str:
    return f"35202{i:07d}1"


def rows(ids: range, labels: tuple[str, ...] = ("BISP", "PSER")) -> list[tuple[str, str, str, str]]:
    # Two labels, alternating in ID order: groups go out in label order, so each
    # group's own order is what is measured.
    return [(f"R{i}", nid(i), labels[(i // 2) % len(labels)], "enrolled") for i in ids]


def values(chunks: list[peer_pb2.BlindedChunk], width: int) -> list[bytes]:
    data = b"".join(c.values for c in chunks)
    return [data[i : i + width] for i in range(0, len(data), width)]


def points(salt: Any, key: BlindingKey, ids: list[str]) -> bytes:
    return curve.hash_and_blind_many(salt.unsafe_raw(), key.unsafe_raw(), [i.encode() for i in ids])


def by_point(salt: Any, key: BlindingKey, ids: list[str]) -> dict[bytes, str]:
    packed = points(salt, key, ids)
    return {packed[32 * k : 32 * k + 32]: n for k, n in enumerate(ids)}


def by_tag(salt: Any, first: BlindingKey, second: BlindingKey, ids: list[str]) -> dict[bytes, str]:
    tags = curve.x25519_many(second.unsafe_raw(), points(salt, first, ids), TAG_BYTES)
    return {tags[16 * k : 16 * k + 16]: n for k, n in enumerate(ids)}


def rho_of(wire: list[bytes], index: dict[bytes, str]) -> float:
    order = {n: r for r, n in enumerate(sorted(index.values()))}
    pairs = [(pos, order[index[v]]) for pos, v in enumerate(wire)]
    return spearman(pairs)


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> list[BlindingKey]:
    """Every session key the nodes make (one-off sessions' fresh keys), as made."""
    made: list[BlindingKey] = []
    original = BlindingKey.generate

    def generate(cls: type[BlindingKey]) -> BlindingKey:
        key = original()
        made.append(key)
        return key

    monkeypatch.setattr(BlindingKey, "generate", classmethod(generate))
    return made


@pytest.fixture
def fed(tmp_path: Path, inline_pool: BlindingPool) -> Iterator[tuple[Federation, Recorder]]:
    f = start_federation(
        tmp_path,
        ["punjab", "sindh"],
        inline_pool,
        policy={"probes_per_minute": 100_000, "probes_per_day": 100_000},
    )
    recorder = Recorder()
    server, port = create_server(f.nodes["punjab"], "127.0.0.1:0", interceptors=[recorder])
    server.start()
    f.nodes["sindh"].peer_addresses["punjab"] = f"127.0.0.1:{port}"
    yield f, recorder
    server.stop(None)
    f.close()


def run(f: Federation, **kw: object) -> None:
    st = f.reconcile("sindh", "punjab", **kw)
    assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error


def test_no_stream_a_peer_receives_follows_id_order(
    fed: tuple[Federation, Recorder], keys: list[BlindingKey]
) -> None:
    f, rec = fed
    punjab, sindh = f.nodes["punjab"], f.nodes["sindh"]
    salt = punjab.current_salt
    first, second = list(range(0, 2 * N, 2)), list(range(1, 2 * N, 2))
    f.load("punjab", rows(range(0, 2 * N, 2)))
    f.load("sindh", rows(range(0, 2 * N, 2), ("SSPA",)))
    rhos: dict[str, float] = {}

    # A full run: Punjab's values, under its pair key for Sindh.
    rec.clear()
    run(f)
    pk, sk = punjab.store.pairs.key("sindh", 1), sindh.store.pairs.key("punjab", 1)
    ids = [nid(i) for i in first]
    rhos["full"] = rho_of(values(rec.sent["FetchBlinded"], POINT_BYTES), by_point(salt, pk, ids))
    # (and what Punjab receives: Sindh's values, under its pair key for Punjab)
    rhos["full, received"] = rho_of(
        values(rec.received["Reblind"], POINT_BYTES), by_point(salt, sk, ids)
    )

    # An incremental run: on both sides, all of those removed, as many added.
    for province, labels in (("punjab", ("BISP", "PSER")), ("sindh", ("SSPA",))):
        f.client(province).delete([f"R{i}" for i in first])
        f.load(province, rows(range(1, 2 * N, 2), labels))
    rec.clear()
    run(f)
    (hs,) = rec.sent["Handshake"]
    removed = [hs.removed[k : k + TAG_BYTES] for k in range(0, len(hs.removed), TAG_BYTES)]
    rhos["incremental removals"] = rho_of(removed, by_tag(salt, pk, sk, ids))
    (hs_in,) = rec.received["Handshake"]
    removed_in = [hs_in.removed[k : k + TAG_BYTES] for k in range(0, len(hs_in.removed), TAG_BYTES)]
    rhos["incremental removals, received"] = rho_of(removed_in, by_tag(salt, sk, pk, ids))
    added = [nid(i) for i in second]
    rhos["incremental additions"] = rho_of(
        values(rec.sent["FetchBlinded"], POINT_BYTES), by_point(salt, pk, added)
    )
    rhos["incremental additions, received"] = rho_of(
        values(rec.received["Reblind"], POINT_BYTES), by_point(salt, sk, added)
    )

    # Count-only: Punjab's values and its shuffled answers to Sindh's, under the
    # session's fresh keys (Sindh's made first, then Punjab's).
    keys.clear()
    rec.clear()
    run(f, count_only=True)
    fetched = values(rec.sent["FetchBlinded"], POINT_BYTES)
    p_key = next(k for k in keys if points(salt, k, [nid(second[0])]) in fetched)
    (s_key,) = [k for k in keys if k is not p_key]
    rhos["count-only values"] = rho_of(
        values(rec.sent["FetchBlinded"], POINT_BYTES), by_point(salt, p_key, added)
    )
    rhos["count-only answers"] = rho_of(
        values(rec.sent["Reblind"], TAG_BYTES), by_tag(salt, s_key, p_key, added)
    )
    rhos["count-only values, received"] = rho_of(
        values(rec.received["Reblind"], POINT_BYTES), by_point(salt, s_key, added)
    )

    # Filtered: one-offs over one of Punjab's programmes (half its IDs each), pooled.
    pairs_filtered: list[tuple[int, int]] = []
    for programme in ("BISP", "PSER"):
        keys.clear()
        rec.clear()
        run(f, peer_collections=[programme])
        got = values(rec.sent["FetchBlinded"], POINT_BYTES)
        p_key = next(k for k in keys if by_point(salt, k, added).keys() >= set(got[:1]))
        index = by_point(salt, p_key, added)
        assert len(got) == N // 2 and all(v in index for v in got)
        order = {n: r for r, n in enumerate(sorted(index[v] for v in got))}
        pairs_filtered += [(pos, order[index[v]]) for pos, v in enumerate(got)]
        # (Sindh's whole set comes the other way, under its own fresh key)
        (s_key,) = [k for k in keys if k is not p_key]
        rhos[f"filtered {programme}, received"] = rho_of(
            values(rec.received["Reblind"], POINT_BYTES), by_point(salt, s_key, added)
        )
    rhos["filtered"] = pooled(pairs_filtered)

    # Probes: Sindh checks 10,000 IDs in ID order, 1000 a probe; each answer's hits
    # must not come back in the order asked.
    rec.clear()
    asked = sorted(added)
    for at in range(0, N, 1000):
        resp = f.client("sindh").check(asked[at : at + 1000], deadline_ms=20_000)
        assert all(
            r.provinces[0].status == internal_pb2.PROVINCE_STATUS_MATCH for r in resp.results
        )
    pairs_probes: list[tuple[int, int]] = []
    for answer in rec.sent["Probe"]:
        assert len(answer.hits) == 1000
        pairs_probes += [(pos, hit.index) for pos, hit in enumerate(answer.hits)]
    rhos["probes"] = pooled(pairs_probes)
    # The probes' values, as Punjab receives them: not in the order Sindh was asked.
    index = by_point(salt, sk, asked)
    rank = {n: r for r, n in enumerate(asked)}
    pairs_asked: list[tuple[int, int]] = []
    for probe in rec.received["Probe"]:
        batch = [
            probe.values[k : k + POINT_BYTES] for k in range(0, len(probe.values), POINT_BYTES)
        ]
        assert len(batch) == 1000
        first_rank = min(rank[index[v]] for v in batch)
        pairs_asked += [(pos, rank[index[v]] - first_rank) for pos, v in enumerate(batch)]
    rhos["probes, received"] = pooled(pairs_asked)

    assert all(abs(r) < BOUND for r in rhos.values()), rhos
    assert len(rhos) == 14  # (every stream above, both ways, was measured)
    # Every kind of session and the probes were charged to Sindh's budget here: its
    # sets of the full run and the incremental one's additions, the count-only and
    # the two filtered sessions, and the 10,000 probed values.
    listing = f.client("punjab")._recon.ListPeers(internal_pb2.ListPeersRequest(), timeout=5)
    (budget,) = listing.budgets
    assert (budget.peer, budget.used, budget.declared) == ("sindh", 6 * N, N)


def pooled(pairs: list[tuple[int, int]]) -> float:
    """Pearson correlation of within-stream ranks, pooled over several streams of
    the same length (each a permutation): the mean of their rank correlations."""
    assert len(pairs) >= N, len(pairs)
    n = len(pairs)
    mx = sum(p for p, _ in pairs) / n
    my = sum(q for _, q in pairs) / n
    cov = sum((p - mx) * (q - my) for p, q in pairs)
    vx = sum((p - mx) ** 2 for p, _ in pairs)
    vy = sum((q - my) ** 2 for _, q in pairs)
    return cov / (vx * vy) ** 0.5
