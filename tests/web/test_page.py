"""The page as a person uses it, in headless Chromium against ``envctl serve`` on Docker.

The tests share one server and one runtime (``demo``); they run in file order and each one
brings the runtime to what it needs, so any one of them also runs alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.server import Server
from tests.web.conftest import EXPECTED_CONSOLE, FIGURES, Browser, user_token

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TIMEOUT = 60_000  # ms; a Docker boot on a busy CI machine


def admin_token(srv: Server) -> str:
    return (srv.data_dir / "admin-token").read_text().strip()


@pytest.fixture(scope="module")
def api(web_server: Server) -> Iterator[httpx.Client]:
    with web_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def demo(api: httpx.Client) -> dict[str, Any]:
    resp = api.post("/runtimes", json={"environment": "python3", "name": "demo", "idle_timeout": 0})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def running(api: httpx.Client, rt: dict[str, Any]) -> None:
    resp = api.post(f"/runtimes/{rt['id']}/start", params={"wait": 60})
    assert resp.status_code in (202, 409), resp.text
    assert api.get(f"/runtimes/{rt['id']}").json()["state"] == "running"


def sign_in(b: Browser, token: str | None = None) -> None:
    b.goto()
    b.page.evaluate("t => localStorage.setItem('envctl.token', t)", token or admin_token(b.server))
    b.page.reload()
    b.page.wait_for_selector("#nav:not([hidden])")


def open_runtime(b: Browser, rt: dict[str, Any]) -> None:
    b.goto(f"#/runtimes/{rt['id']}")
    b.page.wait_for_selector("#runtime-name")


def run_cell(b: Browser, code: str, language: str = "python") -> Any:
    """Type a cell and run it with Shift-Enter; returns the new cell's element."""
    page = b.page
    # the console's first listing of earlier cells must be in before counting, or it is taken for the new cell
    page.wait_for_selector("#cells[data-loaded=true]", state="attached", timeout=TIMEOUT)
    before = page.locator("#cells article.cell").count()
    page.select_option("#language", language)
    page.fill("#code", code)
    page.press("#code", "Shift+Enter")
    page.wait_for_function("n => document.querySelectorAll('#cells article.cell').length > n", arg=before)
    new_id = page.locator("#cells article.cell").first.get_attribute("data-id")
    return page.locator(f"#cells article.cell[data-id='{new_id}']")


def finished(cell: Any) -> str:
    cell.locator("[data-status=ok], [data-status=error], [data-status=interrupted]").first.wait_for(timeout=TIMEOUT)
    return str(cell.get_attribute("data-status"))


def test_sign_in_with_a_token_that_stays_out_of_the_address(browser: Browser) -> None:
    page = browser.page
    browser.page.goto(browser.server.url + "/")
    page.evaluate("localStorage.clear()")
    page.reload()
    page.wait_for_selector("form.sign-in")
    browser.shot("sign-in")
    EXPECTED_CONSOLE.add("status of 401 (Unauthorized)")
    page.fill("#token", "not-a-token")
    page.click("#sign-in")
    page.wait_for_selector("form.sign-in .error:not(:empty)")
    assert "unauthorized" in page.inner_text("form.sign-in .error").lower() or "token" in page.inner_text(
        "form.sign-in .error"
    )
    page.fill("#token", admin_token(browser.server))
    page.click("#sign-in")
    page.wait_for_selector("table.runtimes")
    browser.shot("signed-in")
    assert admin_token(browser.server) not in page.url
    assert page.evaluate("localStorage.getItem('envctl.token')") == admin_token(browser.server)


def test_a_runtime_goes_gray_yellow_green_live_after_start(browser: Browser, api: httpx.Client, demo: Any) -> None:
    sign_in(browser)
    page = browser.page
    api.post(f"/runtimes/{demo['id']}/stop", params={"wait": 30})
    row = f"tr[data-id='{demo['id']}']"
    page.wait_for_selector(f"{row} .dot[data-state=stopped]")
    assert "dot-gray" in str(page.get_attribute(f"{row} .dot", "class"))
    browser.shot("stopped-gray")
    # Record every state the row's dot shows, as the page draws it.
    page.evaluate(
        """row => {
            window.seen = [];
            const note = () => {
              const d = document.querySelector(row + ' .dot');
              if (d && d.dataset.state !== window.seen.at(-1)) window.seen.push(d.dataset.state);
            };
            note();
            new MutationObserver(note).observe(document.querySelector('table.runtimes tbody'),
                                               {subtree: true, childList: true, attributes: true});
        }""",
        row,
    )
    page.click(f"{row} button[data-action=start]")
    page.wait_for_selector(f"{row} .dot[data-state=booting]", timeout=TIMEOUT)
    browser.shot("booting-yellow")
    page.wait_for_selector(f"{row} .dot[data-state=running]", timeout=TIMEOUT)
    browser.shot("running-green")
    seen = page.evaluate("window.seen")
    assert seen[:3] == ["stopped", "booting", "running"], seen
    assert "dot-green" in str(page.get_attribute(f"{row} .dot", "class"))


def test_a_cell_shows_its_lines_one_by_one_and_the_runner_log(browser: Browser, api: httpx.Client, demo: Any) -> None:
    running(api, demo)
    sign_in(browser)
    open_runtime(browser, demo)
    page = browser.page
    page.wait_for_selector("#log li.log-running")
    page.evaluate(
        """() => {
            window.texts = [];
            new MutationObserver(() => {
              const out = document.querySelector('#cells article.cell .outputs');
              if (out) window.texts.push([performance.now(), out.innerText]);
            }).observe(document.querySelector('#cells'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    cell = run_cell(browser, "import time\nfor i in range(4):\n    print(f'line {i}', flush=True)\n    time.sleep(0.4)")
    page.wait_for_function("() => document.querySelector('#cells article.cell .outputs').innerText.includes('line 1')")
    browser.shot("cell-streaming")
    assert finished(cell) == "ok"
    browser.shot("cell-done")
    texts = page.evaluate("window.texts")
    seen = [t for _, t in texts]
    partial = [t for t in seen if "line 0" in t and "line 3" not in t]
    assert partial, seen  # the first line was on the page before the last one was printed
    first = next(at for at, t in texts if "line 0" in t)
    last = next(at for at, t in texts if "line 3" in t)
    assert last - first > 800, texts  # lines arrived as printed, 0.4 s apart, not all at the end
    assert cell.locator(".outputs").inner_text().split() == ["line", "0", "line", "1", "line", "2", "line", "3"]


def test_an_error_cell_shows_its_traceback(browser: Browser, api: httpx.Client, demo: Any) -> None:
    running(api, demo)
    sign_in(browser)
    open_runtime(browser, demo)
    cell = run_cell(browser, "def f():\n    return 1 / 0\n\nf()")
    assert finished(cell) == "error"
    assert cell.count() == 1  # one card per execution, even when the first listing already held it
    text = cell.locator(".error-output").inner_text()
    assert "ZeroDivisionError" in text and "division by zero" in text
    assert "f()" in text and "\x1b[" not in text  # the traceback, without terminal colours
    browser.shot("traceback")
    long = run_cell(browser, "import time\nprint('waiting', flush=True)\ntime.sleep(60)")
    long.locator("pre.stream").wait_for()
    browser.page.click("#interrupt")
    assert finished(long) == "interrupted"
    browser.shot("interrupted")


def test_unsaved_changes_show_after_a_cell_writes_a_file_and_go_with_reset(
    browser: Browser, api: httpx.Client, demo: Any
) -> None:
    running(api, demo)
    sign_in(browser)
    open_runtime(browser, demo)
    page = browser.page
    page.wait_for_selector("#no-changes, #unsaved")
    cell = run_cell(browser, "echo hello > /root/notes.txt && echo written", language="bash")
    assert finished(cell) == "ok"
    page.wait_for_selector("#unsaved", timeout=TIMEOUT)
    assert "/root/notes.txt" in page.inner_text("table.changes")
    browser.shot("unsaved-changes")
    page.click("#reset-changes")
    # The reset's boot, live in the log (its booting state can pass quicker than a frame)
    page.wait_for_selector("#log li.log-running >> nth=1", timeout=TIMEOUT)
    page.wait_for_selector("#state:has-text('running')", timeout=TIMEOUT)
    page.wait_for_selector("#no-changes", timeout=TIMEOUT)
    browser.shot("after-reset")


def test_a_save_appears_in_the_lineage_tree_under_its_parent(browser: Browser, api: httpx.Client, demo: Any) -> None:
    running(api, demo)
    sign_in(browser)
    open_runtime(browser, demo)
    page = browser.page
    run_cell(browser, "mkdir -p /opt/tool && echo v1 > /opt/tool/VERSION", language="bash")
    page.wait_for_selector("#unsaved", timeout=TIMEOUT)
    page.fill("form.save input[name=environment]", "web-tools")
    page.fill("form.save input[name=message]", "tools <script>window.pwned = 1</script>")
    page.fill("form.save input[name=tag]", "stable")
    page.click("form.save button[type=submit]")
    page.wait_for_selector("#error.ok:has-text('Saved')", timeout=TIMEOUT)
    browser.goto("#/environments")
    page.wait_for_selector("table.environments a:has-text('web-tools')")
    browser.shot("environments")
    page.click("table.environments a:has-text('web-tools')")
    page.wait_for_selector("#lineage")
    assert page.url.endswith("#/environments/web-tools")
    tree = page.locator("#lineage")
    # bash@1 > python3@1 > web-tools@1, each nested under its parent
    nested = tree.locator("li[data-ref='bash@1'] li[data-ref='python3@1'] li[data-ref='web-tools@1']")
    assert nested.count() == 1
    assert "stable" in nested.inner_text()
    assert "tools <script>window.pwned = 1</script>" in nested.inner_text()
    assert page.evaluate("window.pwned") is None
    browser.shot("lineage-tree")


def test_script_in_names_and_outputs_shows_as_text(browser: Browser, api: httpx.Client, demo: Any) -> None:
    running(api, demo)
    sign_in(browser)
    page = browser.page
    EXPECTED_CONSOLE.add("status of 422 (Unprocessable Entity)")
    page.fill("form.create input[name=name]", "<script>window.pwned=1</script>")
    page.click("form.create button[type=submit]")
    page.wait_for_selector("#error:not(:empty)")
    assert page.inner_text("#error").startswith("invalid_input") or ":" in page.inner_text("#error")
    browser.shot("bad-name-error")
    open_runtime(browser, demo)
    evil = "<script>window.pwned=2</script><img src=x onerror='window.pwned=3'>"
    html = "<script>window.pwned=4</script><b onclick='window.pwned=5'>bold</b><table><tr><td>cell</td></tr></table>"
    cell = run_cell(browser, f"print({evil!r})\nHTML({html!r})")
    assert finished(cell) == "ok"
    assert evil in cell.locator("pre.stream").inner_text()
    frame = cell.locator("iframe.html-output")
    assert frame.get_attribute("sandbox") == ""  # may run nothing, reach nothing of the page
    shown = frame.content_frame.locator("body")
    assert shown.inner_text().split() == ["bold", "cell"]
    assert "<script" not in str(frame.evaluate("f => f.srcdoc")) and "onclick" not in shown.inner_html()
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    browser.shot("script-as-text")


def test_addresses_back_button_and_a_narrow_window(browser: Browser, demo: Any) -> None:
    sign_in(browser)
    page = browser.page
    page.click(f"tr[data-id='{demo['id']}'] td.name a")
    page.wait_for_selector("#runtime-name")
    assert page.url.endswith(f"#/runtimes/{demo['id']}")
    page.go_back()
    page.wait_for_selector("table.runtimes")
    page.go_forward()
    page.wait_for_selector("#runtime-name")
    page.set_viewport_size({"width": 400, "height": 860})
    page.wait_for_timeout(100)
    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    browser.shot("narrow-runtime")
    browser.goto("")
    page.wait_for_selector("table.runtimes")
    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    browser.shot("narrow-list")


def test_sign_out_forgets_the_token(browser: Browser) -> None:
    sign_in(browser)
    browser.page.click("#sign-out")
    browser.page.wait_for_selector("form.sign-in")
    assert browser.page.evaluate("localStorage.getItem('envctl.token')") is None
    browser.page.reload()
    browser.page.wait_for_selector("form.sign-in")


def test_a_hundred_runtimes_are_listed_well_under_a_second(browser: Browser, web_server: Server) -> None:
    token = user_token(web_server, "many")
    with httpx.Client(base_url=web_server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        for i in range(100):
            resp = client.post("/runtimes", json={"environment": "python3", "name": f"rt-{i:03d}"})
            assert resp.status_code == 201, resp.text
    sign_in(browser, token)
    took = []
    for _ in range(3):
        browser.page.reload()
        browser.page.wait_for_function("() => document.querySelectorAll('table.runtimes tbody tr').length === 100")
        took.append(browser.page.evaluate("performance.now()"))
    browser.shot("hundred-runtimes")
    best = min(took)
    FIGURES.append(f"web page: 100 runtimes listed {best:.0f} ms after the page started loading (best of 3)")
    assert best < 1000, took


def test_two_versions_show_the_packages_the_second_adds(browser: Browser) -> None:
    sign_in(browser)
    browser.goto("#/environments/python3")
    page = browser.page
    page.wait_for_selector("#diff-compare")
    page.select_option("#diff-old", "bash@1")
    page.select_option("#diff-new", "python3@1")
    page.click("#diff-compare")
    added = page.locator("#packages-diff [data-kind=deb] li.added", has_text="+ python3 ")
    added.first.wait_for(timeout=TIMEOUT)
    assert page.locator("#packages-diff [data-kind=deb] li.removed").count() == 0
    browser.shot("packages-diff")


def test_a_download_or_upload_shows_its_bytes_beside_the_phase(browser: Browser) -> None:
    """What the list and the runtime show for a runtime whose phase moves bytes (a pull at
    boot, mounts being fetched, a push after a save): the state text the page renders."""
    sign_in(browser)
    shown = browser.page.evaluate(
        """async () => {
            const { stateText } = await import("/web/runtimes.js");
            const rt = (phase, progress) => ({ state: "booting", phase, progress, busy: false });
            return [
                stateText(rt("downloading", { done: 6000000, total: 200000000 })),
                stateText(rt("uploading", { done: 0, total: 0 })),
                stateText(rt("restoring", null)),
            ];
        }"""
    )
    assert shown == ["booting · downloading 6.0 MB of 200 MB (3%)", "booting · uploading", "booting · restoring"]
