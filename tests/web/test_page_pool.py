"""The page's "Warm pool" section in hot mode (issue 17 item 1): a version booted in the last
hour is listed with why it is pooled ("hot: N boots in the last hour") and its waiting container.
A server of its own (``ENVCTL_RUNNER_POOL_HOT``), the shared browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.conftest import remove_runner_containers, start_server
from tests.runner.runtimes.test_pool_docker import boot_and_stop, wait_hot
from tests.web.conftest import EXPECTED_CONSOLE, Browser
from tests.web.test_page import TIMEOUT, sign_in

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def hot_server(docker: Any, tmp_path: Path) -> Iterator[Server]:
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path / "data", ENVCTL_RUNNER_POOL_HOT="3g")
    yield srv
    remove_runner_containers(docker, srv)


def test_the_pool_view_says_why_a_hot_version_is_kept_warm(
    browser_context: Any, hot_server: Server, shots: Path
) -> None:
    with hot_server.client() as api:
        for i in range(2):
            boot_and_stop(api, f"py{i}")
        wait_hot(api, "python3@1", 2)
    page = browser_context.new_page()
    b = Browser(page, hot_server, shots, "pool_view_hot")
    page.on("console", lambda m: b.console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    try:
        sign_in(b)
        b.goto("#/")
        row = page.locator("#pool table.pool tbody tr").first
        row.wait_for(timeout=TIMEOUT)
        cells = [c.strip() for c in row.locator("td").all_inner_texts()]
        assert cells == ["python3@1", "python3@1", "small", "hot: 2 boots in the last hour", "1 of 1", "0"], cells
        assert "hot mode budget" in page.locator("#pool").inner_text()
        b.shot("pool-hot")
        assert b.errors() == [], b.console
    finally:
        page.close()
        EXPECTED_CONSOLE.clear()
