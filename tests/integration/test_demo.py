"""`make demo`'s script runs its whole scripted part and shows what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_deploys_upgrades_and_rolls_back(consul_bin: str) -> None:
    env = dict(os.environ, CONSUL_BIN=consul_bin, DEMO_LOOPBACK="127.0.11")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--no-keep"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    took = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    assert took < 120, f"the scripted part took {took:.0f}s"
    v1_deploy, v2_deploy, rollback = (
        out.index("==> deploying v1"),
        out.index("==> deploying v2"),
        out.index("==> rolling the fleet back"),
    )
    assert out[v1_deploy:v2_deploy].count("hello from v1") == 3
    assert out[v2_deploy:rollback].count("hello from v2") == 3
    assert out[rollback:].count("hello from v1") == 3
    assert out.count(": committed") >= 3
    assert "scripted part done" in out
    assert "watcher web: http://127.0.0.1:" in out and "(page answered 200;" in out


def test_make_demo_runs_this_script() -> None:
    """`make demo` (the README's command) must run the script tested above."""
    dry = subprocess.run(
        ["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    recipe = [line for line in dry.splitlines() if "demo" in line and "python" in line]
    assert recipe and "scripts/demo.py" in recipe[-1], dry
    assert (REPO / "scripts" / "demo.py").is_file()
