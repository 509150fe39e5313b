"""Deploy figures: latency, flip skew, CPU and Consul requests per host, idle cost, scale.

Every deploy is a real one: a prefetched artifact, no hooks, `watcherctl deploy` run as a
process from the first host, daemons started as the product runs them (see fleetbench).
Latency counts from the moment `watcherctl deploy` is started to each host's flip (its
``flipped_at``, checked against ``current`` on its disk). Baselines, in the same run:
the naive peer (``consul watch`` + a shell handler, fired with ``consul event``) and the
KV fan-out floor (one KV write seen by a blocking query on every agent).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.fleetbench import (
    BenchFleet,
    NaivePeers,
    cpu_between,
    kv_fanout,
    ns_between,
    running,
)
from bench.harness import Figure, Results, RoundFailed, cpu_seconds, rss_bytes, run_rounds
from tests.support.cluster import ClusterSpec, start_cluster
from tests.support.fleet import Fleet, wait_for
from watcher.config import S3Settings
from watcher.records import parse_iso

# Seconds a deploy's trailing work (outcome, host records) may take after the command
# returned, before its CPU and requests are read.
SETTLE = 1.0
# The daemons run with the product's defaults (the tests' fleet shortens the session TTL to
# make failures fast; that would triple the idle renewals measured here), metrics on.
DAEMON = {"listen": "127.0.0.1:0", "session_ttl": "15s", "undecided_after": "30s"}


def latency_section(
    results: Results,
    *,
    consul_bin: str,
    loopback: str,
    s3: S3Settings,
    work: Path,
    hosts: int,
    rounds: int,
    app: dict[str, Any] | None = None,
) -> None:
    """Deploy latency and skew vs the naive peer and the KV floor; CPU and requests per host
    per deploy; `watcherctl status --fleet` vs `consul kv get -recurse`. ``app``: settings
    of the app beside the product's defaults (``bench/run.py --flip-delay``)."""
    tag = f"{hosts} hosts"
    last = results.add(
        Figure(
            f"deploy, last flip ({tag})",
            "ms",
            baseline_name="naive peer",
            target="<= 400 ms and <= 0.3x naive at 20 hosts" if hosts == 20 else "",
        )
    )
    skew = results.add(
        Figure(
            f"deploy, flip skew ({tag})",
            "ms",
            baseline_name="naive peer",
            target="<= 50 ms at 20 hosts" if hosts == 20 else "",
        )
    )
    from_record = results.add(
        Figure(
            f"deploy, last flip after the deploy record ({tag})",
            "ms",
            note="from requested_at: without watcherctl's own start-up",
        )
    )
    floor = results.add(
        Figure(f"KV fan-out floor, last agent ({tag})", "ms", note="one KV write, every agent")
    )
    cpu = results.add(
        Figure(
            f"CPU per host per deploy, mean ({tag})",
            "ms",
            baseline_name="naive peer",
            target="<= 15 ms",
        )
    )
    cpu_max = results.add(Figure(f"CPU per host per deploy, max ({tag})", "ms"))
    cpu_ns = results.add(
        Figure(
            f"CPU per host per deploy, mean, live threads' schedstat ({tag})",
            "ms",
            note="the row above to the nanosecond (/proc/<pid>/stat counts 10 ms ticks), "
            "but only of the threads alive at both readings: a watch that a deploy starts "
            "and ends is not in it, so it is a lower bound, the ticks' mean the figure; the "
            "naive peer's handlers are reaped children, counted in ticks only",
        )
    )
    reqs = results.add(
        Figure(
            f"Consul requests per host per deploy, mean ({tag})",
            "",
            baseline_name="idle, same time",
            target="<= 10",
        )
    )
    reqs_max = results.add(Figure(f"Consul requests per host per deploy, max ({tag})", ""))
    figures = [last, skew, from_record, floor, cpu, cpu_max, cpu_ns, reqs, reqs_max]

    cluster = start_cluster(ClusterSpec(hosts=hosts), work / "consul", consul_bin, loopback)
    try:
        fleet = BenchFleet(
            cluster,
            Fleet(
                cluster,
                s3,
                work / "hosts",
                kv_prefix="bench",
                daemon_extra=DAEMON,
                app_extra=dict(app or {}),
            ),
        )
        naive = NaivePeers(consul_bin, cluster.hosts, work / "naive")
        with running(fleet, naive):
            # one deploy first: every host then has a `current` and the same state
            fleet.deploy(fleet.publish_prefetched("warm-up"))

            def one_round(i: int) -> list[float | None]:
                naive_cpu0 = naive.cpu()
                naive_flips = naive.round(f"r{i:03d}")
                time.sleep(SETTLE)
                naive_cpu = [b - a for a, b in zip(naive_cpu0, naive.cpu(), strict=True)]
                last.baseline.append(max(naive_flips) * 1000)
                skew.baseline.append((max(naive_flips) - min(naive_flips)) * 1000)
                cpu.baseline.append(sum(naive_cpu) / len(naive_cpu) * 1000)

                fan = kv_fanout(cluster.hosts, f"bench/fanout/{i}")

                record = fleet.publish_prefetched(f"v{i}")
                time.sleep(SETTLE)  # the prefetch's own work is done
                idle0 = fleet.usage()
                t_idle = time.monotonic()
                time.sleep(SETTLE)
                idle1 = fleet.usage()
                idle_s = time.monotonic() - t_idle
                t0 = time.monotonic()
                started, flips, result = fleet.deploy_flips(record)
                requested = parse_iso(str(result["requested_at"])).timestamp()
                wait_for(lambda: fleet.fleet.inflight() is None, 60, "deploy over", fleet.fleet)
                time.sleep(SETTLE)
                after = fleet.usage()
                window = time.monotonic() - t0
                cpu_ms = [cpu_between(idle1[n], after[n]) * 1000 for n in after]
                precise_ms = [ns_between(idle1[n], after[n]) * 1000 for n in after]
                # A session renewal falls in ~2 of 5 windows whether a deploy runs or not
                # (every TTL/2): the idle rate's, not the deploy's (it moved the 5-host
                # mean between 9.2 and 11.0 in one run). The baseline keeps them.
                req = [
                    after[n].requests - idle1[n].requests - (after[n].renewals - idle1[n].renewals)
                    for n in after
                ]
                idle_req = [
                    (idle1[n].requests - idle0[n].requests) * window / idle_s for n in after
                ]
                reqs.baseline.append(sum(idle_req) / len(idle_req))
                return [
                    max(flips) * 1000,
                    (max(flips) - min(flips)) * 1000,
                    (max(flips) + started - requested) * 1000,
                    max(fan) * 1000,
                    sum(cpu_ms) / len(cpu_ms),
                    max(cpu_ms),
                    sum(precise_ms) / len(precise_ms),
                    sum(req) / len(req),
                    max(req),
                ]

            run_rounds(figures, rounds, one_round)
            if hosts == min(5, hosts):
                status_figure(results, fleet, consul_bin, cluster.hosts[0].env(), rounds=7)
    finally:
        cluster.stop_all()


def status_figure(
    results: Results, fleet: BenchFleet, consul_bin: str, env: dict[str, str], rounds: int
) -> None:
    """`watcherctl status --fleet` as a whole process vs the Consul CLI reading the same KV."""
    fig = results.add(
        Figure(
            f"watcherctl status --fleet ({len(fleet.watchers)} hosts)",
            "ms",
            baseline_name="consul kv get -recurse",
            target="<= 150 ms",
        )
    )
    w0 = fleet.watchers[0]
    for _ in range(rounds):
        t = time.perf_counter()
        result = w0.ctl("status", "--fleet", as_json=False, check=False)
        ours = time.perf_counter() - t
        if result.returncode != 0:
            fig.failed = f"status --fleet exited {result.returncode}: {result.stderr[-200:]}"
            raise RoundFailed(fig.failed)
        t = time.perf_counter()
        subprocess.run(
            [consul_bin, "kv", "get", "-recurse", "bench/apps/web/"],
            check=True,
            capture_output=True,
            env={**os.environ, **env},
        )
        fig.baseline.append((time.perf_counter() - t) * 1000)
        fig.ours.append(ours * 1000)


def scale_section(
    results: Results,
    *,
    consul_bin: str,
    loopback: str,
    s3: S3Settings,
    work: Path,
    agents: int,
    sizes: tuple[int, ...],
    rounds: int,
    app: dict[str, Any] | None = None,
) -> None:
    """Many watchers sharing agents: deploy latency and the fleet's Consul requests/s.

    The smallest size is the baseline of the others: growth no worse than linear means a
    ratio of at most (size / smallest)."""
    base_n = sizes[0]
    per_size: dict[int, tuple[Figure, Figure]] = {}
    for n in sizes:
        label = f"{n} watchers on {agents} agents"
        lat = Figure(f"scale: deploy, last flip ({label})", "ms")
        rps = Figure(f"scale: Consul requests/s in a deploy ({label})", "/s")
        if n != base_n:
            lat.baseline_name = rps.baseline_name = f"{base_n} watchers"
            lat.target = rps.target = f"ratio <= {n / base_n:.1f}x (linear)"
        per_size[n] = (results.add(lat), results.add(rps))
    for n in sizes:
        if n % agents:
            raise ValueError(f"{n} watchers do not share {agents} agents evenly")
        lat, rps = per_size[n]
        cluster = start_cluster(
            ClusterSpec(hosts=agents), work / f"consul-{n}", consul_bin, loopback
        )
        try:
            fleet = BenchFleet(
                cluster,
                Fleet(
                    cluster,
                    s3,
                    work / f"hosts-{n}",
                    kv_prefix=f"scale{n}",
                    daemon_extra=DAEMON,
                    app_extra={
                        "timeouts": {"prepare": "240s", "apply": "240s", "hook": "20s"},
                        **(app or {}),
                    },
                ),
                per_agent=n // agents,
            )
            with running(fleet):
                fleet.deploy(fleet.publish_prefetched("warm-up"))

                def one_round(i: int, fleet: BenchFleet = fleet) -> list[float | None]:
                    record = fleet.publish_prefetched(f"v{i}")
                    time.sleep(SETTLE)
                    before = fleet.usage()
                    t0 = time.monotonic()
                    _, flips, _ = fleet.deploy_flips(record)
                    wait_for(lambda: fleet.fleet.inflight() is None, 120, "deploy over")
                    window = time.monotonic() - t0
                    after = fleet.usage()
                    total = sum(after[k].requests - before[k].requests for k in after)
                    return [max(flips) * 1000, total / window]

                run_rounds([lat, rps], rounds, one_round)
        finally:
            cluster.stop_all()
    base_lat, base_rps = per_size[base_n]
    for n in sizes[1:]:
        lat, rps = per_size[n]
        lat.baseline, rps.baseline = list(base_lat.ours), list(base_rps.ours)


def idle_section(
    results: Results,
    *,
    consul_bin: str,
    loopback: str,
    s3: S3Settings,
    work: Path,
    seconds: float,
) -> None:
    """One daemon with 3 apps, idle: RSS, CPU and Consul requests over ``seconds``,
    beside a naive peer (``consul watch``) on the same agent."""
    rss = results.add(
        Figure("idle daemon RSS (3 apps)", "MB", baseline_name="naive peer", target="<= 50 MB")
    )
    cpu = results.add(
        Figure(f"idle daemon CPU over {seconds:.0f} s (3 apps)", "ms", baseline_name="naive peer")
    )
    reqs = results.add(
        Figure(
            f"idle daemon Consul requests over {seconds:.0f} s (3 apps)",
            "",
            target="blocking queries and renewals only",
        )
    )
    cluster = start_cluster(ClusterSpec(hosts=1), work / "consul-idle", consul_bin, loopback)
    try:
        fleet = BenchFleet(
            cluster,
            Fleet(
                cluster,
                s3,
                work / "hosts-idle",
                kv_prefix="idle",
                daemon_extra=DAEMON,
            ),
        )
        w = fleet.watchers[0]
        config = yaml.safe_load(w.config_path.read_text())
        web = config["apps"].pop("web")
        for app in ("web", "api", "worker"):
            config["apps"][app] = dict(web)
        w.config_path.write_text(yaml.safe_dump(config))
        naive = NaivePeers(consul_bin, cluster.hosts, work / "naive-idle")
        with running(naive):
            w.start()
            try:
                fleet.wait_port(w)
                time.sleep(5)  # start-up done: session, member keys, first queries
                assert w.proc is not None
                peer = naive.procs[0]
                c0, p0, k0 = (
                    cpu_seconds(w.proc.pid),
                    cpu_seconds(peer.pid, children=True),
                    fleet.requests(w),
                )
                time.sleep(seconds)
                c1, p1, k1 = (
                    cpu_seconds(w.proc.pid),
                    cpu_seconds(peer.pid, children=True),
                    fleet.requests(w),
                )
                r0, r1 = sum(k0.values()), sum(k1.values())
                rss.ours.append(rss_bytes(w.proc.pid) / 1e6)
                rss.baseline.append(rss_bytes(peer.pid) / 1e6)
                cpu.ours.append((c1 - c0) * 1000)
                cpu.baseline.append((p1 - p0) * 1000)
                reqs.ours.append(r1 - r0)
                reqs.note = "by kind: " + ", ".join(
                    f"{k} {k1[k] - k0.get(k, 0):.0f}" for k in sorted(k1) if k1[k] != k0.get(k, 0)
                )
            finally:
                w.stop()
    finally:
        cluster.stop_all()


if __name__ == "__main__":
    sys.exit("run `make bench` (bench/run.py), which sets up what this module needs")
