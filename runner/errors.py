"""Errors of the runner package: every leaf the runner raises is defined here."""

from envs.kit.errors import (
    BackendError,
    ConflictError,
    EnvctlError,
    ForbiddenError,
    NotFoundError,
    ServiceUnavailableError,
)


class RuntimeNotFoundError(NotFoundError):
    code = "runtime_not_found"


class RuntimeStateError(ConflictError):
    """The runtime's state does not allow what was asked (e.g. a setting change while running)."""

    code = "runtime_state_conflict"


class RuntimeOwnedElsewhereError(ConflictError):
    """The runtime belongs to another runner of the installation: only that one acts on it."""

    code = "runtime_owned_elsewhere"


class LeaseExpiredError(ConflictError):
    """The runtime's lease ran out: it is being stopped and deleted; nothing renews it now."""

    code = "lease_expired"


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


class ResultFetchError(BackendError):
    """A runtime's ``/results`` could not be fetched over its agent channel (a name that would
    leave envctl's copy; runner/cells/result_remote.py)."""

    code = "results_unavailable"


class AgentUnavailableError(BackendError):
    """A runtime's agent does not answer on its socket (the container stopped, or is booting)."""

    code = "agent_unavailable"


class SaveHasSecretsError(ConflictError):
    """A save's new layer holds secret values or credential files; nothing was kept.

    ``details.findings`` names each path and what was found there, never the value.
    """

    code = "save_has_secrets"

    def __init__(self, findings: list[dict[str, object]]) -> None:
        shown = findings[:20]
        names = "; ".join(f"{f['path']} ({', '.join(map(str, f['found']))})" for f in shown)  # type: ignore[call-overload]
        more = f"; and {len(findings) - len(shown)} more" if len(findings) > len(shown) else ""
        super().__init__(
            f"the save was refused: its new layer holds secrets: {names}{more}. Remove them and save again, "
            "or allow each path (allow_secrets in the request, `envctl save --allow-secrets PATH`); "
            "the runtime and its unsaved changes are untouched",
            details={"findings": findings[:1000]},
        )


class SecretUnavailableError(ConflictError):
    """A runtime refers to a secret that is gone, or of a team its owner is not in."""

    code = "secret_unavailable"


class LayerStreamError(BackendError):
    """The agent's layer stream of a save made inside the runtime broke off or broke the rules;
    nothing was kept."""

    code = "layer_stream_failed"


class NetworkPoolExhaustedError(BackendError):
    """No subnet of ``ENVCTL_RUNNER_SUBNET_POOL`` is free for an installation's runtime network.

    ``details.networks`` names the envctl networks that hold the pool's subnets, each with its
    installation and how many containers that installation still has; ``details.command`` is the
    command that removes those whose installation has none left."""

    code = "network_pool_exhausted"


class AttachNotAllowedError(ForbiddenError):
    """A container outside ``ENVCTL_RUNNER_ATTACH_ALLOW`` was asked to be attached (R42)."""

    code = "attach_not_allowed"


class ContainerNotFoundError(NotFoundError):
    """The container named for an attached runtime is not on the engine."""

    code = "container_not_found"


class NodeNotFoundError(NotFoundError):
    code = "node_not_found"


class AppNotFoundError(NotFoundError):
    code = "app_not_found"


class AppStateError(ConflictError):
    """The app or its deployment does not allow what was asked (e.g. a rollback to a failed one)."""

    code = "app_state_conflict"


class AppBundleError(ConflictError):
    """An app bundle was refused: changed, truncated, made for another team, or unreadable."""

    code = "app_bundle_refused"

    def __init__(self, message: str, *, reason: str, details: dict[str, object] | None = None) -> None:
        super().__init__(message, details={"reason": reason, **(details or {})})
        self.reason = reason


class AppFailedError(EnvctlError):
    """A deployment's step failed (a cell's error, a boot, the port never answering)."""

    code = "app_failed"
    status = 409
