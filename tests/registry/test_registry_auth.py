"""envctl as the token server of a real distribution registry (R22, R23).

One registry process (Debian's docker-registry 2.8, as ``envctl serve`` runs it) and one envctl
API over HTTP (its ``/registry/token`` is the registry's realm) serve the whole module. Alice is
in team ``acme``, Bob in team ``beta``, Carol in both. The client is a real client of the
registry's HTTP API doing the token dance (tests/fixtures/registry.py); the refusals below are
the registry's own.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.dbschema import upgrade
from api.settings import Settings
from api.startup import Services
from envs.kit.clock import utcnow
from envs.kit.db import Database
from registry import pull_grants, signing, tokenserver
from registry import users as registry_service
from registry.distribution import ISSUER, SERVICE, ManagedRegistry, signing_key
from registry.teams import Actor, add_member, create_team
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.registry import Image, RegistryClient, digest_of, start_registry, with_digest
from tests.fixtures.server import served
from tests.fixtures.services import _free_port


@dataclass
class World:
    settings: Settings
    registry: ManagedRegistry
    api_url: str
    tokens: dict[str, str]  # user -> envctl API token

    def client(self, user: str | None) -> RegistryClient:
        return RegistryClient(self.registry.url, (user, self.tokens[user]) if user else None)

    def token_answer_with(self, user: str, password: str, *scopes: str) -> httpx.Response:
        params = {"service": SERVICE, "scope": list(scopes)}
        return httpx.get(f"{self.api_url}/registry/token", params=params, auth=(user, password))

    def token_answer(self, user: str | None, *scopes: str) -> httpx.Response:
        auth = (user, self.tokens[user]) if user else None
        return httpx.get(
            f"{self.api_url}/registry/token", params={"service": SERVICE, "scope": list(scopes)}, auth=auth
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data = tmp_path_factory.mktemp("registry-world") / "data"
    settings = Settings(
        data_dir=data,
        api_port=_free_port(),
        registry_port=_free_port(),
        registry_token_ttl=30,
        runner_backend="fake",
        runner_name=f"test-{TEST_SESSION}-{uuid.uuid4().hex[:8]}",
        runner_labels={TEST_LABEL: TEST_SESSION},
    )
    upgrade(settings.effective_database_url)
    db = Database(settings.effective_database_url)
    tokens: dict[str, str] = {}
    with db.session() as s:
        users = {name: registry_service.create_user(s, name) for name in ("alice", "bob", "carol")}
        tokens = {name: registry_service.issue_token(s, user, "tests") for name, user in users.items()}
        create_team(s, "acme", Actor(users["alice"].id))
        create_team(s, "beta", Actor(users["bob"].id))
        add_member(s, "acme", "carol", "member", Actor(users["alice"].id))
        add_member(s, "beta", "carol", "member", Actor(users["bob"].id))
    db.dispose()
    for registry in start_registry(settings):
        with served(create_app(Services.build(settings)), settings.api_port) as api_url:
            world = World(settings, registry, api_url, tokens)
            alice = world.client("alice")
            assert alice.push("acme/tools", "1", Image.made("tools")).status_code == 201
            alice.close()
            yield world


# --------------------------------------------------------------------------- R22: scopes


def test_a_member_pushes_to_the_teams_repository_and_pulls_it_back(world: World) -> None:
    carol = world.client("carol")
    image = Image.made("carol's")

    pushed = carol.push("acme/carols", "1", image)

    assert pushed.status_code == 201, pushed.text
    pulled = carol.pull("acme/carols", "1")
    assert pulled.status_code == 200 and pulled.content == image.manifest
    assert world.client("alice").pull("acme/carols", "1").status_code == 200  # the team's, not only hers


def test_a_non_member_can_neither_pull_nor_push_another_teams_repository(world: World) -> None:
    bob = world.client("bob")

    assert bob.pull("acme/tools", "1").status_code == 401
    assert bob.push("acme/tools", "2", Image.made("bob's")).status_code == 401
    assert bob.push("acme/new", "1", Image.made("bob's")).status_code == 401
    access = _access(world.token_answer("bob", "repository:acme/tools:pull,push"))
    assert access == [{"type": "repository", "name": "acme/tools", "actions": []}]
    assert world.client("alice").pull("acme/tools", "1").status_code == 200
    assert world.client("alice").pull("acme/tools", "2").status_code == 404  # nothing of Bob's got in


def test_an_anonymous_client_gets_nothing(world: World) -> None:
    anonymous = world.client(None)

    assert anonymous.pull("acme/tools", "1").status_code == 401
    assert anonymous.push("acme/anon", "1", Image.made("anon")).status_code == 401
    assert _access(world.token_answer(None, "repository:acme/tools:pull")) == [
        {"type": "repository", "name": "acme/tools", "actions": []}
    ]


def test_a_pull_grant_pulls_its_one_repository_and_nothing_else(world: World) -> None:
    """A cluster node's pull secret (registry/pull_grants.py): Basic credentials whose password is
    a grant envctl signed, which the registry's client trades here for a token; it pulls that
    repository only, never pushes; a grant of another key, or expired, is a 401."""
    key = signing_key(world.settings)
    grant = pull_grants.make_grant(key, "acme/tools", 60)
    node = RegistryClient(world.registry.url, (pull_grants.USER, grant))
    assert node.pull("acme/tools", "1").status_code == 200
    assert node.push("acme/tools", "9", Image.made("node's")).status_code == 401
    access = _access(world.token_answer_with(pull_grants.USER, grant, "repository:acme/tools:pull,push"))
    assert access == [{"type": "repository", "name": "acme/tools", "actions": ["pull"]}]
    other = RegistryClient(world.registry.url, (pull_grants.USER, pull_grants.make_grant(key, "beta/x", 60)))
    assert other.pull("acme/tools", "1").status_code == 401
    stale = pull_grants.make_grant(key, "acme/tools", 10, now=1_000_000.0)
    assert world.token_answer_with(pull_grants.USER, stale, "repository:acme/tools:pull").status_code == 401
    assert world.token_answer_with(pull_grants.USER, "not-a-grant", "repository:acme/tools:pull").status_code == 401


def test_a_push_grant_pushes_its_one_repository_and_a_user_gets_no_push_from_it(world: World) -> None:
    """envctl's own push of a version a boot needs (registry/pull_grants.py PUSH): a push grant
    pushes and pulls its one repository (a base image's, which Alice may not push), nothing
    else; a pull grant is no push grant (nor the other way round), and Alice's own token still
    gets no push on that repository."""
    key = signing_key(world.settings)
    repo = f"base{uuid.uuid4().hex[:6]}"
    grant = pull_grants.make_grant(key, repo, 60, kind=pull_grants.PUSH)
    envctl = RegistryClient(world.registry.url, (pull_grants.PUSH.user, grant))
    assert envctl.push(repo, "1", Image.made("envctl's push")).status_code == 201
    assert envctl.pull(repo, "1").status_code == 200
    assert envctl.push("acme/tools", "9", Image.made("elsewhere")).status_code == 401
    access = _access(world.token_answer_with(pull_grants.PUSH.user, grant, f"repository:{repo}:pull,push,delete"))
    assert access == [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]
    alice = world.client("alice")
    assert alice.push(repo, "2", Image.made("alice's")).status_code == 401
    assert _access(world.token_answer("alice", f"repository:{repo}:pull,push")) == [
        {"type": "repository", "name": repo, "actions": ["pull"]}
    ]
    pull_only = pull_grants.make_grant(key, repo, 60)
    assert world.token_answer_with(pull_grants.PUSH.user, pull_only, f"repository:{repo}:push").status_code == 401
    assert world.token_answer_with(pull_grants.USER, grant, f"repository:{repo}:pull").status_code == 401
    assert (
        world.token_answer_with(pull_grants.PUSH.user, world.tokens["alice"], f"repository:{repo}:push").status_code
        == 401
    )
    stale = pull_grants.make_grant(key, repo, 10, now=1_000_000.0, kind=pull_grants.PUSH)
    assert world.token_answer_with(pull_grants.PUSH.user, stale, f"repository:{repo}:push").status_code == 401


def test_a_wrong_or_revoked_envctl_token_gets_no_registry_token(world: World) -> None:
    wrong = httpx.get(f"{world.api_url}/registry/token", params={"service": SERVICE}, auth=("alice", "envctl_no"))
    assert wrong.status_code == 401
    someone_elses = httpx.get(f"{world.api_url}/registry/token", auth=("alice", world.tokens["bob"]))
    assert someone_elses.status_code == 401


def test_every_scope_of_a_request_is_answered_with_what_is_granted(world: World) -> None:
    answer = world.token_answer(
        "alice", "repository:acme/tools:pull,push", "repository:beta/x:pull,push", "registry:catalog:*"
    )

    assert _access(answer) == [
        {"type": "repository", "name": "acme/tools", "actions": ["pull", "push"]},
        {"type": "repository", "name": "beta/x", "actions": []},
        {"type": "registry", "name": "catalog", "actions": []},
    ]
    assert answer.json()["expires_in"] == 30


def test_a_cross_repository_mount_needs_pull_on_the_source(world: World) -> None:
    """The client asks for both scopes (push on the target, pull on the source); the registry
    mounts only when the token grants both."""
    layer = digest_of(Image.made("tools").layer)
    carol, bob = world.client("carol"), world.client("bob")

    def mount(client: RegistryClient, target: str) -> httpx.Response:
        scopes = f"repository:{target}:pull,push repository:acme/tools:pull"
        return client.request("POST", f"/v2/{target}/blobs/uploads/?mount={layer}&from=acme/tools", scopes)

    mounted = mount(carol, "beta/tools")  # a member of both teams
    assert mounted.status_code == 201, mounted.text
    assert mounted.headers["docker-content-digest"] == layer

    refused = mount(bob, "beta/stolen")  # a member of beta only

    assert refused.status_code == 401, refused.text
    assert bob.request("HEAD", f"/v2/beta/stolen/blobs/{layer}", "repository:beta/stolen:pull").status_code == 404


def test_base_images_are_everyones_to_pull_and_admins_to_push() -> None:
    member = tokenserver.Requester("alice", False, frozenset({"acme"}))
    admin = tokenserver.Requester("admin", True, frozenset())
    base = tokenserver.parse_scope("repository:python3:pull,push")
    assert tokenserver.allowed_actions(base, member) == ["pull"]
    assert tokenserver.allowed_actions(base, admin) == ["pull", "push"]
    assert tokenserver.allowed_actions(base, None) == []
    other = tokenserver.parse_scope("repository:beta/ml:pull,push")
    assert tokenserver.allowed_actions(other, member) == []
    assert tokenserver.allowed_actions(other, member, is_published=lambda repo: repo == "beta/ml") == ["pull"]


def test_a_push_outlives_its_token_the_client_asks_for_another(world: World) -> None:
    """The upload starts with one token; the token has expired (beyond the registry's 60 s of
    leeway) when the bytes go; the registry refuses it, the client asks the realm again, and the
    same upload completes."""
    alice = world.client("alice")
    scope = "repository:acme/long:pull,push"
    data = b"a long push" * 1000
    started = alice.request("POST", "/v2/acme/long/blobs/uploads/", scope)
    assert started.status_code == 202
    old = utcnow() - timedelta(seconds=world.settings.registry_token_ttl + 120)
    who = tokenserver.Requester("alice", False, frozenset({"acme"}))
    expired = signing_key(world.settings).sign(
        tokenserver.claims_for([tokenserver.parse_scope(scope)], who, world.settings.registry_token_ttl, old)
    )
    alice.tokens[scope] = expired
    asked = alice.token_requests

    done = alice.request("PUT", with_digest(started.headers["location"], data), scope, content=data)

    assert done.status_code == 201, done.text
    assert alice.token_requests == asked + 1
    assert alice.tokens[scope] != expired


# --------------------------------------------------------------------------- R23: bad tokens


def _access(answer: httpx.Response) -> list[dict[str, Any]]:
    assert answer.status_code == 200, answer.text
    payload = answer.json()["token"].split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return list(claims["access"])


def _claims(**changes: Any) -> dict[str, Any]:
    who = tokenserver.Requester("alice", False, frozenset({"acme"}))
    claims = tokenserver.claims_for([tokenserver.parse_scope("repository:acme/tools:pull")], who, 300)
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _unsigned(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return signing.b64url(json.dumps(value).encode())

    return f"{part({'typ': 'JWT', 'alg': 'none'})}.{part(claims)}."


def _swap_claims(token: str, claims: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{signing.b64url(json.dumps(claims).encode())}.{signature}"


def _bad_tokens(settings: Settings) -> dict[str, str]:
    ours = signing_key(settings)
    foreign = signing.SigningKey(signing.new_key(), Path("/nonexistent"))
    now = int(utcnow().timestamp())
    return {
        "expired": ours.sign(_claims(iat=now - 600, nbf=now - 600, exp=now - 300)),
        "without exp": ours.sign(_claims(exp=None)),
        "not yet valid": ours.sign(_claims(nbf=now + 600, exp=now + 900)),
        "wrong audience": ours.sign(_claims(aud="someone-else")),
        "audience as a list": ours.sign(_claims(aud=[SERVICE])),
        "wrong issuer": ours.sign(_claims(iss="not-" + ISSUER)),
        "alg none": _unsigned(_claims()),
        "foreign key": foreign.sign(_claims()),
        "foreign key claiming our kid": foreign.sign(_claims(), {"kid": ours.kid}),
        "claims changed after signing": _swap_claims(ours.sign(_claims()), _claims(sub="carol")),
    }


BAD = [
    "expired",
    "without exp",
    "not yet valid",
    "wrong audience",
    "audience as a list",
    "wrong issuer",
    "alg none",
    "foreign key",
    "foreign key claiming our kid",
    "claims changed after signing",
]


@pytest.mark.parametrize("kind", BAD)
def test_the_registry_refuses_a_bad_token(world: World, kind: str) -> None:
    token = _bad_tokens(world.settings)[kind]
    url = f"{world.registry.url}/v2/acme/tools/manifests/1"
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

    refused = httpx.get(url, headers={**accept, "Authorization": f"Bearer {token}"})

    assert refused.status_code == 401, (kind, refused.text)
    good = signing_key(world.settings).sign(_claims())
    assert httpx.get(url, headers={**accept, "Authorization": f"Bearer {good}"}).status_code == 200


# --------------------------------------------------------------------------- docker itself


def _tiny_image(docker: Any, repository: str) -> None:
    """An image of one small file, made with ``docker import`` (nothing is pulled)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"made by the registry tests\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    docker.api.import_image_from_data(
        buf.getvalue(), repository=repository, tag="1", changes=[f"LABEL {TEST_LABEL}={TEST_SESSION}"]
    )


def _errors(lines: Iterator[dict[str, Any]]) -> list[str]:
    return [str(line.get("error") or line.get("errorDetail")) for line in lines if "error" in line]


def test_docker_pushes_and_pulls_with_an_envctl_token_and_a_non_member_is_denied(world: World, docker: Any) -> None:
    repository = f"127.0.0.1:{world.settings.registry_port}/acme/docker-test"
    auth = {name: {"username": name, "password": world.tokens[name]} for name in ("alice", "bob", "carol")}
    _tiny_image(docker, repository)
    try:
        assert _errors(docker.images.push(repository, "1", auth_config=auth["alice"], stream=True, decode=True)) == []
        denied = _errors(docker.images.push(repository, "1", auth_config=auth["bob"], stream=True, decode=True))
        docker.images.remove(f"{repository}:1")

        assert denied and any(word in denied[0] for word in ("denied", "unauthorized", "authentication required"))
        with pytest.raises(Exception, match="denied|unauthorized|authentication required"):  # noqa: B017
            docker.images.pull(repository, "1", auth_config=auth["bob"])
        pulled = docker.images.pull(repository, "1", auth_config=auth["carol"])
        assert pulled.labels[TEST_LABEL] == TEST_SESSION
    finally:
        for image in docker.images.list(name=repository):
            docker.images.remove(image.id, force=True)
