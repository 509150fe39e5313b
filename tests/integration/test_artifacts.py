"""Artifact fetch against the real S3 test server, directly and through a fault-injecting proxy."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.support.faulty_s3 import FaultyS3Proxy
from tests.support.s3server import free_port
from watcher.artifacts import ArtifactCache
from watcher.config import AppConfig, S3Settings
from watcher.errors import (
    ArchiveRefused,
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactRefused,
    S3AccessDenied,
    S3NotFound,
    S3Unavailable,
    StagingCancelled,
    StagingError,
)
from watcher.records import ArtifactRecord
from watcher.releases import ReleaseEngine
from watcher.s3 import S3Store

SIZE = 1024 * 1024 + 123  # several read chunks, odd size


def make_store(settings: S3Settings, endpoint_url: str | None = None) -> S3Store:
    if endpoint_url is not None:
        settings = dataclasses.replace(settings, endpoint_url=endpoint_url)
    return S3Store(settings, connect_timeout=1.0, read_timeout=3.0, retry_deadline=3.0)


def publish(
    store: S3Store, tmp_path: Path, artifact_id: str = "master-15eb13af", size: int = SIZE
) -> tuple[ArtifactRecord, bytes]:
    data = os.urandom(size)
    src = tmp_path / f"{artifact_id}.tar.gz"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    key = store.key_for("web", artifact_id, "tar.gz")
    store.upload_file(src, key, sha256=sha)
    record = ArtifactRecord(id=artifact_id, url=store.url_for(key), sha256=sha, size=size)
    return record, data


def publish_tarball(store: S3Store, tmp_path: Path) -> ArtifactRecord:
    """A real release archive (``index.html``) in the S3 server, and its record."""
    src = tmp_path / "build.tar.gz"
    with tarfile.open(src, "w:gz") as tf:
        info = tarfile.TarInfo("index.html")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"v1\n"))
    data = src.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    key = store.key_for("web", "master-15eb13af", "tar.gz")
    store.upload_file(src, key, sha256=sha)
    return ArtifactRecord(id="master-15eb13af", url=store.url_for(key), sha256=sha, size=len(data))


def dir_listing(cache: ArtifactCache) -> list[str]:
    return sorted(p.name for p in cache.dir.iterdir()) if cache.dir.exists() else []


@pytest.fixture
def store(s3_settings: S3Settings) -> S3Store:
    """A store on a fresh bucket of the real S3 test server, with short timeouts."""
    return make_store(s3_settings)


@pytest.fixture
def proxy(s3_settings: S3Settings) -> Iterator[FaultyS3Proxy]:
    """A fault-injecting proxy in front of the S3 test server."""
    assert s3_settings.endpoint_url
    with FaultyS3Proxy(s3_settings.endpoint_url) as running:
        yield running


def proxied_cache(
    s3_settings: S3Settings, proxy: FaultyS3Proxy, app_dir: Path, timeout: float = 10.0
) -> ArtifactCache:
    return ArtifactCache(
        app_dir, make_store(s3_settings, proxy.endpoint_url), max_bytes=100 * SIZE, timeout=timeout
    )


class TestS3Store:
    def test_upload_reports_progress_and_stores_sha_metadata(
        self, store: S3Store, tmp_path: Path
    ) -> None:
        src = tmp_path / "a.tar.gz"
        data = os.urandom(300_000)
        src.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        key = store.key_for("web", "master-15eb13af", "tar.gz")
        seen: list[int] = []
        store.upload_file(src, key, sha256=sha, progress=seen.append)
        assert key == "artifacts/web/master-15eb13af.tar.gz"
        assert seen and seen[-1] == len(data) and seen == sorted(seen)
        head = store.head(key)
        assert head is not None
        assert head["size"] == len(data) and head["sha256"] == sha

    def test_head_of_missing_key_is_none(self, store: S3Store) -> None:
        assert store.head("artifacts/web/nothing.tar.gz") is None

    def test_missing_bucket_is_not_found(self, s3_settings: S3Settings) -> None:
        other = make_store(dataclasses.replace(s3_settings, bucket="no-such-bucket-here"))
        with pytest.raises(S3NotFound, match="no-such-bucket-here"):
            other.open_range("artifacts/web/x.tar.gz")


class TestFetch:
    def test_round_trip_gives_a_verified_file(self, store: S3Store, tmp_path: Path) -> None:
        record, data = publish(store, tmp_path)
        cache = ArtifactCache(tmp_path / "app", store, max_bytes=10 * SIZE, timeout=10)
        assert not cache.is_cached(record)
        path = cache.fetch(record)
        name = f"master-15eb13af-{record.sha256[:12]}.tar.gz"
        assert path == tmp_path / "app" / "artifacts" / name
        assert path.read_bytes() == data
        assert cache.is_cached(record)
        assert dir_listing(cache) == [path.name]  # no partial left behind

    def test_cached_artifact_is_not_downloaded_again(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, _ = publish(make_store(s3_settings), tmp_path)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        cache.fetch(record)
        before = len(proxy.requests)
        assert cache.fetch(record) == cache.path_for(record)
        assert len(proxy.requests) == before

    def test_wrong_sha256_is_refused_and_nothing_kept(self, store: S3Store, tmp_path: Path) -> None:
        record, data = publish(store, tmp_path)
        wrong = dataclasses.replace(record, sha256="0" * 64)
        cache = ArtifactCache(tmp_path / "app", store, max_bytes=10 * SIZE, timeout=10)
        with pytest.raises(ArtifactIntegrityError) as info:
            cache.fetch(wrong)
        assert "0" * 64 in str(info.value)
        assert hashlib.sha256(data).hexdigest() in str(info.value)
        assert dir_listing(cache) == []
        assert not cache.is_cached(wrong)

    @pytest.mark.parametrize("delta", [-1, +1, +SIZE])
    def test_wrong_size_is_refused_and_nothing_kept(
        self, store: S3Store, tmp_path: Path, delta: int
    ) -> None:
        record, _ = publish(store, tmp_path)
        wrong = dataclasses.replace(record, size=record.size + delta)
        cache = ArtifactCache(tmp_path / "app", store, max_bytes=10 * SIZE, timeout=10)
        with pytest.raises(ArtifactIntegrityError, match="size mismatch") as info:
            cache.fetch(wrong)
        assert str(wrong.size) in str(info.value) and str(record.size) in str(info.value)
        assert dir_listing(cache) == []

    @pytest.mark.parametrize(
        "url",
        [
            "s3://some-other-bucket/artifacts/web/master-15eb13af.tar.gz",
            "s3://{bucket}/elsewhere/web/master-15eb13af.tar.gz",
            "s3://{bucket}/artifacts/../secrets/master-15eb13af.tar.gz",
            "s3://{bucket}/artifactsx/web/master-15eb13af.tar.gz",
        ],
    )
    def test_url_outside_bucket_or_prefix_is_refused_before_any_request(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path, url: str
    ) -> None:
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        record = ArtifactRecord(
            id="master-15eb13af",
            url=url.format(bucket=s3_settings.bucket),
            sha256="a" * 64,
            size=10,
        )
        with pytest.raises(ArtifactRefused, match=r"outside|'\.\.'"):
            cache.fetch(record)
        assert proxy.requests == []
        assert dir_listing(cache) == []

    def test_another_apps_object_is_refused_before_any_request(
        self, s3_settings: S3Settings, store: S3Store, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        # A real object of app "api", in the bucket and under the prefix, with its true
        # sha256: a record of app "web" that names it still fetches nothing.
        data = os.urandom(1000)
        src = tmp_path / "api.tar.gz"
        src.write_bytes(data)
        key = store.key_for("api", "master-15eb13af", "tar.gz")
        store.upload_file(src, key, sha256=hashlib.sha256(data).hexdigest())
        cache = ArtifactCache(
            tmp_path / "web",
            make_store(s3_settings, proxy.endpoint_url),
            max_bytes=100 * SIZE,
            timeout=10,
            app="web",
        )
        record = ArtifactRecord(
            id="master-15eb13af",
            url=store.url_for(key),
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
        )
        with pytest.raises(ArtifactRefused, match="is not an object of app web"):
            cache.fetch(record)
        assert proxy.requests == []
        assert dir_listing(cache) == []

    def test_missing_key_is_not_found(self, store: S3Store, tmp_path: Path) -> None:
        key = store.key_for("web", "master-deadbeef", "tar.gz")
        record = ArtifactRecord(
            id="master-deadbeef", url=store.url_for(key), sha256="a" * 64, size=10
        )
        cache = ArtifactCache(tmp_path / "app", store, max_bytes=10 * SIZE, timeout=10)
        with pytest.raises(S3NotFound, match=key):
            cache.fetch(record)
        assert dir_listing(cache) == []

    def test_unreachable_endpoint_fails_within_the_deadline(
        self, s3_settings: S3Settings, tmp_path: Path
    ) -> None:
        endpoint = f"http://127.0.0.1:{free_port('127.0.0.1')}"
        store = make_store(s3_settings, endpoint)
        key = store.key_for("web", "master-15eb13af", "tar.gz")
        record = ArtifactRecord(
            id="master-15eb13af", url=store.url_for(key), sha256="a" * 64, size=10
        )
        cache = ArtifactCache(tmp_path / "app", store, max_bytes=10 * SIZE, timeout=1.5)
        started = time.monotonic()
        with pytest.raises(S3Unavailable) as info:
            cache.fetch(record)
        assert time.monotonic() - started < 5
        assert endpoint in str(info.value) and key in str(info.value)
        assert not cache.path_for(record).exists()

    def test_partial_left_by_an_earlier_process_is_resumed_with_a_range(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        cache.dir.mkdir(parents=True)
        cache.partial_path_for(record).write_bytes(data[:400_000])
        assert cache.fetch(record).read_bytes() == data
        gets = [r for r in proxy.requests if r.method == "GET"]
        assert [r.headers.get("range") for r in gets] == ["bytes=400000-"]

    def test_corrupt_inherited_partial_is_discarded_and_downloaded_again(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        cache.dir.mkdir(parents=True)
        cache.partial_path_for(record).write_bytes(b"\0" * 400_000)
        assert cache.fetch(record).read_bytes() == data
        gets = [r.headers.get("range") for r in proxy.requests if r.method == "GET"]
        assert gets == ["bytes=400000-", None]

    def test_concurrent_fetches_of_one_artifact_share_one_download(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        caches = [proxied_cache(s3_settings, proxy, tmp_path / "app") for _ in range(4)]
        results: list[Path | BaseException] = []

        def run(cache: ArtifactCache) -> None:
            try:
                results.append(cache.fetch(record))
            except BaseException as exc:
                results.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in caches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results == [caches[0].path_for(record)] * 4
        assert caches[0].path_for(record).read_bytes() == data
        assert len([r for r in proxy.requests if r.method == "GET"]) == 1

    def test_fetch_evicts_older_artifacts_over_budget_but_never_the_new_one(
        self, store: S3Store, tmp_path: Path
    ) -> None:
        first, _ = publish(store, tmp_path, "master-11111111", size=1000)
        second, _ = publish(store, tmp_path, "master-22222222", size=1000)
        third, _ = publish(store, tmp_path, "master-33333333", size=1000)
        cache = ArtifactCache(tmp_path / "app", store, max_bytes=2000, timeout=10)
        cache.fetch(first)
        os.utime(cache.path_for(first), (time.time() - 100, time.time() - 100))
        cache.fetch(second)
        cache.fetch(third, protect={first.id})
        assert cache.is_cached(first) and cache.is_cached(third)
        assert not cache.is_cached(second)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a size-limited tmpfs needs root")
def test_disk_full_while_downloading_is_a_clear_error(store: S3Store, tmp_path: Path) -> None:
    record, _ = publish(store, tmp_path)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(app_dir)], check=True)
    try:
        cache = ArtifactCache(app_dir, store, max_bytes=10 * SIZE, timeout=10)
        with pytest.raises(ArtifactError, match="disk full while downloading master-15eb13af"):
            cache.fetch(record)
        assert dir_listing(cache) == []
    finally:
        subprocess.run(["umount", str(app_dir)], check=True)


class TestFaults:
    def test_500s_then_success_gives_a_verified_file(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        proxy.fail(500, times=3)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        assert cache.fetch(record).read_bytes() == data
        faults = [r.fault for r in proxy.requests if r.method == "GET"]
        assert faults == ["status", "status", "status", ""]

    def test_slowdown_is_retried(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        proxy.slowdown(times=2)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        assert cache.fetch(record).read_bytes() == data
        assert [r.fault for r in proxy.requests] == ["slowdown", "slowdown", ""]

    def test_reset_mid_body_resumes_with_a_range_request(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        proxy.reset_mid_body(times=1)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        path = cache.fetch(record)
        assert path.read_bytes() == data
        gets = [r for r in proxy.requests if r.method == "GET"]
        assert gets[0].fault == "reset" and "range" not in gets[0].headers
        assert len(gets) == 2
        assert gets[1].headers.get("range") == f"bytes={SIZE // 2}-"
        assert dir_listing(cache) == [path.name]

    def test_always_corrupt_is_an_integrity_error_and_no_partial_left(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, _ = publish(make_store(s3_settings), tmp_path)
        proxy.corrupt(times=None)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        with pytest.raises(ArtifactIntegrityError, match=f"expected {record.sha256}, got "):
            cache.fetch(record)
        assert dir_listing(cache) == []

    def test_persistent_failure_fails_cleanly_after_the_deadline(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, _ = publish(make_store(s3_settings), tmp_path)
        proxy.fail(503, times=None)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app", timeout=1.5)
        started = time.monotonic()
        with pytest.raises(S3Unavailable, match="gave up after") as info:
            cache.fetch(record)
        took = time.monotonic() - started
        assert took < 4.0
        assert record.url in str(info.value)
        assert len([r for r in proxy.requests if r.method == "GET"]) >= 2
        assert not cache.path_for(record).exists()
        assert dir_listing(cache) == []

    def test_a_retrying_download_says_why_until_it_ends(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        """While S3 keeps failing, the cache says which artifact is retrying and why (a
        prepare deadline that passes meanwhile reports it); nothing is left once it ends."""
        record, _ = publish(make_store(s3_settings), tmp_path)
        proxy.fail(503, times=None)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app", timeout=3.0)
        seen: list[str] = []
        failed: list[BaseException] = []

        def fetch() -> None:
            try:
                cache.fetch(record)
            except S3Unavailable as exc:
                failed.append(exc)

        worker = threading.Thread(target=fetch)
        worker.start()
        deadline = time.monotonic() + 3.0
        while not seen and time.monotonic() < deadline:
            if trouble := cache.trouble(record.id):
                seen.append(trouble)
            time.sleep(0.01)
        worker.join(10)
        assert seen and seen[0].startswith("attempt "), seen
        assert "InternalError" in seen[0], seen  # what S3 answered
        assert failed and cache.trouble(record.id) == "" and cache.downloads() == {}

    def test_a_download_in_progress_shows_how_far_it_is(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        proxy.stall_mid_body()
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        assert cache.downloads() == {}
        worker = threading.Thread(target=cache.fetch, args=(record,))
        worker.start()
        try:
            seen: list[dict[str, dict[str, int]]] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                now = cache.downloads()
                seen.append(now)
                if now and 0 < now[record.id]["have"] < len(data):
                    break
                time.sleep(0.01)
            # The first half arrived (in whole read chunks), the rest is held back.
            assert seen[-1].keys() == {record.id}, seen[-3:]
            assert seen[-1][record.id]["size"] == len(data)
            assert 0 < seen[-1][record.id]["have"] <= len(data) // 2
        finally:
            proxy.resume()
            worker.join(10)
        assert cache.path_for(record).read_bytes() == data
        assert cache.downloads() == {}

    def test_resets_then_500s_still_converge_on_a_verified_file(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        proxy.reset_mid_body(times=2)
        proxy.fail(500, times=1)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        assert cache.fetch(record).read_bytes() == data
        ranges = [r.headers.get("range") for r in proxy.requests if r.method == "GET"]
        half = SIZE // 2
        assert ranges == [
            None,
            f"bytes={half}-",
            f"bytes={half + (SIZE - half) // 2}-",
            f"bytes={half + (SIZE - half) // 2}-",
        ]


class TestTransientCorruption:
    """Issue 10 item 7: a mismatch or a 403 gets one fresh download before the host fails."""

    def test_one_corrupt_response_gets_one_fresh_download(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        proxy.corrupt(times=1)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        with capture_logs() as logs:
            path = cache.fetch(record)
        assert path.read_bytes() == data
        gets = [r for r in proxy.requests if r.method == "GET"]
        assert [g.fault for g in gets] == ["corrupt", ""]
        assert "range" not in gets[1].headers  # from byte 0, not a resume
        events = [e for e in logs if e["event"].startswith("artifact_fetch")]
        assert [e["event"] for e in events] == ["artifact_fetch_retry_fresh", "artifact_fetched"]
        assert events[0]["attempt"] == 1
        assert "sha256 mismatch" in events[0]["error"]
        assert "sha256 mismatch" in events[1]["retried_after"]
        assert dir_listing(cache) == [path.name]

    def test_one_403_gets_one_fresh_download(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path)
        proxy.fail(403, times=1)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        with capture_logs() as logs:
            assert cache.fetch(record).read_bytes() == data
        assert [r.fault for r in proxy.requests if r.method == "GET"] == ["status", ""]
        retry = [e for e in logs if e["event"] == "artifact_fetch_retry_fresh"]
        assert len(retry) == 1 and "access denied" in retry[0]["error"]

    def test_corrupt_twice_fails_and_says_the_fresh_download_failed_alike(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, _ = publish(make_store(s3_settings), tmp_path)
        proxy.corrupt(times=2)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        with capture_logs() as logs, pytest.raises(ArtifactIntegrityError) as caught:
            cache.fetch(record)
        message = str(caught.value)
        assert message.count("sha256 mismatch") == 1  # the same reason, not said twice
        assert message.endswith("(the same on a fresh download)")
        assert [r.fault for r in proxy.requests if r.method == "GET"] == ["corrupt", "corrupt"]
        assert [e["event"] for e in logs if e["event"].startswith("artifact_fetch")] == [
            "artifact_fetch_retry_fresh",
            "artifact_fetch_failed_twice",
        ]
        assert dir_listing(cache) == []

    def test_403_twice_is_access_denied(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, _ = publish(make_store(s3_settings), tmp_path)
        proxy.fail(403, times=None)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        with pytest.raises(S3AccessDenied, match=r"\(the same on a fresh download\)$"):
            cache.fetch(record)
        assert len([r for r in proxy.requests if r.method == "GET"]) == 2
        assert dir_listing(cache) == []


class TestEngineOverS3:
    """The release engine's refusal memory and cancel, with the real S3 server behind it."""

    def engine(self, cache: ArtifactCache, tmp_path: Path) -> ReleaseEngine:
        app = AppConfig(name="web", root=str(tmp_path))
        engine = ReleaseEngine(app, cache)
        engine.layout.ensure()
        return engine

    def test_refused_download_is_refused_again_without_a_request(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, _ = publish(make_store(s3_settings), tmp_path)
        proxy.corrupt(times=None)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "web")
        engine = self.engine(cache, tmp_path)
        with pytest.raises(ArtifactIntegrityError, match="the same on a fresh download"):
            engine.prefetch(record)
        asked = len(proxy.requests)
        assert asked == 2
        release = "20261201T120000Z-master-15eb13af"
        with pytest.raises(ArtifactIntegrityError) as again:
            engine.stage(record, release, "d1")
        assert "was refused on this host at" in str(again.value)
        assert "sha256 mismatch" in str(again.value)
        assert len(proxy.requests) == asked  # not downloaded again
        assert engine.release_names() == []

    def test_a_refused_archive_leaves_no_verified_copy_behind(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        """Bytes that match their sha256 but are no archive this host extracts: the copy in
        the cache goes with the refusal (status and the host record list the cache as
        "prefetched"), and the refusal memory still spares a second download."""
        record, _ = publish(make_store(s3_settings), tmp_path)  # random bytes, not gzip
        cache = proxied_cache(s3_settings, proxy, tmp_path / "web")
        engine = self.engine(cache, tmp_path)
        assert engine.app.prefetch == "extract"
        with pytest.raises(ArchiveRefused, match="gzip"):
            engine.prefetch(record)
        assert dir_listing(cache) == []
        asked = len(proxy.requests)
        with pytest.raises(ArchiveRefused, match="was refused on this host"):
            engine.prefetch(record)
        assert len(proxy.requests) == asked
        assert not any(engine.layout.prefetched_dir.iterdir())

    def test_a_refusal_that_cannot_be_remembered_keeps_the_verified_copy(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        """Without the memory (its file cannot be written), the copy is what spares every
        later try a download of the whole artifact."""
        record, _ = publish(make_store(s3_settings), tmp_path)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "web")
        engine = self.engine(cache, tmp_path)
        engine.layout.refused_file.mkdir(parents=True)  # not a file: cannot be written
        with pytest.raises(ArchiveRefused, match="gzip"):
            engine.prefetch(record)
        assert dir_listing(cache) == [cache.file_name(record)]
        asked = len(proxy.requests)
        with pytest.raises(ArchiveRefused, match="gzip"):
            engine.prefetch(record)
        assert len(proxy.requests) == asked  # judged again from the copy, not downloaded

    def test_a_bad_record_claiming_a_good_builds_sha256_does_not_get_it_refused(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        """A record of any id may claim any sha256 (a CI token writes artifacts/): one that
        names a good build's bytes with another size is refused, and remembered, for its
        own url and size only; the good build still stages on every host."""
        good = publish_tarball(make_store(s3_settings), tmp_path)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "web")
        engine = self.engine(cache, tmp_path)
        engine.fetch(good)  # verified in the cache, not pre-extracted
        bad = dataclasses.replace(good, id="evil-00000001", size=good.size + 1)
        with pytest.raises(ArtifactIntegrityError, match="size"):
            engine.fetch(bad)
        asked = len(proxy.requests)
        with pytest.raises(ArtifactIntegrityError, match="was refused on this host"):
            engine.fetch(bad)  # its own refusal still holds, without a request
        assert len(proxy.requests) == asked

        release = "20261201T120000Z-master-15eb13af"
        engine.stage(good, release, "d1")

        assert (engine.layout.releases_dir / release / "index.html").read_bytes() == b"v1\n"

    def test_a_cached_copy_changed_on_disk_is_downloaded_again_not_refused(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        """The cache's copy damaged after its verification (same size, other bytes): the
        extractor's refusal is of those bytes, not of the artifact, so nothing is
        remembered, the copy goes, and the next try downloads and stages it."""
        good = publish_tarball(make_store(s3_settings), tmp_path)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "web")
        engine = self.engine(cache, tmp_path)
        copy = engine.fetch(good)
        copy.write_bytes(b"x" * good.size)
        release = "20261201T120000Z-master-15eb13af"

        with pytest.raises(StagingError, match="changed on this host's disk") as caught:
            engine.stage(good, release, "d1")

        assert "the copy removed: the next try downloads it again" in str(caught.value)
        assert engine.refusal(good.sha256) is None
        assert dir_listing(cache) == []
        engine.stage(good, release, "d1")
        assert (engine.layout.releases_dir / release / "index.html").read_bytes() == b"v1\n"

    def test_cancelled_download_stops_and_resumes_later(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, data = publish(make_store(s3_settings), tmp_path, size=8 * SIZE)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app")
        calls = 0

        def cancel() -> bool:
            nonlocal calls
            calls += 1
            return calls >= 2  # after the first chunk

        with pytest.raises(StagingCancelled, match="kept for a later resume"):
            cache.fetch(record, cancel=cancel)
        have = cache.partial_path_for(record).stat().st_size
        assert 0 < have < record.size
        assert cache.fetch(record).read_bytes() == data
        gets = [r for r in proxy.requests if r.method == "GET"]
        assert gets[-1].headers.get("range") == f"bytes={have}-"

    def test_cancel_while_waiting_to_retry_is_seen_at_once(
        self, s3_settings: S3Settings, proxy: FaultyS3Proxy, tmp_path: Path
    ) -> None:
        record, _ = publish(make_store(s3_settings), tmp_path)
        proxy.fail(503, times=None)
        cache = proxied_cache(s3_settings, proxy, tmp_path / "app", timeout=60)
        stop = threading.Event()
        timer = threading.Timer(0.5, stop.set)
        timer.start()
        try:
            started = time.monotonic()
            with pytest.raises(StagingCancelled):
                cache.fetch(record, cancel=stop.is_set)
            took = time.monotonic() - started
        finally:
            timer.cancel()
        assert took < 2.5, f"took {took:.2f}s for a cancel at 0.5s"
        assert dir_listing(cache) == []
