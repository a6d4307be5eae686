"""`envctl exec`, `envctl results` and `runtime create --type` against a real HTTP server.

The fake backend runs the real agent as a local process: python and bash cells really run.
"""

# The server fixtures are imported by name and requested as parameters of the same name.
# ruff: noqa: F401, F811

from __future__ import annotations

import io
import json
import re
import signal
from pathlib import Path

import pytest

from api.cli import main, parse_sse, runtime_name_for
from tests.api.cli_exec_fixtures import (
    CuttingProxy,
    Server,
    _isolated_client_config,
    api_get,
    ctrl_c_when,
    cutting_proxy,
    run,
    server,
)

Capsys = pytest.CaptureFixture[str]


def _runtime(server: Server, capsys: Capsys, name: str = "demo", *extra: str) -> dict[str, object]:
    code, out, err = run(capsys, "runtime", "create", name, "--env", "python3", "--json", *extra, *server.args())
    assert code == 0, err
    data: dict[str, object] = json.loads(out)
    return data


def test_exec_boots_a_stopped_runtime_and_streams_stdout_in_order(server: Server, capsys: Capsys) -> None:
    _runtime(server, capsys)
    code, out, err = run(
        capsys, "exec", "demo", "import time\nfor i in range(5):\n    print(i)\n    time.sleep(0.05)", *server.args()
    )
    assert code == 0, err
    assert out == "0\n1\n2\n3\n4\n"
    assert "booting runtime demo (python3@1)" in err
    assert "runtime demo is running" in err

    # The runtime keeps the interpreter's state; an expression's value is shown as text/plain.
    code, out, err = run(capsys, "exec", "demo", "x = 41", *server.args())
    assert (code, out) == (0, ""), err
    assert "booting" not in err  # it runs already
    code, out, err = run(capsys, "exec", "demo", "print('x is', x)\nx + 1", *server.args())
    assert code == 0, err
    assert out == "x is 41\n42\n"


def test_a_failing_cell_exits_1_with_its_traceback_on_stderr(server: Server, capsys: Capsys) -> None:
    _runtime(server, capsys)
    code, out, err = run(capsys, "exec", "demo", "print('before')\n1/0", *server.args())
    assert code == 1
    assert out == "before\n"
    assert "Traceback (most recent call last):" in err
    assert err.rstrip().endswith("ZeroDivisionError: division by zero")

    code, out, err = run(capsys, "exec", "demo", "import sys\nprint('to stderr', file=sys.stderr)", *server.args())
    assert code == 0, err
    assert out == ""
    assert "to stderr\n" in err


def test_bash_through_lang(server: Server, capsys: Capsys) -> None:
    _runtime(server, capsys)
    code, out, err = run(
        capsys, "exec", "demo", "--lang", "bash", "cd /tmp\necho hello\necho $((6 * 7))", *server.args()
    )
    assert code == 0, err
    assert out == "hello\n42\n"
    code, out, err = run(capsys, "exec", "demo", "--lang", "bash", "pwd", *server.args())
    assert (code, out) == (0, "/tmp\n"), err  # one persistent shell


def test_code_from_stdin(server: Server, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    _runtime(server, capsys)
    monkeypatch.setattr("sys.stdin", io.StringIO("name = 'stdin'\nprint(f'hello from {name}')\n"))
    code, out, err = run(capsys, "exec", "demo", "-", *server.args())
    assert code == 0, err
    assert out == "hello from stdin\n"


def test_json_prints_the_final_execution(server: Server, capsys: Capsys) -> None:
    rt = _runtime(server, capsys)
    code, out, err = run(capsys, "exec", "demo", "print('hi')\n6 * 7", "--json", *server.args())
    assert code == 0, err
    ex = json.loads(out)
    assert ex["status"] == "ok"
    assert ex["id"].startswith("ex_")
    assert ex["runtime_id"] == rt["id"]
    assert ex["execution_count"] == 1
    assert [o["output_type"] for o in ex["outputs"]] == ["stream", "execute_result"]
    assert ex["outputs"][0]["text"] == "hi\n"
    assert ex["outputs"][1]["data"]["text/plain"] == "42"
    assert "booting" not in err  # --json is quiet

    code, out, err = run(capsys, "exec", "demo", "raise ValueError('no')", "--json", *server.args())
    assert code == 1
    ex = json.loads(out)
    assert (ex["status"], ex["error_name"], ex["error_value"]) == ("error", "ValueError", "no")


def test_images_are_saved_and_their_paths_printed(server: Server, capsys: Capsys, tmp_path: Path) -> None:
    _runtime(server, capsys)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    jpeg = b"\xff\xd8\xff\xe0" + b"jpeg bytes"
    images = tmp_path / "images"
    code, out, err = run(
        capsys,
        "exec",
        "demo",
        f"print('drawing')\ndisplay(Image({png!r}))\ndisplay(Image({jpeg!r}, format='jpeg'))",
        "--images-dir",
        str(images),
        *server.args(),
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "drawing"
    saved = [re.fullmatch(r"\[(image/\w+) saved to (.+)\]", line) for line in lines[1:]]
    assert all(saved), out
    (png_mime, png_path), (jpeg_mime, jpeg_path) = [(m.group(1), Path(m.group(2))) for m in saved if m]
    assert png_mime == "image/png" and jpeg_mime == "image/jpeg"
    assert png_path.parent == images and jpeg_path.parent == images
    assert re.fullmatch(r"ex_\w+-1\.png", png_path.name), png_path
    assert jpeg_path.name == png_path.name.replace("-1.png", "-2.jpg")
    assert png_path.read_bytes() == png
    assert jpeg_path.read_bytes() == jpeg


def test_images_default_to_the_current_folder(
    server: Server, capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _runtime(server, capsys)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "exec", "demo", "display(Image(b'\\x89PNG any bytes'))", *server.args())
    assert code == 0, err
    path = Path(re.fullmatch(r"\[image/png saved to (.+)\]\n", out).group(1))  # type: ignore[union-attr]
    assert (tmp_path / path).read_bytes() == b"\x89PNG any bytes"
    assert (tmp_path / path).parent == tmp_path


def test_unknown_runtime_exits_1(server: Server, capsys: Capsys) -> None:
    code, out, err = run(capsys, "exec", "nope", "print(1)", *server.args())
    assert code == 1
    assert "no runtime named or with id 'nope'" in err
    code, out, err = run(capsys, "exec", "rt_doesnotexist", "print(1)", *server.args())
    assert code == 1
    assert "HTTP 404" in err


@pytest.mark.parametrize(
    ("extra", "field"),
    [(["--lang", "ruby"], "language"), (["--timeout", "-1"], "timeout"), (["--timeout", "1e9"], "timeout")],
)
def test_bad_input_exits_2_and_runs_nothing(server: Server, capsys: Capsys, extra: list[str], field: str) -> None:
    rt = _runtime(server, capsys)
    code, out, err = run(capsys, "exec", "demo", "print(1)", *extra, *server.args())
    assert code == 2, (out, err)
    assert out == ""
    assert "HTTP 422" in err and field in err
    assert api_get(server, f"/runtimes/{rt['id']}/executions") == []
    assert api_get(server, f"/runtimes/{rt['id']}")["state"] == "stopped"  # nothing booted


def test_a_timeout_ends_the_cell_with_an_error(server: Server, capsys: Capsys) -> None:
    _runtime(server, capsys)
    code, out, err = run(capsys, "exec", "demo", "import time\ntime.sleep(30)", "--timeout", "0.5", *server.args())
    assert code == 1
    assert "TimeoutError: the execution exceeded its timeout of 0.5 s" in err


def test_a_dropped_event_stream_is_resumed_with_last_event_id(
    server: Server, capsys: Capsys, cutting_proxy: CuttingProxy
) -> None:
    _runtime(server, capsys)
    run(capsys, "runtime", "start", "demo", *server.args())
    code, out, err = run(
        capsys,
        "exec",
        "demo",
        "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.25)",
        "--url",
        cutting_proxy.url,
        "--token",
        server.token,
    )
    assert code == 0, err
    assert cutting_proxy.cuts == 1
    assert out == "".join(f"{i}\n" for i in range(8))  # every output once, in order
    assert "reconnecting" in err
    first, *again = cutting_proxy.events_requests()
    assert b"last-event-id" not in first.lower()
    assert again and all(b"last-event-id: " in r.lower() for r in again)


def test_ctrl_c_interrupts_the_cell_and_waits_for_its_end(server: Server, capsys: Capsys) -> None:
    rt = _runtime(server, capsys)
    run(capsys, "runtime", "start", "demo", *server.args())

    def cell_runs() -> bool:  # and has printed: a Ctrl-C before its first line would leave no output
        return any(
            e["status"] == "running" and "started" in json.dumps(e["outputs"])
            for e in api_get(server, f"/runtimes/{rt['id']}/executions")
        )

    # A Ctrl-C is Python's default SIGINT handler at work; code that ran earlier in this process
    # (an in-process server or agent) may have put its own in place, so this test sets it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watcher = ctrl_c_when(cell_runs)
        code, out, err = run(
            capsys, "exec", "demo", "import time\nprint('started', flush=True)\ntime.sleep(30)", *server.args()
        )
        watcher.join(5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 1, err
    assert out == "started\n"
    assert "interrupting execution ex_" in err
    assert "KeyboardInterrupt" in err
    assert "was interrupted" in err
    [ex] = api_get(server, f"/runtimes/{rt['id']}/executions")
    assert ex["status"] == "interrupted"
    # The interpreter survived: the runtime answers the next cell.
    code, out, err = run(capsys, "exec", "demo", "print('still here')", *server.args())
    assert (code, out) == (0, "still here\n"), err


def test_runtime_create_takes_type_and_kernel(server: Server, capsys: Capsys) -> None:
    rt = _runtime(server, capsys, "jup", "--type", "jupyter", "--kernel", "python3")
    assert (rt["type"], rt["kernel"]) == ("jupyter", "python3")
    code, out, err = run(capsys, "runtime", "show", "jup", *server.args())
    assert code == 0, err
    assert re.search(r"^type\s+jupyter \(kernel python3\)$", out, re.M), out
    rt = _runtime(server, capsys, "nat")
    assert (rt["type"], rt["kernel"]) == ("native", None)
    code, out, err = run(capsys, "runtime", "show", "nat", *server.args())
    assert re.search(r"^type\s+native$", out, re.M), out

    code, out, err = run(capsys, "runtime", "create", "bad", "--env", "python3", "--kernel", "python3", *server.args())
    assert code == 2 and "only runtimes of type jupyter take a kernel" in err
    with pytest.raises(SystemExit) as exc:
        main(["runtime", "create", "bad", "--env", "python3", "--type", "docker"])
    assert exc.value.code == 2


def test_results_list_and_download(
    server: Server, capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(server, capsys)
    results_dir = server.runner.state_dir(str(rt["id"])) / "results"
    payload = bytes(range(256)) * 1000
    code, out, err = run(
        capsys,
        "exec",
        "demo",
        f"import os\nos.makedirs({str(results_dir / 'sub')!r}, exist_ok=True)\n"
        f"open({str(results_dir / 'sub' / 'data.bin')!r}, 'wb').write(bytes(range(256)) * 1000)\n"
        f"open({str(results_dir / 'note.txt')!r}, 'w').write('hello')",
        "--json",
        *server.args(),
    )
    assert code == 0, err
    ex_id = json.loads(out)["id"]

    code, out, err = run(capsys, "results", "demo", *server.args())  # shorthand of `results ls demo`
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "PATH", "SIZE", "SHA256", "EXECUTION", "CREATED", "(UTC)"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert set(rows) == {"sub/data.bin", "note.txt"}
    assert rows["sub/data.bin"][2:4] == ["250.0", "KiB"]
    assert rows["note.txt"][2:4] == ["5", "B"]
    assert rows["note.txt"][5] == ex_id
    assert len(rows["note.txt"][4]) == 12

    code, out, err = run(capsys, "results", "ls", "--json", *server.args())
    assert code == 0, err
    listed = {r["path"]: r for r in json.loads(out)}
    assert set(listed) == {"sub/data.bin", "note.txt"}

    dest = tmp_path / "got.bin"
    code, out, err = run(capsys, "results", "get", str(listed["sub/data.bin"]["id"]), "-o", str(dest), *server.args())
    assert code == 0, err
    assert dest.read_bytes() == payload
    assert f"wrote {dest}" in out

    # Without -o: the file's own name, here; never over an existing file.
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "results", "get", str(listed["note.txt"]["id"]), *server.args())
    assert code == 0, err
    assert (tmp_path / "note.txt").read_text() == "hello"
    code, out, err = run(capsys, "results", "get", str(listed["note.txt"]["id"]), *server.args())
    assert code == 1 and "exists" in err and "-o" in err

    # Results outlive the runtime: listed by its id after it was deleted.
    assert run(capsys, "runtime", "rm", "demo", *server.args())[0] == 0
    code, out, err = run(capsys, "results", "ls", str(rt["id"]), "--json", *server.args())
    assert code == 0, err
    assert {r["path"] for r in json.loads(out)} == {"sub/data.bin", "note.txt"}

    code, out, err = run(capsys, "results", "get", "999999", "-o", str(tmp_path / "x"), *server.args())
    assert code == 1 and "HTTP 404" in err
    with pytest.raises(SystemExit) as exc:
        main(["results", "get", "abc"])
    assert exc.value.code == 2


def test_parse_sse() -> None:
    lines = [
        ": keep-alive",
        "",
        "id: 0",
        "event: output",
        'data: {"a":',
        "data: 1}",
        "",
        "event: status",
        'data:{"status":"ok"}',
        "",
    ]
    events = list(parse_sse(lines))
    assert [(e.event, e.id) for e in events] == [("output", "0"), ("status", None)]
    assert json.loads(events[0].data) == {"a": 1}
    assert json.loads(events[1].data) == {"status": "ok"}


@pytest.mark.parametrize(
    ("file_name", "runtime_name"),
    [
        ("analysis.ipynb", "analysis"),
        ("My Notebook (v2).ipynb", "my-notebook-v2"),
        ("__Data__prep..final.ipynb", "data_prep.final"),
        ("Données été.ipynb", "donnees-ete"),
        ("!!!.ipynb", "notebook"),
        ("x" * 100 + ".ipynb", "x" * 56),
    ],
)
def test_runtime_names_from_notebook_file_names(file_name: str, runtime_name: str) -> None:
    assert runtime_name_for(Path(file_name)) == runtime_name
    assert re.fullmatch(r"[a-z0-9]+([._-][a-z0-9]+)*", runtime_name)
