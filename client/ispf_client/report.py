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
from ispf_client.sdk import NodeClient

DEDUP_NOTE = (
    "Identity numbers are deduplicated before blinding: an ID held by several records "
    "is matched once (counted once in match_count) and reported for every record that "
    "holds it (one CSV row per own record and peer label)."
)


@dataclass(frozen=True)
class WrittenReport:
    matches_csv: Path
    summary_json: Path
    rows: int
    summary: dict[str, Any]
    html: Path | None = None


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


def write_report(client: NodeClient, out_dir: Path, session_id: str = "") -> WrittenReport:
    """Matches of one session (or the latest completed with each peer) to out_dir."""
    province = client.profile.province
    matches = list(client.matches(session_id))
    files.private_dir(out_dir)  # (record IDs and labels: 0700 folder, 0600 files)
    csv_path = out_dir / f"{province}-matches.csv"
    files.write_private_text(csv_path, matches_csv_text(province, matches))
    sessions = _chosen_sessions(client.sessions(), session_id)
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
            "rows": sum(label_counts[s.peer].values()),
            "rows_by_peer_label": dict(sorted(label_counts[s.peer].items())),
        }
    summary = {
        "province": province,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "note": DEDUP_NOTE,
        "sessions": [session_summary(s) for s in sessions],
        "by_peer": dict(sorted(by_peer.items())),
    }
    summary_path = out_dir / f"{province}-summary.json"
    files.write_private_text(summary_path, json.dumps(summary, indent=2) + "\n")
    html_path = out_dir / f"{province}-report.html"
    files.write_private_text(
        html_path,
        htmlreport.render(province_report(province, sessions, label_counts, client.checkpoint())),
    )
    return WrittenReport(csv_path, summary_path, len(matches), summary, html_path)


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
    label_counts: dict[str, Counter[str]],
    checkpoint: str,
) -> htmlreport.ReportData:
    peers = sorted({s.peer for s in sessions})
    return htmlreport.ReportData(
        title=f"ISPF Match: reconciliation report of {province}",
        provinces=[province, *peers],
        matrix={(province, s.peer): s.match_count for s in sessions},
        sessions=[session_line(s, province) for s in sessions],
        breakdown={
            province: {
                (peer, label): n for peer, c in label_counts.items() for label, n in c.items()
            }
        },
        checkpoints={province: checkpoint},
        notes=[DEDUP_NOTE],
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
