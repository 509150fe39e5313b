"""What one host does for one app: prepare, apply or abort a deploy, and converge to KV.

`AppAgent.reconcile()` is level-triggered: it reads KV and this host's phase journal, and
starts at most one slow task (staging, hooks, flipping) on the app's worker thread. It
never blocks on slow work itself, so the daemon's loop stays responsive. After a crash the
journal says which phases are done; unfinished ones run again (hooks must be idempotent).

Nothing here obeys a single key: before a flip, a ``post_abort`` or dropping a tree the
host establishes the commit or abort predicate itself in consistent reads of the acks
(``DeployStore.establish``), journals what it established and never decides that deploy
again (DESIGN.md 6.4; the rules are in docs/design.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from watcher import PROTOCOL_VERSION, __version__
from watcher.barrier import (
    CONTESTED,
    UNDECIDED,
    WAIT_RECHECK,
    AbortRequested,
    DeployStore,
    DeployView,
    Joined,
    PrepareRead,
    Verdict,
    Written,
    still_uploading,
)
from watcher.config import AppConfig, Config, Timeouts
from watcher.consul_api import MAX_TXN_OPS, KVEntry, TxnOp
from watcher.errors import (
    ArtifactIntegrityError,
    ArtifactNotFound,
    ConsulError,
    ConsulUnavailable,
    DeployRefused,
    FlipError,
    HookError,
    LockTimeout,
    PayloadError,
    StagingCancelled,
    WatcherError,
)
from watcher.fsutil import append_bytes, atomic_write_json, process_started
from watcher.hooks import (
    HOOK_MOVED_CURRENT,
    HookContext,
    current_moved,
    hook_commands,
    run_hooks,
)
from watcher.ids import one_line, shown
from watcher.log import get_logger
from watcher.records import (
    ABORT,
    ABORTED,
    COMMIT,
    COMMITTED,
    FAILED,
    FAILED_AFTER_COMMIT,
    INT_LIMIT,
    LIVE,
    NODE_FINAL_STATES,
    PREFETCHED_LISTED,
    READY,
    REFUSED,
    STAGING,
    ArtifactRecord,
    CurrentRecord,
    Decision,
    DeployRecord,
    HostRecord,
    MemberRecord,
    NodeProgress,
    iso,
    parse_iso,
    release_name,
    utcnow,
)
from watcher.releases import (
    RELEASE_JSON,
    AppLayout,
    Hold,
    ReleaseEngine,
    fleet_releases,
)
from watcher.webhook import notifier_for

JOURNAL_NAME = "deploy.json"
# What a crash must not lose (fsynced): the hooks that ran, and what was established. The
# other phases are idempotent steps a restart simply checks again (a staged tree is reused,
# a flip to the release `current` already names does nothing), so their journal writes are
# not fsynced: a deploy costs a handful of fsyncs, not a dozen.
DURABLE_PHASES = frozenset({"post_release", "post_symlink", "aborted"})
DURABLE_FIELDS = frozenset({"established"})
CONVERGE_JOURNAL_NAME = "converge.json"
#: When this host joined the app (its first member key's CreateIndex): ``first_index``.
JOINED_FILE = "joined.json"
APPLIED_NAME = "applied.json"
STAGING_ACK_AFTER = 0.5  # seconds of preparing after which the host writes its staging ack
ABORT_POLL_AFTER = 1.0  # seconds of staging after which the loop polls for an abort request
TRIM_EVERY = 600.0  # seconds between trims of this host's acks of trimmed deploys
# ... or this many of its parts in deploys, whichever comes first: at a deploy a second,
# 600 s left ~4,600 keys in KV between two trims (the second soak), and ids left
# `trimmed` (the last 64) before a host trimmed them
TRIM_AFTER_PARTS = 32


class TrimClock:
    """When a host trims its acks (``DeployStore.trim_own_progress``): at its first deploy
    end after a start, then every ``TRIM_EVERY`` seconds or ``TRIM_AFTER_PARTS`` of its
    parts in deploys, whichever comes first; and again at the next end when a trim filled
    its one txn (more may be left)."""

    def __init__(self) -> None:
        self._at = -math.inf  # the first end after a start trims
        self._parts = 0

    def part_done(self, now: float) -> bool:
        """One part ended at ``now`` (monotonic): whether to trim now."""
        self._parts += 1
        if now - self._at > TRIM_EVERY or self._parts >= TRIM_AFTER_PARTS:
            self._at, self._parts = now, 0
            return True
        return False

    def trimmed(self, deleted: int) -> None:
        """The trim deleted ``deleted`` keys: a full txn means again at the next end."""
        if deleted >= MAX_TXN_OPS:
            self._at = -math.inf


APPLIED_KEPT = 5  # deploys applied.json remembers: their acks are spared by every trim
# The end of a commit writes `current` and deletes `inflight` in one txn, and their watches
# answer a few ms apart: the loop waits this long for the `current` one before it reads.
END_WATCH_GRACE = 0.5
# A ready host waiting for the others' acks reads them again after WAIT_RECHECK (barrier).
# A wait longer than DECISION_WATCH_AFTER also watches the decision key (the record of a
# decider that could not write its mark).
DECISION_WATCH_AFTER = 1.0
STAGING_REPORT_EVERY = 2.0  # seconds between progress writes while a release is extracted
CONVERGE_BACKOFF_MAX = 60.0  # seconds between attempts after repeated convergence failures
#: Seconds between attempts of a committed deploy's switch that keeps failing before `current`
#: moved (a full disk, a directory made by hand where `current` should be): 1, 2, 4... s.
APPLY_BACKOFF_MAX = 30.0
TASK_BACKOFF_MAX = 30.0  # ... and of a task that raised (``AppAgent._task_backoff``)
#: Characters of an alarm (and of a contested deploy's hold) kept: its text names hosts of
#: a request any host's token can write (up to 1,000 names), and it goes to /health, the
#: log and the host record at every raise (a forged one made 77 KB records; the attacker
#: review). Records cut it at 2,000 on read.
ALARM_MAX = 1000


def alarm_text(message: str) -> str:
    """``message`` cut to ``ALARM_MAX`` characters, its length said inside them. Cutting a
    cut text changes nothing: an alarm is compared with the one raised before."""
    if len(message) <= ALARM_MAX:
        return message
    said = f"... [{len(message)} characters, cut]"
    return message[: ALARM_MAX - len(said)] + said


def _hold_shown(hold: Hold | None) -> str:
    """A hold as the host record says it, with who placed it (`status --fleet`, the page
    and deploy's warning show it); "" for none."""
    return f"{hold.reason or 'held'} (by {hold.by})" if hold else ""


def _contested_hold_of(hold: Hold | None, node: str, deploy_id: str) -> bool:
    """Whether ``hold`` is the one this node's watcher placed for contested ``deploy_id``."""
    return (
        hold is not None
        and _contested_hold(hold, node)
        and hold.reason.startswith(f"deploy {deploy_id} is contested: ")
    )


def _contested_hold(hold: Hold, node: str) -> bool:
    """Whether ``hold`` is the one this node's watcher placed for a contested deploy
    (``AppAgent._contested``): on this host's disk, in words of its own."""
    return (
        hold.by == f"watcher on {node}"
        and re.match(r"deploy \S+ is contested: ", hold.reason) is not None
    )


# Seconds the loop waits for the app's lock to place a contested deploy's hold it could
# not place before (a convergence that stages holds the lock for as long as that takes:
# the next cycle tries again).
LOOP_LOCK_WAIT = 0.5
# After prepare_deadline plus this grace, a host that has not acked gives up its session
# (DESIGN.md 6.4.7), which makes the abort clause fire for everyone.
PREPARE_GRACE = 10.0
# A request dated further ahead of this host's clock is refused: its deadlines are clamped
# from requested_at (DESIGN.md 6.1), and hosts need NTP (README.md, "Deadlines").
MAX_REQUEST_AHEAD = 300.0
# A request this host first saw more than this after its `requested_at` (by the two
# clocks): a "prepare deadline passed" then names both times, as a requester's clock
# behind this host's reads exactly like a deadline that ran out (the operator review).
LATE_SIGHT_NOTE_AFTER = 30.0


def read_journal(state_dir: Path, name: str = JOURNAL_NAME) -> dict[str, Any] | None:
    """This host's journal of the deploy it is part of (None when idle)."""
    try:
        raw = (state_dir / name).read_bytes()
    except FileNotFoundError:
        return None
    return parse_journal(raw)


def parse_journal(raw: bytes) -> dict[str, Any] | None:
    """The journal a file holds: JSON lines, the first the whole journal (written by a
    rename, so always complete), each further one the fields a write changed and the
    deploy, in the order written. An appended line without its newline was cut short by a
    crash or a full disk and counts as never written, and so does everything after a line
    that does not parse or names another deploy: an append only ever follows a complete
    line of the same deploy (``append_bytes``). A file that is one JSON document (an
    older version's journal, or one written by hand) is read as it is. None when the file
    holds no journal."""
    first, _, rest = raw.partition(b"\n")
    try:
        data = json.loads(first)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        try:
            whole = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        return whole if isinstance(whole, dict) and whole.get("deploy") else None
    for line in rest.split(b"\n")[:-1]:  # after the last newline: not a whole line
        try:
            part = json.loads(line)
        except (ValueError, RecursionError):
            break
        if not isinstance(part, dict) or part.get("deploy") != data.get("deploy"):
            break
        data.update(part)
    return data if data.get("deploy") else None


class Journal:
    """Phases done for this host's current deploy (or convergence), in
    ``.state/deploy.json`` (or ``.state/converge.json``). Written only when it changes.

    ``begin`` writes the whole journal atomically and durably (a new file, renamed over the
    old one, and its directory fsynced); each later write appends one line with the fields
    it changed (``parse_journal``), fdatasynced when it is durable. An append costs ~45 us
    of CPU here, a durable atomic rewrite ~250 us and a non-durable one ~130 us, and a
    deploy writes the journal ~7 times. Every ``APPENDS_BEFORE_REWRITE`` appends, after a
    failed write and on the first write of a process, the whole journal is written again.
    """

    APPENDS_BEFORE_REWRITE = 32

    def __init__(self, state_dir: Path, name: str = JOURNAL_NAME) -> None:
        self.path = state_dir / name
        self.state_dir = state_dir
        self._cache: dict[str, Any] | None = None
        self._loaded = False
        # The journal as the file holds it, once this process wrote it whole: appends write
        # what differs from it. None: the next write rewrites the file.
        self._on_disk: dict[str, Any] | None = None
        self._appends = 0
        # One change at a time, from the read to the write: the loop and the app's worker
        # both write (a stopped staging's abort and a hook's phase can meet), and a change
        # built from what the other was replacing would drop the other's.
        self._changing = threading.RLock()
        # The last request parsed from the journal: (its dict, the Joined made of it).
        self._joined: tuple[Any, Joined] | None = None

    def read(self) -> dict[str, Any] | None:
        if not self._loaded:
            self._cache = read_journal(self.state_dir, self.path.name)
            self._loaded = True
        return self._cache

    def joined(self) -> Joined:
        """The journaled request (``Joined.from_journal``: parsed, digest checked), parsed
        again only when the journal names another request: the loop asks on every cycle,
        and at 100 expected hosts a parse and its digest cost ~0.25 ms. Raises as
        ``from_journal`` does (KeyError when there is no journal)."""
        data = self.read() or {}
        request = data["request"]
        if self._joined is not None:
            # The dict is held here, so "is" cannot match a new dict that took its address.
            held, joined = self._joined
            if held is request and (joined.digest, joined.create_index) == (
                data.get("digest"),
                data.get("create_index"),
            ):
                return joined
        joined = Joined.from_journal(data)
        self._joined = (request, joined)
        return joined

    def begin(self, deploy_id: str, **fields: Any) -> dict[str, Any]:
        with self._changing:
            current = self.read()
            if current and current.get("deploy") == deploy_id:
                return current
            data = {"deploy": deploy_id, "phases": [], "started_at": iso(utcnow()), **fields}
            self._write(data)
            return data

    def update(self, **fields: Any) -> None:
        with self._changing:
            data = self.read()
            if data is None:
                return
            if any(data.get(k) != v for k, v in fields.items()):
                self._write({**data, **fields}, durable=bool(set(fields) & DURABLE_FIELDS))

    def done(self, *phases: str) -> None:
        """Mark ``phases`` done, in one write (fsynced if one of them is durable)."""
        with self._changing:
            data = self.read()
            if data is None:
                return
            new = [p for p in phases if p not in data["phases"]]
            if new:
                self._write(
                    {**data, "phases": [*data["phases"], *new]},
                    durable=bool(DURABLE_PHASES.intersection(new)),
                )

    def has(self, phase: str) -> bool:
        data = self.read()
        return bool(data and phase in data.get("phases", []))

    def clear(self, deploy_id: str) -> None:
        with self._changing:
            data = self.read()
            if data and data.get("deploy") == deploy_id:
                self.path.unlink(missing_ok=True)
                self._cache = None
                self._on_disk = None

    def forget(self) -> None:
        """The file was moved away: no journal from now on (nothing written)."""
        with self._changing:
            self._cache, self._loaded, self._on_disk, self._joined = None, True, None, None

    def _write(self, data: dict[str, Any], *, durable: bool = True) -> None:
        try:
            with self._changing:
                self._put(data, durable=durable)
        except OSError as exc:
            if durable:
                raise
            # Bookkeeping that is not fsynced (a crash may lose it anyway, and redoing what
            # it records is harmless) and that the disk refused, a full one usually: kept
            # here, as if written and then lost, and on disk with the next write that
            # succeeds. A full disk must not hold this host in a deploy whose part it has
            # done (`finished` unwritten: it would not join the next deploy, which then
            # waited for its prepare deadline instead of hearing "cannot journal").
            get_logger().warning(
                "journal_write_deferred", path=str(self.path), error=str(exc), fields=sorted(data)
            )
        self._cache = data
        self._loaded = True

    def _put(self, data: dict[str, Any], *, durable: bool) -> None:
        before, self._on_disk = self._on_disk, None  # after a failure the next write is whole
        if (
            before is not None
            and before.get("deploy") == data.get("deploy")
            and self._appends < self.APPENDS_BEFORE_REWRITE
            and before.keys() <= data.keys()
        ):
            changed = {k: v for k, v in data.items() if k not in before or not _same(before[k], v)}
            # Every line names its deploy: a reader stops at one of another deploy's (a
            # file system that can keep a file's new length without its new bytes could
            # show an old journal's freed block there after a crash).
            changed["deploy"] = data["deploy"]
            line = json.dumps(changed, sort_keys=True).encode() + b"\n"
            try:
                append_bytes(self.path, line, durable=durable)
                self._appends += 1
                self._on_disk = dict(data)
                return
            except FileNotFoundError:
                pass  # removed behind this process's back: written whole below
        # Always durable: an append's fdatasync makes its line durable only in a file whose
        # name already is.
        atomic_write_json(self.path, data, durable=True, parents=True)
        self._appends = 0
        self._on_disk = dict(data)


def _same(a: Any, b: Any) -> bool:
    """``a == b``, at once when they are one object (the journaled request, every write)."""
    return a is b or a == b


@dataclass
class AgentStatus:
    """What the health endpoint and `watcherctl status` learn from the agent."""

    deploy: str | None = None
    state: str = ""
    undecided_since: float | None = None
    converge_error: str = ""
    # A committed deploy's switch that failed before `current` moved ("<release>: <error>";
    # "" once it moved): the host retries it with a growing pause, `status` says why.
    apply_error: str = ""
    coordinating: bool = False
    coordinator_unknown: bool = False
    alarm: str = ""
    # Why the last prune (after a deploy, or planned at start) removed no release although
    # some were past `keep_releases` ("" when it could): releases pile up while it is set.
    prune_blocked: str = ""
    # The last prefetch that failed ("<artifact>: <error>"; "" once one succeeds): only the
    # journal said it, and the next deploy of that build then found out (a wrong bucket).
    prefetch_failed: str = ""
    watch: tuple[str, ...] = ()  # KV keys the daemon should hold blocking queries on
    watch_index: int = 0  # the index a new watch of a prefix there starts from
    recheck_at: float | None = None  # monotonic time the loop must look again by


class AppAgent:
    """One app on this host, driven by the daemon's loop."""

    def __init__(
        self,
        config: Config,
        app: AppConfig,
        engine: ReleaseEngine,
        store: DeployStore,
        node: str,
        *,
        session: Callable[[], str | None],
        metrics: Any = None,
        health: Any = None,
        first_index: Callable[[], int] = lambda: 0,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.app = app
        self.engine = engine
        self.store = store
        self.node = node
        self.session = session
        self.metrics = metrics
        self.health = health
        self._daemon_first_index = first_index
        self._kv_first_index: int | None = None
        self._joined_index = self._read_joined_index()
        self._joined_written = self._joined_index  # what joined.json holds
        self._wake = wake
        self.notifier = notifier_for(app, metrics)  # chat webhook; None when not configured
        self.journal = Journal(engine.layout.state_dir)
        self.converge_journal = Journal(engine.layout.state_dir, CONVERGE_JOURNAL_NAME)
        self._converge_failures = 0
        self._converge_retry_at = 0.0
        # (deploy id, failures, monotonic time of the next try) of a switch that failed
        self._apply_retry: tuple[str, int, float] | None = None
        # (kind, deploy id, failures, monotonic time of the next try) of a task that raised
        self._task_failed: tuple[str, str, int, float] | None = None
        self.log = get_logger(app=app.name, node=node)
        self.status = AgentStatus()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"app-{app.name}")
        self._task: Future[None] | None = None
        self._task_key: tuple[str, str] | None = None
        self._cancel = threading.Event()
        # Set by a stop: a prepare still staging stops before its ready ack (not in a hook),
        # unacked, for the restart to resume from the journal; a stopped watcher must not
        # tie the fleet to a commit it will not apply until it runs again.
        self._stopping = threading.Event()
        # How far the running extraction got: (deploy, bytes, members), as last reported.
        self._extracted: tuple[str, int, int] = ("", 0, 0)
        # (release, alarm, hold, broken) as the host record says them
        self._host_state: tuple[str | None, str, str, str] | None = None
        # The loop and the worker both write the host record: one at a time, and what the
        # last write said is what _host_state says.
        self._host_lock = threading.Lock()
        # (release, why it is not served here) as the last look found; None: served
        self._broken: tuple[str, str] | None = None
        self._reported: set[str] = set()  # problems logged once (not obeyed, not parsed)
        # (this host's release, the one converged to) when `current` was last seen moved
        self._moved_here: tuple[str | None, str] | None = None
        # The alarm raised because `current` names a deploy this host does not follow
        # (it left this host out, DESIGN.md 6.4.5, or an ack changed after its commit,
        # 6.4.4), and that deploy: lifted once `current` names another.
        self._not_followed: tuple[str, str] | None = None
        # The alarm raised for a contested deploy (its hold's reason): lifted once an
        # operator released the hold (``_lift_released_contested_alarm``).
        self._contested_alarm = ""
        # The contested deploy whose hold this watcher has not placed yet (its write failed,
        # or an operator's hold was there first), and the hold's reason: placed once it can
        # be, and only the release of a placed hold lifts the alarm. None: placed, or none.
        self._contested_unplaced: tuple[str, str] | None = None
        # Whether the hold on disk was looked at once after start, for a contested one
        # whose alarm a restart lost (after that, holds.json is read only while a
        # contested alarm waits for its release, not at every idle cycle).
        self._start_hold_seen = False
        # What the last look for a committed deploy later than ``current`` found (from the
        # acks, ``newest_committed``), for (the deploy `current` named, this host's release):
        # looked for once after start, and again only when this host is behind `current`.
        self._acks_looked: tuple[tuple[str | None, str | None], Joined | None] | None = None
        # (release, CreateIndex) of the deploy this host is on, by its own acks, when its
        # applied.json does not say (``_applied_index``).
        self._own_index: tuple[str, int] | None = None
        self._own: dict[str, str] = {}  # deploy -> this host's last ack state (write-through)
        self._request_index: dict[str, int] = {}  # deploy -> its request key's CreateIndex
        self._coordinating: str | None = None
        self._resumed: set[str] = set()  # deploys whose prepare this process started
        self._known: dict[str, tuple[NodeProgress | None, int]] = {}  # own ack, index
        # A verdict read by this host's own ack txn, with _wake_marker() taken before it.
        self._verdicts: dict[str, tuple[Verdict, tuple[Any, ...]]] = {}
        self._prepared: dict[str, PrepareRead] = {}  # the prepare's read, done with the join
        self._last_prefetched: str | None = None  # the artifact the join read guesses
        self._watched: dict[str, KVEntry | None] = {}  # the step's watched keys, as last read
        self._ended_at: tuple[str, float] = ("", 0.0)  # see _just_ended
        self._last_inflight: str | None = None  # the deploy `inflight` named, while it does
        self._inflight_gone: tuple[str, float] = ("", 0.0)  # which one went, and when
        self._lock_with_ack: str | None = None  # take the coordinator lock with this ready ack
        self._wake_when_done = True  # the task's end wakes the loop (see _apply)
        self._looked_while_busy = False  # a step saw the task running: its end wakes the loop
        self._member_entries: dict[str, KVEntry] = {}  # the members as the loop last saw them
        # The fleet's `current` as the loop last saw it: a prune keeps what it names.
        self._fleet_current: CurrentRecord | None = None
        self._inflight_index = 0
        # (deploy, what woke this host then, when, why undecided): see _still_waiting
        self._waited: tuple[str, tuple[Any, ...], float, str] = ("", (), 0.0, "")
        # (deploy, expected nodes whose named session the members watch no longer shows,
        # when) a staging host last established on that: see _named_session_gone
        self._sessions_looked: tuple[str, tuple[str, ...], float] = ("", (), 0.0)
        self._task_started = 0.0
        self._trim_clock = TrimClock()
        # The deploys this host applied last, newest last (applied.json): their acks are
        # never trimmed, whatever the shared `history` and `current` say.
        self._applied_recently = self._read_applied_recently()
        self._cancel_reason = ""
        self._legacy_checked = False
        # Who journals here: a journal of another node name or KV prefix (the config
        # changed across the restart) is that identity's, never resumed as this one's.
        self._scope = f"{node} {store.keys.base}"
        for journal in (self.journal, self.converge_journal):
            self._set_aside_foreign(journal)

    def _set_aside_foreign(self, journal: Journal) -> None:
        """Move an unfinished journal written under another node name or KV prefix out of
        the way (``<name>.set-aside-<time>``), saying so: resumed, its deploy's request does
        not expect this node (every step refused, the session given up at every prepare
        deadline, the operator review's rename) or is not under this prefix (its records
        written where no request is). This host then converges as any host does."""
        try:
            data = journal.read()
        except OSError:
            return  # read again, and said, by the step that needs it
        scope = data.get("scope") if data else None
        if not isinstance(scope, str) or scope == self._scope or (data or {}).get("finished"):
            return  # none, this watcher's, an older version's (no scope: as before), or done
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        aside = journal.path.with_name(f"{journal.path.name}.set-aside-{stamp}")
        try:
            journal.path.replace(aside)
        except OSError as exc:
            # Never resumed as this identity's all the same: the next begin writes over it.
            self.log.error("journal_not_set_aside", journal=str(journal.path), error=str(exc))
        journal.forget()
        self.log.warning(
            "journal_set_aside",
            journal=str(aside),
            deploy=str(data.get("deploy", "")) if data else "",
            written_as=scope,
            running_as=self._scope,
            note="the config's node or kv_prefix changed across the restart: that deploy "
            "is the old identity's, never resumed as this one's; this host converges to "
            "the fleet's release from what it runs now",
        )

    # --- the loop's entry point -------------------------------------------------------

    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def reconcile(
        self,
        members: Mapping[str, KVEntry] | None = None,
        inflight: tuple[str | None, int] | None = None,
        current: tuple[CurrentRecord | None, int] | None = None,
        watched: Mapping[str, KVEntry | None] | None = None,
    ) -> str:
        """Take the next step for this app; returns a short outcome for the cycle's log.

        ``watched``: what the daemon's watches of this step's keys (``status.watch``) last
        read, by key; a wake-up's content, never acted on alone.
        """
        self.status.recheck_at = None  # set again below while a wait needs it
        if members is not None:
            self._member_entries = dict(members)
            self._note_joined(members.get(self.node))
        self._watched = dict(watched or {})
        if current is not None:
            self._fleet_current = current[0]
        if self._task is not None and self._task.done():
            exc = self._task.exception()
            if exc is not None:
                self.log.error("task_crashed", task=self._task_key, error=repr(exc))
            self._task, self._task_key = None, None
        if self._task is not None and not self._looked_while_busy:
            # What woke this step (the end of the deploy, usually, for a host still in the
            # bookkeeping after its live ack) may need a step once the task is done, even
            # when the task itself would not wake the loop; else it waits for the tick.
            self._looked_while_busy = True
            self._task.add_done_callback(lambda _task: self._wake())
        if not self._legacy_checked:
            self._legacy_checked = True
            if self.store.legacy_layout_found():
                self.log.warning(
                    "legacy_layout_ignored",
                    prefix=self.store.keys.legacy_deploys_prefix,
                    note="keys of KV layout version 1; this watcher speaks layout 2 and "
                    "ignores them (delete them once no old watcher runs)",
                )
        inflight_id, inflight_index = inflight if inflight is not None else self.store.inflight()
        if inflight_id is not None:
            self._last_inflight = inflight_id
        elif self._last_inflight is not None:
            self._inflight_gone = (self._last_inflight, time.monotonic())
            self._last_inflight = None
        self._inflight_index = inflight_index
        journal = self.journal.read()
        if journal and not journal.get("finished"):
            try:
                joined = self.journal.joined()
            except (PayloadError, KeyError, TypeError, ValueError) as exc:
                self.log.error("journal_unreadable", error=str(exc), path=str(self.journal.path))
                self.journal.clear(str(journal.get("deploy")))
                return "journal unreadable; cleared"
            if inflight_id not in (None, joined.id) and journal.get("established") is None:
                self._refuse_second(inflight_id, joined)
            outcome = self._drive(joined, journal, inflight_id, inflight_index)
            if inflight_id != joined.id and (self.journal.read() or {}).get("finished"):
                # This part finished in this very step, after `inflight` had already moved
                # on (the end, whose watch woke us, usually): what follows it (the idle
                # path, or the next deploy's join) is for the next step, now, not the tick.
                self.status.recheck_at = time.monotonic()
            return f"deploy {joined.id}: {outcome}"
        if inflight_id is None:
            if (
                journal
                and journal.get("established") == COMMIT
                and (
                    current is None or current[0] is None or current[0].deploy != journal["deploy"]
                )
                and self._awaiting_current(str(journal["deploy"]))
            ):
                return f"deploy {journal['deploy']}: done; waiting for the watch of current"
            if (
                journal
                and journal.get("established") in (COMMIT, ABORT)
                and not journal.get("ended")
            ):
                # ``inflight`` is gone after this host's part: usually the end deleted it
                # (``current`` names the deploy, or its outcome exists); if someone deleted
                # it by hand, the deploy still needs its outcome, history and ``current``.
                deploy_id = str(journal["deploy"])
                fleet_on = current[0].deploy if current and current[0] else None
                if fleet_on != deploy_id:
                    # The watch of `current` may answer after the one of `inflight`: read
                    # the records of the end at once rather than converge on a stale one.
                    # Not over on an outcome record alone: any host's token writes one
                    # (DESIGN.md 6.4.3), and the end must still be written.
                    try:
                        create_index = self.journal.joined().create_index
                    except (PayloadError, KeyError, TypeError, ValueError):
                        create_index = 0
                    current, over = self.store.end_seen(
                        deploy_id,
                        create_index,
                        str(journal.get("established")),
                        node=self.node,
                        first_index=self.first_index(),
                    )
                    fleet_on = current[0].deploy if current[0] else None
                    if fleet_on != deploy_id and not over:
                        return f"deploy {deploy_id}: {self._after_own_part(deploy_id, 0)}"
                self._mark_ended(deploy_id)
            self._idle_status()
            return self._converge(current)
        if journal and journal.get("deploy") == inflight_id:
            if journal.get("ended") and self._just_ended(inflight_id):
                # The watch of `current` answered before the one of `inflight`, which the
                # end deleted in the same txn: nothing to do until it answers too.
                return f"deploy {inflight_id}: ended; waiting for the watch of inflight"
            return f"deploy {inflight_id}: {self._after_own_part(inflight_id, inflight_index)}"
        return self._join(inflight_id, inflight_index)

    def _mark_ended(self, deploy_id: str) -> None:
        self.journal.update(ended=True)
        self._ended_at = (deploy_id, time.monotonic())

    def _just_ended(self, deploy_id: str) -> bool:
        """This process saw the deploy end less than END_WATCH_GRACE ago (and the loop will
        look again then, whatever wakes it)."""
        return self._within_grace(self._ended_at, deploy_id)

    def _awaiting_current(self, deploy_id: str) -> bool:
        """Whether to wait for the watch of ``current`` rather than read it (or converge on
        the value it had before the end): for END_WATCH_GRACE after the loop saw
        ``inflight`` stop naming the deploy this host committed."""
        return self._within_grace(self._inflight_gone, deploy_id)

    def _within_grace(self, seen: tuple[str, float], deploy_id: str) -> bool:
        what, at = seen
        if what != deploy_id or time.monotonic() - at >= END_WATCH_GRACE:
            return False
        self.status.recheck_at = at + END_WATCH_GRACE  # one look then, whatever wakes us
        return True

    def _idle_status(self) -> None:
        if self._apply_retry is not None:  # its journal is gone (cleared, unreadable)
            self._apply_retry = None
            self._failing("switch", "")
        self.status.deploy, self.status.state = None, ""
        self.status.undecided_since = None
        self.status.coordinating = self.status.coordinator_unknown = False
        self.status.watch = ()
        self._coordinating = None

    def undecided_deploy(self) -> str | None:
        """The deploy this host acked ready in and has established nothing of, if any."""
        if self.status.undecided_since is not None and self.status.deploy:
            return self.status.deploy
        journal = self.journal.read()
        if (
            journal
            and not journal.get("finished")
            and not journal.get("established")
            and self._own.get(str(journal["deploy"])) == READY
        ):
            return str(journal["deploy"])
        return None

    # --- joining ------------------------------------------------------------------------

    def _join(self, deploy_id: str, inflight_index: int) -> str:
        """``inflight`` names a deploy this host has not journaled: read its request once
        (with its outcome and this host's own ack, in one consistent read)."""
        guess = self._last_prefetched or next(iter(self._prefetched_ids()), None)
        try:
            read = self.store.join_read(deploy_id, self.node, artifact=guess)
        except PayloadError as exc:
            self.store.clear_inflight(deploy_id, inflight_index, str(exc), by=self.node)
            return f"inflight {deploy_id!r}: unreadable, cleared"
        if read.ended:
            request, entry = read.request, read.entry
            if (
                request is not None
                and entry is not None
                and self.node in request.expected
                and read.own is None
            ):
                # Ended without an ack of this expected host: not a commit, and past its
                # apply deadline the hosts that acked ready may still be undecided. Say no
                # (a veto needs no session), so they abort rather than wait for this host
                # forever, refusing every later deploy.
                self.log.warning("ended_before_join", deploy=deploy_id)
                joined = Joined(request, request.digest(), entry.create_index)
                self._ack(
                    joined,
                    REFUSED,
                    error="the deploy had ended before this host joined",
                    known=(None, read.own_index),
                )
            self.store.clear_inflight(
                deploy_id, inflight_index, "deploy already ended", by=self.node, ended=True
            )
            return f"deploy {deploy_id}: already ended, inflight cleared"
        if read.problem:
            self.store.clear_inflight(
                deploy_id, inflight_index, f"request does not parse: {read.problem}", by=self.node
            )
            return f"inflight {deploy_id!r}: request unreadable, cleared"
        request, entry = read.request, read.entry
        if request is None or entry is None:
            rebuilt = self.store.rebuild_request(deploy_id)
            if rebuilt is None:
                self.store.clear_inflight(
                    deploy_id, inflight_index, "inflight names no request", by=self.node
                )
                return f"inflight {deploy_id!r}: no request, cleared"
            if self.node in rebuilt.expected and read.own is None:
                # Expected, never joined, and the request is gone: say no (a veto needs no
                # session), so the deploy ends instead of waiting for this host forever.
                joined = Joined(rebuilt, rebuilt.digest(), 0)
                self._ack(joined, FAILED, error="the request was deleted before this host read it")
            return f"deploy {deploy_id}: request deleted; following its acks"
        joined = Joined(request, request.digest(), entry.create_index)
        self.status.deploy = deploy_id
        if self.node not in request.expected:
            self.status.state = "not expected"
            return f"deploy {deploy_id}: {self._bystander(joined, inflight_index)}"
        holder = self._member_entries.get(self.node)
        if (
            self._member_key_held_by_another()
            and holder is not None
            and holder.session
            and request.sessions.get(self.node) == holder.session
        ):
            # The request expects the watcher that holds this node's member key, not this
            # one: another watcher runs with this node name (a config copied from a host),
            # or this one restarted with .state/ wiped and its old session lives on. Either
            # way its ack is not this watcher's to write, whatever it says: a "failed:
            # another session" here aborted every deploy the real one staged (also over a
            # staging ack it read first, a CI run of 3817298), and following a ready ack as
            # its own would stage, flip and run hooks on this root and write that host's
            # intent and live acks. A bystander while that session holds the key (it ends a
            # deploy past its deadline, as any host not expected). An old session of this
            # host ends within twice the TTL: this watcher then takes the key and the
            # deploy is its own again, its ack to follow (a ready one) or, if that session
            # ended before a ready ack, an abort by the session clause (DESIGN.md 6.4.3).
            self.status.state = "not expected"
            return (
                f"deploy {deploy_id}: expects the other watcher of node {self.node}; "
                + self._bystander(joined, inflight_index)
            )
        if read.prepared is not None:
            self._prepared[deploy_id] = read.prepared
        own = read.own
        if own is not None:
            # This host took part before it lost .state/: its own ack, not the request key
            # (which may have been rewritten since), says what it journaled.
            carried = read.own_request()
            if carried is not None:
                joined = Joined(carried, own.digest, own.create_index)
            elif own.digest != joined.digest:
                if own.state == STAGING:
                    self._ack(joined, FAILED, error="the request changed after this host joined")
                self._own[deploy_id] = own.state
                return f"deploy {deploy_id}: request changed since this host joined; vetoed"
        self._own[deploy_id] = own.state if own else ""
        self._known[deploy_id] = (own, read.own_index)
        self._request_index[deploy_id] = entry.create_index
        while len(self._request_index) > 8:  # only deploys this host is in matter
            del self._request_index[next(iter(self._request_index))]
        try:
            self.journal.begin(
                deploy_id, **joined.to_journal(), established=None, scope=self._scope
            )
        except OSError as exc:
            # No journal, no safe resume (a full disk, a read-only .state/): say no now
            # rather than leave the fleet waiting for this host until the deadline.
            self._ack(joined, FAILED, error=f"cannot journal the deploy: {exc}")
            return f"deploy {deploy_id}: failed, cannot write {self.journal.path}: {exc}"
        self._resumed.add(deploy_id)  # a fresh join: nothing was decided without this host
        if own is None and self.session() and self.node == min(request.expected):
            # The first expected host coordinates: it says that the deploy started and,
            # normally, writes its end. It takes the coordinator lock in its ready ack's txn
            # (or, if it never acks ready, once its part is done); the others contend only
            # once its member key is gone or past the apply deadline. A ready fleet still
            # commits without it; the lock only elects who does the once-per-deploy work.
            self._lock_with_ack = deploy_id
            if self.notifier is not None:
                self.notifier.started(self._view_for(joined), node=self.node)
        if entry.modify_index != entry.create_index and own is None:
            self._ack(joined, REFUSED, error="request was rewritten after it was created")
            return f"deploy {deploy_id}: refused (request rewritten)"
        return f"deploy {deploy_id}: " + self._drive(
            joined, self.journal.read() or {}, deploy_id, inflight_index
        )

    def _refuse_second(self, inflight_id: str, current: Joined) -> None:
        """There is one ``current_backup``: while this host is in an undecided deploy it
        refuses (acks) any other deploy it is expected in."""
        if inflight_id in self._reported:
            return
        self._reported.add(inflight_id)
        try:
            request, entry = self.store.request(inflight_id, consistent=True)
        except PayloadError:
            return
        if request is None or entry is None or self.node not in request.expected:
            return
        other = Joined(request, request.digest(), entry.create_index)
        self._ack(other, REFUSED, error=f"this host is still in undecided deploy {current.id}")

    def _bystander(self, joined: Joined, inflight_index: int) -> str:
        """Not expected: never flips; helps end a deploy past its apply deadline."""
        self.status.watch = (self.store.keys.decision(joined.id),)
        # The request's own deadline, not this host's clamp: ending an undecided deploy
        # speaks for everyone, and a host with shorter timeouts must not end it while the
        # expected hosts may still commit it.
        if utcnow() < parse_iso(joined.request.apply_deadline):
            return "not expected; waiting"
        verdict = self.store.establish(joined)
        if verdict.outcome == CONTESTED:
            return "contested; not ending it"
        ended, _, result = self.store.end(
            joined,
            verdict,
            by=self.node,
            history_keep=self.config.daemon.history_keep,
            on_validate_failure=self.app.on_validate_failure,
            expired=True,
            first_index=self.first_index(),
        )
        if ended:
            self._notify_end(joined, verdict, result)
        return "ended past the apply deadline" if ended else "not expected; waiting"

    # --- this host's part -----------------------------------------------------------------

    def _drive(
        self,
        joined: Joined,
        journal: dict[str, Any],
        inflight_id: str | None,
        inflight_index: int,
    ) -> str:
        deploy_id = joined.id
        keys = self.store.keys
        self.status.deploy = deploy_id
        established = journal.get("established")
        if established == CONTESTED:
            self.status.state = "contested"
            hold = self.engine.held()
            # Journals of before `held` was written: their hold was placed or was there. Its
            # own hold on disk is placed whatever the journal says (that write is deferred
            # on a full disk, and a second look at the deploy found its own hold "there").
            placed = journal.get("held", True)
            if not placed and _contested_hold_of(hold, self.node, deploy_id):
                placed, self._contested_unplaced = True, None
                self.journal.update(held=True)  # so its release is taken as one
            if hold is None and placed and self.store.outcome(deploy_id) is not None:
                # An operator looked and released the hold: this host is done with it.
                self._count_part(joined, CONTESTED)
                self.journal.update(finished=True)
                self._clear_alarm(self.status.alarm, note="hold released")
                return "contested deploy released by an operator"
            message = alarm_text(f"deploy {deploy_id} is contested: {journal.get('reason', '')}")
            if (
                hold is None
                and not placed
                and self._hold_contested(deploy_id, message, wait=LOOP_LOCK_WAIT)
            ):
                # Its write had failed, or an operator's hold was there and is gone now:
                # the hold of DESIGN.md 6.4.4 is placed now, and its release lifts the alarm.
                self.journal.update(held=True)
                placed, hold = True, self.engine.held()
                self._contested_unplaced = None
            if not self.status.alarm and (hold is not None or not placed):
                # Restarted while held for it: the hold is on disk, the alarm was in memory
                # (DESIGN.md 6.4.4 wants both: /health 503, the alarm metric, the record).
                self._alarm(message)
                self._contested_alarm = self.status.alarm
                self._contested_unplaced = None if placed else (deploy_id, message)
            end = self._after_own_part(deploy_id, inflight_index)
            return f"contested; held, waiting for an operator ({end})"
        if established == COMMIT:
            if not self.journal.has("applied"):
                retry = self._apply_retry
                if retry is not None and retry[0] != deploy_id:  # another deploy's
                    retry, self._apply_retry = None, None
                    self._failing("switch", "")
                if retry is not None and not self.busy():
                    wait = retry[2] - time.monotonic()
                    if wait > 0:
                        self.status.recheck_at = retry[2]
                        return f"switch failed, retry in {wait:.0f}s: {self.status.apply_error}"
                return self._start("apply", deploy_id, lambda: self._apply(joined))
            return self._finish_part(joined, inflight_id, inflight_index)
        if established == ABORT:
            if not self.journal.has("aborted"):
                self._cancel.set()
                return self._start("abort", deploy_id, lambda: self._abort(joined))
            return self._finish_part(joined, inflight_id, inflight_index)
        own = self._own.get(deploy_id)
        if own is None:
            ack, _ = self.store.ack(deploy_id, self.node)
            own = ack.state if ack else ""
            self._own[deploy_id] = own
        self.status.state = own
        # A quick prepare watches nothing: the worker wakes the loop when it is done, and
        # the ready ack's own txn reads the verdict (a long one watches below, past
        # ABORT_POLL_AFTER); a host that waits for the others' acks watches the decision.
        self.status.watch = ()
        past_prepare = utcnow() >= self._deadlines(joined.request)[0]
        moved = inflight_id != deploy_id and self._inflight_moved(joined)
        if own in ("", STAGING):
            if self.busy():
                why = ""
                if past_prepare:
                    task = self._task_key[0] if self._task_key else "prepare"
                    done = ", ".join(journal.get("phases", [])) or "none"
                    why = f"prepare deadline passed during {task} (phases done: {done})"
                    why += late_sight_note(journal, joined.request)
                    cache = self.engine.cache
                    artifact = joined.request.artifact
                    if cache is not None and (trouble := cache.trouble(artifact)):
                        why += f"; still downloading {artifact}, {trouble}"
                    extracted = self._extracted
                    if extracted[0] == deploy_id and "staged" not in journal.get("phases", []):
                        why += (
                            f"; extracting {artifact}: {extracted[1]} bytes in "
                            f"{extracted[2]} members so far"
                        )
                elif moved:
                    why = "inflight moved to another deploy"
                else:
                    if own == "" and self._staging_for() > STAGING_ACK_AFTER:
                        # A prepare that takes a while shows as staging (a quick one acks
                        # ready without it); the CAS loses to a ready ack written meanwhile.
                        self._ack(joined, STAGING, timings={"staging_at": iso(utcnow())})
                    if self._staging_for() > ABORT_POLL_AFTER:
                        # Only once staging takes a while (a quick prepare meets the abort
                        # request in its ready ack's own txn): watch the abort request, so
                        # it stops the work within moments, and look now.
                        self.status.watch = (
                            keys.decision(deploy_id),
                            keys.abort_request(deploy_id),
                        )
                        why = self._abort_seen(joined)
                if not why:
                    return "preparing"
                # Not ready yet, so this host may still say no, now: the deploy aborts
                # without waiting for the hook or extraction in progress (the cleanup runs
                # when the worker is free).
                self._stop_staging(why)
                self._ack(joined, _stopped_state(why), error=why, before_ready=True)
                own = self._own.get(deploy_id, own)
                if own in ("", STAGING):
                    return "preparing"
            elif past_prepare or moved:
                why = "prepare deadline passed" if past_prepare else "inflight moved on"
                note = late_sight_note(journal, joined.request) if past_prepare else ""
                self._ack(
                    joined,
                    FAILED,
                    error=f"{why} before this host was ready{note}",
                    before_ready=True,
                )
                own = self._own.get(deploy_id, own)
            elif deploy_id not in self._resumed and self._decided(joined):
                # Back after a crash or restart mid-prepare, and the deploy was decided
                # meanwhile: follow what the acks establish instead of staging again.
                own = self._own.get(deploy_id, own)
            else:
                self._resumed.add(deploy_id)
                return self._start("prepare", deploy_id, lambda: self._prepare(joined))
        # The ready ack's txn read the acks after writing it: no second read for that; nor
        # when another expected host's decided mark names a commit: the intent's txn reads
        # them; nor while nothing this host watches changed since it last read them.
        cached = self._verdicts.pop(deploy_id, None)
        if cached and cached[0].outcome == UNDECIDED and cached[1] != self._wake_marker(deploy_id):
            # Something this host watches changed after that txn read the acks (a decided
            # mark, usually, whose wake-up this very step consumed): that read is stale.
            cached = None
        verdict = cached[0] if cached else self._commit_marked(joined, own)
        marker = cached[1] if cached else self._wake_marker(deploy_id)
        if verdict is None:
            still = self._still_waiting(deploy_id, marker)
            if still is not None:
                self._watch_decision_after_a_while(deploy_id)
                return f"{own or 'pending'}; {still}"
            verdict = self.store.establish(joined)
        if verdict.outcome == UNDECIDED:
            self._waited = (deploy_id, marker, time.monotonic(), verdict.reason)
            self._watch_decision_after_a_while(deploy_id)
        if verdict.outcome == UNDECIDED and inflight_id is None and own == READY:
            # Someone deleted inflight mid-prepare: hosts that never joined would never ack.
            # Point it back at this undecided deploy (cas=0) so they join and decide.
            self.store.consul.kv_put(self.store.keys.inflight, deploy_id.encode(), cas=0)
        return self._act_on(joined, verdict, own)

    def _staging_for(self) -> float:
        return time.monotonic() - self._task_started if self.busy() else 0.0

    def _decided(self, joined: Joined) -> bool:
        """Whether a decision record exists (a wake-up only; the caller establishes)."""
        self._resumed.add(joined.id)
        return self.store.consul.kv_get(self.store.keys.decision(joined.id)) is not None

    def _inflight_moved(self, joined: Joined) -> bool:
        """``inflight`` names another deploy, in a consistent read (a stale read around an
        election can answer 404 for a key that exists)."""
        inflight, _ = self.store.inflight(consistent=True)
        return inflight is not None and inflight != joined.id

    def _abort_seen(self, joined: Joined) -> str:
        """While staging: why to stop (an abort request, or an abort this host establishes
        itself; the decision key, or an expected node's member key gone or held by another
        session than the request names, is only the wake-up that makes it look), or ""."""
        abort = self.store.abort_requested(joined.id)
        if abort is not None:
            return f"{ABORT_REQUESTED} by {abort.by}: {abort.reason}".rstrip(": ")
        entry = self.store.consul.kv_get(self.store.keys.decision(joined.id))
        if entry is not None or self._named_session_gone(joined):
            verdict = self.store.establish(joined)
            if verdict.outcome == ABORT:
                # why, for the ack and the outcome: "node host-1 aborted" alone says nothing
                return (
                    f"{ABORT_ESTABLISHED}: {verdict.reason}"
                    if verdict.reason
                    else ABORT_ESTABLISHED
                )
        return ""

    def _named_session_gone(self, joined: Joined) -> bool:
        """Whether the members watch shows another expected node's member key gone or held
        by another session than the request named, and that is news since this host last
        looked: while every live host still runs its post_release hook nobody else
        establishes, and the abort clause of a dead node's session (DESIGN.md 6.4.3) would
        wait for the slowest hook. Proof needs the session gone (``establish`` asks); the
        same nodes are looked at again after WAIT_RECHECK (a key deleted by hand while its
        session lived, that session ending later, changes nothing the watch shows)."""
        request = joined.request
        missing = tuple(
            sorted(
                node
                for node in request.expected
                if node != self.node
                and (
                    (member := self._member_entries.get(node)) is None
                    or member.session != request.sessions.get(node)
                )
            )
        )
        looked_on, looked_at, at = self._sessions_looked
        now = time.monotonic()
        if not missing or (
            (looked_on, looked_at) == (joined.id, missing) and now - at < WAIT_RECHECK
        ):
            return False
        self._sessions_looked = (joined.id, missing, now)
        return True

    def _wake_marker(self, deploy_id: str) -> tuple[Any, ...]:
        """What wakes a host that waits for the others' acks, as the loop last saw it: the
        members (sessions and decided marks), ``inflight`` and the decision key."""
        decision = self._watched.get(self.store.keys.decision(deploy_id))
        members = tuple(
            sorted((n, e.session, e.modify_index) for n, e in self._member_entries.items())
        )
        return (members, self._inflight_index, decision.modify_index if decision else 0)

    def _still_waiting(self, deploy_id: str, marker: tuple[Any, ...]) -> str | None:
        """Why this host is still undecided, if nothing it watches changed since it last
        read the acks (within WAIT_RECHECK): no per-second re-reads while it only waits."""
        waited_on, seen, at, reason = self._waited
        if waited_on == deploy_id and seen == marker and time.monotonic() - at < WAIT_RECHECK:
            return reason
        return None

    def _watch_decision_after_a_while(self, deploy_id: str) -> None:
        since = self.status.undecided_since
        if since is not None and time.monotonic() - since >= DECISION_WATCH_AFTER:
            self.status.watch = (self.store.keys.decision(deploy_id),)

    def _commit_marked(self, joined: Joined, own: str) -> Verdict | None:
        """A ready host woken by the decided mark of a commit that another expected host
        established (its member key's ``decided``, which only that host's token can
        write; a decision record's ``by`` proves nothing, any host token can write one): a
        verdict to *write the intent on*, not to act on. ``_confirm`` writes ``committed``
        and reads every ack in the same txn; the host flips only if that read establishes
        the commit itself (docs/design.md R4: why the intent may come first)."""
        ack, index = self._known.get(joined.id) or (None, 0)
        if own != READY or ack is None:
            return None
        for node, member in self._member_entries.items():
            if node == self.node or node not in joined.request.expected:
                continue
            if decided_by(member) == {
                "deploy": joined.id,
                "outcome": COMMIT,
                "digest": joined.digest,
            }:
                return Verdict(COMMIT, "", {self.node: ack}, {self.node: index}, decided=True)
        return None

    def _act_on(self, joined: Joined, verdict: Verdict, own: str) -> str:
        deploy_id = joined.id
        if verdict.outcome == UNDECIDED:
            if own == READY and self.status.undecided_since is None:
                self.status.undecided_since = time.monotonic()
            return f"{own or 'pending'}; {verdict.reason}"
        self.status.undecided_since = None
        if verdict.outcome == CONTESTED:
            self._contested(joined, verdict.reason)
            return f"contested: {verdict.reason}"
        verdict = self._confirm(joined, verdict, own)
        if verdict.outcome == CONTESTED:
            self._contested(joined, verdict.reason)
            return f"contested: {verdict.reason}"
        if verdict.outcome == UNDECIDED:
            return f"{own or 'pending'}; intent not written, retrying"
        self.journal.update(established=verdict.outcome, established_at=iso(utcnow()))
        self.log.info(
            "deploy_established", deploy=deploy_id, outcome=verdict.outcome, reason=verdict.reason
        )
        if not verdict.decided:  # the first to establish wakes the others with the record
            self.store.record_decision(
                joined, verdict, node=self.node, mark=self._decided_mark(joined, verdict.outcome)
            )
        else:
            self._check_decision_record(joined, verdict)
        if verdict.outcome == COMMIT:
            moment = self._flip_moment(joined, verdict)
            return self._start("apply", deploy_id, lambda: self._apply(joined, moment))
        self._cancel.set()
        return self._start("abort", deploy_id, lambda: self._abort(joined))

    def _flip_moment(self, joined: Joined, verdict: Verdict) -> float | None:
        """When this host renames ``current`` (a ``time.time()``): the commit's moment, the
        newest ``staged_at`` among the expected hosts' acks (the acks every host reads
        alike once all are ready), plus ``flip_delay``, so that the fleet flips together
        instead of in the order the hosts got through their intents. Never later than
        ``flip_delay`` from now (a host whose clock runs ahead holds nobody back); None
        (at once) when ``flip_delay`` is 0 or no ack says when it was staged."""
        delay = self.app.flip_delay
        acks = [verdict.acks.get(node) for node in joined.request.expected] if delay > 0 else []
        staged: list[float] = []
        for ack in filter(None, acks):
            try:
                staged.append(parse_iso(ack.timings.get("staged_at", "")).timestamp())
            except ValueError:
                continue  # absent or unreadable: the other acks still say when
        if not staged:
            return None
        return min(max(staged), time.time()) + delay

    def _check_decision_record(self, joined: Joined, verdict: Verdict) -> None:
        """A decision record already there that does not say what the acks established
        (forged, or garbage) is reported once; nothing ever acts on it. The record came
        with the verdict's own read: no request for this."""
        recorded = verdict.record
        if (
            recorded is not None
            and recorded.outcome == verdict.outcome
            and recorded.digest in ("", joined.digest)
        ):
            return
        self._report_once(
            f"decision:{joined.id}",
            "decision_not_obeyed",
            deploy=joined.id,
            established=verdict.outcome,
            recorded=recorded.outcome if recorded else "unreadable",
            recorded_by=recorded.by if recorded else "",
            reason="the decision record contradicts the acks or does not parse",
        )

    def _confirm(self, joined: Joined, verdict: Verdict, own: str) -> Verdict:
        """Write the intent into this host's own ack (``committed`` before a flip,
        ``aborted`` before a cleanup), then establish again: of two hosts that established
        opposite verdicts, the one that writes second sees the other's intent and both
        stop (contested) instead of splitting (docs/design.md R4)."""
        intent = COMMITTED if verdict.outcome == COMMIT else ABORTED
        if own in (intent, LIVE, FAILED_AFTER_COMMIT) or (
            intent == ABORTED and own in (FAILED, REFUSED)
        ):
            return verdict  # the intent (or a veto) is already in this host's ack
        known = (verdict.acks.get(self.node), verdict.indexes.get(self.node, 0))
        # The first to establish writes the record and its decided mark (the others'
        # wake-up) in the same txn.
        record: list[dict[str, Any]] = []
        if not verdict.decided:
            record = [self.store.decision_op(joined, verdict, node=self.node)]
            record += filter(None, [self._decided_mark(joined, verdict.outcome)])
        written = self._ack(
            joined,
            intent,
            error=verdict.reason if intent == ABORTED else "",  # why, for readers
            timings={f"{intent}_at": iso(utcnow())},
            known=known,
            establish=True,
            # A commit needs no session clause (every ack is ready): no members tree to read.
            members=intent == ABORTED,
            extra_ops=record,
        )
        if written is not None and written.extras and record:
            self.store.log_decided(joined, verdict, node=self.node)
        if written is None or written.verdict is None:
            self._own.pop(joined.id, None)
            self._known.pop(joined.id, None)
            return Verdict(UNDECIDED, f"could not write {intent}")
        again = written.verdict
        if again.outcome != verdict.outcome:
            return again
        # Same verdict: keep the reason it was first established for (not our own intent).
        return Verdict(
            again.outcome,
            verdict.reason or again.reason,
            again.acks,
            again.indexes,
            again.members,
            decided=again.decided,
            record=again.record,
            ended=again.ended,
        )

    def _decided_mark(self, joined: Joined, outcome: str) -> dict[str, Any] | None:
        return self.store.decided_mark_op(
            joined,
            outcome,
            node=self.node,
            session=self.session(),
            member=self._member_entries.get(self.node),
        )

    def _view_for(self, joined: Joined, verdict: Verdict | None = None) -> DeployView:
        """What a webhook message is made of: the request, the acks, the verdict."""
        decision = None
        if verdict is not None:
            outcome = COMMIT if verdict.outcome == COMMIT else ABORT
            decision = Decision(outcome=outcome, reason=verdict.reason, by=self.node, at="")
        return DeployView(
            joined.request,
            decision,
            dict(verdict.acks) if verdict else {},
            dict(verdict.indexes) if verdict else {},
            None,
            None,
            joined.create_index,
        )

    def _notify_end(self, joined: Joined, verdict: Verdict, result: str) -> None:
        if self.notifier is not None:  # the host that wrote the outcome: once per deploy
            self.notifier.ended(self._view_for(joined, verdict), result, node=self.node)

    def _contested(self, joined: Joined, reason: str) -> None:
        """Stop where it stands: no flip, no post_abort, no tree removed; hold and alarm."""
        message = alarm_text(f"deploy {joined.id} is contested: {reason}")
        # (the loop's thread: a lock held by a prune after this host's part is waited for
        # briefly, and the next cycle places the hold if it is not placed now)
        placed = self._hold_contested(joined.id, message, wait=LOOP_LOCK_WAIT)
        self._alarm(message)
        # Lifted with the hold it placed. With none placed (its write failed, or another
        # hold was there, whose release says nothing of this deploy), never by "no hold
        # now": the hold is placed as soon as it can be (``_lift_released_contested_alarm``)
        # and its release lifts the alarm.
        self._contested_alarm = self.status.alarm
        self._contested_unplaced = None if placed else (joined.id, message)
        # Last: on a full disk this write fails too, after the alarm is up.
        self.journal.update(
            established=CONTESTED, established_at=iso(utcnow()), reason=reason, held=placed
        )

    def _hold_contested(self, deploy_id: str, message: str, *, wait: float | None = None) -> bool:
        """Place the hold of contested deploy ``deploy_id`` unless a hold is there; whether
        this deploy's hold is there now (placed here, or before: its own, found again when
        the deploy is looked at again). A failed write is logged: the alarm says the rest.
        ``wait``: how long to wait for the app's lock (the loop's retries wait little: a
        convergence that stages holds it)."""
        try:
            with self.engine.lock(owner=f"contested {deploy_id}", timeout=wait):
                hold = self.engine.held()
                if hold is None:
                    self.engine.hold(message, by=f"watcher on {self.node}")
                    return True
                return _contested_hold_of(hold, self.node, deploy_id)
        except LockTimeout:
            self.log.info("hold_deferred", deploy=deploy_id, reason="the app's lock is busy")
        except (WatcherError, OSError) as exc:
            self.log.error("hold_failed", deploy=deploy_id, error=str(exc))
        return False

    def _lift_released_contested_alarm(self) -> None:
        """The alarm of a contested deploy, once an operator released its hold. The deploy's
        own step lifts it too, but a host that found the deploy contested after its part
        was done never steps through that deploy again: its alarm stayed (/health 503,
        `status --fleet` exit 1) until the watcher restarted (the attacker review)."""
        if self._start_hold_seen and not self._contested_alarm and not self._contested_unplaced:
            return
        hold = self.engine.held()
        if not self._start_hold_seen:
            self._start_hold_seen = True
            journal = self.journal.read() or {}
            if self.status.alarm:
                pass  # raised since the start: whatever it is, it is said
            elif hold is not None and _contested_hold(hold, self.node):
                # Restarted while held for a contested deploy it judged after its own part:
                # the hold is on disk, the alarm was in memory (DESIGN.md 6.4.4 wants both).
                self._alarm(hold.reason)
                self._contested_alarm = self.status.alarm
                self._contested_unplaced = None
            elif journal.get("established") == CONTESTED and journal.get("held") is False:
                # ... and one whose hold it could not place: its journal says so.
                deploy_id = str(journal.get("deploy"))
                reason = journal.get("reason", "")
                self._alarm(alarm_text(f"deploy {deploy_id} is contested: {reason}"))
                self._contested_alarm = self.status.alarm
                self._contested_unplaced = (deploy_id, self.status.alarm)
        if self._contested_unplaced and _contested_hold_of(
            hold, self.node, self._contested_unplaced[0]
        ):
            # Its own hold is on disk after all (its write raised after the rename, say):
            # placed, so that one release of it is enough.
            self._contested_unplaced = None
        elif self._contested_unplaced and hold is None:
            # Its hold was never placed (the write failed, or an operator's hold was there
            # first and is released now): placed now, so that the host stays where it
            # stands and an operator's `release-hold` is what lifts the alarm (it stayed
            # until a restart, the previous stop's note). Also when another alarm took the
            # slot meanwhile (`current` naming that deploy, not followed): the hold is the
            # contested deploy's own record on this host.
            deploy_id, message = self._contested_unplaced
            if self._hold_contested(deploy_id, message, wait=LOOP_LOCK_WAIT):
                self._contested_unplaced = None
                if (self.journal.read() or {}).get("deploy") == deploy_id:
                    # (deferred on a full disk; after a restart the hold on disk says it)
                    self.journal.update(held=True)
        elif self._contested_alarm and self.status.alarm == self._contested_alarm and hold is None:
            self._clear_alarm(self._contested_alarm, note="hold released")
        if self.status.alarm != self._contested_alarm:
            self._contested_alarm = ""

    def _lift_not_followed_alarm(self) -> None:
        assert self._not_followed is not None
        if self.status.alarm == self._not_followed[1]:  # not a contested deploy's since
            self._clear_alarm(self._not_followed[1])
            hold = self.engine.held()
            if hold is not None and _contested_hold(hold, self.node):
                # Held for a contested deploy whose alarm this one took the slot of (the
                # hold placed meanwhile, say): its alarm again, as DESIGN.md 6.4.4 wants both.
                self._alarm(hold.reason)
                self._contested_alarm = self.status.alarm
        self._not_followed = None

    def _clear_alarm(self, reason: str, **note: str) -> None:
        self.status.alarm = ""
        if self.health is not None:
            self.health.clear_alarm(self.app.name)
        if reason:
            self.log.info("alarm_lifted", reason=reason, **note)

    def _alarm(self, message: str) -> None:
        message = alarm_text(message)
        self.status.alarm = message
        self.log.error("alarm", reason=message)
        if self.health is not None:
            self.health.alarm(self.app.name, message)

    def _ack(self, joined: Joined, state: str, *, error: str = "", **extra: Any) -> Written | None:
        """Write this host's ack; remembers the ack and index it wrote, so the next write
        needs no read (the CAS still checks them against KV)."""
        if "known" not in extra and joined.id in self._known:
            extra["known"] = self._known[joined.id]
        written = self.store.write_progress(
            joined.id,
            self.node,
            state,
            joined=joined,
            session=self.session(),
            error=error,
            **extra,
        )
        if written is not None:
            self._own[joined.id] = written.ack.state
            self._known[joined.id] = (written.ack, written.index)
        else:
            ack, index = self.store.ack(joined.id, self.node)
            self._own[joined.id] = ack.state if ack else ""
            self._known[joined.id] = (ack, index)
        return written

    def _finish_part(self, joined: Joined, inflight_id: str | None, inflight_index: int) -> str:
        """This host's part is done: mark the journal finished, help end the deploy."""
        self._count_part(joined, str((self.journal.read() or {}).get("established")))
        self.journal.update(finished=True)
        cached = self._verdicts.get(joined.id)
        for memo in (self._known, self._own, self._verdicts, self._prepared):
            memo.pop(joined.id, None)  # bounded: nothing of a finished deploy stays here
        self._resumed.discard(joined.id)  # (it grew by an id a deploy: the soak review)
        if self._trim_clock.part_done(time.monotonic()):
            self._trim_clock.trimmed(
                self.store.trim_own_progress(
                    self.node,
                    keep=self._acks_to_keep(joined.id),
                    history_keep=self.config.daemon.history_keep,
                )
            )
        return self._after_own_part(
            joined.id, inflight_index, cached[0] if cached and cached[0].end_read else None
        )

    def _count_part(self, joined: Joined, established: str) -> None:
        """``watcher_deploys_total``: once per deploy this host was expected in, when its
        part is done, by how it ended here. Every host counts its own part (not only the
        one that writes the end), so a fleet's dashboard sums the hosts' counters."""
        if self.metrics is None:
            return
        if established == COMMIT:
            own = self._own.get(joined.id)
            if own is None:  # restarted since its live ack: the ack says how it went
                ack, _ = self.store.ack(joined.id, self.node)
                own = ack.state if ack else ""
            outcome = FAILED_AFTER_COMMIT if own == FAILED_AFTER_COMMIT else COMMITTED
        elif established == ABORT:
            outcome = ABORTED
        else:
            outcome = CONTESTED
        self.metrics.deploys.labels(app=self.app.name, outcome=outcome).inc()

    def _after_own_part(
        self, deploy_id: str, inflight_index: int, read: Verdict | None = None
    ) -> str:
        """Coordinator duties once this host is done: the one holding ``coordinator/<id>``
        ends the deploy when every expected node still holding its named session is final;
        anyone ends it past the apply deadline."""
        journal = self.journal.read() or {}
        try:
            joined = self.journal.joined()
        except (PayloadError, KeyError, TypeError, ValueError):
            self.journal.update(ended=True)
            return "done"
        session = self.session()
        keys = self.store.keys
        past_apply = utcnow() >= parse_iso(joined.request.apply_deadline)  # as in _bystander
        first = min(joined.request.expected) if joined.request.expected else ""
        # The first expected host took the lock with its ready ack: the others contend only
        # once its member key is gone (its session died, its lock with it) or past the
        # deadline. Nobody contends for a deploy it saw end (the end deleted the lock key).
        seen_end = bool(journal.get("ended"))
        contend = first == self.node or first not in self._member_entries or past_apply
        if (
            not seen_end
            and self._coordinating != deploy_id
            and session
            and contend
            and self.store.acquire_coordinator(deploy_id, session, self.node)
        ):
            self._coordinating = deploy_id
        coordinating = self._coordinating == deploy_id
        self.status.coordinating = coordinating
        # The coordinator wakes on every ack; the others on the members watch (a dead
        # coordinator's member key goes with its lock) and on inflight.
        self.status.watch = (keys.progress_prefix,) if coordinating else ()
        if not coordinating and not past_apply and not seen_end:
            return "done; waiting for the end"
        # ``read``: the verdict this host's live ack read (the end's reads included).
        verdict = read or self.store.establish(joined, outcome=True)
        if verdict.ended:
            # Over. An ``inflight`` still (or again) naming it is garbage: clear it.
            inflight, index = self.store.inflight(consistent=True)
            if inflight == deploy_id:
                self.store.clear_inflight(
                    deploy_id, index, "deploy already ended", by=self.node, ended=True
                )
            self._mark_ended(deploy_id)
            self._idle_status()
            return "done"
        # Once per deploy (its journal says so after); not on whether some alarm is set: a
        # not-followed deploy's alarm (``_not_followed``) must not keep this one from its hold.
        if verdict.outcome == CONTESTED and journal.get("established") != CONTESTED:
            self._contested(joined, verdict.reason)
        pending = (
            []
            if verdict.outcome == CONTESTED
            else [
                n
                for n in joined.request.expected
                if verdict.holds_session(n, joined.request.sessions.get(n))
                and (
                    ((a := verdict.acks.get(n)) is None and verdict.outcome != ABORT)
                    or (a is not None and a.state not in NODE_FINAL_STATES)
                )
            ]
        )
        if verdict.outcome == UNDECIDED or (pending and not past_apply):
            return f"done; waiting for {', '.join(pending) or 'the verdict'}"
        ended, rollback, result = self.store.end(
            joined,
            verdict,
            by=self.node,
            history_keep=self.config.daemon.history_keep,
            on_validate_failure=self.app.on_validate_failure,
            expired=past_apply,
            first_index=self.first_index(),
        )
        if ended:
            self._notify_end(joined, verdict, result)
        if ended:
            self._mark_ended(deploy_id)
            self._idle_status()
            return f"ended ({verdict.outcome})" + (f"; rollback {rollback}" if rollback else "")
        return "end lost a race; retrying"

    def _start(self, kind: str, deploy_id: str, fn: Callable[[], None]) -> str:
        if self.busy():
            return f"{self._task_key[0] if self._task_key else 'task'} running"
        failed = self._task_failed
        if failed is not None and failed[:2] == (kind, deploy_id):
            wait = failed[3] - time.monotonic()
            if wait > 0:
                self.status.recheck_at = failed[3]
                return f"{kind} failed, retry in {wait:.0f}s"
        if kind not in ("abort",):
            self._cancel.clear()
            self._cancel_reason = ""
        self._task_key = (kind, deploy_id)
        self._task_started = time.monotonic()
        self._wake_when_done = True
        self._looked_while_busy = False
        self._task = self._worker.submit(self._guard, kind, fn, deploy_id)
        return f"{kind} started"

    def _guard(self, kind: str, fn: Callable[[], None], deploy_id: str = "") -> None:
        try:
            fn()
            if self._task_failed is not None and self._task_failed[:2] == (kind, deploy_id):
                self._task_failed = None
        except ConsulError as exc:
            # KV unreachable mid-task: the next reconcile picks up from the journal.
            self.log.warning("task_interrupted", task=kind, error=str(exc))
            self._task_backoff(kind, deploy_id)
        except Exception as exc:  # a task must never take the worker thread down
            self.log.exception("task_failed", task=kind, error=repr(exc))
            self._task_backoff(kind, deploy_id)
        finally:
            self.engine.in_flight_artifacts.clear()
            if self._wake_when_done:
                self._wake()  # the loop takes the next step now, not on its next tick
            self._wake_when_done = True

    def _task_backoff(self, kind: str, deploy_id: str) -> None:
        """A task that raised is started again after 1, 2, 4... s (at most TASK_BACKOFF_MAX),
        not by the loop's next step at once: a cause that lasts (a write Consul refuses
        while its reads pass, a full state disk, a bug) would spin the loop and the log."""
        failed = self._task_failed
        failures = failed[2] + 1 if failed is not None and failed[:2] == (kind, deploy_id) else 1
        delay = min(2.0 ** (failures - 1), TASK_BACKOFF_MAX)
        self._task_failed = (kind, deploy_id, failures, time.monotonic() + delay)

    # --- prepare / apply / abort (worker thread) ---------------------------------------

    def _run_hooks(
        self, phase: str, ctx: HookContext, *, cancel: Callable[[], bool] | None = None
    ) -> None:
        """``run_hooks`` for this app, each hook's end counted in ``watcher_hook_runs``."""
        run_hooks(self.app, phase, ctx, cancel=cancel, on_result=self._count_hook(phase))

    def _count_hook(self, phase: str) -> Callable[[str], None] | None:
        if self.metrics is None:
            return None
        runs = self.metrics.hook_runs

        def count(result: str) -> None:
            runs.labels(app=self.app.name, phase=phase, result=result).inc()

        return count

    def _hook_context(self, rec: DeployRecord, *, kind: str | None = None) -> HookContext:
        """What the hooks of ``rec`` are told; ``kind`` overrides the request's (a
        convergence runs the hooks of a deploy it missed as ``converge``)."""
        lay = self.engine.layout
        current = self.engine.current_release()
        backup = self.engine.backup_release()
        prev = (
            backup
            if backup and backup != rec.release
            else (current if current != rec.release else self.engine.previous_release())
        )
        return HookContext(
            app=self.app.name,
            deploy_id=rec.id,
            kind=kind or rec.kind,
            artifact=rec.artifact,
            commit=rec.commit,
            branch=rec.branch,
            release=rec.release,
            release_dir=str(lay.release_dir(rec.release)),
            previous_release_dir=str(lay.release_dir(prev)) if prev else "",
            current=str(lay.current),
            current_backup=str(lay.current_backup),
        )

    def _artifact(self, joined: Joined, pre: PrepareRead) -> ArtifactRecord:
        """What to stage, from the acked request itself (url, size, sha256), after checking
        it against the artifact record and its pin (a deploy) or against the committed
        target (a rollback)."""
        rec = joined.request
        ahead = (parse_iso(rec.requested_at) - utcnow()).total_seconds()
        if ahead > MAX_REQUEST_AHEAD:
            raise DeployRefused(
                f"request {rec.id} is dated {rec.requested_at}, {ahead:.0f} s ahead of this "
                f"host's clock (more than {MAX_REQUEST_AHEAD:.0f} s): the clocks disagree, or "
                "the request was not written by watcherctl"
            )
        if pre.pin is not None and (why := pre.pin.differs(self._record_of(rec))) is not None:
            raise ArtifactIntegrityError(why)
        if not rec.sha256 or not rec.url:
            raise ArtifactNotFound(f"request names no artifact content for {rec.artifact}")
        if rec.kind == "rollback":
            target = (
                self.store.committed(
                    rec.target_deploy, node=self.node, first_index=self.first_index()
                )
                if rec.target_deploy
                else None
            )
            if target is None:
                raise DeployRefused(
                    f"rollback target deploy {rec.target_deploy} is not a committed deploy"
                )
            t = target.request
            if (t.release, t.url, t.size, t.sha256) != (rec.release, rec.url, rec.size, rec.sha256):
                raise DeployRefused(
                    f"rollback request differs from committed deploy {t.id}: release "
                    f"{rec.release} sha256 {rec.sha256} vs {t.release} sha256 {t.sha256}"
                )
            # watcherctl's rollback names no build; one that does names the target's.
            if (rec.branch, rec.commit) not in (("", ""), (t.branch, t.commit)):
                raise DeployRefused(
                    f"rollback request says branch {shown(rec.branch)} commit "
                    f"{shown(rec.commit)}, but committed deploy {t.id} was of branch "
                    f"{shown(t.branch)} commit {shown(t.commit)}"
                )
            # The content is read as the committed deploy read it (a rollback request
            # carries no format of its own).
            return replace(self._record_of(rec), format=t.format)
        else:
            if rec.resume_of is None:  # a new deploy's release name is fixed (DESIGN.md 6.1)
                want = release_name(parse_iso(rec.requested_at), rec.artifact)
                if rec.release != want:
                    raise DeployRefused(
                        f"request names release {rec.release}, but a deploy of {rec.artifact} "
                        f"requested at {rec.requested_at} is release {want}"
                    )
            record = pre.artifact
            if record is None:
                raise ArtifactNotFound(
                    f"unknown artifact {rec.artifact}: no record at "
                    f"{self.store.keys.artifact(rec.artifact)}"
                )
            if pre.pin is not None and (why := pre.pin.differs(record)) is not None:
                raise ArtifactIntegrityError(why)
            if (record.url, record.size, record.sha256, record.format) != (
                rec.url,
                rec.size,
                rec.sha256,
                rec.format,
            ):
                # The format too: read as the wrong format, good bytes would be refused,
                # and a refusal is remembered by content.
                raise ArtifactIntegrityError(
                    f"artifact {rec.artifact}: request says sha256 {rec.sha256} ({rec.format}) "
                    f"but the record says sha256 {record.sha256} ({record.format})"
                )
            if (record.branch, record.commit) != (rec.branch, rec.commit):
                # What hooks, the chat message and history say was deployed: the request
                # (an operator's token writes it) must say what CI recorded.
                raise DeployRefused(
                    f"artifact {rec.artifact}: request says branch {shown(rec.branch)} commit "
                    f"{shown(rec.commit)}, but the record says branch {shown(record.branch)} "
                    f"commit {shown(record.commit)}"
                )
        return self._record_of(rec)

    def _check_pin_of(self, rec: DeployRecord) -> None:
        """Content that an artifact id was pinned to never changes, on any path."""
        try:
            pin = self.store.pin(rec.artifact)
        except PayloadError as exc:
            raise ArtifactIntegrityError(
                f"artifact {rec.artifact}: pin unreadable: {exc}"
            ) from None
        if pin is not None and (why := pin.differs(self._record_of(rec))) is not None:
            raise ArtifactIntegrityError(why)

    @staticmethod
    def _record_of(rec: DeployRecord) -> ArtifactRecord:
        return ArtifactRecord(
            id=rec.artifact,
            url=rec.url,
            sha256=rec.sha256,
            size=rec.size,
            format=rec.format,
            branch=rec.branch,
            commit=rec.commit,
        )

    def _prepare(self, joined: Joined) -> None:
        started = time.monotonic()
        rec = joined.request
        ack, index = self._known.get(rec.id) or self.store.ack(rec.id, self.node)
        self._known[rec.id] = (ack, index)
        if ack is not None and ack.state != STAGING:
            self._own[rec.id] = ack.state  # acked before a restart that lost .state/
            return
        # No staging ack yet: a quick prepare acks ready directly; a slow one writes
        # staging with its progress (_staging_progress).
        refused = False
        try:
            if rec.min_protocol > PROTOCOL_VERSION:
                refused = True
                raise DeployRefused(
                    f"this watcher speaks protocol {PROTOCOL_VERSION}, the "
                    f"deploy needs {rec.min_protocol}"
                )
            hold = self.engine.held()
            if hold is not None:
                refused = True
                raise DeployRefused(f"held: {hold.reason} (by {hold.by})")
            session = self.session()
            if not session or rec.sessions.get(self.node) != session:
                refused = True
                raise DeployRefused(
                    "the request names another session for this host "
                    f"({rec.sessions.get(self.node) or 'none'}; this watcher holds "
                    f"{session or 'none'}): it restarted or lost its session since"
                )
            # Read with the join when it guessed the artifact (checked there), else now.
            pre = self._prepared.pop(rec.id, None) or self.store.prepare_read(joined)
            artifact = self._artifact(joined, pre)
            self.engine.in_flight_artifacts.add(artifact.sha256)
            if not self._quick(artifact, rec.release):
                self._show_staging(joined)  # a download or an extraction: shown at once
            self._download(artifact, rec.release, self._staging_cancelled)
            self._check_cancel(stopping=True)
            with self.engine.lock(owner=f"deploy {rec.id}"):
                self.engine.stage(
                    artifact,
                    rec.release,
                    rec.id,
                    cancel=self._staging_cancelled,
                    progress=self._staging_progress(joined),
                )
            info = self.engine.release_info(rec.release) or {}
            if info.get("sha256") not in (None, rec.sha256):
                raise ArtifactIntegrityError(
                    f"release {rec.release} already exists here with sha256 {info.get('sha256')}, "
                    f"the request names {rec.sha256}"
                )
            if pre.pin is None:
                self.store.write_pin(artifact, by=self.node)
            if self.status.prefetch_failed.startswith(f"{artifact.id}: "):
                self.status.prefetch_failed = ""  # this deploy fetched it after all
            self._check_cancel(stopping=True)
            with self.engine.lock(owner=f"deploy {rec.id}"):
                live = self.engine.current_release()
                if live and live != rec.release:
                    try:
                        self.engine.set_backup(live)  # reads the live release.json itself
                    except FlipError:
                        problem = self.engine.live_problem(live)
                        if problem is None:
                            raise
                        # Nothing to come back to: this deploy is what repairs the host
                        # (refusing here made every deploy abort on it).
                        self.log.warning("live_release_broken", release=live, problem=problem)
                        self.engine.clear_backup()
            self._check_cancel(stopping=True)
            hooks = hook_commands(
                self.app, "post_release", self.engine.layout.release_dir(rec.release)
            )
            if self.journal.has("post_release"):  # done phases do not run again
                self.journal.done("staged")
            elif hooks:
                self.journal.done("staged")
                self._show_staging(joined)  # hooks take a while: show it at once
                try:
                    self._run_hooks(
                        "post_release", self._hook_context(rec), cancel=self._cancel.is_set
                    )
                except HookError:
                    self._check_cancel()  # stopped: the deploy no longer needs it
                    raise
                _check_still_staged(self.engine, rec.release)
                self._check_hooks_kept_current("post_release", rec.release, live)
                self.engine.mark_post_release_done(rec.release)
                self.journal.done("post_release")
            else:  # no hook to run: both phases in one write
                self.engine.mark_post_release_done(rec.release)
                self.journal.done("staged", "post_release")
            # A hook that would run after the commit but cannot (a typo in the config's
            # path, a release hook left without its x bit): a "no" now, before anything
            # switches, not a failure after the whole fleet flipped (and again in the
            # automatic rollback).
            _check_runnable(self.app, self.engine.layout, rec.release)
            why = self.store.check_sessions(joined, pre.members)
            if why is not None:
                refused = True
                raise DeployRefused(why)
            abort = pre.abort
            if abort is None and time.monotonic() - started > ABORT_POLL_AFTER:
                abort = self.store.abort_requested(rec.id)  # one that came while staging
            if abort is not None:
                why = f"{ABORT_REQUESTED} by {abort.by}: {abort.reason}".rstrip(": ")
                self.log.info("prepare_stopped", deploy=rec.id, reason=why)
                self._ack(
                    joined,
                    ABORTED,
                    error=why,
                    timings={"failed_at": iso(utcnow())},
                    before_ready=True,
                )
                self._observe("prepare", started)
                return
            # A hold placed while this host staged (`watcherctl hold`, `rollback --local`):
            # looked for again just before the ack, or the commit would override it. Under
            # the app's lock, which those take to read the journal and write the hold: one
            # placed before this look is seen here; one placed after it finds post_release
            # journaled above, and is refused there while this deploy is undecided.
            with self.engine.lock(owner=f"hold check of deploy {rec.id}"):
                hold = self.engine.held()
            if hold is not None:
                refused = True
                raise DeployRefused(f"held: {hold.reason} (by {hold.by}), placed while staging")
            if utcnow() >= self._deadlines(rec)[0]:
                raise DeployRefused(
                    "prepare deadline passed before this host was ready"
                    + late_sight_note(self.journal.read() or {}, rec)
                )
        except (_Cancelled, StagingCancelled):
            if self._stopping.is_set() and not self._cancel.is_set():
                # The watcher stops: no ack, nothing undone; the restart resumes it from
                # the journal (a download from its partial file).
                self.log.info("prepare_paused", deploy=rec.id, reason="the watcher stops")
                return
            # Without a reason the loop cancelled it on an abort it established.
            why = self._cancel_reason or ABORT_ESTABLISHED
            self.log.info("prepare_cancelled", deploy=rec.id, reason=why)
            self._ack(
                joined, _stopped_state(why), error=f"staging stopped: {why}", before_ready=True
            )
            return
        except ConsulUnavailable:
            raise  # KV unreachable: retried from the journal, not a failure of this host
        except (WatcherError, OSError) as exc:
            self.log.error("prepare_failed", deploy=rec.id, error=str(exc))
            self._ack(
                joined,
                REFUSED if refused else FAILED,
                error=str(exc),
                output_tail=getattr(exc, "output_tail", ""),
                timings={"failed_at": iso(utcnow())},
            )
            self._observe("prepare", started)
            return
        except Exception as exc:
            # A bug, not a verdict on the release: still a "no" (nobody flips), and acked, so
            # the loop does not start the same prepare again and again until the deadline.
            self.log.exception("prepare_crashed", deploy=rec.id, error=repr(exc))
            self._ack(
                joined,
                FAILED,
                error=f"internal error while staging: {exc!r}",
                timings={"failed_at": iso(utcnow())},
            )
            self._observe("prepare", started)
            return
        if self._stopping.is_set():  # a last look: staged, but not acked by a stopping one
            self.log.info("prepare_paused", deploy=rec.id, reason="the watcher stops")
            return
        marker = self._wake_marker(rec.id)  # before the txn: what its verdict read covers
        lock = []
        if self._lock_with_ack == rec.id and (session := self.session()):
            key = self.store.keys.coordinator(rec.id)
            lock = [TxnOp.lock(key, self.node.encode(), session)]
        try:
            written = self._ack(
                joined,
                READY,
                timings={"staged_at": iso(utcnow())},
                sha256=rec.sha256,
                establish=True,
                extra_ops=lock,
            )
        except AbortRequested:
            abort = self.store.abort_requested(rec.id)
            who = f" by {abort.by}: {abort.reason}".rstrip(": ") if abort else ""
            self._ack(joined, ABORTED, error=f"{ABORT_REQUESTED}{who}", before_ready=True)
            return
        if self._stopping.is_set():
            # The stop came during the ack's own request: acked all the same (the window
            # is that one request); the fleet may commit on this host, which applies it
            # only when its watcher runs again.
            self.log.warning("ready_acked_while_stopping", deploy=rec.id)
        if written is not None and written.extras and lock:
            self._coordinating = rec.id
        if written is not None and written.verdict is not None:
            self._verdicts[rec.id] = (written.verdict, marker)
        self.log.info(
            "prepare_ready",
            deploy=rec.id,
            release=rec.release,
            acked=self._own.get(rec.id),
            took_ms=round((time.monotonic() - started) * 1000),
        )
        self._observe("prepare", started)

    def _download(
        self, artifact: ArtifactRecord, release: str, cancel: Callable[[], bool] | None = None
    ) -> None:
        """Fetch the artifact outside the app lock, so operators are not locked out for the
        length of a download; staging then finds it in the cache. ``cancel``: the abort's
        (a prepare's also stops for a stop: ``_staging_cancelled``)."""
        if self.engine.cache is None or self.engine.is_complete(release):
            return
        if self.engine.prefetched_path(artifact).is_dir():
            return
        self.engine.fetch(artifact, cancel=cancel or self._cancel.is_set)

    def _quick(self, artifact: ArtifactRecord, release: str) -> bool:
        """Whether staging is a rename (pre-extracted, or the release is already there)."""
        return self.engine.is_complete(release) or self.engine.prefetched_path(artifact).is_dir()

    def _show_staging(self, joined: Joined) -> None:
        if self._own.get(joined.id, "") == "":
            self._ack(joined, STAGING, timings={"staging_at": iso(utcnow())})

    def _staging_progress(self, joined: Joined) -> Callable[[int, int], None]:
        """Report bytes and members staged so far in this host's ack, at most every 2 s, so
        `status` and the web page show a long extraction moving (and where it stopped)."""
        last = [time.monotonic()]

        def report(written: int, members: int) -> None:
            self._extracted = (joined.id, written, members)  # for a deadline's message
            now = time.monotonic()
            if now - last[0] < STAGING_REPORT_EVERY:
                return
            last[0] = now
            try:
                self._ack(joined, STAGING, staged=(written, members))
            except ConsulError as exc:
                self.log.warning("staging_progress_not_written", error=str(exc))

        return report

    def _stop_staging(self, reason: str) -> None:
        if not self._cancel.is_set():
            self._cancel_reason = reason
            self._cancel.set()

    def _staging_cancelled(self) -> bool:
        """A prepare's download and extraction stop for an abort and for a stop alike."""
        return self._cancel.is_set() or self._stopping.is_set()

    def _check_cancel(self, *, stopping: bool = False) -> None:
        if self._cancel.is_set() or (stopping and self._stopping.is_set()):
            raise _Cancelled

    def _apply(self, joined: Joined, flip_at: float | None = None) -> None:
        """Flip (at ``flip_at`` if it is still ahead: ``_flip_moment``), then the hooks
        after the flip and the live ack."""
        started = time.monotonic()
        rec = joined.request
        ctx = self._hook_context(rec)
        decided_at = flipped_at = iso(utcnow())
        failed: HookError | None = None
        flipped_from = ""  # the release `current` left here, when this call flipped it
        moved_at: str | None = None  # when this call moved `current`
        if not self.journal.has("flipped"):
            try:
                if not self.engine.is_complete(rec.release):  # lost .state/ or the tree
                    artifact = self._record_of(rec)
                    self._download(artifact, rec.release)
                    with self.engine.lock(owner=f"deploy {rec.id}"):
                        # committed: the acks establish it (``_act_on``)
                        self.engine.stage(artifact, rec.release, rec.id, replace_live=True)
                if not self.journal.has("post_release"):
                    failed = self._post_release_before_flip(joined, ctx)
                elif not self.engine.post_release_done(rec.release):
                    # The tree post_release ran on is gone (removed by hand after the ready
                    # ack): the one staged again has not had it, also after a crash during
                    # this run of it (the attacker review: it was switched to without, its
                    # virtualenv never built). The tree's own marker says, not the journal.
                    self.log.warning("post_release_again", deploy=rec.id, release=rec.release)
                    failed = self._post_release_or_error(rec, ctx)
                if failed is None:
                    with self.engine.lock(owner=f"deploy {rec.id}"):
                        live = self.engine.current_release()
                        if live != rec.release:
                            self.engine.flip(rec.release, not_before=flip_at)
                            flipped_from = live or ""
                            # When `current` moved (renamed, its directory synced), not
                            # after the bookkeeping below: applied.json costs two fsyncs.
                            moved_at = iso(utcnow())
                        self._write_applied(joined)
            except (WatcherError, OSError) as exc:
                # Nothing changed yet (S3 unreachable, the lock busy, the flip refused):
                # not a failure after commit. Retried for as long as it fails (the fleet
                # committed: this host's place is on it), after a growing pause: a failure
                # that lasts (a full disk, a directory where `current` should be) must not
                # spin the loop and flood the log.
                if moved_at is None:
                    self._switch_failed(rec, "flip_failed", exc)
                else:  # `current` moved, applied.json not written: the retry writes it
                    self._switch_failed(rec, "applied_not_written", exc, switched=True)
                return
            if failed is not None:
                # `current` stays where it is: the ack says so, convergence retries. Not
                # in the retry above: a failed write of this ack is the task's failure,
                # not a reason to run the hook again and flip.
                error = f"post_release failed before the flip, current not moved: {failed}"
                timings = {"decided_at": decided_at, "failed_at": iso(utcnow())}
                tail = failed.output_tail
                self._applied(joined, started, FAILED_AFTER_COMMIT, error, tail, timings)
                return
            self._apply_retry = None
            self._failing("switch", "")
            flipped_at = moved_at or iso(utcnow())
            release_dir = self.engine.layout.release_dir(rec.release)
            if hook_commands(self.app, "post_symlink", release_dir):
                self.journal.done("flipped")
            else:  # no hook to run: both phases in one write
                self.journal.done("flipped", "post_symlink")
        else:
            # Back after a stop between the flip and the live ack: an operator may have
            # moved `current` meanwhile (`rollback --local`, allowed while no watcher runs),
            # and the hooks ran against that tree and it acked live for a release it did
            # not serve (the operator review). It did not go live: no hook runs, the ack
            # says so. Not switched again (the third review: with the hold released, that
            # went back to a release the fleet had rolled away from since): convergence
            # takes the host where the fleet is, with its checks, unless it is held.
            try:
                with self.engine.lock(owner=f"deploy {rec.id}"):
                    live, hold = self.engine.current_release(), self.engine.held()
            except (WatcherError, OSError) as exc:
                self._switch_failed(rec, "apply_resume_failed", exc)
                return
            if live != rec.release:
                now = (
                    f"it is held ({hold.reason}, by {hold.by})"
                    if hold is not None
                    else "the hold was released since: it converges to the fleet's release"
                )
                moved = (
                    f"current was moved to {live or 'nothing'} on this host after its switch "
                    f"to {rec.release}, and {now}; the hooks after the switch (post_symlink, "
                    "validate) did not run"
                )
                self.log.error("apply_moved_by_hand", deploy=rec.id, error=moved)
                timings = {"decided_at": decided_at, "failed_at": iso(utcnow())}
                self._applied(joined, started, FAILED_AFTER_COMMIT, moved, "", timings)
                return
        state, error, tail = LIVE, "", ""
        try:
            if self.metrics is not None:
                self.metrics.flip_timestamp_seconds.labels(app=self.app.name).set(time.time())
                # At the flip, not at the loop's next step: a scrape after this host's
                # live ack (after `deploy` said committed) names the new release.
                self.metrics.set_current_release(self.app.name, rec.release)
            if not self.journal.has("post_symlink"):
                self._run_hooks("post_symlink", ctx)
                self._check_hooks_kept_current("post_symlink", rec.release, rec.release)
                self.journal.done("post_symlink")
            with self.engine.lock(owner=f"deploy {rec.id}"):
                self.engine.clear_backup()
            if hook_commands(self.app, "validate", self.engine.layout.release_dir(rec.release)):
                # A health check can take a while: the host record names the release
                # `current` is on now, not only with the live ack (one write more, only
                # where validate runs; after post_symlink, which a slow Consul must not
                # delay). Its state says it is applying (committed, its intent written before
                # any flip), also when the loop has not said so yet after a restart: readers
                # tell it from a host that converged (`status --fleet`'s NOT LIVE yet).
                self.status.state = COMMITTED
                self._write_host(rec.release, force=True)
            self._run_hooks("validate", ctx)
            self._check_hooks_kept_current("validate", rec.release, rec.release)
        except (WatcherError, OSError) as exc:
            self.log.error("apply_failed", deploy=rec.id, error=str(exc))
            state, error, tail = FAILED_AFTER_COMMIT, str(exc), getattr(exc, "output_tail", "")
        timings = {"decided_at": decided_at, "flipped_at": flipped_at}
        timings["live_at" if state == LIVE else "failed_at"] = iso(utcnow())
        self._applied(joined, started, state, error, tail, timings, flipped_from)

    def _switch_failed(
        self, rec: DeployRecord, event: str, exc: Exception, *, switched: bool = False
    ) -> None:
        """A committed deploy's switch failed before `current` moved (``switched``: right
        after it, the record of it not written): the next try after 1, 2, 4... s (up to
        APPLY_BACKOFF_MAX), said in the log and in `status`."""
        failures = (
            self._apply_retry[1] + 1 if self._apply_retry and self._apply_retry[0] == rec.id else 1
        )
        delay = min(2.0 ** (failures - 1), APPLY_BACKOFF_MAX)
        self._apply_retry = (rec.id, failures, time.monotonic() + delay)
        what = f"current is on it, but the record of the switch: {exc}" if switched else exc
        self._failing("switch", f"{rec.release}: {what}")
        self.log.error(event, deploy=rec.id, error=str(exc), retry_in_s=delay, failures=failures)

    def _failing(self, step: str, error: str) -> None:
        """``error`` ("" when none) of a ``switch`` or ``converge`` that is retried: for
        `status` (status.json) and the ``watcher_retrying`` gauge."""
        if step == "switch":
            self.status.apply_error = error
        else:
            self.status.converge_error = error
        if self.metrics is not None:
            self.metrics.retrying.labels(app=self.app.name, step=step).set(1 if error else 0)

    def _applied(
        self,
        joined: Joined,
        started: float,
        state: str,
        error: str,
        tail: str,
        timings: dict[str, str],
        flipped_from: str = "",
    ) -> None:
        """The end of this host's apply: its live (or failed_after_commit) ack, with its
        host record in the same txn, then the prune."""
        rec = joined.request
        self.status.state = state
        self._apply_retry = None
        self._failing("switch", "")
        # The host record rides in the same txn; it names what `current` is on here.
        host = self._host_record(self.engine.current_release())
        # The coordinator reads what the end needs in the same txn (the acks, the outcome,
        # inflight, current, history): it ends the deploy, or watches the others' acks from
        # this write on, with no read of its own.
        coordinating = self._coordinating == rec.id
        marker = self._wake_marker(rec.id)
        written = self._ack(
            joined,
            state,
            error=error,
            output_tail=tail,
            timings=timings,
            extra_ops=[TxnOp.set(self.store.keys.host(self.node), host.to_json())],
            establish=coordinating,
            outcome=coordinating,
            flipped_from=flipped_from,
        )
        if written is not None:
            with self._host_lock:
                self._host_state = (host.release, host.alarm, host.hold, host.broken)
            if written.verdict is not None:
                self._verdicts[rec.id] = (written.verdict, marker)
                self.status.watch_index = written.index
        self.journal.done("applied")
        # Once live, a host that does not coordinate has nothing to do until the deploy
        # ends (its `inflight` watch) or its coordinator dies (the members watch): no
        # wake-up of the loop for it (its next tick marks the journal finished).
        self._wake_when_done = coordinating
        self._observe("apply", started)
        self._prune(committed=(rec.id, rec.release))
        self.log.info(
            "deploy_live" if state == LIVE else "deploy_failed_after_commit",
            deploy=rec.id,
            release=rec.release,
            took_ms=round((time.monotonic() - started) * 1000),
        )

    def _post_release_before_flip(self, joined: Joined, ctx: HookContext) -> HookError | None:
        """Run ``post_release`` on a tree this host did not run it on in this deploy, before
        the flip, as convergence does; its error if it failed.

        Its ready ack says it ran, but its journal does not: it lost ``.state/`` after
        acking, or another holder of its token acked in its name. Either way the release is
        not what the other hosts checked until the hook has run here."""
        rec = joined.request
        # The request key's own CreateIndex when this host read it: the ack's (which gave
        # ``joined.create_index``) is what the forger wrote.
        made_at = self._request_index.get(rec.id) or joined.create_index
        if 0 < self._daemon_first_index() < made_at:
            # This watcher's state recorded a session before the request was made, and it
            # journals a deploy before it acks in it: the ack is not its own, unless the
            # journal was removed since.
            self._report_once(
                f"ack:{rec.id}",
                "own_ack_not_journaled",
                deploy=rec.id,
                reason=(
                    "a ready ack in this host's name that this watcher has no journal of: "
                    "another holder of its token wrote it, or .state/ was removed (or is "
                    "another one: the app's `root` changed across a restart)"
                ),
            )
        if hook_commands(self.app, "post_release", self.engine.layout.release_dir(rec.release)):
            self.log.warning("post_release_before_flip", deploy=rec.id, release=rec.release)
        return self._post_release_or_error(rec, ctx)

    def _check_hooks_kept_current(self, phase: str, release: str, expected: str | None) -> None:
        """After ``phase``'s hooks for ``release``: ``current`` still names ``expected``, as
        when they started (after post_release: at least not ``release`` yet). A hook that
        switched it (a "roll myself back" post_symlink; a post_release that switched to the
        release not committed yet, a deploy tool's habit) left the host off the fleet's
        release while its ack said live, or serving a release no one had committed; and
        convergence, taking it back at once, ran the hook again: ~50 switches a second,
        hooks included, with no pause (the attacker review). A ``HookError``: the step
        fails (convergence retries with backoff)."""
        commands = hook_commands(self.app, phase, self.engine.layout.release_dir(release))
        if not commands:
            return
        live = self.engine.current_release()
        if live == expected:
            return
        if phase == "post_release" and live != release:
            # Moved, but not to the release not committed yet: nothing serves it early,
            # and the flip still goes from whatever `current` is (a directory an operator
            # copied there makes the flip fail and retry, test_deploy_faults).
            return
        hold = self.engine.held()
        why = (
            # `rollback --local` while the hooks ran: the hold says so (the code review)
            f"moved while they ran, held here ({hold.reason}, by {hold.by})"
            if hold is not None
            else f"{HOOK_MOVED_CURRENT} (the watcher does)"
        )
        raise current_moved(
            phase,
            ", ".join(argv[0] for argv in commands),
            live,
            expected,
            f"{why}; this host does not serve what its ack would say",
        )

    def _post_release_or_error(self, rec: DeployRecord, ctx: HookContext) -> HookError | None:
        try:
            self._post_release(rec, ctx, self.journal)
        except HookError as exc:
            self.log.error("post_release_failed_after_commit", deploy=rec.id, error=str(exc))
            return exc
        return None

    def _post_release(self, rec: DeployRecord, ctx: HookContext, journal: Journal) -> None:
        """Run ``post_release`` (if the app or the release has one), then mark it done on
        the tree and in ``journal``: a convergence's, or a deploy's apply that finds it was
        never run here. The prepare runs it itself (it can be cancelled, and journals it
        together with the staging when there is no hook)."""
        before = self.engine.current_release()
        self._run_hooks("post_release", ctx)
        _check_still_staged(self.engine, rec.release)
        self._check_hooks_kept_current("post_release", rec.release, before)
        self.engine.mark_post_release_done(rec.release)
        journal.done("post_release")

    def _abort(self, joined: Joined) -> None:
        rec = joined.request
        ctx = self._hook_context(rec)
        if self.engine.post_release_done(rec.release) and self.journal.has("post_release"):
            try:
                self._run_hooks("post_abort", ctx)
            except HookError as exc:
                self.log.error("post_abort_failed", deploy=rec.id, error=str(exc))
        with self.engine.lock(owner=f"abort {rec.id}"):
            self.engine.clear_backup()
            info = self.engine.release_info(rec.release)
            staged_here = info is not None and info.get("deploy_id") == rec.id
            if (
                staged_here
                and self.journal.has("post_release")
                and self.engine.current_release() != rec.release
            ):
                self.engine.drop_release(rec.release)
        self.journal.done("aborted")
        self.log.info("deploy_aborted_here", deploy=rec.id, release=rec.release)

    def _observe(self, phase: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.deploy_phase_seconds.labels(app=self.app.name, phase=phase).observe(
                time.monotonic() - started
            )

    def _prune(self, *, dry_run: bool = False, committed: tuple[str, str] | None = None) -> None:
        """Keep the newest ``keep_releases`` after a deploy (the engine's protections apply).
        ``dry_run``: only learn whether a prune would be blocked (at start: releases left
        piling up by an earlier run are shown before the next deploy). ``committed``: the
        deploy and release this host just applied, which its end makes the fleet's
        ``current`` (the one it replaces becoming ``previous``): kept as the fleet's."""
        journal = self.journal.read()
        in_flight = (
            {str(journal["request"]["release"])} if journal and "request" in journal else set()
        )
        seen = self._fleet_current
        fleet = fleet_releases(seen)
        if committed is not None and (
            seen is None or (committed[0] != seen.deploy and committed[1] != seen.release)
        ):
            # Its end is still to come: `current` will name it, and the one seen now
            # becomes `previous` (the one before that goes).
            fleet = {committed[1]: "the fleet's release"}
            if seen is not None:
                fleet[seen.release] = "the fleet's previous release (rollback target)"
        try:
            if dry_run:
                plan = self.engine.plan_prune(in_flight=in_flight, fleet=fleet)  # no lock
            else:
                with self.engine.lock(owner="prune after deploy"):
                    plan = self.engine.plan_prune(in_flight=in_flight, fleet=fleet)
                    self.engine.prune(plan=plan)
        except (WatcherError, OSError, KeyError, TypeError) as exc:
            self.log.warning("prune_failed", error=str(exc))
            return
        blocked = plan.blocked or ""
        if blocked:
            blocked = f"{blocked}; {len(plan.held_back)} old release(s) kept that would go"
        self.status.prune_blocked = blocked
        if self.metrics is not None:
            self.metrics.prune_blocked.labels(app=self.app.name).set(1 if blocked else 0)

    def check_prune(self) -> None:
        """At start: whether a prune would be blocked now (status and the metric say so)."""
        self._prune(dry_run=True)

    def _acks_to_keep(self, finished: str) -> list[str]:
        """The deploys whose acks of this host's a trim must spare, known here rather than
        from KV: `history` (its `trimmed` list) and `current` are keys any host's token
        writes, and one host listing every deploy as trimmed, `current` made unreadable,
        had every other host delete the acks that make the fleet's `current` and its
        rollback target trusted (a host that came back then stayed on its old release).
        So: the deploy just finished, the ones this host applied last, and the ones that
        staged its live, previous and backup releases and the newest ``keep_releases`` on
        disk (not every release on disk: with prune blocked, that was every deploy's, and
        nothing was ever trimmed)."""
        keep = [finished, *self._applied_recently]
        with contextlib.suppress(OSError, WatcherError):
            staged = [i for i in self.engine.list_releases() if i.complete and i.deploy_id]
            keep += [i.deploy_id for i in staged if i.is_current or i.is_previous or i.is_backup]
            keep += [i.deploy_id for i in staged[-self.app.keep_releases :]]
        return keep

    def _applied_record(self) -> dict[str, Any]:
        """``applied.json`` as written by ``_write_applied``; {} when it is missing, is not
        a JSON object (an earlier version's, or damaged) or cannot be read."""
        return self._read_applied() or {}

    def _read_applied(self) -> dict[str, Any] | None:
        """``applied.json``; {} when it is missing or not a JSON object, None when it cannot
        be read for another reason (a read error says nothing of its content)."""
        try:
            data = json.loads((self.engine.layout.state_dir / APPLIED_NAME).read_text())
        except FileNotFoundError:
            return {}
        except OSError:
            return None
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _read_applied_recently(self) -> list[str]:
        data = self._applied_record()
        try:
            recent = data.get("recent") or [data["deploy"]]
            return [str(d) for d in recent if isinstance(d, str)][-APPLIED_KEPT:]
        except (KeyError, TypeError):
            return []

    def _write_applied(self, joined: Joined) -> None:
        self._record_applied(joined.id, joined.create_index, joined.request.release)

    def _record_applied(self, deploy_id: str, create_index: int, release: str) -> None:
        recent = [d for d in self._applied_recently if d != deploy_id] + [deploy_id]
        self._applied_recently = recent[-APPLIED_KEPT:]
        atomic_write_json(
            self.engine.layout.state_dir / APPLIED_NAME,
            {
                "deploy": deploy_id,
                "create_index": create_index,
                "release": release,
                "recent": self._applied_recently,
            },
        )

    def _applied_index(self) -> int:
        """The CreateIndex of the deploy this host is on: from ``applied.json``, or, when
        that is gone or names another release (a wiped ``.state/``, an earlier version),
        from this host's own live acks (``DeployStore.own_live_index``, read once per
        release). Without it, a `current` pointed back at an older deploy moved such a
        host backwards once a forged ack had vetoed the deploy it was on (the attacker
        review). 0 when neither says."""
        local = self.engine.current_release()
        data = self._applied_record()
        if data.get("release") == local:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return int(data["create_index"])
        if local is None:
            return 0
        if self._own_index is None or self._own_index[0] != local:
            try:
                index, deploy_id = self.store.own_live_index(self.node, local)
            except (ConsulError, PayloadError) as exc:
                self.log.warning("own_acks_not_read", error=str(exc))
                return 0
            self._own_index = (local, index)
            if index and not data:
                self._restore_applied(deploy_id, index, local)
        return self._own_index[1]

    def _restore_applied(self, deploy_id: str, index: int, local: str) -> None:
        """applied.json gone (a wiped `.state/`) or not JSON: written again from this
        host's own live ack of ``deploy_id``, so that `current` moved by hand from now on
        is said (``_say_moved_here``). Under the app's lock, as every other write of it,
        and only while the link still names ``local`` and the file is still lost (not
        after a read error: an applied.json that names another release than the link is
        the evidence of a hand edit). A move made while the state was gone cannot be told
        from the watcher's own, and is taken as it is."""
        try:
            with self.engine.lock(owner="applied.json restore", timeout=1.0):
                if self.engine.current_release() != local or self._read_applied() != {}:
                    return
                self._record_applied(deploy_id, index, local)
        except (OSError, LockTimeout) as exc:
            self.log.warning("applied_record_not_restored", error=str(exc))
            return
        self.log.info("applied_record_restored", deploy=deploy_id, release=local)

    # --- converge --------------------------------------------------------------------

    def _converge(self, cached: tuple[CurrentRecord | None, int] | None = None) -> str:
        current, _ = cached if cached is not None else self.store.current()
        self._lift_released_contested_alarm()
        if self._not_followed is not None and (
            current is None or current.deploy != self._not_followed[0]
        ):
            self._lift_not_followed_alarm()
        local = self.engine.current_release()
        # Before the host record, which says it (a host serving nothing showed as fine in
        # `status --fleet`, the operator review). (A link made by hand to what is no
        # release, `releases/hotfix`, is no release here: None, which the convergence below
        # replaces.)
        live_broken = local is not None and self._live_broken(local)
        self._write_host(local)
        first_look = self._acks_looked is None
        if current is None and not first_look:
            return "idle (no committed release yet)"
        journal = self.converge_journal.read()
        fleet_release = current.release if current is not None else None
        unfinished = journal is not None and journal.get("release") == fleet_release
        # `current` names the fleet's release but its tree is gone or incomplete (removed
        # by hand, a disk repaired): the host serves nothing, and every deploy would abort
        # on it. Staged again from the committed deploy, like any host that is behind.
        broken = local == fleet_release and live_broken
        on_current = local == fleet_release and not unfinished and not broken
        if on_current and not first_look:
            self._failing("converge", "")
            self._converge_failures = 0
            self._moved_here = None
            return "idle"
        if not on_current and current is not None and self.engine.held() is not None:
            # Held: not retried (`status` shows the hold); its release tries again at once.
            self._failing("converge", "")
            self._converge_failures, self._converge_retry_at = 0, 0.0
            if broken:
                return f"held; the live release {local} is not complete here"
            return f"held (fleet is on {fleet_release}, this host on {local})"
        if self.busy():
            return "converging"
        wait = self._converge_retry_at - time.monotonic()
        if wait > 0:
            return f"converge failed, retry in {wait:.0f}s: {self.status.converge_error}"
        later = self._later_than_current(current, local)
        if later is not None and later.request.release == local:
            # On it already (its applied.json lost or older): `current` is behind this host.
            return f"idle; the acks commit {later.id}, which this host is on: current not obeyed"
        if later is not None:
            if self.engine.held() is not None:
                return f"held (the acks commit {later.request.release}, this host on {local})"
            return self._start_converge(later, current.deploy if current else None)
        if current is None:
            return "idle (no committed release yet)"
        if on_current:
            self._failing("converge", "")
            self._converge_failures = 0
            return "idle"
        joined, why = self.store.committed_or_why(
            current.deploy, node=self.node, first_index=self.first_index()
        )
        if joined is None and why:
            # Left out of it, or an ack changed after its commit while the other hosts
            # run it (contested): not followed, and said where an operator looks
            # (/health, status, the host record), not only in the log. No hold: this host
            # stays where it is anyway, and a hold would make the deploy that moves every
            # host abort here.
            message = alarm_text(
                f"current names deploy {current.deploy}, which {why}: not followed"
            )
            # Again when another alarm took its place meanwhile (a contested deploy's, its
            # hold released since): /health and the record must say this one.
            if (
                self._not_followed is None
                or self._not_followed[1] != message
                or self.status.alarm != message
            ):
                self._not_followed = (current.deploy, message)
                self._alarm(message)
            return f"idle; {message}"
        if joined is not None and self._not_followed is not None:
            # Trusted now (this host learnt since when it is in the app): no longer an alarm.
            self._lift_not_followed_alarm()
        if joined is None:
            self._report_once(
                f"current:{current.deploy}",
                "current_not_obeyed",
                deploy=current.deploy,
                reason="its commit predicate does not hold (no complete set of ready acks)",
            )
            return f"idle; current names {current.deploy}, which is not committed: not obeyed"
        if joined.create_index < self._applied_index():
            self._report_once(
                f"older:{current.deploy}",
                "current_not_obeyed",
                deploy=current.deploy,
                reason="it is older than the deploy this host is on",
            )
            return f"idle; current names an older deploy {current.deploy}: not obeyed"
        return self._start_converge(joined, joined.id)

    def _start_converge(self, joined: Joined, pointed: str | None) -> str:
        """Converge to ``joined``, a deploy this host established as committed, unless its
        artifact's pin refuses it; ``pointed``: the deploy `current` names now."""
        try:
            self._check_pin_of(joined.request)
        except ArtifactIntegrityError as exc:
            self._report_once(
                f"pin:{joined.id}", "current_not_obeyed", deploy=joined.id, reason=str(exc)
            )
            return f"idle; {exc}"
        self._say_moved_here(joined.request.release)
        return self._start("converge", joined.id, lambda: self._converge_to(joined, pointed))

    def _say_moved_here(self, target: str) -> None:
        """Log, once each time it happens, that this host's `current` was moved since the
        watcher last switched it (``applied.json`` names another release than the link
        does) and is now put back: repointed or removed by hand, or a `rollback --local`
        whose hold was released since. The convergence runs the release's hooks again; an
        operator who moved it by hand must be able to find why it moved back (the status
        review). Not for a host that missed a deploy (its ``applied.json`` names the
        release it is on), nor for a switch to ``target`` whose record a crash cut short
        (the link names ``target`` already), nor after a wiped ``.state/``."""
        local = self.engine.current_release()
        if local == target or self._moved_here == (local, target):
            return
        applied = self._applied_record().get("release")
        if not isinstance(applied, str) or applied == local:
            return
        self._moved_here = (local, target)
        moved = (
            f"`current` was moved to {local}"
            if local is not None
            else "`current` was removed or pointed at no release of this app"
        )
        self.log.warning(
            "current_moved_here",
            release=local,
            applied=applied,
            fleet_release=target,
            reason=(
                f"{moved} after the watcher had switched it to {applied} (by hand, or a "
                f"`rollback --local` whose hold was released): the watcher converges to "
                f"the fleet's release {target}, its hooks run as converge; `watcherctl "
                "hold` keeps a host where it is"
            ),
        )

    def _later_than_current(
        self, current: CurrentRecord | None, local: str | None
    ) -> Joined | None:
        """A committed deploy later than both the one ``current`` names and the one this
        host is on, by the acks (``DeployStore.newest_committed``), or None. ``current`` is
        any host's word (DESIGN.md 6.4.6): pointed back at an older committed deploy, or
        at the release of a host that was away, it would leave that host behind the fleet.

        Looked for once after start (a host that was away may find `current` naming its
        own release), and whenever this host is behind `current`; not after each deploy
        this host applied (``_converge`` is idle then), so a deploy costs no more. Once per
        (`current`'s deploy, this host's release): a converge that fails and retries does
        not look again. A read that fails counts as nothing found, and is tried again."""
        key = (current.deploy if current else None, local)
        if self._acks_looked is not None and self._acks_looked[0] == key:
            return self._acks_looked[1]
        above = self._applied_index()
        try:
            if current is not None and current.create_index > above:
                # the deploy `current` names, by its acks (its CreateIndex field is a claim)
                pointed = self.store.committed(
                    current.deploy, node=self.node, first_index=self.first_index()
                )
                if pointed is not None:
                    above = max(above, pointed.create_index)
            later = self.store.newest_committed(
                above, node=self.node, first_index=self.first_index()
            )
        except (ConsulError, PayloadError) as exc:
            self.log.warning("later_deploys_not_read", error=str(exc))
            return None
        if later is not None and (current is None or later.id != current.deploy):
            self._report_once(
                f"later:{later.id}",
                "current_not_obeyed",
                deploy=current.deploy if current else None,
                reason=(
                    f"the acks commit a later deploy {later.id} (release "
                    f"{later.request.release}): that one is followed"
                ),
            )
        else:
            later = None
        self._acks_looked = (key, later)
        return later

    def _live_broken(self, release: str) -> bool:
        """Whether the release ``current`` names has no complete tree here (reported once
        per release). Asked at every idle reconcile: a regular file where its release.json
        belongs is taken as complete at the cost of one ``lstat`` (the full, safe read only
        when it is not)."""
        self._broken = None
        with contextlib.suppress(OSError):
            found = os.lstat(self.engine.layout.release_dir(release) / RELEASE_JSON)
            if stat.S_ISREG(found.st_mode):
                self._reported.discard(f"broken:{release}")
                return False
        problem = self.engine.live_problem(release)
        if problem is not None:
            self._report_once(
                f"broken:{release}", "live_release_broken", release=release, problem=problem
            )
            # one assignment: the worker's host record reads it without the loop's lock
            self._broken = (release, f"live release {release} is not complete here: {problem}")
            return True
        self._reported.discard(f"broken:{release}")
        return False

    def first_index(self) -> int:
        """Since when this host is in this app's fleet (DESIGN.md 6.4.5): the CreateIndex of
        its first member key of the app (``joined.json``; the smallest seen, so Consul's
        indexes going back, as in a cluster rebuilt from a snapshot, only make it more
        cautious). Before it has one: the smaller of what its host record says (earlier
        versions wrote their first session's index there) and this watcher's first
        session, the cautious answer.

        Per app, not per daemon: a request expects the app's members only, so a host that
        ran other apps long before it joined this one was not left out of this app's
        earlier deploys. With the session's index, a host that added an app whose fleet had
        one host refused that host's deploy as a forgery, and raised the alarm."""
        if self._joined_index:
            return self._joined_index
        known = [i for i in (self._recorded_first_index() or 0, self._daemon_first_index()) if i]
        return min(known) if known else 0

    def _record_first_index(self) -> int:
        """The ``first_index`` this host's record of the app says, for readers: when it
        joined; 0 while it has not and no record says it has; the cautious value when its
        record cannot be read (never 0 over a value that was there)."""
        if self._joined_index:
            return self._joined_index
        recorded = self._recorded_first_index()
        return self._daemon_first_index() if recorded is None else recorded

    def _recorded_first_index(self) -> int | None:
        """The ``first_index`` of this host's record of the app (0: no record), read once;
        None when it cannot be read (tried again at the next call)."""
        if self._kv_first_index is None:
            try:
                entry = self.store.consul.kv_get(self.store.keys.host(self.node))
                record = HostRecord.from_json(entry.value) if entry else None
            except (ConsulError, PayloadError):
                return None
            self._kv_first_index = record.first_index if record else 0
        return self._kv_first_index

    def _read_joined_index(self) -> int:
        """``joined.json``'s index; 0 when there is none or it is not a sane one (a file
        edited by hand must not stop the daemon, nor make it trust every deploy)."""
        try:
            data = json.loads((self.engine.layout.state_dir / JOINED_FILE).read_text())
            value = data["member_index"]
        except Exception:  # OSError, bad JSON, deep nesting, a list: none
            return 0
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < INT_LIMIT
        return value if ok else 0

    def _note_joined(self, entry: KVEntry | None) -> None:
        """Journal when this host joined the app: the CreateIndex of a member key of the app
        held by this watcher's session (not any key under its name: a key its token wrote
        for another session must not lower it for good), the smallest seen; at the first,
        what its host record already says if older (a host of an earlier version, or one
        whose ``.state/`` was wiped, was in the fleet before its current member key). Kept
        in memory when the file cannot be written, and written at a later step."""
        session = self.session()
        if entry is not None and session and entry.session == session and entry.create_index > 0:
            index = entry.create_index
            if not self._joined_index:
                recorded = self._recorded_first_index()
                if recorded is None:
                    return  # the record could not be read: not without it (next step)
                index = min(i for i in (index, recorded) if i > 0)
            if not self._joined_index or index < self._joined_index:
                self._joined_index = index
                with self._host_lock:
                    self._host_state = None  # the host record says it at the next write
        if self._joined_index and self._joined_index != self._joined_written:
            try:
                atomic_write_json(
                    self.engine.layout.state_dir / JOINED_FILE,
                    {"member_index": self._joined_index},
                    durable=True,
                    parents=True,
                )
            except OSError as exc:
                if "joined" not in self._reported:  # once, not at every step it fails
                    self._reported.add("joined")
                    self.log.warning("joined_index_not_written", error=str(exc))
                return
            self._joined_written = self._joined_index
            self._reported.discard("joined")

    def _report_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self.log.error(event, **fields)

    def _converge_to(self, joined: Joined, pointed: str | None) -> None:
        """Stage and flip to a committed deploy's release, without a new barrier.

        Journaled like a deploy (``.state/converge.json``): after a crash, the phases that
        did not finish run again, and a failing ``validate`` is retried with backoff and
        shown in `status` until it passes. ``pointed``: the deploy `current` named when
        this converge began (``joined``'s own, unless the acks gave a later one): the flip
        is skipped if `current` has moved since.
        """
        rec = joined.request
        journal = self.converge_journal
        # Which watcher process tries it, and whether its last try's hooks failed: what
        # `rollback --local` goes by (refused during a try of the running watcher only).
        me = {"pid": os.getpid(), "pid_started": process_started(os.getpid())}
        began = journal.begin(rec.id, release=rec.release, scope=self._scope, **me)
        if began.get("hooks_failed") or any(began.get(k) != v for k, v in me.items()):
            journal.update(hooks_failed="", **me)
        switched_again = False
        try:
            artifact = self._record_of(rec)
            self.engine.in_flight_artifacts.add(artifact.sha256)
            # A late catch-up, not the live deploy: hooks can tell the two apart.
            ctx = self._hook_context(rec, kind="converge")
            if not journal.has("staged"):
                self._download(artifact, rec.release)
                with self.engine.lock(owner="converge"):
                    # committed: ``store.committed`` established it before this task
                    self.engine.stage(artifact, rec.release, rec.id, replace_live=True)
                journal.done("staged")
            if not journal.has("post_release"):
                self._post_release(rec, ctx, journal)
            if not journal.has("flipped"):
                with self.engine.lock(owner="converge"):
                    reason = self._converge_blocked(joined, pointed)
                    if reason is not None:
                        self.log.info("converge_skipped", release=rec.release, reason=reason)
                        journal.clear(rec.id)
                        return
                    self.engine.flip(rec.release)
                    self._write_applied(joined)
                journal.done("flipped")
                self._write_host(rec.release, force=True)
            else:
                # A try after a stop or a failed one: `current` moved back meanwhile (a
                # `rollback --local`, its hold released since) would have its hooks run
                # against that tree and "converged" logged (the second code review).
                with self.engine.lock(owner="converge"):
                    if self.engine.current_release() != rec.release:
                        reason = self._converge_blocked(joined, pointed)
                        if reason is not None:
                            self.log.info("converge_skipped", release=rec.release, reason=reason)
                            journal.clear(rec.id)
                            return
                        # Its hooks run again after this switch, also after a stop.
                        done = (journal.read() or {}).get("phases", [])
                        journal.update(phases=[p for p in done if p != "post_symlink"])
                        self.engine.flip(rec.release)
                        self._write_applied(joined)
                        switched_again = True
                if switched_again:
                    self._write_host(rec.release, force=True)
            if not journal.has("post_symlink"):
                self._run_hooks("post_symlink", ctx)
                self._check_hooks_kept_current("post_symlink", rec.release, rec.release)
                journal.done("post_symlink")
            self._run_hooks("validate", ctx)
            self._check_hooks_kept_current("validate", rec.release, rec.release)
        except (WatcherError, OSError) as exc:
            # Said in the journal: `rollback --local` goes through between two tries (an
            # operator's way out of a release that keeps failing here), not during one.
            with contextlib.suppress(OSError):
                journal.update(hooks_failed=str(exc)[:500] or type(exc).__name__)
            self._converge_failures += 1
            delay = min(2.0**self._converge_failures, CONVERGE_BACKOFF_MAX)
            self._converge_retry_at = time.monotonic() + delay
            self._failing("converge", f"{rec.release}: {exc}")
            self.log.error("converge_failed", release=rec.release, error=str(exc), retry_in_s=delay)
            return
        journal.clear(rec.id)
        self._failing("converge", "")
        self._converge_failures = 0
        self.log.info("converged", release=rec.release, deploy=rec.id)
        self._prune()

    def _converge_blocked(self, joined: Joined, pointed: str | None) -> str | None:
        """Why not to flip now (checked under the app lock, just before the flip):
        ``pointed`` is the deploy `current` named when the converge began; `current`
        naming ``joined`` by now (its end written meanwhile) is no reason."""
        hold = self.engine.held()
        if hold is not None:
            return f"held: {hold.reason}"
        inflight, _ = self.store.inflight(consistent=True)
        if inflight is not None:
            return f"deploy {inflight} started meanwhile"
        now, _ = self.store.current()
        if (now.deploy if now else None) not in (pointed, joined.id):
            return f"the fleet moved on to {now.release if now else 'nothing'}"
        return None

    # --- host record and prefetch -----------------------------------------------------

    def _member_key_held_by_another(self) -> bool:
        """Whether the members watch last saw this node's member key held by a session
        that is not this watcher's: another watcher runs with this node name (a config
        copied from a host, its ``node`` kept), or this one restarted and its old session
        has not expired yet. Its host record is then not this watcher's to write."""
        mine = self._member_entries.get(self.node)
        session = self.session()
        return bool(mine is not None and mine.session and session and mine.session != session)

    def _write_host(self, release: str | None, *, force: bool = False) -> None:
        if self._member_key_held_by_another():
            # Another watcher of this node would overwrite the record of the one that
            # holds the key (`status --fleet` then showed the host on no release until
            # that one changed something). Written once this watcher holds it.
            return
        with self._host_lock:
            hold = _hold_shown(self.engine.held())
            state = (release, self.status.alarm, hold, self._broken_for(release))
            if not force and state == self._host_state:
                return  # written on change only: an idle host sends Consul nothing
            record = self._host_record(release)
            try:
                self.store.consul.kv_put(self.store.keys.host(self.node), record.to_json())
                self._host_state = state
            except ConsulError as exc:
                self._host_state = None  # unknown now: the next cycle writes it again
                self.log.warning("host_record_not_written", error=str(exc))

    def _host_record(self, release: str | None) -> HostRecord:
        return HostRecord(
            node=self.node,
            release=release,
            last_seen=iso(utcnow()),
            watcher_version=__version__,
            state=self.status.state,
            alarm=self.status.alarm,
            # Since when it is in this app's fleet, for readers (0: not yet a member).
            first_index=self._record_first_index(),
            prefetched=self._prefetched_ids(),
            # who placed it too: `status --fleet`, the page and deploy's warning show it
            hold=_hold_shown(self.engine.held()),
            broken=self._broken_for(release),
        )

    def _broken_for(self, release: str | None) -> str:
        """Why ``release`` is not served here, as the last look found (``_live_broken``);
        "" for another release (a deploy flipped away from the broken one since)."""
        broken = self._broken
        return broken[1] if broken is not None and release == broken[0] else ""

    def _prefetched_ids(self) -> list[str]:
        """Artifact ids held verified here (cache file or pre-extracted tree), newest first."""
        found: list[tuple[float, str]] = []
        for folder in (self.engine.layout.artifacts_dir, self.engine.layout.prefetched_dir):
            try:
                entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
                found += [(p.stat().st_mtime, p.name) for p in entries]
            except OSError:
                continue
        names = (
            n.removesuffix(".gz").removesuffix(".tar").rsplit("-", 1)[0]
            for _, n in sorted(found, reverse=True)
        )
        return list(dict.fromkeys(names))[:PREFETCHED_LISTED]

    def _prefetch_failed(self, artifact_id: str, exc: Exception) -> None:
        self.log.error("prefetch_failed", artifact=artifact_id, error=str(exc))
        self.status.prefetch_failed = f"{artifact_id}: {one_line(str(exc))[:500]}"
        self._wake()  # status.json says it (the loop writes it)

    def prefetch(self, artifact_id: str) -> None:
        """Download, verify and (per config) pre-extract an announced artifact (worker)."""
        started = time.monotonic()
        # Publish writes the record before it uploads and announces: it is there when the
        # event comes. No retries with sleeps: any token that may fire `build-finished`
        # can name builds that do not exist, and each used to hold one of the two prefetch
        # workers (shared by every app) for ~3 s, 30 of them delaying a real build ~43 s.
        # A second read, consistent, covers a stale answer around a leader election.
        try:
            record = self.store.artifact(artifact_id)
            if record is None or record.uploading:
                record = self.store.artifact(artifact_id, consistent=True)
        except PayloadError as exc:
            self._prefetch_failed(artifact_id, exc)
            return
        if record is None:
            # A warning, not an error: anyone who may fire `build-finished` can name a build
            # that does not exist, and every host would log it; nothing here is broken.
            self.log.warning(
                "prefetch_skipped",
                artifact=artifact_id,
                reason=f"no artifact record at {self.store.keys.artifact(artifact_id)}",
            )
            return
        if record.uploading:
            # Announced (a `consul event` by hand) before its publish finished: the publish
            # announces it itself once the object is complete.
            self.log.warning(
                "prefetch_skipped", artifact=artifact_id, reason=still_uploading(record)
            )
            return
        try:
            self.store.check_pin(record)
            self.engine.prefetch(record)
            self.store.write_pin(record, by=self.node)
            if self.app.prefetch == "extract":
                self.engine.drop_stale_prefetched()
        except (WatcherError, OSError) as exc:
            self._prefetch_failed(artifact_id, exc)
            return
        except Exception as exc:  # a bug: said here, since the pool's future is never read
            self.log.exception("prefetch_crashed", artifact=artifact_id, error=repr(exc))
            return
        self._last_prefetched = artifact_id  # the likely next deploy: its join reads it
        self.status.prefetch_failed = ""
        # The builds page counts prefetched artifacts: the loop rewrites the host record.
        # Not from this thread: a release read here may be flipped by a deploy before
        # this write lands, and a stale record would then stay (written on change only).
        with self._host_lock:
            self._host_state = None
        self._wake()
        self.log.info(
            "prefetched",
            artifact=artifact_id,
            mode=self.app.prefetch,
            took_ms=round((time.monotonic() - started) * 1000),
        )

    def shutdown(self, wait: bool) -> None:
        # The step in progress finishes (a hook is not interrupted), but a prepare stops
        # before its ready ack; the journal resumes it.
        self._stopping.set()
        self._worker.shutdown(wait=wait, cancel_futures=True)

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the step in progress to finish; whether it has."""
        task = self._task
        if task is None:
            return True
        wait_for_futures([task], timeout=timeout)
        return task.done()

    def has_deploy_in_flight(self) -> bool:
        """Part of a deploy that is not over (expected in it, preparing, or applying)."""
        journal = self.journal.read()
        return (journal is not None and not journal.get("finished")) or self.busy()

    def must_give_up_session(self) -> bool:
        """Not acked by ``prepare_deadline`` + grace (DESIGN.md 6.4.7): the renewer destroys
        the session, so a stuck main loop or worker cannot hold a deploy undecided."""
        journal = self.journal.read()
        if not journal or journal.get("finished") or journal.get("established"):
            return False
        deploy_id = str(journal.get("deploy"))
        if self._own.get(deploy_id) not in (None, "", STAGING):
            return False
        try:
            request = journal["request"]
            deadline = clamped_deadlines(
                request["requested_at"],
                request["prepare_deadline"],
                request["apply_deadline"],
                self.app.timeouts,
            )[0]
        except (KeyError, TypeError, ValueError, OverflowError):
            return False
        return (utcnow() - deadline).total_seconds() > PREPARE_GRACE

    def _deadlines(self, rec: DeployRecord) -> tuple[datetime, datetime]:
        return clamped_deadlines(
            rec.requested_at, rec.prepare_deadline, rec.apply_deadline, self.app.timeouts
        )


def late_sight_note(journal: Mapping[str, Any], rec: DeployRecord) -> str:
    """What a "prepare deadline passed" adds when this host first saw the request (its
    journal's ``started_at``, by its clock) more than ``LATE_SIGHT_NOTE_AFTER`` after the
    request's ``requested_at`` (by the requester's clock): both times, and the causes that
    look alike from here. "" otherwise, or when the journal does not say."""
    try:
        seen = parse_iso(str(journal["started_at"]))
        requested = parse_iso(rec.requested_at)
    except (KeyError, TypeError, ValueError, OverflowError):
        return ""
    late = (seen - requested).total_seconds()
    if late <= LATE_SIGHT_NOTE_AFTER:
        return ""
    return (
        f"; this host first saw the request at {iso(seen)} by its clock, {late:.0f} s after "
        f"its requested_at {rec.requested_at} by the requester's clock: one of the two "
        "clocks is off (hosts and the machines that deploy need NTP), or this host's "
        "watcher was not running when the deploy started"
    )


def clamped_deadlines(
    requested_at: str, prepare_deadline: str, apply_deadline: str, timeouts: Timeouts
) -> tuple[datetime, datetime]:
    """A request's (prepare, apply) deadlines, clamped to this host's configured maxima
    (DESIGN.md 6.1): at most ``timeouts.prepare`` after ``requested_at``, and the apply
    deadline at most ``timeouts.apply`` after that. A request that names a deadline years
    away cannot keep a stuck deploy undecided (and ``inflight`` taken) for years.

    Only for this host's own "no" (it stops staging, refuses, gives up its session): each
    of those can only abort the deploy. Ending an undecided deploy uses the request's own
    apply deadline, the same on every host. A date near the end of the calendar leaves the
    request's deadline as it is (this host refuses such a request: dated ahead)."""
    requested = parse_iso(requested_at)
    prepare = parse_iso(prepare_deadline)
    apply = parse_iso(apply_deadline)
    with contextlib.suppress(OverflowError):
        prepare = min(prepare, requested + timedelta(seconds=timeouts.prepare))
    with contextlib.suppress(OverflowError):
        apply = min(apply, prepare + timedelta(seconds=timeouts.apply))
    return prepare, apply


_DECIDED: dict[str, tuple[int, dict[str, str]]] = {}  # member key -> (ModifyIndex, decided)


def decided_by(member: KVEntry) -> dict[str, str]:
    """The decided mark in a member key (parsed once per version of the key)."""
    known = _DECIDED.get(member.key)
    if known is not None and known[0] == member.modify_index:
        return known[1]
    try:
        decided = MemberRecord.from_json(member.value, where=member.key).decided
    except PayloadError:
        decided = {}
    if len(_DECIDED) > 4096:
        _DECIDED.clear()
    _DECIDED[member.key] = (member.modify_index, decided)
    return decided


ABORT_ESTABLISHED = "the deploy was aborted"  # why a host stops staging: others said no
ABORT_REQUESTED = "abort requested"  # ... or an operator asked (`watcherctl abort`, the API)


# The hooks of a commit, run after the flip: what a host checks it can start before it
# acks ready.
AFTER_COMMIT_PHASES = ("post_symlink", "validate")


def _check_still_staged(engine: ReleaseEngine, release: str) -> None:
    """After ``post_release``: the tree it ran on is still a complete release. A hook that
    removed it (or someone, by hand, while it ran) made a host ack ready with nothing on
    disk, and the flip then staged a tree no post_release had run on (the attacker
    review). A ``HookError``: the step fails, naming the phase."""
    if not engine.is_complete(release):
        raise HookError(
            "post_release",
            str(engine.layout.release_dir(release)),
            "the release directory is gone or incomplete after the hooks ran (a hook removed "
            "it, or someone did meanwhile): nothing to switch to",
        )


def _check_runnable(app: AppConfig, layout: AppLayout, release: str) -> None:
    """Raise ``HookError`` for the first hook of ``AFTER_COMMIT_PHASES`` that cannot be
    started: no such file, not a regular file, or not executable. A config hook that lives
    in the release `current` serves (``/srv/web/current/bin/reload``, or through another
    symlink into ``releases/``) is looked for in the new release: that is where it runs
    from after the flip (a deploy may be the one that brings it)."""
    release_dir = layout.release_dir(release)
    for phase in AFTER_COMMIT_PHASES:
        for argv in hook_commands(app, phase, release_dir):
            path = _after_the_flip(Path(argv[0]), layout, release_dir)
            if not path.exists():
                why = "does not exist" if not path.is_symlink() else "is a dangling symlink"
            elif not path.is_file():
                why = "is not a regular file"
            elif not os.access(path, os.X_OK):
                why = "is not executable"
            else:
                continue
            raise HookError(
                phase,
                str(path),
                f"{why}: it would fail after the commit, so this host says no before it",
            )


def _after_the_flip(path: Path, layout: AppLayout, release_dir: Path) -> Path:
    """Where ``path`` will be once `current` names ``release_dir``."""
    with contextlib.suppress(ValueError):
        return release_dir / path.relative_to(layout.current)
    rest = Path(os.path.realpath(path))
    with contextlib.suppress(ValueError):
        parts = rest.relative_to(layout.releases_dir).parts
        if len(parts) > 1:
            return release_dir.joinpath(*parts[1:])
    return path


def _stopped_state(why: str) -> str:
    """The ack of a host that stops staging: ``aborted`` when the acks already establish
    the abort or an operator asked for it (this host did not fail, and is not named as
    failing: an alert on failing hosts must not page for a deliberate abort), ``failed``
    when its own "no" is what aborts the deploy (a deadline, inflight moved)."""
    return ABORTED if why.startswith((ABORT_ESTABLISHED, ABORT_REQUESTED)) else FAILED


class _Cancelled(Exception):
    """The deploy was decided (aborted) while this host was still preparing."""


__all__ = ["AgentStatus", "AppAgent", "Journal", "NodeProgress", "parse_journal", "read_journal"]
