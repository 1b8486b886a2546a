"""The Space page's Files tab and its "Use via API" / "Embed" panels, in-process (Flask's test
client, a real SQLite file, real git checkouts): folders, escaped text with line numbers,
binaries offered as downloads with safe headers, links never followed, hostile paths."""

from __future__ import annotations

import json
import re

import pytest
from conftest import commit, git, make_space_repo

from appliance import stages, users
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core.context import Context, space_paths
from appliance.errors import RuntimeUnavailable
from appliance.gpu.nvml import Inventory
from appliance.web.app import create_app

PASSWORD = "correct horse battery"
HOSTILE = "<script>alert('x')</script>\n<b>bold</b> & \"quotes\"\n"


class NoPodman:
    """The runtime seam: Podman is not used here."""

    def info(self):
        raise RuntimeUnavailable("Podman is not used in these tests")

    def logs(self, name, tail=200):
        return ""


def checkout(config, space_id: str, source, sha: str) -> None:
    dest = space_paths(Context(config, None, None), space_id)[0] / sha
    dest.parent.mkdir(parents=True, exist_ok=True)
    git(dest.parent, "clone", "-q", "--no-local", str(source), dest.name)
    git(dest, "checkout", "-q", "--detach", sha)


@pytest.fixture
def app(tmp_path):
    config = load_config({}, data_dir=str(tmp_path / "data"), port_range="18100-18199")
    source = make_space_repo(tmp_path / "src", {"app.py": "print('hi')\n",
                                                "page.html": HOSTILE})
    (source / "assets").mkdir()
    (source / "assets" / "logo.bin").write_bytes(b"\x89PNG\0\0\x01binary")
    (source / "passwd").symlink_to("/etc/passwd")
    sha = commit(source, {"src/z.py": "z = 1\n"}, "more files")
    checkout(config, "alice/demo", source, sha)
    checkout(config, "alice/private", source, sha)
    store = open_store(config.db_path)
    users.add_user(store, "admin", "admin", PASSWORD, "test")
    for space_id, sdk, visibility, manifest in (
            ("alice/demo", "gradio", "public", {"sdk_version": "5.0.0"}),
            ("alice/private", "gradio", "private", {}),
            ("alice/noembed", "gradio", "public", {"disable_embedding": True}),
            ("alice/lit", "streamlit", "public", {})):
        store.insert_space({
            "id": space_id, "source": "/src", "source_display": "/src", "stage": stages.RUNNING,
            "port": 18100 + len(store.list_spaces()), "hardware": "cpu", "desired": "running",
            "sdk": sdk, "title": space_id, "created_by": "cli:root", "visibility": visibility,
            "revision": sha if space_id in ("alice/demo", "alice/private") else None,
            "manifest": json.dumps(manifest)}, "test")
    store.close()

    def context(cfg, actor):
        return Context(cfg, open_store(cfg.db_path), NoPodman(), actor,
                       read_inventory=lambda: Inventory(available=False, reason="no GPU"))

    return create_app(config, context_factory=context)


def page(app, url: str, status: int = 200) -> str:
    response = app.test_client().get(url)
    assert response.status_code == status, (url, response.status_code)
    return response.get_data(as_text=True)


def test_files_tab_lists_folders_first_with_sizes_and_marks_links(app):
    html = page(app, "/spaces/alice/demo/files")
    names = re.findall(r'href="/spaces/alice/demo/files/([^"]+)"', html)
    assert names[:2] == ["assets", "src"] and "app.py" in names and "page.html" in names
    assert "passwd" not in names  # a link is listed, not linked to
    assert "passwd <span class=\"meta\">(symbolic link, not followed)</span>" in html
    assert "12 Bytes" in html  # app.py
    assert page(app, "/spaces/alice/demo/files/src").count("z.py") >= 1


def test_a_text_file_is_shown_escaped_with_line_numbers(app):
    html = page(app, "/spaces/alice/demo/files/page.html")
    assert "<script>alert" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert '<span class="ln">1</span>' in html and '<span class="ln">2</span>' in html
    assert 'href="/spaces/alice/demo/download/page.html"' in html


def test_a_binary_file_is_offered_as_a_download(app):
    html = page(app, "/spaces/alice/demo/files/assets/logo.bin")
    assert "This is a binary file: download it to open it." in html
    assert 'href="/spaces/alice/demo/download/assets/logo.bin"' in html


def test_downloads_are_attachments_never_html(app):
    response = app.test_client().get("/spaces/alice/demo/download/page.html")
    assert response.status_code == 200 and response.data == HOSTILE.encode()
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Content-Disposition"].startswith('attachment; filename="page.html"')
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in response.headers["Content-Security-Policy"]
    binary = app.test_client().get("/spaces/alice/demo/download/assets/logo.bin")
    assert binary.headers["Content-Type"] == "application/octet-stream"
    assert binary.data == b"\x89PNG\0\0\x01binary"


def test_a_link_is_never_followed(app):
    html = page(app, "/spaces/alice/demo/files/passwd")
    assert "This is a symbolic link: listed, never followed." in html and "root:" not in html
    response = app.test_client().get("/spaces/alice/demo/download/passwd")
    assert response.status_code == 404 and b"root:" not in response.data
    assert "is a symbolic link: this box lists links but never follows them" in \
        response.get_data(as_text=True)


@pytest.mark.parametrize("path", ["../../../etc/passwd", "src/../../x", "%2e%2e/secret",
                                  "a\\b"])
def test_a_path_out_of_the_repository_is_refused_with_why(app, path):
    html = page(app, f"/spaces/alice/demo/files/{path}", status=400)
    assert "Path" in html and ("&#39;..&#39; part" in html or "backslash" in html)


def test_a_missing_file_says_which(app):
    html = page(app, "/spaces/alice/demo/files/nope.py", status=404)
    assert "No file or folder &#39;nope.py&#39; in alice/demo" in html


def test_a_private_space_files_need_a_login(app):
    response = app.test_client().get("/spaces/alice/private/files")
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    response = app.test_client().get("/spaces/alice/private/download/app.py")
    assert response.status_code == 302 and b"print" not in response.data
    client = app.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"',
                      client.get("/login").get_data(as_text=True))[1]
    client.post("/login", data={"username": "admin", "password": PASSWORD,
                                "csrf_token": token})
    assert client.get("/spaces/alice/private/download/app.py").data == b"print('hi')\n"


def test_space_page_links_files_and_shows_how_to_use_and_embed_a_gradio_app(app):
    html = page(app, "/spaces/alice/demo")
    assert 'href="/spaces/alice/demo/files">Files</a>' in html
    client_line = re.search(r"client = Client\((.+)\)", html)
    url = json.loads(client_line[1].replace("&#34;", '"'))
    assert url.endswith("/s/alice--demo/") and url.startswith("http")
    assert f"{url}gradio_api/mcp/sse" in html
    assert "Client.connect(" in html and f"{url}gradio_api/call/predict" in html
    assert "&lt;iframe src=&#34;" in html or f'&lt;iframe src="{url}"' in html
    assert "5.0.0/gradio.js" in html and "&lt;gradio-app src=" in html


def test_embedding_is_offered_only_where_the_space_allows_it(app):
    assert "Embed this Space" not in page(app, "/spaces/alice/noembed")
    lit = page(app, "/spaces/alice/lit")
    assert "Embed this Space" in lit and "Use via API" not in lit
    assert ">Files</a>" not in lit  # not fetched yet: nothing to list
