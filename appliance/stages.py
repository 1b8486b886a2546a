"""The Space stages (Hugging Face's names) and the one table of allowed transitions."""

from __future__ import annotations

from .errors import Conflict

NO_APP_FILE = "NO_APP_FILE"
CONFIG_ERROR = "CONFIG_ERROR"
BUILDING = "BUILDING"
BUILD_ERROR = "BUILD_ERROR"
APP_STARTING = "APP_STARTING"
RUNNING = "RUNNING"
RUNNING_BUILDING = "RUNNING_BUILDING"
RUNNING_APP_STARTING = "RUNNING_APP_STARTING"
RUNTIME_ERROR = "RUNTIME_ERROR"
STOPPED = "STOPPED"
PAUSED = "PAUSED"
DELETING = "DELETING"

ALL = (
    NO_APP_FILE, CONFIG_ERROR, BUILDING, BUILD_ERROR, APP_STARTING, RUNNING, RUNNING_BUILDING,
    RUNNING_APP_STARTING, RUNTIME_ERROR, STOPPED, PAUSED, DELETING,
)

_ERRORS = {NO_APP_FILE, CONFIG_ERROR, BUILD_ERROR, RUNTIME_ERROR}
# Stages in which work (a build or a start) is under way; a second request must wait.
BUSY = frozenset({BUILDING, APP_STARTING, RUNNING_BUILDING, RUNNING_APP_STARTING, DELETING})

# from-stage -> stages it may move to. BUILD_ERROR, CONFIG_ERROR and NO_APP_FILE may still
# have an older revision serving (a failed update keeps it), hence their edges back to
# RUNNING, RUNNING_BUILDING and RUNNING_APP_STARTING (a restart or rollback beside it).
TRANSITIONS: dict[str, frozenset[str]] = {
    BUILDING: frozenset(
        {APP_STARTING, BUILD_ERROR, CONFIG_ERROR, NO_APP_FILE, STOPPED, PAUSED, DELETING}
    ),
    APP_STARTING: frozenset({RUNNING, RUNTIME_ERROR, STOPPED, PAUSED, DELETING}),
    RUNNING: frozenset(
        {RUNNING_BUILDING, RUNNING_APP_STARTING, APP_STARTING, BUILDING, RUNTIME_ERROR,
         STOPPED, PAUSED, DELETING}
    ),
    RUNNING_BUILDING: frozenset(
        {RUNNING_APP_STARTING, RUNNING, BUILD_ERROR, CONFIG_ERROR, NO_APP_FILE, RUNTIME_ERROR,
         STOPPED, PAUSED, DELETING}
    ),
    RUNNING_APP_STARTING: frozenset({RUNNING, RUNTIME_ERROR, STOPPED, PAUSED, DELETING}),
    RUNTIME_ERROR: frozenset({APP_STARTING, BUILDING, RUNNING, STOPPED, PAUSED, DELETING}),
    BUILD_ERROR: frozenset(
        {BUILDING, RUNNING_BUILDING, RUNNING_APP_STARTING, APP_STARTING, RUNNING, STOPPED,
         PAUSED, DELETING}
    ),
    CONFIG_ERROR: frozenset(
        {BUILDING, RUNNING_BUILDING, RUNNING_APP_STARTING, RUNNING, APP_STARTING, STOPPED,
         PAUSED, DELETING}
    ),
    NO_APP_FILE: frozenset(
        {BUILDING, RUNNING_BUILDING, RUNNING_APP_STARTING, RUNNING, APP_STARTING, STOPPED,
         PAUSED, DELETING}
    ),
    STOPPED: frozenset({APP_STARTING, BUILDING, PAUSED, DELETING}),
    PAUSED: frozenset({APP_STARTING, BUILDING, STOPPED, DELETING}),
    DELETING: frozenset(),
}


def is_error(stage: str) -> bool:
    return stage in _ERRORS


def can_move(current: str, new: str) -> bool:
    """Tell whether the table allows current -> new."""
    return new in TRANSITIONS.get(current, frozenset())


def check_move(space_id: str, current: str, new: str) -> None:
    """Raise Conflict unless the table allows current -> new."""
    if not can_move(current, new):
        raise Conflict(
            f"Space {space_id} cannot go from {current} to {new}",
            hint=f"see 'appliance spaces show {space_id}' for what it is doing now",
        )
