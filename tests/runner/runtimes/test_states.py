from __future__ import annotations

import pytest

from runner.runtimes.states import TRANSITIONS, State, can_transition, sources_of


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("stopped", "booting"),
        ("booting", "running"),
        ("running", "stopping"),
        ("stopping", "stopped"),
        ("booting", "error"),
        ("running", "error"),
        ("error", "booting"),
        ("error", "stopped"),
        ("booting", "stopping"),
    ],
)
def test_the_documented_transitions_are_allowed(src: str, dst: str) -> None:
    assert can_transition(State(src), State(dst))


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("stopped", "running"),
        ("stopped", "stopping"),
        ("running", "booting"),
        ("stopping", "running"),
        ("running", "stopped"),
    ],
)
def test_shortcuts_around_the_state_machine_are_refused(src: str, dst: str) -> None:
    assert not can_transition(State(src), State(dst))


def test_any_state_can_go_to_error() -> None:
    assert all(State.ERROR in targets for targets in TRANSITIONS.values())


def test_sources_of_is_the_inverse_of_the_table() -> None:
    for dst in State:
        assert sources_of(dst) == {s for s in State if can_transition(s, dst)}
