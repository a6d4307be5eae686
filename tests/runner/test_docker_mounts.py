"""Mounts on the real Docker engine through a real `envctl serve`: a git repository served on
loopback (git http-backend; 127.0.0.1 allowed by ENVCTL_MOUNTS_ALLOW_HOSTS for this server
only) and a named volume. One server and one runtime for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.git_http import GitServer, start_git_server
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.conftest import remove_runner_containers, start_server
from tests.runner.test_docker_executions import new_runtime, run, text
from tests.runner.test_docker_lean_saves import save, top_layer

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    yield from start_git_server(tmp_path_factory.mktemp("git-server"))


@pytest.fixture(scope="module")
def srv(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "python3")
    server = start_server(
        docker, Path(tmp_path_factory.mktemp("mounts")) / "data", ENVCTL_MOUNTS_ALLOW_HOSTS="127.0.0.1"
    )
    yield server
    remove_runner_containers(docker, server)
    for volume in docker.volumes.list(filters={"label": [f"{TEST_LABEL}={TEST_SESSION}", "envctl.volume-owner"]}):
        volume.remove(force=True)


def test_a_git_mount_and_a_volume_are_mounted_recorded_and_left_out_of_a_save(
    srv: Server, git_server: GitServer, docker: Any
) -> None:
    """Issue 9 item 4 and R8: the commit is recorded on the runtime and each execution; the git
    tree is read-only; writes into the volume and /results never reach the saved layer; the
    volume outlives the runtime."""
    commit = git_server.make_repo("code", {"lib/answer.py": "ANSWER = 42\n"})
    mounts = [
        {"type": "git", "url": f"{git_server.url}/code.git", "ref": "main", "target": "/mnt/code"},
        {"type": "volume", "name": "home-data", "target": "/home/data"},
    ]
    with srv.client() as client:
        rid = new_runtime(client, "mounted", mounts=mounts)
        assert client.post(f"/runtimes/{rid}/start").status_code == 202
        rt = srv.wait_state(client, rid, {"running", "error"}, timeout=90)
        assert rt["state"] == "running", rt
        assert rt["mounts_used"][0]["commit"] == commit
        ex = run(
            client,
            rid,
            "import sys, os, pathlib\n"
            "sys.path.insert(0, '/mnt/code/lib'); import answer; print(answer.ANSWER)\n"
            "try:\n    open('/mnt/code/x', 'w')\nexcept OSError as e:\n    print('read-only', e.errno)\n"
            "pathlib.Path('/home/data/kept.txt').write_text('kept')\n"
            "pathlib.Path('/results/out.txt').write_text('result')\n"
            "pathlib.Path('/root/mine.txt').write_text('mine')\n",
        )
        assert text(ex).split() == ["42", "read-only", "30"], ex
        assert ex["mounts"][0]["commit"] == commit and ex["mounts"][1]["name"] == "home-data"
        op = save(client, rid, "mounted-env")
        assert op["status"] == "succeeded", op
        layer = top_layer(docker, op["result"]["image_id"])
        assert "root/mine.txt" in layer, sorted(layer)
        for name in layer:
            assert not name.startswith(("mnt/code/", "home/data/", "results/")), sorted(layer)
        assert client.delete(f"/runtimes/{rid}").status_code == 204
        # the volume outlives the runtime: a new one sees what the first wrote
        rid2 = new_runtime(client, "again", mounts=[mounts[1]])
        assert client.post(f"/runtimes/{rid2}/start").status_code == 202
        assert srv.wait_state(client, rid2, {"running", "error"}, timeout=90)["state"] == "running"
        assert text(run(client, rid2, "print(open('/home/data/kept.txt').read())")).strip() == "kept"
        client.delete(f"/runtimes/{rid2}")
