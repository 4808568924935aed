"""The error tree drawn in errors.py's docstring is the real one, with its codes."""

from __future__ import annotations

import importlib
import pkgutil
import re

import grpc

import ispf
import ispf_client
import ispf_server
from ispf import errors
from ispf.errors import IspfError


def drawn_tree() -> tuple[dict[str, str | None], dict[str, str]]:
    """(class -> parent drawn, class -> gRPC code drawn) from the docstring."""
    assert errors.__doc__ is not None
    parents: dict[str, str | None] = {}
    codes: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (depth, name) of the open branches
    for line in errors.__doc__.splitlines():
        m = re.match(r"^\s{4}((?:[│ ]   )*)(?:[├└]── )?([A-Z]\w+)(?:\s+([A-Z_]{3,})\b)?", line)
        if not m or ("──" not in line and m.group(2) != "IspfError"):
            continue
        depth = 0 if m.group(2) == "IspfError" else len(m.group(1)) // 4 + 1
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[m.group(2)] = stack[-1][1] if stack else None
        if m.group(3):
            codes[m.group(2)] = m.group(3)
        stack.append((depth, m.group(2)))
    return parents, codes


def real_tree() -> dict[str, str | None]:
    for package in (ispf, ispf_server, ispf_client):  # (every class defined anywhere)
        for mod in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".v1." not in mod.name and not mod.name.endswith("__main__"):
                importlib.import_module(mod.name)
    out: dict[str, str | None] = {"IspfError": None}

    def walk(cls: type[IspfError]) -> None:
        for sub in cls.__subclasses__():
            out[sub.__name__] = cls.__name__
            walk(sub)

    walk(IspfError)
    return out


def test_the_drawn_tree_is_the_subclass_tree() -> None:
    parents, _ = drawn_tree()
    assert len(parents) > 30  # (the drawing was read)
    assert parents == real_tree()


def test_the_drawn_codes_are_the_classes_codes() -> None:
    _, codes = drawn_tree()
    for name, code in codes.items():
        assert getattr(errors, name).code == getattr(grpc.StatusCode, code), name


def test_every_error_class_of_the_project_is_defined_in_errors() -> None:
    for name in real_tree():
        assert getattr(errors, name).__module__ == "ispf.errors", name
