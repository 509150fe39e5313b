"""SIGKILL during staging/flipping/pruning, and a prune+stage racing flips: invariants hold."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest

from tests.support import crash_child
from watcher.log import configure_logging
from watcher.releases import ReleaseEngine

KILLS = 200
RACE_FOR = 4.0  # seconds the prune/stage and flip loops race at least
RACE_CAP = 60.0  # ... and at most, waiting for the race to have been exercised
REPO = Path(__file__).parents[2]
FORK = multiprocessing.get_context("fork")  # the child starts in ms: kills land mid-work


def _quiet_crash_loop(root: str, tarball: str, seed: int, conn: Connection) -> None:
    configure_logging(level="error")
    crash_child.crash_loop(root, tarball, seed, conn)


def _quiet_race(
    root: str,
    tarball: str,
    seconds: float,
    conn: Connection,
    stop: EventType,
    staged: Synchronized[int],
) -> None:
    configure_logging(level="error")

    def count(n: int) -> None:
        staged.value = n

    try:
        conn.send(
            ("ok", crash_child.race_prune_and_stage(root, tarball, seconds, stop.is_set, count))
        )
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise


def leftovers(engine: ReleaseEngine) -> list[str]:
    lay = engine.layout
    found = []
    for d in (
        lay.app_dir,
        lay.releases_dir,
        lay.prefetched_dir,
        lay.state_dir,
        lay.post_release_dir,
    ):
        if d.is_dir():
            found += [p.name for p in d.iterdir() if p.name.startswith(".tmp-")]
    return found


def assert_invariants(engine: ReleaseEngine) -> None:
    current = engine.current_release()
    assert current is not None, "current is missing"
    assert engine.layout.current.resolve() == engine.layout.release_dir(current).resolve()
    crash_child.check_release_tree(engine, current)
    assert leftovers(engine) == []
    for name in engine.release_names():
        assert (engine.layout.releases_dir / name / ".watcher" / "release.json").is_file(), (
            f"{name} has no release.json after recovery"
        )
    backup = engine.layout.current_backup
    assert not backup.is_symlink(), "current_backup survived recovery with no deploy in flight"


@pytest.fixture
def app_root(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    tarball = tmp_path / "build.tar.gz"
    record = crash_child.build_tarball(tarball)
    engine = crash_child.make_engine(root)
    engine.layout.ensure()
    with engine.lock(owner="setup"):
        engine.stage_from_file(tarball, record, crash_child.release_name("init", 0), "d-0")
        engine.flip(crash_child.release_name("init", 0))
    return root, tarball


def test_sigkill_at_random_points_never_breaks_current(app_root: tuple[Path, Path]) -> None:
    root, tarball = app_root
    engine = crash_child.make_engine(root)
    rng = random.Random(1234)
    started = time.monotonic()
    cleaned = 0
    for kill in range(KILLS):
        parent_end, child_end = FORK.Pipe(duplex=False)
        child = FORK.Process(
            target=_quiet_crash_loop,
            args=(str(root), str(tarball), kill + 1, child_end),
            daemon=True,
        )
        child.start()
        child_end.close()
        try:
            assert parent_end.poll(20), "crash child never got going"
            assert parent_end.recv() == "ready"
            time.sleep(rng.uniform(0, 0.04))
        finally:
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
            parent_end.close()
        assert child.exitcode == -signal.SIGKILL, f"child died on its own: {child.exitcode}"
        if kill % 20 == 0:  # a fresh process, as at a daemon start
            out = subprocess.run(
                [sys.executable, "-m", "tests.support.crash_child", "recover", str(root)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            actions = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            with engine.lock(owner="crash-test recover", timeout=5):
                actions = engine.recover()
        cleaned += bool(actions)
        assert_invariants(engine)
    elapsed = time.monotonic() - started
    # the kills landed mid-operation often enough to leave something to clean up
    assert cleaned >= KILLS // 10, f"only {cleaned} of {KILLS} kills left anything behind"
    assert elapsed < 120


def test_prune_and_stage_racing_flips_are_serialized(app_root: tuple[Path, Path]) -> None:
    root, tarball = app_root
    # Both sides race for at least RACE_FOR, then on until the race was exercised (enough
    # releases staged, flips done and a flip refused on a pruned release), at most RACE_CAP:
    # a fixed window gets fewer rounds on a loaded runner (the child also starts late).
    stop = FORK.Event()
    staged_so_far = FORK.Value("i", 0)
    parent_end, child_end = FORK.Pipe(duplex=False)
    child = FORK.Process(
        target=_quiet_race,
        args=(str(root), str(tarball), RACE_CAP, child_end, stop, staged_so_far),
        daemon=True,
    )
    child.start()
    child_end.close()
    started = time.monotonic()

    def enough(done: int, refused: int) -> bool:
        return (
            time.monotonic() - started >= RACE_FOR
            and staged_so_far.value >= 5
            and done >= 10
            and refused > 0
        )

    try:
        try:
            done, refused = crash_child.race_flips(
                str(root), started + RACE_CAP, seed=7, enough=enough
            )
        finally:
            stop.set()
        assert parent_end.poll(30), "race child did not report"
        status, staged = parent_end.recv()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert status == "ok", staged
    assert child.exitcode == 0
    assert staged >= 5 and done >= 10, (staged, done, refused)
    assert refused > 0, f"no flip hit a pruned release ({staged=} {done=}): race not exercised"
    engine = crash_child.make_engine(root)
    with engine.lock(owner="check"):
        assert engine.recover() == []
    assert_invariants(engine)
