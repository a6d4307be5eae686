"""Runtime settings and hardening on the real Docker engine, through a real `envctl serve`.

One server for the module (its runtimes use a small machine type so that the memory and pids
tests stay cheap): environment variables reach cells byte for byte (issue 9 item 1), a fork
bomb meets the pids limit (R2), memory exhaustion is an ``oom`` error that keeps a draft (R3).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.conftest import remove_runner_containers, start_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CONFIG = """
machine_types:
  small: {cpus: 1, memory: 2g, pids: 512}
  tiny: {cpus: 1, memory: 192m, pids: 64, description: "for the hardening tests"}
"""


@pytest.fixture(scope="module")
def srv(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "python3")
    root = tmp_path_factory.mktemp("settings")
    config = root / "envctl.yaml"
    config.write_text(CONFIG)
    # on every address, so that only the fence keeps cells away from the API (R4)
    server = start_server(docker, root / "data", ENVCTL_CONFIG=str(config), ENVCTL_API_HOST="0.0.0.0")
    yield server
    remove_runner_containers(docker, server)


def boot(srv: Server, client: httpx.Client, name: str, **body: Any) -> dict[str, Any]:
    r = client.post("/runtimes", json={"environment": "python3", "name": name, **body})
    assert r.status_code == 201, r.text
    assert client.post(f"/runtimes/{r.json()['id']}/start").status_code == 202
    rt = srv.wait_state(client, r.json()["id"], {"running", "error"})
    assert rt["state"] == "running", rt
    return rt


def cell(client: httpx.Client, rid: str, code: str, language: str = "python", wait: float = 30) -> dict[str, Any]:
    ex: dict[str, Any] = client.post(
        f"/runtimes/{rid}/executions", params={"wait": wait}, json={"code": code, "language": language}
    ).json()
    return ex


def stdout(ex: dict[str, Any]) -> str:
    return "".join(o.get("text", "") for o in ex["outputs"] if o["output_type"] == "stream" and o["name"] == "stdout")


TRICKY = {
    "QUOTES": 'it\'s "quoted" and `back` ticked',
    "SUBST": "$(touch /tmp/pwned) ${HOME} $HOME; touch /tmp/pwned2 && echo no",
    "LINES": "first line\nsecond line\r\n\ttabbed\n",
    "UNICODE": "naïve — ☃ 𝄞",
    "EMPTY": "",
    "PATH": "/opt/mine/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
}


def test_a_cell_sees_the_runtimes_variables_byte_for_byte_and_no_shell_ever_read_them(srv: Server) -> None:
    with srv.client() as client:
        rt = boot(srv, client, "env", env=TRICKY)
        names = json.dumps(sorted(TRICKY))
        ex = cell(client, rt["id"], f"import os, json\nprint(json.dumps({{k: os.environ.get(k) for k in {names}}}))")
        assert ex["status"] == "ok", ex
        assert json.loads(stdout(ex)) == TRICKY
        # a bash cell's shell has them in its environment, as they were, and nothing ran
        ex = cell(client, rt["id"], 'printf %s "$LINES$SUBST" | base64 -w0; echo; ls /tmp', language="bash")
        assert ex["status"] == "ok", ex
        encoded, *listing_of_tmp = stdout(ex).split("\n")
        assert base64.b64decode(encoded).decode() == TRICKY["LINES"] + TRICKY["SUBST"]
        assert not any("pwned" in line for line in listing_of_tmp)

        listing = client.get(f"/runtimes/{rt['id']}/env").json()
        by_name = {v["name"]: v for v in listing["variables"]}
        assert by_name["PATH"]["source"] == "set here" and by_name["PATH"]["overrides"] is True
        assert by_name["SUBST"] == {"name": "SUBST", "value": TRICKY["SUBST"], "source": "set here", "overrides": False}
        inherited = [v for v in listing["variables"] if v["source"] == "inherited"]
        assert inherited, listing  # the base image sets some (LANG, ...)
        ex = cell(client, rt["id"], "import os, json\nprint(json.dumps(dict(os.environ)))")
        seen = json.loads(stdout(ex))
        for v in inherited:
            assert seen.get(v["name"]) == v["value"], v


def test_a_fork_bomb_meets_the_pids_limit_while_the_api_and_another_runtime_answer_and_it_can_be_stopped(
    srv: Server, docker: Any
) -> None:
    """R2."""
    with srv.client() as client:
        bomb = boot(srv, client, "bomb", machine_type="tiny", language="bash")
        neighbour = boot(srv, client, "calm", machine_type="tiny")
        # submitted, not waited for: it never ends by itself
        r = client.post(f"/runtimes/{bomb['id']}/executions", json={"code": "b() { b | b & }; b", "timeout": 60})
        assert r.status_code == 202, r.text
        [container] = docker.containers.list(filters={"label": f"envctl.runtime-id={bomb['id']}"})
        peak = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and peak < 64:
            peak = max(peak, int(container.stats(stream=False).get("pids_stats", {}).get("current", 0)))
            time.sleep(0.2)
        assert peak == 64, peak  # it reached the limit, and no further
        # A caller dialling the agent now finds no thread left for it (threads count as pids):
        # it is turned away, and the agent lives on (on Swarm and Kubernetes envctl dials anew).
        [sock] = [p for p in srv.data_dir.rglob("agent.sock") if bomb["id"] in str(p)]
        for _ in range(3):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as caller:
                caller.settimeout(5)
                caller.connect(str(sock))
            time.sleep(0.3)
        container.reload()
        assert container.status == "running", container.logs(tail=20)
        assert b"turned a connection away" in container.logs(stdout=False, stderr=True)
        agent = [p for p in container.top()["Processes"] if "python3 -u -I /opt/envctl/agent" in " ".join(p)]
        assert agent, "the agent is gone"
        began = time.monotonic()
        assert client.get("/health").json()["status"] == "ok"
        ex = cell(client, neighbour["id"], "print(6 * 7)")
        assert ex["status"] == "ok" and stdout(ex) == "42\n", ex
        assert time.monotonic() - began < 10
        assert client.post(f"/runtimes/{bomb['id']}/stop").status_code == 202
        stopped = srv.wait_state(client, bomb["id"], {"stopped", "error"}, timeout=40)
        assert stopped["state"] == "stopped", stopped
        assert docker.containers.list(all=True, filters={"label": f"envctl.runtime-id={bomb['id']}"}) == []
        assert client.get(f"/runtimes/{neighbour['id']}").json()["state"] == "running"
        client.post(f"/runtimes/{neighbour['id']}/stop")


HOG = "x = bytearray(1024**3)\nx[::4096] = b'y' * (1024**3 // 4096)"  # touches every page of 1 GB
AGENT_FIRST = "import os\nopen(f'/proc/{os.getppid()}/oom_score_adj', 'w').write('1000')\n"


def test_a_runtime_past_its_memory_limit_is_an_oom_error_that_keeps_its_unsaved_changes_as_a_draft(
    srv: Server,
) -> None:
    """R3 (R33): the memory killer takes the agent, the runtime is ``error``/``oom``, and the
    files written before are restored at the next boot."""
    with srv.client() as client:
        rt = boot(srv, client, "hog", machine_type="tiny")
        ex = cell(client, rt["id"], "open('/root/unsaved.txt', 'w').write('keep me')")
        assert ex["status"] == "ok", ex
        cell(client, rt["id"], AGENT_FIRST + HOG)
        dead = srv.wait_state(client, rt["id"], {"error"}, timeout=30)
        assert dead["state_reason"] == "oom", dead
        assert dead["unsaved_changes"] is True, dead
        log = client.get(f"/runtimes/{rt['id']}/log").json()
        assert any(e["state"] == "error" and e["details"].get("draft") for e in log), log
        assert client.post(f"/runtimes/{rt['id']}/start").status_code == 202
        assert srv.wait_state(client, rt["id"], {"running", "error"})["state"] == "running"
        ex = cell(client, rt["id"], "print(open('/root/unsaved.txt').read())")
        assert stdout(ex) == "keep me\n", ex
        client.post(f"/runtimes/{rt['id']}/stop")


PROBE = """
import json, socket, sys
out = {}
for name, host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=3).close()
        out[name] = "connected"
    except OSError as exc:
        out[name] = type(exc).__name__
print(json.dumps(out))
"""


def _host_address() -> str:
    """This host's address on its default route (not loopback, not a Docker bridge)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("198.51.100.1", 9))  # no packet is sent: this only picks the route
        address: str = s.getsockname()[0]
        return address


def _probe(client: httpx.Client, rid: str, targets: list[tuple[str, str, int]]) -> dict[str, str]:
    argv = f"[sys.executable, '-c', {PROBE!r}, {json.dumps(targets)!r}]"
    code = f"import subprocess, sys\nprint(subprocess.run({argv}, capture_output=True, text=True).stdout)"
    ex = cell(client, rid, code)
    assert ex["status"] == "ok", ex
    # the probe's answer is its one JSON line; a background process the runtime started earlier
    # may still write to the runtime's output, so other lines are not the probe's
    [line] = [ln for ln in stdout(ex).splitlines() if ln.startswith("{")]
    result: dict[str, str] = json.loads(line)
    return result


def test_from_a_cell_nothing_of_the_host_or_its_networks_is_reachable_but_the_package_registries_are(
    srv: Server, docker: Any
) -> None:
    """R4: the host (envctl's API, and a listener standing for the Docker API, the database and
    the registry), the metadata address, another runtime and another Docker network refuse;
    pypi and the Debian mirror answer. A container on Docker's default bridge reaches the same
    host listener, so it is the fence that stops the cell."""
    with socket.create_server(("0.0.0.0", 0)) as listener:
        port = listener.getsockname()[1]
        listener.listen(16)
        with srv.client() as client:
            a = boot(srv, client, "fenced")
            b = boot(srv, client, "neighbour2")
            [container_b] = docker.containers.list(filters={"label": f"envctl.runtime-id={b['id']}"})
            # the neighbour's server listens before the cell ends (before anything probes it):
            # a refusal then comes from the fence, not from a server still starting
            serve = (
                "import socket, subprocess, sys, time\nsrv = subprocess.Popen([sys.executable, '-m', 'http.server',"
                " '8000'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                "for _ in range(200):\n"
                "    try:\n        socket.create_connection(('127.0.0.1', 8000), timeout=1).close(); break\n"
                "    except OSError:\n        time.sleep(0.05)"
            )
            cell(client, b["id"], serve)
            network = container_b.attrs["NetworkSettings"]["Networks"]
            [(net_name, net)] = network.items()
            assert net_name.startswith("envctl-in_")
            gateway, b_address = net["Gateway"], net["IPAddress"]
            host_address = _host_address()
            targets = [
                ("api via gateway", gateway, srv.port),
                ("host listener via gateway", gateway, port),
                ("host listener via host address", host_address, port),
                ("default bridge gateway", "172.17.0.1", port),
                ("metadata", "169.254.169.254", 80),
                ("other runtime", b_address, 8000),
                ("pypi", "pypi.org", 443),
                ("debian mirror", "deb.debian.org", 80),
            ]
            seen = _probe(client, a["id"], targets)
            refused = {k: v for k, v in seen.items() if k not in ("pypi", "debian mirror")}
            assert set(refused.values()) == {"ConnectionRefusedError"}, seen  # rejected at once, by the fence
            assert seen["pypi"] == seen["debian mirror"] == "connected", seen
            # the neighbour's server is up: only the fence kept the first runtime out
            assert "connected" in _probe(client, b["id"], [("own", "127.0.0.1", 8000)]).values()
            control = docker.containers.run(
                container_b.image.id,
                ["python3", "-c", PROBE, json.dumps([("host", "172.17.0.1", port), ("api", "172.17.0.1", srv.port)])],
                network="bridge",
                labels={TEST_LABEL: TEST_SESSION},
                remove=True,
            )
            assert json.loads(control) == {"host": "connected", "api": "connected"}
