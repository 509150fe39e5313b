"""`make demo`'s script runs its scripted part, shows what it promises, and every follow-up
command it prints works exactly as printed against the fleet it leaves running."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTED_PART_TIMEOUT = 300.0  # a hang guard, not a speed target (that is bench/'s job)


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    out: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.out)

    def hints(self) -> list[str]:
        lines = self.text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("Everything is still"))
        end = next(i for i, line in enumerate(lines) if line.startswith("Watcher logs:"))
        return [line.strip() for line in lines[start + 1 : end] if line.strip()]


def start_demo(
    consul_bin: str, loopback_base: str, preexec: Callable[[], object] | None = None
) -> subprocess.Popen[str]:
    """scripts/demo.py as `make demo` runs it, from the repository, in a session of its own."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, CONSUL_BIN=consul_bin, DEMO_LOOPBACK=loopback_base),
        start_new_session=True,
        preexec_fn=preexec,
    )


@pytest.fixture(scope="module")
def demo(consul_bin: str, loopback_base: str) -> Iterator[Demo]:
    """The demo as `make demo` runs it (from the repository, kept running), until it has
    printed its follow-up commands; stopped with SIGTERM (what Ctrl-C does) afterwards."""
    # as `make demo &` in a script starts it: a background job of a non-interactive shell
    # inherits SIGINT ignored, and `kill -INT` must still stop it
    proc = start_demo(
        consul_bin, loopback_base, lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    running = Demo(proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            running.out.append(line)
            if line.startswith("Press Ctrl-C"):
                ready.set()
        ready.set()  # the script ended early: the tests say why

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ready.wait(SCRIPTED_PART_TIMEOUT)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        reader.join(10)


def test_demo_deploys_upgrades_and_rolls_back(demo: Demo) -> None:
    out = demo.text()
    assert "Press Ctrl-C to stop everything." in out, out
    v1_deploy, v2_deploy, rollback = (
        out.index("==> deploying v1"),
        out.index("==> deploying v2"),
        out.index("==> rolling the fleet back"),
    )
    assert out[v1_deploy:v2_deploy].count("hello from v1") == 3
    assert out[v2_deploy:rollback].count("hello from v2") == 3
    assert out[rollback:].count("hello from v1") >= 3
    assert out.count(": committed") >= 3
    assert "scripted part done" in out
    assert "watcher web: http://127.0.0.1:" in out and "(page answered 200;" in out


def test_every_printed_hint_works_as_printed(demo: Demo, tmp_path: Path) -> None:
    """A new user copies each line into a shell, in the repository or anywhere else."""
    hints = demo.hints()
    assert len(hints) >= 5, demo.text()
    assert any(" -c " in h and h.split()[1] == "-c" for h in hints if "watcherctl" in h), hints
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "WATCHER_"))}
    for hint in hints:
        started = time.monotonic()
        result = subprocess.run(
            shlex.split(hint),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
            check=False,
        )
        took = time.monotonic() - started
        assert result.returncode == 0, f"{hint} ({took:.1f}s):\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, hint
        words = shlex.split(hint)
        if "deploy" in words:
            assert ": committed" in result.stdout, result.stdout
        if "history" in words:
            assert "committed" in result.stdout, result.stdout
        if words[-1] == "status":
            assert "watcher running" in result.stdout, result.stdout
        if "--fleet" in words:
            assert result.stdout.count("alive") == 3, result.stdout
        if words[0] == "curl":
            assert "hello from" in result.stdout, result.stdout
    assert demo.proc.poll() is None, "the demo stopped before its hints were tried"


def test_demo_stops_cleanly_on_ctrl_c(demo: Demo) -> None:
    """Runs last in this module: SIGINT (Ctrl-C, or `kill -INT` of a demo started in the
    background, which inherited it ignored) stops everything."""
    demo.proc.send_signal(signal.SIGINT)
    code = demo.proc.wait(120)
    assert code == 130, demo.text()[-2000:]
    assert "stopping ..." in demo.text()


@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_sigterm_while_starting_stops_everything_with_exit_0(
    consul_bin: str, loopback_base: str, signals: int
) -> None:
    """`kill` (SIGTERM, what a script or systemd sends) is the stop asked for: exit 0, not
    130, and what was started so far is gone, its work directory too. After the test
    above, which freed the demo's addresses. Twice: `kill` of `make demo`'s process group,
    which make passes on, cut the stop short and left every process running."""
    proc = start_demo(consul_bin, loopback_base)
    out: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until the watchers run: Consul, S3 and 3 daemons are up
            out.append(line)
            if line.startswith("  configs: "):
                break
        configs = "".join(out).split("  configs: ")[-1].split(", ")
        workdir = Path(configs[0]).parents[2]
        assert (workdir / "consul").is_dir(), "".join(out)
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = "".join(out) + rest
    assert proc.returncode == 0, text[-2000:]
    assert "stopping ..." in text and "Traceback" not in text, text[-2000:]
    assert not workdir.exists(), f"{workdir} left behind"
    left = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert left.stdout == "", f"processes left: {left.stdout}"


def test_make_demo_runs_this_script() -> None:
    """`make demo` (the README's command) must run the script tested above."""
    dry = subprocess.run(
        ["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    recipe = [line for line in dry.splitlines() if "demo" in line and "python" in line]
    assert recipe and "scripts/demo.py" in recipe[-1], dry
    assert (REPO / "scripts" / "demo.py").is_file()
