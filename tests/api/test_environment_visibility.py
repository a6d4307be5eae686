"""R37, the case that was measured: a user outside team ``vault`` builds a spec that
``extends: vault/private@1`` (a version the team never published). The build is refused with
the 404 of a missing environment naming ``extends``, before anything boots; no operation, no
runtime, no version ``stolen`` is made, and nothing of the vault's version (its message, its
author) shows anywhere. A member of ``vault`` builds the same spec; once the version is
published, anyone may.

Everything runs on the fake engine, which remembers every boot and commit asked of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import func, select

from api.cli import lineage_lines
from envs.models import EnvironmentVersion
from envs.spec import FIELDS as SPEC_FIELDS
from registry import users as registry_service
from registry.prepull import Prepuller
from runner.models import Operation
from tests.api.conftest import ApiHarness, AppFactory
from tests.api.test_environment_owners import WatchedBackend
from tests.api.test_errors_and_auth import assert_envelope
from tests.registry.test_team_isolation import _body, _resolve

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


def _settle(api: ApiHarness, headers: Headers, resp: Any) -> None:
    """A build that was (wrongly) accepted is waited for, so that the test fails on its
    assertions rather than on a build still running when the app shuts down."""
    if resp.status_code == 202:
        _finished(api, headers, resp.json()["id"])


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
    _settle(api, bob, resp)

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


# --------------------------------------------------------------------------- the walk (R37)

# Every input of the API that names an environment, by what it does with it. The walk below
# reads them from the OpenAPI schema and from the spec file's fields; an input it finds that is
# in none of these (nor in NOT_ENVIRONMENTS) fails the test until it is told what it is.
READS = {  # (method, path, where, field): resolved for the caller, so hidden is a 404 naming field
    ("post", "/runtimes", "body", "environment"),
    ("patch", "/runtimes/{runtime_id}", "body", "environment"),
    ("get", "/environments/{ref}/packages/diff", "query", "against"),
}
WRITES = {  # the environment a version is written into: another team's is a 403, whether or not it exists
    ("post", "/runtimes/{runtime_id}/save", "body", "environment"),
}
ELSEWHERE = {  # named on another server, or a registry scope: decided there (tests/registry)
    ("post", "/environments/import-remote", "body", "ref"),  # the upstream resolves it for its user
    ("post", "/environments/import-remote", "body", "name"),  # written here after the upstream answers
    ("get", "/registry/token", "query", "scope"),  # registry/tokenserver.py: published repositories
    # a team's app: resolved for its author once the team is known (this walk's path values are
    # no team's): tests/api/test_apps_api.py, test_an_app_cannot_run_on_another_teams_unpublished_environment
    ("post", "/teams/{team}/apps/{name}/deployments", "body", "environment"),
}
NOT_ENVIRONMENTS = {
    "source", "spec", "from", "token", "cuda", "env", "idle_timeout", "kernel", "language", "machine_type",
    "mounts", "name", "team", "type", "role", "user", "description", "expires_in_days", "admin", "value", "q",
    "service", "wait", "after", "apply", "next_boot", "message", "keep_caches", "allow_secrets", "code",
    "timeout", "count", "limit", "path", "stdin", "silent", "store_history", "include", "ref_only",
    "tag",  # the tag a save moves in its target (WRITES)
    "runtime_id",
    "cell",  # create-and-run: a first cell (code, language)
    "attach", "attached_save",  # a container envctl did not start, by id or name; a flag
    "lease",  # seconds a client's heartbeat keeps the runtime
    "sha256", "size", "notebook", "notebook_sha256", "bundle_id", "bundle_sha256", "port", "public",
    "instances", "number",  # an app's bundle, deployment and rollback
}  # fmt: skip
SPEC_READS, SPEC_WRITES = {"extends"}, {"name"}  # envs/spec.py FIELDS; message and steps name none

HIDDEN = "vault/private@1"


def _inputs(schema: dict[str, Any]) -> list[tuple[str, str, str, str, dict[str, Any]]]:
    """(method, path, where, field, operation) for every path, query and JSON body field."""
    found = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for p in operation.get("parameters", []):
                if p["in"] in ("path", "query"):
                    found.append((method, path, p["in"], p["name"], operation))
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if content is not None:
                for name in _resolve(schema, content["schema"]).get("properties", {}):
                    found.append((method, path, "body", name, operation))
    return found


def _request(
    api: ApiHarness,
    schema: dict[str, Any],
    who: Headers,
    op: tuple[str, str, dict[str, Any]],
    where: str = "path",
    field: str = "ref",
    value: str = HIDDEN,
    **path_values: str,
) -> Any:
    """The operation ``op`` (method, path, description) with its required fields filled in,
    ``value`` in ``field`` (of the path, the query or the body), and ``path_values``."""
    method, path, operation = op
    params = operation.get("parameters", [])
    given = {**{p["name"]: path_values.get(p["name"], "python3@1") for p in params if p["in"] == "path"}}
    query = {p["name"]: "python3@1" for p in params if p["in"] == "query" and p.get("required")}
    body = _body(schema, operation)
    {"path": given, "query": query, "body": body}[where][field] = value
    return api.client.request(method, path.format(**given), headers=who, params=query, json=body)


def _counts(vault: Vault) -> tuple[Any, ...]:
    with vault.api.db.session() as s:
        versions = int(s.scalar(select(func.count()).select_from(EnvironmentVersion)) or 0)
    backend = vault.backend
    return len(backend.started), len(backend.committed), vault.api.runtime_rows(), _operations(vault.api), versions


def _own_runtime(api: ApiHarness, who: Headers, name: str) -> str:
    made = api.post("/runtimes", headers=who, json={"environment": "python3", "name": name})
    assert made.status_code == 201, made.text
    rid: str = made.json()["id"]
    return rid


def test_every_input_that_names_an_environment_hides_another_teams_version_and_works_for_its_members(
    vault: Vault,
) -> None:
    api = vault.api
    schema = api.client.get("/openapi.json").json()
    inputs = _inputs(schema)
    refs = [(m, p, o) for m, p, where, f, o in inputs if where == "path" and f == "ref"]
    unknown = [
        (m, p, where, f)
        for m, p, where, f, _ in inputs
        if where != "path" and (m, p, where, f) not in READS | WRITES | ELSEWHERE and f not in NOT_ENVIRONMENTS
    ]
    assert not unknown, f"say whether these name an environment (READS, WRITES, ELSEWHERE, NOT_ENVIRONMENTS): {unknown}"
    reads = [(m, p, where, f, o) for m, p, where, f, o in inputs if (m, p, where, f) in READS]
    writes = [(m, p, where, f, o) for m, p, where, f, o in inputs if (m, p, where, f) in WRITES]
    assert len(reads) == len(READS) and len(writes) == len(WRITES), "an input listed here is gone from the schema"
    assert len(refs) >= 10, refs
    assert set(SPEC_READS | SPEC_WRITES | {"message", "steps"}) == set(SPEC_FIELDS)

    bob, carol = vault.outsider, vault.member
    bobs, carols = _own_runtime(api, bob, "bobs"), _own_runtime(api, carol, "carols")
    pinned = api.post("/runtimes", headers=carol, json={"environment": HIDDEN, "name": "pinned"})
    assert pinned.status_code == 201, pinned.text  # so that her DELETE of the version is a 409, not done
    before = _counts(vault)
    walked = []

    # The outsider: every one is the 404 of a missing name, naming its field; nothing happens.
    for method, path, operation in refs:
        resp = _request(api, schema, bob, (method, path, operation))
        err = assert_envelope(resp, 404)
        assert err["details"].get("field") == "ref" or err["details"].get("environment") == "vault/private", err
        walked.append(f"{method.upper()} {path} {{ref}}")
    for method, path, where, field, operation in reads:
        resp = _request(api, schema, bob, (method, path, operation), where, field, runtime_id=bobs)
        err = assert_envelope(resp, 404)
        assert err["details"]["field"] == field, (method, path, err)
        walked.append(f"{method.upper()} {path} {where}.{field}")
    for method, path, where, field, operation in writes:
        op = (method, path, operation)
        hidden = _request(api, schema, bob, op, where, field, "vault/private", runtime_id=bobs)
        missing = _request(api, schema, bob, op, where, field, "vault/nothing", runtime_id=bobs)
        err = assert_envelope(hidden, 403, "forbidden")
        assert err["message"] == missing.json()["error"]["message"].replace("nothing", "private"), err
        walked.append(f"{method.upper()} {path} {where}.{field}")
    spec = "name: {name}\nextends: {extends}\nsteps:\n  - run: echo walked\n"
    for field, value, code in (("extends", HIDDEN, 404), ("name", "vault/stolen", 403)):
        values = {"name": "stolen", "extends": "python3@1", field: value}
        resp = api.post("/environments/build", headers=bob, json={"spec": spec.format(**values)})
        _settle(api, bob, resp)
        err = assert_envelope(resp, code)
        assert err["details"].get("field") == field or err["details"].get("team") == "vault", err
        walked.append(f"spec.{field}")
    for text in (api.get("/environments", headers=bob).text, api.get("/catalog", headers=bob).text):
        assert "vault/private" not in text and not [s for s in SECRETS if s in text]
    assert _counts(vault) == before, "the outsider's walk built, ran, saved or recorded something"
    assert api.get(f"/runtimes/{bobs}", headers=bob).json()["environment"] == "python3@1"

    # The member: the same inputs find the version (the fake engine cannot export, read
    # packages or kernelspecs, or reach a registry: a 409 or 503 says so, never a 403 or 404).
    for method, path, operation in refs:
        resp = _request(api, schema, carol, (method, path, operation))
        assert resp.status_code not in (403, 404), (method, path, resp.status_code, resp.text[:300])
    for method, path, where, field, operation in reads:
        resp = _request(api, schema, carol, (method, path, operation), where, field, runtime_id=carols)
        assert resp.status_code not in (403, 404) and resp.status_code < 500, (method, path, resp.text[:300])
    assert api.get(f"/runtimes/{carols}", headers=carol).json()["environment"] == HIDDEN  # her PATCH
    assert api.post(f"/runtimes/{carols}/start", headers=carol).status_code == 202
    assert api.wait_for(carols, {"running", "error"}).state == "running"
    for method, path, where, field, operation in writes:
        op = (method, path, operation)
        resp = _request(api, schema, carol, op, where, field, "vault/private", runtime_id=carols)
        assert resp.status_code == 202, (method, path, resp.text[:300])
        assert _finished(api, carol, resp.json()["id"])["status"] == "succeeded"
    for field, value in (("extends", HIDDEN), ("name", "vault/built")):
        values = {"name": "vault/tools", "extends": "python3@1", field: value}
        resp = api.post("/environments/build", headers=carol, json={"spec": spec.format(**values)})
        assert resp.status_code == 202, resp.text
        assert _finished(api, carol, resp.json()["id"])["status"] == "succeeded"
    assert len(walked) >= 16, walked


def test_a_version_on_a_parent_its_reader_may_not_see_shows_that_parent_as_hidden(vault: Vault) -> None:
    api, bob, carol = vault.api, vault.outsider, vault.member
    spec = f"name: carols-tools\nextends: {HIDDEN}\nsteps:\n  - run: echo mine\n"
    resp = api.post("/environments/build", headers=carol, json={"spec": spec, "source": "tools.yaml"})
    assert resp.status_code == 202, resp.text
    assert _finished(api, carol, resp.json()["id"])["status"] == "succeeded"

    chain = api.get("/environments/carols-tools/lineage", headers=bob)  # a personal name: everyone's to read
    assert chain.status_code == 200, chain.text
    assert chain.json() == [
        {**chain.json()[0], "ref": "carols-tools@1"},
        {"hidden": True},
        {**chain.json()[2], "ref": "python3@1"},
        {**chain.json()[3], "ref": "bash@1"},
    ]
    shown = api.get("/environments/carols-tools", headers=bob).json()["versions"][0]
    assert shown["parent"] is None and shown["parent_hidden"] is True
    lines = lineage_lines(chain.json())
    assert lines[0].startswith("carols-tools@1") and lines[1].endswith("(hidden)") and "python3@1" in lines[2]
    for text in (chain.text, json.dumps(shown), "\n".join(lines), api.get("/environments", headers=bob).text):
        assert "vault" not in text and not [s for s in SECRETS if s in text], text

    own = api.get("/environments/carols-tools/lineage", headers=carol).json()  # hers: all of it
    assert [s["ref"] for s in own] == ["carols-tools@1", HIDDEN, "python3@1", "bash@1"]
    assert own[1]["message"] == SECRETS[0] and own[1]["author"] == "vaultkeeper"
    assert api.get("/environments/carols-tools", headers=carol).json()["versions"][0]["parent"] == HIDDEN


def test_pulling_ahead_pulls_what_is_published_and_not_what_was_unpublished_before_it_looked(vault: Vault) -> None:
    api, keeper = vault.api, vault.keeper
    pulled: list[str] = []
    prepuller = Prepuller(api.db, ["vault"], pulled.append, interval=3600)  # run by hand here

    assert api.post(f"/environments/{HIDDEN}/publish", headers=keeper).status_code == 200
    assert api.delete(f"/environments/{HIDDEN}/publish", headers=keeper).status_code == 204
    assert prepuller.run_once() == [] and pulled == []  # resolved as anyone outside the team: gone

    assert api.post(f"/environments/{HIDDEN}/publish", headers=keeper).status_code == 200
    assert prepuller.run_once() == [HIDDEN] and pulled == [HIDDEN]
