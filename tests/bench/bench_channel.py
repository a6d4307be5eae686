"""The agent over the network: a cell's round trip on the tcp channel beside the Unix socket.

Two `envctl serve`s in the same run, alike but for ENVCTL_RUNNER_CHANNEL (unix, the baseline,
and tcp: TLS 1.3 pinned per boot, after the HMAC handshake), each with one python3 runtime of
the same machine type. `POST /runtimes/{id}/executions?wait` with `1+1`, one kept-alive
client per server, the two measured in alternating blocks so that drift on a shared machine
falls on both; medians compared. Target: tcp <= 1.2x unix.

Also, beside the same baseline: stdout streamed from a cell (8 MB) to a client over
server-sent events, and what a fresh connection costs (a ping on a new connection: the TLS
and HMAC handshakes, which the cell worker's kept connection pays once).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import httpx

from tests.bench.stats import report
from tests.bench.through_api import booted, cell
from tests.fixtures.server import Server, prepare_data_dir
from tests.runner.conftest import remove_fence

LABEL = "envctl.bench"
BLOCK = 20


def _server(root: Path, session: str, channel: str) -> Server:
    data = root / channel
    data.mkdir()
    prepare_data_dir(data)
    srv = Server(
        data,
        env={
            "ENVCTL_RUNNER_NAME": f"bench-{session}-{channel}",
            "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}",
            "ENVCTL_RUNNER_CHANNEL": channel,
        },
    )
    srv.start()
    return srv


def _stream(client: httpx.Client, url: str, total: int) -> float:
    code = f"import sys\nchunk = 'x' * 1023 + '\\n'\nfor _ in range({total // 1024}):\n    sys.stdout.write(chunk)\n"
    ex = client.post(url, json={"code": code}).json()
    t = time.perf_counter()
    with client.stream("GET", f"/executions/{ex['id']}/events", timeout=600) as resp:
        for _line in resp.iter_lines():
            pass
    return total / 1048576 / (time.perf_counter() - t)


def _fresh_pings(srv: Server, rid: str, n: int) -> list[float]:
    """A ping on a new connection, as envctl makes it (an interrupt, a stat, a boot's wait)."""
    from envs.kit.db import Database
    from registry.team_secrets import SecretBox
    from runner.agentauth import AgentLinks
    from runner.channel import ping
    from runner.models import Runtime

    db = Database(f"sqlite:///{srv.data_dir / 'envctl.db'}")
    try:
        with db.session() as s:
            row = s.get(Runtime, rid)
            assert row is not None
            agent = dict(row.backend_state or {}).get("agent")
    finally:
        db.dispose()
    target: Any = (
        AgentLinks(SecretBox(srv.data_dir / "secrets.key")).address(rid, agent)
        if agent
        else srv.data_dir / "runtimes" / rid / "agent.sock"
    )
    out = []
    for _ in range(n):
        t = time.perf_counter()
        ping(target, timeout=5)
        out.append((time.perf_counter() - t) * 1000)
    return out


def run(runs: int = 1000) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        unix = _server(Path(tmp), session, "unix")
        tcp = _server(Path(tmp), session, "tcp")
        try:
            with unix.client() as uc, tcp.client() as tc:
                urid, trid = booted(uc, "bench-unix"), booted(tc, "bench-tcp")
                uurl, turl = f"/runtimes/{urid}/executions", f"/runtimes/{trid}/executions"
                for _ in range(50):
                    cell(uc, uurl)
                    cell(tc, turl)
                times: dict[str, list[float]] = {"unix": [], "tcp": []}
                done = 0
                while done < runs:
                    for name, client, url in (("unix", uc, uurl), ("tcp", tc, turl)):
                        for _ in range(min(BLOCK, runs - done)):
                            t = time.perf_counter()
                            cell(client, url)
                            times[name].append((time.perf_counter() - t) * 1000)
                    done += min(BLOCK, runs - done)
                figures = report(
                    f"cell round trip `1+1` through the REST API, agent over tcp (TLS, per-boot credential) "
                    f"beside the Unix socket ({runs} runs each, alternating blocks of {BLOCK})",
                    times["tcp"],
                    times["unix"],
                    "unix socket",
                    target=1.2,
                )
                # on a shared machine the medians carry everyone's load: say how much there was,
                # and how the two compare where it weighed least
                quick = {k: sorted(v) for k, v in times.items()}
                q1 = {k: v[len(v) // 4] for k, v in quick.items()}
                low = {k: v[0] for k, v in quick.items()}
                print(
                    f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; first quartile tcp "
                    f"{q1['tcp']:.2f} ms, unix {q1['unix']:.2f} ms ({q1['tcp'] / q1['unix']:.2f}x); fastest tcp "
                    f"{low['tcp']:.2f} ms, unix {low['unix']:.2f} ms ({low['tcp'] / low['unix']:.2f}x)"
                )
                total = 8 * 1024 * 1024
                tcp_mbs = [_stream(tc, turl, total) for _ in range(3)]
                unix_mbs = [_stream(uc, uurl, total) for _ in range(3)]
                best_t, best_u = sorted(tcp_mbs)[1], sorted(unix_mbs)[1]
                print(
                    f"stdout throughput, 8 MB printed by a cell, to a client over SSE (median of 3): tcp {best_t:.1f} "
                    f"MB/s, unix socket {best_u:.1f} MB/s, ratio {best_t / best_u:.2f}x"
                )
                report(
                    "a ping on a fresh connection (TLS 1.3 + HMAC handshake on tcp), 200 runs",
                    _fresh_pings(tcp, trid, 200),
                    _fresh_pings(unix, urid, 200),
                    "unix socket",
                )
                figures["stream_ratio"] = best_t / best_u
        finally:
            engine = docker.from_env()
            try:
                for srv in (unix, tcp):
                    with contextlib.suppress(httpx.HTTPError), srv.client() as client:
                        for rt in client.get("/runtimes").json():
                            client.delete(f"/runtimes/{rt['id']}")
                    srv.stop()
                    for c in engine.containers.list(all=True, filters={"label": f"{LABEL}={session}"}):
                        c.remove(force=True)
                    remove_fence(engine, srv)  # the installation's network and firewall rules (R44)
            finally:
                engine.close()
    return figures


if __name__ == "__main__":
    run()
