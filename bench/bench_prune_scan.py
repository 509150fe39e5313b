"""What the /proc scan of a prune costs: ``scan_release_usage`` over every process this
machine lets us read, against the same scan through pathlib (how it read /proc before),
in the same run.

A prune that removes a release first reads the cwd, every open file descriptor and the
maps of every process (DESIGN.md section 2: never remove a release a process uses). It
runs after a deploy, on the host's worker thread, so it is CPU a host spends per deploy
whenever the deploy leaves a release to remove. Processes that cannot be read (this
machine hides pid 1's entries even from root) are left out of both scans alike.

    .venv/bin/python bench/bench_prune_scan.py

Prints one table; the figures also go to bench/results/prune_scan.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from watcher.releases import LinuxProcReader, scan_release_usage

ROUNDS = 21
RESULTS = Path(__file__).resolve().parent / "results"


class Readable(LinuxProcReader):
    """The real /proc, limited to the processes whose entries can be read."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__()
        self._pids = pids

    def pids(self) -> list[int]:
        return list(self._pids)


class PathlibReader(Readable):
    """The baseline: the same reads through pathlib and text-mode maps."""

    def cwd(self, pid: int) -> str:
        return str(Path(f"{self.root}/{pid}/cwd").readlink())

    def fd_targets(self, pid: int) -> list[str]:
        out = []
        for fd in Path(f"{self.root}/{pid}/fd").iterdir():
            try:
                out.append(str(fd.readlink()))
            except FileNotFoundError:
                continue
        return out

    def mapped_paths(self, pid: int) -> list[str]:
        with open(f"{self.root}/{pid}/maps", encoding="utf-8", errors="replace") as fh:
            paths = []
            for line in fh:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    paths.append(parts[5])
            return paths


def readable_pids() -> tuple[list[int], int]:
    pids, fds = [], 0
    reader = LinuxProcReader()
    for pid in reader.pids():
        try:
            reader.cwd(pid)
            fds += len(reader.fd_targets(pid))
            reader.mapped_paths(pid)
        except OSError:
            continue
        pids.append(pid)
    return pids, fds


def cpu_ms(reader: LinuxProcReader) -> float:
    started = time.thread_time()
    _, blocker = scan_release_usage(reader, "/nonexistent/releases")
    took = (time.thread_time() - started) * 1000
    if blocker is not None:
        raise SystemExit(f"bench_prune_scan: the scan was blocked: {blocker}")
    return took


def main() -> int:
    pids, fds = readable_pids()
    ours, baseline = Readable(pids), PathlibReader(pids)
    samples: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(ROUNDS):  # interleaved, so both see the same machine
        samples["ours"].append(cpu_ms(ours))
        samples["baseline"].append(cpu_ms(baseline))
    ours_ms = statistics.median(samples["ours"])
    base_ms = statistics.median(samples["baseline"])
    print(f"prune's /proc scan: {len(pids)} readable processes, {fds} open descriptors")
    print(f"{'figure':40s} {'ours (p50)':>11s} {'baseline (p50)':>15s} {'ratio':>6s}")
    print(
        f"{'CPU of one scan':40s} {ours_ms:8.2f} ms {base_ms:12.2f} ms "
        f"{ours_ms / base_ms:5.2f}x  ({ROUNDS} rounds; baseline: pathlib)"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_scan.json").write_text(
        json.dumps(
            {
                "processes": len(pids),
                "descriptors": fds,
                "rounds": ROUNDS,
                "cpu_ms": samples,
                "p50_ms": {"ours": ours_ms, "baseline": base_ms},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
