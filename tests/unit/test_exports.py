"""Each public package says what it exports (`__all__`), and says it truly: every
name listed exists, and the public names it holds are the ones listed (as
httpx's own test does). Submodules are reached by their paths, not listed."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import pytest

import ispf
import ispf_client
import ispf_server
from ispf_server import records, storage
from ispf_server.session import match
from ispf_server.storage import pairs

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ispf, ispf_server, ispf_client, records, storage, pairs, match]


def public_names(module: ModuleType) -> list[str]:
    for name in module.__all__:  # (a package may load some of them on first use)
        getattr(module, name, None)
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    )


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_name_in_all_exists(package: ModuleType) -> None:
    for name in package.__all__:
        assert hasattr(package, name), f"{package.__name__}.{name}"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_the_public_names_are_what_all_says(package: ModuleType) -> None:
    assert len(set(package.__all__)) == len(package.__all__)  # (each once)
    assert sorted(package.__all__) == public_names(package)


KNOWN_SHORT: set[str] = set()  # modules whose __all__ their siblings may read past


def test_a_module_with_all_lists_every_name_its_siblings_import() -> None:
    """`from m import x` elsewhere in the project, for a module `m` with `__all__`:
    x is in it (a module's `__all__` that leaves out what its siblings use misleads)."""
    missing: list[str] = []
    for top in ("common", "server", "client"):
        for path in (ROOT / top).rglob("*.py"):
            if "/v1/" in path.as_posix():
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ImportFrom) or not node.module:
                    continue
                if not node.module.startswith(("ispf.", "ispf_server.", "ispf_client.")):
                    continue
                if node.module in KNOWN_SHORT:
                    continue
                try:
                    module = importlib.import_module(node.module)
                except ImportError:
                    continue
                listed = getattr(module, "__all__", None)
                if listed is None:
                    continue
                for alias in node.names:
                    is_module = isinstance(getattr(module, alias.name, None), ModuleType)
                    if alias.name not in listed and not is_module:
                        missing.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert missing == []
