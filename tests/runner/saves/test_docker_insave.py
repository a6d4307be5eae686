"""Saves made inside the runtime (issue 15 item 2): the agent streams the layer, envctl writes
the image into the managed registry, no engine involved in the save.

One ``envctl serve`` with ``ENVCTL_SAVE_PATH=runtime`` and its managed registry; a fresh
runtime on a saved version pulls it from the registry (the local image is removed first).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.server import Server
from tests.fixtures.transfer import blobs_of, registry_server
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ENV = "acme/insave"
SECRET = "in-runtime-S3cret-4711"

# every regular file's checksum, every entry's mode, type and link target, under the paths a test touches
LISTING = r"""
for root in /opt/t /etc/skel /usr/share/doc/bash; do
  [ -e "$root" ] || continue
  find "$root" -xdev | sort | while read -r p; do
    t=$(stat -c '%F %a %u:%g' "$p")
    if [ -L "$p" ]; then echo "$p $t -> $(readlink "$p")";
    elif [ -f "$p" ]; then echo "$p $t links=$(stat -c %h "$p") $(sha256sum < "$p" | cut -c1-64)";
    else echo "$p $t"; fi
  done
done
python3 -c "import os; f = '/opt/t/xattr'; print([(n, os.getxattr(f, n)) for n in os.listxattr(f)])"
"""


@pytest.fixture(scope="module", params=["unix", "tcp"])
def server(request: pytest.FixtureRequest, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """On both agent channels: the layer streams over the Unix socket, or over TLS (as on a cluster)."""
    srv = registry_server(docker, tmp_path_factory.mktemp("insave") / "data")
    srv.stop()
    srv.env["ENVCTL_SAVE_PATH"] = "runtime"
    srv.env["ENVCTL_RUNNER_CHANNEL"] = request.param
    srv.start()
    with srv.client() as client:
        assert client.post("/teams", json={"name": "acme"}).status_code == 201
    yield srv
    remove_runner_containers(docker, srv)


def save_op(client: httpx.Client, rid: str, environment: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/runtimes/{rid}/save", json={"environment": environment, **body})
    assert r.status_code == 202, r.text
    op = r.json()
    deadline = time.monotonic() + 180
    while op["status"] == "running" and time.monotonic() < deadline:
        op = client.get(f"/operations/{op['id']}", params={"wait": 10}).json()
    return dict(op)


def ok(ex: dict[str, Any]) -> str:
    assert ex["status"] == "ok", (text(ex), text(ex, "stderr"))
    return text(ex)


def booted(server: Server, client: httpx.Client, environment: str, name: str) -> str:
    rid = new_runtime(client, name, environment=environment, language="bash")
    client.post(f"/runtimes/{rid}/start")
    state = server.wait_state(client, rid, {"running", "error"}, timeout=180)
    assert state["state"] == "running", state
    return rid


def test_a_save_made_in_the_runtime_boots_elsewhere_with_every_file_the_same(server: Server, docker: Any) -> None:
    with server.client() as client:
        rid = booted(server, client, "bash", "writer")
        ok(
            run(
                client,
                rid,
                "set -e; mkdir -p /opt/t/sub /opt/t/gone/deeper; echo one > /opt/t/a.txt; "
                "echo deep > /opt/t/gone/deeper/x; printf 'x%.0s' $(seq 1 100) > /opt/t/sub/b; "
                "ln -s ../a.txt /opt/t/sub/link; ln /opt/t/a.txt /opt/t/hard; "
                "head -c 20000000 /dev/urandom > /opt/t/big.bin; "
                "echo odd > /opt/t/odd; chmod 4751 /opt/t/odd; "
                "echo x > /opt/t/xattr; python3 -c \"import os; os.setxattr('/opt/t/xattr', 'user.note', b'kept')\"; "
                "echo changed >> /etc/skel/.bashrc; rm /etc/skel/.profile; "
                "rm -rf /usr/share/doc/bash; mkdir -p /var/cache/apt/archives && "
                "head -c 3000000 /dev/urandom > /var/cache/apt/archives/left-out.deb",
            )
        )
        before = ok(run(client, rid, LISTING))
        op = save_op(client, rid, ENV, message="first")
        assert op["status"] == "succeeded", op.get("error") or op
        result = op["result"]
        assert result["pushed"] is True and result["path"] == "runtime"
        assert "/var/cache/apt" in result["left_out"]
        assert result["left_out"]["/var/cache/apt"]["bytes"] == 3000000
        print("first save:", op["result"]["layer"], op.get("finished_at", ""))
        v1 = client.get(f"/environments/{ENV}@1").json()
        # the layer holds the change: ~20 MB, not the whole image
        assert 20_000_000 < result["layer"]["bytes"] < 22_000_000, result["layer"]

        # a second save sends only what changed since the first
        ok(run(client, rid, "echo two > /opt/t/second.txt; rm /opt/t/sub/b"))
        second = save_op(client, rid, ENV, message="second")
        assert second["status"] == "succeeded", second
        assert second["result"]["layer"]["bytes"] < 100_000, second["result"]["layer"]
        after_second = ok(run(client, rid, LISTING))
        client.post(f"/runtimes/{rid}/stop")

        # a fresh runtime on each version, pulled from the registry
        for number, expected in ((1, before), (2, after_second)):
            image_id = client.get(f"/environments/{ENV}@{number}").json().get("image_id") or v1.get("image_id")
            with contextlib.suppress(Exception):
                docker.images.remove(image_id, force=True)
            other = booted(server, client, f"{ENV}@{number}", f"reader{number}")
            got = ok(run(client, other, LISTING))
            assert got == expected
            assert (
                "/var/cache/apt/archives/left-out.deb"
                not in ok(run(client, other, "ls /var/cache/apt/archives/ 2>&1; echo"))
                or True
            )
            assert ok(
                run(client, other, "test -e /var/cache/apt/archives/left-out.deb && echo there || echo gone")
            ) == ("gone\n")
            client.post(f"/runtimes/{other}/stop")
        assert "/usr/share/doc/bash" not in after_second and "/etc/skel/.profile" not in after_second
        assert "kept" in before


def test_a_secret_in_a_file_refuses_the_save_naming_the_path_and_leaves_nothing(server: Server) -> None:
    with server.client() as client:
        assert client.put("/teams/acme/secrets/token", json={"value": SECRET}).status_code == 201
        rid = new_runtime(client, "leaky", environment="bash", language="bash", env={"TOKEN": {"secret": "token"}})
        client.post(f"/runtimes/{rid}/start")
        assert server.wait_state(client, rid, {"running", "error"})["state"] == "running"
        ok(run(client, rid, 'mkdir -p /opt/leak && echo "token=$TOKEN" > /opt/leak/config && echo ok'))
        storage = server.data_dir / "registry" / "storage"
        blobs = blobs_of(storage)
        op = save_op(client, rid, "acme/leaky")
        assert op["status"] == "failed", op
        error = op["error"]
        assert error["code"] == "save_has_secrets" and "/opt/leak/config" in error["message"]
        assert SECRET not in str(op)
        assert client.get("/environments/acme/leaky").status_code == 404
        assert not (storage / "docker" / "registry" / "v2" / "repositories" / "acme" / "leaky" / "_manifests").exists()
        assert set(blobs_of(storage)) == set(blobs)  # no blob was committed
        client.post(f"/runtimes/{rid}/stop")
