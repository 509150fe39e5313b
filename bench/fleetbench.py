"""A fleet to measure: real Consul agents, real `watcher run` daemons, and the naive peer.

The daemons are started exactly as the tests start them (``tests/support/fleet.py``: the
installed `watcher` entry point, a YAML config, JSON logs), each with its /metrics on a
free loopback port so its Consul request counter can be read. Several daemons may share
one Consul agent (the scale figures): each then has its own node name.

The naive peer, per host: ``consul watch -type=event`` on that host's agent with a small
shell handler that points ``current`` at the release named in the newest event (no
barrier, no staging, no verification) and writes down when it did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.harness import RoundFailed, cpu_seconds, flip_times, thread_cpu_ns
from tests.support.cluster import Agent, ConsulCluster
from tests.support.fleet import (
    Fleet,
    WatcherProc,
    consul_for,
    consul_requests,
    metrics_text,
    wait_for,
)
from tests.support.procs import die_with_parent
from watcher.records import ArtifactRecord, parse_iso

NAIVE_EVENT = "bench-naive-deploy"  # not a name the watchers act on
NAIVE_HANDLER = r"""#!/bin/sh
# The naive peer's handler: consul watch gives it the agent's event list on stdin.
dir="$1"
rel=$(tr ',' '\n' | grep '"Payload"' | tail -n 1 | cut -d'"' -f4 | base64 -d 2>/dev/null)
[ -n "$rel" ] || exit 0
[ "$(readlink "$dir/current")" = "releases/$rel" ] && exit 0
ln -sfn "releases/$rel" "$dir/current"
date +%s.%N > "$dir/flipped-$rel"
"""


@dataclass(frozen=True)
class Usage:
    """A watcher's CPU seconds just before and just after reading its /metrics (the read
    costs the daemon CPU too, which no window should count), and its Consul requests."""

    cpu_before_read: float
    cpu_after_read: float
    requests: float
    ns_before_read: int = 0  # the same from its threads' schedstat, in nanoseconds
    ns_after_read: int = 0
    renewals: float = 0  # of ``requests``, its session renewals (every TTL/2, deploy or not)


def cpu_between(start: Usage, end: Usage) -> float:
    """CPU seconds the watcher spent between two readings, the readings themselves out."""
    return end.cpu_before_read - start.cpu_after_read


def ns_between(start: Usage, end: Usage) -> float:
    """``cpu_between`` from the threads' schedstat: in seconds, to the nanosecond."""
    return (end.ns_before_read - start.ns_after_read) / 1e9


@dataclass
class SharedAgentWatcher(WatcherProc):
    """A watcher whose node name is its own, on an agent other watchers use too."""

    node: str = ""

    @property
    def name(self) -> str:
        return self.node


class BenchFleet:
    """``per_agent`` watchers on each client agent of ``cluster``, metrics on."""

    def __init__(self, cluster: ConsulCluster, fleet: Fleet, per_agent: int = 1) -> None:
        self.cluster = cluster
        self.fleet = fleet
        watchers: list[WatcherProc] = []
        for agent in cluster.hosts:
            for k in range(per_agent):
                node = agent.name if per_agent == 1 else f"{agent.name}-w{k}"
                root = fleet.workdir / node
                root.mkdir(parents=True, exist_ok=True)
                w = SharedAgentWatcher(
                    agent, root, root / "watcher.yaml", root / "watcher.log", fleet.app, node=node
                )
                fleet.write_config(w)
                watchers.append(w)
        fleet.watchers = watchers
        self.ports: dict[str, int] = {}

    @property
    def watchers(self) -> list[WatcherProc]:
        return self.fleet.watchers

    def start(self) -> None:
        for w in self.watchers:
            w.start()
        self.fleet.wait_members(len(self.watchers), timeout=60 + 2 * len(self.watchers))
        for w in self.watchers:
            self.wait_port(w)

    def stop(self) -> None:
        self.fleet.stop()

    def wait_port(self, w: WatcherProc) -> int:
        wait_for(lambda: self._port(w) is not None, 30, f"{w.name} /metrics port")
        return self.ports[w.name]

    def _port(self, w: WatcherProc) -> int | None:
        if w.name not in self.ports:
            for event in w.log_events():
                if event.get("event") == "health_listening":
                    self.ports[w.name] = int(event["port"])
        return self.ports.get(w.name)

    def requests(self, w: WatcherProc) -> dict[str, float]:
        """The watcher's Consul requests so far, by kind, from its /metrics."""
        port = self._port(w)
        assert port is not None
        return consul_requests(metrics_text(port))

    def usage(self) -> dict[str, Usage]:
        """Per watcher: its CPU seconds and Consul requests so far."""
        out = {}
        for w in self.watchers:
            assert w.proc is not None
            cpu_before, ns_before = cpu_seconds(w.proc.pid), thread_cpu_ns(w.proc.pid)
            requests = self.requests(w)
            out[w.name] = Usage(
                cpu_before,
                cpu_seconds(w.proc.pid),
                sum(requests.values()),
                ns_before,
                thread_cpu_ns(w.proc.pid),
                requests.get("session_renew", 0),
            )
        return out

    def publish_prefetched(self, version: str) -> ArtifactRecord:
        """A new artifact, announced, and prefetched (extracted) on every host."""
        record = self.fleet.publish(version, announce=True)
        name = f"{record.id}-{record.sha256[:12]}"
        dirs = [w.app_dir / "prefetched" / name for w in self.watchers]
        wait_for(lambda: all(p.is_dir() for p in dirs), 60 + len(dirs), "prefetch", self.fleet)
        return record

    def deploy(self, record: ArtifactRecord) -> tuple[float, dict[str, object]]:
        """`watcherctl deploy` from the first host; (epoch when it was started, its result)."""
        w0 = self.watchers[0]
        started = time.time()
        result = w0.ctl("deploy", "web", record.id, timeout=300.0, check=False)
        try:
            data = json.loads(result.stdout)
        except ValueError:
            raise RoundFailed(
                f"watcherctl deploy exited {result.returncode}: {result.stderr.strip()[-300:]}"
            ) from None
        if data.get("result") != "committed":
            raise RoundFailed(f"deploy did not commit: {json.dumps(data)[:300]}")
        return started, data

    def deploy_flips(self, record: ArtifactRecord) -> tuple[float, list[float], dict[str, object]]:
        """Deploy ``record``; (start, seconds to each host's flip, result), checked on disk."""
        started, data = self.deploy(record)
        hosts = data.get("hosts") or {}
        assert isinstance(hosts, dict)
        flipped = {}
        for name, h in hosts.items():
            at = h.get("flipped_at") if isinstance(h, dict) else None
            flipped[name] = parse_iso(at).timestamp() if at else None
        release = str(data.get("release", ""))
        names = [w.name for w in self.watchers]
        currents = {w.name: w.current() for w in self.watchers}
        return started, flip_times(release, names, currents, flipped, started), data


def kv_fanout(agents: list[Agent], key: str) -> list[float]:
    """Seconds for one KV write (on the first agent) to reach a blocking query on each."""
    clients = [consul_for(a) for a in agents]
    first = clients[0]
    first.kv_put(key, b"0")
    indexes = [c.kv_get_blocking(key, 0, wait=1)[0] for c in clients]
    seen: dict[int, float] = {}
    lock = threading.Lock()

    def watch(i: int) -> None:
        index = indexes[i]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            index, entry = clients[i].kv_get_blocking(key, index, wait=10)
            if entry is not None and entry.value == b"1":
                with lock:
                    seen[i] = time.time()
                return

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(len(clients))]
    for t in threads:
        t.start()
    time.sleep(0.5)  # every watch is blocked in its query
    started = time.time()
    first.kv_put(key, b"1")
    for t in threads:
        t.join(25)
    for c in clients:
        c.close()
    if len(seen) != len(clients):
        missing = sorted(set(range(len(clients))) - set(seen))
        raise RoundFailed(f"KV write not seen by {len(missing)} of {len(clients)} agents")
    return [seen[i] - started for i in range(len(clients))]


class NaivePeers:
    """One `consul watch -type=event` + shell handler per agent, each with its own dir."""

    def __init__(self, consul_bin: str, agents: list[Agent], workdir: Path) -> None:
        self.consul_bin = consul_bin
        self.agents = agents
        self.workdir = workdir
        self.handler = workdir / "naive-handler.sh"
        self.procs: list[subprocess.Popen[bytes]] = []

    def dir_of(self, agent: Agent) -> Path:
        return self.workdir / agent.name

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.handler.write_text(NAIVE_HANDLER)
        self.handler.chmod(0o755)
        for agent in self.agents:
            d = self.dir_of(agent)
            (d / "releases").mkdir(parents=True, exist_ok=True)
            env = {**os.environ, **agent.env()}
            with open(d / "watch.log", "ab") as log:
                self.procs.append(
                    subprocess.Popen(
                        [
                            self.consul_bin,
                            "watch",
                            "-type=event",
                            f"-name={NAIVE_EVENT}",
                            f"-http-addr={agent.http_addr}",
                            str(self.handler),
                            str(d),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                        preexec_fn=die_with_parent,
                    )
                )
        time.sleep(1.0)  # each watch made its first (non-blocking) query and now blocks

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        self.procs = []

    def cpu(self) -> list[float]:
        """CPU seconds of each watch process with its (reaped) handler runs."""
        return [cpu_seconds(p.pid, children=True) for p in self.procs]

    def round(self, release: str, timeout: float = 30.0) -> list[float]:
        """Fire one event naming ``release``; seconds to each peer's flip, checked on disk."""
        for agent in self.agents:
            (self.dir_of(agent) / "releases" / release).mkdir(exist_ok=True)
        env = {**os.environ, **self.agents[0].env()}
        started = time.time()
        subprocess.run(
            [self.consul_bin, "event", f"-name={NAIVE_EVENT}", release],
            check=True,
            capture_output=True,
            env=env,
        )
        names = [a.name for a in self.agents]
        deadline = time.monotonic() + timeout

        def flip_time(agent: Agent) -> float | None:
            try:
                return float((self.dir_of(agent) / f"flipped-{release}").read_text())
            except (OSError, ValueError):
                return None

        while time.monotonic() < deadline:
            if all(flip_time(a) is not None for a in self.agents):
                break
            time.sleep(0.02)
        currents: dict[str, str | None] = {}
        for a in self.agents:
            try:
                currents[a.name] = (self.dir_of(a) / "current").readlink().name
            except OSError:
                currents[a.name] = None
        return flip_times(
            release, names, currents, {a.name: flip_time(a) for a in self.agents}, started
        )


@contextmanager
def running(*things: BenchFleet | NaivePeers) -> Iterator[None]:
    started: list[BenchFleet | NaivePeers] = []
    try:
        for t in things:
            started.append(t)
            t.start()
        yield
    finally:
        for t in reversed(started):
            t.stop()
