"""R37, the case that was measured: a user outside team ``vault`` builds a spec that
``extends: vault/private@1`` (a version the team never published). The build is refused with
the 404 of a missing environment naming ``extends``, before anything boots; no operation, no
runtime, no version ``stolen`` is made, and nothing of the vault's version (its message, its
author) shows anywhere. A member of ``vault`` builds the same spec; once the version is
published, anyone may.

Everything runs on the fake engine, which remembers every boot and commit asked of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import func, select

from registry import service as registry_service
from runner.models import Operation
from tests.api.conftest import ApiHarness, AppFactory
from tests.api.test_environment_owners import WatchedBackend
from tests.api.test_errors_and_auth import assert_envelope

Headers = dict[str, str]

STOLEN = """\
name: stolen
extends: vault/private@1
steps:
  - run: echo built on the vault
"""
SECRETS = ("vault private notes", "vaultkeeper")  # the version's message and its author


@dataclass
class Vault:
    api: ApiHarness
    backend: WatchedBackend
    keeper: Headers  # admin of team vault, who saved vault/private@1
    member: Headers  # a member of vault
    outsider: Headers  # in team beta only


def _user(api: ApiHarness, name: str) -> Headers:
    with api.db.session() as s:
        token = registry_service.issue_token(s, registry_service.create_user(s, name), "tests")
    return {"Authorization": f"Bearer {token}"}


def _operations(api: ApiHarness) -> int:
    with api.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Operation)) or 0)


def _finished(api: ApiHarness, headers: Headers, op_id: str) -> dict[str, Any]:
    op: dict[str, Any] = api.get(f"/operations/{op_id}", headers=headers, params={"wait": 30}).json()
    return op


@pytest.fixture
def vault(make_api: AppFactory) -> Vault:
    backend = WatchedBackend()
    api = make_api(backend=backend)
    keeper, member, outsider = _user(api, "vaultkeeper"), _user(api, "carol"), _user(api, "bob")
    assert api.post("/teams", headers=keeper, json={"name": "vault"}).status_code == 201
    assert api.post("/teams", headers=outsider, json={"name": "beta"}).status_code == 201
    added = api.post("/teams/vault/members", headers=keeper, json={"user": "carol", "role": "member"})
    assert added.status_code == 200, added.text
    made = api.post("/runtimes", headers=keeper, json={"environment": "python3", "name": "safe"})
    assert made.status_code == 201, made.text
    rid = made.json()["id"]
    ran = api.post(f"/runtimes/{rid}/executions", headers=keeper, params={"wait": 20}, json={"code": "x = 1"})
    assert ran.json()["status"] == "ok", ran.text
    body = {"environment": "vault/private", "message": SECRETS[0]}
    saved = api.post(f"/runtimes/{rid}/save", headers=keeper, json=body)
    assert saved.status_code == 202, saved.text
    assert _finished(api, keeper, saved.json()["id"])["status"] == "succeeded"
    assert api.get("/environments/vault/private", headers=keeper).json()["latest"] == "vault/private@1"
    return Vault(api, backend, keeper, member, outsider)


def test_an_outsiders_spec_extending_another_teams_private_version_is_not_found_and_nothing_runs(
    vault: Vault,
) -> None:
    api, bob = vault.api, vault.outsider
    started, committed, rows = list(vault.backend.started), list(vault.backend.committed), api.runtime_rows()
    ops = _operations(api)

    resp = api.post("/environments/build", headers=bob, json={"spec": STOLEN, "source": "stolen.yaml"})

    err = assert_envelope(resp, 404, "environment_not_found")
    assert err["details"]["field"] == "extends", err
    assert err["message"].startswith("extends: "), err
    assert not [s for s in SECRETS if s in resp.text]
    assert vault.backend.started == started and vault.backend.committed == committed  # nothing booted or saved
    assert api.runtime_rows() == rows
    assert _operations(api) == ops  # no build operation
    for who in (bob, api.headers):  # no version stolen@1, for him or for anyone
        assert_envelope(api.get("/environments/stolen", headers=who), 404, "environment_not_found")
        assert_envelope(api.get("/environments/stolen/lineage", headers=who), 404, "environment_not_found")
    assert "stolen" not in [e["name"] for e in api.get("/environments", headers=api.headers).json()]


def test_the_refusal_is_the_same_as_for_an_environment_that_does_not_exist(vault: Vault) -> None:
    api, bob = vault.api, vault.outsider
    hidden = api.post("/environments/build", headers=bob, json={"spec": STOLEN})
    missing = api.post("/environments/build", headers=bob, json={"spec": STOLEN.replace("vault/", "nowhere/")})
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"].replace("vault/", "nowhere/") == missing.json()["error"]["message"]
    other = api.post("/environments/build", headers=bob, json={"spec": STOLEN.replace("@1", "@7")})
    assert other.json()["error"]["message"] == hidden.json()["error"]["message"]  # @1 exists, @7 not: no telling


def test_a_member_builds_on_the_teams_version_and_anyone_once_it_is_published(vault: Vault) -> None:
    api = vault.api
    for headers, name in ((vault.member, "vault/tools"), (vault.outsider, "borrowed")):
        if headers is vault.outsider:
            published = api.post("/environments/vault/private@1/publish", headers=vault.keeper)
            assert published.status_code == 200, published.text
        spec = STOLEN.replace("name: stolen", f"name: {name}")
        resp = api.post("/environments/build", headers=headers, json={"spec": spec})
        assert resp.status_code == 202, resp.text
        op = _finished(api, headers, resp.json()["id"])
        assert op["status"] == "succeeded", op
        assert "built on the vault" in op["result"]["steps"][0]["log"]
        lineage = api.get(f"/environments/{name}/lineage", headers=headers).json()
        assert [s["ref"] for s in lineage[:2]] == [f"{name}@1", "vault/private@1"]
