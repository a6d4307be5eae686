"""The page's apps view (issue 16 item 5): each app of the caller's teams with a state dot per
instance, its deployments (who deployed what, when, on which version) and its output, live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.web.conftest import Browser
from tests.web.test_page import TIMEOUT, admin_token, sign_in

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CELL = """
import http.server, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
s = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H)
threading.Thread(target=s.serve_forever, daemon=True).start()
print("hello from the app")
"""


def test_the_apps_view_shows_each_instance_its_deployments_and_output(browser: Browser, tmp_path: Path) -> None:
    srv = browser.server
    with srv.client() as api:
        made = api.post("/teams", json={"name": "webapps"})
        assert made.status_code in (201, 409), made.text
    nb = tmp_path / "hello.ipynb"
    cell = {"cell_type": "code", "id": "a", "metadata": {}, "source": CELL, "outputs": [], "execution_count": None}
    nb.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [cell]}))
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "app", "deploy", str(nb), "--team", "webapps", "--name", "hello",
         "--url", srv.url, "--token", admin_token(srv)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        sign_in(browser)
        page = browser.page
        page.click("#nav a[data-nav=apps]")
        card = "section.app[data-app='webapps/hello']"
        page.wait_for_selector(f"{card} .instances .dot[data-state=running]", timeout=TIMEOUT)
        row = page.locator(f"{card} table.deployments tr[data-number='1']")
        assert "running" in row.inner_text() and "admin" in row.inner_text() and "python3@1" in row.inner_text()
        page.wait_for_function(
            f"document.querySelector(\"{card} pre.app-output\").textContent.includes('hello from the app')",
            timeout=TIMEOUT,
        )
        assert page.locator(f"{card} h2 a").get_attribute("href") == "/apps/webapps/hello/"
        browser.shot("apps")
    finally:
        with srv.client() as api:
            api.delete("/teams/webapps/apps/hello")
