"""A container's changes read from its overlay2 upper directory say what ``docker diff`` says."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from envs.kit.ids import new_id
from runner.backends import overlay
from runner.backends.base import LABEL_INSTALLATION, LABEL_RUNNER, RuntimeSpec
from runner.backends.docker import DockerBackend, _is_private
from runner.channel import wait_for_agent
from runner.paths import AGENT_DIR
from runner.settings import DEFAULT_MACHINE_TYPES
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.services import base_image

pytestmark = pytest.mark.docker

KINDS = {0: "changed", 1: "added", 2: "deleted"}


def test_changes_from_the_upper_directory_match_docker_diff(docker: Any, tmp_path: Path) -> None:
    backend = DockerBackend(docker, labels={TEST_LABEL: TEST_SESSION})
    rid = new_id("rt")
    (tmp_path / rid).mkdir()
    spec = RuntimeSpec(
        rid,
        "overlay",
        base_image(docker, "python3"),
        "python3@1",
        DEFAULT_MACHINE_TYPES["small"],
        tmp_path / rid,
        AGENT_DIR,
        labels={LABEL_INSTALLATION: "in_overlay_test", LABEL_RUNNER: f"overlay-{TEST_SESSION}"},
    )
    state = backend.start(spec)
    try:
        wait_for_agent(backend.socket_path(state, spec.state_dir), time.monotonic() + 30)
        cid = state["container_id"]
        layers = backend._overlay_layers(cid)
        if layers is None:
            pytest.skip("this engine's overlay2 directories are not readable from here (not root, or remote)")
        script = (
            "set -e; echo new > /root/new.txt; echo more >> /etc/motd; rm /etc/issue; "
            "mkdir -p /opt/tree/a/b && echo x > /opt/tree/a/b/c; rm -rf /usr/share/doc/bash; "
            "rm -rf /var/log/apt && mkdir /var/log/apt && echo again > /var/log/apt/fresh; "
            "ln -s /etc/hostname /root/link"
        )
        assert docker.containers.get(cid).exec_run(["bash", "-c", script]).exit_code == 0
        ours = {(c.kind, c.path) for c in overlay.changes(layers) if not _is_private(c.path)}
        engine = {(KINDS[int(e["Kind"])], e["Path"]) for e in docker.api.diff(cid) or [] if not _is_private(e["Path"])}
        assert ours == engine
        assert {(c.kind, c.path) for c in backend.changes(state)} == engine
        assert ("deleted", "/etc/issue") in ours and ("added", "/opt/tree/a/b/c") in ours
    finally:
        backend.stop(state, timeout=0)
