"""``envctl login``, ``envctl user create``, ``envctl team create|list|add-member|remove-member``
and ``envctl token create|list|revoke``: who the CLI is, users, teams, and API tokens."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import yaml

from api.cli.client import DEFAULT_URL, Api, _client_config, config_file
from api.cli.errors import EXIT_BAD_INPUT, EXIT_OK, CliError
from api.cli.options import DefaultGroup, Group, client_options
from api.cli.output import listing, print_json, when


@click.command("login")
@click.option("--url", metavar="URL", help=f"envctl API (default: ENVCTL_URL, the config file, {DEFAULT_URL})")
@click.option("--token", metavar="TOKEN", help="API token (default: asked for, or read from stdin when piped)")
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
def login(url: str | None, token: str | None, as_json: bool) -> int:
    """Check a server URL and an API token, and keep both in the config file
    (~/.config/envctl/config.yaml) where every command finds them."""
    conf = _client_config()
    url = str(url or os.environ.get("ENVCTL_URL") or conf.get("url") or DEFAULT_URL).rstrip("/")
    if not token:
        token = click.prompt("API token", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
    token = (token or "").strip()
    if not token:
        raise CliError("no token given: pass --token, or type or pipe one in", EXIT_BAD_INPUT)
    api = Api(url, token)
    try:
        me: dict[str, Any] = api.call("GET", "/users/me")
    finally:
        api.close()
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)  # the token is a secret: only its owner reads the file
    path.write_text(yaml.safe_dump({**conf, "url": url, "token": token}, sort_keys=False))
    data = {"url": url, "user": me["name"], "admin": me["admin"], "teams": me["teams"], "config": str(path)}
    teams = ", ".join(me["teams"]) or "none"
    return _say(as_json, data, f"logged in to {url} as {me['name']} (teams: {teams}); kept in {path}")


@click.group("user", cls=Group)
def user() -> None:
    """Users (envctl admins make them)."""


@user.command("create")
@click.argument("name", help="user name: lower-case letters, digits, . _ -")
@click.option("--admin", is_flag=True, help="an envctl admin (acts on every team and environment)")
@click.option(
    "--expires-in", "days", type=int, default=90, show_default=True, metavar="DAYS", help="first token's life"
)
@client_options
def user_create(api: Api, as_json: bool, name: str, admin: bool, days: int) -> int:
    """Make a user; their first API token is printed this once, alone on stdout."""
    made = api.call("POST", "/users", json={"name": name, "admin": admin, "expires_in_days": days})
    if as_json:
        print_json(made)
        return EXIT_OK
    print(made["token"])
    print(f"user {made['name']} made; give them this token (shown once): `envctl login --token ...`", file=sys.stderr)
    return EXIT_OK


def _say(as_json: bool, data: Any, text: str) -> int:
    """``data`` as JSON for scripts, else ``text`` for people."""
    if as_json:
        print_json(data)
    else:
        print(text)
    return EXIT_OK


# --------------------------------------------------------------------------- teams


@click.group("team", cls=DefaultGroup)
def team() -> None:
    """Teams: each is the namespace of its environments (acme/ml). `envctl team` is short for
    `envctl team list`."""


def _members(t: dict[str, Any]) -> str:
    return ", ".join(f"{m['user']} ({m['role']})" for m in t["members"])


@team.command("list")
@client_options
def team_list(api: Api, as_json: bool) -> int:
    """Your teams with their members (every team for an envctl admin)."""
    rows = api.call("GET", "/teams")
    return listing(
        rows,
        as_json,
        [("name", "team"), ("role", "your role"), ("members_text", "members"), ("created", "created (UTC)")],
        lambda t: {**t, "members_text": _members(t), "created": when(t["created_at"])},
    )


@team.command("create")
@click.argument("name", help="team name: lower-case letters, digits, . _ -")
@client_options
def team_create(api: Api, as_json: bool, name: str) -> int:
    """Create a team; you are its first admin."""
    made = api.call("POST", "/teams", json={"name": name})
    return _say(
        as_json,
        made,
        f"team {made['name']} created; you are its admin. Environments named {made['name']}/NAME are the team's.",
    )


@team.command("add-member")
@click.argument("name", help="the team")
@click.argument("user", help="the user to add (or whose role to change)")
@click.option("--role", type=click.Choice(["member", "admin"]), default="member", show_default=True)
@client_options
def team_add_member(api: Api, as_json: bool, name: str, user: str, role: str) -> int:
    """Add a user to a team, or change their role (team admins only)."""
    member = api.call("POST", f"/teams/{name}/members", json={"user": user, "role": role})
    return _say(as_json, member, f"{member['user']} is {member['role']} of team {name}")


@team.command("remove-member")
@click.argument("name", help="the team")
@click.argument("user", help="the user to remove (yourself to leave)")
@client_options
def team_remove_member(api: Api, as_json: bool, name: str, user: str) -> int:
    """Take a user out of a team (team admins only; anyone may remove themselves)."""
    api.call("DELETE", f"/teams/{name}/members/{user}")
    return _say(as_json, {"team": name, "removed": user}, f"{user} is no longer in team {name}")


# --------------------------------------------------------------------------- tokens


@click.group("token", cls=Group)
def token() -> None:
    """Your API tokens: made (shown once), listed, revoked."""


def _state(t: dict[str, Any]) -> str:
    if t["revoked_at"]:
        return "revoked"
    return "active" if t["active"] else "expired"


@token.command("list")
@client_options
def token_list(api: Api, as_json: bool) -> int:
    """Your tokens, revoked and expired ones too (never the tokens themselves)."""
    rows = api.call("GET", "/tokens")
    return listing(
        rows,
        as_json,
        [
            ("id", "id"),
            ("description", "description"),
            ("state", "state"),
            ("created", "created (UTC)"),
            ("expires", "expires (UTC)"),
        ],
        lambda t: {**t, "state": _state(t), "created": when(t["created_at"]), "expires": when(t["expires_at"])},
    )


@token.command("create")
@click.option("-d", "--description", default="", metavar="TEXT", help="what the token is for, e.g. laptop")
@click.option("--expires-in", "days", type=int, default=90, show_default=True, metavar="DAYS", help="days it lives")
@client_options
def token_create(api: Api, as_json: bool, description: str, days: int) -> int:
    """Make a token. It is printed this once; keep it (`envctl login --token` stores it)."""
    made = api.call("POST", "/tokens", json={"description": description, "expires_in_days": days})
    if as_json:
        print_json(made)
        return EXIT_OK
    print(made["token"])  # alone on stdout: TOKEN=$(envctl token create) works
    print(
        f"token {made['id']}, expires {when(made['expires_at'])} UTC; this is the only time it is shown",
        file=sys.stderr,
    )
    return EXIT_OK


@token.command("revoke")
@click.argument("token_id", help="the token's id (the ID column of `envctl token list`)")
@client_options
def token_revoke(api: Api, as_json: bool, token_id: str) -> int:
    """Revoke one of your tokens; it is refused from now on."""
    revoked = api.call("DELETE", f"/tokens/{token_id}")
    return _say(as_json, revoked, f"token {revoked['id']} revoked")
