"""A session's result: its count and digest, and its rows, each naming one own
record the peer may learn of and one peer label (made here, and only here)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ispf.blinding import TAG_BYTES
from ispf.merkle import RootBuilder, leaf_hash
from ispf_server.storage.registry import StoredRecord
from ispf_server.storage.sessions import MatchRow

if TYPE_CHECKING:
    from ispf_server.session.plan import LabelSet
    from ispf_server.storage.pairs.state import PairDelta

ROW_BATCH = 20_000  # matches whose result rows are made (and staged) at a time
RowSink = Callable[[list[MatchRow]], bool]  # stages some result rows; False: session gone
# Carries a completed session's rows over, but for some tags (an incremental run's
# `kept.finish`); the records the rows now name, or None: the session is gone.
RowCarry = Callable[[str, set[bytes]], "int | None"]
# A match: (tag, the own ID it is the tag of, the peer's labels for it).
Found = tuple[bytes, bytes, "LabelSet"]


@dataclass(frozen=True)
class Outcome:
    match_count: int
    digest: bytes
    matches: list[MatchRow]  # the result rows, unless staged to the store as found:
    staged_records: int | None = None  # then how many records they name (a full run's)

    @property
    def matched_records(self) -> int:
        if self.staged_records is not None:
            return self.staged_records
        return len({m.record_id for m in self.matches})


NOTHING = Outcome(0, b"", [])  # what a count-only session's responder learns


@dataclass(frozen=True)
class Matched:
    """What a matcher works out: the outcome and, with pair state, the new state
    (`delta`, written on commit) and its fingerprints as this side sees them."""

    outcome: Outcome
    delta: PairDelta | None = None
    state_after: bytes = b""  # own fingerprint || peer fingerprint


def named_rows(
    found: Iterable[Found], owners: Mapping[bytes, list[StoredRecord]]
) -> list[MatchRow]:
    """A row per (own record, peer label) of each match; `owners` holds the records
    each matched ID may name (`plan.owners_of`: the policy's rule applied)."""
    rows: list[MatchRow] = []
    for tag, nid, labels in found:
        for rec in owners.get(nid, ()):
            rows.extend(MatchRow(rec.record_id, rec.label, pl, tag) for pl in labels)
    return rows


class RowBatches:
    """A session's result as its join finds it: the count and the digest, leaf by
    leaf in tag order, each distinct tag once (`found`), and the rows, a batch of
    matched IDs at a time (each ID in one batch only; `add`), staged to the store
    with `stage` (then only how many records they name is kept), else gathered for
    the commit."""

    def __init__(self, stage: RowSink | None) -> None:
        self.stage = stage
        self.gathered: list[MatchRow] = []
        self.named = 0
        self.count = 0
        self.digest = RootBuilder()
        self._last = b""  # the last tag given a leaf
        self._open = True

    def found(self, joined: bytes, width: int) -> None:
        """Matches from a join: records of `width` bytes led by their tag, in tag order
        (a tag the peer sent twice is two matches, and one leaf)."""
        self.count += len(joined) // width
        for at in range(0, len(joined), width):
            tag = joined[at : at + TAG_BYTES]
            if tag != self._last:
                self.digest.add(leaf_hash(tag))
                self._last = tag

    def add(self, rows: list[MatchRow]) -> None:
        self.named += len({r.record_id for r in rows})
        if self.stage is None:
            self.gathered += rows
        elif self._open:
            self._open = self.stage(rows)  # (False: the session failed; its rows are deleted)

    def outcome(self) -> Outcome:
        staged = None if self.stage is None else self.named
        return Outcome(self.count, self.digest.root(), self.gathered, staged)
