"""``envctl nodes``: the machines runtimes run on, their capacity, health and runtimes."""

from __future__ import annotations

from typing import Any

import click

from api.cli.client import Api
from api.cli.options import Command, client_options
from api.cli.output import human_bytes, listing


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


@click.command("nodes", cls=Command)
@client_options
def nodes(api: Api, as_json: bool) -> int:
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
