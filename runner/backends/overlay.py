"""A container's changes read from its overlay2 upper directory, without asking the engine.

``docker diff`` costs more than half a second even for a container that changed nothing (the
engine takes locks and walks layer metadata), and envctl asks it on every stop (is there a
draft to keep?) and for the "unsaved changes" flag. With the overlay2 storage driver on this
host, a container's writable layer is a plain directory, ``GraphDriver.Data.UpperDir``; what is
in it is what changed, which is what the engine's own native overlay diff reads too:

- an entry present in the upper directory is added, or changed when a lower layer has it too;
- a character device with device number 0 is a whiteout: the path was deleted;
- a directory marked opaque (``trusted.overlay.opaque`` = ``y``) replaced one below.

Used only when the engine runs on this host with overlay2 and its directories can be read
(envctl runs as root beside dockerd); otherwise the backend asks the engine.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from runner.backends.base import Change

_OPAQUE = (b"trusted.overlay.opaque", b"user.overlay.opaque")


@dataclass(frozen=True)
class OverlayLayers:
    upper: str  # the container's writable layer
    lowers: tuple[str, ...]  # the image's layers (and the container's init layer), top first

    @classmethod
    def from_inspect(cls, graph_driver: dict[str, object]) -> OverlayLayers | None:
        """From ``GraphDriver`` of a container's inspection; None unless overlay2 and readable."""
        data = graph_driver.get("Data")
        if graph_driver.get("Name") != "overlay2" or not isinstance(data, dict):
            return None
        upper = data.get("UpperDir")
        lowers = tuple(p for p in str(data.get("LowerDir") or "").split(":") if p)
        if not isinstance(upper, str) or not os.access(upper, os.R_OK | os.X_OK):
            return None
        if not all(os.access(p, os.X_OK) for p in lowers):
            return None
        return cls(upper, lowers)


def changes(layers: OverlayLayers) -> list[Change]:
    """Every changed path of the container, as ``docker diff`` lists them."""
    return list(_walk(layers, "", below=True))


def _in_lower(layers: OverlayLayers, rel: str) -> bool:
    return any(os.path.lexists(os.path.join(lower, rel)) for lower in layers.lowers)


def _opaque(path: str) -> bool:
    for name in _OPAQUE:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _walk(layers: OverlayLayers, rel: str, *, below: bool) -> Iterator[Change]:
    """The changes under ``rel`` of the upper directory. ``below``: the directory exists in a
    lower layer (else everything under it is new, and no lower layer need be asked)."""
    with os.scandir(os.path.join(layers.upper, rel)) as entries:
        found = sorted(entries, key=lambda e: e.name)
    for entry in found:
        child = f"{rel}/{entry.name}" if rel else entry.name
        path = "/" + child
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            yield Change("deleted", path)  # a whiteout
            continue
        existed = below and _in_lower(layers, child)
        if stat.S_ISDIR(st.st_mode):
            yield Change("changed" if existed else "added", path)
            yield from _walk(layers, child, below=existed and not _opaque(entry.path))
        else:
            yield Change("changed" if existed else "added", path)
