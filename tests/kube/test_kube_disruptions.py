"""A runtime's pod taken away by the cluster, on the real cluster (issue 18): an eviction
through the Eviction API, and the loss of the node (its kubelet stopped).

- **Eviction** (``policy/v1beta1``, what ``kubectl drain`` sends): on Kubernetes 1.20 the API
  server answers it by deleting the pod with its grace period, exactly as ``kubectl delete pod``
  does; nothing on the pod says "evicted" (no reason, no event: the ``DisruptionTarget``
  condition came in 1.26). So envctl sees a pod being deleted that it did not delete: its agent
  got SIGTERM and waits, envctl takes the draft, and the runtime is ``error (terminated)``,
  its message naming both causes ("someone deleted it, or the cluster evicted it").
- **Node lost**: the node's kubelet stopped; its containers keep running, but the node
  controller marks the node's ``Ready`` condition ``Unknown`` once
  ``--node-monitor-grace-period`` passed since its last heartbeat (the kubelet posts its status
  every 5 s here). The fixture's controller manager is restarted with 15 s for this test
  (default 40 s; it is restored afterwards). envctl's node watch sees it: ``error
  (node-lost)`` naming the node, no draft (a lost node is not asked for one), the pod removed
  from the API (force, after the 10 s a stop waits for a kubelet that says nothing). Once the
  kubelet is back it kills the container of the pod the API no longer has: nothing is left
  running on the node, and the runtime boots again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures import kube_daemons
from tests.fixtures.kube import KubeCluster
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.kube.envctl_server import core_api, kube_server, pods_of, remove_installation, wait_no_pod
from tests.runner.cells.test_docker_executions import new_runtime, run, text

pytestmark = [pytest.mark.kube, pytest.mark.slow]

GRACE = 15  # seconds of --node-monitor-grace-period for the node-loss test (the default is 40)
WORK = "mkdir -p /opt/kept && echo mine > /opt/kept/file"


@pytest.fixture(scope="module")
def server(
    kube: KubeCluster, kube_namespace: str, docker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = kube_server(kube.kubeconfig, kube_namespace, tmp_path_factory.mktemp("kube-disrupt") / "data")
    srv.start()
    yield srv
    remove_installation(kube.kubeconfig, kube_namespace, srv)


@pytest.fixture(scope="module")
def core(kube: KubeCluster) -> Iterator[Any]:
    api = core_api(kube.kubeconfig)
    yield api
    api.api_client.close()


def log_of(client: httpx.Client, rid: str) -> list[dict[str, Any]]:
    body = client.get(f"/runtimes/{rid}/log").json()
    return list(body["entries"] if isinstance(body, dict) else body)


def booted(server: Server, client: httpx.Client, name: str) -> str:
    rid = new_runtime(client, name, environment="bash", language="bash", machine_type="small")
    assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
    rt = server.wait_state(client, rid, {"running", "error"}, timeout=240)
    assert rt["state"] == "running", (rt, server.output()[-3000:])
    return rid


def running_on_node(kube: KubeCluster, pod: str) -> list[str]:
    """The node's running containers (containerd's tasks) of ``pod``, the pod's sandbox included."""
    mine = f'labels."io.kubernetes.pod.name"=={pod}'
    ids = set(kube_daemons.ctr(kube.layout, "containers", "ls", "-q", mine).split())
    tasks = kube_daemons.ctr(kube.layout, "tasks", "ls").splitlines()[1:]
    return [t.split()[0] for t in tasks if t.split() and t.split()[0] in ids and t.split()[-1] == "RUNNING"]


def node_schedulable(core: Any, name: str) -> bool:
    """Ready, and the controller's not-ready/unreachable taints gone (a boot before that is unschedulable)."""
    node = core.read_node(name)
    ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
    return ready and not node.spec.taints and not node.spec.unschedulable


def test_an_evicted_pod_keeps_its_work_as_a_draft_and_the_runtime_says_why(
    server: Server, core: Any, kube_namespace: str
) -> None:
    with server.client() as client:
        rid = booted(server, client, "evicted")
        assert run(client, rid, WORK)["status"] == "ok"
        (pod,) = pods_of(core, kube_namespace, rid)
        name = pod.metadata.name
        eviction = {"apiVersion": "policy/v1beta1", "kind": "Eviction", "metadata": {"name": name}}
        began = time.monotonic()
        core.create_namespaced_pod_eviction(name, kube_namespace, eviction)
        evicted = core.read_namespaced_pod(name, kube_namespace)
        assert evicted.metadata.deletion_timestamp is not None  # the API's eviction: a graceful deletion
        assert evicted.status.reason is None, evicted.status  # and nothing on the pod says "evicted"
        rt = server.wait_state(client, rid, {"error", "stopped"}, timeout=60)
        took = time.monotonic() - began
        assert rt["state"] == "error" and rt["state_reason"] == "terminated", rt
        message = rt["state_message"]
        assert "its pod is being deleted (not by envctl" in message and "the cluster evicted it" in message, message
        assert "unsaved changes were kept and come back at the next boot" in message, message
        entries = log_of(client, rid)
        assert any(e.get("state") == "error" and e.get("reason") == "terminated" for e in entries), entries
        kept = [e for e in entries if e.get("event") == "draft-kept"]
        assert kept and kept[-1]["reason"] == "terminated", entries
        gone = wait_no_pod(core, kube_namespace, rid, 40)
        print(f"\neviction: error (terminated) with its draft after {took:.1f} s, pod gone {gone:.1f} s later")
        print(f"eviction: {message}")
        assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
        again = server.wait_state(client, rid, {"running", "error"}, timeout=240)
        assert again["state"] == "running", again
        assert text(run(client, rid, "cat /opt/kept/file")).strip() == "mine"
        client.delete(f"/runtimes/{rid}")


def test_a_lost_node_turns_its_runtime_to_node_lost_and_nothing_is_left_once_it_returns(
    server: Server, kube: KubeCluster, core: Any, kube_namespace: str
) -> None:
    kube.restart_controller_manager(f"--node-monitor-grace-period={GRACE}s", "--node-monitor-period=1s")
    try:
        with server.client() as client:
            rid = booted(server, client, "lost")
            assert run(client, rid, WORK)["status"] == "ok"
            (pod,) = pods_of(core, kube_namespace, rid)
            name, node = pod.metadata.name, pod.spec.node_name
            assert running_on_node(kube, name)
            began = time.monotonic()
            kube.stop_kubelet()
            try:
                rt = server.wait_state(client, rid, {"error", "stopped"}, timeout=GRACE + 60)
                took = time.monotonic() - began
                assert rt["state"] == "error" and rt["state_reason"] == "node-lost", rt
                message = rt["state_message"]
                assert f"node {node} is not ready (Unknown)" in message, message
                assert "unsaved work on that node is gone" in message, message
                entries = log_of(client, rid)
                assert any(e.get("state") == "error" and e.get("reason") == "node-lost" for e in entries), entries
                assert not any(e.get("event") == "draft-kept" for e in entries), entries
                (seen,) = [n for n in client.get("/nodes").json() if n["name"] == node]
                assert seen["health"]["state"] == "down", seen
                gone = wait_no_pod(core, kube_namespace, rid, 40)
                # the API has no pod, but its container still runs: no kubelet is there to stop it
                left = running_on_node(kube, name)
                print(
                    f"\nkubelet stopped: node-lost after {took:.1f} s (grace {GRACE} s), pod object gone "
                    f"{gone:.1f} s later, {len(left)} of its containers still running on the node; {message}"
                )
                assert left
            finally:
                kube.start_kubelet()
            returned = time.monotonic()
            while running_on_node(kube, name):
                assert time.monotonic() - returned < 60, f"the kubelet left {name} running on the node"
                time.sleep(0.5)
            cleaned = time.monotonic() - returned
            while not node_schedulable(core, node):
                assert time.monotonic() - returned < 60, core.read_node(node).spec
                time.sleep(0.5)
            print(f"kubelet back: the orphan's containers stopped {cleaned:.1f} s after the node was Ready again")
            assert not pods_of(core, kube_namespace, rid)
            assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
            again = server.wait_state(client, rid, {"running", "error"}, timeout=240)
            assert again["state"] == "running", (again, server.output()[-3000:])
            got = text(run(client, rid, "test -e /opt/kept/file && echo kept || echo gone")).strip()
            assert got == "gone", got  # no draft: what was on the lost node is gone
            assert len(pods_of(core, kube_namespace, rid)) == 1
            client.delete(f"/runtimes/{rid}")
    finally:
        kube.restart_controller_manager()
