"""C2SP signed notes (Ed25519) and cosignature/v1, verify-or-raise.

A note is UTF-8 text ending in a newline, then a blank line, then signature
lines ``— <name> base64(key id || signature)``. The key id is the first four
bytes of ``SHA-256(name || "\\n" || type || public key)``: type 0x01 for an
Ed25519 note signature, 0x04 for a timestamped Ed25519 cosignature, whose
signature is ``uint64-BE(time) || Ed25519(msg)`` over
``"cosignature/v1\\ntime <t>\\n" || note text``.

Keys travel as strings: a verifier key ``<name>+<hex id>+base64(0x01 || pub)``
and a signer key ``PRIVATE+KEY+<name>+<hex id>+base64(0x01 || seed)``.
Signatures by keys the verifier does not know are ignored, never accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ispf.errors import NoteError

ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04
DASH = "\u2014"


def key_id(name: str, alg: int, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public).digest()[:4]


def _check_name(name: str) -> None:
    if not name or "+" in name or any(c.isspace() for c in name):
        raise NoteError("key name must be non-empty, without '+' or spaces")


@dataclass(frozen=True)
class Verifier:
    name: str
    public: bytes
    alg: int = ALG_ED25519

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.alg, self.public)

    def encode(self) -> str:
        b = base64.b64encode(bytes([self.alg]) + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{b}"

    @classmethod
    def parse(cls, text: str) -> Verifier:
        # base64 may contain '+': split on the first two separators only.
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError("verifier key must be <name>+<hex id>+<base64 key>")
        name, hid, b = parts
        _check_name(name)
        try:
            raw = base64.b64decode(b, validate=True)
            kid = bytes.fromhex(hid)
        except (binascii.Error, ValueError) as exc:
            raise NoteError("verifier key has a malformed id or key") from exc
        if len(raw) != 33 or raw[0] not in (ALG_ED25519, ALG_COSIGNATURE_V1) or len(kid) != 4:
            raise NoteError("verifier key is not an Ed25519 key")
        v = cls(name, raw[1:], raw[0])
        if v.key_id != kid:
            raise NoteError(f"verifier key id for {name} does not match its key")
        return v

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class Signer:
    """An Ed25519 note signer. Its repr hides the key; it refuses pickling."""

    __slots__ = ("_key", "alg", "name")

    def __init__(self, name: str, seed: bytes, alg: int = ALG_ED25519) -> None:
        _check_name(name)
        self.name = name
        self.alg = alg
        self._key = Ed25519PrivateKey.from_private_bytes(seed)

    def __repr__(self) -> str:
        return f"Signer({self.name!r}, <secret>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("Signer refuses to be pickled")

    @classmethod
    def generate(cls, name: str) -> Signer:
        key = Ed25519PrivateKey.generate()
        return cls(name, key.private_bytes_raw())

    @classmethod
    def parse(cls, text: str) -> Signer:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise NoteError("signer key must be PRIVATE+KEY+<name>+<hex id>+<base64 key>")
        try:
            raw = base64.b64decode(parts[4], validate=True)
        except binascii.Error as exc:
            raise NoteError("signer key is not valid base64") from exc
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError("signer key is not an Ed25519 key")
        signer = cls(parts[2], raw[1:])
        if signer.verifier().key_id.hex() != parts[3]:
            raise NoteError("signer key id does not match its key")
        return signer

    def encode(self) -> str:
        """The signer key string (secret: write it only to an owner-only file)."""
        seed = self._key.private_bytes_raw()
        b = base64.b64encode(bytes([ALG_ED25519]) + seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier().key_id.hex()}+{b}"

    def public(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def verifier(self) -> Verifier:
        return Verifier(self.name, self.public(), ALG_ED25519)

    def cosigner(self) -> Verifier:
        """The same key as a cosignature/v1 verifier (key id with type 0x04)."""
        return Verifier(self.name, self.public(), ALG_COSIGNATURE_V1)

    def sign_line(self, text: str) -> str:
        sig = self._key.sign(text.encode())
        return _line(self.name, key_id(self.name, ALG_ED25519, self.public()) + sig)

    def cosign_line(self, text: str, timestamp: int) -> str:
        sig = self._key.sign(_cosigned_message(text, timestamp))
        kid = key_id(self.name, ALG_COSIGNATURE_V1, self.public())
        return _line(self.name, kid + timestamp.to_bytes(8, "big") + sig)


def _line(name: str, blob: bytes) -> str:
    return f"{DASH} {name} {base64.b64encode(blob).decode()}\n"


def _cosigned_message(text: str, timestamp: int) -> bytes:
    if not 0 <= timestamp < 2**63:
        raise NoteError("cosignature timestamp out of range")
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    if "\n\n" in text:
        raise NoteError("note text must not contain a blank line")


def sign(text: str, *signers: Signer) -> str:
    _check_text(text)
    return text + "\n" + "".join(s.sign_line(text) for s in signers)


@dataclass(frozen=True)
class SignatureLine:
    name: str
    key_id: bytes
    signature: bytes
    line: str


def split(note: str) -> tuple[str, list[SignatureLine]]:
    """Text and signature lines of a note; raises NoteError if malformed."""
    i = note.rfind("\n\n")
    if i < 0 or not note.endswith("\n"):
        raise NoteError("note has no signature block")
    text, block = note[: i + 1], note[i + 2 :]
    _check_text(text)
    lines: list[SignatureLine] = []
    for raw in block.splitlines(keepends=True):
        if not raw.startswith(DASH + " ") or not raw.endswith("\n"):
            raise NoteError("malformed signature line")
        parts = raw[2:-1].split(" ")
        if len(parts) != 2:
            raise NoteError("malformed signature line")
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except binascii.Error as exc:
            raise NoteError("signature line is not valid base64") from exc
        if len(blob) < 5:
            raise NoteError("signature line is too short")
        lines.append(SignatureLine(parts[0], blob[:4], blob[4:], raw))
    if not lines:
        raise NoteError("note has no signatures")
    return text, lines


def verify(note: str, *verifiers: Verifier) -> tuple[str, list[Verifier]]:
    """Check every signature by a known key; return (text, keys that signed).

    Raises NoteError if a known key's signature is invalid or no known key signed.
    Lines of unknown keys are ignored.
    """
    text, lines = split(note)
    by_id = {(v.name, v.key_id): v for v in verifiers}
    good: list[Verifier] = []
    for sl in lines:
        v = by_id.get((sl.name, sl.key_id))
        if v is None:
            continue
        if v.alg == ALG_COSIGNATURE_V1:
            if len(sl.signature) != 72:
                raise NoteError(f"cosignature by {v.name} has the wrong length")
            ts = int.from_bytes(sl.signature[:8], "big")
            ok = v.verify(_cosigned_message(text, ts), sl.signature[8:])
        else:
            ok = v.verify(text.encode(), sl.signature)
        if not ok:
            raise NoteError(f"invalid signature by {v.name}")
        good.append(v)
    if not good:
        raise NoteError("no signature by a trusted key")
    return text, good


def cosignature_time(line: SignatureLine) -> int:
    return int.from_bytes(line.signature[:8], "big")
