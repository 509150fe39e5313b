"""The HTTP API and page of `watcher web`: a thin layer over watcherctl's fleet functions."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import math
import re
import shlex
import sys
import time
import typing
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from watcher import __version__, ids
from watcher.barrier import CONTESTED, DeployStore, summarize_states
from watcher.config import APP_NAME_RE, Config
from watcher.consul_api import ConsulClient
from watcher.ctl import committed_end, user_at_host
from watcher.ctl_fleet import (
    abort_deploy,
    abort_requested_label,
    allow_missing_label,
    build_rows,
    contested_reason,
    deploy_history_checked,
    deploy_request,
    deploy_summary,
    fleet_status,
    fleet_still_on,
    held_warning,
    host_records,
    in_flight_note,
    not_ended,
    redeploy_warning,
    rollback_request,
    shown_decision,
    stalled_in,
    stalled_line,
    start_deploy,
)
from watcher.errors import (
    ArtifactError,
    ConfigError,
    ConsulError,
    ConsulPermissionDenied,
    ConsulRequestError,
    ConsulTLSError,
    ConsulUnavailable,
    DeployError,
    PayloadError,
    RollbackTargetUnknown,
)
from watcher.log import get_logger
from watcher.records import STRICT_JSON, NotJson, parse_iso
from watcher.web.live import LiveFeed, Published, Snapshot

log = get_logger(module="web")

HERE = Path(__file__).resolve().parent
MAX_BODY = 16 * 1024  # bytes: a write's JSON body is a few dozen; anything bigger is refused
# The API takes one query parameter (`limit`): a longer query string is refused before it is
# parsed (a 128 kB one of 33,000 names cost 13 s of the event loop in the DoS review).
MAX_QUERY = 1024
HISTORY_LIMIT = 20
HISTORY_MAX = 200  # the most deploys one history request may ask for
LIVE_LOOKBACK = 5  # deploys of the history the live view tries when the newest cannot be read
# FastAPI's 400 detail when parsing the body raised anything but a JSON decode error.
UNPARSED_BODY = "There was an error parsing the body"
SECTIONS_EVERY = 2.0  # seconds between reads of the fleet/builds digest during a deploy
SSE_KEEPALIVE = 15.0  # seconds between comments on an idle stream (proxies drop silent ones)
SSE_MAX_STREAMS = 200  # live streams open at once; one more is a 503, not another task
# Live streams one caller (one token; or this host's callers without one) may hold at once:
# a reader cannot take every slot and leave the on-call's page without its live view.
SSE_MAX_PER_CALLER = 20
SSE_RETRY_AFTER = 10  # seconds a refused stream is told to wait (Retry-After of its 429/503)
CONSUL_RETRY_AFTER = 5  # seconds (Retry-After of a 503: Consul did not answer)
# A stream opened with a token reads with the server's own client (one watcher per app), so
# the caller's read is asked of Consul again this often: a token revoked or stripped of its
# read loses its stream within about this much (plus a keep-alive), not when it closes.
SSE_TOKEN_RECHECK = 30.0
# Headers a proxy adds: a request that carries one came through a proxy, not from this host.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
METHODS = frozenset({"GET", "HEAD", "POST", "OPTIONS"})  # metric label; anything else: other
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LIVE = "/api/v1/apps/{app}/live"  # the server-sent events: a HEAD of its own
HISTORY_PATH = re.compile(r"/api/v1/apps/[^/]+/deploys")  # the one that takes `limit`
# Every answer: never framed (no clickjacking of the buttons), types never sniffed.
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    # The page loads its one script and style sheet from here and nothing else (no inline
    # script or style): a value that slipped past the escaping could run nothing.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
WEB_CONSUL_TIMEOUT = 5.0  # a page answers within seconds when Consul does not


AppName = Annotated[str, PathParam(description="an app of the server's configuration")]
# The id's rule is in the description for clients; the route checks it itself, so that a bad
# id gets the project's message (what was wrong and the rule), not a generic one.
DeployId = Annotated[
    str,
    PathParam(
        description=f"a deploy id: {ids.DEPLOY_ID_RULE}",
        json_schema_extra={"pattern": f"^{ids.DEPLOY_ID_PATTERN}$"},
    ),
]
Limit = Annotated[
    int,
    Query(
        description=f"how many deploys, newest first (1 to {HISTORY_MAX})",
        json_schema_extra={"minimum": 1, "maximum": HISTORY_MAX},
    ),
]


class ErrorBody(BaseModel):
    """Every error's body."""

    error: str = Field(description="what was wrong, and where")


# What each error status means here; each route lists the ones it can answer.
ERROR_MEANINGS = {
    400: "a token in the URL (refused on every path), two tokens in one request, or a "
    "body that is not JSON (UTF-8, each key once)",
    401: "a token is needed (the request did not come from this host), it is malformed, or "
    "Consul does not know it",
    403: "Consul refused the token, or a write came from another origin",
    404: "no such app, deploy, artifact or release",
    409: "refused because of state: a deploy in flight, a hold, a deploy already decided",
    413: f"a body over {MAX_BODY} bytes (refused on every path, whatever the method)",
    414: f"a query string over {MAX_QUERY} bytes (refused on every path)",
    415: "a write's body that is not application/json",
    422: "a parameter or body field that breaks its rule (the message states the rule)",
    429: "this caller's live streams are all open (Retry-After says when to try again)",
    502: "Consul answered with an error, or a record in Consul does not parse",
    503: "Consul cannot be reached (or, for the live feed, the server's streams are all "
    "open; Retry-After says when to try again)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses ``codes``, and 413, which every path
    answers to a body too big (a GET's included)."""
    return {
        c: {"model": ErrorBody, "description": ERROR_MEANINGS[c]} for c in sorted({*codes, 413})
    }


READ_ERRORS = errors(400, 401, 403, 404, 414, 422, 502, 503)
WRITE_ERRORS = errors(400, 401, 403, 404, 409, 413, 414, 415, 422, 502, 503)


class ApiError(Exception):
    """An HTTP error with a one-line reason; the JSON body is ``{"error": reason}``."""

    def __init__(self, status: int, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


UNAUTHORIZED = 'Bearer realm="release-watcher"'  # a 401's WWW-Authenticate (RFC 9110 15.5.2)


def error_response(status: int, reason: str, *, retry_after: int | None = None) -> JSONResponse:
    """An error's answer: a 401 says which scheme it wants (RFC 9110 15.5.2: it must),
    a 429 or 503 of the live feed when to try again."""
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = UNAUTHORIZED
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


# --- request bodies (the OpenAPI description is generated from these) -----------------------


class WriteBody(BaseModel):
    """A write's body: a field it does not know (a typo: ``relase``) is a 422 naming it, not
    silently dropped, and a value must already be of its JSON type (``"yes"`` is not true,
    ``5`` is not an artifact id): nothing is coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


CURRENT_FIELD = Field(
    default=None,
    description="the fleet's release as the caller saw it (the page sends the one it shows): "
    "the write starts only while `current` still names it, else 409 (a deploy that ended "
    'since is not replaced unseen); "" for a fleet on no release yet; absent: no such '
    "check, as with watcherctl: " + ids.RELEASE_RULE,
    max_length=160,
    json_schema_extra={"pattern": f"^(?:{ids.RELEASE_INPUT_PATTERN})?$"},
)


class DeployBody(WriteBody):
    artifact: str = Field(
        description=f"an artifact id: {ids.ARTIFACT_ID_RULE}",
        max_length=128,
        json_schema_extra={"pattern": f"^{ids.ARTIFACT_ID_PATTERN}$"},
    )
    allow_missing: bool = Field(
        default=False, description="deploy to the live members even if known hosts are down"
    )
    current: str | None = CURRENT_FIELD


class RollbackBody(WriteBody):
    release: str | None = Field(
        default=None,
        description="a release the fleet committed (default: the previous one): "
        + ids.RELEASE_RULE,
        max_length=160,
        json_schema_extra={"pattern": f"^{ids.RELEASE_INPUT_PATTERN}$"},
    )
    previous: str | None = Field(
        default=None,
        description="instead of `release`: roll back to the previous release, as without "
        "`release` (refused when that release ended rolled back or failed after its "
        "commit), only if it is still this one (a deploy made since would be undone): "
        + ids.RELEASE_RULE,
        max_length=160,
        json_schema_extra={"pattern": f"^{ids.RELEASE_INPUT_PATTERN}$"},
    )
    allow_missing: bool = False
    current: str | None = CURRENT_FIELD

    # Both given is a 422: said in the description too, so a client generated from it (or
    # a fuzzer) does not send what the server refuses.
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["release", "previous"],
                "properties": {"release": {"type": "string"}, "previous": {"type": "string"}},
            }
        }
    )


class AbortBody(WriteBody):
    reason: str = Field(
        default="",
        max_length=500,
        description="why, one line of printable text (no control character but tab, no "
        "bidirectional control)",
        json_schema_extra={"pattern": f"^{ids.FREE_TEXT_PATTERN}$"},
    )

    @field_validator("reason")
    @classmethod
    def _printable(cls, value: str) -> str:
        """Kept in KV and shown later by watcherctl, the page and chat: an escape sequence
        there would reach an operator's terminal."""
        try:
            return ids.check_free_text(value)
        except PayloadError as exc:
            raise ValueError(str(exc)) from None


def body_fields(request: Request) -> list[str]:
    """The fields the body of the route `request` matched takes, for an unknown field's 422."""
    endpoint = getattr(request.scope.get("route"), "endpoint", None)
    try:
        hint = typing.get_type_hints(endpoint).get("body") if endpoint is not None else None
    except (NameError, TypeError):
        return []
    for model in typing.get_args(hint) or (hint,):
        if isinstance(model, type) and issubclass(model, WriteBody):
            return sorted(model.model_fields)
    return []


# --- auth -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who asked, and the Consul client that acts with their token."""

    requested_by: str
    consul: ConsulClient


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# RFC 9110's Host: a name or an IPv4 address, or an IPv6 one in brackets, then a port.
_HOST_HEADER = re.compile(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9._-]+))(?::[0-9]{1,5})?")


def host_name(host_header: str) -> str:
    """The name in a Host header: ``[::1]:8710`` -> ``::1``, ``localhost:80`` -> ``localhost``;
    "" for anything else (``127.0.0.1:8710@evil.example`` is nobody's name, never local)."""
    found = _HOST_HEADER.fullmatch(host_header.strip().lower())
    return (found.group(1) or found.group(2)) if found else ""


def same_origin(origin: str, host_header: str) -> bool:
    """An ``Origin`` header names this server (scheme aside) as the ``Host`` header does."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    return bool(sep) and scheme in ("http", "https") and rest == host_header.strip().lower()


def bearer_token(request: Request) -> str | None:
    """The caller's Consul token from ``Authorization: Bearer`` or ``X-Consul-Token``."""
    bearer = request.headers.getlist("authorization")
    given = bearer + request.headers.getlist("x-consul-token")
    if len(given) > 1:
        # Consul reads X-Consul-Token first, other servers Authorization: which one acts
        # is a guess, and a proxy may have added one.
        headers = (
            "Authorization and X-Consul-Token headers"
            if bearer and len(bearer) < len(given)
            else f"{len(given)} {'Authorization' if bearer else 'X-Consul-Token'} headers"
        )
        raise ApiError(400, f"the request carries {len(given)} tokens ({headers}): send one")
    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "Authorization header must be 'Bearer <Consul ACL token>'")
        return _token_shape(value.strip())
    token = request.headers.get("x-consul-token", "").strip()
    return _token_shape(token) if token else None


def _caller_token(request: Request) -> bool:
    """Whether the request carries a token of its own (a well-formed one)."""
    try:
        return bearer_token(request) is not None
    except ApiError:
        return False


def _token_unknown(request: Request, exc: ConsulError) -> bool:
    """Consul's refusal says the caller's own token is unknown to it ("ACL not found"): who
    the caller is, is not known (a 401), where a known token's refusal is a 403."""
    return (
        isinstance(exc, ConsulPermissionDenied)
        and "acl not found" in str(exc).lower()
        and _caller_token(request)
    )


def _token_shape(token: str) -> str:
    """A token goes into a header to Consul: one that is not visible ASCII is the caller's
    mistake (a 401 here), not a 502 from Consul's 400."""
    if len(token) > 256:
        raise ApiError(401, f"the Consul ACL token is {len(token)} characters, over 256")
    if token == "anonymous":  # noqa: S105 (a well-known name, not a secret)
        # Consul's SecretID of its anonymous token: what anyone may use, so it names no
        # caller (a write would be recorded as "Anonymous Token"; a read needs no token).
        raise ApiError(
            401, "'anonymous' is Consul's anonymous token, which names nobody: send your own"
        )
    bad = next((c for c in token if not "!" <= c <= "~"), None)
    if bad is not None:
        what = "a space" if bad == " " else f"the character {bad!a}"
        raise ApiError(
            401, f"the Consul ACL token holds {what}: it must be visible ASCII characters only"
        )
    return token


class WebState:
    """What the app shares between requests: config, metrics, the live feeds, ACL mode."""

    def __init__(self, config: Config, *, listen_host: str) -> None:
        self.config = config
        self.listen_host = listen_host
        self.loopback = is_loopback(listen_host)
        settings = config.consul
        self.settings = replace(settings, timeout=min(settings.timeout, WEB_CONSUL_TIMEOUT))
        self.consul = ConsulClient(self.settings, retry_deadline=WEB_CONSUL_TIMEOUT)
        self.acls_enabled: bool | None = None  # None: not known yet (Consul unreachable)
        self.feeds: dict[str, LiveFeed] = {}
        self.streams = 0  # live streams open (changed on the event loop only)
        self.closing = False  # the server is stopping: live streams end (close_streams)
        self.streams_of: dict[str, int] = {}  # the same, by caller (see live)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # as the daemon
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "watcher_web_requests",
            "HTTP requests answered by watcher web, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.sse_clients = Gauge(
            "watcher_web_sse_clients",
            "Browsers and API clients connected to the live view, by app",
            ["app"],
            registry=self.registry,
        )
        self.writes = Counter(
            "watcher_web_writes",
            "Deploy, rollback and abort requests through the API, by app, action and result",
            ["app", "action", "result"],
            registry=self.registry,
        )

    def is_closing(self) -> bool:
        return self.closing

    def close_streams(self) -> None:
        """End every live stream now (the server is stopping): each ends its response
        properly, so a client sees the end of the stream and reconnects, instead of a
        connection cut in the middle of its chunked body after the graceful timeout."""
        self.closing = True
        for feed in list(self.feeds.values()):
            feed.wake_subscribers()

    def is_local(self, request: Request) -> bool:
        """Whether the loopback trust applies to this request: the server is bound to loopback,
        the browser or client asked for a loopback name (a page that rebinds its own DNS name
        to 127.0.0.1 sends its own name) and no proxy forwarded it (a proxy on this host makes
        every one of its clients look local)."""
        if not self.loopback:
            return False
        if any(name in request.headers for name in FORWARDING_HEADERS):
            return False
        return is_loopback(host_name(request.headers.get("host", "")))

    def client(self, token: str | None) -> ConsulClient:
        settings = self.settings if token is None else replace(self.settings, token=token)
        return ConsulClient(settings, retry_deadline=WEB_CONSUL_TIMEOUT)

    def store(self, app: str, consul: ConsulClient | None = None) -> DeployStore:
        return DeployStore(consul or self.consul, self.config.kv_prefix, app)

    def probe_acls(self) -> bool | None:
        """Whether Consul enforces ACLs (asked once it answers; None while it does not)."""
        if self.acls_enabled is not None:
            return self.acls_enabled
        try:
            self.consul.acl_token_self()
            self.acls_enabled = True
        except ConsulRequestError as exc:
            if "disabled" not in str(exc).lower():
                raise
            self.acls_enabled = False
        except ConsulPermissionDenied:
            self.acls_enabled = True  # the server's own token is unknown, but ACLs are on
        except (ConsulUnavailable, ConsulTLSError):
            return None
        return self.acls_enabled

    def caller_client(self, request: Request, token: str | None) -> ConsulClient:
        """A client with the caller's token for this request only (closed after it)."""
        client = self.client(token)
        if not hasattr(request.state, "clients"):
            request.state.clients = []
        request.state.clients.append(client)
        return client

    def reader(self, request: Request) -> ConsulClient:
        """The client for a read: the server's own token on loopback, else the caller's."""
        token = bearer_token(request)
        local = self.is_local(request)
        # Asked of Consul only when it changes the answer: without a token and with the ACL
        # state not known yet (Consul not answering since the start), the 401 below stands
        # at once, not after a probe's timeout (the review of the 403 change: 3.5 s each).
        if (
            not local
            and (token is not None or self.acls_enabled is not None)
            and (self.probe_acls() is False)
        ):
            # Consul takes any token then: one made up (or set by a page a DNS name
            # rebound to this server) would read what only local callers may. Without
            # one, the same 403, as a write's: a 401 asked for a token that cannot help.
            raise ApiError(
                403,
                "Consul has ACLs disabled, so a token proves nothing; reads are served "
                f"only to requests from this host ({self.not_local_because(request)})",
            )
        if token is not None:
            return self.caller_client(request, token)
        if not local:
            raise ApiError(
                401,
                f"{self.not_local_because(request)}: reads need a Consul ACL token with "
                "read on the app (Authorization: Bearer <token> or X-Consul-Token)",
            )
        return self.consul

    def not_local_because(self, request: Request) -> str:
        if not self.loopback:
            return "this server is not bound to loopback"
        if any(name in request.headers for name in FORWARDING_HEADERS):
            return "this request came through a proxy (it carries a forwarding header)"
        return "this request was not addressed to a loopback name (Host header)"

    def writer(self, request: Request) -> Caller:
        """Check the caller's token with Consul; the write is then made with that token."""
        token = bearer_token(request)
        local = self.is_local(request)
        # With ACLs known to be off, no token would help: the 403 below says why.
        if token is None and not local and self.acls_enabled is not False:
            raise ApiError(
                401,
                "a write needs your Consul ACL token (Authorization: Bearer <token> or "
                "X-Consul-Token)",
            )
        acls = self.probe_acls()
        if acls is None:
            raise ApiError(
                503,
                f"Consul at {self.settings.base_url} is unreachable",
                retry_after=CONSUL_RETRY_AFTER,
            )
        if not acls:
            if not local:
                raise ApiError(
                    403,
                    "Consul has ACLs disabled, so this server cannot tell who you are; "
                    "writes are accepted only from this host to a loopback bind "
                    f"({self.not_local_because(request)})",
                )
            return Caller(f"{user_at_host()} (web, ACLs off)", self.caller_client(request, token))
        if token is None:
            raise ApiError(
                401,
                "a write needs your Consul ACL token (Authorization: Bearer <token> or "
                "X-Consul-Token)",
            )
        consul = self.caller_client(request, token)
        try:
            info = consul.acl_token_self()
        except ConsulPermissionDenied as exc:
            raise ApiError(401, f"Consul does not know this token: {exc}") from None
        who = str(info.get("Description") or "").strip()
        accessor = str(info.get("AccessorID") or "")
        return Caller(who or f"token {accessor[:8]}", consul)


# --- reads shared by the API, the page and the live feed --------------------------------------


def live_snapshot(store: DeployStore) -> Snapshot:
    """The deploy in flight (else the last one), as the live view pushes it.

    A request that does not parse (any host's token writes `history`, an operator's
    `requests/`) is named in ``unreadable``, and with none in flight the newest readable
    one of the last few is shown instead: one bad record must not take the page down or
    pass for Consul being unreachable."""
    inflight, _ = store.inflight()
    summary = None
    unreadable = ""
    # With none in flight, the last one (how it ended, host by host) stays on show.
    shown = [inflight] if inflight else list(reversed(store.history()))[:LIVE_LOOKBACK]
    for deploy_id in shown:
        try:
            view = store.view(deploy_id)
        except PayloadError as exc:
            unreadable = unreadable or f"deploy {deploy_id} cannot be read: {exc}"
            continue
        if view is not None:
            view = view.checked()
            summary = deploy_summary(view)
            summary["states"] = summarize_states(view)
            shown_as = shown_decision(view)
            # Contested is no decision either, but no abort ends it (DESIGN.md 6.4.5).
            summary["contested"] = shown_as == CONTESTED
            summary["undecided"] = shown_as is None
            # Past its apply deadline, whoever holds it undecided (members read only then;
            # the feed reads again at least every BLOCK_WAIT, so an open page sees it come).
            summary["stalled"] = stalled_in(store, view) if deploy_id == inflight else {}
            # Committed, and still in flight well past that deadline: no watcher ends it.
            summary["not_ended"] = not_ended(view) if deploy_id == inflight else []
            break
    return {
        "app": store.app,
        "consul": {"ok": True, "error": ""},
        "inflight": inflight,
        "deploy": summary,
        "unreadable": unreadable,
    }


def sections_mark(store: DeployStore) -> str:
    """A digest of what the page's fleet and builds sections show (each watcher alive or
    not, each host's release, hold, alarm, broken tree and prefetched builds, the builds
    there are and their records' versions, the version of `current`): the live view sends
    it, and the page fetches those sections again when it changes (a host going down or
    coming back, a new build, a publish that finished, `current` rewritten), not on every
    ack of a deploy. An ack changed after a commit shows through the alarms it makes the
    hosts raise."""
    members = store.members()
    # Any host's token can rewrite `current` alone: the fleet section says NOT TRUSTED
    # then, and an open page did not show it until some host record changed.
    _, current_index = store.current()
    hosts, unreadable = store.hosts_checked()
    rows = [
        [n, n in members, h.release, h.hold, h.alarm, h.broken, list(h.prefetched)]
        if (h := hosts.get(n))
        else [n, n in members, unreadable.get(n, "")]
        for n in sorted(set(members) | set(hosts) | set(unreadable))
    ]
    # The names, and Consul's index of the tree, which moves with any record rewritten (a
    # publish finishing drops its `uploading` mark): not the records themselves, which
    # nothing trims (3,000 of them: 39-62 ms a read, against 7-10 ms for the names).
    # With no key under the prefix (and none deleted) Consul answers with the index of the
    # whole KV store, which every ack of every app moves: no builds, no index.
    index, names = store.consul.kv_keys_blocking(store.keys.artifacts_prefix, 0, 1.0)
    text = json.dumps(
        [rows, names, index if names else 0, current_index], separators=(",", ":"), default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _printable(value: Any) -> Any:
    """Every ``{{ }}`` of the templates: plain text gets ``ids.printable``; markup built
    by the code (already escaped) and other values go as they are."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return ids.printable(value)
    return value


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def _short_time(value: str | None) -> str:
    """``2026-12-01T21:13:56.922Z`` -> ``2026-12-01 21:13:56Z`` (the full value is in a title)."""
    if not value:
        return "-"
    return value[:10] + " " + value[11:19] + "Z" if len(value) >= 19 else value


def _timeline(host: dict[str, Any]) -> list[tuple[str, str]]:
    """A host's ``*_at`` timings in the order they happened: [("staged", "21:13:56"), ...]."""
    marks = [(v, k[:-3]) for k, v in host.items() if k.endswith("_at") and isinstance(v, str)]
    return [(label, at[11:19]) for at, label in sorted(marks)]


def _duration(summary: dict[str, Any]) -> str:
    """How long an ended deploy took: request to the later of its decision and the last
    host timing ("" while in flight). An abort's hosts may have no timing after their
    staging began, and a refused deploy's none at all: the decision is its end."""
    if not summary.get("result"):
        return ""
    hosts = summary.get("hosts") or {}
    ends = [v for h in hosts.values() for k, v in h.items() if k.endswith("_at") and v]
    if summary.get("decision") and summary["decision"].get("at"):
        ends.append(summary["decision"]["at"])
    try:
        start = parse_iso(summary["requested_at"])
        end = max(parse_iso(e) for e in ends) if ends else None
    except (KeyError, ValueError, TypeError, OverflowError):  # a host writes its own timings
        return ""
    return f"{(end - start).total_seconds():.1f}s" if end else ""


# --- the app ----------------------------------------------------------------------------------


def _json_kind(value: object) -> str:
    """What a JSON value is, in the words of JSON: 'an array', 'a string'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _given(value: object) -> str:
    """ ", got 5" for a rejected value (what the field was given, shown short and escaped)."""
    if isinstance(value, str):
        return f", got {ids.shown(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return ", got a number beyond a float's range"  # 1e400 (json.dumps: "Infinity")
    if value is None or isinstance(value, bool | int | float):
        text = json.dumps(value)
        return f", got {text}" if len(text) <= 40 else f", got a number of {len(text)} digits"
    return f", got {_json_kind(value)}"


# Request headers that must come once: Host (RFC 9112 3.2), and those a check reads while
# something else may act on another copy (Origin, Content-Type, X-Forwarded-Host). Two
# tokens are refused where tokens are read (``bearer_token``).
ONCE_HEADERS = ("host", "origin", "content-type", "x-forwarded-host")


# A Content-Type's charset that the body, read as UTF-8, agrees with (ASCII is UTF-8).
UTF8_CHARSETS = (None, "utf-8", "utf8", "us-ascii", "ascii")


def _charset(params: str) -> str | None:
    """The charset a Content-Type's parameters name, lower case (None: none named)."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def _body_problem(body: bytes) -> str:
    """What is wrong with a write's body that Python's parser would take but JSON does not
    (RFC 8259): bytes that are not UTF-8 (json.loads also reads UTF-16 and -32), NaN or
    Infinity, one key given twice; "" for any other body (one that does not parse is the
    route's to refuse, with its own words)."""
    if not body:
        return ""
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")  # a BOM is tolerated
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})"
    if (nul := body.find(b"\x00")) >= 0:
        # No JSON text holds a NUL byte (in a string it is written \u0000), but UTF-16 and
        # UTF-32 text without a BOM is mostly NULs and valid UTF-8: json.loads then read it
        # as UTF-16, past the checks below (a key given twice deployed the second one).
        return (
            f"not UTF-8 (a NUL byte at offset {nul}: UTF-16 or UTF-32 text? JSON is sent as UTF-8)"
        )
    try:
        STRICT_JSON.decode(text)
    except NotJson as exc:
        return str(exc)
    except json.JSONDecodeError as exc:
        # Where, which the route's own parse does not say ("Unterminated string starting
        # at", cut there).
        return f"{exc.msg}: line {exc.lineno} column {exc.colno} (character {exc.pos})"
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            # Python's limit on the digits of an int (it said "nested too deeply?").
            return f"a number of more than {sys.get_int_max_str_digits()} digits"
        return ""
    except RecursionError:
        return ""  # nested too deeply: the route says so
    return ""


class AbsoluteForm:
    """A request target in absolute form (`GET http://127.0.0.1:8710/healthz HTTP/1.1`),
    which RFC 9112 3.2.2 says a server MUST accept, taken as its path, with the target's
    authority as its Host (the Host header is then ignored): the server's HTTP parser
    passes the whole URL on as the path, a 404 for `/http://...`. A browser never sends
    this form; a proxy or a hand-written client may."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith(("http://", "https://")):
            target = urllib.parse.urlsplit(path)
            raw = scope.get("raw_path") or path.encode()
            raw_target = urllib.parse.urlsplit(raw)
            headers = [(k, v) for k, v in scope.get("headers") or () if k != b"host"]
            scope = {
                **scope,
                "path": target.path or "/",
                "raw_path": raw_target.path or b"/",
                "headers": [*headers, (b"host", target.netloc.encode())],
            }
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413, whether or not it says its length."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = JSONResponse(
            {"error": f"request body over {self.limit} bytes"},
            status_code=413,
            # outside the guard; the rest of the body is read and thrown away for LINGER
            # seconds (web/server.py), not for as long as it comes (5 GB in 2-3 s of CPU,
            # the DoS review), then the connection closes
            headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
        )
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await too_big(scope, receive, send)
            return
        # Read the whole body first (it is small or refused), then replay it to the app.
        chunks: list[bytes] = []
        seen = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await too_big(scope, receive, send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        media, _, params = headers.get(b"content-type", b"application/json").partition(b";")
        wrong = (
            _body_problem(body)
            # (a body of another type or charset is refused as such, 415, by the guard)
            if scope.get("method") in ("POST", "PUT", "PATCH")
            and media.strip().lower() == b"application/json"
            and _charset(params.decode("latin-1")) in UTF8_CHARSETS
            else ""
        )
        if wrong:
            # JSON parsers keep the last of two equal keys: a body that names two artifacts
            # deployed the second. Ambiguous, so refused (as the config refuses them).
            await JSONResponse(
                {"error": f"malformed JSON body: {wrong}"},
                status_code=400,
                headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
            )(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _static_urls(root: str) -> typing.Callable[[str], str]:
    """``<root>/static/<name>?v=<its digest>``: the page names its script and style sheet by
    content, so a browser that cached them (no Cache-Control there, heuristics) fetches
    the new ones after an upgrade instead of running an old script against a new page."""
    digests = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:12]
        for f in (HERE / "static").iterdir()
        if f.is_file()
    }
    return lambda name: f"{root}/static/{name}?v={digests[name]}"


#: The first segments of this server's own paths: a root path starting with one would
#: take a path of the server for the proxy's prefix.
OWN_SEGMENTS = frozenset({"apps", "api", "static", "openapi.json", "healthz", "metrics"})
_ROOT_PATH = re.compile(r"(?:/[A-Za-z0-9._~-]+)+")


def check_root_path(value: str) -> str:
    """``--root-path``: the path a reverse proxy serves this server under (``/watcher``),
    without its trailing slash; "" for none (``/`` too). ValueError says what is wrong."""
    bare = value.strip().rstrip("/")
    if not bare:
        return ""
    segments = bare.split("/")[1:]
    if not _ROOT_PATH.fullmatch(bare) or any(seg in (".", "..") for seg in segments):
        raise ValueError(
            f"--root-path: {value!r} is not a URL path like /watcher or /ops/deploys "
            "(letters, digits, '.', '_', '~' and '-' between slashes, no '.' or '..' part)"
        )
    if segments[0] in OWN_SEGMENTS:
        raise ValueError(
            f"--root-path: {value!r} starts like this server's own paths (/{segments[0]}/...): "
            "choose another, such as /watcher"
        )
    return bare


def create_app(config: Config, *, listen_host: str = "127.0.0.1", root_path: str = "") -> FastAPI:
    """The page and the API. ``root_path``: the path a reverse proxy serves them under
    (``check_root_path``), which every link, redirect and the page's requests carry. The
    proxy strips it: a request is served by its path after it, never both with and
    without it (one path with two addresses would step around a proxy rule on one of them,
    the review)."""
    root = check_root_path(root_path)
    state = WebState(config, listen_host=listen_host)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["root"] = root
    templates.env.filters["size"] = _human_size
    templates.env.globals["allow_missing_label"] = allow_missing_label
    templates.env.globals["abort_requested_label"] = abort_requested_label
    templates.env.globals["in_flight_note"] = in_flight_note
    templates.env.globals["committed_end"] = committed_end
    templates.env.filters["duration"] = _duration
    templates.env.filters["short_time"] = _short_time
    templates.env.filters["timeline"] = _timeline
    # Text from KV (a host's error, hold or hook output, a forged reason) is shown with its
    # control and bidirectional characters escaped, as watcherctl shows it: raw, an ESC or
    # a U+202E reorders or hides what the page says around it.
    templates.env.finalize = _printable
    templates.env.globals["static_url"] = _static_urls(root)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for feed in state.feeds.values():
            feed.stop()

    app = FastAPI(
        title="release-watcher",
        version=__version__,
        description="Builds, deploys and the fleet; deploy, roll back and abort with your "
        "Consul ACL token.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN: the page must work offline.
        docs_url=None,
        redoc_url=None,
        # operationIds a generated client names its calls by: `get_fleet`, not FastAPI's
        # `get_fleet_api_v1_apps__app__fleet_get` (the outside review's client had
        # `GetFleetApiV1AppsAppFleetGetResponseGetFleetApiV1AppsAppFleetGet`).
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.web = state
    app.state.templates = templates
    # No 307 from /fleet/ to /fleet built from the Host header (and a POST sent again):
    # an unknown path is a 404 that says which one was meant (http_error).
    app.router.redirect_slashes = False
    generated = app.openapi

    def openapi_with_app_names() -> dict[str, Any]:
        """The generated description, with the configured apps as the ``app`` parameter's
        only values: a client learns them from the description, not from 404s."""
        if app.openapi_schema is None:
            spec = generated()
            for path, ops in spec["paths"].items():
                for operation in ops.values():
                    for param in operation.get("parameters", ()):
                        if param.get("in") == "path" and param.get("name") == "app":
                            param["schema"]["enum"] = sorted(config.apps)
                    # A token is needed off this host, and for writes when ACLs are on
                    # ({}: none, a local request; docs/web.md says who may do what).
                    operation["security"] = (
                        [{"bearer": []}, {"consulToken": []}, {}]
                        if path.startswith("/api/")
                        else []
                    )
            spec.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "your Consul ACL token: Authorization: Bearer <token>",
                },
                "consulToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Consul-Token",
                    "description": "your Consul ACL token, as Consul's own API takes it",
                },
            }
            spec["servers"] = [{"url": root or "/"}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi_with_app_names  # type: ignore[method-assign]
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # --- middleware: tokens never in URLs, request metrics -----------------------------------

    @app.middleware("http")
    async def guard_and_count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.monotonic()
        refused = refusal(request)
        if (
            refused is None
            and request.method not in SAFE_METHODS
            and "content-type" not in request.headers
        ):
            # A write without a Content-Type is read as JSON (docs/web.md); FastAPI would
            # hand its body over unparsed, a 422 that says nothing of the cause.
            request.scope["headers"] = [
                *request.scope["headers"],
                (b"content-type", b"application/json"),
            ]
        # Matched before routing runs: a mount (the page's files) rewrites the scope's
        # root_path, after which its own path no longer matches it.
        before = route_of(request.scope)
        if refused is not None:
            response: Response = JSONResponse({"error": refused[1]}, status_code=refused[0])
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # a bug: JSON like every other error, with the headers
                log.exception("web_request_crashed", path=request.url.path, error=repr(exc))
                response = JSONResponse(
                    {"error": f"internal error ({type(exc).__name__}); the server's log has it"},
                    status_code=500,
                )
            finally:
                for client in getattr(request.state, "clients", ()):
                    client.close()
        route = request.scope.get("route") or before
        path = getattr(route, "path", "<unmatched>")
        method = request.method if request.method in METHODS else "other"
        state.requests.labels(route=path, method=method, status=response.status_code).inc()
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith("/static/") and "cache-control" not in response.headers:
            # Fleet state read with a caller's token: no browser or proxy keeps a copy.
            response.headers["Cache-Control"] = "no-store"
        log.debug(
            "web_request",
            route=path,
            method=request.method,
            status=response.status_code,
            took_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return response

    app.add_middleware(BodyLimit, limit=MAX_BODY)
    app.add_middleware(AbsoluteForm)  # outermost: every check after it sees the path

    def route_of(scope: Scope) -> Any:
        """The route a request's metric label names when routing set none (a request refused
        before routing, the static files' mount, /openapi.json): the first whose path
        matches, whatever its method; None for an unknown path."""
        partial = None
        for route in app.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route
            if match == Match.PARTIAL and partial is None:
                partial = route
        return partial

    def refusal(request: Request) -> tuple[int, str] | None:
        """What is refused before any route runs: long query strings, tokens in URLs,
        parameters or headers given twice, encoded slashes, cross-site writes."""
        if len(request.scope.get("query_string") or b"") > MAX_QUERY:
            return 414, f"a query string over {MAX_QUERY} bytes is refused (the API takes `limit`)"
        for name in ONCE_HEADERS:
            if name == "x-forwarded-host" and request.method in SAFE_METHODS:
                continue  # read for writes only: a proxy that adds its own is no matter then
            if len(request.headers.getlist(name)) > 1:
                # RFC 9112 3.2 (Host); for the others, which one a check read and which one
                # acted is a guess (the first Host decided "local", the first Origin passed).
                return 400, f"header {name} given more than once: give it once"
        if b"%2f" in (request.scope.get("raw_path") or b"").lower():
            # Routing reads the path decoded: /api/v1/apps/web%2Frollbacks started a
            # rollback, which a proxy that guards the raw path would not have seen as one.
            return 400, "an encoded slash (%2F) in the path is refused: write / itself"
        if any("token" in name.lower() for name in request.query_params):
            return 400, (
                "a token in the URL is refused (URLs end up in logs and histories); "
                "send it as Authorization: Bearer <token> or X-Consul-Token"
            )
        given: set[str] = set()
        for name, _ in request.query_params.multi_items():
            if name in given:
                # Frameworks keep one of the two (`?limit=5&limit=500`): which is a guess.
                return 400, (
                    f"query parameter {ids.shown(name)} given more than once: give it once"
                )
            given.add(name)
        path = request.url.path
        if given and path.startswith("/api/v1/") and allowed_methods(path):
            # (a path no route has is its 404 to say, naming the path)
            # `/deploys?limt=5` answered with the default 20, `/builds?limit=5` with 30, each
            # as if read: a parameter the endpoint does not take is said, not ignored.
            reads = request.method in ("GET", "HEAD")
            takes = {"limit"} if reads and HISTORY_PATH.fullmatch(path) else set()
            if unknown := sorted(given - takes):
                return 400, (
                    f"unknown query parameter {ids.shown(unknown[0])} (this endpoint takes "
                    + (", ".join(sorted(takes)) or "no query parameter")
                    + ")"
                )
        if request.method in SAFE_METHODS:
            return None
        origin = request.headers.get("origin")
        # Behind a proxy that rewrites Host (nginx's default), the name the browser used is
        # in X-Forwarded-Host; another site's page cannot add that header without a CORS
        # preflight, which this server never grants.
        names = (request.headers.get("host", ""), request.headers.get("x-forwarded-host", ""))
        if origin is not None and not any(n and same_origin(origin, n) for n in names):
            # A browser sends Origin with every POST: another site's page cannot write here.
            # Said with the names compared: a proxy's `Host $host` drops the port the
            # browser's Origin keeps (the proxy review).
            reached = " and ".join(
                f"{ids.shown(n)} ({h})"
                for n, h in zip(names, ("Host", "X-Forwarded-Host"), strict=True)
                if n
            )
            return 403, (
                f"a write from another origin ({ids.shown(origin)}) is refused: this server "
                f"was reached as {reached or 'nothing (no Host header)'}; behind a proxy, "
                "pass the host and port the browser used: proxy_set_header X-Forwarded-Host "
                "$http_host (docs/web.md)"
            )
        ctype = request.headers.get("content-type")
        if ctype is not None:
            media, _, params = ctype.partition(";")
            if media.strip().lower() != "application/json":
                return 415, f"a write's body must be application/json, got {ids.shown(ctype)}"
            charset = _charset(params)
            if charset not in UTF8_CHARSETS:
                # The body is read as UTF-8 whatever this says (RFC 8259): say so, not guess.
                return 415, (
                    f"a write's body is JSON in UTF-8, got charset {ids.shown(charset)} "
                    f"in {ids.shown(ctype)}"
                )
        return None

    # --- error mapping -----------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.reason, retry_after=exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        unknown = False  # a field the body does not take (a typo): say which ones it takes
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            where = ".".join(loc[1:] if loc[:1] in (["body"], ["query"]) else loc) or "body"
            if err.get("type") == "json_invalid":
                ctx = err.get("ctx") or {}
                problems.append(f"malformed JSON body: {ctx.get('error', err.get('msg'))}")
            elif err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
                # No body at all: as malformed as a broken one, and a 400 too.
                problems.append(
                    "malformed JSON body: empty; the body is a JSON object with the fields: "
                    + (", ".join(body_fields(request)) or "none")
                )
            elif err.get("type") == "extra_forbidden":
                unknown = True
                problems.append(f"{where}: unknown field")
            elif where == "body" and err.get("type") == "model_attributes_type":
                problems.append(
                    f"body: must be a JSON object (got {_json_kind(err.get('input'))}) with the "
                    f"fields: {', '.join(body_fields(request)) or 'none'}"
                )
            elif err.get("type") == "missing":  # its input is the whole body: say nothing
                problems.append(f"{where}: {err.get('msg')}")
            else:
                problems.append(f"{where}: {err.get('msg')}{_given(err.get('input'))}")
        if unknown:
            problems.append(f"the body takes: {', '.join(body_fields(request)) or 'no field'}")
        status = 400 if any(p.startswith("malformed") for p in problems) else 422
        return JSONResponse({"error": "; ".join(problems)}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == UNPARSED_BODY:
            # FastAPI's answer when the parser raised something other than a JSON error:
            # RecursionError, for a body nested deeper than Python's json takes.
            detail = "malformed JSON body: it does not parse (nested too deeply?)"
        if exc.status_code == 404 and detail == "Not Found":
            path = request.url.path
            bare = path.rstrip("/")
            if bare and bare != path and not bare.startswith("//") and allowed_methods(bare):
                page = re.fullmatch(r"/apps/([^/]+)", bare)
                if (
                    request.method in ("GET", "HEAD")
                    and page is not None
                    and APP_NAME_RE.match(page[1]) is not None
                ):
                    # The page typed with a slash: where it is, as a path on this server
                    # (never a name taken from the Host header). Only for an app's name,
                    # which a URL's path carries as it is: `..` went to `/apps/..` (which
                    # a client reads as `/`), an escaped name came back escaped twice.
                    return JSONResponse(
                        {"error": f"the page is at {ids.shown(root + bare)}"},
                        status_code=308,
                        headers={"Location": root + bare},
                    )
                detail = (
                    f"no such path: {ids.shown(root + path)} (without the trailing slash: "
                    f"{ids.shown(root + bare)})"
                )
            else:
                detail = (
                    f"no such path: {ids.shown(root + path)} (the API is under "
                    f"{root}/api/v1/, described at {root}/openapi.json; the page is "
                    f"{root}/ and {root}/apps/<app>)"
                )
        if exc.status_code == 405:
            # Every method the path takes (RFC 9110: Allow), not only those of the first
            # route that matched it: GET and POST of one path are two routes.
            allowed = ", ".join(allowed_methods(request.url.path))
            headers["Allow"] = allowed
            detail = (
                f"{request.method} is not allowed on {request.url.path[:300]!r} "
                f"(it takes: {allowed})"
            )
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=headers)

    def allowed_methods(path: str) -> list[str]:
        if path.startswith("/static/"):
            return ["GET", "HEAD"]  # the mount's (its 405 had an empty Allow)
        return sorted(
            {
                method
                for route in app.routes
                if isinstance(route, Route) and route.path_regex.fullmatch(path)
                for method in route.methods or ()
            }
        )

    @app.exception_handler(ConsulError)
    async def consul_error(request: Request, exc: ConsulError) -> JSONResponse:
        if _token_unknown(request, exc):
            # (a write says so from its token lookup, a 401 too)
            return error_response(401, f"Consul does not know this token: {exc}")
        if isinstance(exc, ConsulPermissionDenied):
            return JSONResponse({"error": str(exc)}, status_code=403)
        if isinstance(exc, ConsulRequestError):
            return JSONResponse({"error": str(exc)}, status_code=502)
        # Consul did not answer (after the client's own retries): a client or an uptime
        # probe may ask again, not at once (RFC 9110 10.2.3).
        return error_response(503, str(exc), retry_after=CONSUL_RETRY_AFTER)

    @app.exception_handler(DeployError)
    async def deploy_error(_: Request, exc: DeployError) -> JSONResponse:
        # The refusal is worded for watcherctl: the API's own way of saying the same.
        said = str(exc).replace("pass --allow-missing", 'send "allow_missing": true')
        return JSONResponse({"error": said}, status_code=409)

    @app.exception_handler(RollbackTargetUnknown)
    async def unknown_release(_: Request, exc: RollbackTargetUnknown) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(ArtifactError)
    async def artifact_error(_: Request, exc: ArtifactError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(PayloadError)
    async def payload_error(_: Request, exc: PayloadError) -> JSONResponse:
        return JSONResponse({"error": f"unreadable record in Consul: {exc}"}, status_code=502)

    def app_name(name: str) -> str:
        try:
            config.app(name)
        except ConfigError as exc:
            if name.isprintable() and len(name) <= 64:
                raise ApiError(404, "; ".join(exc.problems)) from None
            # The JSON would carry a U+202E or an ESC raw, to a terminal or a log viewer
            # (the page escapes it): shown escaped and cut, as a bad deploy id is.
            known = ", ".join(sorted(config.apps)) or "none"
            raise ApiError(404, f"no such app: {ids.shown(name)} (configured: {known})") from None
        return name

    # --- reads -------------------------------------------------------------------------

    @app.get(
        "/api/v1/apps",
        summary="The apps this server knows",
        responses=errors(400, 401, 403, 414, 503),
    )
    def list_apps(request: Request) -> dict[str, Any]:
        reader = state.reader(request)
        if reader is not state.consul and state.probe_acls():
            # No key is read here: Consul is asked whether it knows the caller's token at
            # all, so a made-up one is the 401 every other read answers, not a 200.
            reader.acl_token_self()
        return {"apps": sorted(config.apps)}

    @app.get(
        "/api/v1/apps/{app}/fleet",
        summary="Every member and known host of an app",
        responses=READ_ERRORS,
    )
    def get_fleet(app: AppName, request: Request) -> dict[str, Any]:
        return fleet_status(state.store(app_name(app), state.reader(request)))

    @app.get(
        "/api/v1/apps/{app}/builds", summary="Artifact records, newest first", responses=READ_ERRORS
    )
    def get_builds(app: AppName, request: Request) -> dict[str, Any]:
        store = state.store(app_name(app), state.reader(request))
        unreadable: list[str] = []
        rows = build_rows(store, fleet_status(store), unreadable=unreadable)
        # Records left out, each with what is wrong (a deploy of one is refused, saying so)
        return {"builds": rows, "unreadable": unreadable}

    @app.get(
        "/api/v1/apps/{app}/deploys", summary="Deploy history, newest first", responses=READ_ERRORS
    )
    def get_history(app: AppName, request: Request, limit: Limit = HISTORY_LIMIT) -> dict[str, Any]:
        # (a parameter it does not take is refused before: ``refusal``)
        raw = request.query_params.get("limit")
        if raw is not None and not re.fullmatch(r"[0-9]+", raw):
            # Taken as an integer, "5.0" and " 5" passed as 5: a number of deploys is written
            # with digits only, and what else was sent is said.
            raise ApiError(
                422, f"limit: must be a whole number of deploys in digits, got {ids.shown(raw)}"
            )
        if not 1 <= limit <= HISTORY_MAX:
            raise ApiError(422, f"limit must be between 1 and {HISTORY_MAX}, got {limit}")
        store = state.store(app_name(app), state.reader(request))
        rows, problem = deploy_history_checked(store, limit, in_flight=True)
        return {"deploys": rows, "problem": problem}

    @app.get(
        "/api/v1/apps/{app}/deploys/{deploy_id}",
        summary="One deploy, with every host",
        responses=READ_ERRORS,
    )
    def get_deploy(app: AppName, deploy_id: DeployId, request: Request) -> dict[str, Any]:
        check_deploy_id(deploy_id)
        store = state.store(app_name(app), state.reader(request))
        view = store.view(deploy_id)
        if view is None:
            raise ApiError(404, f"app {app}: no deploy {deploy_id}")
        return deploy_summary(view.checked())

    async def _may_stream(app: str, request: Request) -> tuple[str, str, str | None]:
        """The live stream's checks, for its GET and its HEAD alike: (app, caller, token),
        or the ApiError the GET answers (the HEAD answered 200 where a GET got 429)."""
        name = app_name(app)
        if bearer_token(request) is not None or not state.is_local(request):
            # Not local: the caller proves read on this app once, with their token.
            reader = state.reader(request)
            await asyncio.to_thread(state.store(name, reader).inflight)
        token = bearer_token(request)
        # A caller is its token (hashed: never kept as a key), or this host without one.
        caller = "local" if token is None else hashlib.sha256(token.encode()).hexdigest()
        if state.streams_of.get(caller, 0) >= SSE_MAX_PER_CALLER:
            raise ApiError(
                429,
                f"{SSE_MAX_PER_CALLER} live streams of this caller are open (a caller is "
                "its token, or every caller on this host without one; a page holds one, "
                "and one whose client is gone is freed when a write to it fails, minutes "
                "later for a peer that vanished from the network); close one and try again",
                retry_after=SSE_RETRY_AFTER,
            )
        if state.streams >= SSE_MAX_STREAMS:
            raise ApiError(
                503,
                f"{SSE_MAX_STREAMS} live streams are open; try again later",
                retry_after=SSE_RETRY_AFTER,
            )
        return name, caller, token

    @app.get(
        LIVE,
        summary="Server-sent events: the deploy in flight, pushed on every change",
        response_class=StreamingResponse,
        responses={
            **READ_ERRORS,
            **errors(429),
            200: {
                "description": "a stream of `event: live` with one line of JSON each "
                "(docs/web.md), and a comment every 15 s",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
        },
    )
    async def live(app: AppName, request: Request) -> StreamingResponse:
        name, caller, token = await _may_stream(app, request)
        # The slot is taken here, before the response starts (a burst of connects could all
        # pass the check otherwise), and given back once: by the stream when it ends, or
        # when the stream object is dropped without ever running.
        feed = state.feeds.get(name)
        if feed is None:
            # Its own client: a blocking query holds a connection for up to BLOCK_WAIT.
            store = state.store(name, state.client(None))
            feed = state.feeds[name] = LiveFeed(name, store, _snapshot_with_html)
        state.streams += 1
        state.streams_of[caller] = state.streams_of.get(caller, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.streams -= 1
                left = state.streams_of.pop(caller) - 1
                if left:
                    state.streams_of[caller] = left

        stream = _sse(feed, request, release, token)
        weakref.finalize(stream, release)
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.head(LIVE, include_in_schema=False)
    async def live_head(app: AppName, request: Request) -> Response:
        """What a GET would answer, without its stream (`curl -I`, an uptime check): the
        same checks, no slot taken, no body."""
        await _may_stream(app, request)
        head = Response(
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        # A GET streams with no length: a HEAD's `content-length: 0` said the stream was
        # empty (RFC 9110 9.3.2: the fields a GET would send, or none).
        del head.headers["content-length"]
        return head

    marks: dict[str, tuple[float, str]] = {}  # app -> (when, the sections' digest)

    def _snapshot_with_html(store: DeployStore) -> Snapshot:
        snap = live_snapshot(store)
        # While a deploy runs, every ack wakes the feed: the digest (three list reads) is
        # read again at most every SECTIONS_EVERY seconds; at once when none is in flight.
        when, mark = marks.get(store.app, (0.0, ""))
        now = time.monotonic()
        if not mark or not snap["inflight"] or now - when >= SECTIONS_EVERY:
            when, mark = now, sections_mark(store)
            marks[store.app] = (when, mark)
        snap["sections"] = mark
        snap["html"] = templates.get_template("_live.html").render(
            app=store.app, live=snap, loopback=state.loopback
        )
        return snap

    def _refusal(app: str, token: str) -> tuple[int, str] | None:
        """Consul's refusal of ``token``'s read of ``app`` now (status and reason), or None
        while it may read (or while Consul does not answer: the feed says that itself)."""
        client = state.client(token)
        try:
            state.store(app, client).inflight()
        except ConsulPermissionDenied as exc:
            unknown = "acl not found" in str(exc).lower()
            return (401, f"Consul does not know this token: {exc}") if unknown else (403, str(exc))
        except ConsulError:
            return None
        finally:
            client.close()
        return None

    async def _sse(
        feed: LiveFeed, request: Request, release: Callable[[], None], token: str | None
    ) -> AsyncIterator[str]:
        queue = feed.subscribe()
        gauge = state.sse_clients.labels(app=feed.app)
        gauge.inc()
        checked = time.monotonic()
        try:
            yield "retry: 2000\n\n"
            while not state.is_closing() and not await request.is_disconnected():
                try:
                    item: Published | None = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
                except TimeoutError:
                    item = None
                if state.is_closing():
                    break
                if token is not None and time.monotonic() - checked >= SSE_TOKEN_RECHECK:
                    checked = time.monotonic()
                    refused = await asyncio.to_thread(_refusal, feed.app, token)
                    if refused is not None:
                        # Said before the end, for a client that reads it; the page's next
                        # connect gets the same refusal as a 401 or 403.
                        status, reason = refused
                        body = json.dumps({"status": status, "error": reason})
                        yield f"event: refused\ndata: {body}\n\n"
                        log.info("live_stream_token_refused", app=feed.app, status=status)
                        break
                yield ": keepalive\n\n" if item is None else item.event
        finally:
            feed.unsubscribe(queue)
            gauge.dec()
            release()

    # --- writes ------------------------------------------------------------------------

    @app.post(
        "/api/v1/apps/{app}/deploys",
        status_code=202,
        summary="Deploy an artifact to the whole fleet (with your Consul token)",
        responses=WRITE_ERRORS,
    )
    def post_deploy(app: AppName, body: DeployBody, request: Request) -> dict[str, Any]:
        name = app_name(app)
        valid(
            ids.check_artifact_id, body.artifact, "artifact", "an artifact id", ids.ARTIFACT_ID_RULE
        )
        if body.current:  # "": the fleet was on no release yet
            valid(
                ids.check_release_input, body.current, "current", "a release name", ids.RELEASE_RULE
            )
        caller = state.writer(request)
        store = state.store(name, caller.consul)
        with refusals_counted(name, "deploy"):
            current_index = None if body.current is None else fleet_still_on(store, body.current)
            hosts = host_records(store)
            record = deploy_request(
                store,
                config.app(name),
                body.artifact,
                requested_by=caller.requested_by,
                allow_missing=body.allow_missing,
                hosts=hosts,
            )
        notes = (redeploy_warning(store, record), held_warning(hosts, record))
        note = "; ".join(n for n in notes if n)
        return _start(store, record, "deploy", note, current_index=current_index)

    @app.post(
        "/api/v1/apps/{app}/rollbacks",
        status_code=202,
        summary="Roll the fleet back to the previous release, or to a committed one",
        responses=WRITE_ERRORS,
    )
    def post_rollback(app: AppName, body: RollbackBody, request: Request) -> dict[str, Any]:
        name = app_name(app)
        if body.release is not None and body.previous is not None:
            raise ApiError(422, "give release or previous, not both")
        given = (("release", body.release), ("previous", body.previous), ("current", body.current))
        for field, value in given:
            if value is not None and (value or field != "current"):  # current "": none yet
                valid(ids.check_release_input, value, field, "a release name", ids.RELEASE_RULE)
        caller = state.writer(request)
        store = state.store(name, caller.consul)
        with refusals_counted(name, "rollback"):
            # The index the caller's view was checked at, when it gave one: a change of
            # `current` after it (even before the target is read) refuses the start.
            seen = None if body.current is None else fleet_still_on(store, body.current)
            hosts = host_records(store)
            record, live, current_index = rollback_request(
                store,
                config.app(name),
                body.release,
                requested_by=caller.requested_by,
                allow_missing=body.allow_missing,
                hosts=hosts,
                previous=body.previous,
            )
        held = held_warning(hosts, record)
        note = "; ".join(w for w in (live, held) if w)
        index = seen if seen is not None else current_index
        return _start(store, record, "rollback", note, current_index=index)

    @contextlib.contextmanager
    def refusals_counted(app: str, action: str) -> Iterator[None]:
        """Count as `refused` a write whose token Consul took and that was answered no
        (an unknown artifact or release, a host left out, a deploy already decided): only
        the refusals of the start itself were counted. Not Consul failing (503), nor a
        record that does not parse (502)."""
        try:
            yield
        except (ApiError, DeployError, RollbackTargetUnknown, ArtifactError) as exc:
            if not isinstance(exc, ApiError) or exc.status < 500:
                state.writes.labels(app=app, action=action, result="refused").inc()
            raise

    def _start(
        store: DeployStore,
        record: Any,
        action: str,
        note: str = "",
        *,
        current_index: int | None = None,
    ) -> dict[str, Any]:
        with refusals_counted(store.app, action):  # (Consul failing is no refusal)
            warning = start_deploy(
                store,
                record,
                history_keep=config.daemon.history_keep,
                current_index=current_index,
            )
        warning = "; ".join(w for w in (note, warning) if w)
        state.writes.labels(app=store.app, action=action, result="started").inc()
        log.info(
            "web_deploy_started",
            app=store.app,
            deploy=record.id,
            kind=record.kind,
            release=record.release,
            requested_by=record.requested_by,
        )
        return {
            "deploy": record.id,
            "kind": record.kind,
            "release": record.release,
            "requested_by": record.requested_by,
            "requested_at": record.requested_at,
            "expected": record.expected,
            "warning": warning,
        }

    @app.post(
        "/api/v1/apps/{app}/deploys/{deploy_id}/abort",
        summary="Abort a deploy that is not decided yet",
        responses=WRITE_ERRORS,
    )
    def post_abort(
        app: AppName, deploy_id: DeployId, request: Request, body: AbortBody | None = None
    ) -> dict[str, Any]:
        name = app_name(app)
        check_deploy_id(deploy_id)
        caller = state.writer(request)
        store = state.store(name, caller.consul)
        # The request names who (``by``): every reader says "by WHO: WHY" from the two.
        reason = body.reason.strip() if body else ""
        with refusals_counted(name, "abort"):
            view = store.view(deploy_id)
            if view is None:
                raise ApiError(404, f"app {name}: no deploy {deploy_id}")
            view = view.checked()
            settled = view.outcome.result if view.outcome else view.verdict()
            if settled == "contested":
                raise ApiError(409, contested_reason(deploy_id))
            if settled != "undecided":
                raise ApiError(409, f"deploy {deploy_id} is already decided: {settled}")
        what, after, asked = abort_deploy(
            store, deploy_id, reason, by=caller.requested_by, wait=5.0
        )
        stalled = stalled_in(store, after) if what == "undecided" else {}
        if stalled:
            # Requested, and nobody left who may honor it: a 409 that says why, not a 200.
            state.writes.labels(app=name, action="abort", result="stalled").inc()
            command = shlex.join(["watcherctl", "abort", name, deploy_id, "--end-sessions"])
            raise ApiError(
                409, "abort requested, but " + stalled_line(name, deploy_id, stalled, command)
            )
        if what in ("aborted", "undecided"):
            state.writes.labels(app=name, action="abort", result=what).inc()
            # Two aborts at once: the first request stands (written only where none is), so
            # the second caller is told whose it is, and the log does not name them for it.
            first = after.abort_requested if after is not None and not asked else None
            log.info(
                "web_deploy_aborted"
                if asked
                else "web_abort_already_requested"
                if first is not None
                else "web_deploy_found_decided",  # between the check above and the write
                app=name,
                deploy=deploy_id,
                by=caller.requested_by,
                **({"requested_by": first.by} if first is not None else {}),
            )
            return {
                "deploy": deploy_id,
                "aborted": what == "aborted",
                "result": what,
                "already_requested_by": first.by if first is not None else None,
            }
        state.writes.labels(app=name, action="abort", result="refused").inc()
        if what == "contested":
            raise ApiError(409, contested_reason(deploy_id))
        raise ApiError(
            409, f"deploy {deploy_id} is {what}: every host had acked ready, too late to abort"
        )

    # --- the page and the daemon-style endpoints ----------------------------------------

    # HEAD too: load balancers and `curl -I` probe with it.
    @app.get(
        "/healthz",
        summary="The server is up (does not ask Consul)",
        responses=errors(400, 414),
    )
    async def healthz() -> dict[str, Any]:  # async: never queued behind Consul-bound reads
        return {"ok": True, "version": __version__}

    @app.get(
        "/metrics",
        summary="Prometheus metrics of this server",
        response_class=Response,
        responses={
            **errors(400, 414),
            200: {
                "description": "the Prometheus text format (docs/metrics.md)",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            },
        },
    )
    async def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    # The page answers HEAD too (`curl -I`, an uptime check): its status says what a GET's
    # would (401 without a token where one is needed, 503 when Consul does not answer).
    @app.api_route(
        "/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False
    )
    def index(request: Request) -> Response:
        return page(request, sorted(config.apps)[0] if config.apps else "")

    @app.api_route(
        "/apps/{app}", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False
    )
    def app_page(app: AppName, request: Request) -> Response:
        return page(request, app, known=False)

    def page(request: Request, name: str, *, known: bool = True) -> Response:
        """The page of app ``name``; ``known``: a configured app's (else a browser that
        asked for another gets the page, saying so, not a JSON 404)."""
        ctx: dict[str, Any] = {
            "apps": sorted(config.apps),
            "app": name if known or name in config.apps else "",
            "loopback": state.is_local(request),
            "error": "",
            "needs_token": False,  # the page offers to take a token (another one)
            "token_refused": False,  # ... because Consul refused the one it read with
            # ... which was the server's own (`consul.token`): no caller token was sent
            "own_token": not _caller_token(request),
            # ACLs off: writes take no token (local only), so the page asks for none.
            "acls_off": state.acls_enabled is False,
        }
        status = 200
        try:
            if not known:
                app_name(name)
            reader = state.reader(request)
            store = state.store(name, reader)
            fleet = fleet_status(store)
            history, history_problem = deploy_history_checked(store, HISTORY_LIMIT)
            ctx.update(
                fleet=fleet,
                builds=build_rows(store, fleet),
                history=history,
                history_problem=history_problem,
                live=live_snapshot(store),
            )
        except ApiError as exc:
            status, ctx["needs_token"], ctx["error"] = exc.status, exc.status == 401, exc.reason
        except ConsulError as exc:
            # As the API answers: a token Consul does not know is a 401, one it knows
            # without read on the app a 403; either way the page takes another token
            # (it showed an empty page, and a reload the same, until the review of the
            # page with real clients).
            if _token_unknown(request, exc):
                status, ctx["error"] = 401, f"Consul does not know this token: {exc}"
                ctx["needs_token"] = True
            elif isinstance(exc, ConsulPermissionDenied):
                status, ctx["error"] = 403, str(exc)
                ctx["needs_token"] = ctx["token_refused"] = True
            else:
                status, ctx["error"] = 503, str(exc)
        except PayloadError as exc:
            status, ctx["error"] = 502, f"unreadable record in Consul: {exc}"
        response = templates.TemplateResponse(request, "app.html", ctx, status_code=status)
        if status == 401:
            response.headers["WWW-Authenticate"] = UNAUTHORIZED
        elif status == 503:  # as the API's (an uptime check probes the page with HEAD)
            response.headers["Retry-After"] = str(CONSUL_RETRY_AFTER)
        return response

    # HEAD wherever GET is (RFC 9110 wants it of every server: `curl -I`, uptime checks),
    # with the status a GET would get; uvicorn sends no body. Each its own route, out of
    # the schema: one route with both methods gave both operations one operationId, which
    # OpenAPI forbids (client generators stop there). Not the live stream: its HEAD is
    # its own route (``live_head``), which takes no stream's slot.
    for route in list(app.routes):
        if isinstance(route, APIRoute) and route.methods == {"GET"} and route.path != LIVE:
            app.add_api_route(
                route.path,
                route.endpoint,
                methods=["HEAD"],
                include_in_schema=False,
                response_class=route.response_class,
                status_code=route.status_code,
                dependencies=route.dependencies,  # whatever guards the GET guards the HEAD
            )
    return app


def valid(check: Callable[[object], str], value: str, field: str, what: str, rule: str) -> None:
    """422 for a name that breaks its rule in watcher.ids, the rule in the message."""
    try:
        check(value)
    except ids.InvalidName as exc:
        detail = f": {exc.detail}" if exc.detail else ""
        raise ApiError(
            422, f"{field}: {ids.shown(value)} is not {what}{detail} (must be {rule})"
        ) from None


def check_deploy_id(deploy_id: str) -> None:
    valid(ids.check_deploy_id, deploy_id, "deploy id", "a valid deploy id", ids.DEPLOY_ID_RULE)


__all__ = ["create_app", "is_loopback", "live_snapshot"]
