"""A buggy or hostile peer sends every bad input we know of; the node answers each
with a precise status and reason, records the failed session, and keeps serving."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ispf import BlindingKey, blind, canonicalise
from ispf.hazmat.curve import LOW_ORDER_U
from ispf.identity import node_hostname
from ispf.v1 import common_pb2, internal_pb2, peer_pb2, peer_pb2_grpc
from ispf_server.pool import BlindingPool
from ispf_server.session.initiator import SESSION_KEY
from tests.conftest import Federation, start_federation

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
MAX_MESSAGE = 1024 * 1024


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    pool = BlindingPool(0)
    f = start_federation(
        tmp_path_factory.mktemp("hostile"),
        ["punjab", "sindh", "kp"],
        pool,
        session_idle_timeout=1.0,
        max_message_bytes=MAX_MESSAGE,
    )
    f.load(
        "punjab",
        [("P1", "3520212345671", "BISP", "enrolled"), ("P2", "3520212345672", "BISP", "eligible")],
    )
    f.load("sindh", [("S1", "3520212345671", "SSPA", "enrolled")])
    yield f
    f.close()
    pool.close()


def channel(fed: Federation, caller: str = "sindh", target: str = "punjab") -> grpc.Channel:
    d = fed.layout.node_dir(caller)
    creds = grpc.ssl_channel_credentials(
        root_certificates=fed.layout.ca_cert.read_bytes(),
        private_key=(d / "node.key").read_bytes(),
        certificate_chain=(d / "node.pem").read_bytes(),
    )
    return grpc.secure_channel(
        f"127.0.0.1:{fed.ports[target]}",
        creds,
        options=[
            ("grpc.ssl_target_name_override", node_hostname(target)),
            ("grpc.max_send_message_length", 8 * MAX_MESSAGE),
        ],
    )


@pytest.fixture
def stub(fed: Federation) -> Iterator[peer_pb2_grpc.PeerServiceStub]:
    with channel(fed) as ch:
        yield peer_pb2_grpc.PeerServiceStub(ch)
    assert_still_serving(fed)


def assert_still_serving(fed: Federation) -> None:
    d = fed.layout.client_dir("punjab")
    creds = grpc.ssl_channel_credentials(
        root_certificates=fed.layout.ca_cert.read_bytes(),
        private_key=(d / "client.key").read_bytes(),
        certificate_chain=(d / "client.pem").read_bytes(),
    )
    with grpc.secure_channel(
        f"127.0.0.1:{fed.ports['punjab']}",
        creds,
        options=[("grpc.ssl_target_name_override", node_hostname("punjab"))],
    ) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def hello(fed: Federation, n: int = 2, **over: object) -> peer_pb2.HandshakeRequest:
    req = peer_pb2.HandshakeRequest(
        protocol_version=1,
        session_id=str(uuid.uuid4()),
        epoch=1,
        key_check=fed.nodes["punjab"].current_salt.key_check(),
        purpose="reconciliation",
        mode=common_pb2.MODE_MUTUAL,
        groups=[
            common_pb2.LabelGroup(
                labels=[common_pb2.Label(programme="SSPA", status="enrolled")], size=n
            )
        ],
    )
    for k, v in over.items():
        if k == "groups":
            del req.groups[:]
            req.groups.extend(v)  # type: ignore[arg-type]
        else:
            setattr(req, k, v)
    return req


def points(fed: Federation, n: int) -> bytes:
    key, salt = BlindingKey.generate(), fed.nodes["punjab"].current_salt
    return b"".join(blind(key, salt, canonicalise(f"42101{i:08d}")) for i in range(n))


def expect(code: grpc.StatusCode, fragment: str, fn: object, *args: object, **kw: object) -> None:
    def run() -> None:
        result = fn(*args, **kw)  # type: ignore[operator]
        if hasattr(result, "__iter__") and not isinstance(result, bytes):
            list(result)  # a streamed answer fails when read

    with pytest.raises(grpc.RpcError) as info:
        run()
    assert info.value.code() == code, info.value.details()
    assert fragment in (info.value.details() or ""), info.value.details()


def chunk(sid: str, seq: int, values: bytes) -> peer_pb2.BlindedChunk:
    return peer_pb2.BlindedChunk(session_id=sid, seq=seq, values=values)


def session_state(fed: Federation, sid: str) -> internal_pb2.SessionStatus:
    return fed.client("punjab").session(sid)


def test_malformed_message_bytes(fed: Federation) -> None:
    with channel(fed) as ch:
        raw = ch.unary_unary("/ispf.v1.PeerService/Handshake")
        expect(INVALID, "malformed request message", raw, b"\xff\xff\xff\xff", timeout=5)
    assert_still_serving(fed)


def test_oversized_message(fed: Federation) -> None:
    with channel(fed) as ch:
        raw = ch.unary_unary("/ispf.v1.PeerService/Handshake")
        expect(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
            raw,
            b"\x00" * (2 * MAX_MESSAGE),
            timeout=5,
        )
    assert_still_serving(fed)


@pytest.mark.parametrize(
    ("over", "code", "fragment"),
    [
        ({"protocol_version": 9}, grpc.StatusCode.FAILED_PRECONDITION, "protocol version 9"),
        ({"session_id": "not-a-uuid"}, INVALID, "must be a UUID"),
        ({"mode": 7}, INVALID, "mode must be"),
        ({"epoch": 99}, grpc.StatusCode.FAILED_PRECONDITION, "epoch 99 is not held"),
        ({"key_check": b"12345678"}, grpc.StatusCode.FAILED_PRECONDITION, "different salts"),
        ({"groups": [common_pb2.LabelGroup(size=3)]}, INVALID, "has no labels"),
        (
            {
                "groups": [
                    common_pb2.LabelGroup(
                        labels=[common_pb2.Label(programme="=cmd|' /C calc'!A0", status="x")],
                        size=1,
                    )
                ]
            },
            INVALID,
            "programme must be",
        ),
        (
            {
                "groups": [
                    common_pb2.LabelGroup(
                        labels=[common_pb2.Label(programme="P", status="s")], size=10**12
                    )
                ]
            },
            grpc.StatusCode.PERMISSION_DENIED,
            "exceeds the policy limit",
        ),
    ],
)
def test_bad_handshakes(
    fed: Federation,
    stub: peer_pb2_grpc.PeerServiceStub,
    over: dict[str, object],
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    expect(code, fragment, stub.Handshake, hello(fed, **over), timeout=5)


def test_count_only_handshake_with_labels(
    fed: Federation, stub: peer_pb2_grpc.PeerServiceStub
) -> None:
    expect(
        INVALID,
        "carries labels",
        stub.Handshake,
        hello(fed, mode=common_pb2.MODE_COUNT_ONLY),
        timeout=5,
    )


@pytest.mark.parametrize("epoch", [0, 7, 2**63, 2**64 - 1])
def test_sync_state_for_an_epoch_not_held(stub: peer_pb2_grpc.PeerServiceStub, epoch: int) -> None:
    # Found by the RPC fuzzer: an epoch past SQLite's integer range crashed the lookup.
    state = stub.GetSyncState(peer_pb2.SyncStateRequest(epoch=epoch), timeout=5)
    assert not state.held


def test_handshakes_refused_anyway_do_not_stop_a_compaction(
    fed: Federation, stub: peer_pb2_grpc.PeerServiceStub
) -> None:
    """A compaction of the pair's state gives way to a peer's sync Handshake, but only
    to one that passes the checks needing no lock: one assuming a state not held
    here is told to retry, one over a spent budget that it is spent, and the
    compaction goes on (a peer cannot keep the pair from ever compacting so). One
    that passes is let in."""
    store = fed.nodes["punjab"].store
    lock = store.pair_lock("sindh")
    give_way = lock.acquire_giving_way(5)  # (held as a compaction holds it)
    assert give_way is not None
    released = False
    try:
        stale = hello(fed, sync=True, incremental=True, state=bytes(64))
        expect(grpc.StatusCode.UNAVAILABLE, "another state", stub.Handshake, stale, timeout=15)
        assert not give_way.is_set()
        store.db.write(
            "INSERT INTO query_budget VALUES ('sindh', 1, 2, 1000000000000, 0, '2026-01-01') "
            "ON CONFLICT(peer, epoch) DO UPDATE SET used = excluded.used"
        )
        spent = hello(fed, sync=True)  # (refused as it is without a compaction)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "is spent", stub.Handshake, spent, timeout=15)
        assert not give_way.is_set()
        refused = store.db.fetchone("SELECT refused FROM query_budget WHERE peer='sindh'")
        assert refused == (1,)  # (and counted)
        lock.release()
        released = True
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "is spent", stub.Handshake, spent, timeout=15)
    finally:
        store.db.write("DELETE FROM query_budget WHERE peer='sindh'")
        if not released:
            lock.release()
    give_way = lock.acquire_giving_way(5)
    assert give_way is not None
    threading.Thread(target=lambda: give_way.wait(30) and lock.release()).start()
    req = hello(fed, sync=True)
    resp = stub.Handshake(req, timeout=15)  # (passes: the compaction lets go)
    assert give_way.is_set() and resp.session_id == req.session_id
    stub.Abort(peer_pb2.AbortRequest(session_id=req.session_id, reason="test"), timeout=5)


def test_a_handshake_refused_for_its_removed_tags_does_not_stop_a_compaction(
    fed: Federation, stub: peer_pb2_grpc.PeerServiceStub
) -> None:
    """An incremental Handshake whose state is right but whose removed tags are not
    whole (or never held) is refused before any compaction is asked."""
    from ispf_server.session.plan import state_fingerprints

    store = fed.nodes["punjab"].store
    assert fed.reconcile("sindh", "punjab").state == internal_pb2.SESSION_STATE_COMPLETED
    pp = fed.nodes["punjab"].policy.current().peers["sindh"]
    fps = state_fingerprints(store, "sindh", 1, pp)
    assert fps is not None
    own, theirs = fps
    lock = store.pair_lock("sindh")
    give_way = lock.acquire_giving_way(5)
    assert give_way is not None
    try:
        for removed, why in ((bytes(15), "whole"), (bytes(16), "never held")):
            bad = hello(fed, sync=True, incremental=True, state=theirs + own, removed=removed)
            expect(INVALID, why, stub.Handshake, bad, timeout=15)
            assert not give_way.is_set()
    finally:
        lock.release()


def test_a_handshake_refused_while_a_session_holds_the_pair_asks_no_compaction(
    fed: Federation, stub: peer_pb2_grpc.PeerServiceStub
) -> None:
    """A session of this node holds the pair's lock and a compaction waits for it: a
    peer's Handshake is told at once that a session is running, and the waiting
    compaction is not asked to give way (it gave way to nobody)."""
    lock = fed.nodes["punjab"].store.pair_lock("sindh")
    assert lock.acquire(timeout=5)  # (a session)
    waiting: list[threading.Event] = []

    def compaction() -> None:
        give_way = lock.acquire_giving_way(30)
        if give_way is not None:
            waiting.append(give_way)
            lock.release()

    t = threading.Thread(target=compaction)
    t.start()
    try:
        time.sleep(0.2)  # (the compaction waits for the lock)
        t0 = time.monotonic()
        expect(UNAVAILABLE, "already running", stub.Handshake, hello(fed, sync=True), timeout=15)
        assert time.monotonic() - t0 < 3  # (not kept waiting for the session)
    finally:
        lock.release()
    t.join(10)
    assert waiting and not waiting[0].is_set()


def test_replayed_session_id(fed: Federation, stub: peer_pb2_grpc.PeerServiceStub) -> None:
    req = hello(fed)
    stub.Handshake(req, timeout=5)
    expect(INVALID, "already used", stub.Handshake, req, timeout=5)


def reblind(
    stub: peer_pb2_grpc.PeerServiceStub,
    sid: str,
    chunks: list[peer_pb2.BlindedChunk],
) -> list[peer_pb2.BlindedChunk]:
    return list(stub.Reblind(iter(chunks), timeout=5, metadata=((SESSION_KEY, sid),)))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda sid, p: [chunk(sid, 0, p[:33])], "not a positive multiple of 32"),
        (lambda sid, p: [chunk(sid, 0, p[:32] + (1).to_bytes(32, "little"))], "low-order"),
        (lambda sid, p: [chunk(sid, 1, p[:32])], "chunk 1 arrived where chunk 0 was due"),
        (
            lambda sid, p: [chunk(sid, 0, p[:32]), chunk(sid, 0, p[32:64])],
            "chunk 0 arrived where chunk 1 was due",
        ),
        (lambda sid, p: [chunk(sid, 0, p[:32]), chunk(sid, 2, p[32:64])], "chunk 2 arrived"),
        (lambda sid, p: [chunk(sid, 0, p)], "more than the 2 values announced"),
        (lambda sid, p: [chunk(sid, 0, p[:32])], "ended after 1 of 2 values"),
        (lambda sid, p: [chunk(str(uuid.uuid4()), 0, p[:32])], "belongs to another session"),
        (lambda sid, p: [chunk(sid, 0, b"")], "not a positive multiple"),
    ],
)
def test_bad_chunk_streams_fail_the_session(
    fed: Federation, stub: peer_pb2_grpc.PeerServiceStub, make: object, fragment: str
) -> None:
    req = hello(fed, n=2)
    stub.Handshake(req, timeout=5)
    expect(INVALID, fragment, reblind, stub, req.session_id, make(req.session_id, points(fed, 3)))  # type: ignore[operator]
    st = session_state(fed, req.session_id)
    assert st.state == internal_pb2.SESSION_STATE_FAILED
    assert fragment.split()[0] in st.error
    # The failed session is over: further calls find nothing.
    expect(
        grpc.StatusCode.NOT_FOUND,
        "unknown or expired",
        stub.Conclude,
        peer_pb2.ConcludeRequest(session_id=req.session_id),
        timeout=5,
    )


def test_low_order_points_are_each_rejected(
    fed: Federation, stub: peer_pb2_grpc.PeerServiceStub
) -> None:
    for u in sorted(LOW_ORDER_U):
        req = hello(fed, n=1)
        stub.Handshake(req, timeout=5)
        expect(
            INVALID,
            "low-order",
            reblind,
            stub,
            req.session_id,
            [chunk(req.session_id, 0, u.to_bytes(32, "little"))],
        )


def test_session_ids_unknown_missing_or_of_another_peer(
    fed: Federation, stub: peer_pb2_grpc.PeerServiceStub
) -> None:
    expect(
        grpc.StatusCode.NOT_FOUND,
        "unknown or expired",
        stub.FetchBlinded,
        peer_pb2.FetchRequest(session_id=str(uuid.uuid4())),
        timeout=5,
    )
    expect(
        INVALID,
        "without 'ispf-session-id' metadata",
        lambda: list(stub.Reblind(iter([]), timeout=5)),
    )
    req = hello(fed)
    stub.Handshake(req, timeout=5)
    with channel(fed, caller="kp") as ch:  # kp tries to use sindh's session
        kp = peer_pb2_grpc.PeerServiceStub(ch)
        expect(
            grpc.StatusCode.NOT_FOUND,
            "unknown or expired",
            kp.FetchBlinded,
            peer_pb2.FetchRequest(session_id=req.session_id),
            timeout=5,
        )


def test_steps_out_of_order(fed: Federation, stub: peer_pb2_grpc.PeerServiceStub) -> None:
    req = hello(fed)
    stub.Handshake(req, timeout=5)
    expect(
        INVALID,
        "before all values were exchanged",
        stub.Conclude,
        peer_pb2.ConcludeRequest(session_id=req.session_id),
        timeout=5,
    )
    count = hello(fed, mode=common_pb2.MODE_COUNT_ONLY, groups=[common_pb2.LabelGroup(size=1)])
    stub.Handshake(count, timeout=5)
    expect(
        INVALID,
        "not part of a count-only session",
        stub.ReturnTags,
        iter([chunk(count.session_id, 0, b"\x00" * 16)]),
        timeout=5,
        metadata=((SESSION_KEY, count.session_id),),
    )


def test_peer_that_goes_silent_is_expired(
    fed: Federation, stub: peer_pb2_grpc.PeerServiceStub
) -> None:
    req = hello(fed)
    stub.Handshake(req, timeout=5)
    time.sleep(1.5)  # the test federation forgets idle sessions after 1 s
    expect(
        grpc.StatusCode.NOT_FOUND,
        "unknown or expired",
        stub.FetchBlinded,
        peer_pb2.FetchRequest(session_id=req.session_id),
        timeout=5,
    )
    st = session_state(fed, req.session_id)
    assert st.state == internal_pb2.SESSION_STATE_FAILED and "went silent" in st.error


def test_peer_that_stops_mid_stream(fed: Federation, stub: peer_pb2_grpc.PeerServiceStub) -> None:
    req = hello(fed, n=5)
    some = points(fed, 3)  # before the Handshake: the federation expires idle sessions in 1 s
    release = threading.Event()
    stub.Handshake(req, timeout=5)

    def some_then_hang() -> Iterator[peer_pb2.BlindedChunk]:
        for i in range(3):  # the node reads a little ahead before it answers
            yield chunk(req.session_id, i, some[32 * i : 32 * i + 32])
        release.wait(10)

    call = stub.Reblind(some_then_hang(), timeout=10, metadata=((SESSION_KEY, req.session_id),))
    first = next(call)
    assert len(first.values) == 16
    call.cancel()
    release.set()
    deadline = time.monotonic() + 5
    while session_state(fed, req.session_id).state != internal_pb2.SESSION_STATE_FAILED:
        assert time.monotonic() < deadline, "the cancelled session was never failed"
        time.sleep(0.05)
    assert "cancelled" in session_state(fed, req.session_id).error


def test_abort_with_an_unprintable_reason(
    fed: Federation, stub: peer_pb2_grpc.PeerServiceStub
) -> None:
    req = hello(fed)
    stub.Handshake(req, timeout=5)
    stub.Abort(
        peer_pb2.AbortRequest(session_id=req.session_id, reason="\x00\x1b[31m" * 100), timeout=5
    )
    assert "no printable reason" in session_state(fed, req.session_id).error


def test_after_all_that_a_normal_session_is_still_correct(fed: Federation, tmp_path: Path) -> None:
    for a, b in (("sindh", "punjab"), ("punjab", "sindh")):
        st = fed.reconcile(a, b)
        assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
        assert st.match_count == 1
    matches = {(m.record_id, m.peer_programme) for m in fed.client("punjab").matches()}
    assert matches == {("P1", "SSPA")}
    assert_still_serving(fed)
    from dataclasses import replace

    from ispf_client.auditor import AuditProfile, verify
    from ispf_client.forum import write_audit_profile

    write_audit_profile(
        fed.layout, "auditor", {p: f"127.0.0.1:{port}" for p, port in fed.ports.items()}
    )
    prof = AuditProfile.load(fed.layout.auditor_dir("auditor") / "audit.toml")
    reports = verify(replace(prof, state=tmp_path / "s.json"))
    assert {r.node for r in reports} == {"punjab", "sindh", "kp"}
