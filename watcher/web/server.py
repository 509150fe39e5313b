"""`watcher web`: parse --listen, say what writes are allowed, serve the app with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import typing
from collections.abc import Callable
from types import FrameType

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from watcher.config import Config
from watcher.daemon_cli import EXIT_CONFIG
from watcher.log import get_logger
from watcher.web.app import SECURITY_HEADERS, create_app, is_loopback

log = get_logger(module="web")

#: Seconds a client has to send a whole request (head and body), from its connection or
#: the end of the answer before; then the connection is closed. An answer that takes
#: longer (a live stream) is not cut: only a request not yet received is.
REQUEST_DEADLINE = 10.0
#: Connections open at once; one more is answered 503 and closed at once. Below the fd
#: limit (1024 without the unit's LimitNOFILE), so that accept() never fails: at the
#: limit asyncio logged a traceback per retry, 150 MB in 30 s (the DoS review).
MAX_CONNECTIONS = 512
_BUSY_BODY = b"too many connections to this server: retry in a few seconds\n"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 5\r\nConnection: close\r\n"
    + f"Content-Length: {len(_BUSY_BODY)}\r\n\r\n".encode()
    + _BUSY_BODY
)
#: Seconds a connection answered before it sent all it meant to (a 413 before the end of
#: its body, a 503 over the cap) is still read, the bytes thrown away, before it is
#: closed: closed with bytes unread, the kernel sends a reset, and a client that sends its
#: whole request before it reads never saw the answer (the commit review: a 10 MB body
#: got 0 of 10 413s). Bounded, where an endless body would be read for ever.
LINGER = 2.0
#: Refused connections kept open for LINGER at once, past MAX_CONNECTIONS; more are closed
#: at once (the file descriptors stay under 1024 with Consul's few).
LINGERING_MAX = 128
_CAPPED_LOG_EVERY = 60.0  # seconds between two log lines about refused connections


class _Refusals:
    """Connections refused over the cap, logged at the first and then once a minute with
    how many came in it (never a line per connection: that is what filled the disk)."""

    def __init__(self) -> None:
        self.unlogged = 0
        self.timer: asyncio.TimerHandle | None = None

    def count(self, loop: asyncio.AbstractEventLoop) -> None:
        self.unlogged += 1
        if self.timer is None:
            self._flush(loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.unlogged:
            self.timer = None  # a quiet minute: the next refusal is logged at once
            return
        log.warning(
            "web_connections_capped", refused=self.unlogged, max_connections=MAX_CONNECTIONS
        )
        self.unlogged = 0
        self.timer = loop.call_later(_CAPPED_LOG_EVERY, self._flush, loop)


class _StrictH11(h11.Connection):
    """h11 with one more refusal: a request that gives both Content-Length and
    Transfer-Encoding. h11 reads its body by the Transfer-Encoding and keeps the connection
    open, where RFC 9112 6.1 says a server MUST close it after answering such a request: a
    proxy in front that reads the body by its Content-Length sees other requests on the
    same connection than this server does (request smuggling). Refused with a 400 and
    closed, as the RFC allows; no client of this API sends both."""

    refusal = ""

    def next_event(self) -> typing.Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}  # h11 gives them lowercased
            if b"content-length" in names and b"transfer-encoding" in names:
                self.refusal = "both Content-Length and Transfer-Encoding given"
                raise h11.RemoteProtocolError(self.refusal)
        return event


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with what it lacks for a port others can reach: a
    deadline for each request to arrive whole (uvicorn times out only an idle kept-alive
    connection: one that sends a byte, or never ends its headers or its body, is held for
    ever) and a cap on open connections. The daemon's health endpoint has both too. And h11
    made a little stricter (`_StrictH11`)."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size  # None: h11's default, as uvicorn
        self.conn = _StrictH11(
            h11.SERVER, **({} if size is None else {"max_incomplete_event_size": size})
        )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._busy = False
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            self._refuse_busy()
            return
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._busy:
            return  # answered 503 already: read and thrown away until the close
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request on this kept-alive connection; or the rest of a body answered
        # before it ended (a 413), read and thrown away for a while.
        self._arm_deadline(LINGER if self.conn.their_state is h11.SEND_BODY else None)

    def send_400_response(self, msg: str) -> None:
        """A request h11 itself refuses (a Host given twice, a Content-Length that is not
        a number, a byte a request line may not hold): uvicorn answers it in plain text
        without the app's headers; here as JSON, like every other error of the API."""
        if isinstance(self.conn, _StrictH11) and self.conn.refusal:
            msg = self.conn.refusal  # uvicorn's msg is always "Invalid HTTP request received."
        body = json.dumps(
            {"error": "malformed HTTP request (refused by the HTTP parser: " + msg + ")"}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *((name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _refuse_busy(self) -> None:
        self._busy = True
        self.transport.write(_BUSY)
        if len(self.connections) > MAX_CONNECTIONS + LINGERING_MAX or not (
            self.transport.can_write_eof()
        ):
            self.transport.close()  # a flood: its file descriptors matter more than its 503s
        else:
            self.transport.write_eof()  # the answer ends here; the request is still read
            self._deadline = self.loop.call_later(LINGER, self.transport.close)
        refusals = getattr(self.server_state, "refusals", None)
        if refusals is None:
            refusals = self.server_state.refusals = _Refusals()  # type: ignore[attr-defined]
        refusals.count(self.loop)

    def _arm_deadline(self, seconds: float | None = None) -> None:
        self._disarm_deadline()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(
                REQUEST_DEADLINE if seconds is None else seconds, self._request_too_slow
            )

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return  # received whole (DONE, or MUST_CLOSE after it): its answer takes its time
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen must be HOST:PORT (e.g. 127.0.0.1:8710), got {value!r}")
    return host.strip("[]"), int(port)


def bind_listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address HOST resolves to, bound as uvicorn would bind them
    (asyncio's create_server: SO_REUSEADDR, IPv6 only on an IPv6 socket); OSError when one
    cannot be bound (in use, not an address of this host, a name that does not resolve)."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)  # uvicorn's default backlog
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def cannot_listen(listen: str, exc: OSError) -> str:
    """``cannot listen on 127.0.0.1:8710: address already in use (choose another ...)``."""
    why = exc.strerror or str(exc)
    return f"cannot listen on {listen}: {why[:1].lower()}{why[1:]} (choose another with --listen)"


def run_web(config: Config, listen: str, *, root_path: str = "") -> int:
    """Serve until stopped; EXIT_CONFIG, having said why, when ``listen`` cannot be bound.

    The socket is bound here, before anything is announced, and handed to uvicorn: bound by
    uvicorn, a port in use would be reported after "serving" in uvicorn's own words, with
    its exit 3 (which watcherctl's exit codes give to an unreachable Consul)."""
    host, port = parse_listen(listen)
    try:
        sockets = bind_listen(host, port)
    except OSError as exc:
        print(f"watcher web: error: {cannot_listen(listen, exc)}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        return _serve(config, listen, host, sockets, root_path)
    finally:
        for sock in sockets:
            sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server, which also ends the live streams when told to stop (SIGTERM,
    Ctrl-C): it waits for open connections before it stops, and a stream never ends by
    itself."""

    def __init__(self, config: uvicorn.Config, *, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def _serve(
    config: Config, listen: str, host: str, sockets: list[socket.socket], root_path: str
) -> int:
    app = create_app(config, listen_host=host, root_path=root_path)
    state = app.state.web
    acls = state.probe_acls()
    loopback = is_loopback(host)
    if acls is False:
        note = (
            "writes are accepted without a token because this server is bound to loopback"
            if loopback
            else "writes are refused because this server is not bound to loopback"
        )
        log.warning("web_acls_off", writes="loopback only" if loopback else "refused")
        print(f"watcher web: Consul has ACLs disabled: {note}", file=sys.stderr, flush=True)
    elif acls is None:
        print(
            f"watcher web: Consul at {state.settings.base_url} is unreachable for now; "
            "the page says so until it answers",
            file=sys.stderr,
            flush=True,
        )
    if not loopback:
        print(
            "watcher web: not bound to loopback: reads need a Consul token with read on the app",
            file=sys.stderr,
            flush=True,
        )
    log.info("web_listening", url=f"http://{listen}/", acls=acls, loopback=loopback)
    under = f" (its links under {root_path}/, as the proxy serves it)" if root_path else ""
    print(f"watcher web: serving http://{listen}/{under}", file=sys.stderr, flush=True)
    server = _Server(
        uvicorn.Config(
            app,
            http=_GuardedH11,
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            timeout_graceful_shutdown=3,
        ),
        on_exit=state.close_streams,
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops it, as uvicorn.run() took it
        server.run(sockets=sockets)
    return 0
