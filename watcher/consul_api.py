"""The Consul boundary: typed KV, session, event, txn and ACL calls.

Which calls go through py-consul's endpoint API, and which do not:

* Through py-consul (``consul.Consul``): KV put/delete (cas, acquire, release), session
  renew/destroy/info, event fire and ACL token self, each called with ``token=``
  explicitly. py-consul is imported on first use of one of these (``import consul``
  imports ``requests``, its stock HTTP client: ~50-100 ms of start-up that a command
  which only reads never needs).
* Directly, through the same HTTP client (one transport, one TLS config, one timeout
  hook, one error-mapping path) with an explicit X-Consul-Token header: KV reads (get,
  list, keys, blocking index+wait: the same GETs py-consul's ``kv.get`` makes, decoded
  here), and where py-consul 1.8.0 cannot do the job: ``/v1/event/list`` and ``/v1/txn``
  (``event.list`` and ``txn.put`` send no token: with ACLs on the list is silently empty
  and a txn fails 409), ``/v1/agent/self`` and ``/v1/status/leader`` (``agent.self`` and
  ``status.leader`` take no token), a recursive KV read whose
  ``X-Consul-Results-Filtered-By-Acls`` header matters (``kv.get`` returns no headers),
  and ``/v1/session/create`` (``session.create`` asserts a TTL of at least 10 s and can
  only send the deprecated ``Checks`` field; one direct call keeps one tested path for
  every TTL instead of a second one that only production TTLs would take).

The HTTP client is this project's (``_HTTPClient`` on ``consul_http.Transport``:
a small HTTP/1.1 client with pooled keep-alive connections), for py-consul too, instead of
py-consul's ``requests`` one, which cost several times the CPU per request (the numbers
are in ``consul_http``'s docstring).

py-consul is set up so that nothing outside ``ConsulSettings`` leaks in: its
``Consul.__init__`` prefers CONSUL_HTTP_TOKEN from the environment over the token it is
given, so the token is reset after construction and passed on every call; host, port,
scheme and verify are always given, so CONSUL_HTTP_ADDR/SSL/SSL_VERIFY are not read; and
the transport reads no proxy or CA-bundle variable, so no HTTP(S)_PROXY captures the
traffic to the agent and REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE cannot replace ``verify``.

py-consul reports HTTP failures as exceptions (``ACLPermissionDenied``, ``NotFound``,
``ConsulException("500 ...")`` ...) whose messages are the only place most statuses
appear; the HTTP client here wraps every response callback so the failing response
(status, headers, body) rides on the exception, and the mapping to ``watcher.errors`` reads
the status from there (py-consul's message format is parsed only as a fallback, for an
exception raised outside those callbacks). Transport failures pass through
py-consul untouched and are mapped here too. Timeouts, retries (tenacity) and the refusal
to retry a write that may have landed are this module's, per attempt.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextvars
import json
import re
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from watcher.config import ConsulSettings
from watcher.consul_http import Transport, TransportError, TransportTLSError
from watcher.errors import (
    ConsulError,
    ConsulPermissionDenied,
    ConsulRequestError,
    ConsulTLSError,
    ConsulUnavailable,
)
from watcher.log import Repeats, get_logger

__all__ = [
    "MAX_TXN_OPS",
    "ConsulClient",
    "ConsulEvent",
    "KVEntry",
    "TxnOp",
    "TxnResult",
    "blocking_timeout",
    "classify_response",
    "is_transient_status",
    "next_kv_index",
    "request_counts",
    "request_kind",
]

#: Most operations one ``ConsulClient.txn`` call accepts. Consul 1.22 allows 128 per
#: transaction; callers chunk anything larger than this into several transactions.
MAX_TXN_OPS = 128  # Consul v1.22 (older servers: 64)
#: Consul holds a blocking query that names no ``wait`` for five minutes.
DEFAULT_BLOCKING_WAIT = 300.0
#: Ceiling of one retry back-off sleep.
MAX_RETRY_SLEEP = 2.0
RETRY_SAID_EVERY = 60.0  # a retry for the same failure is warned of again after this long
#: Shortest per-attempt timeout when the retry deadline is almost spent.
MIN_ATTEMPT_TIMEOUT = 0.5
#: Seconds without an answer after which a client with ``on_retry`` says it waits.
SLOW_AFTER = 3.0

log = get_logger(component="consul")


@dataclass(frozen=True)
class KVEntry:
    """One KV entry as Consul returns it; ``value`` is the raw bytes (None: no value)."""

    key: str
    value: bytes | None
    modify_index: int
    create_index: int
    lock_index: int
    session: str | None
    flags: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KVEntry:
        raw = data.get("Value")
        return cls(
            key=str(data.get("Key", "")),
            value=_b64decode(raw, "KV value") if raw is not None else None,
            modify_index=int(data.get("ModifyIndex") or 0),
            create_index=int(data.get("CreateIndex") or 0),
            lock_index=int(data.get("LockIndex") or 0),
            session=data.get("Session") or None,
            flags=int(data.get("Flags") or 0),
        )


@dataclass(frozen=True)
class ConsulEvent:
    """A Consul user event as listed by an agent; ``payload`` is decoded from base64."""

    id: str
    name: str
    payload: bytes | None
    ltime: int
    node_filter: str
    service_filter: str
    tag_filter: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConsulEvent:
        raw = data.get("Payload")
        return cls(
            id=str(data.get("ID", "")),
            name=str(data.get("Name", "")),
            payload=_b64decode(raw, "event payload") if raw is not None else None,
            ltime=int(data.get("LTime") or 0),
            node_filter=str(data.get("NodeFilter") or ""),
            service_filter=str(data.get("ServiceFilter") or ""),
            tag_filter=str(data.get("TagFilter") or ""),
        )


class TxnOp:
    """Builders for the KV operations of ``/v1/txn``; values are base64-encoded here."""

    @staticmethod
    def _kv(verb: str, key: str, **fields: Any) -> dict[str, Any]:
        return {"KV": {"Verb": verb, "Key": key, **fields}}

    @staticmethod
    def set(key: str, value: bytes) -> dict[str, Any]:
        return TxnOp._kv("set", key, Value=_b64encode(value))

    @staticmethod
    def cas(key: str, value: bytes, index: int, flags: int = 0) -> dict[str, Any]:
        """Set ``key`` (and its ``flags``) if its ModifyIndex is ``index``; index 0 means it
        must not exist. Consul leaves the ModifyIndex alone when value and flags are those
        the key holds already (seen with 1.22): change the flags to make a write count."""
        fields: dict[str, Any] = {"Flags": flags} if flags else {}
        return TxnOp._kv("cas", key, Value=_b64encode(value), Index=index, **fields)

    @staticmethod
    def lock(key: str, value: bytes, session: str) -> dict[str, Any]:
        return TxnOp._kv("lock", key, Value=_b64encode(value), Session=session)

    @staticmethod
    def unlock(key: str, value: bytes, session: str) -> dict[str, Any]:
        return TxnOp._kv("unlock", key, Value=_b64encode(value), Session=session)

    @staticmethod
    def get(key: str) -> dict[str, Any]:
        return TxnOp._kv("get", key)

    @staticmethod
    def get_or_empty(key: str) -> dict[str, Any]:
        """Read ``key``; a key that does not exist yields an entry with no value and
        ModifyIndex 0 instead of failing the txn."""
        return TxnOp._kv("get-or-empty", key)

    @staticmethod
    def get_tree(prefix: str) -> dict[str, Any]:
        return TxnOp._kv("get-tree", prefix)

    @staticmethod
    def delete(key: str) -> dict[str, Any]:
        return TxnOp._kv("delete", key)

    @staticmethod
    def delete_cas(key: str, index: int) -> dict[str, Any]:
        return TxnOp._kv("delete-cas", key, Index=index)

    @staticmethod
    def delete_tree(prefix: str) -> dict[str, Any]:
        return TxnOp._kv("delete-tree", prefix)

    @staticmethod
    def check_index(key: str, index: int) -> dict[str, Any]:
        return TxnOp._kv("check-index", key, Index=index)

    @staticmethod
    def check_not_exists(key: str) -> dict[str, Any]:
        return TxnOp._kv("check-not-exists", key)

    @staticmethod
    def unchanged(key: str, index: int) -> dict[str, Any]:
        """``key`` is as read at ModifyIndex ``index`` (0: it did not exist). Consul asks
        write permission for check-not-exists, read for check-index (docs/acl.md)."""
        return TxnOp.check_index(key, index) if index else TxnOp.check_not_exists(key)

    @staticmethod
    def check_session(key: str, session: str) -> dict[str, Any]:
        return TxnOp._kv("check-session", key, Session=session)


@dataclass(frozen=True)
class TxnResult:
    """The outcome of ``/v1/txn``."""

    ok: bool  # False: Consul rolled the txn back (a check or a CAS failed)
    entries: list[KVEntry]  # when ok: one per get/write op, none for check-* ops
    errors: list[tuple[int, str]]  # (op index, what) when not ok


def blocking_timeout(timeout: float, wait: float | None) -> float:
    """The client timeout of a request: ``timeout``, plus for a blocking query its ``wait``
    and Consul's jitter of up to wait/16 (at least 1 s of slack)."""
    if wait is None:
        return timeout
    return wait + max(wait / 16, 1.0) + timeout


def next_kv_index(previous: int, returned: int) -> int:
    """The index to pass to the next blocking KV query, per Consul's documented rules.

    If the index went backwards (a snapshot restore, a new cluster), reset to 0 so the next
    query returns at once with fresh data; otherwise never let it fall below 1.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


def _b64encode(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _b64decode(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ConsulRequestError(f"Consul returned an undecodable {what}: {exc}") from exc


def _duration(seconds: float) -> str:
    """A Go duration string for Consul ("2s", "1500ms")."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _consul_message(body: str) -> str:
    """Consul's error text, on one line and bounded."""
    text = " ".join(body.split())
    return text[:300] if text else "(no message)"


class _Transient(Exception):
    """A failure worth retrying; carries the mapped error raised once retries are spent."""

    def __init__(self, error: ConsulError) -> None:
        super().__init__(str(error))
        self.error = error


_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")


def go_duration(text: str) -> float:
    """A Go ``time.Duration`` as Consul prints it (``1s``, ``1m30s``, ``500ms``, ``0s``) in
    seconds; ValueError for anything else."""
    if text in ("0", "0s"):
        return 0.0
    parts = _GO_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


# How Consul's text says the token was refused (a 403, a 500 from an RPC, a txn's error).
_DENIALS = ("permission denied", "acl not found")
# Consul answers 500 for a few requests that will never succeed when repeated.
_PERMANENT_500 = (
    "invalid session",
    "missing check",
    "invalid check",
    "invalid behavior",
    "session ttl",
    "invalid ttl",
    *_DENIALS,
)


def _is_denial(text: str) -> bool:
    lowered = text.lower()
    return any(d in lowered for d in _DENIALS)


def _denied(address: str, what: str, message: str) -> ConsulPermissionDenied:
    """A refusal of the token, said as Consul says it: unknown ("ACL not found") or lacking
    a permission (which one: Consul's message, quoted after it)."""
    lowered = message.lower()
    why = (
        "the ACL token is unknown to Consul"
        if "acl not found" in lowered
        # Consul acted with its anonymous token: no token was sent (the ACL review: "the
        # token lacks a permission" sent a newcomer looking at a token never configured)
        else "no ACL token was sent (none configured), and Consul's anonymous token lacks "
        "a permission"
        if "anonymous token" in lowered
        else "the ACL token lacks a permission"
        if "permission denied" in lowered or "lacks permission" in lowered
        else "the ACL token lacks permission or is unknown"
    )
    denied = ConsulPermissionDenied(f"Consul at {address} refused {what}: {why} ({message})")
    denied.unknown_token = "acl not found" in lowered
    return denied


def classify_response(status: int, body: str, *, what: str, address: str) -> ConsulError | None:
    """Map an HTTP answer of Consul to the project's error, or None when it is a success.

    Whether the error is worth retrying is ``is_transient_status``'s call.
    """
    if status < 400:
        return None
    message = _consul_message(body)
    if status == 403:
        return _denied(address, what, message)
    if status == 429 or status >= 500:
        lowered = message.lower()
        if status >= 500 and any(p in lowered for p in _PERMANENT_500):
            if _is_denial(message):
                return _denied(address, what, message)
            return ConsulRequestError(f"Consul at {address} refused {what}: {message}")
        return ConsulUnavailable(
            f"Consul at {address} failed {what}: HTTP {status}: {message} "
            "(the agent may have no leader or be overloaded)"
        )
    if status == 413:
        return ConsulRequestError(
            f"Consul at {address} refused {what}: request too large (HTTP 413: {message})"
        )
    return ConsulRequestError(f"Consul at {address} refused {what}: HTTP {status}: {message}")


def is_transient_status(status: int, body: str) -> bool:
    """Whether an error answer is worth retrying (5xx other than known permanent ones, 429)."""
    if status == 429:
        return True
    if status >= 500:
        lowered = body.lower()
        return not any(p in lowered for p in _PERMANENT_500)
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it wraps (reasons, args, causes)."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in out):
        out.append(current)
        inner = getattr(current, "reason", None)
        if isinstance(inner, BaseException):
            current = inner
            continue
        nxt = next((a for a in getattr(current, "args", ()) if isinstance(a, BaseException)), None)
        current = nxt or current.__cause__ or _transport_context(current)
    return out


def _transport_context(exc: BaseException) -> BaseException | None:
    """The exception ``exc`` was raised while handling, when it is part of the same
    transport failure (the socket's, urllib3's, requests'); not one the caller was handling
    when it called Consul (an S3 error whose cleanup reads KV: "cannot reach Consul ...:
    An error occurred (503) when calling the HeadObject operation")."""
    context = exc.__context__
    if context is None or exc.__suppress_context__:
        return None
    module = type(context).__module__.split(".", 1)[0]
    return context if isinstance(context, OSError) or module in _TRANSPORT_MODULES else None


_TRANSPORT_MODULES = frozenset({"urllib3", "requests", "http", "ssl", "socket"})


def _reason(exc: BaseException) -> str:
    """The innermost readable reason of a transport failure, on one line."""
    texts = [str(e) for e in _chain(exc) if str(e)]
    reason = texts[-1] if texts else type(exc).__name__
    return " ".join(reason.split())[:300]


_UNRESOLVED = ("name or service not known", "name resolution", "nodename nor servname")


def _unreachable_hint(exc: TransportError, timeout: float) -> str:
    """What to look at when a request got no answer. "Is the agent running?" blamed a
    running agent when the Consul servers behind it hung (it takes the connection and
    waits for them), and a typo'd host name (a review with a stopped server, 2026-12-06)."""
    if exc.sent and exc.timeout:
        return (
            f"the agent took the request but gave no answer in {timeout:g} s: it is stuck, "
            "or the Consul servers behind it do not answer (KV needs a leader)"
        )
    if any(s in str(exc).lower() for s in _UNRESOLVED):
        return "is the address right? its host name does not resolve"
    return "is the agent running?"


T = TypeVar("T")

if TYPE_CHECKING:
    from tenacity import RetryCallState

#: The (connect, read) timeout of the request being attempted in this thread; set by
#: ``ConsulClient._attempt`` and read by ``_HTTPClient.timeout``.
_ATTEMPT_TIMEOUT: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "consul_attempt_timeout", default=None
)

#: The attribute of a py-consul exception that carries the response it was raised for.
_RESPONSE_ATTR = "watcher_response"

#: py-consul's exception classes that stand for one HTTP status.
_STATUS_OF_EXCEPTION: tuple[tuple[str, int], ...] = (
    ("ACLDisabled", 401),
    ("ACLPermissionDenied", 403),
    ("NotFound", 404),
)

#: What py-consul's response callbacks read: ``code``, ``headers``, ``body`` (the same
#: fields as ``consul.base.Response``).
_Response = collections.namedtuple("_Response", ["code", "headers", "body"])


class _StatusError(Exception):
    """A direct call answered with an error status it does not allow."""


def _py_consul() -> Any:
    """py-consul, imported on first use: ``import consul`` imports ``requests`` (its stock
    HTTP client), ~50-100 ms that a command reading KV through the transport never needs."""
    import consul

    return consul


def _is_py_consul_error(exc: BaseException, name: str = "ConsulException") -> bool:
    module = sys.modules.get("consul")
    cls = getattr(module, name, None) if module is not None else None
    return isinstance(cls, type) and isinstance(exc, cls)


@contextmanager
def _attempt_timeout(connect: float, read: float) -> Iterator[None]:
    reset = _ATTEMPT_TIMEOUT.set((connect, read))
    try:
        yield
    finally:
        _ATTEMPT_TIMEOUT.reset(reset)


def _keeping_response(callback: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a py-consul response callback so an exception it raises carries the response."""

    def run(response: Any) -> Any:
        try:
            return callback(response)
        except Exception as exc:
            setattr(exc, _RESPONSE_ATTR, response)
            raise

    return run


def _raw_answer(allow: tuple[int, ...] = ()) -> Callable[[Any], Any]:
    """A response callback for the direct calls: the response itself, or ``_StatusError``
    for an error status not in ``allow``."""

    def run(response: Any) -> Any:
        if response.code >= 400 and response.code not in allow:
            raise _StatusError(f"{response.code} {response.body}")
        return response

    return run


def _failed_status(exc: Exception) -> tuple[int, str] | None:
    """The HTTP status and body a py-consul exception was raised for, if it was."""
    response = getattr(exc, _RESPONSE_ATTR, None)
    if isinstance(response, _Response):
        body = response.body
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        return int(response.code), text
    # Not raised by a callback of ours: fall back on py-consul's own conventions (the class
    # for 401/403/404, "<status> <body>" as the message of the others).
    for name, status in _STATUS_OF_EXCEPTION:
        if _is_py_consul_error(exc, name):
            return status, str(exc)
    match = re.fullmatch(r"([45]\d\d) (.*)", str(exc), re.DOTALL)
    if match:
        return int(match.group(1)), match.group(2)
    return None


_REQUESTS: Counter[str] = Counter()
_REQUESTS_LOCK = threading.Lock()


def request_kind(method: str, path: str, params: Any = None) -> str:
    """The endpoint kind of one Consul HTTP request, e.g. ``kv_get_blocking``, ``txn``.

    KV reads are told apart by their query parameters: ``index`` makes a blocking query,
    ``recurse`` a list, ``keys`` a key listing.
    """
    names = {p[0] for p in params or () if isinstance(p, tuple | list) and p}
    if isinstance(params, Mapping):
        names = set(params)
    parts = path.split("/")  # "", "v1", "kv", ...
    area = parts[2] if len(parts) > 2 else ""
    action = parts[3] if len(parts) > 3 else ""
    blocking = "_blocking" if "index" in names else ""
    if area == "kv":
        if method == "GET":
            if "keys" in names:
                return "kv_keys" + blocking
            return ("kv_list" if "recurse" in names else "kv_get") + blocking
        return {"PUT": "kv_put", "DELETE": "kv_delete"}.get(method, "kv_other")
    if area == "txn":
        return "txn"
    if area == "session" and action in ("create", "renew", "destroy", "info"):
        return f"session_{action}"
    if area == "event" and action in ("fire", "list"):
        return f"event_{action}" + (blocking if action == "list" else "")
    if area in ("agent", "status", "acl"):
        return area
    return "other"


def request_counts() -> dict[str, int]:
    """Consul HTTP requests this process has sent so far, by ``request_kind``.

    Every attempt counts (a retry is another request), including those that failed.
    """
    with _REQUESTS_LOCK:
        return dict(_REQUESTS)


def _count_request(method: str, path: str, params: Any) -> None:
    kind = request_kind(method, path, params)
    with _REQUESTS_LOCK:
        _REQUESTS[kind] += 1


class _HTTPClient:
    """py-consul's HTTP client interface (get/put/delete/post with a response callback)
    on this project's ``Transport`` (``consul_http``); the direct calls use it too.

    Every response callback keeps the failing response on the exception. The timeout of
    each request is the one ``ConsulClient`` set for the attempt. Every request of the
    process goes through here and is counted (``request_counts``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        scheme: str,
        verify: bool | str,
        cert: tuple[str, str] | None,
        *,
        base_url: str,
        timeout: float,
    ) -> None:
        self.host, self.port, self.scheme = host, port, scheme
        self.verify, self.cert = verify, cert
        # The configured address as given ("[::1]:8500", a name without a port ...).
        self.base_uri = base_url
        self.default_timeout = timeout
        self.transport = Transport(host, port, scheme, verify=verify, cert=cert)

    def timeout(self, params: Any) -> tuple[float, float]:
        """(connect, read) seconds of the request being attempted in this thread."""
        attempt = _ATTEMPT_TIMEOUT.get()
        if attempt is not None:
            return attempt
        names = {p[0] for p in params or () if isinstance(p, tuple | list) and p}
        wait = DEFAULT_BLOCKING_WAIT if "index" in names else None
        return self.default_timeout, blocking_timeout(self.default_timeout, wait)

    def _send(
        self,
        method: str,
        callback: Callable[[Any], Any],
        path: str,
        params: Any,
        data: str | bytes | None,
        headers: dict[str, str] | None,
        raw: bool = False,
    ) -> Any:
        _count_request(method, path, params)
        target = urllib.parse.quote(path, safe="/:")
        if params:
            target = f"{target}?{urllib.parse.urlencode(params)}"
        body = data.encode() if isinstance(data, str) else data
        connect, read = self.timeout(params)
        answer = self.transport.request(
            method,
            target,
            body=body if body or method != "GET" else None,
            headers={"User-Agent": "release-watcher", **(headers or {})},
            connect_timeout=connect,
            read_timeout=read,
        )
        content: str | bytes = answer.body if raw else answer.body.decode("utf-8", "replace")
        return _keeping_response(callback)(_Response(answer.status, answer.headers, content))

    def get(
        self,
        callback: Callable[[Any], Any],
        path: str,
        params: Any = None,
        headers: dict[str, str] | None = None,
        raw: bool = False,
    ) -> Any:
        return self._send("GET", callback, path, params, None, headers, raw)

    def put(
        self,
        callback: Callable[[Any], Any],
        path: str,
        params: Any = None,
        data: str | bytes = "",
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self._send("PUT", callback, path, params, data, headers)

    def delete(
        self,
        callback: Callable[[Any], Any],
        path: str,
        params: Any = None,
        data: str | bytes = "",
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self._send("DELETE", callback, path, params, data, headers)

    def post(
        self,
        callback: Callable[[Any], Any],
        path: str,
        params: Any = None,
        data: str = "",
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self._send("POST", callback, path, params, data, headers)

    def close(self) -> None:
        self.transport.close()


def _http_client(settings: ConsulSettings) -> _HTTPClient:
    """The HTTP client of ``settings``: host, port, scheme and TLS files, nothing else."""
    parts = urllib.parse.urlsplit(settings.base_url)
    try:
        port = parts.port
    except ValueError:
        port = None
    verify: bool | str = True
    cert: tuple[str, str] | None = None
    if settings.scheme == "https":
        verify = (settings.ca_file or True) if settings.verify else False
        if settings.cert_file and settings.key_file:
            cert = (settings.cert_file, settings.key_file)
    return _HTTPClient(
        parts.hostname or "127.0.0.1",
        port or (8501 if settings.scheme == "https" else 8500),
        settings.scheme,
        verify,
        cert,
        base_url=settings.base_url,
        timeout=settings.timeout,
    )


def _py_consul_on(http: _HTTPClient, settings: ConsulSettings) -> Any:
    """``consul.Consul`` on ``http``, configured from ``settings`` only."""
    consul = _py_consul()

    class _Consul(consul.Consul):  # type: ignore[misc,name-defined]  # py-consul is untyped
        def http_connect(self, *args: Any, **kwargs: Any) -> _HTTPClient:
            return http

    # host, port, scheme and verify are all given, so py-consul reads none of
    # CONSUL_HTTP_ADDR, CONSUL_HTTP_SSL and CONSUL_HTTP_SSL_VERIFY.
    client = _Consul(
        host=http.host,
        port=http.port,
        token=settings.token,
        scheme=settings.scheme,
        verify=http.verify,
        cert=http.cert,
    )
    # py-consul's __init__ takes CONSUL_HTTP_TOKEN from the environment over the token it
    # is given; the configuration (which already read that variable) decides.
    client.token = settings.token
    return client


def _index(value: Any) -> int:
    """An X-Consul-Index as an int (0 when missing or garbled)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class ConsulClient:
    """Typed access to one Consul agent's HTTP API (the local agent of this host).

    One client may be shared by threads (a renewal thread, watches); each concurrent
    blocking query holds a connection of its own.
    """

    def __init__(
        self,
        settings: ConsulSettings,
        *,
        retry_deadline: float = 10.0,
        on_retry: Callable[[str, float], None] | None = None,
    ) -> None:
        """``on_retry(error, seconds left)``: called at the first retry of this client's
        requests only (``watcherctl`` prints it: a command that waits out the retry
        deadline in silence looks hung)."""
        self.settings = settings
        self._on_retry = on_retry
        self.retry_deadline = retry_deadline
        self.address = settings.base_url
        self._token = settings.token
        self._http = _http_client(settings)
        self._py: Any = None
        # The failure the last `consul_retry` warning said: the same one again (whichever
        # request met it) is a debug line for RETRY_SAID_EVERY. A stopped agent made ~9
        # warnings a second, one per retry of each watch (the review).
        self._retry_said = Repeats(RETRY_SAID_EVERY)

    @property
    def _consul(self) -> Any:
        """py-consul's client on this client's transport, made on first use."""
        if self._py is None:
            self._py = _py_consul_on(self._http, self.settings)
        return self._py

    # ----------------------------------------------------------------- plumbing

    def _headers(self) -> dict[str, str]:
        """The headers of a direct call: the token, as py-consul's endpoints send it."""
        return {"X-Consul-Token": self._token} if self._token else {}

    def _attempt(
        self,
        call: Callable[[], T],
        *,
        what: str,
        wait: float | None,
        deadline_at: float,
        idempotent: bool,
    ) -> T:
        timeout = blocking_timeout(self.settings.timeout, wait)
        if wait is None:
            remaining = deadline_at - time.monotonic()
            timeout = max(min(timeout, remaining), MIN_ATTEMPT_TIMEOUT)
        connect_timeout = min(self.settings.timeout, timeout)
        slow = (
            self._slow_notice(what, deadline_at) if wait is None and timeout > SLOW_AFTER else None
        )
        try:
            with _attempt_timeout(connect_timeout, timeout):
                return call()
        except TransportTLSError as exc:
            raise ConsulTLSError(
                f"TLS connection to Consul at {self.address} failed for {what}: {_reason(exc)}"
            ) from exc
        except TransportError as exc:
            kind = "timed out" if exc.timeout else "failed"
            if not idempotent and exc.sent:
                # The agent may have applied the write before the connection broke: a retry
                # could then report a lost CAS or a failed check for our own success.
                raise ConsulUnavailable(
                    f"Consul at {self.address} did not answer {what}: connection {kind}: "
                    f"{_reason(exc)}; the write may or may not have been applied"
                ) from exc
            error = ConsulUnavailable(
                f"cannot reach Consul at {self.address} for {what}: connection {kind}: "
                f"{_reason(exc)} ({_unreachable_hint(exc, timeout)})"
            )
            raise _Transient(error) from exc
        except binascii.Error as exc:  # py-consul's base64 decoding of KV values
            raise ConsulRequestError(
                f"Consul at {self.address} answered {what} with undecodable base64: {exc}"
            ) from exc
        except Exception as exc:
            if not isinstance(exc, _StatusError) and not _is_py_consul_error(exc):
                raise
            failed = _failed_status(exc)
            if failed is None or failed[0] < 400:
                # py-consul could not use a successful answer (invalid JSON, no index).
                raise ConsulRequestError(
                    f"Consul at {self.address} answered {what} with something unusable: "
                    f"{_consul_message(str(exc))}"
                ) from exc
            status, body = failed
            mapped = classify_response(status, body, what=what, address=self.address)
            if mapped is None:  # not reached: every status >= 400 maps to an error
                raise
            if is_transient_status(status, body):
                raise _Transient(mapped) from exc
            raise mapped from exc
        finally:
            if slow is not None:
                slow.cancel()

    def _slow_notice(self, what: str, deadline_at: float) -> threading.Timer | None:
        """For a client with ``on_retry`` (watcherctl): a hung agent (or a hung server
        behind it) takes the connection and answers nothing, and the first attempt then
        waits out the whole retry budget: 10 s of silence before the error (the CLI
        review). Said after ``SLOW_AFTER`` s instead, once, as a first retry is."""
        if self._on_retry is None:
            return None

        def tell() -> None:
            notice, self._on_retry = self._on_retry, None
            if notice is not None:
                notice(
                    f"no answer yet from Consul at {self.address} for {what} after "
                    f"{SLOW_AFTER:g} s",
                    max(deadline_at - time.monotonic(), 0.0),
                )

        timer = threading.Timer(SLOW_AFTER, tell)
        timer.daemon = True
        timer.start()
        return timer

    def _call(
        self,
        call: Callable[[], T],
        *,
        what: str,
        wait: float | None = None,
        idempotent: bool = True,
    ) -> T:
        """Run ``call`` (one request through py-consul) with the retry policy.

        Transient failures are retried until ``retry_deadline`` (counted from the first
        attempt, so a blocking query that fails after its wait is not retried). A
        non-``idempotent`` write is retried only when the request surely did not reach
        Consul (connection refused, connect timeout) or Consul answered 429/5xx.
        """
        started = time.monotonic()
        deadline_at = started + self.retry_deadline
        try:
            try:
                return self._attempt(
                    call, what=what, wait=wait, deadline_at=deadline_at, idempotent=idempotent
                )
            except _Transient as exc:
                first = exc
            return self._retry(
                call, first, what=what, wait=wait, deadline_at=deadline_at, idempotent=idempotent
            )
        except ConsulError as exc:
            # When the failing call began: a paused or cut-off agent answers nothing until
            # the timeout, and that wait is part of how long Consul could not be read.
            exc.started_at = exc.started_at or started
            raise

    def _retry(
        self,
        call: Callable[[], T],
        first: _Transient,
        *,
        what: str,
        wait: float | None,
        deadline_at: float,
        idempotent: bool,
    ) -> T:
        """The attempts after a first one failed transiently, under tenacity (imported
        here: a process whose requests all succeed never loads it)."""
        from tenacity import (
            Retrying,
            retry_if_exception_type,
            stop_before_delay,
            wait_exponential,
            wait_random,
        )

        failed = [first]

        def attempt() -> T:
            if failed:  # tenacity's first attempt is the one already made
                raise failed.pop()
            return self._attempt(
                call, what=what, wait=wait, deadline_at=deadline_at, idempotent=idempotent
            )

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            notice, self._on_retry = self._on_retry, None
            if notice is not None:
                error = exc.error if isinstance(exc, _Transient) else exc
                notice(str(error), max(deadline_at - time.monotonic(), 0.0))
            text = str(exc)
            # the same failure of another request is no news
            news = self._retry_said.news(text.replace(what, "..."))
            (log.warning if news else log.debug)(
                "consul_retry",
                what=what,
                attempt=state.attempt_number,
                error=text,
                sleep=round(state.upcoming_sleep, 3),
            )

        retrying = Retrying(
            stop=stop_before_delay(max(deadline_at - time.monotonic(), 0.0)),
            wait=wait_exponential(multiplier=0.05, max=MAX_RETRY_SLEEP) + wait_random(0, 0.1),
            retry=retry_if_exception_type(_Transient),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            result: T = retrying(attempt)
        except _Transient as exc:
            raise exc.error from exc.__cause__
        return result

    def _direct(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: list[tuple[str, Any]] | None = None,
        data: bytes = b"",
        wait: float | None = None,
        allow: tuple[int, ...] = (),
        idempotent: bool = True,
    ) -> Any:
        """One request py-consul's endpoint API cannot make, through its HTTP client, with
        the token; returns the ``consul.base.Response`` (an error status only if in
        ``allow``)."""
        callback = _raw_answer(allow)
        headers = self._headers()

        def call() -> Any:
            if method == "GET":
                return self._http.get(callback, path, params=params, headers=headers)
            return self._http.put(callback, path, params=params, data=data, headers=headers)

        return self._call(call, what=what, wait=wait, idempotent=idempotent)

    def _json(self, response: Any, what: str) -> Any:
        try:
            return json.loads(response.body)
        except ValueError as exc:
            raise ConsulRequestError(
                f"Consul at {self.address} answered {what} with invalid JSON: "
                f"{_consul_message(str(response.body))}"
            ) from exc

    @staticmethod
    def _kv_key(key: str) -> str:
        return key.lstrip("/")

    # ----------------------------------------------------------------- agent

    def _agent_self(self) -> Any:
        """``/v1/agent/self``, decoded."""
        return self._json(self._direct("GET", "/v1/agent/self", what="agent self"), "agent self")

    def agent_node_name(self) -> str:
        """The node name of the agent this client talks to."""
        data = self._agent_self()
        try:
            return str(data["Config"]["NodeName"])
        except (KeyError, TypeError) as exc:
            raise ConsulRequestError(
                f"Consul at {self.address}: /v1/agent/self has no Config.NodeName"
            ) from exc

    def agent_session_ttl_min(self) -> float | None:
        """The agent's ``session_ttl_min`` in seconds (its ``DebugConfig``), None when it
        does not say (another version's shape) or says 0s: not set, so Consul's servers
        use their default (10 s)."""
        data = self._agent_self()
        try:
            seconds = go_duration(str(data["DebugConfig"]["SessionTTLMin"]))
        except (KeyError, TypeError, ValueError):
            return None
        return seconds or None

    def leader(self) -> str:
        """The raft leader's address, "" when the cluster has none."""
        resp = self._direct("GET", "/v1/status/leader", what="status leader")
        return str(self._json(resp, "status leader") or "")

    # ----------------------------------------------------------------- KV

    def _kv_read(
        self,
        path: str,
        params: list[tuple[str, Any]],
        *,
        what: str,
        index: int | None = None,
        wait: float | None = None,
    ) -> tuple[int, Any]:
        """One GET of ``/v1/kv/<path>``: (X-Consul-Index, the JSON answer or None on 404).

        KV reads go straight through the transport rather than py-consul's ``kv.get``: the
        same request, without importing py-consul (and its ``requests``) for a command that
        only reads."""
        if index is not None and wait is not None:
            params = [*params, ("index", index), ("wait", _duration(wait))]
        resp = self._direct(
            "GET",
            f"/v1/kv/{self._kv_key(path)}",
            what=what,
            params=params,
            wait=wait if index is not None else None,
            allow=(404,),
        )
        returned = _index(resp.headers.get("X-Consul-Index"))
        if resp.code == 404:
            self._check_not_found(resp, what)
            return returned, None
        return returned, self._json(resp, what)

    def _check_not_found(self, resp: Any, what: str) -> None:
        """A KV 404 is "no such key" only from Consul, which sends ``X-Consul-Index`` with
        it: from any other server (an app's port, a proxy) it would read as an empty KV,
        "no deploy in flight", with exit 0."""
        if resp.headers.get("X-Consul-Index") is None:
            raise ConsulRequestError(
                f"{self.address} answered {what} with 404 and without the X-Consul-Index "
                f"header every Consul agent sends: is it a Consul agent's HTTP API address?"
            )

    def _list_of(self, data: Any, item: type, label: str, what: str) -> list[Any]:
        """A KV answer that must be a list of ``item`` (None, a 404: an empty list)."""
        if data is None:
            return []
        if not isinstance(data, list) or not all(isinstance(d, item) for d in data):
            raise ConsulRequestError(
                f"Consul at {self.address} answered {what} with something other than a "
                f"list of {label}"
            )
        return data

    def _entries(self, data: Any, what: str) -> list[KVEntry]:
        return [KVEntry.from_json(d) for d in self._list_of(data, dict, "KV entries", what)]

    def _names(self, data: Any, what: str) -> list[str]:
        return list(self._list_of(data, str, "key names", what))

    def kv_get(self, key: str, *, consistent: bool = False) -> KVEntry | None:
        """The entry at ``key``, None when there is none. ``consistent`` makes the leader
        confirm its leadership first: a read after an election never answers 404 for a key
        that exists."""
        what = f"kv get {key}"
        _, data = self._kv_read(key, [("consistent", "1")] if consistent else [], what=what)
        entries = self._entries(data, what)
        return entries[0] if entries else None

    def kv_get_blocking(self, key: str, index: int, wait: float) -> tuple[int, KVEntry | None]:
        """Wait up to ``wait`` s for ``key`` to change past ``index``; (next index, entry).

        The returned index follows Consul's rules (see ``next_kv_index``): pass it to the
        next call. On timeout the same entry comes back with an unchanged index.
        """
        what = f"kv watch {key}"
        returned, data = self._kv_read(key, [], what=what, index=index, wait=wait)
        entries = self._entries(data, what)
        return next_kv_index(index, returned), entries[0] if entries else None

    def kv_list(self, prefix: str) -> list[KVEntry]:
        """Every entry under ``prefix`` (recursive; end a directory prefix with "/")."""
        what = f"kv list {prefix}"
        _, data = self._kv_read(prefix, [("recurse", "1")], what=what)
        return self._entries(data, what)

    def kv_list_checked(self, prefix: str) -> tuple[list[KVEntry], bool]:
        """``kv_list``, and whether Consul left entries out because the token may not read
        them (its ``X-Consul-Results-Filtered-By-Acls`` header): an empty or short list
        then says nothing about what exists."""
        what = f"kv list {prefix}"
        data, filtered = self._kv_read_checked(prefix, [("recurse", "")], what)
        return (self._entries(data, what) if data is not None else []), filtered

    def _kv_read_checked(
        self, prefix: str, params: list[tuple[str, Any]], what: str
    ) -> tuple[Any, bool]:
        """One GET of ``/v1/kv/<prefix>``: (the JSON answer or None on 404, whether Consul
        filtered it by the token's ACLs)."""
        resp = self._direct(
            "GET", f"/v1/kv/{self._kv_key(prefix)}", what=what, params=params, allow=(404,)
        )
        headers = {str(k).lower(): str(v) for k, v in dict(resp.headers).items()}
        filtered = headers.get("x-consul-results-filtered-by-acls", "").lower() == "true"
        if resp.code == 404:
            self._check_not_found(resp, what)
            return None, filtered
        return self._json(resp, what), filtered

    def kv_list_blocking(self, prefix: str, index: int, wait: float) -> tuple[int, list[KVEntry]]:
        """Blocking ``kv_list``: wait up to ``wait`` s for a change under ``prefix``."""
        what = f"kv watch {prefix}"
        returned, data = self._kv_read(
            prefix, [("recurse", "1")], what=what, index=index, wait=wait
        )
        return next_kv_index(index, returned), self._entries(data, what)

    def kv_keys(self, prefix: str, separator: str | None = "/") -> list[str]:
        """Key names under ``prefix``; with a separator, sub-trees collapse to "dir/"."""
        what = f"kv keys {prefix}"
        params: list[tuple[str, Any]] = [("keys", "1")]
        if separator:
            params.append(("separator", separator))
        _, data = self._kv_read(prefix, params, what=what)
        return self._names(data, what)

    def kv_keys_checked(self, prefix: str) -> tuple[list[str], bool]:
        """The names one level under ``prefix`` (sub-trees as "dir/"), and whether Consul
        left some out because the token may not read them (as ``kv_list_checked``)."""
        what = f"kv keys {prefix}"
        params: list[tuple[str, Any]] = [("keys", "1"), ("separator", "/")]
        data, filtered = self._kv_read_checked(prefix, params, what)
        return (self._names(data, what) if data is not None else []), filtered

    def kv_keys_blocking(self, prefix: str, index: int, wait: float) -> tuple[int, list[str]]:
        """A watch on a whole tree: wakes on any write or delete under ``prefix``, at any
        depth, but carries only the names one level down (sub-trees collapse to "dir/").

        Consul's index for a keys read covers every key under the prefix, separator or
        not; without one the answer would list every key of the tree, and the trees
        watched this way grow with history (``progress/`` keeps two keys per host per
        deploy: 10,000 names, ~580 KB, per answer at 100 hosts and 50 deploys kept)."""
        what = f"kv watch keys {prefix}"
        params: list[tuple[str, Any]] = [("keys", "1"), ("separator", "/")]
        returned, data = self._kv_read(prefix, params, what=what, index=index, wait=wait)
        return next_kv_index(index, returned), self._names(data, what)

    def kv_put(
        self,
        key: str,
        value: bytes,
        *,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
    ) -> bool:
        """Write ``key``; False when a CAS, acquire or release did not take effect.

        A CAS or release is not retried once it may have reached Consul (see ``txn``).
        """
        result = self._call(
            lambda: self._consul.kv.put(
                self._kv_key(key),
                value,
                cas=cas,
                acquire=acquire,
                release=release,
                token=self._token,
            ),
            what=f"kv put {key}",
            idempotent=cas is None and release is None,
        )
        return result is True

    def kv_delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        """Delete ``key`` (or the tree under it); False when the CAS lost."""
        result = self._call(
            lambda: self._consul.kv.delete(
                self._kv_key(key), recurse=recurse or None, cas=cas, token=self._token
            ),
            what=f"kv delete {key}",
            idempotent=cas is None,
        )
        return result is True

    # ----------------------------------------------------------------- txn

    def txn(self, ops: list[dict[str, Any]], *, consistent: bool = False) -> TxnResult:
        """Run KV operations (``TxnOp``) atomically; at most ``MAX_TXN_OPS`` per call.

        A failed check or CAS rolls everything back and returns ``ok=False`` with Consul's
        per-op errors (HTTP 409); it never raises for that. A permission error inside the
        txn raises ``ConsulPermissionDenied``. A txn is not retried once it may have reached
        Consul: when the connection breaks after sending, ``ConsulUnavailable`` says the
        outcome is unknown, and the caller re-reads the keys before deciding anything.
        """
        if len(ops) > MAX_TXN_OPS:
            raise ConsulRequestError(
                f"txn of {len(ops)} operations exceeds the limit of {MAX_TXN_OPS} per call "
                "(split it into several transactions)"
            )
        if not ops:
            return TxnResult(ok=True, entries=[], errors=[])
        what = f"txn of {len(ops)} ops"
        read_only = all(op.get("KV", {}).get("Verb", "").startswith(("get", "check")) for op in ops)
        resp = self._direct(
            "PUT",
            "/v1/txn",
            what=what,
            params=[("consistent", "1")] if consistent and read_only else None,
            data=json.dumps(ops).encode(),
            allow=(409,),
            idempotent=read_only,
        )
        data = self._json(resp, what) or {}
        if resp.code == 409:
            errors = [
                (int(e.get("OpIndex", -1)), str(e.get("What", "")))
                for e in data.get("Errors") or []
            ]
            denied = [w for _, w in errors if _is_denial(w)]
            if denied:
                raise _denied(self.address, what, _consul_message(denied[0]))
            return TxnResult(ok=False, entries=[], errors=errors)
        entries = [KVEntry.from_json(r["KV"]) for r in data.get("Results") or [] if "KV" in r]
        return TxnResult(ok=True, entries=entries, errors=[])

    # ----------------------------------------------------------------- sessions

    def session_create(
        self,
        name: str,
        ttl: float,
        *,
        behavior: str = "delete",
        lock_delay: float = 0,
        checks: list[str] | None = None,
    ) -> str:
        """Create a session on the local agent's node; returns its id.

        ``checks`` are node check ids (default ``["serfHealth"]``: the session dies with the
        agent); ``[]`` makes a TTL-only session. Any TTL Consul's ``session_ttl_min`` allows
        is accepted (py-consul refuses under 10 s, so this calls the endpoint itself).
        """
        if behavior not in ("delete", "release"):
            raise ConsulRequestError(
                f'session behavior must be "delete" or "release", got "{behavior}"'
            )
        body = {
            "Name": name,
            "TTL": _duration(ttl),
            "Behavior": behavior,
            "LockDelay": _duration(lock_delay),
            "NodeChecks": ["serfHealth"] if checks is None else list(checks),
        }
        what = f"session create {name}"
        resp = self._direct("PUT", "/v1/session/create", what=what, data=json.dumps(body).encode())
        data = self._json(resp, what)
        try:
            return str(data["ID"])
        except (KeyError, TypeError) as exc:
            raise ConsulRequestError(
                f"Consul at {self.address} answered {what} without an ID"
            ) from exc

    def session_renew(self, session_id: str) -> bool:
        """Renew the session's TTL; False when Consul no longer knows it (404)."""

        def renew() -> Any:
            try:
                return self._consul.session.renew(session_id, token=self._token)
            except Exception as exc:
                if _is_py_consul_error(exc, "NotFound"):
                    return None
                raise

        return bool(self._call(renew, what=f"session renew {session_id}"))

    def session_destroy(self, session_id: str) -> None:
        """Destroy the session (its locks follow its behavior); unknown ids are fine."""
        self._call(
            lambda: self._consul.session.destroy(session_id, token=self._token),
            what=f"session destroy {session_id}",
        )

    def session_info(self, session_id: str, *, consistent: bool = False) -> dict[str, Any] | None:
        """Consul's record of the session, None when it does not exist (any more).

        With ``consistent``, a None is proof: Consul never revives a session."""
        _, data = self._call(
            lambda: self._consul.session.info(
                session_id, token=self._token, consistency="consistent" if consistent else None
            ),
            what=f"session info {session_id}",
        )
        return dict(data) if data else None

    # ----------------------------------------------------------------- events

    def event_fire(self, name: str, payload: bytes) -> str:
        """Fire a user event through the local agent; returns the event's ID.

        Consul 1.22 limits the payload to 300 bytes (HTTP 413 above that): a larger one
        raises ``ConsulRequestError``. Events carry ids, never records. Straight through the
        transport (py-consul's ``event.fire`` is the same PUT): `watcherctl deploy` fires
        one after its KV write, while every daemon is busy with that deploy, and would
        otherwise import py-consul and ``requests`` for it (116 more modules in its profile).
        """
        what = f"event fire {name}"
        if not name or "/" in name:
            raise ConsulRequestError(f'event name "{name}" must be non-empty and have no "/"')
        resp = self._direct("PUT", f"/v1/event/fire/{name}", what=what, data=payload, allow=(413,))
        if resp.code == 413:
            raise ConsulRequestError(
                f"Consul at {self.address} refused {what}: the payload of {len(payload)} "
                f"bytes is over Consul's user event size limit "
                f"({_consul_message(str(resp.body))}); events carry ids, not records"
            )
        data = self._json(resp, what)
        try:
            return str(data["ID"])
        except (KeyError, TypeError) as exc:
            raise ConsulRequestError(
                f"Consul at {self.address} answered {what} without an ID"
            ) from exc

    def event_list(
        self,
        name: str | None = None,
        *,
        index: str | None = None,
        wait: float | None = None,
        skip: Container[str] = (),
    ) -> tuple[str, list[ConsulEvent]]:
        """The agent's buffered user events (up to 256, oldest first); (index, events).

        The index is Consul's X-Consul-Index for this endpoint, derived from the newest
        event's ID: it is NOT monotonic. Callers compare it with the previous value for
        change only (never for order), and pass it back as ``index`` to block up to ``wait``
        seconds until the event list changes. Events whose ID is in ``skip`` (those a
        caller already handled) are left out, undecoded.
        """
        params: list[tuple[str, Any]] = []
        if name:
            params.append(("name", name))
        if index is not None:
            params.append(("index", index))
            if wait is None:
                wait = DEFAULT_BLOCKING_WAIT
        if wait is not None:
            params.append(("wait", _duration(wait)))
        what = f"event list {name}" if name else "event list"
        resp = self._direct(
            "GET",
            "/v1/event/list",
            what=what,
            params=params,
            wait=wait if index is not None else None,
        )
        new_index = str(resp.headers.get("X-Consul-Index", ""))
        listed = self._json(resp, what) or []
        events = [ConsulEvent.from_json(d) for d in listed if str(d.get("ID", "")) not in skip]
        return new_index, events

    # ----------------------------------------------------------------- ACL

    def acl_token_self(self) -> dict[str, Any]:
        """The ACL token this client uses, as Consul describes it (AccessorID, Description,
        Policies ...). Raises ``ConsulPermissionDenied`` for an unknown token and
        ``ConsulRequestError`` when ACLs are disabled."""
        data = self._call(
            lambda: self._consul.acl.token.read_self(token=self._token), what="acl token self"
        )
        return dict(data or {})

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def __enter__(self) -> ConsulClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
