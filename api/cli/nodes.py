"""``envctl nodes [list|drain|activate]``: the machines runtimes run on, their capacity, health and
runtimes; draining one (its runtimes stopped with their drafts first) and activating it again."""

from __future__ import annotations

from typing import Any

import click

from api.cli.client import Api
from api.cli.errors import EXIT_OK
from api.cli.options import DefaultGroup, client_options
from api.cli.output import human_bytes, listing, print_json

DRAIN_TIMEOUT = 600.0  # seconds the drain request may take: each runtime's draft is pushed first


def _row(n: dict[str, Any]) -> dict[str, Any]:
    cap, health = n["capacity"], n["health"]
    generic = ", ".join(f"{k}={v}" for k, v in sorted((cap.get("generic_resources") or {}).items()))
    state = f"{health['state']}/{health['availability']}" + (f" ({health['message']})" if health.get("message") else "")
    hidden = n["runtimes_total"] - len(n["runtimes"])
    runs = ", ".join(n["runtimes"]) + (f" (+{hidden} not yours)" if hidden else "")
    return {
        **n,
        "cpus": f"{cap['nano_cpus'] / 1e9:g}",
        "memory": human_bytes(cap["memory"]),
        "generic": generic or "-",
        "state": state,
        "labels_text": ", ".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-",
        "runs": runs or "-",
    }


@click.group("nodes", cls=DefaultGroup)
def nodes() -> None:
    """The nodes runtimes run on. `envctl nodes` is short for `envctl nodes list`."""


@nodes.command("list")
@client_options
def nodes_list(api: Api, as_json: bool) -> int:
    """List the nodes runtimes run on: role, health, capacity, labels, runtimes."""
    return listing(
        api.call("GET", "/nodes"),
        as_json,
        [
            ("name", "name"),
            ("role", "role"),
            ("state", "health"),
            ("cpus", "cpus"),
            ("memory", "memory"),
            ("generic", "generic"),
            ("labels_text", "labels"),
            ("runs", "runtimes"),
        ],
        _row,
    )


def _availability(api: Api, as_json: bool, name: str, action: str) -> int:
    done: dict[str, Any] = api.call("POST", f"/nodes/{name}/{action}", timeout=DRAIN_TIMEOUT)
    if as_json:
        print_json(done)
        return EXIT_OK
    stopped = done.get("stopped") or []
    if stopped:
        print(f"stopped {len(stopped)} runtimes with their drafts: {', '.join(stopped)}")
    print(f"node {done['node']} is now {done['availability']}")
    return EXIT_OK


@nodes.command("drain")
@click.argument("name", help="the node's name (as `envctl nodes` shows it) or id")
@client_options
def nodes_drain(api: Api, as_json: bool, name: str) -> int:
    """Drain a node (admins): its runtimes of this envctl are stopped with their unsaved changes
    kept as drafts (their next boot lands elsewhere and restores them), then Swarm takes no new
    task there and stops what else runs on it. Undo with `envctl nodes activate NAME`."""
    return _availability(api, as_json, name, "drain")


@nodes.command("activate")
@click.argument("name", help="the node's name or id")
@client_options
def nodes_activate(api: Api, as_json: bool, name: str) -> int:
    """Make a drained (or paused) node take runtimes again (admins)."""
    return _availability(api, as_json, name, "activate")
