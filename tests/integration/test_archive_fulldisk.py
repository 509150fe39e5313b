"""Extraction onto a full filesystem (an 8 MiB tmpfs): a clear StagingError, nothing left."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.hostile_archives import Entry, make_tar_gz
from watcher.archive import extract_archive
from watcher.errors import ArchiveDoesNotFit, StagingError

pytestmark = pytest.mark.root

DISK_BYTES = 8 * 1024 * 1024


@contextmanager
def tmpfs(disk: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``disk`` with ``options``, always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk tests need root to mount a tmpfs (this machine runs as root)")
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"{options},mode=0755", "tmpfs", str(disk)],
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted at ``<tmp>/disk``."""
    with tmpfs(tmp_path / "disk", f"size={DISK_BYTES}") as disk:
        yield disk


def used_bytes(mount: Path) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_full_disk_is_a_clear_staging_error_and_cleans_up(small_disk: Path, tmp_path: Path) -> None:
    rng = random.Random(7)
    # 12 MiB of incompressible data in 3 files: more than the 8 MiB disk can hold
    entries = [Entry("app", kind="dir")] + [
        Entry(f"app/blob{i}.bin", data=rng.randbytes(4 * 1024 * 1024)) for i in range(3)
    ]
    archive = tmp_path / "big.tar.gz"  # the archive itself is not on the small disk
    archive.write_bytes(make_tar_gz(entries))
    app_dir = small_disk / "app"
    app_dir.mkdir()
    dest = app_dir / ".tmp-stage-x"
    dest.mkdir()
    empty = used_bytes(small_disk)

    with pytest.raises(StagingError) as caught:
        extract_archive(
            archive, dest, fmt="tar.gz", max_members=100, max_bytes=1024**3, umask=0o022
        )

    message = str(caught.value)
    assert "disk full" in message
    assert "ENOSPC" in message
    assert str(dest) in message
    assert re.search(r"'app/blob\d\.bin'", message)  # the member written when the disk filled
    assert used_bytes(small_disk) > DISK_BYTES // 2  # it really did fill the disk

    shutil.rmtree(dest)  # what the release engine does on any error
    assert list(app_dir.iterdir()) == []
    assert used_bytes(small_disk) == empty


def empty_files(count: int) -> list[Entry]:
    """``count`` empty files in one directory: entries without a byte of data."""
    return [Entry("app", kind="dir")] + [Entry(f"app/f{i:05d}") for i in range(count)]


def test_no_free_inode_left_is_said_as_such(tmp_path: Path) -> None:
    """A filesystem out of inodes fails with ENOSPC too, with blocks to spare: "disk full"
    sent the operator to look for space that was there."""
    archive = tmp_path / "many.tar.gz"
    archive.write_bytes(make_tar_gz(empty_files(400)))
    with tmpfs(tmp_path / "disk", "size=8m,nr_inodes=128") as disk:
        dest = disk / ".tmp-stage-x"
        dest.mkdir()
        with pytest.raises(StagingError) as caught:
            extract_archive(
                archive, dest, fmt="tar.gz", max_members=1000, max_bytes=1024**3, umask=0o022
            )
        message = str(caught.value)
        assert message.startswith("no free inode left while extracting 'app/f0"), message
        assert "ENOSPC" in message and str(dest) in message
        assert os.statvfs(disk).f_bavail > 0  # blocks were left: it was the inodes


def test_free_space_taken_by_another_writer_stops_a_tree_without_data(tmp_path: Path) -> None:
    """The free space is looked at again every 256 entries, not only every 1 MiB written: an
    archive of empty files writes no byte, and another writer may take the disk meanwhile."""
    archive = tmp_path / "many.tar.gz"
    archive.write_bytes(make_tar_gz(empty_files(1000)))
    with tmpfs(tmp_path / "disk", f"size={DISK_BYTES}") as disk:
        dest = disk / ".tmp-stage-x"
        dest.mkdir()
        other = disk / "other-writer"
        members = 0

        def fill_after_50() -> bool:
            nonlocal members
            members += 1
            if members == 50:  # another process writes all but 512 KiB
                st = os.statvfs(disk)
                other.write_bytes(b"x" * (st.f_bavail * st.f_frsize - 512 * 1024))
            return False

        with pytest.raises(ArchiveDoesNotFit) as caught:
            extract_archive(
                archive,
                dest,
                fmt="tar.gz",
                max_members=5000,
                max_bytes=1024**3,
                umask=0o022,
                disk_fraction=0.9,
                disk_reserve=1024 * 1024,
                cancel=fill_after_50,
            )
        message = str(caught.value)
        found = re.search(r"under disk_reserve 1048576, after 0 bytes and (\d+) entries", message)
        assert found, message
        assert int(found[1]) == 256, message  # the first look after the disk was taken
        assert members < 300
