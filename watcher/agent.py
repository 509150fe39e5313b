"""What one host does for one app: prepare, apply or abort a deploy, and converge to KV.

`AppAgent.reconcile()` is level-triggered: it reads KV (``inflight``, the deploy's records,
``current``) and this host's phase journal, and starts at most one slow task (staging,
hooks, flipping) on the app's worker thread. It never blocks on slow work itself, so the
daemon's loop stays responsive. After a crash the journal says which phases are done;
unfinished ones run again (hooks must be idempotent).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher import PROTOCOL_VERSION, __version__
from watcher.barrier import DeployStore, DeployView, evaluate
from watcher.config import AppConfig, Config
from watcher.errors import (
    ArtifactIntegrityError,
    ArtifactNotFound,
    ConsulError,
    ConsulUnavailable,
    DeployRefused,
    HookError,
    PayloadError,
    WatcherError,
)
from watcher.fsutil import atomic_write_json
from watcher.hooks import HookContext, run_hooks
from watcher.log import get_logger
from watcher.records import (
    ABORT,
    ABORTED,
    COMMIT,
    FAILED,
    FAILED_AFTER_COMMIT,
    LIVE,
    NODE_FINAL_STATES,
    READY,
    STAGING,
    ArtifactRecord,
    CurrentRecord,
    DeployRecord,
    HostRecord,
    iso,
    utcnow,
)
from watcher.releases import ReleaseEngine
from watcher.webhook import notifier_for

JOURNAL_NAME = "deploy.json"
CONVERGE_JOURNAL_NAME = "converge.json"
PREFETCHED_LISTED = 20  # artifact ids a host record lists as prefetched (newest first)
CONVERGE_BACKOFF_MAX = 60.0  # seconds between attempts after repeated convergence failures


def read_journal(state_dir: Path, name: str = JOURNAL_NAME) -> dict[str, Any] | None:
    """This host's journal of the deploy it is part of (None when idle)."""
    try:
        data = json.loads((state_dir / name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("deploy") else None


class Journal:
    """Phases done for this host's current deploy (or convergence), written atomically to
    ``.state/deploy.json`` (or ``.state/converge.json``)."""

    def __init__(self, state_dir: Path, name: str = JOURNAL_NAME) -> None:
        self.path = state_dir / name
        self.state_dir = state_dir

    def read(self) -> dict[str, Any] | None:
        return read_journal(self.state_dir, self.path.name)

    def begin(self, record: DeployRecord) -> dict[str, Any]:
        current = self.read()
        if current and current.get("deploy") == record.id:
            return current
        data = {
            "deploy": record.id,
            "release": record.release,
            "kind": record.kind,
            "artifact": record.artifact,
            "phases": [],
            "started_at": iso(utcnow()),
        }
        self._write(data)
        return data

    def done(self, phase: str) -> None:
        data = self.read()
        if data is None:
            return
        if phase not in data["phases"]:
            data["phases"].append(phase)
            self._write(data)

    def has(self, phase: str) -> bool:
        data = self.read()
        return bool(data and phase in data.get("phases", []))

    def clear(self, deploy_id: str) -> None:
        data = self.read()
        if data and data.get("deploy") == deploy_id:
            self.path.unlink(missing_ok=True)

    def _write(self, data: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, data)


@dataclass
class AgentStatus:
    """What the health endpoint and `watcherctl status` learn from the agent."""

    deploy: str | None = None
    state: str = ""
    undecided_since: float | None = None
    converge_error: str = ""
    coordinating: bool = False
    coordinator_unknown: bool = False


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
    ) -> None:
        self.config = config
        self.app = app
        self.engine = engine
        self.store = store
        self.node = node
        self.session = session
        self.metrics = metrics
        self.notifier = notifier_for(app, metrics)  # chat webhook; None when not configured
        self.journal = Journal(engine.layout.state_dir)
        self.converge_journal = Journal(engine.layout.state_dir, CONVERGE_JOURNAL_NAME)
        self._converge_failures = 0
        self._converge_retry_at = 0.0
        self.log = get_logger(app=app.name, node=node)
        self.status = AgentStatus()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"app-{app.name}")
        self._task: Future[None] | None = None
        self._task_key: tuple[str, str] | None = None
        self._cancel = threading.Event()
        self._host_written = 0.0
        # The deploy this host acked ready in (set by the worker the moment the ack is
        # written), until a view with its decision is read: the loop may lose Consul before
        # it ever reads its own ack back, and must still report the host undecided.
        self._acked_ready: str | None = None

    # --- the loop's entry point -------------------------------------------------------

    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def reconcile(self, members: set[str] | None = None) -> str:
        """Take the next step for this app; returns a short outcome for the cycle's log."""
        if self._task is not None and self._task.done():
            exc = self._task.exception()
            if exc is not None:
                self.log.error("task_crashed", task=self._task_key, error=repr(exc))
            self._task, self._task_key = None, None
        inflight_id, inflight_index = self.store.inflight()
        journal = self.journal.read()
        deploy_id = inflight_id
        if journal and journal["deploy"] != inflight_id:
            deploy_id = journal["deploy"]  # finish our part of an older deploy first
        if deploy_id is None:
            self.status.deploy, self.status.state = None, ""
            self.status.undecided_since = None
            self._acked_ready = None
            return self._converge()
        view = self.store.view(deploy_id)
        if view is None:
            self.log.warning("deploy_record_missing", deploy=deploy_id)
            if journal and journal["deploy"] == deploy_id:
                self.journal.clear(deploy_id)
            return f"deploy {deploy_id} has no record"
        if members is None:
            members = set(self.store.members())
        outcome = self._drive(view, inflight_id, inflight_index, members)
        self._note_status(view)
        return outcome

    def undecided_deploy(self) -> str | None:
        """The deploy this host acked ready in and has not read a decision of, if any."""
        if self.status.undecided_since is not None and self.status.deploy:
            return self.status.deploy
        return self._acked_ready

    def _note_status(self, view: DeployView) -> None:
        if view.decision is not None or self._acked_ready not in (None, view.id):
            self._acked_ready = None
        mine = view.nodes.get(self.node)
        self.status.deploy = view.id
        self.status.state = mine.state if mine else ""
        if mine and mine.state == READY and view.decision is None:
            if self.status.undecided_since is None:
                self.status.undecided_since = time.monotonic()
        else:
            self.status.undecided_since = None

    def _drive(
        self, view: DeployView, inflight_id: str | None, inflight_index: int, members: set[str]
    ) -> str:
        rec = view.record
        mine = view.nodes.get(self.node)
        expected = self.node in rec.expected
        in_flight = inflight_id == rec.id
        outcome = "waiting"
        if expected:
            outcome = self._host_step(view, mine, in_flight, inflight_id)
        self.status.coordinating = self.status.coordinator_unknown = False
        if in_flight:
            session = self.session()
            is_coord = acquired = False
            if session and self.node in members:
                # Contend only while nobody holds the lock: a held key is released (deleted)
                # the moment its holder's session dies, and the watch on deploys/<id>/ wakes
                # every member to take over.
                acquired = view.coordinator_session is None and self.store.acquire_coordinator(
                    rec.id, session, self.node
                )
                is_coord = view.coordinator_session == session or acquired
            self.status.coordinating = is_coord
            self.status.coordinator_unknown = view.coordinator_session is None and not is_coord
            step = evaluate(
                self.store,
                view,
                node=self.node,
                session=session,
                is_coordinator=is_coord,
                inflight_index=inflight_index,
                members=members,
                history_keep=self.config.daemon.history_keep,
                on_validate_failure=self.app.on_validate_failure,
            )
            if self.notifier is not None:  # webhook: started / committed / aborted / ended
                self.notifier.step(view, step.action, node=self.node, started=acquired)
            if step.action != "none":
                outcome = f"{outcome}; coordinator {step.action} {step.detail}".strip()
                if self.metrics is not None and step.action in ("committed", "aborted"):
                    self.metrics.deploys.labels(app=self.app.name, outcome=step.action).inc()
        return f"deploy {rec.id}: {outcome}"

    def _host_step(
        self, view: DeployView, mine: Any, in_flight: bool, inflight_id: str | None
    ) -> str:
        """This host's part: start prepare / apply / abort on the worker if needed."""
        rec = view.record
        state = mine.state if mine else ""
        decision = view.decision
        if decision is None:
            if not in_flight:
                # Over without a decision (ended by hand, its record unreadable): nothing can
                # commit it any more, so clean up as for an abort; never stay stuck on it.
                return self._start("abort", rec.id, lambda: self._abort(rec, state))
            if state in ("", STAGING):
                return self._start("prepare", rec.id, lambda: self._prepare(rec))
            return state  # ready or failed: wait for the decision
        if decision.outcome == COMMIT and state == READY:
            if not in_flight and not self._fleet_still_on(rec, inflight_id):
                # The deploy ended without this host (it was away) and the fleet has moved
                # on (a later deploy, an automatic rollback): never flip to a release the
                # fleet has left; convergence takes this host where the fleet is.
                return self._start("abandon", rec.id, lambda: self._abandon(rec))
            return self._start("apply", rec.id, lambda: self._apply(rec))
        journal = self.journal.read()
        in_journal = journal is not None and journal.get("deploy") == rec.id
        if decision.outcome == ABORT and (state in (STAGING, READY) or in_journal):
            # Clean up what this host did for the deploy: post_abort, drop what it staged.
            self._cancel.set()
            return self._start("abort", rec.id, lambda: self._abort(rec, state))
        if state in NODE_FINAL_STATES or (decision.outcome == COMMIT and state != READY):
            self.journal.clear(rec.id)
        return state or decision.outcome

    def _start(self, kind: str, deploy_id: str, fn: Callable[[], None]) -> str:
        key = (kind, deploy_id)
        if self.busy():
            return f"{self._task_key[0] if self._task_key else 'task'} running"
        if kind != "abort":
            self._cancel.clear()
        self._task_key = key
        self._task = self._worker.submit(self._guard, kind, fn)
        return f"{kind} started"

    def _guard(self, kind: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except ConsulError as exc:
            # KV unreachable mid-task: the next reconcile picks up from the journal.
            self.log.warning("task_interrupted", task=kind, error=str(exc))
        except Exception as exc:  # a task must never take the worker thread down
            self.log.exception("task_failed", task=kind, error=repr(exc))
        finally:
            self.engine.in_flight_artifacts.clear()

    def _fleet_still_on(self, rec: DeployRecord, inflight_id: str | None) -> bool:
        """True when no other deploy is in flight and the fleet's committed release is still
        the one this (ended) deploy committed."""
        if inflight_id is not None:
            return False
        current, _ = self.store.current()
        return current is not None and current.deploy == rec.id

    def _abandon(self, rec: DeployRecord) -> None:
        with self.engine.lock(owner=f"abandon {rec.id}"):
            if self.engine.backup_release() is not None:
                self.engine.clear_backup()
        self.journal.clear(rec.id)
        self.log.warning(
            "deploy_superseded_here",
            deploy=rec.id,
            release=rec.release,
            note="ended while this host was away; converging instead",
        )

    # --- prepare / apply / abort (worker thread) ---------------------------------------

    def _hook_context(self, rec: DeployRecord, artifact: ArtifactRecord | None) -> HookContext:
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
            kind=rec.kind,
            artifact=rec.artifact,
            commit=artifact.commit if artifact else "",
            branch=artifact.branch if artifact else "",
            release=rec.release,
            release_dir=str(lay.release_dir(rec.release)),
            previous_release_dir=str(lay.release_dir(prev)) if prev else "",
            current=str(lay.current),
            current_backup=str(lay.current_backup),
        )

    def _artifact(self, rec: DeployRecord) -> ArtifactRecord:
        artifact = self.store.artifact(rec.artifact)
        if artifact is None:
            raise ArtifactNotFound(
                f"unknown artifact {rec.artifact}: no record at "
                f"{self.store.keys.artifact(rec.artifact)}"
            )
        if rec.sha256 and artifact.sha256 != rec.sha256:
            raise ArtifactIntegrityError(
                f"artifact {rec.artifact}: record sha256 {artifact.sha256} differs from the "
                f"deploy's {rec.sha256}"
            )
        return artifact

    def _prepare(self, rec: DeployRecord) -> None:
        started = time.monotonic()
        self.journal.begin(rec)
        if not self.store.write_progress(
            rec.id, self.node, STAGING, timings={"staging_at": iso(utcnow())}
        ):
            return
        try:
            if rec.min_protocol > PROTOCOL_VERSION:
                raise DeployRefused(
                    f"this watcher speaks protocol {PROTOCOL_VERSION}, the "
                    f"deploy needs {rec.min_protocol}"
                )
            hold = self.engine.held()
            if hold is not None:
                raise DeployRefused(f"held: {hold.reason} (by {hold.by})")
            artifact = self._artifact(rec)
            self.engine.in_flight_artifacts.add(artifact.sha256)
            self._download(artifact, rec.release)
            with self.engine.lock(owner=f"deploy {rec.id}"):
                self.engine.stage(artifact, rec.release, rec.id)
            self._check_cancel()
            with self.engine.lock(owner=f"deploy {rec.id}"):
                live = self.engine.current_release()
                if live and live != rec.release:
                    self.engine.set_backup(live)
            self.journal.done("staged")
            self._check_cancel()
            if not self.journal.has("post_release"):  # done phases do not run again
                run_hooks(self.app, "post_release", self._hook_context(rec, artifact))
                self.engine.mark_post_release_done(rec.release)
                self.journal.done("post_release")
        except _Cancelled:
            self.log.info("prepare_cancelled", deploy=rec.id)
            return
        except ConsulUnavailable:
            raise  # KV unreachable: retried from the journal, not a failure of this host
        except (WatcherError, OSError) as exc:
            self.log.error("prepare_failed", deploy=rec.id, error=str(exc))
            self.store.write_progress(
                rec.id,
                self.node,
                FAILED,
                error=str(exc),
                output_tail=getattr(exc, "output_tail", ""),
                timings={"failed_at": iso(utcnow())},
            )
            self._observe("prepare", started)
            return
        # Noted before the write: if Consul fails mid-write the ack may have landed, and a
        # partition that follows must still show this host undecided.
        self._acked_ready = rec.id
        if not self.store.write_progress(
            rec.id, self.node, READY, timings={"staged_at": iso(utcnow())}
        ):
            self._acked_ready = None
        self.log.info(
            "prepare_ready",
            deploy=rec.id,
            release=rec.release,
            took_ms=round((time.monotonic() - started) * 1000),
        )
        self._observe("prepare", started)

    def _download(self, artifact: ArtifactRecord, release: str) -> None:
        """Fetch the artifact outside the app lock, so operators are not locked out for the
        length of a download; staging then finds it in the cache."""
        if self.engine.cache is None or self.engine.is_complete(release):
            return
        if self.engine.prefetched_path(artifact).is_dir():
            return
        self.engine.fetch(artifact)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled

    def _apply(self, rec: DeployRecord) -> None:
        started = time.monotonic()
        self.journal.begin(rec)
        artifact = None
        try:
            artifact = self._artifact(rec)
        except (ArtifactNotFound, ArtifactIntegrityError, PayloadError) as exc:
            self.log.warning("artifact_record_unreadable", deploy=rec.id, error=str(exc))
        ctx = self._hook_context(rec, artifact)
        decided_at = flipped_at = iso(utcnow())
        if not self.journal.has("flipped"):
            try:
                with self.engine.lock(owner=f"deploy {rec.id}"):
                    if self.engine.current_release() != rec.release:
                        self.engine.flip(rec.release)
            except (WatcherError, OSError) as exc:
                # Nothing changed yet (the lock was busy, the flip refused): not a failure
                # after commit; the next cycle retries, until the apply deadline.
                self.log.error("flip_failed", deploy=rec.id, error=str(exc), retry=True)
                return
            flipped_at = iso(utcnow())
            self.journal.done("flipped")
            self._write_host(rec.release, force=True)
        try:
            if self.metrics is not None:
                self.metrics.flip_timestamp_seconds.labels(app=self.app.name).set(time.time())
            if not self.journal.has("post_symlink"):
                run_hooks(self.app, "post_symlink", ctx)
                self.journal.done("post_symlink")
            with self.engine.lock(owner=f"deploy {rec.id}"):
                self.engine.clear_backup()
            run_hooks(self.app, "validate", ctx)
        except (WatcherError, OSError) as exc:
            self.log.error("apply_failed", deploy=rec.id, error=str(exc))
            self.store.write_progress(
                rec.id,
                self.node,
                FAILED_AFTER_COMMIT,
                error=str(exc),
                output_tail=getattr(exc, "output_tail", ""),
                timings={
                    "decided_at": decided_at,
                    "flipped_at": flipped_at,
                    "failed_at": iso(utcnow()),
                },
            )
            self.journal.clear(rec.id)
            return
        self.store.write_progress(
            rec.id,
            self.node,
            LIVE,
            timings={"decided_at": decided_at, "flipped_at": flipped_at, "live_at": iso(utcnow())},
        )
        self.journal.clear(rec.id)
        self._observe("apply", started)
        self._prune()
        self.log.info(
            "deploy_live",
            deploy=rec.id,
            release=rec.release,
            took_ms=round((time.monotonic() - started) * 1000),
        )

    def _abort(self, rec: DeployRecord, state: str) -> None:
        ctx = self._hook_context(rec, None)
        if self.engine.post_release_done(rec.release) and self.journal.has("post_release"):
            try:
                run_hooks(self.app, "post_abort", ctx)
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
        if state not in NODE_FINAL_STATES and state != "":
            self.store.write_progress(
                rec.id, self.node, ABORTED, timings={"decided_at": iso(utcnow())}
            )
        self.journal.clear(rec.id)
        self.log.info("deploy_aborted_here", deploy=rec.id, release=rec.release)

    def _observe(self, phase: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.deploy_phase_seconds.labels(app=self.app.name, phase=phase).observe(
                time.monotonic() - started
            )

    def _prune(self) -> None:
        """Keep the newest ``keep_releases`` after a deploy (the engine's protections apply)."""
        journal = self.journal.read()
        in_flight = {str(journal["release"])} if journal else set()
        try:
            with self.engine.lock(owner="prune after deploy"):
                self.engine.prune(in_flight=in_flight)
        except (WatcherError, OSError) as exc:
            self.log.warning("prune_failed", error=str(exc))

    # --- converge --------------------------------------------------------------------

    def _converge(self) -> str:
        current, _ = self.store.current()
        local = self.engine.current_release()
        self._write_host(local)
        if current is None:
            return "idle (no committed release yet)"
        journal = self.converge_journal.read()
        unfinished = journal is not None and journal.get("release") == current.release
        if local == current.release and not unfinished:
            self.status.converge_error = ""
            self._converge_failures = 0
            return "idle"
        if local != current.release and self.engine.held() is not None:
            return f"held (fleet is on {current.release}, this host on {local})"
        if self.busy():
            return "converging"
        wait = self._converge_retry_at - time.monotonic()
        if wait > 0:
            return f"converge failed, retry in {wait:.0f}s: {self.status.converge_error}"
        return self._start("converge", current.deploy, lambda: self._converge_to(current))

    def _converge_to(self, current: CurrentRecord) -> None:
        """Stage and flip to the fleet's committed release, without a new barrier.

        Journaled like a deploy (``.state/converge.json``): after a crash, the phases that
        did not finish run again, and a failing ``validate`` is retried with backoff and
        shown in `status` until it passes.
        """
        rec_like = DeployRecord(
            id=current.deploy,
            app=self.app.name,
            kind="converge",
            artifact=current.artifact,
            sha256=current.sha256,
            release=current.release,
            requested_by="converge",
            requested_at=iso(utcnow()),
            expected=[self.node],
            prepare_deadline=iso(utcnow()),
            apply_deadline=iso(utcnow()),
        )
        journal = self.converge_journal
        journal.begin(rec_like)
        try:
            artifact = self._artifact(rec_like)
            self.engine.in_flight_artifacts.add(artifact.sha256)
            ctx = self._hook_context(rec_like, artifact)
            if not journal.has("staged"):
                self._download(artifact, current.release)
                with self.engine.lock(owner="converge"):
                    self.engine.stage(artifact, current.release, current.deploy)
                journal.done("staged")
            if not journal.has("post_release"):
                run_hooks(self.app, "post_release", ctx)
                self.engine.mark_post_release_done(current.release)
                journal.done("post_release")
            if not journal.has("flipped"):
                with self.engine.lock(owner="converge"):
                    reason = self._converge_blocked(current)
                    if reason is not None:
                        self.log.info("converge_skipped", release=current.release, reason=reason)
                        journal.clear(current.deploy)
                        return
                    self.engine.flip(current.release)
                journal.done("flipped")
                self._write_host(current.release, force=True)
            if not journal.has("post_symlink"):
                run_hooks(self.app, "post_symlink", ctx)
                journal.done("post_symlink")
            run_hooks(self.app, "validate", ctx)
        except (WatcherError, OSError) as exc:
            self._converge_failures += 1
            delay = min(2.0**self._converge_failures, CONVERGE_BACKOFF_MAX)
            self._converge_retry_at = time.monotonic() + delay
            self.status.converge_error = f"{current.release}: {exc}"
            self.log.error(
                "converge_failed", release=current.release, error=str(exc), retry_in_s=delay
            )
            return
        journal.clear(current.deploy)
        self.status.converge_error = ""
        self._converge_failures = 0
        self.log.info("converged", release=current.release, deploy=current.deploy)
        self._prune()

    def _converge_blocked(self, current: CurrentRecord) -> str | None:
        """Why not to flip now (checked under the app lock, just before the flip)."""
        hold = self.engine.held()
        if hold is not None:
            return f"held: {hold.reason}"
        inflight, _ = self.store.inflight()
        if inflight is not None:
            return f"deploy {inflight} started meanwhile"
        now, _ = self.store.current()
        if now is None or now.release != current.release:
            return f"the fleet moved on to {now.release if now else 'nothing'}"
        return None

    # --- host record and prefetch -----------------------------------------------------

    def _write_host(self, release: str | None, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._host_written < 30:
            return
        record = HostRecord(
            node=self.node,
            release=release,
            last_seen=iso(utcnow()),
            watcher_version=__version__,
            state=self.status.state,
            prefetched=self._prefetched_ids(),
            hold=(h.reason or "held") if (h := self.engine.held()) else "",
        )
        try:
            self.store.consul.kv_put(self.store.keys.host(self.node), record.to_json())
            self._host_written = now
        except ConsulError as exc:
            self.log.warning("host_record_not_written", error=str(exc))

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

    def prefetch(self, artifact_id: str) -> None:
        """Download, verify and (per config) pre-extract an announced artifact (worker)."""
        started = time.monotonic()
        for attempt in range(5):
            try:
                record = self.store.artifact(artifact_id)
            except PayloadError as exc:
                self.log.error("prefetch_failed", artifact=artifact_id, error=str(exc))
                return
            if record is not None:
                break
            time.sleep(0.2 * (attempt + 1))
        else:
            self.log.error(
                "prefetch_failed",
                artifact=artifact_id,
                error=f"no artifact record at {self.store.keys.artifact(artifact_id)}",
            )
            return
        try:
            self.engine.prefetch(record)
        except (WatcherError, OSError) as exc:
            self.log.error("prefetch_failed", artifact=artifact_id, error=str(exc))
            return
        self.log.info(
            "prefetched",
            artifact=artifact_id,
            mode=self.app.prefetch,
            took_ms=round((time.monotonic() - started) * 1000),
        )

    def shutdown(self, wait: bool) -> None:
        self._worker.shutdown(wait=wait, cancel_futures=True)

    def has_deploy_in_flight(self) -> bool:
        """Part of a deploy that is not over (expected in it, preparing, or applying)."""
        return self.journal.read() is not None or self.busy() or self.status.deploy is not None


class _Cancelled(Exception):
    """The deploy was decided (aborted) while this host was still preparing."""
