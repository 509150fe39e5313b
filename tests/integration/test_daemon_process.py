"""`watcher run` as systemd sees it: readiness, watchdog, reload, a clean stop, /health."""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.faulty_s3 import FaultyS3Proxy
from tests.support.fleet import BIN, Fleet, WatcherProc, consul_requests, metrics_text, wait_for
from watcher.config import S3Settings

CLUSTER = ClusterSpec(hosts=1)


class NotifyListener:
    """The systemd side of sd_notify: a datagram socket collecting what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def saw(self, field: str) -> bool:
        return any(field in m.split("\n") for m in self.drain())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(
    cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
) -> Iterator[tuple[Fleet, WatcherProc, NotifyListener, int]]:
    fleet = Fleet(
        cluster,
        s3_settings,
        tmp_path,
        kv_prefix=f"p{time.monotonic_ns()}",
        daemon_extra={"listen": "127.0.0.1:0"},  # the port is read from the log
    )
    w = fleet.watchers[0]
    listener = NotifyListener(tmp_path / "notify.sock")
    base_env = w.env

    def env() -> dict[str, str]:
        e = base_env()
        e.update(NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="2000000")
        return e

    w.env = env  # type: ignore[method-assign]
    fleet.start()
    try:
        yield fleet, w, listener, w.health_port()
    finally:
        fleet.stop()
        listener.close()


def health(port: int, path: str = "/health") -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class TestSystemdProtocol:
    def test_ready_watchdog_reload_and_stopping(
        self, daemon: tuple[Fleet, WatcherProc, NotifyListener, int]
    ) -> None:
        fleet, w, listener, _ = daemon
        wait_for(lambda: listener.saw("READY=1"), 20, "READY=1", fleet)
        # WATCHDOG_USEC=2s: pings every second, idle or not. Two in any 3.5 s means at
        # most 1.75 s apart, under the 2 s systemd allows, with room for a late tick.
        listener.messages.clear()
        time.sleep(3.5)
        pings = sum(m.split("\n").count("WATCHDOG=1") for m in listener.drain())
        assert pings >= 2, listener.messages

        assert w.proc is not None
        w.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: listener.saw("RELOADING=1"), 10, "RELOADING=1", fleet)
        wait_for(  # logged once the new config is in place, after RELOADING=1
            lambda: bool(w.log_events("config_reloaded")),
            10,
            "config_reloaded",
            fleet,
        )
        # A reload of a file with a typo: the daemon keeps its config, and `status` (read
        # with a good copy of the file) says so, not only the daemon's log.
        good = w.config_path.read_text()
        copy = w.config_path.with_name("good-copy.yaml")
        copy.write_text(good)
        w.config_path.write_text(good + "\nkeep_relases: 3\n")
        try:
            w.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: bool(w.log_events("reload_failed")), 10, "reload_failed", fleet)
            argv = [str(BIN / "watcherctl"), "status", "-c", str(copy)]

            def said() -> str:
                run = subprocess.run(argv, env=w.env(), capture_output=True, text=True)
                return run.stdout

            wait_for(lambda: "config reload FAILED at " in said(), 10, "status said it", fleet)
            assert "keep_relases" in said() and "runs on the config it had" in said()
        finally:
            w.config_path.write_text(good)

        member = fleet.keys.member(w.name)
        assert fleet.kv.kv_get(member) is not None
        stopped_at = time.monotonic()
        assert w.stop() == 0
        assert listener.saw("STOPPING=1")
        # no deploy in flight: the session is destroyed, so the member key goes at once
        assert fleet.kv.kv_get(member) is None
        assert time.monotonic() - stopped_at < 10
        assert not (w.state_dir / "session.json").exists()


class TestAStopWhileAHookRuns:
    def test_systemd_is_asked_for_more_time_until_the_step_is_done(
        self, daemon: tuple[Fleet, WatcherProc, NotifyListener, int], tmp_path: Path
    ) -> None:
        """A step's hooks may together run longer than the unit's TimeoutStopSec (each has
        its own timeout): a stop waits for them, so it must ask for more time, as the unit
        file says it does (the operator review found it never did)."""
        fleet, w, listener, _ = daemon
        gate = tmp_path / "gate"
        fleet.give_gated_hook(w, "post_release", gate)
        fleet.wait_members(1)
        v1 = fleet.publish("v1")
        w.ctl_json("deploy", "web", v1.id, "--no-wait")
        started = gate.with_name("gate.started")
        wait_for(started.exists, 30, "the post_release hook started", fleet)
        listener.drain()
        listener.messages.clear()
        assert w.proc is not None
        w.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: listener.saw("STOPPING=1"), 10, "STOPPING=1", fleet)
        wait_for(
            lambda: any("EXTEND_TIMEOUT_USEC=30000000" in m.split("\n") for m in listener.drain()),
            10,
            "EXTEND_TIMEOUT_USEC while the hook runs",
            fleet,
        )
        assert w.running()  # still waiting for the hook
        # `status` said "watcher running" all that while: it says it stops, and why it
        # has not yet.
        status = w.ctl("status", "web", check=False, as_json=False)
        assert "watcher STOPPING (pid " in status.stdout, status.stdout
        assert "it finishes the step in progress" in status.stdout, status.stdout
        assert w.ctl_json("status", "web")["daemon"]["stopping"], "no `stopping` in the JSON"
        gate.touch()
        assert w.proc.wait(30) == 0


class TestStatusWhileARestartIsPending:
    def test_status_shows_what_the_running_watcher_works_on(
        self, daemon: tuple[Fleet, WatcherProc, NotifyListener, int], tmp_path: Path
    ) -> None:
        """`root`, `kv_prefix` and `node` take effect at a restart. Changed in the file, not
        yet restarted: `status` described the file's root (no release) and prefix (no
        fleet) as this host's, while the watcher still served the old ones (the operator
        review). It shows what runs, and says what waits for the restart."""
        fleet, w, _, _ = daemon
        fleet.wait_members(1)
        release = w.ctl_json("deploy", "web", fleet.publish("v1").id)["release"]
        fleet.wait_idle()
        good = w.config_path.read_text()
        config = yaml.safe_load(good)
        old_root, old_prefix = config["apps"]["web"]["root"], config["kv_prefix"]
        new_root = tmp_path / "new-root"
        new_root.mkdir()
        config["apps"]["web"]["root"] = str(new_root)
        config["kv_prefix"] = f"{old_prefix}-moved"
        w.config_path.write_text(yaml.safe_dump(config))
        try:
            # Reloaded too (edit, then `systemctl reload`, the usual way): the status file
            # said the file's root and prefix once the reload had taken them in.
            assert w.proc is not None
            w.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: bool(w.log_events("reload_needs_restart")), 10, "reloaded", fleet)
            status = w.ctl("status", "web", as_json=False)
            assert f"  current     {release}" in status.stdout, status.stdout
            assert (
                f"  apps.web.root: the running watcher works with {old_root} (shown here); "
                f"the config file's {new_root} takes effect at its restart" in status.stdout
            ), status.stdout
            assert f"  kv_prefix: the running watcher works with {old_prefix} " in status.stdout
            data = w.ctl_json("status", "web")
            assert data["apps"]["web"]["fleet_current"] == release, data  # the running prefix
            # The fleet commands read the file's prefix (a workstation's config is theirs),
            # and say that the watcher here works with another.
            fleet_view = w.ctl("status", "--fleet", check=False, as_json=False)
            assert f"works with kv_prefix {old_prefix} (a change of it takes effect at the " in (
                fleet_view.stderr
            ), fleet_view.stderr
            assert f"this command reads the config file's {old_prefix}-moved" in fleet_view.stderr
            assert "watcher running with this config's state_dir" in w.ctl("history", "web").stderr
            assert data["daemon"]["config_waiting"] == {
                "kv_prefix": {"running": old_prefix, "file": f"{old_prefix}-moved"},
                "apps.web.root": {"running": old_root, "file": str(new_root)},
            }, data["daemon"]
        finally:
            w.config_path.write_text(good)
        assert "config_waiting" not in w.ctl_json("status", "web")["daemon"]


class TestOneDaemonPerHost:
    def test_a_second_watcher_run_stops_before_touching_the_first_ones_session(
        self, daemon: tuple[Fleet, WatcherProc, NotifyListener, int], tmp_path: Path
    ) -> None:
        fleet, w, _, port = daemon
        wait_for(lambda: health(port)[0] == 200, 20, "healthy", fleet)
        assert w.proc is not None
        member = fleet.keys.member(w.name)
        held = fleet.kv.kv_get(member)
        assert held is not None and held.session

        def second(config: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(BIN / "watcher"), "--log-format", "json", "run", "-c", str(config)],
                env=w.env(),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )

        # The same config (systemd's unit and a manual run, say).
        result = second(w.config_path)
        assert result.returncode == 1, result
        assert (
            f"another watcher (pid {w.proc.pid}) already runs with {w.state_dir}" in result.stderr
        ), result.stderr
        # Another state_dir, the same app root: refused at the app's lock.
        data = yaml.safe_load(w.config_path.read_text())
        data["daemon"]["state_dir"] = str(tmp_path / "other-state")
        other = tmp_path / "other.yaml"
        other.write_text(yaml.safe_dump(data))
        result = second(other)
        assert result.returncode == 1, result
        assert f"already runs with {w.app_dir / '.state'}" in result.stderr, result.stderr
        assert not (tmp_path / "other-state" / "session.json").exists()

        # Its own state and app, the first one's health port: said as a config error,
        # the file first (exit 2: a restart cannot fix it).
        data["daemon"]["listen"] = f"127.0.0.1:{port}"
        data["apps"]["web"]["root"] = str(tmp_path / "other-root")
        data["daemon"]["state_dir"] = str(tmp_path / "third-state")
        third = tmp_path / "third.yaml"
        third.write_text(yaml.safe_dump(data))
        result = second(third)
        assert result.returncode == 2, result
        assert result.stderr.strip().splitlines()[-1] == (
            f"{third}: daemon.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
        ), result.stderr
        # Refused before it made the app's directories (the newcomer test found them made
        # by such a start): only the instance locks are there.
        made = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "other-root").rglob("*"))
        assert made == [
            "other-root/web",
            "other-root/web/.state",
            "other-root/web/.state/daemon.lock",
        ], made

        # The first daemon kept its session and its member key, and is healthy.
        again = fleet.kv.kv_get(member)
        assert again is not None and again.session == held.session
        assert again.modify_index == held.modify_index
        assert health(port)[0] == 200
        assert not w.log_events("session_lost")


class TestAnAppRemovedFromTheConfig:
    def test_a_reused_session_lets_go_of_its_member_key(
        self, daemon: tuple[Fleet, WatcherProc, NotifyListener, int], tmp_path: Path
    ) -> None:
        """The session outlives a SIGKILL (and a stop with a deploy in flight): restarted
        without an app, the watcher must not stay that app's live member, expected in its
        every deploy and never acking (the operator review: a deploy stuck in flight)."""
        fleet, w, _, _ = daemon
        data = yaml.safe_load(w.config_path.read_text())
        data["apps"]["api"] = {"root": str(tmp_path / "api-srv")}
        w.config_path.write_text(yaml.safe_dump(data))
        w.kill()
        w.start()
        api_member = f"{fleet.kv_prefix}/apps/api/members/{w.name}"
        web_member = fleet.keys.member(w.name)
        wait_for(lambda: fleet.kv.kv_get(api_member) is not None, 20, "api's member key", fleet)
        session = json.loads((w.state_dir / "session.json").read_text())["id"]

        del data["apps"]["api"]
        w.config_path.write_text(yaml.safe_dump(data))
        w.kill()
        w.start()
        wait_for(
            lambda: bool(w.log_events("watcher_ready", this_start=True)), 20, "ready again", fleet
        )

        assert [e["session"] for e in w.log_events("session_reused", this_start=True)] == [session]
        # let go of on a thread of its own, beside the session's renewals
        wait_for(lambda: fleet.kv.kv_get(api_member) is None, 10, "api's key released", fleet)
        assert [e["app"] for e in w.log_events("member_key_released", this_start=True)] == ["api"]
        web = fleet.kv.kv_get(web_member)
        assert web is not None and web.session == session


class TestHealthEndpoint:
    def test_healthy_with_a_session_and_metrics_exported(
        self, daemon: tuple[Fleet, WatcherProc, NotifyListener, int]
    ) -> None:
        fleet, w, _, port = daemon
        wait_for(lambda: health(port)[0] == 200, 20, "healthy", fleet)
        assert health(port)[0] == 200
        _, body = health(port)
        assert body["session"]
        v1 = fleet.publish("v1")
        assert w.ctl_json("deploy", "web", v1.id)["result"] == "committed"
        text = metrics_text(port)
        assert 'watcher_current_release_info{app="web",release="' in text
        assert "watcher_loop_cycles_total" in text
        # The daemon's own Consul requests, by kind: it made a session and took part in
        # a deploy, so both show with a count.
        requests = consul_requests(text)
        assert requests.get("session_create", 0) >= 1, requests
        assert sum(requests.values()) > requests["session_create"], requests

    def test_consul_agent_gone_keeps_the_daemon_running(
        self, daemon: tuple[Fleet, WatcherProc, NotifyListener, int], cluster: ConsulCluster
    ) -> None:
        fleet, w, _, port = daemon
        wait_for(lambda: health(port)[0] == 200, 20, "healthy", fleet)
        agent = cluster.hosts[0]
        cluster.stop(agent)
        try:
            time.sleep(3)
            assert w.running(), "the daemon must survive its Consul agent going away"
            # Consul is gone, the app is not: a load balancer keeps the host.
            assert health(port, "/health/serving") == (
                200,
                {"healthy": True, "problems": [], "waiting_for_decision": {}},
            )
            status = w.ctl("status", check=False)
            assert status.returncode == 3, status  # the local part shown, Consul's unknown
            assert json.loads(status.stdout)["consul"]["reachable"] is False
        finally:
            cluster.start(agent)
        # the session is gone with the agent's restart or TTL: a new one is made
        wait_for(lambda: health(port)[0] == 200, 60, "healthy again", fleet)
        fleet.wait_members(1, timeout=30)
        assert (w.state_dir / "session.json").exists()


class TestDownloadProgress:
    def test_status_shows_a_prefetch_in_progress(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
    ) -> None:
        """A build being prefetched shows in `watcherctl status` with how far it is, and
        goes from there once it is done."""
        with FaultyS3Proxy(str(s3_settings.endpoint_url)) as proxy:
            via_proxy = dataclasses.replace(s3_settings, endpoint_url=proxy.endpoint_url)
            fleet = Fleet(cluster, via_proxy, tmp_path, kv_prefix=f"p{time.monotonic_ns()}")
            w = fleet.watchers[0]
            fleet.start()
            try:
                proxy.stall_mid_body()
                big = {"index.html": "<h1>v1</h1>\n", "blob": os.urandom(2 * 1024 * 1024)}
                record = fleet.publish("v1", files=big, announce=True)

                def progress() -> dict[str, int] | None:
                    app = w.ctl_json("status")["apps"]["web"]
                    got: dict[str, int] | None = (
                        (app["daemon"] or {}).get("downloading", {}).get(record.id)
                    )
                    return got if got and got["have"] > 0 else None

                wait_for(progress, 30, "the prefetch's progress in status", fleet)
                got = progress()
                assert got is not None and 0 < got["have"] < got["size"] == record.size
                human = w.ctl("status", as_json=False).stdout
                assert f"downloading {record.id}: " in human and " MB (" in human, human
                proxy.resume()
                prefetched = w.app_dir / "prefetched" / f"{record.id}-{record.sha256[:12]}"
                wait_for(prefetched.is_dir, 30, "the prefetch", fleet)
                wait_for(
                    lambda: "downloading" not in (w.ctl_json("status")["apps"]["web"]["daemon"]),
                    30,
                    "no download in status",
                    fleet,
                )
            finally:
                proxy.resume()
                fleet.stop()


class TestCheckConfigAsksTheAgent:
    def test_a_short_ttl_is_checked_against_the_agents_own_minimum(
        self, cluster: ConsulCluster, tmp_path: Path
    ) -> None:
        """The test agents (as the demo's) set session_ttl_min 1s: a 3 s session TTL is
        fine there, and check-config no longer warns of Consul's default 10 s when the
        agent it names says otherwise. An agent that does not answer: the warning stays."""
        settings = cluster.hosts[0].consul_settings()
        (tmp_path / "web").mkdir()

        def check(address: str) -> subprocess.CompletedProcess[str]:
            config = tmp_path / "w.yaml"
            consul = {"address": address, **({"token": settings.token} if settings.token else {})}
            config.write_text(
                yaml.safe_dump(
                    {
                        "consul": consul,
                        "s3": {"bucket": "b"},
                        "daemon": {"session_ttl": "3s"},
                        # with its user: no advice against hooks run as root either
                        "apps": {"web": {"root": str(tmp_path), "user": getpass.getuser()}},
                    }
                )
            )
            return subprocess.run(
                [str(BIN / "watcher"), "check-config", "-c", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        answered = check(settings.address)
        assert answered.returncode == 0, answered
        assert answered.stderr == "", answered.stderr
        with socket.socket() as unused:  # a port nothing listens on
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        silent = check(f"127.0.0.1:{port}")
        assert silent.returncode == 0, silent
        assert "is below Consul's default session_ttl_min (10s)" in silent.stderr, silent.stderr
