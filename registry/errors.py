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


class TokenNotFoundError(NotFoundError):
    code = "token_not_found"


class LastTeamAdminError(ConflictError):
    code = "last_team_admin"


class RegistryUnavailableError(ServiceUnavailableError):
    """The managed distribution registry could not be started or does not answer."""

    code = "registry_unavailable"


class SecretNotFoundError(NotFoundError):
    code = "secret_not_found"


class SecretKeyError(EnvctlError):
    """The secrets key file cannot be read or made, or does not open a stored secret."""

    code = "secret_key_unavailable"
    status = 500
