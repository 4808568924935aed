"""`ispf`: the command line for provincial IT teams, batch jobs and the forum's operators.

    ispf forum init --dir forum --provinces punjab,sindh,kp,balochistan   (one-command demo)
    ispf node init --dir node --province punjab --address 10.0.0.5:50051  (on the node)
    ispf forum sign node/request.json --dir forum       (certificate + roster entry)
    ispf forum salt new --dir forum --epoch 2           (sealed to each node in the roster)
    ispf node salt import punjab.sealed --config node/node.toml
    ispf registry load registry.csv          (--profile forum/clients/punjab/profile.toml)
    ispf registry sync registry.csv          (the file is the whole registry)
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
they name, never from the command line). Exit codes: each command's --help and
docs/operators.md ("Exit codes"); --json output: one JSON object per line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ispf import files, logs
from ispf.errors import AuditFailure, ConfigError, DeadlineExceeded, IspfError, PeerUnavailable
from ispf.identity import ROLE_AUDIT, ROLE_INTERNAL, ROLE_NODE
from ispf.protocol import MAX_DEADLINE_MS
from ispf.v1 import internal_pb2
from ispf_client import output
from ispf_client.auditor import AuditProfile
from ispf_client.csvio import ProblemWriter, RowProblem, write_problems
from ispf_client.loader import BATCH, DEFAULT_MAX_DELETE_PERCENT, LoadReport
from ispf_client.output import console, emit_json, printable
from ispf_client.sdk import ClientProfile, NodeClient

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MATCHED = 3  # ispf check: some ID matched in some province
EXIT_UNCHECKED = 4  # ispf check: something was left unchecked (and nothing matched)


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
    con.print(
        f"Demo forum created in {layout.root}/ for {', '.join(provinces)} (epoch {args.epoch}). "
        "This is the one-command demo set-up: the forum made every node's keys here. "
        "For a real federation each node makes its own (ispf node init) and the forum "
        "signs their requests (ispf forum sign); see docs/operators.md.",
        markup=False,
    )
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


def cmd_forum_ca(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.forum import REVOKED_HEADER, ForumLayout, create_ca

    layout = ForumLayout(Path(args.dir))
    create_ca(layout)
    layout.revoked.write_text(REVOKED_HEADER, encoding="utf-8")
    con.print(
        f"Forum CA created: {layout.ca_cert} (public) and {layout.ca_key} (0600, the only "
        "private key the forum holds). Next: sign each node's request (ispf forum sign).",
        markup=False,
    )
    return 0


def cmd_forum_sign(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.forum import ForumLayout, read_roster, sign_request

    layout = ForumLayout(Path(args.dir))
    cert = sign_request(layout, Path(args.request), address=args.address or "")
    con.print(
        f"Issued {cert}; roster {layout.roster} is at version {read_roster(layout).version}. "
        "Send the certificate, ca.pem and roster.json back to the requester.",
        markup=False,
    )
    return 0


def cmd_forum_request(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.onboard import init_request

    req = init_request(Path(args.dir), args.role, args.name)
    con.print(f"Key made in {args.dir} (0600); send {req} to the forum.", markup=False)
    return 0


def cmd_node_init(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.onboard import init_node, write_node_config

    folder = Path(args.dir)
    req = init_node(folder, args.province, address=args.address, hosts=tuple(args.host))
    write_node_config(
        folder, args.province, listen=args.listen or args.address, ca=Path("ca.pem"), epoch=1
    )
    con.print(
        f"Keys made in {folder}/ (TLS, log signing, sealing, master key; each 0600) and "
        f"{folder / 'node.toml'}. Send {req} to the forum; put the certificate it returns "
        f"at {folder / 'node.pem'}, with ca.pem and roster.json, then import the sealed "
        "salt: ispf node salt import FILE --config " + str(folder / "node.toml"),
        markup=False,
    )
    return 0


def cmd_node_renew(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.onboard import renew_request

    folder = Path(args.dir)
    req = renew_request(folder, args.province, address=args.address, hosts=tuple(args.host))
    con.print(
        f"New TLS key {folder / 'node.key.new'} (0600); send {req} to the forum. When the "
        "certificate comes back, move node.key.new over node.key and the certificate over "
        "node.pem (the running node picks both up), and send peers the new roster.",
        markup=False,
    )
    return 0


def cmd_node_salt_import(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.onboard import import_salt

    out = import_salt(Path(args.config), Path(args.file), args.epoch)
    con.print(f"Salt opened, key check value verified, stored at {out} (0600).", markup=False)
    return 0


def cmd_salt_new(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.forum import ForumLayout, new_salt, seal_salt

    layout = ForumLayout(Path(args.dir))
    if layout.roster.exists():
        sealed = seal_salt(layout, args.epoch, keep=Path(args.keep) if args.keep else None)
        con.print(
            f"Salt for epoch {args.epoch} sealed to {_n(len(sealed), 'node')} in "
            f"{layout.sealed_dir(args.epoch)}/ (one file per node; safe to send as is). "
            + (
                f"A clear copy is in {args.keep}: destroy it when every node holds the salt."
                if args.keep
                else "No clear copy was kept."
            ),
            markup=False,
        )
        return 0
    path = new_salt(layout, args.epoch)
    con.print(
        f"Salt for epoch {args.epoch} written to {path} (mode 0600). "
        "Distribute it to every node over a secure channel."
    )
    return 0


DEFAULT_MAX_REJECTED = "1%"
LOAD_EXIT_CODES = """exit codes:
  0    every row was read and stored or rejected, and rejected rows are within --max-rejected
  1    nothing loaded, rejected rows over --max-rejected, or the file refused (its header,
       encoding, or a field over 4,096 characters: reading stops at that line)
  2    usage: no profile, no such file, a bad option
  4    stopped part-way (the node failed, timed out or went out of reach): the summary says
       how many rows were stored; run the same command again to finish
  130  interrupted: the summary says how many rows were stored"""
SYNC_EXIT_CODES = """exit codes:
  0    the registry is now exactly the file (or, with --dry-run, the counts are shown)
  1    refused, nothing changed: deletions over the limit, rejected rows over
       --max-rejected, or the file refused (header, encoding, a field too long)
  2    usage: no profile, no such file, a bad option
  4    the sync did not complete (the node failed or went out of reach): nothing changed"""
SIMPLE_EXIT_CODES = """exit codes:
  0    done
  1    the node refused or failed (one line on stderr says why)
  2    usage: no profile, a bad option"""
RECEIPT_EXIT_CODES = """exit codes:
  0    receipt written
  1    no such session on the node ("no session ..."; whitespace around the id is
       ignored), or no match of that record in it
  2    usage: no profile, an id that is not printable"""
EXIT_STOPPED = 4
EXIT_INTERRUPTED = 130


def _max_rejected(spec: str | None, strict: bool) -> Callable[[int], int]:
    """--max-rejected: a count (``10``) or a percentage of the file's rows (``0.5%``)."""
    text = (spec if spec is not None else ("0" if strict else DEFAULT_MAX_REJECTED)).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return lambda rows: int(rows * pct / 100)
        count = int(text)
        if count < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"--max-rejected {printable(text, 40)}: expected a count (10) or a percentage "
            "of the rows (0.5%)"
        ) from None
    return lambda rows: count


def _print_problems(
    args: argparse.Namespace, con: Console, rep: LoadReport, *, written: bool = False
) -> None:
    """The first --show-errors rejected rows; all (kept) of them to --errors unless
    they were `written` there already as they came."""
    for p in rep.problems[: args.show_errors]:
        con.print(
            f"  line {p.line}: {printable(p.reason, 300)} [{printable(p.code, 40)}]"
            + (f" (record {printable(p.record_id, 64)})" if p.record_id else ""),
            markup=False,
        )
    if rep.rejected > args.show_errors:
        con.print(f"  ... and {rep.rejected - args.show_errors} more", markup=False)
    if args.errors and rep.rejected:
        if not written:
            write_problems(Path(args.errors), rep.problems)
        con.print(f"All rejected rows written to {args.errors}", markup=False)


def _common_cause(rep: LoadReport) -> str:
    """The reason most rejected rows share, when nothing could be loaded."""
    codes: dict[str, RowProblem] = {}
    counts: dict[str, int] = {}
    for p in rep.problems:
        codes.setdefault(p.code, p)
        counts[p.code] = counts.get(p.code, 0) + 1
    if not counts:
        return ""
    code = max(counts, key=lambda c: counts[c])
    return f"; most rejected rows: {printable(codes[code].reason, 200)} [{code}]"


def _problems_json(args: argparse.Namespace, rep: LoadReport) -> list[dict[str, object]]:
    return [
        {"line": p.line, "record_id": p.record_id, "code": p.code, "reason": p.reason}
        for p in rep.problems[: args.show_errors]
    ]


def cmd_registry_load(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.loader import load_csv

    limit = _max_rejected(args.max_rejected, args.strict)
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"{args.file}: no such file")
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(NodeClient(_profile(args)))
        errors = stack.enter_context(ProblemWriter(Path(args.errors))) if args.errors else None
        stop = threading.Event()
        stack.enter_context(_signals_stop(stop))
        rep = load_csv(client, path, sink=errors.write if errors is not None else None, stop=stop)
    allowed = limit(rep.rows)
    refused = rep.file_refused
    stored = rep.accepted
    if rep.interrupted:
        rc = EXIT_INTERRUPTED
    elif rep.stopped:
        rc = EXIT_STOPPED
    elif refused is not None or stored == 0 or rep.rejected > allowed:
        rc = EXIT_FAILED
    else:
        rc = 0
    verdict = ""
    if refused is not None and refused.code != "file.stopped":
        verdict = f"nothing loaded: {printable(refused.reason, 400)}"
    elif stored == 0 and not rep.stopped:
        verdict = "nothing loaded" + (_common_cause(rep) if rep.rows else ": the file has no rows")
    elif refused is not None:
        verdict = printable(refused.reason, 300)
    elif rep.rejected > allowed:
        verdict = (
            f"{rep.rejected} rows rejected, more than --max-rejected allows ({allowed} of "
            f"{rep.rows})" + _common_cause(rep)
        )
    stop_line = ""
    if rep.stopped:
        stop_line = (
            f"load stopped at line {rep.stopped_at}: {printable(rep.stopped, 300)}; "
            f"{stored} rows of this file were stored before it (each batch of {BATCH} is "
            "stored whole or not at all)"
            + (
                f"; the {rep.unconfirmed} rows sent just before it stopped may or may not "
                "have been stored"
                if rep.unconfirmed
                else ""
            )
            + ". Run the same load again to finish: rows already stored come back unchanged"
        )
    if args.json:
        emit_json(
            {
                "command": "registry load",
                "file": args.file,
                "rows": rep.rows,
                "loaded": stored,
                "new": rep.inserted,
                "updated": rep.updated,
                "unchanged": rep.unchanged,
                "rejected": rep.rejected,
                "max_rejected": allowed,
                "complete": not rep.stopped,
                "stopped_at_line": rep.stopped_at or None,
                "stopped": rep.stopped or None,
                "unconfirmed": rep.unconfirmed,
                "error": verdict or None,
                "problems": _problems_json(args, rep),
                "exit": rc,
            }
        )
        return rc
    con.print(
        f"{args.file}: {_n(rep.rows, 'row')}; {stored} loaded ({rep.inserted} new, "
        f"{rep.updated} updated, {rep.unchanged} unchanged); {rep.rejected} rejected",
        markup=False,
    )
    _print_problems(args, con, rep, written=True)
    err = output.console(stderr=True)
    if stop_line:
        err.print(f"ispf: {stop_line}", markup=False)
    if verdict and rc:
        err.print(f"ispf: {verdict}", markup=False)
    return rc


def cmd_registry_sync(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.loader import sync_csv

    limit = _max_rejected(args.max_rejected, args.strict)
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"{args.file}: no such file")
    if args.allow_deletes < 0 or not 0 <= args.max_delete_percent <= 100:
        raise ConfigError("--allow-deletes must be >= 0 and --max-delete-percent 0 to 100")
    with NodeClient(_profile(args)) as client:
        rep = sync_csv(
            client,
            path,
            max_rejected=limit,
            allow_deletes=args.allow_deletes,
            max_delete_percent=args.max_delete_percent,
            dry_run=args.dry_run,
        )
    refused = rep.file_refused
    if rep.stopped and refused is None:
        rc = EXIT_STOPPED
    elif refused is not None or rep.refused:
        rc = EXIT_FAILED
    else:
        rc = 0
    why = ""
    if refused is not None:
        why = f"nothing changed: {printable(refused.reason, 400)}"
    elif rep.stopped:
        why = f"the sync did not complete: {printable(rep.stopped, 300)}; nothing changed"
    elif rep.refused:
        why = printable(rep.refused, 400)
    if args.json:
        emit_json(
            {
                "command": "registry sync",
                "file": args.file,
                "rows": rep.rows,
                "applied": rep.applied,
                "dry_run": args.dry_run,
                "records_before": rep.records_before,
                "new": rep.inserted,
                "updated": rep.updated,
                "unchanged": rep.unchanged,
                "deleted": rep.deleted,
                "kept": rep.kept,
                "rejected": rep.rejected,
                "error": why or None,
                "problems": _problems_json(args, rep),
                "exit": rc,
            }
        )
        if args.errors and rep.problems:
            write_problems(Path(args.errors), rep.problems)
        return rc
    what = "would change" if args.dry_run else ("synced" if rep.applied else "not synced")
    con.print(
        f"{args.file}: {_n(rep.rows, 'row')}; {what}: {rep.inserted} new, {rep.updated} updated, "
        f"{rep.unchanged} unchanged, {rep.deleted} deleted, {rep.rejected} rejected"
        + (f" ({rep.kept} stored records of rejected rows kept)" if rep.kept else ""),
        markup=False,
    )
    _print_problems(args, con, rep)
    if why:
        output.console(stderr=True).print(f"ispf: {why}", markup=False)
    return rc


@contextlib.contextmanager
def _signals_stop(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (a cron timeout, systemd stop) or Ctrl-C ends a load with its count.

    The first sets `stop`: the load finishes the batch the node is storing and sends no
    more, so the count it prints is exact (an exception raised inside a call to the
    node could leave that batch in doubt, and gRPC's channel is not safe to close
    from there). A second signal interrupts at once."""

    fired = False

    def interrupt(signum: int, frame: object) -> None:
        # (a plain flag first: a second signal can land inside Event.set(), whose lock
        # the nested handler would wait on for ever)
        nonlocal fired
        if fired:
            raise KeyboardInterrupt
        fired = True
        stop.set()

    try:
        # (a signal ignored where the load was started, as `cmd &` from a script
        # leaves SIGINT, stays ignored)
        old = {
            sig: signal.signal(sig, interrupt)
            for sig in (signal.SIGTERM, signal.SIGINT)
            if signal.getsignal(sig) is not signal.SIG_IGN
        }
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def cmd_registry_stats(args: argparse.Namespace, con: Console) -> int:
    with NodeClient(_profile(args)) as client:
        st = client.stats()
    if args.json:
        emit_json(
            {
                "command": "registry stats",
                "province": st.province,
                "records": st.records,
                "distinct_ids": st.distinct_ids,
                "labels": [
                    {
                        "programme": lc.label.programme,
                        "status": lc.label.status,
                        "records": lc.records,
                    }
                    for lc in st.labels
                ],
            }
        )
        return 0
    con.print(
        f"{st.province}: {_n(st.records, 'record')}, {_n(st.distinct_ids, 'distinct ID')}",
        markup=False,
    )
    for lc in st.labels:
        con.print(
            f"  {printable(lc.label.programme)}/{printable(lc.label.status)}: {lc.records}",
            markup=False,
        )
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


def _own_node_down(client: NodeClient, exc: IspfError) -> PeerUnavailable:
    prof = client.profile
    return PeerUnavailable(
        f"own node {prof.province} at {prof.address} is not answering "
        f"({printable(exc.message)}): is ispf-node running there, and is `address` in "
        "the profile right?"
    )


def _own_node_answers(client: NodeClient) -> list[str]:
    """The node's peers; raise at once, naming the node, if it does not answer."""
    try:
        return client.peers()
    except (PeerUnavailable, DeadlineExceeded) as exc:
        raise _own_node_down(client, exc) from None


RECONCILE_EXIT_CODES = """exit codes:
  0    every peer asked completed (the report covers this run's sessions)
  1    a peer failed or is unknown (FAILED lines say why); no report line is printed
       unless a session of this run completed
  2    usage: no profile, a bad option"""


def cmd_reconcile(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.progress import watch_with_progress
    from ispf_client.report import write_report

    failed: list[str] = []
    done: list[str] = []
    with NodeClient(_profile(args)) as client:
        known = _own_node_answers(client)  # at once, not after minutes of silent retries
        peers = known if args.all else [args.peer]
        if not peers:
            raise ConfigError("the node has no peers configured")
        me = client.profile.province
        for peer in peers:
            title = f"{me} ⇄ {peer}"

            def follow(sid: str, t: str = title) -> internal_pb2.SessionStatus:
                if args.json:
                    return client.wait(sid)
                return watch_with_progress(client, sid, t, con)

            def retry(st: internal_pb2.SessionStatus, delay: float, p: str = peer) -> None:
                if args.json:
                    emit_json(
                        {
                            "command": "reconcile",
                            "peer": p,
                            "retrying_in_s": round(delay),
                            "error": st.error,
                        }
                    )
                    return
                con.print(
                    f"  {p}: {printable(st.error, 300)}; retrying in {delay:.0f} s", markup=False
                )

            final: internal_pb2.SessionStatus | None = None
            error = ""
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
                error = exc.message
            else:
                if final.state != internal_pb2.SESSION_STATE_COMPLETED:
                    error = final.error or "the session did not complete"
            if error:
                failed.append(f"{printable(peer, 64)}: {printable(error, 300)}")
            else:
                done.append(peer)
            if args.json:
                emit_json(
                    {
                        "command": "reconcile",
                        "peer": peer,
                        "completed": not error,
                        "session_id": final.session_id if final is not None else None,
                        "match_count": final.match_count
                        if final is not None and not error
                        else None,
                        "error": error or None,
                    }
                )
            elif not error and args.count_only and final is not None:
                con.print(f"  {peer}: {_n(final.match_count, 'identity number')} in common")
        rep = None
        if not args.count_only and done:
            rep = write_report(client, Path(args.out))
    rc = EXIT_FAILED if failed else 0
    if args.json:
        emit_json(
            {
                "command": "reconcile",
                "completed": done,
                "failed": len(failed),
                "report": str(rep.matches_csv) if rep is not None else None,
                "rows": rep.rows if rep is not None else None,
                "summary": str(rep.summary_json) if rep is not None else None,
                "exit": rc,
            }
        )
        return rc
    if rep is not None:
        note = (
            f"; {_n(len(failed), 'peer')} failed this run: rows with them, if any, are from "
            "earlier sessions"
            if failed
            else ""
        )
        con.print(
            f"Report: {rep.matches_csv} ({_n(rep.rows, 'row')}{note}), summary {rep.summary_json}",
            markup=False,
        )
    elif failed and not args.count_only:
        con.print("No report written: no session of this run completed", markup=False)
    for f in failed:
        con.print(f"[red]FAILED[/] {escape(f)}")
    return rc


def _answer_text(a: internal_pb2.ProvinceAnswer) -> str:
    from ispf_client.checking import status_name

    if a.status == internal_pb2.PROVINCE_STATUS_MATCH:
        labels = ", ".join(f"{lb.programme}/{lb.status}" for lb in a.labels)
        return printable(f"{a.province}: MATCH ({labels})")
    detail = a.detail if a.detail and a.status != internal_pb2.PROVINCE_STATUS_NO_MATCH else ""
    return printable(
        f"{a.province}: {status_name(a.status).replace('_', ' ')}"
        + (f" ({detail})" if detail else "")
    )


def _answer_json(a: internal_pb2.ProvinceAnswer) -> dict[str, object]:
    from ispf_client.checking import status_name

    return {
        "province": a.province,
        "status": status_name(a.status),
        "labels": [{"programme": lb.programme, "status": lb.status} for lb in a.labels],
        "detail": a.detail,
    }


def cmd_check(args: argparse.Namespace, con: Console) -> int:
    """Identity numbers come from a file or stdin, never the command line (shell history)."""
    from ispf_client.checking import check_paced

    if not 0 <= args.deadline_ms <= MAX_DEADLINE_MS:
        raise ConfigError(
            f"--deadline-ms {args.deadline_ms}: give 0 to {MAX_DEADLINE_MS} (milliseconds "
            "the node waits for the slowest province; 0: its default, 2000)"
        )
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    nids = [line.strip() for line in text.splitlines() if line.strip()]
    if not nids:
        raise ConfigError("no identity numbers given: one per line, in --file or on stdin")
    err = console(stderr=True)

    def waiting(province: str, seconds: float, ids: int, per_minute: int) -> None:
        limit = f" (its limit: {per_minute} per minute)" if per_minute else ""
        err.print(
            f"ispf check: {province} is rate-limited{limit}; asking again for "
            f"{_n(ids, 'ID')} in {seconds:.1f} s",
            markup=False,
        )

    with NodeClient(_profile(args)) as client:
        try:
            run = check_paced(
                client,
                nids,
                purpose=args.purpose,
                provinces=args.province,
                deadline_ms=args.deadline_ms,
                max_wait=args.max_wait,
                on_wait=None if args.json else waiting,
            )
        except PeerUnavailable as exc:  # (a province that is down is an answer, not this)
            raise _own_node_down(client, exc) from None
    for r in run.results:
        if args.json:
            emit_json(
                {
                    "position": r.position,
                    "error": r.error,
                    "matched": any(
                        a.status == internal_pb2.PROVINCE_STATUS_MATCH for a in r.provinces
                    ),
                    "provinces": [_answer_json(a) for a in r.provinces],
                }
            )
        elif r.error:
            con.print(f"#{r.position}: not checked: {printable(r.error)}", markup=False)
        else:
            con.print(
                f"#{r.position}: " + "; ".join(_answer_text(a) for a in r.provinces), markup=False
            )
    unchecked = run.unchecked()
    rc = EXIT_MATCHED if run.matched else EXIT_UNCHECKED if unchecked else 0
    reasons = [printable(x, 500) for x in run.reasons()]
    if args.json:
        emit_json(
            {
                "summary": {
                    "ids": len(run.results),
                    "matched": run.matched,
                    "unchecked": len(unchecked),
                    "reasons": reasons,
                    "exit": rc,
                }
            }
        )
    else:
        line = f"{_n(len(run.results), 'ID')}: {run.matched} matched"
        if unchecked:
            line += f", {len(unchecked)} not checked: " + "; ".join(reasons)
        else:
            line += ", every province answered for every ID"
        (err if unchecked else con).print(line, markup=False)
    return rc


def cmd_sessions(args: argparse.Namespace, con: Console) -> int:
    with NodeClient(_profile(args)) as client:
        for s in client.sessions():
            state = internal_pb2.SessionState.Name(s.state).removeprefix("SESSION_STATE_")
            if args.json:
                emit_json(
                    {
                        "session_id": s.session_id,
                        "role": s.role,
                        "peer": s.peer,
                        "state": state.lower(),
                        "match_count": s.match_count,
                        "started_at": s.started_at,
                        "error": s.error or None,
                    }
                )
                continue
            con.print(
                f"{s.session_id}  {s.role:9} {s.peer:12} {state.lower():9} "
                f"{_n(s.match_count, 'match', 'matches')}  {s.started_at}"
                + (f"  {printable(s.error, 300)}" if s.error else ""),
                markup=False,
            )
    return 0


def _session_id(text: str) -> str:
    """A session id as typed or pasted: surrounding whitespace (a CSV's \\r) goes;
    anything else that is not printable is refused, never sent or echoed."""
    sid = text.strip()
    if not sid or not sid.isprintable() or len(sid) > 128:
        raise ConfigError(f"unknown session {printable(sid, 64)!r}: not a session id")
    return sid


def cmd_peers(args: argparse.Namespace, con: Console) -> int:
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

    sid = _session_id(args.session) if args.session else ""
    with NodeClient(_profile(args)) as client:
        rep = write_report(client, Path(args.out), sid)
    if args.json:
        emit_json(
            {
                "command": "results export",
                "session_id": sid or None,
                "matches_csv": str(rep.matches_csv),
                "rows": rep.rows,
                "summary": str(rep.summary_json),
                "html": str(rep.html) if rep.html else None,
            }
        )
        return 0
    con.print(
        f"Report: {rep.matches_csv} ({_n(rep.rows, 'row')}), summary {rep.summary_json}",
        markup=False,
    )
    return 0


def cmd_receipt(args: argparse.Namespace, con: Console) -> int:
    import json

    from google.protobuf.json_format import MessageToDict

    sid = _session_id(args.session)
    with NodeClient(_profile(args)) as client:
        client.session(sid)  # UnknownSession ("no session ...") before "no match"
        # (as stored: the loader strips a record id, so a pasted "\r" must go too)
        receipt = client.receipt(sid, args.record.strip())
    bundle = MessageToDict(
        receipt, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # Integers as numbers, bytes as base64: the same shape `audit prove` writes.
    for k in ("tag_index", "match_count", "entry_index"):
        bundle[k] = int(bundle.get(k, 0))
    out = Path(args.out)
    files.write_private_text(out, json.dumps(bundle, indent=1) + "\n")
    con.print(
        f"Receipt for record {printable(args.record, 64)} in session {sid} written to {out}; "
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
    from ispf_client.auditor import audit_nodes

    err = console(stderr=True)
    reports = audit_nodes(_audit_profile(args), args.node or None)
    for r in reports:
        if r.failure is not None:
            if args.json:
                emit_json(
                    {
                        "node": r.node,
                        "ok": False,
                        "kind": r.failure.kind,
                        "detail": printable(r.failure.message),
                        "evidence": str(r.failure.evidence) if r.failure.evidence else None,
                    }
                )
                continue
            err.print(f"AUDIT FAILED {printable(r.failure.message)}", markup=False)
            if r.failure.evidence:
                err.print(f"Evidence kept in {r.failure.evidence}", markup=False)
            continue
        if args.json:
            emit_json(
                {
                    "node": r.node,
                    "ok": True,
                    "size": r.size,
                    "sessions": r.sessions,
                    "previous_size": r.previous_size,
                    "cosigners": r.cosigners,
                }
            )
            continue
        since = (
            f", consistent with the {r.previous_size} trusted before"
            if (r.previous_size is not None)
            else " (first check: now trusted)"
        )
        cos = (
            ", cosigned by " + ", ".join(r.cosigners)
            if r.cosigners
            else ", no cosignature (no peer has witnessed this checkpoint yet: see "
            "docs/auditors.md)"
        )
        con.print(
            f"{r.node}: log of {_n(r.size, 'entry', 'entries')} verified "
            f"({_n(r.sessions, 'session')}){since}{cos}",
            markup=False,
        )
    failed = [r.node for r in reports if r.failure is not None]
    if failed and not args.json:
        err.print(
            f"{_n(len(failed), 'node')} of {len(reports)} failed the audit: {', '.join(failed)}",
            markup=False,
        )
    return EXIT_FAILED if failed else 0


def cmd_audit_pair(args: argparse.Namespace, con: Console) -> int:
    from ispf_client.auditor import pair

    try:
        rep = pair(_audit_profile(args))
    except AuditFailure as exc:
        if args.json:
            emit_json({"ok": False, "error": printable(exc.message), "kind": exc.kind})
        else:
            console(stderr=True).print(f"AUDIT FAILED {printable(exc.message)}", markup=False)
        return EXIT_FAILED
    if args.json:
        emit_json(
            {
                "ok": rep.ok,
                "paired": rep.paired,
                "failed": rep.failed,
                "interrupted": rep.interrupted,
                "one_sided": rep.one_sided,
                "mismatched": rep.mismatched,
            }
        )
        return 0 if rep.ok else EXIT_FAILED
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
    matches = _n(int(fields.get("match_count") or 0), "match", "matches")
    con.print(
        f"Valid {what}session {fields['session_id']} ({fields['initiator']} ⇄ "
        f"{fields['responder']}, {fields['outcome']}, {matches}) "
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
        epilog="exit codes: 0 the work was done; 1 it failed (the last line says why);\n"
        "2 usage or configuration error. `ispf check` adds 3 (a match) and 4 (something\n"
        "left unchecked): see `ispf check --help`; every code is in docs/operators.md.",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = ap.add_subparsers(dest="command", required=True)

    def with_profile(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--profile", help="client profile TOML (default: $ISPF_PROFILE)")
        return p

    forum = sub.add_parser("forum", help="forum administration: CA, certificates, salts")
    fsub = forum.add_subparsers(dest="forum_command", required=True)
    p = fsub.add_parser("init", help="create a demo forum: CA, node and client certificates, salt")
    p.add_argument("--dir", default="forum", help="folder to create the forum in (default: forum)")
    p.add_argument(
        "--provinces",
        default="punjab,sindh,kp,balochistan",
        help="comma-separated province slugs, one node each (default: all four)",
    )
    p.add_argument(
        "--epoch", type=int, default=1, help="salt epoch to create and make current (default 1)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address nodes listen on")
    p.add_argument(
        "--base-port",
        type=int,
        default=50051,
        help="port of the first node; the others follow in order (0: each picks a free port)",
    )
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
    p = ssub.add_parser("new", help="create a new epoch's salt, sealed to each node in the roster")
    p.add_argument("--dir", default="forum")
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--keep", help="also keep a clear copy in this file (0600), to destroy later")
    p.set_defaults(func=cmd_salt_new)
    p = fsub.add_parser("ca", help="create the forum's CA (the forum's only private key)")
    p.add_argument("--dir", default="forum")
    p.set_defaults(func=cmd_forum_ca)
    p = fsub.add_parser("sign", help="issue the certificate a request file asks for (+ roster)")
    p.add_argument("request", help="request.json from `ispf node init` or `ispf forum request`")
    p.add_argument("--dir", default="forum")
    p.add_argument("--address", help="the node's address for the roster (default: requested)")
    p.set_defaults(func=cmd_forum_sign)
    p = fsub.add_parser("request", help="make an internal system's or auditor's key + request")
    p.add_argument("--role", required=True, choices=[ROLE_INTERNAL, ROLE_AUDIT])
    p.add_argument("--name", required=True, help="province slug (internal) or auditor name")
    p.add_argument("--dir", required=True, help="folder for the key (0600) and request.json")
    p.set_defaults(func=cmd_forum_request)

    nodep = sub.add_parser("node", help="a province node's own keys: init, salt import")
    nsub = nodep.add_subparsers(dest="node_command", required=True)
    p = nsub.add_parser("init", help="make this node's keys and its request to the forum")
    p.add_argument("--dir", required=True, help="the node's folder")
    p.add_argument("--province", required=True)
    p.add_argument("--address", required=True, help="host:port peers reach this node at")
    p.add_argument("--listen", help="host:port to bind (default: --address)")
    p.add_argument("--host", action="append", default=[], help="extra host/IP for the cert")
    p.set_defaults(func=cmd_node_init)
    p = nsub.add_parser("renew", help="certificate rotation: a new TLS key and request")
    p.add_argument("--dir", required=True, help="the node's folder")
    p.add_argument("--province", required=True)
    p.add_argument("--address", required=True, help="host:port peers reach this node at")
    p.add_argument("--host", action="append", default=[], help="extra host/IP for the cert")
    p.set_defaults(func=cmd_node_renew)
    nsalt = nsub.add_parser("salt", help="epoch salts").add_subparsers(
        dest="node_salt_command", required=True
    )
    p = nsalt.add_parser("import", help="open a sealed salt from the forum and store it")
    p.add_argument("file")
    p.add_argument("--config", required=True, help="the node's TOML config")
    p.add_argument("--epoch", type=int, help="refuse the file unless it is for this epoch")
    p.set_defaults(func=cmd_node_salt_import)

    reg = sub.add_parser("registry", help="the province's own registry")
    rsub = reg.add_subparsers(dest="registry_command", required=True)

    def file_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "file", help="CSV (UTF-8, comma-separated) with record_id,cnic,programme,status"
        )
        p.add_argument("--errors", help="write every rejected row (line, reason) to this CSV")
        p.add_argument("--show-errors", type=int, default=20, help="rejected rows to print")
        p.add_argument(
            "--max-rejected",
            help="most rejected rows for exit 0: a count (10) or a share of the rows (0.5%%); "
            f"default {DEFAULT_MAX_REJECTED.replace('%', '%%')}, 0 with --strict",
        )
        p.add_argument("--strict", action="store_true", help="--max-rejected 0 by default")
        p.add_argument("--json", action="store_true", help="one JSON object on stdout")

    p = with_profile(
        rsub.add_parser(
            "load",
            help="load or update records from a CSV file",
            description="Insert or update records by record id, in batches of "
            f"{BATCH} (each stored whole). Rows absent from the file are left alone "
            "(see sync).",
            epilog=LOAD_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    file_options(p)
    p.set_defaults(func=cmd_registry_load)
    p = with_profile(
        rsub.add_parser(
            "sync",
            help="make the registry exactly a CSV file (absent records are deleted)",
            description="The file is the whole registry: new rows are inserted, changed "
            "ones updated, and stored records absent from it deleted, all in one change on "
            "the node, or nothing at all. A stored record whose row is rejected is kept. "
            "Deleting more than --max-delete-percent of the registry needs --allow-deletes.",
            epilog=SYNC_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    file_options(p)
    p.add_argument(
        "--allow-deletes",
        type=int,
        default=0,
        metavar="N",
        help="allow up to N deletions whatever their share of the registry",
    )
    p.add_argument(
        "--max-delete-percent",
        type=float,
        default=DEFAULT_MAX_DELETE_PERCENT,
        help=f"share of the registry deleted without --allow-deletes (default "
        f"{DEFAULT_MAX_DELETE_PERCENT:g})",
    )
    p.add_argument("--dry-run", action="store_true", help="count what would change; change nothing")
    p.set_defaults(func=cmd_registry_sync)
    p = with_profile(
        rsub.add_parser(
            "stats",
            help="record counts per programme and status",
            epilog=SIMPLE_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_registry_stats)
    p = with_profile(rsub.add_parser("delete", help="delete records by record id"))
    p.add_argument("record_ids", nargs="+")
    p.set_defaults(func=cmd_registry_delete)

    p = with_profile(
        sub.add_parser(
            "reconcile",
            help="reconcile with one peer or all peers",
            epilog=RECONCILE_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object per peer, then one for the report"
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--peer", help="peer province")
    g.add_argument("--all", action="store_true", help="every configured peer, one after another")
    p.add_argument(
        "--purpose",
        default="reconciliation",
        help="purpose of the session, as the peer's policy allows it (default: reconciliation)",
    )
    p.add_argument(
        "--count-only",
        action="store_true",
        help="learn only how many IDs are in common; the peer learns only how many "
        "values you sent (no match, no count)",
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
            "per ID and province, MATCH with programmes and statuses, or why not, then a "
            "summary line. A province that rate-limits is asked again at its pace (at most "
            "--max-wait seconds in all).",
            epilog="exit codes: 0 every ID was answered by every province asked and none "
            "matched; 3 some ID matched somewhere (even if others were left unchecked); "
            "4 nothing matched but something was left unchecked (an invalid ID, a province "
            "unavailable, rate-limited, not authorised or not yet reconciled): the summary "
            "line says what and why; 1 the check failed (own node unreachable, ...); "
            "2 usage or configuration error",
        )
    )
    p.add_argument("--file", default="-", help="file of identity numbers (default: stdin)")
    p.add_argument("--purpose", default="online-check", help="purpose the peers' policies allow")
    p.add_argument(
        "--province",
        action="append",
        default=[],
        help="ask only this province (repeatable; default every peer)",
    )
    p.add_argument(
        "--deadline-ms",
        type=int,
        default=2000,
        help=f"wait this long for the slowest province (at most {MAX_DEADLINE_MS})",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="seconds to spend pacing to provinces' rate limits before leaving IDs "
        "unchecked (default 300); a batch that would need longer is said at once",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per ID, then a summary")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("sessions", help="sessions of this node")
    ssub2 = p.add_subparsers(dest="sessions_command", required=True)
    p = with_profile(
        ssub2.add_parser(
            "list",
            help="list sessions",
            epilog=SIMPLE_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    p.add_argument("--json", action="store_true", help="one JSON object per session")
    p.set_defaults(func=cmd_sessions)

    p = with_profile(
        sub.add_parser("peers", help="peers of this node and their query budgets (used, left)")
    )
    p.add_argument("--json", action="store_true", help="one JSON object per peer")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("results", help="reconciliation results")
    res = p.add_subparsers(dest="results_command", required=True)
    p = with_profile(
        res.add_parser(
            "export",
            help="write the matches CSV, the summary and the HTML report",
            epilog=SIMPLE_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    p.add_argument("--session", help="one session id (default: latest with each peer)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--out", default="reports", help="report folder (default: reports)")
    p.set_defaults(func=cmd_export)
    p = with_profile(
        res.add_parser(
            "receipt",
            help="match receipt of one record, for a grievance",
            epilog=RECEIPT_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    p.add_argument("--session", required=True, help="the session id (from `ispf sessions list`)")
    p.add_argument("--record", required=True, help="the record id")
    p.add_argument("--out", required=True, help="receipt file (JSON)")
    p.set_defaults(func=cmd_receipt)

    aud = sub.add_parser("audit", help="verify nodes' match logs (audit profile)")
    asub = aud.add_subparsers(dest="audit_command", required=True)
    p = with_profile(
        asub.add_parser(
            "verify",
            help="verify each node's log and its history",
            description="Checks every node (or each --node) and reports each, naming what "
            "was found: deleted, inserted, reordered or modified entries, a rollback "
            "(truncated log), a fork, a bad signature. Evidence of each failure is kept "
            "in the profile's evidence folder.",
            epilog="exit codes: 0 every node's log verified; 1 at least one failed (each is "
            "reported); 2 usage or configuration error",
        )
    )
    p.add_argument("--node", action="append", default=[], help="only this node (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per node")
    p.set_defaults(func=cmd_audit_verify)
    p = with_profile(
        asub.add_parser(
            "pair",
            help="check both sides logged every session alike",
            epilog="exit codes: 0 every session logged alike by both sides; 1 a session "
            "logged by one side only or differently, or a log failed verification",
        )
    )
    p.add_argument("--json", action="store_true", help="one JSON object with the findings")
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
    con = output.console()
    try:
        rc: int = args.func(args, con)
        return rc
    except IspfError as exc:
        output.console(stderr=True).print(f"ispf: {printable(exc.message, 500)}", markup=False)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except FileNotFoundError as exc:
        output.console(stderr=True).print(f"ispf: {exc}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
