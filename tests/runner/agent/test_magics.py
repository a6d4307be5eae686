"""IPython's shell escapes and magics in the native Python kernel (runner/agent/magics.py).

The cells run through the real agent process (runner/agent/main.py on a Unix socket, as in a
runtime, here on the test's own Python), spoken to with the runner's own channel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.agent import magics
from runner.channel import AgentChannel, wait_for_agent

AGENT = Path(__file__).resolve().parents[3] / "runner" / "agent" / "main.py"

Outputs = list[dict[str, Any]]


class Agent:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "agent.sock"

    def run(self, code: str) -> tuple[str, Outputs]:
        """Run one cell; its final status and outputs."""
        with AgentChannel(self.socket) as channel:
            events = list(channel.stream("execute", execution_id=uuid.uuid4().hex, code=code, language="python"))
        return str(events[-1]["status"]), [e["output"] for e in events if e.get("event") == "output"]

    def interrupt(self) -> None:
        with AgentChannel(self.socket) as channel:
            channel.request("interrupt")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    # A relative socket name (the agent runs in `work`) keeps its address short, as the fake
    # backend does.
    proc = subprocess.Popen(
        [sys.executable, "-u", "-I", str(AGENT), "--socket", "agent.sock"],
        cwd=work,
        env={"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"},
    )
    try:
        wait_for_agent(work / "agent.sock", time.monotonic() + 20)
        yield Agent(work)
    finally:
        proc.terminate()
        proc.wait(10)


def stdout(outputs: Outputs, name: str = "stdout") -> str:
    return "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == name)


def result(outputs: Outputs) -> str:
    [value] = [o["data"]["text/plain"] for o in outputs if o["output_type"] == "execute_result"]
    return str(value)


def error(outputs: Outputs) -> dict[str, Any]:
    [err] = [o for o in outputs if o["output_type"] == "error"]
    return err


# --- through the agent ------------------------------------------------------------------


def test_a_shell_command_streams_its_output_and_runs_where_cd_went(agent: Agent) -> None:
    status, outputs = agent.run("!echo out; echo err >&2")
    assert status == "ok", outputs
    assert stdout(outputs) == "out\n" and stdout(outputs, "stderr") == "err\n"

    (agent.directory / "sub dir").mkdir()
    status, outputs = agent.run("%cd 'sub dir'\n!pwd\nimport os\nprint(os.getcwd())")
    target = str(agent.directory / "sub dir")
    assert status == "ok", outputs
    assert stdout(outputs) == f"{target}\n{target}\n{target}\n"  # %cd says where it went, as IPython does
    # the next cell is still there; %cd alone goes home and %cd - comes back
    assert stdout(agent.run("!pwd")[1]) == f"{target}\n"
    status, outputs = agent.run("%cd\n!pwd\n%cd -\n!pwd")
    home = str(agent.directory.parent / "home")
    assert status == "ok" and stdout(outputs) == f"{home}\n{home}\n{target}\n{target}\n", outputs


def test_a_shell_commands_stdout_is_captured_as_a_list_of_lines(agent: Agent) -> None:
    status, outputs = agent.run("files = !printf 'a b\\nc\\n'; echo to-stderr >&2\nfiles")
    assert status == "ok", outputs
    assert result(outputs) == "['a b', 'c']"
    assert stdout(outputs) == "" and stdout(outputs, "stderr") == "to-stderr\n"
    status, outputs = agent.run("!!echo shown")
    assert status == "ok" and result(outputs) == "['shown']"


def test_a_failing_shell_command_sets_the_exit_code_and_the_cell_goes_on(agent: Agent) -> None:
    status, outputs = agent.run("!exit 3\nprint('after', _exit_code)")
    assert status == "ok", outputs
    assert stdout(outputs) == "after 3\n"


def test_a_magic_inside_a_string_literal_is_left_alone(agent: Agent) -> None:
    code = (
        'text = """\n'
        "!echo not a command\n"
        "%timeit not a magic\n"
        '"""\n'
        "inline = '%cd /'; other = \"!echo no\"\n"
        "joined = ('a'\n"
        "    '!echo no')\n"
        "!echo yes\n"
        "print(repr(text), inline, other, joined)"
    )
    status, outputs = agent.run(code)
    assert status == "ok", outputs
    assert stdout(outputs) == "yes\n'\\n!echo not a command\\n%timeit not a magic\\n' %cd / !echo no a!echo no\n"


def test_an_indented_shell_command_runs_inside_its_block(agent: Agent) -> None:
    code = "for n in range(2):\n    if n:\n        !echo one\n    else:\n        !echo zero\n!echo done"
    status, outputs = agent.run(code)
    assert status == "ok", outputs
    assert stdout(outputs) == "zero\none\ndone\n"


def test_a_traceback_after_a_magic_line_points_at_the_right_line(agent: Agent) -> None:
    status, outputs = agent.run("!echo first\n%matplotlib inline\n\ndef f():\n    return 1 / 0\nf()")
    assert status == "error"
    err = error(outputs)
    assert err["ename"] == "ZeroDivisionError"
    text = "\n".join(err["traceback"])
    assert 'File "<cell 1>", line 6, in <module>\n    f()' in text
    assert 'File "<cell 1>", line 5, in f\n    return 1 / 0' in text
    # an error of a magic itself points at the magic's own line, without the helper's frames
    status, outputs = agent.run("x = 1\n\n%cd /no/such/dir")
    err = error(outputs)
    assert status == "error" and err["ename"] == "FileNotFoundError"
    assert 'File "<cell 2>", line 3, in <module>\n    %cd /no/such/dir' in "\n".join(err["traceback"])
    assert "magics.py" not in "\n".join(err["traceback"])
    # a syntax error elsewhere in a cell with magics is reported at its own line
    status, outputs = agent.run("!echo never\nx = 1\ndef f(:\n    pass")
    err = error(outputs)
    assert status == "error" and err["ename"] == "SyntaxError" and stdout(outputs) == ""
    assert err["traceback"][0] == '  File "<cell 3>", line 3'


@pytest.mark.parametrize(
    ("cell", "magic"),
    [
        ("print('not run')\n%timeit sum(range(10))", "%timeit"),
        ("%%bash\necho 'it's not python'", "%%bash"),
        ("if True:\n    %load_ext autoreload", "%load_ext"),
        ("t = %time 1 + 1", "%time"),
    ],
)
def test_an_unsupported_magic_is_an_error_that_names_the_jupyter_type(agent: Agent, cell: str, magic: str) -> None:
    status, outputs = agent.run(cell)
    assert status == "error"
    assert stdout(outputs) == ""  # nothing of the cell ran
    err = error(outputs)
    assert err["ename"] == "UnsupportedMagic"
    assert err["evalue"].startswith(f"{magic} needs IPython")
    assert "jupyter runtime type (envctl run --type jupyter)" in err["evalue"]
    assert "python3-jupyter" in err["evalue"]
    assert err["traceback"][-1] == f"UnsupportedMagic: {err['evalue']}"
    # the kernel is fine afterwards
    assert agent.run("1 + 1")[0] == "ok"


def test_pip_runs_with_the_kernels_own_interpreter(agent: Agent) -> None:
    status, outputs = agent.run("%pip --version")
    assert status == "ok", outputs
    version = f"(python {sys.version_info.major}.{sys.version_info.minor})"
    assert stdout(outputs).startswith("pip ") and version in stdout(outputs)
    # a failed install fails the cell (no network: nothing to install from)
    status, outputs = agent.run("%pip install --no-index --find-links /nonexistent envctl-no-such-package")
    assert status == "error"
    err = error(outputs)
    assert err["ename"] == "CalledProcessError" and "pip install --no-index" in err["evalue"]
    assert "ERROR" in stdout(outputs, "stderr")


def test_env_sets_shows_and_lists_variables(agent: Agent) -> None:
    status, outputs = agent.run("%env GREETING=hello world\n%env OTHER two\n%env MY_API_TOKEN=s3cret")
    assert status == "ok", outputs
    assert stdout(outputs) == "env: GREETING=hello world\nenv: OTHER=two\nenv: MY_API_TOKEN=s3cret\n"
    assert result(agent.run("%env GREETING")[1]) == "'hello world'"
    assert stdout(agent.run("!echo $GREETING $OTHER")[1]) == "hello world two\n"
    assert result(agent.run("import os\nos.environ['OTHER']")[1]) == "'two'"
    status, outputs = agent.run("everything = %env\neverything['GREETING'], everything['MY_API_TOKEN']")
    assert status == "ok" and result(outputs) == "('hello world', '<hidden>')"
    status, outputs = agent.run("%env NOT_SET_ANYWHERE")
    assert status == "error" and error(outputs)["ename"] == "UsageError"


def test_matplotlib_inline_is_accepted_and_figures_still_become_png(agent: Agent) -> None:
    pytest.importorskip("matplotlib")
    status, outputs = agent.run("%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\nNone")
    assert status == "ok", outputs
    assert [o for o in outputs if o["output_type"] == "display_data" and "image/png" in o["data"]]
    status, outputs = agent.run(
        "%matplotlib inline  # again, with pyplot loaded\nimport matplotlib\nmatplotlib.get_backend()"
    )
    assert status == "ok" and result(outputs).lower() == "'agg'", outputs
    status, outputs = agent.run("%matplotlib widget")
    assert status == "error" and "figures inline only" in error(outputs)["evalue"]


def test_an_interrupt_stops_a_shell_command_and_keeps_the_kernels_state(agent: Agent) -> None:
    agent.run("kept = 42")
    results: list[tuple[str, Outputs]] = []
    cell = threading.Thread(target=lambda: results.append(agent.run("!sleep 30\nprint('not reached')")))
    started = time.monotonic()
    cell.start()
    time.sleep(1.0)
    agent.interrupt()
    cell.join(20)
    assert results and results[0][0] == "interrupted", results
    assert time.monotonic() - started < 10
    assert result(agent.run("kept")[1]) == "42"


def test_a_users_own_module_named_magics_is_the_one_imported(agent: Agent) -> None:
    (agent.directory / "magics.py").write_text("WHO = 'the user'\n")
    status, outputs = agent.run("import magics\n!true\nmagics.WHO")
    assert status == "ok" and result(outputs) == "'the user'", outputs


# --- the transformation alone -------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "x = 5 % 3\ny = x != 2\n",
        "s = '''\n!echo\n%cd\n'''\n",
        "d = {'a': 1}\nprint(f'{d!r}')\n",
        "if x:\n    pass\n# !echo in a comment\n",
        "total = (1 +\n    2)\\\n    + 3\n",
    ],
)
def test_plain_python_is_never_rewritten(code: str) -> None:
    assert magics.transform(code) is None


def test_every_line_keeps_its_number() -> None:
    code = "!echo a \\\n   b\nx = 1\r\n  \n%env A=1\n\tif x:\n\t\t!ls\nfiles = !ls\nlast"
    rewritten = magics.transform(code)
    assert rewritten is not None
    assert rewritten.splitlines() == [
        "__envctl_magics__.system('echo a    b')",
        "",
        "x = 1",
        "  ",
        "__envctl_magics__.line('env', 'A=1')",
        "\tif x:",
        "\t\t__envctl_magics__.system('ls')",
        "files = __envctl_magics__.getoutput('ls')",
        "last",
    ]
    assert rewritten.count("\r\n") == 1


def test_an_unsupported_magic_is_found_with_its_line_number() -> None:
    with pytest.raises(magics.UnsupportedMagic) as caught:
        magics.transform("x = 1\nif x:\n    %time f()\n")
    assert caught.value.magic == "%time" and caught.value.lineno == 3
