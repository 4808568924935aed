"""No repr of a stored object shows a raw ID number: a record or row that ends up
in a log line, an assertion message or a traceback shows at most its labels."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from pathlib import Path

import ispf
import ispf_client
import ispf_server
from ispf.records import Label
from ispf_client.csvio import RowProblem
from ispf_server.policy import PeerPolicy
from ispf_server.session.plan import one_off_plan
from ispf_server.storage import Store
from ispf_server.storage.pairs.state import OwnGroup, PairDelta
from ispf_server.storage.registry import StoredRecord
from ispf_server.storage.sessions import MatchRow

NID = "3520212345671"
RECORD_ID = f"BISP-{NID}-2024"  # (record IDs often carry the number too)
LABEL = Label("BISP-KAFAALAT", "enrolled")
THIRTEEN = re.compile(r"\d{13}")
# Fields named for ID numbers or record IDs, or lists of removed IDs.
ID_FIELD = re.compile(r"(\w+_)?nids?|record_ids?|digits|own_removed|removed_nids")


def test_no_repr_of_a_stored_object_holds_thirteen_digits(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.registry.upsert([StoredRecord(RECORD_ID, NID, LABEL)])
    (stored,) = store.registry.records_by_nids([NID])
    assert stored.nid == NID and stored.record_id == RECORD_ID
    objects: list[object] = [
        stored,
        store.registry.records(),
        MatchRow(RECORD_ID, LABEL, LABEL, b"t" * 16),
        OwnGroup("[]", [NID], [b"t" * 16]),
        RowProblem(2, RECORD_ID, "nid.length", "too short"),
        one_off_plan(store, PeerPolicy("sindh", frozenset()), frozenset(), labelled=True),
        PairDelta(
            reset=True,
            own_added=[OwnGroup("[]", [NID], [b"t" * 16])],
            own_removed=[NID],
            peer_added=[],
            peer_removed=[],
            version=1,
            own_fp=b"",
            peer_fp=b"",
            policy="",
        ),
    ]
    for obj in objects:
        assert not THIRTEEN.search(repr(obj)), type(obj).__name__


def test_every_dataclass_field_that_holds_an_id_is_left_out_of_its_repr() -> None:
    """Fields named for an ID number or a record ID, in every dataclass of the
    project, have repr=False (or their class masks its repr itself)."""
    checked = 0
    for package in (ispf, ispf_server, ispf_client):
        for mod in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".v1." in mod.name or mod.name.endswith("__main__"):
                continue
            module = importlib.import_module(mod.name)
            for obj in vars(module).values():
                if not (dataclasses.is_dataclass(obj) and isinstance(obj, type)):
                    continue
                if obj.__module__ != module.__name__:
                    continue
                if not _generated_repr(obj):
                    continue  # (NationalId masks its own)
                checked += 1
                for f in dataclasses.fields(obj):
                    if ID_FIELD.fullmatch(f.name) and f.type not in (int, "int"):  # (counts)
                        assert not f.repr, f"{obj.__qualname__}.{f.name}"
    assert checked > 20  # (the generated reprs were found: the check ran)


def _generated_repr(cls: type) -> bool:
    """Whether `cls.__repr__` is the one @dataclass wrote (wrapped by its recursion
    guard, compiled from a string), not one the class defines itself."""
    fn = cls.__dict__.get("__repr__")
    code = getattr(getattr(fn, "__wrapped__", fn), "__code__", None)
    return code is not None and code.co_filename == "<string>"


def test_the_field_check_sees_a_field_left_in_the_repr() -> None:
    @dataclasses.dataclass
    class Leaky:
        nid: str

    @dataclasses.dataclass
    class Masked:
        nid: str

        def __repr__(self) -> str:
            return "Masked(...)"

    assert _generated_repr(Leaky) and not _generated_repr(Masked)
    assert ID_FIELD.fullmatch("nid") and ID_FIELD.fullmatch("own_removed")
