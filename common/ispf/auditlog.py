"""The match log's data: canonical entries, checkpoints, bundles, receipts.

Entries are canonical JSON: UTF-8, keys sorted, no whitespace, ASCII only,
integers and strings only (binary values in standard base64). The stored and
served bytes are exactly the bytes hashed into the Merkle tree, and decoding
refuses anything that would not re-encode to the same bytes. Entries carry no
ID number and no unkeyed hash of one; `encode_entry` refuses any value with a
run of 13 or more digits, as a last line of defence.

Entry types (``"v": 1``):

* ``session``: session_id, recorder (the node writing it), initiator,
  responder, purpose, epoch, protocol, mode (``mutual`` / ``count-only``),
  outcome (``completed`` / ``failed``), reason (failed only), initiator_values,
  responder_values, initiator_groups, responder_groups, match_count,
  result_digest (base64 Merkle root over the sorted matched tags; empty in
  count-only mode), time (UTC, ISO 8601), peer_checkpoint (``{"size", "root"}``
  of the latest checkpoint this node had verified from the peer, or null), sync
  (``none`` for a one-off session, ``full`` or ``incremental``), initiator_removed
  and responder_removed (values taken out of the pair state; incremental runs),
  initiator_declared and responder_declared (registry sizes, distinct IDs, the
  two sides declared in the handshake; the query budget is reckoned on them);
* ``refusal``: session_id, recorder, peer, purpose, epoch, reason_code
  (``BudgetExhausted`` where the peer's query budget was spent), declared (the
  registry size the peer declared), time;
* ``policy``: recorder, version, sha256 (of the policy file that took effect), time;
* ``epoch``: recorder, epoch, event (``retired``), time;
* ``probes`` / ``checks``: recorder, peer, values (IDs probed), matched, refused,
  since, until: online-check probes answered for a peer, or sent to it, in a batch.

A checkpoint is a C2SP signed note whose text is
``<origin>\\n<size>\\n<base64 root>\\n`` with origin ``ispf-match/<province>``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ispf import merkle, note
from ispf.errors import ConfigError, EntryError, NoteError
from ispf.keys import check_private_file

ORIGIN_PREFIX = "ispf-match/"
ENTRY_VERSION = 1
ENTRY_TYPES = frozenset({"session", "refusal", "policy", "epoch", "probes", "checks"})
_DIGIT_RUN = re.compile(r"\d{13,}")
# Fields both sides of a session must log identically (match_count: mutual only).
PAIRED_FIELDS = (
    "session_id",
    "initiator",
    "responder",
    "purpose",
    "epoch",
    "protocol",
    "mode",
    "outcome",
    "initiator_values",
    "responder_values",
    "initiator_groups",
    "responder_groups",
    "result_digest",
    "sync",
    "initiator_removed",
    "responder_removed",
    "initiator_declared",
    "responder_declared",
)


def origin_of(province: str) -> str:
    return ORIGIN_PREFIX + province


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EntryError("value is not valid base64") from exc


def _check_values(value: Any, path: str) -> None:
    if isinstance(value, (bool, float)):
        raise EntryError(f"{path}: only integers and strings are allowed")
    if isinstance(value, str) and _DIGIT_RUN.search(value):
        raise EntryError(f"{path}: a run of 13 digits could be an ID number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_values(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_values(v, f"{path}[{i}]")


def encode_entry(fields: dict[str, Any]) -> bytes:
    _check_values(fields, "entry")
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def decode_entry(data: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EntryError("entry is not ASCII JSON") from exc
    if not isinstance(fields, dict):
        raise EntryError("entry is not a JSON object")
    if encode_entry(fields) != data:
        raise EntryError("entry is not in canonical form")
    if fields.get("v") != ENTRY_VERSION or fields.get("type") not in ENTRY_TYPES:
        raise EntryError("entry has an unknown version or type")
    return fields


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def text(self) -> str:
        return f"{self.origin}\n{self.size}\n{b64(self.root)}\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("checkpoint text must be origin, size and root lines")
        origin, size, root = lines[0], lines[1], lines[2]
        if not size.isdigit() or (size != "0" and size.startswith("0")):
            raise NoteError("checkpoint size is not a decimal number")
        raw = unb64(root)
        if len(raw) != merkle.HASH_BYTES:
            raise NoteError("checkpoint root is not a SHA-256 hash")
        return cls(origin, int(size), raw)


@dataclass(frozen=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    note: str
    cosigners: list[str]


def open_checkpoint(
    signed_note: str, log_key: note.Verifier, cosigners: Sequence[note.Verifier] = ()
) -> SignedCheckpoint:
    """Verify a checkpoint signed by `log_key`; cosignatures by known keys are checked too."""
    text, good = note.verify(signed_note, log_key, *cosigners)
    if log_key not in good:
        raise NoteError(f"checkpoint is not signed by {log_key.name}")
    cp = Checkpoint.parse(text)
    if cp.origin != log_key.name:
        raise NoteError(f"checkpoint origin {cp.origin} is not {log_key.name}")
    return SignedCheckpoint(cp, signed_note, [v.name for v in good if v != log_key])


def tag_leaves(tags: list[bytes]) -> list[bytes]:
    """Leaves of the result tree: the sorted distinct matched tags."""
    return [merkle.leaf_hash(t) for t in sorted(set(tags))]


def verify_bundle(
    bundle: dict[str, Any], log_key: note.Verifier, cosigners: list[note.Verifier]
) -> dict[str, Any]:
    """Check an offline proof bundle (entry, inclusion proof, signed checkpoint).

    Returns the decoded entry; raises on any failure. A receipt bundle also
    carries a tag and its proof against the entry's result digest.
    """
    signed = open_checkpoint(bundle["checkpoint"], log_key, cosigners)
    entry = unb64(bundle["entry"])
    fields = decode_entry(entry)
    merkle.verify_inclusion(
        int(bundle["entry_index"]),
        signed.checkpoint.size,
        merkle.leaf_hash(entry),
        [unb64(h) for h in bundle.get("entry_proof", [])],
        signed.checkpoint.root,
    )
    if fields.get("session_id") != bundle.get("session_id"):
        raise EntryError("the entry belongs to another session")
    if "tag" in bundle:
        digest = unb64(fields["result_digest"])
        merkle.verify_inclusion(
            int(bundle["tag_index"]),
            int(fields["match_count"]),
            merkle.leaf_hash(unb64(bundle["tag"])),
            [unb64(h) for h in bundle.get("tag_proof", [])],
            digest,
        )
    return fields


def load_log_signer(path: Path) -> note.Signer:
    """A node's checkpoint signing key (log.key, 0600): the node's, and the tools that
    renew its certificate request."""
    check_private_file(path)
    try:
        return note.Signer.parse(path.read_text(encoding="ascii"))
    except (NoteError, UnicodeDecodeError) as exc:
        raise ConfigError(f"log key {path} is not a signed-note private key") from exc
