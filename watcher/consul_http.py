"""The HTTP transport under py-consul: ``http.client`` and a small pool of keep-alive
connections to the local Consul agent.

py-consul's endpoint classes only build a path and parse a ``consul.base.Response``; how
the bytes travel is its ``HTTPClient``'s business, and its stock one is ``requests``.
For a daemon whose every step is a few small requests to one local agent, ``requests``
is the most expensive part of a request: measured on the project's 2-core machines, one
KV read cost 0.72 ms of CPU through py-consul + requests against 0.14 ms through
``http.client`` back to back, and after a few seconds of sleep (a daemon's ordinary
rhythm) 36 ms against 12 ms. This module keeps only what the agent needs: HTTP/1.1 with
keep-alive, TLS with the configured CA and client certificate, a connect and a read
timeout per attempt, and failures that say whether the request could have reached the
agent (``TransportError.sent``), which the retry policy of ``consul_api`` relies on.

What it deliberately does not do: read proxy or CA-bundle variables of the environment
(the configuration decides; ``verify: true`` means the system's trust store), follow
redirects, decompress (it asks for ``identity``), or retry anything except a GET that
failed on a reused connection before any answer arrived (the agent closed an idle
connection; the request never reached it).
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Answer", "Transport", "TransportError", "TransportTLSError"]

#: Idle connections kept per transport; more may be open at once (each concurrent
#: blocking query holds one), the surplus is closed when it comes back.
POOL_SIZE = 8


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


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers (case-insensitive), the whole body."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether a pooled connection can no longer carry a request: closed, or readable while
    no request is outstanding (the agent closed it, or sent something unasked)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


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
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def _tls_context(verify: bool | str, cert: tuple[str, str] | None) -> ssl.SSLContext:
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

    def _checkout(self) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if not _dropped(conn):
                return conn
            conn.close()

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < POOL_SIZE:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, connect_timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._context is not None:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=connect_timeout, context=self._context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=connect_timeout)
        try:
            conn.connect()
        except (ssl.SSLError, ssl.CertificateError) as exc:
            conn.close()
            raise TransportTLSError(f"TLS handshake failed: {_describe(exc)}", sent=False) from exc
        except TimeoutError as exc:
            conn.close()
            raise TransportError("connect timed out", sent=False, timeout=True) from exc
        except OSError as exc:
            conn.close()
            raise TransportError(_describe(exc), sent=False) from exc
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

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
        conn = self._checkout()
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(connect_timeout)
            try:
                answer, keep = self._exchange(conn, method, target, body, headers, read_timeout)
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
        self,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        body: bytes | None,
        headers: dict[str, str] | None,
        read_timeout: float,
    ) -> tuple[Answer, bool]:
        if conn.sock is not None:
            conn.sock.settimeout(read_timeout)
        if self._on_send is not None:
            self._on_send(method, target)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            raise _Stale() from exc
        except TimeoutError as exc:
            raise TransportError(
                "timed out waiting for the answer", sent=True, timeout=True
            ) from exc
        except ssl.SSLError as exc:
            raise TransportError(f"TLS error: {_describe(exc)}", sent=True) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(_describe(exc), sent=True) from exc
        return Answer(response.status, response.headers, data), not response.will_close

    def close(self) -> None:
        """Close the idle connections; those in use close when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Stale(Exception):
    """The connection broke before any answer: closed by the agent, or reset."""
