"""Apps through the API, in-process on the fake backend: what a deployment request must hold
(each bad field a 422 naming it), who may act (a team's members; others get 404), the presigned
upload (its signature, expiry and digest), and that an app server takes only its own teams'
deployments (``ENVCTL_RUNNER_APP_TEAMS``): another team's deployment never reaches it."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from registry import events
from runner.apps import bundles
from tests.api.conftest import ApiHarness, AppFactory, make_api, prepared_settings  # noqa: F401
from tests.registry.test_team_isolation import _user as user

NOTEBOOK = json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": []}).encode()


def setup(api: ApiHarness) -> dict[str, dict[str, str]]:
    people = {name: user(api, name) for name in ("alice", "bob")}
    assert api.post("/teams", headers=people["alice"], json={"name": "acme"}).status_code == 201
    assert api.post("/teams", headers=people["bob"], json={"name": "other"}).status_code == 201
    return people


def upload(api: ApiHarness, headers: dict[str, str], team: str = "acme", name: str = "sales") -> dict[str, str]:
    made = api.post(f"/teams/{team}/apps/{name}/bundles", headers=headers)
    assert made.status_code == 201, made.text
    info = made.json()
    sealed = bundles.seal(
        base64.b64decode(info["key"]), info["header"], bundles.pack("app.ipynb", {"app.ipynb": NOTEBOOK})
    )
    sha = hashlib.sha256(sealed).hexdigest()
    target = api.post(
        f"/teams/{team}/apps/{name}/bundles/upload-url", headers=headers, json={"sha256": sha, "size": len(sealed)}
    )
    assert target.status_code == 200, target.text
    url = urlsplit(target.json()["url"])
    put = api.client.put(f"{url.path}?{url.query}", content=sealed)
    assert put.status_code == 201, put.text
    return {
        "notebook": "app.ipynb",
        "notebook_sha256": hashlib.sha256(NOTEBOOK).hexdigest(),
        "bundle_id": info["bundle_id"],
        "bundle_sha256": sha,
    }


def test_an_app_server_takes_only_its_own_teams_deployments(make_api: AppFactory) -> None:  # noqa: F811
    api = make_api(runner_app_teams=("other",))
    people = setup(api)
    body = upload(api, people["alice"])
    made = api.post("/teams/acme/apps/sales/deployments", headers=people["alice"], json=body)
    assert made.status_code == 202, made.text
    assert (made.json()["number"], made.json()["status"]) == (1, "pending")
    time.sleep(2.0)  # four rounds of the app server
    shown = api.get("/teams/acme/apps/sales", headers=people["alice"]).json()
    assert shown["deployments"][0]["status"] == "pending", shown
    assert shown["running"] == []
    with api.db.session() as s:  # what GET /teams/{team}/events streams
        ours = [(e.kind, e.ref) for e in events.after(s, "acme", 0)]
        theirs = [(e.kind, e.ref) for e in events.after(s, "other", 0)]
    assert ours == [("deployment_started", "acme/sales#1")] and theirs == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"port": 0}, "port"),
        ({"port": 7600}, "port"),
        ({"instances": 9}, "instances"),
        ({"environment": "no such thing!"}, "environment"),
        ({"machine_type": "huge"}, "machine_type"),
        ({"env": {"LD_PRELOAD": "x"}}, "env"),
        ({"env": {"DB": {"secret": "missing"}}}, "env.DB"),
        ({"notebook": "../app.ipynb"}, "files"),
        ({"bundle_sha256": "0" * 64}, "bundle_sha256"),
        ({"bundle_id": "nope"}, "bundle_id"),
    ],
)
def test_a_bad_deployment_is_refused_naming_the_field(api: ApiHarness, change: dict[str, Any], field: str) -> None:
    people = setup(api)
    body = {**upload(api, people["alice"]), **change}
    resp = api.post("/teams/acme/apps/sales/deployments", headers=people["alice"], json=body)
    assert resp.status_code in (404, 422), resp.text
    assert resp.json()["error"]["details"].get("field", "").startswith(field), resp.json()
    assert api.get("/teams/acme/apps", headers=people["alice"]).json() == []  # nothing recorded


def test_only_the_teams_members_act_on_its_apps(api: ApiHarness) -> None:
    people = setup(api)
    body = upload(api, people["alice"])
    assert api.post("/teams/acme/apps/sales/deployments", headers=people["alice"], json=body).status_code == 202
    bob = people["bob"]
    for method, path, payload in (
        ("post", "/teams/acme/apps/sales/bundles", None),
        ("post", "/teams/acme/apps/sales/deployments", body),
        ("get", "/teams/acme/apps", None),
        ("get", "/teams/acme/apps/sales", None),
        ("get", "/teams/acme/apps/sales/logs", None),
        ("post", "/teams/acme/apps/sales/stop", None),
        ("post", "/teams/acme/apps/sales/rollback", {"number": 1}),
        ("delete", "/teams/acme/apps/sales", None),
    ):
        resp = api.client.request(method.upper(), path, headers=bob, json=payload)
        assert resp.status_code == 404, (method, path, resp.text)
    assert api.get("/teams/acme/apps/sales", headers=people["alice"]).status_code == 200


def test_an_upload_url_holds_only_for_its_bundle_and_time(api: ApiHarness) -> None:
    people = setup(api)
    data = b"x" * 100
    sha = hashlib.sha256(data).hexdigest()
    url = urlsplit(
        api.post(
            "/teams/acme/apps/sales/bundles/upload-url", headers=people["alice"], json={"sha256": sha, "size": 100}
        ).json()["url"]
    )
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert api.client.put(url.path, params={**query, "signature": "0" * 64}, content=data).status_code == 403
    assert api.client.put(url.path, params={**query, "expires": "1"}, content=data).status_code == 403
    assert api.client.put(url.path, params=query, content=b"y" * 100).status_code == 422
    assert api.client.put(url.path, params=query, content=data).status_code == 201


def test_an_app_cannot_run_on_another_teams_unpublished_environment(api: ApiHarness) -> None:
    """R37: the spec's environment is resolved for the author; another team's unpublished
    version is "not found" and nothing is recorded."""
    from envs.service import NewVersion, register_version

    people = setup(api)
    with api.db.session() as s:
        register_version(s, NewVersion(environment="other/tools", image_id="sha256:" + "c" * 64, image_ref="x"))
    body = {**upload(api, people["alice"]), "environment": "other/tools@1"}
    resp = api.post("/teams/acme/apps/sales/deployments", headers=people["alice"], json=body)
    assert resp.status_code == 404 and resp.json()["error"]["details"]["field"] == "environment", resp.text
    assert api.get("/teams/acme/apps", headers=people["alice"]).json() == []
