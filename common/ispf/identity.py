"""Who a certificate belongs to: role and province, read from the forum's certificates.

Forum certificates carry ``CN=<name>`` (the province for nodes and internal
systems) and ``OU=<role>``. Roles:

* ``node``: a province's node; server certificate, and client certificate for
  the peer API of other nodes;
* ``internal``: a province's own systems (MIS, batch jobs, operators), for the
  internal API of that province's node only;
* ``audit``: read-only auditors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509
from cryptography.x509.oid import NameOID

ROLE_NODE = "node"
ROLE_INTERNAL = "internal"
ROLE_AUDIT = "audit"
ROLES = frozenset({ROLE_NODE, ROLE_INTERNAL, ROLE_AUDIT})

PROVINCE_RE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")

# Province slugs, with the first CNIC digit of IDs issued there (for synthetic data).
KNOWN_PROVINCES: dict[str, str] = {
    "kp": "1",
    "punjab": "3",
    "sindh": "4",
    "balochistan": "5",
    "islamabad": "6",
    "gilgit-baltistan": "7",
    "ajk": "8",
}


def node_hostname(province: str) -> str:
    """The DNS name in a node certificate that peers verify (independent of its address)."""
    return f"{province}.node.ispf"


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: str
    serial: int = 0

    @property
    def province(self) -> str:
        return self.name


@lru_cache(maxsize=256)
def identity_from_pem(pem: bytes) -> Identity | None:
    """Parse a forum certificate; None if it lacks a usable CN/OU."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        return None
    name, role = str(cns[0].value), str(ous[0].value)
    if role not in ROLES:
        return None
    return Identity(name=name, role=role, serial=cert.serial_number)
