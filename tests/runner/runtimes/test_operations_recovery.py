"""Operations left unfinished by a crash of envctl are ended when its runner starts again (R15):
a save that recorded its version is done; any other is failed as interrupted, and the images it
made without recording them are removed, so nothing half-made stays."""

from __future__ import annotations

from collections.abc import Callable

from envs.kit.db import Database
from envs.service import NewVersion, Writer, register_version
from runner.backends.fake import FakeBackend
from runner.models import Operation
from runner.service import RunnerService
from tests.runner.conftest import crash, seed
from tests.runner.test_service import running

Make = Callable[..., RunnerService]


def _crashed_save(svc: RunnerService, owner: str, rid: str, *, recorded: bool) -> tuple[str, str]:
    """What a save leaves when envctl dies after the snapshot (and, if ``recorded``, after the
    version was written): a running operation and its image."""
    op = svc.operations.create(owner, "save", "saving saver as mine", runtime_id=rid)
    rt = svc.get(owner, rid)
    svc.operations.set_pending(op.id, ["envctl/mine:v1-test"])
    image = svc.backend.commit(dict(rt.backend_state), config={}, repository="envctl/mine", tag="v1-test")
    svc.operations.set_pending(op.id, ["envctl/mine:v1-test", image])
    if recorded:
        with svc.db.session() as s:
            register_version(s, NewVersion(environment="mine", image_id=image, image_ref="envctl/mine:v1-test"))
    FakeBackend.containers(svc.identity)[rt.backend_state["container_id"]].paused = True  # as the save left it
    crash(svc)  # the process is gone: nothing of it finishes the operation
    return op.id, image


def _op(db: Database, op_id: str) -> Operation:
    with db.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        return op


def test_a_save_cut_off_before_its_version_was_recorded_is_failed_and_its_image_removed(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    first = make_runner()
    rid = running(first, owner, "saver")
    op_id, image = _crashed_save(first, owner, rid, recorded=False)
    assert FakeBackend().image_info(image) is not None

    make_runner()  # envctl starts again
    op = _op(runner_db, op_id)
    assert op.status == "failed" and op.finished_at is not None
    assert op.error is not None and op.error["code"] == "interrupted"
    assert "run it again" in op.message
    assert FakeBackend().image_info(image) is None, "the half-made snapshot must go"
    events = [(e.event, e.reason) for e in first.log_entries(owner, rid)]
    assert ("save-failed", "interrupted") in events, "the runtime's log says what happened to its save"
    container = FakeBackend.containers(first.identity)[first.get(owner, rid).backend_state["container_id"]]
    assert container.paused is False, "the container the save paused runs again"


def test_a_save_cut_off_after_recording_its_version_is_marked_done(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    first = make_runner()
    rid = running(first, owner, "saver")
    op_id, image = _crashed_save(first, owner, rid, recorded=True)

    make_runner()
    op = _op(runner_db, op_id)
    assert op.status == "succeeded" and op.result["version"] == "mine@1" and op.result["image_id"] == image
    assert FakeBackend().image_info(image) is not None, "a recorded version's image stays"


def test_another_runners_operations_are_left_alone(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    first = make_runner()
    rid = running(first, owner, "saver")
    op_id, image = _crashed_save(first, owner, rid, recorded=False)

    make_runner(runner_name=first.runner + "-other")  # a second envctl on the same database
    assert _op(runner_db, op_id).status == "running"
    assert FakeBackend().image_info(image) is not None


def test_finished_operations_are_not_touched_again(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    first = make_runner()
    done = first.operations.create(owner, "build", "reused", finished=True)
    crash(first)
    make_runner()
    op = _op(runner_db, done.id)
    assert op.status == "succeeded" and op.error is None


def test_a_save_that_fails_after_its_snapshot_removes_the_snapshot(make_runner: Make, runner_db: Database) -> None:
    """A save refused when it comes to record its version (here: the environment became
    someone else's meanwhile) leaves no image behind."""
    from registry.users import create_user

    owner = seed(runner_db)
    svc = make_runner()
    rid = running(svc, owner, "saver")
    backend = FakeBackend()
    made: list[str] = []
    commit = backend.commit

    def commit_then_lose_the_name(state, **kw):  # type: ignore[no-untyped-def]
        image = commit(state, **kw)
        made.append(image)
        with svc.db.session() as s:  # another user takes the name between snapshot and record
            other = create_user(s, "mallory")
            register_version(
                s,
                NewVersion(environment="contested", image_id="sha256:" + "e" * 64, image_ref="x"),
                writer=Writer(other.id),
            )
        return image

    svc.backend.commit = commit_then_lose_the_name  # type: ignore[method-assign]
    op = svc.snapshots.save(owner, "alice", rid, environment="contested")
    done = svc.operations.wait(owner, op.id, 15)
    assert done.status == "failed" and done.error is not None and done.error["code"] == "forbidden", done.error
    assert made and backend.image_info(made[0]) is None, "the unrecorded snapshot must be removed"
