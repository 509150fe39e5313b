"""A fault-injecting HTTP proxy in front of the S3 test server: 500s, SlowDown, resets, flips."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

# Faults a test can queue; each applies to the next matching requests.
STATUS, SLOWDOWN, RESET, CORRUPT, STALL = "status", "slowdown", "reset", "corrupt", "stall"
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


@dataclass
class Fault:
    """``kind`` applied to the next ``times`` requests whose method is in ``methods``.

    ``times=None`` applies it forever.
    """

    kind: str
    times: int | None = 1
    methods: frozenset[str] = frozenset({"GET"})
    status: int = 500


@dataclass(frozen=True)
class SeenRequest:
    """One request the proxy received, and the fault it applied (``""`` for none)."""

    method: str
    path: str
    headers: dict[str, str]
    fault: str = ""


@dataclass
class _State:
    upstream: tuple[str, int]
    faults: list[Fault] = field(default_factory=list)
    seen: list[SeenRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    resume: threading.Event = field(default_factory=threading.Event)  # ends a stall

    def take_fault(self, method: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if method in fault.methods and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def record(self, request: SeenRequest) -> None:
        with self.lock:
            self.seen.append(request)


def _error_xml(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>faulty-s3</RequestId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test asserts on ``proxy.requests`` instead."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        state = self.server.state
        body = self._read_body()
        fault = state.take_fault(self.command)
        state.record(
            SeenRequest(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                fault.kind if fault else "",
            )
        )
        if fault is not None and fault.kind in (STATUS, SLOWDOWN):
            status = 503 if fault.kind == SLOWDOWN else fault.status
            code = "SlowDown" if fault.kind == SLOWDOWN else "InternalError"
            payload = _error_xml(code, "injected by the faulty S3 proxy")
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return

        conn = http.client.HTTPConnection(*state.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            resp_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            status = resp.status
        finally:
            conn.close()

        if fault is not None and fault.kind == CORRUPT and payload:
            mid = len(payload) // 2
            payload = payload[:mid] + bytes([payload[mid] ^ 0xFF]) + payload[mid + 1 :]

        self.send_response(status)
        for key, value in resp_headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.kind == STALL and payload:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            state.resume.wait(60)
            self.wfile.write(payload[len(payload) // 2 :])
            return
        if fault is not None and fault.kind == RESET and payload:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Client disconnects are expected here (resets are the point); stay quiet."""


class FaultyS3Proxy:
    """A threaded proxy on ``host`` (free port) forwarding to ``upstream_url``.

    Queue faults with ``fail``/``slowdown``/``reset_mid_body``/``stall_mid_body``/``corrupt``;
    each applies to the next matching requests (GET by default) in the order queued.
    ``requests`` lists what was received.
    """

    def __init__(self, upstream_url: str, *, host: str = "127.0.0.1") -> None:
        parts = urlsplit(upstream_url)
        self._state = _State(upstream=(parts.hostname or "127.0.0.1", parts.port or 80))
        self._server = _Server((host, 0), self._state)
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FaultyS3Proxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="faulty-s3",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._state.resume.set()  # a stalled answer must not hold its thread
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultyS3Proxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- faults ------------------------------------------------------------------------

    def _add(self, fault: Fault) -> None:
        with self._state.lock:
            self._state.faults.append(fault)

    def fail(
        self, status: int = 500, *, times: int | None = 1, methods: tuple[str, ...] = ("GET",)
    ) -> None:
        """Answer ``status`` with an S3 ``InternalError`` body, without asking upstream."""
        self._add(Fault(STATUS, times, frozenset(methods), status))

    def slowdown(self, *, times: int | None = 1, methods: tuple[str, ...] = ("GET",)) -> None:
        """Answer 503 ``SlowDown`` (S3's throttling)."""
        self._add(Fault(SLOWDOWN, times, frozenset(methods), 503))

    def reset_mid_body(self, *, times: int | None = 1) -> None:
        """Send the headers (full Content-Length) and half the body, then close."""
        self._add(Fault(RESET, times))

    def stall_mid_body(self, *, times: int | None = 1) -> None:
        """Send the headers and half the body, then the rest once ``resume()`` is called."""
        self._state.resume.clear()
        self._add(Fault(STALL, times))

    def resume(self) -> None:
        self._state.resume.set()

    def corrupt(self, *, times: int | None = 1) -> None:
        """Flip one byte in the middle of the body."""
        self._add(Fault(CORRUPT, times))

    def clear(self) -> None:
        with self._state.lock:
            self._state.faults.clear()
            self._state.seen.clear()

    @property
    def requests(self) -> list[SeenRequest]:
        with self._state.lock:
            return list(self._state.seen)
