"""The deploy protocol over Consul KV (DESIGN.md 6): records, one decision, the end of a deploy.

Everything here is a KV operation any actor may run (the daemon's coordinator, any node
after a deadline, `watcherctl`); the per-host side (staging, flipping, hooks) is in
``watcher.agent``. Every decision write is one ``/v1/txn`` with ``check-not-exists`` on the
decision key, so there is exactly one decision per deploy whoever writes it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from watcher import PROTOCOL_VERSION
from watcher.consul_api import ConsulClient, KVEntry, TxnOp
from watcher.errors import (
    ArtifactNotFound,
    ConsulPermissionDenied,
    DeployInFlight,
    DeployRefused,
    PayloadError,
)
from watcher.log import get_logger
from watcher.records import (
    ABORT,
    COMMIT,
    DEPLOY_ID_RE,
    FAILED,
    FAILED_AFTER_COMMIT,
    NEXT_STATES,
    NODE_FINAL_STATES,
    READY,
    ArtifactRecord,
    CurrentRecord,
    Decision,
    DeployRecord,
    HostRecord,
    Keys,
    NodeProgress,
    Outcome,
    ReleaseRef,
    iso,
    parse_iso,
    release_name,
    utcnow,
)

log = get_logger(module="barrier")

# Past this many expected nodes, the commit txn relies on the forward-only node records
# instead of one check-index per node (Consul caps a txn's operations).
MAX_INDEX_CHECKS = 56


@dataclass(frozen=True)
class DeployView:
    """A deploy as read from KV in one go: the record, its decision, every node's progress."""

    record: DeployRecord
    decision: Decision | None
    nodes: dict[str, NodeProgress]
    node_indexes: dict[str, int]
    outcome: Outcome | None
    coordinator_session: str | None

    @property
    def id(self) -> str:
        return self.record.id

    def missing_expected(self, members: Iterable[str]) -> list[str]:
        alive = set(members)
        return [n for n in self.record.expected if n not in alive]


def new_deploy_id(now: datetime | None = None) -> str:
    """A deploy id made by `watcherctl`: sortable timestamp plus randomness."""
    ts = (now or utcnow()).strftime("%Y%m%dT%H%M%SZ")
    return f"{ts}-{secrets.token_hex(3)}"


class DeployStore:
    """KV operations of the protocol for one app."""

    def __init__(self, consul: ConsulClient, prefix: str, app: str) -> None:
        self.consul = consul
        self.app = app
        self.keys = Keys(prefix, app)

    # --- reads ------------------------------------------------------------------------

    def inflight(self) -> tuple[str | None, int]:
        """The id of the deploy in flight (or None) and the key's modify index (0: absent)."""
        entry = self.consul.kv_get(self.keys.inflight)
        if entry is None or not entry.value:
            return None, 0
        return entry.value.decode(errors="replace").strip() or None, entry.modify_index

    def members(self) -> dict[str, KVEntry]:
        """Live members: node -> its session-held member key."""
        out: dict[str, KVEntry] = {}
        entries, filtered = self.consul.kv_list_checked(self.keys.members_prefix)
        if filtered:  # a partial list would leave live hosts out of the expected set
            raise ConsulPermissionDenied(
                f"app {self.app}: this Consul token may not read {self.keys.members_prefix} "
                "(Consul left keys out of the list: ACLs); use a token with read on "
                f"{self.keys.base}/, e.g. the operator policy of docs/acl.md"
            )
        for entry in entries:
            node = entry.key[len(self.keys.members_prefix) :]
            if node and "/" not in node and entry.session:
                out[node] = entry
        return out

    def hosts(self) -> dict[str, HostRecord]:
        out: dict[str, HostRecord] = {}
        entries, filtered = self.consul.kv_list_checked(self.keys.hosts_prefix)
        if filtered:  # a partial list would hide a known host that is down
            raise ConsulPermissionDenied(
                f"app {self.app}: this Consul token may not read {self.keys.hosts_prefix} "
                "(Consul left keys out of the list: ACLs); use a token with read on "
                f"{self.keys.base}/, e.g. the operator policy of docs/acl.md"
            )
        for entry in entries:
            try:
                record = HostRecord.from_json(entry.value, where=entry.key)
            except PayloadError as exc:
                log.warning("document_skipped", key=entry.key, error=str(exc))
                continue
            out[record.node] = record
        return out

    def artifact(self, artifact_id: str) -> ArtifactRecord | None:
        entry = self.consul.kv_get(self.keys.artifact(artifact_id))
        if entry is None:
            return None
        record = ArtifactRecord.from_json(entry.value, where=entry.key)
        if record.id != artifact_id:  # a record copied or planted under another id
            raise PayloadError(f"{entry.key}: the record there is for artifact {record.id}")
        return record

    def current(self) -> tuple[CurrentRecord | None, int]:
        entry = self.consul.kv_get(self.keys.current)
        if entry is None:
            return None, 0
        try:
            return CurrentRecord.from_json(entry.value, where=entry.key), entry.modify_index
        except PayloadError as exc:
            log.error("document_skipped", key=entry.key, error=str(exc))
            return None, entry.modify_index

    def deploy_record(self, deploy_id: str) -> DeployRecord | None:
        entry = self.consul.kv_get(self.keys.deploy(deploy_id))
        if entry is None:
            return None
        return DeployRecord.from_json(entry.value, where=entry.key)

    def view(self, deploy_id: str) -> DeployView | None:
        """Everything about one deploy from one recursive read of ``deploys/<id>/``."""
        record = self.deploy_record(deploy_id)
        if record is None:
            return None
        prefix = self.keys.deploy_prefix(deploy_id)
        nodes_prefix = self.keys.nodes_prefix(deploy_id)
        decision: Decision | None = None
        outcome: Outcome | None = None
        coordinator: str | None = None
        nodes: dict[str, NodeProgress] = {}
        indexes: dict[str, int] = {}
        for entry in self.consul.kv_list(prefix):
            try:
                if entry.key == self.keys.decision(deploy_id):
                    decision = Decision.from_json(entry.value, where=entry.key)
                elif entry.key == self.keys.outcome(deploy_id):
                    outcome = Outcome.from_json(entry.value, where=entry.key)
                elif entry.key == self.keys.coordinator(deploy_id):
                    coordinator = entry.session
                elif entry.key.startswith(nodes_prefix):
                    progress = NodeProgress.from_json(entry.value, where=entry.key)
                    node = entry.key[len(nodes_prefix) :]
                    nodes[node] = progress
                    indexes[node] = entry.modify_index
            except PayloadError as exc:
                log.error("document_skipped", key=entry.key, error=str(exc))
        return DeployView(record, decision, nodes, indexes, outcome, coordinator)

    def history(self) -> list[str]:
        """Deploy ids of this app, oldest first (bounded by ``daemon.history_keep``)."""
        ids, _ = self._history()
        return ids

    def _history(self) -> tuple[list[str], int]:
        entry = self.consul.kv_get(f"{self.keys.base}/history")
        if entry is None or not entry.value:
            return [], 0
        try:
            ids = json.loads(entry.value)["deploys"]
            # an entry that is no deploy id names no keys (and is dropped at the next write)
            return [str(i) for i in ids if DEPLOY_ID_RE.match(str(i))], entry.modify_index
        except (ValueError, KeyError, TypeError):
            log.error("document_skipped", key=entry.key, error="history is not valid JSON")
            return [], entry.modify_index

    def _history_ops(self, add: str, keep: int) -> list[dict[str, object]]:
        """Txn ops appending ``add`` to the history and trimming what falls out of it."""
        ids, index = self._history()
        ids = [i for i in ids if i != add] + [add]
        dropped, ids = ids[:-keep], ids[-keep:]
        body = json.dumps({"version": 1, "deploys": ids}).encode()
        ops: list[dict[str, object]] = [TxnOp.cas(f"{self.keys.base}/history", body, index)]
        for old in dropped[:8]:  # a handful per end keeps the txn small; the rest go next time
            ops += [
                TxnOp.delete(self.keys.deploy(old)),
                TxnOp.delete_tree(self.keys.deploy_prefix(old)),
            ]
        return ops

    # --- start --------------------------------------------------------------------------

    def new_record(
        self,
        *,
        deploy_id: str,
        kind: str,
        artifact: ArtifactRecord | ReleaseRef,
        release: str | None,
        requested_by: str,
        expected: list[str],
        prepare_timeout: float,
        apply_timeout: float,
        now: datetime | None = None,
        resume_of: str | None = None,
        rollback_of: str | None = None,
    ) -> DeployRecord:
        now = now or utcnow()
        if isinstance(artifact, ArtifactRecord):
            artifact_id, sha = artifact.id, artifact.sha256
        else:
            artifact_id, sha = artifact.artifact, artifact.sha256
        return DeployRecord(
            id=deploy_id,
            app=self.app,
            kind=kind,
            artifact=artifact_id,
            sha256=sha,
            release=release or release_name(now, artifact_id),
            requested_by=requested_by,
            requested_at=iso(now),
            expected=sorted(expected),
            prepare_deadline=iso(now + timedelta(seconds=prepare_timeout)),
            apply_deadline=iso(now + timedelta(seconds=prepare_timeout + apply_timeout)),
            resume_of=resume_of,
            rollback_of=rollback_of,
            min_protocol=PROTOCOL_VERSION,
        )

    def expected_members(self, *, allow_missing: bool) -> list[str]:
        """The current members; refuses when a known host has no member key (unless allowed)."""
        members = sorted(self.members())
        if not members:
            raise DeployRefused(
                f"app {self.app}: no watcher holds a member key; is any daemon running?"
            )
        missing = sorted(set(self.hosts()) - set(members))
        if missing and not allow_missing:
            raise DeployRefused(
                f"app {self.app}: known host(s) {', '.join(missing)} have no member key "
                "(watcher down or cut off); start them or pass --allow-missing to deploy "
                f"to the {len(members)} live member(s) only"
            )
        return members

    def start(
        self,
        record: DeployRecord,
        *,
        history_keep: int,
        extra_ops: list[dict[str, object]] | None = None,
    ) -> bool:
        """Create ``inflight`` and the deploy record in one txn; refuse if one is in flight.

        Returns False when this same deploy was already started by someone else.
        """
        ops = [
            TxnOp.cas(self.keys.inflight, record.id.encode(), 0),
            TxnOp.set(self.keys.deploy(record.id), record.to_json()),
        ]
        ops += extra_ops or []
        ops += self._history_ops(record.id, history_keep)
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
            raise DeployInFlight(self._inflight_message(current_id))
        if current_id == record.id:
            return False
        raise DeployRefused(
            f"app {self.app}: could not start deploy {record.id}: "
            f"{result.errors or 'txn rolled back'}"
        )

    def _inflight_message(self, deploy_id: str) -> str:
        try:
            other = self.deploy_record(deploy_id)
        except PayloadError:
            other = None
        if other is None:
            return (
                f"app {self.app}: deploy {deploy_id} is in flight, with no readable record; "
                "`watcherctl status` shows how to clear it"
            )
        return (
            f"app {self.app}: deploy {deploy_id} ({other.kind} of {other.release}, "
            f"requested by {other.requested_by} at {other.requested_at}) is in flight; "
            "wait for it or `watcherctl abort " + deploy_id + "`"
        )

    def record_refused(
        self,
        record: DeployRecord,
        reason: str,
        *,
        by: str,
        history_keep: int,
        extra_ops: list[dict[str, object]] | None = None,
    ) -> bool:
        """Write a deploy record with an abort decision and no ``inflight`` (raw event for an
        unknown artifact): every host sees at once why it failed."""
        decision = Decision(outcome=ABORT, reason=reason, by=by, at=iso(utcnow()))
        outcome = Outcome(result="aborted", at=decision.at, by=by, reason=reason)
        ops = [
            TxnOp.cas(self.keys.deploy(record.id), record.to_json(), 0),
            TxnOp.cas(self.keys.decision(record.id), decision.to_json(), 0),
            TxnOp.set(self.keys.outcome(record.id), outcome.to_json()),
        ]
        ops += extra_ops or []
        ops += self._history_ops(record.id, history_keep)
        return self.consul.txn(ops).ok

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
    ) -> str:
        """A raw `consul event` deploy or rollback: the first node to see it writes the record
        (deploy id = event ID) and advances ``events_seen``; returns what happened."""
        for _ in range(3):
            if self.deploy_record(event_id) is not None:
                return "exists"
            entry = self.consul.kv_get(self.keys.events_seen)
            raw = entry.value.decode(errors="replace").strip() if entry and entry.value else ""
            seen = int(raw) if raw.isascii() and raw.isdigit() else 0
            if ltime <= seen:
                return "history"
            seen_op = TxnOp.cas(
                self.keys.events_seen, str(ltime).encode(), entry.modify_index if entry else 0
            )
            members = sorted(self.members())
            target: ArtifactRecord | ReleaseRef
            try:
                if kind == "rollback":
                    target = rollback_target(self, release)
                else:
                    assert artifact_id is not None
                    found = self.artifact(artifact_id)
                    if found is None:
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
                            requested_by=f"consul event {event_id}",
                            expected=members,
                            prepare_timeout=prepare_timeout,
                            apply_timeout=apply_timeout,
                            now=now,
                        )
                        if self.record_refused(
                            rec,
                            f"unknown artifact {artifact_id}",
                            by=by,
                            history_keep=history_keep,
                            extra_ops=[seen_op],
                        ):
                            return "unknown artifact"
                        continue
                    target = found
                if not members:
                    raise DeployRefused(f"app {self.app}: no live members")
            except (DeployRefused, PayloadError) as exc:
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
                requested_by=f"consul event {event_id}",
                expected=members,
                prepare_timeout=prepare_timeout,
                apply_timeout=apply_timeout,
            )
            try:
                # Two hosts that see the event at once race; the loser finds it started.
                created = self.start(rec, history_keep=history_keep, extra_ops=[seen_op])
                return "started" if created else "exists"
            except DeployInFlight as exc:
                self.consul.kv_put(
                    self.keys.events_seen,
                    str(ltime).encode(),
                    cas=entry.modify_index if entry else 0,
                )
                return f"refused: {exc}"
            except DeployRefused:
                continue  # events_seen moved under us: read again
        return "lost race"

    # --- per-node progress ----------------------------------------------------------

    def write_progress(
        self,
        deploy_id: str,
        node: str,
        state: str,
        *,
        error: str = "",
        output_tail: str = "",
        timings: dict[str, str] | None = None,
    ) -> bool:
        """Move this node's record forward (CAS on its own index); False if not allowed."""
        key = self.keys.node_progress(deploy_id, node)
        for _ in range(5):
            entry = self.consul.kv_get(key)
            old: NodeProgress | None = None
            if entry is not None:
                try:
                    old = NodeProgress.from_json(entry.value, where=key)
                except PayloadError:
                    old = None
            old_state = old.state if old else ""
            if old_state == state:
                return True
            if state not in NEXT_STATES.get(old_state, frozenset()):
                log.warning(
                    "progress_not_forward", deploy=deploy_id, node=node, old=old_state, new=state
                )
                return False
            merged = dict(old.timings) if old else {}
            merged.update(timings or {})
            new = NodeProgress(
                node=node,
                state=state,
                error=error[:2000],
                output_tail=output_tail[-4000:],
                timings=merged,
            )
            if self.consul.kv_put(key, new.to_json(), cas=entry.modify_index if entry else 0):
                return True
        return False

    # --- the decision ---------------------------------------------------------------

    def acquire_coordinator(self, deploy_id: str, session: str, node: str) -> bool:
        return self.consul.kv_put(self.keys.coordinator(deploy_id), node.encode(), acquire=session)

    def decide(
        self, view: DeployView, outcome: str, reason: str, *, by: str, session: str | None = None
    ) -> bool:
        """Write the one decision of a deploy. Commit needs the coordinator's session and
        updates ``apps/<app>/current`` in the same txn. Returns False if someone else decided
        first (or the coordinator lost its lock / a record moved)."""
        deploy_id = view.id
        decision = Decision(outcome=outcome, reason=reason, by=by, at=iso(utcnow()))
        ops: list[dict[str, object]] = [
            TxnOp.cas(self.keys.decision(deploy_id), decision.to_json(), 0)
        ]
        if outcome == COMMIT:
            if session is None:
                raise ValueError("a commit needs the coordinator's session")
            ops.append(TxnOp.check_session(self.keys.coordinator(deploy_id), session))
            if len(view.record.expected) <= MAX_INDEX_CHECKS:
                ops += [
                    TxnOp.check_index(self.keys.node_progress(deploy_id, n), view.node_indexes[n])
                    for n in view.record.expected
                ]
            old, index = self.current()
            rec = view.record
            previous = (
                old.ref()
                if old and old.release != rec.release
                else (old.previous_ref() if old else None)
            )
            new = CurrentRecord(
                release=rec.release,
                artifact=rec.artifact,
                sha256=rec.sha256,
                deploy=rec.id,
                previous=_ref_dict(previous) if previous else None,
            )
            ops.append(TxnOp.cas(self.keys.current, new.to_json(), index))
        result = self.consul.txn(ops)
        if result.ok:
            log.info(
                "deploy_decided",
                app=self.app,
                deploy=deploy_id,
                outcome=outcome,
                reason=reason,
                by=by,
            )
        return result.ok

    def abort(self, deploy_id: str, reason: str, *, by: str) -> bool:
        """`watcherctl abort` and deadline aborts: any actor, same check-not-exists."""
        try:
            view = self.view(deploy_id)
        except PayloadError as exc:
            return self._end_unreadable(deploy_id, f"{reason}; record unreadable: {exc}", by=by)
        if view is None:
            raise DeployRefused(f"app {self.app}: no deploy {deploy_id}")
        if view.decision is not None:
            return False
        return self.decide(view, ABORT, reason, by=by)

    def _end_unreadable(self, deploy_id: str, reason: str, *, by: str) -> bool:
        """End a deploy in flight whose record does not parse (no host can act on it)."""
        inflight, index = self.inflight()
        if inflight != deploy_id:
            raise DeployRefused(
                f"app {self.app}: deploy {deploy_id} is unreadable and not "
                "in flight; nothing to abort"
            )
        outcome = Outcome(result="aborted", at=iso(utcnow()), by=by, reason=reason)
        ops = [
            TxnOp.check_index(self.keys.inflight, index),
            TxnOp.delete(self.keys.inflight),
            TxnOp.set(self.keys.outcome(deploy_id), outcome.to_json()),
        ]
        ok = self.consul.txn(ops).ok
        if ok:
            log.warning(
                "deploy_ended", app=self.app, deploy=deploy_id, result="aborted", reason=reason
            )
        return ok

    # --- the end ----------------------------------------------------------------------

    def end(
        self,
        view: DeployView,
        *,
        by: str,
        inflight_index: int,
        history_keep: int,
        members: Iterable[str],
        on_validate_failure: str,
    ) -> tuple[bool, str | None]:
        """Write ``outcome`` and delete ``inflight`` in one txn (or, after a validate failure,
        point ``inflight`` at a fleet rollback). Returns (ended, rollback deploy id or None);
        not ended when ``inflight`` moved under us (someone else ended it)."""
        rec, decision = view.record, view.decision
        live = sorted(members)
        hosts = {
            n: {"state": p.state, "error": p.error, **p.timings} for n, p in view.nodes.items()
        }
        validate_failed = sorted(n for n, p in view.nodes.items() if p.state == FAILED_AFTER_COMMIT)
        if decision is None:  # evaluate() only ends decided deploys; kept for direct callers
            result = "expired"
        elif decision.outcome == ABORT:
            result = "aborted"
        elif validate_failed:
            result = (
                "failed_after_commit"
                if on_validate_failure == "hold" or rec.kind == "rollback"
                else "rolled_back"
            )
        else:
            result = "committed"
        reason = decision.reason if decision else "no decision before the apply deadline"
        if validate_failed:
            first = view.nodes[validate_failed[0]]
            reason = (f"validate failed on {', '.join(validate_failed)}: {first.error}").strip()
        ops: list[dict[str, object]] = [TxnOp.check_index(self.keys.inflight, inflight_index)]
        rollback_id: str | None = None
        if result == "rolled_back":
            current, _ = self.current()
            try:
                target = current.previous_ref() if current else None
            except PayloadError as exc:
                target = None
                reason += f"; current.previous is unreadable ({exc})"
            if target is None or not live:
                result = "failed_after_commit"
                reason += (
                    "; no previous release to roll back to"
                    if target is None
                    else "; no live member to roll back"
                )
            else:
                rollback_id = new_deploy_id()
                prepare = parse_iso(rec.prepare_deadline) - parse_iso(rec.requested_at)
                apply = parse_iso(rec.apply_deadline) - parse_iso(rec.prepare_deadline)
                rb = self.new_record(
                    deploy_id=rollback_id,
                    kind="rollback",
                    artifact=target,
                    release=target.release,
                    requested_by=f"auto-rollback of {rec.id} by {by}",
                    expected=live,
                    prepare_timeout=prepare.total_seconds(),
                    apply_timeout=apply.total_seconds(),
                    rollback_of=rec.id,
                )
                ops += [
                    TxnOp.set(self.keys.inflight, rollback_id.encode()),
                    TxnOp.set(self.keys.deploy(rollback_id), rb.to_json()),
                ]
                ops += self._history_ops(rollback_id, history_keep)
        if rollback_id is None:
            ops.append(TxnOp.delete(self.keys.inflight))
        outcome = Outcome(
            result=result,
            at=iso(utcnow()),
            by=by,
            reason=reason,
            hosts=hosts,
            rollback_deploy=rollback_id,
        )
        ops += [
            TxnOp.set(self.keys.outcome(rec.id), outcome.to_json()),
            TxnOp.delete(self.keys.coordinator(rec.id)),
        ]
        if self.consul.txn(ops).ok:
            log.info(
                "deploy_ended",
                app=self.app,
                deploy=rec.id,
                result=result,
                reason=reason,
                rollback=rollback_id,
            )
            return True, rollback_id
        return False, None


def _ref_dict(ref: ReleaseRef) -> dict[str, str]:
    return {
        "release": ref.release,
        "artifact": ref.artifact,
        "sha256": ref.sha256,
        "deploy": ref.deploy,
    }


@dataclass(frozen=True)
class CoordinatorStep:
    """What the coordinator (or a node past a deadline) did in one evaluation."""

    action: str  # "none" | "committed" | "aborted" | "ended" | "lost_race"
    detail: str = ""


def evaluate(
    store: DeployStore,
    view: DeployView,
    *,
    node: str,
    session: str | None,
    is_coordinator: bool,
    inflight_index: int,
    members: set[str],
    history_keep: int,
    on_validate_failure: str,
    now: datetime | None = None,
) -> CoordinatorStep:
    """One evaluation of a deploy in flight: decide, or end it, when the rules say so.

    Only the coordinator commits. Anyone may abort past ``prepare_deadline`` and end past
    ``apply_deadline``; the coordinator aborts on a failed node or a vanished member.
    """
    now = now or utcnow()
    rec = view.record
    if view.decision is None:
        reason = _abort_reason(view, members, now)
        if reason is not None and (is_coordinator or reason.startswith("prepare deadline")):
            ok = store.decide(view, ABORT, reason, by=node)
            return CoordinatorStep("aborted" if ok else "lost_race", reason)
        if (
            is_coordinator
            and rec.expected
            and all(view.nodes.get(n) and view.nodes[n].state == READY for n in rec.expected)
        ):
            ok = store.decide(
                view,
                COMMIT,
                f"all {len(rec.expected)} expected nodes ready",
                by=node,
                session=session,
            )
            return CoordinatorStep("committed" if ok else "lost_race")
        return CoordinatorStep("none")
    # Decided: end when every expected node still holding its member key is final.
    pending = [
        n
        for n in rec.expected
        if n in members
        and (view.nodes.get(n) is None or view.nodes[n].state not in NODE_FINAL_STATES)
    ]
    if view.decision.outcome == ABORT:
        # An aborted deploy's nodes never staged may have no record at all.
        pending = [n for n in pending if view.nodes.get(n) is not None]
    past_apply = now >= parse_iso(rec.apply_deadline)
    if (is_coordinator and not pending) or past_apply:
        ended, rollback = store.end(
            view,
            by=node,
            inflight_index=inflight_index,
            history_keep=history_keep,
            members=members,
            on_validate_failure=on_validate_failure,
        )
        if not ended:
            return CoordinatorStep("lost_race")
        return CoordinatorStep("ended", f"rollback {rollback}" if rollback else "")
    return CoordinatorStep("none", f"waiting for {', '.join(pending)}")


def _abort_reason(view: DeployView, members: set[str], now: datetime) -> str | None:
    rec = view.record
    failed = sorted(n for n, p in view.nodes.items() if p.state == FAILED)
    if failed:
        first = view.nodes[failed[0]]
        return f"node {failed[0]} failed: {first.error}" + (
            f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        )
    if not rec.expected:
        return "no expected nodes"
    gone = view.missing_expected(members)
    if gone:
        return f"expected node(s) {', '.join(gone)} lost their member key before the decision"
    if now >= parse_iso(rec.prepare_deadline):
        not_ready = [
            n for n in rec.expected if view.nodes.get(n) is None or view.nodes[n].state != READY
        ]
        return f"prepare deadline passed; not ready: {', '.join(not_ready)}"
    return None


def summarize_states(view: DeployView) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in view.record.expected:
        state = view.nodes[node].state if node in view.nodes else "pending"
        counts[state] = counts.get(state, 0) + 1
    return counts


def rollback_target(store: DeployStore, release: str | None) -> ReleaseRef:
    """The release a rollback goes to: ``current.previous``, or a named one from history."""
    current, _ = store.current()
    if release is None:
        target = current.previous_ref() if current else None
        if target is None:
            raise DeployRefused(f"app {store.app}: no previous release recorded to roll back to")
        return target
    if current is not None:
        for ref in (current.ref(), current.previous_ref()):
            if ref is not None and ref.release == release:
                return ref
    for deploy_id in reversed(store.history()):
        try:
            view = store.view(deploy_id)
        except PayloadError:
            continue
        if view is None or view.record.release != release:
            continue
        if view.decision is None or view.decision.outcome != COMMIT:
            continue  # only a release the fleet committed is a rollback target
        rec = view.record
        return ReleaseRef(
            release=rec.release, artifact=rec.artifact, sha256=rec.sha256, deploy=rec.id
        )
    raise DeployRefused(
        f"app {store.app}: release {release} was not committed by any deploy in the history"
    )


def resolve_artifact(store: DeployStore, artifact_id: str) -> ArtifactRecord:
    record = store.artifact(artifact_id)
    if record is None:
        raise ArtifactNotFound(
            f"app {store.app}: unknown artifact {artifact_id} (no record at "
            f"{store.keys.artifact(artifact_id)}; was it published?)"
        )
    return record


__all__ = [
    "CoordinatorStep",
    "DeployStore",
    "DeployView",
    "evaluate",
    "new_deploy_id",
    "resolve_artifact",
    "rollback_target",
    "summarize_states",
]
