"""Who may change an environment: its owner and admins; everyone may read and extend it.

Alice and Bob are ordinary users; the harness's own headers are the admin's. Everything runs
on the fake engine, which remembers what reached it (commits, boots, loaded archives), so a
refusal can be shown to happen before any of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from api.settings import Settings
from envs import archive
from registry import users as registry_service
from runner.backends.base import BackendState, RuntimeSpec
from runner.backends.fake import FakeBackend
from tests.api.conftest import PYTHON_IMAGE, ApiHarness, AppFactory
from tests.api.test_errors_and_auth import assert_envelope


class WatchedBackend(FakeBackend):
    """The fake engine, remembering every boot, commit and archive load asked of it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.started: list[str] = []
        self.committed: list[str] = []
        self.loaded: list[bytes] = []

    def start(self, spec: RuntimeSpec) -> BackendState:
        self.started.append(spec.image)
        return super().start(spec)

    def commit(self, state: BackendState, *, config: dict[str, Any], repository: str, tag: str) -> str:
        self.committed.append(f"{repository}:{tag}")
        return super().commit(state, config=config, repository=repository, tag=tag)

    def load_images(self, path: Path) -> None:
        self.loaded.append(path.read_bytes())  # the fake knows every image it is asked about


def _user(api: ApiHarness, name: str) -> dict[str, str]:
    with api.db.session() as s:
        token = registry_service.issue_token(s, registry_service.create_user(s, name), "tests")
    return {"Authorization": f"Bearer {token}"}


def _running(api: ApiHarness, headers: dict[str, str], name: str, environment: str = "python3") -> str:
    resp = api.post("/runtimes", headers=headers, json={"environment": environment, "name": name})
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["id"]
    assert api.post(f"/runtimes/{rid}/start", headers=headers).status_code == 202
    rt = api.wait_for(rid, {"running", "error"})
    assert rt.state == "running", (rt.state, rt.state_message)
    return rid


def _save(api: ApiHarness, headers: dict[str, str], rid: str, environment: str, **body: Any) -> dict[str, Any]:
    resp = api.post(f"/runtimes/{rid}/save", headers=headers, json={"environment": environment, **body})
    assert resp.status_code == 202, resp.text
    op: dict[str, Any] = api.get(f"/operations/{resp.json()['id']}", headers=headers, params={"wait": 10}).json()
    assert op["status"] == "succeeded", op
    return op


def _environment(api: ApiHarness, name: str) -> dict[str, Any]:
    resp = api.get(f"/environments/{name}")
    assert resp.status_code == 200, resp.text
    env: dict[str, Any] = resp.json()
    return env


@dataclass
class World:
    """One app on the watched engine; Alice has saved ``mine@1`` from her runtime ``rid``."""

    api: ApiHarness
    backend: WatchedBackend
    alice: dict[str, str]
    bob: dict[str, str]
    rid: str


@pytest.fixture
def world(make_api: AppFactory, prepared_settings: Settings) -> World:
    # One app only: a second on the same runner name would reconcile the first one's runtimes.
    backend = WatchedBackend()
    api = make_api(backend)
    alice, bob = _user(api, "alice"), _user(api, "bob")
    rid = _running(api, alice, "workbench")
    assert _save(api, alice, rid, "mine", message="alice's tools")["result"]["version"] == "mine@1"
    return World(api, backend, alice, bob, rid)


# --------------------------------------------------------------------------- who owns what


def test_the_first_save_makes_the_saver_the_owner_and_base_images_have_none(world: World) -> None:
    api = world.api
    envs = {e["name"]: e for e in api.get("/environments").json()}
    assert envs["mine"]["owner"] == "alice"
    assert envs["python3"]["owner"] is None and envs["bash"]["owner"] is None
    assert _environment(api, "mine@1")["owner"] == "alice"


# --------------------------------------------------------------------------- saves


def test_another_user_cannot_save_into_an_environment_and_nothing_reaches_the_engine(world: World) -> None:
    api, backend, bob = world.api, world.backend, world.bob
    bobs = _running(api, bob, "mine-too")
    committed = list(backend.committed)

    resp = api.post(f"/runtimes/{bobs}/save", headers=bob, json={"environment": "mine", "tag": "stable"})

    err = assert_envelope(resp, 403, "forbidden")
    assert "'mine'" in err["message"] and "another user" in err["message"]
    assert "a name of your own" in err["message"]
    assert err["details"] == {"environment": "mine"}
    assert backend.committed == committed  # refused before the commit
    env = _environment(api, "mine")
    assert env["latest"] == "mine@1" and env["tags"] == {"latest": "mine@1"}
    assert [v["ref"] for v in env["versions"]] == ["mine@1"]
    log = api.get(f"/runtimes/{bobs}/log", headers=bob).json()
    assert not any(e["event"] == "save-started" for e in log)  # no operation was started


def test_nobody_but_an_admin_saves_into_a_base_image(world: World) -> None:
    api, alice, bob, rid = world.api, world.alice, world.bob, world.rid
    bobs = _running(api, bob, "shell")
    for headers, runtime in ((bob, bobs), (alice, rid)):
        err = assert_envelope(
            api.post(f"/runtimes/{runtime}/save", headers=headers, json={"environment": "python3"}), 403, "forbidden"
        )
        assert "'python3'" in err["message"] and "only an admin" in err["message"]
    assert _environment(api, "python3")["latest"] == "python3@1"

    admins = _running(api, api.headers, "admin-shell")
    assert _save(api, api.headers, admins, "python3")["result"]["version"] == "python3@2"
    assert _environment(api, "python3")["owner"] is None  # an admin's write does not take it over


def test_the_owner_and_an_admin_may_save_into_it_and_it_stays_the_owners(world: World) -> None:
    api, alice, rid = world.api, world.alice, world.rid
    assert _save(api, alice, rid, "mine", tag="stable")["result"]["version"] == "mine@2"
    admins = _running(api, api.headers, "admin-box", environment="mine")
    assert _save(api, api.headers, admins, "mine")["result"]["version"] == "mine@3"
    env = _environment(api, "mine")
    assert env["owner"] == "alice" and env["latest"] == "mine@3" and env["tags"]["stable"] == "mine@2"


def test_anyone_may_boot_import_and_extend_another_users_version_under_their_own_name(world: World) -> None:
    api, bob = world.api, world.bob
    # import (pin) a stopped runtime of Bob's to Alice's version
    resp = api.post("/runtimes", headers=bob, json={"environment": "python3", "name": "pinned"})
    pinned = resp.json()["id"]
    resp = api.patch(f"/runtimes/{pinned}", headers=bob, json={"environment": "mine@1"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["environment"] == "mine@1"
    # boot from it, and save what it became under a name of Bob's
    bobs = _running(api, bob, "borrowed", environment="mine")
    assert _save(api, bob, bobs, "bobs-tools")["result"]["version"] == "bobs-tools@1"
    env = _environment(api, "bobs-tools")
    assert env["owner"] == "bob" and env["versions"][0]["parent"] == "mine@1"
    lineage = api.get("/environments/bobs-tools/lineage", headers=bob).json()
    assert [s["ref"] for s in lineage] == ["bobs-tools@1", "mine@1", "python3@1", "bash@1"]
    assert _environment(api, "mine")["owner"] == "alice"


# --------------------------------------------------------------------------- deletes


def test_another_user_cannot_delete_a_version_and_it_stays(world: World) -> None:
    api, alice, bob, rid = world.api, world.alice, world.bob, world.rid
    api.delete(f"/runtimes/{rid}", headers=alice)  # nothing depends on mine@1 now: only ownership stops Bob
    err = assert_envelope(api.delete("/environments/mine@1", headers=bob), 403, "forbidden")
    assert "'mine'" in err["message"] and "delete its versions" in err["message"]
    assert [v["ref"] for v in _environment(api, "mine")["versions"]] == ["mine@1"]
    assert api.delete("/environments/mine@1", headers=alice).status_code == 204
    assert_envelope(api.get("/environments/mine"), 404, "environment_not_found")


def test_only_an_admin_deletes_a_base_version_nobody_uses(api: ApiHarness, other_headers: dict[str, str]) -> None:
    err = assert_envelope(api.delete("/environments/python3@1", headers=other_headers), 403, "forbidden")
    assert "'python3'" in err["message"] and "only an admin" in err["message"]
    assert _environment(api, "python3")["latest"] == "python3@1"
    # ownership comes before dependents: bash@1 is python3@1's parent, Bob still hears 403
    assert_envelope(api.delete("/environments/bash@1", headers=other_headers), 403, "forbidden")

    assert api.delete("/environments/python3@1").status_code == 204
    assert_envelope(api.get("/environments/python3"), 404, "environment_not_found")


def test_the_owner_deletes_a_newer_version_and_latest_moves_back(world: World) -> None:
    api, alice, rid = world.api, world.alice, world.rid
    _save(api, alice, rid, "mine")
    api.post(f"/runtimes/{rid}/stop", headers=alice)
    api.wait_for(rid, {"stopped"})
    assert api.patch(f"/runtimes/{rid}", headers=alice, json={"environment": "mine@1"}).status_code == 200
    assert api.delete("/environments/mine@2", headers=alice).status_code == 204
    assert _environment(api, "mine")["latest"] == "mine@1"


# --------------------------------------------------------------------------- builds

SPEC = """\
name: {name}
extends: python3@1
steps:
  - run: echo built
"""


def test_another_user_cannot_build_into_an_environment_and_no_build_runtime_boots(world: World) -> None:
    api, backend, bob = world.api, world.backend, world.bob
    started, rows = list(backend.started), api.runtime_rows()
    for name, who in (("mine", "another user"), ("python3", "only an admin")):
        resp = api.post("/environments/build", headers=bob, json={"spec": SPEC.format(name=name)})
        err = assert_envelope(resp, 403, "forbidden")
        assert f"'{name}'" in err["message"] and who in err["message"] and "build into it" in err["message"]
    assert backend.started == started and api.runtime_rows() == rows
    assert [v["ref"] for v in _environment(api, "mine")["versions"]] == ["mine@1"]


def test_the_owner_builds_into_it_and_a_new_name_becomes_the_builders(world: World) -> None:
    api, alice, bob = world.api, world.alice, world.bob
    for headers, name, ref in ((alice, "mine", "mine@2"), (bob, "bobs-build", "bobs-build@1")):
        resp = api.post("/environments/build", headers=headers, json={"spec": SPEC.format(name=name)})
        assert resp.status_code == 202, resp.text
        op = api.get(f"/operations/{resp.json()['id']}", headers=headers, params={"wait": 30}).json()
        assert op["status"] == "succeeded", op
        assert op["result"]["version"] == ref
    assert _environment(api, "mine")["owner"] == "alice"
    assert _environment(api, "bobs-build")["owner"] == "bob"


# --------------------------------------------------------------------------- loads


def _image(seed: str) -> tuple[str, bytes, bytes]:
    """An image id, its configuration and a layer, as ``docker save`` would hold them."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo(f"{seed}.txt")
        info.size = len(seed)
        tar.addfile(info, io.BytesIO(seed.encode()))
    return "sha256:" + hashlib.sha256(config).hexdigest(), config, layer.getvalue()


def _archive(tmp_path: Path, versions: list[tuple[str, str | None, str | None]]) -> bytes:
    """An envctl archive of ``(ref, parent ref, digest)`` versions, child first. Each gets an
    image of its own; ``digest`` (default: that image's id) is what the load records, so an
    archive can name a version this envctl already has."""
    images = {ref: _image(f"{ref}-{tmp_path.name}") for ref, _parent, _digest in versions}
    ids = {ref: image[0] for ref, image in images.items()}
    raw = tmp_path / "docker-save.tar"
    with tarfile.open(raw, "w") as tar:
        manifest = []
        for image_id, config, layer in images.values():
            hexid = image_id.split(":")[1]
            for name, body in ((f"{hexid}.json", config), (f"{hexid}/layer.tar", layer)):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            manifest.append({"Config": f"{hexid}.json", "RepoTags": None, "Layers": [f"{hexid}/layer.tar"]})
        body = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    meta = {
        "exported": versions[0][0],
        "versions": [
            {
                "ref": ref,
                "environment": ref.split("@")[0],
                "number": int(ref.split("@")[1]),
                "digest": digest or ids[ref],
                "image_id": ids[ref],
                "parent": parent,
                "parent_image_id": ids[parent] if parent else None,
                "message": f"loaded {ref}",
                "author": "elsewhere",
                "size": 1000,
                "size_added": 1000,
                "labels": {},
            }
            for ref, parent, digest in versions
        ],
    }
    out = io.BytesIO()
    archive.write_oci(raw, list(ids.values()), meta, {v: k for k, v in ids.items()}, out)
    return out.getvalue()


def test_another_user_cannot_load_versions_into_an_environment_and_nothing_is_loaded(
    world: World, tmp_path: Path
) -> None:
    api, backend, bob = world.api, world.backend, world.bob
    before = api.get("/environments").json()
    for name, who in (("mine", "another user"), ("python3", "only an admin")):
        data = _archive(tmp_path, [(f"{name}@7", None, None)])
        err = assert_envelope(api.post("/environments/load", headers=bob, content=data), 403, "forbidden")
        assert f"'{name}'" in err["message"] and who in err["message"] and "load versions into it" in err["message"]
    assert backend.loaded == []  # refused before any image reached the engine
    assert api.get("/environments").json() == before


def test_a_load_makes_new_environments_the_loaders_and_may_name_versions_already_here(
    world: World, tmp_path: Path
) -> None:
    """A lineage carries the base images it stands on; naming a version this envctl already
    has (python3@1, by its digest) writes nothing, so Bob's load needs no admin."""
    api, backend, alice, bob = world.api, world.backend, world.alice, world.bob
    data = _archive(tmp_path, [("travelled@1", "python3@1", None), ("python3@1", None, PYTHON_IMAGE)])
    resp = api.post("/environments/load", headers=bob, content=data)
    assert resp.status_code == 201, resp.text
    assert {v["ref"]: v["new"] for v in resp.json()} == {"travelled@1": True, "python3@1": False}
    assert len(backend.loaded) == 1
    travelled = _environment(api, "travelled")
    assert travelled["owner"] == "bob" and travelled["versions"][0]["parent"] == "python3@1"
    assert _environment(api, "python3")["owner"] is None
    assert [v["ref"] for v in _environment(api, "python3")["versions"]] == ["python3@1"]

    # the owner loads into her own; the version gets the next number here
    resp = api.post("/environments/load", headers=alice, content=_archive(tmp_path, [("mine@5", None, None)]))
    assert resp.status_code == 201, resp.text
    assert [v["ref"] for v in resp.json()] == ["mine@2"]
    assert _environment(api, "mine")["owner"] == "alice"
