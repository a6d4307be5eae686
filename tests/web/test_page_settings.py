"""A runtime's settings panel, as a person uses it, in headless Chromium against ``envctl serve``
on Docker: variables (with the image's inherited ones), a secret by reference, mounts, machine
type, CUDA version and idle timeout set in the page and kept; a change that needs a reboot made
while the runtime runs shown as pending until the next boot; an error shown next to its field
with nothing typed lost.

Each test makes its own runtime and deletes it, so the runtime of test_page.py stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.server import Server
from tests.web.conftest import EXPECTED_CONSOLE, Browser
from tests.web.test_page import TIMEOUT, open_runtime, sign_in

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TEAM = "webteam"
SECRET = "db-pass"
SECRET_VALUE = "s3cr3t-value-never-on-the-page"


@pytest.fixture(scope="module")
def api(web_server: Server) -> Iterator[httpx.Client]:
    with web_server.client() as client:
        resp = client.post("/teams", json={"name": TEAM})
        assert resp.status_code in (201, 409), resp.text
        resp = client.put(f"/teams/{TEAM}/secrets/{SECRET}", json={"value": SECRET_VALUE})
        assert resp.status_code in (200, 201), resp.text
        yield client


@pytest.fixture
def runtime(api: httpx.Client, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    name = request.node.name.removeprefix("test_")[:40].replace("_", "-").strip("-")
    resp = api.post("/runtimes", json={"environment": "python3", "name": name, "idle_timeout": 0})
    assert resp.status_code == 201, resp.text
    rt = dict(resp.json())
    try:
        yield rt
    finally:
        api.delete(f"/runtimes/{rt['id']}")


def panel_shot(b: Browser, what: str) -> None:
    """A screenshot of the settings panel alone (it sits below the fold of the page)."""
    b.step += 1
    b.page.locator("section.card:has(#settings)").screenshot(path=str(b.shots / f"{b.test}-{b.step:02d}-{what}.png"))


def add_variable(b: Browser, name: str, value: str | None = None, secret: str | None = None) -> None:
    page = b.page
    page.click("#add-variable")
    row = page.locator("#env-rows .env-row").last
    row.locator("input.env-name").fill(name)
    if secret is not None:
        row.locator("select.env-kind").select_option("secret")
        row.locator("select.env-secret").select_option(secret)
    else:
        row.locator("input.env-value").fill(value or "")


def add_mount(b: Browser, kind: str, target: str, **fields: str | bool) -> None:
    page = b.page
    page.click("#add-mount")
    row = page.locator("#mount-rows .mount-row").last
    row.locator("select.mount-type").select_option(kind)
    row.locator("input.mount-target").fill(target)
    for key, value in fields.items():
        box = row.locator(f".mount-{key}")
        if isinstance(value, bool):
            box.set_checked(value)
        else:
            box.fill(value)


def apply(b: Browser) -> str:
    b.page.click("#apply-settings")
    b.page.wait_for_selector("#settings-status:not(:empty)", timeout=TIMEOUT)
    return str(b.page.inner_text("#settings-status"))


def variables_shown(b: Browser) -> dict[str, str]:
    """The variables rows as the page shows them: NAME -> value, or "secret TEAM/NAME"."""
    return dict(
        b.page.evaluate(
            """() => [...document.querySelectorAll('#env-rows .env-row')].map(r => [
                r.querySelector('.env-name').value,
                r.querySelector('.env-kind').value === 'secret'
                  ? 'secret ' + r.querySelector('.env-secret').value
                  : r.querySelector('.env-value').value])"""
        )
    )


def test_settings_set_on_a_stopped_runtime_are_kept_after_a_reload(
    browser: Browser, api: httpx.Client, runtime: dict[str, Any]
) -> None:
    sign_in(browser)
    open_runtime(browser, runtime)
    page = browser.page
    page.wait_for_selector("#settings select[name=machine_type] option[value=gpu-small]", state="attached")
    add_variable(browser, "GREETING", "hello <b>world</b>")
    add_variable(browser, "DB_PASSWORD", secret=f"{TEAM}/{SECRET}")
    add_mount(browser, "volume", "/home/data", name="web-data", read_only=True)
    add_mount(browser, "s3", "/data", bucket="web-bucket", prefix="raw/", writeback=True)
    page.select_option("#settings select[name=machine_type]", "gpu-small")
    assert page.is_enabled("#settings select[name=cuda]")
    page.select_option("#settings select[name=cuda]", "12.2")
    page.fill("#settings input[name=idle_timeout]", "900")
    panel_shot(browser, "typed")
    assert apply(browser) == "Settings saved."

    rt = api.get(f"/runtimes/{runtime['id']}").json()
    assert rt["env"] == {"GREETING": "hello <b>world</b>", "DB_PASSWORD": {"secret": SECRET, "team": TEAM}}
    assert rt["machine_type"] == "gpu-small" and rt["cuda"] == "12.2" and rt["idle_timeout"] == 900
    assert rt["mounts"] == [
        {"type": "volume", "target": "/home/data", "name": "web-data", "read_only": True},
        {"type": "s3", "target": "/data", "bucket": "web-bucket", "prefix": "raw/", "writeback": True},
    ]
    assert rt["pending"] == {}

    page.reload()
    page.wait_for_selector("#env-rows .env-row >> nth=1")
    page.wait_for_selector("#settings select[name=cuda] option[value='12.2']", state="attached")
    assert variables_shown(browser) == {"DB_PASSWORD": f"secret {TEAM}/{SECRET}", "GREETING": "hello <b>world</b>"}
    assert page.input_value("#settings select[name=machine_type]") == "gpu-small"
    assert page.input_value("#settings select[name=cuda]") == "12.2"
    assert page.input_value("#settings input[name=idle_timeout]") == "900"
    mounts = page.locator("#mount-rows .mount-row")
    assert mounts.count() == 2
    assert mounts.nth(0).locator("select.mount-type").input_value() == "volume"
    assert mounts.nth(0).locator(".mount-name").input_value() == "web-data"
    assert mounts.nth(0).locator(".mount-read_only").is_checked()
    assert mounts.nth(1).locator(".mount-bucket").input_value() == "web-bucket"
    assert mounts.nth(1).locator(".mount-prefix").input_value() == "raw/"
    assert mounts.nth(1).locator(".mount-writeback").is_checked()
    assert page.locator("#pending .pending").count() == 0
    assert SECRET_VALUE not in page.content()  # the value is neither shown nor in any attribute
    panel_shot(browser, "kept-after-reload")

    # remove one variable and one mount, back to a CPU machine without CUDA
    page.locator("#env-rows .env-row", has=page.locator("input.env-name[value=GREETING]")).locator(
        "button.remove"
    ).click()
    mounts.nth(1).locator("button.remove").click()
    page.select_option("#settings select[name=machine_type]", "small")
    page.select_option("#settings select[name=cuda]", "")
    assert apply(browser) == "Settings saved."
    rt = api.get(f"/runtimes/{runtime['id']}").json()
    assert rt["env"] == {"DB_PASSWORD": {"secret": SECRET, "team": TEAM}}
    assert [m["type"] for m in rt["mounts"]] == ["volume"]
    assert rt["machine_type"] == "small" and rt["cuda"] is None
    assert page.is_disabled("#settings select[name=cuda]")  # CUDA is for GPU machine types

    # in a narrow window the panel folds into one column, nothing sticks out
    page.set_viewport_size({"width": 400, "height": 860})
    page.wait_for_timeout(100)
    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    panel_shot(browser, "narrow")


def test_a_reboot_field_changed_while_running_is_shown_as_pending_until_the_next_boot(
    browser: Browser, api: httpx.Client, runtime: dict[str, Any]
) -> None:
    resp = api.post(f"/runtimes/{runtime['id']}/start", params={"wait": 60})
    assert resp.status_code == 202 and resp.json()["state"] == "running", resp.text
    sign_in(browser)
    open_runtime(browser, runtime)
    page = browser.page
    page.wait_for_selector("#state:has-text('running')", timeout=TIMEOUT)
    page.wait_for_selector("#settings select[name=machine_type] option[value=medium]", state="attached")
    page.select_option("#settings select[name=machine_type]", "medium")
    add_variable(browser, "STAGE", "next")
    page.fill("#settings input[name=idle_timeout]", "600")
    assert apply(browser) == "Saved; variables, machine type wait for the next boot."

    rt = api.get(f"/runtimes/{runtime['id']}").json()
    assert rt["machine_type"] == "small" and rt["env"] == {}
    assert rt["pending"] == {"machine_type": "medium", "env": {"STAGE": "next"}}
    assert rt["idle_timeout"] == 600  # applies at once

    page.reload()
    page.wait_for_selector("#pending .pending")
    assert "small → medium" in page.inner_text("#pending li[data-item=machine_type]")
    assert "STAGE = next" in page.inner_text("#pending li[data-item=env]")
    assert page.locator("[data-field=machine_type] [data-pending=machine_type]").inner_text() == "next boot"
    assert page.input_value("#settings select[name=machine_type]") == "medium"  # what it will be
    assert variables_shown(browser) == {"STAGE": "next"}
    panel_shot(browser, "pending")

    # the next boot applies them; the page follows live, without a reload
    assert api.post(f"/runtimes/{runtime['id']}/stop", params={"wait": 30}).json()["state"] == "stopped"
    assert api.post(f"/runtimes/{runtime['id']}/start", params={"wait": 60}).json()["state"] == "running"
    page.wait_for_selector("#pending:empty", state="attached", timeout=TIMEOUT)
    page.wait_for_selector(".runtime-head .facts:has-text('medium')", timeout=TIMEOUT)
    assert page.locator("[data-pending]").count() == 0
    assert api.get(f"/runtimes/{runtime['id']}").json()["machine_type"] == "medium"
    api.post(f"/runtimes/{runtime['id']}/stop", params={"wait": 30})


def test_a_bad_variable_name_shows_the_422_next_to_it_and_keeps_what_was_typed(
    browser: Browser, api: httpx.Client, runtime: dict[str, Any]
) -> None:
    EXPECTED_CONSOLE.add("status of 422 (Unprocessable Entity)")
    sign_in(browser)
    open_runtime(browser, runtime)
    page = browser.page
    page.wait_for_selector("#settings select[name=machine_type] option[value=large]", state="attached")
    add_variable(browser, "GOOD", "kept")
    add_variable(browser, "1BAD", "typed value")
    add_mount(browser, "git", "/mnt/code", url="https://example.invalid/repo.git", ref="main")
    page.fill("#settings input[name=idle_timeout]", "1234")
    page.select_option("#settings select[name=machine_type]", "large")
    status = apply(browser)
    assert status == "Not saved (invalid_input): see the field marked in red.", status
    bad = page.locator("#env-rows .env-row").nth(1)
    assert "not a variable name" in bad.locator(".field-error").inner_text()
    assert bad.get_attribute("class") == "env-row invalid"
    assert page.locator("#env-rows .env-row").nth(0).locator(".field-error").inner_text() == ""
    panel_shot(browser, "bad-variable")
    # nothing typed is lost, and nothing was changed
    assert variables_shown(browser) == {"GOOD": "kept", "1BAD": "typed value"}
    assert page.input_value("#settings input[name=idle_timeout]") == "1234"
    assert page.input_value("#settings select[name=machine_type]") == "large"
    assert page.locator("#mount-rows .mount-url").input_value() == "https://example.invalid/repo.git"
    rt = api.get(f"/runtimes/{runtime['id']}").json()
    assert rt["env"] == {} and rt["idle_timeout"] == 0 and rt["machine_type"] == "small" and rt["mounts"] == []

    # the name fixed, the mount's target is the next problem: shown next to the target
    bad.locator("input.env-name").fill("NOT_BAD")
    page.locator("#mount-rows .mount-target").fill("/etc/app")
    status = apply(browser)
    assert status == "Not saved (invalid_input): see the field marked in red.", status
    mount_error = page.locator("#mount-rows .mount-row .mount-error").inner_text()
    assert "/etc" in mount_error and "mounts[0].target" not in mount_error
    assert page.locator("#mount-rows .mount-target").get_attribute("class") == "mount-target invalid"
    assert page.locator("#mount-rows .mount-url").get_attribute("class") == "mount-url"
    assert bad.locator(".field-error").inner_text() == ""
    panel_shot(browser, "bad-mount-target")

    # an idle timeout out of range: the API's own validation, next to the field
    page.locator("#mount-rows .mount-row button.remove").click()
    page.fill("#settings input[name=idle_timeout]", "99999999")
    apply(browser)
    assert "less than or equal" in page.inner_text("[data-field=idle_timeout] .field-error")
    page.fill("#settings input[name=idle_timeout]", "1234")
    assert apply(browser) == "Settings saved."
    rt = api.get(f"/runtimes/{runtime['id']}").json()
    assert rt["env"] == {"GOOD": "kept", "NOT_BAD": "typed value"}
    assert rt["idle_timeout"] == 1234 and rt["machine_type"] == "large"

    # a name given twice is caught before anything is sent
    add_variable(browser, "GOOD", "again")
    assert apply(browser) == "Nothing was sent: see the fields marked in red."
    twice = page.locator("#env-rows .env-row").last
    assert twice.locator(".field-error").inner_text() == "GOOD is here twice"
    assert twice.get_attribute("class") == "env-row invalid"
    assert api.get(f"/runtimes/{runtime['id']}").json()["env"] == {"GOOD": "kept", "NOT_BAD": "typed value"}


def test_show_inherited_lists_the_variables_of_the_environments_image(
    browser: Browser, api: httpx.Client, runtime: dict[str, Any]
) -> None:
    assert (
        api.patch(f"/runtimes/{runtime['id']}", json={"env": {"PATH": "/opt/tools:/usr/bin:/bin"}}).status_code == 200
    )
    sign_in(browser)
    open_runtime(browser, runtime)
    page = browser.page
    page.wait_for_selector("#env-rows .env-row")
    assert page.is_hidden("#inherited")
    page.check("#show-inherited")
    lang = page.locator("#inherited tr[data-name=LANG]")
    lang.wait_for(timeout=TIMEOUT)
    assert lang.inner_text().split() == ["LANG", "C.UTF-8"]
    assert "python3@1" in page.inner_text("#inherited")
    # the image's PATH is shown, struck through: the runtime's own wins, and its row says so
    path = page.locator("#inherited tr[data-name=PATH]")
    assert path.get_attribute("class") == "overridden"
    assert "/usr/local/bin:" in path.inner_text() and "/opt/tools" not in path.inner_text()
    assert page.locator("#env-rows .env-row .overrides").is_visible()
    panel_shot(browser, "inherited")
    page.uncheck("#show-inherited")
    assert page.is_hidden("#inherited")
