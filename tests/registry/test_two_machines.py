"""Two machines (issue 8 item 7): a version saved and published on server A is imported by
server B, which shares nothing with A (its own data directory, SQLite database and Docker
engine), pulled from A's registry with progress, checked, and booted there with the package
that was installed on A.

Server A runs the managed registry and is its token server. B's engine is a second ``dockerd``
(``tests/fixtures/engine.py``) that starts empty: the import pulls every layer, the base's too
(the smallest base, bash). B reaches A's API and registry on loopback (which B's
``ENVCTL_IMPORT_ALLOW_HOSTS`` allows), as the user ``bob`` of A, who is in no team there: he
may pull only what acme published.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker as docker_sdk
import httpx
import pytest

from tests.fixtures.engine import need_dockerd, second_engine
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.transfer import cli_json, registry_server
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers
from tests.runner.saves.test_docker_saves import save

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ENV = "acme/two"
PACKAGE = "envctl-two-machines"
# a real Debian package, built and installed by dpkg in a cell (no network needed)
INSTALL = f"""set -e
d=$(mktemp -d); mkdir -p $d/DEBIAN $d/usr/local/bin
printf 'Package: {PACKAGE}\\nVersion: 1.0\\nArchitecture: all\\n' > $d/DEBIAN/control
printf 'Maintainer: envctl <t@example.com>\\nDescription: marker\\n' >> $d/DEBIAN/control
printf '#!/bin/sh\\necho hello from machine A\\n' > $d/usr/local/bin/two-machines
chmod 755 $d/usr/local/bin/two-machines
dpkg-deb --build $d /tmp/p.deb >/dev/null && dpkg -i /tmp/p.deb >/dev/null && rm -rf $d /tmp/p.deb
"""


@pytest.fixture(scope="module")
def server_a(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = registry_server(docker, tmp_path_factory.mktemp("machine-a") / "data")
    yield srv
    remove_runner_containers(docker, srv)


@dataclass(frozen=True)
class MachineB:
    engine: str  # its dockerd's URL
    server: Server


@pytest.fixture(scope="module")
def machine_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[MachineB]]:
    """Server B and its engine, started in a thread while A works (they share nothing)."""
    need_dockerd()
    root = Path(tmp_path_factory.mktemp("machine-b"))
    # its own database, migrated here (alembic is not for threads); no base image: its engine is empty
    prepare_data_dir(root / "data", [])
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(1) as pool:  # the pool ends first

        def start() -> MachineB:
            engine = stack.enter_context(second_engine(root / "engine"))
            server = Server(
                root / "data",
                env={
                    "DOCKER_HOST": engine,
                    "ENVCTL_RUNNER_NAME": f"machine-b-{root.name}",
                    "ENVCTL_RUNNER_NETWORK": "none",  # B's engine has no bridge
                    "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.5",
                    "ENVCTL_IMPORT_ALLOW_HOSTS": "127.0.0.1",  # A and its registry are on loopback
                },
            )
            stack.callback(server.stop)  # before its engine stops, with everything in it
            server.start()
            return MachineB(engine, server)

        yield pool.submit(start)


def test_a_version_saved_and_published_on_one_server_is_imported_pulled_and_booted_on_another(
    machine_b: Future[MachineB], server_a: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    with server_a.client() as a:
        assert a.post("/teams", json={"name": "acme"}).status_code == 201
        bob = a.post("/users", json={"name": "bob"}).json()["token"]  # in no team on A
        author = new_runtime(a, "author", environment="bash", language="bash")
        clock = time.monotonic()
        installed = run(a, author, INSTALL)
        assert installed["status"] == "ok", text(installed, "stderr")
        saved = save(a, author, ENV, "a package from machine A")
        assert saved["result"]["pushed"] is True, saved
        pushed = time.monotonic() - clock
        a.delete(f"/runtimes/{author}")
        version_a = a.get(f"/environments/{ENV}").json()["versions"][0]
    server_b, engine_b = machine_b.result(timeout=120).server, machine_b.result().engine

    with server_b.client() as b:
        body = {"from": server_a.url, "ref": f"{ENV}@1", "token": bob}
        # not published yet: A does not show bob the version, and B says so at once
        refused = b.post("/environments/import-remote", json=body)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "upstream_refused", refused.text
        with server_a.client() as a:
            assert a.post(f"/environments/{ENV}@1/publish").status_code == 200

        started = time.monotonic()
        op, seen = _follow(b, b.post("/environments/import-remote", json=body))
        imported = time.monotonic() - started
        assert op["status"] == "succeeded", op
        result = op["result"]
        assert result["version"] == f"{ENV}@1" and result["new"] is True and result["pulled"] is True
        assert result["registry_digest"] == version_a["registry_digest"]
        assert result["bytes"] == result["total"] > 1024 * 1024  # every layer travelled, the base's too
        downloading = [r for phase, r in seen if phase == "downloading" and r.get("total")]
        assert downloading and all(r["done"] <= r["total"] for r in downloading), seen[-10:]

        # B's own engine holds the image A saved (same id), and B's catalog says where it came from
        engine = docker_sdk.DockerClient(base_url=engine_b)
        try:
            assert engine.images.get(version_a["image_id"]).id == version_a["image_id"]
        finally:
            engine.close()
        version_b = b.get(f"/environments/{ENV}").json()["versions"][0]
        assert version_b["image_id"] == version_a["image_id"] and version_b["message"] == "a package from machine A"
        assert version_b["imported"] == {
            "from": server_a.url,
            "ref": f"{ENV}@1",
            "registry_digest": version_a["registry_digest"],
        }

        # a runtime on B boots from it, and the package installed on A is there
        rid = new_runtime(b, "reader", environment=ENV, language="bash")
        check = run(b, rid, f"dpkg-query -W -f='${{Status}}' {PACKAGE}; echo; two-machines")
        booted = time.monotonic() - started
        assert text(check) == "install ok installed\nhello from machine A\n", check
        with capsys.disabled():
            print(f"\nmachine A: save+push {pushed:.1f} s; machine B: import+pull {imported:.1f} s, ", end="")
            print(f"+boot+cell {booted:.1f} s, {result['bytes']} bytes")
        b.delete(f"/runtimes/{rid}")

    # the CLI, again: nothing new to record, nothing travels
    again = cli_json(server_b, capsys, "pull", f"{ENV}@1", "--from", server_a.url, "--from-token", bob)
    assert again["status"] == "succeeded" and again["result"]["new"] is False and again["result"]["bytes"] == 0


def _follow(client: httpx.Client, answer: httpx.Response) -> tuple[dict[str, Any], list[tuple[str, dict[str, int]]]]:
    """Follow an operation every 20 ms until it ends: its last state, and the (phase, result) seen."""
    assert answer.status_code == 202, answer.text
    op: dict[str, Any] = answer.json()
    seen: list[tuple[str, dict[str, int]]] = []
    deadline = time.monotonic() + 120
    while op["status"] == "running" and time.monotonic() < deadline:
        seen.append((op["phase"], op.get("result") or {}))
        time.sleep(0.02)
        op = client.get(f"/operations/{op['id']}").json()
    return op, seen
