"""Saves and deep lineages.

1. Save of a runtime with 10 MB, 100 MB and 1 GB of changes through the API (202, then the
   operation until it succeeds), beside `docker commit` of the same container state in the
   same run. Target: <= 1.15x.
2. Boot of a runtime from a version 130 saves deep beside a boot from its base (python3@1).
   Target: <= 1.2x.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.bench.networks import remove_networks
from tests.bench.stats import report
from tests.fixtures.server import Server, prepare_data_dir

LABEL = "envctl.bench"


def _save(client: httpx.Client, rid: str, env: str) -> dict[str, Any]:
    r = client.post(f"/runtimes/{rid}/save", json={"environment": env})
    assert r.status_code == 202, r.text
    op = r.json()
    while op["status"] == "running":
        op = client.get(f"/operations/{op['id']}", params={"wait": 30}).json()
    assert op["status"] == "succeeded", op
    return op


def _cell(client: httpx.Client, rid: str, code: str) -> None:
    r = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json={"code": code, "language": "bash"})
    ex = r.json()
    while ex["status"] in ("queued", "running"):
        ex = client.get(f"/executions/{ex['id']}", params={"wait": 30}).json()
    assert ex["status"] == "ok", ex


def _container(rid: str) -> str:
    return subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=envctl.runtime-id={rid}"], capture_output=True, text=True, check=True
    ).stdout.split()[0]


def _boot(srv: Server, client: httpx.Client, rid: str) -> float:
    t = time.perf_counter()
    client.post(f"/runtimes/{rid}/start")
    while True:
        rt = client.get(f"/runtimes/{rid}").json()
        if rt["state"] in ("running", "error"):
            break
        time.sleep(0.005)
    took = (time.perf_counter() - t) * 1000
    assert rt["state"] == "running", rt
    client.post(f"/runtimes/{rid}/stop")
    srv.wait_state(client, rid, {"stopped"})
    return took


def run(runs: int = 3, depth: int = 130) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        data = Path(tmp) / "data"
        prepare_data_dir(data)
        srv = Server(data, env={"ENVCTL_RUNNER_NAME": f"bench-{session}", "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}"})
        srv.start()
        try:
            with srv.client() as client:
                # small saves are quick and noisy: more runs, so that the median means something
                for size_mb, n in ((10, runs * 3), (100, runs), (1024, max(1, runs - 1))):
                    rt = client.post(
                        "/runtimes", json={"environment": "python3", "name": f"s{size_mb}", "language": "bash"}
                    ).json()
                    rid = rt["id"]
                    _cell(client, rid, f"head -c {size_mb * 1048576} /dev/urandom > /root/blob.bin")
                    cid = _container(rid)
                    ours, raw = [], []
                    for i in range(n):
                        t = time.perf_counter()
                        image = subprocess.run(
                            ["docker", "commit", cid, f"envctl-bench/raw:{session}-{i}"],
                            capture_output=True,
                            text=True,
                            check=True,
                        ).stdout.strip()
                        raw.append((time.perf_counter() - t) * 1000)
                        subprocess.run(["docker", "rmi", image], capture_output=True)
                        t = time.perf_counter()
                        op = _save(client, rid, f"bench-{size_mb}")
                        ours.append((time.perf_counter() - t) * 1000)
                        figures[f"save_{size_mb}_image"] = 0
                        del op
                    f = report(f"save with {size_mb} MB of changes ({n} runs)", ours, raw, "docker commit", target=1.15)
                    figures[f"save_{size_mb}MB_ratio"] = f["ratio"]
                    client.delete(f"/runtimes/{rid}")

                # a chain `depth` saves deep
                t0 = time.perf_counter()
                env = "python3"
                for i in range(1, depth + 1):
                    rid = client.post(
                        "/runtimes", json={"environment": env, "name": f"c{i}", "language": "bash"}
                    ).json()["id"]
                    _cell(client, rid, f"echo {i} >> /root/chain")
                    _save(client, rid, "deep")
                    client.delete(f"/runtimes/{rid}")
                    env = "deep"
                print(f"built a chain of {depth} saves in {time.perf_counter() - t0:.0f} s")
                deep = client.post("/runtimes", json={"environment": f"deep@{depth}", "name": "deep"}).json()["id"]
                base = client.post("/runtimes", json={"environment": "python3@1", "name": "base"}).json()["id"]
                _boot(srv, client, deep)
                _boot(srv, client, base)
                deep_ms, base_ms = [], []
                for _ in range(10):
                    deep_ms.append(_boot(srv, client, deep))
                    base_ms.append(_boot(srv, client, base))
                f = report(
                    f"boot from a version {depth} saves deep (10 runs)",
                    deep_ms,
                    base_ms,
                    "boot from python3@1",
                    target=1.2,
                )
                figures["deep_boot_ratio"] = f["ratio"]
                figures["deep_boot_median_ms"] = statistics.median(deep_ms)
        finally:
            srv.stop()
            ids = subprocess.run(
                ["docker", "ps", "-aq", "--filter", f"label={LABEL}={session}"], capture_output=True, text=True
            ).stdout.split()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
            subprocess.run(
                ["docker", "image", "prune", "-af", "--filter", f"label={LABEL}={session}"], capture_output=True
            )
            remove_networks(session)
    return figures


if __name__ == "__main__":
    run()
