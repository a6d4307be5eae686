"""Kernelspecs read from the tar stream Docker gives for one kernels directory of an image."""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
import threading
from collections.abc import Callable
from typing import Any

import docker

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError

KERNEL_JSON_MAX = 64 * 1024  # bytes of one kernel.json; larger ones are skipped
KERNELSPEC_ARCHIVE_MAX = 16 * 1024 * 1024  # bytes read of one directory's archive


def kernelspecs_in(chunks: Any, directory: str) -> list[dict[str, str]]:
    """Kernelspecs in the tar stream of one kernels directory: ``<dir>/<name>/kernel.json``
    files, regular, at most KERNEL_JSON_MAX bytes, with a valid name and an ``argv``. At most
    KERNELSPEC_ARCHIVE_MAX bytes are read; what lies beyond is not looked at."""
    buffer = io.BytesIO()
    try:
        for chunk in chunks:
            buffer.write(chunk[: KERNELSPEC_ARCHIVE_MAX - buffer.tell()])
            if buffer.tell() >= KERNELSPEC_ARCHIVE_MAX:
                break
    finally:
        with contextlib.suppress(Exception):
            chunks.close()
    buffer.seek(0)
    specs: list[dict[str, str]] = []
    try:
        with tarfile.open(fileobj=buffer, mode="r|") as tar:
            for member in tar:
                parts = member.name.split("/")
                name = parts[1].lower() if len(parts) == 3 else ""
                if parts[-1] != "kernel.json" or not member.isreg() or member.size > KERNEL_JSON_MAX:
                    continue
                if not re.fullmatch(r"[a-z0-9._-]{1,128}", name):  # Jupyter's rule for names
                    continue
                handle = tar.extractfile(member)
                try:
                    spec = json.loads(handle.read(KERNEL_JSON_MAX) if handle else b"")
                except ValueError:
                    continue
                if not isinstance(spec, dict) or not isinstance(spec.get("argv"), list) or not spec["argv"]:
                    continue
                display, language = spec.get("display_name"), spec.get("language")
                specs.append(
                    {
                        "name": name,
                        "display_name": display[:256] if isinstance(display, str) and display else name,
                        "language": language[:64] if isinstance(language, str) else "",
                        "path": f"{directory}/{parts[1]}",
                    }
                )
    except (tarfile.TarError, EOFError, OSError):
        pass  # a cut-off archive (past the size limit): what was read stands
    return specs


# --- reading them from an image: a container created from it and never started ---------------
KERNELSPEC_DIRS = (  # Jupyter's data paths, in its order of precedence: first one of a name wins
    "/root/.local/share/jupyter/kernels",
    "/opt/conda/share/jupyter/kernels",
    "/usr/local/share/jupyter/kernels",
    "/usr/share/jupyter/kernels",
)
KERNELSPECS_MAX = 100  # kernelspecs read from one image
# Image ids name immutable content, so what was read stays true for every backend of this
# process: one dict, shared, bounded.
_cache: dict[str, list[dict[str, str]]] = {}
_cache_lock = threading.Lock()


def read_from_image(
    engine: Callable[[], Any], image: str, *, labels: dict[str, str], cacheable: bool, remove: Callable[[str], None]
) -> list[dict[str, str]]:
    """The kernel.json files under KERNELSPEC_DIRS, read from a container created from the
    image and never started (carrying ``labels``), removed afterwards with ``remove``.
    ``engine`` gives the Docker API client; it is not asked for an image id read before."""
    if cacheable:
        with _cache_lock:
            cached = _cache.get(image)
        if cached is not None:
            return [dict(k) for k in cached]
    api = engine()
    try:
        holder = api.create_container(image, command=["true"], labels=labels, network_disabled=True)["Id"]
    except docker.errors.ImageNotFound as exc:
        raise BackendError(f"image {image[:30]} is not in the Docker engine", details={"image": image}) from exc
    except Exception as exc:
        raise daemon_error("look for the image's kernelspecs", exc) from exc
    found: dict[str, dict[str, str]] = {}
    try:
        for directory in KERNELSPEC_DIRS:
            try:
                # the trailing slash follows a directory that is a symlink
                chunks, _stat = api.get_archive(holder, directory + "/")
            except docker.errors.NotFound:
                continue
            for spec in kernelspecs_in(chunks, directory):
                if len(found) < KERNELSPECS_MAX:
                    found.setdefault(spec["name"], spec)
    except Exception as exc:
        raise daemon_error("read the image's kernelspecs", exc) from exc
    finally:
        with contextlib.suppress(BackendError):  # never started; labelled if it stays
            remove(holder)
    specs = [found[name] for name in sorted(found)]
    if cacheable:
        with _cache_lock:
            while len(_cache) >= 256:
                _cache.pop(next(iter(_cache)))
            _cache[image] = [dict(k) for k in specs]
    return specs
