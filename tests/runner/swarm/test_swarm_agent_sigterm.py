"""The agent's SIGTERM with ``--term-wait`` (what Swarm sends when a node drains; issue 15 item 2):
the real agent as a local process on its Unix socket. It stops its cells and keeps answering,
saying ``terminating``, until envctl takes a draft or the wait ends; with nothing to keep (no
cell since its last layer), or told by envctl that it stops the runtime itself, it exits at once.
The draft itself taken in that window is tested on the swarm (``test_swarm_drafts.py``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.backends.swarm_files import AGENT_DIR
from runner.channel import AgentChannel, wait_for_agent

WAIT = 3.0


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-u", "-I", str(AGENT_DIR / "main.py"), "--socket", str(sock), "--term-wait", f"{WAIT:g}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_agent(sock, time.monotonic() + 20)
        yield sock, proc
    finally:
        proc.kill()
        proc.wait()


def cell(sock: Path, code: str) -> None:
    with AgentChannel(sock, timeout=10) as channel:
        events = list(channel.stream("execute", execution_id=f"ex_{time.monotonic_ns()}", code=code, language="python"))
    assert events[-1]["event"] == "done", events


def exited_within(proc: subprocess.Popen[bytes], seconds: float) -> float:
    began = time.monotonic()
    proc.wait(timeout=seconds)
    return time.monotonic() - began


def test_after_a_cell_sigterm_keeps_the_agent_answering_then_it_exits_after_its_wait(agent: tuple) -> None:  # type: ignore[type-arg]
    sock, proc = agent
    cell(sock, "x = 1")
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with AgentChannel(sock, timeout=5) as channel:
        assert channel.ping()["terminating"] is True
    exited_within(proc, WAIT + 5)
    out = (proc.stdout.read() if proc.stdout else b"").decode()
    assert time.monotonic() - began >= WAIT - 0.2, out
    assert f"waiting up to {WAIT:g} s" in out and "no draft taken" in out, out


def test_with_no_cell_since_its_last_layer_sigterm_ends_the_agent_at_once(agent: tuple) -> None:  # type: ignore[type-arg]
    sock, proc = agent
    with AgentChannel(sock, timeout=5) as channel:
        assert channel.ping()["terminating"] is False
    proc.send_signal(signal.SIGTERM)
    assert exited_within(proc, WAIT) < 1.5


def test_an_agent_envctl_released_ends_at_once_on_sigterm(agent: tuple) -> None:  # type: ignore[type-arg]
    sock, proc = agent
    cell(sock, "y = 2")
    with AgentChannel(sock, timeout=5) as channel:
        assert channel.request("release")["op"] == "release"
    proc.send_signal(signal.SIGTERM)
    assert exited_within(proc, WAIT) < 1.5
