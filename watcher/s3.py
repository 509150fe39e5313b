"""The S3 boundary: the only module importing boto3/botocore; maps their errors to watcher's.

boto3 and botocore are imported on the first S3 request, not with this module: they cost
~15 MB of RSS and ~0.2 s of start-up, and a daemon with every artifact prefetched, or a
watcherctl command that never talks to S3, should not pay for them.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from watcher.config import S3Settings
from watcher.errors import (
    ArtifactError,
    ArtifactRefused,
    S3AccessDenied,
    S3Error,
    S3NotFound,
    S3Unavailable,
)

T = TypeVar("T")

CHUNK_SIZE = 256 * 1024
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AllAccessDisabled",
        "AccountProblem",
        "403",
        "Forbidden",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
        "429",
        "RequestLimitExceeded",
        "TooManyRequests",
    }
)
_CONTENT_RANGE_RE = re.compile(r"^bytes ([0-9]+)-([0-9]+)/([0-9]+)\Z")


def map_s3_error(exc: BaseException, *, endpoint: str, where: str) -> S3Error:
    """Translate a botocore/urllib3 error into the watcher tree (the caller raises ``from``).

    ``where`` names what was being done, e.g. ``"GET s3://bucket/key"``.
    """
    import botocore.exceptions as bexc
    from boto3.exceptions import Boto3Error

    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, Boto3Error) and isinstance(exc.__context__, Exception):
        # the transfer manager wraps the real failure (S3UploadFailedError ...)
        return map_s3_error(exc.__context__, endpoint=endpoint, where=where)
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {}) or {}
        meta = exc.response.get("ResponseMetadata", {}) or {}
        code = str(err.get("Code", "") or "")
        status = int(meta.get("HTTPStatusCode", 0) or 0)
        message = str(err.get("Message", "") or code or f"HTTP {status}")
        detail = f"{where} at {endpoint}: {code or status}: {message}"
        if code in _ACCESS_CODES or status == 403:
            return S3AccessDenied(f"access denied: {detail}")
        if code in _MISSING_CODES or status == 404:
            return S3NotFound(f"not found: {detail}")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return S3Unavailable(f"S3 unavailable: {detail}")
        return S3Error(f"S3 refused the request: {detail}")
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return S3AccessDenied(f"no usable AWS credentials for {where} at {endpoint}: {exc}")
    if isinstance(exc, bexc.IncompleteReadError):
        return S3Unavailable(f"S3 unavailable: truncated body for {where} at {endpoint}: {exc}")
    if isinstance(exc, bexc.BotoCoreError | OSError | ConnectionError):
        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
        # ResponseStreamingError, urllib3 protocol errors surfaced as OSError ...
        return S3Unavailable(f"S3 unavailable: {where} at {endpoint}: {type(exc).__name__}: {exc}")
    return S3Error(f"S3 request failed: {where} at {endpoint}: {type(exc).__name__}: {exc}")


class S3Store:
    """One bucket/prefix of an S3-compatible store.

    Every request has explicit connect/read timeouts; botocore's own retries are off
    (``total_max_attempts=1``): single calls (``head``, ``upload_file``, ``ensure_bucket``)
    are retried here on transient errors within ``retry_deadline``; a streamed GET
    (``open_range``) is never retried here, its caller resumes with a range request.
    """

    def __init__(
        self,
        settings: S3Settings,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        retry_deadline: float = 30.0,
    ) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/")
        self.retry_deadline = retry_deadline
        self.endpoint = settings.endpoint_url or (
            f"s3.{settings.region}.amazonaws.com" if settings.region else "s3.amazonaws.com"
        )
        self._timeouts = (connect_timeout, read_timeout)
        self._client_made: Any = None
        self._client_lock = threading.Lock()

    @property
    def _client(self) -> Any:
        """The boto3 S3 client, made (and boto3 imported) on first use; thread-safe."""
        with self._client_lock:
            if self._client_made is None:
                self._client_made = self._make_client()
            return self._client_made

    def _make_client(self) -> Any:
        import boto3.session
        from botocore.config import Config as BotoConfig

        settings = self.settings
        connect_timeout, read_timeout = self._timeouts
        config = BotoConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": 1},
            s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
            region_name=settings.region or None,
            # Only compute/verify checksums where S3 requires them: S3-compatible stores
            # differ in their support for the newer flexible checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=settings.endpoint_url or None,
            region_name=settings.region or None,
            config=config,
        )

    # ---- names -------------------------------------------------------------------------

    def app_prefix(self, app: str) -> str:
        """``<prefix>/<app>/``: where publish puts the app's artifacts."""
        return f"{self.prefix}/{app}/" if self.prefix else f"{app}/"

    def key_for(self, app: str, artifact_id: str, ext: str) -> str:
        """``<prefix>/<app>/<id>.<ext>``."""
        return f"{self.app_prefix(app)}{artifact_id}.{ext.lstrip('.')}"

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def parse_url(self, url: str, *, app: str | None = None) -> str:
        """The key of ``s3://<bucket>/<key>``; ArtifactRefused unless bucket and prefix match,
        and, given ``app``, unless the key is under ``<prefix>/<app>/`` (where publish puts
        that app's artifacts: a record must not make one app's hosts fetch another's)."""
        if not isinstance(url, str) or not url.startswith("s3://"):
            raise ArtifactRefused(f"artifact url {url!r} is not s3://bucket/key")
        bucket, sep, key = url[len("s3://") :].partition("/")
        if not sep or not key:
            raise ArtifactRefused(f"artifact url {url!r} has no object key")
        if bucket != self.bucket:
            raise ArtifactRefused(
                f"artifact url {url!r} is outside the configured bucket {self.bucket!r}"
            )
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\\" in key or "\x00" in key:
            raise ArtifactRefused(f"artifact url {url!r} has an empty, '.' or '..' key segment")
        if posixpath.normpath(key) != key:
            raise ArtifactRefused(f"artifact url {url!r} has a non-normal key")
        if self.prefix and not key.startswith(self.prefix + "/"):
            raise ArtifactRefused(
                f"artifact url {url!r} is outside the configured prefix "
                f"s3://{self.bucket}/{self.prefix}/"
            )
        if app is not None:
            home = self.app_prefix(app)
            if not key.startswith(home) or "/" in key[len(home) :]:
                raise ArtifactRefused(
                    f"artifact url {url!r} is not an object of app {app} "
                    f"(s3://{self.bucket}/{home}<file>)"
                )
        return key

    # ---- requests ----------------------------------------------------------------------

    def _fail(self, exc: BaseException, where: str) -> NoReturn:
        raise map_s3_error(exc, endpoint=self.endpoint, where=where) from exc

    def _call(self, where: str, fn: Callable[[], T]) -> T:
        """Run one request, mapping its errors; retried on transient errors to the deadline."""

        def once() -> T:
            try:
                return fn()
            except S3Error:
                raise
            except Exception as exc:
                self._fail(exc, where)

        retrying = Retrying(
            retry=retry_if_exception_type(S3Unavailable),
            stop=stop_before_delay(self.retry_deadline),
            wait=wait_exponential(multiplier=0.2, max=5.0) + wait_random(0, 0.3),
            reraise=True,
        )
        return retrying(once)

    def head(self, key: str) -> dict[str, Any] | None:
        """``{"size", "sha256" (object metadata, "" when absent), "etag"}``; None if missing."""
        where = f"HEAD {self.url_for(key)}"
        try:
            resp = self._call(where, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        except S3NotFound:
            return None
        meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
        return {
            "size": int(resp.get("ContentLength", 0)),
            "sha256": str(meta.get("sha256", "")),
            "etag": str(resp.get("ETag", "")).strip('"'),
        }

    def open_range(self, key: str, start: int = 0) -> tuple[Iterator[bytes], int]:
        """Stream the object from byte ``start``: ``(chunks, total object size)``.

        Not retried. Errors while iterating (reset, timeout, truncated body) raise
        S3Unavailable; the iterator checks the response carried all its bytes.
        """
        where = f"GET {self.url_for(key)}" + (f" from byte {start}" if start else "")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start:
            kwargs["Range"] = f"bytes={start}-"
        try:
            resp = self._client.get_object(**kwargs)
        except Exception as exc:
            self._fail(exc, where)
        length = int(resp.get("ContentLength", 0))
        total = start + length
        content_range = str(resp.get("ContentRange") or "")
        if start:
            match = _CONTENT_RANGE_RE.match(content_range)
            if not match or int(match.group(1)) != start:
                with contextlib.suppress(Exception):
                    resp["Body"].close()
                raise S3Error(
                    f"{where} at {self.endpoint}: server ignored the range request "
                    f"(Content-Range {content_range!r})"
                )
            total = int(match.group(3))
        return _BodyStream(self._chunks(resp["Body"], length, where), resp["Body"]), total

    def _chunks(self, body: Any, length: int, where: str) -> Iterator[bytes]:
        got = 0
        try:
            while True:
                try:
                    chunk = body.read(CHUNK_SIZE)
                except Exception as exc:
                    self._fail(exc, where)
                if not chunk:
                    break
                got += len(chunk)
                yield chunk
            if got < length:
                raise S3Unavailable(
                    f"S3 unavailable: truncated body for {where} at "
                    f"{self.endpoint}: got {got} of {length} bytes"
                )
        finally:
            with contextlib.suppress(Exception):
                body.close()

    def upload_file(
        self,
        path: str | Path,
        key: str,
        *,
        sha256: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload ``path`` to ``key`` with ``x-amz-meta-sha256``; ``progress(bytes so far)``."""
        where = f"PUT {self.url_for(key)}"
        sent = [0]

        def callback(n: int) -> None:
            sent[0] += n
            if progress is not None:
                progress(sent[0])

        def put() -> None:
            from boto3.s3.transfer import TransferConfig

            sent[0] = 0
            self._client.upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={"Metadata": {"sha256": sha256}},
                Callback=callback,
                Config=TransferConfig(use_threads=False),
            )

        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ArtifactError(
                f"cannot read {path} for upload to {self.url_for(key)}: {exc.strerror or exc}"
            ) from exc
        self._call(where, put)

    def create_file(
        self,
        path: str | Path,
        key: str,
        *,
        sha256: str,
        progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Upload ``path`` to ``key`` only if no object is there yet (``If-None-Match: *``);
        False when one already exists (nothing is overwritten, whoever wrote it)."""
        return self._put_if(path, key, sha256=sha256, progress=progress, if_none_match="*")

    def replace_file(
        self,
        path: str | Path,
        key: str,
        *,
        etag: str,
        sha256: str,
        progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Overwrite the object at ``key`` with ``path`` only if it is still the one with
        ``etag`` (``If-Match``); False when it changed or went away meanwhile."""
        return self._put_if(path, key, sha256=sha256, progress=progress, if_match=etag)

    def _put_if(
        self,
        path: str | Path,
        key: str,
        *,
        sha256: str,
        progress: Callable[[int], None] | None,
        if_none_match: str = "",
        if_match: str = "",
    ) -> bool:
        """One conditional PUT of ``path``; False when its condition does not hold."""
        condition = f"If-None-Match: {if_none_match}" if if_none_match else f"If-Match: {if_match}"
        where = f"PUT {self.url_for(key)} ({condition})"
        extra: dict[str, Any] = {"IfNoneMatch": if_none_match} if if_none_match else {}
        if if_match:
            extra["IfMatch"] = if_match if if_match.startswith('"') else f'"{if_match}"'

        def put() -> bool:
            import botocore.exceptions as bexc  # loaded with boto3, on the first S3 call

            with open(path, "rb") as fh:
                body = _CountingReader(fh, progress)
                try:
                    self._client.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=body,
                        ContentLength=Path(path).stat().st_size,
                        Metadata={"sha256": sha256},
                        **extra,
                    )
                except bexc.ClientError as exc:
                    code = str(exc.response.get("Error", {}).get("Code", ""))
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                        409,
                        412,
                    ):
                        return False
                    if if_match and (code in _MISSING_CODES or status == 404):
                        return False  # If-Match on an object that is gone
                    raise
            return True

        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ArtifactError(
                f"cannot read {path} for upload to {self.url_for(key)}: {exc.strerror or exc}"
            ) from exc
        return self._call(where, put)

    def delete(self, key: str) -> None:
        """Remove an object this publish created (an upload that did not verify)."""
        where = f"DELETE {self.url_for(key)}"
        self._call(where, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))

    def ensure_bucket(self) -> None:
        """Create the bucket when missing (tests and demos only)."""
        where = f"CREATE s3://{self.bucket}"

        def create() -> None:
            import botocore.exceptions as bexc

            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except bexc.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code not in ("404", "NoSuchBucket", "NotFound"):
                    raise
            args: dict[str, Any] = {"Bucket": self.bucket}
            region = self.settings.region
            if region and region != "us-east-1":
                args["CreateBucketConfiguration"] = {"LocationConstraint": region}
            self._client.create_bucket(**args)

        self._call(where, create)


class _BodyStream(Iterator[bytes]):
    """The chunks of a response body; ``close()`` releases the connection even when no chunk
    was read (closing a generator that never started does not run its ``finally``)."""

    def __init__(self, chunks: Iterator[bytes], body: Any) -> None:
        self._chunks = chunks
        self._body = body

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        with contextlib.suppress(Exception):
            self._body.close()


class _CountingReader:
    """A file object for boto3 that reports how many bytes were read."""

    def __init__(self, fh: Any, progress: Callable[[int], None] | None) -> None:
        self._fh = fh
        self._progress = progress
        self._sent = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._fh.read(size)
        self._sent += len(data)
        if self._progress is not None and data:
            self._progress(self._sent)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if offset == 0 and whence == 0:
            self._sent = 0
        pos: int = self._fh.seek(offset, whence)
        return pos

    def tell(self) -> int:
        pos: int = self._fh.tell()
        return pos
