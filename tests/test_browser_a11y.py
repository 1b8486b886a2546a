# ruff: noqa: F811 - the fixtures of test_browser.py are imported, then named as arguments
"""Issue 12's last checks in a real browser (Debian's Chromium through Playwright, a real
gunicorn portal, real rootless Podman), with test_browser.py's portal, login and Gradio Space:

- the "Use via API" panel's snippets work as a user copies them: the Python `gradio_client`
  snippet and the curl one, run against the proxied app, get the app's answer;
- every page a user reaches loads with no console error, failed request or HTTP error, has one
  h1, a name on every field, a skip link first that moves focus to the content, a visible
  keyboard focus, and 4.5:1 contrast for the text on Space cards and headers, with light
  (yellow/green) and dark (indigo/purple) Space colours;
- screenshots of the newer pages go to tests/artifacts/a11y/ (test_browser's portal fixture
  clears only the PNGs directly in tests/artifacts/).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from conftest import wait_for
from playwright.sync_api import Browser, BrowserContext, Page, expect
from test_browser import (  # noqa: F401 - fixtures used by name
    ARTIFACTS,
    GRADIO,
    Portal,
    admin,
    browser,
    ensure_space,
    gradio_space,
    page,
    playwright_driver,
    portal,
    screenshot,
    space_view,
    wait_until_running,
)

from appliance import stages

pytestmark = pytest.mark.podman

SHOTS = ARTIFACTS / "a11y"
SUNNY, DUSK, BROKEN = "a11y/sunny", "a11y/dusk", "a11y/broken"
SUNNY_FILES = {  # light colours: white text would fail on them
    "README.md": "---\ntitle: Sunny Side\nemoji: 🌞\ncolorFrom: yellow\ncolorTo: green\n"
                 "sdk: static\nshort_description: Light colours, dark text\n---\n",
    "index.html": "<!doctype html><title>Sunny</title><h1>Sunny</h1>\n",
}
DUSK_FILES = {  # dark colours: dark text would fail on them
    "README.md": "---\ntitle: Dusk\nemoji: 🌆\ncolorFrom: indigo\ncolorTo: purple\n"
                 "sdk: static\nshort_description: Dark colours, light text\n---\n",
    "index.html": "<!doctype html><title>Dusk</title><h1>Dusk</h1>\n",
}
BROKEN_FILES = {  # no app file: the build fails with a reason and a fix
    "README.md": "---\ntitle: Half Built\nemoji: 🧱\ncolorFrom: pink\ncolorTo: red\n"
                 "sdk: static\napp_file: site/index.html\n"
                 "short_description: Its app file is missing\n---\n",
}
AA = 4.5
ERROR_STAGES = {stages.NO_APP_FILE, stages.CONFIG_ERROR, stages.BUILD_ERROR,
                stages.RUNTIME_ERROR}


# -- the Spaces -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spaces(page: Page, portal: Portal, gradio_space: str) -> dict[str, str]:
    """The Gradio Space (first, the slowest build), two static Spaces in light and dark
    colours, and a broken one; each added once, all built when this returns."""
    for space_id, files in ((SUNNY, SUNNY_FILES), (DUSK, DUSK_FILES), (BROKEN, BROKEN_FILES)):
        ensure_space(page, portal, space_id, files)
    for space_id in (SUNNY, DUSK, gradio_space):
        wait_until_running(page, portal, space_id)
    wait_for(lambda: space_view(page, BROKEN)["stage"] in ERROR_STAGES, 120,
             f"{BROKEN} to fail its build")
    SHOTS.mkdir(parents=True, exist_ok=True)
    for stale in SHOTS.glob("*.png"):  # a screenshot must come from this run
        stale.unlink()
    return {"gradio": gradio_space, "light": SUNNY, "dark": DUSK, "broken": BROKEN}


def apps_origin(portal: Portal) -> str:
    return f"http://127.0.0.1:{portal.env['APPLIANCE_PORTAL_APPS_PORT']}"


# -- 1. the "Use via API" snippets ------------------------------------------------------------


def api_snippets(page: Page, space_id: str) -> list[str]:
    """Open the Space page's "Use via API" panel; return its snippets' text as shown."""
    page.goto(f"/spaces/{space_id}")
    panel = page.locator("details#use-api")
    panel.locator("summary").click()
    expect(panel).to_have_attribute("open", "")
    snippets = panel.locator("pre.snippet")
    expect(snippets.first).to_be_visible()
    return snippets.all_inner_texts()


def test_the_python_snippet_of_use_via_api_gets_the_apps_answer(portal, page, spaces):
    wait_until_running(page, portal, GRADIO)
    python = next(s for s in api_snippets(page, GRADIO) if "from gradio_client" in s)
    url = f"{apps_origin(portal)}/s/{GRADIO.replace('/', '--')}/"
    assert f'Client("{url}")' in python, f"the snippet does not name the app's URL {url}:\n"\
                                         f"{python}"
    # What a user does with it: fill in the arguments of the commented-out call.
    call = re.search(r'# (result = client\.predict\()\.\.\.(, api_name="/\w+"\))', python)
    assert call, f"no predict call to fill in, with its api_name, in:\n{python}"
    program = python.replace(call.group(0), f'{call.group(1)}"hello api"{call.group(2)}\n'
                                            'print("ANSWER:", result)')
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         timeout=120, env={**portal.env, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, f"the snippet failed:\n{program}\n{run.stdout}\n{run.stderr}"
    assert "ANSWER: HELLO API!" in run.stdout.splitlines(), run.stdout + run.stderr
    assert 'api_name="/predict"' in run.stdout, (
        f"view_api() did not list the endpoint the snippet names:\n{run.stdout}")


def test_the_curl_snippet_of_use_via_api_gets_the_apps_answer(portal, page, spaces):
    wait_until_running(page, portal, GRADIO)
    curl = next(s for s in api_snippets(page, GRADIO) if s.startswith("EVENT_ID=$(curl"))
    assert "[...]" in curl, f"no data to fill in, in:\n{curl}"
    assert shutil.which("jq"), "the curl snippet reads the event id with jq: apt-get install jq"
    script = curl.replace("[...]", '["hello curl"]')
    run = subprocess.run(["bash", "-c", "set -eo pipefail\n" + script], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, f"the snippet failed:\n{script}\n{run.stdout}\n{run.stderr}"
    events = dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    assert events.get("event") == "complete" and events.get("data") == '["HELLO CURL!"]', (
        f"the curl snippet's answer:\n{run.stdout}\n{run.stderr}\n(snippet:\n{script})")


# -- 2. every page: loads clean, named fields, skip link, focus, contrast ------------------


# Every field's accessible name, read from the DOM: a <label>, aria-label or aria-labelledby.
UNNAMED_FIELDS = """() => [...document.querySelectorAll("input, select, textarea")]
  .filter(e => e.type !== "hidden")
  .filter(e => !(e.labels && [...e.labels].some(l => l.textContent.trim()))
               && !(e.getAttribute("aria-label") || "").trim()
               && !(e.getAttribute("aria-labelledby") || "").split(/\\s+/).some(
                    id => id && document.getElementById(id)?.textContent.trim()))
  .map(e => e.outerHTML.slice(0, 160))"""

# For each element inside `containers` that shows text: its colour (faded by its opacity)
# against what is behind it — the gradient's end colours on a Space card or header, else the
# nearest background colour. Returns those under the minimum ratio, and how many were measured.
CONTRAST = """([containers, minimum]) => {
  const colours = s => (s.match(/rgba?\\([^)]*\\)/g) || []).map(
    c => c.match(/[\\d.]+/g).map(Number));
  const lin = c => { c /= 255; return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  const lum = ([r, g, b]) => 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
  const ratio = (a, b) => { const [hi, lo] = [lum(a), lum(b)].sort((x, y) => y - x);
                            return (hi + 0.05) / (lo + 0.05); };
  const solid = c => c && (c.length < 4 || c[3] > 0);
  const backdrop = el => { for (let up = el; up; up = up.parentElement) {
    const bg = colours(getComputedStyle(up).backgroundColor)[0];
    if (solid(bg)) return bg; } return [255, 255, 255]; };
  const gradient = ".card a, .space-head";
  const low = [], unreadable = []; let measured = 0;
  for (const box of document.querySelectorAll(containers)) {
    let stops = colours(getComputedStyle(box).backgroundImage);
    if (stops.length < 2) {
      if (box.matches(gradient))
        unreadable.push(`${box.className}: ${getComputedStyle(box).backgroundImage}`);
      stops = [backdrop(box)];
    }
    for (const el of [box, ...box.querySelectorAll("*")]) {
      if (el.closest("[aria-hidden=true]") || el.getClientRects().length === 0) continue;
      const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
      if (!own) continue;
      let behind = stops, alpha = 1;
      for (let up = el; up && up !== box; up = up.parentElement) {
        const bg = colours(getComputedStyle(up).backgroundColor)[0];
        if (solid(bg)) { behind = [bg]; break; }
      }
      for (let up = el; up; up = up.parentElement) alpha *= +getComputedStyle(up).opacity;
      const colour = colours(getComputedStyle(el).color)[0];
      alpha *= colour.length > 3 ? colour[3] : 1;
      measured++;
      for (const bg of behind) {
        const ink = [0, 1, 2].map(i => alpha * colour[i] + (1 - alpha) * bg[i]);
        const r = ratio(ink, bg);
        if (r < minimum) low.push(`"${el.textContent.trim().slice(0, 40)}" (${el.tagName}.` +
          `${el.className}) rgb(${ink.map(Math.round)}) on rgb(${bg.slice(0, 3)}): ` +
          `${r.toFixed(2)}:1`);
      }
    }
  }
  return {low, unreadable, measured};
}"""

FOCUS_SHOWN = """() => { const e = document.activeElement, s = getComputedStyle(e);
  return {what: e.outerHTML.slice(0, 120), tag: e.tagName,
          shown: (s.outlineStyle !== "none" && parseFloat(s.outlineWidth) > 0)
                 || s.boxShadow !== "none"}; }"""


@contextmanager
def visiting(context: BrowserContext, path: str, portal: Portal) -> Iterator[tuple[Page, list]]:
    """Open path in a tab of its own; yield the tab and what went wrong on the portal's side
    (console errors, failed requests, HTTP >= 400); the Space's own app in its iframe is the
    app's business and is left out."""
    tab = context.new_page()
    trouble: list[str] = []
    apps = apps_origin(portal)

    def ours(url: str) -> bool:
        return not url.startswith(apps)

    def on_console(message) -> None:
        if message.type == "error" and ours(message.location.get("url", "")):
            trouble.append(f"console error: {message.text} ({message.location})")

    def on_request_failed(request) -> None:
        if request.frame == tab.main_frame and ours(request.url):
            trouble.append(f"failed: {request.url} ({request.failure})")

    def on_response(response) -> None:
        if response.status >= 400 and ours(response.url):
            trouble.append(f"HTTP {response.status}: {response.url}")

    tab.on("console", on_console)
    tab.on("pageerror", lambda error: trouble.append(f"page error: {error}"))
    tab.on("requestfailed", on_request_failed)
    tab.on("response", on_response)
    try:
        tab.goto(path, wait_until="load")
        yield tab, trouble
    finally:
        trouble.append("(the visit ended)")  # what comes after leaving is not the page's
        tab.close()


def problems_of(tab: Page, trouble: list[str], contrast_in: str | None) -> list[str]:
    """What this page gets wrong, as sentences (empty when nothing)."""
    found = list(trouble)
    # The favicon: Chromium asks for it on its own; it must be there.
    icon = tab.evaluate("document.querySelector('link[rel~=icon]')?.href || '/favicon.ico'")
    status = tab.request.get(icon).status
    if status >= 400:
        found.append(f"favicon {icon}: HTTP {status}")
    h1s = tab.locator("h1").all_inner_texts()
    if len(h1s) != 1:
        found.append(f"{len(h1s)} h1 elements, not one: {h1s}")
    found += [f"field with no accessible name: {f}" for f in tab.evaluate(UNNAMED_FIELDS)]
    # A Space's emoji is decoration: a screen reader reads the title, not "brick".
    found += [f"emoji not hidden from screen readers: {e}" for e in tab.evaluate(
        """() => [...document.querySelectorAll(".space-head .emoji, .card .emoji")]
                 .filter(e => !e.closest("[aria-hidden=true]")).map(e => e.outerHTML)""")]

    # The skip link is the first stop of the keyboard from the top of the page (the login
    # form's autofocus puts the user in its field: start from the body, as on a reload), and
    # it moves focus to the content.
    tab.evaluate("""() => { document.body.tabIndex = -1; document.body.focus();
                           document.body.removeAttribute("tabindex"); }""")
    tab.keyboard.press("Tab")
    first = tab.evaluate("[document.activeElement.className, "
                         "document.activeElement.getAttribute('href')]")
    if first != ["skip", "#main"]:
        found.append(f"the first focusable element is not the skip link to #main: {first}")
    else:
        focus = tab.evaluate(FOCUS_SHOWN)
        if not focus["shown"]:
            found.append(f"no visible focus on the skip link: {focus['what']}")
        tab.keyboard.press("Enter")
        landed = tab.evaluate("document.activeElement.id")
        if landed != "main":
            found.append(f"the skip link left focus on #{landed!r}, not on main")
    # Keyboard focus is visible on the controls that follow (links, buttons, fields).
    for _ in range(6):
        tab.keyboard.press("Tab")
        focus = tab.evaluate(FOCUS_SHOWN)
        if focus["tag"] in ("BODY", "IFRAME"):
            break
        if not focus["shown"]:
            found.append(f"keyboard focus is not visible on {focus['what']}")
    if contrast_in:
        seen = tab.evaluate(CONTRAST, [contrast_in, AA])
        found += [f"contrast under {AA}:1: {low}" for low in seen["low"]]
        found += [f"no gradient to measure on {box}" for box in seen["unreadable"]]
        if not seen["measured"]:
            found.append(f"no text measured in {contrast_in}")
    return [f for f in found if f != "(the visit ended)"]


def check(context: BrowserContext, portal: Portal, path: str, contrast_in: str | None = None,
          ready: str | None = None, shot: str | None = None) -> list[str]:
    """Visit path and return its problems, each prefixed with the path."""
    with visiting(context, path, portal) as (tab, trouble):
        if ready:
            expect(tab.locator(ready).first).to_be_visible()
        found = problems_of(tab, trouble, contrast_in)
        if shot:
            screenshot(tab, f"a11y/{shot}")
    return [f"{path}: {f}" for f in found]


def test_every_portal_page_loads_clean_with_names_skip_link_focus_and_contrast(
        portal, page, browser: Browser, spaces):
    context = page.context  # logged in as the admin
    gradio, light, dark, broken = (spaces[k] for k in ("gradio", "light", "dark", "broken"))
    found: list[str] = []
    found += check(context, portal, "/", contrast_in="li.card a", ready="li.card")
    for space_id in (gradio, light, dark):
        found += check(context, portal, f"/spaces/{space_id}", contrast_in=".space-head",
                       ready="iframe#app")
    found += check(context, portal, f"/spaces/{broken}", contrast_in=".space-head",
                   ready="#state .error-fix")
    for path in (f"/spaces/{gradio}/logs", f"/spaces/{broken}/logs",
                 f"/spaces/{gradio}/settings", f"/spaces/{gradio}/files"):
        found += check(context, portal, path, contrast_in=".space-head")
    found += check(context, portal, f"/spaces/{gradio}/files/app.py",
                   contrast_in=".space-head, pre.code", ready="pre.code")
    for path in ("/new", "/system", "/gpus", "/account"):
        found += check(context, portal, path)

    visitor = browser.new_context(base_url=portal.url)  # logged out
    visitor.set_default_timeout(20_000)
    try:
        found += check(visitor, portal, "/login", ready="form")
    finally:
        visitor.close()
    assert not found, "\n".join(found) + f"\n{portal.diagnostics()}"


def test_card_text_keeps_its_contrast_on_light_and_dark_colours(portal, page, spaces):
    page.goto("/")
    for space_id, colours in ((spaces["light"], ("yellow", "green")),
                              (spaces["dark"], ("indigo", "purple"))):
        card = page.locator(f"li.card[data-space='{space_id}']")
        expect(card).to_have_attribute("style", re.compile(
            rf"--from: var\(--c-{colours[0]}\); --to: var\(--c-{colours[1]}\)"))
    seen = page.evaluate(CONTRAST, ["li.card a", AA])
    assert seen["measured"] >= 4 * 3, f"too little text measured on the cards: {seen}"
    assert not seen["low"] and not seen["unreadable"], seen
    inks = page.evaluate("""ids => ids.map(id => getComputedStyle(
        document.querySelector(`li.card[data-space='${id}'] h2`)).color)""",
                         [spaces["light"], spaces["dark"]])
    assert inks[0] != inks[1], f"light and dark cards draw their text alike: {inks}"


# -- 3. screenshots of the newer pages ------------------------------------------------------


def test_screenshots_of_files_use_via_api_broken_space_and_new_space_error(portal, page,
                                                                           spaces):
    gradio, broken = spaces["gradio"], spaces["broken"]
    page.goto(f"/spaces/{gradio}/files")
    expect(page.get_by_role("link", name="app.py")).to_be_visible()
    screenshot(page, "a11y/files.png")
    page.get_by_role("link", name="app.py").click()
    expect(page.locator("pre.code")).to_contain_text("def shout(words: str) -> str:")
    screenshot(page, "a11y/file-view.png")

    page.goto(f"/spaces/{gradio}")
    page.locator("details#use-api summary").click()
    expect(page.locator("details#use-api pre.snippet").first).to_be_visible()
    page.locator("details#use-api").scroll_into_view_if_needed()
    screenshot(page, "a11y/use-via-api.png")

    page.goto(f"/spaces/{broken}")
    expect(page.locator("#state .error-fix")).to_contain_text("Add the file, or set app_file")
    expect(page.locator("#state").get_by_role("button", name="Retry (rebuild)")).to_be_visible()
    screenshot(page, "a11y/broken-space.png")

    page.goto("/new")
    source = page.get_by_label("Space URL")
    source.fill("../../etc/passwd")
    page.get_by_role("button", name="Add and build").click()
    expect(page.locator("#error-source")).to_be_visible()
    expect(page.get_by_label("Space URL")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Space URL")).to_have_value("../../etc/passwd")
    screenshot(page, "a11y/new-space-error.png")
    shots = sorted(p.name for p in SHOTS.glob("*.png"))
    assert {"files.png", "file-view.png", "use-via-api.png", "broken-space.png",
            "new-space-error.png"} <= set(shots), shots
    assert urlsplit(page.url).path == "/new"
