"""The native kernels on the fake backend: the real agent and kernels as local processes.

Here the kernel runs on the test's own Python, which has matplotlib (the base images have no
route to PyPI on these machines), so figures are tested for real.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from envs.kit.db import Database
from runner.runtimes.states import State
from runner.service import RunnerService
from tests.runner.conftest import seed


def _cell(svc: RunnerService, owner: str, rid: str, code: str) -> tuple[str, list[dict]]:  # type: ignore[type-arg]
    ex = svc.executions.submit(owner, rid, code=code)
    svc.executions.wait(ex.id, 60)
    view = svc.executions.get(owner, ex.id)
    return view.status, [o for _, o in svc.executions.outputs(ex.id)]


def test_matplotlib_figures_become_png_images(make_runner: Callable[..., RunnerService], runner_db: Database) -> None:
    owner = seed(runner_db)
    svc = make_runner()
    rt = svc.create(owner, name="plots", environment="python3")
    svc.start(owner, rt.id)
    svc.wait_for(rt.id, {State.RUNNING}, 20)
    status, outputs = _cell(svc, owner, rt.id, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')")
    assert status == "ok", outputs
    images = [o for o in outputs if o["output_type"] == "display_data" and "image/png" in o["data"]]
    assert len(images) == 1
    assert base64.b64decode(images[0]["data"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
    # shown once: the figure is closed after the cell
    status, outputs = _cell(svc, owner, rt.id, "1")
    assert not [o for o in outputs if o["output_type"] == "display_data"]
    # a Figure as the value of the last expression is a PNG result too
    status, outputs = _cell(svc, owner, rt.id, "fig, ax = plt.subplots()\nplt.close(fig)\nfig")
    [result] = [o for o in outputs if o["output_type"] == "execute_result"]
    assert "image/png" in result["data"] and result["data"]["text/plain"].startswith("<Figure")
