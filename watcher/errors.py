"""The project's exception tree; library errors are translated into it at the boundaries.

::

    WatcherError
    ├── ConfigError                 bad or unreadable configuration (lists every problem)
    ├── ConsulError                 anything that went wrong talking to Consul
    │   ├── ConsulUnavailable       connection refused/reset, timeout, 5xx after retries
    │   ├── ConsulPermissionDenied  403: the ACL token lacks a permission or is unknown
    │   ├── ConsulTLSError          certificate verification or TLS handshake failed
    │   └── ConsulRequestError      Consul refused the request itself (4xx other than 403)
    ├── S3Error                     anything that went wrong talking to S3
    │   ├── S3Unavailable           endpoint unreachable, throttled or 5xx after retries
    │   ├── S3AccessDenied          credentials refused
    │   └── S3NotFound              no such bucket or object
    ├── ArtifactError               an artifact cannot be used
    │   ├── ArtifactNotFound        no KV record for the id
    │   ├── ArtifactRefused         record invalid or URL outside the configured bucket/prefix
    │   └── ArtifactIntegrityError  size or sha256 does not match the record
    ├── ReleaseError                staging, flipping or pruning a release failed
    │   ├── ArchiveRefused          a hostile or broken archive (names the member)
    │   ├── StagingError            extraction failed (disk full, permissions ...)
    │   │   └── ArchiveDoesNotFit   the archive would not fit in this host's free disk space
    │   ├── StagingCancelled        the caller cancelled staging (abort, deadline, shutdown)
    │   ├── FlipError               `current` could not be switched
    │   ├── ReleaseNotFound         no such release on this host
    │   └── LockTimeout             another actor holds the app's lock
    ├── HookError                   a hook failed or timed out (phase, exit status, output tail)
    ├── PayloadError                an event payload or KV document that does not validate
    └── DeployError                 a deploy request that cannot be carried out
        ├── DeployInFlight          another deploy of the app is in flight
        ├── DeployRefused           refused for a stated reason (missing hosts, hold ...)
        │   └── RollbackTargetUnknown   a rollback to a release nothing in KV names
        └── DeployNotFound          no such deploy
"""

from __future__ import annotations


class WatcherError(Exception):
    """Base of every error the project raises on purpose; ``str()`` is a one-line message."""


class ConfigError(WatcherError):
    """The configuration is invalid; ``problems`` lists each one as ``path: message``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        joined = "; ".join(self.problems)
        super().__init__(f"{source}: {joined}")


class ConsulError(WatcherError):
    """Talking to Consul failed."""

    #: ``time.monotonic()`` when the call that failed began (retries included; 0.0: not
    #: known), set by ``ConsulClient``.
    started_at: float = 0.0


class ConsulUnavailable(ConsulError):
    """Consul could not be reached or answered with a server error."""


class ConsulPermissionDenied(ConsulError):
    """Consul refused the ACL token for this request."""

    #: Consul does not know the token ("ACL not found": deleted, expired, mistyped), rather
    #: than the token lacking a permission.
    unknown_token: bool = False


class ConsulTLSError(ConsulError):
    """The TLS connection to Consul failed (certificate, CA or handshake)."""


class ConsulRequestError(ConsulError):
    """Consul refused the request (4xx other than 403)."""


class S3Error(WatcherError):
    """Talking to S3 failed."""


class S3Unavailable(S3Error):
    """S3 could not be reached, throttled, or answered with a server error."""


class S3AccessDenied(S3Error):
    """S3 refused the credentials."""


class S3NotFound(S3Error):
    """No such bucket or object."""


class ArtifactError(WatcherError):
    """An artifact cannot be used."""


class ArtifactNotFound(ArtifactError):
    """No artifact record exists for the id."""


class ArtifactRefused(ArtifactError):
    """The artifact record is invalid or points outside the configured bucket/prefix."""


class ArtifactIdTaken(ArtifactRefused):
    """An artifact id already published with other bytes: refused because of state (an id
    names one content forever), not a failure of this publish (exit 4)."""


class ArtifactIntegrityError(ArtifactError):
    """The downloaded bytes do not match the record's size or sha256."""


class ReleaseError(WatcherError):
    """Staging, flipping or pruning a release failed."""


class ArchiveRefused(ReleaseError):
    """The archive is hostile or broken; the message names the offending member."""


class StagingError(ReleaseError):
    """Extraction or staging failed for a reason other than the archive's content."""


class ArchiveDoesNotFit(StagingError):
    """The archive needs more disk than this host may give it now (free space, reserve).

    Not a verdict on the archive: it may fit once space is freed, so it is not remembered
    as refused.
    """


class StagingCancelled(ReleaseError):
    """Staging was stopped because the caller's ``cancel()`` said so; nothing is left behind."""


class FlipError(ReleaseError):
    """`current` could not be switched."""


class ReleaseNotFound(ReleaseError):
    """No such release is staged on this host."""


class LockTimeout(ReleaseError):
    """The app's lock is held by another actor."""


class HookError(WatcherError):
    """A hook failed or timed out; ``result`` says which (``watcher.hooks.HOOK_RESULTS``)."""

    def __init__(
        self,
        phase: str,
        hook: str,
        message: str,
        output_tail: str = "",
        *,
        result: str = "failed",
    ) -> None:
        self.phase = phase
        self.hook = hook
        self.output_tail = output_tail
        self.result = result
        what = "command" if phase == "exec" else f"{phase} hook"  # `watcherctl exec` runs no hook
        super().__init__(f"{what} {hook}: {message}")


class PayloadError(WatcherError):
    """An event payload or KV document does not validate."""


class DeployError(WatcherError):
    """A deploy request cannot be carried out."""


class DeployInFlight(DeployError):
    """Another deploy of the app is in flight (the message names how to abort it)."""


class DeployRefused(DeployError):
    """The deploy was refused for the stated reason."""


class RollbackTargetUnknown(DeployRefused):
    """A rollback names a release that no deploy in KV names (bad input, like an unknown
    artifact; a refusal to whatever catches refusals)."""


class DeployNotFound(DeployError):
    """No deploy of that id (a name that does not exist: bad input, not refused state)."""
