"""``envctl volume ls|create|rm``: named persistent volumes for runtime mounts."""

from __future__ import annotations

from urllib.parse import quote

import click

from api.cli.client import Api
from api.cli.errors import EXIT_OK
from api.cli.options import DefaultGroup, client_options
from api.cli.output import listing, print_json


@click.group("volume", cls=DefaultGroup)
def volume() -> None:
    """Named volumes that outlive runtimes: NAME (yours) or TEAM/NAME (a team's). Mount one with
    `envctl runtime set NAME --mount volume:VOLUME:/target`. `envctl volume` is short for
    `envctl volume ls`."""


@volume.command("ls")
@client_options
def volume_ls(api: Api, as_json: bool) -> int:
    """Your volumes and your teams'."""
    return listing(
        api.call("GET", "/volumes"),
        as_json,
        [("name", "name"), ("owner", "owner"), ("users", "mounted by")],
        lambda v: {**v, "users": ", ".join(v["used_by"]) or "-"},
    )


@volume.command("create")
@click.argument("name", help="NAME or TEAM/NAME: lower-case letters, digits, _ . -")
@client_options
def volume_create(api: Api, as_json: bool, name: str) -> int:
    """Make a volume."""
    made = api.call("POST", "/volumes", json={"name": name})
    print_json(made) if as_json else print(f"volume {made['name']} created ({made['owner']})")
    return EXIT_OK


@volume.command("rm")
@click.argument("name")
@client_options
def volume_rm(api: Api, as_json: bool, name: str) -> int:
    """Delete a volume and its data (refused while a runtime's mounts name it)."""
    api.call("DELETE", f"/volumes/{quote(name, safe='/')}")
    print_json({"deleted": name}) if as_json else print(f"volume {name} deleted")
    return EXIT_OK
