"""A worker task that raises is started again after a growing pause, not at the loop's
next step: the loop wakes when a task ends, so a cause that lasts spun it (the pure
bookkeeping of ``AppAgent._start``; the integration test ``TestSwitchFails`` runs a
failing switch on a real fleet)."""

from __future__ import annotations

import threading
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from watcher import agent as agent_module
from watcher.agent import AgentStatus, AppAgent
from watcher.errors import ConsulUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_agent(events: list[str]) -> AppAgent:
    agent = AppAgent.__new__(AppAgent)  # only what starting and guarding a task touches
    agent._worker = ThreadPoolExecutor(max_workers=1)
    agent._task = None
    agent._task_key = None
    agent._task_failed = None
    agent._cancel = threading.Event()
    agent.status = AgentStatus()
    agent.engine = types.SimpleNamespace(in_flight_artifacts=set())
    agent._wake = lambda: None
    agent.log = types.SimpleNamespace(
        warning=lambda event, **_k: events.append(event),
        exception=lambda event, **_k: events.append(event),
    )
    return agent


def run(agent: AppAgent, kind: str, fn: Any) -> str:
    said = agent._start(kind, "d1", fn)
    if agent._task is not None:
        agent._task.result(5)
        agent._task, agent._task_key = None, None  # as the loop's next step does
    return said


@pytest.mark.parametrize("error", [KeyError("phases"), ConsulUnavailable("Consul refused")])
def test_a_task_that_raises_waits_1_2_4_s_before_it_runs_again(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    clock = Clock()
    monkeypatch.setattr(agent_module.time, "monotonic", clock)
    events: list[str] = []
    agent = make_agent(events)
    runs = [0]

    def failing() -> None:
        runs[0] += 1
        raise error

    assert run(agent, "abort", failing) == "abort started"
    for pause in (1.0, 2.0, 4.0):
        said = run(agent, "abort", failing)
        assert said.startswith("abort failed, retry in"), said
        assert agent.status.recheck_at == clock.now + pause  # the loop comes back then
        clock.now += pause - 0.01
        assert run(agent, "abort", failing).startswith("abort failed, retry in")
        clock.now += 0.01
        assert run(agent, "abort", failing) == "abort started"
    assert runs[0] == 4 and len(events) == 4
    # another task, or another deploy's, is not held back by it
    assert run(agent, "apply", lambda: None) == "apply started"
    assert agent._start("abort", "d2", lambda: None) == "abort started"


def test_the_pause_stops_growing_and_a_success_clears_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(agent_module.time, "monotonic", clock)
    agent = make_agent([])
    fail = [True]

    def task() -> None:
        if fail[0]:
            raise RuntimeError("a bug")

    pauses = []
    for _ in range(8):
        assert run(agent, "prepare", task) == "prepare started"
        assert agent._task_failed is not None
        pauses.append(agent._task_failed[3] - clock.now)
        if len(pauses) < 8:
            clock.now = agent._task_failed[3]
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert run(agent, "prepare", task) == "prepare failed, retry in 30s"
    fail[0] = False
    clock.now += 30.0
    assert run(agent, "prepare", task) == "prepare started"
    assert agent._task_failed is None
    assert run(agent, "prepare", task) == "prepare started"
