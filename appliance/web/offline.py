"""Make proxied Space pages load with no internet: serve from the box, or drop, what they fetch.

The Spaces' proxy hands each text/html and text/css response to `rewrite`. What the pages of
Gradio 5.9.1 and Streamlit 1.40.1 fetch from the internet on load, and what happens to it:

- Gradio's index.html preconnects to fonts.googleapis.com and fonts.gstatic.com (dropped)
  and loads iframe-resizer 4.3.1 from cdnjs with an async script, which holds the page's
  `load` event until it arrives (served from /static/offline/ instead).
- Gradio themes built on `GoogleFont` (the default theme: Source Sans Pro) list a Google Fonts
  stylesheet in the config's `stylesheets`, and the app awaits it before rendering anything:
  one stalled request and the page stays blank. Dropped; families Gradio ships in its own
  static/fonts get @font-face rules on those files, others fall back to the theme's system
  fonts.
- Containers run with SYSTEM=spaces, so the config carries `space_id`, and a page opened
  outside huggingface.co then builds Hugging Face's "Space by" badge: it fetches
  huggingface.co/api/spaces/<id> and two Google Fonts stylesheets. Nulled: the Space is served
  here. (It also keeps the API page's snippets pointing at this box, not at huggingface.co.)
- `@import` of Google Fonts in CSS, in <style> and in a Space's custom css: dropped.

Streamlit 1.40.1's index.html and CSS load nothing from the internet (its fonts are bundled);
its browser-side usage statistics are off through `CONTAINER_ENV`. URLs that scripts build
at run time (Streamlit's emoji favicons and material icons, Gradio's video trimming) are out of
reach of a rewrite; they fail or stall on their own without holding the page.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..core import spaces

OFFLINE_URL = "/static/offline"
IFRAME_RESIZER = f"{OFFLINE_URL}/iframe-resizer/4.3.1/iframeResizer.contentWindow.min.js"

# What every Space container gets so its SDK does not phone home at startup (the tests hold
# the evidence); declared by the Spaces service, which starts the containers.
CONTAINER_ENV: dict[str, str] = spaces.OFFLINE_ENV

# Bodies without any of these are returned untouched before any regular expression runs.
_MARKERS = (b"fonts.googleapis.com", b"fonts.gstatic.com", b"/iframe-resizer/",
            b"window.gradio_config")

# A quote as it appears in HTML or CSS, or escaped inside a JSON string of Gradio's config.
_Q = rb"""(?:\\u0022|\\u0027|\\"|"|')"""
_GOOGLE_CSS = rb"(?:https?:)?//fonts\.googleapis\.com/"
_IMPORT_RE = re.compile(
    rb"@import\s+(?:url\(\s*" + _Q + rb"?" + _GOOGLE_CSS + rb"[^)]*\)"
    rb"|" + _Q + _GOOGLE_CSS + rb".*?" + _Q + rb")[^;{}]*;",
    re.IGNORECASE,
)
# Any <link> naming a Google Fonts host: stylesheet, preconnect, dns-prefetch or preload.
_LINK_RE = re.compile(
    rb"(?:<|\\u003c)link\b(?:(?!\\u003e)[^<>])*?(?:https?:)?//fonts\.(?:googleapis|gstatic)\.com"
    rb"(?:(?!\\u003e)[^<>])*(?:>|\\u003e)",
    re.IGNORECASE,
)
_IFRAME_RESIZER_RE = re.compile(
    rb"(?:https?:)?//cdnjs\.cloudflare\.com/ajax/libs/iframe-resizer/[0-9.]+/"
    rb"iframeResizer\.contentWindow(?:\.min)?\.js"
)
_STYLESHEETS_RE = re.compile(rb'"stylesheets":\s*\[([^\]]*)\]')
_JSON_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')
_SPACE_ID_RE = re.compile(rb'"space_id":\s*"(?:[^"\\]|\\.)*"')
_FONTS_STYLE = b'<style data-appliance="offline-fonts">'

# Fonts in gradio/templates/frontend/static/fonts (Gradio 5), served by the app at
# ./static/fonts/, relative to the page as its own ./assets/ are.
_GRADIO_FONTS = {
    "IBM Plex Mono": "IBMPlexMono/IBMPlexMono",
    "IBM Plex Sans": "IBMPlexSans/IBMPlexSans",
    "Inconsolata": "Inconsolata/Inconsolata",
    "Montserrat": "Montserrat/Montserrat",
    "Quicksand": "Quicksand/Quicksand",
    "Source Sans Pro": "Source%20Sans%20Pro/SourceSansPro",
}


def rewrite(space_row: dict[str, Any], content_type: str, body: bytes) -> bytes | None:
    """Return body with its internet references localised or dropped, or None if unchanged."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind not in ("text/html", "text/css") or not any(m in body for m in _MARKERS):
        return None
    new = _IMPORT_RE.sub(b"", body)
    if kind == "text/html":
        new = _LINK_RE.sub(b"", new)
        new = _IFRAME_RESIZER_RE.sub(IFRAME_RESIZER.encode(), new)
        if b"window.gradio_config" in new:
            new = _localise_gradio_config(new)
    return None if new == body else new


def _localise_gradio_config(html: bytes) -> bytes:
    families: list[str] = []

    def drop_google_stylesheets(match: re.Match[bytes]) -> bytes:
        kept = []
        for raw in _JSON_STRING_RE.findall(match.group(1)):
            url = json.loads(raw)
            if _is_google_fonts(url):
                families.extend(_families(url))
            else:
                kept.append(raw)
        return b'"stylesheets":[' + b",".join(kept) + b"]"

    html = _STYLESHEETS_RE.sub(drop_google_stylesheets, html, count=1)
    html = _SPACE_ID_RE.sub(b'"space_id":null', html, count=1)
    faces = _font_faces(families)
    if faces and b"</head>" in html:
        html = html.replace(b"</head>", _FONTS_STYLE + faces + b"</style>\n</head>", 1)
    return html


def _is_google_fonts(url: str) -> bool:
    return urlsplit(url).hostname == "fonts.googleapis.com"


def _families(url: str) -> list[str]:
    """Name the font families a Google Fonts URL asks for (css2 and the older css API)."""
    names = []
    for value in parse_qs(urlsplit(url).query).get("family", []):
        names += [part.split(":", 1)[0].strip() for part in value.split("|")]
    return names


def _font_faces(families: list[str]) -> bytes:
    rules = []
    for family in dict.fromkeys(families):
        path = _GRADIO_FONTS.get(family)
        if path is None:
            continue
        for weight, style in ((400, "Regular"), (700, "Bold")):
            rules.append(
                f"@font-face{{font-family:'{family}';font-weight:{weight};font-style:normal;"
                f"font-display:swap;src:url('./static/fonts/{path}-{style}.woff2') "
                "format('woff2')}")
    return "".join(rules).encode()
