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
from ispf_server.session.plan import build_plan
from ispf_server.storage import Store
from ispf_server.storage.pairs.state import OwnGroup
from ispf_server.storage.registry import StoredRecord
from ispf_server.storage.sessions import MatchRow

NID = "3520212345671"
RECORD_ID = f"BISP-{NID}-2024"  # (record IDs often carry the number too)
LABEL = Label("BISP-KAFAALAT", "enrolled")
THIRTEEN = re.compile(r"\d{13}")


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
        build_plan([stored], labelled=True),
    ]
    for obj in objects:
        assert not THIRTEEN.search(repr(obj)), type(obj).__name__


def test_every_dataclass_field_that_holds_an_id_is_left_out_of_its_repr() -> None:
    """Fields named for an ID number or a record ID, in every dataclass of the
    project, have repr=False (or their class masks its repr itself)."""
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
                code = getattr(obj.__repr__, "__code__", None)
                if code is None or code.co_filename != "<string>":
                    continue  # (not the generated repr: NationalId masks its own)
                for f in dataclasses.fields(obj):
                    if re.fullmatch(r"(\w+_)?nids?|record_id|digits", f.name):
                        assert not f.repr, f"{obj.__qualname__}.{f.name}"
