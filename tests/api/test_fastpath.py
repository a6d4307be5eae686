"""The fast path for running a cell (api/fastpath.py) answers exactly as the route does.

The first request with a token goes through FastAPI's route (the token is looked up and
cached); later ones take the fast path. Both must give the same answers, the same errors,
and leave unusual requests to the route.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from api.fastpath import _wait
from tests.api.conftest import ApiHarness


def _runtime(api: ApiHarness) -> str:
    rid: str = api.create_runtime("fast")["id"]
    api.post(f"/runtimes/{rid}/start")
    assert api.wait_for(rid, {"running", "error"}).state == "running"
    return rid


def _cell(api: ApiHarness, rid: str, body: Any, query: str = "?wait=10", **kw: Any) -> Any:
    return api.post(f"/runtimes/{rid}/executions{query}", json=body, **kw)


def _slow(api: ApiHarness) -> None:
    """Forget cached tokens: the next request goes through the route."""
    api.app.state.callers._entries.clear()


def test_a_cell_answers_the_same_through_the_route_and_the_fast_path(api: ApiHarness) -> None:
    rid = _runtime(api)
    _slow(api)
    before = api.app.state.fast_cells
    routed = _cell(api, rid, {"code": "x = 20\nx + 1"})
    assert api.app.state.fast_cells == before, "an uncached token must go through the route"
    fast = _cell(api, rid, {"code": "x + 22"})
    assert api.app.state.fast_cells == before + 1, "a cached token takes the fast path"

    assert routed.status_code == fast.status_code == 202
    assert routed.headers["content-type"] == fast.headers["content-type"] == "application/json"
    a, b = routed.json(), fast.json()
    assert a.keys() == b.keys()
    assert a["status"] == b["status"] == "ok"
    assert a["outputs"][0]["data"]["text/plain"] == "21"
    assert b["outputs"][0]["data"]["text/plain"] == "42"  # same namespace: x survived
    assert b["seq"] == a["seq"] + 1 and b["runtime_id"] == a["runtime_id"] == rid
    for key in ("created_at", "started_at", "finished_at"):
        assert a[key].endswith(("Z", "+00:00")) == b[key].endswith(("Z", "+00:00")), key
    # what the fast path answered is what the execution's own page says
    stored = api.get(f"/executions/{b['id']}").json()
    assert stored == b


def test_without_wait_the_fast_path_answers_queued_and_the_cell_still_runs(api: ApiHarness) -> None:
    rid = _runtime(api)
    _cell(api, rid, {"code": "1"})  # caches the token
    before = api.app.state.fast_cells
    resp = _cell(api, rid, {"code": "import time; time.sleep(0.3); 'late'"}, query="")
    assert resp.status_code == 202 and api.app.state.fast_cells == before + 1
    body = resp.json()
    assert body["status"] in ("queued", "running") and body["finished_at"] is None
    done = api.get(f"/executions/{body['id']}?wait=10").json()
    assert done["status"] == "ok" and done["outputs"][0]["data"]["text/plain"] == "'late'"


@pytest.mark.parametrize(
    ("body", "query", "field"),
    [
        ({"cod": "1"}, "?wait=5", "code"),
        ({"code": "1", "language": "cobol"}, "?wait=5", "language"),
        ({"code": "1", "timeout": -1}, "?wait=5", "timeout"),
        ({"code": "1"}, "?wait=31", "wait"),
        ({"code": "1"}, "?wait=soon", "wait"),
        ({"code": "1"}, "?wait=5&wait=6", None),
    ],
)
def test_unusual_requests_get_the_routes_answer(
    api: ApiHarness, body: dict[str, Any], query: str, field: str | None
) -> None:
    rid = _runtime(api)
    _cell(api, rid, {"code": "1"})  # caches the token
    fast = _cell(api, rid, body, query=query)
    _slow(api)
    routed = _cell(api, rid, body, query=query)
    assert fast.status_code == routed.status_code
    assert fast.json()["error"] == routed.json()["error"] if fast.status_code >= 400 else True
    if field is not None:
        assert fast.status_code == 422
        assert fast.json()["error"]["details"]["field"] == field


def test_errors_from_the_runner_have_the_same_envelope_on_both_paths(api: ApiHarness) -> None:
    rid = _runtime(api)
    _cell(api, rid, {"code": "1"})
    before = api.app.state.fast_cells
    fast = _cell(api, "rt_doesnotexist00000", {"code": "1"})
    assert api.app.state.fast_cells == before + 1
    _slow(api)
    routed = _cell(api, "rt_doesnotexist00000", {"code": "1"})
    assert fast.status_code == routed.status_code == 404
    assert fast.json() == routed.json()
    assert fast.json()["error"]["code"] == "runtime_not_found"


def test_another_users_runtime_is_invisible_on_the_fast_path(api: ApiHarness, other_headers: dict[str, str]) -> None:
    rid = _runtime(api)
    api.post(f"/runtimes/{rid}/executions", json={"code": "1"}, headers=other_headers)  # caches bob
    before = api.app.state.fast_cells
    resp = api.post(f"/runtimes/{rid}/executions?wait=5", json={"code": "'secret'"}, headers=other_headers)
    assert api.app.state.fast_cells == before + 1
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "runtime_not_found"


def test_a_body_that_is_not_json_or_too_big_goes_to_the_route(api: ApiHarness) -> None:
    rid = _runtime(api)
    _cell(api, rid, {"code": "1"})
    before = api.app.state.fast_cells
    resp = api.post(
        f"/runtimes/{rid}/executions", content=b"{not json", headers={**api.headers, "content-type": "application/json"}
    )
    assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == "body"
    huge = _cell(api, rid, {"code": "x" * (1024 * 1024 + 1)})
    assert huge.status_code == 422 and huge.json()["error"]["details"]["field"] == "code"
    assert api.app.state.fast_cells == before, "neither may run through the fast path"


def test_no_token_or_an_unknown_token_is_401_as_before(api: ApiHarness) -> None:
    rid = _runtime(api)
    assert api.post(f"/runtimes/{rid}/executions", json={"code": "1"}, headers={}).status_code == 401
    bad = {"Authorization": "Bearer envctl_not_a_token"}
    assert api.post(f"/runtimes/{rid}/executions", json={"code": "1"}, headers=bad).status_code == 401


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", 0.0),
        (b"wait=0", 0.0),
        (b"wait=2.5", 2.5),
        (b"wait=30", 30.0),
        (b"wait=31", None),
        (b"wait=-1", None),
        (b"wait=nan", None),
        (b"wait=inf", None),
        (b"wait=", None),
        (b"wait=1&x=2", None),
        (b"wait=%31", None),
        (b"other=1", None),
    ],
)
def test_the_wait_parameter_is_taken_only_when_plain(query: bytes, expected: float | None) -> None:
    assert _wait(query) == expected


def test_cells_sent_at_once_to_an_idle_worker_keep_their_order_and_state(api: ApiHarness) -> None:
    """After the first cell, the runtime's worker is idle and connected, so submit sends the
    next cells to the agent itself; they must still run one after another, in order."""
    rid = _runtime(api)
    assert _cell(api, rid, {"code": "n = 0"}).json()["status"] == "ok"
    manager = api.runner.cells
    before = manager.sent_at_once
    for i in range(1, 21):
        # a client quick enough can find the worker still recording the cell before (then the
        # worker sends it): wait until it is idle, which is what this test is about
        _until_idle(api, rid)
        body = _cell(api, rid, {"code": "n += 1\nn"}).json()
        assert body["status"] == "ok" and body["outputs"][0]["data"]["text/plain"] == str(i)
    assert manager.sent_at_once - before == 20, "a cell for an idle, connected worker skips its wake-up"
    # cells submitted without waiting still run in order, one at a time
    ids = [
        _cell(api, rid, {"code": f"order = globals().get('order', []) + [{i}]"}, query="").json()["id"]
        for i in range(5)
    ]
    last = api.get(f"/executions/{ids[-1]}?wait=10").json()
    assert last["status"] == "ok"
    assert _cell(api, rid, {"code": "order"}).json()["outputs"][0]["data"]["text/plain"] == "[0, 1, 2, 3, 4]"


def test_a_cell_sent_at_once_can_be_interrupted_and_the_state_stays(api: ApiHarness) -> None:
    rid = _runtime(api)
    assert _cell(api, rid, {"code": "kept = 'yes'"}).json()["status"] == "ok"
    manager = api.runner.cells
    _until_idle(api, rid)
    before = manager.sent_at_once
    long = _cell(api, rid, {"code": "import time\nfor _ in range(600): time.sleep(0.05)"}, query="").json()
    assert manager.sent_at_once == before + 1
    deadline = time.monotonic() + 10
    while api.get(f"/executions/{long['id']}").json()["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.post(f"/executions/{long['id']}/interrupt").status_code == 202
    done = api.get(f"/executions/{long['id']}?wait=15").json()
    assert done["status"] == "interrupted"
    assert _cell(api, rid, {"code": "kept"}).json()["outputs"][0]["data"]["text/plain"] == "'yes'"


def _until_idle(api: ApiHarness, rid: str, timeout: float = 10) -> None:
    """Until the runtime's worker has recorded its last cell and waits for the next."""
    deadline = time.monotonic() + timeout
    while api.runner.cells.is_busy(rid):
        assert time.monotonic() < deadline, "the worker never went idle"
        time.sleep(0.005)
