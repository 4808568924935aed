"""Merkle code against the transparency-dev vectors and a naive reference."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ispf import merkle
from ispf.errors import ProofError

# Copied from the forum's shared/vectors (transparency-dev/merkle, Apache-2.0: see LICENSE).
SHARED = Path(__file__).resolve().parents[1] / "vectors" / "merkle"


def cases(kind: str) -> list[Any]:
    files = sorted((SHARED / kind).rglob("*.json"))
    return [pytest.param(json.loads(f.read_text()), id=str(f.relative_to(SHARED))) for f in files]


def b64(values: list[str] | None) -> list[bytes]:
    return [base64.b64decode(v) for v in values or []]


def test_vectors_are_present() -> None:
    assert len(cases("inclusion")) > 50
    assert len(cases("consistency")) > 50


@pytest.mark.parametrize("v", cases("inclusion"))
def test_inclusion_vectors(v: dict[str, Any]) -> None:
    def run() -> None:
        merkle.verify_inclusion(
            v["leafIdx"],
            v["treeSize"],
            base64.b64decode(v["leafHash"] or ""),
            b64(v["proof"]),
            base64.b64decode(v["root"] or ""),
        )

    if v["wantErr"]:
        with pytest.raises(ProofError):
            run()
    else:
        run()


@pytest.mark.parametrize("v", cases("consistency"))
def test_consistency_vectors(v: dict[str, Any]) -> None:
    def run() -> None:
        merkle.verify_consistency(
            v["size1"],
            v["size2"],
            base64.b64decode(v["root1"] or ""),
            base64.b64decode(v["root2"] or ""),
            b64(v["proof"]),
        )

    if v["wantErr"]:
        with pytest.raises(ProofError):
            run()
    else:
        run()


def naive_root(entries: list[bytes]) -> bytes:
    """Straight from RFC 6962 section 2.1, on entries rather than leaf hashes."""
    if not entries:
        return hashlib.sha256(b"").digest()
    if len(entries) == 1:
        return hashlib.sha256(b"\x00" + entries[0]).digest()
    k = 1
    while k * 2 < len(entries):
        k *= 2
    return hashlib.sha256(b"\x01" + naive_root(entries[:k]) + naive_root(entries[k:])).digest()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=8), min_size=1, max_size=70), st.data())
def test_proofs_verify_for_random_trees(entries: list[bytes], data: st.DataObject) -> None:
    leaves = [merkle.leaf_hash(e) for e in entries]
    n = len(leaves)
    assert merkle.root(leaves) == naive_root(entries)
    i = data.draw(st.integers(0, n - 1))
    merkle.verify_inclusion(i, n, leaves[i], merkle.inclusion_proof(i, leaves), merkle.root(leaves))
    m = data.draw(st.integers(1, n))
    proof = merkle.consistency_proof(m, leaves)
    merkle.verify_consistency(m, n, naive_root(entries[:m]), naive_root(entries), proof)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=8), min_size=2, max_size=40, unique=True), st.data())
def test_changed_history_fails_consistency(entries: list[bytes], data: st.DataObject) -> None:
    leaves = [merkle.leaf_hash(e) for e in entries]
    n = len(leaves)
    m = data.draw(st.integers(1, n - 1))
    j = data.draw(st.integers(0, m - 1))
    forked = [*leaves]
    forked[j] = merkle.leaf_hash(entries[j] + b"!")
    with pytest.raises(ProofError):
        merkle.verify_consistency(
            m, n, merkle.root(leaves[:m]), merkle.root(forked), merkle.consistency_proof(m, forked)
        )
    wrong = data.draw(st.integers(0, n - 1).filter(lambda x: x != j))
    with pytest.raises(ProofError):
        merkle.verify_inclusion(
            wrong, n, leaves[j], merkle.inclusion_proof(j, leaves), merkle.root(leaves)
        )


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 6962's definition, word for word: split at the largest power of two below n."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k << 1 < len(leaves):
        k <<= 1
    return merkle.node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def test_level_by_level_root_equals_the_rfc_definition() -> None:
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(300)]
    for n in range(301):
        assert merkle.root(leaves[:n]) == _mth(leaves[:n]), n


def test_a_root_built_leaf_by_leaf_equals_the_rfc_definition() -> None:
    """The streaming root (a stack of complete subtrees) a session's digest is made
    with as matches are found, at every size up to 300 and across powers of two."""
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(300)]
    for n in [*range(70), 127, 128, 129, 255, 256, 257, 300]:
        built = merkle.RootBuilder()
        for leaf in leaves[:n]:
            built.add(leaf)
        assert built.size == n
        assert built.root() == _mth(leaves[:n]) == merkle.root(leaves[:n]), n
