"""The initiating side of a session, run in a background thread of the node: the
order of its calls to the peer.

Own values go out on `Reblind` while the peer's values come in on
`FetchBlinded` and go back as tags on `ReturnTags`; the two directions run
concurrently, and blinding is pipelined through the process pool.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc

from ispf import logs
from ispf.auditlog import SignedCheckpoint
from ispf.blinding import POINT_BYTES, TAG_BYTES
from ispf.errors import IspfError, ProtocolViolation, from_rpc_error
from ispf.keys import BlindingKey, ForumSalt
from ispf.protocol import PROTOCOL_VERSION
from ispf.retry import retrying
from ispf.v1 import common_pb2, peer_pb2, peer_pb2_grpc
from ispf_server.budget import check_declared
from ispf_server.policy import PeerPolicy, Policy
from ispf_server.records import TagSpool
from ispf_server.session.exchange import (
    SESSION_KEY,
    blinded,
    checked_chunks,
    chunk_stream,
    in_step,
    in_thread,
    parse_removed,
    reblinded,
    stream_call,
)
from ispf_server.session.facts import INITIATOR, SessionFacts, SyncKind
from ispf_server.session.lifecycle import Lifecycle, SessionContext
from ispf_server.session.match import Matched
from ispf_server.session.plan import (
    Plan,
    SyncSide,
    check_collections,
    one_off_plan,
    parse_groups,
    prepare,
    state_fingerprints,
)
from ispf_server.session.progress import Progress, ProgressBoard
from ispf_server.storage.store import PairLock

log = logging.getLogger(__name__)
# Causes a new session may get past: the peer down or restarted (its session lost),
# the connection dropped, a deadline, the pair busy.
RETRIABLE_SESSION = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.NOT_FOUND,
    }
)


@dataclass(frozen=True)
class Ask:
    """What the node is asked to run with a peer."""

    peer: str
    purpose: str
    mode: int
    collections: frozenset[str] = frozenset()  # own collections (empty: all the policy allows)
    peer_collections: frozenset[str] = frozenset()
    full: bool = False  # a sync session: a full run even where an incremental one would do


@dataclass(frozen=True)
class SessionRequest:
    """What the node asked of this session, beyond its facts."""

    policy: PeerPolicy  # the node's policy for the peer: binds it as initiator too
    salt: ForumSalt
    peer_collections: frozenset[str]
    # The plan of a one-off session; None: a sync session, planned from the pair's
    # kept state (incremental where both sides hold the same, unless `force_full`).
    planner: Callable[[], Plan] | None
    force_full: bool = False


@dataclass(frozen=True)
class Peer:
    """The peer's end: its stub, the deadlines, the pair's lock (sync sessions)."""

    stub: peer_pb2_grpc.PeerServiceStub
    call_deadline: float
    session_deadline: float
    pair_lock: PairLock | None = None


def initiate(
    ctx: SessionContext,
    board: ProgressBoard,
    ask: Ask,
    *,
    policy: Policy,
    salt: ForumSalt,
    peer: Callable[[bool], Peer],
) -> Initiator:
    """A session the node starts (its row and status begun), ready to `run`; `peer`
    gives the peer's end for a sync session (True) or a one-off (False)."""
    count_only = ask.mode == common_pb2.MODE_COUNT_ONLY
    # The node's own policy binds it as initiator too: what the peer may learn.
    pp = policy.check_session(ask.peer, ask.purpose, count_only)
    # Mutual runs over everything the policy allows keep state, for incremental runs
    # and online checks; filtered or count-only runs are one-offs with fresh keys.
    sync = not count_only and not ask.collections and not ask.peer_collections
    planner = None
    if not sync:  # (collections not open to the peer are refused now, not in the session)
        check_collections(pp, ask.collections)
        planner = partial(one_off_plan, ctx.store, pp, ask.collections, labelled=not count_only)
    facts = SessionFacts(
        session_id=str(uuid.uuid4()),
        province=ctx.province,
        peer=ask.peer,
        role=INITIATOR,
        purpose=ask.purpose,
        epoch=salt.epoch,
        mode=ask.mode,
    )
    life = Lifecycle.begin(facts, ctx, board, phase="handshake")
    request = SessionRequest(pp, salt, ask.peer_collections, planner, force_full=ask.full)
    return Initiator(life, request, peer(sync))


class Initiator:
    def __init__(self, life: Lifecycle, request: SessionRequest, peer: Peer) -> None:
        self.life = life
        self.facts = life.facts
        self.ctx = life.ctx
        self.req = request
        self.peer = peer
        self.stub = peer.stub
        # The request that started the session, for its log lines (set in this thread).
        self.request_id = logs.REQUEST_ID.get()
        self.side: SyncSide | None = None
        self.plan: Plan | None = None
        self.key = BlindingKey.generate()
        self.md = ((SESSION_KEY, self.facts.session_id),)

    @property
    def progress(self) -> Progress:
        return self.life.progress

    def run(self) -> None:
        """Run the session to the end; failures are recorded, never raised."""
        with logs.bound(request_id=self.request_id, session_id=self.facts.session_id):
            self._run_guarded()

    def _run_guarded(self) -> None:
        lock = self.peer.pair_lock
        # (a compaction of the pair's state, holding the lock or waiting, stops for us)
        if lock is not None and not lock.acquire_asking(self.peer.session_deadline):
            self._fail(f"another session with {self.facts.peer} did not finish in time", True)
            return  # (it staged nothing: the pair's staging, if any, is the holder's)
        try:
            self._run()
        except IspfError as exc:
            self._fail(exc.message, exc.code in RETRIABLE_SESSION)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            self._fail(f"peer {self.facts.peer}: {err.message}", err.code in RETRIABLE_SESSION)
        except Exception:
            log.exception("session %s: unexpected failure", self.facts.session_id)
            self._fail("internal error (see the node log)", False)
        finally:
            if self.plan is not None:
                self.plan.close()  # (a spooled send order's file)
            if lock is not None:
                lock.release()

    def _fail(self, reason: str, retriable: bool) -> None:
        # (what it staged goes with it: its matching ran in this thread, and has ended)
        reason = self.life.fail(reason, retriable=retriable)
        # The peer may be gone or already know; its own idle timeout cleans up then.
        with contextlib.suppress(grpc.RpcError):
            self.stub.Abort(
                peer_pb2.AbortRequest(session_id=self.facts.session_id, reason=reason[:200]),
                timeout=self.peer.call_deadline,
            )

    def _prepare_sync(self) -> SyncSide:
        """Incremental if both sides hold the same state for the pair; else a full run."""
        f = self.facts
        remote = retrying(
            lambda: self.stub.GetSyncState(
                peer_pb2.SyncStateRequest(epoch=f.epoch), timeout=self.peer.call_deadline
            ),
            f"session {f.session_id} GetSyncState",
        )
        local = state_fingerprints(self.ctx.store, f.peer, f.epoch, self.req.policy)
        incremental = (
            not self.req.force_full
            and local is not None
            and remote.held
            and local == (remote.initiator_set, remote.responder_set)
        )
        return prepare(self.ctx.store, self.req.policy, f.peer, f.epoch, incremental=incremental)

    def _plan(self) -> Plan:
        """This side's plan: of the pair's kept state, or the node's planner."""
        if self.req.planner is None:
            side = self.side = self._prepare_sync()
            self.key = side.key
            return side.plan
        return self.req.planner()

    def _run(self) -> None:
        f, ctx, life = self.facts, self.ctx, self.life
        plan = self.plan = self._plan()
        side = self.side
        life.clock.lap("prepare")
        groups = plan.wire_groups(f.labelled)
        f.own_side(plan, side, ctx.store.registry.distinct_ids())
        hs = self.stub.Handshake(
            peer_pb2.HandshakeRequest(
                protocol_version=PROTOCOL_VERSION,
                session_id=f.session_id,
                epoch=f.epoch,
                key_check=self.req.salt.key_check(),
                purpose=f.purpose,
                mode=f.mode,  # type: ignore[arg-type]
                responder_collections=sorted(self.req.peer_collections),
                groups=groups,
                sync=side is not None,
                incremental=f.sync is SyncKind.INCREMENTAL,
                removed=side.removed_wire if side else b"",
                state=(
                    side.own_fp + side.peer_fp if side and f.sync is SyncKind.INCREMENTAL else b""
                ),
                witnessed_size=ctx.audit.witnessed_size(f.peer),
                registry_size=f.own_declared,
            ),
            timeout=self.peer.call_deadline,
        )
        if hs.checkpoint:  # a fork of the peer's log fails the session before any commit
            ctx.audit.accept_peer_checkpoint(f.peer, hs.checkpoint, list(hs.consistency))
        life.clock.lap("handshake")
        peer_removed = (
            parse_removed(
                hs.removed,
                lambda ts: ctx.store.pairs.peer_labels_for(f.peer, f.epoch, ts),
                f.peer,
            )
            if side
            else []
        )
        peer_groups, peer_sizes = parse_groups(
            list(hs.groups), labelled=f.labelled, max_total=self.req.policy.max_set_size
        )
        peer_total = sum(peer_sizes)
        f.peer_values = peer_total
        f.own_groups, f.peer_groups = len(groups), len(peer_groups)
        f.peer_removed, f.peer_declared = len(peer_removed), hs.registry_size
        # (checked once the sizes are known: the failed session's entry shows them)
        check_declared(f.peer, peer_total, hs.registry_size)
        if f.labelled:  # (mutual: its values come back re-blinded, so they are questions)
            ctx.budget.charge(
                self.req.policy,
                f.epoch,
                peer_total,
                declared=hs.registry_size,
                what="session's set (as responder)",
            )
        life.known("exchange")
        log.info(
            "session %s with %s: %d own values, %d peer values",
            f.session_id,
            f.peer,
            plan.total,
            peer_total,
        )
        matcher = life.matcher(plan, side, peer_groups, peer_sizes, peer_removed)
        assert matcher is not None  # (the initiator learns every kind of result)
        # Both directions' tags go to disk as they come (spool.py), and are freed there
        # once matched.
        with TagSpool(ctx.store.directory) as own_tags, TagSpool(ctx.store.directory) as peer_tags:
            self._exchange(plan, peer_total, own_tags, peer_tags)
            life.clock.lap("exchange")
            self.progress.update(phase="intersect")
            matched = matcher.match(own_tags, peer_tags)
        life.clock.lap("match")
        answer = self._conclude(matched, hs.witnessed_size)
        life.clock.lap("conclude")
        life.agree(matched.outcome, answer.match_count, answer.result_digest, also=answer.agreed)
        # The peer's checkpoint must extend the last one we saw from it; it goes in our entry.
        peer_checkpoint = ctx.audit.accept_peer_checkpoint(
            f.peer, answer.checkpoint, list(answer.consistency)
        )
        life.commit(matched)
        life.clock.lap("commit")
        self._witness(answer, peer_checkpoint)
        life.clock.lap("witness")
        life.completed(matched.outcome)

    def _exchange(
        self, plan: Plan, peer_total: int, own_tags: TagSpool, peer_tags: TagSpool
    ) -> None:
        """Both directions at once: own values out (their tags back), the peer's in."""
        own_error: list[BaseException] = []

        def own_direction() -> None:
            try:
                self._send_own(plan, own_tags)
            except BaseException as exc:
                own_error.append(exc)

        worker = threading.Thread(
            target=own_direction, name=f"session-{self.facts.session_id[:8]}-own"
        )
        worker.start()
        try:
            self._answer_peer(peer_total, peer_tags)
        except grpc.RpcError:
            worker.join()
            if own_error:  # our own failure (a self-check, say) explains the peer's
                raise own_error[0] from None
            raise
        finally:
            worker.join()
        if own_error:
            raise own_error[0]
        if own_tags.count != plan.total:
            raise ProtocolViolation(f"peer returned {own_tags.count} tags for {plan.total} values")

    def _conclude(self, matched: Matched, first: int) -> peer_pb2.ConcludeResponse:
        """Our result to the peer, while ours (with pair state) is written ahead."""
        f, audit = self.facts, self.ctx.audit
        out = matched.outcome
        conclude = peer_pb2.ConcludeRequest(
            session_id=f.session_id,
            match_count=out.match_count if f.labelled else 0,
            result_digest=out.digest,
            witnessed_size=audit.witnessed_size(f.peer),
            state=matched.state_after,
            **self._own_checkpoint(first),
        )
        # Safe to repeat: the peer answers a repeated Conclude with its first answer.
        asking = in_thread(
            lambda: retrying(
                lambda: self.stub.Conclude(conclude, timeout=self.peer.call_deadline),
                f"session {f.session_id} Conclude",
            ),
            f"conclude-{f.session_id[:8]}",
        )
        self.life.stage(matched)
        return asking.result()

    def _own_checkpoint(self, first: int) -> dict[str, Any]:
        """Our current checkpoint and its proof from the size the peer last verified."""
        signed, proof = self.ctx.audit.checkpoint_for(first)
        return {"checkpoint": signed, "consistency": proof}

    def _witness(
        self, answer: peer_pb2.ConcludeResponse, peer_checkpoint: SignedCheckpoint
    ) -> None:
        """Send our new checkpoint and our cosignature on the peer's; store its cosignature."""
        f, audit = self.facts, self.ctx.audit
        try:
            resp = self.stub.Witness(
                peer_pb2.WitnessRequest(
                    session_id=f.session_id,
                    cosignature=audit.cosign(peer_checkpoint, at=int(time.time())),
                    **self._own_checkpoint(answer.witnessed_size),
                ),
                timeout=self.peer.call_deadline,
            )
            audit.add_cosignature(f.peer, resp.cosignature)
        except grpc.RpcError as exc:
            # The session stands; only the cross-signature is missing (auditors will see).
            log.warning(
                "session %s: %s did not cosign our checkpoint: %s",
                f.session_id,
                f.peer,
                from_rpc_error(exc).message,
            )
        except IspfError as exc:
            log.warning(
                "session %s: cosignature from %s rejected: %s", f.session_id, f.peer, exc.message
            )

    def _send_own(self, plan: Plan, tags: TagSpool) -> None:
        """Stream own blinded values; collect the peer's tags for them, in order."""
        sid, ctx, progress = self.facts.session_id, self.ctx, self.progress
        sizes: deque[int] = deque()

        def requests() -> Iterator[peer_pb2.BlindedChunk]:
            chunks = blinded(ctx.pool, self.req.salt, self.key, plan.chunks(ctx.chunk_values))
            for seq, (n, packed) in enumerate(chunks):
                sizes.append(n)
                progress.add(blinded=n, work_done=n)
                yield peer_pb2.BlindedChunk(session_id=sid, seq=seq, values=packed)
                progress.add(sent=n)

        def call(reqs: Iterator[peer_pb2.BlindedChunk]) -> None:
            responses = self.stub.Reblind(
                reqs, timeout=self.peer.session_deadline, metadata=self.md
            )
            payloads = (
                in_step(responses, sid, sizes)
                if self.facts.labelled
                else checked_chunks(
                    responses,
                    session_id=sid,
                    item_bytes=TAG_BYTES,
                    announced=plan.total,
                    what="Reblind answer",
                )
            )
            for payload in payloads:
                tags.append(payload)
                progress.add(received=len(payload) // TAG_BYTES)

        stream_call(call, requests())

    def _answer_peer(self, peer_total: int, tags: TagSpool) -> None:
        """Re-blind the peer's values into tags; in mutual mode send them back."""
        sid, progress = self.facts.session_id, self.progress
        fetched = self.stub.FetchBlinded(
            peer_pb2.FetchRequest(session_id=sid), timeout=self.peer.session_deadline
        )

        def tag_payloads() -> Iterator[bytes]:
            values = checked_chunks(
                fetched,
                session_id=sid,
                item_bytes=POINT_BYTES,
                announced=peer_total,
                what="FetchBlinded",
            )
            for t in reblinded(self.ctx.pool, self.key, values):
                tags.append(t)
                n = len(t) // TAG_BYTES
                progress.add(received=n, work_done=n)
                yield t
                progress.add(sent=n)

        if self.facts.labelled:
            answer = stream_call(
                lambda reqs: self.stub.ReturnTags(
                    reqs, timeout=self.peer.session_deadline, metadata=self.md
                ),
                chunk_stream(sid, tag_payloads()),
            )
            if answer.received != peer_total:
                raise ProtocolViolation(f"peer acknowledged {answer.received} of {peer_total} tags")
        else:
            for _ in tag_payloads():
                pass
