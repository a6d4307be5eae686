"""Which Jupyter kernelspecs an environment version provides.

A client that runs a notebook (``envctl run``) asks this to choose the runtime type: when the
environment has the kernelspec the notebook names (``metadata.kernelspec.name``), the
``jupyter`` type runs it with that kernel, IPython magics and all; otherwise the native type.

The backend reads the ``kernel.json`` files of the version's image without running it (see
``RuntimeBackend.kernelspecs``); the Docker backend keeps the answer per image id.
"""

from __future__ import annotations

from dataclasses import dataclass

from envs.kit.db import Database
from envs.kit.errors import ConflictError
from envs.refs import parse_ref
from registry import visibility
from runner.backends.base import RuntimeBackend


@dataclass(frozen=True)
class Kernelspecs:
    ref: str  # the exact version the reference means, e.g. python3-jupyter@1
    kernelspecs: list[dict[str, str]]  # name, display_name, language, path


def find_kernelspecs(
    db: Database, backend: RuntimeBackend, ref: str, reader: visibility.Reader, field: str = "ref"
) -> Kernelspecs:
    """The kernelspecs in the image of the version ``ref`` means for ``reader`` (a tag: the
    version it points at; ``registry/visibility.py``: what they may not see is a 404).

    A bad reference is an ``InvalidInputError`` naming ``field``; an unknown environment or
    version is a 404; a version whose image the engine no longer has is a 409 saying so.
    """
    parsed = parse_ref(ref, field)
    with db.session() as s:
        version = visibility.resolve(s, parsed, reader, field)
        version_ref, image = version.ref, version.image_id
    info = backend.image_info(image)
    if info is None:
        raise ConflictError(
            f"{field}: the image of {version_ref} ({image[:19]}) is not in the container engine, so its "
            "kernelspecs cannot be read; `envctl base build` rebuilds base images, `envctl env load` "
            "brings back exported ones",
            details={"field": field, "reference": version_ref, "image": image},
        )
    return Kernelspecs(version_ref, backend.kernelspecs(info.id))
