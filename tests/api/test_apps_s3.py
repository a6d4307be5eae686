"""Apps with the results store on S3 (``ENVCTL_RESULTS_STORE=s3``): a real ``envctl serve`` and the
test suite's real HTTP S3 endpoint (moto's server, tests/fixtures/s3.py). The author's client PUTs
the encrypted bundle to a presigned URL of the bucket; the app server GETs it through a presigned
URL (the S3 server's request log shows the signed query), checks it, and runs it. A bundle
changed in the bucket and one encrypted for another team are refused, and nothing runs."""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.apps import bundles
from tests.api.test_apps_docker import Env, app_notebook, serve_apps
from tests.fixtures.s3 import S3Endpoint, start_s3
from tests.fixtures.services import base_image

pytestmark = [pytest.mark.docker, pytest.mark.s3]

BUCKET = "envctl-apps"
PREFIX = "results/"


class _Requests(logging.Handler):
    """The S3 server's request lines (werkzeug logs one per request)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from start_s3()


@pytest.fixture(scope="module")
def client(s3: S3Endpoint) -> Any:
    import boto3

    made = boto3.client(
        "s3",
        endpoint_url=s3.url,
        region_name=s3.region,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
    )
    made.create_bucket(Bucket=BUCKET)
    return made


@pytest.fixture(scope="module")
def requests() -> Iterator[_Requests]:
    handler = _Requests()
    logger = logging.getLogger("werkzeug")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def env(
    docker: Any, s3: S3Endpoint, client: Any, requests: _Requests, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    base_image(docker, "python3")
    extra = {
        "ENVCTL_RESULTS_STORE": "s3",
        "ENVCTL_RESULTS_S3_BUCKET": BUCKET,
        "ENVCTL_RESULTS_S3_ENDPOINT_URL": s3.url,
        "ENVCTL_RESULTS_S3_PREFIX": PREFIX,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
    }
    with serve_apps(docker, tmp_path_factory.mktemp("apps-s3") / "data", extra) as made:
        yield made


def _objects(client: Any) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def _upload(env: Env, who: str, team: str, name: str, folder: Path) -> tuple[str, str, str]:
    """A working app's bundle for ``team``, sealed as the CLI does, PUT to the presigned URL."""
    nb = app_notebook(folder, "theirs")
    files = {"app.ipynb": nb.read_bytes(), "data.txt": b"x"}
    with env.client(who) as c:
        made = c.post(f"/teams/{team}/apps/{name}/bundles").json()
        sealed = bundles.seal(base64.b64decode(made["key"]), made["header"], bundles.pack("app.ipynb", files))
        sha = hashlib.sha256(sealed).hexdigest()
        target = c.post(f"/teams/{team}/apps/{name}/bundles/upload-url", json={"sha256": sha, "size": len(sealed)})
        assert target.status_code == 200, target.text
    assert "Signature=" in target.json()["url"], target.json()  # presigned by S3, not this server
    put = httpx.put(target.json()["url"], content=sealed, headers=target.json()["headers"])
    assert put.status_code == 200, put.text
    return made["bundle_id"], sha, hashlib.sha256(files["app.ipynb"]).hexdigest()


def _deploy(env: Env, name: str, bundle: tuple[str, str, str]) -> dict[str, Any]:
    bundle_id, sha, nb_sha = bundle
    body = {"notebook": "app.ipynb", "notebook_sha256": nb_sha, "bundle_id": bundle_id, "bundle_sha256": sha}
    with env.client("alice") as c:
        resp = c.post(f"/teams/acme/apps/{name}/deployments", json=body)
        assert resp.status_code == 202, resp.text
        made: dict[str, Any] = resp.json()
        return made


def test_a_deployment_goes_through_the_bucket_encrypted_and_runs(
    env: Env, client: Any, requests: _Requests, tmp_path: Path
) -> None:
    value = f"s3-app-secret-{uuid.uuid4().hex}"
    marker = f"notebook-text-{uuid.uuid4().hex}"
    with env.client("alice") as c:
        assert c.put("/teams/acme/secrets/api-key", json={"value": value}).status_code == 201
    nb = app_notebook(tmp_path / "app", marker)
    before = len(requests.lines)
    done = env.cli("alice", "app", "deploy", str(nb), "--team", "acme", "--name", "report",
                   "--secret", "API_KEY=api-key")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + env.srv.output()[-3000:]
    dep = env.deployment("report", 1)
    assert dep["status"] == "running", dep

    # the bundle is in the bucket, under the results prefix, encrypted
    key = f"{PREFIX}sha256/{dep['bundle_sha256']}"
    stored = _objects(client)
    assert key in stored, sorted(stored)
    data = stored[key]
    assert data.startswith(bundles.MAGIC) and hashlib.sha256(data).hexdigest() == dep["bundle_sha256"]
    for name, obj in stored.items():
        for text in (marker, value, "http.server", "from the bundle"):
            assert text.encode() not in obj, (name, text)
        assert base64.b64encode(value.encode()) not in obj, name

    # put with a presigned URL by the CLI, read with a presigned URL by the app server
    seen = [line for line in requests.lines[before:] if key in line]
    assert any(line.split('"')[1].startswith("PUT ") and "Signature=" in line for line in seen), seen
    assert any(line.split('"')[1].startswith("GET ") and "Signature=" in line for line in seen), seen

    with env.client("alice") as c:
        resp = c.get("/apps/acme/report/")
        assert resp.status_code == 200, resp.text
        got = resp.json()
    assert (got["version"], got["file"], got["env"]["API_KEY"]) == (marker, "from the bundle", value)


def test_a_bundle_changed_in_the_bucket_is_refused_and_nothing_runs(env: Env, client: Any, tmp_path: Path) -> None:
    done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "a", "kept")), "--team", "acme",
                   "--name", "ledger")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    dep = env.deployment("ledger", 1)
    key = f"{PREFIX}sha256/{dep['bundle_sha256']}"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-5] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with env.client("alice") as c:
        again = c.post("/teams/acme/apps/ledger/rollback", json={"number": 1})
        assert again.status_code == 202, again.text
    number = again.json()["number"]
    failed = env.wait_deployment("ledger", number, {"failed", "running"})
    assert failed["status"] == "failed", failed
    assert "changed or truncated in the object store" in failed["message"] and "nothing was run" in failed["message"]
    assert not [r for r in env.runtimes() if r["name"].startswith(f"app-ledger-{number}-")]
    assert env.show("ledger")["current"] == 1  # the running deployment stays
    with env.client("alice") as c:
        assert c.get("/apps/acme/ledger/").json()["version"] == "kept"


def test_a_bundle_of_another_team_in_the_bucket_is_refused(env: Env, tmp_path: Path) -> None:
    theirs = _upload(env, "bob", "other", "sales", tmp_path / "bob")
    dep = _deploy(env, "swapped", theirs)
    failed = env.wait_deployment("swapped", dep["number"], {"failed", "running"})
    assert failed["status"] == "failed" and "encrypted for team 'other', not 'acme'" in failed["message"], failed
    assert not [r for r in env.runtimes() if r["name"].startswith("app-swapped-")]


def test_a_bundle_gone_from_the_bucket_fails_the_deployment_saying_so(env: Env, client: Any, tmp_path: Path) -> None:
    bundle = _upload(env, "alice", "acme", "vanish", tmp_path / "v")
    client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}sha256/{bundle[1]}")
    with env.client("alice") as c:  # checked at deploy time: nothing to deploy
        body = {"notebook": "app.ipynb", "notebook_sha256": bundle[2], "bundle_id": bundle[0],
                "bundle_sha256": bundle[1]}  # fmt: skip
        resp = c.post("/teams/acme/apps/vanish/deployments", json=body)
    assert resp.status_code == 422 and "no bundle" in resp.text, resp.text
