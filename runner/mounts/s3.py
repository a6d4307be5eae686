"""S3 mounts: a bucket prefix downloaded through boto3 into an ETag-aware cache.

``<data dir>/mounts/s3/<hash of endpoint, bucket, prefix>/`` holds ``files/`` (the objects
under the prefix, by their key after it) and ``index.json`` (key -> ETag and size of what
``files/`` holds). A boot lists the prefix and downloads only the objects whose ETag changed
or that are new (into a temporary file, then renamed), and removes files whose object is
gone, reporting bytes done of bytes to fetch. ``files/`` is bound read-only.

With ``writeback``, the runtime gets its own copy (``<data dir>/mounts/s3-rw/<runtime>/...``)
bound read-write, and ``write_back`` uploads on stop what the runtime added or changed there
(files deleted in the runtime are not deleted from the bucket).

Keys that cannot be a file path (empty parts, ``.`` or ``..``, NUL, a key that is also a
"folder" of another) are skipped and counted, never written outside ``files/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from runner.mounts.cache import locked
from runner.mounts.errors import MountFetchError
from runner.mounts.validate import S3Mount

Progress = Callable[[int, int], None]  # (bytes done, bytes to fetch)
RECORD_OBJECTS = 1000  # at most this many key -> ETag pairs in an execution's record


def safe_relative(key: str, prefix: str) -> str | None:
    """The file path a key takes under the mount, or None when it cannot be one."""
    rel = key[len(prefix) :]
    if not rel or rel.endswith("/") or "\x00" in rel:
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return rel


class S3Cache:
    def __init__(self, root: Path, endpoint_url: str | None = None, region: str = "us-east-1") -> None:
        self.root = root
        self.endpoint_url = endpoint_url or None
        self.region = region
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            )
            session = boto3.session.Session(region_name=self.region)
            self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def cache_dir(self, mount: S3Mount) -> Path:
        key = f"{self.endpoint_url or 'aws'}\n{mount.bucket}\n{mount.prefix}"
        return self.root / "s3" / hashlib.sha256(key.encode()).hexdigest()[:32]

    def _list(self, mount: S3Mount) -> dict[str, dict[str, Any]]:
        """key after the prefix -> {"key", "etag", "size"} of every object under the prefix."""
        found: dict[str, dict[str, Any]] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=mount.bucket, Prefix=mount.prefix)
            for page in pages:
                for obj in page.get("Contents") or ():
                    rel = safe_relative(str(obj["Key"]), mount.prefix)
                    if rel is not None:
                        etag = str(obj.get("ETag", "")).strip('"')
                        found[rel] = {"key": obj["Key"], "etag": etag, "size": int(obj.get("Size", 0))}
        except Exception as exc:
            raise MountFetchError(
                f"could not list s3://{mount.bucket}/{mount.prefix}: {exc}",
                details={"bucket": mount.bucket, "prefix": mount.prefix},
            ) from exc
        # a key that is also the "folder" of another cannot be a file: skip it
        folders = {rel.rsplit("/", i)[0] for rel in found for i in range(1, rel.count("/") + 1)}
        return {rel: obj for rel, obj in found.items() if rel not in folders}

    def prepare(self, mount: S3Mount, progress: Progress) -> tuple[Path, dict[str, Any]]:
        """The cache's ``files/`` for the mount, brought up to date; the record of its objects."""
        cache = self.cache_dir(mount)
        with locked(cache.with_suffix(".lock")):
            files = cache / "files"
            files.mkdir(parents=True, exist_ok=True)
            index_path = cache / "index.json"
            try:
                index: dict[str, dict[str, Any]] = json.loads(index_path.read_text())
            except (OSError, ValueError):
                index = {}
            listing = self._list(mount)
            wanted = {
                rel: obj
                for rel, obj in listing.items()
                if index.get(rel, {}).get("etag") != obj["etag"] or not (files / rel).is_file()
            }
            total = sum(obj["size"] for obj in wanted.values())
            done = 0
            last = 0.0
            progress(0, total)
            for rel, obj in sorted(wanted.items()):
                self._download(mount, obj, files / rel)
                index[rel] = {"etag": obj["etag"], "size": obj["size"]}
                done += obj["size"]
                if time.monotonic() - last > 0.5 or done == total:
                    last = time.monotonic()
                    progress(done, total)
            for rel in sorted(set(index) - set(listing)):
                (files / rel).unlink(missing_ok=True)
                index.pop(rel)
            tmp = index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(index))
            tmp.replace(index_path)
        etags = {rel: obj["etag"] for rel, obj in sorted(listing.items())}
        digest = hashlib.sha256(json.dumps(etags, sort_keys=True).encode()).hexdigest()
        record = {
            "objects": len(etags),
            "bytes": sum(obj["size"] for obj in listing.values()),
            "downloaded": total,
            "etags_sha256": digest,
            "etags": dict(list(etags.items())[:RECORD_OBJECTS]),
        }
        return files, record

    def _download(self, mount: S3Mount, obj: dict[str, Any], dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
        os.close(fd)
        try:
            self.client.download_file(mount.bucket, obj["key"], tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except Exception as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise MountFetchError(
                f"could not download s3://{mount.bucket}/{obj['key']}: {exc}",
                details={"bucket": mount.bucket, "key": obj["key"]},
            ) from exc

    # ------------------------------------------------------------------ write-back
    def writable_copy(self, mount: S3Mount, files: Path, runtime_id: str) -> Path:
        """The runtime's own copy of ``files`` for a write-back mount, and what it held."""
        mine = self.root / "s3-rw" / runtime_id / self.cache_dir(mount).name
        shutil.rmtree(mine, ignore_errors=True)
        shutil.copytree(files, mine / "files", copy_function=shutil.copy2)
        state = {rel: _stamp(mine / "files" / rel) for rel in _walk(mine / "files")}
        (mine / "copied.json").write_text(json.dumps(state))
        return mine / "files"

    def write_back(self, mount: S3Mount, runtime_id: str) -> list[str]:
        """Upload what the runtime added or changed in its copy; the keys uploaded."""
        mine = self.root / "s3-rw" / runtime_id / self.cache_dir(mount).name
        try:
            copied: dict[str, list[int]] = json.loads((mine / "copied.json").read_text())
        except (OSError, ValueError):
            return []
        uploaded = []
        for rel in _walk(mine / "files"):
            if copied.get(rel) == _stamp(mine / "files" / rel):
                continue
            key = mount.prefix + rel
            try:
                self.client.upload_file(str(mine / "files" / rel), mount.bucket, key)
            except Exception as exc:
                raise MountFetchError(
                    f"could not write s3://{mount.bucket}/{key} back: {exc}", details={"bucket": mount.bucket}
                ) from exc
            uploaded.append(key)
        return uploaded

    def forget(self, runtime_id: str) -> None:
        shutil.rmtree(self.root / "s3-rw" / runtime_id, ignore_errors=True)


def _walk(root: Path) -> Iterator[str]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield str(path.relative_to(root))


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]
