"""Leases through the API (fake engine): ``lease`` on create and PATCH, the renewal route, what
``GET /runtimes/{id}`` shows, and the errors a client meets."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest

from envs.kit.clock import utcnow
from runner.models import Runtime
from tests.api.conftest import ApiHarness, AppFactory
from tests.api.test_pool import POOL, _pool, _run


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.mark.parametrize("bad", [0, 4, 86401, -5, 1.5, "soon", True])
def test_a_lease_out_of_range_or_not_whole_seconds_is_422_naming_it(api: ApiHarness, bad: object) -> None:
    resp = api.post("/runtimes", json={"environment": "python3", "name": "bad", "lease": bad})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["details"]["field"] == "lease", err
    assert api.runtime_rows() == 0
    rt = api.create_runtime("good")
    resp = api.patch(f"/runtimes/{rt['id']}", json={"lease": bad})
    assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == "lease", resp.text
    assert api.get(f"/runtimes/{rt['id']}").json()["lease"] is None


def test_a_runtime_made_with_a_lease_shows_it_and_a_renewal_moves_its_end(api: ApiHarness) -> None:
    rt = api.create_runtime(lease=30)
    lease = rt["lease"]
    assert lease["seconds"] == 30 and lease["expired"] is False
    assert _when(lease["expires_at"]) - _when(lease["renewed_at"]) == timedelta(seconds=30)
    assert abs(_when(lease["renewed_at"]) - _when(rt["created_at"])) < timedelta(seconds=1)
    shown = api.get(f"/runtimes/{rt['id']}").json()["lease"]
    assert shown == lease
    assert [r["lease"] for r in api.get("/runtimes").json()] == [lease]

    resp = api.post(f"/runtimes/{rt['id']}/lease")
    assert resp.status_code == 200, resp.text
    renewed = resp.json()
    assert renewed["seconds"] == 30 and renewed["expired"] is False
    assert _when(renewed["expires_at"]) > _when(lease["expires_at"])
    assert _when(renewed["expires_at"]) - _when(renewed["renewed_at"]) == timedelta(seconds=30)
    assert api.get(f"/runtimes/{rt['id']}").json()["lease"] == renewed
    assert not any(e["event"] == "settings-changed" for e in api.log(rt["id"]))  # a heartbeat is no setting


def test_patch_changes_or_drops_the_lease_and_renewing_none_is_409(api: ApiHarness) -> None:
    rt = api.create_runtime(lease=30)
    resp = api.patch(f"/runtimes/{rt['id']}", json={"lease": 120})
    assert resp.status_code == 200, resp.text
    assert resp.json()["lease"]["seconds"] == 120
    resp = api.patch(f"/runtimes/{rt['id']}", json={"lease": None})
    assert resp.status_code == 200 and resp.json()["lease"] is None, resp.text
    notes = [e["message"] for e in api.log(rt["id"]) if e["event"] == "settings-changed"]
    assert any("lease -> 120 s" in n for n in notes) and any("lease dropped" in n for n in notes), notes
    resp = api.post(f"/runtimes/{rt['id']}/lease")
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert "no lease to renew" in err["message"] and err["details"]["field"] == "lease"
    assert api.patch(f"/runtimes/{rt['id']}", json={"name": "other"}).json()["lease"] is None  # untouched


def test_a_team_runtime_with_a_lease_is_422_saying_why(api: ApiHarness) -> None:
    assert api.post("/teams", json={"name": "acme"}).status_code == 201
    resp = api.post("/runtimes", json={"environment": "python3", "name": "shared", "team": "acme", "lease": 30})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["details"]["field"] == "lease" and "shared with its members" in err["message"]


def test_renewing_another_users_or_a_missing_runtime_is_404(api: ApiHarness, other_headers: dict[str, str]) -> None:
    rt = api.create_runtime(lease=30)
    assert api.post(f"/runtimes/{rt['id']}/lease", headers=other_headers).status_code == 404
    assert api.post("/runtimes/rt_nope/lease").status_code == 404


def test_a_lease_that_ran_out_is_409_and_housekeeping_deletes_the_runtime(make_api: AppFactory) -> None:
    api = make_api(runner_idle_check_interval=3600)  # the round is run by hand below
    rt = api.create_runtime(lease=5)
    assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
    api.wait_for(rt["id"], {"running"})
    assert len(api.containers(rt["id"])) == 1
    expires = _when(rt["lease"]["expires_at"])
    time.sleep(max(0.0, (expires - utcnow()).total_seconds()) + 0.2)
    shown = api.get(f"/runtimes/{rt['id']}").json()["lease"]
    assert shown["expired"] is True
    resp = api.post(f"/runtimes/{rt['id']}/lease")
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["code"] == "lease_expired" and "being stopped and deleted" in err["message"]
    assert api.patch(f"/runtimes/{rt['id']}", json={"lease": None}).status_code == 409
    assert api.runner.end_leases() == [rt["id"]]
    assert api.get(f"/runtimes/{rt['id']}").status_code == 404
    assert api.containers(rt["id"]) == []


def test_a_runtime_served_from_the_warm_pool_holds_its_lease_and_goes_with_its_container(
    make_api: AppFactory,
) -> None:
    """Create-and-run with a lease, served from the pool: the claimed container is the
    runtime's, so it goes when the lease runs out; the pool's waiting containers stay."""
    api = make_api(runner_pool=POOL, runner_idle_check_interval=0.2)
    _pool(api, 2)
    rt = _run(api, "pooled", "print('hi')", lease=5)
    assert rt["origin"] == "pool" and rt["lease"]["seconds"] == 5, rt
    with api.db.session() as s:
        row = s.get(Runtime, rt["id"])
        assert row is not None
        container, name = dict(row.backend_state)["container_id"], dict(row.backend_state)["container_name"]
    assert container in api.engine
    deadline = time.monotonic() + 5 + 10
    while api.get(f"/runtimes/{rt['id']}").status_code != 404:
        assert time.monotonic() < deadline, "the pooled runtime outlived its lease"
        time.sleep(0.1)
    assert container not in api.engine
    body = _pool(api, 2)  # refilled with new containers; the claimed one never goes back
    assert name not in {e["container"] for e in body["entries"]}
