"""``envctl push REF`` and ``envctl pull REF``: a version to or from the registry, with a
progress bar of the bytes that travel (``follow_operation`` draws it from the operation);
``envctl pull REF --from URL`` imports a version from another envctl server."""

from __future__ import annotations

import sys
from typing import Any

import click

from api.cli.client import Api, ref_path
from api.cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, CliError
from api.cli.operations import follow_operation, op_failure
from api.cli.options import Command, client_options
from api.cli.output import human_bytes, print_json, short_digest


def _transfer(api: Api, as_json: bool, ref: str, kind: str) -> int:
    op = api.call("POST", f"/environments/{ref_path(ref)}/{kind}")
    return _finish(api, as_json, op, f"{kind} of {ref}", kind)


def _finish(api: Api, as_json: bool, op: dict[str, Any], what: str, kind: str) -> int:
    op = follow_operation(api, op, quiet=as_json)
    if as_json:
        print_json(op)
    if op["status"] != "succeeded":
        if not as_json:
            print("envctl: " + op_failure(op, what), file=sys.stderr)
        return EXIT_FAILURE
    if not as_json:
        print(_done_text(kind, op["result"]))
    return EXIT_OK


def _done_text(kind: str, result: dict[str, Any]) -> str:
    travelled = f"{human_bytes(int(result.get('bytes') or 0))} travelled"
    if kind == "import":
        how = "new here" if result.get("new") else "already recorded here"
        return f"imported {result['upstream_ref']} from {result['from']} as {result['version']} ({how}, {travelled})"
    if kind == "pull" and not result.get("pulled"):
        return f"{result['version']} is already here"
    verb = "pushed" if kind == "push" else "pulled"
    return f"{verb} {result['version']} (registry digest {short_digest(result.get('registry_digest'))}, {travelled})"


@click.command("push", cls=Command, short_help="Push a version to the registry.")
@click.argument("ref", help="a version: acme/ml, acme/ml@3, acme/ml:stable")
@client_options
def push(api: Api, as_json: bool, ref: str) -> int:
    """Push the version REF names (acme/ml, acme/ml@3, acme/ml:stable) to the registry; only
    the layers the registry lacks travel. A save into a team's environment pushes by itself;
    this sends one whose push failed. Exit 0 when pushed, 1 when the push failed."""
    return _transfer(api, as_json, ref, "push")


@click.command("pull", cls=Command, short_help="Pull a version from the registry, or import one from another envctl.")
@click.argument("ref", help="a version: acme/ml, acme/ml@3, acme/ml:stable")
@click.option(
    "--from",
    "upstream",
    metavar="URL",
    help="import REF from the envctl server at URL: pulled from its registry and recorded here",
)
@click.option(
    "--from-token",
    metavar="TOKEN",
    envvar="ENVCTL_FROM_TOKEN",
    help="your API token on the --from server (default: ENVCTL_FROM_TOKEN)",
)
@click.option("--as", "name", metavar="NAME", help="with --from: the environment here (default: REF's name)")
@client_options
def pull(api: Api, as_json: bool, ref: str, upstream: str | None, from_token: str | None, name: str | None) -> int:
    """Pull the version REF names from the registry, by the digest the catalog recorded (never
    by tag) and checked, so that runtimes boot from it without waiting. With --from URL, import
    it from another envctl server instead (its registry, your token there): the version is
    recorded here with where it came from. Exit 0 when it is here, 1 when the pull failed."""
    if upstream is None:
        if name is not None or from_token is not None:
            raise CliError("--as and --from-token go with --from URL", exit_code=EXIT_BAD_INPUT)
        return _transfer(api, as_json, ref, "pull")
    if not from_token:
        raise CliError(
            "--from needs your API token on that server: --from-token or ENVCTL_FROM_TOKEN", exit_code=EXIT_BAD_INPUT
        )
    body = {"from": upstream, "ref": ref, "token": from_token, "name": name}
    op = api.call("POST", "/environments/import-remote", json=body)
    return _finish(api, as_json, op, f"import of {ref} from {upstream}", "import")
