"""The cluster's containerd pulls from envctl's own registry (Debian's docker-registry with
envctl as its token server, as ``envctl serve`` runs it) on loopback: with a pull secret holding
a user's envctl token the pod runs; without it the registry's refusal is the pod's event."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.app import create_app
from api.dbschema import upgrade
from api.settings import Settings
from api.startup import Services
from envs.kit.db import Database
from registry import users as registry_service
from registry.teams import Actor, create_team
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.kube import KubeCluster, wait_running
from tests.fixtures.registry import Image, RegistryClient, start_registry
from tests.fixtures.server import served
from tests.fixtures.services import _free_port
from tests.fixtures.swarm import IMAGE_FILES, tiny_image_tar
from tests.kube.test_cluster import pod

pytestmark = [pytest.mark.kube, pytest.mark.registry, pytest.mark.slow]


@dataclass
class Registry:
    address: str  # 127.0.0.1:port
    user: str
    token: str  # the user's envctl API token
    image: str


def tiny_image() -> Image:
    """An image containerd can unpack: the tiny root filesystem (dash, sleep, ...) as one
    uncompressed layer, its config naming the layer's digest."""
    layer = tiny_image_tar()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    return Image(json.dumps(config).encode(), layer)


@pytest.fixture(scope="module")
def envctl_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    missing = [s for s in IMAGE_FILES.values() if not Path(s).exists()]
    if missing:
        pytest.skip(f"the tiny image is made of this host's programs; missing: {', '.join(missing)}")
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("kube-registry") / "data",
        api_port=_free_port(),
        registry_port=_free_port(),
        runner_backend="fake",
        runner_name=f"test-{TEST_SESSION}-{uuid.uuid4().hex[:8]}",
        runner_labels={TEST_LABEL: TEST_SESSION},
    )
    upgrade(settings.effective_database_url)
    db = Database(settings.effective_database_url)
    with db.session() as s:
        alice = registry_service.create_user(s, "alice")
        token = registry_service.issue_token(s, alice, "kube pulls")
        create_team(s, "acme", Actor(alice.id))
    db.dispose()
    for registry in start_registry(settings):
        with served(create_app(Services.build(settings)), settings.api_port):
            client = RegistryClient(registry.url, ("alice", token))
            pushed = client.push("acme/tiny", "1", tiny_image())
            client.close()
            assert pushed.status_code == 201, pushed.text
            address = registry.url.removeprefix("http://")
            yield Registry(address, "alice", token, f"{address}/acme/tiny:1")


def test_a_pod_pulls_from_envctls_registry_with_a_pull_secret(
    kube: KubeCluster, kube_namespace: str, envctl_registry: Registry
) -> None:
    from kubernetes import client
    from kubernetes.stream import stream

    core = kube.core()
    login = f"{envctl_registry.user}:{envctl_registry.token}"
    auths = {envctl_registry.address: {"auth": base64.b64encode(login.encode()).decode()}}
    core.create_namespaced_secret(
        kube_namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="envctl-pull"),
            type="kubernetes.io/dockerconfigjson",
            string_data={".dockerconfigjson": json.dumps({"auths": auths})},
        ),
    )
    name = f"secret-{uuid.uuid4().hex[:6]}"

    core.create_namespaced_pod(kube_namespace, pod(name, envctl_registry.image, secret="envctl-pull"))

    wait_running(core, kube_namespace, name, timeout=120)
    answer = stream(
        core.connect_get_namespaced_pod_exec,
        name,
        kube_namespace,
        command=["/bin/sh", "-c", "echo pulled with a token"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
    )
    assert answer == "pulled with a token\n"


def test_without_the_pull_secret_the_registry_refuses_and_the_pod_says_so(
    kube: KubeCluster, kube_namespace: str, envctl_registry: Registry
) -> None:
    core = kube.core()
    name = f"nosecret-{uuid.uuid4().hex[:6]}"

    core.create_namespaced_pod(kube_namespace, pod(name, envctl_registry.image))

    deadline = time.monotonic() + 60
    while True:
        events = core.list_namespaced_event(kube_namespace, field_selector=f"involvedObject.name={name}").items
        failed = [e.message for e in events if e.reason == "Failed" and "pull" in e.message.lower()]
        if failed:
            break
        assert time.monotonic() < deadline, [f"{e.reason}: {e.message}" for e in events]
        time.sleep(0.5)
    assert "pull access denied" in failed[0] and "authorization failed" in failed[0], failed[0]
    assert core.read_namespaced_pod(name, kube_namespace).status.phase == "Pending"
