"""The KV layout and the JSON documents stored in it (DESIGN.md sections 4 and 6.1)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from watcher import ids
from watcher.errors import PayloadError

# The rules of watcher.ids; \Z, not $: "$" also matches before a trailing newline.
ARTIFACT_ID_RE = re.compile(rf"^{ids.ARTIFACT_ID_PATTERN}\Z")
RELEASE_RE = re.compile(rf"^{ids.RELEASE_PATTERN}\Z")
DEPLOY_ID_RE = re.compile(rf"^{ids.DEPLOY_ID_PATTERN}\Z")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
MANIFEST_PATH = ".watcher/manifest.yaml"  # in an app's source tree: what `publish` packages
DOC_VERSION = 2

# Per-node states (forward-only: staging -> ready | failed | refused | aborted;
# ready -> committed | aborted; committed -> live | failed_after_commit). DESIGN.md 6.1, 6.4.
# ``committed`` and ``aborted`` are intents: a host writes them before it flips or cleans
# up, then reads the acks again, so two hosts that established opposite verdicts (one ack
# was rewritten in between) always see each other's intent (docs/design.md R4).
STAGING, READY, FAILED, REFUSED = "staging", "ready", "failed", "refused"
COMMITTED, LIVE, ABORTED, FAILED_AFTER_COMMIT = (
    "committed",
    "live",
    "aborted",
    "failed_after_commit",
)
NODE_STATES = frozenset(
    {STAGING, READY, FAILED, REFUSED, COMMITTED, LIVE, ABORTED, FAILED_AFTER_COMMIT}
)
NODE_FINAL_STATES = frozenset({FAILED, REFUSED, LIVE, ABORTED, FAILED_AFTER_COMMIT})
#: An ack that the node staged the request it names (later states keep the ack's fields).
ACKED_READY_STATES = frozenset({READY, COMMITTED, LIVE, FAILED_AFTER_COMMIT})
#: An ack that vetoes the deploy. ``aborted`` is written after a node established the abort
#: itself (over its ready ack: the intent), or before it acked ready, for an operator's
#: abort request (``write_progress(before_ready=True)``): never over a ready ack that the
#: commit predicate may already count.
ABORT_ACK_STATES = frozenset({FAILED, REFUSED, ABORTED})
#: A host that failed or said no itself: what `history` and the chat message name. Not
#: ``aborted``: that host only followed an abort another host's ack caused.
FAILING_STATES = frozenset({FAILED, REFUSED, FAILED_AFTER_COMMIT})
#: The end of a host's apply: it switched and said how its hooks after the switch went.
APPLIED_STATES = frozenset({LIVE, FAILED_AFTER_COMMIT})
NEXT_STATES: dict[str, frozenset[str]] = {
    # A quick prepare acks ready without writing staging first (one write less); a slow
    # one writes staging with its progress.
    "": frozenset({STAGING, READY, FAILED, REFUSED, ABORTED}),
    STAGING: frozenset({READY, FAILED, REFUSED, ABORTED}),
    READY: frozenset({COMMITTED, ABORTED}),
    COMMITTED: APPLIED_STATES,
}
COMMIT, ABORT = "commit", "abort"
NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
#: The most hosts one deploy may expect. Every reader of a deploy reads one progress key per
#: expected host (a txn per 128), so a request a token wrote with 20,000 names made each
#: page load and each verdict send hundreds of Consul requests. A fleet is hundreds.
MAX_EXPECTED = 1000


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """An ISO-8601 UTC timestamp with milliseconds, e.g. 2026-11-26T14:38:44.123Z."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def release_name(requested_at: datetime, artifact: str) -> str:
    """``<UTC timestamp of the deploy record>-<artifact id>``: the same on every host."""
    return f"{requested_at.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}-{artifact}"


def check_artifact_id(value: str) -> str:
    return ids.check_artifact_id(value)


def check_deploy_id(value: str) -> str:
    return ids.check_deploy_id(value)


def check_release(value: str) -> str:
    return ids.check_release_name(value)


def sanitize_branch(branch: str) -> str:
    """A branch name reduced to ``[A-Za-z0-9._-]`` (every other character becomes ``-``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", branch).lstrip("._-")
    return cleaned or "branch"


def artifact_id_for(branch: str, commit: str) -> str:
    """``<branch>-<first 8 of the commit>``; the commit must be a hex SHA (not ``HEAD``)."""
    if not re.fullmatch(r"[0-9a-fA-F]{8,64}", commit or ""):
        raise PayloadError(f"commit {commit!r} is not a hex SHA")
    suffix = "-" + commit[:8].lower()
    return check_artifact_id(sanitize_branch(branch)[: 128 - len(suffix)] + suffix)


def watcher_session_name(node: str, kv_prefix: str) -> str:
    """The name a watcher gives its Consul session: its node and its fleet's prefix. Only
    a token with session write on the Consul node a session is made on can name it, which
    `abort --end-sessions` takes as the evidence that a session is that node's watcher's
    in this fleet (a session of another fleet's watcher of the same node is not)."""
    return f"watcher {node} under {kv_prefix.strip('/')}/"


class Keys:
    """KV paths of one app under the configured prefix (layout version 2, DESIGN.md 4).

    Every key sits under a prefix whose writers an ACL prefix rule can name: node-owned
    keys start with ``.../<node>`` and nothing operators write shares a prefix with
    what only hosts write.
    """

    def __init__(self, prefix: str, app: str) -> None:
        self.base = f"{prefix.strip('/')}/apps/{app}"

    def artifact(self, artifact_id: str) -> str:
        return f"{self.base}/artifacts/{check_artifact_id(artifact_id)}"

    @property
    def artifacts_prefix(self) -> str:
        return f"{self.base}/artifacts/"

    def pin(self, artifact_id: str) -> str:
        return f"{self.base}/pins/{check_artifact_id(artifact_id)}"

    @property
    def members_prefix(self) -> str:
        return f"{self.base}/members/"

    def member(self, node: str) -> str:
        return f"{self.base}/members/{node}"

    @property
    def hosts_prefix(self) -> str:
        return f"{self.base}/hosts/"

    def host(self, node: str) -> str:
        return f"{self.base}/hosts/{node}"

    @property
    def inflight(self) -> str:
        return f"{self.base}/inflight"

    @property
    def current(self) -> str:
        return f"{self.base}/current"

    @property
    def events_seen(self) -> str:
        return f"{self.base}/events_seen"

    @property
    def history(self) -> str:
        return f"{self.base}/history"

    @property
    def requests_prefix(self) -> str:
        return f"{self.base}/requests/"

    def request(self, deploy_id: str) -> str:
        return f"{self.base}/requests/{check_deploy_id(deploy_id)}"

    def abort_request(self, deploy_id: str) -> str:
        return f"{self.base}/requests/{check_deploy_id(deploy_id)}/abort"

    @property
    def progress_prefix(self) -> str:
        return f"{self.base}/progress/"

    def node_progress_prefix(self, node: str) -> str:
        return f"{self.base}/progress/{node}/"

    def progress(self, deploy_id: str, node: str) -> str:
        return f"{self.base}/progress/{node}/{check_deploy_id(deploy_id)}"

    def carried_request(self, deploy_id: str, node: str) -> str:
        """The request a node's ready ack carries, beside the ack (written in the ack's
        txn): acks stay small, so establishing reads O(nodes) bytes, not O(nodes^2)."""
        return f"{self.base}/progress/{node}/{check_deploy_id(deploy_id)}/request"

    def coordinator(self, deploy_id: str) -> str:
        return f"{self.base}/coordinator/{check_deploy_id(deploy_id)}"

    @property
    def decisions_prefix(self) -> str:
        return f"{self.base}/decisions/"

    def decision(self, deploy_id: str) -> str:
        return f"{self.base}/decisions/{check_deploy_id(deploy_id)}"

    def outcome(self, deploy_id: str) -> str:
        return f"{self.base}/outcomes/{check_deploy_id(deploy_id)}"

    @property
    def legacy_deploys_prefix(self) -> str:
        """Layout version 1 kept every deploy under ``deploys/``; v2 only reports it."""
        return f"{self.base}/deploys/"


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_REQUIRED_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _required_names(cls: type) -> tuple[str, ...]:
    names = _REQUIRED_NAMES.get(cls)
    if names is None:
        names = _REQUIRED_NAMES[cls] = tuple(
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        )
    return names


class Document:
    """A versioned JSON document: unknown fields are ignored, missing required ones refused."""

    #: Free text fields and the most of each a reader takes (a host's token can write a
    #: 500 KB error, which the page and the live feed would send to every open page, more
    #: than once escaped). Cut at the end, or at the start for a ``TAIL_FIELDS`` one.
    TEXT_LIMITS: ClassVar[dict[str, int]] = {}
    TAIL_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def to_json(self) -> bytes:
        # A shallow dict: the fields are JSON values (no nested dataclass), so the bytes are
        # those of ``asdict``, without its deep copy of every list and dict.
        data = {name: getattr(self, name) for name in _field_names(type(self))}
        data["version"] = DOC_VERSION
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str | None, *, where: str = "") -> Self:
        label = f"{cls.__name__} at {where}" if where else cls.__name__
        if raw is None:
            raise PayloadError(f"{label}: empty")
        try:
            # NaN and Infinity are not JSON (RFC 8259); Python's parser takes them, and a
            # record carrying one would reach readers that pass it on: a browser's
            # JSON.parse refuses the live view's event that holds it, for good.
            maybe_surrogate = True
            if isinstance(raw, bytes | bytearray):
                encoding = json.detect_encoding(raw)
                # A surrogate is an escape (\u), or the bytes ED A0-BF in UTF-8: two
                # substring tests, where the regex over every ack cost more than half its
                # parse (14 of 25 us for 1.5 KB).
                maybe_surrogate = encoding != "utf-8" or b"\\u" in raw or b"\xed" in raw
                raw = raw.decode(encoding, "surrogatepass")  # as json.loads
            data = _DECODER.decode(raw)
            if maybe_surrogate and _SURROGATE_HINT.search(raw):
                data = _scrub(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError(f"{label}: not JSON ({exc})") from None
        except RecursionError:
            raise PayloadError(f"{label}: JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise PayloadError(f"{label}: not a JSON object")
        return cls.from_dict(data, label=label)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, label: str = "") -> Self:
        label = label or cls.__name__
        if not isinstance(data, dict):
            raise PayloadError(f"{label}: not a JSON object")
        kwargs: dict[str, Any] = {}
        for name in _field_names(cls):
            if name in data:
                kwargs[name] = data[name]
        for name, limit in cls.TEXT_LIMITS.items():
            value = kwargs.get(name)
            if isinstance(value, str):
                kwargs[name] = cut_text(value, limit, tail=name in cls.TAIL_FIELDS)
        missing = [name for name in _required_names(cls) if name not in kwargs]
        if missing:
            raise PayloadError(
                f"{label}: missing field{'s' if len(missing) > 1 else ''} " + ", ".join(missing)
            )
        try:
            obj = cls(**kwargs)
        except TypeError as exc:
            raise PayloadError(f"{label}: {exc}") from None
        obj.validate(label)
        return obj

    def validate(self, label: str) -> None:
        """Raise PayloadError when a field is out of range."""


def _need(cond: bool, label: str, message: str) -> None:
    if not cond:
        raise PayloadError(f"{label}: {message}")


class NotJson(ValueError):
    """What Python's JSON parser takes and JSON (RFC 8259) is not: NaN, Infinity, and
    (``STRICT_JSON``) an object naming one key twice."""


def _no_constant(name: str) -> Any:
    raise NotJson(f"{name} is not a JSON value")


class KeyTwice(NotJson):
    def __init__(self, key: str) -> None:
        super().__init__(f"{ids.shown(key)} given twice")
        self.key = key


def no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An ``object_pairs_hook``: one key given twice is refused (parsers keep the last of
    them, others the first: `{"artifact": "a", "artifact": "b"}` reads as either)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise KeyTwice(key)
        data[key] = value
    return data


# What the web API and event payloads read from outside: no constant, no key twice.
STRICT_JSON = json.JSONDecoder(object_pairs_hook=no_key_twice, parse_constant=_no_constant)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# A lone surrogate (an escape such as "\ud800" without its pair, or one in the bytes) is
# not text: a page or a JSON answer holding one cannot be sent as UTF-8 (500). The hint
# finds the documents that may hold one; the decoder joins escaped pairs, so any surrogate
# left in a decoded string is lone and becomes U+FFFD. A host's own error messages can
# carry one (a path that is not UTF-8), so they are replaced, not refused.
_SURROGATE_HINT = re.compile(r"[\ud800-\udfff]|\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\N{REPLACEMENT CHARACTER}", value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


# One decoder for every record (json.loads with these hooks would build one per call).
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def _need_strings(doc: object, label: str, *names: str) -> None:
    """Each named field is a string: readers format, compare and search in them (a list
    or a number there crashed the history page and `watcherctl history`)."""
    for name in names:
        _need(isinstance(getattr(doc, name), str), label, f"{name} must be a string")


def _need_deploy_id(value: object, label: str, name: str) -> None:
    _need(
        value is None or (isinstance(value, str) and bool(DEPLOY_ID_RE.match(value))),
        label,
        f"{name} must be a deploy id",
    )


@dataclass(frozen=True)
class ArtifactRecord(Document):
    """``apps/<app>/artifacts/<id>``: where an artifact is and what it must hash to."""

    # CI's token writes the record: its free text reaches the page, `deploy`'s refusals and
    # a refused deploy's record (a 300 KB `created_by` made that txn too large for Consul).
    TEXT_LIMITS: ClassVar[dict[str, int]] = {
        "branch": 500,
        "commit": 100,
        "build_number": 200,
        "build_url": 4000,
        "created_at": 100,
        "created_by": 500,
    }

    id: str
    url: str
    sha256: str
    size: int
    format: str = "tar.gz"
    branch: str = ""
    commit: str = ""
    build_number: str = ""
    build_url: str = ""
    created_at: str = ""
    created_by: str = ""
    #: Written by a publish before its upload, dropped once the object is uploaded and
    #: verified: until then no deploy takes the build (its object may not exist yet).
    uploading: bool = False

    def validate(self, label: str) -> None:
        _need(
            isinstance(self.id, str) and bool(ARTIFACT_ID_RE.match(self.id)),
            label,
            f"invalid id {self.id!r}",
        )
        _need(
            isinstance(self.url, str) and self.url.startswith("s3://"),
            label,
            f"url must be s3://bucket/key, got {self.url!r}",
        )
        _need(
            isinstance(self.sha256, str) and bool(SHA256_RE.match(self.sha256)),
            label,
            "sha256 must be 64 lowercase hex digits",
        )
        _need(_is_int(self.size) and self.size >= 0, label, "size must be a non-negative integer")
        _need(self.format in ("tar.gz", "tar"), label, f"unknown format {self.format!r}")
        for name in ("branch", "commit", "build_number", "build_url", "created_at", "created_by"):
            value = getattr(self, name)
            _need(
                isinstance(value, str) and "\0" not in value,
                label,
                f"{name} must be a string without NUL bytes",
            )
        _need(isinstance(self.uploading, bool), label, "uploading must be true or false")


#: What stands for the part of a free text field a reader did not take.
CUT_MARK = "[cut]"


def cut_text(value: str, limit: int, *, tail: bool = False) -> str:
    """``value`` cut to its first (``tail``: last) ``limit`` characters, CUT_MARK where
    the rest was."""
    if len(value) <= limit:
        return value
    return f"{CUT_MARK} {value[-limit:]}" if tail else f"{value[:limit]} {CUT_MARK}"


PREFETCHED_LISTED = 20  # artifact ids a host record lists as prefetched (newest first)

#: Integers in records are sizes, counts and Consul's indexes (uint64): anything past this
#: is garbage, and an int too large for a float crashed the readers that format it.
INT_LIMIT = 2**64


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -INT_LIMIT < value < INT_LIMIT


@dataclass(frozen=True)
class ReleaseRef(Document):
    """A release the fleet committed: the deploy that committed it and what it holds."""

    release: str
    artifact: str
    sha256: str
    deploy: str
    url: str = ""
    size: int = 0
    create_index: int = 0
    digest: str = ""
    format: str = "tar.gz"
    # What the build was made from, as the committed request says (a rollback's hooks get
    # them as WATCHER_BRANCH and WATCHER_COMMIT, like the deploy's own hooks did).
    branch: str = ""
    commit: str = ""

    def validate(self, label: str) -> None:
        _need(self.format in ("tar.gz", "tar"), label, f"unknown format {self.format!r}")
        _need(
            isinstance(self.release, str) and bool(RELEASE_RE.match(self.release)),
            label,
            f"invalid release {self.release!r}",
        )
        _need(
            isinstance(self.deploy, str) and bool(DEPLOY_ID_RE.match(self.deploy)),
            label,
            f"invalid deploy id {self.deploy!r}",
        )
        _need(_is_int(self.create_index), label, "create_index must be an integer")
        _need_strings(self, label, "artifact", "sha256", "url", "digest", "branch", "commit")
        _need(_is_int(self.size), label, "size must be an integer")


@dataclass(frozen=True)
class CurrentRecord(Document):
    """``apps/<app>/current``: a cache for readers of the fleet's committed release and the
    one before it. Hosts never obey it alone: they establish the named deploy's commit
    predicate themselves (DESIGN.md 6.4.6)."""

    release: str
    artifact: str
    sha256: str
    deploy: str
    url: str = ""
    size: int = 0
    create_index: int = 0
    digest: str = ""
    previous: dict[str, Any] | None = None

    def validate(self, label: str) -> None:
        # The fields of a ReleaseRef, checked as one (a host token can write `current`).
        self.ref().validate(label)
        _need(self.previous is None or isinstance(self.previous, dict), label, "bad previous")

    def ref(self) -> ReleaseRef:
        return ReleaseRef(
            self.release,
            self.artifact,
            self.sha256,
            self.deploy,
            self.url,
            self.size,
            self.create_index,
            self.digest,
        )

    def previous_ref(self) -> ReleaseRef | None:
        if not self.previous:
            return None
        return ReleaseRef.from_dict(self.previous, label="current.previous")


@dataclass(frozen=True)
class DeployRecord(Document):
    """``apps/<app>/requests/<id>``: the deploy request (what, to whom, by when).

    Immutable: each host reads it once (its ModifyIndex must equal its CreateIndex),
    journals it with its digest and CreateIndex, and carries it in its ready ack.
    ``sessions`` names, for every expected node, the session that held its member key
    when the request was made.
    """

    id: str
    app: str
    kind: str
    artifact: str
    sha256: str
    release: str
    requested_by: str
    requested_at: str
    expected: list[str]
    prepare_deadline: str
    apply_deadline: str
    url: str = ""
    size: int = 0
    format: str = "tar.gz"
    branch: str = ""
    commit: str = ""
    sessions: dict[str, str] = field(default_factory=dict)
    allow_missing: bool = False
    resume_of: str | None = None
    rollback_of: str | None = None
    target_deploy: str | None = None
    min_protocol: int = 2

    def validate(self, label: str) -> None:
        _need(
            isinstance(self.id, str) and bool(DEPLOY_ID_RE.match(self.id)),
            label,
            f"invalid deploy id {self.id!r}",
        )
        _need(isinstance(self.app, str) and bool(NODE_RE.match(self.app)), label, "invalid app")
        _need(self.kind in ("deploy", "rollback"), label, f"unknown kind {self.kind!r}")
        _need(
            isinstance(self.artifact, str) and bool(ARTIFACT_ID_RE.match(self.artifact)),
            label,
            f"invalid artifact id {self.artifact!r}",
        )
        if isinstance(self.expected, list) and len(self.expected) > MAX_EXPECTED:
            raise PayloadError(
                f"{label}: expected lists {len(self.expected)} nodes, more than {MAX_EXPECTED}"
            )
        _need(
            isinstance(self.expected, list)
            and all(isinstance(n, str) and NODE_RE.match(n) for n in self.expected),
            label,
            "expected must be a list of node names",
        )
        _need(len(set(self.expected)) == len(self.expected), label, "expected lists a node twice")
        _need(
            isinstance(self.sessions, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.sessions.items()),
            label,
            "sessions must map node names to session ids",
        )
        _need(
            isinstance(self.release, str) and bool(RELEASE_RE.match(self.release)),
            label,
            f"invalid release {self.release!r}",
        )
        _need(
            self.sha256 == ""
            or (isinstance(self.sha256, str) and bool(SHA256_RE.match(self.sha256))),
            label,
            "sha256 must be 64 lowercase hex digits",
        )
        _need(_is_int(self.size) and self.size >= 0, label, "size must be a non-negative integer")
        _need(isinstance(self.url, str), label, "url must be a string")
        _need(self.format in ("tar.gz", "tar"), label, f"unknown format {self.format!r}")
        _need(_is_int(self.min_protocol), label, "min_protocol must be an integer")
        _need(isinstance(self.allow_missing, bool), label, "allow_missing must be a boolean")
        for name in ("resume_of", "rollback_of", "target_deploy"):
            value = getattr(self, name)
            _need(
                value is None or (isinstance(value, str) and bool(DEPLOY_ID_RE.match(value))),
                label,
                f"{name} must be a deploy id",
            )
        for name in ("requested_by", "branch", "commit"):
            _need(isinstance(getattr(self, name), str), label, f"{name} must be a string")
        for name in ("requested_at", "prepare_deadline", "apply_deadline"):
            value = getattr(self, name)
            try:
                if not isinstance(value, str):
                    raise TypeError(name)
                parse_iso(value)
            except (TypeError, ValueError, OverflowError):
                raise PayloadError(f"{label}: {name} is not a timestamp") from None

    def canonical(self) -> bytes:
        """The canonical JSON every host hashes: the same bytes for the same request.

        Made once per record: a record is frozen and nothing changes its lists in place,
        and a host hashes and copies its request several times a deploy (~0.2 ms each at
        100 expected hosts, mostly ``asdict``'s deep copy)."""
        cached: bytes | None = self.__dict__.get("_canonical")
        if cached is None:
            cached = self.to_json()
            object.__setattr__(self, "_canonical", cached)
        return cached

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.canonical())
        return data


@dataclass(frozen=True)
class NodeProgress(Document):
    """``progress/<node>/<id>``: one node's ack in one deploy, written only by that node.

    Forward-only. A ready ack (and every later state) names the request digest and
    CreateIndex it journaled and carries the canonical request itself, so a host that
    did not take part can rebuild the request from any ack (DESIGN.md 6.4.2).
    """

    # The daemon writes at most 2,000 and 4,000 characters (``write_progress``); the rest
    # are names, digests and timestamps, cut far above what it writes.
    TEXT_LIMITS: ClassVar[dict[str, int]] = {
        "error": 4000,
        "output_tail": 8000,
        "flipped_from": 200,
        "release": 200,
        "sha256": 100,
        "deploy": 100,
        "digest": 100,
    }
    # ``timings``: what the daemon writes is a few "<phase>_at" timestamps. The end copies
    # every host's into the outcome, in a txn Consul caps at 512 KB: one host's token
    # padding its own (450 KB) made every end fail, so no deploy ended (the attacker
    # review). Entries past these bounds are dropped on read.
    TIMINGS_KEPT: ClassVar[int] = 16
    TIMING_NAME_RE: ClassVar[re.Pattern[str]] = re.compile(r"^[a-z][a-z0-9_]{0,39}\Z")
    TIMING_VALUE_MAX: ClassVar[int] = 64
    TAIL_FIELDS: ClassVar[frozenset[str]] = frozenset({"output_tail"})

    node: str
    state: str
    deploy: str = ""
    error: str = ""
    output_tail: str = ""
    timings: dict[str, str] = field(default_factory=dict)
    digest: str = ""
    create_index: int = 0
    release: str = ""
    sha256: str = ""
    request: dict[str, Any] | None = None
    staged_bytes: int = 0
    staged_members: int = 0
    # With the live (or failed_after_commit) ack of a host that flipped in this deploy:
    # the release `current` named on it just before ("" otherwise, and in acks of older
    # versions). Node-owned: `current.previous`, which any host's token can rewrite, is
    # checked against it (DeployStore.check_current, rollback_target).
    flipped_from: str = ""

    def validate(self, label: str) -> None:
        _need(
            isinstance(self.state, str) and self.state in NODE_STATES,
            label,
            f"unknown state {self.state!r}",
        )
        _need(isinstance(self.node, str) and bool(NODE_RE.match(self.node)), label, "bad node")
        _need(_is_int(self.create_index), label, "create_index must be an integer")
        _need(isinstance(self.digest, str), label, "digest must be a string")
        _need(
            isinstance(self.timings, dict)
            and all(isinstance(v, str) for v in self.timings.values()),
            label,
            "timings must map names to strings",
        )
        _need(self.request is None or isinstance(self.request, dict), label, "bad request")
        _need(
            _is_int(self.staged_bytes) and _is_int(self.staged_members),
            label,
            "staged_bytes and staged_members must be integers",
        )
        for name in ("error", "output_tail", "release", "sha256", "deploy", "flipped_from"):
            _need(isinstance(getattr(self, name), str), label, f"{name} must be a string")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, label: str = "") -> Self:
        timings = data.get("timings") if isinstance(data, dict) else None
        # (a value that is no string is refused by ``validate``, as before)
        if isinstance(timings, dict) and all(isinstance(v, str) for v in timings.values()):
            kept = {
                k: v
                for k, v in timings.items()
                if cls.TIMING_NAME_RE.match(k) and len(v) <= cls.TIMING_VALUE_MAX
            }
            if len(kept) != len(timings) or len(kept) > cls.TIMINGS_KEPT:
                data = {**data, "timings": dict(list(kept.items())[: cls.TIMINGS_KEPT])}
        return super().from_dict(data, label=label)

    def acked_ready(self, digest: str) -> bool:
        return self.state in ACKED_READY_STATES and self.digest == digest

    def embedded_request(self, carried: bytes | None = None) -> DeployRecord | None:
        """The request this ack carries (its ``request`` field, or the document stored at
        ``Keys.carried_request``), if it parses and matches the ack's digest."""
        try:
            if carried is not None:
                request = DeployRecord.from_json(carried, where="carried request")
            elif self.request:
                request = DeployRecord.from_dict(dict(self.request), label="ack's request")
            else:
                return None
        except PayloadError:
            return None
        if self.state not in ACKED_READY_STATES:
            return None
        return request if request.digest() == self.digest else None


@dataclass(frozen=True)
class Decision(Document):
    """``decisions/<id>``: a record and a wake-up of what a host established; never obeyed
    alone. Written once (check-not-exists) in a txn that also rewrites the writer's own
    progress key, so the ACLs vouch for ``by``."""

    TEXT_LIMITS: ClassVar[dict[str, int]] = {"reason": 8000}

    outcome: str
    reason: str
    by: str
    at: str
    digest: str = ""
    create_index: int = 0
    release: str = ""
    artifact: str = ""
    url: str = ""
    size: int = 0
    sha256: str = ""
    expected: list[str] = field(default_factory=list)
    requested_by: str = ""
    requested_at: str = ""

    def validate(self, label: str) -> None:
        _need(self.outcome in (COMMIT, ABORT), label, f"unknown outcome {self.outcome!r}")
        _need_strings(
            self,
            label,
            *("reason", "by", "at", "digest", "release", "artifact", "url", "sha256"),
            *("requested_by", "requested_at"),
        )
        _need(_is_int(self.create_index) and _is_int(self.size), label, "bad create_index")
        _need(
            isinstance(self.expected, list)
            and len(self.expected) <= MAX_EXPECTED
            and all(isinstance(n, str) for n in self.expected),
            label,
            f"expected must be a list of at most {MAX_EXPECTED} node names",
        )


@dataclass(frozen=True)
class AbortRequest(Document):
    """``requests/<id>/abort``: an operator's (or host's) request to abort before the acks."""

    by: str
    at: str
    reason: str = ""

    def validate(self, label: str) -> None:
        _need_strings(self, label, "by", "at", "reason")


@dataclass(frozen=True)
class Outcome(Document):
    """``outcomes/<id>``: how the deploy ended, with a per-host summary."""

    TEXT_LIMITS: ClassVar[dict[str, int]] = {"reason": 8000}

    result: str
    at: str
    by: str
    reason: str = ""
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollback_deploy: str | None = None

    def validate(self, label: str) -> None:
        _need_strings(self, label, "result", "at", "by", "reason")
        _need(
            isinstance(self.hosts, dict) and all(isinstance(h, dict) for h in self.hosts.values()),
            label,
            "hosts must map node names to objects",
        )
        _need_deploy_id(self.rollback_deploy, label, "rollback_deploy")


@dataclass(frozen=True)
class HostRecord(Document):
    """``apps/<app>/hosts/<node>``: persistent, so a dead host still shows in status."""

    # Every field is its host's token's word, shown by `status --fleet`, the page and its
    # live feed: none is taken longer than a watcher writes it (`prefetched`: the first
    # PREFETCHED_LISTED ids, each at most ID_SHOWN characters).
    TEXT_LIMITS: ClassVar[dict[str, int]] = {
        "hold": 2000,
        "alarm": 2000,
        "broken": 2000,
        "release": 200,
        "last_seen": 64,
        "watcher_version": 100,
        "state": 200,
    }
    ID_SHOWN: ClassVar[int] = 200

    node: str
    release: str | None
    last_seen: str
    watcher_version: str = ""
    state: str = ""
    # Issue 11 (the web page): artifact ids this host holds verified, newest first (bounded),
    # and the reason of an operator's hold on the app here and who placed it ("" when none).
    prefetched: list[str] = field(default_factory=list)
    hold: str = ""
    alarm: str = ""
    first_index: int = 0  # since when it is in this app's fleet (6.4.5; AppAgent.first_index)
    # Why the release `current` names is not served here (its tree removed or emptied by
    # hand); "" while it is. Readers of older watchers' records get "".
    broken: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, label: str = "") -> Self:
        listed = data.get("prefetched") if isinstance(data, dict) else None
        if isinstance(listed, list) and (
            len(listed) > PREFETCHED_LISTED
            or any(isinstance(p, str) and len(p) > cls.ID_SHOWN for p in listed)
        ):
            cut = [p[: cls.ID_SHOWN] if isinstance(p, str) else p for p in listed]
            data = {**data, "prefetched": cut[:PREFETCHED_LISTED]}
        return super().from_dict(data, label=label)

    def validate(self, label: str) -> None:
        # node is a dict key of every reader (status, the barrier): a list there crashes them
        _need(isinstance(self.node, str) and bool(self.node), label, "node must be a name")
        _need(
            self.release is None or isinstance(self.release, str),
            label,
            "release must be a string or null",
        )
        for name in ("last_seen", "watcher_version", "state"):
            _need(isinstance(getattr(self, name), str), label, f"{name} must be a string")
        _need(
            isinstance(self.prefetched, list) and all(isinstance(p, str) for p in self.prefetched),
            label,
            "prefetched must be a list of artifact ids",
        )
        _need(isinstance(self.hold, str) and isinstance(self.alarm, str), label, "bad hold")
        _need(isinstance(self.broken, str), label, "broken must be a string")
        _need(_is_int(self.first_index), label, "first_index must be an integer")


@dataclass(frozen=True)
class MemberRecord(Document):
    """``apps/<app>/members/<node>``: held by the node's session (behavior=delete), so its
    presence is what counts. Its value also carries the decided mark: the node that first
    establishes a deploy's verdict rewrites its own member key in the txn of its intent
    (``decided``: deploy, outcome, digest), and every host's members watch answers at once
    (docs/design.md R4 says what a ready host may do on it: write its intent, not act)."""

    node: str
    watcher: str = ""
    since: str = ""
    decided: dict[str, str] = field(default_factory=dict)

    def validate(self, label: str) -> None:
        _need(isinstance(self.node, str) and bool(self.node), label, "node must be a name")
        _need(
            isinstance(self.watcher, str) and isinstance(self.since, str),
            label,
            "watcher and since must be strings",
        )
        _need(
            isinstance(self.decided, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.decided.items()),
            label,
            "decided must map names to strings",
        )


@dataclass(frozen=True)
class PinRecord(Document):
    """``pins/<artifact-id>``: the url, size and sha256 the first verifying host saw.

    Created once (cas=0) by hosts only; an artifact record that differs is refused."""

    artifact: str
    url: str
    size: int
    sha256: str
    by: str = ""
    at: str = ""

    def validate(self, label: str) -> None:
        _need(
            isinstance(self.sha256, str) and bool(SHA256_RE.match(self.sha256)),
            label,
            "sha256 must be 64 lowercase hex digits",
        )
        _need(_is_int(self.size) and self.size >= 0, label, "size must be a non-negative integer")
        _need_strings(self, label, "artifact", "url", "by", "at")

    def differs(self, record: ArtifactRecord) -> str | None:
        """Why ``record`` is not the content this id was pinned to (None: it is)."""
        if (record.sha256, record.size, record.url) == (self.sha256, self.size, self.url):
            return None
        return (
            f"artifact {self.artifact}: record says sha256 {record.sha256} ({record.size} bytes, "
            f"{record.url}) but it was pinned to sha256 {self.sha256} ({self.size} bytes, "
            f"{self.url}) when first verified; an artifact id names one content forever"
        )
