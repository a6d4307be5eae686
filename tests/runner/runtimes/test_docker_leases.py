"""Gone on disconnect, for real: `envctl run` (a process of its own) against `envctl serve` on the
Docker engine, killed with SIGKILL while its cell runs; the server stops and deletes the
runtime within its lease and one housekeeping round, and its container is gone from the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.errors import NotFound

from runner.backends.base import LABEL_RUNTIME
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.conftest import remove_runner_containers, start_server
from tests.runner.runtimes.killed_client import notebook, run_and_kill, wait_deleted

pytestmark = [pytest.mark.docker, pytest.mark.slow]

LEASE = 6  # seconds
ROUND = 0.5  # ENVCTL_RUNNER_IDLE_CHECK_INTERVAL of start_server
STOP = 10.0  # the delete itself: the container stopped (2 s grace) and removed


@pytest.fixture(scope="module")
def server(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path_factory.mktemp("leases") / "data", ["python3"])
    yield srv
    remove_runner_containers(docker, srv)


def test_a_killed_envctl_run_leaves_no_runtime_and_no_container(server: Server, docker: Any, tmp_path: Path) -> None:
    nb = notebook(tmp_path / "long.ipynb", "import time\ntime.sleep(600)")
    with server.client() as client:
        killed = run_and_kill(server, client, nb, LEASE, "--env", "python3", "--type", "native")
        rid = killed.runtime["id"]
        containers = docker.containers.list(all=True, filters={"label": f"{LABEL_RUNTIME}={rid}"})
        assert len(containers) == 1, containers
        took = wait_deleted(client, rid, killed.killed_at, LEASE + ROUND + STOP)
        print(f"\nruntime deleted {took:.1f} s after its client was killed (lease {LEASE} s, round {ROUND} s)")
        with pytest.raises(NotFound):
            containers[0].reload()
        assert not docker.containers.list(all=True, filters={"label": f"{LABEL_RUNTIME}={rid}"})
        assert rid not in {rt["id"] for rt in client.get("/runtimes").json()}
    out = server.output()
    assert "lease expired at" in out and "last heartbeat at" in out and rid in out, out[-3000:]
