"""Errors of the runner package."""

from envs.kit.errors import ConflictError, NotFoundError


class RuntimeNotFoundError(NotFoundError):
    code = "runtime_not_found"


class RuntimeStateError(ConflictError):
    """The runtime's state does not allow what was asked (e.g. a setting change while running)."""

    code = "runtime_state_conflict"


class MachineTypeNotFoundError(NotFoundError):
    code = "machine_type_not_found"
    status = 422
