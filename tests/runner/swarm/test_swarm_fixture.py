"""The real three-engine swarm (tests/fixtures/swarm.py) and the facts of Docker Swarm 20.10 the
Swarm backend (issue 15) relies on, checked on real engines through the manager's API with the
Docker SDK the backend uses: placement by node label, what a task that fits nowhere says, what
an image that cannot be pulled does, what ``service rm`` leaves, which of R1's limits a service
spec enforces, how a secret is mounted, and how soon a killed worker is reported down.
runner/backends/swarm_notes.md has the figures and messages these tests pin down.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker.types import (
    ContainerSpec,
    DriverConfig,
    Placement,
    Resources,
    RestartPolicy,
    SecretReference,
    TaskTemplate,
)

from registry import signing
from registry.distribution import ISSUER, SERVICE
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures import swarm_cluster
from tests.fixtures.swarm import Swarm, SwarmRegistry, serve_registry, tiny_image_tar

pytestmark = pytest.mark.swarm

NODE_LABEL = "envctl.fixture.node"
NODE_DOWN_BOUND = 15.0  # seconds, with the fixture's dispatcher heartbeat of 1 s
RM_BOUND = 15.0  # seconds until service rm leaves no container on the node


@pytest.fixture
def engines(swarm: Swarm) -> Iterator[Callable[[str], Any]]:
    """A Docker SDK client of one node's own engine (what only that node knows: its containers)."""
    clients: dict[str, Any] = {}

    def engine(node: str) -> Any:
        if node not in clients:
            clients[node] = docker.DockerClient(base_url=swarm.host(node), timeout=30)
        return clients[node]

    yield engine
    for c in clients.values():
        c.close()


@pytest.fixture
def secrets(manager: Any) -> Iterator[Callable[[bytes], Any]]:
    """Creates labelled swarm secrets; removes them after the services that use them."""
    made: list[Any] = []

    def create(data: bytes) -> Any:
        made.append(manager.secrets.create(name=f"envctl-test-{uuid.uuid4().hex[:10]}", data=data,
                                           labels={TEST_LABEL: TEST_SESSION}))  # fmt: skip
        return made[-1]

    yield create
    for secret in made:
        secret.remove()


@pytest.fixture
def services(manager: Any, secrets: Any) -> Iterator[Callable[..., Any]]:
    """Creates labelled one-task services with no restart; removes them after the test (before
    the test's secrets)."""
    made: list[Any] = []

    def create(image: str, command: list[str], *, restart: str = "none", spec: dict[str, Any] | None = None,
               resources: Resources | None = None, constraints: list[str] | None = None,
               secrets: list[SecretReference] | None = None, delay_ns: int = 0,
               log_driver: DriverConfig | None = None) -> Any:  # fmt: skip
        container = ContainerSpec(image, command=command, stop_grace_period=1_000_000_000, secrets=secrets)
        container.update(spec or {})
        template = TaskTemplate(
            container,
            resources=resources,
            restart_policy=RestartPolicy(condition=restart, delay=delay_ns),
            placement=Placement(constraints=constraints or []),
            log_driver=log_driver,
        )
        name = f"envctl-test-{uuid.uuid4().hex[:10]}"
        created = manager.api.create_service(template, name=name, labels={TEST_LABEL: TEST_SESSION})
        service = manager.services.get(created["ID"])
        made.append(service)
        return service

    yield create
    for service in made:
        with contextlib.suppress(docker.errors.NotFound):  # a test removed it
            service.remove()


def wait_task(service: Any, ready: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    tasks: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        tasks = service.tasks()
        for task in tasks:
            if ready(task):
                return task
        time.sleep(0.1)
    raise AssertionError(f"no task of {service.name} came to the expected state in {timeout} s: {tasks}")


def state(task: dict[str, Any]) -> str:
    return str(task["Status"]["State"])


def logs(service: Any) -> str:
    return b"".join(service.logs(stdout=True, stderr=True)).decode()


def test_three_nodes_ready_one_manager(swarm: Swarm, manager: Any) -> None:
    nodes = manager.nodes.list()
    assert len(nodes) == 3
    assert all(n.attrs["Status"]["State"] == "ready" and n.attrs["Spec"]["Availability"] == "active" for n in nodes)
    managers = [n for n in nodes if n.attrs["Spec"]["Role"] == "manager"]
    assert [n.id for n in managers] == [swarm.node_id("manager")]
    assert managers[0].attrs["ManagerStatus"]["Leader"] is True
    by_label = {n.attrs["Spec"]["Labels"][NODE_LABEL]: n for n in nodes}
    assert {k: v.id for k, v in by_label.items()} == {node: swarm.node_id(node) for node in swarm.nodes}
    assert {n.attrs["Description"]["Hostname"] for n in nodes} == {f"swarm-{node}" for node in swarm.nodes}
    # each node's own address on the fixture's bridge, none of the host's
    assert {n.attrs["Status"]["Addr"] for n in nodes} == {
        swarm.env[f"ENVCTL_SWARM_{x.upper()}_ADDR"] for x in swarm.nodes
    }


@pytest.mark.parametrize("node", ["worker1", "worker2"])
def test_a_one_task_service_runs_on_the_worker_its_label_names(
    swarm: Swarm, swarm_registry: SwarmRegistry, services: Callable[..., Any], engines: Callable[[str], Any], node: str
) -> None:
    service = services(
        swarm_registry.image,
        ["/bin/sh", "-c", "echo hello from the swarm; sleep 60"],
        constraints=[f"node.labels.{NODE_LABEL}=={node}"],
    )
    task = wait_task(service, lambda t: state(t) == "running")
    assert task["NodeID"] == swarm.node_id(node)
    # the container is on that worker's engine (pulled from the registry on the bridge), nowhere else
    cid = task["Status"]["ContainerStatus"]["ContainerID"]
    assert engines(node).containers.get(cid).labels["com.docker.swarm.service.id"] == service.id
    others = [n for n in swarm.nodes if n != node]
    for other in others:
        assert not engines(other).containers.list(
            all=True, filters={"label": f"com.docker.swarm.service.id={service.id}"}
        )
    deadline = time.monotonic() + 10
    while "hello from the swarm" not in logs(service) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "hello from the swarm" in logs(service)


def test_what_fits_no_node_stays_pending_and_says_why(
    swarm: Swarm, swarm_registry: SwarmRegistry, services: Callable[..., Any], manager: Any
) -> None:
    """Swarm 20.10 says 'insufficient resources' without naming which one: the backend must
    compare the reservation with the nodes' capacity itself to say which resource is missing."""
    memory = max(n.attrs["Description"]["Resources"]["MemoryBytes"] for n in manager.nodes.list())
    cases = {
        "memory": Resources(mem_reservation=memory * 2),
        "cpu": Resources(cpu_reservation=64 * 10**9),
        "gpu": Resources(generic_resources={"gpu": 3}),  # worker2 has two
    }
    made = {what: services(swarm_registry.image, ["/bin/sleep", "60"], resources=r) for what, r in cases.items()}
    made["constraint"] = services(swarm_registry.image, ["/bin/sleep", "60"], constraints=["node.labels.nothing==here"])
    time.sleep(3)  # the scheduler has long decided by then; they stay pending
    for what, service in made.items():
        (task,) = service.tasks()
        assert state(task) == "pending", what
        assert task["Status"]["Message"] == "pending task scheduling"
        assert "NodeID" not in task or not task["NodeID"]
        expected = "scheduling constraints not satisfied on 3 nodes" if what == "constraint" else (
            "insufficient resources on 3 nodes")  # fmt: skip
        assert task["Status"]["Err"] == f"no suitable node ({expected})", what


def test_a_gpu_as_generic_resource_places_the_task_and_names_the_device(
    swarm: Swarm, swarm_registry: SwarmRegistry, services: Callable[..., Any]
) -> None:
    service = services(swarm_registry.image, ["/bin/sh", "-c", "export -p; sleep 60"],
                       resources=Resources(generic_resources={"gpu": 1}))  # fmt: skip
    task = wait_task(service, lambda t: state(t) == "running")
    assert task["NodeID"] == swarm.node_id("worker2")
    assert task["GenericResources"][0]["NamedResourceSpec"]["Kind"] == "gpu"
    deadline = time.monotonic() + 10
    while "DOCKER_RESOURCE_GPU" not in logs(service) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert re.search(r"DOCKER_RESOURCE_GPU='?fixture-gpu-[01]", logs(service))


def test_service_rm_leaves_no_container_on_the_worker(
    swarm: Swarm, swarm_registry: SwarmRegistry, services: Callable[..., Any], engines: Callable[[str], Any]
) -> None:
    service = services(swarm_registry.image, ["/bin/sleep", "300"], constraints=[f"node.labels.{NODE_LABEL}==worker2"])
    wait_task(service, lambda t: state(t) == "running")
    worker = engines("worker2")
    label = {"label": f"com.docker.swarm.service.id={service.id}"}
    assert worker.containers.list(filters=label)
    started = time.monotonic()
    service.remove()
    while worker.containers.list(all=True, filters=label) and time.monotonic() - started < RM_BOUND:
        time.sleep(0.1)
    took = time.monotonic() - started
    print(f"\nservice rm -> no container on the worker: {took:.1f} s (stop grace period 1 s, sleep ignores SIGTERM)")
    assert not worker.containers.list(all=True, filters=label), f"still there after {RM_BOUND} s"


def test_an_image_that_cannot_be_pulled_is_rejected_once_without_restart(
    swarm: Swarm, swarm_registry: SwarmRegistry, services: Callable[..., Any]
) -> None:
    """With restart condition none a failed pull is one rejected task; with 'any' (the default)
    Swarm makes a new task after each rejection, forever: the backend must use none."""
    missing = f"{swarm_registry.address}/envctl-swarm-missing:{TEST_SESSION}"
    once = services(missing, ["/bin/sleep", "1"])
    again = services(missing, ["/bin/sleep", "1"], restart="any", delay_ns=200_000_000)
    # the manager sets the task's desired state a moment after the node reports the rejection
    task = wait_task(once, lambda t: state(t) == "rejected" and t["DesiredState"] == "shutdown")
    assert task["Status"]["Message"] == "preparing"
    assert task["Status"]["Err"] == f"No such image: {missing}"
    deadline = time.monotonic() + 20
    while len(again.tasks()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(once.tasks()) == 1
    assert len(again.tasks()) >= 3, "with restart condition any a failed pull is tried again and again"


def test_what_a_service_spec_enforces_of_r1(
    swarm: Swarm, swarm_registry: SwarmRegistry, services: Callable[..., Any], engines: Callable[[str], Any],
    secrets: Callable[[bytes], Any],
) -> None:  # fmt: skip
    """Caps, pids, memory and CPU limits, ulimits, read-only root, sysctls, capped logs and an
    init are enforced by the service spec (API 1.41); no-new-privileges is not (nothing in a 20.10
    service spec sets it): a process in the task can set it for itself and its children."""
    secret = secrets(b"agent-credential")
    script = (
        "while read -r k v; do case $k in Cap*|NoNewPrivs*) echo $k $v;; esac; done < /proc/self/status;"
        "echo nofile $(ulimit -n); echo port $(cat /proc/sys/net/ipv4/ip_unprivileged_port_start);"
        "(echo x > /x) 2>/dev/null || echo readonly;"
        "echo pids $(cat /sys/fs/cgroup/pids/pids.max); echo mem $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes);"
        "echo secret $(cat /run/secrets/agent);"
        "while read -r dev point fs opts rest; do [ $point = /run/secrets/agent ] && echo mount $fs $opts; done"
        " < /proc/self/mounts;"
        "setpriv --no-new-privs /bin/sh -c 'while read -r k v; do [ $k = NoNewPrivs: ] && echo child $v; done"
        " < /proc/self/status';"
        "sleep 60"
    )
    spec = {
        "CapabilityDrop": ["ALL"],
        "CapabilityAdd": ["CAP_CHOWN", "CAP_KILL"],
        "Ulimits": [{"Name": "nofile", "Soft": 256, "Hard": 512}],  # not in the SDK's ContainerSpec
        "ReadOnly": True,
        "Sysctls": {"net.ipv4.ip_unprivileged_port_start": "1024"},
        "Init": True,
    }
    resources = Resources(cpu_limit=500_000_000, mem_limit=64 * 2**20)
    resources["Limits"]["Pids"] = 64  # not in the SDK's Resources
    service = services(
        swarm_registry.image, ["/bin/sh", "-c", script], spec=spec, resources=resources,
        constraints=[f"node.labels.{NODE_LABEL}==worker1"],
        secrets=[SecretReference(secret.id, secret.name, filename="agent", mode=0o400)],
        log_driver=DriverConfig("json-file", {"max-size": "1m", "max-file": "2"}),
    )  # fmt: skip
    task = wait_task(service, lambda t: state(t) == "running")
    deadline = time.monotonic() + 10
    while "child" not in logs(service) and time.monotonic() < deadline:
        time.sleep(0.1)
    out = dict(line.split(" ", 1) for line in logs(service).splitlines() if " " in line)
    assert out["CapEff:"] == out["CapBnd:"] == "0000000000000021"  # CHOWN (0) and KILL (5) only
    assert out["NoNewPrivs:"] == "0", "a 20.10 service spec has no no-new-privileges"
    assert out["child"] == "1", "a process of the task sets no-new-privileges for its children"
    assert out["nofile"] == "256"
    assert out["port"] == "1024"
    assert "readonly" in logs(service)
    assert out["pids"] == "64"
    assert out["mem"] == str(64 * 2**20)
    assert out["secret"] == "agent-credential"
    assert out["mount"].startswith("tmpfs ro"), out["mount"]

    container = engines("worker1").containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
    host = container.attrs["HostConfig"]
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["CAP_CHOWN", "CAP_KILL"]
    assert host["PidsLimit"] == 64 and host["Memory"] == 64 * 2**20 and host["NanoCpus"] == 500_000_000
    assert host["ReadonlyRootfs"] is True and host["Init"] is True
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}}
    assert not host["SecurityOpt"], "no security options (no-new-privileges, seccomp, apparmor) in a service"
    assert not host["Binds"]
    # on the node: a file of mode 0400 on a tmpfs of the engine's own, bound read-only into the
    # container; not among the container's Mounts
    assert not [m for m in container.attrs["Mounts"] if "secret" in m["Destination"]]
    on_node = swarm.directory / "worker1" / "data" / "containers" / container.id / "mounts" / "secrets"
    assert stat.S_IMODE((on_node / secret.id).stat().st_mode) == 0o400
    assert (on_node / secret.id).read_bytes() == b"agent-credential"
    mounts = [line.split(" - ") for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert [after.split()[0] for before, after in mounts if before.split()[4] == str(on_node)] == ["tmpfs"]
    assert "agent-credential" not in str(container.attrs)  # not in the environment, labels or config


def test_a_killed_worker_engine_is_reported_down(
    swarm: Swarm, swarm_registry: SwarmRegistry, services: Callable[..., Any], manager: Any
) -> None:
    """SIGKILL to worker1's dockerd: the manager reports the node down within NODE_DOWN_BOUND
    (dispatcher heartbeat 1 s); its task keeps its last state ('running') with desired state
    shutdown — the node's state, not the task's, says the runtime is lost. The engine is
    started again after (without live restore it removes the old containers)."""
    service = services(swarm_registry.image, ["/bin/sleep", "300"], constraints=[f"node.labels.{NODE_LABEL}==worker1"])
    wait_task(service, lambda t: state(t) == "running")
    node = manager.nodes.get(swarm.node_id("worker1"))
    started = time.monotonic()
    os.kill(swarm.engine_pid("worker1"), signal.SIGKILL)
    try:
        while time.monotonic() - started < NODE_DOWN_BOUND:
            node.reload()
            if node.attrs["Status"]["State"] == "down":
                break
            time.sleep(0.1)
        took = time.monotonic() - started
        heartbeat = swarm.env["ENVCTL_SWARM_DISPATCHER_HEARTBEAT"]
        print(f"\nworker engine killed -> node down: {took:.1f} s (dispatcher heartbeat {heartbeat})")
        assert node.attrs["Status"] == {
            "State": "down",
            "Message": "heartbeat failure",
            "Addr": node.attrs["Status"]["Addr"],
        }
        time.sleep(1)
        (task,) = service.tasks()
        assert state(task) == "running" and task["DesiredState"] == "shutdown"
    finally:
        swarm.start("worker1")
    node.reload()
    assert node.attrs["Status"]["State"] == "ready"


def test_a_node_pulls_with_a_registry_token_handed_in_the_create_call(
    swarm: Swarm, swarm_registry: SwarmRegistry, manager: Any, tmp_path: Path
) -> None:
    """envctl's registry trusts only tokens envctl signs. A node pulls with a token handed in
    the service create call's X-Registry-Auth (``{"registrytoken": ...}``) and never asks the
    realm (unreachable here); without a token, or with one for another repository, its task is
    rejected. The token is in neither the service nor its tasks."""
    key = signing.load_or_create(tmp_path / "key")
    auth = {
        "token": {
            "realm": "http://127.0.0.1:9/unreachable-realm",
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(key.cert_path),
        }
    }

    def token(repository: str, actions: list[str]) -> str:
        now = int(time.time())
        access = [{"type": "repository", "name": repository, "actions": actions}]
        claims = {"iss": ISSUER, "sub": "swarm-node", "aud": SERVICE, "iat": now, "nbf": now, "exp": now + 60}
        return key.sign(claims | {"jti": uuid.uuid4().hex, "access": access})

    def create(image: str, node: str, registry_token: str | None) -> str:
        spec = {
            "Name": f"envctl-test-{uuid.uuid4().hex[:10]}",
            "Labels": {TEST_LABEL: TEST_SESSION},
            "TaskTemplate": {
                "ContainerSpec": {"Image": image, "Command": ["/bin/sh", "-c", "echo pulled"]},
                "RestartPolicy": {"Condition": "none"},
                "Placement": {"Constraints": [f"node.labels.{NODE_LABEL}=={node}"]},
            },
        }
        header = base64.urlsafe_b64encode(json.dumps({"registrytoken": registry_token}).encode()).decode()
        response = manager.api._post_json(
            manager.api._url("/services/create"),
            data=spec,
            headers={"X-Registry-Auth": header} if registry_token else {},
        )
        response.raise_for_status()
        return str(response.json()["ID"])

    made: list[str] = []
    with serve_registry(tmp_path, swarm.registry_host, auth) as address:
        try:
            repository = f"team-{TEST_SESSION}/env"
            manager.images.get(swarm_registry.image).tag(f"{address}/{repository}", "1")
            push = {"registrytoken": token(repository, ["pull", "push"])}
            pushed = manager.api.push(f"{address}/{repository}", "1", auth_config=push)
            found = re.search(r'"Digest":"(sha256:[0-9a-f]{64})"', pushed)
            assert found, pushed
            image = f"{address}/{repository}@{found[1]}"
            pull = token(repository, ["pull"])
            cases = [("worker2", None), ("worker2", token("another/repository", ["pull"])), ("worker1", pull)]
            outcome = {}
            for node, registry_token in cases:
                made.append(create(image, node, registry_token))
                service = manager.services.get(made[-1])
                task = wait_task(service, lambda t: state(t) in ("complete", "rejected", "failed"))
                outcome[(node, registry_token)] = (state(task), task["Status"].get("Err"))
                assert pull not in json.dumps(service.attrs) + json.dumps(service.tasks())
            assert outcome[cases[0]] == ("rejected", f"No such image: {image}")
            assert outcome[cases[1]] == ("rejected", f"No such image: {image}")
            assert outcome[cases[2]] == ("complete", None)
        finally:
            for service_id in made:
                manager.api.remove_service(service_id)


def test_down_removes_all_up_made_even_after_a_killed_engine(swarm: Swarm, tmp_path: Path) -> None:
    """A second swarm of its own: up, a container running on worker1, worker1's dockerd killed,
    down → no process, namespace, link, host rule, cgroup, mount or file of it is left, and the
    host's own docker0 is still there."""
    directory = tmp_path / "second"
    layout = swarm_cluster.Layout.of(directory)
    had_docker0 = Path("/sys/class/net/docker0").exists()
    env = _read_env_of(directory, swarm_cluster.up(directory))
    try:
        subprocess.run(["docker", "-H", env["ENVCTL_SWARM_WORKER1_HOST"], "import", "-", "envctl-swarm-leftover:1"],
                       input=tiny_image_tar(), check=True, capture_output=True)  # fmt: skip
        subprocess.run(["docker", "-H", env["ENVCTL_SWARM_WORKER1_HOST"], "run", "-d", "--network=none",
                        "envctl-swarm-leftover:1", "/bin/sleep", "300"], check=True, capture_output=True)  # fmt: skip
        os.kill(int(env["ENVCTL_SWARM_WORKER1_PID"]), signal.SIGKILL)
        assert swarm_cluster._our_pids(layout), "the container outlives its engine"
    finally:
        swarm_cluster.down(directory)
    assert not swarm_cluster._our_pids(layout)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert layout.netns("manager").rsplit("-", 1)[0] not in netns
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert layout.bridge not in links and f"vsw{layout.ident}" not in links
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
    assert f"envctl-swarm-fixture:{layout.ident}" not in rules
    assert not list(Path("/sys/fs/cgroup").glob(f"*/envsw{layout.ident}-*"))
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert str(directory) not in mountinfo and str(layout.run_root) not in mountinfo
    assert not directory.exists() and not layout.run_root.exists()
    assert Path("/sys/class/net/docker0").exists() == had_docker0, "the host's docker0 is gone"


def _read_env_of(directory: Path, env: Path) -> dict[str, str]:
    assert env == directory.resolve() / "env"
    return dict(line.split("=", 1) for line in env.read_text().splitlines())
