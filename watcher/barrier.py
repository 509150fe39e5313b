"""The deploy protocol over Consul KV (DESIGN.md 6, layout version 2).

The acks are the decision: each expected host writes its own ``progress/<node>/<id>``
(forward-only; the ready ack in a txn that checks the session the request named for it),
and commit and abort are predicates over those acks that every host establishes itself in
consistent reads before it flips, runs ``post_abort`` or drops a tree (``establish``).
``decisions/``, ``outcomes/`` and ``current`` are records, wake-ups and caches for readers.
The per-host side (staging, flipping, hooks) is in ``watcher.agent``; the rules and why
they hold are in docs/design.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from watcher import PROTOCOL_VERSION
from watcher.config import HISTORY_MAX
from watcher.consul_api import MAX_TXN_OPS, ConsulClient, KVEntry, TxnOp
from watcher.errors import (
    ArtifactIntegrityError,
    ArtifactNotFound,
    ConsulPermissionDenied,
    DeployInFlight,
    DeployRefused,
    PayloadError,
    RollbackTargetUnknown,
)
from watcher.ids import one_line_short, release_name_slip, shown
from watcher.log import get_logger
from watcher.records import (
    ABORT,
    ABORT_ACK_STATES,
    ABORTED,
    ACKED_READY_STATES,
    APPLIED_STATES,
    COMMIT,
    COMMITTED,
    DEPLOY_ID_RE,
    FAILED_AFTER_COMMIT,
    LIVE,
    MAX_EXPECTED,
    NEXT_STATES,
    NODE_FINAL_STATES,
    NODE_RE,
    READY,
    STAGING,
    AbortRequest,
    ArtifactRecord,
    CurrentRecord,
    Decision,
    DeployRecord,
    HostRecord,
    Keys,
    MemberRecord,
    NodeProgress,
    Outcome,
    PinRecord,
    ReleaseRef,
    check_artifact_id,
    check_deploy_id,
    iso,
    parse_iso,
    release_name,
    utcnow,
)

log = get_logger(module="barrier")

# Verdicts of ``establish`` (DESIGN.md 6.4.3 and 6.4.4).
UNDECIDED, CONTESTED = "undecided", "contested"
# A ready host waiting for the others' acks wakes on the members watch (the decided mark of
# the host that decides, and the sessions the abort clause looks at): it reads the acks
# again only when that changed, or after this long. A session that ends without holding
# its member key changes nothing it watches: the hosts see its end within this time.
WAIT_RECHECK = 15.0
# How many history entries one end of a deploy trims at most (the rest go next time).
TRIM_PER_END = 6
# How many trimmed ids the history remembers, so that every host deletes its own acks.
TRIMMED_KEEP = 64
# How many entries of the history refusals may hold at most (and at most half of it): a
# raw `deploy` event of an unknown artifact writes one, and anyone who may fire events
# must not push the deploys, the targets of `rollback --to`, out of the history with them.
REFUSALS_KEPT = 10
# The reasons of the abort decision such a refusal is written with, and how one is told:
# an unknown artifact, or one whose record differs from its pin.
UNKNOWN_ARTIFACT = "unknown artifact"
REFUSED_ARTIFACT = "artifact refused"


def _unknown_artifact(artifact_id: str, artifact_record: Callable[[str], object]) -> str:
    """The reason a raw deploy event of an artifact id no record has is refused, with a hint
    when the id is a release name (pasted from `history`)."""
    slip = release_name_slip(artifact_id, artifact_record)
    if not slip:
        return f"{UNKNOWN_ARTIFACT} {artifact_id}"
    return (
        f"{UNKNOWN_ARTIFACT} {artifact_id} ({slip}: a deploy event names an artifact, a "
        "rollback event a release)"
    )


def new_deploy_id(now: datetime | None = None) -> str:
    """A deploy id made by `watcherctl`: sortable timestamp plus randomness."""
    ts = (now or utcnow()).strftime("%Y%m%dT%H%M%SZ")
    return f"{ts}-{os.urandom(3).hex()}"  # as secrets.token_hex, without its imports


@dataclass(frozen=True)
class Joined:
    """A request as one host journaled it: the request, its digest and CreateIndex."""

    request: DeployRecord
    digest: str
    create_index: int

    @property
    def id(self) -> str:
        return self.request.id

    def to_journal(self) -> dict[str, Any]:
        return {
            "request": self.request.as_dict(),
            "digest": self.digest,
            "create_index": self.create_index,
        }

    @classmethod
    def from_journal(cls, data: Mapping[str, Any]) -> Joined:
        request = DeployRecord.from_dict(dict(data["request"]), label="journaled request")
        digest = str(data["digest"])
        if request.digest() != digest:
            raise PayloadError("journaled request does not match its digest")
        return cls(request, digest, int(data["create_index"]))


@dataclass(frozen=True)
class Verdict:
    """What one consistent read of the acks establishes."""

    outcome: str  # COMMIT | ABORT | CONTESTED | UNDECIDED
    reason: str
    acks: dict[str, NodeProgress] = field(default_factory=dict)
    indexes: dict[str, int] = field(default_factory=dict)
    members: dict[str, KVEntry] = field(default_factory=dict)
    decided: bool = False  # a decision record exists (whoever wrote it)
    record: Decision | None = None  # that record, when it parses (reported, never obeyed)
    #: The end is written (read only when asked for): an outcome record, the deploy in the
    #: history, and for a commit ``current`` naming it (or a later deploy). Not the outcome
    #: record alone: any host's token can write that one first (DESIGN.md 6.4.3), and an
    #: end skipped for it would leave ``current`` and the history without the deploy.
    ended: bool = False
    end_read: EndRead | None = None  # what the end writes over, read with the outcome
    outcome_index: int = 0  # the outcome record's ModifyIndex in that read (0: none)

    def holds_session(self, node: str, session: str | None) -> bool:
        entry = self.members.get(node)
        return bool(session) and entry is not None and entry.session == session


#: ``requested_by`` of a request a raw `consul event` started (it expects the live members).
RAW_EVENT_BY = "consul event "


class AbortRequested(DeployRefused):
    """A ready ack met an abort request (``requests/<id>/abort``) in its own txn."""


@dataclass(frozen=True)
class JoinRead:
    """``DeployStore.join_read``: the request (None if absent or unparsable: ``problem``
    says which), whether the deploy ended (its end written: outcome and history entry),
    and this host's own ack."""

    request: DeployRecord | None
    entry: KVEntry | None
    problem: str
    ended: bool
    own: NodeProgress | None
    own_index: int
    carried: bytes | None = None  # the request this host's own ready ack carries
    prepared: PrepareRead | None = None  # the prepare's read, when the artifact was guessed

    def own_request(self) -> DeployRecord | None:
        return self.own.embedded_request(self.carried) if self.own else None


@dataclass(frozen=True)
class PrepareRead:
    """``DeployStore.prepare_read``: what the checks before a ready ack look at."""

    artifact: ArtifactRecord | None
    pin: PinRecord | None
    abort: AbortRequest | None
    members: dict[str, KVEntry]


@dataclass(frozen=True)
class EndRead:
    """What the end of a deploy reads in one go: ``inflight``, ``current``, ``history``."""

    inflight: str | None
    inflight_index: int
    current: CurrentRecord | None
    current_index: int
    history: list[str]
    trimmed: list[str]
    history_index: int


@dataclass(frozen=True)
class Written:
    """An ack as written: the record, its new ModifyIndex, and the verdict read with it."""

    ack: NodeProgress
    index: int
    verdict: Verdict | None = None
    extras: bool = False  # the caller's extra ops were applied with the ack


@dataclass(frozen=True)
class DeployView:
    """A deploy as readers see it: the request, the acks, and the records beside them."""

    record: DeployRecord
    decision: Decision | None
    nodes: dict[str, NodeProgress]
    #: The CreateIndex of each ack's key (Consul's, not a claim of the ack).
    node_indexes: dict[str, int]
    outcome: Outcome | None
    coordinator_session: str | None
    create_index: int = 0
    abort_requested: AbortRequest | None = None
    #: What ``checked`` found in ``decision`` / ``outcome`` that the acks contradict.
    distrusted: tuple[str, ...] = ()
    #: Why the abort clause on sessions holds (an expected node's named session is gone
    #: before it acked), when ``DeployStore.view`` looked: only for an abort record that
    #: no ack shows (the clause needs session reads; readers do them only then).
    session_abort: str = ""
    #: The CreateIndex of ``decision``'s key: a refusal at the start writes the request
    #: and its abort records in one txn (one index), which a record forged later cannot.
    decision_index: int = 0
    #: The ModifyIndex of each ack's key and of ``outcome``'s (Consul's Raft order, not
    #: a claim of a record): an ack changed after the outcome was written is one a host
    #: wrote after the deploy ended (a host's ack is rewritten only when its state moves).
    #: 0 for an outcome ``checked`` rebuilt from the acks.
    ack_indexes: dict[str, int] = field(default_factory=dict)
    outcome_index: int = 0

    def live_after_end(self) -> list[str]:
        """Expected hosts whose ack says live but was written after the outcome: not
        live when the deploy ended (a host past the apply deadline, or whose watcher was
        stopped, that finished its apply later). Empty when the outcome is not a record."""
        if not self.outcome_index:
            return []
        return [
            n
            for n in self.record.expected
            if (a := self.nodes.get(n)) is not None
            and a.state == LIVE
            and self.ack_indexes.get(n, 0) > self.outcome_index
        ]

    @property
    def id(self) -> str:
        return self.record.id

    def missing_expected(self, members: Iterable[str]) -> list[str]:
        alive = set(members)
        return [n for n in self.record.expected if n not in alive]

    def verdict(self) -> str:
        """The verdict of the acks read here (for display: not a consistent establish)."""
        return judge(self.record, self.record.digest(), self.nodes).outcome

    def checked(self, record: DeployRecord | None = None, *, ours: bool = False) -> DeployView:
        """This deploy as readers report it (DESIGN.md 6.4.3): ``decisions/`` and
        ``outcomes/`` are records any host's token can write, so each is held against the
        acks read with it (judged against ``record``, by default the request read here).
        A record the acks contradict is replaced by what the acks say, or dropped while
        they say nothing yet, and the contradiction is kept in ``distrusted`` to be shown.
        Once every expected host's ack is final, the acks' verdict is the result even
        without an outcome record. Never a consistent establish: for display and exit
        codes, not for acting on a host. ``ours``: the reader wrote ``record`` itself
        without a refusal (`deploy`'s wait), so no abort record is a refusal at its start,
        even one whose txn re-created the request (which a host's token can do)."""
        record = record or self.record
        verdict = judge(record, record.digest(), self.nodes)
        if verdict.outcome == UNDECIDED and self.session_abort:
            verdict = Verdict(ABORT, self.session_abort)
        notes: list[str] = []
        decision = self.decision
        # A request refused at its start has an abort record, written in the request's own
        # txn, and no ack at all. Not any abort record before the first ack: a host's token
        # could write one while every host prepares, and readers (`deploy`'s wait among
        # them) would report an abort the acks then overrule.
        refused_at_start = (
            not ours
            and not self.nodes
            and self.decision_index != 0
            and self.decision_index == self.create_index
        )
        if verdict.outcome == CONTESTED:
            decision = None  # records written before an ack changed: the verdict says it
        elif decision is not None and (
            (
                decision.outcome != verdict.outcome
                and not (decision.outcome == ABORT and refused_at_start)
            )
            or decision.digest not in ("", record.digest())
        ):
            notes.append(
                f"the decision record ({decision.outcome}, by {decision.by!r}) contradicts "
                f"the acks ({verdict.outcome}: {verdict.reason}) and is not trusted"
            )
            decision = None
        if decision is None and verdict.outcome in (COMMIT, ABORT):
            decision = Decision(outcome=verdict.outcome, reason=verdict.reason, by="", at="")
        outcome = self.outcome
        final = all(
            (a := self.nodes.get(n)) is not None and a.state in NODE_FINAL_STATES
            for n in record.expected
        )
        failed = any(
            (a := self.nodes.get(n)) is not None and a.state == FAILED_AFTER_COMMIT
            for n in record.expected
        )
        if outcome is not None and not _outcome_agrees(
            outcome.result, verdict.outcome, record, refused_at_start, failed=failed
        ):
            notes.append(
                f"the outcome record ({outcome.result!r}, by {outcome.by!r}) contradicts the "
                f"acks ({verdict.outcome}: {verdict.reason}) and is not trusted"
            )
            outcome = None
        settled = final or verdict.outcome == CONTESTED
        if outcome is None and verdict.outcome != UNDECIDED and settled:
            result = {
                COMMIT: "failed_after_commit" if failed else "committed",
                ABORT: "aborted",
                CONTESTED: CONTESTED,
            }[verdict.outcome]
            why = f"the acks say {verdict.outcome}: {verdict.reason}"
            at = self.outcome.at if self.outcome is not None else ""
            outcome = Outcome(result=result, at=at, by="", reason="; ".join([why, *notes]))
        if notes == list(self.distrusted) and outcome is self.outcome and decision is self.decision:
            return self
        return replace(
            self,
            decision=decision,
            outcome=outcome,
            distrusted=tuple(notes),
            outcome_index=self.outcome_index if outcome is self.outcome else 0,
        )


#: The verdicts of the acks (DESIGN.md 6.4.3) behind each result an honest host writes.
OUTCOME_VERDICTS: dict[str, frozenset[str]] = {
    "committed": frozenset({COMMIT}),
    "rolled_back": frozenset({COMMIT}),
    "failed_after_commit": frozenset({COMMIT}),
    "aborted": frozenset({ABORT}),
    "contested": frozenset({CONTESTED}),
    # Ended without every host's ack: past the apply deadline, or the request was refused
    # at its start (``_outcome_agrees`` checks which).
    "expired": frozenset({UNDECIDED, ABORT}),
    "refused": frozenset({UNDECIDED, ABORT}),
}


def _outcome_agrees(
    result: str, verdict: str, record: DeployRecord, no_acks: bool, *, failed: bool = False
) -> bool:
    """Whether an outcome record's ``result`` can be an honest end of a deploy whose acks
    say ``verdict``: "expired" only once the request's apply deadline passed, "refused"
    only while no host acked anything, "failed_after_commit" and "rolled_back" only when
    an expected host's ack says failed_after_commit (``failed``; that state is final, so
    an end that saw one still sees it). The reverse is not checked: a host may fail after
    an honest "committed" end (it came back late)."""
    if verdict not in OUTCOME_VERDICTS.get(result, ()):
        return False
    if result in ("failed_after_commit", "rolled_back") and not failed:
        return False
    if result == "expired":
        try:
            return utcnow() >= parse_iso(record.apply_deadline)
        except ValueError:
            return False
    return result != "refused" or no_acks


#: Acks of a host that established the commit itself: ``committed`` (written just before
#: its flip), ``live``, ``failed_after_commit``. Evidence of a commit (DESIGN.md 6.4.4).
APPLIED = ACKED_READY_STATES - {READY}


def judge(
    request: DeployRecord,
    digest: str,
    acks: Mapping[str, NodeProgress | None],
    indexes: Mapping[str, int] | None = None,
) -> Verdict:
    """The commit / abort / contested predicate over one read of the acks (pure).
    ``indexes``: each ack's ModifyIndex, when read with them (which intent came first)."""
    expected = request.expected
    ready = [n for n in expected if (a := acks.get(n)) is not None and a.acked_ready(digest)]
    # The first veto named is a host's own failure, not the abort intents that follow it;
    # of intents alone, the first written (the decider's, whose reason the decision record
    # holds: the later ones quote it), so the outcome names the host the decision named.
    vetoes = sorted(
        (n for n in expected if (a := acks.get(n)) is not None and a.state in ABORT_ACK_STATES),
        key=lambda n: _veto_order(n, acks[n], indexes),  # type: ignore[arg-type]
    )
    foreign = sorted(
        n
        for n in expected
        if (a := acks.get(n)) is not None and a.state in ACKED_READY_STATES and a.digest != digest
    )
    applied = sorted(
        n
        for n in expected
        if (a := acks.get(n)) is not None and a.digest == digest and a.state in APPLIED
    )
    commit_evidence = bool(expected) and len(ready) == len(expected)
    abort_evidence = bool(vetoes or foreign)
    if (commit_evidence or applied) and abort_evidence:
        # (names counted past a few: a request any host's token writes may list 1,000)
        return Verdict(
            CONTESTED,
            f"acks contradict each other: {some_of(vetoes + foreign)} vetoed or named another "
            f"request while {some_of(applied or ready)} acked ready (an ack was rewritten)",
        )
    if commit_evidence:
        return Verdict(COMMIT, f"all {len(expected)} expected nodes acked ready")
    if vetoes:
        first = acks[vetoes[0]]
        assert first is not None
        why = first.error or first.state
        # Hosts that said no themselves; not the ``aborted`` intents of those that followed.
        others = len([n for n in vetoes[1:] if (a := acks.get(n)) and a.state != ABORTED])
        more = f" (and {others} more)" if others else ""
        return Verdict(ABORT, f"node {vetoes[0]} {first.state}: {why}{more}")
    if foreign:
        return Verdict(ABORT, f"node(s) {some_of(foreign)} acked another request")
    if not expected:
        return Verdict(ABORT, "no expected nodes")
    return Verdict(UNDECIDED, f"{len(ready)} of {len(expected)} acked ready")


def _veto_order(
    node: str, ack: NodeProgress, indexes: Mapping[str, int] | None
) -> tuple[bool, int, str, str]:
    """Failures first, then abort intents in the order Consul took them (ModifyIndex,
    when known: the decider's is in the decision's own txn), else by their ``aborted_at``
    (each host's clock; an intent without one, e.g. an older version's, last), then by
    name."""
    if ack.state != ABORTED:
        return (False, 0, "", node)
    index = (indexes or {}).get(node) or 2**63
    return (True, index, ack.timings.get("aborted_at") or "~", node)


_SKIPPED: OrderedDict[tuple[str, int], None] = OrderedDict()
_SKIPPED_LOCK = threading.Lock()
SKIPPED_KEEP = 1024  # versions of bad keys remembered, so each is logged once


def report_skipped(entry: KVEntry, error: str, *, warning: bool = False) -> None:
    """Log a document that does not parse (or is not what its key says) once per version
    of its key, however often the loop reads it (DESIGN.md 4: reported, then skipped)."""
    mark = (entry.key, entry.modify_index)
    with _SKIPPED_LOCK:
        if mark in _SKIPPED:
            return
        _SKIPPED[mark] = None
        if len(_SKIPPED) > SKIPPED_KEEP:
            _SKIPPED.popitem(last=False)
    emit = log.warning if warning else log.error
    emit("document_skipped", key=entry.key, index=entry.modify_index, error=error)


#: Acks already parsed, by key and exact bytes: every verdict reads every ack of the
#: deploy again (N hosts, a few reads each), and an ack that did not change need not be
#: parsed again. NodeProgress is immutable; the bytes are the key, so a rewritten ack (or
#: a KV restored with other values under the same indexes) is parsed afresh.
_PARSED_ACKS: dict[tuple[str, bytes], NodeProgress] = {}
_PARSED_ACKS_MAX = 4096


def _parsed_ack(key: str, value: bytes) -> NodeProgress:
    ack = _PARSED_ACKS.get((key, value))
    if ack is None:
        ack = NodeProgress.from_json(value, where=key)
        if len(_PARSED_ACKS) >= _PARSED_ACKS_MAX:
            _PARSED_ACKS.clear()
        _PARSED_ACKS[(key, value)] = ack
    return ack


def parse_ack(entry: KVEntry | None, *, node: str = "", deploy: str = "") -> NodeProgress | None:
    """An ack from a txn or KV read; an absent key (or a get-or-empty's empty) is None.

    With ``node`` / ``deploy``: an ack at that node's key that names another node or
    deploy is no ack of it (reported, then read as absent, so its owner writes over it)."""
    if entry is None or not entry.value or entry.modify_index == 0:
        return None
    try:
        ack = _parsed_ack(entry.key, entry.value)
    except PayloadError as exc:
        report_skipped(entry, str(exc))
        return None
    if (node and ack.node != node) or (deploy and ack.deploy not in ("", deploy)):
        report_skipped(entry, f"ack names node {ack.node!r} and deploy {ack.deploy!r}")
        return None
    return ack


class DeployStore:
    """KV operations of the protocol for one app."""

    def __init__(self, consul: ConsulClient, prefix: str, app: str) -> None:
        self.consul = consul
        self.app = app
        self.keys = Keys(prefix, app)

    # --- reads ------------------------------------------------------------------------

    def inflight(self, *, consistent: bool = False) -> tuple[str | None, int]:
        """The id of the deploy in flight (or None) and the key's modify index (0: absent)."""
        entry = self.consul.kv_get(self.keys.inflight, consistent=consistent)
        if entry is None or not entry.value:
            return None, 0
        return entry.value.decode(errors="replace").strip() or None, entry.modify_index

    def members(self, *, consistent: bool = False) -> dict[str, KVEntry]:
        """Live members: node -> its session-held member key."""
        if not consistent:
            entries, filtered = self.consul.kv_list_checked(self.keys.members_prefix)
            if filtered:  # a partial list would leave live hosts out of the expected set
                raise ConsulPermissionDenied(
                    f"app {self.app}: this Consul token may not read {self.keys.members_prefix} "
                    "(Consul left keys out of the list: ACLs); use a token with read on "
                    f"{self.keys.base}/, e.g. the operator policy of docs/acl.md"
                )
            return self._members_from(entries)
        result = self.consul.txn([TxnOp.get_tree(self.keys.members_prefix)], consistent=True)
        return self._members_from(result.entries)

    def members_of(self, entries: Iterable[KVEntry]) -> dict[str, KVEntry]:
        """``members()`` from entries a watch already read."""
        return self._members_from(entries)

    def _members_from(self, entries: Iterable[KVEntry]) -> dict[str, KVEntry]:
        out: dict[str, KVEntry] = {}
        for entry in entries:
            node = entry.key[len(self.keys.members_prefix) :]
            if node and "/" not in node and entry.session:
                out[node] = entry
        return out

    def hosts(self) -> dict[str, HostRecord]:
        return self.hosts_checked()[0]

    def hosts_checked(self) -> tuple[dict[str, HostRecord], dict[str, str]]:
        """The host records by node, and for each record that cannot be used (it does not
        parse, or names another node), the node its key names and why."""
        out: dict[str, HostRecord] = {}
        bad: dict[str, str] = {}
        entries, filtered = self.consul.kv_list_checked(self.keys.hosts_prefix)
        if filtered:  # a partial list would hide a known host that is down
            raise ConsulPermissionDenied(
                f"app {self.app}: this Consul token may not read {self.keys.hosts_prefix} "
                "(Consul left keys out of the list: ACLs); use a token with read on "
                f"{self.keys.base}/, e.g. the operator policy of docs/acl.md"
            )
        for entry in entries:
            # The node is the one the key names: only that node's token may write it. A
            # record that names another node speaks for nobody (host X must not show up
            # as host Y in status, nor hide Y's own record).
            node = entry.key[len(self.keys.hosts_prefix) :]
            if not node or "/" in node:
                continue
            if not NODE_RE.fullmatch(node):
                # No watcher writes such a key, and `gc` cannot name it: counted as a known
                # host, it refused every deploy until removed by hand (the web API review).
                bad[node] = (
                    f"{one_line_short(entry.key)}: not a node name, so no watcher's record "
                    "(not counted as a known host; remove the key with `consul kv delete`)"
                )
                report_skipped(entry, bad[node], warning=True)
                continue
            try:
                record = HostRecord.from_json(entry.value, where=entry.key)
            except PayloadError as exc:
                report_skipped(entry, str(exc), warning=True)
                bad[node] = str(exc)
                continue
            if record.node != node:
                bad[node] = f"{entry.key}: the record names node {record.node!r}"
                report_skipped(entry, bad[node], warning=True)
                continue
            out[node] = record
        return out, bad

    def artifact(self, artifact_id: str, *, consistent: bool = False) -> ArtifactRecord | None:
        entry = self.consul.kv_get(self.keys.artifact(artifact_id), consistent=consistent)
        if entry is None:
            return None
        record = ArtifactRecord.from_json(entry.value, where=entry.key)
        if record.id != artifact_id:
            raise PayloadError(f"{entry.key}: the record there is for artifact {record.id}")
        return record

    def pin(self, artifact_id: str) -> PinRecord | None:
        entry = self.consul.kv_get(self.keys.pin(artifact_id), consistent=True)
        if entry is None:
            return None
        return PinRecord.from_json(entry.value, where=entry.key)

    def check_pin(self, record: ArtifactRecord) -> None:
        """Refuse, naming both hashes, a record that differs from the artifact's pin."""
        try:
            pin = self.pin(record.id)
        except PayloadError as exc:
            raise ArtifactIntegrityError(
                f"artifact {record.id}: its pin does not parse ({exc}); "
                "an admin must repair pins/ before it can be deployed"
            ) from None
        if pin is not None and (why := pin.differs(record)) is not None:
            raise ArtifactIntegrityError(why)

    def write_pin(self, record: ArtifactRecord, *, by: str) -> None:
        """After verifying the bytes: pin the id to them (cas=0; the first host wins)."""
        pin = PinRecord(
            artifact=record.id,
            url=record.url,
            size=record.size,
            sha256=record.sha256,
            by=by,
            at=iso(utcnow()),
        )
        if not self.consul.kv_put(self.keys.pin(record.id), pin.to_json(), cas=0):
            self.check_pin(record)  # pinned by another host meanwhile: must be the same bytes

    def current(self) -> tuple[CurrentRecord | None, int]:
        return self.current_of(self.consul.kv_get(self.keys.current))

    def current_of(self, entry: KVEntry | None) -> tuple[CurrentRecord | None, int]:
        """``current()`` from an entry a watch already read."""
        if entry is None:
            return None, 0
        try:
            return CurrentRecord.from_json(entry.value, where=entry.key), entry.modify_index
        except PayloadError as exc:
            report_skipped(entry, str(exc))
            return None, entry.modify_index

    def check_current(
        self,
        current: CurrentRecord | None,
        hosts: Mapping[str, HostRecord] | None = None,
        views: dict[str, DeployView] | None = None,
    ) -> dict[str, str]:
        """What the acks say against ``current`` (DESIGN.md 6.4.6: a cache for readers that
        any host's token can rewrite): for "current" and "previous", a problem when the
        deploy it names is not a committed deploy of the release it names; {} when both
        agree. Two round trips per deploy named (and the host records, unless ``hosts``
        gives them, for a deploy one host acked alone). ``views``, when given, gets the
        views read ("current", "previous"), so a caller reads the acks once."""
        if current is None:
            later = self._later_than(None, 0)
            if not later:
                return {}
            return {"current": f"`current` is missing, but {later}"}
        problems: dict[str, str] = {}
        current_view: DeployView | None = None
        try:
            refs = {"current": current.ref(), "previous": current.previous_ref()}
        except PayloadError as exc:
            return {"previous": f"`current.previous` does not parse: {exc}"}
        for what, ref in refs.items():
            if ref is None:
                continue
            named = f"`{what}` names release {ref.release} of deploy {ref.deploy}"
            try:
                view = self.view(ref.deploy)
            except PayloadError as exc:
                problems[what] = f"{named}, which cannot be read: {exc}"
                continue
            if view is None:
                problems[what] = f"{named}, which has no request and no acks"
                continue
            if views is not None:
                views[what] = view
            rec = view.record
            digest = rec.digest()
            verdict = judge(rec, digest, view.nodes)
            if verdict.outcome != COMMIT:
                # As a host that was away says it (``committed_or_why``): not "undecided".
                changed = _not_committed_why(rec, digest, view.nodes, verdict)
                problems[what] = f"{named}, which " + (
                    changed or f"the acks do not commit ({verdict.outcome})"
                )
            elif (rec.release, rec.artifact, rec.sha256) != (ref.release, ref.artifact, ref.sha256):
                problems[what] = (
                    f"{named}, but that deploy's acked request is release {rec.release} "
                    f"(artifact {rec.artifact})"
                )
            elif len(acked := {a.create_index for a in view.nodes.values()}) != 1:
                # One host rewrote its ack's claim after the commit: a veto of the deploy
                # for those who judge it now, and its CreateIndex is nobody's to take.
                problems[what] = (
                    f"{named}, whose acks claim different CreateIndexes "
                    f"({', '.join(map(str, sorted(acked)))}): an ack was rewritten"
                )
            elif ref.create_index and ref.create_index not in acked:
                # The end of a later deploy keeps a `current` with a higher CreateIndex: a
                # forged one would look later than every deploy to come.
                problems[what] = (
                    f"{named} with CreateIndex {ref.create_index}, but its acks say "
                    f"{', '.join(map(str, sorted(acked)))}"
                )
            elif len(rec.expected) == 1:
                if hosts is None:
                    hosts = self.hosts_checked()[0]
                if why := self.left_out(view, hosts):
                    problems[what] = f"{named}, which {why}"
            if what == "current" and "current" not in problems:
                current_view = view
        previous = refs["previous"]
        if (
            previous is not None
            and "previous" not in problems
            and current_view is not None
            and (why := flipped_elsewhere(current_view, previous.release))
        ):
            problems["previous"] = (
                f"`previous` names release {previous.release} of deploy "
                f"{previous.deploy}, but {why}"
            )
        if current_view is not None:
            # the one CreateIndex its acks claim (checked above)
            acked_at = next(iter({a.create_index for a in current_view.nodes.values()}))
            if later := self._later_than(current, acked_at):
                problems["current"] = (
                    f"`current` names release {current.release} of deploy {current.deploy}, "
                    f"but {later}"
                )
        return problems

    def _later_than(self, current: CurrentRecord | None, acked_at: int) -> str:
        """For readers: "the acks commit a later deploy ..." when they commit a deploy
        later than ``current``'s (``newest_committed``; ``acked_at``: its CreateIndex by
        its acks), else "". Not the deploy in flight, nor one that `current` names by the
        time it is found: a deploy's acks commit it before its end writes `current`, and
        a reader must not call the fleet's release untrusted in between."""
        try:
            later = self.newest_committed(acked_at)
        except PayloadError:
            return ""  # the acks could not be read: what `current` says is not contradicted
        if later is None:
            return ""
        now, _ = self.current()
        if later.id == self.inflight()[0] or (now.deploy if now else None) != (
            current.deploy if current else None
        ):
            return ""
        return f"the acks commit a later deploy {later.id} (release {later.request.release})"

    def left_out(
        self,
        view: DeployView,
        hosts: Mapping[str, HostRecord] | None = None,
        among: Collection[str] | None = None,
    ) -> str:
        """Why the hosts a committed deploy did not expect do not follow it (DESIGN.md
        6.4.5), or "": one host acked it alone while others were already in the fleet (the
        ``first_index`` of their host records, when they joined the app, older than its
        ack). Its token can write such a deploy by itself; a deploy made while those hosts
        were away looks the same. Only
        for a deploy of one expected host (two or more acks are trusted: each honest host
        checked that no live member was left out). Reads the host records if not given.
        ``among``: only these hosts count (a rollback: the members it will expect).

        The ack's CreateIndex, as the hosts judge it (``committed_or_why``): its
        ModifyIndex moves with each later write of the ack (live after ready), which made a
        host that joined between the two look left out to readers while it had followed."""
        rec = view.record
        if len(rec.expected) != 1 or not view.node_indexes:
            return ""
        acked_at = min(view.node_indexes.values())  # Consul's, not a claim of the ack
        if hosts is None:
            hosts = self.hosts_checked()[0]
        others = sorted(
            n
            for n, h in hosts.items()
            if n not in rec.expected
            and 0 < h.first_index < acked_at
            and (among is None or n in among)
        )
        if not others:
            return ""
        return (
            f"only {rec.expected[0]} acked, while {', '.join(others)} "
            f"{'was' if len(others) == 1 else 'were'} already in the fleet: they do not "
            "follow it (one host's token can write such a deploy alone; if it was made while "
            "they were away, deploy again to move every host)"
        )

    def request(
        self, deploy_id: str, *, consistent: bool = False
    ) -> tuple[DeployRecord | None, KVEntry | None]:
        """The request and its KV entry (None, None when absent); PayloadError if it does not
        parse or is not this app's deploy of that id."""
        entry = self.consul.kv_get(self.keys.request(deploy_id), consistent=consistent)
        if entry is None:
            return None, None
        record = DeployRecord.from_json(entry.value, where=entry.key)
        if record.id != deploy_id or record.app != self.app:
            raise PayloadError(
                f"request at {entry.key} names deploy {record.id!r} of app {record.app!r}"
            )
        return record, entry

    def join_read(self, deploy_id: str, node: str, *, artifact: str | None = None) -> JoinRead:
        """What a host needs to join a deploy, in one consistent read: the request (as
        ``request()`` checks it), whether it already ended, and this host's own ack.

        ``artifact`` is a guess of the artifact the request names (the one this host
        prefetched last): the same read then also takes what the prepare checks
        (``prepare_read``), and ``prepared`` holds it when the guess was right, so a
        prefetched deploy costs one round trip less.
        """
        keys = self.keys
        wanted = [
            keys.request(deploy_id),
            keys.outcome(deploy_id),
            keys.progress(deploy_id, node),
            keys.carried_request(deploy_id, node),
            keys.history,
        ]
        ops = [TxnOp.get_or_empty(k) for k in wanted]
        if artifact is not None:
            ops += self._prepare_ops(deploy_id, artifact)
        result = self.consul.txn(ops, consistent=True)
        if not result.ok:
            raise PayloadError(f"read-only txn refused: {result.errors}")
        by_key = {e.key: e for e in result.entries if e.modify_index}
        request_e, outcome_e, own_e, carried_e, history_e = (by_key.get(k) for k in wanted)
        # Ended means the end was written (its outcome and history entry in one txn), not
        # an outcome record alone: any host's token can write one before the acks.
        listed, trimmed = self._history_of(history_e)
        ended = outcome_e is not None and (deploy_id in listed or deploy_id in trimmed)
        problem = ""
        request: DeployRecord | None = None
        if request_e is not None:
            try:
                request = DeployRecord.from_json(request_e.value, where=request_e.key)
                if request.id != deploy_id or request.app != self.app:
                    raise PayloadError(
                        f"request at {request_e.key} names deploy {request.id!r} of app "
                        f"{request.app!r}"
                    )
            except PayloadError as exc:
                request, problem = None, str(exc)
        prepared = None
        if request is not None and artifact is not None and request.artifact == artifact:
            try:
                prepared = self._prepared_from(request, result.entries)
            except PayloadError:
                prepared = None  # the prepare reads it again and fails there, with its reason
        return JoinRead(
            request,
            request_e,
            problem,
            ended,
            parse_ack(own_e, node=node, deploy=deploy_id),
            own_e.modify_index if own_e else 0,
            carried_e.value if carried_e else None,
            prepared,
        )

    def _prepare_ops(self, deploy_id: str, artifact: str) -> list[dict[str, Any]]:
        return [
            TxnOp.get_or_empty(self.keys.artifact(artifact)),
            TxnOp.get_or_empty(self.keys.pin(artifact)),
            TxnOp.get_or_empty(self.keys.abort_request(deploy_id)),
            TxnOp.get_tree(self.keys.members_prefix),
        ]

    def prepare_read(self, joined: Joined) -> PrepareRead:
        """What a host checks before its ready ack, in one consistent read: the artifact
        record and its pin, an abort request, and the members."""
        request = joined.request
        result = self.consul.txn(self._prepare_ops(request.id, request.artifact), consistent=True)
        if not result.ok:
            raise PayloadError(f"read-only txn refused: {result.errors}")
        return self._prepared_from(request, result.entries)

    def _prepared_from(self, request: DeployRecord, entries: list[KVEntry]) -> PrepareRead:
        by_key = {e.key: e for e in entries if e.modify_index}
        artifact_e = by_key.get(self.keys.artifact(request.artifact))
        pin_e = by_key.get(self.keys.pin(request.artifact))
        abort_e = by_key.get(self.keys.abort_request(request.id))
        artifact = None
        if artifact_e is not None:
            artifact = ArtifactRecord.from_json(artifact_e.value, where=artifact_e.key)
            if artifact.id != request.artifact:
                raise PayloadError(
                    f"{artifact_e.key}: the record there is for artifact {artifact.id}"
                )
        abort: AbortRequest | None = None
        if abort_e is not None:
            abort = self._doc(AbortRequest, abort_e) or AbortRequest(
                by="unknown", at="", reason="unreadable abort request"
            )
        members = [e for e in entries if e.key.startswith(self.keys.members_prefix)]
        return PrepareRead(
            artifact,
            PinRecord.from_json(pin_e.value, where=pin_e.key) if pin_e is not None else None,
            abort,
            self._members_from(members),
        )

    def deploy_record(self, deploy_id: str) -> DeployRecord | None:
        return self.request(deploy_id)[0]

    def abort_requested(self, deploy_id: str) -> AbortRequest | None:
        entry = self.consul.kv_get(self.keys.abort_request(deploy_id), consistent=True)
        if entry is None:
            return None
        try:
            return AbortRequest.from_json(entry.value, where=entry.key)
        except PayloadError as exc:  # any abort request counts, even one that does not parse
            return AbortRequest(by="unknown", at="", reason=f"unreadable abort request: {exc}")

    def ack(
        self, deploy_id: str, node: str, *, consistent: bool = True
    ) -> tuple[NodeProgress | None, int]:
        entry = self.consul.kv_get(self.keys.progress(deploy_id, node), consistent=consistent)
        return parse_ack(entry, node=node, deploy=deploy_id), entry.modify_index if entry else 0

    def view(self, deploy_id: str) -> DeployView | None:
        """Everything about one deploy for readers: two round trips.

        ``requests/<id>`` is what operators and hosts may rewrite or re-create; once the
        acks name another request than the one there, the request they carry is the
        deploy (DESIGN.md 6.4.2), as the hosts themselves read it."""
        check_deploy_id(deploy_id)
        record, entry = self.request(deploy_id)
        view = self._view(deploy_id, record, entry.create_index if entry else 0)
        if view is None or record is None:
            return view
        digest = record.digest()
        rewritten = entry is not None and entry.modify_index != entry.create_index
        if rewritten or any(
            a.state in ACKED_READY_STATES and a.digest != digest for a in view.nodes.values()
        ):
            acked = self.rebuild_request(deploy_id)
            if acked is not None and acked.digest() != digest:
                view = self._view(deploy_id, None, 0, acked)
        return self._with_session_clause(view) if view is not None else None

    def _with_session_clause(self, view: DeployView) -> DeployView:
        """``view`` with ``session_abort`` set when an abort record (decision or outcome)
        that no ack shows is backed by the abort clause on sessions, read as hosts read it.
        Only then: the clause costs a read of the members and of each named session."""
        recorded_abort = (view.decision is not None and view.decision.outcome == ABORT) or (
            view.outcome is not None and view.outcome.result == "aborted"
        )
        if not recorded_abort or view.verdict() != UNDECIDED:
            return view
        members = self.members()
        # Consul answers "no such session" for one this token may not read (an operator's
        # or a page reader's has no session rule): a live member's own session must be
        # visible, or an absent one proves nothing and the record stays unconfirmed.
        live = next((e.session for e in members.values() if e.session), None)
        if live is None or self.consul.session_info(live, consistent=True) is None:
            return view
        joined = Joined(view.record, view.record.digest(), view.create_index)
        lost = self._session_clause(joined, view.nodes, members)
        return replace(view, session_abort=lost.reason) if lost is not None else view

    def _view(
        self,
        deploy_id: str,
        record: DeployRecord | None,
        create_index: int,
        rebuilt: DeployRecord | None = None,
    ) -> DeployView | None:
        keys = [
            self.keys.decision(deploy_id),
            self.keys.outcome(deploy_id),
            self.keys.coordinator(deploy_id),
            self.keys.abort_request(deploy_id),
        ]
        if record is None:
            rebuilt = rebuilt or self.rebuild_request(deploy_id)
            if rebuilt is None:
                return None
            record = rebuilt
        ops = [TxnOp.get_or_empty(k) for k in keys]
        ops += [TxnOp.get_or_empty(self.keys.progress(deploy_id, n)) for n in record.expected]
        entries = self._read_txn(ops)
        decision = self._doc(Decision, entries[0])
        outcome = self._doc(Outcome, entries[1])
        coordinator = entries[2].session if entries[2] and entries[2].modify_index else None
        abort = self._doc(AbortRequest, entries[3])
        nodes: dict[str, NodeProgress] = {}
        indexes: dict[str, int] = {}
        modified: dict[str, int] = {}
        for node, e in zip(record.expected, entries[4:], strict=True):
            ack = parse_ack(e)
            if ack is not None and ack.node == node:
                nodes[node] = ack
                indexes[node] = e.create_index if e else 0
                modified[node] = e.modify_index if e else 0
        if rebuilt is not None:
            create_index = next((a.create_index for a in nodes.values() if a.create_index), 0)
        return DeployView(
            record,
            decision,
            nodes,
            indexes,
            outcome,
            coordinator,
            create_index,
            abort,
            decision_index=entries[0].create_index if decision is not None and entries[0] else 0,
            ack_indexes=modified,
            outcome_index=entries[1].modify_index if outcome is not None and entries[1] else 0,
        )

    @staticmethod
    def _doc(cls: Any, entry: KVEntry | None) -> Any:
        if entry is None or not entry.value or entry.modify_index == 0:
            return None
        try:
            return cls.from_json(entry.value, where=entry.key)
        except PayloadError as exc:
            report_skipped(entry, str(exc))
            return None

    def _read_txn(
        self, ops: list[dict[str, Any]], *, consistent: bool = False
    ) -> list[KVEntry | None]:
        """Read-only txns of get-or-empty ops, split to the server's limit; one entry per op."""
        out: list[KVEntry | None] = []
        for start in range(0, len(ops), MAX_TXN_OPS):
            chunk = ops[start : start + MAX_TXN_OPS]
            result = self.consul.txn(chunk, consistent=consistent)
            if not result.ok:
                raise PayloadError(f"read-only txn refused: {result.errors}")
            out += [e if e.modify_index else None for e in result.entries]
        return out

    def rebuild_request(self, deploy_id: str) -> DeployRecord | None:
        """A request rebuilt from the acks that carry it (DESIGN.md 6.4.2): a deleted or
        re-created ``requests/<id>`` changes nothing. Only an ack of a node the embedded
        request expects counts, and two different requests for one id rebuild nothing."""
        found = self._embedded_requests(deploy_id)
        return found[0][0] if len(found) == 1 else None

    def names_under(self, prefix: str) -> set[str]:
        """The names one level below ``prefix`` (a key's or a sub-tree's: ``requests/<id>``
        and ``requests/<id>/abort`` both name ``<id>``), from one keys read."""
        names = (k[len(prefix) :].split("/")[0] for k in self.consul.kv_keys(prefix))
        return {n for n in names if n}

    def _embedded_requests(
        self, deploy_id: str, among: Collection[str] | None = None
    ) -> list[tuple[DeployRecord, dict[str, KVEntry]]]:
        """Distinct requests carried by acks of ``deploy_id``, each with the ack entries
        (of nodes it expects) that carry it; the acks of ``among`` (default: every node
        with acks, from one keys read)."""
        nodes = sorted(self.names_under(self.keys.progress_prefix) if among is None else among)
        ops = []
        for n in nodes:
            ops.append(TxnOp.get_or_empty(self.keys.progress(deploy_id, n)))
            ops.append(TxnOp.get_or_empty(self.keys.carried_request(deploy_id, n)))
        entries = self._read_txn(ops, consistent=True)
        by_digest: dict[str, tuple[DeployRecord, dict[str, KVEntry]]] = {}
        for i, node in enumerate(nodes):
            entry, carried = entries[2 * i], entries[2 * i + 1]
            ack = parse_ack(entry, node=node, deploy=deploy_id)
            request = ack.embedded_request(carried.value if carried else None) if ack else None
            if request is None or entry is None or ack is None or ack.node != node:
                continue
            if request.id != deploy_id or request.app != self.app or node not in request.expected:
                continue
            by_digest.setdefault(ack.digest, (request, {}))[1][node] = entry
        if len(by_digest) > 1:
            # One token can write an ack carrying a request of its own making for an id
            # it took no part in (itself added to the expected set): the second attacker
            # round made a committed deploy "two requests" that way, and a host that was
            # away then converged to the deploy before it. Only a request whose every
            # expected node carries it can be the deploy; one of two or more nodes, when
            # another is complete alone (a token acks for its own node only).
            complete = [
                (request, entries)
                for request, entries in by_digest.values()
                if set(request.expected) <= set(entries)
            ]
            shared = [c for c in complete if len(c[0].expected) >= 2]
            chosen = shared if len(shared) == 1 else complete if len(complete) == 1 else []
            log.error(
                "acks_disagree",
                deploy=deploy_id,
                digests=sorted(by_digest),
                note=(
                    "acks carry different requests for one id; only the one every "
                    "node it expects acked is taken"
                    if chosen
                    else "acks carry different requests for one id; none is trusted"
                ),
            )
            return chosen
        return list(by_digest.values())

    def history(self) -> list[str]:
        """Deploy ids of this app, oldest first (bounded by ``daemon.history_keep``)."""
        ids, _ = self._history()
        return ids

    def _history(self, *, consistent: bool = False) -> tuple[list[str], int]:
        ids, _, index = self._history_doc(consistent=consistent)
        return ids, index

    def _history_doc(self, *, consistent: bool = False) -> tuple[list[str], list[str], int]:
        """(deploy ids oldest first, ids trimmed lately, modify index)."""
        entry = self.consul.kv_get(self.keys.history, consistent=consistent)
        ids, trimmed = self._history_of(entry)
        return ids, trimmed, entry.modify_index if entry else 0

    def ended_ids(self) -> set[str]:
        """Deploys with both a request and an outcome in KV (two keys reads): those that
        ended and are not trimmed yet, listed in ``history`` or not."""
        return self.names_under(self.keys.requests_prefix) & self.names_under(
            f"{self.keys.base}/outcomes/"
        )

    def history_checked(self) -> tuple[list[str], str]:
        """``history()``, and why the record was read as empty when it does not parse
        ("" when it does): readers say so instead of "no deploys recorded"."""
        entry = self.consul.kv_get(self.keys.history)
        ids, _, problem = self._history_parse(entry)
        return ids, problem

    def _history_of(self, entry: KVEntry | None) -> tuple[list[str], list[str]]:
        ids, trimmed, _ = self._history_parse(entry)
        return ids, trimmed

    def _history_parse(self, entry: KVEntry | None) -> tuple[list[str], list[str], str]:
        if entry is None or not entry.value:
            return [], [], ""
        try:
            data = json.loads(entry.value)
            # an entry that is no deploy id names no keys (and is dropped at the next write)
            ids = [i for i in data["deploys"] if isinstance(i, str) and DEPLOY_ID_RE.match(i)]
            trimmed = [
                i for i in data.get("trimmed", []) if isinstance(i, str) and DEPLOY_ID_RE.match(i)
            ]
            if len(ids) > HISTORY_MAX or len(trimmed) > TRIMMED_KEEP:
                # Padded by a token that may write it (any host's): the newest are taken, and
                # the next end writes the key back that short (its txn must fit Consul's).
                report_skipped(
                    entry,
                    f"{len(ids)} deploys and {len(trimmed)} trimmed ids, more than "
                    f"{HISTORY_MAX} and {TRIMMED_KEEP}: the newest taken",
                    warning=True,
                )
                ids, trimmed = ids[-HISTORY_MAX:], trimmed[-TRIMMED_KEEP:]
            return ids, trimmed, ""
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            # RecursionError: arrays nested thousands deep, which any host's token can write
            problem = f"{entry.key} is not a JSON object with a list of deploy ids"
            report_skipped(entry, problem)
            return [], [], problem

    def legacy_layout_found(self) -> bool:
        """Whether keys of layout version 1 (``deploys/``) exist: reported, never read."""
        return bool(self.consul.kv_keys(self.keys.legacy_deploys_prefix, separator="/"))

    # --- start --------------------------------------------------------------------------

    def new_record(
        self,
        *,
        deploy_id: str,
        kind: str,
        artifact: ArtifactRecord | ReleaseRef,
        release: str | None,
        requested_by: str,
        expected: Mapping[str, str] | list[str],
        prepare_timeout: float,
        apply_timeout: float,
        now: datetime | None = None,
        resume_of: str | None = None,
        rollback_of: str | None = None,
        allow_missing: bool = False,
    ) -> DeployRecord:
        """A request; ``expected`` maps each node to the session holding its member key."""
        now = now or utcnow()
        sessions = dict(expected) if isinstance(expected, Mapping) else {}
        target: str | None = None
        if isinstance(artifact, ArtifactRecord):
            fields: dict[str, Any] = {
                "artifact": artifact.id,
                "sha256": artifact.sha256,
                "url": artifact.url,
                "size": artifact.size,
                "format": artifact.format,
                "branch": artifact.branch,
                "commit": artifact.commit,
            }
        else:
            target = artifact.deploy
            fields = {
                "artifact": artifact.artifact,
                "sha256": artifact.sha256,
                "url": artifact.url,
                "size": artifact.size,
                "format": artifact.format,  # a rollback of a rollback reads it right too
                "branch": artifact.branch,
                "commit": artifact.commit,
            }
        return DeployRecord(
            id=check_deploy_id(deploy_id),
            app=self.app,
            kind=kind,
            release=release or release_name(now, fields["artifact"]),
            requested_by=requested_by,
            requested_at=iso(now),
            expected=sorted(expected),
            sessions=sessions,
            allow_missing=allow_missing,
            prepare_deadline=iso(now + timedelta(seconds=prepare_timeout)),
            apply_deadline=iso(now + timedelta(seconds=prepare_timeout + apply_timeout)),
            resume_of=resume_of,
            rollback_of=rollback_of,
            target_deploy=target if kind == "rollback" else None,
            min_protocol=PROTOCOL_VERSION,
            **fields,
        )

    def expected_members(
        self, *, allow_missing: bool, hosts: Mapping[str, HostRecord] | None = None
    ) -> dict[str, str]:
        """The current members and their sessions; refuses when a known host has no member
        key (unless allowed). ``hosts``: the host records when the caller read them."""
        members = {n: e.session or "" for n, e in sorted(self.members().items())}
        if not members:
            raise DeployRefused(
                f"app {self.app}: no watcher holds a member key; is any daemon running?"
            )
        if len(members) > MAX_EXPECTED:
            raise DeployRefused(
                f"app {self.app}: {len(members)} watchers hold member keys, more than the "
                f"{MAX_EXPECTED} hosts one deploy may expect; split the fleet into apps"
            )
        if allow_missing:
            return members
        missing = sorted(set(self.hosts() if hosts is None else hosts) - set(members))
        if missing:
            raise DeployRefused(
                f"app {self.app}: known host(s) {', '.join(missing)} have no member key "
                "(watcher down or cut off); start them or pass --allow-missing to deploy "
                f"to the {len(members)} live member(s) only"
            )
        return members

    def start(
        self, record: DeployRecord, *, current_index: int | None = None, **_ignored: Any
    ) -> bool:
        """Create ``inflight`` and the request in one txn; refuse if one is in flight.

        ``current_index``: the ModifyIndex of ``current`` the request was made from (a
        rollback's target is its ``previous``); the txn also checks it is unchanged, since
        a deploy that ends between that read and this write rewrites ``current`` and clears
        ``inflight`` in one txn, and the rollback would go to the release before that deploy.

        Returns False when this same deploy was already started by someone else.
        """
        ops = [
            TxnOp.cas(self.keys.inflight, record.id.encode(), 0),
            TxnOp.cas(self.keys.request(record.id), record.to_json(), 0),
        ]
        if current_index is not None:
            ops.append(TxnOp.unchanged(self.keys.current, current_index))
        result = self.consul.txn(ops)
        if result.ok:
            log.info(
                "deploy_started",
                app=self.app,
                deploy=record.id,
                kind=record.kind,
                release=record.release,
                expected=len(record.expected),
            )
            return True
        current_id, _ = self.inflight()
        if current_id and current_id != record.id:
            raise self._in_flight(current_id)
        if current_id == record.id:
            return False
        if current_index is not None and self.current()[1] != current_index:
            raise DeployRefused(
                f"app {self.app}: the fleet's current release changed while this "
                f"{record.kind} was being prepared (a deploy ended meanwhile), so its target "
                f"{record.release} may no longer be what you meant; nothing was started: "
                "look again and run it again"
            )
        raise DeployRefused(
            f"app {self.app}: could not start deploy {record.id}: "
            f"{result.errors or 'txn rolled back'}"
        )

    def _in_flight(self, deploy_id: str) -> DeployInFlight:
        """The refusal of a deploy while ``deploy_id`` is in flight, naming how to abort it."""
        return DeployInFlight(self._inflight_message(deploy_id))

    def _inflight_message(self, deploy_id: str) -> str:
        # ``inflight`` is free text any operator's or host's token can write: a value that
        # is no deploy id goes into no suggested command (it would be pasted into a shell).
        try:
            check_deploy_id(deploy_id)
        except PayloadError:
            value = shown(deploy_id).replace("`", "\\x60")  # no backquoted text of its own
            return (
                f"app {self.app}: `inflight` holds {value}, which is "
                "no deploy id; any watcher clears it on its next cycle, or clear it now with "
                f"`consul kv delete {self.keys.inflight}`"
            )
        try:
            other = self.deploy_record(deploy_id)
        except PayloadError as exc:
            return (
                f"app {self.app}: deploy {deploy_id!r} is in flight, but its request does not "
                f"parse ({exc}); any watcher clears it on its next cycle, or run "
                f"`watcherctl abort {deploy_id} --app {self.app}`"
            )
        if other is None:
            return (
                f"app {self.app}: deploy {deploy_id!r} is in flight, but it has no request; "
                "any watcher clears it on its next cycle (`watcherctl status` shows how to "
                "clear it now)"
            )
        return (
            f"app {self.app}: deploy {deploy_id} ({other.kind} of {other.release}, "
            f"requested by {other.requested_by} at {other.requested_at}) is in flight; "
            f"wait for it or `watcherctl abort {deploy_id} --app {self.app}`"
        )

    def request_abort(self, deploy_id: str, reason: str, *, by: str) -> bool:
        """`watcherctl abort`: an abort request every expected host honors before it acks
        ready. False when one already exists."""
        body = AbortRequest(by=by, at=iso(utcnow()), reason=reason).to_json()
        return self.consul.kv_put(self.keys.abort_request(deploy_id), body, cas=0)

    # --- per-node acks -------------------------------------------------------------------

    def write_progress(
        self,
        deploy_id: str,
        node: str,
        state: str,
        *,
        joined: Joined | None = None,
        session: str | None = None,
        error: str = "",
        output_tail: str = "",
        timings: dict[str, str] | None = None,
        sha256: str = "",
        staged: tuple[int, int] | None = None,
        known: tuple[NodeProgress | None, int] | None = None,
        establish: bool = False,
        outcome: bool = False,
        members: bool = True,
        extra_ops: list[dict[str, Any]] | None = None,
        before_ready: bool = False,
        flipped_from: str = "",
    ) -> Written | None:
        """Move this node's ack forward (CAS on the KV record's own index, never on what
        ``.state/`` remembers); a ready ack also checks that the session the request named
        holds this node's member key. None if not allowed (not forward, lost session).

        ``before_ready``: a "no" this host says while it prepares (an abort request, a
        deadline, a cancelled staging), written only over no ack or ``staging``. ``ready ->
        aborted`` is allowed for the intent of an established abort, but a "no" that lost
        its CAS to this host's own ready ack must not replace it: the commit predicate may
        already hold on that ready (docs/design.md R4).

        ``known`` is the ack and index a previous read or write returned (no re-read).
        With ``establish`` the same txn reads every expected node's ack, the members and
        the decision record after the write: the verdict comes in the same round trip, and
        (Raft orders txns) any other host's later read sees this write. Without ``members``
        that read skips the members tree, and so the abort clause of lost sessions: for an
        intent, whose read must only confirm a verdict already established (an undecided
        answer sends the host back to a full establish). ``extra_ops`` ride
        in the same txn when they can; if one of them is what failed, the ack is written
        without them (``Written.extras`` says which).
        """
        key = self.keys.progress(deploy_id, node)
        for _ in range(5):
            if known is not None:
                old, old_index = known
                known = None
            else:
                entry = self.consul.kv_get(key, consistent=True)
                old = parse_ack(entry, node=node, deploy=deploy_id)
                old_index = entry.modify_index if entry else 0
            old_state = old.state if old else ""
            # The same state again is no write: a retry of a write whose answer was lost.
            # Not even to establish, once the apply has ended here (live, or failed after
            # the commit): readers take an ack changed after the outcome for one written
            # after the deploy ended (``DeployView.live_after_end``).
            if old_state == state and staged is None and (not establish or state in APPLIED_STATES):
                return Written(old, old_index, None) if old is not None else None
            if before_ready and old_state not in ("", STAGING):
                log.info(
                    "progress_veto_too_late", deploy=deploy_id, node=node, old=old_state, new=state
                )
                return None
            if old_state != state and state not in NEXT_STATES.get(old_state, frozenset()):
                log.warning(
                    "progress_not_forward", deploy=deploy_id, node=node, old=old_state, new=state
                )
                return None
            merged = dict(old.timings) if old else {}
            merged.update(timings or {})
            keep = old if old is not None and old.state in ACKED_READY_STATES else None
            digest = keep.digest if keep else (joined.digest if joined else "")
            index = keep.create_index if keep else (joined.create_index if joined else 0)
            request = None  # carried at Keys.carried_request, written with the ready ack
            new = NodeProgress(
                node=node,
                deploy=deploy_id,
                state=state,
                error=error[:2000],
                output_tail=output_tail[-4000:],
                timings=merged,
                digest=digest,
                create_index=index,
                release=joined.request.release if joined else (old.release if old else ""),
                sha256=sha256 or (keep.sha256 if keep else ""),
                request=request,
                staged_bytes=staged[0] if staged else (old.staged_bytes if old else 0),
                staged_members=staged[1] if staged else (old.staged_members if old else 0),
                flipped_from=flipped_from or (old.flipped_from if old else ""),
            )
            ops = [TxnOp.cas(key, new.to_json(), old_index)]
            if state == READY and joined is not None:
                ops.append(
                    TxnOp.set(
                        self.keys.carried_request(deploy_id, node), joined.request.canonical()
                    )
                )
            if state == READY:
                # The session the request named for this node, not whichever this process
                # holds now: a successor with a new session can no longer ack ready.
                named = joined.request.sessions.get(node) if joined else None
                if not named or session != named:
                    return None
                ops.append(TxnOp.check_session(self.keys.member(node), named))
                # An abort request honored up to the last moment: the ready ack and the
                # request cannot both land (the caller then acks failed).
                ops.append(TxnOp.check_not_exists(self.keys.abort_request(deploy_id)))
            base = len(ops)
            ops += extra_ops or []
            reads = (
                self._verdict_ops(joined, outcome=outcome, members=members)
                if establish and joined is not None
                else []
            )
            if len(ops) + len(reads) > MAX_TXN_OPS:
                reads = []  # a large fleet: read the verdict in its own txns
            result = self.consul.txn(ops + reads)
            if result.ok:
                written = next((e for e in result.entries if e.key == key), None)
                new_index = written.modify_index if written else 0
                verdict = None
                if establish and joined is not None:
                    verdict = (
                        self._verdict_from(joined, result.entries, session_clause=members)
                        if reads
                        else self.establish(joined, outcome=outcome)
                    )
                return Written(new, new_index, verdict, extras=bool(extra_ops))
            if extra_ops and any(base <= i < len(ops) for i, _ in result.errors):
                # Only an extra op failed (a lock held by another, a record already there):
                # nothing was written, the ack's index stands.
                extra_ops, known = None, (old, old_index)
                continue
            if state == READY and any(i == 2 for i, _ in result.errors):
                log.warning("ready_ack_refused", deploy=deploy_id, node=node, reason="session")
                return None
            if state == READY and any(i == 3 for i, _ in result.errors):
                raise AbortRequested(f"deploy {deploy_id}: an abort was requested")
        return None

    # --- the predicates (DESIGN.md 6.4.3) -----------------------------------------------

    def _verdict_ops(
        self, joined: Joined, *, outcome: bool = False, members: bool = True
    ) -> list[dict[str, Any]]:
        request = joined.request
        ops = [TxnOp.get_tree(self.keys.members_prefix)] if members else []
        ops += [TxnOp.get_or_empty(self.keys.progress(request.id, n)) for n in request.expected]
        ops.append(TxnOp.get_or_empty(self.keys.decision(request.id)))
        if outcome:
            # The end's own read (inflight, current, history) rides along: a host that
            # finds the deploy over writes the end with no read of its own (CAS-checked).
            ops.append(TxnOp.get_or_empty(self.keys.outcome(request.id)))
            ops += self._end_ops()
        return ops

    def establish(self, joined: Joined, *, outcome: bool = False) -> Verdict:
        """Commit, abort, contested or undecided, from consistent reads of the acks (one
        read-only txn up to ~120 expected nodes).

        The session clause reads in this order: first confirm a named session is gone
        (``session/info?consistent``: Consul never revives one), then read that node's ack
        again; only a not-acked-ready record read after that counts.
        """
        ops = self._verdict_ops(joined, outcome=outcome)
        entries: list[KVEntry] = []
        for start in range(0, len(ops), MAX_TXN_OPS):
            result = self.consul.txn(ops[start : start + MAX_TXN_OPS], consistent=True)
            if not result.ok:
                raise PayloadError(f"read-only txn refused: {result.errors}")
            entries += result.entries
        return self._verdict_from(joined, entries)

    def _verdict_from(
        self, joined: Joined, entries: Iterable[KVEntry], *, session_clause: bool = True
    ) -> Verdict:
        """The verdict over entries of one txn (get-tree returns one entry per member key;
        the acks are told apart by their exact keys)."""
        request = joined.request
        acks: dict[str, NodeProgress | None] = {}
        indexes: dict[str, int] = {}
        member_entries: list[KVEntry] = []
        progress_keys = {self.keys.progress(request.id, n): n for n in request.expected}
        decided = ended = False
        outcome_index = 0
        record: Decision | None = None
        end_keys = {self.keys.inflight: 0, self.keys.current: 1, self.keys.history: 2}
        end_entries: list[KVEntry | None] = [None, None, None]
        end_seen = 0
        for entry in entries:
            if entry.key in end_keys:
                end_entries[end_keys[entry.key]] = entry if entry.modify_index else None
                end_seen += 1
                continue
            node = progress_keys.get(entry.key)
            if node is not None:
                acks[node] = parse_ack(entry, node=node, deploy=request.id)
                indexes[node] = entry.modify_index
            elif entry.key == self.keys.decision(request.id):
                decided = entry.modify_index > 0
                record = self._doc(Decision, entry) if decided else None
            elif entry.key == self.keys.outcome(request.id):
                outcome_index = entry.modify_index
            elif entry.key.startswith(self.keys.members_prefix):
                member_entries.append(entry)
        members = self._members_from(member_entries)
        verdict = judge(request, joined.digest, acks, indexes)
        if verdict.outcome == UNDECIDED and session_clause:
            verdict = self._session_clause(joined, acks, members) or verdict
        end_read = self._end_read_of(*end_entries) if end_seen == len(end_keys) else None
        if end_read is not None and outcome_index:
            ended = self._end_written(joined.id, joined.create_index, verdict.outcome, end_read)
        return Verdict(
            verdict.outcome,
            verdict.reason,
            {n: a for n, a in acks.items() if a is not None},
            indexes,
            members,
            decided=decided,
            ended=ended,
            record=record,
            end_read=end_read,
            outcome_index=outcome_index,
        )

    @staticmethod
    def _end_written(deploy_id: str, create_index: int, outcome: str, pre: EndRead) -> bool:
        """Whether the end's txn (outcome, history, ``current``) was applied, as far as
        ``pre`` (read with an outcome record) shows: the deploy is in the history (or
        trimmed from it), and a committed one is named by ``current`` or overtaken there
        by a deploy with a higher CreateIndex."""
        if deploy_id not in pre.history and deploy_id not in pre.trimmed:
            return False
        if outcome != COMMIT:
            return True
        on = pre.current
        return on is not None and (on.deploy == deploy_id or _overtaken(on, create_index))

    def _session_clause(
        self,
        joined: Joined,
        acks: Mapping[str, NodeProgress | None],
        members: Mapping[str, KVEntry],
    ) -> Verdict | None:
        request = joined.request
        suspects = [
            n
            for n in request.expected
            if not ((a := acks.get(n)) is not None and a.acked_ready(joined.digest))
            and (members.get(n) is None or members[n].session != request.sessions.get(n))
        ]
        gone = [
            n
            for n in suspects
            if not request.sessions.get(n)
            or self.consul.session_info(request.sessions[n], consistent=True) is None
        ]
        if not gone:
            return None
        ops = [TxnOp.get_or_empty(self.keys.progress(request.id, n)) for n in gone]
        again = dict(zip(gone, self._read_txn(ops, consistent=True), strict=True))
        dead = [
            n
            for n in gone
            if not ((a := parse_ack(again[n], node=n)) is not None and a.acked_ready(joined.digest))
        ]
        if not dead:
            return None
        return Verdict(
            ABORT,
            f"expected node(s) {some_of(dead)} lost the session named for them before acking",
        )

    def record_decision(
        self,
        joined: Joined,
        verdict: Verdict,
        *,
        node: str,
        mark: dict[str, Any] | None = None,
    ) -> bool:
        """Write ``decisions/<id>`` (check-not-exists) as a record; the txn also rewrites
        this node's own ack, so the ACLs vouch for ``by``, and writes the decided ``mark``
        (``decided_mark_op``) if it can. (A host that writes its intent for a verdict no
        record names yet puts ``decision_op`` and the mark in that txn instead.)"""
        own_key = self.keys.progress(joined.id, node)
        own = verdict.acks.get(node)
        index = verdict.indexes.get(node, 0)
        if own is None or not index:
            return False
        ops = [
            self.decision_op(joined, verdict, node=node),
            TxnOp.cas(own_key, own.to_json(), index),
        ]
        result = self.consul.txn(ops + ([mark] if mark else []))
        if not result.ok and mark and any(i == len(ops) for i, _ in result.errors):
            result = self.consul.txn(ops)  # the member key moved: the record all the same
        if result.ok:
            self.log_decided(joined, verdict, node=node)
        return result.ok

    def decided_mark_op(
        self,
        joined: Joined,
        outcome: str,
        *,
        node: str,
        session: str | None,
        member: KVEntry | None,
    ) -> dict[str, Any] | None:
        """The op that rewrites ``node``'s own member key to say what it established
        (``MemberRecord.decided``): every host watches the members, so all of them wake
        in the same moment, with no watch of their own on the decision key. None when this
        node's session does not hold its member key as last seen (the lock would fail)."""
        if not session or member is None or member.session != session:
            return None
        try:
            base = MemberRecord.from_json(member.value, where=member.key)
        except PayloadError:
            base = MemberRecord(node)
        decided = {"deploy": joined.id, "outcome": outcome, "digest": joined.digest}
        record = MemberRecord(node, base.watcher, base.since, decided)
        return TxnOp.lock(self.keys.member(node), record.to_json(), session)

    def log_decided(self, joined: Joined, verdict: Verdict, *, node: str) -> None:
        log.info(
            "deploy_decided",
            app=self.app,
            deploy=joined.id,
            outcome=verdict.outcome,
            reason=verdict.reason,
            by=node,
        )

    def decision_op(self, joined: Joined, verdict: Verdict, *, node: str) -> dict[str, Any]:
        """The txn op that writes ``decisions/<id>`` once (check-not-exists); only in a txn
        that also writes ``node``'s own progress key."""
        request = joined.request
        decision = Decision(
            outcome=verdict.outcome,
            reason=verdict.reason,
            by=node,
            at=iso(utcnow()),
            digest=joined.digest,
            create_index=joined.create_index,
        )
        if verdict.outcome == COMMIT:
            decision = Decision(
                **{
                    **decision.__dict__,
                    "release": request.release,
                    "artifact": request.artifact,
                    "url": request.url,
                    "size": request.size,
                    "sha256": request.sha256,
                    "expected": list(request.expected),
                    "requested_by": request.requested_by,
                    "requested_at": request.requested_at,
                }
            )
        return TxnOp.cas(self.keys.decision(request.id), decision.to_json(), 0)

    def committed(
        self,
        deploy_id: str,
        *,
        node: str = "",
        first_index: int = 0,
        nodes: Collection[str] | None = None,
    ) -> Joined | None:
        """``committed_or_why`` without the why."""
        return self.committed_or_why(deploy_id, node=node, first_index=first_index, nodes=nodes)[0]

    def committed_or_why(
        self,
        deploy_id: str,
        *,
        node: str = "",
        first_index: int = 0,
        nodes: Collection[str] | None = None,
    ) -> tuple[Joined | None, str]:
        """The deploy's request, if this host may trust that its commit predicate holds;
        else None and, when ``node`` was left out of it (below), or an expected host's own
        ack says it flipped to it (an ack changed after the commit, or that host forged
        it: ``_changed_after_commit``), why (else "").

        The request is rebuilt from the acks (never read from ``requests/``); the acks must
        agree on the request's CreateIndex, and that index must be older than every ack
        key (Consul's own indexes bound what an ack may claim). A deploy that does not
        expect ``node`` is trusted only if this host was not in the app yet when its acks
        were written (``first_index``: ``AppAgent.first_index``), or if two or more hosts
        acked it: every honest expected host checked before its ready ack that no live
        member was left out (``check_sessions``), and one token speaks for one host only.
        So a deploy one host forged for itself alone moves nobody else (DESIGN.md 6.4.5).
        ``nodes``: the nodes whose acks to read (default: every node with acks).
        """
        found = self._embedded_requests(deploy_id, nodes)
        if len(found) != 1:
            return None, ""
        request, entries = found[0]
        digest = request.digest()
        acks = {n: a for n, e in entries.items() if (a := parse_ack(e)) is not None}
        claimed = {a.create_index for a in acks.values()}
        oldest_ack = min(e.create_index for e in entries.values())
        if len(claimed) != 1 or not 0 < next(iter(claimed)) < oldest_ack:
            log.error("acks_disagree", deploy=deploy_id, note="create_index claims do not hold")
            return None, _split(
                _changed_after_commit(
                    _flipped(acks, digest), "its acks claim different CreateIndexes"
                )
            )
        trusted_without_me = len(request.expected) >= 2 or first_index > oldest_ack
        if node and node not in request.expected and not trusted_without_me:
            why = (
                f"only {', '.join(request.expected)} acked, while this host was already in "
                "the fleet (left out, or forged by one host's token)"
            )
            log.error("commit_not_trusted", deploy=deploy_id, node=node, reason=why)
            return None, why
        joined = Joined(request, digest, next(iter(claimed)))
        verdict = self.establish(joined)
        if verdict.outcome == COMMIT:
            return joined, ""
        # Expected hosts whose own ack says they flipped each established the commit first:
        # not committed now, one ack changed after it (who flipped: by the acks read for the
        # claims; what is missing: by the verdict's read).
        return None, _split(
            _not_committed_why(request, digest, verdict.acks, verdict, _flipped(acks, digest))
        )

    def check_sessions(
        self, joined: Joined, members: Mapping[str, KVEntry] | None = None
    ) -> str | None:
        """Why the request's expected set cannot be trusted (None: it can): every expected
        node must be named with a distinct session that holds its member key or no longer
        exists, and every member key older than the request must be expected."""
        request = joined.request
        sessions = [request.sessions.get(n, "") for n in request.expected]
        if len(set(sessions)) != len(sessions) or not all(sessions):
            return "the request names a missing or shared session for an expected node"
        if members is None:
            members = self.members(consistent=True)
        for n in request.expected:
            held = members.get(n)
            if held is not None and held.session == request.sessions[n]:
                continue
            if self.consul.session_info(request.sessions[n], consistent=True) is not None:
                return f"the session named for {n} is alive but does not hold its member key"
        left_out = sorted(
            n
            for n, e in members.items()
            if e.create_index < joined.create_index and n not in request.expected
        )
        if left_out:
            return f"live member(s) {', '.join(left_out)} are not in the request's expected set"
        return None

    # --- the end ----------------------------------------------------------------------

    def acquire_coordinator(self, deploy_id: str, session: str, node: str) -> bool:
        return self.consul.kv_put(self.keys.coordinator(deploy_id), node.encode(), acquire=session)

    def end(
        self,
        joined: Joined,
        verdict: Verdict,
        *,
        by: str,
        history_keep: int,
        on_validate_failure: str,
        expired: bool = False,
        first_index: int = 0,
    ) -> tuple[bool, str | None, str]:
        """Write the outcome, clear ``inflight`` if it still names this deploy (or, after a
        validate failure, point it at a fleet rollback), append to history and trim.
        Returns (ended, rollback deploy id or None, the outcome's result). ``first_index``:
        since when ``by`` is in the app (``committed``), when known."""
        request = joined.request
        acks = verdict.acks
        hosts = {
            n: {**a.timings, "state": a.state, "error": a.error} for n, a in sorted(acks.items())
        }
        validate_failed = sorted(n for n, a in acks.items() if a.state == FAILED_AFTER_COMMIT)
        if verdict.outcome == ABORT:
            result, reason = "aborted", verdict.reason
        elif verdict.outcome == CONTESTED:
            result, reason = "contested", verdict.reason
        elif verdict.outcome == COMMIT and validate_failed:
            result = (
                "failed_after_commit"
                if on_validate_failure == "hold" or request.kind == "rollback"
                else "rolled_back"
            )
            first = acks[validate_failed[0]]
            reason = (
                f"failed after the commit on {', '.join(validate_failed)}: {first.error}".strip()
            )
        elif verdict.outcome == COMMIT:
            result, reason = "committed", verdict.reason
        else:
            result, reason = "expired", "no verdict before the apply deadline"
        if expired and verdict.outcome == COMMIT:
            # Ready, or its intent written (switched or switching, hooks still running).
            pending = [
                n for n in request.expected if acks.get(n) and acks[n].state in (READY, COMMITTED)
            ]
            if pending:
                reason += f"; still not live at the apply deadline: {', '.join(pending)}"
        if verdict.end_read is not None:
            pre, outcome_index = verdict.end_read, verdict.outcome_index
        else:
            pre, outcome_index = self._end_read_with_outcome(request.id)
        if outcome_index and self._end_written(
            joined.id, joined.create_index, verdict.outcome, pre
        ):
            return False, None, result  # another host's end got there first
        inflight_id, inflight_index = pre.inflight, pre.inflight_index
        # An outcome record already there without the end's other writes was not written by
        # an end (any host's token can write one): written over, checked against its index
        # (two hosts ending at once: the history's CAS lets one of them through).
        ops: list[dict[str, Any]] = [TxnOp.unchanged(self.keys.outcome(request.id), outcome_index)]
        rollback_id: str | None = None
        if result == "rolled_back":
            rollback_id, rb_ops, note = self._auto_rollback(joined, verdict, by=by)
            reason += note
            if rollback_id is None:
                result = "failed_after_commit"
            elif inflight_id == request.id:
                ops += rb_ops
            else:
                rollback_id = None
                result = "failed_after_commit"
                reason += "; another deploy started meanwhile, no automatic rollback"
        if inflight_id == request.id and rollback_id is None:
            ops += [TxnOp.check_index(self.keys.inflight, inflight_index)]
            ops += [TxnOp.delete(self.keys.inflight)]
        elif inflight_id == request.id:
            ops.insert(1, TxnOp.check_index(self.keys.inflight, inflight_index))
        outcome = Outcome(
            result=result,
            at=iso(utcnow()),
            by=by,
            reason=reason,
            hosts=hosts,
            rollback_deploy=rollback_id,
        )
        ops += [
            TxnOp.set(self.keys.outcome(request.id), outcome.to_json()),
            TxnOp.delete(self.keys.coordinator(request.id)),
        ]
        # What `current` names once this txn is applied: never trimmed (converge and
        # rollbacks need it), nor the deploy it named before (an automatic rollback started
        # here goes there; a plain one later goes to what `current.previous` will name).
        protected = self._protected(pre.current)
        nxt = (
            self._next_current(joined, pre, by, first_index) if verdict.outcome == COMMIT else None
        )
        if nxt is not None:
            ops += [TxnOp.cas(self.keys.current, nxt.to_json(), pre.current_index)]
            protected = self._protected(nxt) | ({pre.current.deploy} if pre.current else set())
        # Only this deploy: an automatic rollback enters the history at its own end (the
        # history is what says an end was written).
        relisted = self._unlisted_requests(pre, request.id)
        ops += self._history_ops(pre, [request.id], history_keep, protected, relisted=relisted)
        if not self.consul.txn(ops).ok:
            return False, None, result
        log.info(
            "deploy_ended",
            app=self.app,
            deploy=request.id,
            result=result,
            reason=reason,
            rollback=rollback_id,
        )
        return True, rollback_id, result

    def _end_ops(self) -> list[dict[str, Any]]:
        return [
            TxnOp.get_or_empty(self.keys.inflight),
            TxnOp.get_or_empty(self.keys.current),
            TxnOp.get_or_empty(self.keys.history),
        ]

    def _end_read(self) -> EndRead:
        """``inflight``, ``current`` and ``history`` in one consistent read."""
        return self._end_read_of(*self._read_txn(self._end_ops(), consistent=True))

    def _end_read_with_outcome(self, deploy_id: str) -> tuple[EndRead, int]:
        """``_end_read`` and the ModifyIndex of ``deploy_id``'s outcome record (0: none),
        in one consistent read."""
        reads = [*self._end_ops(), TxnOp.get_or_empty(self.keys.outcome(deploy_id))]
        *end_entries, outcome = self._read_txn(reads, consistent=True)
        return self._end_read_of(*end_entries), outcome.modify_index if outcome else 0

    def _end_read_of(
        self, inflight_e: KVEntry | None, current_e: KVEntry | None, history_e: KVEntry | None
    ) -> EndRead:
        inflight = (
            inflight_e.value.decode(errors="replace").strip()
            if inflight_e and inflight_e.value
            else ""
        )
        current, current_index = self.current_of(current_e)
        ids, trimmed = self._history_of(history_e)
        return EndRead(
            inflight or None,
            inflight_e.modify_index if inflight_e else 0,
            current,
            current_index,
            ids,
            trimmed,
            history_e.modify_index if history_e else 0,
        )

    def _next_current(
        self, joined: Joined, pre: EndRead, node: str, first_index: int = 0
    ) -> CurrentRecord | None:
        """What the readers' cache ``current`` becomes once ``joined`` commits; None when it
        already names it or a deploy with a higher CreateIndex. ``previous`` moves only when
        the release changes: redeploying the live release keeps the one a rollback goes to."""
        old = pre.current
        request = joined.request
        if old is not None and old.deploy == request.id:
            return None
        if old is not None and _overtaken(old, joined.create_index):
            later, acked = self._later_by_acks(old, joined.create_index, node, first_index)
            if later:
                return None  # later indeed (what else it says, status reports)
            log.error(
                "current_not_trusted",
                app=self.app,
                deploy=old.deploy,
                claimed_create_index=old.create_index,
                acked_create_index=acked.create_index if acked else None,
                note="`current` claims a later deploy than its acks say: written anew",
            )
            # Its claim is not carried on as ``previous``'s CreateIndex either.
            old = replace(old, create_index=acked.create_index if acked else 0)
        if old is not None and old.release != request.release:
            previous: dict[str, Any] | None = json.loads(old.ref().to_json())
        else:
            previous = old.previous if old else None
        return CurrentRecord(
            release=request.release,
            artifact=request.artifact,
            sha256=request.sha256,
            deploy=request.id,
            url=request.url,
            size=request.size,
            create_index=joined.create_index,
            digest=joined.digest,
            previous=previous,
        )

    def _later_by_acks(
        self, current: CurrentRecord, create_index: int, node: str, first_index: int = 0
    ) -> tuple[bool, Joined | None]:
        """Whether ``current`` names a committed deploy later than the one of
        ``create_index``, by that deploy's acks, and the deploy as they give it. The
        CreateIndex written in ``current`` is any host's word (DESIGN.md 6.4.6): a forged
        high one must not keep every later end from writing ``current``, nor make a host
        take its deploy for over. Reads only when ``current`` claims to be later (a deploy
        that ended after a newer one, or a forged record); as ``node`` reads a commit it is
        not expected in (6.4.5: a deploy one host made for itself alone commits nothing for
        the others)."""
        if not _overtaken(current, create_index):
            return False, None
        acked = self.committed(current.deploy, node=node, first_index=first_index)
        return acked is not None and acked.create_index > create_index, acked

    def own_live_index(self, node: str, release: str) -> tuple[int, str]:
        """The highest CreateIndex that ``node``'s own live (or failed_after_commit) acks of
        deploys of ``release`` claim, and that deploy: which deploy put it on that release,
        by its own word (only its token writes its keys), for a host whose ``applied.json``
        is gone. (0, "") when none says. Two round trips (its keys, one txn of its acks)."""
        prefix = self.keys.node_progress_prefix(node)
        ids = [k[len(prefix) :] for k in self.consul.kv_keys(prefix, None)]
        ids = [d for d in ids if "/" not in d and DEPLOY_ID_RE.match(d)]
        if not ids:
            return 0, ""
        entries = self._read_txn(
            [TxnOp.get_or_empty(self.keys.progress(d, node)) for d in ids], consistent=True
        )
        best = (0, "")
        for deploy_id, entry in zip(ids, entries, strict=True):
            ack = parse_ack(entry, node=node, deploy=deploy_id)
            if (
                entry is not None
                and ack is not None
                and ack.state in APPLIED_STATES
                and ack.release == release
                and 0 < ack.create_index < entry.create_index
            ):
                best = max(best, (ack.create_index, deploy_id))
        return best

    def acked_deploys(self) -> dict[str, list[str]]:
        """Every deploy with acks, and the nodes that acked it (sorted), from one keys read
        of the progress tree (acks live as long as the history keeps their deploy)."""
        prefix = self.keys.progress_prefix
        found: dict[str, list[str]] = {}
        for key in self.consul.kv_keys(prefix, None):
            node, _, deploy_id = key[len(prefix) :].partition("/")
            if "/" not in deploy_id:  # not the request a ready ack carries beside it
                found.setdefault(deploy_id, []).append(node)
        # Each name checked once (a fleet's keys repeat a few names thousands of times).
        named = {n for nodes in found.values() for n in nodes}
        good = {n for n in named if NODE_RE.match(n)}
        return {
            d: sorted(n for n in nodes if n in good)
            for d, nodes in found.items()
            if DEPLOY_ID_RE.match(d)
        }

    def newest_committed(
        self, above: int, *, node: str = "", first_index: int = 0
    ) -> Joined | None:
        """The committed deploy with the highest CreateIndex above ``above``, found from the
        acks alone; None when there is none. ``current`` is a pointer any host's token can
        rewrite (DESIGN.md 6.4.6): pointed back at an older committed deploy, it would
        steer a host that was away there and keep it there, and a reader would call that
        older release the fleet's.

        Each deploy is ranked by the CreateIndex its acks claim: two acks a deploy, of
        two nodes (this host's own first), the higher claim that Consul's own index of its
        ack bounds. One token writes one node's acks, so it can raise the rank of a deploy
        (one of its own making, or an older one it took no part in) but not lower that of
        a later one below what its honest acks claim. A deploy only one node acked is
        ranked only when that node is ``node``: others trust it only as a host that joined
        after it (``committed_or_why``), which ``current`` then names. The predicate is
        established (``committed``) from the highest rank down, while a rank is above the
        best index established so far. Two round trips (a keys read, one txn), and two
        more for each deploy established: none when ``above`` is the newest committed
        deploy's and no later one aborted."""
        acked = {
            d: nodes
            for d, nodes in self.acked_deploys().items()
            if len(nodes) >= 2 or node in nodes
        }
        picked = [
            (d, (([node] if node in nodes else []) + [n for n in nodes if n != node])[:2])
            for d, nodes in sorted(acked.items())
        ]
        ops = [TxnOp.get_or_empty(self.keys.progress(d, n)) for d, two in picked for n in two]
        entries = iter(self._read_txn(ops, consistent=True)) if ops else iter(())
        ranked: list[tuple[int, str]] = []
        for d, two in picked:
            claims = [0]
            for n in two:
                entry = next(entries)
                ack = parse_ack(entry, node=n, deploy=d)
                if (
                    entry is not None
                    and ack is not None
                    and 0 < ack.create_index < entry.create_index
                ):
                    claims.append(ack.create_index)
            if max(claims) > above:
                ranked.append((max(claims), d))
        # The highest *established* index wins: a rank is a claim, and one token can raise
        # the claim of its own ack of an older committed deploy it took no part in (its
        # ack is then not among those ``committed`` counts). So every deploy ranked above
        # the best found so far is still established.
        best: Joined | None = None
        for rank, d in sorted(ranked, reverse=True):
            if best is not None and rank <= best.create_index:
                break
            joined = self.committed(d, node=node, first_index=first_index, nodes=acked[d])
            if joined is not None and joined.create_index > max(
                above, best.create_index if best else 0
            ):
                best = joined
        return best

    def _auto_rollback(
        self, joined: Joined, verdict: Verdict, *, by: str
    ) -> tuple[str | None, list[dict[str, Any]], str]:
        request = joined.request
        try:
            # ``current`` still names the deploy before this one (this end's txn moves it).
            current, _ = self.current()
            before = current.ref() if current and current.deploy != request.id else None
            target = rollback_target(self, None, before=before, current=current)
        except (DeployRefused, PayloadError) as exc:
            return None, [], f"; no automatic rollback: {exc}"
        live = {n: e.session or "" for n, e in verdict.members.items()}
        if not live:
            return None, [], "; no live member to roll back"
        if len(live) > MAX_EXPECTED:  # a request no host could read
            return None, [], f"; no automatic rollback: more than {MAX_EXPECTED} live members"
        rollback_id = new_deploy_id()
        prepare = parse_iso(request.prepare_deadline) - parse_iso(request.requested_at)
        apply = parse_iso(request.apply_deadline) - parse_iso(request.prepare_deadline)
        rb = self.new_record(
            deploy_id=rollback_id,
            kind="rollback",
            artifact=target,
            release=target.release,
            requested_by=f"auto-rollback of {request.id} by {by}",
            expected=live,
            prepare_timeout=prepare.total_seconds(),
            apply_timeout=apply.total_seconds(),
            rollback_of=request.id,
        )
        ops = [
            TxnOp.set(self.keys.inflight, rollback_id.encode()),
            TxnOp.cas(self.keys.request(rollback_id), rb.to_json(), 0),
        ]
        return rollback_id, ops, ""

    def _unlisted_requests(self, pre: EndRead, ending: str) -> list[str]:
        """The deploys with a request in KV that the history read in ``pre`` does not list
        (one keys read), oldest first by id: a list that did not parse, or was rewritten by
        hand, left them out, and what is not listed is never trimmed. The end lists them
        again (before its own deploy), so `history` shows them and the trim takes them in
        turn (the code review: a list read as empty left every deploy before it in KV)."""
        known = {*pre.history, *pre.trimmed, ending, pre.inflight}
        prefix = self.keys.requests_prefix
        found = sorted(  # a request's own key (an abort key alone is no deploy)
            d
            for k in self.consul.kv_keys(prefix)
            if (d := k[len(prefix) :]) not in known and DEPLOY_ID_RE.match(d)
        )
        if found:
            log.warning("history_relisted", app=self.app, count=len(found), deploys=found[-20:])
        return found[-HISTORY_MAX:]

    def _history_ops(
        self,
        pre: EndRead,
        add: list[str],
        keep: int,
        protected: set[str] | None = None,
        evict: Iterable[str] = (),
        relisted: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Append ``add`` to the history and trim what falls out of it, ``evict`` first
        (never the deploys ``current`` names): requests, decisions, outcomes and
        coordinator keys here; each host trims its own progress (``trim_own_progress``).
        ``relisted``: deploys in KV the list left out, put back in front of it."""
        ids, trimmed, index = pre.history, pre.trimmed, pre.history_index
        ids = [*relisted, *(i for i in ids if i not in add), *add]
        evict = set(evict) - set(add)
        gone = [i for i in ids if i in evict]
        ids = [i for i in ids if i not in evict]
        dropped, ids = gone + ids[:-keep], ids[-keep:]
        if protected is None:
            protected = self._protected(pre.current)
        keep_back = [d for d in dropped if d in protected]
        dropped = [d for d in dropped if d not in protected]
        # Kept at the front, they must not make the list longer than a read takes
        # (HISTORY_MAX, with history_keep at it): the oldest others make room. That only
        # happens when nothing else dropped out, so those go with this end's trim, and no
        # backlog (``later``) is written: the list read held at most HISTORY_MAX ids, and
        # this end adds one and trims at least one of the rest whenever any dropped out.
        over = len(keep_back) + len(ids) - HISTORY_MAX
        if over > 0:
            cut = [i for i in ids if i not in protected][:over]
            dropped += cut
            ids = [i for i in ids if i not in cut]
        ids = keep_back + ids
        later = dropped[TRIM_PER_END:]
        # Each host deletes its own acks of the ids listed as trimmed (trim_own_progress).
        # (an evicted refusal has no acks: listing it would only push real ids out)
        trimmed = (trimmed + [d for d in dropped[:TRIM_PER_END] if d not in evict])[-TRIMMED_KEEP:]
        body = json.dumps({"version": 2, "deploys": later + ids, "trimmed": trimmed}).encode()
        ops: list[dict[str, Any]] = [TxnOp.cas(self.keys.history, body, index)]
        for old in dropped[:TRIM_PER_END]:
            try:
                check_deploy_id(old)
            except PayloadError:
                continue
            ops += [
                # The request and its abort key: a tree delete of the bare name would also
                # take every request whose id starts with it (deploy-1 took deploy-12).
                TxnOp.delete(self.keys.request(old)),
                TxnOp.delete_tree(self.keys.request(old) + "/"),
                TxnOp.delete(self.keys.decision(old)),
                TxnOp.delete(self.keys.outcome(old)),
                TxnOp.delete(self.keys.coordinator(old)),
            ]
        return ops

    def _surplus_refusals(self, history: list[str], new: str, keep: int) -> list[str]:
        """The oldest refusals of ``history`` (raw events of an unknown or refused artifact:
        their decision, written with the refusal, says so; they never started, and no host has
        an ack of them) past what the history lets them hold once ``new``, one more, is
        in it. One read of the listed ids' decisions (smaller than their outcomes, which
        carry a summary per host); only a refusal pays for it."""
        allowed = max(1, min(REFUSALS_KEPT, keep // 2))
        listed = []
        for deploy_id in history:
            try:
                check_deploy_id(deploy_id)
            except PayloadError:
                continue  # never a key to read; the trim skips it too
            if deploy_id != new:
                listed.append(deploy_id)
        ops = [TxnOp.get_or_empty(self.keys.decision(i)) for i in listed]
        entries = self._read_txn(ops) if ops else []
        refused = []
        for deploy_id, entry in zip(listed, entries, strict=True):
            decision = self._doc(Decision, entry)
            if (
                decision is not None
                and decision.outcome == ABORT
                and decision.reason.startswith((f"{UNKNOWN_ARTIFACT} ", f"{REFUSED_ARTIFACT}: "))
            ):
                refused.append(deploy_id)
        surplus = len(refused) + 1 - allowed
        return refused[:surplus] if surplus > 0 else []

    def _protected(self, current: CurrentRecord | None) -> set[str]:
        out: set[str] = set()
        if current is not None:
            out.add(current.deploy)
            prev = current.previous or {}
            if isinstance(prev.get("deploy"), str):
                out.add(prev["deploy"])
        return out

    def trim_own_progress(
        self, node: str, *, keep: Iterable[str] = (), history_keep: int = 0
    ) -> int:
        """Delete this node's acks of deploys that are over and out of the history: those
        the end of a deploy trimmed (listed in ``trimmed``), and those that left
        ``trimmed`` (it keeps the last ``TRIMMED_KEEP``) before this host trimmed (a host
        away, many deploys in one trim's interval), which stayed for ever
        (``_left_trimmed``). Never those named by ``inflight``, ``current`` or
        ``current.previous``, nor ``keep``: converge and deploys in flight check them. At
        most one txn: the number deleted, which is ``MAX_TXN_OPS`` when more may be left."""
        end = self._end_read()
        prefix = self.keys.node_progress_prefix(node)
        mine = [(k, k[len(prefix) :].split("/")[0]) for k in self.consul.kv_keys(prefix, None)]
        spare = set(keep) | set(end.history) | self._protected(end.current)
        spare.add(end.inflight or "")
        over = {d for _, d in mine if d not in spare}
        left = sorted(over - set(end.trimmed))
        if left:
            over -= set(left)
            if history_keep and len(end.history) >= history_keep:
                over |= self._left_trimmed(node, left, end.history[0])
        ops = [TxnOp.delete(k) for k, d in mine if d in over][:MAX_TXN_OPS]
        if ops and self.consul.txn(ops).ok:
            return len(ops)
        return 0

    def _left_trimmed(self, node: str, candidates: list[str], oldest: str) -> set[str]:
        """Of ``candidates`` (deploys neither in a full history nor listed as trimmed), those
        whose request is gone and whose ack by ``node`` was written before the request of
        ``oldest``, the oldest deploy the history holds: a whole history of deploys has
        ended since. A deploy whose request was deleted by hand before its end (DESIGN.md
        6.4.2: that changes nothing) keeps its acks until then, and once a later deploy
        committed, a host undecided on it takes it for over (``end_seen``)."""
        requested = self.names_under(self.keys.requests_prefix)
        candidates = [d for d in candidates if d not in requested and DEPLOY_ID_RE.match(d)][
            : MAX_TXN_OPS - 1
        ]
        if not candidates:
            return set()
        try:
            floor, *acks = self._read_txn(
                [
                    TxnOp.get_or_empty(self.keys.request(oldest)),
                    *(TxnOp.get_or_empty(self.keys.progress(d, node)) for d in candidates),
                ],
                consistent=True,
            )
        except PayloadError:
            return set()  # a read refused: left for the next trim
        if floor is None or not floor.create_index:
            return set()  # the oldest deploy's request is gone too: nothing to go by
        return {
            d
            for d, ack in zip(candidates, acks, strict=True)
            if ack is not None and 0 < ack.create_index < floor.create_index
        }

    def clear_inflight(
        self, deploy_id: str, index: int, reason: str, *, by: str, ended: bool = False
    ) -> bool:
        """Clear an ``inflight`` that names a deploy with an outcome (``ended``: the outcome
        stays as it is), or a request that is missing or does not parse (recorded as a
        ``refused`` outcome). Any host may; garbage there must not block deploys."""
        ops: list[dict[str, Any]] = [
            TxnOp.check_index(self.keys.inflight, index),
            TxnOp.delete(self.keys.inflight),
        ]
        try:
            if ended:
                raise PayloadError("nothing to record")
            check_deploy_id(deploy_id)
            outcome = Outcome(result="refused", at=iso(utcnow()), by=by, reason=reason)
            ops += [TxnOp.check_not_exists(self.keys.outcome(deploy_id))]
            ops += [TxnOp.set(self.keys.outcome(deploy_id), outcome.to_json())]
        except PayloadError:
            pass  # not even an id: nothing to record it under
        ok = self.consul.txn(ops).ok
        if not ok and len(ops) > 2:
            # An outcome record is already there (any host's token can write one, and a
            # refused one stays when the same id is put back in ``inflight``): clear
            # ``inflight`` all the same, without a record of our own.
            ok = self.consul.txn(ops[:2]).ok
        if ok:
            log.warning("inflight_cleared", app=self.app, deploy=deploy_id, reason=reason, by=by)
        return ok

    def end_seen(
        self,
        deploy_id: str,
        create_index: int,
        established: str,
        *,
        node: str = "",
        first_index: int = 0,
    ) -> tuple[tuple[CurrentRecord | None, int], bool]:
        """``current()`` and whether this host may take ``deploy_id`` (which it established
        as ``established``) for over, in one consistent read: its end is written
        (``_end_written``), or ``current`` names a later committed deploy. The end writes
        all of these in one txn, so a host that saw ``inflight`` go learns it in one
        request; an outcome record alone is not the end (any host's token writes one)."""
        pre, outcome_index = self._end_read_with_outcome(deploy_id)
        over = (
            pre.current is not None
            and self._later_by_acks(pre.current, create_index, node, first_index)[0]
        ) or (outcome_index > 0 and self._end_written(deploy_id, create_index, established, pre))
        return (pre.current, pre.current_index), over

    def outcome(self, deploy_id: str) -> Outcome | None:
        entry = self.consul.kv_get(self.keys.outcome(deploy_id), consistent=True)
        outcome: Outcome | None = self._doc(Outcome, entry)
        return outcome

    # --- raw events -----------------------------------------------------------------------

    def start_from_event(
        self,
        *,
        event_id: str,
        ltime: int,
        kind: str,
        artifact_id: str | None,
        release: str | None,
        by: str,
        prepare_timeout: float,
        apply_timeout: float,
        history_keep: int,
        max_ltime: int = 0,
    ) -> str:
        """A raw `consul event` deploy or rollback: the first node to see it writes the request
        (deploy id = event ID) and advances ``events_seen``; returns what happened."""
        for _ in range(3):
            if self.deploy_record(event_id) is not None:
                return "exists"
            entry = self.consul.kv_get(self.keys.events_seen)
            raw = entry.value.decode(errors="replace").strip() if entry and entry.value else ""
            number = raw.isascii() and raw.isdigit() and len(raw) < 20
            seen = int(raw) if number else 0
            if raw and not number:
                # Read as 0 (no event is history) and written over below: said, not silent.
                log.warning("events_seen_unreadable", value=one_line_short(raw, 80))
            if max_ltime and seen > max_ltime:
                # Above every LTime this host has seen: a value no event could have set.
                log.error("events_seen_ignored", value=seen, highest_seen=max_ltime)
                seen = 0
            if ltime <= seen:
                # Another host may have written this very event's record (and moved
                # `events_seen` past it, in one txn) since the look above: not history.
                return "exists" if self.deploy_record(event_id) is not None else "history"
            seen_op = TxnOp.cas(
                self.keys.events_seen, str(ltime).encode(), entry.modify_index if entry else 0
            )
            current_check: list[dict[str, Any]] = []
            try:
                members = self.expected_members(allow_missing=True)
                target: ArtifactRecord | ReleaseRef
                if kind == "rollback":
                    current, current_index = self.current()
                    target = rollback_target(self, release, current=current)
                    if release is None:
                        # Its target is `previous` as read: a deploy that ends before the
                        # txn below moves it (as for watcherctl's, DeployStore.start); the
                        # txn then fails and the next round reads `current` again.
                        current_check = [TxnOp.unchanged(self.keys.current, current_index)]
                else:
                    assert artifact_id is not None
                    found = self.artifact(artifact_id)
                    # Refused for what it names: a record with the reason, as for an
                    # unknown artifact, so history and every host say why, not only the
                    # host that read the event first.
                    reason = (
                        _unknown_artifact(artifact_id, self.artifact)
                        if found is None
                        else self._pin_refusal(found)
                        or (
                            f"{REFUSED_ARTIFACT}: {still_uploading(found)}"
                            if found.uploading
                            else ""
                        )
                    )
                    if found is None or reason:
                        now = utcnow()
                        ref = ReleaseRef(
                            release=release_name(now, artifact_id),
                            artifact=artifact_id,
                            sha256="",
                            deploy=event_id,
                        )
                        rec = self.new_record(
                            deploy_id=event_id,
                            kind=kind,
                            artifact=ref,
                            release=None,
                            requested_by=f"{RAW_EVENT_BY}{event_id}",
                            expected=members,
                            prepare_timeout=prepare_timeout,
                            apply_timeout=apply_timeout,
                            now=now,
                        )
                        refused = self._refused_ops(rec, reason, by)
                        pre = self._end_read()
                        history = self._history_ops(
                            pre,
                            [rec.id],
                            history_keep,
                            evict=self._surplus_refusals(pre.history, rec.id, history_keep),
                        )
                        if self.consul.txn([seen_op, *refused, *history]).ok:
                            return f"refused: {reason}"  # the same words on every host
                        continue
                    target = found
            except (DeployRefused, PayloadError, ArtifactIntegrityError) as exc:
                self.consul.kv_put(
                    self.keys.events_seen,
                    str(ltime).encode(),
                    cas=entry.modify_index if entry else 0,
                )
                return f"refused: {exc}"
            rec = self.new_record(
                deploy_id=event_id,
                kind=kind,
                artifact=target,
                release=target.release if isinstance(target, ReleaseRef) else None,
                requested_by=f"{RAW_EVENT_BY}{event_id}",
                expected=members,
                prepare_timeout=prepare_timeout,
                apply_timeout=apply_timeout,
                allow_missing=True,
            )
            ops = [
                TxnOp.cas(self.keys.inflight, rec.id.encode(), 0),
                TxnOp.cas(self.keys.request(rec.id), rec.to_json(), 0),
                seen_op,
                *current_check,
            ]
            if self.consul.txn(ops).ok:
                log.info("deploy_started", app=self.app, deploy=rec.id, kind=kind, by=by)
                return "started"
            if self.deploy_record(event_id) is not None:
                return "exists"
            inflight, _ = self.inflight()
            if inflight and inflight != event_id:
                self.consul.kv_put(
                    self.keys.events_seen,
                    str(ltime).encode(),
                    cas=entry.modify_index if entry else 0,
                )
                return f"refused: {self._in_flight(inflight)}"
        return "lost race"

    def _pin_refusal(self, record: ArtifactRecord) -> str:
        """Why ``record`` may not be deployed (its sha256 is not the one pinned), or ""."""
        try:
            self.check_pin(record)
        except ArtifactIntegrityError as exc:
            return f"{REFUSED_ARTIFACT}: {exc}"
        return ""

    def _refused_ops(self, rec: DeployRecord, reason: str, by: str) -> list[dict[str, Any]]:
        decision = Decision(outcome=ABORT, reason=reason, by=by, at=iso(utcnow()))
        outcome = Outcome(result="refused", at=decision.at, by=by, reason=reason)
        return [
            TxnOp.cas(self.keys.request(rec.id), rec.to_json(), 0),
            TxnOp.cas(self.keys.decision(rec.id), decision.to_json(), 0),
            TxnOp.set(self.keys.outcome(rec.id), outcome.to_json()),
        ]


def _flipped(acks: Mapping[str, NodeProgress], digest: str) -> list[str]:
    """The nodes whose own ack says they established the commit of ``digest`` (APPLIED)."""
    return sorted(n for n, a in acks.items() if a.digest == digest and a.state in APPLIED)


def _not_committed_why(
    request: DeployRecord,
    digest: str,
    acks: Mapping[str, NodeProgress],
    verdict: Verdict,
    flipped: Sequence[str] | None = None,
) -> str:
    """``_changed_after_commit`` of a deploy ``verdict`` does not commit, as hosts and
    readers say it: for an undecided one, whose ready ack is missing. ``flipped``: from
    another read of the acks (default: ``acks``)."""
    unready = [
        n for n in request.expected if (a := acks.get(n)) is None or not a.acked_ready(digest)
    ]
    detail = (
        verdict.reason
        if verdict.outcome != UNDECIDED or not unready
        else f"no ready ack of {some_of(unready)}"
    )
    return _changed_after_commit(_flipped(acks, digest) if flipped is None else flipped, detail)


def _changed_after_commit(flipped: Sequence[str], detail: str) -> str:
    """Why a host does not follow a deploy whose acks say that ``flipped`` hosts flipped
    to it though they do not commit it (``detail``): "" when none did. An ack changed after
    the commit makes that (DESIGN.md 6.4.4, contested: the hosts that took part see it and
    hold, a host that was away sees only a deploy it cannot trust while the fleet runs it),
    or, with one host alone flipped, that host's token forging the deploy."""
    if not flipped:
        return ""
    # One host alone may also have forged the deploy and its own ack with its token.
    how = (
        "an ack changed after the commit (contested)"
        if len(flipped) > 1
        else f"an ack changed after the commit (contested), or {flipped[0]}'s token forged it"
    )
    if len(detail) > DETAIL_SHOWN:  # names of a request any host's token can write
        detail = f"{detail[:DETAIL_SHOWN]}..."
    # "by its own ack": a claim of that host's token, which may be all there is of it.
    own = "its own ack" if len(flipped) == 1 else "their own acks"
    return (
        f"by {own} {some_of(flipped)} flipped to, but whose acks no longer commit it "
        f"({detail}): {how}"
    )


#: Characters of a verdict's reason shown inside another message, and names listed.
DETAIL_SHOWN = 300
NAMES_SHOWN = 5


def some_of(names: Sequence[str]) -> str:
    """The first ``NAMES_SHOWN`` of ``names``, and how many more."""
    more = len(names) - NAMES_SHOWN
    return ", ".join(names[:NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _split(why: str) -> str:
    """``why`` a host behind `current` does not follow it, with what that leaves (not "the
    fleet is split": with a forged deploy nobody moved)."""
    return f"{why}; this host stays where it is until the next deploy" if why else ""


def _overtaken(current: CurrentRecord, create_index: int) -> bool:
    """``current`` names a deploy later than the one of ``create_index`` (0: not known)."""
    return bool(create_index) and current.create_index > create_index


def summarize_states(view: DeployView) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in view.record.expected:
        state = view.nodes[node].state if node in view.nodes else "pending"
        counts[state] = counts.get(state, 0) + 1
    return counts


def _refuse_a_failed_previous(store: DeployStore, rec: DeployRecord) -> None:
    """A plain "roll back" after an automatic rollback would go to the release the fleet
    was just rolled back from (``current.previous`` is the failed one): refused, so the
    operator names the release. The outcome as the acks vouch for it (``checked``): any
    host's token can write the record, and a forged failure must not block the plain
    rollback (nor a deleted record hide a real one)."""
    said = failed_deploy(store.view(rec.id))
    if not said:
        return
    raise DeployRefused(
        f"app {store.app}: the previous release {rec.release} is the one deploy {rec.id} "
        f"{said}; name the release to roll "
        f"back to (`watcherctl rollback {store.app} --to RELEASE`; `watcherctl history "
        f"{store.app}` lists them), or --to {rec.release} to go back to it all the same"
    )


def failed_deploy(view: DeployView | None) -> str:
    """How ``view``'s deploy failed its release, as its acks vouch for it ("ended
    rolled_back with (...)"), or "" when it did not: what makes a plain rollback to its
    release refused (``_refuse_a_failed_previous``), and `status` suggest ``--to``."""
    if view is None:
        return ""
    outcome = view.checked().outcome
    if outcome is not None and outcome.result in ("rolled_back", "failed_after_commit"):
        return f"ended {outcome.result} with ({outcome.reason[:300]})"
    if failed := failed_after_commit_on(view):
        # Its validate failed only after the deploy had ended `committed` (at its apply
        # deadline): no automatic rollback, and the acks say it all the same.
        return f"ended committed, and failed after its commit on {', '.join(failed)} later"
    return ""


def failed_after_commit_on(view: DeployView) -> list[str]:
    """The expected nodes whose own ack in ``view``'s deploy says its release failed after
    the commit here (a validate or post_symlink), whenever that was."""
    return [
        node
        for node in view.record.expected
        if (ack := view.nodes.get(node)) is not None and ack.state == FAILED_AFTER_COMMIT
    ]


_READ: Any = object()  # rollback_target's ``current`` when the caller has not read it


def flipped_elsewhere(view: DeployView, previous: str) -> str:
    """Why ``previous`` (the release `current.previous` names) is not what the hosts that
    went live in ``view``'s deploy (the one `current` names) flipped from, by their own
    acks, or "". Any host's token can rewrite `current.previous` (a plain rollback then
    went two releases back, the attacker review); each ack is its node's. Hosts that
    flipped from different releases make "previous" ambiguous too. Acks of older versions,
    and of hosts that did not flip in it, say nothing."""
    froms: dict[str, list[str]] = {}
    for node, ack in sorted(view.nodes.items()):
        if ack.flipped_from and ack.state in APPLIED_STATES:
            froms.setdefault(ack.flipped_from, []).append(node)
    if not froms or set(froms) == {previous}:
        return ""
    said = "; ".join(f"{release} ({', '.join(nodes)})" for release, nodes in sorted(froms.items()))
    why = f"the hosts that went live in deploy {view.id} flipped from: {said}"
    others = sorted(n for release, nodes in froms.items() if release != previous for n in nodes)
    if len(froms.get(previous, ())) > len(others):
        # Most hosts agree with the record: the others may have been off the fleet's
        # release when that deploy started, which the status review did by hand (`ln
        # -sfn`) and was read as a rewritten record.
        why += (
            f" ({some_of(others)} may have been on another release when it started: "
            "`current` changed by hand, or `rollback --local`)"
        )
    return why


def _refuse_a_previous_the_acks_deny(
    store: DeployStore, current: CurrentRecord | None, target: DeployRecord
) -> None:
    """A plain rollback goes to `current.previous` only where the hosts that went live in
    the deploy `current` names flipped from that release (``flipped_elsewhere``)."""
    if current is None:
        return
    with contextlib.suppress(PayloadError):
        view = store.view(current.deploy)
        if view is not None and (why := flipped_elsewhere(view, target.release)):
            raise DeployRefused(
                f"app {store.app}: refusing a plain rollback: `current.previous` names "
                f"release {target.release} (deploy {target.id}), but {why}; name the "
                "release to roll back to with --to"
            )


def _refuse_a_current_behind_the_acks(store: DeployStore, current: CurrentRecord | None) -> None:
    """A plain rollback goes to the release before the fleet's, which only a `current`
    naming the newest committed deploy gives: refused when the deploy it names is not
    committed by its acks (a forged id, or an ack rewritten since: its ``previous`` is
    anybody's word), or when the acks commit a later one (`current` pointed back, DESIGN.md
    6.4.6): either way ``previous`` could take the fleet two or more releases back."""
    if current is None:
        return
    refusal = (
        f"app {store.app}: refusing a plain rollback: `current` names release "
        f"{current.release} (deploy {current.deploy}), "
    )
    try:
        pointed = store.committed(current.deploy)
        later = store.newest_committed(pointed.create_index) if pointed is not None else None
    except PayloadError as exc:
        raise DeployRefused(f"{refusal}which cannot be checked: {exc}") from None
    if later is not None:
        # The deploy in flight, committed before its end writes `current`, or a `current`
        # that moved since it was read: those refusals say so themselves (the start).
        now, _ = store.current()
        if later.id == store.inflight()[0] or (now.deploy if now else None) != current.deploy:
            return
    if pointed is None:
        raise DeployRefused(
            f"{refusal}which its acks do not commit (a forged record, or an ack rewritten "
            "since); name the release to roll back to with --to"
        )
    if later is not None:
        raise DeployRefused(
            f"{refusal}but the acks commit a later deploy {later.id} (release "
            f"{later.request.release}); name the release to roll back to with --to"
        )


def rollback_target(
    store: DeployStore,
    release: str | None,
    *,
    before: ReleaseRef | None = None,
    current: CurrentRecord | None = _READ,
) -> ReleaseRef:
    """The release a rollback goes to: ``current.previous``, or a named one from history
    (``current``: the record when the caller has just read it).

    Only a deploy whose commit predicate holds is a target; what is restaged (url, size,
    sha256) comes from its acked request, never from ``current`` or an artifact record.
    """
    if current is _READ:
        current, _ = store.current()
    candidates: list[str] = []
    if release is None:
        target = before or (current.previous_ref() if current else None)
        if target is None:
            raise DeployRefused(f"app {store.app}: no previous release recorded to roll back to")
        candidates.append(target.deploy)
    else:
        if current is not None:
            for ref in (current.ref(), current.previous_ref()):
                if ref is not None and ref.release == release:
                    candidates.append(ref.deploy)
        for deploy_id in reversed(store.history()):
            try:
                rec = store.deploy_record(deploy_id)
            except PayloadError:
                continue
            if rec is not None and rec.release == release and deploy_id not in candidates:
                candidates.append(deploy_id)
    for deploy_id in candidates:
        joined = store.committed(deploy_id)
        if joined is None:
            continue
        rec = joined.request
        if release is not None and rec.release != release:
            continue
        if release is None and before is None:
            _refuse_a_failed_previous(store, rec)
            _refuse_a_previous_the_acks_deny(store, current, rec)
            _refuse_a_current_behind_the_acks(store, current)
        if len(rec.expected) == 1:
            # (a token without hosts/, a record that does not read: the hosts judge it)
            with contextlib.suppress(ConsulPermissionDenied, PayloadError):
                view = store.view(deploy_id)
                # Only the members: they are the hosts the rollback expects, and each
                # judges the target for itself; a host down (or retired without `gc`)
                # does not take part, and one that was expected in it follows it.
                members = store.members()
                if view is not None and (why := store.left_out(view, among=members)):
                    # The hosts it left out refuse it as a target: a round sure to abort.
                    raise DeployRefused(
                        f"app {store.app}: refusing to roll back to {rec.release} (deploy "
                        f"{rec.id}), which {why}; roll back to another release with --to"
                    )
        return ReleaseRef(
            release=rec.release,
            artifact=rec.artifact,
            sha256=rec.sha256,
            deploy=rec.id,
            url=rec.url,
            size=rec.size,
            create_index=joined.create_index,
            digest=joined.digest,
            format=rec.format,
            branch=rec.branch,
            commit=rec.commit,
        )
    if release is not None and not candidates:
        raise RollbackTargetUnknown(
            f"app {store.app}: unknown release {release}: neither `current` nor any deploy "
            f"in the history names it (the history keeps the last history_keep deploys; "
            f"`watcherctl history {store.app}` lists them)"
        )
    what = f"release {release}" if release else "the previous release"
    named = ", ".join(candidates[:5])
    raise DeployRefused(
        f"app {store.app}: {what} is named by deploy {named}, but the acks commit none of "
        "them (aborted, contested, or acks trimmed with the history: it keeps the last "
        "history_keep deploys); roll back to another release with --to"
    )


def resolve_artifact(store: DeployStore, artifact_id: str) -> ArtifactRecord:
    check_artifact_id(artifact_id)
    record = store.artifact(artifact_id)
    if record is None:
        raise ArtifactNotFound(
            f"app {store.app}: unknown artifact {artifact_id} (no record at "
            f"{store.keys.artifact(artifact_id)}; was it published?)"
        )
    store.check_pin(record)
    if record.uploading:
        raise DeployRefused(f"app {store.app}: {still_uploading(record)}")
    return record


def still_uploading(record: ArtifactRecord) -> str:
    """Why a build whose publish has not finished is not deployed (its object may be
    missing or partial: every host would fail to download it, and the deploy abort)."""
    by = f" by {record.created_by}" if record.created_by else ""
    since = f" since {record.created_at}" if record.created_at else ""
    return (
        f"artifact {record.id} is still being uploaded (its publish{by}{since} has not "
        "finished); deploy it once it has (its build-finished event), or, if that publish "
        "failed or was killed, publish it again"
    )


__all__ = [
    "CONTESTED",
    "UNDECIDED",
    "DeployStore",
    "DeployView",
    "Joined",
    "Verdict",
    "judge",
    "new_deploy_id",
    "resolve_artifact",
    "rollback_target",
    "still_uploading",
    "summarize_states",
]
