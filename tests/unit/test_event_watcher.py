"""The event watcher's bookkeeping: handled ids, what it hands the loop, a full disk."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import pytest
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


def test_buffered_events_are_history_and_handled_ones_are_not_asked_for_again(
    tmp_path: Path,
) -> None:
    agent = ScriptedAgent([event(1), event(2)], [event(3), event(4)])
    handled = HandledEvents(tmp_path / "events.json", 256)
    got = run(agent, handled)
    assert [e.id for e in got] == ["id-3", "id-4"]
    # Every answer after the first leaves out what was already handled.
    assert agent.skips[1:] == [{"id-1", "id-2"}, {"id-1", "id-2", "id-3"}]
    again = HandledEvents(tmp_path / "events.json", 256)
    assert all(f"id-{n}" in again for n in range(1, 5))


def test_a_batch_is_handed_over_in_lamport_order(tmp_path: Path) -> None:
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
    got = run(agent, HandledEvents(tmp_path / "events.json", 256))
    assert [e.ltime for e in got] == [5, 6, 7]


def test_a_full_disk_does_not_stop_the_watcher(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    handled = HandledEvents(blocker / "events.json", 256)
    # Every write of the ids fails from here on (as on a full disk, an OSError).
    blocker.write_text("a file where the state directory should be")
    agent = ScriptedAgent([], [event(1), event(2)])
    got = run(agent, handled)
    assert [e.id for e in got] == ["id-1", "id-2"]
    assert "id-1" in handled and "id-2" in handled  # kept in memory all the same


def test_handled_ids_are_bounded(tmp_path: Path) -> None:
    handled = HandledEvents(tmp_path / "events.json", 256)
    handled.add(f"id-{n}" for n in range(300))
    again = HandledEvents(tmp_path / "events.json", 256)
    assert "id-43" not in again and "id-44" in again and "id-299" in again


@pytest.mark.parametrize(
    "content",
    [
        b'{"ids": 5}',
        b"null",
        b"{}",
        b"[1, 2]",
        b'{"ids": {"id-1": 1}}',
        b'{"ids": ["id-1", null]}',
        b'{"ids": "id-1"}',
        b"\xff\xfe not even text",
        b"",
        b"[" * 100_000,
    ],
    ids=[
        "ids-a-number",
        "null",
        "empty-object",
        "a-list",
        "ids-an-object",
        "ids-not-strings",
        "ids-a-string",
        "binary",
        "empty-file",
        "nested-too-deep",
    ],
)
def test_a_corrupt_or_foreign_file_is_logged_and_taken_as_empty(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "events.json"
    path.write_bytes(content)
    with capture_logs() as logs:
        handled = HandledEvents(path, 256)
    assert "id-1" not in handled
    ignored = [e for e in logs if e["event"] == "handled_events_file_ignored"]
    assert len(ignored) == 1 and ignored[0]["path"] == str(path)
    assert ignored[0]["log_level"] == "warning"
    # the next write replaces it with a good file
    assert handled.add(["id-1"]) is True
    assert "id-1" in HandledEvents(path, 256)


def test_a_directory_where_the_file_should_be_is_logged_and_taken_as_empty(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.json"
    path.mkdir()
    with capture_logs() as logs:
        handled = HandledEvents(path, 256)
    assert "id-1" not in handled
    [ignored] = [e for e in logs if e["event"] == "handled_events_file_ignored"]
    assert ignored["path"] == str(path) and "cannot read it: Is a directory" in ignored["problem"]
