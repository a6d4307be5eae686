"""``envctl push REF`` and ``envctl pull REF``: a version to or from the registry, with a
progress bar of the bytes that travel (``follow_operation`` draws it from the operation)."""

from __future__ import annotations

import sys

import click

from api.cli.client import Api, ref_path
from api.cli.errors import EXIT_FAILURE, EXIT_OK
from api.cli.operations import follow_operation, op_failure
from api.cli.options import Command, client_options
from api.cli.output import human_bytes, print_json, short_digest


def _transfer(api: Api, as_json: bool, ref: str, kind: str) -> int:
    op = api.call("POST", f"/environments/{ref_path(ref)}/{kind}")
    op = follow_operation(api, op, quiet=as_json)
    if as_json:
        print_json(op)
    if op["status"] != "succeeded":
        if not as_json:
            print("envctl: " + op_failure(op, f"{kind} of {ref}"), file=sys.stderr)
        return EXIT_FAILURE
    if not as_json:
        result = op["result"]
        if kind == "pull" and not result.get("pulled"):
            print(f"{result['version']} is already here")
        else:
            verb = "pushed" if kind == "push" else "pulled"
            print(
                f"{verb} {result['version']} (registry digest {short_digest(result.get('registry_digest'))}, "
                f"{human_bytes(int(result.get('bytes') or 0))} travelled)"
            )
    return EXIT_OK


@click.command("push", cls=Command, short_help="Push a version to the registry.")
@click.argument("ref", help="a version: acme/ml, acme/ml@3, acme/ml:stable")
@client_options
def push(api: Api, as_json: bool, ref: str) -> int:
    """Push the version REF names (acme/ml, acme/ml@3, acme/ml:stable) to the registry; only
    the layers the registry lacks travel. A save into a team's environment pushes by itself;
    this sends one whose push failed. Exit 0 when pushed, 1 when the push failed."""
    return _transfer(api, as_json, ref, "push")


@click.command("pull", cls=Command, short_help="Pull a version from the registry.")
@click.argument("ref", help="a version: acme/ml, acme/ml@3, acme/ml:stable")
@client_options
def pull(api: Api, as_json: bool, ref: str) -> int:
    """Pull the version REF names from the registry, by the digest the catalog recorded (never
    by tag) and checked, so that runtimes boot from it without waiting. Exit 0 when it is here,
    1 when the pull failed."""
    return _transfer(api, as_json, ref, "pull")
