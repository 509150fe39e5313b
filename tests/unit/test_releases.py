"""The per-host release engine on a real filesystem: staging, flip, recovery, holds, prune."""

from __future__ import annotations

import dataclasses
import errno
import grp
import hashlib
import io
import json
import os
import pwd
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.support.hostile_archives import hostile_archives
from watcher import releases as releases_module
from watcher.archive import RULES
from watcher.config import AppConfig, Timeouts
from watcher.errors import (
    ArchiveRefused,
    FlipError,
    ReleaseError,
    ReleaseNotFound,
    StagingError,
)
from watcher.records import ArtifactRecord
from watcher.releases import (
    RELEASE_JSON,
    RELEASE_JSON_MAX_BYTES,
    AppLayout,
    LinuxProcReader,
    ReleaseEngine,
    scan_release_usage,
    untrusted_dir,
    untrusted_path,
)

T0 = datetime(2026, 11, 26, 14, 0, 0, tzinfo=UTC)
FILES = {
    "app.txt": b"hello\n",
    "bin/run.sh": b"#!/bin/sh\necho run\n",
    "log/from-tarball.txt": b"replaced by the shared link\n",
    "data/blob.bin": bytes(range(256)) * 16,
}


def build_tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.startswith("bin/") else 0o644
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


def record_for(path: Path, artifact: str = "master-15eb13af") -> ArtifactRecord:
    data = path.read_bytes()
    return ArtifactRecord(
        id=artifact,
        url=f"s3://bucket/artifacts/app/{artifact}.tar.gz",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def rel(n: int, artifact: str = "master-15eb13af") -> str:
    return f"20261126T14{n:02d}00Z-{artifact}"


class Clock:
    """A settable clock for staged_at, pins and ages."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float = 60) -> None:
        self.now += timedelta(seconds=seconds)


class OnlyPids(LinuxProcReader):
    """The real /proc, restricted to the given processes (this sandbox's pid 1 is unreadable,
    which would rightly block every prune; the blocking rule has its own test)."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__()
        self._pids = pids

    def pids(self) -> list[int]:
        return list(self._pids)


class FakeProc:
    """A /proc with scripted answers, for the pure rules of ``scan_release_usage``."""

    def __init__(self, procs: dict[int, dict[str, object]]) -> None:
        self.procs = procs

    def pids(self) -> list[int]:
        return sorted(self.procs)

    def _get(self, pid: int, what: str) -> object:
        value = self.procs[pid].get(what, [] if what != "cwd" else "/")
        if isinstance(value, BaseException):
            raise value
        return value

    def comm(self, pid: int) -> str:
        return str(self._get(pid, "comm") or f"proc{pid}")

    def cwd(self, pid: int) -> str:
        return str(self._get(pid, "cwd"))

    def fd_targets(self, pid: int) -> list[str]:
        value = self._get(pid, "fds")
        assert isinstance(value, list)
        return [str(v) for v in value]

    def mapped_paths(self, pid: int) -> list[str]:
        value = self._get(pid, "maps")
        assert isinstance(value, list)
        return [str(v) for v in value]


@pytest.fixture
def tarball(tmp_path: Path) -> Path:
    return build_tarball(tmp_path / "build.tar.gz", FILES)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_engine(tmp_path: Path, clock: Clock, **kw: object) -> ReleaseEngine:
    options: dict[str, object] = {
        "keep_releases": 2,
        "shared": ("log", "var/uploads"),
        "timeouts": Timeouts(lock=5),
    }
    options.update(kw)
    proc = options.pop("proc_reader", OnlyPids([os.getpid()]))
    app = AppConfig(name="app", root=str(tmp_path / "root"), **options)  # type: ignore[arg-type]
    engine = ReleaseEngine(app, proc_reader=proc, clock=clock)  # type: ignore[arg-type]
    engine.layout.ensure()
    return engine


@pytest.fixture
def engine(tmp_path: Path, clock: Clock) -> ReleaseEngine:
    return make_engine(tmp_path, clock)


DEEP = 3000  # levels of a tree made by hand: far past MAX_PATH_DEPTH and the recursion limit


def make_deep_chain(top: Path, depth: int = DEEP) -> None:
    """``top/d/d/.../d`` ``depth`` levels deep (a file at every 500th level), made the way an
    app user could by hand: each directory made below the last, never by its full path."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            if level % 500 == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


@pytest.fixture
def deep_trees() -> Iterator[list[Path]]:
    """Directories the test may leave deep trees in: removed afterwards by GNU rm, which
    handles any depth (one left behind would break pytest's removal of its temp dirs)."""
    tops: list[Path] = []
    yield tops
    for top in tops:
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=True)


def tmp_leftovers(layout: AppLayout) -> list[str]:
    out = []
    for d in (layout.app_dir, layout.releases_dir, layout.prefetched_dir, layout.state_dir):
        out += [str(p) for p in d.iterdir() if p.name.startswith(".tmp-")]
    return out


def assert_current_complete(engine: ReleaseEngine) -> str:
    cur = engine.current_release()
    assert cur is not None
    resolved = engine.layout.current.resolve()
    assert resolved == engine.layout.release_dir(cur).resolve()
    meta = json.loads((resolved / ".watcher" / "release.json").read_text())
    assert meta["release"] == cur
    assert (resolved / "app.txt").read_bytes() == FILES["app.txt"]
    return cur


class TestLayout:
    def test_paths(self, tmp_path: Path) -> None:
        lay = AppLayout(tmp_path / "app")
        assert lay.releases_dir == tmp_path / "app" / "releases"
        assert lay.current == tmp_path / "app" / "current"
        assert lay.lock_file == tmp_path / "app" / ".state" / "lock"
        assert lay.release_dir(rel(1)) == tmp_path / "app" / "releases" / rel(1)
        with pytest.raises(Exception, match="invalid release name"):
            lay.release_dir("../../etc")


class TestStaging:
    def test_stage_writes_tree_and_release_json_last(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        record = record_for(tarball)
        path = engine.stage_from_file(tarball, record, rel(1), "d-1")
        assert path == engine.layout.releases_dir / rel(1)
        assert (path / "app.txt").read_bytes() == FILES["app.txt"]
        assert (path / "data" / "blob.bin").read_bytes() == FILES["data/blob.bin"]
        assert os.access(path / "bin" / "run.sh", os.X_OK)
        assert path.stat().st_mode & 0o777 == 0o755  # umask 022 applied, not mkdtemp's 0700
        meta = json.loads((path / ".watcher" / "release.json").read_text())
        assert meta["artifact"] == record.id and meta["sha256"] == record.sha256
        assert meta["deploy_id"] == "d-1" and meta["release"] == rel(1)
        assert meta["size"] == record.size and meta["format"] == "tar.gz"
        assert meta["staged_at"] == "2026-11-26T14:00:00.000Z"
        assert engine.release_info(rel(1)) == meta
        assert tmp_leftovers(engine.layout) == []
        assert engine.current_release() is None  # staging never flips

    def test_shared_paths_are_relative_links_into_shared(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        path = engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        log = path / "log"
        assert log.is_symlink()
        assert str(Path(log).readlink()) == "../../shared/log"
        assert not (engine.layout.shared_dir / "log" / "from-tarball.txt").exists()
        uploads = path / "var" / "uploads"
        assert str(Path(uploads).readlink()) == "../../../shared/var/uploads"
        (log / "app.log").write_text("line\n")
        assert (engine.layout.shared_dir / "log" / "app.log").read_text() == "line\n"
        assert uploads.resolve() == (engine.layout.shared_dir / "var" / "uploads").resolve()

    @pytest.mark.parametrize("link", [".", "build/public"])
    def test_a_shared_path_under_a_symlink_of_the_release_still_lands_in_shared(
        self, tmp_path: Path, clock: Clock, link: str
    ) -> None:
        """The artifact review: with `public -> .` in the archive and shared
        `public/uploads`, the link was counted from `public/` but landed one level up:
        `../../../shared/public/uploads` from releases/<r>/ left the app's directory
        (`public -> build/public`: it pointed nowhere)."""
        engine = make_engine(tmp_path, clock, shared=("public/uploads",))
        src = tmp_path / "build.tar.gz"
        with tarfile.open(src, "w:gz") as tf:
            if link != ".":
                for d in ("build", "build/public"):
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tf.addfile(info)
            info = tarfile.TarInfo("public")
            info.type, info.linkname = tarfile.SYMTYPE, link
            tf.addfile(info)
            data = b"ok\n"
            info = tarfile.TarInfo("index.html")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        path = engine.stage_from_file(src, record_for(src), rel(1), "d-1")
        uploads = path / "public" / "uploads"
        assert uploads.is_symlink()
        shared = (engine.layout.shared_dir / "public" / "uploads").resolve()
        assert uploads.resolve() == shared, (uploads.readlink(), shared)
        (uploads / "a.png").write_bytes(b"png")
        assert (shared / "a.png").read_bytes() == b"png"

    @pytest.mark.parametrize("link", ["build/public", "index.html"], ids=["dangling", "file"])
    def test_a_shared_path_under_a_symlink_to_no_directory_says_so(
        self, tmp_path: Path, clock: Clock, link: str
    ) -> None:
        engine = make_engine(tmp_path, clock, shared=("public/uploads",))
        src = tmp_path / "build.tar.gz"
        with tarfile.open(src, "w:gz") as tf:
            data = b"ok\n"
            info = tarfile.TarInfo("index.html")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("public")
            info.type, info.linkname = tarfile.SYMTYPE, link
            tf.addfile(info)
        with pytest.raises(StagingError) as caught:
            engine.stage_from_file(src, record_for(src), rel(1), "d-1")
        assert str(caught.value) == (
            f"staging {rel(1)}: shared path public/uploads (the app's shared setting): a "
            "part of public in the release is no directory (a file, a symlink to none, or a "
            "loop): the archive and the setting do not fit together"
        )
        assert engine.release_names() == [] and tmp_leftovers(engine.layout) == []

    def test_shared_file_is_kept_and_linked(
        self, tmp_path: Path, clock: Clock, tarball: Path
    ) -> None:
        engine = make_engine(tmp_path, clock, shared=("config.yml",))
        (engine.layout.shared_dir / "config.yml").write_text("secret: 1\n")
        path = engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        assert (path / "config.yml").read_text() == "secret: 1\n"
        assert (engine.layout.shared_dir / "config.yml").is_file()

    def test_idempotent_same_sha_is_reused_without_extracting(
        self, engine: ReleaseEngine, tarball: Path, clock: Clock
    ) -> None:
        record = record_for(tarball)
        first = engine.stage_from_file(tarball, record, rel(1), "d-1")
        before = (first / ".watcher" / "release.json").read_bytes()
        tarball.unlink()  # a second extraction would fail
        clock.tick()
        again = engine.stage_from_file(tarball, record, rel(1), "d-2")
        assert again == first
        assert (again / ".watcher" / "release.json").read_bytes() == before

    def test_existing_release_from_another_sha_is_refused(
        self, engine: ReleaseEngine, tarball: Path, tmp_path: Path
    ) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        other = build_tarball(tmp_path / "other.tar.gz", {"app.txt": b"other\n"})
        other_record = record_for(other)
        with pytest.raises(ReleaseError) as info:
            engine.stage_from_file(other, other_record, rel(1), "d-2")
        assert record_for(tarball).sha256 in str(info.value)
        assert other_record.sha256 in str(info.value)
        assert (engine.layout.release_dir(rel(1)) / "app.txt").read_bytes() == b"hello\n"

    def test_incomplete_release_under_final_name_is_replaced(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        broken = engine.layout.release_dir(rel(1))
        broken.mkdir()
        (broken / "junk").write_text("half")
        path = engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        assert not (path / "junk").exists()
        assert engine.is_complete(rel(1))
        assert tmp_leftovers(engine.layout) == []

    def test_refused_archive_leaves_nothing(
        self, engine: ReleaseEngine, tmp_path: Path, tarball: Path
    ) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.flip(rel(1))
        bad = tmp_path / "evil.tar.gz"
        with tarfile.open(bad, "w:gz") as tf:
            info = tarfile.TarInfo("../escape.txt")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(ArchiveRefused, match="escape"):
            engine.stage_from_file(bad, record_for(bad, "evil-00000000"), rel(2), "d-2")
        assert engine.release_names() == [rel(1)]
        assert tmp_leftovers(engine.layout) == []
        assert not (engine.layout.app_dir / "escape.txt").exists()
        assert engine.current_release() == rel(1)

    def test_failure_while_linking_shared_removes_temp_dir(
        self, tmp_path: Path, clock: Clock, tarball: Path
    ) -> None:
        engine = make_engine(tmp_path, clock, shared=("app.txt/sub",))  # parent is a file
        with pytest.raises(StagingError, match=rel(1)):
            engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        assert engine.release_names() == []
        assert tmp_leftovers(engine.layout) == []

    def test_missing_archive_is_a_staging_error(self, engine: ReleaseEngine, tarball: Path) -> None:
        record = record_for(tarball)
        tarball.unlink()
        with pytest.raises(StagingError, match=r"build\.tar\.gz"):
            engine.stage_from_file(tarball, record, rel(1), "d-1")
        assert engine.release_names() == [] and tmp_leftovers(engine.layout) == []

    def test_stage_without_cache_or_prefetch_says_why(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        with pytest.raises(StagingError, match="no artifact cache"):
            engine.stage(record_for(tarball), rel(1), "d-1")

    def test_stage_fetches_through_the_cache(
        self, tmp_path: Path, clock: Clock, tarball: Path
    ) -> None:
        fetched: list[str] = []
        protected: list[set[str]] = []

        class LocalCache:  # stands in for ArtifactCache: a verified file on disk
            dir = tmp_path / "root" / "app" / "artifacts"

            def is_cached(self, record: ArtifactRecord) -> bool:
                return False

            def partial_path_for(self, record: ArtifactRecord) -> Path:
                return self.dir / f".partial-{record.id}"

            def fetch(
                self, record: ArtifactRecord, *, protect: set[str], cancel: object = None
            ) -> Path:
                fetched.append(record.id)
                protected.append(protect)
                return tarball

        engine = make_engine(tmp_path, clock)
        engine.cache = LocalCache()  # type: ignore[assignment]
        path = engine.stage(record_for(tarball), rel(1), "d-1")
        assert fetched == ["master-15eb13af"]
        assert protected == [set()]  # nothing live yet: nothing to protect
        with engine.lock():
            engine.flip(rel(1))
        engine.stage(record_for(tarball), rel(2), "d-2")
        assert protected[-1] == {record_for(tarball).sha256}  # the live release's artifact
        assert (path / "app.txt").read_bytes() == FILES["app.txt"]


class TestPostReleaseMarker:
    def test_a_tree_staged_again_has_not_had_its_post_release(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        """A tree removed by hand after its host acked ready is staged again at the flip:
        the marker of the old tree must not say the new one had its post_release (a crash
        during its run again then switched to it unbuilt: the code review)."""
        record = record_for(tarball)
        engine.stage_from_file(tarball, record, rel(1), "d-1")
        engine.mark_post_release_done(rel(1))
        assert engine.post_release_done(rel(1))
        shutil.rmtree(engine.layout.release_dir(rel(1)))
        engine.stage_from_file(tarball, record, rel(1), "d-1")  # extracted again
        assert engine.is_complete(rel(1))
        assert not engine.post_release_done(rel(1))
        engine.mark_post_release_done(rel(1))
        engine.stage_from_file(tarball, record, rel(1), "d-1")  # the same tree: reused
        assert engine.post_release_done(rel(1))


class TestPrefetched:
    def test_staging_a_prefetched_tree_is_a_rename(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        record = record_for(tarball)
        pre = engine.prefetch_extract(tarball, record)
        assert pre == engine.layout.prefetched_dir / f"{record.id}-{record.sha256[:12]}"
        inode = pre.stat().st_ino
        tarball.unlink()  # proves no extraction happens while staging
        path = engine.stage_from_file(tarball, record, rel(1), "d-1")
        assert path.stat().st_ino == inode
        assert not pre.exists()
        assert (path / "app.txt").read_bytes() == FILES["app.txt"]
        assert str(Path(path / "log").readlink()) == "../../shared/log"
        assert engine.release_info(rel(1))["sha256"] == record.sha256  # type: ignore[index]
        assert tmp_leftovers(engine.layout) == []
        engine.flip(rel(1))
        assert_current_complete(engine)

    def test_trees_stay_private_until_sealed_with_the_apps_owner(
        self, tmp_path: Path, clock: Clock, tarball: Path
    ) -> None:
        # While a tree is built or waits in prefetched/, the app's user (who owns the files
        # inside) must not be able to enter it and swap a directory for a symlink.
        if os.geteuid() != 0:
            pytest.fail("this test needs root (chown to the app's user)")
        nobody = pwd.getpwnam("nobody")
        engine = make_engine(tmp_path, clock, user="nobody")
        record = record_for(tarball)
        pre = engine.prefetch_extract(tarball, record)
        st = pre.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
        path = engine.stage(record, rel(1), "d-1")
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, 0o755)
        assert (path / "app.txt").stat().st_uid == nobody.pw_uid

    def test_shared_paths_it_creates_belong_to_the_apps_user(
        self, tmp_path: Path, clock: Clock, tarball: Path
    ) -> None:
        """The install review's case: `user: www-data` with `shared: [log]` got a root-owned
        shared/log, and the app could not write its log. The path itself is the app's; the
        directories above it stay the daemon's; one that exists is left as it is."""
        if os.geteuid() != 0:
            pytest.fail("this test needs root (chown to the app's user)")
        nobody = pwd.getpwnam("nobody")
        engine = make_engine(tmp_path, clock, user="nobody", shared=("log", "var/uploads", "etc"))
        (engine.layout.shared_dir / "etc").mkdir(parents=True)  # the operator's, kept
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        shared = engine.layout.shared_dir
        for path, uid in (("log", nobody.pw_uid), ("var/uploads", nobody.pw_uid), ("var", 0)):
            st = (shared / path).stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o755), path
        assert (shared / "etc").stat().st_uid == 0
        # The app's umask, not the daemon's (0022 under its unit): its group writes the log.
        old = os.umask(0o022)
        try:
            group = make_engine(tmp_path / "g", clock, user="nobody", umask=0o002)
            group.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        finally:
            os.umask(old)
        assert stat.S_IMODE((group.layout.shared_dir / "log").stat().st_mode) == 0o775

    def test_unknown_app_user_leaves_no_temporary_tree(
        self, tmp_path: Path, clock: Clock, tarball: Path
    ) -> None:
        engine = make_engine(tmp_path, clock, user="no-such-user-here")
        with pytest.raises(StagingError, match="unknown user"):
            engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        assert tmp_leftovers(engine.layout) == []

    def test_stage_uses_prefetched_without_cache(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        record = record_for(tarball)
        engine.prefetch_extract(tarball, record)
        assert engine.stage(record, rel(1), "d-1").is_dir()

    def test_prefetch_extract_is_idempotent(self, engine: ReleaseEngine, tarball: Path) -> None:
        record = record_for(tarball)
        first = engine.prefetch_extract(tarball, record)
        tarball.unlink()
        assert engine.prefetch_extract(tarball, record) == first

    def test_failed_prefetch_leaves_nothing(self, engine: ReleaseEngine, tmp_path: Path) -> None:
        junk = tmp_path / "junk.tar.gz"
        junk.write_bytes(b"not a tarball at all")
        with pytest.raises(ArchiveRefused):
            engine.prefetch_extract(junk, record_for(junk))
        assert list(engine.layout.prefetched_dir.iterdir()) == []


class TestABrokenLiveTree:
    """The tree `current` names, emptied by hand: only a committed deploy (``replace_live``,
    convergence and the apply) stages it again; never a deploy still in progress (an
    operator's request naming that release with other bytes would make the host serve them
    before any commit), and never on a read that failed for another reason."""

    def _live(self, engine: ReleaseEngine, tarball: Path) -> Path:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.flip(rel(1))
        live = engine.layout.release_dir(rel(1))
        (live / ".watcher" / "release.json").unlink()
        return live

    def test_a_deploy_in_progress_does_not_replace_it(
        self, engine: ReleaseEngine, tarball: Path, tmp_path: Path
    ) -> None:
        live = self._live(engine, tarball)
        assert "has no" in str(engine.live_problem())
        other = build_tarball(tmp_path / "other.tar.gz", {"app.txt": b"never committed\n"})
        with pytest.raises(ReleaseError, match="is the live one"):
            engine.stage_from_file(other, record_for(other, "evil-00000000"), rel(1), "d-2")
        assert (live / "app.txt").read_bytes() == FILES["app.txt"]
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1", replace_live=True)
        assert engine.live_problem() is None and (live / "app.txt").read_bytes() == FILES["app.txt"]

    def test_a_read_that_failed_otherwise_keeps_it(
        self, engine: ReleaseEngine, tarball: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.flip(rel(1))
        live = engine.layout.release_dir(rel(1))
        (live / "written-by-the-app").write_text("keep me")

        def eio(release_dir: Path, release: str) -> None:
            raise ReleaseError("cannot read it: Input/output error") from OSError(5, "EIO")

        monkeypatch.setattr("watcher.releases._load_release_json", eio)
        assert engine.live_problem() is None  # cannot tell: not broken
        with pytest.raises(ReleaseError, match="is the live one"):
            engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1", replace_live=True)
        assert (live / "written-by-the-app").read_text() == "keep me"


class TestFlip:
    def test_round_trip(
        self, engine: ReleaseEngine, tarball: Path, tmp_path: Path, clock: Clock
    ) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.flip(rel(1))
        assert str(Path(engine.layout.current).readlink()) == f"releases/{rel(1)}"
        assert assert_current_complete(engine) == rel(1)
        assert engine.previous_release() is None

        clock.tick()
        other = build_tarball(tmp_path / "b.tar.gz", {**FILES, "app.txt": FILES["app.txt"]})
        engine.stage_from_file(
            other, record_for(other, "master-22222222"), rel(2, "master-22222222"), "d-2"
        )
        assert engine.current_release() == rel(1)
        engine.flip(rel(2, "master-22222222"))
        assert assert_current_complete(engine) == rel(2, "master-22222222")
        assert engine.previous_release() == rel(1)

        engine.flip(rel(1))  # flip back
        assert assert_current_complete(engine) == rel(1)
        assert engine.previous_release() == rel(2, "master-22222222")
        assert tmp_leftovers(engine.layout) == []

    def test_flip_to_same_release_keeps_previous(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        record = record_for(tarball)
        engine.stage_from_file(tarball, record, rel(1), "d-1")
        engine.stage_from_file(tarball, record, rel(2), "d-2")
        engine.flip(rel(1))
        engine.flip(rel(2))
        engine.flip(rel(2))
        assert engine.previous_release() == rel(1)

    def test_refuses_incomplete_and_missing(self, engine: ReleaseEngine, tarball: Path) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.flip(rel(1))
        half = engine.layout.release_dir(rel(2))
        half.mkdir()
        (half / "app.txt").write_text("half")
        with pytest.raises(FlipError, match="no complete"):
            engine.flip(rel(2))
        with pytest.raises(FlipError, match=rel(3)):
            engine.flip(rel(3))
        assert engine.current_release() == rel(1)
        assert engine.previous_release() is None

    def test_refuses_release_json_of_another_release(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        src = engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        copy = engine.layout.release_dir(rel(2))
        copy.mkdir()
        (copy / ".watcher").mkdir()
        (copy / ".watcher" / "release.json").write_bytes(
            (src / ".watcher" / "release.json").read_bytes()
        )
        with pytest.raises(FlipError):
            engine.flip(rel(2))

    def test_backup(self, engine: ReleaseEngine, tarball: Path) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.flip(rel(1))
        engine.set_backup(rel(1))
        assert str(Path(engine.layout.current_backup).readlink()) == f"releases/{rel(1)}"
        assert engine.backup_release() == rel(1)
        with pytest.raises(FlipError):
            engine.set_backup(rel(2))
        engine.clear_backup()
        assert not engine.layout.current_backup.is_symlink()
        engine.clear_backup()  # idempotent
        engine.set_backup(rel(1))
        engine.set_backup(None)
        assert engine.backup_release() is None

    def test_a_timed_flip_renames_at_its_moment(self, engine: ReleaseEngine, tarball: Path) -> None:
        record = record_for(tarball)
        engine.stage_from_file(tarball, record, rel(1), "d-1")
        engine.stage_from_file(tarball, record, rel(2), "d-2")
        engine.flip(rel(1))
        moment = time.time() + 2.0
        flipper = threading.Thread(
            target=engine.flip, args=(rel(2),), kwargs={"not_before": moment}
        )
        flipper.start()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and not (
            engine.previous_release() == rel(1) and len(tmp_leftovers(engine.layout)) == 1
        ):
            time.sleep(0.01)
        # Waiting: `previous` and the new link are written, `current` has not moved.
        assert time.time() < moment, "the new link came late: nothing left to check"
        assert engine.current_release() == rel(1)
        assert engine.previous_release() == rel(1)
        assert len(tmp_leftovers(engine.layout)) == 1
        flipper.join(timeout=5)
        assert time.time() >= moment
        assert assert_current_complete(engine) == rel(2)
        assert tmp_leftovers(engine.layout) == []

    def test_a_flip_whose_moment_passed_goes_at_once(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        started = time.monotonic()
        engine.flip(rel(1), not_before=time.time() - 3600)
        assert time.monotonic() - started < 5  # not an hour, nor a wait at all
        assert assert_current_complete(engine) == rel(1)

    def test_flip_over_a_directory_fails_cleanly(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.layout.current.mkdir()
        (engine.layout.current / "x").write_text("legacy")
        with pytest.raises(FlipError, match="cannot point"):
            engine.flip(rel(1))
        assert tmp_leftovers(engine.layout) == []


class TestRecover:
    def test_removes_leftovers(self, engine: ReleaseEngine, tarball: Path) -> None:
        lay = engine.layout
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.flip(rel(1))
        (lay.app_dir / ".tmp-link-abcd").symlink_to(f"releases/{rel(1)}")
        (lay.releases_dir / f".tmp-stage-{rel(2)}-abcd" / "x").mkdir(parents=True)
        (lay.releases_dir / f".tmp-prune-{rel(0)}-abcd").mkdir()
        (lay.prefetched_dir / ".tmp-prefetch-x-1234").mkdir()
        (lay.state_dir / ".tmp-holds.json-1234").write_text("{")
        (lay.releases_dir / rel(3)).mkdir()  # incomplete under a final name
        actions = engine.recover()
        assert len(actions) == 6
        assert tmp_leftovers(lay) == []
        assert engine.release_names() == [rel(1)]
        assert assert_current_complete(engine) == rel(1)
        assert engine.recover() == []

    def test_a_broken_current_is_left_for_the_fleets_release_not_pointed_back(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        """The operator review: at start, a live tree emptied by hand made `current` go back
        to `previous`, even on a held host: an older release than the fleet's, never asked
        of the acks, and `status` called it healthy. The watcher, running, stages the
        fleet's release again (tested on a real fleet); at start it is left for that."""
        record = record_for(tarball)
        engine.stage_from_file(tarball, record, rel(1), "d-1")
        engine.stage_from_file(tarball, record, rel(2), "d-2")
        engine.flip(rel(1))
        engine.flip(rel(2))
        (engine.layout.release_dir(rel(2)) / ".watcher" / "release.json").unlink()
        actions = engine.recover()
        assert actions == [
            f"current points at incomplete {rel(2)}: left as it is (the watcher stages the "
            "fleet's release again unless the app is held here)"
        ]
        assert engine.current_release() == rel(2) and engine.previous_release() == rel(1)
        assert engine.live_problem() == f"{engine.layout.release_dir(rel(2))} has no {RELEASE_JSON}"
        assert engine.release_names() == [rel(1), rel(2)]  # its tree, for the stage again

    def test_current_pointed_at_what_is_no_release_is_named(self, engine: ReleaseEngine) -> None:
        engine.layout.current.symlink_to("/srv/by-hand")
        assert engine.recover() == [
            "current points at '/srv/by-hand', not a release: left as it is (the watcher "
            "stages the fleet's release again unless the app is held here)"
        ]

    def test_a_link_made_by_hand_to_no_release_names_none(self, engine: ReleaseEngine) -> None:
        """The second code review: `releases/hotfix` was taken as a release's name, and the
        hooks' context (`previous_release_dir`), a flip's `previous` and every release path
        then refused it: a convergence or a deploy failed on it at every try."""
        engine.layout.current.symlink_to("releases/hotfix")
        engine.layout.previous_file.write_text("hotfix\n")
        assert engine.current_release() is None and engine.previous_release() is None
        assert engine.recover()[0].startswith("current points at 'releases/hotfix', not a release")

    def test_dangling_current_without_previous_is_reported(self, engine: ReleaseEngine) -> None:
        engine.layout.current.symlink_to(f"releases/{rel(1)}")
        actions = engine.recover()
        assert any(f"current points at incomplete {rel(1)}" in a for a in actions)
        assert engine.layout.current.is_symlink()

    def test_backup_removed_unless_deploy_in_flight(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.flip(rel(1))
        engine.set_backup(rel(1))
        assert engine.recover(deploy_in_flight=True) == []
        assert engine.backup_release() == rel(1)
        assert engine.recover() == [f"removed {engine.layout.current_backup}"]
        assert not engine.layout.current_backup.is_symlink()

    def test_a_leftover_of_any_depth_goes_without_following_its_symlinks(
        self, engine: ReleaseEngine, tmp_path: Path, deep_trees: list[Path]
    ) -> None:
        deep_trees.append(engine.layout.app_dir)
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "keep").write_text("keep\n")
        leftover = engine.layout.releases_dir / f".tmp-stage-{rel(1)}-abcd"
        leftover.mkdir()
        make_deep_chain(leftover)
        (leftover / "out").symlink_to(outside)
        (leftover / "/".join(["d"] * 100) / "out").symlink_to(outside)
        assert engine.recover() == [f"removed leftover {leftover}"]
        assert tmp_leftovers(engine.layout) == []
        assert [p.name for p in outside.iterdir()] == ["keep"]

    def test_an_entry_it_cannot_handle_is_reported_and_the_rest_recovered(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        if os.geteuid() != 0:
            pytest.fail("this test needs root (a tmpfs mount); the test machine runs as root")
        lay = engine.layout
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.flip(rel(1))
        stuck = lay.releases_dir / rel(2)  # incomplete, and a mount point: cannot be renamed
        stuck.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(stuck)], check=True)
        try:
            leftover = lay.releases_dir / f".tmp-stage-{rel(3)}-abcd"
            (leftover / "x").mkdir(parents=True)
            (lay.post_release_dir / rel(4)).write_text("gone\n")
            with capture_logs() as logs:
                actions = engine.recover()
        finally:
            subprocess.run(["umount", str(stuck)], check=True)
        assert actions[0] == f"removed leftover {leftover}"
        assert actions[1].startswith(
            f"could not remove incomplete release {rel(2)}: cannot remove {stuck}: "
        )
        assert "Device or resource busy" in actions[1]
        assert len(actions) == 2
        assert not (lay.post_release_dir / rel(4)).exists()  # the steps after it still ran
        [failed] = [e for e in logs if e["event"] == "recovery_step_failed"]
        assert failed["log_level"] == "error" and str(stuck) in failed["error"]
        assert assert_current_complete(engine) == rel(1)


class TestHoldsAndPins:
    def test_hold_round_trip_survives_a_new_engine(self, tmp_path: Path, clock: Clock) -> None:
        engine = make_engine(tmp_path, clock)
        assert engine.held() is None
        hold = engine.hold("rollback --local", "alice")
        assert hold.at == "2026-11-26T14:00:00.000Z"
        again = make_engine(tmp_path, clock)
        assert again.held() == hold
        assert json.loads(engine.layout.holds_file.read_text())["hold"]["by"] == "alice"
        assert again.release_hold() == hold
        assert engine.held() is None
        assert engine.release_hold() is None

    def test_pin_needs_a_complete_release(self, engine: ReleaseEngine) -> None:
        with pytest.raises(ReleaseNotFound, match=rel(1)):
            engine.pin(rel(1), T0)

    def test_pin_is_listed(self, engine: ReleaseEngine, tarball: Path) -> None:
        engine.stage_from_file(tarball, record_for(tarball), rel(1), "d-1")
        engine.pin(rel(1), T0 + timedelta(days=3))
        (info,) = engine.list_releases()
        assert info.pinned_until == "2026-11-29T14:00:00.000Z"
        assert engine.pinned_until(rel(1)) == T0 + timedelta(days=3)
        engine.unpin(rel(1))
        assert engine.pinned_until(rel(1)) is None


class TestListReleases:
    def test_markers(self, engine: ReleaseEngine, tarball: Path, clock: Clock) -> None:
        record = record_for(tarball)
        for n in (1, 2, 3):
            engine.stage_from_file(tarball, record, rel(n), f"d-{n}")
            clock.tick()
        engine.mark_post_release_done(rel(1))
        engine.mark_post_release_done(rel(2))
        engine.flip(rel(1))
        engine.flip(rel(2))
        (engine.layout.releases_dir / rel(9)).mkdir()
        infos = {i.release: i for i in engine.list_releases()}
        assert [i.release for i in engine.list_releases()] == [rel(9), rel(1), rel(2), rel(3)]
        assert infos[rel(2)].is_current and not infos[rel(2)].is_previous
        assert infos[rel(1)].is_previous and infos[rel(1)].post_release_done
        assert infos[rel(3)].kept_for_resume and not infos[rel(3)].post_release_done
        assert not infos[rel(9)].complete and infos[rel(9)].artifact == ""
        assert infos[rel(1)].size_bytes == record.size
        assert infos[rel(2)].to_dict()["deploy_id"] == "d-2"


def test_the_acks_a_trim_spares_are_of_the_live_previous_backup_and_newest_releases(
    engine: ReleaseEngine, tarball: Path, clock: Clock
) -> None:
    """Not of every release on disk: with prune blocked (a process whose /proc entries
    cannot be read), that was every deploy's, and the soak review saw no ack trimmed; the
    newest ``keep_releases`` are what prune would keep."""
    from watcher.agent import AppAgent

    record = record_for(tarball)
    for n in range(1, 7):
        engine.stage_from_file(tarball, record, rel(n), f"d-{n}")
        clock.tick()
    for n in (3, 4, 5):
        engine.mark_post_release_done(rel(n))
        engine.flip(rel(n))
    engine.set_backup(rel(3))
    agent = AppAgent.__new__(AppAgent)  # only what _acks_to_keep reads
    agent.engine = engine
    agent.app = engine.app  # keep_releases: 2
    agent._applied_recently = ["d-applied"]
    assert set(agent._acks_to_keep("d-finished")) == {
        "d-finished",
        "d-applied",
        "d-3",  # backup
        "d-4",  # previous
        "d-5",  # live
        "d-6",  # the newest two
    }


class TestDropRelease:
    def test_drop(self, engine: ReleaseEngine, tarball: Path) -> None:
        record = record_for(tarball)
        engine.stage_from_file(tarball, record, rel(1), "d-1")
        engine.stage_from_file(tarball, record, rel(2), "d-2")
        engine.flip(rel(1))
        engine.mark_post_release_done(rel(2))
        assert engine.drop_release(rel(2)) is True
        assert engine.release_names() == [rel(1)]
        assert not engine.post_release_done(rel(2))
        assert engine.drop_release(rel(2)) is False
        with pytest.raises(ReleaseError, match="live"):
            engine.drop_release(rel(1))
        assert tmp_leftovers(engine.layout) == []

    def test_a_tree_deeper_than_any_archive_may_make_is_dropped(
        self, engine: ReleaseEngine, tarball: Path, deep_trees: list[Path]
    ) -> None:
        deep_trees.append(engine.layout.app_dir)
        record = record_for(tarball)
        engine.stage_from_file(tarball, record, rel(1), "d-1")
        engine.stage_from_file(tarball, record, rel(2), "d-2")
        engine.flip(rel(1))
        make_deep_chain(engine.layout.release_dir(rel(2)))  # the app's user owns the tree
        assert engine.drop_release(rel(2)) is True
        assert engine.release_names() == [rel(1)]
        assert tmp_leftovers(engine.layout) == []


class TestReleaseJsonFromTheAppsUser:
    """The app's user owns a staged tree and may replace its .watcher/release.json."""

    @staticmethod
    def staged(engine: ReleaseEngine, tarball: Path, n: int = 1) -> Path:
        engine.stage_from_file(tarball, record_for(tarball), rel(n), f"d-{n}")
        return engine.layout.release_dir(rel(n)) / ".watcher" / "release.json"

    @staticmethod
    def info_in_thread(call: object, fifo: Path) -> dict[str, object]:
        """Run ``call`` in a thread; fail (after letting it go) if it is still blocked at 5 s."""
        result: dict[str, object] = {}
        thread = threading.Thread(target=lambda: result.update(value=call()), daemon=True)  # type: ignore[operator]
        thread.start()
        thread.join(5)
        if thread.is_alive():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer lets the read go
            thread.join(5)
            pytest.fail(f"the daemon blocked reading the FIFO {fifo}")
        return result

    def test_a_fifo_is_not_opened_for_a_blocking_read(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        path = self.staged(engine, tarball)
        path.unlink()
        os.mkfifo(path)
        with capture_logs() as logs:
            result = self.info_in_thread(lambda: engine.release_info(rel(1)), path)
        assert result == {"value": None}
        [invalid] = [e for e in logs if e["event"] == "release_json_invalid"]
        assert invalid["error"] == f"{path} is not a regular file but a FIFO"
        with pytest.raises(FlipError, match="no complete"):
            engine.flip(rel(1))

    def test_current_whose_release_json_is_a_fifo_is_found_broken_at_start(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        self.staged(engine, tarball, 1)
        path = self.staged(engine, tarball, 2)
        engine.flip(rel(1))
        engine.flip(rel(2))
        path.unlink()
        os.mkfifo(path)
        result = self.info_in_thread(engine.recover, path)
        actions = result["value"]
        assert isinstance(actions, list)
        assert any(f"current points at incomplete {rel(2)}" in a for a in actions)
        assert engine.current_release() == rel(2)  # the watcher stages it again

    @pytest.mark.parametrize("target", ["/dev/zero", "elsewhere.json"])
    def test_a_symlink_is_not_followed(
        self, engine: ReleaseEngine, tarball: Path, tmp_path: Path, target: str
    ) -> None:
        path = self.staged(engine, tarball)
        elsewhere = tmp_path / target
        if target == "elsewhere.json":  # a valid copy: only where it is makes it wrong
            elsewhere.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(elsewhere)
        with capture_logs() as logs:
            assert engine.release_info(rel(1)) is None
        [invalid] = [e for e in logs if e["event"] == "release_json_invalid"]
        assert invalid["error"] == f"cannot read {path}: {path} is a symlink"

    def test_a_symlinked_watcher_directory_is_not_followed(
        self, engine: ReleaseEngine, tarball: Path, tmp_path: Path
    ) -> None:
        path = self.staged(engine, tarball)
        path.parent.rename(tmp_path / "meta")
        path.parent.symlink_to(tmp_path / "meta")
        with capture_logs() as logs:
            assert engine.release_info(rel(1)) is None
        [invalid] = [e for e in logs if e["event"] == "release_json_invalid"]
        assert invalid["error"] == f"cannot read {path}: {path.parent} is a symlink"

    def test_size_is_capped(self, engine: ReleaseEngine, tarball: Path) -> None:
        path = self.staged(engine, tarball)
        text = path.read_bytes().rstrip()
        path.write_bytes(text.ljust(RELEASE_JSON_MAX_BYTES))  # JSON allows trailing spaces
        assert engine.release_info(rel(1)) is not None
        path.write_bytes(text.ljust(RELEASE_JSON_MAX_BYTES + 1))
        with capture_logs() as logs:
            assert engine.release_info(rel(1)) is None
        [invalid] = [e for e in logs if e["event"] == "release_json_invalid"]
        assert invalid["error"] == (
            f"{path} is {RELEASE_JSON_MAX_BYTES + 1} bytes, over the "
            f"{RELEASE_JSON_MAX_BYTES} a release.json may have"
        )

    def test_json_nested_too_deep_is_invalid_not_a_crash(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        path = self.staged(engine, tarball)
        path.write_bytes(b"[" * 100_000)
        with capture_logs() as logs:
            assert engine.release_info(rel(1)) is None
            assert engine.recover() == [f"removed incomplete release {rel(1)}"]
        assert any(
            e["event"] == "release_json_invalid" and "is not valid JSON" in e["error"] for e in logs
        )


@pytest.fixture(scope="module")
def hostile() -> dict[str, tuple[bytes, str]]:
    return {name: (data, fragment) for name, data, fragment in hostile_archives()}


class TestRefusedArchivesAreRemembered:
    @pytest.mark.parametrize(
        "case",
        [
            "chained_gnu_long_name_headers",
            "chained_pax_headers",
            "negative_member_size",
            "deep_directory_tree",
        ],
    )
    def test_refused_remembered_and_refused_again_at_once(
        self,
        engine: ReleaseEngine,
        tmp_path: Path,
        hostile: dict[str, tuple[bytes, str]],
        deep_trees: list[Path],
        case: str,
    ) -> None:
        deep_trees.append(engine.layout.app_dir)
        data, fragment = hostile[case]
        archive = tmp_path / f"{case}.tar.gz"
        archive.write_bytes(data)
        record = record_for(archive)
        with pytest.raises(ArchiveRefused) as caught:
            engine.stage_from_file(archive, record, rel(1), "d-1")
        assert fragment in str(caught.value)
        refusal = engine.refusal(record.sha256)
        assert refusal is not None and refusal.kind == "archive"
        assert fragment in refusal.reason
        assert engine.release_names() == [] and tmp_leftovers(engine.layout) == []
        with pytest.raises(ArchiveRefused, match="was refused on this host"):
            engine.stage_from_file(archive, record, rel(2), "d-2")

    def test_a_copy_another_staging_refused_and_removed_meanwhile_is_that_refusal(
        self, engine: ReleaseEngine, tarball: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A prefetch and a deploy extract the same cached copy at once: the first to be
        refused remembers it and removes the copy, and the second, finding no bytes to
        check, must give that refusal, not say the copy changed on disk."""
        record = record_for(tarball)

        def refused_by_the_other(archive: Path, *args: object, **kw: object) -> None:
            engine._remember_refusal(record, "archive", "member 'x' is hostile")
            archive.unlink()
            raise ArchiveRefused("member 'x' is hostile")

        monkeypatch.setattr(releases_module, "extract_archive", refused_by_the_other)
        with pytest.raises(ArchiveRefused, match="was refused on this host"):
            engine.stage_from_file(tarball, record, rel(1), "d-1")

    def test_records_claiming_a_refused_archives_sha256_cannot_push_its_refusal_out(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        """Any CI token may write records naming a known bomb's sha256 with other urls:
        each one's failed download is remembered beside the bomb's refusal, never over it
        (every host would download and judge the bomb again)."""
        bomb = record_for(tarball)
        engine._remember_refusal(bomb, "archive", "member 'x': ratio over 200")
        for n in range(releases_module.REFUSED_KEEP + 1):
            other = dataclasses.replace(bomb, id=f"evil-{n:08d}", size=bomb.size + 1 + n)
            engine._remember_refusal(other, "integrity", "size mismatch")
        refusal = engine.refusal(bomb.sha256, bomb.format, source=releases_module._source(bomb))
        assert refusal is not None and refusal.kind == "archive"
        with pytest.raises(ArchiveRefused, match="ratio over 200"):
            engine.stage_from_file(tarball, bomb, rel(1), "d-1")
        # The integrity entries are kept per url and size, the newest REFUSED_KEEP of them.
        last = dataclasses.replace(
            bomb, id="evil-last", size=bomb.size + 1 + releases_module.REFUSED_KEEP
        )
        # (read as a tar, the archive's refusal, made for tar.gz, does not hold)
        held = engine.refusal(bomb.sha256, "tar", source=releases_module._source(last))
        assert held is not None and held.kind == "integrity"
        first = dataclasses.replace(bomb, id="evil-first", size=bomb.size + 1)
        assert engine.refusal(bomb.sha256, "tar", source=releases_module._source(first)) is None

    def test_bytes_refused_as_one_format_are_judged_again_as_another(
        self, engine: ReleaseEngine, tarball: Path
    ) -> None:
        # A record that named the wrong format made good bytes look broken; the record
        # fixed, the same content must stage, not meet the old refusal.
        wrong = dataclasses.replace(record_for(tarball), format="tar")
        with pytest.raises(ArchiveRefused):
            engine.stage_from_file(tarball, wrong, rel(1), "d-1")
        assert engine.refusal(wrong.sha256, "tar") is not None
        with pytest.raises(ArchiveRefused, match="was refused on this host"):
            engine.stage_from_file(tarball, wrong, rel(2), "d-2")
        fixed = record_for(tarball)
        assert engine.refusal(fixed.sha256, fixed.format) is None
        engine.stage_from_file(tarball, fixed, rel(3), "d-3")
        assert rel(3) in engine.release_names()

    def test_a_refusal_of_older_rules_is_judged_again(
        self, engine: ReleaseEngine, tmp_path: Path
    ) -> None:
        """A tree packed in a setgid directory, refused by a version that refused a
        directory's setgid bit (its refusal remembered without ``rules=``), stages once the
        host runs this one: the rules that made the refusal are not the rules now."""
        src = tmp_path / "src"
        (src / "site").mkdir(parents=True)
        (src / "site" / "index.html").write_text("hi\n")
        for d in (src, src / "site"):
            d.chmod(0o2775)
        archive = tmp_path / "setgid.tar.gz"
        subprocess.run(["tar", "czf", str(archive), "-C", str(src), "."], check=True)
        record = record_for(archive)
        # the key as versions before archive.RULES wrote it: the limits alone
        old_key = engine._limits_key(record.format).removeprefix(f"rules={RULES} ")
        assert old_key.startswith("format=tar.gz members=")
        engine.layout.state_dir.mkdir(parents=True, exist_ok=True)
        engine.layout.refused_file.write_text(
            json.dumps(
                {
                    "version": 1,
                    "refused": [
                        {
                            "sha256": record.sha256,
                            "artifact": record.id,
                            "kind": "archive",
                            "reason": "member '.' has setuid/setgid/sticky bits (mode 2775)",
                            "at": "2026-12-01T00:00:00Z",
                            "limits": old_key,
                        }
                    ],
                }
            )
        )
        assert engine.refusal(record.sha256) is None
        engine.stage_from_file(archive, record, rel(1), "d-1")
        assert engine.release_info(rel(1)) is not None


@pytest.fixture
def five(engine: ReleaseEngine, tarball: Path, clock: Clock) -> ReleaseEngine:
    """rel(1)..rel(5) staged a minute apart, post_release done; keep_releases=2, no flip."""
    record = record_for(tarball)
    for n in range(1, 6):
        engine.stage_from_file(tarball, record, rel(n), f"d-{n}")
        engine.mark_post_release_done(rel(n))
        clock.tick()
    return engine


@pytest.fixture
def child_procs() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def spawn_ready(
    procs: list[subprocess.Popen[str]], code: str, cwd: Path | None = None
) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


class TestPrune:
    def test_keeps_newest_n_and_current(self, five: ReleaseEngine) -> None:
        five.flip(rel(5))
        assert five.prune(dry_run=True) == [rel(1), rel(2), rel(3)]
        assert len(five.release_names()) == 5  # dry run removed nothing
        assert five.prune() == [rel(1), rel(2), rel(3)]
        assert five.release_names() == [rel(4), rel(5)]
        assert tmp_leftovers(five.layout) == []

    def test_never_current(self, five: ReleaseEngine) -> None:
        five.flip(rel(1))
        assert five.prune() == [rel(2), rel(3)]
        assert five.plan_prune().keep[rel(1)] == "current"
        assert_current_complete(five)

    def test_never_previous(self, five: ReleaseEngine) -> None:
        five.flip(rel(2))
        five.flip(rel(5))
        assert five.prune() == [rel(1), rel(3)]
        assert five.previous_release() == rel(2)
        assert rel(2) in five.release_names()

    def test_never_backup(self, five: ReleaseEngine) -> None:
        five.flip(rel(5))
        five.set_backup(rel(1))
        assert five.prune() == [rel(2), rel(3)]

    def test_never_pinned_until_expiry(self, five: ReleaseEngine, clock: Clock) -> None:
        five.flip(rel(5))
        five.pin(rel(1), clock.now + timedelta(hours=1))
        five.pin(rel(2), clock.now - timedelta(seconds=1))
        assert five.prune() == [rel(2), rel(3)]
        clock.tick(3601)
        assert five.prune() == [rel(1)]
        assert five.pinned_until(rel(1)) is None  # the pin went with the release

    def test_never_in_flight(self, five: ReleaseEngine) -> None:
        five.flip(rel(5))
        assert five.prune(in_flight={rel(1)}) == [rel(2), rel(3)]
        assert five.plan_prune(in_flight=[rel(4)]).keep[rel(4)] == "in flight"

    def test_never_cwd_of_a_live_process(self, five: ReleaseEngine, child_procs: list) -> None:  # type: ignore[type-arg]
        five.flip(rel(1))
        child = spawn_ready(
            child_procs,
            "import sys; print('ready', flush=True); sys.stdin.read()",
            cwd=five.layout.current / "bin",
        )
        five.proc_reader = OnlyPids([os.getpid(), child.pid])
        five.flip(rel(2))
        five.flip(rel(5))  # current=5, previous=2: only the child's cwd protects rel(1)
        assert five.plan_prune().keep[rel(1)] == "used by a running process"
        assert five.prune() == [rel(3)]
        child.kill()
        child.wait()
        assert five.prune() == [rel(1)]

    def test_never_a_file_held_open(
        self,
        five: ReleaseEngine,
        child_procs: list,  # type: ignore[type-arg]
    ) -> None:
        five.flip(rel(5))
        target = five.layout.release_dir(rel(1)) / "data" / "blob.bin"
        child = spawn_ready(
            child_procs,
            f"import sys; f = open({str(target)!r}, 'rb'); "
            "print('ready', flush=True); sys.stdin.read()",
        )
        five.proc_reader = OnlyPids([os.getpid(), child.pid])
        assert five.prune() == [rel(2), rel(3)]
        assert target.exists()

    def test_never_a_mapped_file(
        self,
        five: ReleaseEngine,
        child_procs: list,  # type: ignore[type-arg]
    ) -> None:
        five.flip(rel(5))
        target = five.layout.release_dir(rel(2)) / "data" / "blob.bin"
        child = spawn_ready(
            child_procs,
            "import ctypes, os, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.mmap.restype = ctypes.c_void_p\n"
            "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, "
            "ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
            f"fd = os.open({str(target)!r}, os.O_RDONLY)\n"
            "addr = libc.mmap(None, 4096, 1, 2, fd, 0)\n"  # PROT_READ, PRIVATE
            "assert addr not in (None, ctypes.c_void_p(-1).value)\n"
            "os.close(fd)\n"
            "print('ready', flush=True); sys.stdin.read()",
        )
        reader = OnlyPids([child.pid])
        assert not any(str(target) in t for t in reader.fd_targets(child.pid))  # fd closed
        five.proc_reader = reader
        assert five.prune() == [rel(1), rel(3)]

    def test_unreadable_process_blocks_the_whole_prune(self, five: ReleaseEngine) -> None:
        five.flip(rel(5))
        five.proc_reader = FakeProc(
            {
                10: {"cwd": "/"},
                42: {"cwd": PermissionError(13, "Permission denied", "/proc/42/cwd")},
            }
        )
        plan = five.plan_prune()
        assert plan.blocked is not None and "pid 42" in plan.blocked
        assert plan.remove == [] and plan.held_back == [rel(1), rel(2), rel(3)], plan
        assert five.prune() == []
        assert five.prune(dry_run=True) == []
        assert len(five.release_names()) == 5

    def test_an_unreadable_process_the_app_names_in_prune_ignore_does_not_block(
        self, five: ReleaseEngine
    ) -> None:
        """This machine's pid 1 (a VM's init) cannot be read even by root with
        CAP_SYS_PTRACE: every prune was blocked and the releases piled up (the soak review:
        851 on each host after 1,000 deploys). The operator may say it uses no release."""
        five.flip(rel(5))
        denied = PermissionError(13, "Permission denied", "/proc/1/cwd")
        five.proc_reader = FakeProc(
            {1: {"cwd": denied, "comm": "process_api"}, 42: {"cwd": "/", "comm": "sleep"}}
        )
        plan = five.plan_prune()
        assert plan.blocked is not None and "pid 1 ('process_api'): " in plan.blocked, plan
        five.app = replace(five.app, prune_ignore=("process_api",))
        # only the processes it names: another one that cannot be read still blocks
        five.proc_reader.procs[43] = {"cwd": denied, "comm": "sshd"}
        plan = five.plan_prune()
        assert plan.blocked is not None and "pid 43 ('sshd'): " in plan.blocked, plan
        # a name is the process's own to set: shown escaped, never a line of its own
        five.proc_reader.procs[43]["comm"] = "x\nprune: ok"
        assert "pid 43 ('x\\nprune: ok'): " in str(five.plan_prune().blocked)
        del five.proc_reader.procs[43]
        assert five.prune() == [rel(1), rel(2), rel(3)]

    def test_nothing_to_remove_reads_no_process(self, five: ReleaseEngine) -> None:
        """The /proc scan (and with it an unreadable process's veto) only matters when
        something would be removed: a prune with nothing to remove does not look."""
        five.flip(rel(5))
        five.proc_reader = FakeProc({})
        assert five.prune() == [rel(1), rel(2), rel(3)]
        five.proc_reader = FakeProc({42: {"cwd": PermissionError(13, "Permission denied")}})
        plan = five.plan_prune()
        assert plan.blocked is None and plan.remove == [], plan
        assert five.prune() == []
        assert five.release_names() == [rel(4), rel(5)]

    def test_exited_process_is_skipped(self, five: ReleaseEngine) -> None:
        five.flip(rel(5))
        five.proc_reader = FakeProc(
            {
                42: {"cwd": FileNotFoundError(2, "gone")},
                43: {"cwd": "/", "fds": ProcessLookupError()},
            }
        )
        assert five.prune() == [rel(1), rel(2), rel(3)]

    def test_incomplete_releases_are_removed_and_do_not_count(self, five: ReleaseEngine) -> None:
        five.flip(rel(5))
        (five.layout.releases_dir / rel(9)).mkdir()
        assert five.prune() == [rel(1), rel(2), rel(3), rel(9)]
        assert five.release_names() == [rel(4), rel(5)]

    def test_aborted_staging_kept_for_resume_until_max_age(
        self, tmp_path: Path, clock: Clock, tarball: Path
    ) -> None:
        engine = make_engine(tmp_path, clock, aborted_staging_max_age=3600.0)
        record = record_for(tarball)
        for n in (1, 2, 3):
            engine.stage_from_file(tarball, record, rel(n), f"d-{n}")
            engine.mark_post_release_done(rel(n))
            clock.tick()
        engine.flip(rel(3))
        engine.stage_from_file(tarball, record, rel(4), "d-4")  # post_release never ran
        clock.tick()
        plan = engine.plan_prune()
        assert plan.keep[rel(4)] == "aborted staging kept for resume"
        assert engine.prune() == [rel(1)]  # rel(4) does not push rel(2) out of keep N=2
        clock.tick(3600)
        assert engine.prune() == [rel(4)]
        assert engine.release_names() == [rel(2), rel(3)]

    def test_only_the_newest_aborted_staging_of_a_build_is_kept(
        self, tmp_path: Path, clock: Clock, tarball: Path
    ) -> None:
        """`deploy --resume` resumes the newest deploy of a build only: ten aborted deploys
        of one build kept ten trees for a week (the operator review). One per build."""
        engine = make_engine(tmp_path, clock, aborted_staging_max_age=3600.0)
        record = record_for(tarball)
        other_tb = build_tarball(tmp_path / "other.tar.gz", {"f": b"other"})
        other = record_for(other_tb, "feature-0000beef")
        engine.stage_from_file(tarball, record, rel(1), "d-1")
        engine.mark_post_release_done(rel(1))
        engine.flip(rel(1))
        for n in (2, 3, 4):  # three aborted deploys of one build, post_release never ran
            clock.tick()
            engine.stage_from_file(tarball, record, rel(n), f"d-{n}")
        clock.tick()
        engine.stage_from_file(other_tb, other, rel(5, "feature-0000beef"), "d-5")
        plan = engine.plan_prune()
        assert plan.keep[rel(4)] == "aborted staging kept for resume"
        assert plan.keep[rel(5, "feature-0000beef")] == "aborted staging kept for resume"
        assert engine.prune() == [rel(2), rel(3)]
        assert engine.release_names() == [rel(1), rel(4), rel(5, "feature-0000beef")]

    def test_stale_prefetched_trees_go(self, five: ReleaseEngine, tmp_path: Path) -> None:
        five.flip(rel(5))
        for n in range(4):
            tb = build_tarball(tmp_path / f"p{n}.tar.gz", {"f": str(n).encode()})
            path = five.prefetch_extract(tb, record_for(tb, f"feature-{n:08d}"))
            os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))
        five.prune()
        assert sorted(p.name[:16] for p in five.layout.prefetched_dir.iterdir()) == [
            "feature-00000002",
            "feature-00000003",
        ]

    def test_stale_prefetched_trees_go_even_when_the_scan_blocks_releases(
        self, five: ReleaseEngine, tmp_path: Path
    ) -> None:
        # A container without CAP_SYS_PTRACE cannot read every process: no release may go,
        # but nothing runs from a pre-extracted tree, and they would pile up with builds.
        five.flip(rel(5))
        for n in range(4):
            tb = build_tarball(tmp_path / f"p{n}.tar.gz", {"f": str(n).encode()})
            path = five.prefetch_extract(tb, record_for(tb, f"feature-{n:08d}"))
            os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))
        five.proc_reader = FakeProc({42: {"cwd": PermissionError(13, "Permission denied")}})
        plan = five.plan_prune()
        assert plan.blocked is not None and len(plan.remove_prefetched) == 2
        assert five.prune(dry_run=True) == []
        assert len(list(five.layout.prefetched_dir.iterdir())) == 4
        assert five.prune() == []
        assert len(five.release_names()) == 5
        assert sorted(p.name[:16] for p in five.layout.prefetched_dir.iterdir()) == [
            "feature-00000002",
            "feature-00000003",
        ]

    def test_a_prefetch_drops_stale_trees_unless_the_lock_is_taken(
        self, five: ReleaseEngine, tmp_path: Path
    ) -> None:
        def prefetched() -> list[str]:
            return sorted(p.name[:16] for p in five.layout.prefetched_dir.iterdir())

        records = []
        for n in range(4):
            tb = build_tarball(tmp_path / f"p{n}.tar.gz", {"f": str(n).encode()})
            records.append(record_for(tb, f"feature-{n:08d}"))
            path = five.prefetch_extract(tb, records[-1])
            os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))
        five.in_flight_artifacts.add(records[0].sha256)  # a task uses the oldest one
        with five.lock(owner="a deploy"):
            assert five.drop_stale_prefetched() == []  # never waits for a deploy
        assert len(prefetched()) == 4
        assert five.drop_stale_prefetched() == [f"feature-00000001-{records[1].sha256[:12]}"]
        assert prefetched() == ["feature-00000000", "feature-00000002", "feature-00000003"]


class TestScanReleaseUsage:
    def test_paths_map_to_release_names(self) -> None:
        reader = FakeProc(
            {
                1: {"cwd": "/srv/app/releases/r1/bin"},
                2: {"cwd": "/", "fds": ["/srv/app/releases/r2/log.txt", "socket:[123]"]},
                3: {"cwd": "/", "maps": ["/srv/app/releases/r3 (deleted)", "/usr/lib/libc.so"]},
                4: {"cwd": "/srv/app/releases"},
                5: {"cwd": "/srv/app/releases-other/r5"},
            }
        )
        assert scan_release_usage(reader, "/srv/app/releases") == ({"r1", "r2", "r3"}, None)

    def test_real_proc_sees_our_own_cwd(self, tmp_path: Path) -> None:
        releases = tmp_path / "releases"
        (releases / "r1").mkdir(parents=True)
        old = Path.cwd()
        os.chdir(releases / "r1")
        try:
            used, blocker = scan_release_usage(OnlyPids([os.getpid()]), str(releases))
        finally:
            os.chdir(old)
        assert (used, blocker) == ({"r1"}, None)


def test_a_prune_keeps_the_releases_the_fleet_names(five: ReleaseEngine) -> None:
    five.flip(rel(5))
    plan = five.plan_prune(fleet={rel(1): "the fleet's previous release (rollback target)"})
    assert plan.keep[rel(1)] == "the fleet's previous release (rollback target)"
    assert five.prune(plan=plan) == [rel(2), rel(3)]
    assert rel(1) in five.release_names()


def test_a_half_staged_tree_the_fleet_names_still_goes(five: ReleaseEngine) -> None:
    """Only a complete release serves a rollback: an interrupted staging of that name is
    removed as before (the fleet's rollback restages it)."""
    five.flip(rel(5))
    (five.layout.releases_dir / rel(9)).mkdir()  # no release.json: never completed
    plan = five.plan_prune(fleet={rel(9): "the fleet's previous release (rollback target)"})
    assert rel(9) in plan.remove and rel(9) not in plan.keep


class TestUntrustedDir:
    """Where the daemon writes as root, no other user may put a symlink: the attacker
    review turned a root directory over to the app's user by swapping a staged tree for a
    symlink in a `releases/` of its own, made in an app directory it owned."""

    @pytest.fixture
    def app_dir(self, tmp_path: Path) -> Path:
        if os.geteuid() != 0:
            pytest.fail("this test needs root (chown to another user)")
        app_dir = tmp_path / "srv" / "web"
        for d in (app_dir / "releases", app_dir / ".state"):
            d.mkdir(parents=True)
        return app_dir

    def test_directories_of_root_and_a_sticky_one_above_are_trusted(self, app_dir: Path) -> None:
        assert untrusted_dir(app_dir) == []
        app_dir.parent.chmod(0o1777)  # as /tmp: nobody renames what root owns in it
        assert untrusted_dir(app_dir) == []
        assert untrusted_dir(app_dir / "not-made-yet") == []  # made by the daemon, as root
        # The app's own directory sticky is not fine: anyone may make a name in it that
        # the daemon makes later (current_backup, a release to stage).
        app_dir.chmod(0o1777)
        assert untrusted_dir(app_dir) == [f"{app_dir} is mode 1777: writable by every user"]

    @pytest.mark.parametrize("where", ["", "releases", ".state", "shared", ".."])
    def test_one_owned_by_another_user_is_named(self, app_dir: Path, where: str) -> None:
        nobody = pwd.getpwnam("nobody")
        path = app_dir / where if where != ".." else app_dir.parent
        path.mkdir(exist_ok=True)
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        said = untrusted_dir(app_dir)
        assert said == [f"{path} is owned by nobody (uid {nobody.pw_uid})"], said

    @pytest.mark.parametrize(("mode", "group"), [(0o777, "root"), (0o775, "nogroup")])
    def test_one_others_may_write_is_named(self, app_dir: Path, mode: int, group: str) -> None:
        releases = app_dir / "releases"
        releases.chmod(mode)
        gid = grp.getgrnam(group).gr_gid
        os.chown(releases, 0, gid)
        who = "every user" if mode & 0o002 else f"group {group} (gid {gid})"
        said = untrusted_dir(app_dir)
        assert said == [f"{releases} is mode {mode:04o}: writable by {who}"], said
        if group == "nogroup":  # root's group writing (a umask of 0002) is root writing
            os.chown(releases, 0, 0)
            assert untrusted_dir(app_dir) == []

    def test_an_acl_entry_that_lets_another_user_write_is_named(
        self, app_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`setfacl -m u:www-data:rwx`: the mode shows only the ACL's mask (0775, group
        root), which the group rule alone took as root's own group writing."""
        nobody = pwd.getpwnam("nobody")
        entries = [(0x01, 7, 0xFFFFFFFF), (0x02, 7, nobody.pw_uid), (0x04, 5, 0xFFFFFFFF)]
        entries += [(0x10, 7, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)]
        acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
        try:
            os.setxattr(app_dir, "system.posix_acl_access", acl)
        except OSError as exc:  # a filesystem without ACLs here: the same bytes, read back
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            app_dir.chmod(0o775)
            real = os.getxattr
            monkeypatch.setattr(
                releases_module.os,
                "getxattr",
                lambda p, name, **kw: acl if Path(p) == app_dir else real(p, name, **kw),
            )
        assert stat.S_IMODE(app_dir.stat().st_mode) == 0o775
        assert untrusted_dir(app_dir) == [
            f"{app_dir} has a POSIX ACL entry: user nobody (uid {nobody.pw_uid}) may write"
        ]

    def test_each_symlink_on_the_way_counts_and_what_it_resolves_to(
        self, app_dir: Path, tmp_path: Path
    ) -> None:
        nobody = pwd.getpwnam("nobody")
        disk = tmp_path / "disk"
        (disk / "web-releases").mkdir(parents=True)
        (app_dir / "releases").rmdir()
        (app_dir / "releases").symlink_to(disk / "web-releases")  # moved to another disk
        assert untrusted_dir(app_dir) == []
        os.chown(disk, nobody.pw_uid, nobody.pw_gid)
        assert untrusted_dir(app_dir) == [f"{disk} is owned by nobody (uid {nobody.pw_uid})"]
        os.chown(disk, 0, 0)
        os.lchown(app_dir / "releases", nobody.pw_uid, nobody.pw_gid)
        said = untrusted_dir(app_dir)
        assert said == [f"{app_dir}/releases is a symlink owned by nobody (uid {nobody.pw_uid})"]
        os.lchown(app_dir / "releases", 0, 0)
        # A root given through two symlinks: the directory holding the second one counts,
        # though it is neither on the path as written nor on the one resolved.
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        (mnt / "x").symlink_to(app_dir.parent)
        (tmp_path / "link").symlink_to(mnt / "x")
        assert untrusted_dir(tmp_path / "link" / "web") == []
        os.chown(mnt, nobody.pw_uid, nobody.pw_gid)  # may point x elsewhere
        assert untrusted_dir(tmp_path / "link" / "web") == [
            f"{mnt} is owned by nobody (uid {nobody.pw_uid})"
        ]

    def test_a_file_others_may_write_is_named_even_sticky(self, tmp_path: Path) -> None:
        if os.geteuid() != 0:
            pytest.fail("this test needs root")
        hook = tmp_path / "hook"
        hook.write_text("#!/bin/sh\n")
        hook.chmod(0o1777)
        assert untrusted_path(hook) == [f"{hook} is mode 1777: writable by every user"]
        hook.chmod(0o755)
        assert untrusted_path(hook) == []
