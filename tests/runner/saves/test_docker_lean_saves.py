"""Lean and scanned saves on the real Docker engine (issue 8 item 5, issue 9 item 3, R35)."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from envs.images.config import CONFIG_KEYS
from runner.backends.docker import DockerBackend
from runner.errors import SaveHasSecretsError
from runner.saves.scans import CacheRules, SaveFilter
from runner.settings import DEFAULT_SAVE_CACHES
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers, start_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SECRET = "pl4nted-Secret/Value+42"
MB = 1 << 20


@pytest.fixture(scope="module")
def server(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path_factory.mktemp("lean") / "data")
    yield srv
    remove_runner_containers(docker, srv)


def save(client: httpx.Client, rid: str, environment: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/runtimes/{rid}/save", json={"environment": environment, **body})
    assert r.status_code == 202, r.text
    op = r.json()
    deadline = time.monotonic() + 120
    while op["status"] == "running" and time.monotonic() < deadline:
        op = client.get(f"/operations/{op['id']}", params={"wait": 10}).json()
    return dict(op)


def top_layer(docker: Any, image_id: str) -> dict[str, tarfile.TarInfo]:
    """The members of an image's last layer, by name (whiteouts as ``.wh.`` names): read from
    the engine's overlay2 directory of that layer when readable, else from ``docker save``."""
    upper = ((docker.api.inspect_image(image_id).get("GraphDriver") or {}).get("Data") or {}).get("UpperDir")
    if upper and os.access(upper, os.R_OK):
        found = {}
        for root, dirs, files in os.walk(upper):
            for name in dirs + files:
                host = os.path.join(root, name)
                rel = os.path.relpath(host, upper)
                st = os.lstat(host)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    rel = os.path.join(os.path.dirname(rel), ".wh." + name)
                found[rel] = tarfile.TarInfo(rel)
                found[rel].type = tarfile.DIRTYPE if stat.S_ISDIR(st.st_mode) else tarfile.REGTYPE
                found[rel].size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        return found
    raw = b"".join(docker.api.get_image(image_id))
    with tarfile.open(fileobj=io.BytesIO(raw)) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        data = outer.extractfile(manifest[0]["Layers"][-1]).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(data)) as layer:
        return {m.name.rstrip("/"): m for m in layer.getmembers()}


def test_a_save_leaves_package_caches_out_says_how_much_and_keeps_them_when_asked(server: Server, docker: Any) -> None:
    with server.client() as client:
        rid = new_runtime(client, "lean", language="bash")
        cell = (
            # the real thing, kept quick: apt's lists of the small bookworm-updates suite
            "set -e; echo 'deb http://deb.debian.org/debian bookworm-updates main' > /tmp/u.list; "
            "apt-get update -qq -o Dir::Etc::SourceList=/tmp/u.list -o Dir::Etc::SourceParts=- "
            "-o Acquire::Languages=none; "
            f"head -c {2 * MB} /dev/urandom > /var/cache/apt/archives/fake.deb; "
            f"mkdir -p /root/.cache/pip/http /root/.npm/_cacache; head -c {MB} /dev/urandom > /root/.cache/pip/http/w; "
            "echo n > /root/.npm/_cacache/i; echo kept > /root/kept.txt"
        )
        ex = run(client, rid, cell)
        assert ex["status"] == "ok", text(ex, "stderr")[-2000:]
        changes = {c["path"]: c for c in client.get(f"/runtimes/{rid}/changes").json()}
        assert changes["/var/cache/apt/archives/fake.deb"]["cache"] == "/var/cache/apt"
        assert changes["/root/.cache/pip/http/w"] == {
            "kind": "added",
            "path": "/root/.cache/pip/http/w",
            "size": MB,
            "cache": "/root/.cache/pip",
        }
        assert "cache" not in changes["/root/kept.txt"]
        assert any(c.get("cache") == "/var/lib/apt/lists" for c in changes.values())

        lean = save(client, rid, "lean")
        assert lean["status"] == "succeeded", lean
        left = lean["result"]["left_out"]
        assert set(left) == {"/var/lib/apt/lists", "/var/cache/apt", "/root/.cache/pip", "/root/.npm"}
        assert left["/var/lib/apt/lists"]["bytes"] > 1000  # Debian's package lists
        assert left["/var/cache/apt"]["bytes"] >= 2 * MB and left["/root/.cache/pip"] == {"bytes": MB, "files": 1}
        assert lean["result"]["left_out_bytes"] == sum(c["bytes"] for c in left.values())
        members = top_layer(docker, lean["result"]["image_id"])
        assert "root/kept.txt" in members
        for name, member in members.items():
            if name.startswith(("var/lib/apt/lists/", "var/cache/apt/", "root/.cache/pip/", "root/.npm/")):
                assert member.isdir(), name  # the directories stay, empty: no cache byte
        version = client.get("/environments/lean").json()["versions"][0]
        assert version["save"]["left_out"] == left and version["save"]["caches_kept"] is False

        kept = save(client, rid, "lean", keep_caches=True)
        assert kept["status"] == "succeeded" and kept["result"]["left_out"] == {}
        members = top_layer(docker, kept["result"]["image_id"])
        assert members["var/cache/apt/archives/fake.deb"].size == 2 * MB
        assert any(n.startswith("var/lib/apt/lists/") and m.isfile() for n, m in members.items())

        user = new_runtime(client, "user", environment="lean@1", language="bash")
        check = "cat /root/kept.txt; test ! -e /var/cache/apt/archives/fake.deb && echo ok"
        assert text(run(client, user, check)) == "kept\nok\n"


def test_a_planted_credential_file_refuses_the_save_until_its_path_is_allowed(server: Server, docker: Any) -> None:
    with server.client() as client:
        rid = new_runtime(client, "planted", language="bash")
        cell = "mkdir -p /root/.aws && printf '[default]\\naws_secret_access_key = abc\\n' > /root/.aws/credentials"
        assert run(client, rid, cell)["status"] == "ok"
        before = {i.id for i in docker.images.list(filters={"label": f"{TEST_LABEL}={TEST_SESSION}"})}

        refused = save(client, rid, "planted")

        assert refused["status"] == "failed" and refused["error"]["code"] == "save_has_secrets"
        assert refused["error"]["details"]["findings"] == [
            {"path": "/root/.aws/credentials", "found": ["AWS credentials file"]}
        ]
        assert "/root/.aws/credentials" in refused["error"]["message"] and "abc" not in json.dumps(refused)
        assert {i.id for i in docker.images.list(filters={"label": f"{TEST_LABEL}={TEST_SESSION}"})} == before
        assert client.get("/environments/planted").status_code == 404
        rt = client.get(f"/runtimes/{rid}").json()
        assert rt["state"] == "running" and rt["unsaved_changes"] is True
        assert "aws_secret" in text(run(client, rid, "cat /root/.aws/credentials"))  # nothing lost, not frozen

        allowed = save(client, rid, "planted", allow_secrets=["/root/.aws/credentials"])
        assert allowed["status"] == "succeeded", allowed
        record = [{"path": "/root/.aws/credentials", "found": ["AWS credentials file"]}]
        assert allowed["result"]["allowed_secrets"] == record
        assert client.get("/environments/planted").json()["versions"][0]["save"]["allowed_secrets"] == record


def _template(docker: Any, image: str) -> dict[str, Any]:
    parent = docker.api.inspect_image(image)["Config"]
    template = {key: parent.get(key) for key in CONFIG_KEYS}
    template["Labels"] = {TEST_LABEL: TEST_SESSION}
    return template


def test_a_secret_value_base64d_into_a_file_or_a_draft_layer_is_refused_and_drafts_are_merged(
    docker: Any, tmp_path: Path
) -> None:
    """The save path called with the runtime's secret values given directly; the container runs
    on a draft (an image one commit above the version): the draft's layer is merged into the
    new one, filtered and scanned, and the image keeps only the version's layers below it."""
    image = base_image(docker, "python3")
    backend = DockerBackend(docker, labels={TEST_LABEL: TEST_SESSION})  # its helpers' labels too
    labels = {TEST_LABEL: TEST_SESSION}
    made: list[Any] = []
    encoded = base64.b64encode(SECRET.encode()).decode()
    try:
        first = docker.containers.create(image, ["sleep", "600"], labels=labels)
        made.append(first)
        first.start()
        script = (
            f"echo draft > /root/draft.txt; rm /etc/issue; head -c {MB} /dev/zero > /var/cache/apt/archives/d.deb; "
            f"echo 'token: {encoded}' > /root/old-note"
        )
        assert first.exec_run(["bash", "-c", script]).exit_code == 0
        draft = docker.api.commit(first.id, repository="envctl-test/draft", tag=TEST_SESSION, conf={"Labels": labels})
        second = docker.containers.create(draft["Id"], ["sleep", "600"], labels=labels)
        made.append(second)
        second.start()
        assert second.exec_run(["bash", "-c", "echo upper > /root/upper.txt"]).exit_code == 0
        state = {"container_id": second.id}
        template = _template(docker, image)

        def saved(values: list[str]):  # type: ignore[no-untyped-def]
            observer = SaveFilter(CacheRules.of(DEFAULT_SAVE_CACHES), values)
            return backend.save_layer(
                state,
                config=template,
                repository="envctl-test/lean",
                tag=TEST_SESSION,
                version_image=image,
                observer=observer,
            )

        with pytest.raises(SaveHasSecretsError) as refused:
            saved([SECRET])
        assert refused.value.details["findings"] == [{"path": "/root/old-note", "found": ["secret value (base64)"]}]
        assert SECRET not in refused.value.message and encoded not in refused.value.message
        assert docker.images.list(name=f"envctl-test/lean:{TEST_SESSION}") == []
        second.reload()
        assert second.status == "running"  # resumed after the refused save

        assert second.exec_run(["rm", "/root/old-note"]).exit_code == 0
        result = saved([SECRET])
        assert result.left_out == {"/var/cache/apt": {"bytes": MB, "files": 1}}
        base_layers = docker.api.inspect_image(image)["RootFS"]["Layers"]
        assert docker.api.inspect_image(result.image.id)["RootFS"]["Layers"][:-1] == base_layers
        members = top_layer(docker, result.image.id)
        assert {"root/draft.txt", "root/upper.txt", "etc/.wh.issue", "root/.wh.old-note"} <= set(members)
        assert "var/cache/apt/archives/d.deb" not in members
        out = docker.containers.run(
            result.image.id,
            ["bash", "-c", "cat /root/draft.txt /root/upper.txt; ls /etc/issue /root/old-note 2>&1 | wc -l"],
            remove=True,
            labels=labels,
        )
        assert out == b"draft\nupper\n2\n"
    finally:
        backend.helpers.close()
        for container in made:
            container.remove(force=True)


def test_where_the_overlay_directories_cannot_be_used_a_commit_is_scanned_first_and_nothing_left_out(
    docker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel whose overlay keeps only metadata in the upper directory (``metacopy``) cannot
    be made here: stood in for by saying so; the save then reads the changes from the engine."""
    from runner.backends import saves

    monkeypatch.setattr(saves, "_whole_files", lambda: False)
    image = base_image(docker, "python3")
    backend = DockerBackend(docker, labels={TEST_LABEL: TEST_SESSION})  # its helpers' labels too
    container = docker.containers.create(image, ["sleep", "600"], labels={TEST_LABEL: TEST_SESSION})
    try:
        container.start()
        script = "printf 'machine h password p\\n' > /root/.netrc; head -c 4096 /dev/zero > /var/cache/apt/x.bin"
        assert container.exec_run(["bash", "-c", script]).exit_code == 0
        state = {"container_id": container.id}
        options: dict[str, Any] = {"config": _template(docker, image), "repository": "envctl-test/fallback"}
        with pytest.raises(SaveHasSecretsError) as refused:
            backend.save_layer(
                state,
                tag=TEST_SESSION,
                version_image=image,
                observer=SaveFilter(CacheRules.of(DEFAULT_SAVE_CACHES)),
                **options,
            )
        assert refused.value.details["findings"] == [{"path": "/root/.netrc", "found": ["netrc credentials file"]}]
        assert docker.images.list(name=f"envctl-test/fallback:{TEST_SESSION}") == []
        allowed = SaveFilter(CacheRules.of(DEFAULT_SAVE_CACHES), allow=["/root/.netrc"])
        made = backend.save_layer(state, tag=TEST_SESSION, version_image=image, observer=allowed, **options)
        assert made.lean is False and made.left_out == {}
        assert allowed.allowed() == [{"path": "/root/.netrc", "found": ["netrc credentials file"]}]
    finally:
        backend.helpers.close()
        container.remove(force=True)
