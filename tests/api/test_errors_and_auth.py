"""Errors, authentication, input validation (R30), isolation between users (R27), and a backend
that does not answer."""

from __future__ import annotations

from typing import Any

import pytest

from api.settings import Settings
from runner.backends.base import BackendState, RuntimeSpec
from runner.backends.fake import FakeBackend
from tests.api.conftest import ApiHarness, AppFactory


def assert_envelope(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The response has ``status`` and the one error envelope; returns ``error``."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"code", "message", "details"}, err
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], dict)
    if code is not None:
        assert err["code"] == code, err
    return err


class RecordingBackend(FakeBackend):
    """The fake engine, remembering every container it was asked to create or stop."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.started: list[RuntimeSpec] = []
        self.stopped: list[BackendState] = []
        self.committed: list[str] = []

    def start(self, spec: RuntimeSpec) -> BackendState:
        self.started.append(spec)
        return super().start(spec)

    def commit(self, state: BackendState, *, config: dict[str, Any], repository: str, tag: str) -> str:
        self.committed.append(f"{repository}:{tag}")
        return super().commit(state, config=config, repository=repository, tag=tag)

    def stop(self, state: BackendState, timeout: float = 5.0) -> None:
        self.stopped.append(dict(state))
        super().stop(state, timeout)


@pytest.fixture
def recorded(make_api: AppFactory, prepared_settings: Settings) -> tuple[ApiHarness, RecordingBackend]:
    backend = RecordingBackend()
    return make_api(backend), backend


# --------------------------------------------------------------------------- envelope and auth


def test_every_error_uses_the_envelope(api: ApiHarness) -> None:
    assert_envelope(api.get("/no-such-path"), 404, "not_found")
    assert_envelope(api.client.put("/runtimes", headers=api.headers, json={}), 405, "method_not_allowed")
    assert_envelope(api.get("/runtimes/rt_missing"), 404, "runtime_not_found")
    assert_envelope(api.get("/environments/nope"), 404, "environment_not_found")
    assert_envelope(api.post("/runtimes", json={}), 422, "invalid_input")
    assert_envelope(
        api.post("/runtimes", content=b"{not json", headers={**api.headers, "content-type": "application/json"}),
        422,
        "invalid_input",
    )
    assert_envelope(api.post("/runtimes", json=["a", "list"]), 422, "invalid_input")
    api.create_runtime("demo")
    assert_envelope(api.post("/runtimes", json={"environment": "python3", "name": "demo"}), 409)
    assert_envelope(api.client.get("/runtimes"), 401, "unauthorized")


def test_missing_body_fields_are_all_named(api: ApiHarness) -> None:
    err = assert_envelope(api.post("/runtimes", json={}), 422, "invalid_input")
    fields = {p["field"] for p in err["details"]["problems"]}
    assert fields == {"name", "environment"}
    assert err["details"]["field"] in fields
    assert "more problem" in err["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer envctl_not-a-real-token"},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "envctl_abc"},
    ],
    ids=["none", "empty", "unknown", "basic", "no-scheme"],
)
def test_requests_without_a_valid_token_are_401(api: ApiHarness, headers: dict[str, str]) -> None:
    for method, path, body in [
        ("GET", "/runtimes", None),
        ("POST", "/runtimes", {"environment": "python3", "name": "demo"}),
        ("GET", "/runtimes/rt_x", None),
        ("PATCH", "/runtimes/rt_x", {"idle_timeout": 5}),
        ("DELETE", "/runtimes/rt_x", None),
        ("POST", "/runtimes/rt_x/start", None),
        ("POST", "/runtimes/rt_x/stop", None),
        ("GET", "/runtimes/rt_x/log", None),
        ("GET", "/environments", None),
        ("GET", "/machine-types", None),
    ]:
        resp = api.client.request(method, path, headers=headers, json=body)
        err = assert_envelope(resp, 401, "unauthorized")
        assert "token" in err["message"]
    assert api.runtime_rows() == 0


def test_health_needs_no_token(api: ApiHarness) -> None:
    assert api.client.get("/health").status_code == 200


# --------------------------------------------------------------------------- R30: bad input


BAD_CREATE: list[Any] = [
    # (body changes, field named)
    ({"environment": "python3; rm -rf /"}, "environment"),
    ({"environment": "$(id)"}, "environment"),
    ({"environment": "`id`"}, "environment"),
    ({"environment": "python3 && id"}, "environment"),
    ({"environment": "python3|id"}, "environment"),
    ({"environment": "../../etc/passwd"}, "environment"),
    ({"environment": "python3\x00"}, "environment"),
    ({"environment": "python3\n"}, "environment"),
    ({"environment": "python3@1\n"}, "environment"),
    ({"environment": "python3:latest\n"}, "environment"),
    ({"environment": "a" * 65}, "environment"),
    ({"environment": "x" * 301}, "environment"),
    ({"environment": "Python3"}, "environment"),
    ({"environment": "python3@sha256:abc"}, "environment"),
    ({"environment": "@sha256:abc"}, "environment"),
    ({"environment": "python3@sha256:" + "A" * 64}, "environment"),
    ({"environment": "python3@0"}, "environment"),
    ({"environment": "python3@-1"}, "environment"),
    ({"environment": "python3:.bad"}, "environment"),
    ({"environment": ""}, "environment"),
    ({"environment": "   "}, "environment"),
    ({"name": "a" * 65}, "name"),
    ({"name": "Demo"}, "name"),
    ({"name": "my demo"}, "name"),
    ({"name": "demo;id"}, "name"),
    ({"name": "demo\n"}, "name"),
    ({"name": "-demo"}, "name"),
    ({"name": ""}, "name"),
    ({"name": 5}, "name"),
    ({"language": "ruby"}, "language"),
    ({"type": "docker"}, "type"),
    ({"idle_timeout": -1}, "idle_timeout"),
    ({"idle_timeout": 7 * 24 * 3600 + 1}, "idle_timeout"),
    ({"idle_timeout": "soon"}, "idle_timeout"),
    ({"idle_timeout": 1.5}, "idle_timeout"),
    ({"machine_type": "x" * 65}, "machine_type"),
    ({"bogus": 1}, "bogus"),
    ({"command": "id"}, "command"),
]


@pytest.mark.parametrize(("change", "field"), BAD_CREATE)
def test_bad_create_input_is_422_and_reaches_nothing(
    recorded: tuple[ApiHarness, RecordingBackend], change: dict[str, Any], field: str
) -> None:
    """R30: shell metacharacters, over-long names, bad digests."""
    api, backend = recorded
    body = {"environment": "python3", "name": "demo", **change}
    err = assert_envelope(api.post("/runtimes", json=body), 422, "invalid_input")
    assert err["details"]["field"] == field
    assert err["message"].startswith(f"{field}:"), err["message"]
    assert api.runtime_rows() == 0
    assert api.get("/runtimes").json() == []
    assert backend.started == []
    assert api.engine == {}


def test_unknown_machine_type_lists_the_known_ones(recorded: tuple[ApiHarness, RecordingBackend]) -> None:
    api, backend = recorded
    resp = api.post("/runtimes", json={"environment": "python3", "name": "demo", "machine_type": "huge"})
    err = assert_envelope(resp, 422, "machine_type_not_found")
    assert err["details"]["field"] == "machine_type"
    for known in ("small", "medium", "large", "gpu-small"):
        assert known in err["message"]
    assert sorted(err["details"]["known"]) == ["gpu-small", "large", "medium", "small"]
    assert api.runtime_rows() == 0
    assert backend.started == []


def test_unknown_environment_is_404_and_creates_nothing(recorded: tuple[ApiHarness, RecordingBackend]) -> None:
    api, backend = recorded
    for ref in ("nope", "python3@9", "python3:nightly", "acme/python3"):
        resp = api.post("/runtimes", json={"environment": ref, "name": "demo"})
        assert resp.status_code == 404, (ref, resp.text)
        assert_envelope(resp, 404)
    assert api.runtime_rows() == 0
    assert backend.started == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"environment": "python3; rm -rf /"}, "environment"),
        ({"environment": "$(id)"}, "environment"),
        ({"environment": "python3@sha256:abc"}, "environment"),
        ({"name": "Bad Name"}, "name"),
        ({"name": "a" * 65}, "name"),
        ({"machine_type": "huge"}, "machine_type"),
        ({"language": "ruby"}, "language"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"state": "running"}, "state"),
    ],
)
def test_bad_patch_input_is_422_and_changes_nothing(
    recorded: tuple[ApiHarness, RecordingBackend], change: dict[str, Any], field: str
) -> None:
    """R30."""
    api, backend = recorded
    rt = api.create_runtime()
    before = api.get(f"/runtimes/{rt['id']}").json()
    log_before = api.log(rt["id"])
    resp = api.patch(f"/runtimes/{rt['id']}", json=change)
    err = assert_envelope(resp, 422)
    assert err["details"]["field"] == field
    assert api.get(f"/runtimes/{rt['id']}").json() == before
    assert api.log(rt["id"]) == log_before
    assert backend.started == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"environment": "tools; rm -rf /"}, "environment"),
        ({"environment": "$(id)"}, "environment"),
        ({"environment": "`id`"}, "environment"),
        ({"environment": "tools|id"}, "environment"),
        ({"environment": "tools && id"}, "environment"),
        ({"environment": "../../etc/passwd"}, "environment"),
        ({"environment": "acme/x/y"}, "environment"),
        ({"environment": "Tools"}, "environment"),
        ({"environment": "tools\x00"}, "environment"),
        ({"environment": "a" * 65}, "environment"),
        ({"environment": "t" * 65 + "/tools"}, "environment"),
        ({"environment": "x" * 131}, "environment"),
        ({"environment": "tools@sha256:abc"}, "environment"),
        ({"environment": ""}, "environment"),
        ({"environment": "tools", "tag": "$(id)"}, "tag"),
        ({"environment": "tools", "tag": "a b"}, "tag"),
        ({"environment": "tools", "tag": "t" * 129}, "tag"),
        ({"environment": "tools", "message": "m" * 2001}, "message"),
        ({"environment": "tools", "entrypoint": ["sh"]}, "entrypoint"),
    ],
)
def test_bad_save_input_is_422_and_nothing_is_committed(
    recorded: tuple[ApiHarness, RecordingBackend], body: dict[str, Any], field: str
) -> None:
    """R30: environment names and tags with shell metacharacters, over-long, or with a digest;
    R10: no image config can be asked for."""
    api, backend = recorded
    rt = api.create_runtime()
    assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
    api.wait_for(rt["id"], {"running"})
    before = api.get("/environments").json()
    err = assert_envelope(api.post(f"/runtimes/{rt['id']}/save", json=body), 422)
    assert err["details"]["field"] == field, err
    assert backend.committed == []
    assert api.get("/environments").json() == before
    assert not any(e["event"] == "save-started" for e in api.log(rt["id"]))


def test_overlong_runtime_id_in_the_path(api: ApiHarness) -> None:
    resp = api.get("/runtimes/" + "x" * 5000)
    assert resp.status_code in (404, 422)
    err = assert_envelope(resp, resp.status_code)
    assert len(err["message"]) < 300, "the error echoes the whole path parameter"


# --------------------------------------------------------------------------- R27: other users


def test_other_users_runtime_is_invisible(
    recorded: tuple[ApiHarness, RecordingBackend], other_headers: dict[str, str]
) -> None:
    """R27: every runtime endpoint answers 404 to another user."""
    api, backend = recorded
    rt = api.create_runtime("demo")
    assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
    api.wait_for(rt["id"], {"running"})
    rid = rt["id"]
    log_before = api.log(rid)

    missing = api.get("/runtimes/rt_doesnotexist", headers=other_headers)
    assert_envelope(missing, 404, "runtime_not_found")
    for method, path, body in [
        ("GET", f"/runtimes/{rid}", None),
        ("PATCH", f"/runtimes/{rid}", {"idle_timeout": 5}),
        ("PATCH", f"/runtimes/{rid}", {"name": "stolen"}),
        ("POST", f"/runtimes/{rid}/stop", None),
        ("POST", f"/runtimes/{rid}/start", None),
        ("GET", f"/runtimes/{rid}/log", None),
        ("DELETE", f"/runtimes/{rid}", None),
    ]:
        resp = api.client.request(method, path, headers=other_headers, json=body)
        err = assert_envelope(resp, 404, "runtime_not_found")
        # Indistinguishable from a runtime that does not exist.
        assert err["message"] == missing.json()["error"]["message"].replace("rt_doesnotexist", rid)
        assert "demo" not in err["message"]

    assert api.get("/runtimes", headers=other_headers).json() == []
    after = api.get(f"/runtimes/{rid}").json()
    assert after["state"] == "running"
    assert after["name"] == "demo"
    assert after["idle_timeout"] is None
    assert api.log(rid) == log_before
    assert len(api.containers(rid)) == 1
    assert backend.stopped == []

    # Names are per user: B may have a "demo" of its own, and each sees only their own.
    resp = api.post("/runtimes", headers=other_headers, json={"environment": "bash", "name": "demo"})
    assert resp.status_code == 201, resp.text
    theirs = resp.json()
    assert [r["id"] for r in api.get("/runtimes", headers=other_headers).json()] == [theirs["id"]]
    assert [r["id"] for r in api.get("/runtimes").json()] == [rid]
    assert_envelope(api.get(f"/runtimes/{theirs['id']}"), 404, "runtime_not_found")


def test_other_users_cells_results_saves_and_operations_are_invisible(
    recorded: tuple[ApiHarness, RecordingBackend], other_headers: dict[str, str]
) -> None:
    """R27: everything that hangs off a runtime (cells, their events and results, changes,
    saves, resets, operations) answers another user as if it did not exist."""
    api, backend = recorded
    rt = api.create_runtime("demo")
    rid = rt["id"]
    results = api.runner.state_dir(rid) / "results"
    code = f"open({str(results / 'mine.txt')!r}, 'w').write('private')"
    ex = api.post(f"/runtimes/{rid}/executions", params={"wait": 20}, json={"code": code}).json()
    assert ex["status"] == "ok", ex
    [result] = api.get(f"/executions/{ex['id']}/results").json()
    op = api.post(f"/runtimes/{rid}/save", json={"environment": "mine"}).json()
    assert api.get(f"/operations/{op['id']}", params={"wait": 10}).json()["status"] == "succeeded"
    log_before = api.log(rid)
    executions_before = api.get(f"/runtimes/{rid}/executions").json()

    for method, path, body in [
        ("GET", f"/runtimes/{rid}/executions", None),
        ("POST", f"/runtimes/{rid}/executions", {"code": "1"}),
        ("GET", f"/executions/{ex['id']}", None),
        ("POST", f"/executions/{ex['id']}/interrupt", None),
        ("GET", f"/executions/{ex['id']}/events", None),
        ("GET", f"/results/{result['id']}", None),
        ("GET", f"/results/{result['id']}/content", None),
        ("GET", f"/runtimes/{rid}/changes", None),
        ("POST", f"/runtimes/{rid}/save", {"environment": "stolen"}),
        ("POST", f"/runtimes/{rid}/reset", None),
        ("GET", f"/operations/{op['id']}", None),
    ]:
        resp = api.client.request(method, path, headers=other_headers, json=body)
        assert resp.status_code in (403, 404), (method, path, resp.status_code, resp.text)
        assert_envelope(resp, resp.status_code)
        assert "private" not in resp.text and "demo" not in resp.text, (method, path)
    # Listings filter by owner: B's answer is the one for an id that does not exist.
    for path in (
        f"/runtimes/{rid}/results",
        f"/executions/{ex['id']}/results",
        f"/results?runtime_id={rid}",
        "/results",
    ):
        assert api.get(path, headers=other_headers).json() == [], path

    out = api.get(f"/runtimes/{rid}").json()
    assert out["state"] == "running" and out["environment"] == "mine@1"
    assert api.log(rid) == log_before
    assert api.get(f"/runtimes/{rid}/executions").json() == executions_before
    assert api.get("/environments/stolen").status_code == 404
    assert len(backend.committed) == 1 and len(backend.started) == 1


# --------------------------------------------------------------------------- backend faults


def test_unreachable_backend(make_api: AppFactory, prepared_settings: Settings) -> None:
    api = make_api(FakeBackend(unreachable=True))
    health = api.client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["database"] == "ok"
    assert "does not answer" in health.json()["backend"]

    rt = api.create_runtime()
    # The engine is asked before anything changes: a 503 that says why, the runtime untouched.
    err = assert_envelope(api.post(f"/runtimes/{rt['id']}/start"), 503, "backend_error")
    assert "does not answer" in err["message"]
    out = api.get(f"/runtimes/{rt['id']}").json()
    assert out["state"] == "stopped"
    assert api.state_log(rt["id"]) == ["stopped"]
    assert api.engine == {}

    responses = [
        api.get("/runtimes"),
        api.get(f"/runtimes/{rt['id']}"),
        api.get(f"/runtimes/{rt['id']}/log"),
        api.patch(f"/runtimes/{rt['id']}", json={"idle_timeout": 60, "machine_type": "medium"}),
        api.post(f"/runtimes/{rt['id']}/stop"),
        api.get("/environments"),
        api.get("/machine-types"),
        api.client.get("/health"),
        api.delete(f"/runtimes/{rt['id']}"),
    ]
    for r in responses:
        assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text)
    assert api.get(f"/runtimes/{rt['id']}").status_code == 404


class _EngineDiesAfterPing(FakeBackend):
    """Answers the start request's ping, then fails to create the container."""

    def ping(self) -> None:
        return None


def test_engine_failing_during_boot_ends_in_error(make_api: AppFactory, prepared_settings: Settings) -> None:
    api = make_api(_EngineDiesAfterPing(unreachable=True))
    rt = api.create_runtime()
    resp = api.post(f"/runtimes/{rt['id']}/start")
    assert resp.status_code == 202, resp.text
    api.wait_for(rt["id"], {"error"}, timeout=10)
    out = api.get(f"/runtimes/{rt['id']}").json()
    assert out["state"] == "error"
    assert out["state_reason"] in ("backend-error", "backend-unreachable")
    assert "does not answer" in out["state_message"]
    assert api.engine == {}
    for r in (api.get("/runtimes"), api.get(f"/runtimes/{rt['id']}/log")):
        assert r.status_code == 200


def test_backend_going_away_and_coming_back(make_api: AppFactory, prepared_settings: Settings) -> None:
    """R14 through the API: runtimes show the outage with a reason, nothing 500s, and the next
    good round adopts the container again without a restart."""
    backend = FakeBackend()
    api = make_api(backend)
    rt = api.create_runtime()
    api.post(f"/runtimes/{rt['id']}/start")
    api.wait_for(rt["id"], {"running"})
    [container] = api.containers(rt["id"])

    backend.unreachable = True
    api.wait_for(rt["id"], {"error"}, timeout=5)
    out = api.get(f"/runtimes/{rt['id']}").json()
    assert out["state_reason"] == "backend-unreachable"
    assert "does not answer" in out["state_message"]
    assert api.client.get("/health").json()["status"] == "degraded"
    for r in (api.get("/runtimes"), api.get(f"/runtimes/{rt['id']}/log"), api.get("/environments")):
        assert r.status_code == 200, r.text
    assert container.process.poll() is None, "an outage of the engine killed the runtime"

    backend.unreachable = False
    api.wait_for(rt["id"], {"running"}, timeout=5)
    assert api.containers(rt["id"]) == [container]
    assert container.process.poll() is None
    assert api.client.get("/health").json()["status"] == "ok"
    states = api.state_log(rt["id"])
    assert states[-2:] == ["error", "running"]

    # A stop during an outage cannot reach the engine: it says so instead of pretending.
    backend.unreachable = True
    api.wait_for(rt["id"], {"error"}, timeout=5)
    stop = api.post(f"/runtimes/{rt['id']}/stop")
    assert stop.status_code == 202, stop.text
    api.wait_for(rt["id"], {"error"}, timeout=5)
    out = api.get(f"/runtimes/{rt['id']}").json()
    assert out["state"] == "error"
    assert "does not answer" in out["state_message"], out
    backend.unreachable = False
    # Afterwards the runtime can be started again, with one container.
    api.wait_for(rt["id"], {"error", "running", "stopped"}, timeout=5)
    current = api.get(f"/runtimes/{rt['id']}").json()["state"]
    if current != "running":
        assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
        api.wait_for(rt["id"], {"running"}, timeout=10)
    assert len(api.containers(rt["id"])) == 1


def test_malformed_json_names_the_body(api: ApiHarness) -> None:
    resp = api.post(
        "/runtimes",
        content=b'{"name":',
        headers={**api.headers, "content-type": "application/json"},
    )
    err = assert_envelope(resp, 422, "invalid_input")
    assert err["details"]["field"] == "body", err
    assert err["message"].startswith("body: "), err["message"]
