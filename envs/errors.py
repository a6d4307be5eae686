"""Errors of the environments package."""

from envs.kit.errors import ConflictError, NotFoundError


class EnvironmentNotFoundError(NotFoundError):
    code = "environment_not_found"


class VersionNotFoundError(NotFoundError):
    code = "version_not_found"


class VersionInUseError(ConflictError):
    code = "version_in_use"
