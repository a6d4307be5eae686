"""Environment spec files: a version described as steps on a parent.

    # acme-ml.yaml
    name: acme/ml                 # the environment the build saves into
    extends: python3@1            # the parent: any reference (a tag is resolved and pinned)
    message: ML tools for the team
    steps:
      - apt: [graphviz, jq]       # apt-get install, as root
      - pip: [numpy==2.1.0]       # python3 -m pip install
      - env: {MPLBACKEND: Agg}    # environment variables of the new version's image
      - run: |                    # a bash cell
          mkdir -p /opt/data
      - files:                    # files written into the image
          /opt/data/README: "hello"

Building a spec boots a runtime from the parent, runs the steps as cells (the same path a
person takes by hand) and saves. A bad spec is reported as ``file:line: field: problem``
before anything runs; the same spec on the same parent digest reuses the version it made.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from envs.kit.errors import InvalidInputError
from envs.refs import EnvRef, parse_ref

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_APT = re.compile(r"^[a-z0-9][a-z0-9+.-]*(?:=[A-Za-z0-9.+~:-]+)?\Z")
_PIP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:\[[A-Za-z0-9,._-]+\])?(?:(?:==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!-]+)?\Z")
RESERVED_ENV = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "PATH", "HOME", "HOSTNAME"})
STEP_KINDS = ("apt", "pip", "env", "run", "files")
MAX_FILE = 1024 * 1024


@dataclass(frozen=True)
class Step:
    kind: str
    value: Any
    line: int

    def cell(self) -> tuple[str, str] | None:
        """The cell that performs this step: (language, code); None for ``env``."""
        if self.kind == "apt":
            packages = " ".join(shlex.quote(p) for p in self.value)
            return (
                "bash",
                "set -e\nexport DEBIAN_FRONTEND=noninteractive\napt-get update -qq\n"
                f"apt-get install -y -qq --no-install-recommends {packages}\n"
                "apt-get clean\nrm -rf /var/lib/apt/lists/*",
            )
        if self.kind == "pip":
            packages = " ".join(shlex.quote(p) for p in self.value)
            return ("bash", f"set -e\npython3 -m pip install --no-cache-dir --disable-pip-version-check {packages}")
        if self.kind == "run":
            return ("bash", "set -e\n" + str(self.value))
        if self.kind == "files":
            code = "import os\n"
            for path, content in self.value.items():
                code += (
                    f"os.makedirs(os.path.dirname({path!r}) or '/', exist_ok=True)\n"
                    f"open({path!r}, 'w', encoding='utf-8').write({content!r})\n"
                )
            return ("python", code)
        return None


@dataclass(frozen=True)
class Spec:
    name: str
    extends: EnvRef
    steps: tuple[Step, ...]
    message: str = ""
    source: str = "<spec>"
    env: dict[str, str] = field(default_factory=dict)

    def digest(self, parent_digest: str) -> str:
        """Same spec on the same parent digest -> same digest (the build cache key)."""
        body = json.dumps(
            {"name": self.name, "parent": parent_digest, "steps": [[s.kind, s.value] for s in self.steps]},
            sort_keys=True,
        )
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if key in mapping:
            raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    mapping["__lines__"] = lines
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


FIELDS = ("name", "extends", "message", "steps")  # a spec file's top-level fields


def parse(text: str, source: str = "<spec>") -> Spec:
    """Parse and check a spec; every problem is ``source:line: field: problem``."""

    def bad(line: int | None, where: str, problem: str) -> InvalidInputError:
        at = f"{source}:{line}" if line else source
        return InvalidInputError(f"{at}: {where}: {problem}", field=where, details={"line": line, "file": source})

    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise bad(mark.line + 1 if mark else None, "yaml", str(exc.problem or exc)) from exc
    except yaml.YAMLError as exc:
        raise bad(None, "yaml", str(exc)) from exc
    if not isinstance(data, dict):
        raise bad(1, "spec", "must be a YAML map with name, extends and steps")
    lines: dict[str, int] = data.pop("__lines__", {})
    data.pop("__line__", None)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise bad(lines.get(unknown[0]), unknown[0], f"unknown field; known fields: {', '.join(FIELDS)}")
    for required in ("name", "extends", "steps"):
        if required not in data:
            raise bad(None, required, "missing")
    name = data["name"]
    if not isinstance(name, str):
        raise bad(lines.get("name"), "name", "must be a string like team/name")
    try:
        named = parse_ref(name, "name")
    except InvalidInputError as exc:
        raise bad(lines.get("name"), "name", exc.message.split(": ", 1)[-1]) from exc
    if named.tag != "latest" or named.is_pinned or ":" in name or "@" in name:
        raise bad(lines.get("name"), "name", "an environment name, without a version or tag")
    if not isinstance(data["extends"], str):
        raise bad(lines.get("extends"), "extends", "must be a reference like python3@1")
    try:
        extends = parse_ref(data["extends"], "extends")
    except InvalidInputError as exc:
        raise bad(lines.get("extends"), "extends", exc.message.split(": ", 1)[-1]) from exc
    message = data.get("message", "")
    if not isinstance(message, str) or len(message) > 2000:
        raise bad(lines.get("message"), "message", "must be text of at most 2000 characters")
    raw_steps = data["steps"]
    if not isinstance(raw_steps, list) or not raw_steps:
        raise bad(lines.get("steps"), "steps", "must be a non-empty list")
    steps: list[Step] = []
    env: dict[str, str] = {}
    for i, raw in enumerate(raw_steps, 1):
        where = f"steps[{i}]"
        if not isinstance(raw, dict):
            raise bad(lines.get("steps"), where, f"must be a map with one of {', '.join(STEP_KINDS)}")
        line = raw.pop("__line__", None)
        raw.pop("__lines__", None)
        if len(raw) != 1 or next(iter(raw)) not in STEP_KINDS:
            raise bad(line, where, f"must have exactly one of {', '.join(STEP_KINDS)}, not {sorted(raw)}")
        kind, value = next(iter(raw.items()))
        where = f"{where}.{kind}"
        steps.append(Step(kind, _check_step(kind, value, line, where, bad), line or 0))
        if kind == "env":
            env.update(steps[-1].value)
    return Spec(name=named.full_name, extends=extends, steps=tuple(steps), message=message, source=source, env=env)


def _check_step(kind: str, value: Any, line: int | None, where: str, bad: Any) -> Any:
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in ("__line__", "__lines__")}
    if kind in ("apt", "pip"):
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
            raise bad(line, where, "must be a list of package names")
        pattern = _APT if kind == "apt" else _PIP
        for p in value:
            if not pattern.match(p):
                raise bad(
                    line,
                    where,
                    f"{p[:80]!r} is not a package name" + (" (name or name=version)" if kind == "apt" else ""),
                )
        return tuple(value)
    if kind == "env":
        if not isinstance(value, dict) or not value:
            raise bad(line, where, "must be a map of NAME: value")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not _ENV_NAME.match(k):
                raise bad(
                    line, where, f"{str(k)[:80]!r} is not a variable name (letters, digits, _; not first a digit)"
                )
            if k in RESERVED_ENV or k.startswith("ENVCTL_"):
                raise bad(line, where, f"{k} is reserved")
            if not isinstance(v, (str, int, float, bool)):
                raise bad(line, where, f"{k}: the value must be text")
            out[k] = str(v)
        return out
    if kind == "run":
        if not isinstance(value, str) or not value.strip():
            raise bad(line, where, "must be a bash script")
        return value
    if kind == "files":
        if not isinstance(value, dict) or not value:
            raise bad(line, where, "must be a map of /absolute/path: content")
        out = {}
        for path, content in value.items():
            if not isinstance(path, str) or not path.startswith("/") or "\0" in path or ".." in path.split("/"):
                raise bad(line, where, f"{str(path)[:80]!r} must be an absolute path without ..")
            if path.rstrip("/") in (
                "",
                "/results",
                "/run/envctl",
                "/opt/envctl",
                "/proc",
                "/sys",
                "/dev",
            ) or path.startswith(("/results/", "/run/envctl/", "/opt/envctl/", "/proc/", "/sys/", "/dev/")):
                raise bad(line, where, f"{path} is not a place a version can hold files")
            if not isinstance(content, str) or len(content) > MAX_FILE:
                raise bad(line, where, f"{path}: content must be text of at most 1 MB")
            out[path] = content
        return out
    raise bad(line, where, "unknown step")
