"""web_offline: Space pages stop reaching for the internet, on Gradio 5.9.1's and Streamlit
1.40.1's own files and in Chromium with the network cut.

The installed SDKs are read from the images built on this box when they are there; otherwise
the snippets below, copied from those same files, stand in.

Run standalone to see what a page fetches from the internet with the network cut:

    .venv/bin/python tests/test_web_offline.py http://127.0.0.1:17000/s/owner--name/
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import as_service, copy_from_container, make_space_repo, wait_for

from appliance.web.offline import CONTAINER_ENV, IFRAME_RESIZER, OFFLINE_URL, rewrite

REPO = Path(__file__).resolve().parents[1]
OFFLINE_DIR = REPO / "appliance" / "web" / "static" / "offline"
OVERLAY = Path("/var/lib/appliance/.local/share/containers/storage/overlay")
CHROMIUM = "/usr/bin/chromium"  # Debian packages chromium and chromium-common
GRADIO_ROW = {"id": "owner/name", "sdk": "gradio"}

CDNJS = ("https://cdnjs.cloudflare.com/ajax/libs/iframe-resizer/4.3.1/"
         "iframeResizer.contentWindow.min.js")
PRECONNECT_GOOGLEAPIS = '<link rel="preconnect" href="https://fonts.googleapis.com" />'
PRECONNECT_GSTATIC = ('<link\n\t\t\trel="preconnect"\n\t\t\thref="https://fonts.gstatic.com"\n'
                      '\t\t\tcrossorigin="anonymous"\n\t\t/>')
# gradio/templates/frontend/index.html (5.9.1), from the config script to </head>.
GRADIO_HEAD_TEMPLATE = (
    "\t\t<script>window.gradio_config = {{ config | toorjson }};</script>"
    "<script>window.gradio_api_info = {{ gradio_api_info | toorjson }};</script>\n\n"
    f"\t\t{PRECONNECT_GOOGLEAPIS}\n\t\t{PRECONNECT_GSTATIC}\n"
    f'\t\t<script\n\t\t\tsrc="{CDNJS}"\n\t\t\tasync\n\t\t></script>\n'
    '\t\t<script type="module" crossorigin src="./assets/index-BkoKOheB.js"></script>\n'
    '\t\t<link rel="stylesheet" crossorigin href="./assets/index-D_bOYnap.css">\n'
    "\t</head>\n"
)
# streamlit/static/index.html (1.40.1), whole.
STREAMLIT_INDEX = (
    '<!doctype html><html lang="en"><head><meta charset="UTF-8"/><meta name="viewport" '
    'content="width=device-width,initial-scale=1,shrink-to-fit=no"/><link rel="shortcut icon" '
    'href="./favicon.png"/><link rel="preload" href="./static/media/SourceSansPro-Regular.'
    '0d69e5ff5e92ac64a0c9.woff2" as="font" type="font/woff2" crossorigin><link rel="preload" '
    'href="./static/media/SourceSansPro-SemiBold.abed79cd0df1827e18cf.woff2" as="font" '
    'type="font/woff2" crossorigin><link rel="preload" href="./static/media/SourceSansPro-Bold.'
    '118dea98980e20a81ced.woff2" as="font" type="font/woff2" crossorigin><title>Streamlit'
    '</title><script>window.prerenderReady=!1</script><script defer="defer" src="./static/js/'
    'main.75ac1cb6.js"></script><link href="./static/css/main.23bdda6f.css" rel="stylesheet">'
    '</head><body><noscript>You need to enable JavaScript to run this app.</noscript>'
    '<div id="root"></div></body></html>'
)
# Values of a 5.9.1 config as rendered on this box (SYSTEM=spaces, default theme).
SOURCE_SANS = "https://fonts.googleapis.com/css2?family=Source+Sans+Pro:wght@400;600&display=swap"
GRADIO_CONFIG = {
    "version": "5.9.1", "api_prefix": "/gradio_api", "mode": "interface", "dev_mode": False,
    "analytics_enabled": False, "css": "", "js": None, "head": None, "title": "Gradio",
    "space_id": "owner/name", "stylesheets": [SOURCE_SANS], "protocol": "sse_v3",
    "body_css": {"body_background_fill": "white", "body_text_color": "#27272a",
                 "body_background_fill_dark": "#0f0f11", "body_text_color_dark": "#f4f4f5"},
    "root": "http://127.0.0.1:7860", "thumbnail": None, "simple_description": None,
}


# Prerequisites are fixtures: a Space of that SDK, deployed on real Podman (the SDK layer is
# built once and cached, as for any Space), and the package copied out of its container. A
# fresh machine builds it rather than skipping.
GRADIO_SPACE = {
    "README.md": "---\nsdk: gradio\nsdk_version: 5.9.1\npython_version: 3.11\n"
                 "app_file: app.py\n---\n",
}
STREAMLIT_SPACE = {
    "README.md": "---\nsdk: streamlit\nsdk_version: 1.40.1\napp_file: app.py\n---\n",
    "app.py": "import streamlit as st\n\nst.write('hello')\n",
}


def deploy_space(appliance_env, name: str, files: dict[str, str]) -> dict:
    from appliance import stages
    from appliance.core import spaces

    ctx, sources_dir = appliance_env
    repo = make_space_repo(sources_dir / name, files)
    spaces.add_space(ctx, str(repo), name=f"offline/{name}")
    view = spaces.deploy(ctx, f"offline/{name}")
    assert view["stage"] == stages.RUNNING, view["error"]
    return ctx.store.get_space(f"offline/{name}")


def package_of(row: dict, package: str, version: str, into: Path) -> Path:
    """Copy package (checked to be that version) out of the Space's container."""
    found = as_service("podman", "exec", row["container"], "/home/user/.venv/bin/python", "-c",
                       f"import importlib.metadata as m, os, {package} as p; "
                       f"print(m.version('{package}'), os.path.dirname(p.__file__))").stdout
    have, path = found.split()
    assert have == version, f"the {package} Space has {package} {have}, not {version}"
    return copy_from_container(row["container"], path, into)


@pytest.fixture(scope="module")
def gradio_space(appliance_env) -> dict:
    """A running gradio 5.9.1 Space whose app is HELLO_APP under AUDIT_HOOK."""
    return deploy_space(appliance_env, "gradio", {**GRADIO_SPACE,
                                                  "app.py": AUDIT_HOOK + HELLO_APP})


@pytest.fixture(scope="module")
def gradio_package(gradio_space, tmp_path_factory) -> Path:
    return package_of(gradio_space, "gradio", "5.9.1", tmp_path_factory.mktemp("gradio"))


@pytest.fixture(scope="module")
def streamlit_package(appliance_env, tmp_path_factory) -> Path:
    row = deploy_space(appliance_env, "streamlit", STREAMLIT_SPACE)
    return package_of(row, "streamlit", "1.40.1", tmp_path_factory.mktemp("streamlit"))


def gradio_head_template(gradio: Path | None = None) -> str:
    """Gradio's index.html: the package's own, or the copy above."""
    if gradio is None:
        return GRADIO_HEAD_TEMPLATE
    return (gradio / "templates" / "frontend" / "index.html").read_text()


def toorjson(value: object) -> str:
    """Serialise as gradio.routes.toorjson does (orjson, compact, HTML-safe)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escape)
    return text


def render_gradio_page(config: dict, gradio: Path | None = None) -> str:
    """Render Gradio's index.html as gradio.routes does."""
    import jinja2

    env = jinja2.Environment()
    env.filters["toorjson"] = toorjson
    return env.from_string(gradio_head_template(gradio)).render(config=config, gradio_api_info={})


def html(text: str) -> str | None:
    out = rewrite(GRADIO_ROW, "text/html; charset=utf-8", text.encode())
    return None if out is None else out.decode()


def css(text: str) -> str | None:
    out = rewrite(GRADIO_ROW, "text/css", text.encode())
    return None if out is None else out.decode()


# --- the page and its config ---------------------------------------------------------------


def test_gradio_index_loses_font_preconnects_and_loads_iframe_resizer_from_the_box():
    template = gradio_head_template()
    assert PRECONNECT_GOOGLEAPIS in template and PRECONNECT_GSTATIC in template
    assert CDNJS in template

    expected = (template.replace(PRECONNECT_GOOGLEAPIS, "").replace(PRECONNECT_GSTATIC, "")
                .replace(CDNJS, IFRAME_RESIZER))
    assert html(template) == expected


def test_vendored_iframe_resizer_is_the_one_gradio_asks_for_with_its_license():
    script = OFFLINE_DIR / IFRAME_RESIZER.removeprefix(OFFLINE_URL + "/")
    assert script.read_bytes().startswith(
        b"/*! iFrame Resizer (iframeSizer.contentWindow.min.js) - v4.3.1 ")
    assert "MIT" in (script.parent / "LICENSE").read_text()
    assert (script.parent / "iframeResizer.contentWindow.map").is_file()
    vendored = sum(f.stat().st_size for f in OFFLINE_DIR.rglob("*") if f.is_file())
    assert vendored < 2_000_000


def test_rendered_gradio_config_drops_google_stylesheet_and_space_badge_and_nothing_else():
    page = render_gradio_page(GRADIO_CONFIG)
    stylesheet = '"stylesheets":["' + SOURCE_SANS.replace("&", "\\u0026") + '"]'
    assert stylesheet in page and '"space_id":"owner/name"' in page

    out = html(page)

    head, style = out.split('<style data-appliance="offline-fonts">')
    style, tail = style.split("</style>\n")
    assert head + tail == (
        page.replace(PRECONNECT_GOOGLEAPIS, "").replace(PRECONNECT_GSTATIC, "")
        .replace(CDNJS, IFRAME_RESIZER).replace(stylesheet, '"stylesheets":[]')
        .replace('"space_id":"owner/name"', '"space_id":null'))
    assert "font-family:'Source Sans Pro';font-weight:400" in style
    assert "./static/fonts/Source%20Sans%20Pro/SourceSansPro-Regular.woff2" in style
    assert tail.startswith("</head>")


@pytest.mark.podman
def test_google_fonts_gradio_ships_point_at_its_own_files(gradio_package):
    families = ["IBM Plex Mono", "IBM Plex Sans", "Inconsolata", "Montserrat", "Quicksand",
                "Source Sans Pro"]
    urls = ["https://fonts.googleapis.com/css2?family=" + f.replace(" ", "+")
            + ":wght@400;600&display=swap" for f in families]
    out = html(render_gradio_page({**GRADIO_CONFIG, "stylesheets": urls}, gradio_package))

    files = re.findall(r"url\('\./(static/fonts/[^']+)'\)", out)
    assert len(files) == 2 * len(families)
    for path in files:
        assert (gradio_package / "templates" / "frontend" / unquote(path)).is_file(), path
    assert '"stylesheets":[]' in out


def test_fonts_gradio_does_not_ship_fall_back_to_system_fonts_and_local_sheets_stay():
    lora = "https://fonts.googleapis.com/css?family=Lora:400,700|Inter"
    out = html(render_gradio_page({**GRADIO_CONFIG, "stylesheets": [lora, "custom.css"]}))

    assert '"stylesheets":["custom.css"]' in out
    assert "@font-face" not in out and "googleapis" not in out


def test_space_css_import_and_head_link_inside_the_config_are_dropped():
    # gr.Blocks(css=..., head=...) as Spaces write them, rendered through toorjson.
    config = {
        **GRADIO_CONFIG,
        "css": "@import url('https://fonts.googleapis.com/css2?family=Inter:wght@400;700"
               "&display=swap');\n.gradio-container {max-width: 800px}",
        "head": '<link href="https://fonts.googleapis.com/css2?family=Lora&display=swap" '
                'rel="stylesheet"><meta name="x" content="y">',
    }
    out = html(render_gradio_page(config))

    assert '"css":"\\n.gradio-container {max-width: 800px}"' in out
    assert '"head":"\\u003cmeta name=\\"x\\" content=\\"y\\"\\u003e"' in out
    assert "googleapis" not in out


@pytest.mark.parametrize("statement", [
    "@import url('https://fonts.googleapis.com/css2?family=Inter:wght@400;700&display=swap');",
    '@import url("https://fonts.googleapis.com/css2?family=Inter");',
    "@import url(https://fonts.googleapis.com/css2?family=Roboto:wght@400;700&display=swap);",
    '@import "https://fonts.googleapis.com/css?family=Roboto:400,700";',
    "@import url('//fonts.googleapis.com/css2?family=Inter') screen and (min-width: 1px);",
    "@IMPORT URL('https://fonts.googleapis.com/css2?family=Inter');",
])
def test_google_fonts_imports_are_dropped_from_css(statement):
    sheet = f"{statement}\n@import url('theme-extra.css');\nbody {{ color: red; }}\n"
    assert css(sheet) == "\n@import url('theme-extra.css');\nbody { color: red; }\n"
    page = f"<html><head><style>{sheet}</style></head></html>"
    assert html(page) == page.replace(statement, "")


def test_google_fonts_links_of_any_kind_are_dropped_from_html():
    page = ('<head><link rel="dns-prefetch" href="//fonts.gstatic.com">\n'
            "<LINK href='https://fonts.googleapis.com/css2?family=Inter&amp;display=swap' "
            "rel=stylesheet>\n"
            '<link rel="stylesheet" href="./local.css"><title>x</title></head>')
    assert html(page) == (
        '<head>\n\n<link rel="stylesheet" href="./local.css"><title>x</title></head>')


def test_bodies_without_internet_references_are_left_alone():
    assert rewrite(GRADIO_ROW, "text/html", b"<html><body>hello</body></html>") is None
    assert rewrite(GRADIO_ROW, "text/css", b"body { font-family: sans-serif; }") is None
    assert rewrite({"sdk": "static"}, "text/html",
                   b'<a href="https://fonts.google.com/">fonts</a>') is None
    script = b'l.href="https://fonts.googleapis.com/css2?family=Inter"'
    assert rewrite(GRADIO_ROW, "application/javascript", script) is None


def test_streamlit_index_has_nothing_to_rewrite():
    assert rewrite({"sdk": "streamlit"}, "text/html", STREAMLIT_INDEX.encode()) is None


@pytest.mark.podman
def test_streamlit_real_index_and_css_have_nothing_to_rewrite(streamlit_package):
    index = (streamlit_package / "static" / "index.html").read_text()
    assert rewrite({"sdk": "streamlit"}, "text/html", index.encode()) is None
    sheets = list((streamlit_package / "static" / "static" / "css").glob("*.css"))
    assert sheets
    for sheet in sheets:
        assert rewrite({"sdk": "streamlit"}, "text/css", sheet.read_bytes()) is None, sheet


@pytest.mark.podman
def test_gradio_real_index_and_frontend_css_have_nothing_more_to_rewrite(gradio_package):
    index = gradio_head_template(gradio_package)
    assert PRECONNECT_GOOGLEAPIS in index and PRECONNECT_GSTATIC in index
    assert CDNJS in index
    sheets = list((gradio_package / "templates" / "frontend" / "assets").glob("*.css"))
    assert sheets
    for sheet in sheets:
        assert rewrite(GRADIO_ROW, "text/css", sheet.read_bytes()) is None, sheet


class NoRegexWork:
    """A stand-in for a compiled pattern that fails the test when it is used."""

    def __getattr__(self, name: str):
        raise AssertionError(f"a page without markers went through a regex ({name})")


def test_a_large_page_without_markers_costs_no_regex_work(monkeypatch):
    import appliance.web.offline as offline

    for name, value in vars(offline).copy().items():
        if isinstance(value, re.Pattern):
            monkeypatch.setattr(offline, name, NoRegexWork())
    body = b"<p>" + b"x" * (2 * 1024 * 1024) + b"</p>"
    for kind in ("text/html", "text/css"):
        assert rewrite(GRADIO_ROW, kind, body) is None


def test_container_env_turns_off_what_phones_home():
    assert all(isinstance(v, str) for v in CONTAINER_ENV.values())
    # gradio/analytics.py: analytics_enabled() is os.getenv(..., "True") == "True".
    assert CONTAINER_ENV["GRADIO_ANALYTICS_ENABLED"] != "True"
    assert CONTAINER_ENV["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert CONTAINER_ENV["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] == "false"


# --- Chromium with the network cut ---------------------------------------------------------


@contextlib.contextmanager
def stalling_proxy() -> Iterator[tuple[int, list[socket.socket]]]:
    """Listen on loopback, accept every connection and never answer: an air gap that stalls."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1], held
    finally:
        listener.close()
        for conn in held:
            conn.close()


def airgap_args(proxy_port: int) -> list[str]:
    """Chromium flags that send every non-loopback request into the stalling proxy.

    Chromium never proxies loopback (127.0.0.0/8, localhost, [::1]) unless told to with
    `<-loopback>`, which would stall the page under test too; add LAN hosts under test
    with --proxy-bypass-list=HOST;HOST. Through a proxy, Chromium does no DNS of its own.
    """
    return ["--no-sandbox",  # needed as root
            f"--proxy-server=http://127.0.0.1:{proxy_port}",
            "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
            "--disable-background-networking", "--disable-component-update"]


@contextlib.contextmanager
def airgapped_chromium() -> Iterator[tuple[object, list[socket.socket]]]:
    """Yield a Playwright browser (Debian's chromium) cut off from everything but loopback."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with stalling_proxy() as (port, held), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=airgap_args(port))
        try:
            yield browser, held
        finally:
            browser.close()


@contextlib.contextmanager
def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def offline_file(self) -> bool:
        """Serve /static/offline/... from the checkout, as the portal does."""
        if not self.path.startswith(OFFLINE_URL + "/"):
            return False
        path = (OFFLINE_DIR / self.path[len(OFFLINE_URL) + 1:].split("?")[0]).resolve()
        if OFFLINE_DIR in path.parents and path.is_file():
            self.reply(200, "text/javascript", path.read_bytes())
        else:
            self.reply(404, "text/plain", b"not found")
        return True


def load_time(browser: object, url: str, timeout_ms: int) -> tuple[float | None, list[str]]:
    """Open url; return seconds to the `load` event (None: it never came) and the
    non-loopback URLs the page asked for."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = browser.new_page()
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "data:")) else None)
    started = time.monotonic()
    try:
        page.goto(url, wait_until="load", timeout=timeout_ms)
        took: float | None = time.monotonic() - started
    except PlaywrightTimeout:
        took = None
    page.close()
    return took, outside


needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason="apt-get install chromium (scripts/test.sh does)")


@needs_chromium
def test_air_gapped_chromium_stalls_on_google_fonts_until_the_page_is_rewritten():
    page = (
        '<!doctype html><html><head><link rel="preconnect" href="https://fonts.googleapis.com">'
        '<link rel="stylesheet" href="https://fonts.googleapis.com/css2?family=Roboto'
        ':wght@400;700&display=swap">'
        "<style>@import url('https://fonts.googleapis.com/css2?family=Inter');</style>"
        f'<script src="{CDNJS}" async></script></head><body><p>hello</p></body></html>'
    ).encode()

    class Pages(QuietHandler):
        def do_GET(self) -> None:
            if self.offline_file():
                return
            body = page if self.path == "/raw" else rewrite(GRADIO_ROW, "text/html", page)
            self.reply(200, "text/html; charset=utf-8", body)

    with serve(Pages) as port, airgapped_chromium() as (browser, held):
        took, outside = load_time(browser, f"http://127.0.0.1:{port}/raw", 3000)
        assert took is None, "the load event came although Google Fonts never answered"
        assert any("fonts.googleapis.com" in u for u in outside) and held

        # Liveness bound: loads in well under a second from loopback; 30 s tells that from a
        # page that waits on the stalling proxy (which never answers).
        took, outside = load_time(browser, f"http://127.0.0.1:{port}/rewritten", 30_000)
        assert took is not None
        assert outside == []


# --- a real Gradio 5.9.1 app, air-gapped --------------------------------------------------

OUTBOUND_LOG = "/tmp/outbound.log"  # inside the Space's container
AUDIT_HOOK = f'''
import sys
_log = open("{OUTBOUND_LOG}", "a", buffering=1)
def _hook(event, args):
    if event == "socket.getaddrinfo" and args[0] not in (
            "127.0.0.1", "localhost", "0.0.0.0", "::1", None):
        _log.write(f"{{args[0]}}\\n")
sys.addaudithook(_hook)
'''
HELLO_APP = '''
import gradio as gr
gr.Interface(lambda name: "Hello " + name, gr.Textbox(label="name"),
             gr.Textbox(label="output")).launch()
'''



def rewriting_proxy(upstream: int, rewritten: bool) -> type[QuietHandler]:
    """A stand-in for web_proxy: forward to the app, streaming, and call the hook."""

    class Proxy(QuietHandler):
        def forward(self) -> None:
            if self.offline_file():
                return
            length = int(self.headers.get("Content-Length") or 0)
            conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("accept-encoding", "connection")}
            conn.request(self.command, self.path, self.rfile.read(length) or None, headers)
            response = conn.getresponse()
            content_type = response.getheader("Content-Type", "")
            if content_type.startswith(("text/html", "text/css")):
                body = response.read()
                if rewritten:
                    body = rewrite(GRADIO_ROW, content_type, body) or body
                self.reply(response.status, content_type, body)
                return
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            while chunk := response.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()
            self.close_connection = True

        do_GET = do_POST = forward

    return Proxy


@needs_chromium
@pytest.mark.podman
def test_real_gradio_app_works_air_gapped_only_once_rewritten(gradio_space):
    # The app runs in its own Space's container, on the image's Python: nothing on the host
    # needs to match it.
    port = gradio_space["port"]
    with airgapped_chromium() as (browser, _), \
            serve(rewriting_proxy(port, rewritten=False)) as raw, \
            serve(rewriting_proxy(port, rewritten=True)) as rewritten:
        took, outside = load_time(browser, f"http://127.0.0.1:{raw}/", 5000)
        assert took is None
        assert any("fonts.googleapis.com/css2?family=Source+Sans+Pro" in u for u in outside)

        page = browser.new_page()
        outside = []
        page.on("request", lambda r: outside.append(r.url)
                if not r.url.startswith(("http://127.0.0.1", "data:")) else None)
        page.goto(f"http://127.0.0.1:{rewritten}/", wait_until="load", timeout=5000)
        page.get_by_label("name").fill("World", timeout=10000)
        page.get_by_role("button", name="Submit").click()
        answer = page.get_by_label("output")
        wait_for(lambda: answer.input_value() == "Hello World", 30,
                 "gradio's answer (liveness bound: it takes well under a second)")
        fonts = page.evaluate("Array.from(document.fonts)"
                              ".filter(f => f.status == 'loaded').map(f => f.family)")
        assert "Source Sans Pro" in fonts
        assert outside == []
    outbound = as_service("podman", "exec", gradio_space["container"], "cat", OUTBOUND_LOG,
                          check=False)
    assert outbound.returncode == 0, f"the audit hook never ran: {outbound.stderr}"
    assert outbound.stdout == "", "gradio looked up internet hosts"


def main(url: str) -> None:
    """Open url in air-gapped Chromium; say whether `load` came and what went outside."""
    from playwright.sync_api import sync_playwright

    with stalling_proxy() as (port, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=airgap_args(port))
        took, outside = load_time(browser, url, 15000)
        browser.close()
    print("load event:", "never (15 s)" if took is None else f"{took:.2f} s")
    for request in outside:
        print("stalled:", request)


if __name__ == "__main__":
    main(sys.argv[1])
