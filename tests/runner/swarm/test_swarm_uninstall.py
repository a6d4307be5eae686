"""``envctl uninstall`` of a Swarm installation (runner/backends/swarm_removal.py) on the real swarm
of ``scripts/swarm-fixture``: the module's server is uninstalled, beside objects of another
installation made on the same swarm that must survive it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm, SwarmRegistry
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.runner.cells.test_docker_executions import new_runtime
from tests.runner.swarm.test_swarm_fence import boot, node_rules, service_of

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm-uninstall") / "data")
    srv.start()
    yield srv
    remove_installation(swarm, srv)  # what the uninstall left, if it failed


def test_uninstall_removes_its_swarm_objects_and_rules_and_leaves_another_installations(
    server: Server, swarm: Swarm, manager: Any, swarm_registry: SwarmRegistry
) -> None:
    """``envctl uninstall --volumes`` of a Swarm installation: its services (runtimes and guard),
    secrets, configs, network and the guard's rules on every node go; its named volume on a worker
    is named with the command that removes it there; another installation's service, secret,
    config, network and rule on the same swarm stay."""
    with server.client() as client:
        rt = boot(server, client, "left-running", "w1")
        volume = [{"type": "volume", "name": "left-data", "target": "/home/data"}]
        with_volume = new_runtime(
            client, "with-volume", environment="bash", language="bash", machine_type="w2", mounts=volume
        )
        assert client.post(f"/runtimes/{with_volume}/start").status_code in (200, 202)
        assert server.wait_state(client, with_volume, {"running", "error"}, timeout=300)["state"] == "running"
    installation = service_of(manager, rt["id"])["Spec"]["Labels"]["envctl.installation"]
    other = f"in_other{uuid.uuid4().hex[:12]}"
    labels = {"envctl.installation": other, TEST_LABEL: TEST_SESSION, "envctl.managed": "1"}
    made = {
        "secret": manager.api.create_secret(f"envctl-{other}-s", b"x", labels=labels)["ID"],
        "config": manager.api.create_config(f"envctl-agent-{other}-c", b"x", labels=labels)["ID"],
        "network": manager.api.create_network(f"envctl-{other}", driver="bridge", scope="swarm", labels=labels)["Id"],
        "service": manager.api.create_service(
            {"ContainerSpec": {"Image": swarm_registry.image, "Command": ["sleep", "600"]}},
            name=f"envctl-{other}-svc",
            labels=labels,
        )["ID"],
    }
    netns = swarm.env["ENVCTL_SWARM_WORKER1_NETNS"]
    other_rule = [
        "DOCKER-USER",
        "-i",
        "br-nothere0000",
        "-m",
        "comment",
        "--comment",
        f"envctl:{other}",
        "-j",
        "REJECT",
    ]
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-w", "-I", *other_rule], check=True)
    try:
        server.stop()
        env = {**os.environ, "ENVCTL_REGISTRY": "off", **server.env, "ENVCTL_DATA_DIR": str(server.data_dir)}
        env.pop("ENVCTL_DATABASE_URL", None)
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", "uninstall", "--yes", "--volumes", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        report = json.loads(done.stdout)
        assert any(n.startswith("envctl-guard-") for n in report["swarm"]["services"]), report
        assert report["swarm"]["rules"].startswith("removed on 3 node"), report
        label = {"label": [f"envctl.installation={installation}"]}
        assert manager.api.services(filters=label) == []
        assert manager.api.secrets(filters=label) == []
        assert manager.api.configs(filters=label) == []
        assert [n for n in manager.api.networks(filters=label) if n.get("Scope") == "swarm"] == []
        for node in swarm.nodes:
            assert f"envctl:{installation}" not in node_rules(swarm, node), node
        # the named volume on worker2: made there with the installation's labels; Swarm's manager
        # cannot remove it, so the report names it, its node and the command that removes it there
        [vol] = swarm.docker(
            "worker2", "volume", "ls", "-q", "--filter", f"label=envctl.installation={installation}"
        ).split()
        labels = json.loads(swarm.docker("worker2", "volume", "inspect", "-f", "{{json .Labels}}", vol))
        assert labels["envctl.volume-name"] == "left-data" and labels[TEST_LABEL] == TEST_SESSION, labels
        [note] = report["swarm"]["volumes_kept"]
        assert note.startswith(f"{vol} on node swarm-worker2") and f"docker volume rm {vol}" in note, note
        swarm.docker("worker2", "volume", "rm", vol)  # as the note says
        # the other installation's objects are all still there
        manager.api.inspect_secret(made["secret"])
        manager.api.inspect_config(made["config"])
        manager.api.inspect_network(made["network"])
        manager.api.inspect_service(made["service"])
        assert f"envctl:{other}" in node_rules(swarm, "worker1")
    finally:
        subprocess.run(["ip", "netns", "exec", netns, "iptables", "-w", "-D", *other_rule], check=False)
        manager.api.remove_service(made["service"])
        for kind in ("secret", "config", "network"):
            for _ in range(40):
                try:
                    getattr(manager.api, f"remove_{kind}")(made[kind])
                    break
                except Exception:
                    time.sleep(0.5)
