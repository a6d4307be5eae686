"""One contract, every backend: the fake always, Docker where an engine answers (always in CI)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from envs.kit.errors import InvalidInputError
from envs.kit.ids import new_id
from runner.backends.base import LABEL_INSTALLATION, LABEL_RUNNER, RuntimeBackend, RuntimeSpec, Status
from runner.backends.docker import DockerBackend
from runner.backends.fake import FakeBackend
from runner.channel import ping, wait_for_agent
from runner.identity import RunnerIdentity
from runner.paths import AGENT_DIR
from runner.settings import DEFAULT_MACHINE_TYPES, Settings
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.services import base_image

# Each test is its own installation; its runner shares the name of another installation's
# (as two installations on one host both default to the host name).
ME = RunnerIdentity("in_contract_" + uuid.uuid4().hex[:8], "contract-runner")
NEIGHBOUR = RunnerIdentity("in_neighbour_" + uuid.uuid4().hex[:8], "contract-runner")


@pytest.fixture(params=["fake", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest, settings: Settings) -> Iterator[tuple[RuntimeBackend, str]]:
    if request.param == "fake":
        yield FakeBackend(), "unused"
        return
    client = request.getfixturevalue("docker")
    image = base_image(client, "bash")
    b = DockerBackend(client, labels={TEST_LABEL: TEST_SESSION})
    yield b, image
    for who in (ME, NEIGHBOUR):
        for found in b.list_owned(who):
            b.stop(found.state, timeout=0)


def spec_for(tmp_path: Path, image: str, runtime_id: str | None = None, identity: RunnerIdentity = ME) -> RuntimeSpec:
    rid = runtime_id or new_id("rt")
    state_dir = tmp_path / rid
    state_dir.mkdir(parents=True, exist_ok=True)
    return RuntimeSpec(
        runtime_id=rid,
        name="contract",
        image=image,
        environment="bash@1",
        machine=DEFAULT_MACHINE_TYPES["small"],
        state_dir=state_dir,
        agent_dir=AGENT_DIR,
        labels={LABEL_INSTALLATION: identity.installation, LABEL_RUNNER: identity.name},
    )


def _agent(b: RuntimeBackend, state: dict[str, Any], spec: RuntimeSpec) -> dict[str, Any]:
    return wait_for_agent(b.socket_path(state, spec.state_dir), time.monotonic() + 30)


def test_a_started_runtime_runs_and_its_agent_answers(backend: tuple[RuntimeBackend, str], tmp_path: Path) -> None:
    b, image = backend
    spec = spec_for(tmp_path, image)
    state = b.start(spec)
    assert b.poll(state).status is Status.RUNNING
    pong = _agent(b, state, spec)
    assert pong["op"] == "pong" and pong["ok"] is True


def test_poll_on_a_missing_container_says_gone_and_does_not_raise(
    backend: tuple[RuntimeBackend, str],
) -> None:
    b, _ = backend
    assert b.poll({"container_id": "no-such-container-" + uuid.uuid4().hex}).status is Status.GONE
    assert b.poll({}).status is Status.GONE


def test_stop_is_idempotent_and_removes_the_container(backend: tuple[RuntimeBackend, str], tmp_path: Path) -> None:
    b, image = backend
    spec = spec_for(tmp_path, image)
    state = b.start(spec)
    b.stop(state, timeout=1)
    b.stop(state, timeout=1)
    b.stop({}, timeout=1)
    assert b.poll(state).status is Status.GONE
    assert spec.runtime_id not in {f.runtime_id for f in b.list_owned(ME)}


def test_list_owned_finds_each_runtime_by_its_id(backend: tuple[RuntimeBackend, str], tmp_path: Path) -> None:
    b, image = backend
    specs = [spec_for(tmp_path, image) for _ in range(2)]
    states = [b.start(s) for s in specs]
    found = {f.runtime_id: f for f in b.list_owned(ME)}
    for spec, state in zip(specs, states, strict=True):
        assert found[spec.runtime_id].state["container_id"] == state["container_id"]
        assert found[spec.runtime_id].status.status is Status.RUNNING


def test_starting_a_runtime_again_leaves_exactly_one_container(
    backend: tuple[RuntimeBackend, str], tmp_path: Path
) -> None:
    b, image = backend
    spec = spec_for(tmp_path, image)
    first = b.start(spec)
    second = b.start(spec)
    mine = [f for f in b.list_owned(ME) if f.runtime_id == spec.runtime_id]
    assert [f.state["container_id"] for f in mine] == [second["container_id"]]
    assert b.poll(first).status is Status.GONE


def test_the_agent_survives_a_new_connection_after_the_old_one_dropped(
    backend: tuple[RuntimeBackend, str], tmp_path: Path
) -> None:
    """What a runner restart looks like from the agent's side: a fresh connection, same agent."""
    b, image = backend
    spec = spec_for(tmp_path, image)
    state = b.start(spec)
    first = _agent(b, state, spec)
    again = ping(b.socket_path(state, spec.state_dir))
    assert again["pid"] == first["pid"] and again["started_at"] == first["started_at"]


def test_list_owned_never_returns_another_installations_containers_of_the_same_runner_name(
    backend: tuple[RuntimeBackend, str], tmp_path: Path
) -> None:
    """R32 at the backend: two installations on one engine, both runners named alike."""
    b, image = backend
    mine = spec_for(tmp_path, image)
    theirs = spec_for(tmp_path, image, identity=NEIGHBOUR)
    b.start(mine)
    b.start(theirs)
    assert {f.runtime_id for f in b.list_owned(ME)} == {mine.runtime_id}
    assert {f.runtime_id for f in b.list_owned(NEIGHBOUR)} == {theirs.runtime_id}
    assert not any(f.legacy for f in b.list_owned(ME))


def test_a_container_without_its_owners_identity_is_refused(
    backend: tuple[RuntimeBackend, str], tmp_path: Path
) -> None:
    b, image = backend
    spec = spec_for(tmp_path, image)
    anonymous = RuntimeSpec(**{**spec.__dict__, "labels": {}})
    with pytest.raises(InvalidInputError, match="installation and runner labels"):
        b.start(anonymous)
    assert spec.runtime_id not in {f.runtime_id for f in b.list_owned(ME)}
