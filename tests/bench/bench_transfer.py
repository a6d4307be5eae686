"""Push and pull through the registry (issue 8 item 4).

1. Push and pull of a version through envctl's public API (``POST /environments/{ref}/push``
   and ``/pull``, then the operation until it ends) beside raw ``docker push`` / ``docker pull``
   of the same image to the same managed registry in the same run. Target: <= 1.1x. The
   version is the ``bash`` base (~160 MB) plus a save of 200 MB of random bytes: a push sends
   every layer (the registry's storage is emptied before each push, envctl's and docker's
   alike), a pull fetches the 200 MB layer (the engine keeps the base's layers: they are the
   base image's, not ours to remove).
2. Bytes the registry received for a child version that adds 1 MB (counted from the
   registry's storage). Target: <= 2 MB.

``python -m tests.bench.run --only transfer [--runs N]``
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.bench.bench_save import _cell
from tests.bench.networks import remove_networks
from tests.bench.stats import report
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import _free_port
from tests.fixtures.transfer import MB, blobs_of

LABEL = "envctl.bench"
CHANGES_MB = 200


def _operation(client: httpx.Client, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == 202, r.text
    op = r.json()
    while op["status"] == "running":
        op = client.get(f"/operations/{op['id']}", params={"wait": 10}).json()
    assert op["status"] == "succeeded", op
    return op


def _docker(config: Path, *args: str) -> str:
    done = subprocess.run(["docker", "--config", str(config), *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _fresh_registry(srv: Server) -> None:
    """envctl serve stopped (and its registry with it), the registry's storage emptied, started."""
    srv.stop()
    shutil.rmtree(srv.data_dir / "registry" / "storage", ignore_errors=True)
    srv.start()


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def run(runs: int = 3) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    figures: dict[str, float] = {}
    env = f"bench-big-{session}"  # no team: envctl's admin pushes it (a save does not push it by itself)
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        data = Path(tmp) / "data"
        docker_config = Path(tmp) / "docker-config"  # docker login's credentials stay in here
        docker_config.mkdir()
        prepare_data_dir(data, ["bash"])
        port = _free_port()
        srv = Server(
            data,
            env={
                "ENVCTL_RUNNER_NAME": f"bench-{session}",
                "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}",
                "ENVCTL_REGISTRY": "managed",
                "ENVCTL_REGISTRY_PORT": str(port),
            },
        )
        srv.start()
        host = f"127.0.0.1:{port}"
        raw_repo = f"{host}/bench-raw-{session}"
        try:
            with srv.client() as client:
                rid = client.post("/runtimes", json={"environment": "bash", "name": "big", "language": "bash"}).json()[
                    "id"
                ]
                _cell(client, rid, f"head -c {CHANGES_MB * MB} /dev/urandom > /root/blob.bin")
                version = _operation(client, f"/runtimes/{rid}/save", {"environment": env})["result"]
                image = version["image_id"]
                ref = version["version"]
                client.delete(f"/runtimes/{rid}")
            token = (data / "admin-token").read_text().strip()
            ours_push, raw_push, ours_pull, raw_pull = [], [], [], []
            for i in range(runs):
                _fresh_registry(srv)
                with srv.client() as client:
                    ours_push.append(_timed(lambda c=client: _operation(c, f"/environments/{ref}/push")))
                    subprocess.run(["docker", "rmi", "-f", image], capture_output=True, check=False)
                    ours_pull.append(_timed(lambda c=client: _operation(c, f"/environments/{ref}/pull")))
                _fresh_registry(srv)
                subprocess.run(
                    ["docker", "--config", str(docker_config), "login", host, "-u", "admin", "--password-stdin"],
                    input=token,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                _docker(docker_config, "tag", image, f"{raw_repo}:{i}")
                raw_push.append(_timed(lambda n=i: _docker(docker_config, "push", f"{raw_repo}:{n}")))
                digest = json.loads(_docker(docker_config, "image", "inspect", image))[0]["RepoDigests"]
                pinned = next(d for d in digest if d.startswith(raw_repo + "@"))
                subprocess.run(["docker", "rmi", "-f", image], capture_output=True, check=False)
                raw_pull.append(_timed(lambda p=pinned: _docker(docker_config, "pull", p)))
            figures["push_ratio"] = report(
                f"push of {ref} (~{CHANGES_MB} MB layer on the bash base, every layer sent; {runs} runs)",
                ours_push,
                raw_push,
                "docker push",
                target=1.1,
            )["ratio"]
            figures["pull_ratio"] = report(
                f"pull of {ref} by digest (its {CHANGES_MB} MB layer fetched; {runs} runs)",
                ours_pull,
                raw_pull,
                "docker pull",
                target=1.1,
            )["ratio"]

            # a child that adds 1 MB, pushed when its parent is in the registry
            _fresh_registry(srv)
            with srv.client() as client:
                _operation(client, f"/environments/{ref}/push")
                rid = client.post("/runtimes", json={"environment": ref, "name": "child", "language": "bash"}).json()[
                    "id"
                ]
                _cell(client, rid, f"head -c {MB} /dev/urandom > /root/child.bin")
                child = _operation(client, f"/runtimes/{rid}/save", {"environment": env})["result"]["version"]
                storage = data / "registry" / "storage"
                before = blobs_of(storage)
                op = _operation(client, f"/environments/{child}/push")
                received = sum(n for d, n in blobs_of(storage).items() if d not in before)
                client.delete(f"/runtimes/{rid}")
            figures["child_bytes"] = received
            verdict = "met" if received <= 2 * MB else "NOT met"
            print(f"bytes the registry received for a child adding 1 MB: {received} ({received / MB:.2f} MB)")
            print(f"  the push reported {op['result']['bytes']} bytes travelled; target <= 2 MB: {verdict}")
        finally:
            srv.stop()
            containers = _labelled(session, "ps", "-aq")
            if containers:
                subprocess.run(["docker", "rm", "-f", *containers], capture_output=True, check=False)
            for _ in range(2):  # the bench's saves (labelled), every name of them; children go first
                images = _labelled(session, "images", "-q")
                for image in dict.fromkeys(images):
                    subprocess.run(["docker", "rmi", "-f", image], capture_output=True, check=False)
            remove_networks(session)
    return figures


def _labelled(session: str, *command: str) -> list[str]:
    out = subprocess.run(
        ["docker", *command, "--filter", f"label={LABEL}={session}"], capture_output=True, text=True, check=False
    ).stdout
    return out.split()
