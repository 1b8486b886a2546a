"""The portal in a real browser: Debian's Chromium driven by Playwright against a real gunicorn
portal (`appliance serve`) on real rootless Podman. Log in, add a Space through the form and
watch its build log stream, use a Gradio and a Streamlit app inside the Space page's iframe,
open a Space page with the internet cut off, and save screenshots to tests/artifacts/.

The tests share one portal, one logged-in browser page and two Spaces, each made by a module
fixture when a test first needs it, so any one test runs alone (`-k`) as well as in order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from conftest import REPO, free_port, make_space_repo, silent_listener, wait_for
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from appliance import stages
from appliance.config import SETTINGS

pytestmark = pytest.mark.podman

ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ADMIN, PASSWORD = "admin", "correct horse battery"
GRADIO, STREAMLIT = "browser/shout", "browser/echo"
ERRORS = {stages.NO_APP_FILE, stages.CONFIG_ERROR, stages.BUILD_ERROR, stages.RUNTIME_ERROR}
SPACE_DEADLINE = 420  # a warm deploy takes 10-20 s; a cold SDK layer installs from PyPI
OFFLINE_LOAD_MS = 15_000

GRADIO_FILES = {
    "README.md": "---\ntitle: Shouter\nemoji: 📣\ncolorFrom: blue\ncolorTo: green\n"
                 "sdk: gradio\nsdk_version: 5.9.1\npython_version: 3.11\napp_file: app.py\n"
                 "short_description: Shouts back what you type\n---\n",
    "app.py": "import gradio as gr\n\n\n"
              "def shout(words: str) -> str:\n    return f'{words.upper()}!'\n\n\n"
              "demo = gr.Interface(fn=shout, inputs=gr.Textbox(label='Words'),\n"
              "                    outputs=gr.Textbox(label='Shouted'), title='Shouter',\n"
              "                    flagging_mode='never')\n\n"
              "if __name__ == '__main__':\n    demo.launch()\n",
}
STREAMLIT_FILES = {
    "README.md": "---\ntitle: Echo\nemoji: 🔁\ncolorFrom: purple\ncolorTo: yellow\n"
                 "sdk: streamlit\nsdk_version: 1.40.1\napp_file: app.py\n"
                 "short_description: Echoes what you type\n---\n",
    "app.py": "import streamlit as st\n\n"
              "said = st.text_input('Say something')\n"
              "if said:\n    st.write(f'Echo: {said}')\n",
}

# Records, from before the portal's own script runs, each change of the build log's <pre>,
# so the test can tell lines that streamed in from a log delivered in one piece.
LOG_WATCH = """
document.addEventListener("DOMContentLoaded", () => {
  const log = document.getElementById("log");
  if (!log) return;
  window.__logGrowth = [];
  new MutationObserver(() => window.__logGrowth.push(
    {t: Date.now(), lines: log.textContent.split("\\n").length})
  ).observe(log, {childList: true, characterData: true, subtree: true});
});
"""


# -- the portal, the browser, the network ----------------------------------------------------


@dataclass
class Portal:
    url: str
    env: dict[str, str]
    log: Path
    data_dir: Path
    sources: Path

    def cli(self, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run the `appliance` command with the portal's configuration."""
        result = subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=self.env,
                                input=stdin, capture_output=True, text=True, cwd=REPO,
                                timeout=300)
        if check:
            assert result.returncode == 0, (f"appliance {' '.join(args)} failed:\n"
                                            f"{result.stdout}\n{result.stderr}")
        return result

    def diagnostics(self) -> str:
        """The tails of the portal's and the workers' logs, for a failure message."""
        parts = []
        for path in (self.log, self.data_dir / "run" / "worker.log"):
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            parts.append(f"--- {path} (last lines) ---\n" + "\n".join(text.splitlines()[-30:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def portal(appliance_env):
    """A real gunicorn portal (`appliance serve`) with appliance_env's configuration, the way
    jobs.spawn_job hands configuration to a worker; Spaces deleted and gunicorn stopped after."""
    ctx, sources_dir = appliance_env
    config = ctx.config
    env = {**os.environ,
           **{f"APPLIANCE_{s.name.upper()}": str(config.values[s.name]) for s in SETTINGS},
           "APPLIANCE_CONFIG_FILE": "/nonexistent/appliance.toml"}
    port = free_port()
    env["APPLIANCE_PORTAL_APPS_PORT"] = str(free_port())  # the Spaces' apps: another origin
    ARTIFACTS.mkdir(exist_ok=True)
    for stale in ARTIFACTS.glob("*.png"):  # a screenshot must come from this run
        stale.unlink()
    log = ARTIFACTS / "portal.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port)], env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    running = Portal(f"http://127.0.0.1:{port}", env, log, config.data_path, sources_dir)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"the portal exited:\n{running.diagnostics()}"
            try:
                if requests.get(running.url + "/static/portal.css", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"no portal after 30 s:\n{running.diagnostics()}"
            time.sleep(0.2)
        yield running
    finally:
        for space_id in (GRADIO, STREAMLIT):
            if ctx.store.find_space(space_id) is not None:
                running.cli("spaces", "delete", space_id, "--yes", check=False)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def playwright_driver():
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright_driver):
    launched = playwright_driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield launched
    launched.close()


@pytest.fixture(scope="module")
def admin(portal: Portal) -> str:
    """The portal's admin account, made with the CLI."""
    portal.cli("users", "add", ADMIN, "--role", "admin", stdin=PASSWORD + "\n")
    return ADMIN


def log_in(tab: Page, name: str, password: str) -> None:
    tab.goto("/login")
    tab.get_by_label("User name").fill(name)
    tab.get_by_label("Password").fill(password)
    tab.get_by_role("button", name="Log in").click()


@pytest.fixture(scope="module")
def page(browser: Browser, portal: Portal, admin: str):
    """One tab, logged in as the admin, kept across the tests."""
    context = browser.new_context(base_url=portal.url, viewport={"width": 1280, "height": 900})
    context.add_init_script(LOG_WATCH)
    context.set_default_timeout(20_000)
    tab = context.new_page()
    watch(tab)
    log_in(tab, admin, PASSWORD)
    expect(tab).to_have_url(portal.url + "/")
    yield tab
    context.close()


def ensure_space(page: Page, portal: Portal, space_id: str, files: dict[str, str]) -> str:
    """Add the Space through the form unless it is there already; do not wait for it."""
    if page.request.get(f"/api/v1/spaces/{space_id}").status == 404:
        add_through_form(page, portal, space_id, files)
    return space_id


@pytest.fixture(scope="module")
def gradio_space(page: Page, portal: Portal) -> str:
    return ensure_space(page, portal, GRADIO, GRADIO_FILES)


@pytest.fixture(scope="module")
def streamlit_space(page: Page, portal: Portal) -> str:
    return ensure_space(page, portal, STREAMLIT, STREAMLIT_FILES)


@pytest.fixture(scope="module")
def stalling_proxy():
    """A TCP listener that accepts connections and never answers: the browser's "internet"."""
    with silent_listener(64) as port:
        yield port


# What went wrong in a tab (console errors, failed requests, HTTP errors), for failure messages.
TROUBLE: dict[int, list[str]] = {}


def watch(tab: Page) -> None:
    trouble = TROUBLE.setdefault(id(tab), [])
    tab.on("console", lambda m: trouble.append(f"console {m.type}: {m.text}")
           if m.type in ("error", "warning") else None)
    tab.on("pageerror", lambda e: trouble.append(f"page error: {e}"))
    tab.on("requestfailed", lambda r: trouble.append(f"failed: {r.url} ({r.failure})"))
    tab.on("response", lambda r: trouble.append(f"HTTP {r.status}: {r.url}")
           if r.status >= 400 else None)


def space_view(page: Page, space_id: str) -> dict:
    response = page.request.get(f"/api/v1/spaces/{space_id}")
    assert response.ok, f"GET /api/v1/spaces/{space_id}: {response.status} {response.text()}"
    return response.json()


def wait_until_running(page: Page, portal: Portal, space_id: str) -> dict:
    """Poll the API (with the browser's session) until the Space runs; fail on an error stage."""
    started = time.monotonic()

    def running() -> dict | None:
        view = space_view(page, space_id)
        assert view["stage"] not in ERRORS, (
            f"{space_id} landed in {view['stage']}: {view['error']}\n{portal.diagnostics()}")
        return view if view["stage"] == stages.RUNNING else None

    view = wait_for(running, SPACE_DEADLINE, f"{space_id} to run (the portal's logs: "
                    f"{portal.log}, {portal.data_dir / 'run' / 'worker.log'})", interval=0.5)
    print(f"\n{space_id} RUNNING {time.monotonic() - started:.1f} s after the wait began")
    return view


def add_through_form(page: Page, portal: Portal, space_id: str, files: dict[str, str]) -> None:
    repo = make_space_repo(portal.sources / space_id.replace("/", "-"), files)
    page.goto("/new")
    page.locator("input[name=source]").fill(str(repo))
    page.locator("input[name=name]").fill(space_id)
    page.get_by_role("button", name="Add and build").click()
    expect(page).to_have_url(f"{portal.url}/spaces/{space_id}/logs")


def is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in ("http", "https", "ws", "wss") or parts.hostname in (
        "127.0.0.1", "localhost", "::1")


def left_the_box(urls: list[str]) -> str:
    return json.dumps([url for url in urls if not is_loopback(url)], indent=1)


def answers_in_the_frame(tab: Page, name: str, use_the_app, context: str = "") -> None:
    """Run use_the_app(frame); on failure, save a screenshot and say what the tab saw."""
    try:
        use_the_app(tab.frame_locator("iframe#app"))
    except (AssertionError, PlaywrightTimeout) as exc:
        screenshot(tab, f"{name}-failed.png")
        seen = "\n".join(TROUBLE.get(id(tab), [])[-40:]) or "(nothing)"
        raise AssertionError(f"{exc}\n{context}--- what the tab saw (last 40) ---\n{seen}\n"
                             f"(screenshot: {ARTIFACTS / (name + '-failed.png')})") from None


def gradio_answers(words: str):
    def use(frame) -> None:
        frame.get_by_label("Words").fill(words)
        frame.get_by_role("button", name="Submit").click()
        expect(frame.get_by_label("Shouted")).to_have_value(f"{words.upper()}!",
                                                           timeout=20_000)
    return use


def streamlit_echoes(words: str):
    def use(frame) -> None:
        box = frame.get_by_label("Say something")
        box.fill(words)
        box.press("Enter")
        expect(frame.get_by_text(f"Echo: {words}")).to_be_visible(timeout=20_000)
    return use


def screenshot(page: Page, name: str) -> None:
    """Save a screenshot to tests/artifacts/ and check it holds a picture."""
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.is_file(), f"{path} was not written"
    assert path.stat().st_size > 10_000, f"{path} is only {path.stat().st_size} bytes"


# -- the flow ----------------------------------------------------------------------------------


def test_login_shows_the_error_for_a_wrong_password_then_logs_in(portal, browser, admin):
    context = browser.new_context(base_url=portal.url)  # a visitor of its own, logged out
    context.set_default_timeout(20_000)
    tab = context.new_page()
    try:
        log_in(tab, admin, "not the password")
        expect(tab.locator(".flash.error")).to_contain_text("Wrong user name or password")
        expect(tab.get_by_role("link", name="New Space")).to_have_count(0)

        log_in(tab, admin, PASSWORD)
        expect(tab).to_have_url(portal.url + "/")
        expect(tab.get_by_role("link", name="New Space")).to_be_visible()
        expect(tab.get_by_role("link", name=admin, exact=True)).to_be_visible()
    finally:
        context.close()


def test_new_space_form_streams_the_build_log_while_it_builds(portal, page):
    if page.request.get(f"/api/v1/spaces/{GRADIO}").ok:  # made by a fixture: build it anew
        portal.cli("spaces", "delete", GRADIO, "--yes")
    started = time.monotonic()
    add_through_form(page, portal, GRADIO, GRADIO_FILES)
    log = page.locator("pre#log")
    expect(log).to_contain_text("==> Fetching", timeout=60_000)
    stage = space_view(page, GRADIO)["stage"]
    assert stage in stages.BUSY, f"the first build lines came after the build ({stage})"
    expect(page.locator("#log-status")).to_have_text("The log ended.",
                                                     timeout=SPACE_DEADLINE * 1000)
    text = log.text_content() or ""
    assert "==> Revision " in text and "==> Building localhost/" in text, text
    growth = page.evaluate("window.__logGrowth")
    # Lines that came in pieces (three sizes of the log at least), not one burst of a log
    # that was already complete.
    assert len({g["lines"] for g in growth}) >= 3, (
        f"the log did not stream in while the build ran: {growth}\n{text}")
    print(f"\nbuild log of {GRADIO} streamed in {len(growth)} updates, "
          f"{time.monotonic() - started:.1f} s from the form")


def test_gradio_app_answers_inside_the_space_page(portal, page, streamlit_space, gradio_space):
    # streamlit_space comes first so that it builds meanwhile.
    wait_until_running(page, portal, GRADIO)
    started = time.monotonic()
    page.goto(f"/spaces/{GRADIO}")
    iframe = page.locator("iframe#app")
    apps = f"http://127.0.0.1:{portal.env['APPLIANCE_PORTAL_APPS_PORT']}"
    expect(iframe).to_have_attribute("src", f"{apps}/s/{GRADIO.replace('/', '--')}/")
    answers_in_the_frame(page, "space-gradio", gradio_answers("hello browser"))
    print(f"\n{GRADIO} answered in the iframe {time.monotonic() - started:.1f} s after goto")
    screenshot(page, "space-gradio.png")


def test_streamlit_app_answers_over_its_websocket_inside_the_space_page(portal, page,
                                                                        streamlit_space):
    wait_until_running(page, portal, STREAMLIT)
    started = time.monotonic()
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.goto(f"/spaces/{STREAMLIT}")
    apps = f"http://127.0.0.1:{portal.env['APPLIANCE_PORTAL_APPS_PORT']}"
    expect(page.locator("iframe#app")).to_have_attribute(
        "src", f"{apps}/s/{STREAMLIT.replace('/', '--')}/")
    answers_in_the_frame(page, "space-streamlit", streamlit_echoes("over the proxy"),
                         f"WebSockets opened: {sockets}\n")
    assert any(f"/s/{STREAMLIT.replace('/', '--')}/" in url for url in sockets), (
        f"Streamlit's WebSocket did not go through the proxy: {sockets}")
    print(f"\n{STREAMLIT} answered in the iframe {time.monotonic() - started:.1f} s after goto")
    screenshot(page, "space-streamlit.png")


def test_gradio_space_page_loads_and_answers_with_no_internet(portal, page, playwright_driver,
                                                              stalling_proxy, gradio_space):
    wait_until_running(page, portal, GRADIO)
    cookies = page.context.cookies()
    offline = playwright_driver.chromium.launch(
        executable_path=CHROMIUM,
        args=[*CHROMIUM_ARGS, f"--proxy-server=http://127.0.0.1:{stalling_proxy}",
              # Chromium never proxies loopback unless told to (<-loopback>): only the
              # internet goes to the listener that never answers.
              "--proxy-bypass-list=127.0.0.1;localhost;[::1]"])
    try:
        context = offline.new_context(base_url=portal.url,
                                      viewport={"width": 1280, "height": 900})
        context.add_cookies(cookies)
        tab = context.new_page()
        watch(tab)
        seen: list[str] = []
        tab.on("request", lambda r: seen.append(r.url))
        started = time.monotonic()
        try:
            tab.goto(f"/spaces/{GRADIO}", wait_until="load", timeout=OFFLINE_LOAD_MS)
        except PlaywrightTimeout:
            pytest.fail(f"the Space page's load event did not fire within "
                        f"{OFFLINE_LOAD_MS / 1000:.0f} s with no internet; it tried to "
                        f"leave the box for: {left_the_box(seen)}")
        loaded = time.monotonic() - started
        answers_in_the_frame(tab, "space-gradio-offline", gradio_answers("no internet"),
                             f"with no internet, the page tried to leave the box for: "
                             f"{left_the_box(seen)}\n")
        print(f"\noffline: load event after {loaded:.1f} s; {len(seen)} requests, of which "
              f"these tried to leave the box: {left_the_box(seen)}")
        screenshot(tab, "space-gradio-offline.png")
    finally:
        offline.close()


def test_home_page_shows_a_card_per_space_as_its_readme_describes(portal, page, gradio_space,
                                                                  streamlit_space):
    for space_id in (gradio_space, streamlit_space):
        wait_until_running(page, portal, space_id)
    page.goto("/")
    expect(page.locator("li.card")).to_have_count(2)
    screenshot(page, "home.png")
    for space_id, files in ((GRADIO, GRADIO_FILES), (STREAMLIT, STREAMLIT_FILES)):
        front = dict(line.split(": ", 1) for line in files["README.md"].splitlines()
                     if ": " in line)
        card = page.locator(f"li.card[data-space='{space_id}']")
        expect(card).to_be_visible()
        expect(card.locator("[data-stage]")).to_have_attribute("data-stage", stages.RUNNING)
        expect(card.locator("h2")).to_have_text(front["title"])
        expect(card.locator(".emoji")).to_have_text(front["emoji"])
        expect(card.locator(".desc")).to_have_text(front["short_description"])
        expect(card).to_have_attribute("style", re.compile(
            rf"--from: var\(--c-{front['colorFrom']}\); --to: var\(--c-{front['colorTo']}\)"))


def test_portal_fits_a_phone_and_loads_nothing_from_the_internet(portal, page, browser,
                                                                 gradio_space):
    phone = browser.new_context(base_url=portal.url, viewport={"width": 390, "height": 844},
                                device_scale_factor=2, is_mobile=True, has_touch=True)
    phone.add_cookies(page.context.cookies())
    tab = phone.new_page()
    seen: list[str] = []
    tab.on("request", lambda r: seen.append(r.url))
    try:
        for path, shot in (("/", "phone-home.png"), (f"/spaces/{GRADIO}", "phone-space.png"),
                           (f"/spaces/{GRADIO}/settings", None), ("/system", None)):
            tab.goto(path, wait_until="load")
            overflow = tab.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} is {overflow} px wider than a phone's screen"
            if shot:
                screenshot(tab, shot)
        outside = [url for url in seen if "/s/" not in url and not is_loopback(url)]
        assert not outside, f"the portal's pages fetched from outside the box: {outside}"
    finally:
        phone.close()
