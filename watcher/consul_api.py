"""The Consul boundary: typed KV, session, event, txn and ACL calls over Consul's HTTP API."""

# Every call goes through one ``requests.Session`` that carries the ACL token as the
# X-Consul-Token header, the TLS settings and an explicit timeout, and every failure is
# mapped to ``watcher.errors`` here. py-consul (``consul``) is deliberately not used for the
# calls themselves: 1.8.0 omits the token on ``event.list``, ``txn.put`` and ``agent.self``
# (with ACLs on, event.list silently returns [] and txn fails 409), refuses session TTLs
# under 10 s, lets CONSUL_HTTP_TOKEN override an explicitly given token, and reports HTTP
# statuses only inside exception strings. One HTTP path keeps the token, the timeouts, the
# retries and the error mapping the same for every endpoint.

from __future__ import annotations

import base64
import binascii
import json
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from watcher.config import ConsulSettings
from watcher.errors import (
    ConsulError,
    ConsulPermissionDenied,
    ConsulRequestError,
    ConsulTLSError,
    ConsulUnavailable,
)
from watcher.log import get_logger

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
    "request_not_sent",
]

#: Most operations one ``ConsulClient.txn`` call accepts. Consul 1.22 allows 128 per
#: transaction; callers chunk anything larger than this into several transactions.
MAX_TXN_OPS = 64
#: Consul holds a blocking query that names no ``wait`` for five minutes.
DEFAULT_BLOCKING_WAIT = 300.0
#: Ceiling of one retry back-off sleep.
MAX_RETRY_SLEEP = 2.0
#: Shortest per-attempt timeout when the retry deadline is almost spent.
MIN_ATTEMPT_TIMEOUT = 0.5
#: Pooled connections per client: each concurrent blocking query holds one.
POOL_SIZE = 32

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
    def cas(key: str, value: bytes, index: int) -> dict[str, Any]:
        """Set ``key`` if its ModifyIndex is ``index``; index 0 means it must not exist."""
        return TxnOp._kv("cas", key, Value=_b64encode(value), Index=index)

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


# Consul answers 500 for a few requests that will never succeed when repeated.
_PERMANENT_500 = (
    "invalid session",
    "missing check",
    "invalid check",
    "invalid behavior",
    "session ttl",
    "invalid ttl",
    "permission denied",
    "acl not found",
)


def classify_response(status: int, body: str, *, what: str, address: str) -> ConsulError | None:
    """Map an HTTP answer of Consul to the project's error, or None when it is a success.

    Whether the error is worth retrying is ``is_transient_status``'s call.
    """
    if status < 400:
        return None
    message = _consul_message(body)
    if status == 403:
        return ConsulPermissionDenied(
            f"Consul at {address} refused {what}: the ACL token lacks permission or is "
            f"unknown ({message})"
        )
    if status == 429 or status >= 500:
        lowered = message.lower()
        if status >= 500 and any(p in lowered for p in _PERMANENT_500):
            if "permission denied" in lowered or "acl not found" in lowered:
                return ConsulPermissionDenied(
                    f"Consul at {address} refused {what}: the ACL token lacks permission or "
                    f"is unknown ({message})"
                )
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
    """``exc`` and the exceptions it wraps (urllib3 reasons, args, causes)."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in out):
        out.append(current)
        inner = getattr(current, "reason", None)
        if isinstance(inner, BaseException):
            current = inner
            continue
        nxt = next((a for a in getattr(current, "args", ()) if isinstance(a, BaseException)), None)
        current = nxt or current.__cause__ or current.__context__
    return out


def request_not_sent(exc: BaseException) -> bool:
    """Whether a requests failure happened before the request could reach the server."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    return any(
        isinstance(e, urllib3.exceptions.NewConnectionError | ConnectionRefusedError)
        for e in _chain(exc)
    )


def _reason(exc: BaseException) -> str:
    """The innermost readable reason of a requests/urllib3 exception, on one line."""
    texts = [str(e) for e in _chain(exc) if str(e)]
    reason = texts[-1] if texts else type(exc).__name__
    return " ".join(reason.split())[:300]


class ConsulClient:
    """Typed access to one Consul agent's HTTP API (the local agent of this host).

    One client may be shared by threads (a renewal thread, watches); each concurrent
    blocking query holds one of ``POOL_SIZE`` pooled connections.
    """

    def __init__(self, settings: ConsulSettings, *, retry_deadline: float = 10.0) -> None:
        self.settings = settings
        self.retry_deadline = retry_deadline
        self.address = settings.base_url
        self._session = requests.Session()
        # TLS and the token come from ConsulSettings only (CONSUL_CACERT ...), never from
        # requests' own environment: REQUESTS_CA_BUNDLE would override ``verify``, and an
        # HTTP(S)_PROXY must not capture the traffic to the local agent.
        self._session.trust_env = False
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=POOL_SIZE)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = "release-watcher"
        if settings.token:
            self._session.headers["X-Consul-Token"] = settings.token
        self._verify: bool | str = True
        self._cert: tuple[str, str] | None = None
        if settings.scheme == "https":
            self._verify = (settings.ca_file or True) if settings.verify else False
            if settings.cert_file and settings.key_file:
                self._cert = (settings.cert_file, settings.key_file)

    # ----------------------------------------------------------------- plumbing

    def _url(self, path: str) -> str:
        return self.address + path

    def _attempt(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: Mapping[str, Any] | None,
        data: bytes | None,
        wait: float | None,
        allow: tuple[int, ...],
        deadline_at: float,
        idempotent: bool,
    ) -> requests.Response:
        timeout = blocking_timeout(self.settings.timeout, wait)
        if wait is None:
            remaining = deadline_at - time.monotonic()
            timeout = max(min(timeout, remaining), MIN_ATTEMPT_TIMEOUT)
        connect_timeout = min(self.settings.timeout, timeout)
        try:
            resp = self._session.request(
                method,
                self._url(path),
                params=params,
                data=data,
                timeout=(connect_timeout, timeout),
                verify=self._verify,
                cert=self._cert,
            )
        except requests.exceptions.SSLError as exc:
            raise ConsulTLSError(
                f"TLS connection to Consul at {self.address} failed for {what}: {_reason(exc)}"
            ) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "failed"
            if not idempotent and not request_not_sent(exc):
                # The agent may have applied the write before the connection broke: a retry
                # could then report a lost CAS or a failed check for our own success.
                raise ConsulUnavailable(
                    f"Consul at {self.address} did not answer {what}: connection {kind}: "
                    f"{_reason(exc)}; the write may or may not have been applied"
                ) from exc
            error = ConsulUnavailable(
                f"cannot reach Consul at {self.address} for {what}: connection {kind}: "
                f"{_reason(exc)} (is the agent running?)"
            )
            raise _Transient(error) from exc
        except requests.exceptions.RequestException as exc:
            raise ConsulRequestError(
                f"request to Consul at {self.address} for {what} failed: {_reason(exc)}"
            ) from exc
        if resp.status_code < 400 or resp.status_code in allow:
            return resp
        body = resp.text
        mapped = classify_response(resp.status_code, body, what=what, address=self.address)
        if mapped is None:  # not reached: every status >= 400 maps to an error
            return resp
        if is_transient_status(resp.status_code, body):
            raise _Transient(mapped)
        raise mapped

    def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: Mapping[str, Any] | None = None,
        data: bytes | None = None,
        wait: float | None = None,
        allow: tuple[int, ...] = (),
        idempotent: bool = True,
    ) -> requests.Response:
        """One HTTP call with the retry policy; ``allow`` lists error statuses to return.

        Transient failures are retried until ``retry_deadline`` (counted from the first
        attempt, so a blocking query that fails after its wait is not retried). A
        non-``idempotent`` write is retried only when the request surely did not reach
        Consul (connection refused, connect timeout) or Consul answered 429/5xx.
        """
        started = time.monotonic()
        deadline_at = started + self.retry_deadline

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "consul_retry",
                what=what,
                attempt=state.attempt_number,
                error=str(exc),
                sleep=round(state.upcoming_sleep, 3),
            )

        retrying = Retrying(
            stop=stop_before_delay(self.retry_deadline),
            wait=wait_exponential(multiplier=0.05, max=MAX_RETRY_SLEEP) + wait_random(0, 0.1),
            retry=retry_if_exception_type(_Transient),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            return retrying(
                self._attempt,
                method,
                path,
                what=what,
                params=params,
                data=data,
                wait=wait,
                allow=allow,
                deadline_at=deadline_at,
                idempotent=idempotent,
            )
        except _Transient as exc:
            raise exc.error from exc.__cause__

    def _json(self, resp: requests.Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError as exc:
            raise ConsulRequestError(
                f"Consul at {self.address} answered {what} with invalid JSON: "
                f"{_consul_message(resp.text)}"
            ) from exc

    @staticmethod
    def _kv_path(key: str) -> str:
        return "/v1/kv/" + urllib.parse.quote(key.lstrip("/"), safe="/")

    @staticmethod
    def _header_index(resp: requests.Response) -> int:
        try:
            return int(resp.headers.get("X-Consul-Index", "0"))
        except ValueError:
            return 0

    # ----------------------------------------------------------------- agent

    def agent_node_name(self) -> str:
        """The node name of the agent this client talks to."""
        resp = self._request("GET", "/v1/agent/self", what="agent self")
        data = self._json(resp, "agent self")
        try:
            return str(data["Config"]["NodeName"])
        except (KeyError, TypeError) as exc:
            raise ConsulRequestError(
                f"Consul at {self.address}: /v1/agent/self has no Config.NodeName"
            ) from exc

    def leader(self) -> str:
        """The raft leader's address, "" when the cluster has none."""
        resp = self._request("GET", "/v1/status/leader", what="status leader")
        return str(self._json(resp, "status leader") or "")

    # ----------------------------------------------------------------- KV

    def kv_get(self, key: str) -> KVEntry | None:
        """The entry at ``key``, None when there is none."""
        resp = self._request("GET", self._kv_path(key), what=f"kv get {key}", allow=(404,))
        if resp.status_code == 404:
            return None
        return self._first_entry(resp, key)

    def kv_get_blocking(self, key: str, index: int, wait: float) -> tuple[int, KVEntry | None]:
        """Wait up to ``wait`` s for ``key`` to change past ``index``; (next index, entry).

        The returned index follows Consul's rules (see ``next_kv_index``): pass it to the
        next call. On timeout the same entry comes back with an unchanged index.
        """
        resp = self._request(
            "GET",
            self._kv_path(key),
            what=f"kv watch {key}",
            params={"index": index, "wait": _duration(wait)},
            wait=wait,
            allow=(404,),
        )
        new_index = next_kv_index(index, self._header_index(resp))
        if resp.status_code == 404:
            return new_index, None
        return new_index, self._first_entry(resp, key)

    def _first_entry(self, resp: requests.Response, key: str) -> KVEntry | None:
        data = self._json(resp, f"kv get {key}")
        if not data:
            return None
        return KVEntry.from_json(data[0])

    def kv_list(self, prefix: str) -> list[KVEntry]:
        """Every entry under ``prefix`` (recursive; end a directory prefix with "/")."""
        resp = self._request(
            "GET",
            self._kv_path(prefix),
            what=f"kv list {prefix}",
            params={"recurse": ""},
            allow=(404,),
        )
        if resp.status_code == 404:
            return []
        return [KVEntry.from_json(d) for d in self._json(resp, f"kv list {prefix}") or []]

    def kv_list_blocking(self, prefix: str, index: int, wait: float) -> tuple[int, list[KVEntry]]:
        """Blocking ``kv_list``: wait up to ``wait`` s for a change under ``prefix``."""
        resp = self._request(
            "GET",
            self._kv_path(prefix),
            what=f"kv watch {prefix}",
            params={"recurse": "", "index": index, "wait": _duration(wait)},
            wait=wait,
            allow=(404,),
        )
        new_index = next_kv_index(index, self._header_index(resp))
        if resp.status_code == 404:
            return new_index, []
        entries = [KVEntry.from_json(d) for d in self._json(resp, f"kv list {prefix}") or []]
        return new_index, entries

    def kv_keys(self, prefix: str, separator: str | None = "/") -> list[str]:
        """Key names under ``prefix``; with a separator, sub-trees collapse to "dir/"."""
        params: dict[str, str] = {"keys": ""}
        if separator:
            params["separator"] = separator
        resp = self._request(
            "GET", self._kv_path(prefix), what=f"kv keys {prefix}", params=params, allow=(404,)
        )
        if resp.status_code == 404:
            return []
        return [str(k) for k in self._json(resp, f"kv keys {prefix}") or []]

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
        params: dict[str, Any] = {}
        if cas is not None:
            params["cas"] = cas
        if acquire is not None:
            params["acquire"] = acquire
        if release is not None:
            params["release"] = release
        resp = self._request(
            "PUT",
            self._kv_path(key),
            what=f"kv put {key}",
            params=params,
            data=value,
            idempotent=cas is None and release is None,
        )
        return self._json(resp, f"kv put {key}") is True

    def kv_delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        """Delete ``key`` (or the tree under it); False when the CAS lost."""
        params: dict[str, Any] = {}
        if cas is not None:
            params["cas"] = cas
        if recurse:
            params["recurse"] = ""
        resp = self._request(
            "DELETE",
            self._kv_path(key),
            what=f"kv delete {key}",
            params=params,
            idempotent=cas is None,
        )
        return self._json(resp, f"kv delete {key}") is True

    # ----------------------------------------------------------------- txn

    def txn(self, ops: list[dict[str, Any]]) -> TxnResult:
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
        body = json.dumps(ops).encode()
        resp = self._request("PUT", "/v1/txn", what=what, data=body, allow=(409,), idempotent=False)
        data = self._json(resp, what) or {}
        if resp.status_code == 409:
            errors = [
                (int(e.get("OpIndex", -1)), str(e.get("What", "")))
                for e in data.get("Errors") or []
            ]
            denied = [
                w
                for _, w in errors
                if "permission denied" in w.lower() or "acl not found" in w.lower()
            ]
            if denied:
                raise ConsulPermissionDenied(
                    f"Consul at {self.address} refused {what}: the ACL token lacks permission "
                    f"or is unknown ({_consul_message(denied[0])})"
                )
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
        resp = self._request("PUT", "/v1/session/create", what=what, data=json.dumps(body).encode())
        data = self._json(resp, what)
        try:
            return str(data["ID"])
        except (KeyError, TypeError) as exc:
            raise ConsulRequestError(
                f"Consul at {self.address} answered {what} without an ID"
            ) from exc

    def session_renew(self, session_id: str) -> bool:
        """Renew the session's TTL; False when Consul no longer knows it (404)."""
        resp = self._request(
            "PUT",
            f"/v1/session/renew/{session_id}",
            what=f"session renew {session_id}",
            allow=(404,),
        )
        if resp.status_code == 404:
            return False
        data = self._json(resp, f"session renew {session_id}")
        return bool(data)

    def session_destroy(self, session_id: str) -> None:
        """Destroy the session (its locks follow its behavior); unknown ids are fine."""
        self._request(
            "PUT", f"/v1/session/destroy/{session_id}", what=f"session destroy {session_id}"
        )

    def session_info(self, session_id: str) -> dict[str, Any] | None:
        """Consul's record of the session, None when it does not exist (any more)."""
        resp = self._request(
            "GET", f"/v1/session/info/{session_id}", what=f"session info {session_id}", allow=(404,)
        )
        if resp.status_code == 404:
            return None
        data = self._json(resp, f"session info {session_id}")
        if not data:
            return None
        return dict(data[0])

    # ----------------------------------------------------------------- events

    def event_fire(self, name: str, payload: bytes) -> str:
        """Fire a user event through the local agent; returns the event's ID.

        Consul 1.22 limits the payload to 300 bytes (HTTP 413 above that): a larger one
        raises ``ConsulRequestError``. Events carry ids, never records.
        """
        what = f"event fire {name}"
        resp = self._request(
            "PUT",
            f"/v1/event/fire/{urllib.parse.quote(name, safe='')}",
            what=what,
            data=payload,
            allow=(413,),
        )
        if resp.status_code == 413:
            raise ConsulRequestError(
                f"Consul at {self.address} refused {what}: the payload of {len(payload)} "
                f"bytes is over Consul's user event size limit "
                f"({_consul_message(resp.text)}); events carry ids, not records"
            )
        data = self._json(resp, what)
        try:
            return str(data["ID"])
        except (KeyError, TypeError) as exc:
            raise ConsulRequestError(
                f"Consul at {self.address} answered {what} without an ID"
            ) from exc

    def event_list(
        self, name: str | None = None, *, index: str | None = None, wait: float | None = None
    ) -> tuple[str, list[ConsulEvent]]:
        """The agent's buffered user events (up to 256, oldest first); (index, events).

        The index is Consul's X-Consul-Index for this endpoint, derived from the newest
        event's ID: it is NOT monotonic. Callers compare it with the previous value for
        change only (never for order), and pass it back as ``index`` to block up to ``wait``
        seconds until the event list changes.
        """
        params: dict[str, str] = {}
        if name:
            params["name"] = name
        if index is not None:
            params["index"] = index
            if wait is None:
                wait = DEFAULT_BLOCKING_WAIT
        if wait is not None:
            params["wait"] = _duration(wait)
        what = f"event list {name}" if name else "event list"
        resp = self._request(
            "GET",
            "/v1/event/list",
            what=what,
            params=params,
            wait=wait if index is not None else None,
        )
        new_index = resp.headers.get("X-Consul-Index", "")
        events = [ConsulEvent.from_json(d) for d in self._json(resp, what) or []]
        return new_index, events

    # ----------------------------------------------------------------- ACL

    def acl_token_self(self) -> dict[str, Any]:
        """The ACL token this client uses, as Consul describes it (AccessorID, Description,
        Policies ...). Raises ``ConsulPermissionDenied`` for an unknown token and
        ``ConsulRequestError`` when ACLs are disabled."""
        resp = self._request("GET", "/v1/acl/token/self", what="acl token self")
        return dict(self._json(resp, "acl token self"))

    def close(self) -> None:
        """Release the connection pool."""
        self._session.close()

    def __enter__(self) -> ConsulClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
