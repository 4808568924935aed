"""The auditor: verify each node's match log, pair sessions across nodes, prove entries.

Needs only the nodes' audit endpoints, an audit-role certificate, and the
public log keys of the forum's nodes (an audit profile, written by
``ispf forum init`` to ``forum/auditors/<name>/audit.toml``). Every check
raises `AuditFailure`, naming the kind of failure; nothing warns and goes on.

State: the last checkpoint trusted of each node and the leaf hashes it
covers, kept in a JSON file, so the next run demands a consistency proof from
it and can say which entry was changed, removed, inserted or reordered, or
that the log was truncated (a rollback). Every node is checked and reported,
whatever another's outcome; each failure keeps its evidence in a file.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from ispf import files, merkle, note
from ispf.auditlog import (
    PAIRED_FIELDS,
    Checkpoint,
    SignedCheckpoint,
    b64,
    decode_entry,
    open_checkpoint,
    unb64,
    verify_bundle,
)
from ispf.errors import (
    AuditFailure,
    ConfigError,
    EntryError,
    IspfError,
    NoteError,
    ProofError,
    from_rpc_error,
)
from ispf.protocol import MAX_LOG_ENTRIES
from ispf.v1 import audit_pb2, audit_pb2_grpc
from ispf_client.sdk import ClientProfile, secure_channel


@dataclass(frozen=True)
class NodeRef:
    name: str
    address: str
    key: note.Verifier

    @property
    def cosigner(self) -> note.Verifier:
        return note.Verifier(self.key.name, self.key.public, note.ALG_COSIGNATURE_V1)


@dataclass(frozen=True)
class AuditProfile:
    name: str
    state: Path
    evidence: Path
    ca: Path
    cert: Path
    key: Path
    nodes: dict[str, NodeRef]

    @classmethod
    def load(cls, path: Path) -> AuditProfile:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            base = path.parent
            tls = data["tls"]
            nodes = _roster_nodes(data, base)
            for name, v in data.get("nodes", {}).items():
                if "key" not in v and name in nodes:  # a roster node at another address
                    nodes[name] = NodeRef(name, str(v["address"]), nodes[name].key)
                    continue
                nodes[name] = NodeRef(
                    name,
                    str(v["address"]),
                    note.Verifier.parse((base / v["key"]).read_text(encoding="ascii")),
                )
            return cls(
                name=str(data.get("name", "auditor")),
                state=base / str(data.get("state", "audit-state.json")),
                evidence=base / str(data.get("evidence", "evidence")),
                ca=base / tls["ca"],
                cert=base / tls["cert"],
                key=base / tls["key"],
                nodes=nodes,
            )
        except FileNotFoundError as exc:
            raise ConfigError(f"audit profile or a file it names is missing: {exc}") from exc
        except (KeyError, tomllib.TOMLDecodeError, NoteError) as exc:
            raise ConfigError(f"audit profile {path} is invalid: {exc}") from exc

    def cosigners(self) -> list[note.Verifier]:
        return [n.cosigner for n in self.nodes.values()]


def _roster_nodes(data: dict[str, Any], base: Path) -> dict[str, NodeRef]:
    """`roster = "roster.json"`: every node of the forum's signed roster (verified under
    the profile's CA), with its address and log key; [nodes.X] may override addresses."""
    if "roster" not in data:
        return {}
    from ispf import roster

    r = roster.load(base / str(data["roster"]), base / str(data["tls"]["ca"]))
    keys = r.log_keys()
    return {n: NodeRef(n, e.address, keys[n]) for n, e in r.nodes.items()}


class NodeLog:
    """Read-only client of one node's audit API."""

    def __init__(self, profile: AuditProfile, ref: NodeRef, timeout: float = 30.0) -> None:
        self.ref = ref
        self.timeout = timeout
        # The same mTLS channel as the SDK's, with the auditor's certificate.
        self._channel = secure_channel(
            ClientProfile(ref.name, ref.address, profile.ca, profile.cert, profile.key)
        )
        self._stub = audit_pb2_grpc.AuditServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _call(self, fn: Any, req: Any) -> Any:
        try:
            return fn(req, timeout=self.timeout)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            raise AuditFailure(self.ref.name, "unreachable", err.message) from None

    def checkpoint(self) -> str:
        return str(self._call(self._stub.GetCheckpoint, audit_pb2.GetCheckpointRequest()).note)

    def entries(self, size: int) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < size:
            page = self._call(
                self._stub.GetEntries,
                audit_pb2.GetEntriesRequest(
                    start=len(out), end=min(size, len(out) + MAX_LOG_ENTRIES)
                ),
            ).entries
            if not page:
                break
            out.extend(bytes(e) for e in page)
        return out

    def consistency(self, first: int, second: int) -> list[bytes]:
        req = audit_pb2.GetConsistencyProofRequest(first=first, second=second)
        return [bytes(h) for h in self._call(self._stub.GetConsistencyProof, req).hashes]

    def inclusion(self, index: int, size: int) -> list[bytes]:
        req = audit_pb2.GetInclusionProofRequest(index=index, tree_size=size)
        return [bytes(h) for h in self._call(self._stub.GetInclusionProof, req).hashes]

    def find(self, session_id: str) -> int:
        req = audit_pb2.FindSessionRequest(session_id=session_id)
        return int(self._call(self._stub.FindSession, req).index)

    def witnessed(self) -> dict[str, str]:
        resp = self._call(self._stub.GetWitnessed, audit_pb2.GetWitnessedRequest())
        return {w.peer: w.note for w in resp.checkpoints}


@dataclass
class VerifiedLog:
    node: str
    checkpoint: SignedCheckpoint
    entries: list[dict[str, Any]]
    leaves: list[bytes]


@dataclass
class AuditState:
    path: Path
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> AuditState:
        if not path.exists():
            return cls(path)
        try:
            return cls(path, json.loads(path.read_text(encoding="utf-8"))["nodes"])
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"audit state file {path} is unreadable: {exc}") from exc

    def save(self) -> None:
        files.write_private_text(self.path, json.dumps({"nodes": self.nodes}, indent=1) + "\n")


def write_evidence(profile: AuditProfile, node: str, kind: str, detail: str, **items: Any) -> Path:
    """Keep what proves misbehaviour: both signed checkpoints, the proof, the detail."""
    files.private_dir(profile.evidence)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = profile.evidence / f"{node}-{kind}-{stamp}.json"
    files.write_private_text(
        path,
        json.dumps(
            {"node": node, "kind": kind, "detail": detail, "found_at": stamp, **items}, indent=1
        )
        + "\n",
    )
    return path


def diagnose(served: list[bytes], mirror: list[bytes], signed_size: int) -> tuple[str, str]:
    """Name how the served leaves differ from the ones trusted before: (kind, detail).

    `mirror` is the leaf hashes the auditor trusted last time (a prefix of an honest
    log); `signed_size` is how many entries the node's current checkpoint signs.
    """
    s, m = len(served), len(mirror)
    short = s < signed_size
    if not mirror:
        if short:
            return "deleted", f"node serves {s} of the {signed_size} entries its checkpoint signs"
        return (
            "entries-mismatch",
            "the entries served do not hash to the signed root (altered after signing; "
            "run again with the state of an earlier audit to name the entry)",
        )
    in_served, in_mirror = set(served), set(mirror)
    i = next((j for j in range(min(s, m)) if served[j] != mirror[j]), None)
    if i is None:
        if s < m:
            return (
                "rollback",
                f"the log was truncated to {s} entries: entries {s} to {m - 1}, trusted "
                "before, are gone",
            )
        if short:
            return (
                "deleted",
                f"node serves {s} of the {signed_size} entries its checkpoint signs "
                f"(entries after the {m} trusted before were deleted)",
            )
        return (
            "entries-mismatch",
            f"an entry after the {m} trusted before was altered after signing",
        )
    if served[i] in in_mirror:
        gone = [j for j in range(i, m) if mirror[j] not in in_served]
        if not gone:
            return "reordered", f"entry {i} was moved (entries reordered)"
        listed = ", ".join(str(j) for j in gone[:5]) + (" ..." if len(gone) > 5 else "")
        return "deleted", f"entry {gone[0]} was deleted" + (
            f" (entries {listed} are gone)" if len(gone) > 1 else ""
        )
    # served[i] was never trusted: something was put in, or entry i was changed.
    k = min(3, s - i - 1, m - i)
    if k > 0 and served[i + 1 : i + 1 + k] == mirror[i : i + k]:
        return "inserted", f"an entry was inserted at index {i}"
    k = min(3, s - i - 1, m - i - 1)
    if k > 0 and served[i + 1 : i + 1 + k] == mirror[i + 1 : i + 1 + k]:
        return "modified", f"entry {i} was modified"
    if short:
        return "deleted", f"entry {i} was deleted (node serves {s} of {signed_size} entries)"
    return "modified", f"entry {i} was modified"


def fetch_verified(log: NodeLog, profile: AuditProfile, mirror: list[bytes]) -> VerifiedLog:
    """Latest checkpoint (signature and cosignatures checked) and entries matching its root.

    Each failure names its kind and keeps evidence: the signed checkpoint and what
    the node served against it.
    """
    name = log.ref.name
    others = [n.cosigner for n in profile.nodes.values() if n.name != name]
    raw = log.checkpoint()
    try:
        signed = open_checkpoint(raw, log.ref.key, others)
    except NoteError as exc:
        ev = write_evidence(profile, name, "bad-signature", exc.message, checkpoint=raw)
        raise AuditFailure(name, "bad-signature", exc.message, ev) from None
    cp = signed.checkpoint
    entries = log.entries(cp.size)
    leaves = [merkle.leaf_hash(e) for e in entries]
    if len(entries) != cp.size or merkle.root(leaves) != cp.root:
        kind, detail = diagnose(leaves, mirror, cp.size)
        ev = write_evidence(
            profile,
            name,
            kind,
            detail,
            checkpoint=raw,
            served_entries=[b64(e) for e in entries],
            trusted_leaves=[b64(h) for h in mirror],
        )
        raise AuditFailure(name, kind, detail, ev)
    decoded: list[dict[str, Any]] = []
    for i, e in enumerate(entries):
        try:
            fields = decode_entry(e)
        except EntryError as exc:
            detail = f"entry {i}: {exc.message}"
            ev = write_evidence(
                profile, name, "malformed-entry", detail, checkpoint=raw, entry=b64(e)
            )
            raise AuditFailure(name, "malformed-entry", detail, ev) from None
        if fields.get("recorder") != name:
            detail = f"entry {i} was recorded by another node"
            ev = write_evidence(
                profile, name, "malformed-entry", detail, checkpoint=raw, entry=b64(e)
            )
            raise AuditFailure(name, "malformed-entry", detail, ev)
        decoded.append(fields)
    return VerifiedLog(name, signed, decoded, leaves)


def check_extends(
    profile: AuditProfile, log: NodeLog, trusted_note: str, new: SignedCheckpoint, source: str
) -> None:
    """Raise (with evidence) unless `new` extends the checkpoint trusted before."""
    name = log.ref.name
    try:
        old = open_checkpoint(trusted_note, log.ref.key).checkpoint
    except NoteError as exc:
        detail = f"{source}: {exc.message}"
        ev = write_evidence(profile, name, "bad-signature", detail, checkpoint=trusted_note)
        raise AuditFailure(name, "bad-signature", detail, ev) from None
    cp = new.checkpoint
    if old.size == 0:
        return  # every log extends the empty one
    if cp.size < old.size:
        detail = f"log shrank from {old.size} entries ({source}) to {cp.size}"
        ev = write_evidence(
            profile,
            name,
            "rollback",
            detail,
            trusted_checkpoint=trusted_note,
            new_checkpoint=new.note,
        )
        raise AuditFailure(name, "rollback", detail, ev)
    proof = log.consistency(old.size, cp.size) if cp.size > old.size else []
    try:
        merkle.verify_consistency(old.size, cp.size, old.root, cp.root, proof)
    except ProofError as exc:
        detail = (
            f"checkpoint of size {cp.size} does not extend the one of size {old.size} "
            f"({source}): {exc.message}; both are signed by the same key"
        )
        ev = write_evidence(
            profile,
            name,
            "fork",
            detail,
            trusted_checkpoint=trusted_note,
            new_checkpoint=new.note,
            consistency_proof=[b64(h) for h in proof],
        )
        raise AuditFailure(name, "fork", detail, ev) from None


@dataclass
class VerifyReport:
    """One node's outcome: verified (`failure` None), or what was found."""

    node: str
    size: int
    cosigners: list[str]
    sessions: int
    previous_size: int | None
    failure: AuditFailure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def audit_nodes(profile: AuditProfile, names: Iterable[str] | None = None) -> list[VerifyReport]:
    """Verify every chosen node's log and report each, whatever another's outcome.

    The trusted state is updated for each node that passed, and only for those:
    a failing node is judged against the same trusted view next time.
    """
    state = AuditState.load(profile.state)
    chosen = list(names) if names else sorted(profile.nodes)
    unknown = [n for n in chosen if n not in profile.nodes]
    if unknown:
        raise ConfigError(f"no such node in the audit profile: {', '.join(unknown)}")
    logs = {n: NodeLog(profile, profile.nodes[n]) for n in profile.nodes}
    try:
        # What each node has seen of the others: checkpoints they verified and cosigned.
        seen_by: dict[str, dict[str, str]] = {}
        unreachable: dict[str, AuditFailure] = {}
        for n, log in logs.items():
            try:
                seen_by[n] = log.witnessed()
            except AuditFailure as exc:
                unreachable[n] = exc
                seen_by[n] = {}
        reports: list[VerifyReport] = []
        for name in chosen:
            prev = state.nodes.get(name)
            prev_size = (
                open_checkpoint(prev["checkpoint"], logs[name].ref.key).checkpoint.size
                if prev
                else None
            )
            try:
                if name in unreachable:
                    raise unreachable[name]
                got = _verify_one(profile, logs[name], prev, seen_by)
            except AuditFailure as exc:
                reports.append(VerifyReport(name, 0, [], 0, prev_size, exc))
                continue
            state.nodes[name] = {
                "checkpoint": got.checkpoint.note,
                "leaves": [b64(h) for h in got.leaves],
            }
            reports.append(
                VerifyReport(
                    name,
                    got.checkpoint.checkpoint.size,
                    got.checkpoint.cosigners,
                    sum(1 for e in got.entries if e["type"] == "session"),
                    prev_size,
                )
            )
        state.save()
        return reports
    finally:
        for log in logs.values():
            log.close()


def _verify_one(
    profile: AuditProfile,
    log: NodeLog,
    prev: dict[str, Any] | None,
    seen_by: dict[str, dict[str, str]],
) -> VerifiedLog:
    name = log.ref.name
    mirror = [unb64(h) for h in prev["leaves"]] if prev else []
    got = fetch_verified(log, profile, mirror)
    if prev:
        check_extends(profile, log, prev["checkpoint"], got.checkpoint, "trusted before")
    for witness, views in seen_by.items():
        if name in views:
            check_extends(profile, log, views[name], got.checkpoint, f"the view {witness} verified")
    return got


def verify(profile: AuditProfile, names: Iterable[str] | None = None) -> list[VerifyReport]:
    """Verify each node's log; raise the first node's `AuditFailure` after checking all."""
    reports = audit_nodes(profile, names)
    for r in reports:
        if r.failure is not None:
            raise r.failure
    return reports


@dataclass
class PairReport:
    paired: int = 0
    mismatched: list[str] = field(default_factory=list)
    one_sided: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    # Completed on one side, failed on the other: a crash or a lost answer at the very
    # end, not tampering; the next session between them was a full run.
    interrupted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.one_sided


def pair(profile: AuditProfile) -> PairReport:
    """Check both provinces logged every session with the same parameters and result."""
    by_session: dict[str, dict[str, dict[str, Any]]] = {}
    for name, ref in sorted(profile.nodes.items()):
        log = NodeLog(profile, ref)
        try:
            got = fetch_verified(log, profile, [])
        finally:
            log.close()
        for e in got.entries:
            if e["type"] == "session":
                by_session.setdefault(e["session_id"], {})[name] = e
    report = PairReport()
    for sid, sides in sorted(by_session.items()):
        any_side = next(iter(sides.values()))
        parties = {any_side["initiator"], any_side["responder"]}
        if any_side["outcome"] == "failed" and all(
            e["outcome"] == "failed" for e in sides.values()
        ):
            report.failed.append(f"{sid}: failed ({', '.join(sorted(sides))} logged it)")
            continue
        missing = sorted(p for p in parties if p not in sides and p in profile.nodes)
        if missing:
            report.one_sided.append(
                f"{sid}: logged by {', '.join(sorted(sides))} only, not by {', '.join(missing)}"
            )
            continue
        a, b = (sides[p] for p in sorted(parties))
        if a["outcome"] != b["outcome"]:
            done = next(p for p in sorted(parties) if sides[p]["outcome"] == "completed")
            other = next(p for p in sorted(parties) if p != done)
            report.interrupted.append(
                f"{sid}: completed on {done}, failed on {other} "
                f"({sides[other].get('reason', 'no reason')})"
            )
            continue
        fields = list(PAIRED_FIELDS)
        if a["mode"] == "mutual":
            fields.append("match_count")
        diff = [f for f in fields if a.get(f) != b.get(f)]
        if diff:
            report.mismatched.append(f"{sid}: the two sides differ in {', '.join(diff)}")
        else:
            report.paired += 1
    return report


def prove(profile: AuditProfile, node: str, session_id: str) -> dict[str, Any]:
    """An offline bundle proving a session's entry is in the node's signed log."""
    ref = profile.nodes.get(node)
    if ref is None:
        raise ConfigError(f"no node {node} in the audit profile")
    log = NodeLog(profile, ref)
    try:
        signed_note = log.checkpoint()
        signed = open_checkpoint(signed_note, ref.key, profile.cosigners())
        index = log.find(session_id)
        entry = log.entries(index + 1)[index]
        bundle = {
            "node": node,
            "session_id": session_id,
            "entry": b64(entry),
            "entry_index": index,
            "entry_proof": [b64(h) for h in log.inclusion(index, signed.checkpoint.size)],
            "checkpoint": signed_note,
        }
    finally:
        log.close()
    verify_bundle(bundle, ref.key, profile.cosigners())
    return bundle


def load_keys(paths: Iterable[Path]) -> list[note.Verifier]:
    keys: list[note.Verifier] = []
    for p in paths:
        files = sorted(p.glob("*.vkey")) if p.is_dir() else [p]
        keys.extend(note.Verifier.parse(f.read_text(encoding="ascii")) for f in files)
    if not keys:
        raise ConfigError("no log verifier keys given")
    return keys


def verify_proof_file(path: Path, keys: list[note.Verifier]) -> dict[str, Any]:
    """Verify an offline bundle (or receipt) with nothing but the nodes' public keys."""
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
        signed_note = bundle["checkpoint"]
        origin = Checkpoint.parse(note.split(signed_note)[0]).origin
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is not a proof bundle: {exc}") from exc
    log_key = next((k for k in keys if k.name == origin and k.alg == note.ALG_ED25519), None)
    if log_key is None:
        raise AuditFailure(origin, "unknown-key", "no trusted key for the log that signed this")
    cosigners = [
        note.Verifier(k.name, k.public, note.ALG_COSIGNATURE_V1) for k in keys if k.name != origin
    ]
    try:
        return verify_bundle(bundle, log_key, cosigners)
    except (IspfError, KeyError, ValueError) as exc:
        msg = exc.message if isinstance(exc, IspfError) else str(exc)
        raise AuditFailure(origin, "invalid-proof", msg) from None
