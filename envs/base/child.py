"""A child base image: the recipe's steps run in a container of its parent, committed as one layer.

Each step runs with ``docker exec`` as ``/bin/sh -ec STEP`` in a build container started from
the parent image (no settings of its own: its configuration is the parent's). The container is
committed with the image's trusted configuration (``envs.images.docker.commit``), and the
committed image's config JSON is then rewritten to exactly that template
(``envs.images.rewrite``), so that nothing of the build container is recorded in the image.
The build container is always removed, and so is the intermediate commit.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from typing import Any

import docker

from envs.base.hierarchy import Recipe, build_labels, repository_tag
from envs.base.progress import BuildEvent, OutputStream, Progress
from envs.base.recipes import RECIPE_FILE, STEP_ENV, Spec
from envs.images import docker as images
from envs.images.rewrite import replace_config
from envs.kit.errors import BackendError, EnvctlError


def build_child(
    client: docker.DockerClient,
    recipe: Recipe,
    spec: Spec,
    config: Mapping[str, Any],
    parent_id: str,
    emit: Progress,
) -> str:
    """Run ``spec``'s steps on ``parent_id`` and commit them with ``config``; return the image id."""
    repository, tag = repository_tag(recipe)
    container_id = None
    try:
        with images.engine_call(f"start the build container of {recipe.name}"):
            # No environment, entrypoint or other settings of our own: the container's config
            # is the parent's (itself a template); step variables go to each exec only.
            container_id = client.api.create_container(
                parent_id,
                command=["sleep", "infinity"],
                labels=build_labels(recipe.name),
                name=f"envctl-build-{recipe.name}-{uuid.uuid4().hex[:8]}",
            )["Id"]
            client.api.start(container_id)
        for number, step in enumerate(spec.steps, 1):
            _run_step(client, recipe, container_id, number, len(spec.steps), step, emit)
        with images.engine_call(f"stop the build container of {recipe.name}"):
            client.api.kill(container_id)
        emit(BuildEvent(recipe.name, "commit", f"committing the layer on {parent_id[:19]}"))
        committed = images.commit(client, container_id, config=config, action=f"commit {recipe.name}").id
    finally:
        if container_id is not None:
            images.remove_container(client, container_id, f"remove the build container of {recipe.name}")
    try:
        emit(BuildEvent(recipe.name, "commit", f"writing the image config for {repository}:{tag}"))
        image_id = replace_config(
            client,
            committed,
            config,
            history={
                "created_by": f"envctl base image {recipe.name}: {RECIPE_FILE} steps ({len(spec.steps)})",
                "comment": recipe.digest,
            },
            repository=repository,
            tag=tag,
            action=f"write the image config of {recipe.name}",
        )
    finally:
        with contextlib.suppress(EnvctlError):
            images.remove_image(client, committed, force=True)
    emit(BuildEvent(recipe.name, "commit", f"committed {image_id[:19]} as {repository}:{tag}"))
    return image_id


def _run_step(
    client: docker.DockerClient,
    recipe: Recipe,
    container_id: str,
    number: int,
    total: int,
    step: str,
    emit: Progress,
) -> None:
    emit(BuildEvent(recipe.name, "step", f"[{number}/{total}] {step}"))
    stream = OutputStream(recipe.name, "step", emit, prefix=f"[{number}/{total}] ")
    with images.engine_call(f"run step {number} of {recipe.name}"):
        # The step is recipe data from base-images/, run as one argv word.
        exec_id = client.api.exec_create(
            container_id, ["/bin/sh", "-ec", step], environment=dict(STEP_ENV), workdir="/"
        )["Id"]
        for chunk in client.api.exec_start(exec_id, stream=True):
            stream.feed(chunk)
        stream.close()
        code = client.api.exec_inspect(exec_id)["ExitCode"]
    if code != 0:
        raise BackendError(
            f"{recipe.name}: step {number} failed (exit {code}): {step}\nlast output:\n{stream.text()}",
            details={"step": step, "exit_code": code},
        )
