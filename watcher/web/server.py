"""`watcher web`: parse --listen, say what writes are allowed, serve the app with uvicorn."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from watcher.config import Config
from watcher.daemon_cli import EXIT_CONFIG
from watcher.log import get_logger
from watcher.web.app import create_app, is_loopback

log = get_logger(module="web")


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


def run_web(config: Config, listen: str) -> int:
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
        return _serve(config, listen, host, sockets)
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


def _serve(config: Config, listen: str, host: str, sockets: list[socket.socket]) -> int:
    app = create_app(config, listen_host=host)
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
    print(f"watcher web: serving http://{listen}/", file=sys.stderr, flush=True)
    server = _Server(
        uvicorn.Config(
            app,
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
