"""The shape of the tree: imports go one way (``api → runner → registry → envs``), route modules
hold no SQL and do not import each other, and no module grows past about 600 lines.

Every import counts, wherever it is written: at the top, inside a function, or under
``if TYPE_CHECKING:`` (a type-only import still ties the two packages together).
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("envs", "registry", "runner", "api")
# what each package must never import: everything above it in the direction
FORBIDDEN = {
    "envs": {"registry", "runner", "api"},
    "registry": {"runner", "api"},
    "runner": {"api"},
}
MAX_LINES = 600
SIZE_EXEMPT = ("runner/agent/", "api/migrations/")
SQL_TEXT = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|PRAGMA)\b", re.DOTALL)
SESSION_QUERIES = {"execute", "exec_driver_sql", "scalar", "scalars", "query"}


@dataclass(frozen=True)
class Import:
    module: str  # dotted name of the importing module
    target: str  # dotted name imported (for ``from a.b import c``: ``a.b.c`` when c is a module, else ``a.b``)
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            out += [Import(name, f"{source}.{alias.name}", node.lineno) for alias in node.names]
    return out


ALL = modules()
IMPORTS = {name: imports_of(name, path) for name, path in ALL.items()}


def top(dotted: str) -> str:
    return dotted.split(".")[0]


def test_the_four_packages_are_found() -> None:
    assert {top(m) for m in ALL} == set(PACKAGES)
    assert "api.routes.environments" in ALL and "runner.agent.main" in ALL


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package: str) -> None:
    wrong = [
        str(i)
        for name, found in IMPORTS.items()
        if top(name) == package
        for i in found
        if top(i.target) in FORBIDDEN[package]
    ]
    assert wrong == [], f"{package} may import only below it (api → runner → registry → envs)"


def test_nothing_outside_api_imports_api() -> None:
    wrong = [str(i) for name, found in IMPORTS.items() if top(name) != "api" for i in found if top(i.target) == "api"]
    assert wrong == []


ROUTES = sorted(name for name in ALL if name.startswith("api.routes.") and not name.endswith("__init__"))


def test_route_modules_do_not_import_each_other() -> None:
    """Builders that several routes share live in api/views.py."""
    wrong = [str(i) for name in ROUTES for i in IMPORTS[name] if i.target.startswith("api.routes.")]
    assert wrong == []


@pytest.mark.parametrize("route", ROUTES)
def test_route_modules_hold_no_sql(route: str) -> None:
    """Routes call services; the services (envs/, registry/, runner/) hold the queries."""
    path = ALL[route]
    wrong = [str(i) for i in IMPORTS[route] if top(i.target) == "sqlalchemy"]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_TEXT.search(node.value):
            wrong.append(f"{route}:{node.lineno} SQL text {node.value[:60]!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SESSION_QUERIES:
            wrong.append(f"{route}:{node.lineno} runs a query (.{node.func.attr})")
    module = importlib.import_module(route)
    for attr, value in vars(module).items():
        origin = getattr(value, "__module__", None) or getattr(value, "__name__", "")
        if isinstance(origin, str) and top(origin) == "sqlalchemy":
            wrong.append(f"{route}: {attr} comes from {origin}")
    assert wrong == []


def test_no_module_is_over_600_lines() -> None:
    """A module past that usually holds two ideas (STYLE.md); the agent and migrations aside."""
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in ALL.values()
        if not str(path.relative_to(ROOT)).startswith(SIZE_EXEMPT)
    }
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


RUNNER = {name for name in ALL if top(name) == "runner" and not name.startswith("runner.agent")}


def _runner_graph() -> dict[str, set[str]]:
    """runner module -> the runner modules it imports (``from runner import idle`` counts)."""
    graph: dict[str, set[str]] = {name: set() for name in RUNNER}
    for name in RUNNER:
        for i in IMPORTS[name]:
            target = i.target if i.target in RUNNER else i.target.rpartition(".")[0]
            if target in RUNNER and target != name and target != "runner":
                graph[name].add(target)
    return graph


def test_no_runner_module_imports_the_facade() -> None:
    """runner/service.py wires the collaborators; they are handed what they need instead."""
    wrong = [f"{name} imports runner.service" for name, deps in _runner_graph().items() if "runner.service" in deps]
    assert wrong == []


def test_runner_modules_import_each_other_without_a_cycle() -> None:
    graph = _runner_graph()
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for dep in sorted(graph[node]):
            cycle = visit(dep)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        assert cycle is None, " -> ".join(cycle or [])


def test_no_runner_module_reaches_into_another_objects_underscore_members() -> None:
    """``self._x`` is a module's own business; ``other._x`` (or ``self.other._x``) is not."""
    wrong = []
    for name in sorted(RUNNER):
        tree = ast.parse(ALL[name].read_text(), str(ALL[name]))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            wrong.append(f"{name}:{node.lineno} .{node.attr}")
    assert wrong == []


# ---------------------------------------------------------------------------- one store per feature
# Each table and the one module (its feature's store) that writes it: inserts, updates and
# deletes, as SQL expressions (``insert(Model)``, ``update(Model)``, ``delete(Model)``), as new
# ORM rows (``Model(...)``) or as ``session.delete(...)``. Others read; they ask the store to write.
STORES = {
    "runtimes": "runner.runtimes.store",
    "runtime_log": "runner.runtimes.store",
    "executions": "runner.cells.store",
    "execution_outputs": "runner.cells.store",
    "operations": "runner.operations",
    "result_files": "runner.cells.store",
    "installation": "runner.identity",
    "runners": "runner.identity",
    "runtime_secret_uses": "runner.runtimes.secret_uses",
    "pool_entries": "runner.runtimes.pool",
    "apps": "runner.apps.store",
    "app_deployments": "runner.apps.store",
    "app_instances": "runner.apps.store",
    "users": "registry.users",
    "api_tokens": "registry.users",
    "teams": "registry.teams",
    "team_members": "registry.teams",
    "publications": "registry.catalog",
    "team_events": "registry.events",
    "team_secrets": "registry.team_secrets",
    "environments": "envs.service",
    "environment_versions": "envs.service",
    "environment_tags": "envs.service",
}
DML = {"insert", "update", "delete"}


def _models() -> dict[str, str]:
    """ORM class name -> its table, for every model of the four packages."""
    from envs.kit.db import Base

    for name in ALL:
        if name.endswith(".models"):
            importlib.import_module(name)
    return {m.class_.__name__: str(m.class_.__tablename__) for m in Base.registry.mappers}


def _writes(name: str, path: Path, models: dict[str, str]) -> list[tuple[str, int, str]]:
    """(table, line, how) of each write the module's code issues."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {  # local name -> model class name, for what the module imports from a models module
        a.asname or a.name: a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("models")
        for a in n.names
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if fname in DML and node.args:
            target = node.args[0]
            if isinstance(target, ast.Attribute) and target.attr == "__table__":
                target = target.value
            model = aliases.get(target.id) if isinstance(target, ast.Name) else None
            if model in models:
                found.append((models[model], node.lineno, f"{fname}({model})"))
        elif isinstance(func, ast.Name) and aliases.get(func.id) in models:
            model = aliases[func.id]
            found.append((models[model], node.lineno, f"new {model}(...)"))
        receiver = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if fname == "delete" and receiver in ("s", "session") and node.args:
            found.append(("?", node.lineno, f"{receiver}.delete(...)"))
    return found


def test_every_table_has_a_store() -> None:
    assert sorted(set(_models().values()) - STORES.keys()) == []
    assert sorted(set(STORES.values()) - ALL.keys()) == []


def test_no_module_outside_a_features_store_writes_its_tables() -> None:
    """The runtimes store (runner/runtimes/store.py) alone writes runtime rows, the cells store
    (runner/cells/store.py) alone executions and their outputs, and so on (``STORES``): a rule
    about rows (a state change, activity, a delete's order) lives in one module. A session's
    ``delete(obj)`` counts for every table (its type is not known here): only stores call it."""
    models = _models()
    stores = set(STORES.values())
    wrong = []
    for name, path in ALL.items():
        if name.startswith("api.migrations"):
            continue
        for table, line, how in _writes(name, path, models):
            if (table == "?" and name not in stores) or (table != "?" and STORES[table] != name):
                wrong.append(f"{name}:{line} {how} writes {table} (its store: {STORES.get(table, 'a store')})")
    assert wrong == []


def test_activity_is_recorded_by_the_runtimes_store_alone() -> None:
    """What idle shutdown decides on (``last_activity_at``) is written in one place: no other
    module names the columns in a write (``.values(...)``, ``values={...}``, ``set(...)``)."""
    columns = {"last_activity_at", "last_activity"}
    wrong = []
    for name, path in ALL.items():
        if name in ("runner.runtimes.store", "runner.models") or name.startswith("api.migrations"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            method = func.attr if isinstance(func, ast.Attribute) else ""
            if method in ("values", "set", "set_in") and columns & {k.arg for k in node.keywords}:
                wrong.append(f"{name}:{node.lineno} .{method}(last_activity...)")
            for k in node.keywords:
                named = (
                    {c.value for c in k.value.keys if isinstance(c, ast.Constant)}
                    if isinstance(k.value, ast.Dict)
                    else set()
                )
                if k.arg == "values" and columns & named:
                    wrong.append(f"{name}:{node.lineno} values={{last_activity...}}")
    assert wrong == []


def test_every_error_leaf_lives_in_its_packages_errors_module() -> None:
    """``EnvctlError``'s leaves are found in one module per package (``errors.py``); the agent,
    which runs inside containers on the standard library alone, keeps its own."""
    wrong = []
    for name, path in ALL.items():
        if name.endswith(".errors") or name.startswith("runner.agent"):
            continue
        classes = [n for n in ast.parse(path.read_text(), str(path)).body if isinstance(n, ast.ClassDef)]
        wrong += [f"{name}:{c.lineno} {c.name}" for c in classes if c.name.endswith("Error") and c.name[0] != "_"]
    assert wrong == []


def test_the_top_level_is_what_the_design_fixes() -> None:
    """The project's top level: the four packages, base images, tests and build files; nothing else.

    Notes and pictures live beside what they describe (``runner/backends/swarm_notes.md``,
    ``api/web/screenshots/``), not in a new top-level folder.
    """
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    allowed = {"pyproject.toml", "README.md", "envs", "runner", "registry", "api", "base-images", "tests"}
    allowed |= {"Makefile", "scripts", ".ci", ".gitignore"}  # build files beside them
    top = {line.split("/", 1)[0] for line in tracked.stdout.splitlines() if line}
    assert top <= allowed, f"top-level entries the design does not fix: {sorted(top - allowed)}"
