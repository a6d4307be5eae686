"""The Swarm backend's reading of the manager's answers (runner/backends/swarm_tasks.py), with
tasks and nodes shaped as Swarm 20.10 gives them (runner/backends/swarm_notes.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from envs.kit.config import load_settings
from envs.kit.errors import InvalidInputError
from runner.backends import swarm_tasks
from runner.backends.base import Status
from runner.backends.swarm import SwarmBackend, _status
from runner.settings import MachineType, Settings

GIB = 1024**3


def node(name: str, *, cpus: int = 2, memory: int = 4 * GIB, gpus: int = 0, state: str = "ready") -> dict[str, Any]:
    generic = [{"NamedResourceSpec": {"Kind": "gpu", "Value": f"g{i}"}} for i in range(gpus)]
    return {
        "ID": f"id-{name}",
        "Spec": {"Role": "worker", "Availability": "active", "Labels": {"zone": name}},
        "Description": {
            "Hostname": name,
            "Resources": {"NanoCPUs": cpus * 10**9, "MemoryBytes": memory, "GenericResources": generic},
        },
        "Status": {"State": state, "Addr": "10.0.0.1", "Message": "heartbeat failure" if state == "down" else ""},
    }


def task(state: str, node_id: str = "", *, err: str = "", index: int = 1, gpus: int = 0, memory: int = 0) -> dict:  # type: ignore[type-arg]
    reservations: dict[str, Any] = {"NanoCPUs": 10**9, "MemoryBytes": memory}
    if gpus:
        reservations["GenericResources"] = [{"DiscreteResourceSpec": {"Kind": "gpu", "Value": gpus}}]
    return {
        "ID": f"t{index}",
        "ServiceID": "s1",
        "NodeID": node_id,
        "DesiredState": "running",
        "Version": {"Index": index},
        "Spec": {"Resources": {"Reservations": reservations}},
        "Status": {"State": state, "Message": state, "Err": err, "Timestamp": "2026-12-07T00:00:00Z"},
    }


def test_the_newest_task_counts() -> None:
    found = swarm_tasks.latest_task([task("rejected", index=3, err="No such image: x"), task("pending", index=1)])
    assert found is not None and found.state == "rejected" and found.err == "No such image: x"
    assert swarm_tasks.latest_task([]) is None


def test_a_task_on_a_down_node_is_node_lost_though_it_still_says_running() -> None:
    down = node("w1", state="down")
    status = _status(swarm_tasks.latest_task([task("running", "id-w1")]), {"id-w1": down})
    assert status.status is Status.EXITED and status.reason == "node-lost" and "heartbeat failure" in status.error
    up = _status(swarm_tasks.latest_task([task("running", "id-w1")]), {"id-w1": node("w1")})
    assert up.status is Status.RUNNING and up.node == "w1" and not up.reason
    failed = _status(swarm_tasks.latest_task([task("failed", "id-w1", err="task: non-zero exit (137)")]), {})
    assert failed.status is Status.EXITED and failed.error == "task: non-zero exit (137)" and not failed.reason


def test_the_missing_resource_is_named_memory_cpu_or_gpu() -> None:
    nodes = [node("w1"), node("w2", gpus=2)]
    err = "no suitable node (insufficient resources on 3 nodes)"
    big = MachineType("big", cpus=1, memory=64 * GIB)
    assert "memory" in swarm_tasks.missing_resource(big, "gpu", nodes, [], err)
    assert "CPU" not in swarm_tasks.missing_resource(big, "gpu", nodes, [], err).split("(swarm")[0].split(":")[0]
    wide = MachineType("wide", cpus=8, memory=GIB)
    assert "no node has the CPU" in swarm_tasks.missing_resource(wide, "gpu", nodes, [], err)
    gpus = MachineType("g", cpus=1, memory=GIB, gpus=1)
    used = [task("running", "id-w2", gpus=2, index=2)]  # both of w2's GPUs taken
    text = swarm_tasks.missing_resource(gpus, "gpu", nodes, used, err)
    assert "1 gpu" in text and "w2 has 0 free" in text
    pinned = MachineType("p", cpus=1, memory=GIB, constraints=("node.labels.zone==w9",))
    assert "placement constraints node.labels.zone==w9" in swarm_tasks.missing_resource(pinned, "gpu", nodes, [], err)
    assert "no node of the swarm is ready" in swarm_tasks.missing_resource(
        big, "gpu", [node("x", state="down")], [], err
    )


def test_nodes_view_lists_capacity_reservations_and_this_installations_runtimes() -> None:
    nodes = [node("w1"), node("w2", gpus=2)]
    tasks = [task("running", "id-w2", gpus=1, memory=GIB)]
    services = [{"ID": "s1", "Spec": {"Labels": {"envctl.runtime-id": "rt_1"}}}]
    view = {n["name"]: n for n in swarm_tasks.nodes_view(nodes, tasks, services)}
    assert view["w2"]["runtimes"] == ["rt_1"] and view["w1"]["runtimes"] == []
    assert view["w2"]["capacity"]["generic_resources"] == {"gpu": 2}
    assert view["w2"]["reserved"] == {"nano_cpus": 10**9, "memory": GIB, "generic_resources": {"gpu": 1}}
    assert swarm_tasks.nodes_view(nodes, tasks, [])[1]["runtimes"] == []  # another installation's: not shown


def test_machine_type_constraints_are_checked_when_the_configuration_is_read(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("machine_types:\n  w1: {cpus: 1, memory: 1g, constraints: ['node.labels.zone == eu']}\n")
    assert load_settings(Settings, good, env={}).machine_types["w1"].constraints == ("node.labels.zone == eu",)
    bad = tmp_path / "bad.yaml"
    bad.write_text("machine_types:\n  w1: {cpus: 1, memory: 1g, constraints: ['zone=eu; rm -rf /']}\n")
    with pytest.raises(InvalidInputError) as caught:
        load_settings(Settings, bad, env={})
    assert "machine_types.w1.constraints" in caught.value.message and "node.labels.zone==eu" in caught.value.message


def test_the_swarm_backend_needs_a_registry_its_nodes_reach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    settings = load_settings(
        Settings, None, env={"ENVCTL_DATA_DIR": str(tmp_path), "ENVCTL_SWARM_MANAGER": "unix:///nowhere.sock"}
    )
    with pytest.raises(InvalidInputError) as caught:
        SwarmBackend.from_settings(settings.with_overrides(registry="managed", registry_binary=Path("/bin/true")))
    assert "ENVCTL_SWARM_REGISTRY" in caught.value.message
    with pytest.raises(InvalidInputError) as caught:
        SwarmBackend.from_settings(settings.with_overrides(swarm_manager=""))  # and no DOCKER_HOST given
    assert "ENVCTL_SWARM_MANAGER" in caught.value.message


def test_only_the_engines_busy_secrets_mount_is_tried_again() -> None:
    from envs.kit.errors import BackendError
    from runner.backends.swarm import _transient

    busy = (
        "starting container failed: unable to remount dir as readonly: mount tmpfs:/x/mounts/secrets: "
        "device or resource busy"
    )
    assert _transient(BackendError("x", details={"swarm_error": busy}))
    assert not _transient(BackendError("x", details={"swarm_error": "No such image: r/e@sha256:00"}))
    assert not _transient(BackendError("x", details={"swarm_error": "task: non-zero exit (3)"}))
