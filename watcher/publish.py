"""`watcherctl publish`: build a deterministic tarball from a manifest, upload it, record it."""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import json
import os
import posixpath
import re
import signal
import stat
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

import yaml

from watcher.archive import MAX_PATH_DEPTH, check_members, over_ratio
from watcher.config import APP_NAME_RE, Config, Limits
from watcher.consul_api import ConsulClient, KVEntry, TxnOp
from watcher.errors import (
    ArchiveRefused,
    ArtifactError,
    ArtifactIdTaken,
    ArtifactIntegrityError,
    ArtifactRefused,
    ConfigError,
    ConsulError,
    PayloadError,
    S3NotFound,
    WatcherError,
)
from watcher.log import get_logger
from watcher.records import (
    MANIFEST_PATH,
    ArtifactRecord,
    Keys,
    PinRecord,
    artifact_id_for,
    check_artifact_id,
    iso,
    utcnow,
)
from watcher.s3 import S3Store

ARTIFACT_FORMAT = "tar.gz"
BUILD_FINISHED = "build-finished"
# Always left out, whatever the manifest says: version control metadata.
ALWAYS_EXCLUDED = (".git",)
# Also left out when there is no manifest: CI configuration (Buildkite's pipeline and
# repository hooks), which has no business on the servers.
NO_MANIFEST_EXCLUDED = (".buildkite",)
# A manifest is a few lines of patterns; one bigger than this is no manifest.
MANIFEST_MAX_BYTES = 1024 * 1024
# Below this size an upload finishes before a progress line would be worth drawing.
PROGRESS_MIN_BYTES = 4 * 1024 * 1024
COMMIT_RE = re.compile(r"[0-9a-fA-F]{8,64}")
# CASes that drop a record's `uploading` mark, or take over a record of the same bytes,
# before giving up (each loses only to another publish of the same bytes writing it).
COMPLETE_TRIES = 5

# Called as ``progress(bytes_sent, total_bytes)`` while the upload runs.
ProgressFn = Callable[[int, int], None]
# What a CI cancel or job timeout (SIGTERM), a lost terminal (SIGHUP) or Ctrl-C sends.
INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class PublishInterrupted(BaseException):
    """A signal stopped a publish (``signals_interrupt_publish``).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on its way
    (botocore's, the retry loops') takes it for a failed request. ``outcome`` says what the
    publish did about its record before it stopped, in words for the operator.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.artifact = ""
        self.outcome = ""
        super().__init__(f"stopped by {self.signal_name}")


@contextlib.contextmanager
def signals_interrupt_publish() -> Iterator[None]:
    """While the block runs, SIGTERM, SIGHUP and SIGINT raise ``PublishInterrupted`` (the
    first one only: later ones wait for its clean-up), so that a cancelled CI job withdraws
    the record it wrote before its upload instead of dying with it in place. A signal this
    process ignores (``nohup``) stays ignored. Main thread only, like ``signal.signal``."""
    raised = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:
            return
        raised = True
        raise PublishInterrupted(signum)

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in INTERRUPTING_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, interrupt)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@dataclass(frozen=True)
class Manifest:
    """Which files of a source tree go into the artifact (``.watcher/manifest.yaml``).

    Glob rules (like ``.gitignore``): ``*`` and ``?`` stay within one path segment, ``**``
    spans any number of segments, ``dir/**`` also matches ``dir`` itself, and a pattern
    without a ``/`` matches a name at any depth (``*.pyc``); a newline in a name is an
    ordinary character, matched by ``*``, ``?`` and ``**`` like any other. A path is
    included when it, or one of its parent directories, matches an ``include`` pattern, and
    none of them matches an ``exclude`` pattern. Without a manifest file everything is
    included but ``.git`` and ``.buildkite`` (``.git`` never, whatever the manifest says).
    """

    source: str
    include: tuple[str, ...] = ("**",)
    exclude: tuple[str, ...] = ()

    def excluded(self, rel: str) -> bool:
        """True when ``rel`` (a ``/``-separated path) or one of its parents is excluded."""
        return any(self.excluded_itself(p) for p in _self_and_parents(rel))

    def included(self, rel: str) -> bool:
        """True when ``rel`` is selected: included (itself or a parent) and not excluded."""
        return not self.excluded(rel) and any(
            self.included_itself(p) for p in _self_and_parents(rel)
        )

    def excluded_itself(self, rel: str) -> bool:
        """Whether an exclude pattern (or ``.git``) matches ``rel`` itself: what a walk
        asks, having asked it of every parent already and entered none excluded (asking
        of each parent again made a walk of a tree N deep cost N^3: 38 s at 1,200)."""
        return any(_glob_to_regex(p).fullmatch(rel) for p in (*ALWAYS_EXCLUDED, *self.exclude))

    def included_itself(self, rel: str) -> bool:
        """Whether an include pattern matches ``rel`` itself (a walk passes a parent's
        match down)."""
        return any(_glob_to_regex(p).fullmatch(rel) for p in self.include)


def _self_and_parents(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


@functools.lru_cache(maxsize=1024)
def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a manifest glob into a regex matched against a whole relative path."""
    anchored = "/" in pattern.rstrip("/")
    pat = pattern.strip("/")
    out: list[str] = []
    i = 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("/**", i) and i + 3 == len(pat):
            out.append("(?:/.*)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif pat[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pat[i] == "?":
            out.append("[^/]")
            i += 1
        elif pat[i] == "[" and "]" in pat[i + 2 :]:
            end = pat.index("]", i + 2)
            body = pat[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pat[i]))
            i += 1
    body = "".join(out)
    # DOTALL: a newline is an ordinary character of a file name, matched by ``*`` and ``**``
    # like any other (without it ``.*`` stops at one, dropping or un-excluding such files).
    return re.compile(body if anchored else f"(?:.*/)?{body}", re.DOTALL)


def _patterns(data: dict[str, Any], key: str, problems: list[str]) -> tuple[str, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        problems.append(f"{key}: must be a list of glob patterns, got {type(value).__name__}")
        return None
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip("/"):
            problems.append(f"{key}[{i}]: must be a non-empty glob pattern, got {item!r}")
        elif item.startswith("/") or ".." in item.split("/"):
            problems.append(f"{key}[{i}]: must be relative to the directory, got {item!r}")
        else:
            pattern = item.removeprefix("./")
            try:
                _glob_to_regex(pattern)
            except re.error as exc:  # a bracket expression like [z-a] or [!]
                problems.append(f"{key}[{i}]: invalid glob pattern {item!r}: {exc.msg}")
                continue
            out.append(pattern)
    return tuple(out)


def load_manifest(src_dir: str | os.PathLike[str]) -> Manifest:
    """Read ``<src_dir>/.watcher/manifest.yaml``; a missing file means "include everything
    but ``.git`` and ``.buildkite``"."""
    path = Path(src_dir) / MANIFEST_PATH
    source = str(path)
    try:
        os.scandir(src_dir).close()  # DIR itself unreadable: said of DIR, not of a manifest
    except PermissionError as exc:
        raise ConfigError(str(src_dir), [f"cannot read: {exc.strerror or exc}"]) from None
    except OSError:
        pass  # (missing, not a directory: the caller says so)
    try:
        # Not waiting on a FIFO, nor reading a device (a link to /dev/zero) without end,
        # nor even opening one (opening some devices does something): looked at first.
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(source, ["cannot read: not a regular file"])
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Manifest(
            source=f"{source} (absent: everything but .git and .buildkite)",
            exclude=NO_MANIFEST_EXCLUDED,
        )
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since it was looked at
        os.close(fd)
        raise ConfigError(source, ["cannot read: not a regular file"])
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(MANIFEST_MAX_BYTES + 1)
        except OSError as exc:
            raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MANIFEST_MAX_BYTES:
        raise ConfigError(
            source, [f"more than {MANIFEST_MAX_BYTES} bytes: no manifest is that long"]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(source, ["cannot read: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(source, [f"{where}: invalid YAML"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"<top>: must be a mapping, got {type(data).__name__}"])
    problems = [
        f"{key}: unknown key (known: exclude, include)"
        for key in data
        if key not in ("include", "exclude")
    ]
    include = _patterns(data, "include", problems)
    exclude = _patterns(data, "exclude", problems)
    if include == ():
        problems.append("include: must list at least one pattern (or be left out for all)")
    if problems:
        raise ConfigError(source, problems)
    return Manifest(source=source, include=include or ("**",), exclude=exclude or ())


@dataclass(frozen=True)
class _Entry:
    rel: str
    kind: str  # "dir", "file", "symlink"
    path: Path
    size: int = 0
    mode: int = 0o644
    target: str = ""
    #: A file's identity and mtime when it was selected: what it must still be when packed.
    stamp: tuple[int, int, int] = (0, 0, 0)


def _select(
    src: Path,
    manifest: Manifest,
    skip: Path | None = None,
    limits: Limits | None = None,
    whose: str = "",
) -> list[_Entry]:
    """The members to archive, parents before children, in a stable order; ``skip``: a
    directory left out as if it were not there (publish's scratch directory, which a
    ``$TMPDIR`` inside the tree puts in it). With ``limits``, the walk stops once it has
    more members than hosts extract: a wrong directory (`publish web /`) is refused then,
    not after all of it was held in memory (the attacker review)."""
    entries: dict[str, _Entry] = {}
    skipped: tuple[int, int] | None = None
    if skip is not None:
        try:
            st = skip.lstat()
            skipped = (st.st_dev, st.st_ino)
        except OSError:
            skipped = None

    def add_parents(rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(len(parts)):
            parent = "/".join(parts[: i + 1])
            if parent not in entries:
                entries[parent] = _Entry(parent, "dir", src / parent, mode=0o755)

    def too_deep(rel: str) -> bool:
        return rel.count("/") + 1 > MAX_PATH_DEPTH

    def walk(directory: Path, prefix: str, included_above: bool) -> None:
        """``included_above``: a parent directory matched an include pattern (none of them
        is excluded: the walk does not enter an excluded one)."""
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise ArtifactRefused(f"cannot read {directory}: {exc.strerror or exc}") from None
        for child in children:
            rel = f"{prefix}{child.name}"
            if manifest.excluded_itself(rel):
                continue
            included = included_above or manifest.included_itself(rel)
            try:
                st = child.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) == skipped:
                    continue
                empty = stat.S_ISDIR(st.st_mode) and _is_empty_dir(child.path, skipped)
            except OSError as exc:
                raise ArtifactRefused(f"cannot read {child.path}: {exc.strerror or exc}") from None
            if included and (empty or not stat.S_ISDIR(st.st_mode)) and too_deep(rel):
                # A member: said now, not after the whole tree was read (a tree 1,200 deep
                # spent 18 s of CPU and then failed with a RecursionError). A directory
                # with content is no member: only what it holds may be too deep.
                raise _too_deep(src, rel)
            if stat.S_ISDIR(st.st_mode):
                if included and empty:
                    add_parents(rel)
                    entries[rel] = _Entry(rel, "dir", Path(child.path), mode=0o755)
                pending.append((Path(child.path), rel + "/", included))
                continue
            if not included:
                continue
            if stat.S_ISLNK(st.st_mode):
                target = str(Path(child.path).readlink())
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
                if target.startswith("/"):
                    raise ArtifactRefused(
                        f"refusing to publish {src}: symlink {rel} -> {target} is absolute: "
                        "on the hosts it would point at their own filesystem, not into the "
                        "release (make it relative)"
                    )
                if resolved == ".." or resolved.startswith("../"):
                    raise ArtifactRefused(
                        f"refusing to publish {src}: symlink {rel} -> {target} points "
                        "outside the tree"
                    )
                entry = _Entry(rel, "symlink", Path(child.path), mode=0o777, target=target)
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                entry = _Entry(
                    rel,
                    "file",
                    Path(child.path),
                    size=st.st_size,
                    mode=mode,
                    stamp=(st.st_dev, st.st_ino, st.st_mtime_ns),
                )
            else:
                raise ArtifactRefused(
                    f"refusing to publish {src}: {rel} is not a regular file, directory or "
                    "symlink (exclude it in the manifest)"
                )
            add_parents(rel)
            entries[rel] = entry

    pending = [(src, "", False)]  # a stack, not recursion: a tree may be deeper than Python's
    while pending:
        walk(*pending.pop())
        if limits is not None and len(entries) > limits.max_members:
            raise ArtifactRefused(
                f"refusing to publish {src}: more members than the {limits.max_members} "
                f"hosts extract (limits.max_members{whose}); the walk stopped there"
            )
    return [entries[k] for k in sorted(entries, key=lambda r: r.split("/"))]


def _is_empty_dir(path: str, skipped: tuple[int, int] | None = None) -> bool:
    """Whether ``path`` holds nothing (but the skipped directory, ``(st_dev, st_ino)``)."""
    with os.scandir(path) as it:
        for child in it:
            if skipped is None or child.inode() != skipped[1]:
                return False
            st = child.stat(follow_symlinks=False)
            if (st.st_dev, st.st_ino) != skipped:
                return False
        return True


def _source_date_epoch() -> int:
    try:
        return max(0, int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    except ValueError:
        return 0


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def build_tarball(
    src_dir: str | os.PathLike[str],
    manifest: Manifest,
    out_path: str | os.PathLike[str],
    *,
    limits: Limits | None = None,
    limits_from: str = "",
    skip: str | os.PathLike[str] | None = None,
) -> tuple[str, int, list[str]]:
    """Write the selected tree as a reproducible ``.tar.gz``; return (sha256, size, members).

    Members are sorted, owned by 0:0 with empty owner names, dated ``$SOURCE_DATE_EPOCH``
    (default 0), with modes 0755 (directories, executables) or 0644; the gzip header has no
    name and mtime 0. The same tree gives the same bytes, whatever its mtimes or umask.

    ``limits``: the hosts' archive limits (``limits_from`` says whose, for the error); a
    tree the hosts would refuse to extract is refused here, before anything is uploaded.

    ``skip``: a directory never archived, even inside the tree (publish's scratch directory,
    where ``out_path`` is written: a ``$TMPDIR`` inside the tree would put it there, and
    its random name would make every build of the same tree a different artifact).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise ConfigError(
            str(src), ["no such directory" if not src.exists() else "not a directory"]
        )
    entries = _select(src, manifest, None if skip is None else Path(skip), limits, limits_from)
    if not any(e.kind != "dir" for e in entries):
        raise ConfigError(manifest.source, [f"manifest matched no files in {src}"])
    declared = sum(e.size for e in entries)  # bytes of file data
    if limits is not None:
        _check_tree_limits(src, entries, declared, limits, limits_from)
    _check_members(src, entries)
    out = Path(out_path)
    mtime = _source_date_epoch()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            hashing = _HashingWriter(raw)
            with (
                gzip.GzipFile(filename="", mode="wb", fileobj=hashing, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for entry in entries:
                    _add(tar, entry, mtime)
            raw.flush()
            os.fsync(raw.fileno())
        Path(tmp_name).replace(out)
    except OSError as exc:  # writing it: the source files' errors are ArtifactRefused
        Path(tmp_name).unlink(missing_ok=True)
        raise ArtifactError(
            f"cannot write the artifact in {out.parent}: {exc.strerror or exc}"
        ) from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if limits is not None:
        packed = max(hashing.size, 1)
        if over_ratio(declared, packed, limits.max_ratio):
            out.unlink(missing_ok=True)
            raise ArtifactRefused(
                f"refusing to publish {src}: {declared} bytes of files compress to {packed} "
                f"bytes, a ratio over {limits.max_ratio:g}: hosts refuse such an archive as a "
                f"bomb (limits.max_ratio{limits_from})"
            )
    return hashing.digest.hexdigest(), hashing.size, [e.rel for e in entries]


#: The extractor's name (watcher/archive.py) for each kind of ``_Entry``.
_ARCHIVE_KINDS = {"dir": "directory", "file": "file", "symlink": "symlink"}


def _check_members(src: Path, entries: list[_Entry]) -> None:
    """Refuse a tree every host would refuse to extract by the extractor's own rules on
    names, reserved paths and symlinks (``archive.check_members``): a symlink that leaves
    the tree through other symlinks, '..' after a non-directory, a loop, a checked-in
    ``.watcher/release.json``. Refused here, the id is not burnt for nothing."""
    try:
        check_members((e.rel, _ARCHIVE_KINDS[e.kind], e.target) for e in entries)
    except ArchiveRefused as exc:
        raise ArtifactRefused(
            f"refusing to publish {src}: hosts refuse to extract it: {exc}"
        ) from None


def _check_tree_limits(
    src: Path, entries: list[_Entry], declared: int, limits: Limits, whose: str
) -> None:
    """Refuse a tree whose archive the hosts would refuse (``extract_stream``'s checks; the
    count of members is ``_select``'s, as it walks)."""
    if declared > limits.max_bytes:
        raise ArtifactRefused(
            f"refusing to publish {src}: {declared} bytes of files, over the "
            f"{limits.max_bytes} hosts extract (limits.max_bytes{whose})"
        )
    deep = next((e.rel for e in entries if e.rel.count("/") + 1 > MAX_PATH_DEPTH), None)
    if deep is not None:
        raise _too_deep(src, deep)


def _too_deep(src: Path, rel: str) -> ArtifactRefused:
    return ArtifactRefused(
        f"refusing to publish {src}: {rel[:200]!r} has more than {MAX_PATH_DEPTH} path "
        "components, which hosts refuse to extract"
    )


def _add(tar: tarfile.TarFile, entry: _Entry, mtime: int) -> None:
    info = tarfile.TarInfo(entry.rel)
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = entry.mode
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
        tar.addfile(info)
    else:
        info.type = tarfile.REGTYPE
        info.size = entry.size
        try:
            # Not following a symlink, not waiting on a FIFO: the file selected may have
            # been replaced by either since (a build step still writing the tree).
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _changed(entry, "it is a symlink now") from None
            raise ArtifactRefused(f"cannot read {entry.path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as f:
            _check_unchanged(entry, os.fstat(fd))
            source = _Source(f, entry.path)
            try:
                tar.addfile(info, source)
                grew = source.read(1) != b""
            except OSError as exc:
                if exc.errno is not None:
                    raise  # writing the artifact (a full disk): build_tarball says so
                # tarfile's "unexpected end of data": shrunk while read, said as such
                _check_unchanged(entry, os.fstat(fd))
                raise ArtifactRefused(f"cannot read {entry.path}: {exc}") from None
            _check_unchanged(entry, os.fstat(fd))  # written to while read
            if grew:
                raise _changed(entry, f"more than the {entry.size} bytes it had")


class _Source:
    """A file being packed: its read errors are said as such (not as the artifact's
    writes: a full disk under the output is not the source file's fault)."""

    def __init__(self, f: IO[bytes], path: Path) -> None:
        self.f, self.path = f, path

    def read(self, size: int = -1) -> bytes:
        try:
            return self.f.read(size)
        except OSError as exc:
            raise ArtifactRefused(f"cannot read {self.path}: {exc.strerror or exc}") from None


def _check_unchanged(entry: _Entry, st: os.stat_result) -> None:
    """Refuse a file that is not the one selected, or was written to since: its archive
    would hold bytes of no one moment of the tree (a bundle cut short)."""
    if not stat.S_ISREG(st.st_mode):
        raise _changed(entry, "it is no regular file now")
    if (st.st_dev, st.st_ino) != entry.stamp[:2]:
        raise _changed(entry, "replaced by another file")
    if st.st_size != entry.size:
        raise _changed(entry, f"{st.st_size} bytes now, {entry.size} when selected")
    if st.st_mtime_ns != entry.stamp[2]:
        raise _changed(entry, "written to since it was selected")


def _changed(entry: _Entry, what: str) -> ArtifactRefused:
    return ArtifactRefused(
        f"{entry.path} changed while being packed ({what}); publish again once whatever "
        "writes the tree is done"
    )


def tty_progress(stream: IO[str] | None = None) -> ProgressFn | None:
    """A progress line redrawn in place on ``stream`` (stderr), or None when it is no TTY."""
    out = stream if stream is not None else sys.stderr
    if not (hasattr(out, "isatty") and out.isatty()):
        return None
    shown = {"pct": -1}

    def progress(sent: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:
            return
        pct = min(100, sent * 100 // total)
        if pct == shown["pct"]:
            return
        shown["pct"] = pct
        mib = 1024 * 1024
        out.write(f"\rupload {pct:3d}% ({sent / mib:.1f}/{total / mib:.1f} MiB)")
        if pct >= 100:
            out.write("\n")
        out.flush()

    return progress


def _refuse_existing(
    artifact_id: str, theirs: str, ours: str, where: str, branches: tuple[str, str] = ("", "")
) -> ArtifactIdTaken:
    """The refusal of an id already published with other bytes; ``branches``: the existing
    record's branch and this build's, when known: two branch names can give one id."""
    hint = (
        "; an artifact id names one content forever: publish this build under another id "
        "(--artifact-id), or make the build give the same bytes for the same commit"
    )
    their_branch, our_branch = branches
    if their_branch and our_branch and their_branch != our_branch:
        hint = (
            f"; it was published from branch {their_branch!r}, and this build's branch "
            f"{our_branch!r} gives the same id (every character outside [A-Za-z0-9._-] "
            "becomes '-'): name this one with --artifact-id"
        )
    return ArtifactIdTaken(
        f"artifact {artifact_id} already exists with sha256 {theirs} ({where}); "
        f"this build is {ours}{hint}"
    )


def publish_artifact(
    config: Config,
    app: str,
    src_dir: str | os.PathLike[str],
    *,
    branch: str,
    commit: str,
    build_number: str = "",
    build_url: str = "",
    artifact_id: str | None = None,
    created_by: str,
    progress: ProgressFn | None = None,
    retry_deadline: float = 30.0,
) -> ArtifactRecord:
    """Build, upload, verify, record and announce one artifact; idempotent for the same tree.

    Order: tarball -> KV record for the id? (same sha256: take it over, written again with
    a CAS on its index (``_adopt``), so that the publish that wrote it, cancelled now,
    leaves it; other sha256: refuse, unless it is stale, below) -> pin for the id? (other
    sha256: refuse) -> KV record written (cas=0; it is also the permission check, so a
    refused token uploads nothing) -> S3 object? (same: re-use; missing: upload with
    If-None-Match: *; other sha256: an orphan of a failed publish, replaced with If-Match
    on its ETag when no pin appeared meanwhile; refused where this publish does not hold
    the record it wrote)
    -> HEAD verifies size and sha256 -> ``build-finished`` (fired again by an idempotent
    re-publish). If anything fails or a signal stops it (``signals_interrupt_publish``)
    between the record write and a verified upload, the record it wrote is withdrawn.

    A record of other bytes is *stale* when its S3 object is missing (or holds other bytes
    than the record says) and no host pinned the id (``pins/<id>``): a publish killed
    mid-upload (SIGKILL, a lost agent) left it. It is replaced (cas on its index), and put
    back if this publish fails in turn.
    """
    if not APP_NAME_RE.match(app):
        raise ArtifactRefused(f"invalid app name {app!r}: must match {APP_NAME_RE.pattern}")
    if artifact_id is None:
        artifact_id = artifact_id_for(branch, commit)
    else:
        check_artifact_id(artifact_id)
        if commit and not COMMIT_RE.fullmatch(commit):
            raise PayloadError(f"commit {commit!r} is not a hex SHA")
    try:
        return _publish(
            config,
            app,
            Path(src_dir),
            artifact_id,
            branch=branch,
            commit=commit,
            build_number=build_number,
            build_url=build_url,
            created_by=created_by,
            progress=progress,
            retry_deadline=retry_deadline,
        )
    except PublishInterrupted as exc:
        exc.artifact = artifact_id
        raise


def _publish(
    config: Config,
    app: str,
    src: Path,
    artifact_id: str,
    *,
    branch: str,
    commit: str,
    build_number: str,
    build_url: str,
    created_by: str,
    progress: ProgressFn | None,
    retry_deadline: float,
) -> ArtifactRecord:
    if not src.is_dir():
        raise ConfigError(
            str(src), ["no such directory" if not src.exists() else "not a directory"]
        )
    log = get_logger(app=app, artifact=artifact_id)
    manifest = load_manifest(src)
    keys = Keys(config.kv_prefix, app)
    kv_key = keys.artifact(artifact_id)
    payload = json.dumps({"app": app, "artifact": artifact_id}, separators=(",", ":")).encode()
    # What this publish has done about its record, for a signal that stops it.
    done = "it had written nothing to Consul"

    with tempfile.TemporaryDirectory(prefix="watcher-publish-") as tmp:
        tarball = Path(tmp) / f"{artifact_id}.{ARTIFACT_FORMAT}"
        app_config = config.apps.get(app)
        limits = app_config.limits if app_config is not None else Limits()
        whose = (
            f" of app {app} in this config"
            if app_config is not None
            else ", the hosts' default: set the app's limits in this config if its hosts allow more"
        )
        sha256, size, members = build_tarball(
            src, manifest, tarball, limits=limits, limits_from=whose, skip=tmp
        )
        log.info("artifact_built", sha256=sha256, size=size, members=len(members))

        consul = ConsulClient(config.consul, retry_deadline=retry_deadline)
        try:
            # One stalled request must not outlast --retry-for either: botocore's read
            # timeout applies per attempt (30 s; `--retry-for 5s` took 30.4 s on a server
            # that accepted and never answered). At least 5 s: a slow answer is no stall.
            read_timeout = min(30.0, max(5.0, retry_deadline))
            store = S3Store(config.s3, retry_deadline=retry_deadline, read_timeout=read_timeout)
            entry = consul.kv_get(kv_key)
            existing = _record_of(entry, kv_key)
            stale: KVEntry | None = None
            if entry is not None and existing is not None and existing.sha256 != sha256:
                _check_stale(
                    consul, store, existing, keys.pin(artifact_id), kv_key, sha256, branch, payload
                )
                stale, existing = entry, None
            _check_pin(consul, keys.pin(artifact_id), artifact_id, sha256)
            # Whether this publish wrote the record (``writing``: the write may have reached
            # Consul, whose answer a signal cut off).
            writing = wrote = False
            # The ModifyIndex of the record this publish wrote (0: none, or not known): the
            # withdrawal deletes or restores only that write, never a later one.
            written = 0
            record = existing
            try:
                if record is not None and entry is not None:
                    _adopt(consul, kv_key, entry, artifact_id, sha256)
                    done = f"it left the existing record {kv_key} as it was"
                else:
                    record = ArtifactRecord(
                        id=artifact_id,
                        url=store.url_for(store.key_for(app, artifact_id, ARTIFACT_FORMAT)),
                        sha256=sha256,
                        size=size,
                        format=ARTIFACT_FORMAT,
                        branch=branch,
                        commit=commit.lower(),
                        build_number=str(build_number or ""),
                        build_url=build_url,
                        created_at=iso(utcnow()),
                        created_by=created_by,
                        uploading=True,
                    )
                    writing = True
                    written = _write_record(consul, kv_key, record, stale, log)
                    wrote = bool(written)
                    writing = False
                    if not wrote:
                        # Another publisher won the race: fine if it published the same bytes.
                        won = consul.kv_get(kv_key)
                        winner = _record_of(won, kv_key)
                        if won is None or winner is None:
                            # Written and withdrawn by a publish that failed meanwhile: the id
                            # is free again, a retry of this publish can take it.
                            raise ArtifactRefused(
                                f"artifact {artifact_id}: another publish wrote {kv_key} first "
                                "and withdrew it again; publish again"
                            )
                        if winner.sha256 != sha256:
                            raise _refuse_existing(
                                artifact_id, winner.sha256, sha256, kv_key, (winner.branch, branch)
                            )
                        _adopt(consul, kv_key, won, artifact_id, sha256)
                        record = winner
                        done = f"it left the existing record {kv_key} as it was"
                try:
                    s3_key = store.parse_url(record.url, app=app)
                except ArtifactRefused as exc:
                    if wrote:
                        raise
                    # Another publish's record of the same bytes (one with another s3
                    # prefix, say, before the config was fixed): the record is the problem.
                    raise ArtifactRefused(
                        f"{exc}: the existing record {kv_key} of artifact {artifact_id} "
                        "points there (a publish with another s3 bucket or prefix wrote it); "
                        "publish under another --artifact-id, or delete that record "
                        f"(consul kv delete {kv_key}) if no host uses it"
                    ) from None
                # Holding the record it wrote, with no pin of other bytes, this publish may
                # replace an object of other bytes: an orphan of a failed or cancelled
                # publish (its record withdrawn), which no host can have verified.
                pin_key = keys.pin(artifact_id)
                _ensure_uploaded(
                    store,
                    s3_key,
                    tarball,
                    artifact_id,
                    sha256,
                    size,
                    progress,
                    log,
                    replace_orphan=(
                        (lambda: _check_pin(consul, pin_key, artifact_id, sha256))
                        if wrote
                        else None
                    ),
                )
            except BaseException as exc:
                if record is not None and (
                    wrote or (writing and isinstance(exc, PublishInterrupted))
                ):
                    previous = None if stale is None else stale.value
                    # S3 failed the first look, or there is no bucket: nothing was uploaded,
                    # so no object can remain (``_ensure_uploaded`` marks such an error).
                    nothing_sent = bool(getattr(exc, "nothing_sent", False))
                    done = _withdraw_despite_signals(
                        consul, kv_key, record, previous, written, log, nothing_sent
                    )
                    if isinstance(exc, PublishInterrupted):
                        exc.outcome = done
                    _say_also(exc, done)
                raise
            done = (
                f"its object was uploaded and verified; its record {kv_key} may still say "
                "it is uploading (no deploy takes it): publish the same file again to "
                "finish it (it finds the object and only drops the mark)"
            )
            try:
                _complete(consul, kv_key, artifact_id, sha256, record.url)
            except ConsulError as exc:  # (a refusal of _complete says what happened itself)
                _say_also(exc, done)
                raise
            record = replace(record, uploading=False)
            done = (
                f"its record {kv_key} and its object were complete; build-finished may not "
                "have been fired (publish it again to announce it)"
            )
            if existing is not None:
                log.info("artifact_already_published", sha256=sha256)
            else:
                log.info("artifact_published", sha256=sha256, size=size, url=record.url)
            try:
                consul.event_fire(BUILD_FINISHED, payload)
            except WatcherError as exc:
                # The step fails, but the build is there: say so, and what is left.
                _say_also(
                    exc,
                    f"the artifact itself is complete (record {kv_key}, object {record.url}) "
                    "and can be deployed; hosts prefetch it only once announced: publish it "
                    "again to announce it",
                )
                raise
            return record
        except PublishInterrupted as exc:
            exc.outcome = exc.outcome or done
            raise
        finally:
            consul.close()


def _complete(consul: ConsulClient, kv_key: str, artifact_id: str, sha256: str, url: str) -> None:
    """The object is uploaded and verified: drop the record's ``uploading`` mark, with a
    CAS, so that deploys take the build (a record of an older publish has none).

    The record may have changed while this publish uploaded: another publish of other
    bytes found no object yet, judged it stale and replaced it (and may be replacing the
    object now). Published only if it still names these bytes. The record is rewritten from
    its own JSON, not from what this version parses of it: nothing else in it changes."""
    for _ in range(COMPLETE_TRIES):
        entry = consul.kv_get(kv_key)
        now = _record_of(entry, kv_key)
        if entry is None or now is None:
            raise ArtifactRefused(
                f"artifact {artifact_id}: {kv_key} is gone: another publish withdrew "
                "it while this one uploaded; publish again"
            )
        if now.sha256 != sha256 or now.url != url:
            raise _refuse_existing(artifact_id, now.sha256, sha256, kv_key)
        if not now.uploading:
            return
        data = json.loads(entry.value or b"")
        del data["uploading"]
        value = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        # Its flags kept: they count adoptions (``_adopt``), and a publish that wrote
        # this record withdraws only its own write, which this one replaces.
        if _cas(consul, kv_key, value, entry.modify_index, entry.flags):
            return
    raise ArtifactRefused(
        f"artifact {artifact_id}: {kv_key} kept changing while this publish marked it "
        "complete; publish again"
    )


def _say_also(exc: BaseException, more: str) -> None:
    """Add ``more`` to a failure's message, the one line the operator reads (a signal's
    ``PublishInterrupted`` carries its ``outcome`` instead)."""
    if (
        isinstance(exc, WatcherError)
        and not isinstance(exc, PublishInterrupted)
        and len(exc.args) == 1
    ):
        exc.args = (f"{exc.args[0]}; {more}",)


def _record_of(entry: KVEntry | None, kv_key: str) -> ArtifactRecord | None:
    if entry is None:
        return None
    return ArtifactRecord.from_json(entry.value, where=kv_key)


def _check_stale(
    consul: ConsulClient,
    store: S3Store,
    record: ArtifactRecord,
    pin_key: str,
    kv_key: str,
    sha256: str,
    branch: str = "",
    announce: bytes = b"",
) -> None:
    """Refuse to replace ``record`` (other bytes) unless it is stale: its object is missing
    or holds other bytes than the record says (an orphan of a publish that failed after
    putting the record back), and no host pinned the id, so nobody has or can have verified
    its bytes. ``announce``: the ``build-finished`` payload fired for that record when this
    refusal finishes it (its own publish never got to fire it)."""
    refusal = _refuse_existing(record.id, record.sha256, sha256, kv_key, (record.branch, branch))
    if consul.kv_get(pin_key) is not None:
        raise refusal
    try:
        s3_key = store.parse_url(record.url)
    except ArtifactRefused:
        raise refusal from None
    head = store.head(s3_key)
    # An object without sha256 metadata was not put there by a publish: not an orphan of one
    if head is not None and head.get("sha256") in (record.sha256, "", None):
        if (
            record.uploading
            and head.get("sha256") == record.sha256
            and head.get("size") == record.size
            and _finish_for_another(consul, kv_key, record)
        ):
            announced = "and announced (hosts prefetch it)"
            if announce:
                try:
                    consul.event_fire(BUILD_FINISHED, announce)
                except WatcherError:
                    announced = "not announced (hosts fetch it when it is deployed)"
            _say_also(
                refusal,
                f"that build's own publish had not finished (its record still said "
                f"uploading), and its object verifies as a publish checks it (size and "
                f"sha256): it is marked complete now, {announced}, so build "
                f"{record.sha256[:12]} can be deployed",
            )
        raise refusal


def _finish_for_another(consul: ConsulClient, kv_key: str, record: ArtifactRecord) -> bool:
    """Drop the ``uploading`` mark of another publish's record whose object is complete:
    that publish was killed, or lost Consul, between its upload and its last step, and a
    build of other bytes under the same id would otherwise leave it undeployable until
    someone edited KV by hand. Whether it is marked complete now."""
    try:
        _complete(consul, kv_key, record.id, record.sha256, record.url)
    except (ConsulError, ArtifactRefused, PayloadError):
        return False  # changed (or unreadable) meanwhile, or Consul gone: the refusal stands
    return True


def _cas(consul: ConsulClient, kv_key: str, value: bytes, index: int, flags: int = 0) -> int:
    """Write ``value`` if the key's ModifyIndex is ``index`` (0: absent); the ModifyIndex
    of the write, 0 when the CAS lost. A txn, because a KV PUT does not say the index."""
    result = consul.txn([TxnOp.cas(kv_key, value, index, flags)])
    if not result.ok:
        return 0
    return result.entries[0].modify_index if result.entries else 0


def _adopt(
    consul: ConsulClient, kv_key: str, entry: KVEntry, artifact_id: str, sha256: str
) -> None:
    """Take over another publish's record of the same bytes: write it again as it is, with a
    CAS on its index, so that the publish that wrote it, stopped by a signal or a failure,
    no longer withdraws it (``_withdraw`` deletes only its own write): this publish reports
    the record as published, and it stays. The entry's flags (read by nobody) count the
    adoptions: Consul keeps the ModifyIndex of a write of the same value and flags.

    A CAS lost to another write of a record of the same bytes (a concurrent retry that took
    it over too, the first publish finishing it) is tried again on that write: two retries
    of one build both report it published."""
    for _ in range(COMPLETE_TRIES):
        flags = (entry.flags + 1) % 2**64 or 1
        if entry.value is not None and _cas(consul, kv_key, entry.value, entry.modify_index, flags):
            return
        now = consul.kv_get(kv_key)
        theirs = _record_of(now, kv_key)
        if now is None or theirs is None or theirs.sha256 != sha256:
            break
        entry = now
    raise ArtifactRefused(
        f"artifact {artifact_id}: another publish changed {kv_key} while this one took "
        "it over; publish again"
    )


def _write_record(
    consul: ConsulClient,
    kv_key: str,
    record: ArtifactRecord,
    stale: KVEntry | None,
    log: Any,
) -> int:
    """Create the record (cas=0), or replace ``stale`` (cas on its index); the ModifyIndex
    written, 0 when another publisher changed the key first."""
    if stale is None:
        return _cas(consul, kv_key, record.to_json(), 0)
    # The CI policy's write on artifacts/ covers this as it covers the create: Consul's
    # rules cannot tell them apart, so a token that may publish may replace.
    replaced = _cas(consul, kv_key, record.to_json(), stale.modify_index)
    if replaced:
        theirs = _record_of(stale, kv_key)
        log.warning(
            "artifact_record_replaced",
            key=kv_key,
            stale_sha256=theirs.sha256 if theirs else "",
            reason="its object is missing and no host pinned it",
        )
    return replaced


def _check_pin(consul: ConsulClient, pin_key: str, artifact_id: str, sha256: str) -> None:
    """Hosts pin the first content they verified under an id: never publish other bytes."""
    entry = consul.kv_get(pin_key)
    if entry is None:
        return
    try:
        pin = PinRecord.from_json(entry.value, where=pin_key)
    except PayloadError as exc:
        # Hosts refuse every record of the id while its pin does not parse: what this
        # would publish could not be deployed, and nobody can tell what a host verified.
        raise ArtifactRefused(
            f"artifact {artifact_id}: its pin {pin_key} does not parse ({exc}); hosts "
            "refuse to deploy the id until an admin repairs pins/: publish under another "
            "--artifact-id meanwhile"
        ) from None
    if pin.sha256 != sha256:
        raise _refuse_existing(artifact_id, pin.sha256, sha256, pin_key)


def _withdraw_despite_signals(
    consul: ConsulClient,
    kv_key: str,
    record: ArtifactRecord,
    previous: bytes | None,
    written: int,
    log: Any,
    nothing_sent: bool = False,
) -> str:
    """``_withdraw``, run to its end even when a signal arrives during it: it is raised
    once at most (``signals_interrupt_publish``), afterwards, with the outcome."""
    interrupted: PublishInterrupted | None = None
    while True:
        try:
            outcome = _withdraw(consul, kv_key, record, previous, written, log, nothing_sent)
            break
        except PublishInterrupted as exc:
            interrupted = exc
    if interrupted is not None:
        interrupted.outcome = outcome
        raise interrupted
    return outcome


def _withdraw(
    consul: ConsulClient,
    kv_key: str,
    record: ArtifactRecord,
    previous: bytes | None,
    written: int,
    log: Any,
    nothing_sent: bool = False,
) -> str:
    """Remove the record this publish wrote (or put back the stale one it replaced) when
    its upload did not complete; what it did, in words for the operator (``nothing_sent``:
    the upload cannot have reached S3, so its object is not said to remain).

    Only its own write is touched: a CAS on ``written``, the ModifyIndex it wrote. Another
    publish of the same bytes that took the record over (``_adopt``) wrote it again, and
    reports it as published: it is left alone. When the write's answer was lost (0), the
    record is this publish's only if it holds its bytes and, for a create, was never
    written again since (ModifyIndex == CreateIndex).
    """
    try:
        entry = consul.kv_get(kv_key)
        if entry is None:
            return f"{kv_key} did not hold its record: nothing to withdraw"
        if entry.value != record.to_json():
            if _finished_by_another(entry, record):
                log.warning("artifact_record_adopted", key=kv_key)
                return f"{kv_key} was finished by another publish (its object verified); left it"
            return f"{kv_key} did not hold its record: nothing to withdraw"
        if written == 0 and previous is None and entry.modify_index == entry.create_index:
            written = entry.modify_index
        elif written == 0 and previous is not None and entry.flags == 0:
            # A replacement's answer lost: its bytes decide, unless another publish of the
            # same bytes adopted it since (``_adopt`` counts in the flags).
            written = entry.modify_index
        if entry.modify_index != written:
            log.warning("artifact_record_adopted", key=kv_key)
            return f"{kv_key} was adopted by another publish of the same bytes; left it"
        # The upload may have reached S3 all the same (its answer or the HEAD after it lost).
        remains = (
            ""
            if nothing_sent
            else f"; its object {record.url} may remain: the next publish of this id re-uses "
            "it (same bytes) or replaces it"
        )
        if previous is None:
            if consul.kv_delete(kv_key, cas=entry.modify_index):
                log.warning("artifact_record_withdrawn", key=kv_key)
                return f"withdrew its record {kv_key}{remains}"
        elif consul.kv_put(kv_key, previous, cas=entry.modify_index):
            log.warning("artifact_record_restored", key=kv_key)
            return f"put back the record it replaced at {kv_key}{remains}"
        return f"{kv_key} changed meanwhile: left it alone"
    except WatcherError as exc:
        log.error("artifact_record_not_withdrawn", key=kv_key, error=str(exc))
        return (
            f"could not withdraw its record {kv_key} ({exc}); the next publish of this id "
            f"replaces it, or delete it: consul kv delete {kv_key}"
        )


def _finished_by_another(entry: KVEntry, record: ArtifactRecord) -> bool:
    """Whether ``entry`` is ``record`` with its ``uploading`` mark dropped (``_complete``)."""
    try:
        theirs = _record_of(entry, entry.key)
    except PayloadError:
        return False
    return theirs is not None and replace(theirs, uploading=True) == record


def _ensure_uploaded(
    store: S3Store,
    s3_key: str,
    tarball: Path,
    artifact_id: str,
    sha256: str,
    size: int,
    progress: ProgressFn | None,
    log: Any,
    *,
    replace_orphan: Callable[[], None] | None = None,
) -> None:
    """Make the object at ``s3_key`` hold exactly this tarball, verified by a HEAD.

    ``replace_orphan``: given when this publish holds the record it wrote and no host
    pinned the id; an object of other bytes is then an orphan (a failed or cancelled
    publish uploaded it, then withdrew its record) that nobody can have verified: it is
    replaced, after ``replace_orphan()`` checked again that no pin appeared (it raises
    the refusal if one did). Without it, an object of other bytes is refused.
    """
    url = store.url_for(s3_key)
    try:
        head = store.head(s3_key)
    except WatcherError as exc:
        # Before any upload: no object of this publish can remain (said so, not "may").
        exc.nothing_sent = True  # type: ignore[attr-defined]
        raise
    theirs = str((head or {}).get("sha256") or "(none recorded)")
    same = head is not None and head.get("sha256") == sha256 and head.get("size") == size
    if head is not None and not same and replace_orphan is not None:
        replace_orphan()
        log.warning(
            "artifact_orphan_replaced",
            url=url,
            orphan_sha256=theirs,
            orphan_size=head.get("size"),
            reason="no record or pin names its bytes: a failed or cancelled publish left it",
        )
        # If-Match: only the orphan just looked at, not what another writer put there since.
        created = store.replace_file(
            tarball,
            s3_key,
            etag=str(head.get("etag", "")),
            sha256=sha256,
            progress=_progress_of(progress, size),
        )
        if not created:
            raise ArtifactRefused(
                f"artifact {artifact_id}: {url} changed while this publish replaced it; "
                "publish again"
            )
    elif head is not None and head.get("sha256") != sha256:
        raise _refuse_existing(artifact_id, theirs, sha256, url)
    elif same:
        log.info("artifact_upload_reused", url=url)
        return
    else:
        # If-None-Match: * never overwrites an object, whoever uploaded it meanwhile.
        try:
            created = store.create_file(
                tarball, s3_key, sha256=sha256, progress=_progress_of(progress, size)
            )
        except S3NotFound as exc:
            # No bucket (a HEAD cannot tell one from a missing object): nothing was stored.
            exc.nothing_sent = True  # type: ignore[attr-defined]
            raise
    head = store.head(s3_key)
    if not created and head is not None and head.get("sha256") not in (sha256, "", None):
        # Another publish of other bytes put its object there first (If-None-Match kept
        # it): the id is taken, which is not a corrupt upload.
        raise _refuse_existing(artifact_id, str(head.get("sha256")), sha256, url)
    if head is None or head.get("size") != size or head.get("sha256") != sha256:
        got = "nothing" if head is None else f"size {head.get('size')} sha256 {head.get('sha256')}"
        if created and head is not None and head.get("sha256") == sha256:
            # Ours but broken; other bytes are another writer's, theirs to keep.
            store.delete(s3_key)
        raise ArtifactIntegrityError(
            f"upload of {url} did not verify: expected size {size} sha256 {sha256}, S3 has {got}"
        )
    if not created:
        log.info("artifact_upload_reused", url=url)
        return
    log.info("artifact_uploaded", url=url, size=size)


def _progress_of(progress: ProgressFn | None, total: int) -> Callable[[int], None] | None:
    """Adapt ``progress(sent, total)`` to S3Store's ``progress(bytes so far)``."""
    if progress is None:
        return None
    return lambda sent: progress(sent, total)
