"""A fleet of real `watcher run` processes, one per Consul client agent of the test cluster."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import Agent, ConsulCluster
from tests.support.procs import die_with_parent
from tests.support.s3server import s3_client
from watcher.config import ConsulSettings, S3Settings
from watcher.consul_api import ConsulClient
from watcher.records import ArtifactRecord, Keys, iso, utcnow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
SESSION_TTL = 3.0  # seconds: a dead watcher's member key goes after ~2x this


def consul_requests(text: str) -> dict[str, float]:
    """A daemon's ``watcher_consul_requests_total`` by kind, from its /metrics text."""
    return {
        s.labels["kind"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "watcher_consul_requests_total"
    }


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def consul_for(agent: Agent) -> ConsulClient:
    return ConsulClient(agent.consul_settings())


def make_tarball(files: dict[str, str | bytes], *, executable: tuple[str, ...] = ()) -> bytes:
    """A gzip tarball of ``files`` (name -> content); names in ``executable`` get 0755."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in sorted(files.items()):
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name in executable else 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class WatcherProc:
    """One `watcher run` process standing for one host."""

    agent: Agent
    root: Path
    config_path: Path
    log_path: Path
    app: str
    proc: subprocess.Popen[bytes] | None = None
    # run the daemon through this command (e.g. setpriv with fewer capabilities)
    prefix: tuple[str, ...] = ()
    # where the log stood when the running process was started: what follows is its own
    log_start: int = 0

    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def app_dir(self) -> Path:
        return self.root / "srv" / self.app

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in (
            "CONSUL_HTTP_ADDR",
            "CONSUL_HTTP_TOKEN",
            "CONSUL_HTTP_TOKEN_FILE",
            "CONSUL_CACERT",
            "WATCHER_CONFIG",
        ):
            env.pop(var, None)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT dumps every thread's stack into the log
        # The checkout these tests are in, not whichever one the virtualenv's editable
        # install points at: run from a git worktree, the daemons ran the other code.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.log_start = log.seek(0, os.SEEK_END)
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    str(BIN / "watcher"),
                    *("--log-format", "json", "run", "-c", str(self.config_path)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def current(self) -> str | None:
        try:
            return (self.app_dir / "current").readlink().name
        except OSError:
            return None

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 120.0, as_json: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "watcherctl"), *args, "-c", str(self.config_path)]
        if as_json:
            argv.append("--json")
        result = subprocess.run(
            argv, capture_output=True, text=True, env=self.env(), timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"watcherctl {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args).stdout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(
        self, event: str | None = None, *, this_start: bool = False
    ) -> list[dict[str, Any]]:
        """The JSON lines of its log, in order; only those of ``event`` when given, only
        those the process started last wrote with ``this_start``."""
        text = self.log_text()
        if this_start:
            try:
                with open(self.log_path, "rb") as log:
                    log.seek(self.log_start)
                    text = log.read().decode(errors="replace")
            except FileNotFoundError:
                text = ""
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out if event is None else [e for e in out if e.get("event") == event]

    def health_port(self, timeout: float = 30.0) -> int:
        """The port of /health and /metrics of the newest start, from its log: a daemon
        configured with ``listen: 127.0.0.1:0`` binds a free one itself (a port a test
        picked and closed first can be taken meanwhile by any outgoing connection). Only
        what the running process logged counts: right after a restart the log still ends
        with the previous process's port, closed now or taken by anything else, so this
        waits for the new process to say its own."""
        deadline = time.monotonic() + timeout
        while True:
            ports = [int(e["port"]) for e in self.log_events("health_listening", this_start=True)]
            if ports:
                return ports[-1]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no health_listening in its log\n{self.log_text()[-2000:]}"
                )
            time.sleep(0.05)


@dataclass
class Fleet:
    """N watchers on the cluster's client agents, sharing one S3 bucket and KV prefix."""

    cluster: ConsulCluster
    s3: S3Settings
    workdir: Path
    app: str = "web"
    kv_prefix: str = "watcher"
    app_extra: dict[str, Any] = field(default_factory=dict)
    daemon_extra: dict[str, Any] = field(default_factory=dict)
    watchers: list[WatcherProc] = field(default_factory=list)
    # node name -> the ACL token that host's watcher uses (default: the management token)
    consul_tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for agent in self.cluster.hosts:
            root = self.workdir / agent.name
            root.mkdir(parents=True, exist_ok=True)
            config_path = root / "watcher.yaml"
            w = WatcherProc(agent, root, config_path, root / "watcher.log", self.app)
            self.write_config(w)
            self.watchers.append(w)
        self.kv = consul_for(self.cluster.hosts[0])
        self.keys = Keys(self.kv_prefix, self.app)

    def config_for(self, w: WatcherProc, app_extra: dict[str, Any] | None = None) -> dict[str, Any]:
        settings: ConsulSettings = w.agent.consul_settings()
        consul: dict[str, Any] = {"address": f"{settings.scheme}://{settings.address}"}
        token = self.consul_tokens.get(w.name, settings.token)
        if token:
            consul["token"] = token
        if settings.ca_file:
            consul["ca_file"] = settings.ca_file
        app = {
            "root": str(w.root / "srv"),
            "keep_releases": 3,
            "prefetch": "extract",
            "timeouts": {"prepare": "60s", "apply": "60s", "hook": "20s"},
        }
        app.update(self.app_extra)
        app.update(app_extra or {})
        daemon = {
            "state_dir": str(w.state_dir),
            "session_ttl": f"{SESSION_TTL}s",
            "listen": None,
            "undecided_after": "3s",
        }
        daemon.update(self.daemon_extra)
        return {
            "node": w.name,
            "kv_prefix": self.kv_prefix,
            "consul": consul,
            "s3": {
                "bucket": self.s3.bucket,
                "prefix": self.s3.prefix,
                "region": self.s3.region,
                "endpoint_url": self.s3.endpoint_url,
            },
            "daemon": daemon,
            "apps": {self.app: app},
        }

    def write_config(self, w: WatcherProc, app_extra: dict[str, Any] | None = None) -> None:
        w.config_path.write_text(yaml.safe_dump(self.config_for(w, app_extra)))
        w.config_path.chmod(0o600)  # it may hold the host's token, as a real one does

    def give_hook(self, w: WatcherProc, phase: str, seconds: float, exit_code: int = 0) -> None:
        """Give ``w`` a ``phase`` hook that sleeps, then exits with ``exit_code``, and
        restart it (the caller waits for the members)."""
        self.restart_with_hook(w, phase, f"sleep {seconds}\nexit {exit_code}\n")

    def give_gated_hook(self, w: WatcherProc, phase: str, gate: Path, exit_code: int = 0) -> None:
        """Give ``w`` a ``phase`` hook that waits until ``gate`` exists, then exits with
        ``exit_code``, and restart it (the caller waits for the members). A test that needs
        the hosts in that phase while it runs `watcherctl` opens the gate when done, instead
        of counting on a hook's fixed sleep outlasting those runs on a loaded runner. An
        abort stops the hook without the gate (the watcher cancels a running hook). The
        hook touches ``<gate>.started`` first: the host is in that phase from then on."""
        self.restart_with_hook(
            w,
            phase,
            f'touch "{gate}.started"\n'
            f'while [ ! -e "{gate}" ]; do sleep 0.05; done\nexit {exit_code}\n',
        )

    def restart_with_hook(self, w: WatcherProc, phase: str, body: str) -> None:
        """Give ``w`` a ``phase`` hook of ``body`` (a /bin/sh script) and restart it (the
        caller waits for the members)."""
        hook = w.root / f"{phase}-hook"
        hook.write_text(f"#!/bin/sh\n{body}")
        hook.chmod(0o755)
        self.write_config(w, {"hooks": {phase: str(hook)}})
        w.stop()
        w.start()

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        for w in self.watchers:
            if not w.running():
                w.start()
        self.wait_members(len(self.watchers))

    def stop(self) -> None:
        for w in self.watchers:
            w.stop()

    def members(self) -> set[str]:
        return {
            e.key.rsplit("/", 1)[-1] for e in self.kv.kv_list(self.keys.members_prefix) if e.session
        }

    def wait_members(self, count: int, timeout: float = 30.0) -> None:
        wait_for(
            lambda: len(self.members()) == count,
            timeout,
            f"{count} member keys (have {sorted(self.members())})",
            self,
        )

    # --- artifacts ----------------------------------------------------------------------

    def publish(
        self,
        version: str,
        *,
        files: dict[str, str | bytes] | None = None,
        executable: tuple[str, ...] = (),
        announce: bool = False,
        corrupt_for: bool = False,
    ) -> ArtifactRecord:
        """Upload a tarball of a tiny app and write its artifact record to KV."""
        commit = hashlib.sha256(version.encode()).hexdigest()[:40]
        artifact_id = f"main-{commit[:8]}"
        body = make_tarball(
            files or {"index.html": f"<h1>{version}</h1>\n", "VERSION": version + "\n"},
            executable=executable,
        )
        key = f"{self.s3.prefix}/{self.app}/{artifact_id}.tar.gz"
        s3_client(str(self.s3.endpoint_url)).put_object(Bucket=self.s3.bucket, Key=key, Body=body)
        record = ArtifactRecord(
            id=artifact_id,
            url=f"s3://{self.s3.bucket}/{key}",
            sha256=hashlib.sha256(body).hexdigest(),
            size=len(body),
            branch="main",
            commit=commit,
            build_number="1",
            build_url="",
            created_at=iso(utcnow()),
            created_by="tests",
        )
        self.kv.kv_put(self.keys.artifact(artifact_id), record.to_json())
        if announce:
            self.kv.event_fire(
                "build-finished", json.dumps({"app": self.app, "artifact": artifact_id}).encode()
            )
        return record

    # --- reading state ------------------------------------------------------------------

    def ack_states(self, deploy_id: str) -> dict[str, str]:
        """Each watcher's ack state in ``deploy_id`` ("" before its first ack)."""
        out = {}
        for w in self.watchers:
            e = self.kv.kv_get(self.keys.progress(deploy_id, w.name))
            out[w.name] = json.loads(e.value)["state"] if e and e.value else ""
        return out

    def currents(self) -> dict[str, str | None]:
        return {w.name: w.current() for w in self.watchers}

    def inflight(self) -> str | None:
        entry = self.kv.kv_get(self.keys.inflight)
        return entry.value.decode(errors="replace") if entry and entry.value else None

    def outcome(self, deploy_id: str) -> dict[str, Any] | None:
        entry = self.kv.kv_get(self.keys.outcome(deploy_id))
        return json.loads(entry.value) if entry and entry.value else None

    def decision(self, deploy_id: str) -> dict[str, Any] | None:
        entry = self.kv.kv_get(self.keys.decision(deploy_id))
        return json.loads(entry.value) if entry and entry.value else None

    def wait_outcome(self, deploy_id: str, timeout: float = 60.0) -> dict[str, Any]:
        wait_for(
            lambda: self.outcome(deploy_id) is not None,
            timeout,
            f"outcome of deploy {deploy_id}",
            self,
        )
        result = self.outcome(deploy_id)
        assert result is not None
        return result

    def wait_idle(self, timeout: float = 60.0) -> None:
        wait_for(lambda: self.inflight() is None, timeout, "no deploy in flight", self)

    def wait_dropped(
        self, watchers: list[WatcherProc], release: str, timeout: float = 10.0
    ) -> None:
        """Each of ``watchers`` drops an aborted deploy's staged ``release`` after its
        post_abort hook, which runs once its own ``aborted`` intent is written: a moment
        after the deploy may have ended (``wait_idle``). Wait for that, bounded."""
        wait_for(
            lambda: not any((w.app_dir / "releases" / release).exists() for w in watchers),
            timeout,
            f"{release} dropped on {', '.join(w.name for w in watchers)}",
            self,
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {w.name} ---\n" + "\n".join(w.log_text().splitlines()[-60:])
            for w in self.watchers
        )


def wait_for(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    fleet: Fleet | None = None,
    interval: float = 0.05,
) -> float:
    """Poll ``cond`` until true; returns the seconds it took, or fails naming ``what``."""
    start = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            detail = f"\n{fleet.logs()}" if fleet is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)
