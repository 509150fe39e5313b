"""Extraction onto a full filesystem (an 8 MiB tmpfs): a clear StagingError, nothing left."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hostile_archives import Entry, make_tar_gz
from watcher.archive import extract_archive
from watcher.errors import StagingError

pytestmark = pytest.mark.root

DISK_BYTES = 8 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted at ``<tmp>/disk``, always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk test needs root to mount a tmpfs (this machine runs as root)")
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
