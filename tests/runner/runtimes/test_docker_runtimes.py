"""Runtimes on the real Docker engine, through a real `envctl serve` process.

Covers hardening (R1), machine types, GPU requests, and recovery after a SIGKILL of the
server (R11-R14).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from envs.kit.db import Database
from runner.backends.base import LABEL_INSTALLATION, LABEL_RUNNER, LABEL_RUNTIME
from runner.backends.docker import DROPPED_CAPABILITIES
from runner.channel import ping
from runner.identity import installation_id
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.conftest import remove_runner_containers, start_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def server(shared_server: Server) -> Server:
    """This module's tests share one `envctl serve` (one that is killed is started again);
    the runtimes each test makes are deleted after it."""
    return shared_server


def containers_of(docker: Any, rid: str) -> list[Any]:
    return docker.containers.list(all=True, filters={"label": f"{LABEL_RUNTIME}={rid}"})


def boot(srv: Server, client: httpx.Client, name: str = "demo", **body: Any) -> dict[str, Any]:
    r = client.post("/runtimes", json={"environment": "python3", "name": name, **body})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert client.post(f"/runtimes/{rid}/start").status_code == 202
    return srv.wait_state(client, rid, {"running", "error"})


def test_a_runtime_boots_from_python3_and_its_container_is_hardened(server: Server, docker: Any) -> None:
    """R1: no privilege, dropped capabilities, limits, capped logs, only envctl's own mounts."""
    with server.client() as client:
        rt = boot(server, client, machine_type="small")
        assert rt["state"] == "running", rt
        assert rt["environment"] == "python3@1"
        assert rt["idle_shutdown_at"] is not None
        [container] = containers_of(docker, rt["id"])
        info = container.attrs
        host = info["HostConfig"]
        assert host["Privileged"] is False
        assert any(o.startswith("no-new-privileges") for o in host["SecurityOpt"])
        assert set(DROPPED_CAPABILITIES) <= set(host["CapDrop"])
        assert not host.get("CapAdd")
        assert host["PidsLimit"] == 512
        assert host["Memory"] == 2 * 1024**3 and host["MemorySwap"] == host["Memory"]
        assert host["NanoCpus"] == 1_000_000_000
        assert host["LogConfig"] == {
            "Type": "json-file",
            "Config": {"max-file": "1", "max-size": "10m"},
        }
        assert not host.get("Binds") and not host.get("Devices")
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        assert set(mounts) == {"/opt/envctl/agent", "/run/envctl", "/results"}
        assert mounts["/opt/envctl/agent"]["RW"] is False
        assert Path(mounts["/run/envctl"]["Source"]) == server.data_dir / "runtimes" / rt["id"]
        assert Path(mounts["/results"]["Source"]) == server.data_dir / "runtimes" / rt["id"] / "results"
        assert all("docker.sock" not in m["Source"] for m in info["Mounts"])
        labels = info["Config"]["Labels"]
        assert labels[LABEL_RUNTIME] == rt["id"] and labels["envctl.environment"] == "python3@1"
        assert info["Name"] == f"/envctl-{rt['id']}"
        # The agent is the container's main process (under tini, which reaps zombies).
        top = container.top(ps_args="-o pid,args")["Processes"]
        assert any("/opt/envctl/agent/main.py" in " ".join(p) for p in top)


def test_the_machine_type_sets_the_container_limits(server: Server, docker: Any) -> None:
    """R1: pids, memory and CPU limits come from the machine type."""
    with server.client() as client:
        rt = boot(server, client, name="big", machine_type="medium")
        assert rt["state"] == "running", rt
        [container] = containers_of(docker, rt["id"])
        host = container.attrs["HostConfig"]
        assert host["NanoCpus"] == 2_000_000_000
        assert host["Memory"] == 4 * 1024**3
        assert host["PidsLimit"] == 1024


def test_a_gpu_machine_type_asks_docker_for_a_gpu_and_says_clearly_when_there_is_none(
    server: Server, docker: Any
) -> None:
    """No GPU is lent to these machines: the boot fails at once with a reason (the container a
    GPU type gets is checked in test_gpu_machine_types.py)."""
    with server.client() as client:
        rt = boot(server, client, name="gpu", machine_type="gpu-small")
        if rt["state"] == "running":  # a machine with the NVIDIA runtime
            [container] = containers_of(docker, rt["id"])
            assert container.attrs["HostConfig"]["DeviceRequests"][0]["Count"] == 1
            return
        # no NVIDIA runtime in the engine: refused before any container is made, saying why
        assert rt["state"] == "error" and rt["state_reason"] == "gpu-unavailable", rt
        assert "no NVIDIA container runtime" in rt["state_message"] and "runc" in rt["state_message"]
        assert containers_of(docker, rt["id"]) == []
        log = client.get(f"/runtimes/{rt['id']}/log").json()
        assert not any(e["event"] == "container-created" for e in log)


def test_a_sigkilled_server_adopts_its_running_runtimes_on_restart_without_restarting_them(
    server: Server, docker: Any
) -> None:
    """R11: adopted after a SIGKILL, same container and agent, none duplicated."""
    with server.client() as client:
        rt = boot(server, client)
        [container] = containers_of(docker, rt["id"])
        started = container.attrs["State"]["StartedAt"]
        sock = server.data_dir / "runtimes" / rt["id"] / "agent.sock"
        before = ping(sock)
    server.kill()
    server.start()
    with server.client() as client:
        after_rt = server.wait_state(client, rt["id"], {"running", "error"})
        assert after_rt["state"] == "running", after_rt
        [again] = containers_of(docker, rt["id"])
        assert again.id == container.id and again.attrs["State"]["StartedAt"] == started
        after = ping(sock)
        assert after["pid"] == before["pid"] and after["started_at"] == before["started_at"]


def test_a_container_removed_while_the_server_was_down_is_reported_not_crashed_on(server: Server, docker: Any) -> None:
    """R12: the runtime is an error with a reason; the server does not crash."""
    with server.client() as client:
        rt = boot(server, client)
    server.kill()
    for c in containers_of(docker, rt["id"]):
        c.remove(force=True)
    server.start()
    with server.client() as client:
        after = client.get(f"/runtimes/{rt['id']}").json()
        assert after["state"] == "error" and after["state_reason"] == "container-vanished"
        assert client.get("/health").json()["status"] == "ok"
        # and it can be booted again
        assert client.post(f"/runtimes/{rt['id']}/start").status_code == 202
        assert server.wait_state(client, rt["id"], {"running", "error"})["state"] == "running"


def test_an_orphan_container_from_a_crash_before_commit_is_removed_on_start(server: Server, docker: Any) -> None:
    """R13: a container labelled with this installation and runner and no row is removed after
    a complete listing. One with the runner's name but no installation (made before
    installations had an identity, or by someone else) is never removed."""
    runner = server.env["ENVCTL_RUNNER_NAME"]
    db = Database(f"sqlite:///{server.data_dir / 'envctl.db'}")
    try:
        installation = installation_id(db)
    finally:
        db.dispose()
    server.kill()
    for rid, extra in (("rt_0rphan0000000000", {LABEL_INSTALLATION: installation}), ("rt_1egacy0000000000", {})):
        docker.containers.create(
            base_image(docker, "bash"),
            ["sleep", "600"],
            labels={LABEL_RUNNER: runner, LABEL_RUNTIME: rid, TEST_LABEL: TEST_SESSION, **extra},
        ).start()
    server.start()
    assert containers_of(docker, "rt_0rphan0000000000") == []
    [kept] = containers_of(docker, "rt_1egacy0000000000")
    assert kept.status == "running"


def test_a_runtime_that_exits_is_an_error_with_the_reason(server: Server, docker: Any) -> None:
    with server.client() as client:
        rt = boot(server, client)
        [container] = containers_of(docker, rt["id"])
        container.kill()
        after = server.wait_state(client, rt["id"], {"error"}, timeout=15)
        assert after["state_reason"] in ("container-exited", "oom")
        assert containers_of(docker, rt["id"]) == []


def test_stop_and_delete_remove_the_container(server: Server, docker: Any) -> None:
    with server.client() as client:
        rt = boot(server, client)
        assert client.post(f"/runtimes/{rt['id']}/stop").status_code == 202
        server.wait_state(client, rt["id"], {"stopped"})
        assert containers_of(docker, rt["id"]) == []
        rt2 = boot(server, client, name="second")
        assert client.delete(f"/runtimes/{rt2['id']}").status_code == 204
        assert containers_of(docker, rt2["id"]) == []
        assert client.get(f"/runtimes/{rt2['id']}").status_code == 404


def test_a_paused_container_is_neither_an_error_nor_removed(server: Server, docker: Any) -> None:
    """`docker commit` pauses a container for as long as it copies (seconds for a big layer)."""
    with server.client() as client:
        rt = boot(server, client)
        [container] = containers_of(docker, rt["id"])
        container.pause()
        try:
            import time

            time.sleep(2.5)  # several housekeeping rounds
            assert [c.id for c in containers_of(docker, rt["id"])] == [container.id]
        finally:
            container.unpause()
        time.sleep(1.5)
        after = client.get(f"/runtimes/{rt['id']}").json()
        assert after["state"] == "running", after
        assert [c.id for c in containers_of(docker, rt["id"])] == [container.id]


HOG = "x = bytearray(1024**3)\nx[::4096] = b'y' * (1024**3 // 4096)"  # touches every page of 1 GB


def test_a_runtime_killed_for_memory_is_an_error_with_reason_oom_and_its_neighbour_runs_on(
    docker: Any, tmp_path: Path
) -> None:
    """R3: past the memory limit only that runtime suffers; killed, it is ``error`` / ``oom``."""
    base_image(docker, "python3")
    config = tmp_path / "envctl.yaml"
    config.write_text("machine_types:\n  tiny: {cpus: 1, memory: 256m, pids: 256}\n")
    srv = start_server(docker, tmp_path / "data", ENVCTL_CONFIG=str(config))
    try:
        with srv.client() as client:
            hog = boot(srv, client, "hog", machine_type="tiny")
            neighbour = boot(srv, client, "neighbour", machine_type="tiny")
            assert hog["state"] == neighbour["state"] == "running"
            [hog_container] = containers_of(docker, hog["id"])
            assert hog_container.attrs["HostConfig"]["Memory"] == 256 * 1024**2
            cell = client.post(
                f"/runtimes/{neighbour['id']}/executions", params={"wait": 30}, json={"code": "kept = 42"}
            ).json()
            assert cell["status"] == "ok"

            # The kernel running the cell is the biggest process: the kernel dies, the cell fails
            # and says why, and the runtime goes on with a fresh kernel.
            ex = client.post(f"/runtimes/{hog['id']}/executions", params={"wait": 30}, json={"code": HOG}).json()
            assert ex["status"] == "error", ex
            assert ex["error_name"] == "OutOfMemory", ex
            assert "ran out of memory" in ex["error_value"] and "256 MB" in ex["error_value"]
            assert client.get(f"/runtimes/{hog['id']}").json()["state"] == "running"
            fresh = client.post(f"/runtimes/{hog['id']}/executions", params={"wait": 30}, json={"code": "1+1"}).json()
            assert fresh["status"] == "ok"

            # When the memory killer takes the runtime's main process (the agent), the container
            # dies of it: the runtime is an error that says so, and its container is removed.
            victim = "import os\nopen(f'/proc/{os.getppid()}/oom_score_adj', 'w').write('1000')\n" + HOG
            client.post(f"/runtimes/{hog['id']}/executions", params={"wait": 30}, json={"code": victim})
            dead = srv.wait_state(client, hog["id"], {"error"}, timeout=30)
            assert dead["state_reason"] == "oom", dead
            assert "out of memory" in dead["state_message"]
            assert containers_of(docker, hog["id"]) == []

            assert client.get("/health").json()["status"] == "ok"
            assert client.get(f"/runtimes/{neighbour['id']}").json()["state"] == "running"
            again = client.post(
                f"/runtimes/{neighbour['id']}/executions", params={"wait": 30}, json={"code": "kept"}
            ).json()
            assert again["outputs"][0]["data"]["text/plain"] == "42"  # its interpreter state too
            assert client.post(f"/runtimes/{hog['id']}/start").status_code == 202
            assert srv.wait_state(client, hog["id"], {"running", "error"})["state"] == "running"
    finally:
        remove_runner_containers(docker, srv)
