"""The report counts people (distinct IDs of a province's registry) apart from rows.

Three provinces with hand-made registries whose every count is known: a person
held in two records, found in two other provinces under several labels; people
in one other province; people nowhere else.
"""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from ispf.errors import ConfigError
from ispf_client import htmlreport
from ispf_client.cli import main
from ispf_client.demo import run_demo
from ispf_client.htmlreport import local_time
from ispf_client.sdk import ClientProfile
from tests.conftest import Federation
from tests.integration.test_html_report import BROWSER, rendered_dom

A, B, C, D = "3520212345671", "4210176543212", "1730112345678", "3520299999991"
REGISTRIES = {
    "punjab": [
        ("P1", f"{A[:5]}-{A[5:12]}-{A[12]}", "BISP", "enrolled"),
        ("P2", A, "PSPA", "eligible"),  # the same person, a second programme
        ("P3", B, "BISP", "enrolled"),
        ("P4", C, "PSPA", "enrolled"),
        ("P5", D, "BISP", "enrolled"),  # nowhere else
    ],
    "sindh": [
        ("S1", A, "BISP", "exited"),
        ("S2", B, "SSPA", "enrolled"),
        ("S3", "4210100000000", "SSPA", "enrolled"),
    ],
    "kp": [
        ("K1", A, "KPSC", "enrolled"),
        ("K2", A, "KPSC", "suspended"),
        ("K3", C, "KPSC", "enrolled"),
        ("K4", "1730100000001", "KPSC", "enrolled"),
    ],
}

ALL_IDS = {n.replace("-", "") for rows in REGISTRIES.values() for _, n, _, _ in rows}


def write_registries(data: Path) -> None:
    data.mkdir()
    for p, rows in REGISTRIES.items():
        lines = ["record_id,cnic,programme,status", *(",".join(r) for r in rows)]
        (data / f"{p}.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("people")
    write_registries(tmp / "data")
    res = run_demo(
        provinces=list(REGISTRIES), out=tmp / "out", data=tmp / "data", workers=1,
        workdir=tmp / "work",
    )  # fmt: skip
    assert res.ok, res.failures
    assert any("people found in another province" in c for c in res.checks)
    assert res.matrix == {("punjab", "sindh"): 2, ("punjab", "kp"): 2, ("sindh", "kp"): 1}
    return tmp / "out"


def test_summary_counts_people_apart_from_rows(demo: Path) -> None:
    punjab = json.loads((demo / "punjab-summary.json").read_text())
    people = punjab["people"]
    assert people["registry_people"] == 4 and people["registry_records"] == 5
    # A (two records, found in sindh and kp), B (sindh), C (kp).
    assert people["found_in_another_province"] == 3
    assert people["found_in_three_or_more_provinces"] == 1
    assert people["by_number_of_other_provinces"] == {"1": 2, "2": 1}
    assert people["matched_records"] == 4
    # Rows: A's two records x (one sindh label + two kp labels), B's and C's one each.
    assert people["rows"] == 8
    assert punjab["by_peer"]["kp"]["people"] == 2 and punjab["by_peer"]["kp"]["rows"] == 5
    assert punjab["by_peer"]["kp"]["people_by_peer_label"] == {
        "KPSC/enrolled": 2,
        "KPSC/suspended": 1,
    }
    assert punjab["by_peer"]["kp"]["rows_by_peer_label"] == {
        "KPSC/enrolled": 3,
        "KPSC/suspended": 2,
    }
    cross = {
        (r["own_programme"], r["peer"], r["peer_programme"]): r for r in people["by_own_programme"]
    }
    assert {k: (r["people"], r["rows"]) for k, r in cross.items()} == {
        ("BISP", "sindh", "BISP"): (1, 1),  # P1 ~ S1
        ("BISP", "sindh", "SSPA"): (1, 1),  # P3 ~ S2
        ("PSPA", "sindh", "BISP"): (1, 1),  # P2 ~ S1
        ("BISP", "kp", "KPSC"): (1, 2),  # P1 ~ K1, K2
        ("PSPA", "kp", "KPSC"): (2, 3),  # P2 ~ K1, K2; P4 ~ K3
    }
    assert people["own_programme_totals"] == {
        "BISP": {"people": 2, "rows": 4},
        "PSPA": {"people": 2, "rows": 4},
    }
    for p, found, three in (("sindh", 2, 1), ("kp", 2, 1)):
        s = json.loads((demo / f"{p}-summary.json").read_text())["people"]
        assert (s["found_in_another_province"], s["found_in_three_or_more_provinces"]) == (
            found,
            three,
        )
    kp = json.loads((demo / "kp-summary.json").read_text())["people"]
    assert kp["registry_people"] == 3 and kp["registry_records"] == 4
    # K1 and K2 each: punjab's two labels of A, sindh's one; K3: one.
    assert kp["rows"] == 7 and kp["matched_records"] == 3
    text = "".join(f.read_text() for f in [*demo.glob("*.json"), *demo.glob("*.html")])
    for nid in ALL_IDS:  # (result digests are hex: a 13-digit run there is chance)
        assert nid not in text and f"{nid[:5]}-{nid[5:12]}" not in text


def test_matches_csv_has_own_programme_and_status(demo: Path) -> None:
    with (demo / "punjab-matches.csv").open(newline="") as fh:
        header, *rows = list(csv.reader(fh))
    assert header[-2:] == ["own_programme", "own_status"]
    got = {(r[1], r[2], r[3], r[4], r[6], r[7]) for r in rows}
    assert ("P2", "kp", "KPSC", "suspended", "PSPA", "eligible") in got
    assert ("P1", "sindh", "BISP", "exited", "BISP", "enrolled") in got
    assert ("P4", "kp", "KPSC", "enrolled", "PSPA", "enrolled") in got
    assert len(rows) == 8


class Tables(HTMLParser):
    """Tables with an id or class, as the browser built them: name -> rows of cell text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.current: str | None = None
        self.cell: list[str] | None = None
        self.details: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            name = a.get("id") or f"{a.get('class')}:{a.get('data-province')}"
            self.current = name
            self.tables[name] = []
        elif tag == "tr" and self.current:
            self.tables[self.current].append([])
        elif tag in ("td", "th") and self.current:
            self.cell = []
        elif tag == "details":
            self.details.append(a)
        elif tag == "span" and self.cell is not None:
            self.cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.current = None
        elif tag in ("td", "th") and self.cell is not None and self.current:
            self.tables[self.current][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (make test installs it)")
def test_federation_report_shows_people_programmes_times_and_checkpoints(
    demo: Path, tmp_path: Path
) -> None:
    dom = rendered_dom(demo / "report.html", tmp_path)
    t = Tables()
    t.feed(dom)
    people = {r[0]: r[1:] for r in t.tables["people-table"][1:]}
    # people in registry, records, found elsewhere, in three or more, matched records, rows
    assert people["punjab"] == ["4", "5", "3", "1", "4", "8"]
    assert people["sindh"] == ["3", "3", "2", "1", "2", "5"]
    assert people["kp"] == ["3", "4", "2", "1", "3", "7"]
    own = t.tables["own-programmes:punjab"]
    assert own[0] == ["own programme", "kp", "sindh", "total"]
    assert own[1] == ["KPSC", "BISP", "SSPA"]
    assert own[2] == ["BISP", "1 2 rows", "1 1 row", "1 1 row", "2 4 rows"]
    assert own[3] == ["PSPA", "2 3 rows", "1 1 row", "0", "2 4 rows"]
    labels = {tuple(r[:2]): r[2:] for r in t.tables["breakdown:punjab"][1:]}
    assert t.tables["breakdown:punjab"][0] == [
        "peer", "peer programme", "enrolled", "suspended", "exited", "total",
    ]  # fmt: skip
    assert labels[("kp", "KPSC")] == ["2 3 rows", "1 2 rows", "0", "2 5 rows"]
    assert labels[("sindh", "BISP")] == ["0", "0", "1 2 rows", "1 2 rows"]
    # Times in the forum's zone (Asia/Karachi, UTC+05:00 all year).
    finished = [r[-1] for r in t.tables["session-list"][1:]]
    assert len(finished) == 3 and all(f.endswith("PKT (UTC+05:00)") for f in finished)
    assert re.search(
        r'Generated <time id="generated">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d PKT \(UTC\+05:00\)</time>',
        dom,
    )
    assert "UTC</" not in dom and "+00:00" not in dom
    # Checkpoints: size, root, signer and cosigners; the raw note folded in <details>.
    cps = {r[0]: r for r in t.tables["checkpoints"][1:]}
    assert set(cps) == set(REGISTRIES)
    assert [d.get("data-province") for d in t.details] == sorted(REGISTRIES)
    assert all("open" not in d for d in t.details)
    raw = dict(re.findall(r'<details[^>]*data-province="(\w+)".*?<pre>(.*?)</pre>', dom, re.S))
    for p, row in cps.items():
        origin, size, root = raw[p].split("\n")[:3]  # what the folded note says
        assert origin == row[3] == f"ispf-match/{p}"
        assert row[1] == size and int(size) >= 2  # two sessions logged by each province
        assert row[2] == root and re.fullmatch(r"[A-Za-z0-9+/]{43}=", root)
        named = set(re.findall(r"ispf-match/(\w+) at ", row[4]))
        assert named and named <= set(REGISTRIES) - {p}, row[4]
        assert all(f"— ispf-match/{q} " in raw[p] for q in named)
        assert "PKT (UTC+05:00)" in row[4]
    assert not re.search(r"\d{13}", dom), "an ID-like number in the report"


def test_local_time_shows_the_zone_and_its_offset() -> None:
    when = datetime(2026, 12, 1, 21, 10, 23, tzinfo=UTC)
    assert local_time(when, ZoneInfo("Asia/Karachi")) == "2026-12-02 02:10:23 PKT (UTC+05:00)"
    assert local_time("2026-07-01T12:00:00.123+00:00", ZoneInfo("Europe/London")) == (
        "2026-07-01 13:00:00 BST (UTC+01:00)"
    )
    assert local_time("2026-07-01T12:00:00", ZoneInfo("Asia/Kolkata")) == (
        "2026-07-01 17:30:00 IST (UTC+05:30)"
    )
    assert local_time("", ZoneInfo("UTC")) == ""
    assert local_time("not a time", ZoneInfo("UTC")) == "not a time"


def test_export_uses_the_profiles_time_zone_and_refuses_an_unknown_one(
    federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    federation.load("punjab", [("P1", A, "BISP", "enrolled")])
    federation.load("sindh", [("S1", A, "BISP", "exited")])
    st = federation.reconcile("punjab", "sindh")
    prof = federation.profile("punjab")
    path = tmp_path / "profile.toml"

    def write(zone: str) -> None:
        path.write_text(
            f'province = "punjab"\naddress = "{prof.address}"\ntime_zone = "{zone}"\n'
            f'[tls]\nca = "{prof.ca}"\ncert = "{prof.cert}"\nkey = "{prof.key}"\n'
        )

    write("America/New_York")
    out = tmp_path / "rep"
    args = ["results", "export", "--session", st.session_id, "--profile", str(path)]
    assert main([*args, "--out", str(out)]) == 0
    html = (out / "punjab-report.html").read_text()
    assert "times are in America/New_York" in html
    assert re.search(r"E[SD]T \(UTC-0[45]:00\)", html)
    assert "PKT" not in html
    summary = json.loads((out / "punjab-summary.json").read_text())
    assert summary["time_zone"] == "America/New_York"
    assert summary["people"]["found_in_another_province"] == 1
    assert summary["people"]["found_in_three_or_more_provinces"] == 0  # one session
    capsys.readouterr()
    write("Mars/Olympus_Mons")
    with pytest.raises(ConfigError, match=r"Mars/Olympus_Mons.*IANA name"):
        ClientProfile.load(path)
    assert main([*args, "--out", str(tmp_path / "rep2")]) != 0
    err = capsys.readouterr()
    assert "Mars/Olympus_Mons" in err.out + err.err
    assert not (tmp_path / "rep2").exists()


def test_forum_profiles_default_to_karachi(federation: Federation) -> None:
    assert federation.profile("punjab").time_zone == "Asia/Karachi"
    # The profile on disk says so, for an operator to change.
    text = (federation.layout.client_dir("punjab") / "profile.toml").read_text()
    assert 'time_zone = "Asia/Karachi"' in text


def test_match_person_numbers_people_not_rows(federation: Federation) -> None:
    federation.load(
        "punjab",
        [
            ("P1", A, "BISP", "enrolled"),
            ("P2", A, "PSPA", "eligible"),
            ("P3", B, "BISP", "enrolled"),
            ("P4", D, "BISP", "enrolled"),
        ],
    )
    federation.load("sindh", [("S1", A, "BISP", "exited"), ("S2", B, "SSPA", "enrolled")])
    federation.load("kp", [("K1", A, "KPSC", "enrolled"), ("K2", A, "KPSC", "suspended")])
    federation.reconcile("punjab", "sindh")
    federation.reconcile("punjab", "kp")
    matches = list(federation.client("punjab").matches())
    person = {(m.record_id, m.peer, m.peer_status): m.person for m in matches}
    assert len(matches) == 7  # P1, P2 x (S1, K1, K2); P3 x S2
    # One number per person, across peers and records; numbered from 1, in stream order.
    assert {person[k] for k in person if k[0] in ("P1", "P2")} == {
        person[("P1", "sindh", "exited")]
    }
    assert person[("P3", "sindh", "enrolled")] != person[("P1", "sindh", "exited")]
    assert sorted({m.person for m in matches}) == [1, 2]
    assert matches[0].person == 1
    # A record deleted since the session is a person of its own.
    federation.client("punjab").delete(["P2"])
    after = list(federation.client("punjab").matches())
    p2 = {m.person for m in after if m.record_id == "P2"}
    p1 = {m.person for m in after if m.record_id == "P1"}
    assert len(p2) == 1 and len(p1) == 1 and p1 != p2
    assert len({m.person for m in after}) == 3


def test_report_renders_without_sessions_and_with_an_unreadable_checkpoint() -> None:
    data = htmlreport.ReportData(
        title="t",
        provinces=["punjab"],
        matrix={},
        tallies={"punjab": htmlreport.Tally(registry_records=3, registry_people=2)},
        checkpoints={"punjab": "<b>not a note</b>\n"},
        time_zone="UTC",
    )
    html = htmlreport.render(data)
    assert "not a readable checkpoint (note has no signature block)" in html
    assert "<b>not" not in html  # escaped, in the table and the folded note
    assert 'id="chart-found"' in html and "<rect" not in html  # no bars to draw
    assert re.search(r"Generated <time id=\"generated\">[\d: -]+ UTC \(UTC\+00:00\)", html)
