"""The live view: one Consul blocking-query watcher per app, fanned out to every SSE client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watcher.barrier import DeployStore
from watcher.errors import ConsulError, PayloadError
from watcher.log import get_logger

log = get_logger(module="web.live")

BLOCK_WAIT = 30.0  # seconds a blocking query may wait (Consul adds its own jitter)
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # back-off while Consul is unreachable
CLIENT_QUEUE = 16  # snapshots a slow SSE client may lag behind before older ones are dropped
# Reads of an app (each one a snapshot to every page) are paced by a token bucket: up to
# READ_BURST without a pause (a deploy's start, acks and flips come within a few hundred ms,
# and the pages show each), then READ_RATE a second while changes keep coming. A host's
# token can rewrite its own record as often as it likes: without this the feed read and
# rendered the app once per write (the pages space their own fetches, in app.js).
READ_BURST, READ_RATE = 20, 10.0


def wait_for_change(store: DeployStore, index: int, wait: float) -> int:
    """THE one blocking call of the live view: return when any key of the app changes (or
    after ``wait`` seconds), with the index to pass next time.

    It blocks on the names of the app's keys: KV layout 2 spreads a deploy over
    ``requests/``, every host's ``progress/<node>/``, ``decisions/`` and ``outcomes/``, and
    what the page's other sections show changes elsewhere (a watcher's member key going
    with its session, a host record, a new build, ``history``). A list of names (one level:
    Consul's index covers the whole tree), never values, so one wake-up costs little; an
    idle app changes nothing, and nothing but this function names a key.
    """
    new_index, _ = store.consul.kv_keys_blocking(store.keys.base + "/", index, wait)
    return new_index


Snapshot = dict[str, Any]


@dataclass(frozen=True)
class Published:
    """A snapshot and its server-sent event, encoded once for every client."""

    snapshot: Snapshot
    event: str

    @classmethod
    def of(cls, snap: Snapshot) -> Published:
        data = json.dumps(snap, separators=(",", ":"))
        return cls(snap, f"event: live\ndata: {data}\n\n")


class LiveFeed:
    """One thread per app: read, publish to subscribers, block until something changes."""

    def __init__(
        self,
        app: str,
        store: DeployStore,
        read: Callable[[DeployStore], Snapshot],
        *,
        wait: float = BLOCK_WAIT,
    ) -> None:
        self.app = app
        self.store = store
        self._read = read
        self._wait = wait
        self._lock = threading.Lock()
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Published]]] = set()
        self._latest: Published | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wakeups = 0  # blocking queries that returned (for tests and the curious)

    # --- subscribers (called from the event loop) ----------------------------------------

    def subscribe(self) -> asyncio.Queue[Published]:
        queue: asyncio.Queue[Published] = asyncio.Queue(CLIENT_QUEUE)
        loop = asyncio.get_running_loop()
        with self._lock:
            self._subscribers.add((loop, queue))
            latest = self._latest
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name=f"live-{self.app}", daemon=True
                )
                self._thread.start()
        if latest is not None:
            queue.put_nowait(latest)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Published]) -> None:
        with self._lock:
            self._subscribers = {s for s in self._subscribers if s[1] is not queue}

    def stop(self) -> None:
        self._stop.set()

    def wake_subscribers(self) -> None:
        """Give every subscriber the latest snapshot again (from any thread): a stream's
        loop then looks whether the server is closing."""
        with self._lock:
            item = self._latest
            targets = list(self._subscribers)
        if item is None:
            item = Published({}, "")
        for loop, queue in targets:
            with contextlib.suppress(RuntimeError):  # that client's loop is closed
                loop.call_soon_threadsafe(_offer, queue, item)

    # --- the watcher thread ---------------------------------------------------------------

    def _publish(self, snap: Snapshot) -> None:
        item = Published.of(snap)
        with self._lock:
            self._latest = item
            targets = list(self._subscribers)
        for loop, queue in targets:
            with contextlib.suppress(RuntimeError):  # that client's loop is closed
                loop.call_soon_threadsafe(_offer, queue, item)

    def _run(self) -> None:
        try:
            self._watch()
        except Exception as exc:  # outside the reads; the next subscriber starts a new thread
            log.exception("live_view_failed", app=self.app, error=repr(exc))
            self._publish(
                {
                    "app": self.app,
                    "consul": {
                        "ok": False,
                        "error": f"live view failed: {exc!r}",
                        "unreachable": False,
                    },
                    "html": "",
                }
            )

    def _watch(self) -> None:
        index = 0
        delay = RETRY_MIN
        last: Snapshot | None = None
        tokens, filled_at = float(READ_BURST), time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            tokens = min(float(READ_BURST), tokens + (now - filled_at) * READ_RATE)
            filled_at = now
            if tokens < 1.0 and self._stop.wait((1.0 - tokens) / READ_RATE):
                break
            tokens -= 1.0  # (negative after a wait: refilled from the wait's start)
            try:
                snap = self._read(self.store)
            except Exception as exc:
                # Consul away, a record no parser refused, a reader's bug: the open pages
                # are told, and the feed goes on trying (it used to end here, and pages
                # already open stayed on a dead feed after the cause was gone).
                known = isinstance(exc, ConsulError | PayloadError)
                error = str(exc) if known else f"live view failed: {exc!r}"
                # "unreachable": Consul did not answer (the page says so); else it answered
                # and the app's records could not be read or shown.
                unreachable = isinstance(exc, ConsulError)
                consul = {"ok": False, "error": error, "unreachable": unreachable}
                snap = {"app": self.app, "consul": consul, "html": ""}
                if snap != last:
                    if known:
                        log.warning("live_view_consul_error", app=self.app, error=error)
                    else:
                        log.exception("live_view_read_failed", app=self.app, error=repr(exc))
                    self._publish(snap)
                    last = snap
                self._stop.wait(delay)  # back-off before the next try, not a poll of KV
                delay = min(delay * 2, RETRY_MAX)
                index = 0
                continue
            if snap != last:
                self._publish(snap)
                last = snap
            try:
                new_index = wait_for_change(self.store, index, self._wait)
            except ConsulError as exc:
                # The reads answered but the blocking query did not (e.g. a token without
                # list): back off as for a failed read, never a tight loop of reads.
                log.warning("live_view_watch_error", app=self.app, error=str(exc))
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                index = 0
                continue
            self.wakeups += 1
            delay = RETRY_MIN  # a read and a blocking query answered: Consul is back
            # Consul may reset an index (snapshot restore): start over from 0 then.
            index = new_index if new_index >= index else 0


def _offer(queue: asyncio.Queue[Published], item: Published) -> None:
    """Queue a snapshot; a client that lags drops its oldest (only the newest matters)."""
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(item)
