"""Attach on the Swarm backend (issue 17 item 3: "with the cluster backend, attach works on any
node's container that the allow-list names"), on the real three-engine swarm of
``scripts/swarm-fixture``: a container the test starts itself with ``docker run`` on worker1's
own engine (not envctl, not a service), with python3, attached through envctl's helper tasks on
that node (``runner/backends/swarm_attach.py``); cells see its processes and files; a stop
(detach), an idle shutdown and the runtime's deletion leave no process or file of envctl's in
it (its processes, ``docker diff`` and networks compared before and after) and no helper service
or secret on the swarm; envctl killed and started again reaches the same agent; the container
keeps running, never restarted; one outside the allow-list is a 403 naming the rules; one
without python3 is a 409 saying so; without ``ENVCTL_SWARM_ATTACH_ENGINE`` attach is a 409
naming the setting."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker as sdk
import httpx
import pytest

from envs.kit.errors import InvalidInputError, NotSupportedError
from runner.backends.swarm import SwarmBackend
from runner.backends.swarm_attach import LABEL_ATTACHED, NODE_SOCKET_LABEL
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import _installation_of, remove_installation, swarm_server
from tests.kube.test_kube_attach import LISTER, _agent_key, unchanged
from tests.runner.cells.test_docker_executions import text

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

ALLOW = "label:envctl.attach=yes,name:data-*"


@pytest.fixture(scope="module")
def sockets(swarm: Swarm) -> Iterator[None]:
    """Each node labelled with its engine's socket path (the fixture's engines do not listen at
    /var/run/docker.sock, which on this host is another engine), as an admin of such nodes would."""
    client = sdk.DockerClient(base_url=swarm.host("manager"), timeout=30)
    try:
        for node in swarm.nodes:
            _label(client, swarm.node_id(node), swarm.host(node).removeprefix("unix://"))
        yield
    finally:
        for node in swarm.nodes:
            _label(client, swarm.node_id(node), None)
        client.close()


def _label(client: sdk.DockerClient, node_id: str, value: str | None) -> None:
    node = client.nodes.get(node_id)
    spec = dict(node.attrs["Spec"])
    labels = dict(spec.get("Labels") or {})
    if value is None:
        labels.pop(NODE_SOCKET_LABEL, None)
    else:
        labels[NODE_SOCKET_LABEL] = value
    spec["Labels"] = labels
    node.update(spec)


def node_engine(swarm: Swarm, docker: Any, node: str) -> sdk.DockerClient:
    """``node``'s own engine, with the bash base image (python3 in it) loaded."""
    image = base_image(docker, "bash")
    client = sdk.DockerClient(base_url=swarm.host(node), timeout=120)
    try:
        client.images.get(image)
    except sdk.errors.ImageNotFound:
        saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)  # noqa: S607
        loaded = subprocess.run(
            ["docker", "-H", swarm.host(node), "load"],  # noqa: S607
            stdin=saved.stdout,
            capture_output=True,
            timeout=300,
        )
        saved.wait(60)
        assert loaded.returncode == 0, loaded.stderr
    return client


@pytest.fixture(scope="module")
def engines(swarm: Swarm, docker: Any) -> Iterator[dict[str, sdk.DockerClient]]:
    """The workers' own engines (the test's containers on them removed at the end)."""
    clients = {node: node_engine(swarm, docker, node) for node in ("worker1", "worker2")}
    yield clients
    for client in clients.values():
        for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={TEST_SESSION}"}):
            c.remove(force=True)
        client.close()


@pytest.fixture(scope="module")
def worker(engines: dict[str, sdk.DockerClient]) -> sdk.DockerClient:
    return engines["worker1"]


@pytest.fixture(scope="module")
def server(swarm: Swarm, sockets: None, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(
        swarm,
        tmp_path_factory.mktemp("swarm-attach") / "data",
        ENVCTL_RUNNER_ATTACH_ALLOW=ALLOW,
        ENVCTL_SWARM_ATTACH_ENGINE="/var/run/docker.sock",  # overridden by each node's label
    )
    srv.start()
    deadline = time.monotonic() + 300  # the helpers' image pushed and pulled on every node once
    while "attach helpers ready" not in srv.output() and time.monotonic() < deadline:
        assert "attach helpers: not ready" not in srv.output(), srv.output()[-3000:]
        time.sleep(0.5)
    yield srv
    remove_installation(swarm, srv)


def run_container(
    worker: sdk.DockerClient, docker: Any, name: str, command: str, labels: dict[str, str], **options: Any
) -> Any:
    """A container of the test's own on a worker (``docker run``, not a service)."""
    c = worker.containers.run(
        base_image(docker, "bash"),
        ["bash", "-c", command],
        name=name,
        detach=True,
        labels={TEST_LABEL: TEST_SESSION, **labels},
        environment={"SERVICE_MODE": "prod"},
        working_dir="/opt",
        **options,
    )
    time.sleep(0.5)  # its command's own files made
    c.reload()
    return c


def looks(c: Any) -> dict[str, Any]:
    """Its processes and files (from inside, by the test's own exec), ``docker diff`` and networks."""
    c.reload()
    code, out = c.exec_run(["python3", "-B", "-c", LISTER])
    assert code == 0, out
    said = dict(json.loads(out))
    said["diff"] = sorted(json.dumps(d, sort_keys=True) for d in (c.diff() or []))
    said["networks"] = {k: v.get("IPAddress") for k, v in c.attrs["NetworkSettings"]["Networks"].items()}
    return said


def same_as(before: dict[str, Any], c: Any) -> None:
    now = looks(c)
    unchanged(before, now)
    assert now["diff"] == before["diff"], (before["diff"], now["diff"])
    assert now["networks"] == before["networks"], (before["networks"], now["networks"])


def helpers(swarm: Swarm) -> tuple[list[Any], list[Any]]:
    """The attach relays and their secrets on the swarm."""
    client = sdk.DockerClient(base_url=swarm.host("manager"), timeout=30)
    try:
        services = client.api.services(filters={"label": LABEL_ATTACHED})
        secrets = client.api.secrets(filters={"label": LABEL_ATTACHED})
    finally:
        client.close()
    return list(services), list(secrets)


def attach(client: httpx.Client, name: str, container: str) -> httpx.Response:
    return client.post("/runtimes", json={"name": name, "attach": {"container": container}})


def run(client: httpx.Client, rid: str, code: str, language: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, **({"language": language} if language else {})}
    r = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json=body)
    assert r.status_code == 202, r.text
    ex = dict(r.json())
    deadline = time.monotonic() + 60  # a first cell waits for the attach (a helper task on the node)
    while ex["status"] in ("queued", "running") and time.monotonic() < deadline:
        ex = dict(client.get(f"/executions/{ex['id']}", params={"wait": 10}).json())
    return ex


def test_cells_run_in_a_workers_container_envctl_did_not_start_which_is_left_as_it_was(
    server: Server, swarm: Swarm, worker: sdk.DockerClient, docker: Any
) -> None:
    tag = uuid.uuid4().hex[:6]
    name = f"data-svc-{tag}"
    c = run_container(
        worker,
        docker,
        name,
        "mkdir -p /srv && echo service-data > /srv/data.txt && "
        "exec python3 -c 'import time; time.sleep(86400)' data-service",
        {"app": "data"},
    )
    started = c.attrs["State"]["StartedAt"]
    other = run_container(worker, docker, f"other-{tag}", "exec sleep 86400", {})
    before = looks(c)
    assert any("data-service" in p[3] for p in before["procs"]), before["procs"]
    with server.client() as client:
        began = time.monotonic()
        refused = attach(client, "nope", other.name)
        print(f"\nswarm attach: a refused attach (a find on the 3 nodes) {time.monotonic() - began:.2f} s")
        assert refused.status_code == 403, refused.text
        message = refused.json()["error"]["message"]
        assert "label:envctl.attach=yes" in message and "name:data-*" in message, message
        assert attach(client, "missing", f"data-none-{tag}").status_code == 404

        began = time.monotonic()
        r = attach(client, "svc", name)
        print(f"swarm attach: POST /runtimes attach {time.monotonic() - began:.2f} s")
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert r.json()["language"] == "python"
        # what an attach whose relay died with it would have left: removed, placed again
        planted = f"/dev/shm/.envctl-agent-{rid}"
        assert c.exec_run(["sh", "-c", f"mkdir {planted} && touch {planted}/main.py"]).exit_code == 0
        ex = run(
            client,
            rid,
            "import os; print(os.environ['SERVICE_MODE'], os.getcwd(), open('/srv/data.txt').read().strip())",
        )
        assert ex["status"] == "ok", ex
        assert text(ex) == "prod /opt service-data\n", ex
        ex = run(
            client,
            rid,
            "import os\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n"
            "        c = open(f'/proc/{p}/cmdline', 'rb').read()\n        if b'data-service' in c: print('seen', p)",
        )
        assert text(ex).startswith("seen "), ex
        ex = run(client, rid, "echo $SERVICE_MODE; pwd; hostname; cat /srv/data.txt", language="bash")
        assert text(ex) == f"prod\n/opt\n{c.attrs['Config']['Hostname']}\nservice-data\n", ex
        shown = client.get(f"/runtimes/{rid}").json()
        assert shown["origin"] == "attached" and shown["state"] == "running", shown
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any("attached to container" in e["message"] for e in log), log
        services, secrets = helpers(swarm)
        assert len(services) == 1 and len(secrets) == 1, (services, secrets)
        during = looks(c)
        placed = [f[0] for f in during["files"] if "/.envctl-agent-" in f[0]]
        assert placed and all(p.startswith("/dev/shm/.envctl-agent-") for p in placed), placed
        assert not [p for p in placed if p.endswith("agent.key")], placed
        assert during["networks"] == before["networks"]
        # the attach's key: in no process or variable of the container, nor in the relay's
        # service, task, container or log (only in its secret file, a tmpfs of the task)
        key = _agent_key(server, rid)
        assert key and not any(key in p[3] for p in during["procs"])
        code, environ = c.exec_run(["sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"])
        assert key not in environ.decode(errors="replace")
        manager = sdk.DockerClient(base_url=swarm.host("manager"), timeout=30)
        try:
            relay = services[0]["ID"]
            shown = json.dumps([manager.api.inspect_service(relay), manager.api.tasks(filters={"service": relay})])
            logs = b"".join(manager.api.service_logs(relay, stdout=True, stderr=True)).decode(errors="replace")
        finally:
            manager.close()
        assert key not in shown and key not in logs, logs
        relays = worker.containers.list(filters={"label": f"com.docker.swarm.service.id={relay}"})
        assert len(relays) == 1 and key not in json.dumps(relays[0].attrs)

        # a stop detaches: nothing of envctl's is left; the container runs on, never restarted
        began = time.monotonic()
        stopped = client.post(f"/runtimes/{rid}/stop", params={"wait": 30}).json()
        print(f"swarm attach: stop (detach) {time.monotonic() - began:.2f} s")
        assert stopped["state"] == "stopped", stopped
        same_as(before, c)
        assert helpers(swarm) == ([], []), helpers(swarm)
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any(e["event"] == "detached" and "files removed" in e["message"] for e in log), log

        # a cell attaches again; envctl killed and started again reaches the same agent
        began = time.monotonic()
        ex = run(client, rid, "x = 40; print(2 + 2)")
        print(f"swarm attach: a cell on the stopped attached runtime (attach + cell) {time.monotonic() - began:.2f} s")
        assert text(ex) == "4\n", ex
        began = time.monotonic()
        ex = run(client, rid, "print(2 + 2)")
        print(f"swarm attach: a cell while attached {time.monotonic() - began:.3f} s")
        server.kill()
        server.start()
    with server.client() as client:
        ex = run(client, rid, "print(x + 2)")
        assert text(ex) == "42\n", ex  # the same agent: its interpreter state kept
        # idle shutdown detaches
        assert client.patch(f"/runtimes/{rid}", json={"idle_timeout": 1}).status_code == 200
        server.wait_state(client, rid, {"stopped"}, timeout=60)
        same_as(before, c)
        # deleting the runtime (attached again by a cell) detaches and leaves the container
        ex = run(client, rid, "print(2 + 2)")
        assert text(ex) == "4\n", ex
        assert client.delete(f"/runtimes/{rid}").status_code == 204
    same_as(before, c)
    assert helpers(swarm) == ([], []), helpers(swarm)
    c.reload()
    assert c.status == "running" and c.attrs["State"]["StartedAt"] == started
    assert c.attrs["RestartCount"] == 0


def test_a_container_without_python3_is_refused_saying_why(
    server: Server, worker: sdk.DockerClient, docker: Any
) -> None:
    """Its python3 removed (the base image carries one for envctl's agent): the agent has
    nothing to run on in the container."""
    name = f"data-bash-{uuid.uuid4().hex[:6]}"
    run_container(worker, docker, name, "rm -f /usr/bin/python3* /usr/local/bin/python3*; exec sleep 86400", {})
    with server.client() as client:
        r = attach(client, "bashonly", name)
        assert r.status_code == 409, r.text
        assert "no python3" in r.json()["error"]["message"], r.text


def test_without_the_setting_attach_is_a_409_naming_it(swarm: Swarm) -> None:
    backend = SwarmBackend(swarm.host("manager"), registry=swarm.registry_host, signing_key=None)
    try:
        with pytest.raises(NotSupportedError) as caught:
            backend.inspect_other("data-anything")
    finally:
        backend.close()
    assert caught.value.status == 409
    assert "ENVCTL_SWARM_ATTACH_ENGINE" in caught.value.message, caught.value.message
    with pytest.raises(InvalidInputError, match="ENVCTL_SWARM_ATTACH_ENGINE: 'docker.sock' is no absolute path"):
        SwarmBackend(swarm.host("manager"), registry=swarm.registry_host, signing_key=None, attach_engine="docker.sock")


def test_a_container_removed_behind_envctls_back_on_the_other_worker_turns_its_runtime_to_error(
    server: Server, swarm: Swarm, engines: dict[str, sdk.DockerClient], docker: Any
) -> None:
    name = f"data-gone-{uuid.uuid4().hex[:6]}"
    c = run_container(engines["worker2"], docker, name, "exec sleep 86400", {})
    with server.client() as client:
        r = attach(client, "gone", name)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        ex = run(client, rid, "import socket; print(socket.gethostname())")
        assert text(ex) == f"{c.attrs['Config']['Hostname']}\n", ex
        c.remove(force=True)
        rt = server.wait_state(client, rid, {"error"}, timeout=60)
        assert rt["state_reason"] == "agent-unreachable", rt
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any(e["event"] == "detached" for e in log), log
        assert client.delete(f"/runtimes/{rid}").status_code == 204
    assert helpers(swarm) == ([], []), helpers(swarm)


def test_a_container_on_the_host_network_is_reached_on_its_nodes_loopback(
    server: Server, swarm: Swarm, engines: dict[str, sdk.DockerClient], docker: Any
) -> None:
    name = f"data-host-{uuid.uuid4().hex[:6]}"
    c = run_container(engines["worker2"], docker, name, "exec sleep 86400", {}, network_mode="host")
    before = looks(c)
    with server.client() as client:
        r = attach(client, "hostnet", name)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        ex = run(client, rid, "import socket; print(socket.gethostname())")
        assert ex["status"] == "ok", ex
        assert text(ex) == "swarm-worker2\n", ex  # the node's namespaces: its hostname
        assert client.get(f"/runtimes/{rid}").json()["state"] == "running"
        assert client.delete(f"/runtimes/{rid}").status_code == 204
    same_as(before, c)
    assert helpers(swarm) == ([], []), helpers(swarm)


def test_a_relay_left_for_a_runtime_that_is_not_attached_is_removed(server: Server, swarm: Swarm) -> None:
    """What an envctl killed while attaching, or one down while the runtime was deleted, leaves:
    a relay of its runner (and its secret) for a runtime that is not attached; housekeeping
    removes both."""
    installation = _installation_of(server)
    assert installation
    labels = {
        TEST_LABEL: TEST_SESSION,
        "envctl.installation": installation,
        "envctl.runner": server.env["ENVCTL_RUNNER_NAME"],
        LABEL_ATTACHED: "rt_notattached0000",
    }
    manager = sdk.DockerClient(base_url=swarm.host("manager"), timeout=30)
    try:
        secret = manager.api.create_secret(f"envctl-attach-stray-{uuid.uuid4().hex[:6]}", b"x", labels=labels)
        service = manager.api.create_service(
            sdk.types.TaskTemplate(
                sdk.types.ContainerSpec("envctl-test-nothing:none", ["sleep", "600"]),
                restart_policy=sdk.types.RestartPolicy(condition="none"),
            ),
            name=f"envctl-attach-stray-{uuid.uuid4().hex[:6]}",
            labels=labels,
        )
        deadline = time.monotonic() + 30
        while helpers(swarm) != ([], []) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert helpers(swarm) == ([], []), (service, secret, helpers(swarm))
    finally:
        manager.close()
    assert "removed the attach relay" in server.output() and "rt_notattached0000" in server.output()
