"""`watcher web`: parse --listen, say what writes are allowed, serve the app with uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from watcher.config import Config
from watcher.log import get_logger
from watcher.web.app import create_app, is_loopback

log = get_logger(module="web")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen must be HOST:PORT (e.g. 127.0.0.1:8710), got {value!r}")
    return host.strip("[]"), int(port)


def run_web(config: Config, listen: str) -> int:
    host, port = parse_listen(listen)
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
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=3,
    )
    return 0
