"""Chat notifications of deploys: a JSON POST with a ``text`` field, sent off the caller's thread.

The coordinator calls ``DeployNotifier.step`` after each evaluation; it never waits for the
receiver. Each message is posted by one background thread with the configured timeout and
retries; failures are logged and counted, never raised.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from watcher import ids
from watcher.config import AppConfig, WebhookSettings
from watcher.log import get_logger
from watcher.records import FAILING_STATES, cut_text

log = get_logger(module="webhook")

QUEUE_MAX = 100  # messages waiting for a slow receiver; past that new ones are dropped (counted)
RETRY_BASE = 0.5  # seconds before the first retry, doubled each time
SENT_KEEP = 256  # (deploy, event) pairs remembered so that each event is sent once
DRAIN_AT_STOP = 5.0  # seconds a stopping daemon gives its queued messages, all apps together
TEXT_HOSTS = 10  # failing hosts named in the chat text; the rest are counted ("and 3 more")
TEXT_ERROR = 300  # characters of one host's error (or the reason) in the chat text
FIELD_TEXT = 2000  # characters of one host's error (or the reason) in the JSON fields


_CLOSE: dict[str, Any] = {}  # the queue's last item when a sender is closed


class WebhookSender:
    """A bounded queue and one daemon thread that POSTs each message."""

    def __init__(self, settings: WebhookSettings, *, app: str, metrics: Any = None) -> None:
        self.settings = settings
        self.app = app
        self.metrics = metrics
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(QUEUE_MAX)
        self._closed = False
        self._pending = 0  # queued or being posted; read by drain()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"webhook-{app}", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message``; returns at once whatever the receiver does."""
        if self._closed:
            self._count("webhook_failures", "reloaded")
            log.error("webhook_dropped", app=self.app, notice=message.get("event"), why="reloaded")
            return
        try:
            with self._lock:
                self._queue.put_nowait(message)
                self._pending += 1
        except queue.Full:
            self._count("webhook_failures", "queue_full")
            log.error(
                "webhook_dropped", app=self.app, notice=message.get("event"), why="queue full"
            )

    def _count(self, name: str, reason: str = "") -> None:
        counter = getattr(self.metrics, name, None)
        if counter is None:
            return
        if reason:
            counter.labels(app=self.app, reason=reason).inc()
        else:
            counter.labels(app=self.app).inc()

    def close(self) -> None:
        """End the thread once the messages already queued are sent (a reload that changed
        the settings made a new sender; this one must not idle on for good). Never blocks:
        with the queue full, the thread ends when it has drained it."""
        self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_CLOSE)

    def _run(self) -> None:
        while True:
            if self._closed and self._queue.empty():
                return
            message = self._queue.get()
            if message is _CLOSE:
                return
            try:
                self._post(message)
            except Exception as exc:  # never let one message (or a broken log) end the thread
                with contextlib.suppress(Exception):
                    log.error("webhook_failed", app=self.app, error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._pending -= 1

    @property
    def done(self) -> bool:
        """The thread has ended: closed, and nothing left to post."""
        return not self._thread.is_alive()

    def drain(self, timeout: float) -> int:
        """Close, then wait up to ``timeout`` seconds for the queued messages to be posted
        (a daemon that stops right after a deploy still says how it ended). Returns how
        many were left unsent: the process exits without them."""
        self.close()
        self._thread.join(max(0.0, timeout))
        with self._lock:
            return self._pending if self._thread.is_alive() else 0

    def _post(self, message: dict[str, Any]) -> bool:
        body = json.dumps(message, separators=(",", ":")).encode()
        error = ""
        timeout = self.settings.timeout
        for attempt in range(self.settings.retries + 1):
            if attempt:
                time.sleep(RETRY_BASE * 2 ** (attempt - 1))
            request = urllib.request.Request(  # noqa: S310 - the URL is http(s), checked by config
                self.settings.url,
                data=body,
                headers={"Content-Type": "application/json", "User-Agent": "release-watcher"},
                method="POST",
            )
            # ``timeout`` bounds each connect and read, not the request: a receiver that
            # answers a byte at a time held the thread 20 s against a 1 s timeout (the
            # review). The watchdog, started with the try, shuts its socket down once
            # the try is over it (a socket still connecting is bounded by the timeout).
            watchdog = _Watchdog(timeout)
            try:
                try:
                    resp = _opener(watchdog).open(request, timeout=timeout)
                except urllib.error.HTTPError as exc:
                    exc.close()
                    error = f"HTTP {exc.code}"
                    if 400 <= exc.code < 500 and exc.code != 429:
                        break  # the receiver refuses this message; sending it again changes nothing
                    continue
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    # refused, reset, timed out, an answer that is not HTTP (BadStatusLine:
                    # it was neither counted nor retried, the attacker review)
                    error = (
                        f"no whole answer within the timeout ({timeout:g} s)"
                        if watchdog.fired
                        else f"{type(exc).__name__}: {exc}"
                    )
                    continue
                # A 2xx status line and headers: the receiver took the message. Its body
                # is read only within what is left of the timeout, and no error in it
                # sends the message again.
                with contextlib.suppress(OSError, ValueError, http.client.HTTPException), resp:
                    resp.read(1024)
            finally:
                watchdog.cancel()
            self._count("webhook_sent")
            log.info(
                "webhook_sent", app=self.app, notice=message.get("event"), attempts=attempt + 1
            )
            return True
        self._count("webhook_failures", "http" if error.startswith("HTTP") else "network")
        log.error(
            "webhook_failed",
            app=self.app,
            notice=message.get("event"),
            deploy=message.get("deploy"),
            error=error,
            attempts=attempt + 1,
        )
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is a failure, not a GET of wherever it points: the message (a POST body)
    would be lost and counted as sent, and the receiver could point the daemon at any
    host it can reach (the attacker review)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Watchdog:
    """Shuts the sockets of one POST down once ``seconds`` have passed since it began:
    a read then fails at once, however the receiver paces its bytes."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _connected(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            late = self.fired
        if late:  # fired while it connected
            _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            socks = list(self._socks)
        for sock in socks:
            _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def connection(self, base: type[http.client.HTTPConnection]) -> Any:
        """``base`` whose sockets this watchdog shuts down: each one as ``connect`` leaves
        it (TLS or plain; urllib drops the connection's reference once the answer has
        begun, the response reads on). A TLS handshake, inside ``connect``, is bounded by
        the socket's own timeout (CPython's, for the handshake as a whole)."""
        watchdog = self

        class Watched(base):  # type: ignore[valid-type,misc]
            def connect(self) -> None:
                super().connect()
                watchdog._connected(self.sock)

        return Watched


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # socket's own shutdown, also for a TLS socket: ``SSLSocket.shutdown`` drops its
        # TLS state, which the thread reading on it is still using. A socket closed
        # since has no descriptor left (EBADF): nobody else's is touched.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watched(urllib.request.AbstractHTTPHandler):
    """An http(s) handler whose connections ``watchdog`` shuts down (one per try)."""

    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self._watchdog = watchdog

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        return super().do_open(self._watchdog.connection(http_class), req, **kwargs)


class _TimedHTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _TimedHTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment included) with no redirects, its
    connections watched by ``watchdog``."""
    return urllib.request.build_opener(_NoRedirect, _TimedHTTP(watchdog), _TimedHTTPS(watchdog))


class DeployNotifier:
    """Turns the coordinator's steps into one message per deploy event."""

    def __init__(
        self, sender: WebhookSender, sent: dict[tuple[str, str], None] | None = None
    ) -> None:
        self.sender = sender
        self._sent: dict[tuple[str, str], None] = {} if sent is None else sent

    def started(self, view: Any, *, node: str) -> None:
        """A deploy started (sent by the first expected host, when it joins)."""
        rec = view.record
        self._emit("started", view, node, f"{rec.kind} of {rec.release} started")

    def ended(self, view: Any, result: str, *, node: str) -> None:
        """The end of a deploy, sent by the host that wrote its outcome (once per deploy)."""
        rec = view.record
        if result == "committed":
            event = "rolled_back" if rec.kind == "rollback" else "committed"
            self._emit(event, view, node, f"{rec.kind} of {rec.release} committed")
        elif result in ("rolled_back", "failed_after_commit"):
            what = f"{rec.kind} of {rec.release} failed validation after the flip"
            self._emit("failed_after_commit", view, node, what)
        elif result == "contested":
            what = f"{rec.kind} of {rec.release} is CONTESTED (hosts hold; an operator must look)"
            self._emit("contested", view, node, what)
        else:
            self._emit("aborted", view, node, f"{rec.kind} of {rec.release} {result}")

    def _emit(self, event: str, view: Any, node: str, what: str) -> None:
        rec = view.record
        key = (rec.id, event)
        if key in self._sent:
            return
        self._sent[key] = None
        while len(self._sent) > SENT_KEEP:
            self._sent.pop(next(iter(self._sent)))
        # The fields keep what hosts wrote up to FIELD_TEXT characters each (a host's
        # error may be 4,000, a reason 8,000: 40 failing hosts made a 160 KB body).
        failing = {
            n: p.error or p.state
            for n, p in sorted(view.nodes.items())
            if p.state in FAILING_STATES
        }
        reason = view.decision.reason if view.decision is not None else ""
        by = ids.one_line_short(rec.requested_by, TEXT_ERROR)
        text = f"[{rec.app}] {what} (deploy {rec.id}, requested by {by})"
        if event in ("aborted", "contested"):
            # What hosts wrote is cut shorter in the text (a fleet of 4,000-character
            # errors made a message chats refuse).
            text += f": {ids.one_line_short(reason, TEXT_ERROR)}" if reason else ""
            if failing:
                named = list(failing.items())[:TEXT_HOSTS]
                text += "; failing: " + "; ".join(
                    f"{n}: {ids.one_line_short(e, TEXT_ERROR)}" for n, e in named
                )
                if len(failing) > TEXT_HOSTS:
                    text += f"; and {len(failing) - TEXT_HOSTS} more failing hosts"
        self.sender.send(
            {
                "text": chat_text(text),
                "event": event,
                "app": rec.app,
                "deploy": rec.id,
                "kind": rec.kind,
                "artifact": rec.artifact,
                "release": rec.release,
                "requested_by": rec.requested_by,
                "requested_at": rec.requested_at,
                "expected": list(rec.expected),
                "reason": cut_text(reason, FIELD_TEXT),
                "failing_hosts": {n: cut_text(e, FIELD_TEXT) for n, e in failing.items()},
                "hosts": {n: p.state for n, p in sorted(view.nodes.items())},
                "by": node,
            }
        )


def notifier_for(
    app: AppConfig, metrics: Any = None, *, replacing: DeployNotifier | None = None
) -> DeployNotifier | None:
    """The app's notifier, or None when it has no ``webhook:``. ``replacing``: the one
    it takes over from (a reload): that one's sender ends after what it has queued, and
    what it sent is remembered, so no event goes out twice."""
    if replacing is not None:
        replacing.sender.close()
    if app.webhook is None:
        return None
    sender = WebhookSender(app.webhook, app=app.name, metrics=metrics)
    return DeployNotifier(sender, replacing._sent if replacing is not None else None)


# What Mattermost-like chats read in a webhook's text beside Slack's markup: a mention
# (``@channel``, ``@here``, a person's ``@alice`` or a group's; Slack too when the hook
# links names) and a Markdown link ``[text](url)``. A zero-width space after the ``@`` or
# between ``]`` and ``(`` leaves them shown as written, inert. Every ``@`` that starts a
# name is one: nothing a host wrote may page a person. Only letters and digits before it
# keep it (``ops@example.com``): Mattermost trims ``_`` and punctuation off a mention
# (``_@channel_`` pings), so ``\b``, which takes ``_`` for a letter, falls short.
_CHAT_MENTION = re.compile(r"(?<![A-Za-z0-9])@(?=[\w.\-])")
_ZWSP = "\u200b"


def chat_text(text: str) -> str:
    """``text`` as Slack-compatible chats read it: ``&``, ``<`` and ``>`` escaped (else a
    reason or a host's error written into KV could say ``<!channel>`` or hide a link as
    ``<url|text>``), a mention of everyone and a Markdown link made inert (Mattermost),
    control characters and newlines escaped (one line: no line of its own can start a
    Markdown link definition, ``[r]: url``, that a ``[text][r]`` elsewhere would use)."""
    safe = ids.one_line(text)
    safe = safe.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _CHAT_MENTION.sub("@" + _ZWSP, safe).replace("](", "]" + _ZWSP + "(")
