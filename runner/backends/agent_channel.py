"""The tcp agent channel on a Docker engine (runner/channel.py): the agent's arguments and the
address envctl dials."""

from __future__ import annotations

from typing import Any

import docker

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError, InvalidInputError
from runner.backends.base import AGENT_CREDENTIAL, AGENT_PORT, STATE_MOUNT


def arguments(channel: str) -> list[str]:
    """The agent's arguments for its channel: paths and a port, never the credential itself."""
    if channel == "unix":
        return []
    if channel == "tcp":
        return ["--listen", f"tcp:{AGENT_PORT}", "--credential", f"{STATE_MOUNT}/{AGENT_CREDENTIAL}"]
    raise InvalidInputError(f"unknown agent channel {channel!r}; known: unix, tcp", field="runner_channel")


def address(client: docker.DockerClient, cid: str) -> dict[str, Any]:
    """Where the started container's agent listens: its address on its network. The engine's
    host routes to it (a bridge's addresses are the host's neighbours); the network fence lets
    the replies to what the host opened through, and nothing a cell opens (netguard.py)."""
    try:
        info = client.api.inspect_container(cid)
    except Exception as exc:
        raise daemon_error("find the runtime's address", exc) from exc
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    for net in networks.values():
        if (net or {}).get("IPAddress"):
            return {"channel": "tcp", "host": str(net["IPAddress"]), "port": AGENT_PORT}
    raise BackendError(
        f"the runtime's container has no address on a network ({', '.join(networks) or 'none'}), so the tcp "
        "agent channel cannot reach it; use a bridge network or ENVCTL_RUNNER_CHANNEL=unix",
        details={"field": "runner_channel"},
    )
