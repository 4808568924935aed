"""Online checks: one applicant (or a small batch) against every authorised province.

The asking node blinds each ID with its fixed key for each peer and sends one
`Probe` per peer, in parallel, under one deadline. The peer re-blinds (one
X25519 per value) and looks the tags up among its own IDs' tags for the asker,
answering with the labels that matched. Before answering, a peer whose registry
changed since it last synced with the asker syncs first, so a record loaded a
moment ago is found. Peers rate-limit probes (per minute and per day, from the
policy) and count every probe, answered or refused, in their audit log; the
asker counts its checks too.

Concurrent checks share X25519 calls (`batching.Coalescer`): the asker blinds
the IDs of checks that arrive while a blinding for the same peer runs in one
call, and the peer re-blinds probes that arrive together in one, each under the
pair key of (peer, epoch) only. Each probe is admitted, rate-limited, charged
and counted on its own; only the curve arithmetic is shared.

They share Probe calls too: the checks whose values for a peer are ready while
a Probe to that peer (same epoch and purpose) is on its way go together in the
next one, each check's values in its own random order, and each gets back the
hits in its own span. The peer admits, rate-limits, charges and counts a shared
Probe by its number of values, as it would the separate ones; a shared Probe
refused for its size (RESOURCE_EXHAUSTED: a rate limit or budget) is asked again
check by check, so no check is refused for sharing. A lone check goes at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

import grpc

from ispf.blinding import POINT_BYTES, TAG_BYTES, blind_many, reblind_many
from ispf.errors import (
    DeadlineExceeded,
    InvalidBlindedValue,
    InvalidInput,
    InvalidNationalId,
    IspfError,
    PolicyRefused,
    PreconditionFailed,
    RateLimited,
    ResourceExhausted,
    from_rpc_error,
)
from ispf.keys import BlindingKey
from ispf.nid import canonicalise
from ispf.protocol import MAX_CHECK_IDS, MAX_DEADLINE_MS
from ispf.v1 import common_pb2, internal_pb2, peer_pb2, peer_pb2_grpc
from ispf_server.audit import AuditLog
from ispf_server.batching import Coalescer
from ispf_server.budget import QueryBudget
from ispf_server.clock import utcnow
from ispf_server.policy import PeerPolicy, Policy
from ispf_server.records import shuffle
from ispf_server.storage import Store
from ispf_server.storage.pairs.state import labels_of

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_MS = 2000
DEADLINE_SPREAD = 0.05  # s: checks' deadlines this close share a blocking Probe call
FLUSH_SECONDS = 60.0
SYNC_RETRY_SECONDS = 5.0
S = internal_pb2
# Values per shared ladder call (`batching.Coalescer`): concurrent probes to (or
# from) one peer under one pair key are blinded together, up to this many. The
# ifma ladder runs 4 groups of 8 lanes at once: 32 values cost about what 1 does.
BATCH_VALUES = 32


def _key_group(key: BlindingKey, *more: bytes) -> bytes:
    """The batching group of a key (and the salt, where it is one's too): a digest,
    so that the coalescer's table never holds the secret itself."""
    h = hashlib.blake2b(key.unsafe_raw(), digest_size=16, person=b"ispf/batch-group")
    for m in more:
        h.update(m)
    return h.digest()


@dataclass(frozen=True)
class _Reblind:
    """One probe's values to re-blind under the pair key (one coalescer job)."""

    key: BlindingKey
    values: bytes = field(repr=False)

    def __len__(self) -> int:
        return len(self.values) // POINT_BYTES


@dataclass(frozen=True)
class _Blind:
    """One check's IDs to blind for one peer under the pair key (one coalescer job)."""

    key: BlindingKey
    salt: Any
    digits: list[bytes] = field(repr=False)  # (ID numbers: never in a repr)

    def __len__(self) -> int:
        return len(self.digits)


@dataclass(frozen=True)
class _Ask:
    """One check's blinded values for one peer (one job of the probe coalescer): the
    peer, epoch and purpose are its group's, the same for every job of a batch."""

    peer: str
    epoch: int
    purpose: str
    values: bytes = field(repr=False)
    end: float  # (monotonic) when its check stops waiting

    def __len__(self) -> int:
        return len(self.values) // POINT_BYTES


@dataclass(frozen=True)
class _Pending:
    """One check's share of a Probe call on its way: its hits are those of its span
    of the call's values (`start`, `n`), cut out once the answer is in. Each check
    waits for it until its own deadline (`answer`), not the batch's longest."""

    call: Any  # (a grpc future: the Probe call)
    start: int
    n: int
    # (a shared call's: this check's values asked again alone, a call of their own,
    # where the shared one is refused for its size, RESOURCE_EXHAUSTED)
    alone: Callable[[], Any] | None = None

    def answer(self, end: float) -> _Answer:
        try:
            resp = self.call.result(timeout=max(0.0, end - time.monotonic()))
        except grpc.FutureTimeoutError:
            return _LATE
        except grpc.RpcError as exc:
            if self.alone is not None and _exhausted(exc) and time.monotonic() < end:
                return _Pending(self.alone(), 0, self.n).answer(end)
            return Checker._refused(exc)
        return _share(resp, self.start, self.n)


def _request(ask: _Ask, values: bytes) -> peer_pb2.ProbeRequest:
    """A Probe of `values` in `ask`'s epoch and purpose (its batch's)."""
    return peer_pb2.ProbeRequest(epoch=ask.epoch, purpose=ask.purpose, values=values)


def _send(probe: Any, ask: _Ask, values: bytes, end: float) -> Any:
    """A Probe call of `values` in `ask`'s epoch and purpose, on its way (a future)."""
    return probe.future(_request(ask, values), timeout=max(0.001, end - time.monotonic()))


def _exhausted(exc: grpc.RpcError) -> bool:
    return isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _share(resp: peer_pb2.ProbeResponse, start: int, n: int) -> _Answer:
    """One check's answer from a shared Probe: the hits of its span of the call's
    values (`start`, `n`), by its own index (a position outside names nothing)."""
    hits = [
        peer_pb2.ProbeHit(index=h.index - start, labels=h.labels)
        for h in resp.hits
        if start <= h.index < start + n
    ]
    return _Answer(S.PROVINCE_STATUS_UNSPECIFIED, hits, "")


def _same_key(keys: list[bytes]) -> None:
    """A batch is computed under its first job's key: every job's must be that key
    (the group says so; this is a second look, never to be relied on alone)."""
    if any(k != keys[0] for k in keys):
        raise RuntimeError("a batch of online-check values mixed keys: refused")


class Taken(NamedTuple):
    """What `RateLimiter.take` took: on which day (UTC), when (its clock), and the
    bucket's refill then (values per second)."""

    day: str
    at: float
    rate: float


class RateLimiter:
    """Per-peer token bucket (per minute) and daily quota (UTC day), from the policy."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._stamp: dict[str, float] = {}
        self._day: dict[str, tuple[str, int]] = {}

    def take(self, peer: str, n: int, pp: PeerPolicy) -> Taken:
        """Take `n` values from the peer's bucket and today's quota, or refuse them
        (RateLimited); returns the day (UTC) they were counted on, and when."""
        with self._lock:
            now = self._clock()
            # (the day read under the lock, and never back: probes racing at midnight
            # cannot count against a day already left, nor reset the new one)
            today = max(datetime.now(UTC).strftime("%Y-%m-%d"), self._day.get(peer, ("",))[0])
            rate = pp.probes_per_minute / 60.0
            tokens = min(
                float(pp.probes_per_minute),
                self._tokens.get(peer, float(pp.probes_per_minute))
                + (now - self._stamp.get(peer, now)) * rate,
            )
            self._stamp[peer] = now
            day, used = self._day.get(peer, (today, 0))
            if day != today:
                used = 0
            if used + n > pp.probes_per_day:
                self._tokens[peer] = tokens
                raise RateLimited(
                    f"daily probe quota of {pp.probes_per_day} for {peer} is used up "
                    f"({used} today); it resets at 00:00 UTC",
                    retry_after=_until_utc_midnight(),
                    per_minute=pp.probes_per_minute,
                )
            if n > pp.probes_per_minute:
                self._tokens[peer] = tokens
                raise RateLimited(
                    f"probe rate limit for {peer}: {pp.probes_per_minute} per minute; a batch "
                    f"of {n} never fits: ask at most {pp.probes_per_minute} at a time",
                    retry_after=(pp.probes_per_minute - tokens) / rate if rate else 60.0,
                    per_minute=pp.probes_per_minute,
                )
            if n > tokens:
                self._tokens[peer] = tokens
                wait_s = (n - tokens) / rate if rate else 60.0
                raise RateLimited(
                    f"probe rate limit for {peer}: {pp.probes_per_minute} per minute; "
                    f"retry in {wait_s:.1f} s",
                    retry_after=wait_s,
                    per_minute=pp.probes_per_minute,
                )
            self._tokens[peer] = tokens - n
            self._day[peer] = (today, used + n)
            return Taken(today, now, rate)

    def give_back(self, peer: str, n: int, taken: Taken) -> None:
        """Return `n` of what `take` took (`taken`) for values then refused all the
        same (the peer's query budget spent): a shared probe so refused and asked
        again check by check is not charged in full twice. To the bucket, less what
        it refilled since (which the bucket's size may have cut off: never more
        than it would hold had they not been taken); to the quota of that day only,
        not of the day after."""
        with self._lock:
            if peer in self._tokens:
                refilled = (self._clock() - taken.at) * taken.rate
                self._tokens[peer] += max(0.0, n - refilled)
            counted, used = self._day.get(peer, (taken.day, 0))
            if counted == taken.day:
                self._day[peer] = (taken.day, max(0, used - n))


def _until_utc_midnight() -> float:
    now = datetime.now(UTC)
    return 86400.0 - (now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6)


@dataclass
class _Tally:
    values: int = 0
    matched: int = 0
    refused: int = 0
    since: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


class ProbeLog:
    """Counts probes (or checks) per peer and writes them to the audit log in batches."""

    def __init__(self, audit: AuditLog, kind: str, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.audit = audit
        self.kind = kind
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._tally: dict[str, _Tally] = {}
        self._last = time.monotonic()

    def count(self, peer: str, values: int, matched: int = 0, refused: int = 0) -> None:
        with self._lock:
            t = self._tally.setdefault(peer, _Tally())
            t.values += values
            t.matched += matched
            t.refused += refused
            due = time.monotonic() - self._last >= self.flush_seconds
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            tally, self._tally = self._tally, {}
            self._last = time.monotonic()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for peer, t in sorted(tally.items()):
            self.audit.record_probes(
                kind=self.kind,
                peer=peer,
                values=t.values,
                matched=t.matched,
                refused=t.refused,
                since=t.since,
                until=now,
                at=utcnow(),
            )


class ProbeAnswerer:
    """The peer side: answers `Probe` calls."""

    def __init__(
        self,
        *,
        store: Store,
        policy: Callable[[], Policy],
        audit: AuditLog,
        sync_with: Callable[[str], None],
        limiter: RateLimiter | None = None,
        on_probe: Callable[[str, str, int], None] | None = None,
        backend: str = "auto",
        budget: QueryBudget | None = None,
    ) -> None:
        self.backend = backend
        self.budget = budget or QueryBudget(store)
        self.store = store
        self.policy = policy
        self.sync_with = sync_with
        self.limiter = limiter or RateLimiter()
        self.on_probe = on_probe or (lambda peer, result, n: None)
        self.log = ProbeLog(audit, "probes")
        self._sync_failed: dict[str, float] = {}
        self._sync_lock = threading.Lock()
        # Concurrent probes of one peer share ladder calls; a peer's low-order point
        # fails its own probe only (`isolate`: that batch is re-run one by one).
        self.reblinder: Coalescer[_Reblind, bytes] = Coalescer(
            self._reblind_batch, cap=BATCH_VALUES, size=len, isolate=(InvalidBlindedValue,)
        )

    def _reblind_batch(self, jobs: Sequence[_Reblind]) -> list[bytes]:
        _same_key([j.key.unsafe_raw() for j in jobs])
        tags = reblind_many(jobs[0].key, b"".join(j.values for j in jobs), TAG_BYTES, self.backend)
        out, at = [], 0
        for j in jobs:
            out.append(tags[at : at + len(j) * TAG_BYTES])
            at += len(j) * TAG_BYTES
        return out

    def probe(
        self, req: peer_pb2.ProbeRequest, caller: str, timeout: float | None = None
    ) -> peer_pb2.ProbeResponse:
        """The answer to one probe; `timeout`: the seconds the caller still waits."""
        end = None if timeout is None else time.monotonic() + timeout
        n, rem = divmod(len(req.values), POINT_BYTES)
        if rem or n == 0 or n > MAX_CHECK_IDS:
            raise InvalidInput(
                f"a probe holds 1 to {MAX_CHECK_IDS} values of {POINT_BYTES} bytes; got "
                f"{len(req.values)} bytes"
            )
        try:
            pp = self.policy().check_session(caller, req.purpose, count_only=False)
            taken = self.limiter.take(caller, n, pp)
        except (PolicyRefused, ResourceExhausted):
            self.log.count(caller, n, refused=n)
            self.on_probe(caller, "refused", n)
            raise
        if self.store.pairs.version(caller, req.epoch) is None:
            self.log.count(caller, n, refused=n)
            raise PreconditionFailed(
                f"no reconciliation between {caller} and this node in epoch {req.epoch} yet: "
                "run one first"
            )
        try:  # (the values count against the peer's query budget, as a session's do)
            self.budget.charge(pp, req.epoch, n, what="probe")
        except ResourceExhausted:
            # (a refusal costs one value of the limits, not all it held: refused
            # probes stay limited, and a shared one asked again check by check is
            # not charged twice in full)
            self.limiter.give_back(caller, n - 1, taken)
            self.log.count(caller, n, refused=n)
            self.on_probe(caller, "refused", n)
            raise
        self._freshen(caller, req.epoch)
        key = self.store.pairs.key(caller, req.epoch)  # (after: the sync may re-key)
        tags = self.reblinder.submit(
            (_key_group(key), self.backend),
            _Reblind(key, req.values),
            None if end is None else max(0.0, end - time.monotonic()),
        )
        split = [tags[i : i + TAG_BYTES] for i in range(0, len(tags), TAG_BYTES)]
        found = self.store.pairs.lookup_own_tags(caller, req.epoch, split)
        hits = [
            peer_pb2.ProbeHit(
                index=i,
                labels=[
                    common_pb2.Label(programme=lb.programme, status=lb.status)
                    for lb in labels_of(found[t])
                ],
            )
            for i, t in enumerate(split)
            if t in found
        ]
        shuffle(hits)  # (each hit names its index: the order says nothing)
        self.log.count(caller, n, matched=len(hits))
        self.on_probe(caller, "answered", n)
        return peer_pb2.ProbeResponse(hits=hits)

    def _freshen(self, caller: str, epoch: int) -> None:
        """Sync with the caller first if this registry changed since the last sync.

        After a failed attempt, probes are answered from the index as it is for a
        few seconds rather than each trying (and waiting) again.
        """
        version = self.store.pairs.version(caller, epoch)
        if version is not None and version >= self.store.registry.version():
            return
        with self._sync_lock:
            if time.monotonic() - self._sync_failed.get(caller, -1e9) < SYNC_RETRY_SECONDS:
                return
        try:
            self.sync_with(caller)
        except IspfError as exc:
            with self._sync_lock:
                self._sync_failed[caller] = time.monotonic()
            log.warning(
                "could not sync with %s before answering its probe: %s", caller, exc.message
            )


StubFor = Callable[[str], peer_pb2_grpc.PeerServiceStub]


@dataclass(frozen=True)
class _Answer:
    """One province's answer to a whole check: its hits, or why there are none."""

    status: int
    hits: list[peer_pb2.ProbeHit] | None
    detail: str
    retry_after_ms: int = 0
    limit_per_minute: int = 0


_LATE = _Answer(S.PROVINCE_STATUS_UNAVAILABLE, None, "no answer in time")  # (immutable: shared)


class Checker:
    """The asking side: fans a check out to the peers."""

    def __init__(
        self,
        *,
        province: str,
        store: Store,
        policy: Callable[[], Policy],
        audit: AuditLog,
        peers: Callable[[], list[str]],
        stub_for: StubFor,
        salt: Callable[[], Any],
        province_digits: frozenset[str],
        workers: int = 32,
        backend: str = "auto",
    ) -> None:
        self.backend = backend
        self.province = province
        self.store = store
        self.policy = policy
        self.peers = peers
        self.stub_for = stub_for
        self.salt = salt
        self.province_digits = province_digits
        self.log = ProbeLog(audit, "checks")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check")
        # Concurrent checks' probes to one peer are blinded in shared ladder calls,
        # and sent in shared Probe calls: checks that arrive while a Probe to that
        # peer is on its way go together in the next one (each check's values
        # counted, limited and charged by the peer as before, by number of values).
        self.blinder: Coalescer[_Blind, bytes] = Coalescer(
            self._blind_batch, cap=BATCH_VALUES, size=len
        )
        self.prober: Coalescer[_Ask, _Answer | _Pending] = Coalescer(
            self._probe_batch, cap=MAX_CHECK_IDS, size=len
        )

    def _blind_batch(self, jobs: Sequence[_Blind]) -> list[bytes]:
        _same_key([j.key.unsafe_raw() + j.salt.unsafe_raw() for j in jobs])
        values = blind_many(
            jobs[0].key, jobs[0].salt, [d for j in jobs for d in j.digits], self.backend
        )
        out, at = [], 0
        for j in jobs:
            out.append(values[at : at + len(j) * POINT_BYTES])
            at += len(j) * POINT_BYTES
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.log.flush()

    def check(self, req: internal_pb2.CheckRequest) -> internal_pb2.CheckResponse:
        if not 0 < len(req.nids) <= MAX_CHECK_IDS:
            raise InvalidInput(f"a check holds 1 to {MAX_CHECK_IDS} identity numbers")
        if req.deadline_ms > MAX_DEADLINE_MS:
            raise InvalidInput(
                f"deadline_ms is {req.deadline_ms}: a check waits at most {MAX_DEADLINE_MS} ms "
                "for the provinces' answers (0: the default, 2000)"
            )
        deadline = (req.deadline_ms or DEFAULT_DEADLINE_MS) / 1000.0
        purpose = req.purpose or "online-check"
        results = [internal_pb2.CheckResult(position=i + 1) for i in range(len(req.nids))]
        digits: list[bytes] = []
        valid: list[int] = []
        for i, raw in enumerate(req.nids):
            try:
                digits.append(canonicalise(raw, province_digits=self.province_digits).encode())
                valid.append(i)
            except InvalidNationalId as exc:
                results[i].error = f"{exc.reason_code}: {exc.message}"
        known = self.peers()
        targets = list(req.provinces) or known
        answers: dict[str, _Answer] = {}
        futures = {}
        salt = self.salt()
        policy = self.policy()
        synced = self.store.pairs.synced_keys(salt.epoch)  # (one read for every peer)
        for peer in targets:
            if peer not in known:
                answers[peer] = _Answer(S.PROVINCE_STATUS_ERROR, None, "not a configured peer")
                continue
            pp = policy.peers.get(peer)
            if pp is None or purpose not in pp.purposes:
                answers[peer] = _Answer(
                    S.PROVINCE_STATUS_NOT_AUTHORISED,
                    None,
                    f"purpose '{purpose}' not allowed with {peer} by policy",
                )
                continue
            key = synced.get(peer)
            if key is None:
                answers[peer] = _Answer(
                    S.PROVINCE_STATUS_NOT_SYNCED,
                    None,
                    f"no reconciliation with {peer} in epoch {salt.epoch} yet",
                )
                continue
            if not valid:  # nothing to ask: every ID was invalid
                answers[peer] = _Answer(S.PROVINCE_STATUS_UNSPECIFIED, [], "")
                continue
            futures[peer] = self._pool.submit(
                self._probe, peer, key, purpose, salt, digits, deadline
            )
        done, _ = wait(futures.values(), timeout=deadline + 0.5)
        for peer, fut in futures.items():
            if fut in done:
                answers[peer] = fut.result()
            else:
                fut.cancel()
                answers[peer] = _LATE
        for peer in targets:
            got = answers[peer]
            hits = got.hits
            by_index = {h.index: h for h in hits or []}
            matched = 0
            for k, i in enumerate(valid):
                ans = internal_pb2.ProvinceAnswer(province=peer, detail=got.detail)
                if hits is None:
                    ans.status = got.status  # type: ignore[assignment]
                    ans.retry_after_ms = got.retry_after_ms
                    ans.limit_per_minute = got.limit_per_minute
                elif k in by_index:
                    ans.status = S.PROVINCE_STATUS_MATCH
                    ans.labels.extend(by_index[k].labels)
                    matched += 1
                else:
                    ans.status = S.PROVINCE_STATUS_NO_MATCH
                results[i].provinces.append(ans)
            self.log.count(
                peer, len(valid), matched=matched, refused=0 if hits is not None else len(valid)
            )
        return internal_pb2.CheckResponse(results=results)

    def _probe(
        self,
        peer: str,
        key: BlindingKey,
        purpose: str,
        salt: Any,
        digits: list[bytes],
        deadline: float,
    ) -> _Answer:
        end = time.monotonic() + deadline
        # The values go in a random order, never the caller's (a batch sorted by ID
        # would let the peer bracket the values it does not hold between its hits);
        # the hits' positions are mapped back. Other checks' values for this peer may
        # share the ladder call (`blinder`), each check's cut back out in its order.
        order = list(range(len(digits)))
        shuffle(order)
        try:
            values = self.blinder.submit(
                (_key_group(key, salt.unsafe_raw()), self.backend),
                _Blind(key, salt, [digits[i] for i in order]),
                deadline,
            )
            got = self.prober.submit(
                (peer, salt.epoch, purpose),
                _Ask(peer, salt.epoch, purpose, values, end),
                max(0.0, end - time.monotonic()),
            )
        except DeadlineExceeded:
            return _LATE
        if isinstance(got, _Pending):
            got = got.answer(end)
        if got.hits is None:
            return got
        hits = [
            peer_pb2.ProbeHit(index=order[h.index], labels=h.labels)
            for h in got.hits
            if h.index < len(order)  # (a position past the values asked names nothing)
        ]
        return _Answer(S.PROVINCE_STATUS_UNSPECIFIED, hits, "")

    def _probe_batch(self, asks: Sequence[_Ask]) -> list[_Answer | _Pending]:
        """One Probe for the checks of one batch, and each check's share of it (its
        hits, by its own index), or why there are none. No check waits past its own
        deadline, nor does the next batch wait for a call past the first deadline
        of this one. A shared call refused for its size (RESOURCE_EXHAUSTED: the
        peer's rate limit or budget may allow each check's values, not all) is
        asked again check by check, each in a call of its own, sent at once and
        waited for by that check alone. Checks whose deadlines have all passed
        are not sent."""
        first = asks[0]
        if any(
            (a.peer, a.epoch, a.purpose) != (first.peer, first.epoch, first.purpose) for a in asks
        ):
            raise RuntimeError("a batch of probes mixed peers, epochs or purposes: refused")
        now = time.monotonic()
        if all(a.end <= now for a in asks):
            return [_LATE] * len(asks)
        starts, at = [], 0
        for a in asks:
            starts.append(at)
            at += len(a)
        try:
            probe = self.stub_for(first.peer).Probe
        except IspfError as exc:
            return [_Answer(S.PROVINCE_STATUS_ERROR, None, exc.message)] * len(asks)
        values = b"".join(a.values for a in asks)
        soonest, latest = min(a.end for a in asks), max(a.end for a in asks)
        try:
            if latest - soonest <= DEADLINE_SPREAD:
                # (deadlines about equal, as those of checks that came together with
                # the default are: a blocking call to the first of them, cheaper on
                # the CPU than a future; the others then lose at most the spread)
                resp = probe(_request(first, values), timeout=max(0.001, soonest - now))
                return [_share(resp, start, len(a)) for start, a in zip(starts, asks, strict=True)]
            call = _send(probe, first, values, latest)
            # (waits for the call until the first deadline, the next batch forming
            # meanwhile; on its way still then, each check waits on to its own)
            with contextlib.suppress(grpc.FutureTimeoutError):
                call.result(timeout=max(0.0, soonest - time.monotonic()))
            shared = len(asks) > 1
            return [
                _Pending(
                    call,
                    start,
                    len(a),
                    partial(_send, probe, a, a.values, a.end) if shared else None,
                )
                for start, a in zip(starts, asks, strict=True)
            ]
        except grpc.RpcError as exc:
            if len(asks) > 1 and _exhausted(exc):
                # (refused for the batch's size, maybe not each's: each asked alone)
                now = time.monotonic()
                return [
                    _Pending(_send(probe, a, a.values, a.end), 0, len(a)) if a.end > now else _LATE
                    for a in asks
                ]
            return [self._refused(exc)] * len(asks)

    @staticmethod
    def _refused(exc: grpc.RpcError) -> _Answer:
        """A failed Probe as each of its checks' answer from that province."""
        err = from_rpc_error(exc)
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        status = {
            grpc.StatusCode.RESOURCE_EXHAUSTED: S.PROVINCE_STATUS_RATE_LIMITED,
            grpc.StatusCode.PERMISSION_DENIED: S.PROVINCE_STATUS_NOT_AUTHORISED,
            grpc.StatusCode.FAILED_PRECONDITION: S.PROVINCE_STATUS_NOT_SYNCED,
            grpc.StatusCode.UNAVAILABLE: S.PROVINCE_STATUS_UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED: S.PROVINCE_STATUS_UNAVAILABLE,
            grpc.StatusCode.UNAUTHENTICATED: S.PROVINCE_STATUS_NOT_AUTHORISED,
        }.get(code, S.PROVINCE_STATUS_ERROR)
        if isinstance(err, RateLimited):
            return _Answer(
                status,
                None,
                err.message,
                retry_after_ms=min(round(err.retry_after * 1000), 2**32 - 1),
                limit_per_minute=min(err.per_minute, 2**32 - 1),
            )
        return _Answer(status, None, err.message)
