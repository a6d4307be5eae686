"""The registry's errors: teams, members, tokens and the managed registry process."""

from __future__ import annotations

from envs.kit.errors import ConflictError, EnvctlError, NotFoundError, ServiceUnavailableError


class TeamNotFoundError(NotFoundError):
    code = "team_not_found"


class TeamExistsError(ConflictError):
    code = "team_exists"


class UserNotFoundError(NotFoundError):
    code = "user_not_found"


class UserExistsError(ConflictError):
    code = "user_exists"


class PublicationNotFoundError(NotFoundError):
    code = "publication_not_found"


class TokenNotFoundError(NotFoundError):
    code = "token_not_found"


class LastTeamAdminError(ConflictError):
    code = "last_team_admin"


class RegistryUnavailableError(ServiceUnavailableError):
    """The managed distribution registry could not be started or does not answer."""

    code = "registry_unavailable"


class RegistryNotManagedError(ConflictError):
    """Garbage is collected where the registry runs: this envctl does not run one."""

    code = "registry_not_managed"


class RegistryBusyError(ConflictError):
    code = "registry_busy"


class TransferError(ServiceUnavailableError):
    """A push to or pull from the registry failed (the registry or the engine said why)."""

    code = "transfer_failed"


class DigestMismatchError(ConflictError):
    """What a pull brought is not what the catalog recorded for the version (R24)."""

    code = "digest_mismatch"


class NotPushedError(ConflictError):
    """The version was never pushed: the registry has nothing to pull it from."""

    code = "not_pushed"


class NoRegistryError(ConflictError):
    """There is no registry to push to or pull from (the setting ``registry`` is off, or the
    backend's images cannot travel)."""

    code = "no_registry"


class SecretNotFoundError(NotFoundError):
    code = "secret_not_found"


class SecretKeyError(EnvctlError):
    """The secrets key file cannot be read or made, or does not open a stored secret."""

    code = "secret_key_unavailable"
    status = 500


class UpstreamError(ServiceUnavailableError):
    """Another envctl a version is imported from did not answer, or answered with an error."""

    code = "upstream_failed"


class UpstreamRefusedError(ConflictError):
    """The envctl a version is imported from refused (a bad token, an unknown name, no right)."""

    code = "upstream_refused"
