"""What a boot does with a runtime's mounts (runner/mounts/prepare.py), against a real git
server on loopback and moto's S3 server: the phases and bytes it reports, the binds and the
record it returns, and the check made again at boot (R28)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from envs.kit.errors import InvalidInputError
from runner.backends.fake import FakeBackend
from runner.mounts.prepare import DOWNLOADING, PREPARING, MountPreparer, mounted_note
from runner.settings import Settings
from tests.fixtures.git_http import GitServer, start_git_server
from tests.fixtures.s3 import S3Endpoint, start_s3

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    yield from start_git_server(tmp_path_factory.mktemp("git-server"))


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from start_s3()


def test_a_boot_reports_preparing_then_downloading_with_bytes_and_records_what_it_mounted(
    git_server: GitServer, s3: S3Endpoint, tmp_path: Path
) -> None:
    commit = git_server.make_repo("boot", {"a.txt": "a"})
    settings = Settings(data_dir=tmp_path, mounts_allow_hosts=("127.0.0.1",), mounts_s3_endpoint_url=s3.url)
    preparer = MountPreparer(settings, "inst-1", FakeBackend())
    client: Any = preparer.s3.client
    client.create_bucket(Bucket="boot-data")
    client.put_object(Bucket="boot-data", Key="d/x.bin", Body=b"x" * 2048)
    stored = [
        {"type": "git", "url": f"{git_server.url}/boot.git", "ref": "", "target": "/mnt/code"},
        {"type": "s3", "bucket": "boot-data", "prefix": "d/", "target": "/data", "writeback": False},
        {"type": "volume", "name": "home", "target": "/home/data", "read_only": True},
    ]
    seen: list[tuple[str, Any]] = []
    binds, used = preparer.prepare(stored, "u_1", "rt_1", lambda phase, bytes_: seen.append((phase, bytes_)))
    assert seen[0] == (PREPARING, None) and seen[1] == (DOWNLOADING, None)
    assert seen[2:] == [(DOWNLOADING, (0, 2048)), (DOWNLOADING, (2048, 2048))]
    assert [(b.target, b.kind, b.read_only) for b in binds] == [
        ("/mnt/code", "bind", True), ("/data", "bind", True), ("/home/data", "volume", True),
    ]  # fmt: skip
    assert (Path(binds[0].source) / "a.txt").read_text() == "a"
    assert used[0]["commit"] == commit and used[1]["objects"] == 1 and used[2] == {
        "type": "volume", "target": "/home/data", "name": "home",
    }  # fmt: skip
    assert "2048 of 2048 bytes downloaded" in mounted_note(used)


def test_a_stored_mount_is_checked_again_at_boot_before_any_git_call(git_server: GitServer, tmp_path: Path) -> None:
    """A host allowed when the mount was stored, no longer allowed now: refused at boot."""
    git_server.make_repo("later", {"a.txt": "a"})
    preparer = MountPreparer(Settings(data_dir=tmp_path), "inst-1", FakeBackend())
    stored = [{"type": "git", "url": f"{git_server.url}/later.git", "ref": "", "target": "/mnt/code"}]
    with pytest.raises(InvalidInputError, match="mounts\\[0\\].url"):
        preparer.prepare(stored, "u_1", "rt_1", lambda phase, bytes_: None)
    assert not (tmp_path / "mounts" / "git" / "repos").exists()
