"""The configuration file, parsed once into frozen typed objects; every error names its path."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from watcher.errors import ConfigError

DEFAULT_PATH = Path("/etc/watcher/watcher.yaml")
HOOK_PHASES = ("post_release", "post_symlink", "validate", "post_abort")
PREFETCH_MODES = ("extract", "download", "off")
VALIDATE_FAILURE_MODES = ("rollback", "hold")
# Hosts flip together this long after the commit's moment (docs/design.md, "Flipping
# together"); more would only delay a deploy, so a larger value is a typo.
FLIP_DELAY = 0.2
FLIP_DELAY_MAX = 5.0
MAX_NESTING = 32  # levels of YAML collections; a real config needs 6
# The most deploys an app's history keeps (`daemon.history_keep`), and the most of them a
# host reads from that key: any host's token writes it, and a padded list (18,000 ids) made
# the end's txn too large for Consul, so no deploy ended (the attacker review).
HISTORY_MAX = 1000
# \Z, not $: "$" also matches before a final newline ("web\n" would pass).
APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
#: APP_NAME_RE in words, for a message.
APP_NAME_RULE = "letters, digits, '.', '_' and '-', at most 64, not starting with . _ or -"
KV_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}\Z")
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # one word of printable ASCII: a SecretID
ONE_WORD_RULE = (
    "the token holds spaces, line breaks or other characters a Consul SecretID does not "
    "have (save the SecretID alone, not the whole `consul acl token create` output)"
)


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a Consul token (never echoing it: it is a secret, and it
    would end up in a log), or None."""
    return None if TOKEN_RE.fullmatch(token) else ONE_WORD_RULE


def read_token_file(path: str) -> str:
    """The token a token file holds, stripped; ValueError saying what is wrong with the
    file: unreadable, not text, or empty (what ``consul acl token create ... > file``
    leaves when the create failed: taken as "no token", every request would run with
    someone else's rights, the agent's anonymous token or the host's)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not text (a token is one line)") from None
    if not token:
        raise ValueError(f"{path} is empty (it should hold the token's SecretID)")
    return token


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class ConsulSettings:
    """How to reach the local Consul agent (config file first, then the CONSUL_* variables)."""

    address: str = "127.0.0.1:8500"
    scheme: str = "http"
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    timeout: float = 10.0
    # Where ``token`` came from (a key of the file or an environment variable), for the
    # message when Consul refuses it; "" without a token.
    token_from: str = field(default="", compare=False)
    # The file the token was read from (token_file or CONSUL_HTTP_TOKEN_FILE), or None.
    token_file: str | None = field(default=None, compare=False)
    # The Consul CLI's variables set in the environment to another value than the file's
    # key, which wins (a warning: CONSUL_HTTP_ADDR pointing at one cluster while the file
    # names another did nothing, silently).
    env_overridden: tuple[str, ...] = field(default=(), compare=False)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.address}"


@dataclass(frozen=True)
class S3Settings:
    """Where artifacts live."""

    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None


@dataclass(frozen=True)
class DaemonSettings:
    """Daemon-wide knobs."""

    state_dir: str = "/var/lib/watcher"
    session_ttl: float = 15.0
    listen: str | None = "127.0.0.1:9473"
    history_keep: int = 50
    undecided_after: float = 30.0
    handled_events_keep: int = 1024


@dataclass(frozen=True)
class Timeouts:
    """Per-app timeouts, in seconds."""

    download: float = 900.0
    hook: float = 300.0
    prepare: float = 600.0
    apply: float = 600.0
    lock: float = 30.0


@dataclass(frozen=True)
class Limits:
    """Per-app archive limits (anything larger is refused as a bomb).

    ``max_members``, ``max_bytes`` and ``max_ratio`` judge the archive itself (a refusal is
    remembered by sha256); ``disk_fraction`` and ``disk_reserve`` judge whether it fits on
    this host now: an extraction may use at most ``disk_fraction`` of the free space of the
    app's filesystem, and must leave ``disk_reserve`` bytes free. Why these defaults:
    docs/design.md, "Archive limits".
    """

    max_members: int = 200_000
    max_bytes: int = 20 * 1024**3
    max_ratio: float = 100.0
    disk_fraction: float = 0.5
    disk_reserve: int = 1024**3


@dataclass(frozen=True)
class WebhookSettings:
    """A chat webhook for one app's deploy notifications (JSON POST with a ``text`` field)."""

    url: str
    timeout: float = 5.0
    retries: int = 2


COMM_MAX = 15  # bytes of a process's name the kernel keeps (/proc/PID/comm)


@dataclass(frozen=True)
class AppConfig:
    """One app on this host."""

    name: str
    root: str
    keep_releases: int = 5
    user: str | None = None
    group: str | None = None
    umask: int = 0o022
    prefetch: str = "extract"
    on_validate_failure: str = "rollback"
    shared: tuple[str, ...] = ()
    #: Names (``/proc/PID/comm``) of processes whose /proc entries this host cannot read
    #: and that never use this app's releases (a VM's init): prune does not stop at them.
    prune_ignore: tuple[str, ...] = ()
    artifact_cache_bytes: int = 5 * 1024**3
    aborted_staging_max_age: float = 7 * 86400.0
    flip_delay: float = FLIP_DELAY
    #: Whether a raw `consul event -name=deploy|rollback` may start a deploy of this app
    #: (a doorbell naming an existing request is always heard). Consul's event rules are
    #: not per app: with per-app operator tokens, turn it off on every host of the app.
    raw_events: bool = True
    hooks: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    webhook: WebhookSettings | None = None

    @property
    def app_dir(self) -> Path:
        """``<root>/<app>``: everything of this app on this host lives below it."""
        return Path(self.root) / self.name


@dataclass(frozen=True)
class Config:
    """The whole configuration of one watcher."""

    source: str
    node: str | None
    kv_prefix: str
    consul: ConsulSettings
    s3: S3Settings
    daemon: DaemonSettings
    apps: Mapping[str, AppConfig]

    def app(self, name: str) -> AppConfig:
        try:
            return self.apps[name]
        except KeyError:
            known = ", ".join(sorted(self.apps)) or "none"
            raise ConfigError(
                self.source, [f"apps.{name}: no such app (configured: {known})"]
            ) from None


T = TypeVar("T")


# LibYAML's parser when PyYAML was built with it (its wheels are): a tenth of the time of
# the pure-Python parser (systemd/watcher.example.yaml: 14 ms -> 0.9 ms a load here), which
# every daemon and watcherctl start pays. The same documents: 20,000 generated texts (the
# fuzz test's shapes) parsed alike but for a tab after a scalar (`keep_releases: 5<TAB>`),
# which LibYAML reads as the scalar and the Python parser refused, a bare `!` ('' against
# None: no config either way), and which of two errors in one text is reported.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[misc,valid-type]
    """A safe loader that refuses a key given twice in one mapping (YAML keeps the last)."""


def _refuse_duplicate_keys(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool) -> None:
    seen: set[Any] = set()
    merges = 0
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            merges += 1
            if merges > 1:  # the first one's keys would win silently: `<<: [*a, *b]` says it
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    'duplicate key "<<" (merge several mappings with one: <<: [*a, *b])',
                    key_node.start_mark,
                )
            # `<<: *defaults`: the merged keys are defaults the mapping's own override
            # (construct_mapping merges them), not duplicates. A mapping written inline
            # there (`<<: {a: 1, a: 2}`, or in a list) is merged from its nodes, never
            # constructed as a mapping of its own: its keys are checked here.
            inline = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for merged in inline:
                if isinstance(merged, yaml.MappingNode):
                    _refuse_duplicate_keys(loader, merged, deep)
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f'duplicate key "{key}"', key_node.start_mark
            )


def _construct_unique_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    _refuse_duplicate_keys(loader, node, deep)
    mapping: dict[Any, Any] = loader.construct_mapping(node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


class _DecimalInt(int):
    """An integer the YAML file wrote in decimal (``27``, not ``027``): for a umask, where
    ``umask: 27`` would silently mean 0o33, not 0o027."""


def _construct_int(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> int:
    value: int = loader.construct_yaml_int(node)
    digits = str(node.value).replace("_", "").lstrip("+-")
    if digits.isdigit() and not (len(digits) > 1 and digits.startswith("0")):
        return _DecimalInt(value)
    return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _Reader:
    """Walks the parsed YAML, collecting every problem as ``path: message``."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def section(self, data: Any, path: str, known: set[str]) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            self.fail(path or "<top>", f"must be a mapping, got {_show(data)}")
            return {}
        for key in data:
            if not isinstance(key, str) or key not in known:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, f"unknown key (known: {', '.join(sorted(known))})")
        return data

    def get(
        self,
        data: dict[str, Any],
        key: str,
        path: str,
        default: T,
        convert: Callable[[Any], T],
        expected: str,
        *,
        name: str | None = None,
    ) -> T:
        """``data[key]`` converted; a problem is named ``name`` (default: path.key)."""
        if key not in data or data[key] is None:
            return default
        try:
            return convert(data[key])
        except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999, 10**400
            said = f"must be {expected}, got {_show(data[key])}"
            if isinstance(data[key], bool) and expected.startswith("one of "):
                # `prefetch: yes` read as True: the user wrote a word, not a boolean.
                said += " (YAML reads yes, no, on and off unquoted as true or false: quote it)"
            elif isinstance(data[key], int | float) and convert is _string:
                said += f" (YAML read it as {_yaml_kind(data[key])}: quote it)"
            self.fail(name or _join(path, key), said)
            return default


def _yaml_kind(value: Any) -> str:
    """What YAML made of an unquoted scalar, in its own words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return f"a {type(value).__name__}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    if isinstance(value, str):
        # Control characters escaped: an error message is one line, whatever the value.
        shown = "".join(
            c if c.isprintable() else "\\0" if c == "\0" else repr(c)[1:-1] for c in value
        )
        return '"' + shown + '"'
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _int_between(minimum: int, maximum: int) -> Callable[[Any], int]:
    at_least = _int_at_least(minimum)

    def convert(value: Any) -> int:
        if at_least(value) > maximum:
            raise ValueError
        return int(value)

    return convert


def _int_at_least(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError
        return value

    return convert


def _float_in(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], float]:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""

    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError
        number = float(value)
        if math.isnan(number) or number > high or number < low or (low_open and number == low):
            raise ValueError
        return number

    return convert


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise ValueError
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError


def parse_size(value: Any) -> int:
    """``1048576``, ``"512M"``, ``"2GiB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        if value < 0:
            raise ValueError
        return value
    if not isinstance(value, str):
        raise ValueError
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value, re.ASCII)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(value: Any, *, zero: bool = False) -> float:
    """``30``, ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"`` -> seconds (> 0, or >= 0 with
    ``zero``)."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*", value, re.ASCII)
        if not match:
            raise ValueError
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    else:
        raise ValueError
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        raise ValueError
    return seconds


def _duration_at_least(minimum: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < minimum:
            raise ValueError
        return seconds

    return convert


def parse_flip_delay(value: Any) -> float:
    """``flip_delay``: a duration from 0 (each host flips as soon as it can) to
    ``FLIP_DELAY_MAX`` seconds."""
    seconds = parse_duration(value, zero=True)
    if seconds > FLIP_DELAY_MAX:
        raise ValueError
    return seconds


def _umask(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, _DecimalInt) and value > 7:
        raise ValueError  # `umask: 27` in YAML is twenty-seven (0o33), not 0o027
    if isinstance(value, int) and 0 <= value <= 0o777:
        return int(value)
    raise ValueError


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError
        return str(value)

    return convert


def _url_parts(value: Any) -> urllib.parse.SplitResult:
    """``host[:port]`` or ``http(s)://host[:port][/]``, split; ValueError for anything else
    (a bad port, a stray path, user info, spaces, an unclosed IPv6 bracket ...)."""
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError
    parts = urllib.parse.urlsplit(value if "://" in value else f"http://{value}")
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
        raise ValueError
    if parts.query or parts.fragment or "@" in parts.netloc or not parts.hostname:
        raise ValueError
    _ = parts.port  # raises ValueError for a port that is not a number in 0-65535
    if re.fullmatch(r"[0-9.]+", parts.hostname):
        # Digits and dots are an IPv4 address or nothing (`999.1.1.1:80` passed the check
        # and failed only at `watcher run`): no host name is all digits.
        ipaddress.IPv4Address(parts.hostname)  # AddressValueError is a ValueError
    return parts


def _address(value: Any) -> str:
    """Consul's address: ``host[:port]`` or ``http(s)://host[:port]``."""
    if _url_parts(value).port == 0:
        raise ValueError
    return str(value)


def _listen(value: Any) -> str:
    """``host:port`` to listen on (port 0: any free port)."""
    if _url_parts(value).port is None:
        raise ValueError
    return str(value)


def _endpoint_url(value: Any) -> str:
    """An S3 endpoint: ``http(s)://host[:port][/path]``."""
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise ValueError
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError
    _ = parts.port
    return value


def _key_prefix(value: Any) -> str:
    """An S3 key prefix: no "." or ".." segment (hosts compare URLs against it)."""
    text = _text(value).strip("/")
    if any(part in (".", "..") for part in text.split("/")) or "//" in text:
        raise ValueError
    return text


def _absolute_dir(value: Any) -> str:
    text = _string(value)
    if not Path(text).is_absolute():
        raise ValueError
    return text


def _text_problems(data: Any, path: str, problems: list[str], seen: set[int]) -> None:
    """Every string (key or value) holding a NUL byte or a lone surrogate: no path, key or
    token can carry one, and the calls that would fail on it come long after parsing."""
    if isinstance(data, str):
        if "\0" in data:
            problems.append(f"{path or '<top>'}: contains a NUL byte")
        elif any(0xD800 <= ord(c) <= 0xDFFF for c in data):
            problems.append(f"{path or '<top>'}: contains an escaped surrogate, not text")
        return
    if not isinstance(data, dict | list) or id(data) in seen:
        return  # anchors and aliases share objects: visit each once
    seen.add(id(data))
    if isinstance(data, list):
        for i, item in enumerate(data):
            _text_problems(item, f"{path or '<top>'}[{i}]", problems, seen)
        return
    for key, item in data.items():
        where = _join(path, str(key).encode("unicode_escape").decode("ascii"))
        _text_problems(key, where, problems, seen)
        _text_problems(item, where, problems, seen)


@dataclass
class _Level:
    kind: str  # "mapping" or "sequence"
    path: str
    next_is_key: bool = True
    key: str = "?"
    index: int = 0


def nesting_problem(text: str, limit: int = MAX_NESTING) -> str | None:
    """Where ``text`` nests collections deeper than ``limit``, before PyYAML's recursive
    composer would run out of stack on it (RecursionError). Reads parser events, which
    does not recurse. Text LibYAML's parser refuses (bad syntax, or past its own depth
    limit, with a message that names no path) is read again by the pure-Python parser,
    whose events and errors say where."""
    try:
        return _nesting_problem(text, limit, _UniqueKeyLoader)
    except yaml.YAMLError:
        if _SafeLoader is yaml.SafeLoader:
            raise
        return _nesting_problem(text, limit, yaml.SafeLoader)


def _nesting_problem(text: str, limit: int, loader: type[Any]) -> str | None:
    stack: list[_Level] = []
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            stack.pop()
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue
        path = ""
        if stack:
            parent = stack[-1]
            if parent.kind == "sequence":
                path = f"{parent.path or '<top>'}[{parent.index}]"
                parent.index += 1
            elif parent.next_is_key:
                parent.next_is_key = False
                parent.key = event.value if isinstance(event, yaml.ScalarEvent) else "?"
                path = _join(parent.path, "<key>")
            else:
                parent.next_is_key = True
                path = _join(parent.path, str(parent.key))
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= limit:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                return f"{path or '<top>'}: nested more than {limit} levels deep (line {line})"
            kind = "mapping" if isinstance(event, yaml.MappingStartEvent) else "sequence"
            stack.append(_Level(kind, path))
    return None


def _is_arg(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and "\0" not in value


def _hook_list(r: _Reader, data: Any, path: str) -> tuple[tuple[str, ...], ...]:
    """A phase's hooks: a path, or a list whose items are a path or an argv list."""
    if data is None:
        return ()
    items = data if isinstance(data, list) else [data]
    hooks: list[tuple[str, ...]] = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(data, list) else path
        if isinstance(item, str) and item and "\0" not in item:
            argv: tuple[str, ...] = (item,)
        elif isinstance(item, list) and item and all(_is_arg(a) for a in item):
            argv = tuple(item)
        else:
            r.fail(where, f"must be an executable path or a list of arguments, got {_show(item)}")
            continue
        # [path, arg] where [[path, arg]] was meant: two hooks, the second one an argument
        flat = i > 0 and isinstance(item, str) and isinstance(items[0], str)
        if flat and not (Path(item).is_absolute() and _is_executable_file(item)):
            r.fail(
                where,
                f'"{item}" is not an executable file; if it is an argument of '
                f"{path}[0], write the hook as one list: "
                f"[[{', '.join(str(x) for x in items)}]]",
            )
            continue
        if not Path(argv[0]).is_absolute():
            r.fail(where, f'must be an absolute path to an executable, got "{argv[0]}"')
            continue
        hooks.append(argv)
    return tuple(hooks)


def _is_executable_file(path: str) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def _read_prune_ignore(r: _Reader, raw: Any, path: str) -> tuple[str, ...]:
    """``apps.<app>.prune_ignore``: process names as the kernel keeps them (``comm``: 1 to
    15 bytes), for processes prune cannot read and may pass over."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.fail(path, f"must be a list of process names (as /proc/PID/comm shows), got {_show(raw)}")
        return ()
    names: list[str] = []
    for i, item in enumerate(raw):
        if not isinstance(item, str) or not item or "\n" in item or "\x00" in item:
            r.fail(f"{path}[{i}]", f"must be a process name, got {_show(item)}")
        elif len(item.encode()) > COMM_MAX:
            kept = item.encode()[:COMM_MAX].decode(errors="ignore")
            r.fail(
                f"{path}[{i}]",
                f"{_show(item)} is longer than the {COMM_MAX} bytes the kernel keeps of a "
                f"process's name: it would never match; write {_show(kept)}",
            )
        else:
            names.append(item)
    return tuple(names)


def _read_app(r: _Reader, name: Any, data: Any) -> AppConfig | None:
    path = f"apps.{name}"
    if not isinstance(name, str):
        # `123:`, `true:`, `null:` (or `~:`) unquoted: YAML's number, boolean or null.
        spelled = "null" if name is None else str(name).lower() if isinstance(name, bool) else name
        r.fail(
            f"apps.{spelled}",
            f"an app name must be a string; YAML read this key as {_yaml_kind(name)}: quote it",
        )
        return None
    if not APP_NAME_RE.match(name):
        r.fail(path, "app names must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
        return None
    d = r.section(
        data,
        path,
        {
            "root",
            "keep_releases",
            "user",
            "group",
            "umask",
            "prefetch",
            "on_validate_failure",
            "shared",
            "prune_ignore",
            "artifact_cache_bytes",
            "aborted_staging_max_age",
            "flip_delay",
            "raw_events",
            "hooks",
            "timeouts",
            "limits",
            "webhook",
        },
    )
    if data is not None and not isinstance(data, dict):
        return None
    root = r.get(d, "root", path, "", _string, "an absolute directory path")
    if "root" not in d:
        r.fail(f"{path}.root", "is required")
    elif root and not Path(root).is_absolute():
        r.fail(f"{path}.root", f'must be an absolute directory path, got "{root}"')
    shared_raw = d.get("shared") or []
    shared: list[str] = []
    if not isinstance(shared_raw, list):
        r.fail(f"{path}.shared", f"must be a list of relative paths, got {_show(shared_raw)}")
    else:
        for i, item in enumerate(shared_raw):
            parts = Path(item).parts if _is_arg(item) else ()
            if not parts or Path(item).is_absolute() or ".." in parts or parts[0] == ".watcher":
                r.fail(
                    f"{path}.shared[{i}]",
                    f"must be a relative path inside the release, got {_show(item)}",
                )
            else:
                item = os.path.normpath(item)
                other = next(
                    (
                        o
                        for o in shared
                        if item == o or item.startswith(o + "/") or o.startswith(item + "/")
                    ),
                    None,
                )
                if other is not None:
                    # One would be linked inside the other's shared directory: every staging
                    # would then fail, so say it here.
                    r.fail(f"{path}.shared[{i}]", f'"{item}" overlaps "{other}" listed before it')
                else:
                    shared.append(item)
    hooks_d = r.section(d.get("hooks"), f"{path}.hooks", set(HOOK_PHASES))
    hooks = {
        phase: _hook_list(r, hooks_d.get(phase), f"{path}.hooks.{phase}") for phase in HOOK_PHASES
    }
    t = r.section(
        d.get("timeouts"), f"{path}.timeouts", {"download", "hook", "prepare", "apply", "lock"}
    )
    tp = f"{path}.timeouts"
    duration = 'a duration (seconds, or like "30s", "5m")'
    # Under a second, every download, hook, prepare or apply would run out before it began
    # (`prepare: 1ms` for `1m`, passed by check-config, aborted every deploy).
    step = 'a duration of at least 1 s (like "30s", "5m"; "ms" is milliseconds)'
    timeouts = Timeouts(
        download=r.get(t, "download", tp, Timeouts.download, _duration_at_least(1.0), step),
        hook=r.get(t, "hook", tp, Timeouts.hook, _duration_at_least(1.0), step),
        prepare=r.get(t, "prepare", tp, Timeouts.prepare, _duration_at_least(1.0), step),
        apply=r.get(t, "apply", tp, Timeouts.apply, _duration_at_least(1.0), step),
        lock=r.get(t, "lock", tp, Timeouts.lock, parse_duration, duration),
    )
    lim = r.section(
        d.get("limits"),
        f"{path}.limits",
        {"max_members", "max_bytes", "max_ratio", "disk_fraction", "disk_reserve"},
    )
    lp = f"{path}.limits"
    limits = Limits(
        max_members=r.get(
            lim, "max_members", lp, Limits.max_members, _int_at_least(1), "an integer >= 1"
        ),
        max_bytes=r.get(
            lim,
            "max_bytes",
            lp,
            Limits.max_bytes,
            parse_size,
            'a size (bytes, or like "512M", "2GiB")',
        ),
        max_ratio=r.get(
            lim, "max_ratio", lp, Limits.max_ratio, _float_in(1.0, math.inf), "a number >= 1"
        ),
        disk_fraction=r.get(
            lim,
            "disk_fraction",
            lp,
            Limits.disk_fraction,
            _float_in(0.0, 1.0, low_open=True),
            "a number > 0 and <= 1",
        ),
        disk_reserve=r.get(
            lim,
            "disk_reserve",
            lp,
            Limits.disk_reserve,
            parse_size,
            'a size (bytes, or like "512M", "2GiB")',
        ),
    )
    umask = r.get(
        d,
        "umask",
        path,
        0o022,
        _umask,
        'an octal umask like "0022" (quoted: YAML reads 27 as twenty-seven)',
    )
    if umask & 0o500:
        # Files are created ``mode & ~umask``: the app (their owner) could not read its own
        # release, or run its scripts; it shows only when a hook or the app fails.
        r.fail(
            f"{path}.umask",
            f"{umask:04o} takes {'read' if umask & 0o400 else 'execute'} permission from "
            "the files' owner: the app could not use its own release (0022 or 0027 is usual)",
        )
    return AppConfig(
        name=name,
        root=root,
        prune_ignore=_read_prune_ignore(r, d.get("prune_ignore"), f"{path}.prune_ignore"),
        keep_releases=r.get(d, "keep_releases", path, 5, _int_at_least(1), "an integer >= 1"),
        user=r.get(d, "user", path, None, _string, "a user name"),
        group=r.get(d, "group", path, None, _string, "a group name"),
        umask=umask,
        prefetch=r.get(
            d,
            "prefetch",
            path,
            "extract",
            _choice(PREFETCH_MODES),
            "one of " + ", ".join(PREFETCH_MODES),
        ),
        on_validate_failure=r.get(
            d,
            "on_validate_failure",
            path,
            "rollback",
            _choice(VALIDATE_FAILURE_MODES),
            "one of " + ", ".join(VALIDATE_FAILURE_MODES),
        ),
        shared=tuple(shared),
        artifact_cache_bytes=r.get(
            d,
            "artifact_cache_bytes",
            path,
            5 * 1024**3,
            parse_size,
            'a size (bytes, or like "512M", "2GiB")',
        ),
        aborted_staging_max_age=r.get(
            d, "aborted_staging_max_age", path, 7 * 86400.0, parse_duration, duration
        ),
        flip_delay=r.get(
            d,
            "flip_delay",
            path,
            FLIP_DELAY,
            parse_flip_delay,
            f'a duration from 0 to {FLIP_DELAY_MAX:g}s (like "100ms"; 0 flips at once)',
        ),
        raw_events=r.get(d, "raw_events", path, True, _bool, "true or false"),
        hooks=MappingProxyType(hooks),
        timeouts=timeouts,
        limits=limits,
        webhook=_read_webhook(r, d.get("webhook"), f"{path}.webhook"),
    )


def _read_webhook(r: _Reader, data: Any, path: str) -> WebhookSettings | None:
    """``apps.<app>.webhook``: url (http or https), timeout, retries; None when absent."""
    if data is None:
        return None
    d = r.section(data, path, {"url", "timeout", "retries"})
    if not isinstance(data, dict):
        return None
    url = r.get(d, "url", path, "", _string, "an http(s) URL")
    parsed = urllib.parse.urlsplit(url)
    # Said without its path or query: a chat webhook's secret is in them (the attacker
    # review: a typo in the scheme printed it whole, to the journal at each reload).
    shown = _show(f"{parsed.scheme}://{parsed.netloc.rpartition('@')[2]}/..." if url else url)
    try:
        port_ok = parsed.port is None or parsed.port > 0
    except ValueError:
        port_ok = False
    if "url" not in d:
        r.fail(f"{path}.url", "is required")
    elif parsed.scheme not in ("http", "https") or not parsed.hostname:
        r.fail(f"{path}.url", f"must be an http:// or https:// URL with a host, got {shown}")
    elif "@" in parsed.netloc:
        # urllib sends no user:password of a URL (it took it for a port, and said the
        # password in its error, logged at each message: the attacker review).
        r.fail(f"{path}.url", "must not hold a user or password (put the secret in the path)")
    elif not port_ok:
        r.fail(f"{path}.url", f"has no valid port: {shown}")
    timeout = r.get(d, "timeout", path, 5.0, parse_duration, 'a duration like "5s"')
    if timeout <= 0 or timeout > 60:
        r.fail(f"{path}.timeout", f"must be between 0 and 60 seconds, got {timeout:g}")
    retries = r.get(d, "retries", path, 2, _int_at_least(0), "an integer >= 0")
    if retries > 10:
        r.fail(f"{path}.retries", f"must be at most 10, got {retries}")
    return WebhookSettings(url=url, timeout=timeout, retries=retries)


# The Consul CLI's variable behind each key of the consul section (_consul_from_env).
CONSUL_ENV_NAMES = {
    "address": "CONSUL_HTTP_ADDR",
    "scheme": "CONSUL_HTTP_SSL",
    "token": "CONSUL_HTTP_TOKEN",
    "token_file": "CONSUL_HTTP_TOKEN_FILE",
    "ca_file": "CONSUL_CACERT",
    "cert_file": "CONSUL_CLIENT_CERT",
    "key_file": "CONSUL_CLIENT_KEY",
    "verify": "CONSUL_HTTP_SSL_VERIFY",
}


FROM_ENV = " (from the environment): "


def env_overridden_warnings(config: Config, *, leave: frozenset[str] = frozenset()) -> list[str]:
    """A Consul CLI variable set to another value than the file's key, which wins (the
    file is like the CLI's flags): said, not silently dropped. ``leave``: the variables
    the caller takes over the file itself (watcherctl's operator token)."""
    keys = {var: key for key, var in CONSUL_ENV_NAMES.items()}
    return [
        f"consul.{keys[var]}: the file's value is used, not {var} of the environment, "
        + ("which names another address" if var == "CONSUL_HTTP_ADDR" else "which differs")
        + " (unset it, or remove the key from the file to use it)"
        for var in config.consul.env_overridden
        if var not in leave
    ]


def _where_wrong(source: str, problems: list[str]) -> tuple[str, list[str]]:
    """The source and problems of a ConfigError: the file's, unless every problem is an
    environment variable's (an operator's CONSUL_HTTP_TOKEN_FILE naming no file is not the
    config file's fault, and its path in front of the message points at the wrong thing)."""
    if all(FROM_ENV in p for p in problems):
        return "environment", [p.replace(FROM_ENV, ": ", 1) for p in problems]
    return source, problems


#: What the watcher makes and manages in ``<root>/<app>`` (releases.AppLayout).
MANAGED_APP_DIRS = (".state", "releases", "artifacts", "prefetched", "shared")

TRUE_WORDS = ("1", "t", "true", "yes")  # CONSUL_HTTP_SSL's (strconv.ParseBool's, and yes/no)
FALSE_WORDS = ("0", "f", "false", "no")


def _consul_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The Consul CLI's environment variables, with their usual meaning."""
    out: dict[str, Any] = {}
    if env.get("CONSUL_HTTP_ADDR"):
        out["address"] = env["CONSUL_HTTP_ADDR"]
    ssl = env.get("CONSUL_HTTP_SSL", "").strip().lower()
    if ssl in TRUE_WORDS:
        out["scheme"] = "https"
    elif ssl and ssl not in FALSE_WORDS:
        # Read as "no" it would send the token in clear text: the Consul CLI refuses it too.
        out["ssl"] = env["CONSUL_HTTP_SSL"]
    # Consul's own precedence: CONSUL_HTTP_TOKEN_FILE wins over CONSUL_HTTP_TOKEN.
    if env.get("CONSUL_HTTP_TOKEN_FILE"):
        out["token_file"] = env["CONSUL_HTTP_TOKEN_FILE"]
    elif env.get("CONSUL_HTTP_TOKEN"):
        out["token"] = env["CONSUL_HTTP_TOKEN"]
    for var, key in (
        ("CONSUL_CACERT", "ca_file"),
        ("CONSUL_CLIENT_CERT", "cert_file"),
        ("CONSUL_CLIENT_KEY", "key_file"),
    ):
        if env.get(var):
            out[key] = env[var]
    verify = env.get("CONSUL_HTTP_SSL_VERIFY", "").strip().lower()
    if verify in TRUE_WORDS or verify in FALSE_WORDS:
        out["verify"] = verify in TRUE_WORDS
    elif verify:
        # `off` was read as true, silently (the review); the Consul CLI refuses it
        out["verify_unread"] = env["CONSUL_HTTP_SSL_VERIFY"]
    return out


def _read_consul(r: _Reader, data: Any, env: Mapping[str, str]) -> ConsulSettings:
    d = r.section(
        data,
        "consul",
        {"address", "token", "token_file", "ca_file", "cert_file", "key_file", "verify", "timeout"},
    )
    merged: dict[str, Any] = _consul_from_env(env)
    ssl = merged.pop("ssl", None)
    written = d.get("address") if d.get("address") is not None else merged.get("address")
    if ssl is not None and not str(written or "").startswith(("http://", "https://")):
        # It decides the scheme here: read as "no" (the Consul CLI warns and does), the
        # token would go unencrypted where https may have been meant.
        r.fail(
            f"CONSUL_HTTP_SSL{FROM_ENV[:-2]}",
            f"must be true or false (1, t, true, yes or 0, f, false, no), got {_show(ssl)}: "
            "read as false it would send the token unencrypted",
        )
    unread = merged.pop("verify_unread", None)
    if unread is not None and d.get("verify") is None:
        r.fail(
            f"CONSUL_HTTP_SSL_VERIFY{FROM_ENV[:-2]}",
            f"must be true or false (1, t, true, yes or 0, f, false, no), got {_show(unread)}",
        )
    from_env = set(merged)
    # The file's token and token_file both override either variable (one token is sent).
    file_token = {k: d[k] for k in ("token", "token_file") if d.get(k) is not None}
    overridden = tuple(
        sorted(
            CONSUL_ENV_NAMES[key]
            for key, value in merged.items()
            if (key in d and d[key] is not None and _differs(key, d[key], value))
            or (key in ("token", "token_file") and file_token and file_token.get(key) != value)
        )
    )
    # The file is like the CLI's flags: an explicit value there wins over the environment.
    for key in (
        "address",
        "token",
        "token_file",
        "ca_file",
        "cert_file",
        "key_file",
        "verify",
        "timeout",
    ):
        if d.get(key) is not None:
            merged[key] = d[key]
            from_env.discard(key)
            if key == "token":
                merged.pop("token_file", None)
            if key == "token_file":
                merged.pop("token", None)

    def name(key: str, value: str = "") -> str:
        """Where a value came from, for its error: the file's key or the variable (with
        ``value`` when given: the file a token_file names)."""
        shown = f" ({value})" if value else ""
        if key in from_env:
            return f"{CONSUL_ENV_NAMES[key]}{shown}{FROM_ENV[:-2]}"
        return f"consul.{key}{shown}"

    address = r.get(
        merged,
        "address",
        "consul",
        "127.0.0.1:8500",
        _address,
        'an address like "127.0.0.1:8500" or "https://host:8501"',
        name=name("address"),
    )
    scheme = str(merged.get("scheme", "http"))
    if address.startswith(("http://", "https://")):
        scheme, address = address.split("://", 1)
    address = address.rstrip("/")
    token = r.get(merged, "token", "consul", None, _string, "a token string")
    token_file = r.get(merged, "token_file", "consul", None, _string, "a file path")
    where = name("token")
    if token_file:
        # Named by the environment (CONSUL_HTTP_TOKEN_FILE) unless the file set it.
        key = name("token_file")
        where = name("token_file", token_file)
        try:
            token = read_token_file(token_file)
        except ValueError as exc:
            r.fail(key, str(exc))
            token = None
    if token is not None and not TOKEN_RE.fullmatch(token):
        # Never echoed: it is a secret, and it would end up in the journal.
        r.fail(where, ONE_WORD_RULE)
        token = None
    files: dict[str, str | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        files[key] = r.get(merged, key, "consul", None, _string, "a file path", name=name(key))
        if files[key] and not os.access(str(files[key]), os.R_OK):
            r.fail(name(key), f"cannot read {files[key]}")
    if bool(files["cert_file"]) != bool(files["key_file"]):
        r.fail("consul", "cert_file and key_file must be given together")
    return ConsulSettings(
        address=address,
        scheme=scheme,
        token=token,
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        verify=r.get(merged, "verify", "consul", True, _bool, "true or false"),
        timeout=r.get(merged, "timeout", "consul", 10.0, parse_duration, 'a duration like "10s"'),
        token_from=where if token is not None else "",
        token_file=token_file if token is not None else None,
        env_overridden=overridden,
    )


def _differs(key: str, file_value: Any, env_value: Any) -> bool:
    """Whether the file's ``key`` names another thing than the environment's variable (an
    address with and without its scheme or a trailing slash is the same one). ``verify``:
    a yes against a no (the file's ``verify: false`` silently beat CONSUL_HTTP_SSL_VERIFY,
    the docs review)."""
    if key == "verify":
        return (
            isinstance(file_value, bool)
            and isinstance(env_value, bool)
            and (file_value != env_value)
        )
    if not isinstance(file_value, str) or not isinstance(env_value, str):
        return False
    if key == "address":
        return _bare(file_value) != _bare(env_value)
    return file_value != env_value


def _bare(address: str) -> str:
    """host:port of an address (its scheme is a separate setting, CONSUL_HTTP_SSL's)."""
    return address.partition("://")[2].rstrip("/") if "://" in address else address.rstrip("/")


def parse_config(
    data: Any,
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    apps_required: bool = True,
) -> Config:
    """Validate parsed YAML; raise ConfigError listing every problem. ``apps_required``:
    the daemon and the web server need at least one app; watcherctl does not (a CI
    machine's config for `publish` needs only `consul` and `s3`)."""
    env = os.environ if env is None else env
    text_problems: list[str] = []
    _text_problems(data, "", text_problems, set())
    if text_problems:
        raise ConfigError(source, text_problems)
    r = _Reader()
    if not isinstance(data, dict):
        # Nothing below could be read: what each required key would say is only noise.
        r.fail(
            "<top>",
            "the file is empty" if data is None else f"must be a mapping, got {_show(data)}",
        )
        raise ConfigError(source, r.problems)
    top = r.section(data, "", {"node", "kv_prefix", "consul", "s3", "daemon", "apps"})
    node = r.get(top, "node", "", None, _string, "a node name")
    if node is not None and not NODE_NAME_RE.match(node):
        r.fail("node", f"must match [A-Za-z0-9][A-Za-z0-9._-]*, got {_show(node)}")
    kv_prefix = r.get(top, "kv_prefix", "", "watcher", _string, "a KV path").strip("/")
    if not KV_PREFIX_RE.match(kv_prefix or "-"):
        r.fail("kv_prefix", f'must be a KV path like "watcher", got "{kv_prefix}"')
    elif any(part in ("", ".", "..") for part in kv_prefix.split("/")):
        # Consul's HTTP server answers such a path with a redirect to the cleaned one,
        # which every request would then fail on as "invalid JSON from Consul".
        r.fail(
            "kv_prefix",
            f'must be a KV path like "watcher/prod": no empty, "." or ".." part between '
            f'its slashes, got "{kv_prefix}"',
        )
    consul = _read_consul(r, top.get("consul"), env)
    s3d = r.section(top.get("s3"), "s3", {"bucket", "prefix", "region", "endpoint_url"})
    if "s3" not in top or "bucket" not in s3d:
        r.fail("s3.bucket", "is required")
    s3 = S3Settings(
        bucket=r.get(s3d, "bucket", "s3", "", _string, "a bucket name"),
        prefix=r.get(
            s3d, "prefix", "s3", "", _key_prefix, 'a key prefix without "." or ".." parts'
        ),
        region=r.get(s3d, "region", "s3", None, _string, "a region name"),
        endpoint_url=r.get(
            s3d, "endpoint_url", "s3", None, _endpoint_url, 'a URL like "https://host:9000"'
        ),
    )
    dd = r.section(
        top.get("daemon"),
        "daemon",
        {
            "state_dir",
            "session_ttl",
            "listen",
            "history_keep",
            "undecided_after",
            "handled_events_keep",
        },
    )
    listen = DaemonSettings.listen
    if "listen" in dd:
        listen = (
            None
            if dd["listen"] in (None, False, "")
            else r.get(
                dd,
                "listen",
                "daemon",
                DaemonSettings.listen,
                _listen,
                'an address like "127.0.0.1:9473", or null to disable',
            )
        )
    daemon = DaemonSettings(
        state_dir=r.get(
            dd,
            "state_dir",
            "daemon",
            DaemonSettings.state_dir,
            _absolute_dir,
            "an absolute directory path",
        ),
        session_ttl=r.get(
            dd, "session_ttl", "daemon", 15.0, parse_duration, 'a duration like "15s"'
        ),
        listen=listen,
        history_keep=r.get(
            dd,
            "history_keep",
            "daemon",
            50,
            _int_between(2, HISTORY_MAX),
            f"an integer from 2 to {HISTORY_MAX}",
        ),
        undecided_after=r.get(
            dd, "undecided_after", "daemon", 30.0, parse_duration, 'a duration like "30s"'
        ),
        handled_events_keep=r.get(
            dd, "handled_events_keep", "daemon", 1024, _int_at_least(256), "an integer >= 256"
        ),
    )
    if not 1 <= daemon.session_ttl <= 86400:
        r.fail("daemon.session_ttl", "must be between 1s and 24h")
    apps_raw = top.get("apps")
    apps: dict[str, AppConfig] = {}
    if apps_raw is None and not apps_required:
        pass  # no `apps:`: a CI machine's config
    elif not isinstance(apps_raw, dict) or (not apps_raw and apps_required):
        what = (
            "with at least one app (watcher runs a host's apps; a config that only "
            "`watcherctl publish` reads, a CI machine's, needs none and is not for watcher)"
            if apps_required and apps_raw is None
            else "with at least one app"
            if apps_required
            else "of app names to their settings"
        )
        r.fail("apps", f"must be a mapping {what}")
    else:
        for name, app_data in apps_raw.items():
            app = _read_app(r, name, app_data)
            if app is not None:
                apps[app.name] = app
    state = Path(os.path.realpath(daemon.state_dir))
    for app in apps.values():
        app_dir = Path(os.path.realpath(app.app_dir))
        for managed in MANAGED_APP_DIRS:
            inside = app_dir / managed
            if state == inside or inside in state.parents:
                # `.state` holds the app's own instance lock: the daemon would find its
                # lock taken ("another watcher runs") at every start. The others are trees
                # the watcher removes from (prune, the cache, prefetch).
                r.fail(
                    "daemon.state_dir",
                    f"{daemon.state_dir} is inside {inside}, which app {app.name}'s watcher "
                    "keeps for itself: give the daemon a directory of its own, like "
                    f"{DaemonSettings.state_dir}",
                )
    if r.problems:
        raise ConfigError(*_where_wrong(source, r.problems))
    return Config(
        source=source,
        node=node,
        kv_prefix=kv_prefix,
        consul=consul,
        s3=s3,
        daemon=daemon,
        apps=MappingProxyType(apps),
    )


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    apps_required: bool = True,
) -> Config:
    """Read and validate a config file (default: $WATCHER_CONFIG or /etc/watcher/watcher.yaml);
    ``apps_required`` as in ``parse_config``."""
    env = os.environ if env is None else env
    if path is not None and str(path) == "":
        # `-c "$CONFIG"` with the variable unset: not the default, which may be another
        # fleet's file.
        raise ConfigError("-c", ["an empty path was given (an unset variable?)"])
    source = str(path or env.get("WATCHER_CONFIG") or DEFAULT_PATH)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        # A newcomer's first command runs without -c: say where the name came from.
        if path:
            missing = "no such file"
        elif env.get("WATCHER_CONFIG"):
            missing = "no such file (named by $WATCHER_CONFIG)"
        else:
            missing = "no such file (the default; give a config with -c FILE or $WATCHER_CONFIG)"
        raise ConfigError(source, [missing]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(source, [f"cannot read: {reason}"]) from None
    try:
        too_deep = nesting_problem(text)
        if too_deep:
            raise ConfigError(source, [too_deep])
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # not expected after nesting_problem; never a traceback
        raise ConfigError(source, ["invalid YAML: nested too deeply"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(source, [f"{where}: invalid YAML: {problem}"]) from None
    except (ValueError, TypeError, OverflowError) as exc:
        # PyYAML's constructors raise these for a well-formed scalar they cannot convert:
        # a date that does not exist (2001-02-30), an explicit tag on the wrong text
        # (!!int abc, !!float abc).
        raise ConfigError(source, [f"invalid YAML value: {exc}"]) from None
    return parse_config(data, source=source, env=env, apps_required=apps_required)
