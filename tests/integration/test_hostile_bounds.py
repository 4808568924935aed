"""A hostile peer with a valid certificate: what it may ask of a node is bounded.

The query budget stops it over several sessions (and a restart does not reset
it), one-shot steps answer once, idle sessions are capped, labels and free text
from it are checked or made safe; honest sessions complete meanwhile.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ispf.v1 import common_pb2, internal_pb2, peer_pb2, peer_pb2_grpc
from ispf_client.forum import write_policy
from ispf_server.pool import BlindingPool
from tests.conftest import Federation, start_federation
from tests.integration.test_hostile import channel, chunk, expect, hello, points, reblind

RUN = re.compile(r"\d{9,}")
# A session id's last group (12 hex digits) is all decimal digits about once in 280
# UUIDs: a run found inside a UUID is that, not an ID number.
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# Not in any registry here: if it shows up in a file, it came from the peer's text.
FOREIGN_ID = "4210155555551"


@pytest.fixture
def fed(tmp_path: Path, inline_pool: BlindingPool) -> Iterator[Federation]:
    f = start_federation(
        tmp_path,
        ["punjab", "sindh", "kp"],
        inline_pool,
        policy={"budget_multiple": 1, "budget_daily": 10, "max_open_sessions": 3},
        session_idle_timeout=30.0,
    )
    f.load("punjab", [(f"P{i}", f"35202{i:07d}1", "BISP", "enrolled") for i in range(12)])
    f.load("sindh", [("S1", "3520200000001", "SSPA", "enrolled")])
    f.load("kp", [("K1", "3520200000021", "KPSP", "enrolled")])
    yield f
    f.close()


def budget_of(fed: Federation, peer: str) -> internal_pb2.PeerBudget:
    listing = fed.client("punjab")._recon.ListPeers(internal_pb2.ListPeersRequest(), timeout=5)
    return next(b for b in listing.budgets if b.peer == peer)


def entries(fed: Federation, province: str) -> list[dict[str, object]]:
    from ispf.auditlog import decode_entry

    return [decode_entry(e) for e in fed.nodes[province].store.audit.entries()]


def test_budget_stops_a_peer_over_sessions_and_survives_restart(
    fed: Federation, inline_pool: BlindingPool
) -> None:
    # Declares 20 IDs: 1 x 20 + 10 for today = 30 values; three sessions of 10 fit.
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        for _ in range(3):
            req = hello(fed, n=10, registry_size=20)
            stub.Handshake(req, timeout=5)
            stub.Abort(peer_pb2.AbortRequest(session_id=req.session_id, reason="x"), timeout=5)
        b = budget_of(fed, "sindh")
        assert (b.declared, b.used, b.allowance, b.left) == (20, 30, 30, 0)
        expect(
            EXHAUSTED, "query budget of sindh", stub.Handshake, hello(fed, n=10, registry_size=20)
        )
    fed.restart("punjab", inline_pool)
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        expect(EXHAUSTED, "30 of 30 values used", stub.Handshake, hello(fed, n=1, registry_size=20))
    b = budget_of(fed, "sindh")
    assert (b.used, b.left, b.refused) == (30, 0, 2)
    # The real sindh node is that same peer: its run is refused too, and logged both sides.
    st = fed.reconcile("sindh", "punjab")
    assert st.state == internal_pb2.SESSION_STATE_FAILED
    assert "query budget" in st.error
    refusals = [e for e in entries(fed, "punjab") if e["type"] == "refusal"]
    assert [e["reason_code"] for e in refusals] == ["BudgetExhausted"] * 3
    assert refusals[0]["declared"] == 20
    failed = [e for e in entries(fed, "sindh") if e.get("session_id") == st.session_id]
    assert failed and failed[-1]["outcome"] == "failed" and "budget" in str(failed[-1]["reason"])
    metric = fed.nodes["punjab"].metrics.registry.get_sample_value(
        "ispf_query_budget_refused_total", {"peer": "sindh"}
    )
    assert metric == 2.0  # (counted since the restart)
    # As initiator too, punjab charges what sindh sends back for re-blinding.
    st = fed.reconcile("punjab", "sindh")
    assert st.state == internal_pb2.SESSION_STATE_FAILED
    assert "query budget of sindh" in st.error
    deadline = time.monotonic() + 5  # (the Abort reaches sindh after the session ends here)
    while not (mine := [e for e in entries(fed, "sindh") if e.get("session_id") == st.session_id]):
        assert time.monotonic() < deadline, "sindh never logged the aborted session"
        time.sleep(0.05)
    (theirs,) = mine
    assert theirs["outcome"] == "failed" and "budget" in str(theirs["reason"])
    # Another peer's budget is its own: kp's run completes.
    done = fed.reconcile("kp", "punjab")
    assert done.state == internal_pb2.SESSION_STATE_COMPLETED, done.error
    assert budget_of(fed, "kp").used == 1


def test_honest_runs_declare_their_registry_on_both_sides(fed: Federation) -> None:
    st = fed.reconcile("punjab", "sindh")
    assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
    for side in ("punjab", "sindh"):
        (e,) = [x for x in entries(fed, side) if x.get("session_id") == st.session_id]
        assert (e["initiator_declared"], e["responder_declared"]) == (12, 1)


def test_a_set_larger_than_the_declared_registry_is_refused(fed: Federation) -> None:
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            "not plausible",
            stub.Handshake,
            hello(fed, registry_size=int(FOREIGN_ID)),
        )
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            "larger than the registry of 5",
            stub.Handshake,
            hello(fed, n=10, registry_size=5),
        )


def filtered(f: Federation, n: int) -> peer_pb2.HandshakeRequest:
    req = hello(f, n=n)
    req.responder_collections.append("BISP")
    return req


def test_tiny_count_only_and_filtered_sets_are_refused(
    tmp_path: Path, inline_pool: BlindingPool
) -> None:
    f = start_federation(tmp_path, ["punjab", "sindh"], inline_pool, policy={"min_set_size": 50})
    try:
        f.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
        with channel(f, target="punjab") as ch:
            stub = peer_pb2_grpc.PeerServiceStub(ch)
            one = [common_pb2.LabelGroup(size=1)]
            expect(
                grpc.StatusCode.PERMISSION_DENIED,
                "count-only session needs a set of at least 50",
                stub.Handshake,
                hello(f, mode=common_pb2.MODE_COUNT_ONLY, groups=one),
            )
            expect(
                grpc.StatusCode.PERMISSION_DENIED,
                "filtered session needs a set of at least 50",
                stub.Handshake,
                filtered(f, 3),
            )
            stub.Handshake(filtered(f, 50), timeout=5)
    finally:
        f.close()


def test_digit_run_label_refused_at_load(fed: Federation) -> None:
    resp = fed.client("punjab").upsert(
        [
            internal_pb2.Record(
                record_id="X1",
                nid="3520299999991",
                programme="3520212345671",
                status="enrolled",
                position=1,
            ),
            internal_pb2.Record(
                record_id="X2",
                nid="3520299999992",
                programme="BISP",
                status="35202-1234567-1",
                position=2,
            ),
            internal_pb2.Record(
                record_id="X3", nid="3520299999993", programme="احساس", status="مستحق", position=3
            ),
        ]
    )
    assert resp.accepted == 1
    assert [(e.position, e.code) for e in resp.errors] == [
        (1, "programme.digits"),
        (2, "status.digits"),
    ]
    assert all(not RUN.search(e.reason) for e in resp.errors)


def test_digit_run_label_refused_at_handshake(fed: Federation) -> None:
    bad = common_pb2.LabelGroup(
        labels=[common_pb2.Label(programme="3520212345671", status="enrolled")], size=1
    )
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Handshake(hello(fed, groups=[bad]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "run of 9 or more digits" in (info.value.details() or "")
    assert not RUN.search(info.value.details() or "")


def test_a_responder_announcing_a_digit_run_label_is_refused(fed: Federation) -> None:
    # A label slipped into sindh's store (as by an older version) must not be accepted
    # by the initiator when sindh announces it.
    with sqlite3.connect(fed.nodes["sindh"].config.store) as db:
        db.execute("UPDATE records SET programme='3520212345671'")
    st = fed.reconcile("punjab", "sindh")
    assert st.state == internal_pb2.SESSION_STATE_FAILED
    assert "run of 9 or more digits" in st.error


def _files(directory: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()]


def test_abort_and_purpose_carrying_an_id_leave_no_digit_run(
    fed: Federation, all_logs: pytest.LogCaptureFixture
) -> None:
    node = fed.nodes["punjab"]
    dashed = f"{FOREIGN_ID[:5]}-{FOREIGN_ID[5:12]}-{FOREIGN_ID[12]}"
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        req = hello(fed)
        stub.Handshake(req, timeout=5)
        stub.Abort(
            peer_pb2.AbortRequest(
                session_id=req.session_id,
                reason=f"holder {FOREIGN_ID} or {dashed}\x1b[2J is ours " + "z" * 10_000,
            ),
            timeout=5,
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Handshake(hello(fed, purpose=f"find {FOREIGN_ID} " + "p" * 10_000), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert len(info.value.details() or "") < 400
        with pytest.raises(grpc.RpcError):
            stub.Handshake(hello(fed, session_id=f"{FOREIGN_ID}-{dashed}"), timeout=5)
        # A number the peer chose, quoted back in a reason (a chunk's sequence number).
        numbered = hello(fed, n=1)
        stub.Handshake(numbered, timeout=5)
        with pytest.raises(grpc.RpcError):
            reblind(
                stub,
                numbered.session_id,
                [chunk(numbered.session_id, int(FOREIGN_ID), points(fed, 1))],
            )
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            "is not held",
            stub.Handshake,
            hello(fed, epoch=int(FOREIGN_ID)),
        )
    deadline = time.monotonic() + 5  # (the stream's failure is recorded as it closes)
    while (failed := node.store.sessions.get(numbered.session_id)) is None or not failed.error:
        assert time.monotonic() < deadline, "the failed stream's session was never failed"
        time.sleep(0.05)
    assert "chunk [digits] arrived" in failed.error
    row = node.store.sessions.get(req.session_id)
    assert row is not None and row.state == "FAILED"
    assert "holder [digits]" in row.error and len(row.error) < 300
    texts = [r.getMessage() for r in all_logs.records]
    assert any("aborted by sindh: holder [digits]" in t for t in texts)
    for t in texts:
        assert not RUN.search(UUID.sub("<uuid>", t)), t
    for e in entries(fed, "punjab"):
        assert FOREIGN_ID[:9] not in str(e)
    for path, data in _files(node.store.directory):
        for form in (FOREIGN_ID, dashed, FOREIGN_ID[:9]):
            assert form.encode() not in data, path


def test_repeated_fetch_blinded_is_refused(fed: Federation) -> None:
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        req = hello(fed)
        stub.Handshake(req, timeout=5)
        first = list(stub.FetchBlinded(peer_pb2.FetchRequest(session_id=req.session_id), timeout=5))
        assert sum(len(c.values) for c in first) == 12 * 32
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            "FetchBlinded was already called",
            stub.FetchBlinded,
            peer_pb2.FetchRequest(session_id=req.session_id),
            timeout=5,
        )
    row = fed.nodes["punjab"].store.sessions.get(req.session_id)
    assert row is not None and row.state == "FAILED" and "already called" in row.error
    st = fed.reconcile("sindh", "punjab")  # an honest session still completes
    assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
    with channel(fed) as ch:  # its Witness was answered once: not again
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            "Witness was already called",
            stub.Witness,
            peer_pb2.WitnessRequest(session_id=st.session_id),
            timeout=5,
        )


def test_repeated_reblind_is_refused(fed: Federation) -> None:
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        req = hello(fed, n=2)
        stub.Handshake(req, timeout=5)
        two = points(fed, 2)
        assert len(reblind(stub, req.session_id, [chunk(req.session_id, 0, two)])) == 1
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            "Reblind was already called",
            reblind,
            stub,
            req.session_id,
            [chunk(req.session_id, 0, two)],
        )


def test_repeated_sync_state_plans_once(fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    from ispf_server.session import responder

    plans: list[str] = []
    real = responder.prepare

    def counted(*args: object, **kw: object) -> object:
        plans.append("plan")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(responder, "prepare", counted)
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        for _ in range(20):
            stub.GetSyncState(peer_pb2.SyncStateRequest(epoch=1), timeout=5)
            time.sleep(0.01)
    assert plans == ["plan"]
    st = fed.reconcile("sindh", "punjab")  # and the plan still serves the real run
    assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error


def test_a_flood_of_idle_sessions_is_refused_while_honest_ones_complete(
    tmp_path: Path, inline_pool: BlindingPool
) -> None:
    f = start_federation(tmp_path, ["punjab", "sindh", "kp"], inline_pool)
    try:
        f.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
        f.load("kp", [("K1", "3520212345671", "KPSP", "enrolled")])
        policy = f.nodes["punjab"].config.policy_file
        write_policy(
            policy, ["kp", "sindh"], version=2, settings={"min_set_size": 1, "max_open_sessions": 3}
        )
        with channel(f) as ch:
            stub = peer_pb2_grpc.PeerServiceStub(ch)
            for _ in range(3):
                stub.Handshake(hello(f), timeout=5)
            for _ in range(60):
                expect(EXHAUSTED, "at most 3 by policy", stub.Handshake, hello(f), timeout=5)
            # Another peer is not crowded out.
            st = f.reconcile("kp", "punjab")
            assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
            # The policy's idle time (now 1 s) fails the flood, and frees the slots.
            write_policy(
                policy,
                ["kp", "sindh"],
                version=3,
                settings={"min_set_size": 1, "max_open_sessions": 3, "session_idle_seconds": 1},
            )
            time.sleep(1.5)
            stub.Handshake(hello(f), timeout=5)
        open_now = [s for s in f.nodes["punjab"].responder._sessions.values() if s.peer == "sindh"]
        assert len(open_now) == 1
    finally:
        f.close()


def test_unknown_session_ids_stay_unknown(fed: Federation) -> None:
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        expect(
            grpc.StatusCode.NOT_FOUND,
            "unknown",
            stub.Witness,
            peer_pb2.WitnessRequest(session_id=str(uuid.uuid4())),
            timeout=5,
        )


def test_ispf_peers_shows_budget_used_and_left(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from ispf_client.cli import main
    from tests.integration.test_cli import write_profile

    st = fed.reconcile("sindh", "punjab")
    assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
    prof = str(write_profile(fed, "punjab", tmp_path))
    assert main(["peers", "--profile", prof]) == 0
    out = capsys.readouterr().out
    # sindh declared 1 ID: 1 x 1 + 10 for today = 11, and sent 1.
    assert "sindh" in out and "budget used 1 of 11 (10 left)" in out
    assert main(["peers", "--json", "--profile", prof]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {x["peer"]: (x["used"], x["left"]) for x in lines} == {"kp": (0, 10), "sindh": (1, 10)}


def test_streams_a_peer_holds_open_are_bounded_and_other_peers_are_served(
    fed: Federation,
) -> None:
    """A peer that opens Reblind streams and never sends (aborting each session to
    free its slot) holds at most MAX_PEER_STREAMS of the server's threads."""
    from ispf_server.guard import MAX_PEER_STREAMS
    from tests.integration.test_hostile import SESSION_KEY

    release = threading.Event()

    def silent() -> Iterator[peer_pb2.BlindedChunk]:
        release.wait(60)
        return
        yield  # (a generator that sends nothing until released)

    calls = []
    with channel(fed) as ch:
        stub = peer_pb2_grpc.PeerServiceStub(ch)
        try:
            for _ in range(MAX_PEER_STREAMS):
                req = hello(fed, n=2, registry_size=1000)
                stub.Handshake(req, timeout=5)
                calls.append(
                    stub.Reblind(silent(), timeout=60, metadata=((SESSION_KEY, req.session_id),))
                )
                time.sleep(0.2)  # (the call reaches the node's handler)
                stub.Abort(peer_pb2.AbortRequest(session_id=req.session_id, reason="x"), timeout=5)
            req = hello(fed, n=2, registry_size=1000)
            stub.Handshake(req, timeout=5)
            extra = stub.Reblind(silent(), timeout=10, metadata=((SESSION_KEY, req.session_id),))
            with pytest.raises(grpc.RpcError) as err:
                next(extra)
            assert err.value.code() == EXHAUSTED
            assert "calls streaming into this node" in (err.value.details() or "")
            # Another province is served meanwhile.
            st = fed.reconcile("kp", "punjab")
            assert st.state == internal_pb2.SESSION_STATE_COMPLETED, st.error
        finally:
            release.set()
            for c in calls:
                c.cancel()
            time.sleep(1.0)  # (the node logs each cancelled stream before the test ends)
