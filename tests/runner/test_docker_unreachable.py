"""A Docker engine that does not answer: 503s that say so, no traceback, nothing forgotten (R14)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from envs.kit.config import Settings
from envs.kit.db import Database
from envs.kit.errors import BackendError
from runner.backends.docker import DockerBackend
from runner.service import RunnerService
from runner.states import State
from tests.runner.conftest import seed


def dead_docker(settings: Settings, tmp_path: Path) -> DockerBackend:
    return DockerBackend(runner=settings.runner_name, base_url=f"unix://{tmp_path}/no-docker.sock", timeout=2)


def test_starting_a_runtime_without_docker_is_a_503_that_names_the_engine(
    settings: Settings, sqlite_db: Database, tmp_path: Path
) -> None:
    seed(sqlite_db)
    app = create_app(settings, backend=dead_docker(settings, tmp_path))
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
    owner = seed(runner_db)
    alive = make_runner()
    rt = alive.create(owner, name="demo", environment="python3")
    alive.start(owner, rt.id)
    alive.wait_for(rt.id, {State.RUNNING}, 20)
    container = alive.get(owner, rt.id).backend_state["container_id"]
    alive._closing.set()
    svc = make_runner(dead_docker(settings, tmp_path))
    after = svc.get(owner, rt.id)
    assert after.state == State.ERROR and after.state_reason == "backend-unreachable"
    assert "Docker engine does not answer" in after.state_message
    assert after.backend_state["container_id"] == container
    with pytest.raises(BackendError):
        svc.reconcile()
