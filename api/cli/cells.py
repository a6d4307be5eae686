"""``envctl exec``: one cell, its outputs shown as they come; and how any command follows a
submitted execution to its end (the wait while the runtime boots, Ctrl-C to interrupt)."""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from api.cli.client import Api, ExecutionFollower, OutputHandler
from api.cli.errors import EXIT_FAILURE, EXIT_OK
from api.cli.options import Command, client_options
from api.cli.output import Progress, print_json, write_out

POLL_INTERVAL = 0.2
IMAGE_TYPES = (("image/png", "png"), ("image/jpeg", "jpg"))


def text(value: Any) -> str:
    """A MIME bundle entry as text (Jupyter allows a list of lines)."""
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


def write_stream(out: dict[str, Any]) -> None:
    """A ``stream`` output to stdout or stderr, as its name says."""
    stream = sys.stderr if out.get("name") == "stderr" else sys.stdout
    write_out(text(out.get("text", "")), stream)
    stream.flush()


def _wait_while_queued(api: Api, ex: dict[str, Any], rt: dict[str, Any], *, quiet: bool) -> None:
    """Progress on stderr while the execution waits: the runtime boots, or another cell runs."""
    booting = rt["state"] != "running"
    what = (
        f"booting runtime {rt['name']} ({rt['environment']})"
        if booting
        else f"waiting for the cell running in {rt['name']}"
    )
    start = time.monotonic()
    with Progress(quiet) as progress:
        if not progress.live:
            progress.line(f"{what} ...")
        while True:
            cur = api.call("GET", f"/executions/{ex['id']}")
            if cur["status"] != "queued":
                break
            if progress.live:
                state = api.call("GET", f"/runtimes/{rt['id']}")
                progress.update(f"{what} ... " + state["state"] + (f", {state['phase']}" if state.get("phase") else ""))
            time.sleep(POLL_INTERVAL)
    if not quiet and booting and cur["status"] != "error":
        print(f"runtime {rt['name']} is running ({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)


def await_execution(
    api: Api,
    ex: dict[str, Any],
    rt: dict[str, Any],
    *,
    on_output: OutputHandler | None,
    quiet: bool,
) -> dict[str, Any]:
    """Follow a submitted execution to its end; the final status event's data.

    Ctrl-C asks the API to interrupt the cell and goes on following until the final status;
    a second Ctrl-C stops following (``KeyboardInterrupt``; the cell was already told to stop).
    """
    follower = ExecutionFollower(api, ex["id"], on_output)
    must_wait = ex["status"] == "queued" and (rt["state"] != "running" or rt.get("busy", False))
    interrupted = False
    while True:
        try:
            if must_wait:
                _wait_while_queued(api, ex, rt, quiet=quiet)
                must_wait = False
            return follower.run()
        except KeyboardInterrupt:
            if interrupted:
                print(
                    f"\nenvctl: stopped following execution {ex['id']}; it was asked to stop",
                    file=sys.stderr,
                )
                raise
            interrupted = True
            must_wait = False
            print(
                f"\nenvctl: interrupting execution {ex['id']} ... (Ctrl-C again to stop waiting)",
                file=sys.stderr,
                flush=True,
            )
            api.call("POST", f"/executions/{ex['id']}/interrupt")


class OutputPrinter:
    """Shows outputs as they come: streams to stdout/stderr, results as text/plain, errors
    as their traceback on stderr, images saved as ``<execution id>-<n>.<ext>`` in a folder."""

    def __init__(self, execution_id: str, images_dir: Path) -> None:
        self.execution_id = execution_id
        self.images_dir = images_dir
        self.images: list[Path] = []

    def __call__(self, index: int, out: dict[str, Any]) -> None:
        kind = out.get("output_type")
        if kind == "stream":
            write_stream(out)
        elif kind in ("display_data", "execute_result"):
            data = out.get("data") or {}
            shown = False
            for mime, ext in IMAGE_TYPES:
                if mime in data:
                    path = self._save(mime, ext, data[mime])
                    if path is not None:
                        print(f"[{mime} saved to {path}]", flush=True)
                        shown = True
            if not shown:
                if "text/plain" in data:
                    print(text(data["text/plain"]), flush=True)
                elif data:
                    print(f"[{kind}: {', '.join(sorted(data))}]", flush=True)
        elif kind == "error":
            sys.stdout.flush()
            lines = [str(line) for line in out.get("traceback") or []]
            shown_text = "\n".join(lines) if lines else f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"
            print(shown_text, file=sys.stderr, flush=True)

    def _save(self, mime: str, ext: str, value: Any) -> Path | None:
        try:
            raw = base64.b64decode(text(value), validate=False)
        except (binascii.Error, ValueError) as exc:
            print(f"envctl: an {mime} output is not valid base64 ({exc}); not saved", file=sys.stderr)
            return None
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.images_dir / f"{self.execution_id}-{len(self.images) + 1}.{ext}"
        path.write_bytes(raw)
        self.images.append(path)
        return path


@click.command(
    "exec",
    cls=Command,
    short_help="Run code in a runtime, its outputs shown as they come.",
)
@click.argument("runtime", help="runtime id or name")
@click.argument("code", help="the code to run, or - to read it from stdin")
@click.option("--lang", metavar="python|bash", help="language of the code (default: the runtime's)")
@click.option("--timeout", type=float, metavar="S", help="seconds the cell may run")
@click.option(
    "--images-dir",
    default=".",
    metavar="DIR",
    help="where image outputs are saved, as <execution id>-<n>.png (default: the current folder)",
)
@client_options
def exec_(
    api: Api, as_json: bool, runtime: str, code: str, lang: str | None, timeout: float | None, images_dir: str
) -> int:
    """Run CODE in RUNTIME (booting it first when it is stopped) and show the outputs live:
    streams on stdout/stderr, results as text, errors as their traceback on stderr, images saved
    as files. Ctrl-C interrupts the cell; a second Ctrl-C stops waiting. Exit 0 when the cell
    succeeded, 1 when it failed or was interrupted, 2 on bad input."""
    source = sys.stdin.read() if code == "-" else code
    rt = api.runtime(runtime)
    body: dict[str, Any] = {"code": source}
    if lang is not None:
        body["language"] = lang
    if timeout is not None:
        body["timeout"] = timeout
    ex = api.call("POST", f"/runtimes/{rt['id']}/executions", json=body)
    printer = None if as_json else OutputPrinter(ex["id"], Path(images_dir))
    final = await_execution(api, ex, rt, on_output=printer, quiet=as_json)
    if as_json:
        print_json(api.call("GET", f"/executions/{ex['id']}"))
    elif final.get("status") == "interrupted":
        print(f"envctl: execution {ex['id']} was interrupted", file=sys.stderr)
    return EXIT_OK if final.get("status") == "ok" else EXIT_FAILURE
