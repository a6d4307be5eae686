"""What the boot's wait for the agent's index costs on the in-runtime save path (issue 15 item 2).

On ``ENVCTL_SAVE_PATH=runtime`` the boot waits, after the agent's first answer, until the agent
has indexed the runtime's filesystem (``runner/saves/drafts.py`` ``wait_index``), so a deletion made
right after ``running`` is never missed. Through the public HTTP API: runtimes on ``bash`` booted
one after another on an installation of each path, the boot's ``boot_ms`` and ``index_wait_s``
read from its ``agent-answered`` log entry; medians and the ratio of the boot medians.

``python -m tests.bench.run --only insave-boot [--runs N]``
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import uuid
from pathlib import Path

import docker

from tests.bench.bench_insave import LABEL, _boot
from tests.bench.stats import report
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import _free_port
from tests.runner.conftest import remove_fence


def _boots(path: str, runs: int) -> tuple[list[float], list[float]]:
    engine = docker.from_env()
    session = uuid.uuid4().hex[:8]
    boots: list[float] = []
    waits: list[float] = []
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        data = Path(tmp) / "data"
        prepare_data_dir(data, ["bash"])
        srv = Server(
            data,
            env={
                "ENVCTL_RUNNER_NAME": f"bench-{session}",
                "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}",
                "ENVCTL_REGISTRY": "managed",
                "ENVCTL_REGISTRY_PORT": str(_free_port()),
                "ENVCTL_SAVE_PATH": path,
            },
        )
        srv.start()
        try:
            with srv.client() as client:
                for i in range(runs):
                    rid = _boot(srv, client, f"b{i}")
                    log = client.get(f"/runtimes/{rid}/log").json()
                    details = [e for e in log if e.get("reason") == "agent-answered"][-1]["details"]
                    boots.append(float(details["boot_ms"]))
                    if "index_wait_s" in details:
                        waits.append(float(details["index_wait_s"]) * 1000)
                    client.delete(f"/runtimes/{rid}")
        finally:
            srv.stop()
            for c in engine.containers.list(all=True, filters={"label": f"{LABEL}={session}"}):
                with contextlib.suppress(Exception):
                    c.remove(force=True)
            remove_fence(engine, srv)  # the installation's network and firewall rules (R44)
    return boots, waits


def run(runs: int = 6) -> dict[str, float]:
    inside, waits = _boots("runtime", runs)
    host, _ = _boots("host", runs)
    figures = {
        "boot_ratio": report(
            f"boot to running on bash, in-runtime path (waits for the index) vs host path ({runs} boots)",
            inside,
            host,
            "host path",
        )["ratio"]
    }
    if waits:
        figures["index_wait_ms"] = statistics.median(waits)
        print(
            f"  of the in-runtime boot, waiting for the agent's index: median {statistics.median(waits):.0f} ms, "
            f"max {max(waits):.0f} ms"
        )
    return figures
