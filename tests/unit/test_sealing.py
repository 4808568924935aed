"""Sealed salts and backups: they open only for the node, forum and epoch they name,
and every other file is refused with the reason."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ispf import sealing
from ispf.errors import SealedFileError
from ispf.keys import ForumSalt

FORUM = "ab" * 32
PUNJAB = X25519PrivateKey.generate()
SINDH = X25519PrivateKey.generate()


def sealed(epoch: int = 1, node: str = "punjab", to: X25519PrivateKey = PUNJAB) -> bytes:
    return sealing.seal_salt(
        ForumSalt(epoch, bytes(range(32))), forum=FORUM, node=node, to=to.public_key()
    )


def open_(data: bytes, epoch: int | None = 1, key: X25519PrivateKey = PUNJAB) -> ForumSalt:
    return sealing.open_salt(
        data, where="punjab.sealed", forum=FORUM, node="punjab", key=key, epoch=epoch
    )


def edit(data: bytes, **changes: object) -> bytes:
    doc = json.loads(data)
    doc.update(changes)
    return json.dumps(doc).encode()


def test_a_sealed_salt_opens_for_its_node_with_its_key_check_value() -> None:
    salt = open_(sealed())
    assert salt.epoch == 1 and salt.unsafe_raw() == bytes(range(32))
    assert bytes(range(32)).hex().encode() not in sealed()  # the salt is not in clear


def test_a_salt_for_another_node_is_refused_naming_both() -> None:
    with pytest.raises(SealedFileError, match=r"sealed for node 'sindh', not this node \(punjab\)"):
        open_(sealed(node="sindh", to=SINDH))


def test_a_salt_for_another_epoch_is_refused_naming_both() -> None:
    with pytest.raises(SealedFileError, match="holds the salt of epoch 2, not epoch 1"):
        open_(sealed(epoch=2))


def test_a_salt_from_another_forum_is_refused() -> None:
    with pytest.raises(SealedFileError, match="from another forum"):
        open_(edit(sealed(), forum="cd" * 32))


@pytest.mark.parametrize("field", ["epoch", "node"])
def test_a_header_changed_to_another_epoch_or_node_does_not_open(field: str) -> None:
    # Sealed for sindh or epoch 2, header rewritten to claim punjab epoch 1: info differs.
    data = sealed(epoch=2) if field == "epoch" else sealed(node="sindh")
    with pytest.raises(SealedFileError, match="does not open under this node's sealing key"):
        open_(edit(data, epoch=1, node="punjab"))


def test_a_tampered_ciphertext_does_not_open() -> None:
    doc = json.loads(sealed())
    ct = bytearray(base64.b64decode(doc["sealed"]))
    ct[-1] ^= 1
    with pytest.raises(SealedFileError, match="altered"):
        open_(edit(sealed(), sealed=base64.b64encode(bytes(ct)).decode()))


def test_a_salt_sealed_to_another_key_does_not_open() -> None:
    with pytest.raises(SealedFileError, match="does not open"):
        open_(sealed(to=SINDH))


def test_a_wrong_key_check_value_is_refused() -> None:
    with pytest.raises(SealedFileError, match="key check value"):
        open_(edit(sealed(), kcv="00" * 8))


@pytest.mark.parametrize("junk", [b"", b"not json", b'{"format": "other"}', b"{}"])
def test_a_file_that_is_no_sealed_salt_is_refused(junk: bytes) -> None:
    with pytest.raises(SealedFileError, match=r"punjab\.sealed"):
        open_(junk)


def test_a_backup_opens_only_for_its_node_under_its_key() -> None:
    data = sealing.seal_backup(b"store bytes", province="punjab", to=PUNJAB.public_key())
    assert b"store bytes" not in data
    got = sealing.open_backup(data, where="b", province="punjab", key=PUNJAB)
    assert got == b"store bytes"
    with pytest.raises(SealedFileError, match="backup of node 'punjab', not of sindh"):
        sealing.open_backup(data, where="b", province="sindh", key=PUNJAB)
    with pytest.raises(SealedFileError, match="does not open"):
        sealing.open_backup(data, where="b", province="punjab", key=SINDH)


@pytest.mark.parametrize(
    ("changes", "field", "state"),
    [
        ({"sealed": "not*base64"}, "sealed", "not base64"),
        ({"kcv": "zz"}, "kcv", "not hex"),
        ({"epoch": "one"}, "epoch", "not a whole number"),
    ],
)
def test_a_damaged_frame_is_refused_naming_the_field(
    changes: dict[str, object], field: str, state: str
) -> None:
    with pytest.raises(SealedFileError, match=f"field '{field}' is {state}"):
        open_(edit(sealed(), **changes))


def test_a_frame_missing_a_field_is_refused_naming_it() -> None:
    doc = json.loads(sealed())
    del doc["kcv"]
    with pytest.raises(SealedFileError, match="field 'kcv' is missing"):
        open_(json.dumps(doc).encode())
