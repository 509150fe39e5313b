"""The HTTP transport under py-consul: a small HTTP/1.1 client and a pool of keep-alive
connections to the local Consul agent.

py-consul's endpoint classes only build a path and parse a ``consul.base.Response``; how
the bytes travel is its ``HTTPClient``'s business, and its stock one is ``requests``.
For a daemon whose every step is a few small requests to one local agent, the client is
the most expensive part of a request. Measured on the project's 2-core machines: one KV
read cost 0.72 ms of CPU through py-consul + requests against 0.14 ms through
``http.client`` back to back (36 ms against 12 ms after a few seconds of sleep, a daemon's
ordinary rhythm, on a slower day); and later 187 us through ``http.client`` against 45 us
through this module's own exchange back to back, 645 us against 235 us after 0.3 s of
sleep (``http.client`` parses every answer's header with the ``email`` package). This
module keeps only what the agent needs: HTTP/1.1 with keep-alive, bodies by
``Content-Length``, chunked or up to the close, TLS with the configured CA and client
certificate, a connect and a read timeout per attempt, and failures that say whether the
request could have reached the agent (``TransportError.sent``), which the retry policy of
``consul_api`` relies on.

What it deliberately does not do: read proxy or CA-bundle variables of the environment
(the configuration decides; ``verify: true`` means the system's trust store), follow
redirects, decompress (it asks for ``identity``), pipeline, or retry anything except a
GET that failed on a reused connection before any answer arrived (the agent closed an
idle connection; the request never reached it).
"""

from __future__ import annotations

import re
import select
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

__all__ = ["Answer", "Headers", "Transport", "TransportError", "TransportTLSError"]

#: Idle connections kept per transport; more may be open at once (each concurrent
#: blocking query holds one), the surplus is closed when it comes back.
POOL_SIZE = 8
#: An answer's status line and header fields, at most (Consul's are a few hundred bytes).
MAX_HEAD = 64 * 1024
MAX_HEADER_FIELDS = 100
#: Bytes asked of the socket per read.
READ_SIZE = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a method or a field name (RFC 9110)
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")
_NOT_IN_VALUE = re.compile(r"[\x00\r\n]")


class TransportError(Exception):
    """A request that got no HTTP answer.

    ``sent`` is False only when the request surely never reached the agent (the
    connection could not be made); ``timeout`` when the cause was a timeout.
    """

    def __init__(self, message: str, *, sent: bool, timeout: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.timeout = timeout


class TransportTLSError(TransportError):
    """The TLS handshake failed (certificate, CA, protocol): retrying will not help."""


class Headers(dict[str, str]):
    """An answer's header fields by lower-cased name; lookups ignore case. A field sent
    more than once holds its values joined by ", " (RFC 9110, 5.3)."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers (case-insensitive), the whole body."""

    status: int
    headers: Headers
    body: bytes


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _tls_error(exc: BaseException, kind: str = "SSLError") -> bool:
    """Whether ``exc`` is ``ssl``'s ``kind`` of error. The module is imported only where TLS
    is used (``Transport._tls_context``): a plain-HTTP process never loads it, ~7-12 ms of
    every watcherctl start on the project's machines; where it is not loaded no TLS error
    can be."""
    module = sys.modules.get("ssl")
    return module is not None and isinstance(exc, getattr(module, kind))


class _Connection:
    """One keep-alive connection: its socket, and the bytes read but not yet parsed."""

    __slots__ = ("_buf", "_closed", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._closed = False  # the peer closed its side

    def close(self) -> None:
        self.sock.close()

    def dropped(self) -> bool:
        """Whether it can no longer carry a request: closed, or readable while no request
        is outstanding (the agent closed it, or sent something unasked)."""
        if self._buf or self._closed or self.sock.fileno() < 0:
            return True
        pending = getattr(self.sock, "pending", None)  # TLS: bytes decrypted, not yet read
        if pending is not None and pending():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    # ----------------------------------------------------------------- reading

    def _fill(self) -> bool:
        """Read more from the socket; False once the peer has closed."""
        if self._closed:
            return False
        try:
            data = self.sock.recv(READ_SIZE)
        except OSError as exc:
            if not _tls_error(exc, "SSLZeroReturnError"):
                raise
            data = b""  # the peer closed the TLS session
        if not data:
            self._closed = True
            return False
        self._buf += data
        return True

    def _line(self, what: str) -> bytes:
        """One line of the answer (a chunk size or a trailer field), without its end."""
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_HEAD:
                raise _BadAnswer(f"{what} longer than {MAX_HEAD} bytes")
            if not self._fill():
                raise _BadAnswer(f"the connection closed in the middle of {what}")
        line = bytes(self._buf[:end]).rstrip(b"\r")
        del self._buf[: end + 1]
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buf) < size:
            if not self._fill():
                raise _BadAnswer(
                    f"the connection closed after {len(self._buf)} of {size} bytes of the body"
                )
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def _head(self) -> tuple[bytes, int, Headers]:
        """The status line and header fields of the next final (not 1xx) answer."""
        first = True
        while True:
            while True:
                crlf, lf = self._buf.find(b"\r\n\r\n"), self._buf.find(b"\n\n")
                ends = [(i, n) for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
                if ends:
                    end, skip = min(ends)
                    break
                if len(self._buf) > MAX_HEAD:
                    raise _BadAnswer(f"the answer's header is longer than {MAX_HEAD} bytes")
                if not self._fill():
                    if first and not self._buf:
                        raise _Stale()
                    raise _BadAnswer("the connection closed in the middle of the answer's header")
            first = False
            lines = bytes(self._buf[:end]).split(b"\n")
            del self._buf[: end + skip]
            version, status = _status_line(lines[0].rstrip(b"\r"))
            headers = _fields(lines[1:])
            if not 100 <= status < 200:
                return version, status, headers

    def exchange(self, request: bytes, method: str, read_timeout: float) -> tuple[Answer, bool]:
        """Send ``request`` and read its whole answer; (answer, whether to keep the
        connection)."""
        self.sock.settimeout(read_timeout)
        try:
            self.sock.sendall(request)
            version, status, headers = self._head()
            body, to_close = self._body(method, status, headers)
        except _BadAnswer as exc:
            raise TransportError(f"bad answer from Consul: {exc}", sent=True) from None
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep = not to_close and "close" not in tokens
        if version == b"HTTP/1.0":
            keep = keep and "keep-alive" in tokens
        # Bytes past the answer: something this client cannot pair with a request.
        return Answer(status, headers, body), keep and not self._buf

    def _body(self, method: str, status: int, headers: Headers) -> tuple[bytes, bool]:
        """The body, and whether it ran to the connection's close."""
        if method == "HEAD" or status in (204, 304):
            return b"", False
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if coding.split(",")[-1].strip().lower() != "chunked":
                raise _BadAnswer(f"unsupported Transfer-Encoding {coding!r}")
            return self._chunked(), False
        length = headers.get("content-length")
        if length is not None:
            values = {v.strip() for v in length.split(",")}
            size = values.pop() if len(values) == 1 else ""
            if not size.isdigit():
                raise _BadAnswer(f"invalid Content-Length {length!r}")
            return self._exactly(int(size)), False
        while self._fill():
            pass
        body = bytes(self._buf)
        self._buf.clear()
        return body, True

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self._line("a chunk's size")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadAnswer(f"invalid chunk size {size_text[:40]!r}") from None
            if size < 0:
                raise _BadAnswer(f"invalid chunk size {size_text[:40]!r}")
            if size == 0:
                while self._line("the trailer"):
                    pass
                return b"".join(parts)
            parts.append(self._exactly(size))
            if self._line("a chunk's end"):
                raise _BadAnswer("a chunk longer than its size")


def _status_line(line: bytes) -> tuple[bytes, int]:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise _BadAnswer(f"not an HTTP/1.x status line: {line[:80]!r}")
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        raise _BadAnswer(f"invalid status code in {line[:80]!r}")
    return parts[0], int(code)


def _fields(lines: list[bytes]) -> Headers:
    if len(lines) > MAX_HEADER_FIELDS:
        raise _BadAnswer(f"more than {MAX_HEADER_FIELDS} header fields")
    headers = Headers()
    last = ""
    for raw in lines:
        line = raw.rstrip(b"\r")
        if line[:1] in (b" ", b"\t") and last:  # an obsolete folded continuation
            headers[last] = f"{dict.__getitem__(headers, last)} {line.strip().decode('latin-1')}"
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise _BadAnswer(f"invalid header field {line[:80]!r}")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        if dict.__contains__(headers, key):
            text = f"{dict.__getitem__(headers, key)}, {text}"
        dict.__setitem__(headers, key, text)
        last = key
    return headers


def _request_bytes(
    method: str, target: str, host: str, body: bytes | None, headers: dict[str, str]
) -> bytes:
    """The request's head (and body): names, values and the target with no control
    characters, so nothing a caller passes can end the head early or start another."""
    if not _TOKEN.fullmatch(method) or _NOT_IN_TARGET.search(target):
        raise ValueError(f"invalid request line: {method} {target!r}")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _NOT_IN_VALUE.search(value):
            raise ValueError(f"invalid header field {name!r}")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    elif method in ("PUT", "POST", "PATCH"):
        lines.append("Content-Length: 0")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


class Transport:
    """HTTP requests to one agent (``host``:``port``), safe to share between threads."""

    def __init__(
        self,
        host: str,
        port: int,
        scheme: str = "http",
        *,
        verify: bool | str = True,
        cert: tuple[str, str] | None = None,
        on_send: Callable[[str, str], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.scheme = scheme
        self._context = self._tls_context(verify, cert) if scheme == "https" else None
        self._on_send = on_send
        bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self._host_header = (
            bracketed if port == (443 if scheme == "https" else 80) else (f"{bracketed}:{port}")
        )
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def _tls_context(verify: bool | str, cert: tuple[str, str] | None) -> ssl.SSLContext:
        import ssl

        if isinstance(verify, str):
            context = ssl.create_default_context(cafile=verify)
        else:
            context = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        if cert is not None:
            context.load_cert_chain(cert[0], cert[1])
        return context

    # ----------------------------------------------------------------- pool

    def _checkout(self) -> _Connection | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if not conn.dropped():
                return conn
            conn.close()

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < POOL_SIZE:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, connect_timeout: float) -> _Connection:
        host = self.host.strip("[]")
        try:
            sock = socket.create_connection((host, self.port), timeout=connect_timeout)
        except TimeoutError as exc:
            raise TransportError("connect timed out", sent=False, timeout=True) from exc
        except OSError as exc:
            raise TransportError(_describe(exc), sent=False) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_hostname=host)
        except OSError as exc:
            sock.close()
            if _tls_error(exc):  # a certificate check among them
                raise TransportTLSError(
                    f"TLS handshake failed: {_describe(exc)}", sent=False
                ) from exc
            if isinstance(exc, TimeoutError):
                raise TransportError("connect timed out", sent=False, timeout=True) from exc
            raise TransportError(_describe(exc), sent=False) from exc
        return _Connection(sock)

    # ----------------------------------------------------------------- requests

    def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        connect_timeout: float,
        read_timeout: float,
    ) -> Answer:
        """Send one request (``target``: path and query) and read the whole answer."""
        message = _request_bytes(method, target, self._host_header, body, headers or {})
        conn = self._checkout()
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(connect_timeout)
            try:
                answer, keep = self._exchange(conn, method, message, target, read_timeout)
            except _Stale:
                conn.close()
                conn = None
                if reused and method == "GET":
                    reused = False  # once: the agent closed an idle connection
                    continue
                raise TransportError(
                    "the connection closed before Consul answered", sent=True
                ) from None
            except BaseException:
                conn.close()
                raise
            if keep:
                self._checkin(conn)
            else:
                conn.close()
            return answer

    def _exchange(
        self, conn: _Connection, method: str, message: bytes, target: str, read_timeout: float
    ) -> tuple[Answer, bool]:
        if self._on_send is not None:
            self._on_send(method, target)
        try:
            return conn.exchange(message, method, read_timeout)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _Stale() from exc
        except TimeoutError as exc:
            raise TransportError(
                "timed out waiting for the answer", sent=True, timeout=True
            ) from exc
        except OSError as exc:
            what = f"TLS error: {_describe(exc)}" if _tls_error(exc) else _describe(exc)
            raise TransportError(what, sent=True) from exc

    def close(self) -> None:
        """Close the idle connections; those in use close when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Stale(Exception):
    """The connection broke before any answer: closed by the agent, or reset."""


class _BadAnswer(Exception):
    """An answer this client cannot read (a broken header, a short body)."""
