"""Staging a full run's sorted runs as a generation, piece by piece as they are merged,
so no run is ever whole in memory."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ispf.errors import SessionAborted
from ispf_server.storage import sessions
from ispf_server.storage.db import Database
from ispf_server.storage.pairs import keys
from ispf_server.storage.pairs import runs as pairruns

log = logging.getLogger(__name__)


class RunStager:
    """A staged generation of one pair's sorted runs, each written in pieces as merged.

    The generation is not the pair's state until the session commits
    (`Store.complete_session` activates `PairDelta.staged`). A session's staging is
    recorded on its row as it starts (`sessions.record_staging`; `session_id`, None
    for a compaction, which drops its own): a session that fails drops that
    generation and no other (`Store.fail_session`), a new staging of the pair
    leaves it while its session runs, and a session that has failed already
    stages nothing (`SessionAborted`). Sessions of a pair never overlap
    (the node holds a lock per peer), so one pair has one staging at a time. Each
    piece is written only while the pair's key exists (`keys.require`): an epoch
    retired meanwhile fails the staging instead of leaving parts of it behind."""

    def __init__(self, db: Database, peer: str, epoch: int, session_id: str | None) -> None:
        self.db, self.peer, self.epoch = db, peer, epoch
        self.parts: dict[str, int] = {}  # kind name -> parts its run was written in
        with db.transaction(staging=True) as cur:
            keys.require(cur, peer, epoch)
            running = sessions.running_stagings(cur.connection, peer, epoch)
            self.gen = pairruns.new_generation(cur, peer, epoch, running)
            if session_id is not None and not sessions.record_staging(cur, session_id, self.gen):
                raise SessionAborted(
                    f"session {session_id} is no longer running: its pair runs are not staged"
                )

    def writer(self, kind: pairruns.Kind) -> StagedRun:
        """A run written as it is merged, piece by piece (`StagedRun`)."""
        return StagedRun(self, kind)

    def done(self, labelsets: dict[str, int]) -> pairruns.Staged:
        """The generation staged, with its label sets, once every run is closed."""
        with self.db.transaction(staging=True) as cur:
            keys.require(cur, self.peer, self.epoch)
            pairruns.write_labelsets(cur, self.peer, self.epoch, self.gen, labelsets)
        parts = {k: n for k, n in self.parts.items() if n}
        return pairruns.Staged(self.gen, parts, len(labelsets))


class StagedRun:
    """One run of a staged generation, appended in sorted pieces as an external sort
    or a join gives them out. Pieces are gathered to FLUSH bytes of whole parts
    per transaction (each commit is a sync to disk); `close` writes the rest."""

    FLUSH = 8 << 20

    def __init__(self, stager: RunStager, kind: pairruns.Kind) -> None:
        self.stager, self.kind = stager, kind
        self.part = 0
        self._buf = bytearray()

    def append(self, data: pairruns.Run) -> None:
        self._buf += data
        if len(self._buf) >= self.FLUSH:
            step = pairruns.PART_RECORDS * self.kind.width
            self._flush(len(self._buf) - len(self._buf) % step)

    def close(self) -> None:
        self._flush(len(self._buf))
        self.stager.parts[self.kind.name] = self.part

    def _flush(self, size: int) -> None:
        if not size:
            return
        s, data = self.stager, memoryview(self._buf)[:size]
        try:
            with s.db.transaction(staging=True) as cur:
                keys.require(cur, s.peer, s.epoch)
                self.part = pairruns.write_parts(
                    cur, s.peer, s.epoch, s.gen, self.kind, self.part, data
                )
        finally:
            data.release()
        del self._buf[:size]


DROP_PARTS = 64  # parts of a generation deleted per write transaction (about 0.5 MB)


def drop_generation(
    db: Database, peer: str, epoch: int, gen: int, stopping: Callable[[], bool] = lambda: False
) -> None:
    """A generation that is not the pair's state dropped, a piece at a time: a
    compaction's own staging as it fails, or the old runs after it; a failed
    session's staging (never another's: generation numbers are not reused). Each
    piece is a short write transaction (online checks wait on SQLite's lock for a
    piece, not for a whole copy of the pair's runs), and checks the generation is
    still not the current one. It needs no pair lock: nothing reads a generation
    that is not current, and nothing stages under its number again. Stopped
    (`stopping()`, or a node killed meanwhile), it leaves the rest to the node's
    next start (`Store.sweep_pairs`) or the pair's next staging."""
    if db.closed:
        return
    try:
        _drop_generation(db, peer, epoch, gen, stopping)
    except Exception as exc:  # (left to the pair's next staging, or the next start)
        log.warning(
            "pair state with %s (epoch %d): generation %d not dropped (%s); the pair's "
            "next run or the node's next start drops it",
            peer,
            epoch,
            gen,
            type(exc).__name__,
        )


def _drop_generation(
    db: Database, peer: str, epoch: int, gen: int, stopping: Callable[[], bool]
) -> None:
    with db.reading() as conn:
        ends = conn.execute(
            "SELECT kind, max(part) FROM pair_runs WHERE peer=? AND epoch=? AND gen=? "
            "GROUP BY kind",
            (peer, epoch, gen),
        ).fetchall()
    pieces = [
        ("AND kind=? AND part >= ? AND part < ?", (str(kind), at, at + DROP_PARTS))
        for kind, last in ends
        for at in range(0, int(last) + 1, DROP_PARTS)
    ]
    for table, where, args in [
        *(("pair_runs", w, a) for w, a in pieces),
        ("pair_labelsets", "", ()),  # (last: its label sets)
    ]:
        if stopping():
            return
        with db.transaction() as cur:
            if pairruns.current(cur.connection, peer, epoch) == gen:
                return  # (never the pair's state)
            cur.execute(
                f"DELETE FROM {table} WHERE peer=? AND epoch=? AND gen=? {where}",  # noqa: S608
                (peer, epoch, gen, *args),
            )
