"""A stop tells every app's worker at once, then waits for each (pure logic, fake agents)."""

from __future__ import annotations

import types
from typing import Any

from watcher import daemon as daemon_module
from watcher.daemon import stop_agents


class FakeAgent:
    """An app whose step runs until ``steps`` waits have passed; records what it is told."""

    def __init__(self, name: str, log: list[str], steps: int) -> None:
        self.app = types.SimpleNamespace(name=name)
        self.log = log
        self.steps = steps
        self.name = name

    def shutdown(self, wait: bool) -> None:
        self.log.append(f"{self.name} shutdown wait={wait}")

    def busy(self) -> bool:
        return self.steps > 0

    def wait_idle(self, timeout: float) -> bool:
        self.log.append(f"{self.name} wait")
        self.steps -= 1
        return self.steps <= 0

    def has_deploy_in_flight(self) -> bool:
        return self.name == "api"


class FakeNotifier:
    def __init__(self) -> None:
        self.extended: list[float] = []

    def extend_timeout(self, seconds: float) -> bool:
        self.extended.append(seconds)
        return True


def test_every_app_is_told_before_any_is_waited_for(monkeypatch: Any) -> None:
    """web in a long step, api preparing: api must learn of the stop at once, not once web
    is done (it would have acked ready meanwhile, the code review)."""
    log: list[str] = []
    web, api = FakeAgent("web", log, steps=3), FakeAgent("api", log, steps=1)
    monkeypatch.setattr(daemon_module, "running_hooks", lambda: 0)
    notifier = FakeNotifier()

    in_flight = stop_agents([web, api], notifier)  # type: ignore[list-item, arg-type]

    assert log[:2] == ["web shutdown wait=False", "api shutdown wait=False"]
    assert log.index("api shutdown wait=False") < log.index("web wait")
    assert in_flight is True
    assert notifier.extended == []  # no hook runs: the unit's own timeout


def test_systemd_is_asked_for_more_only_while_a_hook_runs(monkeypatch: Any) -> None:
    log: list[str] = []
    web = FakeAgent("web", log, steps=2)
    hooks = iter([1, 1, 0, 0, 0, 0])
    monkeypatch.setattr(daemon_module, "running_hooks", lambda: next(hooks))
    notifier = FakeNotifier()

    stop_agents([web], notifier)  # type: ignore[list-item, arg-type]

    assert notifier.extended == [daemon_module.STOP_EXTEND]
