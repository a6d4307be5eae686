"""Rows changed through their attributes count as writes too: ``rt.name = ...`` on a runtime row
loaded with ``s.get(Runtime, ...)`` is an UPDATE of ``runtimes`` when the session flushes, and
only the runtimes store may issue it (``tests/test_layering.STORES``).

The check is static and follows what a reader of the code can follow: a name is an ORM row of a
model when it is a parameter annotated with the model, or is assigned (or looped over) from
``s.get(Model, ...)``, ``select(Model)`` and the calls that wrap it (``s.scalars(...).first()``),
or from a call of a function whose return annotation is the model (a function of the same
module, one reached through an imported module, or a method whose name means one model wherever
it is defined). An assignment to one of its attributes, or ``setattr`` on it, is a write.
"""

from __future__ import annotations

import ast

from tests.test_layering import ALL, STORES, _models

MODELS = _models()
# What wraps a query and still hands back its rows (``s.scalars(select(M)).first()``).
ROW_GETTERS = {"get", "get_one", "select"}
CONTAINERS = {"list", "Sequence", "Iterator", "Iterable", "dict", "tuple", "set"}


def _model_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> model class name, for what the module imports from a models module."""
    return {
        a.asname or a.name: a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("models")
        for a in n.names
        if a.name in MODELS
    }


def _module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted module, for modules of the four packages the module imports."""
    found = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found.update({a.asname or a.name: a.name for a in n.names if a.name in ALL})
        elif isinstance(n, ast.ImportFrom) and n.module:
            found.update({a.asname or a.name: f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in ALL})
    return found


def _returned_model(fn: ast.FunctionDef | ast.AsyncFunctionDef, aliases: dict[str, str]) -> str | None:
    """The model a function returns one row of, by its annotation (``-> Runtime``, ``-> Runtime | None``;
    ``-> tuple[Runtime, bool]`` is noted as ``Runtime#0``: the row is the tuple's first item)."""
    ann = fn.returns
    if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") == "tuple" and isinstance(ann.slice, ast.Tuple):
        for i, item in enumerate(ann.slice.elts):
            if isinstance(item, ast.Name) and item.id in aliases:
                return f"{aliases[item.id]}#{i}"
        return None
    if ann is None or (isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") in CONTAINERS):
        return None
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        words = ann.value.replace("|", " ").split()
        if any(w.split("[")[0] in CONTAINERS for w in words):
            return None
        named = {aliases[w] for w in words if w in aliases}
    else:
        named = {aliases[n.id] for n in ast.walk(ann) if isinstance(n, ast.Name) and n.id in aliases}
    return named.pop() if len(named) == 1 else None


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in ALL.items()}
# (module, function name) -> model; and a method name -> model when every definition agrees
RETURNS: dict[tuple[str, str], str] = {}
_BY_NAME: dict[str, set[str | None]] = {}
for _name, _tree in TREES.items():
    _aliases = _model_aliases(_tree)
    for _fn in _functions(_tree):
        _model = _returned_model(_fn, _aliases)
        _BY_NAME.setdefault(_fn.name, set()).add(_model)
        if _model:
            RETURNS[(_name, _fn.name)] = _model
UNIQUE = {fn: next(iter(ms)) for fn, ms in _BY_NAME.items() if len(ms) == 1 and None not in ms}


def _yields_rows_of(node: ast.expr, module: str, aliases: dict[str, str], modules: dict[str, str]) -> str | None:
    """The model whose row(s) an expression hands back, if the check can tell."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name):
            found = RETURNS.get((module, func.id)) or UNIQUE.get(func.id)
            if found:
                return found
        elif isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else ""
            found = RETURNS.get((modules[owner], func.attr)) if owner in modules else None
            found = found or RETURNS.get((module, func.attr)) or UNIQUE.get(func.attr)
            if found:
                return found
    for sub in ast.walk(node):
        if not isinstance(sub, ast.Call):
            continue
        func = sub.func
        fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if fname in ROW_GETTERS and sub.args and isinstance(sub.args[0], ast.Name):
            model = aliases.get(sub.args[0].id)
            if model and (fname != "select" or len(sub.args) == 1):
                return model
    return None


def _annotation_model(ann: ast.expr | None, aliases: dict[str, str]) -> str | None:
    if ann is None:
        return None
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        named = {aliases[w] for w in ann.value.replace("|", " ").split() if w in aliases}
    else:
        named = {aliases[n.id] for n in ast.walk(ann) if isinstance(n, ast.Name) and n.id in aliases}
    return named.pop() if len(named) == 1 else None


def attribute_writes(module: str) -> list[tuple[str, int, str]]:
    """(table, line, how) of each attribute set on an ORM row in the module."""
    tree = TREES[module]
    aliases = _model_aliases(tree)
    modules = _module_aliases(tree)
    found = []
    for fn in _functions(tree):
        rows: dict[str, str] = {}  # local name -> model
        args = fn.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            model = _annotation_model(a.annotation, aliases)
            if model:
                rows[a.arg] = model
        for n in ast.walk(fn):
            if isinstance(n, ast.Assign) or (isinstance(n, ast.AnnAssign) and n.value is not None):
                model = _yields_rows_of(n.value, module, aliases, modules)  # type: ignore[arg-type]
                if isinstance(n, ast.AnnAssign):
                    model = model or _annotation_model(n.annotation, aliases)
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                model, _, index = (model or "").partition("#")
                for t in targets:
                    if index and isinstance(t, ast.Tuple) and len(t.elts) > int(index):
                        t = t.elts[int(index)]
                    elif index:
                        continue
                    if isinstance(t, ast.Name) and model:
                        rows[t.id] = model
            elif isinstance(n, (ast.For, ast.AsyncFor, ast.comprehension)) and isinstance(n.target, ast.Name):
                model = _yields_rows_of(n.iter, module, aliases, modules)
                if model and "#" not in model:
                    rows[n.target.id] = model
        for n in ast.walk(fn):
            targets: list[ast.expr] = []
            if isinstance(n, ast.Assign):
                targets = n.targets
            elif isinstance(n, (ast.AugAssign, ast.AnnAssign)):
                targets = [n.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in rows:
                    model = rows[t.value.id]
                    found.append((MODELS[model], n.lineno, f"{t.value.id}.{t.attr} = ... ({model})"))
            if (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Name)
                and n.func.id == "setattr"
                and n.args
                and isinstance(n.args[0], ast.Name)
                and n.args[0].id in rows
            ):
                model = rows[n.args[0].id]
                found.append((MODELS[model], n.lineno, f"setattr({n.args[0].id}, ...) ({model})"))
    return found


def test_no_module_outside_a_features_store_sets_attributes_of_its_rows() -> None:
    """A state, a name, a pending setting or a registry digest changed on a loaded row is a
    write like any UPDATE: it belongs in the table's store (``STORES``), which callers ask."""
    wrong = []
    for module in ALL:
        if module.startswith("api.migrations") or module.endswith(".models"):
            continue
        for table, line, how in attribute_writes(module):
            if STORES[table] != module:
                wrong.append(f"{module}:{line} {how} writes {table} (its store: {STORES[table]})")
    assert wrong == []


def test_the_check_sees_a_write_through_a_loaded_row() -> None:
    """The check itself: the ways a row is loaded in this tree are each recognised."""
    import tests.test_row_writes as me

    source = """
from runner.models import Runtime
import envs.service as envs_service
from runner.runtimes import store

def by_get(s, rid):
    rt = s.get(Runtime, rid, with_for_update=True)
    rt.name = "x"

def by_param(rt: Runtime) -> None:
    rt.pending = {}

def by_select(s):
    for rt in s.scalars(select(Runtime)):
        setattr(rt, "state", "error")

def by_module_function(s, ref):
    version = envs_service.get_version(s, 1)
    version.labels = {}

def by_tuple(s, new):
    made, _created = envs_service.register_version(s, new)
    made.registry_digest = "sha256:0"
"""
    me.TREES["tests.fake_module"] = ast.parse(source)
    try:
        writes = sorted((t, how.split(" ")[0]) for t, _, how in attribute_writes("tests.fake_module"))
    finally:
        del me.TREES["tests.fake_module"]
    assert writes == [
        ("environment_versions", "made.registry_digest"),
        ("environment_versions", "version.labels"),
        ("runtimes", "rt.name"),
        ("runtimes", "rt.pending"),
        ("runtimes", "setattr(rt,"),
    ]
