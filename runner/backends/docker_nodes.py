"""``GET /nodes`` for the local Docker backend: the one engine, as the Swarm backend shows a node."""

from __future__ import annotations

from typing import Any

import docker

from envs.images.docker import daemon_error
from runner.backends.base import LABEL_INSTALLATION, LABEL_RUNTIME


def the_engine(client: docker.DockerClient, installation: str) -> list[dict[str, Any]]:
    try:
        info = client.info()
        running = client.api.containers(filters={"label": [f"{LABEL_INSTALLATION}={installation}", LABEL_RUNTIME]})
    except Exception as exc:
        raise daemon_error("describe the Docker engine", exc) from exc
    labels = dict(str(item).partition("=")[::2] for item in info.get("Labels") or [])
    return [
        {
            "id": str(info.get("ID") or ""),
            "name": str(info.get("Name") or ""),
            "role": "engine",
            "address": "",
            "labels": labels,
            "capacity": {
                "nano_cpus": int(info.get("NCPU") or 0) * 1_000_000_000,
                "memory": int(info.get("MemTotal") or 0),
                "generic_resources": {},
            },
            "reserved": None,
            "health": {"state": "ready", "availability": "active", "message": ""},
            "engine": str(info.get("ServerVersion") or ""),
            "runtimes": sorted({str((c.get("Labels") or {}).get(LABEL_RUNTIME)) for c in running}),
        }
    ]
