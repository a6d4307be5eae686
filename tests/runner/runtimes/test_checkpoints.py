"""When a checkpoint (a periodic draft, runner/runtimes/checkpoints.py) is due: a pure decision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from runner.runtimes.checkpoints import due

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def decide(**kw: object) -> bool:
    args: dict[str, object] = {
        "last_activity_at": T0 + timedelta(seconds=5),
        "checkpointed_activity_at": T0,
        "checkpointed_at": T0,
        "now": T0 + timedelta(seconds=60),
        "interval": 30.0,
        "busy": False,
        "saving": False,
    }
    args.update(kw)
    return due(**args)  # type: ignore[arg-type]


def test_a_checkpoint_is_due_after_a_cell_once_an_interval_went_by() -> None:
    assert decide()
    assert not decide(now=T0 + timedelta(seconds=29))
    assert decide(checkpointed_at=None)  # never taken: as soon as a cell ran


def test_no_checkpoint_without_a_cell_since_the_last_one_nor_beside_a_cell_or_a_save_nor_when_off() -> None:
    assert not decide(last_activity_at=T0)  # the activity the last one covered
    assert not decide(last_activity_at=None)
    assert not decide(busy=True)
    assert not decide(saving=True)
    assert not decide(interval=0)
