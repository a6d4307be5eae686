"""One base image's recipe: ``base-images/<name>/recipe.yaml`` parsed and checked, as plain data.

- A root (parent ``null`` in ``hierarchy.yaml``) has a ``debootstrap`` section (suite, variant,
  components, include) and optional ``cleanup`` globs removed from the root filesystem before
  import.
- A child has a list of shell ``steps`` run in a container started from its parent.
- Either may carry ``config`` (``env`` mapping, ``cmd`` list), merged over the template
  (``envs.base.hierarchy.BASE_CONFIG``) and inherited by children.

Beside it in the folder: ``verify`` (optional), a script run inside the built image and inside
every image built on it (jupyter/docker-stacks style), and ``README.md`` for people. Mistakes
raise InvalidInputError as ``file:line: field: problem``; nothing here calls Docker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from envs.kit.errors import InvalidInputError

RECIPE_FILE = "recipe.yaml"
VERIFY_FILE = "verify"
#: The environment of every step and of debootstrap: no questions asked, one locale.
STEP_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_SUITE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_VALUE_RE = re.compile(r'^[^"\\$`\x00-\x1f\x7f]*$')
_ROOT_KEYS = {"debootstrap", "cleanup", "config"}
_CHILD_KEYS = {"steps", "config"}
_DEBOOTSTRAP_KEYS = {"suite", "variant", "components", "include"}


@dataclass(frozen=True)
class Spec:
    """A parsed, validated recipe.yaml."""

    suite: str | None = None
    variant: str | None = None
    components: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    cleanup: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cmd: tuple[str, ...] | None = None


def load_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse a YAML file; also return the 1-based line of each top-level key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: file missing", field=path.name) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read: {exc}", field=path.name) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidInputError(f"{where}: not valid YAML: {problem}", field=path.name) from exc
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in lines:
                    raise bad_field(path, key.start_mark.line + 1, key.value, "appears twice")
                lines[key.value] = key.start_mark.line + 1
    return data, lines


def bad_field(path: Path, line: int | None, field: str, problem: str) -> InvalidInputError:
    where = f"{path}:{line}" if line else str(path)
    return InvalidInputError(
        f"{where}: {field}: {problem}",
        field=field,
        details={"file": str(path), "line": line},
    )


def read_spec(directory: Path, *, is_root: bool, hierarchy: Path, line: int | None) -> Spec:
    name = directory.name
    if not directory.is_dir():
        raise bad_field(hierarchy, line, name, f"missing recipe: no folder {directory}")
    path = directory / RECIPE_FILE
    if not path.is_file():
        raise bad_field(hierarchy, line, name, f"missing recipe: no {path}")
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise bad_field(path, None, "recipe", "must be a mapping")
    allowed = _ROOT_KEYS if is_root else _CHILD_KEYS
    for key in data:
        if key not in allowed:
            kind = "a root image (parent: null)" if is_root else f"a child image of {name}'s parent"
            raise bad_field(path, lines.get(str(key)), str(key), f"not a field of {kind}; use {sorted(allowed)}")

    def strings(key: str, value: Any, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad_field(path, lines.get(key), key, "must be a list of non-empty strings")
        if pattern is not None:
            for v in value:
                if not pattern.match(v):
                    raise bad_field(path, lines.get(key), key, f"invalid entry {v!r}")
        return tuple(value)

    env: tuple[tuple[str, str], ...] = ()
    cmd: tuple[str, ...] | None = None
    config = data.get("config")
    if config is not None:
        if not isinstance(config, dict) or set(config) - {"env", "cmd"}:
            raise bad_field(path, lines.get("config"), "config", "may hold only 'env' and 'cmd'")
        raw_env = config.get("env") or {}
        if not isinstance(raw_env, dict):
            raise bad_field(path, lines.get("config"), "config.env", "must be a mapping")
        for key, value in raw_env.items():
            if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
                raise bad_field(path, lines.get("config"), "config.env", f"invalid variable {key!r}")
            if not isinstance(value, str) or not _ENV_VALUE_RE.match(value):
                raise bad_field(
                    path,
                    lines.get("config"),
                    f"config.env.{key}",
                    "must be a string without quotes, backslashes, '$', '`' or control characters",
                )
        env = tuple(raw_env.items())
        if "cmd" in config:
            cmd = strings("cmd", config["cmd"])

    if not is_root:
        steps = strings("steps", data.get("steps"))
        if not steps:
            raise bad_field(path, lines.get("steps"), "steps", "a child image needs at least one step")
        return Spec(steps=steps, env=env, cmd=cmd)

    boot = data.get("debootstrap")
    if not isinstance(boot, dict):
        raise bad_field(path, lines.get("debootstrap"), "debootstrap", "a root image needs this mapping")
    if set(boot) - _DEBOOTSTRAP_KEYS:
        extra = sorted(set(boot) - _DEBOOTSTRAP_KEYS)
        raise bad_field(path, lines.get("debootstrap"), "debootstrap", f"unknown fields {extra}")
    suite = boot.get("suite")
    if not isinstance(suite, str) or not _SUITE_RE.match(suite):
        raise bad_field(
            path,
            lines.get("debootstrap"),
            "debootstrap.suite",
            "must be a suite name such as bookworm",
        )
    variant = boot.get("variant")
    if variant is not None and (not isinstance(variant, str) or not _SUITE_RE.match(variant)):
        raise bad_field(path, lines.get("debootstrap"), "debootstrap.variant", "must be a name such as minbase")
    components = strings("debootstrap.components", boot.get("components", ["main"]), _PACKAGE_RE)
    include = strings("debootstrap.include", boot.get("include", []), _PACKAGE_RE) if "include" in boot else ()
    cleanup = strings("cleanup", data.get("cleanup", []))
    for pattern in cleanup:
        if pattern.startswith("/") or ".." in Path(pattern).parts or pattern in {".", "*"}:
            raise bad_field(
                path,
                lines.get("cleanup"),
                "cleanup",
                f"{pattern!r} must be a relative path inside the image",
            )
    return Spec(
        suite=suite,
        variant=variant,
        components=components,
        include=include,
        cleanup=cleanup,
        env=env,
        cmd=cmd,
    )
