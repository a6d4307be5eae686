"""Apps with the Swarm backend, on the real swarm of ``scripts/swarm-fixture``: an ``envctl serve``
that places runtimes on the swarm and serves team acme's apps. The app's runtime is a service
placed by Swarm like any other (here on worker1, by its machine type's constraint); its web
server's port is published in host mode on that node beside the agent's (the runtime's own address
is on a bridge inside the node, out of envctl's reach), and the gateway sends requests there."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_apps_docker import Env, app_notebook
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def env(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm-apps") / "data", ENVCTL_RUNNER_APP_TEAMS="acme")
    srv.start()
    try:
        admin = (srv.data_dir / "admin-token").read_text().strip()
        tokens = {"admin": admin}
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {admin}"}) as c:
            made = c.post("/users", json={"name": "alice"})
            assert made.status_code == 201, made.text
            tokens["alice"] = made.json()["token"]
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {tokens['alice']}"}) as c:
            assert c.post("/teams", json={"name": "acme"}).status_code == 201
        yield Env(srv, tokens)
    finally:
        remove_installation(swarm, srv)


def test_an_app_on_the_swarm_is_placed_on_a_node_and_answers_through_the_gateway(
    env: Env, swarm: Swarm, manager: Any, tmp_path: Path
) -> None:
    version = f"swarm-{uuid.uuid4().hex[:6]}"
    done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "app", version)), "--team", "acme",
                   "--name", "board", "--env", "bash", "--machine-type", "w1", "--wait", "300")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + env.srv.output()[-4000:]
    assert env.deployment("board", 1)["status"] == "running"

    # placed by Swarm like any runtime: a service on the node its machine type names
    [rt] = [r for r in env.runtimes() if r["name"].startswith("app-board-1-")]
    assert (rt["state"], rt["node"], rt["team"]) == ("running", "swarm-worker1", "acme"), rt
    [svc] = manager.api.services(filters={"label": f"envctl.runtime-id={rt['id']}"})
    ports = svc["Spec"]["EndpointSpec"]["Ports"]
    assert {"Protocol": "tcp", "TargetPort": 8000, "PublishMode": "host"} in ports, ports

    # through the gateway: the node's published port, not the runtime's bridge address
    with env.client("alice") as c:
        for _ in range(5):
            resp = c.get("/apps/acme/board/page")
            assert resp.status_code == 200, resp.text + env.srv.output()[-3000:]
            seen = resp.json()
            assert (seen["version"], seen["path"], seen["file"]) == (version, "/page", "from the bundle")
    assert {k.lower(): v for k, v in seen["headers"].items()}["x-forwarded-prefix"] == "/apps/acme/board"

    # stopped: 503 at once, and its service leaves the swarm
    stopped = env.cli("alice", "app", "stop", "board", "--team", "acme")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    with env.client("alice") as c:
        resp = c.get("/apps/acme/board/")
        assert resp.status_code == 503 and "not running" in resp.text, resp.text
    deadline = time.monotonic() + 60
    while manager.api.services(filters={"label": f"envctl.runtime-id={rt['id']}"}):
        assert time.monotonic() < deadline, "the stopped app's service is still on the swarm"
        time.sleep(0.5)
