"""Sessions without pair state: a count-only session's result (distinct tags both
sides hold) and a labelled one's matches, within the sort budget, with or without
the C module: what a set or dict of every tag gives (worked out here), repeated
tags included."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest

from ispf_server.records import SpooledNids, TagSpool, extsort, ops
from ispf_server.session.match import count, labelled
from ispf_server.storage.sessions import MatchRow


def spooled(directory: Path, tags: list[bytes], width: int = 16) -> TagSpool:
    out = TagSpool(directory, width)
    out.append(b"".join(tags))
    return out


@pytest.mark.parametrize("budget", [None, 16 * 7])
@pytest.mark.parametrize("module", ["native", "python"])
def test_count_common_counts_distinct_shared_tags(
    tmp_path: Path, module: str, budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if module == "python":
        monkeypatch.setattr(ops, "native", None)
    elif ops.native is None:
        pytest.skip("the native module is not built here")
    if budget is not None:  # (every side spilled in pieces of seven tags)
        monkeypatch.setattr(extsort, "BUDGET", budget)
        monkeypatch.setattr(extsort, "MIN_BLOCK", 1)
    rng = random.Random(5)
    shared = [rng.randbytes(16) for _ in range(300)]
    own = shared + [rng.randbytes(16) for _ in range(700)]
    peer = shared + [rng.randbytes(16) for _ in range(1200)]
    rng.shuffle(own)
    rng.shuffle(peer)
    common = functools.partial(count.count_common, directory=tmp_path)
    assert common(spooled(tmp_path, own), spooled(tmp_path, peer)) == 300
    # A tag repeated on either side, or both, still counts once.
    assert common(spooled(tmp_path, own + shared[:5]), spooled(tmp_path, peer)) == 300
    assert common(spooled(tmp_path, own), spooled(tmp_path, peer + shared[3:9] * 3)) == 300
    twice = own + own[:40]
    assert common(spooled(tmp_path, twice), spooled(tmp_path, peer + shared[:20])) == 300
    assert common(spooled(tmp_path, []), spooled(tmp_path, peer)) == 0
    assert list(tmp_path.iterdir()) == []  # (sorts and spools leave nothing behind)


def _row_key(m: MatchRow) -> tuple[str, str]:
    return m.record_id, repr(m)  # (its repr leaves out the record)


def _gather(into: list[MatchRow], rows: list[MatchRow]) -> bool:
    into.extend(rows)
    return True


@pytest.mark.parametrize("module", ["native", "python"])
@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("order", ["memory", "disk"])
def test_intersect_within_the_budget_equals_the_dict_result(
    tmp_path: Path, order: str, small: bool, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A labelled one-off session's matches: sorted externally and joined, named from
    the send order (in memory, or on disk as planned now) a window at a time, rows
    staged a batch at a time. The count, digest and rows a dict of every own tag
    gives (worked out here): a peer tag sent twice is two matches, each with its
    group's labels, and one leaf of the digest; an own tag held twice names its
    last position's ID."""
    if module == "python":
        monkeypatch.setattr(ops, "native", None)
    elif ops.native is None:
        pytest.skip("the native module is not built here")
    from ispf.blinding import result_digest
    from ispf.records import Label
    from ispf_server.session.plan import Plan, shuffled_plan
    from ispf_server.storage.registry import StoredRecord

    if small:
        monkeypatch.setattr(extsort, "BUDGET", 100)
        monkeypatch.setattr(extsort, "MIN_BLOCK", 1)
        monkeypatch.setattr(labelled, "WINDOW", 5)
        monkeypatch.setattr(labelled, "ROW_BATCH", 7)
    rng = random.Random(8)
    labels = [Label("BISP", "enrolled"), Label("PSER", "eligible")]
    ids = [f"35202{i:08d}".encode() for i in range(400)]
    plan = shuffled_plan(
        {
            (labels[0],): bytearray(b"".join(ids[:250])),
            (labels[1],): bytearray(b"".join(ids[250:])),
        },
        rng,
        own_records=400,
        owners=lambda nids: {
            n: [StoredRecord(f"r{n.decode()}", n.decode(), labels[0])] for n in nids
        },
    )
    if order == "disk":
        on_disk = spooled(tmp_path, list(plan.order), width=13)
        plan = Plan(plan.groups, plan.sizes, SpooledNids(on_disk), 400, plan.owners)
    own_fresh = [rng.randbytes(16) for _ in range(plan.total)]
    shared = rng.sample(range(plan.total), 90)
    peer_groups = [(labels[0],), (labels[0], labels[1]), (labels[1],)]
    peer = [own_fresh[i] for i in shared] + [rng.randbytes(16) for _ in range(300)]
    rng.shuffle(peer)
    sizes = [100, 150, len(peer) - 250]
    own_twice = list(own_fresh)
    own_twice[7] = own_twice[300]  # (two positions, one tag: the last, 300, is named)
    cases = [
        (own_fresh, []),
        (own_fresh, peer[:3]),  # three peer tags again, in the last group
        (own_fresh, peer[100:104] + peer[:2]),  # and some in two groups
        (own_twice, [own_twice[7]]),
    ]
    for own, extra in cases:
        tags = peer + extra
        sizes_now = [*sizes[:2], sizes[2] + len(extra)]
        # What a dict of every own tag gives: each peer tag ours, in the peer's order.
        index = {t: i for i, t in enumerate(own)}
        found = []
        pos = 0
        for group, size in zip(peer_groups, sizes_now, strict=True):
            for t in tags[pos : pos + size]:
                if t in index:
                    found.append((t, plan.order[index[t]], group))
            pos += size
        want_rows = [
            MatchRow(f"r{nid.decode()}", labels[0], pl, t)
            for t, nid, group in found
            for pl in group
        ]
        assert len(found) >= 90 + sum(t in index for t in extra)
        for stage in (True, False):
            staged: list[MatchRow] = []
            matcher = labelled.OneOffLabelled(
                plan,
                peer_groups,
                sizes_now,
                directory=tmp_path,
                stage_rows=functools.partial(_gather, staged) if stage else None,
            )
            got = matcher.match(spooled(tmp_path, own), spooled(tmp_path, tags)).outcome
            assert got.match_count == len(found)
            assert got.digest == result_digest([t for t, _, _ in found])
            if stage:  # rows staged as made, in batches
                assert got.matches == []
                assert got.matched_records == len({m.record_id for m in want_rows})
                rows = staged
            else:  # rows go with the commit
                assert got.staged_records is None and not staged
                rows = got.matches
            assert sorted(rows, key=_row_key) == sorted(want_rows, key=_row_key)
    assert list(tmp_path.iterdir()) == []
