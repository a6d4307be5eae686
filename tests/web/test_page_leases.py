"""The lease marker in the page's runtime list (issue 15 item 6): a runtime tied to its client's
lease says so, with when it goes unless renewed; one without a lease shows nothing."""

from __future__ import annotations

import pytest

from tests.web.conftest import Browser
from tests.web.test_page import TIMEOUT, sign_in

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_a_lease_runtime_is_marked_in_the_list_and_a_plain_one_is_not(browser: Browser) -> None:
    with browser.server.client() as api:
        leased = api.post("/runtimes", json={"environment": "python3", "name": "leased", "lease": 3600}).json()
        plain = api.post("/runtimes", json={"environment": "python3", "name": "unleased"}).json()
        try:
            sign_in(browser)
            page = browser.page
            page.wait_for_selector(f"tr[data-id='{leased['id']}'] .badge.lease", timeout=TIMEOUT)
            marker = page.locator(f"tr[data-id='{leased['id']}'] .badge.lease")
            assert marker.inner_text() == "lease"
            title = marker.get_attribute("title") or ""
            assert "unless its client renews its 3600 s lease" in title, title
            assert "a running cell does not keep it" in title
            assert page.locator(f"tr[data-id='{plain['id']}'] .badge.lease").count() == 0
            browser.shot("lease-marker")
        finally:
            api.delete(f"/runtimes/{leased['id']}")
            api.delete(f"/runtimes/{plain['id']}")
