"""Result stores: where the files cells wrote under ``/results`` are kept, by content.

A store checks every sha256 it is handed (64 lowercase hex digits) before it builds a path or a
key from it, and verifies the hash of what it stores: a source whose content no longer matches
raises :class:`ResultChangedError` and nothing is stored under that hash. ``LocalStore`` keeps
them under the data directory, ``S3Store`` in a bucket of any S3 API (boto3).
"""

from __future__ import annotations

import abc
import base64
import hashlib
import logging
import os
import re
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol
from urllib.parse import urlsplit, urlunsplit

from envs.kit.errors import EnvctlError, InvalidInputError, ServiceUnavailableError
from runner.errors import ResultChangedError, ResultNotFoundError, ResultStoreError
from runner.settings import Settings

log = logging.getLogger("runner.cells.result_files")

CHUNK_SIZE = 1024 * 1024  # bytes per chunk when hashing, copying and streaming
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a regular file, never through a link
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex digits; raise ``InvalidInputError`` if not."""
    if not isinstance(sha256, str) or _SHA256_RE.fullmatch(sha256) is None:
        shown = repr(sha256)[:80]
        raise InvalidInputError(f"sha256: {shown} is not a sha256 digest (64 lowercase hex digits)", field="sha256")
    return sha256


def digest_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK_SIZE, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _open_source(source: Path, sha256: str) -> IO[bytes]:
    """Open a result file for reading: a regular file, not through a final symlink."""
    try:
        fd = os.open(source, FILE_FLAGS)
    except OSError as exc:
        raise ResultChangedError(
            f"result file {source} cannot be read ({exc.strerror or exc}); it may have been removed",
            details={"sha256": sha256},
        ) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ResultChangedError(f"result file {source} is not a regular file", details={"sha256": sha256})
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _changed(source: Path, expected: str, actual: str) -> ResultChangedError:
    return ResultChangedError(
        f"result file {source} changed while it was being stored: "
        f"expected sha256 {expected}, read {actual}; nothing was stored",
        details={"sha256": expected, "actual_sha256": actual},
    )


# --- stores -------------------------------------------------------------------------------


class ResultStore(abc.ABC):
    """Keeps result contents by sha256. Implement put, exists, open, size.

    - Every method checks its sha256 (64 lowercase hex digits) first: InvalidInputError if not.
    - put() is idempotent and content-addressed: if the hash is already stored it does nothing
      (it does not even read the source). Otherwise it stores the source's bytes and verifies
      they hash to ``sha256``; if not, it raises ResultChangedError and stores nothing.
    - open() and size() raise ResultNotFoundError for an absent hash; open() checks before it
      returns, and the iterator yields chunks of at most CHUNK_SIZE bytes.
    - Store faults raise ResultStoreError (or ServiceUnavailableError when unreachable), with the
      cause kept and no credentials in the message.
    """

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings: Settings) -> ResultStore: ...

    @abc.abstractmethod
    def put(self, sha256: str, source: Path) -> None: ...

    @abc.abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    def open(self, sha256: str) -> Iterator[bytes]: ...

    @abc.abstractmethod
    def size(self, sha256: str) -> int: ...


def _not_found(sha256: str) -> ResultNotFoundError:
    return ResultNotFoundError(f"no stored result with sha256 {sha256}", details={"sha256": sha256})


class LocalStore(ResultStore):
    """Files under ``<root>/sha256/<ab>/<rest>``; written to ``<root>/tmp`` then renamed."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStore:
        return cls(settings.data_dir / "results")

    def path_of(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path_of(sha256).stat().st_size
        except FileNotFoundError:
            raise _not_found(sha256) from None

    def open(self, sha256: str) -> Iterator[bytes]:
        try:
            f = self.path_of(sha256).open("rb")
        except FileNotFoundError:
            raise _not_found(sha256) from None
        except OSError as exc:
            raise self._fault("read", exc) from exc
        return _read_chunks(f)

    def put(self, sha256: str, source: Path) -> None:
        final = self.path_of(sha256)
        if final.is_file():
            return
        tmp_dir = self.root / "tmp"
        tmp = tmp_dir / f"{sha256[:16]}-{uuid.uuid4().hex}.part"
        with _open_source(Path(source), sha256) as src:
            try:
                tmp_dir.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with tmp.open("xb") as dst:
                    while chunk := src.read(CHUNK_SIZE):
                        h.update(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                actual = h.hexdigest()
                if actual != sha256:
                    raise _changed(Path(source), sha256, actual)
                tmp.chmod(0o444)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
            except OSError as exc:
                raise self._fault("write", exc) from exc
            finally:
                tmp.unlink(missing_ok=True)

    def _fault(self, action: str, exc: OSError) -> ResultStoreError:
        return ResultStoreError(
            f"cannot {action} the results store at {self.root}: {exc.strerror or exc}",
            details={"store": self.name, "root": str(self.root)},
        )


def _read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK_SIZE):
            yield chunk


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _HashingReader:
    """A read-only, non-seekable view of a file that hashes what it hands out."""

    def __init__(self, f: _Readable) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


class S3Store(ResultStore):
    """Objects ``<prefix>sha256/<hex>`` in an S3 bucket (AWS, MinIO, Ceph, ...) through boto3.

    Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, instance roles). Nothing touches the network until the first call; that
    call checks the bucket once, and creates it when ``create_bucket`` is set.

    Small files are read into memory, hashed, and stored with one PUT that carries the sha256
    for S3 to check. Large ones are uploaded (multipart) to ``<prefix>tmp/<random>`` while being
    hashed, then copied to their final key only if the hash matches.
    """

    name = "s3"
    SINGLE_PUT_MAX = 8 * 1024 * 1024

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        create_bucket: bool = False,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket:
            raise InvalidInputError("results_s3_bucket: a bucket name is needed", field="results_s3_bucket")
        self.bucket = bucket
        prefix = prefix.lstrip("/")
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.endpoint_url = endpoint_url or None
        self.region = region
        self.create_bucket = create_bucket
        config = Config(
            region_name=region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        session = boto3.session.Session(region_name=region)
        self._client: Any = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=self.SINGLE_PUT_MAX,
            multipart_chunksize=self.SINGLE_PUT_MAX,
            max_concurrency=4,
        )
        self._bucket_ready = False
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        if not settings.results_s3_bucket:
            raise InvalidInputError(
                "results_s3_bucket: the s3 results store needs a bucket "
                "(ENVCTL_RESULTS_S3_BUCKET or results.s3_bucket in the config file)",
                field="results_s3_bucket",
            )
        return cls(
            settings.results_s3_bucket,
            prefix=settings.results_s3_prefix,
            endpoint_url=settings.results_s3_endpoint_url,
            region=settings.results_s3_region,
        )

    @property
    def endpoint(self) -> str:
        """The endpoint for messages: the URL without any user:password part."""
        if not self.endpoint_url:
            return f"AWS S3 ({self.region})"
        parts = urlsplit(self.endpoint_url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def key_of(self, sha256: str) -> str:
        return f"{self.prefix}sha256/{check_sha256(sha256)}"

    # -- contract --

    def exists(self, sha256: str) -> bool:
        key = self.key_of(sha256)
        self._ensure_bucket()
        return self._head(key) is not None

    def size(self, sha256: str) -> int:
        key = self.key_of(sha256)
        self._ensure_bucket()
        head = self._head(key)
        if head is None:
            raise _not_found(sha256)
        return int(head["ContentLength"])

    def open(self, sha256: str) -> Iterator[bytes]:
        key = self.key_of(sha256)
        self._ensure_bucket()
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                raise _not_found(sha256) from None
            raise self._translate(exc, "read a result from") from exc
        return self._stream(response["Body"])

    def put(self, sha256: str, source: Path) -> None:
        key = self.key_of(sha256)
        self._ensure_bucket()
        if self._head(key) is not None:
            return
        with _open_source(Path(source), sha256) as f:
            head = f.read(self.SINGLE_PUT_MAX + 1)
            if len(head) <= self.SINGLE_PUT_MAX:
                actual = hashlib.sha256(head).hexdigest()
                if actual != sha256:
                    raise _changed(Path(source), sha256, actual)
                checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
                self._call(
                    "store a result in",
                    lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=head, ChecksumSHA256=checksum),
                )
                return
            self._put_large(sha256, key, Path(source), head, f)

    def presign_put(self, sha256: str, seconds: int) -> tuple[str, dict[str, str]]:
        """A URL that PUTs ``sha256``'s object for ``seconds`` without credentials (an app's
        bundle, uploaded by its author: runner/apps/deploy.py), and the headers to send with it.
        S3 does not check the content against the hash; whoever reads it does."""
        key = self.key_of(sha256)
        self._ensure_bucket()
        url = self._call(
            "presign an upload to",
            lambda: self._client.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=seconds
            ),
        )
        return str(url), {}

    def presign_get(self, sha256: str, seconds: int) -> str:
        """A URL that reads ``sha256``'s object for ``seconds`` without credentials (an app's
        bundle, downloaded by the app server that deploys it)."""
        key = self.key_of(sha256)
        self._ensure_bucket()
        url = self._call(
            "presign a download from",
            lambda: self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=seconds
            ),
        )
        return str(url)

    # -- helpers --

    def _put_large(self, sha256: str, key: str, source: Path, head: bytes, f: IO[bytes]) -> None:
        reader = _HashingReader(_Prepend(head, f))
        tmp_key = f"{self.prefix}tmp/{uuid.uuid4().hex}"
        try:
            self._call(
                "upload a result to",
                lambda: self._client.upload_fileobj(reader, self.bucket, tmp_key, Config=self._transfer),
            )
            actual = reader.hash.hexdigest()
            if actual != sha256:
                raise _changed(source, sha256, actual)
            self._call(
                "store a result in",
                lambda: self._client.copy(
                    {"Bucket": self.bucket, "Key": tmp_key}, self.bucket, key, Config=self._transfer
                ),
            )
        finally:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=tmp_key)
            except Exception as exc:  # noqa: BLE001 - best effort; the original error matters
                log.warning("could not remove temporary object %s from bucket %s: %s", tmp_key, self.bucket, exc)

    def _stream(self, body: Any) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(CHUNK_SIZE)
        except Exception as exc:
            raise self._translate(exc, "read a result from") from exc
        finally:
            body.close()

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise self._translate(exc, "look up a result in") from exc
        return head

    def _call(self, action: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except EnvctlError:
            raise
        except Exception as exc:
            raise self._translate(exc, action) from exc

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._lock:
            if self._bucket_ready:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except Exception as exc:
                if not _is_missing(exc):
                    raise self._translate(exc, "check") from exc
                if not self.create_bucket:
                    raise ResultStoreError(
                        f"the results bucket {self.bucket!r} does not exist at {self.endpoint}; "
                        "create it, or check ENVCTL_RESULTS_S3_BUCKET",
                        details=self._details(),
                    ) from exc
                self._create_bucket()
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except Exception as exc:
            if _error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise self._translate(exc, "create") from exc
        log.info("created results bucket %s at %s", self.bucket, self.endpoint)

    def _details(self, **extra: Any) -> dict[str, Any]:
        return {"store": self.name, "bucket": self.bucket, "endpoint": self.endpoint, **extra}

    def _translate(self, exc: BaseException, action: str) -> EnvctlError:
        """A boto error as an envctl error naming the bucket and endpoint, never credentials."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            CredentialRetrievalError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = f"bucket {self.bucket!r} at {self.endpoint}"
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return ServiceUnavailableError(
                f"the S3 endpoint {self.endpoint} is not reachable: could not {action} bucket "
                f"{self.bucket!r} ({type(exc).__name__}); check ENVCTL_RESULTS_S3_ENDPOINT_URL "
                "and that the service runs",
                details=self._details(reason="unreachable"),
            )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return ResultStoreError(
                f"no usable S3 credentials to {action} {where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, for the envctl server",
                details=self._details(reason="no_credentials"),
            )
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return ResultStoreError(
                    f"S3 refused to let envctl {action} {where} ({code or status}); "
                    "check the credentials and the bucket's policy",
                    details=self._details(reason="denied", s3_code=code),
                )
            if code == "NoSuchBucket":
                return ResultStoreError(
                    f"the results bucket {self.bucket!r} does not exist at {self.endpoint}",
                    details=self._details(reason="no_such_bucket"),
                )
            return ResultStoreError(
                f"S3 failed to {action} {where}: {code or 'error'} (HTTP {status})",
                details=self._details(reason="s3_error", s3_code=code, http_status=status),
            )
        if isinstance(exc, S3UploadFailedError):
            return ResultStoreError(
                f"S3 failed to {action} {where}: the upload failed", details=self._details(reason="upload_failed")
            )
        return ResultStoreError(
            f"S3 failed to {action} {where}: {type(exc).__name__}",
            details=self._details(reason=type(exc).__name__),
        )


class _Prepend:
    """Bytes already read, then the rest of a file: read-only and not seekable."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes, short only at the end (uploaders take a short read as a part)."""
        if not self._head:
            return self._rest.read(n)
        if n is None or n < 0 or n > len(self._head):
            data, self._head = self._head, b""
            return data + self._rest.read(-1 if n is None or n < 0 else n - len(data))
        data, self._head = self._head[:n], self._head[n:]
        return data


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _is_missing(exc: BaseException) -> bool:
    """A ClientError that says: no such key (or bucket, for head_bucket)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or _error_code(exc) in ("404", "NoSuchKey", "NoSuchBucket", "NotFound")


# --- choosing a store ---------------------------------------------------------------------

STORES: dict[str, type[ResultStore]] = {cls.name: cls for cls in (LocalStore, S3Store)}


def store_from_settings(settings: Settings) -> ResultStore:
    """The results store named by ``settings.results_store``; an unknown name lists the known ones."""
    try:
        cls = STORES[settings.results_store]
    except KeyError:
        raise InvalidInputError(
            f"results_store: {settings.results_store[:64]!r} is unknown; "
            f"known results stores: {', '.join(sorted(STORES))}",
            field="results_store",
            details={"known": sorted(STORES)},
        ) from None
    return cls.from_settings(settings)
