"""Containers envctl did not start, read through the Docker SDK (runner/runtimes/attach.py): inspect
only; nothing here changes them."""

from __future__ import annotations

from typing import Any

import docker.errors

from envs.images.docker import daemon_error
from runner.backends.base import OtherContainer


def inspect(client: Any, container: str) -> OtherContainer | None:
    """The container by id or name; None when the engine has none of that name."""
    try:
        info = client.api.inspect_container(container)
    except docker.errors.NotFound:
        return None
    except docker.errors.APIError as exc:
        if exc.status_code in (400, 404):
            return None
        raise daemon_error("inspect the container", exc) from exc
    except Exception as exc:
        raise daemon_error("inspect the container", exc) from exc
    config = info.get("Config") or {}
    state = info.get("State") or {}
    env = {}
    for item in config.get("Env") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    return OtherContainer(
        id=info["Id"],
        name=str(info.get("Name") or "").lstrip("/"),
        labels=dict(config.get("Labels") or {}),
        running=bool(state.get("Running")) and not state.get("Paused"),
        pid=int(state.get("Pid") or 0),
        env=env,
        working_dir=config.get("WorkingDir") or "/",
        user=config.get("User") or "",
    )
