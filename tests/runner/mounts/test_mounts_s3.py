"""S3 mounts' ETag-aware cache against moto's real HTTP S3 server: a warm boot downloads only
what changed, removes what went, reports bytes, never writes outside the mount, and a
write-back mount uploads what the runtime changed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.mounts.s3 import S3Cache, safe_relative
from runner.mounts.validate import S3Mount
from tests.fixtures.s3 import S3Endpoint, start_s3

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from start_s3()


def _cache(s3: S3Endpoint, root: Path) -> S3Cache:
    return S3Cache(root, s3.url, s3.region)


def test_a_warm_boot_downloads_only_changed_objects_and_removes_deleted_ones(s3: S3Endpoint, tmp_path: Path) -> None:
    cache = _cache(s3, tmp_path)
    client: Any = cache.client
    client.create_bucket(Bucket="mount-data")
    for key, body in {"raw/a.csv": b"a" * 1000, "raw/sub/b.bin": b"b" * 3000, "other/c": b"c"}.items():
        client.put_object(Bucket="mount-data", Key=key, Body=body)
    client.put_object(Bucket="mount-data", Key="raw/../escape", Body=b"x")
    client.put_object(Bucket="mount-data", Key="raw/dir/", Body=b"")
    mount = S3Mount(target="/data", bucket="mount-data", prefix="raw/")
    seen: list[tuple[int, int]] = []
    files, record = cache.prepare(mount, lambda d, t: seen.append((d, t)))
    assert sorted(str(p.relative_to(files)) for p in files.rglob("*") if p.is_file()) == ["a.csv", "sub/b.bin"]
    assert seen[0] == (0, 4000) and seen[-1] == (4000, 4000)
    assert record["objects"] == 2 and record["downloaded"] == 4000 and set(record["etags"]) == {"a.csv", "sub/b.bin"}
    assert not (tmp_path / "escape").exists() and not any(tmp_path.rglob("escape"))

    client.put_object(Bucket="mount-data", Key="raw/a.csv", Body=b"A" * 10)
    client.delete_object(Bucket="mount-data", Key="raw/sub/b.bin")
    client.put_object(Bucket="mount-data", Key="raw/new.txt", Body=b"n" * 5)
    seen.clear()
    files2, record2 = cache.prepare(mount, lambda d, t: seen.append((d, t)))
    assert files2 == files and seen[-1] == (15, 15)  # only the changed and the new object
    assert (files / "a.csv").read_bytes() == b"A" * 10 and not (files / "sub" / "b.bin").exists()
    assert record2["etags"]["a.csv"] != record["etags"]["a.csv"]
    seen.clear()
    assert cache.prepare(mount, lambda d, t: seen.append((d, t)))[1]["downloaded"] == 0 and seen == [(0, 0)]


def test_a_write_back_mount_uploads_what_the_runtime_added_or_changed(s3: S3Endpoint, tmp_path: Path) -> None:
    cache = _cache(s3, tmp_path)
    client: Any = cache.client
    client.create_bucket(Bucket="mount-rw")
    client.put_object(Bucket="mount-rw", Key="p/keep.txt", Body=b"same")
    client.put_object(Bucket="mount-rw", Key="p/edit.txt", Body=b"old")
    mount = S3Mount(target="/data", bucket="mount-rw", prefix="p/", writeback=True)
    files, _ = cache.prepare(mount, lambda d, t: None)
    mine = cache.writable_copy(mount, files, "rt_1")
    (mine / "edit.txt").write_text("new text")
    (mine / "made" / "here.txt").parent.mkdir()
    (mine / "made" / "here.txt").write_text("added")
    assert (files / "edit.txt").read_text() == "old"  # the shared cache is untouched
    assert sorted(cache.write_back(mount, "rt_1")) == ["p/edit.txt", "p/made/here.txt"]
    assert client.get_object(Bucket="mount-rw", Key="p/made/here.txt")["Body"].read() == b"added"
    assert client.get_object(Bucket="mount-rw", Key="p/edit.txt")["Body"].read() == b"new text"


@pytest.mark.parametrize("key", ["p/", "p/a//b", "p/./a", "p/../a", "p/a/..", "p/a\x00b"])
def test_keys_that_cannot_be_a_path_under_the_mount_are_skipped(key: str) -> None:
    assert safe_relative(key, "p/") is None
