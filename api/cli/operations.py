"""Following long work the API answers with an operation (202): a save, a build."""

from __future__ import annotations

import sys
from typing import Any

from api.cli.client import Api
from api.cli.output import Progress

OPERATION_WAIT = 2.0  # seconds one GET /operations/{id}?wait= may hold


def op_text(op: dict[str, Any]) -> str:
    return f"{op['phase']}: {op['message']}" if op.get("message") else str(op["phase"])


def op_failure(op: dict[str, Any], what: str) -> str:
    error = op.get("error") or {}
    return f"{what} failed: {error.get('message') or op.get('message') or 'no reason given'}"


def stopped_following(op: dict[str, Any], what: str = "operation") -> None:
    """Ctrl-C while following: the work goes on on the server; say where to look."""
    print(
        f"\nenvctl: stopped following {what} {op['id']}; it goes on (GET /operations/{op['id']} shows it)",
        file=sys.stderr,
    )


def follow_operation(api: Api, op: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    """Poll an operation until it succeeds or fails, showing its phase and message (and a bar
    of bytes when its result counts them: ``done`` of ``total``, as pushes and pulls do)."""
    with Progress(quiet) as progress:
        # On a terminal shorter waits keep the spinner and the clock moving.
        wait = 0.5 if progress.live else OPERATION_WAIT
        try:
            while op["status"] == "running":
                counted = op.get("result") or {}
                if counted.get("total") and progress.live:
                    progress.transfer(op_text(op), int(counted.get("done") or 0), int(counted["total"]))
                else:
                    progress.update(op_text(op))
                op = api.call("GET", f"/operations/{op['id']}", params={"wait": wait})
        except KeyboardInterrupt:
            progress.clear()
            stopped_following(op)
            raise
    return op
