"""The reconciliation report as one static HTML file that people read.

No scripts, fonts or images from anywhere: everything is inline (the charts
are inline SVG), so the file opens the same on an air-gapped desk. It shows a
province x province heatmap of matched IDs with bar charts of the people found
beside it; people and report rows counted apart, per province and by programme
(the peer's, and the province's own against the peer's); set sizes; the
session ids; and the audit checkpoints each figure can be traced to. Times are
shown in the forum's time zone with their UTC offset.

A person is a distinct identity number in a province's own registry; a row is
one line of its matches CSV (one per own record and peer label). No identity
number appears in the report: only counts, labels and record-free totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import NamedTuple
from zoneinfo import ZoneInfo

from ispf import note
from ispf.auditlog import Checkpoint, b64
from ispf.errors import IspfError
from ispf_client.sdk import DEFAULT_TIME_ZONE

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem;color:#1b1f24}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem}
.meta{color:#57606a;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0}th,td{border:1px solid #d0d7de;padding:.35rem .6rem}
th{background:#f6f8fa;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.heat{text-align:center;min-width:4.5rem;font-weight:600}
td.self{background:#eaeef2;color:#8c959f}td.failed{background:#ffebe9;color:#cf222e}
td .rows{display:block;white-space:nowrap;color:#57606a;font-size:.75rem;font-weight:400}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.8rem}
pre{background:#f6f8fa;padding:.6rem;overflow-x:auto}
.note{background:#fff8c5;border:1px solid #d4a72c;padding:.5rem .8rem;max-width:60rem}
.overview{display:flex;flex-wrap:wrap;gap:2rem;align-items:flex-start}
figure.chart{margin:.6rem 0}figure.chart figcaption{font-weight:600;font-size:.9rem}
svg.bars text{font-size:12px;fill:#1b1f24;font-family:system-ui,sans-serif}
details{margin:.3rem 0 1rem}summary{cursor:pointer;color:#57606a}
"""

STATUS_ORDER = {"enrolled": 0, "eligible": 1, "suspended": 2, "exited": 3}

# Bar charts: fixed geometry in CSS pixels (crisp edges, so a screenshot can measure them).
BAR_MAX = 240
BAR_HEIGHT = 16
BAR_PITCH = 24
BAR_LABEL = 120
BAR_COLOURS = ("#b4451f", "#6639ba")  # one per chart; used nowhere else on the page


class Count(NamedTuple):
    people: int
    rows: int


@dataclass
class Tally:
    """One province's matches, people apart from rows (see the module docstring)."""

    registry_records: int = 0
    registry_people: int = 0
    rows: int = 0
    records: int = 0  # own records matched
    people: int = 0  # people found in at least one other province
    by_peer: dict[str, Count] = field(default_factory=dict)
    # people found in exactly k other provinces (k >= 1)
    by_other_provinces: dict[int, int] = field(default_factory=dict)
    # (peer, peer programme, peer status) -> people, rows
    by_peer_label: dict[tuple[str, str, str], Count] = field(default_factory=dict)
    # (own programme, peer, peer programme) -> people, rows
    by_programme: dict[tuple[str, str, str], Count] = field(default_factory=dict)
    # own programme -> people and rows over every peer (a person counted once)
    by_own_programme: dict[str, Count] = field(default_factory=dict)
    # (peer, peer programme) -> people and rows over every own programme
    by_peer_programme: dict[tuple[str, str], Count] = field(default_factory=dict)

    @property
    def in_three_or_more(self) -> int:
        """People found in this province and at least two others."""
        return sum(n for k, n in self.by_other_provinces.items() if k >= 2)


@dataclass
class SessionLine:
    session_id: str
    a: str
    b: str
    sync: str
    a_ids: int
    b_ids: int
    match_count: int
    finished_at: str


@dataclass
class Bar:
    label: str
    value: int


@dataclass
class Chart:
    chart_id: str
    title: str
    bars: list[Bar]


@dataclass
class ReportData:
    title: str
    provinces: list[str]
    matrix: dict[tuple[str, str], int | None]  # (p, q) -> matched IDs; None: failed
    sessions: list[SessionLine] = field(default_factory=list)
    tallies: dict[str, Tally] = field(default_factory=dict)  # province -> its counts
    checkpoints: dict[str, str] = field(default_factory=dict)  # province -> signed note
    notes: list[str] = field(default_factory=list)
    time_zone: str = DEFAULT_TIME_ZONE
    generated_at: datetime | None = None  # UTC; now when None


def local_time(when: datetime | str, zone: ZoneInfo) -> str:
    """A time in the forum's zone with its abbreviation and UTC offset:
    ``2026-12-01 21:10:23 PKT (UTC+05:00)``. Text that is not a time is shown as given."""
    if isinstance(when, str):
        try:
            moment = datetime.fromisoformat(when)
        except ValueError:
            return when
    else:
        moment = when
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    t = moment.astimezone(zone)
    off = t.strftime("%z") or "+0000"
    name = t.tzname() or ""
    offset = f"UTC{off[:3]}:{off[3:]}"
    shown = f"{name} ({offset})" if name and not name.startswith(("+", "-")) else offset
    return f"{t:%Y-%m-%d %H:%M:%S} {shown}"


def _heat(value: int, top: int) -> str:
    share = value / top if top else 0.0
    # From pale to deep teal; dark cells get white text.
    r, g, b = (int(240 - share * 200), int(249 - share * 130), int(247 - share * 110))
    colour = "#fff" if share > 0.55 else "#1b1f24"
    return f"background:rgb({r},{g},{b});color:{colour}"


def bar_width(value: int, top: int) -> int:
    return round(BAR_MAX * value / top) if top > 0 else 0


def render_chart(chart: Chart, colour: str) -> str:
    """A horizontal bar chart as inline SVG: a bar's length is its value over the largest."""
    top = max([b.value for b in chart.bars] or [0])
    height = BAR_PITCH * len(chart.bars) + 4
    width = BAR_LABEL + BAR_MAX + 70
    parts = [
        f'<figure class="chart" id="{escape(chart.chart_id)}" style="max-width:{width}px">'
        "<figcaption>"
        f"{escape(chart.title)}</figcaption>",
        f'<svg class="bars" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" shape-rendering="crispEdges" '
        f'role="img" aria-label="{escape(chart.title)}">',
    ]
    for i, bar in enumerate(chart.bars):
        y = 2 + i * BAR_PITCH
        w = bar_width(bar.value, top)
        parts.append(
            f'<text x="{BAR_LABEL - 6}" y="{y + 12}" text-anchor="end">{escape(bar.label)}</text>'
            f'<rect x="{BAR_LABEL}" y="{y}" width="{w}" height="{BAR_HEIGHT}" fill="{colour}" '
            f'data-label="{escape(bar.label)}" data-value="{bar.value}"/>'
            f'<text x="{BAR_LABEL + w + 6}" y="{y + 12}">{bar.value:,}</text>'
        )
    parts.append("</svg></figure>")
    return "".join(parts)


def charts(data: ReportData) -> list[Chart]:
    """Federation: people found elsewhere per province. One province: per peer, and by
    the number of other provinces a person was found in."""
    if len(data.tallies) > 1:
        ps = [p for p in data.provinces if p in data.tallies]
        return [
            Chart(
                "chart-found",
                "People found in another province",
                [Bar(p, data.tallies[p].people) for p in ps],
            ),
            Chart(
                "chart-three",
                "People found in three or more provinces",
                [Bar(p, data.tallies[p].in_three_or_more) for p in ps],
            ),
        ]
    out: list[Chart] = []
    for p, t in data.tallies.items():
        out.append(
            Chart(
                "chart-found",
                f"People of {p} found in each province",
                [Bar(q, c.people) for q, c in sorted(t.by_peer.items())],
            )
        )
        most = max([len(t.by_peer), *t.by_other_provinces])
        out.append(
            Chart(
                "chart-three",
                f"People of {p} by how many other provinces they were found in",
                [
                    Bar(f"{k} other{'s' if k > 1 else ''}", t.by_other_provinces.get(k, 0))
                    for k in range(1, most + 1)
                ],
            )
        )
    return out


def _cell(c: Count | None) -> str:
    if c is None:
        return '<td class="n">0</td>'
    return (
        f'<td class="n" data-people="{c.people}" data-rows="{c.rows}">{c.people:,}'
        f'<span class="rows">{c.rows:,} row{"" if c.rows == 1 else "s"}</span></td>'
    )


def _people_table(data: ReportData) -> list[str]:
    out = [
        '<h2 id="people">People and rows</h2>',
        '<p class="meta">A person is a distinct identity number in the province\'s own '
        "registry; a row is one line of its match report (one per own record and peer "
        "label), so one person can give several rows. &ldquo;Three or more provinces&rdquo; "
        "counts people found in this province and at least two others.</p>",
        '<table id="people-table"><tr><th>province</th><th>people in registry</th>'
        "<th>records in registry</th><th>people found in another province</th>"
        "<th>people found in three or more provinces</th><th>matched records</th>"
        "<th>rows</th></tr>",
    ]
    for p in data.provinces:
        t = data.tallies.get(p)
        if t is None:
            continue
        out.append(
            f'<tr data-province="{escape(p)}"><th>{escape(p)}</th>'
            + "".join(
                f'<td class="n">{v:,}</td>'
                for v in (
                    t.registry_people,
                    t.registry_records,
                    t.people,
                    t.in_three_or_more,
                    t.records,
                    t.rows,
                )
            )
            + "</tr>"
        )
    out.append("</table>")
    return out


def _peer_label_tables(data: ReportData) -> list[str]:
    out = [
        '<h2 id="programmes">Matches by peer programme and status</h2>',
        '<p class="meta">People (rows below each figure). A person holding records '
        "under several peer labels counts under each; the total counts a person once.</p>",
    ]
    for p in data.provinces:
        t = data.tallies.get(p)
        if t is None or not t.by_peer_label:
            continue
        statuses = sorted(
            {st for (_, _, st) in t.by_peer_label},
            key=lambda st: (STATUS_ORDER.get(st, 99), st),
        )
        out.append(
            f'<h3>{escape(p)}</h3><table class="breakdown" data-province="{escape(p)}">'
            "<tr><th>peer</th><th>peer programme</th>"
            + "".join(f"<th>{escape(st)}</th>" for st in statuses)
            + "<th>total</th></tr>"
        )
        for (peer, programme), total in sorted(t.by_peer_programme.items()):
            out.append(
                f"<tr><td>{escape(peer)}</td><td>{escape(programme)}</td>"
                + "".join(_cell(t.by_peer_label.get((peer, programme, st))) for st in statuses)
                + _cell(total)
                + "</tr>"
            )
        out.append("</table>")
    return out


def _own_programme_tables(data: ReportData) -> list[str]:
    out = [
        '<h2 id="own-programmes">Own programme &times; peer programme</h2>',
        '<p class="meta">People of each of the province\'s own programmes found in each '
        "peer programme (rows below each figure). A person in several programmes counts "
        "in each; the total counts a person once.</p>",
    ]
    for p in data.provinces:
        t = data.tallies.get(p)
        if t is None or not t.by_programme:
            continue
        columns = sorted(t.by_peer_programme)
        peers = sorted({peer for peer, _ in columns})
        head = "".join(
            f'<th colspan="{sum(1 for q, _ in columns if q == peer)}">{escape(peer)}</th>'
            for peer in peers
        )
        out.append(
            f'<h3>{escape(p)}</h3><table class="own-programmes" data-province="{escape(p)}">'
            f'<tr><th rowspan="2">own programme</th>{head}<th rowspan="2">total</th></tr><tr>'
            + "".join(f"<th>{escape(prog)}</th>" for _, prog in columns)
            + "</tr>"
        )
        for own, total in sorted(t.by_own_programme.items()):
            out.append(
                f"<tr><th>{escape(own)}</th>"
                + "".join(_cell(t.by_programme.get((own, peer, prog))) for peer, prog in columns)
                + _cell(total)
                + "</tr>"
            )
        out.append("</table>")
    return out


def _checkpoint_rows(p: str, signed: str, zone: ZoneInfo) -> str:
    try:
        text, lines = note.split(signed)
        cp = Checkpoint.parse(text)
    except IspfError as exc:
        return (
            f'<tr><th>{escape(p)}</th><td colspan="4">not a readable checkpoint '
            f"({escape(exc.message)})</td></tr>"
        )
    signer = [sl.name for sl in lines if sl.name == cp.origin]
    cosigners = []
    for sl in lines:
        if sl.name == cp.origin:
            continue
        when = ""
        if len(sl.signature) == 72:  # a cosignature: timestamp, then the signature
            ts = note.cosignature_time(sl)
            if ts < 2**40:
                when = f" at {local_time(datetime.fromtimestamp(ts, UTC), zone)}"
        cosigners.append(f"<li>{escape(sl.name)}{escape(when)}</li>")
    return (
        f'<tr data-province="{escape(p)}"><th>{escape(p)}</th>'
        f'<td class="n" data-size="{cp.size}">{cp.size:,}</td>'
        f"<td><code>{escape(b64(cp.root))}</code></td>"
        f"<td>{escape(', '.join(signer) or 'nobody')}</td>"
        f"<td>{'<ul>' + ''.join(cosigners) + '</ul>' if cosigners else 'none yet'}</td></tr>"
    )


def _checkpoints(data: ReportData, zone: ZoneInfo) -> list[str]:
    out = [
        '<h2 id="audit">Audit checkpoints</h2><p class="meta">Each session is '
        "an entry in both provinces' signed logs; these are the latest signed "
        "checkpoints: the log's size (entries) and Merkle root, who signed it and which "
        "peers cosigned it, as the note names them. This page does not check the "
        "signatures: <code>ispf audit verify</code> does.</p>",
        '<table id="checkpoints"><tr><th>province</th><th>log size</th><th>root</th>'
        "<th>signed by</th><th>cosigned by</th></tr>",
    ]
    out.extend(_checkpoint_rows(p, n, zone) for p, n in sorted(data.checkpoints.items()))
    out.append("</table>")
    for p, signed in sorted(data.checkpoints.items()):
        out.append(
            f'<details class="raw-note" data-province="{escape(p)}"><summary>Signed note of '
            f"{escape(p)} (as served)</summary><pre>{escape(signed)}</pre></details>"
        )
    return out


def render(data: ReportData) -> str:
    zone = ZoneInfo(data.time_zone)
    top = max([v for v in data.matrix.values() if v is not None] or [0])
    generated = data.generated_at or datetime.now(UTC)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{escape(data.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(data.title)}</h1>",
        f'<p class="meta">Generated <time id="generated">{escape(local_time(generated, zone))}'
        f"</time>; times are in {escape(data.time_zone)}. Figures count identity numbers "
        "held in both provinces; no identity number appears in this report.</p>",
        '<h2 id="matrix">Matched identity numbers, province &times; province</h2>',
        '<div class="overview"><table id="heatmap"><tr><th></th>'
        + "".join(f"<th>{escape(q)}</th>" for q in data.provinces)
        + "</tr>",
    ]
    for p in data.provinces:
        cells = []
        for q in data.provinces:
            if p == q:
                cells.append('<td class="heat self">&mdash;</td>')
                continue
            v = data.matrix.get((p, q), data.matrix.get((q, p), -1))
            if v is None:
                cells.append('<td class="heat failed" data-failed="1">failed</td>')
            elif v == -1:
                cells.append('<td class="heat self">n/a</td>')
            else:
                cells.append(
                    f'<td class="heat" data-pair="{escape(p)}|{escape(q)}" '
                    f'style="{_heat(v, top)}">{v:,}</td>'
                )
        out.append(f"<tr><th>{escape(p)}</th>{''.join(cells)}</tr>")
    out.append("</table>")
    for i, chart in enumerate(charts(data)):
        out.append(render_chart(chart, BAR_COLOURS[i % len(BAR_COLOURS)]))
    out.append("</div>")
    if data.tallies:
        out.extend(_people_table(data))
        out.extend(_peer_label_tables(data))
        out.extend(_own_programme_tables(data))
    if data.sessions:
        out.append(
            '<h2 id="sessions">Sessions</h2><table id="session-list"><tr><th>session</th>'
            "<th>between"
            "</th><th>kind</th><th>IDs sent (each side)</th><th>matched</th>"
            "<th>finished</th></tr>"
        )
        out.extend(
            f"<tr><td><code>{escape(s.session_id)}</code></td><td>{escape(s.a)} &rlarr; "
            f"{escape(s.b)}</td><td>{escape(s.sync or 'one-off')}</td>"
            f'<td class="n">{s.a_ids:,} / {s.b_ids:,}</td><td class="n">{s.match_count:,}</td>'
            f"<td>{escape(local_time(s.finished_at, zone))}</td></tr>"
            for s in data.sessions
        )
        out.append("</table>")
    if data.checkpoints:
        out.extend(_checkpoints(data, zone))
    for text in data.notes:
        out.append(f'<p class="note">{escape(text)}</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
