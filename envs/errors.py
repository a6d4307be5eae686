"""Errors of the environments package."""

from envs.kit.errors import ConflictError, InvalidInputError, NotFoundError


class EnvironmentNotFoundError(NotFoundError):
    code = "environment_not_found"


class VersionNotFoundError(NotFoundError):
    code = "version_not_found"


class VersionInUseError(ConflictError):
    code = "version_in_use"


class ArchiveError(InvalidInputError):
    """An environment archive that is damaged, or is not an envctl archive (422)."""

    code = "bad_archive"
