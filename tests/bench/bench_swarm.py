"""Runtimes on a Docker Swarm (issue 15): boot on a worker and a cell's round trip, through the API.

A three-engine swarm of ``scripts/swarm-fixture`` (root only) and one ``envctl serve`` with
``ENVCTL_RUNNER_BACKEND=swarm``. Figures, each beside its raw baseline in the same run:

- boot on worker1 with the image on the node: ``POST /runtimes`` + ``/start``, until a first
  cell (``true``) answered, beside raw ``docker service create`` of the same image (by digest,
  pulled with the same kind of registry token) until a first ``docker exec true`` on the worker;
- the same on worker2 with the image absent (removed from the node before each run);
- a cell's round trip (``true``, ``POST /runtimes/{id}/executions?wait``) beside ``docker exec
  true`` in the same runtime's container on the worker's engine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

from tests.bench.stats import report

BOOTS = 5


def _engine(env: dict[str, str], node: str) -> docker.DockerClient:
    return docker.DockerClient(base_url=env[f"ENVCTL_SWARM_{node.upper()}_HOST"], timeout=60)


def _rmi(env: dict[str, str], node: str, image_ref: str) -> None:
    """The runtime's image gone from ``node`` (its containers first: none of ours run there)."""
    engine = _engine(env, node)
    try:
        for image in engine.images.list():
            if any(d.split("@")[-1] == image_ref.split("@")[-1] for d in image.attrs.get("RepoDigests") or []):
                with contextlib.suppress(docker.errors.APIError):
                    engine.images.remove(image.id, force=True)
    finally:
        engine.close()


def _envctl_boot(client: httpx.Client, machine: str, environment: str) -> tuple[float, str]:
    t = time.perf_counter()
    rid = str(
        client.post(
            "/runtimes",
            json={"environment": environment, "name": f"b-{uuid.uuid4().hex[:6]}", "language": "bash",
                  "machine_type": machine},
        ).json()["id"]
    )  # fmt: skip
    client.post(f"/runtimes/{rid}/start")
    while (rt := client.get(f"/runtimes/{rid}").json())["state"] == "booting":
        time.sleep(0.02)
    assert rt["state"] == "running", rt
    ex = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json={"code": "true"}).json()
    assert ex.get("status") == "ok", ex
    return (time.perf_counter() - t) * 1000, rid


def _raw_boot(manager: docker.DockerClient, env: dict[str, str], node: str, image: str, token: str) -> float:
    """``docker service create`` (with the registry token) until a first ``docker exec`` answered."""
    spec = {
        "Name": f"envctl-bench-{uuid.uuid4().hex[:8]}",
        "Labels": {"envctl.bench": "swarm"},
        "TaskTemplate": {
            "ContainerSpec": {"Image": image, "Command": ["sleep", "infinity"], "StopGracePeriod": 1_000_000_000},
            "RestartPolicy": {"Condition": "none"},
            "Placement": {"Constraints": [f"node.labels.envctl.fixture.node=={node}"]},
        },
    }
    auth = base64.urlsafe_b64encode(json.dumps({"registrytoken": token}).encode()).decode()
    api = manager.api
    worker = _engine(env, node)
    t = time.perf_counter()
    made = api.post(
        f"{api.base_url}/v{api.api_version}/services/create",
        data=json.dumps(spec),
        headers={"Content-Type": "application/json", "X-Registry-Auth": auth},
    )
    made.raise_for_status()
    sid = made.json()["ID"]
    try:
        while True:
            found = worker.api.containers(filters={"label": f"com.docker.swarm.service.id={sid}"})
            if found:
                break
            time.sleep(0.02)
        while True:
            try:
                run = worker.api.exec_create(found[0]["Id"], ["true"])
                worker.api.exec_start(run["Id"])
                break
            except docker.errors.APIError:
                time.sleep(0.02)
        return (time.perf_counter() - t) * 1000
    finally:
        api.remove_service(sid)
        worker.close()


def run(runs: int = 200) -> dict[str, float]:
    from api.settings import load
    from registry.distribution import signing_key
    from runner.backends.swarm import SwarmBackend
    from tests.fixtures.swarm import Swarm, _missing, _read_env, _script
    from tests.fixtures.swarm_envctl import remove_installation, swarm_server

    if (why := _missing()) is not None:
        print(f"swarm benchmark skipped: {why}")
        return {}
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="envctl-bench-swarm-") as tmp:
        directory = Path(tmp) / "swarm"
        _script("up", directory)
        env = _read_env(directory / "env")
        swarm = Swarm(directory, env, tuple(env["ENVCTL_SWARM_NODES"].split()))
        srv = swarm_server(swarm, Path(tmp) / "data")
        srv.start()
        manager = docker.DockerClient(base_url=swarm.host("manager"), timeout=60)
        try:
            with srv.client() as client:
                # the version pushed, and present on worker1, before anything is timed
                _ms, first = _envctl_boot(client, "w1", "bash")
                settings = load(env={**srv.env, "ENVCTL_DATA_DIR": str(srv.data_dir)})
                backend = SwarmBackend.from_settings(settings)
                assert backend.signing_key is not None and signing_key(settings)
                state = _backend_state(srv, first)
                service = manager.api.inspect_service(state["service_id"])
                image = service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
                repository = image.split("/", 1)[1].split("@")[0]
                client.delete(f"/runtimes/{first}")

                present: dict[str, list[float]] = {"envctl": [], "raw": []}
                absent: dict[str, list[float]] = {"envctl": [], "raw": []}
                for _ in range(BOOTS):
                    ms, rid = _envctl_boot(client, "w1", "bash")
                    present["envctl"].append(ms)
                    client.delete(f"/runtimes/{rid}")
                    present["raw"].append(_raw_boot(manager, env, "worker1", image, backend.pull_token(repository)))
                for _ in range(max(2, BOOTS - 2)):
                    _rmi(env, "worker2", image)
                    ms, rid = _envctl_boot(client, "w2", "bash")
                    absent["envctl"].append(ms)
                    client.delete(f"/runtimes/{rid}")
                    time.sleep(4)  # the container goes before its image can
                    _rmi(env, "worker2", image)
                    absent["raw"].append(_raw_boot(manager, env, "worker2", image, backend.pull_token(repository)))
                    time.sleep(3)
                figures["boot_present"] = report(
                    f"boot on a Swarm worker, image on the node, until a first cell answered ({BOOTS} runs)",
                    present["envctl"],
                    present["raw"],
                    "docker service create + first exec",
                )["ratio"]
                figures["boot_absent"] = report(
                    f"boot on a Swarm worker, image pulled from the registry ({len(absent['raw'])} runs)",
                    absent["envctl"],
                    absent["raw"],
                    "docker service create + first exec",
                )["ratio"]

                _ms, rid = _envctl_boot(client, "w1", "bash")
                url = f"/runtimes/{rid}/executions"
                sid = _backend_state(srv, rid)["service_id"]
                worker = _engine(env, "worker1")
                [container] = worker.api.containers(filters={"label": f"com.docker.swarm.service.id={sid}"})
                ours, raw = [], []
                for _ in range(20):
                    client.post(url, params={"wait": 30}, json={"code": "true"})
                for i in range(runs):
                    if i % 2 == 0:
                        t = time.perf_counter()
                        ex = client.post(url, params={"wait": 30}, json={"code": "true"}).json()
                        ours.append((time.perf_counter() - t) * 1000)
                        assert ex["status"] == "ok", ex
                    else:
                        t = time.perf_counter()
                        e = worker.api.exec_create(container["Id"], ["true"])
                        worker.api.exec_start(e["Id"])
                        raw.append((time.perf_counter() - t) * 1000)
                worker.close()
                figures["cell"] = report(
                    f"cell round trip `true` on a Swarm worker, REST API ({runs // 2} runs each, alternating)",
                    ours,
                    raw,
                    "docker exec on the worker",
                )["ratio"]
                client.delete(f"/runtimes/{rid}")
        finally:
            manager.close()
            remove_installation(swarm, srv)
            _script("down", directory)
    return figures


def _backend_state(srv: Any, rid: str) -> dict[str, Any]:
    from envs.kit.db import Database  # noqa: PLC0415
    from runner.models import Runtime  # noqa: PLC0415

    db = Database(f"sqlite:///{srv.data_dir / 'envctl.db'}")
    try:
        with db.session() as s:
            row = s.get(Runtime, rid)
            assert row is not None
            return dict(row.backend_state or {})
    finally:
        db.dispose()


if __name__ == "__main__":
    run()
