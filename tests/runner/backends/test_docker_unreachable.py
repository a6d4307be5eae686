"""A Docker engine that does not answer: 503s that say so, no traceback, nothing forgotten (R14)."""

from __future__ import annotations

import http.server
import shutil
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from api.startup import Services
from envs.kit.db import Database
from envs.kit.errors import BackendError
from runner.backends.docker import DockerBackend
from runner.runtimes.states import State
from runner.service import RunnerService
from tests.runner.conftest import crash, seed


def dead_docker(settings: Settings, tmp_path: Path) -> DockerBackend:
    return DockerBackend(base_url=f"unix://{tmp_path}/no-docker.sock", timeout=2)


def test_starting_a_runtime_without_docker_is_a_503_that_names_the_engine(
    settings: Settings, sqlite_db: Database, tmp_path: Path
) -> None:
    """R14."""
    seed(sqlite_db)
    app = create_app(Services.build(settings, backend=dead_docker(settings, tmp_path)))
    with TestClient(app) as client:
        token = settings.admin_token_file.read_text().strip()
        h = {"Authorization": f"Bearer {token}"}
        rt = client.post("/runtimes", json={"environment": "python3", "name": "demo"}, headers=h)
        assert rt.status_code == 201
        r = client.post(f"/runtimes/{rt.json()['id']}/start", headers=h)
        assert r.status_code == 503
        body = r.json()["error"]
        assert body["code"] == "backend_error" and "Docker engine does not answer" in body["message"]
        assert client.get(f"/runtimes/{rt.json()['id']}", headers=h).json()["state"] == "stopped"
        health = client.get("/health").json()
        assert health["status"] == "degraded" and "Docker" in health["backend"]


def test_reconciling_against_a_dead_engine_marks_runtimes_but_keeps_their_containers_on_record(
    make_runner: Callable[..., RunnerService],
    runner_db: Database,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """R14: runtimes marked with the reason, container ids kept."""
    owner = seed(runner_db)
    alive = make_runner()
    rt = alive.create(owner, name="demo", environment="python3")
    alive.start(owner, rt.id)
    alive.wait_for(rt.id, {State.RUNNING}, 20)
    container = alive.get(owner, rt.id).backend_state["container_id"]
    crash(alive)
    svc = make_runner(dead_docker(settings, tmp_path))
    after = svc.get(owner, rt.id)
    assert after.state == State.ERROR and after.state_reason == "backend-unreachable"
    assert "Docker engine does not answer" in after.state_message
    assert after.backend_state["container_id"] == container
    with pytest.raises(BackendError):
        svc.reconcile()


class _FaultyEngine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Docker API socket that takes every request and then hangs or answers 500."""

    daemon_threads = True

    def __init__(self, path: str, fault: str) -> None:
        self.fault = fault
        self.release = threading.Event()
        super().__init__(path, _FaultyEngineHandler)


class _FaultyEngineHandler(http.server.BaseHTTPRequestHandler):
    server: _FaultyEngine

    def _answer(self) -> None:
        if self.server.fault == "hangs":
            self.server.release.wait(60)
            return
        body = b'{"message": "simulated daemon failure"}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def faulty_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """The base URL of a Docker API that hangs (``hangs``) or fails (``fails``)."""
    folder = tempfile.mkdtemp(prefix="envctl-engine-")  # short: socket paths have 108 bytes
    engine = _FaultyEngine(f"{folder}/docker.sock", request.param)
    thread = threading.Thread(target=engine.serve_forever, daemon=True)
    thread.start()
    yield f"unix://{folder}/docker.sock"
    engine.release.set()
    engine.shutdown()
    engine.server_close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    ("faulty_engine", "why"),
    [("hangs", "does not answer"), ("fails", "simulated daemon failure")],
    indirect=["faulty_engine"],
)
def test_an_engine_that_hangs_or_fails_during_reconciliation_marks_runtimes_and_keeps_their_state(
    make_runner: Callable[..., RunnerService],
    runner_db: Database,
    faulty_engine: str,
    why: str,
) -> None:
    """R14: a listing that times out or gets a 500 marks the runtime with the reason, in bounded
    time, and keeps what the database knows of it."""
    owner = seed(runner_db)
    alive = make_runner()
    rt = alive.create(owner, name="demo", environment="python3")
    alive.start(owner, rt.id)
    alive.wait_for(rt.id, {State.RUNNING}, 20)
    before = alive.get(owner, rt.id)
    crash(alive)
    # An explicit API version: the client asks the engine nothing until it is used.
    client = docker.DockerClient(base_url=faulty_engine, version="1.41", timeout=2)
    began = time.monotonic()
    svc = make_runner(DockerBackend(client))
    after = svc.get(owner, rt.id)
    assert time.monotonic() - began < 15
    assert after.state == State.ERROR and after.state_reason == "backend-unreachable"
    assert "cannot reach the container engine" in after.state_message
    assert why in after.state_message, after.state_message
    assert after.backend_state == before.backend_state  # the container id, kept for re-adoption
    assert (after.version_id, after.machine_type, after.booted_at) == (
        before.version_id,
        before.machine_type,
        before.booted_at,
    )
    with pytest.raises(BackendError):
        svc.reconcile()
    assert svc.get(owner, rt.id).backend_state == before.backend_state
