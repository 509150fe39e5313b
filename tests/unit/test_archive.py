"""Safe tar extraction: the hostile corpus is refused without touching anything outside dest."""

from __future__ import annotations

import bz2
import contextlib
import errno
import io
import itertools
import lzma
import os
import re
import stat
import subprocess
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.hostile_archives import (
    CORPUS_MAX_BYTES,
    CORPUS_MAX_MEMBERS,
    Entry,
    deep_path,
    gzip_bytes,
    gzip_member,
    hostile_archives,
    make_tar,
    make_tar_gz,
)
from tests.support.memory import least_peak
from watcher import archive
from watcher.archive import (
    ENTRY_COST,
    MAX_PATH_DEPTH,
    DiskBudget,
    ExtractStats,
    _TreeRules,
    check_members,
    extract_archive,
    sync_tree,
)
from watcher.errors import ArchiveDoesNotFit, ArchiveRefused, StagingCancelled, StagingError

CORPUS = hostile_archives()
MTIME = 1_600_000_000
MiB = 1024 * 1024


def snapshot(top: Path, *, skip: Path | None = None) -> dict[str, tuple[object, ...]]:
    """Every entry below ``top`` (not following symlinks): type, mode, size, mtime, target."""
    seen: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        if skip is not None and here == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if skip is not None and p == skip:
                continue
            st = p.lstat()
            target = str(p.readlink()) if stat.S_ISLNK(st.st_mode) else None
            seen[str(p.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns, target)
    return seen


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(tmp, dest): dest is ``<tmp>/root/app/.tmp-stage-x``, next to a live-looking app dir."""
    app = tmp_path / "root" / "app"
    (app / "releases" / "r1").mkdir(parents=True)
    (app / "releases" / "r1" / "index.html").write_text("live\n")
    (app / "current").symlink_to("releases/r1")
    (app / "shared").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("keep\n")
    dest = app / ".tmp-stage-x"
    dest.mkdir()
    return tmp_path, dest


def extract(
    data: bytes,
    dest: Path,
    *,
    fmt: str = "tar.gz",
    cancel: Callable[[], bool] | None = None,
    **kw: int,
) -> ExtractStats:
    """Extract ``data`` as an archive written to ``<tmp>/archive.<fmt>`` (``sandbox``)."""
    archive = dest.parent.parent.parent / f"archive.{fmt}"
    archive.write_bytes(data)
    limits: dict[str, int] = {"max_members": 1000, "max_bytes": 64 * 1024 * 1024, "umask": 0o022}
    limits.update(kw)
    return extract_archive(archive, dest, fmt=fmt, cancel=cancel, **limits)


class TestHostileCorpus:
    def test_corpus_is_large_enough(self) -> None:
        assert len(CORPUS) >= 20
        assert len({name for name, _, _ in CORPUS}) == len(CORPUS)

    @pytest.mark.parametrize(("name", "data", "fragment"), CORPUS, ids=[c[0] for c in CORPUS])
    def test_refused_and_nothing_written_outside(
        self, sandbox: tuple[Path, Path], name: str, data: bytes, fragment: str
    ) -> None:
        tmp, dest = sandbox
        archive = tmp / "archive.tar.gz"
        archive.write_bytes(data)
        before = snapshot(tmp, skip=dest)
        passwd = Path("/etc/passwd").stat()
        with pytest.raises(ArchiveRefused) as caught:
            extract_archive(
                archive,
                dest,
                fmt="tar.gz",
                max_members=CORPUS_MAX_MEMBERS,
                max_bytes=CORPUS_MAX_BYTES,
                umask=0o022,
            )
        assert fragment in str(caught.value)
        assert "\n" not in str(caught.value)
        assert snapshot(tmp, skip=dest) == before
        assert sorted(p.name for p in (tmp / "outside").iterdir()) == ["secret"]
        assert Path("/etc/passwd").stat().st_mtime_ns == passwd.st_mtime_ns
        assert not Path("/tmp/evil").exists()
        # whatever was extracted before the refusal stayed inside dest
        for p in dest.rglob("*"):
            assert p.is_symlink() or p.resolve().is_relative_to(dest.resolve())

    def test_same_archives_refused_as_plain_tar(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        data = make_tar([Entry("ok", data=b"1"), Entry("../evil", data=b"x")])
        with pytest.raises(ArchiveRefused, match=r"'\.\./evil' has a '\.\.' component"):
            extract(data, dest, fmt="tar")

    def test_padding_bomb_refused_under_generous_limits(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        data = gzip_bytes(make_tar([Entry("a", data=b"1")]) + bytes(24 * 1024 * 1024))
        with pytest.raises(ArchiveRefused, match="bytes of padding after the end of the archive"):
            extract(data, dest)

    def test_zip_refused_as_plain_tar(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        zip_bytes = next(data for name, data, _ in CORPUS if name == "zip_file")
        with pytest.raises(ArchiveRefused, match="not a valid tar archive"):
            extract(zip_bytes, dest, fmt="tar")


class TestGoodArchive:
    def entries(self) -> list[Entry]:
        return [
            Entry("./", kind="dir"),
            Entry("bin", kind="dir", mtime=MTIME),
            Entry("bin/run", data=b"#!/bin/sh\necho run\n", mode=0o755, mtime=MTIME),
            Entry("lib/deep/b/c", data=b"payload\n", mode=0o644, mtime=MTIME),
            Entry("a", kind="symlink", target="lib/deep/b/c"),
            Entry("lib/deep/up", kind="symlink", target="../../bin/run"),
            Entry("lib/hard", kind="hardlink", target="lib/deep/b/c"),
            Entry("secret.key", data=b"k", mode=0o600),
            Entry("world.txt", data=b"w", mode=0o666),
            Entry("readonly", kind="dir", mode=0o555, mtime=MTIME),
            Entry("readonly/file", data=b"r", mode=0o444),
            Entry(".watcher/hooks/post_release", data=b"#!/bin/sh\n", mode=0o755),
            Entry("dangling", kind="symlink", target="not/yet/there"),
        ]

    def test_tree_modes_links_and_stats(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        stats = extract(make_tar_gz(self.entries()), dest, umask=0o022)
        assert stats == ExtractStats(members=13, bytes=19 + 8 + 1 + 1 + 1 + 10)
        assert (dest / "bin" / "run").read_bytes() == b"#!/bin/sh\necho run\n"
        assert stat.S_IMODE((dest / "bin" / "run").stat().st_mode) == 0o755
        assert stat.S_IMODE((dest / "secret.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((dest / "world.txt").stat().st_mode) == 0o644  # umask applied
        assert (dest / "a").readlink() == Path("lib/deep/b/c")
        assert (dest / "a").read_bytes() == b"payload\n"
        assert (dest / "lib" / "deep" / "up").resolve() == (dest / "bin" / "run").resolve()
        assert (dest / "dangling").readlink() == Path("not/yet/there")
        hard, orig = (dest / "lib" / "hard").stat(), (dest / "lib/deep/b/c").stat()
        assert (hard.st_ino, hard.st_nlink) == (orig.st_ino, 2)
        # directories keep at least u+rwx, so the engine can still write .watcher/release.json
        assert stat.S_IMODE((dest / "readonly").stat().st_mode) == 0o755
        assert stat.S_IMODE((dest / "lib").stat().st_mode) == 0o755  # implicit: 0777 & ~umask
        assert (dest / ".watcher" / "hooks" / "post_release").stat().st_mode & stat.S_IXUSR

    def test_mtimes_kept_even_for_directories_filled_later(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        _, dest = sandbox
        extract(make_tar_gz(self.entries()), dest)
        assert (dest / "bin" / "run").stat().st_mtime == MTIME
        assert (dest / "bin").stat().st_mtime == MTIME
        assert (dest / "readonly").stat().st_mtime == MTIME

    def test_strict_umask(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        extract(make_tar_gz(self.entries()), dest, umask=0o077)
        assert stat.S_IMODE((dest / "bin" / "run").stat().st_mode) == 0o700
        assert stat.S_IMODE((dest / "world.txt").stat().st_mode) == 0o600
        assert stat.S_IMODE((dest / "bin").stat().st_mode) == 0o700

    def test_owner_is_this_process_not_the_archive(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        info = tarfile.TarInfo("owned")
        info.uid, info.gid, info.size = 4242, 4343, 1
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            tar.addfile(info, io.BytesIO(b"o"))
        extract(out.getvalue(), dest)
        st = (dest / "owned").stat()
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())

    def test_chown_to_given_user_when_root(self, sandbox: tuple[Path, Path]) -> None:
        if os.geteuid() != 0:
            pytest.fail("this test needs root (chown); the test machine runs as root")
        _, dest = sandbox
        archive = dest.parent.parent.parent / "a.tar.gz"
        archive.write_bytes(make_tar_gz(self.entries()))
        extract_archive(
            archive,
            dest,
            fmt="tar.gz",
            max_members=100,
            max_bytes=10**6,
            umask=0o022,
            uid=1234,
            gid=2345,
        )
        for p in [dest / "bin", dest / "bin" / "run", dest / "a", dest / "lib" / "hard"]:
            st = p.lstat()
            assert (st.st_uid, st.st_gid) == (1234, 2345), p

    def test_system_tar_output_with_dot_prefix(
        self, sandbox: tuple[Path, Path], tmp_path: Path
    ) -> None:
        _, dest = sandbox
        src = tmp_path / "src"
        (src / "app" / "static").mkdir(parents=True)
        (src / "app" / "static" / "style.css").write_text("body{}\n")
        (src / "app" / "run.sh").write_text("#!/bin/sh\n")
        (src / "app" / "run.sh").chmod(0o755)
        (src / "app" / "latest.css").symlink_to("static/style.css")
        os.link(src / "app" / "run.sh", src / "app" / "run-again.sh")
        archive = tmp_path / "sys.tar.gz"
        subprocess.run(["tar", "czf", str(archive), "-C", str(src), "."], check=True)
        stats = extract_archive(
            archive, dest, fmt="tar.gz", max_members=100, max_bytes=10**6, umask=0o022
        )
        assert stats.members == 7
        assert (dest / "app" / "latest.css").read_text() == "body{}\n"
        assert (dest / "app" / "run-again.sh").stat().st_ino == (
            dest / "app" / "run.sh"
        ).stat().st_ino
        assert os.access(dest / "app" / "run.sh", os.X_OK)

    def test_a_directorys_special_bits_are_dropped(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        data = make_tar(
            [
                Entry("tmp", kind="dir", mode=0o1777),
                Entry("shared", kind="dir", mode=0o2775),
                Entry("odd", kind="dir", mode=0o4755),
                Entry("shared/f", data=b"x"),
            ]
        )
        extract(data, dest, fmt="tar")
        for name in ("tmp", "shared", "odd"):
            mode = (dest / name).stat().st_mode
            assert stat.S_IMODE(mode) == 0o755, (name, oct(mode))  # umask 022, no special bit
        assert (dest / "shared" / "f").read_bytes() == b"x"

    def test_a_files_special_bits_are_refused_with_how_to_pack_it(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        _, dest = sandbox
        data = make_tar([Entry("bin/tool", data=b"#!/bin/sh\n", mode=0o2755)])
        with pytest.raises(ArchiveRefused, match=r"'bin/tool' has .* \(mode 2755\); .*ug-s"):
            extract(data, dest, fmt="tar")

    def test_system_tar_of_a_tree_in_a_setgid_directory(
        self, sandbox: tuple[Path, Path], tmp_path: Path
    ) -> None:
        """A tree checked out below a group's setgid directory (``chmod g+s``): GNU tar
        records the bit on every directory, the root ``./`` included."""
        _, dest = sandbox
        src = tmp_path / "workspace"
        (src / "site" / "css").mkdir(parents=True)
        for d in (src, src / "site", src / "site" / "css"):
            d.chmod(0o2775)
        (src / "site" / "index.html").write_text("<h1>hi</h1>\n")
        archive = tmp_path / "setgid.tar.gz"
        subprocess.run(["tar", "czf", str(archive), "-C", str(src), "."], check=True)
        listed = subprocess.run(
            ["tar", "tvzf", str(archive)], check=True, capture_output=True, text=True
        ).stdout
        assert "drwxrwsr-x" in listed  # what this test is about: the bits are in the archive
        extract_archive(archive, dest, fmt="tar.gz", max_members=100, max_bytes=10**6, umask=0o022)
        assert (dest / "site" / "index.html").read_text() == "<h1>hi</h1>\n"
        assert not (dest / "site" / "css").stat().st_mode & (stat.S_ISGID | stat.S_ISVTX)

    def test_system_tar_naming_a_file_twice_is_refused_saying_why(
        self, sandbox: tuple[Path, Path], tmp_path: Path
    ) -> None:
        """``tar czf x build build/index.html``: GNU tar stores build/index.html twice (a
        later copy could replace what an earlier one showed: refused, with the cause)."""
        _, dest = sandbox
        (tmp_path / "src" / "build").mkdir(parents=True)
        (tmp_path / "src" / "build" / "index.html").write_text("1\n")
        archive = tmp_path / "twice.tar.gz"
        subprocess.run(
            ["tar", "czf", str(archive), "-C", str(tmp_path / "src"), "build", "build/index.html"],
            check=True,
        )
        with pytest.raises(ArchiveRefused, match=r"'build/index.html' is a duplicate .* names it"):
            extract_archive(
                archive, dest, fmt="tar.gz", max_members=100, max_bytes=10**6, umask=0o022
            )

    @pytest.mark.parametrize("fmt", ["gnu", "pax"])
    def test_system_tar_sparse_member_is_refused_saying_how_to_pack_it(
        self, sandbox: tuple[Path, Path], tmp_path: Path, fmt: str
    ) -> None:
        """``tar --sparse`` (and bsdtar, macOS's tar, by default) stores a file with holes
        as a sparse member, whose data in the archive is not the file: refused, with how
        to pack the tree so that it is accepted."""
        _, dest = sandbox
        (tmp_path / "src").mkdir()
        with open(tmp_path / "src" / "db.bin", "wb") as fh:
            fh.seek(4 * 1024 * 1024)
            fh.write(b"end")
        sparse = tmp_path / "sparse.tar.gz"
        subprocess.run(
            [
                "tar",
                f"--format={fmt}",
                "--sparse",
                "-czf",
                str(sparse),
                "-C",
                str(tmp_path / "src"),
                ".",
            ],
            check=True,
        )
        with pytest.raises(ArchiveRefused, match=r"'./db.bin' is a sparse file .*--no-read-sparse"):
            extract_archive(
                sparse, dest, fmt="tar.gz", max_members=10, max_bytes=10**8, umask=0o022
            )
        plain = tmp_path / "plain.tar.gz"
        subprocess.run(
            ["tar", f"--format={fmt}", "-czf", str(plain), "-C", str(tmp_path / "src"), "."],
            check=True,
        )
        for leftover in dest.iterdir():
            leftover.unlink()
        extract_archive(plain, dest, fmt="tar.gz", max_members=10, max_bytes=10**8, umask=0o022)
        assert (dest / "db.bin").stat().st_size == 4 * 1024 * 1024 + 3

    @pytest.mark.parametrize(
        ("label", "compress", "fmt", "said"),
        [
            ("xz", lambda b: lzma.compress(b), "tar.gz", "is an xz file (only tar.gz, tgz, tar"),
            ("bzip2", lambda b: bz2.compress(b), "tgz", "is a bzip2 file (only"),
            ("zstd", lambda b: b"\x28\xb5\x2f\xfd" + b, "tar.gz", "is a zstd file (only"),
            (
                "tar",
                lambda b: b,
                "tar.gz",
                "is an uncompressed tar (its artifact record's format should be tar)",
            ),
            (
                "gzip",
                gzip_bytes,
                "tar",
                "is gzip-compressed (its artifact record's format should be tar.gz)",
            ),
        ],
        ids=lambda v: v if isinstance(v, str) else "",
    )
    def test_another_kind_of_file_is_named(
        self,
        sandbox: tuple[Path, Path],
        label: str,
        compress: Any,
        fmt: str,
        said: str,
    ) -> None:
        """An artifact compressed another way than its record says, or not at all: the
        refusal says what the file is (its first bytes), not only that gzip could not read
        it."""
        _, dest = sandbox
        data = compress(make_tar(self.entries()))
        with pytest.raises(
            ArchiveRefused, match=rf"not a valid {fmt} archive: .* {re.escape(said)}"
        ):
            extract(data, dest, fmt=fmt)
        assert list(dest.iterdir()) == []

    def test_a_tar_whose_first_name_looks_like_a_magic_number_is_a_tar(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        _, dest = sandbox
        data = make_tar([Entry("BZh91AY&SY.txt", data=b"a"), Entry("PK\x03\x04", data=b"b")])
        extract(data, dest, fmt="tar")
        assert (dest / "BZh91AY&SY.txt").read_bytes() == b"a"

    def test_plain_tar_format(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        stats = extract(make_tar(self.entries()), dest, fmt="tar")
        assert stats.members == 13
        assert (dest / "lib" / "deep" / "b" / "c").read_bytes() == b"payload\n"

    @pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
    def test_long_names_in_gnu_and_pax_archives(self, sandbox: tuple[Path, Path], fmt: int) -> None:
        _, dest = sandbox
        long_dir = "/".join(["node_modules", "x" * 120, "lib"])
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz", format=fmt) as tar:
            info = tarfile.TarInfo(f"{long_dir}/{'y' * 150}.js")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))
            link = tarfile.TarInfo(f"{long_dir}/link")
            link.type, link.linkname = tarfile.SYMTYPE, f"{'y' * 150}.js"
            tar.addfile(link)
        extract(out.getvalue(), dest)
        assert (dest / long_dir / "link").read_bytes() == b"ok"

    def test_limits_are_inclusive(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        data = make_tar_gz([Entry(f"f{i}", data=b"x" * 100) for i in range(10)])
        stats = extract(data, dest, max_members=10, max_bytes=1000)
        assert stats == ExtractStats(members=10, bytes=1000)

    def test_one_byte_over_max_bytes_refused(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        data = make_tar_gz([Entry(f"f{i}", data=b"x" * 100) for i in range(10)])
        with pytest.raises(ArchiveRefused, match=r"more than 999 bytes .* 'f9'"):
            extract(data, dest, max_bytes=999)

    def test_large_member_is_streamed(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        size = 48 * 1024 * 1024
        data = make_tar_gz([Entry("big.bin", data=bytes(size))])

        def run() -> ExtractStats:
            (dest / "big.bin").unlink(missing_ok=True)  # each run extracts afresh
            return extract(data, dest, max_bytes=size)

        peak, stats = least_peak(run, runs=2)
        assert stats.bytes == size == (dest / "big.bin").stat().st_size
        assert peak < 8 * 1024 * 1024, f"peak {peak} bytes: a member was held in memory"

    def test_sync_tree_visits_everything(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        extract(make_tar_gz(self.entries()), dest)
        sync_tree(dest)  # must not trip over symlinks (dangling included) or read-only dirs
        with pytest.raises(StagingError, match="cannot sync"):
            sync_tree(dest / "missing")


class TestPathDepth:
    def test_paths_and_link_targets_at_the_limit_are_extracted(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        _, dest = sandbox
        deepest = f"{deep_path(MAX_PATH_DEPTH - 1)}/f"
        data = make_tar_gz(
            [
                Entry(deepest, data=b"deep\n"),
                Entry("link", kind="symlink", target=deepest),
                Entry(f"{deep_path(MAX_PATH_DEPTH - 1)}/up", kind="symlink", target="../" * 127),
            ]
        )
        assert extract(data, dest).members == 3
        assert (dest / "link").read_bytes() == b"deep\n"
        assert (dest / deep_path(MAX_PATH_DEPTH - 1) / "up").resolve() == dest.resolve()

    def test_one_component_over_the_limit_is_refused_naming_member_and_limit(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        _, dest = sandbox
        name = f"{deep_path(MAX_PATH_DEPTH)}/f"
        with pytest.raises(ArchiveRefused) as caught:
            extract(make_tar_gz([Entry("ok", data=b"1"), Entry(name, data=b"x")]), dest)
        assert str(caught.value) == (
            f"member {name[:120]!r}... is {MAX_PATH_DEPTH + 1} path components deep "
            f"(limit {MAX_PATH_DEPTH} components)"
        )
        assert not (dest / "d").exists()  # refused before any of its directories was made

    def test_dot_components_do_not_count(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        name = "./" + "/./".join(["d"] * MAX_PATH_DEPTH)
        assert extract(make_tar_gz([Entry(name, kind="dir")]), dest).members == 1


class TestErrors:
    def test_missing_archive_is_a_staging_error(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        with pytest.raises(StagingError, match=r"cannot read archive .*nope\.tar\.gz"):
            extract_archive(
                dest.parent / "nope.tar.gz",
                dest,
                fmt="tar.gz",
                max_members=1,
                max_bytes=1,
                umask=0o022,
            )

    def test_missing_dest_is_a_staging_error(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        with pytest.raises(StagingError, match="cannot open staging directory"):
            extract(make_tar_gz([Entry("a", data=b"1")]), dest / "missing")

    def test_unknown_format_refused(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        with pytest.raises(ArchiveRefused, match="unsupported archive format 'rar'"):
            extract(b"x", dest, fmt="rar")

    def test_non_empty_dest_is_never_overwritten(self, sandbox: tuple[Path, Path]) -> None:
        _, dest = sandbox
        (dest / "a").write_text("mine\n")
        with pytest.raises(StagingError, match="cannot extract 'a'"):
            extract(make_tar_gz([Entry("a", data=b"theirs")]), dest)
        assert (dest / "a").read_text() == "mine\n"

    def test_symlink_planted_in_dest_is_not_followed(self, sandbox: tuple[Path, Path]) -> None:
        tmp, dest = sandbox
        (dest / "lib").symlink_to(tmp / "outside")  # not from the archive: a racing writer
        with pytest.raises(StagingError):
            extract(make_tar_gz([Entry("lib", kind="dir"), Entry("lib/x", data=b"x")]), dest)
        assert sorted(p.name for p in (tmp / "outside").iterdir()) == ["secret"]


def peak_checking(members: list[tuple[str, str, str]]) -> int:
    """The most memory ``check_members`` took (tracemalloc's peak) for ``members``."""
    return least_peak(lambda: check_members(members))[0]


class TestBombsOfEntries:
    """The artifact review's archives: a few KB that cost a host its disk, inodes or CPU."""

    def test_directories_a_path_implies_count_against_max_members(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        # 3 members and the 3 x 30 directories their paths imply: 93 entries
        chain = "/".join(["d"] * 29)
        data = make_tar_gz([Entry(f"{i}/{chain}/f", data=b"x") for i in range(3)])
        with pytest.raises(ArchiveRefused, match=r"creates more than 92 entries.*max_members"):
            extract(data, sandbox[1], max_members=92)
        _, dest = sandbox
        for d in dest.iterdir():  # a fresh dest: the caller removes a failed one
            subprocess.run(["rm", "-rf", str(d)], check=True)
        assert extract(data, dest, max_members=93) == ExtractStats(members=3, bytes=3)

    def test_empty_directories_and_symlinks_are_charged_a_block(
        self, sandbox: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """File data alone was budgeted: 24,000 empty directories filled a filesystem
        under disk_reserve, and a full inode table read as "disk full"."""
        _, dest = sandbox
        data = make_tar_gz([Entry(f"d{i}", kind="dir") for i in range(300)])

        def small(fd: int, *, fraction: float, reserve: int) -> DiskBudget:
            return DiskBudget(
                free=10**9, allowed=100 * ENTRY_COST, fraction=fraction, reserve=reserve
            )

        monkeypatch.setattr(DiskBudget, "of", staticmethod(small))
        with pytest.raises(ArchiveDoesNotFit, match=r"101 entries \(counted 4096 bytes each\)"):
            extract(data, dest, disk_fraction=1)

        def few_inodes(fd: int, *, fraction: float, reserve: int) -> DiskBudget:
            return DiskBudget(
                free=10**9,
                allowed=10**9,
                fraction=fraction,
                reserve=reserve,
                inodes_free=400,
                inodes_allowed=200,
            )

        monkeypatch.setattr(DiskBudget, "of", staticmethod(few_inodes))
        for d in dest.iterdir():
            d.rmdir()
        with pytest.raises(ArchiveDoesNotFit, match=r"more than 200 entries .* free inodes"):
            extract(data, dest, disk_fraction=1)

    def test_a_chain_of_symlinks_is_resolved_once_not_once_per_link_into_it(
        self, sandbox: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """38 symlinks, each through the next plus 126 components that do not exist, and
        300 links into the chain: each of those was walked through the whole chain again
        (~0.2 s of CPU a link here; a 1.2 MB archive of them, ~10 hours)."""
        tail = "/".join(["m"] * 126)
        entries = [
            Entry(f"c{k:02d}", kind="symlink", target=f"c{k + 1:02d}/{tail}") for k in range(38)
        ]
        entries.append(Entry("c38", kind="symlink", target=tail))
        entries += [Entry(f"u{i:04d}", kind="symlink", target="c00") for i in range(300)]
        walked: list[tuple[str, ...]] = []
        resolve = _TreeRules._resolve

        def counted(self: _TreeRules, parts: Any, resolved: Any, *rest: Any) -> Any:
            if parts not in resolved:
                walked.append(parts)
            return resolve(self, parts, resolved, *rest)

        monkeypatch.setattr(_TreeRules, "_resolve", counted)
        extract(make_tar_gz(entries), sandbox[1])
        assert len(walked) == len(set(walked)) == 339, len(walked)  # each link walked once
        assert (sandbox[1] / "u0299").readlink() == Path("c00")

    def test_what_follows_a_missing_path_is_not_kept_for_every_link_into_it(self) -> None:
        """The commit review: each link's resolution past a path the archive does not
        have kept its remaining components, and a link into it added its own: ~40 KB a
        link, 815 MB for 20,000 links (a 247 KB archive), gigabytes at max_members."""
        x = "/".join(["x"] * 127)
        members = [("L0", "symlink", "n/" + "/".join(["x"] * 126))]
        members += [(f"L{i}", "symlink", f"L{i - 1}/{x}") for i in range(1, 39)]
        members += [(f"K{k}", "symlink", f"L38/{x}") for k in range(2000)]
        peak = peak_checking(members)
        assert peak < 16 * 1024 * 1024, f"peak {peak} bytes for 2039 symlinks"

    def test_links_into_one_deep_directory_share_its_path(self) -> None:
        """The second artifact review's case: 20,000 links into one 127-deep directory
        kept a tuple of its path each (~15 KB a link with the target); one object now."""
        deep = "/".join(["d"] * 127)
        members = [(deep, "directory", ""), ("s", "symlink", deep)]
        members += [(f"u{i}", "symlink", "s") for i in range(10000)]
        peak = peak_checking(members)
        assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for 10001 symlinks"

    def test_a_long_chain_of_symlinks_is_refused_as_the_kernel_would(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        entries = [Entry(f"c{k:02d}", kind="symlink", target=f"c{k + 1:02d}") for k in range(45)]
        entries.append(Entry("c45", kind="dir"))
        with pytest.raises(ArchiveRefused, match=r"symlink 'c00' -> 'c01' loops"):
            extract(make_tar_gz(entries), sandbox[1])


def _pax(records: bytes, *, is_global: bool = False) -> bytes:
    """A pax header (extended, or global) holding ``records`` as they are."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XGLTYPE if is_global else tarfile.XHDTYPE
    info.size = len(records)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)


class TestPaxHeaders:
    """The second artifact review: Python 3.11.7's tarfile parses a malformed pax header
    in quadratic time and memory (1.2 KB of archive took 1 GB), and copies a
    global header's keys twice for every later member (200,000 keys: 45 ms a member)."""

    def test_a_malformed_pax_header_is_refused_before_tarfile_parses_it(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        bomb = gzip_bytes(_pax(b"2 " * 16384 + b"=\n") + make_tar([Entry("f", data=b"x")]))
        assert len(bomb) < 1024
        tracemalloc.start()
        try:
            with pytest.raises(ArchiveRefused, match="malformed record at byte 0"):
                extract(bomb, sandbox[1])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * 1024 * 1024, peak  # tarfile's parse of it: ~260 MB

    @pytest.mark.parametrize(
        ("records", "said"),
        [
            (b"13 path=name", "malformed record"),  # no newline
            (b"12 path=name\n", "malformed record"),  # a length that is not the record's
            (b"11 pathname\n", "malformed record"),  # no '='
            (b"9 =value\n", "malformed record"),  # no keyword
        ],
    )
    def test_each_record_must_be_one(
        self, sandbox: tuple[Path, Path], records: bytes, said: str
    ) -> None:
        data = gzip_bytes(_pax(records) + make_tar([Entry("f", data=b"x")]))
        with pytest.raises(ArchiveRefused, match=said):
            extract(data, sandbox[1])

    def test_a_global_header_of_many_keys_is_refused(self, sandbox: tuple[Path, Path]) -> None:
        records = b"".join(b"%d k%03d=v\n" % (len(b"k000=v\n") + 3, i) for i in range(33))
        data = gzip_bytes(_pax(records, is_global=True) + make_tar([Entry("f", data=b"x")]))
        with pytest.raises(ArchiveRefused, match=r"global pax header .* more than 32 records"):
            extract(data, sandbox[1])

    def test_what_tar_writers_write_is_taken(self, sandbox: tuple[Path, Path]) -> None:
        """git archive's global comment, GNU tar's per-member times and a long path."""
        comment = b"52 comment=" + b"8" * 40 + b"\n"
        path = "d/" + "x" * 200
        record = f"path={path}\n".encode()
        size = len(record) + 4
        size = len(record) + len(str(size)) + 1
        per_member = f"{size} ".encode() + record + b"30 mtime=1796507390.487718123\n"
        data = gzip_bytes(
            _pax(comment, is_global=True)
            + _pax(per_member)
            + make_tar([Entry("short", data=b"hi")])
        )
        extract(data, sandbox[1])
        assert (sandbox[1] / path).read_bytes() == b"hi"


class TestOtherCosts:
    def test_more_links_to_one_file_than_the_filesystem_takes_is_a_refusal(
        self, sandbox: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """ext4 takes 65,000 links to a file: past it, a StagingError was retried (the
        archive downloaded and extracted again) rather than remembered as refused."""
        real = os.link

        def emlink(src: Any, dst: Any, **kw: Any) -> None:
            if str(dst) == "h2":
                raise OSError(errno.EMLINK, "Too many links")
            real(src, dst, **kw)

        monkeypatch.setattr(os, "link", emlink)
        data = make_tar_gz(
            [Entry("f", data=b"x")]
            + [Entry(f"h{i}", kind="hardlink", target="f") for i in range(3)]
        )
        with pytest.raises(ArchiveRefused, match="'h2' -> 'f': more links to one file than"):
            extract(data, sandbox[1])

    def test_names_and_targets_together_are_bounded(
        self, sandbox: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(archive, "MAX_NAME_BYTES", 4096)
        entries = [Entry(f"{'n' * 200}{i}", data=b"") for i in range(30)]
        with pytest.raises(
            ArchiveRefused, match=r"pass 4096 bytes by member 'n+'\.\.\. \(limit MAX_NAME_BYTES\)"
        ):
            extract(make_tar_gz(entries), sandbox[1])

    def test_deep_chains_of_directories_are_finished_without_reopening_each_level(
        self, sandbox: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Finished by depth, each 128-deep chain was opened from the root again for each
        level (65 opens a directory); in path order, about two."""
        chains = [Entry("/".join([f"c{i}"] + ["d"] * 127), kind="dir") for i in range(4)]
        opened = [0]
        real = os.open

        def counted(*args: Any, **kw: Any) -> int:
            opened[0] += 1
            return real(*args, **kw)

        monkeypatch.setattr(os, "open", counted)
        extract(make_tar_gz(chains), sandbox[1])
        assert opened[0] < 4 * 128 * 4, opened[0]  # by depth: ~4 * 128 * 65


def read_offset(path: Path) -> int:
    """How far this process's open descriptor of ``path`` has read it (Linux fdinfo)."""
    target = path.resolve()
    for link in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if link.readlink() == target:
                info = (Path("/proc/self/fdinfo") / link.name).read_text()
                found = re.search(r"^pos:\s*(\d+)", info, re.MULTILINE)
                assert found is not None
                return int(found.group(1))
    raise AssertionError(f"{path} is not open")


class TestGzipLayer:
    """What the gzip reader under the extractor takes: CPython's GzipFile read a header's
    name, and the zero padding after a member, a byte at a time, before any of our code ran
    (10 MB: over a second, no cancel seen meanwhile)."""

    def test_a_cancel_is_seen_while_a_huge_header_name_is_skipped(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        tmp, dest = sandbox
        tar = make_tar([Entry("a.txt", data=b"hi")])
        path = tmp / "archive.tar.gz"  # where ``extract`` writes it
        seen: list[int] = []

        def cancel() -> bool:
            seen.append(read_offset(path))
            return True

        with pytest.raises(StagingCancelled, match="after 0 members and 0 bytes"):
            extract(gzip_member(tar, name=b"n" * 10 * MiB), dest, cancel=cancel)
        assert seen[0] < MiB, seen  # the old reader: past the 10 MB name

    def test_a_cancel_is_seen_while_huge_padding_after_a_member_is_skipped(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        tmp, dest = sandbox
        path = tmp / "archive.tar.gz"  # where ``extract`` writes it
        seen: list[int] = []

        def cancel() -> bool:
            seen.append(read_offset(path))
            return seen[-1] > MiB

        data = make_tar_gz([Entry("a.txt", data=b"hi")]) + bytes(20 * MiB)
        with pytest.raises(StagingCancelled):  # the old reader: extracted, all 20 MB read
            extract(data, dest, cancel=cancel)
        assert seen[-1] < 2 * MiB, seen

    def test_a_huge_header_name_comment_and_padding_are_extracted(
        self, sandbox: tuple[Path, Path]
    ) -> None:
        tar = make_tar([Entry("a.txt", data=b"hi"), Entry("b.txt", data=b"there")])
        first = gzip_member(tar[:700], name=b"n" * 10 * MiB, extra=b"x" * 65_535)
        second = gzip_member(tar[700:], comment=b"c" * 10 * MiB, header_crc=True)
        stats = extract(first + bytes(10 * MiB) + second + bytes(10 * MiB), sandbox[1])
        assert stats == ExtractStats(members=2, bytes=7)
        assert (sandbox[1] / "b.txt").read_bytes() == b"there"

    def test_a_tar_split_across_many_members_is_extracted(self, sandbox: tuple[Path, Path]) -> None:
        tar = make_tar([Entry(f"f{i}", data=bytes([i]) * (i * 1000)) for i in range(20)])
        cuts = [0, 1, 511, 513, 40_000, 40_001, 90_000, len(tar)]
        data = b"".join(gzip_member(tar[a:b]) for a, b in itertools.pairwise(cuts))
        assert extract(data, sandbox[1]).members == 20
        assert (sandbox[1] / "f19").read_bytes() == bytes([19]) * 19_000

    def test_a_bomb_is_still_refused_by_its_ratio(self, sandbox: tuple[Path, Path]) -> None:
        data = make_tar_gz([Entry("zeros", data=bytes(64 * MiB))])  # about 64 KB
        with pytest.raises(ArchiveRefused, match="a compression ratio over 100"):
            extract(data, sandbox[1], max_ratio=100)
        assert not (sandbox[1] / "zeros").exists()
