"""The machine type catalog, from configuration."""

from __future__ import annotations

from envs.kit.config import MachineType, Settings
from runner.errors import MachineTypeNotFoundError


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
