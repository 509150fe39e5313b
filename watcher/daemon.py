"""`watcher run`: the daemon's loop, signals, Consul session, watches and events.

Threads: the main loop (reconciles every app on each wake-up or tick), the session keeper
(renews well inside the TTL, so slow work never starves it), one blocking-query watch per
small key (``inflight``, ``current``, ``members/``, and ``deploys/<id>/`` of the deploy in
flight), the event watcher, one worker per app for staging/hooks/flips, and a prefetch pool.
Signal handlers only set flags.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from watcher import __version__
from watcher.agent import AppAgent
from watcher.artifacts import ArtifactCache
from watcher.barrier import DeployStore
from watcher.config import Config, load_config
from watcher.consul_api import ConsulClient, ConsulEvent, KVEntry
from watcher.errors import (
    ConfigError,
    ConsulError,
    ConsulPermissionDenied,
    ConsulTLSError,
    ConsulUnavailable,
    LockTimeout,
    PayloadError,
    WatcherError,
)
from watcher.events import EVENT_NAMES, EventRequest, HandledEvents, parse_event
from watcher.fsutil import INSTANCE_LOCK, WATCHER_RUN_OWNER, AppLock, atomic_write_json
from watcher.health import HealthServer, HealthState, Metrics
from watcher.hooks import running_hooks
from watcher.ids import one_line
from watcher.log import Repeats, get_logger
from watcher.notify import SystemdNotifier
from watcher.records import ABORT, MemberRecord, iso, utcnow, watcher_session_name
from watcher.releases import AppLayout, ReleaseEngine
from watcher.s3 import S3Store
from watcher.webhook import DRAIN_AT_STOP, WebhookSender, notifier_for

TICK = 1.0  # seconds between reconciles while a deploy is in flight (deadlines, retries)
TICK_IDLE = 15.0  # ... and when idle: watches wake the loop on every change that matters
WATCH_WAIT = 20.0  # blocking query wait
# At a stop, while a step runs its hooks: systemd's stop timeout, asked for anew every
# third of it (EXTEND_TIMEOUT_USEC counts from when systemd reads it).
STOP_EXTEND = 30.0
FIRST_SESSION_WAIT = 15.0  # seconds the loop waits at start for the first session attempt
ACK_WATCH_SETTLE = 0.1  # seconds the coordinator lets acks gather before it looks again
LOOP_RETRY_DEADLINE = 2.0  # seconds a Consul call of the daemon retries before giving up
HEARTBEAT_LOG = 60.0  # an unchanged cycle outcome is logged again after this long
_COUNTDOWN = re.compile(r"retry in \d+s")
REFUSED_RETRY = 10.0  # seconds between asks while Consul refuses the token (start, session)
STATUS_FILE = "status.json"
SESSION_FILE = "session.json"
STATUS_HEARTBEAT = 10.0  # seconds between rewrites of status.json when nothing changed
# While a deploy runs, status.json is rewritten at most this often: a host's state changes
# ~8 times in a deploy, and on a VM each rewrite after a wake-up costs ~0.8 ms of CPU. A
# change held back is written by the next cycle (at most TICK away while active), and at
# once when the daemon goes idle.
STATUS_MIN_INTERVAL = 0.5
FIRST_INDEX_FILE = "first_index.json"
OLD_EVENTS_FILE = "events.json"  # no longer written
#: How this host handled an event (``watcher_events_handled_total{result}``): it did what
#: the event asks (started the prefetch, woke the loop, started the deploy), another host
#: had started its deploy, the fleet had already acted on a later event, the deploy could
#: not start (unknown artifact, one in flight), Consul failed meanwhile, the event does
#: not parse. Its ``name`` label is the event's name, or "other" for a name no daemon
#: handles (any agent can fire one: never a label of its own).
EVENT_ACTED, EVENT_DUPLICATE, EVENT_HISTORY = "acted", "duplicate", "history"
EVENT_REFUSED, EVENT_FAILED, EVENT_INVALID = "refused", "failed", "invalid"
# What the log says of a `deploy` event that names a deploy id (the one `watcherctl`
# fires after its KV write): a wake-up, not a deploy; nothing looks the id up (it said
# "woken", which read as if the deploy it named had been acted on).
DOORBELL = "a wake-up only: the loop reads inflight (what is in flight, whatever id it names)"
_STARTED_AS = {
    "started": EVENT_ACTED,
    "exists": EVENT_DUPLICATE,
    "history": EVENT_HISTORY,
    "unknown artifact": EVENT_REFUSED,
    "refused": EVENT_REFUSED,
}

log = get_logger(component="daemon")


class Flags:
    """Set by signal handlers; read by the loop."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.wake = threading.Event()


class SessionKeeper(threading.Thread):
    """Owns this daemon's Consul session: reuse after a restart, renew, recreate when lost."""

    def __init__(
        self,
        consul: ConsulClient,
        node: str,
        ttl: float,
        state_dir: Path,
        health: HealthState,
        metrics: Metrics,
        on_change: Callable[[], None],
        give_up: Callable[[], bool] = lambda: False,
        on_renew_failed: Callable[[], None] = lambda: None,
        on_reused: Callable[[str], None] = lambda session_id: None,
        kv_prefix: str = "",
    ) -> None:
        super().__init__(name="session", daemon=True)
        self.kv_prefix = kv_prefix
        self.give_up = give_up
        self.on_reused = on_reused
        self.on_renew_failed = on_renew_failed
        self.consul = consul
        self.node = node
        self.ttl = ttl
        # The TTL of the session held: a reused one keeps the TTL it was made with (a
        # restart that raised session_ttl renews it as often as that one needs).
        self.held_ttl = ttl
        self.path = state_dir / SESSION_FILE
        self.health = health
        self.metrics = metrics
        self.on_change = on_change
        self.stopping = threading.Event()
        self._id: str | None = None
        self._reused: str | None = None  # the session obtain() reused, for on_reused
        # Set once the first attempt to obtain a session is over (reused, created or failed).
        self.first_attempt = threading.Event()
        try:
            saved_first = json.loads(self.path.with_name(FIRST_INDEX_FILE).read_text())
            self.first_index = int(saved_first["first_index"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            self.first_index = 0
        self._lock = threading.Lock()
        # The failure logged last, (creating, error): said again only after a while.
        self._said = Repeats(HEARTBEAT_LOG)

    @property
    def session_id(self) -> str | None:
        with self._lock:
            return self._id

    def _set(self, session_id: str | None) -> None:
        with self._lock:
            self._id = session_id

    def obtain(self) -> str:
        """Reuse the session kept in state_dir while Consul still knows it, else create one."""
        try:
            saved = json.loads(self.path.read_text())
            kept, kept_on = str(saved["id"]), str(saved["consul_node"])
            # Made for another node name or KV prefix (the config changed across the
            # restart): its member keys and the deploys that name it are the old
            # identity's; reused, this watcher would hold them as if it were still that.
            other = [
                f"{field} {saved[field]!r}"
                for field, now in (("node", self.node), ("kv_prefix", self.kv_prefix))
                if field in saved and saved[field] != now
            ]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            kept, kept_on, other = "", "", []
        if kept and other:
            log.warning(
                "session_not_reused",
                session=kept,
                reason=f"made for {', '.join(other)}; this watcher runs with node "
                f"{self.node!r} and kv_prefix {self.kv_prefix!r}",
            )
            self._abandon(kept)
            kept = ""
        if kept:
            # Consul's node of the session (the agent's name, which `node:` in the config
            # may override for the fleet), so compare with what it was created on.
            # Consistent: a stale "no such session" would make this daemon abandon one
            # that still holds its member key and is named in a deploy it could resume.
            info = self.consul.session_info(kept, consistent=True)
            if info and info.get("Node") == kept_on and self.consul.session_renew(kept):
                log.info("session_reused", session=kept)
                self._note_first_index(info)
                self._reused = kept
                self.held_ttl = min(self.ttl, _ttl_seconds(info.get("TTL")) or self.ttl)
                if saved.get("kv_prefix") != self.kv_prefix:
                    # An older version's file: say whose it is now, so that a later change
                    # of prefix is seen (a reused session may live on for many deploys).
                    with contextlib.suppress(OSError):
                        atomic_write_json(self.path, {**saved, "kv_prefix": self.kv_prefix})
                return kept
            self._abandon(kept)
        session_id = self.consul.session_create(
            watcher_session_name(self.node, self.kv_prefix),
            self.ttl,
            behavior="delete",
            lock_delay=0,
        )
        self.held_ttl = self.ttl
        info = self.consul.session_info(session_id) or {}
        self._note_first_index(info)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.path,
            {
                "id": session_id,
                "node": self.node,
                "kv_prefix": self.kv_prefix,
                "consul_node": info.get("Node", ""),
                "created_at": iso(utcnow()),
            },
        )
        log.info("session_created", session=session_id, ttl_s=self.ttl)
        return session_id

    def _after_reuse(self) -> None:
        """``on_reused`` of the session ``obtain`` reused, once the session is the daemon's
        (the loop may resume a deploy with it meanwhile), on a thread of its own: its
        Consul requests (one per app in KV) must not hold back this thread's renewals.
        What goes wrong there is said, never retried in a loop."""
        session_id, self._reused = self._reused, None
        if session_id is None:
            return

        def run() -> None:
            try:
                self.on_reused(session_id)
            except Exception as exc:  # a clean-up: the session stands whatever happens
                log.error("after_session_reuse_failed", session=session_id, error=repr(exc))

        threading.Thread(target=run, name="after-session-reuse", daemon=True).start()

    def _abandon(self, session_id: str) -> None:
        """Destroy a session of this daemon's that it will not use again. One that still
        exists (a renewal answered 404 while a restarted server was replaying its log, a
        kept id on another agent) would hold the member key until its TTL ran out, and
        every deploy made meanwhile would name it, so this host would refuse them all."""
        try:
            self.consul.session_destroy(session_id)
            log.info("session_abandoned", session=session_id)
        except ConsulError as exc:
            log.warning("session_not_abandoned", session=session_id, error=str(exc))

    def _lost(self, session_id: str) -> bool:
        """Whether a session whose renewal answered 404 is really gone: a consistent read
        is proof (Consul serves none before its leader has replayed its log), a renewal
        is not (a server restarted a moment ago answers it from a state still loading)."""
        if self.consul.session_info(session_id, consistent=True) is None:
            return True
        log.warning("session_renew_not_found_but_alive", session=session_id)
        return False

    def _note_first_index(self, info: dict[str, Any]) -> None:
        """Remember the CreateIndex of this watcher's first session (DESIGN.md 6.4.5: a host
        that existed when a deploy was made and is not expected in it was left out)."""
        index = int(info.get("CreateIndex") or 0)
        if index and (self.first_index == 0 or index < self.first_index):
            self.first_index = index
            with contextlib.suppress(OSError):
                atomic_write_json(self.path.with_name(FIRST_INDEX_FILE), {"first_index": index})

    def run(self) -> None:
        while not self.stopping.is_set():
            # Every TTL/2 (of the session held), as Consul's own Go API renews: Consul keeps
            # a session at least its TTL past the last renewal, so one failed renewal still
            # leaves time for another.
            interval = max(self.held_ttl / 2.0, 0.3)
            try:
                current = self.session_id
                if current is not None and self.give_up():
                    # Not acked by the prepare deadline + grace: let the session die so
                    # the deploy's abort clause fires, whatever the loop is stuck on.
                    log.warning("session_given_up", session=current, reason="prepare deadline")
                    self.consul.session_destroy(current)
                    self.path.unlink(missing_ok=True)
                    self._set(None)
                    self.on_change()
                    continue
                if current is None:
                    self._reused = None
                    try:
                        self._set(self.obtain())
                    finally:
                        self.first_attempt.set()
                    self.health.session_ok(str(self.session_id))
                    self.on_change()
                    self._after_reuse()
                elif not self.consul.session_renew(current):
                    if not self._lost(current):
                        self.stopping.wait(min(1.0, interval))  # renew again soon
                        continue
                    log.warning("session_lost", session=current)
                    self.health.session_lost(f"session {current} invalidated by Consul")
                    self.path.unlink(missing_ok=True)
                    self._set(None)
                    self.on_change()
                    continue
                else:
                    self.health.session_ok(current)
            except Exception as exc:  # ConsulError, or anything: the keeper must not die
                self.metrics.session_renew_failures.inc()
                refused = isinstance(exc, ConsulPermissionDenied)
                self._say_failure(exc, refused=refused)
                if (
                    isinstance(exc, ConsulError)
                    and self.session_id is not None
                    and self.health.renewal_failed(
                        exc.started_at or time.monotonic(), one_line(str(exc)), self.held_ttl
                    )
                ):
                    self.on_change()  # the loop rewrites status.json: `status` shows it
                if self.session_id is None:
                    # /health and `watcherctl status` say why this host cannot join (Consul
                    # refusing the TTL or the token), not only "no session yet".
                    self.health.session_lost(f"no Consul session: {one_line(str(exc))}")
                # The loop may itself wait out a call to the same agent: status.json must
                # not lag /health by that long (it turns undecided by time, undecided_after
                # past the first failure, with no other wake-up).
                try:
                    self.on_renew_failed()
                except Exception as report_exc:  # a report must never stop the renewals
                    log.warning("status_not_written", error=str(report_exc))
                # A token Consul refuses for a new session stays refused until an operator
                # changes it: asked again every 10 s, not every second. Not a held session's
                # renewal: a refusal there may pass (an agent cut off from the servers under
                # ACL down_policy deny), and the session lapses at twice its TTL.
                creating = self.session_id is None
                self.stopping.wait(REFUSED_RETRY if refused and creating else min(1.0, interval))
                continue
            self._said.clear()
            self.stopping.wait(max(self.held_ttl / 2.0, 0.3))

    def _say_failure(self, exc: Exception, *, refused: bool) -> None:
        """Log a failed create or renewal; the same error again only once a minute (a token
        Consul refuses would otherwise fill the journal a line a second)."""
        creating = self.session_id is None
        if not self._said.news((creating, str(exc))):
            return
        event = "session_create_failed" if creating else "session_renew_failed"
        if refused and creating:
            log.error(
                event,
                error=str(exc),
                note="Consul refused this watcher's token: it joins no deploy until the "
                f"token may write a session on node {self.node} (docs/acl.md); asked again "
                f"every {REFUSED_RETRY:g}s",
            )
        elif refused:
            log.error(
                event,
                error=str(exc),
                note="Consul refused this watcher's token to renew its session "
                "(docs/acl.md); asked again within a second; Consul drops the session "
                f"~{2 * self.ttl:g}s after its last renewal, and this host then takes part "
                "in no deploy until it holds a new one",
            )
        else:
            log.warning(event, error=str(exc))

    def destroy(self) -> None:
        session_id = self.session_id
        self.stopping.set()
        if session_id is None:
            return
        try:
            self.consul.session_destroy(session_id)
            self.path.unlink(missing_ok=True)
            log.info("session_destroyed", session=session_id)
        except ConsulError as exc:
            log.warning("session_not_destroyed", session=session_id, error=str(exc))


class Watch(threading.Thread):
    """Wakes the loop whenever what a blocking query on one small key (or prefix) returns
    changes.

    ``fetch(index)`` returns the next index and a marker of what matters (a key's
    ModifyIndex, None while it is missing). Consul answers a blocking query on a missing
    key whenever any KV write moves the table's index, so the index alone would wake the
    loop for every write of a busy deploy; the marker wakes it only when the key itself
    changed. A ``quiet`` watch takes a missing key at its first read as what the loop
    already knows (a decision the loop has just found undecided), so only the key's
    appearance wakes it; any other watch wakes the loop once with its first read. With
    ``settle``, the watch waits that long after a wake before it asks again. A ``once``
    watch ends after its first wake: a decision or an abort request is written once, and
    a blocking query asked again after it came would only cost a request.
    """

    def __init__(
        self,
        name: str,
        fetch: Callable[[int], tuple[int, object]],
        wake: Callable[[], None],
        stopping: threading.Event,
        *,
        quiet: bool = False,
        settle: float = 0.0,
        once: bool = False,
        start: int = 0,
    ) -> None:
        super().__init__(name=f"watch {name}", daemon=True)
        self.fetch = fetch
        self.wake = wake
        self.stopping = stopping
        self.quiet = quiet
        self.settle = settle
        self.once = once
        self.start_index = start  # an index already seen: the first answer is news

    def run(self) -> None:
        index = self.start_index
        seen: object = None if self.quiet else _MISSING
        while not self.stopping.is_set():
            try:
                index, marker = self.fetch(index)
            except Exception as exc:  # a watch thread must not die: back off and retry
                if not isinstance(exc, ConsulError):
                    log.warning("watch_failed", watch=self.name, error=repr(exc))
                index = 0
                self.stopping.wait(1.0)
                continue
            if self.stopping.is_set():
                return
            if marker != seen:
                seen = marker
                self.wake()
                if self.once:
                    return
                if self.settle:
                    # Writes that land meanwhile come back in one answer, not one each.
                    self.stopping.wait(self.settle)


class WatchCache:
    """What the watches last read, so the loop acts on it without reading it again: a
    daemon that waits costs Consul nothing but its blocking queries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}

    def put(self, key: str, value: Any, *, unless: threading.Event | None = None) -> None:
        """Keep ``value`` for ``key``, unless ``unless`` is set: a stopped watch whose last
        answer comes after its key was dropped must not bring the key back."""
        with self._lock:
            if unless is None or not unless.is_set():
                self._values[key] = value

    def get(self, key: str) -> Any:
        with self._lock:
            return self._values.get(key, _MISSING)

    def drop(self, key: str) -> None:
        with self._lock:
            self._values.pop(key, None)


_MISSING = object()


def key_watch(
    consul: ConsulClient,
    key: str,
    cache: WatchCache | None = None,
    stop: threading.Event | None = None,
) -> Callable[[int], tuple[int, object]]:
    def fetch(index: int) -> tuple[int, object]:
        new, entry = consul.kv_get_blocking(key, index, WATCH_WAIT)
        if cache is not None:
            cache.put(key, entry, unless=stop)
        return new, entry.modify_index if entry is not None else None

    return fetch


def prefix_watch(
    consul: ConsulClient, prefix: str, cache: WatchCache | None = None
) -> Callable[[int], tuple[int, object]]:
    def fetch(index: int) -> tuple[int, object]:
        new, entries = consul.kv_list_blocking(prefix, index, WATCH_WAIT)
        if cache is not None:
            cache.put(prefix, entries)
        return new, tuple((e.key, e.modify_index) for e in entries)

    return fetch


def keys_watch(consul: ConsulClient, prefix: str) -> Callable[[int], tuple[int, object]]:
    """A watch on the key names under ``prefix``: wakes on any write there, carries little
    (an ack rewritten in place changes the index, not the names: the index is the marker)."""

    def fetch(index: int) -> tuple[int, object]:
        new, _ = consul.kv_keys_blocking(prefix, index, WATCH_WAIT)
        return new, new

    return fetch


class EventWatcher(threading.Thread):
    """Blocking queries on the local agent's event list; new events go to the loop's queue.

    Events already buffered when the daemon starts are history, not commands: KV says
    whether anything is still pending.
    """

    def __init__(
        self,
        consul: ConsulClient,
        handled: HandledEvents,
        out: queue.Queue[ConsulEvent],
        wake: Callable[[], None],
        stopping: threading.Event,
    ) -> None:
        super().__init__(name="events", daemon=True)
        self.consul = consul
        self.handled = handled
        self.out = out
        self.wake = wake
        self.stopping = stopping
        self.max_ltime = 0  # the highest Lamport time of any event this agent showed us

    def run(self) -> None:
        index: str | None = None
        failing = Repeats()  # the error said last, until the watch works again
        while not self.stopping.is_set():
            try:
                if index is None:
                    index, events = self.consul.event_list()
                    self.max_ltime = max([self.max_ltime, *(e.ltime for e in events)])
                    self.handled.add(e.id for e in events)
                    log.info("events_primed", buffered=len(events))
                    continue
                new_index, fresh = self.consul.event_list(
                    index=index, wait=WATCH_WAIT, skip=self.handled
                )
            except Exception as exc:  # Consul unreachable, or anything: retry
                # Said once while it lasts, and again when it changes: a refused token or
                # a stopped agent logged a line a second for as long (the ACL review).
                if failing.news(str(exc)):
                    log.warning("event_watch_failed", error=str(exc), retry_every="1s")
                self.stopping.wait(1.0)
                continue
            if failing.clear():
                log.info("event_watch_recovered")
            if new_index == index:
                continue
            index = new_index
            # Handled events (every one seen so far) are left out of the answer undecoded.
            self.max_ltime = max([self.max_ltime, *(e.ltime for e in fresh)])
            if fresh:
                self.handled.add(e.id for e in fresh)
                # In Lamport order: the agent lists events as gossip brought them, and one
                # handled first would make an older one of the batch "history" (events_seen).
                for event in sorted(fresh, key=lambda e: e.ltime):
                    self.out.put(event)
                self.wake()


def inflight_of(entry: Any) -> tuple[str | None, int]:
    """``DeployStore.inflight()`` from a watched entry."""
    if entry is None or not entry.value:
        return None, 0
    return entry.value.decode(errors="replace").strip() or None, int(entry.modify_index)


class Daemon:
    """One watcher process."""

    def __init__(self, config: Config, *, config_path: str | None = None) -> None:
        self.config = config
        # What the settings a reload cannot change were at start: a reload compares with
        # these, not with the file it loaded last (a second reload said nothing of what
        # still needed a restart, and a file put back as it was running got a warning).
        self.started_config = config
        # The last reload, for status.json: when, its error (the daemon keeps the config it
        # had), and the changed settings that wait for a restart. None: never reloaded.
        self._reloaded: dict[str, Any] | None = None
        self.config_path = config_path
        self.flags = Flags()
        self.metrics = Metrics()
        self.health = HealthState(
            undecided_after=config.daemon.undecided_after, metrics=self.metrics
        )
        self.notifier = SystemdNotifier()
        # A short retry deadline: a Consul outage must not stall the loop (and its watchdog
        # pings) for the client's default 10 s per call; the loop retries every tick anyway.
        self.consul = ConsulClient(config.consul, retry_deadline=LOOP_RETRY_DEADLINE)
        self.state_dir = Path(config.daemon.state_dir)
        self._instance_locks: list[AppLock] = []
        self.events: queue.Queue[ConsulEvent] = queue.Queue()
        self.agents: dict[str, AppAgent] = {}
        self.keeper: SessionKeeper | None = None
        self.event_watcher: EventWatcher | None = None
        self.node = ""
        self._deploy_watch: dict[str, dict[str, threading.Event]] = {}
        self.cache = WatchCache()
        self._member_refused: dict[str, str] = {}  # app -> the session said to hold its key
        self._refusal_said: dict[str, str] = {}  # app -> the token refusal logged last
        self._prefetch = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefetch")
        self._prefetches: set[Future[None]] = set()  # queued or running
        self._last_line = ""
        self._cycle_said = Repeats(HEARTBEAT_LOG)  # the line logged last, its countdown left out
        # Senders a reload replaced, with messages still queued: a stop drains them too.
        self._retired: list[tuple[str, WebhookSender]] = []
        self._status_written = 0.0  # the last heartbeat rewrite
        self._status_at = -STATUS_MIN_INTERVAL  # the last rewrite of any kind
        self._status_held = False  # a change not written yet (STATUS_MIN_INTERVAL)
        self._status_said: tuple[Any, ...] = ()
        # The loop writes status.json; the session keeper too, while renewals fail.
        self._status_lock = threading.Lock()
        self._status_closed = False
        self._stopping_at = ""  # when the stop began: status.json says it until the end
        self._wake_lock = threading.Lock()
        self._dirty = False  # a wake-up other than an event's since the last cycle
        self._signal_fd = -1  # the handlers' end of the pipe to the signal relay
        self._stop_asked = False  # SIGTERM/SIGINT, set by the handler itself
        self._woken_by_signal = False  # SIGUSR1 since the loop last said so

    # --- signals ----------------------------------------------------------------------

    def _install_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads, SIGUSR1 makes the loop look now (what
        `watcherctl hold` sends, so the host record shows a hold at once, not at the tick).

        Installed before the instance locks are taken: `watcherctl` signals only the holder
        of ``daemon.lock``, and SIGUSR1's default action would end a daemon not yet able to
        take it. The handler runs in the main thread between any two bytecodes, perhaps
        while that thread holds the lock inside an Event of ``Flags``: it only writes the
        signal's number down a pipe, and a thread of its own sets the flags."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write_fd, False)
        self._signal_fd = write_fd
        threading.Thread(
            target=self._relay_signals, args=(read_fd,), name="signals", daemon=True
        ).start()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            # Also a plain attribute, which the loop reads at its next wake-up or tick:
            # a stop must not depend on the pipe having room or on the relay.
            self._stop_asked = True
        # OSError: the pipe is full (a storm of signals), and the relay has work queued
        with contextlib.suppress(OSError):
            os.write(self._signal_fd, bytes([signum]))

    def _relay_signals(self, read_fd: int) -> None:
        """The flags for each signal the handler passed on. Nothing here writes a log
        line or may end this thread (a log write can block on a stalled journal, or fail):
        the loop says what woke it."""
        while True:
            try:
                received = os.read(read_fd, 4096)
            except OSError:  # EINTR is retried by Python; anything else would repeat
                return  # (a stop still reaches the loop: ``_stop_asked``)
            if not received:
                return
            if signal.SIGUSR1 in received:
                self._woken_by_signal = True
                self.wake()
            if signal.SIGHUP in received:
                self.flags.reload.set()
            if signal.SIGTERM in received or signal.SIGINT in received:
                self.flags.stop.set()
            self.flags.wake.set()

    def wake(self) -> None:
        """Something the loop acts on changed (a watch, a task, a timer): reconcile."""
        with self._wake_lock:
            self._dirty = True
            self.flags.wake.set()

    def _event_wake(self) -> None:
        """An event arrived: the cycle handles it, and reconciles only if it asked for
        that (the `deploy` event `watcherctl` fires after its KV write changes nothing the
        watches have not already reported)."""
        self.flags.wake.set()

    # --- start ------------------------------------------------------------------------

    def _resolve_node(self) -> str:
        if self.config.node:
            return self.config.node
        delay = 0.5
        refused_said = False
        while not self.flags.stop.is_set():
            try:
                return self.consul.agent_node_name()
            except ConsulPermissionDenied as exc:
                # Consul answered: its name for this node is what the token may not read.
                if not refused_said:
                    refused_said = True
                    log.error(
                        "consul_token_refused_at_start",
                        error=str(exc),
                        note="the watcher asks its Consul agent for the node name when the "
                        "config sets no `node:`; set it, or give the token `agent` read on "
                        f"its node (docs/acl.md); asked again every {REFUSED_RETRY:g}s",
                    )
                self.flags.stop.wait(REFUSED_RETRY)
            except ConsulError as exc:
                log.warning("consul_unreachable_at_start", error=str(exc), retry_in_s=delay)
                self.flags.stop.wait(delay)
                delay = min(delay * 2, 10.0)
        return ""

    def _build_agents(self) -> None:
        store = S3Store(self.config.s3)
        for name, app in self.config.apps.items():
            cache = ArtifactCache(
                app.app_dir,
                store,
                max_bytes=app.artifact_cache_bytes,
                timeout=app.timeouts.download,
                app=name,
                on_bytes=self.metrics.artifact_download_bytes.labels(app=name).inc,
                on_fetched=self.metrics.artifact_fetch_seconds.labels(app=name).observe,
            )
            engine = ReleaseEngine(app, cache)
            agent = AppAgent(
                self.config,
                app,
                engine,
                DeployStore(self.consul, self.config.kv_prefix, name),
                self.node,
                session=self._session_id,
                metrics=self.metrics,
                health=self.health,
                first_index=lambda: self.keeper.first_index if self.keeper else 0,
                wake=self.wake,
            )
            with engine.lock(owner="watcher start"):
                for action in engine.recover(deploy_in_flight=agent.journal.read() is not None):
                    log.info("recovered", app=name, action=action)
            self.metrics.set_current_release(name, engine.current_release())
            agent.check_prune()
            self.agents[name] = agent

    def _session_id(self) -> str | None:
        return self.keeper.session_id if self.keeper else None

    def _leave_departed_apps(self, session: str) -> None:
        """The session kept across a restart (a stop with a deploy in flight, a SIGKILL)
        still holds ``members/<node>`` of any app removed from the config meanwhile: that
        app's fleet would list this host as alive, expect it in every deploy and wait for
        acks it never writes. Its member key goes (its host record stays, for `watcherctl
        gc APP NODE`). One read of the apps' names and one of each such member key, only
        when a session is reused. A token that may not read them leaves them: said."""
        # The prefix and apps it runs with: a reload's new ones wait for the restart.
        prefix = f"{self.started_config.kv_prefix.strip('/')}/apps/"
        try:
            names, filtered = self.consul.kv_keys_checked(prefix)
        except ConsulError as exc:
            log.warning("departed_apps_not_checked", error=str(exc))
            return
        if filtered:
            log.warning(
                "departed_apps_partly_checked",
                prefix=prefix,
                note="this watcher's token may not list every app: a member key of an app "
                "removed from both this config and this token's policy stays until this "
                "session ends (a stop with no deploy in flight ends it)",
            )
        for name in names:
            app = name.removeprefix(prefix).removesuffix("/")
            if not name.endswith("/") or not app or "/" in app or app in self.agents:
                continue
            key = f"{prefix}{app}/members/{self.node}"
            try:
                entry = self.consul.kv_get(key)
                if entry is None or entry.session != session:
                    continue
                left = self.consul.kv_delete(key, cas=entry.modify_index)
            except ConsulError as exc:
                # Refused by the token: the app stays this host's until the session ends.
                said = log.error if isinstance(exc, ConsulPermissionDenied) else log.warning
                said("member_key_not_released", app=app, key=key, error=str(exc))
                continue
            if left:
                log.info("member_key_released", app=app, key=key, reason="not in the config")
            else:
                log.warning("member_key_not_released", app=app, key=key, error="changed meanwhile")

    def _start_watches(self) -> None:
        stopping = self.flags.stop
        for name, agent in self.agents.items():
            keys = agent.store.keys
            for label, fetch in (
                (f"{name} inflight", key_watch(self.consul, keys.inflight, self.cache)),
                (f"{name} current", key_watch(self.consul, keys.current, self.cache)),
                (f"{name} members", prefix_watch(self.consul, keys.members_prefix, self.cache)),
            ):
                Watch(label, fetch, self.wake, stopping).start()

    def _watch_deploy(self, agent: AppAgent) -> None:
        """Hold blocking queries on the keys the agent's step waits for (its deploy's
        decision and abort request while preparing; the coordinator lock, or, for the
        coordinator, the names of the acks). Small keys only: a host that merely waits
        costs no request until something it waits for changes."""
        name = agent.app.name
        wanted = set(agent.status.watch)
        current = self._deploy_watch.get(name, {})
        for key in set(current) - wanted:
            current.pop(key).set()
            self.cache.drop(key)
        for key in sorted(wanted - set(current)):
            stop = threading.Event()
            if key.endswith("/"):  # the coordinator's acks: one look per burst of writes
                # From the index of its own last write (it read everything up to there).
                fetch = keys_watch(self.consul, key)
                Watch(
                    f"{name} {key}",
                    fetch,
                    self.wake,
                    stop,
                    settle=ACK_WATCH_SETTLE,
                    start=agent.status.watch_index,
                ).start()
            else:
                # A decision or an abort request: written once, so only its appearance is
                # news, and the watch ends there. (A waiting host watches the decision key
                # only after a while: the decider's mark on its member key wakes it first.)
                fetch = key_watch(self.consul, key, self.cache, stop)
                Watch(f"{name} {key}", fetch, self.wake, stop, quiet=True, once=True).start()
            current[key] = stop
        self._deploy_watch[name] = current

    # --- the loop ---------------------------------------------------------------------

    def _hold_instance_locks(self) -> list[AppLock]:
        """One daemon per state_dir and per app root, for the life of the process (the
        kernel drops the locks with it, even on SIGKILL). A second `watcher run` with the
        same config would reuse this one's session, take part in its deploys a second time
        and, when stopped, destroy the session this one holds: it stops here, before any
        request to Consul."""
        paths = [(self.state_dir / INSTANCE_LOCK, "the instance lock in daemon.state_dir")] + [
            (
                AppLayout.for_app(app).state_dir / INSTANCE_LOCK,
                f"the instance lock under apps.{name}.root",
            )
            for name, app in self.config.apps.items()
        ]
        held: list[AppLock] = []
        for path, what in paths:
            lock = AppLock(path, timeout=0, owner=WATCHER_RUN_OWNER, what=what)
            try:
                lock.acquire()
            except LockTimeout:
                for other in held:
                    other.release()
                holder = lock.holder().split(" ", 1)[0]
                who = f"pid {holder}" if holder.isdigit() else "another process"
                raise WatcherError(
                    f"another watcher ({who}) already runs with {path.parent} "
                    f"(it holds {path}): stop it first (systemctl stop watcher), or give "
                    "this one its own daemon.state_dir and app roots"
                ) from None
            held.append(lock)
        return held

    def run(self) -> int:
        self._install_signals()
        from watcher.daemon_cli import untrusted_app_dirs

        # Before the first write under an app's directory (the instance lock).
        if unsafe := untrusted_app_dirs(self.config):
            raise ConfigError(self.config.source, unsafe)
        self._instance_locks = self._hold_instance_locks()
        # Again, now that the locks made the app directories: one that another user made
        # first (in a sticky root such as /tmp) is that user's.
        if unsafe := untrusted_app_dirs(self.config):
            raise ConfigError(self.config.source, unsafe)
        # Bound before anything else is asked or made (Consul's node name, each app's
        # directories): a port in use refuses the start with nothing created but the locks.
        server = None
        if self.config.daemon.listen:
            server = HealthServer(
                self.config.daemon.listen, self.health.check, self.metrics, self.health.serving
            )
            try:
                server.start()
            except ConfigError as exc:  # said as every config error: the file, then the key
                raise ConfigError(
                    self.config.source, [f"{exc.source}: {p}" for p in exc.problems]
                ) from None
        self.node = self._resolve_node()
        if not self.node:
            return 0
        log.info(
            "watcher_starting",
            node=self.node,
            version=__version__,
            apps=sorted(self.config.apps),
            consul=self.config.consul.base_url,
        )
        _log_config_warnings(self.config)
        self._build_agents()
        self.keeper = SessionKeeper(
            self.consul,
            self.node,
            self.config.daemon.session_ttl,
            self.state_dir,
            self.health,
            self.metrics,
            self.wake,
            give_up=lambda: any(a.must_give_up_session() for a in self.agents.values()),
            on_renew_failed=self._write_status,
            on_reused=self._leave_departed_apps,
            kv_prefix=self.config.kv_prefix,
        )
        self.keeper.start()
        handled = HandledEvents(self.config.daemon.handled_events_keep)
        with contextlib.suppress(OSError):  # what earlier versions wrote (HandledEvents)
            (self.state_dir / OLD_EVENTS_FILE).unlink(missing_ok=True)
        self.event_watcher = EventWatcher(
            self.consul, handled, self.events, self._event_wake, self.flags.stop
        )
        self.event_watcher.start()
        self._start_watches()
        # A restarted daemon reuses its session: a deploy it resumes before it has it would be
        # refused as "this watcher holds none" (the request names that very session).
        self.keeper.first_attempt.wait(FIRST_SESSION_WAIT)
        # Everything built so far (modules, config, clients) lives as long as the process:
        # out of the collector's sight, a collection scans only what a deploy allocates.
        gc.freeze()
        self.notifier.ready(f"watching {len(self.agents)} app(s)")
        watchdog = self.notifier.watchdog_interval()
        log.info("watcher_ready", node=self.node)
        while not (self.flags.stop.is_set() or self._stop_asked):
            tick = TICK if self._active() or self._status_held else TICK_IDLE
            rechecks = [a.status.recheck_at for a in self.agents.values() if a.status.recheck_at]
            if rechecks:  # an agent waits for a watch, with a deadline of its own
                tick = max(0.0, min(tick, min(rechecks) - time.monotonic()))
            woke = self.flags.wake.wait(tick if watchdog is None else min(tick, watchdog / 2))
            with self._wake_lock:
                self.flags.wake.clear()
                dirty, self._dirty = self._dirty, False
            if self.flags.stop.is_set() or self._stop_asked:
                break
            if self._woken_by_signal:
                self._woken_by_signal = False
                log.info("woken_by_signal", signal="SIGUSR1")
            if self.flags.reload.is_set():
                self.flags.reload.clear()
                self._reload()
                dirty = True
            # A tick (deadlines, retries) or a signal reconciles like any other wake-up.
            self._cycle(reconcile=dirty or not woke)
            self.notifier.watchdog()
        self._shutdown(server)
        return 0

    def _active(self) -> bool:
        """A deploy in flight, a task or prefetch running (status.json shows a download's
        progress), or a loop outcome that needs retrying."""
        return (
            any(
                a.status.deploy or a.busy() or a.status.converge_error for a in self.agents.values()
            )
            or bool(self._prefetches)
            or "unreachable" in self._last_line
        )

    def _download_shown(self) -> bool:
        """A download runs, or status.json still shows one: its progress changes without
        the cycle's line, so status.json is looked at while one runs and once after."""
        shown = self._status_said[2].values() if self._status_said else ()
        return any(
            a.engine.cache is not None and a.engine.cache.busy() for a in self.agents.values()
        ) or any("downloading" in app for app in shown)

    def _cycle(self, *, reconcile: bool = True) -> None:
        parts: list[str] = []
        handled = 0
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            part, needs = self._handle_event(event)
            parts.append(part)
            handled += 1
            reconcile = reconcile or needs
        if reconcile or not handled:
            for name, agent in self.agents.items():
                parts.append(f"{name}: {self._reconcile(agent)}")
        self.health.loop_cycle()
        self.metrics.loop_cycles.inc()
        line = "; ".join(p for p in parts if p)
        now = time.monotonic()
        # A cycle that only dropped bad events says nothing of its own (their `event_dropped`
        # lines did): it logged `"outcome": ""`, then the line before it again.
        changed = bool(line) and line != self._last_line
        # A retry's countdown ("retry in 9s", "8s" ...) is not news: the line logged once a
        # second while Consul refused a token (the ACL review).
        if line:
            if self._cycle_said.news(_COUNTDOWN.sub("retry in", line)):
                log.info("cycle", outcome=line)
            self._last_line = line
        if now - self._status_written > STATUS_HEARTBEAT:
            self._status_written = now
            self._write_status(force=True)
        elif changed or self._status_held or self._download_shown():
            self._write_status()

    def _reconcile(self, agent: AppAgent) -> str:
        name = agent.app.name
        started = time.monotonic()
        try:
            members = self._ensure_member(agent)
            keys = agent.store.keys
            inflight = self.cache.get(keys.inflight)
            current = self.cache.get(keys.current)
            seen = {k: self.cache.get(k) for k in agent.status.watch if not k.endswith("/")}
            outcome = agent.reconcile(
                members,
                inflight=None if inflight is _MISSING else inflight_of(inflight),
                current=None if current is _MISSING else agent.store.current_of(current),
                watched={k: v for k, v in seen.items() if v is not _MISSING},
            )
            self.health.decision_read(name)
            self._token_refused(name, None)
            waiting = agent.status.undecided_since
            self.health.ready_waiting(name, agent.status.deploy if waiting else None, waiting)
            self._watch_deploy(agent)
            self.metrics.read_current_release(name, agent.engine.current_release)
            return outcome
        except ConsulError as exc:
            self.metrics.consul_errors.labels(op="reconcile").inc()
            if isinstance(exc, ConsulPermissionDenied):
                self._token_refused(name, str(exc))
            undecided = agent.undecided_deploy()
            if undecided:
                # Counted from when this attempt to read began (this reconcile, or the
                # failing call if earlier), not from its error: a paused or cut-off agent
                # answers nothing until each call's timeout (consul.timeout and retries, and
                # a reconcile may wait out more than one), which would add itself to
                # undecided_after. Not before this host was waiting, though.
                began = min(started, exc.started_at or started)
                since = max(began, agent.status.undecided_since or 0.0)
                self.health.waiting_for_decision(name, undecided, since=since)
                return f"undecided in {undecided}: {exc}"
            # Unreachable only when it did not answer: a refused request (an invalidated
            # session, a token) came from a Consul that is there.
            said = (
                "unreachable"
                if isinstance(exc, ConsulUnavailable)
                else "TLS failed"
                if isinstance(exc, ConsulTLSError)
                else "refused"
            )
            return f"consul {said}: {exc}"
        except WatcherError as exc:
            log.error("reconcile_failed", app=name, error=str(exc))
            return f"error: {exc}"
        except Exception as exc:  # one app's bug must not stop the others or the loop
            log.exception("reconcile_crashed", app=name, error=repr(exc))
            return f"error: {exc!r}"

    def _token_refused(self, app: str, error: str | None) -> None:
        """A step of ``app`` that Consul refused for the token's permissions (``error``), or
        (None) one that went through: /health says so until one goes through, and the log
        says it once at error level (a policy rendered for another app, node or kv_prefix
        leaves this host out of every deploy, and the fleet may not even list it)."""
        self.health.token_refused(app, error)
        if error is None:
            if self._refusal_said.pop(app, None) is not None:
                log.info("consul_token_accepted", app=app)
            return
        if self._refusal_said.get(app) == error:
            return
        self._refusal_said[app] = error
        log.error(
            "consul_token_refused",
            app=app,
            node=self.node,
            error=error,
            note=(
                f"this watcher takes part in no deploy of {app} until its token may read "
                f"{self.config.kv_prefix}/apps/{app}/ and write this node's keys: a policy "
                "rendered for this node and app (docs/acl.md; `watcher check-config` names "
                "each key the token may not write)"
            ),
        )

    def _ensure_member(self, agent: AppAgent) -> dict[str, KVEntry]:
        """Hold ``members/<node>`` with this daemon's session; returns the live members."""
        cached = self.cache.get(agent.store.keys.members_prefix)
        members = agent.store.members() if cached is _MISSING else agent.store.members_of(cached)
        session = self._session_id()
        mine = members.get(self.node)
        if session and (mine is None or mine.session != session):
            body = MemberRecord(self.node, __version__, iso(utcnow())).to_json()
            if agent.store.consul.kv_put(agent.store.keys.member(self.node), body, acquire=session):
                log.info("member_key_acquired", app=agent.app.name, session=session)
                self._member_refused.pop(agent.app.name, None)
                # Read once now; the cache stays the watch's (it sees this change itself).
                members = agent.store.members()
            else:
                self._member_not_acquired(agent, session, mine)
        return members

    def _member_not_acquired(self, agent: AppAgent, session: str, mine: KVEntry | None) -> None:
        """Say once per holder (not at every step) why this watcher is not a member: which
        session holds ``members/<node>``, and whose it is."""
        holder = mine.session if mine is not None and mine.session else ""
        if self._member_refused.get(agent.app.name) == holder:
            return
        self._member_refused[agent.app.name] = holder
        whose = ""
        if holder:
            with contextlib.suppress(ConsulError):
                info = agent.store.consul.session_info(holder) or {}
                whose = (
                    f" (session {info.get('Name', '?')!r} of Consul node {info.get('Node', '?')})"
                )
        log.warning(
            "member_key_not_acquired",
            app=agent.app.name,
            session=session,
            held_by=holder or "none (Consul's lock delay after a session ended)",
            note=(
                f"{agent.store.keys.member(self.node)} is held by session {holder}{whose}: "
                f"another watcher runs with node {self.node} for app {agent.app.name} (a "
                "config copied from a host with its node kept?), or this one restarted and "
                "its old session has not expired yet; this watcher writes no host record "
                "and leaves the deploys that name that session to it"
                if holder
                else "Consul refused the lock (its lock delay after the last holder's "
                "session ended); tried again at the next step"
            ),
        )

    # --- events -----------------------------------------------------------------------

    def _handle_event(self, event: ConsulEvent) -> tuple[str, bool]:
        """(what the cycle line says, whether the apps must be reconciled for it)."""
        name = event.name if event.name in EVENT_NAMES else "other"
        try:
            req = parse_event(event.id, event.name, event.ltime, event.payload, self.agents)
        except PayloadError as exc:
            log.warning("event_dropped", event_id=event.id, name=event.name, error=str(exc))
            self.metrics.events_handled.labels(name=name, result=EVENT_INVALID).inc()
            return "", False
        try:
            counted, result = self._act_on(req)
        except (ConsulError, PayloadError) as exc:
            log.error("event_failed", event_id=event.id, name=event.name, error=str(exc))
            counted, result = EVENT_FAILED, f"failed: {exc}"
        self.metrics.events_handled.labels(name=name, result=counted).inc()
        # A refused or failed event is something to look at (a typo in a build id fired
        # by hand): a warning, as a dropped one is.
        failed = counted in (EVENT_REFUSED, EVENT_FAILED) or result.startswith("refused")
        said = log.warning if failed else log.info
        said("event_handled", event_id=event.id, name=event.name, app=req.app, result=result)
        # A prefetch wakes the loop itself when done; a deploy id only rang the bell.
        needs = result not in (DOORBELL, "prefetching")
        return f"event {event.name} {event.id[:8]}: {result}", needs

    def _act_on(self, req: EventRequest) -> tuple[str, str]:
        """(how it was handled, one of the EVENT_* results; what the cycle line says)."""
        agent = self.agents[req.app]
        if req.name == "build-finished":
            assert req.artifact is not None
            future = self._prefetch.submit(agent.prefetch, req.artifact)
            self._prefetches.add(future)
            future.add_done_callback(self._prefetches.discard)
            return EVENT_ACTED, "prefetching"
        if req.deploy:
            # The doorbell `watcherctl` rings after its KV write: the loop reads `inflight`
            # anyway (the watch usually got there first), so there is nothing to look up.
            return EVENT_ACTED, DOORBELL
        app = agent.app
        if not app.raw_events:
            # Consul's event ACLs are not per app: a token that may fire `deploy` for one
            # app could otherwise start a deploy of any (the host writes the request).
            log.warning(
                "raw_event_refused",
                event_id=req.event_id,
                name=req.name,
                app=req.app,
                reason=f"apps.{req.app}.raw_events is false",
            )
            return EVENT_REFUSED, (
                f"refused: raw {req.name} events are off for app {req.app} "
                f"(apps.{req.app}.raw_events); use watcherctl {req.name}"
            )
        result = agent.store.start_from_event(
            event_id=req.event_id,
            ltime=req.ltime,
            max_ltime=max(self.event_watcher.max_ltime, req.ltime) if self.event_watcher else 0,
            kind=req.name,
            artifact_id=req.artifact,
            release=req.release,
            by=self.node,
            prepare_timeout=app.timeouts.prepare,
            apply_timeout=app.timeouts.apply,
            history_keep=self.config.daemon.history_keep,
        )
        counted = _STARTED_AS.get(result.split(":")[0], EVENT_FAILED)  # "lost race": failed
        if result == "exists":
            # Another host created it first; if it failed at once (unknown artifact), every
            # host says why, not only the one that wrote it.
            view = agent.store.view(req.event_id)
            view = view.checked() if view is not None else None
            if view is not None and view.decision is not None and view.decision.outcome == ABORT:
                # A refusal as the host that wrote it says it (and as a warning).
                refused = view.outcome is not None and view.outcome.result == "refused"
                return counted, f"{'refused' if refused else 'failed'}: {view.decision.reason}"
        return counted, result

    # --- reload, status, stop -------------------------------------------------------------

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            waiting = self._reloaded["needs_restart"] if self._reloaded else []
            self._said_reload(str(exc), waiting)
            self.notifier.ready()
            return
        running = self.started_config
        if set(new.apps) != set(running.apps):
            log.warning(
                "reload_apps_changed",
                note="adding or removing apps needs a restart",
                running=sorted(running.apps),
                new=sorted(new.apps),
            )
        fixed = {
            "kv_prefix": (running.kv_prefix, new.kv_prefix),
            "consul": (running.consul, new.consul),
            "s3": (running.s3, new.s3),
            "node": (running.node, new.node),
            "daemon.state_dir": (running.daemon.state_dir, new.daemon.state_dir),
            "daemon.listen": (running.daemon.listen, new.daemon.listen),
            # Read once at start: the session keeper's TTL, /health's undecided threshold
            # and the handled-events file's size.
            "daemon.session_ttl": (running.daemon.session_ttl, new.daemon.session_ttl),
            "daemon.undecided_after": (
                running.daemon.undecided_after,
                new.daemon.undecided_after,
            ),
            "daemon.handled_events_keep": (
                running.daemon.handled_events_keep,
                new.daemon.handled_events_keep,
            ),
        }
        for name, agent in self.agents.items():
            if name in new.apps:
                # The values running for what needs a restart; the agent's app for the rest.
                old, app = running.apps[name], new.apps[name]
                fixed[f"apps.{name}.root"] = (old.root, app.root)
                fixed[f"apps.{name}.artifact_cache_bytes"] = (
                    old.artifact_cache_bytes,
                    app.artifact_cache_bytes,
                )
                fixed[f"apps.{name}.timeouts.download"] = (
                    old.timeouts.download,
                    app.timeouts.download,
                )
                if app.webhook != agent.app.webhook:
                    if agent.notifier is not None:
                        self._retired = [(n, w) for n, w in self._retired if not w.done]
                        self._retired.append((name, agent.notifier.sender))
                    agent.notifier = notifier_for(app, self.metrics, replacing=agent.notifier)
                    log.info("webhook_reloaded", app=name, enabled=app.webhook is not None)
                agent.app = app
                agent.engine.app = app
                agent.config = new
        ignored = sorted(key for key, (old_v, new_v) in fixed.items() if old_v != new_v)
        if set(new.apps) != set(running.apps):
            ignored.append("apps")
        if ignored:
            log.warning(
                "reload_needs_restart",
                settings=ignored,
                note="these settings take effect at the next restart",
            )
        self.config = new
        _log_config_warnings(new)
        log.info("config_reloaded", source=new.source)
        self._said_reload("", ignored)
        self.notifier.ready()

    def _said_reload(self, error: str, needs_restart: list[str]) -> None:
        """What `watcherctl status` shows of the last reload (the log said it already)."""
        self._reloaded = {
            "at": iso(utcnow()),
            "error": error[:2000],
            "needs_restart": needs_restart,
        }
        self._write_status(force=True)

    def _write_status(self, *, force: bool = False) -> None:
        """``status.json`` for `watcherctl status`: rewritten when what it says of the apps,
        the health or the session changed (while a deploy runs, a change of the apps'
        states alone at most every STATUS_MIN_INTERVAL), and every STATUS_HEARTBEAT (its
        ``updated_at`` tells a live daemon from a stale file); not for every cycle line.
        Called by the loop, and by the session keeper after a failed renewal."""
        with self._status_lock:
            if not self._status_closed:
                self._write_status_locked(force=force)

    def _write_status_locked(self, *, force: bool) -> None:
        healthy, details = self.health.check()
        apps = {}
        for name, agent in self.agents.items():
            undecided = details["waiting_for_decision"].get(name)
            apps[name] = {
                "deploy": agent.status.deploy,
                "state": agent.status.state,
                "undecided": undecided,
                "converge_error": agent.status.converge_error,
                "apply_error": agent.status.apply_error,
                "prune_blocked": agent.status.prune_blocked,
                "prefetch_failed": agent.status.prefetch_failed,
                # What it works on until a restart (`status`): a reload keeps the root
                # (and the prefix below) it started with, whatever the file says now.
                "root": started.root if (started := self.started_config.apps.get(name)) else "",
            }
            cache = agent.engine.cache
            if cache is not None and (downloads := cache.downloads()):
                apps[name]["downloading"] = downloads  # prefetch or prepare, with progress
        said = (self._session_id(), healthy, apps, details["problems"], self._reloaded)
        if not force and said == self._status_said:
            self._status_held = False
            return
        now = time.monotonic()
        # The session or the health (an undecided deploy makes it 503) is said at once.
        quiet = said[:2] == self._status_said[:2]
        if not force and quiet and now - self._status_at < STATUS_MIN_INTERVAL and self._active():
            self._status_held = True
            return
        self._status_said, self._status_at, self._status_held = said, now, False
        data = {
            "version": 1,
            "pid": os.getpid(),
            "node": self.node,
            "kv_prefix": self.started_config.kv_prefix,
            "updated_at": iso(utcnow()),
            "session": said[0],
            "healthy": healthy,
            "problems": details["problems"],  # what /health says is wrong, for status
            "apps": apps,
            "last_cycle": self._last_line[:2000],
            "reload": self._reloaded,
            # Stopping: it finishes the step in progress (a hook may run for minutes) and
            # takes no new one; `status` said "running" all that while.
            "stopping": self._stopping_at or None,
        }
        with contextlib.suppress(OSError):
            # A report for `watcherctl status`, rewritten on every change: no fsync.
            atomic_write_json(self.state_dir / STATUS_FILE, data, durable=False, parents=True)

    def _shutdown(self, server: HealthServer | None) -> None:
        self.notifier.stopping()
        log.info("watcher_stopping")
        for watches in self._deploy_watch.values():
            for stop_event in watches.values():
                stop_event.set()
        self._prefetch.shutdown(wait=False, cancel_futures=True)
        self._stopping_at = iso(utcnow())
        self._status_written = time.monotonic()
        self._write_status(force=True)
        in_flight = stop_agents(list(self.agents.values()), self.notifier, self._stopping_status)
        if self.keeper is not None:
            if in_flight:
                # Keep the session: a quick restart reuses it and resumes the deploy.
                self.keeper.stopping.set()
                log.info("session_kept", reason="deploy in flight on this host")
            else:
                self.keeper.destroy()
        self._drain_webhooks()
        if server is not None:
            server.stop()
        with self._status_lock, contextlib.suppress(OSError):
            self._status_closed = True  # no keeper's write after this
            (self.state_dir / STATUS_FILE).unlink()
        log.info("watcher_stopped")

    def _stopping_status(self) -> None:
        """status.json while the stop waits for a step to finish: rewritten (``stopping``
        in it) every STATUS_HEARTBEAT, as the loop no longer does, so that a long hook does
        not make `status` call the stopping watcher stuck."""
        if time.monotonic() - self._status_written >= STATUS_HEARTBEAT:
            self._status_written = time.monotonic()
            # The loop has ended on purpose: a stop that waits for a long hook is no stalled
            # loop (it made `status` call the watcher unhealthy past loop_stall_after).
            self.health.loop_cycle()
            self._write_status(force=True)

    def _drain_webhooks(self) -> None:
        """Give queued chat messages (a deploy's "committed" most often) DRAIN_AT_STOP
        seconds, all apps together, before the process exits without them."""
        end = time.monotonic() + DRAIN_AT_STOP
        senders = list(self._retired)  # oldest first: their messages were queued earlier
        senders += [(n, a.notifier.sender) for n, a in self.agents.items() if a.notifier]
        for name, sender in senders:
            left = sender.drain(end - time.monotonic())
            if left:
                log.error("webhook_unsent_at_stop", app=name, messages=left, waited=DRAIN_AT_STOP)


def stop_agents(
    agents: list[AppAgent], notifier: SystemdNotifier, tick: Callable[[], None] = lambda: None
) -> bool:
    """Stop every app's worker for a shutdown; whether one has a deploy in flight. Every
    app is told first (a prepare stops before its ready ack: told only once the app
    before it was done, a second app's prepare acked ready meanwhile, the code review),
    then each is waited for. A step may run several hooks, each up to its own timeout,
    longer together than the unit's TimeoutStopSec: systemd is asked for more while a hook
    runs (the rest of a step, a download say, has the unit's timeout as before). ``tick``:
    called between waits (the status file's heartbeat)."""
    for agent in agents:
        agent.shutdown(wait=False)
    in_flight = False
    for agent in agents:
        if agent.busy():
            log.info("waiting_for_task", app=agent.app.name)
        while agent.busy():
            tick()
            if running_hooks():
                notifier.extend_timeout(STOP_EXTEND)
            agent.wait_idle(STOP_EXTEND / 3 if running_hooks() else 1.0)
        agent.shutdown(wait=True)
        in_flight = in_flight or agent.has_deploy_in_flight()
    return in_flight


def _ttl_seconds(text: Any) -> float | None:
    """Consul's TTL of a session ("15s", "1m30s", "1h0m0s"), in seconds; None when not."""
    if not isinstance(text, str) or not text:
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts) or None


def run_daemon(config: Config, args: Any) -> int:
    """Entry point of `watcher run`."""
    daemon = Daemon(config, config_path=getattr(args, "config", None) or config.source)
    code = daemon.run()
    # Every state write is atomic and the session is settled, so nothing is lost by not
    # joining a prefetch download still in progress (a partial download resumes later).
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _log_config_warnings(config: Config) -> None:
    """What `watcher check-config` warns of (a hook path that does not exist, a user this
    host lacks), in the log at start and at each reload: a typo there used to be found
    only when the hook ran, after the fleet had switched. Consul's TTL minimum is check-
    config's to ask the agent about; a session it refuses is logged anyway."""
    from watcher.daemon_cli import config_warnings

    for warning in config_warnings(config, session_ttl=False, advice=False):
        log.warning("config_warning", source=config.source, warning=warning)
