"""Atomic writes, directory fsync and the per-app flock, on the real filesystem."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from tests.support.locks import hold_instance_lock
from watcher import fsutil
from watcher.errors import LockTimeout, ReleaseError
from watcher.fsutil import (
    WATCHER_RUN_OWNER,
    AppLock,
    append_bytes,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    holds_flock,
    signal_watcher,
    watcher_runs,
)


class TestAtomicWrite:
    def test_writes_content_and_mode(self, tmp_path: Path) -> None:
        target = tmp_path / "state.bin"
        atomic_write_bytes(target, b"one", mode=0o600)
        assert target.read_bytes() == b"one"
        assert target.stat().st_mode & 0o777 == 0o600
        atomic_write_bytes(target, b"two")
        assert target.read_bytes() == b"two"
        assert target.stat().st_mode & 0o777 == 0o644
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]

    def test_mode_is_not_narrowed_by_umask(self, tmp_path: Path) -> None:
        old = os.umask(0o077)
        try:
            atomic_write_bytes(tmp_path / "f", b"x", mode=0o644)
        finally:
            os.umask(old)
        assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644

    def test_json_round_trip(self, tmp_path: Path) -> None:
        target = tmp_path / "holds.json"
        atomic_write_json(target, {"b": 1, "a": [1, 2]})
        assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
        assert target.read_text().endswith("\n")

    def test_failed_rename_leaves_old_content_and_no_temp(self, tmp_path: Path) -> None:
        target = tmp_path / "adir"
        target.mkdir()
        (target / "inside").write_text("keep")
        with pytest.raises(OSError):
            atomic_write_bytes(target, b"new")  # cannot rename a file over a non-empty dir
        assert (target / "inside").read_text() == "keep"
        assert [p.name for p in tmp_path.iterdir()] == ["adir"]

    def test_missing_directory_raises(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            atomic_write_bytes(tmp_path / "nope" / "f", b"x")

    def test_parents_makes_the_directory_only_when_it_is_missing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        target = tmp_path / "state" / "deep" / "f.json"
        atomic_write_json(target, {"a": 1}, parents=True)
        assert json.loads(target.read_text()) == {"a": 1}

        def no_mkdir(*args: object, **kwargs: object) -> None:
            raise AssertionError("mkdir of a directory that exists")

        monkeypatch.setattr(Path, "mkdir", no_mkdir)
        atomic_write_json(target, {"a": 2}, parents=True)
        assert json.loads(target.read_text()) == {"a": 2}


APPEND_UNDER_A_SIZE_LIMIT = """
import resource, signal, sys
from watcher.fsutil import append_bytes
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    append_bytes(sys.argv[1], b"y" * 100 + b"\\n", durable=True)
except OSError as exc:
    print(exc.errno)
"""


class TestAppend:
    def test_appends_to_what_is_there(self, tmp_path: Path) -> None:
        target = tmp_path / "journal"
        atomic_write_bytes(target, b"one\n")
        append_bytes(target, b"two\n", durable=True)
        append_bytes(target, b"three\n", durable=False)
        assert target.read_bytes() == b"one\ntwo\nthree\n"

    def test_a_missing_file_is_not_created(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            append_bytes(tmp_path / "journal", b"x\n", durable=True)
        assert not (tmp_path / "journal").exists()

    def test_a_symlink_is_not_followed(self, tmp_path: Path) -> None:
        (tmp_path / "elsewhere").write_bytes(b"keep\n")
        (tmp_path / "journal").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(OSError):
            append_bytes(tmp_path / "journal", b"x\n", durable=True)
        assert (tmp_path / "elsewhere").read_bytes() == b"keep\n"

    def test_a_write_the_disk_cuts_short_is_taken_back(self, tmp_path: Path) -> None:
        """A real short write: the file size limit lets the kernel write 30 of the 101
        bytes and refuse the rest, as a disk that fills up halfway would."""
        target = tmp_path / "journal"
        target.write_bytes(b"x" * 49 + b"\n")
        done = subprocess.run(
            [sys.executable, "-c", APPEND_UNDER_A_SIZE_LIMIT, str(target), "80"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert done.stdout.strip() == str(errno.EFBIG), done.stderr
        assert target.read_bytes() == b"x" * 49 + b"\n"


class TestFsyncDir:
    def test_existing_dir(self, tmp_path: Path) -> None:
        fsync_dir(tmp_path)  # no error is the contract

    def test_missing_dir_raises(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            fsync_dir(tmp_path / "missing")


class TestAppLock:
    def test_an_unopenable_lock_is_a_clear_error(self, tmp_path: Path) -> None:
        (tmp_path / "state").write_text("a file where the .state directory should be")
        lock = AppLock(tmp_path / "state" / "lock", timeout=1, owner="test")
        with pytest.raises(ReleaseError, match=r"cannot open the app lock .*state/lock"):
            lock.acquire()
        assert not lock.locked
        # The daemon's instance locks say which setting names their place.
        named = AppLock(tmp_path / "state" / "lock", timeout=1, owner="t", what="the lock in x.y")
        with pytest.raises(ReleaseError, match=r"cannot open the lock in x\.y .*state/lock"):
            named.acquire()

    def test_a_lock_through_a_link_is_refused_or_left_untouched(self, tmp_path: Path) -> None:
        """The holder truncates its lock file and writes its pid there: through a symlink
        (or a hard link), a daemon run as root did it to whatever that named. A symlink (or
        a FIFO) is refused; a file with a second name (a hard link, or a `cp -al`
        snapshot's, which must not stop deploys) is locked but not written; another
        user's plain file (an earlier run under another `User=`) is used as before."""
        state = tmp_path / ".state"
        state.mkdir()
        precious = tmp_path / "shadow"
        precious.write_text("root:secret\n")
        lock_path = state / "lock"
        lock_path.symlink_to(precious)
        with pytest.raises(
            ReleaseError,
            match=r"cannot use the app lock .*: it is a symbolic link, which the watcher never",
        ):
            AppLock(lock_path, timeout=0, owner="daemon").acquire()
        lock_path.unlink()
        os.link(precious, lock_path)
        with AppLock(lock_path, timeout=0, owner="daemon") as held:
            assert held.locked
            with pytest.raises(LockTimeout, match="held by an unknown process"):
                AppLock(lock_path, timeout=0, owner="other").acquire()  # it excludes
        assert precious.read_text() == "root:secret\n"  # neither truncated nor written
        lock_path.unlink()
        os.mkfifo(lock_path)
        with pytest.raises(ReleaseError, match=r"it is not a plain file, which the watcher"):
            AppLock(lock_path, timeout=0, owner="daemon").acquire()
        lock_path.unlink()
        lock_path.write_text("4242 an earlier run\n")
        if os.geteuid() == 0:
            os.chown(lock_path, 65534, 65534)  # nobody's, as after a `User=` install
        with AppLock(lock_path, timeout=0, owner="daemon") as held:
            assert lock_path.read_text() == f"{os.getpid()} daemon\n"

    def test_second_holder_times_out_naming_path_and_owner(self, tmp_path: Path) -> None:
        lock_path = tmp_path / ".state" / "lock"
        with AppLock(lock_path, timeout=1, owner="watcherctl prune") as held:
            assert held.locked
            assert lock_path.read_text().strip() == f"{os.getpid()} watcherctl prune"
            started = time.monotonic()
            with pytest.raises(LockTimeout) as info:
                AppLock(lock_path, timeout=0.2, owner="daemon").acquire()
            assert time.monotonic() - started >= 0.2
            message = str(info.value)
            assert str(lock_path) in message
            assert "watcherctl prune" in message and str(os.getpid()) in message
        # released: the next one gets it at once
        with AppLock(lock_path, timeout=0, owner="daemon") as again:
            assert again.locked
        assert not again.locked

    def test_a_waiter_quotes_the_holders_first_line_escaped(self, tmp_path: Path) -> None:
        """What the file says is quoted in a message on a terminal: its first line, with
        escape sequences shown, not a screen cleared or a line forged after it."""
        lock_path = tmp_path / "lock"
        with AppLock(lock_path, timeout=0, owner="t") as held:
            assert held.locked
            lock_path.write_text("4242 \x1b[2Jevil\nwatcher: forged line\n" + "x" * 5000)
            with pytest.raises(LockTimeout) as info:
                AppLock(lock_path, timeout=0, owner="daemon").acquire()
        message = str(info.value)
        assert "held by 4242 \\x1b[2Jevil" in message, message
        assert "\x1b" not in message and "\n" not in message and "forged" not in message

    def test_makes_its_directory_only_when_it_is_missing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        lock_path = tmp_path / "app" / ".state" / "lock"
        with AppLock(lock_path, timeout=0, owner="t"):
            assert lock_path.exists()

        def no_mkdir(*args: object, **kwargs: object) -> None:
            raise AssertionError("mkdir of a directory that exists")

        monkeypatch.setattr(Path, "mkdir", no_mkdir)
        with AppLock(lock_path, timeout=0, owner="t") as again:
            assert again.locked

    def test_accepts_a_layout(self, tmp_path: Path) -> None:
        class Layout:
            lock_file = tmp_path / "x" / "lock"

        with AppLock(Layout(), timeout=0, owner="t") as lock:
            assert lock.path == tmp_path / "x" / "lock"
            assert lock.path.exists()

    def test_waits_until_holder_releases(self, tmp_path: Path) -> None:
        lock_path = tmp_path / "lock"
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time; from watcher.fsutil import AppLock\n"
                f"with AppLock({str(lock_path)!r}, timeout=5, owner='child'):\n"
                "    print('held', flush=True); time.sleep(0.5)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "held"
            started = time.monotonic()
            with AppLock(lock_path, timeout=5, owner="parent"):
                waited = time.monotonic() - started
            assert 0.2 < waited < 4
        finally:
            child.wait(timeout=10)

    def test_lock_dies_with_a_killed_holder(self, tmp_path: Path) -> None:
        lock_path = tmp_path / "lock"
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; from watcher.fsutil import AppLock\n"
                f"l = AppLock({str(lock_path)!r}, timeout=5, owner='doomed'); l.acquire()\n"
                "print('held', flush=True); time.sleep(60)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "held"
            with pytest.raises(LockTimeout, match="doomed"):
                AppLock(lock_path, timeout=0.1, owner="parent").acquire()
            child.kill()
            child.wait(timeout=10)
            with AppLock(lock_path, timeout=2, owner="parent") as lock:
                assert lock.locked
        finally:
            child.kill()
            child.wait(timeout=10)


class TestSignalWatcher:
    """`watcherctl hold` wakes the watcher that holds the app's instance lock and says it
    takes SIGUSR1; anything else must not get the signal (its default action ends a
    process: an older watcher, a process that took a stopped daemon's pid since)."""

    @pytest.fixture
    def spawn(self) -> Iterator[Callable[..., Popen]]:
        """Start processes that record a SIGUSR1 in ``<where>/got``; each, given ``lock``,
        holds it as a `watcher run` does (flock, then its pid and ``owner`` written into
        it). All are killed when the test ends."""
        started: list[Popen] = []

        def start(where: Path, lock: Path | None, owner: str = WATCHER_RUN_OWNER) -> Popen:
            code = (
                "import fcntl, os, signal, sys, time\n"
                "def h(*_):\n"
                f"    open({str(where / 'got')!r}, 'w').write('usr1')\n"
                "signal.signal(signal.SIGUSR1, h)\n"
                f"lock = {str(lock) if lock else ''!r}\n"
                "if lock:\n"
                "    fd = os.open(lock, os.O_RDWR | os.O_CREAT)\n"
                "    fcntl.flock(fd, fcntl.LOCK_EX)\n"
                f"    os.write(fd, f'{{os.getpid()}} {owner}\\n'.encode())\n"
                f"open({str(where / 'ready')!r}, 'w').close()\n"
                "while True: time.sleep(0.05)\n"
            )
            proc = subprocess.Popen([sys.executable, "-c", code])
            started.append(proc)
            deadline = time.monotonic() + 10
            while not (where / "ready").exists():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            return proc

        yield start
        for proc in started:
            proc.kill()
            proc.wait()

    @staticmethod
    def got_it(tmp_path: Path, proc: Popen) -> bool:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not (tmp_path / "got").exists():
            time.sleep(0.02)
        assert proc.poll() is None  # alive either way
        return (tmp_path / "got").exists()

    def test_the_holder_that_says_it_takes_the_signal_gets_it(
        self, tmp_path: Path, spawn: Callable[..., Popen]
    ) -> None:
        lock = tmp_path / "daemon.lock"
        proc = spawn(tmp_path, lock)
        assert holds_flock(proc.pid, lock) and not holds_flock(os.getpid(), lock)
        assert signal_watcher(lock, signal.SIGUSR1) == proc.pid
        assert self.got_it(tmp_path, proc)

    def test_an_older_watcher_gets_nothing(
        self, tmp_path: Path, spawn: Callable[..., Popen]
    ) -> None:
        """The owner a watcher wrote before it took SIGUSR1: it would die of it."""
        lock = tmp_path / "daemon.lock"
        proc = spawn(tmp_path, lock, owner="watcher run")
        assert signal_watcher(lock, signal.SIGUSR1) is None
        assert not self.got_it(tmp_path, proc)

    def test_a_pid_left_in_the_file_by_a_stopped_watcher_gets_nothing(
        self, tmp_path: Path, spawn: Callable[..., Popen]
    ) -> None:
        """The file names a live process that does not hold the lock (the number was
        taken since): no signal."""
        proc = spawn(tmp_path, None)
        lock = tmp_path / "daemon.lock"
        lock.write_text(f"{proc.pid} {WATCHER_RUN_OWNER}\n")
        assert not holds_flock(proc.pid, lock)
        assert signal_watcher(lock, signal.SIGUSR1) is None
        assert not self.got_it(tmp_path, proc)

    def test_a_file_naming_another_pid_than_the_holder_gets_nothing(
        self, tmp_path: Path, spawn: Callable[..., Popen]
    ) -> None:
        lock = tmp_path / "daemon.lock"
        holder = spawn(tmp_path, lock)
        (tmp_path / "other").mkdir()
        other = spawn(tmp_path / "other", None)
        lock.write_text(f"{other.pid} {WATCHER_RUN_OWNER}\n")
        assert signal_watcher(lock, signal.SIGUSR1) is None
        assert not self.got_it(tmp_path, holder)
        assert not (tmp_path / "other" / "got").exists() and other.poll() is None

    @pytest.mark.parametrize(
        "content",
        ["", "\n", f"abc {WATCHER_RUN_OWNER}", f"1 {WATCHER_RUN_OWNER}", f"0 {WATCHER_RUN_OWNER}"],
    )
    def test_an_empty_or_odd_lock_file_names_nobody(self, tmp_path: Path, content: str) -> None:
        lock = tmp_path / "daemon.lock"
        lock.write_text(content)
        assert signal_watcher(lock, signal.SIGUSR1) is None
        assert signal_watcher(tmp_path / "absent.lock", signal.SIGUSR1) is None


class TestWatcherRuns:
    """Whether a `watcher run` holds an app's instance lock now: `rollback --local` takes
    a journal's "preparing" for a deploy being staged only then."""

    def test_only_a_holder_the_file_names_runs(self, tmp_path: Path) -> None:
        lock = tmp_path / "daemon.lock"
        assert not watcher_runs(lock)  # no file
        proc = hold_instance_lock(lock)
        try:
            assert watcher_runs(lock)
            lock.write_text(f"{proc.pid} watcher run\n")  # an older watcher's owner
            assert not watcher_runs(lock)
            lock.write_text(f"{'9' * 40} {WATCHER_RUN_OWNER}\n")
            assert not watcher_runs(lock)
        finally:
            proc.kill()
            proc.wait()
        lock.write_text(f"{proc.pid} {WATCHER_RUN_OWNER}\n")  # stopped: its pid stays
        assert not watcher_runs(lock)

    def test_another_users_watcher_whose_fds_cannot_be_read_counts_as_running(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A user asking of a root watcher cannot read its /proc fds: taken for running
        while its pid lives (the callers refuse what a running watcher makes unsafe)."""
        lock = tmp_path / "daemon.lock"
        proc = hold_instance_lock(lock)
        try:

            def unreadable(pid: int, path: Any) -> bool:
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(fsutil, "holds_flock", unreadable)
            assert watcher_runs(lock)
        finally:
            proc.kill()
            proc.wait()
        assert not watcher_runs(lock)  # that pid is gone
