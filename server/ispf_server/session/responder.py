"""The responding side of a session: the answer to each of the peer's calls, the table of
open sessions, and their expiry."""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc

from ispf.blinding import POINT_BYTES, TAG_BYTES
from ispf.errors import (
    IspfError,
    PolicyRefused,
    PreconditionFailed,
    ProtocolViolation,
    ResourceExhausted,
    RetryLater,
    SaltMismatch,
    SessionAborted,
    UnknownSession,
    VersionMismatch,
)
from ispf.keys import BlindingKey, ForumSalt
from ispf.peertext import untrusted
from ispf.protocol import MAX_CHUNK_VALUES, PROTOCOL_VERSION
from ispf.v1 import common_pb2, peer_pb2
from ispf_server.budget import MAX_DECLARED, check_declared
from ispf_server.clock import utcnow
from ispf_server.policy import PeerPolicy, Policy
from ispf_server.records import TagSpool, shuffled
from ispf_server.salts import SaltRing
from ispf_server.session.exchange import (
    blinded,
    checked_chunks,
    in_thread,
    parse_removed,
    reblinded,
)
from ispf_server.session.facts import RESPONDER, SessionFacts
from ispf_server.session.lifecycle import Lifecycle, SessionContext
from ispf_server.session.match import NOTHING, Matched, Matcher
from ispf_server.session.plan import (
    LabelSet,
    Plan,
    SyncSide,
    one_off_plan,
    parse_groups,
    prepare,
    state_fingerprints,
)
from ispf_server.session.progress import ProgressBoard, Stopwatch
from ispf_server.storage.store import PairLock

log = logging.getLogger(__name__)
V = TypeVar("V")


class _Recent(Generic[V]):
    """What this node answered in the last hour, by session id: a step repeated after
    a lost reply is answered the same (or refused), and old answers are dropped as
    new ones come. Its users hold the responder's lock."""

    def __init__(self, keep: float = 3600.0) -> None:
        self._keep = keep
        self._items: dict[str, tuple[float, V]] = {}

    def get(self, key: str) -> V | None:
        now = time.monotonic()
        for k in [k for k, (t, _) in self._items.items() if now - t > self._keep]:
            del self._items[k]
        got = self._items.get(key)
        return None if got is None else got[1]

    def put(self, key: str, value: V) -> None:
        self._items[key] = (time.monotonic(), value)


@dataclass
class ResponderSession:
    life: Lifecycle  # its facts, row, status and entry
    salt: ForumSalt
    key: BlindingKey
    plan: Plan
    peer_groups: list[LabelSet]
    peer_sizes: list[int]
    # Both directions' tags, spooled to disk as they come (closed with the session).
    initiator_tags: TagSpool
    own_tags: TagSpool
    # How the result is worked out (None: this side learns none, count-only).
    matcher: Matcher | None = None
    last_used: float = field(default_factory=time.monotonic)
    # One-shot steps: each answers once per session.
    reblind_started: bool = False
    reblind_done: bool = False
    fetch_started: bool = False
    return_started: bool = False
    return_done: bool = False
    busy: set[str] = field(default_factory=set)
    # Sync sessions: this side's delta, the pair lock held.
    side: SyncSide | None = None
    pair_lock: PairLock | None = None
    # The result, worked out as soon as both streams are in (while the initiator
    # works out its own), so that Conclude only compares and commits.
    matching: Future[Matched] | None = None
    # Why the session failed, once it has: a step still running (its spool closed
    # under it) then reports this reason rather than what the closing did to it.
    failed: str | None = None
    # Guards the pair lock's hand-back: Conclude's end and a failed session's
    # matching callback may both release the session, and the lock goes once.
    _releasing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def release(self) -> None:
        try:
            self.initiator_tags.close()
            self.own_tags.close()
            self.plan.close()
        finally:  # (the pair's lock goes even where closing a spool failed)
            with self._releasing:
                lock, self.pair_lock = self.pair_lock, None
            if lock is not None:
                lock.release()

    @property
    def session_id(self) -> str:
        return self.life.facts.session_id

    @property
    def peer(self) -> str:
        return self.life.facts.peer

    @property
    def labelled(self) -> bool:
        return self.life.facts.labelled

    @property
    def peer_total(self) -> int:
        return sum(self.peer_sizes)


@dataclass
class _Speculation:
    """A plan started when a peer asked for the sync state (its Handshake follows)."""

    incremental: bool
    started: float
    future: Future[SyncSide]


class Responder:
    """Answers peers' sessions for one node: their steps, the table of open
    sessions, and their expiry."""

    GIVE_WAY_WAIT = 10.0  # seconds a peer's Handshake waits for a compaction to stop

    def __init__(
        self,
        ctx: SessionContext,
        *,
        salts: SaltRing,
        board: ProgressBoard,
        policy: Callable[[], Policy],
        idle_timeout: float,
        pair_lock: Callable[[str], PairLock],
    ) -> None:
        self.ctx = ctx
        self.province = ctx.province
        self.audit = ctx.audit
        self.store = ctx.store
        self.pool = ctx.pool
        self.budget = ctx.budget
        self.chunk_values = ctx.chunk_values
        self.salts = salts
        self.board = board
        self.policy = policy
        self.pair_lock = pair_lock
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._sessions: dict[str, ResponderSession] = {}
        # Answers to Conclude, kept a while so a retried Conclude (answer lost on the
        # way) gets the same answer rather than "unknown session".
        self._concluded: _Recent[tuple[str, peer_pb2.ConcludeResponse]] = _Recent()
        self._speculative: dict[tuple[str, int], _Speculation] = {}
        # Sessions whose Witness was answered (it is one-shot too), with when.
        self._witnessed: _Recent[bool] = _Recent()

    # -- bookkeeping --------------------------------------------------------

    def _idle_limit(self) -> Callable[[str], float]:
        """Seconds a peer's session may stay idle: the node's setting, or less by the
        policy in force (a change applies to sessions already open)."""
        peers = self.policy().peers

        def limit(peer: str) -> float:
            pp = peers.get(peer)
            return (
                self.idle_timeout if pp is None else min(self.idle_timeout, pp.session_idle_seconds)
            )

        return limit

    def _expire(self) -> None:
        now = time.monotonic()
        idle = self._idle_limit()
        with self._lock:
            for key in [
                k
                for k, sp in self._speculative.items()
                if sp.future.done() and now - sp.started > self.idle_timeout
            ]:
                del self._speculative[key]
            stale = [
                s
                for s in self._sessions.values()
                if not s.busy and now - s.last_used > idle(s.peer)
            ]
        for s in stale:
            self._fail(s, "peer went silent: session expired")

    def _get(self, session_id: str, caller: str) -> ResponderSession:
        self._expire()
        with self._lock:
            s = self._sessions.get(session_id)
        # A session of another peer is reported as unknown: ids are not to be probed.
        if s is None or s.peer != caller:
            raise UnknownSession("unknown or expired session id")
        s.last_used = time.monotonic()
        return s

    def _fail(self, s: ResponderSession, reason: str) -> None:
        with self._lock:
            self._sessions.pop(s.session_id, None)
            if s.failed is not None:
                return  # failed already, by another step: that reason stands
            s.failed = reason
            matching = s.matching  # (none starts from now on: `_start_matching`)
        if matching is not None and not matching.done():
            # Its matching may still stage the pair's new runs, in a thread of its own:
            # the session fails now (its row and entry), and what it staged is dropped,
            # and the pair's lock let go, once that thread has ended (dropped now, the
            # thread would write on after, and the drop be done twice).
            try:
                s.life.fail(reason, keep_staging=True)
            finally:
                matching.add_done_callback(lambda _: self._drop_and_release(s))
            return
        try:
            s.life.fail(reason)  # (with what it staged, if anything)
        finally:
            s.release()

    def _drop_and_release(self, s: ResponderSession) -> None:
        """After a failed session's matching has ended: what it staged dropped, then
        every resource let go, the pair's lock last."""
        try:
            self.store.drop_staging(s.session_id)
        except Exception as exc:  # (left to the pair's next staging, or the next start)
            log.warning(
                "session %s: its staged pair runs were not dropped (%s)",
                s.session_id,
                type(exc).__name__,
            )
        finally:
            s.release()

    def _guard(self, s: ResponderSession, step: str) -> _Step:
        return _Step(self, s, step)

    def sync_state(self, req: peer_pb2.SyncStateRequest, caller: str) -> peer_pb2.SyncState:
        """The caller's set and this node's set, as held here for the caller."""
        pp = self.policy().peers.get(caller)
        if pp is None or self.salts.get(req.epoch) is None:  # no state for an epoch not held
            return peer_pb2.SyncState(held=False)
        fps = state_fingerprints(self.store, caller, req.epoch, pp)
        # The caller now plans its side; plan ours meanwhile (its Handshake uses it).
        self._speculate(caller, req.epoch, pp, incremental=fps is not None)
        if fps is None:
            return peer_pb2.SyncState(held=False)
        own, peer = fps
        return peer_pb2.SyncState(held=True, initiator_set=peer, responder_set=own)

    def _supersede(self, caller: str, lock: PairLock) -> bool:
        """A new sync from a peer ends its previous one still open here.

        An initiator never runs two sessions with the same peer at once, so an open
        one means the peer restarted (or lost the connection) and gave up on it.
        The lock is then held by that stale session, not by one of our own.
        """
        with self._lock:
            stale = [s for s in self._sessions.values() if s.peer == caller and s.side]
        if not stale:
            return False  # held by our own session towards the caller: really busy
        for s in stale:
            self._fail(s, "superseded: the peer started a new session")
        return lock.acquire(timeout=5)

    def _check_state(self, req: peer_pb2.HandshakeRequest, caller: str, pp: PeerPolicy) -> None:
        """An incremental run's assumed pair state is the one held here (RetryLater)."""
        fps = state_fingerprints(self.store, caller, req.epoch, pp)
        theirs = (req.state[32:], req.state[:32])  # (our set, their set) as they hold
        if fps is None or fps != theirs:
            raise RetryLater(
                f"{self.province} holds another state for the pair than {caller} "
                "assumes: run again (it will be a full run)"
            )

    def _compaction_gave_way(
        self, req: peer_pb2.HandshakeRequest, caller: str, pp: PeerPolicy, lock: PairLock
    ) -> bool:
        """A compaction of the pair's state, holding its lock or waiting for it, asked
        to give way, and the lock taken within GIVE_WAY_WAIT. Asked only for a
        Handshake that passes every check that needs no lock, each refusing as it
        would under the lock: the state it assumes and the tags it removes (a
        compaction leaves both as they are), its query budget (checked, not yet
        charged) and its open sessions. So a peer cannot keep the pair from
        compacting with Handshakes that are refused anyway; the checks are made
        again under the lock. Nothing is asked where a session holds the lock."""
        if req.incremental:
            self._check_state(req, caller, pp)
            parse_removed(
                req.removed,
                lambda ts: self.store.pairs.peer_labels_for(caller, req.epoch, ts),
                caller,
            )
        self.budget.charge(
            pp,
            req.epoch,
            sum(g.size for g in req.groups),
            declared=req.registry_size,
            what="session's set (sync)",
            check_only=True,
        )
        with self._lock:
            crowded = self._open_with(caller)
        if crowded >= pp.max_open_sessions:
            raise self._too_many(caller, pp, crowded)
        return lock.acquire_asking(self.GIVE_WAY_WAIT, until_refused=True)

    def _speculate(self, caller: str, epoch: int, pp: PeerPolicy, *, incremental: bool) -> None:
        """Plan this side of the sync `caller` is about to start, in a thread (one at a
        time per peer); the Handshake takes it if still valid, else plans afresh.
        A plan made for the same kind of run within the idle time is kept: a peer
        asking again and again makes this node plan once, not each time."""
        key = (caller, epoch)
        with self._lock:
            old = self._speculative.get(key)
            if old is not None and not old.future.done():
                return
            if (
                old is not None
                and old.incremental == incremental
                and time.monotonic() - old.started < self.idle_timeout
            ):
                return
            fut = in_thread(
                lambda: prepare(self.store, pp, caller, epoch, incremental=incremental),
                f"plan-{caller}",
            )
            self._speculative[key] = _Speculation(incremental, time.monotonic(), fut)

    def _speculated(
        self, caller: str, epoch: int, pp: PeerPolicy, *, incremental: bool
    ) -> SyncSide | None:
        """The plan started early, if it is for this run and nothing changed since."""
        with self._lock:
            spec = self._speculative.pop((caller, epoch), None)
        if spec is None or spec.incremental != incremental:
            return None
        try:
            side = spec.future.result(timeout=self.idle_timeout)
        except Exception:  # planned afresh below, where an error is reported properly
            return None
        row = self.store.pairs.sync_row(caller, epoch)
        current = row.version if row is not None else -1
        if (
            side.pp != pp
            or side.version != self.store.registry.version()
            or side.state_version != current
            or (row is not None and (row.own_fp, row.peer_fp) != (side.own_fp, side.peer_fp))
            # (a session of the pair that changed only labels leaves the version and
            # fingerprints as they were, but its rows are the pair's result now)
            or side.base_session != (row.session_id if row is not None else "")
        ):
            return None
        return side

    def _prepare_sync(
        self, req: peer_pb2.HandshakeRequest, caller: str, pp: PeerPolicy
    ) -> tuple[SyncSide, list[bytes], PairLock]:
        if req.mode != common_pb2.MODE_MUTUAL or req.responder_collections:
            raise ProtocolViolation("a sync session is mutual and covers every collection")
        if not req.incremental and req.removed:
            raise ProtocolViolation("a full run removes nothing")
        lock = self.pair_lock(caller)
        if (
            not lock.acquire(blocking=False)
            and not self._supersede(caller, lock)
            and not self._compaction_gave_way(req, caller, pp, lock)
        ):  # (held by a session, ours or another replica's; or a compaction slow to stop)
            raise RetryLater(
                f"a session between {caller} and {self.province} is already running; "
                "try again when it ends"
            )
        try:
            if req.incremental:
                self._check_state(req, caller, pp)
            side = self._speculated(caller, req.epoch, pp, incremental=req.incremental) or prepare(
                self.store, pp, caller, req.epoch, incremental=req.incremental
            )
            removed = parse_removed(
                req.removed,
                lambda ts: self.store.pairs.peer_labels_for(caller, req.epoch, ts),
                caller,
            )
        except BaseException:
            lock.release()
            raise
        return side, removed, lock

    # -- the protocol -------------------------------------------------------

    def handshake(self, req: peer_pb2.HandshakeRequest, caller: str) -> peer_pb2.HandshakeResponse:
        try:
            return self._handshake(req, caller)
        except IspfError as exc:
            self.audit.record_refusal(
                session_id=req.session_id,
                peer=caller,
                purpose=req.purpose,
                # (the peer's numbers, logged only where they cannot be an ID number)
                epoch=req.epoch if req.epoch < MAX_DECLARED else 0,
                reason_code=type(exc).__name__,
                at=utcnow(),
                declared=req.registry_size if req.registry_size < MAX_DECLARED else 0,
            )
            log.warning("refused a session from %s: %s", caller, untrusted(exc.message, 400))
            raise

    def _handshake(self, req: peer_pb2.HandshakeRequest, caller: str) -> peer_pb2.HandshakeResponse:
        """Admit the session (`_admit`), plan this side (`_plan`), open it (`_open`),
        and answer with this side's groups and the log's checkpoint."""
        clock = Stopwatch()
        self._expire()
        salt, pp, groups, sizes = self._admit(req, caller)
        plan, side, peer_removed, lock = self._plan(req, caller, pp)
        s = self._open(req, caller, pp, salt, plan, side, (groups, sizes, peer_removed), lock)
        s.life.clock = clock
        clock.lap("prepare")
        # Our current checkpoint, so the initiator can find a fork before either commits.
        checkpoint, proof = self.audit.checkpoint_for(req.witnessed_size)
        return peer_pb2.HandshakeResponse(
            session_id=s.session_id,
            groups=plan.wire_groups(s.labelled),
            max_chunk_values=MAX_CHUNK_VALUES,
            removed=side.removed_wire if side else b"",
            checkpoint=checkpoint,
            consistency=proof,
            witnessed_size=self.audit.witnessed_size(caller),
            registry_size=s.life.facts.own_declared,
        )

    def _admit(
        self, req: peer_pb2.HandshakeRequest, caller: str
    ) -> tuple[ForumSalt, PeerPolicy, list[LabelSet], list[int]]:
        """The checks before any work: protocol version, a fresh session id, the same
        salt, the mode, the policy's purpose and size limits, the announced groups
        and the call bounds. Returns the salt, the peer's policy and its groups."""
        if req.protocol_version != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"protocol version {req.protocol_version} not supported; this node speaks "
                f"version {PROTOCOL_VERSION}"
            )
        try:
            uuid.UUID(req.session_id)
        except ValueError as exc:
            raise ProtocolViolation("session id must be a UUID") from exc
        with self._lock:
            known = req.session_id in self._sessions
        if known or self.store.sessions.get(req.session_id) is not None:
            raise ProtocolViolation("session id already used: a replay or a client bug")
        salt = self.salts.get(req.epoch)
        if salt is None:
            raise SaltMismatch(
                f"epoch {req.epoch} is not held by node {self.province} "
                f"(it holds {', '.join(map(str, self.salts.epochs())) or 'none'})"
            )
        if not hmac.compare_digest(req.key_check, salt.key_check()):
            raise SaltMismatch(
                f"key check value for epoch {req.epoch} does not match node {self.province}'s: "
                "the two nodes hold different salts for this epoch"
            )
        if req.mode not in (common_pb2.MODE_MUTUAL, common_pb2.MODE_COUNT_ONLY):
            raise ProtocolViolation("mode must be MODE_MUTUAL or MODE_COUNT_ONLY")
        labelled = req.mode == common_pb2.MODE_MUTUAL
        pp = self.policy().check_session(caller, req.purpose, count_only=not labelled)
        announced = sum(g.size for g in req.groups)
        if announced > pp.max_set_size:
            raise PolicyRefused(
                f"set of {announced} values exceeds the policy limit of {pp.max_set_size} "
                f"for {caller}"
            )
        groups, sizes = parse_groups(list(req.groups), labelled=labelled, max_total=announced)
        self._check_bounds(req, caller, pp, announced)
        return salt, pp, groups, sizes

    def _plan(
        self, req: peer_pb2.HandshakeRequest, caller: str, pp: PeerPolicy
    ) -> tuple[Plan, SyncSide | None, list[bytes], PairLock | None]:
        """This side's plan (a sync session's under the pair's lock), and the peer's
        set charged to its query budget, last: a session refused for another reason
        costs no budget. Returns the plan, the sync side, the peer's removed tags and
        the pair lock held (None for a one-off session)."""
        side: SyncSide | None = None
        peer_removed: list[bytes] = []
        lock: PairLock | None = None
        if req.sync:
            side, peer_removed, lock = self._prepare_sync(req, caller, pp)
            plan = side.plan
        else:
            plan = one_off_plan(
                self.store,
                pp,
                frozenset(req.responder_collections),
                labelled=req.mode == common_pb2.MODE_MUTUAL,
            )
        try:
            self.budget.charge(
                pp,
                req.epoch,
                sum(g.size for g in req.groups),
                declared=req.registry_size,
                what=f"session's set ({'sync' if req.sync else 'one-off'})",
            )
        except BaseException:
            plan.close()
            if lock is not None:
                lock.release()
            raise
        return plan, side, peer_removed, lock

    def _open(
        self,
        req: peer_pb2.HandshakeRequest,
        caller: str,
        pp: PeerPolicy,
        salt: ForumSalt,
        plan: Plan,
        side: SyncSide | None,
        peer: tuple[list[LabelSet], list[int], list[bytes]],
        lock: PairLock | None,
    ) -> ResponderSession:
        """The session begun (its facts, its running row) and held open, unless the
        peer already holds as many open sessions as its policy allows."""
        groups, sizes, peer_removed = peer
        facts = SessionFacts(
            session_id=req.session_id,
            province=self.province,
            peer=caller,
            role=RESPONDER,
            purpose=req.purpose,
            epoch=req.epoch,
            mode=req.mode,
            peer_values=sum(sizes),
            own_groups=len(plan.groups),
            peer_groups=len(groups),
            peer_removed=len(peer_removed),
            peer_declared=req.registry_size,
        )
        facts.own_side(plan, side, self.store.registry.distinct_ids())
        life = Lifecycle.begin(facts, self.ctx, self.board, phase="exchange")
        s = ResponderSession(
            life=life,
            salt=salt,
            key=side.key if side else BlindingKey.generate(),
            plan=plan,
            peer_groups=groups,
            peer_sizes=sizes,
            initiator_tags=TagSpool(self.store.directory),
            own_tags=TagSpool(self.store.directory),
            matcher=life.matcher(plan, side, groups, sizes, peer_removed),
            side=side,
            pair_lock=lock,
        )
        with self._lock:
            crowded = self._open_with(caller)
            if crowded < pp.max_open_sessions:
                self._sessions[s.session_id] = s
        if crowded >= pp.max_open_sessions:  # (another handshake got in meanwhile)
            self._fail(s, "too many open sessions at once")
            raise self._too_many(caller, pp, crowded)
        log.info(
            "session %s: %s opened a %s session (epoch %d, purpose %s): %d own, %d peer values",
            s.session_id,
            caller,
            "mutual" if s.labelled else "count-only",
            req.epoch,
            req.purpose,
            plan.total,
            sum(sizes),
        )
        return s

    def _check_bounds(
        self, req: peer_pb2.HandshakeRequest, caller: str, pp: PeerPolicy, announced: int
    ) -> None:
        """What a peer may ask of this node beyond the policy's who-and-what: a set no
        larger than the registry it declares, no tiny one-off sets (a membership
        oracle), and a bounded number of sessions open at once."""
        check_declared("the initiator", announced, req.registry_size)
        if not req.sync and announced < pp.min_set_size:
            kind = "count-only" if req.mode == common_pb2.MODE_COUNT_ONLY else "filtered"
            raise PolicyRefused(
                f"a {kind} session needs a set of at least {pp.min_set_size} values by policy "
                f"for {caller} (this one has {announced}): smaller sets would answer "
                "membership of single IDs"
            )
        with self._lock:
            open_now = self._open_with(caller)
        if open_now >= pp.max_open_sessions:
            raise self._too_many(caller, pp, open_now)

    def _open_with(self, caller: str) -> int:
        """Sessions this peer holds open here now (the caller holds `_lock`)."""
        return sum(1 for s in self._sessions.values() if s.peer == caller)

    def _too_many(self, caller: str, pp: PeerPolicy, held: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"{caller} already holds {held} open sessions with {self.province}, at "
            f"most {pp.max_open_sessions} by policy: finish or abort one first (idle "
            f"ones end after {min(self.idle_timeout, pp.session_idle_seconds):g} s)"
        )

    def reblind(
        self, chunks: Iterator[peer_pb2.BlindedChunk], session_id: str, caller: str
    ) -> Iterator[peer_pb2.BlindedChunk]:
        s = self._get(session_id, caller)
        with self._guard(s, "reblind"):
            self._once(s, "reblind_started", "Reblind")
            values = checked_chunks(
                chunks,
                session_id=s.session_id,
                item_bytes=POINT_BYTES,
                announced=s.peer_total,
                what="Reblind",
            )
            progress = s.life.progress
            if s.labelled:
                for seq, tags in enumerate(reblinded(self.pool, s.key, values)):
                    s.initiator_tags.append(tags)
                    n = len(tags) // TAG_BYTES
                    progress.add(received=n, work_done=n, sent=n)
                    yield peer_pb2.BlindedChunk(session_id=s.session_id, seq=seq, values=tags)
            else:
                # Count-only: answer only once all is in, shuffled, so the initiator
                # cannot map tags to its records.
                for tags in reblinded(self.pool, s.key, values):
                    s.initiator_tags.append(tags)
                    n = len(tags) // TAG_BYTES
                    progress.add(received=n, work_done=n)
                # (shuffled within the sort budget: memory does not grow with the set)
                step = self.chunk_values * TAG_BYTES
                seq = 0
                for tags in shuffled(s.initiator_tags.chunks(), TAG_BYTES, self.store.directory):
                    for at in range(0, len(tags), step):
                        part = tags[at : at + step]
                        progress.add(sent=len(part) // TAG_BYTES)
                        yield peer_pb2.BlindedChunk(session_id=s.session_id, seq=seq, values=part)
                        seq += 1
            s.reblind_done = True
            self._start_matching(s)

    def _once(self, s: ResponderSession, flag: str, step: str) -> None:
        """A one-shot step answers once per session: a repeat (each would make this node
        blind the whole set again) is refused, and fails the session."""
        with self._lock:
            if getattr(s, flag):
                raise PreconditionFailed(
                    f"{step} was already called in this session: each step answers once"
                )
            setattr(s, flag, True)

    def _start_matching(self, s: ResponderSession) -> None:
        """Once both streams are in: the result (and, with pair state, the new state,
        written ahead, not yet current), in a thread, while the initiator does the
        same on its side."""
        matcher = s.matcher
        if matcher is None or not (s.reblind_done and s.return_done):
            return
        with self._lock:
            if s.matching is not None or s.failed is not None:
                return  # (started already; or failed, its lock about to go: none)

            def run() -> Matched:
                matched = matcher.match(s.own_tags, s.initiator_tags)
                s.life.stage(matched)
                return matched

            s.matching = in_thread(run, f"match-{s.session_id[:8]}")

    def fetch(self, req: peer_pb2.FetchRequest, caller: str) -> Iterator[peer_pb2.BlindedChunk]:
        s = self._get(req.session_id, caller)
        with self._guard(s, "fetch"):
            self._once(s, "fetch_started", "FetchBlinded")
            chunks = blinded(self.pool, s.salt, s.key, s.plan.chunks(self.chunk_values))
            for seq, (n, packed) in enumerate(chunks):
                s.life.progress.add(blinded=n, work_done=n, sent=n)
                yield peer_pb2.BlindedChunk(session_id=s.session_id, seq=seq, values=packed)

    def return_tags(
        self, chunks: Iterator[peer_pb2.BlindedChunk], session_id: str, caller: str
    ) -> peer_pb2.ReturnTagsResponse:
        s = self._get(session_id, caller)
        with self._guard(s, "return"):
            if not s.labelled:
                raise ProtocolViolation("ReturnTags is not part of a count-only session")
            self._once(s, "return_started", "ReturnTags")
            for payload in checked_chunks(
                chunks,
                session_id=s.session_id,
                item_bytes=TAG_BYTES,
                announced=s.plan.total,
                what="ReturnTags",
            ):
                s.own_tags.append(payload)  # (a failed stream fails the session)
                s.life.progress.add(received=len(payload) // TAG_BYTES)
            s.return_done = True
            self._start_matching(s)
            return peer_pb2.ReturnTagsResponse(received=s.own_tags.count)

    def conclude(self, req: peer_pb2.ConcludeRequest, caller: str) -> peer_pb2.ConcludeResponse:
        with self._lock:
            done = self._concluded.get(req.session_id)
        if done is not None and done[0] == caller:
            return done[1]
        row = self.store.sessions.get(req.session_id)
        if row is not None and row.peer == caller and row.role == "responder" and row.answer:
            # Concluded before this node restarted: the same answer again.
            return peer_pb2.ConcludeResponse.FromString(row.answer)
        answer = self._conclude(req, caller)
        with self._lock:
            self._concluded.put(req.session_id, (caller, answer))
        return answer

    def _conclude(self, req: peer_pb2.ConcludeRequest, caller: str) -> peer_pb2.ConcludeResponse:
        s = self._get(req.session_id, caller)
        life = s.life
        with self._guard(s, "conclude"):
            if not s.reblind_done or (s.labelled and not s.return_done):
                raise ProtocolViolation("Conclude before all values were exchanged")
            if req.checkpoint:  # a fork of the initiator's log fails the session on both
                self.audit.accept_peer_checkpoint(caller, req.checkpoint, list(req.consistency))
            life.clock.lap("exchange")
            if s.matcher is None:
                matched = Matched(NOTHING)
            else:
                self._start_matching(s)  # (started already, unless a stream failed)
                assert s.matching is not None
                matched = s.matching.result()
            outcome = matched.outcome
            # With pair state both must now hold the same two sets: theirs (ours,
            # theirs) is our (theirs, ours).
            mirrored = matched.state_after[32:] + matched.state_after[:32]
            life.clock.lap("match")
            life.agree(
                outcome,
                req.match_count,
                req.result_digest,
                also=matched.delta is None or hmac.compare_digest(req.state, mirrored),
            )
            life.commit(matched)
            life.clock.lap("commit")
            checkpoint, proof = self.audit.checkpoint_for(req.witnessed_size)
            with self._lock:
                self._sessions.pop(s.session_id, None)
            s.release()
            life.completed(outcome)
            answer = peer_pb2.ConcludeResponse(
                match_count=outcome.match_count,
                result_digest=outcome.digest,
                agreed=True,
                checkpoint=checkpoint,
                consistency=proof,
                witnessed_size=self.audit.witnessed_size(caller),
            )
            self.store.sessions.set_answer(s.session_id, answer.SerializeToString())
            return answer

    def witness(self, req: peer_pb2.WitnessRequest, caller: str) -> peer_pb2.WitnessResponse:
        """Verify and record the initiator's checkpoint; store its cosignature on ours."""
        row = self.store.sessions.get(req.session_id)
        if row is None or row.peer != caller or row.role != "responder":
            raise UnknownSession("unknown session id")
        with self._lock:
            if self._witnessed.get(req.session_id):
                raise PreconditionFailed(
                    "Witness was already called in this session: each step answers once"
                )
            self._witnessed.put(req.session_id, True)
        seen = self.audit.accept_peer_checkpoint(caller, req.checkpoint, list(req.consistency))
        if req.cosignature:
            self.audit.add_cosignature(caller, req.cosignature)
        return peer_pb2.WitnessResponse(cosignature=self.audit.cosign(seen, at=int(time.time())))

    def abort(self, req: peer_pb2.AbortRequest, caller: str) -> peer_pb2.AbortResponse:
        s = self._get(req.session_id, caller)
        reason = untrusted(req.reason) or "no printable reason"
        self._fail(s, f"aborted by {caller}: {reason}")
        return peer_pb2.AbortResponse()


class _Step:
    """Marks a session busy during a step; a failure in the step fails the session."""

    def __init__(self, owner: Responder, s: ResponderSession, step: str) -> None:
        self.owner, self.s, self.step = owner, s, step

    def __enter__(self) -> None:
        self.s.busy.add(self.step)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: object
    ) -> None:
        self.s.busy.discard(self.step)
        self.s.last_used = time.monotonic()
        if ev is not None:
            first = self.s.failed
            if first is not None and not isinstance(ev, GeneratorExit):
                # Another step failed the session and closed what this one was using.
                raise SessionAborted(f"session failed: {first}") from None
            if isinstance(ev, (GeneratorExit, grpc.RpcError)):
                # The stream was closed under us: cancelled, deadline, or connection lost.
                msg = "the peer cancelled the stream or the connection broke"
            else:
                msg = getattr(ev, "message", None) or "internal error (see the node log)"
            self.owner._fail(self.s, f"{self.step}: {msg}")
