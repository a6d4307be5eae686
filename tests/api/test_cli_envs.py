"""`envctl save`, `import`, `runtime reset|changes` and `env show|lineage|rm|build|export|load`
against a real HTTP server on the fake backend.

The fake backend commits to fake image ids (saves work), reports as changed what a test sets
with ``FakeBackend.set_changes``, and runs cells on the host: build steps here are harmless
``run: echo`` cells only. Export and load need Docker, so only their bad-input paths run here.
"""

# The server fixtures are imported by name and requested as parameters of the same name.
# ruff: noqa: F401, F811

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from api.cli import lineage_lines
from runner.backends.base import Change
from runner.backends.fake import FakeBackend
from tests.api.cli_exec_fixtures import Server, _isolated_client_config, api_get, run, server

Capsys = pytest.CaptureFixture[str]


def _running(server: Server, capsys: Capsys, name: str = "demo", env: str = "python3") -> dict[str, Any]:
    code, out, err = run(capsys, "runtime", "create", name, "--env", env, "--start", "--json", *server.args())
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    assert data["state"] == "running"
    return data


def _backend(server: Server) -> FakeBackend:
    backend = server.runner.backend
    assert isinstance(backend, FakeBackend)
    return backend


def _save(server: Server, capsys: Capsys, runtime: str, env: str, *extra: str) -> str:
    code, out, err = run(capsys, "save", runtime, "--as", env, *extra, *server.args())
    assert code == 0, err
    assert out.startswith("saved as "), out
    return out.split()[2]


def _stop(server: Server, capsys: Capsys, runtime: str) -> None:
    code, _, err = run(capsys, "runtime", "stop", runtime, *server.args())
    assert code == 0, err


# ---------------------------------------------------------------------------- save


def test_save_a_running_runtime_then_ls_and_show_list_the_version(server: Server, capsys: Capsys) -> None:
    rt = _running(server, capsys)
    _backend(server).set_changes(rt["id"], [Change("added", "/root/notes.txt")])
    code, out, err = run(
        capsys, "save", "demo", "--as", "acme/ml", "-m", "added plotting", "--tag", "stable", *server.args()
    )
    assert code == 0, err
    assert out.startswith("saved as acme/ml@1 (digest sha256:"), out
    assert "tagged stable" in out
    # the phase was shown while it ran (stderr is no terminal here: one line per change)
    assert "committing" in err or "recording" in err or "queued" in err, err

    code, out, err = run(capsys, "env", "ls", *server.args())
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("acme/ml "))
    assert "acme/ml@1" in row and "python3@1" in row and "stable" in row
    assert row.split()[1] == "admin"  # who saved it first owns it

    code, out, err = run(capsys, "env", "show", "acme/ml", *server.args())
    assert code == 0, err
    assert out.splitlines()[:2] == ["acme/ml  (team acme)", "owner: admin"]
    assert "latest -> acme/ml@1" in out and "stable -> acme/ml@1" in out
    header = next(line for line in out.splitlines() if line.startswith("VERSION"))
    assert header.split()[:4] == ["VERSION", "TAGS", "PARENT", "SIZE"]
    row = next(line for line in out.splitlines() if line.startswith("acme/ml@1"))
    assert "latest, stable" in row and "python3@1" in row and "added plotting" in row and "admin" in row

    code, out, err = run(capsys, "env", "show", "acme/ml@1", "--json", *server.args())
    assert code == 0, err
    env = json.loads(out)
    assert env["name"] == "acme/ml" and [v["ref"] for v in env["versions"]] == ["acme/ml@1"]
    assert env["versions"][0]["parent"] == "python3@1" and env["versions"][0]["message"] == "added plotting"

    code, out, err = run(capsys, "env", "show", "nosuch", *server.args())
    assert code == 1 and "nosuch" in err and out == ""


def test_saving_twice_makes_version_2_and_json_gives_the_operation(server: Server, capsys: Capsys) -> None:
    _running(server, capsys)
    assert _save(server, capsys, "demo", "twice") == "twice@1"
    code, out, err = run(capsys, "save", "demo", "--as", "twice", "-m", "again", "--json", *server.args())
    assert code == 0, err
    op = json.loads(out)
    assert op["kind"] == "save" and op["status"] == "succeeded"
    assert op["result"]["version"] == "twice@2" and op["result"]["digest"].startswith("sha256:")
    versions = api_get(server, "/environments/twice")["versions"]
    assert [v["ref"] for v in versions] == ["twice@1", "twice@2"]


def test_save_refuses_bad_input_with_2_and_a_stopped_runtime_with_1(server: Server, capsys: Capsys) -> None:
    code, _, err = run(capsys, "runtime", "create", "idle", "--env", "python3", *server.args())
    assert code == 0, err
    code, out, err = run(capsys, "save", "idle", "--as", "Bad Name!", *server.args())
    assert code == 2 and out == "", err
    assert "environment" in err
    code, out, err = run(capsys, "save", "idle", "--as", "fine", *server.args())
    assert code == 1 and out == ""
    assert "only a running runtime can be saved" in err and "HTTP 409" in err
    with pytest.raises(SystemExit) as exited:  # --as is required: argparse exits 2
        run(capsys, "save", "idle", *server.args())
    assert exited.value.code == 2 and "--as" in capsys.readouterr().err


# ---------------------------------------------------------------------------- import and lineage


def test_import_pins_a_stopped_runtime_and_lineage_draws_the_chain(server: Server, capsys: Capsys) -> None:
    _running(server, capsys)
    assert _save(server, capsys, "demo", "acme/ml", "-m", "first save") == "acme/ml@1"

    # Saving moved the runtime onto what it saved.
    assert api_get(server, "/runtimes")[0]["environment"] == "acme/ml@1"

    # Running: the server's 409 says to stop it first; nothing changes.
    code, out, err = run(capsys, "import", "python3@1", "--runtime", "demo", *server.args())
    assert code == 1 and out == ""
    assert "can only change while the runtime is stopped" in err and "envctl runtime stop demo" in err
    assert api_get(server, "/runtimes")[0]["environment"] == "acme/ml@1"

    _stop(server, capsys, "demo")
    code, out, err = run(capsys, "import", "python3", "--runtime", "demo", *server.args())
    assert code == 0, err
    assert out == "demo now uses python3@1 (asked for python3:latest)\n"
    assert "was acme/ml@1" in err
    code, out, err = run(capsys, "import", "acme/ml", "--runtime", "demo", *server.args())
    assert code == 0, err
    assert out == "demo now uses acme/ml@1 (asked for acme/ml:latest)\n"

    code, out, err = run(capsys, "runtime", "start", "demo", *server.args())
    assert code == 0, err
    assert _save(server, capsys, "demo", "acme/ml", "-m", "second save") == "acme/ml@2"

    code, out, err = run(capsys, "env", "lineage", "acme/ml@2", *server.args())
    assert code == 0, err
    lines = out.splitlines()
    assert [re.match(r"\s*(└─ )?\S+", line).group(0) for line in lines] == [  # type: ignore[union-attr]
        "acme/ml@2",
        "└─ acme/ml@1",
        "   └─ python3@1",
        "      └─ bash@1",
    ]
    assert '"second save"' in lines[0] and "admin" in lines[0] and " +" in lines[0]
    assert '"first save"' in lines[1]
    assert '"base image bash"' in lines[3] and "+95.4 MiB" in lines[3]

    code, out, err = run(capsys, "env", "lineage", "acme/ml@2", "--json", *server.args())
    assert code == 0, err
    chain = json.loads(out)
    assert [s["ref"] for s in chain] == ["acme/ml@2", "acme/ml@1", "python3@1", "bash@1"]
    assert chain == api_get(server, "/environments/acme/ml@2/lineage")

    # json --runtime
    _stop(server, capsys, "demo")
    code, out, err = run(capsys, "import", "acme/ml@2", "--runtime", "demo", "--json", *server.args())
    assert code == 0, err
    data = json.loads(out)
    assert data["environment"] == "acme/ml@2" and data["environment_ref"] == "acme/ml@2"


def test_import_of_a_version_that_does_not_exist_fails_and_a_bad_ref_is_bad_input(
    server: Server, capsys: Capsys
) -> None:
    code, _, err = run(capsys, "runtime", "create", "demo", "--env", "python3", *server.args())
    assert code == 0, err
    code, out, err = run(capsys, "import", "python3@9", "--runtime", "demo", *server.args())
    assert code == 1 and out == "" and "python3@9" in err
    code, out, err = run(capsys, "import", "NOT A REF", "--runtime", "demo", *server.args())
    assert code == 2 and out == "" and "environment" in err
    code, out, err = run(capsys, "import", "python3", "--runtime", "nosuch", *server.args())
    assert code == 1 and "no runtime named" in err


def test_rm_refuses_a_version_another_depends_on_naming_it(server: Server, capsys: Capsys) -> None:
    _running(server, capsys)
    _save(server, capsys, "demo", "base-line")
    _stop(server, capsys, "demo")
    code, _, err = run(capsys, "import", "base-line@1", "--runtime", "demo", *server.args())
    assert code == 0, err
    code, _, err = run(capsys, "runtime", "start", "demo", *server.args())
    assert code == 0, err
    _save(server, capsys, "demo", "base-line")
    code, _, err = run(capsys, "runtime", "rm", "demo", *server.args())
    assert code == 0, err

    code, out, err = run(capsys, "env", "rm", "base-line@1", *server.args())
    assert code == 1 and out == ""
    assert "base-line@1 cannot be deleted" in err and "base-line@2" in err
    code, out, err = run(capsys, "env", "rm", "base-line", *server.args())  # not one version
    assert code == 2 and "name@N" in err

    code, out, err = run(capsys, "env", "rm", "base-line@2", *server.args())
    assert (code, out) == (0, "deleted base-line@2\n"), err
    code, out, err = run(capsys, "env", "rm", "base-line@1", "--json", *server.args())
    assert code == 0, err
    assert json.loads(out) == {"deleted": "base-line@1"}
    # the last version took the environment with it
    code, out, err = run(capsys, "env", "show", "base-line", *server.args())
    assert code == 1 and "no environment named 'base-line'" in err


def test_lineage_lines_fall_back_to_ascii_where_stdout_cannot_draw_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    class Ascii:
        encoding = "ascii"

    chain = [
        {"ref": "a@2", "message": "two\nmore", "author": "x", "created_at": "2026-11-21T12:00:00Z", "size_added": 0},
        {"ref": "a@1", "message": "", "author": "", "created_at": "2026-11-20T12:00:00Z", "size_added": 2048},
    ]
    monkeypatch.setattr("sys.stdout", Ascii())
    assert lineage_lines(chain) == [
        'a@2  "two"  x  2026-11-21 12:00  +0 B',
        "`- a@1  2026-11-20 12:00  +2.0 KiB",
    ]


# ---------------------------------------------------------------------------- changes and reset


def test_changes_lists_what_set_changes_set_and_reset_runs_again(
    server: Server, capsys: Capsys, tmp_path: Path
) -> None:
    rt = _running(server, capsys)
    code, out, err = run(capsys, "runtime", "changes", "demo", *server.args())
    assert (code, out) == (0, "(none)\n"), err

    # The fake's agent runs on the host: a file of the host stands in for one written in a cell.
    written = tmp_path / "data.bin"
    written.write_bytes(b"x" * 3 * 1024 * 1024)
    _backend(server).set_changes(
        rt["id"], [Change("added", str(written)), Change("deleted", "/etc/motd"), Change("changed", "/etc")]
    )
    code, out, err = run(capsys, "runtime", "changes", "demo", *server.args())
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "PATH", "SIZE"]
    rows = {line.split()[1]: line.split(None, 2) for line in lines[1:]}
    assert rows[str(written)] == ["added", str(written), "3.0 MiB"]
    assert rows["/etc/motd"] == ["deleted", "/etc/motd", "-"]
    assert rows["/etc"] == ["changed", "/etc", "-"]  # a folder has no size

    code, out, err = run(capsys, "runtime", "changes", "demo", "--json", *server.args())
    assert code == 0, err
    assert sorted((c["kind"], c["path"], c["size"]) for c in json.loads(out)) == sorted(
        [("added", str(written), 3 * 1024 * 1024), ("deleted", "/etc/motd", None), ("changed", "/etc", None)]
    )

    code, out, err = run(capsys, "runtime", "reset", "demo", *server.args())
    assert code == 0, err
    assert "running" in out and "reset" in err
    assert api_get(server, f"/runtimes/{rt['id']}")["state"] == "running"
    code, out, err = run(capsys, "runtime", "changes", "demo", *server.args())  # a fresh container
    assert (code, out) == (0, "(none)\n"), err

    code, out, err = run(capsys, "runtime", "reset", "demo", "--json", *server.args())
    assert code == 0, err
    assert json.loads(out)["state"] == "running"


def test_reset_of_a_stopped_runtime_boots_it(server: Server, capsys: Capsys) -> None:
    code, _, err = run(capsys, "runtime", "create", "demo", "--env", "python3", *server.args())
    assert code == 0, err
    code, out, err = run(capsys, "runtime", "reset", "demo", *server.args())
    assert code == 0, err
    assert "running (agent-answered)" in out
    assert "booting" in err and "pinned to" not in err  # only what happened since the reset is shown


# ---------------------------------------------------------------------------- build

GOOD_SPEC = """\
name: acme/tools
extends: python3@1
message: team tools
steps:
  - run: echo hi
  - env: {ACME_MODE: fast}
  - run: |
      echo second-step
      echo to-stderr >&2
"""


def test_build_shows_each_step_and_its_output_then_reuses(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    spec = tmp_path / "tools.yaml"
    spec.write_text(GOOD_SPEC)
    code, out, err = run(capsys, "env", "build", str(spec), *server.args())
    assert code == 0, err
    # A step's stderr goes to stderr while its execution exists; a step the CLI reaches only
    # after the build ended (and its runtime went) comes from the operation's joined log.
    lines = [line for line in out.splitlines() if line != "to-stderr"]
    assert lines == [
        "[1/3] run (line 5)",
        "hi",
        "[2/3] env (line 6)",
        "[3/3] run (line 7)",
        "second-step",
        lines[-1],
    ]
    assert lines[-1].startswith("built acme/tools@1 (digest sha256:")
    assert (out + err).count("to-stderr") == 1
    version = api_get(server, "/environments/acme/tools")["versions"][0]
    assert version["parent"] == "python3@1" and version["message"] == "team tools"

    code, out, err = run(capsys, "env", "build", str(spec), *server.args())
    assert code == 0, err
    assert out == "reused acme/tools@1 (same spec on the same parent)\n"

    code, out, err = run(capsys, "env", "build", str(spec), "--json", *server.args())
    assert code == 0, err
    op = json.loads(out)
    assert op["kind"] == "build" and op["status"] == "succeeded"
    assert op["result"]["cached"] is True and op["result"]["version"] == "acme/tools@1"


def test_build_json_gives_the_steps_with_their_logs(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    spec = tmp_path / "quiet.yaml"
    spec.write_text("name: quiet\nextends: bash@1\nsteps:\n  - run: echo quietly\n")
    code, out, err = run(capsys, "env", "build", str(spec), "--json", *server.args())
    assert code == 0, err
    op = json.loads(out)
    assert op["status"] == "succeeded" and op["result"]["version"] == "quiet@1" and op["result"]["cached"] is False
    (step,) = op["result"]["steps"]
    assert step["kind"] == "run" and step["line"] == 4 and step["status"] == "ok" and step["log"] == "quietly\n"
    # the build's runtime is gone by the time the build is seen to end: nothing pins the version
    assert [r["name"] for r in api_get(server, "/runtimes") if r["name"].startswith("build-")] == []


def test_a_failing_step_fails_the_build_with_1_naming_file_and_line(
    server: Server, capsys: Capsys, tmp_path: Path
) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: broken\nextends: bash@1\nsteps:\n  - run: |\n      echo before\n      false\n")
    code, out, err = run(capsys, "env", "build", str(spec), *server.args())
    assert code == 1
    assert out.splitlines()[:2] == ["[1/1] run (line 4)", "before"]
    assert "broken.yaml:4: steps[1].run: the step failed" in err
    assert all(e["name"] != "broken" for e in api_get(server, "/environments"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nextends: python3\nsteps:\n  - run: echo hi\n  - bogus: 1\n", "bad.yaml:5: steps[2]: must have"),
        ("name: x\nextends: python3\nsteps: []\n", "bad.yaml:3: steps: must be a non-empty list"),
        ("name: x\nextends: python3\ncolour: red\nsteps:\n  - run: echo\n", "bad.yaml:3: colour: unknown field"),
        ("name: x\nextends: python3\nsteps:\n  - apt: ['rm -rf /']\n", "bad.yaml:4: steps[1].apt: 'rm -rf /'"),
    ],
)
def test_a_bad_spec_exits_2_with_file_line_field_problem(
    server: Server, capsys: Capsys, tmp_path: Path, text: str, message: str
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    code, out, err = run(capsys, "env", "build", str(spec), *server.args())
    assert code == 2 and out == ""
    assert err.startswith(message), err  # as the server said it: no prefix, so editors can jump to it


def test_build_of_an_unreadable_file_or_a_missing_parent_is_bad_input(
    server: Server, capsys: Capsys, tmp_path: Path
) -> None:
    code, out, err = run(capsys, "env", "build", str(tmp_path / "nope.yaml"), *server.args())
    assert code == 2 and out == "" and "nope.yaml: no such file" in err
    code, out, err = run(capsys, "env", "build", str(tmp_path), *server.args())
    assert code == 2 and "cannot read it" in err
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00name")
    code, out, err = run(capsys, "env", "build", str(binary), *server.args())
    assert code == 2 and "not UTF-8 text" in err
    spec = tmp_path / "orphan.yaml"
    spec.write_text("name: orphan\nextends: nosuch@1\nsteps:\n  - run: echo\n")
    code, out, err = run(capsys, "env", "build", str(spec), *server.args())
    assert code == 2 and out == "" and "nosuch" in err


# ---------------------------------------------------------------------------- export and load (bad input only)


def test_export_to_a_missing_folder_is_bad_input(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    here = tmp_path / "out"
    here.mkdir()
    code, out, err = run(capsys, "env", "export", "python3@1", "-o", str(here / "no" / "x.tar"), *server.args())
    assert code == 2 and out == "" and "does not exist" in err
    code, out, err = run(capsys, "env", "export", "python3@1", "-o", str(here), *server.args())
    assert code == 2 and "is a folder" in err
    assert list(here.iterdir()) == []


def test_export_of_a_version_that_does_not_exist_fails_and_leaves_no_file(
    server: Server, capsys: Capsys, tmp_path: Path
) -> None:
    here = tmp_path / "out"
    here.mkdir()
    code, out, err = run(capsys, "env", "export", "python3@7", "-o", str(here / "x.tar"), *server.args())
    assert code == 1 and out == "" and "python3@7" in err
    assert list(here.iterdir()) == []


def test_load_of_a_missing_file_or_a_non_archive_is_bad_input(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "env", "load", str(tmp_path / "missing.tar"), *server.args())
    assert code == 2 and out == "" and "missing.tar: no such file" in err
    code, out, err = run(capsys, "env", "load", str(tmp_path), *server.args())
    assert code == 2 and "is a folder" in err

    junk = tmp_path / "junk.tar"
    junk.write_text("this is not a tar file\n" * 100)
    code, out, err = run(capsys, "env", "load", str(junk), *server.args())
    assert code == 2 and out == ""
    assert "archive: not a readable tar file" in err and "HTTP 422" in err
    code, out, err = run(capsys, "env", "load", str(junk), "--json", *server.args())
    assert code == 2 and out == ""
