"""`ispf`: the command line for provincial IT teams, batch jobs and the forum's operators.

    ispf forum init --dir forum --provinces punjab,sindh,kp,balochistan
    ispf forum salt new --dir forum --epoch 2
    ispf registry load registry.csv          (--profile forum/clients/punjab/profile.toml)
    ispf registry stats | delete ID...
    ispf reconcile --peer sindh | --all  [--count-only] [--out reports/]
    ispf sessions list
    ispf peers [--json]                      (each peer's query budget: used and left)
    ispf results export [--session ID] --out reports/
    ispf results receipt --session ID --record RID --out receipt.json
    ispf audit verify | pair | prove --node N --session ID | verify-proof FILE
    ispf demo [--provinces ...] [--data DIR] [--out DIR]

The client profile comes from --profile, else $ISPF_PROFILE; the auditor's from
--profile, else $ISPF_AUDIT_PROFILE (paths; keys are always read from the files
they name, never from the command line).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

from ispf import logs
from ispf.errors import ConfigError, IspfError
from ispf.identity import ROLE_AUDIT, ROLE_INTERNAL, ROLE_NODE
from ispf.v1 import internal_pb2
from ispf_client.auditor import AuditFailure, AuditProfile
from ispf_client.csvio import write_problems
from ispf_client.sdk import ClientProfile, NodeClient

EXIT_FAILED = 1
EXIT_USAGE = 2


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _profile(args: argparse.Namespace) -> ClientProfile:
    path = args.profile or os.environ.get("ISPF_PROFILE")
    if not path:
        raise ConfigError(
            "no client profile: pass --profile PATH or set ISPF_PROFILE "
            "(ispf forum init writes forum/clients/<province>/profile.toml)"
        )
    return ClientProfile.load(Path(path))


def cmd_forum_init(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.forum import init_forum

    provinces = [p.strip() for p in args.provinces.split(",") if p.strip()]
    layout = init_forum(
        Path(args.dir), provinces, epoch=args.epoch, host=args.host, base_port=args.base_port
    )
    con.print(f"Forum created in {layout.root}/ for {', '.join(provinces)} (epoch {args.epoch}).")
    for p in provinces:
        con.print(
            f"  {p}: node config {layout.node_dir(p) / 'node.toml'}, "
            f"client profile {layout.client_dir(p) / 'profile.toml'}"
        )
    return 0


def cmd_forum_issue(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.forum import ForumLayout, issue_certificate

    layout = ForumLayout(Path(args.dir))
    out = (
        Path(args.out)
        if args.out
        else (
            layout.node_dir(args.name)
            if args.role == ROLE_NODE
            else layout.client_dir(args.name)
            if args.role == ROLE_INTERNAL
            else layout.auditor_dir(args.name)
        )
    )
    stem = {"node": "node", "internal": "client", "audit": "auditor"}[args.role]
    cert, key = issue_certificate(
        layout, name=args.name, role=args.role, out_dir=out, stem=stem, hosts=tuple(args.host)
    )
    con.print(f"Issued {args.role} certificate for {args.name}: {cert} (key {key}, mode 0600)")
    return 0


def cmd_forum_revoke(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.forum import ForumLayout, revoke

    layout = ForumLayout(Path(args.dir))
    serial = revoke(
        layout,
        serial=int(args.serial, 16) if args.serial else None,
        cert=Path(args.cert) if args.cert else None,
        reason=args.reason,
    )
    con.print(
        f"Certificate {serial:x} added to {layout.revoked}. Copy the file to every node: "
        "nodes re-read it when it changes.",
        markup=False,
    )
    return 0


def cmd_salt_new(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.forum import ForumLayout, new_salt

    path = new_salt(ForumLayout(Path(args.dir)), args.epoch)
    con.print(
        f"Salt for epoch {args.epoch} written to {path} (mode 0600). "
        "Distribute it to every node over a secure channel."
    )
    return 0


def cmd_registry_load(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.loader import load_csv

    with NodeClient(_profile(args)) as client:
        rep = load_csv(client, Path(args.file))
    con.print(
        f"{args.file}: {rep.rows} rows; {rep.accepted} loaded ({rep.inserted} new, "
        f"{rep.updated} updated, {rep.unchanged} unchanged); {rep.rejected} rejected"
    )
    for p in rep.problems[: args.show_errors]:
        con.print(
            f"  line {p.line}: {p.reason} [{p.code}]"
            + (f" (record {p.record_id})" if p.record_id else ""),
            markup=False,
        )
    if len(rep.problems) > args.show_errors:
        con.print(f"  ... and {len(rep.problems) - args.show_errors} more")
    if args.errors and rep.problems:
        write_problems(Path(args.errors), rep.problems)
        con.print(f"All rejected rows written to {args.errors}")
    return EXIT_FAILED if rep.problems and args.strict else 0


def cmd_registry_stats(args: argparse.Namespace, con: Console) -> int:
    with NodeClient(_profile(args)) as client:
        st = client.stats()
    con.print(f"{st.province}: {st.records} records, {st.distinct_ids} distinct IDs")
    for lc in st.labels:
        con.print(f"  {lc.label.programme}/{lc.label.status}: {lc.records}")
    return 0


def cmd_registry_delete(args: argparse.Namespace, con: Console) -> int:
    with NodeClient(_profile(args)) as client:
        resp = client.delete(args.record_ids)
    con.print(
        f"{resp.deleted} deleted"
        + (f"; not found: {', '.join(resp.not_found)}" if resp.not_found else ""),
        markup=False,
    )
    return 0


def cmd_reconcile(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.progress import watch_with_progress
    from ispf_client.report import write_report

    failed: list[str] = []
    with NodeClient(_profile(args)) as client:
        peers = client.peers() if args.all else [args.peer]
        if not peers:
            raise ConfigError("the node has no peers configured")
        me = client.profile.province
        for peer in peers:
            title = f"{me} ⇄ {peer}"

            def follow(sid: str, t: str = title) -> internal_pb2.SessionStatus:
                return watch_with_progress(client, sid, t, con)

            def retry(st: internal_pb2.SessionStatus, delay: float, p: str = peer) -> None:
                con.print(f"  {p}: {st.error}; retrying in {delay:.0f} s", markup=False)

            try:
                final = client.reconcile(
                    peer,
                    attempts=args.attempts,
                    watch=follow,
                    on_retry=retry,
                    purpose=args.purpose,
                    count_only=args.count_only,
                    collections=args.collection,
                    peer_collections=args.peer_collection,
                    full=args.full,
                )
            except IspfError as exc:
                failed.append(f"{peer}: {exc.message}")
                continue
            if final.state != internal_pb2.SESSION_STATE_COMPLETED:
                failed.append(f"{peer}: {final.error}")
            elif args.count_only:
                con.print(f"  {peer}: {final.match_count} identity numbers in common")
        if not args.count_only:
            rep = write_report(client, Path(args.out))
            con.print(f"Report: {rep.matches_csv} ({rep.rows} rows), summary {rep.summary_json}")
    for f in failed:
        con.print(f"[red]FAILED[/] {f}")
    return EXIT_FAILED if failed else 0


def cmd_check(args: argparse.Namespace, con: Console) -> int:
    """Identity numbers come from a file or stdin, never the command line (shell history)."""
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    nids = [line.strip() for line in text.splitlines() if line.strip()]
    if not nids:
        raise ConfigError("no identity numbers given: one per line, in --file or on stdin")
    with NodeClient(_profile(args)) as client:
        resp = client.check(
            nids, purpose=args.purpose, provinces=args.province, deadline_ms=args.deadline_ms
        )
    found = False
    for r in resp.results:
        if r.error:
            con.print(f"#{r.position}: not checked: {r.error}", markup=False)
            continue
        parts = []
        for a in r.provinces:
            status = internal_pb2.ProvinceStatus.Name(a.status).removeprefix("PROVINCE_STATUS_")
            if a.status == internal_pb2.PROVINCE_STATUS_MATCH:
                found = True
                labels = ", ".join(f"{lb.programme}/{lb.status}" for lb in a.labels)
                parts.append(f"{a.province}: MATCH ({labels})")
            else:
                parts.append(
                    f"{a.province}: {status.lower().replace('_', ' ')}"
                    + (
                        f" ({a.detail})"
                        if a.detail and a.status != internal_pb2.PROVINCE_STATUS_NO_MATCH
                        else ""
                    )
                )
        con.print(f"#{r.position}: " + "; ".join(parts), markup=False)
    return 3 if found else 0


def cmd_sessions(args: argparse.Namespace, con: Console) -> int:
    with NodeClient(_profile(args)) as client:
        for s in client.sessions():
            state = internal_pb2.SessionState.Name(s.state).removeprefix("SESSION_STATE_")
            con.print(
                f"{s.session_id}  {s.role:9} {s.peer:12} {state.lower():9} "
                f"{s.match_count} matches  {s.started_at}" + (f"  {s.error}" if s.error else ""),
                markup=False,
            )
    return 0


def cmd_peers(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.output import emit_json, printable

    with NodeClient(_profile(args)) as client:
        budgets = client.budgets()
    for b in budgets:
        if args.json:
            emit_json(
                {
                    "peer": b.peer,
                    "epoch": b.epoch,
                    "declared": b.declared,
                    "used": b.used,
                    "allowance": b.allowance,
                    "left": b.left,
                    "refused": b.refused,
                }
            )
            continue
        con.print(
            f"{printable(b.peer, 32):12} epoch {b.epoch}  budget used {b.used} of "
            f"{b.allowance} ({b.left} left)  declared registry {b.declared}  "
            f"refused {b.refused}",
            markup=False,
        )
    return 0


def cmd_export(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.report import write_report

    with NodeClient(_profile(args)) as client:
        rep = write_report(client, Path(args.out), args.session or "")
    con.print(f"Report: {rep.matches_csv} ({rep.rows} rows), summary {rep.summary_json}")
    return 0


def cmd_receipt(args: argparse.Namespace, con: Console) -> int:
    import json

    from google.protobuf.json_format import MessageToDict

    with NodeClient(_profile(args)) as client:
        receipt = client.receipt(args.session, args.record)
    bundle = MessageToDict(
        receipt, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # Integers as numbers, bytes as base64: the same shape `audit prove` writes.
    for k in ("tag_index", "match_count", "entry_index"):
        bundle[k] = int(bundle.get(k, 0))
    out = Path(args.out)
    out.write_text(json.dumps(bundle, indent=1) + "\n", encoding="utf-8")
    con.print(
        f"Receipt for record {args.record} in session {args.session} written to {out}; "
        "check it with: ispf audit verify-proof " + str(out),
        markup=False,
    )
    return 0


def _audit_profile(args: argparse.Namespace) -> AuditProfile:
    path = args.profile or os.environ.get("ISPF_AUDIT_PROFILE")
    if not path:
        raise ConfigError(
            "no audit profile: pass --profile PATH or set ISPF_AUDIT_PROFILE "
            "(ispf forum init writes forum/auditors/auditor/audit.toml)"
        )
    return AuditProfile.load(Path(path))


def cmd_audit_verify(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.auditor import verify

    try:
        reports = verify(_audit_profile(args), args.node or None)
    except AuditFailure as exc:
        Console(stderr=True).print(f"AUDIT FAILED {exc.message}", markup=False)
        if exc.evidence:
            Console(stderr=True).print(f"Evidence kept in {exc.evidence}", markup=False)
        return EXIT_FAILED
    for r in reports:
        since = (
            f", consistent with the {r.previous_size} trusted before"
            if (r.previous_size is not None)
            else " (first check: now trusted)"
        )
        cos = ", cosigned by " + ", ".join(r.cosigners) if r.cosigners else ", no cosignature"
        con.print(
            f"{r.node}: log of {r.size} entries verified ({r.sessions} sessions){since}{cos}",
            markup=False,
        )
    return 0


def cmd_audit_pair(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.auditor import pair

    try:
        rep = pair(_audit_profile(args))
    except AuditFailure as exc:
        Console(stderr=True).print(f"AUDIT FAILED {exc.message}", markup=False)
        return EXIT_FAILED
    con.print(f"{_n(rep.paired, 'session')} logged identically by both provinces", markup=False)
    for line in rep.failed:
        con.print(f"  failed session, logged as failed: {line}", markup=False)
    for line in rep.interrupted:
        con.print(f"  interrupted: {line}", markup=False)
    for line in rep.one_sided:
        con.print(f"  ONE-SIDED {line}", markup=False)
    for line in rep.mismatched:
        con.print(f"  MISMATCH {line}", markup=False)
    return 0 if rep.ok else EXIT_FAILED


def cmd_audit_prove(args: argparse.Namespace, con: Console) -> int:
    import json

    from ispf_client.auditor import prove

    bundle = prove(_audit_profile(args), args.node, args.session)
    text = json.dumps(bundle, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        con.print(f"Verified; proof bundle written to {args.out}", markup=False)
    else:
        print(text, end="")
    return 0


def cmd_audit_verify_proof(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.auditor import load_keys, verify_proof_file

    if args.keys:
        keys = load_keys(Path(k) for k in args.keys)
    else:
        keys = [n.key for n in _audit_profile(args).nodes.values()]
    try:
        fields = verify_proof_file(Path(args.file), keys)
    except AuditFailure as exc:
        Console(stderr=True).print(f"PROOF INVALID {exc.message}", markup=False)
        return EXIT_FAILED
    what = (
        "receipt: the record's match tag is in the session's result, and "
        if ("tag" in Path(args.file).read_text(encoding="utf-8"))
        else ""
    )
    con.print(
        f"Valid {what}session {fields['session_id']} ({fields['initiator']} ⇄ "
        f"{fields['responder']}, {fields['outcome']}, {fields.get('match_count')} matches) "
        f"is in the signed log of {fields['recorder']}",
        markup=False,
    )
    return 0


def cmd_demo(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.demo import run_demo

    provinces = [p.strip() for p in args.provinces.split(",") if p.strip()]
    result = run_demo(
        provinces=provinces,
        out=Path(args.out),
        data=Path(args.data) if args.data else None,
        records=args.records,
        seed=args.seed,
        workers=args.workers,
        console=con,
        workdir=Path(args.workdir) if args.workdir else None,
        serve=args.serve,
    )
    return 0 if result.ok else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ispf",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = ap.add_subparsers(dest="command", required=True)

    def with_profile(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--profile", help="client profile TOML (default: $ISPF_PROFILE)")
        return p

    forum = sub.add_parser("forum", help="forum administration: CA, certificates, salts")
    fsub = forum.add_subparsers(dest="forum_command", required=True)
    p = fsub.add_parser("init", help="create a demo forum: CA, node and client certificates, salt")
    p.add_argument("--dir", default="forum")
    p.add_argument("--provinces", default="punjab,sindh,kp,balochistan")
    p.add_argument("--epoch", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1", help="address nodes listen on")
    p.add_argument("--base-port", type=int, default=50051)
    p.set_defaults(func=cmd_forum_init)
    p = fsub.add_parser("issue", help="issue a certificate for a node, internal system or auditor")
    p.add_argument("--dir", default="forum")
    p.add_argument("--role", required=True, choices=[ROLE_NODE, ROLE_INTERNAL, ROLE_AUDIT])
    p.add_argument("--name", required=True, help="province slug (node/internal) or auditor name")
    p.add_argument("--host", action="append", default=[], help="extra host/IP for a node")
    p.add_argument("--out", help="output folder")
    p.set_defaults(func=cmd_forum_issue)
    p = fsub.add_parser("revoke", help="add a certificate to the forum's deny list")
    p.add_argument("--dir", default="forum")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--cert", help="the certificate file (PEM)")
    g.add_argument("--serial", help="the certificate's serial number, hex")
    p.add_argument("--reason", default="", help="a short note kept beside the serial")
    p.set_defaults(func=cmd_forum_revoke)
    salt = fsub.add_parser("salt", help="salt epochs")
    ssub = salt.add_subparsers(dest="salt_command", required=True)
    p = ssub.add_parser("new", help="create the salt of a new epoch")
    p.add_argument("--dir", default="forum")
    p.add_argument("--epoch", type=int, required=True)
    p.set_defaults(func=cmd_salt_new)

    reg = sub.add_parser("registry", help="the province's own registry")
    rsub = reg.add_subparsers(dest="registry_command", required=True)
    p = with_profile(rsub.add_parser("load", help="load or update records from a CSV file"))
    p.add_argument("file", help="CSV with record_id,cnic,programme,status")
    p.add_argument("--errors", help="write every rejected row (line, reason) to this CSV")
    p.add_argument("--show-errors", type=int, default=20, help="rejected rows to print")
    p.add_argument("--strict", action="store_true", help="exit 1 if any row was rejected")
    p.set_defaults(func=cmd_registry_load)
    p = with_profile(rsub.add_parser("stats", help="record counts per programme and status"))
    p.set_defaults(func=cmd_registry_stats)
    p = with_profile(rsub.add_parser("delete", help="delete records by record id"))
    p.add_argument("record_ids", nargs="+")
    p.set_defaults(func=cmd_registry_delete)

    p = with_profile(sub.add_parser("reconcile", help="reconcile with one peer or all peers"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--peer", help="peer province")
    g.add_argument("--all", action="store_true", help="every configured peer, one after another")
    p.add_argument("--purpose", default="reconciliation")
    p.add_argument(
        "--count-only",
        action="store_true",
        help="learn only how many IDs are in common; the peer learns nothing",
    )
    p.add_argument(
        "--collection",
        action="append",
        default=[],
        help="own programme taking part (repeatable; default all)",
    )
    p.add_argument(
        "--peer-collection",
        action="append",
        default=[],
        help="peer programme to match against (repeatable; default all allowed)",
    )
    p.add_argument(
        "--full", action="store_true", help="a full run even where an incremental one is possible"
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=4,
        help="sessions to try per peer when the failure may pass (peer down, restart, busy)",
    )
    p.add_argument("--out", default="reports", help="report folder")
    p.set_defaults(func=cmd_reconcile)

    p = with_profile(
        sub.add_parser(
            "check",
            help="online check: is an applicant enrolled or eligible elsewhere?",
            description="Reads identity numbers (one per line) from --file or stdin; prints, "
            "per ID and province, MATCH with programmes and statuses, or why not. Exit 3 if "
            "any ID matched somewhere, 0 if none did.",
        )
    )
    p.add_argument("--file", default="-", help="file of identity numbers (default: stdin)")
    p.add_argument("--purpose", default="online-check")
    p.add_argument(
        "--province",
        action="append",
        default=[],
        help="ask only this province (repeatable; default every peer)",
    )
    p.add_argument("--deadline-ms", type=int, default=2000)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("sessions", help="sessions of this node")
    ssub2 = p.add_subparsers(dest="sessions_command", required=True)
    p = with_profile(ssub2.add_parser("list", help="list sessions"))
    p.set_defaults(func=cmd_sessions)

    p = with_profile(
        sub.add_parser("peers", help="peers of this node and their query budgets (used, left)")
    )
    p.add_argument("--json", action="store_true", help="one JSON object per peer")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("results", help="reconciliation results")
    res = p.add_subparsers(dest="results_command", required=True)
    p = with_profile(res.add_parser("export", help="write the matches CSV and summary"))
    p.add_argument("--session", help="one session id (default: latest with each peer)")
    p.add_argument("--out", default="reports")
    p.set_defaults(func=cmd_export)
    p = with_profile(res.add_parser("receipt", help="match receipt of one record, for a grievance"))
    p.add_argument("--session", required=True)
    p.add_argument("--record", required=True, help="the record id")
    p.add_argument("--out", required=True, help="receipt file (JSON)")
    p.set_defaults(func=cmd_receipt)

    aud = sub.add_parser("audit", help="verify nodes' match logs (audit profile)")
    asub = aud.add_subparsers(dest="audit_command", required=True)
    p = with_profile(asub.add_parser("verify", help="verify each node's log and its history"))
    p.add_argument("--node", action="append", default=[], help="only this node (repeatable)")
    p.set_defaults(func=cmd_audit_verify)
    p = with_profile(asub.add_parser("pair", help="check both sides logged every session alike"))
    p.set_defaults(func=cmd_audit_pair)
    p = with_profile(asub.add_parser("prove", help="offline proof that a session is logged"))
    p.add_argument("--node", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--out", help="write the bundle here (default: print it)")
    p.set_defaults(func=cmd_audit_prove)
    p = with_profile(asub.add_parser("verify-proof", help="check a proof bundle or receipt"))
    p.add_argument("file")
    p.add_argument(
        "--keys",
        action="append",
        default=[],
        help="a .vkey file or a folder of them (default: the audit profile's)",
    )
    p.set_defaults(func=cmd_audit_verify_proof)

    p = sub.add_parser("demo", help="run a local federation and reconcile every pair")
    p.add_argument("--provinces", default="punjab,sindh,kp,balochistan")
    p.add_argument("--data", help="folder with <province>.csv files (default: generate)")
    p.add_argument("--out", default="demo-out", help="report folder")
    p.add_argument("--records", type=int, default=10000, help="records per generated registry")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="blinding processes (0: all cores)")
    p.add_argument("--workdir", help="keep the forum, keys and node stores here (default: temp)")
    p.add_argument(
        "--serve",
        action="store_true",
        help="keep the nodes running afterwards, for trying the CLI against them",
    )
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("INFO" if args.verbose else "WARNING")
    con = Console()
    try:
        rc: int = args.func(args, con)
        return rc
    except IspfError as exc:
        Console(stderr=True).print(f"ispf: {exc.message}", markup=False)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except FileNotFoundError as exc:
        Console(stderr=True).print(f"ispf: {exc}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
