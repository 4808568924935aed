"""The HTML report opens in a real browser (headless Chromium) and shows the matrix."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ispf_client.demo import run_demo

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


class Cells(HTMLParser):
    """The heatmap as the browser built it: {(row, column): text}."""

    def __init__(self) -> None:
        super().__init__()
        self.in_map = False
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("id", "heatmap") in attrs:
            self.in_map = True
        elif self.in_map and tag == "tr":
            self.rows.append([])
        elif self.in_map and tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_map = False
        elif self.in_map and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def rendered_dom(html: Path, tmp: Path) -> str:
    assert BROWSER is not None
    proc = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            f"--user-data-dir={tmp / 'profile'}",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (make test installs it)")
def test_demo_report_renders_the_federation_matrix_in_chromium(tmp_path: Path) -> None:
    provinces = ["punjab", "sindh", "kp"]
    res = run_demo(
        provinces=provinces, out=tmp_path / "out", records=500, workers=1, workdir=tmp_path / "work"
    )
    assert res.ok, res.failures
    assert res.html is not None
    source = res.html.read_text()
    # One static file: nothing fetched from anywhere, no script.
    assert not re.search(r"(src|href)=|https?://|<script|@import|url\(", source)
    dom = rendered_dom(res.html, tmp_path)
    parser = Cells()
    parser.feed(dom)
    header, *rows = parser.rows
    assert header == ["", *provinces]
    table = {row[0]: dict(zip(provinces, row[1:], strict=True)) for row in rows}
    for (p, q), n in res.matrix.items():
        assert table[p][q] == f"{n:,}" == table[q][p]
    assert all(table[p][p] == "—" for p in provinces)
    for _, st in res.sessions:
        assert st.session_id in dom
    for p in provinces:
        assert f"ispf-match/{p}" in dom  # each node's signed checkpoint
    assert "enrolled" in dom and "peer programme" in dom
    digits = re.findall(r"\d{13}", dom)
    assert not digits, "an ID-like number in the report"
    # Each province's own report renders too, with its row of the matrix.
    mine = rendered_dom(tmp_path / "out" / "sindh-report.html", tmp_path)
    own = Cells()
    own.feed(mine)
    assert own.rows[0][:2] == ["", "sindh"]
    assert {r[0] for r in own.rows[1:]} == {"sindh", "punjab", "kp"}
