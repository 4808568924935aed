"""Forum administration: the demo CA, certificates for each role, salts, node configs.

The CA signs ECDSA P-256 certificates whose subject is ``CN=<name>, OU=<role>``
(see `ispf.identity`). Node certificates name the node as
``<province>.node.ispf`` (what peers verify) plus the hosts it is reached at.
Every private key and salt is written owner-only (0600).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ispf import files, note, sealing
from ispf import roster as roster_mod
from ispf.auditlog import origin_of
from ispf.errors import ConfigError
from ispf.identity import PROVINCE_RE, ROLE_AUDIT, ROLE_INTERNAL, ROLE_NODE, node_hostname
from ispf.keys import ForumSalt, write_private_file
from ispf.roster import Roster, RosterEntry
from ispf.sealing import forum_id
from ispf_client.sdk import DEFAULT_TIME_ZONE

CA_DAYS = 3650
LEAF_DAYS = 397


@dataclass(frozen=True)
class ForumLayout:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def salt_dir(self) -> Path:
        return self.root / "salts"

    def salt_file(self, epoch: int) -> Path:
        return self.salt_dir / f"epoch-{epoch}.salt"

    def node_dir(self, province: str) -> Path:
        return self.root / "nodes" / province

    def client_dir(self, province: str) -> Path:
        return self.root / "clients" / province

    def auditor_dir(self, name: str) -> Path:
        return self.root / "auditors" / name

    @property
    def revoked(self) -> Path:
        """The forum's deny list: serial numbers of revoked certificates."""
        return self.root / "revoked.txt"

    @property
    def roster(self) -> Path:
        """The signed federation roster (`ispf.roster`), updated by `sign_request`."""
        return self.root / "roster.json"

    @property
    def issued_dir(self) -> Path:
        """Certificates issued for requests, named <role>-<name>.pem (public)."""
        return self.root / "issued"

    def sealed_dir(self, epoch: int) -> Path:
        """Epoch `epoch`'s salt sealed to each node: <province>.sealed (safe to send)."""
        return self.root / "sealed" / f"epoch-{epoch}"

    @property
    def log_keys_dir(self) -> Path:
        """Public verifier keys of every node's log (distributed to nodes and auditors)."""
        return self.root / "logkeys"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str, ou: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ISPF Forum"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def create_ca(layout: ForumLayout) -> None:
    if layout.ca_cert.exists():
        raise ConfigError(f"a forum CA already exists in {layout.root}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ISPF Forum"),
            x509.NameAttribute(NameOID.COMMON_NAME, "ISPF Forum CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    files.private_dir(layout.root)  # (holds the CA key)
    write_private_file(layout.ca_key, _key_pem(key))
    layout.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(layout: ForumLayout) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the forum CA key is not an EC key")
    return ca_key, x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())


def _certificate(
    layout: ForumLayout,
    *,
    name: str,
    role: str,
    public_key: ec.EllipticCurvePublicKey,
    hosts: tuple[str, ...] = (),
) -> x509.Certificate:
    """A leaf certificate for `name` in `role`: subject, SANs and usages set by the forum."""
    if role not in (ROLE_NODE, ROLE_INTERNAL, ROLE_AUDIT):
        raise ConfigError(f"unknown role '{role}'")
    if role != ROLE_AUDIT and not PROVINCE_RE.match(name):
        raise ConfigError(f"province '{name}' must be a lowercase slug like 'punjab'")
    ca_key, ca_cert = _load_ca(layout)
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name, role))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if role == ROLE_NODE:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        sans: list[x509.GeneralName] = [x509.DNSName(node_hostname(name))]
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(
        ca_key, hashes.SHA256()
    )


def issue_certificate(
    layout: ForumLayout,
    *,
    name: str,
    role: str,
    out_dir: Path,
    stem: str,
    hosts: tuple[str, ...] = (),
) -> tuple[Path, Path]:
    """Demo and legacy path: make the key here and issue its certificate; returns (cert
    path, key path). Production nodes make their own keys (`onboard`, `sign_request`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(layout, name=name, role=role, public_key=key.public_key(), hosts=hosts)
    files.private_dir(out_dir)  # (holds the private key)
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    # Replace both files atomically (a running node may be reading them: rotation).
    tmp_key, tmp_cert = key_path.with_suffix(".key.new"), cert_path.with_suffix(".pem.new")
    tmp_key.unlink(missing_ok=True)
    write_private_file(tmp_key, _key_pem(key))
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp_key.replace(key_path)
    tmp_cert.replace(cert_path)
    return cert_path, key_path


def sign_request(layout: ForumLayout, request: Path, *, address: str = "") -> Path:
    """Issue the certificate a request asks for; a node's public keys join the roster.

    The forum decides the certificate's subject and usages from the request's
    role and name (after checking the request's parts belong together); the
    key in it is the requester's, whose private half the forum never sees.
    Returns the certificate's path (to send back with the roster)."""
    from ispf_client.onboard import Request

    req = Request.load(request)
    pub = req.csr.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)  # (Request.check)
    cert = _certificate(layout, name=req.name, role=req.role, public_key=pub, hosts=req.hosts)
    files.private_dir(layout.issued_dir)
    out = layout.issued_dir / f"{req.role}-{req.name}.pem"
    tmp = out.with_suffix(".pem.new")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(out)
    if req.role == ROLE_NODE:
        entry = RosterEntry(
            address=address or req.address,
            cert_sha256=cert.fingerprint(hashes.SHA256()).hex(),
            log_key=req.log_key,
            seal_key=req.seal_key,
        )
        publish_roster(layout, {req.name: entry})
    return out


def read_roster(layout: ForumLayout) -> Roster:
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    if not layout.roster.exists():
        return Roster(forum=forum_id(ca))
    return roster_mod.parse(layout.roster.read_bytes(), str(layout.roster), ca)


def publish_roster(layout: ForumLayout, changes: dict[str, RosterEntry]) -> Roster:
    """Add or replace roster entries; the roster's version goes up and it is re-signed."""
    ca_key, _ = _load_ca(layout)
    old = read_roster(layout)
    new = Roster(
        forum=old.forum,
        version=old.version + 1,
        issued_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        nodes={**old.nodes, **changes},
    )
    tmp = layout.roster.with_suffix(".json.new")
    tmp.write_bytes(new.signed(ca_key))
    tmp.replace(layout.roster)
    return new


def seal_salt(layout: ForumLayout, epoch: int, *, keep: Path | None = None) -> list[Path]:
    """A new epoch salt, sealed to every node in the roster: one file per node.

    The salt exists in clear only in this process's memory, unless `keep` names a
    file to keep a copy in (0600; for adding a node later in the epoch: destroy it
    once every node holds the salt, see docs/operations.md)."""
    roster = read_roster(layout)
    if not roster.nodes:
        raise ConfigError(f"the roster {layout.roster} has no nodes yet: sign their requests")
    out_dir = layout.sealed_dir(epoch)
    if out_dir.exists():
        raise ConfigError(f"epoch {epoch}'s salt was sealed already: {out_dir}")
    salt = ForumSalt.generate(epoch)
    files.private_dir(out_dir)
    written = []
    for name, entry in sorted(roster.nodes.items()):
        to = sealing.parse_public_key(entry.seal_key, f"roster entry {name}")
        path = out_dir / f"{name}.sealed"
        path.write_bytes(sealing.seal_salt(salt, forum=roster.forum, node=name, to=to))
        written.append(path)
    if keep is not None:
        salt.to_file(keep)
    return written


REVOKED_HEADER = (
    "# Revoked forum certificates: one serial number (hex) per line; '#' starts a comment.\n"
    "# Every node re-reads this file when it changes and refuses these certificates.\n"
)


def revoke(
    layout: ForumLayout, *, serial: int | None = None, cert: Path | None = None, reason: str = ""
) -> int:
    """Add a certificate to the forum's deny list; returns its serial."""
    if cert is not None:
        serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    if serial is None:
        raise ConfigError("give a certificate file or a serial number to revoke")
    if not layout.revoked.exists():
        layout.revoked.write_text(REVOKED_HEADER, encoding="utf-8")
    note_text = "".join(c for c in reason if c.isprintable())[:100]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    with layout.revoked.open("a", encoding="utf-8") as fh:
        fh.write(f"{serial:x}  # {stamp} {note_text}\n")
    return serial


def new_salt(layout: ForumLayout, epoch: int) -> Path:
    path = layout.salt_file(epoch)
    if path.exists():
        raise ConfigError(f"a salt for epoch {epoch} already exists: {path}")
    files.private_dir(layout.salt_dir)
    ForumSalt.generate(epoch).to_file(path)
    return path


def _rel(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(path, base)


def write_node_config(
    layout: ForumLayout,
    province: str,
    *,
    listen: str,
    peers: dict[str, str],
    epoch: int,
    workers: int = 0,
) -> Path:
    d = layout.node_dir(province)
    lines = [
        f'province = "{province}"',
        f'listen = "{listen}"',
        'store = "node.sqlite"',
        'policy = "policy.toml"',
        "",
        "[tls]",
        f'ca = "{_rel(layout.ca_cert, d)}"',
        'cert = "node.pem"',
        'key = "node.key"',
        f'revoked = "{_rel(layout.revoked, d)}"',
        "",
        "[salts]",
        f'dir = "{_rel(layout.salt_dir, d)}"',
        f"current_epoch = {epoch}",
        "",
        "[log]",
        'key = "log.key"',
        f'keys = "{_rel(layout.log_keys_dir, d)}"',
        "",
        "[blinding]",
        f"workers = {workers}",
        "chunk_values = 4096",
    ]
    for peer, addr in sorted(peers.items()):
        lines += ["", f"[peers.{peer}]", f'address = "{addr}"']
    path = d / "node.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if not (d / "policy.toml").exists():
        write_policy(d / "policy.toml", sorted(peers))
    return path


def write_policy(
    path: Path, peers: list[str], version: int = 1, settings: dict[str, int] | None = None
) -> None:
    """A starting policy: every forum peer, both purposes, every label; to be reviewed.

    `settings` replace the defaults written for every peer (tests narrow them)."""
    given = dict(settings or {})
    limits = {
        k: given.pop(k, v)
        for k, v in {
            "max_set_size": 50000000,
            "probes_per_minute": 60,
            "probes_per_day": 10000,
        }.items()
    }
    bounds = {
        "budget_multiple": 4,
        "budget_daily": 100000,
        "min_set_size": 100,
        "max_open_sessions": 4,
        "session_idle_seconds": 600,
        **given,
    }
    lines = [
        "# Data-sharing policy of this node: reviewed, versioned, reloaded on change.",
        "# Bump `version` with every change; each change is recorded in the audit log.",
        f"version = {version}",
    ]
    for peer in peers:
        lines += [
            "",
            f"[peers.{peer}]",
            'purposes = ["reconciliation", "statistics", "online-check"]',
            "collections = []            # own programmes it may match against; [] = all",
            'disclose = ["*"]            # labels it may learn: "PROGRAMME/status", * wildcards',
            "count_only = false",
            *(f"{k} = {v}" for k, v in limits.items()),
            "# hostile-peer bounds: query budget per epoch (multiple of the registry size",
            "# it declares, plus a daily allowance), smallest count-only or filtered set,",
            "# sessions open at once and their idle time",
            *(f"{k} = {v}" for k, v in bounds.items()),
        ]
    # Owner-only, as the node's health requires: who may learn what is the forum's business.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def write_client_profile(
    layout: ForumLayout, province: str, address: str, time_zone: str = DEFAULT_TIME_ZONE
) -> Path:
    d = layout.client_dir(province)
    path = d / "profile.toml"
    path.write_text(
        "\n".join(
            [
                f'province = "{province}"',
                f'address = "{address}"',
                f'time_zone = "{time_zone}"     # reports show times in this zone (IANA name)',
                "",
                "[tls]",
                f'ca = "{_rel(layout.ca_cert, d)}"',
                'cert = "client.pem"',
                'key = "client.key"',
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def new_log_key(layout: ForumLayout, province: str) -> Path:
    """Create a node's log signing key (node folder, 0600) and publish its verifier key."""
    signer = note.Signer.generate(origin_of(province))
    key = layout.node_dir(province) / "log.key"
    if key.exists():
        raise ConfigError(f"{key} already exists: a log key is never replaced silently")
    write_private_file(key, (signer.encode() + "\n").encode("ascii"))
    files.private_dir(layout.log_keys_dir)
    vkey = layout.log_keys_dir / f"{province}.vkey"
    vkey.write_text(signer.verifier().encode() + "\n", encoding="ascii")
    return vkey


def write_audit_profile(layout: ForumLayout, name: str, addresses: dict[str, str]) -> Path:
    d = layout.auditor_dir(name)
    lines = [
        f'name = "{name}"',
        'state = "audit-state.json"     # the last checkpoint trusted of each node',
        'evidence = "evidence"          # where proof of a fork or rollback is written',
        "",
        "[tls]",
        f'ca = "{_rel(layout.ca_cert, d)}"',
        'cert = "auditor.pem"',
        'key = "auditor.key"',
    ]
    for p, addr in sorted(addresses.items()):
        vkey = _rel(layout.log_keys_dir / f"{p}.vkey", d)
        lines += ["", f"[nodes.{p}]", f'address = "{addr}"', f'key = "{vkey}"']
    path = d / "audit.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def init_forum(
    root: Path,
    provinces: list[str],
    *,
    epoch: int = 1,
    host: str = "127.0.0.1",
    base_port: int = 50051,
    extra_hosts: tuple[str, ...] = (),
) -> ForumLayout:
    """Create a demo forum: CA, salt, and per province a node (TLS and log keys) and an
    internal client; plus one auditor certificate and profile."""
    if len(set(provinces)) != len(provinces) or len(provinces) < 1:
        raise ConfigError("provinces must be distinct and at least one")
    layout = ForumLayout(root)
    create_ca(layout)
    layout.revoked.write_text(REVOKED_HEADER, encoding="utf-8")
    new_salt(layout, epoch)
    hosts = tuple(dict.fromkeys(("localhost", "127.0.0.1", host, *extra_hosts)))
    # Port 0 (tests, demo): every node binds a free port, peers are set at run time.
    addresses = {p: f"{host}:{base_port + i if base_port else 0}" for i, p in enumerate(provinces)}
    for p in provinces:
        issue_certificate(
            layout, name=p, role=ROLE_NODE, out_dir=layout.node_dir(p), stem="node", hosts=hosts
        )
        issue_certificate(
            layout, name=p, role=ROLE_INTERNAL, out_dir=layout.client_dir(p), stem="client"
        )
        write_node_config(
            layout,
            p,
            listen=addresses[p],
            epoch=epoch,
            peers={q: a for q, a in addresses.items() if q != p},
        )
        write_client_profile(layout, p, addresses[p])
        new_log_key(layout, p)
    issue_certificate(
        layout,
        name="auditor",
        role=ROLE_AUDIT,
        out_dir=layout.auditor_dir("auditor"),
        stem="auditor",
    )
    write_audit_profile(layout, "auditor", addresses)
    return layout
