"""Team secrets in a real Docker runtime (issue 9 item 2): R6 (no value in the container's
configuration, labels, host config or log), the files on a tmpfs, the planted-secret save that
is refused naming each path, and R7 (a save of a runtime that used a secret holds no value in
its image config or any layer, plain, base64 or URL-encoded). One runtime for the module."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from envs.images.rewrite import ChunkReader
from runner.saves.scans import secret_forms
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers, start_server
from tests.runner.saves.test_docker_lean_saves import save, top_layer

pytestmark = [pytest.mark.docker, pytest.mark.slow]

VALUE = "Db-pa55/w0rd+for=envctl&more"
FORMS = [form for form, _ in secret_forms([VALUE])]


@pytest.fixture(scope="module", params=["unix", "tcp"])
def server(request: pytest.FixtureRequest, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """On both agent channels: the secrets reach the agent over its Unix socket, or over TLS."""
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path_factory.mktemp("secrets") / "data", ENVCTL_RUNNER_CHANNEL=request.param)
    yield srv
    remove_runner_containers(docker, srv)


@pytest.fixture(scope="module")
def runtime(server: Server) -> Iterator[tuple[httpx.Client, str]]:
    with server.client() as client:
        assert client.post("/teams", json={"name": "acme"}).status_code == 201
        assert client.put("/teams/acme/secrets/db-pass", json={"value": VALUE}).status_code == 201
        rid = new_runtime(client, "secretive", language="bash", env={"DB_PASSWORD": {"secret": "db-pass"}})
        r = client.post(f"/runtimes/{rid}/start", params={"wait": 60})
        assert r.status_code == 202 and r.json()["state"] == "running", r.text
        yield client, rid


def _holds_value(data: bytes) -> list[str]:
    return [form.decode() for form in FORMS if form in data]


def test_no_secret_value_is_in_the_containers_configuration_labels_host_config_or_log(
    runtime: tuple[httpx.Client, str], docker: Any
) -> None:
    """R6."""
    client, rid = runtime
    cid = client.get(f"/runtimes/{rid}").json()
    container = docker.containers.get(f"envctl-{rid}")
    inspected = json.dumps(docker.api.inspect_container(container.id)).encode()
    assert _holds_value(inspected) == []
    assert "/run/secrets" in inspected.decode()  # the tmpfs, by its options only
    assert _holds_value(container.logs()) == []
    assert VALUE not in json.dumps(cid)
    # the cell has it, as a variable and as a private file on a tmpfs
    cell = 'printf %s "$DB_PASSWORD"; echo; stat -c %a /run/secrets/db-pass; cat /run/secrets/db-pass; echo; '
    cell += "awk '$2 == \"/run/secrets\" {print $3}' /proc/mounts"
    assert text(run(client, rid, cell)).split("\n") == [VALUE, "400", VALUE, "tmpfs", ""]


def test_a_planted_secret_refuses_the_save_naming_each_path_and_a_clean_save_holds_no_value(
    runtime: tuple[httpx.Client, str], docker: Any
) -> None:
    """The planted-secret check of issue 9, then R7 on the save that follows."""
    client, rid = runtime
    plant = (
        'printf "%s\\n" "$DB_PASSWORD" > /root/password.txt; '
        'printf %s "$DB_PASSWORD" | base64 > /root/password.b64; '
        'echo "export DB_PASSWORD=$DB_PASSWORD" >> /root/.bash_history'
    )
    assert run(client, rid, plant)["status"] == "ok"

    refused = save(client, rid, "acme/planted")

    assert refused["status"] == "failed" and refused["error"]["code"] == "save_has_secrets", refused
    found = {f["path"]: f["found"] for f in refused["error"]["details"]["findings"]}
    assert set(found) == {"/root/password.txt", "/root/password.b64", "/root/.bash_history"}, found
    assert found["/root/password.b64"] == ["secret value (base64)"]
    for path in found:
        assert path in refused["error"]["message"]
    assert _holds_value(json.dumps(refused).encode()) == []
    assert client.get("/environments/acme/planted").status_code == 404

    assert run(client, rid, "rm /root/password.txt /root/password.b64 /root/.bash_history")["status"] == "ok"
    saved = save(client, rid, "acme/clean")
    assert saved["status"] == "succeeded", saved
    image_id = client.get("/environments/acme/clean").json()["versions"][0]["image_id"]
    layer = top_layer(docker, image_id)
    assert not any(name.startswith("run/secrets/") for name in layer), sorted(layer)
    assert _holds_value(json.dumps(docker.api.inspect_image(image_id)).encode()) == []
    # every layer tarball (the parent's too), the config and the manifests, from `docker save`
    searched = []
    stream = io.BufferedReader(ChunkReader(docker.api.get_image(image_id)), 1 << 20)
    with tarfile.open(fileobj=stream, mode="r|") as outer:
        for member in outer:
            handle = outer.extractfile(member) if member.isfile() else None
            if handle is None:
                continue
            tail = b""
            while chunk := handle.read(8 << 20):
                assert _holds_value(tail + chunk) == [], member.name
                tail = chunk[-256:]
            searched.append(member.name)
    layers = [name for name in searched if name.endswith("layer.tar") or name.startswith("blobs/")]
    assert len(layers) >= len(docker.api.inspect_image(image_id)["RootFS"]["Layers"]), searched
