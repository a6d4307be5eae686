"""A save's pause of its runtime's container, asked for before the save reaches the backend's
``save_layer`` (``RuntimeBackend.pause_for_save``): taken over by ``save_layer``, or undone when
the save fails before it; the container never stays paused."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from envs.kit.db import Database
from runner.backends.base import LABEL_MANAGED
from runner.backends.docker import DockerBackend
from runner.backends.helpers import HELPER
from runner.runtimes.states import State
from runner.saves.imageconfig import CONFIG_KEYS
from runner.saves.scans import CacheRules, SaveFilter
from runner.service import RunnerService
from runner.settings import DEFAULT_SAVE_CACHES
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.services import base_image
from tests.runner.conftest import seed

Make = Callable[..., RunnerService]


class Recorded:
    """An early pause that records what was done with it."""

    def __init__(self) -> None:
        self.asked_ns = 1
        self.undone = 0

    def undo(self) -> None:
        self.undone += 1


def _running(svc: RunnerService, owner: str) -> str:
    rt = svc.create(owner, name="paused", environment="python3")
    svc.start(owner, rt.id)
    assert svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 20).state == State.RUNNING
    svc.backend.set_files(rt.id, {"/root/work.txt": b"work"})  # type: ignore[attr-defined]
    return rt.id


def test_a_save_that_fails_before_its_layer_undoes_its_early_pause_once(make_runner: Make, runner_db: Database) -> None:
    owner = seed(runner_db)
    svc = make_runner()
    pauses: list[Recorded] = []

    def pause_for_save(state: dict[str, Any]) -> Recorded:
        pauses.append(Recorded())
        return pauses[-1]

    svc.backend.pause_for_save = pause_for_save  # type: ignore[method-assign]
    rid = _running(svc, owner)

    def unreadable(runtime_id: str) -> list[str]:
        raise RuntimeError("the secrets could not be read")

    svc.snapshots.secret_values = unreadable
    op = svc.snapshots.save(owner, "alice", rid, environment="tools")
    failed = svc.operations.wait(owner, op.id, 20)
    assert failed.status == "failed", failed
    assert len(pauses) == 1 and pauses[0].undone == 1, "the container resumes once when the save fails first"

    svc.snapshots.secret_values = lambda runtime_id: []
    op = svc.snapshots.save(owner, "alice", rid, environment="tools")
    done = svc.operations.wait(owner, op.id, 20)
    assert done.status == "succeeded", done
    # handed to the backend's save_layer, which took it over (the fake one undoes it at once)
    assert len(pauses) == 2 and pauses[1].undone == 1


def _template(docker: Any, image: str) -> dict[str, Any]:
    parent = docker.api.inspect_image(image)["Config"]
    config: dict[str, Any] = {key: parent.get(key) for key in CONFIG_KEYS}
    config["Labels"] = {TEST_LABEL: TEST_SESSION}
    return config


def _state(docker: Any, cid: str) -> dict[str, Any]:
    state: dict[str, Any] = docker.api.inspect_container(cid)["State"]
    return state


@pytest.mark.docker
@pytest.mark.parametrize("whole_files", [True, False], ids=["directories", "engine-commit"])
def test_an_early_pause_is_taken_over_by_the_save_or_undone_and_the_container_runs_again(
    docker: Any, monkeypatch: pytest.MonkeyPatch, whole_files: bool
) -> None:
    from runner.backends import saves

    if not whole_files:  # the directories cannot be used: the save commits through the engine
        monkeypatch.setattr(saves, "_whole_files", lambda: False)
    image = base_image(docker, "python3")
    backend = DockerBackend(docker, labels={TEST_LABEL: TEST_SESSION})
    container = docker.containers.create(image, ["sleep", "600"], labels={TEST_LABEL: TEST_SESSION})
    made: list[str] = []
    try:
        container.start()
        assert container.exec_run(["bash", "-c", "echo work > /root/work.txt"]).exit_code == 0
        state = {"container_id": container.id}

        undone = backend.pause_for_save(state)
        assert undone is not None
        undone.undo()
        undone.undo()  # at most once: no error for a container running again
        assert _state(docker, container.id)["Running"] and not _state(docker, container.id)["Paused"]

        early = backend.pause_for_save(state)
        assert early is not None
        saved = backend.save_layer(
            state,
            config=_template(docker, image),
            repository="envctl-test/early",
            tag=TEST_SESSION,
            version_image=image,
            observer=SaveFilter(CacheRules.of(DEFAULT_SAVE_CACHES)),
            early=early,
        )
        made.append(saved.image.id)
        if saved.resumed is not None:
            saved.resumed()
        early.undo()  # taken over by the save: nothing more to do
        assert _state(docker, container.id)["Running"] and not _state(docker, container.id)["Paused"]
        assert container.exec_run(["cat", "/root/work.txt"]).output == b"work\n"
    finally:
        backend.helpers.close()
        container.remove(force=True)
        for image_id in made:
            docker.api.remove_image(image_id, force=True)


def _helpers_on(docker: Any, image: str) -> list[dict[str, Any]]:
    """The save helpers (of this test session) made from ``image``."""
    listed: list[dict[str, Any]] = docker.api.containers(
        all=True, filters={"label": [f"{TEST_LABEL}={TEST_SESSION}"], "ancestor": image}
    )
    return [c for c in listed if (c.get("Labels") or {}).get(LABEL_MANAGED) == HELPER]


def test_the_container_runs_again_before_the_save_answers_and_the_next_saves_helper_waits_for_the_answer(
    docker: Any,
) -> None:
    """The container resumes as soon as its layer is taken away (the image's check and the
    version's record go on beside it), and the helper made ahead for its next save waits until
    the save has answered (``SavedLayer.hold``): on a small machine its start would delay it."""
    image = base_image(docker, "python3")
    backend = DockerBackend(docker, labels={TEST_LABEL: TEST_SESSION})
    container = docker.containers.create(image, ["sleep", "600"], labels={TEST_LABEL: TEST_SESSION})
    made: list[str] = []
    try:
        container.start()
        assert container.exec_run(["bash", "-c", "echo work > /root/work.txt"]).exit_code == 0
        state = {"container_id": container.id}
        saved = backend.save_layer(
            state,
            config=_template(docker, image),
            repository="envctl-test/held",
            tag=TEST_SESSION,
            version_image=image,
            observer=SaveFilter(CacheRules.of(DEFAULT_SAVE_CACHES)),
            early=backend.pause_for_save(state),
        )
        made.append(saved.image.id)
        assert saved.hold is not None and saved.resumed is not None
        answered = saved.hold()
        saved.resumed()
        assert _state(docker, container.id)["Running"] and not _state(docker, container.id)["Paused"]
        time.sleep(0.5)
        assert _helpers_on(docker, saved.image.id) == [], "the next save's helper waits for the answer"
        answered()
        deadline = time.monotonic() + 20
        while not _helpers_on(docker, saved.image.id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _helpers_on(docker, saved.image.id), "once answered, the next save's helper is made"
        assert container.exec_run(["cat", "/root/work.txt"]).output == b"work\n"
    finally:
        backend.helpers.close()
        container.remove(force=True)
        for image_id in made:
            docker.api.remove_image(image_id, force=True)
