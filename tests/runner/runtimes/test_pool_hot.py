"""The hot pool's choice (runner/runtimes/pool_hot.py ``choose``), a pure function: the most
booted first, within the budget, nothing under the threshold, configured keys left alone."""

from __future__ import annotations

from runner.runtimes.pool_hot import BOOTS_PER_EXTRA, MAX_HOT_PER_ENTRY, MIN_BOOTS, Hot, choose, why

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
