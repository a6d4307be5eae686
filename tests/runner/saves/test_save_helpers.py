"""The helper containers a save commits (runner/backends/helpers.py), on the real Docker engine.

A helper is held started and paused, so that the engine's commit does not unmount its
filesystem (an overlay's unmount syncs the whole disk under it); what runs in it can write
nothing and reach nothing. One that cannot be started is used as created.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from runner.backends import overlay
from runner.backends.helpers import HELPER, Helpers, helper_prefix, installation_helpers
from runner.backends.saves import KeepEverything
from runner.saves.imageconfig import CONFIG_KEYS
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.services import base_image

pytestmark = [pytest.mark.docker]


def _helpers_of(docker: Any, helpers: Helpers) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = docker.api.containers(
        all=True, filters={"label": [f"envctl.managed={HELPER}", f"{TEST_LABEL}={TEST_SESSION}"]}
    )
    return listed


def _one_file_layer(tmp: Path, name: str, text: bytes) -> overlay.PlannedLayer:
    root = tmp / "layer"
    (root / "root").mkdir(parents=True)
    (root / "root" / name).write_bytes(text)
    return overlay.plan_layer([str(root)], KeepEverything(), private=lambda path: False)


def _file_in(docker: Any, image: str, path: str) -> bytes:
    """A file of ``image``, read from a container made (never started) of it."""
    cid = docker.api.create_container(image, ["none"], labels={TEST_LABEL: TEST_SESSION})["Id"]
    try:
        chunks, _ = docker.api.get_archive(cid, path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            member = tar.next()
            assert member is not None
            handle = tar.extractfile(member)
            assert handle is not None
            return handle.read()
    finally:
        docker.api.remove_container(cid, force=True)


def test_a_helper_is_held_paused_and_can_write_or_reach_nothing(docker: Any, tmp_path: Path) -> None:
    image = base_image(docker, "python3")
    helpers = Helpers(lambda: docker, {TEST_LABEL: TEST_SESSION})
    made_image = None
    try:
        helper = helpers.take(image)
        made = helper.made()
        assert made.held, "the python3 base image has python3: its helper is started and paused"
        attrs = docker.api.inspect_container(made.id)
        assert attrs["State"]["Paused"] and attrs["State"]["Running"], attrs["State"]
        host = attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        assert host["NetworkMode"] == "none" and not attrs["NetworkSettings"]["Networks"].get("bridge")
        assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
        assert host["Privileged"] is False and not host.get("Binds") and not attrs["Mounts"]
        assert os.listdir(made.upper) == []  # nothing of its own in its layer

        # Its commit makes the layer it is given, with the configuration asked for exactly:
        # nothing of the helper's (its command, its labels) in it.
        parent = docker.api.inspect_image(image)["Config"]
        config: dict[str, Any] = {key: parent.get(key) for key in CONFIG_KEYS}
        config["Labels"] = {TEST_LABEL: TEST_SESSION}
        layer = _one_file_layer(tmp_path, "kept.txt", b"kept\n")
        info = helper.commit(
            docker, layer, KeepEverything(), config=config, repository="envctl-test/helper", tag="held", action="test"
        )
        made_image = info.id
        saved = docker.api.inspect_image(info.id)["Config"]
        assert saved["Cmd"] == parent["Cmd"] and not saved.get("Entrypoint"), saved
        assert "signal.pause" not in str(saved)
        assert saved["Labels"].get("envctl.managed") in (None, ""), saved["Labels"]
        assert _file_in(docker, info.id, "/root/kept.txt") == b"kept\n"
        # the layer taken away again, the helper still held for the next save
        assert os.listdir(made.upper) == []
        assert docker.api.inspect_container(made.id)["State"]["Paused"]
        helpers.give_back(helper)
        again = helpers.take(image)
        assert again.made().id == made.id  # the kept one, checked still there and still paused
        helpers.give_back(again)
    finally:
        helpers.close()
        if made_image is not None:
            docker.api.remove_image(made_image, force=True)
    assert _helpers_of(docker, helpers) == []  # closing removes them, paused or not


def test_a_helper_of_an_image_without_python3_is_used_unstarted(docker: Any, tmp_path: Path) -> None:
    """An image with no python3 (imported from elsewhere): the helper cannot be started; it
    is used as created, and its commit makes the same layer."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("etc/")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    answer = docker.api.import_image_from_data(
        data.getvalue(),
        repository="envctl-test/no-python",
        tag=TEST_SESSION,
        changes=[f"LABEL {TEST_LABEL}={TEST_SESSION}"],
    )
    image = docker.api.inspect_image(f"envctl-test/no-python:{TEST_SESSION}")["Id"]
    assert answer
    helpers = Helpers(lambda: docker, {TEST_LABEL: TEST_SESSION})
    made_image = None
    try:
        helper = helpers.take(image)
        made = helper.made()
        assert not made.held
        assert not docker.api.inspect_container(made.id)["State"]["Running"]
        layer = _one_file_layer(tmp_path, "plain.txt", b"plain\n")
        config = {"Cmd": ["/nothing"], "Labels": {TEST_LABEL: TEST_SESSION}}
        done = helper.commit(
            docker, layer, KeepEverything(), config=config, repository="envctl-test/helper", tag="plain", action="test"
        )
        made_image = done.id
        assert _file_in(docker, done.id, "/root/plain.txt") == b"plain\n"
        assert os.listdir(made.upper) == []
        helpers.give_back(helper)
    finally:
        helpers.close()
        if made_image is not None:
            docker.api.remove_image(made_image, force=True)
        docker.api.remove_image(image, force=True)
    assert _helpers_of(docker, helpers) == []


def test_helpers_left_by_an_envctl_that_died_are_swept_at_its_next_start_and_no_one_elses(docker: Any) -> None:
    """A helper is named for its runner once the runner owns the backend (a name: a label would
    be recorded in the images committed from it); the next start of the same runner removes what
    the last one left held, and leaves another installation's helpers and its own live ones."""
    image = base_image(docker, "python3")
    died = Helpers(lambda: docker, {TEST_LABEL: TEST_SESSION})
    other = Helpers(lambda: docker, {TEST_LABEL: TEST_SESSION})
    again = Helpers(lambda: docker, {TEST_LABEL: TEST_SESSION})
    try:
        assert died.own("inst-a", "runner-1") == 0
        left = died.take(image).made()  # never given back nor closed: the process "died" holding it
        name = docker.api.inspect_container(left.id)["Name"].lstrip("/")
        assert name.startswith(helper_prefix("inst-a", "runner-1"))
        assert name.startswith(installation_helpers("inst-a"))  # what envctl uninstall looks for
        assert "inst-a" not in json.dumps(docker.api.inspect_container(left.id)["Config"])
        other.own("inst-b", "runner-1")
        theirs = other.take(image).made()
        assert again.own("inst-a", "runner-1") == 1
        live = again.take(image).made()
        assert again.own("inst-a", "runner-1") == 0  # only the first time: a live helper is never swept
        ids = {c["Id"] for c in _helpers_of(docker, again)}
        assert left.id not in ids and theirs.id in ids and live.id in ids
    finally:
        for helpers in (died, other, again):
            helpers.close()
        for c in _helpers_of(docker, again):
            docker.api.remove_container(c["Id"], force=True)
