"""The push a boot on Swarm needs (runner/runtimes/boot.py ``_registry_image``), on the real swarm
of ``scripts/swarm-fixture``: a version never pushed goes to the managed registry by envctl
itself, with a push grant for that one repository (registry/pull_grants.py), so a user who is
not an admin boots a base version nobody pushed yet, and gets no push right of their own from it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from registry.distribution import SERVICE
from tests.fixtures.registry import Image, RegistryClient
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.registry.test_registry_auth import _access
from tests.runner.cells.test_docker_executions import run, text
from tests.runner.swarm.test_swarm_drafts import log_of
from tests.runner.swarm.test_swarm_fence import boot

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swarm-boot-push") / "data")  # a registry of its own
    srv.start()
    yield srv
    remove_installation(swarm, srv)


def version_one(client: httpx.Client) -> dict[str, Any]:
    found = client.get("/environments/bash")
    assert found.status_code == 200, found.text
    [v] = [v for v in found.json()["versions"] if v["ref"] == "bash@1"]
    return dict(v)


def test_a_users_first_boot_of_a_never_pushed_base_version_is_pushed_by_envctl_and_grants_the_user_no_push(
    server: Server, swarm: Swarm
) -> None:
    with server.client() as admin:
        before = version_one(admin)
        made = admin.post("/users", json={"name": f"plain-{uuid.uuid4().hex[:6]}"})
        assert made.status_code == 201, made.text
    assert before.get("registry_digest") is None, before  # never pushed: the boot must push it
    name, token = made.json()["name"], made.json()["token"]

    with server.client(token) as client:
        rt = boot(server, client, "first-boot", "w1")
        assert rt["node"] == "swarm-worker1", rt
        assert text(run(client, rt["id"], "echo booted-on-$(hostname)")).startswith("booted-on-"), rt
        uploaded = [e for e in log_of(client, rt["id"]) if e.get("event") == "uploaded"]
        assert uploaded and "uploaded bash@1" in uploaded[0]["message"], log_of(client, rt["id"])
        after = version_one(client)
        assert after["registry_digest"], after  # recorded: the next boot pulls it by that digest
        client.delete(f"/runtimes/{rt['id']}")

    # the user's own rights on that repository are what they were: pull, no push
    registry = f"http://127.0.0.1:{server.env['ENVCTL_REGISTRY_PORT']}"
    asked = httpx.get(
        f"{server.url}/registry/token",
        params={"service": SERVICE, "scope": ["repository:bash:pull,push"]},
        auth=(name, token),
    )
    assert _access(asked) == [{"type": "repository", "name": "bash", "actions": ["pull"]}]
    user = RegistryClient(registry, (name, token))
    assert user.push("bash", "99", Image.made("the user's own push")).status_code == 401
    manifest = user.request(
        "GET",
        "/v2/bash/manifests/1",
        "repository:bash:pull",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    assert manifest.status_code == 200, manifest.text  # what envctl pushed, the user may pull
    # the grant's user name takes no API token: the user cannot borrow envctl's way in
    borrowed = httpx.get(
        f"{server.url}/registry/token",
        params={"service": SERVICE, "scope": ["repository:bash:push"]},
        auth=("envctl-push-grant", token),
    )
    assert borrowed.status_code == 401, borrowed.text
