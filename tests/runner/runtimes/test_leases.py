"""Leases (runner/runtimes/leases.py): a runtime tied to its client's heartbeat is stopped and
deleted by its own runner's housekeeping once the lease runs out, a cell or not; on SQLite and
PostgreSQL, with the runner's clock moved by the test (real agent processes, the fake engine)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from envs.kit.clock import utcnow
from envs.kit.db import Database
from envs.kit.errors import BackendError, InvalidInputError
from registry.teams import Actor, create_team
from runner.backends.fake import FakeBackend
from runner.errors import LeaseExpiredError, RuntimeNotFoundError, RuntimeStateError
from runner.runtimes import leases
from runner.runtimes.states import State
from runner.service import RunnerService, RuntimeChanges
from tests.runner.conftest import Clock, seed

Make = Callable[..., RunnerService]


def _running(svc: RunnerService, owner: str, name: str = "leased", **kw: Any) -> str:
    rt = svc.create(owner, name=name, environment="python3", **kw)
    svc.start(owner, rt.id)
    assert svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 20).state == State.RUNNING
    return rt.id


def _containers(svc: RunnerService, rid: str) -> list[Any]:
    return [c for c in FakeBackend.containers(svc.identity).values() if c.runtime_id == rid]


def _log_before_delete(svc: RunnerService) -> dict[str, list[Any]]:
    """The runner log of each runtime housekeeping deletes, read just before it goes (the
    delete takes the log with the row)."""
    seen: dict[str, list[Any]] = {}
    delete = svc.housekeeping.delete_runtime
    assert delete is not None

    def reading(owner: str, rid: str) -> None:
        seen[rid] = svc.log_entries(owner, rid)
        delete(owner, rid)

    svc.housekeeping.delete_runtime = reading
    return seen


def test_lease_lengths_are_checked_naming_the_field() -> None:
    assert leases.check_lease(5) == 5 and leases.check_lease(86400) == 86400
    for bad in (0, 4, 86401, -1, 1.5, True, "30", None):
        with pytest.raises(InvalidInputError) as err:
            leases.check_lease(bad)
        assert err.value.details["field"] == "lease" and "5 to 86400" in err.value.message


def test_a_lease_status_says_when_it_ends_and_whether_it_ran_out() -> None:
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert leases.status(None, None, None, start) is None
    st = leases.status(30, start + timedelta(seconds=30), start, start + timedelta(seconds=29))
    assert st is not None and not st.expired
    st = leases.status(30, start + timedelta(seconds=30), start, start + timedelta(seconds=30))
    assert st is not None and st.expired
    text = leases.expiry_message(st, busy=True)
    assert "lease expired at 2026-01-01T12:00:30+00:00" in text and "last heartbeat at 2026-01-01T12:00:00" in text
    assert "a cell does not keep it" in text


def test_a_runtime_whose_lease_ran_out_is_stopped_and_deleted_though_a_cell_runs(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    clock = Clock()
    svc = make_runner(clock=clock)
    rid = _running(svc, owner, lease=30)
    assert len(_containers(svc, rid)) == 1
    ex = svc.executions.submit(owner, rid, code="import time; time.sleep(600)")
    deadline = time.monotonic() + 10
    while not svc.is_busy(rid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert svc.is_busy(rid)
    seen = _log_before_delete(svc)
    expires = svc.get(owner, rid).lease_expires_at
    assert expires is not None
    clock.at = expires - timedelta(seconds=1)
    assert svc.end_leases() == []  # not yet
    clock.at = expires + timedelta(seconds=1)
    assert svc.end_leases() == [rid]
    with pytest.raises(RuntimeNotFoundError):
        svc.get(owner, rid)
    assert _containers(svc, rid) == []
    entry = next(e for e in seen[rid] if e.event == "lease-expired")
    assert entry.reason == "lease-expired"
    assert "lease expired at" in entry.message and "last heartbeat at" in entry.message
    assert "a cell was running" in entry.message and entry.details["busy"] is True
    assert entry.details["lease_seconds"] == 30 and entry.details["last_heartbeat_at"]
    assert ex.id  # the cell was real; it ended with the runtime


def test_renewals_keep_it_and_a_lease_that_ran_out_cannot_be_renewed_or_changed(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    clock = Clock()
    svc = make_runner(clock=clock)
    rt = svc.create(owner, name="kept", environment="python3", lease=30)  # stopped: a lease holds all the same
    start = utcnow()
    for step in (20, 40, 60):
        clock.at = start + timedelta(seconds=step)
        renewed = svc.renew_lease(owner, rt.id)
        assert renewed.lease_expires_at == clock.at + timedelta(seconds=30)
        assert renewed.lease_renewed_at == clock.at
        assert svc.end_leases() == []
    clock.at = start + timedelta(seconds=91)
    with pytest.raises(LeaseExpiredError, match="lease expired at .* being stopped and deleted"):
        svc.renew_lease(owner, rt.id)
    with pytest.raises(LeaseExpiredError):
        svc.update(owner, rt.id, RuntimeChanges(clear_lease=True))
    with pytest.raises(LeaseExpiredError):
        svc.update(owner, rt.id, RuntimeChanges(lease=600))
    assert svc.end_leases() == [rt.id]
    with pytest.raises(RuntimeNotFoundError):
        svc.renew_lease(owner, rt.id)


def test_a_dropped_lease_leaves_the_runtime_and_a_runtime_without_one_is_never_ended(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    clock = Clock()
    svc = make_runner(clock=clock)
    plain = _running(svc, owner, name="plain")
    with pytest.raises(RuntimeStateError, match="no lease to renew"):
        svc.renew_lease(owner, plain)
    rid = _running(svc, owner, lease=10)
    dropped = svc.update(owner, rid, RuntimeChanges(clear_lease=True))
    assert (dropped.lease_seconds, dropped.lease_expires_at, dropped.lease_renewed_at) == (None, None, None)
    clock.at = utcnow() + timedelta(days=2)
    assert svc.end_leases() == []
    assert svc.get(owner, rid).state == State.RUNNING and len(_containers(svc, rid)) == 1
    clock.at = None
    again = svc.update(owner, rid, RuntimeChanges(lease=60))
    assert again.lease_seconds == 60 and again.lease_expires_at is not None
    assert again.lease_expires_at > utcnow() + timedelta(seconds=55)


def test_a_team_runtime_takes_no_lease(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    with runner_db.session() as s:
        create_team(s, "acme", Actor(owner))
    svc = make_runner()
    with pytest.raises(InvalidInputError, match="shared with its members") as err:
        svc.create(owner, name="shared", environment="python3", team="acme", lease=30)
    assert err.value.details["field"] == "lease"
    rt = svc.create(owner, name="shared", environment="python3", team="acme")
    with pytest.raises(InvalidInputError, match="shared with its members"):
        svc.update(owner, rt.id, RuntimeChanges(lease=30))


def test_only_the_owning_runner_ends_a_runtime_whose_lease_ran_out(make_runner: Make, runner_db: Database) -> None:
    """Several runners on one database: another runner's housekeeping never touches it."""
    owner = seed(runner_db)
    clock = Clock()
    mine = make_runner(clock=clock, runner_name="lease-owner")
    other = make_runner(clock=clock, runner_name="lease-other")
    rid = _running(mine, owner, lease=10)
    clock.at = utcnow() + timedelta(seconds=11)
    assert other.end_leases() == []
    assert mine.get(owner, rid).state == State.RUNNING
    assert mine.end_leases() == [rid]
    with pytest.raises(RuntimeNotFoundError):
        other.get(owner, rid)


def test_the_housekeeping_loop_ends_an_expired_lease_on_its_own(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    svc = make_runner(housekeeping=True, runner_idle_check_interval=0.2)
    rid = _running(svc, owner, lease=5)
    deadline = time.monotonic() + 5 + 0.2 + 10
    while time.monotonic() < deadline:
        try:
            svc.get(owner, rid)
        except RuntimeNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the runtime outlived its lease")
    assert _containers(svc, rid) == []


def test_a_delete_that_fails_is_tried_again_each_round_and_logged_once(
    make_runner: Make, runner_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine refusing the stop (a fault made by hand: the fake has no such switch) leaves
    the runtime for the next round; its runner log says "lease expired" once, not per round."""
    owner = seed(runner_db)
    clock = Clock()
    svc = make_runner(clock=clock)
    rid = _running(svc, owner, lease=10)
    real_stop = svc.backend.stop

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise BackendError("the engine did not answer")

    monkeypatch.setattr(svc.backend, "stop", refuse)
    clock.at = utcnow() + timedelta(seconds=11)
    for _ in range(3):
        assert svc.end_leases() == [rid]
        assert svc.get(owner, rid).id == rid  # still there
    assert [e.event for e in svc.log_entries(owner, rid)].count("lease-expired") == 1
    monkeypatch.setattr(svc.backend, "stop", real_stop)
    assert svc.end_leases() == [rid]
    with pytest.raises(RuntimeNotFoundError):
        svc.get(owner, rid)
    assert _containers(svc, rid) == []
