"""The network fence (R4) on the real swarm of ``scripts/swarm-fixture``
(runner/backends/swarm_fence.py): one ``envctl serve`` for the module."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.runtimes.test_docker_settings import PROBE

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm-fence") / "data")
    srv.start()
    yield srv
    remove_installation(swarm, srv)  # what the uninstall test left, if it failed


def boot(server: Server, client: httpx.Client, name: str, machine: str) -> dict[str, Any]:
    rid = new_runtime(client, name, environment="bash", language="bash", machine_type=machine)
    assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
    rt = server.wait_state(client, rid, {"running", "error"}, timeout=300)
    assert rt["state"] == "running", rt
    return rt


def probe(client: httpx.Client, rid: str, targets: list[tuple[str, str, int]]) -> dict[str, str]:
    ex = run(client, rid, f"python3 -c {shlex.quote(PROBE)} {shlex.quote(json.dumps(targets))}")
    [line] = [ln for ln in text(ex).splitlines() if ln.startswith("{")]
    return dict(json.loads(line))


def service_of(manager: Any, rid: str) -> dict[str, Any]:
    [svc] = manager.api.services(filters={"label": f"envctl.runtime-id={rid}"})
    return dict(svc)


def container_address(swarm: Swarm, node: str, service_id: str) -> tuple[str, str]:
    """The runtime's container's address on its network, and the network's name, from its node."""
    out = swarm.docker(node, "ps", "-q", "--filter", f"label=com.docker.swarm.service.id={service_id}")
    [cid] = out.split()
    nets = json.loads(swarm.docker(node, "inspect", "-f", "{{json .NetworkSettings.Networks}}", cid))
    [(name, net)] = nets.items()
    return str(net["IPAddress"]), str(name)


def node_rules(swarm: Swarm, node: str) -> str:
    netns = swarm.env[f"ENVCTL_SWARM_{node.upper()}_NETNS"]
    return "\n".join(
        subprocess.run(
            ["ip", "netns", "exec", netns, "iptables", "-w", "-S", chain], capture_output=True, text=True, check=True
        ).stdout
        for chain in ("INPUT", "DOCKER-USER")
    )


def test_from_a_cell_on_a_worker_nothing_of_envctl_the_nodes_or_other_runtimes_is_reachable(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    """R4 on Swarm: envctl's host (a listener on every address, standing for the API, the
    database and the registry), the runtime's own node and the manager (their swarm ports),
    the metadata address, a runtime beside it on the same node and one on the other worker
    refuse; a container on the same worker's default bridge reaches the same listener, so it
    is the fence that stops the cell. Cells still answer: envctl's dials to the agent pass."""
    with socket.create_server(("0.0.0.0", 0)) as listener:  # noqa: S104  (reached from the namespaces)
        port = listener.getsockname()[1]
        listener.listen(16)
        with server.client() as client:
            a = boot(server, client, "fenced", "w1")
            b = boot(server, client, "beside", "w1")
            c = boot(server, client, "yonder", "w2")
            serve = "(python3 -m http.server 8000 >/dev/null 2>&1 &) ; sleep 1; echo served"
            for rt in (b, c):
                assert "served" in text(run(client, rt["id"], serve))
            b_address, network = container_address(swarm, "worker1", service_of(manager, b["id"])["ID"])
            assert network.startswith("envctl-"), network
            c_service = manager.api.inspect_service(service_of(manager, c["id"])["ID"])
            c_port = next(
                p["PublishedPort"]
                for t in manager.api.tasks(filters={"service": c_service["ID"]})
                for p in ((t.get("Status") or {}).get("PortStatus") or {}).get("Ports") or []
            )
            host = swarm.registry_host
            targets = [
                ("envctl host listener", host, port),
                ("envctl api", host, server.port),
                ("own node swarm port", swarm.env["ENVCTL_SWARM_WORKER1_ADDR"], 7946),
                ("manager swarm api", swarm.env["ENVCTL_SWARM_MANAGER_ADDR"], 2377),
                ("metadata", "169.254.169.254", 80),
                ("runtime beside", b_address, 8000),
                ("runtime on worker2's agent port", swarm.env["ENVCTL_SWARM_WORKER2_ADDR"], int(c_port)),
            ]
            seen = probe(client, a["id"], targets)
            # rejected at once, by the fence; the metadata address has no route in the fixture's
            # namespaces at all (no default route), so the node answers "unreachable" before any rule
            assert seen.pop("metadata") in ("ConnectionRefusedError", "OSError", "TimeoutError"), seen
            assert set(seen.values()) == {"ConnectionRefusedError"}, seen
            assert "connected" in probe(client, b["id"], [("own", "127.0.0.1", 8000)]).values()
            # the same worker, its default bridge: the listener and the swarm port answer there
            image = manager.api.inspect_service(service_of(manager, a["id"])["ID"])["Spec"]["TaskTemplate"][
                "ContainerSpec"
            ]["Image"]
            control = swarm.docker(
                "worker1",
                *("run", "--rm", "--network", "bridge", "--label", f"{TEST_LABEL}={TEST_SESSION}", image),
                *("python3", "-c", PROBE, json.dumps(targets[:1] + targets[2:3])),
                timeout=120,
            )
            assert json.loads(control.strip().splitlines()[-1]) == {
                "envctl host listener": "connected",
                "own node swarm port": "connected",
            }
            for rt in (a, b, c):
                client.delete(f"/runtimes/{rt['id']}")


def test_the_guard_runs_on_every_node_and_puts_back_a_rule_removed_by_hand(
    server: Server, swarm: Swarm, manager: Any
) -> None:
    with server.client() as client:
        rt = boot(server, client, "guarded", "w2")
        installation = service_of(manager, rt["id"])["Spec"]["Labels"]["envctl.installation"]
        client.delete(f"/runtimes/{rt['id']}")
    [guard] = manager.api.services(filters={"name": f"envctl-guard-{installation}"})
    running = {
        t["NodeID"] for t in manager.api.tasks(filters={"service": guard["ID"]}) if t["Status"]["State"] == "running"
    }
    assert running == {swarm.node_id(n) for n in swarm.nodes}
    comment = f"envctl:{installation}"
    rules = node_rules(swarm, "worker2")
    ours = [ln for ln in rules.splitlines() if comment in ln]
    assert len(ours) >= 8, rules
    reject = next(ln for ln in ours if "-A INPUT" in ln and "REJECT" in ln)
    netns = swarm.env["ENVCTL_SWARM_WORKER2_NETNS"]
    delete = ["-D", *shlex.split(reject)[1:]]
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-w", *delete], check=True, capture_output=True)
    assert reject not in node_rules(swarm, "worker2")
    deadline = time.monotonic() + 15
    while reject not in node_rules(swarm, "worker2"):
        assert time.monotonic() < deadline, "the guard did not put the rule back"
        time.sleep(0.5)


def test_the_guard_runs_an_envctl_base_image_never_the_users_saved_one(server: Server, manager: Any) -> None:
    """The guard has NET_ADMIN in the node's namespace: made again by the boot of a user's saved
    environment, it still runs the base image at the root of that environment's lineage."""
    with server.client() as client:
        rt = boot(server, client, "to-save", "w2")
        assert run(client, rt["id"], "echo mine > /root/mine")["status"] == "ok"
        r = client.post(f"/runtimes/{rt['id']}/save", params={"wait": 30}, json={"environment": "guardchild"})
        assert r.status_code == 202 and r.json()["status"] == "succeeded", r.text
        installation = service_of(manager, rt["id"])["Spec"]["Labels"]["envctl.installation"]
        client.delete(f"/runtimes/{rt['id']}")
        [guard] = manager.api.services(filters={"name": f"envctl-guard-{installation}"})
        manager.api.remove_service(guard["ID"])  # as if this installation had none yet
        rid = new_runtime(client, "child", environment="guardchild", language="bash", machine_type="w1")
        assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
        child = server.wait_state(client, rid, {"running", "error"}, timeout=300)
        assert child["state"] == "running", (child.get("state_reason"), child.get("state_message"))
        own = service_of(manager, rid)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        [guard] = manager.api.services(filters={"name": f"envctl-guard-{installation}"})
        image = guard["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        assert "/guardchild@" in own and "/bash@sha256:" in image, (own, image)
        client.delete(f"/runtimes/{rid}")
