"""The agent over the network (ENVCTL_RUNNER_CHANNEL=tcp), through a real `envctl serve` on
the Docker engine: R40 (connections without the runtime's current credential refused and
logged; the credential nowhere in the container's configuration, its image or any log) and
R4 on the channel. Cells, streams, interrupts, results and R11 over tcp are the execution
tests of test_docker_executions.py, run over both channels."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from envs.kit.db import Database
from registry.team_secrets import SecretBox
from runner.agent import handshake
from runner.agentauth import AgentLinks
from runner.channel import AgentAddress, AgentChannel, AgentUnavailableError
from runner.models import Runtime
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.conftest import remove_runner_containers, start_server
from tests.runner.runtimes.test_docker_settings import _probe

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def srv(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "python3")
    # on every address, so that only the fence keeps cells away from the API (R4)
    server = start_server(
        docker, tmp_path_factory.mktemp("agentnet") / "data", ENVCTL_RUNNER_CHANNEL="tcp", ENVCTL_API_HOST="0.0.0.0"
    )
    yield server
    remove_runner_containers(docker, server)


def boot(srv: Server, client: httpx.Client, name: str) -> str:
    r = client.post("/runtimes", json={"environment": "python3", "name": name})
    assert r.status_code == 201, r.text
    rid = str(r.json()["id"])
    rt = client.post(f"/runtimes/{rid}/start", params={"wait": 60}).json()
    assert rt["state"] == "running", rt
    return rid


def restart(srv: Server, client: httpx.Client, rid: str) -> None:
    assert client.post(f"/runtimes/{rid}/stop", params={"wait": 60}).json()["state"] == "stopped"
    assert client.post(f"/runtimes/{rid}/start", params={"wait": 60}).json()["state"] == "running"


def cell(client: httpx.Client, rid: str, code: str) -> dict[str, Any]:
    ex: dict[str, Any] = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json={"code": code}).json()
    assert ex["status"] == "ok", ex
    return ex


def recorded(srv: Server, rid: str) -> dict[str, Any]:
    db = Database(f"sqlite:///{srv.data_dir / 'envctl.db'}")
    try:
        with db.session() as s:
            row = s.get(Runtime, rid)
            assert row is not None
            return dict(row.backend_state or {})
    finally:
        db.dispose()


def address(srv: Server, rid: str) -> AgentAddress:
    """What envctl knows to reach the runtime's agent: read off its row, the key opened with
    the installation's secrets key (as a second server of the installation would)."""
    state = recorded(srv, rid)
    assert state["agent"]["channel"] == "tcp", state
    return AgentLinks(SecretBox(srv.data_dir / "secrets.key")).address(rid, state["agent"])


def forged(to: AgentAddress, *, runtime: str, boot: str, key: bytes) -> str:
    """A client of our own that does the handshake with what it is given (no check of the
    agent's proof: it sends its own regardless); the agent's last answer."""
    raw = socket.create_connection((to.host, to.port), timeout=10)
    with handshake.client_context().wrap_socket(raw) as conn:
        reader = conn.makefile("rb")
        mine = handshake.nonce()
        conn.sendall(handshake.encode({"op": "hello", "v": 1, "runtime": runtime, "boot": boot, "nonce": mine}))
        challenge = json.loads(reader.readline() or b"{}")
        if challenge.get("ok") is not True:
            return str(challenge.get("error"))
        proof = handshake.proof(key, "envctl", runtime, boot, mine, challenge["nonce"])
        conn.sendall(handshake.encode({"op": "auth", "proof": proof}))
        answer = json.loads(reader.readline() or b"{}")
        assert reader.readline() == b"", "the agent must close a refused connection"
        return str(answer.get("error")) if answer.get("ok") is not True else "welcome"


def refusals_in_runner_log(client: httpx.Client, rid: str) -> list[str]:
    entries = client.get(f"/runtimes/{rid}/log").json()
    return [e["message"] for e in entries if e.get("event") == "agent-connection-refused"]


def container_log(docker: Any, rid: str) -> str:
    [container] = docker.containers.list(filters={"label": f"envctl.runtime-id={rid}"})
    return str(container.logs().decode(errors="replace"))


def test_a_tcp_runtime_answers_on_its_address_with_the_recorded_credential_and_has_no_socket(
    srv: Server, docker: Any
) -> None:
    with srv.client() as client:
        rid = boot(srv, client, "dialled")
        to = address(srv, rid)
        with AgentChannel(to, timeout=5) as channel:
            assert channel.ping()["op"] == "pong"
        state_dir = srv.data_dir / "runtimes" / rid
        assert not (state_dir / "agent.sock").exists() and not (state_dir / "agent.key").exists()
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any(f"tcp {to.host}:{to.port}" in e["message"] for e in log if e.get("event") == "container-created")
        client.delete(f"/runtimes/{rid}")


def test_connections_without_the_current_credential_are_refused_and_logged(srv: Server, docker: Any) -> None:
    """R40: no credential, another runtime's, an earlier boot's: refused by the agent, in its
    container's log, the runner log of the runtime and the server's log."""
    with srv.client() as client:
        a, b = boot(srv, client, "guarded"), boot(srv, client, "other")
        first_boot = address(srv, a)
        restart(srv, client, a)
        now, theirs = address(srv, a), address(srv, b)
        assert now.boot != first_boot.boot and now.key != first_boot.key and now.pin != first_boot.pin

        # no credential at all: a plain connection that speaks no TLS, and a guessed key
        with socket.create_connection((now.host, now.port), timeout=5) as plain:
            plain.sendall(b'{"id": 1, "op": "ping"}\n')
            plain.settimeout(10)
            try:
                answer = plain.recv(4096)
            except ConnectionResetError:
                answer = b""  # closed on it
            assert b"pong" not in answer
        guessed = forged(now, runtime=a, boot=now.boot, key=b"\0" * 32)
        assert "proof does not match" in guessed
        # another runtime's credential: as what it is, and passed off as this runtime's
        assert f"for runtime '{b}'" in forged(now, runtime=b, boot=theirs.boot, key=theirs.key)
        assert "proof does not match" in forged(now, runtime=a, boot=now.boot, key=theirs.key)
        # the earlier boot's: as what it is, and with this boot's id
        assert "another boot" in forged(now, runtime=a, boot=first_boot.boot, key=first_boot.key)
        assert "proof does not match" in forged(now, runtime=a, boot=now.boot, key=first_boot.key)
        # envctl's own client, given the earlier boot's credential, is refused as well
        with pytest.raises(AgentUnavailableError):
            AgentChannel(AgentAddress(now.host, now.port, a, first_boot.boot, first_boot.key, now.pin), timeout=5)

        agent_log = container_log(docker, a)
        assert agent_log.count("envctl-agent: refused a connection") >= 7, agent_log
        assert "no TLS handshake" in agent_log and "another boot" in agent_log
        # envctl's next connection to the agent (the next cell's) brings the refusals into the
        # runner log and the server's log
        time.sleep(2.5)  # the cell worker of the restart's boot let its connection go
        cell(client, a, "1+1")
        deadline = time.monotonic() + 10
        while len(refusals_in_runner_log(client, a)) < 7 and time.monotonic() < deadline:
            time.sleep(0.2)
        messages = refusals_in_runner_log(client, a)
        assert len(messages) >= 7, messages
        assert any("another boot" in m for m in messages) and any(f"runtime '{b}'" in m for m in messages)
        assert "refused a connection" in srv.output()
        # the runtime, and the other one, work on as before
        assert cell(client, a, "2+2")["outputs"][0]["data"]["text/plain"] == "4"
        assert cell(client, b, "3+3")["outputs"][0]["data"]["text/plain"] == "6"
        for rid in (a, b):
            client.delete(f"/runtimes/{rid}")


def test_envctl_refuses_an_agent_that_cannot_prove_the_credential(srv: Server) -> None:
    """An address now another runtime's answers envctl: its certificate is not the pinned one,
    so envctl refuses it, and says so in the runner log."""
    with srv.client() as client:
        a, b = boot(srv, client, "pinned"), boot(srv, client, "impostor")
        mine, other = address(srv, a), address(srv, b)
        logged: list[tuple[str, str]] = []
        wrong = AgentAddress(
            other.host, other.port, a, mine.boot, mine.key, mine.pin, lambda r, m, d: logged.append((r, m))
        )
        with pytest.raises(AgentUnavailableError, match="certificate is not this boot's"):
            AgentChannel(wrong, timeout=5)
        assert logged and logged[0][0] == a and "envctl refused the agent" in logged[0][1]
        for rid in (a, b):
            client.delete(f"/runtimes/{rid}")


def test_the_credential_is_in_no_container_field_label_variable_command_image_or_log(srv: Server, docker: Any) -> None:
    """R40: search for the key (hex, base64), the TLS private key and the sealed key in all a
    person or a save could see of the runtime."""
    with srv.client() as client:
        rid = boot(srv, client, "quiet")
        to = address(srv, rid)
        sealed = recorded(srv, rid)["agent"]["key"]
        ex = cell(
            client,
            rid,
            "import os\nprint(os.path.exists('/run/envctl/agent.key'), sorted(os.listdir('/run/envctl')),"
            " [k for k in os.environ if k.startswith('ENVCTL')])",
        )
        assert ex["outputs"][0]["text"].startswith("False ") and "agent.key" not in ex["outputs"][0]["text"]
        [container] = docker.containers.list(filters={"label": f"envctl.runtime-id={rid}"})
        inspected = json.dumps(docker.api.inspect_container(container.id))
        image = json.dumps(docker.api.inspect_image(container.attrs["Image"]))
        logs = container.logs().decode(errors="replace")
        runner_log = json.dumps(client.get(f"/runtimes/{rid}/log").json())
        api_view = json.dumps(client.get(f"/runtimes/{rid}").json())
        top = subprocess.run(["docker", "top", container.id, "-eo", "args"], capture_output=True, text=True).stdout
        where = {
            "inspect": inspected,
            "image": image,
            "logs": logs,
            "runner log": runner_log,
            "api": api_view,
            "processes": top,
            "server log": srv.output(),
        }
        needles = {
            "key hex": to.key.hex(),
            "key base64": base64.b64encode(to.key).decode(),
            "sealed key": sealed,
            "boot": to.boot,
        }
        for name, text in where.items():
            for what, needle in needles.items():
                if what == "boot" and name in ("runner log", "api"):
                    continue  # the boot id is no secret; only the key proves anything
                assert needle not in text, f"{what} found in {name}"
        assert "--credential" in inspected and "/run/envctl/agent.key" in inspected  # a path, never the value
        assert "PRIVATE KEY" not in inspected + image + logs + top
        client.delete(f"/runtimes/{rid}")


def test_from_a_cell_another_runtimes_agent_and_the_api_refuse(srv: Server, docker: Any) -> None:
    """R4 on the tcp channel: the fence is unchanged (envctl dials in; no runtime needs a route
    to envctl), so a cell reaches neither another runtime's agent port nor envctl's API."""
    with srv.client() as client:
        a, b = boot(srv, client, "prober"), boot(srv, client, "target")
        other = address(srv, b)
        [container] = docker.containers.list(filters={"label": f"envctl.runtime-id={a}"})
        [net] = container.attrs["NetworkSettings"]["Networks"].values()
        seen = _probe(
            client,
            a,
            [("other agent", other.host, other.port), ("api via gateway", net["Gateway"], srv.port)],
        )
        assert set(seen.values()) == {"ConnectionRefusedError"}, seen
        for rid in (a, b):
            client.delete(f"/runtimes/{rid}")


def test_tls_is_required_and_pinned(srv: Server) -> None:
    """The agent speaks TLS 1.3 only; its certificate is the one pinned for this boot."""
    with srv.client() as client:
        rid = boot(srv, client, "tls")
        to = address(srv, rid)
        raw = socket.create_connection((to.host, to.port), timeout=5)
        with handshake.client_context().wrap_socket(raw) as conn:
            assert conn.version() == "TLSv1.3"
            assert handshake.fingerprint(conn.getpeercert(binary_form=True) or b"") == to.pin
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError), old.wrap_socket(socket.create_connection((to.host, to.port), timeout=5)):
            pass
        client.delete(f"/runtimes/{rid}")


def test_another_process_of_the_installation_reaches_the_agent_from_the_row_alone(srv: Server) -> None:
    """Any server of the installation (the same database and secrets key) reaches the agent from
    the row alone: nothing of it lives only in the memory of the server that booted it."""
    with srv.client() as client:
        rid = boot(srv, client, "shared")
        cell(client, rid, "shared = 'from the first'")
        with AgentChannel(address(srv, rid), timeout=5) as channel:
            events = list(channel.stream("execute", execution_id="ex_second_server", code="shared", language="python"))
        [result] = [e["output"] for e in events if e.get("event") == "output"]
        assert result["data"]["text/plain"] == "'from the first'"
        client.delete(f"/runtimes/{rid}")
