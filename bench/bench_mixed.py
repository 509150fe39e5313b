"""CPU per deploy of this checkout against another revision, both in one fleet at once.

    .venv/bin/python bench/bench_mixed.py --base REV [--hosts 7] [--deploys 15] [--runs 2]

On these VMs the CPU a daemon spends on the same deploy moves by 20-40 % between two runs
minutes apart, so a change worth a few per cent cannot be seen by running the old code,
then the new. Here both run in the same deploys: ``REV`` is exported (``git archive``)
into the work directory, half the hosts run it (through PYTHONPATH) and half run this
checkout, and every run is done twice with the halves swapped, so that a host's place in
the fleet (the first host runs `watcherctl deploy` and is left out) does not favour one.
Each deploy is a prefetched artifact without hooks, as in `bench/run.py --only deploy`;
each host's CPU is read from its threads' /proc schedstat around each deploy. Prints, per run, the
mean CPU per host per deploy of each half and their difference; writes the same as JSON
under bench/results/. ``REV`` must speak the same protocol: a deploy that does not commit
fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_deploy import DAEMON, SETTLE  # noqa: E402
from bench.fleetbench import BenchFleet, running  # noqa: E402
from bench.harness import (  # noqa: E402
    RESULTS_DIR,
    RoundFailed,
    compile_package,
    machine,
    thread_cpu_ns,
    use_bench_s3_credentials,
)
from bench.run import consul_binary  # noqa: E402
from tests.support.cluster import ClusterSpec, loopback_from_env, start_cluster  # noqa: E402
from tests.support.fleet import Fleet, WatcherProc, wait_for  # noqa: E402
from tests.support.runner import stop_on_signals  # noqa: E402
from tests.support.s3server import S3Server, s3_client  # noqa: E402
from watcher.config import S3Settings  # noqa: E402

BASE, THIS = "base", "this"


def export(rev: str, into: Path) -> str:
    """``rev``'s tree under ``into``; returns the commit it names."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "watcher"],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(into)], check=True)
    # A daemon started with PYTHONPATH=into must import the exported tree, not this one
    # (the editable install puts this checkout on sys.path after PYTHONPATH).
    found = subprocess.run(
        [sys.executable, "-c", "import watcher; print(watcher.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(into)},
        cwd=into,  # not this checkout: `python -c` puts its cwd first on sys.path
    ).stdout.strip()
    if not Path(found).is_relative_to(into):
        raise SystemExit(f"PYTHONPATH={into} imports {found}, not the exported {rev}")
    return commit


def assign(names: list[str], swapped: bool) -> dict[str, str]:
    """Which half each host runs: the first host (it runs watcherctl) this checkout, the
    others alternating, the other way round when ``swapped``."""
    out = {names[0]: THIS}
    for i, name in enumerate(names[1:]):
        out[name] = BASE if (i % 2 == 0) != swapped else THIS
    return out


def one_run(
    *,
    consul_bin: str,
    loopback: str,
    s3: S3Settings,
    work: Path,
    base_dir: Path,
    hosts: int,
    deploys: int,
    swapped: bool,
) -> dict[str, list[float]]:
    """CPU ms per deploy of every host but the first, by half: {half: [per host mean]}."""
    cluster = start_cluster(ClusterSpec(hosts=hosts), work / "consul", consul_bin, loopback)
    try:
        fleet = BenchFleet(
            cluster,
            Fleet(cluster, s3, work / "hosts", kv_prefix="bench", daemon_extra=DAEMON),
        )
        halves = assign([w.name for w in fleet.watchers], swapped)
        plain_env = WatcherProc.env

        def env(w: WatcherProc) -> dict[str, str]:
            e = plain_env(w)
            if halves.get(w.name) == BASE:
                e["PYTHONPATH"] = str(base_dir)
            else:
                e.pop("PYTHONPATH", None)
            return e

        for w in fleet.watchers:
            w.env = env.__get__(w)  # type: ignore[method-assign]
        with running(fleet):
            fleet.deploy(fleet.publish_prefetched("warm-up"))
            spent: dict[str, float] = {w.name: 0.0 for w in fleet.watchers[1:]}
            for i in range(deploys):
                record = fleet.publish_prefetched(f"v{i}")
                time.sleep(SETTLE)  # the prefetch's own work is done
                before = {w.name: thread_cpu_ns(w.proc.pid) for w in fleet.watchers[1:] if w.proc}
                fleet.deploy_flips(record)
                wait_for(lambda: fleet.fleet.inflight() is None, 60, "deploy over", fleet.fleet)
                time.sleep(SETTLE)
                for w in fleet.watchers[1:]:
                    assert w.proc is not None
                    if w.proc.poll() is not None:
                        raise RoundFailed(f"{w.name} exited {w.proc.returncode}")
                    spent[w.name] += (thread_cpu_ns(w.proc.pid) - before[w.name]) / 1e9
        out: dict[str, list[float]] = {BASE: [], THIS: []}
        for name, seconds in spent.items():
            out[halves[name]].append(seconds / deploys * 1000)
        return out
    finally:
        cluster.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (git)")
    parser.add_argument("--hosts", type=int, default=7, help="hosts, the first included")
    parser.add_argument("--deploys", type=int, default=15, help="deploys per run")
    parser.add_argument("--runs", type=int, default=2, help="pairs of runs (halves swapped)")
    args = parser.parse_args()
    if args.hosts < 3 or args.deploys < 1 or args.runs < 1:
        parser.error("--hosts must be at least 3, --deploys and --runs at least 1")
    loopback = loopback_from_env("bench")
    consul_bin = consul_binary()
    use_bench_s3_credentials()
    compile_package()  # this checkout's half, as export() compiles the other
    work = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    base_commit = export(args.base, work / "base")
    s3 = S3Server(work / "moto.log")
    s3.start()
    rows = []
    try:
        s3_client(s3.endpoint_url).create_bucket(Bucket="bench-artifacts")
        settings = S3Settings(
            bucket="bench-artifacts", prefix="a", region="us-east-1", endpoint_url=s3.endpoint_url
        )
        for run in range(args.runs):
            for swapped in (False, True):
                t0 = time.monotonic()
                by_half = one_run(
                    consul_bin=consul_bin,
                    loopback=loopback,
                    s3=settings,
                    work=work / f"run-{run}-{int(swapped)}",
                    base_dir=work / "base",
                    hosts=args.hosts,
                    deploys=args.deploys,
                    swapped=swapped,
                )
                base, this = (statistics.fmean(by_half[h]) for h in (BASE, THIS))
                rows.append(
                    {
                        "run": run,
                        "swapped": swapped,
                        BASE: by_half[BASE],
                        THIS: by_half[THIS],
                        "difference_ms": this - base,
                        "seconds": round(time.monotonic() - t0, 1),
                    }
                )
                print(
                    f"run {run} {'swapped' if swapped else 'plain  '}  base {base:6.1f} ms  "
                    f"this {this:6.1f} ms  difference {this - base:+6.2f} ms "
                    f"({(this - base) / base:+.1%})",
                    flush=True,
                )
    except RoundFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        s3.stop()
    diffs = [r["difference_ms"] for r in rows]
    print(
        f"\nCPU per host per deploy, this checkout minus {args.base} ({base_commit[:10]}): "
        f"mean {statistics.fmean(diffs):+.2f} ms over {len(diffs)} runs "
        f"({sum(d < 0 for d in diffs)} lower, {sum(d > 0 for d in diffs)} higher); "
        f"{args.hosts - 1} hosts measured, {args.deploys} deploys a run"
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"mixed-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(
        json.dumps(
            {"base": args.base, "base_commit": base_commit, "machine": machine(), "runs": rows},
            indent=2,
        )
        + "\n"
    )
    print(f"figures in {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    stop_on_signals()
    sys.exit(main())
