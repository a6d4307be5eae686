"""Take the README's screenshots of the web page: ``python -m tests.web.readme_shots [DIR]``.

Starts ``envctl serve`` on the Docker engine with a throwaway data directory, makes a few
runtimes (one running with a cell run, one booting, others stopped), and writes
``web-runtimes.png``, ``web-runtime.png`` and ``web-settings.png`` (the running runtime's
settings panel, with changes waiting for its next boot) into DIR (default ``api/web/screenshots/``). Needs the built
base images and Debian's chromium, like tests/web.
"""

from __future__ import annotations

import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from tests.fixtures.server import Server, prepare_data_dir
from tests.web.conftest import CHROMIUM, CHROMIUM_ARGS

CELL = """import json, time
for step in ("load", "clean", "fit"):
    print(f"{step}: done", flush=True)
    time.sleep(0.3)
HTML("<b>score</b> 0.93")"""


def settings_shot(api: Any, rid: str, page: Any, path: Path) -> None:
    """The settings panel of a running runtime given variables, a secret, mounts and a bigger
    machine for its next boot, with the image's variables shown."""
    api.post("/teams", json={"name": "acme"})
    api.put("/teams/acme/secrets/db-pass", json={"value": "not-shown"})
    body = {
        "machine_type": "medium",
        "env": {"MODE": "report", "PATH": "/opt/tools/bin:/usr/bin:/bin", "DB_PASSWORD": {"secret": "acme/db-pass"}},
        "mounts": [
            {"type": "volume", "name": "acme/home-data", "target": "/home/data"},
            {"type": "s3", "bucket": "acme-raw", "prefix": "2024/", "target": "/data"},
        ],
        "next_boot": True,
    }
    api.patch(f"/runtimes/{rid}", json=body).raise_for_status()
    page.reload()
    page.wait_for_selector("#pending .pending")
    page.check("#show-inherited")
    page.wait_for_selector("#inherited tr[data-name=LANG]")
    page.locator("section.card:has(#settings)").screenshot(path=str(path))


def main(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_data_dir(data, ["python3"])
        runner = f"readme-{uuid.uuid4().hex[:6]}"
        srv = Server(data, env={"ENVCTL_RUNNER_NAME": runner, "ENVCTL_RUNNER_LABELS": "envctl.readme-shots=1"})
        srv.start()
        ids = []
        try:
            with srv.client() as api:
                for name, idle in (("analysis", 1800), ("etl-nightly", None), ("scratch", 600), ("reports", None)):
                    body = {"environment": "python3", "name": name, "idle_timeout": idle}
                    ids.append(api.post("/runtimes", json=body).json()["id"])
                api.post(f"/runtimes/{ids[0]}/start", params={"wait": 60})
                token = (data / "admin-token").read_text().strip()
                with sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                    page = browser.new_page(viewport={"width": 1180, "height": 700})
                    page.goto(srv.url + "/")
                    page.evaluate("t => localStorage.setItem('envctl.token', t)", token)
                    page.goto(srv.url + f"/#/runtimes/{ids[0]}")
                    page.wait_for_selector("#runtime-name")
                    page.fill("#code", CELL)
                    page.press("#code", "Shift+Enter")
                    page.wait_for_selector("#cells article.cell[data-status=ok]", timeout=60_000)
                    page.wait_for_selector("#state:not(:has-text('busy'))")
                    page.screenshot(path=str(out / "web-runtime.png"))
                    settings_shot(api, ids[0], page, out / "web-settings.png")
                    page.goto(srv.url + "/#/")
                    page.wait_for_selector("table.runtimes tbody tr")
                    api.post(f"/runtimes/{ids[2]}/start")
                    page.wait_for_selector(f"tr[data-id='{ids[2]}'] .dot[data-state=booting]", timeout=60_000)
                    page.set_viewport_size({"width": 1180, "height": 300})
                    page.screenshot(path=str(out / "web-runtimes.png"))
                    browser.close()
                for rid in ids:
                    api.delete(f"/runtimes/{rid}")
        finally:
            srv.stop()
    print(f"wrote {out / 'web-runtimes.png'}, {out / 'web-runtime.png'} and {out / 'web-settings.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("api/web/screenshots"))
