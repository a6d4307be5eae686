"""The Swarm backend (issue 15 items 3 and 5) on the real three-engine swarm of
``scripts/swarm-fixture``: one ``envctl serve`` per module with ``ENVCTL_RUNNER_BACKEND=swarm``,
its managed registry listening where the nodes reach it, machine types pinned to a worker by
node label, runtimes booted, cells run, saves moved between workers, a worker's engine killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import _free_port, base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.transfer import need_registry_program
from tests.runner.test_docker_executions import new_runtime, run, text

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

NODE_LABEL = "envctl.fixture.node"
NODE_LOST_BOUND = 30.0  # seconds from a worker's engine killed to its runtimes in error (node-lost)
RM_BOUND = 20.0  # seconds until a stopped runtime's container is gone from its worker


def machine_types(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    small = {"cpus": 0.25, "memory": "256m", "pids": 256}
    return {
        "w1": {**small, "constraints": [f"node.labels.{NODE_LABEL}==worker1"]},
        "w2": {**small, "constraints": [f"node.labels.{NODE_LABEL}==worker2"]},
        "gpu": {**small, "gpus": 1, "gpu_kind": "fixture-gpu"},
        "gpu-many": {**small, "gpus": 4, "gpu_kind": "fixture-gpu"},
        "huge": {"cpus": 0.25, "memory": "512g"},
        "small": small,
        **(extra or {}),
    }


def swarm_server(swarm: Swarm, data: Path, runner: str | None = None, **env: str) -> Server:
    """An ``envctl serve`` placing runtimes on ``swarm`` (not started)."""
    need_registry_program()
    data.mkdir(parents=True, exist_ok=True)
    prepare_data_dir(data, ["bash"])
    config = data / "config.yaml"
    config.write_text(json.dumps({"machine_types": machine_types()}))  # YAML reads JSON
    return Server(
        data,
        env={
            "ENVCTL_CONFIG": str(config),
            "ENVCTL_RUNNER_NAME": runner or f"test-{TEST_SESSION}-{uuid.uuid4().hex[:6]}",
            "ENVCTL_RUNNER_LABELS": f"{TEST_LABEL}={TEST_SESSION}",
            "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.5",
            "ENVCTL_RUNNER_BACKEND": "swarm",
            "ENVCTL_RUNNER_CHANNEL": "tcp",
            "ENVCTL_SWARM_MANAGER": swarm.host("manager"),
            "DOCKER_HOST": "",  # the local engine builds and pushes; the manager places
            "ENVCTL_REGISTRY": "managed",
            "ENVCTL_REGISTRY_PORT": str(_free_port()),
            "ENVCTL_REGISTRY_LISTEN": "0.0.0.0",  # noqa: S104  (loopback for this host, the bridge for the nodes)
            "ENVCTL_SWARM_REGISTRY": swarm.registry_host,
            "ENVCTL_SWARM_PENDING_TIMEOUT": "4",
            **env,
        },
    )


def remove_installation(swarm: Swarm, srv: Server) -> None:
    """Every service, secret and config the server's runner made on the swarm."""
    srv.stop()
    client = docker.DockerClient(base_url=swarm.host("manager"), timeout=30)
    try:
        label = f"envctl.runner={srv.env['ENVCTL_RUNNER_NAME']}"
        for svc in client.api.services(filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_service(svc["ID"])
        deadline = time.monotonic() + 20
        for secret in client.api.secrets(filters={"label": label}):
            while time.monotonic() < deadline:
                try:
                    client.api.remove_secret(secret["ID"])
                    break
                except docker.errors.NotFound:
                    break
                except docker.errors.APIError:
                    time.sleep(0.3)
        for config in client.api.configs(filters={"label": f"{TEST_LABEL}={TEST_SESSION}"}):
            with contextlib.suppress(docker.errors.APIError):
                client.api.remove_config(config["ID"])
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm") / "data")
    srv.start()
    with srv.client() as client:
        assert client.post("/teams", json={"name": "acme"}).status_code == 201
    yield srv
    remove_installation(swarm, srv)


@pytest.fixture(scope="module")
def manager(swarm: Swarm) -> Iterator[Any]:
    client = docker.DockerClient(base_url=swarm.host("manager"), timeout=30)
    yield client
    client.close()


def boot(server: Server, client: httpx.Client, name: str, machine: str, environment: str = "bash") -> dict[str, Any]:
    rid = new_runtime(client, name, environment=environment, language="bash", machine_type=machine)
    assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
    return server.wait_state(client, rid, {"running", "error"}, timeout=240)


def log_of(client: httpx.Client, rid: str) -> list[dict[str, Any]]:
    body = client.get(f"/runtimes/{rid}/log").json()
    return list(body["entries"] if isinstance(body, dict) else body)


def service_of(manager: Any, rid: str) -> dict[str, Any]:
    found = manager.api.services(filters={"label": f"envctl.runtime-id={rid}"})
    assert len(found) == 1, found
    return dict(found[0])


def test_runtimes_are_placed_on_the_worker_their_machine_type_names_and_run_cells(
    server: Server, manager: Any
) -> None:
    with server.client() as client:
        for node in ("worker1", "worker2"):
            rt = boot(server, client, f"on-{node}", "w1" if node == "worker1" else "w2")
            assert rt["state"] == "running", (rt, server.output()[-3000:])
            ex = run(client, rt["id"], "hostname; cat /proc/self/status | grep NoNewPrivs; echo $((6 * 7))")
            assert ex["status"] == "ok", ex
            out = text(ex)
            assert "42" in out
            entries = log_of(client, rt["id"])
            created = [e for e in entries if e.get("event") == "container-created"]
            assert created and f"on node swarm-{node}" in created[-1]["message"], created
            assert client.get(f"/runtimes/{rt['id']}").json().get("node") == f"swarm-{node}"
            svc = service_of(manager, rt["id"])
            tasks = manager.api.tasks(filters={"service": svc["ID"]})
            node = manager.api.inspect_node(tasks[0]["NodeID"])
            assert node["Description"]["Hostname"] == f"swarm-{node_name(rt)}"


def node_name(rt: dict[str, Any]) -> str:
    return "worker1" if rt["machine_type"] == "w1" else "worker2"
