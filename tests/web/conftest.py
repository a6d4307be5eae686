"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright for
Python; no browser is downloaded) against a real ``envctl serve`` on the Docker engine.

One server and one browser serve the whole session (CI time). Every page a test opens records
its console: an error there fails the test. Each step writes a screenshot into one folder,
printed at the end of the run (``ENVCTL_WEB_SCREENSHOTS`` chooses it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from envs.kit.db import Database
from registry import users as registry_service
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import base_image, need

CHROMIUM = os.environ.get("ENVCTL_WEB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("ENVCTL_WEB_SCREENSHOTS") or Path(tempfile.gettempdir()) / f"envctl-web-{TEST_SESSION}")
# Console errors a test provokes on purpose, by a piece of their text: Chromium reports every
# API answer >= 400 as "Failed to load resource", and each script a sandboxed frame refused.
EXPECTED_CONSOLE: set[str] = set()
# Docker adds and removes a network interface on this host for each container it starts or
# stops; Chromium takes that for a change of network and cuts its open requests (the page's
# event streams, which then reconnect), saying so in the console. Not the page's doing.
ALWAYS_EXPECTED = {"net::ERR_NETWORK_CHANGED"}


# Figures the tests measured, printed at the end of the run: "what: value".
FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SHOTS.is_dir() and any(SHOTS.iterdir()):
        terminalreporter.write_sep("-", "web page screenshots")
        terminalreporter.write_line(f"{len(list(SHOTS.glob('*.png')))} screenshots in {SHOTS}")
    for figure in FIGURES:
        terminalreporter.write_line(figure)


@pytest.fixture(scope="session")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


@pytest.fixture(scope="session")
def web_server(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``envctl serve`` on the Docker engine, its containers and images labelled for cleanup."""
    base_image(docker, "python3")  # fail (CI) or skip early, naming what is missing
    data = tmp_path_factory.mktemp("web-server") / "data"
    prepare_data_dir(data, ["python3"])
    runner = f"test-{TEST_SESSION}-web-{uuid.uuid4().hex[:6]}"
    cuda_root = tmp_path_factory.mktemp("cuda")  # a host "with" CUDA 12.2, for the settings panel
    (cuda_root / "cuda-12.2").mkdir()
    srv = Server(
        data,
        env={
            "ENVCTL_RUNNER_NAME": runner,
            "ENVCTL_RUNNER_LABELS": f"{TEST_LABEL}={TEST_SESSION}",
            "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.5",
            "ENVCTL_RUNNER_CUDA_ROOT": str(cuda_root),
            "ENVCTL_RUNNER_APP_TEAMS": "webapps",  # the apps view's tests (test_page_apps.py)
        },
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        for c in docker.containers.list(all=True, filters={"label": f"envctl.runner={runner}"}):
            c.remove(force=True)


def user_token(srv: Server, name: str) -> str:
    """A token of a new ordinary user of the server's database (runtimes are per user)."""
    db = Database(f"sqlite:///{srv.data_dir / 'envctl.db'}")
    try:
        with db.session() as s:
            return registry_service.issue_token(s, registry_service.create_user(s, name), "web tests")
    finally:
        db.dispose()


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the session, on a fresh profile directory."""
    if not Path(CHROMIUM).exists():
        need(f"{CHROMIUM} is missing; scripts/setup installs Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright (Python) is missing; pip install -e '.[test]'")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 860},
        )
        try:
            yield context
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Browser:
    """One page of the shared browser, its console recorded, screenshots by step."""

    page: Any
    server: Server
    shots: Path
    test: str
    console: list[str] = field(default_factory=list)
    step: int = 0

    def goto(self, hash_route: str = "") -> None:
        self.page.goto(self.server.url + "/" + hash_route)

    def shot(self, what: str) -> Path:
        self.step += 1
        path = self.shots / f"{self.test}-{self.step:02d}-{what}.png"
        self.page.screenshot(path=str(path))
        return path

    def errors(self) -> list[str]:
        expected = EXPECTED_CONSOLE | ALWAYS_EXPECTED
        return [m for m in self.console if not any(piece in m for piece in expected)]


@pytest.fixture
def browser(browser_context: Any, web_server: Server, shots: Path, request: pytest.FixtureRequest) -> Iterator[Browser]:
    page = browser_context.new_page()
    b = Browser(page, web_server, shots, request.node.name.removeprefix("test_"))
    page.on("console", lambda m: b.console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: b.console.append(f"pageerror: {e}"))
    try:
        yield b
        errors = b.errors()
    finally:
        page.close()
        EXPECTED_CONSOLE.clear()
    assert errors == [], f"console errors on the page: {errors}"
