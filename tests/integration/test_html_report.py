"""The HTML report opens in a real browser (headless Chromium) and shows the matrix."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from ispf_client import htmlreport
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


def screenshot(html: Path, tmp: Path, width: int = 1400, height: int = 900) -> Path:
    assert BROWSER is not None
    png = tmp / "shot.png"
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
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={width},{height}",
            f"--user-data-dir={tmp / 'profile-shot'}",
            f"--screenshot={png}",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    return png


def pixels_of(image: Image.Image, colour: tuple[int, int, int]) -> dict[int, list[int]]:
    """Where `colour` is on an RGB image: {y: [x, ...]}."""
    data, width, want = image.tobytes(), image.width, bytes(colour)
    out: dict[int, list[int]] = {}
    for y in range(image.height):
        row = data[3 * y * width : 3 * (y + 1) * width]
        xs = [x for x in range(width) if row[3 * x : 3 * x + 3] == want]
        if xs:
            out[y] = xs
    return out


def bars_of(image: Image.Image, colour: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Bars drawn in `colour`, top to bottom: (top y, left x, width in pixels)."""
    rows = pixels_of(image, colour)
    bars: list[list[int]] = []  # runs of adjacent rows: [first y, last y]
    for y in sorted(rows):
        if bars and y == bars[-1][1] + 1:
            bars[-1][1] = y
        else:
            bars.append([y, y])
    out = []
    for top, bottom in bars:
        xs = rows[(top + bottom) // 2]
        assert xs == list(range(xs[0], xs[-1] + 1)), "a bar is not one solid run"
        assert bottom - top + 1 == htmlreport.BAR_HEIGHT
        out.append((top, xs[0], len(xs)))
    return out


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (make test installs it)")
def test_bar_charts_beside_the_heatmap_draw_people_to_scale(tmp_path: Path) -> None:
    provinces = ["punjab", "sindh", "kp"]
    res = run_demo(
        provinces=provinces, out=tmp_path / "out", records=500, workers=1, workdir=tmp_path / "w"
    )
    assert res.ok and res.html is not None, res.failures
    people = {
        p: json.loads((tmp_path / "out" / f"{p}-summary.json").read_text())["people"]
        for p in provinces
    }
    found = [people[p]["found_in_another_province"] for p in provinces]
    three = [people[p]["found_in_three_or_more_provinces"] for p in provinces]
    assert min(found) > 0 and min(three) > 0 and len(set(found)) > 1  # bars to compare
    image = Image.open(screenshot(res.html, tmp_path)).convert("RGB")
    # The deepest heatmap cell (the largest pair) marks where the heatmap is.
    r, g, b = (int(v) for v in re.findall(r"\d+", htmlreport._heat(1, 1))[:3])
    cells = pixels_of(image, (r, g, b))
    assert cells, "no heatmap on screen"
    heat_right = max(max(xs) for xs in cells.values())
    heat_top, heat_bottom = min(cells), max(cells)
    for values, colour in zip((found, three), htmlreport.BAR_COLOURS, strict=True):
        rgb = (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))
        bars = bars_of(image, rgb)
        assert len(bars) == len(provinces), bars
        # Next to the heatmap: to its right, level with it.
        assert all(left > heat_right for _, left, _ in bars)
        assert bars[0][0] < heat_bottom and bars[-1][0] > heat_top - 60
        # One left edge; lengths to scale: the largest is the full bar, the rest in proportion.
        assert len({left for _, left, _ in bars}) == 1
        widths = [w for _, _, w in bars]
        top = max(values)
        for v, w in zip(values, widths, strict=True):
            assert abs(w - htmlreport.BAR_MAX * v / top) <= 1.0, (values, widths)
    # A province's own report: people per peer, and by how many other provinces.
    summary = json.loads((tmp_path / "out" / "punjab-summary.json").read_text())
    per_peer = [summary["by_peer"][q]["people"] for q in sorted(summary["by_peer"])]
    by_count = [summary["people"]["by_number_of_other_provinces"].get(k, 0) for k in "12"]
    own = Image.open(screenshot(tmp_path / "out" / "punjab-report.html", tmp_path))
    for values, colour in zip((per_peer, by_count), htmlreport.BAR_COLOURS, strict=True):
        rgb = (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))
        widths = [w for _, _, w in bars_of(own.convert("RGB"), rgb)]
        assert len(widths) == 2 and all(
            abs(w - htmlreport.BAR_MAX * v / max(values)) <= 1.0
            for v, w in zip(values, widths, strict=True)
        ), (values, widths)
