"""Named volumes through the API on the fake engine: yours and your teams', created, listed,
refused while a runtime's mounts name them, and never another team's."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import ApiHarness


def test_volumes_are_created_listed_kept_while_mounted_and_deleted(api: ApiHarness) -> None:
    assert api.post("/teams", json={"name": "volteam"}).status_code == 201
    made = api.post("/volumes", json={"name": "home-data"})
    assert made.status_code == 201, made.text
    assert made.json() == {"name": "home-data", "owner": "you", "created_at": "", "used_by": []}
    assert api.post("/volumes", json={"name": "volteam/shared"}).json()["owner"] == "team volteam"
    assert api.post("/volumes", json={"name": "home-data"}).status_code == 409
    for bad, status in (("Bad Name", 422), ("-x", 422), ("other-team/x", 404), ("a/b/c", 422)):
        resp = api.post("/volumes", json={"name": bad})
        assert resp.status_code == status, (bad, resp.text)
    rt = api.create_runtime("uses", mounts=[{"type": "volume", "name": "volteam/shared", "target": "/data"}])
    rows: list[dict[str, Any]] = api.get("/volumes").json()
    assert [(v["name"], v["used_by"]) for v in rows] == [("home-data", []), ("volteam/shared", ["uses"])]
    resp = api.delete("/volumes/volteam/shared")
    assert resp.status_code == 409 and resp.json()["error"]["details"]["runtimes"] == ["uses"], resp.text
    assert api.delete(f"/runtimes/{rt['id']}").status_code == 204
    assert [v["name"] for v in api.get("/volumes").json()] == ["home-data", "volteam/shared"]  # outlives it
    assert api.delete("/volumes/volteam/shared").status_code == 204
    assert api.delete("/volumes/volteam/shared").status_code == 404
    assert [v["name"] for v in api.get("/volumes").json()] == ["home-data"]


def test_a_runtime_may_not_mount_a_volume_of_a_team_it_does_not_belong_to(api: ApiHarness) -> None:
    resp = api.post(
        "/runtimes",
        json={"environment": "python3", "name": "x", "mounts": [{"type": "volume", "name": "nope/v", "target": "/d"}]},
    )
    assert resp.status_code == 404 and resp.json()["error"]["details"]["field"] == "mounts[0].name", resp.text
