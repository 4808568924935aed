"""The initiating side of a session, run in a background thread of the node.

Own values go out on `Reblind` while the peer's values come in on
`FetchBlinded` and go back as tags on `ReturnTags`; the two directions run
concurrently, and blinding is pipelined through the process pool.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc

from ispf import logs
from ispf.auditlog import SignedCheckpoint
from ispf.blinding import POINT_BYTES, TAG_BYTES
from ispf.errors import IspfError, ProtocolViolation, ResultMismatch, from_rpc_error
from ispf.keys import BlindingKey, ForumSalt
from ispf.peertext import untrusted
from ispf.protocol import PROTOCOL_VERSION
from ispf.retry import retrying
from ispf.v1 import common_pb2, peer_pb2, peer_pb2_grpc
from ispf_server.audit import AuditLog
from ispf_server.budget import MAX_DECLARED, QueryBudget
from ispf_server.policy import PeerPolicy
from ispf_server.pool import BlindingPool, pipelined
from ispf_server.records import TagSpool
from ispf_server.session.core import (
    Outcome,
    Stopwatch,
    checked_chunks,
    count_common,
    in_thread,
    intersect,
)
from ispf_server.session.plan import Plan, parse_groups
from ispf_server.session.progress import COMPLETED, FAILED, Progress
from ispf_server.session.sync import (
    SyncSide,
    finish,
    parse_removed,
    prepare,
    state_fingerprints,
)
from ispf_server.storage import Store

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
SESSION_KEY = "ispf-session-id"
T = TypeVar("T")


@dataclass(frozen=True)
class SessionRequest:
    session_id: str
    peer: str
    purpose: str
    mode: int
    peer_collections: frozenset[str]
    # Sync: use the pair's fixed keys and kept state (incremental when possible).
    sync: bool = False
    force_full: bool = False


@dataclass(frozen=True)
class Deadlines:
    call: float
    session: float


class _Captured:
    """Errors raised inside request iterators, which gRPC would otherwise swallow."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def wrap(self, gen: Iterator[T]) -> Iterator[T]:
        try:
            yield from gen
        except BaseException as exc:
            self.errors.append(exc)

    def reraise(self) -> None:
        if self.errors:
            raise self.errors[0]


class Initiator:
    def __init__(
        self,
        *,
        province: str,
        request: SessionRequest,
        planner: Callable[[], Plan] | None,
        stub: peer_pb2_grpc.PeerServiceStub,
        store: Store,
        pool: BlindingPool,
        salt: ForumSalt,
        progress: Progress,
        chunk_values: int,
        max_set_size: int,
        deadlines: Deadlines,
        audit: AuditLog,
        pair_lock: threading.Lock | None = None,
        peer_policy: PeerPolicy | None = None,
        budget: QueryBudget | None = None,
    ) -> None:
        self.budget = budget or QueryBudget(store)
        self.province = province
        self.req = request
        # The plan of a session without pair state (None: a sync session's side plans).
        self.planner = planner
        self.stub = stub
        self.store = store
        self.pool = pool
        self.salt = salt
        self.progress = progress
        self.chunk_values = chunk_values
        self.max_set_size = max_set_size
        self.deadlines = deadlines
        self.audit = audit
        self.pair_lock = pair_lock
        # The request that started the session, for its log lines (set in this thread).
        self.request_id = logs.REQUEST_ID.get()
        self.peer_policy = peer_policy or PeerPolicy(request.peer, frozenset())
        self.side: SyncSide | None = None
        self.plan: Plan | None = None
        self.key = BlindingKey.generate()
        self.md = ((SESSION_KEY, request.session_id),)
        # What is known so far, for the audit entry (also of a failed session).
        self.sizes = {"own": 0, "peer": 0, "own_groups": 0, "peer_groups": 0}

    @property
    def labelled(self) -> bool:
        return self.req.mode == common_pb2.MODE_MUTUAL

    def run(self) -> None:
        """Run the session to the end; failures are recorded, never raised."""
        with logs.bound(request_id=self.request_id, session_id=self.req.session_id):
            self._run_guarded()

    def _run_guarded(self) -> None:
        sid = self.req.session_id
        lock = self.pair_lock
        if lock is not None and not lock.acquire(timeout=self.deadlines.session):
            self._fail(f"another session with {self.req.peer} did not finish in time", True)
            return
        try:
            self._run()
        except IspfError as exc:
            self._fail(exc.message, exc.code in RETRIABLE_SESSION)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            self._fail(f"peer {self.req.peer}: {err.message}", err.code in RETRIABLE_SESSION)
        except Exception:
            log.exception("session %s: unexpected failure", sid)
            self._fail("internal error (see the node log)", False)
        finally:
            if self.plan is not None:
                self.plan.close()  # (a spooled send order's file)
            if lock is not None:
                lock.release()

    def _fail(self, reason: str, retriable: bool) -> None:
        reason = untrusted(reason, 300)  # (it may quote what the peer sent)
        sid = self.req.session_id
        log.warning("session %s with %s failed: %s", sid, self.req.peer, reason)
        entry = self._entry("failed", reason=reason)
        if self.store.sessions.fail(sid, reason, entry, retriable=retriable):
            self.audit.sign_checkpoint()
        self.progress.finish(FAILED, error=reason, retriable=retriable)
        # The peer may be gone or already know; its own idle timeout cleans up then.
        with contextlib.suppress(grpc.RpcError):
            self.stub.Abort(
                peer_pb2.AbortRequest(session_id=sid, reason=reason[:200]),
                timeout=self.deadlines.call,
            )

    def _entry(
        self, outcome: str, *, result: Outcome | None = None, reason: str | None = None
    ) -> bytes:
        return self.audit.session_entry(
            session_id=self.req.session_id,
            initiator=self.province,
            responder=self.req.peer,
            purpose=self.req.purpose,
            epoch=self.salt.epoch,
            mode=self.req.mode,
            outcome=outcome,
            initiator_values=self.sizes["own"],
            responder_values=self.sizes["peer"],
            initiator_groups=self.sizes["own_groups"],
            responder_groups=self.sizes["peer_groups"],
            match_count=result.match_count if result else None,
            result_digest=result.digest if result else b"",
            reason=reason,
            sync=self._sync_kind(),
            initiator_removed=len(self.side.removed_tags) if self.side else 0,
            responder_removed=self.sizes.get("peer_removed", 0),
            initiator_declared=self.sizes.get("own_declared", 0),
            responder_declared=self.sizes.get("peer_declared", 0),
        )

    def _sync_kind(self) -> str:
        if self.side is None:
            return "none"
        return "incremental" if self.side.incremental else "full"

    def _prepare_sync(self) -> SyncSide:
        """Incremental if both sides hold the same state for the pair; else a full run."""
        epoch = self.salt.epoch
        remote = retrying(
            lambda: self.stub.GetSyncState(
                peer_pb2.SyncStateRequest(epoch=epoch), timeout=self.deadlines.call
            ),
            f"session {self.req.session_id} GetSyncState",
        )
        local = state_fingerprints(self.store, self.req.peer, epoch, self.peer_policy)
        incremental = (
            not self.req.force_full
            and local is not None
            and remote.held
            and local == (remote.initiator_set, remote.responder_set)
        )
        return prepare(self.store, self.peer_policy, self.req.peer, epoch, incremental=incremental)

    def _run(self) -> None:
        sid, cfg = self.req.session_id, self.deadlines
        clock = Stopwatch()
        side = self.side = self._prepare_sync() if self.req.sync else None
        if side is not None:
            plan, self.key = side.plan, side.key
        elif self.planner is not None:
            plan = self.planner()
        else:
            raise ValueError("a session without pair state needs a planner")
        self.plan = plan
        clock.lap("prepare")
        groups = plan.to_proto() if self.labelled else [common_pb2.LabelGroup(size=plan.total)]
        # (never below the set sent: the registry may have shrunk since the plan)
        declared = self.sizes["own_declared"] = max(self.store.registry.distinct_ids(), plan.total)
        hs = self.stub.Handshake(
            peer_pb2.HandshakeRequest(
                protocol_version=PROTOCOL_VERSION,
                session_id=sid,
                epoch=self.salt.epoch,
                key_check=self.salt.key_check(),
                purpose=self.req.purpose,
                mode=self.req.mode,  # type: ignore[arg-type]
                responder_collections=sorted(self.req.peer_collections),
                groups=groups,
                sync=side is not None,
                incremental=side is not None and side.incremental,
                removed=b"".join(side.removed_tags) if side else b"",
                state=side.own_fp + side.peer_fp if side and side.incremental else b"",
                witnessed_size=self.audit.witnessed_size(self.req.peer),
                registry_size=declared,
            ),
            timeout=cfg.call,
        )
        if hs.checkpoint:  # a fork of the peer's log fails the session before any commit
            self.audit.accept_peer_checkpoint(self.req.peer, hs.checkpoint, list(hs.consistency))
        clock.lap("handshake")
        peer_removed = (
            parse_removed(
                hs.removed,
                lambda ts: self.store.pairs.peer_labels_for(self.req.peer, self.salt.epoch, ts),
                self.req.peer,
            )
            if side
            else []
        )
        peer_groups, peer_sizes = parse_groups(
            list(hs.groups), labelled=self.labelled, max_total=self.max_set_size
        )
        peer_total = sum(peer_sizes)
        self.sizes = {
            "own": plan.total,
            "peer": peer_total,
            "own_groups": len(groups),
            "peer_groups": len(peer_groups),
            "peer_removed": len(peer_removed),
            "own_declared": declared,
            "peer_declared": hs.registry_size,
        }
        # (checked once the sizes are known: the failed session's entry shows them)
        if hs.registry_size >= MAX_DECLARED:
            raise ProtocolViolation(
                f"{self.req.peer} declares an implausible registry size (a billion or more)"
            )
        if hs.registry_size and peer_total > hs.registry_size:
            raise ProtocolViolation(
                f"{self.req.peer} sends a set of {peer_total} values, larger than the "
                f"registry of {hs.registry_size} IDs it declares"
            )
        if self.labelled:  # (mutual: its values come back re-blinded, so they are questions)
            self.budget.charge(
                self.peer_policy,
                self.salt.epoch,
                peer_total,
                declared=hs.registry_size,
                what="session's set (as responder)",
            )
        own_records = side.own_records if side else plan.own_records
        self.progress.update(
            sync=self._sync_kind() if side else "",
            own_removed=len(side.removed_tags) if side else 0,
            peer_removed=len(peer_removed),
            phase="exchange",
            own_records=own_records,
            own_values=plan.total,
            peer_values=peer_total,
            work_total=plan.total + peer_total,
        )
        log.info(
            "session %s with %s: %d own values, %d peer values",
            sid,
            self.req.peer,
            plan.total,
            peer_total,
        )
        # Both directions' tags go to disk as they come (spool.py), and are freed there
        # once matched.
        with (
            TagSpool(self.store.directory) as own_tags,
            TagSpool(self.store.directory) as peer_tags,
        ):
            own_error: list[BaseException] = []

            def own_direction() -> None:
                try:
                    self._send_own(plan, own_tags)
                except BaseException as exc:
                    own_error.append(exc)

            worker = threading.Thread(target=own_direction, name=f"session-{sid[:8]}-own")
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
                raise ProtocolViolation(
                    f"peer returned {own_tags.count} tags for {plan.total} values"
                )
            clock.lap("exchange")
            self.progress.update(phase="intersect")
            synced = None
            if side is not None:
                synced = finish(
                    side,
                    own_tags,
                    peer_groups,
                    peer_sizes,
                    peer_tags,
                    peer_removed,
                    stage_rows=partial(self.store.sessions.stage_matches, sid),
                )
                outcome = synced.outcome
            elif self.labelled:
                outcome = intersect(
                    plan,
                    own_tags,
                    peer_groups,
                    peer_sizes,
                    peer_tags,
                    directory=self.store.directory,
                    stage_rows=partial(self.store.sessions.stage_matches, sid),
                )
            else:
                common = count_common(own_tags, peer_tags, self.store.directory)
                outcome = Outcome(common, b"", [])
        clock.lap("match")
        conclude = peer_pb2.ConcludeRequest(
            session_id=sid,
            match_count=outcome.match_count if self.labelled else 0,
            result_digest=outcome.digest,
            witnessed_size=self.audit.witnessed_size(self.req.peer),
            state=synced.state_after if synced else b"",
            **self._own_checkpoint(hs.witnessed_size),
        )
        # Safe to repeat: the peer answers a repeated Conclude with its first answer.
        asking = in_thread(
            lambda: retrying(
                lambda: self.stub.Conclude(conclude, timeout=cfg.call), f"session {sid} Conclude"
            ),
            f"conclude-{sid[:8]}",
        )
        if synced is not None:  # our result and state, written ahead while the peer concludes
            self.store.sessions.stage_result(
                sid, self.req.peer, self.salt.epoch, synced.delta, outcome.matches
            )
        answer = asking.result()
        clock.lap("conclude")
        if self.labelled and not (
            answer.agreed
            and answer.match_count == outcome.match_count
            and hmac.compare_digest(answer.result_digest, outcome.digest)
        ):
            raise ResultMismatch(
                f"result differs: node {self.province} found {outcome.match_count} matches, "
                f"peer {self.req.peer} found {answer.match_count}"
            )
        # The peer's checkpoint must extend the last one we saw from it; it goes in our entry.
        peer_checkpoint = self.audit.accept_peer_checkpoint(
            self.req.peer, answer.checkpoint, list(answer.consistency)
        )
        self.store.sessions.complete(
            sid,
            own_records=own_records,
            sync=self._sync_kind() if side else "",
            own_removed=len(side.removed_tags) if side else 0,
            peer_removed=len(peer_removed),
            own_values=plan.total,
            peer_values=peer_total,
            match_count=outcome.match_count,
            result_digest=outcome.digest,
            matches=outcome.matches,
            entry=self._entry("completed", result=outcome),
            pair_delta=(self.req.peer, self.salt.epoch, synced.delta) if synced else None,
            matches_staged=synced is not None or outcome.staged_records is not None,
            matched_records=outcome.matched_records,
        )
        clock.lap("commit")
        self._witness(answer, peer_checkpoint)
        clock.lap("witness")
        self.progress.finish(
            COMPLETED,
            match_count=outcome.match_count,
            result_digest=outcome.digest,
            matched_records=outcome.matched_records,
        )
        log.info(
            "session %s with %s completed: %d matches (%s)",
            sid,
            self.req.peer,
            outcome.match_count,
            clock,
        )

    def _own_checkpoint(self, first: int) -> dict[str, Any]:
        """Our current checkpoint and its proof from the size the peer last verified."""
        signed = self.audit.sign_checkpoint()
        size = self.audit.size()
        proof = self.audit.consistency(first, size) if 0 < first <= size else []
        return {"checkpoint": signed, "consistency": proof}

    def _witness(
        self, answer: peer_pb2.ConcludeResponse, peer_checkpoint: SignedCheckpoint
    ) -> None:
        """Send our new checkpoint and our cosignature on the peer's; store its cosignature."""
        signed = self.audit.sign_checkpoint()
        size = self.audit.size()
        first = answer.witnessed_size
        try:
            resp = self.stub.Witness(
                peer_pb2.WitnessRequest(
                    session_id=self.req.session_id,
                    checkpoint=signed,
                    consistency=self.audit.consistency(first, size) if 0 < first <= size else [],
                    cosignature=self.audit.cosign(peer_checkpoint),
                ),
                timeout=self.deadlines.call,
            )
            self.audit.add_cosignature(self.req.peer, resp.cosignature)
        except grpc.RpcError as exc:
            # The session stands; only the cross-signature is missing (auditors will see).
            log.warning(
                "session %s: %s did not cosign our checkpoint: %s",
                self.req.session_id,
                self.req.peer,
                from_rpc_error(exc).message,
            )
        except IspfError as exc:
            log.warning(
                "session %s: cosignature from %s rejected: %s",
                self.req.session_id,
                self.req.peer,
                exc.message,
            )

    def _stream_call(
        self,
        call: Callable[[Iterator[peer_pb2.BlindedChunk]], T],
        requests: Iterator[peer_pb2.BlindedChunk],
    ) -> T:
        captured = _Captured()
        try:
            result = call(captured.wrap(requests))
        except grpc.RpcError:
            captured.reraise()  # our own failure explains the peer's complaint
            raise
        captured.reraise()
        return result

    def _send_own(self, plan: Plan, tags: TagSpool) -> None:
        """Stream own blinded values; collect the peer's tags for them, in order."""
        sid = self.req.session_id
        sizes: deque[int] = deque()

        def requests() -> Iterator[peer_pb2.BlindedChunk]:
            results = pipelined(
                lambda d: self.pool.hash_and_blind(self.salt, self.key, d),
                plan.chunks(self.chunk_values),
                self.pool.depth,
            )
            for seq, (digits, packed) in enumerate(results):
                sizes.append(len(digits))
                self.progress.add(blinded=len(digits), work_done=len(digits))
                yield peer_pb2.BlindedChunk(session_id=sid, seq=seq, values=packed)
                self.progress.add(sent=len(digits))

        def call(reqs: Iterator[peer_pb2.BlindedChunk]) -> None:
            responses = self.stub.Reblind(reqs, timeout=self.deadlines.session, metadata=self.md)
            payloads = (
                self._in_step(responses, sizes)
                if self.labelled
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
                self.progress.add(received=len(payload) // TAG_BYTES)

        self._stream_call(call, requests())

    def _in_step(
        self, responses: Iterable[peer_pb2.BlindedChunk], sizes: deque[int]
    ) -> Iterator[bytes]:
        """Mutual mode: answer chunk i must hold exactly the tags for request chunk i."""
        sid = self.req.session_id
        for seq, ch in enumerate(responses):
            if (
                ch.session_id != sid
                or ch.seq != seq
                or not sizes
                or len(ch.values) != sizes.popleft() * TAG_BYTES
            ):
                raise ProtocolViolation(f"Reblind answer chunk {seq} does not match request")
            yield ch.values
        if sizes:
            raise ProtocolViolation("Reblind answer ended early")

    def _answer_peer(self, peer_total: int, tags: TagSpool) -> None:
        """Re-blind the peer's values into tags; in mutual mode send them back."""
        sid = self.req.session_id
        fetched = self.stub.FetchBlinded(
            peer_pb2.FetchRequest(session_id=sid), timeout=self.deadlines.session
        )

        def tag_chunks() -> Iterator[peer_pb2.BlindedChunk]:
            values = checked_chunks(
                fetched,
                session_id=sid,
                item_bytes=POINT_BYTES,
                announced=peer_total,
                what="FetchBlinded",
            )
            results = pipelined(
                lambda v: self.pool.reblind(self.key, v, TAG_BYTES), values, self.pool.depth
            )
            for seq, (_, t) in enumerate(results):
                tags.append(t)
                n = len(t) // TAG_BYTES
                self.progress.add(received=n, work_done=n)
                yield peer_pb2.BlindedChunk(session_id=sid, seq=seq, values=t)
                self.progress.add(sent=n)

        if self.labelled:
            answer = self._stream_call(
                lambda reqs: self.stub.ReturnTags(
                    reqs, timeout=self.deadlines.session, metadata=self.md
                ),
                tag_chunks(),
            )
            if answer.received != peer_total:
                raise ProtocolViolation(f"peer acknowledged {answer.received} of {peer_total} tags")
        else:
            for _ in tag_chunks():
                pass
