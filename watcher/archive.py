"""Safe extraction of release tarballs into a fresh directory; refusals name the member."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gzip
import os
import re
import stat
import sys
import tarfile
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

from watcher.errors import ArchiveDoesNotFit, ArchiveRefused, StagingCancelled, StagingError
from watcher.gunzip import GzipReader
from watcher.log import get_logger

__all__ = [
    "FORMATS",
    "MAX_PATH_DEPTH",
    "RATIO_FLOOR",
    "RULES",
    "CancelFn",
    "DiskBudget",
    "ExtractStats",
    "ProgressFn",
    "TarStream",
    "check_members",
    "extract_archive",
    "extract_stream",
    "over_ratio",
    "sync_tree",
    "sync_tree_each",
]

#: Archive formats ``extract_archive`` understands, by the name the engine passes as ``fmt``.
FORMATS = ("tar.gz", "tgz", "tar")
#: The version of what an archive may hold, raised with every change to it: a refusal a host
#: remembers (releases.py) holds only under the rules and limits that made it.
#: 2: a directory's setgid, sticky and setuid bits are dropped, not refused.
RULES = 2

_CHUNK = 1024 * 1024  # bytes read and written at a time: a member is never held in memory whole
_MAX_READ = 16 * 1024 * 1024  # largest single read tarfile may ask for (pax / GNU long names)
_HEADER_ALLOWANCE = 16 * 1024  # tar stream bytes allowed per member beyond its data
_NAME_MAX = 255  # bytes per path component (Linux NAME_MAX)
_PATH_MAX = 4095  # bytes per member name or link target
#: Path components a member name or a symlink target may have. Real trees stay far below it
#: (a deep node_modules is a few dozen); a hostile one thousands of levels deep would cost
#: quadratic time to check and overflow every recursive walk of the tree (removal, sync).
MAX_PATH_DEPTH = 128
# Member names and symlink targets of one archive, all together (kept in memory while it is
# checked): 200,000 paths of 300 bytes; a bomb of 4 KB names compresses to nothing.
MAX_NAME_BYTES = 64 * 1024 * 1024
_MAX_LINK_HOPS = 40  # symlinks followed when resolving one target (the kernel's MAXSYMLINKS)
_FD_CACHE = 64  # directory descriptors kept open while extracting
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
_RESERVED = (".watcher", "release.json")  # written by the release engine, never by the archive
#: Below this many bytes of file data an archive is never refused for its compression ratio:
#: small trees of text and tar padding compress far better than whole releases do.
RATIO_FLOOR = 16 * 1024 * 1024


def over_ratio(declared: int, packed: int, max_ratio: float) -> bool:
    """Whether ``declared`` bytes of file data from a ``packed``-byte archive is a bomb by
    ``limits.max_ratio`` (never under RATIO_FLOOR): the extractor's rule, and publish's."""
    return declared > RATIO_FLOOR and declared > max_ratio * packed


_FREE_CHECK_EVERY = _CHUNK  # bytes written between two looks at the free space (one fstatvfs)
_FREE_CHECK_ENTRIES = 256  # entries created between two such looks (a tree of empty dirs)
# What one created entry (a directory, symlink or file) is charged against the disk budget
# beyond its data: a block of the filesystem (an empty directory takes one, a long symlink
# target one): a tree of thousands of empty directories used to cost nothing.
ENTRY_COST = 4096
_PROGRESS_EVERY = 0.25  # seconds between two calls of ``progress``

#: ``cancel()``: True when the extraction should stop (checked between chunks and members).
CancelFn = Callable[[], bool]
#: ``progress(bytes_written, members_so_far)``: at most every 0.25 s, and once at the end.
ProgressFn = Callable[[int, int], None]

_DIR, _FILE, _SYMLINK = "directory", "file", "symlink"
_Parts = tuple[str, ...]

log = get_logger(module="archive")


class TarStream(Protocol):
    """An uncompressed tar stream read forward: a file, a ``GzipReader``, a zstd reader."""

    def read(self, size: int = ..., /) -> bytes: ...
    def seek(self, offset: int, whence: int = ..., /) -> int: ...
    def tell(self) -> int: ...


@dataclass(frozen=True)
class DiskBudget:
    """How many bytes of file data one extraction may write on its filesystem.

    ``allowed`` is ``min(free * fraction, free - reserve)`` (never below 0), with ``free``
    what an unprivileged process may still use (``f_bavail``) when the extraction starts.
    """

    free: int
    allowed: int
    fraction: float
    reserve: int
    #: Free inodes (``f_favail``) and how many entries may be created: ``disk_fraction`` of
    #: them. None: the filesystem has no fixed count (btrfs says 0 of 0).
    inodes_free: int | None = None
    inodes_allowed: int | None = None

    @classmethod
    def of(cls, fd: int, *, fraction: float, reserve: int) -> DiskBudget:
        st = os.fstatvfs(fd)
        free = st.f_bavail * st.f_frsize
        allowed = max(0, min(int(free * fraction), free - reserve))
        inodes = st.f_favail if st.f_files > 0 else None
        return cls(
            free=free,
            allowed=allowed,
            fraction=fraction,
            reserve=reserve,
            inodes_free=inodes,
            inodes_allowed=None if inodes is None else int(inodes * fraction),
        )

    def describe(self) -> str:
        return (
            f"{self.allowed} bytes may be used: {self.free} free, limits disk_fraction "
            f"{self.fraction:g} and disk_reserve {self.reserve}"
        )

    def describe_inodes(self) -> str:
        return (
            f"{self.inodes_allowed} entries may be created: {self.inodes_free} free inodes, "
            f"limit disk_fraction {self.fraction:g}"
        )


@dataclass(frozen=True)
class ExtractStats:
    """What an extraction produced: every member counted, and the file bytes written."""

    members: int
    bytes: int


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    fmt: str,
    max_members: int,
    max_bytes: int,
    umask: int,
    uid: int | None = None,
    gid: int | None = None,
    max_ratio: float | None = None,
    disk_fraction: float | None = None,
    disk_reserve: int = 0,
    cancel: CancelFn | None = None,
    progress: ProgressFn | None = None,
) -> ExtractStats:
    """Extract ``archive`` into the existing, empty directory ``dest``, refusing anything unsafe.

    Members are created one at a time below ``dest`` through directory descriptors, with
    ``O_EXCL | O_NOFOLLOW``, so nothing is ever written outside it. Owners in the archive are
    ignored: files belong to this process, or to ``uid``/``gid`` when running as root. Modes
    are ``mode & 0o777 & ~umask`` (directories keep at least ``u+rwx``; a directory's
    setgid, sticky or setuid bit is dropped, a file's refused); mtimes are kept.

    Limits, each checked the moment it is crossed (declared sizes at each header, written
    bytes at each chunk), so a bomb is stopped before it costs much:

    - ``max_members``, ``max_bytes``: counts of the archive itself; ``max_members`` also
      caps the entries created, the directories the members' paths imply included (a
      few KB of members named ``a/b/c/.../x`` imply hundreds of thousands);
    - ``max_ratio``: file data declared over the archive's size on disk (past
      ``RATIO_FLOOR`` bytes), refusing highly compressible bombs at their headers;
    - ``disk_fraction`` / ``disk_reserve``: when ``disk_fraction`` is given, file data plus
      ``ENTRY_COST`` per created entry may not pass ``DiskBudget.allowed`` of ``dest``'s
      filesystem, the entries not ``disk_fraction`` of its free inodes, and the
      extraction stops when the free space falls under ``disk_reserve`` (other writers,
      block overhead; looked at every 1 MiB written and every 256 entries).

    ``cancel`` is called between members, between 1 MiB chunks of a member and, for a
    gzip archive, after every 64 KiB read from it (a header's name or comment, or the padding
    between members, can be megabytes long); when it returns True the extraction stops with
    ``StagingCancelled``. ``progress`` gets ``(bytes_written, members_so_far)`` at most every
    0.25 s and once at the end.

    Raises ``ArchiveRefused`` (naming the member) for a hostile or broken archive,
    ``ArchiveDoesNotFit`` when it does not fit the disk budget, ``StagingCancelled``, and
    ``StagingError`` when the filesystem fails (disk full, permissions). On error ``dest`` is
    left partly filled: the caller removes it.
    """
    if fmt not in FORMATS:
        raise ArchiveRefused(
            f"unsupported archive format {fmt!r} for {archive} (supported: {', '.join(FORMATS)})"
        )
    try:
        raw = open(archive, "rb")  # noqa: SIM115 - closed below, after the stream wrapping it
    except OSError as exc:
        raise StagingError(f"cannot read archive {archive}: {exc.strerror or exc}") from exc
    try:
        _check_kind(archive, raw, fmt)
        stream: TarStream = raw
        if fmt in ("tar.gz", "tgz"):
            stream = GzipReader(raw)
        stats = extract_stream(
            stream,
            dest,
            label="tar" if fmt == "tar" else "tar.gz",
            source=str(archive),
            max_members=max_members,
            max_bytes=max_bytes,
            umask=umask,
            uid=uid,
            gid=gid,
            max_ratio=max_ratio,
            compressed_size=os.fstat(raw.fileno()).st_size,
            disk_fraction=disk_fraction,
            disk_reserve=disk_reserve,
            cancel=cancel,
            progress=progress,
        )
    finally:
        raw.close()
    return stats


def extract_stream(
    stream: TarStream,
    dest: Path,
    *,
    label: str,
    source: str,
    max_members: int,
    max_bytes: int,
    umask: int,
    uid: int | None = None,
    gid: int | None = None,
    max_ratio: float | None = None,
    compressed_size: int | None = None,
    disk_fraction: float | None = None,
    disk_reserve: int = 0,
    cancel: CancelFn | None = None,
    progress: ProgressFn | None = None,
) -> ExtractStats:
    """Extract an uncompressed tar ``stream`` (read forward only); see ``extract_archive``.

    ``label`` names the format in refusals ("not a valid <label> archive: ...") and ``source``
    names the archive in errors about reading it. ``max_ratio`` applies only with
    ``compressed_size`` (the archive's size on disk).
    """
    started = time.monotonic()
    try:
        root_fd = os.open(dest, _DIR_FLAGS)
    except OSError as exc:
        raise StagingError(f"cannot open staging directory {dest}: {exc.strerror or exc}") from exc
    chown = os.geteuid() == 0 and (uid is not None or gid is not None)
    owner = (uid if uid is not None else -1, gid if gid is not None else -1) if chown else None
    budget = None
    if disk_fraction is not None:
        try:
            budget = DiskBudget.of(root_fd, fraction=disk_fraction, reserve=disk_reserve)
        except OSError as exc:
            os.close(root_fd)
            raise StagingError(f"cannot stat the filesystem of {dest}: {exc}") from exc
    ratio_cap = None
    if max_ratio is not None and compressed_size is not None:
        ratio_cap = (max_ratio, max(compressed_size, 1))
    extractor = _Extractor(
        _LimitedStream(stream, max_bytes + (max_members + 1) * _HEADER_ALLOWANCE),
        root_fd,
        dest,
        label=label,
        source=source,
        max_members=max_members,
        max_bytes=max_bytes,
        umask=umask,
        owner=owner,
        ratio_cap=ratio_cap,
        budget=budget,
        cancel=cancel,
        progress=progress,
    )
    if isinstance(stream, GzipReader):
        # for every 64 KiB it reads: a gzip header's name or the padding between members can
        # be megabytes, skipped before tarfile sees a byte of the tar
        stream.poll = extractor._poll
    try:
        stats = extractor.run()
    finally:
        extractor.close()
    if progress is not None:
        progress(stats.bytes, stats.members)
    log.debug(
        "archive_extracted",
        source=source,
        dest=str(dest),
        members=stats.members,
        bytes=stats.bytes,
        took_ms=round((time.monotonic() - started) * 1000),
    )
    return stats


def sync_tree(dest: Path) -> None:
    """Make everything below ``dest`` durable before the staged tree is renamed into place.

    One ``syncfs(2)`` of the filesystem holding ``dest`` where the C library has it (measured
    ten times cheaper than an fsync per file for a tree of 6000 files, see
    bench/bench_extract.py), otherwise an fsync of every regular file and directory. Either
    way a crash right after the rename never leaves a release with empty or missing files.
    """
    try:
        root_fd = os.open(dest, _DIR_FLAGS)
    except OSError as exc:
        raise StagingError(f"cannot sync {dest}: {exc.strerror or exc}") from exc
    try:
        if not _syncfs(root_fd, dest):
            _sync_dir(root_fd, dest)
    finally:
        os.close(root_fd)


def sync_tree_each(dest: Path) -> None:
    """``sync_tree`` by an fsync of every regular file and directory (the portable way)."""
    try:
        root_fd = os.open(dest, _DIR_FLAGS)
    except OSError as exc:
        raise StagingError(f"cannot sync {dest}: {exc.strerror or exc}") from exc
    try:
        _sync_dir(root_fd, dest)
    finally:
        os.close(root_fd)


def _syncfs(fd: int, where: Path) -> bool:
    """syncfs(2) on ``fd``'s filesystem; False when the C library does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syncfs
    except (OSError, AttributeError):
        return False
    if call(fd) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            return False
        raise StagingError(f"cannot sync {where}: {os.strerror(err)}")
    return True


def _sync_dir(dir_fd: int, where: Path) -> None:
    """fsync the regular files and subdirectories in ``dir_fd`` recursively, then the dir."""
    try:
        with os.scandir(dir_fd) as entries:
            names = [
                (e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                for e in entries
            ]
        for name, is_dir, is_file in names:
            if not (is_dir or is_file):
                continue
            fd = os.open(
                name,
                (_DIR_FLAGS if is_dir else os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC),
                dir_fd=dir_fd,
            )
            try:
                if is_dir:
                    _sync_dir(fd, where / name)
                else:
                    os.fsync(fd)
            finally:
                os.close(fd)
        os.fsync(dir_fd)
    except OSError as exc:
        raise StagingError(f"cannot sync {where}: {exc.strerror or exc}") from exc


class _LimitedStream:
    """Forward-only view of the decompressed tar that bounds how much tarfile may inflate.

    tarfile reads pax and GNU long-name headers whole, and skips data it does not return
    by seeking (which inflates it): both are bounded here, before the memory or time is spent.
    """

    def __init__(self, stream: TarStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._pos = 0
        self._again = b""  # bytes given back (``unread``): the next read returns them first
        self.last: tuple[int, bytes] = (0, b"")  # (position, bytes) of the latest read

    def unread(self, data: bytes) -> None:
        """Give back the bytes the latest read returned (a header checked before tarfile
        parses it reads it again)."""
        self._again = data + self._again
        self._pos -= len(data)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise ArchiveRefused(
                f"archive asks for a header read of {size} bytes: a header declares a negative size"
            )
        if size > _MAX_READ:
            raise ArchiveRefused(
                f"archive asks for a {size}-byte header read "
                f"(over {_MAX_READ}): refusing a header bomb"
            )
        if self._again:
            data, self._again = self._again[:size], self._again[size:]
            if len(data) < size:
                data += self._stream.read(size - len(data))
        else:
            data = self._stream.read(size)
        self.last = (self._pos, data)
        self._pos += len(data)
        self._check(self._pos)
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            pos += self._pos
        elif whence != os.SEEK_SET:
            raise OSError(errno.ESPIPE, "archive stream only seeks forward")
        if pos != self._pos:
            if pos < self._pos:
                raise OSError(errno.ESPIPE, f"archive stream cannot seek back to {pos}")
            self._check(pos)
            if self._again:  # skip what was given back first
                skip = min(pos - self._pos, len(self._again))
                self._again = self._again[skip:]
                self._pos += skip
            if pos != self._pos:  # nothing is given back now: the stream is at _pos
                self._pos = self._stream.seek(pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _check(self, pos: int) -> None:
        if pos > self._limit:
            raise ArchiveRefused(
                f"archive inflates past {self._limit} bytes of tar stream "
                f"(limit from max_bytes and max_members)"
            )


# A pax header's records (POSIX.1-2008: "<length> <keyword>=<value>\n"): checked before
# tarfile parses them. The tarfile of Python 3.11.7 (this machine's; its header parsing
# backtracks, python/cpython#121285, CVE-2024-6232) parses a malformed one in quadratic
# time and memory (a 1 KB archive took a GB), and every later member copies a
# global header's keys twice (200,000 keys: 45 ms a member). Real ones hold a few records:
# GNU tar's path, times and xattrs, git archive's global `comment`.
_PAX_MAX_BYTES = 1024 * 1024
_PAX_MAX_RECORDS = 256
_PAX_GLOBAL_MAX_RECORDS = 32
_PAX_LENGTH = re.compile(rb"[0-9]{1,7} ")


def _check_pax(data: bytes, name: str, *, is_global: bool) -> None:
    """Refuse a pax header that is not a run of well-formed records, or too big."""
    what = f"{'global ' if is_global else ''}pax header {_shown(name)}"
    if len(data) > _PAX_MAX_BYTES:
        raise ArchiveRefused(f"{what} is {len(data)} bytes (limit {_PAX_MAX_BYTES})")
    limit = _PAX_GLOBAL_MAX_RECORDS if is_global else _PAX_MAX_RECORDS
    pos = records = 0
    while pos < len(data):
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break  # padding some writers leave inside the declared size
        found = _PAX_LENGTH.match(data, pos)
        length = int(found.group()[:-1]) if found else 0
        record = data[pos : pos + length]
        key, eq, _ = record[found.end() - pos :].partition(b"=") if found else (b"", b"", b"")
        if (
            not found
            or len(record) != length
            or not record.endswith(b"\n")
            or not eq
            or not key
            or b"\n" in key
        ):
            raise ArchiveRefused(
                f"{what} has a malformed record at byte {pos}: not '<length> <keyword>=<value>'"
            )
        records += 1
        if records > limit:
            raise ArchiveRefused(f"{what} has more than {limit} records")
        pos += length


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile's member header, with its pax headers checked (``_check_pax``) first."""

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        stream = tar.fileobj
        if not isinstance(stream, _LimitedStream):  # pragma: no cover - always one here
            raise ArchiveRefused("pax header read outside the limited stream")
        buf = stream.read(self._block(self.size))  # type: ignore[attr-defined]
        _check_pax(buf[: self.size], self.name, is_global=self.type == tarfile.XGLTYPE)
        stream.unread(buf)
        return super()._proc_pax(tar)  # type: ignore[misc, no-any-return]


class _Loop(Exception):
    """More symlinks followed than the kernel would (a loop, or a chain too long)."""


class _TreeRules:
    """What an archive's members may be, as far as their names, kinds and symlink targets
    tell: the extractor's rules that need no file system, which ``check_members`` applies
    to a member list (publish, before it uploads anything)."""

    def __init__(self) -> None:
        self.kinds: dict[_Parts, str] = {(): _DIR}
        self.links: dict[_Parts, str] = {}  # symlink -> target, checked again at the end
        self.name_bytes = 0  # of member names and symlink targets so far (MAX_NAME_BYTES)

    def _count_name(self, name: str, text: str) -> None:
        """What every path kept in memory costs: bounded whatever the member count."""
        self.name_bytes += len(text)
        if self.name_bytes > MAX_NAME_BYTES:
            raise ArchiveRefused(
                f"archive's member names and symlink targets pass {MAX_NAME_BYTES} bytes "
                f"by member {_shown(name)} (limit MAX_NAME_BYTES)"
            )

    def _member_parts(self, name: str) -> _Parts:
        if "\x00" in name:
            raise ArchiveRefused(f"member {name!r} has a NUL byte in its name")
        if name.startswith("/"):
            raise ArchiveRefused(f"member {name!r} has an absolute path")
        self._count_name(name, name)
        # Interned: the paths below one directory share its components' strings (4 KB
        # names 128 deep kept ~11 KB a member, a few-MB archive some GB, each a copy)
        parts = tuple(sys.intern(p) for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise ArchiveRefused(f"member {name!r} has a '..' component")
        _check_length(name, parts, what="member")
        if len(parts) > MAX_PATH_DEPTH:
            raise ArchiveRefused(
                f"member {_shown(name)} is {len(parts)} path components deep "
                f"(limit {MAX_PATH_DEPTH} components)"
            )
        return parts

    def _check_reserved(self, name: str, parts: _Parts, *, is_dir: bool) -> None:
        """Refuse what the release engine writes, and a ``.watcher`` that is no directory."""
        if parts[0] == _RESERVED[0]:
            if parts[:2] == _RESERVED:
                raise ArchiveRefused(
                    f"member {name!r} is reserved: the release engine writes {'/'.join(_RESERVED)}"
                )
            if len(parts) == 1 and not is_dir:
                raise ArchiveRefused(
                    f"member {name!r} must be a directory ({_RESERVED[0]} "
                    f"holds the engine's release.json and the hooks)"
                )

    def _known_prefix(self, parts: _Parts) -> int:
        """Length of the longest proper prefix of ``parts`` already in ``kinds`` (0: none).

        Every path in ``kinds`` has all its proper prefixes there as directories, so only
        this one prefix can be something other than a directory.
        """
        i = len(parts) - 1
        while i > 0 and parts[:i] not in self.kinds:
            i -= 1
        return i

    def _check_slot(self, name: str, parts: _Parts, *, is_dir: bool) -> None:
        """Refuse a path through a non-directory, or one that replaces an earlier member."""
        known = self._known_prefix(parts)
        kind = self.kinds[parts[:known]]
        if kind != _DIR:
            where = "/".join(parts[:known])
            raise ArchiveRefused(f"member {name!r} goes through {kind} {where!r}")
        earlier = self.kinds.get(parts)
        if earlier is None or (earlier == _DIR and is_dir):
            return
        if earlier == _DIR:
            raise ArchiveRefused(f"member {name!r} would replace an earlier directory")
        if is_dir:
            raise ArchiveRefused(f"member {name!r} (directory) would replace an earlier {earlier}")
        raise ArchiveRefused(
            f"member {name!r} is a duplicate of an earlier {earlier} (GNU tar stores a "
            "path twice when its command line names it twice: a directory and a file in it)"
        )

    def _check_symlink(self, name: str, parts: _Parts, target: str) -> None:
        """Refuse a symlink target that is empty, absolute, too long or climbs out by itself
        (through other symlinks: ``_resolve``, once every member is known)."""
        if not target or "\x00" in target:
            raise ArchiveRefused(f"symlink {name!r} has an empty or invalid target {target!r}")
        self._count_name(name, target)
        if target.startswith("/"):
            raise ArchiveRefused(
                f"symlink {name!r} -> {target!r} is absolute: it leaves the release"
            )
        _check_length(target, tuple(p for p in target.split("/") if p), what="symlink target")
        steps = sum(1 for p in target.split("/") if p not in ("", "."))
        if steps > MAX_PATH_DEPTH:
            raise ArchiveRefused(
                f"symlink {name!r} -> {_shown(target)} has {steps} path components "
                f"(limit {MAX_PATH_DEPTH} components)"
            )
        depth = len(parts) - 1
        for p in target.split("/"):
            depth += -1 if p == ".." else (0 if p in ("", ".") else 1)
            if depth < 0:
                raise ArchiveRefused(f"symlink {name!r} -> {target!r} leaves the release")

    def _check_links(self) -> None:
        """Resolve every symlink through the others, now that every member is known. Each
        symlink is resolved once (``_resolve``): a chain of symlinks that each point through
        the one before used to be walked again for every link into it, hours of CPU for a
        1 MB archive."""
        resolved: dict[_Parts, tuple[_Parts, str | None, int]] = {}
        paths: dict[_Parts, _Parts] = {}
        for parts, target in self.links.items():
            self._checking_link()
            try:
                self._resolve(parts, resolved, paths, 0)
            except _Loop:
                raise ArchiveRefused(f"symlink {'/'.join(parts)!r} -> {target!r} loops") from None

    def _checking_link(self) -> None:
        """Called before each symlink is resolved (the extractor checks for a cancel)."""

    def _resolve(
        self,
        parts: _Parts,
        resolved: dict[_Parts, tuple[_Parts, str | None, int]],
        paths: dict[_Parts, _Parts],
        depth: int,
    ) -> tuple[_Parts, str | None, int]:
        """Where the symlink ``parts`` leads, like the kernel would resolve it through the
        archive's other symlinks: the directory (``()`` when it leads to no directory: what
        follows is never looked up), its kind (None: nothing of the archive there) and the
        symlinks followed. Refuses a target that leaves the release, loops, or uses '..'
        after something that is not a directory. Each directory path it keeps is one object
        (``paths``) for every link that leads there: 200,000 links into one deep directory
        kept a copy each."""
        done = resolved.get(parts)
        if done is not None:
            return done
        target = self.links[parts]
        if depth > _MAX_LINK_HOPS:
            raise _Loop
        comps = [sys.intern(p) for p in target.split("/") if p not in ("", ".")]
        cur: _Parts = parts[:-1]
        kind: str | None = _DIR
        last: _Parts = cur  # the path looked up last (for a message)
        hops = 0
        for i, comp in enumerate(comps):
            if kind != _DIR:
                # A file, or nothing of the archive: the kernel goes no further than here,
                # so no symlink of the archive is reached; only a '..' would matter. What
                # follows is never looked up, so it is not kept.
                if ".." in comps[i:]:
                    raise ArchiveRefused(
                        f"symlink {'/'.join(parts)!r} -> {target!r} uses '..' after "
                        f"{'/'.join(last)!r}, which is not a directory of the release"
                    )
                break
            if comp == "..":
                if not cur:
                    raise ArchiveRefused(
                        f"symlink {'/'.join(parts)!r} -> {target!r} leaves the release "
                        "through other symlinks"
                    )
                cur = cur[:-1]
                continue
            last = (*cur, comp)
            kind = self.kinds.get(last)
            if kind == _SYMLINK:
                cur, kind, followed = self._resolve(last, resolved, paths, depth + 1)
                hops += followed + 1
                if hops > _MAX_LINK_HOPS:
                    raise _Loop
                continue
            cur = last
        found = (paths.setdefault(cur, cur) if kind == _DIR else (), kind, hops)
        resolved[parts] = found
        return found


def check_members(members: Iterable[tuple[str, str, str]]) -> None:
    """Apply the extractor's rules on names, reserved paths, slots and symlinks (resolved
    through each other: loops, ``..`` after a non-directory, leaving the release) to the
    members of an archive, in order: ``(name, kind, symlink target)`` with kind
    ``"directory"``, ``"file"`` or ``"symlink"``. Raises ``ArchiveRefused`` naming the
    member, with the message a host's extraction would give.
    """
    tree = _TreeRules()
    for name, kind, target in members:
        parts = tree._member_parts(name)
        is_dir = kind == _DIR
        if not parts:
            if is_dir:
                continue
            raise ArchiveRefused(f"member {name!r} has an empty name")
        tree._check_reserved(name, parts, is_dir=is_dir)
        tree._check_slot(name, parts, is_dir=is_dir)
        for i in range(tree._known_prefix(parts) + 1, len(parts)):
            tree.kinds[parts[:i]] = _DIR
        if kind == _SYMLINK:
            tree._check_symlink(name, parts, target)
            tree.links[parts] = target
        tree.kinds[parts] = kind
    tree._check_links()


class _Extractor(_TreeRules):
    """One extraction: walks the members in order, checks each, creates it under ``dest``."""

    def __init__(
        self,
        stream: _LimitedStream,
        root_fd: int,
        dest: Path,
        *,
        label: str,
        source: str,
        max_members: int,
        max_bytes: int,
        umask: int,
        owner: tuple[int, int] | None,
        ratio_cap: tuple[float, int] | None = None,
        budget: DiskBudget | None = None,
        cancel: CancelFn | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self.stream = stream
        self.ratio_cap = ratio_cap  # (max_ratio, compressed size of the archive)
        self.budget = budget
        self.cancel = cancel
        self.progress = progress
        self.next_progress = time.monotonic() + _PROGRESS_EVERY
        self.next_free_check = _FREE_CHECK_EVERY
        self.root_fd = root_fd
        self.dest = dest
        self.label = label
        self.source = source
        self.max_members = max_members
        self.max_bytes = max_bytes
        self.umask = umask
        self.owner = owner
        super().__init__()
        self.dir_meta: dict[_Parts, tuple[int, int | None]] = {}  # dir -> (mode, mtime)
        self.fds: OrderedDict[_Parts, int] = OrderedDict()
        self.members = 0
        self.entries = 0  # created on disk: members and the directories they imply
        self.next_free_entries = _FREE_CHECK_ENTRIES
        self.declared = 0
        self.written = 0
        self.last: str | None = None  # the last member read, for "after member" in errors

    # -- the walk -------------------------------------------------------------------------

    def run(self) -> ExtractStats:
        with self._reading():
            tar = tarfile.open(  # noqa: SIM115
                fileobj=cast(IO[bytes], self.stream), mode="r:", tarinfo=_CheckedTarInfo
            )
        while True:
            self._poll()
            with self._reading():
                member = tar.next()
            if member is None:
                break
            tar.members.clear()  # type: ignore[attr-defined]  # kept by tarfile, unused here
            self.members += 1
            if self.members > self.max_members:
                raise ArchiveRefused(
                    f"archive has more than {self.max_members} members "
                    f"(limit max_members); refused at {member.name!r}"
                )
            self.last = member.name
            self._trim_fds()
            self._extract_member(member)
        with self._reading():
            self._check_end(tar.offset)
        if self.members == 0:
            raise ArchiveRefused(f"not a valid {self.label} archive: it has no members")
        self._check_links()
        self._finish_dirs()
        return ExtractStats(members=self.members, bytes=self.written)

    def _extract_member(self, m: tarfile.TarInfo) -> None:
        name = m.name
        parts = self._member_parts(name)
        if m.size < 0:
            # tarfile would seek back by it to find the next header
            raise ArchiveRefused(f"member {_shown(name)} declares a negative size ({m.size})")
        self.declared += m.size
        if self.declared > self.max_bytes:
            raise ArchiveRefused(
                f"archive declares more than {self.max_bytes} bytes "
                f"(limit max_bytes) at member {name!r}"
            )
        if self.ratio_cap is not None:
            max_ratio, packed = self.ratio_cap
            if over_ratio(self.declared, packed, max_ratio):
                raise ArchiveRefused(
                    f"archive declares {self.declared} bytes by member {name!r} from "
                    f"{packed} compressed bytes: a compression ratio over {max_ratio:g} "
                    f"(limit max_ratio), refusing a bomb"
                )
        if self.budget is not None and self.declared > self.budget.allowed:
            raise ArchiveDoesNotFit(
                f"archive declares {self.declared} bytes by member {name!r}: it does not "
                f"fit on the filesystem of {self.dest} ({self.budget.describe()})"
            )
        if m.ischr() or m.isblk():
            raise ArchiveRefused(f"member {name!r} is a device file")
        if m.isfifo():
            raise ArchiveRefused(f"member {name!r} is a FIFO")
        if m.issparse():
            raise ArchiveRefused(
                f"member {name!r} is a sparse file (not supported): pack the tree without "
                "sparse files (GNU tar: no --sparse/-S; bsdtar, macOS's tar: --no-read-sparse)"
            )
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            raise ArchiveRefused(f"member {name!r} has unsupported type {m.type!r}")
        if m.mode & _SPECIAL_BITS and not m.isdir():
            # A directory's are dropped with every bit outside 0o777 (a tree packed in a
            # setgid build directory carries them; they grant nothing). A file's are not:
            # stripped, a binary that needs them would fail in ways nobody expects.
            raise ArchiveRefused(
                f"member {name!r} has setuid/setgid/sticky bits (mode {m.mode:o}); a release "
                "holds none: pack it without them (GNU tar: --mode=ug-s,o-t)"
            )
        if not parts:
            if m.isdir():
                return  # "./": the release root itself, which the caller created
            raise ArchiveRefused(f"member {name!r} has an empty name")
        self._check_reserved(name, parts, is_dir=m.isdir())
        self._check_slot(name, parts, is_dir=m.isdir())
        parent_fd = self._make_parents(name, parts)
        mtime = _mtime(m)
        if m.isdir():
            self._make_dir(name, parts, parent_fd, m.mode, mtime)
        elif m.issym():
            self._make_symlink(name, parts, parent_fd, m.linkname, mtime)
        elif m.islnk():
            self._make_hardlink(name, parts, parent_fd, m.linkname)
        else:
            self._make_file(name, parts, parent_fd, m, mtime)

    # -- creating members -----------------------------------------------------------------

    def _make_parents(self, name: str, parts: _Parts) -> int:
        """Create missing parent directories (u+rwx, mode set at the end); the parent's fd."""
        for i in range(self._known_prefix(parts) + 1, len(parts)):
            sub = parts[:i]
            self._charge_entry(name)
            with self._writing(name):
                os.mkdir(sub[-1], 0o700, dir_fd=self._dir_fd(sub[:-1]))
            self.kinds[sub] = _DIR
            self.dir_meta[sub] = (0o777, None)
        return self._dir_fd(parts[:-1])

    def _make_dir(
        self, name: str, parts: _Parts, parent_fd: int, mode: int, mtime: int | None
    ) -> None:
        if parts not in self.kinds:
            self._charge_entry(name)
            with self._writing(name):
                os.mkdir(parts[-1], 0o700, dir_fd=parent_fd)
            self.kinds[parts] = _DIR
        self.dir_meta[parts] = (mode, mtime)  # applied by _finish_dirs, deepest first

    def _make_symlink(
        self, name: str, parts: _Parts, parent_fd: int, target: str, mtime: int | None
    ) -> None:
        self._check_symlink(name, parts, target)
        self._charge_entry(name)
        with self._writing(name):
            os.symlink(target, parts[-1], dir_fd=parent_fd)
            if self.owner is not None:
                os.chown(parts[-1], *self.owner, dir_fd=parent_fd, follow_symlinks=False)
            if mtime is not None:
                os.utime(parts[-1], ns=(mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)
        self.kinds[parts] = _SYMLINK
        self.links[parts] = target

    def _make_hardlink(self, name: str, parts: _Parts, parent_fd: int, target: str) -> None:
        if target.startswith("/"):
            raise ArchiveRefused(
                f"hardlink {name!r} -> {target!r} is absolute: it leaves the release"
            )
        tparts = tuple(p for p in target.split("/") if p not in ("", "."))
        if ".." in tparts:
            raise ArchiveRefused(
                f"hardlink {name!r} -> {target!r} has a '..' component: it leaves the release"
            )
        if not tparts or self.kinds.get(tparts) != _FILE:
            raise ArchiveRefused(
                f"hardlink {name!r} -> {target!r}: the target is not an "
                f"earlier regular file of the archive"
            )
        self._charge_entry(name)
        try:
            with self._writing(name):
                src_fd = self._dir_fd(tparts[:-1])
                os.link(
                    tparts[-1],
                    parts[-1],
                    src_dir_fd=src_fd,
                    dst_dir_fd=parent_fd,
                    follow_symlinks=False,
                )
        except StagingError as exc:
            if getattr(exc.__cause__, "errno", None) == errno.EMLINK:
                # The archive's doing, not this host's: tens of thousands of links to one
                # file (ext4 takes 65,000). Refused, so remembered, not fetched again.
                raise ArchiveRefused(
                    f"hardlink {name!r} -> {target!r}: more links to one file than the "
                    f"filesystem of {self.dest} takes"
                ) from None
            raise
        self.kinds[parts] = _FILE

    def _make_file(
        self, name: str, parts: _Parts, parent_fd: int, m: tarfile.TarInfo, mtime: int | None
    ) -> None:
        self._charge_entry(name)
        with self._writing(name):
            fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=parent_fd)
        self.kinds[parts] = _FILE
        try:
            with self._reading():
                self.stream.seek(m.offset_data)
            remaining = m.size
            while remaining > 0:
                with self._reading():
                    chunk = self.stream.read(min(_CHUNK, remaining))
                if not chunk:
                    raise ArchiveRefused(
                        f"not a valid {self.label} archive: data of member {name!r} is truncated"
                    )
                remaining -= len(chunk)
                self.written += len(chunk)
                self._check_written(name)  # a header can lie; count what is written
                with self._writing(name):
                    _write_all(fd, chunk)
                self._poll()
            with self._writing(name):
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
                os.fchmod(fd, m.mode & 0o777 & ~self.umask)
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    def _charge_entry(self, name: str) -> None:
        """Count one entry about to be created for member ``name`` (itself, or a directory
        its path implies) against ``max_members`` and the disk budget."""
        self.entries += 1
        if self.entries > self.max_members:
            raise ArchiveRefused(
                f"archive creates more than {self.max_members} entries, its members and the "
                f"directories their paths imply (limit max_members); refused at {_shown(name)}"
            )
        budget = self.budget
        if budget is None:
            return
        if budget.inodes_allowed is not None and self.entries > budget.inodes_allowed:
            raise ArchiveDoesNotFit(
                f"archive creates more than {budget.inodes_allowed} entries by member "
                f"{_shown(name)}: they do not fit in the free inodes of the filesystem of "
                f"{self.dest} ({budget.describe_inodes()})"
            )
        self._check_written(name)
        if self.entries >= self.next_free_entries:
            self.next_free_entries = self.entries + _FREE_CHECK_ENTRIES
            self._check_free(name)

    def _check_written(self, name: str) -> None:
        if self.written > self.max_bytes:
            raise ArchiveRefused(
                f"archive holds more than {self.max_bytes} bytes "
                f"(limit max_bytes) at member {name!r}"
            )
        budget = self.budget
        if budget is None:
            return
        used = self.written + self.entries * ENTRY_COST
        if used > budget.allowed:
            raise ArchiveDoesNotFit(
                f"archive wrote {self.written} bytes and {self.entries} entries (counted "
                f"{ENTRY_COST} bytes each) by member {_shown(name)}: it does not fit on the "
                f"filesystem of {self.dest} ({budget.describe()})"
            )
        if self.written >= self.next_free_check:
            self.next_free_check = self.written + _FREE_CHECK_EVERY
            self._check_free(name)

    def _check_free(self, name: str) -> None:
        """What other writers (and block overhead) left: stop under ``disk_reserve``."""
        budget = self.budget
        assert budget is not None
        with self._writing(name):
            st = os.fstatvfs(self.root_fd)
        free = st.f_bavail * st.f_frsize
        if free < budget.reserve:
            raise ArchiveDoesNotFit(
                f"free space on the filesystem of {self.dest} fell to {free} bytes, "
                f"under disk_reserve {budget.reserve}, after {self.written} bytes and "
                f"{self.entries} entries at member {_shown(name)}"
            )

    def _checking_link(self) -> None:
        self._poll()

    def _poll(self) -> None:
        """Stop when the caller cancels; report progress every ``_PROGRESS_EVERY`` seconds."""
        if self.cancel is not None and self.cancel():
            raise StagingCancelled(
                f"extraction of {self.source} into {self.dest} cancelled after "
                f"{self.members} members and {self.written} bytes"
            )
        if self.progress is not None:
            now = time.monotonic()
            if now >= self.next_progress:
                self.next_progress = now + _PROGRESS_EVERY
                self.progress(self.written, self.members)

    def _finish_dirs(self) -> None:
        """Apply directory owners, modes (at least u+rwx) and mtimes, each directory before
        the one above it. In reverse path order, not by depth: a directory then comes right
        after the ones below it, so the descriptors opened for them are still cached; by
        depth, every deep chain was opened from the root again for each of its levels
        (1.7 KB of 128-deep chains: 1.3 million opens, 5.6 s)."""
        for parts in sorted(self.dir_meta, reverse=True):
            mode, mtime = self.dir_meta[parts]
            self._trim_fds()
            with self._writing("/".join(parts)):
                fd = self._dir_fd(parts)
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
                os.fchmod(fd, (mode & 0o777 & ~self.umask) | stat.S_IRWXU)
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))

    def _dir_fd(self, parts: _Parts) -> int:
        """An fd for the extracted directory ``parts``, opened component by component.

        Opened from the deepest directory above it already cached; every directory opened on
        the way is cached too (least recently used dropped first), so siblings deep in one
        tree cost one open each. The cache is trimmed only between members (``_trim_fds``),
        so every fd handed out stays open while the member that asked for it is created.
        """
        if not parts:
            return self.root_fd
        fd = self.fds.get(parts)
        if fd is not None:
            self.fds.move_to_end(parts)
            return fd
        i = len(parts) - 1
        while i > 0 and parts[:i] not in self.fds:
            i -= 1
        if i:
            fd = self.fds[parts[:i]]
            self.fds.move_to_end(parts[:i])
        else:
            fd = self.root_fd
        for j in range(i, len(parts)):
            fd = os.open(parts[j], _DIR_FLAGS, dir_fd=fd)
            self.fds[parts[: j + 1]] = fd
        return fd

    def _trim_fds(self) -> None:
        while len(self.fds) > _FD_CACHE:
            os.close(self.fds.popitem(last=False)[1])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.root_fd)

    # -- checks over the whole archive ----------------------------------------------------

    def _check_end(self, offset: int) -> None:
        """After tarfile stops at ``offset``, only zero blocks may follow.

        tarfile ends the archive silently at a corrupt header (e.g. after a member whose
        header lies about its size) or at a tar cut on a member boundary; both are refused
        here. Reading to the end also verifies the compression's own checksum and length.
        """
        pos = self.stream.tell()
        tail = b""
        if pos > offset:  # tarfile already read (part of) the block it stopped at
            start, data = self.stream.last
            # start > offset: the block cannot be seen again, so it counts as corrupt
            tail = b"\x01" if start > offset else data[offset - start : pos - start]
        zeros = 0
        while True:
            if tail.count(0) != len(tail):
                where = f" after member {self.last!r}" if self.last else ""
                raise ArchiveRefused(
                    f"not a valid {self.label} archive: corrupt tar header "
                    f"or trailing data at offset {offset}{where}"
                )
            zeros += len(tail)
            if zeros > _MAX_READ:
                raise ArchiveRefused(
                    f"not a valid {self.label} archive: more than {_MAX_READ} bytes of "
                    f"padding after the end of the archive"
                )
            tail = self.stream.read(_CHUNK)
            if not tail:
                break
        if zeros < tarfile.BLOCKSIZE and self.members:
            raise ArchiveRefused(
                f"not a valid {self.label} archive: truncated, no end-of-"
                f"archive marker after member {self.last!r}"
            )

    # -- error translation ----------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Broken input -> ArchiveRefused; failing to read the file -> StagingError."""
        try:
            yield
        except ArchiveRefused:
            raise
        except RecursionError as exc:
            # tarfile reads a GNU long-name or pax header by reading the header it applies
            # to recursively: thousands of them chained up overflow the stack
            where = f" after member {self.last!r}" if self.last else ""
            raise ArchiveRefused(
                f"not a valid {self.label} archive: its headers nest too deep (a chain of "
                f"GNU long-name or pax headers{where})"
            ) from exc
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            where = f" (after member {self.last!r})" if self.last else ""
            raise ArchiveRefused(
                f"not a valid {self.label} archive: {_reason(exc)}{where}"
            ) from exc
        except OSError as exc:
            raise StagingError(f"cannot read archive {self.source}: {exc.strerror or exc}") from exc

    @contextmanager
    def _writing(self, member: str) -> Iterator[None]:
        """Filesystem failures -> StagingError naming the member and the destination."""
        try:
            yield
        except OSError as exc:
            if exc.errno in _FULL_DISK:
                what = "disk full"
                with contextlib.suppress(OSError):
                    st = os.fstatvfs(self.root_fd)
                    if st.f_files > 0 and st.f_favail == 0:
                        what = "no free inode left"  # ENOSPC too, with blocks to spare
                raise StagingError(
                    f"{what} while extracting {member!r} into {self.dest} "
                    f"({self.entries} entries created): "
                    f"{exc.strerror} (errno {errno.errorcode[exc.errno]})"
                ) from exc
            raise StagingError(
                f"cannot extract {member!r} into {self.dest}: {exc.strerror or exc}"
            ) from exc


def _check_length(name: str, parts: _Parts, *, what: str) -> None:
    if len(os.fsencode(name)) > _PATH_MAX:
        raise ArchiveRefused(f"{what} {name[:80]!r}... is longer than {_PATH_MAX} bytes")
    for p in parts:
        if len(os.fsencode(p)) > _NAME_MAX:
            raise ArchiveRefused(f"{what} {name!r} has a component longer than {_NAME_MAX} bytes")


def _shown(name: str) -> str:
    """``name`` quoted for a message; a very long one cut to its first 120 characters."""
    return repr(name) if len(name) <= 120 else f"{name[:120]!r}..."


def _mtime(m: tarfile.TarInfo) -> int | None:
    try:
        ns = int(m.mtime * 1_000_000_000)
    except (TypeError, ValueError, OverflowError):
        return None
    return ns if -(2**62) < ns < 2**62 else None


#: The first bytes of files that are often uploaded in place of a tar.gz or a tar.
_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "zip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
)
_SAID = {"gzip": "gzip-compressed", "tar": "an uncompressed tar", "xz": "an xz file"}


def _check_kind(archive: Path, raw: IO[bytes], fmt: str) -> None:
    """Refuse at once, saying what it is, a file that plainly is not of ``fmt`` (a zip, an
    xz, a tar.gz where a tar was declared...); anything else is left to the reader."""
    expected = "tar" if fmt == "tar" else "gzip"
    try:
        head = os.pread(raw.fileno(), 512, 0)
    except OSError as exc:
        raise StagingError(f"cannot read archive {archive}: {exc.strerror or exc}") from exc
    if head[257:262] == b"ustar":  # first: a tar's first bytes are its first member's name
        kind: str | None = "tar"
    elif head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        kind = "bzip2"
    else:
        kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
    if kind is None or kind == expected:
        return
    said = _SAID.get(kind, f"a {kind} file")
    if kind in ("tar", "gzip"):
        hint = f"its artifact record's format should be {'tar' if kind == 'tar' else 'tar.gz'}"
    else:
        hint = f"only {', '.join(FORMATS)} are accepted"
    raise ArchiveRefused(f"not a valid {fmt} archive: {archive} is {said} ({hint})")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, tarfile.TarError) else f"{type(exc).__name__}: {text}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
