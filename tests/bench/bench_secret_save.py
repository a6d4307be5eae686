"""The time the secret scan adds to a save of 100 MB, through the public API (issue 9).

Two runtimes of python3@1 on one server: one uses a team secret (``DB_PASSWORD``), the other
none. Before each save, a cell writes 100 MB (100 files of 1 MB of random bytes) under
/root/data; then ``POST /runtimes/{id}/save`` is timed until its operation ends. The two
alternate, in the same run; both are scanned for credential files, only the first for a secret
value (plain, base64 at three alignments, URL-encoded). Figure: ratio of the medians.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.bench.bench_save import LABEL, _cell, _save
from tests.bench.networks import remove_networks
from tests.bench.stats import report
from tests.fixtures.server import Server, prepare_data_dir

WRITE = (
    "rm -rf /root/data && mkdir /root/data && "
    "for i in $(seq 100); do head -c 1048576 /dev/urandom > /root/data/$i; done"
)


def run(runs: int = 5) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        data = Path(tmp) / "data"
        prepare_data_dir(data)
        srv = Server(data, env={"ENVCTL_RUNNER_NAME": f"bench-{session}", "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}"})
        srv.start()
        try:
            with srv.client() as client:
                client.post("/teams", json={"name": "bench"}).raise_for_status()
                client.put("/teams/bench/secrets/db-pass", json={"value": "db-pass-0123456789-xyz"}).raise_for_status()
                ids = {}
                for name, env in (("with", {"DB_PASSWORD": {"secret": "db-pass"}}), ("without", {})):
                    body = {"environment": "python3", "name": name, "language": "bash", "env": env}
                    rid = client.post("/runtimes", json=body).json()["id"]
                    client.post(f"/runtimes/{rid}/start", params={"wait": 60}).raise_for_status()
                    ids[name] = rid
                times: dict[str, list[float]] = {"with": [], "without": []}
                for i in range(runs):
                    for name, rid in ids.items():
                        _cell(client, rid, WRITE)
                        t = time.perf_counter()
                        _save(client, rid, f"bench/{name}-{i}")
                        times[name].append((time.perf_counter() - t) * 1000)
        finally:
            srv.stop()
            found = subprocess.run(
                ["docker", "ps", "-aq", "--filter", f"label={LABEL}={session}"], capture_output=True, text=True
            ).stdout.split()
            if found:
                subprocess.run(["docker", "rm", "-f", *found], capture_output=True)
            subprocess.run(
                ["docker", "image", "prune", "-af", "--filter", f"label={LABEL}={session}"], capture_output=True
            )
            remove_networks(session)
    f = report(
        f"save of 100 MB through the API, a runtime with a secret to search for ({runs} runs)",
        times["with"],
        times["without"],
        "same save, no secret",
        target=1.25,
    )
    return {"secret_scan_ratio": f["ratio"], "secret_scan_added_ms": f["ours_median"] - f["base_median"]}


if __name__ == "__main__":
    run()
