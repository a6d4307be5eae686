"""``envctl publish|unpublish REF``, ``envctl catalog [QUERY]``, ``envctl team events TEAM`` and
``envctl registry gc``: what a team shares with every team, what it changes, and the registry's
garbage."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import httpx

from api.cli.client import Api, parse_sse, ref_path
from api.cli.errors import EXIT_OK
from api.cli.options import Group, client_options
from api.cli.output import human_bytes, listing, print_json, when, write_out

RECONNECT_AFTER = 1.0  # seconds before a dropped event stream is opened again


@click.command("publish")
@click.argument("ref", help="a version (acme/ml@3) or a tag (acme/ml:stable) of your team's environment")
@client_options
def publish(api: Api, as_json: bool, ref: str) -> int:
    """Publish a version or a tag: every team may then read, boot and import it (read only).
    A published tag publishes whichever version it points at, as it moves."""
    made = api.call("POST", f"/environments/{ref_path(ref)}/publish")
    if as_json:
        print_json(made)
    else:
        print(f"{made['ref']} is published (now {made['version']}); every team finds it with `envctl catalog`")
    return EXIT_OK


@click.command("unpublish")
@click.argument("ref", help="what was published: a version (acme/ml@3) or a tag (acme/ml:stable)")
@client_options
def unpublish(api: Api, as_json: bool, ref: str) -> int:
    """Unpublish a version or a tag. Refused while another team's versions or other users'
    runtimes depend on it (the error says which, or how many)."""
    api.call("DELETE", f"/environments/{ref_path(ref)}/publish")
    if as_json:
        print_json({"ref": ref, "published": False})
    else:
        print(f"{ref} is no longer published")
    return EXIT_OK


@click.command("catalog")
@click.argument("query", required=False, default="")
@client_options
def catalog(api: Api, as_json: bool, query: str) -> int:
    """What is published across teams, searched by name, description, message and packages."""

    def row(e: dict[str, Any]) -> dict[str, Any]:
        found = ", ".join(e["matched_packages"][:3])
        return {
            **e,
            "size_text": human_bytes(e["size"]),
            "published": f"{when(e['published_at'])} by {e['published_by']}",
            "about": (e["message"] or e["description"] or "-")[:60] + (f" [packages: {found}]" if found else ""),
        }

    return listing(
        api.call("GET", "/catalog", params={"q": query}),
        as_json,
        [
            ("ref", "published"),
            ("version", "version"),
            ("size_text", "size"),
            ("published", "published (UTC)"),
            ("about", "message"),
        ],
        row,
    )


@click.command("events")
@click.argument("team")
@click.option("--after", "after", metavar="ID", default="", help="start after this event id (resume)")
@click.option("--count", type=click.IntRange(min=1), default=None, help="stop after this many events")
@client_options
def team_events(api: Api, as_json: bool, team: str, after: str, count: int | None) -> int:
    """Follow a team's events: versions saved and deleted, tags moved, what is published and
    unpublished. Runs until Ctrl-C (or --count events); a dropped connection is opened again
    where it left off. --json prints one JSON object a line."""
    seen = 0
    last = after
    while count is None or seen < count:
        headers = {"Last-Event-ID": last} if last else {}
        try:
            with api.http.stream(
                "GET", f"/teams/{team}/events", headers=headers, timeout=httpx.Timeout(30, read=None)
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    api.raise_for(resp)
                for ev in parse_sse(resp.iter_lines()):
                    if ev.id is None:
                        continue
                    last = ev.id
                    _show(as_json, json.loads(ev.data))
                    seen += 1
                    if count is not None and seen >= count:
                        return EXIT_OK
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            click.echo(f"envctl: the event stream dropped ({exc.__class__.__name__}); reconnecting", err=True)
        except httpx.TransportError as exc:
            raise api.unreachable(exc) from exc
        time.sleep(RECONNECT_AFTER)
    return EXIT_OK


def _show(as_json: bool, event: dict[str, Any]) -> None:
    if as_json:
        write_out(json.dumps(event, separators=(",", ":")) + "\n", sys.stdout)
        return
    extra = {k: v for k, v in event.items() if k not in ("id", "kind", "environment", "ref", "at") and v}
    detail = "  ".join(f"{k}={v}" for k, v in extra.items())
    write_out(
        f"{event['id']:>6}  {when(event['at'])}  {event['kind']:<11}  {event['ref']}  {detail}".rstrip() + "\n",
        sys.stdout,
    )


@click.group("registry", cls=Group)
def registry() -> None:
    """The registry envctl runs (its garbage)."""


@registry.command("gc")
@client_options
def registry_gc(api: Api, as_json: bool) -> int:
    """Remove the blobs that no version's manifest names any more (what deleted versions left).
    The registry is read-only meanwhile: pulls go on, pushes wait. envctl admins only."""
    done = api.call("POST", "/registry/gc", timeout=3600)
    if as_json:
        print_json(done)
    else:
        freed = max(0, done["bytes_before"] - done["bytes_after"])
        print(
            f"registry gc: {done['blobs_deleted']} blobs removed ({human_bytes(freed)} freed), "
            f"{done['blobs_kept']} kept, in {done['seconds']:.1f} s"
        )
    return EXIT_OK
