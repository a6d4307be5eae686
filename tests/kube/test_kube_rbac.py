"""envctl with least privilege on the real cluster (the apiserver runs ``--authorization-mode
Node,RBAC``): the manifest of ``envctl kube rbac`` applied by the admin, then an ``envctl serve``
whose kubeconfig holds only that ServiceAccount's token boots a runtime, runs a cell, shows the
nodes and stops it with a draft, with not one request refused; and what the Role does not grant
is refused."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from api.cli import cli
from runner.backends import kube_rbac
from tests.fixtures.kube import KubeCluster
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.kube.envctl_server import core_api, kube_server, remove_installation, wait_no_pod
from tests.runner.cells.test_docker_executions import new_runtime, run, text

pytestmark = [pytest.mark.kube, pytest.mark.slow]


def test_envctl_kube_rbac_prints_the_manifest_for_a_namespace() -> None:
    out = CliRunner().invoke(cli, ["kube", "rbac", "--namespace", "team-a"])
    assert out.exit_code == 0, out.output
    docs = [d for d in yaml.safe_load_all(out.output) if d]
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"]
    assert all(d["metadata"].get("namespace") in ("team-a", None) for d in docs)
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert binding["metadata"]["name"] == "envctl-nodes-team-a"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "envctl", "namespace": "team-a"}]
    role = next(d for d in docs if d["kind"] == "Role")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert "pods/exec" not in resources and "*" not in resources  # the agent channel is tcp to the pod
    assert all("*" not in rule["verbs"] for rule in role["rules"])
    bad = CliRunner().invoke(cli, ["kube", "rbac", "--namespace", "Team_A"])
    assert bad.exit_code != 0


def test_envctl_kube_rbac_attach_adds_only_pods_exec() -> None:
    """Attaching to pods envctl did not start needs pods/exec; nothing else changes."""
    plain = [d for d in yaml.safe_load_all(CliRunner().invoke(cli, ["kube", "rbac"]).output) if d]
    out = CliRunner().invoke(cli, ["kube", "rbac", "--attach"])
    assert out.exit_code == 0, out.output
    docs = [d for d in yaml.safe_load_all(out.output) if d]
    role, before = (next(d for d in ds if d["kind"] == "Role") for ds in (docs, plain))
    added = [r for r in role["rules"] if r not in before["rules"]]
    assert added == [{"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"]}]
    assert [d for d in docs if d["kind"] != "Role"] == [d for d in plain if d["kind"] != "Role"]


def apply(api: Any, docs: list[dict[str, Any]]) -> None:
    from kubernetes import client

    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    for d in docs:
        ns, kind = d["metadata"].get("namespace"), d["kind"]
        if kind == "ServiceAccount":
            core.create_namespaced_service_account(ns, d)
        elif kind == "Role":
            rbac.create_namespaced_role(ns, d)
        elif kind == "RoleBinding":
            rbac.create_namespaced_role_binding(ns, d)
        elif kind == "ClusterRole":
            rbac.create_cluster_role(d)
        else:
            rbac.create_cluster_role_binding(d)


def remove_cluster_objects(api: Any, docs: list[dict[str, Any]]) -> None:
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(api)
    for d in docs:
        try:
            if d["kind"] == "ClusterRole":
                rbac.delete_cluster_role(d["metadata"]["name"])
            elif d["kind"] == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(d["metadata"]["name"])
        except client.ApiException:
            pass


def token_kubeconfig(admin: Path, core: Any, namespace: str, account: str, out: Path) -> Path:
    """A kubeconfig with the ServiceAccount's token (the token controller's Secret) and nothing else."""
    deadline = time.monotonic() + 30
    token = ""
    while not token:
        assert time.monotonic() < deadline, "no token for the ServiceAccount"
        sa = core.read_namespaced_service_account(account, namespace)
        for ref in sa.secrets or []:
            secret = core.read_namespaced_secret(ref.name, namespace)
            token = base64.b64decode((secret.data or {}).get("token", "")).decode()
        time.sleep(0.2)
    config = json.loads(admin.read_text())
    (cluster,) = config["clusters"]
    out.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": account}}],
                "current-context": "sa",
            }
        )
    )
    return out


@pytest.fixture(scope="module")
def account(kube: KubeCluster, kube_namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The manifest applied in the module's namespace; the ServiceAccount's kubeconfig."""
    docs = kube_rbac.documents(kube_namespace, "envctl")
    admin = kube.core()
    try:
        apply(admin.api_client, docs)
        yield token_kubeconfig(
            kube.kubeconfig, admin, kube_namespace, "envctl", tmp_path_factory.mktemp("rbac") / "kubeconfig"
        )
    finally:
        remove_cluster_objects(admin.api_client, docs)
        admin.api_client.close()


@pytest.fixture(scope="module")
def server(
    kube: KubeCluster, kube_namespace: str, account: Path, docker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = kube_server(account, kube_namespace, tmp_path_factory.mktemp("kube-rbac") / "data")
    srv.start()
    yield srv
    remove_installation(kube.kubeconfig, kube_namespace, srv)


def test_a_server_with_only_the_roles_token_boots_runs_and_stops_a_runtime(
    server: Server, kube: KubeCluster, kube_namespace: str
) -> None:
    core = core_api(kube.kubeconfig)
    try:
        with server.client() as client:
            rid = new_runtime(client, "least", environment="bash", language="bash", machine_type="small")
            assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
            rt = server.wait_state(client, rid, {"running", "error"}, timeout=240)
            assert rt["state"] == "running", (rt, server.output()[-3000:])
            ex = run(client, rid, "echo $((6 * 7)) > /root/least.txt; cat /root/least.txt")
            assert ex["status"] == "ok" and text(ex).strip() == "42", ex
            nodes = client.get("/nodes")
            assert nodes.status_code == 200 and [n["name"] for n in nodes.json()] == [kube.node], nodes.text
            assert client.post(f"/runtimes/{rid}/stop").status_code in (200, 202)
            stopped = server.wait_state(client, rid, {"stopped", "error"}, timeout=120)
            assert stopped["state"] == "stopped", stopped
            wait_no_pod(core, kube_namespace, rid, 20)
            client.delete(f"/runtimes/{rid}")
        output = server.output().lower()
        assert "forbidden" not in output and " 403" not in output, server.output()[-4000:]
    finally:
        core.api_client.close()


def test_what_the_role_does_not_grant_is_refused(account: Path, kube_namespace: str) -> None:
    from kubernetes import client

    sa = core_api(account)
    try:
        refused = {
            "pods in another namespace": lambda: sa.list_namespaced_pod("kube-system"),
            "a secret read by name": lambda: sa.read_namespaced_secret("anything", kube_namespace),
            "a service account": lambda: sa.create_namespaced_service_account(
                kube_namespace, {"metadata": {"name": "more"}}
            ),
            "exec into a pod": lambda: sa.connect_get_namespaced_pod_exec("anything", kube_namespace, command=["id"]),
            "a node deleted": lambda: sa.delete_node("anything"),
            "a namespace": lambda: sa.create_namespace({"metadata": {"name": "envctl-rbac-refused"}}),
        }
        for what, call in refused.items():
            with pytest.raises(client.ApiException) as info:
                call()
            assert info.value.status == 403, (what, info.value.status, info.value.reason)
        assert sa.list_namespaced_pod(kube_namespace).items is not None  # what it is granted, it gets
    finally:
        sa.api_client.close()
