"""`envctl run` as a real process against a real `envctl serve`, killed with SIGKILL mid-cell:
what the lease tests on each backend share (tests/runner/runtimes/test_docker_leases.py, the swarm's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.server import Server

REPO = Path(__file__).resolve().parents[3]


def notebook(path: Path, code: str, language: str = "python") -> Path:
    """A one-cell notebook (plain JSON, nbformat 4) in ``language``."""
    kernel = {"name": "bash", "display_name": "Bash", "language": "bash"} if language == "bash" else {}
    cell = {"cell_type": "code", "metadata": {}, "source": code, "outputs": [], "execution_count": None}
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {"kernelspec": kernel} if kernel else {},
        "cells": [{**cell, "id": "long"}],
    }
    path.write_text(json.dumps(nb))
    return path


@dataclass
class KilledRun:
    runtime: dict[str, Any]  # as GET /runtimes/{id} showed it while its cell ran
    killed_at: float  # time.monotonic() of the SIGKILL
    stderr: str


def run_and_kill(server: Server, client: httpx.Client, nb: Path, lease: int, *args: str) -> KilledRun:
    """Start `envctl run NB --lease LEASE ARGS` as its own process, wait until its runtime runs
    the cell and the lease was renewed once, then SIGKILL the process."""
    token = (server.data_dir / "admin-token").read_text().strip()
    before = {rt["id"] for rt in client.get("/runtimes").json()}
    err_path = nb.with_suffix(".stderr")
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "run", str(nb), "--lease", str(lease), "--url", server.url, *args],
            env={**env, "ENVCTL_TOKEN": token},
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        rt: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"envctl run ended ({proc.returncode}): {err_path.read_text()}"
            new = [r for r in client.get("/runtimes").json() if r["id"] not in before]
            if new and new[0]["state"] == "running" and new[0]["busy"]:
                rt = new[0]
                break
            time.sleep(0.2)
        assert rt is not None, f"no runtime ran the cell: {err_path.read_text()}\n{server.output()[-3000:]}"
        assert rt["lease"]["seconds"] == lease, rt
        first = rt["lease"]["renewed_at"]
        while client.get(f"/runtimes/{rt['id']}").json()["lease"]["renewed_at"] == first:  # a heartbeat came
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(10)
        return KilledRun(rt, killed_at, err_path.read_text())
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_deleted(client: httpx.Client, rid: str, killed_at: float, bound: float) -> float:
    """Seconds from the kill until ``GET /runtimes/{id}`` is a 404 (at most ``bound``)."""
    while time.monotonic() - killed_at < bound:
        if client.get(f"/runtimes/{rid}").status_code == 404:
            return time.monotonic() - killed_at
        time.sleep(0.1)
    raise AssertionError(f"runtime {rid} still there {bound} s after its client was killed")
