"""What the agent's memory watch (runner/agent/memwatch.py) costs a cell, on Kubernetes pods.

The single-node cluster of ``scripts/kube-fixture`` (root only), two ``envctl serve`` in one
namespace: one with the default watch (``ENVCTL_RUNNER_MEMORY_PRESSURE=90``, a read of the pod's
memory cgroup every 0.1 s while a cell runs), one with it off (``0``). Each boots a runtime of
the same machine type; cells alternate between them, through the API
(``POST /runtimes/{id}/executions?wait``):

- ``true``: a trivial cell's round trip (the watch wakes when a cell starts);
- a bash loop that keeps the pod's CPU (0.25 of a core) busy for about a second, so that the
  watch's reads fall inside the cell (ten of them a second).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.bench.stats import report

REPO = Path(__file__).resolve().parents[2]
BUSY = "for i in $(seq 1 200000); do :; done"
BUSY_RUNS = int(os.environ.get("ENVCTL_BENCH_MEMWATCH_BUSY") or 20)  # of each kind
# the watched server's setting; 0 makes an A/A run that shows what two pods differ by without it
ON = os.environ.get("ENVCTL_BENCH_MEMWATCH_ON") or "90"


def _boot(client: httpx.Client) -> str:
    body = {"environment": "bash", "name": "memwatch", "language": "bash", "machine_type": "small"}
    rid = str(client.post("/runtimes", json=body).json()["id"])
    client.post(f"/runtimes/{rid}/start")
    deadline = time.monotonic() + 300
    while (rt := client.get(f"/runtimes/{rid}").json())["state"] not in ("running", "error"):
        assert time.monotonic() < deadline, rt
        time.sleep(0.1)
    assert rt["state"] == "running", rt
    return rid


def _alternate(pairs: list[tuple[httpx.Client, str]], code: str, runs: int) -> tuple[list[float], list[float]]:
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(runs * 2):
        c, rid = pairs[i % 2]
        t = time.perf_counter()
        ex = c.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json={"code": code}).json()
        times[i % 2].append((time.perf_counter() - t) * 1000)
        assert ex.get("status") == "ok", ex
    return times


def run(runs: int = 100) -> dict[str, float]:
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    from tests.fixtures import kube_cluster
    from tests.fixtures.kube import make_namespace
    from tests.fixtures.server import Server
    from tests.kube.envctl_server import kube_server, remove_installation

    if (why := kube_cluster.missing()) is not None:
        print(f"memwatch benchmark skipped: {why}")
        return {}
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="envctl-bench-memwatch-") as tmp:
        directory = Path(tmp) / "cluster"
        subprocess.run([str(REPO / "scripts" / "kube-fixture"), "up", str(directory)], check=True)
        kubeconfig = directory / "kubeconfig"
        api = kconfig.new_client_from_config(config_file=str(kubeconfig))
        core = kclient.CoreV1Api(api)
        namespace = make_namespace(core, "envctl-bench")
        servers: list[Server] = []
        try:
            for name, percent in (("on", ON), ("off", "0")):
                srv = kube_server(kubeconfig, namespace, Path(tmp) / name, ENVCTL_RUNNER_MEMORY_PRESSURE=percent)
                srv.start()
                servers.append(srv)
            clients = [srv.client() for srv in servers]
            try:
                pairs: list[tuple[httpx.Client, Any]] = [(c, _boot(c)) for c in clients]
                _alternate(pairs, "true", 10)  # warm up both
                on, off = _alternate(pairs, "true", runs)
                figures["true"] = report(
                    f"cell round trip `true` on a pod with the memory watch ({runs} runs each, alternating)",
                    on,
                    off,
                    "the same with ENVCTL_RUNNER_MEMORY_PRESSURE=0",
                )["ratio"]
                on, off = _alternate(pairs, BUSY, BUSY_RUNS)
                figures["busy"] = report(
                    f"a busy cell of about a second on a pod with the memory watch ({BUSY_RUNS} runs each)",
                    on,
                    off,
                    "the same with ENVCTL_RUNNER_MEMORY_PRESSURE=0",
                )["ratio"]
                for c, rid in pairs:
                    c.delete(f"/runtimes/{rid}")
            finally:
                for c in clients:
                    c.close()
        finally:
            for srv in servers:
                remove_installation(kubeconfig, namespace, srv)
            core.delete_namespace(namespace, grace_period_seconds=0)
            api.close()
            subprocess.run([str(REPO / "scripts" / "kube-fixture"), "down", str(directory)], check=False)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    run()
