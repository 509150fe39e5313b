"""The KV layout and the JSON documents stored in it (DESIGN.md sections 4 and 6.1)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Self

from watcher.errors import PayloadError

ARTIFACT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RELEASE_RE = re.compile(r"^\d{8}T\d{6}Z-[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEPLOY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_PATH = ".watcher/manifest.yaml"  # in an app's source tree: what `publish` packages
DOC_VERSION = 1

# Per-node states (forward-only: staging -> ready | failed; ready -> live | aborted |
# failed_after_commit).
STAGING, READY, FAILED = "staging", "ready", "failed"
LIVE, ABORTED, FAILED_AFTER_COMMIT = "live", "aborted", "failed_after_commit"
NODE_FINAL_STATES = frozenset({FAILED, LIVE, ABORTED, FAILED_AFTER_COMMIT})
NEXT_STATES: dict[str, frozenset[str]] = {
    "": frozenset({STAGING, FAILED, ABORTED}),
    STAGING: frozenset({READY, FAILED, ABORTED}),
    READY: frozenset({LIVE, ABORTED, FAILED_AFTER_COMMIT}),
}
COMMIT, ABORT = "commit", "abort"


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
    if not isinstance(value, str) or not ARTIFACT_ID_RE.match(value):
        raise PayloadError(f"invalid artifact id {value!r}: must match {ARTIFACT_ID_RE.pattern}")
    return value


def check_release(value: str) -> str:
    if not isinstance(value, str) or not RELEASE_RE.match(value):
        raise PayloadError(
            f"invalid release name {value!r}: must look like 20261126T143844Z-master-15eb13af"
        )
    return value


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


class Keys:
    """KV paths of one app under the configured prefix."""

    def __init__(self, prefix: str, app: str) -> None:
        self.base = f"{prefix.strip('/')}/apps/{app}"

    def artifact(self, artifact_id: str) -> str:
        return f"{self.base}/artifacts/{artifact_id}"

    @property
    def artifacts_prefix(self) -> str:
        return f"{self.base}/artifacts/"

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
    def deploys_prefix(self) -> str:
        return f"{self.base}/deploys/"

    def deploy(self, deploy_id: str) -> str:
        return f"{self.base}/deploys/{deploy_id}"

    def deploy_prefix(self, deploy_id: str) -> str:
        return f"{self.base}/deploys/{deploy_id}/"

    def nodes_prefix(self, deploy_id: str) -> str:
        return f"{self.base}/deploys/{deploy_id}/nodes/"

    def node_progress(self, deploy_id: str, node: str) -> str:
        return f"{self.base}/deploys/{deploy_id}/nodes/{node}"

    def coordinator(self, deploy_id: str) -> str:
        return f"{self.base}/deploys/{deploy_id}/coordinator"

    def decision(self, deploy_id: str) -> str:
        return f"{self.base}/deploys/{deploy_id}/decision"

    def outcome(self, deploy_id: str) -> str:
        return f"{self.base}/deploys/{deploy_id}/outcome"


class Document:
    """A versioned JSON document: unknown fields are ignored, missing required ones refused."""

    def to_json(self) -> bytes:
        data = asdict(self)  # type: ignore[call-overload]
        data["version"] = DOC_VERSION
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str | None, *, where: str = "") -> Self:
        label = f"{cls.__name__} at {where}" if where else cls.__name__
        if raw is None:
            raise PayloadError(f"{label}: empty")
        try:
            data = json.loads(raw)
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
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                kwargs[f.name] = data[f.name]
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


@dataclass(frozen=True)
class ArtifactRecord(Document):
    """``apps/<app>/artifacts/<id>``: where an artifact is and what it must hash to."""

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
        _need(
            isinstance(self.size, int) and not isinstance(self.size, bool) and self.size >= 0,
            label,
            "size must be a non-negative integer",
        )
        _need(self.format in ("tar.gz", "tar"), label, f"unknown format {self.format!r}")
        for name in ("branch", "commit", "build_number", "build_url", "created_at", "created_by"):
            value = getattr(self, name)
            _need(
                isinstance(value, str) and "\0" not in value,
                label,
                f"{name} must be a string without NUL bytes",
            )


@dataclass(frozen=True)
class ReleaseRef(Document):
    """A release the fleet committed: the pieces needed to restage it anywhere."""

    release: str
    artifact: str
    sha256: str
    deploy: str

    def validate(self, label: str) -> None:
        _need(
            isinstance(self.release, str) and bool(RELEASE_RE.match(self.release)),
            label,
            f"invalid release {self.release!r}",
        )


@dataclass(frozen=True)
class CurrentRecord(Document):
    """``apps/<app>/current``: the fleet's committed release and the one before it."""

    release: str
    artifact: str
    sha256: str
    deploy: str
    previous: dict[str, str] | None = None

    def ref(self) -> ReleaseRef:
        return ReleaseRef(self.release, self.artifact, self.sha256, self.deploy)

    def previous_ref(self) -> ReleaseRef | None:
        if not self.previous:
            return None
        return ReleaseRef.from_dict(self.previous, label="current.previous")


@dataclass(frozen=True)
class DeployRecord(Document):
    """``apps/<app>/deploys/<id>``: what to deploy, to whom, by when."""

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
    resume_of: str | None = None
    rollback_of: str | None = None
    min_protocol: int = 1

    def validate(self, label: str) -> None:
        _need(
            isinstance(self.id, str) and bool(DEPLOY_ID_RE.match(self.id)),
            label,
            f"invalid deploy id {self.id!r}",
        )
        _need(self.kind in ("deploy", "rollback"), label, f"unknown kind {self.kind!r}")
        _need(
            isinstance(self.expected, list) and all(isinstance(n, str) for n in self.expected),
            label,
            "expected must be a list of node names",
        )
        _need(
            isinstance(self.release, str) and bool(RELEASE_RE.match(self.release)),
            label,
            f"invalid release {self.release!r}",
        )
        for name in ("requested_at", "prepare_deadline", "apply_deadline"):
            value = getattr(self, name)
            try:
                if not isinstance(value, str):
                    raise TypeError(name)
                parse_iso(value)
            except (TypeError, ValueError, OverflowError):
                raise PayloadError(f"{label}: {name} is not a timestamp") from None


@dataclass(frozen=True)
class NodeProgress(Document):
    """``deploys/<id>/nodes/<node>``: one node's progress, forward-only."""

    node: str
    state: str
    error: str = ""
    output_tail: str = ""
    timings: dict[str, str] = field(default_factory=dict)

    def validate(self, label: str) -> None:
        known = {STAGING, READY, FAILED, LIVE, ABORTED, FAILED_AFTER_COMMIT}
        _need(
            isinstance(self.state, str) and self.state in known,
            label,
            f"unknown state {self.state!r}",
        )


@dataclass(frozen=True)
class Decision(Document):
    """``deploys/<id>/decision``: commit or abort, written exactly once."""

    outcome: str
    reason: str
    by: str
    at: str

    def validate(self, label: str) -> None:
        _need(self.outcome in (COMMIT, ABORT), label, f"unknown outcome {self.outcome!r}")


@dataclass(frozen=True)
class Outcome(Document):
    """``deploys/<id>/outcome``: how the deploy ended, with a per-host summary."""

    result: str
    at: str
    by: str
    reason: str = ""
    hosts: dict[str, dict[str, str]] = field(default_factory=dict)
    rollback_deploy: str | None = None


@dataclass(frozen=True)
class HostRecord(Document):
    """``apps/<app>/hosts/<node>``: persistent, so a dead host still shows in status."""

    node: str
    release: str | None
    last_seen: str
    watcher_version: str = ""
    state: str = ""

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
