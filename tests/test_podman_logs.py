"""A container's log as the appliance shows it: every line, in order, however it is cut.

Podman 4.3's own `tail` parameter drops the first line of a short log and merges a stderr
line into the next stdout line, so the runtime cuts the tail itself; these tests read a real
container's log through the runtime and check each line arrives whole.
"""

from __future__ import annotations

import uuid

import pytest
from conftest import as_service, wait_for

from appliance.adapters.runtime import Runtime, _last_lines, _skip_lines
from appliance.config import load_config

IMAGE = "localhost/appliance-python:3.11"
PROGRAM = ("import sys, time\n"
           "print('first line', flush=True)\n"
           "time.sleep(0.2)\n"
           "sys.stderr.write('* second, on stderr\\n'); sys.stderr.flush()\n"
           "time.sleep(0.2)\n"
           "for n in range(3, 8): print(f'line {n}', flush=True); time.sleep(0.05)\n"
           "time.sleep(600)\n")
EXPECTED = ["first line", "* second, on stderr", *(f"line {n}" for n in range(3, 8))]


def test_last_lines_keeps_whole_lines_across_frames():
    frames = [b"first", b" line\n* sec", b"ond\n", b"third\n", b"no newline yet"]
    assert _last_lines(iter(frames), None) == [b"first line\n", b"* second\n", b"third\n",
                                               b"no newline yet"]
    assert _last_lines(iter(frames), 2) == [b"third\n", b"no newline yet"]


def test_skip_lines_drops_exactly_the_lines_asked():
    frames = [b"a\nb", b"\nc\n", b"d"]
    assert b"".join(_skip_lines(iter(frames), 2)) == b"c\nd"
    assert b"".join(_skip_lines(iter(frames), 0)) == b"a\nb\nc\nd"
    assert b"".join(_skip_lines(iter(frames), 9)) == b""


@pytest.fixture(scope="module")
def chatty(podman_ready):
    name = f"appliance-logtest-{uuid.uuid4().hex[:8]}"
    as_service("podman", "run", "-d", "--rm", "--name", name, IMAGE, "python3", "-c", PROGRAM)
    runtime = Runtime(load_config({}))
    wait_for(lambda: "line 7" in runtime.logs(name, tail=None), 60, "the container's output")
    yield runtime, name
    as_service("podman", "rm", "-f", "-t", "0", name, check=False)


@pytest.mark.podman
def test_a_log_tail_has_every_line_in_order(chatty):
    runtime, name = chatty
    assert runtime.logs(name, tail=200).splitlines() == EXPECTED
    assert runtime.logs(name, tail=3).splitlines() == EXPECTED[-3:]


@pytest.mark.podman
def test_following_a_log_starts_with_its_last_lines(chatty):
    runtime, name = chatty
    stream = runtime.follow_logs(name, tail=4)
    text = ""
    for chunk in stream:
        text += chunk
        if text.count("\n") >= 4:
            break
    stream.close()
    assert text.splitlines() == EXPECTED[-4:]
