"""Each package owns its settings (issue 14): the core's in envs/kit/config.py, and each
package above extends the Settings below it with fields of its own prefixes only. A module
reads only settings its own package's class defines, so a runner field used in the registry
fails here, and the README's Configuration table lists exactly the variables envctl reads."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import api.settings
import envs.kit.config
import registry.settings
import runner.settings

ROOT = Path(__file__).resolve().parent.parent
# the Settings class of each package, lowest first, and the module that defines it
LEVELS: dict[str, tuple[type, str]] = {
    "envs": (envs.kit.config.Settings, "envs.kit.config"),
    "registry": (registry.settings.Settings, "registry.settings"),
    "runner": (runner.settings.Settings, "runner.settings"),
    "api": (api.settings.Settings, "api.settings"),
}
# the names (``data_dir``) and prefixes (``runner_``) of the fields each level may add
OWN = {
    "envs": ("data_dir", "database_url", "api_host", "api_port", "base_"),
    "registry": ("registry", "secrets_"),
    "runner": ("runner_", "swarm_", "kube_", "save_", "mounts_", "results_", "import_", "machine_types"),
    "api": ("api_",),
}
SETTINGS_NAMES = {"settings", "_settings"}


def own_fields(package: str) -> list[str]:
    """The fields the package's class adds to the one below it."""
    cls = LEVELS[package][0]
    names = list(LEVELS)
    below = LEVELS[names[names.index(package) - 1]][0] if package != "envs" else None
    inherited = {f.name for f in dataclasses.fields(below)} if below else set()
    return [f.name for f in dataclasses.fields(cls) if f.name not in inherited]


@pytest.mark.parametrize("package", list(LEVELS))
def test_each_package_adds_only_fields_of_its_own_prefixes(package: str) -> None:
    fields = own_fields(package)
    assert fields, f"{package} adds no settings"
    others = [p for other, prefixes in OWN.items() if other != package for p in prefixes]
    wrong = [
        f
        for f in fields
        if not f.startswith(OWN[package])
        # a field of another level's prefix (a runner_ field in the registry) is not this level's,
        # unless this level's own prefix is the longer match (the core's api_port beside api_)
        or any(f.startswith(o) and len(o) > max(len(p) for p in OWN[package] if f.startswith(p)) for o in others)
    ]
    assert wrong == [], f"{package}'s Settings defines settings of another package"


def test_every_field_is_declared_with_its_variable_parser_and_help() -> None:
    for f in dataclasses.fields(api.settings.Settings):
        assert {"env", "parse", "help"} <= set(f.metadata), f"{f.name} is not declared with setting()"
        assert f.metadata["help"], f.name
        if f.metadata["env"] is not None:
            assert f.metadata["env"] == "ENVCTL_" + f.name.upper(), f.name


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_names(tree: ast.Module) -> set[str]:
    """Names bound to modules by imports (``from runner.runtimes import settings``)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                name = a.asname or a.name
                module = f"{node.module}.{a.name}" if node.module else a.name
                if node.level == 0 and _is_module(module) or node.level and name in SETTINGS_NAMES:
                    bound.add(name)
    return bound


def _is_module(dotted: str) -> bool:
    path = ROOT / Path(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _is_settings(node: ast.expr, modules: set[str]) -> bool:
    """``settings`` (not a module of that name) or ``<x>.settings`` / ``<x>._settings``."""
    if isinstance(node, ast.Name):
        return node.id in SETTINGS_NAMES and node.id not in modules
    return isinstance(node, ast.Attribute) and node.attr in SETTINGS_NAMES


def settings_reads(path: Path) -> list[tuple[int, str]]:
    """``(line, name)`` of every ``settings.<name>``, ``self.settings.<name>``,
    ``ctx.settings.<name>`` (any ``<x>.settings.<name>``) and ``getattr(settings, "<name>")``
    the module reads."""
    tree = ast.parse(path.read_text(), str(path))
    modules = _module_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_settings(node.value, modules):
            found.append((node.lineno, node.attr))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and _is_settings(node.args[0], modules)
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            found.append((node.lineno, node.args[1].value))
    return found


@pytest.mark.parametrize("package", list(LEVELS))
def test_no_module_reads_a_setting_its_package_does_not_own(package: str) -> None:
    cls, _ = LEVELS[package]
    known = set(dir(cls)) | {f.name for f in dataclasses.fields(cls)}
    wrong = [
        f"{path.relative_to(ROOT)}:{line} reads settings.{name}"
        for path in _modules(package)
        for line, name in settings_reads(path)
        if name not in known
    ]
    assert wrong == [], f"{package} reads settings its Settings ({cls.__module__}) does not define"


def test_the_check_finds_a_runner_setting_read_in_the_registry(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "def f(settings, self):\n"
        "    return settings.runner_idle_timeout, self.settings.registry, getattr(settings, 'save_path', '')\n"
    )
    reads = sorted(settings_reads(module))
    assert reads == [(2, "registry"), (2, "runner_idle_timeout"), (2, "save_path")]
    known = set(dir(registry.settings.Settings))
    assert [name for _, name in reads if name not in known] == ["runner_idle_timeout", "save_path"]


@pytest.mark.parametrize("package", list(LEVELS))
def test_each_module_takes_the_settings_class_of_its_own_package(package: str) -> None:
    _, home = LEVELS[package]
    wrong = []
    for path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and any(a.name == "Settings" for a in node.names):
                source = node.module or ""
                if source != home and (source.endswith("settings") or source == "envs.kit.config"):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} takes Settings from {source}")
    assert wrong == []


def _readme_variables() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `ENVCTL_")]
    return [v for row in rows for v in re.findall(r"`(ENVCTL_[A-Z0-9_]+)`", row.split("|")[1])]


def test_the_readme_configuration_table_lists_exactly_the_variables_envctl_reads() -> None:
    documented = _readme_variables()
    read = [v for v, _ in api.settings.help_lines()]
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    assert sorted(set(read) - set(documented)) == [], "variables the README's Configuration table misses"
    assert sorted(set(documented) - set(read)) == [], "variables the README lists that envctl does not read"
