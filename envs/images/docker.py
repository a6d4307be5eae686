"""Image operations in the Docker engine: import, commit, inspect, remove, squash, archives.

Base-image builds (``envs.base``) and the Docker runtime backend (``runner.backends.docker``)
both do their image work here, so that one rule holds for each thing:

- **Errors.** Every engine error becomes an envctl error with ``raise ... from exc`` and the
  engine's own message in it: ``BackendError`` when the engine fails or does not answer (the
  latter says how to start one), ``InvalidInputError`` when the engine refuses a request as
  bad (an HTTP 4xx answer to an import: a bad change instruction or reference).
- **Image ids.** An operation returns the image id ``docker image inspect`` reports for what
  it made, read back from the engine after the engine said which image that was: for an
  import the last ``sha256:`` status of its answer, for a commit the answer's ``Id``, for a
  load the image its tag names.
- **Configuration.** A commit takes the configuration it is given (a trusted template, see
  ``envs.images.config``), never the container's: the container's labels the template does
  not name are given empty values, and the image made is checked against the template with
  :func:`envs.images.config.config_differences`; an image that differs (the engine merged in
  a variable, entrypoint, user, ... of the container) is removed and refused.

Blocking calls: the callers run them off the event loop.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors
import requests.exceptions

from envs.images.config import ImageInfo, blank_other_labels, config_differences, image_info
from envs.kit.errors import BackendError, EnvctlError, InvalidInputError

#: Errors of the transport: the engine is not there or does not answer.
TRANSPORT_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    ConnectionError,
    FileNotFoundError,
)
NO_ENGINE = "the Docker engine does not answer{where}; is dockerd running? `scripts/ensure-docker` starts one"


def daemon_error(action: str, exc: BaseException) -> EnvctlError:
    """The envctl error for ``exc``, raised by the engine while trying to ``action``.

    Raise it ``from exc``. An envctl error is returned as it is.
    """
    if isinstance(exc, EnvctlError):
        return exc
    cause: BaseException = exc
    while not isinstance(cause, TRANSPORT_ERRORS) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    if isinstance(cause, TRANSPORT_ERRORS):
        return BackendError(
            NO_ENGINE.format(where=f" ({action})"),
            details={"action": action, "cause": str(exc)[:300]},
        )
    explanation = getattr(exc, "explanation", None) or str(exc)
    return BackendError(
        f"Docker failed to {action}: {explanation}",
        details={"action": action, "cause": str(explanation)[:500]},
    )


@contextlib.contextmanager
def engine_call(action: str) -> Iterator[None]:
    """Translate whatever the engine raises inside the block (see :func:`daemon_error`)."""
    try:
        yield
    except Exception as exc:
        raise daemon_error(action, exc) from exc


def connect(timeout: int = 60) -> docker.DockerClient:
    """A client of the engine the environment names (``DOCKER_HOST``, as ``docker`` does), checked."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:
        raise BackendError(NO_ENGINE.format(where=""), details={"action": "connect", "cause": str(exc)[:300]}) from exc
    return client


# --------------------------------------------------------------------------------- inspect


def inspect(client: docker.DockerClient, image: str) -> dict[str, Any] | None:
    """``docker image inspect`` of ``image`` (an id or a name), or None when there is none."""
    try:
        attrs: dict[str, Any] = client.api.inspect_image(image)
    except docker.errors.NotFound:  # ImageNotFound is a NotFound
        return None
    except Exception as exc:
        raise daemon_error(f"inspect image {image[:30]}", exc) from exc
    return attrs


_SEEN: dict[str, dict[str, Any]] = {}  # image id -> its inspection (an id names one immutable image)
_SEEN_LOCK = threading.Lock()
_SEEN_KEPT = 64


def _remember(attrs: dict[str, Any]) -> None:
    image = str(attrs.get("Id") or "")
    if image.startswith("sha256:"):
        with _SEEN_LOCK:
            _SEEN[image] = attrs
            while len(_SEEN) > _SEEN_KEPT:
                _SEEN.pop(next(iter(_SEEN)))


def inspect_id(client: docker.DockerClient, image: str) -> dict[str, Any]:
    """``docker image inspect`` of an image id, remembered: an id names one immutable image, so
    what was read of it (here, or by :func:`verify_config` as the image was made) still holds.
    A save asks about the same few images each time, among them the one the last save made."""
    with _SEEN_LOCK:
        found = _SEEN.get(image)
    if found is not None:
        return found
    attrs: dict[str, Any] = client.api.inspect_image(image)
    if attrs.get("Id") == image:
        _remember(attrs)
    return attrs


def info(client: docker.DockerClient, image: str) -> ImageInfo | None:
    """What ``image`` is, or None when the engine does not have it."""
    attrs = inspect(client, image)
    return None if attrs is None else image_info(attrs)


def _reported(client: docker.DockerClient, image_id: str, action: str) -> dict[str, Any]:
    attrs = inspect(client, image_id)
    if attrs is None:
        raise BackendError(
            f"Docker said it made image {image_id[:19]} ({action}) but does not have it",
            details={"action": action, "image": image_id},
        )
    return attrs


# ---------------------------------------------------------------------------------- import


def import_tar(
    client: docker.DockerClient,
    source: bytes | IO[bytes] | Iterable[bytes],
    *,
    repository: str,
    tag: str,
    changes: list[str] | None = None,
    action: str = "import an image",
) -> str:
    """``docker import``: a root filesystem tar (bytes, a file or chunks) as a one-layer image.

    ``changes`` are Dockerfile instructions (ENV, CMD, WORKDIR, LABEL) for its configuration.
    Returns the image id ``docker image inspect`` reports for ``repository:tag``.
    """
    try:
        answer = client.api.import_image(src=source, repository=repository, tag=tag, changes=changes)
    except docker.errors.APIError as exc:
        if exc.is_client_error():
            raise InvalidInputError(
                f"Docker refused to {action}: {exc.explanation or exc}",
                details={"action": action, "cause": str(exc.explanation or exc)[:500]},
            ) from exc
        raise daemon_error(action, exc) from exc
    except Exception as exc:
        raise daemon_error(action, exc) from exc
    return str(_reported(client, imported_id(answer, action), action)["Id"])


def imported_id(answer: Any, action: str = "import an image") -> str:
    """The image id in the engine's answer to an import (JSON messages, one a line).

    An ``error`` message raises BackendError with the engine's words; otherwise the last
    ``sha256:`` status is the image made. An answer without one raises BackendError.
    """
    image_id = None
    for message in messages(answer, action):
        status = message.get("status")
        if isinstance(status, str) and status.startswith("sha256:"):
            image_id = status
    if image_id is None:
        text = answer.decode(errors="replace") if isinstance(answer, bytes) else str(answer)
        raise BackendError(
            f"Docker did not say which image it made ({action}): {text[-300:]!r}", details={"action": action}
        )
    return image_id


def messages(answer: Any, action: str) -> list[dict[str, Any]]:
    """The JSON messages of an engine answer (text, bytes, or decoded dicts); raise on an error one."""
    if isinstance(answer, bytes | str):
        text = answer.decode(errors="replace") if isinstance(answer, bytes) else answer
        items: Iterable[Any] = text.splitlines()
    else:
        items = answer
    found: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, bytes | str):
            try:
                item = json.loads(item)
            except ValueError:
                continue
        if not isinstance(item, dict):
            continue
        error = item.get("error") or (item.get("errorDetail") or {}).get("message")
        if error:
            raise BackendError(f"Docker failed to {action}: {error}", details={"action": action, "cause": str(error)})
        found.append(item)
    return found


# ---------------------------------------------------------------------------------- commit


def commit(
    client: docker.DockerClient,
    container_id: str,
    *,
    config: Mapping[str, Any],
    repository: str | None = None,
    tag: str | None = None,
    pause: bool = True,
    action: str = "commit the container",
) -> ImageInfo:
    """``docker commit`` with ``config`` as the image's configuration, checked.

    Labels the container has and ``config`` does not name are given empty values, since the
    engine would copy them into the image; any other field the engine merges in from the
    container (a variable the template lacks, an entrypoint, a user) makes the image differ
    from ``config``: it is removed and BackendError names the fields.
    """
    image_id, given = commit_unchecked(
        client, container_id, config=config, repository=repository, tag=tag, pause=pause, action=action
    )
    return verify_config(client, image_id, given, action=action)


def commit_unchecked(
    client: docker.DockerClient,
    container_id: str,
    *,
    config: Mapping[str, Any],
    repository: str | None = None,
    tag: str | None = None,
    pause: bool = True,
    action: str = "commit the container",
) -> tuple[str, dict[str, Any]]:
    """``docker commit`` with ``config`` (the container's other labels blanked), not checked:
    the image id and the configuration given. Only for an image whose configuration is
    replaced next (``envs.images.layers.reconfigure``), never one anybody uses as it is."""
    with engine_call(action):
        labels = (client.api.inspect_container(container_id).get("Config") or {}).get("Labels") or {}
        given = blank_other_labels(config, labels)
        answer = client.api.commit(container_id, repository=repository, tag=tag, conf=given, pause=pause)
    return str(answer["Id"]), given


def verify_config(client: docker.DockerClient, image_id: str, template: Mapping[str, Any], *, action: str) -> ImageInfo:
    """The image's info when its configuration is ``template``; else remove it and raise BackendError."""
    attrs = _reported(client, image_id, action)
    wrong = config_differences(attrs.get("Config") or {}, template)
    if not wrong:
        _remember(attrs)  # the next save on this image asks about it (inspect_id)
    if wrong:
        with contextlib.suppress(EnvctlError):
            remove_image(client, image_id, force=True)
        raise BackendError(
            f"the image made to {action} differs from the trusted template in {', '.join(wrong)}; it was removed",
            details={"fields": wrong, "action": action},
        )
    return image_info(attrs)


# ---------------------------------------------------------------------------------- remove


def remove_image(client: docker.DockerClient, image: str, *, force: bool = False, noprune: bool = False) -> None:
    """Remove an image; idempotent. One a container or a child image needs is kept by the engine."""
    try:
        client.api.remove_image(image, force=force, noprune=noprune)
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            return  # still needed by a container or a child image
        raise daemon_error(f"remove image {image[:30]}", exc) from exc
    except Exception as exc:
        raise daemon_error(f"remove image {image[:30]}", exc) from exc


def remove_container(client: docker.DockerClient, container_id: str, action: str) -> None:
    """Force-remove a helper container (a build or squash one); idempotent."""
    try:
        client.api.remove_container(container_id, force=True, v=True)
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        if exc.status_code == 409:  # removal already in progress
            return
        raise daemon_error(action, exc) from exc
    except Exception as exc:
        raise daemon_error(action, exc) from exc


# ---------------------------------------------------------------------------------- squash


def squash(
    client: docker.DockerClient,
    image: str,
    *,
    config: Mapping[str, Any],
    repository: str,
    tag: str,
    holder_labels: Mapping[str, str],
) -> ImageInfo:
    """A one-layer copy of ``image`` with ``config``, tagged ``repository:tag``.

    The filesystem goes through export and import, then a commit gives it ``config`` (checked
    as every commit is). The helper containers carry ``holder_labels`` and are always removed.
    """
    action = "compact the image"
    flat_ref = f"{repository}-flat"
    with tempfile.TemporaryFile(prefix="envctl-squash-") as tmp:
        holder = _holder(client, image, holder_labels, action)
        try:
            with engine_call(action):
                for chunk in client.api.export(holder):
                    tmp.write(chunk)
        finally:
            remove_container(client, holder, action)
        tmp.seek(0)
        flat = import_tar(client, tmp, repository=flat_ref, tag=tag, action=action)
    try:
        holder = _holder(client, flat, holder_labels, action)
        try:
            return commit(client, holder, config=config, repository=repository, tag=tag, pause=False, action=action)
        finally:
            remove_container(client, holder, action)
    finally:
        with contextlib.suppress(EnvctlError):
            remove_image(client, f"{flat_ref}:{tag}", noprune=True)


def _holder(client: docker.DockerClient, image: str, labels: Mapping[str, str], action: str) -> str:
    with engine_call(action):
        return str(client.api.create_container(image, command=["true"], labels=dict(labels))["Id"])


# -------------------------------------------------------------------------------- archives
# Archives of several images go through the docker CLI (python-on-whales): it saves several
# images into one archive, sharing their layers, which the SDK's single-image call does not.


def save_archive(images: list[str], path: Path, *, host: str | None = None) -> None:
    """Write ``images`` (and every layer they need) to ``path`` in ``docker save`` form."""
    from python_on_whales import DockerClient
    from python_on_whales.exceptions import DockerException as CliError

    try:
        DockerClient(host=host).image.save(images, output=path)
    except CliError as exc:
        raise BackendError(f"Docker failed to export the images: {exc.stderr or exc}") from exc


def load_archive(path: Path, *, host: str | None = None) -> None:
    """Load a ``docker save``-form archive into the engine."""
    from python_on_whales import DockerClient
    from python_on_whales.exceptions import DockerException as CliError

    try:
        DockerClient(host=host).image.load(path, quiet=True)
    except CliError as exc:
        raise BackendError(f"Docker refused the images: {exc.stderr or exc}") from exc


def load_stream(client: docker.DockerClient, archive: IO[bytes], action: str) -> None:
    """Load one ``docker save``-form archive from an open file, through the SDK."""
    with engine_call(action):
        messages(client.api.load_image(archive, quiet=True), action)
