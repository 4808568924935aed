"""The internal API (the province's own internal-role certificates only)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic

import grpc

from ispf import merkle
from ispf.auditlog import tag_leaves
from ispf.errors import InvalidNationalId, InvalidRecord, UnknownSession
from ispf.nid import canonical_digits
from ispf.protocol import MAX_RECORDS_PER_MESSAGE
from ispf.records import Label, check_label, check_record_id
from ispf.v1 import common_pb2, internal_pb2, internal_pb2_grpc
from ispf_server.probes import Checker
from ispf_server.services.api import NodeApi, R, SessionRecord, SyncCounts
from ispf_server.session.progress import RUNNING, Snapshot

MATCH_BATCH = 2_000
MAX_SYNC_ERRORS = 10_000


class RegistryServicer(internal_pb2_grpc.RegistryServiceServicer, Generic[R]):
    def __init__(self, node: NodeApi[R]) -> None:
        self.node = node

    def UpsertRecords(
        self, request: internal_pb2.UpsertRecordsRequest, context: grpc.ServicerContext
    ) -> internal_pb2.UpsertRecordsResponse:
        if len(request.records) > MAX_RECORDS_PER_MESSAGE:
            raise InvalidRecord(
                "batch.too_large",
                f"{len(request.records)} records in one request, at most {MAX_RECORDS_PER_MESSAGE}",
            )
        good, errors = self._validate(request.records)
        counts = self.node.registry.upsert(good.values())
        return internal_pb2.UpsertRecordsResponse(
            accepted=len(good),
            inserted=counts.inserted,
            updated=counts.updated,
            unchanged=counts.unchanged,
            errors=errors,
        )

    def _validate(
        self, records: Iterable[internal_pb2.Record], kept: set[str] | None = None
    ) -> tuple[dict[str, R], list[internal_pb2.RowError]]:
        """Good rows by record id (the last row of an id wins, as in a file replay)
        and an error per bad one. `kept`: record ids of bad rows, where readable."""
        good: dict[str, R] = {}
        errors: list[internal_pb2.RowError] = []
        digits = self.node.province_digits
        new_record = self.node.new_record
        # A label's check (NFC, the name rule) once per distinct pair in the request:
        # its Label, or the (code, reason) of its rejection.
        labels: dict[tuple[str, str], Label | tuple[str, str]] = {}
        for i, rec in enumerate(records):
            raw_rid = rec.record_id
            try:
                rid = check_record_id(raw_rid)
                key = (rec.programme, rec.status)
                label = labels.get(key)
                if label is None:
                    try:
                        label = labels[key] = check_label(*key)
                    except InvalidRecord as exc:
                        label = labels[key] = (exc.reason_code, exc.message)
                if not isinstance(label, Label):
                    raise InvalidRecord(*label)
                nid = canonical_digits(rec.nid, province_digits=digits)
            except (InvalidNationalId, InvalidRecord) as exc:
                errors.append(
                    internal_pb2.RowError(
                        position=rec.position or i + 1,
                        record_id=raw_rid[:128],
                        code=exc.reason_code,
                        reason=exc.message,
                    )
                )
                if kept is not None:
                    with contextlib.suppress(InvalidRecord):
                        kept.add(check_record_id(raw_rid))
                continue
            good[rid] = new_record(rid, nid, label)
        return good, errors

    def SyncRecords(
        self,
        request_iterator: Iterator[internal_pb2.SyncRecordsRequest],
        context: grpc.ServicerContext,
    ) -> internal_pb2.SyncRecordsResponse:
        errors: list[internal_pb2.RowError] = []
        n_rejected = 0
        with self.node.registry.sync() as sync:
            last: internal_pb2.SyncRecordsRequest | None = None
            for req in request_iterator:
                if len(req.records) > MAX_RECORDS_PER_MESSAGE:
                    raise InvalidRecord(
                        "batch.too_large",
                        f"{len(req.records)} records in one message, "
                        f"at most {MAX_RECORDS_PER_MESSAGE}",
                    )
                kept: set[str] = set()
                for rid in req.keep_record_ids:
                    with contextlib.suppress(InvalidRecord):
                        kept.add(check_record_id(rid))
                good, bad = self._validate(req.records, kept)
                n_rejected += len(bad)
                errors.extend(bad[: max(0, MAX_SYNC_ERRORS - len(errors))])
                sync.stage(good.values(), kept - good.keys())
                if req.commit:
                    last = req
                    break
            if last is None:
                raise InvalidRecord(
                    "sync.incomplete",
                    "the sync stream ended without its last (commit) message: nothing changed",
                )
            if not 0.0 <= last.max_delete_percent <= 100.0:  # (NaN fails too)
                raise InvalidRecord(
                    "sync.max_delete_percent", "max_delete_percent must be between 0 and 100"
                )
            rejected = last.client_rejected + n_rejected
            refused = ""

            def decide(c: SyncCounts) -> bool:
                nonlocal refused
                share = last.max_delete_percent
                allowed = max(last.allow_deletes, int(c.before * share / 100))
                if rejected > last.max_rejected:
                    refused = (
                        f"{rejected} rows rejected, more than the {last.max_rejected} allowed: "
                        "nothing was changed"
                    )
                elif c.deleted > allowed:
                    pct = 100.0 * c.deleted / c.before if c.before else 0.0
                    refused = (
                        f"the sync would delete {c.deleted} of {c.before} records ({pct:.1f}%), "
                        f"more than the {allowed} allowed ({share:g}% of the registry"
                        + (
                            f", or --allow-deletes {last.allow_deletes}"
                            if last.allow_deletes
                            else ""
                        )
                        + f"): nothing was changed; if that is right, pass --allow-deletes "
                        f"{c.deleted}"
                    )
                return not refused and not last.dry_run

            counts, applied = sync.apply(decide)
        return internal_pb2.SyncRecordsResponse(
            applied=applied,
            refused=refused,
            records_before=counts.before,
            inserted=counts.inserted,
            updated=counts.updated,
            unchanged=counts.unchanged,
            deleted=counts.deleted,
            kept=counts.kept,
            errors=errors,
            rejected=n_rejected,
        )

    def DeleteRecords(
        self, request: internal_pb2.DeleteRecordsRequest, context: grpc.ServicerContext
    ) -> internal_pb2.DeleteRecordsResponse:
        deleted, missing = self.node.registry.delete(list(request.record_ids))
        return internal_pb2.DeleteRecordsResponse(deleted=deleted, not_found=missing)

    def GetRegistryStats(
        self, request: internal_pb2.GetRegistryStatsRequest, context: grpc.ServicerContext
    ) -> internal_pb2.RegistryStats:
        total, distinct, labels = self.node.registry.stats()
        return internal_pb2.RegistryStats(
            province=self.node.province,
            records=total,
            distinct_ids=distinct,
            labels=[
                internal_pb2.LabelCount(
                    label=common_pb2.Label(programme=lb.programme, status=lb.status), records=n
                )
                for lb, n in labels
            ],
        )


class CheckServicer(internal_pb2_grpc.CheckServiceServicer):
    def __init__(self, checker: Checker) -> None:
        self.checker = checker

    def Check(
        self, request: internal_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> internal_pb2.CheckResponse:
        return self.checker.check(request)


class ReconciliationServicer(internal_pb2_grpc.ReconciliationServiceServicer, Generic[R]):
    def __init__(self, node: NodeApi[R]) -> None:
        self.node = node

    def StartReconciliation(
        self, request: internal_pb2.StartReconciliationRequest, context: grpc.ServicerContext
    ) -> internal_pb2.SessionStatus:
        mode = request.mode or common_pb2.MODE_MUTUAL
        snap = self.node.start_session(
            peer=request.peer,
            purpose=request.purpose or "reconciliation",
            mode=mode,
            collections=frozenset(request.collections),
            peer_collections=frozenset(request.peer_collections),
            full=request.full,
        )
        return snap.to_proto()

    def _snapshot(self, session_id: str) -> Snapshot:
        snap = self.node.session_status(session_id)
        if snap is None:
            raise UnknownSession(f"no session {session_id[:64]} on node {self.node.province}")
        return snap

    def GetSession(
        self, request: internal_pb2.WatchSessionRequest, context: grpc.ServicerContext
    ) -> internal_pb2.SessionStatus:
        return self._snapshot(request.session_id).to_proto()

    def WatchSession(
        self, request: internal_pb2.WatchSessionRequest, context: grpc.ServicerContext
    ) -> Iterator[internal_pb2.SessionStatus]:
        snap = self._snapshot(request.session_id)
        yield snap.to_proto()
        progress = self.node.board.get(request.session_id)
        pause = threading.Event()
        while snap.state == RUNNING and context.is_active():
            if progress is not None:
                new = self.node.board.wait_for_change(progress, snap.version, timeout=0.5)
            else:
                # Run by another replica of a shared store (or left by a crash, until
                # it is failed): followed in the store until it ends.
                pause.wait(0.5)
                new = self._snapshot(request.session_id)
            if new.version != snap.version or new.state != snap.state:
                snap = new
                yield snap.to_proto()

    def ListSessions(
        self, request: internal_pb2.ListSessionsRequest, context: grpc.ServicerContext
    ) -> internal_pb2.ListSessionsResponse:
        return internal_pb2.ListSessionsResponse(
            sessions=[self._snapshot(r.session_id).to_proto() for r in self.node.results.all()]
        )

    def ListPeers(
        self, request: internal_pb2.ListPeersRequest, context: grpc.ServicerContext
    ) -> internal_pb2.ListPeersResponse:
        return internal_pb2.ListPeersResponse(
            peers=self.node.peers(),
            budgets=[
                internal_pb2.PeerBudget(
                    peer=b.peer,
                    epoch=b.epoch,
                    declared=b.declared,
                    used=b.used,
                    allowance=b.allowance,
                    left=b.left,
                    refused=b.refused,
                )
                for b in self.node.budgets()
            ],
        )

    def GetReceipt(
        self, request: internal_pb2.GetReceiptRequest, context: grpc.ServicerContext
    ) -> internal_pb2.Receipt:
        results, audit = self.node.results, self.node.audit
        rows = list(results.matches(request.session_id, request.record_id))
        if not rows:
            raise UnknownSession("no match of that record in that session on this node")
        tags = sorted(set(results.matched_tags(request.session_id)))
        tag = rows[0].tag
        if not tag:
            raise UnknownSession(
                "this session's match tags were destroyed when its epoch was retired: "
                "no receipt can be made"
            )
        index = tags.index(tag)
        entry_index = audit.index_of(request.session_id)
        if entry_index is None:
            raise UnknownSession("the session has no entry in this node's log")
        size = audit.size()
        return internal_pb2.Receipt(
            province=self.node.province,
            session_id=request.session_id,
            record_id=request.record_id,
            tag=tag,
            tag_index=index,
            match_count=len(tags),
            tag_proof=merkle.inclusion_proof(index, tag_leaves(tags)),
            entry=audit.entries(entry_index, entry_index + 1)[0],
            entry_index=entry_index,
            entry_proof=audit.inclusion(entry_index, size),
            checkpoint=audit.latest(),
        )

    def GetMatches(
        self, request: internal_pb2.GetMatchesRequest, context: grpc.ServicerContext
    ) -> Iterator[internal_pb2.MatchBatch]:
        results = self.node.results
        if request.session_id:
            row = results.get(request.session_id)
            if row is None or row.state != "COMPLETED":
                raise UnknownSession(
                    f"no completed session {request.session_id[:64]} on node {self.node.province}"
                )
            rows: Sequence[SessionRecord] = [row]
        else:
            rows = results.latest_completed()
        batch: list[internal_pb2.Match] = []
        # Person numbers for this stream only: first person seen is 1 (see Match.person).
        people: dict[str, int] = {}
        for s in rows:
            holders = results.match_holders(s.session_id)
            for m in results.matches(s.session_id):
                # A record gone from the registry is a person of its own ("\0" keeps
                # its key apart from every record id a holder key can be).
                key = holders.get(m.record_id, "\0" + m.record_id)
                person = people.setdefault(key, len(people) + 1)
                batch.append(
                    internal_pb2.Match(
                        record_id=m.record_id,
                        programme=m.label.programme,
                        status=m.label.status,
                        peer=s.peer,
                        peer_programme=m.peer_label.programme,
                        peer_status=m.peer_label.status,
                        session_id=s.session_id,
                        person=person,
                    )
                )
                if len(batch) >= MATCH_BATCH:
                    yield internal_pb2.MatchBatch(matches=batch)
                    batch = []
        if batch:
            yield internal_pb2.MatchBatch(matches=batch)
