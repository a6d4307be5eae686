"""Mounts and results on a Docker Swarm (issue 15 item 4), through the API.

A three-engine swarm of ``scripts/swarm-fixture`` (root only), one ``envctl serve`` with
``ENVCTL_RUNNER_BACKEND=swarm`` and moto's S3 server on loopback. Figures, each beside its
baseline in the same run, alternating:

- boot on worker1 with a 20 MB S3 mount (4 objects of 5 MB; envctl's cache warm, so what is
  timed is the stream into the runtime) until ``running``, beside the same boot without mounts;
- a cell that writes a 1 MB file under ``/results`` (fetched, stored and recorded before the
  cell's end is answered) beside the same cell writing to ``/tmp``;
- the results check by itself (the agent's ``results`` with nothing to send, on a kept
  connection) beside a ``ping`` on the same connection;
- a cell ``true`` (the results check on the kept connection included) beside ``docker exec
  true`` in the same container on the worker's engine.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.bench.bench_swarm import _backend_state, _engine
from tests.bench.stats import report

MB = 1024 * 1024


def _boot(client: httpx.Client, mounts: list[dict[str, object]]) -> tuple[float, str]:
    body = {"environment": "bash", "name": f"m-{uuid.uuid4().hex[:6]}", "language": "bash", "machine_type": "w1"}
    t = time.perf_counter()
    rid = str(client.post("/runtimes", json={**body, "mounts": mounts}).json()["id"])
    client.post(f"/runtimes/{rid}/start")
    while (rt := client.get(f"/runtimes/{rid}").json())["state"] == "booting":
        time.sleep(0.01)
    ms = (time.perf_counter() - t) * 1000
    assert rt["state"] == "running", rt
    return ms, rid


def _cell(client: httpx.Client, rid: str, code: str) -> float:
    t = time.perf_counter()
    ex = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json={"code": code}).json()
    ms = (time.perf_counter() - t) * 1000
    assert ex["status"] == "ok", ex
    return ms


def _results_check(srv: Any, rid: str, runs: int) -> tuple[list[float], list[float]]:
    """What the after-cell results check costs by itself: ``fetch`` on a kept connection to the
    runtime's agent beside a ``ping`` on the same connection, alternating."""
    from registry.team_secrets import SecretBox
    from runner.agentauth import AgentLinks
    from runner.cells.result_remote import fetch
    from runner.channel import AgentChannel

    to = AgentLinks(SecretBox(srv.data_dir / "secrets.key")).address(rid, _backend_state(srv, rid)["agent"])
    check, ping = [], []
    with tempfile.TemporaryDirectory() as copy, AgentChannel(to, timeout=30) as channel:
        for _ in range(runs):
            t = time.perf_counter()
            fetch(channel, Path(copy), "/nonexistent-results")
            check.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            channel.ping()
            ping.append((time.perf_counter() - t) * 1000)
    return check, ping


def run(runs: int = 60) -> dict[str, float]:
    from runner.mounts.s3 import S3Cache
    from tests.fixtures.s3 import start_s3
    from tests.fixtures.swarm import Swarm, _missing, _read_env, _script
    from tests.fixtures.swarm_envctl import remove_installation, swarm_server

    if (why := _missing()) is not None:
        print(f"swarm mounts benchmark skipped: {why}")
        return {}
    figures: dict[str, float] = {}
    s3_gen = iter(start_s3())
    s3 = next(s3_gen)
    with tempfile.TemporaryDirectory(prefix="envctl-bench-swmounts-") as tmp:
        directory = Path(tmp) / "swarm"
        _script("up", directory)
        env = _read_env(directory / "env")
        swarm = Swarm(directory, env, tuple(env["ENVCTL_SWARM_NODES"].split()))
        srv = swarm_server(
            swarm, Path(tmp) / "data", ENVCTL_MOUNTS_ALLOW_HOSTS="127.0.0.1", ENVCTL_MOUNTS_S3_ENDPOINT_URL=s3.url
        )
        srv.start()
        try:
            bucket = S3Cache(Path(tmp) / "s3c", s3.url).client
            bucket.create_bucket(Bucket="bench")
            for i in range(4):
                bucket.put_object(Bucket="bench", Key=f"in/part-{i}.bin", Body=os.urandom(5 * MB))
            mounts: list[dict[str, object]] = [{"type": "s3", "bucket": "bench", "prefix": "in/", "target": "/data"}]
            with srv.client() as client:
                for m in (mounts, []):  # the image on worker1 and envctl's cache warm before timing
                    client.delete(f"/runtimes/{_boot(client, m)[1]}")
                with_mount: list[float] = []
                without: list[float] = []
                for _ in range(4):
                    for m, into in ((mounts, with_mount), ([], without)):
                        ms, rid = _boot(client, m)
                        into.append(ms)
                        client.delete(f"/runtimes/{rid}")
                figures["boot_20mb_mount"] = report(
                    "boot on a Swarm worker with a 20 MB S3 mount streamed in, until running (4 runs each)",
                    with_mount,
                    without,
                    "the same boot without mounts",
                )["ratio"]

                _ms, rid = _boot(client, [])
                to_results: list[float] = []
                to_tmp: list[float] = []
                for i in range(runs // 3):
                    for path, into in (("/results/r.bin", to_results), ("/tmp/r.bin", to_tmp)):
                        into.append(_cell(client, rid, f"head -c {MB} /dev/urandom > {path}; echo {i}"))
                figures["result_1mb"] = report(
                    f"cell writing a 1 MB file to /results (fetched and stored), {runs // 3} runs each",
                    to_results,
                    to_tmp,
                    "the same cell writing to /tmp",
                )["ratio"]

                sid = _backend_state(srv, rid)["service_id"]
                worker = _engine(env, "worker1")
                [container] = worker.api.containers(filters={"label": f"com.docker.swarm.service.id={sid}"})
                ours, raw = [], []
                for _ in range(runs):
                    ours.append(_cell(client, rid, "true"))
                    t = time.perf_counter()
                    e = worker.api.exec_create(container["Id"], ["true"])
                    worker.api.exec_start(e["Id"])
                    raw.append((time.perf_counter() - t) * 1000)
                worker.close()
                check, ping = _results_check(srv, rid, runs)
                figures["results_check"] = report(
                    f"the results check alone (empty /results) on a kept connection ({runs} runs each)",
                    check,
                    ping,
                    "a ping on the same connection",
                )["ratio"]
                figures["cell"] = report(
                    f"cell `true` on a Swarm worker, the results check included ({runs} runs each)",
                    ours,
                    raw,
                    "docker exec on the worker",
                )["ratio"]
                client.delete(f"/runtimes/{rid}")
        finally:
            remove_installation(swarm, srv)
            _script("down", directory)
            for _ in s3_gen:  # the endpoint stopped
                pass
    return figures
