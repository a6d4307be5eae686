"""Subnets of ``ENVCTL_RUNNER_SUBNET_POOL`` on the real swarm of ``scripts/swarm-fixture``, with
the nodes' engines granted (``ENVCTL_SWARM_ATTACH_ENGINE``; runner/backends/swarm_subnets.py):
runtimes on two workers get addresses in the installation's subnet of the pool, on a bridge with
ICC off; a second installation on the same swarm gets another subnet; a node whose config-only
network is gone gets it again and the boot goes through; ``envctl uninstall`` leaves no
config-only network of its installation on any node (each node's networks listed through its
own engine) and the other installation's where they were; a subnet that overlaps a network of a
node is skipped."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from runner.backends import swarm_fence
from runner.backends.swarm_subnets import CLAIM_ROLE, LABEL_CONFIG, LABEL_SUBNET, config_name
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.runner.cells.test_docker_executions import new_runtime
from tests.runner.swarm.test_swarm_attach import sockets  # noqa: F401  (each node's socket, by label)
from tests.runner.swarm.test_swarm_fence import container_address, service_of

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

POOL = "10.213.0.0/16"  # the default


def _server(swarm: Swarm, tmp: pytest.TempPathFactory, name: str) -> Server:
    srv = swarm_server(
        swarm,
        tmp.mktemp(name) / "data",
        ENVCTL_SWARM_ATTACH_ENGINE="/var/run/docker.sock",  # overridden by each node's label
        ENVCTL_RUNNER_SUBNET_POOL=POOL,
    )
    srv.start()
    deadline = time.monotonic() + 300  # the helpers' image pushed and pulled on every node once
    while "attach helpers ready" not in srv.output() and time.monotonic() < deadline:
        assert "attach helpers: not ready" not in srv.output(), srv.output()[-3000:]
        time.sleep(0.5)
    return srv


@pytest.fixture(scope="module")
def first(swarm: Swarm, sockets: None, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    base_image(docker, "bash")
    srv = _server(swarm, tmp_path_factory, "swarm-subnets-a")
    yield srv
    remove_installation(swarm, srv)  # what the uninstall left, if it failed


@pytest.fixture(scope="module")
def second(swarm: Swarm, sockets: None, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    srv = _server(swarm, tmp_path_factory, "swarm-subnets-b")
    yield srv
    remove_installation(swarm, srv)


BLOCKED = "10.213.0.0/23"  # the pool's first two /24s, taken on worker2 by a network of the test's


@pytest.fixture
def blocker(swarm: Swarm) -> Iterator[str]:
    """A network on worker2's own engine holding the pool's first subnets (as a LAN's or another
    tool's would): envctl's installations must take others."""
    name = f"envctl-test-block-{uuid.uuid4().hex[:6]}"
    swarm.docker("worker2", "network", "create", "--label", f"{TEST_LABEL}={TEST_SESSION}", "--subnet", BLOCKED, name)
    yield name
    swarm.docker("worker2", "network", "rm", name, check=False)


def node_configs(swarm: Swarm, node: str, installation: str) -> list[dict[str, Any]]:
    """The config-only networks of ``installation`` on ``node``, from the node's own engine."""
    names = swarm.docker(node, "network", "ls", "-q", "--filter", f"label=envctl.installation={installation}").split()
    nets = [json.loads(swarm.docker(node, "network", "inspect", "-f", "{{json .}}", n)) for n in names]
    return [n for n in nets if n.get("ConfigOnly")]


def _network(manager: Any, installation: str) -> dict[str, Any]:
    """The installation's swarm network, with its subnet claim's labels (Swarm takes none on a
    network made --config-from)."""
    [net] = swarm_fence.networks(manager, installation)
    return dict(net)


def boot(server: Server, client: Any, name: str, machine: str) -> dict[str, Any]:
    rid = new_runtime(client, name, environment="bash", language="bash", machine_type=machine)
    assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
    rt = server.wait_state(client, rid, {"running", "error"}, timeout=300)
    assert rt["state"] == "running", rt.get("state_message")
    return dict(rt)


def _in_subnet(address: str, subnet: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(subnet)


def test_runtimes_on_two_nodes_and_two_installations_get_subnets_of_the_pool_and_uninstall_clears_the_nodes(
    first: Server, second: Server, swarm: Swarm, manager: Any, blocker: str
) -> None:
    with first.client() as client:
        on_w1 = boot(first, client, "subnet-w1", "w1")
        installation = service_of(manager, on_w1["id"])["Spec"]["Labels"]["envctl.installation"]
        net = _network(manager, installation)
        subnet = net["Labels"][LABEL_SUBNET]
        assert net["ConfigFrom"]["Network"] == net["Labels"][LABEL_CONFIG] == config_name(net["Name"]), net
        assert ipaddress.IPv4Network(subnet).subnet_of(ipaddress.IPv4Network(POOL)), subnet
        # worker2 answered the pool's first subnets as overlapping its own network: skipped
        assert not ipaddress.IPv4Network(subnet).overlaps(ipaddress.IPv4Network(BLOCKED)), subnet
        assert ipaddress.ip_network(subnet).prefixlen == 24, subnet
        # the config-only network on every node, with the subnet, ICC off and the installation's labels
        for node in swarm.nodes:
            [cfg] = node_configs(swarm, node, installation)
            assert cfg["Name"] == config_name(net["Name"]), (node, cfg)
            assert [c["Subnet"] for c in cfg["IPAM"]["Config"]] == [subnet], (node, cfg)
            assert cfg["Options"]["com.docker.network.bridge.enable_icc"] == "false", (node, cfg)
            assert cfg["Labels"]["envctl.managed"] == "network-config", (node, cfg)
        address, joined = container_address(swarm, "worker1", service_of(manager, on_w1["id"])["ID"])
        assert joined == net["Name"] and _in_subnet(address, subnet), (address, subnet)
        # the node's bridge is the one the network guard fences (br-<id>), with the subnet's gateway
        netns = swarm.env["ENVCTL_SWARM_WORKER1_NETNS"]
        link = subprocess.run(
            ["ip", "netns", "exec", netns, "ip", "-o", "-4", "addr", "show", "dev", swarm_fence.bridge_of(net["Id"])],
            capture_output=True,
            text=True,
        )
        gateway = ipaddress.ip_network(subnet).network_address + 1
        assert link.returncode == 0 and f"inet {gateway}/24" in link.stdout, (link.stdout, link.stderr)

        # worker2 lost its config-only network (as a node that joined later lacks it): the boot
        # there is rejected, envctl makes it on worker2 and tries once more
        swarm.docker("worker2", "network", "rm", config_name(net["Name"]))
        on_w2 = boot(first, client, "subnet-w2", "w2")
        assert "its network configuration made there" in first.output(), first.output()[-3000:]
        address2, _ = container_address(swarm, "worker2", service_of(manager, on_w2["id"])["ID"])
        # each node's bridge hands out the subnet's addresses on its own (runtimes on two nodes
        # may have the same one: envctl reaches them through their node, never one another)
        assert _in_subnet(address2, subnet), (address2, subnet)
        [cfg] = node_configs(swarm, "worker2", installation)
        assert [c["Subnet"] for c in cfg["IPAM"]["Config"]] == [subnet]
        # the bridge on the node takes ICC off from the configuration
        bridge = json.loads(swarm.docker("worker2", "network", "inspect", "-f", "{{json .}}", net["Name"]))
        assert bridge["ConfigFrom"]["Network"] == config_name(net["Name"]), bridge

    with second.client() as client:
        other_rt = boot(second, client, "subnet-other", "w1")
        other = service_of(manager, other_rt["id"])["Spec"]["Labels"]["envctl.installation"]
        other_subnet = _network(manager, other)["Labels"][LABEL_SUBNET]
        assert other_subnet != subnet and not ipaddress.ip_network(other_subnet).overlaps(
            ipaddress.ip_network(subnet)
        ), (other_subnet, subnet)
        address3, _ = container_address(swarm, "worker1", service_of(manager, other_rt["id"])["ID"])
        assert _in_subnet(address3, other_subnet), (address3, other_subnet)
    claims = manager.api.configs(filters={"label": [f"envctl.managed={CLAIM_ROLE}"]})
    held = {c["Spec"]["Labels"][LABEL_SUBNET]: c["Spec"]["Labels"]["envctl.installation"] for c in claims}
    assert held.get(subnet) == installation and held.get(other_subnet) == other, held

    # envctl uninstall of the first: no config-only network of it on any node, the second's stay
    before = {node: swarm.docker(node, "network", "ls", "--format", "{{.Name}}").split() for node in swarm.nodes}
    first.stop()
    env = {**os.environ, "ENVCTL_REGISTRY": "off", **first.env, "ENVCTL_DATA_DIR": str(first.data_dir)}
    env.pop("ENVCTL_DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "uninstall", "--yes", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(done.stdout)
    assert report["swarm"]["node_networks"] == "removed 3 on 3 node(s)", report
    for node in swarm.nodes:
        assert node_configs(swarm, node, installation) == [], node
        assert len(node_configs(swarm, node, other)) == 1, node
        after = set(swarm.docker(node, "network", "ls", "--format", "{{.Name}}").split())
        # nothing else went: only the first installation's configuration, and its swarm network's
        # bridge on the nodes where its runtimes ran
        assert set(before[node]) - after <= {net["Name"], config_name(net["Name"])}, (node, before[node], after)
        assert config_name(net["Name"]) in set(before[node]) - after, node
    left = manager.api.configs(filters={"label": [f"envctl.managed={CLAIM_ROLE}"]})
    assert [c["Spec"]["Labels"]["envctl.installation"] for c in left] == [other], left
    with second.client() as client:
        assert client.get(f"/runtimes/{other_rt['id']}").json()["state"] == "running"
