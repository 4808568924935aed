"""A count-only session's result: distinct tags both sides hold."""

from __future__ import annotations

import random

import pytest

from ispf.hazmat.curve import native
from ispf_server.session import core


@pytest.mark.parametrize("module", ["native", "python"])
def test_count_common_counts_distinct_shared_tags(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if module == "python":
        monkeypatch.setattr(core, "native", None)
    elif native is None:
        pytest.skip("the native module is not built here")
    rng = random.Random(5)
    shared = [rng.randbytes(16) for _ in range(300)]
    own = shared + [rng.randbytes(16) for _ in range(700)]
    peer = shared + [rng.randbytes(16) for _ in range(1200)]
    rng.shuffle(own)
    rng.shuffle(peer)
    assert core.count_common(b"".join(own), b"".join(peer)) == 300
    # A tag repeated on one side still counts once (the set path takes over).
    assert core.count_common(b"".join(own + shared[:5]), b"".join(peer)) == 300
    assert core.count_common(b"", b"".join(peer)) == 0


def test_intersect_packed_equals_the_dict_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A labelled one-off session's matches: sorted and merged in C, or through a dict
    of every own tag; the same count, digest and rows, repeated tags included."""
    if native is None:
        pytest.skip("the native module is not built here")
    from ispf.records import Label
    from ispf_server.session.plan import shuffled_plan
    from ispf_server.store import StoredRecord

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
    own = [rng.randbytes(16) for _ in range(plan.total)]
    shared = rng.sample(range(plan.total), 90)
    peer_groups = [(labels[0],), (labels[0], labels[1]), (labels[1],)]
    peer = [own[i] for i in shared] + [rng.randbytes(16) for _ in range(300)]
    rng.shuffle(peer)
    sizes = [100, 150, len(peer) - 250]
    for extra in ([], peer[:3]):  # (a repeated peer tag: the dict path counts each)
        tags = peer + extra
        sizes_now = [*sizes[:2], sizes[2] + len(extra)]
        got = core.intersect(plan, b"".join(own), peer_groups, sizes_now, b"".join(tags))
        packed = core._found_packed(plan, b"".join(own), peer_groups, sizes_now, b"".join(tags))
        assert (packed is None) == bool(extra)  # (the packed path ran where it can)
        with monkeypatch.context() as m:
            m.setattr(core, "native", None)
            want = core.intersect(plan, b"".join(own), peer_groups, sizes_now, b"".join(tags))
        assert got.match_count == want.match_count == 90 + sum(t in set(own) for t in extra)
        assert got.digest == want.digest
        assert sorted(got.matches, key=repr) == sorted(want.matches, key=repr)
