"""The reconciliation report as one static HTML file that people read.

No scripts, fonts or images from anywhere: everything is inline, so the file
opens the same on an air-gapped desk. It shows a province x province heatmap
of matched IDs, a per-programme breakdown, set sizes, the session ids, and the
audit checkpoint each figure can be traced to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem;color:#1b1f24}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem}
.meta{color:#57606a;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0}th,td{border:1px solid #d0d7de;padding:.35rem .6rem}
th{background:#f6f8fa;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.heat{text-align:center;min-width:4.5rem;font-weight:600}
td.self{background:#eaeef2;color:#8c959f}td.failed{background:#ffebe9;color:#cf222e}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.8rem}
pre{background:#f6f8fa;padding:.6rem;overflow-x:auto}
.note{background:#fff8c5;border:1px solid #d4a72c;padding:.5rem .8rem;max-width:60rem}
"""


STATUS_ORDER = {"enrolled": 0, "eligible": 1, "suspended": 2, "exited": 3}


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
class ReportData:
    title: str
    provinces: list[str]
    matrix: dict[tuple[str, str], int | None]  # (p, q) -> matched IDs; None: failed
    sessions: list[SessionLine] = field(default_factory=list)
    # province -> (peer, "PROGRAMME/status") -> rows
    breakdown: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)  # province -> signed note
    notes: list[str] = field(default_factory=list)


def _heat(value: int, top: int) -> str:
    share = value / top if top else 0.0
    # From pale to deep teal; dark cells get white text.
    r, g, b = (int(240 - share * 200), int(249 - share * 130), int(247 - share * 110))
    colour = "#fff" if share > 0.55 else "#1b1f24"
    return f"background:rgb({r},{g},{b});color:{colour}"


def render(data: ReportData) -> str:
    top = max([v for v in data.matrix.values() if v is not None] or [0])
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{escape(data.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(data.title)}</h1>",
        f'<p class="meta">Generated {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}. '
        "Figures count identity numbers held in both provinces; no identity number "
        "appears in this report.</p>",
        '<h2 id="matrix">Matched identity numbers, province &times; province</h2>',
        '<table id="heatmap"><tr><th></th>'
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
    if data.breakdown:
        out.append('<h2 id="programmes">Matches by peer programme and status</h2>')
        out.append(
            '<p class="meta">Rows in each province\'s match report: one per own '
            "record and peer label.</p>"
        )
        for p in sorted(data.breakdown):
            pivot: dict[tuple[str, str], dict[str, int]] = {}
            for (peer, label), count in data.breakdown[p].items():
                programme, _, status = label.rpartition("/")
                pivot.setdefault((peer, programme), {})[status] = count
            if not pivot:
                continue
            statuses = sorted(
                {st for row in pivot.values() for st in row},
                key=lambda st: (STATUS_ORDER.get(st, 99), st),
            )
            out.append(
                f'<h3>{escape(p)}</h3><table class="breakdown"><tr><th>peer</th>'
                "<th>peer programme</th>"
                + "".join(f"<th>{escape(st)}</th>" for st in statuses)
                + "<th>total</th></tr>"
            )
            for (peer, programme), row in sorted(pivot.items()):
                out.append(
                    f"<tr><td>{escape(peer)}</td><td>{escape(programme)}</td>"
                    + "".join(f'<td class="n">{row.get(st, 0):,}</td>' for st in statuses)
                    + f'<td class="n"><b>{sum(row.values()):,}</b></td></tr>'
                )
            out.append("</table>")
    if data.sessions:
        out.append(
            '<h2 id="sessions">Sessions</h2><table><tr><th>session</th><th>between'
            "</th><th>kind</th><th>IDs sent (each side)</th><th>matched</th>"
            "<th>finished</th></tr>"
        )
        out.extend(
            f"<tr><td><code>{escape(s.session_id)}</code></td><td>{escape(s.a)} &rlarr; "
            f"{escape(s.b)}</td><td>{escape(s.sync or 'one-off')}</td>"
            f'<td class="n">{s.a_ids:,} / {s.b_ids:,}</td><td class="n">{s.match_count:,}</td>'
            f"<td>{escape(s.finished_at)}</td></tr>"
            for s in data.sessions
        )
        out.append("</table>")
    if data.checkpoints:
        out.append(
            '<h2 id="audit">Audit checkpoints</h2><p class="meta">Each session is '
            "an entry in both provinces' signed logs; these are the latest signed "
            "checkpoints (verify with <code>ispf audit verify</code>).</p>"
        )
        for p, note in sorted(data.checkpoints.items()):
            out.append(f"<h3>{escape(p)}</h3><pre>{escape(note)}</pre>")
    for text in data.notes:
        out.append(f'<p class="note">{escape(text)}</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
