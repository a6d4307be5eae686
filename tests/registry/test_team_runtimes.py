"""Team runtimes: a runtime made in a team is its members' too (they see it, start it, run
cells in it, read its executions and results, save it); to anyone else it does not exist (404);
changing its settings or deleting it takes its owner or a team admin (403 otherwise); a member
who is removed loses it at once on this server. In-process, on the fake backend."""

from __future__ import annotations

from typing import Any

from runner.models import Execution, Runtime
from tests.api.conftest import ApiHarness, api, make_api, prepared_settings  # noqa: F401
from tests.api.test_errors_and_auth import assert_envelope
from tests.registry.test_team_isolation import _user as user


def acme(api: ApiHarness) -> dict[str, dict[str, str]]:  # noqa: F811
    """alice (admin of acme) with carol (member) and dave (admin); bob is in no team of hers."""
    people = {name: user(api, name) for name in ("alice", "bob", "carol", "dave")}
    assert api.post("/teams", headers=people["alice"], json={"name": "acme"}).status_code == 201
    for name, role in (("carol", "member"), ("dave", "admin")):
        added = api.post("/teams/acme/members", headers=people["alice"], json={"user": name, "role": role})
        assert added.status_code == 200, added.text
    return people


def team_runtime(api: ApiHarness, headers: dict[str, str], name: str = "shared") -> dict[str, Any]:  # noqa: F811
    resp = api.post("/runtimes", headers=headers, json={"environment": "python3", "name": name, "team": "acme"})
    assert resp.status_code == 201, resp.text
    made: dict[str, Any] = resp.json()
    return made


def test_a_teammate_uses_a_team_runtime_and_an_outsider_finds_nothing(api: ApiHarness) -> None:  # noqa: F811
    people = acme(api)
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    rt = team_runtime(api, alice)
    rid = rt["id"]
    assert rt["team"] == "acme"

    # carol, a member, sees it and uses it
    assert [r["id"] for r in api.get("/runtimes", headers=carol).json()] == [rid]
    started = api.post(f"/runtimes/{rid}/start", headers=carol, params={"wait": 20})
    assert started.status_code == 202 and started.json()["state"] == "running", started.text
    results = api.runner.state_dir(rid) / "results"
    code = f"open({str(results / 'team.txt')!r}, 'w').write('for acme'); 6 * 7"
    ex = api.post(f"/runtimes/{rid}/executions", headers=carol, params={"wait": 20}, json={"code": code}).json()
    assert ex["status"] == "ok", ex
    assert ex["submitted_by"] == "carol"
    seen = api.get(f"/executions/{ex['id']}", headers=alice).json()  # alice sees carol's cell, and who ran it
    assert (seen["status"], seen["submitted_by"]) == ("ok", "carol")
    own = api.post(f"/runtimes/{rid}/executions", headers=alice, params={"wait": 20}, json={"code": "1"}).json()
    assert (own["status"], own["submitted_by"]) == ("ok", "alice"), own
    listed = api.get(f"/runtimes/{rid}/executions", headers=carol).json()
    assert [(e["id"], e["submitted_by"]) for e in listed] == [(own["id"], "alice"), (ex["id"], "carol")]
    [result] = api.get(f"/executions/{ex['id']}/results", headers=carol).json()
    assert api.client.get(f"/results/{result['id']}/content", headers=carol).content == b"for acme"
    assert [r["id"] for r in api.get("/results", headers=carol).json()] == [result["id"]]
    op = api.post(f"/runtimes/{rid}/save", headers=carol, json={"environment": "acme/tools", "message": "by carol"})
    assert op.status_code == 202, op.text
    done = api.get(f"/operations/{op.json()['id']}", headers=alice, params={"wait": 10}).json()
    assert done["status"] == "succeeded", done
    assert api.get(f"/runtimes/{rid}/log", headers=carol).status_code == 200

    # bob, in no team of alice's, gets the 404 a missing id gets, and no list shows it
    missing = api.get("/runtimes/rt_doesnotexist", headers=bob)
    for method, url in (
        ("get", f"/runtimes/{rid}"),
        ("get", f"/runtimes/{rid}/log"),
        ("get", f"/runtimes/{rid}/executions"),
        ("post", f"/runtimes/{rid}/stop"),
        ("post", f"/runtimes/{rid}/reset"),
        ("patch", f"/runtimes/{rid}"),
        ("delete", f"/runtimes/{rid}"),
        ("get", f"/executions/{ex['id']}"),
        ("get", f"/executions/{own['id']}"),
        ("post", f"/executions/{ex['id']}/interrupt"),
        ("get", f"/results/{result['id']}"),
        ("get", f"/operations/{op.json()['id']}"),
    ):
        resp = api.client.request(method, url, headers=bob, json={} if method == "patch" else None)
        assert resp.status_code == 404, (method, url, resp.text)
        assert_envelope(resp, 404)
    cell = api.post(f"/runtimes/{rid}/executions", headers=bob, json={"code": "1"})
    assert cell.status_code == 404 and cell.json()["error"]["code"] == missing.json()["error"]["code"]
    assert api.get("/runtimes", headers=bob).json() == []
    assert api.get("/results", headers=bob).json() == []
    assert api.get(f"/runtimes/{rid}/results", headers=bob).json() == []


def test_settings_and_deletion_take_the_owner_or_a_team_admin(api: ApiHarness) -> None:  # noqa: F811
    people = acme(api)
    rid = team_runtime(api, people["alice"])["id"]
    for method in ("patch", "delete"):
        resp = api.client.request(method, f"/runtimes/{rid}", headers=people["carol"], json={"idle_timeout": 60})
        assert resp.status_code == 403, resp.text
        assert "admin of team 'acme'" in resp.json()["error"]["message"]
    renamed = api.patch(f"/runtimes/{rid}", headers=people["dave"], json={"name": "renamed"})  # a team admin
    assert renamed.status_code == 200 and renamed.json()["name"] == "renamed", renamed.text
    assert api.delete(f"/runtimes/{rid}", headers=people["dave"]).status_code == 204


def test_a_removed_member_loses_the_teams_runtimes(api: ApiHarness) -> None:  # noqa: F811
    people = acme(api)
    rid = team_runtime(api, people["alice"])["id"]
    assert api.get(f"/runtimes/{rid}", headers=people["carol"]).status_code == 200
    assert api.delete("/teams/acme/members/carol", headers=people["alice"]).status_code == 204
    gone = api.get(f"/runtimes/{rid}", headers=people["carol"])
    assert gone.status_code == 404, gone.text
    assert api.get("/runtimes", headers=people["carol"]).json() == []


def test_team_runtime_names_are_unique_in_the_team_and_a_team_must_be_yours(api: ApiHarness) -> None:  # noqa: F811
    people = acme(api)
    team_runtime(api, people["alice"], "notebook")
    clash = api.post(
        "/runtimes", headers=people["carol"], json={"environment": "python3", "name": "notebook", "team": "acme"}
    )
    assert clash.status_code == 409, clash.text
    assert "team 'acme' already has a runtime named 'notebook'" in clash.json()["error"]["message"]
    personal = api.post("/runtimes", headers=people["carol"], json={"environment": "python3", "name": "notebook"})
    assert personal.status_code == 201 and personal.json()["team"] is None, personal.text  # personal: no clash
    elsewhere = api.post(
        "/runtimes", headers=people["bob"], json={"environment": "python3", "name": "mine", "team": "acme"}
    )
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["details"]["team"] == "acme", elsewhere.text


def test_a_team_runtime_takes_only_its_teams_secrets_and_volumes(api: ApiHarness) -> None:  # noqa: F811
    people = acme(api)
    alice = people["alice"]
    assert api.post("/teams", headers=alice, json={"name": "beta"}).status_code == 201
    for team in ("acme", "beta"):
        put = api.client.put(f"/teams/{team}/secrets/token", headers=alice, json={"value": f"{team}-value"})
        assert put.status_code == 201, put.text
    base = {"environment": "python3", "name": "shared", "team": "acme"}
    other = api.post("/runtimes", headers=alice, json={**base, "env": {"T": {"secret": "beta/token"}}})
    assert other.status_code == 422 and other.json()["error"]["details"]["field"] == "env.T", other.text
    for name in ("home-data", "beta/data"):  # her own volume, another team's: carol would read them
        mount = {"type": "volume", "name": name, "target": "/data"}
        refused = api.post("/runtimes", headers=alice, json={**base, "mounts": [mount]})
        assert refused.status_code == 422 and "mounts[0].name" in refused.json()["error"]["message"], refused.text
    mount = {"type": "volume", "name": "acme/data", "target": "/data"}
    made = api.post("/runtimes", headers=alice, json={**base, "env": {"T": {"secret": "token"}}, "mounts": [mount]})
    assert made.status_code == 201, made.text
    assert made.json()["env"]["T"] == {"secret": "token", "team": "acme"}  # not ambiguous: acme's only


def test_a_cell_recorded_before_submitters_were_kept_shows_the_runtimes_owner(api: ApiHarness) -> None:  # noqa: F811
    people = acme(api)
    rid = team_runtime(api, people["alice"])["id"]
    with api.db.session() as s:  # a row from before revision 0016: no submitted_by
        rt = s.get(Runtime, rid)
        assert rt is not None
        s.add(
            Execution(
                id="ex_before0016",
                runtime_id=rid,
                owner_id=rt.owner_id,
                team="acme",
                seq=1000,
                language="python",
                code="1",
                status="ok",
                submitted_by=None,
            )
        )
    seen = api.get("/executions/ex_before0016", headers=people["carol"])
    assert seen.status_code == 200 and seen.json()["submitted_by"] == "alice", seen.text
    listed = api.get(f"/runtimes/{rid}/executions", headers=people["carol"]).json()
    assert [(e["id"], e["submitted_by"]) for e in listed] == [("ex_before0016", "alice")]
