"""The ``envctl`` command line.

Everything but ``serve``, ``db`` and ``base build`` is a client of the REST API: the URL comes
from ``--url``, ``ENVCTL_URL`` or the config file (``~/.config/envctl/config.yaml``: ``url``,
``token``), the token from ``--token``, ``ENVCTL_TOKEN``, the config file, or the file
``envctl serve`` wrote in its data directory.

Tables for people, ``--json`` for scripts. Exit codes: 0 success, 1 failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx
import yaml

from envs.kit.config import SETTINGS_HELP, load_settings
from envs.kit.errors import EnvctlError, InvalidInputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_URL = "http://127.0.0.1:8700"


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


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

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CliError(
                f"cannot reach envctl at {self.url} ({exc.__class__.__name__}); is `envctl serve` "
                "(or `make run`) running? Set --url or ENVCTL_URL to another server."
            ) from exc
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                message = err["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:500] or resp.reason_phrase
            code = EXIT_BAD_INPUT if resp.status_code in (400, 422) else EXIT_FAILURE
            raise CliError(f"{message} (HTTP {resp.status_code})", code)
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


def _follow(api: Api, rt: dict[str, Any], until: set[str], *, quiet: bool, timeout: float = 300) -> dict[str, Any]:
    """Show the runtime's progress until it reaches one of ``until`` (or error)."""
    start = time.monotonic()
    seen = 0
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


def cmd_runtime_start(args: argparse.Namespace) -> int:
    api = _api(args)
    rt = _resolve_runtime(api, args.runtime)
    rt = api.call("POST", f"/runtimes/{rt['id']}/start")
    if not args.no_wait:
        rt = _follow(api, rt, {"running"}, quiet=args.json)
    _print_json(rt) if args.json else _show_runtime(rt)
    return EXIT_FAILURE if rt["state"] == "error" else EXIT_OK


def cmd_runtime_stop(args: argparse.Namespace) -> int:
    api = _api(args)
    rt = _resolve_runtime(api, args.runtime)
    rt = api.call("POST", f"/runtimes/{rt['id']}/stop")
    if not args.no_wait:
        rt = _follow(api, rt, {"stopped"}, quiet=args.json)
    _print_json(rt) if args.json else _show_runtime(rt)
    return EXIT_FAILURE if rt["state"] == "error" else EXIT_OK


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
    from envs import base_images
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
    ):
        p = rt.add_parser(name, help=text, parents=[common])
        p.add_argument("runtime", help="runtime id or name")
        if name in ("start", "stop"):
            p.add_argument("--no-wait", action="store_true", help="return at once")
        p.set_defaults(func=func)

    env = sub.add_parser("env", help="environments").add_subparsers(
        dest="env_command", required=True, parser_class=_Parser
    )
    p = env.add_parser("ls", help="list environments", parents=[common])
    p.set_defaults(func=cmd_env_ls)

    p = sub.add_parser("machine-types", help="list machine types", parents=[common])
    p.set_defaults(func=cmd_machine_types)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
