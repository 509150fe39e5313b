"""Artifact fetch (streamed, sha256-verified, resumable, retried) into a size-bounded LRU cache.

Layout of ``<app_dir>/artifacts/``:

- ``<id>-<sha256[:12]>.<format>``: a verified artifact. A file only ever gets this name by
  ``rename(2)`` of a partial whose size and full sha256 matched the record (file fsynced
  before, directory after). Trust on use: the name must carry the record's sha prefix AND
  the file's size must equal the record's (a cheap ``stat`` on every use; no sidecar
  marker, so there is no second file to keep consistent). ``verify()`` re-hashes on demand.
- ``.partial-<id>-<sha256[:12]>``: a download in progress, ``flock``-ed by its writer. A
  later fetch resumes it with a range request (hashing its bytes first); a mismatch deletes
  it; ``cleanup()`` removes ones older than a day that nobody holds.

Last use is the file's mtime (set on every fetch); ``evict()`` removes the least recently
used verified artifacts until the total is within ``max_bytes``, never a protected one.

A download whose size or sha256 does not match (or that S3 answers with 403) gets one fresh
download from byte 0 before the fetch fails: one corrupted response must not fail a host,
and so a whole fleet's deploy. Both attempts are logged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from watcher.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    S3AccessDenied,
    S3Unavailable,
    StagingCancelled,
)
from watcher.fsutil import sha256_of
from watcher.log import get_logger
from watcher.records import ArtifactRecord
from watcher.s3 import S3Store

PARTIAL_PREFIX = ".partial-"
STALE_PARTIAL_AGE = 24 * 3600.0
FILE_MODE = 0o640
HASH_CHUNK = 1024 * 1024
FINAL_RE = re.compile(
    r"^(?P<id>[A-Za-z0-9][A-Za-z0-9._-]{0,127})-(?P<sha>[0-9a-f]{12})\.(?P<fmt>tar\.gz|tar\.zst|tar)\Z"
)
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

log = get_logger(module="artifacts")


@dataclass(frozen=True)
class CachedArtifact:
    """A verified file in the cache."""

    name: str
    artifact_id: str
    sha_prefix: str
    size: int
    last_used: float


class _Restart(Exception):
    """A resumed partial inherited from an earlier process did not verify: start over once."""


_CANCEL_POLL = 0.05  # seconds between two looks at ``cancel`` while waiting


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactCache:
    """Verified artifacts of one app under ``<app_dir>/artifacts/``."""

    def __init__(
        self,
        app_dir: Path,
        store: S3Store,
        *,
        max_bytes: int,
        timeout: float,
        app: str | None = None,
        on_bytes: Callable[[float], None] | None = None,
        on_fetched: Callable[[float], None] | None = None,
    ) -> None:
        """``on_bytes(n)``: n more bytes came from S3 (every attempt's, as they arrive);
        ``on_fetched(seconds)``: a download ended verified in the cache, after that long
        (a cache hit is no fetch). The daemon's metrics."""
        self.app_dir = Path(app_dir)
        self._on_bytes = on_bytes
        self._on_fetched = on_fetched
        self.dir = self.app_dir / "artifacts"
        self.store = store
        self.app = app  # when set, an artifact's object must be under <prefix>/<app>/
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._downloading: dict[str, _Download] = {}  # in progress, by artifact id

    def busy(self) -> bool:
        """A download is in progress."""
        return bool(self._downloading)

    def downloads(self) -> dict[str, dict[str, int]]:
        """Downloads in progress, by artifact id: bytes verified so far and the size."""
        return {
            artifact: {"have": d.state.length, "size": d.size}
            for artifact, d in list(self._downloading.items())
        }

    def trouble(self, artifact_id: str) -> str:
        """Why a download in progress is retrying (its last attempt's error), or "": what a
        prepare deadline that passes meanwhile reports as the reason."""
        d = self._downloading.get(artifact_id)
        return d.trouble if d else ""

    # ---- names -------------------------------------------------------------------------

    @staticmethod
    def file_name(record: ArtifactRecord) -> str:
        return f"{record.id}-{record.sha256[:12]}.{record.format}"

    def path_for(self, record: ArtifactRecord) -> Path:
        return self.dir / self.file_name(record)

    def partial_path_for(self, record: ArtifactRecord) -> Path:
        return self.dir / f"{PARTIAL_PREFIX}{record.id}-{record.sha256[:12]}"

    # ---- cache queries -----------------------------------------------------------------

    def is_cached(self, record: ArtifactRecord) -> bool:
        """A verified file for the record is present (name carries the sha, size matches)."""
        try:
            st = os.lstat(self.path_for(record))
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == record.size

    def verify(self, record: ArtifactRecord) -> Path:
        """Re-hash a cached file; a mismatch deletes it and raises ArtifactIntegrityError."""
        path = self.path_for(record)
        if not self.is_cached(record):
            raise ArtifactError(f"artifact {record.id} is not cached at {path}")
        got = sha256_of(path, HASH_CHUNK)
        if got != record.sha256:
            path.unlink(missing_ok=True)
            raise ArtifactIntegrityError(
                f"cached artifact {record.id} at {path}: sha256 mismatch: expected "
                f"{record.sha256}, got {got} (file removed)"
            )
        return path

    def touch(self, record: ArtifactRecord) -> None:
        """Mark the record's file as used now (LRU order)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path_for(record))

    def entries(self) -> list[CachedArtifact]:
        """Verified artifacts in the cache, least recently used first."""
        found: list[CachedArtifact] = []
        try:
            scan = list(os.scandir(self.dir))
        except FileNotFoundError:
            return []
        for entry in scan:
            match = FINAL_RE.match(entry.name)
            if not match:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            found.append(
                CachedArtifact(entry.name, match["id"], match["sha"], st.st_size, st.st_mtime)
            )
        found.sort(key=lambda e: (e.last_used, e.name))
        return found

    # ---- eviction and clean-up ---------------------------------------------------------

    def evict(self, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Remove LRU verified artifacts until the total is <= max_bytes; returns file names.

        ``protect`` holds artifact ids and/or sha256 digests (full or 12-digit prefix) that
        must stay (releases, the deploy in flight). Partials are never touched here.
        """
        shas = {p[:12] for p in protect if re.fullmatch(r"[0-9a-f]{12}|[0-9a-f]{64}", p)}
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed: list[str] = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry.artifact_id in protect or entry.sha_prefix in shas:
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.dir / entry.name).unlink()
            total -= entry.size
            removed.append(entry.name)
            log.info(
                "artifact_evicted", artifact=entry.artifact_id, file=entry.name, size=entry.size
            )
        if removed:
            _fsync_dir(self.dir)
        if total > self.max_bytes:
            log.warning(
                "artifact_cache_over_budget",
                total=total,
                max_bytes=self.max_bytes,
                protected=sorted(protect),
            )
        return removed

    def cleanup(self, *, max_age: float = STALE_PARTIAL_AGE) -> list[str]:
        """Remove ``.partial-*`` files older than ``max_age`` that no writer holds."""
        removed: list[str] = []
        try:
            scan = list(os.scandir(self.dir))
        except FileNotFoundError:
            return removed
        now = time.time()
        for entry in scan:
            if not entry.name.startswith(PARTIAL_PREFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if now - st.st_mtime < max_age:
                continue
            if stat.S_ISREG(st.st_mode) and self._held(Path(entry.path)):
                continue
            with contextlib.suppress(FileNotFoundError):
                Path(entry.path).unlink()
            removed.append(entry.name)
            log.info("artifact_partial_removed", file=entry.name, age_s=int(now - st.st_mtime))
        if removed:
            _fsync_dir(self.dir)
        return removed

    @staticmethod
    def _held(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # ---- fetch -------------------------------------------------------------------------

    def fetch(
        self,
        record: ArtifactRecord,
        *,
        protect: set[str] | frozenset[str] = frozenset(),
        cancel: Callable[[], bool] | None = None,
    ) -> Path:
        """A verified local file for ``record``, downloading (or resuming) it when missing.

        Raises ArtifactRefused (URL outside the bucket/prefix/app, before any request),
        ArtifactIntegrityError (size/sha256 mismatch twice, the second time on a fresh
        download; partial removed), S3NotFound, S3AccessDenied (twice), S3Unavailable (gave
        up at the deadline ``timeout``), ArtifactError (disk full or other local write
        failure; partial removed), StagingCancelled (``cancel()`` said so; checked between
        chunks and while waiting, the bytes so far stay for a later resume). Afterwards
        evicts LRU artifacts over budget, never this one nor ``protect``.
        """
        key = self.store.parse_url(record.url, app=self.app)
        final = self.path_for(record)
        if self.is_cached(record):
            self.touch(record)
            return final
        self.dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        deadline = started + self.timeout
        fd = self._open_locked_partial(record, deadline, cancel)
        try:
            if self.is_cached(record):  # a concurrent fetch finished while we waited
                self.touch(record)
                return final
            try:
                self._download_twice(record, key, fd, deadline, cancel)
            except (S3Unavailable, StagingCancelled):
                if os.fstat(fd).st_size == 0:
                    self._discard(self.partial_path_for(record))
                raise  # bytes so far stay in the partial: the next fetch resumes them
            except BaseException:
                self._discard(self.partial_path_for(record))
                raise
            self.partial_path_for(record).rename(final)
            _fsync_dir(self.dir)
        finally:
            os.close(fd)
        if self._on_fetched is not None:
            self._on_fetched(time.monotonic() - started)
        self.touch(record)
        self.evict(set(protect) | {record.id, record.sha256})
        return final

    def _download_twice(
        self,
        record: ArtifactRecord,
        key: str,
        fd: int,
        deadline: float,
        cancel: Callable[[], bool] | None,
    ) -> None:
        """``_download``; on a mismatch or a 403, once more from byte 0 (both are logged)."""
        first: str | None = None
        while True:
            try:
                self._download(record, key, fd, deadline, cancel, retried_after=first)
                return
            except (_Restart, ArtifactIntegrityError, S3AccessDenied) as exc:
                reason = str(exc)
                if first is not None:
                    log.error(
                        "artifact_fetch_failed_twice",
                        artifact=record.id,
                        attempt=2,
                        error=reason,
                        first_error=first,
                    )
                    if isinstance(exc, _Restart):  # pragma: no cover - only inherited once
                        raise
                    again = (
                        "the same on a fresh download"
                        if reason == first
                        else f"on a fresh download; the first attempt failed too: {first}"
                    )
                    raise type(exc)(f"{reason} ({again})") from exc
                first = reason
                log.warning(
                    "artifact_fetch_retry_fresh",
                    artifact=record.id,
                    attempt=1,
                    error=reason,
                    next="fresh download from byte 0",
                )
                os.ftruncate(fd, 0)

    def _open_locked_partial(
        self, record: ArtifactRecord, deadline: float, cancel: Callable[[], bool] | None = None
    ) -> int:
        """Open and flock the partial; retried if another writer renamed/removed it meanwhile."""
        partial = self.partial_path_for(record)
        while True:
            try:
                fd = os.open(
                    partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
                )
            except OSError as exc:
                raise self._local_error(exc, record, partial) from exc
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancel is not None and cancel():
                        os.close(fd)
                        raise StagingCancelled(
                            f"download of {record.id} cancelled while another process "
                            f"held {partial}"
                        ) from None
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise ArtifactError(
                            f"download of {record.id} to {partial} is held by another "
                            f"process for longer than {self.timeout:.0f}s"
                        ) from None
                    time.sleep(0.05)
            try:
                same = partial.lstat().st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # renamed into place or deleted by the previous holder: reopen

    def _download(
        self,
        record: ArtifactRecord,
        key: str,
        fd: int,
        deadline: float,
        cancel: Callable[[], bool] | None = None,
        *,
        retried_after: str | None = None,
    ) -> None:
        inherited = os.fstat(fd).st_size
        state = _HashState()
        started = time.monotonic()
        download = self._downloading[record.id] = _Download(state, record.size)

        def before_sleep(rs: RetryCallState) -> None:
            exc = rs.outcome.exception() if rs.outcome else None
            download.trouble = f"attempt {rs.attempt_number} failed: {exc}"
            log.warning(
                "artifact_fetch_retry",
                artifact=record.id,
                attempt=rs.attempt_number,
                have=state.length,
                error=str(exc),
            )

        def sleep(seconds: float) -> None:
            """Wait between retries, in slices, so a cancel is seen within 50 ms."""
            until = time.monotonic() + seconds
            while True:
                _check_cancel(cancel, record, state.length)
                left = until - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(left, _CANCEL_POLL))

        retrying = Retrying(
            retry=retry_if_exception_type(S3Unavailable),
            stop=stop_before_delay(max(deadline - time.monotonic(), 0.0)),
            wait=wait_exponential(multiplier=0.1, max=5.0) + wait_random(0, 0.3),
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )
        attempts = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempts += 1
                    self._attempt(record, key, fd, deadline, state, cancel)
        except S3Unavailable as exc:
            raise S3Unavailable(
                f"download of {record.id} from {record.url} gave up after {attempts} "
                f"attempt(s) in {time.monotonic() - started:.1f}s (deadline "
                f"{self.timeout:.0f}s): {exc}"
            ) from exc
        finally:
            self._downloading.pop(record.id, None)
        digest = state.hasher.hexdigest()
        if state.length != record.size or digest != record.sha256:
            if inherited:
                log.warning(
                    "artifact_partial_discarded",
                    artifact=record.id,
                    inherited=inherited,
                    expected=record.sha256,
                    actual=digest,
                )
                raise _Restart(
                    f"artifact {record.id}: the {inherited} bytes of a partial download "
                    f"left by an earlier process did not verify (sha256 {digest})"
                )
            raise ArtifactIntegrityError(
                f"artifact {record.id} from {record.url}: sha256 mismatch: expected "
                f"{record.sha256}, got {digest} (size {state.length}); partial removed"
            )
        partial = self.partial_path_for(record)
        try:
            os.fsync(fd)
        except OSError as exc:
            self._discard(partial)
            raise self._local_error(exc, record, partial) from exc
        log.info(
            "artifact_fetched",
            artifact=record.id,
            size=record.size,
            resumed_from=inherited,
            attempts=attempts,
            took_ms=int((time.monotonic() - started) * 1000),
            **({"retried_after": retried_after} if retried_after else {}),
        )

    def _attempt(
        self,
        record: ArtifactRecord,
        key: str,
        fd: int,
        deadline: float,
        state: _HashState,
        cancel: Callable[[], bool] | None = None,
    ) -> None:
        partial = self.partial_path_for(record)
        have = os.fstat(fd).st_size
        if have > record.size:
            raise ArtifactIntegrityError(
                f"artifact {record.id} from {record.url}: size mismatch: expected "
                f"{record.size} bytes, got more ({have}); partial removed"
            )
        if state.length != have:  # (re)hash what is already on disk
            state.reset()
            os.lseek(fd, 0, os.SEEK_SET)
            while state.length < have:
                chunk = os.read(fd, min(HASH_CHUNK, have - state.length))
                if not chunk:
                    break
                state.update(chunk)
            have = state.length
        if have == record.size and have > 0:
            return  # complete; the caller verifies the digest
        chunks, total = self.store.open_range(key, have)
        if total != record.size:
            close = getattr(chunks, "close", None)
            if close is not None:  # give the connection back to the pool
                close()
            raise ArtifactIntegrityError(
                f"artifact {record.id} from {record.url}: size mismatch: expected "
                f"{record.size} bytes, the object has {total}"
                + ("; partial removed" if have else "; nothing downloaded")
            )
        os.lseek(fd, have, os.SEEK_SET)
        try:
            for chunk in chunks:
                if state.length + len(chunk) > record.size:
                    raise ArtifactIntegrityError(
                        f"artifact {record.id} from {record.url}: size mismatch: expected "
                        f"{record.size} bytes, got more; partial removed"
                    )
                self._write_all(fd, chunk, record, partial)
                state.update(chunk)
                if self._on_bytes is not None:
                    self._on_bytes(len(chunk))
                if time.monotonic() > deadline:
                    raise S3Unavailable(
                        f"deadline of {self.timeout:.0f}s passed while downloading "
                        f"{record.id} ({state.length} of {record.size} bytes)"
                    )
                _check_cancel(cancel, record, state.length)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if state.length < record.size:
            raise S3Unavailable(
                f"truncated body for {record.url}: have {state.length} of {record.size} bytes"
            )

    def _write_all(self, fd: int, data: bytes, record: ArtifactRecord, partial: Path) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            self._discard(partial)
            raise self._local_error(exc, record, partial) from exc

    @staticmethod
    def _local_error(exc: OSError, record: ArtifactRecord, partial: Path) -> ArtifactError:
        if exc.errno in _DISK_FULL:
            return ArtifactError(f"disk full while downloading {record.id} to {partial}")
        return ArtifactError(
            f"cannot write {partial} while downloading {record.id}: {exc.strerror or exc}"
        )

    @staticmethod
    def _discard(partial: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _check_cancel(cancel: Callable[[], bool] | None, record: ArtifactRecord, have: int) -> None:
    if cancel is not None and cancel():
        raise StagingCancelled(
            f"download of {record.id} cancelled at {have} of {record.size} bytes "
            "(kept for a later resume)"
        )


@dataclass
class _Download:
    """One download in progress: its running hash (how far it is), the size it must reach,
    and the last failed attempt's error while it retries."""

    state: _HashState
    size: int
    trouble: str = ""


class _HashState:
    """sha256 of the bytes of the partial file seen so far."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.length = 0

    def reset(self) -> None:
        self.hasher = hashlib.sha256()
        self.length = 0

    def update(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.length += len(chunk)
