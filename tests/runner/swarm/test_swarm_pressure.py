"""Memory-pressure drafts (runner/agent/memwatch.py, runner/runtimes/pressure.py) on the real swarm
of ``scripts/swarm-fixture``: a cell whose memory grows past the line (the default 90 % of the
machine type's limit) is paused while envctl takes a draft; the memory killer ends the agent
later; the next boot, on whichever node, has what the cell wrote before it. Swarm reports the
kill as "non-zero exit (137)" like any SIGKILL, so the reason stays ``container-exited``; the
message names the draft and says that the memory killer most likely did it."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.kube.test_kube_oom import AGENT_FIRST, GROW
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.swarm.test_swarm_backend import log_of

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm-pressure") / "data")  # no checkpoints
    srv.start()
    yield srv
    remove_installation(swarm, srv)


def test_a_cell_growing_past_the_memory_line_gets_a_draft_before_the_memory_killer_ends_the_task(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    with server.client() as client:
        rid = new_runtime(client, "grow", environment="bash", language="bash", machine_type="w1")  # 256 MiB
        assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
        rt = server.wait_state(client, rid, {"running", "error"}, timeout=300)
        assert rt["state"] == "running", rt
        assert run(client, rid, "echo before > /root/before.txt")["status"] == "ok"
        grow = f"echo after > /root/after.txt; {AGENT_FIRST}; python3 -c {shlex.quote(GROW)}"
        r = client.post(f"/runtimes/{rid}/executions", json={"code": grow, "timeout": 120})
        assert r.status_code == 202, r.text
        execution = r.json()["id"]
        dead = server.wait_state(client, rid, {"error", "stopped"}, timeout=120)
        assert dead["state"] == "error" and dead["state_reason"] == "container-exited", dead
        message = dead["state_message"]
        assert "137" in message, message
        named = f"the memory-pressure draft, taken while cell {execution} was paused near the memory limit"
        assert named in message, message
        assert "most likely by the memory killer" in message, message
        drafts = [e for e in log_of(client, rid) if e.get("event") == "draft-kept"]
        assert [d["reason"] for d in drafts] == ["memory-pressure"], drafts
        print(f"\ndraft: {drafts[0]['message']}\nrunner log: {message}")
        assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
        again = server.wait_state(client, rid, {"running", "error"}, timeout=300)
        assert again["state"] == "running", again
        got = text(
            run(client, rid, "cat /root/before.txt; test -e /root/after.txt && echo after-kept || echo after-lost")
        )
        assert got.split() == ["before", "after-kept"], got
        client.delete(f"/runtimes/{rid}")
