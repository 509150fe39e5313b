"""A real Consul cluster for tests: one server and N client agents, each on its own loopback IP."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.procs import die_with_parent
from watcher.config import ConsulSettings

DATACENTER = "dc1"
SERVER_NAME = "consul-server"
HTTP_PORT = 8500
HTTPS_PORT = 8501
SERF_LAN_PORT = 8301
SERVER_RPC_PORT = 8300
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
NFT_TABLE_PREFIX = "rwtest_"

# Member status codes of /v1/agent/members (serf.MemberStatus).
_MEMBER_STATUS = {0: "none", 1: "alive", 2: "leaving", 3: "left", 4: "failed"}

# Every agent process any cluster started, so that nothing outlives the test session.
_LIVE: set[subprocess.Popen[bytes]] = set()
_CUT: set[str] = set()  # nftables tables still in place
_LIVE_LOCK = threading.Lock()


class ClusterError(RuntimeError):
    """The test cluster could not be started or did not reach the expected state."""


LOOPBACK_RE = re.compile(r"^127\.\d{1,3}\.\d{1,3}$")

# Each runner's own default base, so that `make test`, `make demo`, `make bench` and
# `make faults` can run side by side, and none takes 127.0.0.1:8500, where Consul's
# default address (and a developer's own agent) is.
DEFAULT_LOOPBACK = {"test": "127.0.20", "bench": "127.0.40", "faults": "127.0.50"}


def loopback_from_env(runner: str) -> str:
    """For a runner's main (bench, faults): $WATCHER_TEST_LOOPBACK (the first three octets
    of the cluster's addresses) or the runner's default; a value not of the form 127.N.N
    is refused on stderr with exit status 2, before anything starts."""
    base = os.environ.get("WATCHER_TEST_LOOPBACK", DEFAULT_LOOPBACK[runner])
    if not LOOPBACK_RE.fullmatch(base) or any(int(o) > 255 for o in base.split(".")):
        print(
            f"make {runner}: WATCHER_TEST_LOOPBACK must look like "
            f'"{DEFAULT_LOOPBACK[runner]}" (127.N.N), got "{base}"',
            file=sys.stderr,
        )
        raise SystemExit(2)
    return base


@dataclass(frozen=True)
class ClusterSpec:
    """What a test module needs: ``CLUSTER = ClusterSpec(hosts=5, acl=True)``."""

    hosts: int = 3
    acl: bool = False
    tls: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.hosts <= 100:
            raise ValueError(f"ClusterSpec.hosts must be between 1 and 100, got {self.hosts}")


@dataclass(eq=False)
class Agent:
    """One Consul agent: the server or a client agent standing in for one host."""

    name: str
    ip: str
    is_server: bool
    config_file: Path
    data_dir: Path
    log_path: Path
    tls: bool = False
    management_token: str | None = None
    ca_file: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return HTTPS_PORT if self.tls else HTTP_PORT

    @property
    def http_addr(self) -> str:
        """The CONSUL_HTTP_ADDR of this agent: ``ip:8500`` or ``https://ip:8501``."""
        return f"https://{self.ip}:{HTTPS_PORT}" if self.tls else f"{self.ip}:{HTTP_PORT}"

    @property
    def base_url(self) -> str:
        """``http://ip:8500`` or ``https://ip:8501``, for plain HTTP clients."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.ip}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """CONSUL_* variables for talking to this agent with the management token."""
        env = {"CONSUL_HTTP_ADDR": self.http_addr}
        if self.management_token:
            env["CONSUL_HTTP_TOKEN"] = self.management_token
        if self.ca_file:
            env["CONSUL_CACERT"] = self.ca_file
        return env

    def consul_settings(self) -> ConsulSettings:
        """Settings for watcher's Consul client pointed at this agent (management token)."""
        return ConsulSettings(
            address=f"{self.ip}:{self.port}",
            scheme="https" if self.tls else "http",
            token=self.management_token,
            ca_file=self.ca_file,
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        token: str | None = None,
        timeout: float = 5.0,
    ) -> tuple[int, bytes]:
        """A raw HTTP request to this agent (management token unless ``token`` is given)."""
        return _http(
            method,
            self.base_url + path,
            body,
            token=token if token is not None else self.management_token,
            ca_file=self.ca_file,
            timeout=timeout,
        )


def _http(
    method: str,
    url: str,
    body: bytes | None = None,
    *,
    token: str | None = None,
    ca_file: str | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)  # noqa: S310 (http/https only)
    if token:
        req.add_header("X-Consul-Token", token)
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _json(agent: Agent, path: str) -> Any:
    """GET ``path`` from ``agent``; None when it is not reachable or refuses."""
    try:
        status, body = agent.request("GET", path, timeout=3.0)
    except (OSError, ValueError):
        return None
    if status != 200:
        return None
    return json.loads(body)


def _kill_everything() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
        tables = list(_CUT)
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    for table in tables:
        _nft_delete_table(table)


atexit.register(_kill_everything)


def _nft(script: str) -> None:
    result = subprocess.run(
        ["nft", "-f", "-"], input=script.encode(), capture_output=True, check=False
    )
    if result.returncode != 0:
        raise ClusterError(
            f"nft failed ({result.returncode}): {result.stderr.decode(errors='replace').strip()}"
            f" (needs root and nftables: run scripts/install-system-deps)"
        )


def _nft_delete_table(table: str) -> None:
    if shutil.which("nft") is None:
        return
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
    with _LIVE_LOCK:
        _CUT.discard(table)


def _table_for(ip: str) -> str:
    return NFT_TABLE_PREFIX + ip.replace(".", "_")


def _port_in_use(ip: str, port: int) -> bool:
    """True when something listens there (SO_REUSEADDR: TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError:
            return True
    return False


def make_ca(consul_bin: str, directory: Path) -> tuple[Path, Path]:
    """Create a CA with ``consul tls ca create`` in ``directory``; returns (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    _run([consul_bin, "tls", "ca", "create", "-domain=consul"], cwd=directory)
    return directory / "consul-agent-ca.pem", directory / "consul-agent-ca-key.pem"


def _run(argv: list[str], cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, check=False, timeout=60)
    if result.returncode != 0:
        out = (result.stdout + result.stderr).decode(errors="replace").strip()
        raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}): {out}")


class ConsulCluster:
    """A running cluster; fault helpers act on one agent and wait for the effect they cause."""

    def __init__(
        self,
        spec: ClusterSpec,
        workdir: Path,
        consul_bin: str,
        loopback_base: str,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.consul_bin = consul_bin
        self.loopback_base = loopback_base
        self.management_token: str | None = str(uuid.uuid4()) if spec.acl else None
        self.ca_file: str | None = None
        self.server = self._agent(SERVER_NAME, 1, is_server=True)
        self.hosts = [
            self._agent(f"host-{i}", i + 1, is_server=False) for i in range(1, spec.hosts + 1)
        ]
        self.started_in: float | None = None

    @property
    def agents(self) -> list[Agent]:
        return [self.server, *self.hosts]

    def host(self, name: str) -> Agent:
        for agent in self.agents:
            if agent.name == name:
                return agent
        raise KeyError(name)

    def _agent(self, name: str, octet: int, *, is_server: bool) -> Agent:
        base = self.workdir / name
        return Agent(
            name=name,
            ip=f"{self.loopback_base}.{octet}",
            is_server=is_server,
            config_file=base / "config.json",
            data_dir=base / "data",
            log_path=base / "agent.log",
            tls=self.spec.tls,
            management_token=self.management_token,
        )

    # -- set-up -----------------------------------------------------------------------------

    def _prepare(self) -> None:
        for agent in self.agents:
            _nft_delete_table(_table_for(agent.ip))
            for port in (SERF_LAN_PORT, agent.port):
                if _port_in_use(agent.ip, port):
                    raise ClusterError(
                        f"{agent.ip}:{port} is already in use (a leftover consul agent, or "
                        f"another test run on the same WATCHER_TEST_LOOPBACK base?)"
                    )
            agent.data_dir.mkdir(parents=True, exist_ok=True)
        if self.spec.tls:
            self._make_certificates()
        for agent in self.agents:
            tmp = agent.config_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._config(agent), indent=2), encoding="utf-8")
            tmp.rename(agent.config_file)

    def _make_certificates(self) -> None:
        ca_dir = self.workdir / "tls"
        ca_cert, ca_key = make_ca(self.consul_bin, ca_dir)
        self.ca_file = str(ca_cert)
        procs = []
        for agent in self.agents:
            agent.ca_file = self.ca_file
            cert_dir = agent.config_file.parent / "tls"
            cert_dir.mkdir(parents=True, exist_ok=True)
            kind = "-server" if agent.is_server else "-client"
            argv = [
                self.consul_bin,
                "tls",
                "cert",
                "create",
                kind,
                f"-dc={DATACENTER}",
                f"-ca={ca_cert}",
                f"-key={ca_key}",
                f"-additional-ipaddress={agent.ip}",
                f"-additional-dnsname={agent.name}",
            ]
            procs.append(
                (
                    argv,
                    subprocess.Popen(
                        argv, cwd=cert_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                    ),
                )
            )
        for argv, proc in procs:
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise ClusterError(f"{' '.join(argv)} failed: {out.decode(errors='replace')}")

    def _cert_files(self, agent: Agent) -> tuple[str, str]:
        kind = "server" if agent.is_server else "client"
        cert_dir = agent.config_file.parent / "tls"
        return (
            str(cert_dir / f"{DATACENTER}-{kind}-consul-0.pem"),
            str(cert_dir / f"{DATACENTER}-{kind}-consul-0-key.pem"),
        )

    def _config(self, agent: Agent) -> dict[str, Any]:
        tls = self.spec.tls
        ports: dict[str, int] = {
            "dns": -1,
            "grpc": -1,
            "grpc_tls": -1,
            "serf_wan": -1,
            "http": -1 if tls else HTTP_PORT,
            "https": HTTPS_PORT if tls else -1,
        }
        config: dict[str, Any] = {
            "node_name": agent.name,
            "datacenter": DATACENTER,
            "data_dir": str(agent.data_dir),
            "bind_addr": agent.ip,
            "client_addr": agent.ip,
            "advertise_addr": agent.ip,
            "ports": ports,
            "server": agent.is_server,
            "log_level": "DEBUG",
            "disable_update_check": True,
            "disable_host_node_id": True,
            "leave_on_terminate": False,
            "skip_leave_on_interrupt": True,
            "session_ttl_min": "1s",
            "enable_script_checks": False,
            "performance": {"raft_multiplier": 1},
            "telemetry": {"disable_hostname": True},
        }
        if agent.is_server:
            config["bootstrap_expect"] = 1
            config["ui_config"] = {"enabled": False}
            config["connect"] = {"enabled": False}
        else:
            config["retry_join"] = [self.server.ip]
            config["retry_interval"] = "200ms"
        if self.spec.acl:
            # Tests use the initial management token for everything, including as every
            # agent's own token (anti-entropy, joins); a least-privilege agent policy would
            # need a bootstrap round-trip per cluster start and buys the tests nothing.
            tokens: dict[str, str] = {"agent": self.management_token or ""}
            if agent.is_server:
                tokens["initial_management"] = self.management_token or ""
            config["acl"] = {
                "enabled": True,
                "default_policy": "deny",
                "down_policy": "extend-cache",
                "enable_token_persistence": True,
                "tokens": tokens,
            }
        if tls:
            cert, key = self._cert_files(agent)
            config["tls"] = {
                "defaults": {
                    "ca_file": self.ca_file,
                    "cert_file": cert,
                    "key_file": key,
                    "verify_incoming": False,
                    "verify_outgoing": True,
                },
                "internal_rpc": {"verify_server_hostname": True},
                "https": {"verify_incoming": False},
            }
        return config

    def _spawn(self, agent: Agent) -> None:
        if agent.proc is not None and agent.proc.poll() is None:
            raise ClusterError(f"{agent.name}: already running (pid {agent.proc.pid})")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        with open(agent.log_path, "ab") as log:
            log.write(f"\n==== starting {agent.name} at {time.strftime('%X')} ====\n".encode())
            log.flush()
            agent.proc = subprocess.Popen(
                [self.consul_bin, "agent", f"-config-file={agent.config_file}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        with _LIVE_LOCK:
            _LIVE.add(agent.proc)

    def start_all(self) -> None:
        t0 = time.monotonic()
        self._prepare()
        for agent in self.agents:
            self._spawn(agent)
        deadline = time.monotonic() + START_TIMEOUT
        self._wait(lambda: self._leader() != "", "a leader", deadline)
        self._wait_all_ready(self.agents, deadline)
        self.started_in = time.monotonic() - t0

    # -- state ------------------------------------------------------------------------------

    def _leader(self) -> str:
        leader = _json(self.server, "/v1/status/leader")
        return leader if isinstance(leader, str) else ""

    def member_status(self, agent: Agent) -> str:
        """The agent's status as the server's gossip sees it ("alive", "failed", ...)."""
        members = _json(self.server, "/v1/agent/members") or []
        for member in members:
            if member.get("Name") == agent.name:
                return _MEMBER_STATUS.get(int(member.get("Status", 0)), "none")
        return "none"

    def _ready(self, agents: Iterable[Agent]) -> bool:
        """Alive in gossip, registered with a passing serfHealth, and answering HTTP."""
        names = {agent.name for agent in agents}
        members = _json(self.server, "/v1/agent/members")
        if not members:
            return False
        alive = {m["Name"] for m in members if int(m.get("Status", 0)) == 1}
        if not names <= alive:
            return False
        checks = _json(self.server, "/v1/health/state/passing")
        if checks is None:
            return False
        healthy = {c["Node"] for c in checks if c.get("CheckID") == "serfHealth"}
        if not names <= healthy:
            return False
        for agent in self.agents:
            # The agent's own HTTP API answers and it reaches the servers through RPC.
            if agent.name in names and not _json(agent, "/v1/status/leader"):
                return False
        return True

    def _wait_all_ready(self, agents: list[Agent], deadline: float) -> None:
        self._wait(
            lambda: self._ready(agents),
            f"{', '.join(a.name for a in agents)} alive and healthy",
            deadline,
        )

    def _wait(self, condition: Any, what: str, deadline: float) -> None:
        while True:
            for agent in self.agents:
                if agent.proc is not None and agent.proc.poll() is not None:
                    raise ClusterError(
                        f"{agent.name} exited with {agent.proc.returncode} while waiting for "
                        f"{what}; log {agent.log_path}:\n{agent.log_tail()}"
                    )
            if condition():
                return
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- {a.name} ({a.log_path}):\n{a.log_tail(15)}" for a in self.agents
                )
                raise ClusterError(f"timed out waiting for {what}\n{tails}")
            time.sleep(0.1)

    def wait_member_status(self, agent: Agent, status: str, timeout: float = 30.0) -> float:
        """Wait until the server sees ``agent`` as ``status``; returns the seconds it took.

        "alive" also waits for a passing serfHealth check and for the agent's HTTP API, so a
        session can be created through it right after.
        """
        if status not in ("alive", "failed", "left"):
            raise ValueError(f"status must be alive, failed or left, got {status!r}")
        t0 = time.monotonic()
        deadline = t0 + timeout
        if status == "alive":
            self._wait(lambda: self._ready([agent]), f"{agent.name} alive", deadline)
        else:
            self._wait(
                lambda: self.member_status(agent) == status, f"{agent.name} {status}", deadline
            )
        return time.monotonic() - t0

    # -- faults -----------------------------------------------------------------------------

    def _reap(self, agent: Agent, sig: signal.Signals, timeout: float) -> None:
        proc = agent.proc
        if proc is None:
            return
        with _LIVE_LOCK:
            _LIVE.discard(proc)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        agent.proc = None

    def kill(self, agent: Agent) -> None:
        """SIGKILL the agent (no leave, no clean-up), and reap it."""
        self._reap(agent, signal.SIGKILL, 10)

    def stop(self, agent: Agent | None = None) -> None:
        """SIGTERM the agent and wait for it to exit (leave_on_terminate is off).

        Without an agent: stop the whole cluster (see ``stop_all``).
        """
        if agent is None:
            self.stop_all()
            return
        self._reap(agent, signal.SIGTERM, STOP_TIMEOUT)

    def start(self, agent: Agent, *, wait: bool = True) -> None:
        """Start a stopped agent with its config and data dir; wait until it is alive."""
        self._spawn(agent)
        if wait:
            self.wait_member_status(agent, "alive", timeout=START_TIMEOUT)

    def restart(self, agent: Agent) -> None:
        self.stop(agent)
        self.start(agent)

    def cut_off(self, agent: Agent) -> None:
        """Drop every packet from and to the agent's IP (gossip, RPC and HTTP alike)."""
        table = _table_for(agent.ip)
        _nft(
            f"add table inet {table}\n"
            f"add chain inet {table} out {{ type filter hook output priority 0; "
            f"policy accept; }}\n"
            f"add rule inet {table} out ip saddr {agent.ip} drop\n"
            f"add rule inet {table} out ip daddr {agent.ip} drop\n"
        )
        with _LIVE_LOCK:
            _CUT.add(table)

    def reconnect(self, agent: Agent, *, rejoin: bool = True) -> None:
        """Remove the agent's nftables table.

        Both sides then consider each other failed and serf would only retry every 30 s, so
        with ``rejoin`` (default) the agent is told to join the server again right away.
        """
        _nft_delete_table(_table_for(agent.ip))
        if rejoin and agent.running and not agent.is_server:
            deadline = time.monotonic() + 10
            while True:
                try:
                    status, body = agent.request("PUT", f"/v1/agent/join/{self.server.ip}")
                except OSError:
                    status, body = 0, b"unreachable"
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"{agent.name}: rejoin failed: {status} {body!r}")
                time.sleep(0.2)

    # -- tear-down --------------------------------------------------------------------------

    def stop_all(self) -> None:
        """Kill every agent and wait until it exited (its ports are free again)."""
        for agent in self.agents:
            _nft_delete_table(_table_for(agent.ip))
        for agent in self.agents:
            if agent.proc is not None and agent.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    agent.proc.kill()
        for agent in self.agents:
            self._reap(agent, signal.SIGKILL, 10)

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {a.name} ({a.log_path}):\n{a.log_tail(lines)}" for a in self.agents)


def start_cluster(
    spec: ClusterSpec, workdir: Path, consul_bin: str, loopback_base: str
) -> ConsulCluster:
    """Start a cluster and wait for a leader and every member alive; kills it if that fails."""
    cluster = ConsulCluster(spec, workdir, consul_bin, loopback_base)
    try:
        cluster.start_all()
    except BaseException:
        cluster.stop_all()
        raise
    return cluster
