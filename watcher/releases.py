"""One app's directory on this host: staging, flipping `current`, recovery, holds, pins, prune."""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import stat
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from watcher.archive import RULES, CancelFn, ProgressFn, extract_archive, sync_tree
from watcher.errors import (
    ArchiveDoesNotFit,
    ArchiveRefused,
    ArtifactIntegrityError,
    FlipError,
    LockTimeout,
    PayloadError,
    ReleaseError,
    ReleaseNotFound,
    StagingCancelled,
    StagingError,
    WatcherError,
)
from watcher.fsutil import (
    TMP_PREFIX,
    AppLock,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    sha256_of,
)
from watcher.ids import shown
from watcher.log import get_logger
from watcher.records import (
    SHA256_RE,
    ArtifactRecord,
    CurrentRecord,
    check_release,
    iso,
    parse_iso,
    utcnow,
)

if TYPE_CHECKING:
    from watcher.artifacts import ArtifactCache
    from watcher.config import AppConfig

RELEASE_JSON = Path(".watcher") / "release.json"
RELEASE_JSON_VERSION = 1
#: Largest ``.watcher/release.json`` read: the engine writes a few hundred bytes, and the app's
#: user (who owns the release tree) must not make the daemon read without end.
RELEASE_JSON_MAX_BYTES = 256 * 1024
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_RMTREE_OPEN_DIRS = 64  # directories ``_rmtree`` holds open at once, however deep the tree
#: Refused artifacts remembered per app (the oldest are forgotten first).
REFUSED_KEEP = 64
#: A download that did not verify (twice) is tried again after this long: S3 may be fixed.
INTEGRITY_REFUSAL_TTL = 3600.0
_REFUSED_LOCK = threading.Lock()  # one writer of refused.json at a time in this process


class AppLayout:
    """The paths of ``<root>/<app>/`` (DESIGN.md section 2)."""

    def __init__(self, app_dir: str | os.PathLike[str]) -> None:
        self.app_dir = Path(app_dir)
        self.releases_dir = self.app_dir / "releases"
        self.current = self.app_dir / "current"
        self.current_backup = self.app_dir / "current_backup"
        self.shared_dir = self.app_dir / "shared"
        self.artifacts_dir = self.app_dir / "artifacts"
        self.prefetched_dir = self.app_dir / "prefetched"
        self.state_dir = self.app_dir / ".state"
        self.lock_file = self.state_dir / "lock"
        self.holds_file = self.state_dir / "holds.json"
        self.pins_file = self.state_dir / "pins.json"
        self.previous_file = self.state_dir / "previous"
        self.post_release_dir = self.state_dir / "post_release"
        self.refused_file = self.state_dir / "refused.json"

    @classmethod
    def for_app(cls, app: AppConfig) -> AppLayout:
        return cls(app.app_dir)

    def release_dir(self, release: str) -> Path:
        return self.releases_dir / check_release(release)

    def link_target(self, release: str) -> str:
        """What ``current`` holds for ``release``: a path relative to the app directory."""
        return f"releases/{check_release(release)}"

    def ensure(self) -> None:
        """Create the directories of the layout that are missing."""
        for d in (
            self.app_dir,
            self.releases_dir,
            self.shared_dir,
            self.artifacts_dir,
            self.prefetched_dir,
            self.state_dir,
            self.post_release_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)


def untrusted_dir(app_dir: str | os.PathLike[str]) -> list[str]:
    """Why a user other than root and this process's could redirect the daemon's writes
    under ``app_dir`` ([] when none can): the app directory or one the daemon keeps in it
    (``releases/``, ``.state/``, ``shared/``, ...), or a directory or symlink met on the way
    to one of them (each symlink followed in turn), owned by such a user or writable by one
    (others; a group other than root's and this process's; a POSIX ACL entry), where a
    sticky bit (/tmp) makes a directory above the app's fine, not the app's own. Such a
    user may rename ``releases/`` or ``.state/`` away and put a symlink or a directory of
    its own there; the daemon, as root, would chown, chmod and write through it (the
    attacker review: a staged tree's chown turned a root directory over to the app's
    user). The app's user writes in its shared paths, never in these."""
    lay = AppLayout(_absolute(app_dir))
    involved: dict[Path, bool] = {}
    for kept in (
        lay.app_dir,
        lay.releases_dir,
        lay.prefetched_dir,
        lay.artifacts_dir,
        lay.state_dir,
        lay.shared_dir,
    ):
        _involved(kept, involved)
    return _untrusted(involved)


def untrusted_path(path: str | os.PathLike[str]) -> list[str]:
    """Why a user other than root and this process's could change what ``path`` runs (a
    hook the daemon starts as root), [] if none: ``untrusted_dir``'s rules, the file itself
    taken as the app directory is (no sticky bit makes it fine)."""
    involved: dict[Path, bool] = {}
    _involved(_absolute(path), involved)
    return _untrusted(involved)


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path) if Path(path).is_absolute() else Path.cwd() / path


def _involved(path: Path, into: dict[Path, bool], hops: int = 0) -> None:
    """Each path met resolving ``path`` (absolute), one component and one symlink at a
    time, into ``into``: True for what ``path`` names in the end (``path`` itself, or the
    last target of its symlinks), False for a directory or symlink above it. An owner of a
    symlink met in between, or of the directory that holds it, could point it elsewhere."""
    parts = path.parts
    here = Path(parts[0])
    into.setdefault(here, False)
    for i, name in enumerate(parts[1:], start=1):
        last = i == len(parts) - 1
        step = here / name
        into[step] = into.get(step, False) or last
        try:
            is_link = step.is_symlink()
        except OSError:
            return
        if not is_link:
            if not step.exists():
                return  # nothing further yet (made by the daemon, as root)
            here = step
            continue
        if hops >= 40:  # as the kernel's ELOOP
            return
        try:
            target = step.readlink()
        except OSError:
            return
        rest = parts[i + 1 :]
        _involved(
            Path(here, target, *rest) if not target.is_absolute() else Path(target, *rest),
            into,
            hops + 1,
        )
        return


def _untrusted(involved: dict[Path, bool]) -> list[str]:
    trusted, groups = {0, os.geteuid()}, {0, os.getegid()}
    problems: list[str] = []
    for here, final in involved.items():
        try:
            st = here.lstat()
        except (FileNotFoundError, NotADirectoryError):
            continue  # made by the daemon, as root, when it starts (or a file in the way:
            # said by check-config's own check)
        except OSError as exc:
            problems.append(f"{here} cannot be looked at: {exc.strerror or exc}")
            continue
        if st.st_uid not in trusted:
            link = "a symlink " if stat.S_ISLNK(st.st_mode) else ""
            problems.append(f"{here} is {link}owned by {_user_name(st.st_uid)}")
            continue
        if stat.S_ISLNK(st.st_mode) or (st.st_mode & stat.S_ISVTX and not final):
            continue  # a symlink's own mode means nothing; a sticky /tmp above is fine
        if st.st_mode & 0o002:
            problems.append(
                f"{here} is mode {stat.S_IMODE(st.st_mode):04o}: writable by every user"
            )
        elif st.st_mode & 0o020 and st.st_gid not in groups:
            who = f"group {_group_name(st.st_gid)}"
            problems.append(f"{here} is mode {stat.S_IMODE(st.st_mode):04o}: writable by {who}")
        else:
            problems += [
                f"{here} has a POSIX ACL entry: {w}" for w in _acl_writers(here, trusted, groups)
            ]
    return problems


# POSIX ACL xattr (linux/posix_acl_xattr.h): a u32 version, then (u16 tag, u16 perm, u32 id)
ACL_TAG_USER, ACL_TAG_GROUP, ACL_PERM_WRITE = 0x02, 0x08, 0x02


def _acl_writers(path: Path, users: set[int], groups: set[int]) -> list[str]:
    """Who a POSIX ACL of ``path`` lets write besides ``users`` and ``groups`` (``setfacl
    -m u:www-data:rwx``: the mode then shows only the mask as its group bits)."""
    try:
        raw = os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    except OSError:
        return []  # none (ENODATA), or a filesystem without ACLs
    writers = []
    for off in range(4, len(raw) - 7, 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, off)
        if not perm & ACL_PERM_WRITE:
            continue
        if tag == ACL_TAG_USER and ident not in users:
            writers.append(f"user {_user_name(ident)} may write")
        elif tag == ACL_TAG_GROUP and ident not in groups:
            writers.append(f"group {_group_name(ident)} may write")
    return writers


def _set_dir_owner(tree: Path, mode: int, uid: int | None, gid: int | None) -> None:
    """chmod and chown ``tree`` through a descriptor opened without following a symlink:
    a symlink put in its place fails the step (ELOOP) instead of handing its target over
    (the directories above are checked at start: ``untrusted_dir``)."""
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
    finally:
        os.close(fd)


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


@dataclass(frozen=True)
class ReleaseInfo:
    """One directory under ``releases/`` as ``watcherctl releases`` shows it."""

    release: str
    complete: bool
    artifact: str = ""
    sha256: str = ""
    deploy_id: str = ""
    staged_at: str = ""
    size_bytes: int = 0
    format: str = ""
    is_current: bool = False
    is_previous: bool = False
    is_backup: bool = False
    pinned_until: str | None = None
    post_release_done: bool = False
    kept_for_resume: bool = False  # aborted staging whose post_release never ran

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# An archive refused for going over one of the app's limits says "(limit max_...)": raising
# the limit lets it through; any other refusal is of what the archive holds.
_OVER_A_SETTING = re.compile(r"\(limit (from )?max_")


@dataclass(frozen=True)
class Refusal:
    """An artifact this host refused, remembered by sha256 in ``.state/refused.json``.

    ``kind`` is ``"archive"`` (the extractor refused its content: remembered while the
    app's archive limits and the extractor's rules, ``archive.RULES``, stay the same) or
    ``"integrity"`` (size or sha256 did not match twice: remembered for
    ``INTEGRITY_REFUSAL_TTL``, and only for a record naming the same ``source``, the url
    and size that served other bytes: a record of any id may claim any sha256, and one
    that claims a good build's with another size or url must not make hosts refuse that
    build).
    """

    sha256: str
    artifact: str
    kind: str
    reason: str
    at: str
    limits: str = ""
    source: str = ""

    def error(self, record: ArtifactRecord, memory: Path) -> WatcherError:
        """The error a new attempt at the same sha256 gets at once: the original reason,
        and, where a setting or time lets it pass, how (``memory``: the refused.json file)."""
        if self.kind == "integrity":
            until = "for an hour"
        elif _OVER_A_SETTING.search(self.reason):
            until = "until the app's max_members/max_bytes/max_ratio change"
        else:  # what the archive holds (a path out of the release, a device file, ...)
            until = ""
        refused = f"artifact {record.id} (sha256 {self.sha256[:12]}) was refused on this host"
        if until:
            message = (
                f"{refused} at {self.at}; not trying again {until} (or remove it from "
                f"{memory}): {self.reason}"
            )
        else:
            message = (
                f"{refused} at {self.at} for what it holds, which no setting allows: "
                f"{self.reason}; publish a fixed build (to have this host judge these bytes "
                f"again, after an upgrade of the watcher, remove them from {memory})"
            )
        if self.kind == "integrity":
            return ArtifactIntegrityError(message)
        return ArchiveRefused(message)


@dataclass(frozen=True)
class Hold:
    """An operator's hold: the daemon leaves this app on this host alone until released."""

    reason: str
    by: str
    at: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class PrunePlan:
    """What a prune would do and why the rest stays."""

    remove: list[str] = field(default_factory=list)
    keep: dict[str, str] = field(default_factory=dict)
    remove_prefetched: list[str] = field(default_factory=list)
    blocked: str | None = None  # set: nothing is removed this run, for this reason
    held_back: list[str] = field(default_factory=list)  # what would go, were it not blocked


class ProcReader(Protocol):
    """Read access to /proc; a seam so the "cannot read" rules can be tested with a fake.

    Each per-process method raises ``FileNotFoundError`` or ``ProcessLookupError`` when the
    process has exited, and another ``OSError`` (e.g. ``PermissionError``) when its entries
    cannot be read.
    """

    def pids(self) -> list[int]: ...
    def comm(self, pid: int) -> str: ...
    def cwd(self, pid: int) -> str: ...
    def fd_targets(self, pid: int) -> list[str]: ...
    def mapped_paths(self, pid: int) -> list[str]: ...


class LinuxProcReader:
    """The real /proc."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    # Plain str paths and os calls, not pathlib: a scan reads every open file descriptor of
    # every process (836 of them on a quiet test VM: 10 ms of CPU through Path, 4 through
    # os.readlink), and the maps as bytes, each mapped file once.

    def pids(self) -> list[int]:
        return [int(name) for name in os.listdir(self.root) if name.isdigit()]  # noqa: PTH208

    def comm(self, pid: int) -> str:
        """The process's name (readable where its cwd, fds and maps are not)."""
        with open(f"{self.root}/{pid}/comm", "rb") as fh:
            return fh.read().rstrip(b"\n").decode("utf-8", "replace")

    def cwd(self, pid: int) -> str:
        return os.readlink(f"{self.root}/{pid}/cwd")  # noqa: PTH115

    def fd_targets(self, pid: int) -> list[str]:
        base = f"{self.root}/{pid}/fd/"
        out = []
        for fd in os.listdir(base):  # noqa: PTH208
            try:
                out.append(os.readlink(base + fd))  # noqa: PTH115
            except FileNotFoundError:
                continue  # closed between listdir and readlink
        return out

    def parent_and_start(self, pid: int) -> tuple[int, int]:
        """(parent pid, start time in clock ticks since boot) from ``stat``: the start time
        tells a process from a later one that reuses its pid. ValueError if unreadable."""
        with open(f"{self.root}/{pid}/stat", "rb") as fh:
            raw = fh.read()
        fields = raw[raw.rfind(b")") + 2 :].split()  # the name may hold spaces and ")"
        if len(fields) < 20:
            raise ValueError(f"short {self.root}/{pid}/stat")
        return int(fields[1]), int(fields[19])

    def mapped_paths(self, pid: int) -> list[str]:
        with open(f"{self.root}/{pid}/maps", "rb") as fh:
            data = fh.read()
        paths = set()
        for line in data.split(b"\n"):
            # address perms offset dev inode, then the path: the first " /" starts it
            at = line.find(b" /")
            if at >= 0:
                paths.add(line[at + 1 :])
        return [p.decode("utf-8", "replace") for p in paths]


def scan_release_usage(
    reader: ProcReader, releases_dir: str, ignore: Collection[str] = ()
) -> tuple[set[str], str | None]:
    """Names of releases under ``releases_dir`` that some process uses (cwd, open, mapped).

    Returns ``(used, blocker)``; ``blocker`` is set when a live process could not be read,
    which means it might use any release, unless its name is in ``ignore`` (the app's
    ``prune_ignore``: the operator says it never uses them).
    """
    prefix = os.path.realpath(releases_dir).rstrip("/") + "/"
    used: set[str] = set()

    def note(path: str) -> None:
        if path.startswith(prefix):
            name = path[len(prefix) :].split("/", 1)[0].removesuffix(" (deleted)")
            if name:
                used.add(name)

    try:
        pids = reader.pids()
    except OSError as exc:
        return used, f"cannot list processes: {exc}"
    for pid in pids:
        try:
            note(reader.cwd(pid))
            for path in reader.fd_targets(pid):
                note(path)
            for path in reader.mapped_paths(pid):
                note(path)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        except OSError as exc:
            try:
                name = reader.comm(pid)
            except OSError:
                name = ""
            if name and name in ignore:
                continue
            # comm is the process's own to set: shown escaped (a newline would forge a line)
            named = shown(name) if name else "name unknown"
            return used, f"cannot read /proc entries of pid {pid} ({named}): {exc}"
    return used, None


def fleet_releases(current: CurrentRecord | None) -> dict[str, str]:
    """What a prune keeps for the fleet (``plan_prune``'s ``fleet``): the release the
    fleet's ``current`` names and its previous one, where `watcherctl rollback` goes.
    Any host's token can write ``current``: a forged one can only make a prune keep more."""
    if current is None:
        return {}
    kept = {current.release: "the fleet's release"}
    try:
        previous = current.previous_ref()
    except PayloadError:
        previous = None
    if previous is not None:
        kept.setdefault(previous.release, "the fleet's previous release (rollback target)")
    return kept


def prune_blocked_remedy(app: str) -> str:
    """What to do about a blocked prune (README, "Prune"): it must read every process's
    /proc entries, which for other users' processes takes CAP_SYS_PTRACE."""
    return (
        "prune must read every process's /proc entries: give the watcher CAP_SYS_PTRACE "
        "(systemd/watcher.service keeps it; a container needs --cap-add SYS_PTRACE), and run "
        f"`watcherctl prune {app}` as root with that capability; a process even that cannot "
        "read (a VM's init here, another user namespace's) and that never uses the app's "
        f"releases can be named in apps.{app}.prune_ignore"
    )


class ReleaseEngine:
    """Releases of one app on this host.

    Methods that change the tree assume the caller holds ``self.lock(...)``;
    ``prefetch_extract`` needs no lock (it only ever renames into a name of its own).
    """

    def __init__(
        self,
        app: AppConfig,
        cache: ArtifactCache | None = None,
        *,
        proc_reader: ProcReader | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.app = app
        self.cache = cache
        self.layout = AppLayout.for_app(app)
        self.proc_reader: ProcReader = proc_reader or LinuxProcReader()
        self.clock = clock
        self.log = get_logger(app=app.name)
        # sha256 of the artifacts a deploy or convergence in progress needs: never evicted
        self.in_flight_artifacts: set[str] = set()

    # -- locking -------------------------------------------------------------------------

    def lock(self, owner: str = "watcher", timeout: float | None = None) -> AppLock:
        # AppLock makes the state directory when it is missing
        return AppLock(
            self.layout, owner=owner, timeout=self.app.timeouts.lock if timeout is None else timeout
        )

    # -- reading -------------------------------------------------------------------------

    def release_info(self, release: str) -> dict[str, Any] | None:
        """The release's ``.watcher/release.json`` when it is complete and valid, else None."""
        return self._release_json(self.layout.release_dir(release), release)

    def _release_json(self, release_dir: Path, release: str) -> dict[str, Any] | None:
        """``release.json`` of the tree ``release_dir``; None (logged unless simply missing)
        when it cannot be read or is not this release's."""
        try:
            return _load_release_json(release_dir, release)
        except FileNotFoundError:
            return None  # an incomplete tree: staging writes release.json last
        except ReleaseError as exc:
            self.log.warning("release_json_invalid", release=release, error=str(exc))
            return None

    def is_complete(self, release: str) -> bool:
        return self.release_info(release) is not None

    def current_release(self) -> str | None:
        return _link_release(self.layout.current)

    def live_problem(self, release: str | None = None) -> str | None:
        """Why the release ``current`` names (or ``release``) is broken here, or None: its
        directory or its release.json gone (removed or emptied by hand), or a release.json
        that is not a valid one of this release. None too when it cannot tell: a read that
        failed for another reason (a user without access, EIO, EMFILE) says nothing of the
        tree, and a live tree is never judged broken on it."""
        release = release if release is not None else self.current_release()
        if release is None:
            return None
        where = self.layout.release_dir(release)
        try:
            _load_release_json(where, release)
        except FileNotFoundError:
            if not where.exists() and not where.is_symlink():
                return f"{where} does not exist"
            return f"{where} has no {RELEASE_JSON}"
        except ReleaseError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno not in (errno.ELOOP, errno.ENOTDIR):
                return None
            return str(exc)
        return None

    def backup_release(self) -> str | None:
        return _link_release(self.layout.current_backup)

    def previous_release(self) -> str | None:
        """The release ``current`` pointed to before the last flip that changed it."""
        try:
            name = self.layout.previous_file.read_text().strip()
        except FileNotFoundError:
            return None
        return name if name and is_release_name(name) else None

    def release_names(self) -> list[str]:
        """Names of every directory under ``releases/`` (complete or not), sorted."""
        try:
            entries = list(os.scandir(self.layout.releases_dir))
        except FileNotFoundError:
            return []
        return sorted(
            e.name
            for e in entries
            if not e.name.startswith(TMP_PREFIX) and e.is_dir(follow_symlinks=False)
        )

    def list_releases(self) -> list[ReleaseInfo]:
        """Every release on this host, oldest first (by staged_at, incomplete ones first)."""
        current, previous = self.current_release(), self.previous_release()
        backup, pins = self.backup_release(), self._read_pins()
        out = []
        for name in self.release_names():
            info = self._release_json(self.layout.releases_dir / name, name)
            post = self.post_release_done(name)
            base = ReleaseInfo(
                release=name,
                complete=False,
                is_current=name == current,
                is_previous=name == previous,
                is_backup=name == backup,
                pinned_until=pins.get(name),
                post_release_done=post,
            )
            if info is None:
                out.append(base)
                continue
            kept = not post and name not in (current, previous, backup)
            out.append(
                replace(
                    base,
                    complete=True,
                    artifact=str(info.get("artifact", "")),
                    sha256=str(info.get("sha256", "")),
                    deploy_id=str(info.get("deploy_id", "")),
                    staged_at=str(info.get("staged_at", "")),
                    size_bytes=_int(info.get("size")),
                    format=str(info.get("format", "")),
                    kept_for_resume=kept,
                )
            )
        out.sort(key=lambda r: (r.complete, r.staged_at, r.release))
        return out

    # -- prefetch and staging ------------------------------------------------------------

    def prefetched_path(self, record: ArtifactRecord) -> Path:
        return self.layout.prefetched_dir / f"{record.id}-{record.sha256[:12]}"

    def prefetch(
        self,
        record: ArtifactRecord,
        *,
        cancel: CancelFn | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        """Download and verify the artifact; pre-extract it when ``app.prefetch`` says so.

        ``cancel``/``progress``: as for ``stage``.
        """
        if self.app.prefetch == "off":
            return
        if self.app.prefetch == "extract" and self.prefetched_path(record).is_dir():
            return
        self.check_not_refused(record)
        archive = self._fetch(record, cancel)
        if self.app.prefetch == "extract":
            self.prefetch_extract(archive, record, cancel=cancel, progress=progress)

    def prefetch_extract(
        self,
        archive_path: Path,
        record: ArtifactRecord,
        *,
        cancel: CancelFn | None = None,
        progress: ProgressFn | None = None,
    ) -> Path:
        """Extract a verified artifact into ``prefetched/<id>-<sha12>`` (temp dir + rename).

        Same limits, refusal memory, ``cancel`` and ``progress`` as ``stage``.
        """
        final = self.prefetched_path(record)
        if final.is_dir():
            return final
        self.check_not_refused(record)
        try:
            self.layout.prefetched_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._make_tmp_dir(self.layout.prefetched_dir, f"prefetch-{final.name}-")
        except OSError as exc:
            raise StagingError(
                f"prefetching {record.id}: cannot create a directory in "
                f"{self.layout.prefetched_dir}: {exc}"
            ) from exc
        try:
            self._extract(archive_path, record, tmp, cancel, progress)
            self._private(tmp)
            os.utime(tmp)  # mtime = prefetch time (the archive may set the root's), for prune
            _check_cancel(cancel, f"prefetch of {record.id}")
            sync_tree(tmp)
            try:
                tmp.rename(final)
            except OSError:
                if not final.is_dir():
                    raise
                _rmtree(tmp)  # someone else finished the same prefetch first
                return final
            fsync_dir(self.layout.prefetched_dir)
        except OSError as exc:
            _rmtree(tmp)
            raise StagingError(f"prefetching {record.id} into {final}: {exc}") from exc
        except BaseException:
            _rmtree(tmp)
            raise
        self.log.info("artifact_prefetched", artifact=record.id, path=str(final))
        return final

    def stage(
        self,
        record: ArtifactRecord,
        release: str,
        deploy_id: str,
        *,
        cancel: CancelFn | None = None,
        progress: ProgressFn | None = None,
        replace_live: bool = False,
    ) -> Path:
        """``releases/<release>`` from the artifact: reused, renamed from prefetched/, or
        extracted from the (downloaded, verified) artifact.

        ``replace_live``: the tree ``current`` names may be replaced when it is broken (gone,
        or without its release.json: ``live_problem``), which only a host moving to a
        *committed* deploy may ask for (convergence, the apply); a deploy not yet decided
        must never put other bytes, or bytes before their ``post_release``, under the name
        ``current`` serves.

        ``cancel()`` is polled between download and extraction chunks (well under a second
        apart); when it returns True, ``StagingCancelled`` is raised and the temp dir is
        gone. ``progress(bytes_written, members_so_far)`` is called during extraction at
        most every 0.25 s and once at the end. An artifact this host refused before (by
        sha256, see ``Refusal``) is refused at once with the original reason.
        """
        reused = self._reuse(record, release, replace_live=replace_live)
        if reused is not None:
            return reused
        if self.prefetched_path(record).is_dir():
            staged = self._stage_prefetched(record, release, deploy_id)
            if staged is not None:
                return staged
        self.check_not_refused(record)
        return self._stage_extract(
            self._fetch(record, cancel), record, release, deploy_id, cancel, progress
        )

    def stage_from_file(
        self,
        archive_path: Path,
        record: ArtifactRecord,
        release: str,
        deploy_id: str,
        *,
        cancel: CancelFn | None = None,
        progress: ProgressFn | None = None,
        replace_live: bool = False,
    ) -> Path:
        """``stage`` from an already verified local artifact file (no S3)."""
        reused = self._reuse(record, release, replace_live=replace_live)
        if reused is not None:
            return reused
        if self.prefetched_path(record).is_dir():
            staged = self._stage_prefetched(record, release, deploy_id)
            if staged is not None:
                return staged
        self.check_not_refused(record)
        return self._stage_extract(Path(archive_path), record, release, deploy_id, cancel, progress)

    def fetch(self, record: ArtifactRecord, *, cancel: CancelFn | None = None) -> Path:
        """Download and verify the artifact into the cache (no lock needed: the cache
        serializes concurrent downloads of one artifact itself)."""
        self.check_not_refused(record)
        return self._fetch(record, cancel)

    def _fetch(self, record: ArtifactRecord, cancel: CancelFn | None = None) -> Path:
        if self.cache is None:
            raise StagingError(
                f"app {self.app.name}: no artifact cache to fetch {record.id} "
                "from (and no prefetched tree)"
            )
        self._check_download_fits(record)
        try:
            return self.cache.fetch(record, protect=self._needed_artifacts(), cancel=cancel)
        except ArtifactIntegrityError as exc:
            self._remember_refusal(record, "integrity", str(exc))
            raise

    def _check_download_fits(self, record: ArtifactRecord) -> None:
        """Refuse, before any request, a download that would leave less than disk_reserve."""
        if self.cache is None or self.cache.is_cached(record):
            return
        where = self.cache.dir if self.cache.dir.is_dir() else self.layout.app_dir
        try:
            st = os.statvfs(where)
        except OSError:
            return  # the download itself will say what is wrong with the directory
        try:
            have = self.cache.partial_path_for(record).stat().st_size
        except OSError:
            have = 0
        free = st.f_bavail * st.f_frsize
        reserve = self.app.limits.disk_reserve
        need = max(record.size - have, 0)
        if need > free - reserve:
            raise ArchiveDoesNotFit(
                f"artifact {record.id} needs {need} more bytes in {where}, which has {free} "
                f"free; that would leave less than disk_reserve {reserve}"
            )

    # -- refused artifacts ---------------------------------------------------------------

    def refusal(
        self, sha256: str, fmt: str = "tar.gz", *, source: str | None = None
    ) -> Refusal | None:
        """The remembered refusal of this sha256 read as ``fmt``, if it still holds (see
        ``Refusal``); an integrity refusal only for the same ``source`` (``_source``), when
        one is given."""
        entries = self._read_refusals()
        candidates = [entries.get((sha256, "archive", ""))] + [
            e
            for e in reversed(entries.values())  # the newest download's first
            if e.sha256 == sha256 and e.kind == "integrity" and source in (None, e.source)
        ]
        return next((e for e in candidates if e is not None and self._holds(e, fmt)), None)

    def _holds(self, entry: Refusal, fmt: str) -> bool:
        """Whether a remembered refusal still holds for bytes read as ``fmt``."""
        if entry.kind == "archive":
            # Not when the limits or the rules (archive.RULES: this version accepts what an
            # older one refused) changed since, or the same bytes are now read as another
            # format (a record that named the wrong one was fixed): judged again then.
            return entry.limits == self._limits_key(fmt)
        at = _parse_time(entry.at)
        age = (self.clock() - at).total_seconds() if at else INTEGRITY_REFUSAL_TTL
        return age < INTEGRITY_REFUSAL_TTL

    def check_not_refused(self, record: ArtifactRecord) -> None:
        """Raise the original refusal of ``record.sha256`` when this host remembers one."""
        entry = self.refusal(record.sha256, record.format, source=_source(record))
        if entry is not None:
            self.log.warning(
                "artifact_refused_again",
                artifact=record.id,
                sha256=record.sha256,
                kind=entry.kind,
                refused_at=entry.at,
            )
            raise entry.error(record, self.layout.refused_file)

    def forget_refusal(self, sha256: str) -> bool:
        """Drop a remembered refusal; False when there was none."""
        with _REFUSED_LOCK:
            entries = self._read_refusals()
            kept = {key: e for key, e in entries.items() if e.sha256 != sha256}
            if len(kept) == len(entries):
                return False
            self._write_refusals(kept)
        return True

    def _remember_refusal(self, record: ArtifactRecord, kind: str, reason: str) -> bool:
        """Keep the refusal in ``.state/refused.json``; False when it could not be saved."""
        entry = Refusal(
            sha256=record.sha256,
            artifact=record.id,
            kind=kind,
            reason=reason,
            at=iso(self.clock()),
            limits=self._limits_key(record.format) if kind == "archive" else "",
            source=_source(record) if kind == "integrity" else "",
        )
        try:
            with _REFUSED_LOCK:
                entries = self._read_refusals()
                key = _refusal_key(entry)
                entries.pop(key, None)
                entries[key] = entry  # newest last
                # The newest of each kind: records naming other urls for one sha256 (any
                # CI token may write them) cannot push an archive's refusal out.
                while sum(e.kind == kind for e in entries.values()) > REFUSED_KEEP:
                    entries.pop(next(k for k, e in entries.items() if e.kind == kind))
                self._write_refusals(entries)
        except OSError as exc:  # the refusal itself still reaches the caller
            self.log.error("artifact_refusal_not_saved", artifact=record.id, error=str(exc))
            return False
        self.log.warning(
            "artifact_refused", artifact=record.id, sha256=record.sha256, kind=kind, reason=reason
        )
        return True

    def _limits_key(self, fmt: str) -> str:
        lim = self.app.limits
        return (
            f"rules={RULES} format={fmt} members={lim.max_members} bytes={lim.max_bytes} "
            f"ratio={lim.max_ratio:g}"
        )

    def _read_refusals(self) -> dict[tuple[str, str, str], Refusal]:
        """The remembered refusals, oldest first, by ``_refusal_key``."""
        data = _read_json(self.layout.refused_file)
        raw = data.get("refused") if isinstance(data, dict) else None
        out: dict[tuple[str, str, str], Refusal] = {}
        if not isinstance(raw, list):
            return out
        for item in raw:
            if not isinstance(item, dict):
                continue
            try:
                entry = Refusal(
                    **{k: str(item[k]) for k in ("sha256", "artifact", "kind", "reason", "at")},
                    limits=str(item.get("limits", "")),
                    source=str(item.get("source", "")),
                )
            except KeyError:
                continue
            if SHA256_RE.match(entry.sha256) and entry.kind in ("archive", "integrity"):
                out[_refusal_key(entry)] = entry
        return out

    def _write_refusals(self, entries: dict[tuple[str, str, str], Refusal]) -> None:
        self.layout.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.layout.refused_file,
            {"version": 1, "refused": [asdict(e) for e in entries.values()]},
        )

    def _needed_artifacts(self) -> set[str]:
        """sha256 of the artifacts behind current, previous, backup and pinned releases:
        the cache never evicts these (a rollback may have to restage from them)."""
        names = {self.current_release(), self.previous_release(), self.backup_release()}
        names |= set(self._read_pins())
        needed: set[str] = set(self.in_flight_artifacts)
        for name in names:
            info = self.release_info(name) if name else None
            if info and info.get("sha256"):
                needed.add(str(info["sha256"]))
        return needed

    def _reuse(
        self, record: ArtifactRecord, release: str, *, replace_live: bool = False
    ) -> Path | None:
        final = self.layout.release_dir(release)
        if not final.exists() and not final.is_symlink():
            return None
        info = self._release_json(final, release)
        if info is not None:
            if info.get("sha256") != record.sha256:
                raise ReleaseError(
                    f"release {release} at {final} is staged from sha256 {info.get('sha256')} "
                    f"(artifact {info.get('artifact')}), not {record.sha256} ({record.id})"
                )
            self.log.info("release_reused", release=release, artifact=record.id)
            return final
        if release == self.current_release():
            # A tree `current` names, without a release.json we can read: removed or emptied
            # by hand (staging renames complete trees into place). Replaced only for a
            # committed deploy, and only when it is broken for sure, not when the read
            # failed for another reason (EIO, EMFILE: a live tree must not go for that).
            problem = self.live_problem(release)
            if not replace_live or problem is None:
                why = problem or "its release.json cannot be read"
                raise ReleaseError(
                    f"release {release} is the live one and {why}: it is staged again only "
                    "from the fleet's committed deploy (convergence), not by a deploy in "
                    "progress"
                )
        self._remove_tree(final)
        self.log.warning("incomplete_release_removed", release=release, path=str(final))
        return None

    def _stage_prefetched(
        self, record: ArtifactRecord, release: str, deploy_id: str
    ) -> Path | None:
        source = self.prefetched_path(record)
        tmp = self.layout.releases_dir / f"{TMP_PREFIX}stage-{release}-{secrets.token_hex(4)}"
        try:
            self.layout.releases_dir.mkdir(parents=True, exist_ok=True)
            source.rename(tmp)
        except FileNotFoundError:
            return None  # gone meanwhile: extract instead
        except OSError as exc:
            raise StagingError(f"cannot move prefetched {source} to {tmp}: {exc}") from exc
        try:
            self._private(tmp)
            fsync_dir(self.layout.prefetched_dir)
        except OSError as exc:
            _rmtree(tmp)
            raise StagingError(f"staging {release} from {source}: {exc}") from exc
        final = self._finish_stage(tmp, record, release, deploy_id, sync_all=False)
        self.log.info("release_staged", release=release, artifact=record.id, source="prefetched")
        return final

    def _stage_extract(
        self,
        archive_path: Path,
        record: ArtifactRecord,
        release: str,
        deploy_id: str,
        cancel: CancelFn | None = None,
        progress: ProgressFn | None = None,
    ) -> Path:
        try:
            self.layout.releases_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._make_tmp_dir(self.layout.releases_dir, f"stage-{release}-")
        except OSError as exc:
            raise StagingError(
                f"staging {release}: cannot create a directory in {self.layout.releases_dir}: {exc}"
            ) from exc
        try:
            self._extract(archive_path, record, tmp, cancel, progress)
            self._private(tmp)
            _check_cancel(cancel, f"staging of {release}")
        except OSError as exc:
            _rmtree(tmp)
            raise StagingError(f"extracting {archive_path} for {release}: {exc}") from exc
        except BaseException:
            _rmtree(tmp)
            raise
        final = self._finish_stage(tmp, record, release, deploy_id, sync_all=True)
        self.log.info("release_staged", release=release, artifact=record.id, source="archive")
        return final

    def _finish_stage(
        self, tmp: Path, record: ArtifactRecord, release: str, deploy_id: str, *, sync_all: bool
    ) -> Path:
        """Link shared/, write release.json last, sync, rename into ``releases/<release>``."""
        final = self.layout.release_dir(release)
        try:
            try:
                touched = self._link_shared(tmp)
            except StagingError as exc:
                raise StagingError(f"staging {release}: {exc}") from None
            meta_dir = tmp / ".watcher"
            if meta_dir.is_symlink() or (meta_dir.exists() and not meta_dir.is_dir()):
                raise StagingError(f"{release}: the archive's .watcher is not a directory")
            meta_dir.mkdir(mode=0o755, exist_ok=True)
            atomic_write_json(
                meta_dir / "release.json",
                {
                    "version": RELEASE_JSON_VERSION,
                    "release": release,
                    "artifact": record.id,
                    "sha256": record.sha256,
                    "deploy_id": deploy_id,
                    "size": record.size,
                    "format": record.format,
                    "branch": record.branch,
                    "commit": record.commit,
                    "staged_at": iso(self.clock()),
                },
            )
            self._seal(tmp)
            if sync_all:
                sync_tree(tmp)
            else:
                for d in {tmp, *touched}:
                    fsync_dir(d)
            # A new tree has not had its post_release, whatever an old one of the same
            # name had (removed by hand after its host acked ready): gone before the rename,
            # so a crash between the two leaves no tree said to have had it.
            (self.layout.post_release_dir / release).unlink(missing_ok=True)
            tmp.rename(final)
            fsync_dir(self.layout.releases_dir)
        except OSError as exc:
            _rmtree(tmp)
            raise StagingError(f"staging {release} into {final}: {exc}") from exc
        except BaseException:
            _rmtree(tmp)
            raise
        return final

    def _link_shared(self, tree: Path) -> set[Path]:
        """Replace each configured shared path in ``tree`` by a relative link into shared/."""
        touched: set[Path] = set()
        real_tree = os.path.realpath(tree)
        for rel in self.app.shared:
            inside = tree / rel
            parent = inside.parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTDIR, errno.ELOOP):
                    raise
                raise StagingError(
                    f"shared path {rel} (the app's shared setting): a part of "
                    f"{parent.relative_to(tree)} in the release is no directory (a file, a "
                    "symlink to none, or a loop): the archive and the setting do not fit together"
                ) from None
            real_parent = os.path.realpath(parent)
            if real_parent != real_tree and not real_parent.startswith(real_tree + "/"):
                raise StagingError(
                    f"shared path {rel}: its parent leaves the release through a symlink"
                )
            if inside.is_symlink() or inside.is_file():
                inside.unlink()
            elif inside.exists():
                shutil.rmtree(inside)
            target = self.layout.shared_dir / rel
            if not target.exists() and not target.is_symlink():
                self._make_shared(target)
            # releases/<tmp>/<rel> and releases/<release>/<rel> are at the same depth. From
            # where the link really lands: a symlink of the release on the way (`public ->
            # .`, `public -> build/public`) puts it at another depth than `rel` says, and
            # a link counted from `rel` pointed outside the app's directory or nowhere.
            start = self.layout.releases_dir / "x" / os.path.relpath(real_parent, real_tree)
            inside.symlink_to(os.path.relpath(target, start))
            touched.add(parent)
        return touched

    def _make_shared(self, target: Path) -> None:
        """Create a shared path the app writes into (``log``, ``public/uploads``), owned by
        the app's user: made by root, the app could not write its own log. Only the path
        itself is given away; the directories above it stay the daemon's (a user-owned one
        there could be swapped for a symlink, and the next mkdir under it would follow).
        The chown goes through a descriptor opened without following a symlink."""
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.mkdir(mode=0o777 & ~self.app.umask)
        except FileExistsError:
            return  # made meanwhile (by the app, or another staging): left as it is
        uid, gid = self._owner()
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            # The mode mkdir got was masked by the process's umask too (the unit's 0022):
            # the app's umask ("0002": its group writes the log) is the one that counts.
            os.fchmod(fd, 0o777 & ~self.app.umask)
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        finally:
            os.close(fd)

    def _extract(
        self,
        archive_path: Path,
        record: ArtifactRecord,
        dest: Path,
        cancel: CancelFn | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        uid, gid = self._owner()
        lim = self.app.limits
        try:
            extract_archive(
                Path(archive_path),
                dest,
                fmt=record.format,
                max_members=lim.max_members,
                max_bytes=lim.max_bytes,
                umask=self.app.umask,
                uid=uid,
                gid=gid,
                max_ratio=lim.max_ratio,
                disk_fraction=lim.disk_fraction,
                disk_reserve=lim.disk_reserve,
                cancel=cancel,
                progress=progress,
            )
        except ArchiveRefused as exc:
            got = _sha256_of(Path(archive_path))
            if not got and (remembered := self.refusal(record.sha256, record.format)):
                # Gone because another staging of the same copy refused it first (a
                # prefetch and a deploy at once) and removed it: its refusal is this one.
                raise remembered.error(record, self.layout.refused_file) from exc
            if got != record.sha256:
                # Not the bytes that were verified: the copy changed on this host's disk
                # since (a bad sector, a hand edit). Remembering a refusal of the artifact
                # from it would refuse its good bytes for good; the next try downloads it.
                cached = self.cache is not None and archive_path == self.cache.path_for(record)
                self._drop_cached(record, Path(archive_path))
                raise StagingError(
                    f"artifact {record.id}: {archive_path} no longer holds the bytes verified "
                    f"as sha256 {record.sha256[:12]} ({_sha_shown(got)}): it changed on this "
                    f"host's disk ({exc}); not remembered as refused"
                    + (", the copy removed: the next try downloads it again" if cached else "")
                ) from exc
            if self._remember_refusal(record, "archive", str(exc)):
                # Not when the memory could not be saved: every later try would download
                # the whole artifact again to refuse it again.
                self._drop_cached(record, Path(archive_path))
            raise

    def _drop_cached(self, record: ArtifactRecord, archive_path: Path) -> None:
        """Remove the cache's verified copy of an archive this host refused: it can never
        be staged under these limits (the refusal memory answers a second try without a
        download), and status and the host record list the cache as prefetched. Only the
        cache's own file, never a file a caller named."""
        if self.cache is None or archive_path != self.cache.path_for(record):
            return
        try:
            archive_path.unlink(missing_ok=True)
        except OSError as exc:
            self.log.warning("refused_artifact_kept", artifact=record.id, error=str(exc))

    def _make_tmp_dir(self, parent: Path, label: str) -> Path:
        """A private (0700, the daemon's own) directory to build a tree in.

        It keeps that mode and owner while it is built and while it waits in prefetched/:
        the app's user, who owns the files inside, cannot enter it to swap a directory for
        a symlink under the daemon. ``_seal`` gives it its final owner and mode just before
        the rename into releases/.
        """
        tmp = parent / f"{TMP_PREFIX}{label}{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        return tmp

    def _private(self, tree: Path) -> None:
        """Take the tree's root back after extraction (an archive's ./ entry may set it)."""
        _set_dir_owner(tree, 0o700, os.geteuid(), os.getegid())

    def _seal(self, tree: Path) -> None:
        """The staged tree's root gets the app's owner and the umask's mode."""
        uid, gid = self._owner()
        _set_dir_owner(tree, 0o777 & ~self.app.umask, uid, gid)

    def _owner(self) -> tuple[int | None, int | None]:
        uid = gid = None
        try:
            if self.app.user:
                pw = pwd.getpwnam(self.app.user)
                uid, gid = pw.pw_uid, pw.pw_gid
            if self.app.group:
                gid = grp.getgrnam(self.app.group).gr_gid
        except KeyError as exc:
            raise StagingError(f"app {self.app.name}: unknown user or group {exc}") from None
        return uid, gid

    # -- flip ----------------------------------------------------------------------------

    def flip(self, release: str, *, not_before: float | None = None) -> None:
        """Point ``current`` at ``release`` (complete only) by renaming a fresh symlink;
        with ``not_before`` (a ``time.time()``), everything but the rename is done first
        and the rename waits for that moment."""
        if not self.is_complete(release):
            raise FlipError(
                f"refusing to flip {self.app.name} to {release}: "
                f"{self.layout.release_dir(release)} has no complete "
                f"{RELEASE_JSON}"
            )
        before = self.current_release()
        old_previous = self.previous_release()
        if before is not None and before != release:
            # written first: a crash before the rename leaves previous == current, and
            # re-running this flip records the right one
            atomic_write_bytes(self.layout.previous_file, f"{before}\n".encode())
        try:
            self._swap_link(self.layout.current, release, not_before=not_before)
        except FlipError:
            # Put `previous` back only if `current` did not move: a failure after the rename
            # (the directory's fsync, the read-back) leaves the flip done.
            if before is not None and before != release and self.current_release() == before:
                if old_previous is None:
                    self.layout.previous_file.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(self.layout.previous_file, f"{old_previous}\n".encode())
            raise
        self.log.info("release_flipped", release=release, previous=before)

    def set_backup(self, release: str | None) -> None:
        """Point ``current_backup`` at ``release`` (None removes it)."""
        if release is None:
            self.clear_backup()
            return
        if not self.is_complete(release):
            raise FlipError(
                f"refusing to point {self.layout.current_backup} at {release}: "
                "not a complete release"
            )
        self._swap_link(self.layout.current_backup, release)

    def clear_backup(self) -> None:
        try:
            self.layout.current_backup.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.layout.app_dir)

    def _swap_link(self, link: Path, release: str, *, not_before: float | None = None) -> None:
        target = self.layout.link_target(release)
        tmp = self.layout.app_dir / f"{TMP_PREFIX}link-{secrets.token_hex(4)}"
        try:
            tmp.symlink_to(target)
            if not_before is not None and (wait := not_before - time.time()) > 0:
                time.sleep(wait)
            tmp.rename(link)
            fsync_dir(self.layout.app_dir)
            seen = str(link.readlink())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise FlipError(f"cannot point {link} at {target}: {exc}") from exc
        if seen != target:
            raise FlipError(f"{link} reads back as {seen!r} after pointing it at {target!r}")

    # -- recovery ------------------------------------------------------------------------

    def recover(self, *, deploy_in_flight: bool = False) -> list[str]:
        """Clean up after a crash; returns what was done (one line each).

        Each entry is handled on its own: one that cannot be (a tree that will not go, a
        link that cannot be repaired) is logged and reported in the list, and the others
        are still recovered, so a bad entry never stops the daemon from starting.
        """
        lay = self.layout
        lay.ensure()
        actions: list[str] = []

        def attempt(what: str, step: Callable[[], str | None]) -> None:
            try:
                done = step()
            except Exception as exc:  # logged and reported: recovery goes on with the rest
                done = f"could not {what}: {exc}"
                self.log.error(
                    "recovery_step_failed", step=what, error=str(exc), type=type(exc).__name__
                )
            if done:
                actions.append(done)

        for d in (
            lay.app_dir,
            lay.releases_dir,
            lay.prefetched_dir,
            lay.state_dir,
            lay.post_release_dir,
        ):
            for entry in sorted(os.scandir(d), key=lambda e: e.name):
                if entry.name.startswith(TMP_PREFIX):
                    path = Path(entry.path)
                    attempt(f"remove leftover {path}", partial(_remove_or_raise, path, "leftover"))
        if lay.current.is_symlink():
            cur = self.current_release()
            if cur is None or not is_release_name(cur) or not self.is_complete(cur):
                actions.append(self._broken_current(cur))
        elif lay.current.exists():
            actions.append(f"{lay.current} is not a symlink; left alone")
            self.log.error("current_not_a_symlink", path=str(lay.current))
        if lay.current_backup.is_symlink() or lay.current_backup.exists():
            backup = self.backup_release()
            broken = backup is None or not is_release_name(backup) or not self.is_complete(backup)
            if not deploy_in_flight or broken:
                attempt(f"remove {lay.current_backup}", self._remove_backup)
        current = self.current_release()
        for name in self.release_names():
            if name != current and self._release_json(lay.releases_dir / name, name) is None:
                attempt(f"remove incomplete release {name}", partial(self._remove_incomplete, name))
        existing = set(self.release_names())
        for marker in sorted(lay.post_release_dir.iterdir()):
            if marker.name not in existing:
                attempt(f"remove {marker}", partial(marker.unlink, missing_ok=True))
        pins = self._read_pins()
        if any(r not in existing for r in pins):
            attempt(
                f"drop pins of missing releases from {lay.pins_file}",
                lambda: self._write_pins({r: t for r, t in pins.items() if r in existing}),
            )
        if self.cache is not None:  # downloads given up long ago keep their partial files
            actions += [f"removed stale partial download {name}" for name in self.cache.cleanup()]
        for action in actions:
            self.log.warning("recovery_action", action=action)
        return actions

    def _remove_backup(self) -> str:
        done = _remove_or_raise(self.layout.current_backup)
        fsync_dir(self.layout.app_dir)
        return done

    def _remove_incomplete(self, name: str) -> str:
        self._remove_tree(self.layout.releases_dir / name)
        return f"removed incomplete release {name}"

    def _broken_current(self, broken: str | None) -> str:
        """`current` names no complete release: a flip never points it at one, so its tree
        was removed or emptied by hand. Left as it is, as while the watcher runs: the
        watcher stages the fleet's committed release again (``AppAgent._converge``), unless
        the app is held here. Pointing it at `previous` or the backup here, at start, moved
        a held host, and any host, to an older release than the fleet's without a look at
        the acks (DESIGN.md 6.4.6), and `status` then called it healthy."""
        self.log.error("current_broken", release=broken)
        if broken is None or not is_release_name(broken):
            try:
                what = f"{str(self.layout.current.readlink())!r}, not a release"
            except OSError as exc:
                what = f"nothing it can read ({exc})"
        else:
            what = f"incomplete {broken}"
        return (
            f"current points at {what}: left as it is (the watcher stages the fleet's "
            "release again unless the app is held here)"
        )

    # -- holds, pins, post_release bookkeeping -------------------------------------------

    def hold(self, reason: str, by: str) -> Hold:
        h = Hold(reason=reason, by=by, at=iso(self.clock()))
        self.layout.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.layout.holds_file, {"version": 1, "hold": h.to_dict()})
        self.log.info("hold_placed", reason=reason, by=by)
        return h

    def release_hold(self) -> Hold | None:
        """Remove the hold; returns the one removed (None when there was none)."""
        h = self.held()
        if h is not None:
            self.layout.holds_file.unlink(missing_ok=True)
            fsync_dir(self.layout.state_dir)
            self.log.info("hold_released", reason=h.reason, by=h.by)
        return h

    def held(self) -> Hold | None:
        data = _read_json(self.layout.holds_file)
        raw = data.get("hold") if isinstance(data, dict) else None
        if not isinstance(raw, dict):
            return None
        return Hold(
            reason=str(raw.get("reason", "")), by=str(raw.get("by", "")), at=str(raw.get("at", ""))
        )

    def pin(self, release: str, keep_until: datetime) -> None:
        """Protect ``release`` from prune until ``keep_until``."""
        if not self.is_complete(release):
            raise ReleaseNotFound(
                f"cannot pin {release}: not a complete release under {self.layout.releases_dir}"
            )
        pins = self._read_pins()
        pins[release] = iso(keep_until)
        self._write_pins(pins)

    def unpin(self, release: str) -> None:
        pins = self._read_pins()
        if pins.pop(release, None) is not None:
            self._write_pins(pins)

    def pinned_until(self, release: str) -> datetime | None:
        raw = self._read_pins().get(release)
        return _parse_time(raw) if raw else None

    def _read_pins(self) -> dict[str, str]:
        data = _read_json(self.layout.pins_file)
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def _write_pins(self, pins: dict[str, str]) -> None:
        self.layout.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.layout.pins_file, pins)

    def mark_post_release_done(self, release: str) -> None:
        check_release(release)
        self.layout.post_release_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            self.layout.post_release_dir / release, f"{iso(self.clock())}\n".encode()
        )

    def post_release_done(self, release: str) -> bool:
        return (self.layout.post_release_dir / release).is_file()

    def drop_release(self, release: str) -> bool:
        """Remove a staged release (abort after post_release ran); False if it was absent."""
        if release in (self.current_release(), self.backup_release()):
            raise ReleaseError(f"refusing to drop {release}: {self.app.name} is live on it")
        path = self.layout.release_dir(release)
        existed = path.exists()
        if existed:
            self._remove_tree(path)
        (self.layout.post_release_dir / release).unlink(missing_ok=True)
        self.unpin(release)
        if existed:
            self.log.info("release_dropped", release=release)
        return existed

    # -- prune ---------------------------------------------------------------------------

    def plan_prune(
        self, *, in_flight: Iterable[str] = (), fleet: Mapping[str, str] | None = None
    ) -> PrunePlan:
        """Decide what prune removes (DESIGN.md section 2). ``fleet``: releases the fleet's
        ``current`` names (its release and its previous one, the target of `watcherctl
        rollback`), with why; kept like this host's own current and previous, which differ
        from them on a host that converged across two fleet changes or rolled back alone.

        Which releases running processes use (a scan of every process in /proc, a few ms)
        is looked up only when the other rules would remove something: that protection
        can only turn a removal into a keep. Most deploys prune nothing.
        """
        in_flight = set(in_flight)
        fleet = dict(fleet or {})
        infos = self.list_releases()
        plan = self._plan_prune(infos, in_flight, used=set(), fleet=fleet)
        if not plan.remove:
            return plan  # pre-extracted trees need no scan: nothing runs from them
        used, blocker = scan_release_usage(
            self.proc_reader, str(self.layout.releases_dir), self.app.prune_ignore
        )
        if blocker is not None:
            # No release goes (any may be in use), but stale pre-extracted trees still do:
            # where /proc cannot be read (a container without CAP_SYS_PTRACE) they would
            # otherwise pile up with every build.
            return PrunePlan(
                keep=plan.keep,
                blocked=blocker,
                remove_prefetched=plan.remove_prefetched,
                held_back=plan.remove,
            )
        return self._plan_prune(infos, in_flight, used=used, fleet=fleet)

    def _plan_prune(
        self,
        infos: list[ReleaseInfo],
        in_flight: set[str],
        *,
        used: set[str],
        fleet: Mapping[str, str] | None = None,
    ) -> PrunePlan:
        fleet = fleet or {}
        plan = PrunePlan()
        now = self.clock()
        protected: dict[str, str] = {}
        for info in infos:
            name = info.release
            pin = _parse_time(info.pinned_until) if info.pinned_until else None
            if info.is_current:
                protected[name] = "current"
            elif info.is_backup:
                protected[name] = "current_backup"
            elif info.is_previous:
                protected[name] = "previous"
            elif name in in_flight:
                protected[name] = "in flight"
            elif name in fleet and info.complete:  # a half-staged tree serves no rollback
                protected[name] = fleet[name]
            elif pin is not None and pin > now:
                protected[name] = f"pinned until {info.pinned_until}"
            elif name in used:
                protected[name] = "used by a running process"
        counted = [i for i in infos if i.complete and not i.kept_for_resume]
        counted.sort(key=lambda i: (i.staged_at, i.release), reverse=True)
        max_age = timedelta(seconds=self.app.aborted_staging_max_age)
        for rank, info in enumerate(counted):
            name = info.release
            if name in protected:
                plan.keep[name] = protected[name]
            elif rank < self.app.keep_releases:
                plan.keep[name] = f"among the newest {self.app.keep_releases}"
            else:
                plan.remove.append(name)
        counted_names = {i.release for i in counted}
        # `deploy --resume` takes up only the newest deploy of a build, and only if it was
        # aborted: an older aborted staging of the same build is never resumed (ten aborted
        # deploys of one build kept ten trees for a week, the operator review).
        resumable: dict[str, tuple[str, str]] = {}
        for info in infos:
            if info.complete and info.kept_for_resume:
                mark = (info.staged_at, info.release)
                resumable[info.artifact] = max(resumable.get(info.artifact, mark), mark)
        for info in infos:
            name = info.release
            if name in counted_names:
                continue
            if name in protected:
                plan.keep[name] = protected[name]
            elif not info.complete:
                plan.remove.append(name)
            else:
                staged = _parse_time(info.staged_at)
                newest = resumable.get(info.artifact, ("", ""))[1] == name
                if newest and staged is not None and now - staged < max_age:
                    plan.keep[name] = "aborted staging kept for resume"
                else:
                    plan.remove.append(name)
        plan.remove.sort()
        plan.remove_prefetched = self._stale_prefetched()
        return plan

    def prune(
        self,
        *,
        in_flight: Iterable[str] = (),
        dry_run: bool = False,
        plan: PrunePlan | None = None,
    ) -> list[str]:
        """Remove the releases ``plan_prune`` picks (or those of ``plan``, made under the same
        lock); returns them (what would go if dry)."""
        if plan is None:
            plan = self.plan_prune(in_flight=in_flight)
        if plan.blocked is not None:
            self.log.warning(
                "prune_blocked", reason=plan.blocked, remedy=prune_blocked_remedy(self.app.name)
            )
        removed = [] if plan.blocked is not None else list(plan.remove)
        if dry_run:
            return removed
        for name in removed:
            self._remove_tree(self.layout.releases_dir / name)
            (self.layout.post_release_dir / name).unlink(missing_ok=True)
            self.unpin(name)
            self.log.info("release_pruned", release=name)
        for name in plan.remove_prefetched:
            self._remove_tree(self.layout.prefetched_dir / name)
            self.log.info("prefetched_pruned", tree=name)
        return removed

    def drop_stale_prefetched(self) -> list[str]:
        """After a prefetch: remove pre-extracted trees beyond the newest ``keep_releases``,
        so builds announced between deploys do not fill the disk (or its inodes) with
        trees nobody deploys. Skipped while another holder has the app lock (a deploy in
        progress; its prune after the deploy does the same), and never a tree of an
        artifact a task is using."""
        try:
            lock = self.lock(owner="prefetch clean-up", timeout=0)
            lock.acquire()
        except LockTimeout:
            return []  # a deploy holds it: its prune does the same
        try:
            busy = {sha[:12] for sha in self.in_flight_artifacts}
            stale = [n for n in self._stale_prefetched() if n.rsplit("-", 1)[-1] not in busy]
            for name in stale:
                self._remove_tree(self.layout.prefetched_dir / name)
                self.log.info("prefetched_pruned", tree=name)
            return stale
        finally:
            lock.release()

    def _stale_prefetched(self) -> list[str]:
        """Pre-extracted trees beyond the newest ``keep_releases`` (never deployed builds)."""
        try:
            entries = [
                e
                for e in os.scandir(self.layout.prefetched_dir)
                if not e.name.startswith(TMP_PREFIX) and e.is_dir(follow_symlinks=False)
            ]
        except FileNotFoundError:
            return []
        entries.sort(
            key=lambda e: (e.stat(follow_symlinks=False).st_mtime_ns, e.name), reverse=True
        )
        return [e.name for e in entries[self.app.keep_releases :]]

    def _remove_tree(self, path: Path) -> None:
        """Rename to ``.tmp-prune-<name>`` first, so a crash mid-delete leaves no release."""
        doomed = path.with_name(f"{TMP_PREFIX}prune-{path.name}-{secrets.token_hex(4)}")
        try:
            path.rename(doomed)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ReleaseError(f"cannot remove {path}: {exc}") from exc
        fsync_dir(path.parent)
        problem = _rmtree(doomed)
        if problem is not None:  # what is left goes with the next recovery's leftovers
            self.log.warning("tree_not_fully_removed", path=str(doomed), error=problem)


# -- helpers ---------------------------------------------------------------------------------


def _check_cancel(cancel: CancelFn | None, what: str) -> None:
    if cancel is not None and cancel():
        raise StagingCancelled(f"{what} cancelled")


def is_release_name(release: str) -> bool:
    """Whether ``release`` is a release's name (``check_release``), not raising."""
    try:
        check_release(release)
    except WatcherError:
        return False
    return True


def _refusal_key(entry: Refusal) -> tuple[str, str, str]:
    """One remembered refusal per sha256 of an archive, and per sha256 and source of a
    download: a record naming a bomb's sha256 with another url must not replace the
    bomb's refusal (each host would download and judge it again)."""
    return (entry.sha256, entry.kind, entry.source if entry.kind == "integrity" else "")


def _source(record: ArtifactRecord) -> str:
    """Where an artifact's bytes come from, as an integrity refusal remembers it."""
    return f"{record.url} size={record.size}"


def _sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes; "" when it cannot be read."""
    try:
        return sha256_of(path)
    except OSError:
        return ""


def _sha_shown(sha256: str) -> str:
    return f"now sha256 {sha256[:12]}" if sha256 else "now unreadable"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _load_release_json(release_dir: Path, release: str) -> dict[str, Any]:
    """``<release_dir>/.watcher/release.json``, read without trusting the tree it is in.

    The app's user owns a staged tree (``_seal``) and may have replaced anything in it: each
    component is opened without following a symlink, the open never waits (a FIFO), and
    only a regular file of at most ``RELEASE_JSON_MAX_BYTES`` is read. Raises
    ``FileNotFoundError`` when the tree or the file is missing (a tree still being staged)
    and ``ReleaseError``, naming the path and what is wrong with it, for anything else.
    """
    path = release_dir / RELEASE_JSON
    fds: list[int] = []
    where = release_dir
    try:
        fds.append(os.open(release_dir, _DIR_OPEN))
        for part in RELEASE_JSON.parts[:-1]:
            where = where / part
            fds.append(os.open(part, _DIR_OPEN, dir_fd=fds[-1]))
        where = path
        fds.append(os.open(RELEASE_JSON.name, _FILE_OPEN, dir_fd=fds[-1]))
        st = os.fstat(fds[-1])
        if not stat.S_ISREG(st.st_mode):
            raise ReleaseError(f"{path} is not a regular file but a {_file_kind(st.st_mode)}")
        if st.st_size > RELEASE_JSON_MAX_BYTES:
            raise ReleaseError(
                f"{path} is {st.st_size} bytes, over the {RELEASE_JSON_MAX_BYTES} a "
                f"release.json may have"
            )
        raw = _read_at_most(fds[-1], RELEASE_JSON_MAX_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # O_NOFOLLOW met a symlink, or a file
            what = "a symlink" if where.is_symlink() else "not a directory"
            raise ReleaseError(f"cannot read {path}: {where} is {what}") from exc
        raise ReleaseError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        for fd in fds:
            os.close(fd)
    if len(raw) > RELEASE_JSON_MAX_BYTES:
        raise ReleaseError(f"{path} grew past {RELEASE_JSON_MAX_BYTES} bytes while it was read")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise ReleaseError(f"{path} is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise ReleaseError(f"{path} holds a JSON {type(data).__name__}, not an object")
    if data.get("release") != release:
        raise ReleaseError(
            f"{path} is the release.json of {data.get('release')!r}, not {release!r}"
        )
    sha = data.get("sha256")
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        raise ReleaseError(f"{path} has no valid sha256 (found {sha!r})")
    if not data.get("artifact"):
        raise ReleaseError(f"{path} names no artifact")
    return data


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return f"file of mode {mode:o}"


def _link_release(link: Path) -> str | None:
    """The release ``link`` points at; None for none, or for what is no release's name (a
    link made by hand, `releases/hotfix`: a name the hooks' context, `previous` and the
    release paths would refuse, so a convergence or a deploy failed on it, for good)."""
    try:
        target = str(link.readlink())
    except OSError:
        return None
    parts = Path(os.path.normpath(target)).parts
    if len(parts) >= 2 and parts[-2] == "releases" and is_release_name(parts[-1]):
        return parts[-1]
    return None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_iso(text)
    except ValueError:
        return None


def _rmtree(path: Path) -> str | None:
    """Remove the directory ``path`` and everything below it, as far as it can.

    Like ``shutil.rmtree``, it never follows a symlink (each directory is opened by name
    below a held descriptor with ``O_NOFOLLOW``, so an app user swapping one for a symlink
    meanwhile cannot aim the removal outside the tree) and it goes on past errors. Unlike
    it, it does not recurse: a tree of any depth (an app user can make one by hand) is
    removed with at most ``_RMTREE_OPEN_DIRS`` directories open, a directory found deeper
    than that being moved up into ``path`` and removed from there. Returns None when
    ``path`` is gone, else the first failure ("remove <what>: <why>").
    """
    failures: list[str] = []

    def failed(what: Path, exc: OSError) -> None:
        failures.append(f"remove {what}: {exc.strerror or exc}")

    try:
        top = os.open(path, _DIR_OPEN)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"remove {path}: {exc.strerror or exc}"
    # the directories open, top first: (fd, path for messages, entries still to remove)
    stack: list[tuple[int, Path, list[tuple[str, bool]]]] = []
    moved = 0
    try:
        stack.append((top, path, []))
        _list_entries(top, path, stack[-1][2], failed)
        while stack:
            fd, where, entries = stack[-1]
            if not entries:
                stack.pop()
                os.close(fd)
                try:
                    if stack:
                        os.rmdir(where.name, dir_fd=stack[-1][0])
                    else:
                        path.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    failed(where, exc)
                continue
            name, is_dir = entries.pop()
            if not is_dir:
                try:
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    failed(where / name, exc)
                continue
            if len(stack) >= _RMTREE_OPEN_DIRS:
                moved += 1
                up = f"{TMP_PREFIX}deep-{moved}-{secrets.token_hex(4)}"
                try:
                    os.rename(name, up, src_dir_fd=fd, dst_dir_fd=top)
                except OSError as exc:
                    failed(where / name, exc)
                    continue
                stack[0][2].append((up, True))
                continue
            try:
                child = os.open(name, _DIR_OPEN, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # not a directory any more
                    entries.append((name, False))
                else:
                    failed(where / name, exc)
                continue
            stack.append((child, where / name, []))
            _list_entries(child, where / name, stack[-1][2], failed)
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    return failures[0] if failures else None


def _list_entries(
    fd: int, where: Path, into: list[tuple[str, bool]], failed: Callable[[Path, OSError], None]
) -> None:
    """Append ``(name, is a directory)`` for each entry of the directory ``fd``."""
    try:
        with os.scandir(fd) as it:
            into.extend((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    except OSError as exc:
        failed(where, exc)


def _remove_any(path: Path) -> str | None:
    """Remove ``path`` whatever it is (a tree, a symlink, a file); None when it is gone,
    else what could not be removed and why."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return _rmtree(path)
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"remove {path}: {exc.strerror or exc}"
    return None


def _remove_or_raise(path: Path, what: str = "") -> str:
    """``_remove_any`` that raises ``ReleaseError`` naming what is left and why."""
    problem = _remove_any(path)
    if problem is not None:
        raise ReleaseError(f"cannot {problem}")
    return f"removed {what} {path}" if what else f"removed {path}"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
