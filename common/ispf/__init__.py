"""ISPF Match: code shared by the node, the client SDK and the auditor.

The safe, high-level calls live at this level (`canonicalise`, `ForumSalt`,
`BlindingKey`, `hash_to_curve`, `blind`); the raw curve arithmetic is fenced off
in `ispf.hazmat`. Generated protobuf/gRPC stubs are in `ispf.v1`.
"""

from ispf.blinding import blind, hash_to_curve, result_digest, tag_of
from ispf.errors import IspfError
from ispf.keys import BlindingKey, ForumSalt
from ispf.nid import NationalId, canonicalise

__all__ = [
    "BlindingKey",
    "ForumSalt",
    "IspfError",
    "NationalId",
    "blind",
    "canonicalise",
    "hash_to_curve",
    "result_digest",
    "tag_of",
]
