"""Apps served by several runners of one installation: two real ``envctl serve`` processes on the
Docker engine, each with its own runner name and data directory, sharing one PostgreSQL, the
secrets key (``ENVCTL_SECRETS_KEY_FILE``, as team secrets need) and the object store (the suite's
S3 server: a bundle uploaded through one is read by the other), both told to serve team acme's
apps. A deployment of two instances is placed one on each; either server's gateway answers from
both."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_apps_docker import SERVER_CELL, Env, app_notebook, write_notebook
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.s3 import S3Endpoint, start_s3
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import PostgresCluster, base_image

pytestmark = [pytest.mark.docker, pytest.mark.s3, pytest.mark.postgres, pytest.mark.slow]

BUCKET = "envctl-apps-runners"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from start_s3()


@pytest.fixture(scope="module")
def pair(
    docker: Any, postgres: PostgresCluster, s3: S3Endpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Env, Env]]:
    import boto3

    base_image(docker, "python3")
    boto3.client(
        "s3", endpoint_url=s3.url, region_name=s3.region, aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
    ).create_bucket(Bucket=BUCKET)  # fmt: skip
    root = tmp_path_factory.mktemp("apps-runners")
    url = postgres.create_database("apps_" + uuid.uuid4().hex[:12])
    prepare_data_dir(root / "a", ["python3"], database_url=url)
    shared = {
        "ENVCTL_DATABASE_URL": url,
        "ENVCTL_SECRETS_KEY_FILE": str(root / "secrets.key"),
        "ENVCTL_RESULTS_STORE": "s3",
        "ENVCTL_RESULTS_S3_BUCKET": BUCKET,
        "ENVCTL_RESULTS_S3_ENDPOINT_URL": s3.url,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "ENVCTL_RUNNER_LABELS": f"{TEST_LABEL}={TEST_SESSION}",
        "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.5",
        "ENVCTL_RUNNER_HEARTBEAT_INTERVAL": "0.5",
        "ENVCTL_RUNNER_APP_TEAMS": "acme",
    }
    names = [f"test-{TEST_SESSION}-apps-{side}-{uuid.uuid4().hex[:4]}" for side in "ab"]
    servers = []
    try:
        for side, name in zip("ab", names, strict=True):
            (root / side).mkdir(exist_ok=True)
            srv = Server(root / side, env={**shared, "ENVCTL_RUNNER_NAME": name})
            srv.start()
            servers.append(srv)
        admin = (root / "a" / "admin-token").read_text().strip()
        with httpx.Client(base_url=servers[0].url, headers={"Authorization": f"Bearer {admin}"}) as c:
            made = c.post("/users", json={"name": "alice"})
            assert made.status_code == 201, made.text
            tokens = {"admin": admin, "alice": made.json()["token"]}
        with httpx.Client(base_url=servers[0].url, headers={"Authorization": f"Bearer {tokens['alice']}"}) as c:
            assert c.post("/teams", json={"name": "acme"}).status_code == 201
            # the installation's network made once, by one runner: two runners on one engine that
            # make it at the same moment collide ("networks have same bridge name"), which runners
            # on hosts of their own never do
            rt = c.post("/runtimes", json={"name": "first", "environment": "python3"}).json()
            assert c.post(f"/runtimes/{rt['id']}/start").status_code == 202
            servers[0].wait_state(c, rt["id"], {"running"}, timeout=120)
            assert c.delete(f"/runtimes/{rt['id']}").status_code in (200, 202, 204)
        yield Env(servers[0], tokens), Env(servers[1], tokens)
    finally:
        for srv in servers:
            srv.stop()
        for name in names:
            for c in docker.containers.list(all=True, filters={"label": f"envctl.runner={name}"}):
                c.remove(force=True)


def test_a_deployments_instances_are_placed_on_each_runner_that_serves_the_team(
    pair: tuple[Env, Env], tmp_path: Path
) -> None:
    a, b = pair
    done = a.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "app", "spread")), "--team", "acme",
                 "--name", "wide", "--instances", "2")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + a.srv.output()[-3000:] + b.srv.output()[-3000:]
    shown = a.show("wide")
    runners = sorted(i["runner"] for i in shown["running"])
    assert [i["status"] for i in shown["running"]] == ["running", "running"], shown
    assert runners == sorted([a.srv.env["ENVCTL_RUNNER_NAME"], b.srv.env["ENVCTL_RUNNER_NAME"]]), shown
    for env in (a, b):  # either gateway reaches both instances
        with env.client("alice") as c:
            hosts = {c.get("/apps/acme/wide/").json()["env"]["HOSTNAME"] for _ in range(8)}
        assert len(hosts) == 2, hosts
    assert a.cli("alice", "app", "stop", "wide", "--team", "acme").returncode == 0
    with b.client("alice") as c:
        assert c.get("/apps/acme/wide/").status_code == 503


def test_a_deployment_whose_server_dies_while_making_it_is_made_again_and_the_others_instance_given_up(
    pair: tuple[Env, Env], tmp_path: Path
) -> None:
    """The server that took the deployment is killed (SIGKILL) while both instances' cells run;
    started again, it gives up the other server's instance (``abandoned``: that server removes
    it) and its own, and makes the deployment again: two instances in the end, no runtime left
    over of the first attempt."""
    from sqlalchemy import select

    from envs.kit.db import Database
    from runner.apps.models import App, AppDeployment

    a, b = pair
    nb = write_notebook(tmp_path / "slow", ["import time; time.sleep(8)", SERVER_CELL.format(version="again")])
    done = a.cli("alice", "app", "deploy", str(nb), "--team", "acme", "--name", "again", "--instances", "2",
                 "--wait", "0")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 120
    while True:  # both instances taken, their runtimes booted (the slow cell runs)
        seen = a.show("again")["running"]
        if len(seen) == 2 and all(i["runner"] and i["runtime_id"] for i in seen):
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.3)
    db = Database(a.srv.env["ENVCTL_DATABASE_URL"])
    try:
        with db.session() as s:
            holder = s.scalars(
                select(AppDeployment.runner).join(App, App.id == AppDeployment.app_id).where(App.name == "again")
            ).one()
    finally:
        db.dispose()
    dead, other = (a, b) if holder == a.srv.env["ENVCTL_RUNNER_NAME"] else (b, a)
    assert holder == dead.srv.env["ENVCTL_RUNNER_NAME"]
    first = {i["runtime_id"] for i in seen}
    dead.srv.kill()
    dead.srv.start()
    dep = other.wait_deployment("again", 1, {"running", "failed"}, timeout=240)
    assert dep["status"] == "running", (dep, dead.srv.output()[-3000:], other.srv.output()[-3000:])
    shown = other.show("again")["running"]
    assert [i["status"] for i in shown] == ["running", "running"], shown
    assert not first & {i["runtime_id"] for i in shown}, shown  # made again, not the first attempt's
    deadline = time.monotonic() + 60
    while True:  # the first attempt's runtimes go, each by the server that made it
        names = [r["name"] for r in other.runtimes() if r["name"].startswith("app-again-1-")]
        if len(names) == 2:
            break
        assert time.monotonic() < deadline, names
        time.sleep(0.5)
    with other.client("alice") as c:
        assert c.get("/apps/acme/again/").json()["version"] == "again"
