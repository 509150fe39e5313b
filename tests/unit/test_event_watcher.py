"""The event watcher's bookkeeping: handled ids and what it hands the loop."""

from __future__ import annotations

import queue
import threading
from typing import Any

from structlog.testing import capture_logs

from watcher.consul_api import ConsulEvent
from watcher.daemon import EventWatcher
from watcher.events import HandledEvents


def event(n: int) -> ConsulEvent:
    return ConsulEvent(f"id-{n}", "deploy", b"{}", n, "", "", "")


class ScriptedAgent:
    """An agent's event list as a script of answers: the buffer grows by one per call."""

    def __init__(self, buffered: list[ConsulEvent], arriving: list[ConsulEvent]) -> None:
        self.buffer = list(buffered)
        self.arriving = list(arriving)
        self.skips: list[set[str]] = []
        self.done = threading.Event()

    def event_list(
        self, *, index: str | None = None, wait: float | None = None, skip: Any = ()
    ) -> tuple[str, list[ConsulEvent]]:
        if index is not None:
            if not self.arriving:
                self.done.set()
                raise ConnectionError("script over")
            self.buffer.append(self.arriving.pop(0))
        self.skips.append({e.id for e in self.buffer if e.id in skip})
        return f"i{len(self.buffer)}", [e for e in self.buffer if e.id not in skip]


def run(agent: ScriptedAgent, handled: HandledEvents) -> list[ConsulEvent]:
    out: queue.Queue[ConsulEvent] = queue.Queue()
    stopping = threading.Event()
    watcher = EventWatcher(agent, handled, out, lambda: None, stopping)  # type: ignore[arg-type]
    watcher.start()
    assert agent.done.wait(10)
    stopping.set()
    watcher.join(5)
    return [out.get_nowait() for _ in range(out.qsize())]


def test_buffered_events_are_history_and_handled_ones_are_not_asked_for_again() -> None:
    agent = ScriptedAgent([event(1), event(2)], [event(3), event(4)])
    handled = HandledEvents(256)
    got = run(agent, handled)
    assert [e.id for e in got] == ["id-3", "id-4"]
    # Every answer after the first leaves out what was already handled.
    assert agent.skips[1:] == [{"id-1", "id-2"}, {"id-1", "id-2", "id-3"}]
    assert all(f"id-{n}" in handled for n in range(1, 5))


def test_a_batch_is_handed_over_in_lamport_order() -> None:
    """The agent lists events as gossip brought them, not by Lamport time: the one with
    the highest handled first would make the others of its batch history."""

    class BatchAgent(ScriptedAgent):
        def event_list(
            self, *, index: str | None = None, wait: float | None = None, skip: Any = ()
        ) -> tuple[str, list[ConsulEvent]]:
            if index is not None and self.arriving:
                self.buffer += self.arriving  # all of them in one answer
                self.arriving = []
                return "i-batch", [e for e in self.buffer if e.id not in skip]
            return super().event_list(index=index, wait=wait, skip=skip)

    agent = BatchAgent([], [event(7), event(5), event(6)])
    got = run(agent, HandledEvents(256))
    assert [e.ltime for e in got] == [5, 6, 7]


def test_handled_ids_are_bounded() -> None:
    handled = HandledEvents(256)
    assert handled.add(f"id-{n}" for n in range(300)) is True
    assert "id-43" not in handled and "id-44" in handled and "id-299" in handled
    assert handled.add(["id-299", "id-44"]) is False


def test_a_failing_agent_is_said_once_while_it_lasts() -> None:
    """A refused token or a stopped agent logged `event_watch_failed` once a second for as
    long as it lasted (the ACL review): now once, again when the error changes, and once
    when the watch works again. It still asks every second."""

    class FailingAgent(ScriptedAgent):
        def __init__(self) -> None:
            super().__init__([], [event(1)])
            self.errors = ["403 refused"] * 5 + ["connection refused"] * 3
            self.asked = 0

        def event_list(
            self, *, index: str | None = None, wait: float | None = None, skip: Any = ()
        ) -> tuple[str, list[ConsulEvent]]:
            self.asked += 1
            if self.errors:
                raise ConnectionError(self.errors.pop(0))
            return super().event_list(index=index, wait=wait, skip=skip)

    class Quick(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            return super().wait(0.001)

    agent = FailingAgent()
    out: queue.Queue[ConsulEvent] = queue.Queue()
    stopping = Quick()
    with capture_logs() as logs:
        watcher = EventWatcher(agent, HandledEvents(256), out, lambda: None, stopping)  # type: ignore[arg-type]
        watcher.start()
        assert agent.done.wait(10)
        stopping.set()
        watcher.join(5)
    said = [(e["event"], e.get("error")) for e in logs if e["event"].startswith("event_watch")]
    assert said == [
        ("event_watch_failed", "403 refused"),
        ("event_watch_failed", "connection refused"),
        ("event_watch_recovered", None),
        ("event_watch_failed", "script over"),
    ]
    assert agent.asked == 8 + 3  # every failure asked again; then primed, one event, over
    assert [e.id for e in [out.get_nowait() for _ in range(out.qsize())]] == ["id-1"]
