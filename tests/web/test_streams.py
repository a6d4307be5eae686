"""The page's server side on the fake backend: the page and its security headers, and the two
event streams it follows (runtimes as they change, a runtime's runner log as it grows).

The app runs under uvicorn in a thread, so the streams are read over a real socket, as a
browser reads them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from api.app import create_app
from api.routes.streams import KEEPALIVE
from api.settings import Settings
from api.startup import Services
from tests.api.conftest import prepare_database
from tests.fixtures.services import _free_port


@dataclass
class Live:
    url: str
    headers: dict[str, str]

    def client(self) -> httpx.Client:
        # a stream may rightly stay silent until its keep-alive (KEEPALIVE, 15 s): reads wait longer
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=httpx.Timeout(10, read=KEEPALIVE + 15))


@pytest.fixture
def live(settings: Settings) -> Iterator[Live]:
    prepare_database(settings)
    app = create_app(Services.build(settings))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
    )  # an event stream the test left open does not hold the shutdown for long
    thread = threading.Thread(target=server.run, name="uvicorn-web-streams", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    token = settings.admin_token_file.read_text().strip()
    try:
        yield Live(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"})
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def events(resp: httpx.Response) -> Iterator[tuple[str, str | None, Any]]:
    """(event, id, data) of a server-sent event stream, as they arrive."""
    name, event_id, data = "message", None, []
    for line in resp.iter_lines():
        if not line:
            if data:
                yield name, event_id, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_the_page_is_served_at_the_root_with_a_policy_that_allows_no_other_origin(live: Live) -> None:
    with httpx.Client(base_url=live.url) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self';" in csp
        assert "unsafe-eval" not in csp and "http" not in csp and "*" not in csp
        assert "frame-ancestors 'none'" in csp
        assert '<script type="module" src="/web/app.js">' in page.text and "<script>" not in page.text
        js = client.get("/web/app.js")
        assert js.headers["content-type"].startswith("text/javascript") and js.headers["content-security-policy"] == csp
        again = client.get("/web/app.js", headers={"If-None-Match": js.headers["etag"]})
        assert again.status_code == 304
        missing = client.get("/web/..%2Fapp.py")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert client.get("/docs").status_code == 200  # the API keeps its paths
        assert "/" not in client.get("/openapi.json").json()["paths"]


def test_the_runtimes_stream_sends_a_snapshot_then_each_change_live(live: Live) -> None:
    with live.client() as api:
        rt = api.post("/runtimes", json={"environment": "python3", "name": "watched"}).json()
        with api.stream("GET", "/runtimes/events") as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            stream = events(resp)
            kind, _, snapshot = next(stream)
            assert kind == "snapshot" and [r["name"] for r in snapshot] == ["watched"]
            assert snapshot[0]["state"] == "stopped" and snapshot[0]["state_color"] == "gray"
            assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
            states = []
            for kind, _, data in stream:
                assert kind == "runtime" and data["id"] == rt["id"]
                if data["state"] != (states[-1] if states else "stopped"):
                    states.append(data["state"])
                if data["state"] == "running":
                    break
            assert states[-1] == "running", states
            assert api.delete(f"/runtimes/{rt['id']}").status_code == 204
            for kind, _, data in stream:
                if kind == "removed":
                    assert data == {"id": rt["id"]}
                    break


def test_the_runtimes_stream_needs_a_token(live: Live) -> None:
    with httpx.Client(base_url=live.url) as client:
        resp = client.get("/runtimes/events")
        assert resp.status_code == 401 and "error" in resp.json()


def test_the_log_stream_follows_the_runner_log_and_resumes_after_the_last_line_seen(live: Live) -> None:
    with live.client() as api:
        rt = api.post("/runtimes", json={"environment": "python3", "name": "logged"}).json()
        seen: list[tuple[str | None, Any]] = []
        with api.stream("GET", f"/runtimes/{rt['id']}/log/events") as resp:
            stream = events(resp)
            kind, first_id, first = next(stream)
            assert kind == "entry" and first["state"] == "stopped" and first_id is not None
            api.post(f"/runtimes/{rt['id']}/start")
            for _kind, event_id, data in stream:
                seen.append((event_id, data))
                if data["state"] == "running":
                    break
        assert [d["state"] for _, d in seen if d["state"]] == ["booting", "running"]
        assert [int(i) for i, _ in seen] == sorted(int(i) for i, _ in seen)
        # A client that saw the first line gets only what came after it.
        with api.stream("GET", f"/runtimes/{rt['id']}/log/events", headers={"Last-Event-ID": first_id}) as resp:
            stream = events(resp)
            resumed = [next(stream) for _ in seen]
        assert [(i, d) for _, i, d in resumed] == seen
        missing = api.get("/runtimes/rt_nope/log/events")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "runtime_not_found"


def test_the_runtimes_stream_shows_team_runtimes_to_members_only_and_drops_them_for_a_removed_member(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("api.deps.CALLER_TTL", 0.0)  # teams read again at each wake-up, not after 5 s
    with live.client() as admin:
        tokens = {n: admin.post("/users", json={"name": n}).json()["token"] for n in ("alice", "carol", "bob")}
    people = {
        n: httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {t}"}, timeout=10)
        for n, t in tokens.items()
    }
    with people["alice"] as alice, people["carol"] as carol, people["bob"] as bob:
        assert alice.post("/teams", json={"name": "acme"}).status_code == 201
        assert alice.post("/teams/acme/members", json={"user": "carol", "role": "member"}).status_code == 200
        body = {"environment": "python3", "name": "shared", "team": "acme"}
        rt = alice.post("/runtimes", json=body).json()
        with bob.stream("GET", "/runtimes/events") as resp:
            kind, _, snapshot = next(events(resp))
            assert kind == "snapshot" and snapshot == []
        with carol.stream("GET", "/runtimes/events") as resp:
            stream = events(resp)
            kind, _, snapshot = next(stream)
            assert kind == "snapshot" and [(r["name"], r["team"]) for r in snapshot] == [("shared", "acme")]
            assert alice.delete("/teams/acme/members/carol").status_code == 204
            assert alice.post("/runtimes", json={"environment": "python3", "name": "wake"}).status_code == 201
            kind, _, data = next(stream)  # at the next wake-up (a change of runtimes, or a sweep)
            assert (kind, data) == ("removed", {"id": rt["id"]})
