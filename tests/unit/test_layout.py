"""Fences import-linter cannot draw: its graph holds Python modules only, so the two
C modules are fenced here. The record operations in C (`ispf._records`) are chosen
in one place, `ispf_server.records.ops`; the curve's (`ispf.hazmat._native`) only
in `ispf.hazmat`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p
    for top in ("common", "server", "client", "bench")
    for p in (ROOT / top).rglob("*.py")
    if "/v1/" not in p.as_posix()
)
FENCES = {
    "ispf._records": ("server/ispf_server/records/ops.py",),
    "ispf.hazmat._native": ("common/ispf/hazmat/curve.py",),
}


def _imported(path: Path) -> set[str]:
    """Every module a file imports, by its full dotted name."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_sources_were_found() -> None:
    assert len(SOURCES) > 90  # (the fence is not vacuous: it read the project)


@pytest.mark.parametrize("module", sorted(FENCES))
def test_a_c_module_is_imported_only_where_it_is_chosen(module: str) -> None:
    allowed = FENCES[module]
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in SOURCES
        if module in _imported(p)
        and not any(p.relative_to(ROOT).as_posix().startswith(a) for a in allowed)
    ]
    assert offenders == [], f"{module} imported outside {allowed}: {offenders}"


def test_the_fence_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from ispf import _records\nimport ispf.hazmat._native\n")
    assert {"ispf._records", "ispf.hazmat._native"} <= _imported(bad)
