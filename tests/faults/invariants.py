"""The fault campaign's invariant checker: DESIGN.md 6 read from raw KV and the hosts' disks.

Independent of the product on purpose: nothing here imports ``watcher``. KV is read with
plain HTTP (``Agent.request``), JSON is parsed here, and "committed" is decided here from
the node records (``deploy_facts``), never by the barrier's own predicate. The one
function that knows the KV layout is ``deploy_facts``; everything else works on what it
returns and on the ``current``/``inflight`` keys, which both layouts share.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.cluster import Agent

READY_OR_LATER = frozenset({"ready", "committed", "live", "failed_after_commit"})


@dataclass(frozen=True)
class KVItem:
    """One key of a snapshot: its value and the indexes Consul reported."""

    value: bytes
    create_index: int
    modify_index: int


#: Keys relative to ``<prefix>/apps/<app>/`` -> their item.
KVSnapshot = dict[str, KVItem]


@dataclass(frozen=True)
class Violation:
    """An invariant that did not hold: which one, where, and what was seen."""

    kind: str
    node: str
    detail: str

    def __str__(self) -> str:
        where = f" on {self.node}" if self.node else ""
        return f"{self.kind}{where}: {self.detail}"


def app_base(prefix: str, app: str) -> str:
    return f"{prefix.strip('/')}/apps/{app}/"


def read_snapshot(agent: Agent, prefix: str, app: str, *, timeout: float = 10.0) -> KVSnapshot:
    """Every key under the app, in one consistent recursive read through ``agent``."""
    base = app_base(prefix, app)
    path = "/v1/kv/" + urllib.parse.quote(base) + "?recurse=true&consistent="
    status, body = agent.request("GET", path, timeout=timeout)
    if status == 404:
        return {}
    if status != 200:
        raise RuntimeError(f"KV read of {base} through {agent.name} answered {status}: {body!r}")
    snapshot: KVSnapshot = {}
    for entry in json.loads(body):
        raw = entry.get("Value")
        snapshot[entry["Key"][len(base) :]] = KVItem(
            base64.b64decode(raw) if raw else b"",
            int(entry["CreateIndex"]),
            int(entry["ModifyIndex"]),
        )
    return snapshot


def _doc(snapshot: KVSnapshot, key: str) -> dict[str, Any] | None:
    item = snapshot.get(key)
    if item is None or not item.value:
        return None
    try:
        data = json.loads(item.value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class DeployFacts:
    """What the checker itself establishes about one deploy from raw KV."""

    id: str
    release: str
    committed: bool  # by the checker's own predicate, not the decision key's say-so
    decision: str | None  # what the decision record says (counted, never trusted)
    decision_rewritten: bool  # the decision key was modified after it was created
    started: int  # Consul index at which the deploy was created
    ended: int | None  # Consul index at which its end was recorded (None: not ended)
    # False once the history trimmed its request and outcome: only hosts' own acks are left
    # (each host deletes those later), so when it started and ended is no longer known.
    kept: bool = True


def deploy_facts(snapshot: KVSnapshot) -> dict[str, DeployFacts]:
    """Deploy id -> facts: the ONE function of the checker that knows the KV layout.

    Layout 2 (DESIGN.md 4, 6.1, 6.4.3), read here without the product's code: a deploy's
    request is ``requests/<id>``, or, when that key is gone or rewritten, the canonical
    request a ready ack carries (``progress/<node>/<id>/request``, beside the ack); each
    node's ack is ``progress/<node>/<id>``. **Committed** =
    every node in the request's ``expected`` has an ack in state ready, committed, live or
    failed_after_commit naming **the same request digest** (sha256 of the canonical request
    JSON, recomputed here), whatever ``decisions/<id>`` says. The release is the acked
    request's. Decision = ``decisions/<id>``'s outcome; started = the CreateIndex the acks
    agree on (else the request key's); ended = the CreateIndex of ``outcomes/<id>``.
    """
    acks: dict[str, dict[str, dict[str, Any]]] = {}  # deploy id -> node -> ack document
    carried_by: dict[str, dict[str, dict[str, Any]]] = {}  # deploy id -> node -> request
    for key in snapshot:
        parts = key.split("/")
        if parts[0] != "progress" or len(parts) not in (3, 4):
            continue
        doc = _doc(snapshot, key)
        if doc is None:
            continue
        if len(parts) == 3:
            acks.setdefault(parts[2], {})[parts[1]] = doc
        elif parts[3] == "request":  # the request a ready ack carries, beside it
            carried_by.setdefault(parts[2], {})[parts[1]] = doc
    requests: dict[str, tuple[dict[str, Any], int]] = {}
    for key, item in snapshot.items():
        parts = key.split("/")
        if len(parts) == 2 and parts[0] == "requests":
            doc = _doc(snapshot, key)
            if doc is not None:
                requests[parts[1]] = (doc, item.create_index)
    facts: dict[str, DeployFacts] = {}
    for deploy_id in sorted(set(requests) | set(acks)):
        carried = [
            doc
            for node, doc in carried_by.get(deploy_id, {}).items()
            if (acks.get(deploy_id, {}).get(node) or {}).get("digest") == _digest(doc)
        ]
        request, started = requests.get(deploy_id, (None, 0))
        digests = {_digest(r) for r in carried}
        if len(digests) == 1:  # the acks are the authority: the request they carry
            request = carried[0]
        if request is None or not isinstance(request.get("release"), str):
            continue
        digest = _digest(request)
        expected = request.get("expected")
        node_acks = acks.get(deploy_id, {})
        acked = (
            isinstance(expected, list)
            and bool(expected)
            and all(
                (node_acks.get(n) or {}).get("state") in READY_OR_LATER
                and (node_acks.get(n) or {}).get("digest") == digest
                for n in expected
            )
        )
        claimed = {a.get("create_index") for a in node_acks.values() if a.get("digest") == digest}
        if len(claimed) == 1 and isinstance(next(iter(claimed)), int):
            started = int(next(iter(claimed)))
        decision = _doc(snapshot, f"decisions/{deploy_id}")
        outcome = decision.get("outcome") if decision else None
        decision_item = snapshot.get(f"decisions/{deploy_id}")
        end_item = snapshot.get(f"outcomes/{deploy_id}")
        facts[deploy_id] = DeployFacts(
            id=deploy_id,
            release=request["release"],
            committed=acked,
            decision=outcome if isinstance(outcome, str) else None,
            decision_rewritten=decision_item is not None
            and decision_item.modify_index != decision_item.create_index,
            started=started,
            ended=end_item.create_index if end_item is not None else None,
            kept=f"requests/{deploy_id}" in snapshot or end_item is not None,
        )
    return facts


def _digest(request: dict[str, Any]) -> str:
    """sha256 of a request's canonical JSON (sorted keys, no spaces), as DESIGN.md 6.1 says."""
    body = json.dumps(request, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(body).hexdigest()


def committed_deploys(snapshot: KVSnapshot) -> dict[str, str]:
    """Release -> deploy id, for every deploy the checker calls committed (see deploy_facts)."""
    ordered = sorted(deploy_facts(snapshot).values(), key=lambda f: f.started)
    return {f.release: f.id for f in ordered if f.committed}


def decisions_written_twice(snapshot: KVSnapshot) -> list[Violation]:
    """A decision modified after it was created: more than one decision for a deploy."""
    return [
        Violation("decision_rewritten", "", f"deploy {f.id}: its decision was written again")
        for f in deploy_facts(snapshot).values()
        if f.decision_rewritten
    ]


def overlapping_deploys(snapshot: KVSnapshot) -> list[Violation]:
    """Two deploys of the app in flight at once: one started before the one before it ended."""
    # Deploys the history trimmed were checked while they were still there.
    kept = (f for f in deploy_facts(snapshot).values() if f.kept)
    ordered = sorted(kept, key=lambda f: f.started)
    out = []
    for before, after in itertools.pairwise(ordered):
        if before.ended is None or after.started < before.ended:
            out.append(
                Violation(
                    "two_in_flight",
                    "",
                    f"deploy {after.id} started (index {after.started}) while {before.id} "
                    f"was in flight (ended at {before.ended})",
                )
            )
    return out


def decision_of(snapshot: KVSnapshot, deploy_id: str) -> str | None:
    """``commit`` / ``abort`` as recorded (for counting only; never trusted for a check)."""
    facts = deploy_facts(snapshot).get(deploy_id)
    return facts.decision if facts else None


def fleet_current(snapshot: KVSnapshot) -> str | None:
    current = _doc(snapshot, "current")
    release = current.get("release") if current else None
    return release if isinstance(release, str) else None


def inflight(snapshot: KVSnapshot) -> str | None:
    item = snapshot.get("inflight")
    return item.value.decode(errors="replace") if item is not None else None


# --- the hosts' disks --------------------------------------------------------------------


@dataclass(frozen=True)
class DiskView:
    """What one host's app directory says: where ``current`` points and whether it is whole."""

    node: str
    current: str | None  # release name, None when there is no ``current``
    complete: bool  # the target has .watcher/release.json
    link: str | None  # the raw symlink text

    @classmethod
    def read(cls, node: str, app_dir: Path) -> DiskView:
        try:
            link = (app_dir / "current").readlink()
        except FileNotFoundError:
            return cls(node, None, True, None)
        except OSError as exc:
            return cls(node, None, False, f"unreadable: {exc}")
        target = app_dir / link
        complete = (target / ".watcher" / "release.json").is_file()
        return cls(node, link.name, complete, str(link))


@dataclass
class CurrentMonitor:
    """Samples every host's ``current`` every ``interval`` s: each release seen, each hole.

    A flip to an uncommitted release that is undone before the end of a deploy still shows
    here; so does a ``current`` that points at an incomplete tree, even for a moment.
    """

    app_dirs: dict[str, Path]
    interval: float = 0.02
    seen: dict[str, set[str]] = field(default_factory=dict)
    incomplete: list[Violation] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self) -> None:
        for node, app_dir in self.app_dirs.items():
            view = DiskView.read(node, app_dir)
            if view.current is None and view.link is None:
                continue
            if not view.complete:
                again = DiskView.read(node, app_dir)  # it may have flipped on meanwhile
                if again.link == view.link and not again.complete:
                    with self._lock:
                        self.incomplete.append(
                            Violation(
                                "current_incomplete",
                                node,
                                f"current -> {view.link} has no .watcher/release.json",
                            )
                        )
            if view.current is not None:
                with self._lock:
                    self.seen.setdefault(node, set()).add(view.current)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="current-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def take(self) -> tuple[dict[str, set[str]], list[Violation]]:
        """What was seen since the last call (and reset)."""
        with self._lock:
            seen, self.seen = self.seen, {}
            incomplete, self.incomplete = self.incomplete, []
        return seen, incomplete


# --- the checks --------------------------------------------------------------------------


def check_seen(seen: dict[str, set[str]], committed: dict[str, str]) -> list[Violation]:
    """Nobody was ever on an uncommitted release (every sample the monitor took)."""
    return [
        Violation("uncommitted_release", node, f"current pointed at {release}, never committed")
        for node, releases in sorted(seen.items())
        for release in sorted(releases)
        if release not in committed
    ]


def check_settled(
    snapshot: KVSnapshot,
    committed: dict[str, str],
    disks: list[DiskView],
    live: set[str],
) -> list[Violation]:
    """The fleet at rest: inflight gone, every live host on a complete, committed ``current``."""
    out = decisions_written_twice(snapshot) + overlapping_deploys(snapshot)
    flight = inflight(snapshot)
    if flight is not None:
        out.append(Violation("inflight_left", "", f"inflight still names {flight!r}"))
    fleet = fleet_current(snapshot)
    if fleet is not None and fleet not in committed:
        out.append(Violation("fleet_current_uncommitted", "", f"KV current names {fleet}"))
    for disk in disks:
        if not disk.complete:
            out.append(
                Violation(
                    "current_incomplete",
                    disk.node,
                    f"current -> {disk.link} has no .watcher/release.json",
                )
            )
        if disk.current is not None and disk.current not in committed:
            out.append(Violation("uncommitted_release", disk.node, f"current is {disk.current}"))
        if disk.node in live and disk.current != fleet:
            out.append(
                Violation(
                    "not_converged",
                    disk.node,
                    f"current is {disk.current}, the fleet's is {fleet}",
                )
            )
    return out


def check_status(
    status: dict[str, Any], app: str, disks: list[DiskView], fleet: str | None
) -> list[Violation]:
    """``watcherctl status --fleet --json`` agrees with the disks and with KV."""
    out: list[Violation] = []
    data = status.get(app)
    if not isinstance(data, dict):
        return [Violation("status_disagrees", "", f"no app {app!r} in status --fleet: {status}")]
    if data.get("current") != fleet:
        out.append(
            Violation(
                "status_disagrees",
                "",
                f"status says the fleet is on {data.get('current')}, KV {fleet}",
            )
        )
    hosts = data.get("hosts") or {}
    for disk in disks:
        row = hosts.get(disk.node)
        if not isinstance(row, dict):
            out.append(Violation("status_disagrees", disk.node, "host missing from status"))
            continue
        if row.get("release") != disk.current:
            out.append(
                Violation(
                    "status_disagrees",
                    disk.node,
                    f"status says {row.get('release')}, the disk {disk.current}",
                )
            )
        if not row.get("member"):
            out.append(Violation("status_disagrees", disk.node, "status shows the watcher down"))
    return out
