"""Apps: a request through envctl's proxy (``/apps/TEAM/NAME/``) beside the same request straight
to the app's port (the runtime container's address, as the proxy reaches it), in one run.

One `envctl serve` serving team ``bench``'s apps; a notebook whose cell starts the standard
library's threading HTTP server on port 8000 answering a small fixed body. Figures:

- deploy → first 200 through the proxy: from `envctl app deploy` starting (zip, encrypt,
  upload, deployment) to the first answer from the app through the proxy;
- GET latency, one kept-alive client signed in with the apps cookie, ``runs`` requests each
  way in alternating blocks of ``BLOCK``; p50/p99 and the ratio of medians (target: p50 through
  the proxy <= 1.1x direct + 1 ms); requests per second of that one client each way;
- WebSocket round trip: a second app (the standard-library echo of tests/api/ws_echo_app.py),
  one socket through ``/apps/`` (cookie sign-in) and one straight to its port, a 32-byte text
  message sent and its echo received, ``runs // 4`` times each in alternating blocks; p50/p99 and
  the ratio of medians.

python -m tests.bench.run --only apps [--runs N]
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker
import httpx
from websockets.sync.client import connect as ws_connect

from envs.kit.db import Database
from runner.apps.models import App, AppInstance
from tests.api.ws_echo_app import WS_ECHO_CELL
from tests.bench.stats import percentile, report
from tests.fixtures.server import Server, prepare_data_dir
from tests.runner.conftest import remove_fence

LABEL = "envctl.bench"
BLOCK = 20
CELL = """
import http.server, threading
BODY = b"x" * 512
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H)
threading.Thread(target=s.serve_forever, daemon=True).start()
"""


def _notebook(folder: Path, cell: str = CELL, name: str = "bench") -> Path:
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
          "cells": [{"cell_type": "code", "id": "a", "metadata": {}, "source": cell, "outputs": [],
                     "execution_count": None}]}  # fmt: skip
    path = folder / f"{name}.ipynb"
    path.write_text(json.dumps(nb))
    return path


def _address(data: Path, name: str) -> str:
    """The app's instance address (host:port) as the proxy reaches it."""
    db = Database(f"sqlite:///{data / 'envctl.db'}")
    try:
        with db.session() as s:
            [app_id] = [a.id for a in s.query(App).filter(App.team == "bench", App.name == name)]
            [address] = [i.address for i in s.query(AppInstance).filter(AppInstance.app_id == app_id) if i.address]
            return address
    finally:
        db.dispose()


def websocket_round_trips(srv: Server, data: Path, tmp: str, token: str, cookie: str, runs: int) -> dict[str, float]:
    """The echo app deployed, then ``runs`` round trips each way in alternating blocks."""
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "app", "deploy", str(_notebook(Path(tmp), WS_ECHO_CELL, "echo")),
         "--team", "bench", "--name", "echo", "--url", srv.url, "--token", token],
        capture_output=True, text=True, timeout=300, env={**os.environ, "XDG_CONFIG_HOME": tmp},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    message = "x" * 32
    times: dict[str, list[float]] = {"proxy": [], "direct": []}
    url = srv.url.replace("http://", "ws://") + "/apps/bench/echo/"
    proxied = ws_connect(url, additional_headers={"Cookie": f"envctl_app={cookie}"}, open_timeout=30, proxy=None)
    direct = ws_connect(f"ws://{_address(data, 'echo')}/", open_timeout=30, proxy=None)
    try:
        for ws in (proxied, direct):
            for _ in range(50):
                ws.send(message)
                assert ws.recv(timeout=10) == message
        done_runs = 0
        while done_runs < runs:
            n = min(BLOCK, runs - done_runs)
            for name, ws in (("proxy", proxied), ("direct", direct)):
                for _ in range(n):
                    t = time.perf_counter()
                    ws.send(message)
                    echoed = ws.recv(timeout=10)
                    times[name].append((time.perf_counter() - t) * 1000)
                    assert echoed == message
            done_runs += n
    finally:
        proxied.close()
        direct.close()
    figures = report(
        f"apps: WebSocket round trip of a 32-byte text message through /apps/ (cookie sign-in) beside straight to "
        f"the app's port ({runs} each, alternating blocks of {BLOCK}, one socket each)",
        times["proxy"], times["direct"], "direct to the app's port",
    )  # fmt: skip
    print(
        f"  p50 proxy {figures['ours_median']:.2f} ms, direct {figures['base_median']:.2f} ms; "
        f"p99 proxy {percentile(times['proxy'], 99):.2f} ms, direct {percentile(times['direct'], 99):.2f} ms"
    )
    return {f"ws_{k}": v for k, v in figures.items()}


def run(runs: int = 2000) -> dict[str, float]:
    session = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="envctl-bench-apps-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        prepare_data_dir(data)
        srv = Server(data, env={
            "ENVCTL_RUNNER_NAME": f"bench-{session}-apps", "ENVCTL_RUNNER_LABELS": f"{LABEL}={session}",
            "ENVCTL_RUNNER_APP_TEAMS": "bench",
        })  # fmt: skip
        srv.start()
        try:
            token = (data / "admin-token").read_text().strip()
            with srv.client() as c:
                assert c.post("/teams", json={"name": "bench"}).status_code == 201
            web = httpx.Client(base_url=srv.url, timeout=30)
            signed = web.post("/apps/_signin", data={"token": token, "next": "/apps/"})
            assert signed.status_code == 303, signed.text
            t0 = time.perf_counter()
            deploy = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "app", "deploy", str(_notebook(Path(tmp))), "--team", "bench",
                 "--name", "hello", "--url", srv.url, "--token", token, "--wait", "0"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "XDG_CONFIG_HOME": tmp},
            )  # fmt: skip
            while True:
                r = web.get("/apps/bench/hello/")
                if r.status_code == 200:
                    break
                assert time.perf_counter() - t0 < 300, f"no 200 within 300 s: {r.status_code} {r.text[:200]}"
                time.sleep(0.05)
            first = time.perf_counter() - t0
            deploy.wait(60)
            print(f"apps: deploy (envctl app deploy: zip, encrypt, upload, deployment) -> first 200 through the proxy: "
                  f"{first:.2f} s")  # fmt: skip
            direct = httpx.Client(base_url=f"http://{_address(data, 'hello')}", timeout=30)
            for _ in range(100):
                assert web.get("/apps/bench/hello/").status_code == 200
                assert direct.get("/").status_code == 200
            times: dict[str, list[float]] = {"proxy": [], "direct": []}
            spent = {"proxy": 0.0, "direct": 0.0}
            done = 0
            while done < runs:
                n = min(BLOCK, runs - done)
                for name, client, path in (("proxy", web, "/apps/bench/hello/"), ("direct", direct, "/")):
                    start = time.perf_counter()
                    for _ in range(n):
                        t = time.perf_counter()
                        resp = client.get(path)
                        times[name].append((time.perf_counter() - t) * 1000)
                        assert resp.status_code == 200 and len(resp.content) == 512
                    spent[name] += time.perf_counter() - start
                done += n
            figures = report(
                f"apps: GET of a 512-byte answer through /apps/ (cookie sign-in) beside straight to the app's port "
                f"({runs} runs each, alternating blocks of {BLOCK}, one kept-alive client)",
                times["proxy"], times["direct"], "direct to the app's port",
            )  # fmt: skip
            p50p, p50d = figures["ours_median"], figures["base_median"]
            p99p, p99d = percentile(times["proxy"], 99), percentile(times["direct"], 99)
            target = 1.1 * p50d + 1.0
            print(
                f"  p50 proxy {p50p:.2f} ms, direct {p50d:.2f} ms; p99 proxy {p99p:.2f} ms, direct {p99d:.2f} ms; "
                f"target p50 <= 1.1x direct + 1 ms = {target:.2f} ms: {'met' if p50p <= target else 'NOT met'}"
            )
            print(
                f"  requests per second, one client: proxy {runs / spent['proxy']:.0f}, direct "
                f"{runs / spent['direct']:.0f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
            )
            figures.update(deploy_to_first_200_s=first, p99_proxy=p99p, p99_direct=p99d)
            cookie = web.cookies.get("envctl_app")
            assert cookie
            figures.update(websocket_round_trips(srv, data, tmp, token, cookie, max(100, runs // 4)))
            web.close()
            direct.close()
        finally:
            engine = docker.from_env()
            try:
                with contextlib.suppress(httpx.HTTPError), srv.client() as client:
                    client.delete("/teams/bench/apps/hello")
                    client.delete("/teams/bench/apps/echo")
                srv.stop()
                for c in engine.containers.list(all=True, filters={"label": f"{LABEL}={session}"}):
                    c.remove(force=True)
                remove_fence(engine, srv)
            finally:
                engine.close()
    return figures


if __name__ == "__main__":
    run()
