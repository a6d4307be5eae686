"""The real single-node cluster (tests/fixtures/kube.py) answers as Kubernetes does: its node
is Ready, and a pod runs an image that its containerd pulls from a registry on loopback (plain
HTTP), with ``exec`` answering through the API server, the kubelet and containerd."""

from __future__ import annotations

import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_SESSION
from tests.fixtures.kube import KubeCluster, wait_running
from tests.fixtures.services import base_image, docker_client
from tests.fixtures.swarm import REGISTRY_BINARY, serve_registry

pytestmark = [pytest.mark.kube, pytest.mark.slow]


def test_the_node_is_ready_and_runs_kubernetes_1_20_on_containerd(kube: KubeCluster) -> None:
    core = kube.core()

    node = core.read_node(kube.node)

    ready = {c.type: c.status for c in node.status.conditions}
    assert ready["Ready"] == "True", node.status.conditions
    assert node.status.node_info.kubelet_version == "v1.20.2"
    assert node.status.node_info.container_runtime_version.startswith("containerd://1.6")
    assert [a.address for a in node.status.addresses if a.type == "InternalIP"] == [kube.layout.node_ip]


@pytest.fixture(scope="module")
def loopback_image() -> Iterator[str]:
    """The bash base image, pushed to a plain-HTTP registry on 127.0.0.1 (as envctl's own
    registry is reached on loopback); its reference."""
    if not REGISTRY_BINARY.is_file():
        pytest.skip(f"no registry program at {REGISTRY_BINARY}")
    client = docker_client()
    source = base_image(client, "bash")
    with (
        tempfile.TemporaryDirectory(prefix="envctl-kube-registry-") as tmp,
        serve_registry(Path(tmp), "127.0.0.1") as address,
    ):
        reference = f"{address}/envctl-kube-test/bash:{TEST_SESSION}"
        client.images.get(source).tag(reference)
        try:
            pushed = subprocess.run(["docker", "push", reference], capture_output=True, text=True, timeout=300)
            assert pushed.returncode == 0, pushed.stderr
        finally:
            client.images.remove(reference)  # the tag only: the base image stays
        yield reference


def test_a_pod_runs_an_image_from_a_loopback_registry_and_exec_answers(
    kube: KubeCluster, kube_namespace: str, loopback_image: str
) -> None:
    from kubernetes import client
    from kubernetes.stream import stream

    core = kube.core()
    name = f"pulled-{uuid.uuid4().hex[:6]}"
    core.create_namespaced_pod(kube_namespace, pod(name, loopback_image))

    wait_running(core, kube_namespace, name, timeout=180)
    answer = stream(
        core.connect_get_namespaced_pod_exec,
        name,
        kube_namespace,
        command=["bash", "-c", "echo hello from $(hostname); cat /etc/debian_version"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
    )

    assert answer.startswith(f"hello from {name}\n"), answer
    assert answer.split("\n")[1].startswith("12"), answer  # the bookworm base image
    core.delete_namespaced_pod(name, kube_namespace, body=client.V1DeleteOptions(grace_period_seconds=0))


def pod(name: str, image: str, secret: str | None = None) -> Any:
    from kubernetes import client

    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"envctl.test-session": TEST_SESSION}),
        spec=client.V1PodSpec(
            restart_policy="Never",
            automount_service_account_token=False,
            termination_grace_period_seconds=0,
            image_pull_secrets=[client.V1LocalObjectReference(name=secret)] if secret else None,
            containers=[
                client.V1Container(name="main", image=image, command=["sleep", "600"], image_pull_policy="Always")
            ],
        ),
    )
