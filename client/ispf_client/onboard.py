"""Keys born where they are used: the node's (or system's) side of joining a forum.

``ispf node init`` runs on the province's own server. In the node's folder
(0700) it creates, each 0600:

* ``node.key``   TLS private key (ECDSA P-256);
* ``log.key``    audit-log signing key (Ed25519, a signed-note key);
* ``seal.key``   X25519 key pair for receiving sealed secrets (the epoch salts);
* ``master.key`` the node's master key: its pair keys derive from it;

and writes ``request.json``: a certificate signing request and the public halves,
the one file the forum needs (``ispf forum sign``). Internal systems and
auditors make a TLS key and a request the same way (``ispf forum request``).
No private key leaves the folder it was made in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from ispf import files, note, sealing
from ispf.auditlog import load_log_signer, origin_of
from ispf.errors import ConfigError, NoteError
from ispf.identity import PROVINCE_RE, ROLE_AUDIT, ROLE_INTERNAL, ROLE_NODE
from ispf.keys import MasterKey, salt_path, write_private_file
from ispf.nodeconfig import load_config

REQUEST_FORMAT = "ispf-request/v1"
STEMS = {ROLE_NODE: "node", ROLE_INTERNAL: "client", ROLE_AUDIT: "auditor"}


@dataclass(frozen=True)
class Request:
    """What a node or system asks the forum for; public halves only."""

    role: str
    name: str
    csr: x509.CertificateSigningRequest
    address: str = ""
    hosts: tuple[str, ...] = ()
    log_key: str = ""
    seal_key: str = ""

    def to_bytes(self) -> bytes:
        doc = {
            "format": REQUEST_FORMAT,
            "role": self.role,
            "name": self.name,
            "csr": self.csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            "address": self.address,
            "hosts": list(self.hosts),
            "log_key": self.log_key,
            "seal_key": self.seal_key,
        }
        return (json.dumps(doc, indent=1) + "\n").encode("ascii")

    @classmethod
    def load(cls, path: Path) -> Request:
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("format") != REQUEST_FORMAT:
                raise ConfigError(f"{path} is not an {REQUEST_FORMAT} file")
            csr = x509.load_pem_x509_csr(str(doc["csr"]).encode("ascii"))
            req = cls(
                role=str(doc["role"]),
                name=str(doc["name"]),
                csr=csr,
                address=str(doc.get("address", "")),
                hosts=tuple(str(h) for h in doc.get("hosts", [])),
                log_key=str(doc.get("log_key", "")),
                seal_key=str(doc.get("seal_key", "")),
            )
        except FileNotFoundError as exc:
            raise ConfigError(f"request file {path} does not exist") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"request {path} is malformed ({exc.__class__.__name__})") from exc
        req.check(str(path))
        return req

    def check(self, where: str) -> None:
        """Refuse a request whose parts do not belong together (before signing it)."""
        if self.role not in STEMS:
            raise ConfigError(f"{where}: unknown role {self.role!r}")
        if self.role != ROLE_AUDIT and not PROVINCE_RE.match(self.name):
            raise ConfigError(f"{where}: province {self.name!r} must be a lowercase slug")
        if not self.csr.is_signature_valid:
            raise ConfigError(f"{where}: the CSR's signature does not verify")
        if not isinstance(self.csr.public_key(), ec.EllipticCurvePublicKey):
            raise ConfigError(f"{where}: the CSR's key is not ECDSA")
        if self.role == ROLE_NODE:
            try:
                v = note.Verifier.parse(self.log_key)
            except NoteError as exc:
                raise ConfigError(f"{where}: the log key is not a signed-note key") from exc
            if v.name != origin_of(self.name):
                raise ConfigError(f"{where}: the log key is for {v.name}, not {self.name}")
            sealing.parse_public_key(self.seal_key, f"{where}: seal_key")
            if not self.address:
                raise ConfigError(f"{where}: a node request needs the node's address")


def _csr(key: ec.EllipticCurvePrivateKey, name: str, role: str) -> x509.CertificateSigningRequest:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def _tls_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(path, pem)
    return key


def _fresh(folder: Path, names: list[str]) -> None:
    for n in names:
        if (folder / n).exists():
            raise ConfigError(f"{folder / n} already exists: keys are never replaced silently")


def init_node(folder: Path, province: str, *, address: str, hosts: tuple[str, ...] = ()) -> Path:
    """Create a node's keys in `folder` and its request file; returns the request path."""
    if not PROVINCE_RE.match(province):
        raise ConfigError(f"province '{province}' must be a lowercase slug like 'punjab'")
    names = ["node.key", "log.key", "seal.key", "master.key", "request.json"]
    _fresh(folder, names)
    for d in (folder, folder / "salts"):
        files.private_dir(d)
        os.chmod(d, files.DIR_MODE)  # (a folder that existed already is made private too)
    tls = _tls_key(folder / "node.key")
    signer = note.Signer.generate(origin_of(province))
    write_private_file(folder / "log.key", (signer.encode() + "\n").encode("ascii"))
    seal = X25519PrivateKey.generate()
    sealing.write_private_key(folder / "seal.key", seal)
    MasterKey.create_file(folder / "master.key")
    req = Request(
        role=ROLE_NODE,
        name=province,
        csr=_csr(tls, province, ROLE_NODE),
        address=address,
        hosts=hosts,
        log_key=signer.verifier().encode(),
        seal_key=sealing.public_key_text(seal.public_key()),
    )
    files.write_private_bytes(folder / "request.json", req.to_bytes())
    return folder / "request.json"


def renew_request(
    folder: Path, province: str, *, address: str, hosts: tuple[str, ...] = ()
) -> Path:
    """Certificate rotation: a new TLS key as ``node.key.new`` (0600) and a new
    ``request.json`` with the node's existing log and sealing public keys (those keys
    stay: the log's origin and the sealed salts do not change)."""
    new_key = folder / "node.key.new"
    if new_key.exists():
        raise ConfigError(f"{new_key} already exists: finish or remove the rotation under way")
    signer = load_log_signer(folder / "log.key")
    seal = sealing.load_private_key(folder / "seal.key")
    tls = _tls_key(new_key)
    req = Request(
        role=ROLE_NODE,
        name=province,
        csr=_csr(tls, province, ROLE_NODE),
        address=address,
        hosts=hosts,
        log_key=signer.verifier().encode(),
        seal_key=sealing.public_key_text(seal.public_key()),
    )
    req.check(str(folder / "request.json"))
    (folder / "request.json").unlink(missing_ok=True)
    files.write_private_bytes(folder / "request.json", req.to_bytes())
    return folder / "request.json"


def init_request(folder: Path, role: str, name: str) -> Path:
    """An internal system's or auditor's TLS key (0600) and request file in `folder`."""
    if role not in (ROLE_INTERNAL, ROLE_AUDIT):
        raise ConfigError("`forum request` is for internal systems and auditors; nodes: node init")
    stem = STEMS[role]
    _fresh(folder, [f"{stem}.key", "request.json"])
    files.private_dir(folder)
    key = _tls_key(folder / f"{stem}.key")
    req = Request(role=role, name=name, csr=_csr(key, name, role))
    req.check(str(folder / "request.json"))
    files.write_private_bytes(folder / "request.json", req.to_bytes())
    return folder / "request.json"


def write_node_config(
    folder: Path, province: str, *, listen: str, ca: Path, epoch: int, workers: int = 0
) -> Path:
    """The node's config for a node made by `init_node`: roster instead of copied keys."""
    lines = [
        f'province = "{province}"',
        f'listen = "{listen}"',
        'store = "node.sqlite"',
        'policy = "policy.toml"',
        "",
        "[tls]",
        f'ca = "{ca}"',
        'cert = "node.pem"',
        'key = "node.key"',
        "",
        "[salts]",
        'dir = "salts"',
        f"current_epoch = {epoch}",
        "",
        "[log]",
        'key = "log.key"',
        "",
        "[keys]",
        'master = "master.key"',
        'seal = "seal.key"',
        "",
        "[roster]",
        'file = "roster.json"',
        "",
        "[blinding]",
        f"workers = {workers}",
        "chunk_values = 4096",
    ]
    path = folder / "node.toml"
    files.write_private_text(path, "\n".join(lines) + "\n")
    policy = folder / "policy.toml"
    if not policy.exists():
        files.write_private_text(
            policy,
            "# Data-sharing policy of this node: add a [peers.<province>] table per agreement\n"
            "# (see docs/operators.md); bump `version` with every change.\nversion = 1\n",
        )
    return path


def import_salt(config_path: Path, sealed: Path, epoch: int | None = None) -> Path:
    """Open a sealed salt with the node's sealing key, check it, store it 0600."""
    cfg = load_config(config_path)
    if cfg.seal_key is None:
        raise ConfigError(f"{config_path}: no [keys] seal = ... (the node's sealing key)")
    try:
        ca = x509.load_pem_x509_certificate(cfg.tls.ca.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{cfg.tls.ca}: no such file: copy the forum's ca.pem into the node's folder first "
            "(docs/operators.md, section 2); the sealed salt names the forum by it"
        ) from None
    except ValueError:
        raise ConfigError(f"{cfg.tls.ca} is not a PEM certificate") from None
    try:
        data = sealed.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"sealed salt {sealed} does not exist") from exc
    salt = sealing.open_salt(
        data,
        where=str(sealed),
        forum=sealing.forum_id(ca),
        node=cfg.province,
        key=sealing.load_private_key(cfg.seal_key),
        epoch=epoch,
    )
    files.private_dir(cfg.salt_dir)
    out = salt_path(cfg.salt_dir, salt.epoch)
    if out.exists():
        raise ConfigError(f"{out} already exists: this node holds epoch {salt.epoch}'s salt")
    salt.to_file(out)
    return out
