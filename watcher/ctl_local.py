"""`watcherctl` commands acting on this host only: releases, local rollback, holds, exec, prune."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher import ids
from watcher.agent import CONVERGE_JOURNAL_NAME, read_journal
from watcher.barrier import DeployStore, still_uploading
from watcher.config import AppConfig
from watcher.consul_api import ConsulClient
from watcher.ctl import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    ONE_APP_HELP,
    REASON_MAX,
    CtlContext,
    artifact_id_argument,
    reason_argument,
    release_argument,
    table,
    user_at_host,
)
from watcher.errors import (
    ArtifactNotFound,
    ConfigError,
    ConsulError,
    DeployRefused,
    HookError,
    PayloadError,
    ReleaseError,
    ReleaseNotFound,
)
from watcher.fsutil import (
    INSTANCE_LOCK,
    named_watcher,
    process_started,
    signal_watcher,
    watcher_runs,
)
from watcher.hooks import (
    HOOK_MOVED_CURRENT,
    HookContext,
    current_moved,
    run_hooks,
    run_in_release,
)
from watcher.records import (
    COMMIT,
    ArtifactRecord,
    Decision,
    Keys,
    check_release,
    iso,
    release_name,
    utcnow,
)
from watcher.releases import (
    Hold,
    ReleaseEngine,
    ReleaseInfo,
    fleet_releases,
    prune_blocked_remedy,
)

if TYPE_CHECKING:  # boto3 is imported only by the commands that talk to S3
    from watcher.artifacts import ArtifactCache

#: How long a command that must ask Consul whether a deploy is decided keeps retrying.
CONSUL_CHECK_DEADLINE = 3.0
#: How long `prune` retries reading the fleet's `current` (it goes on without it).
PRUNE_CONSUL_DEADLINE = 1.0
#: Exit status of ``exec`` when the command cannot be started (like a shell).
EXIT_CANNOT_RUN = 127
DEFAULT_KEEP_DAYS = 7.0
LOCAL_ROLLBACK = "local rollback to "  # what a local rollback's hold says
EARLIER = "; earlier: "  # a hold over it keeps that reason after this
MAX_KEEP_DAYS = 36525  # a century: a pin that long is a mistake, a longer one overflows


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("releases", parents=[common], help="the releases staged on this host")
    p.add_argument("app", nargs="?", help=ONE_APP_HELP)
    p.set_defaults(func=cmd_releases)

    p = sub.add_parser(
        "hold", parents=[common], help="stop the watcher from deploying or converging this app here"
    )
    p.add_argument("app")
    p.add_argument(
        "--reason", default="", type=reason_argument, help="why (shown by status and releases)"
    )
    p.set_defaults(func=cmd_hold)

    p = sub.add_parser("release-hold", parents=[common], help="remove this host's hold on an app")
    p.add_argument("app")
    p.set_defaults(func=cmd_release_hold)

    p = sub.add_parser(
        "setup-release",
        parents=[common],
        help="stage an artifact here without flipping, pinned against prune",
    )
    p.add_argument("app")
    p.add_argument("artifact", type=artifact_id_argument, help="artifact id, e.g. master-15eb13af")
    p.add_argument(
        "--keep-days",
        type=_positive_days,
        default=DEFAULT_KEEP_DAYS,
        metavar="N",
        help=f"protect it from prune for N days (default {DEFAULT_KEEP_DAYS:g})",
    )
    p.add_argument(
        "--no-hooks",
        action="store_true",
        help="do not run the post_release hooks in the new release",
    )
    p.set_defaults(func=cmd_setup_release)

    p = sub.add_parser(
        "exec",
        parents=[common],
        usage="watcherctl exec APP [--release RELEASE] -- CMD [ARG ...]",
        help="run a command inside a release, with its WATCHER_* environment",
    )
    p.add_argument(
        "--release", type=release_argument, help="the release to run in (default: current)"
    )
    p.add_argument("app")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    options = argparse.ArgumentParser(prog="watcherctl exec", parents=[common], add_help=False)
    options.add_argument("--release", type=release_argument)
    options.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec, exec_options=options)

    p = sub.add_parser("prune", parents=[common], help="remove old releases on this host")
    p.add_argument("app")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(func=cmd_prune)


def _positive_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not 0 < days <= MAX_KEEP_DAYS:  # also refuses nan; inf overflowed the date maths
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_KEEP_DAYS} days, got {text!r}"
        )
    return days


def _engine(
    ctx: CtlContext, cache: ArtifactCache | None = None, *, command: str = ""
) -> ReleaseEngine:
    """The app's release engine, on the root the file names. ``command``: what this
    command does there that the running watcher must see (a hold, a flip, a prune): refused
    while that watcher still works on another root (``_root_waits_for_restart``)."""
    app = ctx.app(ctx.args.app)
    if command:
        _need_root(ctx, app, command)
    waiting = _root_waits_for_restart(ctx, app)
    if waiting and command:
        raise DeployRefused(f"{waiting}: {command} would act where it does not look")
    if waiting:
        print(f"watcherctl: warning: {waiting}: this shows the new root", file=sys.stderr)
    return ReleaseEngine(app, cache)


def _need_root(ctx: CtlContext, app: AppConfig, what: str) -> None:
    """Refuse ``what`` where the app's root does not exist: not a host of the app. A
    workstation's config (docs/acl.md: `root: /nonexistent`) held nothing: the hold went
    into a tree made for it under /, reported placed, obeyed by no one (the CLI review)."""
    if not Path(app.root).is_dir():
        raise ConfigError(
            ctx.config.source,
            [
                f"apps.{app.name}.root: {app.root} does not exist on this host, so this is "
                f"not a host of {app.name}: {what} belongs on a host that runs its "
                "watcher (on a new host, start the watcher first: it makes the tree)"
            ],
        )
    from watcher.daemon_cli import untrusted_app_dir

    if problem := untrusted_app_dir(app):  # as the watcher refuses to start there
        raise ConfigError(ctx.config.source, [problem])


def _root_waits_for_restart(ctx: CtlContext, app: AppConfig) -> str:
    """Why the running watcher does not work on the root the file names for ``app`` (its
    ``apps.<app>.root`` changed, and a reload keeps the root a watcher started with), or
    "". A hold placed on the new root was reported placed and never obeyed."""
    state_dir = Path(ctx.config.daemon.state_dir)
    if not watcher_runs(state_dir / INSTANCE_LOCK):
        return ""
    try:
        reload = json.loads((state_dir / "status.json").read_text()).get("reload") or {}
        waiting = list(reload.get("needs_restart") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        return ""
    if f"apps.{app.name}.root" not in waiting:
        return ""
    return (
        f"app {app.name}: the running watcher still works on the root it started with: "
        f"apps.{app.name}.root changed in the config and takes effect at its restart "
        "(`systemctl restart watcher`)"
    )


def _lock_owner(command: str) -> str:
    return f"watcherctl {command} by {user_at_host()} (pid {os.getpid()})"


def _journal_release(journal: dict[str, Any] | None) -> str | None:
    """The release of the deploy this host's journal (``read_journal``) is in: the
    journaled request's (the journal holds the request whole; its top level has no
    release, which this read before, so `releases` never marked the release in flight and
    prune did not keep it)."""
    if not journal or journal.get("finished") or journal.get("ended"):
        return None  # this host's part is over (the journal stays until the next deploy)
    request = journal.get("request")
    release = request.get("release") if isinstance(request, dict) else None
    return release if isinstance(release, str) and release else None


def _converge_journal(engine: ReleaseEngine) -> tuple[str, str, list[str]] | None:
    """(deploy, release, phases) of the convergence this host's watcher is catching up
    with (``.state/converge.json``: a committed deploy staged and flipped without a
    barrier), or None."""
    journal = read_journal(engine.layout.state_dir, CONVERGE_JOURNAL_NAME)
    release = journal.get("release") if journal else None
    if not journal or not isinstance(release, str) or not release:
        return None
    return str(journal.get("deploy") or ""), release, list(journal.get("phases") or [])


def _releases_in_flight(engine: ReleaseEngine) -> set[str]:
    """The releases this host's deploy and convergence journals are working on."""
    converging = _converge_journal(engine)
    deploying = _journal_release(read_journal(engine.layout.state_dir))
    return {r for r in (deploying, converging and converging[1]) if r}


# --- releases ----------------------------------------------------------------------------


def cmd_releases(ctx: CtlContext) -> int:
    engine = _engine(ctx)
    in_flight = _releases_in_flight(engine)
    now = utcnow()
    rows = []
    for info in engine.list_releases():
        row = info.to_dict()
        row["in_flight"] = info.release in in_flight
        row["markers"] = _markers(info, in_flight, now)
        rows.append(row)

    def human(items: list[dict[str, Any]]) -> str:
        if items:
            cells = [
                [
                    r["release"],
                    r["artifact"] or "-",
                    r["staged_at"] or "-",
                    ", ".join(r["markers"]) or "-",
                    _human_size(r["size_bytes"]) if r["complete"] else "-",
                ]
                for r in items
            ]
            text = table(cells, ["RELEASE", "ARTIFACT", "STAGED AT", "MARKERS", "SIZE"])
        else:
            text = f"no releases of {engine.app.name} under {engine.layout.releases_dir}"
        hold = engine.held()
        if hold is not None:
            text += f"\nheld on this host: {hold.reason} (by {hold.by})"
        return text

    ctx.emit(rows, human)
    return EXIT_OK


def _markers(info: ReleaseInfo, in_flight: set[str], now: datetime) -> list[str]:
    out = []
    if info.is_current:
        out.append("current")
    if info.is_previous:
        out.append("previous")
    if info.is_backup:
        out.append("backup")
    if info.pinned_until:
        try:
            expired = datetime.fromisoformat(info.pinned_until.replace("Z", "+00:00")) <= now
        except ValueError:
            expired = False
        out.append(
            f"pin expired {info.pinned_until}" if expired else f"pinned until {info.pinned_until}"
        )
    if not info.complete:
        out.append("incomplete")
    elif info.kept_for_resume:
        out.append("post_release not run")
    if info.release in in_flight:
        out.append("in-flight")
    return out


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


# --- hold / release-hold -----------------------------------------------------------------


def _refuse_if_ready_undecided(ctx: CtlContext, engine: ReleaseEngine, action: str) -> None:
    """Refuse while this host has acked ready in a deploy that is not decided, or that is
    committed and not yet flipped here.

    A hold then would be overtaken by the commit (the daemon applies a committed deploy it
    acked regardless of holds); if Consul cannot be asked, we cannot know, so refuse too.
    """
    journal = read_journal(engine.layout.state_dir)
    if not journal or journal.get("finished") or journal.get("ended"):
        return  # no deploy, or this host's part in the last one is over
    deploy = str(journal["deploy"])
    phases = journal.get("phases") or []
    app = engine.app.name
    if "post_release" not in phases:
        print(
            f"watcherctl: warning: this host is preparing deploy {deploy} of {app} "
            f"(phases done: {', '.join(map(str, phases)) or 'none'}); its watcher looks for "
            "a hold again just before it acks, and then refuses that deploy (held), which "
            "aborts it for the whole fleet; a host that acked ready first takes part in it "
            "(`watcherctl status` shows which)",
            file=sys.stderr,
        )
        return
    key = Keys(ctx.config.kv_prefix, app).decision(deploy)
    consul = ConsulClient(
        ctx.config.consul,
        retry_deadline=CONSUL_CHECK_DEADLINE,
        on_retry=ctx.consul_retry_notice,
    )
    try:
        entry = consul.kv_get(key)
    except ConsulError as exc:
        raise DeployRefused(
            f"cannot {action} {app}: this host is ready in deploy {deploy} and whether it "
            f"is decided cannot be checked ({exc}); retry when Consul is reachable"
        ) from exc
    finally:
        consul.close()
    if entry is None:
        raise DeployRefused(
            f"cannot {action} {app}: this host is ready in deploy {deploy}, which is not "
            f"decided yet (no {key}); wait for it, or `watcherctl abort {deploy}`"
        )
    try:
        committed = Decision.from_json(entry.value, where=key).outcome == COMMIT
    except PayloadError:
        committed = True  # cannot tell: assume the worst
    if committed and "flipped" not in phases:
        # The daemon is about to flip to the committed release: a hold or a local flip now
        # would be overtaken by it.
        raise DeployRefused(
            f"cannot {action} {app}: deploy {deploy} is committed and this host is applying "
            "it; retry once it is live (`watcherctl status`)"
        )


def cmd_hold(ctx: CtlContext) -> int:
    engine = _engine(ctx, command="a hold")
    by = user_at_host()
    reason = ctx.args.reason or "no reason given"  # who placed it is kept beside it (by)
    with engine.lock(owner=_lock_owner("hold")):
        _refuse_if_ready_undecided(ctx, engine, "hold")
        replaced = engine.held()
        if replaced is not None and LOCAL_ROLLBACK in replaced.reason:
            # The host is off the fleet's release by hand: that stays said, or `status`
            # and `release-hold` would give only the new reason (the operator review).
            # Once: a hold over such a hold keeps what that one kept, not itself as well.
            _, kept, earlier = replaced.reason.partition(EARLIER)
            reason = f"{reason}{EARLIER}{earlier if kept else _bounded_reason(replaced)}"
        hold = engine.hold(reason, by)
    data = {
        "app": engine.app.name,
        "hold": hold.to_dict(),
        "replaced": replaced.to_dict() if replaced else None,
        "watcher_told": _tell_watcher(engine),
    }

    def human(d: dict[str, Any]) -> str:
        lines = [f"hold placed on {d['app']} on this host: {hold.reason} (by {hold.by})"]
        if replaced:
            lines.append(f"  replaced the hold: {replaced.reason} (by {replaced.by})")
        lines.append(
            f"  the watcher leaves {d['app']} alone here until `watcherctl release-hold {d['app']}`"
        )
        lines.append(_told_line(d["watcher_told"]))
        return "\n".join(lines)

    ctx.emit(data, human)
    return EXIT_OK


def cmd_release_hold(ctx: CtlContext) -> int:
    engine = _engine(ctx, command="releasing a hold")
    with engine.lock(owner=_lock_owner("release-hold")):
        removed = engine.release_hold()
    data = {
        "app": engine.app.name,
        "released": removed.to_dict() if removed else None,
        "watcher_told": _tell_watcher(engine) if removed else False,
        # Not held here: where it is, by the host records (run on the wrong host, it only
        # said "not held on this host").
        "held_elsewhere": _held_elsewhere(ctx, engine.app.name) if removed is None else {},
    }

    def human(d: dict[str, Any]) -> str:
        if removed is None:
            said = f"{d['app']} was not held on this host"
            if d["held_elsewhere"]:
                held = "; ".join(f"{n}: {why}" for n, why in sorted(d["held_elsewhere"].items()))
                said += f"; held, by their host records, on {held} (run it there)"
            return said
        return (
            f"hold on {d['app']} released ({removed.reason}, by {removed.by}); the watcher "
            f"converges it to the fleet's release again\n{_told_line(d['watcher_told'])}"
        )

    ctx.emit(data, human)
    return EXIT_OK


def _held_elsewhere(ctx: CtlContext, app: str) -> dict[str, str]:
    """The other hosts whose records show a hold on ``app``, each with its reason (short);
    {} when Consul does not answer within a few seconds: a hint, not the command's work."""
    from watcher.ctl_fleet import _consul, daemon_status

    node = ctx.config.node or daemon_status(ctx.config.daemon.state_dir).get("node")
    try:
        hosts = DeployStore(_consul(ctx, quick=True), ctx.config.kv_prefix, app).hosts()
    except (ConsulError, PayloadError):
        return {}
    return {n: ids.one_line_short(r.hold) for n, r in hosts.items() if r.hold and n != node}


def _tell_watcher(engine: ReleaseEngine) -> bool:
    """Ask the watcher running this app (if any) to look now: its host record, which
    `deploy` and `status --fleet` read, then shows a hold or its release at once, not at
    its next idle tick (15 s)."""
    return signal_watcher(engine.layout.state_dir / INSTANCE_LOCK, signal.SIGUSR1) is not None


def _told_line(told: bool) -> str:
    if told:
        # Told, not seen: the record is written by the watcher, once Consul takes it (a
        # hung agent: not for a while; `status --fleet` shows when).
        return (
            "  told the running watcher: it writes it into its host record, which `deploy` "
            "and `status --fleet` read, as soon as Consul takes it"
        )
    return (
        "  no running watcher here could be told (none runs, or it is another user's): the "
        "fleet sees it in the host record when the watcher next looks (within 15 s)"
    )


# --- rollback --local --------------------------------------------------------------------


def _refuse_hook_while_preparing(engine: ReleaseEngine, target: str) -> None:
    """The post_release hook runs under the app's lock (a prune must not take its tree
    meanwhile), for up to the hook timeout; a deploy this host is preparing needs that
    lock to stage and gives up after ``locks.timeout`` (failing the deploy everywhere).
    So not while one is being prepared here. A journal left by a watcher that is not
    running (stopped or crashed while it prepared a deploy) is no deploy preparing now:
    that watcher works it off when it starts, and stopped is when an operator reaches for
    `rollback --local`."""
    journal = read_journal(engine.layout.state_dir)
    if not journal or journal.get("finished") or journal.get("ended"):
        return
    if "post_release" in (journal.get("phases") or []):
        return  # past its staging (and refused earlier if ready and undecided)
    if not watcher_runs(engine.layout.state_dir / INSTANCE_LOCK):
        return
    raise DeployRefused(
        f"cannot roll back {engine.app.name} to {target} now: its post_release hook has "
        f"never run on this host and would hold the app's lock while it runs, and this "
        f"host is preparing deploy {journal.get('deploy')}, whose staging here needs that "
        "lock (waiting for it longer than the lock timeout fails the deploy on every host); "
        "wait for that deploy to end (or `watcherctl abort` it), or roll back to a release "
        "whose post_release already ran here (`watcherctl releases` marks them)"
    )


def _refuse_while_validating(engine: ReleaseEngine) -> None:
    """A running watcher between its flip and its live (or failed) ack is running the
    hooks after the switch (post_symlink, validate): a local flip then ran a second
    validate beside the deploy's, and the host ended failed after commit (the operator
    review). Not when no watcher runs: it works the journal off when it starts."""
    state_dir = engine.layout.state_dir
    journal = read_journal(state_dir) or {}
    phases = journal.get("phases") or []
    deploy = (
        not journal.get("finished")
        and not journal.get("ended")
        and "flipped" in phases
        and "applied" not in phases
    )
    # A convergence to a committed deploy (after a release-hold, say) runs them too; one
    # whose hooks failed waits to try again: a local rollback then is the way out.
    # A journal of a watcher process that is gone (killed mid-try, the host held since so
    # that no try follows) is no convergence running: refused for good, it said "retry".
    lock = state_dir / INSTANCE_LOCK
    converge = read_journal(state_dir, CONVERGE_JOURNAL_NAME) or {}
    pid = named_watcher(lock)
    converging = (
        "flipped" in (converge.get("phases") or [])
        and not converge.get("hooks_failed")
        and pid is not None
        and (converge.get("pid"), converge.get("pid_started")) == (pid, process_started(pid))
    )
    if not (deploy or converging) or not watcher_runs(lock):
        return
    what = (
        f"has switched to deploy {journal.get('deploy')}'s release"
        if deploy
        else f"is converging to {converge.get('release')} (deploy {converge.get('deploy')})"
    )
    raise DeployRefused(
        f"cannot roll back {engine.app.name} now: this host {what} and its watcher is "
        "running the hooks after the switch (post_symlink, validate); a local rollback "
        "would run beside them. Retry once `watcherctl status` shows this host live or "
        "failed"
    )


def rollback_local(ctx: CtlContext) -> int:
    """Flip this host only to ``--to`` (default: the previous release) and hold it there."""
    engine = _engine(ctx, command="a local rollback")
    app = engine.app
    by = user_at_host()
    with engine.lock(owner=_lock_owner("rollback --local")):
        _refuse_if_ready_undecided(ctx, engine, "roll back")
        _refuse_while_validating(engine)
        before = engine.current_release()
        target = ctx.args.to or engine.previous_release()
        if target is None:
            others = [r for r in engine.release_names() if r != before and engine.is_complete(r)]
            if not others:
                # "name one with --to (see releases)" sent a newcomer to an empty list.
                raise ReleaseNotFound(
                    f"app {app.name}: no release to roll back to on this host"
                    + (f" (only {before}, the live one)" if before else " (none staged yet)")
                )
            raise ReleaseNotFound(
                f"app {app.name}: no previous release recorded on this host; name one with "
                f"--to (see `watcherctl releases {app.name}`)"
            )
        _check_target(engine, target)
        # A release an aborted deploy staged never ran its post_release hook here: what it
        # needs before it serves (the flip of a deploy runs it first, so does convergence).
        # Before the hold and the flip: if it fails, nothing changed.
        prepared = "done before"
        if before != target and not engine.post_release_done(target):
            _refuse_hook_while_preparing(engine, target)
            ctx_hooks = _hook_context(engine, target, kind="rollback-local", previous=before)
            try:
                run_hooks(app, "post_release", ctx_hooks)
            except HookError as exc:
                raise ReleaseError(
                    f"app {app.name}: refusing to roll back to {target}: its post_release "
                    f"hook had never run on this host, and it failed now: {exc}; nothing "
                    "changed (no flip, no hold)"
                    + (f"\n{exc.output_tail}" if exc.output_tail else "")
                ) from None
            engine.mark_post_release_done(target)
            prepared = "ran before the flip (it had never run on this host)"
        # Hold first: if the flip then fails, the host is held where it was (and says so);
        # the other way round a failed hold would leave a flip the daemon undoes at once.
        previous_hold = engine.held()
        hold = engine.hold(_local_rollback_reason(previous_hold, target), by)
        if before != target:
            try:
                engine.flip(target)
            except ReleaseError:
                if previous_hold is None:
                    engine.release_hold()
                else:  # the hold that was there, as it was (its time is now's)
                    engine.hold(previous_hold.reason, previous_hold.by)
                raise
    data = {
        "app": app.name,
        "from": before,
        "to": target,
        "flipped": before != target,
        "hold": hold.to_dict(),
        "previous_hold": previous_hold.to_dict() if previous_hold else None,
        "hooks": "ok",
        "post_release": prepared if before != target else "not run (no flip)",
        "watcher_told": False,
    }
    code = EXIT_OK
    if before != target:
        try:
            _run_after_flip(app, engine, target, before)
        except KeyboardInterrupt:
            # Only "interrupted" was said, of a host already flipped and held (the operator
            # review): where it was left, and how to undo it.
            _tell_watcher(engine)
            print(
                f"watcherctl: interrupted during the hooks after the flip: this host is on "
                f"{target} and held ({hold.reason}); the hooks did not finish. `watcherctl "
                f"release-hold {app.name}` gives it back to the fleet",
                file=sys.stderr,
            )
            raise
        except HookError as exc:
            data["hooks"] = str(exc)
            data["output_tail"] = exc.output_tail
            code = EXIT_FAILED
    data["watcher_told"] = _tell_watcher(engine)  # after the hooks: the record names both

    def human(d: dict[str, Any]) -> str:
        what = (
            f"{app.name}: rolled back this host from {before or '-'} to {target}"
            if d["flipped"]
            else f"{app.name}: this host is already on {target}"
        )
        lines = [
            what,
            f"  hold placed: {hold.reason}",
            f"  the watcher leaves {app.name} alone here until "
            f"`watcherctl release-hold {app.name}`",
        ]
        if d["post_release"].startswith("ran "):
            lines.insert(1, f"  post_release hook: {d['post_release']}")
        if d["hooks"] != "ok":
            lines.append(f"  hook FAILED after the flip: {d['hooks']}")
            if d.get("output_tail"):
                lines.append("  " + d["output_tail"].replace("\n", "\n  "))
        lines.append(_told_line(d["watcher_told"]))
        return "\n".join(lines)

    ctx.emit(data, human)
    return code


def _local_rollback_reason(previous: Hold | None, target: str) -> str:
    """The reason of the hold a local rollback places. A hold already on the host (an
    operator's `hold --reason`, or an earlier local rollback) stays in it, with who placed
    it: `release-hold` and `status` must still say why the host was held in the first place.
    """
    reason = f"{LOCAL_ROLLBACK}{target}"
    if previous is None:
        return reason
    return f"{_bounded_reason(previous)}; then {reason}"


def _bounded_reason(hold: Hold) -> str:
    """An earlier hold's reason and who placed it, as a later hold's reason keeps them:
    bounded, as each local rollback on a held host adds to it (it grew without end)."""
    by = f" (by {hold.by})" if hold.by else ""
    if len(hold.reason) <= REASON_MAX:
        return f"{hold.reason}{by}"
    return f"{hold.reason[:REASON_MAX]} [cut]{by}"


def _check_target(engine: ReleaseEngine, target: str) -> None:
    app = engine.app.name
    try:
        check_release(target)
    except PayloadError as exc:
        raise ReleaseNotFound(f"app {app}: {exc}") from None
    path = engine.layout.release_dir(target)
    if not path.is_dir():
        staged = [r.release for r in engine.list_releases() if r.complete]
        raise ReleaseNotFound(
            f"app {app}: no release {target} at {path} (staged here: {', '.join(staged) or 'none'})"
        )
    if not engine.is_complete(target):
        raise ReleaseError(
            f"app {app}: refusing {target}: {path} is incomplete (no valid .watcher/release.json)"
        )


def _run_after_flip(app: AppConfig, engine: ReleaseEngine, target: str, before: str | None) -> None:
    """The post_symlink and validate hooks, as after any flip (DESIGN.md section 7)."""
    ctx = _hook_context(engine, target, kind="rollback-local", previous=before)
    for phase in ("post_symlink", "validate"):
        run_hooks(app, phase, ctx)
        # As the watcher checks after its own flips: a hook that switched `current` left
        # this host elsewhere than this command says (the session's review).
        if (now := engine.current_release()) != target:
            raise current_moved(phase, "(the app's hooks)", now, target, HOOK_MOVED_CURRENT)


def _branch(value: object) -> object:
    """A branch as an artifact record may hold it: printable text within the record's
    own limit."""
    if not isinstance(value, str) or len(value) > ArtifactRecord.TEXT_LIMITS["branch"]:
        raise PayloadError("not a branch")
    return ids.check_free_text(value)


def _hook_context(
    engine: ReleaseEngine, release: str, *, kind: str, previous: str | None
) -> HookContext:
    lay = engine.layout
    info = engine.release_info(release) or {}

    def said(key: str, check: Callable[[object], object]) -> str:
        # release.json is in the tree the app's user owns: a value as the watcher writes
        # it (the rules of the record it came from), else nothing. A NUL, a lone surrogate
        # or 128 KiB made the hook's start fail (the reviews).
        value = info.get(key)
        try:
            check(value)
        except PayloadError:  # ids' InvalidName too
            return ""
        return value if isinstance(value, str) else ""

    return HookContext(
        app=engine.app.name,
        deploy_id=said("deploy_id", ids.check_deploy_id),
        kind=kind,
        artifact=said("artifact", ids.check_artifact_id),
        # as staged (a tree staged before release.json kept them has neither)
        commit=said("commit", lambda v: v == "" or ids.check_commit(v)),
        branch=said("branch", _branch),
        release=release,
        release_dir=str(lay.release_dir(release)),
        previous_release_dir=str(lay.release_dir(previous)) if previous else "",
        current=str(lay.current),
        current_backup=str(lay.current_backup),
    )


# --- setup-release -----------------------------------------------------------------------


def cmd_setup_release(ctx: CtlContext) -> int:
    config = ctx.config
    app = ctx.app(ctx.args.app)
    # Before Consul or S3 is asked: a workstation's config would otherwise download the
    # artifact into a tree made for it and pin a release no watcher will ever serve.
    _need_root(ctx, app, "setup-release")
    if waiting := _root_waits_for_restart(ctx, app):
        raise DeployRefused(
            f"{waiting}: staging and pinning a release would act where it does not look"
        )
    consul = ConsulClient(config.consul, on_retry=ctx.consul_retry_notice)
    try:
        store = DeployStore(consul, config.kv_prefix, app.name)
        record = store.artifact(ctx.args.artifact)
        slip = "" if record else ids.release_name_slip(ctx.args.artifact, store.artifact)
    finally:
        consul.close()
    if record is None:
        key = Keys(config.kv_prefix, app.name).artifact(ctx.args.artifact)
        message = f"app {app.name}: unknown artifact {ctx.args.artifact} (no record at {key})"
        raise ArtifactNotFound(f"{message}: {slip}" if slip else message)
    if record.uploading:
        raise DeployRefused(f"app {app.name}: {still_uploading(record)}")
    from watcher.artifacts import ArtifactCache
    from watcher.s3 import S3Store

    cache = ArtifactCache(
        app.app_dir,
        S3Store(config.s3),
        max_bytes=app.artifact_cache_bytes,
        timeout=app.timeouts.download,
        app=app.name,
    )
    engine = ReleaseEngine(app, cache)
    now = utcnow()
    keep_until = now + timedelta(days=ctx.args.keep_days)
    reused = _staged_release_of(engine, record)
    if reused is None:
        # The slow part, outside the app lock; the engine keeps the artifacts of the live,
        # previous and pinned releases out of the cache's eviction.
        engine.fetch(record)
    with engine.lock(owner=_lock_owner("setup-release")):
        info = engine.release_info(reused.release) if reused is not None else None
        if reused is not None and (info is None or info.get("sha256") != record.sha256):
            reused = None  # pruned meanwhile: stage it after all
            engine.fetch(record)
        if reused is None:
            release = release_name(now, record.id)
            path = engine.stage(record, release, "setup-release")
        else:
            # The same bytes are already staged: a second copy would only fill the disk.
            # Its pin is extended, never shortened.
            release, path = reused.release, engine.layout.release_dir(reused.release)
            pinned = engine.pinned_until(release)
            keep_until = max(keep_until, pinned) if pinned is not None else keep_until
        engine.pin(release, keep_until)
    post_done = reused is not None and reused.post_release_done
    preparing = _preparing_deploy_of(engine, release) if not post_done else ""
    data: dict[str, Any] = {
        "app": app.name,
        "artifact": record.id,
        "release": release,
        "path": str(path),
        "pinned_until": iso(keep_until),
        "reused": reused is not None,
        "post_release": (
            "skipped"
            if ctx.args.no_hooks
            else "done before"
            if post_done
            else f"left to this host's watcher, which is preparing deploy {preparing} of this "
            "release and runs it there (if that deploy ends before its hook runs, run "
            "setup-release again)"
            if preparing
            else "ok"
        ),
    }
    code = EXIT_OK
    if not ctx.args.no_hooks and not post_done and not preparing:
        try:
            run_hooks(
                app,
                "post_release",
                _hook_context(
                    engine, release, kind="setup-release", previous=engine.current_release()
                ),
            )
            engine.mark_post_release_done(release)
        except HookError as exc:
            data["post_release"] = str(exc)
            data["output_tail"] = exc.output_tail
            code = EXIT_FAILED

    def human(d: dict[str, Any]) -> str:
        if code != EXIT_OK:
            tail = ("\n  " + d["output_tail"].replace("\n", "\n  ")) if d.get("output_tail") else ""
            return (
                f"staged {d['release']} at {d['path']} (pinned until {d['pinned_until']}), "
                f"but its post_release hook FAILED: {d['post_release']}{tail}"
            )
        if d["reused"]:  # stdout stays the path, for scripts
            print(
                f"watcherctl: {d['release']} already holds these bytes: reused, pinned until "
                f"{d['pinned_until']} (post_release: {d['post_release']})",
                file=sys.stderr,
            )
        return str(d["path"])

    ctx.emit(data, human)
    return code


def _preparing_deploy_of(engine: ReleaseEngine, release: str) -> str:
    """The deploy this host's running watcher is preparing on ``release`` and has not run
    its post_release hook for yet, or "": the race review's setup-release of the build
    being deployed ran a second post_release on the same tree at the same time (two
    migrations at once)."""
    if not watcher_runs(engine.layout.state_dir / INSTANCE_LOCK):
        return ""
    converging = _converge_journal(engine)
    if converging and converging[1] == release and "post_release" not in converging[2]:
        # a convergence runs post_release without the app's lock, as a deploy does
        return f"{converging[0]} (catching up with it)"
    journal = read_journal(engine.layout.state_dir)
    if journal is None or _journal_release(journal) != release:
        return ""  # no deploy, this host's part in it over, or another release's
    if "post_release" in (journal.get("phases") or []):
        return ""
    return str(journal.get("deploy") or "")


def _staged_release_of(engine: ReleaseEngine, record: ArtifactRecord) -> ReleaseInfo | None:
    """The newest complete release of ``record``'s artifact and bytes on this host."""
    for info in reversed(engine.list_releases()):
        if info.complete and info.artifact == record.id and info.sha256 == record.sha256:
            return info
    return None


# --- exec --------------------------------------------------------------------------------


def _exec_arguments(ctx: CtlContext) -> list[str]:
    """Options given between APP and ``--`` are parsed too; returns the command."""
    command: list[str] = list(ctx.args.command)
    if command and command[0].startswith("-") and command[0] != "--":
        options: argparse.ArgumentParser = ctx.args.exec_options
        parsed = options.parse_args(command)
        for dest, value in vars(parsed).items():
            if dest != "command" and value != options.get_default(dest):
                setattr(ctx.args, dest, value)
        command = list(parsed.command)
    if command[:1] == ["--"]:
        command = command[1:]
    return command


@contextlib.contextmanager
def _release_open(engine: ReleaseEngine, release: str) -> Iterator[Path]:
    """Hold the release directory open: prune treats an open release as in use."""
    path = engine.layout.release_dir(release)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield path
    finally:
        os.close(fd)


def cmd_exec(ctx: CtlContext) -> int:
    command = _exec_arguments(ctx)
    if not command:
        print(
            "watcherctl exec: error: no command given (usage: watcherctl exec APP "
            "[--release RELEASE] -- CMD [ARG ...])",
            file=sys.stderr,
        )
        return EXIT_USAGE
    _need_root(ctx, ctx.app(ctx.args.app), "exec")  # (its lock would make the tree)
    engine = _engine(ctx)
    app = engine.app
    with contextlib.ExitStack() as stack:
        with engine.lock(owner=_lock_owner("exec")):
            release = ctx.args.release or engine.current_release()
            if release is None:
                raise ReleaseNotFound(
                    f"app {app.name}: no current release on this host; pick one with --release"
                )
            _check_target(engine, release)
            path = stack.enter_context(_release_open(engine, release))
        env = _hook_context(
            engine, release, kind="exec", previous=engine.previous_release()
        ).environ("exec")
        try:
            return run_in_release(app, path, command, env)
        except HookError as exc:
            print(f"watcherctl: error: {exc}", file=sys.stderr)
            return EXIT_CANNOT_RUN


# --- prune -------------------------------------------------------------------------------


def _fleet_releases(ctx: CtlContext, app: AppConfig) -> tuple[dict[str, str], str]:
    """What the fleet's ``current`` names (``fleet_releases``), read quickly; and why it
    could not be read ("" when it was): a prune to free a full disk must not wait on a
    Consul that is away, nor fail for it."""
    consul = ConsulClient(ctx.config.consul, retry_deadline=PRUNE_CONSUL_DEADLINE)
    try:
        current, _ = DeployStore(consul, ctx.config.kv_prefix, app.name).current()
    except (ConsulError, PayloadError) as exc:
        return {}, str(exc)
    finally:
        consul.close()
    return fleet_releases(current), ""


def cmd_prune(ctx: CtlContext) -> int:
    dry_run = bool(ctx.args.dry_run)
    engine = _engine(ctx, command="" if dry_run else "a prune")
    # A dry run writes nothing, not even the lock file (a user who may not write the app's
    # .state/ can still ask): it plans without the lock, and a real prune plans again
    # under it.
    fleet, fleet_unread = _fleet_releases(ctx, engine.app)
    if fleet_unread:
        print(
            f"watcherctl: warning: the fleet's release and rollback target could not be read "
            f"({fleet_unread}): only this host's own current and previous are kept for them",
            file=sys.stderr,
            flush=True,
        )
    lock = contextlib.nullcontext() if dry_run else engine.lock(owner=_lock_owner("prune"))
    with lock:
        plan = engine.plan_prune(in_flight=_releases_in_flight(engine), fleet=fleet)
        # the plan shown is the plan carried out: one /proc scan, under the lock
        removed = engine.prune(dry_run=dry_run, plan=plan)  # [] when the plan is blocked
    data = {
        "app": engine.app.name,
        "dry_run": dry_run,
        "blocked": plan.blocked,
        "removed": removed,
        "kept": dict(sorted(plan.keep.items())),
        "held_back": list(plan.held_back),
        "prefetched_removed": list(plan.remove_prefetched),
        "remedy": prune_blocked_remedy(engine.app.name) if plan.blocked else None,
    }

    def human(d: dict[str, Any]) -> str:
        verb = "would remove" if dry_run else "removed"
        if d["blocked"]:
            lines = [
                f"prune of {d['app']} blocked, no release removed: {d['blocked']}",
                f"held back (would go once every process can be read): "
                f"{', '.join(d['held_back']) or 'nothing'}",
                f"to unblock: {ctx.with_config(prune_blocked_remedy(d['app']))}",
            ]
        else:
            lines = [f"{verb}: {', '.join(d['removed']) or 'nothing'}"]
        if d["prefetched_removed"]:
            lines.append(f"{verb} pre-extracted: {', '.join(d['prefetched_removed'])}")
        if d["kept"]:
            lines.append("kept:")
            lines.append(
                table([[name, why] for name, why in d["kept"].items()], ["RELEASE", "WHY"])
            )
        return "\n".join(lines)

    ctx.emit(data, human)
    return EXIT_REFUSED if plan.blocked else EXIT_OK
