"""The `watcher` command: `watcher run` (the daemon), `watcher check-config`, `watcher web`."""

from __future__ import annotations

import argparse
import grp
import importlib
import os
import pwd
import stat
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from watcher import __version__
from watcher.config import AppConfig, Config, env_overridden_warnings, load_config
from watcher.errors import ConfigError, WatcherError
from watcher.log import configure_logging

if TYPE_CHECKING:  # the daemon's and Consul's modules load only where a command needs them
    from watcher.consul_api import ConsulClient

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted both before and after the subcommand (`watcher run -c FILE`)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=default,
        help="configuration file (default: $WATCHER_CONFIG or /etc/watcher/watcher.yaml)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="debug logging, and a traceback on unexpected errors",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=default,
        help="log format (default: JSON lines unless stdout is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watcher",
        description="release-watcher daemon: all-or-nothing release deploys over Consul",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="run the daemon (systemd Type=notify)")
    _common_options(run, suppress=True)
    check = sub.add_parser(
        "check-config", help="validate the configuration file and list every problem"
    )
    _common_options(check, suppress=True)
    web = sub.add_parser("web", help="serve the deploy API and web page (see docs/web.md)")
    _common_options(web, suppress=True)
    web.add_argument(
        "--listen",
        default="127.0.0.1:8710",
        metavar="HOST:PORT",
        help="address to serve on (default: 127.0.0.1:8710, loopback)",
    )
    web.add_argument(
        "--root-path",
        default="",
        metavar="PATH",
        help="the path a reverse proxy serves the page under, such as /watcher "
        "(default: none, the root of its host; docs/web.md)",
    )
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    fmt = {"json": True, "console": False, None: None}[args.log_format]
    # `run` is the daemon: it configures logging once for its life (see configure_logging).
    final = args.command == "run"
    configure_logging(level="debug" if args.debug else "info", json=fmt, final=final)


def _print_config_error(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(f"{exc.source}: {problem}", file=sys.stderr)


#: Consul's default ``session_ttl_min`` (seconds): a shorter TTL is refused by its servers.
CONSUL_SESSION_TTL_MIN = 10.0


#: How long `check-config` waits for the Consul agent when it asks it anything.
AGENT_LOOK_TIMEOUT = 2.0


def _quick_client(config: Config) -> ConsulClient:
    """A client for check-config's questions: one attempt each, within AGENT_LOOK_TIMEOUT,
    nothing logged (a retry would make a missing agent a wait)."""
    from dataclasses import replace

    from watcher.consul_api import ConsulClient

    settings = replace(config.consul, timeout=min(config.consul.timeout, AGENT_LOOK_TIMEOUT))
    return ConsulClient(settings, retry_deadline=0)


def agent_session_ttl_min(config: Config) -> float | None:
    """The ``session_ttl_min`` of the Consul agent the config names, None when it cannot
    be asked (not running here, a token without agent read) or does not say."""
    from watcher.errors import ConsulError

    try:
        client = _quick_client(config)
    except (ConsulError, OSError, ValueError):
        return None
    try:
        return client.agent_session_ttl_min()
    except (ConsulError, OSError):
        return None
    finally:
        client.close()


#: A CAS index no key has: a write with it is checked against the token's ACL (a 403
#: when the token may not write the key) and then never applied, whether the key exists or
#: not. So `check-config` asks "may this token write here?" without writing anything.
NEVER_INDEX = 2**63 - 1
#: The deploy and artifact ids the write probes name (never created, see NEVER_INDEX).
PROBE_DEPLOY, PROBE_ARTIFACT = "check-config-probe", "check-config-probe"


def token_problems(config: Config) -> tuple[list[str], list[str]]:
    """What the config's Consul token may not do that a watcher of this config needs, read
    from Consul itself, as (errors, warnings): read each app's keys, and write the ones a
    watcher of this node writes (docs/acl.md's watcher policy). Consul answers each write
    with a CAS that never applies, so nothing is written. A token rendered for another node,
    app or kv_prefix is otherwise seen only once the watcher runs and takes part in no
    deploy. A token Consul does not know is the one error: no policy can make it work, and
    a `reload` that took it would leave this host out of every deploy (the old token may
    still work); a permission may be granted later, and an agent that does not answer now
    may tomorrow, so those are warnings."""
    if not config.apps:
        return [], []
    from watcher.errors import ConsulError, ConsulPermissionDenied, ConsulRequestError
    from watcher.records import Keys

    unchecked = "consul: the token's permissions were not checked"
    try:
        client = _quick_client(config)
    except (ConsulError, OSError, ValueError) as exc:
        return [], [f"{unchecked}: {exc}"]
    try:
        if config.consul.token:
            try:
                client.acl_token_self()  # any token Consul knows may read itself
            except ConsulPermissionDenied as exc:
                if not exc.unknown_token:  # a proxy's 403 on /v1/acl/, not Consul's word
                    return [], [f"{unchecked}: {exc}"]
                unknown = (
                    f"consul.token: Consul does not know this token ({exc}); give the "
                    "SecretID of the host's watcher token (docs/acl.md)"
                )
                return [unknown], []
            except ConsulRequestError:
                pass  # ACLs off: every request is allowed
        node = config.node
        warnings = []
        if not node:
            try:
                node = client.agent_node_name()
            except ConsulPermissionDenied as exc:
                # The keys of no node then, but every other: an operator's token, or one of
                # another app, said only this, which pointed at agent read (the ACL review).
                warnings.append(
                    f"node: not set, and the token may not read its Consul agent's name "
                    f"({exc}): the watcher would not start; set `node:` or give the token "
                    "`agent` read on its node (docs/acl.md). The keys of this node were "
                    "not checked"
                )
                node = ""
        for name in sorted(config.apps):
            keys = Keys(config.kv_prefix, name)
            fix = (
                f"a watcher policy rendered for node {node or '<this host>'}, app {name} and "
                f"kv_prefix {config.kv_prefix} (docs/acl.md)"
            )
            try:
                client.kv_get(keys.current)
            except ConsulPermissionDenied:
                warnings.append(
                    f"apps.{name}: the token may not read {keys.base}/: this watcher would "
                    f"take part in no deploy of {name}; give it {fix}"
                )
                continue
            denied = []
            mine = (keys.member(node), keys.host(node), keys.progress(PROBE_DEPLOY, node))
            for key in (
                *(mine if node else ()),
                keys.pin(PROBE_ARTIFACT),
                keys.coordinator(PROBE_DEPLOY),
                keys.decision(PROBE_DEPLOY),
                keys.outcome(PROBE_DEPLOY),
                keys.current,
                keys.events_seen,
                keys.history,
                keys.request(PROBE_DEPLOY),
                keys.inflight,
            ):
                try:
                    client.kv_put(key, b"", cas=NEVER_INDEX)
                except ConsulPermissionDenied:
                    denied.append(key.removeprefix(f"{keys.base}/"))
            if denied:
                what = (
                    "no deploy would expect this host, and the fleet would not list it"
                    if f"members/{node}" in denied
                    else "its deploys would fail"
                )
                warnings.append(
                    f"apps.{name}: the token may not write {', '.join(denied)} under "
                    f"{keys.base}/: {what}; give it {fix}"
                )
        return [], warnings
    except ConsulError as exc:
        return [], [f"{unchecked}: {exc}"]
    finally:
        client.close()


def config_warnings(
    config: Config,
    *,
    agent_ttl_min: float | None = None,
    session_ttl: bool = True,
    advice: bool = True,
) -> list[str]:
    """Things that are valid but will not work on this host as it stands (warn, don't fail).
    ``agent_ttl_min``: the Consul agent's ``session_ttl_min``, when it could be asked;
    ``session_ttl``: False leaves the TTL out (the daemon's log: no guess without the agent);
    ``advice``: also what works but is risky (hooks as root, a umask that leaves files
    writable by all), which check-config says and the daemon's log does not repeat at
    every start (a hook run as root is a documented choice)."""
    warnings: list[str] = []
    ttl = config.daemon.session_ttl
    if not session_ttl:
        pass
    elif agent_ttl_min is not None:
        if ttl < agent_ttl_min:
            warnings.append(
                f"daemon.session_ttl: {ttl:g}s is below the session_ttl_min the Consul agent "
                f"at {config.consul.base_url} is set to ({agent_ttl_min:g}s): Consul refuses "
                'such a session ("Invalid Session TTL")'
            )
    elif ttl < CONSUL_SESSION_TTL_MIN:
        warnings.append(
            f"daemon.session_ttl: {ttl:g}s is below Consul's default "
            f"session_ttl_min ({CONSUL_SESSION_TTL_MIN:g}s): Consul refuses such a session "
            '("Invalid Session TTL") unless its servers set session_ttl_min lower'
        )
    warnings += env_overridden_warnings(config)
    if advice:
        warnings += _token_readable_warnings(config)
    if problem := _not_writable(Path(config.daemon.state_dir)):
        warnings.append(f"daemon.state_dir: {problem}")
    from watcher.releases import untrusted_path  # (only for check-config)

    if problems := untrusted_path(config.daemon.state_dir):
        unsafe = "; ".join(problems)
        # Not refused as an app directory is (nothing there is run, chowned or switched
        # to, and the locks refuse a symlink), but the session the watcher reuses at its
        # start and what `watcherctl status` shows are read from there.
        warnings.append(
            f"daemon.state_dir: {unsafe}: another user could replace the files the watcher "
            "keeps there (the Consul session it takes up again at a restart, the status "
            "`watcherctl status` shows); make it and the directories above it root's (or "
            "the daemon's user's) and writable by that user only"
            + _state_dir_owner_hint(config.daemon.state_dir, problems)
        )
    for name, app in sorted(config.apps.items()):
        root = Path(app.root)
        problem = _not_writable(root)
        if not root.exists() and not problem.endswith(NOT_A_DIRECTORY):
            warnings.append(f"apps.{name}.root: {root} does not exist (yet)")
        if problem:
            warnings.append(f"apps.{name}.root: {problem}")
        if app.user:
            try:
                pwd.getpwnam(app.user)
            except KeyError:
                warnings.append(f'apps.{name}.user: no user "{app.user}" on this host')
        if app.group:
            try:
                grp.getgrnam(app.group)
            except KeyError:
                warnings.append(f'apps.{name}.group: no group "{app.group}" on this host')
        if advice and not app.user and os.geteuid() == 0:
            # Valid (docs/hooks.md: what needs root), but the release's own hooks are
            # whatever CI packed: with root they can read this host's Consul token and S3
            # credentials, so the CI role becomes every host's root.
            warnings.append(
                f"apps.{name}.user: not set, so hooks run as root, the release's own "
                ".watcher/hooks included (what CI packed can then read this host's Consul "
                "token and S3 credentials); set a user the app runs as (docs/hooks.md)"
            )
        if advice and not app.umask & 0o002:
            warnings.append(
                f"apps.{name}.umask: {app.umask:04o} leaves files of the release that the "
                "archive marks 0777 (and directories) writable by every user of this host; "
                "0022 or 0002 is usual"
            )
        for phase, commands in sorted(app.hooks.items()):
            for i, argv in enumerate(commands):
                path = Path(argv[0])
                where = f"apps.{name}.hooks.{phase}[{i}]"
                if not path.exists():
                    first, _, rest = argv[0].partition(" ")
                    hint = (
                        f" (if {rest.split()[0]!r} is an argument, write the hook as a list: "
                        f"[{first}, ...])"
                        if len(argv) == 1 and rest.strip() and Path(first).exists()
                        else ""
                    )
                    warnings.append(f"{where}: {path} does not exist{hint}")
                elif path.is_dir():
                    warnings.append(f"{where}: {path} is a directory, not an executable file")
                elif not path.is_file() or not os.access(path, os.X_OK):
                    warnings.append(f"{where}: {path} is not executable")
                elif not app.user and os.geteuid() == 0 and (problem := _untrusted_hook(argv)):
                    warnings.append(
                        f"{where}: {problem}: the hook runs as root at every deploy, so who "
                        "may change it is root on this host; make it and the directories "
                        "above it root's and writable by root only"
                    )
    return warnings


def _state_dir_owner_hint(state_dir: str, problems: list[str]) -> str:
    """For `sudo watcher check-config` on a host whose watcher runs as another user
    (README: `User=` in a drop-in): when the one problem is that the state_dir itself is
    another user's (``untrusted_path`` then names it and nothing under it), that user
    may be the daemon's. Not for a directory above it, or more than one problem: those
    are problems whoever runs the daemon."""
    if os.geteuid() != 0 or len(problems) != 1:
        return ""
    try:
        uid = Path(state_dir).lstat().st_uid
    except OSError:
        return ""
    if uid == 0:
        return ""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"#{uid}"  # sudo -u takes a uid so
    return (
        f" (if the watcher runs as {user}, `User=`, that is its own: run check-config as "
        f"that user, `sudo -u {user} watcher check-config`)"
    )


def _untrusted_hook(argv: tuple[str, ...]) -> str:
    """``untrusted_path`` of the hook's program and of each argument that names an existing
    file (the script of ``[/bin/sh, /srv/web/shared/reload.sh]``), "; "-joined."""
    from watcher.releases import untrusted_path  # (only for a hook run as root)

    files = [argv[0], *(a for a in argv[1:] if a.startswith("/") and Path(a).is_file())]
    return "; ".join(dict.fromkeys(p for f in files for p in untrusted_path(f)))


def _token_readable_warnings(config: Config) -> list[str]:
    """A token file, or a config file holding the token itself, that other users of this
    host may read: whoever reads it acts as this host (README, "Set-up")."""
    consul = config.consul
    if consul.token_file:
        path = consul.token_file
        where = consul.token_from.split(" (", 1)[0]  # the key, or CONSUL_HTTP_TOKEN_FILE
    elif consul.token is not None and consul.token_from == "consul.token":  # noqa: S105 - a key name
        path, where = config.source, "consul.token"
    else:
        return []
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return []  # (an unreadable file was refused with the config)
    if not mode & 0o004:
        return []  # (group read is a choice: a daemon run as a user of the file's group)
    return [
        f"{where}: {path} is mode {stat.S_IMODE(mode):04o}: every user of this host can "
        "read the token and act as this host with it (chmod 0600, or 0640 for a group)"
    ]


def path_errors(config: Config) -> list[str]:
    """The directories of ``config`` that can never be made or used: a file where the
    directory, or one above it, must be. Also among ``config_warnings`` (the daemon's log
    says them; its start then fails), but check-config refuses them: a `reload` must not
    pass a config that cannot start."""
    named = [("daemon.state_dir", config.daemon.state_dir)]
    named += [(f"apps.{name}.root", app.root) for name, app in sorted(config.apps.items())]
    return [
        f"{where}: {problem}"
        for where, directory in named
        if (problem := _not_writable(Path(directory))).endswith(NOT_A_DIRECTORY)
    ] + untrusted_app_dirs(config)


def untrusted_app_dirs(config: Config) -> list[str]:
    """Each app directory another user could redirect the daemon's writes in
    (``untrusted_dir``): the daemon refuses to start with one, and check-config says so."""
    return [p for _, app in sorted(config.apps.items()) if (p := untrusted_app_dir(app))]


def untrusted_app_dir(app: AppConfig) -> str:
    """``untrusted_dir`` of ``app``'s directory, said as a config problem ("" if none); also
    what watcherctl's commands that write there refuse."""
    from watcher.releases import untrusted_dir

    problems = untrusted_dir(app.app_dir)
    if not problems:
        return ""
    return (
        f"apps.{app.name}.root: {'; '.join(problems)}: another user could put a symlink "
        f"where the watcher writes in {app.app_dir} (releases/, .state/, shared/) and have "
        "it, as root, chown or write what that points at; make each of these root's and "
        "writable by root only (chown root:root, chmod go-w, no ACL entry that lets another "
        "write; a tmpfiles.d line that gives one to another user sets it again at each "
        "boot), or choose a root below directories only root may change; an app's user "
        "writes in its shared paths (`shared`, systemd/watcher.example.yaml), not in the "
        "app directory"
    )


NOT_A_DIRECTORY = " is not a directory"


def _not_writable(directory: Path) -> str:
    """Why this user could not create or write ``directory`` (the watcher writes its
    state, locks and releases there), or "": the directory when it exists, else the
    nearest one above it that does (where it would be made)."""
    here = directory
    try:
        while not here.exists() and here.parent != here:
            here = here.parent
        if not here.is_dir():
            made = "" if here == directory else f" (where {directory} would be made)"
            return f"{here}{made}{NOT_A_DIRECTORY}"
    except OSError as exc:  # a parent this user may not enter: it cannot look further
        return f"{here} cannot be looked into by this user: {exc.strerror or exc}"
    if os.access(here, os.W_OK | os.X_OK):
        return ""
    made = "" if here == directory else f" (where {directory} would be made)"
    return (
        f"{here}{made} is not writable by this user (uid {os.geteuid()}): the watcher "
        "writes there; run check-config as the daemon's user to know"
    )


def check_config(args: argparse.Namespace) -> int:
    """`watcher check-config`: every problem on stderr, one per line; exit 2 if any."""
    config = load_config(args.config)
    # A TTL below Consul's default minimum is fine where the agent allows it (the demo's,
    # and any cluster that lowered it): ask the agent rather than warn on a guess.
    short_ttl = config.daemon.session_ttl < CONSUL_SESSION_TTL_MIN
    agent_ttl_min = agent_session_ttl_min(config) if short_ttl else None
    token_errors, token_warnings = token_problems(config)
    errors = path_errors(config) + token_errors
    for warning in [*config_warnings(config, agent_ttl_min=agent_ttl_min), *token_warnings]:
        if warning not in errors:
            print(f"{config.source}: warning: {warning}", file=sys.stderr)
    if errors:
        for error in errors:
            print(f"{config.source}: {error}", file=sys.stderr)
        return EXIT_CONFIG
    names = ", ".join(sorted(config.apps))
    count = len(config.apps)
    print(f"{config.source}: OK ({count} app{'s' if count != 1 else ''}: {names})")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """`watcher run`: load the config and hand over to the daemon loop."""
    config = load_config(args.config)
    try:
        daemon = importlib.import_module("watcher.daemon")  # lazily: check-config needs none of it
    except ModuleNotFoundError as exc:
        if exc.name != "watcher.daemon":
            raise
        daemon = None
    run_daemon = getattr(daemon, "run_daemon", None)
    if run_daemon is None:
        print("watcher: error: the daemon is not part of this build yet", file=sys.stderr)
        return EXIT_FAILURE
    return int(run_daemon(config, args) or 0)


def web(args: argparse.Namespace) -> int:
    """`watcher web`: FastAPI is imported here only, so the daemon never loads it."""
    config = load_config(args.config)
    from watcher.web.app import check_root_path
    from watcher.web.server import parse_listen, run_web

    try:
        parse_listen(args.listen)
        root = check_root_path(args.root_path)
    except ValueError as exc:
        print(f"watcher web: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_web(config, args.listen, root_path=root)


COMMANDS = {"run": run, "check-config": check_config, "web": web}


def _words(argv: list[str]) -> list[str]:
    """The arguments that are neither options nor an option's value."""
    words, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-c", "--config", "--log-format", "--listen"):
            skip = True
        elif not arg.startswith("-"):
            words.append(arg)
    return words


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `watcher` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not {*COMMANDS, "-h", "--help", "--version"} & set(argv) and not _words(argv):
        # No command at all (a first try): the commands, not only "COMMAND is required".
        # A word that is not one (a typo) is argparse's "invalid choice", naming them.
        print(parser.format_help(), file=sys.stderr)
        print("watcher: error: name a COMMAND (above)", file=sys.stderr)
        return EXIT_CONFIG
    args = parser.parse_args(argv)
    # args.config None: load_config takes $WATCHER_CONFIG or the default itself, and says
    # which when the file is missing.
    _configure_logging(args)
    command = COMMANDS[args.command]
    try:
        code = command(args)
        sys.stdout.flush()  # a closed pipe (`check-config | head -1`) shows here
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # quietly, as a tool killed by SIGPIPE
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    except WatcherError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"watcher: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"watcher: error: unexpected {type(exc).__name__}: {exc} (run with --debug for the "
            "traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
