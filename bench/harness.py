"""What every benchmark of `make bench` shares: rounds that fail loudly, medians, one table.

A figure is a list of per-round samples of ours and, measured in the same run, of its
baseline. A round that did not do what it measures (a host that did not flip, a request
that was not counted) raises ``RoundFailed``: the figure then has no median, the table
says FAILED with the reason, and the run exits non-zero. Nothing here prints a number for
a round that did not happen.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "watcher"


def compile_package(package: Path = PACKAGE_DIR) -> None:
    """Write the package's bytecode, as a pip install does, before anything is timed.
    Without it, and with PYTHONDONTWRITEBYTECODE set, every process the bench starts
    (each `watcherctl`, each daemon) compiles what it imports again: `status --fleet` was
    measured at 199 ms against 130 ms that way. Cheap when the bytecode is up to date."""
    import compileall

    if not compileall.compile_dir(str(package), quiet=1):
        raise RuntimeError(f"compiling {package} failed")


def use_bench_s3_credentials() -> None:
    """Credentials for the test S3 server, in this process's environment and so in every
    daemon it starts: the server takes any, but boto3 wants some to sign with (without
    them every prefetch fails with "no usable AWS credentials")."""
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )


class RoundFailed(Exception):
    """A round did not do what it measures; no sample may come out of it."""


def flip_times(
    expected: str,
    hosts: Sequence[str],
    currents: Mapping[str, str | None],
    flipped_at: Mapping[str, float | None],
    start: float,
) -> list[float]:
    """Seconds from ``start`` to each host's flip, checked against the hosts' disks.

    ``currents``: the release each host's ``current`` points at on disk after the round;
    ``flipped_at``: each host's flip time (epoch seconds) as it reported it. Every host must
    be on ``expected`` and have a flip time not before ``start``, or the round failed.
    """
    problems = []
    for host in hosts:
        on_disk = currents.get(host)
        at = flipped_at.get(host)
        if on_disk != expected:
            problems.append(f"{host}: current is {on_disk!r}, not {expected!r}")
        elif at is None:
            problems.append(f"{host}: no flip time")
        elif at < start - 0.001:  # the clocks are the same; 1 ms of rounding in ISO times
            problems.append(f"{host}: flipped before the round started ({at - start:.3f} s)")
    if problems:
        raise RoundFailed(
            f"{len(problems)} of {len(hosts)} hosts did not flip: "
            + "; ".join(problems[:5])
            + (" ..." if len(problems) > 5 else "")
        )
    return [flipped_at[h] - start for h in hosts]  # type: ignore[operator]


@dataclass
class Figure:
    """One row of the table: our samples and the baseline's, one per round."""

    name: str
    unit: str
    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_name: str = ""
    target: str = ""
    failed: str = ""  # why a round failed: then no median at all
    note: str = ""
    compare: bool = True  # False: the baseline is context, a ratio would mean nothing

    def median(self) -> float | None:
        if self.failed or not self.ours:
            return None
        return statistics.median(self.ours)

    def baseline_median(self) -> float | None:
        if self.failed or not self.baseline:
            return None
        return statistics.median(self.baseline)

    def ratio(self) -> float | None:
        ours, base = self.median(), self.baseline_median()
        if not self.compare or ours is None or base is None or base == 0:
            return None
        return ours / base


@dataclass
class Results:
    """Every figure of one `make bench` run."""

    figures: list[Figure] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    @property
    def failed(self) -> list[Figure]:
        return [f for f in self.figures if f.failed]

    def table(self) -> str:
        rows = [("figure", "ours (p50)", "baseline (p50)", "ratio", "rounds", "target")]
        for f in self.figures:
            if f.failed:
                rows.append((f.name, "FAILED", "", "", "", f.failed[:120]))
                continue
            ours, base, ratio = f.median(), f.baseline_median(), f.ratio()
            rows.append(
                (
                    f.name,
                    _show(ours, f.unit),
                    f"{_show(base, f.unit)} {f.baseline_name}".strip()
                    if base is not None
                    else (f.baseline_name or "-"),
                    f"{ratio:.2f}x" if ratio is not None else "-",
                    str(len(f.ours)),
                    f.target,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = []
        for f in self.figures:
            doc = asdict(f)
            doc.update(median=f.median(), baseline_median=f.baseline_median(), ratio=f.ratio())
            out.append(doc)
        return {"context": self.context, "figures": out}

    def write(self, directory: Path = RESULTS_DIR) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / time.strftime("bench-%Y%m%dT%H%M%SZ.json", time.gmtime())
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        (directory / "latest.json").write_text(path.read_text())
        return path


def _show(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}" if abs(value) >= 10 else f"{value:.2f} {unit}"


def run_rounds(
    figures: Sequence[Figure], rounds: int, one_round: Callable[[int], Sequence[float | None]]
) -> None:
    """Run ``one_round(i)`` ``rounds`` times; its j-th sample goes to figure j (None: no
    sample). The first ``RoundFailed`` marks every figure failed and stops: no median of
    the rounds before it is printed either."""
    for i in range(rounds):
        try:
            samples = one_round(i)
        except RoundFailed as exc:
            for f in figures:
                f.failed = f"round {i + 1}: {exc}"
            raise
        for f, sample in zip(figures, samples, strict=True):
            if sample is not None:
                f.ours.append(sample)


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime+stime of a process from /proc/<pid>/stat (with its reaped children's if asked)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    ticks = utime + stime + (cutime + cstime if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def thread_cpu_ns(pid: int) -> int:
    """CPU nanoseconds of ``pid``'s live threads (their schedstat): ``cpu_seconds`` counts
    clock ticks of 10 ms, as much as a daemon spends on a whole deploy. A thread that ended
    is not counted, nor are reaped children."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended between the listing and the read
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RoundFailed(f"pid {pid} has no VmRSS (a zombie?)")


def machine() -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "load_at_start": [round(load1, 2), round(load5, 2)],
        "python": platform.python_version(),
        "kernel": platform.release(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
