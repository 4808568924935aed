"""`ispf demo`: a local federation of province nodes, reconciled pair by pair.

Creates a throw-away forum (CA, certificates, salt), starts one node per
province on loopback (port 0), loads each registry from CSV through the
internal API exactly as a province would, reconciles every pair, writes the
reports, prints a province x province matrix, and checks the result against a
plaintext reference computed from the same files (possible only here, where
one machine holds every registry) and, for generated data, the planted truth.
"""

from __future__ import annotations

import csv
import tempfile
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ispf import files
from ispf.errors import AuditFailure, IspfError
from ispf.identity import KNOWN_PROVINCES
from ispf.nid import DEFAULT_PROVINCE_DIGITS, canonicalise
from ispf.records import check_label, check_record_id
from ispf.v1 import internal_pb2
from ispf_client import htmlreport
from ispf_client.auditor import pair, verify
from ispf_client.csvio import RowProblem, read_registry_csv, write_problems
from ispf_client.demo_launch import LocalFederation
from ispf_client.forum import (
    ForumLayout,
    init_forum,
)
from ispf_client.loader import LoadReport, load_csv
from ispf_client.progress import watch_with_progress
from ispf_client.report import DEDUP_NOTE, WrittenReport, session_line, write_report
from ispf_client.synth import SyntheticFederation, generate

DEFAULT_PROVINCES = ("punjab", "sindh", "kp", "balochistan")


@dataclass
class DemoResult:
    ok: bool
    matrix: dict[tuple[str, str], int] = field(default_factory=dict)
    sessions: list[tuple[str, internal_pb2.SessionStatus]] = field(default_factory=list)
    html: Path | None = None
    loads: dict[str, LoadReport] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)


def reference_matches(
    paths: dict[str, Path], province_digits: frozenset[str]
) -> tuple[dict[tuple[str, str], int], dict[str, set[tuple[str, str, str, str]]]]:
    """Plaintext truth: shared IDs per pair, and report rows per province."""
    held = _held(paths, province_digits)
    counts: dict[tuple[str, str], int] = {}
    rows: dict[str, set[tuple[str, str, str, str]]] = defaultdict(set)
    for p, q in combinations(paths, 2):
        common = held[p].keys() & held[q].keys()
        counts[(p, q)] = len(common)
        for a, b in ((p, q), (q, p)):
            for nid in common:
                for rid, _, _ in held[a][nid]:
                    for _, bprog, bst in held[b][nid]:
                        rows[a].add((rid, b, bprog, bst))
    return counts, rows


def reference_people(
    paths: dict[str, Path], province_digits: frozenset[str]
) -> dict[str, tuple[int, int]]:
    """Plaintext truth per province: (people found in another province, people found
    in three or more provinces), a person being a distinct ID of its own registry."""
    held = _held(paths, province_digits)
    out: dict[str, tuple[int, int]] = {}
    for p, mine in held.items():
        others = [sum(1 for q in held if q != p and nid in held[q]) for nid in mine]
        out[p] = (sum(1 for k in others if k >= 1), sum(1 for k in others if k >= 2))
    return out


def _held(
    paths: dict[str, Path], province_digits: frozenset[str]
) -> dict[str, dict[str, list[tuple[str, str, str]]]]:
    """Each registry as the node stores it: ID -> its records (id, programme, status)."""
    held: dict[str, dict[str, list[tuple[str, str, str]]]] = {}
    for p, path in paths.items():
        by_rid: dict[str, tuple[str, str, str]] = {}
        for item in read_registry_csv(path):
            if isinstance(item, RowProblem):
                continue
            try:
                rid = check_record_id(item.record_id)
                label = check_label(item.programme, item.status)
                nid = canonicalise(item.nid, province_digits=province_digits).digits
            except IspfError:
                continue
            by_rid[rid] = (nid, label.programme, label.status)  # last row wins
        per_nid: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for rid, (nid, prog, st) in by_rid.items():
            per_nid[nid].append((rid, prog, st))
        held[p] = per_nid
    return held


def run_demo(
    *,
    provinces: list[str],
    out: Path,
    data: Path | None = None,
    records: int = 2000,
    seed: int = 1,
    workers: int = 0,
    console: Console | None = None,
    workdir: Path | None = None,
    serve: bool = False,
    interceptors: Sequence[Any] = (),
) -> DemoResult:
    """Run the demo; `interceptors` are added to every node's server (tests record traffic)."""
    con = console or Console()
    result = DemoResult(ok=True)
    digits = frozenset(DEFAULT_PROVINCE_DIGITS | {KNOWN_PROVINCES.get(p, "3") for p in provinces})
    with tempfile.TemporaryDirectory(prefix="ispf-demo-") as tmp:
        work = workdir or Path(tmp)
        layout = init_forum(work / "forum", provinces, base_port=0)
        fed = None
        if data is not None:
            paths = {p: data / f"{p}.csv" for p in provinces}
            missing = [str(x) for x in paths.values() if not x.is_file()]
            if missing:
                raise FileNotFoundError(f"no registry file: {', '.join(missing)}")
        else:  # generated, with a planted truth
            fed = generate(provinces, records, seed=seed)
            files.private_dir(work / "data")  # synthetic, but shaped as raw registries
            paths = {p: work / "data" / f"{p}.csv" for p in provinces}
            for p in provinces:
                files.write_private_text(paths[p], fed.csv_text(p))
        files.private_dir(out)
        with LocalFederation(layout, provinces, digits, workers, interceptors) as fedn:
            con.print(f"X25519 backend: {fedn.backend_name()}")
            con.print(
                "[bold]Federation up:[/] "
                + ", ".join(f"{p} ({fedn.address(p)})" for p in provinces)
            )
            _load_all(fedn, paths, out, result, con)
            _reconcile_all(fedn, provinces, result, con)
            reports = {p: write_report(fedn.clients[p], out) for p in provinces}
            _audit_all(fedn, result)
            result.html = out / "report.html"
            files.write_private_text(
                result.html,
                htmlreport.render(federation_report(provinces, result, reports, fedn)),
            )
            if serve:
                _serve(fedn, layout, con)
        _print_matrix(con, provinces, result.matrix)
        _check_against_truth(result, paths, digits, reports, fed, provinces)
        for line in result.checks:
            con.print(line)
        for f in result.failures:
            con.print(f"[red]FAILED[/] {f}")
        con.print(f"Reports written to {out}/")
    return result


def federation_report(
    provinces: list[str],
    result: DemoResult,
    reports: dict[str, WrittenReport],
    fedn: LocalFederation,
) -> htmlreport.ReportData:
    """The whole federation on one page (only the demo, holding every node, can draw it)."""
    matrix: dict[tuple[str, str], int | None] = {pair: None for pair in combinations(provinces, 2)}
    matrix.update(result.matrix)
    return htmlreport.ReportData(
        title="ISPF Match: demo federation reconciliation",
        provinces=provinces,
        matrix=matrix,
        sessions=[session_line(st, p) for p, st in result.sessions],
        tallies={p: rep.tally for p, rep in reports.items() if rep.tally is not None},
        checkpoints={p: fedn.clients[p].checkpoint() for p in provinces},
        notes=[DEDUP_NOTE],
        time_zone=fedn.clients[provinces[0]].profile.time_zone,
    )


def _load_all(
    fedn: LocalFederation, paths: dict[str, Path], out: Path, result: DemoResult, con: Console
) -> None:
    for p, path in paths.items():
        rep = load_csv(fedn.clients[p], path)
        result.loads[p] = rep
        where = f" (see {out / f'{p}-load-errors.csv'})" if rep.rejected else ""
        con.print(
            f"  {p}: {_n(rep.rows, 'row')}, {rep.accepted} loaded, {rep.rejected} rejected{where}"
        )
        if rep.rejected:
            write_problems(out / f"{p}-load-errors.csv", rep.problems)
        if rep.stopped:  # load_csv reports a node failure part-way instead of raising
            result.failures.append(f"{p}: load stopped at line {rep.stopped_at}: {rep.stopped}")


def _reconcile_all(
    fedn: LocalFederation, provinces: list[str], result: DemoResult, con: Console
) -> None:
    for p, q in combinations(provinces, 2):
        status = fedn.clients[p].start_reconciliation(q)
        final = watch_with_progress(fedn.clients[p], status.session_id, f"{p} ⇄ {q}", con)
        if final.state != internal_pb2.SESSION_STATE_COMPLETED:
            result.ok = False
            result.failures.append(f"{p} ⇄ {q}: {final.error}")
            continue
        result.matrix[(p, q)] = final.match_count
        result.sessions.append((p, final))
        mirror = fedn.clients[q].session(final.session_id)  # the responder's own record
        if (mirror.match_count, mirror.result_digest) != (final.match_count, final.result_digest):
            result.ok = False
            result.failures.append(f"{p} ⇄ {q}: the two sides disagree")


def _audit_all(fedn: LocalFederation, result: DemoResult) -> None:
    """What an auditor would run: verify every log, then pair every session."""
    profile = fedn.audit_profile()
    try:
        reports = verify(profile)
        ok = all(r.cosigners for r in reports if r.sessions)
        _check(result, "every node's log verifies, cosigned by its peers", ok)
    except AuditFailure as exc:
        _check(result, f"every node's log verifies ({exc.message})", False)
    paired = pair(profile)
    _check(
        result,
        f"audit pair: all {_n(paired.paired, 'session')} logged identically by both sides",
        paired.ok and paired.paired == len(result.matrix),
    )


def _serve(fedn: LocalFederation, layout: ForumLayout, con: Console) -> None:
    con.print(
        "\n[bold]Nodes keep running; Ctrl-C to stop.[/] Try, in another terminal:\n"
        f"  ispf registry stats --profile {layout.client_dir(next(iter(fedn.nodes)))}"
        "/profile.toml\n"
        f"  ispf audit verify --profile {layout.auditor_dir('auditor')}/audit.toml\n"
        f"  ispf audit pair --profile {layout.auditor_dir('auditor')}/audit.toml"
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        con.print("stopping")


def _n(count: int, one: str, many: str | None = None) -> str:
    # The CLI's one pluraliser, imported late (the CLI imports this module).
    from ispf_client.cli import _n as plural

    return plural(count, one, many)


def _check_against_truth(
    result: DemoResult,
    paths: dict[str, Path],
    digits: frozenset[str],
    reports: dict[str, WrittenReport],
    fed: SyntheticFederation | None,
    provinces: list[str],
) -> None:
    counts, rows = reference_matches(paths, digits)
    _check(
        result,
        "match counts equal the plaintext reference",
        all(result.matrix.get(k) == v for k, v in counts.items()),
    )
    got_rows = {
        p: {(r[1], r[2], r[3], r[4]) for r in _csv_rows(reports[p].matches_csv)} for p in provinces
    }
    _check(
        result,
        "report rows equal the plaintext reference",
        all(got_rows[p] == rows.get(p, set()) for p in provinces),
    )
    people = reference_people(paths, digits)
    _check(
        result,
        "people found in another province, and in three or more, equal the plaintext reference",
        all(
            (t.people, t.in_three_or_more) == people[p]
            for p in provinces
            if (t := reports[p].tally) is not None
        ),
    )
    if fed is not None:
        _check(
            result,
            "match counts equal the planted truth",
            all(result.matrix.get(k) == len(v) for k, v in fed.planted.items()),
        )
        _check(
            result,
            "every planted invalid row was reported",
            all(len(result.loads[p].problems) == fed.invalid_rows[p] for p in provinces),
        )


def _check(result: DemoResult, what: str, ok: bool) -> None:
    result.checks.append(f"[green]✔[/] {what}" if ok else f"[red]✘[/] {what}: NO")
    if not ok:
        result.ok = False
        result.failures.append(f"check failed: {what}")


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))[1:]


def _print_matrix(con: Console, provinces: list[str], matrix: dict[tuple[str, str], int]) -> None:
    t = Table(title="Matched identity numbers, province × province")
    t.add_column("")
    for p in provinces:
        t.add_column(p, justify="right")
    for p in provinces:
        cells = []
        for q in provinces:
            v = matrix.get((p, q), matrix.get((q, p)))
            cells.append("—" if p == q else ("failed" if v is None else str(v)))
        t.add_row(p, *cells)
    con.print(t)


__all__ = ["DEFAULT_PROVINCES", "DemoResult", "run_demo"]
