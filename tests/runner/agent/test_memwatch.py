"""The agent's memory watch (``runner/agent/memwatch.py``): the decision, both cgroup versions'
files read from a temporary directory laid out as a container sees them, and a real agent
process whose cell is paused, reported on its stream and resumed (the cgroup files given to it
with ``--memory-cgroup``, so the test sets the usage it sees)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.agent import memwatch
from runner.channel import AgentChannel, wait_for_agent
from runner.paths import AGENT_DIR

MIB = 1048576
V1_NO_LIMIT = "9223372036854771712"  # what cgroup v1 writes when there is none


@pytest.mark.parametrize(
    ("usage", "limit", "fraction", "expected"),
    [
        (899, 1000, 0.9, False),
        (900, 1000, 0.9, True),
        (1000, 1000, 0.9, True),
        (10**12, None, 0.9, False),  # no limit: no watch
        (900, 0, 0.9, False),
        (999, 1000, 0.0, False),  # off
        (999, 1000, 1.0, False),  # not a fraction below the limit: off
        (950, 1000, 0.95, True),
    ],
)
def test_the_decision(usage: int, limit: int | None, fraction: float, expected: bool) -> None:
    assert memwatch.should_pause(usage, limit, fraction) is expected


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # never half-written for a reader


def cgroup_v1(root: Path, usage: int, limit: str, inactive_file: int = 0) -> None:
    _write(root / "memory" / "memory.usage_in_bytes", f"{usage}\n")
    _write(root / "memory" / "memory.limit_in_bytes", f"{limit}\n")
    _write(root / "memory" / "memory.stat", f"cache 5\nrss 7\ninactive_file 1\ntotal_inactive_file {inactive_file}\n")


def cgroup_v2(root: Path, usage: int, limit: str, inactive_file: int = 0) -> None:
    _write(root / "memory.current", f"{usage}\n")
    _write(root / "memory.max", f"{limit}\n")
    _write(root / "memory.stat", f"anon 7\nfile 5\nactive_file 3\ninactive_file {inactive_file}\n")


def test_cgroup_v1_files(tmp_path: Path) -> None:
    cgroup_v1(tmp_path, 300 * MIB, str(256 * MIB), inactive_file=60 * MIB)
    found = memwatch.limit_of(str(tmp_path))
    assert found is not None and (found.version, found.limit) == (1, 256 * MIB)
    r = memwatch.read(str(tmp_path))
    assert r is not None and (r.usage, r.limit, r.version) == (240 * MIB, 256 * MIB, 1)  # less the inactive cache
    assert memwatch.usage_at_least(str(tmp_path), 1, 300 * MIB)
    assert not memwatch.usage_at_least(str(tmp_path), 1, 300 * MIB + 1)
    cgroup_v1(tmp_path, 300 * MIB, V1_NO_LIMIT)
    r = memwatch.read(str(tmp_path))
    assert r is not None and r.limit is None


def test_cgroup_v2_files(tmp_path: Path) -> None:
    cgroup_v2(tmp_path, 200 * MIB, str(256 * MIB), inactive_file=10 * MIB)
    found = memwatch.limit_of(str(tmp_path))
    assert found is not None and (found.version, found.limit) == (2, 256 * MIB)
    r = memwatch.read(str(tmp_path))
    assert r is not None and (r.usage, r.limit, r.version) == (190 * MIB, 256 * MIB, 2)
    cgroup_v2(tmp_path, 200 * MIB, "max")
    r = memwatch.read(str(tmp_path))
    assert r is not None and (r.usage, r.limit) == (200 * MIB, None)


def test_v2_wins_where_both_are_seen_and_nothing_is_none(tmp_path: Path) -> None:
    assert memwatch.limit_of(str(tmp_path)) is None and memwatch.read(str(tmp_path)) is None
    cgroup_v1(tmp_path, 1, "100")
    cgroup_v2(tmp_path, 2, "200")
    r = memwatch.read(str(tmp_path))
    assert r is not None and (r.version, r.usage, r.limit) == (2, 2, 200)
    (tmp_path / "memory.current").write_text("garbage\n")
    assert memwatch.read(str(tmp_path)) is None  # unreadable: no watch, never a guess


def test_descendants_are_the_whole_tree() -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        found: list[int] = []
        while len(found) < 3 and time.monotonic() < deadline:
            found = memwatch.descendants(os.getpid())
            found = [p for p in found if p == proc.pid or _parent(p) == proc.pid]
            time.sleep(0.02)
        assert proc.pid in found and len(found) == 3, found  # sh and its two sleeps
    finally:
        proc.kill()
        proc.wait()


def _parent(pid: int) -> int:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return -1
    return int(data[data.rfind(b")") + 2 :].split()[1])


def _state(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rfind(b")") + 2 :].split()[0].decode()


# --- a real agent ---------------------------------------------------------------------------


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """An agent watching a v1 cgroup of 1000 MiB at 90 %, pausing at most 20 s; (socket, cgroup)."""
    cgroup = tmp_path / "cgroup"
    cgroup_v1(cgroup, 100 * MIB, str(1000 * MIB))
    sock = tmp_path / "agent.sock"
    proc = _agent(sock, cgroup, pause=20)
    yield sock, cgroup, proc
    proc.kill()
    proc.wait()


def _agent(sock: Path, cgroup: Path, pause: float) -> subprocess.Popen[bytes]:
    args = ["--socket", str(sock), "--index", "no", "--memory-watch", "0.9", "--memory-pause", f"{pause:g}"]
    proc = subprocess.Popen(
        [sys.executable, "-u", "-I", str(AGENT_DIR / "main.py"), *args, "--memory-cgroup", str(cgroup)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for_agent(sock, time.monotonic() + 20)
    return proc


def _counting_cell(counter: Path, seconds: float) -> str:
    loops = int(seconds / 0.05)
    return f"for i in $(seq 1 {loops}); do echo $i > {counter}; sleep 0.05; done; echo finished"


def _count(counter: Path) -> int:
    for _ in range(50):
        text = counter.read_text().strip() if counter.exists() else ""
        if text:
            return int(text)
        time.sleep(0.01)
    return 0


def _kernel_pid(sock: Path) -> int:
    with AgentChannel(sock, timeout=5) as channel:
        return int(channel.request("status")["kernels"]["bash"])


def test_a_cell_near_the_limit_is_paused_reported_once_and_resumed_by_envctl(
    watched: tuple[Path, Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    sock, cgroup, _proc = watched
    counter = tmp_path / "count"
    with AgentChannel(sock, timeout=5) as channel:
        events = channel.stream("execute", execution_id="ex_hog", code=_counting_cell(counter, 3), language="bash")
        assert next(events)["event"] == "accepted"
        while _count(counter) < 3:  # the cell runs, unpaused below the line
            time.sleep(0.05)
        cgroup_v1(cgroup, 950 * MIB, str(1000 * MIB), inactive_file=10 * MIB)  # 940 MiB: past 90 %
        began = time.monotonic()
        pressure = next(e for e in events if e["event"] != "output")
        assert pressure["event"] == "pressure", pressure
        assert time.monotonic() - began < 1.0  # within a few watch intervals
        assert pressure["execution_id"] == "ex_hog"
        assert (pressure["usage"], pressure["limit"], pressure["cgroup"]) == (940 * MIB, 1000 * MIB, 1)
        kernel = _kernel_pid(sock)
        assert _state(kernel) == "T"  # the kernel, and the cell's own processes, are stopped
        frozen = _count(counter)
        time.sleep(0.5)
        assert _count(counter) == frozen  # nothing runs meanwhile: the files hold still
        with AgentChannel(sock, timeout=5) as other:
            assert other.request("resume", execution_id="ex_hog", draft="taken")["paused"] is True
        rest = list(events)  # still over the line: never paused a second time in the same cell
    assert [e["event"] for e in rest if e["event"] != "output"] == ["done"], rest
    assert rest[-1]["status"] == "ok"
    assert _count(counter) == 60
    text = "".join(e["output"].get("text", "") for e in rest if e["event"] == "output")
    assert "finished" in text
    with AgentChannel(sock, timeout=5) as channel:  # a stream attached after the pause: not told again
        again = [e["event"] for e in channel.stream("attach", execution_id="ex_hog")]
    assert "pressure" not in again and again[-1] == "done", again


def test_without_an_answer_the_cell_goes_on_after_the_bound(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup_v1(cgroup, 960 * MIB, str(1000 * MIB))  # past the line from the start
    sock = tmp_path / "agent.sock"
    proc = _agent(sock, cgroup, pause=1)
    try:
        with AgentChannel(sock, timeout=5) as channel:
            began = time.monotonic()
            events = list(channel.stream("execute", execution_id="ex_1", code="sleep 0.5; echo ok", language="bash"))
            took = time.monotonic() - began
        kinds = [e["event"] for e in events]
        assert kinds.count("pressure") == 1 and kinds[-1] == "done" and events[-1]["status"] == "ok", events
        assert 1.0 <= took < 5, took  # paused for the bound (1 s), then resumed by itself
        with AgentChannel(sock, timeout=5) as channel:  # the next cell is watched again
            events = channel.stream("execute", execution_id="ex_2", code="sleep 0.3", language="bash")
            kinds = [e["event"] for e in events]
        assert "pressure" in kinds
        with AgentChannel(sock, timeout=5) as channel:  # a cell quicker than the watch's interval: never read
            events = channel.stream("execute", execution_id="ex_3", code="true", language="bash")
            kinds = [e["event"] for e in events]
        assert "pressure" not in kinds
    finally:
        proc.kill()
        out = (proc.communicate()[0] or b"").decode()
    assert "paused for a draft" in out and "no answer from envctl" in out, out


def test_no_limit_means_no_watch(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup_v2(cgroup, 10**12, "max")
    sock = tmp_path / "agent.sock"
    proc = _agent(sock, cgroup, pause=20)
    try:
        with AgentChannel(sock, timeout=5) as channel:
            events = channel.stream("execute", execution_id="ex_1", code="sleep 0.3", language="bash")
            kinds = [e["event"] for e in events]
        assert "pressure" not in kinds
    finally:
        proc.kill()
        out = (proc.communicate()[0] or b"").decode()
    assert "memory watch off (no memory limit to watch)" in out, out
