"""The node's tamper-evident match log: entries, signed checkpoints, witnessing.

Entries are appended by the store in the same transaction as the session
result they describe, so a crash never leaves a result without its entry or
an entry without its result; a checkpoint is signed only after the entries it
covers are committed (and at start-up, if a crash came between the two).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ispf import merkle, note
from ispf.auditlog import (
    ENTRY_VERSION,
    Checkpoint,
    SignedCheckpoint,
    b64,
    encode_entry,
    open_checkpoint,
    origin_of,
)
from ispf.errors import (
    ConfigError,
    ForkDetected,
    LogTampered,
    NoteError,
    ProofError,
    ProtocolViolation,
)
from ispf.peertext import MASK, untrusted
from ispf.protocol import PROTOCOL_VERSION
from ispf.v1 import common_pb2
from ispf_server.storage import Store

log = logging.getLogger(__name__)
COSIGN_LOOKBACK = 64


def _printable(text: str, limit: int = 200) -> str:
    """Free text for an entry: printable, short, and with digit runs cut (no ID can slip in)."""
    return re.sub(r"\d{6,}", "#", untrusted(text, limit).replace(MASK, "#"))


def load_log_keys(folder: Path) -> dict[str, note.Verifier]:
    """Every `<province>.vkey` in the folder: the forum's node log keys."""
    if not folder.is_dir():
        raise ConfigError(f"log key folder {folder} does not exist")
    keys: dict[str, note.Verifier] = {}
    for f in sorted(folder.glob("*.vkey")):
        try:
            v = note.Verifier.parse(f.read_text(encoding="ascii"))
        except (NoteError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{f} is not a signed-note verifier key") from exc
        if v.name != origin_of(f.stem):
            raise ConfigError(f"{f} holds the key of {v.name}, not {origin_of(f.stem)}")
        keys[f.stem] = v
    return keys


@dataclass(frozen=True)
class SessionEntry:
    """What a session's audit entry says; its time is the caller's (`time`)."""

    session_id: str
    initiator: str
    responder: str
    purpose: str
    epoch: int
    mode: int
    outcome: str
    time: str
    initiator_values: int = 0
    responder_values: int = 0
    initiator_groups: int = 0
    responder_groups: int = 0
    match_count: int | None = None
    result_digest: bytes = b""
    reason: str | None = None
    sync: str = "none"
    initiator_removed: int = 0
    responder_removed: int = 0
    initiator_declared: int = 0
    responder_declared: int = 0


class AuditLog:
    def __init__(
        self,
        store: Store,
        signer: note.Signer,
        province: str,
        log_keys: Mapping[str, note.Verifier],
    ) -> None:
        self.store = store
        self.signer = signer
        self.province = province
        self.origin = origin_of(province)
        if signer.name != self.origin:
            raise ConfigError(f"log key is for {signer.name}, this node is {self.origin}")
        self.log_keys = dict(log_keys)
        self._lock = threading.Lock()
        # Before signing anything: does the log still hash to what this node last signed?
        self.problem = self._self_check()
        if self.problem:
            log.error("%s", self.problem)
        self.sign_checkpoint()  # covers entries committed before a crash

    def _self_check(self) -> str | None:
        """Why the stored entries disagree with the last signed checkpoint, or None."""
        latest = self.store.audit.checkpoint()
        if latest is None:
            return None
        size, signed = latest
        advice = (
            "; this node will not serve sessions, probes or checks: keep this store as "
            "evidence and restore the node from a backup"
        )
        try:
            cp = open_checkpoint(signed, self.signer.verifier()).checkpoint
        except NoteError:
            return (
                f"audit log self-check failed: the last checkpoint (size {size}) is not "
                f"signed by this node's log key{advice}"
            )
        leaves = self.leaves()
        if len(leaves) < cp.size:
            return (
                f"audit log self-check failed: the store holds {len(leaves)} entries but the "
                f"last signed checkpoint covers {cp.size} (entries deleted or the log "
                f"truncated){advice}"
            )
        if merkle.root(leaves[: cp.size]) != cp.root:
            return (
                f"audit log self-check failed: entries 0 to {cp.size - 1} do not hash to the "
                f"root of the last signed checkpoint (size {cp.size}): an entry was modified, "
                f"deleted, inserted or reordered{advice}"
            )
        return None

    def require_intact(self) -> None:
        """Raise `LogTampered` if the start-up self-check failed."""
        if self.problem:
            raise LogTampered(self.problem)

    # -- entries ------------------------------------------------------------

    def session_entry(self, e: SessionEntry) -> bytes:
        """A session's entry: what `e` says, by this node, with the peer's checkpoint
        it last verified."""
        peer = e.responder if e.initiator == self.province else e.initiator
        fields: dict[str, Any] = {
            "v": ENTRY_VERSION,
            "type": "session",
            "recorder": self.province,
            "session_id": e.session_id,
            "initiator": e.initiator,
            "responder": e.responder,
            "purpose": e.purpose,
            "epoch": e.epoch,
            "protocol": PROTOCOL_VERSION,
            "mode": "count-only" if e.mode == common_pb2.MODE_COUNT_ONLY else "mutual",
            "outcome": e.outcome,
            "initiator_values": e.initiator_values,
            "responder_values": e.responder_values,
            "initiator_groups": e.initiator_groups,
            "responder_groups": e.responder_groups,
            "match_count": e.match_count,
            "result_digest": b64(e.result_digest),
            "time": e.time,
            "peer_checkpoint": self.peer_checkpoint(peer),
            "sync": e.sync,
            "initiator_removed": e.initiator_removed,
            "responder_removed": e.responder_removed,
            "initiator_declared": e.initiator_declared,
            "responder_declared": e.responder_declared,
        }
        if e.reason is not None:
            fields["reason"] = _printable(e.reason)
        return encode_entry(fields)

    def record_refusal(
        self,
        *,
        session_id: str,
        peer: str,
        purpose: str,
        epoch: int,
        reason_code: str,
        at: str,
        declared: int = 0,
    ) -> None:
        """Log a refused handshake (policy, salt, protocol), at time `at` (the caller's
        clock), and sign a checkpoint."""
        session_id = _printable(session_id, 64)  # (the peer's text, in entry and index)
        entry = encode_entry(
            {
                "v": ENTRY_VERSION,
                "type": "refusal",
                "recorder": self.province,
                "session_id": session_id,
                "peer": peer,
                "purpose": _printable(purpose, 64),
                "epoch": epoch,
                "reason_code": reason_code,
                "declared": declared,
                "time": at,
            }
        )
        self.store.audit.append(session_id, entry)
        self.sign_checkpoint()

    def record_policy(self, *, version: int, sha256: str, at: str) -> None:
        """Log that a policy file (by its hash) took effect."""
        # Binary values go in entries as base64 (hex could read as a run of digits).
        self._record(
            "policy", f"policy-{version}", at, version=version, sha256=b64(bytes.fromhex(sha256))
        )

    def record_probes(
        self,
        *,
        kind: str,
        peer: str,
        values: int,
        matched: int,
        refused: int,
        since: str,
        until: str,
        at: str,
    ) -> None:
        """A batch of online-check probes answered (kind "probes") or sent ("checks")."""
        self._record(
            kind,
            f"{kind}-{peer}",
            at,
            peer=peer,
            values=values,
            matched=matched,
            refused=refused,
            since=since,
            until=until,
        )

    def record_epoch_retired(self, epoch: int, *, at: str) -> None:
        self._record("epoch", f"epoch-{epoch}", at, epoch=epoch, event="retired")

    def _record(self, kind: str, key: str, at: str, **fields: Any) -> None:
        """An entry of `kind` at time `at` (every entry's time is its caller's)."""
        entry = encode_entry(
            {
                "v": ENTRY_VERSION,
                "type": kind,
                "recorder": self.province,
                "time": at,
                **fields,
            }
        )
        self.store.audit.append(key, entry)
        self.sign_checkpoint()

    def peer_checkpoint(self, peer: str) -> dict[str, Any] | None:
        seen = self.store.audit.witnessed().get(peer)
        if seen is None:
            return None
        cp = Checkpoint.parse(note.split(seen[1])[0])
        return {"size": cp.size, "root": b64(cp.root)}

    # -- tree and checkpoints -------------------------------------------------

    def entries(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """Entries as logged (and hashed), by index; they may run ahead of a checkpoint."""
        return self.store.audit.entries(start, end)

    def index_of(self, session_id: str) -> int | None:
        """The index of the session's entry (None: no entry)."""
        return self.store.audit.index_of(session_id)

    def witnessed(self) -> dict[str, tuple[int, str]]:
        """Each peer's latest checkpoint verified here: (size, signed note)."""
        return self.store.audit.witnessed()

    def leaves(self, size: int | None = None) -> list[bytes]:
        return [merkle.leaf_hash(e) for e in self.store.audit.entries(0, size)]

    def sign_checkpoint(self) -> str:
        """Sign a checkpoint over every committed entry (unless one exists); return it.

        Never over a log that failed the self-check: that would sign the tampering.
        """
        if self.problem:
            latest = self.store.audit.checkpoint()
            return latest[1] if latest else ""
        with self._lock:
            leaves = self.leaves()
            latest = self.store.audit.checkpoint()
            if latest is not None and latest[0] == len(leaves):
                return latest[1]
            text = Checkpoint(self.origin, len(leaves), merkle.root(leaves)).text()
            signed = note.sign(text, self.signer)
            self.store.audit.add_checkpoint(len(leaves), signed)
            return signed

    def checkpoint_for(self, first: int) -> tuple[str, list[bytes]]:
        """This log's current checkpoint (signed now if new entries need one) and its
        consistency proof from `first`, the size the asking peer last verified (0:
        none). What each end of a session shows the other, so forks are found."""
        signed = self.sign_checkpoint()
        size = self.size()
        return signed, self.consistency(first, size) if 0 < first <= size else []

    def latest(self) -> str:
        """The latest checkpoint with its cosignatures appended."""
        latest = self.store.audit.checkpoint()
        signed = latest[1] if latest else self.sign_checkpoint()
        size = latest[0] if latest else 0
        return signed + "".join(self.store.audit.cosignatures(size))

    def size(self) -> int:
        latest = self.store.audit.checkpoint()
        return latest[0] if latest else 0

    def inclusion(self, index: int, size: int) -> list[bytes]:
        leaves = self.leaves(size)
        if size > len(leaves):
            raise ProtocolViolation(f"tree size {size} is larger than the log ({len(leaves)})")
        return merkle.inclusion_proof(index, leaves)

    def consistency(self, first: int, second: int) -> list[bytes]:
        leaves = self.leaves(second)
        if second > len(leaves) or first > second:
            raise ProtocolViolation(f"no consistency proof from {first} to {second}")
        if first == 0 or first == second:
            return []
        return merkle.consistency_proof(first, leaves)

    # -- witnessing -------------------------------------------------------------

    def witnessed_size(self, peer: str) -> int:
        seen = self.store.audit.witnessed().get(peer)
        return seen[0] if seen else 0

    def accept_peer_checkpoint(
        self, peer: str, signed_note: str, proof: list[bytes]
    ) -> SignedCheckpoint:
        """Verify a peer's checkpoint against the last one seen from it, and record it."""
        key = self.log_keys.get(peer)
        if key is None:
            raise ConfigError(f"no log key for peer {peer}: add {peer}.vkey to the log key folder")
        try:
            new = open_checkpoint(signed_note, key)
        except NoteError as exc:
            raise ProtocolViolation(f"peer {peer} sent a bad checkpoint: {exc.message}") from exc
        seen = self.store.audit.witnessed().get(peer)
        if seen is not None:
            old = Checkpoint.parse(note.split(seen[1])[0])
            try:
                if new.checkpoint.size < old.size:
                    raise ProofError(f"log shrank from {old.size} to {new.checkpoint.size} entries")
                merkle.verify_consistency(
                    old.size, new.checkpoint.size, old.root, new.checkpoint.root, proof
                )
            except ProofError as exc:
                log.error(
                    "peer %s log fork: checkpoint of size %d is not consistent with the one "
                    "of size %d seen before (%s)",
                    peer,
                    new.checkpoint.size,
                    old.size,
                    exc.message,
                )
                raise ForkDetected(
                    f"checkpoint of {peer} is not consistent with the one it signed before: "
                    f"{exc.message}"
                ) from exc
            if new.checkpoint.size == old.size:
                return new
        self.store.audit.set_witnessed(peer, new.checkpoint.size, signed_note)
        return new

    def cosign(self, signed: SignedCheckpoint, *, at: int) -> str:
        """Our cosignature on a peer's checkpoint, timestamped `at` (Unix seconds,
        from the caller: as every entry's time, the log takes it, never reads it)."""
        return self.signer.cosign_line(signed.checkpoint.text(), at)

    def add_cosignature(self, peer: str, line: str) -> None:
        """Store a peer's cosignature on one of our recent checkpoints (after checking it)."""
        key = self.log_keys.get(peer)
        if key is None:
            raise ConfigError(f"no log key for peer {peer}")
        cosigner = note.Verifier(key.name, key.public, note.ALG_COSIGNATURE_V1)
        for size, signed in self.store.audit.recent_checkpoints(COSIGN_LOOKBACK):
            try:
                note.verify(signed + line, cosigner)
            except NoteError:
                continue
            self.store.audit.add_cosignature(size, peer, line)
            return
        raise ProtocolViolation(f"cosignature from {peer} matches none of our checkpoints")
