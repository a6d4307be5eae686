"""``envctl env build FILE``: a version from a spec file, each step's output shown as it runs."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from api.cli.cells import POLL_INTERVAL, text, write_stream
from api.cli.client import Api, ExecutionFollower
from api.cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, CliError
from api.cli.operations import OPERATION_WAIT, op_text, stopped_following
from api.cli.options import Command, client_options
from api.cli.output import Progress, print_json, short_digest


def _read_input_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CliError(f"{path}: no such file", EXIT_BAD_INPUT) from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", EXIT_BAD_INPUT) from exc
    except OSError as exc:
        raise CliError(f"{path}: cannot read it: {exc.strerror or exc}", EXIT_BAD_INPUT) from exc


def _spec_steps(spec: str) -> int | None:
    """How many steps the spec has (the server accepted it, so it parses); None if unsure."""
    try:
        data = yaml.safe_load(spec)
    except yaml.YAMLError:
        return None
    steps = data.get("steps") if isinstance(data, dict) else None
    return len(steps) if isinstance(steps, list) else None


class _BuildLog:
    """Shows a build's steps as they appear in its operation, each with its cell's output live."""

    def __init__(self, api: Api, total: int | None, progress: Progress) -> None:
        self.api = api
        self.total = total
        self.progress = progress
        self.shown = 0

    def show_new_steps(self, op: dict[str, Any]) -> dict[str, Any]:
        """Show the steps of ``op`` not shown yet; the newest operation seen."""
        steps = list(op.get("result", {}).get("steps") or [])
        while self.shown < len(steps):
            step = steps[self.shown]
            self.shown += 1
            self.progress.clear()
            total = self.total or "?"
            print(f"[{step.get('step', self.shown)}/{total}] {step.get('kind')} (line {step.get('line')})", flush=True)
            if step.get("execution_id"):
                # Even a finished step is read from its execution while it exists: its stdout
                # and stderr stay apart there (the operation's log has them joined).
                op = self._stream(op, step)
        return op

    def _stream(self, op: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
        try:
            ExecutionFollower(self.api, str(step["execution_id"]), self._on_output).run()
            return op
        except CliError as exc:
            if exc.status != 404:
                raise
        # The build runtime and its cells are gone (the build ended): the log is in the operation.
        op = self.api.call("GET", f"/operations/{op['id']}", params={"wait": OPERATION_WAIT})
        while op["status"] == "running":
            op = self.api.call("GET", f"/operations/{op['id']}", params={"wait": OPERATION_WAIT})
        done = next((s for s in op["result"].get("steps") or [] if s.get("step") == step.get("step")), step)
        log = str(done.get("log") or "")
        if log:
            sys.stdout.write(log if log.endswith("\n") else log + "\n")
            sys.stdout.flush()
        return op

    @staticmethod
    def _on_output(_index: int, out: dict[str, Any]) -> None:
        kind = out.get("output_type")
        if kind == "stream":
            write_stream(out)
        elif kind == "error":
            sys.stdout.flush()
            print(f"{out.get('ename', 'Error')}: {out.get('evalue', '')}", file=sys.stderr, flush=True)
        elif kind in ("display_data", "execute_result"):
            data = out.get("data") or {}
            if "text/plain" in data:
                print(text(data["text/plain"]), flush=True)


def _follow_build(api: Api, op: dict[str, Any], spec: str, *, quiet: bool) -> dict[str, Any]:
    """Follow the build to its end: each step and its output as it runs, on a terminal the
    phase between steps (queued, booting, saving) with a spinner."""
    with Progress(quiet) as progress:
        log = _BuildLog(api, _spec_steps(spec), progress)
        wait = 0.0 if not quiet else OPERATION_WAIT  # followed live: look often for the next step
        try:
            while True:
                if not quiet:
                    op = log.show_new_steps(op)
                if op["status"] != "running":
                    return op
                if op.get("phase") != "running":  # between steps: queued, booting, saving
                    progress.update(op_text(op))
                op = api.call("GET", f"/operations/{op['id']}", params={"wait": wait})
                if not quiet and wait == 0.0 and op["status"] == "running":
                    time.sleep(POLL_INTERVAL)
        except KeyboardInterrupt:
            progress.clear()
            stopped_following(op, "build")
            raise


@click.command("build", cls=Command, short_help="Build a version from a spec file, its log shown live.")
@click.argument("file", help="the spec file")
@client_options
def build(api: Api, as_json: bool, file: str) -> int:
    """Build the spec FILE (YAML: name, extends, message, steps of apt, pip, env, run, files):
    a runtime boots from the parent, runs each step as a cell and is saved. The same spec on the same
    parent reuses the version built before. A bad spec is reported as FILE:LINE: FIELD: PROBLEM.
    Exit 0 when built or reused, 1 when a step or the build failed, 2 on a bad spec."""
    path = Path(file)
    spec = _read_input_text(path)
    try:
        op = api.call("POST", "/environments/build", json={"spec": spec, "source": path.name})
    except CliError as exc:
        # The spec's problems come as `file:line: field: problem`: shown as they are, for editors.
        # A parent that does not exist (404) is a problem of the spec too.
        if exc.status in (400, 404, 422) and exc.server_message:
            print(exc.server_message, file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    op = _follow_build(api, op, spec, quiet=as_json)
    if as_json:
        print_json(op)
    if op["status"] != "succeeded":
        error = op.get("error") or {}
        print(error.get("message") or op.get("message") or "the build failed", file=sys.stderr)
        return EXIT_FAILURE
    if not as_json:
        result = op["result"]
        if result.get("cached"):
            print(f"reused {result['version']} (same spec on the same parent)")
        else:
            digest = f" (digest {short_digest(result['digest'])})" if result.get("digest") else ""
            print(f"built {result['version']}{digest}")
    return EXIT_OK
