"""Reconciliation reports: a CSV of matches and a JSON summary per province."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ispf import files
from ispf.v1 import common_pb2, internal_pb2
from ispf_client import htmlreport
from ispf_client.csvio import matches_csv_text
from ispf_client.sdk import DEFAULT_TIME_ZONE, NodeClient

DEDUP_NOTE = (
    "Identity numbers are deduplicated before blinding: an ID held by several records "
    "is matched once (counted once in match_count) and reported for every record that "
    "holds it (one CSV row per own record and peer label). People are distinct identity "
    "numbers of the province's own registry, counted apart from rows."
)


@dataclass(frozen=True)
class WrittenReport:
    matches_csv: Path
    summary_json: Path
    rows: int
    summary: dict[str, Any]
    html: Path | None = None
    tally: htmlreport.Tally | None = None


def session_summary(s: internal_pb2.SessionStatus) -> dict[str, Any]:
    return {
        "session_id": s.session_id,
        "peer": s.peer,
        "role": s.role,
        "mode": "count-only" if s.mode == common_pb2.MODE_COUNT_ONLY else "mutual",
        "purpose": s.purpose,
        "epoch": s.epoch,
        "own_records": s.own_records,
        "own_ids": s.own_values,
        "peer_ids": s.peer_values,
        "match_count": s.match_count,
        "matched_records": s.matched_records,
        "result_digest": s.result_digest.hex(),
        "started_at": s.started_at,
        "finished_at": s.finished_at,
    }


_Key = tuple[str, ...]


def tally(
    matches: list[internal_pb2.Match], stats: internal_pb2.RegistryStats | None = None
) -> htmlreport.Tally:
    """People (Match.person: distinct IDs of the own registry) apart from rows."""
    people: dict[_Key, set[int]] = defaultdict(set)
    rows: Counter[_Key] = Counter()
    records: set[str] = set()
    peers_of: dict[int, set[str]] = defaultdict(set)
    for m in matches:
        records.add(m.record_id)
        peers_of[m.person].add(m.peer)
        for key in (
            ("peer", m.peer),
            ("label", m.peer, m.peer_programme, m.peer_status),
            ("programme", m.programme, m.peer, m.peer_programme),
            ("own", m.programme),
            ("peer-programme", m.peer, m.peer_programme),
        ):
            people[key].add(m.person)
            rows[key] += 1

    def counts(kind: str) -> dict[_Key, htmlreport.Count]:
        return {
            k[1:]: htmlreport.Count(len(v), rows[k])
            for k, v in sorted(people.items())
            if k[0] == kind
        }

    return htmlreport.Tally(
        registry_records=stats.records if stats is not None else 0,
        registry_people=stats.distinct_ids if stats is not None else 0,
        rows=len(matches),
        records=len(records),
        people=len(peers_of),
        by_peer={k[0]: c for k, c in counts("peer").items()},
        by_other_provinces=dict(sorted(Counter(len(v) for v in peers_of.values()).items())),
        by_peer_label={(k[0], k[1], k[2]): c for k, c in counts("label").items()},
        by_programme={(k[0], k[1], k[2]): c for k, c in counts("programme").items()},
        by_own_programme={k[0]: c for k, c in counts("own").items()},
        by_peer_programme={(k[0], k[1]): c for k, c in counts("peer-programme").items()},
    )


def tally_summary(t: htmlreport.Tally) -> dict[str, Any]:
    """The people counts for the JSON summary (no identity number, no record id)."""
    return {
        "registry_people": t.registry_people,
        "registry_records": t.registry_records,
        "found_in_another_province": t.people,
        "found_in_three_or_more_provinces": t.in_three_or_more,
        "by_number_of_other_provinces": {str(k): n for k, n in t.by_other_provinces.items()},
        "matched_records": t.records,
        "rows": t.rows,
        "by_own_programme": [
            {
                "own_programme": own,
                "peer": peer,
                "peer_programme": prog,
                "people": c.people,
                "rows": c.rows,
            }
            for (own, peer, prog), c in t.by_programme.items()
        ],
        "own_programme_totals": {
            own: {"people": c.people, "rows": c.rows} for own, c in t.by_own_programme.items()
        },
    }


def write_report(client: NodeClient, out_dir: Path, session_id: str = "") -> WrittenReport:
    """Matches of one session (or the latest completed with each peer) to out_dir."""
    province = client.profile.province
    matches = list(client.matches(session_id))
    files.private_dir(out_dir)  # (record IDs and labels: 0700 folder, 0600 files)
    csv_path = out_dir / f"{province}-matches.csv"
    files.write_private_text(csv_path, matches_csv_text(province, matches))
    sessions = _chosen_sessions(client.sessions(), session_id)
    counted = tally(matches, client.stats())
    by_peer: dict[str, dict[str, Any]] = defaultdict(dict)
    label_counts: dict[str, Counter[str]] = defaultdict(Counter)
    records: dict[str, set[str]] = defaultdict(set)
    for m in matches:
        label_counts[m.peer][f"{m.peer_programme}/{m.peer_status}"] += 1
        records[m.peer].add(m.record_id)
    for s in sessions:
        by_peer[s.peer] = {
            "session_id": s.session_id,
            "matched_ids": s.match_count,
            "matched_records": len(records[s.peer]),
            "people": counted.by_peer.get(s.peer, htmlreport.Count(0, 0)).people,
            "rows": sum(label_counts[s.peer].values()),
            "rows_by_peer_label": dict(sorted(label_counts[s.peer].items())),
            "people_by_peer_label": {
                f"{prog}/{st}": c.people
                for (peer, prog, st), c in counted.by_peer_label.items()
                if peer == s.peer
            },
        }
    summary = {
        "province": province,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "time_zone": client.profile.time_zone,
        "note": DEDUP_NOTE,
        "people": tally_summary(counted),
        "sessions": [session_summary(s) for s in sessions],
        "by_peer": dict(sorted(by_peer.items())),
    }
    summary_path = out_dir / f"{province}-summary.json"
    files.write_private_text(summary_path, json.dumps(summary, indent=2) + "\n")
    html_path = out_dir / f"{province}-report.html"
    files.write_private_text(
        html_path,
        htmlreport.render(
            province_report(
                province, sessions, counted, client.checkpoint(), client.profile.time_zone
            )
        ),
    )
    return WrittenReport(csv_path, summary_path, len(matches), summary, html_path, counted)


def session_line(s: internal_pb2.SessionStatus, me: str) -> htmlreport.SessionLine:
    mine_first = s.role == "initiator"
    a, b = (me, s.peer) if mine_first else (s.peer, me)
    a_ids, b_ids = (s.own_values, s.peer_values) if mine_first else (s.peer_values, s.own_values)
    return htmlreport.SessionLine(
        s.session_id, a, b, s.sync, a_ids, b_ids, s.match_count, s.finished_at
    )


def province_report(
    province: str,
    sessions: list[internal_pb2.SessionStatus],
    counted: htmlreport.Tally,
    checkpoint: str,
    time_zone: str = DEFAULT_TIME_ZONE,
) -> htmlreport.ReportData:
    peers = sorted({s.peer for s in sessions})
    return htmlreport.ReportData(
        title=f"ISPF Match: reconciliation report of {province}",
        provinces=[province, *peers],
        matrix={(province, s.peer): s.match_count for s in sessions},
        sessions=[session_line(s, province) for s in sessions],
        tallies={province: counted},
        checkpoints={province: checkpoint},
        notes=[DEDUP_NOTE],
        time_zone=time_zone,
    )


def _chosen_sessions(
    all_sessions: list[internal_pb2.SessionStatus], session_id: str
) -> list[internal_pb2.SessionStatus]:
    """The session asked for, or the latest completed session with each peer."""
    if session_id:
        return [s for s in all_sessions if s.session_id == session_id]
    latest: dict[str, internal_pb2.SessionStatus] = {}
    for s in all_sessions:  # listed oldest first
        if s.state == internal_pb2.SESSION_STATE_COMPLETED:
            latest[s.peer] = s
    return [latest[p] for p in sorted(latest)]
