"""Booting with mounts through the public HTTP API, beside fetching the same data alone.

A real `envctl serve` (Docker backend, SQLite), moto's S3 server and a git server
(git http-backend) on loopback:

- a 100 MB S3 mount (10 objects of 10 MB): a cold boot (the mount cache emptied first) beside
  boto3 downloading the same objects alone; a warm boot (nothing changed: no download) beside
  ``docker run -d`` + ``docker exec`` (a container that answers, as bench_boot);
- a git mount (a repository of about 5 MB in 200 files): a cold boot beside ``git clone``
  alone, and a warm boot (the mirror fetched again, nothing new).

Each boot is ``POST /runtimes/{id}/start?wait=120`` until ``running``, then a stop; the
baselines run interleaved with ours in the same run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from envs.base import build as base_images
from runner.mounts.s3 import S3Cache
from tests.bench.bench_boot import LABEL, _raw_boot, _remove_leftovers
from tests.bench.stats import report
from tests.fixtures.git_http import GitServer, start_git_server
from tests.fixtures.s3 import start_s3
from tests.fixtures.server import Server, prepare_data_dir

MB = 1024 * 1024


def _timed(fn: Any) -> float:
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1000


def _boot(client: Any, rid: str) -> float:
    began = time.perf_counter()
    rt = client.post(f"/runtimes/{rid}/start", params={"wait": 60}, timeout=130).json()
    while rt["state"] == "booting":
        rt = client.post(f"/runtimes/{rid}/start", params={"wait": 60}, timeout=130).json()
    took = (time.perf_counter() - began) * 1000
    assert rt["state"] == "running", rt
    stopped = client.post(f"/runtimes/{rid}/stop", params={"wait": 60}).json()
    assert stopped["state"] == "stopped", stopped
    return took


def _git_repo(server: GitServer) -> str:
    files = {f"src/m{i:03}.py": os.urandom(12 * 1024).hex() for i in range(200)}  # ~4.8 MB of text
    server.make_repo("bench", files)
    return f"{server.url}/bench.git"


def run(runs: int = 5) -> None:
    session = uuid.uuid4().hex[:8]
    image = base_images.build(["python3"], verify=False)[-1].image_id
    s3_gen = start_s3()
    s3 = next(s3_gen)
    with tempfile.TemporaryDirectory(prefix="envctl-bench-mounts-") as tmp:
        root = Path(tmp)
        git_gen = start_git_server(root / "git")
        git = next(git_gen)
        data = root / "data"
        prepare_data_dir(data)
        srv = Server(
            data,
            env={
                "ENVCTL_RUNNER_NAME": f"bench-{session}",
                "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}",
                "ENVCTL_RUNNER_IDLE_TIMEOUT": "3600",
                "ENVCTL_MOUNTS_ALLOW_HOSTS": "127.0.0.1",
                "ENVCTL_MOUNTS_S3_ENDPOINT_URL": s3.url,
            },
        )
        try:
            client_s3: Any = S3Cache(root / "boto", s3.url).client
            client_s3.create_bucket(Bucket="bench")
            for i in range(10):
                client_s3.put_object(Bucket="bench", Key=f"big/part{i}", Body=os.urandom(10 * MB))
            url = _git_repo(git)
            srv.start()

            def boto3_alone() -> None:
                out = root / "boto-out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                for i in range(10):
                    client_s3.download_file("bench", f"big/part{i}", str(out / f"part{i}"))

            def clone_alone() -> None:
                out = root / "clone-out"
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["git", "clone", "--quiet", url, str(out)], check=True, capture_output=True)

            with srv.client() as client:
                s3_rt = client.post(
                    "/runtimes",
                    json={
                        "environment": "python3",
                        "name": "bench-s3",
                        "mounts": [{"type": "s3", "bucket": "bench", "prefix": "big/", "target": "/data"}],
                    },
                ).json()["id"]
                git_rt = client.post(
                    "/runtimes",
                    json={
                        "environment": "python3",
                        "name": "bench-git",
                        "mounts": [{"type": "git", "url": url, "target": "/mnt/code"}],
                    },
                ).json()["id"]
                _boot(client, s3_rt)  # warm-ups, not counted
                _boot(client, git_rt)
                cold_s3, warm_s3, boto, cold_git, warm_git, clone, raw = [], [], [], [], [], [], []
                for _ in range(runs):
                    shutil.rmtree(data / "mounts" / "s3", ignore_errors=True)
                    cold_s3.append(_boot(client, s3_rt))
                    boto.append(_timed(boto3_alone))
                    warm_s3.append(_boot(client, s3_rt))
                    raw.append(_raw_boot(image, session)[0])
                    shutil.rmtree(data / "mounts" / "git", ignore_errors=True)
                    cold_git.append(_boot(client, git_rt))
                    clone.append(_timed(clone_alone))
                    warm_git.append(_boot(client, git_rt))
                report(f"boot with a 100 MB S3 mount, cold cache ({runs} runs)", cold_s3, boto, "boto3 download alone")
                report(f"boot with a 100 MB S3 mount, warm cache ({runs} runs)", warm_s3, raw, "docker run + exec")
                report(f"boot with a git mount (~5 MB), cold cache ({runs} runs)", cold_git, clone, "git clone alone")
                report(f"boot with a git mount, warm cache ({runs} runs)", warm_git, raw, "docker run + exec")
                for rid in (s3_rt, git_rt):
                    client.delete(f"/runtimes/{rid}")
        finally:
            srv.stop()
            _remove_leftovers(session)
            for gen in (git_gen, s3_gen):
                gen.close()


if __name__ == "__main__":
    run()
