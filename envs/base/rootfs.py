"""A root base image: debootstrap into a temporary tree, add the machine's CAs, import as one layer.

The tree is made with ``debootstrap`` from the recipe's suite and the machine's mirror, gets
the build machine's extra CA certificates (``envs.base.host``), loses the recipe's ``cleanup``
globs, and is streamed as a tar into ``docker import`` with the image's trusted configuration
as change instructions. The temporary tree is always removed, mounts a failed debootstrap left
inside it first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import docker

from envs.base.hierarchy import Recipe, repository_tag
from envs.base.host import CA_CERTS_DIR
from envs.base.progress import BuildEvent, OutputStream, Progress
from envs.base.recipes import STEP_ENV, Spec
from envs.images import docker as images
from envs.kit.errors import BackendError, EnvctlError

_CA_TIMEOUT = 300  # seconds for update-ca-certificates


def build_root(
    client: docker.DockerClient,
    recipe: Recipe,
    spec: Spec,
    config: Mapping[str, Any],
    mirror: str,
    emit: Progress,
) -> str:
    """Make ``recipe``'s root filesystem with debootstrap and import it; return the image id."""
    if shutil.which("debootstrap") is None:
        raise BackendError("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise BackendError("building a root base image with debootstrap needs root")
    assert spec.suite is not None
    workdir = Path(tempfile.mkdtemp(prefix=f"envctl-base-{recipe.name}-"))
    rootfs = workdir / "rootfs"
    try:
        argv = ["debootstrap"]
        if spec.variant:
            argv.append(f"--variant={spec.variant}")
        argv.append(f"--components={','.join(spec.components)}")
        if spec.include:
            argv.append(f"--include={','.join(spec.include)}")
        argv += [spec.suite, str(rootfs), mirror]
        emit(BuildEvent(recipe.name, "debootstrap", " ".join(argv)))
        _run_streaming(argv, recipe.name, "debootstrap", emit)
        _unmount_under(rootfs)
        _add_ca_certs(rootfs, recipe, emit)
        for pattern in spec.cleanup:
            _remove_matching(rootfs, pattern)
        emit(BuildEvent(recipe.name, "debootstrap", f"removed {len(spec.cleanup)} cleanup patterns"))
        return _import_rootfs(client, recipe, rootfs, config, emit)
    finally:
        _remove_tree(workdir)


def _add_ca_certs(rootfs: Path, recipe: Recipe, emit: Progress) -> None:
    """Copy the extra CA certificates into the tree and run update-ca-certificates there.

    Nothing at all happens to the tree without any, so it stays as debootstrap made it.
    """
    certs = recipe.extra_ca_certs
    if certs:
        target = rootfs / CA_CERTS_DIR
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o755)
        for cert in certs:
            path = target / cert.name
            path.write_bytes(cert.pem)
            path.chmod(0o644)
        argv = ["chroot", str(rootfs), "/usr/sbin/update-ca-certificates"]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                env={**os.environ, **STEP_ENV, "LC_ALL": "C"},
                timeout=_CA_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"{recipe.name}: update-ca-certificates in the root filesystem: {exc}") from exc
        output = (done.stdout + done.stderr).decode("utf-8", errors="replace").strip()
        if done.returncode != 0:
            raise BackendError(
                f"{recipe.name}: update-ca-certificates failed (exit {done.returncode}): {output[-2000:]}",
                details={"argv": argv, "exit_code": done.returncode},
            )
        bundle = (rootfs / "etc/ssl/certs/ca-certificates.crt").read_bytes()
        missing = [cert.name for cert in certs if cert.pem.strip() not in bundle]
        if missing:
            raise BackendError(
                f"{recipe.name}: update-ca-certificates left {', '.join(missing)} out of the bundle: {output[-2000:]}"
            )
    where = f" to /{CA_CERTS_DIR}: {', '.join(c.name for c in certs)}" if certs else ""
    plural = "" if len(certs) == 1 else "s"
    emit(BuildEvent(recipe.name, "certificates", f"added {len(certs)} extra CA certificate{plural}{where}"))


def _run_streaming(argv: list[str], image: str, phase: str, emit: Progress) -> None:
    env = {**os.environ, **STEP_ENV, "LC_ALL": "C"}
    stream = OutputStream(image, phase, emit)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            stream.feed(chunk)
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    stream.close()
    if code != 0:
        raise BackendError(
            f"{image}: {argv[0]} failed (exit {code}); last output:\n{stream.text()}",
            details={"argv": argv, "exit_code": code},
        )


def _remove_matching(rootfs: Path, pattern: str) -> None:
    for path in sorted(rootfs.glob(pattern), reverse=True):
        # glob does not follow a symlink at the last component; never leave the tree.
        if not os.path.abspath(path).startswith(str(rootfs) + os.sep):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _import_rootfs(
    client: docker.DockerClient,
    recipe: Recipe,
    rootfs: Path,
    config: Mapping[str, Any],
    emit: Progress,
) -> str:
    repository, tag = repository_tag(recipe)
    changes = [f'ENV {key}="{value}"' for key, _, value in (e.partition("=") for e in config["Env"])]
    changes += [
        f"CMD {json.dumps(config['Cmd'])}",
        f"WORKDIR {config['WorkingDir']}",
        *(f"LABEL {json.dumps(k)}={json.dumps(v)}" for k, v in config["Labels"].items()),
    ]
    argv = [
        "tar", "--create", "--file=-", "--numeric-owner", "--xattrs", "--xattrs-include=*",
        "--sort=name", f"--directory={rootfs}", ".",
    ]  # fmt: skip
    emit(BuildEvent(recipe.name, "import", f"docker import -> {repository}:{tag}"))
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
        sent = 0

        def chunks() -> Iterator[bytes]:
            nonlocal sent
            assert proc.stdout is not None
            last = time.monotonic()
            while chunk := proc.stdout.read(1 << 20):
                sent += len(chunk)
                if time.monotonic() - last >= 1.0:
                    last = time.monotonic()
                    emit(BuildEvent(recipe.name, "import", f"sent {sent / 1e6:.0f} MB"))
                yield chunk

        try:
            image_id = images.import_tar(
                client,
                chunks(),
                repository=repository,
                tag=tag,
                changes=changes,
                action=f"import the root filesystem of {recipe.name}",
            )
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            code = proc.wait()
        errors.seek(0)
        tar_errors = errors.read().decode("utf-8", errors="replace").strip()
    if code != 0:
        with contextlib.suppress(EnvctlError):
            images.remove_image(client, image_id, force=True)
        raise BackendError(f"{recipe.name}: tar of the root filesystem failed (exit {code}): {tar_errors[-2000:]}")
    emit(BuildEvent(recipe.name, "import", f"imported {sent / 1e6:.0f} MB as {image_id[:19]}"))
    return image_id


# ------------------------------------------------------------------------------ temp trees


def _mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path)
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            if len(fields) > 4:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point == prefix or point.startswith(prefix + os.sep):
                    found.append(point)
    return found


def _unmount_under(path: Path) -> None:
    """Undo mounts a failed debootstrap left in its target (proc, sys), deepest first."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", point], capture_output=True)
    remaining = _mounts_under(path)
    if remaining:
        raise BackendError(f"cannot unmount {remaining} under {path}; remove it by hand")


def _remove_tree(path: Path) -> None:
    """Remove a build tree, never descending into a mount left inside it."""
    if not path.exists():
        return
    _unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)
