"""R27 over every route of the OpenAPI schema: Bob (team beta) asks for what Alice (team acme)
has — her runtime, execution, result, operation, token, her team and its environment
``acme/ml``'s own version — and gets 404 or 403, never her data; the version of it she
published he may read on every route that reads one, and change on none. Routes are read from the schema, so a new
route is covered without being listed here; a new kind of path parameter fails until the
test is told whose value to use for it.

Then a runtime of team acme, with an execution, a result and an operation: every route that
names one of them is walked as Carol, a member of acme (never a 404: it exists for her), and
as Bob (a 404, or the empty listing a missing id gets too, never its data).
"""

from __future__ import annotations

from typing import Any

from tests.api.conftest import ApiHarness, api, make_api, prepared_settings  # noqa: F401
from tests.api.test_errors_and_auth import assert_envelope


def _user(api: ApiHarness, name: str) -> dict[str, str]:  # noqa: F811
    resp = api.post("/users", json={"name": name})
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in node:
        node = next(n for n in node["anyOf"] if n.get("type") != "null")
    return node


def _example(schema: dict[str, Any], node: dict[str, Any]) -> Any:
    """A valid value for ``node``: its example or default, else a plain one of its type."""
    node = _resolve(schema, node)
    if node.get("examples"):
        return node["examples"][0]
    if "default" in node:
        return node["default"]
    kind = node.get("type")
    if kind == "object":
        return {k: _example(schema, v) for k, v in node.get("properties", {}).items() if k in node.get("required", [])}
    return {"string": "x", "integer": 1, "number": 1, "boolean": False, "array": []}.get(kind)


def _body(schema: dict[str, Any], operation: dict[str, Any]) -> Any:
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" not in content:
        return None
    return _example(schema, content["application/json"]["schema"])


def test_another_teams_things_answer_404_or_403_on_every_route(api: ApiHarness) -> None:  # noqa: F811
    alice, bob = _user(api, "alice"), _user(api, "bob")
    assert api.post("/teams", headers=alice, json={"name": "acme"}).status_code == 201
    assert api.post("/teams", headers=bob, json={"name": "beta"}).status_code == 201
    rt = api.post("/runtimes", headers=alice, json={"environment": "python3", "name": "secret-work"}).json()
    rid = rt["id"]
    results = api.runner.state_dir(rid) / "results"
    code = f"open({str(results / 'mine.txt')!r}, 'w').write('private')"
    ex = api.post(f"/runtimes/{rid}/executions", headers=alice, params={"wait": 20}, json={"code": code}).json()
    assert ex["status"] == "ok", ex
    [result] = api.get(f"/executions/{ex['id']}/results", headers=alice).json()
    for message in ("shared save", "private save"):  # acme/ml@1, published; acme/ml@2, the team's own
        body = {"environment": "acme/ml", "message": message}
        op = api.post(f"/runtimes/{rid}/save", headers=alice, json=body).json()
        assert api.get(f"/operations/{op['id']}", headers=alice, params={"wait": 10}).json()["status"] == "succeeded"
    assert api.post("/environments/acme/ml@1/publish", headers=alice).status_code == 200
    token_id = api.get("/tokens", headers=alice).json()[0]["id"]
    assert api.post("/volumes", headers=alice, json={"name": "acme/data"}).status_code == 201
    put = api.client.put("/teams/acme/secrets/db-pass", headers=alice, json={"value": "alices-db-password"})
    assert put.status_code == 201, put.text
    alices = {
        "runtime_id": rid,
        "execution_id": ex["id"],
        "result_id": str(result["id"]),
        "operation_id": op["id"],
        "ref": "acme/ml@2",
        "team": "acme",
        "user": "alice",
        "token_id": token_id,
        "volume": "acme/data",
        "name": "db-pass",
    }
    secrets = [
        rid,
        ex["id"],
        op["id"],
        token_id,
        "acme/ml@2",
        "private save",
        "secret-work",
        "private",
        "alices-db-password",
    ]
    schema = api.client.get("/openapi.json").json()

    checked = []
    for path, method, params, operation in _operations(schema):
        missing = [p for p in params if p not in alices]
        assert not missing, f"{method.upper()} {path}: say whose {missing} to use in this test"
        url = path.format(**{p: alices[p] for p in params})
        resp = api.client.request(method, url, headers=bob, json=_body(schema, operation))
        if params and method == "get" and resp.status_code == 200:
            assert resp.json() == [], (method, path, resp.text[:300])  # a listing filtered by owner
        elif params:
            assert resp.status_code in (403, 404), (method, path, resp.status_code, resp.text[:300])
            assert_envelope(resp, resp.status_code)
        elif method == "get":
            assert resp.status_code < 500, (method, path, resp.text[:300])
        leaked = [s for s in secrets if s in resp.text and s not in url]  # echoing the ask is no leak
        assert not leaked, (method, path, leaked)
        checked.append(f"{method.upper()} {path}")
    assert len(checked) >= 40

    # The published version: every route that names a version reads it (200) and changes
    # nothing of it (403), and shows nothing of the team's own beside it.
    published = [(p, m, o) for p, m, params, o in _operations(schema) if params == ["ref"]]
    for path, method, operation in published:
        url = path.format(ref="acme/ml@1")
        required = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query" and p.get("required")]
        query = {p: {"against": "python3@1"}[p] for p in required}  # a new one: say what to ask with
        resp = api.client.request(method, url, headers=bob, params=query, json=_body(schema, operation))
        if method == "get" or path.endswith("/pull"):  # reads: bob gets what alice gets (the fake engine
            # cannot export, read packages or pull)
            own = api.client.request(method, url, headers=alice, params=query, json=_body(schema, operation))
            assert resp.status_code == own.status_code not in (403, 404), (path, resp.status_code, resp.text[:300])
        else:
            assert resp.status_code == 403, (method, path, resp.status_code, resp.text[:300])
            assert_envelope(resp, 403)
        leaked = [s for s in secrets if s in resp.text]
        assert not leaked, (method, path, leaked)
    assert {f"{m.upper()} {p}" for p, m, _ in published} >= {
        "GET /environments/{ref}",
        "GET /environments/{ref}/lineage",
        "DELETE /environments/{ref}",
        "POST /environments/{ref}/publish",
        "DELETE /environments/{ref}/publish",
    }

    # An environment named in a body or a query is checked as one in the path: another team's
    # private version is a 404 naming the field; its published one may be used.
    hidden = api.post("/runtimes", headers=bob, json={"environment": "acme/ml@2", "name": "peek"})
    assert hidden.status_code == 404 and hidden.json()["error"]["details"]["field"] == "environment", hidden.text
    assert "private save" not in hidden.text
    mine = api.post("/runtimes", headers=bob, json={"environment": "acme/ml@1", "name": "borrowed"})
    assert mine.status_code == 201, mine.text
    moved = api.client.patch(f"/runtimes/{mine.json()['id']}", headers=bob, json={"environment": "acme/ml:latest"})
    assert moved.status_code == 404 and moved.json()["error"]["details"]["field"] == "environment", moved.text
    diff = api.get("/environments/acme/ml@1/packages/diff", headers=bob, params={"against": "acme/ml@2"})
    assert diff.status_code == 404 and diff.json()["error"]["details"]["field"] == "against", diff.text

    # Alice's things are as she left them.
    assert api.get(f"/runtimes/{rid}", headers=alice).json()["state"] == "running"
    assert api.get("/environments/acme/ml", headers=alice).json()["latest"] == "acme/ml@2"
    assert [m["user"] for m in api.get("/teams/acme/members", headers=alice).json()] == ["alice"]
    assert [t["active"] for t in api.get("/tokens", headers=alice).json()] == [True]
    [shared] = [e for e in api.get("/environments", headers=bob).json() if e["name"] == "acme/ml"]
    assert [v["ref"] for v in shared["versions"]] == ["acme/ml@1"] and shared["latest"] is None
    assert [e["ref"] for e in api.get("/catalog", headers=bob).json()] == ["acme/ml@1"]
    assert [x["version"] for x in api.get("/teams/acme/secrets", headers=alice).json()] == [1]
    assert "acme/ml" in [e["name"] for e in api.get("/environments").json()]  # envctl admins see all

    _walk_team_runtime(api, schema, alice, bob)


RUNTIME_PARAMS = {"runtime_id", "execution_id", "result_id", "operation_id"}


def _walk_team_runtime(api: ApiHarness, schema: dict[str, Any], alice: dict[str, str], bob: dict[str, str]) -> None:  # noqa: F811
    """Every route naming a runtime, execution, result or operation, with those of a team
    runtime: Carol (a member, not its owner) finds each; Bob (outside the team) finds none."""
    carol = _user(api, "carol")
    joined = api.post("/teams/acme/members", headers=alice, json={"user": "carol", "role": "member"})
    assert joined.status_code == 200, joined.text
    body = {"environment": "python3", "name": "team-work", "team": "acme"}
    rid = api.post("/runtimes", headers=alice, json=body).json()["id"]
    results = api.runner.state_dir(rid) / "results"
    code = f"open({str(results / 'team.txt')!r}, 'w').write('team only')"
    ex = api.post(f"/runtimes/{rid}/executions", headers=alice, params={"wait": 20}, json={"code": code}).json()
    assert ex["status"] == "ok", ex
    [result] = api.get(f"/executions/{ex['id']}/results", headers=alice).json()
    op = api.post(f"/runtimes/{rid}/save", headers=alice, json={"environment": "acme/team-tools"}).json()
    assert api.get(f"/operations/{op['id']}", headers=alice, params={"wait": 10}).json()["status"] == "succeeded"
    teams = {"runtime_id": rid, "execution_id": ex["id"], "result_id": str(result["id"]), "operation_id": op["id"]}
    secrets = [rid, ex["id"], op["id"], "team-work", "team only", "acme/team-tools"]
    routes = [(p, m, params, o) for p, m, params, o in _operations(schema) if params and set(params) <= RUNTIME_PARAMS]
    for path, method, params, operation in routes:  # Bob first: Carol's walk stops and resets it
        url = path.format(**{p: teams[p] for p in params})
        resp = api.client.request(method, url, headers=bob, json=_body(schema, operation))
        if method == "get" and resp.status_code == 200:  # a listing of results: empty, as for a missing id
            assert resp.json() == [], (method, path, resp.text[:300])
        else:
            assert resp.status_code == 404, (method, path, resp.status_code, resp.text[:300])
            assert_envelope(resp, 404)
        leaked = [s for s in secrets if s in resp.text and s not in url]
        assert not leaked, (method, path, leaked)
    assert "team-work" not in api.get("/runtimes", headers=bob).text
    for path, method, params, operation in routes:
        url = path.format(**{p: teams[p] for p in params})
        resp = api.client.request(method, url, headers=carol, json=_body(schema, operation))
        assert resp.status_code != 404 and resp.status_code < 500, (method, path, resp.status_code, resp.text[:300])
        if method == "get" and path.endswith(("/results", "/executions", "/log")):
            assert resp.json() != [], (method, path)  # hers to read, not an empty answer
    assert len(routes) >= 15, [f"{m} {p}" for p, m, _, _ in routes]
    assert api.get(f"/runtimes/{rid}", headers=alice).status_code == 200  # carol could not delete it


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, list[str], dict[str, Any]]]:
    """Every operation of the schema: its path, method, path parameters and description."""
    return [
        (path, method, [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"], operation)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    ]
