"""Staging a full run's sorted runs as a generation, piece by piece as they are merged,
so no run is ever whole in memory."""

from __future__ import annotations

from ispf_server.storage.db import Database
from ispf_server.storage.pairs import keys
from ispf_server.storage.pairs import runs as pairruns


class RunStager:
    """A staged generation of one pair's sorted runs, each written in pieces as merged.

    The generation is not the pair's state until the session commits
    (`Store.complete_session` activates `PairDelta.staged`); a session that fails leaves
    it to be dropped by the pair's next staging. Sessions of a pair never overlap
    (the node holds a lock per peer), so one pair has one staging at a time. Each
    piece is written only while the pair's key exists (`keys.require`): an epoch
    retired meanwhile fails the staging instead of leaving parts of it behind."""

    def __init__(self, db: Database, peer: str, epoch: int) -> None:
        self.db, self.peer, self.epoch = db, peer, epoch
        self.parts: dict[str, int] = {}  # kind name -> parts its run was written in
        with db.transaction(staging=True) as cur:
            keys.require(cur, peer, epoch)
            self.gen = pairruns.new_generation(cur, peer, epoch)

    def writer(self, kind: pairruns.Kind) -> StagedRun:
        """A run written as it is merged, piece by piece (`StagedRun`)."""
        return StagedRun(self, kind)

    def done(self, labelsets: dict[str, int]) -> pairruns.Staged:
        """The generation staged, with its label sets, once every run is closed."""
        with self.db.transaction(staging=True) as cur:
            keys.require(cur, self.peer, self.epoch)
            pairruns.write_labelsets(cur, self.peer, self.epoch, self.gen, labelsets)
        return pairruns.Staged(self.gen, {k: n for k, n in self.parts.items() if n})


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
