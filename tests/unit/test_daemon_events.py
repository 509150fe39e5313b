"""How the daemon counts the Consul events it handles: a small fixed set of results."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from watcher.config import parse_config
from watcher.consul_api import ConsulEvent
from watcher.daemon import Daemon
from watcher.errors import ConsulUnavailable

#: Every value docs/metrics.md lists for ``watcher_events_handled_total{result}``.
DOCUMENTED = {"acted", "duplicate", "history", "refused", "failed", "invalid"}


@dataclass
class FakeStore:
    """What the daemon asks of an app's DeployStore for a raw deploy event."""

    answer: str = "started"
    fail: bool = False

    def start_from_event(self, **kw: Any) -> str:
        if self.fail:
            raise ConsulUnavailable("connection refused")
        return self.answer

    def view(self, deploy_id: str) -> None:
        return None


@dataclass
class FakeAgent:
    store: FakeStore = field(default_factory=FakeStore)
    app: Any = None

    def prefetch(self, artifact_id: str) -> None:
        pass


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
    agent = FakeAgent(app=config.apps["web"])
    d.agents = {"web": agent}  # type: ignore[dict-item]
    return d


def handle(d: Daemon, name: str, payload: dict[str, str] | bytes) -> dict[tuple[str, str], float]:
    """Handle one event; returns every events_handled series, (name, result) -> count."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    d._handle_event(ConsulEvent("0f4a1c2e-aaaa-bbbb-cccc-000000000001", name, body, 7, "", "", ""))
    return {
        (s.labels["name"], s.labels["result"]): s.value
        for metric in d.metrics.events_handled.collect()
        for s in metric.samples
        if s.name == "watcher_events_handled_total"
    }


def store_of(d: Daemon) -> FakeStore:
    store: FakeStore = d.agents["web"].store  # type: ignore[assignment]
    return store


class TestEventsHandled:
    def test_a_build_and_a_doorbell_are_acted_on(self, daemon: Daemon) -> None:
        handle(daemon, "build-finished", {"app": "web", "artifact": "main-1a2b3c4d"})
        got = handle(daemon, "deploy", {"app": "web", "deploy": "20260101T000000Z-1a2b3c"})
        assert got == {("build-finished", "acted"): 1, ("deploy", "acted"): 1}

    @pytest.mark.parametrize(
        ("answer", "result"),
        [
            ("started", "acted"),
            ("exists", "duplicate"),
            ("history", "history"),
            ("unknown artifact", "refused"),
            ("refused: deploy 20260101T000000Z-1a2b3c is in flight", "refused"),
            ("lost race", "failed"),
        ],
    )
    def test_a_raw_deploy_is_counted_by_what_became_of_it(
        self, daemon: Daemon, answer: str, result: str
    ) -> None:
        store_of(daemon).answer = answer
        got = handle(daemon, "deploy", {"app": "web", "artifact": "main-1a2b3c4d"})
        assert got == {("deploy", result): 1}

    def test_consul_failing_meanwhile_is_failed(self, daemon: Daemon) -> None:
        store_of(daemon).fail = True
        assert handle(daemon, "rollback", {"app": "web"}) == {("rollback", "failed"): 1}

    def test_an_event_that_does_not_parse_is_invalid_and_its_name_never_a_label(
        self, daemon: Daemon
    ) -> None:
        handle(daemon, "deploy", b"not json")
        got = handle(daemon, "anything\nat-all", {"app": "web"})
        assert got == {("deploy", "invalid"): 1, ("other", "invalid"): 1}

    def test_every_result_is_a_documented_one(self, daemon: Daemon) -> None:
        seen: set[str] = set()
        for answer in (
            "started",
            "exists",
            "history",
            "unknown artifact",
            "refused: x",
            "lost race",
        ):
            store_of(daemon).answer = answer
            seen |= {r for _, r in handle(daemon, "deploy", {"app": "web", "artifact": "main-1"})}
        store_of(daemon).fail = True
        seen |= {r for _, r in handle(daemon, "rollback", {"app": "web"})}
        seen |= {r for _, r in handle(daemon, "deploy", b"{")}
        assert seen == DOCUMENTED


class TestCycleLog:
    def test_a_retry_countdown_is_not_logged_each_second(
        self, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While Consul refused a token the loop logged "prepare failed, retry in 9s",
        "8s" ... once a second (the ACL review): the countdown is not news, another
        outcome is."""
        lines = iter(
            [f"prepare failed, retry in {n}s" for n in range(9, 0, -1)]
            + ["prepare failed, retry in 9s: disk full", "idle", "idle"]
        )
        monkeypatch.setattr(daemon, "_reconcile", lambda agent: next(lines))
        monkeypatch.setattr(daemon, "_write_status", lambda **kw: None)
        monkeypatch.setattr(daemon, "_download_shown", lambda: False)
        with capture_logs() as logs:
            for _ in range(12):
                daemon._cycle()
        assert [e["outcome"] for e in logs if e["event"] == "cycle"] == [
            "web: prepare failed, retry in 9s",
            "web: prepare failed, retry in 9s: disk full",
            "web: idle",
        ]
        assert daemon._last_line == "web: idle"
