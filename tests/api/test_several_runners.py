"""Several runners on one PostgreSQL (R36): two real `envctl serve` processes, each with its own
runner name and data directory, sharing one database.

Each owns the runtimes it boots and leaves the other's alone; both list every runtime with
its owner and whether that owner is alive; an action on the other's runtime is a 409 naming
the owner; a runner that stops beating has its runtimes shown as unreachable, never deleted;
cells submitted by many clients at once get distinct numbers and run once, in order; a
runtime deleted through one server is a 404 on the other. The fake backend runs the
runtimes (each server has its own); the database, the processes and HTTP are real.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.dbschema import upgrade
from envs.kit.db import Database
from envs.service import NewVersion, register_version
from tests.conftest import TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import PostgresCluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _prepared_database(postgres: PostgresCluster) -> str:
    url = postgres.create_database("runners_" + uuid.uuid4().hex[:12])
    upgrade(url)
    db = Database(url)
    try:
        with db.session() as s:  # stand-ins for base images: the fake engine runs any image
            bash, _ = register_version(s, NewVersion(environment="bash", image_id="sha256:" + "a" * 64, image_ref="b"))
            register_version(
                s, NewVersion(environment="python3", image_id="sha256:" + "b" * 64, image_ref="p", parent=bash)
            )
    finally:
        db.dispose()
    return url


def _server(tmp_path: Path, url: str, name: str) -> Server:
    srv = Server(
        tmp_path / name,
        env={
            "ENVCTL_DATABASE_URL": url,
            "ENVCTL_RUNNER_NAME": name,
            "ENVCTL_RUNNER_BACKEND": "fake",
            "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.2",
            "ENVCTL_RUNNER_HEARTBEAT_INTERVAL": "0.3",
            "ENVCTL_RUNNER_STALE_AFTER": "2",
        },
    )
    srv.data_dir.mkdir(parents=True)
    srv.start()
    return srv


@pytest.fixture
def pair(postgres: PostgresCluster, tmp_path: Path) -> Iterator[tuple[Server, Server, str]]:
    """Servers "a" and "b" on one database; the admin token (written by the first)."""
    url = _prepared_database(postgres)
    a = _server(tmp_path, url, f"a-{TEST_SESSION}")
    b = _server(tmp_path, url, f"b-{TEST_SESSION}")
    token = (a.data_dir / "admin-token").read_text().strip()
    try:
        yield a, b, token
    finally:
        for srv in (a, b):
            srv.stop()


def _running(srv: Server, client: httpx.Client, name: str) -> dict[str, Any]:
    rt = client.post("/runtimes", json={"name": name, "environment": "python3"})
    assert rt.status_code == 201, rt.text
    assert client.post(f"/runtimes/{rt.json()['id']}/start").status_code == 202
    return srv.wait_state(client, rt.json()["id"], {"running"}, timeout=30)


def test_each_server_lists_every_runtime_with_its_owner_and_refuses_to_act_on_the_others(
    pair: tuple[Server, Server, str],
) -> None:
    a, b, token = pair
    with a.client(token) as ca, b.client(token) as cb:
        mine = _running(a, ca, "on-a")
        theirs = _running(b, cb, "on-b")
        for client in (ca, cb):
            listed = {r["name"]: r for r in client.get("/runtimes").json()}
            assert listed["on-a"]["runner"] == a.env["ENVCTL_RUNNER_NAME"]
            assert listed["on-b"]["runner"] == b.env["ENVCTL_RUNNER_NAME"]
            assert listed["on-a"]["runner_alive"] and listed["on-b"]["runner_alive"]
        assert cb.get(f"/runtimes/{mine['id']}").json()["unreachable"].startswith("runtime 'on-a' belongs to runner")
        assert ca.get(f"/runtimes/{mine['id']}").json()["unreachable"] is None
        runners = {r["name"]: r for r in ca.get("/runners").json()}
        assert runners[a.env["ENVCTL_RUNNER_NAME"]]["alive"] and runners[b.env["ENVCTL_RUNNER_NAME"]]["alive"]

        for method, path, body in [
            ("POST", f"/runtimes/{mine['id']}/stop", None),
            ("POST", f"/runtimes/{mine['id']}/start", None),
            ("POST", f"/runtimes/{mine['id']}/reset", None),
            ("POST", f"/runtimes/{mine['id']}/executions", {"code": "1"}),
            ("POST", f"/runtimes/{mine['id']}/save", {"environment": "taken"}),
            ("PATCH", f"/runtimes/{mine['id']}", {"machine_type": "medium"}),
            ("GET", f"/runtimes/{mine['id']}/changes", None),
            ("DELETE", f"/runtimes/{mine['id']}", None),
        ]:
            resp = cb.request(method, path, json=body)
            assert resp.status_code == 409, (method, path, resp.text)
            error = resp.json()["error"]
            assert error["code"] == "runtime_owned_elsewhere"
            assert a.env["ENVCTL_RUNNER_NAME"] in error["message"]
            assert error["details"]["runner"] == a.env["ENVCTL_RUNNER_NAME"]
        # nothing happened to it, and each still runs its own
        time.sleep(1.0)  # several housekeeping rounds of both
        assert ca.get(f"/runtimes/{mine['id']}").json()["state"] == "running"
        assert cb.get(f"/runtimes/{theirs['id']}").json()["state"] == "running"
        cell = ca.post(f"/runtimes/{mine['id']}/executions", params={"wait": 20}, json={"code": "6 * 7"}).json()
        assert cell["status"] == "ok" and cell["outputs"][0]["data"]["text/plain"] == "42"


def test_a_runner_that_stops_beating_has_its_runtimes_shown_unreachable_and_kept(
    pair: tuple[Server, Server, str],
) -> None:
    a, b, token = pair
    with a.client(token) as ca, b.client(token) as cb:
        mine = _running(a, ca, "on-a")
        a.kill()  # SIGKILL: no goodbye; its heartbeat goes stale
        deadline = time.monotonic() + 15
        while True:
            seen = cb.get(f"/runtimes/{mine['id']}").json()
            if not seen["runner_alive"]:
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.2)
        assert seen["state"] == "running", "the row is never changed by another runner"
        assert "has not been heard from" in seen["unreachable"]
        resp = cb.post(f"/runtimes/{mine['id']}/stop")
        assert resp.status_code == 409 and "has not been heard from" in resp.json()["error"]["message"]
        assert [r["id"] for r in cb.get("/runtimes").json()] == [mine["id"]]
        # the runner comes back: others see it alive again (adopting its containers after a
        # restart is R11, tested on Docker: the fake engine lives in the process that died)
        a.start()
        deadline = time.monotonic() + 10
        while not cb.get(f"/runtimes/{mine['id']}").json()["runner_alive"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_runner_stopped_cleanly_is_shown_stopped_at_once(pair: tuple[Server, Server, str]) -> None:
    a, b, token = pair
    with a.client(token) as ca, b.client(token) as cb:
        mine = _running(a, ca, "on-a")
        a.stop()
        seen = cb.get(f"/runtimes/{mine['id']}").json()
        assert not seen["runner_alive"] and "stopped at" in seen["unreachable"], seen


def test_cells_from_many_clients_at_once_run_once_in_order_with_distinct_numbers(
    pair: tuple[Server, Server, str],
) -> None:
    """R36: while the other runner reconciles (every 0.2 s), many clients submit to one runtime."""
    a, b, token = pair
    with a.client(token) as ca:
        rid = _running(a, ca, "busy")["id"]
        assert ca.post(f"/runtimes/{rid}/executions", params={"wait": 20}, json={"code": "ran = []"}).status_code == 202
    statuses: list[int] = []
    submitted: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with a.client(token) as c:
            for j in range(10):
                resp = c.post(f"/runtimes/{rid}/executions", json={"code": f"ran.append('{i}-{j}')"})
                with lock:
                    statuses.append(resp.status_code)
                    if resp.status_code == 202:
                        submitted.append(resp.json())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [202] * 80, sorted(set(statuses))
    seqs = [e["seq"] for e in submitted]
    assert len(set(seqs)) == 80 and min(seqs) == 2 and max(seqs) == 81
    with a.client(token) as ca:
        last = max(submitted, key=lambda e: e["seq"])
        assert ca.get(f"/executions/{last['id']}", params={"wait": 30}).json()["status"] == "ok"
        ran = ca.post(f"/runtimes/{rid}/executions", params={"wait": 20}, json={"code": "ran"}).json()
        assert ran["status"] == "ok", ran
        order = [e["code"].split("'")[1] for e in sorted(submitted, key=lambda e: e["seq"])]
        assert ran["outputs"][0]["data"]["text/plain"] == repr(order), "each cell once, in the order of its number"
        for e in submitted:
            assert ca.get(f"/executions/{e['id']}").json()["status"] == "ok"


def test_a_runtime_deleted_through_one_server_is_a_404_on_the_other(pair: tuple[Server, Server, str]) -> None:
    a, b, token = pair
    with a.client(token) as ca, b.client(token) as cb:
        rid = _running(a, ca, "gone")["id"]
        assert cb.get(f"/runtimes/{rid}").status_code == 200
        assert ca.delete(f"/runtimes/{rid}").status_code == 204
        for method, path, body in [
            ("GET", f"/runtimes/{rid}", None),
            ("POST", f"/runtimes/{rid}/executions", {"code": "1"}),
            ("POST", f"/runtimes/{rid}/executions?wait=1", {"code": "1"}),
            ("POST", f"/runtimes/{rid}/start", None),
            ("GET", f"/runtimes/{rid}/log", None),
        ]:
            for client in (ca, cb):
                resp = client.request(method, path, json=body)
                assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
                assert resp.json()["error"]["code"] == "runtime_not_found"


def test_a_second_server_with_a_runner_name_in_use_is_refused_naming_the_holder(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    url = _prepared_database(postgres)
    name = f"twin-{TEST_SESSION}"
    first = _server(tmp_path, url, name)
    try:
        twin = Server(tmp_path / "twin", env={**first.env})
        twin.data_dir.mkdir()
        with pytest.raises(RuntimeError) as info:
            twin.start(timeout=20)
        assert f"the runner name {name!r} is in use by a live envctl" in str(info.value)
        assert "ENVCTL_RUNNER_NAME" in str(info.value)
        assert "Traceback" not in str(info.value)
    finally:
        first.stop()
