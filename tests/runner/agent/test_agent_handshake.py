"""The tcp channel's handshake and credential, without Docker: a real agent process on this
machine's loopback, served with a credential handed over through a FIFO as a boot does."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.settings import load
from envs.kit.db import Database
from envs.kit.errors import BackendError, InvalidInputError
from registry.team_secrets import SecretBox
from runner.agent import handshake
from runner.agentauth import AgentLinks, Credential, hand_over, make_credential
from runner.backends.fake import FakeBackend
from runner.channel import AgentAddress, AgentChannel, AgentUnavailableError, wait_for_agent
from runner.paths import AGENT_DIR
from runner.service import RunnerService


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentAddress, Credential, subprocess.Popen[bytes]]]:
    """The agent as a runtime's main process on a tcp channel, its credential read from a FIFO."""
    cred = make_credential("rt_handshake")
    port = _free_port()
    with hand_over(tmp_path, cred) as fifo:
        assert stat.S_ISFIFO(fifo.lstat().st_mode) and stat.S_IMODE(fifo.lstat().st_mode) == 0o600
        proc = subprocess.Popen(
            [sys.executable, "-u", "-I", str(AGENT_DIR / "main.py"), "--socket", str(tmp_path / "agent.sock")]
            + ["--listen", f"tcp:{port}", "--credential", str(fifo)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        to = AgentAddress("127.0.0.1", port, cred.runtime_id, cred.boot, cred.key, cred.pin)
        try:
            wait_for_agent(to, time.monotonic() + 20)
        except AgentUnavailableError:
            proc.kill()
            raise AssertionError((proc.stdout.read() if proc.stdout else b"").decode()) from None
    try:
        yield to, cred, proc
    finally:
        proc.kill()
        proc.wait()


def test_the_fifo_is_read_once_and_gone_after_the_boot(tmp_path: Path, agent: Any) -> None:
    assert not (tmp_path / "agent.key").exists()
    assert not (tmp_path / "agent.sock").exists()  # a tcp agent has no Unix socket


def test_a_client_with_the_credential_gets_through_and_cells_run(agent: Any) -> None:
    to, _cred, _proc = agent
    with AgentChannel(to, timeout=5) as channel:
        assert channel.ping()["op"] == "pong"
        events = list(channel.stream("execute", execution_id="ex_1", code="6*7", language="python"))
    assert [e["event"] for e in events] == ["accepted", "output", "done"]
    assert events[1]["output"]["data"]["text/plain"] == "42"


def test_wrong_runtime_boot_or_key_is_refused_and_reported_at_the_next_connection(agent: Any) -> None:
    to, cred, proc = agent
    reported: list[tuple[str, str, dict[str, Any]]] = []
    other = make_credential("rt_other")
    for address in (
        AgentAddress(to.host, to.port, "rt_other", other.boot, other.key, to.pin),
        AgentAddress(to.host, to.port, cred.runtime_id, "an-earlier-boot", cred.key, to.pin),
    ):
        with pytest.raises(AgentUnavailableError, match="refused the connection"):
            AgentChannel(address, timeout=5)
    # a wrong key: the agent's own proof does not check out, so envctl stops first
    with pytest.raises(AgentUnavailableError, match="could not prove"):
        AgentChannel(AgentAddress(to.host, to.port, cred.runtime_id, cred.boot, other.key, to.pin), timeout=5)
    # a certificate that is not the pinned one
    with pytest.raises(AgentUnavailableError, match="certificate is not this boot's"):
        AgentChannel(AgentAddress(to.host, to.port, cred.runtime_id, cred.boot, cred.key, other.pin), timeout=5)
    report = AgentAddress(to.host, to.port, cred.runtime_id, cred.boot, cred.key, to.pin, lambda *a: reported.append(a))
    with AgentChannel(report, timeout=5) as channel:
        assert channel.ping()["ok"]
    reasons = [d.get("reason", "") for _rid, _m, d in reported]
    assert any("for runtime 'rt_other'" in r for r in reasons)
    assert any("another boot" in r for r in reasons)
    assert any("closed during the handshake" in r for r in reasons)  # the wrong key's client gave up
    proc.kill()
    out = (proc.stdout.read() if proc.stdout else b"").decode()
    assert out.count("envctl-agent: refused a connection") >= 3
    assert cred.key.hex() not in out and other.key.hex() not in out


def test_proofs_bind_role_runtime_boot_and_both_nonces() -> None:
    key = os.urandom(32)
    base = handshake.proof(key, "envctl", "rt_a", "b1", "n" * 32, "m" * 32)
    assert base != handshake.proof(key, "agent", "rt_a", "b1", "n" * 32, "m" * 32)  # no reflection
    assert base != handshake.proof(key, "envctl", "rt_b", "b1", "n" * 32, "m" * 32)
    assert base != handshake.proof(key, "envctl", "rt_a", "b2", "n" * 32, "m" * 32)
    assert base != handshake.proof(key, "envctl", "rt_a", "b1", "o" * 32, "m" * 32)
    assert base != handshake.proof(os.urandom(32), "envctl", "rt_a", "b1", "n" * 32, "m" * 32)


def test_each_boot_gets_a_fresh_credential_and_the_row_keeps_only_its_sealed_key(tmp_path: Path) -> None:
    first, second = make_credential("rt_a"), make_credential("rt_a")
    assert first.boot != second.boot and first.key != second.key and first.pin != second.pin
    assert first.key.hex() not in repr(first) and "PRIVATE" not in repr(first)
    links = AgentLinks(SecretBox(tmp_path / "secrets.key"))
    kept = links.record(first, "10.0.0.5", 7600)
    assert first.key.hex() not in str(kept) and "PRIVATE KEY" not in str(kept)
    back = links.address("rt_a", kept)
    assert (back.host, back.port, back.boot, back.key, back.pin) == ("10.0.0.5", 7600, first.boot, first.key, first.pin)
    # a server with another secrets key opens nothing, and says what to do
    with pytest.raises(BackendError, match="does not open with the secrets key"):
        AgentLinks(SecretBox(tmp_path / "other.key")).address("rt_a", kept)
    with pytest.raises(BackendError, match="damaged"):
        links.address("rt_a", {**kept, "port": "seventy"})


def test_an_unread_fifo_is_removed_and_its_content_dropped(tmp_path: Path) -> None:
    cred = make_credential("rt_a")
    with hand_over(tmp_path, cred) as fifo:
        got = handshake.read_credential(str(fifo), wait=2)
        assert got["key"] == cred.key and got["boot"] == cred.boot
        assert not fifo.exists()  # the reader removes it
    with hand_over(tmp_path, cred) as fifo:
        pass
    assert not fifo.exists()
    with pytest.raises(ValueError, match="no credential"):
        handshake.read_credential(str(tmp_path / "agent.key"), wait=0.1)


def test_the_channel_setting_is_checked_and_a_backend_without_tcp_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="ENVCTL_RUNNER_CHANNEL"):
        load(env={"ENVCTL_RUNNER_CHANNEL": "udp", "ENVCTL_DATA_DIR": str(tmp_path)})
    settings = load(env={"ENVCTL_RUNNER_CHANNEL": "tcp", "ENVCTL_DATA_DIR": str(tmp_path)})
    from api.dbschema import upgrade

    upgrade(settings.effective_database_url)
    db = Database(settings.effective_database_url)
    try:
        with pytest.raises(InvalidInputError, match="cannot start runtimes with the 'tcp' agent channel"):
            RunnerService(settings, db, FakeBackend())
    finally:
        db.dispose()


def test_a_silent_connection_does_not_hold_the_agent(agent: Any) -> None:
    """A connection that never speaks is dropped after the handshake's time limit, and meanwhile
    others are served."""
    to, _cred, _proc = agent
    silent = socket.create_connection((to.host, to.port), timeout=5)
    try:
        done = threading.Event()

        def ping() -> None:
            with AgentChannel(to, timeout=5) as channel:
                channel.ping()
            done.set()

        threading.Thread(target=ping, daemon=True).start()
        assert done.wait(5)
    finally:
        silent.close()


def test_a_cell_may_carry_the_ack_of_the_one_before(agent: Any) -> None:
    """The runner tells the agent a cell is stored with the next cell it sends: the agent
    forgets it then, and keeps a cell nobody acknowledged."""
    to, _cred, _proc = agent
    with AgentChannel(to, timeout=5) as channel:
        list(channel.stream("execute", execution_id="ex_a", code="1", language="python"))
        list(channel.stream("execute", execution_id="ex_b", code="2", language="python", ack=["ex_a"]))
        assert set(channel.request("status")["executions"]) == {"ex_b"}
