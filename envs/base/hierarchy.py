"""The base images as a family: ``base-images/hierarchy.yaml`` and the recipe folders, as data.

``hierarchy.yaml`` maps each image name to its parent (``null`` for a root); each image has a
folder ``base-images/<name>/`` with its recipe (``envs.base.recipes``). Loading gives each
image a **recipe digest** over its recipe files (all but README.md and hidden files), its
parent's digest, the mirror and the suite (and, for a root, the extra CA certificates), so a
changed parent changes every descendant. The digest names what a built image was made from:
images are labelled with it and reused by it, so its computation never changes without a new
``_DIGEST_VERSION``.

Also here: the order to build in, and each image's trusted configuration (BASE_CONFIG, then
each ancestor's ``config``). Nothing here calls Docker.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.base.host import ExtraCACert, check_mirror
from envs.base.recipes import Spec, bad_field, load_yaml, read_spec
from envs.kit.errors import InvalidInputError

LABEL_IMAGE = "envctl.base-image"
LABEL_DIGEST = "envctl.recipe-digest"
LABEL_PARENT = "envctl.parent-image"
LABEL_BUILD = "envctl.build"  # on build and verify containers, never on an image
LABEL_BUILDER = "envctl.builder"  # which process made a build container (host:pid)


def build_labels(image_name: str) -> dict[str, str]:
    """The labels of a build or verify container: what it builds, and which process made it
    (so that a test, or a second build beside this one, looks only at its own)."""
    return {LABEL_BUILD: "1", LABEL_IMAGE: image_name, LABEL_BUILDER: f"{socket.gethostname()}:{os.getpid()}"}


REPOSITORY_PREFIX = "envctl-base/"
HIERARCHY_FILE = "hierarchy.yaml"
RECIPES_DIR_ENV = "ENVCTL_BASE_IMAGES_DIR"

#: The trusted image configuration every base image starts from; recipes add to ``env`` and
#: may replace ``cmd``. Nothing else of a build container's configuration reaches an image.
BASE_CONFIG: Mapping[str, Any] = {
    "env": {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    },
    "cmd": ["/bin/bash"],
    "workdir": "/root",
}

_DIGEST_VERSION = b"envctl-base-image/1"
_NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")


@dataclass(frozen=True)
class Recipe:
    name: str
    parent: str | None
    directory: Path
    digest: str  # "sha256:..." over recipe files, parent digest, mirror, suite (and a root's CAs)
    extra_ca_certs: tuple[ExtraCACert, ...] = field(default=(), repr=False)  # roots only


def default_recipes_dir() -> Path:
    """``$ENVCTL_BASE_IMAGES_DIR`` if set, else ``base-images/`` at the repository root."""
    override = os.environ.get(RECIPES_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "base-images"


def load_hierarchy(root: Path, mirror: str, extra_ca_certs: Sequence[ExtraCACert] = ()) -> dict[str, Recipe]:
    """Read ``hierarchy.yaml`` and every recipe under ``root``; parents come first.

    ``extra_ca_certs`` (from :func:`envs.base.host.read_extra_ca_certs`) go into every root image, and into
    its digest. Raises InvalidInputError (``file:line: field: problem``) for a missing or
    malformed file, an unknown parent, a cycle, or a missing or invalid recipe.
    """
    mirror = check_mirror(mirror)
    path = root / HIERARCHY_FILE
    data, lines = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise bad_field(path, None, "hierarchy", "must map image names to their parent (or null)")
    parents: dict[str, str | None] = {}
    for name, parent in data.items():
        line = lines.get(str(name))
        if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 64:
            raise bad_field(path, line, str(name), "image names are lowercase letters, digits, '.', '_', '-'")
        if parent is not None and not isinstance(parent, str):
            raise bad_field(path, line, name, "the parent must be an image name or null")
        parents[name] = parent
    for name, parent in parents.items():
        if parent is not None and parent not in parents:
            known = ", ".join(sorted(parents))
            raise bad_field(path, lines.get(name), name, f"unknown parent {parent!r} (known: {known})")

    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            raise bad_field(path, lines.get(name), name, f"parent cycle: {cycle}")
        state[name] = "visiting"
        parent = parents[name]
        if parent is not None:
            visit(parent, [*trail, name])
        state[name] = "done"
        order.append(name)

    for name in parents:
        visit(name, [])

    recipes: dict[str, Recipe] = {}
    suites: dict[str, str] = {}
    for name in order:
        parent = parents[name]
        directory = root / name
        spec = read_spec(directory, is_root=parent is None, hierarchy=path, line=lines.get(name))
        suite = spec.suite if parent is None else suites[parent]
        assert suite is not None
        suites[name] = suite
        parent_digest = recipes[parent].digest if parent is not None else ""
        certs = tuple(sorted(extra_ca_certs, key=lambda c: c.name)) if parent is None else ()
        digest = _recipe_digest(name, directory, parent_digest, mirror, suite, certs)
        recipes[name] = Recipe(name=name, parent=parent, directory=directory, digest=digest, extra_ca_certs=certs)
    return recipes


def build_order(recipes: dict[str, Recipe], names: list[str] | None) -> list[Recipe]:
    """The named recipes (all when ``names`` is None) plus their ancestors, parents first."""
    if names is None:
        wanted = set(recipes)
    else:
        unknown = [n for n in names if n not in recipes]
        if unknown:
            raise InvalidInputError(
                f"unknown base image {', '.join(map(repr, unknown))}; known: {', '.join(sorted(recipes)) or '(none)'}",
                field="names",
                details={"unknown": unknown, "known": sorted(recipes)},
            )
        wanted = set()
        for name in names:
            current: str | None = name
            while current is not None and current not in wanted:
                wanted.add(current)
                current = recipes[current].parent
    ordered: list[Recipe] = []
    placed: set[str] = set()

    def place(name: str) -> None:
        if name in placed:
            return
        parent = recipes[name].parent
        if parent is not None:
            place(parent)
        placed.add(name)
        ordered.append(recipes[name])

    for name in recipes:
        if name in wanted:
            place(name)
    return ordered


def recipe_files(directory: Path) -> list[Path]:
    """Files that make up a recipe: everything in its folder but README.md and hidden files."""
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if path.is_file() and relative.as_posix() != "README.md":
            files.append(path)
    return files


def _recipe_digest(
    name: str,
    directory: Path,
    parent_digest: str,
    mirror: str,
    suite: str,
    extra_ca_certs: Sequence[ExtraCACert] = (),
) -> str:
    sha = hashlib.sha256()

    def put(value: bytes) -> None:
        sha.update(len(value).to_bytes(8, "big"))
        sha.update(value)

    for value in (
        _DIGEST_VERSION,
        name.encode(),
        parent_digest.encode(),
        mirror.encode(),
        suite.encode(),
    ):
        put(value)
    for path in recipe_files(directory):
        put(path.relative_to(directory).as_posix().encode())
        put(path.read_bytes())
    # Only when there are any: without extra CAs the digest stays what it was before them.
    if extra_ca_certs:
        put(b"/extra-ca-certs")  # never a recipe file's (relative) path
        for cert in sorted(extra_ca_certs, key=lambda c: c.name):
            put(cert.name.encode())
            put(cert.pem)
    return "sha256:" + sha.hexdigest()


def lineage(recipes: Mapping[str, Recipe], name: str) -> list[Recipe]:
    """The recipe and its ancestors, root first."""
    chain = []
    current: str | None = name
    while current is not None:
        chain.append(recipes[current])
        current = recipes[current].parent
    return chain[::-1]


def spec_of(recipe: Recipe) -> Spec:
    return read_spec(
        recipe.directory,
        is_root=recipe.parent is None,
        hierarchy=recipe.directory.parent / HIERARCHY_FILE,
        line=None,
    )


def image_config(recipes: Mapping[str, Recipe], recipe: Recipe) -> dict[str, Any]:
    """The trusted configuration of ``recipe``'s image: template, then each ancestor's config."""
    env: dict[str, str] = dict(BASE_CONFIG["env"])
    cmd: list[str] = list(BASE_CONFIG["cmd"])
    for link in lineage(recipes, recipe.name):
        spec = spec_of(link)
        env.update(spec.env)
        if spec.cmd is not None:
            cmd = list(spec.cmd)
    return {
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Cmd": cmd,
        "WorkingDir": BASE_CONFIG["workdir"],
        "Labels": {
            LABEL_IMAGE: recipe.name,
            LABEL_DIGEST: recipe.digest,
            LABEL_PARENT: recipe.parent or "",
        },
    }


def repository_tag(recipe: Recipe) -> tuple[str, str]:
    return REPOSITORY_PREFIX + recipe.name, recipe.digest.removeprefix("sha256:")[:12]
