"""Archive limits that fit the disk, the ratio limit, and cancellable staging (issue 10, 1-2).

The disk tests stage onto a 16 MiB tmpfs mounted by the test; the archives live outside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faulty_s3 import FaultyS3Proxy
from tests.support.hostile_archives import random_files_tar_gz, write_zeros_bomb
from watcher.archive import extract_archive
from watcher.artifacts import ArtifactCache
from watcher.config import AppConfig, Limits, S3Settings
from watcher.errors import ArchiveDoesNotFit, ArchiveRefused, StagingCancelled
from watcher.records import ArtifactRecord
from watcher.releases import ReleaseEngine
from watcher.s3 import S3Store

MiB = 1024 * 1024
DISK_BYTES = 16 * MiB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted at ``<tmp>/disk``, always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the disk-limit tests need root to mount a tmpfs (this machine runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0755", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {disk}: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def used_bytes(mount: Path) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def record_for(path: Path, artifact: str = "master-15eb13af") -> ArtifactRecord:
    data = path.read_bytes()
    return ArtifactRecord(
        id=artifact,
        url=f"s3://bucket/artifacts/web/{artifact}.tar.gz",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def rel(n: int) -> str:
    return f"20261201T1200{n:02d}Z-master-15eb13af"


def make_engine(root: Path, limits: Limits | None = None) -> ReleaseEngine:
    app = AppConfig(name="web", root=str(root), limits=limits or Limits())
    engine = ReleaseEngine(app)
    engine.layout.ensure()
    return engine


def leftovers(engine: ReleaseEngine) -> list[str]:
    lay = engine.layout
    return sorted(
        str(p)
        for d in (lay.releases_dir, lay.prefetched_dir)
        for p in d.iterdir()
        if p.name.startswith(".tmp-")
    )


pytestmark = pytest.mark.root


class TestDiskBudget:
    def test_defaults_refuse_an_archive_that_cannot_fit(
        self, small_disk: Path, tmp_path: Path
    ) -> None:
        # 24 MiB of incompressible files (no ratio trick): more than the whole 16 MiB disk
        archive = tmp_path / "big.tar.gz"
        archive.write_bytes(random_files_tar_gz([8 * MiB, 8 * MiB, 8 * MiB]))
        engine = make_engine(small_disk)  # default limits
        empty = used_bytes(small_disk)

        with pytest.raises(ArchiveDoesNotFit) as caught:
            engine.stage_from_file(archive, record_for(archive), rel(1), "d1")

        message = str(caught.value)
        assert "'f0.bin'" in message  # refused at the first header: nothing was written
        assert "does not fit on the filesystem" in message
        assert "disk_reserve 1073741824" in message
        assert leftovers(engine) == []
        assert engine.release_names() == []
        assert used_bytes(small_disk) - empty < 64 * 1024
        # not a verdict on the archive: it is not remembered as refused
        assert engine.refusal(record_for(archive).sha256) is None

    def test_declared_sum_over_the_fraction_is_refused_before_writing_much(
        self, small_disk: Path, tmp_path: Path
    ) -> None:
        archive = tmp_path / "two.tar.gz"
        archive.write_bytes(random_files_tar_gz([3 * MiB, 8 * MiB]))
        dest = small_disk / ".tmp-stage-x"
        dest.mkdir()
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize

        with pytest.raises(ArchiveDoesNotFit) as caught:
            extract_archive(
                archive,
                dest,
                fmt="tar.gz",
                max_members=100,
                max_bytes=1024**3,
                umask=0o022,
                disk_fraction=0.5,
                disk_reserve=MiB,
            )

        message = str(caught.value)
        assert "'f1.bin'" in message  # 3 MiB fit in half of ~16 MiB, 11 MiB do not
        assert f"{free // 2} bytes may be used" in message
        assert (dest / "f0.bin").stat().st_size == 3 * MiB
        assert not (dest / "f1.bin").exists()

    def test_extraction_stops_when_the_free_space_falls_under_the_reserve(
        self, small_disk: Path, tmp_path: Path
    ) -> None:
        """Another writer fills the disk while a member is extracted: stop at the next chunk."""
        archive = tmp_path / "one.tar.gz"
        archive.write_bytes(random_files_tar_gz([8 * MiB]))
        dest = small_disk / ".tmp-stage-x"
        dest.mkdir()
        calls = 0

        def other_writer() -> bool:  # called between chunks: a convenient moment to fill
            nonlocal calls
            calls += 1
            if calls == 2:
                (small_disk / "filler").write_bytes(bytes(12 * MiB))
            return False

        with pytest.raises(ArchiveDoesNotFit, match="under disk_reserve 4194304") as caught:
            extract_archive(
                archive,
                dest,
                fmt="tar.gz",
                max_members=100,
                max_bytes=1024**3,
                umask=0o022,
                disk_fraction=1.0,
                disk_reserve=4 * MiB,
                cancel=other_writer,
            )
        assert "'f0.bin'" in str(caught.value)
        assert (dest / "f0.bin").stat().st_size < 4 * MiB  # stopped a chunk or two later


class TestDownloadFits:
    def test_artifact_larger_than_the_disk_allows_is_not_downloaded(
        self, small_disk: Path, tmp_path: Path, s3_settings: S3Settings
    ) -> None:
        archive = tmp_path / "big.tar.gz"
        archive.write_bytes(random_files_tar_gz([12 * MiB]))
        store = S3Store(s3_settings)
        key = store.key_for("web", "master-15eb13af", "tar.gz")
        record = record_for(archive)
        store.upload_file(archive, key, sha256=record.sha256)
        record = ArtifactRecord(
            id=record.id, url=store.url_for(key), sha256=record.sha256, size=record.size
        )
        assert s3_settings.endpoint_url
        with FaultyS3Proxy(s3_settings.endpoint_url) as proxy:
            proxied = S3Store(dataclasses.replace(s3_settings, endpoint_url=proxy.endpoint_url))
            engine = ReleaseEngine(
                AppConfig(name="web", root=str(small_disk), limits=Limits(disk_reserve=8 * MiB)),
                ArtifactCache(small_disk / "web", proxied, max_bytes=1024**3, timeout=30),
            )
            engine.layout.ensure()
            with pytest.raises(ArchiveDoesNotFit) as caught:
                engine.prefetch(record)
            assert proxy.requests == []  # refused before any request
        message = str(caught.value)
        assert f"artifact master-15eb13af needs {record.size} more bytes" in message
        assert "less than disk_reserve 8388608" in message
        assert list(engine.cache.dir.iterdir()) == []  # type: ignore[union-attr]


class TestRatio:
    def test_zip_bomb_refused_at_its_header_and_remembered(self, tmp_path: Path) -> None:
        bomb = tmp_path / "bomb.tar.gz"
        packed = write_zeros_bomb(bomb, 64 * MiB)
        assert packed * 500 < 64 * MiB  # about 1000:1
        engine = make_engine(tmp_path / "root")  # default limits: max_ratio 100
        record = record_for(bomb)
        seen: list[tuple[int, int]] = []

        with pytest.raises(ArchiveRefused) as caught:
            engine.stage_from_file(
                bomb, record, rel(1), "d1", progress=lambda b, m: seen.append((b, m))
            )

        message = str(caught.value)
        assert "compression ratio over 100 (limit max_ratio)" in message
        assert f"{64 * MiB} bytes by member 'zeros' from {packed} compressed bytes" in message
        assert seen == []  # refused before any byte was written
        assert leftovers(engine) == []
        assert engine.release_names() == []

        # remembered by sha256: a later stage is refused at once, without reading the file
        bomb.unlink()
        started = time.monotonic()
        with pytest.raises(ArchiveRefused) as again:
            engine.stage_from_file(bomb, record, rel(2), "d2")
        assert time.monotonic() - started < 1.0
        assert "was refused on this host at" in str(again.value)
        assert "compression ratio over 100" in str(again.value)
        assert f"or remove it from {engine.layout.refused_file}" in str(again.value)
        # ... and survives a new engine (persisted under .state/)
        with pytest.raises(ArchiveRefused, match="not trying again"):
            make_engine(tmp_path / "root").stage_from_file(bomb, record, rel(3), "d3")
        # other limits: judged again (here: the file is gone, so it cannot be re-read)
        looser = make_engine(tmp_path / "root", Limits(max_ratio=10_000.0))
        assert looser.refusal(record.sha256) is None

    def test_a_refusal_of_what_the_archive_holds_does_not_point_at_the_limits(
        self, tmp_path: Path
    ) -> None:
        """A symlink out of the release is refused whatever max_members/max_bytes/max_ratio
        say: the remembered refusal must say so, not send the operator to the limits."""
        evil = tmp_path / "evil.tar.gz"
        with tarfile.open(evil, "w:gz") as tar:
            link = tarfile.TarInfo("a")
            link.type, link.linkname = tarfile.SYMTYPE, "../../.."
            tar.addfile(link)
        engine = make_engine(tmp_path / "root")
        record = record_for(evil)
        with pytest.raises(ArchiveRefused, match="leaves the release"):
            engine.stage_from_file(evil, record, rel(1), "d1")
        with pytest.raises(ArchiveRefused) as again:
            engine.stage_from_file(evil, record, rel(2), "d2")
        message = str(again.value)
        assert "for what it holds, which no setting allows" in message, message
        assert "leaves the release; publish a fixed build (to have this host" in message
        assert f"remove them from {engine.layout.refused_file})" in message
        assert "max_ratio" not in message

    def test_prefetch_obeys_the_same_limits_and_stage_then_refuses_at_once(
        self, tmp_path: Path
    ) -> None:
        bomb = tmp_path / "bomb.tar.gz"
        write_zeros_bomb(bomb, 64 * MiB)
        engine = make_engine(tmp_path / "root")
        record = record_for(bomb)

        with pytest.raises(ArchiveRefused, match="limit max_ratio"):
            engine.prefetch_extract(bomb, record)
        assert leftovers(engine) == []
        assert not engine.prefetched_path(record).exists()

        bomb.unlink()
        with pytest.raises(ArchiveRefused, match=r"refused on this host.*limit max_ratio"):
            engine.stage_from_file(bomb, record, rel(1), "d1")

    def test_a_compressible_but_small_archive_is_not_a_bomb(self, tmp_path: Path) -> None:
        small = tmp_path / "small.tar.gz"
        write_zeros_bomb(small, 8 * MiB)  # ~1000:1, but under the 16 MiB floor
        engine = make_engine(tmp_path / "root")
        staged = engine.stage_from_file(small, record_for(small), rel(1), "d1")
        assert (staged / "zeros").stat().st_size == 8 * MiB


class TestCancel:
    def test_cancel_from_another_thread_stops_inside_one_member(self, tmp_path: Path) -> None:
        bomb = tmp_path / "huge.tar.gz"
        write_zeros_bomb(bomb, 1024 * MiB, level=1)  # one 1 GiB member: seconds to write
        engine = make_engine(tmp_path / "root", Limits(max_ratio=1e6, max_bytes=8 * 1024**3))
        record = record_for(bomb)
        started = threading.Event()
        stop = threading.Event()
        stopped_at: list[float] = []
        reports: list[tuple[int, int]] = []

        def progress(written: int, members: int) -> None:
            reports.append((written, members))
            started.set()

        def aborter() -> None:
            started.wait(30)
            stopped_at.append(time.monotonic())
            stop.set()

        thread = threading.Thread(target=aborter)
        thread.start()
        began = time.monotonic()
        try:
            with pytest.raises(StagingCancelled) as caught:
                engine.stage_from_file(
                    bomb, record, rel(1), "d1", cancel=stop.is_set, progress=progress
                )
            took = time.monotonic() - stopped_at[0]
        finally:
            stop.set()
            thread.join()

        assert took < 1.5, f"stopped {took:.2f}s after the cancel"
        assert len(reports) <= (time.monotonic() - began) * 4 + 1  # at most 4 a second
        assert "cancelled after 1 members" in str(caught.value)
        assert reports and reports[0][0] > 0 and reports[0][1] == 1
        assert leftovers(engine) == []
        assert engine.release_names() == []
        assert engine.refusal(record.sha256) is None  # a cancel is not a refusal
        # the next stage of the same artifact is not refused and starts at once
        stop2 = threading.Event()
        stop2.set()
        with pytest.raises(StagingCancelled):
            engine.stage_from_file(bomb, record, rel(1), "d1", cancel=stop2.is_set)
        assert leftovers(engine) == []

    def test_cancelled_prefetch_leaves_nothing_and_is_not_a_refusal(self, tmp_path: Path) -> None:
        bomb = tmp_path / "big.tar.gz"
        write_zeros_bomb(bomb, 64 * MiB, level=1)
        engine = make_engine(tmp_path / "root", Limits(max_ratio=1e6))
        record = record_for(bomb)
        polls = 0

        def cancel() -> bool:  # polled before each member, after each 1 MiB chunk written
            nonlocal polls  # and each 64 KiB the gzip reader takes from the file
            polls += 1
            return polls > 5

        with pytest.raises(StagingCancelled, match=r"cancelled after 1 members and \d+ bytes"):
            engine.prefetch_extract(bomb, record, cancel=cancel)
        assert leftovers(engine) == []
        assert not engine.prefetched_path(record).exists()
        assert engine.refusal(record.sha256) is None
        assert engine.prefetch_extract(bomb, record) == engine.prefetched_path(record)
