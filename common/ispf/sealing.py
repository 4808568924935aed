"""Secrets sent to one holder of an X25519 key: HPKE (RFC 9180) from `cryptography`.

Two uses:

* a **sealed salt**: the forum seals an epoch's salt to each node's sealing
  public key. HPKE's `info` binds the forum (its CA fingerprint), the epoch and
  the node, so a file opens only for the node, forum and epoch it was made for;
  the plaintext carries the salt's key check value, which the node checks after
  opening.
* a **sealed backup**: a node seals a copy of its store to an operator's backup
  public key (`ispf-node backup`); `info` binds the province.

The header of each file says, in the clear, whom it is for, so that a file for
another node or epoch is refused with that reason before any decryption; a
header that was altered no longer matches the `info` the file was sealed under
and the file does not open (refused as altered or not sealed to this key).
Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.x509 import Certificate

from ispf.errors import KeyFileError, SealedFileError
from ispf.keys import KCV_BYTES, SALT_BYTES, ForumSalt, check_private_file, write_private_file

T = TypeVar("T")

SALT_FORMAT = "ispf-sealed-salt/v1"
BACKUP_FORMAT = "ispf-sealed-backup/v1"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def forum_id(ca: Certificate) -> str:
    """The forum's name in sealed files and the roster: SHA-256 of its CA certificate."""
    return ca.fingerprint(hashes.SHA256()).hex()


def _salt_info(forum: str, epoch: int, node: str) -> bytes:
    return f"{SALT_FORMAT}|forum={forum}|epoch={epoch}|node={node}".encode("ascii")


def _backup_info(province: str) -> bytes:
    return f"{BACKUP_FORMAT}|node={province}".encode("ascii")


# -- sealing keys --------------------------------------------------------------


def public_key_text(key: X25519PublicKey) -> str:
    """A sealing public key as 64 hex characters (the roster's form)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def parse_public_key(text: str, where: str) -> X25519PublicKey:
    try:
        raw = bytes.fromhex(text.strip())
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyFileError(f"{where}: not an X25519 public key (64 hex characters)") from exc


def write_private_key(path: Path, key: X25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, pem)


def load_private_key(path: Path) -> X25519PrivateKey:
    """An X25519 private key in PEM (ours, or `openssl genpkey -algorithm X25519`), 0600."""
    check_private_file(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path} is not an X25519 key")
    return key


def load_public_key(path: Path) -> X25519PublicKey:
    """An X25519 public key: PEM (`openssl pkey -pubout`) or 64 hex characters."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"public key file {path} does not exist") from exc
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise KeyFileError(f"{path} is not a PEM public key") from exc
        if not isinstance(key, X25519PublicKey):
            raise KeyFileError(f"{path} is not an X25519 public key")
        return key
    return parse_public_key(data.decode("ascii", errors="replace"), str(path))


# -- sealed salts --------------------------------------------------------------


@dataclass(frozen=True)
class SealedSaltHeader:
    forum: str
    epoch: int
    node: str


def seal_salt(salt: ForumSalt, *, forum: str, node: str, to: X25519PublicKey) -> bytes:
    """The file that carries `salt` to `node` (JSON; the secret part is HPKE-sealed)."""
    plaintext = salt.unsafe_raw() + salt.key_check()
    ct = _SUITE.encrypt(plaintext, to, info=_salt_info(forum, salt.epoch, node))
    doc = {
        "format": SALT_FORMAT,
        "forum": forum,
        "epoch": salt.epoch,
        "node": node,
        "kcv": salt.key_check().hex(),
        "sealed": base64.b64encode(ct).decode("ascii"),
    }
    return (json.dumps(doc, indent=1) + "\n").encode("ascii")


def _header(data: bytes, where: str, fmt: str) -> dict[str, object]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SealedFileError(f"{where} is not a sealed file (not JSON)") from exc
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise SealedFileError(f"{where} is not a {fmt} file")
    return doc


def _field(
    doc: dict[str, object], name: str, parse: Callable[[object], T], what: str, where: str
) -> T:
    """One field of a sealed file's frame, or a refusal that names it (never its value)."""
    try:
        return parse(doc[name])
    except (KeyError, ValueError) as exc:
        state = "missing" if name not in doc else f"not {what}"
        raise SealedFileError(
            f"{where}: malformed sealed salt: field '{name}' is {state} (the file was "
            "altered or cut short: ask the forum for a new copy)"
        ) from exc


def open_salt(
    data: bytes,
    *,
    where: str,
    forum: str,
    node: str,
    key: X25519PrivateKey,
    epoch: int | None = None,
) -> ForumSalt:
    """Open a sealed salt for this node; refuse another node, forum or epoch, or a change."""
    doc = _header(data, where, SALT_FORMAT)
    f_node = _field(doc, "node", str, "a node name", where)
    f_forum = _field(doc, "forum", str, "the forum's id", where)
    f_epoch = _field(doc, "epoch", lambda v: int(str(v)), "a whole number", where)
    kcv = _field(doc, "kcv", lambda v: bytes.fromhex(str(v)), "hex", where)
    ct = _field(doc, "sealed", lambda v: base64.b64decode(str(v), validate=True), "base64", where)
    if f_node != node:
        raise SealedFileError(
            f"{where} is sealed for node {f_node!r}, not this node ({node}): "
            "ask the forum for this node's file"
        )
    if f_forum != forum:
        raise SealedFileError(
            f"{where} is from another forum (CA {f_forum[:16]}..., this node trusts "
            f"{forum[:16]}...)"
        )
    if epoch is not None and f_epoch != epoch:
        raise SealedFileError(f"{where} holds the salt of epoch {f_epoch}, not epoch {epoch}")
    try:
        plain = _SUITE.decrypt(ct, key, info=_salt_info(f_forum, f_epoch, f_node))
    except (InvalidTag, ValueError) as exc:
        raise SealedFileError(
            f"{where} does not open under this node's sealing key: it was altered, or "
            "sealed to another key (for epoch, node and forum as its header says)"
        ) from exc
    if len(plain) != SALT_BYTES + KCV_BYTES:
        raise SealedFileError(f"{where}: sealed salt has the wrong length")
    salt = ForumSalt(f_epoch, plain[:SALT_BYTES])
    if salt.key_check() != plain[SALT_BYTES:] or salt.key_check() != kcv:
        raise SealedFileError(f"{where}: the salt does not match its key check value")
    return salt


# -- sealed backups -----------------------------------------------------------


def seal_backup(payload: bytes, *, province: str, to: X25519PublicKey) -> bytes:
    """A backup file: one JSON header line, then the HPKE ciphertext."""
    head = json.dumps({"format": BACKUP_FORMAT, "node": province}).encode("ascii")
    return head + b"\n" + _SUITE.encrypt(payload, to, info=_backup_info(province))


def open_backup(data: bytes, *, where: str, province: str, key: X25519PrivateKey) -> bytes:
    head, sep, ct = data.partition(b"\n")
    if not sep:
        raise SealedFileError(f"{where} is not an ispf-node backup")
    doc = _header(head, where, BACKUP_FORMAT)
    if doc.get("node") != province:
        raise SealedFileError(
            f"{where} is a backup of node {str(doc.get('node'))!r}, not of {province}"
        )
    try:
        return _SUITE.decrypt(ct, key, info=_backup_info(province))
    except (InvalidTag, ValueError) as exc:
        raise SealedFileError(
            f"{where} does not open under this backup key: altered, or sealed to another key"
        ) from exc
