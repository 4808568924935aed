"""The query budget's arithmetic: declared size, daily allowance, kept in the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from ispf.errors import BudgetExhausted, ConfigError
from ispf_server.budget import QueryBudget
from ispf_server.policy import PeerPolicy, parse_policy
from ispf_server.storage import Store


def test_allowance_grows_daily_and_survives_reopening(tmp_path: Path) -> None:
    pp = PeerPolicy("sindh", frozenset({"r"}), budget_multiple=2, budget_daily=5)
    day = ["2026-12-01"]
    store = Store(tmp_path / "s.sqlite")
    budget = QueryBudget(store, today=lambda: day[0])
    assert budget.charge(pp, 1, 20, declared=10, what="x").left == 5  # 2 x 10 + 5
    with pytest.raises(BudgetExhausted, match="20 of 25 values used, this y would add 6"):
        budget.charge(pp, 1, 6, what="y")
    budget.charge(pp, 2, 25, declared=10, what="another epoch has its own")
    store.close()
    store = Store(tmp_path / "s.sqlite")
    budget = QueryBudget(store, today=lambda: day[0])
    st = budget.state(pp, 1)
    assert (st.declared, st.used, st.allowance, st.refused) == (10, 20, 25, 1)
    day[0] = "2026-12-03"  # two days on: 5 more a day
    assert budget.state(pp, 1).allowance == 35
    assert budget.charge(pp, 1, 15, what="z").left == 0
    store.close()


def test_a_later_declaration_cannot_raise_the_epochs_budget(tmp_path: Path) -> None:
    pp = PeerPolicy("sindh", frozenset({"r"}), budget_multiple=1, budget_daily=0)
    store = Store(tmp_path / "s.sqlite")
    budget = QueryBudget(store, today=lambda: "2026-12-01")
    assert budget.charge(pp, 1, 20, declared=20, what="x").left == 0
    with pytest.raises(BudgetExhausted):
        budget.charge(pp, 1, 10, declared=999_999_999, what="a larger registry")
    with pytest.raises(BudgetExhausted):
        budget.charge(pp, 1, 10, declared=0, what="none")
    st = budget.state(pp, 1)
    assert (st.declared, st.allowance) == (20, 20)
    store.close()


def test_declared_size_is_capped_by_max_set_size() -> None:
    pp = PeerPolicy("sindh", frozenset(), max_set_size=100, budget_multiple=3, budget_daily=0)
    assert pp.budget_allowance(10**12, 1) == 300


def test_policy_bounds_parse_and_are_checked() -> None:
    text = b"""version = 1
[peers.sindh]
purposes = ["r"]
budget_multiple = 2
budget_daily = 7
min_set_size = 50
max_open_sessions = 2
session_idle_seconds = 30
"""
    pp = parse_policy(text, "p").peers["sindh"]
    assert (pp.budget_multiple, pp.budget_daily, pp.min_set_size) == (2, 7, 50)
    assert (pp.max_open_sessions, pp.session_idle_seconds) == (2, 30)
    with pytest.raises(ConfigError, match="max_open_sessions must be an integer of at least 1"):
        parse_policy(text.replace(b"max_open_sessions = 2", b"max_open_sessions = 0"), "p")


def test_each_rekey_period_brings_another_multiple() -> None:
    pp = PeerPolicy("sindh", frozenset(), budget_multiple=2, budget_daily=1, rekey_after_days=30)
    assert pp.budget_allowance(100, 1) == 200 + 1
    assert pp.budget_allowance(100, 30) == 200 + 30
    assert pp.budget_allowance(100, 31) == 400 + 31  # a second period has begun
