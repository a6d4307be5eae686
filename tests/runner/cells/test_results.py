"""Results: the scanner on real directories, and one contract run on every results store.

The stores run against the local filesystem and against a real HTTP S3 endpoint (moto's server,
tests/fixtures/s3.py), marked ``s3``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from envs.kit.config import load_settings
from envs.kit.errors import InvalidInputError, ServiceUnavailableError
from runner.cells.result_files import (
    CHUNK_SIZE,
    LocalStore,
    ResultChangedError,
    ResultNotFoundError,
    ResultStore,
    ResultStoreError,
    S3Store,
    ScannedFile,
    scan,
    store_from_settings,
)
from runner.settings import Settings
from tests.fixtures.s3 import FAKE_SECRET_KEY, S3Endpoint, fake_aws_env, start_s3


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes, mtime_ns: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


# An mtime well in the past: the scanner hashes such files at once.
OLD = 1_700_000_000_000_000_000


# --- scan ---------------------------------------------------------------------------------


def test_first_scan_reports_every_regular_file_with_posix_paths_relative_to_the_root(
    tmp_path: Path,
) -> None:
    write(tmp_path / "a.txt", b"alpha")
    write(tmp_path / "plots" / "b.png", b"\x89PNG")
    write(tmp_path / "plots" / "deep" / "er" / "c.csv", b"1,2\n")
    write(tmp_path / "empty.bin", b"")

    index, changed = scan(tmp_path)

    assert set(index) == {"a.txt", "plots/b.png", "plots/deep/er/c.csv", "empty.bin"}
    assert sorted(f.path for f in changed) == sorted(index)
    c = index["plots/deep/er/c.csv"]
    assert c == ScannedFile(
        path="plots/deep/er/c.csv",
        sha256=sha(b"1,2\n"),
        size=4,
        mtime_ns=(tmp_path / "plots/deep/er/c.csv").stat().st_mtime_ns,
    )
    assert index["empty.bin"].sha256 == sha(b"")


def test_second_scan_reports_new_and_changed_files_and_drops_deleted_ones(tmp_path: Path) -> None:
    write(tmp_path / "same.txt", b"unchanged", OLD)
    write(tmp_path / "edit.txt", b"version-1", OLD)
    write(tmp_path / "gone.txt", b"bye", OLD)
    first, _ = scan(tmp_path)

    write(tmp_path / "edit.txt", b"version-2", OLD + 1_000)  # same size, new mtime
    (tmp_path / "gone.txt").unlink()
    write(tmp_path / "sub" / "new.txt", b"hello", OLD)
    second, changed = scan(tmp_path, first)

    assert {f.path for f in changed} == {"edit.txt", "sub/new.txt"}
    assert second["edit.txt"].sha256 == sha(b"version-2")
    assert second["same.txt"] == first["same.txt"]
    assert "gone.txt" not in second
    assert set(first) - set(second) == {"gone.txt"}

    third, changed_again = scan(tmp_path, second)
    assert changed_again == []
    assert third == second


def test_files_with_the_same_size_and_mtime_are_not_rehashed(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", b"aaaa", OLD)
    first, _ = scan(tmp_path)
    write(f, b"bbbb", OLD)  # content changed behind (size, mtime_ns): trusted, not re-read

    second, changed = scan(tmp_path, first)

    assert changed == []
    assert second["a.txt"].sha256 == sha(b"aaaa")


def test_a_touched_file_with_the_same_content_is_indexed_again_but_not_reported(
    tmp_path: Path,
) -> None:
    f = write(tmp_path / "a.txt", b"same", OLD)
    first, _ = scan(tmp_path)
    os.utime(f, ns=(OLD + 5, OLD + 5))

    second, changed = scan(tmp_path, first)

    assert changed == []
    assert second["a.txt"].mtime_ns == OLD + 5
    assert second["a.txt"].sha256 == first["a.txt"].sha256


def test_a_file_written_just_before_the_scan_is_hashed_as_it_is_then(tmp_path: Path) -> None:
    f = write(tmp_path / "fresh.txt", b"just written")
    index, _ = scan(tmp_path)
    assert index["fresh.txt"].sha256 == sha(b"just written")
    assert index["fresh.txt"].mtime_ns == f.stat().st_mtime_ns


def test_symlinks_are_skipped_wherever_they_point(tmp_path: Path) -> None:
    root = tmp_path / "results"
    write(root / "real.txt", b"real")
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "etc").symlink_to("/etc", target_is_directory=True)
    (root / "inside").symlink_to(root / "real.txt")
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    write(tmp_path / "outside" / "secret.txt", b"secret")
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(tmp_path / "outside", target_is_directory=True)

    index, changed = scan(root)

    assert set(index) == {"real.txt"}
    assert [f.path for f in changed] == ["real.txt"]


def test_fifos_and_sockets_are_skipped_without_blocking(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", b"a")
    os.mkfifo(tmp_path / "pipe")
    sock_dir = Path(f"/tmp/envctl-sock-{uuid.uuid4().hex[:8]}")  # AF_UNIX paths are short
    sock_dir.mkdir()
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(sock_dir / "s"))
        write(sock_dir / "b.txt", b"b")
        os.mkfifo(sock_dir / "pipe")
        try:
            assert set(scan(sock_dir)[0]) == {"b.txt"}
        finally:
            s.close()
    finally:
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()

    assert set(scan(tmp_path)[0]) == {"a.txt"}


def test_names_that_are_not_utf8_are_skipped(tmp_path: Path) -> None:
    write(tmp_path / "ok.txt", b"ok")
    fd = os.open(os.path.join(os.fsencode(tmp_path), b"bad-\xff.txt"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)

    assert set(scan(tmp_path)[0]) == {"ok.txt"}


def test_a_missing_root_is_an_empty_index(tmp_path: Path) -> None:
    assert scan(tmp_path / "nothing-yet") == ({}, [])


def test_scan_stops_at_max_files_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(7):
        write(tmp_path / f"f{i}.txt", str(i).encode(), OLD)

    with caplog.at_level(logging.WARNING, logger="runner.cells.result_files"):
        index, changed = scan(tmp_path, max_files=5)

    assert len(index) == 5 and len(changed) == 5
    assert any("max_files" in r.getMessage() for r in caplog.records)


def test_files_and_directories_vanishing_mid_scan_are_left_out_without_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real removal, made to happen between listing a directory and opening the entry."""
    write(tmp_path / "keep.txt", b"keep", OLD)
    write(tmp_path / "vanish.txt", b"gone soon", OLD)
    write(tmp_path / "vanishing-dir" / "x.txt", b"x", OLD)
    real_open = os.open

    def open_after_removal(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if path == "vanish.txt":
            os.unlink(path, dir_fd=dir_fd)
        if path == "vanishing-dir":
            os.unlink("x.txt", dir_fd=real_open("vanishing-dir", os.O_RDONLY, dir_fd=dir_fd))
            os.rmdir(path, dir_fd=dir_fd)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_after_removal)
    index, changed = scan(tmp_path)

    assert set(index) == {"keep.txt"}
    assert [f.path for f in changed] == ["keep.txt"]


# --- stores: one contract, every store ----------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    yield from start_s3()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ResultStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(
        f"envctl-test-{uuid.uuid4().hex[:12]}",
        prefix="results/",
        endpoint_url=endpoint.url,
        region=endpoint.region,
        create_bucket=True,
    )


def stored_objects(store: ResultStore) -> list[str]:
    """Every object the store holds, temporary ones included."""
    if isinstance(store, LocalStore):
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert isinstance(store, S3Store)
    if not store._bucket_ready:  # never used: the bucket is not even made yet
        return []
    pages = store._client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def object_name(store: ResultStore, digest: str) -> str:
    """Where ``digest`` is kept, as stored_objects() lists it."""
    if isinstance(store, LocalStore):
        return f"sha256/{digest[:2]}/{digest[2:]}"
    assert isinstance(store, S3Store)
    return f"{store.prefix}sha256/{digest}"


def test_put_then_open_returns_the_same_bytes(store: ResultStore, tmp_path: Path) -> None:
    data = os.urandom(3000) + b"end"
    src = write(tmp_path / "src" / "a.bin", data)
    digest = sha(data)
    assert not store.exists(digest)

    store.put(digest, src)

    assert store.exists(digest)
    assert store.size(digest) == len(data)
    assert b"".join(store.open(digest)) == data


def test_an_empty_file_round_trips(store: ResultStore, tmp_path: Path) -> None:
    src = write(tmp_path / "empty", b"")
    store.put(sha(b""), src)
    assert store.size(sha(b"")) == 0
    assert b"".join(store.open(sha(b""))) == b""


def test_put_twice_is_idempotent_and_does_not_read_the_source_again(store: ResultStore, tmp_path: Path) -> None:
    src = write(tmp_path / "a.txt", b"twice")
    store.put(sha(b"twice"), src)
    before = stored_objects(store)
    src.unlink()

    store.put(sha(b"twice"), src)  # already there: the missing source is never opened

    assert stored_objects(store) == before
    assert b"".join(store.open(sha(b"twice"))) == b"twice"


def test_two_files_with_the_same_content_are_stored_once(store: ResultStore, tmp_path: Path) -> None:
    write(tmp_path / "r" / "one.txt", b"same content")
    write(tmp_path / "r" / "nested" / "two.txt", b"same content")
    write(tmp_path / "r" / "other.txt", b"other content")
    _, changed = scan(tmp_path / "r")
    assert len(changed) == 3

    for f in changed:
        store.put(f.sha256, tmp_path / "r" / f.path)

    assert stored_objects(store) == sorted(
        object_name(store, sha(data)) for data in (b"same content", b"other content")
    )


def test_open_of_a_missing_hash_is_a_404(store: ResultStore) -> None:
    missing = sha(b"never stored")
    with pytest.raises(ResultNotFoundError) as err:
        store.open(missing)
    assert err.value.status == 404
    assert err.value.code == "result_not_found"
    with pytest.raises(ResultNotFoundError):
        store.size(missing)
    assert not store.exists(missing)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "A" * 64,
        "g" * 64,
        "0" * 63,
        "0" * 65,
        "0" * 64 + "\n",
        "../" * 21 + "a",
        "0" * 62 + "/x",
    ],
)
def test_a_string_that_is_not_a_sha256_is_invalid_input_everywhere(
    store: ResultStore, tmp_path: Path, bad: str
) -> None:
    src = write(tmp_path / "a", b"a")
    for call in (
        lambda: store.exists(bad),
        lambda: store.open(bad),
        lambda: store.size(bad),
        lambda: store.put(bad, src),
    ):
        with pytest.raises(InvalidInputError) as err:
            call()
        assert err.value.field == "sha256"
    assert stored_objects(store) == []


def test_a_source_that_does_not_match_its_hash_is_refused_and_nothing_is_stored(
    store: ResultStore, tmp_path: Path
) -> None:
    src = write(tmp_path / "a.txt", b"changed since the scan")
    claimed = sha(b"what the scan saw")

    with pytest.raises(ResultChangedError) as err:
        store.put(claimed, src)

    assert err.value.status == 409
    assert not store.exists(claimed)
    assert stored_objects(store) == []


def test_a_symlink_or_fifo_source_is_refused(store: ResultStore, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/etc/passwd")
    with pytest.raises(ResultChangedError):
        store.put(sha(Path("/etc/passwd").read_bytes()), link)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ResultChangedError):
        store.put(sha(b""), tmp_path / "pipe")
    with pytest.raises(ResultChangedError):
        store.put(sha(b"x"), tmp_path / "no-such-file")
    assert stored_objects(store) == []


def test_a_large_file_is_stored_verified_and_streamed_in_chunks(store: ResultStore, tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024 + 123)
    src = write(tmp_path / "big.bin", data)
    digest = sha(data)

    store.put(digest, src)

    h = hashlib.sha256()
    chunks = 0
    for chunk in store.open(digest):
        assert 0 < len(chunk) <= CHUNK_SIZE
        h.update(chunk)
        chunks += 1
    assert h.hexdigest() == digest
    assert chunks >= 20
    assert store.size(digest) == len(data)
    assert stored_objects(store) == [object_name(store, digest)]  # no temporary object left


def test_a_large_file_that_does_not_match_its_hash_leaves_nothing_behind(store: ResultStore, tmp_path: Path) -> None:
    src = write(tmp_path / "big.bin", os.urandom(9 * 1024 * 1024))
    with pytest.raises(ResultChangedError):
        store.put(sha(b"something else"), src)
    assert stored_objects(store) == []


# --- local store specifics ----------------------------------------------------------------


def test_the_local_store_keeps_read_only_files_under_sha256_ab_rest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "results")
    digest = sha(b"layout")
    store.put(digest, write(tmp_path / "a", b"layout"))

    path = tmp_path / "results" / "sha256" / digest[:2] / digest[2:]
    assert path.read_bytes() == b"layout"
    assert path.stat().st_mode & 0o222 == 0
    assert list((tmp_path / "results" / "tmp").iterdir()) == []


# --- s3 store specifics -------------------------------------------------------------------


@pytest.mark.s3
def test_s3_keys_are_prefix_sha256_hex(s3_endpoint: S3Endpoint, tmp_path: Path) -> None:
    store = S3Store(
        f"envctl-test-{uuid.uuid4().hex[:12]}",
        prefix="team/results",  # a missing trailing slash is added
        endpoint_url=s3_endpoint.url,
        create_bucket=True,
    )
    digest = sha(b"key layout")
    store.put(digest, write(tmp_path / "a", b"key layout"))
    assert stored_objects(store) == [f"team/results/sha256/{digest}"]


@pytest.mark.s3
def test_s3_missing_bucket_is_named_when_not_told_to_create_it(s3_endpoint: S3Endpoint) -> None:
    bucket = f"envctl-missing-{uuid.uuid4().hex[:12]}"
    store = S3Store(bucket, endpoint_url=s3_endpoint.url)
    with pytest.raises(ResultStoreError) as err:
        store.exists(sha(b"x"))
    assert bucket in err.value.message and s3_endpoint.url in err.value.message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_s3_unreachable_endpoint_is_service_unavailable_naming_the_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in fake_aws_env().items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = S3Store("envctl-results", endpoint_url=f"http://someone:hunter2@{endpoint[7:]}", max_attempts=1)

    for call in (lambda: store.exists(sha(b"x")), lambda: store.open(sha(b"x"))):
        with pytest.raises(ServiceUnavailableError) as err:
            call()
        message = err.value.message
        assert endpoint in message and "envctl-results" in message
        assert "Traceback" not in message and "hunter2" not in message and FAKE_SECRET_KEY not in message
        assert err.value.status == 503
        assert err.value.details["endpoint"] == endpoint


def test_s3_without_credentials_says_where_they_come_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in fake_aws_env():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    store = S3Store("envctl-results", endpoint_url=f"http://127.0.0.1:{_closed_port()}", max_attempts=1)

    with pytest.raises(ResultStoreError) as err:
        store.exists(sha(b"x"))
    assert "AWS_ACCESS_KEY_ID" in err.value.message and "envctl-results" in err.value.message


# --- choosing a store ---------------------------------------------------------------------


def test_the_local_store_is_the_default_and_lives_under_the_data_dir(settings: Settings) -> None:
    store = store_from_settings(settings)
    assert isinstance(store, LocalStore)
    assert store.root == settings.data_dir / "results"


def test_the_s3_store_is_built_from_its_settings(settings: Settings) -> None:
    store = store_from_settings(
        settings.with_overrides(
            results_store="s3",
            results_s3_bucket="bucket-a",
            results_s3_prefix="p",
            results_s3_endpoint_url="http://127.0.0.1:9",
            results_s3_region="eu-west-3",
        )
    )
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region) == (
        "bucket-a",
        "p/",
        "http://127.0.0.1:9",
        "eu-west-3",
    )


def test_the_s3_store_needs_a_bucket(settings: Settings) -> None:
    with pytest.raises(InvalidInputError) as err:
        store_from_settings(settings.with_overrides(results_store="s3"))
    assert err.value.field == "results_s3_bucket"


def test_an_unknown_store_name_lists_the_known_ones(settings: Settings) -> None:
    with pytest.raises(InvalidInputError) as err:
        store_from_settings(settings.with_overrides(results_store="gcs"))
    assert err.value.field == "results_store"
    assert "'gcs'" in err.value.message and "local, s3" in err.value.message


def test_results_settings_come_from_a_config_section_and_from_variables(tmp_path: Path) -> None:
    config = tmp_path / "envctl.yaml"
    config.write_text("results:\n  store: s3\n  s3_bucket: from-file\n  s3_prefix: envctl/\n")

    s = load_settings(Settings, config, env={"ENVCTL_RESULTS_S3_ENDPOINT_URL": "http://minio:9000"})

    assert (s.results_store, s.results_s3_bucket, s.results_s3_prefix) == ("s3", "from-file", "envctl/")
    assert s.results_s3_endpoint_url == "http://minio:9000"
    assert s.results_s3_region == "us-east-1"
    assert load_settings(Settings, config, env={"ENVCTL_RESULTS_STORE": "local"}).results_store == "local"


@pytest.mark.s3
def test_an_s3_presigned_put_stores_an_apps_bundle_under_its_sha256(s3_endpoint: S3Endpoint) -> None:
    """An app's bundle goes to S3 through a presigned URL (runner/apps/deploy.py): no credential
    travels with the PUT, and the object is found by its sha256 afterwards."""
    import hashlib

    import httpx

    store = S3Store(f"envctl-test-{uuid.uuid4().hex[:12]}", prefix="r/", endpoint_url=s3_endpoint.url,
                    region=s3_endpoint.region, create_bucket=True)  # fmt: skip
    data = os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    url, headers = store.presign_put(sha, 60)
    assert s3_endpoint.secret_key not in url
    assert httpx.put(url, content=data, headers=headers).status_code == 200
    assert store.exists(sha) and b"".join(store.open(sha)) == data
