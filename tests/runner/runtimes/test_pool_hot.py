"""The hot pool's choice (runner/runtimes/pool_hot.py ``choose``), a pure function: the most
booted first, within the budget, nothing under the threshold, configured keys left alone."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from envs.kit.db import Database
from runner.models import Runtime
from runner.runtimes.pool_hot import (
    BOOTS_PER_EXTRA,
    MAX_HOT_PER_ENTRY,
    MIN_BOOTS,
    WINDOW,
    Hot,
    boots_since,
    choose,
    why,
)
from runner.runtimes.states import State
from runner.service import RunnerService
from tests.runner.conftest import seed

G = 1024**3
MEMORY = {"small": 2 * G, "medium": 4 * G}


def test_the_most_booted_are_kept_warm_first_until_the_budget_is_used() -> None:
    boots = {(1, "small"): 5, (2, "small"): 9, (3, "small"): 3}
    assert choose(boots, MEMORY, 4 * G, frozenset()) == [Hot(2, "small", 9, 1), Hot(1, "small", 5, 1)]
    assert choose(boots, MEMORY, 3 * G, frozenset()) == [Hot(2, "small", 9, 1)]  # less than two: one
    assert choose(boots, MEMORY, 1 * G, frozenset()) == []
    assert choose(boots, MEMORY, 0, frozenset()) == []


def test_a_machine_type_too_big_for_what_is_left_is_passed_over_for_a_smaller_one() -> None:
    boots = {(1, "medium"): 9, (2, "small"): 5}
    assert choose(boots, MEMORY, 3 * G, frozenset()) == [Hot(2, "small", 5, 1)]
    assert choose(boots, MEMORY, 6 * G, frozenset()) == [Hot(1, "medium", 9, 1), Hot(2, "small", 5, 1)]


def test_fewer_boots_than_the_threshold_and_configured_or_unknown_keys_are_not_hot() -> None:
    boots = {(1, "small"): MIN_BOOTS - 1, (2, "small"): 7, (3, "gpu"): 8, (4, "small"): 6}
    assert choose(boots, MEMORY, 100 * G, frozenset({(2, "small")})) == [Hot(4, "small", 6, 1)]


def test_a_busy_version_gets_more_only_after_each_hot_one_has_its_first() -> None:
    busy = BOOTS_PER_EXTRA * 2  # wants three
    boots = {(1, "small"): busy, (2, "small"): MIN_BOOTS}
    assert choose(boots, MEMORY, 4 * G, frozenset()) == [Hot(1, "small", busy, 1), Hot(2, "small", MIN_BOOTS, 1)]
    assert choose(boots, MEMORY, 8 * G, frozenset()) == [Hot(1, "small", busy, 3), Hot(2, "small", MIN_BOOTS, 1)]
    huge = {(1, "small"): BOOTS_PER_EXTRA * 100}
    assert choose(huge, MEMORY, 100 * G, frozenset())[0].count == MAX_HOT_PER_ENTRY


def test_why_says_configured_or_the_boots() -> None:
    assert why(None) == "configured"
    assert why(4) == "hot: 4 boots in the last hour"


def test_a_tie_keeps_what_is_warm_already() -> None:
    boots = {(1, "small"): 3, (2, "small"): 3}
    assert choose(boots, MEMORY, 2 * G, frozenset()) == [Hot(1, "small", 3, 1)]
    assert choose(boots, MEMORY, 2 * G, frozenset(), frozenset({(2, "small")})) == [Hot(2, "small", 3, 1)]


def test_boots_are_counted_from_the_records_and_from_deleted_runtimes_on_both_databases(
    make_runner: Callable[..., RunnerService], runner_db: Database
) -> None:
    """``boots_since`` on SQLite and PostgreSQL: the booting lines of the runner's runtimes in
    the window; a deleted runtime's, kept by ``Gone`` when the lifecycle hands it over."""
    owner = seed(runner_db)
    svc = make_runner(runner_pool_hot=8 * G)
    ids = []
    for name in ("a", "b"):
        rt = svc.create(owner, name=name, environment="python3")
        svc.start(owner, rt.id)
        assert svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 20).state == State.RUNNING
        ids.append(rt.id)
    with runner_db.session() as s:
        version = s.get(Runtime, ids[0]).version_id  # type: ignore[union-attr]
        now = datetime.now(UTC)
        assert boots_since(s, svc.identity.name, now - WINDOW) == {(version, "small"): 2}
        assert boots_since(s, "another-runner", now - WINDOW) == {}
        assert boots_since(s, svc.identity.name, now + timedelta(seconds=5)) == {}
    svc.delete(owner, ids[0])
    with runner_db.session() as s:
        assert boots_since(s, svc.identity.name, now - WINDOW) == {(version, "small"): 1}
    assert svc.pool.gone.since(now - WINDOW) == {(version, "small"): 1}
    assert [(w.version, w.target.boots) for w in svc.pool.wanted()] == [("python3@1", 2)]
