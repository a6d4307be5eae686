"""Settings that shape a runtime's container, and changes to them that wait for a reboot.

The environment, the runtime type (and kernel), the environment variables, the machine type,
the CUDA version mounted and the mounts are fixed when a container is made. A runtime that is
stopped (or in error) takes a change to them at once; one that runs refuses it (409, naming the
fields), unless the change is asked for the next boot: then it is kept in ``runtimes.pending``
(field -> new value), shown by the API, and applied by the boot that follows (``apply_pending``,
runner/runtimes/boot.py).

A pending environment is not applied while the runtime has a draft (unsaved changes made on
the current version): it stays pending, and the runner log says so, until the draft is saved
or thrown away (reset).
"""

from __future__ import annotations

from typing import Any

from runner.models import Runtime
from runner.mounts.validate import describe, from_json

# the fields that need a new container, in the order messages name them
REBOOT_FIELDS = ("environment", "type", "env", "machine_type", "cuda", "mounts")


def effective(rt: Runtime, field: str) -> Any:
    """The value a field will have after the next boot: the pending one, else the row's."""
    pending = rt.pending or {}
    if field in pending:
        return pending[field]
    if field == "environment":
        return {"ref": rt.environment_ref, "version_id": rt.version_id}
    if field == "type":
        return {"type": rt.type, "kernel": rt.kernel}
    if field == "env":
        return dict(rt.env or {})
    if field == "mounts":
        return list(rt.mounts or [])
    return getattr(rt, field)


def note(field: str, value: Any) -> str:
    """How the runner log says that a field takes ``value``."""
    if field == "environment":
        return f"environment -> {value.get('version', value['ref'])}"
    if field == "type":
        return f"type -> {value['type']}" + (f" ({value['kernel']})" if value["kernel"] else "")
    if field == "env":
        return f"environment variables -> {', '.join(sorted(value)) or 'none'}"
    if field == "cuda":
        return f"cuda -> {value or 'none'}"
    if field == "mounts":
        return f"mounts -> {', '.join(describe(m) for m in from_json(value)) or 'none'}"
    return f"machine type -> {value}"


def columns(field: str, value: Any) -> dict[str, Any]:
    """The runtime row's columns that one reboot field sets (the runtimes store writes them)."""
    if field == "environment":
        return {"version_id": value["version_id"], "environment_ref": value["ref"]}
    if field == "type":
        return {"type": value["type"], "kernel": value["kernel"]}
    if field == "env":
        return {"env": dict(value)}
    if field in ("machine_type", "cuda"):
        return {field: value}
    if field == "mounts":
        return {"mounts": list(value)}
    raise KeyError(field)


def apply_pending(rt: Runtime) -> tuple[dict[str, Any], list[str], list[str]]:
    """What waits for a boot, as the row's new columns (``pending`` too, emptied of what
    applies). Returns those columns, the notes of what applies, and those of what stays
    pending (a pending environment while a draft exists)."""
    pending = dict(rt.pending or {})
    values: dict[str, Any] = {}
    applied: list[str] = []
    kept: list[str] = []
    for field in REBOOT_FIELDS:
        if field not in pending:
            continue
        if field == "environment" and rt.draft_image_id:
            kept.append(
                "environment change to "
                f"{pending[field].get('version', pending[field]['ref'])} waits: the runtime has unsaved changes "
                "on its current version; save them or reset the runtime"
            )
            continue
        value = pending.pop(field)
        values.update(columns(field, value))
        applied.append(note(field, value))
    values["pending"] = pending
    return values, applied, kept


def pending_view(rt: Runtime) -> dict[str, Any]:
    """The pending changes as the API shows them: field -> the value it will take."""
    out: dict[str, Any] = {}
    for field, value in (rt.pending or {}).items():
        if field == "environment":
            out[field] = value.get("version", value["ref"])
        elif field == "type":
            out[field] = value["type"]
            if value.get("kernel"):
                out["kernel"] = value["kernel"]
        else:
            out[field] = value
    return out
