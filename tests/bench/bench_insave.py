"""Saves made inside the runtime (issue 15 item 2) beside ``docker commit`` + ``docker push``.

Through the public HTTP API (``POST /runtimes/{id}/save``, then the operation until it ends) on
an installation with ``ENVCTL_SAVE_PATH=runtime`` and its managed registry: the agent streams
the layer, envctl scans, hashes and uploads it, writes config and manifest. The baseline, in
the same run, against the same registry: a plain container of the same base image, the same
change written into it, then ``docker commit`` and ``docker push`` (as envctl's admin), timed
together. Both write new random files before every timed save (10 MB and 100 MB); the first
save of a runtime (its parent, the base, already in the registry for both) and a later save on
top of it are reported apart. Medians and the ratio of medians.

``python -m tests.bench.run --only insave [--runs N]``
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import httpx

from tests.bench.bench_save import _cell
from tests.bench.stats import report
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import _free_port, base_image
from tests.runner.conftest import remove_fence

LABEL = "envctl.bench"
SIZES_MB = (10, 100)
MB = 1 << 20


def _operation(client: httpx.Client, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == 202, r.text
    op = r.json()
    while op["status"] == "running":
        op = client.get(f"/operations/{op['id']}", params={"wait": 10}).json()
    assert op["status"] == "succeeded", op
    return dict(op)


def _docker(config: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["docker", "--config", str(config), *args], capture_output=True, text=True, check=False, input=stdin
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _write(size_mb: int, tag: str) -> str:
    """Shell that writes ``size_mb`` MB of new random files (1 MB each) under /opt/bench/<tag>."""
    return (
        f"mkdir -p /opt/bench/{tag} && for i in $(seq 1 {size_mb}); do "
        f"head -c {MB} /dev/urandom > /opt/bench/{tag}/f$i; done"
    )


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


WAITS: list[tuple[float, float]] = []  # (boot ms, of which waiting for the agent's index ms)


def _boot(srv: Server, client: httpx.Client, name: str) -> str:
    rid = client.post("/runtimes", json={"environment": "bash", "name": name, "language": "bash"}).json()["id"]
    client.post(f"/runtimes/{rid}/start")
    assert srv.wait_state(client, rid, {"running", "error"}, timeout=180)["state"] == "running"
    answered = [e for e in client.get(f"/runtimes/{rid}/log").json() if e.get("reason") == "agent-answered"]
    if answered and "index_wait_s" in answered[-1]["details"]:
        details = answered[-1]["details"]
        WAITS.append((float(details["boot_ms"]), float(details["index_wait_s"]) * 1000))
    return str(rid)


def run(runs: int = 3) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    figures: dict[str, float] = {}
    engine = docker.from_env()
    base = base_image(engine, "bash")
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        data = Path(tmp) / "data"
        config = Path(tmp) / "docker-config"
        config.mkdir()
        prepare_data_dir(data, ["bash"])
        port = _free_port()
        srv = Server(
            data,
            env={
                "ENVCTL_RUNNER_NAME": f"bench-{session}",
                "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}",
                "ENVCTL_REGISTRY": "managed",
                "ENVCTL_REGISTRY_PORT": str(port),
                "ENVCTL_SAVE_PATH": "runtime",
            },
        )
        srv.start()
        host = f"127.0.0.1:{port}"
        raw = f"{host}/bench/raw-{session}"
        env = f"bench/insave-{session}"
        baseline: list[str] = []
        try:
            with srv.client() as client:
                assert client.post("/teams", json={"name": "bench"}).status_code == 201
                token = (data / "admin-token").read_text().strip()
                _docker(config, "login", host, "-u", "admin", "--password-stdin", stdin=token)
                # warm up: the base is pushed once for each (envctl's first save pushes it; docker's first push)
                rid = _boot(srv, client, "warm")
                _cell(client, rid, _write(1, "warm"))
                _operation(client, f"/runtimes/{rid}/save", {"environment": env})
                client.delete(f"/runtimes/{rid}")
                warm = engine.containers.run(base, ["sleep", "infinity"], detach=True, labels={LABEL: session})
                baseline.append(warm.id)
                _docker(config, "commit", warm.id, f"{raw}:warm")
                _docker(config, "push", f"{raw}:warm")
                for size in SIZES_MB:
                    ours: dict[str, list[float]] = {"first": [], "later": []}
                    theirs: dict[str, list[float]] = {"first": [], "later": []}
                    for i in range(runs):
                        rid = _boot(srv, client, f"s{size}-{i}")
                        box = engine.containers.run(base, ["sleep", "infinity"], detach=True, labels={LABEL: session})
                        baseline.append(box.id)
                        for which in ("first", "later"):
                            tag = f"{size}-{i}-{which}"
                            _cell(client, rid, _write(size, tag))
                            ours[which].append(
                                _timed(
                                    lambda c=client, r=rid: _operation(c, f"/runtimes/{r}/save", {"environment": env})
                                )
                            )
                            _docker(config, "exec", box.id, "sh", "-c", _write(size, tag))

                            def commit_push(b: str = box.id, t: str = tag) -> None:
                                _docker(config, "commit", b, f"{raw}:{t}")
                                _docker(config, "push", f"{raw}:{t}")

                            theirs[which].append(_timed(commit_push))
                        client.delete(f"/runtimes/{rid}")
                    for which in ("first", "later"):
                        figures[f"{which}_{size}mb_ratio"] = report(
                            f"{which} save of a runtime, {size} MB of new files ({runs} runs)",
                            ours[which],
                            theirs[which],
                            "docker commit + push",
                        )["ratio"]
                if WAITS:
                    boots, waits = sorted(b for b, _ in WAITS), sorted(w for _, w in WAITS)
                    print(
                        f"boot on the in-runtime path ({len(WAITS)} boots): median {boots[len(boots) // 2]:.0f} ms, "
                        f"of which waiting for the agent's index median {waits[len(waits) // 2]:.0f} ms "
                        f"(max {waits[-1]:.0f} ms)"
                    )
                    figures["index_wait_ms"] = waits[len(waits) // 2]
        finally:
            srv.stop()
            for cid in baseline:
                with contextlib.suppress(Exception):
                    engine.containers.get(cid).remove(force=True)
            for c in engine.containers.list(all=True, filters={"label": f"{LABEL}={session}"}):
                with contextlib.suppress(Exception):
                    c.remove(force=True)
            for image in engine.images.list(name=raw):  # the baseline's commits, every tag of them
                with contextlib.suppress(Exception):
                    engine.images.remove(image.id, force=True)
            for image in engine.images.list(filters={"label": f"{LABEL}={session}"}):
                with contextlib.suppress(Exception):
                    engine.images.remove(image.id, force=True)
            remove_fence(engine, srv)  # the installation's network and firewall rules (R44)
    return figures
