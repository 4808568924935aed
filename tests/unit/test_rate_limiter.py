"""The per-peer probe limits: a per-minute bucket that refills, and a daily quota."""

from __future__ import annotations

import pytest

from ispf.errors import ResourceExhausted
from ispf_server.policy import PeerPolicy
from ispf_server.probes import RateLimiter, Taken


def test_bucket_allows_a_burst_then_refills_with_time() -> None:
    now = [0.0]
    lim = RateLimiter(clock=lambda: now[0])
    pp = PeerPolicy(
        "sindh", frozenset({"online-check"}), probes_per_minute=60, probes_per_day=10_000
    )
    lim.take("sindh", 60, pp)
    with pytest.raises(ResourceExhausted, match=r"60 per minute; retry in 1\.0 s"):
        lim.take("sindh", 1, pp)
    now[0] += 2.0  # two seconds refill two probes
    lim.take("sindh", 2, pp)
    with pytest.raises(ResourceExhausted):
        lim.take("sindh", 1, pp)
    lim.take("kp", 60, pp)  # each peer has its own bucket


def test_daily_quota_is_enforced_regardless_of_the_bucket() -> None:
    now = [0.0]
    lim = RateLimiter(clock=lambda: now[0])
    pp = PeerPolicy("sindh", frozenset(), probes_per_minute=1000, probes_per_day=5)
    lim.take("sindh", 5, pp)
    now[0] += 3600
    with pytest.raises(ResourceExhausted, match="daily probe quota of 5"):
        lim.take("sindh", 1, pp)


def test_values_given_back_cost_neither_the_bucket_nor_that_days_quota() -> None:
    """A probe taken, then refused all the same (the query budget spent), gives back
    what it took, to the day it was counted on: not to the day after, whose quota
    started anew meanwhile."""
    now = [0.0]
    lim = RateLimiter(clock=lambda: now[0])
    pp = PeerPolicy("sindh", frozenset(), probes_per_minute=4, probes_per_day=6)
    taken = lim.take("sindh", 3, pp)
    lim.give_back("sindh", 3, taken)
    lim.take("sindh", 4, pp)  # (the whole bucket again)
    with pytest.raises(ResourceExhausted, match="per minute"):
        lim.take("sindh", 1, pp)
    lim.give_back("sindh", 4, taken)
    lim.give_back("sindh", 9, taken)  # (more than taken: the bucket stays at its size)
    lim.take("sindh", 4, pp)
    with pytest.raises(ResourceExhausted, match="per minute"):
        lim.take("sindh", 1, pp)
    now[0] += 120
    lim.take("sindh", 2, pp)  # 4 + 2: the day's quota, as if nothing had come back twice
    with pytest.raises(ResourceExhausted, match="daily probe quota of 6"):
        lim.take("sindh", 1, pp)
    lim.give_back("sindh", 6, Taken("2000-01-01", now[0], 4 / 60))  # (another day's: quota kept)
    now[0] += 120
    with pytest.raises(ResourceExhausted, match="daily probe quota of 6"):
        lim.take("sindh", 1, pp)


def test_what_is_given_back_is_less_what_the_bucket_refilled_meanwhile() -> None:
    """A takes 30 of 60; 40 s pass (the bucket would refill past its size); B takes
    the 60 it holds; A's refusal gives back 29: the bucket holds no more than it
    would have had A never taken them."""
    now = [0.0]
    lim = RateLimiter(clock=lambda: now[0])
    pp = PeerPolicy("sindh", frozenset(), probes_per_minute=60, probes_per_day=10_000)
    a = lim.take("sindh", 30, pp)
    now[0] += 40
    lim.take("sindh", 60, pp)
    lim.give_back("sindh", 29, a)
    with pytest.raises(ResourceExhausted, match="per minute"):
        lim.take("sindh", 1, pp)
