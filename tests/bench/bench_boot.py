"""Boot and stop through the public HTTP API, as the CLI and an editor do them.

A real `envctl serve` (Docker backend, SQLite) and an ordinary HTTP client with a kept-alive
connection (httpx):

- boot: ``POST /runtimes/{id}/start?wait=60`` until the runtime is ``running`` (its agent
  answering), and the same with a client that polls ``GET /runtimes/{id}`` every 50 ms instead;
- stop: ``POST /runtimes/{id}/stop?wait=60`` until it is ``stopped`` (the container removed).

Baselines, measured in the same run on the same image and interleaved with ours so that both
see the same machine noise: the Docker CLI's ``docker run -d`` of a long-lived process followed
by a first ``docker exec`` into it (a container that can run a command), and ``docker rm -f``.

The in-process figure (the runner called directly, no HTTP) is kept, labelled as such: the
difference is what the API adds.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from api.dbschema import upgrade
from api.settings import Settings
from api.startup import Services
from envs.base import build as base_images
from envs.kit.db import Database
from envs.service import register_base_images
from registry.users import create_user
from runner.backends.docker import DockerBackend
from runner.runtimes.states import State
from tests.bench.networks import remove_networks
from tests.bench.stats import report
from tests.fixtures.server import Server, prepare_data_dir

LABEL = "envctl.bench"


def _raw_boot(image: str, session: str) -> tuple[float, float]:
    """(docker run -d + docker exec, docker rm -f) in milliseconds."""
    began = time.perf_counter()
    cid = subprocess.run(
        ["docker", "run", "-d", "--label", f"{LABEL}={session}", image, "sleep", "infinity"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(["docker", "exec", cid, "true"], check=True, capture_output=True)
    boot = (time.perf_counter() - began) * 1000
    began = time.perf_counter()
    subprocess.run(["docker", "rm", "-f", cid], check=True, capture_output=True)
    return boot, (time.perf_counter() - began) * 1000


def _remove_leftovers(session: str) -> None:
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL}={session}"], capture_output=True, text=True
    ).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
    remove_networks(session)


def _python3_image() -> str:
    return base_images.build(["python3"], verify=False)[-1].image_id


def _through_api(runs: int, session: str, image: str) -> None:
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        data = Path(tmp) / "data"
        prepare_data_dir(data)
        srv = Server(
            data,
            env={
                "ENVCTL_RUNNER_NAME": f"bench-{session}",
                "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}",
                "ENVCTL_RUNNER_IDLE_TIMEOUT": "3600",
            },
        )
        srv.start()
        try:
            with srv.client() as client:
                rid = client.post("/runtimes", json={"environment": "python3", "name": "bench"}).json()["id"]

                def boot_waiting() -> float:
                    began = time.perf_counter()
                    rt = client.post(f"/runtimes/{rid}/start", params={"wait": 60}).json()
                    took = (time.perf_counter() - began) * 1000
                    assert rt["state"] == "running", rt
                    return took

                def boot_polling() -> float:
                    began = time.perf_counter()
                    rt = client.post(f"/runtimes/{rid}/start").json()
                    while rt["state"] != "running":
                        assert rt["state"] == "booting", rt
                        time.sleep(0.05)
                        rt = client.get(f"/runtimes/{rid}").json()
                    return (time.perf_counter() - began) * 1000

                def stop() -> float:
                    began = time.perf_counter()
                    rt = client.post(f"/runtimes/{rid}/stop", params={"wait": 60}).json()
                    took = (time.perf_counter() - began) * 1000
                    assert rt["state"] == "stopped", rt
                    return took

                boot_waiting()  # warm-up of each, not counted
                stop()
                _raw_boot(image, session)
                boots, polled, stops, raw_boots, raw_stops = [], [], [], [], []
                for i in range(runs):  # interleaved, so both see the same machine noise
                    (boots if i % 2 == 0 else polled).append((boot_waiting if i % 2 == 0 else boot_polling)())
                    stops.append(stop())
                    raw_boot, raw_stop = _raw_boot(image, session)
                    raw_boots.append(raw_boot)
                    raw_stops.append(raw_stop)
                report(
                    f"boot through the API: POST /start?wait -> running ({len(boots)} runs, httpx keep-alive)",
                    boots,
                    raw_boots,
                    "docker run -d + docker exec",
                    target=1.3,
                )
                report(
                    f"  same, a client polling GET /runtimes/{{id}} every 50 ms ({len(polled)} runs)",
                    polled,
                    raw_boots,
                    "docker run -d + docker exec",
                )
                report(
                    f"stop through the API: POST /stop?wait -> stopped ({len(stops)} runs)",
                    stops,
                    raw_stops,
                    "docker rm -f",
                    target=1.3,
                )
                client.delete(f"/runtimes/{rid}")
        finally:
            srv.stop()


def _in_process(runs: int, session: str, image: str) -> None:
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            runner_name=f"bench-{session}-in",
            runner_labels={LABEL: session},
            runner_idle_timeout=3600,
        )
        upgrade(settings.effective_database_url)
        db = Database(settings.effective_database_url)
        with db.session() as s:
            register_base_images(s, base_images.build(["python3"], verify=False))
            owner = create_user(s, "bench").id
        svc = Services.build(settings, db=db, backend=DockerBackend.from_settings(settings)).runner
        svc.open(housekeeping=False)
        try:
            rt = svc.create(owner, name="bench", environment="python3")
            ours: list[float] = []
            raw: list[float] = []
            for i in range(runs + 1):
                began = time.perf_counter()
                svc.start(owner, rt.id)
                done = svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 60)
                took = (time.perf_counter() - began) * 1000
                assert done.state == State.RUNNING, done.state_message
                svc.stop(owner, rt.id)
                svc.wait_for(rt.id, {State.STOPPED}, 60)
                raw_boot, _ = _raw_boot(image, session)
                if i:  # the first is a warm-up
                    ours.append(took)
                    raw.append(raw_boot)
            svc.delete(owner, rt.id)
        finally:
            svc.close()
            db.dispose()
    report(
        f"  in-process (the runner called directly, no HTTP; {runs} runs)",
        ours,
        raw,
        "docker run -d + docker exec",
    )


def run(runs: int = 20) -> None:
    session = uuid.uuid4().hex[:8]
    image = _python3_image()
    try:
        _through_api(runs, session, image)
        _in_process(max(5, runs // 2), session, image)
    finally:
        _remove_leftovers(session)


if __name__ == "__main__":
    run()
