"""What several benchmarks do through the public API: boot a runtime and wait for it, run a cell
and check it ended ok."""

from __future__ import annotations

from typing import Any

import httpx


def booted(client: httpx.Client, name: str) -> str:
    """A new python3 runtime, started and running; its id."""
    rid: str = client.post("/runtimes", json={"environment": "python3", "name": name}).json()["id"]
    rt = client.post(f"/runtimes/{rid}/start", params={"wait": 60}).json()
    assert rt["state"] == "running", rt
    return rid


def cell(client: httpx.Client, url: str, code: str = "1+1") -> None:
    """A cell posted to ``url`` (a runtime's executions), answered when it ends; it must be ok."""
    body: dict[str, Any] = client.post(url, params={"wait": 30}, json={"code": code}).json()
    assert body["status"] == "ok", body
