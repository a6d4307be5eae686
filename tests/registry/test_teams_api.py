"""Teams, membership roles, API tokens and team namespaces through the API (fake engine).

The harness's own headers are envctl's admin; users are made through ``POST /users``, the way
an admin would.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from envs.kit.clock import utcnow
from registry import users as registry_service
from tests.api.conftest import ApiHarness, api, make_api, prepared_settings  # noqa: F401
from tests.api.test_errors_and_auth import assert_envelope


def user(api: ApiHarness, name: str) -> dict[str, str]:  # noqa: F811
    resp = api.post("/users", json={"name": name})
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def running(api: ApiHarness, headers: dict[str, str], name: str) -> str:  # noqa: F811
    resp = api.post("/runtimes", headers=headers, json={"environment": "python3", "name": name})
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["id"]
    assert api.post(f"/runtimes/{rid}/start", headers=headers).status_code == 202
    assert api.wait_for(rid, {"running", "error"}).state == "running"
    return rid


def save(api: ApiHarness, headers: dict[str, str], rid: str, environment: str) -> Any:  # noqa: F811
    resp = api.post(f"/runtimes/{rid}/save", headers=headers, json={"environment": environment})
    if resp.status_code != 202:
        return resp
    op = api.get(f"/operations/{resp.json()['id']}", headers=headers, params={"wait": 10}).json()
    assert op["status"] == "succeeded", op
    return op


def test_whoever_creates_a_team_is_its_admin_and_only_members_see_it(api: ApiHarness) -> None:  # noqa: F811
    alice, bob = user(api, "alice"), user(api, "bob")

    made = api.post("/teams", headers=alice, json={"name": "acme"})

    assert made.status_code == 201, made.text
    assert made.json()["role"] == "admin"
    assert made.json()["members"][0]["user"] == "alice"
    assert [t["name"] for t in api.get("/teams", headers=alice).json()] == ["acme"]
    assert api.get("/teams", headers=bob).json() == []
    assert_envelope(api.get("/teams/acme", headers=bob), 404, "team_not_found")
    assert_envelope(api.get("/teams/acme/members", headers=bob), 404, "team_not_found")
    assert [t["name"] for t in api.get("/teams").json()] == ["acme"]  # envctl's admin sees every team
    assert_envelope(api.post("/teams", headers=bob, json={"name": "acme"}), 409, "team_exists")
    assert_envelope(api.post("/teams", headers=bob, json={"name": "Not A Name"}), 422)


def test_only_a_team_admin_adds_or_removes_members_and_the_last_admin_stays(api: ApiHarness) -> None:  # noqa: F811
    alice, bob, carol = user(api, "alice"), user(api, "bob"), user(api, "carol")
    api.post("/teams", headers=alice, json={"name": "acme"})

    added = api.post("/teams/acme/members", headers=alice, json={"user": "bob"})
    assert added.status_code == 200 and added.json()["role"] == "member"
    assert_envelope(api.post("/teams/acme/members", headers=bob, json={"user": "carol"}), 403, "forbidden")
    assert_envelope(api.post("/teams/acme/members", headers=alice, json={"user": "nobody"}), 404, "user_not_found")
    assert_envelope(api.post("/teams/acme/members", headers=alice, json={"user": "carol", "role": "owner"}), 422)
    assert_envelope(api.delete("/teams/acme/members/alice", headers=alice), 409, "last_team_admin")
    assert_envelope(api.delete("/teams/acme/members/alice", headers=carol), 404, "team_not_found")

    assert (
        api.post("/teams/acme/members", headers=alice, json={"user": "bob", "role": "admin"}).json()["role"] == "admin"
    )
    assert api.delete("/teams/acme/members/alice", headers=bob).status_code == 204
    members = api.get("/teams/acme/members", headers=bob).json()
    assert [(m["user"], m["role"]) for m in members] == [("bob", "admin")]
    assert_envelope(api.get("/teams/acme", headers=alice), 404)
    api.post("/teams/acme/members", headers=bob, json={"user": "carol"})
    assert api.delete("/teams/acme/members/carol", headers=carol).status_code == 204  # anyone may leave
    assert api.get("/teams", headers=carol).json() == []


def test_a_token_is_shown_once_works_until_revoked_and_is_refused_at_once_after(api: ApiHarness) -> None:  # noqa: F811
    alice = user(api, "alice")
    made = api.post("/tokens", headers=alice, json={"description": "laptop", "expires_in_days": 7})
    assert made.status_code == 201, made.text
    token, token_id = made.json()["token"], made.json()["id"]
    laptop = {"Authorization": f"Bearer {token}"}
    expires = made.json()["expires_at"]
    assert expires is not None and made.json()["description"] == "laptop"

    listed = api.get("/tokens", headers=laptop).json()
    assert [t["description"] for t in listed] == ["first token", "laptop"]
    assert all("token" not in t for t in listed) and token not in str(listed)
    assert api.get("/teams", headers=laptop).status_code == 200  # remembered in the token cache now

    revoked = api.delete(f"/tokens/{token_id}", headers=alice)

    assert revoked.status_code == 200 and revoked.json()["active"] is False
    err = assert_envelope(api.get("/teams", headers=laptop), 401, "unauthorized")
    assert "revoked" in err["message"]
    assert api.get("/teams", headers=alice).status_code == 200  # her other token still works
    assert [t["active"] for t in api.get("/tokens", headers=alice).json()] == [True, False]


def test_other_users_tokens_expired_tokens_and_endless_tokens_are_refused(api: ApiHarness) -> None:  # noqa: F811
    alice, bob = user(api, "alice"), user(api, "bob")
    alices = api.get("/tokens", headers=alice).json()[0]["id"]
    assert_envelope(api.delete(f"/tokens/{alices}", headers=bob), 404, "token_not_found")
    assert alices not in str(api.get("/tokens", headers=bob).json())
    assert api.get("/teams", headers=alice).status_code == 200

    with api.db.session() as s:
        old = registry_service.create_user(s, "old")
        token = registry_service.issue_token(s, old, "old", utcnow() - timedelta(seconds=1))
    err = assert_envelope(api.get("/tokens", headers={"Authorization": f"Bearer {token}"}), 401, "unauthorized")
    assert "expired" in err["message"]

    for days in (0, 10_000):
        assert_envelope(api.post("/tokens", json={"expires_in_days": days}), 422)
    assert_envelope(api.post("/users", headers=alice, json={"name": "mallory"}), 403, "forbidden")
    assert_envelope(api.post("/users", json={"name": "alice"}), 409, "user_exists")
    reserved = assert_envelope(api.post("/users", json={"name": "envctl-pull-grant"}), 422)
    assert "'envctl-pull-grant' is reserved" in reserved["message"], reserved
    reserved = assert_envelope(api.post("/users", json={"name": "envctl-push-grant"}), 422)
    assert "'envctl-push-grant' is reserved" in reserved["message"], reserved


def test_only_members_create_or_save_into_a_teams_namespace(api: ApiHarness) -> None:  # noqa: F811
    alice, bob = user(api, "alice"), user(api, "bob")
    api.post("/teams", headers=alice, json={"name": "acme"})
    bobs = running(api, bob, "bobs")

    err = assert_envelope(save(api, bob, bobs, "acme/ml"), 403, "forbidden")
    assert "team 'acme'" in err["message"] and err["details"]["team"] == "acme"
    assert_envelope(api.get("/environments/acme/ml"), 404)

    alices = running(api, alice, "alices")
    assert save(api, alice, alices, "acme/ml")["result"]["version"] == "acme/ml@1"
    api.post("/teams/acme/members", headers=alice, json={"user": "bob"})
    # a member writes to the team's environments, not only the one who made them
    assert save(api, bob, bobs, "acme/ml")["result"]["version"] == "acme/ml@2"
    assert save(api, bob, bobs, "bobs-own")["result"]["version"] == "bobs-own@1"
