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

from envs.kit.errors import InvalidInputError

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


def check_env(env: Mapping[str, object], field: str = "env") -> dict[str, str]:
    """A complete set of variables, checked; a copy."""
    if not isinstance(env, Mapping):
        raise InvalidInputError(f"{field}: must be a map of names to values", field=field)
    if len(env) > MAX_COUNT:
        raise InvalidInputError(f"{field}: at most {MAX_COUNT} variables per runtime", field=field)
    out = {check_name(k, field): check_value(k, v, field) for k, v in env.items()}
    total = sum(len(k) + len(v.encode("utf-8")) for k, v in out.items())
    if total > MAX_TOTAL:
        raise InvalidInputError(f"{field}: the variables add up to more than {MAX_TOTAL} bytes", field=field)
    return out


def merge(current: Mapping[str, str], changes: Mapping[str, str | None], field: str = "env") -> dict[str, str]:
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
    value: str
    source: str  # SET_HERE or INHERITED
    overrides: bool = False  # set here, over a value the image sets


def image_env(entries: Iterable[str] | None) -> dict[str, str]:
    """An image config's ``Env`` (``NAME=value`` strings) as a map."""
    out: dict[str, str] = {}
    for entry in entries or ():
        name, sep, value = str(entry).partition("=")
        if sep and name:
            out[name] = value
    return out


def effective(inherited: Mapping[str, str], own: Mapping[str, str]) -> list[EnvVar]:
    """What a cell sees, sorted by name: the runtime's own win over the image's."""
    names = sorted(set(inherited) | set(own))
    return [
        EnvVar(n, own[n], SET_HERE, overrides=n in inherited) if n in own else EnvVar(n, inherited[n], INHERITED)
        for n in names
    ]
