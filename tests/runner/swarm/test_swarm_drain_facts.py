"""Facts of Swarm 20.10 the drain and SIGTERM paths rely on (runner/backends/swarm_notes.md, "Draining a
node"), pinned on the fixture's real swarm with the tiny image: a paused node keeps its task
running; a drained node's task of a service with restart condition ``none`` turns to desired
state ``shutdown`` while it still runs through its stop grace period (the SIGTERM window); and
whether Swarm places a replacement task elsewhere."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from docker.types import ContainerSpec, Placement, RestartPolicy, TaskTemplate

from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.swarm import Swarm, SwarmRegistry, set_availability
from tests.fixtures.swarm_envctl import NODE_LABEL

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

GRACE = 8.0


@pytest.fixture
def manager(manager: Any) -> Iterator[Any]:
    """The module's client of the manager (tests/fixtures/swarm.py); after each test the services
    it made are removed and every node is active again."""
    client = manager
    made: list[str] = []
    client.made = made  # type: ignore[attr-defined]
    yield client
    for sid in made:
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_service(sid)
    for n in client.api.nodes():
        if n["Spec"].get("Availability") != "active":
            set_availability(client, n["Description"]["Hostname"], "active")


def service_on(manager: Any, image: str, constraint: str) -> tuple[str, str]:
    """A service like a runtime's: one replica, restart none, a process that ignores SIGTERM;
    its id and the hostname of the node its task runs on."""
    spec = ContainerSpec(
        image, command=["/bin/sh", "-c", "trap '' TERM; sleep 300"], stop_grace_period=int(GRACE * 1e9)
    )
    template = TaskTemplate(
        spec,
        restart_policy=RestartPolicy(condition="none"),
        placement=Placement(constraints=[constraint]),
    )
    sid = manager.api.create_service(
        template, name=f"drainfact-{uuid.uuid4().hex[:6]}", labels={TEST_LABEL: TEST_SESSION}
    )["ID"]
    manager.made.append(sid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tasks = manager.api.tasks(filters={"service": sid})
        if tasks and tasks[0]["Status"]["State"] == "running":
            return str(sid), manager.api.inspect_node(tasks[0]["NodeID"])["Description"]["Hostname"]
        time.sleep(0.2)
    raise AssertionError(f"the service did not run: {manager.api.tasks(filters={'service': sid})}")


@pytest.mark.parametrize("constraint", [f"node.labels.{NODE_LABEL}==worker1", "node.role==worker"])
def test_a_paused_node_keeps_its_task_and_a_drained_one_stops_it_through_its_grace_period(
    swarm: Swarm, swarm_registry: SwarmRegistry, manager: Any, constraint: str
) -> None:
    """With restart condition none no replacement task is made, even where another node fits."""
    sid, node = service_on(manager, swarm_registry.image, constraint)
    set_availability(manager, node, "pause")
    time.sleep(3)
    [task] = manager.api.tasks(filters={"service": sid})
    assert (task["Status"]["State"], task["DesiredState"]) == ("running", "running")
    began = time.monotonic()
    set_availability(manager, node, "drain")
    seen: list[tuple[float, str, str, str]] = []
    deadline = began + GRACE + 15
    while time.monotonic() < deadline:
        for t in manager.api.tasks(filters={"service": sid}):
            row = (round(time.monotonic() - began, 1), t["ID"][:6], t["DesiredState"], t["Status"]["State"])
            if not seen or row[1:] not in [s[1:] for s in seen]:
                seen.append(row)
        time.sleep(0.2)
    print("\n" + "\n".join(str(s) for s in seen))
    mine = [s for s in seen if s[1] == task["ID"][:6]]
    stopping = [s for s in mine if s[2] == "shutdown" and s[3] == "running"]
    assert stopping and stopping[0][0] < 3, seen  # desired shutdown at once, still running
    ended = [s for s in mine if s[3] in ("shutdown", "complete", "failed")]
    assert ended and ended[0][0] >= GRACE - 1, seen  # it ran through the grace period
    others = {s[1] for s in seen} - {task["ID"][:6]}
    assert others == set(), seen
