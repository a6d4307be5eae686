"""Boot latency: stopped -> running with the agent answering, image local.

Baseline, measured in the same run on the same image: the Docker CLI's `docker run -d` of a
long-lived process followed by a first `docker exec` into it (what "a container that can run
a command" costs without envctl).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from api.dbschema import upgrade
from envs.base import build as base_images
from envs.kit.config import Settings
from envs.kit.db import Database
from envs.service import register_base_images
from registry.service import create_user
from runner.backends.docker import DockerBackend
from runner.service import RunnerService
from runner.states import State
from tests.bench.stats import report

LABEL = "envctl.bench"


def _raw_boot(image: str, session: str) -> float:
    began = time.perf_counter()
    cid = subprocess.run(
        ["docker", "run", "-d", "--label", f"{LABEL}={session}", image, "sleep", "infinity"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(["docker", "exec", cid, "true"], check=True, capture_output=True)
    took = (time.perf_counter() - began) * 1000
    subprocess.run(["docker", "rm", "-f", cid], check=True, capture_output=True)
    return took


def run(runs: int = 20) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            runner_name=f"bench-{session}",
            runner_labels={LABEL: session},
            runner_idle_timeout=3600,
        )
        upgrade(settings.effective_database_url)
        db = Database(settings.effective_database_url)
        built = base_images.build(["python3"], verify=False)
        with db.session() as s:
            register_base_images(s, built)
            owner = create_user(s, "bench").id
        image = built[-1].image_id
        svc = RunnerService(settings, db, DockerBackend.from_settings(settings))
        svc.open(housekeeping=False)
        try:
            rt = svc.create(owner, name="bench", environment="python3")
            # one warm-up of each, not counted
            svc.start(owner, rt.id)
            svc.wait_for(rt.id, {State.RUNNING}, 60)
            svc.stop(owner, rt.id)
            svc.wait_for(rt.id, {State.STOPPED}, 60)
            _raw_boot(image, session)
            ours: list[float] = []
            raw: list[float] = []
            for _ in range(runs):  # interleaved, so both see the same machine noise
                began = time.perf_counter()
                svc.start(owner, rt.id)
                done = svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 60)
                ours.append((time.perf_counter() - began) * 1000)
                assert done.state == State.RUNNING, done.state_message
                svc.stop(owner, rt.id)
                svc.wait_for(rt.id, {State.STOPPED}, 60)
                raw.append(_raw_boot(image, session))
            svc.delete(owner, rt.id)
        finally:
            svc.close()
            db.dispose()
            leftovers = subprocess.run(
                ["docker", "ps", "-aq", "--filter", f"label={LABEL}={session}"],
                capture_output=True,
                text=True,
            ).stdout.split()
            if leftovers:
                subprocess.run(["docker", "rm", "-f", *leftovers], capture_output=True)
    return report(
        f"boot latency, stopped -> running with the agent answering ({runs} runs, image python3)",
        ours,
        raw,
        "docker run -d + docker exec",
        target=1.3,
    )


if __name__ == "__main__":
    run()
