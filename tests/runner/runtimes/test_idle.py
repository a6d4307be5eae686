"""The idle decision is a pure function: tested with plain datetimes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from runner.runtimes.idle import decide, effective_timeout

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_a_runtime_idle_for_less_than_the_timeout_keeps_running_and_says_when_it_stops() -> None:
    d = decide(last_activity_at=T0, last_activity="boot", now=T0 + timedelta(minutes=19), timeout=1200)
    assert not d.stop
    assert d.shutdown_at == T0 + timedelta(minutes=20)
    assert "boot" in d.reason


def test_a_runtime_idle_for_the_whole_timeout_is_stopped_with_the_last_activity_in_the_reason() -> None:
    d = decide(
        last_activity_at=T0,
        last_activity="execution finished",
        now=T0 + timedelta(minutes=20),
        timeout=1200,
    )
    assert d.stop
    assert "execution finished" in d.reason and "20 min" in d.reason


def test_a_busy_runtime_is_never_stopped_however_long_it_was_quiet() -> None:
    """R18."""
    d = decide(
        last_activity_at=T0,
        last_activity="boot",
        now=T0 + timedelta(hours=10),
        timeout=60,
        busy=True,
    )
    assert not d.stop and d.shutdown_at is None
    assert "busy" in d.reason


def test_a_save_in_progress_holds_off_the_shutdown() -> None:
    """R20."""
    d = decide(
        last_activity_at=T0,
        last_activity="boot",
        now=T0 + timedelta(hours=1),
        timeout=60,
        saving=True,
    )
    assert not d.stop and d.shutdown_at is None


def test_a_timeout_of_zero_means_never() -> None:
    d = decide(last_activity_at=T0, last_activity="boot", now=T0 + timedelta(days=30), timeout=0)
    assert not d.stop and d.shutdown_at is None


def test_the_runtime_timeout_wins_over_the_machine_type_and_the_default() -> None:
    assert effective_timeout(30, 600, 1200) == 30
    assert effective_timeout(None, 600, 1200) == 600
    assert effective_timeout(None, None, 1200) == 1200
    assert effective_timeout(0, 600, 1200) == 0
