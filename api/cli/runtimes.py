"""``envctl runtime create|ls|show|set|env|start|stop|rm|log|executions|reset|changes`` and
``envctl machine-types``."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from api.cli.client import Api
from api.cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, CliError
from api.cli.options import Command, Group, client_options
from api.cli.output import STATE_STYLES, Progress, Styled, fields, human_bytes, listing, print_json, when
from envs.kit.errors import InvalidInputError
from runner.mounts.validate import describe as describe_mount
from runner.mounts.validate import from_json as mounts_from_json
from runner.mounts.validate import parse_option as parse_mount

FOLLOW_TIMEOUT = 300.0  # seconds a start, stop or reset is followed before giving up


def _state(rt: dict[str, Any], text: str) -> Styled:
    return Styled(text, STATE_STYLES.get(rt.get("state_color", ""), ""))


def show_runtime(rt: dict[str, Any]) -> None:
    message = f": {rt['state_message']}" if rt["state_message"] else ""
    pairs: list[tuple[str, str | Styled]] = [
        ("id", rt["id"]),
        ("name", rt["name"]),
        ("team", rt.get("team") or "none (yours only)"),
        ("state", _state(rt, f"{rt['state']} ({rt['state_reason']}){message}")),
        ("environment", f"{rt['environment']}  (asked for {rt['environment_ref']})"),
        ("type", rt.get("type", "native") + (f" (kernel {rt['kernel']})" if rt.get("kernel") else "")),
        ("language", rt["language"]),
        ("machine type", rt["machine_type"] + (f" (CUDA {rt['cuda']})" if rt.get("cuda") else "")),
        ("variables", ", ".join(sorted(rt.get("env") or {})) or "none set here (`envctl runtime env` lists them)"),
        ("mounts", "; ".join(describe_mount(m) for m in mounts_from_json(rt.get("mounts"))) or "none"),
        ("busy", "yes" if rt["busy"] else "no"),
    ]
    origin = rt.get("origin", "boot")
    if origin == "attached":
        pairs.insert(
            4, ("attached", f"to container {rt['environment_ref'].removeprefix('attach:')} (never stopped by envctl)")
        )
    elif origin == "pool":
        pairs.insert(4, ("container", "claimed from the warm pool"))
    if rt.get("secrets_outdated"):
        outdated = ", ".join(rt["secrets_outdated"])
        pairs.append(("secrets", f"changed since boot: {outdated} (the next boot applies them)"))
    if rt.get("pending"):
        pairs.append(("at next boot", "; ".join(_pending_text(k, v) for k, v in rt["pending"].items())))
    if rt.get("idle"):
        idle = rt["idle"]
        pairs.append(("idle shutdown", f"{when(idle['shutdown_at'])} UTC  ({idle['reason']})"))
    elif rt["state"] == "running":
        pairs.append(("idle shutdown", "not planned"))
    if rt.get("lease"):
        lease = rt["lease"]
        ends = "expired at" if lease["expired"] else "deleted at"
        pairs.append(
            (
                "lease",
                f"{lease['seconds']} s, last renewed {when(lease['renewed_at'])} UTC; "
                f"{ends} {when(lease['expires_at'])} UTC unless its client renews it "
                "(`envctl runtime set --lease none` keeps it)",
            )
        )
    pairs.append(("booted", when(rt.get("booted_at"))))
    pairs.append(("created", when(rt["created_at"])))
    fields(pairs)


def _pending_text(field: str, value: Any) -> str:
    if field == "env":
        return "variables " + (", ".join(sorted(value)) or "none")
    return f"{field.replace('_', ' ')} {value}"


def _show(rt: dict[str, Any], as_json: bool) -> None:
    print_json(rt) if as_json else show_runtime(rt)


def follow(
    api: Api, rt: dict[str, Any], until: set[str], *, quiet: bool, timeout: float = FOLLOW_TIMEOUT, since: int = 0
) -> dict[str, Any]:
    """Show the runtime's progress until it reaches one of ``until`` (or error): its log
    entries from index ``since`` on as lines, and on a terminal its state with a spinner."""
    start = time.monotonic()
    seen = since
    with Progress(quiet, echo_updates=False) as progress:
        while True:
            entries = api.call("GET", f"/runtimes/{rt['id']}/log")
            for e in entries[seen:]:
                what = e["state"] or e["event"]
                progress.line(f"  {when(e['at'])[11:]}  {what:<18} {e['message']}")
            seen = len(entries)
            rt = api.call("GET", f"/runtimes/{rt['id']}")
            if rt["state"] in until or rt["state"] == "error":
                return rt
            if time.monotonic() - start > timeout:
                raise CliError(f"runtime {rt['name']} is still {rt['state']} after {timeout:.0f} s")
            progress.update(str(rt["state"]))
            time.sleep(0.1)


@click.group("runtime", cls=Group)
def runtime() -> None:
    """Runtimes: create, start, stop, inspect and delete them."""


RUNTIME = click.argument("runtime", help="runtime id, name, or TEAM/NAME for a team runtime")


@runtime.command("create")
@click.argument("name", help="the runtime's name: lower case letters, digits, '.', '_' and '-'")
@click.option("--env", required=True, metavar="REF", help="environment reference, e.g. python3 or python3@1")
@click.option(
    "--lang", default="python", show_default=True, type=click.Choice(["python", "bash"]), help="the cells' language"
)
@click.option("--machine-type", metavar="NAME", default="small", show_default=True, help="see `envctl machine-types`")
@click.option("--idle-timeout", type=int, metavar="S", help="seconds without activity before shutdown (0: never)")
@click.option(
    "--type",
    "type_",
    type=click.Choice(["native", "jupyter"]),
    help="native: envctl's own kernels (default); jupyter: a Jupyter kernelspec installed in the environment",
)
@click.option("--kernel", metavar="NAME", help="kernelspec name for --type jupyter (default python3)")
@click.option("--env-var", "env_vars", multiple=True, metavar="K=V", help="an environment variable (repeat)")
@click.option(
    "--secret", "secret_env", multiple=True, metavar="K=SECRET", help="variable K from a team secret (repeat)"
)
@click.option("--team", metavar="TEAM", help="a team of yours whose members see and use it too")
@click.option("--start", is_flag=True, help="boot it now and wait until it runs")
@client_options
def create(
    api: Api,
    as_json: bool,
    name: str,
    env: str,
    lang: str,
    machine_type: str,
    idle_timeout: int | None,
    type_: str | None,
    kernel: str | None,
    env_vars: tuple[str, ...],
    secret_env: tuple[str, ...],
    team: str | None,
    start: bool,
) -> int:
    """Create a runtime (stopped, unless --start); with --team, the team's members see and use
    it too (address it as TEAM/NAME)."""
    body: dict[str, Any] = {"name": name, "environment": env, "language": lang, "machine_type": machine_type}
    if team is not None:
        body["team"] = team
    if env_vars or secret_env:
        body["env"] = {**_assignments(env_vars, "--env-var"), **_secret_refs(secret_env)}
    if idle_timeout is not None:
        body["idle_timeout"] = idle_timeout
    if type_ is not None:
        body["type"] = type_
    if kernel is not None:
        body["kernel"] = kernel
    rt = api.call("POST", "/runtimes", json=body)
    if start:
        rt = api.call("POST", f"/runtimes/{rt['id']}/start")
        rt = follow(api, rt, {"running"}, quiet=as_json)
    _show(rt, as_json)
    return EXIT_FAILURE if rt["state"] == "error" else EXIT_OK


@runtime.command("attach")
@click.argument("name", help="the runtime's name: lower case letters, digits, '.', '_' and '-'")
@click.argument("container", help="id or name of a running container the admins' allow-list names")
@click.option("--team", metavar="TEAM", help="a team of yours whose members see and use it too")
@client_options
def attach(api: Api, as_json: bool, name: str, container: str, team: str | None) -> int:
    """Make a runtime whose cells run inside CONTAINER, a container envctl did not start
    (ENVCTL_RUNNER_ATTACH_ALLOW names those that may be attached). envctl never stops,
    removes or commits it; stopping or deleting the runtime detaches, leaving it as it was."""
    body: dict[str, Any] = {"name": name, "attach": {"container": container}}
    if team is not None:
        body["team"] = team
    rt = api.call("POST", "/runtimes", json=body)
    _show(rt, as_json)
    return EXIT_OK


@runtime.command("ls")
@client_options
def ls(api: Api, as_json: bool) -> int:
    """List your runtimes and your teams' (named TEAM/NAME)."""
    return listing(
        api.call("GET", "/runtimes"),
        as_json,
        [
            ("id", "id"),
            ("name", "name"),
            ("state_text", "state"),
            ("environment", "environment"),
            ("machine_type", "machine"),
            ("shutdown", "idle shutdown (UTC)"),
        ],
        lambda rt: {
            **rt,
            "name": f"{rt['team']}/{rt['name']}" if rt.get("team") else rt["name"],
            "state_text": _state(rt, rt["state"] + (" (busy)" if rt["busy"] else "")),
            "shutdown": when(rt["idle_shutdown_at"]),
        },
    )


@runtime.command("show")
@RUNTIME
@client_options
def show(api: Api, as_json: bool, runtime: str) -> int:
    """Show a runtime. Its state and why, its version, and when idle shutdown will happen."""
    _show(api.runtime(runtime), as_json)
    return EXIT_OK


def _assignments(items: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"{option}: {item[:64]!r} is not NAME=VALUE", EXIT_BAD_INPUT)
        out[name] = value
    return out


def _secret_refs(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``--secret K=SECRET`` options as references to team secrets (SECRET or TEAM/SECRET)."""
    return {k: {"secret": v} for k, v in _assignments(items, "--secret").items()}


@runtime.command("set")
@RUNTIME
@click.option("--name", metavar="NAME", help="a new name")
@click.option("--environment", metavar="REF", help="another environment version (needs a reboot)")
@click.option("--type", "type_", type=click.Choice(["native", "jupyter"]), help="the runtime type (needs a reboot)")
@click.option("--kernel", metavar="NAME", help="kernelspec name, with --type jupyter")
@click.option("--lang", type=click.Choice(["python", "bash"]), help="the cells' default language")
@click.option("--env", "set_env", multiple=True, metavar="K=V", help="set an environment variable (repeat; reboot)")
@click.option("--unset-env", multiple=True, metavar="K", help="remove an environment variable (repeat; reboot)")
@click.option(
    "--secret",
    "secret_env",
    multiple=True,
    metavar="K=SECRET",
    help="variable K from a team secret, SECRET or TEAM/SECRET (repeat; reboot); also a file /run/secrets/SECRET",
)
@click.option("--machine-type", metavar="NAME", help="see `envctl machine-types` (needs a reboot)")
@click.option("--idle-timeout", metavar="S", help="seconds without activity before shutdown (0: never; 'default')")
@click.option("--cuda", metavar="VERSION", help="host CUDA version for a GPU machine type, or 'none' (reboot)")
@click.option(
    "--lease",
    metavar="S",
    help="a client lease of S seconds from now (renewed with POST /runtimes/ID/lease, else the runtime is deleted), "
    "or 'none' to drop it",
)
@click.option(
    "--mount",
    "mounts",
    multiple=True,
    metavar="SPEC",
    help="the runtime's mounts, the complete list (repeat; reboot): git:URL[@REF]:/target, "
    "volume:NAME:/target[:ro], s3:BUCKET[/PREFIX]:/target[:writeback]",
)
@click.option("--no-mounts", is_flag=True, help="remove every mount (reboot)")
@click.option("--next-boot", is_flag=True, help="while it runs, keep changes that need a reboot for its next boot")
@client_options
def set_(
    api: Api,
    as_json: bool,
    runtime: str,
    name: str | None,
    environment: str | None,
    type_: str | None,
    kernel: str | None,
    lang: str | None,
    set_env: tuple[str, ...],
    unset_env: tuple[str, ...],
    secret_env: tuple[str, ...],
    machine_type: str | None,
    idle_timeout: str | None,
    cuda: str | None,
    lease: str | None,
    mounts: tuple[str, ...],
    no_mounts: bool,
    next_boot: bool,
) -> int:
    """Change a runtime's settings. Environment, type, variables and machine type need a
    reboot: while the runtime runs they are refused unless --next-boot keeps them for its next
    boot (`envctl runtime show` lists what waits)."""
    body: dict[str, Any] = {}
    for key, value in (("name", name), ("environment", environment), ("type", type_), ("kernel", kernel)):
        if value is not None:
            body[key] = value
    if lang is not None:
        body["language"] = lang
    if machine_type is not None:
        body["machine_type"] = machine_type
    if cuda is not None:
        body["cuda"] = None if cuda == "none" else cuda
    if idle_timeout is not None:
        if idle_timeout == "default":
            body["idle_timeout"] = None
        elif idle_timeout.isdigit():
            body["idle_timeout"] = int(idle_timeout)
        else:
            raise CliError(f"--idle-timeout: {idle_timeout[:32]!r} is not whole seconds or 'default'", EXIT_BAD_INPUT)
    if lease is not None:
        if lease == "none":
            body["lease"] = None
        elif lease.isdigit():
            body["lease"] = int(lease)
        else:
            raise CliError(f"--lease: {lease[:32]!r} is not whole seconds or 'none'", EXIT_BAD_INPUT)
    env: dict[str, Any] = {**_assignments(set_env, "--env"), **_secret_refs(secret_env), **dict.fromkeys(unset_env)}
    if env:
        body["env"] = env
    if mounts or no_mounts:
        if mounts and no_mounts:
            raise CliError("--mount and --no-mounts do not go together", EXIT_BAD_INPUT)
        try:
            body["mounts"] = [parse_mount(m) for m in mounts]
        except InvalidInputError as exc:
            raise CliError(exc.message, EXIT_BAD_INPUT) from None
    if not body:
        raise CliError("nothing to change; `envctl runtime set --help` lists the settings", EXIT_BAD_INPUT)
    body["next_boot"] = next_boot
    rt = api.runtime(runtime)
    _show(api.call("PATCH", f"/runtimes/{rt['id']}", json=body), as_json)
    return EXIT_OK


@runtime.command("env")
@RUNTIME
@click.option("--inherited", is_flag=True, help="also the variables the environment's image sets")
@client_options
def env_(api: Api, as_json: bool, runtime: str, inherited: bool) -> int:
    """The environment variables of a runtime's cells: those set here, and with --inherited
    those its environment's image sets (a variable set here wins)."""
    listing_ = api.call("GET", f"/runtimes/{api.runtime(runtime)['id']}/env")
    variables = [v for v in listing_["variables"] if inherited or v["source"] == "set here"]
    if as_json:
        print_json({**listing_, "variables": variables})
        return EXIT_OK
    listing(
        variables,
        False,
        [("name", "name"), ("shown", "value"), ("from", "source")],
        lambda v: {
            **v,
            "shown": f"secret {v['secret']} (hidden)"
            if v.get("secret")
            else "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in v["value"]),
            "from": v["source"] + (" (over the image's)" if v["overrides"] else ""),
        },
    )
    if listing_["pending"] is not None:
        print(f"at the next boot: {', '.join(sorted(listing_['pending'])) or 'none'} set here")
    return EXIT_OK


def _action(api: Api, ident: str, action: str, until: str, *, no_wait: bool, as_json: bool) -> int:
    """POST /runtimes/{id}/<action>, then show its progress (only its own log lines)."""
    rt = api.runtime(ident)
    seen = len(api.call("GET", f"/runtimes/{rt['id']}/log"))
    rt = api.call("POST", f"/runtimes/{rt['id']}/{action}")
    if not no_wait:
        rt = follow(api, rt, {until}, quiet=as_json, since=seen)
    _show(rt, as_json)
    return EXIT_FAILURE if rt["state"] == "error" else EXIT_OK


NO_WAIT = click.option("--no-wait", is_flag=True, help="return at once")


def _action_command(name: str, until: str, doc: str) -> click.Command:
    """``runtime start|stop|reset RUNTIME [--no-wait]``: the action, then its progress until ``until``."""

    @runtime.command(name, help=doc)
    @RUNTIME
    @NO_WAIT
    @client_options
    def command(api: Api, as_json: bool, runtime: str, no_wait: bool) -> int:
        return _action(api, runtime, name, until, no_wait=no_wait, as_json=as_json)

    return command


start = _action_command("start", "running", "Boot a runtime and wait until it runs.")
stop = _action_command("stop", "stopped", "Stop a runtime. Its unsaved changes are kept as a draft for the next boot.")
reset = _action_command("reset", "running", "Throw away unsaved changes and boot from the version again.")


@runtime.command("rm")
@RUNTIME
@client_options
def rm(api: Api, as_json: bool, runtime: str) -> int:
    """Stop and delete a runtime."""
    rt = api.runtime(runtime)
    api.call("DELETE", f"/runtimes/{rt['id']}")
    if as_json:
        print_json({"deleted": rt["id"]})
    else:
        print(f"deleted runtime {rt['name']} ({rt['id']})")
    return EXIT_OK


@runtime.command("log")
@RUNTIME
@client_options
def log(api: Api, as_json: bool, runtime: str) -> int:
    """The runner log of a runtime. Every state change and housekeeping step, with its reason."""
    return listing(
        api.call("GET", f"/runtimes/{api.runtime(runtime)['id']}/log"),
        as_json,
        [("at", "at (UTC)"), ("what", "state/event"), ("reason", "reason"), ("message", "message")],
        lambda e: {**e, "at": when(e["at"]), "what": e["state"] or f"[{e['event']}]"},
    )


@runtime.command("executions")
@RUNTIME
@client_options
def executions(api: Api, as_json: bool, runtime: str) -> int:
    """The cells run in a runtime, newest first. A BY column names who ran each cell that
    was not you (members of a team runtime run cells in it too); --json has it as submitted_by."""
    items = api.call("GET", f"/runtimes/{api.runtime(runtime)['id']}/executions")
    me = None if as_json else api.call("GET", "/users/me")["name"]

    def row(e: dict[str, Any]) -> dict[str, Any]:
        by = e.get("submitted_by")
        first = e["code"].strip().splitlines()[0] if e["code"].strip() else ""
        first = "".join(c if c.isprintable() else "?" for c in first)  # a teammate's escape codes stay text
        return {
            **e,
            "at": when(e["created_at"]),
            "by": "" if by == me else by or "(a deleted user)",
            "first_line": first if len(first) <= 40 else first[:39] + "…",
        }

    columns = [("seq", "seq"), ("status", "status"), ("language", "language"), ("at", "created (UTC)")]
    return listing(items, as_json, [*columns, ("by", "by"), ("first_line", "code")], row)


@runtime.command("changes")
@RUNTIME
@client_options
def changes(api: Api, as_json: bool, runtime: str) -> int:
    """The unsaved changes. Paths added, changed and deleted since the version, with sizes;
    a CACHE column names the cache a save leaves out (unless --keep-caches), and a last line on
    stderr sums up what a save keeps and leaves out."""
    from api.cli.saves import changes_split

    items = api.call("GET", f"/runtimes/{api.runtime(runtime)['id']}/changes")
    columns = [("kind", "kind"), ("path", "path"), ("size_text", "size")]
    if any(c.get("cache") for c in items):
        columns.append(("cache_text", "cache (left out)"))
    code = listing(
        items,
        as_json,
        columns,
        lambda c: {
            **c,
            "size_text": human_bytes(c["size"]) if c.get("size") is not None else "-",
            "cache_text": c.get("cache") or "",
        },
    )
    if not as_json and items:
        print(changes_split(items), file=sys.stderr)
    return code


@click.command("machine-types", cls=Command)
@client_options
def machine_types(api: Api, as_json: bool) -> int:
    """List machine types (cpus, memory, pids, gpus)."""
    return listing(
        api.call("GET", "/machine-types"),
        as_json,
        [
            ("name", "name"),
            ("cpus", "cpus"),
            ("memory", "memory"),
            ("pids", "pids"),
            ("gpus", "gpus"),
            ("gpu_kind", "gpu kind"),
            ("description", "description"),
        ],
        lambda m: {**m, "memory": human_bytes(m["memory"])},
    )
