"""The stage table: every stage has its edges, the edges a Space's life needs exist, no others."""

import pytest

from appliance import stages
from appliance.errors import Conflict


def test_every_stage_has_an_entry_in_the_transition_table():
    assert set(stages.TRANSITIONS) == set(stages.ALL)


def test_stage_names_are_unique():
    assert len(stages.ALL) == len(set(stages.ALL))


def test_every_transition_target_is_a_known_stage():
    for source, targets in stages.TRANSITIONS.items():
        assert targets <= set(stages.ALL), f"{source} -> {targets - set(stages.ALL)}"


def test_deleting_is_terminal():
    assert stages.TRANSITIONS[stages.DELETING] == frozenset()
    for stage in stages.ALL:
        assert not stages.can_move(stages.DELETING, stage)


def test_no_stage_lists_itself_as_a_transition():
    # move() treats "same stage" as allowed without consulting the table; a self-edge here
    # would only hide a mistake.
    for stage, targets in stages.TRANSITIONS.items():
        assert stage not in targets


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(["BUILDING", "APP_STARTING", "RUNNING"], id="first-deploy"),
        pytest.param(
            ["RUNNING", "RUNNING_BUILDING", "RUNNING_APP_STARTING", "RUNNING"], id="update"
        ),
        pytest.param(["BUILD_ERROR", "RUNNING_BUILDING"], id="retry-after-failed-update"),
        pytest.param(["STOPPED", "APP_STARTING"], id="start-stopped"),
        pytest.param(["PAUSED", "APP_STARTING"], id="start-paused"),
        pytest.param(["RUNNING", "STOPPED"], id="stop"),
        pytest.param(["RUNNING", "PAUSED"], id="pause"),
        pytest.param(["BUILDING", "BUILD_ERROR", "BUILDING"], id="retry-after-failed-build"),
        pytest.param(["APP_STARTING", "RUNTIME_ERROR", "APP_STARTING"], id="restart-crashed"),
        pytest.param(["RUNNING_BUILDING", "BUILD_ERROR"], id="update-build-fails"),
        pytest.param(["RUNNING_APP_STARTING", "RUNNING"], id="update-start-fails-old-serves"),
    ],
)
def test_the_paths_a_space_takes_are_allowed(path):
    for current, new in zip(path, path[1:], strict=False):
        assert stages.can_move(current, new), f"{current} -> {new}"
        stages.check_move("owner/name", current, new)  # raises if refused


@pytest.mark.parametrize("stage", [s for s in stages.ALL if s != stages.DELETING])
def test_every_stage_but_deleting_may_move_to_deleting(stage):
    assert stages.can_move(stage, stages.DELETING)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        ("STOPPED", "RUNNING"),
        ("PAUSED", "RUNNING"),
        ("DELETING", "RUNNING"),
        ("DELETING", "BUILDING"),
        ("STOPPED", "RUNNING_APP_STARTING"),
        ("BUILDING", "RUNNING"),
        ("APP_STARTING", "BUILDING"),
        ("STOPPED", "RUNNING_BUILDING"),
    ],
)
def test_forbidden_move_raises_conflict_naming_both_stages(current, new):
    assert not stages.can_move(current, new)
    with pytest.raises(Conflict) as caught:
        stages.check_move("owner/name", current, new)
    assert caught.value.message == f"Space owner/name cannot go from {current} to {new}"
    assert caught.value.hint == "see 'appliance spaces show owner/name' for what it is doing now"
    assert caught.value.status == 409


def test_unknown_stage_cannot_move_anywhere():
    with pytest.raises(Conflict, match="cannot go from SLEEPING to RUNNING"):
        stages.check_move("owner/name", "SLEEPING", "RUNNING")


def test_is_error_is_true_exactly_for_the_error_stages():
    errors = {s for s in stages.ALL if stages.is_error(s)}
    assert errors == {"NO_APP_FILE", "CONFIG_ERROR", "BUILD_ERROR", "RUNTIME_ERROR"}


def test_busy_stages_are_those_with_work_under_way():
    assert stages.BUSY == {
        "BUILDING", "APP_STARTING", "RUNNING_BUILDING", "RUNNING_APP_STARTING", "DELETING"
    }
    assert not stages.BUSY & {s for s in stages.ALL if stages.is_error(s)}
    assert stages.RUNNING not in stages.BUSY


@pytest.mark.parametrize("stage", ["BUILD_ERROR", "CONFIG_ERROR", "NO_APP_FILE"])
def test_failed_update_stages_can_roll_back_beside_the_serving_revision(stage):
    # A failed update leaves the old revision serving: a restart or rollback starts beside it.
    assert stages.can_move(stage, stages.RUNNING_APP_STARTING)
    assert stages.can_move(stage, stages.RUNNING_BUILDING)
