"""`watcherctl`: the operator CLI; argument parsing, output and exit codes for every command."""

from __future__ import annotations

import argparse
import gc
import importlib
import itertools
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from watcher import __version__, ids
from watcher.config import (
    AppConfig,
    Config,
    env_overridden_warnings,
    load_config,
    read_token_file,
    token_problem,
)
from watcher.errors import (
    ArtifactIdTaken,
    ArtifactNotFound,
    ConfigError,
    ConsulError,
    ConsulPermissionDenied,
    DeployError,
    DeployNotFound,
    LockTimeout,
    PayloadError,
    ReleaseNotFound,
    RollbackTargetUnknown,
    S3Error,
    WatcherError,
)
from watcher.log import configure_logging

# Each module defines `register(subparsers, common)` and sets `func(ctx) -> int` on its parsers.
COMMAND_MODULES = (
    "watcher.ctl_local",
    "watcher.ctl_fleet",
    "watcher.ctl_publish",
    "watcher.ctl_gc",
)
# The module that registers each command: `watcherctl <command>` imports only that one, so
# `status --fleet` does not pay for the hooks, archive and S3 code of the others. Any other
# first argument (--help, a typo) loads them all. A test keeps this in step with the modules.
COMMANDS = {
    **dict.fromkeys(
        ("status", "deploy", "rollback", "history", "builds", "abort"), "watcher.ctl_fleet"
    ),
    **dict.fromkeys(
        ("releases", "hold", "release-hold", "setup-release", "exec", "prune"),
        "watcher.ctl_local",
    ),
    "publish": "watcher.ctl_publish",
    "gc": "watcher.ctl_gc",
}
#: Words people type for a command by another name (the suggestion after "no command").
MEANT = {"unhold": "release-hold", "log": "history"}

# Exit codes: 0 ok, 1 the operation failed (also a path it cannot use, or a bug), 2 bad
# usage or config, 3 Consul or S3 unreachable or refused, 4 refused because of state
# (deploy in flight, hold, lock held), 5 the wait for a deploy ended while it still runs.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_STILL_RUNNING = 5
# A watcherctl command a message suggests, between backquotes.
_SUGGESTED = re.compile(r"`(watcherctl [^`]+)`")
# Ctrl-C, and stdout closed by its reader: what a shell reports for SIGINT and SIGPIPE.
EXIT_INTERRUPTED = 128 + 2
EXIT_PIPE = 128 + 13
# The commands that write to Consul: under sudo without an exported token, they act with
# the config's token (the host's), so they say so (`rollback --local` writes nothing there,
# nor `gc` without a node or with --dry-run).
CONSUL_WRITERS = frozenset({"deploy", "rollback", "abort", "publish", "gc"})


# What a config without `apps:` is for, and what to give instead.
NO_APPS_HINT = (
    "a config without apps, a CI machine's, serves `watcherctl publish` only; for this "
    "command give a host's config: -c /etc/watcher/watcher.yaml"
)


#: The commands that read one app and take the config's only app when none is named (the
#: operator test: `history` and `releases` wanted APP where `status` did not).
ONE_APP_COMMANDS = frozenset({"history", "builds", "releases"})
ONE_APP_HELP = "the app (may be left out when the config has only one)"


class UnknownApp(ConfigError):
    """A command names an app the config does not have: the user's typo, not the file's.
    ``name`` None: a command of ONE_APP_COMMANDS named none, and the config has not
    exactly one (``command``)."""

    def __init__(self, name: str | None, config: Config, *, command: str = "") -> None:
        known = ", ".join(sorted(config.apps))
        if name is None:
            problem = (
                f"name the app: `watcherctl {command} APP` ({config.source} has {known})"
                if known
                else f"{config.source} lists no apps ({NO_APPS_HINT})"
            )
        else:
            problem = (
                f"no app {name!r} in {config.source} (configured: {known})"
                if known
                else f"no app {name!r} in {config.source}: it lists no apps ({NO_APPS_HINT})"
            )
        super().__init__(config.source, [problem])

    def __str__(self) -> str:
        return self.problems[0]


@dataclass
class CtlContext:
    """What a command needs: its arguments, and the config loaded on first use."""

    args: argparse.Namespace
    _config: Config | None = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        if self._config is None:
            config = load_config(self.args.config, apps_required=False)
            warning = sudo_token_warning(config, os.environ) if self.writes_consul else None
            if warning:
                print(f"watcherctl: warning: {warning}", file=sys.stderr, flush=True)
            # The exported token is taken over the file's (operator_token): said only of
            # the variables that are not.
            for said in env_overridden_warnings(config, leave=OPERATOR_TOKEN_VARS):
                print(f"watcherctl: warning: {config.source}: {said}", file=sys.stderr, flush=True)
            self._config = operator_token(config, os.environ)
        return self._config

    @property
    def writes_consul(self) -> bool:
        command = getattr(self.args, "command", None)  # exec's own `command` is its argv
        if not isinstance(command, str) or command not in CONSUL_WRITERS:
            return False
        if command == "gc":  # only forgetting a node writes
            return bool(getattr(self.args, "nodes", None)) and not self.args.dry_run
        return not getattr(self.args, "local", False)

    def app_names(self, what: str) -> list[str]:
        """Every configured app, for a command that takes all of them when none is named;
        a config that lists none (a CI machine's) is refused with what to do (exit 2)."""
        names = sorted(self.config.apps)
        if not names:
            raise ConfigError(
                self.config.source,
                [f"lists no apps, so {what} has nothing to look at ({NO_APPS_HINT})"],
            )
        return names

    def app(self, name: str) -> AppConfig:
        """The app's config; an app the config does not have is the user's typo (exit 2)."""
        config = self.config
        if name not in config.apps:
            raise UnknownApp(name, config)
        return config.apps[name]

    @staticmethod
    def consul_retry_notice(error: str, seconds_left: float) -> None:
        """A command's first Consul retry, on stderr (``ConsulClient``'s ``on_retry``): the
        retries can take seconds, and a silent command looks hung."""
        print(
            f"watcherctl: {error}; retrying for up to {seconds_left:.0f}s",
            file=sys.stderr,
            flush=True,
        )

    def command_line(self, *argv: str) -> str:
        """``watcherctl ARGV...`` as the user can paste it, with the -c they gave."""
        words = ["watcherctl", *argv]
        if getattr(self.args, "config", None):
            words += ["-c", self.args.config]
        return shlex.join(words)

    def with_config(self, text: str) -> str:
        """``text`` with each `` `watcherctl ...` `` it suggests given the -c of this command,
        so a hint pasted as printed reads the same config (one that has a -c is left as
        it is)."""
        config = getattr(self.args, "config", None)
        if not config:
            return text
        suffix = " -c " + shlex.quote(config)
        return _SUGGESTED.sub(
            lambda m: m[0] if " -c " in m[0] else f"`{m[1]}{suffix}`",
            text,
        )

    @property
    def as_json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def emit(self, data: Any, human: Callable[[Any], str] | None = None) -> None:
        """Print ``data`` as JSON with --json, else ``human(data)`` (or the JSON if none),
        each `watcherctl` command it suggests given this command's -c (``with_config``)."""
        if self.as_json or human is None:
            print(json.dumps(data, indent=2, sort_keys=True, default=str))
        else:
            text = human(data)
            if text:
                print(self.with_config(text))


OPERATOR_TOKEN_VARS = frozenset({"CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"})


def operator_token(config: Config, env: Mapping[str, str]) -> Config:
    """watcherctl acts with the operator's own token when one is exported.

    The daemon's config file wins over the environment (like the Consul CLI's flags), but
    watcherctl usually reads the host's watcher config: an operator who exported
    CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE means to act as themselves, with their own
    ACL permissions, not with the host's watcher token.
    """
    token: str | None = None
    where = "CONSUL_HTTP_TOKEN"
    if env.get("CONSUL_HTTP_TOKEN_FILE"):
        path = env["CONSUL_HTTP_TOKEN_FILE"]
        where = f"CONSUL_HTTP_TOKEN_FILE ({path})"
        try:  # an empty file is not "no token": the host's token would act for the operator
            token = read_token_file(path)
        except ValueError as exc:
            raise ConfigError("CONSUL_HTTP_TOKEN_FILE", [str(exc)]) from None
    elif env.get("CONSUL_HTTP_TOKEN"):
        token = env["CONSUL_HTTP_TOKEN"]
    if token is not None and (problem := token_problem(token)) is not None:
        raise ConfigError(where, [problem])
    if token is None or token == config.consul.token:
        return config
    where += " (from the environment)"
    return replace(config, consul=replace(config.consul, token=token, token_from=where))


def token_sent(config: Config) -> str:
    """Which token a command sent Consul, for the line after Consul refused it: an
    operator with several (theirs exported, the host's in the file) cannot tell which."""
    consul = config.consul
    if not consul.token:
        return (
            "none (Consul's anonymous token): export your own as CONSUL_HTTP_TOKEN or "
            f"CONSUL_HTTP_TOKEN_FILE, or set consul.token_file in {config.source}"
        )
    if consul.token_from.startswith("consul."):  # "consul.token_file (/etc/...)"
        key, _, file = consul.token_from.partition(" ")
        return f"{key} of {config.source}" + (f" {file}" if file else "")
    return consul.token_from


def sudo_token_warning(config: Config, env: Mapping[str, str]) -> str | None:
    """What to tell an operator who runs a command that writes to Consul through sudo with
    no token in the environment (sudo's env_reset drops CONSUL_HTTP_TOKEN and
    CONSUL_HTTP_TOKEN_FILE): it acts with the config's token, usually the host's watcher
    token, while ``requested_by`` names them. None when there is nothing to say."""
    sudo_user = env.get("SUDO_USER")
    if not sudo_user or env.get("CONSUL_HTTP_TOKEN") or env.get("CONSUL_HTTP_TOKEN_FILE"):
        return None
    acting = f"the token of {config.source}" if config.consul.token else "no token (anonymous)"
    return (
        f"running under sudo for {sudo_user} with no CONSUL_HTTP_TOKEN or "
        f"CONSUL_HTTP_TOKEN_FILE (sudo drops them): Consul sees {acting}, not "
        f"{sudo_user}'s; keep yours with `sudo --preserve-env=CONSUL_HTTP_TOKEN,"
        "CONSUL_HTTP_TOKEN_FILE watcherctl ...`"
    )


def user_at_host() -> str:
    """The invoking operator, for ``requested_by``: ``$SUDO_USER`` or the login, at this host."""
    user = os.environ.get("SUDO_USER") or os.environ.get("USER")
    if not user:
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
    return f"{user}@{os.uname().nodename}"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table, each cell on its one line (``ids.one_line``: a newline in
    a value from KV would start a forged row)."""
    cells = [[str(h) for h in headers]]
    cells += [["" if c is None else ids.one_line(str(c)) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """-c, --json and --debug: accepted before the command and after it.

    The copy on each command's parser leaves an option it was not given unset
    (``SUPPRESS``), so ``watcherctl -c FILE status`` keeps the value given before the
    command; one given after it wins.
    """
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "-c",
        "--config",
        default=default,
        help="config file (default: $WATCHER_CONFIG or /etc/watcher/watcher.yaml)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable output",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="show tracebacks and debug logs",
    )


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: its options and its positionals mix freely.

    Plain argparse takes a command's positionals in runs: in `gc web --dry-run host-1`, the
    run `web` fills APP and an empty NODE list, and `host-1` is left over ("unrecognized
    arguments"); so is DEPLOY in `abort web --reason R DEPLOY`. Every command is parsed as
    ``parse_known_intermixed_args`` does (options first, then the positionals left), except
    one that takes the rest of the line as it is (`exec`'s ``-- CMD``), which argparse
    cannot intermix.
    """

    _intermixing = False
    _given: Sequence[str] = ()  # the words given to this command, for ``error``

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        whole = (argparse.REMAINDER, argparse.PARSER)
        if not self._intermixing:
            self._given = list(args or ())
        if self._intermixing or any(a.nargs in whole for a in self._get_positional_actions()):
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls this twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def error(self, message: str) -> NoReturn:
        """argparse's error, and for a missing positional which words were taken as which
        (`deploy main-fb04dcb6`, the app forgotten: "required: artifact" said nothing of
        the build being read as the app, the operator test)."""
        if message.startswith("the following arguments are required: "):
            names = [str(a.metavar or a.dest).upper() for a in self._get_positional_actions()]
            words = self._positional_words()
            if words and names:
                took = ", ".join(
                    f"{ids.shown(w)} as {n}" for w, n in zip(words, names, strict=False)
                )
                message += f" (it took {took}; the command is `{self.prog} {' '.join(names)}`)"
        super().error(message)

    def _positional_words(self) -> list[str]:
        """The words of ``_given`` that no option takes (as argparse reads them)."""
        words, skip = [], False
        for word in self._given:
            if skip or word == "--":
                skip = False
            elif word.startswith("-") and len(word) > 1:
                action = self._option_string_actions.get(word.partition("=")[0])
                skip = action is not None and action.nargs != 0 and "=" not in word
            else:
                words.append(word)
        return words


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (global options may come before it), or None."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-c", "--config"):
            skip = True  # its value
        elif not arg.startswith("-"):
            return arg
    return None


def _option_of(parser: argparse.ArgumentParser, arg: str) -> argparse.Action | None:
    """The option of ``parser`` that ``arg`` gives (``--limit``, ``--limit=5``, ``-cFILE``,
    or an abbreviation argparse takes, ``--fle``), or None."""
    actions = parser._option_string_actions
    if arg.startswith("--"):
        name = arg.split("=", 1)[0]
        if name in actions:
            return actions[name]
        found = {id(a): a for s, a in actions.items() if s.startswith("--") and s.startswith(name)}
        return next(iter(found.values())) if len(found) == 1 else None
    return actions.get(arg[:2])


def _values_taken(action: argparse.Action, arg: str) -> int:
    """How many of the next arguments ``action`` given as ``arg`` takes as its values."""
    attached = "=" in arg if arg.startswith("--") else len(arg) > 2
    if action.nargs == 0 or attached:
        return 0
    return action.nargs if isinstance(action.nargs, int) else 1


def misplaced_options(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.ArgumentParser, str] | None:
    """The command's parser and what to say when options of that command come before it
    (``watcherctl --fleet status``): argparse would only call them unrecognized, with the
    usage of the command that lists them. None when there are none (anything else before
    the command is left to argparse to judge)."""
    commands = subcommands(parser)
    before: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg == "--":
            return None
        elif arg in commands:
            command = arg
            break
        elif arg.startswith("-") and (action := _option_of(parser, arg)) is not None:
            skip = _values_taken(action, arg)
        before.append(arg)
    else:
        return None
    sub = commands[command]
    own: list[str] = []  # the command's options given before it, with their values
    kept: list[str] = []  # the global options given before it, with theirs
    names: list[str] = []
    lacking: list[str] = []  # options given without their value
    i = 0
    while i < len(before):
        arg = before[i]
        if not arg.startswith("-") or arg == "-":
            return None  # a word before the command: argparse's error
        action = _option_of(parser, arg)
        mine = action is None
        if mine:
            action = _option_of(sub, arg)
        if action is None:
            return None  # an option of neither: argparse's error
        taken = _values_taken(action, arg)
        values = before[i + 1 : i + 1 + taken]
        if len(values) < taken or any(
            _option_of(parser, v) or _option_of(sub, v) for v in values if v.startswith("-")
        ):
            # Its value left out (`--timeout --json deploy`): shown as a placeholder, not
            # the next option taken for it.
            values = [action.metavar if isinstance(action.metavar, str) else action.dest.upper()]
            lacking.append(arg.split("=", 1)[0])
            taken = 0
        (own if mine else kept).extend([arg, *values])
        if mine:
            names.append(arg.split("=", 1)[0])
        i += 1 + taken
    if not names:
        return None
    fixed = shlex.join(["watcherctl", *kept, command, *own, *argv[len(before) + 1 :]])
    if len(names) == 1:
        value = ", with its value" if lacking else ""
        return sub, (
            f"{names[0]} is an option of {command!r}: put it after the command{value} ({fixed})"
        )
    value = f", with a value for {', '.join(lacking)}" if lacking else ""
    return sub, (
        f"{', '.join(names)} are options of {command!r}: put them after the command{value} "
        f"({fixed})"
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command``'s module only when it names one."""
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog="watcherctl", description="Operate release-watcher on this host and the fleet."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(sub, common)
    return parser


def name_argument(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse ``type=`` that applies one of ``watcher.ids``' checks: a bad id is a
    usage error (exit 2, the rule in the message) before any config or Consul is touched."""

    def convert(text: str) -> str:
        try:
            return check(text)
        except PayloadError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = check.__name__.removeprefix("check_").replace("_", " ")
    return convert


def free_text_argument(text: str) -> str:
    """An argparse ``type=`` for free text that is stored and shown later (``--reason``):
    ``ids.check_free_text``."""
    try:
        return ids.check_free_text(text)
    except PayloadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


free_text_argument.__name__ = "free text"

#: The most a --reason may say (a hold's or an abort's): `status`, `history` and the page
#: show it in full, and 120 KB was taken.
REASON_MAX = 1000


def reason_argument(text: str) -> str:
    """An argparse ``type=`` for --reason: free text, at most REASON_MAX characters."""
    value = free_text_argument(text)
    if len(value) > REASON_MAX:
        raise argparse.ArgumentTypeError(
            f"{len(value)} characters, more than {REASON_MAX}: say why in one short line"
        )
    return value


reason_argument.__name__ = "reason"

artifact_id_argument = name_argument(ids.check_artifact_id)
deploy_id_argument = name_argument(ids.check_deploy_id)
release_argument = name_argument(ids.check_release_input)
release_argument.__name__ = "release name"
commit_argument = name_argument(ids.check_commit)


def exit_code_for(exc: WatcherError) -> int:
    # A name that does not exist is bad input, like an unknown app: 2.
    if isinstance(
        exc,
        ConfigError | ArtifactNotFound | DeployNotFound | ReleaseNotFound | RollbackTargetUnknown,
    ):
        return EXIT_USAGE
    if isinstance(exc, ConsulError | S3Error):
        return EXIT_UNAVAILABLE
    if isinstance(exc, DeployError | LockTimeout | ArtifactIdTaken):
        return EXIT_REFUSED
    return EXIT_FAILED


def _stdout_gone() -> int:
    """The reader of stdout went away (``watcherctl history web | head -1``): stop quietly,
    like a tool killed by SIGPIPE, and keep the interpreter from complaining at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


def _never_crash_on_encoding() -> None:
    """What watcherctl prints comes partly from others (a hold's reason, a release name, an
    error's path): a character the terminal cannot show is written as an escape (an ASCII
    locale, a surrogate from undecodable bytes), never a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


class _Printable:
    """A text stream that writes what it is given with control characters escaped
    (``ids.printable``): much of what watcherctl prints comes from KV, where any host's
    token writes (errors, hook output, reasons), and an escape sequence there must not
    clear an operator's screen or forge lines. JSON output is already escaped by ``json``.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.raw = stream  # for what watcherctl itself draws (publish's "\r" progress line)

    def write(self, text: str) -> int:
        self._stream.write(ids.printable(text))
        return len(text)  # what the caller gave (some streams answer None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        _never_crash_on_encoding()
        sys.stdout, sys.stderr = _Printable(out), _Printable(err)
        return _main(argv)
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt:  # Ctrl-C while loading the command: nothing was done yet
        return EXIT_INTERRUPTED
    finally:
        sys.stdout, sys.stderr = out, err


def _config_given(argv: Sequence[str]) -> tuple[str, str | None]:
    """(the option as typed, its value) of the first -c / --config / --config=X."""
    for option, value in itertools.pairwise([*argv, ""]):
        if option in ("-c", "--config"):
            return option, value
        if option.startswith("--config="):
            return "--config", option.partition("=")[2]
    return "-c", None


def _option_slip(command_parser: argparse.ArgumentParser, extra: Sequence[str]) -> str:
    """ " (did you mean --fleet?)" for the first unknown long option close to one the
    command takes (`status --flet`), else ""."""
    import difflib

    given = next((e.partition("=")[0] for e in extra if e.startswith("--")), None)
    if given is None:
        return ""
    known = [o for a in command_parser._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _traceback_if(debug: bool) -> None:
    """--debug adds the traceback of the error being handled; the message and the exit code
    stay what they are without it (a script run with --debug must see the same codes)."""
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's parser under the top-level ``parser``, by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_of(argv)
    if command == "help":  # `watcherctl help deploy`, as git and consul take it
        at = argv.index("help")
        argv = [*argv[:at], *argv[at + 1 :], "--help"]
        command = command_of(argv)
    words = [a for a in argv if not a.startswith("-")]
    option, taken = _config_given(argv)
    if taken in COMMANDS and (command is None or command not in COMMANDS):
        # `-c status`, `-c $CONFIG hold web` with CONFIG unset: the file name forgotten.
        print(
            f"watcherctl: error: {option} took {taken!r} as the config file, so the command "
            f"is missing: give the file after {option} (`watcherctl {option} FILE {taken} "
            "...`), or leave it out for $WATCHER_CONFIG or /etc/watcher/watcher.yaml",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if command is not None and command not in COMMANDS and not set(words) & set(COMMANDS):
        # No word names a command (an option's value before one is not a command either:
        # `--limit 5 history web`, `--conf FILE status`).
        import difflib

        # `unhold` is closer to hold by letters than to release-hold, its meaning.
        close = (
            [MEANT[command]]
            if command in MEANT
            else difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.6)
        )
        print(
            f"watcherctl: error: no command {ids.shown(command)}"
            + (f"; did you mean {close[0]}?" if close else "")
            + f" (the commands: {', '.join(COMMANDS)}; `watcherctl --help` says what each does)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    parser = build_parser(command)
    if command is None and not {"-h", "--help", "--version"} & set(argv):
        # No command at all (a first try): the commands, not only "COMMAND is required".
        print(parser.format_help(), file=sys.stderr)
        print("watcherctl: error: name a COMMAND (above)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if misplaced := misplaced_options(parser, argv):
            # Said with the command's usage, which lists the option.
            command_parser, message = misplaced
            command_parser.error(message)
        args, extra = parser.parse_known_args(argv)
        if extra:
            # Said with the command's own usage (`history web extra`), not the top level's.
            said = f"unrecognized arguments: {' '.join(extra)}"
            said += _option_slip(subcommands(parser)[args.command], extra)
            if args.command == "rollback" and ids.artifact_of_release(extra[0]) is not None:
                line = [
                    "rollback",
                    args.app,
                    *(["--local"] if getattr(args, "local", False) else []),
                ]
                said += (
                    " (a release goes with --to: "
                    f"`{CtlContext(args).command_line(*line, '--to', extra[0])}`)"
                )
            subcommands(parser)[args.command].error(said)
    except SystemExit as exc:  # --help, or a usage error (already printed, exit 2)
        sys.stdout.flush()
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not gc.isenabled():  # the console script (ctl_script) loaded all this without it
        gc.freeze()
        gc.enable()
    # Retries and other warnings are the daemon's business; the CLI says what failed, once.
    configure_logging(level="debug" if args.debug else "error", stream=sys.stderr)
    ctx = CtlContext(args)
    try:
        if command in ONE_APP_COMMANDS and args.app is None:  # (exec's args.command is its own)
            if len(ctx.config.apps) != 1:
                raise UnknownApp(None, ctx.config, command=command)
            args.app = next(iter(ctx.config.apps))
        code: int = args.func(ctx)
        sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
        return code
    except WatcherError as exc:
        _traceback_if(args.debug)
        if isinstance(exc, ConfigError) and exc.source.startswith("watcherctl "):
            # A command's own options (publish's, checked after argparse): as argparse says
            # its errors, its usage first, then "watcherctl publish: error: ...".
            subcommands(parser)[args.command].print_usage(sys.stderr)
            for problem in exc.problems:
                print(f"{exc.source}: error: {problem}", file=sys.stderr)
        elif isinstance(exc, ConfigError) and len(exc.problems) > 1:
            for problem in exc.problems:
                print(f"watcherctl: error: {exc.source}: {problem}", file=sys.stderr)
        else:  # every command it suggests with the -c given
            print(f"watcherctl: error: {ctx.with_config(str(exc))}", file=sys.stderr)
        if isinstance(exc, ConsulPermissionDenied) and ctx._config is not None:
            print(f"watcherctl: the token sent: {token_sent(ctx._config)}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("watcherctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except OSError as exc:  # a path the command cannot use: root's files without sudo ...
        _traceback_if(args.debug)
        print(f"watcherctl: error: {_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"watcherctl: error: unexpected {type(exc).__name__}: {exc} (run with --debug "
            "for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _os_error(exc: OSError) -> str:
    """``PATH: Permission denied``, like the tools an operator knows."""
    if exc.filename is None:
        return str(exc)
    what = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"{what}: {exc.strerror or exc}"


def committed_end(app: str, hosts: Iterable[str]) -> str:
    """How a committed deploy still in flight ends: only a running watcher of ``app`` ends
    it (DESIGN.md 6.4.7), so one whose every host stopped running it stays in flight."""
    return (
        f"It ends once the watchers of {app} that run on its hosts ({', '.join(hosts)}) have "
        f"applied it, or past its apply deadline at any watcher of {app} that runs"
    )


if __name__ == "__main__":
    sys.exit(main())
