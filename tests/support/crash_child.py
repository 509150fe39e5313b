"""Child processes for the crash-safety and lock-race tests: loops of stage, flip and prune."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
import tarfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from watcher.config import AppConfig, Timeouts
from watcher.errors import FlipError
from watcher.records import ArtifactRecord
from watcher.releases import LinuxProcReader, ReleaseEngine

FILES = {
    "app.txt": b"hello from the crash test\n",
    "bin/run.sh": b"#!/bin/sh\nexec true\n",
    "log/placeholder": b"replaced by the shared link\n",
    **{f"static/f{i:03d}.txt": (f"file {i}\n" * (i + 1)).encode() for i in range(40)},
}
SHARED = ("log",)


class OwnProcessOnly(LinuxProcReader):
    """Real /proc, but only this process: the sandbox's pid 1 is unreadable and would (rightly)
    block every prune; the children here use no release as cwd anyway."""

    def pids(self) -> list[int]:
        return [os.getpid()]


def build_tarball(path: Path, files: dict[str, bytes] = FILES) -> ArtifactRecord:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.startswith("bin/") else 0o644
            tf.addfile(info, io.BytesIO(data))
    return record_for(path)


def record_for(path: Path, artifact: str = "crash-0badcafe") -> ArtifactRecord:
    data = path.read_bytes()
    return ArtifactRecord(
        id=artifact,
        url=f"s3://bucket/a/{artifact}.tar.gz",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def make_engine(root: Path, *, keep: int = 2) -> ReleaseEngine:
    app = AppConfig(
        name="app", root=str(root), keep_releases=keep, shared=SHARED, timeouts=Timeouts(lock=30)
    )
    return ReleaseEngine(app, proc_reader=OwnProcessOnly())


def release_name(tag: str, n: int) -> str:
    return f"20260101T000000Z-crash-{tag}-{n:06d}"


def check_release_tree(engine: ReleaseEngine, release: str) -> None:
    """Raise AssertionError unless ``release`` is complete and its files match FILES."""
    path = engine.layout.release_dir(release)
    meta = json.loads((path / ".watcher" / "release.json").read_bytes())
    assert meta["release"] == release, meta
    for name, data in FILES.items():
        if name.split("/", 1)[0] in SHARED:
            continue
        got = (path / name).read_bytes()
        assert got == data, f"{path / name}: {len(got)} bytes, expected {len(data)}"
    assert str(Path(path / "log").readlink()) == "../../shared/log"


def crash_loop(root: str, tarball: str, seed: int, conn: Connection | None = None) -> None:
    """Stage, back up, flip and prune forever (until SIGKILLed), in random variations."""
    rng = random.Random(seed)
    engine = make_engine(Path(root))
    record = record_for(Path(tarball))
    n = 0
    while True:
        n += 1
        name = release_name(f"{seed}", n)
        if rng.random() < 0.3:
            engine.prefetch_extract(Path(tarball), record)  # no lock needed
        with engine.lock(owner="crash-child"):
            if conn is not None:
                conn.send("ready")
                conn = None
            existing = [r for r in engine.release_names() if engine.is_complete(r)]
            if existing and rng.random() < 0.5:
                for _ in range(rng.randint(1, 20)):  # a burst of flips (rollback, converge)
                    engine.flip(rng.choice(existing))
            else:
                engine.stage_from_file(Path(tarball), record, name, f"d-{n}")
                engine.mark_post_release_done(name)
                engine.set_backup(engine.current_release())
                engine.flip(name)
                engine.clear_backup()
            if rng.random() < 0.5:
                engine.prune()
            if rng.random() < 0.2:
                engine.hold("crash test", "child")
                engine.release_hold()


def race_prune_and_stage(
    root: str,
    tarball: str,
    seconds: float,
    stop: Callable[[], bool] = lambda: False,
    staged: Callable[[int], None] = lambda n: None,
) -> int:
    """The watcherctl side of the lock race: stage new releases and prune, under the lock,
    until ``stop()`` says so (at most ``seconds``); ``staged(n)`` after each release.

    Returns how many releases it staged; raises AssertionError on a broken invariant.
    """
    rng = random.Random(seconds)
    engine = make_engine(Path(root))
    record = record_for(Path(tarball))
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and not stop():
        n += 1
        with engine.lock(owner="watcherctl prune"):
            engine.stage_from_file(Path(tarball), record, release_name("race", n), f"d-{n}")
            engine.mark_post_release_done(release_name("race", n))
            engine.prune()
            current = engine.current_release()
            if current is not None:
                check_release_tree(engine, current)
            previous = engine.previous_release()
            if previous is not None:
                assert engine.is_complete(previous), f"previous {previous} was pruned"
        staged(n)
        time.sleep(rng.uniform(0.02, 0.06))  # flock polling is not fair: let flips in
    return n


def race_flips(
    root: str,
    until: float,
    seed: int,
    enough: Callable[[int, int], bool] = lambda done, refused: False,
) -> tuple[int, int]:
    """The daemon side of the lock race: flip to a release picked without the lock, until
    ``until`` or until ``enough(done, refused)``.

    Returns (flips done, flips refused). A refused flip must be to a release that is not
    complete at that moment; a done flip must leave ``current`` on a complete tree.
    """
    rng = random.Random(seed)
    engine = make_engine(Path(root))
    done = refused = 0
    while time.monotonic() < until and not enough(done, refused):
        names = engine.release_names()  # racy on purpose: the lock decides
        if not names:
            continue
        target = rng.choice(names)
        time.sleep(rng.uniform(0, 0.01))  # decide outside the lock, as a daemon would
        with engine.lock(owner="daemon flip"):
            try:
                engine.flip(target)
            except FlipError:
                assert not engine.is_complete(target), f"refused a complete {target}"
                refused += 1
                continue
            assert engine.current_release() == target
            check_release_tree(engine, target)
            done += 1
    return done, refused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    loop = sub.add_parser("loop")
    loop.add_argument("root")
    loop.add_argument("tarball")
    loop.add_argument("--seed", type=int, default=0)
    rec = sub.add_parser("recover")
    rec.add_argument("root")
    args = parser.parse_args(argv)
    if args.cmd == "loop":
        crash_loop(args.root, args.tarball, args.seed)
        return 0
    engine = make_engine(Path(args.root))
    with engine.lock(owner="crash-test recover"):
        print(json.dumps(engine.recover()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
