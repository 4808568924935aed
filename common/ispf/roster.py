"""The federation roster: each province's public facts, signed by the forum's CA key.

One JSON file, published by the forum (``ispf forum sign`` updates it) and
loaded by nodes and auditors instead of copying keys around::

    {"roster": {"forum": <CA fingerprint>, "version": 3, "issued_at": ...,
                "nodes": {"punjab": {"address": "10.0.0.5:50051",
                                     "cert_sha256": <hex>, "log_key": <signed-note vkey>,
                                     "seal_key": <X25519 public key, hex>}, ...}},
     "signature": <base64 ECDSA-SHA256 over the canonical JSON of "roster">}

Loading verifies the signature under the CA certificate the loader already
trusts, and that the roster names that CA; a roster that fails is refused.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ispf import note
from ispf.auditlog import origin_of
from ispf.errors import ConfigError, NoteError
from ispf.sealing import forum_id


@dataclass(frozen=True)
class RosterEntry:
    address: str
    cert_sha256: str
    log_key: str
    seal_key: str

    def verifier(self) -> note.Verifier:
        return note.Verifier.parse(self.log_key)


@dataclass(frozen=True)
class Roster:
    forum: str
    version: int = 0
    issued_at: str = ""
    nodes: dict[str, RosterEntry] = field(default_factory=dict)

    def body(self) -> bytes:
        doc = {
            "forum": self.forum,
            "version": self.version,
            "issued_at": self.issued_at,
            "nodes": {
                n: {
                    "address": e.address,
                    "cert_sha256": e.cert_sha256,
                    "log_key": e.log_key,
                    "seal_key": e.seal_key,
                }
                for n, e in sorted(self.nodes.items())
            },
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def signed(self, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
        sig = ca_key.sign(self.body(), ec.ECDSA(hashes.SHA256()))
        doc = {"roster": json.loads(self.body()), "signature": base64.b64encode(sig).decode()}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")

    def log_keys(self) -> dict[str, note.Verifier]:
        """Every node's checkpoint verifier key, checked to name that node's log."""
        out = {}
        for name, e in self.nodes.items():
            try:
                v = e.verifier()
            except NoteError as exc:
                raise ConfigError(f"roster: the log key of {name} is not a verifier key") from exc
            if v.name != origin_of(name):
                raise ConfigError(f"roster: the log key of {name} is for {v.name}")
            out[name] = v
        return out


def _entry(name: str, v: object) -> RosterEntry:
    if not isinstance(v, dict):
        raise ConfigError(f"roster: entry {name!r} is not an object")
    try:
        return RosterEntry(
            address=str(v["address"]),
            cert_sha256=str(v["cert_sha256"]),
            log_key=str(v["log_key"]),
            seal_key=str(v["seal_key"]),
        )
    except KeyError as exc:
        raise ConfigError(f"roster: entry {name!r} lacks {exc}") from exc


def parse(data: bytes, where: str, ca: x509.Certificate) -> Roster:
    """A roster whose signature verifies under `ca`, and which names `ca`; else refused."""
    try:
        doc = json.loads(data)
        body = doc["roster"]
        sig = base64.b64decode(doc["signature"], validate=True)
        roster = Roster(
            forum=str(body["forum"]),
            version=int(body["version"]),
            issued_at=str(body.get("issued_at", "")),
            nodes={str(n): _entry(str(n), v) for n, v in dict(body["nodes"]).items()},
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"roster {where} is malformed ({exc.__class__.__name__})") from exc
    pub = ca.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise ConfigError("the forum CA key is not an EC key")
    try:
        pub.verify(sig, roster.body(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise ConfigError(
            f"roster {where} is not signed by the forum CA this node trusts: refused"
        ) from exc
    if roster.forum != forum_id(ca):
        raise ConfigError(f"roster {where} is for another forum: refused")
    return roster


def load(path: Path, ca_path: Path) -> Roster:
    try:
        data, ca_pem = path.read_bytes(), ca_path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"roster or CA file missing: {exc.filename}") from exc
    return parse(data, str(path), x509.load_pem_x509_certificate(ca_pem))
