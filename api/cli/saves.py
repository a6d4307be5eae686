"""``envctl save RUNTIME --as NAME`` and ``envctl import REF --runtime RUNTIME``."""

from __future__ import annotations

import sys
from typing import Any

import click

from api.cli.client import Api
from api.cli.errors import EXIT_FAILURE, EXIT_OK
from api.cli.operations import follow_operation, op_failure
from api.cli.options import Command, client_options
from api.cli.output import human_bytes, print_json, short_digest


def caches_text(left_out: dict[str, dict[str, int]]) -> str:
    """``/var/lib/apt/lists 45.2 MB (120 files), ...``, largest first."""
    ordered = sorted(left_out.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))
    return ", ".join(f"{path} {human_bytes(c['bytes'])} ({c['files']} files)" for path, c in ordered)


def changes_split(items: list[dict[str, Any]]) -> str:
    """The unsaved-changes notice: what a save would keep, and the caches it would leave out."""
    kept = [c for c in items if not c.get("cache")]
    caches: dict[str, dict[str, int]] = {}
    for c in items:
        if c.get("cache"):
            counted = caches.setdefault(c["cache"], {"bytes": 0, "files": 0})
            counted["bytes"] += c.get("size") or 0
            counted["files"] += 1
    line = f"a save keeps {len(kept)} paths ({human_bytes(sum(c.get('size') or 0 for c in kept))})"
    if caches:
        line += f"; it leaves out caches: {caches_text(caches)} (`envctl save --keep-caches` keeps them)"
    return line


@click.command("save", cls=Command, short_help="Save a running runtime as the next version of an environment.")
@click.argument("runtime", help="runtime id or name")
@click.option("--as", "environment", required=True, metavar="NAME", help="environment, e.g. acme/ml")
@click.option("-m", "--message", default="", help="what this version adds")
@click.option("--tag", metavar="TAG", help="a tag to point at the new version too (latest always moves)")
@click.option("--keep-caches", is_flag=True, help="keep package caches (apt lists and archives, pip, npm)")
@click.option(
    "--allow-secrets",
    "allow_secrets",
    multiple=True,
    metavar="PATH",
    help="accept what the secret scan finds at PATH (repeat for each path); recorded in the version",
)
@client_options
def save(
    api: Api,
    as_json: bool,
    runtime: str,
    environment: str,
    message: str,
    tag: str | None,
    keep_caches: bool,
    allow_secrets: tuple[str, ...],
) -> int:
    """Snapshot RUNTIME (it must be running) as the next version of the environment NAME
    ([team/]name); its parent is the version the runtime booted from. The runtime stays on its
    version; `envctl import` moves it. Package caches are left out unless --keep-caches. A save
    whose new layer holds secrets (credential files, private keys, the runtime's secret values)
    is refused, naming each path; --allow-secrets PATH accepts one. Exit 0 when saved, 1 when
    the save failed or was refused, 2 on bad input."""
    rt = api.runtime(runtime)
    body: dict[str, Any] = {"environment": environment, "message": message}
    if tag is not None:
        body["tag"] = tag
    if keep_caches:
        body["keep_caches"] = True
    if allow_secrets:
        body["allow_secrets"] = list(allow_secrets)
    op = api.call("POST", f"/runtimes/{rt['id']}/save", json=body)
    op = follow_operation(api, op, quiet=as_json)
    if as_json:
        print_json(op)
    if op["status"] != "succeeded":
        error = op.get("error") or {}
        if error.get("code") == "save_has_secrets" and not as_json:
            print(f"envctl: saving {rt['name']} was refused: its new layer holds secrets", file=sys.stderr)
            for finding in error.get("details", {}).get("findings", []):
                print(f"  {finding['path']}: {', '.join(finding['found'])}", file=sys.stderr)
            print(
                "remove them and save again, or accept a path with --allow-secrets PATH; "
                "the runtime and its changes are untouched",
                file=sys.stderr,
            )
        else:
            print("envctl: " + op_failure(op, f"saving {rt['name']}"), file=sys.stderr)
        return EXIT_FAILURE
    if not as_json:
        result = op["result"]
        tagged = f", tagged {tag}" if tag else ""
        print(f"saved as {result['version']} (digest {short_digest(result.get('digest'))}{tagged})")
        if result.get("left_out"):
            print(f"left out caches: {caches_text(result['left_out'])} (--keep-caches keeps them)", file=sys.stderr)
        for finding in result.get("allowed_secrets") or []:
            print(f"kept, as allowed: {finding['path']}: {', '.join(finding['found'])}", file=sys.stderr)
        if result.get("pushed"):
            print(f"pushed to the registry (digest {short_digest(result.get('registry_digest'))})", file=sys.stderr)
        elif result.get("pushed") is False:
            reason = (result.get("push_error") or {}).get("message", "")
            print(
                f"not pushed to the registry ({reason}); the version is kept here: "
                f"`envctl push {result['version']}` sends it later",
                file=sys.stderr,
            )
    return EXIT_OK


@click.command("import", cls=Command, short_help="Pin a stopped runtime to an environment version.")
@click.argument("ref", help="environment reference, e.g. acme/ml, acme/ml@2, acme/ml:stable")
@click.option("--runtime", required=True, metavar="RUNTIME", help="runtime id or name")
@client_options
def import_(api: Api, as_json: bool, ref: str, runtime: str) -> int:
    """Pin RUNTIME to the exact version REF means now (a tag or bare name is resolved once);
    the next start boots it. The runtime must be stopped and have no unsaved changes
    (save them or `envctl runtime reset` first)."""
    rt = api.runtime(runtime)
    new = api.call("PATCH", f"/runtimes/{rt['id']}", json={"environment": ref})
    if as_json:
        print_json(new)
    else:
        print(f"{new['name']} now uses {new['environment']} (asked for {new['environment_ref']})")
        if new["environment"] != rt["environment"]:
            print(f"  was {rt['environment']}; the next start boots the new version", file=sys.stderr)
    return EXIT_OK
