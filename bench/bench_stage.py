"""Staging cost: extracting a ~20 MB many-file tarball vs renaming a pre-extracted tree."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from watcher.config import AppConfig
from watcher.log import configure_logging
from watcher.records import ArtifactRecord
from watcher.releases import ReleaseEngine


def build_tarball(path: Path, *, files: int, file_size: int, seed: int = 1) -> ArtifactRecord:
    """``files`` files of ``file_size`` bytes, half random (incompressible), half text."""
    rng = random.Random(seed)
    with tarfile.open(path, "w:gz", compresslevel=6) as tf:
        for i in range(files):
            if i % 2:
                data = rng.randbytes(file_size)
            else:
                line = f"line {i} of a source file that compresses well\n".encode()
                data = (line * (file_size // len(line) + 1))[:file_size]
            info = tarfile.TarInfo(f"src/pkg{i % 50:02d}/file{i:05d}.txt")
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    return ArtifactRecord(
        id="bench-0000beef",
        url="s3://bench/a/bench-0000beef.tar.gz",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-size", type=int, default=10 * 1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to work (default: a temp dir)")
    args = parser.parse_args()
    configure_logging(level="warning")

    work = Path(tempfile.mkdtemp(prefix="bench-stage-", dir=args.dir))
    try:
        tarball = work / "build.tar.gz"
        record = build_tarball(tarball, files=args.files, file_size=args.file_size)
        raw = args.files * args.file_size
        print(
            f"tarball: {args.files} files, {raw / 1e6:.1f} MB raw, {record.size / 1e6:.1f} MB gzip"
        )
        app = AppConfig(name="bench", root=str(work / "root"), keep_releases=100, shared=("log",))
        engine = ReleaseEngine(app)
        engine.layout.ensure()

        extract_s, prefetch_s, rename_s = [], [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            engine.stage_from_file(tarball, record, f"20260101T00{r:02d}00Z-extract", "bench")
            extract_s.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            engine.prefetch_extract(tarball, record)
            prefetch_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.stage_from_file(tarball, record, f"20260101T00{r:02d}00Z-prefetched", "bench")
            rename_s.append(time.perf_counter() - t0)

        def show(label: str, samples: list[float]) -> None:
            print(
                f"{label:<42} median {statistics.median(samples) * 1000:9.1f} ms   "
                f"min {min(samples) * 1000:9.1f} ms   ({len(samples)} rounds)"
            )

        show("stage by extraction (extract+sync+rename)", extract_s)
        show("prefetch_extract (off the deploy path)", prefetch_s)
        show("stage from prefetched tree (rename)", rename_s)
        speedup = statistics.median(extract_s) / statistics.median(rename_s)
        print(
            f"prefetched staging is {speedup:.0f}x faster; fs: {os.statvfs(work).f_bsize} B "
            f"blocks at {work}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
