"""`watcherctl` fleet commands: status, deploy, rollback, history, abort."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from watcher import ids
from watcher.barrier import (
    CONTESTED,
    RAW_EVENT_BY,
    UNDECIDED,
    WAIT_RECHECK,
    DeployStore,
    DeployView,
    failed_after_commit_on,
    failed_deploy,
    judge,
    new_deploy_id,
    resolve_artifact,
    rollback_target,
    summarize_states,
)
from watcher.config import AppConfig, Config, parse_duration
from watcher.consul_api import ConsulClient, KVEntry, TxnOp
from watcher.ctl import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STILL_RUNNING,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ONE_APP_HELP,
    CtlContext,
    artifact_id_argument,
    committed_end,
    deploy_id_argument,
    exit_code_for,
    reason_argument,
    release_argument,
    table,
    token_sent,
    user_at_host,
)
from watcher.errors import (
    ArtifactNotFound,
    ConsulError,
    ConsulPermissionDenied,
    ConsulRequestError,
    ConsulTLSError,
    ConsulUnavailable,
    DeployNotFound,
    DeployRefused,
    PayloadError,
    WatcherError,
)
from watcher.records import (
    ABORT,
    ABORT_ACK_STATES,
    ABORTED,
    ACKED_READY_STATES,
    COMMIT,
    COMMITTED,
    DEPLOY_ID_RE,
    FAILED_AFTER_COMMIT,
    FAILING_STATES,
    LIVE,
    READY,
    ArtifactRecord,
    CurrentRecord,
    DeployRecord,
    HostRecord,
    ReleaseRef,
    iso,
    parse_iso,
    utcnow,
    watcher_session_name,
)

ABORT_WAIT = 10.0  # seconds `abort` waits to say whether the deploy ended aborted
# Seconds past a deploy's apply deadline before a host that holds it undecided is called
# STALLED: a host stuck in its prepare gives up its session PREPARE_GRACE (10 s) after its
# own prepare deadline, noticed within half a session TTL (the renewer), and its clock may
# run a little behind the requester's. The word leads to ending sessions, so it waits.
STALL_MARGIN = 40.0
DAEMON_STALE_AFTER = 30.0  # seconds without a status update before the daemon counts as down


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="this host, or every host with --fleet")
    p.add_argument("app", nargs="?", help="only this app")
    p.add_argument("--fleet", action="store_true", help="every member of every app, from KV")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("deploy", parents=[common], help="deploy an artifact to the whole fleet")
    p.add_argument("app")
    p.add_argument("artifact", type=artifact_id_argument, help="artifact id, e.g. master-15eb13af")
    p.add_argument(
        "--resume",
        action="store_true",
        help="retry the last failed deploy of this artifact under the same release "
        "name, reusing what hosts already staged",
    )
    _deploy_options(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "rollback",
        parents=[common],
        help="roll the fleet back to the previous release (or --to RELEASE)",
    )
    p.add_argument("app")
    p.add_argument(
        "--to",
        dest="to",
        metavar="RELEASE",
        type=release_argument,
        help="a release from the history",
    )
    p.add_argument(
        "--local", action="store_true", help="flip this host only, and place a hold on it"
    )
    _deploy_options(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser(
        "history", parents=[common], help="who deployed what, when, and how it ended"
    )
    p.add_argument("app", nargs="?", help=ONE_APP_HELP)
    p.add_argument("--limit", type=_positive_int, default=20, help="at most this many deploys")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser(
        "builds", parents=[common], help="the published builds, newest first: what to deploy"
    )
    p.add_argument("app", nargs="?", help=ONE_APP_HELP)
    p.add_argument("--limit", type=_positive_int, default=10, help="at most this many builds")
    p.set_defaults(func=cmd_builds)

    p = sub.add_parser(
        "abort",
        parents=[common],
        help="abort a deploy that is not decided yet",
        usage="%(prog)s [options] [APP] DEPLOY",
    )
    # `abort DEPLOY` (the app is found) or `abort APP DEPLOY`, like every command that
    # takes an app first; the second positional is checked in cmd_abort.
    p.add_argument(
        "deploy",
        metavar="[APP] DEPLOY",
        type=deploy_id_argument,
        help="the deploy's id (as `deploy` printed it, or from `history APP`), after its app "
        "or alone",
    )
    p.add_argument("second", nargs="?", type=deploy_id_argument, help=argparse.SUPPRESS)
    p.add_argument("--app", help="the deploy's app (default: found among the configured apps)")
    p.add_argument(
        "--reason", default="", type=reason_argument, help="why (kept in the deploy's record)"
    )
    p.add_argument(
        "--end-sessions",
        action="store_true",
        help="past the deploy's apply deadline: end the sessions of the expected hosts that "
        "hold it undecided (neither acked nor let their session go), which aborts it; needs "
        "a token with session write on those hosts' nodes",
    )
    p.set_defaults(func=cmd_abort)


def _deploy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="deploy to the live members even if known hosts have no member key",
    )
    p.add_argument("--no-wait", action="store_true", help="return once the deploy is started")
    p.add_argument(
        "--timeout",
        type=_timeout_seconds,
        default=None,
        help='seconds (or "90s", "5m") to wait for the outcome (default: the deploy\'s deadlines)',
    )


def _timeout_seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds above 0 (nan would return at once while
    the deploy goes on), or a duration as the config and ``--retry-for`` write one."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_duration(text, zero=True)  # 0s: said "above 0" below
        except ValueError:
            raise argparse.ArgumentTypeError(
                f'not a number of seconds nor a duration like "90s" or "5m": {text!r}'
            ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return seconds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return value


STATUS_CONSUL_TIMEOUT = 3.0  # status answers from local state quickly when Consul does not


def _consul(ctx: CtlContext, *, quick: bool = False) -> ConsulClient:
    if not quick:
        return ConsulClient(ctx.config.consul, on_retry=ctx.consul_retry_notice)
    settings = ctx.config.consul
    return ConsulClient(
        replace(settings, timeout=min(settings.timeout, STATUS_CONSUL_TIMEOUT)),
        retry_deadline=STATUS_CONSUL_TIMEOUT,
    )


def _store(ctx: CtlContext, app: str) -> DeployStore:
    ctx.app(app)  # a clear error for an unknown app
    _warn_of_a_pending_prefix(ctx)
    return DeployStore(_consul(ctx), ctx.config.kv_prefix, app)


_PREFIX_WARNED: list[str] = []  # once per process


def _warn_of_a_pending_prefix(ctx: CtlContext) -> None:
    """The fleet commands read the config file's ``kv_prefix``. On a host whose running
    watcher started with another one (the change waits for its restart), `status --fleet`
    said "no host" and `history` "no deploys" without a word why (the operator review)."""
    if _PREFIX_WARNED:
        return
    _PREFIX_WARNED.append(ctx.config.kv_prefix)
    waiting = running_settings(ctx.config, daemon_status(ctx.config.daemon.state_dir))
    if (prefix := waiting.get("kv_prefix")) is not None:
        print(
            f"watcherctl: warning: the watcher running with this config's state_dir "
            f"({ctx.config.daemon.state_dir}) works with kv_prefix {prefix['running']} (a "
            "change of it takes effect at the watcher's restart); this command reads the "
            f"config file's {prefix['file']}",
            file=sys.stderr,
        )


# --- deploy / rollback -----------------------------------------------------------------


def _wait_conflict(ctx: CtlContext, command: str) -> bool:
    """``--no-wait`` with ``--timeout``: a timeout that would never be waited for is a
    mistake to report, not to ignore (the operator expects the command to wait)."""
    if ctx.args.no_wait and ctx.args.timeout is not None:
        print(
            f"watcherctl {command}: error: --timeout is how long to wait for the outcome; "
            "with --no-wait nothing waits (give one or the other)",
            file=sys.stderr,
        )
        return True
    return False


def cmd_deploy(ctx: CtlContext) -> int:
    args = ctx.args
    if _wait_conflict(ctx, "deploy"):
        return EXIT_USAGE
    app = ctx.app(args.app)
    store = _store(ctx, args.app)
    hosts = host_records(store)
    record = deploy_request(
        store,
        app,
        args.artifact,
        requested_by=user_at_host(),
        allow_missing=args.allow_missing,
        resume=args.resume,
        hosts=hosts,
    )
    return _start_and_wait(ctx, store, record, hosts, started=redeploy_warning(store, record))


def deploy_request(
    store: DeployStore,
    app: AppConfig,
    artifact_id: str,
    *,
    requested_by: str,
    allow_missing: bool,
    resume: bool = False,
    hosts: Mapping[str, HostRecord] | None = None,
) -> DeployRecord:
    """The record of a new deploy of ``artifact_id`` (watcherctl deploy and the web API);
    ``hosts``: the host records when the caller read them."""
    try:
        artifact = resolve_artifact(store, artifact_id)
    except ArtifactNotFound as exc:
        slip = ids.release_name_slip(artifact_id, store.artifact)
        if not slip:
            raise
        raise ArtifactNotFound(
            f"{exc}: {slip} (or, to go back to that very release, roll back with --to "
            f"{artifact_id})"
        ) from None
    release, resume_of = None, None
    if resume:
        resume_of, release = _resumable(store, artifact_id)
    expected = store.expected_members(allow_missing=allow_missing, hosts=hosts)
    return store.new_record(
        deploy_id=new_deploy_id(),
        kind="deploy",
        artifact=artifact,
        release=release,
        requested_by=requested_by,
        expected=expected,
        prepare_timeout=app.timeouts.prepare,
        apply_timeout=app.timeouts.apply,
        resume_of=resume_of,
        allow_missing=allow_missing,
    )


def fleet_still_on(store: DeployStore, release: str) -> int | None:
    """The ModifyIndex of `current` while it names ``release``, the fleet's release as the
    caller saw it (the page's deploy button), for ``DeployStore.start`` to check; refused
    once it names another: a deploy chosen from a page shown before another deploy ended
    would otherwise replace that deploy's release unseen (a downgrade, from a second tab).

    ``""``: the caller saw the fleet on no release yet (its first deploy). Checked here
    only, not again in the start's txn (None): that would be Consul's check-not-exists,
    which asks for write permission on `current`, and an operator's token has none. What
    is left is a deploy ending between this read and the start, milliseconds apart."""
    current, index = store.current()
    now = current.release if current is not None else None
    if now != (release or None) or (not release and index):
        said = now or ("unreadable" if index else "none yet")
        raise DeployRefused(
            f"app {store.app}: the fleet's release is now {said}, not {release or 'none yet'}: "
            "the fleet moved since you looked; look again and choose"
        )
    return index or None


def _resumable(store: DeployStore, artifact_id: str) -> tuple[str, str]:
    for deploy_id in reversed(store.history()):
        view = store.view(deploy_id)
        if view is None or view.record.artifact != artifact_id:
            continue
        view = view.checked()
        if view.decision is not None and view.decision.outcome == ABORT:
            return view.id, view.record.release
        what = "rollback" if view.record.kind == "rollback" else "deploy"
        if view.outcome is None and view.verdict() == UNDECIDED:
            raise DeployRefused(
                f"app {store.app}: the last deploy of {artifact_id} ({what} {deploy_id}) is "
                "still in flight: nothing to resume (follow it with `history`, or abort it)"
            )
        ended = view.outcome.result if view.outcome else view.verdict()
        raise DeployRefused(
            f"app {store.app}: the last deploy of {artifact_id} ({what} {deploy_id}) ended "
            f"{ended}, not aborted: only an aborted deploy is resumed (its staged trees "
            "reused); deploy it again without --resume"
        )
    raise DeployRefused(f"app {store.app}: no failed deploy of {artifact_id} to resume")


def cmd_rollback(ctx: CtlContext) -> int:
    args = ctx.args
    if args.local:
        fleet_only = [
            flag
            for flag, given in (
                ("--allow-missing", args.allow_missing),
                ("--no-wait", args.no_wait),
                ("--timeout", args.timeout is not None),
            )
            if given
        ]
        if fleet_only:
            print(
                f"watcherctl rollback: error: {', '.join(fleet_only)} apply to a fleet rollback, "
                "not to --local (which flips this host at once)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        from watcher.ctl_local import rollback_local

        return rollback_local(ctx)
    if _wait_conflict(ctx, "rollback"):
        return EXIT_USAGE
    app = ctx.app(args.app)
    store = _store(ctx, args.app)
    hosts = host_records(store)
    record, live, current_index = rollback_request(
        store,
        app,
        args.to,
        requested_by=user_at_host(),
        allow_missing=args.allow_missing,
        hosts=hosts,
    )
    return _start_and_wait(ctx, store, record, hosts, current_index=current_index, started=live)


def rollback_request(
    store: DeployStore,
    app: AppConfig,
    release: str | None,
    *,
    requested_by: str,
    allow_missing: bool,
    hosts: Mapping[str, HostRecord] | None = None,
    previous: str | None = None,
) -> tuple[DeployRecord, str, int | None]:
    """The record of a fleet rollback to ``release`` (default: the previous one), and a
    warning when that is the release `current` already names: a whole round (staging,
    acks, a flip to the same tree) for nothing, usually a slip of the operator's (the
    wrong release pasted from `history`). Not a refusal: `current` is a reader's copy
    (DESIGN.md 6.4), and a host that is not on it converges anyway. ``previous``: the
    previous release as the caller saw it (the page's button): refused once it is
    another. The third value: the ModifyIndex of `current` it was made from, for
    ``DeployStore.start`` to check (a deploy that ends meanwhile moves `previous`); None
    for a named ``release``, whose target does not depend on `current`."""
    current, current_index = store.current()
    target = rollback_target(store, release, current=current)
    if previous is not None and target.release != previous:
        raise DeployRefused(
            f"app {store.app}: the previous release is now {target.release}, not {previous}: "
            "the fleet moved since you looked; look again and choose"
        )
    expected = store.expected_members(allow_missing=allow_missing, hosts=hosts)
    record = store.new_record(
        deploy_id=new_deploy_id(),
        kind="rollback",
        artifact=target,
        release=target.release,
        requested_by=requested_by,
        expected=expected,
        prepare_timeout=app.timeouts.prepare,
        apply_timeout=app.timeouts.apply,
        allow_missing=allow_missing,
    )
    live = ""
    if current is not None and current.release == record.release:
        live = (
            f"the fleet is already on {record.release} (by `current`): this rollback stages "
            "and flips to the same release; abort it if that was not meant"
        )
    elif current is not None and _same_build(current, record):
        # The build the fleet runs was deployed again (a "restart"): the release before
        # it is that same build, and a rollback in an incident then changed nothing.
        live = (
            f"{record.release} is of the build the fleet runs ({current.artifact}, deployed "
            f"again as {current.release}): this rollback brings back the same code; to go "
            "back to an older build, roll back to its release by name (`--to RELEASE`; "
            "`history` lists them); abort this one if that was not meant"
        )
    return record, live, current_index if release is None else None


def _same_build(current: CurrentRecord, record: DeployRecord) -> bool:
    return current.artifact == record.artifact or current.sha256 == record.sha256


def redeploy_warning(store: DeployStore, record: DeployRecord) -> str:
    """A warning for a deploy of the build the fleet already runs, or "": it is then also
    the release a plain rollback goes back to. Not a refusal: a redeploy is how some
    restart a fleet or repair a host's tree. `current` is read for it (a reader's copy,
    enough for a warning); unreadable, no warning."""
    try:
        current, _ = store.current()
    except (ConsulError, PayloadError):
        return ""
    if current is None or not _same_build(current, record) or current.release == record.release:
        return ""  # (the same release name, within a second: `previous` stays where it was)
    runs = (
        f"the fleet already runs {current.artifact}"
        if current.artifact == record.artifact
        # Another build of the same bytes (published again under another commit).
        else f"{record.artifact} has the same contents (sha256) as {current.artifact}, which "
        "the fleet runs"
    )
    return (
        f"{runs} (release {current.release}): deployed again, the release before it is "
        "that same code, so a plain `rollback` would bring back this code, not the build "
        "before it (roll back with --to for that); abort it if that was not meant"
    )


def start_deploy(
    store: DeployStore,
    record: DeployRecord,
    *,
    history_keep: int,
    current_index: int | None = None,
) -> str:
    """Write the deploy (one txn), then ring the doorbell; returns a warning or ""."""
    store.start(record, history_keep=history_keep, current_index=current_index)
    return ring_doorbell(store, record)


def ring_doorbell(store: DeployStore, record: DeployRecord) -> str:
    """Fire the deploy's event; returns a warning or ""."""
    payload = json.dumps({"app": store.app, "deploy": record.id}, separators=(",", ":"))
    try:  # the event is only a doorbell: every daemon already watches `inflight`
        store.consul.event_fire(record.kind, payload.encode())
    except ConsulPermissionDenied as exc:
        # Consul's answer to a refused event is a bare "Permission denied" (the ACL review)
        return (
            f"event not fired ({exc}; it takes event write on {record.kind!r}, which the "
            "operator policy of docs/acl.md grants); daemons learn of the deploy from KV anyway"
        )
    except ConsulError as exc:
        return f"event not fired ({exc}); daemons learn of the deploy from KV anyway"
    return ""


def host_records(store: DeployStore) -> dict[str, HostRecord] | None:
    """The app's host records, read once for a deploy or rollback (the known-host check and
    the held-host warning); None when they cannot be read: the check reads them again and
    says what is wrong. Not when Consul does not answer: the read after it would retry as
    long again (`deploy` said "retrying for up to 10s" and failed after 20)."""
    try:
        return store.hosts()
    except ConsulUnavailable:
        raise
    except (ConsulError, PayloadError):
        return None


def held_warning(hosts: Mapping[str, HostRecord] | None, record: DeployRecord) -> str:
    """The expected hosts whose last host record shows a hold: each refuses its part, so
    the deploy aborts. A warning, not a refusal: the record lags a `release-hold` by up to
    a daemon cycle, and a stale one must not block the deploy that follows it. The command
    it names runs on those hosts, so it carries no -c of the one that deploys (an
    operator's own config, or in the demo another host's)."""
    held = {n: r.hold for n, r in (hosts or {}).items() if r.hold and n in record.expected}
    if not held:
        return ""
    names = "; ".join(f"{n}: {ids.one_line_short(why)}" for n, why in sorted(held.items()))
    return (
        f"held, by their last records: {names}. A held host refuses its part and the "
        f"{record.kind} aborts (`{shlex.join(['watcherctl', 'release-hold', record.app])}` "
        "on the host lifts it)"
    )


def _start_and_wait(
    ctx: CtlContext,
    store: DeployStore,
    record: DeployRecord,
    hosts: Mapping[str, HostRecord] | None,
    *,
    current_index: int | None = None,
    started: str = "",
) -> int:
    """``started``: a warning said once the deploy started (its "abort it if that was not
    meant" would be wrong of a deploy refused)."""
    held = held_warning(hosts, record)
    if held:
        print(f"watcherctl: warning: {held}", file=sys.stderr, flush=True)
    try:
        store.start(
            record, history_keep=ctx.config.daemon.history_keep, current_index=current_index
        )
    except KeyboardInterrupt:
        # The write may have reached Consul before its answer did: say which id to look for.
        print(
            f"watcherctl: interrupted while starting {record.kind} {record.id}; it may have "
            f"started: if `{ctx.command_line('status', record.app, '--fleet')}` shows it, "
            f"abort it with `{ctx.command_line('abort', record.id, '--app', record.app)}`",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    if started:
        print(f"watcherctl: warning: {started}", file=sys.stderr, flush=True)
    # From here on the deploy runs on every host whatever this process does: the user must
    # always learn its id, and how to follow and abort it (firing the event included: it
    # can take a moment, and an interrupt there stops nothing either).
    seen: dict[str, str] = {}  # what the wait has shown so far, for an interrupt
    try:
        return _wait_after_start(ctx, store, record, ring_doorbell(store, record), seen)
    except KeyboardInterrupt:
        print(
            f"watcherctl: interrupted; {_interrupted_at(ctx, record, seen)}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    except ConsulError as exc:
        # Consul went away (or refused a read) while this command waited: the deploy did
        # not, and goes on (or waits for Consul) on every host.
        print(
            f"watcherctl: error: {exc}\nwatcherctl: {_wait_lost(exc)}; "
            f"{_interrupted_at(ctx, record, seen)}",
            file=sys.stderr,
            flush=True,
        )
        if isinstance(exc, ConsulPermissionDenied):  # as every other refusal says it
            print(f"watcherctl: the token sent: {token_sent(ctx.config)}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _wait_lost(exc: ConsulError) -> str:
    """Why `deploy`'s wait stopped, in words that fit the error: not every Consul error
    while waiting is Consul gone (a token that may start a deploy but not read its acks)."""
    if isinstance(exc, ConsulUnavailable):
        # The commands that follow need an agent that answers: typed here as printed, they
        # failed the same way (the status review).
        return (
            "lost Consul while waiting (the commands named here need a Consul agent that "
            "answers: this host's once it is back, or another host's)"
        )
    if isinstance(exc, ConsulPermissionDenied):
        if exc.unknown_token:  # deleted (or expired) since the start
            return "Consul no longer knows this token, so the wait stopped"
        return "this token may not read the deploy's records, so the wait stopped"
    return "a read of the deploy's records failed, so the wait stopped"


#: The key of the wait's ``seen`` holding the verdict of the acks it read last.
VERDICT = "<verdict>"
#: ... and the automatic rollback it waits for, once the deploy ended so.
ROLLING_BACK = "<rolling back>"


def _interrupted_at(ctx: CtlContext, record: DeployRecord, seen: Mapping[str, str]) -> str:
    """What a Ctrl-C (or losing Consul) during the wait leaves, by what the acks said at
    the last look."""
    follow = ctx.command_line("status", record.app, "--fleet")
    verdict = seen.get(VERDICT)
    if rollback := seen.get(ROLLING_BACK):
        return (
            f"{record.kind} {record.id} failed its validate after the commit, and its "
            f"automatic rollback {rollback} goes on across the fleet; follow it with "
            f"`{follow}`"
        )
    if verdict == COMMIT:
        back = ctx.command_line("rollback", record.app)
        return (
            f"{record.kind} {record.id} is committed (every host acked ready) and goes on: it "
            f"can no longer be aborted; follow it with `{follow}`, undo it afterwards with "
            f"`{back}`"
        )
    if verdict == ABORT:
        return f"{record.kind} {record.id} is aborted: no host flips; see `{follow}`"
    return f"{record.kind} {record.id} goes on across the fleet; {_follow_or_abort(ctx, record)}"


def _follow_or_abort(ctx: CtlContext, record: DeployRecord) -> str:
    follow = ctx.command_line("status", record.app, "--fleet")
    abort = ctx.command_line("abort", record.id, "--app", record.app)
    return f"follow it with `{follow}`, abort it with `{abort}`"


def _wait_after_start(
    ctx: CtlContext,
    store: DeployStore,
    record: DeployRecord,
    warning: str,
    seen: dict[str, str] | None = None,
) -> int:
    if warning:
        print(f"watcherctl: warning: {warning}", file=sys.stderr, flush=True)
    started = (
        f"{record.kind} {record.id}: {record.release} to {len(record.expected)} host(s) "
        f"({', '.join(record.expected)})"
    )
    if ctx.args.no_wait:
        if not ctx.as_json:
            print(f"{started}\n{_follow_or_abort(ctx, record)}")
        ctx.emit({"deploy": record.id, "release": record.release, "state": "started"}, lambda d: "")
        return EXIT_OK
    if ctx.as_json:  # stdout says nothing until the end: the id goes to stderr at once
        print(f"watcherctl: started {started}", file=sys.stderr, flush=True)
    else:
        print(started, flush=True)
    deadline = (
        ctx.args.timeout
        if ctx.args.timeout is not None
        else (parse_iso(record.apply_deadline) - datetime.now(UTC)).total_seconds() + 30
    )
    waited_from = time.monotonic()
    view = _wait_for_outcome(ctx, store, record, deadline, {} if seen is None else seen)
    if view is None:
        gone = {"deploy": record.id, "kind": record.kind, "result": None}
        ctx.emit({**gone, "reason": "its request is gone from Consul"}, _human_summary)
        return EXIT_FAILED
    data = deploy_summary(view)
    if view.outcome is None:  # the wait ran out, not the deploy
        hint = (
            f"watcherctl: the wait ended, {record.kind} {record.id} is still running; "
            f"{_follow_or_abort(ctx, record)}"
        )
        if ctx.as_json:
            ctx.emit(data)
            print(hint, file=sys.stderr)
        else:
            print(_human_summary(data), flush=True)
            print(hint, file=sys.stderr)  # as the Ctrl-C hint: stdout is the summary
        return EXIT_STILL_RUNNING
    if data.get("rollback_deploy"):
        # Its result says the fleet goes back; only the rollback's own end says it did.
        if seen is not None:  # an interrupt now leaves the rollback running, not the deploy
            seen[ROLLING_BACK] = data["rollback_deploy"]
        try:
            rollback = store.view(data["rollback_deploy"])
            if rollback is not None and rollback.outcome is None:
                left = (
                    deadline - (time.monotonic() - waited_from)
                    if ctx.args.timeout is not None
                    else (
                        parse_iso(rollback.record.apply_deadline) - datetime.now(UTC)
                    ).total_seconds()
                    + 30
                )
                rollback = _wait_for_end(store, rollback.id, max(left, 0.0), ended=True)
        except PayloadError:
            rollback = None
        data["rollback"] = rollback_summary(rollback, data["rollback_deploy"], view.record)
    ctx.emit(data, _human_summary)
    # A host left on the old release is not a deploy done: a script must not read "ok".
    return EXIT_OK if view.outcome.result == "committed" and not data["not_live"] else EXIT_FAILED


#: ``rollback_summary``'s result for a rollback whose request is gone or cannot be read:
#: not "running", which would have an operator wait for a deploy that ended long ago.
UNKNOWN_ROLLBACK = "unknown"


def rollback_summary(
    rollback: DeployView | None, rollback_id: str, failed: DeployRecord
) -> dict[str, Any]:
    """How the automatic rollback of ``failed`` (a deploy whose validate failed) ended:
    its result (None while it runs; "unknown" when its request is gone or cannot be read,
    as after history trimmed it) and what the fleet is left on, in words."""
    if rollback is None:
        return {
            "deploy": rollback_id,
            "result": UNKNOWN_ROLLBACK,
            "note": "its request is gone or cannot be read: how it ended is not known here",
        }
    rollback = rollback.checked()
    result = rollback.outcome.result if rollback.outcome else None
    back = rollback.record.release

    def hosts_in(*states: str) -> str:
        return ", ".join(
            n
            for n in rollback.record.expected
            if (a := rollback.nodes.get(n)) and a.state in states
        )

    if result == "committed":
        behind = hosts_in(READY, COMMITTED)
        note = f"every host is back on {back}" + (
            f" but {behind}, not live on it when it ended (`status --fleet`)" if behind else ""
        )
    elif result is None:
        note = "still running (`status --fleet` shows where it stands)"
    elif result == "failed_after_commit":
        # Committed: the fleet went back, and that release's validate failed somewhere too.
        note = (
            f"the fleet is back on {back}, whose validate failed too, on "
            f"{hosts_in(FAILED_AFTER_COMMIT)}: look at those hosts"
        )
    elif result == "contested":
        note = (
            f"{rollback.outcome.reason if rollback.outcome else ''}; contested: each host "
            f"stopped where it stood, held (on {back} or on {failed.release}; `status "
            "--fleet` shows which)"
        ).lstrip("; ")
    else:
        why = rollback.outcome.reason if rollback.outcome else ""
        note = (
            f"{why}; the fleet stays on {failed.release}, which failed after the commit: "
            "roll back by hand or deploy a fix"
        ).lstrip("; ")
    return {"deploy": rollback_id, "result": result, "note": note}


def _wait_for_outcome(
    ctx: CtlContext,
    store: DeployStore,
    record: DeployRecord,
    timeout: float,
    seen: dict[str, str],
) -> DeployView | None:
    deploy_id = record.id
    end = time.monotonic() + max(timeout, 1.0)
    index = 0
    view = None
    while time.monotonic() < end:
        read = store.view(deploy_id)
        if read is None:
            return None
        # What `deploy` shows and reports (and its exit code) comes from the acks, judged
        # against the request this watcherctl wrote (the one in KV may have been rewritten
        # since): any host's token can write a decision or outcome record (a commit while
        # another host still stages, an abort while they flip); one the acks contradict is
        # named, never believed (``DeployView.checked``).
        view = read.checked(record, ours=True)
        seen[VERDICT] = judge(record, record.digest(), view.nodes).outcome
        if not ctx.as_json:
            for line in progress_lines(view, seen):
                print(line, flush=True)
        # Over once the hosts wrote the outcome and it agrees with the acks (or they are
        # final, and say otherwise).
        if read.outcome is not None and view.outcome is not None:
            return view
        # Any write under the app's keys (acks, decision, outcome) wakes this CLI; the
        # daemons themselves only watch small keys.
        index, _ = store.consul.kv_keys_blocking(
            store.keys.base + "/", index, min(5.0, max(end - time.monotonic(), 0.1))
        )
    return replace(view, outcome=None) if view is not None and view.outcome else view


def deploy_summary(view: DeployView) -> dict[str, Any]:
    """The deploy as `deploy --json`, `history` and the web API report it: ``view`` is a
    checked one (``DeployView.checked``)."""
    rec = view.record
    late = view.live_after_end()
    return {
        "deploy": rec.id,
        "app": rec.app,
        "kind": rec.kind,
        "artifact": rec.artifact,
        "release": rec.release,
        "requested_by": rec.requested_by,
        "requested_at": rec.requested_at,
        "expected": rec.expected,
        # Deployed with --allow-missing: known hosts without a watcher were not expected.
        "allow_missing": rec.allow_missing,
        "resume_of": rec.resume_of,
        "rollback_of": rec.rollback_of,
        "decision": (
            None
            if view.decision is None
            else {
                "outcome": view.decision.outcome,
                "reason": view.decision.reason,
                "by": view.decision.by,
                "at": view.decision.at,
            }
        ),
        "result": view.outcome.result if view.outcome else None,
        "reason": view.outcome.reason if view.outcome else "",
        # Someone asked for an abort (`abort`, the page): who and why, also when another
        # cause decided it first (a host gone), which `reason` then names instead.
        "abort_requested": (
            None
            if view.abort_requested is None
            else {
                "by": view.abort_requested.by,
                "at": view.abort_requested.at,
                "reason": view.abort_requested.reason,
            }
        ),
        # Committed, but these expected hosts had not switched when it ended (a watcher
        # stopped after its ready ack, or still applying at the apply deadline): the
        # fleet is split until they converge. Also the hosts that said live only after
        # the end (by Consul's index): history must not forget the split once they finish.
        "not_live": (
            [
                n
                for n in rec.expected
                if ((p := view.nodes.get(n)) and p.state in (READY, COMMITTED)) or n in late
            ]
            if view.outcome and view.outcome.result == "committed"
            else []
        ),
        "rollback_deploy": view.outcome.rollback_deploy if view.outcome else None,
        # Records under decisions/ or outcomes/ that the acks contradict (DESIGN.md 6.4.3).
        "distrusted": list(view.distrusted),
        # A host writes its own timings: only their "*_at" names, and never over the fields
        # that say what its ack is (a "state" among them made a failed host show live).
        "hosts": {
            n: {
                **{k: v for k, v in p.timings.items() if k.endswith("_at")},
                "state": p.state,
                "error": p.error,
                "output_tail": p.output_tail,
            }
            for n, p in sorted(view.nodes.items())
        },
    }


#: Lines of a failed hook's output shown under the host's line while `deploy` waits (the
#: whole tail is in `history --json`).
TAIL_SHOWN = 3


#: A host's states that follow the decision: shown after its line, not before.
_AFTER_DECISION = frozenset({COMMITTED, LIVE, ABORTED, FAILED_AFTER_COMMIT})


def progress_lines(view: DeployView, seen: dict[str, str]) -> list[str]:
    """What `deploy`'s wait prints of ``view`` that ``seen`` (updated) has not shown: each
    host's new state, the decision, records shown NOT TRUSTED. One read often brings the
    decision and a host's intent that follows it (the decider writes both in one txn):
    the decision line comes first, as it happened."""
    decision = view.decision
    new_decision = decision is not None and seen.get("<decision>") != decision.outcome
    before: list[str] = []
    after: list[str] = []
    for node, progress in sorted(view.nodes.items()):
        shown = seen.get(node)
        if shown == progress.state:
            continue
        seen[node] = progress.state
        if progress.state in ACKED_READY_STATES - {READY} and shown not in ACKED_READY_STATES:
            # Its ready ack came and went between two reads (the operator test saw a host
            # go from staging to the decision with no line of its own): it was there.
            before.append(f"  {node}: {READY}")
        detail = f": {ids.one_line(progress.error)}" if progress.error else ""
        lines = [f"  {node}: {progress.state}{detail}"]
        lines += [f"    | {line}" for line in _tail_lines(progress.output_tail)]
        # A host that stopped for an operator's abort request acks `aborted` before any
        # decision: that "no" is what the decision follows.
        follows = progress.state in _AFTER_DECISION and not (
            progress.state == ABORTED and progress.error.startswith("abort requested")
        )
        (after if new_decision and follows else before).extend(lines)
    if decision is not None and new_decision:
        seen["<decision>"] = decision.outcome
        before.append(f"  decision: {decision.outcome} ({ids.one_line(decision.reason)})")
    out = before + after
    for note in view.distrusted:
        if f"<distrusted> {note}" not in seen:
            seen[f"<distrusted> {note}"] = "shown"
            out.append(f"  NOT TRUSTED: {ids.one_line(note)}")
    return out


def _tail_lines(tail: str) -> list[str]:
    """The last TAIL_SHOWN non-empty lines of a hook's output, each cut short, control
    characters escaped (a hook's output must not drive the operator's terminal)."""
    lines = [
        "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line[:200])
        for line in tail.splitlines()
        if line.strip()
    ]
    return lines[-TAIL_SHOWN:]


def _human_summary(data: dict[str, Any]) -> str:
    lines = [
        f"{data.get('kind', 'deploy')} {data['deploy']}: {data.get('result') or 'still running'}"
    ]
    if data.get("reason"):
        lines.append(f"  reason: {data['reason']}")
    if data.get("rollback"):
        rb = data["rollback"]
        lines.append(f"  fleet rollback {rb['deploy']}: {rb['result'] or 'running'}: {rb['note']}")
    elif data.get("rollback_deploy"):
        lines.append(f"  fleet rollback started: {data['rollback_deploy']}")
    hosts = data.get("hosts") or {}
    not_live = data.get("not_live") or ()
    took = [n for n in not_live if hosts.get(n, {}).get("state") == COMMITTED]
    later = [n for n in not_live if hosts.get(n, {}).get("state") == LIVE]
    behind = [n for n in not_live if n not in took and n not in later]
    # Not only a stopped watcher: one running whose agent is down or whose token Consul
    # refuses looks the same from here, and restarting it changes nothing (the status
    # review, on a fleet whose token was deleted).
    why = (
        "its watcher stopped or lost Consul (its agent down or cut off, its token refused), "
        "or it was still applying at the apply deadline"
    )
    if behind:
        lines.append(
            f"  NOT LIVE: {', '.join(behind)}: acked ready but had not switched when the "
            f"deploy ended ({why}); it converges to the fleet's release once its watcher "
            "runs with Consul again (`status --fleet` shows where it stands, `status` on "
            "that host why)"
        )
    if took:
        # Its intent is written before its flip, its live ack after `validate`: it may serve
        # the new release already (an operator read "had not switched" of such a host).
        lines.append(
            f"  NOT LIVE: {', '.join(took)}: had taken the commit but not reported live when "
            f"the deploy ended ({why}); it may serve the new release before its `validate` "
            "passed, and finishes the switch once its watcher runs with Consul again "
            "(`status --fleet` shows where it stands, `status` on that host why); a validate "
            "that fails there now starts no automatic rollback"
        )
    if later:
        lines.append(
            f"  NOT LIVE when it ended: {', '.join(later)}: acked live only after the deploy "
            "ended (still applying at the apply deadline, or its watcher back later)"
        )
    return "\n".join(lines)


# --- history / abort ---------------------------------------------------------------------


def artifact_records(
    store: DeployStore, unreadable: list[str] | None = None
) -> list[ArtifactRecord]:
    """Every readable artifact record of the app, newest first (the web page's builds):
    by Consul's CreateIndex of the record, not by its `created_at`, which CI's token
    writes (a record dated 9999 stayed on top, 30 of them hid every real build).
    ``unreadable`` gets what is wrong with each record left out, so a reader can say so."""
    records: list[tuple[int, ArtifactRecord]] = []
    for entry in store.consul.kv_list(store.keys.artifacts_prefix):
        try:
            record = ArtifactRecord.from_json(entry.value, where=entry.key)
        except PayloadError as exc:
            # Not a build anyone can deploy (a deploy of it is refused, saying why)
            if unreadable is not None:
                unreadable.append(str(exc))
            continue
        if entry.key.rsplit("/", 1)[-1] != record.id:
            # planted under another id: a deploy of its id reads another key
            if unreadable is not None:
                unreadable.append(f"{entry.key}: names artifact {record.id!r}, not its key's")
            continue
        records.append((entry.create_index, record))
    records.sort(key=lambda r: (r[0], r[1].id), reverse=True)
    return [r for _, r in records]


BUILDS_LIMIT = 30  # the builds the page and `watcherctl builds` list at most


def build_rows(
    store: DeployStore,
    fleet: dict[str, Any],
    limit: int = BUILDS_LIMIT,
    unreadable: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` artifact records, with how many hosts have each prefetched and
    whether the fleet's release (``current``) or the one before it (``previous``) is of it
    (the page's builds and `watcherctl builds`); ``unreadable``: as ``artifact_records``."""
    counts: dict[str, int] = {}
    for host in fleet["hosts"].values():
        for artifact_id in host.get("prefetched") or []:
            counts[artifact_id] = counts.get(artifact_id, 0) + 1
    live = {
        ids.artifact_of_release(fleet.get(key) or ""): key
        for key in ("previous", "current")  # current wins when both are of one build
        if not fleet.get("current_problems", {}).get(key)
    }
    return [
        {
            "id": r.id,
            "branch": r.branch,
            "commit": r.commit,
            "build_number": r.build_number,
            "build_url": r.build_url if r.build_url.startswith(("https://", "http://")) else "",
            "created_by": r.created_by,
            "created_at": r.created_at,
            "size": r.size,
            "uploading": r.uploading,
            "prefetched_on": counts.get(r.id, 0),
            "fleet": live.get(r.id, ""),
        }
        for r in artifact_records(store, unreadable)[:limit]
    ]


def cmd_builds(ctx: CtlContext) -> int:
    store = _store(ctx, ctx.args.app)
    fleet = fleet_status(store)
    unreadable: list[str] = []
    rows = build_rows(store, fleet, ctx.args.limit, unreadable)
    hosts = len(fleet["hosts"])
    if unreadable:  # stderr: stdout stays the list, for scripts
        print(
            f"watcherctl: warning: {len(unreadable)} artifact record(s) of {ctx.args.app} "
            f"cannot be read and are not listed: {'; '.join(unreadable[:5])}"
            + (f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""),
            file=sys.stderr,
        )

    def human(items: list[dict[str, Any]]) -> str:
        if not items:
            return (
                f"no builds of {ctx.args.app} published (CI publishes them: `"
                f"{ctx.command_line('publish', ctx.args.app, 'DIR')}`)"
            )
        cells = [
            [
                b["id"],
                b["branch"] or "-",
                b["commit"][:12] or "-",
                b["build_number"] or "-",
                b["created_at"] or "-",
                f"{b['prefetched_on']}/{hosts}",
                ", ".join(
                    n
                    for n in (
                        {"current": "fleet's release", "previous": "fleet's previous"}.get(
                            b["fleet"], ""
                        ),
                        "uploading" if b["uploading"] else "",
                    )
                    if n
                )
                or "-",
            ]
            for b in items
        ]
        return table(
            cells, ["ARTIFACT", "BRANCH", "COMMIT", "BUILD", "PUBLISHED", "PREFETCHED", "NOTE"]
        )

    ctx.emit(rows, human)
    return EXIT_OK


def deploy_history(store: DeployStore, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` deploys of the app, newest first, as ``deploy_summary`` dicts."""
    return deploy_history_checked(store, limit)[0]


def deploy_history_checked(
    store: DeployStore, limit: int, *, in_flight: bool = False
) -> tuple[list[dict[str, Any]], str]:
    """``deploy_history``, and why the history record was read as empty ("" if it was not).
    ``in_flight``: the deploy in flight first (its end adds it to the history; until then
    `history` would show the one before, whose id an operator then passed to `abort`)."""
    # `inflight` first: a deploy that ends between the two reads is then in the history.
    inflight = store.inflight()[0] if in_flight else None
    # The history record is a list any host's token may rewrite (docs/acl.md): it is held
    # against the deploys that ended in KV (the operator test: a hand edit hid deploys, and
    # 20,000 made-up ids read as "no deploys recorded"). Read before the list: a deploy
    # whose end (outcome and list in one txn) falls between the reads is in the list.
    ended = store.ended_ids()
    history, problem = store.history_checked()
    added = inflight if inflight is not None and inflight not in history else None
    shown = ([added] if added else []) + list(reversed(history))
    listed = set(shown)
    limit = max(limit, 1)
    candidates = sorted(d for d in ended if d not in listed and DEPLOY_ID_RE.fullmatch(d))
    omitted: dict[str, DeployView] = {}
    unreadable = []
    for deploy_id in candidates[-limit:]:  # (the next deploy's end lists them again)
        try:
            found = store.view(deploy_id)
        except PayloadError:
            found = None
        if found is None or found.outcome is None:
            unreadable.append(deploy_id)
        else:
            omitted[deploy_id] = found
    rows: list[tuple[bool, int, dict[str, Any]]] = []  # (in flight, CreateIndex, row)
    hosts: dict[str, HostRecord] | None = None
    no_record: list[str] = []
    unparsed: dict[str, str] = {}
    for deploy_id in [*shown[:limit], *omitted]:
        try:
            view: DeployView | None = omitted.get(deploy_id) or store.view(deploy_id)
        except PayloadError as exc:
            view = None
            unparsed[deploy_id] = ids.one_line(str(exc))
        if deploy_id == added and (view is None or view.outcome is not None):
            # Not to list as in flight: ended since the history was read (its end adds it
            # there: read it again), no record (an `inflight` a host is about to clear),
            # or an `inflight` left naming an old deploy. The history alone, then.
            return deploy_history_checked(store, limit)
        if view is None:
            if deploy_id not in unparsed:
                no_record.append(deploy_id)
            continue
        view = view.checked()
        if len(view.record.expected) == 1 and view.verdict() == COMMIT:
            # One host's ack alone: the hosts it left out do not follow it (6.4.5).
            with contextlib.suppress(ConsulPermissionDenied):  # a token without hosts/
                if hosts is None:
                    hosts = store.hosts_checked()[0]
                if why := store.left_out(view, hosts):
                    note = f"committed, but {why}"
                    view = replace(view, distrusted=(*view.distrusted, note))
        row = deploy_summary(view)
        if view.record.allow_missing:
            # Which known hosts it left out: the request names only those it expected.
            with contextlib.suppress(ConsulPermissionDenied):
                if hosts is None:
                    hosts = store.hosts_checked()[0]
                row["left_out"] = left_out_hosts(view, hosts)
        if row.get("rollback_deploy"):
            with contextlib.suppress(PayloadError):
                rollback = store.view(row["rollback_deploy"])
                row["rollback"] = rollback_summary(rollback, row["rollback_deploy"], view.record)
        if deploy_id in omitted:
            row["unlisted"] = True
        rows.append((deploy_id == added, view.create_index, row))
    if omitted:  # newest first by when Consul got each request (raw events' ids are UUIDs)
        rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
    out = [r[2] for r in rows][:limit]
    notes = (
        [f"{problem}: shown from the deploys' own records; the next deploy's end writes it anew"]
        if problem
        else []
    )
    if omitted:
        notes.append(
            f"{store.keys.history} leaves out {len(omitted)} deploy(s) that ended "
            f"({_some(list(omitted))}), shown from their own records: the list was "
            "written by hand, or by a token that may write it; the next deploy's end lists "
            "them again"
        )
    if unreadable:
        notes.append(
            f"{len(unreadable)} deploy record(s) not listed in {store.keys.history} cannot "
            f"be read ({_some(unreadable)})"
        )
    if no_record:
        notes.append(
            f"{len(no_record)} deploy(s) listed in {store.keys.history} have no record in KV "
            f"({_some(no_record)}): not shown; their requests were deleted, or the list was "
            "written by hand"
        )
    if unparsed:
        notes.append(
            f"{len(unparsed)} deploy(s) listed in {store.keys.history} have a record that does "
            f"not parse ({_some(list(unparsed))}): not shown; the first: "
            f"{next(iter(unparsed.values()))}"
        )
    return out, "; ".join(notes)


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def left_out_hosts(view: DeployView, hosts: Mapping[str, HostRecord]) -> list[str]:
    """The hosts known before ``view``'s request (the ``first_index`` of their records,
    when they joined the app, is older) that it did not expect: with --allow-missing,
    those down or cut off when it started.
    From today's host records: a host removed since is not named."""
    expected = set(view.record.expected)
    return sorted(
        n
        for n, h in hosts.items()
        if n not in expected and 0 < h.first_index < (view.create_index or h.first_index)
    )


def cmd_history(ctx: CtlContext) -> int:
    store = _store(ctx, ctx.args.app)
    rows, problem = deploy_history_checked(store, ctx.args.limit, in_flight=True)
    if problem:  # not "no deploys recorded": the list is in doubt (exit 1, as for distrust)
        print(
            f"watcherctl: warning: the history record of {ctx.args.app} is not to be "
            f"trusted: {problem}",
            file=sys.stderr,
        )

    def human(items: list[dict[str, Any]]) -> str:
        if not items:
            return f"no deploys of {ctx.args.app} recorded" if not problem else ""
        out = []
        for d in items:
            detail = _detail(d)
            if d.get("unlisted"):
                detail = "NOT IN THE HISTORY RECORD" + (f"; {detail}" if detail else "")
            out.append(
                [
                    d["deploy"],
                    d["kind"],
                    d["release"],
                    d["requested_by"],
                    d["requested_at"],
                    d["result"] or "in flight",
                    detail,
                ]
            )
        return table(out, ["DEPLOY", "KIND", "RELEASE", "BY", "AT", "RESULT", "DETAIL"])

    ctx.emit(rows, human)
    return EXIT_FAILED if problem else EXIT_OK


def allow_missing_label(row: dict[str, Any]) -> str:
    """How a history row that expected the live members only says so: "--allow-missing"
    for a request with that flag, "live members only" for a raw `consul event` deploy,
    which always expects those (nobody passed a flag). Shown only when a known host was
    left out: with nobody left out, it says nothing."""
    by = row.get("requested_by")
    raw = isinstance(by, str) and by.startswith(RAW_EVENT_BY)
    return "live members only" if raw else "--allow-missing"


def abort_requested_label(asked: Mapping[str, Any]) -> str:
    """ "abort requested by WHO: WHY", as history and the page show it."""
    why = f": {asked['reason']}" if asked.get("reason") else ""
    return f"abort requested by {asked['by']}{why}"


def _detail(d: dict[str, Any]) -> str:
    """History's DETAIL: for an aborted deploy, why (what decided it) and then the failing
    hosts but the one that reason quotes; otherwise the failing hosts, else why it did not
    commit; then any record that contradicts the acks. An abort's reason comes first: a
    host's own failure written after the abort was decided is not its cause (a host whose
    session was lost, frozen or its token revoked, acked "failed: prepare deadline passed"
    once back, and history showed that instead of the lost session: the status review)."""
    failing = {n: h for n, h in (d.get("hosts") or {}).items() if h["state"] in FAILING_STATES}
    reason = d["reason"] if d["result"] != "committed" else ""
    if d["result"] == "aborted" and reason:
        # The one host whose error the reason carries ("node host-1 failed: ..."), once.
        failing = {n: h for n, h in failing.items() if not reason.startswith(f"node {n} ")}
    failures = [
        f"{n}: {h['state']}" + (f": {h['error']}" if h["error"] else "") for n, h in failing.items()
    ]
    first = [reason, *failures] if d["result"] == "aborted" and reason else failures or [reason]
    parts = ["; ".join(p for p in first if p)]
    if d.get("allow_missing") and (left := d.get("left_out")):
        parts.append(f"{allow_missing_label(d)}: {', '.join(left)} not expected")
    if d.get("not_live"):
        parts.append(f"not live when it ended: {', '.join(d['not_live'])}")
    late = [n for n, h in (d.get("hosts") or {}).items() if h.get("state") == FAILED_AFTER_COMMIT]
    if d["result"] == "committed" and late:
        parts.append(f"failed after its end on {', '.join(late)}: no automatic rollback")
    if (asked := d.get("abort_requested")) and (said := abort_requested_label(asked)) not in (
        parts[0]
    ):  # (not again where the abort request is what decided it: the reason says it)
        parts.append(said)
    if (rb := d.get("rollback")) and rb["result"] != "committed":
        parts.append(
            f"its fleet rollback {rb['deploy']}: {rb['result'] or 'running'}: {rb['note']}"
        )
    parts += [n for n in d["distrusted"] if n not in parts[0]]
    return "; ".join(p for p in parts if p)


def cmd_abort(ctx: CtlContext) -> int:
    """Write ``requests/<id>/abort``: every expected host honors it before it acks ready.
    Once every host acked ready the deploy is committed and an abort is too late."""
    deploy_id, app = ctx.args.deploy, ctx.args.app
    if ctx.args.second is not None:  # `abort APP DEPLOY`
        if app is not None and app != deploy_id:
            print(
                f"watcherctl abort: error: two apps given: {deploy_id} and --app {app} "
                "(usage: watcherctl abort [APP] DEPLOY)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        app, deploy_id = deploy_id, ctx.args.second
    apps = [app] if app else ctx.app_names("abort without --app")
    for name in apps:
        store = _store(ctx, name)
        try:
            found = store.deploy_record(deploy_id) is not None
        except PayloadError as exc:
            inflight, index = store.inflight(consistent=True)
            if inflight != deploy_id:
                raise DeployRefused(
                    f"app {name}: deploy {deploy_id} has an unreadable request ({exc}) and is "
                    "not in flight; nothing to abort"
                ) from None
            # Nobody can act on it: operators may clear inflight themselves, but only the
            # `inflight` read here (a deploy started since then is not ours to end).
            cleared = store.consul.txn(
                [TxnOp.check_index(store.keys.inflight, index), TxnOp.delete(store.keys.inflight)]
            ).ok
            if not cleared:
                raise DeployRefused(
                    f"app {name}: deploy {deploy_id} has an unreadable request ({exc}); "
                    "`inflight` no longer held it when it was to be cleared (another deploy, or "
                    "cleared by someone else) and nothing was deleted (run "
                    f"`{ctx.command_line('status', name)}` to see what is in flight now)"
                ) from None
            ctx.emit(
                {"deploy": deploy_id, "app": name, "aborted": True},
                lambda d: f"deploy {deploy_id}: unreadable request, inflight cleared",
            )
            return EXIT_OK
        if not found:
            if _clear_stale_inflight(store, deploy_id):
                ctx.emit(
                    {"deploy": deploy_id, "app": name, "aborted": True},
                    lambda d: f"deploy {deploy_id} had no record; `inflight` cleared",
                )
                return EXIT_OK
            continue
        if ctx.args.end_sessions:
            return _end_sessions(ctx, store, deploy_id)
        what, view, asked = abort_deploy(store, deploy_id, ctx.args.reason or "", by=user_at_host())
        if what == "aborted":
            # Aborted before this command asked: said so (with who and why), still exit 0:
            # what the operator wanted holds.
            said = (
                f"deploy {deploy_id} aborted"
                if asked
                else f"deploy {deploy_id} was already aborted{_why_aborted(view)}: nothing to do"
            )
            ctx.emit(
                {"deploy": deploy_id, "app": name, "aborted": True, "already": not asked},
                lambda _: said,  # noqa: B023 (called before the loop moves on)
            )
            return EXIT_OK
        data = {"deploy": deploy_id, "app": name, "aborted": False, "decision": what}
        stalled = stalled_in(store, view) if what == UNDECIDED else {}
        if stalled:
            # Asked for, and nobody left who may honor it: said, and not "ok" to a script.
            command = ctx.command_line("abort", name, deploy_id, "--end-sessions")
            data["stalled"] = stalled
            if ctx.as_json:
                ctx.emit(data)
            line = stalled_line(name, deploy_id, stalled, command)
            print(f"watcherctl: abort requested, but {line}", file=sys.stderr)
            return EXIT_REFUSED
        if what == UNDECIDED:
            data["already"] = not asked
            said = (
                f"abort of {deploy_id} requested"
                if asked
                else f"an abort of {deploy_id} was already requested{_why_aborted(view)}"
            )
            ctx.emit(
                data,
                lambda d: (
                    f"watcherctl: {said}; hosts honor it "  # noqa: B023 (called at once)
                    f"before they ack ready (watch `{ctx.command_line('history', d['app'])}`)"
                ),
            )
            return EXIT_OK
        if ctx.as_json:
            ctx.emit(data)
        else:  # a refusal: stderr, as every error
            print(
                f"watcherctl: {contested_reason(deploy_id)}"
                if what == CONTESTED
                else f"watcherctl: deploy {deploy_id} is committed: too late to abort (every "
                f"host had acked ready){_not_ended(name, what, view)}"
                if what in ("commit", "committed")
                else f"watcherctl: deploy {deploy_id} has ended ({what}): nothing to abort",
                file=sys.stderr,
            )
        return EXIT_REFUSED
    raise DeployNotFound(
        _app_hint(ctx, deploy_id) or f"no deploy {deploy_id} in app(s) {', '.join(apps)}"
    )


def _end_sessions(ctx: CtlContext, store: DeployStore, deploy_id: str) -> int:
    """`abort APP DEPLOY --end-sessions`: end the sessions that hold a stalled deploy
    undecided (``end_stalled_sessions``), then wait for the acks to decide it. Also for a
    deploy a host it did not expect ended as ``expired`` while hosts that acked ready in
    it still wait: its acks are undecided all the same."""
    name = store.app
    view = store.view(deploy_id)
    checked = view.checked() if view is not None else None
    if checked is None or checked.verdict() != UNDECIDED:
        what = (
            "has no record" if checked is None else f"is decided by its acks ({checked.verdict()})"
        )
        raise DeployRefused(f"app {name}: deploy {deploy_id} {what}: no session ended")
    # Consistent members: what the sessions' end is decided on.
    members = store.members(consistent=True)
    stalled = stalled_in(store, checked, members=members)
    # A session that holds no member key ends without a change the waiting hosts watch:
    # they see it at their next look (WAIT_RECHECK), which the wait below covers.
    keyless = any(
        (e := members.get(node)) is None or e.session != session
        for node, session in stalled.items()
    )
    if not stalled:
        rec = checked.record
        last = max(parse_iso(rec.apply_deadline), parse_iso(rec.prepare_deadline))
        after = last + timedelta(seconds=STALL_MARGIN)
        raise DeployRefused(
            f"app {name}: deploy {deploy_id} is not stalled (no expected host holds its "
            f"session without acking, {STALL_MARGIN:g} s past the apply deadline: from "
            f"{iso(after)}): no session ended; "
            f"`{ctx.command_line('abort', name, deploy_id)}` asks the hosts"
        )
    store.request_abort(deploy_id, ctx.args.reason or "", by=user_at_host())
    ended, refused = end_stalled_sessions(store, deploy_id, stalled, members)
    if refused and not ended:
        raise ConsulPermissionDenied(refused)
    wait = ABORT_WAIT + (WAIT_RECHECK if keyless else 0.0)
    after_end = _wait_for_end(store, deploy_id, wait) if ended else checked
    verdict = after_end.verdict() if after_end is not None else UNDECIDED
    nodes = ", ".join(sorted(ended))
    data: dict[str, Any] = {
        "deploy": deploy_id,
        "app": name,
        "aborted": verdict == ABORT,
        "ended_sessions": ended,
        "decision": verdict,
    }
    if verdict == ABORT:
        said = f"deploy {deploy_id} aborted: ended the session of {nodes}"
    elif verdict == COMMIT:
        said = (
            f"deploy {deploy_id} committed: {nodes} acked ready before its session ended "
            "(its watcher takes a new session)"
        )
    else:
        said = (
            f"ended the session of {nodes}; the hosts have not decided deploy {deploy_id} "
            f"yet (watch `{ctx.command_line('history', name)}`)"
        )
    if refused:
        said += f"; not every session: {refused}"
    ctx.emit(data, lambda _: said)
    return EXIT_OK if not refused and verdict != COMMIT else EXIT_REFUSED


def _why_aborted(view: DeployView | None) -> str:
    """ " (by WHO: WHY)" of the abort someone asked for, else " (WHY)" of the decision."""
    if view is None:
        return ""
    if view.abort_requested is not None:
        reason = ids.one_line(view.abort_requested.reason)
        return f" (by {ids.one_line(view.abort_requested.by)}" + (f": {reason})" if reason else ")")
    if view.decision is not None and view.decision.reason:
        return f" ({ids.one_line(view.decision.reason)})"
    return ""


def _app_hint(ctx: CtlContext, name: str) -> str:
    """What `abort web` meant, when ``name`` is an app and not a deploy: the deploy in
    flight of that app, and the command that aborts it ("" when it is no app)."""
    if name not in ctx.config.apps:
        return ""
    inflight, _ = _store(ctx, name).inflight()
    usage = f"{name} is an app, not a deploy: abort takes [APP] DEPLOY, the deploy's id"
    if inflight is None:
        return f"{usage}; no deploy of {name} is in flight, nothing to abort"
    command = ctx.command_line("abort", name, inflight)
    return f"{usage}; to abort its deploy in flight: `{command}`"


def not_ended(view: DeployView | None, now: datetime | None = None) -> list[str]:
    """The expected hosts of a deploy the acks commit that is still in flight (no outcome)
    ``STALL_MARGIN`` past its apply deadline; [] otherwise. Every running watcher of the
    app that is not held or in a hook ends such a deploy by then (an expected host once it
    applied it or past that deadline, any other past it, DESIGN.md 6.4.7): none does, its
    every host stopped running the app, say."""
    if (
        view is None
        or view.outcome is not None
        or view.verdict() != COMMIT
        or not past_stall_margin(view.record, now)
    ):
        return []
    return list(view.record.expected)


def _not_ended(app: str, what: str, view: DeployView | None) -> str:
    """What `abort` adds of a committed deploy that has not ended well past its apply
    deadline: which watchers end it."""
    hosts = not_ended(view) if what == COMMIT else []
    return f"; not ended past its apply deadline. {committed_end(app, hosts)}" if hosts else ""


def past_stall_margin(record: DeployRecord, now: datetime | None = None) -> bool:
    """Whether ``STALL_MARGIN`` has passed since ``record``'s apply deadline, and its
    prepare deadline (by this machine's clock). A request is anybody's word: one whose
    apply deadline came before its prepare deadline made a host still honestly staging
    look stalled (the second attacker round)."""
    last = max(parse_iso(record.apply_deadline), parse_iso(record.prepare_deadline))
    return (now or utcnow()) >= last + timedelta(seconds=STALL_MARGIN)


def stalled_by(
    view: DeployView,
    members: Mapping[str, KVEntry],
    now: datetime | None = None,
    alive: Collection[str] = (),
) -> dict[str, str]:
    """The expected nodes that hold a deploy undecided past its apply deadline (node -> the
    session its request named): each has neither acked ready nor said no, while that
    session still holds its member key, or lives without it (``alive``: what
    ``_named_alive`` found; renewed by hand, it keeps the abort clause from holding just
    the same). By then every host running the watcher has acked
    or let its session go (its own daemon ends it once stuck past the prepare deadline,
    DESIGN.md 6.4.7): that node's watcher is stopped or hung, its clock far behind, or its
    token used by something else, and only the end of that session (the abort clause)
    ends the deploy. Empty before ``STALL_MARGIN`` past the deadline, and once the acks
    decide it (an ``expired`` outcome record does not: the acks still do not)."""
    if view.verdict() != UNDECIDED or not past_stall_margin(view.record, now):
        return {}
    return {
        node: named
        for node, named in _unacked_named(view).items()
        if named in alive or ((entry := members.get(node)) is not None and entry.session == named)
    }


def _unacked_named(view: DeployView) -> dict[str, str]:
    """Expected node -> the session its request named, for nodes that acked neither ready
    nor no."""
    done = ACKED_READY_STATES | ABORT_ACK_STATES
    return {
        node: named
        for node in view.record.expected
        if (named := view.record.sessions.get(node))
        and ((ack := view.nodes.get(node)) is None or ack.state not in done)
    }


def _named_alive(store: DeployStore, view: DeployView, members: Mapping[str, KVEntry]) -> set[str]:
    """The sessions ``view``'s request named for nodes that have not acked and that do not
    hold their member key, which Consul still has: a session renewed by hand after it let
    the key go (a stopped watcher's, by its host's token). One ``session/info`` each; asked
    by ``stalled_in`` only for a deploy ``stalled_by`` could name, past its margin. A token
    that may not read sessions sees none (Consul hides them), docs/acl.md."""
    found = set()
    for node, named in _unacked_named(view).items():
        entry = members.get(node)
        if entry is not None and entry.session == named:
            continue
        with contextlib.suppress(ConsulPermissionDenied):
            info = store.consul.session_info(named, consistent=True)
            # Another node's session, named by a forged request, stalls nothing of this node.
            if info is not None and info.get("Node") == node:
                found.add(named)
    return found


def stalled_in(
    store: DeployStore,
    view: DeployView | None,
    *,
    members: Mapping[str, KVEntry] | None = None,
    consistent: bool = False,
) -> dict[str, str]:
    """``stalled_by`` of ``view``, with the named sessions that live without their member
    key (``_named_alive``). The members (unless given) and those sessions are read only
    where it can name someone (an undecided deploy past its margin): every other read of
    a deploy pays nothing for it."""
    now = utcnow()
    if view is None or view.verdict() != UNDECIDED or not past_stall_margin(view.record, now):
        return {}
    if members is None:
        members = store.members(consistent=consistent)
    return stalled_by(view, members, now, alive=_named_alive(store, view, members))


def stalled_line(app: str, deploy_id: str, stalled: Mapping[str, str], command: str) -> str:
    """What `status` and `abort` say of a deploy ``stalled_by`` ``stalled``."""
    nodes = ", ".join(sorted(stalled))
    verb = "holds" if len(stalled) == 1 else "hold"
    return (
        f"deploy {deploy_id} of {app} is STALLED past its apply deadline: {nodes} {verb} the "
        "session the request named and has acked neither ready nor failed (a watcher "
        "stopped or hung, a clock far behind, or that token used by something else); hosts "
        "that acked ready can no longer honor an abort request, and only the end of that "
        f"session ends the deploy: `{command}` (a token with session write on that node, "
        "docs/acl.md)"
    )


def _elsewhere(store: DeployStore, node: str, session: str, *, foreign: bool = False) -> list[str]:
    """What ending ``node``'s ``session`` would abort besides this deploy: the session is
    the host's for every app (one per daemon), so each app whose member key it holds
    loses that host, and a deploy in flight there that expects it without its ready ack
    aborts, unless that one is stalled by it too. ``foreign``: the session is on another
    Consul node than ``node``; a member key of another node it holds in any app says it
    may be that node's watcher's. Empty when nothing else would."""
    apps_prefix = store.keys.base.rsplit("/", 1)[0] + "/"
    names, filtered = store.consul.kv_keys_checked(apps_prefix)
    if filtered:
        return [
            f"this token may not read every app under {apps_prefix}, so what else {node}'s "
            "session holds cannot be seen; use a token that reads them all and may write "
            f'that node\'s sessions (`session "{node}" {{ policy = "write" }}`; the '
            "management token)"
        ]
    said = []
    for name in sorted(n[len(apps_prefix) :].rstrip("/") for n in names if n.endswith("/")):
        if name == store.app or not name:
            continue
        other = DeployStore(store.consul, apps_prefix.rsplit("/apps/", 1)[0], name)
        members = other.members(consistent=True)
        theirs = sorted(m for m, e in members.items() if e.session == session and m != node)
        if foreign and theirs:
            said.append(
                f"it holds app {name}'s member key of {', '.join(theirs)}: it may be "
                f"{theirs[0]}'s watcher's session, not {node}'s"
            )
        if node not in members or members[node].session != session:
            continue
        inflight, _ = other.inflight(consistent=True)
        view = other.view(inflight) if inflight else None
        if view is None:
            continue
        checked = view.checked()
        ack = checked.nodes.get(node)
        if (
            checked.verdict() != UNDECIDED
            or node not in checked.record.expected
            or (ack is not None and ack.state in ACKED_READY_STATES | ABORT_ACK_STATES)
        ):
            continue
        if node not in stalled_in(other, checked, members=members):
            said.append(
                f"deploy {checked.id} of app {name}, which expects {node} and is not stalled, "
                "would abort too"
            )
    return said


def end_stalled_sessions(
    store: DeployStore,
    deploy_id: str,
    stalled: Mapping[str, str],
    members: Mapping[str, KVEntry],
) -> tuple[dict[str, str], str]:
    """Destroy the sessions ``stalled`` (``stalled_in`` of ``deploy_id``, read with
    ``members``, the app's consistent members): each one's end makes the abort clause hold
    (DESIGN.md 6.4.3). A node that acks ready before its session ends keeps its ack (the
    ready txn checks the session), so the deploy may commit instead. Refused
    (DeployRefused) when a session may be another host's, or ending one would also abort
    a deploy of another app that is not stalled. Returns what was ended (node -> session)
    and, when Consul refused one, why (the rest are not tried; those already ended stay
    ended)."""
    agent_of: dict[str, str] = {}
    prefix = store.keys.base.rsplit("/apps/", 1)[0]
    for node, session in sorted(stalled.items()):
        info = store.consul.session_info(session, consistent=True)
        on = agent_of[node] = str(info.get("Node") or node if info is not None else node)
        # A request any host's token can write names the sessions, and a host's token may
        # acquire its own member key with any session it can read: one of another node
        # would end that node's watcher session (and abort whatever it takes part in, the
        # attacker review), or another service's lock, or another fleet's watcher session.
        # A watcher names its session after its node and this fleet's prefix, which only a
        # token with session write on the Consul node it is made on can: its own agent's
        # node, whatever its `node` setting. Older watchers named it "watcher <node>": such
        # a session counts only while it holds the node's member key in this app.
        name = info.get("Name") if info is not None else None
        entry = members.get(node)
        legacy = name == f"watcher {node}" and entry is not None and entry.session == session
        wanted = watcher_session_name(node, prefix)
        if info is not None and name != wanted and not legacy:
            raise DeployRefused(
                f"app {store.app}: the session {session} deploy {deploy_id}'s request names "
                f"for {node} is named {ids.one_line(str(name))!r} (Consul node {on}), not "
                f"{wanted!r} as that node's watcher of this fleet names its session: a "
                "forged request or member key, another fleet's watcher, or another "
                "service's session: nothing was ended; `consul session destroy` ends it if "
                "you are sure"
            )
        # On another Consul node (a watcher whose `node` setting is not its agent's name):
        # it also holds the node's member key and no other node's anywhere.
        theirs = sorted(m for m, e in members.items() if e.session == session and m != node)
        if on != node and (entry is None or entry.session != session or theirs):
            why = (
                f"it also holds the member key of {', '.join(theirs)}"
                if theirs
                else f"it does not hold {node}'s member key"
            )
            raise DeployRefused(
                f"app {store.app}: the session {session} deploy {deploy_id}'s request names "
                f"for {node} is Consul node {on}'s, not {node}'s, and {why} (a forged "
                "request, or a watcher whose `node` setting is not its agent's name that is "
                "not running): nothing was ended; `consul session destroy` ends it if you "
                "are sure"
            )
        if others := _elsewhere(store, node, session, foreign=on != node):
            raise DeployRefused(
                f"app {store.app}: {node}'s session {session} is its watcher's for every app, "
                f"and ending it would do more than end deploy {deploy_id}: "
                + "; ".join(others)
                + "; nothing was ended"
            )
    ended: dict[str, str] = {}
    for node, session in sorted(stalled.items()):
        try:
            store.consul.session_destroy(session)
        except ConsulPermissionDenied as exc:
            return ended, (
                f"{exc}; ending {node}'s session {session} needs a token with "
                f'`session "{agent_of[node]}" {{ policy = "write" }}` (or a management token), '
                "docs/acl.md"
            )
        ended[node] = session
    return ended, ""


def abort_deploy(
    store: DeployStore, deploy_id: str, reason: str, *, by: str, wait: float = ABORT_WAIT
) -> tuple[str, DeployView | None, bool]:
    """Request the abort (``requests/<id>/abort``) and wait up to ``wait`` s for the acks to
    settle: ("aborted" | "committed" | another outcome | "undecided", the deploy, whether
    this call wrote the request: False when the deploy was decided before, or when someone
    had asked already, whose request stands: its ``by`` and reason). Every expected
    host honors the request until it acks ready; after that it is too late. A contested
    deploy ("contested") is left alone: it has stopped, and an abort changes nothing
    there."""
    before = store.view(deploy_id)
    if before is not None:
        checked = before.checked()
        if before.verdict() == CONTESTED:
            return CONTESTED, checked, False
        if (decided := _decided(checked)) is not None:
            # Nothing to ask: no abort record written (a read-only token gets the answer too).
            return decided, checked, False
    asked = store.request_abort(deploy_id, reason, by=by)
    view = _wait_for_end(store, deploy_id, wait)
    return _decided(view) or UNDECIDED, view, asked


def _decided(view: DeployView | None) -> str | None:
    """What abort reports of a deploy: "aborted", its outcome or the acks' decision; None
    while it is undecided."""
    result = view.outcome.result if view and view.outcome else None
    verdict = view.verdict() if view else UNDECIDED
    if result == "aborted" or (result is None and verdict == ABORT):
        return "aborted"
    return result or (verdict if verdict != UNDECIDED else None)


def contested_reason(deploy_id: str) -> str:
    return (
        f"deploy {deploy_id} is contested: a host's ack changed after others acted on it; "
        "every host that saw it stopped where it stands and holds the app, and an abort "
        "changes nothing (README.md, 'A deploy is contested')"
    )


def _wait_for_end(
    store: DeployStore, deploy_id: str, timeout: float, *, ended: bool = False
) -> DeployView | None:
    """The deploy (checked against its acks) once they decide it or it ended (``ended``:
    once it ended), else when ``timeout`` runs out."""
    end = time.monotonic() + timeout
    index = 0
    view = _checked_view(store, deploy_id)
    while (
        view is not None
        and view.outcome is None
        and (ended or view.verdict() not in (ABORT, COMMIT))
    ):
        left = end - time.monotonic()
        if left <= 0:
            break
        index, _ = store.consul.kv_keys_blocking(store.keys.base + "/", index, min(left, 5.0))
        view = _checked_view(store, deploy_id)
    return view


def _checked_view(store: DeployStore, deploy_id: str) -> DeployView | None:
    view = store.view(deploy_id)
    return view.checked() if view is not None else None


def _clear_stale_inflight(store: DeployStore, deploy_id: str) -> bool:
    """Delete ``inflight`` when it names ``deploy_id`` and that deploy has no record (no
    host can act on it, and it blocks every deploy); True when it was cleared here."""
    inflight, index = store.inflight()
    if inflight != deploy_id:
        return False
    ops = [TxnOp.check_index(store.keys.inflight, index), TxnOp.delete(store.keys.inflight)]
    return store.consul.txn(ops).ok


# --- status ------------------------------------------------------------------------------


def _proc_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (R, S, D, T, t, Z, X ...); "" when /proc
    cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    state = stat.rpartition(")")[2].split()[:1]  # after the command name, which may hold ")"
    return state[0] if state else ""


def daemon_status(state_dir: str) -> dict[str, Any]:
    """The daemon's own status file, and whether it is running."""
    path = Path(state_dir) / "status.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        from watcher.fsutil import INSTANCE_LOCK, named_watcher, watcher_runs

        lock = Path(state_dir) / INSTANCE_LOCK
        if watcher_runs(lock) and (pid := named_watcher(lock)) is not None:
            # Started, not yet ready: it writes its status once Consul gave it a session
            # (an unknown token, an agent that does not answer keep it there).
            return {
                "running": False,
                "starting": True,
                "pid": pid,
                "reason": f"no status at {path} yet: it writes one once Consul gave it a "
                "session; its log says what it waits for (journalctl -u watcher)",
            }
        return {"running": False, "reason": f"no status at {path}"}
    except ValueError:
        return {"running": False, "reason": f"no status at {path}"}
    except OSError as exc:  # a directory, root's file without sudo: say so, show the rest
        return {"running": False, "reason": f"cannot read {path}: {exc.strerror or exc}"}
    try:
        pid = int(data.get("pid", 0))
        updated_at = parse_iso(data["updated_at"])
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        return {"running": False, "reason": f"unreadable status at {path}"}
    state = ""  # of the pid in /proc, read once: "" when it is gone or /proc cannot say
    alive = False
    if pid > 0:  # kill(0 or -n) would probe a process group, not the daemon
        try:
            os.kill(pid, 0)
            alive = True
        except PermissionError:
            alive = True
        except (ProcessLookupError, OverflowError):
            pass
    if alive:
        state = _proc_state(pid)
        # A zombie (Z, X) has exited and waits for its parent to reap it: signal 0 still
        # reaches it, but no daemon runs there.
        alive = state not in ("Z", "X")
    age = (datetime.now(UTC) - updated_at).total_seconds()
    # Stopped (SIGSTOP, a debugger): it was shown running until its status file was 30 s
    # old, while the fleet already saw it down (the CLI review); /proc says so at once.
    stopped = alive and state in ("T", "t")
    data["running"] = alive and not stopped and age < DAEMON_STALE_AFTER
    data["age_s"] = round(age, 1)
    if not data["running"]:
        data["reason"] = (
            "process gone"
            if not alive
            else f"pid {pid} is stopped (SIGSTOP, or a debugger): it does nothing until it "
            f"is continued (kill -CONT {pid})"
            if stopped
            else f"pid {pid} exists but has not updated its status for {age:.0f}s: stopped or stuck"
        )
        data["stuck"] = alive
        # What the file said of its health was true when written, not now.
        data["healthy"] = False
    return data


def _local_app(app: AppConfig, daemon: dict[str, Any]) -> dict[str, Any]:
    # Only this host's status reads its disk: the fleet commands (deploy, status --fleet,
    # history) do not load the release engine and its archive code (~16 ms of imports).
    from watcher.releases import ReleaseEngine

    engine = ReleaseEngine(app)
    releases = engine.list_releases()
    hold = engine.held()
    # Artifact ids, newest first, as the host record and `status --fleet` name them (the
    # files are <id>-<sha256 prefix>.tar.gz in artifacts/, trees <id>-<prefix> in
    # prefetched/), and which of them are pre-extracted (a deploy of those is a rename).
    found: list[tuple[float, str, bool]] = []
    for folder, extracted in (
        (engine.layout.prefetched_dir, True),
        (engine.layout.artifacts_dir, False),
    ):
        try:
            for p in folder.iterdir():
                if not p.name.startswith("."):
                    found.append((p.stat().st_mtime, p.name, extracted))
        except OSError:  # no such folder yet, or gone while listed
            continue
    prefetched: list[str] = []
    extracted_ids: set[str] = set()
    for _, name, extracted in sorted(found, reverse=True):
        artifact_id = name.removesuffix(".gz").removesuffix(".tar").rsplit("-", 1)[0]
        if artifact_id not in prefetched:
            prefetched.append(artifact_id)
        if extracted:
            extracted_ids.add(artifact_id)
    return {
        "current": engine.current_release(),
        # `current` dangling or on a tree without its release.json: this host serves
        # nothing (the watcher stages it again from the fleet's committed deploy)
        "current_problem": engine.live_problem(),
        "previous": engine.previous_release(),
        "backup": engine.backup_release(),
        "staged": [r.release for r in releases],
        "hold": hold.to_dict() if hold else None,
        "prefetched": prefetched,
        "pre_extracted": [a for a in prefetched if a in extracted_ids],
        "daemon": daemon.get("apps", {}).get(app.name),
    }


# What went wrong with Consul, in a few words (unreachable is not refused), and how the
# first line of `status` shouts it.
CONSUL_PROBLEMS = {
    "Consul unreachable": "UNREACHABLE",
    "TLS to Consul failed": "TLS FAILED",
    "Consul refused the token": "REFUSED THE TOKEN",
    "Consul refused the request": "REFUSED A REQUEST",
}


def consul_problem(exc: ConsulError) -> str:
    if isinstance(exc, ConsulUnavailable):
        return "Consul unreachable"
    if isinstance(exc, ConsulTLSError):
        return "TLS to Consul failed"
    if isinstance(exc, ConsulPermissionDenied):
        return "Consul refused the token"
    return "Consul refused the request"


def cmd_status(ctx: CtlContext) -> int:
    """This host's part (its disk, its daemon) always; the fleet's part (KV) when Consul
    answers. When it cannot be read, it is shown as unknown, never as "none", and the exit
    code says why (3: Consul), after the local part is printed."""
    names = [ctx.args.app] if ctx.args.app else ctx.app_names("status")
    for name in names:
        ctx.app(name)
    if ctx.args.fleet:
        try:
            return _fleet_status(ctx, names)
        except ConsulError as exc:
            # The fleet cannot be read (Consul down, a refused token, an address that is not
            # Consul's): this host's part, as plain `status` shows it, then why.
            return _host_status(ctx, names, unreachable=exc, fleet_shape=True)
    return _host_status(ctx, names)


def _host_status(
    ctx: CtlContext,
    names: list[str],
    *,
    unreachable: ConsulError | None = None,
    fleet_shape: bool = False,
) -> int:
    """`status`: this host's part, and the fleet's as far as Consul answers (not asked
    again when ``unreachable`` already says it does not). ``fleet_shape``: `status --fleet`
    that could not read the fleet; its JSON keeps the fleet's shape (``_unread_fleet``)."""
    config = ctx.config
    daemon = daemon_status(config.daemon.state_dir)
    others = set(config.apps) - set(names)
    if others and daemon.get("problems"):
        # `status APP`: another app's alarm or undecided deploy is not this app's (each of
        # those problems starts with its app); the session and the loop are everyone's.
        mine = [p for p in daemon["problems"] if str(p).split(": ", 1)[0] not in others]
        daemon.update(problems=mine, healthy=not mine)
    consul = _consul(ctx, quick=True)
    node = config.node or daemon.get("node")
    waiting = running_settings(config, daemon)
    if waiting:
        # The running watcher's, not the file's: what this host does until its restart.
        daemon["config_waiting"] = waiting
        node = daemon.get("node") or node
        kv_prefix = waiting.get("kv_prefix", {}).get("running", config.kv_prefix)
    else:
        kv_prefix = config.kv_prefix
    data: dict[str, Any] = {
        "node": node,
        "daemon": daemon,
        "consul": {
            "address": config.consul.base_url,
            "reachable": True,
            "error": "",
            "problem": "",
        },
        "apps": {},
    }
    if unreachable is not None:
        data["consul"].update(_consul_failure(unreachable))
    failure: WatcherError | None = unreachable
    for name in names:
        app = config.apps[name]
        if (root := waiting.get(f"apps.{name}.root")) is not None:
            app = replace(app, root=root["running"])
        entry = _local_app(app, daemon)
        # Unknown until read: the keys are always there, null with the reason when unread.
        entry.update(fleet_current=None, deploy=None, fleet_error=None)
        if isinstance(failure, ConsulError):  # one wait for an unreachable Consul is enough
            entry["fleet_error"] = data["consul"]["problem"]
        else:
            try:
                if node is None:
                    node = consul.agent_node_name()
                    data["node"] = node
                _fleet_part(DeployStore(consul, kv_prefix, name), node, entry)
            except ConsulError as exc:
                failure = exc
                data["consul"].update(_consul_failure(exc))
                entry.update(fleet_current=None, deploy=None, fleet_error=data["consul"]["problem"])
            except WatcherError as exc:  # Consul answered; what it holds could not be read
                failure = failure or exc
                entry.update(fleet_current=None, deploy=None, fleet_error=str(exc))
        undecided = (entry.get("daemon") or {}).get("undecided")
        if undecided:
            entry["undecided"] = undecided
        data["apps"][name] = entry
    shown = _unread_fleet(data) if fleet_shape and ctx.as_json else data
    ctx.emit(shown, lambda _: ctx.with_config(_human_status(data)))
    if failure is not None:
        return exit_code_for(failure)
    # A daemon that is not running (or not answering) is this host's failure: a monitoring
    # check or a script must not read "ok" from it (3, as `systemctl status` says).
    if not daemon.get("running"):
        return EXIT_UNAVAILABLE
    # Running and unhealthy (no session it can get, an alarm, undecided past its limit):
    # not a host left alone in a good state, whatever the fleet's part says.
    unhealthy = daemon.get("healthy") is False
    return EXIT_FAILED if unhealthy or any(map(_in_doubt, data["apps"].values())) else EXIT_OK


def running_settings(config: Config, daemon: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The settings a running watcher works with that the config file now gives otherwise
    (``node``, ``kv_prefix``, an app's ``root``: each takes effect at its restart), as
    setting -> {"running", "file"}. `status` showed the file's (another root's releases,
    another prefix's fleet) as this host's while the watcher still ran on the old ones."""
    if not daemon.get("running"):
        return {}
    said: dict[str, dict[str, str]] = {}
    raw = daemon.get("apps")
    apps: dict[str, Any] = raw if isinstance(raw, dict) else {}
    pairs = [
        ("node", daemon.get("node"), config.node),
        ("kv_prefix", daemon.get("kv_prefix"), config.kv_prefix),
    ]
    pairs += [
        (f"apps.{name}.root", (apps.get(name) or {}).get("root"), app.root)
        for name, app in config.apps.items()
        if isinstance(apps.get(name), dict)
    ]
    for setting, running, file in pairs:
        # An older watcher's file does not say it; a node left to the agent's name is none.
        if isinstance(running, str) and running and file and running != file:
            said[setting] = {"running": running, "file": file}
    return said


def _consul_failure(exc: ConsulError) -> dict[str, Any]:
    """What `status` says of Consul after ``exc``: it answered (a refused token or request)
    or it did not."""
    return {
        "reachable": isinstance(exc, ConsulPermissionDenied | ConsulRequestError),
        "error": str(exc),
        "problem": consul_problem(exc),
    }


def _unread_fleet(data: dict[str, Any]) -> dict[str, Any]:
    """`status --fleet --json` when Consul did not answer: the shape of ``fleet_status``
    for each app (a script reads the same keys either way), every fleet figure null,
    ``fleet_error`` saying why, and this host's part, as `status` shows it, under
    ``this_host``."""
    host = {k: v for k, v in data.items() if k != "apps"}
    return {
        name: {
            "current": None,
            "previous": None,
            "current_problems": {},
            "current_failed": None,
            "current_not_live": [],
            "deploy": None,
            "hosts": None,
            "fleet_error": entry["fleet_error"],
            "this_host": {**host, "app": entry},
        }
        for name, entry in data["apps"].items()
    }


def _in_doubt(app: dict[str, Any]) -> bool:
    """Whether what one app's status shows includes a record shown NOT TRUSTED (the
    acks contradict it), acks that contradict each other, a BROKEN ``inflight``, a
    ``current`` on this host whose tree is gone (``current_problem``) or a fleet release
    whose validate failed after its commit (``fleet_failed``): never the state of a
    fleet left alone, so a script or a monitoring check must not read "ok"
    (exit 1, after everything is printed). Takes this host's (``fleet_problems``) and the
    fleet's (``current_problems``) shape."""
    dep = app.get("deploy") or {}
    return bool(
        app.get("fleet_problems")
        or app.get("current_problems")
        or app.get("fleet_failed")
        or app.get("current_failed")
        or app.get("current_problem")
        or dep.get("problem")
        or dep.get("distrusted")
        or dep.get("stalled")
        or dep.get("not_ended")
        or dep.get("decision") == CONTESTED
    )


def fleet_release(
    store: DeployStore, hosts: Mapping[str, HostRecord] | None = None
) -> dict[str, Any]:
    """The fleet's release and the one before it, as `current` names them, each only
    when the acks of the deploy named commit that release (``DeployStore.check_current``):
    any host's token can rewrite `current`, and a reader must not report the fleet "on" a
    release no host acked. ``current_problems`` says what did not agree. ``hosts``: the
    host records when the caller read them."""
    current, _ = store.current()
    views: dict[str, DeployView] = {}
    problems = store.check_current(current, hosts, views)
    previous = current.previous_ref() if current and "previous" not in problems else None
    trusted = current is not None and "current" not in problems
    return {
        "current": current.release if current is not None and trusted else None,
        "previous": previous.release if previous else None,
        "current_problems": problems,
        "current_failed": (
            failed_release(
                store, views["current"], previous, previous_untrusted="previous" in problems
            )
            if trusted and "current" in views
            else None
        ),
        "current_not_live": (
            not_live_after_end(views["current"], hosts)
            if trusted and "current" in views and hosts is not None
            else []
        ),
    }


def not_live_after_end(view: DeployView, hosts: Mapping[str, HostRecord]) -> list[str]:
    """Expected hosts of ``view``'s deploy (the one `current` names) that took its commit
    (or acked ready) and have not said live or failed: still running their hooks after the
    switch past the deploy's end, or their watcher stopped. A validate failing there now
    starts no automatic rollback, and nothing said so between the end and that (the
    operator review). A host that converged since says so in its host record (on the
    release, its state no longer the deploy's): a convergence writes no ack."""
    said = []
    for node in view.record.expected:
        ack = view.nodes.get(node)
        host = hosts.get(node)
        # No host record: retired (`gc` deletes it and keeps the acks), or one that does
        # not parse; `status --fleet` lists neither among the hosts.
        if ack is None or ack.state not in (READY, COMMITTED) or host is None:
            continue
        converged = host.release == view.record.release and host.state not in (READY, COMMITTED)
        if not converged:
            said.append(node)
    return said


def failed_release(
    store: DeployStore,
    view: DeployView,
    previous: ReleaseRef | None = None,
    *,
    previous_untrusted: bool = False,
) -> dict[str, Any] | None:
    """When the fleet's release failed after its commit (its ``validate`` failed on some
    host and no rollback has moved the fleet off it): the deploy, the hosts with their
    errors (from their acks), when one was started how the automatic rollback stands,
    and ``roll_back``: the `watcherctl` line that rolls the fleet back (None when there
    is no previous release). Its previous release is the one a plain `rollback` goes to,
    refused when the fleet was rolled back from it (``_refuse_a_failed_previous``): the
    line then names ``--to``. None when every host that acked it is fine."""
    failed = {node: view.nodes[node].error for node in failed_after_commit_on(view)}
    if not failed:
        return None
    outcome = view.checked().outcome
    rollback_id = outcome.rollback_deploy if outcome else None
    # Ended "committed": no host's validate had failed when the deploy ended (past its
    # apply deadline, or without a host whose watcher had stopped, that failed once back);
    # only the end starts an automatic rollback, so none was started.
    after_end = outcome is not None and outcome.result == "committed"
    rollback = None
    if rollback_id:
        with contextlib.suppress(PayloadError):
            rollback = rollback_summary(store.view(rollback_id), rollback_id, view.record)
    # Whether a plain rollback (to `current.previous`) is refused: its acks do not commit
    # it, or the fleet was rolled back from it (its deploy ended rolled back or failed
    # after its commit): the line then names --to, and the page offers no such button.
    plain_refused = previous_untrusted
    if previous is not None and not previous_untrusted:
        before = None
        with contextlib.suppress(PayloadError):
            before = store.view(previous.deploy)
        plain_refused = bool(failed_deploy(before))
    roll_back = None
    if previous is not None or previous_untrusted:
        roll_back = f"watcherctl rollback {store.app}" + (" --to RELEASE" if plain_refused else "")
    return {
        "deploy": view.id,
        "release": view.record.release,
        "hosts": failed,
        "rollback": rollback,
        "roll_back": roll_back,
        "plain_rollback_refused": plain_refused,
        "after_end": after_end,
    }


#: What a deploy in flight does to a failed release, by its decision (None: undecided).
_IN_FLIGHT_SAYS = {
    None: "once it commits, it moves the fleet off it",
    COMMIT: "committed, it moves the fleet off it",
    ABORT: "aborted; once it has ended:",
}


def in_flight_note(
    failed: Mapping[str, Any], in_flight: Mapping[str, Any] | None
) -> tuple[str, bool]:
    """What another deploy in flight (``deploy`` of `status`) does to the release that
    ``failed``, and whether it settles what to do (undecided or committed: it moves the
    fleet, and a rollback would be refused while it runs); ("", False) without one. The
    words of `status` and of the page."""
    if not in_flight or in_flight.get("id") in (None, failed["deploy"]):
        return "", False
    if not in_flight.get("release"):  # an inflight that does not parse
        return "", False
    decided = in_flight.get("decision")
    says = _IN_FLIGHT_SAYS.get(
        decided, f"{decided} (its acks contradict each other); once it has ended:"
    )
    kind = in_flight.get("kind") or "deploy"
    return (
        f"{kind} {in_flight['id']} of {in_flight['release']} is in flight: {says}",
        decided in (None, COMMIT),
    )


def failed_release_lines(
    failed: dict[str, Any] | None, app: str, in_flight: dict[str, Any] | None = None
) -> list[str]:
    """``failed_release`` in words for `status`: what failed where and what to do.
    ``in_flight``: the app's deploy in flight (``deploy`` of `status`): while another one
    runs, it is what moves the fleet, and a rollback would be refused (one in flight)."""
    if not failed:
        return []
    hosts = "; ".join(
        f"{node}: {ids.one_line(error) or 'no reason given'}"
        for node, error in failed["hosts"].items()
    )
    lines = [
        f"  FAILED AFTER COMMIT: release {failed['release']} (deploy {failed['deploy']}) "
        f"failed its validate on {hosts}"
    ]
    rollback = failed.get("rollback")
    if rollback and rollback["result"] is None:
        lines.append(f"  its automatic rollback {rollback['deploy']} is running")
        return lines
    if rollback and rollback["result"] != "committed":
        lines.append(
            f"  its automatic rollback {rollback['deploy']}: {rollback['result']}: "
            f"{ids.one_line(rollback['note'])}"
        )
        if rollback["result"] == CONTESTED:  # hosts held where they stood: its note says
            return lines
    if failed.get("after_end"):
        lines.append(
            "  no automatic rollback: the deploy had already ended (committed) when this "
            "validate failed"
        )
    note, settles = in_flight_note(failed, in_flight)
    if note:
        lines.append(f"  {note}")
        if settles:
            return lines
    command = failed.get("roll_back")
    if command is None:
        lines.append(
            "  the fleet stays on it: deploy a fix (no previous release is recorded to roll "
            f"back to; `watcherctl history {app}` has the details)"
        )
    elif command.endswith("--to RELEASE"):
        lines.append(
            f"  the fleet stays on it: `{command}` (its previous release failed too, or is "
            f"not trusted: name one that passed, `watcherctl history {app}` lists them) or "
            "deploy a fix"
        )
    else:
        lines.append(
            f"  the fleet stays on it: `{command}` or deploy a fix "
            f"(`watcherctl history {app}` has the details)"
        )
    return lines


def shown_decision(view: DeployView) -> str | None:
    """A checked view's decision as status shows it: commit or abort once the acks say
    it, "contested" when they contradict each other, None while undecided."""
    if view.decision is not None:
        return view.decision.outcome
    return CONTESTED if view.verdict() == CONTESTED else None


def _fleet_part(store: DeployStore, node: str | None, entry: dict[str, Any]) -> None:
    """The app's fleet release and the deploy in flight, as this host takes part in it."""
    fleet = fleet_release(store)
    entry["fleet_current"] = fleet["current"]
    if fleet["current_problems"]:
        entry["fleet_problems"] = fleet["current_problems"]
    if fleet["current_failed"]:
        entry["fleet_failed"] = fleet["current_failed"]
    inflight, _ = store.inflight()
    view, problem = _inflight_view(store, inflight)
    if problem is not None:
        entry["deploy"] = problem
    elif view is not None:
        mine = view.nodes.get(node or "")
        state = (
            mine.state if mine else ("pending" if node in view.record.expected else "not expected")
        )
        entry["deploy"] = {
            "id": inflight,
            "kind": view.record.kind,
            "release": view.record.release,
            "decision": shown_decision(view),
            "this_host": state,
            "states": summarize_states(view),
            "distrusted": list(view.distrusted),
            # Members are read only past the apply deadline of an undecided deploy.
            "stalled": stalled_in(store, view),
        }


def _inflight_view(
    store: DeployStore, inflight: str | None
) -> tuple[DeployView | None, dict[str, Any] | None]:
    """The deploy ``inflight`` names, or what is wrong with it and how to clear it.

    Every ``deploy`` is refused while ``inflight`` is set, so a value that names no
    readable deploy must be shown, not taken for "none in flight".
    """
    if not inflight:
        return None, None
    try:
        ids.check_deploy_id(inflight)
    except PayloadError as exc:
        return None, {
            "id": inflight,
            "problem": f"`inflight` holds no deploy id: {exc}",
            "clear": f"consul kv delete {store.keys.inflight}",
        }
    try:
        view = store.view(inflight)
    except PayloadError as exc:
        problem = f"its record does not parse: {exc}"
    else:
        if view is not None:
            return view.checked(), None
        problem = f"it has no record (no request at {store.keys.request(inflight)})"
    return None, {
        "id": inflight,
        "problem": f"`inflight` names deploy {inflight}, but {problem}",
        "clear": f"watcherctl abort {inflight} --app {store.app}",
    }


def _human_inflight_problem(dep: dict[str, Any]) -> str:
    return (
        f"BROKEN: {dep['problem']}; every deploy is refused until it is cleared: `{dep['clear']}`"
    )


def _human_status(data: dict[str, Any]) -> str:
    """This host's status for a person; the commands it suggests are plain (watcherctl
    adds the -c given: ``CtlContext.with_config``)."""
    d = data["daemon"]
    problems = "; ".join(map(ids.one_line, d.get("problems") or ())) or "see its /health"
    daemon = (
        f"watcher STOPPING (pid {d['pid']}) since {d['stopping']}: it finishes the step in "
        "progress (a hook may run to its timeout) and starts none"
        if d.get("running") and d.get("stopping")
        else f"watcher running (pid {d['pid']}) but UNHEALTHY: {problems}"
        if d.get("running") and d.get("healthy") is False
        else f"watcher running (pid {d['pid']})"
        if d.get("running")
        else f"watcher NOT RESPONDING ({d.get('reason', '')})"
        if d.get("stuck")
        else f"watcher STARTING (pid {d['pid']}), not ready: {d.get('reason', '')}"
        if d.get("starting")
        else f"watcher NOT running ({d.get('reason', '')})"
    )
    c = data["consul"]
    problem = c.get("problem") or ("" if c["reachable"] else "Consul unreachable")
    consul = (
        f"consul {CONSUL_PROBLEMS.get(problem, 'FAILED')} at {c['address']}: {c['error']}"
        if problem
        else f"consul reachable at {c['address']}"
    )
    lines = [f"host {data['node'] or '?'}: {daemon}; {consul}"]
    reload = d.get("reload") if d.get("running") else None
    if isinstance(reload, dict):
        if reload.get("error"):
            lines.append(
                f"  config reload FAILED at {reload.get('at')}: {ids.one_line(reload['error'])} "
                "(the watcher runs on the config it had; fix the file and reload: "
                "systemctl reload watcher)"
            )
        if reload.get("needs_restart"):
            lines.append(
                "  config changes waiting for a restart: " + ", ".join(reload["needs_restart"])
            )
    for setting, values in (d.get("config_waiting") or {}).items():
        lines.append(
            f"  {setting}: the running watcher works with {values['running']} (shown here); "
            f"the config file's {values['file']} takes effect at its restart "
            "(systemctl restart watcher)"
        )
    for name, a in data["apps"].items():
        lines.append(f"app {name}")
        lines.append(f"  current     {a['current'] or '-'}")
        if a.get("current_problem"):
            lines.append(
                f"              BROKEN: {a['current_problem']} (nothing is served from it; "
                "the watcher stages it again from the fleet's current)"
            )
        lines.append(f"  previous    {a['previous'] or '-'}")
        for what, problem in (a.get("fleet_problems") or {}).items():
            # in the label column, as `current` and `previous` above it
            lines.append(f"  {'fleet':<11} {what} NOT TRUSTED: {problem}")
        lines += failed_release_lines(a.get("fleet_failed"), name, a.get("deploy"))
        dep = a.get("deploy") or {}
        committing = dep.get("release") if dep.get("decision") == COMMIT else None
        if (
            not a.get("fleet_error")
            and "fleet_current" in a
            and not (a.get("fleet_problems") or {}).get("current")
            and a["fleet_current"] != a["current"]
            # flipped to a committed deploy's release: `current` names it at its end
            and (committing is None or a["current"] != committing)
        ):
            lines.append(f"  fleet is on {a['fleet_current'] or '-'} (this host differs)")
        if a["backup"]:
            lines.append(f"  backup      {a['backup']}")
        staged = a["staged"]
        listed = ", ".join(staged[-5:]) or "-"
        releases = f"watcherctl releases {name}"
        more = f" (the newest 5; `{releases}` lists all)" if len(staged) > 5 else ""
        lines.append(f"  staged      {len(staged)}: {listed}{more}")
        blocked = (a.get("daemon") or {}).get("prune_blocked") if d.get("running") else None
        if blocked and isinstance(blocked, str):
            lines.append(f"  prune       BLOCKED: {blocked[:300]}")
            from watcher.releases import prune_blocked_remedy  # (status --fleet stays light)

            lines.append(f"              to unblock: {prune_blocked_remedy(name)}")
        hold = a["hold"]
        lines.append(
            f"  hold        {hold['reason'] + ' (by ' + hold['by'] + ')' if hold else '-'}"
        )
        shown = [
            f"{i} (extracted)" if i in a.get("pre_extracted", ()) else i for i in a["prefetched"]
        ]
        lines.append(f"  prefetched  {', '.join(shown) or '-'}")
        downloads = (a.get("daemon") or {}).get("downloading") if d.get("running") else None
        for artifact, got in sorted(downloads.items() if isinstance(downloads, dict) else []):
            lines.append(f"  downloading {artifact}: {_progress(got)}")
        failed = (a.get("daemon") or {}).get("prefetch_failed") if d.get("running") else None
        if failed and isinstance(failed, str):
            lines.append(f"  prefetch    FAILED for {ids.one_line(failed)[:600]}")
        dep = a.get("deploy")
        # Only from a running daemon: a stopped one's last status.json is history.
        undecided = a.get("undecided") if d.get("running") else None
        if a.get("fleet_error") and isinstance(undecided, dict) and undecided.get("deploy"):
            # What this host's daemon knows without Consul: it is the partitioned one.
            lines.append(
                f"  deploy      {ids.one_line(str(undecided['deploy']))}: this host UNDECIDED "
                f"(acked ready, cannot read the decision); the rest unknown ({a['fleet_error']})"
            )
        elif a.get("fleet_error"):
            lines.append(f"  deploy      unknown ({a['fleet_error']})")
        elif dep and dep.get("problem"):
            lines.append(f"  deploy      {_human_inflight_problem(dep)}")
        elif dep:
            state = "UNDECIDED" if a.get("undecided") else dep["this_host"]
            lines.append(
                f"  deploy      {dep['id']} ({dep['kind']} of {dep['release']}): "
                f"this host {state}; decision {dep['decision'] or 'pending'}"
            )
            lines += [f"              NOT TRUSTED: {n}" for n in dep.get("distrusted", ())]
            if dep.get("stalled"):
                command = f"watcherctl abort {name} {dep['id']} --end-sessions"
                line = stalled_line(name, dep["id"], dep["stalled"], command)
                lines.append(f"              {line}")
        else:
            lines.append("  deploy      none in flight")
        daemon_app = (a.get("daemon") or {}) if d.get("running") else {}
        for label, key, what in (
            ("switch", "apply_error", "the switch to a committed release"),
            ("converge", "converge_error", "the move to the fleet's release"),
        ):
            error = daemon_app.get(key)
            if error and isinstance(error, str):
                lines.append(
                    f"  {label:<11} FAILED, retried with a growing pause: {what} "
                    f"({ids.one_line(error)[:600]})"
                )
    return "\n".join(lines)


def _progress(got: Any) -> str:
    """``{"have": bytes, "size": bytes}`` as "12.0 of 256.0 MB (4%)"; what the daemon wrote
    is read, not trusted to be well formed."""
    try:
        have, size = int(got["have"]), int(got["size"])
    except (KeyError, TypeError, ValueError):
        return "in progress"
    percent = f" ({100 * have // size}%)" if size > 0 else ""
    return f"{have / 1e6:.1f} of {size / 1e6:.1f} MB{percent}"


def fleet_status(store: DeployStore) -> dict[str, Any]:
    """Every member and known host of one app, the fleet's release and the deploy in flight."""
    members = store.members()
    hosts, unreadable = store.hosts_checked()
    fleet = fleet_release(store, hosts)
    current = fleet["current"]
    inflight, _ = store.inflight()
    view, problem = _inflight_view(store, inflight)
    # A deploy in flight whose acks say commit: its release is the fleet's from the moment
    # the hosts flip, though `current` names it only once the deploy ends (after every
    # post-commit hook): a host already on it is not off the fleet's release.
    committing = (
        view.record.release if view is not None and shown_decision(view) == COMMIT else None
    )
    rows = {}
    for node in sorted(set(members) | set(hosts) | set(unreadable)):
        host = hosts.get(node)
        state = ""
        if view is not None:
            progress = view.nodes.get(node)
            state = (
                progress.state
                if progress
                else ("pending" if node in view.record.expected else "not expected")
            )
        rows[node] = {
            "node": node,
            "release": host.release if host else None,
            "member": node in members,
            "deploy_state": state,
            "last_seen": host.last_seen if host else None,
            "on_fleet_release": bool(
                host and current and host.release in (current, committing or current)
            ),
            "hold": host.hold if host else "",
            # What stopped it (a contested deploy, one it does not follow): its /health.
            "alarm": host.alarm if host else "",
            # Its live release not served there (its tree removed by hand): "" when it is.
            "broken": host.broken if host else "",
            "prefetched": list(host.prefetched) if host else [],
            # Why its host record was skipped: its row then says nothing of its release.
            "record_problem": unreadable.get(node, ""),
        }
    return {
        **fleet,
        "deploy": (
            {
                "id": view.id,
                "kind": view.record.kind,
                "release": view.record.release,
                "decision": shown_decision(view),
                "distrusted": list(view.distrusted),
                "apply_deadline": view.record.apply_deadline,
                # Past that deadline, the nodes that hold it undecided (node -> session).
                "stalled": stalled_in(store, view, members=members),
                # Committed, and not ended well past it: no watcher of the app runs.
                "not_ended": not_ended(view),
            }
            if view
            else problem
        ),
        "hosts": rows,
    }


def _fleet_status(ctx: CtlContext, names: list[str]) -> int:
    _warn_of_a_pending_prefix(ctx)
    consul = _consul(ctx, quick=True)
    data: dict[str, Any] = {}
    for name in names:
        data[name] = fleet_status(DeployStore(consul, ctx.config.kv_prefix, name))

    def human(d: dict[str, Any]) -> str:
        out = []
        for name, a in d.items():
            dep = a["deploy"]
            problems = a["current_problems"]
            head = (
                f"app {name}: fleet release UNKNOWN"
                if "current" in problems
                else f"app {name}: fleet on {a['current']}"
                if a["current"]
                else f"app {name}: no release deployed yet"
            )
            if dep and dep.get("problem"):
                head += f"; inflight {_human_inflight_problem(dep)}"
            elif dep:
                head += (
                    f"; {dep['kind']} {dep['id']} of {dep['release']} in flight "
                    f"(decision {dep['decision'] or 'pending'})"
                )
            out.append(head)
            if dep and dep.get("stalled"):
                command = ctx.command_line("abort", name, dep["id"], "--end-sessions")
                out.append("  " + stalled_line(name, dep["id"], dep["stalled"], command))
            if dep and dep.get("not_ended"):
                out.append(
                    f"  NOT ENDED: deploy {dep['id']} is committed and still in flight past "
                    f"its apply deadline: no watcher of {name} has ended it (none runs, or "
                    "each is held or busy). " + committed_end(name, dep["not_ended"])
                )
            # A record the acks contradict is shown for what it is (DESIGN.md 6.4.3).
            out += [f"  NOT TRUSTED: {p}" for p in problems.values()]
            out += failed_release_lines(a.get("current_failed"), name, dep)
            if late := a.get("current_not_live"):
                out.append(
                    f"  NOT LIVE yet: {', '.join(late)}: acked {a['current']} but has not said "
                    "live or failed (its watcher stopped, or it still runs its hooks after "
                    "the switch past the deploy's end); a validate failing there now starts "
                    "no automatic rollback"
                )
            out += [f"  NOT TRUSTED: {n}" for n in (dep or {}).get("distrusted", ())]
            if not a["hosts"]:
                base = f"{ctx.config.kv_prefix}/apps/{name}/"
                out.append(
                    f"  no host under {base}: no watcher has joined this app with kv_prefix "
                    f"{ctx.config.kv_prefix!r} (is it the one in the hosts' config?)"
                )
                continue
            # A host off the fleet's release is marked, and a hold said where it is.
            drift = bool(a["current"]) and any(
                not h["on_fleet_release"] for h in a["hosts"].values()
            )
            out.append(
                table(
                    [
                        [
                            h["node"],
                            (h["release"] or "-")
                            + (" *" if a["current"] and not h["on_fleet_release"] else ""),
                            ("alive" if h["member"] else "DOWN")
                            + (", held" if h.get("hold") else ""),
                            h["deploy_state"] or "-",
                            h["last_seen"] or "-",
                        ]
                        for h in a["hosts"].values()
                    ],
                    ["NODE", "RELEASE", "WATCHER", "DEPLOY", "RECORD UPDATED"],
                )
            )
            if drift:
                out.append("  * not on the fleet's release")
            if down := [ids.one_line(h["node"]) for h in a["hosts"].values() if not h["member"]]:
                # What the fleet's view can say of it: no session. A watcher that runs but
                # whose agent is down or whose token is refused shows the same, and a
                # restart of it would not help (the status review).
                out.append(
                    f"  DOWN: {', '.join(down)}: no Consul session (its watcher stopped or "
                    "frozen, its Consul agent down or cut off, or its token refused: "
                    # Not in backticks: `with_config` would add this command's -c, a
                    # path on this host (the diff review).
                    f"'watcherctl status {name}' on that host, with its config, says "
                    "which); its RELEASE and DEPLOY are what it last recorded"
                )
            for h in a["hosts"].values():
                # Its last record's, for a host whose watcher is down: said, not counted.
                stale = "" if h["member"] else " (its last record; DOWN)"
                node, hold, alarm = ids.one_line(h["node"]), h.get("hold"), h.get("alarm")
                if hold and alarm and hold.startswith(alarm):  # a contested deploy's (by ...)
                    out.append(f"  ALARM on {node}{stale}, HELD for it: {ids.one_line(hold)}")
                    continue
                if hold:
                    out.append(f"  HELD on {node}{stale}: {ids.one_line(hold)}")
                if alarm:
                    out.append(f"  ALARM on {node}{stale}: {ids.one_line(alarm)}")
                if h.get("broken"):
                    out.append(
                        f"  BROKEN on {node}{stale}: {ids.one_line(h['broken'])} (it serves "
                        "nothing; the watcher stages it again unless the app is held there)"
                    )
            out += [
                f"  UNREADABLE host record of {ids.one_line(h['node'])}: "
                f"{ids.one_line(h['record_problem'])}"
                for h in a["hosts"].values()
                if h.get("record_problem")
            ]
        return "\n".join(out)

    ctx.emit(data, lambda d: ctx.with_config(human(d)))
    # An app no host has joined (a kv_prefix or app name the hosts do not use, or none set
    # up yet) is not a fleet to read "ok" from: a check that runs this would pass on a typo.
    nobody = any(not a["hosts"] for a in data.values())
    # A live host that raised the alarm stopped where it stands until an operator looks (a
    # host down is shown with exit 0, as ever: its record's alarm is from before).
    alarmed = any(
        (h.get("alarm") or h.get("broken")) and h["member"]
        for a in data.values()
        for h in a["hosts"].values()
    )
    return EXIT_FAILED if nobody or alarmed or any(map(_in_doubt, data.values())) else EXIT_OK
