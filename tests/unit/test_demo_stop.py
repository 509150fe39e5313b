"""`make demo`'s stop signals (scripts/demo.py), in a child process of their own: a stop whose
first raise is lost still comes, and nothing interrupts the stop once it has begun."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"

PRELUDE = f"""
import importlib.util, os, signal, time
spec = importlib.util.spec_from_file_location("demo", {str(DEMO)!r})
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)
demo.install_stop_signals()

class SignalledWhileCollected:
    # The handler runs inside __del__, whose exceptions Python prints and drops, as it
    # does in an at-fork callback (logging's, in every Popen: how the demo lost a stop).
    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)
        for _ in range(1000):  # the handler runs here
            pass
"""


def run_child(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(("sig", "asked"), [("SIGTERM", True), ("SIGHUP", True), ("SIGINT", False)])
def test_a_stop_whose_raise_was_dropped_still_comes(sig: str, asked: bool) -> None:
    child = run_child(f"""
        SignalledWhileCollected(signal.{sig})
        start = time.monotonic()
        try:
            time.sleep(10)
            print("ran on")
        except KeyboardInterrupt:
            print("stopped after", round(time.monotonic() - start, 1), "asked", demo._stop_asked)
    """)
    assert "Exception ignored" in child.stderr, child.stderr  # the first raise was dropped
    assert child.stdout.startswith("stopped after "), child.stdout + child.stderr
    assert float(child.stdout.split()[2]) < 2.0, child.stdout
    assert child.stdout.split()[-1] == str(asked)  # SIGTERM/SIGHUP exit 0, Ctrl-C 130


def test_a_later_signal_does_not_cut_the_stop_short() -> None:
    """Once the stop has begun (main's ``finally`` sets ``_stopping`` first), neither the
    repeat nor another SIGTERM (make passing on a group's `kill`) raises in it."""
    child = run_child("""
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except KeyboardInterrupt:
            demo._stopping = True
            demo._stop_interrupting()
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(os.getpid(), sig)
        time.sleep(1.5)  # three repeats' worth
        print("stop ran to its end")
    """)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "stop ran to its end\n"
    assert "KeyboardInterrupt" not in child.stderr
