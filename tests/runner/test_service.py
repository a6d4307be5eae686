"""The runner's rules, on the fake backend (real agent processes, no Docker)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from envs.kit.clock import utcnow
from envs.kit.db import Database
from envs.kit.errors import BackendError, TooManyRequestsError
from runner.backends.base import Change, RuntimeSpec
from runner.backends.fake import FakeBackend
from runner.channel import ping
from runner.errors import RuntimeStateError
from runner.identity import RunnerIdentity
from runner.paths import AGENT_DIR
from runner.runtimes.states import State, can_transition
from runner.service import RunnerService, RuntimeChanges
from runner.settings import DEFAULT_MACHINE_TYPES
from tests.runner.conftest import Clock, crash, identity_labels, identity_of, seed

Make = Callable[..., RunnerService]


def states_in_log(svc: RunnerService, owner: str, rid: str) -> list[str]:
    return [e.state for e in svc.log_entries(owner, rid) if e.state]


def running(svc: RunnerService, owner: str, name: str = "demo", **kw: object) -> str:
    rt = svc.create(owner, name=name, environment="python3", **kw)  # type: ignore[arg-type]
    svc.start(owner, rt.id)
    assert svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 20).state == State.RUNNING
    return rt.id


def test_a_runtime_goes_stopped_booting_running_stopping_stopped_with_each_step_logged(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    svc = make_runner()
    rid = running(svc, owner)
    svc.stop(owner, rid)
    svc.wait_for(rid, {State.STOPPED}, 10)
    assert states_in_log(svc, owner, rid) == [
        "stopped",
        "booting",
        "running",
        "stopping",
        "stopped",
    ]
    entries = svc.log_entries(owner, rid)
    assert all(e.at.tzinfo is not None and e.reason for e in entries)
    assert any(e.event == "container-created" for e in entries)


def test_booting_ends_only_when_the_agent_answers(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    svc = make_runner(FakeBackend(boot_delay=1.0), runner_name="slow")
    rt = svc.create(owner, name="slow", environment="python3")
    svc.start(owner, rt.id)
    time.sleep(0.5)
    assert svc.get(owner, rt.id).state == State.BOOTING
    done = svc.wait_for(rt.id, {State.RUNNING}, 10)
    assert done.booted_at is not None
    assert ping(svc.state_dir(rt.id) / "agent.sock")["ok"]


def test_an_agent_that_never_answers_ends_in_error_boot_timeout_and_no_container(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    backend = FakeBackend(never_answers=True)
    svc = make_runner(backend, runner_name="mute", runner_boot_timeout=1.0)
    rt = svc.create(owner, name="mute", environment="python3")
    svc.start(owner, rt.id)
    err = svc.wait_for(rt.id, {State.ERROR}, 10)
    assert err.state_reason == "boot-timeout"
    assert "did not answer" in err.state_message
    assert backend.list_owned(svc.identity) == []


def test_a_container_that_dies_while_booting_is_an_error_not_a_timeout(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    backend = FakeBackend(boot_delay=5)
    svc = make_runner(backend, runner_name="dies", runner_boot_timeout=30)
    rt = svc.create(owner, name="dies", environment="python3")
    svc.start(owner, rt.id)
    deadline = time.monotonic() + 10
    while not any(c.runtime_id == rt.id for c in backend.list_owned(svc.identity)):  # its container exists
        assert time.monotonic() < deadline, "the boot never created its container"
        time.sleep(0.02)
    backend.crash(rt.id)
    err = svc.wait_for(rt.id, {State.ERROR}, 10)
    assert err.state_reason in ("container-exited", "oom")


def test_a_backend_that_refuses_to_start_leaves_the_runtime_in_error_with_the_reason(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    svc = make_runner(FakeBackend(fail_start=True), runner_name="refuses")
    rt = svc.create(owner, name="x", environment="python3")
    svc.start(owner, rt.id)
    err = svc.wait_for(rt.id, {State.ERROR}, 10)
    assert err.state_reason == "backend-error" and "refused" in err.state_message


def test_an_errored_runtime_can_be_started_again(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    backend = FakeBackend(fail_start=True)
    svc = make_runner(backend, runner_name="flaky")
    rt = svc.create(owner, name="x", environment="python3")
    svc.start(owner, rt.id)
    svc.wait_for(rt.id, {State.ERROR}, 10)
    backend.fail_start = False
    svc.start(owner, rt.id)
    assert svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 10).state == State.RUNNING


def test_stopping_while_booting_removes_the_container_without_waiting_for_the_boot_timeout(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    backend = FakeBackend(never_answers=True)
    svc = make_runner(backend, runner_name="mute2", runner_boot_timeout=60)
    rt = svc.create(owner, name="x", environment="python3")
    svc.start(owner, rt.id)
    time.sleep(0.2)
    began = time.monotonic()
    svc.stop(owner, rt.id)
    svc.wait_for(rt.id, {State.STOPPED}, 10)
    assert time.monotonic() - began < 5
    assert backend.list_owned(svc.identity) == []


def test_settings_that_shape_the_container_cannot_change_while_it_runs(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    svc = make_runner()
    rid = running(svc, owner)
    with pytest.raises(RuntimeStateError, match="only change while the runtime is stopped"):
        svc.update(owner, rid, RuntimeChanges(machine_type="medium"))
    assert svc.get(owner, rid).machine_type == "small"
    svc.update(owner, rid, RuntimeChanges(idle_timeout=99))
    assert svc.get(owner, rid).idle_timeout == 99


def test_concurrent_starts_and_stops_follow_the_state_machine_with_one_container_at_most(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    backend = FakeBackend()
    svc = make_runner(backend, runner_name="race", runner_max_boots=50)
    rt = svc.create(owner, name="race", environment="python3")
    errors: list[Exception] = []

    def hammer(i: int) -> None:
        try:
            (svc.start if i % 2 == 0 else svc.stop)(owner, rt.id)
        except (RuntimeStateError, TooManyRequestsError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    svc.stop(owner, rt.id)
    final = svc.wait_for(rt.id, {State.STOPPED}, 20)
    assert final.state == State.STOPPED
    svc.concurrency.submit(lambda: None).result()
    time.sleep(0.3)
    assert [f for f in backend.list_owned(svc.identity) if f.runtime_id == rt.id] == []
    seq = states_in_log(svc, owner, rt.id)
    for a, b in zip(seq, seq[1:], strict=False):
        assert can_transition(State(a), State(b)), f"{a} -> {b} in {seq}"


def test_boots_beyond_the_limit_are_refused_with_429_and_retry_after(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    svc = make_runner(FakeBackend(boot_delay=2), runner_name="busy", runner_max_boots=2)
    ids = [svc.create(owner, name=f"r{i}", environment="python3").id for i in range(3)]
    svc.start(owner, ids[0])
    svc.start(owner, ids[1])
    with pytest.raises(TooManyRequestsError) as info:
        svc.start(owner, ids[2])
    assert info.value.status == 429 and info.value.retry_after >= 1
    assert svc.get(owner, ids[2]).state == State.STOPPED


# ------------------------------------------------------------------ idle shutdown


def test_idle_shutdown_stops_a_quiet_runtime_and_logs_why(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    svc = make_runner(housekeeping=True)
    rid = running(svc, owner, idle_timeout=3)
    rt = svc.get(owner, rid)
    decision = svc.idle_status(rt)
    assert decision is not None and decision.shutdown_at is not None
    assert decision.shutdown_at > utcnow() - timedelta(seconds=1)
    svc.wait_for(rid, {State.STOPPED}, 10)
    stop = next(e for e in svc.log_entries(owner, rid) if e.state == "stopping")
    assert stop.reason == "idle"
    assert stop.details["last_activity"] == "boot" and stop.details["last_activity_at"]


def test_a_runtime_with_idle_timeout_zero_is_never_shut_down(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    clock = Clock()
    svc = make_runner(clock=clock)
    rid = running(svc, owner, idle_timeout=0)
    clock.at = utcnow() + timedelta(days=30)
    assert svc.shutdown_idle() == []
    assert svc.get(owner, rid).state == State.RUNNING


@pytest.mark.parametrize("ending", ["save", "cell"])
def test_idle_shutdown_spares_a_runtime_whose_save_or_cell_ends_while_the_round_runs(
    make_runner: Make, runner_db: Database, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """R19/R20: a housekeeping round reads the running runtimes, then decides each one. A save
    or a cell that ends in between records its activity and then clears its flag; the round
    must not combine the old row with the cleared flag into "idle for long" (CI caught a
    runtime stopped at the instant its save ended)."""
    owner = seed(runner_db)
    clock = Clock()
    svc = make_runner(clock=clock)
    rid = running(svc, owner, idle_timeout=60)
    later = utcnow() + timedelta(seconds=120)
    clock.at = later  # the boot was two timeouts ago: idle, unless the end counts
    calls = {"n": 0}

    def ends_now(runtime_id: str) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:  # first asked: the work ends right now, activity first, flag after
            svc.touch(runtime_id, f"{ending} finished")
        return False

    monkeypatch.setattr(svc.housekeeping, "is_saving" if ending == "save" else "is_busy", ends_now)
    assert svc.shutdown_idle() == []
    rt = svc.get(owner, rid)
    assert rt.state == State.RUNNING and rt.last_activity == f"{ending} finished"
    monkeypatch.undo()
    clock.at = later + timedelta(seconds=61)  # one whole timeout after the end: now it stops
    assert svc.shutdown_idle() == [rid]
    svc.wait_for(rid, {State.STOPPED}, 10)


def test_a_save_that_begins_as_the_idle_round_decides_keeps_the_runtime_running(
    make_runner: Make, runner_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R20: the round has read "not saving" and an old activity and decided to stop; a save
    is accepted at that instant. The save records activity, and the stop, which applies only
    while the activity is the one it decided on, does not happen: the save is not cut off."""
    owner = seed(runner_db)
    clock = Clock()
    svc = make_runner(clock=clock)
    rid = running(svc, owner, idle_timeout=60)
    clock.at = utcnow() + timedelta(seconds=120)
    decide = svc.housekeeping.idle_status
    saves = []

    def and_a_save_begins(rt, **kw):  # type: ignore[no-untyped-def]
        decision = decide(rt, **kw)
        if kw and not saves:  # the second look, on the fresh row, just before the stop
            assert decision is not None and decision.stop
            saves.append(svc.snapshots.save(owner, "alice", rid, environment="kept"))
        return decision

    monkeypatch.setattr(svc.housekeeping, "idle_status", and_a_save_begins)
    assert svc.shutdown_idle() == []
    assert saves and svc.get(owner, rid).state == State.RUNNING
    done = svc.operations.wait(owner, saves[0].id, 20)
    assert done.status == "succeeded", done.message


class _SlowStop(FakeBackend):
    def stop(self, state, timeout=5.0):  # type: ignore[no-untyped-def]
        time.sleep(1.0)
        super().stop(state, timeout)


def test_a_cell_sent_while_its_runtime_stops_waits_for_the_stop_then_boots_it(
    make_runner: Make, runner_db: Database
) -> None:
    """A cell that arrives just as an idle shutdown (or a stop) begins is not lost or failed:
    it runs once the runtime has stopped and booted again."""
    owner = seed(runner_db)
    svc = make_runner(_SlowStop(), runner_name="slowstop")
    rid = running(svc, owner)
    svc.stop(owner, rid)
    assert svc.get(owner, rid).state == State.STOPPING
    ex = svc.executions.submit(owner, rid, code="6 * 7")
    svc.executions.wait(ex.id, 60)
    view = svc.executions.get(owner, ex.id)
    assert view.status == "ok", [o for _, o in svc.executions.outputs(ex.id)]
    assert [o for _, o in svc.executions.outputs(ex.id)][-1]["data"]["text/plain"] == "42"
    assert states_in_log(svc, owner, rid)[-4:] == ["stopping", "stopped", "booting", "running"]


def test_the_machine_type_idle_timeout_applies_when_the_runtime_has_none(
    make_runner: Make, runner_db: Database, settings
) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    types = dict(settings.machine_types)
    types["small"] = replace(types["small"], idle_timeout=5)
    owner = seed(runner_db)
    svc = make_runner(machine_types=types)
    rid = running(svc, owner)
    rt = svc.get(owner, rid)
    assert rt.last_activity_at is not None
    assert svc.idle_status(rt).shutdown_at == rt.last_activity_at + timedelta(seconds=5)  # type: ignore[union-attr]


# ------------------------------------------------------------------ reconciliation


def test_a_restarted_runner_adopts_running_runtimes_without_restarting_them(
    make_runner: Make, runner_db: Database, settings
) -> None:  # type: ignore[no-untyped-def]
    """R11: adopted, same agent, one container."""
    owner = seed(runner_db)
    first = make_runner()
    rid = running(first, owner)
    before = ping(first.state_dir(rid) / "agent.sock")
    crash(first)  # the process "dies": no stop, containers keep running
    second = make_runner()
    rt = second.get(owner, rid)
    assert rt.state == State.RUNNING
    after = ping(second.state_dir(rid) / "agent.sock")
    assert after["pid"] == before["pid"] and after["started_at"] == before["started_at"]
    assert len([f for f in FakeBackend().list_owned(second.identity) if f.runtime_id == rid]) == 1


def test_a_container_removed_while_envctl_was_down_leaves_the_runtime_in_error_with_a_reason(
    make_runner: Make, runner_db: Database, settings
) -> None:  # type: ignore[no-untyped-def]
    """R12."""
    owner = seed(runner_db)
    first = make_runner()
    rid = running(first, owner)
    crash(first)
    FakeBackend().vanish(rid)
    second = make_runner()
    rt = second.get(owner, rid)
    assert rt.state == State.ERROR and rt.state_reason == "container-vanished"
    assert rt.backend_state == {}


def test_a_container_that_died_is_an_error_found_by_housekeeping(
    make_runner: Make, runner_db: Database, settings
) -> None:  # type: ignore[no-untyped-def]
    owner = seed(runner_db)
    svc = make_runner(housekeeping=True)
    rid = running(svc, owner)
    FakeBackend().crash(rid)
    rt = svc.wait_for(rid, {State.ERROR}, 10)
    assert rt.state_reason in ("container-exited", "oom")


def orphan_spec(runtime_id: str, tmp_path: Path, owner: RunnerIdentity) -> RuntimeSpec:
    """A container of ``owner`` that no row knows (a crash between create and commit)."""
    return RuntimeSpec(
        runtime_id,
        "orphan",
        "img",
        "python3@1",
        DEFAULT_MACHINE_TYPES["small"],
        tmp_path / "o",
        AGENT_DIR,
        labels=identity_labels(owner),
    )


def test_a_labelled_container_with_no_row_is_removed_after_a_complete_listing(
    make_runner: Make, runner_db: Database, settings, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """R13."""
    me = identity_of(runner_db, settings)
    backend = FakeBackend()
    backend.start(orphan_spec("rt_orphan0000000000", tmp_path, me))
    assert [f.runtime_id for f in backend.list_owned(me)] == ["rt_orphan0000000000"]
    seed(runner_db)
    make_runner(backend)
    assert backend.list_owned(me) == []


def test_a_labelled_container_with_no_row_is_kept_while_the_backend_or_the_database_fails(
    make_runner: Make, runner_db: Database, settings, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """R13: never removed on a failed listing or a failed query; removed once both answer."""
    from envs.kit.errors import DatabaseUnavailableError
    from tests.fixtures.services import _free_port

    owner = seed(runner_db)
    first = make_runner()
    rid = running(first, owner)
    crash(first)
    orphan = "rt_orphan1111111111"
    FakeBackend().start(orphan_spec(orphan, tmp_path, first.identity))
    down = FakeBackend(unreachable=True)
    svc = make_runner(down)  # its first reconciliation cannot list
    with pytest.raises(BackendError):
        svc.reconcile()
    down.unreachable = False
    assert sorted(f.runtime_id for f in down.list_owned(svc.identity)) == sorted([rid, orphan])

    # The engine answers, the database does not: without the rows, no container is an orphan.
    answering = svc.records.db
    svc.records.db = Database(f"postgresql+psycopg://envctl@127.0.0.1:{_free_port()}/gone")  # nothing listens
    try:
        with pytest.raises(DatabaseUnavailableError):
            svc.reconcile()
    finally:
        svc.records.db.dispose()
        svc.records.db = answering
    assert sorted(f.runtime_id for f in down.list_owned(svc.identity)) == sorted([rid, orphan])

    svc.reconcile()
    assert [f.runtime_id for f in down.list_owned(svc.identity)] == [rid]
    assert svc.get(owner, rid).state == State.RUNNING


def test_nothing_is_removed_or_forgotten_while_the_backend_does_not_answer(
    make_runner: Make, runner_db: Database, settings
) -> None:  # type: ignore[no-untyped-def]
    """R14: marked with the reason, container id kept, re-adopted when the engine answers."""
    owner = seed(runner_db)
    first = make_runner()
    rid = running(first, owner)
    container = first.get(owner, rid).backend_state["container_id"]
    crash(first)
    down = FakeBackend(unreachable=True)
    second = make_runner(down)
    rt = second.get(owner, rid)
    assert rt.state == State.ERROR and rt.state_reason == "backend-unreachable"
    assert rt.backend_state["container_id"] == container  # kept for re-adoption
    with pytest.raises(BackendError):
        second.reconcile()
    # The engine answers again: the next round re-adopts the runtime, container untouched.
    down.unreachable = False
    second.reconcile()
    rt = second.get(owner, rid)
    assert rt.state == State.RUNNING and rt.state_reason == "adopted"
    assert rt.backend_state["container_id"] == container


def test_a_stop_interrupted_by_a_crash_is_finished_on_the_next_start(
    make_runner: Make, runner_db: Database, settings
) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import update

    from runner.models import Runtime

    owner = seed(runner_db)
    first = make_runner()
    rid = running(first, owner)
    crash(first)
    with runner_db.session() as s:
        s.execute(update(Runtime).where(Runtime.id == rid).values(state="stopping"))
    second = make_runner()
    assert second.get(owner, rid).state == State.STOPPED
    assert FakeBackend().list_owned(second.identity) == []


def test_a_reconcile_round_racing_a_start_never_calls_the_booting_runtime_vanished(
    make_runner: Make, runner_db: Database
) -> None:
    """CI once caught this: a housekeeping round read the row as ``booting`` right after the
    start committed, before the boot was counted in flight, found no container yet, and put the
    runtime in error as "container gone". The boot is now claimed before the state changes."""
    from runner.runtimes import reconcile

    owner = seed(runner_db)
    svc = make_runner()
    rt = svc.create(owner, name="race", environment="python3")
    rounds: list[list[reconcile.Action]] = []

    new_cancel = svc.concurrency.new_cancel

    def round_on_boot(runtime_id: str) -> threading.Event:
        """start() files the boot's cancel event after committing ``booting``: run a round there."""
        rounds.append(svc.reconciler.run())
        return new_cancel(runtime_id)

    svc.concurrency.new_cancel = round_on_boot  # type: ignore[method-assign]
    svc.start(owner, rt.id)
    assert rounds == [[]], "the round must leave a runtime whose boot is claimed alone"
    assert svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 20).state == State.RUNNING


def test_a_reconcile_plan_made_from_an_older_row_state_is_not_applied(make_runner: Make, runner_db: Database) -> None:
    """A plan that saw ``booting`` and no container must not turn a runtime that has since
    finished booting into an error."""
    from runner.runtimes import reconcile

    owner = seed(runner_db)
    svc = make_runner()
    rid = running(svc, owner)
    stale = reconcile.Action("vanished", rid, {}, seen=State.BOOTING)
    svc.reconciler.apply(stale)
    rt = svc.get(owner, rid)
    assert rt.state == State.RUNNING and rt.backend_state


def test_a_plan_that_took_a_runtimes_new_container_for_a_leftover_removes_nothing(
    make_runner: Make, runner_db: Database
) -> None:
    """Rows are read before the containers are listed: a runtime created or started in between
    owns a container that the plan calls an orphan (no row yet) or a leftover (the row said
    stopped). Looked at again before anything is removed, it is kept."""
    from runner.runtimes import reconcile

    owner = seed(runner_db)
    backend = FakeBackend()
    svc = make_runner(backend, runner_name="kept")
    rid = running(svc, owner)
    container = dict(svc.get(owner, rid).backend_state or {})
    for stale in (
        reconcile.Action("remove-orphan", rid, container),
        reconcile.Action("stop-leftover", rid, container, seen=State.STOPPED),
    ):
        svc.reconciler.apply(stale)
        assert [f.runtime_id for f in backend.list_owned(svc.identity)] == [rid], stale.kind
    assert svc.get(owner, rid).state == State.RUNNING
    assert ping(svc.state_dir(rid) / "agent.sock")["ok"]


# ------------------------------------------------------------------ unplanned exits (R33)


def test_a_container_that_exits_unasked_keeps_its_changes_as_a_draft_for_the_next_boot(
    make_runner: Make, runner_db: Database
) -> None:
    """A crash, an OOM kill, an engine restart: the exited container's changes become a draft
    before it is removed, and the next boot starts from the draft."""
    owner = seed(runner_db)
    backend = FakeBackend()
    svc = make_runner(backend)
    rid = running(svc, owner)
    backend.set_changes(rid, [Change("added", "/root/big.bin")])
    backend.crash(rid)
    svc.reconcile()
    rt = svc.get(owner, rid)
    assert rt.state == State.ERROR and rt.state_reason in ("container-exited", "oom")  # the fake kills: -9
    assert "unsaved changes were kept" in rt.state_message
    assert rt.draft_image_id and [c["path"] for c in rt.draft_changes] == ["/root/big.bin"]
    assert backend.list_owned(svc.identity) == [], "the dead container goes once its changes are kept"
    kept = [e for e in svc.log_entries(owner, rid) if e.event == "draft-kept"]
    assert kept and kept[-1].reason == rt.state_reason
    started: list[str] = []
    start = backend.start

    def recording(spec):  # type: ignore[no-untyped-def]
        started.append(spec.image)
        return start(spec)

    backend.start = recording  # type: ignore[method-assign]
    svc.start(owner, rid)
    assert svc.wait_for(rid, {State.RUNNING, State.ERROR}, 20).state == State.RUNNING
    assert started == [rt.draft_image_id]
    assert any(e.event == "restoring" for e in svc.log_entries(owner, rid))


def test_an_exited_container_whose_changes_cannot_be_kept_yet_stays_until_they_can(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    backend = FakeBackend()
    svc = make_runner(backend)
    rid = running(svc, owner)
    backend.set_changes(rid, [Change("added", "/root/work.txt")])
    backend.crash(rid)
    commit = backend.commit

    def refuses(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise BackendError("the engine refused the commit (fault injected)")

    backend.commit = refuses  # type: ignore[method-assign]
    svc.reconcile()
    rt = svc.get(owner, rid)
    assert rt.state == State.ERROR and rt.state_reason == "draft-failed"
    assert "could not be kept yet" in rt.state_message
    assert [f.runtime_id for f in backend.list_owned(svc.identity)] == [rid], "the container holds the work"
    backend.commit = commit  # type: ignore[method-assign]
    svc.reconcile()
    rt = svc.get(owner, rid)
    assert rt.state_reason in ("container-exited", "oom") and rt.draft_image_id
    assert backend.list_owned(svc.identity) == []


def test_starting_a_runtime_whose_old_container_is_still_there_keeps_its_changes_first(
    make_runner: Make, runner_db: Database
) -> None:
    """A runtime in error whose container is still on the row (its agent stopped answering) is
    started again: the old container's changes become a draft before it is replaced."""
    from sqlalchemy import update

    from runner.models import Runtime

    owner = seed(runner_db)
    backend = FakeBackend()
    svc = make_runner(backend)
    rid = running(svc, owner)
    old = dict(svc.get(owner, rid).backend_state)
    backend.set_changes(rid, [Change("added", "/root/notes.txt")])
    with runner_db.session() as s:  # as reconciliation leaves an unanswering agent's runtime
        s.execute(update(Runtime).where(Runtime.id == rid).values(state="error", state_reason="agent-unreachable"))
    svc.start(owner, rid)
    rt = svc.wait_for(rid, {State.RUNNING, State.ERROR}, 20)
    assert rt.state == State.RUNNING, rt.state_message
    assert rt.draft_image_id and [c["path"] for c in rt.draft_changes] == ["/root/notes.txt"]
    assert rt.backend_state["container_id"] != old["container_id"]
    assert [f.runtime_id for f in backend.list_owned(svc.identity)] == [rid], "the old container is gone"
    kept = [e for e in svc.log_entries(owner, rid) if e.event == "draft-kept"]
    assert kept and kept[-1].reason == "boot"


def test_cells_submitted_from_many_threads_at_once_run_in_the_order_of_their_numbers(
    make_runner: Make, runner_db: Database
) -> None:
    """R36 in one process: the number a cell gets in the database is the order it runs in
    (on PostgreSQL, submits run on threads of their own, so they truly race)."""
    owner = seed(runner_db)
    svc = make_runner()
    rid = running(svc, owner)
    first = svc.executions.submit(owner, rid, code="ran = []")
    svc.executions.wait(first.id, 20)
    views = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(10):
            view = svc.executions.submit(owner, rid, code=f"ran.append('{i}-{j}')")
            with lock:
                views.append(view)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v.seq for v in views) == list(range(2, 82))
    check = svc.executions.submit(owner, rid, code="ran")
    svc.executions.wait(check.id, 60)
    out = svc.executions.outputs(check.id)
    order = [v.code.split("'")[1] for v in sorted(views, key=lambda v: v.seq)]
    assert out[-1][1]["data"]["text/plain"] == repr(order)


def test_a_cell_for_a_runtime_missing_or_unseen_is_a_404_and_spends_no_number(
    make_runner: Make, runner_db: Database
) -> None:
    """On PostgreSQL a cell's number, its row and the COMMIT travel together, the checks made
    in SQL: a refused cell must write nothing there either."""
    from registry.users import create_user
    from runner.errors import RuntimeNotFoundError
    from runner.models import Execution, Runtime
    from runner.runtimes.store import Viewer

    owner = seed(runner_db)
    svc = make_runner()
    rid = running(svc, owner)
    with runner_db.session() as s:
        stranger = create_user(s, "stranger").id
    for who in (stranger, Viewer(stranger, teams=frozenset({"elsewhere"}))):
        with pytest.raises(RuntimeNotFoundError):
            svc.executions.submit(who, rid, code="1")
    with pytest.raises(RuntimeNotFoundError):
        svc.executions.submit(owner, "rt_missing", code="1")
    ex = svc.executions.submit(Viewer(owner, teams=frozenset({"elsewhere"})), rid, code="6 * 7")
    svc.executions.wait(ex.id, 30)
    assert ex.seq == 1 and svc.executions.get(owner, ex.id).status == "ok"
    # what the runtime's mounts hold is copied onto the cell (none: NULL)
    used = [{"type": "git", "path": "/repo", "commit": "c" * 40}]
    with runner_db.session() as s:
        rt = s.get(Runtime, rid)
        assert rt is not None
        rt.mounts_used = used
    ex2 = svc.executions.submit(owner, rid, code="1", language="python")
    svc.executions.wait(ex2.id, 30)
    assert ex2.mounts == used
    with runner_db.session() as s:
        rows = s.query(Execution.seq, Execution.submitted_by, Execution.language, Execution.code, Execution.mounts)
        assert rows.order_by(Execution.seq).all() == [
            (1, owner, "python", "6 * 7", None),
            (2, owner, "python", "1", used),
        ]
