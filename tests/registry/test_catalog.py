"""Publishing, the catalog and the refusal to pull the floor from under another team, through
the API on the fake engine. Versions are registered in the store directly (no image is needed
to publish one); runtimes are made through the API, pinned to what they boot from."""

from __future__ import annotations

from typing import Any

import pytest

from envs.service import NewVersion, Writer, register_version, resolve
from tests.api.conftest import ApiHarness, api, make_api, prepared_settings  # noqa: F401
from tests.api.test_errors_and_auth import assert_envelope
from tests.registry.test_teams_api import user

Headers = dict[str, str]


def version(api: ApiHarness, name: str, parent: str = "python3@1", **kw: Any) -> str:  # noqa: F811
    """Register a version of ``name`` (as envctl itself), on ``parent``; its ref."""
    with api.db.session() as s:
        digest = "sha256:" + format(abs(hash((name, kw.get("message", ""), parent))), "064x")[:64]
        made, _ = register_version(
            s,
            NewVersion(environment=name, image_id=digest, image_ref=f"test/{name}", parent=resolve(s, parent), **kw),
            Writer("tests", is_admin=True),
        )
        return made.ref


@pytest.fixture
def teams(api: ApiHarness) -> tuple[Headers, Headers]:  # noqa: F811
    alice, bob = user(api, "alice"), user(api, "bob")
    assert api.post("/teams", headers=alice, json={"name": "acme"}).status_code == 201
    assert api.post("/teams", headers=bob, json={"name": "beta"}).status_code == 201
    version(api, "acme/ml", message="first")
    version(api, "acme/ml", message="second")
    return alice, bob


def test_a_published_version_is_readable_by_other_teams_and_the_rest_stays_hidden(
    api: ApiHarness,  # noqa: F811
    teams: tuple[Headers, Headers],
) -> None:
    alice, bob = teams
    assert api.get("/environments/acme/ml@1", headers=bob).status_code == 404

    made = api.post("/environments/acme/ml@1/publish", headers=alice)

    assert made.status_code == 200, made.text
    assert made.json()["ref"] == "acme/ml@1" and made.json()["published_by"] == "alice"
    seen = api.get("/environments/acme/ml@1", headers=bob)
    assert seen.status_code == 200, seen.text
    assert [v["ref"] for v in seen.json()["versions"]] == ["acme/ml@1"]
    assert api.get("/environments/acme/ml@1/lineage", headers=bob).status_code == 200
    assert api.get("/environments/acme/ml@2", headers=bob).status_code == 404
    listed = {e["name"]: e for e in api.get("/environments", headers=bob).json()}
    assert [v["ref"] for v in listed["acme/ml"]["versions"]] == ["acme/ml@1"]
    # read only: bob may neither delete it nor unpublish it, nor publish what is hidden
    for resp in (
        api.delete("/environments/acme/ml@1", headers=bob),
        api.delete("/environments/acme/ml@1/publish", headers=bob),
        api.post("/environments/acme/ml@1/publish", headers=bob),
    ):
        assert resp.status_code == 403, resp.text
        assert_envelope(resp, 403)
    assert api.post("/environments/acme/ml@2/publish", headers=bob).status_code == 404

    assert api.delete("/environments/acme/ml@1/publish", headers=alice).status_code == 204
    assert api.get("/environments/acme/ml@1", headers=bob).status_code == 404
    assert "acme/ml" not in [e["name"] for e in api.get("/environments", headers=bob).json()]
    gone = api.delete("/environments/acme/ml@1/publish", headers=alice)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "publication_not_found"


def test_a_published_tag_publishes_the_version_it_points_at_as_it_moves(
    api: ApiHarness,  # noqa: F811
    teams: tuple[Headers, Headers],
) -> None:
    alice, bob = teams
    made = api.post("/environments/acme/ml:latest/publish", headers=alice)
    assert made.status_code == 200, made.text
    assert made.json() | {"published_at": None} == {
        "ref": "acme/ml:latest",
        "version": "acme/ml@2",
        "published_by": "alice",
        "published_at": None,
    }
    assert api.get("/environments/acme/ml:latest", headers=bob).status_code == 200

    version(api, "acme/ml", message="third")

    assert api.get("/environments/acme/ml@3", headers=bob).status_code == 200
    assert api.get("/environments/acme/ml@2", headers=bob).status_code == 404
    assert [e["version"] for e in api.get("/catalog", headers=bob).json()] == ["acme/ml@3"]


def test_publishing_what_is_not_a_teams_is_refused_naming_the_field(api: ApiHarness) -> None:  # noqa: F811
    resp = api.post("/environments/python3@1/publish")
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["message"].startswith("ref:")


def test_the_catalog_finds_what_is_published_by_name_description_message_and_package(
    api: ApiHarness,  # noqa: F811
    teams: tuple[Headers, Headers],
) -> None:
    alice, bob = teams
    packages = {"packages": {"deb": [{"name": "jq", "version": "1.6"}], "python": [{"name": "numpy", "version": "2"}]}}
    version(api, "acme/stats", message="statistics kit", labels=packages)
    version(api, "beta/web", message="a web server")
    assert api.post("/environments/acme/stats@1/publish", headers=alice).status_code == 200
    assert api.post("/environments/acme/ml@2/publish", headers=alice).status_code == 200
    assert api.post("/environments/beta/web@1/publish", headers=bob).status_code == 200

    def found(q: str) -> list[str]:
        resp = api.get("/catalog", headers=bob, params={"q": q})
        assert resp.status_code == 200, resp.text
        return [e["ref"] for e in resp.json()]

    assert found("") == ["acme/ml@2", "acme/stats@1", "beta/web@1"]
    assert found("STATS") == ["acme/stats@1"]
    assert found("web server") == ["beta/web@1"]
    assert found("numpy") == ["acme/stats@1"]
    assert found("nothing-like-it") == []
    [stats] = api.get("/catalog", headers=bob, params={"q": "jq"}).json()
    assert stats["packages"] == {"deb": 1, "python": 1} and stats["matched_packages"] == ["jq"]
    assert stats["team"] == "acme" and stats["version"] == "acme/stats@1"


def test_unpublishing_or_deleting_what_another_team_built_on_is_refused_naming_only_what_the_caller_may_see(
    api: ApiHarness,  # noqa: F811
    teams: tuple[Headers, Headers],
) -> None:
    alice, bob = teams
    assert api.post("/environments/acme/ml@1/publish", headers=alice).status_code == 200
    version(api, "beta/child", parent="acme/ml@1")
    rt = api.post("/runtimes", headers=bob, json={"environment": "acme/ml@1", "name": "bobs-work"})
    assert rt.status_code == 201, rt.text

    for resp in (
        api.delete("/environments/acme/ml@1/publish", headers=alice),
        api.delete("/environments/acme/ml@1", headers=alice),
    ):
        assert resp.status_code == 409, resp.text
        assert_envelope(resp, 409)
        error = resp.json()["error"]
        assert "beta/child" not in resp.text and "bobs-work" not in resp.text and rt.json()["id"] not in resp.text
        assert error["details"]["hidden"] == {"versions": 1, "runtimes": 1}
        assert "1 version(s) you cannot see" in error["message"] and "1 runtime(s) of other users" in error["message"]
    admin = api.delete("/environments/acme/ml@1/publish")  # envctl's admin sees every name
    assert admin.status_code == 409
    assert admin.json()["error"]["details"] | {"hidden": None} == {
        "versions": ["beta/child@1"],
        "runtimes": [f"bobs-work ({rt.json()['id']})"],
        "hidden": None,
    }
    assert api.get("/environments/acme/ml@1", headers=bob).status_code == 200  # still published

    # what nobody else depends on goes: a version of acme's own, published or not
    assert api.post("/environments/acme/ml@2/publish", headers=alice).status_code == 200
    assert api.delete("/environments/acme/ml@2", headers=alice).status_code == 204
    assert [e["ref"] for e in api.get("/catalog", headers=bob).json()] == ["acme/ml@1"]
