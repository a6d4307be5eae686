"""R44 on the real swarm of ``scripts/swarm-fixture`` (runner/backends/swarm_pools.py): a node
whose own address pools are all taken fails the boot with ``network_pool_exhausted``, naming the
node, envctl's networks on the swarm and how to free them, not Docker's bare message."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.runner.cells.test_docker_executions import new_runtime
from tests.runner.swarm.test_swarm_fence import service_of

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm-pools") / "data")
    srv.start()
    yield srv
    remove_installation(swarm, srv)


def fill_pools(swarm: Swarm, node: str) -> list[str]:
    """Bridge networks on ``node``'s own engine until its default pools give no more (test-labelled)."""
    made: list[str] = []
    tag = uuid.uuid4().hex[:6]
    for n in range(64):
        name = f"envctl-test-fill-{tag}-{n}"
        try:
            swarm.docker(node, "network", "create", "--label", f"{TEST_LABEL}={TEST_SESSION}", name)
        except AssertionError as exc:
            assert "non-overlapping" in str(exc), exc  # the pools are full: what the test wants
            return made
        made.append(name)
    raise AssertionError(f"{node}'s engine still had address pools after {len(made)} networks")


def test_a_node_out_of_address_pools_fails_the_boot_naming_envctls_networks_and_how_to_free_them(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    with server.client() as client:
        first = new_runtime(client, "placed-first", environment="bash", language="bash", machine_type="w1")
        assert client.post(f"/runtimes/{first}/start").status_code in (200, 202)
        assert server.wait_state(client, first, {"running", "error"}, timeout=300)["state"] == "running"
        installation = service_of(manager, first)["Spec"]["Labels"]["envctl.installation"]
        fillers = fill_pools(swarm, "worker2")  # this installation's network is not on worker2 yet
        try:
            rid = new_runtime(client, "no-pool", environment="bash", language="bash", machine_type="w2")
            assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
            rt = server.wait_state(client, rid, {"running", "error"}, timeout=300)
            assert rt["state"] == "error", rt
            message = rt["state_message"]
            assert "node swarm-worker2 has no address pool left" in message, message
            assert f"envctl-{installation} (installation {installation}, this one" in message, message
            assert "ENVCTL_RUNNER_SUBNET_POOL" in message and "default-address-pools" in message, message
            assert "envctl uninstall" in message, message
            # the installation's other runtime, on worker1, is untouched
            assert client.get(f"/runtimes/{first}").json()["state"] == "running"
            client.delete(f"/runtimes/{rid}")
        finally:
            for name in fillers:
                swarm.docker("worker2", "network", "rm", name, check=False)
        client.delete(f"/runtimes/{first}")
