"""Apps end to end: a real ``envctl serve`` on the Docker engine that serves team acme's apps
(``ENVCTL_RUNNER_APP_TEAMS=acme``), deployed with ``envctl app deploy`` (a child process), opened
through ``/apps/acme/NAME/``. The notebook starts the standard library's HTTP server on port
8000 in a thread of the kernel, answering with what it sees (its path, the headers it was sent,
its process environment, a file that came in the bundle)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.typing import Subprotocol

from runner.apps import bundles
from tests.api.ws_echo_app import WS_ECHO_CELL
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import base_image

pytestmark = pytest.mark.docker

SERVER_CELL = """
import http.server, json, os, threading
VERSION = {version!r}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{
            "version": VERSION, "path": self.path, "headers": dict(self.headers),
            "env": dict(os.environ), "file": open("data.txt").read(),
        }}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
server = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("serving", VERSION)
"""


def write_notebook(folder: Path, cells: list[str], files: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"data.txt": "from the bundle"}).items():
        (folder / name).write_text(text)
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {"envctl": {"files": sorted(files or {"data.txt": ""})}},
        "cells": [
            {"cell_type": "markdown", "id": "m", "metadata": {}, "source": "# an app"},
            *[
                {
                    "cell_type": "code",
                    "id": f"c{n}",
                    "metadata": {},
                    "source": c,
                    "outputs": [],
                    "execution_count": None,
                }
                for n, c in enumerate(cells)
            ],
        ],
    }
    path = folder / "app.ipynb"
    path.write_text(json.dumps(nb))
    return path


def app_notebook(folder: Path, version: str) -> Path:
    return write_notebook(folder, ["x = 6 * 7", SERVER_CELL.format(version=version)])


class Env:
    def __init__(self, srv: Server, tokens: dict[str, str]) -> None:
        self.srv = srv
        self.tokens = tokens

    def client(self, who: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.srv.url, headers=headers, timeout=30)

    def cli(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "api.cli", *args, "--url", self.srv.url, "--token", self.tokens[who]],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "XDG_CONFIG_HOME": str(self.srv.data_dir / "cli-config")},
        )

    @contextmanager
    def browser(self, who: str) -> Iterator[httpx.Client]:
        """A client signed in to apps as ``who`` (the cookie alone: no Authorization header)."""
        with httpx.Client(base_url=self.srv.url, timeout=30) as c:
            resp = c.post("/apps/_signin", data={"token": self.tokens[who], "next": "/apps/"})
            assert resp.status_code == 303, resp.text
            cookie = resp.headers["set-cookie"]
            assert "HttpOnly" in cookie and "Path=/apps/" in cookie and "SameSite=lax" in cookie, cookie
            yield c

    def show(self, name: str) -> dict[str, Any]:
        with self.client("alice") as c:
            resp = c.get(f"/teams/acme/apps/{name}")
            assert resp.status_code == 200, resp.text
            shown: dict[str, Any] = resp.json()
            return shown

    def deployment(self, name: str, number: int) -> dict[str, Any]:
        found: dict[str, Any] = next(d for d in self.show(name)["deployments"] if d["number"] == number)
        return found

    def wait_deployment(self, name: str, number: int, states: set[str], timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            dep = self.deployment(name, number)
            if dep["status"] in states:
                return dep
            assert time.monotonic() < deadline, f"deployment {number} is {dep}\n{self.srv.output()[-4000:]}"
            time.sleep(0.3)

    def runtimes(self, who: str = "alice") -> list[dict[str, Any]]:
        with self.client(who) as c:
            rows: list[dict[str, Any]] = c.get("/runtimes").json()
            return rows


@contextmanager
def serve_apps(docker: Any, data: Path, extra: dict[str, str] | None = None) -> Iterator[Env]:
    """A real ``envctl serve`` that serves team acme's apps, with users alice (acme) and bob
    (team other); ``extra`` settings beside (an S3 results store, a backend)."""
    prepare_data_dir(data, ["python3"])
    runner = f"test-{TEST_SESSION}-apps-{uuid.uuid4().hex[:6]}"
    srv = Server(
        data,
        env={
            "ENVCTL_RUNNER_NAME": runner,
            "ENVCTL_RUNNER_LABELS": f"{TEST_LABEL}={TEST_SESSION}",
            "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.5",
            "ENVCTL_RUNNER_APP_TEAMS": "acme",
            **(extra or {}),
        },
    )
    srv.start()
    try:
        admin = (data / "admin-token").read_text().strip()
        tokens = {"admin": admin}
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {admin}"}) as c:
            for name in ("alice", "bob"):
                made = c.post("/users", json={"name": name})
                assert made.status_code == 201, made.text
                tokens[name] = made.json()["token"]
        for who, team in (("alice", "acme"), ("bob", "other")):
            with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {tokens[who]}"}) as c:
                assert c.post("/teams", json={"name": team}).status_code == 201
        yield Env(srv, tokens)
    finally:
        srv.stop()
        for c in docker.containers.list(all=True, filters={"label": f"envctl.runner={runner}"}):
            c.remove(force=True)


@pytest.fixture(scope="module")
def env(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base_image(docker, "python3")
    with serve_apps(docker, tmp_path_factory.mktemp("apps-server") / "data") as made:
        yield made


def test_a_deployed_notebook_answers_its_team_through_the_proxy_and_nobody_else(env: Env, tmp_path: Path) -> None:
    done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "v1", "one")), "--team", "acme",
                   "--name", "sales")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + env.srv.output()[-3000:]
    assert "deployment 1" in done.stdout and "running" in done.stdout, done.stdout
    dep = env.deployment("sales", 1)
    assert (dep["status"], dep["author"], dep["port"], dep["version"]) == ("running", "alice", 8000, "python3@1")

    with env.browser("alice") as alice:
        resp = alice.get("/apps/acme/sales/some/page?q=1")
        assert resp.status_code == 200, resp.text
        seen = resp.json()
        cookie = alice.cookies.get("envctl_app")
    assert (seen["version"], seen["path"], seen["file"]) == ("one", "/some/page?q=1", "from the bundle")
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert "authorization" not in headers and "envctl_app" not in headers.get("cookie", "")
    assert headers["x-forwarded-prefix"] == "/apps/acme/sales"
    environment = json.dumps(seen["env"])
    for secret in (env.tokens["alice"], env.tokens["admin"], cookie):
        assert secret and secret not in environment and secret not in json.dumps(seen["headers"])

    # a bearer token works for scripts, and is not passed on either
    with env.client("alice") as c:
        seen = c.get("/apps/acme/sales/").json()
        assert env.tokens["alice"] not in json.dumps(seen)

    # no sign-in: 401 with the way to sign in; bob, signed in but outside acme: 404
    with httpx.Client(base_url=env.srv.url) as anonymous:
        assert anonymous.get("/apps/acme/sales/").status_code == 401
        assert anonymous.get("/apps/acme/no-such-app/").status_code == 401
    with env.browser("bob") as bob:
        assert bob.get("/apps/acme/sales/").status_code == 404
    with env.client("bob") as c:
        assert c.get("/teams/acme/apps").status_code == 404

    # the app's runtime is an ordinary runtime of the team, idle shutdown off
    [rt] = [r for r in env.runtimes() if r["name"].startswith("app-sales-1-")]
    assert rt["team"] == "acme" and rt["state"] == "running"
    logs = env.cli("alice", "app", "logs", "sales", "--team", "acme")
    assert "serving one" in logs.stdout, logs.stdout


def test_a_second_deployment_takes_over_without_a_failed_request_and_rollback(env: Env, tmp_path: Path) -> None:
    first = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "v1", "one")), "--team", "acme",
                    "--name", "swap")  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer() -> None:
        with env.client("alice") as c:
            while not stop.is_set():
                r = c.get("/apps/acme/swap/")
                results.append((r.status_code, r.json()["version"] if r.status_code == 200 else r.text))
                time.sleep(0.02)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "v2", "two")), "--team", "acme",
                       "--name", "swap")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 30
        while not any(v == "two" for _, v in results[-3:]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(3)  # past the old deployment's grace
    finally:
        stop.set()
        thread.join()
    assert results and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:5]
    versions = [v for _, v in results]
    assert versions[0] == "one" and versions[-1] == "two"
    assert env.deployment("swap", 1)["status"] == "stopped"
    deadline = time.monotonic() + 30
    while any(r["name"].startswith("app-swap-1-") for r in env.runtimes()):
        assert time.monotonic() < deadline, "deployment 1's runtime is still there"
        time.sleep(0.3)

    rolled = env.cli("alice", "app", "rollback", "swap", "1", "--team", "acme")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    dep = env.deployment("swap", 3)
    assert (dep["status"], dep["rollback_of"]) == ("running", 1)
    with env.client("alice") as c:
        assert c.get("/apps/acme/swap/").json()["version"] == "one"
    shown = env.cli("alice", "app", "show", "swap", "--team", "acme")
    assert "rollback of 1" in shown.stdout, shown.stdout


def test_a_public_app_needs_no_sign_in(env: Env, tmp_path: Path) -> None:
    done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "pub", "public")), "--team", "acme",
                   "--name", "open", "--public")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with httpx.Client(base_url=env.srv.url) as anonymous:
        resp = anonymous.get("/apps/acme/open/")
        assert resp.status_code == 200 and resp.json()["version"] == "public"
        assert anonymous.get("/apps/acme/open", follow_redirects=False).status_code == 307
    stopped = env.cli("alice", "app", "stop", "open", "--team", "acme")
    assert stopped.returncode == 0
    with httpx.Client(base_url=env.srv.url) as anonymous:
        assert anonymous.get("/apps/acme/open/").status_code == 503
    assert env.cli("alice", "app", "rm", "open", "--team", "acme").returncode == 0
    with env.client("alice") as c:
        assert c.get("/teams/acme/apps/open").status_code == 404


def _socket(
    env: Env, path: str, headers: dict[str, str] | None = None, subprotocols: list[str] | None = None
) -> ClientConnection:
    url = env.srv.url.replace("http://", "ws://") + path
    offered = [Subprotocol(s) for s in subprotocols] if subprotocols else None
    return ws_connect(url, additional_headers=headers or {}, subprotocols=offered, open_timeout=30, proxy=None)


def _wait_open(ws: ClientConnection, count: int) -> None:
    """Until the echo app holds ``count`` WebSockets open (10 s)."""
    deadline = time.monotonic() + 10
    while True:
        ws.send("open")
        now = int(ws.recv(timeout=10))
        if now == count:
            return
        assert time.monotonic() < deadline, f"the app holds {now} WebSockets open, not {count}"
        time.sleep(0.1)


def test_websockets_reach_the_app_for_its_team_without_envctl_credentials(env: Env, tmp_path: Path) -> None:
    done = env.cli("alice", "app", "deploy", str(write_notebook(tmp_path / "ws", [WS_ECHO_CELL])), "--team", "acme",
                   "--name", "chat")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + env.srv.output()[-3000:]
    with env.browser("alice") as alice:
        cookie = alice.cookies.get("envctl_app")
    assert cookie
    # signed in by the cookie (another cookie of the visitor passes): text, binary, subprotocol
    with _socket(env, "/apps/acme/chat/live?room=1", {"Cookie": f"theme=dark; envctl_app={cookie}"},
                 subprotocols=["chat.v1", "other"]) as ws:  # fmt: skip
        assert ws.subprotocol == "chat.v1"
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        blob = bytes(range(256)) * 300
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
        ws.send("headers")
        seen = {k.lower(): v for k, v in json.loads(ws.recv(timeout=10)).items()}
        ws.close(4002)  # the app is closed with the visitor's code
    assert seen["_path"] == "/live?room=1"
    assert "authorization" not in seen and seen["cookie"] == "theme=dark", seen
    assert seen["x-forwarded-prefix"] == "/apps/acme/chat" and cookie not in json.dumps(seen)
    # a bearer token works for scripts and is not passed on; the app's close code reaches the visitor
    with _socket(env, "/apps/acme/chat/", {"Authorization": f"Bearer {env.tokens['alice']}"}) as ws:
        ws.send("last-close")
        assert json.loads(ws.recv(timeout=10)) == 4002
        ws.send("headers")
        seen = {k.lower(): v for k, v in json.loads(ws.recv(timeout=10)).items()}
        assert "authorization" not in seen and env.tokens["alice"] not in json.dumps(seen)
        ws.send("close 4001")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    # a visitor who leaves, with a close frame or without one, leaves no connection to the app open
    bearer = {"Authorization": f"Bearer {env.tokens['alice']}"}
    with contextlib.ExitStack() as stack:
        left, cut, stays = (stack.enter_context(_socket(env, "/apps/acme/chat/", bearer)) for _ in range(3))
        _wait_open(stays, 3)
        left.close()
        cut.close_socket()  # the TCP connection ends: no close frame
        _wait_open(stays, 1)
    # nobody signed in: 401 before any handshake; bob, outside acme: 404; a name that is no app: 401
    with env.browser("bob") as bob:
        bob_cookie = bob.cookies.get("envctl_app")
    for path, headers, status in [
        ("/apps/acme/chat/", {}, 401),
        ("/apps/acme/nothing/", {}, 401),
        ("/apps/acme/chat/", {"Cookie": f"envctl_app={bob_cookie}"}, 404),
        ("/apps/acme/chat/", {"Authorization": f"Bearer {env.tokens['bob']}"}, 404),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            _socket(env, path, headers)
        assert refused.value.response.status_code == status, (path, headers)

    public = env.cli("alice", "app", "deploy", str(write_notebook(tmp_path / "wsp", [WS_ECHO_CELL])), "--team",
                     "acme", "--name", "chat-open", "--public")  # fmt: skip
    assert public.returncode == 0, public.stdout + public.stderr
    with _socket(env, "/apps/acme/chat-open/") as ws:
        ws.send("anyone")
        assert ws.recv(timeout=10) == "anyone"
    for name in ("chat", "chat-open"):
        assert env.cli("alice", "app", "rm", name, "--team", "acme").returncode == 0
    with pytest.raises(InvalidStatus) as gone:
        _socket(env, "/apps/acme/chat-open/")
    assert gone.value.response.status_code == 401


def test_a_failing_cell_fails_the_deployment_with_its_error(env: Env, tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "bad", ["y = 1", "raise ValueError('no data for the report')"])
    done = env.cli("alice", "app", "deploy", str(nb), "--team", "acme", "--name", "broken")
    assert done.returncode == 1, done.stdout + done.stderr
    dep = env.deployment("broken", 1)
    assert dep["status"] == "failed"
    assert "cell 2: ValueError: no data for the report" in dep["message"], dep
    assert not [r for r in env.runtimes() if r["name"].startswith("app-broken-")]


def _upload(env: Env, who: str, team: str, name: str, mangle: Any = None) -> tuple[str, str, str]:
    """A bundle of a working app for ``team``, sealed as a client does, ``mangle``d, uploaded."""
    files = {"app.ipynb": app_notebook(Path(f"/tmp/envctl-apps-{uuid.uuid4().hex}"), "evil").read_bytes(),
             "data.txt": b"x"}  # fmt: skip
    with env.client(who) as c:
        made = c.post(f"/teams/{team}/apps/{name}/bundles").json()
        sealed = bundles.seal(base64.b64decode(made["key"]), made["header"], bundles.pack("app.ipynb", files))
        if mangle is not None:
            sealed = mangle(sealed)
        sha = hashlib.sha256(sealed).hexdigest()
        target = c.post(f"/teams/{team}/apps/{name}/bundles/upload-url", json={"sha256": sha, "size": len(sealed)})
        put = httpx.put(target.json()["url"], content=sealed)
        assert put.status_code == 201, put.text
    return made["bundle_id"], sha, hashlib.sha256(files["app.ipynb"]).hexdigest()


def _deploy(env: Env, name: str, bundle: tuple[str, str, str]) -> dict[str, Any]:
    bundle_id, sha, nb_sha = bundle
    body = {"notebook": "app.ipynb", "notebook_sha256": nb_sha, "bundle_id": bundle_id, "bundle_sha256": sha}
    with env.client("alice") as c:
        resp = c.post(f"/teams/acme/apps/{name}/deployments", json=body)
        assert resp.status_code == 202, resp.text
        made: dict[str, Any] = resp.json()
        return made


@pytest.mark.parametrize(
    ("case", "mangle", "said"),
    [
        ("flipped", lambda b: b[:-40] + bytes([b[-40] ^ 1]) + b[-39:], "does not decrypt"),
        ("truncated", lambda b: b[: len(b) // 2], "does not decrypt"),
        ("cut-in-header", lambda b: b[:30], "truncated"),
    ],
)
def test_a_changed_or_truncated_bundle_is_refused_and_nothing_runs(env: Env, case: str, mangle: Any, said: str) -> None:
    dep = _deploy(env, f"bad-{case}", _upload(env, "alice", "acme", f"bad-{case}", mangle))
    failed = env.wait_deployment(f"bad-{case}", dep["number"], {"failed", "running"})
    assert failed["status"] == "failed" and said in failed["message"], failed
    assert "nothing was run" in failed["message"]
    assert not [r for r in env.runtimes() if r["name"].startswith(f"app-bad-{case}-")]


def test_a_bundle_of_another_team_is_refused(env: Env) -> None:
    theirs = _upload(env, "bob", "other", "sales")  # bob's, for team other, uploaded by him
    dep = _deploy(env, "swapped", theirs)
    failed = env.wait_deployment("swapped", dep["number"], {"failed", "running"})
    assert failed["status"] == "failed" and "encrypted for team 'other', not 'acme'" in failed["message"], failed
    assert not [r for r in env.runtimes() if r["name"].startswith("app-swapped-")]


def test_a_bundle_changed_in_the_object_store_is_refused_on_download(env: Env) -> None:
    bundle = _upload(env, "alice", "acme", "stored")
    dep = _deploy(env, "stored", bundle)
    assert env.wait_deployment("stored", dep["number"], {"failed", "running"})["status"] == "running"
    stored = env.srv.data_dir / "results" / "sha256" / bundle[1][:2] / bundle[1][2:]
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0xFF
    stored.chmod(0o644)
    stored.write_bytes(bytes(data))
    with env.client("alice") as c:
        again = c.post("/teams/acme/apps/stored/rollback", json={"number": dep["number"]}).json()
    failed = env.wait_deployment("stored", again["number"], {"failed", "running"})
    assert failed["status"] == "failed" and "changed or truncated in the object store" in failed["message"], failed
    assert not [r for r in env.runtimes() if r["name"].startswith(f"app-stored-{again['number']}-")]
    assert env.show("stored")["current"] == dep["number"]  # the running one stays


def test_a_crashed_app_is_restarted_and_says_so(env: Env, docker: Any, tmp_path: Path) -> None:
    done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "c", "steady")), "--team", "acme",
                   "--name", "steady")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [rt] = [r for r in env.runtimes() if r["name"].startswith("app-steady-1-")]
    [container] = docker.containers.list(filters={"label": f"envctl.runtime-id={rt['id']}"})
    container.kill()
    deadline = time.monotonic() + 120
    while True:
        [inst] = env.show("steady")["running"]
        if inst["restarts"] >= 1 and inst["status"] == "running":
            break
        assert time.monotonic() < deadline, f"{inst}\n{env.srv.output()[-3000:]}"
        time.sleep(0.5)
    with env.client("alice") as c:
        resp = c.get("/apps/acme/steady/")
        assert resp.status_code == 200 and resp.json()["version"] == "steady"
    assert env.deployment("steady", 1)["status"] == "running"
    # the same runtime, booted again (visible in the runtime list, idle shutdown off)
    [again] = [r for r in env.runtimes() if r["name"].startswith("app-steady-1-")]
    assert again["id"] == rt["id"] and again["state"] == "running"
    assert "shutdown is off" in json.dumps(again), again


def test_secrets_reach_the_app_by_reference_and_their_values_are_nowhere_else(env: Env, tmp_path: Path) -> None:
    value = f"s3cr3t-{uuid.uuid4().hex}"
    with env.client("alice") as c:
        assert c.put("/teams/acme/secrets/db-pass", json={"value": value}).status_code == 201
    done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "s", "secret")), "--team", "acme",
                   "--name", "vault", "--secret", "DB_PASSWORD=db-pass", "--var", "MODE=report")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with env.client("alice") as c:
        seen = c.get("/apps/acme/vault/").json()
    assert seen["env"]["DB_PASSWORD"] == value and seen["env"]["MODE"] == "report"
    dep = env.deployment("vault", 1)
    assert dep["env"] == {"MODE": "report", "DB_PASSWORD": {"secret": "db-pass", "team": "acme"}}
    logs = env.cli("alice", "app", "logs", "vault", "--team", "acme").stdout
    forms = [value.encode(), base64.b64encode(value.encode()), value.encode().hex().encode()]
    found = []
    for path in env.srv.data_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [str(path) for f in forms if f in data]
    assert found == [] and value not in logs

    # the secret changed after deployment: the app says it is out of date (a restart takes it)
    assert env.show("vault")["running"][0]["secrets_outdated"] == []
    with env.client("alice") as c:
        assert c.put("/teams/acme/secrets/db-pass", json={"value": value + "-new"}).status_code == 200
    outdated = env.show("vault")["running"][0]["secrets_outdated"]
    assert outdated and "db-pass" in json.dumps(outdated), outdated
    assert "out of date" in env.cli("alice", "app", "show", "vault", "--team", "acme").stdout


def test_an_app_whose_server_stopped_answering_is_restarted(env: Env, tmp_path: Path) -> None:
    done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "q", "quiet")), "--team", "acme",
                   "--name", "quiet")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [rt] = [r for r in env.runtimes() if r["name"].startswith("app-quiet-1-")]
    with env.client("alice") as c:  # the web server stops; the runtime and its kernel stay
        ex = c.post(f"/runtimes/{rt['id']}/executions", params={"wait": 20},
                    json={"code": "server.shutdown(); server.server_close()"})  # fmt: skip
        assert ex.json()["status"] == "ok", ex.text
    deadline = time.monotonic() + 120
    while True:
        [inst] = env.show("quiet")["running"]
        if inst["restarts"] >= 1 and inst["status"] == "running":
            break
        assert time.monotonic() < deadline, f"{inst}\n{env.srv.output()[-3000:]}"
        time.sleep(0.5)
    with env.client("alice") as c:
        assert c.get("/apps/acme/quiet/").json()["version"] == "quiet"


def test_requests_are_spread_across_instances(env: Env, tmp_path: Path) -> None:
    done = env.cli("alice", "app", "deploy", str(app_notebook(tmp_path / "i", "many")), "--team", "acme",
                   "--name", "many", "--instances", "2")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    shown = env.show("many")
    assert [i["status"] for i in shown["running"]] == ["running", "running"]
    with env.client("alice") as c:
        hosts = {c.get("/apps/acme/many/").json()["env"]["HOSTNAME"] for _ in range(8)}
    assert len(hosts) == 2
    assert env.cli("alice", "app", "rm", "many", "--team", "acme").returncode == 0
    assert not [r for r in env.runtimes() if r["name"].startswith("app-many-")]


def test_a_deployment_cut_short_by_a_server_crash_is_made_again(env: Env, tmp_path: Path) -> None:
    """envctl serve killed (SIGKILL) while a deployment's cells run: started again, its app
    server removes what that deployment had made and deploys it again from the start."""
    nb = write_notebook(tmp_path / "slow", ["import time; time.sleep(6)", SERVER_CELL.format(version="slow")])
    done = env.cli("alice", "app", "deploy", str(nb), "--team", "acme", "--name", "slow", "--wait", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    env.wait_deployment("slow", 1, {"starting"}, timeout=60)
    deadline = time.monotonic() + 60
    while not any(r["name"].startswith("app-slow-1-") and r["state"] == "running" for r in env.runtimes()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    env.srv.kill()
    env.srv.start()
    dep = env.wait_deployment("slow", 1, {"running", "failed"}, timeout=180)
    assert dep["status"] == "running", dep
    with env.client("alice") as c:
        assert c.get("/apps/acme/slow/").json()["version"] == "slow"
    assert len([r for r in env.runtimes() if r["name"].startswith("app-slow-1-")]) == 1
