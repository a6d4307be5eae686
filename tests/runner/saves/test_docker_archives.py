"""Export and load: a version with its lineage moves to another envctl and boots there (R25)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.dbschema import upgrade
from tests.fixtures.server import Server
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers
from tests.runner.saves.test_docker_saves import save

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_an_exported_version_loads_into_a_fresh_envctl_with_its_lineage_and_boots(
    server: Server, docker: Any, tmp_path: Path
) -> None:
    with server.client() as client:
        rid = new_runtime(client, "maker", language="bash")
        run(client, rid, "echo travelled > /root/souvenir")
        op = save(client, rid, "team/portable", "for elsewhere")
        image_id = op["result"]["image_id"]
        client.delete(f"/runtimes/{rid}")
        archive = _export(client, "team/portable@1", tmp_path / "portable.tar")
    with tarfile.open(archive) as tar:
        meta = json.load(tar.extractfile("envctl-export.json"))  # type: ignore[arg-type]
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert [v["ref"] for v in meta["versions"]] == ["team/portable@1", "python3@1", "bash@1"]
    assert {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]} == {
        "team/portable@1",
        "python3@1",
        "bash@1",
    }
    docker.images.remove(image_id, force=True)  # the engine forgets it: only the archive has it

    data = tmp_path / "elsewhere"
    upgrade(f"sqlite:///{data / 'envctl.db'}")  # an empty envctl: not even base images registered
    other = Server(data, env={**server.env, "ENVCTL_RUNNER_NAME": server.env["ENVCTL_RUNNER_NAME"] + "-b"})
    other.start()
    try:
        with other.client() as client:
            r = client.post(
                "/environments/load", content=archive.read_bytes(), headers={"Content-Type": "application/x-tar"}
            )
            assert r.status_code == 201, r.text
            assert [v["ref"] for v in r.json()] == ["team/portable@1", "python3@1", "bash@1"]
            lineage = client.get("/environments/team/portable/lineage").json()
            assert [s["ref"] for s in lineage] == ["team/portable@1", "python3@1", "bash@1"]
            assert lineage[0]["message"] == "for elsewhere" and lineage[0]["author"] == "admin"
            assert client.get("/environments/team/portable").json()["versions"][0]["digest"] == image_id
            rid = new_runtime(client, "visitor", environment="team/portable", language="bash")
            assert text(run(client, rid, "cat /root/souvenir")) == "travelled\n"
            again = client.post("/environments/load", content=archive.read_bytes())
            assert [v["new"] for v in again.json()] == [False, False, False]
    finally:
        remove_runner_containers(docker, other)


def _export(client: httpx.Client, ref: str, archive: Path) -> Path:
    """Download ``GET /environments/{ref}/export`` to ``archive``."""
    with client.stream("GET", f"/environments/{ref}/export") as resp:
        assert resp.status_code == 200
        with open(archive, "wb") as f:
            for chunk in resp.iter_bytes():
                f.write(chunk)
    return archive


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ([_file("../evil")], "outside the destination"),
        ([_file("/etc/evil")], "outside the destination"),
        ([_file("blobs/../../evil")], "outside the destination"),
        ([_special("index.json", tarfile.SYMTYPE, "/etc/passwd")], "is a link"),
        ([_special("blobs/sha256/" + "0" * 64, tarfile.LNKTYPE, "/etc/shadow")], "is a link"),
        ([_special("dev", tarfile.CHRTYPE)], "device"),
        ([_special("fifo", tarfile.FIFOTYPE)], "device or fifo"),
        ([_file("blobs/sha256/" + "a" * 64, b"not what the name says")], "does not match its digest"),
        ([_file("something-else.txt")], "not part of an envctl archive"),
        ([_file("oci-layout"), _file("index.json", b"{}")], "envctl-export.json is missing"),
    ],
)
def test_archives_with_escaping_paths_links_devices_or_bad_digests_are_refused(
    shared_server: Server, tmp_path: Path, members: list[Any], problem: str
) -> None:
    """R25 (and R24: a blob that does not match its digest aborts the load)."""
    sentinel = Path("/tmp/evil")
    with shared_server.client() as client:
        before = client.get("/environments").json()
        r = client.post("/environments/load", content=_tar(members))
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "bad_archive" and problem in r.json()["error"]["message"]
        assert client.get("/environments").json() == before
    assert not sentinel.exists() and not Path("/etc/evil").exists()


def test_garbage_is_not_an_archive(shared_server: Server) -> None:
    """R25."""
    with shared_server.client() as client:
        r = client.post("/environments/load", content=b"this is not a tar file at all" * 10)
        assert r.status_code == 422 and "not a readable tar file" in r.json()["error"]["message"]


def test_an_archive_that_would_add_to_another_users_environment_is_refused_before_loading(
    server: Server, docker: Any, tmp_path: Path
) -> None:
    """An archive of the admin's team/portable@2 (since deleted here) may not be loaded by Bob:
    it would add a version to the admin's environment. Refused with 403 before its images reach
    the engine; that its lineage names versions already here (team/portable@1, python3@1,
    bash@1) is no write and not what is refused."""
    with server.client() as client:
        rid = new_runtime(client, "maker", language="bash")
        run(client, rid, "echo once > /root/first")
        first = save(client, rid, "team/portable", "first")["result"]["image_id"]
        run(client, rid, "echo twice > /root/second")
        second = save(client, rid, "team/portable", "second")["result"]["image_id"]
        archive = _export(client, "team/portable@2", tmp_path / "portable.tar")
        assert client.delete("/environments/team/portable@2").status_code == 409  # the runtime is on it
        client.delete(f"/runtimes/{rid}")
        assert client.delete("/environments/team/portable@2").status_code == 204
        if any(i.id == second for i in docker.images.list()):
            docker.images.remove(second, force=True)  # only the archive has it now

    from envs.kit.db import Database
    from registry.users import create_user, issue_token

    db = Database(f"sqlite:///{server.data_dir / 'envctl.db'}")
    with db.session() as s:
        token = issue_token(s, create_user(s, "bob"), "tests")
    db.dispose()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as bob:
        r = bob.post("/environments/load", content=archive.read_bytes())
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden" and "'team/portable'" in r.json()["error"]["message"]
        assert [i for i in docker.images.list() if i.id == second] == []  # not loaded
        # team/portable is team "team"'s: to Bob, who is not a member, it is not there at all
        assert bob.get("/environments/team/portable").status_code == 404
    with server.client() as client:
        versions = client.get("/environments/team/portable").json()["versions"]
        assert [v["image_id"] for v in versions] == [first]


def test_an_export_stops_its_lineage_above_a_version_its_reader_may_not_see(
    server: Server, docker: Any, tmp_path: Path
) -> None:
    """R37: the admin saves vault/private@1 (team vault's, unpublished), then tools@1 on it (a
    name without a team: everyone's). Bob, in no team, exports tools@1: the archive holds
    tools@1 alone, with no parent named, and nothing of vault/private@1 (its name, message,
    author) in its metadata or image index; the admin's export holds the whole lineage."""
    with server.client() as client:
        assert client.post("/teams", json={"name": "vault"}).status_code == 201
        rid = new_runtime(client, "maker", language="bash")
        run(client, rid, "echo secret > /root/vault-notes")
        save(client, rid, "vault/private", "the vault's own notes")
        run(client, rid, "echo tool > /root/tool")
        save(client, rid, "tools", "tools of mine")
        client.delete(f"/runtimes/{rid}")
        whole = _export(client, "tools@1", tmp_path / "whole.tar")
    bob = _user_client(server, "bob")
    with bob:
        lineage = bob.get("/environments/tools/lineage").json()
        assert [s.get("ref") for s in lineage] == ["tools@1", None, "python3@1", "bash@1"] and lineage[1] == {
            "hidden": True
        }
        part = _export(bob, "tools@1", tmp_path / "part.tar")
    for archive, refs in ((whole, ["tools@1", "vault/private@1", "python3@1", "bash@1"]), (part, ["tools@1"])):
        with tarfile.open(archive) as tar:
            meta = json.load(tar.extractfile("envctl-export.json"))  # type: ignore[arg-type]
            index = tar.extractfile("index.json").read().decode()  # type: ignore[union-attr]
        assert [v["ref"] for v in meta["versions"]] == refs
        if archive is part:
            assert meta["versions"][0]["parent"] is None and meta["versions"][0]["parent_image_id"] is None
            text = json.dumps(meta) + index
            assert "vault" not in text, [text[max(0, i - 200) : i + 50] for i in [text.find("vault")]]


def _user_client(server: Server, name: str) -> httpx.Client:
    from envs.kit.db import Database
    from registry.users import create_user, issue_token

    db = Database(f"sqlite:///{server.data_dir / 'envctl.db'}")
    with db.session() as s:
        token = issue_token(s, create_user(s, name), "tests")
    db.dispose()
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
