"""Progress display for long sessions: records blinded, sent, received, with an ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ispf.v1 import internal_pb2
from ispf_client.sdk import NodeClient


def watch_with_progress(
    client: NodeClient, session_id: str, title: str, console: Console
) -> internal_pb2.SessionStatus:
    """Follow a session to its end, drawing a progress bar; returns the final status."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "blinded {task.fields[blinded]} sent {task.fields[sent]} "
            "received {task.fields[received]}"
        ),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    last = None
    with Progress(
        *columns, console=console, transient=False, disable=not console.is_terminal
    ) as bar:
        task = bar.add_task(title, total=None, blinded=0, sent=0, received=0)
        for last in client.watch(session_id):
            bar.update(
                task,
                completed=last.work_done,
                total=last.work_total or None,
                blinded=last.blinded,
                sent=last.sent,
                received=last.received,
            )
    assert last is not None
    console.print(f"  {title}: {summary(last)}", markup=False)
    return last


def summary(st: internal_pb2.SessionStatus) -> str:
    """One line: outcome, full or incremental and what it touched, matches, session."""
    state = internal_pb2.SessionState.Name(st.state).removeprefix("SESSION_STATE_").lower()
    if st.sync == "incremental":
        how = (
            f"incremental: {st.own_values} own and {st.peer_values} peer values sent, "
            f"{st.own_removed} and {st.peer_removed} removed"
        )
    elif st.sync == "full":
        how = f"full: {st.own_values} own, {st.peer_values} peer values"
    else:
        how = f"{st.own_values} own, {st.peer_values} peer values"
    text = f"{state} ({how}), {st.match_count} matched IDs, session {st.session_id}"
    return text + (f": {st.error}" if st.error else "")
