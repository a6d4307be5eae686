"""Apps with the Kubernetes backend, on the real single-node cluster of ``scripts/kube-fixture``: an
``envctl serve`` that places runtimes as pods in the module's namespace and serves team acme's
apps. The app's runtime is a pod like any other; it declares the app's port and carries the label
that the installation's NetworkPolicy for that port admits (beside the fence's agent port), and
the gateway dials the pod's IP at that port."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_apps_docker import Env, app_notebook
from tests.fixtures.kube import KubeCluster
from tests.fixtures.services import base_image
from tests.kube.envctl_server import core_api, kube_server, pods_of, remove_installation

pytestmark = [pytest.mark.kube, pytest.mark.slow]


@pytest.fixture(scope="module")
def env(kube: KubeCluster, kube_namespace: str, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base_image(docker, "bash")
    data = tmp_path_factory.mktemp("kube-apps") / "data"
    srv = kube_server(kube.kubeconfig, kube_namespace, data, ENVCTL_RUNNER_APP_TEAMS="acme")
    srv.start()
    try:
        admin = (srv.data_dir / "admin-token").read_text().strip()
        tokens = {"admin": admin}
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {admin}"}) as c:
            made = c.post("/users", json={"name": "alice"})
            assert made.status_code == 201, made.text
            tokens["alice"] = made.json()["token"]
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {tokens['alice']}"}) as c:
            assert c.post("/teams", json={"name": "acme"}).status_code == 201
        yield Env(srv, tokens)
    finally:
        remove_installation(kube.kubeconfig, kube_namespace, srv)


def test_an_app_on_kubernetes_runs_in_a_pod_and_answers_through_the_gateway(
    env: Env, kube: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    version = f"kube-{uuid.uuid4().hex[:6]}"
    done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "app", version)), "--team", "acme",
                   "--name", "board", "--env", "bash", "--wait", "300")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + env.srv.output()[-4000:]
    assert env.deployment("board", 1)["status"] == "running"

    [rt] = [r for r in env.runtimes() if r["name"].startswith("app-board-1-")]
    assert (rt["state"], rt["node"], rt["team"]) == ("running", kube.node, "acme"), rt
    core = core_api(kube.kubeconfig)
    try:
        [pod] = pods_of(core, kube_namespace, rt["id"])
        assert pod.metadata.labels.get("envctl.app-port-8000") == "1", pod.metadata.labels
        assert 8000 in [p.container_port for p in pod.spec.containers[0].ports]
        from kubernetes import client as kclient

        net = kclient.NetworkingV1Api(core.api_client)
        listed: Any = core.api_client.sanitize_for_serialization(net.list_namespaced_network_policy(kube_namespace))
        policies = {str(p["metadata"]["name"]): p for p in listed["items"]}
        [admits] = [p for n, p in policies.items() if n.startswith("envctl-app-") and n.endswith("-8000")]
        assert admits["spec"]["podSelector"]["matchLabels"]["envctl.app-port-8000"] == "1", admits
    finally:
        core.api_client.close()

    with env.client("alice") as c:
        for _ in range(5):
            resp = c.get("/apps/acme/board/page")
            assert resp.status_code == 200, resp.text + env.srv.output()[-3000:]
            seen = resp.json()
            assert (seen["version"], seen["path"], seen["file"]) == (version, "/page", "from the bundle")

    stopped = env.cli("alice", "app", "stop", "board", "--team", "acme")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    with env.client("alice") as c:
        resp = c.get("/apps/acme/board/")
        assert resp.status_code == 503 and "not running" in resp.text, resp.text
    core = core_api(kube.kubeconfig)
    try:
        deadline = time.monotonic() + 90
        while pods_of(core, kube_namespace, rt["id"]):
            assert time.monotonic() < deadline, "the stopped app's pod is still there"
            time.sleep(0.5)
    finally:
        core.api_client.close()
