"""`envctl run NOTEBOOK.ipynb` against a real HTTP server on the fake backend (cells really run)."""

# The server fixtures are imported by name and requested as parameters of the same name.
# ruff: noqa: F401, F811

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat as _nbformat
import pytest

from tests.api.cli_exec_fixtures import (
    Server,
    _isolated_client_config,
    api_get,
    run,
    server,
)

Capsys = pytest.CaptureFixture[str]
nbformat: Any = _nbformat  # no type hints
v4: Any = nbformat.v4


def _notebook(path: Path, cells: list[Any], environment: str | None = "python3", **metadata: Any) -> Path:
    nb = v4.new_notebook()
    nb.metadata.update(
        {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            **metadata,
        }
    )
    if environment is not None:
        nb.metadata["envctl"] = {"environment": environment}
    nb.cells = cells
    nbformat.validate(nb)
    nbformat.write(nb, str(path))
    return path


def _code(source: str) -> Any:
    return v4.new_code_cell(source)


def _read(path: Path) -> Any:
    return nbformat.read(str(path), as_version=4)


def test_run_writes_outputs_counts_and_the_environment_version(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    src = _notebook(
        tmp_path / "Demo Notebook.ipynb",
        [
            _code("x = 21"),
            v4.new_markdown_cell("# some prose between the cells"),
            _code("print('x is', x)"),
            _code("x * 2"),
            _code("display(HTML('<b>bold</b>'))"),
        ],
    )
    before = src.read_text()
    out = tmp_path / "out.ipynb"
    code, stdout, err = run(capsys, "run", str(src), "-o", str(out), *server.args())
    assert code == 0, err
    assert src.read_text() == before  # -o leaves the input alone

    nb = _read(out)
    nbformat.validate(nb)
    assert nb.metadata["envctl"]["environment"] == "python3@1"
    assert nb.metadata["kernelspec"]["name"] == "python3"  # the rest of the metadata stays
    assign, prose, show, expr, html = nb.cells
    assert prose.cell_type == "markdown" and "outputs" not in prose
    assert [c.execution_count for c in (assign, show, expr, html)] == [1, 2, 3, 4]
    assert assign.outputs == []
    assert show.outputs == [v4.new_output("stream", name="stdout", text="x is 21\n")]
    [result] = expr.outputs
    assert result.output_type == "execute_result"
    assert result.execution_count == 3
    assert result.data["text/plain"] == "42"
    [disp] = html.outputs
    assert disp.output_type == "display_data"
    assert disp.data["text/html"] == "<b>bold</b>"
    assert "text/plain" in disp.data and disp.metadata == {}

    # Progress per cell on stderr, a summary on stdout; the runtime it made is gone.
    assert "Demo Notebook.ipynb: 4 code cells, python, in runtime demo-notebook (python3@1)" in err
    for k in range(1, 5):
        assert f"[{k}/4] ok " in err
    assert "booting runtime demo-notebook" in err
    assert stdout.startswith(f"wrote {out}: 4 of 4 code cells ok, all ok; python3@1; runtime demo-notebook deleted")
    assert api_get(server, "/runtimes") == []


def test_a_failing_cell_stops_the_run_and_keeps_its_error(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    stale = _code("print('after')")
    stale.execution_count = 99
    stale.outputs = [v4.new_output("stream", name="stdout", text="from an earlier run\n")]
    src = _notebook(
        tmp_path / "fails.ipynb",
        [_code("a = 1"), _code("print(a)"), _code("a / 0"), stale, _code("print('never')")],
    )
    code, stdout, err = run(capsys, "run", str(src), *server.args())  # in place
    assert code == 1, err
    nb = _read(src)
    nbformat.validate(nb)
    c1, c2, c3, c4, c5 = nb.cells
    assert [c1.execution_count, c2.execution_count, c3.execution_count] == [1, 2, 3]
    [error] = c3.outputs
    assert error.output_type == "error"
    assert (error.ename, error.evalue) == ("ZeroDivisionError", "division by zero")
    assert any("a / 0" in line for line in error.traceback)
    # Later cells are untouched.
    assert c4.execution_count == 99
    assert c4.outputs == [v4.new_output("stream", name="stdout", text="from an earlier run\n")]
    assert c5.execution_count is None and c5.outputs == []
    assert nb.metadata["envctl"]["environment"] == "python3@1"
    assert "[3/5] error " in err and "ZeroDivisionError: division by zero" in err
    assert "[4/5]" not in err
    assert "code cell 3 failed" in stdout
    assert api_get(server, "/runtimes") == []


def test_allow_errors_runs_every_cell_and_still_exits_1(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    src = _notebook(tmp_path / "nb.ipynb", [_code("1/0"), _code("print('went on')")])
    out = tmp_path / "out.ipynb"
    code, stdout, err = run(capsys, "run", str(src), "-o", str(out), "--allow-errors", "--json", *server.args())
    assert code == 1, err
    summary = json.loads(stdout)
    assert summary["status"] == "error" and summary["failed_cell"] == 1
    assert [c["status"] for c in summary["cells"]] == ["error", "ok"]
    assert [c["index"] for c in summary["cells"]] == [0, 1]
    assert summary["runtime"]["deleted"] is True
    nb = _read(out)
    assert nb.cells[0].outputs[0].output_type == "error"
    assert nb.cells[1].outputs == [v4.new_output("stream", name="stdout", text="went on\n")]


def test_no_environment_exits_2_saying_how_to_give_one(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    src = _notebook(tmp_path / "plain.ipynb", [_code("print(1)")], environment=None)
    before = src.read_text()
    code, stdout, err = run(capsys, "run", str(src), *server.args())
    assert code == 2
    assert "no environment" in err and "--env" in err and "envctl" in err
    assert stdout == ""
    assert src.read_text() == before
    assert api_get(server, "/runtimes") == []

    # --env gives one; it also wins over the notebook's metadata.
    code, stdout, err = run(capsys, "run", str(src), "--env", "python3@1", "--json", *server.args())
    assert code == 0, err
    assert json.loads(stdout)["environment"] == "python3@1"
    assert _read(src).metadata["envctl"]["environment"] == "python3@1"


@pytest.mark.parametrize(
    "content",
    [None, b"not json at all", b'{"cells": "nope"}', b"\xff\xfe\x00garbage"],
    ids=["missing", "text", "wrong-shape", "binary"],
)
def test_an_unreadable_notebook_exits_2(server: Server, capsys: Capsys, tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.ipynb"
    if content is not None:
        path.write_bytes(content)
    code, stdout, err = run(capsys, "run", str(path), "--env", "python3", *server.args())
    assert code == 2, err
    assert err.startswith(f"envctl: {path}")
    assert stdout == ""
    assert api_get(server, "/runtimes") == []
    if content is not None:
        assert path.read_bytes() == content


def test_bad_environment_and_options_exit_2(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    src = _notebook(tmp_path / "nb.ipynb", [_code("print(1)")], environment="not a ref!")
    code, stdout, err = run(capsys, "run", str(src), *server.args())
    assert code == 2 and "HTTP 422" in err
    code, stdout, err = run(capsys, "run", str(src), "--runtime", "x", "--env", "python3", *server.args())
    assert code == 2 and "--runtime" in err
    code, stdout, err = run(capsys, "run", str(src), "-o", str(tmp_path / "no" / "dir.ipynb"), *server.args())
    assert code == 2 and "does not exist" in err
    assert api_get(server, "/runtimes") == []


def test_a_taken_name_gets_a_suffix_and_keep_keeps_the_runtime(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    assert run(capsys, "runtime", "create", "report", "--env", "python3", *server.args())[0] == 0
    src = _notebook(tmp_path / "Report.ipynb", [_code("import sys\nprint(sys.version_info[0])")])
    code, stdout, err = run(capsys, "run", str(src), "--keep", "--json", *server.args())
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["runtime"]["name"] == "report-2"
    assert summary["runtime"]["deleted"] is False
    names = {rt["name"]: rt for rt in api_get(server, "/runtimes")}
    assert set(names) == {"report", "report-2"}
    assert names["report-2"]["state"] == "running"
    assert _read(src).cells[0].outputs[0].text == "3\n"


def test_an_existing_runtime_is_used_and_kept(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    assert run(capsys, "runtime", "create", "mine", "--env", "python3", *server.args())[0] == 0
    assert run(capsys, "exec", "mine", "y = 'from before'", *server.args())[0] == 0
    src = _notebook(tmp_path / "nb.ipynb", [_code("y")], environment=None)
    code, stdout, err = run(capsys, "run", str(src), "--runtime", "mine", *server.args())
    assert code == 0, err
    nb = _read(src)
    assert nb.cells[0].outputs[0].data["text/plain"] == "'from before'"
    assert nb.cells[0].execution_count == 2  # the runtime's interpreter counts on
    assert nb.metadata["envctl"]["environment"] == "python3@1"
    assert "runtime mine kept" in stdout
    assert [rt["name"] for rt in api_get(server, "/runtimes")] == ["mine"]


def test_a_bash_notebook_runs_its_cells_in_bash(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    src = _notebook(
        tmp_path / "shell.ipynb",
        [_code("GREETING=hello"), _code("echo $GREETING world"), _code("")],
        kernelspec={"name": "bash", "display_name": "Bash", "language": "bash"},
        language_info={"name": "bash"},
    )
    code, stdout, err = run(capsys, "run", str(src), *server.args())
    assert code == 0, err
    nb = _read(src)
    nbformat.validate(nb)
    assert nb.cells[1].outputs == [v4.new_output("stream", name="stdout", text="hello world\n")]
    assert nb.cells[2].execution_count is None  # an empty cell is not run
    assert "[3/3] skipped (empty)" in err
    assert "3 code cells, bash" in err


def test_run_says_which_runtime_type_it_chose_and_type_overrides(
    server: Server, capsys: Capsys, tmp_path: Path
) -> None:
    src = _notebook(tmp_path / "nb.ipynb", [_code("print(1)")])
    code, stdout, err = run(capsys, "run", str(src), *server.args())
    assert code == 0, err
    assert "runtime type: native (python3@1 has no Jupyter kernelspec python3" in err
    code, stdout, err = run(capsys, "run", str(src), "--type", "native", "--json", *server.args())
    assert code == 0, err
    assert json.loads(stdout)["runtime"]["type"] == "native"
    assert run(capsys, "runtime", "create", "mine", "--env", "python3", *server.args())[0] == 0
    code, stdout, err = run(capsys, "run", str(src), "--runtime", "mine", "--type", "jupyter", *server.args())
    assert code == 2 and "--type" in err


def test_run_holds_a_lease_renewed_while_a_long_cell_runs_and_keep_drops_it(
    server: Server, capsys: Capsys, tmp_path: Path
) -> None:
    """The runtime run creates has a 5 s lease and housekeeping runs every 0.2 s: only the
    heartbeat (every third of the lease) keeps it through a 7 s cell."""
    src = _notebook(tmp_path / "slow.ipynb", [_code("import time; time.sleep(7); print('done')")])
    code, stdout, err = run(capsys, "run", str(src), "--lease", "5", "--keep", "--json", *server.args())
    assert code == 0, err
    report = json.loads(stdout)
    assert report["status"] == "ok" and "lost" not in err, err
    kept = api_get(server, f"/runtimes/{report['runtime']['id']}")
    assert kept["lease"] is None  # dropped at the end: a kept runtime no longer goes with the command
    assert _read(src).cells[0].outputs[0]["text"] == "done\n"


def test_run_without_keep_deletes_its_runtime_and_lease_zero_makes_none(
    server: Server, capsys: Capsys, tmp_path: Path
) -> None:
    src = _notebook(tmp_path / "quick.ipynb", [_code("print(1)")])
    code, stdout, err = run(capsys, "run", str(src), "--lease", "0", "--keep", "--json", *server.args())
    assert code == 0, err
    assert api_get(server, f"/runtimes/{json.loads(stdout)['runtime']['id']}")["lease"] is None
    code, stdout, err = run(capsys, "run", str(src), "--lease", "3", *server.args())
    assert code == 2 and "lease" in err, err
    code, stdout, err = run(capsys, "run", str(src), "--runtime", "quick", "--lease", "30", *server.args())
    assert code == 2 and "--lease" in err, err
