"""R1, R2, R3, R7 and R8 (shared/RELIABILITY.md) repeated on the Swarm backend, on the real swarm
of ``scripts/swarm-fixture`` with one ``envctl serve`` for the module. R4 is in
test_swarm_fence.py, R6 and R40 in test_swarm_backend.py (secrets in no service, task or
container field), R32 there too (two installations on one swarm). Where Swarm 20.10 cannot do
what Docker does, the test pins what it does instead and the README says so."""

from __future__ import annotations

import gzip
import io
import json
import shlex
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from runner.backends.docker import DROPPED_CAPABILITIES
from runner.saves.scans import secret_forms
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.swarm.test_swarm_backend import save_op

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

VALUE = "Sw4rm-pa55/w0rd+for=envctl&more"
FORMS = [form for form, _ in secret_forms([VALUE])]


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm-rel") / "data")
    srv.start()
    with srv.client() as client:
        assert client.post("/teams", json={"name": "acme"}).status_code == 201
    yield srv
    remove_installation(swarm, srv)
    for node in swarm.nodes:  # the named volume of the R8 test, on the node it landed on
        for name in swarm.docker(node, "volume", "ls", "-q", "--filter", "name=envctl-vol-", check=False).split():
            swarm.docker(node, "volume", "rm", "-f", name, check=False)


def boot(server: Server, client: httpx.Client, name: str, machine: str, **body: Any) -> dict[str, Any]:
    rid = new_runtime(client, name, environment="bash", language="bash", machine_type=machine, **body)
    assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
    rt = server.wait_state(client, rid, {"running", "error"}, timeout=300)
    assert rt["state"] == "running", rt
    return rt


def container_of(swarm: Swarm, manager: Any, rid: str, node: str) -> tuple[str, dict[str, Any]]:
    [svc] = manager.api.services(filters={"label": f"envctl.runtime-id={rid}"})
    out = swarm.docker(node, "ps", "-q", "--filter", f"label=com.docker.swarm.service.id={svc['ID']}")
    [cid] = out.split()
    return cid, json.loads(swarm.docker(node, "inspect", cid))[0]


def test_a_runtimes_container_on_its_worker_is_hardened_but_for_what_swarm_cannot_set(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    """R1 on Swarm: no privilege, the risky capabilities dropped, none added, pids, memory and CPU
    limits from the machine type, capped logs, no host path and no Docker socket, the fenced
    network. Not in the container's configuration (Swarm 20.10 has no such option):
    no-new-privileges, which the agent sets on itself instead (NoNewPrivs 1 in every cell)."""
    with server.client() as client:
        rt = boot(server, client, "hardened", "w1")
        assert rt["node"] == "swarm-worker1", rt
        _, info = container_of(swarm, manager, rt["id"], "worker1")
        host = info["HostConfig"]
        assert host["Privileged"] is False
        dropped = {c.removeprefix("CAP_") for c in host["CapDrop"] or []}
        assert set(DROPPED_CAPABILITIES) <= dropped, dropped
        assert not host.get("CapAdd")
        assert host["PidsLimit"] == 256 and host["Memory"] == 256 * 1024**2 and host["NanoCpus"] == 250_000_000
        assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "1", "max-size": "10m"}}
        assert not host.get("Binds") and not host.get("Devices")
        # the state and secrets tmpfs; /results an anonymous volume on the node; no bind mount
        assert {m["Type"] for m in info["Mounts"]} <= {"volume", "tmpfs"}, info["Mounts"]
        assert all("docker.sock" not in json.dumps(m) for m in (host.get("Mounts") or []) + info["Mounts"])
        assert list(info["NetworkSettings"]["Networks"]) == [f"envctl-{rt_installation(manager, rt['id'])}"]
        assert not any("no-new-privileges" in o for o in host.get("SecurityOpt") or [])  # what Swarm cannot set
        assert "NoNewPrivs:\t1" in text(run(client, rt["id"], "grep NoNewPrivs /proc/self/status"))
        client.delete(f"/runtimes/{rt['id']}")


def rt_installation(manager: Any, rid: str) -> str:
    [svc] = manager.api.services(filters={"label": f"envctl.runtime-id={rid}"})
    return str(svc["Spec"]["Labels"]["envctl.installation"])


def test_a_fork_bomb_meets_the_pids_limit_while_the_api_and_another_runtime_answer_and_it_can_be_stopped(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    """R2 on Swarm: ``Resources.Limits.Pids`` holds; the node's container never passes it."""
    with server.client() as client:
        bomb = boot(server, client, "bomb", "w1-tiny")
        neighbour = boot(server, client, "calm", "w1")
        cid, info = container_of(swarm, manager, bomb["id"], "worker1")
        assert info["HostConfig"]["PidsLimit"] == 64
        r = client.post(f"/runtimes/{bomb['id']}/executions", json={"code": "b() { b | b & }; b", "timeout": 60})
        assert r.status_code == 202, r.text
        peak, seen = 0, {}
        worker = docker.DockerClient(base_url=swarm.host("worker1"), timeout=60)
        try:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and peak < 64:
                seen = worker.api.stats(cid, stream=False)  # the engine's own count, as on Docker
                peak = max(peak, int((seen.get("pids_stats") or {}).get("current") or 0))
                time.sleep(0.2)
        finally:
            worker.close()
        assert peak == 64, (peak, seen.get("pids_stats"))  # it reached the limit, and no further
        began = time.monotonic()
        assert client.get("/health").json()["status"] == "ok"
        assert text(run(client, neighbour["id"], "echo $((6 * 7))")).strip() == "42"
        assert time.monotonic() - began < 15
        assert client.post(f"/runtimes/{bomb['id']}/stop").status_code == 202
        stopped = server.wait_state(client, bomb["id"], {"stopped", "error"}, timeout=90)
        assert stopped["state"] == "stopped", stopped
        assert manager.api.services(filters={"label": f"envctl.runtime-id={bomb['id']}"}) == []
        assert client.get(f"/runtimes/{neighbour['id']}").json()["state"] == "running"
        for rt in (bomb, neighbour):
            client.delete(f"/runtimes/{rt['id']}")


HOG = "x = bytearray(1024**3)\nx[::4096] = b'y' * (1024**3 // 4096)"  # touches every page of 1 GB


def test_past_the_memory_limit_only_that_runtime_suffers_and_an_agent_killed_for_it_is_an_error(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    """R3 on Swarm: a cell's process past the limit is killed and the runtime goes on; when the
    memory killer takes the agent, the runtime is ``error`` — with reason ``container-exited``,
    not ``oom``: Swarm reports an OOM kill as "task: non-zero exit (137)" like any SIGKILL, and
    only the node's engine knows it was the memory (envctl does not talk to nodes' engines)."""
    with server.client() as client:
        hog = boot(server, client, "hog", "w1")
        neighbour = boot(server, client, "neighbour", "w1")
        assert run(client, neighbour["id"], "kept=42")["status"] == "ok"
        ex = run(client, hog["id"], f"python3 -c {shlex.quote(HOG)}; echo exit=$?")
        assert "exit=137" in text(ex), ex
        assert text(run(client, hog["id"], "echo alive")).strip() == "alive"
        victim = (
            'for p in /proc/[0-9]*; do grep -q main.py "$p/cmdline" 2>/dev/null && echo 1000 > "$p/oom_score_adj"; '
            f"done; python3 -c {shlex.quote(HOG)}"
        )
        client.post(f"/runtimes/{hog['id']}/executions", json={"code": victim, "timeout": 60})
        dead = server.wait_state(client, hog["id"], {"error"}, timeout=60)
        assert dead["state_reason"] == "container-exited", dead
        assert "137" in dead["state_message"], dead
        assert client.get("/health").json()["status"] == "ok"
        assert client.get(f"/runtimes/{neighbour['id']}").json()["state"] == "running"
        assert text(run(client, neighbour["id"], "echo $kept")).strip() == "42"
        for rt in (hog, neighbour):
            client.delete(f"/runtimes/{rt['id']}")


def registry_blobs(server: Server) -> list[Path]:
    root = server.data_dir / "registry" / "storage"
    return [p for p in root.rglob("data") if p.parent.parent.parent.name == "sha256"]


def blob_contents(path: Path) -> tuple[bytes, list[str]]:
    """A blob's bytes (a layer unpacked from gzip) and, for a layer, its members' names."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    names: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            names = tar.getnames()
    except tarfile.TarError:
        pass
    return data, names


def test_a_save_of_a_runtime_that_used_a_secret_holds_no_value_in_any_layer_or_config(
    server: Server,
) -> None:
    """R7 on Swarm: the save is made inside the runtime and pushed to the registry; every blob the
    registry then holds (the new layer, the parent's, the configs, the manifests) is searched
    for the value, plain, base64 and URL-encoded."""
    with server.client() as client:
        assert client.put("/teams/acme/secrets/r7pw", json={"value": VALUE}).status_code in (200, 201)
        rt = boot(server, client, "r7", "w2", team="acme", env={"PW": {"secret": "r7pw", "team": "acme"}})
        assert text(run(client, rt["id"], 'echo "$PW" | rev; echo work > /root/r7-work.txt')).strip() == VALUE[::-1]
        op = save_op(client, rt["id"], "acme/r7")
        assert op["status"] == "succeeded", op
        blobs = registry_blobs(server)
        assert len(blobs) >= 3, blobs  # the base layer, the new one, configs and manifests
        hits = {}
        seen_work = False
        for blob in blobs:
            data, names = blob_contents(blob)
            found = [f.decode() for f in FORMS if f in data]
            if found:
                hits[str(blob)] = found
            seen_work = seen_work or "root/r7-work.txt" in names
        assert hits == {}, hits
        assert seen_work  # the search looked where the save's files are
        client.delete(f"/runtimes/{rt['id']}")


def test_what_a_cell_writes_into_a_volume_mount_and_results_is_not_in_the_save(server: Server) -> None:
    """R8 on Swarm: a named volume and ``/results`` are mount points in the task (a node volume,
    an anonymous volume), which the in-runtime save's walk leaves out; a file beside them is in."""
    mark = uuid.uuid4().hex[:10]
    volume = [{"type": "volume", "name": f"r8-{mark}", "target": "/home/r8"}]
    with server.client() as client:
        rt = boot(server, client, "r8", "w1", mounts=volume)
        write = f"echo m > /home/r8/in-mount-{mark}; echo r > /results/in-results-{mark}; echo k > /root/kept-{mark}"
        assert run(client, rt["id"], write)["status"] == "ok"
        op = save_op(client, rt["id"], "acme/r8")
        assert op["status"] == "succeeded", op
        names = [n for blob in registry_blobs(server) for n in blob_contents(blob)[1]]
        assert f"root/kept-{mark}" in names
        assert not [n for n in names if mark in n and not n.startswith("root/")], [n for n in names if mark in n]
        client.delete(f"/runtimes/{rt['id']}")
