"""Podman answers 500 "no such container" when another process removes a container between our
lookup and our call (a worker retiring an old revision while a pause stops the Space: seen in
CI). That is the outcome asked for, not a failure; other errors still are.

The race cannot be produced on demand with the real Podman, so the client is a stand-in that
answers as Podman 4.3's API did in that run (podman-py raises APIError with the service's
message as the explanation).
"""

from __future__ import annotations

import podman.errors
import pytest

from appliance.adapters.runtime import Runtime
from appliance.config import load_config
from appliance.errors import RuntimeUnavailable

GONE = ("container 305e65d70d244e4b4806f7d78d0e3aaee1bb1a6f89b52a231f166d0128b7a922 does not "
        "exist in database: no such container")


class Container:
    def __init__(self, explanation: str):
        self.explanation = explanation

    def _fail(self, *args, **kwargs):
        raise podman.errors.APIError("500 Server Error", explanation=self.explanation)

    remove = stop = _fail


class Containers:
    def __init__(self, explanation: str):
        self.explanation = explanation

    def get(self, name: str) -> Container:
        if name.startswith("vanishing"):  # the lookup itself meets the removal
            raise podman.errors.APIError("500 Server Error", explanation=self.explanation)
        return Container(self.explanation)


class Listing:
    """Fails the first `failures` listings with the explanation, then lists nothing."""

    def __init__(self, explanation: str, failures: int):
        self.explanation, self.failures, self.calls = explanation, failures, 0

    def list(self, **kwargs) -> list:
        self.calls += 1
        if self.calls <= self.failures:
            raise podman.errors.APIError("500 Server Error", explanation=self.explanation)
        return []


class Client:
    def __init__(self, explanation: str):
        self.containers = Containers(explanation)


def runtime(tmp_path, explanation: str) -> Runtime:
    made = Runtime(load_config({}, data_dir=str(tmp_path), podman_autostart=False))
    made._client = Client(explanation)
    return made


def test_removing_a_container_another_process_just_removed_is_done(tmp_path):
    assert runtime(tmp_path, GONE).remove_container("space-zz-hfdemo-old") is None  # no raise


def test_stopping_a_container_another_process_just_removed_is_done(tmp_path):
    assert runtime(tmp_path, GONE).stop("space-zz-hfdemo-old") is None  # no raise


def test_a_container_removed_during_its_lookup_has_no_state(tmp_path):
    assert runtime(tmp_path, GONE).state("vanishing-container") is None


def test_other_removal_failures_still_say_what_went_wrong(tmp_path):
    with pytest.raises(RuntimeUnavailable) as caught:
        runtime(tmp_path, "device or resource busy").remove_container("space-zz-x")
    assert caught.value.message == "Could not remove space-zz-x: device or resource busy"


def test_a_listing_that_meets_a_removal_is_asked_again(tmp_path):
    made = runtime(tmp_path, GONE)
    made._client.containers = Listing(GONE, failures=2)
    assert made.containers("zz/hfdemo") == []
    assert made._client.containers.calls == 3


def test_a_listing_that_keeps_failing_says_so(tmp_path):
    made = runtime(tmp_path, GONE)
    made._client.containers = Listing("database is locked", failures=1)
    with pytest.raises(RuntimeUnavailable) as caught:
        made.containers()
    assert caught.value.message.endswith("could not list the containers: database is locked")
    assert caught.value.hint == "run 'appliance doctor'"


class Networks:
    def __init__(self, explanation: str):
        self.explanation = explanation

    def remove(self, name: str) -> None:
        raise podman.errors.APIError("500 Server Error", explanation=self.explanation)


def test_a_network_a_container_still_uses_is_kept_not_an_error(tmp_path):
    made = runtime(tmp_path, GONE)
    made._client.networks = Networks(
        '"appliance-offline" has associated containers with it. Use -f to forcibly delete '
        "containers and pods: network is being used")
    assert made.remove_network("appliance-offline") is False


def test_a_network_that_cannot_be_removed_says_why(tmp_path):
    made = runtime(tmp_path, GONE)
    made._client.networks = Networks("error removing bridge cni-podman7: permission denied")
    with pytest.raises(RuntimeUnavailable) as caught:
        made.remove_network("space-a-b-1234-offline")
    assert caught.value.message == ("Cannot remove the network space-a-b-1234-offline: error "
                                    "removing bridge cni-podman7: permission denied")
