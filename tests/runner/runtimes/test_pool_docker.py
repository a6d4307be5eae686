"""The warm pool against real Docker and a real `envctl serve` (issue 17, R41): a pooled
runtime answers its first cell; two users never share a container and each sees only its own
variables and secrets; a secret handed over at claim time is in no container's configuration;
the pool refills; a killed and restarted server adopts its pool, or removes it when the pool is
no longer configured."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from envs.kit.db import Database
from registry.users import create_user, issue_token
from runner.backends.base import LABEL_POOL, LABEL_RUNNER
from runner.models import RuntimeLogEntry
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.cells.test_docker_executions import text
from tests.runner.conftest import remove_runner_containers, start_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]

VALUE = "Pool-s3cret/value+claim=time"


@pytest.fixture
def pool_server(docker: Any, tmp_path: Any) -> Iterator[Server]:
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path / "data", ENVCTL_RUNNER_POOL="python3:small=2")
    yield srv
    remove_runner_containers(docker, srv)


def wait_pool(client: httpx.Client, waiting: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get("/pool").json()
        if sum(t["waiting"] for t in body["targets"]) >= waiting and not any(t["booting"] for t in body["targets"]):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"the pool did not fill to {waiting}: {body}")
        time.sleep(0.1)


def create_and_run(client: httpx.Client, name: str, code: str, **body: Any) -> dict[str, Any]:
    r = client.post(
        "/runtimes", params={"wait": 30}, json={"environment": "python3", "name": name, "cell": {"code": code}, **body}
    )
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


def pool_containers(docker: Any, srv: Server) -> set[str]:
    runner = srv.env["ENVCTL_RUNNER_NAME"]
    return {
        c.name for c in docker.containers.list(all=True, filters={"label": [f"{LABEL_RUNNER}={runner}", LABEL_POOL]})
    }


def test_pooled_runtimes_answer_their_first_cell_are_never_shared_and_get_secrets_at_claim(
    pool_server: Server, docker: Any
) -> None:
    db = Database(f"sqlite:///{pool_server.data_dir / 'envctl.db'}")
    with db.session() as s:
        bob_token = issue_token(s, create_user(s, "bob"), "tests")
    db.dispose()
    with pool_server.client() as alice, pool_server.client(bob_token) as bob:
        assert alice.post("/teams", json={"name": "acme"}).status_code == 201
        assert alice.put("/teams/acme/secrets/db-pass", json={"value": VALUE}).status_code == 201
        waiting = {e["container"] for e in wait_pool(alice, 2)["entries"]}
        code = "import os; print(os.environ.get('WHO'), os.environ.get('PW'), os.environ.get('ONLY_BOB'))"
        a = create_and_run(alice, "a", code, env={"WHO": "alice", "PW": {"secret": "acme/db-pass"}})
        b = create_and_run(bob, "b", code, env={"WHO": "bob", "ONLY_BOB": "yes"})
        assert a["origin"] == b["origin"] == "pool", (a, b)
        assert text(a["execution"]) == f"alice {VALUE} None\n"
        assert text(b["execution"]) == "bob None yes\n"
        # the secret's file too, on the tmpfs
        r = alice.post(
            f"/runtimes/{a['id']}/executions",
            params={"wait": 30},
            json={"code": "print(open('/run/secrets/db-pass').read())"},
        )
        assert text(r.json()) == VALUE + "\n"
        names = {}
        for rt in (a, b):
            log = (
                alice.get(f"/runtimes/{rt['id']}/log").json()
                if rt is a
                else bob.get(f"/runtimes/{rt['id']}/log").json()
            )
            claimed = [e for e in log if e["event"] == "claimed-from-pool"]
            assert claimed, log
            names[rt["id"]] = claimed[0]["message"].split("container ")[1].split(",")[0]
        assert names[a["id"]] != names[b["id"]] and set(names.values()) <= waiting
        ids = {docker.containers.get(n).id for n in names.values()}
        assert len(ids) == 2
        for n in names.values():  # R6 for a claimed container: nothing of the claim in its configuration
            attrs = json.dumps(docker.api.inspect_container(n))
            for secret in (VALUE, "alice", "ONLY_BOB"):
                assert secret not in attrs, (n, secret)
        # the pool refills, with new containers
        refilled = {e["container"] for e in wait_pool(alice, 2)["entries"]}
        assert len(refilled) == 2 and not refilled & set(names.values())
        # stopping a claimed runtime removes its container; it never goes back to the pool
        assert alice.post(f"/runtimes/{a['id']}/stop", params={"wait": 30}).json()["state"] == "stopped"
        assert names[a["id"]] not in {c.name for c in docker.containers.list(all=True)}
        assert names[a["id"]] not in {e["container"] for e in alice.get("/pool").json()["entries"]}


def test_a_killed_server_adopts_its_pool_and_one_without_a_pool_removes_it(pool_server: Server, docker: Any) -> None:
    with pool_server.client() as client:
        before = {e["container"] for e in wait_pool(client, 2)["entries"]}
    assert before == pool_containers(docker, pool_server)
    pool_server.kill()
    pool_server.start()
    with pool_server.client() as client:
        after = {e["container"] for e in wait_pool(client, 2)["entries"]}
        assert after == before  # adopted, not booted again
        rt = create_and_run(client, "after-restart", "print(3 * 3)")
        assert rt["origin"] == "pool" and text(rt["execution"]) == "9\n"
        claimed = next(e for e in client.get(f"/runtimes/{rt['id']}/log").json() if e["event"] == "claimed-from-pool")
    # a restart keeps the claimed runtime (its container is named after the pool entry)
    pool_server.kill()
    del pool_server.env["ENVCTL_RUNNER_POOL"]
    pool_server.start()
    with pool_server.client() as client:
        deadline = time.monotonic() + 30
        while client.get("/pool").json()["entries"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/pool").json()["entries"] == []
        again = client.post(f"/runtimes/{rt['id']}/executions", params={"wait": 30}, json={"code": "print('still')"})
        assert text(again.json()) == "still\n"
        assert client.get(f"/runtimes/{rt['id']}").json()["state"] == "running"
    left = pool_containers(docker, pool_server)
    name = claimed["message"].split("container ")[1].split(",")[0]
    assert left == {name}, (left, name)  # the waiting ones removed, the claimed one the runtime's


def wait_hot(client: httpx.Client, version: str, boots: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get("/pool").json()
        t = next((t for t in body["targets"] if t["version"] == version), None)
        if t is not None and t["why"] == f"hot: {boots} boots in the last hour" and t["waiting"] == t["count"]:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"no warm container for {version} after {boots} boots: {body}")
        time.sleep(0.1)


def boot_and_stop(client: httpx.Client, name: str, environment: str = "python3") -> dict[str, Any]:
    rt = create_and_run(client, name, "print(6 * 7)", environment=environment)
    assert text(rt["execution"]) == "42\n", rt
    assert client.post(f"/runtimes/{rt['id']}/stop", params={"wait": 30}).json()["state"] == "stopped"
    return rt


def test_hot_mode_keeps_the_most_booted_version_warm_within_its_budget_and_removes_it_when_cold(
    docker: Any, tmp_path: Any
) -> None:
    """ENVCTL_RUNNER_POOL_HOT=3g with 2 GiB small containers: room for one. python3 booted
    three times, bash twice: python3 is kept warm, a claim of it is served from the pool, bash
    never gets a container; an hour later (the log's lines moved back) nothing is hot and the
    waiting container is removed."""
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path / "data", images=["bash", "python3"], ENVCTL_RUNNER_POOL_HOT="3g")
    try:
        with srv.client() as client:
            body = client.get("/pool").json()
            assert body["targets"] == [] and body["hot_budget"] == 3 * 1024**3
            for i in range(2):
                assert boot_and_stop(client, f"py{i}")["origin"] == "boot"
            wait_hot(client, "python3@1", 2)
            for i in range(2):
                boot_and_stop(client, f"sh{i}", environment="bash")
            rt = create_and_run(client, "claim", "import os; print(os.getpid() > 0)")
            log = client.get(f"/runtimes/{rt['id']}/log").json()
            assert rt["origin"] == "pool" and text(rt["execution"]) == "True\n", log
            claimed = next(e for e in log if e["event"] == "claimed-from-pool")
            body = wait_hot(client, "python3@1", 3)
            time.sleep(2.0)  # a few more rounds: still only python3, one container
            body = client.get("/pool").json()
            assert [(t["version"], t["count"], t["waiting"]) for t in body["targets"]] == [("python3@1", 1, 1)]
            assert len(body["entries"]) == 1 and body["memory_reserved"] == 2 * 1024**3
            waiting = body["entries"][0]["container"]
            name = claimed["message"].split("container ")[1].split(",")[0]
            assert pool_containers(docker, srv) == {name, waiting}  # the claimed one is the runtime's now
            db = Database(f"sqlite:///{srv.data_dir / 'envctl.db'}")
            try:
                with db.session() as s:
                    s.execute(update(RuntimeLogEntry).values(at=datetime.now(UTC) - timedelta(hours=2)))
                    s.commit()
            finally:
                db.dispose()
            deadline = time.monotonic() + 30
            while (body := client.get("/pool").json())["entries"] or body["targets"]:
                assert time.monotonic() < deadline, body
                time.sleep(0.2)
            while pool_containers(docker, srv) != {name}:  # the entry goes first, then its container
                assert time.monotonic() < deadline, pool_containers(docker, srv)
                time.sleep(0.2)
            again = client.post(f"/runtimes/{rt['id']}/executions", params={"wait": 30}, json={"code": "print('mine')"})
            assert text(again.json()) == "mine\n"
    finally:
        remove_runner_containers(docker, srv)
