"""When a daemon watch wakes the loop (watcher/daemon.py ``Watch``): on what the watched key
or prefix returns, not on Consul's index, which moves with every KV write of the cluster
while the key is missing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from watcher.consul_api import KVEntry
from watcher.daemon import _MISSING, Watch, WatchCache, key_watch, prefix_watch


def entry(key: str, modify_index: int) -> KVEntry:
    return KVEntry(key, b"x", modify_index, 1, 0, None, 0)


class Script:
    """Answers blocking queries from a list of (index, value); then blocks until stopped."""

    def __init__(self, answers: list[tuple[int, object]], stop: threading.Event) -> None:
        self.answers = list(answers)
        self.stop = stop
        self.asked: list[int] = []
        self.done = threading.Event()

    def __call__(self, index: int) -> tuple[int, object]:
        self.asked.append(index)
        if not self.answers:
            self.done.set()
            self.stop.wait(5)
            return index, None
        return self.answers.pop(0)


def run(fetch: Callable[[int], tuple[int, object]], stop: threading.Event, **kw: float) -> int:
    wakes = []
    w = Watch("test", fetch, lambda: wakes.append(time.monotonic()), stop, **kw)  # type: ignore[arg-type]
    w.start()
    assert isinstance(fetch, Script)
    assert fetch.done.wait(5)
    stop.set()
    w.join(5)
    return len(wakes)


def test_a_quiet_watch_ignores_a_missing_key_whatever_the_index_does() -> None:
    stop = threading.Event()
    # The key stays missing while other writes move the index: no wake-up at all.
    script = Script([(10, None), (11, None), (12, None), (15, None)], stop)
    assert run(script, stop, quiet=True) == 0
    assert script.asked[:4] == [0, 10, 11, 12]  # each query passes on the index it got


def test_a_quiet_watch_wakes_once_when_the_key_appears() -> None:
    stop = threading.Event()
    script = Script([(10, None), (11, None), (12, 12), (13, 12)], stop)
    assert run(script, stop, quiet=True) == 1


def test_a_quiet_watch_wakes_at_once_for_a_key_already_there() -> None:
    stop = threading.Event()
    script = Script([(10, 7)], stop)
    assert run(script, stop, quiet=True) == 1


def test_a_plain_watch_wakes_with_its_first_read_then_on_changes_only() -> None:
    stop = threading.Event()
    script = Script([(10, None), (11, None), (12, 12), (14, 14), (15, 14)], stop)
    assert run(script, stop) == 3  # first read, appearance, rewrite


def test_settle_waits_before_asking_again() -> None:
    stop = threading.Event()
    script = Script([(1, 1), (2, 2)], stop)
    started = time.monotonic()
    assert run(script, stop, settle=0.3) == 2
    assert time.monotonic() - started >= 0.6


class FakeConsul:
    def __init__(self) -> None:
        self.kv: dict[str, KVEntry] = {}

    def kv_get_blocking(self, key: str, index: int, wait: float) -> tuple[int, KVEntry | None]:
        return index + 1, self.kv.get(key)

    def kv_list_blocking(self, prefix: str, index: int, wait: float) -> tuple[int, list[KVEntry]]:
        return index + 1, [e for k, e in sorted(self.kv.items()) if k.startswith(prefix)]


@pytest.mark.parametrize("present", [False, True])
def test_key_watch_marks_the_modify_index(present: bool) -> None:
    consul = FakeConsul()
    if present:
        consul.kv["a/k"] = entry("a/k", 42)
    fetch = key_watch(consul, "a/k")  # type: ignore[arg-type]
    assert fetch(5) == (6, 42 if present else None)


def test_prefix_watch_marks_keys_and_indexes() -> None:
    consul = FakeConsul()
    consul.kv["m/a"] = entry("m/a", 3)
    fetch = prefix_watch(consul, "m/")  # type: ignore[arg-type]
    first = fetch(0)[1]
    assert fetch(1)[1] == first  # nothing under the prefix changed: same marker
    consul.kv["m/a"] = entry("m/a", 9)
    assert fetch(2)[1] != first


def test_a_once_watch_ends_after_its_wake_and_asks_no_more() -> None:
    stop = threading.Event()
    wakes: list[float] = []
    script = Script([(10, None), (12, 12), (13, 12), (14, 14)], stop)
    w = Watch("test", script, lambda: wakes.append(1.0), stop, quiet=True, once=True)
    w.start()
    w.join(5)
    assert not w.is_alive(), "a once watch ends after it woke the loop"
    assert len(wakes) == 1
    assert script.asked == [0, 10]  # no blocking query asked again after the key appeared
    stop.set()


def test_a_watch_starts_from_the_index_it_is_given() -> None:
    stop = threading.Event()
    script = Script([(31, 31)], stop)
    assert run(script, stop, start=30) == 1
    assert script.asked[0] == 30


def test_a_stopped_watch_does_not_bring_a_dropped_key_back() -> None:
    consul = FakeConsul()
    consul.kv["d/1"] = entry("d/1", 5)
    cache = WatchCache()
    stop = threading.Event()
    fetch = key_watch(consul, "d/1", cache, stop)  # type: ignore[arg-type]
    fetch(0)
    assert cache.get("d/1") == consul.kv["d/1"]
    stop.set()
    cache.drop("d/1")
    fetch(1)  # the last answer of a watch that was stopped meanwhile
    assert cache.get("d/1") is _MISSING
