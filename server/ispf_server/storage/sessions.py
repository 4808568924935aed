"""Sessions and their results: a session's row, from RUNNING to COMPLETED or FAILED,
and its match rows. A session's results become visible together with its
COMPLETED state (and its audit entry, and its pair state), in one transaction,
so partial results are never shown as final."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ispf.errors import RetryLater
from ispf.records import Label
from ispf_server.clock import utcnow
from ispf_server.storage.db import Connection, Cursor, Database, insert_rows, storage_errors

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id      TEXT PRIMARY KEY,
    peer            TEXT NOT NULL,
    role            TEXT NOT NULL,
    mode            INTEGER NOT NULL,
    purpose         TEXT NOT NULL,
    epoch           INTEGER NOT NULL,
    state           TEXT NOT NULL,
    own_records     INTEGER NOT NULL DEFAULT 0,
    own_values      INTEGER NOT NULL DEFAULT 0,
    peer_values     INTEGER NOT NULL DEFAULT 0,
    match_count     INTEGER NOT NULL DEFAULT 0,
    matched_records INTEGER NOT NULL DEFAULT 0,
    result_digest   BLOB,
    error           TEXT NOT NULL DEFAULT '',
    started_at      TEXT NOT NULL,
    finished_at     TEXT NOT NULL DEFAULT '',
    sync            TEXT NOT NULL DEFAULT '',
    own_removed     INTEGER NOT NULL DEFAULT 0,
    peer_removed    INTEGER NOT NULL DEFAULT 0,
    -- A failure a new session may get past (peer down, restart, busy).
    retriable       INTEGER NOT NULL DEFAULT 0,
    -- Responder: its answer to Conclude, for a Conclude repeated after a restart.
    answer          BLOB
);
CREATE TABLE IF NOT EXISTS matches (
    session_id     TEXT NOT NULL REFERENCES sessions(session_id),
    record_id      TEXT NOT NULL,
    programme      TEXT NOT NULL,
    status         TEXT NOT NULL,
    peer_programme TEXT NOT NULL,
    peer_status    TEXT NOT NULL,
    tag            BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS matches_session ON matches(session_id, record_id);
-- Tags whose rows a running session does not carry over from the session before it
-- (`carry_in`): written and emptied in the one transaction that copies the rest.
CREATE TABLE IF NOT EXISTS carry_drop (
    session_id TEXT NOT NULL,
    tag        BLOB NOT NULL,
    PRIMARY KEY (session_id, tag)
);
"""


MATCH_COLUMNS = (
    "session_id",
    "record_id",
    "programme",
    "status",
    "peer_programme",
    "peer_status",
    "tag",
)


@dataclass(frozen=True, slots=True)
class MatchRow:
    record_id: str = field(repr=False)
    label: Label
    peer_label: Label
    tag: bytes = b""


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    peer: str
    role: str
    mode: int
    purpose: str
    epoch: int
    state: str
    own_records: int
    own_values: int
    peer_values: int
    match_count: int
    matched_records: int
    result_digest: bytes
    error: str
    started_at: str
    finished_at: str
    sync: str = ""
    own_removed: int = 0
    peer_removed: int = 0
    retriable: int = 0
    answer: bytes | None = None
    owner: str = ""  # the replica running it (a PostgreSQL store's; "": the node's)
    staged_gen: int | None = None  # the generation of pair runs it staged (`record_staging`)


@dataclass(frozen=True, slots=True)
class SessionTotals:
    """What a completed session's row records, besides its state and times."""

    own_records: int
    own_values: int
    peer_values: int
    match_count: int
    result_digest: bytes
    matched_records: int | None = None  # (None: count the records `matches` name)
    sync: str = ""
    own_removed: int = 0
    peer_removed: int = 0


def _running(cur: Cursor, session_id: str) -> bool:
    # (Every write transaction holds the store's write lock, so another replica cannot
    # fail the session between this read and the caller's writes.)
    row = cur.execute(
        "SELECT 1 FROM sessions WHERE session_id=? AND state='RUNNING'", (session_id,)
    ).fetchone()
    return row is not None


def _insert_matches(cur: Cursor, session_id: str, matches: list[MatchRow]) -> None:
    insert_rows(
        cur,
        "matches",
        MATCH_COLUMNS,
        (
            (
                session_id,
                m.record_id,
                m.label.programme,
                m.label.status,
                m.peer_label.programme,
                m.peer_label.status,
                m.tag,
            )
            for m in matches
        ),
    )


def complete_in(
    cur: Cursor,
    session_id: str,
    totals: SessionTotals,
    matches: list[MatchRow] | None,
) -> None:
    """Mark a session COMPLETED with its totals, and write its match rows unless they
    were staged (None), in the caller's transaction (`Store.complete_session`)."""
    if not _running(cur, session_id):
        # Failed meanwhile: by another replica, which took this one for stopped (its
        # liveness lock was lost with the database), or by a restart. A result is never
        # committed over a failure: the caller's transaction rolls back whole.
        raise RetryLater(
            "the session was failed meanwhile (another replica of this node took the one "
            "running it for stopped): nothing of it was kept; run it again"
        )
    matched_records = totals.matched_records
    if matches is not None:
        _insert_matches(cur, session_id, matches)
        if matched_records is None:
            matched_records = len({m.record_id for m in matches})
    cur.execute(
        "UPDATE sessions SET state='COMPLETED', own_records=?, own_values=?, "
        "peer_values=?, match_count=?, matched_records=?, result_digest=?, "
        "finished_at=?, sync=?, own_removed=?, peer_removed=? WHERE session_id=?",
        (
            totals.own_records,
            totals.own_values,
            totals.peer_values,
            totals.match_count,
            matched_records or 0,
            totals.result_digest,
            utcnow(),
            totals.sync,
            totals.own_removed,
            totals.peer_removed,
            session_id,
        ),
    )


def stage_in(cur: Cursor, session_id: str, matches: list[MatchRow]) -> bool:
    """A running session's match rows written ahead of its commit, in the caller's
    transaction; False (nothing written) where it is no longer running."""
    if not _running(cur, session_id):
        return False
    _insert_matches(cur, session_id, matches)
    return True


def carry_in(cur: Cursor, session_id: str, base: str, drop: Iterable[bytes]) -> bool:
    """A running session's match rows carried over from a completed session of the
    same pair (`base`), but for the rows of the tags in `drop`, in the caller's
    transaction: one copy inside the database, however many matches. False
    (nothing written) where the session is no longer running."""
    if not _running(cur, session_id):
        return False
    insert_rows(cur, "carry_drop", ("session_id", "tag"), ((session_id, t) for t in set(drop)))
    cur.execute(
        f"INSERT INTO matches ({', '.join(MATCH_COLUMNS)}) "  # noqa: S608
        f"SELECT CAST(? AS TEXT), {', '.join(MATCH_COLUMNS[1:])} FROM matches m "
        "WHERE m.session_id=? AND NOT EXISTS "
        "(SELECT 1 FROM carry_drop d WHERE d.session_id=? AND d.tag=m.tag)",
        (session_id, base, session_id),
    )
    cur.execute("DELETE FROM carry_drop WHERE session_id=?", (session_id,))
    return True


def fail_in(
    cur: Cursor, session_id: str, error: str, *, retriable: bool
) -> tuple[str, int, int | None] | None:
    """Mark a running session FAILED and drop the match rows staged for it, in the
    caller's transaction; its (peer, epoch, the generation of pair runs it staged,
    if any: `record_staging`), or None where it was not running."""
    changed = cur.execute(
        "UPDATE sessions SET state='FAILED', error=?, finished_at=?, retriable=? "
        "WHERE session_id=? AND state='RUNNING'",
        (error, utcnow(), int(retriable), session_id),
    ).rowcount
    if not changed:
        return None
    cur.execute("DELETE FROM matches WHERE session_id=?", (session_id,))
    staged = staging_of(cur.connection, session_id)
    assert staged is not None  # (its row was just updated)
    return staged


def staging_of(conn: Connection, session_id: str) -> tuple[str, int, int | None] | None:
    """A session's (peer, epoch, generation of pair runs it staged; None: none);
    None where there is no such session."""
    row = conn.execute(
        "SELECT peer, epoch, staged_gen FROM sessions WHERE session_id=?", (session_id,)
    ).fetchone()
    if row is None:
        return None
    peer, epoch, gen = row
    return str(peer), int(epoch), None if gen is None else int(gen)


def running_stagings(conn: Connection, peer: str, epoch: int) -> list[int]:
    """The generations of pair runs that running sessions of the pair stage: a new
    staging of the pair leaves them (`runs.new_generation`), so that a replica that
    believes it holds the pair's lock when another has it never drops that one's
    (each is dropped when its session fails, or made current when it commits)."""
    return [
        int(g)
        for (g,) in conn.execute(
            "SELECT staged_gen FROM sessions WHERE peer=? AND epoch=? AND state='RUNNING' "
            "AND staged_gen IS NOT NULL",
            (peer, epoch),
        )
    ]


def record_staging(cur: Cursor, session_id: str, gen: int) -> bool:
    """Record, in the caller's transaction, that a running session stages the pair's
    runs under generation `gen`, so that its failure drops that generation and no
    other (`Store.fail_session`); False: the session is not running (it failed
    meanwhile), and must stage nothing."""
    return bool(
        cur.execute(
            "UPDATE sessions SET staged_gen=? WHERE session_id=? AND state='RUNNING'",
            (gen, session_id),
        ).rowcount
    )


def erase_tags(cur: Cursor, epoch: int) -> int:
    """Erase the match tags of an epoch's sessions (in the caller's transaction);
    returns how many."""
    return int(
        cur.execute(
            "UPDATE matches SET tag=? WHERE length(tag) > 0 AND session_id IN "
            "(SELECT session_id FROM sessions WHERE epoch=?)",
            (b"", epoch),
        ).rowcount
    )


class Sessions:
    """The sessions and their match rows. A session's commit and failure, which also
    write pair state and the audit log, are the store's (`Store.complete_session`,
    `Store.fail_session`): they use this room's cursor functions."""

    def __init__(self, db: Database, owner: str = "") -> None:
        self._db = db
        self._owner = owner

    @storage_errors
    def begin(
        self, session_id: str, peer: str, role: str, mode: int, purpose: str, epoch: int
    ) -> None:
        self._db.write(
            "INSERT INTO sessions (session_id, peer, role, mode, purpose, epoch, state, "
            "started_at, owner) VALUES (?,?,?,?,?,?, 'RUNNING', ?, ?)",
            (session_id, peer, role, mode, purpose, epoch, utcnow(), self._owner),
        )

    @storage_errors
    def stage_matches(self, session_id: str, matches: list[MatchRow]) -> bool:
        """Write some of a running session's match rows ahead of its commit, as they
        are found (in batches: a registry's matches are never all in memory). Read
        only once the session is COMPLETED; a failure deletes them. False (nothing
        written) where the session is no longer running."""
        with self._db.transaction(staging=True) as cur:
            return stage_in(cur, session_id, matches)

    @storage_errors
    def carry_matches(self, session_id: str, base: str, drop: Iterable[bytes]) -> int | None:
        """Carry a completed session's match rows over to a running one, but for the
        rows of the tags in `drop` (`carry_in`): what an incremental run keeps of
        the result before it. Returns how many distinct records the running
        session's rows now name; None (nothing written) where it is no longer
        running. Raises `RetryLater` (nothing written; the session fails, and a new
        one plans from the pair's state as it is) where `base` is not the completed
        session whose rows are the pair's result now: they would be another state's."""
        with self._db.transaction(staging=True) as cur:
            done = cur.execute(
                "SELECT 1 FROM sessions b "
                "JOIN sessions s ON s.peer=b.peer AND s.epoch=b.epoch "
                "JOIN pair_sync p ON p.peer=s.peer AND p.epoch=s.epoch "
                "AND p.session_id=b.session_id "
                "WHERE b.session_id=? AND b.state='COMPLETED' AND s.session_id=?",
                (base, session_id),
            ).fetchone()
            if done is None:
                raise RetryLater(
                    "another session of this pair replaced the result this run would "
                    "keep rows of; run the reconciliation again"
                )
            if not carry_in(cur, session_id, base, drop):
                return None
            row = cur.execute(
                # (off the (session_id, record_id) index, with no temporary b-tree)
                "SELECT COUNT(*) FROM (SELECT DISTINCT record_id FROM matches "
                "WHERE session_id=?) AS d",
                (session_id,),
            ).fetchone()
            return int(row[0])

    @storage_errors
    def set_answer(self, session_id: str, answer: bytes) -> None:
        """Keep the responder's answer to Conclude, for a repeat after a restart."""
        self._db.write("UPDATE sessions SET answer=? WHERE session_id=?", (answer, session_id))

    def get(self, session_id: str) -> SessionRow | None:
        row = self._db.fetchone("SELECT * FROM sessions WHERE session_id=?", (session_id,))
        return SessionRow(*row) if row else None

    def is_completed(self, session_id: str) -> bool:
        row = self._db.fetchone(
            "SELECT 1 FROM sessions WHERE session_id=? AND state='COMPLETED'", (session_id,)
        )
        return row is not None

    def running(self) -> list[SessionRow]:
        rows = self._db.fetchall("SELECT * FROM sessions WHERE state='RUNNING'")
        return [SessionRow(*r) for r in rows]

    def any_running(self) -> bool:
        """Whether a session is running over this store (any replica's)."""
        return self._db.fetchone("SELECT 1 FROM sessions WHERE state='RUNNING' LIMIT 1") is not None

    def all(self) -> list[SessionRow]:
        rows = self._db.fetchall("SELECT * FROM sessions ORDER BY started_at")
        return [SessionRow(*r) for r in rows]

    def latest_completed(self) -> list[SessionRow]:
        """The latest completed session with each peer."""
        latest: dict[str, SessionRow] = {}
        for s in self.all():
            if s.state == "COMPLETED":
                latest[s.peer] = s
        return list(latest.values())

    def matches(self, session_id: str, record_id: str | None = None) -> Iterator[MatchRow]:
        rows = self._db.fetchall(
            "SELECT record_id, programme, status, peer_programme, peer_status, tag "
            "FROM matches WHERE session_id=? AND (CAST(? AS TEXT) IS NULL OR record_id=?) "
            "AND ? IN (SELECT session_id FROM sessions WHERE state='COMPLETED') "
            "ORDER BY record_id, peer_programme, peer_status",
            (session_id, record_id, record_id, session_id),
        )
        for rid, p, s, pp, ps, tag in rows:
            yield MatchRow(rid, Label(p, s), Label(pp, ps), bytes(tag))

    def match_holders(self, session_id: str) -> dict[str, str]:
        """For each record matched in a session and still in the registry, a key of
        the person holding it: the lowest record id among the records with the same
        identity number. Records of one person share the key; it is a record id,
        never the ID number, so the number does not leave the database."""
        rows = self._db.fetchall(
            "SELECT DISTINCT m.record_id, (SELECT MIN(o.record_id) FROM records o "
            "WHERE o.nid = r.nid) FROM matches m JOIN records r "
            "ON r.record_id = m.record_id WHERE m.session_id=?",
            (session_id,),
        )
        return {str(rid): str(holder) for rid, holder in rows}

    def matched_tags(self, session_id: str) -> list[bytes]:
        rows = self._db.fetchall(
            "SELECT DISTINCT tag FROM matches WHERE session_id=? AND ? IN "
            "(SELECT session_id FROM sessions WHERE state='COMPLETED')",
            (session_id, session_id),
        )
        return [bytes(r[0]) for r in rows]
