"""One error hierarchy for the whole of envctl.

Every error a person can meet is an ``EnvctlError``: it carries a stable machine-readable
``code``, the HTTP status the API answers with, a message a person can act on, and JSON
``details``. Each package adds its own leaves; the API maps them all in one handler, and the
CLI turns them into exit codes (2 for bad input, 1 for everything else).

Third-party errors are translated at the boundary with ``raise ... from exc`` so the original
message is kept as the cause.
"""

from __future__ import annotations

from typing import Any


class EnvctlError(Exception):
    """Root of every error envctl raises on purpose."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidInputError(EnvctlError):
    """The caller sent something that cannot be accepted; ``field`` names what."""

    code = "invalid_input"
    status = 422

    def __init__(self, message: str, *, field: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.field = field
        if field is not None:
            self.details.setdefault("field", field)


class NotFoundError(EnvctlError):
    code = "not_found"
    status = 404


class ConflictError(EnvctlError):
    """The request is valid but the resource's current state does not allow it."""

    code = "conflict"
    status = 409


class NotSupportedError(ConflictError, NotImplementedError):
    """What this installation's container backend cannot do (an image export on Kubernetes, for one).

    Still a ``NotImplementedError`` for the callers that fall back to another way when a backend
    lacks a step; through the API it is a 409 that names the backend, never a 500.
    """

    code = "not_supported"


class UnauthorizedError(EnvctlError):
    code = "unauthorized"
    status = 401


class ForbiddenError(EnvctlError):
    code = "forbidden"
    status = 403


class TooManyRequestsError(EnvctlError):
    code = "too_many_requests"
    status = 429

    def __init__(self, message: str, *, retry_after: int = 1, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class ServiceUnavailableError(EnvctlError):
    """A service envctl depends on (Docker, the database) does not answer."""

    code = "service_unavailable"
    status = 503


class BackendError(ServiceUnavailableError):
    """The container backend (the Docker engine) failed or could not be reached."""

    code = "backend_error"


class DatabaseUnavailableError(ServiceUnavailableError):
    code = "database_unavailable"


class SchemaOutOfDateError(EnvctlError):
    """The database schema is behind the code; the message names the command that fixes it."""

    code = "schema_out_of_date"
    status = 503
