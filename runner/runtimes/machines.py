"""The machine type catalog, from configuration, and the host's CUDA versions a GPU runtime
may have mounted (the ``cuda`` setting of a runtime, as Nextjournal's NEXTJOURNAL_MOUNT_CUDA)."""

from __future__ import annotations

import re
from pathlib import Path

from envs.kit.errors import InvalidInputError
from runner.errors import MachineTypeNotFoundError
from runner.settings import MachineType, Settings


def get_machine_type(settings: Settings, name: str, field: str = "machine_type") -> MachineType:
    try:
        return settings.machine_types[name]
    except KeyError:
        known = ", ".join(sorted(settings.machine_types))
        raise MachineTypeNotFoundError(
            f"{field}: machine type {name[:64]!r} is not in the catalog; known types: {known}",
            details={"field": field, "known": sorted(settings.machine_types)},
        ) from None


def list_machine_types(settings: Settings) -> list[MachineType]:
    return sorted(settings.machine_types.values(), key=lambda m: (m.gpus, m.cpus, m.memory, m.name))


_CUDA_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+){0,2}")


def cuda_versions(settings: Settings) -> list[str]:
    """The CUDA versions the host offers: ``<cuda root>/cuda-<version>`` folders, real ones
    (not symlinks), by version."""
    root = settings.runner_cuda_root
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        version = entry.name.removeprefix("cuda-")
        named = entry.name.startswith("cuda-") and _CUDA_VERSION_RE.fullmatch(version)
        if named and entry.is_dir() and not entry.is_symlink():
            found.append(version)
    return sorted(found, key=lambda v: tuple(int(p) for p in v.split(".")))


def check_cuda(settings: Settings, version: str, field: str = "cuda") -> str:
    """``version`` when the host has it; 422 listing the ones it has otherwise."""
    known = cuda_versions(settings)
    if version not in known:
        listed = ", ".join(known) or f"none (no cuda-<version> folder in {settings.runner_cuda_root})"
        raise InvalidInputError(
            f"{field}: CUDA {version[:32]!r} is not on this host; available: {listed}",
            field=field,
            details={"available": known},
        )
    return version


def cuda_dir(settings: Settings, version: str) -> Path:
    """The host folder of CUDA ``version`` (checked: it may have gone since it was chosen)."""
    return settings.runner_cuda_root / f"cuda-{check_cuda(settings, version)}"
