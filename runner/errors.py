"""Errors of the runner package: every leaf the runner raises is defined here."""

from envs.kit.errors import BackendError, ConflictError, EnvctlError, NotFoundError, ServiceUnavailableError


class RuntimeNotFoundError(NotFoundError):
    code = "runtime_not_found"


class RuntimeStateError(ConflictError):
    """The runtime's state does not allow what was asked (e.g. a setting change while running)."""

    code = "runtime_state_conflict"


class RuntimeOwnedElsewhereError(ConflictError):
    """The runtime belongs to another runner of the installation: only that one acts on it."""

    code = "runtime_owned_elsewhere"


class RunnerNameInUseError(ConflictError):
    """A live process of the installation already holds this runner name."""

    code = "runner_name_in_use"


class GpuUnavailableError(ServiceUnavailableError):
    """A GPU machine type was asked of an engine without the NVIDIA container runtime."""

    code = "gpu_unavailable"


class MachineTypeNotFoundError(NotFoundError):
    code = "machine_type_not_found"
    status = 422


class ExecutionNotFoundError(NotFoundError):
    code = "execution_not_found"


class OperationNotFoundError(NotFoundError):
    code = "operation_not_found"


class BuildStepFailedError(EnvctlError):
    code = "build_step_failed"
    status = 422


class ResultNotFoundError(NotFoundError):
    code = "result_not_found"


class ResultChangedError(ConflictError):
    """The source file vanished, is not a regular file, or no longer has the expected sha256."""

    code = "result_changed"


class ResultStoreError(ServiceUnavailableError):
    """The results store failed (denied access, missing bucket, disk full, ...)."""

    code = "result_store_error"


class AgentUnavailableError(BackendError):
    """A runtime's agent does not answer on its socket (the container stopped, or is booting)."""

    code = "agent_unavailable"
