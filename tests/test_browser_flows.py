# ruff: noqa: F811 - the fixtures of test_browser.py are imported, then named as arguments
"""Issue 12 in a real browser (Debian's Chromium through Playwright, a real gunicorn portal,
real rootless Podman): every state leads somewhere without a reload by hand. A static Space
(the fastest to build) is added on /new and the Logs page moves on to the app by itself; a
Space with no app file shows the reason and its fix, and Retry rebuilds it; a sleeping Space
wakes when its page is opened; a settings error is shown beside its field. Screenshots go to
tests/artifacts/ as in test_browser.py, whose portal, browser and login fixtures these reuse.
"""

from __future__ import annotations

import pytest
from conftest import commit, make_space_repo
from playwright.sync_api import Page, expect
from test_browser import (  # noqa: F401 - fixtures used by name
    ADMIN,
    ERRORS,
    SPACE_DEADLINE,
    Portal,
    admin,
    browser,
    page,
    playwright_driver,
    portal,
    screenshot,
    space_view,
    wait_until_running,
)

from appliance import stages

pytestmark = pytest.mark.podman

STATIC, BROKEN = "flows/hello", "flows/broken"
STATIC_FILES = {
    "README.md": "---\ntitle: Hello Static\nemoji: 👋\ncolorFrom: yellow\ncolorTo: gray\n"
                 "sdk: static\n---\n",
    "index.html": "<!doctype html><title>Hello</title><h1 id='hello'>Hello from a static "
                  "Space</h1>\n",
}
BROKEN_FILES = {
    "README.md": "---\ntitle: Not Yet\nemoji: 🧱\ncolorFrom: red\ncolorTo: pink\nsdk: static\n"
                 "app_file: site/index.html\n---\n",
}
BUILD_MS = SPACE_DEADLINE * 1000


def add_on_the_form(page: Page, portal: Portal, space_id: str, files: dict[str, str]):
    repo = make_space_repo(portal.sources / space_id.split("/")[0] / space_id.split("/")[1],
                           files)
    page.goto("/new")
    page.get_by_label("Space URL").fill(str(repo))
    page.get_by_role("button", name="Add and build").click()
    expect(page).to_have_url(f"{portal.url}/spaces/{space_id}/logs")  # named after the folder
    return repo


def test_a_new_static_space_is_shown_once_built_without_a_reload(portal, page):
    add_on_the_form(page, portal, STATIC, STATIC_FILES)
    # The Logs page follows the build, then opens the Space's page with the app in it.
    expect(page).to_have_url(f"{portal.url}/spaces/{STATIC}", timeout=BUILD_MS)
    frame = page.frame_locator("iframe#app")
    expect(frame.locator("#hello")).to_have_text("Hello from a static Space")
    expect(page.locator(".space-head [data-stage-badge]")).to_have_attribute(
        "data-stage", stages.RUNNING)
    screenshot(page, "flows-static-running.png")


def test_a_broken_space_shows_the_reason_and_fix_and_retry_rebuilds_it(portal, page):
    repo = add_on_the_form(page, portal, BROKEN, BROKEN_FILES)
    state = page.locator("#state")
    expect(state.locator("h2")).to_have_text("This Space has an error: no app file",
                                             timeout=BUILD_MS)
    expect(state.locator(".error-what")).to_contain_text("site/index.html")
    expect(state.locator(".error-fix")).to_contain_text("Add the file, or set app_file")
    page.goto(f"/spaces/{BROKEN}")
    expect(page.locator(".space-head h1")).to_have_text("Not Yet")
    expect(page.locator("#state .error-fix")).to_contain_text("Add the file, or set app_file")
    screenshot(page, "flows-broken.png")

    commit(repo, {"site/index.html": "<h1 id='hello'>Fixed</h1>\n"}, "add the app file")
    state.get_by_role("button", name="Retry (rebuild)").click()
    expect(page).to_have_url(f"{portal.url}/spaces/{BROKEN}", timeout=BUILD_MS)
    expect(page.frame_locator("iframe#app").locator("#hello")).to_have_text("Fixed")
    view = space_view(page, BROKEN)
    assert view["stage"] not in ERRORS, view


def test_opening_a_sleeping_space_wakes_it_and_shows_the_app(portal, page):
    if page.request.get(f"/api/v1/spaces/{STATIC}").status == 404:
        add_on_the_form(page, portal, STATIC, STATIC_FILES)
    wait_until_running(page, portal, STATIC)
    portal.cli("spaces", "stop", STATIC)
    # What the scheduler's sleep pass leaves: stopped, and asleep until a request comes.
    from appliance.adapters.store import open_store

    store = open_store(portal.data_dir / "appliance.db")
    try:
        store.update_space(STATIC, desired="sleeping")
    finally:
        store.close()
    page.goto(f"/spaces/{STATIC}")
    expect(page.frame_locator("iframe#app").locator("#hello")).to_have_text(
        "Hello from a static Space", timeout=BUILD_MS)
    screenshot(page, "flows-woken.png")
    assert space_view(page, STATIC)["desired"] == "running"


def test_a_settings_error_is_shown_beside_its_field(portal, page):
    if page.request.get(f"/api/v1/spaces/{STATIC}").status == 404:
        add_on_the_form(page, portal, STATIC, STATIC_FILES)
    page.goto(f"/spaces/{STATIC}/settings")
    field = page.get_by_label("Sleep after")
    field.fill("in a while")
    field.press("Enter")
    error = page.locator("#error-sleep")
    expect(error).to_contain_text("Sleep time must be a duration like 30m, 2h")
    expect(page.get_by_label("Sleep after")).to_have_value("in a while")
    expect(page.get_by_label("Sleep after")).to_have_attribute("aria-invalid", "true")
    screenshot(page, "flows-settings-error.png")
    page.get_by_label("Sleep after").fill("1h30m")
    page.get_by_label("Sleep after").press("Enter")
    expect(page.locator(".flash.ok")).to_have_text("Saved")
    expect(page.get_by_label("Sleep after")).to_have_value("1h30m")
    assert ADMIN and space_view(page, STATIC)["sleep_after"] == 5400
