"""Cell round trip: a trivial cell (`1+1`) on a running runtime through the REST API.

Baselines, measured in the same run:
- `docker exec <container> python3 -c 1+1` on the same image (what running a command in a
  container costs without a resident agent);
- jupyter_client talking to ipykernel inside a python3-jupyter container (what a resident
  Jupyter kernel costs), when that base image is built.

Also: stdout throughput streamed to a client over server-sent events, and the agent's
resident memory in an idle runtime.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.bench.networks import remove_networks
from tests.bench.stats import report, summary
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import start_postgres

LABEL = "envctl.bench"

JUPYTER_DRIVER = r"""
import json, statistics, time
from jupyter_client.manager import start_new_kernel
km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
def one():
    msg_id = kc.execute("1+1")
    while True:
        m = kc.get_iopub_msg(timeout=10)
        mine = m["parent_header"].get("msg_id") == msg_id
        if mine and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
    kc.get_shell_msg(timeout=10)
for _ in range(20):
    one()
ts = []
for _ in range(N):
    t = time.perf_counter(); one(); ts.append((time.perf_counter() - t) * 1000)
print(json.dumps(ts))
kc.stop_channels(); km.shutdown_kernel(now=True)
"""


def _container_of(rid: str) -> str:
    out = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=envctl.runtime-id={rid}"], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[0]


def _jupyter_baseline(runs: int, session: str) -> list[float] | None:
    images = subprocess.run(
        ["docker", "images", "-q", "--filter", "label=envctl.base-image=python3-jupyter"],
        capture_output=True,
        text=True,
    ).stdout.split()
    if not images:
        print(
            "  (python3-jupyter image not built: jupyter_client baseline skipped; `envctl base build python3-jupyter`)"
        )
        return None
    cid = subprocess.run(
        ["docker", "run", "-d", "--label", f"{LABEL}={session}", images[0], "sleep", "infinity"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        out = subprocess.run(
            ["docker", "exec", cid, "python3", "-c", JUPYTER_DRIVER.replace("N)", f"{runs})")],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout
        return [float(x) for x in json.loads(out.strip().splitlines()[-1])]
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def _round_trips(client: httpx.Client, srv: Server, url: str, runs: int) -> tuple[list[float], list[float]]:
    """``runs`` one-request round trips of ``1+1`` with httpx, then with http.client."""

    def cell(code: str) -> dict[str, Any]:
        body: dict[str, Any] = client.post(url, params={"wait": 30}, json={"code": code}).json()
        assert body["status"] == "ok", body
        return body

    for _ in range(50):
        cell("1+1")
    ours = []
    for _ in range(runs):
        t = time.perf_counter()
        cell("1+1")
        ours.append((time.perf_counter() - t) * 1000)
    # The same through a lean client (http.client, one kept-alive connection): what the server
    # costs without httpx's own per-request work on this side.
    token = client.headers["Authorization"]
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    headers = {"Authorization": token, "Content-Type": "application/json"}
    lean = []
    for i in range(runs + 50):
        t = time.perf_counter()
        conn.request("POST", f"{url}?wait=30", body=b'{"code":"1+1"}', headers=headers)
        answer = json.loads(conn.getresponse().read())
        if i >= 50:
            lean.append((time.perf_counter() - t) * 1000)
        assert answer["status"] == "ok", answer
    conn.close()
    return ours, lean


def _booted(srv: Server, client: httpx.Client, name: str) -> str:
    rid: str = client.post("/runtimes", json={"environment": "python3", "name": name}).json()["id"]
    rt = client.post(f"/runtimes/{rid}/start", params={"wait": 60}).json()
    assert rt["state"] == "running", rt
    return rid


def _on_postgres(runs: int, session: str, raw: list[float], jupyter: list[float] | None) -> None:
    """The same round trip on PostgreSQL (with its default durability: fsync on), the database
    that several runners share."""
    cluster_run = start_postgres(durable=True)
    cluster = next(cluster_run)
    try:
        url = cluster.create_database("bench_" + session)
        with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
            data = Path(tmp) / "data"
            data.mkdir()
            prepare_data_dir(data, database_url=url)
            srv = Server(
                data,
                env={
                    "ENVCTL_DATABASE_URL": url,
                    "ENVCTL_RUNNER_NAME": f"bench-{session}-pg",
                    "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}",
                },
            )
            srv.start()
            try:
                with srv.client() as client:
                    rid = _booted(srv, client, "bench-pg")
                    ours, lean = _round_trips(client, srv, f"/runtimes/{rid}/executions", runs)
            finally:
                srv.stop()
    finally:
        with contextlib.suppress(StopIteration):
            next(cluster_run)
    report(f"cell round trip on PostgreSQL, httpx ({runs} runs)", ours, raw, "docker exec python3 -c")
    report("  same, client http.client", lean, raw, "docker exec python3 -c")
    if jupyter:
        report("  same (httpx), beside jupyter_client -> ipykernel", ours, jupyter, "jupyter_client", target=1.0)


def run(runs: int = 1000) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        data = Path(tmp) / "data"
        prepare_data_dir(data)
        srv = Server(data, env={"ENVCTL_RUNNER_NAME": f"bench-{session}", "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}"})
        srv.start()
        try:
            with srv.client() as client:
                rid = _booted(srv, client, "bench")
                url = f"/runtimes/{rid}/executions"
                ours, lean = _round_trips(client, srv, url, runs)
                cid = _container_of(rid)
                raw = []
                for _ in range(max(20, runs // 20)):
                    t = time.perf_counter()
                    subprocess.run(["docker", "exec", cid, "python3", "-c", "1+1"], check=True, capture_output=True)
                    raw.append((time.perf_counter() - t) * 1000)
                figures = report(
                    f"cell round trip `1+1` through the REST API on SQLite, one request with ?wait ({runs} runs)",
                    ours,
                    raw,
                    "docker exec python3 -c",
                    target=None,
                )
                s = summary(ours)
                print(
                    f"  envctl p99 {s['p99']:.2f} ms; "
                    f"target: median <= 5 ms ({'met' if s['median'] <= 5 else 'NOT met'})"
                    f" and >= 10x faster than docker exec ({'met' if figures['ratio'] <= 0.1 else 'NOT met'})"
                )
                report("  same cell, client http.client instead of httpx", lean, raw, "docker exec python3 -c")
                figures["lean_median_ms"] = summary(lean)["median"]
                jup = _jupyter_baseline(runs, session)
                if jup:
                    report(
                        "  same (httpx), beside jupyter_client -> ipykernel in a python3-jupyter container",
                        ours,
                        jup,
                        "jupyter_client",
                        target=1.0,
                    )

                # throughput: 8 MB of stdout (under the 10 MB cap) streamed to a client over SSE
                total = 8 * 1024 * 1024
                code = (
                    "import sys\nchunk = 'x' * 1023 + '\\n'\n"
                    f"for _ in range({total // 1024}):\n    sys.stdout.write(chunk)\n"
                )
                ex = client.post(url, json={"code": code}).json()
                received = 0
                t = time.perf_counter()
                with client.stream("GET", f"/executions/{ex['id']}/events", timeout=600) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("data:"):
                            received += len(line)
                took = time.perf_counter() - t
                t = time.perf_counter()
                subprocess.run(["docker", "exec", cid, "python3", "-c", code], check=True, capture_output=True)
                raw_took = time.perf_counter() - t
                ours_mbs, raw_mbs = total / 1048576 / took, total / 1048576 / raw_took
                print(
                    f"stdout throughput, {total / 1048576:.0f} MB printed by a cell ({received / 1048576:.1f} MB of "
                    f"SSE events): envctl {ours_mbs:.1f} MB/s, docker exec to a pipe {raw_mbs:.1f} MB/s, "
                    f"ratio {ours_mbs / raw_mbs:.2f}x"
                )

                # agent memory in an idle runtime: a fresh runtime, booted, no cell run
                idle = {"id": _booted(srv, client, "idle")}
                time.sleep(1)
                icid = _container_of(idle["id"])
                top = subprocess.run(
                    ["docker", "top", icid, "-o", "pid,rss,args"], capture_output=True, text=True
                ).stdout
                agent = [
                    ln
                    for ln in top.splitlines()
                    if "agent/main.py" in ln and "python3" in ln.split(None, 2)[-1].split()[0]
                ]
                rss_kb = int(agent[0].split()[1]) if agent else -1
                print(
                    f"agent resident memory in an idle runtime: {rss_kb / 1024:.1f} MB (target <= 20 MB: "
                    f"{'met' if 0 < rss_kb <= 20 * 1024 else 'NOT met'})"
                )
                figures["agent_rss_mb"] = rss_kb / 1024
        finally:
            srv.stop()
    try:
        _on_postgres(runs, session, raw, jup)
    finally:
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label={LABEL}={session}"], capture_output=True, text=True
        ).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        remove_networks(session)
    return figures


if __name__ == "__main__":
    run()
