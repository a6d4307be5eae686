"""Versions through the real registry (issue 8 item 4, R24): a save into a team's environment
pushes it, only the new layer travels, a boot of a version the engine lacks pulls it by the
recorded digest (not the tag), and a digest that does not match aborts the boot.

One ``envctl serve`` (Docker backend) runs the managed registry (Debian's docker-registry) and
is its token server; the engine signs in with a token envctl makes for the user. What the
registry received is counted from its storage directory (one ``data`` file per blob).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from envs import service as envs_service
from envs.kit.db import Database
from envs.models import EnvironmentVersion
from tests.fixtures.server import Server
from tests.fixtures.transfer import MB, blobs_of, cli_json, registry_server
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers
from tests.runner.saves.test_docker_saves import save

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ENV = "acme/transfer"


@pytest.fixture(scope="module")
def server(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = registry_server(docker, tmp_path_factory.mktemp("transfer") / "data")
    with srv.client() as client:
        assert client.post("/teams", json={"name": "acme"}).status_code == 201
    yield srv
    remove_runner_containers(docker, srv)


class Watcher:
    """Reads a runtime every 20 ms in a thread: the (phase, progress) pairs it saw."""

    def __init__(self, server: Server, rid: str) -> None:
        self.seen: list[tuple[str | None, dict[str, int] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, rid), daemon=True)

    def _run(self, server: Server, rid: str) -> None:
        with server.client() as client:
            while not self._stop.is_set():
                rt = client.get(f"/runtimes/{rid}").json()
                self.seen.append((rt["phase"], rt.get("progress")))
                time.sleep(0.02)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def progress_in(self, phase: str) -> list[dict[str, int]]:
        return [p for ph, p in self.seen if ph == phase and p is not None]


def _db(server: Server) -> Database:
    return Database(f"sqlite:///{server.data_dir / 'envctl.db'}")


def _version(server: Server, number: int) -> dict[str, Any]:
    db = _db(server)
    try:
        with db.session() as s:
            v = envs_service.resolve(s, f"{ENV}@{number}")
            return {"id": v.id, "image_id": v.image_id, "registry_digest": v.registry_digest}
    finally:
        db.dispose()


def test_a_save_into_a_team_pushes_only_the_new_layer_and_a_boot_pulls_by_the_recorded_digest(
    server: Server, docker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = server.data_dir / "registry" / "storage"
    with server.client() as client:
        author = new_runtime(client, "author", environment="bash", language="bash")
        assert run(client, author, f"head -c {MB} /dev/urandom > /root/one")["status"] == "ok"
        with Watcher(server, author) as watch:
            first = save(client, author, ENV, "one")
        assert first["result"]["pushed"] is True, first
        assert "pushed to the registry" in first["message"]
        uploading = watch.progress_in("uploading")  # seen while it ran, bytes growing
        assert any(p["total"] > 0 for p in uploading), watch.seen[-20:]
        uploaded = [e for e in client.get(f"/runtimes/{author}/log").json() if e["event"] == "uploaded"]
        assert uploaded[-1]["details"]["bytes"] == uploaded[-1]["details"]["total"] > 100 * MB  # the base's too
        _stop(server, client, author)

        # a child adding 1 MB sends about 1 MB: count what the registry received
        child = new_runtime(client, "child", environment=ENV, language="bash")
        assert run(client, child, f"head -c {MB} /dev/urandom > /root/two")["status"] == "ok"
        before = blobs_of(storage)
        second = save(client, child, ENV, "two", tag="stable")
        received = {d: n for d, n in blobs_of(storage).items() if d not in before}
        assert second["result"]["pushed"] is True, second
        assert MB <= sum(received.values()) <= 1.2 * MB, received
        v1, v2 = _version(server, 1), _version(server, 2)
        assert v2["registry_digest"] == second["result"]["registry_digest"]
        assert v2["registry_digest"] in received  # the manifest is one of the new blobs
        assert client.get(f"/environments/{ENV}").json()["versions"][1]["registry_digest"] == v2["registry_digest"]
        _stop(server, client, child)

        # R24: a runtime made from the tag, the tag moved, the image gone: the boot pulls the
        # recorded digest, not what the tag names now
        reader = new_runtime(client, "reader", environment=f"{ENV}:stable", language="bash")
        assert client.get(f"/runtimes/{reader}").json()["environment"] == f"{ENV}@2"
        _stop(server, client, reader)
        _move_tag(server, "stable", to=1)
        # gone for real: the never-started helper envctl keeps on a version for its next save
        # (runner/backends/helpers.py) would keep the image's layers in the engine
        for helper in docker.containers.list(
            all=True, filters={"label": "envctl.managed=save-helper", "ancestor": v2["image_id"]}
        ):
            helper.remove(force=True)
        docker.images.remove(v2["image_id"], force=True)
        client.post(f"/runtimes/{reader}/start")
        rt = server.wait_state(client, reader, {"running", "error"}, timeout=120)
        assert rt["state"] == "running", (rt["state_reason"], rt["state_message"])
        assert rt["environment"] == f"{ENV}@2"
        assert text(run(client, reader, "wc -c < /root/two")) == f"{MB}\n"
        downloaded = [e for e in client.get(f"/runtimes/{reader}/log").json() if e["event"] == "downloaded"]
        assert downloaded and MB <= downloaded[-1]["details"]["bytes"] <= 1.2 * MB, downloaded
        assert downloaded[-1]["details"]["digest"] == v2["registry_digest"]
        assert docker.images.get(v2["image_id"]).attrs["RepoDigests"]

        # the CLI: pull a version the engine lacks (a bar on a terminal, JSON here), push one
        # the registry has (nothing travels, same digest)
        _stop(server, client, reader)
        docker.images.remove(v2["image_id"], force=True)
        pulled = cli_json(server, capsys, "pull", f"{ENV}@2")
        assert pulled["result"]["pulled"] is True and MB <= pulled["result"]["bytes"] <= 1.2 * MB, pulled
        assert docker.images.get(v2["image_id"])
        assert cli_json(server, capsys, "pull", f"{ENV}:stable")["result"]["pulled"] is False  # @1 is here
        pushed = cli_json(server, capsys, "push", f"{ENV}@2")
        assert pushed["result"]["registry_digest"] == v2["registry_digest"] and pushed["result"]["bytes"] == 0

        # a digest that is not the version's: the boot aborts and says so; nothing else goes
        docker.images.remove(v2["image_id"], force=True)
        _set_digest(server, 2, v1["registry_digest"])
        client.post(f"/runtimes/{reader}/start")
        rt = server.wait_state(client, reader, {"running", "error"}, timeout=120)
        assert rt["state"] == "error" and rt["state_reason"] == "digest-mismatch", rt
        assert "not the version the catalog recorded" in rt["state_message"]
        docker.images.get(v1["image_id"])  # the other version is still here
        for rid in (reader, child, author):
            client.delete(f"/runtimes/{rid}")


def _stop(server: Server, client: httpx.Client, rid: str) -> None:
    client.post(f"/runtimes/{rid}/stop")
    server.wait_state(client, rid, {"stopped"})


def _move_tag(server: Server, tag: str, *, to: int) -> None:
    db = _db(server)
    try:
        with db.session() as s:
            target = envs_service.resolve(s, f"{ENV}@{to}")
            envs_service.set_tag(s, target.environment, tag, target)
    finally:
        db.dispose()


def _set_digest(server: Server, number: int, digest: str) -> None:
    db = _db(server)
    try:
        with db.session() as s:
            v = envs_service.resolve(s, f"{ENV}@{number}")
            s.get(EnvironmentVersion, v.id).registry_digest = digest  # type: ignore[union-attr]
    finally:
        db.dispose()
