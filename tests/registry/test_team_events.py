"""``GET /teams/{team}/events``: a team's changes as server-sent events, in order, resumable
with ``Last-Event-ID``, for members only. The app runs under uvicorn (tests/web/test_streams.py's
``live``), so the stream is read over a real socket; versions are registered in the store
directly, the way a save, build or load registers them."""

from __future__ import annotations

from itertools import islice
from typing import Any

import httpx

from api.settings import Settings
from envs.kit.db import Database
from envs.service import NewVersion, Writer, register_version, resolve
from tests.web.test_streams import Live, events, live  # noqa: F401


def _user(client: httpx.Client, name: str) -> dict[str, str]:
    made = client.post("/users", json={"name": name})
    assert made.status_code == 201, made.text
    return {"Authorization": f"Bearer {made.json()['token']}"}


def _save(settings: Settings, environment: str, message: str) -> None:
    db = Database(settings.effective_database_url)
    try:
        with db.session() as s:
            image = "sha256:" + format(abs(hash((environment, message))), "x").rjust(64, "0")
            new = NewVersion(environment, image, "test/x", parent=resolve(s, "python3@1"), message=message)
            register_version(s, new, Writer("envctl", is_admin=True))
    finally:
        db.dispose()


def _read(client: httpx.Client, team: str, count: int, after: str | None = None) -> list[tuple[str, Any, Any]]:
    headers = {"Last-Event-ID": after} if after else {}
    with client.stream("GET", f"/teams/{team}/events", headers=headers) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        return [(name, event_id, data) for name, event_id, data in islice(events(resp), count)]


def test_a_teams_events_stream_in_order_and_resume_after_the_last_id_seen(live: Live, settings: Settings) -> None:  # noqa: F811
    admin = live.client()
    alice, bob = _user(admin, "alice"), _user(admin, "bob")
    assert admin.post("/teams", headers=alice, json={"name": "acme"}).status_code == 201
    assert admin.post("/teams", headers=bob, json={"name": "beta"}).status_code == 201
    _save(settings, "acme/ml", "first")
    _save(settings, "beta/other", "not acme's")
    _save(settings, "acme/ml", "second")
    with httpx.Client(base_url=live.url, headers=alice, timeout=10) as client:
        assert client.post("/environments/acme/ml@1/publish").status_code == 200
        assert client.delete("/environments/acme/ml@1/publish").status_code == 204
        assert client.delete("/environments/acme/ml@2").status_code == 204

        got = _read(client, "acme", 8)

        assert [(name, data["ref"]) for name, _, data in got] == [
            ("saved", "acme/ml@1"),
            ("tag_moved", "acme/ml:latest"),
            ("saved", "acme/ml@2"),
            ("tag_moved", "acme/ml:latest"),
            ("published", "acme/ml@1"),
            ("unpublished", "acme/ml@1"),
            ("tag_moved", "acme/ml:latest"),  # back to @1 as @2 goes
            ("deleted", "acme/ml@2"),
        ]
        ids = [int(event_id) for _, event_id, _ in got]
        assert ids == sorted(ids) and len(set(ids)) == 8
        assert got[0][2]["message"] == "first" and got[4][2]["by"] == "alice"
        assert got[6][2]["version"] == "acme/ml@1"

        resumed = _read(client, "acme", 3, after=str(ids[4]))  # the three after the publish

        assert [name for name, _, _ in resumed] == ["unpublished", "tag_moved", "deleted"]
        assert [int(i) for _, i, _ in resumed] == ids[5:]

        # live: a change made while the stream is open arrives on it
        with client.stream("GET", "/teams/acme/events", headers={"Last-Event-ID": str(ids[-1])}) as resp:
            assert client.post("/environments/acme/ml:latest/publish").status_code == 200
            name, _, data = next(events(resp))
            assert (name, data["ref"]) == ("published", "acme/ml:latest")

    with httpx.Client(base_url=live.url, headers=bob, timeout=10) as client:
        refused = client.get("/teams/acme/events")
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "team_not_found"
        assert [data["ref"] for _, _, data in _read(client, "beta", 2)] == ["beta/other@1", "beta/other:latest"]
