"""The environment reference grammar, parsed in exactly one place.

    ref      := [team "/"] name [ "@" number | "@" digest | ":" tag ]
    team     := name-part
    name     := name-part            (lower case letters, digits, and . _ - between them)
    number   := 1..999999999
    digest   := "sha256:" 64 lower-case hex digits
    tag      := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}

A bare name means its ``latest`` tag. Anything else is an ``InvalidInputError`` that names the
part that is wrong, raised before the reference can reach Docker, a shell or the database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from envs.kit.errors import InvalidInputError

NAME_MAX = 64
_NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*\Z")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_NUMBER_RE = re.compile(r"^[1-9][0-9]{0,8}\Z")
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class EnvRef:
    """A parsed reference. Exactly one of ``version``, ``digest``, ``tag`` is set."""

    name: str
    team: str | None = None
    version: int | None = None
    digest: str | None = None
    tag: str | None = None

    @property
    def full_name(self) -> str:
        """``team/name`` or ``name``."""
        return f"{self.team}/{self.name}" if self.team else self.name

    @property
    def is_pinned(self) -> bool:
        """True when the reference can only ever mean one version."""
        return self.version is not None or self.digest is not None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.full_name}@{self.version}"
        if self.digest is not None:
            return f"{self.full_name}@{self.digest}"
        return f"{self.full_name}:{self.tag}"


def check_name(value: str, field: str = "name", what: str = "name") -> str:
    """Validate a plain name (environment, team, runtime) and return it."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{field}: {what} must not be empty", field=field)
    if len(value) > NAME_MAX:
        raise InvalidInputError(
            f"{field}: {what} is {len(value)} characters long; at most {NAME_MAX} are allowed",
            field=field,
        )
    if not _NAME_RE.match(value):
        raise InvalidInputError(
            f"{field}: {what} {value!r} may contain only lower-case letters, digits, and . _ - between them",
            field=field,
            details={"value": value[:100]},
        )
    return value


def parse_ref(text: str, field: str = "environment") -> EnvRef:
    """Parse ``[team/]name[@N|@sha256:...|:tag]``; raise InvalidInputError naming the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(f"{field}: an environment reference must not be empty", field=field)
    if len(text) > 300:
        raise InvalidInputError(f"{field}: reference is too long ({len(text)} characters)", field=field)
    rest = text
    version: int | None = None
    digest: str | None = None
    tag: str | None = None
    if "@" in rest:
        rest, _, pin = rest.partition("@")
        if pin.startswith("sha256:") or ":" in pin:
            if not _DIGEST_RE.match(pin):
                raise InvalidInputError(
                    f"{field}: digest {pin[:80]!r} is not 'sha256:' followed by 64 hex digits",
                    field=field,
                    details={"part": "digest"},
                )
            digest = pin
        else:
            if not _NUMBER_RE.match(pin):
                raise InvalidInputError(
                    f"{field}: version {pin[:80]!r} is not a positive whole number",
                    field=field,
                    details={"part": "version"},
                )
            version = int(pin)
    elif ":" in rest:
        rest, _, tag = rest.rpartition(":")
        if not _TAG_RE.match(tag):
            raise InvalidInputError(
                f"{field}: tag {tag[:80]!r} may contain letters, digits, _ . - (at most 128, not starting with . or -)",
                field=field,
                details={"part": "tag"},
            )
    team: str | None = None
    if "/" in rest:
        team, _, rest = rest.partition("/")
        check_name(team, field, "team")
    check_name(rest, field, "environment name")
    if version is None and digest is None and tag is None:
        tag = DEFAULT_TAG
    return EnvRef(name=rest, team=team, version=version, digest=digest, tag=tag)


def check_tag(value: str, field: str = "tag") -> str:
    """Validate a tag name (``latest``, ``stable``, ``v1.2``) and return it."""
    if not isinstance(value, str) or not _TAG_RE.match(value):
        raise InvalidInputError(f"{field}: {str(value)[:80]!r} is not a valid tag", field=field)
    return value
