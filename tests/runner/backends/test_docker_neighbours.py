"""envctl is never alone on a Docker engine (R32, R33).

- Two installations (own data directories and databases) on one engine, their runners named
  alike (both default to the host name), run runtimes side by side for a hundred fast
  housekeeping rounds: neither stops, removes or adopts the other's containers.
- A runtime's container that dies without envctl asking (``docker kill``) keeps its unsaved
  changes: they become a draft and come back at the next boot.
- With the engine's live restore (``scripts/ensure-docker`` starts dockerd with it), a dockerd
  restart leaves runtimes running. That test restarts the engine, so it runs only where the
  engine is this project's own to restart: under CI, or with ENVCTL_TEST_RESTART_DOCKERD=1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.backends.base import LABEL_INSTALLATION, LABEL_RUNNER, LABEL_RUNTIME
from tests.conftest import TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image, in_ci, need
from tests.runner.conftest import remove_runner_containers, start_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]


def _boot(srv: Server, client: httpx.Client, name: str) -> dict[str, Any]:
    r = client.post("/runtimes", json={"environment": "python3", "name": name})
    assert r.status_code == 201, r.text
    assert client.post(f"/runtimes/{r.json()['id']}/start").status_code == 202
    rt = srv.wait_state(client, r.json()["id"], {"running", "error"}, timeout=120)
    assert rt["state"] == "running", rt
    return rt


def _cell(client: httpx.Client, rid: str, code: str, language: str = "python") -> dict[str, Any]:
    out: dict[str, Any] = client.post(
        f"/runtimes/{rid}/executions", params={"wait": 30}, json={"code": code, "language": language}
    ).json()
    return out


def _text(execution: dict[str, Any]) -> str:
    return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in execution["outputs"])


def test_two_installations_on_one_engine_leave_each_other_alone_round_after_round(docker: Any, tmp_path: Path) -> None:
    base_image(docker, "python3")
    name = f"same-{TEST_SESSION}"  # both named alike, as two installations on one host are by default
    fast = {"ENVCTL_RUNNER_NAME": name, "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.1"}
    one = start_server(docker, tmp_path / "one", **fast)
    two = start_server(docker, tmp_path / "two", **fast)
    try:
        with one.client() as c1, two.client() as c2:
            mine = [_boot(one, c1, f"one-{i}") for i in range(2)]
            theirs = [_boot(two, c2, f"two-{i}") for i in range(2)]
            installations = set()
            for rt in mine + theirs:
                [container] = docker.containers.list(filters={"label": f"{LABEL_RUNTIME}={rt['id']}"})
                installations.add(container.labels[LABEL_INSTALLATION])
                assert container.labels[LABEL_RUNNER] == name
            assert len(installations) == 2, "each installation labels its containers with its own id"
            ends = time.monotonic() + 10  # about 100 housekeeping rounds of each (the defect: seconds)
            while time.monotonic() < ends:
                for srv, client, rts in ((one, c1, mine), (two, c2, theirs)):
                    for rt in rts:
                        now = client.get(f"/runtimes/{rt['id']}").json()
                        assert now["state"] == "running", (now, srv.output()[-3000:])
                time.sleep(1)
            for srv, client, rts in ((one, c1, mine), (two, c2, theirs)):
                for rt in rts:
                    assert _text(_cell(client, rt["id"], "print('still here')")) == "still here\n"
                    events = [e.get("event") or e.get("state") for e in client.get(f"/runtimes/{rt['id']}/log").json()]
                    assert "leftover-removed" not in events and "error" not in events, events
                assert "unknown runtime" not in srv.output()
    finally:
        remove_runner_containers(docker, one)
        remove_runner_containers(docker, two)


def test_a_killed_container_keeps_its_unsaved_changes_for_the_next_boot(docker: Any, tmp_path: Path) -> None:
    """R33: ``docker kill`` after a file was written; the file is there after the next boot."""
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path / "data")
    try:
        with srv.client() as client:
            rid = _boot(srv, client, "crashy")["id"]
            wrote = _cell(
                client, rid, "head -c 50000000 /dev/urandom > /root/big.bin && sha256sum /root/big.bin", "bash"
            )
            assert wrote["status"] == "ok", wrote
            digest = _text(wrote).split()[0]
            [container] = docker.containers.list(filters={"label": f"{LABEL_RUNTIME}={rid}"})
            container.kill()
            rt = srv.wait_state(client, rid, {"error"}, timeout=60)
            assert rt["state_reason"] == "container-exited", rt
            assert "unsaved changes were kept" in rt["state_message"]
            assert rt["unsaved_changes"] is True
            log = client.get(f"/runtimes/{rid}/log").json()
            kept = [e for e in log if e["event"] == "draft-kept"]
            assert kept and kept[-1]["reason"] == "container-exited", log
            assert docker.containers.list(all=True, filters={"label": f"{LABEL_RUNTIME}={rid}"}) == []
            # the next cell boots the runtime from the draft: the file is back
            again = _cell(client, rid, "sha256sum /root/big.bin", "bash")
            assert again["status"] == "ok", again
            assert _text(again).split()[0] == digest
            assert any(e["event"] == "restoring" for e in client.get(f"/runtimes/{rid}/log").json())
    finally:
        remove_runner_containers(docker, srv)


def _live_restore(docker: Any) -> bool:
    return bool(docker.info().get("LiveRestoreEnabled"))


def test_a_dockerd_restart_leaves_a_runtime_running_with_its_state(docker: Any, tmp_path: Path) -> None:
    """R33 with live restore: the container and the interpreter's state survive the restart."""
    if not (in_ci() or os.environ.get("ENVCTL_TEST_RESTART_DOCKERD") == "1"):
        pytest.skip("restarts the Docker engine: runs under CI=true or with ENVCTL_TEST_RESTART_DOCKERD=1")
    if not _live_restore(docker):
        need("the Docker engine runs without live restore; scripts/ensure-docker starts it with --live-restore")
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path / "data")
    try:
        with srv.client() as client:
            rid = _boot(srv, client, "survivor")["id"]
            assert _cell(client, rid, "kept = 'state'")["status"] == "ok"
            [container] = docker.containers.list(filters={"label": f"{LABEL_RUNTIME}={rid}"})
            started = container.attrs["State"]["StartedAt"]
            _restart_dockerd()
            container.reload()
            assert container.status == "running" and container.attrs["State"]["StartedAt"] == started
            # While the engine was away a housekeeping round may have said so (R14: the runtime
            # shows backend-unreachable, nothing forgotten); once it answers, the runtime is
            # adopted again, its container and interpreter untouched.
            rt = srv.wait_state(client, rid, {"running"}, timeout=30)
            assert rt["booted_at"] is not None
            assert _text(_cell(client, rid, "print(kept)")) == "state\n"
            log = client.get(f"/runtimes/{rid}/log").json()
            assert [e["reason"] for e in log if e["state"] == "error"] in ([], ["backend-unreachable"]), log
            assert [e for e in log if e["event"] == "container-created"][1:] == [], "never booted again"
    finally:
        remove_runner_containers(docker, srv)


def _restart_dockerd() -> None:
    """Stop dockerd (SIGTERM, as a service manager would) and start it again the project's way."""
    pid = int(Path("/var/run/docker.pid").read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.2)
    subprocess.run([str(REPO / "scripts" / "ensure-docker")], check=True, timeout=120)
