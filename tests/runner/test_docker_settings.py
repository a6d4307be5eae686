"""Runtime settings and hardening on the real Docker engine, through a real `envctl serve`.

One server for the module (its runtimes use a small machine type so that the memory and pids
tests stay cheap): environment variables reach cells byte for byte (issue 9 item 1), a fork
bomb meets the pids limit (R2), memory exhaustion is an ``oom`` error that keeps a draft (R3).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

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
    server = start_server(docker, root / "data", ENVCTL_CONFIG=str(config))
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
