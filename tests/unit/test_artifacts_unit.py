"""S3 URL rules, error mapping, and the artifact cache's LRU eviction and clean-up (no server)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
)

from watcher.artifacts import ArtifactCache
from watcher.config import S3Settings
from watcher.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactRefused,
    S3AccessDenied,
    S3Error,
    S3NotFound,
    S3Unavailable,
)
from watcher.records import ArtifactRecord
from watcher.s3 import S3Store, map_s3_error

# Nothing listens here: a test that accidentally talks to S3 fails fast and loudly.
DEAD_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """A store whose endpoint nobody serves (these tests must not make requests)."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    return S3Store(
        S3Settings(
            bucket="builds", prefix="artifacts/", region="eu-west-1", endpoint_url=DEAD_ENDPOINT
        ),
        connect_timeout=0.2,
        read_timeout=0.2,
        retry_deadline=0.1,
    )


def record_for(artifact_id: str, data: bytes, store: S3Store) -> ArtifactRecord:
    key = store.key_for("web", artifact_id, "tar.gz")
    return ArtifactRecord(
        id=artifact_id,
        url=store.url_for(key),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def put_cached(cache: ArtifactCache, record: ArtifactRecord, data: bytes, age: float) -> Path:
    """A verified file as fetch() leaves it, last used ``age`` seconds ago."""
    cache.dir.mkdir(parents=True, exist_ok=True)
    path = cache.path_for(record)
    path.write_bytes(data)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


class TestS3Names:
    def test_key_and_url(self, store: S3Store) -> None:
        key = store.key_for("web", "master-15eb13af", "tar.gz")
        assert key == "artifacts/web/master-15eb13af.tar.gz"
        assert store.url_for(key) == "s3://builds/artifacts/web/master-15eb13af.tar.gz"
        assert store.parse_url(store.url_for(key)) == key

    def test_key_without_prefix(self) -> None:
        bare = S3Store(S3Settings(bucket="builds", endpoint_url=DEAD_ENDPOINT))
        assert bare.key_for("web", "a-1", ".tar") == "web/a-1.tar"
        assert bare.parse_url("s3://builds/anything/x.tar") == "anything/x.tar"

    @pytest.mark.parametrize(
        ("url", "why"),
        [
            ("https://builds/artifacts/web/a.tar.gz", "not s3://"),
            ("s3://builds", "no object key"),
            ("s3://builds/", "no object key"),
            ("s3://other/artifacts/web/a.tar.gz", "outside the configured bucket"),
            ("s3://builds-x/artifacts/web/a.tar.gz", "outside the configured bucket"),
            ("s3://builds/web/a.tar.gz", "outside the configured prefix"),
            ("s3://builds/artifactsevil/a.tar.gz", "outside the configured prefix"),
            ("s3://builds/artifacts/../web/a.tar.gz", "'..'"),
            ("s3://builds/artifacts/web/../../x.tar.gz", "'..'"),
            ("s3://builds/artifacts//web/a.tar.gz", "empty"),
            ("s3://builds/artifacts/./web/a.tar.gz", "'.'"),
        ],
    )
    def test_parse_url_refuses(self, store: S3Store, url: str, why: str) -> None:
        with pytest.raises(ArtifactRefused) as info:
            store.parse_url(url)
        assert why in str(info.value) and url in str(info.value)

    def test_given_an_app_the_key_must_be_one_of_its_objects(self, store: S3Store) -> None:
        own = "s3://builds/artifacts/web/master-15eb13af.tar.gz"
        assert store.parse_url(own, app="web") == "artifacts/web/master-15eb13af.tar.gz"
        for url in (
            "s3://builds/artifacts/api/master-15eb13af.tar.gz",  # another app's object
            "s3://builds/artifacts/webx/a.tar.gz",
            "s3://builds/artifacts/web/sub/a.tar.gz",
            "s3://builds/artifacts/a.tar.gz",
        ):
            with pytest.raises(
                ArtifactRefused, match=r"is not an object of app web \(s3://builds/"
            ):
                store.parse_url(url, app="web")
            store.parse_url(url)  # in bucket and prefix: only the app's check refuses it
        bare = S3Store(S3Settings(bucket="builds", endpoint_url=DEAD_ENDPOINT))
        assert bare.parse_url("s3://builds/web/a.tar", app="web") == "web/a.tar"
        with pytest.raises(ArtifactRefused, match="not an object of app web"):
            bare.parse_url("s3://builds/api/a.tar", app="web")


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetObject",
    )


class TestErrorMapping:
    @pytest.mark.parametrize(
        ("code", "status", "expected"),
        [
            ("AccessDenied", 403, S3AccessDenied),
            ("InvalidAccessKeyId", 403, S3AccessDenied),
            ("SignatureDoesNotMatch", 403, S3AccessDenied),
            ("403", 403, S3AccessDenied),
            ("NoSuchKey", 404, S3NotFound),
            ("NoSuchBucket", 404, S3NotFound),
            ("404", 404, S3NotFound),
            ("SlowDown", 503, S3Unavailable),
            ("InternalError", 500, S3Unavailable),
            ("502", 502, S3Unavailable),
            ("TooManyRequests", 429, S3Unavailable),
            ("InvalidRange", 416, S3Error),
        ],
    )
    def test_client_errors(self, code: str, status: int, expected: type[S3Error]) -> None:
        err = map_s3_error(
            client_error(code, status),
            endpoint="http://s3.test",
            where="GET s3://builds/artifacts/web/a.tar.gz",
        )
        assert type(err) is expected
        assert "http://s3.test" in str(err) and "s3://builds/artifacts/web/a.tar.gz" in str(err)

    def test_connection_errors_are_unavailable(self) -> None:
        for exc in (
            EndpointConnectionError(endpoint_url="http://s3.test/x"),
            ReadTimeoutError(endpoint_url="http://s3.test/x"),
            IncompleteReadError(actual_bytes=10, expected_bytes=20),
            ConnectionResetError(104, "Connection reset by peer"),
        ):
            err = map_s3_error(exc, endpoint="http://s3.test", where="GET s3://b/k")
            assert isinstance(err, S3Unavailable), exc

    def test_store_raises_from_the_library_error(self, store: S3Store) -> None:
        started = time.monotonic()
        with pytest.raises(S3Unavailable) as info:
            store.open_range("artifacts/web/a.tar.gz")
        assert time.monotonic() - started < 5
        assert info.value.__cause__ is not None
        assert DEAD_ENDPOINT in str(info.value)


class TestCacheQueries:
    def test_cached_needs_the_sha_name_and_the_right_size(
        self, store: S3Store, tmp_path: Path
    ) -> None:
        cache = ArtifactCache(tmp_path, store, max_bytes=10_000, timeout=1)
        data = b"x" * 100
        record = record_for("master-15eb13af", data, store)
        assert cache.path_for(record).name == f"master-15eb13af-{record.sha256[:12]}.tar.gz"
        assert not cache.is_cached(record)
        path = put_cached(cache, record, data, age=0)
        assert cache.is_cached(record)
        path.write_bytes(data[:-1])  # wrong size: not trusted
        assert not cache.is_cached(record)

    def test_a_symlink_under_the_final_name_is_not_trusted(
        self, store: S3Store, tmp_path: Path
    ) -> None:
        cache = ArtifactCache(tmp_path, store, max_bytes=10_000, timeout=1)
        data = b"y" * 50
        record = record_for("master-15eb13af", data, store)
        target = tmp_path / "elsewhere"
        target.write_bytes(data)
        cache.dir.mkdir()
        cache.path_for(record).symlink_to(target)
        assert not cache.is_cached(record)

    def test_fetch_of_a_cached_artifact_makes_no_request_and_marks_it_used(
        self, store: S3Store, tmp_path: Path
    ) -> None:
        cache = ArtifactCache(tmp_path, store, max_bytes=10_000, timeout=1)
        data = b"z" * 10
        record = record_for("master-15eb13af", data, store)
        path = put_cached(cache, record, data, age=3600)
        assert cache.fetch(record) == path  # the dead endpoint would raise S3Unavailable
        assert time.time() - path.stat().st_mtime < 60

    def test_verify_removes_a_cached_file_that_no_longer_hashes(
        self, store: S3Store, tmp_path: Path
    ) -> None:
        cache = ArtifactCache(tmp_path, store, max_bytes=10_000, timeout=1)
        data = b"q" * 10
        record = record_for("master-15eb13af", data, store)
        path = put_cached(cache, record, b"Q" * 10, age=0)
        with pytest.raises(ArtifactIntegrityError, match=record.sha256):
            cache.verify(record)
        assert not path.exists()
        with pytest.raises(ArtifactError, match="not cached"):
            cache.verify(record)


class TestEviction:
    def make(
        self, store: S3Store, tmp_path: Path, max_bytes: int
    ) -> tuple[ArtifactCache, list[ArtifactRecord]]:
        cache = ArtifactCache(tmp_path, store, max_bytes=max_bytes, timeout=1)
        records = []
        for i, age in enumerate([400, 300, 200, 100]):  # a0 is least recently used
            data = bytes([i]) * 1000
            record = record_for(f"a{i}", data, store)
            put_cached(cache, record, data, age=age)
            records.append(record)
        return cache, records

    def test_lru_order_until_within_budget(self, store: S3Store, tmp_path: Path) -> None:
        cache, records = self.make(store, tmp_path, max_bytes=2500)
        removed = cache.evict(set())
        assert removed == [cache.path_for(records[0]).name, cache.path_for(records[1]).name]
        assert [cache.is_cached(r) for r in records] == [False, False, True, True]

    def test_recent_use_changes_the_order(self, store: S3Store, tmp_path: Path) -> None:
        cache, records = self.make(store, tmp_path, max_bytes=3000)
        assert cache.fetch(records[0]) == cache.path_for(records[0])  # used now
        assert cache.evict(set()) == [cache.path_for(records[1]).name]
        assert [cache.is_cached(r) for r in records] == [True, False, True, True]

    def test_protected_by_id_or_sha_are_never_evicted(self, store: S3Store, tmp_path: Path) -> None:
        cache, records = self.make(store, tmp_path, max_bytes=0)
        removed = cache.evict({records[0].id, records[1].sha256, records[2].sha256[:12]})
        assert removed == [cache.path_for(records[3]).name]
        assert [cache.is_cached(r) for r in records] == [True, True, True, False]

    def test_within_budget_nothing_is_evicted(self, store: S3Store, tmp_path: Path) -> None:
        cache, records = self.make(store, tmp_path, max_bytes=4000)
        assert cache.evict(set()) == []
        assert all(cache.is_cached(r) for r in records)

    def test_partials_and_foreign_files_are_left_alone(
        self, store: S3Store, tmp_path: Path
    ) -> None:
        cache, _ = self.make(store, tmp_path, max_bytes=0)
        partial = cache.dir / ".partial-b0-0123456789ab"
        partial.write_bytes(b"p" * 5000)
        other = cache.dir / "README"
        other.write_bytes(b"r")
        assert len(cache.evict(set())) == 4
        assert partial.exists() and other.exists()
        assert cache.entries() == []


class TestCleanup:
    def test_stale_partials_go_fresh_and_held_ones_stay(
        self, store: S3Store, tmp_path: Path
    ) -> None:
        cache = ArtifactCache(tmp_path, store, max_bytes=10_000, timeout=1)
        cache.dir.mkdir()
        old_time = time.time() - 2 * 24 * 3600
        stale = cache.dir / ".partial-a-0123456789ab"
        fresh = cache.dir / ".partial-b-0123456789ab"
        held = cache.dir / ".partial-c-0123456789ab"
        for path in (stale, fresh, held):
            path.write_bytes(b"x")
        for path in (stale, held):
            os.utime(path, (old_time, old_time))
        fd = os.open(held, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert cache.cleanup() == [stale.name]
        finally:
            os.close(fd)
        assert not stale.exists() and fresh.exists() and held.exists()
        assert cache.cleanup() == [held.name]
