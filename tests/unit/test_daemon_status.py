"""status.json: what `watcherctl status` reads of the daemon, and how often it is rewritten."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from watcher.config import parse_config
from watcher.daemon import STATUS_FILE, STATUS_HEARTBEAT, STATUS_MIN_INTERVAL, Daemon
from watcher.errors import (
    ConsulPermissionDenied,
    ConsulRequestError,
    ConsulTLSError,
    ConsulUnavailable,
)


@dataclass
class FakeStatus:
    deploy: str | None = None
    state: str = "idle"
    converge_error: str | None = None
    apply_error: str = ""
    recheck_at: float | None = None
    prune_blocked: str = ""
    prefetch_failed: str = ""


@dataclass
class FakeEngine:
    cache: Any = None


@dataclass
class FakeAgent:
    """What the daemon's status code reads of an app's agent."""

    status: FakeStatus = field(default_factory=FakeStatus)
    engine: FakeEngine = field(default_factory=FakeEngine)

    def busy(self) -> bool:
        return False


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    config = parse_config(
        {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "s3": {"bucket": "b"},
            "apps": {"web": {"root": str(tmp_path / "srv")}},
        },
        env={},
    )
    d = Daemon(config)
    d.agents = {"web": FakeAgent()}  # type: ignore[dict-item]
    return d


def written(d: Daemon) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((d.state_dir / STATUS_FILE).read_text())
    return data["apps"]["web"]


def in_deploy(d: Daemon, state: str) -> FakeAgent:
    """The app in deploy d1 at ``state``, and status.json saying so."""
    agent: FakeAgent = d.agents["web"]  # type: ignore[assignment]
    agent.status.deploy, agent.status.state = "d1", state
    d._write_status()
    return agent


class TestStatusFile:
    def test_its_directory_is_made_when_missing(self, daemon: Daemon) -> None:
        assert not daemon.state_dir.exists()
        daemon._write_status()
        assert written(daemon)["state"] == "idle"

    def test_a_deploy_s_changes_are_written_at_most_every_interval(self, daemon: Daemon) -> None:
        agent = in_deploy(daemon, "staging")
        assert written(daemon) == {
            "deploy": "d1",
            "state": "staging",
            "undecided": None,
            "converge_error": None,
            "apply_error": "",
            "prune_blocked": "",
            "prefetch_failed": "",
            "root": daemon.started_config.apps["web"].root,
        }
        # a change right after: held back, and the loop is told to come back for it
        agent.status.state = "ready"
        daemon._write_status()
        assert written(daemon)["state"] == "staging"
        assert daemon._status_held
        # the next cycle past the interval writes it, even with the same outcome line
        daemon._reconcile = lambda agent: "waiting"  # type: ignore[method-assign]
        daemon._status_written = time.monotonic()  # the heartbeat rewrite is not due
        daemon._cycle()
        assert written(daemon)["state"] == "staging"
        daemon._status_at -= STATUS_MIN_INTERVAL
        daemon._cycle()
        assert written(daemon)["state"] == "ready"
        assert not daemon._status_held

    def test_a_cycle_that_only_dropped_bad_events_logs_no_empty_line(self, daemon: Daemon) -> None:
        """The operator review: after bad events, `cycle` lines said `"outcome": ""`, and
        the line before them again."""
        from structlog.testing import capture_logs

        from watcher.consul_api import ConsulEvent

        daemon._reconcile = lambda agent: "idle"  # type: ignore[method-assign]
        with capture_logs() as logs:
            daemon._cycle()
            bad = ConsulEvent("e1", "deploy", b"{", 1, "", "", "")
            daemon.events.put(bad)
            daemon._cycle(reconcile=False)
            daemon._cycle()
        cycles = [e["outcome"] for e in logs if e["event"] == "cycle"]
        assert cycles == ["web: idle"], cycles
        assert [e["event_id"] for e in logs if e["event"] == "event_dropped"] == ["e1"]

    def test_the_end_of_a_deploy_is_written_at_once(self, daemon: Daemon) -> None:
        agent = in_deploy(daemon, "live")
        # idle again (no deploy, nothing running): nothing to wait for, written now
        agent.status.deploy, agent.status.state = None, "idle"
        daemon._write_status()
        assert written(daemon)["state"] == "idle"

    def test_a_change_undone_before_it_was_written_is_not_held(self, daemon: Daemon) -> None:
        agent = in_deploy(daemon, "staging")
        agent.status.state = "ready"
        daemon._write_status()
        assert daemon._status_held
        agent.status.state = "staging"
        daemon._write_status()
        assert not daemon._status_held

    def test_a_change_of_health_is_written_at_once_even_in_a_deploy(self, daemon: Daemon) -> None:
        in_deploy(daemon, "ready")
        assert json.loads((daemon.state_dir / STATUS_FILE).read_text())["healthy"] is False
        daemon.health.session_ok("s1")  # healthy now: `watcherctl status` must say so
        daemon._write_status()
        data = json.loads((daemon.state_dir / STATUS_FILE).read_text())
        assert data["healthy"] is True


class TestCycleLine:
    """What a cycle's log line says when Consul fails: unreachable only when it did not
    answer (a refused request came from a Consul that is there)."""

    @pytest.mark.parametrize(
        ("error", "said"),
        [
            (ConsulUnavailable("cannot reach Consul at http://127.0.0.1:8500"), "unreachable"),
            (ConsulRequestError('Consul refused: invalid session "abc"'), "refused"),
            (ConsulPermissionDenied("ACL not found"), "refused"),
            (ConsulTLSError("certificate verify failed"), "TLS failed"),
        ],
    )
    def test_the_label_follows_the_error(
        self, daemon: Daemon, error: Exception, said: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        agent = SimpleNamespace(app=SimpleNamespace(name="web"), undecided_deploy=lambda: None)

        def fail(_: Any) -> Any:
            raise error

        monkeypatch.setattr(daemon, "_ensure_member", fail)
        line = daemon._reconcile(agent)  # type: ignore[arg-type]
        assert line == f"consul {said}: {error}"


def test_a_stop_waiting_for_a_long_hook_is_no_stalled_loop(daemon: Daemon) -> None:
    """The loop ends when a stop begins; a stop waits for the step in progress (a hook may
    run to its timeout, 300 s by default). Past loop_stall_after (120 s) the status file's
    heartbeat said the watcher unhealthy ("main loop has not completed a cycle"), and
    `status` exited 1 (the code review). The stop's heartbeat counts as the loop's."""
    daemon.health.session_ok("s1")
    daemon.health.loop_cycle()
    daemon.health.loop_stall_after = 0.5  # seconds, for this test
    time.sleep(0.6)
    assert not daemon.health.check()[0]  # what a stop past that looked like
    daemon._stopping_at = "2026-12-06T22:00:00.000Z"
    daemon._status_written = time.monotonic() - STATUS_HEARTBEAT
    daemon._stopping_status()
    data = json.loads((daemon.state_dir / STATUS_FILE).read_text())
    assert data["stopping"] == "2026-12-06T22:00:00.000Z" and data["healthy"] is True, data
