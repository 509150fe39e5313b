"""Hook executables: environment, ordering, timeouts, process groups, users, output."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from tests.support.memory import least_peak
from tests.support.procs import reaped
from watcher import hooks
from watcher.config import AppConfig, Timeouts
from watcher.errors import HookError
from watcher.hooks import HookContext, hook_commands, run_hooks, run_in_release, running_hooks
from watcher.log import configure_logging

ALL_VARS = (
    "WATCHER_APP",
    "WATCHER_DEPLOY_ID",
    "WATCHER_KIND",
    "WATCHER_ARTIFACT",
    "WATCHER_COMMIT",
    "WATCHER_BRANCH",
    "WATCHER_RELEASE",
    "WATCHER_RELEASE_DIR",
    "WATCHER_PREVIOUS_RELEASE_DIR",
    "WATCHER_CURRENT",
    "WATCHER_CURRENT_BACKUP",
    "WATCHER_PHASE",
)


def write_script(path: Path, body: str, *, executable: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755 if executable else 0o644)
    return path


def make_app(root: Path, hooks_by_phase: dict[str, Any] | None = None, **kw: Any) -> AppConfig:
    timeouts = Timeouts(hook=kw.pop("hook_timeout", 10.0))
    return AppConfig(
        name="web", root=str(root), hooks=hooks_by_phase or {}, timeouts=timeouts, **kw
    )


def make_ctx(release_dir: Path, **kw: str) -> HookContext:
    fields = {
        "app": "web",
        "deploy_id": "d-123",
        "kind": "deploy",
        "artifact": "master-15eb13af",
        "commit": "15eb13af0000000000000000000000000000beef",
        "branch": "master",
        "release": release_dir.name,
        "release_dir": str(release_dir),
        "previous_release_dir": str(release_dir.parent / "20260101T000000Z-master-00000000"),
        "current": str(release_dir.parent.parent / "current"),
        "current_backup": str(release_dir.parent.parent / "current_backup"),
    }
    fields.update(kw)
    return HookContext(**fields)


@pytest.fixture
def release_dir(tmp_path: Path) -> Path:
    d = tmp_path / "web" / "releases" / "20260102T030405Z-master-15eb13af"
    d.mkdir(parents=True)
    return d


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie waiting for its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_dead(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


class TestEnvironment:
    def test_every_watcher_variable_and_nothing_of_the_daemon(
        self, tmp_path: Path, release_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DAEMON_SECRET", "must-not-leak")
        hook = write_script(tmp_path / "hooks" / "dump", "env > env.txt\npwd > cwd.txt\n")
        ctx = make_ctx(release_dir)
        results = run_hooks(
            make_app(tmp_path, {"post_release": ((str(hook),),)}), "post_release", ctx
        )

        assert [r.hook for r in results] == [str(hook)]
        assert results[0].duration >= 0
        env = dict(
            line.split("=", 1) for line in (release_dir / "env.txt").read_text().splitlines()
        )
        expected = ctx.environ("post_release")
        assert set(expected) == set(ALL_VARS)
        for name in ALL_VARS:
            assert env[name] == expected[name], name
        assert env["WATCHER_PHASE"] == "post_release"
        assert env["WATCHER_RELEASE_DIR"] == str(release_dir)
        assert env["WATCHER_ARTIFACT"] == "master-15eb13af"
        assert env["PATH"] == hooks.HOOK_PATH
        assert env["HOME"] == pwd.getpwuid(os.geteuid()).pw_dir
        assert "DAEMON_SECRET" not in env
        leaked = set(env) - set(ALL_VARS) - {"PATH", "LANG", "HOME", "USER", "LOGNAME", "PWD"}
        assert leaked == set()
        assert (release_dir / "cwd.txt").read_text().strip() == str(release_dir)

    def test_event_data_is_never_interpreted_by_a_shell(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        marker = tmp_path / "pwned"
        evil = f"$(touch {marker})`touch {marker}`;touch {marker}"
        hook = write_script(
            tmp_path / "hooks" / "echo",
            'printf "%s" "$WATCHER_ARTIFACT" > artifact.txt\n'
            'printf "%s" "$WATCHER_RELEASE" > release.txt\n'
            'printf "%s" "$1" > arg.txt\n',
        )
        app = make_app(tmp_path, {"validate": ((str(hook), evil),)})
        run_hooks(app, "validate", make_ctx(release_dir, artifact=evil, release=evil))

        assert (release_dir / "artifact.txt").read_text() == evil
        assert (release_dir / "release.txt").read_text() == evil
        assert (release_dir / "arg.txt").read_text() == evil
        assert not marker.exists()


def test_running_hooks_counts_the_hook_processes_running_now(
    tmp_path: Path, release_dir: Path
) -> None:
    """What a stop asks systemd for more time on: a hook running, not any step."""
    gate = tmp_path / "gate"
    hook = write_script(
        tmp_path / "hook", f'touch "{gate}.started"\nwhile [ ! -e "{gate}" ]; do sleep 0.02; done\n'
    )
    app = make_app(tmp_path, {"post_release": ((str(hook),),)})
    assert running_hooks() == 0
    runner = threading.Thread(target=run_hooks, args=(app, "post_release", make_ctx(release_dir)))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not gate.with_name("gate.started").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running_hooks() == 1
    finally:
        gate.touch()
        runner.join(10)
    assert running_hooks() == 0


class TestOrderAndDiscovery:
    def test_config_hooks_then_release_hook_then_release_parts(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        order = release_dir / "order.txt"
        first = write_script(tmp_path / "hooks" / "first", "echo config-1 >> order.txt\n")
        second = write_script(tmp_path / "hooks" / "second", 'echo "config-2 $1" >> order.txt\n')
        rhooks = release_dir / ".watcher" / "hooks"
        write_script(rhooks / "post_symlink", "echo release >> order.txt\n")
        write_script(rhooks / "post_symlink.d" / "20-b", "echo part-20 >> order.txt\n")
        write_script(rhooks / "post_symlink.d" / "10-a", "echo part-10 >> order.txt\n")
        write_script(rhooks / "post_symlink.d" / ".hidden", "echo hidden >> order.txt\n")
        write_script(rhooks / "validate", "echo wrong-phase >> order.txt\n")
        app = make_app(tmp_path, {"post_symlink": ((str(first),), (str(second), "x"))})

        commands = hook_commands(app, "post_symlink", release_dir)
        assert commands == [
            (str(first),),
            (str(second), "x"),
            (str(rhooks / "post_symlink"),),
            (str(rhooks / "post_symlink.d" / "10-a"),),
            (str(rhooks / "post_symlink.d" / "20-b"),),
        ]
        results = run_hooks(app, "post_symlink", make_ctx(release_dir))
        assert order.read_text().split("\n") == [
            "config-1",
            "config-2 x",
            "release",
            "part-10",
            "part-20",
            "",
        ]
        assert [r.hook for r in results][2:] == [
            ".watcher/hooks/post_symlink",
            ".watcher/hooks/post_symlink.d/10-a",
            ".watcher/hooks/post_symlink.d/20-b",
        ]

    def test_no_hooks_is_a_no_op(self, tmp_path: Path, release_dir: Path) -> None:
        assert run_hooks(make_app(tmp_path), "post_abort", make_ctx(release_dir)) == []

    def test_unknown_phase_is_refused(self, tmp_path: Path, release_dir: Path) -> None:
        with pytest.raises(ValueError, match="unknown hook phase 'pre_release'"):
            hook_commands(make_app(tmp_path), "pre_release", release_dir)

    def test_non_executable_release_hook_is_a_clear_error(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        write_script(release_dir / ".watcher/hooks/post_release", "exit 0\n", executable=False)
        with pytest.raises(HookError) as info:
            run_hooks(make_app(tmp_path), "post_release", make_ctx(release_dir))
        assert str(info.value) == (
            "post_release hook .watcher/hooks/post_release: not executable (chmod +x it)"
        )
        assert info.value.phase == "post_release"
        assert info.value.hook == ".watcher/hooks/post_release"

    @pytest.mark.parametrize(
        "where", [".watcher/hooks/post_release", ".watcher/hooks/post_release.d/10-check"]
    )
    def test_release_hook_that_is_a_directory_is_refused_not_skipped(
        self, tmp_path: Path, release_dir: Path, where: str
    ) -> None:
        (release_dir / where).mkdir(parents=True)
        assert hook_commands(make_app(tmp_path), "post_release", release_dir) == [
            (str(release_dir / where),)
        ]
        with pytest.raises(HookError) as info:
            run_hooks(make_app(tmp_path), "post_release", make_ctx(release_dir))
        assert str(info.value) == (
            f"post_release hook {where}: is a directory, not an executable file"
        )

    def test_config_hook_that_is_a_directory_is_refused(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        (tmp_path / "hooks.d").mkdir()  # a directory is "executable" (searchable) to access()
        app = make_app(tmp_path, {"validate": ((str(tmp_path / "hooks.d"),),)})
        with pytest.raises(HookError, match=r"is a directory, not an executable file$"):
            run_hooks(app, "validate", make_ctx(release_dir))

    def test_missing_config_hook(self, tmp_path: Path, release_dir: Path) -> None:
        app = make_app(tmp_path, {"validate": (("/nonexistent/check",),)})
        with pytest.raises(HookError, match=r"^validate hook /nonexistent/check: not found$"):
            run_hooks(app, "validate", make_ctx(release_dir))

    def write_raw(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode())
        path.chmod(0o755)

    @pytest.mark.parametrize(
        "shebang", ["#!/usr/bin/nonexistent-interp", "#! /usr/bin/nonexistent-interp -e"]
    )
    def test_a_missing_interpreter_is_named(
        self, tmp_path: Path, release_dir: Path, shebang: str
    ) -> None:
        # The kernel says ENOENT for the interpreter: "No such file or directory" reads
        # as if the hook itself were missing, and it is there.
        self.write_raw(release_dir / ".watcher/hooks/post_release", f"{shebang}\necho hi\n")
        with pytest.raises(HookError) as info:
            run_hooks(make_app(tmp_path), "post_release", make_ctx(release_dir))
        assert str(info.value) == (
            "post_release hook .watcher/hooks/post_release: cannot start: its interpreter"
            " /usr/bin/nonexistent-interp (from the #! line) does not exist"
        )
        assert info.value.result == "failed"

    def test_a_shebang_with_crlf_line_endings_says_so(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        hook = tmp_path / "hooks" / "check"
        self.write_raw(hook, "#!/bin/sh\r\necho hi\r\n")
        app = make_app(tmp_path, {"validate": ((str(hook),),)})
        with pytest.raises(HookError) as info:
            run_hooks(app, "validate", make_ctx(release_dir))
        assert str(info.value) == (
            f"validate hook {hook}: cannot start: its #! line ends with a carriage return"
            " (the file has CRLF line endings), so the interpreter it names is /bin/sh"
            " followed by \\r, which does not exist: save the file with LF line endings"
            " (e.g. dos2unix)"
        )

    def test_release_hook_linking_outside_the_release_is_refused(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        outside = write_script(tmp_path / "elsewhere", "exit 0\n")
        (release_dir / ".watcher/hooks").mkdir(parents=True)
        (release_dir / ".watcher/hooks/validate").symlink_to(outside)
        with pytest.raises(HookError, match="resolves outside the release"):
            run_hooks(make_app(tmp_path), "validate", make_ctx(release_dir))

    def test_missing_release_directory(self, tmp_path: Path) -> None:
        hook = write_script(tmp_path / "hooks" / "x", "exit 0\n")
        app = make_app(tmp_path, {"post_abort": ((str(hook),),)})
        gone = tmp_path / "web" / "releases" / "gone"
        with pytest.raises(HookError, match=f"release directory {gone} does not exist"):
            run_hooks(app, "post_abort", make_ctx(gone))

    def test_first_failure_stops_the_phase(self, tmp_path: Path, release_dir: Path) -> None:
        bad = write_script(tmp_path / "hooks" / "bad", "exit 1\n")
        write_script(release_dir / ".watcher/hooks/post_release", "touch ran\n")
        app = make_app(tmp_path, {"post_release": ((str(bad),),)})
        with pytest.raises(HookError):
            run_hooks(app, "post_release", make_ctx(release_dir))
        assert not (release_dir / "ran").exists()


class TestFailures:
    def test_non_zero_exit_carries_the_tail(self, tmp_path: Path, release_dir: Path) -> None:
        hook = write_script(
            tmp_path / "hooks" / "fail",
            'i=0; while [ $i -lt 100 ]; do echo "out $i"; i=$((i+1)); done\n'
            "echo 'to stderr' >&2\nexit 3\n",
        )
        app = make_app(tmp_path, {"post_release": ((str(hook),),)})
        with pytest.raises(HookError) as info:
            run_hooks(app, "post_release", make_ctx(release_dir))
        assert str(info.value) == f"post_release hook {hook}: exited with status 3"
        tail = info.value.output_tail.splitlines()
        assert len(tail) == hooks.TAIL_LINES
        assert tail[-1] == "to stderr"
        assert tail[-2] == "out 99"
        assert "out 0" not in tail

    def test_killed_by_a_signal(self, tmp_path: Path, release_dir: Path) -> None:
        hook = write_script(tmp_path / "hooks" / "die", "kill -9 $$\n")
        app = make_app(tmp_path, {"validate": ((str(hook),),)})
        with pytest.raises(HookError, match=r"killed by signal SIGKILL$"):
            run_hooks(app, "validate", make_ctx(release_dir))

    def test_timeout_kills_the_whole_group(self, tmp_path: Path, release_dir: Path) -> None:
        hook = write_script(
            tmp_path / "hooks" / "hang",
            "sleep 1000 &\necho $! > grandchild.pid\necho waiting\nsleep 1000\n",
        )
        app = make_app(tmp_path, {"post_symlink": ((str(hook),),)}, hook_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(HookError) as info:
            run_hooks(app, "post_symlink", make_ctx(release_dir), kill_grace=1.0)
        took = time.monotonic() - started
        assert str(info.value) == f"post_symlink hook {hook}: timed out after 1s"
        assert info.value.output_tail == "waiting"
        assert 1.0 <= took < 3.0
        grandchild = int((release_dir / "grandchild.pid").read_text())
        assert wait_dead(grandchild), f"grandchild {grandchild} survived the timeout"

    def test_cancel_stops_the_running_hook_and_its_group(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        hook = write_script(
            tmp_path / "hooks" / "slow",
            "sleep 1000 &\necho $! > grandchild.pid\necho staging\nsleep 1000\n",
        )
        after = write_script(tmp_path / "hooks" / "after", "touch ran-after\n")
        app = make_app(tmp_path, {"post_release": ((str(hook),), (str(after),))})
        started = time.monotonic()

        def cancel() -> bool:  # an abort the loop saw half a second in
            return time.monotonic() - started > 0.5

        with pytest.raises(HookError) as info:
            run_hooks(app, "post_release", make_ctx(release_dir), kill_grace=1.0, cancel=cancel)
        took = time.monotonic() - started
        assert str(info.value) == (
            f"post_release hook {hook}: stopped: the deploy no longer needs it"
        )
        assert info.value.output_tail == "staging"
        assert 0.5 <= took < 2.5, took  # not at the hook's 10 s timeout
        grandchild = int((release_dir / "grandchild.pid").read_text())
        assert wait_dead(grandchild), f"grandchild {grandchild} survived the cancel"
        assert not (release_dir / "ran-after").exists(), "the next hook of the phase ran"

    def test_cancelled_before_a_hook_starts_it_does_not_run(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        hook = write_script(tmp_path / "hooks" / "mark", "touch ran\n")
        app = make_app(tmp_path, {"post_release": ((str(hook),),)})
        with pytest.raises(HookError, match=r"not started: the deploy no longer needs it$"):
            run_hooks(app, "post_release", make_ctx(release_dir), cancel=lambda: True)
        assert not (release_dir / "ran").exists()

    def test_a_hook_that_ended_by_itself_is_not_reported_cancelled(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        hook = write_script(tmp_path / "hooks" / "quick", "echo $$ > hook.pid\necho done\n")
        app = make_app(tmp_path, {"post_release": ((str(hook),),)})

        def cancel() -> bool:  # yes once the hook has exited (a zombie not yet reaped)
            try:
                pid = int((release_dir / "hook.pid").read_text())
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, ValueError):
                return False
            return state == "Z"

        results = run_hooks(app, "post_release", make_ctx(release_dir), cancel=cancel)
        assert [r.output_lines for r in results] == [1]

    def test_a_hook_that_ended_while_the_daemon_was_paused_did_not_time_out(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        """The status review: the daemon SIGSTOPped while its validate hook ran (a hook of
        4 s, a timeout of 20 s), resumed 22 s later: the hook had exited 0, and the first
        look after the pause found the deadline passed before it read the pipe's end (the
        select, interrupted by the SIGCONT, returned nothing): "timed out after 20s", a
        good release reported as failed after its commit. The runner here is a process of
        its own, stopped and continued as the daemon was."""
        hook = write_script(
            tmp_path / "hooks" / "short", f"touch {tmp_path}/started\nsleep 0.3\necho ok\n"
        )
        runner = f"""
import sys
from pathlib import Path
sys.path[:0] = [{str(Path(__file__).resolve().parents[2])!r}]
from tests.unit.test_hooks import make_app, make_ctx
from watcher.errors import HookError
from watcher.hooks import run_hooks
app = make_app(Path({str(tmp_path)!r}), {{"validate": (({str(hook)!r},),)}}, hook_timeout=1.0)
try:
    results = run_hooks(app, "validate", make_ctx(Path({str(release_dir)!r})))
    print("ok", [r.output_lines for r in results])
except HookError as exc:
    print("failed:", exc)
"""
        proc = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE, text=True)
        with reaped(proc):
            deadline = time.monotonic() + 30
            while not (tmp_path / "started").exists():
                assert time.monotonic() < deadline, "the hook never started"
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.01)
            proc.send_signal(signal.SIGSTOP)  # paused in its wait, the hook running on
            time.sleep(2.0)  # the hook ends (0.3 s); its deadline (1 s) passes
            proc.send_signal(signal.SIGCONT)
            out, _ = proc.communicate(timeout=30)
        assert out.strip().splitlines()[-1] == "ok [1]", out

    def test_timeout_escalates_to_sigkill(self, tmp_path: Path, release_dir: Path) -> None:
        hook = write_script(
            tmp_path / "hooks" / "stubborn",
            "trap '' TERM\n(trap '' TERM; sleep 1000) &\necho $! > child.pid\n"
            "while :; do sleep 0.1; done\n",
        )
        # 1 s: time for the shell to start its child and write child.pid on a loaded host.
        app = make_app(tmp_path, {"validate": ((str(hook),),)}, hook_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(HookError, match=r"timed out after 1s"):
            run_hooks(app, "validate", make_ctx(release_dir), kill_grace=0.5)
        assert time.monotonic() - started < 3.0
        assert wait_dead(int((release_dir / "child.pid").read_text()))

    def test_children_holding_the_pipe_are_killed_after_the_hook_exits(
        self, tmp_path: Path, release_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(hooks, "PIPE_GRACE", 0.3)
        hook = write_script(
            tmp_path / "hooks" / "leaky", "sleep 1000 &\necho $! > child.pid\necho done\n"
        )
        app = make_app(tmp_path, {"post_symlink": ((str(hook),),)})
        started = time.monotonic()
        with capture_logs() as logs:
            results = run_hooks(app, "post_symlink", make_ctx(release_dir))
        assert time.monotonic() - started < 2.5
        assert results[0].output_lines == 1
        assert wait_dead(int((release_dir / "child.pid").read_text()))
        assert any(e["event"] == "hook_children_killed" for e in logs)

    def test_a_timeout_stops_what_the_hook_started_outside_its_group(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        # setsid: a new session and group, beyond killpg; one with its output sent away
        # (nothing ties it to the hook but its parent) and one in a group of its own.
        hook = write_script(
            tmp_path / "hooks" / "escape",
            "setsid sleep 1000 >/dev/null 2>&1 < /dev/null &\necho $! > setsid.pid\n"
            "set -m\nsleep 1000 >/dev/null 2>&1 &\necho $! > group.pid\nset +m\n"
            "echo waiting\nsleep 1000\n",
        )
        app = make_app(tmp_path, {"post_symlink": ((str(hook),),)}, hook_timeout=1.0)
        with pytest.raises(HookError, match=r"timed out after 1s"):
            run_hooks(app, "post_symlink", make_ctx(release_dir), kill_grace=1.0)
        for name in ("setsid.pid", "group.pid"):
            pid = int((release_dir / name).read_text())
            assert wait_dead(pid), f"{name}: {pid} survived the timeout"

    def test_an_escaped_writer_of_the_pipe_is_killed_after_the_hook_exits(
        self, tmp_path: Path, release_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A double fork into a new session: its parent is gone, only the pipe leads to it.
        monkeypatch.setattr(hooks, "PIPE_GRACE", 0.3)
        hook = write_script(
            tmp_path / "hooks" / "orphan",
            "( setsid sh -c 'echo $$ > orphan.pid; exec sleep 1000' & ) \n"
            "while [ ! -s orphan.pid ]; do sleep 0.05; done\necho done\n",
        )
        app = make_app(tmp_path, {"post_symlink": ((str(hook),),)})
        started = time.monotonic()
        results = run_hooks(app, "post_symlink", make_ctx(release_dir))
        assert time.monotonic() - started < 4.0
        assert results[0].output_lines == 1
        orphan = int((release_dir / "orphan.pid").read_text())
        assert wait_dead(orphan), f"the orphan {orphan} holding the pipe survived"

    def test_detached_children_that_closed_the_pipe_are_left_alone(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        hook = write_script(
            tmp_path / "hooks" / "daemonize",
            "sleep 1000 >/dev/null 2>&1 &\necho $! > child.pid\n",
        )
        app = make_app(tmp_path, {"post_symlink": ((str(hook),),)})
        started = time.monotonic()
        run_hooks(app, "post_symlink", make_ctx(release_dir))
        assert time.monotonic() - started < 1.8  # under PIPE_GRACE (2 s)
        child = int((release_dir / "child.pid").read_text())
        try:
            assert pid_alive(child)
        finally:
            os.kill(child, 9)


class TestResults:
    """``on_result``: how each hook that was tried ended (``watcher_hook_runs_total``)."""

    def run(self, app: AppConfig, phase: str, release_dir: Path, **kw: Any) -> list[str]:
        seen: list[str] = []
        with contextlib.suppress(HookError):
            run_hooks(app, phase, make_ctx(release_dir), on_result=seen.append, **kw)
        return seen

    def test_each_hook_is_told_until_the_first_failure(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        ok = write_script(tmp_path / "hooks" / "ok", "exit 0\n")
        bad = write_script(tmp_path / "hooks" / "bad", "exit 3\n")
        app = make_app(tmp_path, {"validate": ((str(ok),), (str(bad),), (str(ok),))})
        assert self.run(app, "validate", release_dir) == ["ok", "failed"]

    def test_a_hook_that_cannot_start_failed(self, tmp_path: Path, release_dir: Path) -> None:
        app = make_app(tmp_path, {"validate": ((str(tmp_path / "missing"),),)})
        assert self.run(app, "validate", release_dir) == ["failed"]

    def test_a_timeout_and_a_cancel_are_told_apart(self, tmp_path: Path, release_dir: Path) -> None:
        hang = write_script(tmp_path / "hooks" / "hang", "exec sleep 1000\n")
        app = make_app(tmp_path, {"post_release": ((str(hang),),)}, hook_timeout=0.3)
        assert self.run(app, "post_release", release_dir, kill_grace=0.5) == ["timeout"]
        started = time.monotonic()
        slow = make_app(tmp_path, {"post_release": ((str(hang),),)})
        cancelled = self.run(
            slow,
            "post_release",
            release_dir,
            kill_grace=0.5,
            cancel=lambda: time.monotonic() - started > 0.2,
        )
        assert cancelled == ["cancelled"]
        # Not started because of the cancel: no run to tell.
        assert self.run(slow, "post_release", release_dir, cancel=lambda: True) == []


class TestOutput:
    def test_lines_are_streamed_to_the_log(self, tmp_path: Path, release_dir: Path) -> None:
        hook = write_script(tmp_path / "hooks" / "talk", "echo hello\necho oops >&2\nprintf last")
        app = make_app(tmp_path, {"post_release": ((str(hook),),)})
        with capture_logs() as logs:
            run_hooks(app, "post_release", make_ctx(release_dir))
        lines = [e for e in logs if e["event"] == "hook_output"]
        assert [e["line"] for e in lines] == ["hello", "oops", "last"]
        for e in lines:
            assert (e["app"], e["phase"], e["hook"]) == ("web", "post_release", str(hook))
        finished = [e for e in logs if e["event"] == "hook_finished"]
        assert len(finished) == 1 and finished[0]["output_lines"] == 3

    def test_huge_output_keeps_memory_bounded_and_the_tail_is_the_end(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        # ~18 MB of output: 150k lines, then one 3 MB line without a newline.
        hook = write_script(
            tmp_path / "hooks" / "flood",
            "yes 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
            "xxxxxxxxxxxxxxx' | head -n 150000\n"
            "head -c 3000000 /dev/zero | tr '\\0' y\necho\necho THE-END\nexit 7\n",
        )
        app = make_app(tmp_path, {"post_release": ((str(hook),),)})
        with open(os.devnull, "w") as devnull:
            configure_logging(stream=devnull, json=True)
            try:

                def run() -> pytest.ExceptionInfo[HookError]:
                    with pytest.raises(HookError) as info:
                        run_hooks(app, "post_release", make_ctx(release_dir))
                    return info

                peak, info = least_peak(run, runs=2)
            finally:
                structlog.reset_defaults()
        assert "exited with status 7" in str(info.value)
        assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while reading 18 MB of output"
        tail = info.value.output_tail
        assert tail.endswith("\nTHE-END")
        assert len(tail) <= hooks.TAIL_CHARS
        assert set(tail.splitlines()[-2]) == {"y"}

    def test_one_huge_line_logs_at_most_the_byte_cap_then_says_how_much_was_not(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        # 3 MB without a newline: 733 pieces of 4 KiB, far below the line cap, used to be
        # logged whole (a 50 MB line: ~41 MB of log per run per host).
        hook = write_script(
            tmp_path / "hooks" / "flood",
            "head -c 3000000 /dev/zero | tr '\\0' y\necho\necho THE-END\nexit 7\n",
        )
        app = make_app(tmp_path, {"post_release": ((str(hook),),)})
        with capture_logs() as logs, pytest.raises(HookError) as info:
            run_hooks(app, "post_release", make_ctx(release_dir))
        logged = [e["line"] for e in logs if e["event"] == "hook_output"]
        logged_bytes = sum(len(line) for line in logged)
        assert 0 < logged_bytes <= 1024 * 1024  # docs/hooks.md: 1 MiB a run
        assert set("".join(logged)) == {"y"}, "THE-END comes after what was not logged"
        [truncated] = [e for e in logs if e["event"] == "hook_output_truncated"]
        assert truncated["logged"] == len(logged)
        assert truncated["not_logged_bytes"] == 3_000_000 + len("THE-END") - logged_bytes
        assert truncated["not_logged_lines"] == truncated["lines"] - len(logged)
        assert info.value.output_tail.endswith("\nTHE-END")

    def test_a_progress_bar_redrawn_in_place_is_shown_as_a_terminal_ends_it(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        # `\r` without `\n` (npm, curl, rsync --progress): the last state, not every step
        # escaped as \x0d; a CRLF line ending is only an ending.
        hook = write_script(
            tmp_path / "hooks" / "bar",
            "printf 'copying 10%%\\rcopying 50%%\\rcopying 100%%\\n'\n"
            "printf 'done\\r\\n'\nexit 1\n",
        )
        app = make_app(tmp_path, {"post_release": ((str(hook),),)})
        with capture_logs() as logs, pytest.raises(HookError) as info:
            run_hooks(app, "post_release", make_ctx(release_dir))
        assert info.value.output_tail == "copying 100%\ndone"
        assert [e["line"] for e in logs if e["event"] == "hook_output"] == [
            "copying 100%",
            "done",
        ]

    def test_short_output_is_logged_whole_without_a_truncation_line(
        self, tmp_path: Path, release_dir: Path
    ) -> None:
        hook = write_script(tmp_path / "hooks" / "talk", "seq 1 2000\n")
        app = make_app(tmp_path, {"post_release": ((str(hook),),)})
        with capture_logs() as logs:
            run_hooks(app, "post_release", make_ctx(release_dir))
        assert [e["line"] for e in logs if e["event"] == "hook_output"] == [
            str(i) for i in range(1, 2001)
        ]
        assert not [e for e in logs if e["event"] == "hook_output_truncated"]


@pytest.fixture
def throwaway_user() -> Iterator[pwd.struct_passwd]:
    assert os.geteuid() == 0, "the hook user tests need root (this project's test machines are)"
    name = f"wt{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=True)


@pytest.fixture
def shared_release() -> Iterator[Path]:
    """A release directory another user can enter (pytest's tmp_path is 0700 for root)."""
    top = Path(tempfile.mkdtemp(prefix="watcher-hooks-"))
    top.chmod(0o755)
    release = top / "web" / "releases" / "20260102T030405Z-master-15eb13af"
    release.mkdir(parents=True)
    for d in (release, *release.parents):
        if d == top.parent:
            break
        d.chmod(0o755)
    try:
        yield release
    finally:
        shutil.rmtree(top)


class TestUser:
    def test_hook_runs_as_the_app_user_with_only_its_groups(
        self, shared_release: Path, throwaway_user: pwd.struct_passwd
    ) -> None:
        hook = write_script(shared_release.parent / "who", 'id -u\nid -G\necho "$HOME $USER"\n')
        app = make_app(
            shared_release.parent, {"validate": ((str(hook),),)}, user=throwaway_user.pw_name
        )
        with capture_logs() as logs:
            run_hooks(app, "validate", make_ctx(shared_release))
        lines = [e["line"] for e in logs if e["event"] == "hook_output"]
        assert lines == [
            str(throwaway_user.pw_uid),
            str(throwaway_user.pw_gid),
            f"/nonexistent {throwaway_user.pw_name}",
        ]

    def test_unknown_user_is_a_clear_error(self, tmp_path: Path, release_dir: Path) -> None:
        hook = write_script(tmp_path / "hooks" / "x", "exit 0\n")
        app = make_app(tmp_path, {"validate": ((str(hook),),)}, user="no-such-user-xyz")
        with pytest.raises(HookError, match='no such user "no-such-user-xyz"'):
            run_hooks(app, "validate", make_ctx(release_dir))

    def test_exec_runs_as_the_app_user(
        self, shared_release: Path, throwaway_user: pwd.struct_passwd
    ) -> None:
        app = make_app(shared_release.parent, user=throwaway_user.pw_name)
        out = shared_release / "out.txt"
        out.touch()
        out.chmod(0o666)
        code = run_in_release(
            app,
            shared_release,
            ["sh", "-c", 'echo "$(id -u) $WATCHER_RELEASE $(pwd)" > out.txt'],
            {"WATCHER_RELEASE": "r1"},
        )
        assert code == 0
        assert out.read_text().split() == [str(throwaway_user.pw_uid), "r1", str(shared_release)]


class TestRunInRelease:
    def test_exit_status_and_environment(
        self, tmp_path: Path, release_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DAEMON_SECRET", "x")
        env = make_ctx(release_dir).environ("exec")
        code = run_in_release(
            make_app(tmp_path),
            release_dir,
            ["sh", "-c", "env > env.txt; exit 5"],
            env,
        )
        assert code == 5
        dumped = (release_dir / "env.txt").read_text()
        assert f"WATCHER_RELEASE_DIR={release_dir}\n" in dumped
        assert "WATCHER_PHASE=exec\n" in dumped
        assert "DAEMON_SECRET" not in dumped

    def test_signal_status_is_like_a_shell(self, tmp_path: Path, release_dir: Path) -> None:
        assert run_in_release(make_app(tmp_path), release_dir, ["sh", "-c", "kill -TERM $$"]) == 143

    def test_ctrl_c_goes_to_the_command_not_to_watcherctl(self, release_dir: Path) -> None:
        # The command interrupts its parent (as a terminal's Ctrl-C does to the whole
        # foreground group) and then exits 4 on its own: the parent must wait for it, and the
        # command itself must still see SIGINT with its default disposition.
        program = (
            "import sys\n"
            "from pathlib import Path\n"
            "from watcher.config import AppConfig\n"
            "from watcher.hooks import run_in_release\n"
            "app = AppConfig(name='web', root='/srv')\n"
            "code = run_in_release(app, Path(sys.argv[1]), ['sh', '-c', "
            "'grep SigIgn /proc/self/status > sigign.txt; kill -INT $PPID; sleep 0.3; exit 4'])\n"
            "print('after', code)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", program, str(release_dir)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "after 4\n"
        ignored = int((release_dir / "sigign.txt").read_text().split()[1], 16)
        assert not ignored & (1 << (2 - 1)), "the command inherited an ignored SIGINT"

    def test_a_script_whose_interpreter_is_missing(self, tmp_path: Path, release_dir: Path) -> None:
        (release_dir / "bin").mkdir()
        (release_dir / "bin/tool").write_text("#!/opt/nonexistent/python3\nprint(1)\n")
        (release_dir / "bin/tool").chmod(0o755)
        with pytest.raises(HookError) as info:
            run_in_release(make_app(tmp_path), release_dir, ["bin/tool"])
        assert str(info.value) == (
            "command bin/tool: cannot start: its interpreter /opt/nonexistent/python3"
            " (from the #! line) does not exist"
        )

    def test_missing_command(self, tmp_path: Path, release_dir: Path) -> None:
        with pytest.raises(HookError) as info:
            run_in_release(make_app(tmp_path), release_dir, ["no-such-command-xyz"])
        assert str(info.value) == (
            "command no-such-command-xyz: cannot start: No such file or directory"
        )
