"""Every JSON route the app registers (found in its url_map, so a new route is covered
without touching this file) answers random bodies and query strings, sent by an admin with a
write token, with a 2xx or a 4xx carrying the error envelope: never a 5xx, never a hang.

Work that would start a Space is kept off Podman: the worker spawn is recorded instead of
run, and the runtime answers every call with a RuntimeUnavailable whose message is known."""

from __future__ import annotations

import contextlib
import json
import re
import signal
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import users
from appliance.adapters.store import open_store
from appliance.config import load_config
from appliance.core import jobs
from appliance.core.spaces import Context
from appliance.errors import RuntimeUnavailable
from appliance.gpu.nvml import Inventory
from appliance.web.app import create_app

NO_PODMAN = "Podman is not used in the fuzz tests"
EXAMPLES_PER_ROUTE = 30
SECONDS_PER_REQUEST = 10  # a liveness bound: each answer takes milliseconds
HOSTILE = ["", " ", "..", "../../etc/passwd", "a" * 5000, "x\n\ry", "nul\x00byte", "'\"<>&;",
           "%00", "%2e%2e", "ü€😀", "\\\\host\\share", "-1", "1e27", "NaN", "[1]", "{}",
           "null", "true", "//evil.example"]
PATH_VALUES = {
    "owner": ["alice", "bob", *HOSTILE],
    "name": ["public", "private", "mia", "nobody", *HOSTILE],
    "key": ["KEY", "API_KEY", "SPACE_ID", "1BAD", *HOSTILE],
    "token_id": ["1", "2", "0", "-1", "99999999999999999999999", "abc"],
    "revision": ["main", "0" * 40, *HOSTILE],
}
FIELDS = ["source", "name", "revision", "hardware", "seconds", "policy", "interval",
          "resolution", "path", "visibility", "value", "key", "role", "password", "user",
          "scope", "flavor", "sleepTimeSeconds"]
WORDS = ["public", "private", "manual", "track", "pinned", "dated", "latest", "default",
         "cpu", "gpu", "gpu:2", "shared:8g", "read", "write", "member", "viewer", "never",
         "cpu-basic", "t4-small", "/healthz", "KEY"]
QUERY_KEYS = ["limit", "kind", "space", "keep_data", "tail", "factory", "next", "q"]

scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(10**30), max_value=10**30)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40) | st.sampled_from(HOSTILE + WORDS))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
objects = st.fixed_dictionaries({}, optional={k: values for k in FIELDS}) | st.dictionaries(
    st.text(max_size=12), values, max_size=5)
bodies = (objects.map(lambda body: ("json", body))
          | values.map(lambda body: ("json", body))
          | st.binary(max_size=200).map(lambda raw: ("raw", raw)))
queries = st.dictionaries(st.sampled_from(QUERY_KEYS) | st.text(max_size=8),
                          st.text(max_size=30) | st.integers().map(str)
                          | st.sampled_from(HOSTILE), max_size=3)


class NoPodman:
    """The runtime seam: every call says Podman is unreachable, which the API answers 503."""

    def __getattr__(self, name: str):
        def unavailable(*_args, **_kwargs):
            raise RuntimeUnavailable(NO_PODMAN)

        return unavailable


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so no error handler of the app can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(_signum, _frame):
        raise Hung(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    spawned: list[tuple[str, str]] = []
    patch = pytest.MonkeyPatch()
    patch.setattr(jobs, "spawn_job", lambda ctx, space_id, job, factory=False:
                  spawned.append((space_id, job)) or 0)
    config = load_config({}, data_dir=str(tmp_path_factory.mktemp("fuzz") / "data"),
                         port_range="18100-18199")

    def context(cfg, actor):
        return Context(cfg, open_store(cfg.db_path), NoPodman(), actor,
                       read_inventory=lambda: Inventory(available=False, reason="no GPU"))

    app = create_app(config, context_factory=context)
    store = open_store(config.db_path)
    users.add_user(store, "admin", "admin", "correct horse battery", "test")
    users.add_user(store, "mia", "member", "correct horse battery", "test")
    for n in range(3):  # the ids the fuzzer may revoke; the admin's own token comes after
        users.create_token(store, f"spare{n}", "mia", "read", "test")
    _, token = users.create_token(store, "fuzz", "admin", "write", "test")
    for space_id, visibility in (("alice/public", "public"), ("alice/private", "private")):
        store.insert_space({
            "id": space_id, "source": "/src", "source_display": "/src", "stage": "RUNNING",
            "port": 18100 + len(visibility), "hardware": "cpu", "desired": "running",
            "sdk": "gradio", "title": space_id, "created_by": "session:mia",
            "visibility": visibility, "manifest": json.dumps({"title": space_id})}, "test")
    store.close()
    yield app, {"Authorization": f"Bearer {token}"}, spawned
    patch.undo()


def json_routes(app) -> list[tuple[str, str, dict[str, list[str]]]]:
    """(method, rule, values for each path argument) for every route under /api/."""
    found = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        choices = {}
        for arg in rule.arguments:
            options = re.search(rf"<any\(([^)]*)\):{arg}>", rule.rule)
            choices[arg] = ([o.strip() for o in options.group(1).split(",")] if options
                            else PATH_VALUES.get(arg, HOSTILE))
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found.append((method, rule.rule, choices))
    return found


def fill(rule: str, chosen: dict[str, str]) -> str:
    from urllib.parse import quote

    url = rule
    for arg, value in chosen.items():
        url = re.sub(rf"<(?:[^<>]*:)?{arg}>", lambda _m, v=value: quote(v, safe=""), url)
    return url


def check_route(app, headers, method: str, rule: str, choices: dict[str, list[str]]) -> None:
    path_args = st.fixed_dictionaries({arg: st.sampled_from(options)
                                       for arg, options in choices.items()})

    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(chosen=path_args, body=bodies, query=queries)
    def one(chosen, body, query):
        url = fill(rule, chosen)
        kind, payload = body
        sent = {"json": payload} if kind == "json" else {
            "data": payload, "content_type": "application/json"}
        with time_limit(SECONDS_PER_REQUEST):
            response = app.test_client().open(url, method=method, query_string=query,
                                              headers=headers, **sent)
            text = response.get_data(as_text=True)  # a stream is read to its end in time
        where = f"{method} {url} body={payload!r:.200} query={query!r:.200}"
        status = response.status_code
        # 501: a Hub-only call (semantic search, ZeroGPU…) refused on purpose, in the envelope.
        assert status < 500 or status == 501 or (status == 503 and NO_PODMAN in text), \
            f"{status} for {where}: {text[:500]}"
        if status >= 400:
            envelope = response.get_json(silent=True)
            assert isinstance(envelope, dict), f"{status} without the envelope for {where}"
            assert envelope["ok"] is False and envelope["status"] == status, where
            assert isinstance(envelope["error"], str) and envelope["error"], where

    one()


def test_there_are_json_routes_to_fuzz(fuzzed):
    app, _, _ = fuzzed
    routes = {(m, r) for m, r, _ in json_routes(app)}
    assert len(routes) >= 40
    assert ("PUT", "/api/v1/spaces/<owner>/<name>/health") in routes
    assert ("POST", "/api/spaces/<owner>/<name>/secrets") in routes


def test_every_json_route_answers_random_input_with_2xx_or_the_envelope(fuzzed):
    app, headers, _spawned = fuzzed
    for method, rule, choices in json_routes(app):
        check_route(app, headers, method, rule, choices)
    # the admin's token outlived the fuzzing, so the later routes were not all just 401s
    assert app.test_client().get("/api/v1/whoami", headers=headers).json["user"] == "admin"
