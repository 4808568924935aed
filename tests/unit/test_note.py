"""Signed notes against the Go vector, cosignatures, and tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ispf import note
from ispf.errors import NoteError

# Copied from the forum's shared/vectors (golang.org/x/mod note_test.go, BSD: see LICENSE).
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "note"
VEC = json.loads(next(VECTORS.glob("*.json")).read_text())


def test_signing_reproduces_the_vector_exactly() -> None:
    signer = note.Signer.parse(VEC["signer_key"])
    assert signer.verifier().encode() == VEC["verifier_key"]
    assert note.sign(VEC["text"], signer) == VEC["signed_note"]


def test_unknown_signatures_are_ignored_known_ones_checked() -> None:
    both = VEC["signed_note"] + VEC["other_signature_line"]
    mine = note.Verifier.parse(VEC["verifier_key"])
    other = note.Verifier.parse(VEC["other_verifier_key"])
    text, signed = note.verify(both, mine)
    assert text == VEC["text"] and signed == [mine]
    assert note.verify(both, mine, other)[1] == [mine, other]
    with pytest.raises(NoteError, match="no signature by a trusted key"):
        note.verify(VEC["signed_note"], other)


def test_any_changed_byte_fails() -> None:
    mine = note.Verifier.parse(VEC["verifier_key"])
    signed = VEC["signed_note"]
    for i in range(0, len(signed) - 1, 7):
        if signed[i] in "\n—":
            continue
        changed = signed[:i] + ("A" if signed[i] != "A" else "B") + signed[i + 1 :]
        with pytest.raises(NoteError):
            note.verify(changed, mine)


def test_cosignature_v1_round_trip_and_key_ids() -> None:
    log = note.Signer.generate("ispf-match/punjab")
    witness = note.Signer.generate("ispf-match/sindh")
    text = "ispf-match/punjab\n3\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
    cosigned = note.sign(text, log) + witness.cosign_line(text, 1700000000)
    _, signed = note.verify(cosigned, log.verifier(), witness.cosigner())
    assert [v.name for v in signed] == ["ispf-match/punjab", "ispf-match/sindh"]
    assert witness.cosigner().key_id != witness.verifier().key_id
    # A cosignature is not a note signature, and vice versa.
    with pytest.raises(NoteError):
        note.verify(note.sign(text, log) + witness.cosign_line(text, 1), witness.verifier())
    forged = (
        cosigned.replace(" 3\n", " 4\n")
        if " 3\n" in cosigned
        else cosigned.replace("\n3\n", "\n4\n")
    )
    with pytest.raises(NoteError):
        note.verify(forged, log.verifier())


def test_keys_parse_and_hide() -> None:
    s = note.Signer.generate("ispf-match/kp")
    assert note.Signer.parse(s.encode()).public() == s.public()
    assert note.Verifier.parse(s.verifier().encode()) == s.verifier()
    assert s.encode() not in repr(s)
    with pytest.raises(NoteError):
        note.Verifier.parse("name+00000000+AAAA")
