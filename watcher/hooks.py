"""Hook executables: WATCHER_* environment, per-hook timeout, app user, log streaming, tail."""

from __future__ import annotations

import collections
import contextlib
import errno
import grp
import os
import pwd
import re
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.config import HOOK_PHASES, AppConfig
from watcher.errors import HookError
from watcher.log import get_logger
from watcher.releases import LinuxProcReader

#: The PATH hooks get: the daemon's own environment is never passed through.
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Where a release carries its own hooks, relative to the release directory.
RELEASE_HOOKS_DIR = Path(".watcher") / "hooks"
#: After SIGTERM to a hook's process group, how long before SIGKILL.
KILL_GRACE = 5.0
#: What a hook stopped by ``run_hooks``'s ``cancel`` reports.
CANCELLED = "the deploy no longer needs it"
#: After a hook's main process exits, how long its children may keep the output pipe open.
PIPE_GRACE = 2.0
#: A failure keeps at most this much of the end of the output (lines, then characters).
TAIL_LINES = 40
TAIL_CHARS = 4096
#: Longer output lines are split; one hook run logs at most MAX_LOGGED_LINES lines and
#: MAX_LOGGED_BYTES bytes of output, whichever comes first (journald rate-limits a unit
#: anyway, and one 50 MB line would otherwise be logged as ~41 MB): the rest is counted,
#: one ``hook_output_truncated`` line says how much was not logged, and the tail is still
#: kept.
MAX_LINE_BYTES = 4096
MAX_LOGGED_LINES = 10_000
MAX_LOGGED_BYTES = 1024 * 1024
#: How a hook that was started ended (``run_hooks``'s ``on_result``; a metric label): by
#: itself with status 0, by itself otherwise (or it could not start), at its timeout, or
#: stopped by ``cancel``.
HOOK_OK, HOOK_FAILED, HOOK_TIMEOUT, HOOK_CANCELLED = "ok", "failed", "timeout", "cancelled"
HOOK_RESULTS = (HOOK_OK, HOOK_FAILED, HOOK_TIMEOUT, HOOK_CANCELLED)


@dataclass(frozen=True)
class HookContext:
    """What a hook is told about the deploy, as WATCHER_* variables (empty when unknown)."""

    app: str
    deploy_id: str = ""
    kind: str = ""
    artifact: str = ""
    commit: str = ""
    branch: str = ""
    release: str = ""
    release_dir: str = ""
    previous_release_dir: str = ""
    current: str = ""
    current_backup: str = ""

    def environ(self, phase: str) -> dict[str, str]:
        """The WATCHER_* variables of DESIGN.md section 7 for ``phase``."""
        return {
            "WATCHER_APP": self.app,
            "WATCHER_DEPLOY_ID": self.deploy_id,
            "WATCHER_KIND": self.kind,
            "WATCHER_ARTIFACT": self.artifact,
            "WATCHER_COMMIT": self.commit,
            "WATCHER_BRANCH": self.branch,
            "WATCHER_RELEASE": self.release,
            "WATCHER_RELEASE_DIR": self.release_dir,
            "WATCHER_PREVIOUS_RELEASE_DIR": self.previous_release_dir,
            "WATCHER_CURRENT": self.current,
            "WATCHER_CURRENT_BACKUP": self.current_backup,
            "WATCHER_PHASE": phase,
        }


@dataclass(frozen=True)
class HookResult:
    """One hook that ran to success."""

    phase: str
    hook: str
    duration: float
    output_lines: int


@dataclass(frozen=True)
class _Identity:
    """Who a hook runs as: Popen keyword arguments plus the user's HOME and name."""

    popen: Mapping[str, Any]
    home: str
    name: str


_running = 0  # hook processes of this daemon running now (``running_hooks``)
_running_lock = threading.Lock()


def running_hooks() -> int:
    """How many hook processes run now, in every app: a stop asks systemd for more time
    only while one does (a download or an extraction gets the unit's own timeout)."""
    with _running_lock:
        return _running


@contextlib.contextmanager
def _counted() -> Iterator[None]:
    global _running
    with _running_lock:
        _running += 1
    try:
        yield
    finally:
        with _running_lock:
            _running -= 1


def _check_phase(phase: str) -> None:
    if phase not in HOOK_PHASES:
        raise ValueError(f"unknown hook phase {phase!r} (known: {', '.join(HOOK_PHASES)})")


def hook_commands(app: AppConfig, phase: str, release_dir: Path) -> list[tuple[str, ...]]:
    """The argv of every hook of ``phase``, in order: the config's, then the release's own.

    A release provides ``.watcher/hooks/<phase>`` and/or the entries of
    ``.watcher/hooks/<phase>.d/`` (sorted by name, dot-files skipped). Whether they are
    executable files is checked when they run, so a broken one (a directory included) fails
    loudly instead of being skipped.
    """
    _check_phase(phase)
    commands = [tuple(argv) for argv in app.hooks.get(phase, ())]
    hooks_dir = Path(release_dir) / RELEASE_HOOKS_DIR
    single = hooks_dir / phase
    if single.exists() or single.is_symlink():
        commands.append((str(single),))
    parts = hooks_dir / f"{phase}.d"
    if parts.is_dir():
        for entry in sorted(parts.iterdir(), key=lambda p: p.name):
            if not entry.name.startswith("."):
                commands.append((str(entry),))
    return commands


def _identity(app: AppConfig, phase: str) -> _Identity:
    """Popen arguments that drop to ``app.user`` (and its groups) when one is configured."""
    if not app.user:
        entry = _passwd_of(os.geteuid())
        return _Identity({}, entry.pw_dir if entry else "/", entry.pw_name if entry else "")
    try:
        user = pwd.getpwnam(app.user)
    except KeyError:
        raise HookError(phase, app.user, f'no such user "{app.user}"') from None
    gid = user.pw_gid
    if app.group:
        try:
            gid = grp.getgrnam(app.group).gr_gid
        except KeyError:
            raise HookError(phase, app.group, f'no such group "{app.group}"') from None
    if os.geteuid() != 0:
        if user.pw_uid == os.geteuid():
            return _Identity({}, user.pw_dir, user.pw_name)
        raise HookError(
            phase, app.user, f'cannot run as user "{app.user}": the watcher is not root'
        )
    groups = [g for g in os.getgrouplist(user.pw_name, gid) if g != gid]
    return _Identity(
        {"user": user.pw_uid, "group": gid, "extra_groups": groups}, user.pw_dir, user.pw_name
    )


def _passwd_of(uid: int) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def base_environ(identity_home: str, identity_name: str) -> dict[str, str]:
    """The clean minimal environment every hook and ``exec`` starts from."""
    env = {
        "PATH": HOOK_PATH,
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "HOME": identity_home,
    }
    if identity_name:
        env["USER"] = env["LOGNAME"] = identity_name
    return env


#: Why a move of `current` during a phase's hooks fails that step (docs/hooks.md).
HOOK_MOVED_CURRENT = "a hook must not switch current"


def current_moved(
    phase: str, hooks: str, now: str | None, expected: str | None, why: str
) -> HookError:
    """The step's failure when `current` names ``now`` after ``phase``'s hooks (``hooks``,
    for the message) instead of ``expected``: the watcher's checks after its own switches
    and `watcherctl rollback --local`'s say it alike."""
    return HookError(
        phase,
        hooks,
        f"current names {now or 'nothing'} after the hooks ran, not {expected or 'nothing'}: "
        + why,
    )


def _hook_name(argv0: str, release_dir: Path) -> str:
    """How a hook is named in logs and errors: release hooks relative to the release."""
    try:
        return str(Path(argv0).relative_to(release_dir))
    except ValueError:
        return argv0


def run_hooks(
    app: AppConfig,
    phase: str,
    ctx: HookContext,
    *,
    kill_grace: float = KILL_GRACE,
    cancel: Callable[[], bool] | None = None,
    on_result: Callable[[str], None] | None = None,
) -> list[HookResult]:
    """Run every hook of ``phase`` in order; raise HookError at the first failure.

    ``on_result``: told how each hook it tried ended (one of HOOK_RESULTS), before a
    failure is raised; a hook not started because of ``cancel`` is not one.

    ``cancel``: asked while a hook runs (about every 50 ms) and before each one; once it
    says yes, the running hook's group is stopped as at its timeout (SIGTERM, then SIGKILL
    after ``kill_grace``) and HookError says so. A deploy that no longer needs the phase
    (aborted, or past this host's prepare deadline) does not leave its hook running.
    """
    _check_phase(phase)
    release_dir = Path(ctx.release_dir)
    commands = hook_commands(app, phase, release_dir)
    if not commands:
        return []
    try:
        identity = _identity(app, phase)
    except HookError as exc:  # no hook can run (no such user): the first one failed
        if on_result is not None:
            on_result(exc.result)
        raise
    env = base_environ(identity.home, identity.name)
    env.update(ctx.environ(phase))
    results = []
    for argv in commands:
        if cancel is not None and cancel():
            name = _hook_name(argv[0], release_dir)
            raise HookError(phase, name, f"not started: {CANCELLED}")
        try:
            results.append(
                _run_one(
                    app,
                    phase,
                    argv,
                    release_dir,
                    env,
                    identity,
                    app.timeouts.hook,
                    kill_grace,
                    cancel,
                )
            )
        except HookError as exc:
            if on_result is not None:
                on_result(exc.result)
            raise
        if on_result is not None:
            on_result(HOOK_OK)
    return results


def _check_executable(phase: str, name: str, path: Path, release_dir: Path) -> None:
    if not path.exists():
        raise HookError(phase, name, "not found")
    if str(path).startswith(str(release_dir) + os.sep):
        real, root = path.resolve(), release_dir.resolve()
        if real != root and root not in real.parents:
            raise HookError(phase, name, f"resolves outside the release ({real})")
    if path.is_dir():
        raise HookError(phase, name, "is a directory, not an executable file")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise HookError(phase, name, "not executable (chmod +x it)")


def _run_one(
    app: AppConfig,
    phase: str,
    argv: tuple[str, ...],
    release_dir: Path,
    env: Mapping[str, str],
    identity: _Identity,
    timeout: float,
    kill_grace: float,
    cancel: Callable[[], bool] | None = None,
) -> HookResult:
    name = _hook_name(argv[0], release_dir)
    log = get_logger(app=app.name, phase=phase, hook=name)
    _check_executable(phase, name, Path(argv[0]), release_dir)
    if not release_dir.is_dir():
        raise HookError(phase, name, f"release directory {release_dir} does not exist")
    started = time.monotonic()
    log.info("hook_started", timeout=timeout)
    with _counted():  # from before its start: what asks it to stop sees it
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=release_dir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                umask=app.umask,
                **identity.popen,
            )
        except (OSError, ValueError, TypeError) as exc:  # ValueError: a NUL byte in the env
            who = f" as {identity.name}" if identity.popen else ""
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
                reason = _missing_interpreter(Path(argv[0]), release_dir) or reason
            raise HookError(phase, name, f"cannot start{who}: {reason}") from None
        run = _HookProcess(proc, log, timeout=timeout, kill_grace=kill_grace, cancel=cancel)
        outcome = run.wait()
    duration = time.monotonic() - started
    tail = run.tail()
    if outcome is not None or proc.returncode != 0:
        result = run.stopped_by or HOOK_FAILED
        if outcome is None:
            outcome = _describe_status(proc.returncode)
        log.warning("hook_failed", reason=outcome, took_ms=round(duration * 1000))
        raise HookError(phase, name, outcome, output_tail=tail, result=result)
    log.info("hook_finished", took_ms=round(duration * 1000), output_lines=run.lines)
    return HookResult(phase=phase, hook=name, duration=duration, output_lines=run.lines)


#: How much of a file the kernel reads for its ``#!`` line (BINPRM_BUF_SIZE, Linux >= 5.1).
SHEBANG_BYTES = 256


def _missing_interpreter(path: Path, cwd: Path) -> str | None:
    """Why an existing ``path`` that exec refused with ENOENT cannot start, when its ``#!``
    line is the cause: the interpreter it names does not exist, or that line ends with a
    carriage return (a file saved with CRLF line endings: the kernel looks for ``sh\\r``).
    None when the file cannot be read, has no ``#!`` line, or names one that exists."""
    try:
        with path.open("rb") as f:
            head = f.read(SHEBANG_BYTES)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    # As the kernel reads it: blanks before the interpreter, which ends at a blank or the
    # end of the line; a carriage return is no blank to it.
    line = head[2:].split(b"\n", 1)[0].lstrip(b" \t")
    interpreter = re.split(rb"[ \t\0]", line, maxsplit=1)[0].decode("utf-8", "replace")
    if not interpreter or (cwd / interpreter).exists():  # relative: from the working dir
        return None
    bare = interpreter.rstrip("\r")
    if bare != interpreter and (cwd / bare).exists():
        return (
            f"its #! line ends with a carriage return (the file has CRLF line endings), so "
            f"the interpreter it names is {bare} followed by \\r, which does not exist: "
            f"save the file with LF line endings (e.g. dos2unix)"
        )
    shown = interpreter.replace("\r", "\\r")
    return f"its interpreter {shown} (from the #! line) does not exist"


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _HookProcess:
    """Streams a hook's merged output to the log and enforces its timeout on the whole group."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        log: Any,
        *,
        timeout: float,
        kill_grace: float,
        cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.proc = proc
        self.log = log
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.cancel = cancel
        self.lines = 0
        self.bytes = 0  # of output, newlines not counted
        self.logged_lines = 0
        self.logged_bytes = 0
        self.stopped_by = ""  # HOOK_TIMEOUT or HOOK_CANCELLED once ``wait`` stopped it
        self._partial = b""
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        # What the hook started outside its group (setsid, or a new process group), found
        # when it is stopped: pid -> start time (a pid reused since is not signalled).
        self._escaped: dict[int, int] = {}

    def tail(self) -> str:
        text = "\n".join(self._tail)
        return text[-TAIL_CHARS:]

    def _exited(self) -> bool:
        """Whether the main process has exited, without reaping it (its pid keeps the group)."""
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        for pid, started in self._escaped.items():
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def _stop(self, sig: signal.Signals) -> None:
        """Signal the hook's group and every process below the hook, in its group or not
        (a `setsid cmd &` leaves the group: a timeout must stop it too). The tree is read
        while the hook's main process lives (its children still name it as parent)."""
        if not self._exited():
            self._escaped.update(_descendants(self.proc.pid))
        self._signal_group(sig)

    def _kill_pipe_holders(self, pipe: Any) -> None:
        """SIGKILL what still holds the hook's output pipe once the hook and its group are
        gone: a writer that left the group and outlived its parent (no tree leads to it)."""
        for pid, started in _holders_of(pipe.fileno()).items():
            self._escaped[pid] = started
        self._signal_group(signal.SIGKILL)

    def wait(self) -> str | None:
        """Run to the end; None when the hook ended by itself, else why it was stopped."""
        assert self.proc.stdout is not None
        pipe = self.proc.stdout
        os.set_blocking(pipe.fileno(), False)
        sel = selectors.DefaultSelector()
        sel.register(pipe, selectors.EVENT_READ)
        deadline = time.monotonic() + self.timeout
        stopped: str | None = None
        exited_at: float | None = None
        term_at: float | None = None
        killed_at: float | None = None
        eof = exited = False
        try:
            while True:
                if eof:
                    time.sleep(0.02)
                else:
                    for _key, _events in sel.select(timeout=0.05):
                        eof = self._read(pipe)
                exited = self._exited()
                if exited and eof:
                    break
                now = time.monotonic()
                if exited and exited_at is None:
                    exited_at = now
                if (
                    stopped is None
                    and not exited
                    and self.cancel is not None
                    and self.cancel()
                    and not self._exited()  # a hook that ended meanwhile ended by itself
                ):
                    stopped = f"stopped: {CANCELLED}"
                    self.stopped_by = HOOK_CANCELLED
                    self.log.warning("hook_cancelled")
                    self._stop(signal.SIGTERM)
                    term_at = now
                # A hook that has exited ended by itself, however late this sees it: after
                # a pause of the daemon (SIGSTOP, a VM frozen) past the deadline, the pipe's
                # end-of-file may not have been read yet (epoll_wait answers EINTR at the
                # SIGCONT, and Python's select then returns nothing), and a validate that
                # passed in 4 s was told as "timed out after 20s" (the status review).
                if stopped is None and not exited and now >= deadline:
                    stopped = f"timed out after {self.timeout:g}s"
                    self.stopped_by = HOOK_TIMEOUT
                    self.log.warning("hook_timeout", timeout=self.timeout)
                    self._stop(signal.SIGTERM)
                    term_at = now
                if killed_at is None and (
                    (term_at is not None and now >= term_at + self.kill_grace)
                    or (exited_at is not None and now >= exited_at + PIPE_GRACE)
                ):
                    if term_at is None:
                        # The hook is done, but something it started still holds the pipe.
                        self.log.warning("hook_children_killed", grace=PIPE_GRACE)
                    self._stop(signal.SIGKILL)
                    killed_at = now
                if killed_at is not None and exited and now >= killed_at + 1.0:
                    # A writer that left the group (setsid) and outlived its parent.
                    self._kill_pipe_holders(pipe)
                    self._drain(pipe)
                    break
        finally:
            sel.close()
            if (stopped is not None and killed_at is None) or not exited:
                self._stop(signal.SIGKILL)
            self.proc.wait()
            pipe.close()
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        if self.logged_lines < self.lines:
            self.log.warning(
                "hook_output_truncated",
                lines=self.lines,
                logged=self.logged_lines,
                not_logged_lines=self.lines - self.logged_lines,
                not_logged_bytes=self.bytes - self.logged_bytes,
            )
        return stopped

    def _drain(self, pipe: Any) -> None:
        """Read what is still buffered in the pipe, without blocking."""
        with contextlib.suppress(OSError):
            while not self._read(pipe):
                if not _readable(pipe):
                    return

    def _read(self, pipe: Any) -> bool:
        """Read what is available; True at end of file."""
        try:
            chunk = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        self._feed(chunk)
        return False

    def _feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *lines, rest = data.split(b"\n")
        for line in lines:
            self._emit(line)
        while len(rest) > MAX_LINE_BYTES:
            self._emit(rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
        self._partial = rest

    def _emit(self, raw: bytes) -> None:
        for start in range(0, max(len(raw), 1), MAX_LINE_BYTES):
            piece = raw[start : start + MAX_LINE_BYTES]
            line = piece.decode("utf-8", "replace").rstrip("\r")
            if "\r" in line:
                # A progress bar redrawn in place (`10%\r20%\r...`): what a terminal ends
                # up showing, not every step escaped as \x0d.
                line = line.rsplit("\r", 1)[1]
            self.lines += 1
            self.bytes += len(piece)
            self._tail.append(line)
            # Once one line is not logged, none after it is: the log never skips a part.
            if (
                self.logged_lines == self.lines - 1
                and self.logged_lines < MAX_LOGGED_LINES
                and self.logged_bytes + len(piece) <= MAX_LOGGED_BYTES
            ):
                self.logged_lines += 1
                self.logged_bytes += len(piece)
                self.log.info("hook_output", line=line)


_PROC = LinuxProcReader()


def _start_time(pid: int) -> int | None:
    try:
        return _PROC.parent_and_start(pid)[1]
    except (OSError, ValueError):  # gone
        return None


def _descendants(root: int) -> dict[int, int]:
    """Every process below ``root`` now, by their parent links: pid -> start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for pid in _PROC.pids():
        try:
            parent, started = _PROC.parent_and_start(pid)
        except (OSError, ValueError):  # exited meanwhile
            continue
        children.setdefault(parent, []).append((pid, started))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, started in children.get(todo.pop(), ()):
            if pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def _holders_of(fd: int) -> dict[int, int]:
    """Other processes that hold the pipe ``fd`` is an end of: pid -> start time."""
    name = f"pipe:[{os.fstat(fd).st_ino}]"
    found: dict[int, int] = {}
    for pid in _PROC.pids():
        try:
            held = pid != os.getpid() and name in _PROC.fd_targets(pid)
        except OSError:  # exited, or not ours to read
            continue
        started = _start_time(pid) if held else None
        if started is not None:
            found[pid] = started
    return found


def _readable(pipe: Any) -> bool:
    """Whether ``pipe`` has data (or EOF) to read right now."""
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ)
        return bool(sel.select(timeout=0))


@contextlib.contextmanager
def _parent_ignores_interrupts() -> Iterator[None]:
    """Like a shell: Ctrl-C and Ctrl-\\ go to the command in the foreground, not to us.

    A no-op handler (not SIG_IGN, which the command would inherit) for the duration; only the
    main thread can set handlers, elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGINT, signal.SIGQUIT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _ignore_signal(signum: int, frame: Any) -> None:
    """A handler that does nothing (the default disposition comes back in an exec'd child)."""


def run_in_release(
    app: AppConfig,
    release_dir: Path,
    argv: Sequence[str],
    env_extra: Mapping[str, str] | None = None,
) -> int:
    """Run ``argv`` inside a release (``watcherctl exec``) with stdio inherited.

    Same clean environment and user as hooks, plus ``env_extra``; returns the exit status
    (128 + N when killed by signal N, like a shell).
    """
    if not argv:
        raise ValueError("run_in_release needs a command")
    identity = _identity(app, "exec")
    env = base_environ(identity.home, identity.name)
    env.update(env_extra or {})
    try:
        with (
            _parent_ignores_interrupts(),
            subprocess.Popen(
                list(argv),
                cwd=release_dir,
                env=env,
                close_fds=True,
                umask=app.umask,
                **identity.popen,
            ) as proc,
        ):
            proc.wait()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOENT and "/" in argv[0]:  # a path, not a command on PATH
            reason = _missing_interpreter(release_dir / argv[0], release_dir) or reason
        raise HookError("exec", argv[0], f"cannot start: {reason}") from None
    code = proc.returncode
    return 128 - code if code < 0 else code
