"""Create -> first cell result through the public HTTP API, from the warm pool and without it.

Two real `envctl serve` processes (Docker backend, SQLite) on the same engine, one with
``ENVCTL_RUNNER_POOL=python3:small=2`` and one without, each reached with an ordinary HTTP
client on a kept-alive connection (httpx). One request per run, as an editor opening a
notebook makes it: ``POST /runtimes?wait=30`` with ``{"cell": {"code": "print(1)"}}``; the
clock stops when the answer (the runtime and its finished execution) has arrived. Between runs
(not timed) the runtime is deleted and, for the pooled server, the pool has refilled.

Baseline, interleaved with ours in the same run on the same image: the Docker CLI's
``docker run -d`` of a long-lived process followed by ``docker exec`` of ``python3 -c
'print(1)'`` (a container that has run a first command). The pooled figure is also shown
beside the unpooled one.

Pool memory per waiting runtime: the memory cgroup of each waiting container (its resident
set, ``total_rss``, and its whole charge with page cache, ``usage_in_bytes``; cgroup v2:
``anon`` and ``memory.current``).
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

from envs.base import build as base_images
from tests.bench.stats import report
from tests.fixtures.server import Server, prepare_data_dir

LABEL = "envctl.bench"
CELL = {"code": "print(1)"}
TARGET_MS = 25.0


def _raw(image: str, session: str) -> float:
    began = time.perf_counter()
    cid = subprocess.run(
        ["docker", "run", "-d", "--label", f"{LABEL}={session}", image, "sleep", "infinity"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    out = subprocess.run(["docker", "exec", cid, "python3", "-c", "print(1)"], check=True, capture_output=True)
    took = (time.perf_counter() - began) * 1000
    assert out.stdout == b"1\n"
    subprocess.run(["docker", "rm", "-f", cid], check=True, capture_output=True)
    return took


def _remove_leftovers(session: str) -> None:
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL}={session}"], capture_output=True, text=True
    ).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


def _wait_pool(client: httpx.Client, waiting: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get("/pool").json()
        if sum(t["waiting"] for t in body["targets"]) >= waiting:
            return body
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not fill: {body}")
        time.sleep(0.05)


def _create_and_run(client: httpx.Client, name: str) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    r = client.post("/runtimes", params={"wait": 30}, json={"environment": "python3", "name": name, "cell": CELL})
    took = (time.perf_counter() - began) * 1000
    body: dict[str, Any] = r.json()
    assert r.status_code == 201, r.text
    ex = body["execution"]
    assert ex["status"] == "ok" and ex["outputs"][0]["text"] == "1\n", ex
    return took, body


def _memory(container: str) -> tuple[int, int] | None:
    """(resident, whole charge) in bytes of a container's memory cgroup; None if not found."""
    cid = subprocess.run(
        ["docker", "inspect", "-f", "{{.Id}}", container], capture_output=True, text=True
    ).stdout.strip()
    v1 = Path(f"/sys/fs/cgroup/memory/docker/{cid}")
    if v1.is_dir():
        stat = dict(line.split() for line in (v1 / "memory.stat").read_text().splitlines())
        return int(stat.get("total_rss", stat.get("rss", 0))), int((v1 / "memory.usage_in_bytes").read_text())
    for v2 in (Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope"), Path(f"/sys/fs/cgroup/docker/{cid}")):
        if v2.is_dir():
            stat = dict(line.split() for line in (v2 / "memory.stat").read_text().splitlines())
            return int(stat.get("anon", 0)), int((v2 / "memory.current").read_text())
    return None


def _server(tmp: str, name: str, session: str, **env: str) -> Server:
    data = Path(tmp) / name
    prepare_data_dir(data)
    srv = Server(
        data,
        env={
            "ENVCTL_RUNNER_NAME": f"bench-{name}-{session}",
            "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}",
            "ENVCTL_RUNNER_IDLE_TIMEOUT": "3600",
            **env,
        },
    )
    srv.start()
    return srv


def run(runs: int = 30) -> None:
    session = uuid.uuid4().hex[:8]
    image = base_images.build(["python3"], verify=False)[-1].image_id
    with tempfile.TemporaryDirectory(prefix="envctl-bench-pool-") as tmp:
        pooled_srv = _server(tmp, "pooled", session, ENVCTL_RUNNER_POOL="python3:small=2")
        plain_srv = _server(tmp, "plain", session)
        try:
            with pooled_srv.client() as pooled, plain_srv.client() as plain:
                _wait_pool(pooled, 2)
                for client in (pooled, plain):  # warm-up of each, not counted
                    _, rt = _create_and_run(client, "warm-up")
                    client.delete(f"/runtimes/{rt['id']}")
                _raw(image, session)
                ours, unpooled, raw = [], [], []
                for i in range(runs):
                    _wait_pool(pooled, 2)
                    time.sleep(0.2)  # the refill's boot over: the machine as quiet as for the others
                    took, rt = _create_and_run(pooled, f"p{i}")
                    assert rt["origin"] == "pool", rt
                    ours.append(took)
                    pooled.delete(f"/runtimes/{rt['id']}")
                    took, rt = _create_and_run(plain, f"u{i}")
                    assert rt["origin"] == "boot", rt
                    unpooled.append(took)
                    plain.delete(f"/runtimes/{rt['id']}")
                    raw.append(_raw(image, session))
                report(
                    f"create -> first cell result from the warm pool: POST /runtimes?wait with a cell ({runs} runs, "
                    f"httpx keep-alive; target <= {TARGET_MS:g} ms median: "
                    f"{'met' if statistics.median(ours) <= TARGET_MS else 'NOT met'})",
                    ours,
                    raw,
                    "docker run -d + docker exec python3",
                )
                report(
                    "the same, from the pool, beside the same without a pool (a boot per runtime)",
                    ours,
                    unpooled,
                    "envctl without a pool",
                )
                report("create -> first cell without a pool", unpooled, raw, "docker run -d + docker exec python3")
                pool = _wait_pool(pooled, 2)
                sizes = [m for m in (_memory(e["container"]) for e in pool["entries"] if e["container"]) if m]
                if sizes:
                    rss = statistics.mean(m[0] for m in sizes) / 2**20
                    charge = statistics.mean(m[1] for m in sizes) / 2**20
                    limit = pool["memory_reserved"] / len(sizes) / 2**30
                    print(
                        f"pool memory per waiting runtime ({len(sizes)} containers, python3 on small): "
                        f"{rss:.1f} MiB resident, {charge:.1f} MiB with page cache "
                        f"(the budget counts the machine type's limit, {limit:g} GiB)"
                    )
        finally:
            pooled_srv.stop()
            plain_srv.stop()
            _remove_leftovers(session)


if __name__ == "__main__":
    run()
