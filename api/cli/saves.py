"""``envctl save RUNTIME --as NAME`` and ``envctl import REF --runtime RUNTIME``."""

from __future__ import annotations

import sys
from typing import Any

import click

from api.cli.client import Api
from api.cli.errors import EXIT_FAILURE, EXIT_OK
from api.cli.operations import follow_operation, op_failure
from api.cli.options import Command, client_options
from api.cli.output import print_json, short_digest


@click.command("save", cls=Command, short_help="Save a running runtime as the next version of an environment.")
@click.argument("runtime", help="runtime id or name")
@click.option("--as", "environment", required=True, metavar="NAME", help="environment, e.g. acme/ml")
@click.option("-m", "--message", default="", help="what this version adds")
@click.option("--tag", metavar="TAG", help="a tag to point at the new version too (latest always moves)")
@client_options
def save(api: Api, as_json: bool, runtime: str, environment: str, message: str, tag: str | None) -> int:
    """Snapshot RUNTIME (it must be running) as the next version of the environment NAME
    ([team/]name); its parent is the version the runtime booted from. The runtime stays on its
    version; `envctl import` moves it. Exit 0 when saved, 1 when the save failed, 2 on bad input."""
    rt = api.runtime(runtime)
    body: dict[str, Any] = {"environment": environment, "message": message}
    if tag is not None:
        body["tag"] = tag
    op = api.call("POST", f"/runtimes/{rt['id']}/save", json=body)
    op = follow_operation(api, op, quiet=as_json)
    if as_json:
        print_json(op)
    if op["status"] != "succeeded":
        print("envctl: " + op_failure(op, f"saving {rt['name']}"), file=sys.stderr)
        return EXIT_FAILURE
    if not as_json:
        result = op["result"]
        tagged = f", tagged {tag}" if tag else ""
        print(f"saved as {result['version']} (digest {short_digest(result.get('digest'))}{tagged})")
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
