"""A cell's channel on the database a cluster runs on: PostgreSQL beside SQLite, and stdout.

Two `envctl serve`s in the same run, alike but for the database: one on its SQLite file (the
baseline), one on a throwaway PostgreSQL cluster started here with `initdb`/`pg_ctl` and
PostgreSQL's default durability (fsync on, synchronous commit). Each has one python3 runtime.
On it envctl commits a cell's way in (its number and queued row) without waiting for the disk,
as SQLite in WAL mode with synchronous=NORMAL commits everything, and its end (outputs,
status) durably: ``QUEUED_DURABLE`` in ``runner/cells/executions.py`` says why.

- `POST /runtimes/{id}/executions?wait` with `1+1`, one kept-alive httpx client per server,
  the two measured in alternating blocks so that drift on a shared machine falls on both;
  medians compared. Target: PostgreSQL <= 1.5x SQLite. A third server on the same cluster
  with ``synchronous_commit=off`` (its commits do not wait for the disk; not how envctl runs)
  is measured in the same blocks, to show what waiting for the disk still costs.
- stdout throughput: a cell prints 8 MB (1 KB lines), timed from its `POST` to the last
  server-sent event a client reads, beside `docker exec` of the same code in the same
  container with its stdout to a pipe (read to the end), alternating, several runs each;
  medians compared as MB/s. Target: envctl >= 1.0x `docker exec`.

python -m tests.bench.run --only cells [--runs N]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import docker
import httpx

from tests.bench.stats import report, summary
from tests.bench.through_api import booted, cell
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import start_postgres
from tests.runner.conftest import remove_fence

LABEL = "envctl.bench"
BLOCK = 20
STREAM_BYTES = 8 * 1024 * 1024
STREAM_RUNS = 7
STREAM_CODE = (
    f"import sys\nchunk = 'x' * 1023 + '\\n'\nfor _ in range({STREAM_BYTES // 1024}):\n    sys.stdout.write(chunk)\n"
)


def _server(root: Path, session: str, name: str, database_url: str | None) -> Server:
    data = root / name
    data.mkdir()
    prepare_data_dir(data, database_url=database_url)
    env = {"ENVCTL_RUNNER_NAME": f"bench-{session}-{name}", "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}"}
    if database_url:
        env["ENVCTL_DATABASE_URL"] = database_url
    srv = Server(data, env=env)
    srv.start()
    return srv


def _container_of(rid: str) -> str:
    out = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=envctl.runtime-id={rid}"], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[0]


def _cpu(pid: int) -> float:
    """Seconds of CPU a process has used (user + system): a figure that swings less with the
    machine's load than the wall clock does, printed beside it."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pid(srv: Server) -> int:
    assert srv.proc is not None, "the server was started"
    return srv.proc.pid


def _stream(client: httpx.Client, url: str) -> float:
    """Seconds from a cell's POST to the last event of its stream (its end)."""
    t = time.perf_counter()
    ex = client.post(url, json={"code": STREAM_CODE}).json()
    received = 0
    with client.stream("GET", f"/executions/{ex['id']}/events", timeout=600) as resp:
        for chunk in resp.iter_bytes():
            received += len(chunk)
    took = time.perf_counter() - t
    assert received > STREAM_BYTES, f"the stream carried {received} bytes"
    return took


def _docker_exec(cid: str) -> float:
    t = time.perf_counter()
    proc = subprocess.Popen(["docker", "exec", cid, "python3", "-c", STREAM_CODE], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    received = 0
    while block := proc.stdout.read(65536):
        received += len(block)
    proc.wait()
    took = time.perf_counter() - t
    assert received == STREAM_BYTES, f"docker exec printed {received} bytes"
    return took


def run(runs: int = 1000) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    cluster_run = start_postgres(durable=True)
    cluster = next(cluster_run)
    servers: list[Server] = []
    tmp = tempfile.mkdtemp(prefix="envctl-bench-")
    try:
        lite = _server(Path(tmp), session, "sqlite", None)
        servers.append(lite)
        pg = _server(Path(tmp), session, "pg", cluster.create_database("bench_" + session))
        servers.append(pg)
        lazy_url = cluster.create_database("bench_lazy_" + session) + "?options=-csynchronous_commit%3Doff"
        lazy = _server(Path(tmp), session, "pg-lazy", lazy_url)
        servers.append(lazy)
        with lite.client() as lc, pg.client() as pc, lazy.client() as zc:
            lrid, prid, zrid = booted(lc, "bench-sqlite"), booted(pc, "bench-pg"), booted(zc, "bench-lazy")
            lurl, purl = f"/runtimes/{lrid}/executions", f"/runtimes/{prid}/executions"
            zurl = f"/runtimes/{zrid}/executions"
            for _ in range(50):
                cell(lc, lurl)
                cell(pc, purl)
                cell(zc, zurl)
            times: dict[str, list[float]] = {"sqlite": [], "pg": [], "lazy": []}
            cpu = {"sqlite": 0.0, "pg": 0.0, "lazy": 0.0}
            pids = {"sqlite": _pid(lite), "pg": _pid(pg), "lazy": _pid(lazy)}
            done = 0
            while done < runs:
                n = min(BLOCK, runs - done)
                for name, client, url in (("sqlite", lc, lurl), ("pg", pc, purl), ("lazy", zc, zurl)):
                    before = _cpu(pids[name])
                    for _ in range(n):
                        t = time.perf_counter()
                        cell(client, url)
                        times[name].append((time.perf_counter() - t) * 1000)
                    cpu[name] += _cpu(pids[name]) - before
                done += n
            figures = report(
                f"cell round trip `1+1` through the REST API on PostgreSQL (server defaults: fsync, synchronous "
                f"commit; a cell's end committed durably) beside SQLite ({runs} runs each, alternating blocks "
                f"of {BLOCK})",
                times["pg"],
                times["sqlite"],
                "SQLite",
                target=1.5,
            )
            report(
                "  for comparison: PostgreSQL with synchronous_commit=off (commits do not wait for the disk)",
                times["lazy"],
                times["sqlite"],
                "SQLite",
            )
            print(
                f"  envctl's CPU per cell (the server process alone): SQLite {cpu['sqlite'] / runs * 1000:.2f} ms, "
                f"PostgreSQL {cpu['pg'] / runs * 1000:.2f} ms"
            )
            print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

            cid = _container_of(lrid)
            ours, raw = [], []
            stream_cpu = 0.0
            for _ in range(STREAM_RUNS):
                before = _cpu(pids["sqlite"])
                ours.append(_stream(lc, lurl) * 1000)
                stream_cpu += _cpu(pids["sqlite"]) - before
                raw.append(_docker_exec(cid) * 1000)
            mb = STREAM_BYTES / 1048576
            ours_mbs, raw_mbs = mb / summary(ours)["median"] * 1000, mb / summary(raw)["median"] * 1000
            print(
                f"stdout throughput, {mb:.0f} MB printed by a cell (1 KB lines), POST to the stream's end "
                f"over SSE, beside docker exec to a pipe ({STREAM_RUNS} runs each, alternating): envctl "
                f"{ours_mbs:.1f} MB/s, docker exec {raw_mbs:.1f} MB/s, ratio {ours_mbs / raw_mbs:.2f}x "
                f"(target >= 1.0x: {'met' if ours_mbs >= raw_mbs else 'NOT met'}); "
                f"load average {os.getloadavg()[0]:.1f}; envctl's CPU per stream (the server process) "
                f"{stream_cpu / STREAM_RUNS * 1000:.0f} ms"
            )
            pcid = _container_of(prid)
            pg_ours = [_stream(pc, purl) * 1000 for _ in range(3)]
            pg_raw = [_docker_exec(pcid) * 1000 for _ in range(3)]
            pg_mbs, pg_raw_mbs = mb / summary(pg_ours)["median"] * 1000, mb / summary(pg_raw)["median"] * 1000
            print(
                f"  the same on PostgreSQL (3 runs each): envctl {pg_mbs:.1f} MB/s, docker exec "
                f"{pg_raw_mbs:.1f} MB/s, ratio {pg_mbs / pg_raw_mbs:.2f}x"
            )
            figures["stream_mbs"] = ours_mbs
            figures["stream_ratio"] = ours_mbs / raw_mbs
            figures["stream_ratio_pg"] = pg_mbs / pg_raw_mbs
    finally:
        engine = docker.from_env()
        try:
            for srv in servers:
                with contextlib.suppress(httpx.HTTPError), srv.client() as client:
                    for rt in client.get("/runtimes").json():
                        client.delete(f"/runtimes/{rt['id']}")
                srv.stop()
            for c in engine.containers.list(all=True, filters={"label": f"{LABEL}={session}"}):
                c.remove(force=True)
            for srv in servers:
                remove_fence(engine, srv)
        finally:
            engine.close()
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(StopIteration):
                next(cluster_run)
    return figures


if __name__ == "__main__":
    run()
