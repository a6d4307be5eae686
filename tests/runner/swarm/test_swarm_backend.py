"""The Swarm backend (issue 15 items 3 and 5) on the real three-engine swarm of
``scripts/swarm-fixture``: one ``envctl serve`` per module with ``ENVCTL_RUNNER_BACKEND=swarm``,
its managed registry listening where the nodes reach it, machine types pinned to a worker by
node label, runtimes booted, cells run, saves moved between workers, a worker's engine killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from envs.kit.db import Database
from registry.team_secrets import SecretBox
from runner.agentauth import AgentLinks
from runner.channel import AgentAddress, AgentChannel, AgentUnavailableError
from runner.models import Runtime
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import NODE_LABEL, remove_installation, swarm_server
from tests.fixtures.transfer import cli_json
from tests.runner.cells.test_docker_executions import new_runtime, run, text

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

NODE_LOST_BOUND = 30.0  # seconds from a worker's engine killed to its runtimes in error (node-lost)
RM_BOUND = 20.0  # seconds until a stopped runtime's container is gone from its worker


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm") / "data")
    srv.start()
    with srv.client() as client:
        assert client.post("/teams", json={"name": "acme"}).status_code == 201
    yield srv
    remove_installation(swarm, srv)


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


def test_runtimes_are_placed_on_the_worker_their_machine_type_names_and_run_cells(server: Server, manager: Any) -> None:
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


def recorded(srv: Server, rid: str) -> dict[str, Any]:
    db = Database(f"sqlite:///{srv.data_dir / 'envctl.db'}")
    try:
        with db.session() as s:
            row = s.get(Runtime, rid)
            assert row is not None
            return dict(row.backend_state or {})
    finally:
        db.dispose()


def test_nodes_show_labels_capacity_health_and_runtimes_through_the_api_and_the_cli(
    server: Server, swarm: Swarm, capsys: pytest.CaptureFixture[str]
) -> None:
    with server.client() as client:
        gpu = boot(server, client, "gpu-one", "gpu")
        assert gpu["state"] == "running", gpu
        assert gpu["node"] == "swarm-worker2"  # the only node with gpu generic resources
        ex = run(client, gpu["id"], "echo gpu=$DOCKER_RESOURCE_GPU")
        assert "gpu=fixture-gpu-" in text(ex), ex
        nodes = {n["name"]: n for n in client.get("/nodes").json()}
        assert set(nodes) == {"swarm-manager", "swarm-worker1", "swarm-worker2"}
        for name, n in nodes.items():
            assert n["labels"][NODE_LABEL] == name.removeprefix("swarm-")
            assert n["health"] == {"state": "ready", "availability": "active", "message": n["health"]["message"]}
            assert n["capacity"]["nano_cpus"] > 0 and n["capacity"]["memory"] > 0
        assert nodes["swarm-manager"]["role"] == "manager" and nodes["swarm-worker1"]["role"] == "worker"
        assert nodes["swarm-worker2"]["capacity"]["generic_resources"] == {"gpu": 2}
        assert gpu["id"] in nodes["swarm-worker2"]["runtimes"]
        assert nodes["swarm-worker2"]["reserved"]["generic_resources"] == {"gpu": 1}
        listed = cli_json(server, capsys, "nodes")
        assert {n["name"]: n["runtimes"] for n in listed}["swarm-worker2"] == nodes["swarm-worker2"]["runtimes"]
        assert client.delete(f"/runtimes/{gpu['id']}").status_code in (200, 202, 204)


@pytest.mark.parametrize(("machine", "named"), [("huge", "memory"), ("gpu-many", "4 gpu")])
def test_a_runtime_no_node_fits_fails_naming_the_resource_and_leaves_no_service(
    server: Server, manager: Any, machine: str, named: str
) -> None:
    with server.client() as client:
        rt = boot(server, client, f"nofit-{machine}", machine)
        assert rt["state"] == "error", rt
        assert "could not be placed" in rt["state_message"] and named in rt["state_message"], rt["state_message"]
        assert not manager.api.services(filters={"label": f"envctl.runtime-id={rt['id']}"})


def test_a_stopped_runtime_leaves_no_service_secret_or_container_on_its_worker(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    with server.client() as client:
        rt = boot(server, client, "stopper", "w1")
        assert rt["state"] == "running", rt
        state = recorded(server, rt["id"])
        worker = docker.DockerClient(base_url=swarm.host("worker1"), timeout=30)
        try:
            label = {"label": f"com.docker.swarm.service.id={state['service_id']}"}
            assert worker.api.containers(filters=label)
            assert client.post(f"/runtimes/{rt['id']}/stop").status_code in (200, 202)
            server.wait_state(client, rt["id"], {"stopped"}, timeout=60)
            with pytest.raises(docker.errors.NotFound):
                manager.api.inspect_service(state["service_id"])
            with pytest.raises(docker.errors.NotFound):
                manager.api.inspect_secret(state["secret_id"])
            deadline = time.monotonic() + RM_BOUND
            while worker.api.containers(all=True, filters=label) and time.monotonic() < deadline:
                time.sleep(0.3)
            assert not worker.api.containers(all=True, filters=label), f"a container stayed for {RM_BOUND} s"
        finally:
            worker.close()


def test_secrets_and_the_credential_are_in_no_service_task_or_container_field(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    """R6 and R40 on Swarm: the service's spec, its task, the container's inspect on the worker."""
    value = f"swarm-S3cret-{uuid.uuid4().hex[:8]}"
    with server.client() as client:
        assert client.put("/teams/acme/secrets/swarmpw", json={"value": value}).status_code in (200, 201)
        rid = new_runtime(
            client,
            "secretive",
            environment="bash",
            language="bash",
            machine_type="w2",
            team="acme",
            env={"PLAIN": "visible", "PW": {"secret": "swarmpw", "team": "acme"}},
        )
        client.post(f"/runtimes/{rid}/start")
        rt = server.wait_state(client, rid, {"running", "error"}, timeout=240)
        assert rt["state"] == "running", rt
        ex = run(client, rid, 'echo "$PW" | rev; ls -l /run/envctl; grep NoNewPrivs /proc/self/status')
        out = text(ex)
        assert value[::-1] in out, ex
        assert "NoNewPrivs:\t1" in out, out  # the agent sets it: Swarm 20.10 cannot
        state = recorded(server, rid)
        to = AgentLinks(SecretBox(server.data_dir / "secrets.key")).address(rid, state["agent"])
        service = manager.api.inspect_service(state["service_id"])
        tasks = manager.api.tasks(filters={"service": state["service_id"]})
        worker = docker.DockerClient(base_url=swarm.host("worker2"), timeout=30)
        try:
            [container] = worker.api.containers(filters={"label": f"com.docker.swarm.service.id={service['ID']}"})
            inspected = worker.api.inspect_container(container["Id"])
            logs = worker.api.logs(container["Id"]).decode(errors="replace")
        finally:
            worker.close()
        secret = manager.api.inspect_secret(state["secret_id"])
        where = {"service": service, "tasks": tasks, "container": inspected, "logs": logs, "secret": secret}
        for name, found in where.items():
            blob = json.dumps(found)
            assert value not in blob, f"the secret's value is in the {name}"
            assert to.key.hex() not in blob and "PRIVATE KEY" not in blob, f"the agent's credential is in the {name}"
        assert "PLAIN=visible" in json.dumps(inspected["Config"]["Env"])
        client.delete(f"/runtimes/{rid}")


def test_a_connection_to_an_agent_without_its_credential_is_refused(server: Server) -> None:
    with server.client() as client:
        rt = boot(server, client, "guarded", "w1")
        assert rt["state"] == "running", rt
        state = recorded(server, rt["id"])
        host, port = state["agent"]["host"], int(state["agent"]["port"])
        with socket.create_connection((host, port), timeout=5) as plain:
            plain.sendall(b'{"id": 1, "op": "ping"}\n')
            plain.settimeout(10)
            try:
                answer = plain.recv(4096)
            except ConnectionResetError:
                answer = b""
            assert b"pong" not in answer
        reported: list[str] = []
        links = AgentLinks(SecretBox(server.data_dir / "secrets.key"))
        to = links.address(rt["id"], state["agent"], lambda _rid, message, _details: reported.append(message))
        with pytest.raises(AgentUnavailableError):
            AgentChannel(AgentAddress(host, port, rt["id"], to.boot, b"\1" * 32, to.pin), timeout=5)
        with AgentChannel(to, timeout=5) as channel:  # the agent tells the next rightful caller
            assert channel.ping()["op"] == "pong"
        assert any("no TLS handshake" in m for m in reported), reported
        assert any("closed during the handshake" in m or "proof" in m for m in reported), reported
        client.delete(f"/runtimes/{rt['id']}")


CHECKSUMS = "find /opt/t -type f | sort | xargs sha256sum; stat -c '%n %a %F' /opt/t /opt/t/*"


def save_op(client: httpx.Client, rid: str, environment: str) -> dict[str, Any]:
    r = client.post(f"/runtimes/{rid}/save", json={"environment": environment})
    assert r.status_code == 202, r.text
    op = r.json()
    deadline = time.monotonic() + 240
    while op["status"] == "running" and time.monotonic() < deadline:
        op = client.get(f"/operations/{op['id']}", params={"wait": 10}).json()
    return dict(op)


def test_a_save_on_worker1_boots_on_worker2_with_every_file_the_same(server: Server) -> None:
    with server.client() as client:
        writer = boot(server, client, "writer", "w1")
        assert writer["state"] == "running" and writer["node"] == "swarm-worker1", writer
        made = run(
            client,
            writer["id"],
            "mkdir -p /opt/t/sub && head -c 300000 /dev/urandom > /opt/t/blob && echo hello > /opt/t/sub/x"
            " && chmod 640 /opt/t/blob && ln -s sub/x /opt/t/link && " + CHECKSUMS,
        )
        assert made["status"] == "ok", made
        op = save_op(client, writer["id"], "acme/swarmsave")
        assert op["status"] == "succeeded", op
        reader = boot(server, client, "reader", "w2", environment="acme/swarmsave")
        assert reader["state"] == "running" and reader["node"] == "swarm-worker2", reader
        read = run(client, reader["id"], CHECKSUMS)
        assert read["status"] == "ok", read
        assert text(read) == text(made) and "/opt/t/blob" in text(read)
        for rid in (writer["id"], reader["id"]):
            client.delete(f"/runtimes/{rid}")


def test_envctl_killed_and_started_again_adopts_its_services_with_their_state(server: Server, manager: Any) -> None:
    with server.client() as client:
        rt = boot(server, client, "survivor", "w2")
        assert rt["state"] == "running", rt
        run(client, rt["id"], "export KEPT=4711")
        before = recorded(server, rt["id"])
        server.kill()
        server.start()
        after = server.wait_state(client, rt["id"], {"running", "error"}, timeout=60)
        assert after["state"] == "running", after
        ex = run(client, rt["id"], "echo kept=$KEPT")
        assert "kept=4711" in text(ex), ex
        assert recorded(server, rt["id"])["service_id"] == before["service_id"]
        assert len(manager.api.services(filters={"label": f"envctl.runtime-id={rt['id']}"})) == 1
        client.delete(f"/runtimes/{rt['id']}")


def test_two_installations_on_one_swarm_leave_each_other_alone(
    server: Server, swarm: Swarm, manager: Any, tmp_path: Path
) -> None:
    """R32 on Swarm: a second installation whose runner has the same name; each adopts its own
    services only, through several reconcile rounds and a restart of each."""
    other = swarm_server(swarm, tmp_path / "other", runner=server.env["ENVCTL_RUNNER_NAME"])
    other.start()
    try:
        with server.client() as mine, other.client() as theirs:
            a = boot(server, mine, "ours", "w1")
            b = boot(other, theirs, "theirs", "w1")
            assert a["state"] == b["state"] == "running", (a, b)
            for srv in (server, other):
                srv.kill()
                srv.start()
            time.sleep(3)  # several housekeeping rounds of each
            for srv, client, rid in ((server, mine, a["id"]), (other, theirs, b["id"])):
                assert srv.wait_state(client, rid, {"running", "error"})["state"] == "running"
                assert "ok" in text(run(client, rid, "echo ok"))
            assert theirs.get(f"/runtimes/{a['id']}").status_code == 404
            assert a["id"] not in json.dumps(theirs.get("/nodes").json())
            mine.delete(f"/runtimes/{a['id']}")
            assert len(manager.api.services(filters={"label": f"envctl.runtime-id={b['id']}"})) == 1
            theirs.delete(f"/runtimes/{b['id']}")
    finally:
        remove_installation(swarm, other)


def test_a_worker_lost_turns_its_runtimes_to_node_lost_and_leaves_the_others_running(
    server: Server, swarm: Swarm
) -> None:
    """R39: a worker's dockerd killed: its runtime goes to error (node-lost) within a bound, the
    log saying unsaved work there is gone; the other worker's runtime keeps running and its
    cells keep working. The worker is started again for what follows."""
    with server.client() as client:
        lost = boot(server, client, "doomed", "w1")
        kept = boot(server, client, "spared", "w2")
        assert lost["state"] == kept["state"] == "running", (lost, kept)
        run(client, kept["id"], "export STILL=here")
        killed_at = time.monotonic()
        os.kill(swarm.engine_pid("worker1"), signal.SIGKILL)
        try:
            rt = server.wait_state(client, lost["id"], {"error"}, timeout=NODE_LOST_BOUND)
            took = time.monotonic() - killed_at
            print(f"\nnode-lost after {took:.1f} s")
            assert rt["state_reason"] == "node-lost", rt
            assert "unsaved work on that node is gone" in rt["state_message"], rt
            assert any(e.get("reason") == "node-lost" for e in log_of(client, lost["id"]))
            other = client.get(f"/runtimes/{kept['id']}").json()
            assert other["state"] == "running", other
            assert "still=here" in text(run(client, kept["id"], "echo still=$STILL"))
            nodes = {n["name"]: n for n in client.get("/nodes").json()}
            assert nodes["swarm-worker1"]["health"]["state"] == "down"
        finally:
            swarm.start("worker1")
        again = client.post(f"/runtimes/{lost['id']}/start")
        assert again.status_code in (200, 202), again.text
        back = server.wait_state(client, lost["id"], {"running", "error"}, timeout=120)
        assert back["state"] == "running", (back.get("state_reason"), back.get("state_message"))
        for rid in (lost["id"], kept["id"]):
            client.delete(f"/runtimes/{rid}")
