"""Drafts through the registry (issue 15 item 2): on the in-runtime save path a stop's unsaved
changes are streamed by the agent into ``envctl-drafts/<runtime id>``, and the next boot, on
whichever node, pulls them by digest (runner/saves/drafts.py, registry/drafts.py).

One ``envctl serve`` with ``ENVCTL_SAVE_PATH=runtime``, the TCP agent channel (as on a cluster)
and its managed registry. The engine never holds the draft before the boot pulls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from docker.errors import NotFound

from tests.fixtures.registry import MANIFEST, RegistryClient
from tests.fixtures.server import Server
from tests.fixtures.transfer import registry_server
from tests.runner.cells.test_docker_executions import run
from tests.runner.conftest import remove_runner_containers
from tests.runner.saves.test_docker_insave import LISTING, booted, ok, save_op

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ENV = "acme/drafted"


@pytest.fixture(scope="module")
def server(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = registry_server(docker, tmp_path_factory.mktemp("drafts") / "data")
    srv.stop()
    srv.env["ENVCTL_SAVE_PATH"] = "runtime"
    srv.env["ENVCTL_RUNNER_CHANNEL"] = "tcp"
    srv.start()
    with srv.client() as client:
        assert client.post("/teams", json={"name": "acme"}).status_code == 201
    yield srv
    remove_runner_containers(docker, srv)


def registry_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.env['ENVCTL_REGISTRY_PORT']}"


def kept_draft(client: httpx.Client, rid: str) -> dict[str, Any]:
    """The details of the runtime's last ``draft-kept`` log entry."""
    entries = [e for e in client.get(f"/runtimes/{rid}/log").json() if e.get("event") == "draft-kept"]
    assert entries, client.get(f"/runtimes/{rid}/log").json()
    return dict(entries[-1]["details"])


def manifest_stored(server: Server, rid: str, digest: str) -> bool:
    """Whether the registry's storage still links the manifest ``digest`` in the runtime's drafts."""
    revisions = server.data_dir / "registry" / "storage" / "docker" / "registry" / "v2" / "repositories"
    link = revisions / "envctl-drafts" / rid / "_manifests" / "revisions" / "sha256" / digest.split(":")[1] / "link"
    return Path(link).is_file()


def stop(server: Server, client: httpx.Client, rid: str) -> None:
    assert client.post(f"/runtimes/{rid}/stop").status_code in (200, 202)
    assert server.wait_state(client, rid, {"stopped", "error"}, timeout=180)["state"] == "stopped"


def start(server: Server, client: httpx.Client, rid: str) -> None:
    client.post(f"/runtimes/{rid}/start")
    state = server.wait_state(client, rid, {"running", "error"}, timeout=180)
    assert state["state"] == "running", state


def no_image(docker: Any, image_id: str) -> None:
    with contextlib.suppress(NotFound):
        docker.images.remove(image_id, force=True)
    with pytest.raises(NotFound):
        docker.images.get(image_id)


def layers_of(server: Server, admin: tuple[str, str], ref: str) -> list[str]:
    registry = RegistryClient(registry_url(server), admin)
    try:
        repo, _, tag = ref.rpartition(":")
        got = registry.request(
            "GET", f"/v2/{repo}/manifests/{tag}", f"repository:{repo}:pull", headers={"Accept": MANIFEST}
        )
        assert got.status_code == 200, got.text
        return [layer["digest"] for layer in got.json()["layers"]]
    finally:
        registry.close()


def test_a_draft_made_at_stop_is_restored_from_the_registry_and_goes_into_the_next_save(
    server: Server, docker: Any
) -> None:
    with server.client() as client:
        rid = booted(server, client, "bash", "drafter")
        ok(
            run(
                client,
                rid,
                "set -e; mkdir -p /opt/t/sub /opt/t/empty; echo one > /opt/t/a.txt; "
                "head -c 3000000 /dev/urandom > /opt/t/big.bin; ln -s ../a.txt /opt/t/sub/link; "
                "echo x > /opt/t/xattr; python3 -c \"import os; os.setxattr('/opt/t/xattr', 'user.note', b'kept')\"; "
                "echo changed >> /etc/skel/.bashrc; rm /etc/skel/.profile; rm -rf /usr/share/doc/bash",
            )
        )
        before = ok(run(client, rid, LISTING))
        stop(server, client, rid)
        draft = kept_draft(client, rid)
        assert draft["repository"] == f"envctl-drafts/{rid}"
        assert manifest_stored(server, rid, draft["manifest"])
        no_image(docker, draft["image_id"])  # the engine never had it: the boot must pull it

        start(server, client, rid)
        log = client.get(f"/runtimes/{rid}/log").json()
        pulled = [e for e in log if e.get("event") == "draft-downloaded"]
        assert pulled and pulled[-1]["details"]["manifest"] == draft["manifest"], log
        assert ok(run(client, rid, LISTING)) == before  # every checksum, mode, link and xattr the same

        # a change after the restore: the save holds both it and the draft's changes
        ok(run(client, rid, "echo three > /opt/t/c.txt"))
        expected = ok(run(client, rid, LISTING))
        first = save_op(client, rid, ENV, message="first")
        assert first["status"] == "succeeded", first.get("error") or first
        assert not manifest_stored(server, rid, draft["manifest"])  # saved: the draft's manifest went

        # a second save: a single new layer on the first version
        ok(run(client, rid, "echo four > /opt/t/d.txt"))
        second = save_op(client, rid, ENV, message="second")
        assert second["status"] == "succeeded", second.get("error") or second
        assert second["result"]["layer"]["bytes"] < 100_000, second["result"]["layer"]
        me = client.get("/users/me").json()
        admin = (me["name"], (server.data_dir / "admin-token").read_text().strip())
        one, two = layers_of(server, admin, f"{ENV}:1"), layers_of(server, admin, f"{ENV}:2")
        assert len(two) == len(one) + 1 and two[: len(one)] == one
        stop(server, client, rid)

        # a fresh runtime on the first version, pulled from the registry: the draft's changes are in it
        no_image(docker, first["result"]["image_id"])
        other = booted(server, client, f"{ENV}@1", "reader")
        assert ok(run(client, other, LISTING)) == expected
        assert "/etc/skel/.profile" not in expected and "/usr/share/doc/bash" not in expected
        client.post(f"/runtimes/{other}/stop")


def test_a_reset_throws_the_draft_away_and_deletes_its_manifest(server: Server) -> None:
    with server.client() as client:
        rid = booted(server, client, "bash", "resetter")
        ok(run(client, rid, "mkdir -p /opt/r && echo gone-soon > /opt/r/x && echo ok"))
        stop(server, client, rid)
        first = kept_draft(client, rid)
        assert manifest_stored(server, rid, first["manifest"])

        # a second stop replaces the draft: the first manifest goes, the new one holds both changes
        start(server, client, rid)
        ok(run(client, rid, "echo more > /opt/r/y && rm /etc/skel/.bashrc && echo ok"))
        stop(server, client, rid)
        second = kept_draft(client, rid)
        assert second["manifest"] != first["manifest"]
        assert not manifest_stored(server, rid, first["manifest"]) and manifest_stored(server, rid, second["manifest"])
        start(server, client, rid)
        restored = ok(run(client, rid, "cat /opt/r/x /opt/r/y; test -e /etc/skel/.bashrc && echo there || echo no"))
        assert restored == "gone-soon\nmore\nno\n"

        reset = client.post(f"/runtimes/{rid}/reset")
        assert reset.status_code in (200, 202), reset.text
        assert server.wait_state(client, rid, {"running", "error"}, timeout=180)["state"] == "running"
        assert not manifest_stored(server, rid, second["manifest"])
        assert ok(run(client, rid, "test -e /opt/r/x && echo there || echo none")) == "none\n"

        # deleting the runtime deletes a draft it still had
        ok(run(client, rid, "mkdir -p /opt/r && echo last > /opt/r/z && echo ok"))
        stop(server, client, rid)
        last = kept_draft(client, rid)
        assert manifest_stored(server, rid, last["manifest"])
        assert client.delete(f"/runtimes/{rid}").status_code in (200, 204)
        assert not manifest_stored(server, rid, last["manifest"])


def test_no_token_from_the_token_server_pulls_a_draft(server: Server) -> None:
    """R22 for drafts: an outsider, a member of the runtime's team, even an admin get no action."""
    with server.client() as client:
        rid = booted(server, client, "bash", "private")
        ok(run(client, rid, "echo mine > /opt/private && echo ok"))
        stop(server, client, rid)
        draft = kept_draft(client, rid)
        made = client.post("/users", json={"name": "outsider"})
        assert made.status_code == 201, made.text
        me = client.get("/users/me").json()
        admin = (me["name"], (server.data_dir / "admin-token").read_text().strip())
        for who in (("outsider", made.json()["token"]), admin):
            registry = RegistryClient(registry_url(server), who)
            try:
                got = registry.pull(f"envctl-drafts/{rid}", draft["manifest"])
                assert got.status_code == 401, (who[0], got.status_code)
                answer = registry.http.get(
                    f"{server.url}/registry/token",
                    params={"service": "envctl-registry", "scope": f"repository:envctl-drafts/{rid}:pull,push"},
                    auth=who,
                )
                if answer.status_code == 200:
                    import base64
                    import json

                    claims = answer.json()["token"].split(".")[1]
                    claims += "=" * (-len(claims) % 4)
                    access = json.loads(base64.urlsafe_b64decode(claims))["access"]
                    assert all(not a["actions"] for a in access), access
            finally:
                registry.close()
        # the catalog lists no draft
        assert "envctl-drafts" not in client.get("/catalog").text
        client.delete(f"/runtimes/{rid}")
