"""The publish tarball: manifest globs, determinism, refusals (pure file-system logic); and
how a publish turns signals into an exception it can clean up after."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from watcher import publish as publish_module
from watcher.archive import MAX_PATH_DEPTH, RATIO_FLOOR
from watcher.config import Limits
from watcher.errors import ArtifactError, ArtifactIdTaken, ArtifactRefused, ConfigError
from watcher.publish import (
    Manifest,
    PublishInterrupted,
    _ensure_uploaded,
    build_tarball,
    load_manifest,
    signals_interrupt_publish,
    tty_progress,
)


def make_tree(root: Path) -> Path:
    """A small app checkout: code, an executable, a hook, tests, docs, .git, a symlink."""
    files = {
        "app.py": "print('hello')\n",
        "lib/util.py": "X = 1\n",
        "bin/run": "#!/bin/sh\nexec python app.py\n",
        ".watcher/hooks/post_release": "#!/bin/sh\ntrue\n",
        "tests/test_app.py": "def test(): pass\n",
        "docs/index.md": "# docs\n",
        ".git/HEAD": "ref: refs/heads/main\n",
        "lib/__pycache__/util.cpython-311.pyc": "junk",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "bin/run").chmod(0o775)
    (root / ".watcher/hooks/post_release").chmod(0o700)
    (root / "app.py").chmod(0o600)
    (root / "current_lib").symlink_to("lib")
    (root / ".watcher/manifest.yaml").write_text(
        "include: ['**']\nexclude: ['tests/**', 'docs/**', '__pycache__']\n"
    )
    return root


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestLoadManifest:
    def test_missing_manifest_includes_everything_but_git_and_buildkite(
        self, tmp_path: Path
    ) -> None:
        manifest = load_manifest(tmp_path)
        assert manifest.include == ("**",)
        assert manifest.included("a/b/c.txt")
        assert not manifest.included(".git/config")
        assert not manifest.included("sub/.git/config")
        assert not manifest.included(".buildkite/pipeline.yml")
        assert not manifest.included(".buildkite/hooks/post-command")
        assert manifest.included("docs/buildkite.md")
        assert "absent: everything but .git and .buildkite" in manifest.source

    def test_a_manifest_may_include_buildkite_files_but_never_git(self, tmp_path: Path) -> None:
        (tmp_path / ".watcher").mkdir()
        (tmp_path / ".watcher/manifest.yaml").write_text("include: ['**']\n")
        manifest = load_manifest(tmp_path)
        assert manifest.included(".buildkite/pipeline.yml")
        assert not manifest.included(".git/config")

    def test_reads_include_and_exclude(self, tmp_path: Path) -> None:
        (tmp_path / ".watcher").mkdir()
        (tmp_path / ".watcher/manifest.yaml").write_text(
            "include: [app/**, bin/*, .watcher/hooks/**]\nexclude: ['*.pyc']\n"
        )
        manifest = load_manifest(tmp_path)
        assert manifest.included("app/x/y.py")
        assert manifest.included("bin/run")
        assert manifest.included("bin/sub/run")  # a matched directory brings its content
        assert not manifest.included("binx/run")
        assert manifest.included(".watcher/hooks/validate")
        assert not manifest.included("README.md")
        assert not manifest.included("app/x/y.pyc")

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ("include: app/**\n", "include: must be a list of glob patterns"),
            ("exclude: [1]\n", "exclude[0]: must be a non-empty glob pattern"),
            ("include: ['../x']\n", "include[0]: must be relative to the directory"),
            ("inclde: ['**']\n", "inclde: unknown key"),
            ("include: []\n", "include: must list at least one pattern"),
            ("- a\n", "<top>: must be a mapping"),
            ("include: [a\n", "invalid YAML"),
            ("include: ['[z-a]']\n", "include[0]: invalid glob pattern '[z-a]': bad character"),
            ("include: ['[!]']\n", "include[0]: invalid glob pattern '[!]'"),
            ("exclude: ['ok', 'a/[b-a]/**']\n", "exclude[1]: invalid glob pattern"),
        ],
    )
    def test_bad_manifest_names_file_and_key(self, tmp_path: Path, text: str, problem: str) -> None:
        (tmp_path / ".watcher").mkdir()
        (tmp_path / ".watcher/manifest.yaml").write_text(text)
        with pytest.raises(ConfigError) as err:
            load_manifest(tmp_path)
        assert str(tmp_path / ".watcher/manifest.yaml") in str(err.value)
        assert problem in str(err.value)

    @pytest.mark.parametrize(
        ("make", "problem"),
        [
            (lambda m: m.symlink_to("/dev/zero"), "cannot read: not a regular file"),
            (lambda m: os.mkfifo(m), "cannot read: not a regular file"),
            (lambda m: m.mkdir(), "cannot read: not a regular file"),
            (lambda m: m.write_bytes(b"#" * (2 << 20)), "more than 1048576 bytes"),
            (lambda m: m.write_bytes(b"include: ['\xff']\n"), "cannot read: not UTF-8 text"),
        ],
        ids=["device", "fifo", "directory", "huge", "latin-1"],
    )
    @pytest.mark.timeout(10)  # a FIFO opened to be read would block: fail, do not hang
    def test_a_manifest_that_is_no_small_text_file_is_refused_at_once(
        self, tmp_path: Path, make: object, problem: str
    ) -> None:
        (tmp_path / ".watcher").mkdir()
        manifest = tmp_path / ".watcher/manifest.yaml"
        make(manifest)  # type: ignore[operator]
        with pytest.raises(ConfigError) as err:
            load_manifest(tmp_path)
        assert str(err.value).startswith(str(manifest))
        assert problem in str(err.value)

    def test_an_unreadable_dir_is_said_of_the_dir_not_of_a_manifest(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The newcomer test: DIR mode 000 (as another user than root) was said as
        "DIR/.watcher/manifest.yaml: cannot read: Permission denied", a file it never wrote.
        (Root reads anything: the refusal is the kernel's, made here.)"""
        src = make_tree(tmp_path / "src")
        scandir = os.scandir

        def refused(path: Any = ".") -> Any:
            if str(path) == str(src):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return scandir(path)

        monkeypatch.setattr("watcher.publish.os.scandir", refused)
        with pytest.raises(ConfigError) as info:
            load_manifest(src)
        assert (info.value.source, info.value.problems) == (
            str(src),
            ["cannot read: Permission denied"],
        )

    def test_a_manifest_linked_to_a_file_in_the_tree_is_read(self, tmp_path: Path) -> None:
        (tmp_path / "deploy").mkdir()
        (tmp_path / "deploy/manifest.yaml").write_text("include: ['app/**']\n")
        (tmp_path / ".watcher").mkdir()
        (tmp_path / ".watcher/manifest.yaml").symlink_to("../deploy/manifest.yaml")
        assert load_manifest(tmp_path).include == ("app/**",)


class TestBuildTarball:
    def test_excludes_are_honoured_and_modes_normalised(self, tmp_path: Path) -> None:
        src = make_tree(tmp_path / "src")
        out = tmp_path / "a.tar.gz"
        sha, size, members = build_tarball(src, load_manifest(src), out)
        assert size == out.stat().st_size
        assert sha == sha_of(out)
        assert members == [
            ".watcher",
            ".watcher/hooks",
            ".watcher/hooks/post_release",
            ".watcher/manifest.yaml",
            "app.py",
            "bin",
            "bin/run",
            "current_lib",
            "lib",
            "lib/util.py",
        ]
        with tarfile.open(out) as tar:
            infos = {m.name: m for m in tar.getmembers()}
            assert list(infos) == members
            assert infos["bin/run"].mode == 0o755
            assert infos[".watcher/hooks/post_release"].mode == 0o755
            assert infos["app.py"].mode == 0o644
            assert infos["lib"].isdir() and infos["lib"].mode == 0o755
            assert infos["current_lib"].issym() and infos["current_lib"].linkname == "lib"
            for info in infos.values():
                assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
                assert info.mtime == 0
            extracted = tar.extractfile("app.py")
            assert extracted is not None and extracted.read() == b"print('hello')\n"
        # gzip header: no file name (FLG 0), mtime 0
        header = out.read_bytes()[:10]
        assert header[3] == 0 and header[4:8] == b"\0\0\0\0"

    def test_same_tree_same_sha256_after_touch_and_other_umask(self, tmp_path: Path) -> None:
        first = make_tree(tmp_path / "one")
        sha1, _, _ = build_tarball(first, load_manifest(first), tmp_path / "1.tar.gz")
        sha1_again, _, _ = build_tarball(first, load_manifest(first), tmp_path / "1b.tar.gz")
        assert sha1 == sha1_again
        old = os.umask(0o077)
        try:
            second = make_tree(tmp_path / "two")
        finally:
            os.umask(old)
        for path in [second, *second.rglob("*")]:
            os.utime(path, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
        (second / "app.py").chmod(0o666)
        sha2, _, _ = build_tarball(second, load_manifest(second), tmp_path / "2.tar.gz")
        assert sha2 == sha1
        (second / "app.py").write_text("print('changed')\n")
        sha3, _, _ = build_tarball(second, load_manifest(second), tmp_path / "3.tar.gz")
        assert sha3 != sha1

    def test_source_date_epoch_sets_member_mtime(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        src = make_tree(tmp_path / "src")
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
        build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz")
        with tarfile.open(tmp_path / "a.tar.gz") as tar:
            assert {m.mtime for m in tar.getmembers()} == {1_700_000_000}

    def test_empty_match_is_an_error(self, tmp_path: Path) -> None:
        src = make_tree(tmp_path / "src")
        manifest = Manifest(source="m.yaml", include=("nothing/**",))
        out = tmp_path / "a.tar.gz"
        with pytest.raises(ConfigError, match=f"manifest matched no files in {src}"):
            build_tarball(src, manifest, out)
        assert not out.exists()
        assert list(tmp_path.iterdir()) == [src]  # no temp file left behind

    def test_only_empty_directories_is_an_empty_match(self, tmp_path: Path) -> None:
        (tmp_path / "src/empty").mkdir(parents=True)
        with pytest.raises(ConfigError, match="manifest matched no files"):
            build_tarball(tmp_path / "src", Manifest("m"), tmp_path / "a.tar.gz")

    def test_missing_directory(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="no such directory"):
            build_tarball(tmp_path / "nope", Manifest("m"), tmp_path / "a.tar.gz")

    @pytest.mark.parametrize("target", ["../outside", "lib/../../x"])
    def test_symlink_escaping_the_tree_is_refused(self, tmp_path: Path, target: str) -> None:
        src = make_tree(tmp_path / "src")
        (src / "lib/evil").symlink_to("../" + target)
        with pytest.raises(ArtifactRefused, match=r"symlink lib/evil -> .* points outside"):
            build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz")

    @pytest.mark.parametrize("inside", [False, True])
    def test_an_absolute_symlink_is_refused_as_absolute(self, tmp_path: Path, inside: bool) -> None:
        """Even one naming a file of the tree: on a host it names that host's own path."""
        src = make_tree(tmp_path / "src")
        target = str(src / "app.py") if inside else "/etc/passwd"
        (src / "lib/evil").symlink_to(target)
        with pytest.raises(ArtifactRefused) as caught:
            build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz")
        assert f"symlink lib/evil -> {target} is absolute: on the hosts it would" in str(
            caught.value
        )

    @pytest.mark.parametrize(
        ("links", "files", "message"),
        [
            (
                {"a/b/up": "../..", "e": "a/b/up/.."},
                {},
                "symlink 'e' -> 'a/b/up/..' leaves the release through other symlinks",
            ),
            (
                {"x": "index.html/.."},
                {"index.html": "<p>"},
                "symlink 'x' -> 'index.html/..' uses '..' after 'index.html', which is not a "
                "directory",
            ),
            ({"l1": "l2", "l2": "l1"}, {}, "symlink 'l1' -> 'l2' loops"),
            (
                {},
                {".watcher/release.json": "{}"},
                "member '.watcher/release.json' is reserved",
            ),
        ],
    )
    def test_a_tree_the_hosts_extractor_refuses_is_refused_naming_the_member(
        self, tmp_path: Path, links: dict[str, str], files: dict[str, str], message: str
    ) -> None:
        """The extractor's own rules (watcher/archive.py), not an approximation of them:
        each of these passed publish and was then refused by every host, burning the id."""
        src = make_tree(tmp_path / "src")
        for rel, text in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)
        for rel, target in links.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).symlink_to(target)
        out = tmp_path / "a.tar.gz"
        with pytest.raises(ArtifactRefused) as err:
            build_tarball(src, load_manifest(src), out, limits=Limits())
        assert str(err.value).startswith(f"refusing to publish {src}: hosts refuse to extract")
        assert message in str(err.value)
        assert not out.exists()

    def test_excluded_escaping_symlink_is_ignored(self, tmp_path: Path) -> None:
        src = make_tree(tmp_path / "src")
        (src / "docs/evil").symlink_to("/etc/passwd")
        _, _, members = build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz")
        assert "docs/evil" not in members

    def test_fifo_is_refused(self, tmp_path: Path) -> None:
        src = make_tree(tmp_path / "src")
        os.mkfifo(src / "lib/pipe")
        with pytest.raises(ArtifactRefused, match="lib/pipe is not a regular file"):
            build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz")

    def test_more_members_than_hosts_extract_is_refused_before_writing(
        self, tmp_path: Path
    ) -> None:
        src = make_tree(tmp_path / "src")
        out = tmp_path / "a.tar.gz"
        members = build_tarball(src, load_manifest(src), out)[2]
        out.unlink()
        fits = Limits(max_members=len(members))
        assert build_tarball(src, load_manifest(src), out, limits=fits)[2] == members
        out.unlink()
        with pytest.raises(
            ArtifactRefused,
            match=rf"more members than the {len(members) - 1} hosts extract "
            r"\(limits.max_members of app web\)",
        ):
            build_tarball(
                src,
                load_manifest(src),
                out,
                limits=Limits(max_members=len(members) - 1),
                limits_from=" of app web",
            )
        assert not out.exists()

    def test_a_tree_far_over_the_members_limit_is_not_read_to_its_end(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`publish web /` by mistake: refused once the walk passes the limit, not after the
        whole filesystem was listed into memory (the attacker review)."""
        src = tmp_path / "src"
        for i in range(20):
            for j in range(20):
                (src / f"d{i:02}" / f"s{j:02}").mkdir(parents=True)
                (src / f"d{i:02}" / f"s{j:02}" / "f").write_text("x")
        listed: list[str] = []
        real_scandir = os.scandir

        def scandir(path: Any) -> Any:
            listed.append(str(path))
            return real_scandir(path)

        monkeypatch.setattr(publish_module.os, "scandir", scandir)
        with pytest.raises(ArtifactRefused, match="more members than the 10 hosts extract"):
            build_tarball(
                src, load_manifest(src), tmp_path / "a.tar.gz", limits=Limits(max_members=10)
            )
        assert len(listed) < 100, len(listed)  # ~840 to read it all (each directory is
        # listed when walked, and when its parent's walk asks whether it is empty)

    def test_more_bytes_than_hosts_extract_is_refused(self, tmp_path: Path) -> None:
        src = make_tree(tmp_path / "src")
        (src / "lib/big.bin").write_bytes(b"x" * 5000)
        with pytest.raises(ArtifactRefused, match=r"over the 4096 hosts extract"):
            build_tarball(
                src, load_manifest(src), tmp_path / "a.tar.gz", limits=Limits(max_bytes=4096)
            )

    def test_a_tree_nested_deeper_than_hosts_extract_is_refused(self, tmp_path: Path) -> None:
        src = make_tree(tmp_path / "src")
        deep = src.joinpath(*["d"] * MAX_PATH_DEPTH)
        deep.mkdir(parents=True)
        (deep / "f").write_text("x")
        with pytest.raises(ArtifactRefused, match=rf"more than {MAX_PATH_DEPTH} path components"):
            build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz", limits=Limits())

    def test_a_tree_deeper_than_python_recurses_is_refused_as_soon_as_seen(
        self, tmp_path: Path
    ) -> None:
        """The newcomer test: 1,200 levels failed with a RecursionError after 18 s of CPU
        (the walk recursed, and the depth was checked after it). Also a subtree the
        manifest leaves out is walked without recursion."""
        src = make_tree(tmp_path / "src")
        deep = src
        for _ in range(1200):  # (mkdir's parents=True, and shutil.rmtree, recurse as deep)
            deep = deep / "d"
            deep.mkdir()
        (deep / "f").write_text("x")
        try:
            started = time.process_time()
            with pytest.raises(
                ArtifactRefused, match=rf"'d/d/d.*' has more than {MAX_PATH_DEPTH} "
            ):
                build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz", limits=Limits())
            assert time.process_time() - started < 5, "the whole tree was read first"
            # Not included (walked all the same: an included name may lie below): no error,
            # and no parent matched again at each level (38 s of CPU at 1,200 levels).
            (src / ".watcher" / "manifest.yaml").write_text("include: ['app.py']\n")
            started = time.process_time()
            _, _, members = build_tarball(
                src, load_manifest(src), tmp_path / "b.tar.gz", limits=Limits()
            )
            assert members == ["app.py"], members
            assert time.process_time() - started < 5, "each level matched its parents again"
            # Deep directories whose content is all left out are no members: not refused
            # (the review of the first version of this check: it refused them).
            (src / ".watcher" / "manifest.yaml").write_text("exclude: ['f']\n")
            _, _, members = build_tarball(
                src, load_manifest(src), tmp_path / "c.tar.gz", limits=Limits()
            )
            assert "app.py" in members and not any(m.startswith("d/") for m in members)
        finally:
            subprocess.run(["rm", "-rf", str(src / "d")], check=True)

    def test_a_compression_ratio_hosts_call_a_bomb_is_refused(self, tmp_path: Path) -> None:
        src = make_tree(tmp_path / "src")
        with open(src / "zeros.bin", "wb") as f:  # sparse: no disk written for it
            f.truncate(RATIO_FLOOR + 1024 * 1024)
        out = tmp_path / "a.tar.gz"
        with pytest.raises(ArtifactRefused, match=r"a ratio over 100: hosts refuse"):
            build_tarball(src, load_manifest(src), out, limits=Limits())
        assert not out.exists()
        # Where the hosts allow it, so does publish.
        build_tarball(src, load_manifest(src), out, limits=Limits(max_ratio=10_000))
        assert out.exists()

    def test_a_newline_in_a_name_is_an_ordinary_character_without_a_manifest(
        self, tmp_path: Path
    ) -> None:
        src = tmp_path / "src"
        (src / "dir\nname").mkdir(parents=True)
        (src / "new\nline.txt").write_text("x")
        (src / "dir\nname/f").write_text("y")
        _, _, members = build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz")
        assert members == ["dir\nname", "dir\nname/f", "new\nline.txt"]

    def test_an_exclude_glob_matches_across_a_newline_in_a_parent(self, tmp_path: Path) -> None:
        src = tmp_path / "src"
        (src / ".watcher").mkdir(parents=True)
        (src / ".watcher/manifest.yaml").write_text("include: ['*']\nexclude: ['*.pem']\n")
        (src / "conf\nx").mkdir()
        (src / "conf\nx/key.pem").write_text("secret")
        (src / "conf\nx/app.conf").write_text("ok")
        manifest = load_manifest(src)
        assert manifest.excluded("conf\nx/key.pem")
        _, _, members = build_tarball(src, manifest, tmp_path / "a.tar.gz")
        assert "conf\nx/key.pem" not in members
        assert "conf\nx/app.conf" in members

    def test_output_is_a_valid_gzip_stream(self, tmp_path: Path) -> None:
        src = make_tree(tmp_path / "src")
        out = tmp_path / "a.tar.gz"
        build_tarball(src, load_manifest(src), out)
        with gzip.open(out) as gz:
            assert len(gz.read()) % 512 == 0


def _swap_to_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_by_rename(path: Path) -> None:
    os.link(path, path.with_name("kept"))  # the old inode stays: its number is not reused
    new = path.with_name("new")
    new.write_text("X = 1\n")
    new.rename(path)


def _rewrite_same_size(path: Path) -> None:
    path.write_text("X = 2\n")
    os.utime(path, ns=(1, 1))


def test_a_full_disk_under_the_artifact_is_said_as_such_not_as_a_source_file_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while the tarball is written was reported as 'cannot read <a source file>'
    (the code review)."""
    src = make_tree(tmp_path / "src")

    def full(self: object, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(publish_module._HashingWriter, "write", full)
    out = tmp_path / "out" / "a.tar.gz"
    out.parent.mkdir()
    with pytest.raises(ArtifactError) as caught:
        build_tarball(src, load_manifest(src), out)
    assert str(caught.value) == (
        f"cannot write the artifact in {out.parent}: No space left on device"
    )
    assert not isinstance(caught.value, ArtifactRefused)
    assert list(out.parent.iterdir()) == []


class TestATreeChangedWhileBeingPacked:
    """A build step still writing the tree after the files were selected: the archive
    would hold bytes of no one moment (a bundle cut at its selected size), a file from
    outside the tree through a symlink, or wait forever on a FIFO. The test changes the
    tree at the one moment between selecting and packing (the members check)."""

    @pytest.fixture
    def change_before_packing(self, monkeypatch: pytest.MonkeyPatch) -> list[object]:
        changes: list[object] = []
        check = publish_module._check_members

        def check_then_change(src: Path, entries: list[object]) -> None:
            check(src, entries)  # type: ignore[arg-type]
            for change in changes:
                change()  # type: ignore[operator]

        monkeypatch.setattr(publish_module, "_check_members", check_then_change)
        return changes

    @pytest.mark.parametrize(
        ("change", "what"),
        [
            (lambda f: f.write_text("X = 1\n" * 1000), "6000 bytes now, 6 when selected"),
            (lambda f: f.write_text(""), "0 bytes now, 6 when selected"),
            (_rewrite_same_size, "written to since it was selected"),
            (lambda f: (f.unlink(), f.symlink_to("/etc/passwd")), "it is a symlink now"),
            (_swap_to_fifo, "it is no regular file now"),
            (_replace_by_rename, "replaced by another file"),
        ],
        ids=["grew", "shrank", "rewritten", "symlink", "fifo", "replaced"],
    )
    @pytest.mark.timeout(10)  # a FIFO opened to be read would block: fail, do not hang
    def test_it_is_refused_saying_which_file_and_how(
        self, tmp_path: Path, change_before_packing: list[object], change: object, what: str
    ) -> None:
        src = make_tree(tmp_path / "src")
        target = src / "lib/util.py"
        change_before_packing.append(lambda: change(target))  # type: ignore[operator]
        out = tmp_path / "a.tar.gz"
        with pytest.raises(ArtifactRefused) as caught:
            build_tarball(src, load_manifest(src), out)
        assert str(caught.value) == (
            f"{target} changed while being packed ({what}); publish again once whatever "
            "writes the tree is done"
        )
        assert not out.exists() and list(tmp_path.glob(".a.tar.gz.*")) == []

    def test_a_file_that_grows_while_it_is_read_is_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        src = make_tree(tmp_path / "src")
        target = src / "lib/util.py"
        add = tarfile.TarFile.addfile

        def add_then_append(self: tarfile.TarFile, info: tarfile.TarInfo, f: object = None) -> None:
            add(self, info, f)  # type: ignore[arg-type]
            if info.name == "lib/util.py":
                with target.open("a") as more:
                    more.write("Y = 2\n")

        monkeypatch.setattr(tarfile.TarFile, "addfile", add_then_append)
        with pytest.raises(ArtifactRefused, match="changed while being packed"):
            build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz")

    def test_a_file_with_more_bytes_than_its_size_says_is_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file that reads longer than its stat size (a filesystem whose sizes are not
        its contents, as /proc's or some FUSE mounts'): tarfile packs the size's bytes
        only, a bundle cut short. Refused, with how many bytes it had."""
        src = make_tree(tmp_path / "src")
        target = src / "lib/util.py"
        real = publish_module._Source

        class Longer(real):  # type: ignore[misc,valid-type]
            def read(self, size: int = -1) -> bytes:
                data: bytes = super().read(size)
                if not data and self.path == target and not getattr(self, "more", False):
                    self.more = True
                    return b"\n"
                return data

        monkeypatch.setattr(publish_module, "_Source", Longer)
        size = target.stat().st_size
        with pytest.raises(
            ArtifactRefused, match=f"changed while being packed \\(more than the {size} bytes"
        ):
            build_tarball(src, load_manifest(src), tmp_path / "a.tar.gz")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class TestTtyProgress:
    def test_draws_a_percentage_line_in_place_on_a_tty(self) -> None:
        out = FakeTTY()
        progress = tty_progress(out)
        assert progress is not None
        total = 8 * 1024 * 1024
        for sent in (0, total // 4, total // 4, total // 2, total):
            progress(sent, total)
        assert out.getvalue() == (
            "\rupload   0% (0.0/8.0 MiB)"
            "\rupload  25% (2.0/8.0 MiB)"
            "\rupload  50% (4.0/8.0 MiB)"
            "\rupload 100% (8.0/8.0 MiB)\n"
        )

    def test_small_uploads_and_non_ttys_show_nothing(self) -> None:
        out = FakeTTY()
        progress = tty_progress(out)
        assert progress is not None
        progress(10, 100)
        assert out.getvalue() == ""
        assert tty_progress(io.StringIO()) is None


class TestSignalsInterruptPublish:
    """Real signals sent to this process: the first raises, later ones wait for the clean-up."""

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
    def test_the_first_signal_raises_and_later_ones_do_not(self, signum: int) -> None:
        cleaned_up = False
        # A suite started under nohup or in the background has SIGHUP or SIGINT ignored,
        # and an ignored signal stays ignored: start from the default, as a CI job does.
        before = signal.signal(signum, signal.SIG_DFL)
        try:
            with pytest.raises(PublishInterrupted) as stopped, signals_interrupt_publish():
                try:
                    os.kill(os.getpid(), signum)
                    time.sleep(5)  # the handler runs here at the latest
                    raise AssertionError("the signal did not interrupt")
                finally:
                    os.kill(os.getpid(), signum)  # a second one, during the clean-up
                    time.sleep(0.05)
                    cleaned_up = True
            assert signal.getsignal(signum) is signal.SIG_DFL
        finally:
            signal.signal(signum, before)
        assert cleaned_up
        assert stopped.value.signum == signum
        assert stopped.value.signal_name == signal.Signals(signum).name

    def test_handlers_are_restored_and_ignored_signals_stay_ignored(self) -> None:
        seen: list[int] = []
        before_term = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
        before_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            with signals_interrupt_publish():
                os.kill(os.getpid(), signal.SIGHUP)  # nohup'ed: no exception
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert seen == [signal.SIGTERM]
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        finally:
            signal.signal(signal.SIGTERM, before_term)
            signal.signal(signal.SIGHUP, before_hup)


class _RacedStore:
    """S3 where another publish of other bytes creates the object between this publish's
    HEAD (nothing there) and its PUT (If-None-Match: * keeps theirs)."""

    def __init__(self) -> None:
        self.heads = 0

    def url_for(self, key: str) -> str:
        return f"s3://bucket/{key}"

    def head(self, key: str) -> dict[str, object] | None:
        self.heads += 1
        return None if self.heads == 1 else {"size": 7, "sha256": "f" * 64, "etag": "x"}

    def create_file(self, *args: object, **kwargs: object) -> bool:
        return False

    def delete(self, key: str) -> None:
        raise AssertionError("another publish's object must stay")


class TestTheObjectRace:
    def test_losing_it_is_the_id_taken_not_a_corrupt_upload(self, tmp_path: Path) -> None:
        tarball = tmp_path / "a.tar.gz"
        tarball.write_bytes(b"ours")
        with pytest.raises(ArtifactIdTaken) as caught:
            _ensure_uploaded(
                _RacedStore(),  # type: ignore[arg-type]
                "web/a.tar.gz",
                tarball,
                "main-1",
                "0" * 64,
                4,
                None,
                structlog.get_logger(),
            )
        assert "f" * 64 in str(caught.value) and "did not verify" not in str(caught.value)
