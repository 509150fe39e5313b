"""`watcherctl publish`: the CI entry point (Buildkite's variables give the defaults)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from watcher.config import APP_NAME_RE, APP_NAME_RULE, parse_duration
from watcher.ctl import (
    CtlContext,
    artifact_id_argument,
    commit_argument,
    free_text_argument,
    user_at_host,
)
from watcher.errors import ConfigError, PayloadError
from watcher.ids import ARTIFACT_ID_RULE, check_commit, shown
from watcher.records import CUT_MARK, MANIFEST_PATH


def branch_argument(text: str) -> str:
    """A branch name: free text (``free_text_argument``), and no tab either (git refuses
    one in a ref name; the name goes into the artifact id, KV, the web page and chat)."""
    try:
        if "\t" in text:
            raise argparse.ArgumentTypeError("tab")
        return free_text_argument(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"invalid branch {shown(text)}: control characters or bytes that are not UTF-8"
        ) from None


branch_argument.__name__ = "branch"


def build_url_argument(text: str) -> str:
    """The CI build's URL: free text that is an http(s) URL with a host and no whitespace,
    or empty. The web page and chat messages make a link of it."""
    free_text_argument(text)
    if not text:
        return text
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme.lower() not in ("http", "https")
        or not parts.netloc
        or any(c.isspace() for c in text)
    ):
        raise argparse.ArgumentTypeError(f"must be an http(s) URL or empty, got {shown(text)}")
    return text


build_url_argument.__name__ = "build URL"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "publish",
        parents=[common],
        help="build, upload and announce an artifact (used by CI)",
        description=(
            f"Build a reproducible tarball of DIR following DIR/{MANIFEST_PATH} (include and "
            "exclude globs; everything but .git and .buildkite when absent), upload it to S3 "
            "with its "
            "sha256, write the artifact record to Consul KV and fire build-finished. The "
            "artifact id is <branch>-<first 8 of the commit>. Publishing the same tree "
            "again is a no-op; other content under an existing id is refused. Flags left "
            "out default to $BUILDKITE_BRANCH, $BUILDKITE_COMMIT, $BUILDKITE_BUILD_NUMBER "
            "and $BUILDKITE_BUILD_URL."
        ),
    )
    p.add_argument("app", metavar="APP", help="the app the artifact belongs to")
    p.add_argument("dir", metavar="DIR", help="the directory to package")
    p.add_argument(
        "--branch", type=branch_argument, help="branch built (default $BUILDKITE_BRANCH)"
    )
    p.add_argument(
        "--commit",
        type=commit_argument,
        help="the full commit SHA built (default $BUILDKITE_COMMIT)",
    )
    p.add_argument(
        "--build-number",
        type=free_text_argument,
        help="CI build number (default $BUILDKITE_BUILD_NUMBER)",
    )
    p.add_argument(
        "--build-url",
        type=build_url_argument,
        help="CI build URL, http(s) or empty (default $BUILDKITE_BUILD_URL)",
    )
    p.add_argument(
        "--artifact-id",
        type=artifact_id_argument,
        help=f"use this id instead of <branch>-<commit[:8]> ({ARTIFACT_ID_RULE})",
    )
    p.add_argument(
        "--retry-for",
        default="30s",
        metavar="DURATION",
        help="keep retrying an unreachable Consul or S3 this long (default 30s); one S3 "
        "request that gets no answer is given up after this long too (at least 5s)",
    )
    p.set_defaults(func=run_publish)


def created_by(env: Mapping[str, str]) -> str:
    """Who built it: inside a Buildkite job the build's creator (``Name <email> via
    buildkite:<pipeline>#<build>``, or only the build when Buildkite names nobody), else
    ``user@host`` (in CI that would be the agent's account, not a person)."""
    name = " ".join(env.get("BUILDKITE_BUILD_CREATOR", "").split())
    email = " ".join(env.get("BUILDKITE_BUILD_CREATOR_EMAIL", "").split())
    who = " ".join(part for part in (name, f"<{email}>" if email else "") if part)
    if env.get("BUILDKITE") == "true" or who:
        pipeline = env.get("BUILDKITE_PIPELINE_SLUG") or "unknown-pipeline"
        number = env.get("BUILDKITE_BUILD_NUMBER", "").strip()
        build = f"buildkite:{pipeline}#{number}" if number else f"buildkite:{pipeline}"
        return f"{who} via {build}" if who else build
    return user_at_host()


def _from_env(
    env: Mapping[str, str],
    name: str,
    check: Callable[[str], str],
    problems: list[str],
) -> str | None:
    """``$name`` (Buildkite's default for an option left out) checked like the option;
    None, with the problem added to ``problems``, when it does not pass."""
    value = env.get(name, "")
    try:
        return check(value)
    except argparse.ArgumentTypeError as exc:
        problems.append(f"${name}: {exc}")
        return None


def run_publish(ctx: CtlContext) -> int:
    args = ctx.args
    env = os.environ
    problems: list[str] = []
    branch = args.branch
    if branch is None:
        branch = _from_env(env, "BUILDKITE_BRANCH", branch_argument, problems)
    build_number = args.build_number
    if build_number is None:
        build_number = _from_env(env, "BUILDKITE_BUILD_NUMBER", free_text_argument, problems)
    build_url = args.build_url
    if build_url is None:
        build_url = _from_env(env, "BUILDKITE_BUILD_URL", build_url_argument, problems)
    commit = args.commit if args.commit is not None else env.get("BUILDKITE_COMMIT", "")
    if args.commit is None and commit:
        try:
            check_commit(commit)
        except PayloadError as exc:
            problems.append(f"$BUILDKITE_COMMIT: {exc}")
    if args.artifact_id is None:
        if branch == "":
            problems.append("--branch (or $BUILDKITE_BRANCH) is required without --artifact-id")
        if not commit:
            problems.append("--commit (or $BUILDKITE_COMMIT) is required without --artifact-id")
    try:
        retry_for = parse_duration(args.retry_for)
    except ValueError:
        problems.append(f'--retry-for must be a duration like "30s", got "{args.retry_for}"')
        retry_for = 30.0
    # `publish DIR APP`: said as such, before a warning that it publishes to app DIR.
    # Not when APP is one of the config's apps: `publish web dist` with dist/ missing (a
    # failed build) and a web/ source directory is no swap.
    swapped = (
        APP_NAME_RE.match(args.dir)
        and not os.path.lexists(args.dir)
        and Path(args.app).is_dir()
        and args.app not in ctx.config.apps
    )
    hint = (
        f": APP comes first (watcherctl publish {args.dir} {shlex.quote(args.app)})"
        if swapped
        else ""
    )
    if not APP_NAME_RE.match(args.app):
        problems.insert(0, f"{args.app!r} is not an app name ({APP_NAME_RULE}){hint}")
    elif swapped:
        problems.insert(
            0, f"DIR {args.dir!r} does not exist and APP {args.app!r} is a directory{hint}"
        )
    if problems:
        raise ConfigError("watcherctl publish", problems)
    apps = ctx.config.apps
    if apps and args.app not in apps:
        # A CI config may list no app at all (publish needs none); one that lists some and
        # not this one is, most often, a typo that would publish where no host looks.
        print(
            f"watcherctl: warning: no app {args.app!r} in {ctx.config.source} (configured: "
            f"{', '.join(sorted(apps))}); hosts prefetch and deploy only the apps in their "
            f"own config: publishing to {ctx.config.kv_prefix}/apps/{args.app}/ all the same",
            file=sys.stderr,
            flush=True,
        )
    from watcher.publish import (  # boto3: only when used
        PublishInterrupted,
        publish_artifact,
        signals_interrupt_publish,
        tty_progress,
    )

    record = None
    try:
        # A Buildkite cancel or job timeout sends SIGTERM: the record written before the
        # upload is withdrawn on the way out instead of staying without its object.
        with signals_interrupt_publish():
            record = publish_artifact(
                ctx.config,
                args.app,
                args.dir,
                branch=branch or "",
                commit=commit,
                build_number=build_number or "",
                build_url=build_url or "",
                artifact_id=args.artifact_id,
                created_by=created_by(env),
                # Drawn on the real stderr: its "\r" redraws the line, which the escaping
                # stream watcherctl prints through would print as "\x0d".
                progress=None if ctx.as_json else tty_progress(getattr(sys.stderr, "raw", None)),
                retry_deadline=retry_for,
            )
    except PublishInterrupted as exc:
        if record is None:  # else it came after the publish finished: report that
            what = f"{args.app} artifact {exc.artifact}" if exc.artifact else args.app
            outcome = exc.outcome or "it had written nothing to Consul"
            print(
                f"watcherctl: publish of {what} stopped by {exc.signal_name}; {outcome}",
                file=sys.stderr,
            )
            return 128 + exc.signum
    if (
        args.artifact_id is None  # an id of its own: the branch did not make it
        and branch
        and record.branch
        and not record.branch.endswith(CUT_MARK)  # a long branch kept cut (records.py)
        and record.branch != branch
    ):
        # The same bytes published before from another branch whose name gives the same id
        # (`a/b` and `a-b`; two names of only non-ASCII letters): the record, which deploys
        # and hooks read, keeps that branch. Exit 0: this build is what the id holds.
        print(
            f"watcherctl: warning: artifact {record.id} was published before from branch "
            f"{record.branch!r} with these very bytes, and its record keeps that branch; "
            f"this build's branch {branch!r} gives the same id (every character outside "
            "[A-Za-z0-9._-] becomes '-'): give it its own with --artifact-id",
            file=sys.stderr,
        )
    data = {"app": args.app, **asdict(record)}
    del data["uploading"]  # false once published: the output is as it always was
    ctx.emit(data, _human)
    return 0


def _human(data: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"published {data['app']} artifact {data['id']}",
            f"  sha256  {data['sha256']}",
            f"  size    {data['size']} bytes",
            f"  url     {data['url']}",
        ]
    )
