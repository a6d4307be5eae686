"""``envctl secret set|list|rm``: a team's secrets. A value is read from stdin or a hidden
prompt, never from the command line (where ``ps`` and shell history would show it), and is
never printed."""

from __future__ import annotations

import sys
from typing import Any

import click

from api.cli.client import Api
from api.cli.errors import EXIT_BAD_INPUT, EXIT_OK, CliError
from api.cli.options import DefaultGroup, client_options
from api.cli.output import listing, print_json, when


@click.group("secret", cls=DefaultGroup)
def secret() -> None:
    """A team's secrets, used by runtimes as variables and files (`envctl runtime set NAME
    --secret VAR=SECRET`). `envctl secret TEAM` is short for `envctl secret list TEAM`."""


@secret.command("list")
@click.argument("team", help="the team")
@client_options
def secret_list(api: Api, as_json: bool, team: str) -> int:
    """A team's secrets: names, versions and times, never values."""
    rows = api.call("GET", f"/teams/{team}/secrets")
    return listing(
        rows,
        as_json,
        [("name", "name"), ("version", "version"), ("updated", "updated (UTC)"), ("created", "created (UTC)")],
        lambda s: {**s, "updated": when(s["updated_at"]), "created": when(s["created_at"])},
    )


@secret.command("set")
@click.argument("team", help="the team")
@click.argument("name", help="the secret's name: letters, digits, . _ -")
@client_options
def secret_set(api: Api, as_json: bool, team: str, name: str) -> int:
    """Set a secret: its value is read from stdin when piped (one trailing newline dropped),
    else asked for without echo. Runtimes using it get the new value at their next boot."""
    if sys.stdin.isatty():
        value = click.prompt(f"value of {team}/{name}", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
    if not value:
        raise CliError("no value given: pipe it in, or type it at the prompt", EXIT_BAD_INPUT)
    made: dict[str, Any] = api.call("PUT", f"/teams/{team}/secrets/{name}", json={"value": value})
    if as_json:
        print_json(made)
    else:
        print(f"secret {team}/{name} set (version {made['version']}); runtimes using it get it at their next boot")
    return EXIT_OK


@secret.command("rm")
@click.argument("team", help="the team")
@click.argument("name", help="the secret")
@client_options
def secret_rm(api: Api, as_json: bool, team: str, name: str) -> int:
    """Delete a secret. Runtimes using it cannot boot until it is set again or they stop using it."""
    api.call("DELETE", f"/teams/{team}/secrets/{name}")
    data = {"team": team, "removed": name}
    if as_json:
        print_json(data)
    else:
        print(f"secret {team}/{name} deleted")
    return EXIT_OK
