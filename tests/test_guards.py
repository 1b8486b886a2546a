"""Guards an attacker meets: who the portal believes the client is (X-Forwarded-For and its
kin), what a Space's Set-Cookie may reach through the proxy, and hostile tars and model
entries in an offline bundle.

The portal is the real Flask app on a real SQLite file; a Space's app is a real HTTP server
on localhost that the Space's row points at (as the router's port would), so no Podman is
needed. Bundles are real tar files imported with `import_bundle`; the runtime is replaced at
its seam by one that records what it is asked and refuses to load anything, so a refusal
that comes too late (after Podman was asked) shows.

Writing these found holes, each fixed with its test here: nameless cookies carrying the
portal's cookie name, a Space's Domain= in host mode, chains of links leaving a bundled
repository, a NUL in a member's name, model entries checked after images were loaded, a model
file under another, and a bundled repository's own git config and hooks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from conftest import http_server

from appliance import users
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core import bundles, spaces
from appliance.errors import ApplianceError, RuntimeUnavailable
from appliance.gpu.nvml import Inventory
from appliance.web.app import create_app

PASSWORD = "correct horse battery"
PEER = "10.1.2.3"  # a client on the network, not the box itself
APPS_PORT = 18481  # the apps' origin in host mode (only compared, never bound)


# -- a Space's app: a real HTTP server on localhost -------------------------------------------


class SpaceApp(BaseHTTPRequestHandler):
    """/echo answers the request's headers as JSON; /set answers one Set-Cookie per ?c=."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        """No access log on the test's stderr."""

    def do_GET(self) -> None:
        route = urlsplit(self.path)
        if route.path == "/set":
            cookies = parse_qs(route.query, keep_blank_values=True).get("c", [])
            headers = [("Set-Cookie", value) for value in cookies]
            body = b"{}"
        else:
            headers = []
            body = json.dumps({"headers": [[k, v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def space_app():
    with http_server(SpaceApp) as port:
        yield port


class NoPodman:
    """The runtime seam for portal pages: Podman is not reachable in these tests."""

    def info(self):
        raise RuntimeUnavailable("Podman is not used in these tests")


def make_portal(root: Path, app_port: int | None = None, admin: bool = True, **settings):
    """The real portal on a SQLite file under root; Space alice/app points at app_port."""
    config = load_config({}, data_dir=str(root / "data"), router_host="127.0.0.1",
                         port_range="18000-18099", **settings)

    def context(cfg, actor):
        return spaces.Context(cfg, open_store(cfg.db_path), NoPodman(), actor,
                              read_inventory=lambda: Inventory(available=False, reason="no GPU"))

    app = create_app(config, context_factory=context)
    store = open_store(config.db_path)
    if admin:
        users.add_user(store, "admin", "admin", PASSWORD, "test")
    if app_port:
        store.insert_space({
            "id": "alice/app", "source": "/src", "source_display": "/src", "stage": "RUNNING",
            "sdk": "gradio", "port": app_port, "backend_port": app_port, "hardware": "cpu",
            "desired": "running", "manifest": json.dumps({"sdk": "gradio"})}, "test")
    store.close()
    app.config["store_path"] = config.db_path
    return app


def with_store(app, use):
    store = open_store(app.config["store_path"])
    try:
        return use(store)
    finally:
        store.close()


def csrf_session(client) -> str:
    """Put a CSRF token in the client's session (a page would have rendered it) and return
    it: the requests below are refused for who sends them, not for a missing token."""
    with client.session_transaction() as session:
        session["csrf"] = "test-csrf-token"
    return "test-csrf-token"


def log_in(client, password: str, **request_args):
    return client.post("/login", data={"username": "admin", "password": password,
                                       "csrf_token": csrf_session(client)}, **request_args)


# -- 1. who the client is: never what an untrusted peer's headers say ---------------------------

SPOOFS = [
    {"X-Forwarded-For": "198.51.100.{n}"},
    {"X-Forwarded-For": "198.51.100.{n}, 127.0.0.1"},
    {"X-Real-IP": "198.51.100.{n}"},
    {"Forwarded": "for=198.51.100.{n}"},
    {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "::1", "Forwarded": "for=\"[::1]\""},
]


@pytest.mark.parametrize("spoof", SPOOFS, ids=["xff", "xff-chain", "x-real-ip", "forwarded",
                                               "all-localhost"])
def test_the_login_limit_counts_the_peer_whatever_forwarding_headers_it_sends(tmp_path,
                                                                              spoof):
    app = make_portal(tmp_path)
    limit = app.extensions["appliance.config"].login_attempts
    client = app.test_client()
    for n in range(limit):
        headers = {k: v.format(n=n) for k, v in spoof.items()}
        response = log_in(client, "wrong password!", headers=headers,
                          environ_base={"REMOTE_ADDR": PEER})
        assert response.status_code == 401, n
    # A fresh forwarded address, and the right password: still this peer, still refused.
    headers = {k: v.format(n=limit + 1) for k, v in spoof.items()}
    response = log_in(client, PASSWORD, headers=headers, environ_base={"REMOTE_ADDR": PEER})
    assert response.status_code == 429
    assert b"Too many failed logins from this address" in response.data
    counted = with_store(app, lambda store: {
        address: store.login_failures(address, 0)
        for address in (PEER, "127.0.0.1", "::1", "198.51.100.0", f"198.51.100.{limit - 1}")})
    assert counted == {PEER: limit, "127.0.0.1": 0, "::1": 0, "198.51.100.0": 0,
                       f"198.51.100.{limit - 1}": 0}
    # The limit is per peer: another client on the network logs in.
    other = log_in(app.test_client(), PASSWORD, environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert other.status_code == 302


@pytest.mark.parametrize("spoof", [
    {"X-Forwarded-For": "127.0.0.1"}, {"X-Forwarded-For": "::1"}, {"X-Real-IP": "127.0.0.1"},
    {"Forwarded": "for=127.0.0.1"},
    {"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Host": "127.0.0.1:8080"},
])
def test_a_network_peer_cannot_pose_as_the_box_to_create_the_first_admin(tmp_path, spoof):
    app = make_portal(tmp_path, admin=False)
    client = app.test_client()
    page = client.get("/setup", headers=spoof, environ_base={"REMOTE_ADDR": PEER})
    assert page.status_code == 403
    assert b"The first admin can only be created from the box itself" in page.data
    posted = client.post("/setup", headers=spoof, environ_base={"REMOTE_ADDR": PEER}, data={
        "username": "mallory", "password": PASSWORD, "csrf_token": csrf_session(client)})
    assert posted.status_code == 403
    assert b"only be created from the box itself" in posted.data
    assert with_store(app, lambda store: (store.count_admins(), store.find_user("mallory"))) \
        == (0, None)
    # The same request from the box itself is what /setup is for.
    local = app.test_client()
    made = local.post("/setup", environ_base={"REMOTE_ADDR": "127.0.0.1"}, data={
        "username": "root", "password": PASSWORD, "csrf_token": csrf_session(local)})
    assert made.status_code == 302
    assert with_store(app, lambda store: store.count_admins()) == 1


def seen_by_app(response) -> dict[str, str]:
    assert response.status_code == 200, response.data[:300]
    return {k.lower(): v for k, v in response.get_json()["headers"]}


def test_a_space_sees_the_network_peer_not_the_address_it_claims(tmp_path, space_app):
    app = make_portal(tmp_path, space_app, portal_apps_port=0)
    headers = seen_by_app(app.test_client().get("/s/alice--app/echo", headers={
        "X-Forwarded-For": "127.0.0.1, 198.51.100.7", "X-Real-IP": "127.0.0.1",
        "Forwarded": "for=127.0.0.1;host=evil.example"}, environ_base={"REMOTE_ADDR": PEER}))
    assert headers["x-forwarded-for"] == PEER
    assert "x-real-ip" not in headers and "forwarded" not in headers
    # A proxy on the box itself may say whom it forwards for; the chain ends with it.
    local = seen_by_app(app.test_client().get(
        "/s/alice--app/echo", headers={"X-Forwarded-For": "198.51.100.7"},
        environ_base={"REMOTE_ADDR": "127.0.0.1"}))
    assert local["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"


# -- 2. a Space's Set-Cookie through the proxy ----------------------------------------------------


def set_cookies(client, path: str, cookies: list[str], **request_args) -> list[str]:
    """Ask the Space's /set (at path) to answer one Set-Cookie per cookie."""
    # In the path itself: the test client leaves a query_string= out of REQUEST_URI, which
    # the proxy forwards as the visitor sent it.
    response = client.get(f"{path}?{urlencode([('c', c) for c in cookies])}", **request_args)
    assert response.status_code == 200, response.data[:300]
    return response.headers.getlist("Set-Cookie")


def attributes(cookie: str) -> dict[str, list[str]]:
    """A Set-Cookie's attributes as a browser reads them: name lower-cased -> values."""
    found: dict[str, list[str]] = {}
    for item in cookie.split(";")[1:]:
        name, _, value = item.partition("=")
        found.setdefault(name.strip().lower(), []).append(value.strip())
    return found


def name_sent_back(cookie: str) -> str:
    """The name a server reads when a browser sends the cookie back (RFC 6265bis 5.6,
    5.8.3): a pair with no "=", or with nothing before it, is a nameless cookie, sent as its
    value alone; so "=a=b" comes back as "a=b" and "a" as "a", read as a cookie named a."""
    pair = cookie.split(";", 1)[0]
    name, equals, value = pair.partition("=")
    if not equals:
        return pair.strip()
    if not name.strip():
        return value.partition("=")[0].strip()
    return name.strip()


@pytest.mark.parametrize(("sent", "path"), [
    ("x=1; Domain=localhost; Path=/", "/s/alice--app/"),
    ("x=1; domain=.localhost; PATH=/", "/s/alice--app/"),
    ("x=1; Path = /login", "/s/alice--app/login"),
    ("x=1; Path=/s/bob--other/", "/s/alice--app/s/bob--other/"),
    ("x=1; Path=/s/alice--appx", "/s/alice--app/s/alice--appx"),
    ("x=1; Path=/s/alice--app/deep", "/s/alice--app/deep"),
])
def test_a_space_cookie_stays_under_its_own_prefix_whatever_path_or_domain(tmp_path, space_app,
                                                                           sent, path):
    """The Spaces and the portal share a host name: the path is what keeps one Space's
    cookie from the portal's pages and from every other Space."""
    app = make_portal(tmp_path, space_app, portal_apps_port=0)
    cookies = set_cookies(app.test_client(), "/s/alice--app/set", [sent],
                          base_url="http://localhost")
    assert len(cookies) == 1
    assert attributes(cookies[0])["path"] == [path]


def test_a_cookie_with_two_paths_has_both_kept_under_the_prefix(tmp_path, space_app):
    """A browser uses the last Path attribute: every one is rewritten, not only the first."""
    app = make_portal(tmp_path, space_app, portal_apps_port=0)
    cookies = set_cookies(app.test_client(), "/s/alice--app/set",
                          ["x=1; Path=/s/alice--app/; Path=/"])
    assert attributes(cookies[0])["path"] == ["/s/alice--app/", "/s/alice--app/"]


@pytest.mark.parametrize("sent", [
    "appliance_session=forged; Path=/",
    " appliance_session = forged ; Path=/; Domain=localhost",
])
def test_a_space_cannot_set_the_portals_session_cookie(tmp_path, space_app, sent):
    app = make_portal(tmp_path, space_app, portal_apps_port=0)
    client = app.test_client()
    assert log_in(client, PASSWORD).status_code == 302
    login_cookie = client.get_cookie("appliance_session")
    cookies = set_cookies(client, "/s/alice--app/set", [sent, "app=1; Path=/"])
    assert cookies == ["app=1; Path=/s/alice--app/"]
    assert client.get_cookie("appliance_session").value == login_cookie.value
    assert client.get("/account").status_code == 200  # still logged in


@pytest.mark.parametrize("sent", ["=appliance_session=forged; Path=/",
                                  " =appliance_session=forged; Path=/s/alice--app/",
                                  "appliance_session; Path=/"])
def test_a_space_cannot_smuggle_the_portals_cookie_name_in_a_nameless_cookie(tmp_path,
                                                                            space_app, sent):
    app = make_portal(tmp_path, space_app, portal_apps_port=0)
    # Werkzeug's own cookie jar cannot read a nameless cookie: this client keeps none.
    cookies = set_cookies(app.test_client(use_cookies=False), "/s/alice--app/set",
                          [sent, "app=1"])
    sent_back = [name_sent_back(cookie) for cookie in cookies]
    assert "appliance_session" not in sent_back, cookies


def on_own_host(app, cookies: list[str]) -> list[str]:
    """Ask alice/app's own host (OWNER--NAME.DOMAIN on the apps port) to set cookies."""
    return set_cookies(app.test_client(), "/set", cookies,
                       base_url=f"http://alice--app.spaces.test:{APPS_PORT}")


def test_a_space_on_its_own_host_cannot_set_the_portals_session_cookie(tmp_path, space_app):
    """With an apps domain the login cookie covers the Spaces' hosts (Domain=spaces.test),
    so a Space's own session cookie of that name would replace it."""
    app = make_portal(tmp_path, space_app, portal_apps_port=APPS_PORT,
                      portal_apps_domain="spaces.test")
    cookies = on_own_host(app, ["appliance_session=forged; Domain=spaces.test; Path=/",
                                "app=1; Path=/"])
    assert cookies == ["app=1; Path=/"]  # its root is its own: the path stays


@pytest.mark.parametrize("domain", ["spaces.test", ".spaces.test", "SPACES.TEST",
                                    "bob--other.spaces.test"])
def test_a_space_on_its_own_host_cannot_set_cookies_for_the_portal_or_other_spaces(
        tmp_path, space_app, domain):
    app = make_portal(tmp_path, space_app, portal_apps_port=APPS_PORT,
                      portal_apps_domain="spaces.test")
    cookies = on_own_host(app, [f"theme=dark; Domain={domain}; Path=/"])
    own = "alice--app.spaces.test"
    for cookie in cookies:
        for value in attributes(cookie).get("domain", []):
            assert value.strip(".").lower() == own, cookie


# -- 3. hostile bundles: the tar, the repositories inside it, the model entries -------------------

REV = "a" * 40
IMAGES = b"not really images"
SPACE = {"id": "team/a", "revision": REV, "sdk": "gradio", "hardware": "cpu",
         "repo": "repos/team--a.tar", "image": "localhost/appliance-space/team--a:x",
         "packages": [], "locks": []}


class Refusing:
    """The runtime seam for bundle import: records each thing Podman is asked and refuses
    it, and notes where the unpacked repositories' entries lead when images are loaded."""

    def __init__(self):
        self.asked: list[str] = []
        self.outside: dict[str, str] = {}

    def load_archive(self, archive: Path):
        self.asked.append("load_archive")
        staging = archive.parent.parent.resolve()
        for top, dirs, files in os.walk(staging):
            for name in dirs + files:
                real = (Path(top) / name).resolve()
                if not real.is_relative_to(staging):
                    self.outside[str(Path(top, name).relative_to(staging))] = str(real)
        raise RuntimeUnavailable("Podman is not used in these tests")

    def __getattr__(self, name: str):
        raise AssertionError(f"the import asked Podman for {name}; it may only ask to load "
                             "the images, which is refused")


@pytest.fixture
def box(tmp_path):
    """An appliance that has no Space yet, on the recording runtime."""
    config = load_config({}, data_dir=str(tmp_path / "data"),
                         package_cache_dir=str(tmp_path / "cache"),
                         local_sources=str(tmp_path / "data" / "repos"))
    store = open_store(config.db_path)
    ctx = spaces.Context(config, store, Refusing(), "test",
                         read_inventory=lambda: Inventory(available=False, reason="no GPU"))
    yield ctx
    store.close()


def listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def write_bundle(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes],
                 models: list | None = None, spaces_: list | None = None) -> None:
    """A bundle of the given tar members (parts listed in the manifest with their hashes),
    then an images part and the manifest."""
    parts = {name: {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
             for name, body in data.items()}
    parts[bundles.IMAGES_PART] = {"sha256": hashlib.sha256(IMAGES).hexdigest(),
                                  "size": len(IMAGES)}
    manifest = {"format": bundles.FORMAT, "version": bundles.VERSION,
                "spaces": spaces_ or [], "models": models or [],
                "images": {"part": bundles.IMAGES_PART, "tags": []}, "parts": parts}
    raw = json.dumps(manifest).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info in members:
            body = data.get(info.pax_headers.get("path", info.name))
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
        for name, body in ((bundles.IMAGES_PART, IMAGES), (bundles.MANIFEST, raw)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0,
           pax_name: bool = False) -> tarfile.TarInfo:
    """A tar member; pax_name writes the name in a pax header, where NUL and newline
    survive."""
    info = tarfile.TarInfo("placeholder" if pax_name else name)
    if pax_name:
        info.pax_headers = {"path": name}
    info.type, info.linkname, info.size, info.mode = kind, link, size, 0o644
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def assert_nothing_changed(ctx, root: Path, before: set[str]) -> None:
    """No file appeared outside the (removed) staging area, nothing was installed, and
    Podman was never asked to load anything."""
    assert listing(root) - before <= {"data/bundles"}, sorted(listing(root) - before)
    assert list((ctx.config.data_path / "bundles").iterdir()) == []  # staging removed
    assert ctx.store.list_spaces() == [] and ctx.store.locks() == []
    assert not ctx.config.package_cache_path.exists()
    assert not (ctx.config.data_path / "repos").exists()
    assert ctx.runtime.asked == []


def import_refused(ctx, path: Path) -> bundles.BundleError:
    with pytest.raises(bundles.BundleError) as caught:
        bundles.import_bundle(ctx, path, allow_unsigned=True)
    return caught.value


OUTSIDE = "escaped"  # what every hostile name below tries to write, next to the data dir


@pytest.mark.parametrize(("name", "kind", "link", "says"), [
    ("../" + OUTSIDE, tarfile.REGTYPE, "", "a part with a refused name"),
    ("repos/../../" + OUTSIDE, tarfile.REGTYPE, "", "a part with a refused name"),
    ("repos/a/../../../" + OUTSIDE, tarfile.REGTYPE, "", "a part with a refused name"),
    ("{abs}", tarfile.REGTYPE, "", "a part with a refused name"),
    ("repos/x\n.tar", tarfile.REGTYPE, "", "a part with a refused name"),
    ("repos/x\x00.tar", tarfile.REGTYPE, "", "a part with a refused name"),
    ("repos/team--a.tar", tarfile.SYMTYPE, "../../" + OUTSIDE, "which is not a plain file"),
    ("repos/team--a.tar", tarfile.SYMTYPE, "/etc/passwd", "which is not a plain file"),
    ("repos/team--a.tar", tarfile.LNKTYPE, "/etc/passwd", "which is not a plain file"),
    ("repos/team--a.tar", tarfile.FIFOTYPE, "", "which is not a plain file"),
    ("repos/team--a.tar", tarfile.CHRTYPE, "", "which is not a plain file"),
    ("repos/team--a.tar", tarfile.BLKTYPE, "", "which is not a plain file"),
    ("repos", tarfile.DIRTYPE, "", "which is not a plain file"),
], ids=["dotdot", "dotdot-under-repos", "deeper-dotdot", "absolute", "newline", "nul",
        "symlink-out", "symlink-absolute", "hardlink", "fifo", "char-device", "block-device",
        "directory"])
def test_a_bundle_member_that_is_not_a_plain_part_is_refused_naming_it(box, tmp_path, name,
                                                                         kind, link, says):
    name = name.replace("{abs}", str(tmp_path / OUTSIDE))
    body = b"hostile" if kind == tarfile.REGTYPE else None
    write_bundle(tmp_path / "b.tar", [member(name, kind, link, len(body or b""),
                                             pax_name=True)],
                 {name: body} if body else {}, spaces_=[SPACE])
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert says in refusal.message
    assert repr(name) in refusal.message  # the member, as its repr shows hostile characters
    assert refusal.hint == "this is not an appliance bundle"
    assert not (tmp_path.parent / OUTSIDE).exists()
    assert_nothing_changed(box, tmp_path, before)


def repo_tar(members: list[tuple[str, bytes, str]], with_git: bool = True) -> bytes:
    """A Space's repository tar: (name, kind, link or content) members, after a .git/."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = ([(".git", tarfile.DIRTYPE, ""), (".git/HEAD", tarfile.REGTYPE, "ref\n")]
                   if with_git else []) + members
        for name, kind, extra in entries:
            body = extra.encode() if kind == tarfile.REGTYPE else b""
            info = member(name, kind, "" if kind == tarfile.REGTYPE else extra, len(body),
                          pax_name=True)
            tar.addfile(info, io.BytesIO(body) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


def repo_bundle(path: Path, members: list[tuple[str, bytes, str]]) -> None:
    data = {SPACE["repo"]: repo_tar(members)}
    write_bundle(path, [member(SPACE["repo"], size=len(data[SPACE["repo"]]))], data,
                 spaces_=[SPACE])


@pytest.mark.parametrize(("members", "says"), [
    ([("../" + OUTSIDE, tarfile.REGTYPE, "x")], "a path outside its tree: ../escaped"),
    ([("{abs}", tarfile.REGTYPE, "x")], "a path outside its tree: {abs}"),
    ([("a/../../" + OUTSIDE, tarfile.REGTYPE, "x")],
     "a path outside its tree: a/../../escaped"),
    ([("l", tarfile.SYMTYPE, "../../../" + OUTSIDE)],
     "a link leaving its tree: l -> ../../../escaped"),
    ([("l", tarfile.SYMTYPE, "/etc/passwd")], "a link leaving its tree: l -> /etc/passwd"),
    ([("sub/l", tarfile.SYMTYPE, "../..")], "a link leaving its tree: sub/l -> ../.."),
    ([("here", tarfile.SYMTYPE, "."), ("here/../../" + OUTSIDE, tarfile.REGTYPE, "x")],
     "a path outside its tree: here/../../escaped"),
    ([("h", tarfile.LNKTYPE, "/etc/passwd")], "h, not a file or directory"),
    ([("f", tarfile.REGTYPE, "x"), ("h", tarfile.LNKTYPE, "f")],
     "h, not a file or directory"),
    ([("p", tarfile.FIFOTYPE, "")], "p, not a file or directory"),
    ([("c", tarfile.CHRTYPE, "")], "c, not a file or directory"),
    ([("b", tarfile.BLKTYPE, "")], "b, not a file or directory"),
], ids=["dotdot", "absolute", "inner-dotdot", "symlink-out", "symlink-absolute",
        "symlink-up-from-a-folder", "write-through-a-symlink", "hardlink-out",
        "hardlink-in", "fifo", "char-device", "block-device"])
def test_a_repository_member_leaving_its_tree_is_refused_before_anything_is_installed(
        box, tmp_path, members, says):
    members = [(name.replace("{abs}", str(tmp_path / OUTSIDE)), kind, extra)
               for name, kind, extra in members]
    repo_bundle(tmp_path / "b.tar", members)
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert refusal.message == "team--a.tar holds " + says.replace("{abs}",
                                                                  str(tmp_path / OUTSIDE))
    assert not (tmp_path / OUTSIDE).exists() and not (tmp_path.parent / OUTSIDE).exists()
    assert_nothing_changed(box, tmp_path, before)


def test_a_repository_without_git_is_refused_naming_the_part(box, tmp_path):
    data = {SPACE["repo"]: repo_tar([("app.py", tarfile.REGTYPE, "print(1)")], with_git=False)}
    write_bundle(tmp_path / "b.tar", [member(SPACE["repo"], size=len(data[SPACE["repo"]]))],
                 data, spaces_=[SPACE])
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert refusal.message == "Part repos/team--a.tar holds no git repository for team/a"
    assert_nothing_changed(box, tmp_path, before)


def test_a_file_name_with_a_newline_is_kept_inside_the_repository(box, tmp_path):
    """Git allows any byte but NUL and "/" in a name: such a file is unpacked, inside."""
    repo_bundle(tmp_path / "b.tar", [("odd\nname.py", tarfile.REGTYPE, "x"),
                                     ("d/ok", tarfile.SYMTYPE, "../odd\nname.py")])
    with pytest.raises(RuntimeUnavailable, match="Podman is not used"):
        bundles.import_bundle(box, tmp_path / "b.tar", allow_unsigned=True)
    assert box.runtime.asked == ["load_archive"] and box.runtime.outside == {}
    assert box.store.list_spaces() == []


def test_links_that_leave_the_repository_only_once_later_links_exist_are_refused(box,
                                                                                  tmp_path):
    climb = "/".join(["e"] * 12 + [".."] * 12)  # the tree's root, while e does not exist
    repo_bundle(tmp_path / "b.tar", [
        ("README.md", tarfile.SYMTYPE, "b/etc/hostname"),  # inside, while b does not exist
        ("b", tarfile.SYMTYPE, climb),
        ("e", tarfile.SYMTYPE, "."),  # now b climbs 12 levels: to /
    ])
    with pytest.raises(ApplianceError) as caught:
        bundles.import_bundle(box, tmp_path / "b.tar", allow_unsigned=True)
    assert box.runtime.outside == {}, \
        f"the unpacked repository leads out of its tree: {box.runtime.outside}"
    assert isinstance(caught.value, bundles.BundleError)
    assert "team--a.tar holds a link leaving its tree" in caught.value.message


def test_a_repository_member_with_a_nul_in_its_name_is_refused_naming_the_part(box,
                                                                               tmp_path):
    repo_bundle(tmp_path / "b.tar", [("app\x00.py", tarfile.REGTYPE, "x")])
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert "team--a.tar" in refusal.message
    assert_nothing_changed(box, tmp_path, before)


@pytest.mark.parametrize(("members", "says"), [
    ([("p", tarfile.SYMTYPE, "."), ("l", tarfile.SYMTYPE, "p/../1/x")],
     "a link leaving its tree: l -> p/../1/x"),
    ([("a", tarfile.SYMTYPE, "b"), ("b", tarfile.SYMTYPE, "a")],
     "links that loop or chain too deep: a -> b"),
    ([("d", tarfile.SYMTYPE, "sub"), ("sub", tarfile.DIRTYPE, ""),
      ("sub/up", tarfile.SYMTYPE, "../d/../..")],
     "a link leaving its tree: sub/up -> ../d/../.."),
], ids=["out-and-back-by-the-trees-own-name", "loop", "through-a-folder-link"])
def test_a_link_whose_path_through_the_final_tree_steps_outside_is_refused(box, tmp_path,
                                                                           members, says):
    """The unpacked tree is copied elsewhere (the imported repository, the checkout): a
    link that leaves the tree on its way and comes back by the tree's own folder name
    (unpacked/1 here) would lead elsewhere there, so every step must stay inside."""
    repo_bundle(tmp_path / "b.tar", members)
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert refusal.message == "team--a.tar holds " + says
    assert_nothing_changed(box, tmp_path, before)


@pytest.mark.parametrize(("members", "says"), [
    ([(".", tarfile.SYMTYPE, "x")], "'.' over what an earlier member unpacked there"),
    ([("d", tarfile.DIRTYPE, ""), ("d", tarfile.SYMTYPE, "x")],
     "'d' over what an earlier member unpacked there"),
    ([("l", tarfile.SYMTYPE, "f"), ("l", tarfile.REGTYPE, "x")],
     "'l' over what an earlier member unpacked there"),
    ([("l", tarfile.SYMTYPE, "."), ("l/f", tarfile.REGTYPE, "x")], "'l/f' under the link l"),
    ([("l", tarfile.SYMTYPE, "sub"), ("sub", tarfile.DIRTYPE, ""),
      ("l/d/f", tarfile.REGTYPE, "x")], "'l/d/f' under the link l"),
    ([("a/../b", tarfile.REGTYPE, "x")], "a path with '..' in it: a/../b"),
    ([("d/" * 300 + "f", tarfile.REGTYPE, "x")], "a path too long or too deep to unpack: 'd/d/"),
    ([("a" * 4096, tarfile.REGTYPE, "x")], "a path too long or too deep to unpack: 'aaa"),
], ids=["link-over-the-root", "link-over-a-folder", "file-over-a-link", "file-under-a-link",
        "file-under-a-folder-link", "inner-dotdot", "too-deep", "too-long"])
def test_a_member_over_or_under_another_or_past_the_limits_is_refused(box, tmp_path, members,
                                                                      says):
    """Git writes each path once, never under a link, never with '..': a tar that does can
    only mean to write through a link, so it is refused rather than followed."""
    repo_bundle(tmp_path / "b.tar", members)
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert refusal.message.startswith("team--a.tar holds " + says), refusal.message
    assert_nothing_changed(box, tmp_path, before)


def test_a_link_with_a_nul_in_its_target_is_refused_naming_the_part(box, tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member(".git", tarfile.DIRTYPE))
        link = member("l", tarfile.SYMTYPE)
        link.pax_headers = {"linkpath": "a\x00b"}  # a ustar field would stop at the NUL
        tar.addfile(link)
    data = {SPACE["repo"]: out.getvalue()}
    write_bundle(tmp_path / "b.tar", [member(SPACE["repo"], size=len(data[SPACE["repo"]]))],
                 data, spaces_=[SPACE])
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert refusal.message == "team--a.tar holds a name with a NUL byte: 'l' -> 'a\\x00b'"
    assert_nothing_changed(box, tmp_path, before)


def test_links_that_stay_inside_the_repository_are_kept_as_links(tmp_path):
    """Git stores links: chains of them, and links through a folder link, stay."""
    repo_bundle(tmp_path / "b.tar", [
        ("sub", tarfile.DIRTYPE, ""), ("sub/app.py", tarfile.REGTYPE, "print(1)"),
        ("docs", tarfile.SYMTYPE, "sub"), ("app.py", tarfile.SYMTYPE, "docs/app.py"),
        ("main.py", tarfile.SYMTYPE, "app.py"), ("sub/self", tarfile.SYMTYPE, "../sub/."),
        ("dangling", tarfile.SYMTYPE, "missing/file")])
    staged = bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    bundles._unpack_repos(staged)
    tree = staged.trees[SPACE["repo"]]
    assert tree.parent == tmp_path / "stage" / "unpacked"
    assert {name: os.readlink(tree / name) for name in ("docs", "app.py", "main.py",
                                                        "sub/self", "dangling")} == {
        "docs": "sub", "app.py": "docs/app.py", "main.py": "app.py", "sub/self": "../sub/.",
        "dangling": "missing/file"}
    assert (tree / "main.py").read_text() == "print(1)"


def test_two_spaces_naming_one_repository_part_are_refused_naming_both(box, tmp_path):
    data = {SPACE["repo"]: repo_tar([])}
    other = {**SPACE, "id": "team/b"}
    write_bundle(tmp_path / "b.tar", [member(SPACE["repo"], size=len(data[SPACE["repo"]]))],
                 data, spaces_=[SPACE, other])
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert refusal.message == ("Part 'repos/team--a.tar' is named as the repository of both "
                               "'team/a' and 'team/b'")
    assert_nothing_changed(box, tmp_path, before)


def test_a_space_listed_twice_is_refused_before_anything_is_installed(box, tmp_path):
    data = {SPACE["repo"]: repo_tar([])}
    again = {**SPACE, "repo": "repos/other.tar"}
    write_bundle(tmp_path / "b.tar", [member(SPACE["repo"], size=len(data[SPACE["repo"]]))],
                 data, spaces_=[SPACE, again])
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert refusal.message == "The bundle lists Space 'team/a' twice (entries 1 and 2)"
    assert_nothing_changed(box, tmp_path, before)


def test_a_part_named_like_an_unpacked_repository_does_not_collide_with_it(box, tmp_path):
    """repos/team--a.tar is unpacked outside the parts' names, so a part repos/team--a
    (or repos/team--a/x) beside it is only an unused part, not a crash."""
    data = {SPACE["repo"]: repo_tar([("app.py", tarfile.REGTYPE, "x")]),
            "repos/team--a": b"a part", "repos/team--a.tar.tar": b"another"}
    write_bundle(tmp_path / "b.tar", [member(name, size=len(body))
                                      for name, body in data.items()], data, spaces_=[SPACE])
    with pytest.raises(RuntimeUnavailable, match="Podman is not used"):
        bundles.import_bundle(box, tmp_path / "b.tar", allow_unsigned=True)
    assert box.runtime.asked == ["load_archive"] and box.runtime.outside == {}


@pytest.mark.parametrize(("entries", "says"), [
    (["team/a"], "Space entry 1 of the bundle is 'team/a', not an object"),
    ([{**SPACE, "id": None}], "Space entry 1 of the bundle (None) has no valid id"),
    ([{**SPACE, "repo": ["repos/team--a.tar"]}],
     "Space entry 1 of the bundle ('team/a') has no valid repo"),
    ([{**SPACE, "image": {"x": 1}}], "The bundle gives team/a no valid image: {'x': 1}"),
    ({"team/a": SPACE}, "The bundle lists its Spaces oddly: {'team/a':"),
], ids=["not-an-object", "no-id", "repo-a-list", "image-a-dict", "spaces-a-dict"])
def test_a_space_entry_of_the_wrong_json_type_is_refused_naming_it(box, tmp_path, entries,
                                                                   says):
    data = {SPACE["repo"]: repo_tar([])}
    write_bundle(tmp_path / "b.tar", [member(SPACE["repo"], size=len(data[SPACE["repo"]]))],
                 data, spaces_=entries)
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert refusal.message.startswith(says)
    assert_nothing_changed(box, tmp_path, before)


# Model entries: the names in the manifest that become paths in the models' cache volume.

MODEL_DATA = b"weights"
BLOB = hashlib.sha256(MODEL_DATA).hexdigest()
MODEL_REV = "1" * 40


def model_bundle(path: Path, **change) -> None:
    model = {"repo_id": "o/m", "type": "model", "revision": MODEL_REV, "dir": "models--o--m",
             "files": {"config.json": BLOB}, "requested_revision": None, **change}
    part = f"models/models--o--m/blobs/{BLOB}"
    write_bundle(path, [member(part, size=len(MODEL_DATA))], {part: MODEL_DATA},
                 models=[model])


@pytest.mark.parametrize(("change", "says"), [
    ({"dir": "../../../data"}, "The bundle describes model o/m oddly"),
    ({"dir": "models--o--m/../../x"}, "The bundle describes model o/m oddly"),
    ({"dir": "/etc"}, "The bundle describes model o/m oddly"),
    ({"revision": "../../../../x"}, "The bundle describes model o/m oddly"),
    ({"revision": "1" * 39 + "\n"}, "The bundle describes model o/m oddly"),
    ({"files": ["config.json"]}, "The bundle describes model o/m oddly"),
    ({"files": {"a/./b.json": BLOB}}, "Model o/m names a bad path 'a/./b.json'"),
    ({"files": {".": BLOB}}, "Model o/m names a bad path '.'"),
    ({"files": {"..": BLOB}}, "Model o/m names a bad path '..'"),
    ({"files": {"": BLOB}}, "Model o/m names a bad path ''"),
    ({"files": {"a/": BLOB}}, "Model o/m names a bad path 'a/'"),
    ({"files": {"nul\x00.json": BLOB}}, "Model o/m names a bad path 'nul\\x00.json'"),
    ({"files": {"a" * 256: BLOB}}, "Model o/m names a bad path"),
    ({"files": {"config.json": "../blobs/" + BLOB}}, "Model o/m names a bad blob"),
    ({"files": {"config.json": BLOB.upper()}}, "Model o/m names a bad blob"),
    ({"requested_revision": "../../../../refs"}, "Model o/m names a bad revision"),
    ({"requested_revision": "ma/in"}, "Model o/m names a bad revision"),
])
def test_a_model_entry_naming_a_path_outside_its_cache_folder_is_refused(tmp_path, change,
                                                                         says):
    model_bundle(tmp_path / "b.tar", **change)
    staged = bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    before = listing(tmp_path)
    with pytest.raises(bundles.BundleError) as caught:
        bundles.model_archive(staged, tmp_path / "cache.tar")
    assert says in caught.value.message
    assert listing(tmp_path) - before <= {"cache.tar"}


def test_a_bad_model_entry_is_refused_before_podman_loads_any_image(box, tmp_path):
    model_bundle(tmp_path / "b.tar", files={"config.json": "../../../../appliance.db"})
    before = listing(tmp_path)
    with pytest.raises(ApplianceError) as caught:
        bundles.import_bundle(box, tmp_path / "b.tar", allow_unsigned=True)
    assert box.runtime.asked == [], "Podman was asked to load the images first"
    assert "names a bad blob" in caught.value.message
    assert_nothing_changed(box, tmp_path, before)


def test_a_model_file_under_another_model_file_is_refused_or_unpacks_cleanly(tmp_path):
    model_bundle(tmp_path / "b.tar", files={"a": BLOB, "a/b": BLOB})
    staged = bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    try:
        bundles.model_archive(staged, tmp_path / "cache.tar")
    except bundles.BundleError as exc:
        assert "'a/b'" in exc.message or "'a'" in exc.message
        return
    out = tmp_path / "volume"
    out.mkdir()
    before = listing(tmp_path)
    done = subprocess.run(["tar", "-x", "-C", str(out), "-f", str(tmp_path / "cache.tar")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.split("/", 1)[0] for p in listing(tmp_path) - before} == {"volume"}
    blobs = (out / "hub/models--o--m/blobs").resolve()
    for link in (out / "hub/models--o--m/snapshots").rglob("*"):
        if link.is_symlink():
            assert link.resolve().parent == blobs, link


@pytest.mark.parametrize(("models", "says"), [
    (["o/m"], "The bundle describes model entry 1 oddly: it is 'o/m', not an object"),
    ([None], "The bundle describes model entry 1 oddly: it is None, not an object"),
    ([{"repo_id": "o/m", "revision": MODEL_REV, "files": {}}],
     "The bundle describes model o/m oddly: its dir is None, not a cache folder"),
    ([{"repo_id": "o/m", "dir": ["models--o--m"], "revision": MODEL_REV, "files": {}}],
     "The bundle describes model o/m oddly: its dir is ['models--o--m']"),
    ([{"dir": "models--o--m", "revision": MODEL_REV, "files": {}}],
     "The bundle describes model entry 1 oddly: its repo_id is None"),
    ([{"repo_id": "o/m", "dir": "models--o--m", "files": {}}],
     "The bundle describes model o/m oddly: its revision is None, not 40 hex digits"),
    ([{"repo_id": "o/m", "dir": "models--o--m", "revision": MODEL_REV,
       "files": {"a": BLOB, "a/b": BLOB}}],
     "Model o/m lists 'a' both as a file and as the folder of 'a/b'"),
    ([{"repo_id": "o/m", "dir": "models--o--m", "revision": MODEL_REV,
       "files": {"x/y/z": BLOB, "x/y": BLOB}}],
     "Model o/m lists 'x/y' both as a file and as the folder of 'x/y/z'"),
    ([{"repo_id": "o/m", "dir": "models--o--m", "revision": MODEL_REV,
       "files": {"config.json": "2" * 64}}],
     f"Model o/m names blob {'2' * 64} for 'config.json', which the bundle does not hold"),
    ([{"repo_id": "o/m", "dir": "models--o--m", "revision": MODEL_REV,
       "files": {"config.json": BLOB}}] * 2,
     "Model o/m and model o/m both fill the cache folder models--o--m"),
    ({"o/m": {}}, "The bundle lists its models oddly: {'o/m': {}}"),
    ([{"repo_id": "o/m", "dir": "models--o--m", "revision": MODEL_REV,
       "files": {"config.json": BLOB}}],
     "The bundle carries models but no image to unpack them into the models' volume with"),
], ids=["a-string", "null", "no-dir", "dir-a-list", "no-repo-id", "no-revision",
        "file-under-file", "deeper-file-under-file", "blob-not-carried", "same-folder-twice",
        "models-a-dict", "no-image-to-fill-with"])
def test_every_model_entry_is_checked_before_podman_loads_any_image(box, tmp_path, models,
                                                                    says):
    part = f"models/models--o--m/blobs/{BLOB}"
    write_bundle(tmp_path / "b.tar", [member(part, size=len(MODEL_DATA))], {part: MODEL_DATA},
                 models=models)
    before = listing(tmp_path)
    refusal = import_refused(box, tmp_path / "b.tar")
    assert refusal.message.startswith(says), refusal.message
    assert_nothing_changed(box, tmp_path, before)


def test_a_bundled_repositorys_git_config_and_hooks_are_its_own_no_more(tmp_path):
    """A repository's .git/config and hooks come from the bundle's author: the box's git
    must never run what they name (core.fsmonitor runs on `git status`, hooks on checkout)."""
    planted = tmp_path / "planted"
    config = ("[core]\n\trepositoryformatversion = 0\n\tbare = false\n"
              f"\tfsmonitor = touch {planted}\n\tworktree = /etc\n\thooksPath = /tmp\n"
              "[extensions]\n\tobjectformat = sha256\n"
              f"[alias]\n\tst = !touch {planted}\n")
    repo_bundle(tmp_path / "b.tar", [
        (".git/config", tarfile.REGTYPE, config),
        (".git/hooks", tarfile.DIRTYPE, ""),
        (".git/hooks/post-checkout", tarfile.REGTYPE, f"#!/bin/sh\ntouch {planted}\n"),
        ("app.py", tarfile.REGTYPE, "print(1)")])
    staged = bundles.stage_bundle(tmp_path / "b.tar", tmp_path / "stage")
    bundles._unpack_repos(staged)
    git_dir = staged.trees[SPACE["repo"]] / ".git"
    kept = (git_dir / "config").read_text()
    assert "fsmonitor" not in kept and "worktree" not in kept and "hooksPath" not in kept
    assert "alias" not in kept and str(planted) not in kept
    assert "repositoryformatversion = 0" in kept and "objectformat = sha256" in kept
    assert not (git_dir / "hooks").exists()
    assert not planted.exists()
