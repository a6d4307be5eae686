"""The ``envctl`` command line.

Everything but ``serve``, ``db`` and ``base build`` is a client of the REST API: the URL comes
from ``--url``, ``ENVCTL_URL`` or the config file (``~/.config/envctl/config.yaml``: ``url``,
``token``), the token from ``--token``, ``ENVCTL_TOKEN``, the config file, or the file
``envctl serve`` wrote in its data directory.

Tables for people, ``--json`` for scripts. Exit codes: 0 success, 1 failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import quote

import httpx
import yaml

from envs.kit.config import SETTINGS_HELP, load_settings
from envs.kit.errors import EnvctlError, InvalidInputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_URL = "http://127.0.0.1:8700"


class CliError(Exception):
    def __init__(
        self,
        message: str,
        exit_code: int = EXIT_FAILURE,
        status: int | None = None,
        *,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status  # the HTTP status when the API refused
        self.server_message = server_message  # the API's own message, without decoration


# ---------------------------------------------------------------------------- client


def _config_file() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "envctl" / "config.yaml"


def _client_config() -> dict[str, Any]:
    path = _config_file()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML: {exc}", EXIT_BAD_INPUT) from exc
    return data if isinstance(data, dict) else {}


def _find_token(args: argparse.Namespace, conf: dict[str, Any]) -> str | None:
    if args.token:
        return str(args.token)
    if os.environ.get("ENVCTL_TOKEN"):
        return os.environ["ENVCTL_TOKEN"]
    if conf.get("token"):
        return str(conf["token"])
    try:
        token_file = load_settings().admin_token_file
    except EnvctlError:
        return None
    if token_file.is_file():
        return token_file.read_text().strip() or None
    return None


class Api:
    """A thin HTTP client that turns error envelopes into ``CliError``."""

    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def unreachable(self, exc: Exception) -> CliError:
        return CliError(
            f"cannot reach envctl at {self.url} ({exc.__class__.__name__}); is `envctl serve` "
            "(or `make run`) running? Set --url or ENVCTL_URL to another server."
        )

    @staticmethod
    def raise_for(resp: httpx.Response) -> None:
        """Turn an error answer (a read response) into a ``CliError``: 400/422 exit 2, else 1."""
        if resp.status_code < 400:
            return
        try:
            err = resp.json()["error"]
            message = err["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:500] or resp.reason_phrase
        code = EXIT_BAD_INPUT if resp.status_code in (400, 422) else EXIT_FAILURE
        raise CliError(f"{message} (HTTP {resp.status_code})", code, resp.status_code, server_message=message)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        self.raise_for(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()


def _api(args: argparse.Namespace) -> Api:
    conf = _client_config()
    url = args.url or os.environ.get("ENVCTL_URL") or conf.get("url") or DEFAULT_URL
    return Api(str(url), _find_token(args, conf))


# ---------------------------------------------------------------------------- output


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(r.get(key, "") if r.get(key) is not None else "-") for key, _ in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    print("  ".join(title.upper().ljust(w) for (_, title), w in zip(columns, widths, strict=True)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())


def _when(value: str | None) -> str:
    if not value:
        return "-"
    return value.replace("T", " ")[:19]


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


_COLORS = {"gray": "90", "yellow": "33", "green": "32", "red": "31"}


def _state(rt: dict[str, Any]) -> str:
    text = str(rt["state"])
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[{_COLORS.get(rt.get('state_color', ''), '0')}m{text}\033[0m"
    return text


def _show_runtime(rt: dict[str, Any]) -> None:
    lines = [
        ("id", rt["id"]),
        ("name", rt["name"]),
        (
            "state",
            f"{_state(rt)} ({rt['state_reason']})" + (f": {rt['state_message']}" if rt["state_message"] else ""),
        ),
        ("environment", f"{rt['environment']}  (asked for {rt['environment_ref']})"),
        ("type", rt.get("type", "native") + (f" (kernel {rt['kernel']})" if rt.get("kernel") else "")),
        ("language", rt["language"]),
        ("machine type", rt["machine_type"]),
        ("busy", "yes" if rt["busy"] else "no"),
    ]
    if rt.get("idle"):
        idle = rt["idle"]
        lines.append(("idle shutdown", f"{_when(idle['shutdown_at'])} UTC  ({idle['reason']})"))
    elif rt["state"] == "running":
        lines.append(("idle shutdown", "not planned"))
    lines.append(("booted", _when(rt.get("booted_at"))))
    lines.append(("created", _when(rt["created_at"])))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


# ---------------------------------------------------------------------------- runtime commands


def _resolve_runtime(api: Api, ident: str) -> dict[str, Any]:
    """A runtime by id or by name."""
    if ident.startswith("rt_"):
        result: dict[str, Any] = api.call("GET", f"/runtimes/{ident}")
        return result
    for rt in api.call("GET", "/runtimes"):
        if rt["name"] == ident:
            return dict(rt)
    raise CliError(f"no runtime named or with id {ident!r}; `envctl runtime ls` lists yours")


def _follow(
    api: Api, rt: dict[str, Any], until: set[str], *, quiet: bool, timeout: float = 300, since: int = 0
) -> dict[str, Any]:
    """Show the runtime's progress until it reaches one of ``until`` (or error); the log
    entries from index ``since`` on are shown."""
    start = time.monotonic()
    seen = since
    spinner = "|/-\\"
    tty = sys.stderr.isatty() and not quiet
    i = 0
    while True:
        entries = api.call("GET", f"/runtimes/{rt['id']}/log")
        for e in entries[seen:]:
            if not quiet:
                what = e["state"] or e["event"]
                if tty:
                    sys.stderr.write("\r\033[K")
                sys.stderr.write(f"  {_when(e['at'])[11:]}  {what:<18} {e['message']}\n")
        seen = len(entries)
        rt = api.call("GET", f"/runtimes/{rt['id']}")
        if rt["state"] in until or rt["state"] == "error":
            if tty:
                sys.stderr.write("\r\033[K")
            return rt
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise CliError(f"runtime {rt['name']} is still {rt['state']} after {timeout:.0f} s")
        if tty:
            sys.stderr.write(f"\r{spinner[i % 4]} {rt['state']} {elapsed:5.1f} s")
            sys.stderr.flush()
        i += 1
        time.sleep(0.1)


def cmd_runtime_create(args: argparse.Namespace) -> int:
    api = _api(args)
    body: dict[str, Any] = {
        "name": args.name,
        "environment": args.env,
        "language": args.lang,
        "machine_type": args.machine_type,
    }
    if args.idle_timeout is not None:
        body["idle_timeout"] = args.idle_timeout
    if args.type is not None:
        body["type"] = args.type
    if args.kernel is not None:
        body["kernel"] = args.kernel
    rt = api.call("POST", "/runtimes", json=body)
    if args.start:
        rt = api.call("POST", f"/runtimes/{rt['id']}/start")
        rt = _follow(api, rt, {"running"}, quiet=args.json)
    if args.json:
        _print_json(rt)
    else:
        _show_runtime(rt)
    return EXIT_FAILURE if rt["state"] == "error" else EXIT_OK


def cmd_runtime_ls(args: argparse.Namespace) -> int:
    rts = _api(args).call("GET", "/runtimes")
    if args.json:
        _print_json(rts)
        return EXIT_OK
    rows = [
        {
            **rt,
            "state_text": rt["state"] + (" (busy)" if rt["busy"] else ""),
            "shutdown": _when(rt["idle_shutdown_at"]),
        }
        for rt in rts
    ]
    _table(
        rows,
        [
            ("id", "id"),
            ("name", "name"),
            ("state_text", "state"),
            ("environment", "environment"),
            ("machine_type", "machine"),
            ("shutdown", "idle shutdown (UTC)"),
        ],
    )
    return EXIT_OK


def cmd_runtime_show(args: argparse.Namespace) -> int:
    rt = _resolve_runtime(_api(args), args.runtime)
    _print_json(rt) if args.json else _show_runtime(rt)
    return EXIT_OK


def _runtime_action(args: argparse.Namespace, action: str, until: str) -> int:
    """POST /runtimes/{id}/<action>, then show its progress (only its own log lines)."""
    api = _api(args)
    rt = _resolve_runtime(api, args.runtime)
    seen = len(api.call("GET", f"/runtimes/{rt['id']}/log"))
    rt = api.call("POST", f"/runtimes/{rt['id']}/{action}")
    if not args.no_wait:
        rt = _follow(api, rt, {until}, quiet=args.json, since=seen)
    _print_json(rt) if args.json else _show_runtime(rt)
    return EXIT_FAILURE if rt["state"] == "error" else EXIT_OK


def cmd_runtime_start(args: argparse.Namespace) -> int:
    return _runtime_action(args, "start", "running")


def cmd_runtime_stop(args: argparse.Namespace) -> int:
    return _runtime_action(args, "stop", "stopped")


def cmd_runtime_rm(args: argparse.Namespace) -> int:
    api = _api(args)
    rt = _resolve_runtime(api, args.runtime)
    api.call("DELETE", f"/runtimes/{rt['id']}")
    if args.json:
        _print_json({"deleted": rt["id"]})
    else:
        print(f"deleted runtime {rt['name']} ({rt['id']})")
    return EXIT_OK


def cmd_runtime_log(args: argparse.Namespace) -> int:
    api = _api(args)
    rt = _resolve_runtime(api, args.runtime)
    entries = api.call("GET", f"/runtimes/{rt['id']}/log")
    if args.json:
        _print_json(entries)
        return EXIT_OK
    rows = [{**e, "at": _when(e["at"]), "what": e["state"] or f"[{e['event']}]"} for e in entries]
    _table(
        rows,
        [("at", "at (UTC)"), ("what", "state/event"), ("reason", "reason"), ("message", "message")],
    )
    return EXIT_OK


def cmd_env_ls(args: argparse.Namespace) -> int:
    envs = _api(args).call("GET", "/environments")
    if args.json:
        _print_json(envs)
        return EXIT_OK
    rows = []
    for e in envs:
        latest = next((v for v in e["versions"] if v["ref"] == e["latest"]), None)
        rows.append(
            {
                "name": e["name"],
                "owner": e.get("owner") or "(admins)",
                "latest": e["latest"] or "-",
                "versions": len(e["versions"]),
                "parent": (latest or {}).get("parent") or "-",
                "size": _human_bytes(latest["size"]) if latest else "-",
                "tags": ", ".join(sorted(e["tags"])),
            }
        )
    _table(
        rows,
        [
            ("name", "environment"),
            ("owner", "owner"),
            ("latest", "latest"),
            ("versions", "versions"),
            ("parent", "parent"),
            ("size", "size"),
            ("tags", "tags"),
        ],
    )
    return EXIT_OK


def cmd_machine_types(args: argparse.Namespace) -> int:
    types = _api(args).call("GET", "/machine-types")
    if args.json:
        _print_json(types)
        return EXIT_OK
    rows = [{**m, "memory": _human_bytes(m["memory"])} for m in types]
    _table(
        rows,
        [
            ("name", "name"),
            ("cpus", "cpus"),
            ("memory", "memory"),
            ("pids", "pids"),
            ("gpus", "gpus"),
            ("description", "description"),
        ],
    )
    return EXIT_OK


# ---------------------------------------------------------------------------- executions

# Keep-alives come every 15 s; a read that waits much longer means the connection is dead.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=45.0)
RECONNECT_FOR = 60.0  # seconds of failed reconnects before giving up on following
POLL_INTERVAL = 0.2
IMAGE_TYPES = (("image/png", "png"), ("image/jpeg", "jpg"))

OutputHandler = Callable[[int, dict[str, Any]], None]


@dataclass
class SseEvent:
    event: str
    data: str
    id: str | None


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Server-sent events from the lines of a stream (``event:``, ``data:``, ``id:``; ``:``
    starts a comment; a blank line ends an event)."""
    event, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield SseEvent(event, "\n".join(data), event_id)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


class _StreamEnded(Exception):
    """The event stream closed before the execution's final status came."""


class ExecutionFollower:
    """Follows one execution's ``/events`` to its final status. A dropped connection is
    opened again with ``Last-Event-ID``, so every output is handled once and in order."""

    def __init__(self, api: Api, execution_id: str, on_output: OutputHandler | None = None) -> None:
        self.api = api
        self.execution_id = execution_id
        self.on_output = on_output
        self.last_id: str | None = None
        self.final: dict[str, Any] | None = None
        self.reconnects = 0
        self._lost_at: float | None = None

    def run(self) -> dict[str, Any]:
        """The final ``status`` event's data: ``status``, ``execution_count``, ``truncated``."""
        delay = 0.1
        while self.final is None:
            try:
                self._stream()
                if self.final is None:
                    raise _StreamEnded("the event stream ended before the execution did")
            except (httpx.TransportError, _StreamEnded) as exc:
                now = time.monotonic()
                if self._lost_at is None:
                    self._lost_at, delay = now, 0.1
                    print(
                        f"envctl: lost the event stream of {self.execution_id} ({exc.__class__.__name__}); "
                        "reconnecting ...",
                        file=sys.stderr,
                    )
                elif now - self._lost_at > RECONNECT_FOR:
                    raise CliError(
                        f"lost the connection to envctl at {self.api.url} while following execution "
                        f"{self.execution_id} and could not reconnect for {RECONNECT_FOR:.0f} s; the cell keeps "
                        f"running in its runtime (GET /executions/{self.execution_id} shows it)"
                    ) from exc
                self.reconnects += 1
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        return self.final

    def _stream(self) -> None:
        headers = {"Last-Event-ID": self.last_id} if self.last_id is not None else {}
        path = f"/executions/{self.execution_id}/events"
        with self.api.http.stream("GET", path, headers=headers, timeout=STREAM_TIMEOUT) as resp:
            if resp.status_code >= 400:
                resp.read()
                self.api.raise_for(resp)
            self._lost_at = None
            for ev in parse_sse(resp.iter_lines()):
                if ev.event == "output":
                    index = int(ev.id) if ev.id and ev.id.isdigit() else -1
                    if self.on_output is not None:
                        self.on_output(index, json.loads(ev.data))
                    if ev.id is not None:
                        self.last_id = ev.id
                elif ev.event == "status":
                    self.final = dict(json.loads(ev.data))
                    return


def _wait_while_queued(api: Api, ex: dict[str, Any], rt: dict[str, Any], *, quiet: bool) -> None:
    """Progress on stderr while the execution waits: the runtime boots, or another cell runs."""
    booting = rt["state"] != "running"
    what = (
        f"booting runtime {rt['name']} ({rt['environment']})"
        if booting
        else f"waiting for the cell running in {rt['name']}"
    )
    tty = sys.stderr.isatty() and not quiet
    if not quiet and not tty:
        print(f"{what} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    spinner = "|/-\\"
    i = 0
    while True:
        cur = api.call("GET", f"/executions/{ex['id']}")
        if cur["status"] != "queued":
            break
        if tty:
            state = api.call("GET", f"/runtimes/{rt['id']}")
            detail = state["state"] + (f", {state['phase']}" if state.get("phase") else "")
            sys.stderr.write(f"\r\033[K{spinner[i % 4]} {what} ... {detail} {time.monotonic() - start:5.1f} s")
            sys.stderr.flush()
        i += 1
        time.sleep(POLL_INTERVAL)
    elapsed = time.monotonic() - start
    if tty:
        sys.stderr.write("\r\033[K")
    if not quiet and booting and cur["status"] != "error":
        print(f"runtime {rt['name']} is running ({elapsed:.1f} s)", file=sys.stderr, flush=True)


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
            if sys.stderr.isatty():
                sys.stderr.write("\r\033[K")
            print(
                f"\nenvctl: interrupting execution {ex['id']} ... (Ctrl-C again to stop waiting)",
                file=sys.stderr,
                flush=True,
            )
            api.call("POST", f"/executions/{ex['id']}/interrupt")


def _text(value: Any) -> str:
    """A MIME bundle entry as text (Jupyter allows a list of lines)."""
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


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
            stream = sys.stderr if out.get("name") == "stderr" else sys.stdout
            stream.write(_text(out.get("text", "")))
            stream.flush()
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
                    print(_text(data["text/plain"]), flush=True)
                elif data:
                    print(f"[{kind}: {', '.join(sorted(data))}]", flush=True)
        elif kind == "error":
            sys.stdout.flush()
            lines = [str(line) for line in out.get("traceback") or []]
            text = "\n".join(lines) if lines else f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"
            print(text, file=sys.stderr, flush=True)

    def _save(self, mime: str, ext: str, value: Any) -> Path | None:
        try:
            raw = base64.b64decode(_text(value), validate=False)
        except (binascii.Error, ValueError) as exc:
            print(f"envctl: an {mime} output is not valid base64 ({exc}); not saved", file=sys.stderr)
            return None
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.images_dir / f"{self.execution_id}-{len(self.images) + 1}.{ext}"
        path.write_bytes(raw)
        self.images.append(path)
        return path


def cmd_exec(args: argparse.Namespace) -> int:
    api = _api(args)
    code = sys.stdin.read() if args.code == "-" else args.code
    rt = _resolve_runtime(api, args.runtime)
    body: dict[str, Any] = {"code": code}
    if args.lang is not None:
        body["language"] = args.lang
    if args.timeout is not None:
        body["timeout"] = args.timeout
    ex = api.call("POST", f"/runtimes/{rt['id']}/executions", json=body)
    printer = None if args.json else OutputPrinter(ex["id"], Path(args.images_dir))
    final = await_execution(api, ex, rt, on_output=printer, quiet=args.json)
    if args.json:
        _print_json(api.call("GET", f"/executions/{ex['id']}"))
    elif final.get("status") == "interrupted":
        print(f"envctl: execution {ex['id']} was interrupted", file=sys.stderr)
    return EXIT_OK if final.get("status") == "ok" else EXIT_FAILURE


# ---------------------------------------------------------------------------- notebooks


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


def _create_notebook_runtime(
    api: Api, path: Path, environment: str, language: str, machine_type: str | None
) -> dict[str, Any]:
    base = runtime_name_for(path)
    taken = {rt["name"] for rt in api.call("GET", "/runtimes")}
    n = 1
    while True:
        name = base if n == 1 else f"{base}-{n}"
        n += 1
        if name in taken:
            continue
        body: dict[str, Any] = {"name": name, "environment": environment, "language": language}
        if machine_type:
            body["machine_type"] = machine_type
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
            outputs.append(v4.new_output("stream", name=name, text=_text(out.get("text", ""))))
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


def cmd_run(args: argparse.Namespace) -> int:
    """Run a notebook's code cells in order in a runtime and write their outputs back."""
    path = Path(args.notebook)
    out = Path(args.output) if args.output else path
    if args.runtime and (args.env or args.machine_type):
        raise CliError(
            "--env and --machine-type set up the runtime that `run` creates; with --runtime the notebook "
            "runs in that runtime as it is",
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
    environment = args.env or meta.get("environment")
    if not args.runtime:
        if not environment:
            raise CliError(
                f"{path}: no environment to run it in; give one with --env (e.g. --env python3), set "
                'the notebook\'s metadata {"envctl": {"environment": "python3"}}, or use --runtime NAME',
                EXIT_BAD_INPUT,
            )
        if not isinstance(environment, str):
            raise CliError(f"{path}: metadata envctl.environment must be a reference such as python3@1", EXIT_BAD_INPUT)
    language = _notebook_language(nb)
    cells = [(i, cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    quiet = args.json

    api = _api(args)
    if args.runtime:
        rt = _resolve_runtime(api, args.runtime)
        owned = False
    else:
        rt = _create_notebook_runtime(api, path, str(environment), language, args.machine_type)
        owned = True
    keep = args.keep or not owned
    if not quiet:
        print(
            f"{path.name}: {len(cells)} code cells, {language}, in runtime {rt['name']} ({rt['environment']})",
            file=sys.stderr,
            flush=True,
        )
    report: list[dict[str, Any]] = []
    failed_at: int | None = None
    try:
        for k, (index, cell) in enumerate(cells, 1):
            code = cell.source if isinstance(cell.source, str) else "".join(cell.source)
            if not code.strip():
                cell.outputs, cell.execution_count = [], None
                report.append({"cell": k, "index": index, "status": "skipped", "execution_id": None})
                if not quiet:
                    print(f"[{k}/{len(cells)}] skipped (empty)", file=sys.stderr, flush=True)
                continue
            body: dict[str, Any] = {"code": code, "language": language}
            if args.timeout is not None:
                body["timeout"] = args.timeout
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
            if not quiet:
                line = f"[{k}/{len(cells)}] {status} {_seconds(done):.1f} s"
                if done.get("error_name"):
                    first = (done.get("error_value") or "").strip().splitlines()[:1]
                    line += f"  {done['error_name']}" + (f": {first[0][:200]}" if first else "")
                print(line, file=sys.stderr, flush=True)
            if status != "ok" and failed_at is None:
                failed_at = k
            if status == "interrupted" or (status != "ok" and not args.allow_errors):
                break
        nb.metadata.setdefault("envctl", {})["environment"] = rt["environment"]
        _write_notebook(nb, out)
    finally:
        if not keep:
            try:
                api.call("DELETE", f"/runtimes/{rt['id']}")
            except CliError as exc:
                print(f"envctl: could not delete runtime {rt['name']}: {exc.message}", file=sys.stderr)
    summary = {
        "notebook": str(out),
        "status": "ok" if failed_at is None else "error",
        "failed_cell": failed_at,
        "environment": rt["environment"],
        "runtime": {"id": rt["id"], "name": rt["name"], "deleted": not keep},
        "cells": report,
    }
    if args.json:
        _print_json(summary)
    else:
        ran = sum(1 for r in report if r["status"] == "ok")
        what = "all ok" if failed_at is None else f"code cell {failed_at} failed"
        where = f"runtime {rt['name']} kept" if keep else f"runtime {rt['name']} deleted"
        print(f"wrote {out}: {ran} of {len(cells)} code cells ok, {what}; {rt['environment']}; {where}")
    return EXIT_OK if failed_at is None else EXIT_FAILURE


# ---------------------------------------------------------------------------- results


def cmd_results_ls(args: argparse.Namespace) -> int:
    api = _api(args)
    if args.runtime:
        # Results outlive their runtime: an rt_ id is listed even after the runtime is gone.
        rid = args.runtime if args.runtime.startswith("rt_") else _resolve_runtime(api, args.runtime)["id"]
        rows = api.call("GET", f"/runtimes/{rid}/results")
    else:
        rows = api.call("GET", "/results")
    if args.json:
        _print_json(rows)
        return EXIT_OK
    _table(
        [
            {
                **r,
                "size_text": _human_bytes(r["size"]),
                "sha": r["sha256"][:12],
                "created": _when(r["created_at"]),
            }
            for r in rows
        ],
        [
            ("id", "id"),
            ("path", "path"),
            ("size_text", "size"),
            ("sha", "sha256"),
            ("execution_id", "execution"),
            ("created", "created (UTC)"),
        ],
    )
    return EXIT_OK


def cmd_results_get(args: argparse.Namespace) -> int:
    api = _api(args)
    meta = api.call("GET", f"/results/{args.result_id}")
    to_stdout = args.output == "-"
    dest = Path(args.output) if args.output else Path(meta["path"].rsplit("/", 1)[-1])
    if not args.output and dest.exists():
        raise CliError(f"{dest} exists; choose where to write with -o FILE (-o - for stdout)")
    tmp = dest.with_name(f".{dest.name}.envctl-{os.getpid()}.tmp")
    digest = hashlib.sha256()
    done = 0
    tty = sys.stderr.isatty() and not args.json and not to_stdout
    try:
        with api.http.stream("GET", f"/results/{args.result_id}/content", timeout=STREAM_TIMEOUT) as resp:
            if resp.status_code >= 400:
                resp.read()
                api.raise_for(resp)
            with contextlib.ExitStack() as stack:
                sink: IO[bytes] = sys.stdout.buffer if to_stdout else stack.enter_context(open(tmp, "wb"))
                for chunk in resp.iter_bytes(1024 * 1024):
                    sink.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if tty:
                        sys.stderr.write(f"\r\033[K{_human_bytes(done)} of {_human_bytes(meta['size'])}")
                        sys.stderr.flush()
                sink.flush()
    except httpx.TransportError as exc:
        tmp.unlink(missing_ok=True)
        raise api.unreachable(exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if tty:
        sys.stderr.write("\r\033[K")
    if digest.hexdigest() != meta["sha256"]:
        tmp.unlink(missing_ok=True)
        raise CliError(
            f"result {meta['id']} arrived damaged (sha256 {digest.hexdigest()[:12]}, expected "
            f"{meta['sha256'][:12]}); nothing was written"
        )
    if to_stdout:
        return EXIT_OK
    os.replace(tmp, dest)
    if args.json:
        _print_json({**meta, "saved_to": str(dest)})
    else:
        print(f"wrote {dest} ({_human_bytes(meta['size'])}, sha256 {meta['sha256'][:12]}) from {meta['path']}")
    return EXIT_OK


# ---------------------------------------------------------------------------- environments

# Exporting answers once the whole archive is written, loading once it is loaded: both can take
# minutes for big images, so their reads wait much longer than other calls.
ARCHIVE_TIMEOUT = httpx.Timeout(30.0, read=3600.0)
OPERATION_WAIT = 2.0  # seconds one GET /operations/{id}?wait= may hold
CHUNK = 1024 * 1024


def _ref_path(ref: str) -> str:
    """A reference as a URL path segment: ``/`` ``@`` ``:`` stay, anything else is quoted."""
    return quote(ref, safe="/@:")


def _short_digest(digest: str | None) -> str:
    return (digest or "-")[:19]


def _first_line(text: str | None, width: int = 60) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


class _Progress:
    """A live status line on stderr: rewritten in place (with a spinner) on a terminal, one line
    per change otherwise; nothing when quiet."""

    SPINNER = "|/-\\"

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty() and not quiet
        self.start = time.monotonic()
        self.last: str | None = None
        self.ticks = 0
        self.shown = False

    def update(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            elapsed = time.monotonic() - self.start
            sys.stderr.write(f"\r\033[K{self.SPINNER[self.ticks % 4]} {text}  {elapsed:5.1f} s")
            sys.stderr.flush()
            self.ticks += 1
            self.shown = True
        elif text != self.last:
            print(f"  {text}", file=sys.stderr, flush=True)
        self.last = text

    def clear(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def _op_text(op: dict[str, Any]) -> str:
    return f"{op['phase']}: {op['message']}" if op.get("message") else str(op["phase"])


def _follow_operation(api: Api, op: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    """Poll an operation until it succeeds or fails, showing its phase and message."""
    progress = _Progress(quiet)
    # On a terminal shorter waits keep the spinner and the clock moving.
    wait = 0.5 if progress.tty else OPERATION_WAIT
    try:
        while op["status"] == "running":
            progress.update(_op_text(op))
            op = api.call("GET", f"/operations/{op['id']}", params={"wait": wait})
    except KeyboardInterrupt:
        progress.clear()
        print(
            f"\nenvctl: stopped following operation {op['id']}; it goes on (GET /operations/{op['id']} shows it)",
            file=sys.stderr,
        )
        raise
    progress.clear()
    return op


def _op_failure(op: dict[str, Any], what: str) -> str:
    error = op.get("error") or {}
    return f"{what} failed: {error.get('message') or op.get('message') or 'no reason given'}"


def cmd_save(args: argparse.Namespace) -> int:
    api = _api(args)
    rt = _resolve_runtime(api, args.runtime)
    body: dict[str, Any] = {"environment": args.environment, "message": args.message}
    if args.tag is not None:
        body["tag"] = args.tag
    op = api.call("POST", f"/runtimes/{rt['id']}/save", json=body)
    op = _follow_operation(api, op, quiet=args.json)
    if args.json:
        _print_json(op)
    if op["status"] != "succeeded":
        print("envctl: " + _op_failure(op, f"saving {rt['name']}"), file=sys.stderr)
        return EXIT_FAILURE
    if not args.json:
        result = op["result"]
        tagged = f", tagged {args.tag}" if args.tag else ""
        print(f"saved as {result['version']} (digest {_short_digest(result.get('digest'))}{tagged})")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    api = _api(args)
    rt = _resolve_runtime(api, args.runtime)
    new = api.call("PATCH", f"/runtimes/{rt['id']}", json={"environment": args.ref})
    if args.json:
        _print_json(new)
    else:
        print(f"{new['name']} now uses {new['environment']} (asked for {new['environment_ref']})")
        if new["environment"] != rt["environment"]:
            print(f"  was {rt['environment']}; the next start boots the new version", file=sys.stderr)
    return EXIT_OK


def cmd_runtime_reset(args: argparse.Namespace) -> int:
    return _runtime_action(args, "reset", "running")


def cmd_runtime_changes(args: argparse.Namespace) -> int:
    api = _api(args)
    rt = _resolve_runtime(api, args.runtime)
    changes = api.call("GET", f"/runtimes/{rt['id']}/changes")
    if args.json:
        _print_json(changes)
        return EXIT_OK
    rows = [{**c, "size_text": _human_bytes(c["size"]) if c.get("size") is not None else "-"} for c in changes]
    _table(rows, [("kind", "kind"), ("path", "path"), ("size_text", "size")])
    return EXIT_OK


def _tree_glyphs() -> tuple[str, str]:
    """The branch and the indent of a tree; ASCII where stdout cannot take box drawing."""
    try:
        "└─".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "`- ", "   "
    return "└─ ", "   "


def lineage_lines(chain: list[dict[str, Any]]) -> list[str]:
    """The lineage as a tree, newest at the top: each version under the one it made."""
    branch, indent = _tree_glyphs()
    lines = []
    for depth, v in enumerate(chain):
        prefix = "" if depth == 0 else indent * (depth - 1) + branch
        parts = [f"{prefix}{v['ref']}"]
        if v.get("message"):
            parts.append(json.dumps(_first_line(v["message"]), ensure_ascii=False))
        if v.get("author"):
            parts.append(str(v["author"]))
        parts.append(_when(v.get("created_at"))[:16])
        parts.append("+" + _human_bytes(int(v.get("size_added") or 0)))
        lines.append("  ".join(parts))
    return lines


def cmd_env_lineage(args: argparse.Namespace) -> int:
    chain = _api(args).call("GET", f"/environments/{_ref_path(args.ref)}/lineage")
    if args.json:
        _print_json(chain)
        return EXIT_OK
    for line in lineage_lines(chain):
        print(line)
    return EXIT_OK


def cmd_env_show(args: argparse.Namespace) -> int:
    env = _api(args).call("GET", f"/environments/{_ref_path(args.ref)}")
    if args.json:
        _print_json(env)
        return EXIT_OK
    print(f"{env['name']}" + (f"  (team {env['team']})" if env.get("team") else ""))
    owner = env.get("owner")
    print(f"owner: {owner}" if owner else "owner: none (a base image: only admins add or delete versions)")
    tags = ", ".join(f"{t} -> {v}" for t, v in sorted(env["tags"].items()))
    print(f"tags: {tags or '(none)'}")
    print()
    rows = [
        {
            **v,
            "tags_text": ", ".join(v["tags"]),
            "size_text": _human_bytes(v["size"]),
            "added": "+" + _human_bytes(v["size_added"]),
            "created": _when(v["created_at"])[:16],
            "digest_text": _short_digest(v["digest"]),
            "message_text": _first_line(v["message"], 50),
        }
        for v in env["versions"]
    ]
    _table(
        rows,
        [
            ("ref", "version"),
            ("tags_text", "tags"),
            ("parent", "parent"),
            ("size_text", "size"),
            ("added", "added"),
            ("created", "created (UTC)"),
            ("author", "author"),
            ("digest_text", "digest"),
            ("message_text", "message"),
        ],
    )
    return EXIT_OK


def cmd_env_rm(args: argparse.Namespace) -> int:
    api = _api(args)
    api.call("DELETE", f"/environments/{_ref_path(args.ref)}")
    if args.json:
        _print_json({"deleted": args.ref})
    else:
        print(f"deleted {args.ref}")
    return EXIT_OK


def _read_input_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CliError(f"{path}: no such file", EXIT_BAD_INPUT) from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", EXIT_BAD_INPUT) from exc
    except OSError as exc:
        raise CliError(f"{path}: cannot read it: {exc.strerror or exc}", EXIT_BAD_INPUT) from exc


def _spec_steps(text: str) -> int | None:
    """How many steps the spec has (the server accepted it, so it parses); None if unsure."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    steps = data.get("steps") if isinstance(data, dict) else None
    return len(steps) if isinstance(steps, list) else None


class _BuildLog:
    """Shows a build's steps as they appear in its operation, each with its cell's output live."""

    def __init__(self, api: Api, total: int | None, progress: _Progress) -> None:
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
        self._print_log(done)
        return op

    @staticmethod
    def _print_log(step: dict[str, Any]) -> None:
        log = str(step.get("log") or "")
        if log:
            sys.stdout.write(log if log.endswith("\n") else log + "\n")
            sys.stdout.flush()

    @staticmethod
    def _on_output(_index: int, out: dict[str, Any]) -> None:
        kind = out.get("output_type")
        if kind == "stream":
            stream = sys.stderr if out.get("name") == "stderr" else sys.stdout
            stream.write(_text(out.get("text", "")))
            stream.flush()
        elif kind == "error":
            sys.stdout.flush()
            print(f"{out.get('ename', 'Error')}: {out.get('evalue', '')}", file=sys.stderr, flush=True)
        elif kind in ("display_data", "execute_result"):
            data = out.get("data") or {}
            if "text/plain" in data:
                print(_text(data["text/plain"]), flush=True)


def cmd_env_build(args: argparse.Namespace) -> int:
    path = Path(args.file)
    text = _read_input_text(path)
    api = _api(args)
    try:
        op = api.call("POST", "/environments/build", json={"spec": text, "source": path.name})
    except CliError as exc:
        # The spec's problems come as `file:line: field: problem`: shown as they are, for editors.
        # A parent that does not exist (404) is a problem of the spec too.
        if exc.status in (400, 404, 422) and exc.server_message:
            print(exc.server_message, file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    quiet = args.json
    progress = _Progress(quiet)
    log = _BuildLog(api, _spec_steps(text), progress)
    wait = 0.0 if not quiet else OPERATION_WAIT  # followed live: look often for the next step
    try:
        while True:
            if not quiet:
                op = log.show_new_steps(op)
            if op["status"] != "running":
                break
            if op.get("phase") != "running":  # between steps: queued, booting, saving
                progress.update(_op_text(op))
            op = api.call("GET", f"/operations/{op['id']}", params={"wait": wait})
            if not quiet and wait == 0.0 and op["status"] == "running":
                time.sleep(POLL_INTERVAL)
    except KeyboardInterrupt:
        progress.clear()
        print(
            f"\nenvctl: stopped following build {op['id']}; it goes on (GET /operations/{op['id']} shows it)",
            file=sys.stderr,
        )
        raise
    progress.clear()
    if args.json:
        _print_json(op)
    if op["status"] != "succeeded":
        error = op.get("error") or {}
        print(error.get("message") or op.get("message") or "the build failed", file=sys.stderr)
        return EXIT_FAILURE
    if not args.json:
        result = op["result"]
        if result.get("cached"):
            print(f"reused {result['version']} (same spec on the same parent)")
        else:
            print(
                f"built {result['version']}"
                + (f" (digest {_short_digest(result['digest'])})" if result.get("digest") else "")
            )
    return EXIT_OK


def _export_name(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", ref) + ".tar"


def cmd_env_export(args: argparse.Namespace) -> int:
    to_stdout = args.output == "-"
    dest = Path(args.output) if args.output else Path(_export_name(args.ref))
    if not to_stdout:
        if not args.output and dest.exists():
            raise CliError(f"{dest} exists; choose where to write with -o FILE (-o - for stdout)", EXIT_BAD_INPUT)
        if not dest.parent.is_dir():
            raise CliError(f"{dest}: the folder {dest.parent} does not exist", EXIT_BAD_INPUT)
        if dest.is_dir():
            raise CliError(f"{dest} is a folder; give a file name with -o FILE", EXIT_BAD_INPUT)
    api = _api(args)
    part = dest.with_name(dest.name + ".part")
    progress = _Progress(args.json or to_stdout)
    done = 0
    total: int | None = None
    if not progress.quiet:
        progress.update(f"preparing {args.ref} and its lineage")
    try:
        with api.http.stream("GET", f"/environments/{_ref_path(args.ref)}/export", timeout=ARCHIVE_TIMEOUT) as resp:
            if resp.status_code >= 400:
                resp.read()
                progress.clear()
                api.raise_for(resp)
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            of = f" of {_human_bytes(total)}" if total is not None else ""
            with contextlib.ExitStack() as stack:
                sink: IO[bytes] = sys.stdout.buffer if to_stdout else stack.enter_context(open(part, "wb"))
                for chunk in resp.iter_bytes(CHUNK):
                    sink.write(chunk)
                    done += len(chunk)
                    if progress.tty:
                        pct = f" ({100 * done / total:.0f}%)" if total else ""
                        progress.update(f"{_human_bytes(done)}{of}{pct}")
                sink.flush()
    except httpx.TransportError as exc:
        part.unlink(missing_ok=True)
        progress.clear()
        raise api.unreachable(exc) from exc
    except BaseException:
        part.unlink(missing_ok=True)
        progress.clear()
        raise
    progress.clear()
    if total is not None and done != total:
        part.unlink(missing_ok=True)
        raise CliError(f"the export of {args.ref} ended after {done} of {total} bytes; nothing was written")
    if to_stdout:
        return EXIT_OK
    os.replace(part, dest)
    if args.json:
        _print_json({"ref": args.ref, "file": str(dest), "bytes": done})
    else:
        print(f"wrote {dest} ({_human_bytes(done)}): {args.ref} with its lineage")
    return EXIT_OK


def cmd_env_load(args: argparse.Namespace) -> int:
    from_stdin = args.file == "-"
    path = Path(args.file)
    if from_stdin:
        source: IO[bytes] = sys.stdin.buffer
        size: int | None = None
    else:
        if path.is_dir():
            raise CliError(f"{path} is a folder, not an archive made by `envctl env export`", EXIT_BAD_INPUT)
        try:
            source = open(path, "rb")  # noqa: SIM115  (closed below)
        except FileNotFoundError as exc:
            raise CliError(f"{path}: no such file", EXIT_BAD_INPUT) from exc
        except OSError as exc:
            raise CliError(f"{path}: cannot read it: {exc.strerror or exc}", EXIT_BAD_INPUT) from exc
        size = os.fstat(source.fileno()).st_size
    api = _api(args)
    progress = _Progress(args.json)
    of = f" of {_human_bytes(size)}" if size is not None else ""

    def body() -> Iterator[bytes]:
        sent = 0
        while chunk := source.read(CHUNK):
            sent += len(chunk)
            if progress.tty:
                progress.update(f"uploading {_human_bytes(sent)}{of}")
            yield chunk
        progress.update("loading the images and their versions")

    headers = {"Content-Type": "application/x-tar"}
    if size is not None:
        headers["Content-Length"] = str(size)
    try:
        resp = api.http.post("/environments/load", content=body(), headers=headers, timeout=ARCHIVE_TIMEOUT)
    except httpx.TransportError as exc:
        raise api.unreachable(exc) from exc
    finally:
        progress.clear()
        if not from_stdin:
            source.close()
    api.raise_for(resp)
    loaded = resp.json()
    if args.json:
        _print_json(loaded)
        return EXIT_OK
    rows = [
        {**v, "new_text": "yes" if v["new"] else "no (had it)", "digest_text": _short_digest(v["digest"])}
        for v in loaded
    ]
    _table(rows, [("ref", "ref"), ("exported_as", "exported as"), ("new_text", "new"), ("digest_text", "digest")])
    return EXIT_OK


# ---------------------------------------------------------------------------- local commands


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from api.app import create_app

    settings = load_settings(args.config)
    changes: dict[str, Any] = {}
    if args.host:
        changes["api_host"] = args.host
    if args.port:
        changes["api_port"] = args.port
    settings = settings.with_overrides(**changes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    app.state.ctx.runner.claim()  # a runner name in use is a clear error now, not a traceback later
    # The event loop answers requests while worker threads talk to agents and write to the
    # database; a thread that needs the GIL waits at most this long for another to let go of it
    # (Python's default is 5 ms, the whole budget of a cell's round trip).
    sys.setswitchinterval(0.0005)
    print(
        f"envctl serving on http://{settings.api_host}:{settings.api_port} "
        f"(data: {settings.data_dir}; database: {_safe_url(settings.effective_database_url)}; "
        f"token: {settings.admin_token_file})",
        file=sys.stderr,
    )
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_level="warning")
    return EXIT_OK


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from api.dbschema import current_revision, engine_for, head_revision, upgrade

    settings = load_settings(args.config)
    url = settings.effective_database_url
    upgrade(url, args.revision)
    engine = engine_for(url)
    try:
        now = current_revision(engine)
    finally:
        engine.dispose()
    print(f"database {_safe_url(url)} is at revision {now} (head {head_revision()})")
    return EXIT_OK


def cmd_db_current(args: argparse.Namespace) -> int:
    from api.dbschema import current_revision, engine_for, head_revision

    settings = load_settings(args.config)
    engine = engine_for(settings.effective_database_url)
    try:
        now = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    print(f"current: {now or '(empty)'}  head: {head}" + ("" if now == head else "  -> run `envctl db upgrade`"))
    return EXIT_OK if now == head else EXIT_FAILURE


def cmd_base_build(args: argparse.Namespace) -> int:
    from api.dbschema import check_current
    from envs.base import build as base_images
    from envs.kit.db import Database
    from envs.service import register_base_images

    settings = load_settings(args.config)
    db = Database(settings.effective_database_url)
    check_current(db.engine)
    quiet = args.json

    def progress(event: Any) -> None:
        if not quiet:
            print(f"  [{event.image}] {event.phase}: {event.message}", file=sys.stderr, flush=True)

    built = base_images.build(
        args.names or None,
        mirror=args.mirror or settings.base_mirror,
        progress=progress,
        verify=not args.no_verify,
        extra_ca_certs=settings.base_extra_ca_certs,
    )
    with db.session() as s:
        registered = register_base_images(s, built)
        result: list[dict[str, Any]] = [
            {
                "image": b.name,
                "image_id": b.image_id,
                "reused": b.reused,
                "version": v.ref,
                "new_version": created,
            }
            for b, (v, created) in zip(built, registered, strict=True)
        ]
    db.dispose()
    if args.json:
        _print_json(result)
    else:
        for r in result:
            how = "reused image" if r["reused"] else "built"
            what = "registered as" if r["new_version"] else "already registered as"
            print(f"{r['image']}: {how} {r['image_id'][:19]}, {what} {r['version']}")
    return EXIT_OK


# ---------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {k:<34} {v}" for k, v in SETTINGS_HELP.items())
    parser = _Parser(
        prog="envctl",
        description="Container environments for notebooks.",
        epilog="settings (environment variables):\n" + env_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = _Parser(add_help=False)
    common.add_argument("--url", help="envctl API (default: ENVCTL_URL, the config file, " + DEFAULT_URL + ")")
    common.add_argument("--token", help="API token (default: ENVCTL_TOKEN, the config file, the admin token)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    local = _Parser(add_help=False)
    local.add_argument("--config", help="YAML config file (default: ENVCTL_CONFIG)")
    local.add_argument("--json", action="store_true", help="print JSON for scripts")

    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the API and the runner", parents=[local])
    p.add_argument("--host", help="listen address (default 127.0.0.1, ENVCTL_API_HOST)")
    p.add_argument("--port", type=int, help="listen port (default 8700, ENVCTL_API_PORT)")
    p.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, parser_class=_Parser
    )
    p = db.add_parser("upgrade", help="migrate the database to this envctl's schema", parents=[local])
    p.add_argument("--revision", default="head")
    p.set_defaults(func=cmd_db_upgrade)
    p = db.add_parser("current", help="show the schema revision", parents=[local])
    p.set_defaults(func=cmd_db_current)

    base = sub.add_parser("base", help="base images").add_subparsers(
        dest="base_command", required=True, parser_class=_Parser
    )
    p = base.add_parser("build", help="build base images with debootstrap and register them", parents=[local])
    p.add_argument("names", nargs="*", help="images to build with their parents (default: all)")
    p.add_argument("--mirror", help="Debian mirror (default: ENVCTL_BASE_MIRROR or the machine's apt mirror)")
    p.add_argument("--no-verify", action="store_true", help="skip each image's verify script")
    p.set_defaults(func=cmd_base_build)

    rt = sub.add_parser("runtime", help="runtimes").add_subparsers(
        dest="runtime_command", required=True, parser_class=_Parser
    )
    p = rt.add_parser("create", help="create a runtime", parents=[common])
    p.add_argument("name")
    p.add_argument("--env", required=True, help="environment reference, e.g. python3 or python3@1")
    p.add_argument("--lang", default="python", choices=["python", "bash"])
    p.add_argument("--machine-type", default="small")
    p.add_argument("--idle-timeout", type=int, help="seconds without activity before shutdown (0: never)")
    p.add_argument(
        "--type",
        choices=["native", "jupyter"],
        help="native: envctl's own kernels (default); jupyter: a Jupyter kernelspec installed in the environment",
    )
    p.add_argument("--kernel", help="kernelspec name for --type jupyter (default python3)")
    p.add_argument("--start", action="store_true", help="boot it now and wait until it runs")
    p.set_defaults(func=cmd_runtime_create)
    p = rt.add_parser("ls", help="list your runtimes", parents=[common])
    p.set_defaults(func=cmd_runtime_ls)
    for name, func, text in (
        ("show", cmd_runtime_show, "show a runtime"),
        ("start", cmd_runtime_start, "boot a runtime and wait until it runs"),
        ("stop", cmd_runtime_stop, "stop a runtime"),
        ("rm", cmd_runtime_rm, "stop and delete a runtime"),
        ("log", cmd_runtime_log, "the runner log of a runtime"),
        ("reset", cmd_runtime_reset, "throw away unsaved changes and boot from the version again"),
        ("changes", cmd_runtime_changes, "paths added, changed and deleted since the version (unsaved changes)"),
    ):
        p = rt.add_parser(name, help=text, parents=[common])
        p.add_argument("runtime", help="runtime id or name")
        if name in ("start", "stop", "reset"):
            p.add_argument("--no-wait", action="store_true", help="return at once")
        p.set_defaults(func=func)

    p = sub.add_parser(
        "save",
        help="save a running runtime's filesystem as the next version of an environment",
        parents=[common],
        description="Snapshot RUNTIME (it must be running) as the next version of the environment NAME "
        "([team/]name); its parent is the version the runtime booted from. The runtime stays on its "
        "version; `envctl import` moves it. Exit 0 when saved, 1 when the save failed, 2 on bad input.",
    )
    p.add_argument("runtime", help="runtime id or name")
    p.add_argument("--as", dest="environment", required=True, metavar="NAME", help="environment, e.g. acme/ml")
    p.add_argument("-m", "--message", default="", help="what this version adds")
    p.add_argument("--tag", help="a tag to point at the new version too (latest always moves)")
    p.set_defaults(func=cmd_save)

    p = sub.add_parser(
        "import",
        help="pin a stopped runtime to an environment version",
        parents=[common],
        description="Pin RUNTIME to the exact version REF means now (a tag or bare name is resolved once); "
        "the next start boots it. The runtime must be stopped and have no unsaved changes "
        "(save them or `envctl runtime reset` first).",
    )
    p.add_argument("ref", help="environment reference, e.g. acme/ml, acme/ml@2, acme/ml:stable")
    p.add_argument("--runtime", required=True, help="runtime id or name")
    p.set_defaults(func=cmd_import)

    env = sub.add_parser("env", help="environments").add_subparsers(
        dest="env_command", required=True, parser_class=_Parser
    )
    p = env.add_parser("ls", help="list environments", parents=[common])
    p.set_defaults(func=cmd_env_ls)
    p = env.add_parser("show", help="an environment's versions and tags", parents=[common])
    p.add_argument("ref", help="environment name or any reference to one of its versions")
    p.set_defaults(func=cmd_env_show)
    p = env.add_parser("lineage", help="the chain of parents of a version, as a tree", parents=[common])
    p.add_argument("ref", help="environment reference, e.g. acme/ml or acme/ml@3")
    p.set_defaults(func=cmd_env_lineage)
    p = env.add_parser(
        "rm",
        help="delete one version",
        parents=[common],
        description="Delete the version REF (name@N or name@sha256:...). Refused, naming them, while "
        "other versions or runtimes depend on it.",
    )
    p.add_argument("ref", help="one version: name@N or name@sha256:...")
    p.set_defaults(func=cmd_env_rm)
    p = env.add_parser(
        "build",
        help="build a version from a spec file, showing the build log as it happens",
        parents=[common],
        description="Build the spec FILE (YAML: name, extends, message, steps of apt, pip, env, run, files): "
        "a runtime boots from the parent, runs each step as a cell and is saved. The same spec on the same "
        "parent reuses the version built before. A bad spec is reported as FILE:LINE: FIELD: PROBLEM. "
        "Exit 0 when built or reused, 1 when a step or the build failed, 2 on a bad spec.",
    )
    p.add_argument("file", help="the spec file")
    p.set_defaults(func=cmd_env_build)
    p = env.add_parser(
        "export",
        help="write a version and its lineage to an OCI archive",
        parents=[common],
    )
    p.add_argument("ref", help="environment reference, e.g. acme/ml@3")
    p.add_argument(
        "-o", "--output", metavar="FILE", help="where to write it (default: REF.tar here, never overwritten; - stdout)"
    )
    p.set_defaults(func=cmd_env_export)
    p = env.add_parser(
        "load",
        help="load an archive made by `envctl env export`",
        parents=[common],
    )
    p.add_argument("file", help="the archive (- for stdin)")
    p.set_defaults(func=cmd_env_load)

    p = sub.add_parser("machine-types", help="list machine types", parents=[common])
    p.set_defaults(func=cmd_machine_types)

    p = sub.add_parser(
        "exec",
        help="run code in a runtime and show its outputs as they come",
        parents=[common],
        description="Run CODE in RUNTIME (booting it first when it is stopped) and show the outputs live: "
        "streams on stdout/stderr, results as text, errors as their traceback on stderr, images saved "
        "as files. Ctrl-C interrupts the cell; a second Ctrl-C stops waiting. Exit 0 when the cell "
        "succeeded, 1 when it failed or was interrupted, 2 on bad input.",
    )
    p.add_argument("runtime", help="runtime id or name")
    p.add_argument("code", help="the code to run, or - to read it from stdin")
    p.add_argument("--lang", metavar="python|bash", help="language of the code (default: the runtime's)")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds the cell may run")
    p.add_argument(
        "--images-dir",
        default=".",
        metavar="DIR",
        help="where image outputs are saved, as <execution id>-<n>.png (default: the current folder)",
    )
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser(
        "run",
        help="run a notebook's code cells in a runtime and write their outputs into it",
        parents=[common],
        description="Run every code cell of NOTEBOOK in order in a new runtime of the notebook's environment "
        "(--env, else the notebook's metadata envctl.environment) or in --runtime, write the outputs and "
        "execution counts back (in place or to -o), record the exact environment version in the "
        "metadata, and delete the runtime it created (unless --keep). Stops at the first failing "
        "cell unless --allow-errors. Exit 0 when every cell ran ok, 1 when one failed, 2 on bad input.",
    )
    p.add_argument("notebook", help="a Jupyter notebook (.ipynb)")
    p.add_argument("--env", help="environment reference, e.g. python3 or python3@1 (default: the notebook's)")
    p.add_argument("--runtime", help="run in this existing runtime (id or name); it is kept")
    p.add_argument("--machine-type", help="machine type of the runtime run creates (default small)")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds each cell may run")
    p.add_argument("-o", "--output", metavar="OUT.ipynb", help="write here instead of in place")
    p.add_argument("--keep", action="store_true", help="keep the runtime run created")
    p.add_argument(
        "--allow-errors", action="store_true", help="run the cells after a failing one too (the exit code is still 1)"
    )
    p.set_defaults(func=cmd_run)

    res = sub.add_parser(
        "results",
        help="result files cells wrote under /results",
        description="`envctl results [RUNTIME]` is short for `envctl results ls [RUNTIME]`.",
    ).add_subparsers(dest="results_command", required=True, parser_class=_Parser)
    p = res.add_parser("ls", help="list result files, newest first", parents=[common])
    p.add_argument("runtime", nargs="?", help="runtime id or name (an id also after it was deleted); default: all")
    p.set_defaults(func=cmd_results_ls)
    p = res.add_parser("get", help="download a result file", parents=[common])
    p.add_argument("result_id", type=int, help="result id (the ID column of `envctl results ls`)")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write it (default: its file name here; - stdout)")
    p.set_defaults(func=cmd_results_get)
    return parser


def _expand_shorthands(argv: list[str]) -> list[str]:
    """``envctl results [RUNTIME]`` means ``envctl results ls [RUNTIME]``."""
    if argv and argv[0] == "results" and (len(argv) == 1 or argv[1] not in ("ls", "get", "-h", "--help")):
        return [argv[0], "ls", *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_expand_shorthands(list(sys.argv[1:] if argv is None else argv)))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"envctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except InvalidInputError as exc:
        print(f"envctl: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EnvctlError as exc:
        print(f"envctl: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("envctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
