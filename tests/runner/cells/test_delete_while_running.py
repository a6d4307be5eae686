"""Deleting a runtime while one of its cells runs: the cell ends, the rows go, nothing fails."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest

from envs.kit.db import Database
from runner.runtimes.states import State
from runner.service import RunnerService
from tests.runner.conftest import seed

Make = Callable[..., RunnerService]

# prints without a pause, so the cell's worker is writing outputs when the runtime goes
CHATTY = "import time\nfor i in range(100000):\n    print(i, flush=True)\n    time.sleep(0.001)\n"


def test_deleting_a_runtime_while_its_cell_prints_ends_the_cell_and_logs_no_error(
    make_runner: Make, runner_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    owner = seed(runner_db)
    svc = make_runner()
    rt = svc.create(owner, name="doomed", environment="python3")
    svc.start(owner, rt.id)
    assert svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 20).state == State.RUNNING
    ex = svc.executions.submit(owner, rt.id, code=CHATTY)
    queued = svc.executions.submit(owner, rt.id, code="print('never')")
    deadline = time.monotonic() + 20
    while len(svc.executions.outputs(ex.id)) < 50:
        assert time.monotonic() < deadline, "the cell printed nothing"
        time.sleep(0.05)
    caplog.set_level(logging.WARNING)
    svc.delete(owner, rt.id)
    time.sleep(1.0)  # whatever the worker would still write, it writes now
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [f"{r.name}: {r.getMessage()}" for r in errors]
    ended = svc.executions.feeds.get(ex.id)
    assert ended is not None and ended.view.status == "error"
    assert "deleted" in ended.outputs[-1]["evalue"]
    never = svc.executions.feeds.get(queued.id)
    assert never is not None and never.view.status in ("error", "interrupted")
    assert svc.list(owner) == []
