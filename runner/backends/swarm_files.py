"""What a Swarm runtime's task is handed as files: the agent's code as Swarm configs (one per file,
named by content, shared by the installation's runtimes) and its per-boot credential as a Swarm
secret (an in-memory file of the task, never in the service's spec, a variable or a label)."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors

from envs.images.docker import daemon_error
from runner.backends.base import (
    AGENT_MOUNT,
    LABEL_INSTALLATION,
    LABEL_MANAGED,
    LABEL_RUNTIME,
    STATE_MOUNT,
    RuntimeSpec,
)

AGENT_DIR = Path(__file__).resolve().parents[1] / "agent"
CREDENTIAL_PATH = f"{STATE_MOUNT}/agent.key"  # where the agent reads it (agent_channel.arguments)


def agent_configs(client: docker.DockerClient, installation: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The agent's files as Swarm configs, made once per content (names carry its hash),
    labelled with the installation; references for a task's ``Configs``."""
    refs = []
    for path in sorted(AGENT_DIR.glob("*.py")):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        name = f"envctl-agent-{installation[:12]}-{path.stem[:20]}-{digest}"
        try:
            found = client.api.configs(filters={"name": name})
            exact = [c for c in found if (c.get("Spec") or {}).get("Name") == name]
            if exact:
                cid = str(exact[0]["ID"])
            else:
                made = {**labels, LABEL_INSTALLATION: installation, LABEL_MANAGED: "agent"}
                cid = str(client.api.create_config(name, data, labels=made)["ID"])
        except docker.errors.APIError as exc:
            if "already exists" not in str(exc):  # another server of the installation made it
                raise daemon_error("ship the agent's code as a config", exc) from exc
            cid = str(client.api.configs(filters={"name": name})[0]["ID"])
        except Exception as exc:
            raise daemon_error("ship the agent's code as a config", exc) from exc
        refs.append(
            {
                "ConfigID": cid,
                "ConfigName": name,
                "File": {"Name": f"{AGENT_MOUNT}/{path.name}", "UID": "0", "GID": "0", "Mode": 0o444},
            }
        )
    return refs


def credential_secret(client: docker.DockerClient, spec: RuntimeSpec, labels: dict[str, str]) -> dict[str, Any]:
    """A secret made for this boot holding the credential line; the task's reference to it."""
    name = f"envctl-{spec.runtime_id}-{uuid.uuid4().hex[:10]}"
    made = {**labels, **spec.labels, LABEL_RUNTIME: spec.runtime_id, LABEL_MANAGED: "credential"}
    try:
        sid = str(client.api.create_secret(name, spec.credential, labels=made)["ID"])
    except Exception as exc:
        raise daemon_error("hand the runtime its credential as a secret", exc) from exc
    return {
        "SecretID": sid,
        "SecretName": name,
        "File": {"Name": CREDENTIAL_PATH, "UID": "0", "GID": "0", "Mode": 0o400},
    }


def remove_secret(client: docker.DockerClient, secret_id: str, what: str, bound: float, poll: float) -> None:
    """Remove a secret, waiting up to ``bound`` seconds while a task that is going still holds it
    ("in use"); one already gone is fine. ``what`` names it in the error, e.g. "the runtime's
    credential secret"."""
    deadline = time.monotonic() + bound
    while True:
        try:
            client.api.remove_secret(secret_id)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if "in use" not in str(exc) or time.monotonic() > deadline:
                raise daemon_error(f"remove {what}", exc) from exc
            time.sleep(poll)
        except Exception as exc:
            raise daemon_error(f"remove {what}", exc) from exc
