"""Files into and out of a runtime over the agent channel (issue 15 item 4: mounts and results
on a backend without host paths), through the real agent process on a Unix socket: a prepared
tree streamed in and unpacked read-only, ``/results`` fetched into envctl's copy with only what
changed sent again, and names the agent must not be trusted with refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.backends.base import MountBind
from runner.cells.result_remote import RemoteResults, fetch
from runner.channel import AgentChannel, AgentUnavailableError, wait_for_agent
from runner.errors import ResultFetchError
from runner.mounts.errors import MountFetchError
from runner.mounts.streamed import send_mounts

AGENT = Path(__file__).resolve().parents[3] / "runner" / "agent" / "main.py"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "state" / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-u", "-I", str(AGENT), "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_agent(sock, time.monotonic() + 20)
        yield sock
    finally:
        proc.kill()
        proc.wait()


def test_a_prepared_tree_is_unpacked_read_only_at_its_target_with_progress(agent: Path, tmp_path: Path) -> None:
    tree = tmp_path / "prepared"
    (tree / "lib" / "deep").mkdir(parents=True)
    (tree / "lib" / "answer.py").write_text("ANSWER = 42\n")
    (tree / "lib" / "deep" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "lib" / "deep" / "run.sh").chmod(0o755)
    (tree / "big.bin").write_bytes(os.urandom(3 << 20))  # more than one frame
    (tree / "link").symlink_to("lib/answer.py")
    seen: list[tuple[str, tuple[int, int] | None]] = []
    target = tmp_path / "mnt" / "code"
    sent = send_mounts(agent, [MountBind(str(target), str(tree))], lambda phase, p: seen.append((phase, p)))
    assert (target / "lib" / "answer.py").read_text() == "ANSWER = 42\n"
    assert (target / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()
    assert os.readlink(target / "link") == "lib/answer.py"
    assert (target / "lib" / "deep" / "run.sh").stat().st_mode & 0o777 == 0o555
    assert (target / "lib" / "answer.py").stat().st_mode & 0o777 == 0o444
    assert target.stat().st_mode & 0o777 == 0o555
    assert seen[0] == ("downloading", (0, seen[0][1][1]))  # type: ignore[index]
    assert seen[-1][1] is not None and seen[-1][1][0] == seen[-1][1][1] and sent >= 3 << 20


def test_an_unpack_that_fails_names_the_mount_target(agent: Path, tmp_path: Path) -> None:
    tree = tmp_path / "prepared"
    tree.mkdir()
    (tree / "a.txt").write_text("a")
    target = tmp_path / "taken"
    target.mkdir()
    (target / "a.txt").write_text("already there")  # O_EXCL: the agent never writes over a file
    with pytest.raises(MountFetchError, match=str(target)):
        send_mounts(agent, [MountBind(str(target), str(tree))], lambda *_: None)
    # the connection's framing held: the next request on a new one works
    with AgentChannel(agent) as channel:
        assert channel.ping()["op"] == "pong"


def test_results_are_fetched_and_only_what_changed_is_sent_again(agent: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "plots").mkdir(parents=True)
    (results / "plots" / "a.png").write_bytes(b"\x89PNG" + os.urandom(2 << 20))
    (results / "table.csv").write_text("x,y\n")
    (results / "escape").symlink_to("/etc/passwd")  # never followed, never sent
    copy = tmp_path / "copy"
    with AgentChannel(agent) as channel:
        assert fetch(channel, copy, str(results)) == 2
        assert (copy / "plots" / "a.png").read_bytes() == (results / "plots" / "a.png").read_bytes()
        assert (copy / "table.csv").stat().st_mtime_ns == (results / "table.csv").stat().st_mtime_ns
        assert not (copy / "escape").exists()
        assert fetch(channel, copy, str(results)) == 0  # nothing changed: nothing sent
        (results / "table.csv").write_text("x,y\n1,2\n")
        (results / "plots" / "a.png").unlink()
        assert fetch(channel, copy, str(results)) == 1
        assert (copy / "table.csv").read_text() == "x,y\n1,2\n"
        assert not (copy / "plots" / "a.png").exists()


def _fake_agent(sock: Path, header: bytes, body: bytes) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.makefile("rb").readline()
        conn.sendall(header + body)
        time.sleep(0.5)
        conn.close()
        server.close()

    import threading

    threading.Thread(target=serve, daemon=True).start()


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/x", "a/../../b", "a//b", "./a", ""])
def test_a_result_name_that_would_leave_the_copy_is_refused(tmp_path: Path, name: str) -> None:
    sock = tmp_path / "fake.sock"
    header = (json.dumps({"id": 1, "ok": True, "event": "results", "send": [[name, 2, 0]], "gone": []}) + "\n").encode()
    _fake_agent(sock, header, b"hi")
    copy = tmp_path / "d" / "copy"
    with AgentChannel(sock) as channel, pytest.raises(ResultFetchError, match="result"):
        fetch(channel, copy)
    assert sorted(p.name for p in tmp_path.joinpath("d").rglob("*")) == ["copy"]


def _start_agent(sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-u", "-I", str(AGENT), "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_agent(sock, time.monotonic() + 20)
    return proc


def test_the_kept_connection_is_reused_replaced_once_after_a_reboot_and_a_dead_agent_fails_fast(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "state" / "agent.sock"
    results = tmp_path / "results"
    results.mkdir()
    (results / "a.txt").write_text("a")
    copy = tmp_path / "copy"
    at = {"rt_1": sock}

    def target(runtime_id: str) -> Path:  # the runtime's agent as the database says now
        return at[runtime_id]

    remote = RemoteResults(target, str(results))
    proc = _start_agent(sock)
    try:
        try:
            assert remote.sync("rt_1", copy) == 1
            assert remote.sync("rt_1", copy) == 0
            assert remote.connections_made == 1  # one connection for both cells
            proc.kill()
            proc.wait()
            proc = _start_agent(sock)  # the runtime booted again: the kept connection is dead
            (results / "b.txt").write_text("b")
            assert remote.sync("rt_1", copy) == 1 and (copy / "b.txt").read_text() == "b"
            assert remote.connections_made == 2
            # booted again elsewhere (another address): the kept connection goes unused, at once
            moved = tmp_path / "moved" / "agent.sock"
            moved.parent.mkdir()
            proc.kill()
            proc.wait()
            proc = _start_agent(moved)
            at["rt_1"] = moved
            (results / "c.txt").write_text("c")
            assert remote.sync("rt_1", copy) == 1 and (copy / "c.txt").read_text() == "c"
            assert remote.connections_made == 3
            proc.kill()
            proc.wait()
            moved.unlink(missing_ok=True)
            began = time.monotonic()
            with pytest.raises(AgentUnavailableError):
                remote.sync("rt_1", copy)
            assert time.monotonic() - began < 5
            assert remote.connections_made == 4
        finally:
            remote.forget("rt_1")
    finally:
        proc.kill()
        proc.wait()
