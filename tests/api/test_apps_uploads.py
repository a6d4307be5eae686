"""Request bodies through the apps' proxy (api/appproxy.py): a large upload is passed on as it
comes, with the visitor's Content-Length or chunked, and does not sit in envctl's memory; a small
one (a form, JSON) is read whole and sent on a kept connection. A real ``envctl serve`` (its RSS
read from /proc) and an app whose server counts and hashes what it receives."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.test_apps_docker import Env, env, write_notebook  # noqa: F401 - env: the module's server

pytestmark = [pytest.mark.docker, pytest.mark.slow]

MIB = 1024 * 1024
SIZE = 64 * MIB

COUNT_CELL = r"""
import hashlib, http.server, json, threading
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _chunks(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 16))
                    left -= len(data)
                    yield data
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 1 << 16))
                if not data:
                    return
                left -= len(data)
                yield data
    def do_POST(self):
        digest, count = hashlib.sha256(), 0
        for data in self._chunks():
            digest.update(data)
            count += len(data)
        body = json.dumps({
            "count": count, "sha256": digest.hexdigest(),
            "length": self.headers.get("Content-Length"), "encoding": self.headers.get("Transfer-Encoding"),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
server = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("counting")
"""


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Peak:
    """The highest RSS of a process, sampled every few milliseconds while in use."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def body(digest: hashlib._Hash) -> Iterator[bytes]:
    block = os.urandom(MIB)
    for n in range(SIZE // MIB):
        data = block[:-1] + bytes([n])
        digest.update(data)
        yield data


def test_a_large_upload_reaches_the_app_whole_without_sitting_in_envctls_memory(env: Env, tmp_path: Path) -> None:  # noqa: F811
    nb = write_notebook(tmp_path / "counter", [COUNT_CELL])
    done = env.cli("alice", "app", "deploy", str(nb), "--team", "acme", "--name", "counter")
    assert done.returncode == 0, done.stdout + done.stderr + env.srv.output()[-3000:]
    assert env.srv.proc is not None
    pid = env.srv.proc.pid
    with env.client("alice") as c:
        # a small body: read whole, its length set by envctl
        small = c.post("/apps/acme/counter/form", json={"a": 1})
        assert small.status_code == 200, small.text
        assert small.json()["count"] == len(json.dumps({"a": 1}, separators=(",", ":")))
        for framing in ("content-length", "chunked"):
            for _ in range(2):  # the second run's figure: the first warms envctl's own buffers
                sent = hashlib.sha256()
                headers = {"Content-Length": str(SIZE)} if framing == "content-length" else {}
                before = rss(pid)
                with Peak(pid) as peak:
                    resp = c.post("/apps/acme/counter/upload", content=body(sent), headers=headers, timeout=120)
                assert resp.status_code == 200, resp.text
                got = resp.json()
                assert (got["count"], got["sha256"]) == (SIZE, sent.hexdigest()), got
                if framing == "content-length":
                    assert (got["length"], got["encoding"]) == (str(SIZE), None), got
                else:
                    assert (got["length"], got["encoding"]) == (None, "chunked"), got
            grew = peak.peak - before
            print(f"{framing}: {SIZE // MIB} MiB through the proxy, envctl serve's RSS grew {grew / MIB:.1f} MiB")
            assert grew < 16 * MIB, f"{framing}: RSS grew {grew / MIB:.1f} MiB for a {SIZE // MIB} MiB upload"
        # the kept connections still work after streamed ones
        again = c.post("/apps/acme/counter/form", content=b"x" * 1000)
        assert again.status_code == 200 and again.json()["count"] == 1000


def test_a_visitor_who_breaks_off_an_upload_leaves_the_app_answering(env: Env, tmp_path: Path) -> None:  # noqa: F811
    nb = write_notebook(tmp_path / "counter2", [COUNT_CELL])
    done = env.cli("alice", "app", "deploy", str(nb), "--team", "acme", "--name", "counter2")
    assert done.returncode == 0, done.stdout + done.stderr

    def broken() -> Iterator[bytes]:
        yield b"x" * MIB
        raise RuntimeError("the visitor goes away")

    with env.client("alice") as c:
        with pytest.raises((httpx.HTTPError, RuntimeError)):
            c.post("/apps/acme/counter2/upload", content=broken(), headers={"Content-Length": str(SIZE)})
        time.sleep(0.5)
        resp = c.post("/apps/acme/counter2/upload", content=b"y" * (2 * MIB))
        assert resp.status_code == 200 and resp.json()["count"] == 2 * MIB, resp.text


def test_an_upload_that_expects_100_continue_gets_the_apps_answer(env: Env, tmp_path: Path) -> None:  # noqa: F811
    """curl's way with a large body (``Expect: 100-continue``): the ASGI server answers the
    100 itself; the app never sees the header, and the visitor gets the app's final answer."""
    nb = write_notebook(tmp_path / "counter3", [COUNT_CELL])
    done = env.cli("alice", "app", "deploy", str(nb), "--team", "acme", "--name", "counter3")
    assert done.returncode == 0, done.stdout + done.stderr
    data = tmp_path / "upload.bin"
    block = os.urandom(MIB)
    with data.open("wb") as f:
        for _ in range(8):
            f.write(block)
    out = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-H", f"Authorization: Bearer {env.tokens['alice']}",
         "-H", "Expect: 100-continue", "--data-binary", f"@{data}", "-w", "\n%{http_code}",
         f"{env.srv.url}/apps/acme/counter3/upload"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    body, _, code = out.stdout.rpartition("\n")
    assert code == "200", (out.stdout, out.stderr)
    got = json.loads(body)
    assert (got["count"], got["sha256"]) == (8 * MIB, hashlib.sha256(block * 8).hexdigest()), got


EARLY_CELL = r"""
import http.server, threading
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        # the headers only: the body is never read; the answer, then the connection closed
        # with the body unread (the kernel resets it)
        body = b"too large for this app\n"
        self.send_response(413)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
server = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("refusing")
"""


def test_an_app_that_answers_before_reading_a_streamed_body_and_resets_is_heard(env: Env, tmp_path: Path) -> None:  # noqa: F811
    """A body over MAX_BUFFERED goes to the app on a connection of its own; the app answers 413
    after the headers and closes with the body unread (a reset): the visitor gets the 413 and its
    text, not a 502, and the app keeps answering."""
    nb = write_notebook(tmp_path / "early", [EARLY_CELL])
    done = env.cli("alice", "app", "deploy", str(nb), "--team", "acme", "--name", "early")
    assert done.returncode == 0, done.stdout + done.stderr
    data = tmp_path / "big.bin"
    block = os.urandom(MIB)
    with data.open("wb") as f:
        for _ in range(32):
            f.write(block)
    for framing in ([], ["-H", "Transfer-Encoding: chunked"]):
        for _ in range(3):
            out = subprocess.run(
                ["curl", "-sS", "--noproxy", "*", "-H", f"Authorization: Bearer {env.tokens['alice']}", *framing,
                 "--data-binary", f"@{data}", "-w", "\n%{http_code}", f"{env.srv.url}/apps/acme/early/upload"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            body, _, code = out.stdout.rpartition("\n")
            assert (code, body) == ("413", "too large for this app\n"), (framing, out.stdout, out.stderr)
    with env.client("alice") as c:
        assert c.get("/apps/acme/early/").text == "ok"
