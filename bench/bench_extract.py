"""Staging benchmark: extraction of a ~50 MB tree, gzip vs zstd, against the system tar.

Usage: .venv/bin/python bench/bench_extract.py [--dir DIR] [--runs N] [--small N]

Builds a tree of many small text-like files plus a few large semi-compressible ones, archives
it as tar, tar.gz (level 6) and tar.zst (level 3), then times, best of N runs each:
system ``tar`` (the baseline), ``watcher.archive.extract_archive`` for tar.gz and plain tar,
the same with the engine's disk/ratio limits and cancel/progress polling, the same extraction
code fed by a zstd reader (``zstandard``, if installed), decompression
alone, and the cost of making the tree durable (an fsync per file vs one ``syncfs``).
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watcher.archive import extract_archive, extract_stream, sync_tree, sync_tree_each

LIMITS: dict[str, Any] = {"max_members": 1_000_000, "max_bytes": 10 * 1024**3, "umask": 0o022}
WORDS = [
    *("release", "watcher", "consul", "barrier", "artifact", "stage", "flip", "current"),
    *("shared", "hook", "deploy", "host", "import", "def", "return", "class", "self"),
    *("none", "true", "false", "value", "key", "index", "session", "lock"),
]


def build_tree(root: Path, small: int, rng: random.Random) -> tuple[int, int]:
    """``small`` text files of 0.5-8 KiB in 200 dirs, plus 3 large files; (files, bytes)."""
    total = 0
    for i in range(small):
        d = root / f"pkg{i % 200:03d}" / f"mod{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        n = rng.randint(512, 8192)
        text = " ".join(rng.choice(WORDS) for _ in range(n // 5))[:n].encode()
        (d / f"file{i}.py").write_bytes(text)
        total += len(text)
    big = root / "assets"
    big.mkdir()
    for i in range(3):
        # half random, half repetitive: compresses roughly like bundled JS + images
        chunks = []
        for _ in range(64):
            chunks.append(rng.randbytes(64 * 1024))
            chunks.append((b"function f%d() { return %d; }\n" % (i, i)) * 2048)
        data = b"".join(chunks)[: 8 * 1024 * 1024]
        (big / f"bundle{i}.bin").write_bytes(data)
        total += len(data)
    return small + 3, total


def best(runs: int, setup: Callable[[], Path], action: Callable[[Path], object]) -> float:
    """Best wall time of ``action(dest)`` over ``runs`` fresh destinations."""
    times = []
    for _ in range(runs):
        dest = setup()
        t = time.perf_counter()
        action(dest)
        times.append(time.perf_counter() - t)
        shutil.rmtree(dest)
    return min(times)


class _FullReads:
    """A zstandard stream reader made to return full reads (served from 1 MiB blocks, as
    ``GzipFile`` does) and to seek forward by reading."""

    def __init__(self, reader: object) -> None:
        self._r = reader
        self._buf = b""
        self._off = 0
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        parts = []
        while size > 0:
            if self._off >= len(self._buf):
                self._buf = self._r.read(1 << 20)  # type: ignore[attr-defined]
                self._off = 0
                if not self._buf:
                    break
            piece = self._buf[self._off : self._off + size]
            self._off += len(piece)
            size -= len(piece)
            parts.append(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        while self._pos < pos:
            if not self.read(min(1 << 20, pos - self._pos)):
                break
        return self._pos

    def tell(self) -> int:
        return self._pos


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--small", type=int, default=6000, help="number of small files")
    args = ap.parse_args()
    try:
        import zstandard
    except ImportError:
        zstandard = None

    work = Path(tempfile.mkdtemp(prefix="bench-extract-", dir=args.dir))
    try:
        src = work / "src"
        src.mkdir()
        files, size = build_tree(src, args.small, random.Random(1))
        tar = work / "a.tar"
        subprocess.run(["tar", "cf", str(tar), "-C", str(src), "."], check=True)
        raw = tar.read_bytes()
        t = time.perf_counter()
        (work / "a.tar.gz").write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
        gz_ctime = time.perf_counter() - t
        zst_ctime = None
        if zstandard is not None:
            t = time.perf_counter()
            (work / "a.tar.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
            zst_ctime = time.perf_counter() - t
        elif shutil.which("zstd"):
            subprocess.run(
                ["zstd", "-q", "-3", "-o", str(work / "a.tar.zst"), str(tar)], check=True
            )
        counter = iter(range(1_000_000))

        def fresh() -> Path:
            d = work / f"dest{next(counter)}"
            d.mkdir()
            return d

        def sys_tar(*flags: str, archive: Path) -> Callable[[Path], object]:
            return lambda d: subprocess.run(["tar", *flags, str(archive), "-C", str(d)], check=True)

        def ours(fmt: str, archive: Path) -> Callable[[Path], object]:
            return lambda d: extract_archive(archive, d, fmt=fmt, **LIMITS)

        def ours_zstd(d: Path) -> object:
            assert zstandard is not None
            with open(work / "a.tar.zst", "rb") as fh:
                reader = _FullReads(zstandard.ZstdDecompressor().stream_reader(fh))
                return extract_stream(reader, d, label="tar.zst", source="a.tar.zst", **LIMITS)

        rows: list[tuple[str, float]] = []
        gz, zst = work / "a.tar.gz", work / "a.tar.zst"
        rows.append(
            ("system tar xzf (baseline)", best(args.runs, fresh, sys_tar("xzf", archive=gz)))
        )
        if zst.exists():
            rows.append(
                (
                    "system tar --zstd -xf",
                    best(args.runs, fresh, sys_tar("--zstd", "-xf", archive=zst)),
                )
            )
        rows.append(
            ("system tar xf (no compression)", best(args.runs, fresh, sys_tar("xf", archive=tar)))
        )
        rows.append(("extract_archive tar.gz", best(args.runs, fresh, ours("tar.gz", gz))))

        def guarded(d: Path) -> object:
            """As the engine runs it: disk and ratio limits, cancel and progress polled."""
            return extract_archive(
                gz,
                d,
                fmt="tar.gz",
                **LIMITS,
                max_ratio=100.0,
                disk_fraction=0.5,
                disk_reserve=1024**3,
                cancel=lambda: False,
                progress=lambda written, members: None,
            )

        rows.append(("extract_archive tar.gz (limits, cancel)", best(args.runs, fresh, guarded)))
        if zstandard is not None:
            rows.append(("extract_stream tar.zst (zstandard)", best(args.runs, fresh, ours_zstd)))
        rows.append(("extract_archive tar", best(args.runs, fresh, ours("tar", tar))))

        def decompress_gz() -> None:
            with gzip.open(gz, "rb") as f:
                while f.read(1 << 20):
                    pass

        def decompress_zst() -> None:
            assert zstandard is not None
            with open(zst, "rb") as fh:
                r = zstandard.ZstdDecompressor().stream_reader(fh)
                while r.read(1 << 20):
                    pass

        dec = [("decompress only: gzip (python zlib)", decompress_gz)]
        if zstandard is not None:
            dec.append(("decompress only: zstd (zstandard)", decompress_zst))
        for label, fn in dec:
            ts = []
            for _ in range(args.runs):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            rows.append((label, min(ts)))

        # durability: extract (as the engine does), then time making that tree durable
        def synced(fn: Callable[[Path], None]) -> float:
            ts = []
            for _ in range(args.runs):
                os.sync()  # start each run without anybody else's dirty pages
                d = fresh()
                extract_archive(gz, d, fmt="tar.gz", **LIMITS)
                t = time.perf_counter()
                fn(d)
                ts.append(time.perf_counter() - t)
                shutil.rmtree(d)
            return min(ts)

        rows.append(("sync_tree_each after extract (fsync each)", synced(sync_tree_each)))
        rows.append(("sync_tree after extract (one syncfs)", synced(sync_tree)))

        print(
            f"tree: {files} files, {size / 1e6:.1f} MB; tar {len(raw) / 1e6:.1f} MB, "
            f"tar.gz {gz.stat().st_size / 1e6:.1f} MB (compress {gz_ctime:.2f}s)"
            + (f", tar.zst {zst.stat().st_size / 1e6:.1f} MB" if zst.exists() else "")
            + (f" (compress {zst_ctime:.2f}s)" if zst_ctime is not None else "")
        )
        print(f"best of {args.runs} runs, {os.cpu_count()} CPUs, work dir {work}")
        base = rows[0][1]
        for label, secs in rows:
            print(f"  {label:<40} {secs * 1000:8.0f} ms   {secs / base:5.2f}x baseline")
        by = dict(rows)
        if "extract_stream tar.zst (zstandard)" in by:
            saved = by["extract_archive tar.gz"] - by["extract_stream tar.zst (zstandard)"]
            share = saved / by["extract_archive tar.gz"]
            print(
                f"zstd saves {saved * 1000:.0f} ms per extraction ({share:.0%}) "
                f"of this {size / 1e6:.0f} MB tree"
            )
        else:
            print("zstandard not installed: zstd extraction through our code not measured")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
