"""What an installation holds on its Docker engine, and its removal (``envctl uninstall``).

An installation (one state store) owns, on the engine:

- its **containers**: every one labelled ``envctl.installation=<its id>`` (runtimes of all its
  runners, build and package containers);
- its **network** ``envctl-<id>`` and the firewall rules commented ``envctl:<id>``
  (runner/backends/netguard.py);
- the **images it alone holds**: the saves, builds and drafts its database records, recognised
  twice — by the database (a version's image and tag, a runtime's draft) and by the image's own
  labels (``envctl.source-runtime`` of a save, ``envctl.draft-of`` of a draft). Base images
  (``envctl.base-image``) are never touched, nor an image a container of anyone uses; an image
  that also carries a tag this installation did not make loses only this installation's tags;
- its **volumes** (runtime mounts' data), labelled with its id: removed only when asked;
- with the swarm backend, on the Swarm manager: its services (runtimes, the network guard),
  secrets, configs and network, and the guard's rules on every node
  (runner/backends/swarm_removal.py).

Nothing without the installation's identity is touched. The data directory (database,
results, secrets key) stays; the report says where it is. A runner of the installation that is
alive (its heartbeat fresh in the store) makes ``plan`` refuse: it would make them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from envs.images.docker import daemon_error
from envs.kit.clock import utcnow
from envs.kit.db import Database
from envs.kit.errors import BackendError, ConflictError
from envs.models import EnvironmentVersion
from runner.backends import docker_volumes as volumes
from runner.backends import netguard, swarm_removal
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED
from runner.backends.helpers import HELPER, installation_helpers
from runner.identity import Liveness
from runner.models import Installation, RunnerRecord, Runtime
from runner.settings import Settings

SAVE_LABEL = "envctl.source-runtime"  # on every save's (and build's) image
DRAFT_LABEL = "envctl.draft-of"  # on every draft's image
BASE_LABEL = "envctl.base-image"


@dataclass
class ImageFound:
    image_id: str
    what: str  # for people: "version acme/ml@3", "draft of runtime rt_…"
    tags: list[str]  # this installation's tags of it
    created: str = ""
    reason: str = ""  # why it is kept; "" when it goes

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image_id": self.image_id, "what": self.what, "tags": self.tags}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class Plan:
    """What ``carry_out`` removes; everything named carries the installation's identity."""

    installation: str
    data_dir: str
    containers: list[dict[str, str]] = field(default_factory=list)
    network: netguard.HeldNetwork | None = None
    images: list[ImageFound] = field(default_factory=list)
    kept_images: list[ImageFound] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    kept_volumes: list[str] = field(default_factory=list)
    swarm: swarm_removal.SwarmHoldings | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"swarm": self.swarm.to_dict()} if self.swarm is not None else {}),
            "installation": self.installation,
            "data_dir": self.data_dir,
            "containers": self.containers,
            "network": self.network.to_dict() if self.network else None,
            "images": [i.to_dict() for i in self.images],
            "kept_images": [i.to_dict() for i in self.kept_images],
            "volumes": self.volumes,
            "kept_volumes": self.kept_volumes,
        }


def refuse_if_serving(settings: Settings, db: Database) -> None:
    """``ConflictError`` when a runner of this installation beats its heartbeat: an
    ``envctl serve`` that would make containers and the network again while they go."""
    with db.session() as s:
        names = set(s.scalars(select(RunnerRecord.name)))
    alive = [r for r in Liveness(db, utcnow, settings.runner_stale_after, me="").of(names).values() if r.alive]
    if alive:
        raise ConflictError(
            "envctl serve of this installation is running ("
            + "; ".join(r.reason for r in alive)
            + "); stop it first, then run `envctl uninstall` again",
            details={"runners": [r.name for r in alive]},
        )


def recorded_installation(db: Database) -> str | None:
    """The installation's id, or None when it never had one (it never started: nothing of it
    can be on an engine). Unlike ``installation_id``, never makes one."""
    with db.session() as s:
        return s.scalar(select(Installation.id).where(Installation.key == "this"))


def plan(
    settings: Settings,
    db: Database,
    client: docker.DockerClient,
    installation: str,
    *,
    with_volumes: bool,
    swarm: tuple[docker.DockerClient, str] | None = None,
) -> Plan:
    """What ``installation`` (the one of ``db``) holds on the engine, as ``carry_out`` would
    remove it; ``swarm``: the Swarm manager's client and address, when runtimes run there."""
    fence = netguard.fence_of(installation)  # checks the id before it goes into any filter
    out = Plan(installation, str(settings.data_dir))
    try:
        listed = client.api.containers(all=True, filters={"label": f"{LABEL_INSTALLATION}={installation}"})
        # its save helpers carry its identity in their names, not labels (runner/backends/helpers.py)
        prefix = installation_helpers(installation)
        helpers = client.api.containers(all=True, filters={"label": f"{LABEL_MANAGED}={HELPER}"})
        listed += [c for c in helpers if any(n.lstrip("/").startswith(prefix) for n in c.get("Names") or [])]
    except Exception as exc:
        raise daemon_error("list the installation's containers", exc) from exc
    out.containers = [
        {
            "id": str(c["Id"]),
            "name": str((c.get("Names") or ["?"])[0]).lstrip("/"),
            "runtime": str((c.get("Labels") or {}).get("envctl.runtime-id", "")),
            "state": str(c.get("State") or ""),
        }
        for c in listed
    ]
    out.network = next((n for n in netguard.envctl_networks(client) if n.network == fence.network), None)
    for image in _recorded_images(db):
        if _judge_image(client, image, {c["id"] for c in out.containers}):
            (out.kept_images if image.reason else out.images).append(image)
    out.images.sort(key=lambda i: i.created, reverse=True)  # children before their parents
    names = [v.name for v in volumes.listed(client, installation)]
    (out.volumes if with_volumes else out.kept_volumes).extend(names)
    if swarm is not None:
        out.swarm = swarm_removal.listed(swarm[0], swarm[1], installation)
    return out


def _recorded_images(db: Database) -> list[ImageFound]:
    """Every image the database names as a version or a draft, with the tags it recorded."""
    found: dict[str, ImageFound] = {}
    with db.session() as s:
        versions = s.scalars(select(EnvironmentVersion).options(selectinload(EnvironmentVersion.environment)))
        for v in versions:
            image = found.setdefault(v.image_id, ImageFound(v.image_id, f"version {v.ref}", []))
            if v.image_ref and v.image_ref not in image.tags:
                image.tags.append(v.image_ref)
        for rid, draft in s.execute(
            select(Runtime.id, Runtime.draft_image_id).where(Runtime.draft_image_id.is_not(None))
        ):
            found.setdefault(str(draft), ImageFound(str(draft), f"draft of runtime {rid}", []))
    return list(found.values())


def _judge_image(client: docker.DockerClient, image: ImageFound, ours: set[str]) -> bool:
    """Fill in ``image.reason`` when it must stay, and its tags as the engine has them; False
    when the engine does not have the image."""
    try:
        info = client.api.inspect_image(image.image_id)
    except docker.errors.NotFound:
        return False
    except Exception as exc:
        raise daemon_error("look at the installation's images", exc) from exc
    labels = (info.get("Config") or {}).get("Labels") or {}
    image.created = str(info.get("Created") or "")
    present = list(info.get("RepoTags") or [])
    if labels.get(BASE_LABEL):  # a child has it too, emptied (envs/images/config.child_config)
        image.reason = "a base image"
    elif not (labels.get(SAVE_LABEL) or labels.get(DRAFT_LABEL)):
        image.reason = "not made by a save or a draft"
    if image.reason:
        return True
    if image.what.startswith("draft of "):  # a draft is tagged envctl-draft/<its runtime>:…
        runtime = image.what.removeprefix("draft of runtime ")
        image.tags = [t for t in present if t.startswith(f"envctl-draft/{runtime}:")]
    else:
        image.tags = [t for t in image.tags if t in present]
    try:
        users = client.api.containers(all=True, filters={"ancestor": image.image_id})
    except Exception as exc:
        raise daemon_error("look for containers of the installation's images", exc) from exc
    others = [c for c in users if c["Id"] not in ours and c.get("ImageID") == image.image_id]
    if others:
        image.reason = "used by container " + ", ".join(str((c.get("Names") or ["?"])[0]).lstrip("/") for c in others)
        return True
    foreign = [t for t in present if t not in image.tags]
    if foreign:
        image.reason = "also tagged " + ", ".join(foreign) + " (this installation's tags are removed)"
    return True


def carry_out(
    client: docker.DockerClient,
    plan: Plan,
    swarm_client: docker.DockerClient | None = None,
    labels: dict[str, str] | None = None,
    engine_socket: str = "",
) -> dict[str, Any]:
    """Remove what ``plan`` names, in order: the swarm's objects, containers, network and rules,
    images, volumes. Returns what went and what stayed (with why); a daemon fault stops it with
    BackendError. ``labels``: the runner's own, put on the swarm job that removes the rules;
    ``engine_socket``: the nodes' engines, for the config-only networks (``swarm_subnets``)."""
    done: dict[str, Any] = {"installation": plan.installation, "data_dir": plan.data_dir}
    if plan.swarm is not None and swarm_client is not None:
        done["swarm"] = swarm_removal.remove(swarm_client, plan.swarm, plan.installation, labels or {}, engine_socket)
    removed: list[dict[str, str]] = []
    for c in plan.containers:
        try:
            client.api.remove_container(c["id"], force=True, v=True)
        except docker.errors.NotFound:
            pass
        except Exception as exc:
            raise daemon_error("remove the installation's containers", exc) from exc
        removed.append(c)
    done["containers"] = removed
    try:  # the rules go in any case; without iptables (a network not fenced in) there are none
        netguard.remove_rules(netguard.fence_of(plan.installation))
        done["rules"] = "removed"
    except BackendError as exc:
        done["rules"] = f"not looked at: {exc.message}"
    network_gone = netguard.remove_network(client, plan.installation)
    done["network"] = plan.network.to_dict() if plan.network and network_gone else None
    done["network_kept"] = None if network_gone else "a container joined it meanwhile"
    images: list[dict[str, Any]] = []
    kept = [i.to_dict() for i in plan.kept_images]
    for image in plan.images:
        reason = _remove_image(client, image)
        (kept if reason else images).append({**image.to_dict(), **({"reason": reason} if reason else {})})
    for image in plan.kept_images:  # ours untagged; the image stays for its other tags
        if image.reason.startswith("also tagged"):
            for tag in image.tags:
                _remove_image(client, ImageFound(tag, image.what, []))
    done["images"], done["kept_images"] = images, kept
    gone_volumes, kept_volumes = [], list(plan.kept_volumes)
    for name in plan.volumes:
        try:
            volumes.remove(client, name, plan.installation)
            gone_volumes.append(name)
        except ConflictError as exc:
            kept_volumes.append(f"{name} ({exc.message})")
    done["volumes"], done["kept_volumes"] = gone_volumes, kept_volumes
    return done


def _remove_image(client: docker.DockerClient, image: ImageFound) -> str:
    """Remove the image by its tags (by id when it has none); "" or why the engine kept it."""
    try:
        for ref in image.tags or [image.image_id]:
            client.api.remove_image(ref, force=False, noprune=False)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code == 409:  # a child image or a container appeared: the engine keeps it
            return str(exc.explanation or exc)[:300]
        raise daemon_error("remove the installation's images", exc) from exc
    try:
        client.api.inspect_image(image.image_id)
    except docker.errors.NotFound:
        return ""
    except Exception as exc:
        raise daemon_error("look at the installation's images", exc) from exc
    return "untagged, but the engine keeps the image (another image is built on it)"
