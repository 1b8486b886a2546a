"""One error hierarchy for every user-facing failure; edges render it (CLI, API, portal)."""


class ApplianceError(Exception):
    """A failure a user can act on: what failed, the value that caused it, what to do next."""

    status = 500

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class InvalidInput(ApplianceError):
    """The caller gave a value the appliance refuses (bad name, URL, key...)."""

    status = 400


class NotFound(ApplianceError):
    status = 404


class Unauthorized(ApplianceError):
    """No valid login or token was given."""

    status = 401


class Forbidden(ApplianceError):
    """The caller is known but may not do this (role, token scope)."""

    status = 403


class TooManyAttempts(ApplianceError):
    """A client failed to log in too often lately."""

    status = 429


class Conflict(ApplianceError):
    """The request races or collides with existing state (duplicate name, stage moved)."""

    status = 409


class ManifestError(ApplianceError):
    """The Space's README front matter is unusable (lands the Space in CONFIG_ERROR)."""

    status = 422

    def __init__(self, message: str, hint: str | None = None, stage: str = "CONFIG_ERROR"):
        super().__init__(message, hint)
        self.stage = stage


class SourceError(ApplianceError):
    """Fetching the Space's repository failed or was refused."""

    status = 400


class BuildFailed(ApplianceError):
    """Building the Space's image failed; message carries the log tail."""

    status = 422


class RuntimeUnavailable(ApplianceError):
    """Podman (or another runtime dependency) cannot be reached or refused the request."""

    status = 503


class StartupFailed(ApplianceError):
    """The Space's container started but the app never answered (or exited)."""

    status = 422
