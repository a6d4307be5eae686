"""Publishing and garbage against the real registry (Debian's docker-registry 2.8, run the way
``envctl serve`` runs it) and one envctl API over HTTP that manages it.

Images are pushed straight over the registry's HTTP API (tests/fixtures/registry.py); their
versions are recorded in the catalog with the manifest digest a push leaves in the labels.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from api.app import create_app
from api.dbschema import upgrade
from api.settings import Settings
from api.startup import Services
from envs.kit.db import Database
from envs.service import NewVersion, Writer, register_version
from registry import users as registry_service
from registry.teams import Actor, create_team
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.registry import Image, RegistryClient, digest_of, start_registry
from tests.fixtures.server import served
from tests.fixtures.services import _free_port


@dataclass
class World:
    settings: Settings
    registry_url: str
    api: httpx.Client
    tokens: dict[str, str]  # user -> envctl API token ("admin" is envctl's admin)

    def registry(self, user: str) -> RegistryClient:
        return RegistryClient(self.registry_url, (user, self.tokens[user]))

    def as_user(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def pushed(self, user: str, repository: str, image: Image) -> str:
        """Push ``image`` as ``repository:1`` and record it as a version; the version's ref."""
        client = self.registry(user)
        assert client.push(repository, "1", image).status_code == 201
        client.close()
        db = Database(self.settings.effective_database_url)
        try:
            with db.session() as s:
                new = NewVersion(environment=repository, image_id=digest_of(image.config), image_ref="x")
                version, _ = register_version(s, new, Writer("envctl", is_admin=True))
                version.registry_digest = digest_of(image.manifest)  # as its push records it
                return version.ref
        finally:
            db.dispose()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("catalog-registry") / "data",
        api_port=_free_port(),
        registry_port=_free_port(),
        runner_backend="fake",
        runner_name=f"test-{TEST_SESSION}-{uuid.uuid4().hex[:8]}",
        runner_labels={TEST_LABEL: TEST_SESSION},
    )
    upgrade(settings.effective_database_url)
    db = Database(settings.effective_database_url)
    with db.session() as s:
        users = {name: registry_service.create_user(s, name) for name in ("alice", "bob")}
        tokens = {name: registry_service.issue_token(s, user, "tests") for name, user in users.items()}
        create_team(s, "acme", Actor(users["alice"].id))
        create_team(s, "beta", Actor(users["bob"].id))
    db.dispose()
    for registry in start_registry(settings):
        services = Services.build(settings)
        services.registry = registry  # as `envctl serve` does (stopping it twice is harmless)
        app = create_app(services)
        with served(app, settings.api_port) as url, httpx.Client(base_url=url, timeout=60) as api:
            tokens["admin"] = settings.admin_token_file.read_text().strip()
            yield World(settings, registry.url, api, tokens)


def test_another_team_pulls_what_was_published_and_nothing_before(world: World) -> None:
    ref = world.pushed("alice", "acme/shared", Image.made("shared"))
    bob = world.registry("bob")
    assert bob.pull("acme/shared", "1").status_code == 401

    published = world.api.post(f"/environments/{ref}/publish", headers=world.as_user("alice"))

    assert published.status_code == 200, published.text
    bob.tokens.clear()
    assert bob.pull("acme/shared", "1").status_code == 200
    assert bob.push("acme/shared", "2", Image.made("bob's")).status_code == 401  # read only


def test_gc_removes_what_deleted_versions_left_and_keeps_what_versions_still_name(world: World) -> None:
    keep, drop = Image.made("kept"), Image.made("dropped")
    world.pushed("alice", "acme/keep", keep)
    dropped = world.pushed("alice", "acme/drop", drop)
    alice = world.registry("alice")
    layer = f"/v2/acme/drop/blobs/{digest_of(drop.layer)}"
    assert alice.request("GET", layer, "repository:acme/drop:pull").status_code == 200

    assert world.api.delete(f"/environments/{dropped}", headers=world.as_user("alice")).status_code == 204

    manifest = f"/v2/acme/drop/manifests/{digest_of(drop.manifest)}"
    assert alice.request("GET", manifest, "repository:acme/drop:pull").status_code == 404  # the manifest went
    assert alice.request("GET", layer, "repository:acme/drop:pull").status_code == 200  # its blobs wait for gc
    assert world.api.post("/registry/gc", headers=world.as_user("bob")).status_code == 403

    collected = world.api.post("/registry/gc", headers=world.as_user("admin"))

    assert collected.status_code == 200, collected.text
    assert collected.json()["blobs_deleted"] >= 2 and collected.json()["bytes_after"] < collected.json()["bytes_before"]
    alice = world.registry("alice")  # the registry was restarted
    assert alice.request("GET", layer, "repository:acme/drop:pull").status_code == 404
    kept = alice.pull("acme/keep", "1")  # every blob, its digest checked
    assert kept.status_code == 200 and kept.content == keep.manifest
    assert alice.push("acme/after", "1", Image.made("after")).status_code == 201  # writable again
