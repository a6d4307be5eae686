"""A runtime's environment variables: which names and values are accepted (R9), and how they
combine with the ones its environment image sets.

Names follow POSIX's portable form (a letter or ``_``, then letters, digits, ``_``). Names
that steer the dynamic loader (``LD_*``), envctl's own agent (``ENVCTL_*``) or the NVIDIA
container runtime (``NVIDIA_*``, which could hand a container GPUs its machine type does not
grant) are reserved. Values are text without NUL, bounded in size. Nothing here builds a
command line: the variables reach the container as Docker's ``Env`` list and the cells'
processes through their environment, never through a shell as text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from envs.kit.errors import InvalidInputError
from runner.runtimes.secret_uses import check_ref  # the reference grammar lives with the secrets

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME = 128
MAX_VALUE = 32 * 1024  # bytes (UTF-8) of one value
MAX_TOTAL = 256 * 1024  # bytes of all names and values of one runtime
MAX_COUNT = 200
RESERVED_PREFIXES = ("ENVCTL_", "LD_", "NVIDIA_")
RESERVED_NAMES = frozenset({"HOSTNAME"})  # Docker sets it from the runtime's name

SET_HERE = "set here"
INHERITED = "inherited"


def check_name(name: object, field: str = "env") -> str:
    where = f"{field}.{str(name)[:MAX_NAME]}" if isinstance(name, str) and name else field
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"{field}: a variable name may not be empty", field=field)
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"{where}: {name[:MAX_NAME]!r} is not a variable name: a letter or _ first, then letters, digits "
            f"or _, at most {MAX_NAME} characters",
            field=where,
        )
    upper = name.upper()
    if upper in RESERVED_NAMES or upper.startswith(RESERVED_PREFIXES):
        raise InvalidInputError(
            f"{where}: {name} is reserved (names starting with {', '.join(RESERVED_PREFIXES)} and "
            f"{', '.join(sorted(RESERVED_NAMES))} are envctl's or the container runtime's)",
            field=where,
            details={"reserved": True},
        )
    return name


#: a variable's value: text, or a reference to a team secret (runner/runtimes/secret_uses.py)
EnvValue = str | dict[str, Any]


def check_value(name: str, value: object, field: str = "env") -> str:
    where = f"{field}.{name}"
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}: the value must be text", field=where)
    if "\x00" in value:
        raise InvalidInputError(f"{where}: the value may not contain a NUL character", field=where)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"{where}: the value is not valid Unicode text", field=where) from None
    if size > MAX_VALUE:
        raise InvalidInputError(f"{where}: the value is longer than {MAX_VALUE} bytes", field=where)
    return value


def check_entry(name: str, value: object, field: str = "env") -> EnvValue:
    """A value, or a secret reference (``{"secret": NAME}``), checked."""
    if isinstance(value, Mapping):
        return check_ref(name, value, field)
    return check_value(name, value, field)


def check_env(env: Mapping[str, object], field: str = "env") -> dict[str, EnvValue]:
    """A complete set of variables, checked; a copy."""
    if not isinstance(env, Mapping):
        raise InvalidInputError(f"{field}: must be a map of names to values", field=field)
    if len(env) > MAX_COUNT:
        raise InvalidInputError(f"{field}: at most {MAX_COUNT} variables per runtime", field=field)
    out = {check_name(k, field): check_entry(k, v, field) for k, v in env.items()}
    total = sum(len(k) + len(v.encode("utf-8")) for k, v in plain(out).items())
    if total > MAX_TOTAL:
        raise InvalidInputError(f"{field}: the variables add up to more than {MAX_TOTAL} bytes", field=field)
    return out


def plain(env: Mapping[str, object]) -> dict[str, str]:
    """The variables with text values: what may go into a container's configuration (secret
    references never do; their values reach the agent at boot)."""
    return {k: v for k, v in env.items() if isinstance(v, str)}


def merge(
    current: Mapping[str, EnvValue], changes: Mapping[str, EnvValue | None], field: str = "env"
) -> dict[str, EnvValue]:
    """``current`` with ``changes`` applied as a JSON merge patch: a value sets, null unsets."""
    out = dict(current)
    for name, value in changes.items():
        check_name(name, field)
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return check_env(out, field)


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str | None  # None for a secret: never shown
    source: str  # SET_HERE or INHERITED
    overrides: bool = False  # set here, over a value the image sets
    secret: str | None = None  # the secret (``team/name``) the value comes from
    image_value: str | None = None  # with ``overrides``: the value the image sets, which this one hides


def image_env(entries: Iterable[str] | None) -> dict[str, str]:
    """An image config's ``Env`` (``NAME=value`` strings) as a map."""
    out: dict[str, str] = {}
    for entry in entries or ():
        name, sep, value = str(entry).partition("=")
        if sep and name:
            out[name] = value
    return out


def effective(inherited: Mapping[str, str], own: Mapping[str, EnvValue]) -> list[EnvVar]:
    """What a cell sees, sorted by name: the runtime's own win over the image's. A secret
    shows as its reference, never its value."""
    out = []
    for n in sorted(set(inherited) | set(own)):
        if n not in own:
            out.append(EnvVar(n, inherited[n], INHERITED))
            continue
        value = own[n]
        if isinstance(value, str):
            out.append(EnvVar(n, value, SET_HERE, overrides=n in inherited, image_value=inherited.get(n)))
        else:
            ref = f"{value['team']}/{value['secret']}" if value.get("team") else str(value["secret"])
            out.append(EnvVar(n, None, SET_HERE, overrides=n in inherited, secret=ref, image_value=inherited.get(n)))
    return out
