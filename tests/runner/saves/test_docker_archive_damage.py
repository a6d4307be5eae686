"""Loading an archive into the real engine: what the engine refuses is a 422, and nothing of the
load stays (R34). Damage to the archive itself is refused before the engine sees it; see
tests/api/test_archive_damage.py and tests/envs/test_archive_fuzz.py for those cases."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from docker.errors import ImageNotFound

from envs import archive
from tests.envs import archive_samples as samples
from tests.fixtures.server import Server

pytestmark = [pytest.mark.docker]


def test_an_archive_the_engine_refuses_part_of_is_a_422_and_nothing_stays(
    server: Server, docker: Any, tmp_path: Path
) -> None:
    """Whole and consistent, but base@1's configuration has no rootfs: Docker takes
    travelled@1, then refuses base@1. The image it took is removed again."""
    data = samples.make_archive(tmp_path, tmp_path.name, base_rootfs=False)
    path = tmp_path / "refused.tar"
    path.write_bytes(data)
    images = list(archive.check(path).images)
    try:
        with server.client() as client:
            before = client.get("/environments").json()
            resp = client.post("/environments/load", content=data, headers={"Content-Type": "application/x-tar"})
            assert resp.status_code == 422, resp.text
            error = resp.json()["error"]
            assert error["code"] == "bad_archive", error
            assert "container engine refused its images" in error["message"] and "RootFS" in error["message"]
            assert client.get("/environments").json() == before
        for image in images:
            with pytest.raises(ImageNotFound):
                docker.images.get(image)
        assert list((server.data_dir / "tmp").iterdir()) == []
    finally:
        for image in images:
            with contextlib.suppress(ImageNotFound):
                docker.images.remove(image, force=True)
