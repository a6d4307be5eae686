"""The page's nodes view and the node beside each runtime (issue 15 item 7), on the local Docker
backend: one node, the engine, with the runtimes it runs."""

from __future__ import annotations

import pytest

from tests.web.conftest import Browser
from tests.web.test_page import TIMEOUT, running, sign_in

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_the_nodes_view_shows_the_engine_its_health_capacity_and_runtimes(browser: Browser) -> None:
    with browser.server.client() as api:
        resp = api.post("/runtimes", json={"environment": "python3", "name": "on-node", "idle_timeout": 0})
        assert resp.status_code == 201, resp.text
        rt = resp.json()
        running(api, rt)
        [node] = api.get("/nodes").json()
        assert node["role"] == "engine" and rt["id"] in node["runtimes"]
        sign_in(browser)
        page = browser.page
        page.click("#nav a[data-nav=nodes]")
        page.wait_for_selector("table.nodes tbody tr", timeout=TIMEOUT)
        row = page.locator(f"table.nodes tr[data-node='{node['name']}']")
        assert "ready / active" in row.locator("td.health").inner_text()
        assert "CPU" in row.inner_text()
        page.wait_for_selector(f"table.nodes td.runs a[href='#/runtimes/{rt['id']}']", timeout=TIMEOUT)
        # the server is shared by the module's tests: other runtimes may run on the node too
        assert "on-node" in [name.strip() for name in row.locator("td.runs").inner_text().split(",")]
        browser.shot("nodes")
        page.click(f"table.nodes td.runs a[href='#/runtimes/{rt['id']}']")
        page.wait_for_selector("#runtime-name")
        api.delete(f"/runtimes/{rt['id']}")


def test_a_runtime_without_a_node_shows_none(browser: Browser) -> None:
    with browser.server.client() as api:
        rt = api.post("/runtimes", json={"environment": "python3", "name": "nodeless"}).json()
        assert api.get(f"/runtimes/{rt['id']}").json()["node"] is None
        sign_in(browser)
        browser.page.wait_for_selector(f"tr[data-id='{rt['id']}']")
        assert browser.page.locator(f"tr[data-id='{rt['id']}'] .node").count() == 0
        api.delete(f"/runtimes/{rt['id']}")
