"""Secret key material: the forum's per-epoch salt, a node's master key and its
blinding scalars.

A blinding scalar is either one session's (a one-off or count-only run: random,
in memory only) or a (peer, epoch) pair key for sync sessions and online checks,
derived when needed from the node's master key file with HKDF over the peer,
the epoch and the pair's re-key counter. The store keeps only the counter, so a
copy of the store holds no scalar.

Key objects never show their bytes: `repr` is masked, and pickling raises so a
key cannot travel by accident (a process pool, a log record, a cache). The raw
bytes are reachable only through methods whose names say so.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NoReturn

import blake3

from ispf.errors import ConfigError, KeyFileError

SALT_BYTES = 32
KCV_BYTES = 8
_KCV_LABEL = b"ispf/kcv/v1"


def check_private_file(path: Path) -> None:
    """Refuse a key file that others can read or write; name the file."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} does not exist") from exc
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the start (never briefly world-readable)."""
    from ispf.files import private_dir  # (files imports this module's error types)

    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class _Secret:
    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        self._raw = bytes(raw)

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} refuses to be pickled")

    def __getstate__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} refuses to be pickled")

    def __eq__(self, other: object) -> bool:
        import hmac

        return type(self) is type(other) and hmac.compare_digest(
            self._raw,
            other._raw,
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.fingerprint()))

    def fingerprint(self) -> str:
        """A short non-secret identifier (keyed hash of a label), for logs."""
        return blake3.blake3(b"ispf/fingerprint/v1", key=self._raw).hexdigest(length=4)


class ForumSalt(_Secret):
    """The forum-wide keyed-hash salt of one epoch."""

    __slots__ = ("epoch",)

    def __init__(self, epoch: int, raw: bytes) -> None:
        if len(raw) != SALT_BYTES:
            raise ConfigError(f"salt for epoch {epoch} must be {SALT_BYTES} bytes")
        super().__init__(raw)
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"ForumSalt(epoch={self.epoch}, <secret>)"

    @classmethod
    def generate(cls, epoch: int) -> ForumSalt:
        return cls(epoch, os.urandom(SALT_BYTES))

    @classmethod
    def from_file(cls, path: Path, epoch: int) -> ForumSalt:
        """Read a salt file: 64 hex characters (whitespace ignored), mode 0600."""
        check_private_file(path)
        text = path.read_text(encoding="ascii", errors="replace").strip()
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise KeyFileError(f"salt file {path} is not hex-encoded") from exc
        if len(raw) != SALT_BYTES:
            raise KeyFileError(f"salt file {path} must hold {SALT_BYTES} bytes of hex")
        return cls(epoch, raw)

    def to_file(self, path: Path) -> None:
        write_private_file(path, (self._raw.hex() + "\n").encode("ascii"))

    def key_check(self) -> bytes:
        """Key check value: proves two parties hold the same salt, reveals nothing of it."""
        return blake3.blake3(_KCV_LABEL, key=self._raw).digest(length=KCV_BYTES)

    def unsafe_raw(self) -> bytes:
        """The salt bytes, for the hashing core and for worker processes of this node."""
        return self._raw


class BlindingKey(_Secret):
    """A node's secret X25519 scalar: one session's (random), or a (peer, epoch) pair
    key derived from the node's `MasterKey`. Never stored, never sent."""

    def __repr__(self) -> str:
        return "BlindingKey(<secret>)"

    @classmethod
    def generate(cls) -> BlindingKey:
        return cls(os.urandom(32))

    def unsafe_raw(self) -> bytes:
        """The scalar bytes, for the blinding core and this node's worker processes."""
        return self._raw


MASTER_BYTES = 32
_PAIR_INFO = b"ispf/pair-scalar/v1"


class MasterKey(_Secret):
    """The node's master key (32 random bytes, hex in a 0600 file made by `ispf node
    init`, or by the node's first start): every pair key is derived from it."""

    def __repr__(self) -> str:
        return "MasterKey(<secret>)"

    @classmethod
    def create_file(cls, path: Path) -> MasterKey:
        key = cls(os.urandom(MASTER_BYTES))
        write_private_file(path, (key._raw.hex() + "\n").encode("ascii"))
        return key

    @classmethod
    def from_file(cls, path: Path) -> MasterKey:
        check_private_file(path)
        try:
            raw = bytes.fromhex(path.read_text(encoding="ascii", errors="replace").strip())
        except ValueError as exc:
            raise KeyFileError(f"master key file {path} is not hex-encoded") from exc
        if len(raw) != MASTER_BYTES:
            raise KeyFileError(f"master key file {path} must hold {MASTER_BYTES} bytes of hex")
        return cls(raw)

    def pair_key(self, peer: str, epoch: int, rekey: int) -> BlindingKey:
        """The scalar for (peer, epoch) after `rekey` re-keyings: HKDF-SHA256."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        info = b"|".join((_PAIR_INFO, peer.encode("utf-8"), b"%d" % epoch, b"%d" % rekey))
        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._raw)
        return BlindingKey(raw)

    def check_value(self) -> str:
        """A non-secret value the store keeps, to notice a different master key."""
        return blake3.blake3(b"ispf/master-kcv/v1", key=self._raw).hexdigest(length=8)


def salt_path(folder: Path, epoch: int) -> Path:
    """Where a node keeps epoch `epoch`'s salt in its salt folder (0600)."""
    return folder / f"epoch-{epoch}.salt"
