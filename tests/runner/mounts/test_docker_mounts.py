"""Mounts on the real Docker engine through a real `envctl serve`: a git repository served on
loopback (git http-backend; 127.0.0.1 allowed by ENVCTL_MOUNTS_ALLOW_HOSTS for this server
only) and a named volume. One server and one runtime for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.mounts.s3 import S3Cache
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.git_http import GitServer, start_git_server
from tests.fixtures.s3 import S3Endpoint, start_s3
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers, start_server
from tests.runner.saves.test_docker_lean_saves import save, top_layer

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    yield from start_git_server(tmp_path_factory.mktemp("git-server"))


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from start_s3()  # sets the fake AWS credentials in the environment the server inherits


@pytest.fixture(scope="module")
def srv(docker: Any, s3: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "python3")
    server = start_server(
        docker,
        Path(tmp_path_factory.mktemp("mounts")) / "data",
        ENVCTL_MOUNTS_ALLOW_HOSTS="127.0.0.1",
        ENVCTL_MOUNTS_S3_ENDPOINT_URL=s3.url,
    )
    yield server
    remove_runner_containers(docker, server)
    for volume in docker.volumes.list(filters={"label": [f"{TEST_LABEL}={TEST_SESSION}", "envctl.volume-owner"]}):
        volume.remove(force=True)


def test_git_s3_and_volume_mounts_are_mounted_recorded_and_left_out_of_a_save(
    srv: Server, git_server: GitServer, s3: S3Endpoint, docker: Any, tmp_path: Path
) -> None:
    """Issue 9 item 4 and R8: the commit and ETags are recorded on the runtime and each
    execution; git and S3 trees are read-only; writes into the volume, a written-back S3 mount
    and /results never reach the saved layer, the S3 one reaches the bucket on stop; the
    volume outlives the runtime."""
    commit = git_server.make_repo("code", {"lib/answer.py": "ANSWER = 42\n"})
    bucket: Any = S3Cache(tmp_path, s3.url).client
    bucket.create_bucket(Bucket="docker-mounts")
    bucket.put_object(Bucket="docker-mounts", Key="in/table.csv", Body=b"x,y\n1,2\n")
    mounts = [
        {"type": "git", "url": f"{git_server.url}/code.git", "ref": "main", "target": "/mnt/code"},
        {"type": "volume", "name": "home-data", "target": "/home/data"},
        {"type": "s3", "bucket": "docker-mounts", "prefix": "in/", "target": "/data/in"},
        {"type": "s3", "bucket": "docker-mounts", "prefix": "out/", "target": "/data/out", "writeback": True},
    ]
    with srv.client() as client:
        rid = new_runtime(client, "mounted", mounts=mounts)
        assert client.post(f"/runtimes/{rid}/start").status_code == 202
        rt = srv.wait_state(client, rid, {"running", "error"}, timeout=90)
        assert rt["state"] == "running", rt
        assert rt["mounts_used"][0]["commit"] == commit and rt["progress"] is None
        assert rt["mounts_used"][2]["objects"] == 1 and rt["mounts_used"][2]["downloaded"] == 8
        log = [e["message"] for e in client.get(f"/runtimes/{rid}/log").json()]
        assert any(m.startswith("mounted /mnt/code: git") and "8 of 8 bytes" in m for m in log), log
        ex = run(
            client,
            rid,
            "import sys, os, pathlib\n"
            "sys.path.insert(0, '/mnt/code/lib'); import answer; print(answer.ANSWER)\n"
            "try:\n    open('/mnt/code/x', 'w')\nexcept OSError as e:\n    print('read-only', e.errno)\n"
            "pathlib.Path('/home/data/kept.txt').write_text('kept')\n"
            "pathlib.Path('/results/out.txt').write_text('result')\n"
            "print(open('/data/in/table.csv').read().split()[1])\n"
            "pathlib.Path('/data/out/made.txt').write_text('made')\n"
            "pathlib.Path('/root/mine.txt').write_text('mine')\n",
        )
        assert text(ex).split() == ["42", "read-only", "30", "1,2"], ex
        assert ex["mounts"][0]["commit"] == commit and ex["mounts"][1]["name"] == "home-data"
        assert ex["mounts"][2]["etags"] == rt["mounts_used"][2]["etags"] != {}
        op = save(client, rid, "mounted-env")
        assert op["status"] == "succeeded", op
        layer = top_layer(docker, op["result"]["image_id"])
        assert "root/mine.txt" in layer, sorted(layer)
        # nothing under a mount or /results; at most the empty directory Docker made to mount on
        targets = ("mnt/code", "home/data", "data/in", "data/out", "results")
        for name in layer:
            assert not name.startswith(tuple(t + "/" for t in targets)), sorted(layer)
            assert name not in targets or layer[name].isdir(), (name, sorted(layer))
        assert client.post(f"/runtimes/{rid}/stop").status_code == 202
        srv.wait_state(client, rid, {"stopped", "error"})
        assert bucket.get_object(Bucket="docker-mounts", Key="out/made.txt")["Body"].read() == b"made"
        assert client.delete(f"/runtimes/{rid}").status_code == 204
        # the volume outlives the runtime: a new one sees what the first wrote
        rid2 = new_runtime(client, "again", mounts=[mounts[1]])
        assert client.post(f"/runtimes/{rid2}/start").status_code == 202
        assert srv.wait_state(client, rid2, {"running", "error"}, timeout=90)["state"] == "running"
        assert text(run(client, rid2, "print(open('/home/data/kept.txt').read())")).strip() == "kept"
        client.delete(f"/runtimes/{rid2}")
