"""Gone on disconnect on the swarm of ``scripts/swarm-fixture`` (issue 15 item 6): `envctl run`
(a process of its own) with its runtime placed on worker1, killed with SIGKILL while its cell
runs; the server deletes the runtime once the lease runs out, and its service, its secret and
its container on the worker are gone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.runner.runtimes.killed_client import notebook, run_and_kill, wait_deleted

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

LEASE = 6  # seconds
ROUND = 0.5  # the swarm server's ENVCTL_RUNNER_IDLE_CHECK_INTERVAL
STOP = 20.0  # the delete: the service removed (its task stopped with a grace period)
RM_BOUND = 20.0  # then the task's container gone from the worker


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm-leases") / "data")
    srv.start()
    yield srv
    remove_installation(swarm, srv)


def test_a_killed_envctl_run_leaves_no_service_and_no_container_on_the_worker(
    server: Server, swarm: Swarm, tmp_path: Path
) -> None:
    nb = notebook(tmp_path / "long.ipynb", "sleep 600", language="bash")
    manager = docker.DockerClient(base_url=swarm.host("manager"), timeout=30)
    worker = docker.DockerClient(base_url=swarm.host("worker1"), timeout=30)
    try:
        with server.client() as client:
            args = ("--env", "bash", "--type", "native", "--machine-type", "w1")
            killed = run_and_kill(server, client, nb, LEASE, *args)
            rid = killed.runtime["id"]
            assert killed.runtime["node"] == "swarm-worker1", killed.runtime
            services = manager.api.services(filters={"label": f"envctl.runtime-id={rid}"})
            assert len(services) == 1, services
            on_worker = {"label": f"com.docker.swarm.service.id={services[0]['ID']}"}
            assert worker.api.containers(filters=on_worker)
            took = wait_deleted(client, rid, killed.killed_at, LEASE + ROUND + STOP)
            print(f"\nswarm runtime deleted {took:.1f} s after its client was killed (lease {LEASE} s)")
            assert not manager.api.services(filters={"label": f"envctl.runtime-id={rid}"})
            deadline = time.monotonic() + RM_BOUND
            while worker.api.containers(all=True, filters=on_worker) and time.monotonic() < deadline:
                time.sleep(0.3)
            assert not worker.api.containers(all=True, filters=on_worker), f"a container stayed for {RM_BOUND} s"
        out = server.output()
        assert "lease expired at" in out and rid in out, out[-3000:]
    finally:
        worker.close()
        manager.close()
