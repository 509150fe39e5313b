"""`make bench`: every figure beside its baseline measured in the same run, in one table.

    .venv/bin/python bench/run.py [--quick] [--only deploy,scale,idle,stage,flips]
                                  [--flip-delay DURATION]

Sets up what it measures: a Consul cluster per section (on $WATCHER_TEST_LOOPBACK, default
127.0.40) and one moto S3 server. Prints one table of medians over rounds, with the ratio to
the baseline, and writes the same figures as JSON under bench/results/ (not committed).
A round that does not do what it measures fails its figures (no median) and the run exits
1. ``--quick`` runs small sizes and few rounds, for trying the bench itself out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_deploy import idle_section, latency_section, scale_section  # noqa: E402
from bench.bench_flip import flip_section  # noqa: E402
from bench.bench_stage import stage_section  # noqa: E402
from bench.harness import Figure, Results, compile_package, machine, use_bench_s3_credentials  # noqa: E402
from tests.support.cluster import loopback_from_env  # noqa: E402
from tests.support.runner import stop_on_signals  # noqa: E402
from tests.support.s3server import S3Server, s3_client  # noqa: E402
from watcher.config import S3Settings, parse_flip_delay  # noqa: E402
from watcher.log import configure_logging  # noqa: E402

SECTIONS = ("deploy", "scale", "idle", "stage", "flips")


def consul_binary() -> str:
    path = os.environ.get("CONSUL_BIN")
    if path:
        return path
    out = subprocess.run(
        [str(REPO / "scripts" / "install-consul")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--flip-delay",
        metavar="DURATION",
        help="the daemons' flip_delay in the deploy and scale sections (default: the "
        'product\'s); "0" shows the flips without waiting for the agreed moment',
    )
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; known: {SECTIONS}")
    app: dict[str, str] = {}
    if args.flip_delay is not None:
        try:
            parse_flip_delay(args.flip_delay)
        except ValueError:
            parser.error(f"--flip-delay: not a duration from 0 to 5s: {args.flip_delay!r}")
        app["flip_delay"] = args.flip_delay
    configure_logging(level="warning")
    compile_package()
    q = args.quick
    loopback = loopback_from_env("bench")
    consul_bin = consul_binary()
    use_bench_s3_credentials()
    results = Results(
        context={
            **machine(),
            "quick": q,
            "sections": only,
            "loopback": loopback,
            "flip_delay": args.flip_delay or "the product's default",
        }
    )
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    s3 = S3Server(work / "moto.log")
    started = time.monotonic()
    try:
        s3.start()
        s3_client(s3.endpoint_url).create_bucket(Bucket="bench-artifacts")
        settings = S3Settings(
            bucket="bench-artifacts", prefix="a", region="us-east-1", endpoint_url=s3.endpoint_url
        )
        plan: list[tuple[str, str, Callable[[Path], None]]] = []

        def deploy_run(hosts: int) -> Callable[[Path], None]:
            def run(w: Path) -> None:
                latency_section(
                    results,
                    consul_bin=consul_bin,
                    loopback=loopback,
                    s3=settings,
                    work=w,
                    hosts=hosts,
                    rounds=3 if q else 5,
                    app=app,
                )

            return run

        for hosts in (5,) if q else (5, 20):
            plan.append(("deploy", f"{hosts} hosts", deploy_run(hosts)))
        plan.append(
            (
                "scale",
                "shared agents",
                lambda w: scale_section(
                    results,
                    consul_bin=consul_bin,
                    loopback=loopback,
                    s3=settings,
                    work=w,
                    agents=2 if q else 10,
                    sizes=(4, 8) if q else (50, 100),
                    rounds=2 if q else 3,
                    app=app,
                ),
            )
        )
        plan.append(
            (
                "idle",
                "3 apps",
                lambda w: idle_section(
                    results,
                    consul_bin=consul_bin,
                    loopback=loopback,
                    s3=settings,
                    work=w,
                    seconds=10 if q else 60,
                ),
            )
        )
        plan.append(
            (
                "stage",
                "S3 to release",
                lambda w: stage_section(
                    results, s3=settings, work=w, size_mb=32 if q else 256, rounds=2 if q else 3
                ),
            )
        )
        plan.append(
            (
                "flips",
                "nginx",
                lambda w: flip_section(
                    results,
                    work=w,
                    requests=10_000 if q else 100_000,
                    min_flips=50 if q else 500,
                ),
            )
        )
        for section, label, run in plan:
            if section not in only:
                continue
            print(f"bench: {section} ({label}) ...", file=sys.stderr, flush=True)
            before = len(results.figures)
            section_dir = work / f"{section}-{len(results.figures)}"
            section_dir.mkdir()
            t = time.monotonic()
            try:
                run(section_dir)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                for f in results.figures[before:]:
                    f.failed = f.failed or reason
                if before == len(results.figures):
                    results.add(Figure(f"{section} ({label})", "", failed=reason))
                traceback.print_exc(file=sys.stderr)
            print(
                f"bench: {section} ({label}) took {time.monotonic() - t:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        s3.stop()
        if args.keep:
            print(f"bench: work directory kept at {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results.context["took_s"] = round(time.monotonic() - started)
    results.context["load_at_end"] = [round(x, 2) for x in os.getloadavg()[:2]]
    path = results.write()
    print()
    print(results.table())
    for f in results.figures:
        if f.note:
            print(f"  {f.name}: {f.note}")
    print(
        f"\n{os.cpu_count()} CPUs, load {results.context['load_at_start']} at start, "
        f"{results.context['load_at_end']} at end; {results.context['took_s']} s; "
        f"figures in {path.relative_to(REPO)}"
    )
    if results.failed:
        print(f"bench: {len(results.failed)} figure(s) FAILED (no median)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    stop_on_signals()
    sys.exit(main())
