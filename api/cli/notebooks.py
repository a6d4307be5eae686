"""``envctl run NOTEBOOK``: a Jupyter notebook's code cells, in order, in a runtime; the outputs,
execution counts and exact environment version written back into the notebook.

What runtime a notebook runs in (its environment, language, and the runtime this command
creates) is decided here and only here, in ``_prepare`` and ``_create_notebook_runtime``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from api.cli.cells import await_execution, text
from api.cli.client import Api
from api.cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, CliError
from api.cli.leases import DEFAULT_LEASE, Heartbeat
from api.cli.options import Command, client_options
from api.cli.output import print_json


def _nbformat() -> Any:
    """nbformat, imported when a notebook command needs it (it has no type hints)."""
    import nbformat

    return nbformat


def _read_notebook(path: Path) -> Any:
    nbformat = _nbformat()
    try:
        nb = nbformat.read(str(path), as_version=4)
    except FileNotFoundError as exc:
        raise CliError(f"{path}: no such file", EXIT_BAD_INPUT) from exc
    except OSError as exc:
        raise CliError(f"{path}: cannot read it: {exc.strerror or exc}", EXIT_BAD_INPUT) from exc
    except Exception as exc:  # nbformat raises many kinds for a file that is not a notebook
        raise CliError(f"{path}: not a Jupyter notebook nbformat can read ({exc})", EXIT_BAD_INPUT) from exc
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        raise CliError(f"{path}: not a valid notebook: {exc.message}", EXIT_BAD_INPUT) from exc
    return nb


def _notebook_language(nb: Any) -> str:
    """bash when the notebook's kernelspec or language_info says so, else python."""
    meta = nb.metadata
    said = [
        (meta.get("kernelspec") or {}).get("language"),
        (meta.get("kernelspec") or {}).get("name"),
        (meta.get("language_info") or {}).get("name"),
    ]
    return "bash" if any(str(v).lower() == "bash" for v in said if v) else "python"


def runtime_name_for(path: Path) -> str:
    """A valid runtime name from a notebook's file name: lower case, ``[a-z0-9._-]``, each
    separator between letters or digits, at most 56 characters (room for a suffix)."""
    stem = unicodedata.normalize("NFKD", path.stem).encode("ascii", "ignore").decode().lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", stem)
    name = re.sub(r"[._-]{2,}", lambda m: "-" if "-" in m.group() else m.group()[0], name)
    name = name.strip("._-")[:56].strip("._-")
    return name or "notebook"


def _notebook_kernel(nb: Any) -> str | None:
    """The kernelspec name the notebook was written with (metadata.kernelspec.name)."""
    name = (nb.metadata.get("kernelspec") or {}).get("name")
    return str(name) if isinstance(name, str) and name.strip() else None


@dataclass(frozen=True)
class _RuntimeType:
    type: str  # native | jupyter
    kernel: str | None
    why: str  # said to the user


def _choose_type(api: Api, nb: Any, environment: str, asked: str, kernel: str | None) -> _RuntimeType:
    """``auto``: the jupyter type when the environment provides the notebook's kernelspec (its
    magics and syntax then work as in Jupyter), else the native type. ``--type`` overrides."""
    wanted = kernel or _notebook_kernel(nb)
    if asked == "native":
        return _RuntimeType("native", None, "native (asked for)")
    if asked == "jupyter":
        chosen = wanted or "python3"
        return _RuntimeType("jupyter", chosen, f"jupyter, kernel {chosen} (asked for)")
    if wanted is None:
        return _RuntimeType("native", None, "native (the notebook names no kernelspec)")
    try:
        found = api.call("GET", f"/environments/{environment}/kernelspecs")
    except CliError as exc:
        if exc.exit_code == EXIT_BAD_INPUT or exc.status == 404:
            raise  # a bad or unknown environment: said once, here
        reason = exc.server_message or exc.message
        return _RuntimeType("native", None, f"native (could not look for kernelspec {wanted}: {reason})")
    names = [k["name"] for k in found.get("kernelspecs") or []]
    if wanted in names:
        return _RuntimeType("jupyter", wanted, f"jupyter, kernel {wanted} ({found['ref']} provides it)")
    return _RuntimeType(
        "native",
        None,
        f"native ({found['ref']} has no Jupyter kernelspec {wanted}; an environment with ipykernel, such as "
        "python3-jupyter, runs the notebook as Jupyter does)",
    )


def _create_notebook_runtime(
    api: Api,
    path: Path,
    environment: str,
    language: str,
    machine_type: str | None,
    kind: _RuntimeType,
    lease: int,
) -> dict[str, Any]:
    base = runtime_name_for(path)
    taken = {rt["name"] for rt in api.call("GET", "/runtimes")}
    n = 1
    while True:
        name = base if n == 1 else f"{base}-{n}"
        n += 1
        if name in taken:
            continue
        body: dict[str, Any] = {"name": name, "environment": environment, "language": language, "type": kind.type}
        if kind.kernel:
            body["kernel"] = kind.kernel
        if machine_type:
            body["machine_type"] = machine_type
        if lease:
            body["lease"] = lease
        try:
            result: dict[str, Any] = api.call("POST", "/runtimes", json=body)
            return result
        except CliError as exc:
            if exc.status != 409 or n > 100:
                raise
            taken.add(name)  # made meanwhile by someone else: take the next suffix


def _mime_bundle(data: dict[str, Any]) -> dict[str, Any]:
    """Data as nbformat v4 allows it: JSON types any value, every other type text."""
    bundle: dict[str, Any] = {}
    for mime, value in data.items():
        json_type = re.match(r"^application/(.*\+)?json$", mime) is not None
        if json_type or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            bundle[mime] = value
        else:
            bundle[mime] = value if isinstance(value, str) else json.dumps(value)
    return bundle


def notebook_outputs(execution: dict[str, Any]) -> list[Any]:
    """An execution's outputs (consecutive streams joined) as nbformat v4 outputs."""
    v4 = _nbformat().v4
    outputs = []
    for out in execution.get("outputs") or []:
        kind = out.get("output_type")
        if kind == "stream":
            name = out.get("name") if out.get("name") in ("stdout", "stderr") else "stdout"
            outputs.append(v4.new_output("stream", name=name, text=text(out.get("text", ""))))
        elif kind == "display_data":
            outputs.append(
                v4.new_output(
                    "display_data", data=_mime_bundle(out.get("data") or {}), metadata=out.get("metadata") or {}
                )
            )
        elif kind == "execute_result":
            count = out.get("execution_count") or execution.get("execution_count")
            outputs.append(
                v4.new_output(
                    "execute_result",
                    data=_mime_bundle(out.get("data") or {}),
                    metadata=out.get("metadata") or {},
                    execution_count=count,
                )
            )
        elif kind == "error":
            outputs.append(
                v4.new_output(
                    "error",
                    ename=str(out.get("ename", "Error")),
                    evalue=str(out.get("evalue", "")),
                    traceback=[str(line) for line in out.get("traceback") or []],
                )
            )
    return outputs


def _seconds(execution: dict[str, Any]) -> float:
    start, end = execution.get("started_at"), execution.get("finished_at")
    if not start or not end:
        return 0.0
    return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())


def _write_notebook(nb: Any, out: Path) -> None:
    """Validate, then write atomically (a crash never leaves half a notebook)."""
    nbformat = _nbformat()
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        raise CliError(f"the notebook would not be valid, so {out} was not written: {exc.message}") from exc
    tmp = out.with_name(f".{out.name}.envctl-{os.getpid()}.tmp")
    try:
        nbformat.write(nb, str(tmp))
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from exc


@dataclass
class _Plan:
    """What ``run`` was asked, checked before anything is sent to the API."""

    nb: Any
    out: Path
    environment: str | None  # None: run in the given runtime as it is
    language: str


def _prepare(
    path: Path, output: str | None, env: str | None, runtime: str | None, machine_type: str | None, setup: bool = False
) -> _Plan:
    out = Path(output) if output else path
    if runtime and (env or machine_type or setup):
        raise CliError(
            "--env, --machine-type, --type, --kernel and --lease set up the runtime that `run` creates; with --runtime "
            "the notebook runs in that runtime as it is",
            EXIT_BAD_INPUT,
        )
    if not out.parent.is_dir():
        raise CliError(f"{out}: the folder {out.parent} does not exist", EXIT_BAD_INPUT)
    nb = _read_notebook(path)
    meta = nb.metadata.get("envctl") or {}
    if not isinstance(meta, dict):
        raise CliError(
            f'{path}: metadata envctl must be an object such as {{"environment": "python3"}}', EXIT_BAD_INPUT
        )
    environment = env or meta.get("environment")
    if not runtime:
        if not environment:
            raise CliError(
                f"{path}: no environment to run it in; give one with --env (e.g. --env python3), set "
                'the notebook\'s metadata {"envctl": {"environment": "python3"}}, or use --runtime NAME',
                EXIT_BAD_INPUT,
            )
        if not isinstance(environment, str):
            raise CliError(f"{path}: metadata envctl.environment must be a reference such as python3@1", EXIT_BAD_INPUT)
    return _Plan(nb, out, None if runtime else str(environment), _notebook_language(nb))


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, file=sys.stderr, flush=True)


def _run_cells(
    api: Api, rt: dict[str, Any], plan: _Plan, *, timeout: float | None, allow_errors: bool, quiet: bool
) -> tuple[list[dict[str, Any]], int | None]:
    """Run the code cells in order, each one's outputs put in the notebook as it ends; the
    report of each cell and the number of the first that failed (None: all ok)."""
    cells = [(i, cell) for i, cell in enumerate(plan.nb.cells) if cell.cell_type == "code"]
    report: list[dict[str, Any]] = []
    failed_at: int | None = None
    for k, (index, cell) in enumerate(cells, 1):
        code = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        if not code.strip():
            cell.outputs, cell.execution_count = [], None
            report.append({"cell": k, "index": index, "status": "skipped", "execution_id": None})
            _say(quiet, f"[{k}/{len(cells)}] skipped (empty)")
            continue
        body: dict[str, Any] = {"code": code, "language": plan.language}
        if timeout is not None:
            body["timeout"] = timeout
        ex = api.call("POST", f"/runtimes/{rt['id']}/executions", json=body)
        await_execution(api, ex, rt, on_output=None, quiet=quiet)
        rt = {**rt, "state": "running", "busy": False}  # it ran a cell: no boot to show again
        done = api.call("GET", f"/executions/{ex['id']}")
        cell.outputs = notebook_outputs(done)
        cell.execution_count = done["execution_count"]
        status = done["status"]
        report.append(
            {
                "cell": k,
                "index": index,
                "status": status,
                "execution_id": done["id"],
                "execution_count": done["execution_count"],
                "seconds": round(_seconds(done), 3),
            }
        )
        line = f"[{k}/{len(cells)}] {status} {_seconds(done):.1f} s"
        if done.get("error_name"):
            first = (done.get("error_value") or "").strip().splitlines()[:1]
            line += f"  {done['error_name']}" + (f": {first[0][:200]}" if first else "")
        _say(quiet, line)
        if status != "ok" and failed_at is None:
            failed_at = k
        if status == "interrupted" or (status != "ok" and not allow_errors):
            break
    return report, failed_at


@click.command("run", cls=Command, short_help="Run a notebook's code cells and write their outputs into it.")
@click.argument("notebook", help="a Jupyter notebook (.ipynb)")
@click.option("--env", metavar="REF", help="environment reference, e.g. python3 or python3@1 (default: the notebook's)")
@click.option("--runtime", metavar="RUNTIME", help="run in this existing runtime (id or name); it is kept")
@click.option("--machine-type", metavar="NAME", help="machine type of the runtime run creates (default small)")
@click.option(
    "--type",
    "runtime_type",
    type=click.Choice(["auto", "native", "jupyter"]),
    default="auto",
    show_default=True,
    help="runtime type: auto takes jupyter when the environment has the notebook's kernelspec",
)
@click.option("--kernel", metavar="NAME", help="the kernelspec of a jupyter runtime (default: the notebook's)")
@click.option("--timeout", type=float, metavar="S", help="seconds each cell may run")
@click.option("-o", "--output", metavar="OUT.ipynb", help="write here instead of in place")
@click.option("--keep", is_flag=True, help="keep the runtime run created (its lease is dropped at the end)")
@click.option(
    "--lease",
    type=int,
    metavar="S",
    help=f"seconds the runtime run creates outlives this command if it is killed: renewed every third of it "
    f"while the cells run, else the server stops and deletes the runtime (default {DEFAULT_LEASE}; 0: no lease)",
)
@click.option("--allow-errors", is_flag=True, help="run the cells after a failing one too (the exit code is still 1)")
@client_options
def run(
    api: Api,
    as_json: bool,
    notebook: str,
    env: str | None,
    runtime: str | None,
    machine_type: str | None,
    runtime_type: str,
    kernel: str | None,
    timeout: float | None,
    output: str | None,
    keep: bool,
    lease: int | None,
    allow_errors: bool,
) -> int:
    """Run every code cell of NOTEBOOK in order in a new runtime of the notebook's environment
    (--env, else the notebook's metadata envctl.environment) or in --runtime, write the outputs and
    execution counts back (in place or to -o), record the exact environment version in the
    metadata, and delete the runtime it created (unless --keep). The runtime it creates holds a
    lease (--lease) renewed while it runs, so a killed `run` leaves nothing behind: the server
    deletes the runtime when the lease runs out, a cell running or not. Stops at the first failing
    cell unless --allow-errors. Exit 0 when every cell ran ok, 1 when one failed, 2 on bad input."""
    path = Path(notebook)
    setup = runtime_type != "auto" or kernel is not None or lease is not None
    plan = _prepare(path, output, env, runtime, machine_type, setup=setup)
    lease = DEFAULT_LEASE if lease is None else lease
    quiet = as_json
    if plan.environment is None:
        assert runtime is not None
        rt = api.runtime(runtime)
    else:
        kind = _choose_type(api, plan.nb, plan.environment, runtime_type, kernel)
        _say(quiet, f"runtime type: {kind.why}")
        rt = _create_notebook_runtime(api, path, plan.environment, plan.language, machine_type, kind, lease)
    heartbeat = Heartbeat(api, rt["id"], rt["name"], lease).start() if rt.get("lease") else None
    keep = keep or plan.environment is None  # a runtime run did not create is never deleted
    code_cells = sum(1 for cell in plan.nb.cells if cell.cell_type == "code")
    _say(quiet, f"{path.name}: {code_cells} code cells, {plan.language}, in runtime {rt['name']} ({rt['environment']})")
    try:
        report, failed_at = _run_cells(api, rt, plan, timeout=timeout, allow_errors=allow_errors, quiet=quiet)
        plan.nb.metadata.setdefault("envctl", {})["environment"] = rt["environment"]
        _write_notebook(plan.nb, plan.out)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if keep and heartbeat is not None and heartbeat.lost is None:
            try:  # kept: it no longer goes with this command
                api.call("PATCH", f"/runtimes/{rt['id']}", json={"lease": None})
            except CliError as exc:
                print(f"envctl: could not drop the lease of runtime {rt['name']}: {exc.message}", file=sys.stderr)
        if not keep:
            try:
                api.call("DELETE", f"/runtimes/{rt['id']}")
            except CliError as exc:
                print(f"envctl: could not delete runtime {rt['name']}: {exc.message}", file=sys.stderr)
    if as_json:
        print_json(
            {
                "notebook": str(plan.out),
                "status": "ok" if failed_at is None else "error",
                "failed_cell": failed_at,
                "environment": rt["environment"],
                "runtime": {
                    "id": rt["id"],
                    "name": rt["name"],
                    "type": rt.get("type"),
                    "kernel": rt.get("kernel"),
                    "deleted": not keep,
                    "lease": lease if heartbeat is not None else None,
                },
                "cells": report,
            }
        )
    else:
        ran = sum(1 for r in report if r["status"] == "ok")
        what = "all ok" if failed_at is None else f"code cell {failed_at} failed"
        where = f"runtime {rt['name']} kept" if keep else f"runtime {rt['name']} deleted"
        print(f"wrote {plan.out}: {ran} of {code_cells} code cells ok, {what}; {rt['environment']}; {where}")
    return EXIT_OK if failed_at is None else EXIT_FAILURE
