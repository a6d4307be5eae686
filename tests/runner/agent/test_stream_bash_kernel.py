"""The Bash kernel that reaches its shell through a byte stream only (``StreamBashKernel``: a
Bash-only attach on a cluster, runner/backends/kube_shell.py), here with a local
``bash --noprofile --norc`` as the stream's far end: cells in on stdin, each ended by markers on
stdout and stderr. The cluster case itself is tests/kube/test_kube_attach.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from runner.agent import kernels


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("ENVCTL_BASH_STREAM", "1")
    monkeypatch.setenv("ENVCTL_BASH_KERNEL", json.dumps(["bash", "--noprofile", "--norc"]))
    events: list[tuple[str, dict[str, Any]]] = []
    done = threading.Event()

    def on(kind: str, data: dict[str, Any]) -> None:
        events.append((kind, data))
        if kind == "done":
            done.set()

    k = kernels.bash_kernel(on, {"PATH": "/usr/bin:/bin"}, "/tmp")
    assert isinstance(k, kernels.StreamBashKernel)
    k.ensure_started(20)

    def cell(code: str, wait: float = 20) -> tuple[str, str, str, list[dict[str, Any]]]:
        events.clear()
        done.clear()
        k.execute(code)
        assert done.wait(wait), events
        outs = [d for kind, d in events if kind == "output"]
        stream = {n: "".join(o["text"] for o in outs if o.get("name") == n) for n in ("stdout", "stderr")}
        status = next(d["status"] for kind, d in events if kind == "done")
        return status, stream["stdout"], stream["stderr"], outs

    k.cell = cell  # type: ignore[attr-defined]
    yield k
    k.kill()


def test_state_streams_status_and_stdin(kernel: Any) -> None:
    assert kernel.cell("x=5; f() { echo f$1; }; cd /tmp; printf 'no newline'")[:2] == ("ok", "no newline")
    status, out, err, outs = kernel.cell("echo $x $(f 1) $(pwd); echo err >&2; false")
    assert (status, out, err) == ("error", "5 f1 /tmp\n", "err\n")
    assert any("status 1" in o.get("evalue", "") for o in outs)
    # a command reading stdin reads nothing of what follows; quotes pass as written
    assert kernel.cell("cat; echo 'it'\\''s' \"$x\" '$x'")[:2] == ("ok", "it's 5 $x\n")
    status, out, _, _ = kernel.cell("seq 200000 | tail -1; for i in $(seq 3000); do echo l$i; done | wc -l")
    assert (status, out.split()) == ("ok", ["200000", "3000"])


def test_an_interrupt_ends_the_cell_and_keeps_the_shell(kernel: Any) -> None:
    kernel.cell("kept=yes")
    began = time.monotonic()
    threading.Timer(1.0, kernel.interrupt).start()
    status, out, _, _ = kernel.cell("sleep 600; echo after")
    assert status == "interrupted" and "after" not in out and time.monotonic() - began < 10
    assert kernel.cell("echo $kept")[:2] == ("ok", "yes\n")


def test_markers_split_across_reads_are_found_and_taken_out(kernel: Any) -> None:
    """The reader may get a marker in pieces; neither piece shows as output."""
    seen: list[tuple[str, dict[str, Any]]] = []
    kernel._emit = lambda kind, data: seen.append((kind, data))
    kernel._busy = True
    marker = f"\n{kernel.token} 0\n"
    for name in ("stdout", "stderr"):
        text = f"{name} text" + marker
        for piece in (text[:7], text[7:12], text[12:-3], text[-3:]):
            kernel._filter("output", {"output_type": "stream", "name": name, "text": piece})
    shown = {n: "".join(d["text"] for k, d in seen if k == "output" and d["name"] == n) for n in ("stdout", "stderr")}
    assert shown == {"stdout": "stdout text", "stderr": "stderr text"}
    assert [d["status"] for k, d in seen if k == "done"] == ["ok"]
