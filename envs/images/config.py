"""Image configurations as plain data: the trusted template of a child image and its check.

An image's configuration never comes from the container it was committed from (R10: a plain
``docker commit`` copies the container's environment, entrypoint, user, working directory
and labels). It is made from a template instead, and what the engine made is checked against
that template before anyone may use the image. Everything here is a pure function over the
dictionaries ``docker image inspect`` answers with (its ``Config`` part); tests use plain dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The fields of an image configuration a template sets, and that a child takes from its parent.
CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User")
#: Fields no template sets: a made image must have none of them (a container's volumes, ports,
#: build triggers, health check or shell would otherwise ride along into every child).
UNSET_KEYS = ("Volumes", "ExposedPorts", "OnBuild", "Healthcheck", "Shell")
#: Labels in envctl's namespace say what one image *is*; a child does not inherit their values.
ENVCTL_LABEL_PREFIX = "envctl."


@dataclass(frozen=True)
class ImageInfo:
    id: str  # the image id, as ``docker image inspect`` reports it ("sha256:...")
    size: int  # bytes, all layers
    layers: int  # number of filesystem layers
    config: dict[str, Any]  # CONFIG_KEYS, Labels and UNSET_KEYS (None when absent)


def image_info(attrs: Mapping[str, Any]) -> ImageInfo:
    """The ImageInfo of an image from its ``docker image inspect`` answer."""
    config = attrs.get("Config") or {}
    return ImageInfo(
        id=str(attrs["Id"]),
        size=int(attrs.get("Size") or 0),
        layers=len((attrs.get("RootFS") or {}).get("Layers") or []),
        config={key: config.get(key) for key in (*CONFIG_KEYS, "Labels", *UNSET_KEYS)},
    )


def child_config(parent_config: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """The trusted configuration of an image made on top of an image configured ``parent_config``.

    ``parent_config`` is the parent image's ``Config`` (from ``docker image inspect``, or an
    ImageInfo's ``config``); ``labels`` are the new image's own. The child keeps the parent's
    CONFIG_KEYS (Env, Cmd, Entrypoint, WorkingDir, User) and its labels outside the ``envctl.``
    namespace; the parent's ``envctl.*`` labels say what the parent is, so they are given empty
    values (the engine would otherwise merge them back in from the container); ``labels`` go
    over both. Nothing of the UNSET_KEYS is carried over. Returns a new dict; the inputs are
    left unchanged.
    """
    config: dict[str, Any] = {key: _copy(parent_config.get(key)) for key in CONFIG_KEYS}
    parent_labels: Mapping[str, str] = parent_config.get("Labels") or {}
    inherited = {k: v for k, v in parent_labels.items() if not k.startswith(ENVCTL_LABEL_PREFIX)}
    neutral = {k: "" for k in parent_labels if k.startswith(ENVCTL_LABEL_PREFIX)}
    config["Labels"] = {**inherited, **neutral, **labels}
    return config


def blank_other_labels(template: Mapping[str, Any], container_labels: Mapping[str, str]) -> dict[str, Any]:
    """``template`` with an empty value for every label of the container it does not name.

    ``docker commit`` merges the container's labels into the image's unless the given
    configuration names them; an empty value is the closest to "absent" the engine allows.
    """
    labels: dict[str, str] = dict(template.get("Labels") or {})
    blanks = {key: "" for key in container_labels if key not in labels}
    return {**template, "Labels": {**blanks, **labels}}


def config_differences(actual: Mapping[str, Any], template: Mapping[str, Any]) -> list[str]:
    """The fields in which an image's configuration ``actual`` differs from ``template``.

    Empty when the image may be used. ``actual`` is the image's ``Config``; both are compared
    field by field, an empty value (``None``, ``""``, ``[]``, ``{}``) standing for an absent
    one:

    - Env (in order, so the same variable twice resolves alike), Cmd, Entrypoint, WorkingDir and
      User must equal the template's;
    - Labels must be exactly the template's: none missing, none changed, none added (each
      difference is named ``Labels[key]``);
    - Volumes, ExposedPorts, OnBuild, Healthcheck and Shell must be what the template says,
      which for every template envctl makes is nothing.

    Fields envctl does not control and that change nothing in what runs (Hostname,
    StopSignal, ...) are not compared.
    """
    wrong = [key for key in (*CONFIG_KEYS, *UNSET_KEYS) if _norm(actual.get(key)) != _norm(template.get(key))]
    have: Mapping[str, Any] = actual.get("Labels") or {}
    want: Mapping[str, Any] = template.get("Labels") or {}
    keys = sorted(set(have) | set(want))
    wrong += [f"Labels[{key}]" for key in keys if key not in have or key not in want or have[key] != want[key]]
    return wrong


def recorded_container(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What an image records of the container it was committed from; empty when nothing.

    ``attrs`` is the ``docker image inspect`` answer. Before Docker 25, ``docker commit`` keeps
    the container's configuration as ``ContainerConfig``: its Labels, Env and Cmd are given
    here. An image whose config JSON envctl wrote itself (``envs.images.rewrite``) or imported
    has none. (A runtime's save on such an engine has them: its container's own labels,
    environment and command, which hold no secret; only base images are required to have none.)
    """
    leftover = attrs.get("ContainerConfig") or {}
    return {key: leftover[key] for key in ("Labels", "Env", "Cmd") if leftover.get(key)}


def _norm(value: Any) -> Any:
    return value if value else None


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value
