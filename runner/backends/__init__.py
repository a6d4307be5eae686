"""Runtime backends, chosen by name from configuration.

A new backend is one new module here plus one line in ``BACKENDS``.
"""

from __future__ import annotations

import importlib

from envs.kit.errors import InvalidInputError
from runner.backends.base import RuntimeBackend
from runner.settings import Settings

BACKENDS: dict[str, str] = {
    "docker": "runner.backends.docker:DockerBackend",
    "fake": "runner.backends.fake:FakeBackend",
    "kubernetes": "runner.backends.kube:KubernetesBackend",
    "swarm": "runner.backends.swarm:SwarmBackend",
}


def load_backend(name: str, settings: Settings) -> RuntimeBackend:
    """Instantiate the backend called ``name``; an unknown name lists the known ones."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise InvalidInputError(
            f"runner backend {name!r} is unknown; known backends: {', '.join(sorted(BACKENDS))}",
            field="runner_backend",
        ) from None
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    backend: RuntimeBackend = cls.from_settings(settings)
    return backend
