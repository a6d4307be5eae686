"""The registry's errors: teams, members, tokens and the managed registry process."""

from __future__ import annotations

from envs.kit.errors import ConflictError, NotFoundError, ServiceUnavailableError


class TeamNotFoundError(NotFoundError):
    code = "team_not_found"


class TeamExistsError(ConflictError):
    code = "team_exists"


class UserNotFoundError(NotFoundError):
    code = "user_not_found"


class UserExistsError(ConflictError):
    code = "user_exists"


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
