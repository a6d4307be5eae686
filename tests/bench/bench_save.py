"""Saves of new work, and deep lineages.

1. ``save``: a save of 10 MB, 100 MB and 1 GB of *new* files through the public API
   (``POST /runtimes/{id}/save``, then the operation until it succeeds), beside the Docker
   engine's own commit (``POST /commit`` through its API) of an equally new change of a
   comparable container, in the same run, alternating. Before every timed save or commit a
   cell (an exec for Docker) writes the size anew in files of 1 MB of random bytes, so that no
   save is an empty layer. Reported apart:

   - a *first* save: of a runtime freshly booted from python3@1 (the baseline: a container
     freshly started from the same image, committed);
   - a *later* save: of the same runtime again, after new files (the baseline: a container
     started from the image its first commit made, given the same new files, committed).

   The runtimes use a team secret, so that the secret scan searches for its value in every
   form, and the default cache rules are applied (what a save does for every user). Figures:
   medians and the ratio of medians. Target: <= 1.15x for each.
2. ``deep-boot``: the boot of a runtime from a version 130 saves deep beside a boot from its
   base (python3@1). Target: <= 1.2x.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx

from tests.bench.networks import remove_networks
from tests.bench.stats import report
from tests.fixtures.server import Server, prepare_data_dir

LABEL = "envctl.bench"
MB = 1 << 20
SECRET_VALUE = "db-pass-0123456789-xyz"


def _save(client: httpx.Client, rid: str, env: str) -> dict[str, Any]:
    r = client.post(f"/runtimes/{rid}/save", params={"wait": 30}, json={"environment": env})
    assert r.status_code == 202, r.text
    op = r.json()
    while op["status"] == "running":
        op = client.get(f"/operations/{op['id']}", params={"wait": 30}).json()
    assert op["status"] == "succeeded", op
    return op


def _cell(client: httpx.Client, rid: str, code: str) -> None:
    r = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json={"code": code, "language": "bash"})
    ex = r.json()
    while ex["status"] in ("queued", "running"):
        ex = client.get(f"/executions/{ex['id']}", params={"wait": 30}).json()
    assert ex["status"] == "ok", ex


def _boot(srv: Server, client: httpx.Client, rid: str) -> float:
    t = time.perf_counter()
    client.post(f"/runtimes/{rid}/start")
    while True:
        rt = client.get(f"/runtimes/{rid}").json()
        if rt["state"] in ("running", "error"):
            break
        time.sleep(0.005)
    took = (time.perf_counter() - t) * 1000
    assert rt["state"] == "running", rt
    client.post(f"/runtimes/{rid}/stop")
    srv.wait_state(client, rid, {"stopped"})
    return took


def write_script(size_mb: int, where: str) -> str:
    """Bash that writes ``size_mb`` files of 1 MB of random bytes into a new directory."""
    return f"mkdir -p {where} && for i in $(seq {size_mb}); do head -c {MB} /dev/urandom > {where}/$i; done"


@contextlib.contextmanager
def _server(session: str) -> Iterator[tuple[Server, httpx.Client]]:
    with tempfile.TemporaryDirectory(prefix="envctl-bench-") as tmp:
        data = Path(tmp) / "data"
        prepare_data_dir(data)
        srv = Server(data, env={"ENVCTL_RUNNER_NAME": f"bench-{session}", "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}"})
        srv.start()
        try:
            with srv.client() as client:
                yield srv, client
        finally:
            srv.stop()
            _cleanup(session, data)


def _cleanup(session: str, data: Path) -> None:
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL}={session}"], capture_output=True, text=True
    ).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
    subprocess.run(["docker", "image", "prune", "-af", "--filter", f"label={LABEL}={session}"], capture_output=True)
    remove_networks(session)  # the installation's network and rules go with it


class _Raw:
    """The baseline: containers of the same image, their new files committed by the engine."""

    def __init__(self, engine: docker.DockerClient, image: str, session: str) -> None:
        self.engine, self.image, self.session = engine, image, session
        self.containers: list[Any] = []
        self.images: list[str] = []

    def container(self, image: str) -> Any:
        made = self.engine.containers.run(image, ["sleep", "infinity"], detach=True, labels={LABEL: self.session})
        self.containers.append(made)
        return made

    def commit(self, container: Any, size_mb: int, where: str) -> tuple[float, str]:
        assert container.exec_run(["bash", "-c", write_script(size_mb, where)]).exit_code == 0
        t = time.perf_counter()
        image = str(self.engine.api.commit(container.id, repository=f"envctl-bench/raw-{self.session}")["Id"])
        took = (time.perf_counter() - t) * 1000
        self.images.append(image)
        return took, image

    def clear(self) -> None:
        for c in self.containers:
            with contextlib.suppress(Exception):
                c.remove(force=True)
        for image in reversed(self.images):
            with contextlib.suppress(Exception):
                self.engine.api.remove_image(image, force=True)
        self.containers, self.images = [], []


def _drop_environment(client: httpx.Client, name: str) -> None:
    """Every version of ``name``, newest first (its images go with them)."""
    for v in client.get(f"/environments/{name}").json().get("versions", []):
        client.delete(f"/environments/{v['ref']}")


def save_speed(
    client: httpx.Client, engine: docker.DockerClient, session: str, size_mb: int, runs: int, later: int = 1
) -> dict[str, float]:
    """``runs`` runtimes, each saved once and then ``later`` times more, each save after
    ``size_mb`` MB of new files; the same for containers and the engine's commit."""
    versions = client.get("/environments/python3").json()["versions"]
    image = next(v["image_id"] for v in versions if v["ref"] == "python3@1")
    raw = _Raw(engine, image, session)
    times: dict[str, list[float]] = {"first": [], "later": [], "first_raw": [], "later_raw": []}
    spans: dict[str, list[dict[str, float]]] = {"first": [], "later": []}  # the saves' own timings_ms
    try:
        for i in range(runs):
            env = f"bench-{size_mb}-{i}"
            body = {
                "environment": "python3@1",
                "name": f"s{size_mb}-{i}",
                "language": "bash",
                "env": {"DB_PASSWORD": {"secret": "db-pass"}},
            }
            rid = client.post("/runtimes", json=body).json()["id"]
            client.post(f"/runtimes/{rid}/start", params={"wait": 60}).raise_for_status()
            ours_first = i % 2 == 0  # alternate who goes first: neither always finds a warmer machine

            def ours(kind: str, n: int, rid: str = rid, env: str = env) -> None:
                _cell(client, rid, write_script(size_mb, f"/root/work/{kind}{n}"))
                t = time.perf_counter()
                op = _save(client, rid, env)
                times[kind].append((time.perf_counter() - t) * 1000)
                spans[kind].append(op["result"].get("timings_ms") or {})

            def theirs(kind: str, n: int, container: Any) -> str:
                took, made = raw.commit(container, size_mb, f"/root/work/{kind}{n}")
                times[f"{kind}_raw"].append(took)
                return made

            if ours_first:
                ours("first", 0)
            committed = theirs("first", 0, raw.container(image))
            if not ours_first:
                ours("first", 0)
            for n in range(later):
                if ours_first:
                    ours("later", n)
                committed = theirs("later", n, raw.container(committed))
                if not ours_first:
                    ours("later", n)
            client.delete(f"/runtimes/{rid}")
            _drop_environment(client, env)
            raw.clear()
    finally:
        raw.clear()
    figures: dict[str, float] = {}
    for kind in ("first", "later"):
        f = report(
            f"{kind} save of {size_mb} MB of new files ({len(times[kind])} runs)",
            times[kind],
            times[f"{kind}_raw"],
            "docker commit",
            target=1.15,
        )
        figures[f"save_{kind}_{size_mb}MB_ratio"] = f["ratio"]
        figures[f"save_{kind}_{size_mb}MB_ms"] = f["ours_median"]
        print("    " + where_the_time_went(spans[kind], times[kind]))
    return figures


def where_the_time_went(spans: list[dict[str, float]], through_api: list[float]) -> str:
    """The medians of a save's own spans (its operation's ``timings_ms``), and what the API and
    the operation around them added (the client's time minus the save's ``total``)."""
    names = list(dict.fromkeys(name for one in spans for name in one))
    medians = {name: statistics.median([one.get(name, 0.0) for one in spans]) for name in names}
    around = statistics.median([t - one.get("total", 0.0) for t, one in zip(through_api, spans, strict=True)])
    parts = [f"{name} {ms:.0f}" for name, ms in medians.items() if name != "total" and ms >= 0.5]
    return f"where (median ms): {', '.join(parts)}; save total {medians.get('total', 0):.0f}, around it {around:.0f}"


def run(runs: int = 3, sizes: tuple[int, ...] = (10, 100, 1024)) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    engine = docker.from_env(timeout=600)
    figures: dict[str, float] = {}
    with _server(session) as (_srv, client):
        client.post("/teams", json={"name": "bench"}).raise_for_status()
        client.put("/teams/bench/secrets/db-pass", json={"value": SECRET_VALUE}).raise_for_status()
        for size_mb in sizes:
            # small saves are quick and noisy: more runs, so that the medians mean something;
            # a gigabyte is slow on a small machine: fewer
            n = {10: runs * 3, 100: runs * 2}.get(size_mb, max(1, runs - 1))
            figures.update(save_speed(client, engine, session, size_mb, n, later=2 if size_mb <= 100 else 1))
    return figures


def run_deep(runs: int = 10, depth: int = 130) -> dict[str, float]:
    """A chain ``depth`` saves deep, then boots from its end beside boots from its base."""
    session = uuid.uuid4().hex[:8]
    figures: dict[str, float] = {}
    with _server(session) as (srv, client):
        t0 = time.perf_counter()
        env = "python3"
        for i in range(1, depth + 1):
            rid = client.post("/runtimes", json={"environment": env, "name": f"c{i}", "language": "bash"}).json()["id"]
            _cell(client, rid, f"echo {i} >> /root/chain")
            _save(client, rid, "deep")
            client.delete(f"/runtimes/{rid}")
            env = "deep"
        print(f"built a chain of {depth} saves in {time.perf_counter() - t0:.0f} s")
        deep = client.post("/runtimes", json={"environment": f"deep@{depth}", "name": "deep"}).json()["id"]
        base = client.post("/runtimes", json={"environment": "python3@1", "name": "base"}).json()["id"]
        _boot(srv, client, deep)
        _boot(srv, client, base)
        deep_ms, base_ms = [], []
        for _ in range(runs):
            deep_ms.append(_boot(srv, client, deep))
            base_ms.append(_boot(srv, client, base))
        f = report(
            f"boot from a version {depth} saves deep ({runs} runs)", deep_ms, base_ms, "boot from python3@1", target=1.2
        )
        figures["deep_boot_ratio"] = f["ratio"]
        figures["deep_boot_median_ms"] = statistics.median(deep_ms)
    return figures


if __name__ == "__main__":
    run()
