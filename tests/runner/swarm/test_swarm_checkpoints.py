"""Checkpoints (runner/runtimes/checkpoints.py) on the real swarm of ``scripts/swarm-fixture``: with
``ENVCTL_RUNNER_CHECKPOINT_INTERVAL`` on, a runtime's container killed without warning on its
worker comes back at its next boot with what its last checkpoint held, and only that."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.swarm.test_swarm_backend import log_of, service_of

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
INTERVAL = 4


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(
        swarm, tmp_path_factory.mktemp("swarm-ckpt") / "data", ENVCTL_RUNNER_CHECKPOINT_INTERVAL=str(INTERVAL)
    )
    srv.start()
    yield srv
    remove_installation(swarm, srv)


def checkpoints(client: Any, rid: str) -> list[dict[str, Any]]:
    return [e for e in log_of(client, rid) if e.get("event") == "draft-kept" and e.get("reason") == "checkpoint"]


def test_a_container_killed_without_warning_comes_back_with_its_last_checkpoint_and_nothing_after(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    with server.client() as client:
        rid = new_runtime(client, "ckpt", environment="bash", language="bash", machine_type="w1")
        assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
        rt = server.wait_state(client, rid, {"running", "error"}, timeout=300)
        assert rt["state"] == "running" and rt["node"] == "swarm-worker1", rt
        assert run(client, rid, "echo one > /root/one")["status"] == "ok"
        deadline = time.monotonic() + 30
        while not checkpoints(client, rid):
            assert time.monotonic() < deadline, "no checkpoint after a cell"
            time.sleep(0.3)
        [first] = checkpoints(client, rid)
        assert first["message"].startswith("checkpoint: kept"), first
        time.sleep(INTERVAL + 2)  # no cell since: no second checkpoint
        assert len(checkpoints(client, rid)) == 1
        # a cell that writes, then stays busy (no checkpoint beside a cell): killed meanwhile
        r = client.post(f"/runtimes/{rid}/executions", json={"code": "echo two > /root/two; sleep 60"})
        assert r.status_code == 202, r.text
        time.sleep(1)
        service = service_of(manager, rid)["ID"]
        [cid] = swarm.docker("worker1", "ps", "-q", "--filter", f"label=com.docker.swarm.service.id={service}").split()
        swarm.docker("worker1", "kill", cid)
        dead = server.wait_state(client, rid, {"error"}, timeout=60)
        assert dead["state_reason"] == "container-exited", dead
        assert "its last draft comes back at the next boot" in dead["state_message"], dead
        assert len(checkpoints(client, rid)) == 1
        assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
        back = server.wait_state(client, rid, {"running", "error"}, timeout=300)
        assert back["state"] == "running", (back.get("state_reason"), back.get("state_message"))
        seen = text(run(client, rid, "cat /root/one; test -e /root/two && echo two-there || echo two-gone"))
        assert seen.split() == ["one", "two-gone"], seen
        client.delete(f"/runtimes/{rid}")
