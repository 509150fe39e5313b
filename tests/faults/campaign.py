"""`make faults`: randomized fault deploys on a real cluster, each followed by an invariant check.

One Consul server and N >= 5 client agents (tests/support/cluster.py), one real `watcher run`
per agent (tests/support/fleet.py), the moto S3 server behind the corrupting proxy
(tests/support/faulty_s3.py). Every deploy draws one fault and its moment from
``random.Random(f"{seed}/{n}")``, so ``--seed S --only N`` replays deploy N's plan. After
each deploy every process is restored and tests/faults/invariants.py checks DESIGN.md 6
from raw KV and the hosts' directories. Usage: ``python -m tests.faults.campaign --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults import invariants as inv
from tests.support.cluster import (
    ClusterError,
    ClusterSpec,
    ConsulCluster,
    loopback_from_env,
    start_cluster,
)
from tests.support.faulty_s3 import FaultyS3Proxy
from tests.support.fleet import SESSION_TTL, Fleet, WatcherProc, consul_for
from tests.support.runner import stop_on_signals
from tests.support.s3server import S3Server, s3_client
from watcher.config import S3Settings

APP = "web"
MIN_HOSTS = 5
DISK_BYTES = 16 * 1024 * 1024  # the full-disk host's app root (a tmpfs)
HOOK_TIMEOUT = 3.0
DEAD_SESSION = 2 * SESSION_TTL  # Consul's grace: a silent session is gone after ~2x its TTL
DECISION_WAIT = 60.0  # a deploy with no decision by then is reported, not waited for
END_WAIT = 120.0  # inflight gone, after every process is back
CONVERGE_WAIT = 60.0  # every live host on the fleet's current, after the deploy ended
STATUS_WAIT = 40.0  # status --fleet agrees with the disks (records follow a flip within a tick)
RESTORE_WAIT = 60.0
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

#: Every fault the campaign draws from, with its weight.
FAULTS: dict[str, int] = {
    "none": 1,
    "kill_watcher_before": 2,
    "kill_watcher_during": 2,
    "kill_watcher_after": 2,
    "stop_watcher": 1,
    "kill_agent": 2,
    "kill_server": 1,
    "cut_host": 2,
    "s3_error": 1,
    "s3_corrupt": 1,
    "hook_fail": 1,
    "hook_hang": 1,
    "disk_full": 1,
    "concurrent_deploy": 1,
    "abort_race": 2,
}

HOOK = """#!/bin/sh
# post_release of the campaign: fails or hangs on this node while the runner's file says so.
ctl={ctl}
node=$1
if [ -e "$ctl/fail-$node" ]; then echo "injected hook failure on $node" >&2; exit 1; fi
while [ -e "$ctl/hang-$node" ]; do
  kill -0 "$PPID" 2>/dev/null || exit 70
  sleep 0.1
done
exit 0
"""


# `watcherctl abort`, started ahead with its imports done, so that the abort itself lands
# within milliseconds of the moment drawn (a cold start of the CLI takes longer than a
# prefetched deploy needs to commit). It reads the deploy id from stdin.
ABORTER = """
import sys
import watcher.barrier, watcher.ctl_fleet
from watcher.ctl import main
deploy = sys.stdin.readline().strip()
sys.exit(main(["abort", deploy, "--app", "web", "--reason", "fault campaign",
               "-c", sys.argv[1], "--json"]))
"""


@dataclass
class Plan:
    """One deploy's fault, drawn from ``random.Random(f"{seed}/{n}")`` alone."""

    n: int
    fault: str
    victim: int  # index into the hosts
    coordinator: bool  # aim at the deploy's coordinator instead (watcher kills)
    delay: float  # seconds after the deploy appeared in KV
    hold: float  # how long the fault lasts before it is undone
    starter: int  # the host whose watcherctl starts the deploy
    times: int | None  # S3 faults: how many requests (None: every one until restored)

    @classmethod
    def draw(cls, seed: int, n: int, hosts: int) -> Plan:
        rng = random.Random(f"{seed}/{n}")
        fault = rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
        victim = rng.randrange(hosts)
        coordinator = rng.random() < 0.5
        starter = rng.randrange(hosts)
        delay = {
            "kill_watcher_before": rng.uniform(0.0, 0.15),
            "kill_watcher_during": rng.uniform(0.1, 0.8),
            "kill_watcher_after": rng.uniform(0.0, 0.3),  # after the decision
            "abort_race": rng.uniform(0.0, 0.3),
        }.get(fault, rng.uniform(0.0, 0.8))
        if fault.startswith("kill_watcher"):
            # back at once (the session survives, the deploy goes on) or after it died
            hold = rng.choice([rng.uniform(0.0, 1.0), DEAD_SESSION + rng.uniform(1.0, 3.0)])
        elif fault == "stop_watcher":
            hold = DEAD_SESSION + rng.uniform(1.0, 4.0)
        elif fault in ("kill_agent", "kill_server"):
            hold = rng.uniform(0.5, 5.0)
        elif fault == "cut_host":
            hold = rng.uniform(1.0, 8.0)
        else:
            hold = 0.0
        times = rng.choice([1, 3, None])
        return cls(n, fault, victim, coordinator, delay, hold, starter, times)


@dataclass
class DeployResult:
    n: int
    plan: Plan
    deploy: str | None = None
    decision: str | None = None
    to_decision: float | None = None
    to_converged: float | None = None
    note: str = ""
    violations: list[inv.Violation] = field(default_factory=list)
    #: `status --fleet` still exited 1 (it shows something it does not trust) once the
    #: fleet had settled: not a violation of DESIGN.md 6, but never a healthy fleet's state.
    status_in_doubt: str = ""


@dataclass
class Report:
    seed: int
    hosts: int
    results: list[DeployResult] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    wall: float = 0.0

    @property
    def violations(self) -> list[tuple[int, inv.Violation]]:
        return [(r.n, v) for r in self.results for v in r.violations]

    def summary(self) -> dict[str, Any]:
        def spread(values: list[float]) -> dict[str, float | None]:
            if not values:
                return {"p50": None, "p95": None, "max": None}
            ordered = sorted(values)
            return {
                "p50": round(statistics.median(ordered), 3),
                "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
                "max": round(ordered[-1], 3),
            }

        return {
            "seed": self.seed,
            "hosts": self.hosts,
            "deploys": len(self.results),
            "wall_s": round(self.wall, 1),
            "faults": dict(sorted(Counter(r.plan.fault for r in self.results).items())),
            "commits": sum(r.decision == "commit" for r in self.results),
            "aborts": sum(r.decision == "abort" for r in self.results),
            "not_started": sum(r.deploy is None for r in self.results),
            "status_in_doubt": [
                {"deploy": r.n, "why": r.status_in_doubt} for r in self.results if r.status_in_doubt
            ],
            "time_to_decision_s": spread(
                [r.to_decision for r in self.results if r.to_decision is not None]
            ),
            "time_to_convergence_s": spread(
                [r.to_converged for r in self.results if r.to_converged is not None]
            ),
            "by_fault": {
                fault: {
                    "deploys": len(rs),
                    "commits": sum(r.decision == "commit" for r in rs),
                    "aborts": sum(r.decision == "abort" for r in rs),
                    "decision_p50_s": spread(
                        [r.to_decision for r in rs if r.to_decision is not None]
                    )["p50"],
                    "decision_max_s": spread(
                        [r.to_decision for r in rs if r.to_decision is not None]
                    )["max"],
                }
                for fault in sorted({r.plan.fault for r in self.results})
                for rs in [[r for r in self.results if r.plan.fault == fault]]
            },
            "violations": [
                {"deploy": n, "violation": str(v), "replay": self.replay(n)}
                for n, v in self.violations
            ],
        }

    def replay(self, n: int) -> str:
        return f'make faults FAULTS_ARGS="--seed {self.seed} --only {n}"'

    def render(self) -> str:
        s = self.summary()
        lines = [
            f"fault campaign: seed {s['seed']}, {s['hosts']} hosts, {s['deploys']} deploys "
            f"in {s['wall_s']} s",
            "faults: " + ", ".join(f"{k} {v}" for k, v in s["faults"].items()),
            f"commits {s['commits']}, aborts {s['aborts']}, not started {s['not_started']}",
            f"status --fleet in doubt (exit 1) after settling: {len(s['status_in_doubt'])}"
            + "".join(f"\n  deploy {d['deploy']}: {d['why']}" for d in s["status_in_doubt"]),
            "time to decision (s): " + _fmt(s["time_to_decision_s"]),
            "time to convergence (s): " + _fmt(s["time_to_convergence_s"]),
        ]
        lines.append(
            f"  {'fault':<20} {'deploys':>7} {'commits':>7} {'aborts':>6} "
            f"{'decision p50':>12} {'max':>7}"
        )
        for fault, f in s["by_fault"].items():
            lines.append(
                f"  {fault:<20} {f['deploys']:>7} {f['commits']:>7} {f['aborts']:>6} "
                f"{_num(f['decision_p50_s']):>12} {_num(f['decision_max_s']):>7}"
            )
        lines.append(f"violations: {len(s['violations'])}")
        lines += [
            f"  deploy {v['deploy']}: {v['violation']}  ({v['replay']})" for v in s["violations"]
        ]
        return "\n".join(lines)


def _doubt_of(data: dict[str, Any]) -> str:
    """What made `status --fleet` exit 1, from its JSON: the records it did not trust, a
    contested or BROKEN deploy, a live host's alarm."""
    app = data.get(APP) or {}
    dep = app.get("deploy") or {}
    said = [*(app.get("current_problems") or {}).values(), *(dep.get("distrusted") or ())]
    if dep.get("problem"):
        said.append(str(dep["problem"]))
    if dep.get("decision") == "contested":
        said.append(f"deploy {dep.get('id')} contested")
    said += [
        f"alarm on {node}: {host['alarm']}"
        for node, host in (app.get("hosts") or {}).items()
        if isinstance(host, dict) and host.get("alarm") and host.get("member")
    ]
    return "; ".join(str(x) for x in said)[:300] or "exit 1 with nothing named"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt(spread: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {'-' if v is None else v}" for k, v in spread.items())


class Campaign:
    """A started fleet plus the means to hurt it and to check it."""

    def __init__(
        self,
        cluster: ConsulCluster,
        s3_endpoint: str,
        workdir: Path,
        seed: int,
        *,
        prepare_timeout: float = 20.0,
        log: Callable[[str], None] = print,
    ) -> None:
        if len(cluster.hosts) < MIN_HOSTS:
            raise ValueError(
                f"a campaign needs at least {MIN_HOSTS} hosts, got {len(cluster.hosts)}"
            )
        if os.geteuid() != 0:
            raise PermissionError("the fault campaign needs root (tmpfs mount, nftables)")
        os.environ.update(FAKE_AWS_ENV)
        self.cluster = cluster
        self.seed = seed
        self.log = log
        self.workdir = workdir
        self.proxy = FaultyS3Proxy(s3_endpoint).start()
        bucket = f"faults-{uuid.uuid4().hex[:12]}"
        s3_client(s3_endpoint).create_bucket(Bucket=bucket)
        settings = S3Settings(
            bucket=bucket,
            prefix="artifacts",
            region="us-east-1",
            endpoint_url=self.proxy.endpoint_url,
        )
        self.prefix = f"faults{seed}x{uuid.uuid4().hex[:6]}"
        self.status_doubt = ""  # why the last `status --fleet` exited 1, if it did
        self.fleet = Fleet(cluster, settings, workdir, app=APP, kv_prefix=self.prefix)
        self.fleet.kv = consul_for(cluster.server)  # client agents get killed and cut off
        self.ctl = workdir / "ctl"
        self.ctl.mkdir(exist_ok=True)
        hook = self.ctl / "hook"
        hook.write_text(HOOK.format(ctl=self.ctl))
        hook.chmod(0o755)
        for w in self.watchers:
            self.fleet.write_config(
                w,
                {
                    "hooks": {"post_release": [[str(hook), w.name]]},
                    "timeouts": {
                        "prepare": f"{prepare_timeout:.0f}s",
                        "apply": "30s",
                        "hook": f"{HOOK_TIMEOUT:.0f}s",
                    },
                    # The full-disk host's root is a 16 MiB tmpfs: the default reserve
                    # (1 GiB free) would refuse every artifact there, full or not.
                    "limits": {"disk_reserve": "1MiB", "disk_fraction": 0.9},
                },
            )
        # The last host's app root is a small tmpfs, so it can be filled up.
        self.disk_host = self.watchers[-1]
        self.disk = self.disk_host.root / "srv"
        self.disk.mkdir(parents=True, exist_ok=True)
        self._mount(self.disk)
        self.monitor = inv.CurrentMonitor({w.name: w.app_dir for w in self.watchers})
        self.committed: dict[str, str] = {}
        self._stopped: set[str] = set()  # watchers under SIGSTOP
        self._counter = 0
        # One long-lived thread injects every fault: agents it restarts get PR_SET_PDEATHSIG,
        # which fires when the *thread* that forked them exits, so it must outlive them.
        self._injector = ThreadPoolExecutor(1, thread_name_prefix="injector")

    @property
    def watchers(self) -> list[WatcherProc]:
        return self.fleet.watchers

    # --- set-up and tear-down -----------------------------------------------------------

    @staticmethod
    def _mount(path: Path) -> None:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cannot mount a tmpfs at {path}: {result.stderr.strip()}")

    def start(self) -> None:
        """Start the watchers and the monitor, and deploy a first release without faults."""
        self.fleet.start()
        self.monitor.start()
        record = self.publish(announce=True)
        started = self.watchers[0].ctl("deploy", APP, record.id, "--timeout", "60", check=False)
        if started.returncode != 0:
            raise RuntimeError(f"the baseline deploy failed: {started.stdout}{started.stderr}")
        self._wait_settled(time.monotonic())
        violations = self.check()
        if violations:
            raise RuntimeError(
                "the baseline deploy already violates: " + "; ".join(map(str, violations))
            )

    def close(self) -> None:
        self.monitor.stop()
        self._injector.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.restore()
        for w in self.watchers:
            with contextlib.suppress(Exception):
                w.stop(10)
        self.proxy.stop()
        if subprocess.run(["umount", str(self.disk)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(self.disk)], check=False)

    # --- helpers ------------------------------------------------------------------------

    def publish(self, *, announce: bool) -> Any:
        self._counter += 1
        return self.fleet.publish(f"{self.prefix}-{self._counter}", announce=announce)

    def snapshot(self) -> inv.KVSnapshot:
        return inv.read_snapshot(self.cluster.server, self.prefix, APP)

    def _kv_value(self, key: str) -> bytes | None:
        """One key of the app, raw, through the server; None when absent or unreachable."""
        path = "/v1/kv/" + urllib.parse.quote(inv.app_base(self.prefix, APP) + key) + "?raw=true"
        try:
            status, body = self.cluster.server.request("GET", path, timeout=2.0)
        except OSError:
            return None
        return body if status == 200 else None

    def _decided(self, deploy_id: str, timeout: float) -> float | None:
        """Seconds until the deploy's decision key exists, or None after ``timeout``."""
        key = f"decisions/{deploy_id}"
        return self._wait(lambda: self._kv_value(key) is not None, timeout, 0.01)

    def _coordinator_of(self, deploy_id: str) -> WatcherProc | None:
        status, body = 0, b""
        with contextlib.suppress(OSError):
            status, body = self.cluster.server.request(
                "GET",
                "/v1/kv/"
                + urllib.parse.quote(inv.app_base(self.prefix, APP) + f"coordinator/{deploy_id}"),
                timeout=2.0,
            )
        if status != 200:
            return None
        session = json.loads(body)[0].get("Session")
        if not session:
            return None
        with contextlib.suppress(OSError):
            status, body = self.cluster.server.request("GET", f"/v1/session/info/{session}")
            info = json.loads(body) if status == 200 else None
            if info:
                node = info[0].get("Node")
                return next((w for w in self.watchers if w.name == node), None)
        return None

    def _wait(
        self, cond: Callable[[], bool], timeout: float, interval: float = 0.05
    ) -> float | None:
        """Seconds until ``cond`` held, or None after ``timeout``."""
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(Exception):
                if cond():
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(interval)

    def _members(self) -> set[str]:
        path = (
            "/v1/kv/"
            + urllib.parse.quote(inv.app_base(self.prefix, APP) + "members/")
            + "?recurse=true"
        )
        status, body = self.cluster.server.request("GET", path, timeout=3.0)
        if status != 200:
            return set()
        return {e["Key"].rsplit("/", 1)[-1] for e in json.loads(body) if e.get("Session")}

    # --- faults -------------------------------------------------------------------------

    def _signal(self, w: WatcherProc, sig: signal.Signals) -> None:
        if w.proc is not None and w.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.proc.pid, sig)

    def _fill_disk(self) -> None:
        chunk = b"\0" * (1024 * 1024)
        with contextlib.suppress(OSError), open(self.disk / "filler", "wb") as f:
            while True:
                f.write(chunk)
                f.flush()

    def _inject(
        self,
        plan: Plan,
        deploy_id: str,
        victim: WatcherProc,
        aborter: subprocess.Popen[str] | None = None,
    ) -> str:
        """The timed part of a fault, run beside the deploy; returns what it did."""
        fault = plan.fault
        if fault.startswith("kill_watcher") or fault == "stop_watcher":
            if fault == "kill_watcher_after" and not self._decided(deploy_id, DECISION_WAIT):
                return "no decision to kill after"
            time.sleep(plan.delay)
            if plan.coordinator:
                victim = self._coordinator_of(deploy_id) or victim
            if fault == "stop_watcher":
                self._signal(victim, signal.SIGSTOP)
                self._stopped.add(victim.name)
                time.sleep(plan.hold)
                self._signal(victim, signal.SIGCONT)
                self._stopped.discard(victim.name)
                return f"SIGSTOP {victim.name} {plan.hold:.1f}s"
            victim.kill()
            time.sleep(plan.hold)
            victim.start()
            return f"SIGKILL {victim.name}, back after {plan.hold:.1f}s"
        time.sleep(plan.delay)
        if fault in ("kill_agent", "kill_server"):
            agent = self.cluster.server if fault == "kill_server" else victim.agent
            self.cluster.kill(agent)
            time.sleep(plan.hold)
            self.cluster.start(agent)
            return f"SIGKILL agent {agent.name}, back after {plan.hold:.1f}s"
        if fault == "cut_host":
            self.cluster.cut_off(victim.agent)
            time.sleep(plan.hold)
            self.cluster.reconnect(victim.agent)
            return f"cut {victim.name} off for {plan.hold:.1f}s"
        if fault == "abort_race" and aborter is not None:
            aborter.communicate(deploy_id + "\n", timeout=60)
            verdict = "aborted" if aborter.returncode == 0 else f"refused ({aborter.returncode})"
            return f"abort from {victim.name} after {plan.delay:.2f}s: {verdict}"
        return ""

    def restore(self) -> None:
        """Undo every fault: files, S3 proxy, SIGSTOP, nftables, agents, server, watchers."""
        self.proxy.clear()
        for path in self.ctl.glob("fail-*"):
            path.unlink()
        for path in self.ctl.glob("hang-*"):
            path.unlink()
        (self.disk / "filler").unlink(missing_ok=True)
        for w in self.watchers:
            self._signal(w, signal.SIGCONT)
        self._stopped.clear()
        for agent in self.cluster.agents:
            self.cluster.reconnect(agent, rejoin=False)
        if not self.cluster.server.running:
            self.cluster.start(self.cluster.server)
        for agent in self.cluster.hosts:
            if not agent.running:
                self.cluster.start(agent)
            else:
                # a cut-off agent may still count the server as failed: ask it to join again
                with contextlib.suppress(OSError):
                    agent.request("PUT", f"/v1/agent/join/{self.cluster.server.ip}")
        for w in self.watchers:
            if not w.running():
                w.start()

    # --- one deploy ---------------------------------------------------------------------

    def run_one(self, n: int) -> DeployResult:
        plan = Plan.draw(self.seed, n, len(self.watchers))
        result = DeployResult(n, plan)
        members = {w.name for w in self.watchers}
        if self._wait(lambda: self._members() == members, RESTORE_WAIT) is None:
            result.violations.append(
                inv.Violation(
                    "fleet_not_restored",
                    "",
                    f"member keys {sorted(self._members())} before the deploy",
                )
            )
            return result
        victim = self.watchers[plan.victim]
        starter = self.watchers[plan.starter]
        fault = plan.fault
        # not announced: no prefetch, so the download is part of the deploy (and, for an
        # abort race, the decision comes late enough for the abort to reach it sometimes)
        record = self.publish(announce=fault not in ("s3_error", "s3_corrupt", "abort_race"))
        if fault == "s3_error":
            self.proxy.fail(500, times=plan.times)
        elif fault == "s3_corrupt":
            self.proxy.corrupt(times=plan.times)
        elif fault == "hook_fail":
            (self.ctl / f"fail-{victim.name}").touch()
        elif fault == "hook_hang":
            (self.ctl / f"hang-{victim.name}").touch()
        elif fault == "disk_full":
            self._fill_disk()

        aborter = None
        if fault == "abort_race":
            aborter = subprocess.Popen(
                [sys.executable, "-c", ABORTER, str(victim.config_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=victim.env(),
            )
            time.sleep(1.0)  # let it import watcher.ctl before the deploy starts
        started = time.monotonic()
        notes: list[str] = []
        ctl_results: list[subprocess.CompletedProcess[str]] = []

        def start_deploy(w: WatcherProc, artifact: str) -> None:
            ctl_results.append(w.ctl("deploy", APP, artifact, "--no-wait", check=False))

        starters = [threading.Thread(target=start_deploy, args=(starter, record.id))]
        if fault == "concurrent_deploy":
            rival = self.publish(announce=True)
            other = self.watchers[
                (plan.starter + 1 + plan.victim % (len(self.watchers) - 1)) % len(self.watchers)
            ]
            starters.append(threading.Thread(target=start_deploy, args=(other, rival.id)))
        for t in starters:
            t.start()

        # The deploy id, as soon as `inflight` names it (watcherctl may still be running).
        seen: list[str] = []

        def appeared() -> bool:
            value = self._kv_value("inflight")
            if value:
                seen.append(value.decode())
            return bool(value)

        injector: Future[None] | None = None
        if self._wait(appeared, 30.0, 0.01) is not None:
            deploy_id = seen[-1]
            result.deploy = deploy_id
            if fault in (
                "kill_watcher_before",
                "kill_watcher_during",
                "kill_watcher_after",
                "stop_watcher",
                "kill_agent",
                "kill_server",
                "cut_host",
                "abort_race",
            ):

                def run_injector() -> None:
                    try:
                        notes.append(self._inject(plan, deploy_id, victim, aborter))
                    except (ClusterError, OSError, subprocess.SubprocessError) as exc:
                        notes.append(f"injection failed: {exc}")

                injector = self._injector.submit(run_injector)
            took = self._decided(deploy_id, DECISION_WAIT)
            if took is not None:
                result.to_decision = time.monotonic() - started
        for t in starters:
            t.join(120)
        if injector is not None:
            injector.result(180)
        if aborter is not None and aborter.poll() is None:
            aborter.kill()
            aborter.communicate()
        if fault == "concurrent_deploy":  # overlap itself is checked from KV (two_in_flight)
            notes.append(f"{sum(r.returncode == 0 for r in ctl_results)} of 2 deploys started")
        if result.deploy is None:
            notes.append(
                "not started: "
                + " | ".join((r.stderr or r.stdout).strip()[-200:] for r in ctl_results)
            )

        self.restore()
        result.violations += self._wait_settled(started, result)
        result.violations += self.check()
        if self.status_doubt:
            result.status_in_doubt = self.status_doubt
            notes.append(f"status --fleet exited 1: {self.status_doubt}")
        snap = self.snapshot()
        if result.deploy is not None:
            result.decision = inv.decision_of(snap, result.deploy)
        if result.decision == "abort":  # why, from the outcome: an abort is not always the fault's
            raw = self._kv_value(f"outcomes/{result.deploy}")
            with contextlib.suppress(ValueError, AttributeError):
                notes.append(f"aborted: {str(json.loads(raw or '{}').get('reason', ''))[:160]}")
        result.note = "; ".join(x for x in notes if x)
        return result

    def _wait_settled(
        self, started: float, result: DeployResult | None = None
    ) -> list[inv.Violation]:
        """Wait (bounded) for the deploy to end and every live host to converge."""
        out: list[inv.Violation] = []
        members = {w.name for w in self.watchers}
        if self._wait(lambda: self._members() == members, RESTORE_WAIT) is None:
            out.append(
                inv.Violation("fleet_not_restored", "", f"member keys {sorted(self._members())}")
            )
        if self._wait(lambda: self._kv_value("inflight") is None, END_WAIT, 0.1) is None:
            out.append(
                inv.Violation("deploy_stuck", "", f"inflight still set after {END_WAIT:.0f}s")
            )
            return out

        def converged() -> bool:
            raw = self._kv_value("current")
            fleet = json.loads(raw).get("release") if raw else None
            return all(w.current() == fleet for w in self.watchers)

        if self._wait(converged, CONVERGE_WAIT, 0.1) is not None and result is not None:
            result.to_converged = time.monotonic() - started
        return out

    # --- the check ----------------------------------------------------------------------

    def disks(self) -> list[inv.DiskView]:
        return [inv.DiskView.read(w.name, w.app_dir) for w in self.watchers]

    def status(self, via: WatcherProc | None = None) -> dict[str, Any]:
        w = via or random.choice(self.watchers)
        result = w.ctl("status", "--fleet", check=False)
        # 1 with the fleet printed: it shows something not trusted (a BROKEN `inflight`, a
        # record the acks contradict), which the checks below judge for themselves; what it
        # was is kept, and reported when it stays once the fleet settled.
        self.status_doubt = ""
        if result.returncode in (0, 1):
            try:
                data: dict[str, Any] = json.loads(result.stdout)
            except ValueError:
                pass
            else:
                if result.returncode == 1:
                    self.status_doubt = _doubt_of(data)
                return data
        return {"error": f"status --fleet on {w.name} exited {result.returncode}: {result.stderr}"}

    def check(self, *, status_wait: float = STATUS_WAIT) -> list[inv.Violation]:
        """Every invariant, now: what the monitor saw since the last check, KV, disks, status."""
        snap = self.snapshot()
        for release, deploy in inv.committed_deploys(snap).items():
            self.committed[release] = deploy  # once committed, always committed
        seen, incomplete = self.monitor.take()
        out = incomplete + inv.check_seen(seen, self.committed)
        live = {w.name for w in self.watchers if w.running()}
        disks = self.disks()
        out += inv.check_settled(snap, self.committed, disks, live)
        deadline = time.monotonic() + status_wait
        while True:
            problems = inv.check_status(self.status(), APP, self.disks(), inv.fleet_current(snap))
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        return out + problems

    def run(self, numbers: Iterable[int]) -> Report:
        report = Report(self.seed, len(self.watchers))
        for n in numbers:
            result = self.run_one(n)
            report.results.append(result)
            self.log(
                f"deploy {n}: {result.plan.fault:<20} {result.decision or '-':<6} "
                f"{result.deploy or '-':<24} "
                f"decision {_secs(result.to_decision)} converged {_secs(result.to_converged)}"
                + (f"  [{result.note}]" if result.note else "")
                + "".join(f"\n  VIOLATION {v}" for v in result.violations)
            )
        report.wall = time.monotonic() - report.started
        return report


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


# --- command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="make faults",
        description="Randomized fault deploys on a real cluster, with invariant checks.",
    )
    p.add_argument("--deploys", type=int, default=200, help="deploys to run (default 200)")
    p.add_argument(
        "--seed", type=int, default=None, help="replay a campaign (default: random, printed)"
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="N[,N...]",
        help="run only these deploys of the seed (each with its own plan), e.g. 8 or 4,6,15",
    )
    p.add_argument("--hosts", type=int, default=MIN_HOSTS, help=f"hosts (at least {MIN_HOSTS})")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = p.parse_args(argv)
    if args.deploys < 1:
        p.error(f"--deploys must be at least 1, got {args.deploys}")
    if args.hosts < MIN_HOSTS or args.hosts > 50:
        p.error(f"--hosts must be between {MIN_HOSTS} and 50, got {args.hosts}")
    if args.only is not None:
        try:
            args.only = [int(x) for x in args.only.split(",")]
        except ValueError:
            p.error(f"--only must be deploy numbers separated by commas, got {args.only!r}")
        if not args.only or min(args.only) < 1:
            p.error(f"--only: deploy numbers start at 1, got {args.only}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    consul_bin = os.environ.get("CONSUL_BIN", "")
    if not consul_bin or not os.access(consul_bin, os.X_OK):
        print(
            f"make faults: CONSUL_BIN={consul_bin!r} is not an executable Consul binary",
            file=sys.stderr,
        )
        return 2
    if os.geteuid() != 0:
        print(
            "make faults: needs root (a tmpfs for the full-disk host, nftables cuts)",
            file=sys.stderr,
        )
        return 2
    if shutil.which("nft") is None:
        print(
            "make faults: nft (nftables) is missing; run scripts/install-system-deps",
            file=sys.stderr,
        )
        return 2
    loopback = loopback_from_env("faults")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    numbers = args.only if args.only is not None else list(range(1, args.deploys + 1))
    print(
        f'fault campaign: seed {seed} (replay: make faults FAULTS_ARGS="--seed {seed}"), '
        f"{len(numbers)} deploys on {args.hosts} hosts",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="faults-"))
    s3 = S3Server(workdir / "moto.log")
    cluster: ConsulCluster | None = None
    campaign: Campaign | None = None
    try:
        s3.start()
        cluster = start_cluster(
            ClusterSpec(hosts=args.hosts), workdir / "consul", consul_bin, loopback
        )
        campaign = Campaign(
            cluster, s3.endpoint_url, workdir / "fleet", seed, log=lambda s: print(s, flush=True)
        )
        campaign.start()
        report = campaign.run(numbers)
    finally:
        if campaign is not None:
            campaign.close()
        if cluster is not None:
            cluster.stop_all()
        s3.stop()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.render())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.summary(), indent=2) + "\n")
    return 1 if report.violations else 0


if __name__ == "__main__":
    stop_on_signals()
    sys.exit(main())
