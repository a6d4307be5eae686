"""The CLI as a separate process, its output piped as scripts pipe it or shown on a terminal.

The server is the one of ``test_cli.py`` (uvicorn in a thread, the app on the fake backend);
the CLI runs as ``python -m api.cli``, so what is checked is what a shell sees: the exit
status, and the bytes on stdout and stderr.
"""

# The server fixtures are imported by name and requested as parameters of the same name.
# ruff: noqa: F401, F811

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.backends.base import Change
from runner.backends.fake import FakeBackend
from tests.api.cli_exec_fixtures import Server, _isolated_client_config, api_get, server

ROOT = Path(__file__).resolve().parents[2]
ESC = "\x1b"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _envctl(server: Server, *argv: str) -> list[str]:
    return [sys.executable, "-m", "api.cli", *argv, "--url", server.url, "--token", server.token]


def _piped(server: Server, *argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI with stdout and stderr pipes, as in ``envctl ... > out 2> err``."""
    return subprocess.run(_envctl(server, *argv), capture_output=True, text=True, env=_env(), timeout=120)


def _into_head(server: Server, *argv: str) -> tuple[int, str, str]:
    """``envctl ... | head -n 1``: the CLI's exit status, head's output, the CLI's stderr."""
    cli = subprocess.Popen(_envctl(server, *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    assert cli.stdout is not None and cli.stderr is not None
    head = subprocess.Popen(["head", "-n", "1"], stdin=cli.stdout, stdout=subprocess.PIPE)
    cli.stdout.close()  # head alone reads it now: when head exits, the CLI's writes fail
    first, _ = head.communicate(timeout=120)
    err = cli.stderr.read().decode()
    return cli.wait(timeout=120), first.decode(), err


def _on_a_terminal(server: Server, *argv: str) -> tuple[int, str]:
    """The CLI with a pseudo-terminal as stdout and stderr: its exit status and what the
    terminal received (line ends as the program wrote them)."""
    leader, follower = pty.openpty()
    env = _env(TERM="xterm-256color", COLUMNS="160", LINES="50")
    proc = subprocess.Popen(_envctl(server, *argv), stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's last writer closed it
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def _running(server: Server, name: str = "demo") -> dict[str, object]:
    done = _piped(server, "runtime", "create", name, "--env", "python3", "--start", "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    assert data["state"] == "running"
    return data


def _no_traceback(err: str) -> None:
    for sign in ("Traceback", "BrokenPipeError", "Exception ignored"):
        assert sign not in err, err


# ---------------------------------------------------------------------------- broken pipes


def test_runtime_changes_into_head_ends_quietly_with_the_status_of_a_sigpipe(server: Server) -> None:
    rt = _running(server)
    backend = server.runner.backend
    assert isinstance(backend, FakeBackend)
    # Far more than a pipe holds (64 KiB): the CLI is still writing when head exits.
    backend.set_changes(
        str(rt["id"]), [Change("deleted", f"/usr/share/doc/package-{i}/copyright") for i in range(20000)]
    )

    status, first, err = _into_head(server, "runtime", "changes", "demo")
    assert first.split() == ["KIND", "PATH", "SIZE"]
    assert status == 141, err  # as `seq 100000 | head -n 1` shows it: 128 + SIGPIPE
    _no_traceback(err)
    assert err == ""


def test_a_cell_streaming_into_head_ends_quietly_with_the_status_of_a_sigpipe(server: Server) -> None:
    _running(server)
    status, first, err = _into_head(
        server, "exec", "demo", "import sys\nfor i in range(300000):\n    print(i)\n    sys.stdout.flush()"
    )
    assert first == "0\n"
    assert status == 141, err
    _no_traceback(err)


# ---------------------------------------------------------------------------- --json


def test_json_is_one_document_on_stdout_in_a_pipe_with_nothing_else(server: Server) -> None:
    created = _piped(server, "runtime", "create", "demo", "--env", "python3", "--start", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["state"] == "running"
    assert created.stderr == ""  # no progress with --json

    for argv in (
        ["runtime", "ls"],
        ["runtime", "show", "demo"],
        ["runtime", "log", "demo"],
        ["env", "ls"],
        ["machine-types"],
        ["exec", "demo", "print('hi')"],
    ):
        done = _piped(server, *argv, "--json")
        assert done.returncode == 0, (argv, done.stderr)
        json.loads(done.stdout)  # the whole of stdout is one JSON document
        assert ESC not in done.stdout + done.stderr, argv


def test_json_stays_plain_json_on_a_terminal(server: Server) -> None:
    _running(server)
    for argv in (["runtime", "ls"], ["runtime", "show", "demo"], ["exec", "demo", "6 * 7"]):
        status, shown = _on_a_terminal(server, *argv, "--json")
        assert status == 0, shown
        assert ESC not in shown, argv
        json.loads(shown)


# ---------------------------------------------------------------------------- progress and tables


def test_progress_and_tables_in_a_pipe_carry_no_escape_codes(server: Server, tmp_path: Path) -> None:
    done = _piped(server, "runtime", "create", "demo", "--env", "python3")
    assert done.returncode == 0, done.stderr

    started = _piped(server, "runtime", "start", "demo")
    assert started.returncode == 0, started.stderr
    assert "booting" in started.stderr and "running (agent-answered)" in started.stdout

    cell = _piped(server, "exec", "demo", "print('after the boot')")
    assert cell.returncode == 0, cell.stderr
    assert cell.stdout == "after the boot\n"

    rt = api_get(server, "/runtimes")[0]
    results_dir = server.runner.state_dir(rt["id"]) / "results"
    wrote = _piped(server, "exec", "demo", f"open({str(results_dir / 'r.bin')!r}, 'wb').write(b'x' * 3_000_000)")
    assert wrote.returncode == 0, wrote.stderr
    (result,) = api_get(server, f"/runtimes/{rt['id']}/results")
    got = _piped(server, "results", "get", str(result["id"]), "-o", str(tmp_path / "r.bin"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "r.bin").read_bytes() == b"x" * 3_000_000

    listed = _piped(server, "runtime", "ls")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert all(line == line.rstrip() for line in listed.stdout.splitlines())

    for run in (started, cell, wrote, got, listed):
        assert ESC not in run.stdout + run.stderr, run.args
        assert "\r" not in run.stdout + run.stderr, run.args  # no line drawn over in place


def test_on_a_terminal_tables_and_progress_are_drawn(server: Server) -> None:
    done = _piped(server, "runtime", "create", "demo", "--env", "python3")
    assert done.returncode == 0, done.stderr
    status, shown = _on_a_terminal(server, "runtime", "start", "demo")
    assert status == 0, shown
    assert ESC in shown  # drawn by rich: styles, and the live line taken away at the end
    assert "agent-answered" in shown
    status, shown = _on_a_terminal(server, "runtime", "ls")
    assert status == 0, shown
    assert "demo" in shown and "running" in shown
