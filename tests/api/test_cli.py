"""The CLI against a real HTTP server (uvicorn in a thread) running the app on the fake backend."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from api.app import create_app
from api.cli import main
from api.settings import Settings
from api.startup import Services
from runner.service import RunnerService


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    token: str
    runner: RunnerService

    def args(self) -> list[str]:
        return ["--url", self.url, "--token", self.token]


@pytest.fixture(autouse=True)
def _isolated_client_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No config file, URL or token of the machine running the tests leaks in."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("ENVCTL_DATA_DIR", str(tmp_path / "no-server-data"))
    monkeypatch.delenv("ENVCTL_URL", raising=False)
    monkeypatch.delenv("ENVCTL_TOKEN", raising=False)
    monkeypatch.delenv("ENVCTL_CONFIG", raising=False)


@pytest.fixture
def server(prepared_settings: Settings) -> Iterator[Server]:
    app = create_app(Services.build(prepared_settings))
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    token = prepared_settings.admin_token_file.read_text().strip()
    try:
        yield Server(f"http://127.0.0.1:{port}", token, app.state.ctx.runner)
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "uvicorn did not shut down"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_runtime_lifecycle(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "runtime", "create", "demo", "--env", "python3", *server.args())
    assert code == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip() and "  " in line)
    assert fields["name"].strip() == "demo"
    assert out.splitlines()[0].startswith("id")
    assert "stopped (created)" in out
    assert "python3@1" in out and "asked for python3:latest" in out
    assert "small" in out

    code, out, err = run(
        capsys,
        "runtime",
        "create",
        "other",
        "--env",
        "bash@1",
        "--lang",
        "bash",
        "--machine-type",
        "medium",
        "--idle-timeout",
        "60",
        "--json",
        *server.args(),
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["name"] == "other"
    assert data["environment"] == "bash@1"
    assert data["language"] == "bash"
    assert data["machine_type"] == "medium"
    assert data["idle_timeout"] == 60
    assert data["state"] == "stopped"

    code, out, err = run(capsys, "runtime", "start", "demo", *server.args())
    assert code == 0, err
    assert "running (agent-answered)" in out
    assert "idle shutdown" in out
    # Progress while it waited. Not necessarily "running": api/cli/runtimes.py follow() reads the log before
    # the state, so the log entry that ends the wait may go unprinted.
    assert "booting" in err

    code, out, err = run(capsys, "runtime", "ls", *server.args())
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "NAME", "STATE", "ENVIRONMENT"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert set(rows) == {"demo", "other"}
    assert rows["demo"][2] == "running"
    assert rows["demo"][3] == "python3@1"
    assert rows["other"][2] == "stopped"

    code, out, err = run(capsys, "runtime", "ls", "--json", *server.args())
    assert code == 0, err
    assert sorted(r["name"] for r in json.loads(out)) == ["demo", "other"]

    code, out, err = run(capsys, "runtime", "show", "demo", *server.args())
    assert code == 0, err
    assert "running" in out
    demo_id = next(line.split()[1] for line in out.splitlines() if line.startswith("id"))
    assert demo_id.startswith("rt_")
    code, out, err = run(capsys, "runtime", "show", demo_id, "--json", *server.args())
    assert code == 0, err
    assert json.loads(out)["name"] == "demo"

    code, out, err = run(capsys, "runtime", "log", "demo", *server.args())
    assert code == 0, err
    whats = [line.split()[2] for line in out.splitlines()[1:]]
    assert out.splitlines()[0].startswith("AT (UTC)")
    assert [w for w in whats if not w.startswith("[")] == ["stopped", "booting", "running"]
    assert "[container-created]" in whats
    assert "agent-answered" in out

    code, out, err = run(capsys, "runtime", "log", "demo", "--json", *server.args())
    assert code == 0, err
    assert [e["state"] for e in json.loads(out) if e["state"]] == ["stopped", "booting", "running"]

    code, out, err = run(capsys, "runtime", "stop", "demo", *server.args())
    assert code == 0, err
    assert "stopped (user-request)" in out
    assert server.runner.get(_admin_id(server), demo_id).state == "stopped"

    code, out, err = run(capsys, "runtime", "rm", "demo", *server.args())
    assert code == 0, err
    assert f"deleted runtime demo ({demo_id})" in out
    code, out, err = run(capsys, "runtime", "rm", "other", "--json", *server.args())
    assert code == 0, err
    assert list(json.loads(out)) == ["deleted"]

    code, out, err = run(capsys, "runtime", "ls", *server.args())
    assert code == 0, err
    assert out.strip() == "(none)"


def _admin_id(server: Server) -> str:
    with server.runner.db.session() as s:
        from sqlalchemy import select

        from registry.models import User

        return str(s.scalar(select(User.id).where(User.is_admin.is_(True))))


def test_create_with_start_waits(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "runtime", "create", "quick", "--env", "python3", "--start", "--json", *server.args())
    assert code == 0, err
    assert json.loads(out)["state"] == "running"
    code, out, err = run(capsys, "runtime", "stop", "quick", "--no-wait", "--json", *server.args())
    assert code == 0, err
    assert json.loads(out)["state"] in ("stopping", "stopped")


def test_env_ls_and_machine_types(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "env", "ls", *server.args())
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ENVIRONMENT", "OWNER", "LATEST", "VERSIONS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["python3"][1] == "(admins)"  # a base image: no owner
    assert rows["python3"][2] == "python3@1"
    assert rows["python3"][4] == "bash@1"  # parent
    assert rows["bash"][2] == "bash@1"
    assert "MiB" in rows["python3"][5] + rows["python3"][6]

    code, out, err = run(capsys, "env", "ls", "--json", *server.args())
    assert code == 0, err
    assert {e["name"]: e["latest"] for e in json.loads(out)} == {"bash": "bash@1", "python3": "python3@1"}

    code, out, err = run(capsys, "machine-types", *server.args())
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"small", "medium", "large", "gpu-small"}
    assert "2.0 GiB" in rows["small"]
    assert rows["gpu-small"].split()[5] == "1"  # NAME CPUS MEMORY(2 words) PIDS GPUS

    code, out, err = run(capsys, "machine-types", "--json", *server.args())
    assert code == 0, err
    assert {m["name"]: m["gpus"] for m in json.loads(out)}["gpu-small"] == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["runtime", "create", "Bad Name", "--env", "python3"],
        ["runtime", "create", "demo", "--env", "x;y"],
        ["runtime", "create", "demo", "--env", "$(id)"],
        ["runtime", "create", "demo", "--env", "python3", "--machine-type", "huge"],
        ["runtime", "create", "demo", "--env", "python3", "--idle-timeout", "-1"],
        ["runtime", "create", "a" * 65, "--env", "python3"],
    ],
)
def test_bad_input_exits_2(server: Server, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv, *server.args())
    assert code == 2, (out, err)
    assert err.startswith("envctl: ")
    assert "HTTP 422" in err
    assert server.runner.list(_admin_id(server)) == []


def test_unknown_runtime_exits_1(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "runtime", "show", "nope", *server.args())
    assert code == 1
    assert "no runtime named" in err and "nope" in err
    code, out, err = run(capsys, "runtime", "start", "rt_doesnotexist", *server.args())
    assert code == 1
    assert "HTTP 404" in err
    code, out, err = run(capsys, "runtime", "create", "demo", "--env", "nope", *server.args())
    assert code == 1
    assert "no environment named 'nope'" in err and "HTTP 404" in err


def test_bad_token_exits_1(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "runtime", "ls", "--url", server.url, "--token", "envctl_wrong")
    assert code == 1
    assert "not known" in err and "HTTP 401" in err


def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    for argv in (["runtime", "ls"], ["env", "ls"], ["runtime", "start", "demo"]):
        code, out, err = run(capsys, *argv, "--url", url, "--token", "envctl_x")
        assert code == 1, (argv, out, err)
        assert "cannot reach envctl" in err
        assert url in err
        assert out == ""


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["runtime"],
        ["runtime", "create"],
        ["runtime", "create", "demo"],  # --env is required
        ["runtime", "create", "demo", "--env", "python3", "--lang", "ruby"],
        ["runtime", "create", "demo", "--env", "python3", "--idle-timeout", "soon"],
        ["runtime", "start"],
        ["env"],
    ],
)
def test_argparse_misuse_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_url_and_token_from_the_environment(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENVCTL_URL", server.url)
    monkeypatch.setenv("ENVCTL_TOKEN", server.token)
    code, out, err = run(capsys, "runtime", "create", "fromenv", "--env", "python3", "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "fromenv"
    code, out, err = run(capsys, "runtime", "ls")
    assert code == 0, err
    assert "fromenv" in out

    # Flags win over the environment.
    monkeypatch.setenv("ENVCTL_TOKEN", "envctl_wrong")
    code, out, err = run(capsys, "runtime", "ls")
    assert code == 1 and "HTTP 401" in err
    code, out, err = run(capsys, "runtime", "ls", "--token", server.token)
    assert code == 0, err
    monkeypatch.setenv("ENVCTL_URL", f"http://127.0.0.1:{_free_port()}")
    code, out, err = run(capsys, "runtime", "ls", "--url", server.url, "--token", server.token)
    assert code == 0, err
    assert "fromenv" in out


def test_config_file_and_token_file(
    server: Server,
    prepared_settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Without flags or variables: the URL from the config file, the token that serve wrote."""
    conf = tmp_path / "config" / "envctl" / "config.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"url: {server.url}\n")
    monkeypatch.setenv("ENVCTL_DATA_DIR", str(prepared_settings.data_dir))
    code, out, err = run(capsys, "machine-types")
    assert code == 0, err
    assert "gpu-small" in out
