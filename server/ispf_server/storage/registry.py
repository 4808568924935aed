"""The registry: the node's records (with their raw ID numbers, which the store also
keeps in the change log and in the pair state, for incremental runs and checks), the
log of which IDs changed at which registry version, and the reads a session's
planning makes of them (in ID order, in batches, without an object per record).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from ispf.errors import IspfError, RetryLater
from ispf.records import Label
from ispf_server.clock import utcnow
from ispf_server.storage.db import (
    IN_BATCH,
    Cursor,
    Database,
    insert_rows,
    is_postgres,
    storage_errors,
    translate,
    upsert_sql,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    record_id  TEXT PRIMARY KEY,
    nid        TEXT NOT NULL,
    programme  TEXT NOT NULL,
    status     TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
-- By ID, covering labels and record IDs: a full run reads (nid, programme, status)
-- in ID order, and its matched records, from the index alone (3x faster at a
-- million records than through the table).
CREATE INDEX IF NOT EXISTS records_by_nid ON records(nid, programme, status, record_id);
DROP INDEX IF EXISTS records_nid;
-- Which IDs changed at which registry version: an incremental run reads only these.
CREATE TABLE IF NOT EXISTS registry_changes (
    version INTEGER NOT NULL,
    nid     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS registry_changes_version ON registry_changes(version);
"""
# Distinct IDs, read off the covering index in ID order (SQLite's COUNT(DISTINCT nid)
# builds a temporary b-tree of every ID instead: 20x slower at 1M records, under the
# store lock, and one SQLite may spill to a temporary file outside the store's folder).
DISTINCT_IDS = "SELECT COUNT(*) FROM (SELECT DISTINCT nid FROM records) AS d"
# The same, a piece of the index at a time: the next `?` distinct IDs after an ID.
DISTINCT_IDS_AFTER = (
    "SELECT COUNT(*), MAX(nid) FROM "
    "(SELECT DISTINCT nid FROM records WHERE nid > ? ORDER BY nid LIMIT ?) AS d"
)

log = logging.getLogger(__name__)

RECORD_COLUMNS = ("record_id", "nid", "programme", "status", "updated_at")

# A label's code in `Registry.nid_label_codes`: characters that are neither NUL nor a
# digit, so a code can never pass for part of an ID (a misread record shows).
_SYMBOLS = [c for c in range(1, 256) if not 0x30 <= c <= 0x39]
_SYMBOL_INDEX = {c: i for i, c in enumerate(_SYMBOLS)}
_BASE = len(_SYMBOLS)  # 245
MAX_CODED_LABELS = _BASE * _BASE - 2  # labels a coded pass tells apart (two characters)


def code_bytes(labels: int) -> int:
    """Characters (bytes once encoded as Latin-1) of each label's code in
    `Registry.nid_label_codes`, for a pass over this many labels."""
    if labels > MAX_CODED_LABELS:
        raise ValueError(f"at most {MAX_CODED_LABELS:,} labels can be coded, not {labels:,}")
    return 1 if labels <= _BASE - 2 else 2


def label_code(value: int, width: int) -> str:
    """The code of `value` (1 for "another label", i + 2 for the i-th label asked
    for) in `width` characters, none of them NUL or a digit."""
    if width == 1:
        return chr(_SYMBOLS[value])
    high, low = divmod(value, _BASE)
    return chr(_SYMBOLS[high]) + chr(_SYMBOLS[low])


def code_value(raw: int, width: int) -> int:
    """`label_code`'s value back from its bytes, read as one big-endian number."""
    if width == 1:
        return _SYMBOL_INDEX[raw]
    return _SYMBOL_INDEX[raw >> 8] * _BASE + _SYMBOL_INDEX[raw & 0xFF]


@dataclass(frozen=True, slots=True)
class StoredRecord:
    record_id: str = field(repr=False)  # (raw IDs stay out of reprs, logs and tracebacks)
    nid: str = field(repr=False)
    label: Label


@dataclass(frozen=True, slots=True)
class UpsertCounts:
    inserted: int
    updated: int
    unchanged: int


@dataclass(frozen=True)
class SyncCounts:
    before: int
    inserted: int
    updated: int
    unchanged: int
    deleted: int
    kept: int


def log_changes(cur: Cursor, nids: set[str]) -> None:
    """Bump the registry version and note which IDs changed (for incremental runs)."""
    if not nids:
        return
    cur.execute(
        "INSERT INTO meta VALUES ('registry_version', '1') ON CONFLICT(key) DO UPDATE "
        "SET value = CAST(meta.value AS INTEGER) + 1"
    )
    version = int(cur.execute("SELECT value FROM meta WHERE key='registry_version'").fetchone()[0])
    insert_rows(cur, "registry_changes", ("version", "nid"), ((version, n) for n in nids))


def _stage_copied(
    cur: Cursor, rows: list[tuple[str, str, str, str]], keep: list[tuple[str]]
) -> None:
    """PostgreSQL: a sync's batch COPYed into a table of the connection's own
    (emptied at commit), then into the staged rows, the last row of a record id
    winning, in one statement."""
    cur.execute(
        "CREATE TEMP TABLE IF NOT EXISTS sync_batch (ord BIGINT NOT NULL, "
        'record_id TEXT COLLATE "C" NOT NULL, nid TEXT COLLATE "C" NOT NULL, '
        'programme TEXT COLLATE "C" NOT NULL, status TEXT COLLATE "C" NOT NULL) '
        "ON COMMIT DELETE ROWS"
    )
    insert_rows(
        cur,
        "sync_batch",
        ("ord", "record_id", "nid", "programme", "status"),
        ((i, *r) for i, r in enumerate(rows)),
    )
    cur.execute(
        "INSERT INTO sync_rows SELECT DISTINCT ON (record_id) record_id, nid, programme, "
        "status FROM sync_batch ORDER BY record_id, ord DESC ON CONFLICT (record_id) DO UPDATE "
        "SET nid = excluded.nid, programme = excluded.programme, status = excluded.status"
    )
    if keep:
        cur.executemany("INSERT INTO sync_keep VALUES (?) ON CONFLICT DO NOTHING", keep)


def _prune(cur: Cursor, upto: int, batch: int) -> int:
    """Drop up to `batch` registry changes of versions up to `upto`; returns how many."""
    return int(
        cur.execute(
            "DELETE FROM registry_changes WHERE rowid IN (SELECT rowid FROM registry_changes "
            "WHERE version <= ? LIMIT ?)",
            (upto, batch),
        ).rowcount
    )


class Registry:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._pruning = threading.Lock()  # one pruning of registry changes at a time
        self._syncing = threading.Lock()  # one registry sync at a time
        self._counting = threading.Lock()  # one background count of distinct IDs at a time
        self._distinct: tuple[int, int] | None = None

    @storage_errors
    def upsert(self, records: Iterable[StoredRecord]) -> UpsertCounts:
        """Insert or update records by record id, all in one transaction.

        The stored rows of the batch are read with a few `IN (...)` queries, the
        rows compared here, and only the new and the changed written (one
        `executemany` each); counted as if the rows were applied one by one in
        order (a record id repeated in the batch: its first row inserts, the
        next update or leave it)."""
        ins = upd = same = 0
        now = utcnow()
        rows = [(r.record_id, r.nid, r.label.programme, r.label.status) for r in records]
        changed: set[str] = set()
        with self._db.transaction() as cur:
            stored: dict[str, tuple[str, str, str]] = {}
            ids = list(dict.fromkeys(r[0] for r in rows))
            # (PostgreSQL: one round trip, the ids as one array; SQLite: batches)
            batches = (
                [("= ANY(?)", [ids])]
                if is_postgres(cur)
                else [
                    (f"IN ({','.join('?' * len(part))})", part)
                    for part in (ids[at : at + IN_BATCH] for at in range(0, len(ids), IN_BATCH))
                ]
            )
            for where, params in batches:
                for rid, nid, prog, st in cur.execute(
                    "SELECT record_id, nid, programme, status FROM records "  # noqa: S608
                    f"WHERE record_id {where}",
                    params,
                ):
                    stored[rid] = (nid, prog, st)
            current = dict(stored)
            new_ids: set[str] = set()
            touched: set[str] = set()
            for rid, nid, prog, st in rows:
                new = (nid, prog, st)
                old = current.get(rid)
                if old is None:
                    ins += 1
                    changed.add(nid)
                    new_ids.add(rid)
                elif old != new:
                    upd += 1
                    changed.add(old[0])
                    changed.add(nid)
                    touched.add(rid)
                else:
                    same += 1
                    continue
                current[rid] = new
            if new_ids:
                insert_rows(
                    cur,
                    "records",
                    RECORD_COLUMNS,
                    [(rid, *current[rid], now) for rid in ids if rid in new_ids],
                )
            touched -= new_ids
            if touched:
                cur.executemany(
                    "UPDATE records SET nid=?, programme=?, status=?, updated_at=? "
                    "WHERE record_id=?",
                    [(*current[rid], now, rid) for rid in ids if rid in touched],
                )
            log_changes(cur, changed)
        return UpsertCounts(ins, upd, same)

    @storage_errors
    def delete(self, record_ids: Iterable[str]) -> tuple[int, list[str]]:
        deleted, missing = 0, []
        changed: set[str] = set()
        with self._db.transaction() as cur:
            for rid in record_ids:
                row = cur.execute(
                    "DELETE FROM records WHERE record_id=? RETURNING nid", (rid,)
                ).fetchone()
                if row:
                    deleted += 1
                    changed.add(row[0])
                else:
                    missing.append(rid)
            log_changes(cur, changed)
        return deleted, missing

    def sync(self) -> RegistrySync:
        """Stage a whole registry, then make the store exactly it in one transaction
        (`RegistrySync`). One at a time: a second raises `RetryLater`."""
        if not self._syncing.acquire(blocking=False):
            raise RetryLater("another registry sync is running on this node; try again after it")
        try:
            return RegistrySync(self._db, self._syncing.release)
        except BaseException:
            self._syncing.release()
            raise

    def records(self, programmes: frozenset[str] = frozenset()) -> list[StoredRecord]:
        """Records taking part in a session, ordered by ID (empty filter: all)."""
        rows = self._db.fetchall(
            "SELECT record_id, nid, programme, status FROM records ORDER BY nid, record_id"
        )
        labels: dict[tuple[str, str], Label] = {}  # one object per distinct label
        out = []
        for rid, nid, prog, st in rows:
            if programmes and prog not in programmes:
                continue
            label = labels.get((prog, st))
            if label is None:
                label = labels[(prog, st)] = Label(prog, st)
            out.append(StoredRecord(rid, nid, label))
        return out

    def stats(self) -> tuple[int, int, list[tuple[Label, int]]]:
        with self._db.reading() as conn:  # (one consistent view of the three)
            total = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            distinct = conn.execute(DISTINCT_IDS).fetchone()[0]
            labels = conn.execute(
                "SELECT programme, status, COUNT(*) FROM records GROUP BY programme, status "
                "ORDER BY programme, status"
            ).fetchall()
        return total, distinct, [(Label(p, s), n) for p, s, n in labels]

    # -- sessions -----------------------------------------------------------

    def changed_since(self, version: int) -> set[str]:
        """IDs whose records changed after a registry version."""
        rows = self._db.fetchall(
            "SELECT DISTINCT nid FROM registry_changes WHERE version > ?", (version,)
        )
        return {str(r[0]) for r in rows}

    def records_by_nids(self, nids: Iterable[str]) -> Iterator[StoredRecord]:
        """The records of these IDs (each once, however often given), in index order
        (by ID, label, record id), read from the covering index in batches, the
        store lock held per batch only."""
        wanted = sorted(set(nids))
        labels: dict[tuple[str, str], Label] = {}
        for at in range(0, len(wanted), IN_BATCH):
            part = wanted[at : at + IN_BATCH]
            marks = ",".join("?" * len(part))
            rows = self._db.fetchall(
                "SELECT record_id, nid, programme, status FROM records "  # noqa: S608
                f"WHERE nid IN ({marks}) ORDER BY nid, programme, status, record_id",
                part,
            )
            for rid, n, p, s in rows:
                label = labels.get((p, s))
                if label is None:
                    label = labels[(p, s)] = Label(p, s)
                yield StoredRecord(rid, n, label)

    def distinct_labels(self) -> list[Label]:
        rows = self._db.fetchall("SELECT DISTINCT programme, status FROM records")
        return sorted(Label(p, s) for p, s in rows)

    def nid_label_codes(self, labels: list[Label], batch: int = 500_000) -> Iterator[str]:
        """Every record as its ID followed by its label's code (`label_code`): of
        i + 2 for labels[i], of 1 for any other label; one character each where
        there are at most 243 labels, else two. Concatenated by SQLite in batches
        of about `batch` records that end on an ID boundary, so a full run's pass
        over millions makes a few strings, not a Python object per record. Only
        the store lock is held per batch, so online checks are answered in between."""
        width = code_bytes(len(labels))
        case = " ".join("WHEN programme=? AND status=? THEN ?" for _ in labels)
        codes = [
            x
            for i, lb in enumerate(labels)
            for x in (lb.programme, lb.status, label_code(i + 2, width))
        ]
        # In ID order: SQLite's group_concat follows the index it scans; PostgreSQL's
        # string_agg is told.
        pg = self._db.dialect == "postgresql"
        concat, by_nid = ("string_agg", " ORDER BY nid") if pg else ("group_concat", "")
        query = (
            f"SELECT {concat}(nid || CASE {case} ELSE ? END, ''{by_nid}) "  # noqa: S608
            "FROM records WHERE nid >= ? AND (CAST(? AS TEXT) IS NULL OR nid < ?)"
        )
        low = ""
        while True:
            with self._db.reading() as conn:
                row = conn.execute(
                    "SELECT nid FROM records WHERE nid >= ? ORDER BY nid LIMIT 1 OFFSET ?",
                    (low, batch),
                ).fetchone()
                high = None if row is None else str(row[0])
                if high == low:  # one ID with a batch of records or more: it alone
                    row = conn.execute(
                        "SELECT nid FROM records WHERE nid > ? ORDER BY nid LIMIT 1", (low,)
                    ).fetchone()
                    high = None if row is None else str(row[0])
                (text,) = conn.execute(
                    query, (*codes, label_code(1, width), low, high, high)
                ).fetchone()
            if text:
                yield str(text)
            if high is None:
                return
            low = high

    def version(self) -> int:
        row = self._db.fetchone("SELECT value FROM meta WHERE key='registry_version'")
        return int(str(row[0]) if row else 0)

    def distinct_ids(self) -> int:
        """Distinct IDs in the registry (the size a node declares in a handshake).

        Counted once; after a change the last count is answered at once and a
        recount runs in the background (a handshake, as for an online check's sync,
        must not wait for a scan of the registry). Callers declare at least the set
        they send, so a count behind by a few changes is harmless."""
        version = self.version()
        cached = self._distinct
        if cached is None:
            self._distinct = (version, self._count_distinct())
            return self._distinct[1]
        if cached[0] != version and not self._counting.locked():
            threading.Thread(target=self._recount, name="count-ids", daemon=True).start()
        return cached[1]

    COUNT_PIECE = 20_000  # distinct IDs counted per read

    def _count_distinct(self) -> int:
        """Counted a piece of the ID index per read (each about 10 ms at 1M records):
        in one read, SQLite's store lock was held for the whole scan (0.17 s at 1M,
        seconds at 10M), stalling online checks after every change. Changes made
        meanwhile may or may not be counted (as for a count made just before)."""
        total, after = 0, ""
        while True:
            row = self._db.fetchone(DISTINCT_IDS_AFTER, (after, self.COUNT_PIECE))
            n = int(row[0]) if row else 0
            total += n
            if row is None or n < self.COUNT_PIECE:
                return total
            after = str(row[1])

    def _recount(self) -> None:
        if not self._counting.acquire(blocking=False):
            return
        try:
            version = self.version()
            self._distinct = (version, self._count_distinct())
        except Exception:  # (closed meanwhile: the next handshake counts again)
            log.debug("counting distinct IDs stopped", exc_info=True)
        finally:
            self._counting.release()

    def prune_changes(self, upto: int | None, batch: int = 10_000, pause: float = 0.002) -> int:
        """Drop the registry changes of versions up to `upto` (those every pair has
        synced past: `Store.prune_changes`; None: none), a small batch per
        transaction with a pause between (the first sync after loading millions has
        millions to drop, while the session's last calls, the witnessing, and online
        checks go on). Returns how many were dropped."""
        if upto is None:
            return 0
        if not self._pruning.acquire(blocking=False):
            return 0  # another sync's pruning is at it
        dropped = 0
        try:
            while True:
                with self._db.transaction() as cur:
                    n = _prune(cur, upto, batch)
                dropped += n
                if n < batch:
                    return dropped
                time.sleep(pause)  # (the store lock is not fair: let waiting writers in)
        except Exception as exc:
            if self._db.closed:  # the store closed meanwhile (shutdown)
                return dropped
            mapped = translate(exc) if not isinstance(exc, IspfError) else exc
            if mapped is None:
                raise
            log.warning("pruning registry changes stopped: %s", mapped)  # (busy, full, gone)
            return dropped
        finally:
            self._pruning.release()


class RegistrySync:
    """A registry sync: rows staged in tables of the store itself (never in
    memory whole, never in a file outside the store, never read by sessions),
    then one transaction that inserts, updates and deletes, or nothing at all.
    Staging tables are emptied at the start and end of every sync, so one left
    by a node that died mid-sync is never applied.

    `stage(..., kept)`: record ids of rows of the file that were rejected; their
    stored records (if any) are left as they are, not deleted."""

    def __init__(self, db: Database, release: Callable[[], None]) -> None:
        self._db, self._release = db, release
        with db.transaction(staging=True) as cur:
            self._reset(cur)

    @staticmethod
    def _reset(cur: Cursor) -> None:
        # WITHOUT ROWID: the staged rows are one B-tree by record id (a rowid table
        # with a text key is two), half the work to stage and to join. A store
        # made before that has the old shape: dropped and made again (empty anyway).
        if not is_postgres(cur):
            shape = cur.execute(
                "SELECT sql FROM sqlite_master WHERE type='table' AND name='sync_rows'"
            ).fetchone()
            if shape is not None and "WITHOUT ROWID" not in str(shape[0]).upper():
                cur.execute("DROP TABLE sync_rows")
        cur.execute(
            "CREATE TABLE IF NOT EXISTS sync_rows (record_id TEXT PRIMARY KEY, "
            "nid TEXT NOT NULL, programme TEXT NOT NULL, status TEXT NOT NULL) WITHOUT ROWID"
        )
        cur.execute("CREATE TABLE IF NOT EXISTS sync_keep (record_id TEXT PRIMARY KEY)")
        # What the sync changes (`apply`): in the store too, not a TEMP table (which
        # SQLite may spill to a file outside the store's folder: these hold IDs).
        cur.execute(
            "CREATE TABLE IF NOT EXISTS sync_diff (kind INTEGER NOT NULL, "
            "rec INTEGER, record_id TEXT NOT NULL, old_nid TEXT, new_nid TEXT)"
        )
        cur.execute("DELETE FROM sync_rows")
        cur.execute("DELETE FROM sync_keep")
        cur.execute("DELETE FROM sync_diff")

    def stage(self, records: Iterable[StoredRecord], kept: Iterable[str] = ()) -> None:
        rows = [(r.record_id, r.nid, r.label.programme, r.label.status) for r in records]
        keep = [(k,) for k in kept]

        with self._db.transaction(staging=True) as cur:
            # A record id repeated in the file: the last row wins, as in a load.
            if is_postgres(cur):
                _stage_copied(cur, rows, keep)
                return
            cur.executemany(
                upsert_sql(
                    "sync_rows", ("record_id", "nid", "programme", "status"), ("record_id",)
                ),
                rows,
            )
            cur.executemany("INSERT INTO sync_keep VALUES (?) ON CONFLICT DO NOTHING", keep)

    @storage_errors
    def apply(self, decide: Callable[[SyncCounts], bool]) -> tuple[SyncCounts, bool]:
        """Count what the sync changes, ask `decide`, and apply it all if it says so.

        Counting and applying share one write transaction, so nothing can change
        between them. What differs is found once (two passes: the stored records
        absent from the file, the staged rows new or changed), noted in a
        table of the store (`sync_diff`: kind 0 gone, 1 changed, 2 new), and counted,
        logged and applied from there."""
        with self._db.transaction() as cur:

            def one(q: str) -> int:
                return int(cur.execute(q).fetchone()[0])

            # (SQLite: by rowid, its fastest key; PostgreSQL has no stable one: by record id.)
            rec = "NULL" if is_postgres(cur) else "rowid"
            rrec = "NULL" if is_postgres(cur) else "r.rowid"
            cur.execute("DELETE FROM sync_diff")
            cur.execute(
                f"INSERT INTO sync_diff SELECT 0, {rec}, record_id, nid, NULL "  # noqa: S608
                "FROM records WHERE record_id NOT IN (SELECT record_id FROM sync_rows) "
                "AND record_id NOT IN (SELECT record_id FROM sync_keep)"
            )
            cur.execute(
                "INSERT INTO sync_diff SELECT CASE WHEN r.record_id IS NULL THEN 2 ELSE 1 END, "  # noqa: S608
                f"{rrec}, s.record_id, r.nid, s.nid FROM sync_rows s "
                "LEFT JOIN records r ON r.record_id = s.record_id "
                "WHERE r.record_id IS NULL OR (r.nid, r.programme, r.status) <> "
                "(s.nid, s.programme, s.status)"
            )
            kinds = [
                int(k or 0)
                for k in cur.execute(
                    "SELECT sum(CASE WHEN kind = 0 THEN 1 ELSE 0 END), "
                    "sum(CASE WHEN kind = 1 THEN 1 ELSE 0 END), "
                    "sum(CASE WHEN kind = 2 THEN 1 ELSE 0 END) FROM sync_diff"
                ).fetchone()
            ]
            staged = one("SELECT count(*) FROM sync_rows")
            counts = SyncCounts(
                before=one("SELECT count(*) FROM records"),
                inserted=kinds[2],
                updated=kinds[1],
                unchanged=staged - kinds[2] - kinds[1],
                deleted=kinds[0],
                kept=one(
                    "SELECT count(*) FROM records WHERE record_id IN "
                    "(SELECT record_id FROM sync_keep) AND record_id NOT IN "
                    "(SELECT record_id FROM sync_rows)"
                ),
            )
            if not decide(counts):
                cur.execute("ROLLBACK")
                return counts, False
            changed = {
                str(n) for (n,) in cur.execute("SELECT old_nid FROM sync_diff WHERE kind < 2")
            }
            changed.update(
                str(n) for (n,) in cur.execute("SELECT new_nid FROM sync_diff WHERE kind > 0")
            )
            key, dkey = ("record_id", "record_id") if is_postgres(cur) else ("rowid", "rec")
            cur.execute(
                f"DELETE FROM records WHERE {key} IN "  # noqa: S608
                f"(SELECT {dkey} FROM sync_diff WHERE kind = 0)"
            )
            now = utcnow()
            cur.execute(
                "UPDATE records SET nid = s.nid, programme = s.programme, status = s.status, "  # noqa: S608
                "updated_at = ? FROM sync_diff d JOIN sync_rows s "
                f"ON s.record_id = d.record_id WHERE d.kind = 1 AND records.{key} = d.{dkey}",
                (now,),
            )
            cur.execute(
                "INSERT INTO records SELECT s.record_id, s.nid, s.programme, s.status, ? "
                "FROM sync_diff d JOIN sync_rows s ON s.record_id = d.record_id "
                "WHERE d.kind = 2",
                (now,),
            )
            cur.execute("DELETE FROM sync_diff")
            log_changes(cur, changed)
        return counts, True

    def close(self) -> None:
        try:
            with self._db.transaction(staging=True) as cur:
                self._reset(cur)
        finally:
            self._release()

    def __enter__(self) -> RegistrySync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
