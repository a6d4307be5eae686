"""``envctl env packages REF`` and ``envctl env diff OLD NEW``: the packages of a version and
how two versions differ (Debian packages and Python distributions)."""

from __future__ import annotations

from typing import Any

import click

from api.cli.client import Api, ref_path
from api.cli.errors import EXIT_OK
from api.cli.options import client_options
from api.cli.output import Styled, print_json, table


@click.command("packages")
@click.argument("ref", help="environment reference, e.g. python3 or acme/ml@3")
@click.option("--kind", type=click.Choice(["deb", "python"]), help="only this kind of package")
@client_options
def packages(api: Api, as_json: bool, ref: str, kind: str | None) -> int:
    """The Debian packages and Python distributions installed in a version."""
    found = api.call("GET", f"/environments/{ref_path(ref)}/packages")
    if as_json:
        print_json(found)
        return EXIT_OK
    kinds = [kind] if kind else ["deb", "python"]
    table(
        [{"kind": k, "name": p["name"], "version": p["version"]} for k in kinds for p in found[k]],
        [("kind", "kind"), ("name", "package"), ("version", "version")],
    )
    return EXIT_OK


@click.command("diff")
@click.argument("old", help="the version compared against, e.g. python3@1")
@click.argument("new", help="the version asked about, e.g. python3-jupyter@1")
@client_options
def diff(api: Api, as_json: bool, old: str, new: str) -> int:
    """What NEW adds (+), removes (-) and changes (~ old -> new) against OLD, by package."""
    found = api.call("GET", f"/environments/{ref_path(new)}/packages/diff", params={"against": old})
    if as_json:
        print_json(found)
        return EXIT_OK
    rows: list[dict[str, Any]] = []
    for kind in ("deb", "python"):
        d = found[kind]
        rows += [
            {"kind": kind, "change": Styled("+", "green"), "name": p["name"], "version": p["version"]}
            for p in d["added"]
        ]
        rows += [
            {"kind": kind, "change": Styled("-", "red"), "name": p["name"], "version": p["version"]}
            for p in d["removed"]
        ]
        rows += [
            {"kind": kind, "change": Styled("~", "yellow"), "name": c["name"], "version": f"{c['old']} -> {c['new']}"}
            for c in d["changed"]
        ]
    print(f"{found['against']} -> {found['ref']}")
    table(rows, [("change", ""), ("kind", "kind"), ("name", "package"), ("version", "version")])
    return EXIT_OK
