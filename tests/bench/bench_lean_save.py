"""Lean and scanned saves.

1. The size a save of ``apt-get install -y jq`` adds, with the caches left out (the default)
   and kept (``keep_caches``), through the API, from the same container state.
2. The time the secret scan adds to a save of 100 MB (100 files of 1 MB of random bytes): the
   save path scanning for three secret values and the credential files, and for the credential
   files alone (what runtimes, which have no secrets yet, get today), beside the same path with
   an observer that looks at nothing, alternating, in the same run; ``docker commit`` of the
   same container is shown too. Target: the scan adds <= 25%.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker

from envs.images.config import CONFIG_KEYS
from runner.backends.docker import DockerBackend
from runner.saves.scans import CacheRules, SaveFilter
from runner.settings import DEFAULT_SAVE_CACHES
from tests.bench.bench_save import LABEL, _cell, _save
from tests.bench.networks import remove_networks
from tests.bench.stats import report
from tests.fixtures.server import Server, prepare_data_dir

MB = 1 << 20


class _LooksAtNothing:
    """The save path's observer with no scan and no caches: the baseline of the scan's cost."""

    def cache_of(self, path: str) -> str | None:
        return None

    def entry(self, path: str, link: str | None = None) -> None:
        return None

    def content(self, path: str, size: int) -> Callable[[bytes], None] | None:
        return None

    def verdict(self) -> None:
        return None

    def allowed(self) -> list[dict[str, Any]]:
        return []


def _jq_sizes(session: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        data = Path(tmp) / "data"
        prepare_data_dir(data)
        srv = Server(data, env={"ENVCTL_RUNNER_NAME": f"bench-{session}", "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}"})
        srv.start()
        try:
            with srv.client() as client:
                body = {"environment": "python3", "name": "jq", "language": "bash"}
                rid = client.post("/runtimes", json=body).json()["id"]
                _cell(client, rid, "apt-get update -qq && apt-get install -y -qq jq >/dev/null")
                lean = _save(client, rid, "jq-lean")["result"]
                kept = client.post(f"/runtimes/{rid}/save", json={"environment": "jq-full", "keep_caches": True})
                op = kept.json()
                while op["status"] == "running":
                    op = client.get(f"/operations/{op['id']}", params={"wait": 30}).json()
                versions = {v: client.get(f"/environments/{v}").json()["versions"][0] for v in ("jq-lean", "jq-full")}
        finally:
            srv.stop()
    lean_added, full_added = versions["jq-lean"]["size_added"], versions["jq-full"]["size_added"]
    print("save of `apt-get install -y jq` on python3@1 (size the version adds)")
    print(f"  caches left out (default)  {lean_added / MB:8.1f} MiB")
    print(f"  caches kept (keep_caches)  {full_added / MB:8.1f} MiB")
    for path, c in sorted(lean["left_out"].items()):
        print(f"    left out {path}: {c['bytes'] / MB:.1f} MiB in {c['files']} files")
    print(f"  the lean save is {lean_added / full_added:.2f}x the size of the full one")
    return {"jq_lean_MiB": lean_added / MB, "jq_full_MiB": full_added / MB}


def _scan_cost(session: str, runs: int) -> dict[str, float]:
    client = docker.from_env(timeout=300)
    backend = DockerBackend(client)
    image = max(client.images.list(filters={"label": "envctl.base-image=python3"}), key=lambda i: i.attrs["Created"]).id
    parent = client.api.inspect_image(image)["Config"]
    config = {key: parent.get(key) for key in CONFIG_KEYS}
    config["Labels"] = {LABEL: session}
    container = client.containers.create(image, ["sleep", "3600"], labels={LABEL: session})
    container.start()
    try:
        script = "mkdir /root/data && for i in $(seq 100); do head -c 1048576 /dev/urandom > /root/data/$i; done"
        assert container.exec_run(["bash", "-c", script]).exit_code == 0
        state = {"container_id": container.id}
        secrets = ["db-pass-0123456789", "sk_live_abcdefghijklmnop", "ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"]
        scanned, today, plain, commit = [], [], [], []
        for i in range(runs):
            for observer, into in (
                (_LooksAtNothing(), plain),
                (SaveFilter(CacheRules.of(DEFAULT_SAVE_CACHES)), today),
                (SaveFilter(CacheRules.of(DEFAULT_SAVE_CACHES), secrets), scanned),
            ):
                t = time.perf_counter()
                made = backend.save_layer(
                    state,
                    config=config,
                    repository=f"envctl-bench/scan-{session}",
                    tag=str(i),
                    version_image=image,
                    observer=observer,
                )
                into.append((time.perf_counter() - t) * 1000)
                client.api.remove_image(made.image.id, force=True)
            t = time.perf_counter()
            raw = client.api.commit(container.id, repository=f"envctl-bench/commit-{session}", tag=str(i))
            commit.append((time.perf_counter() - t) * 1000)
            client.api.remove_image(raw["Id"], force=True)
    finally:
        container.remove(force=True)
    f = report(
        f"save of 100 MB in 100 files, scanned for 3 secret values and credential files ({runs} runs)",
        scanned,
        plain,
        "same save, no scan",
        target=1.25,
    )
    g = report(
        "  the same, scanned for credential files only (runtimes have no secrets yet)",
        today,
        plain,
        "same save, no scan",
        target=1.25,
    )
    report("  (for scale) the save with no scan beside docker commit", plain, commit, "docker commit")
    return {
        "scan_ratio": f["ratio"],
        "scan_added_ms": f["ours_median"] - f["base_median"],
        "scan_no_secrets_ratio": g["ratio"],
    }


def run(runs: int = 5) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    try:
        figures = _jq_sizes(session)
        figures.update(_scan_cost(session, runs))
    finally:
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label={LABEL}={session}"], capture_output=True, text=True
        ).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        subprocess.run(["docker", "image", "prune", "-af", "--filter", f"label={LABEL}={session}"], capture_output=True)
        remove_networks(session)
    return figures


if __name__ == "__main__":
    run()
