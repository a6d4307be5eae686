"""Kernelspecs read from the tar stream Docker gives for one kernels directory of an image."""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from typing import Any

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
