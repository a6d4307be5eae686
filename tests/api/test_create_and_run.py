"""Create-and-run: ``POST /runtimes?wait=N`` with a first cell answers with the runtime and
the finished execution, in one request (the fake backend: the real agent, no Docker)."""

from __future__ import annotations

from tests.api.conftest import ApiHarness


def test_create_with_a_cell_answers_with_the_finished_execution(api: ApiHarness) -> None:
    resp = api.post(
        "/runtimes?wait=20",
        json={"environment": "python3", "name": "nb", "cell": {"code": "print(6 * 7)", "language": "python"}},
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["state"] == "running"
    ex = body["execution"]
    assert ex["status"] == "ok"
    assert ex["runtime_id"] == body["id"]
    assert "".join(o.get("text", "") for o in ex["outputs"]) == "42\n"
    # the same execution the executions API shows
    again = api.get(f"/executions/{ex['id']}").json()
    assert again["status"] == "ok" and again["seq"] == ex["seq"]


def test_create_with_a_cell_and_no_wait_answers_at_once_with_the_cell_queued(api: ApiHarness) -> None:
    resp = api.post("/runtimes", json={"environment": "python3", "name": "nb", "cell": {"code": "1+1"}})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["execution"]["status"] in ("queued", "running", "ok")
    done = api.get(f"/executions/{body['execution']['id']}?wait=20").json()
    assert done["status"] == "ok"


def test_create_without_a_cell_has_no_execution_and_stays_stopped(api: ApiHarness) -> None:
    body = api.create_runtime("plain")
    assert "execution" not in body  # the answer is the runtime, as GET /runtimes/{id} shows it
    assert body["state"] == "stopped"


def test_a_bad_cell_is_a_422_naming_the_field_and_no_runtime_is_made(api: ApiHarness) -> None:
    resp = api.post("/runtimes", json={"environment": "python3", "name": "nb", "cell": {"code": 1, "lang": "x"}})
    assert resp.status_code == 422, resp.text
    assert "cell" in resp.text
    assert api.runtime_rows() == 0
    resp = api.post("/runtimes?wait=99", json={"environment": "python3", "name": "nb", "cell": {"code": "1"}})
    assert resp.status_code == 422 and "wait" in resp.text
