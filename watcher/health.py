"""The daemon's local HTTP endpoint: /health (the watcher), /health/serving (for load
balancers), /metrics for Prometheus."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from watcher import __version__
from watcher.consul_api import request_counts
from watcher.errors import ConfigError
from watcher.log import get_logger

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]

#: Seconds; deploy phases run from well under a second (a prefetched flip) to many minutes.
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
FETCH_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
REQUEST_DEADLINE = 5.0  # seconds a client has to send its whole request, however slowly
MAX_CONNECTIONS = 64  # served at once; one more gets a 503 without a thread of its own


class ConsulRequestsCollector(Collector):
    """``watcher_consul_requests_total{kind}``: the process's Consul HTTP requests.

    Read at scrape time from the counter every request of ``watcher.consul_api`` goes
    through, so it covers all of the process's clients (daemon loop, watches, renewals).
    """

    def __init__(self, counts: Callable[[], Mapping[str, int]] = request_counts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "watcher_consul_requests",
            "Consul HTTP requests this process sent (every attempt), by endpoint kind",
            labels=["kind"],
        )
        for kind, count in sorted(self._counts().items()):
            family.add_metric([kind], count)
        yield family


class Metrics:
    """Every metric the daemon exports, in a registry of its own (never the global one)."""

    def __init__(self) -> None:
        # No `*_created` series beside each counter and histogram (a timestamp per label
        # set that doubles the series and that no alert reads); process-wide, and the web
        # server does the same.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._release_lock = threading.Lock()  # the loop and a flip both set the release
        self._pointed: dict[str, str | None] = {}  # app -> its series' release ("" never is)
        r = self.registry
        r.register(ConsulRequestsCollector())
        self.build_info = Gauge(
            "watcher_build_info",
            "The running watcher's version (always 1)",
            ["version"],
            registry=r,
        )
        self.build_info.labels(version=__version__).set(1)
        self.deploys = Counter(
            "watcher_deploys",
            "Deploys this host was expected in, once its part is done, by how it ended "
            "here (committed, failed_after_commit, aborted, contested)",
            ["app", "outcome"],
            registry=r,
        )
        self.alarm = Gauge(
            "watcher_alarm",
            "1 while an app on this host is stopped by an alarm (a contested deploy, a "
            "refused convergence); the reason is in /health and the log",
            ["app"],
            registry=r,
        )
        self.deploy_phase_seconds = Histogram(
            "watcher_deploy_phase_seconds",
            "Time this host spent in each deploy phase (prepare, apply)",
            ["app", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.flip_timestamp_seconds = Gauge(
            "watcher_flip_timestamp_seconds",
            "Unix time of this host's last flip of current",
            ["app"],
            registry=r,
        )
        self.current_release_info = Gauge(
            "watcher_current_release_info",
            "The release current points at (always 1)",
            ["app", "release"],
            registry=r,
        )
        self.session_renew_failures = Counter(
            "watcher_session_renew_failures", "Consul session renewals that failed", registry=r
        )
        self.consul_errors = Counter(
            "watcher_consul_errors", "Consul calls that failed, by operation", ["op"], registry=r
        )
        self.artifact_download_bytes = Counter(
            "watcher_artifact_download_bytes",
            "Artifact bytes downloaded from S3",
            ["app"],
            registry=r,
        )
        self.artifact_fetch_seconds = Histogram(
            "watcher_artifact_fetch_seconds",
            "Time to download and verify an artifact (downloads that ended verified)",
            ["app"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.hook_runs = Counter(
            "watcher_hook_runs",
            "Hook runs by phase and result (ok, failed, timeout, cancelled)",
            ["app", "phase", "result"],
            registry=r,
        )
        self.prune_blocked = Gauge(
            "watcher_prune_blocked",
            "1 while the last prune (after a deploy, or planned at start) removed nothing because "
            "a process's /proc entries could not be read (releases pile up; `watcherctl status` "
            "says why)",
            ["app"],
            registry=r,
        )
        self.retrying = Gauge(
            "watcher_retrying",
            "1 while a committed switch (step=switch) or a convergence (step=converge) of the "
            "app fails here and is retried with a growing pause (`watcherctl status` says why)",
            ["app", "step"],
            registry=r,
        )
        self.loop_cycles = Counter("watcher_loop_cycles", "Main loop cycles", registry=r)
        self.undecided = Gauge(
            "watcher_undecided",
            "1 while this host has acked ready and not yet read the deploy's decision",
            ["app"],
            registry=r,
        )
        self.webhook_sent = Counter(
            "watcher_webhook_sent",
            "Deploy notifications the receiver accepted (this host coordinated)",
            ["app"],
            registry=r,
        )
        self.webhook_failures = Counter(
            "watcher_webhook_failures",
            "Deploy notifications given up after the retries, by reason (http, network, "
            "queue_full, reloaded)",
            ["app", "reason"],
            registry=r,
        )
        self.events_handled = Counter(
            "watcher_events_handled",
            "Consul events handled, by name and result (acted, duplicate, history, refused, "
            "failed, invalid)",
            ["name", "result"],
            registry=r,
        )

    def set_current_release(self, app: str, release: str | None) -> None:
        """Point ``current_release_info{app}`` at ``release`` (dropping the previous series)."""
        with self._release_lock:
            self._point_release(app, release)

    def read_current_release(self, app: str, read: Callable[[], str | None]) -> None:
        """Point it at what ``read()`` finds, read under the lock: a flip's own
        ``set_current_release`` (after its rename) never loses to a read from before it."""
        with self._release_lock:
            self._point_release(app, read())

    def _point_release(self, app: str, release: str | None) -> None:
        if self._pointed.get(app, "") == release:
            return  # the loop's refresh on every step: nothing moved (the usual case)
        self._pointed[app] = release
        for sample_labels in self._release_labels(app):
            if sample_labels != release:
                self.current_release_info.remove(app, sample_labels)
        if release is not None:
            self.current_release_info.labels(app=app, release=release).set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)

    def _release_labels(self, app: str) -> list[str]:
        found: list[str] = []
        for metric in self.current_release_info.collect():
            for sample in metric.samples:
                if sample.labels.get("app") == app:
                    found.append(sample.labels["release"])
        return found


@dataclass
class _Waiting:
    deploy_id: str
    since: float
    #: Set from the session renewals failing (the loop had not tried to read yet): lifted
    #: by the next renewal that succeeds, not only by the loop's next good read.
    from_renewal: bool = False


class HealthState:
    """What /health reports, updated by the daemon's threads; ``check`` is the HealthFn.

    Unhealthy when: the daemon has no Consul session yet or lost it, or has not renewed it
    for longer than its TTL (its agent away: Consul drops it at twice the TTL); the main
    loop has not completed a cycle for ``loop_stall_after`` seconds; or a host acked ready in
    a deploy and has not read its decision for ``undecided_after`` seconds (DESIGN.md 6.2
    step 4: load balancers must be able to drain a partitioned participant).
    """

    def __init__(
        self,
        *,
        undecided_after: float,
        loop_stall_after: float = 120.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.undecided_after = undecided_after
        self.loop_stall_after = loop_stall_after
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._last_cycle: float | None = None
        self._session: str | None = None
        self._session_problem = "starting: no Consul session yet"
        self._waiting: dict[str, _Waiting] = {}
        # Apps that acked ready and wait for the others, as the loop last read them: a host
        # that only waits reads again on its watches' answers (or after WAIT_RECHECK), so a
        # cut-off agent shows first in the session renewals, every TTL/2.
        self._ready: dict[str, _Waiting] = {}
        self._alarms: dict[str, str] = {}
        # Apps whose last step Consul refused for this watcher's token: this host then takes
        # part in no deploy of the app, and the fleet may not even see it.
        self._refused: dict[str, str] = {}
        # Since when the renewals of the session held fail (the clock's time), the last
        # error, and the TTL: past it, said unhealthy (None while they succeed).
        self._renew_failing: tuple[float, str, float] | None = None

    def alarm(self, app: str, reason: str) -> None:
        """A contested deploy or a refused convergence: unhealthy until an operator acts."""
        with self._lock:
            self._alarms[app] = reason
        if self._metrics is not None:
            self._metrics.alarm.labels(app=app).set(1)

    def clear_alarm(self, app: str) -> None:
        with self._lock:
            self._alarms.pop(app, None)
        if self._metrics is not None:
            self._metrics.alarm.labels(app=app).set(0)

    def token_refused(self, app: str, error: str | None) -> None:
        """The loop's last step for ``app`` was refused for this token's permissions
        (``error``), or (None) went through."""
        with self._lock:
            if error is None:
                self._refused.pop(app, None)
            else:
                self._refused[app] = error

    def loop_cycle(self) -> None:
        """The main loop completed a cycle."""
        with self._lock:
            self._last_cycle = self._clock()

    def session_ok(self, session_id: str) -> None:
        with self._lock:
            self._session, self._session_problem = session_id, ""
            self._renew_failing = None
            lifted = [a for a, w in self._waiting.items() if w.from_renewal]
            for app in lifted:
                del self._waiting[app]
        if self._metrics is not None:
            for app in lifted:
                self._metrics.undecided.labels(app=app).set(0)

    def ready_waiting(self, app: str, deploy_id: str | None, since: float | None = None) -> None:
        """After a good read: ``app`` acked ready in ``deploy_id`` and waits for the others
        (since ``since``), or (None) it does not."""
        lifted = False
        with self._lock:
            if deploy_id is None:
                self._ready.pop(app, None)
                waiting = self._waiting.get(app)
                if waiting is not None and waiting.from_renewal:
                    del self._waiting[app]  # decided, or over for this host
                    lifted = True
            elif (w := self._ready.get(app)) is None or w.deploy_id != deploy_id:
                self._ready[app] = _Waiting(deploy_id, since or self._clock())
        if lifted and self._metrics is not None:
            self._metrics.undecided.labels(app=app).set(0)

    def renewal_failed(self, since: float, error: str = "", ttl: float = 0.0) -> bool:
        """A renewal of the session held failed; the call began at ``since``. A host that
        waits for a decision cannot read it either: undecided from then (or from when it
        began to wait), without waiting for the loop's next read to time out as well. True
        when that started a wait (status.json should say so). With ``ttl``: once renewals
        have failed for longer than that, /health says so with ``error`` (the session may
        still exist, but this host can take part in no deploy, and Consul drops it at twice
        the TTL)."""
        started: list[str] = []
        with self._lock:
            if ttl:
                first = self._renew_failing[0] if self._renew_failing else since
                self._renew_failing = (first, error, ttl)
            for app, ready in self._ready.items():
                if app not in self._waiting:
                    self._waiting[app] = _Waiting(
                        ready.deploy_id, max(since, ready.since), from_renewal=True
                    )
                    started.append(app)
        if self._metrics is not None:
            for app in started:
                self._metrics.undecided.labels(app=app).set(1)
        return bool(started)

    def session_lost(self, reason: str) -> None:
        with self._lock:
            self._session, self._session_problem = None, reason or "session lost"
            self._renew_failing = None

    def waiting_for_decision(self, app: str, deploy_id: str, *, since: float = 0.0) -> None:
        """This host acked ready in ``deploy_id`` and cannot read the decision: since
        ``since`` (the clock's time the failing read began, when known), else since now."""
        with self._lock:
            current = self._waiting.get(app)
            if current is None or current.deploy_id != deploy_id:
                now = self._clock()
                self._waiting[app] = _Waiting(deploy_id, min(since, now) if since else now)
        if self._metrics is not None:
            self._metrics.undecided.labels(app=app).set(1)

    def decision_read(self, app: str) -> None:
        """The loop's reconcile of the app went through without a Consul error. A wait the
        renewals started stays: a host that only waits reconciles without reading KV (its
        watches have not answered); the next good renewal or the deploy's end lifts it."""
        with self._lock:
            waiting = self._waiting.get(app)
            if waiting is None or waiting.from_renewal:
                return
            del self._waiting[app]
        if self._metrics is not None:
            self._metrics.undecided.labels(app=app).set(0)

    def check(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details) for /health."""
        with self._lock:
            now = self._clock()
            problems: list[str] = []
            if self._session is None:
                problems.append(self._session_problem)
            elif self._renew_failing is not None:
                failing_since, error, ttl = self._renew_failing
                if now - failing_since > ttl:
                    problems.append(
                        f"Consul session {self._session} not renewed for "
                        f"{now - failing_since:.0f}s (its TTL is {ttl:g}s; Consul drops it "
                        f"at twice that): {error}"
                    )
            since = self._last_cycle if self._last_cycle is not None else self._started
            loop_age = now - since
            if loop_age > self.loop_stall_after:
                problems.append(f"main loop has not completed a cycle for {loop_age:.0f}s")
            problems += [f"{app}: alarm: {why}" for app, why in sorted(self._alarms.items())]
            problems += [
                f"{app}: Consul refused this watcher's token, so it takes part in no deploy "
                f"of {app}: {why}"
                for app, why in sorted(self._refused.items())
            ]
            undecided: dict[str, Any] = {}
            for app, waiting in sorted(self._waiting.items()):
                waited = now - waiting.since
                undecided[app] = {"deploy": waiting.deploy_id, "waiting_s": round(waited, 1)}
                if waited > self.undecided_after:
                    problems.append(
                        f"{app}: undecided in deploy {waiting.deploy_id} for "
                        f"{waited:.0f}s (acked ready, cannot read the decision)"
                    )
            details: dict[str, Any] = {
                "session": self._session,
                "last_cycle_age_s": None if self._last_cycle is None else round(loop_age, 1),
                "waiting_for_decision": undecided,
                "problems": problems,
            }
        return not problems, details

    def serving(self) -> tuple[bool, dict[str, Any]]:
        """(should serve, details) for /health/serving, what a load balancer asks: false only
        while this host is undecided past ``undecided_after`` (DESIGN.md 6.2: it may be the
        one host left on the old release). Never because of Consul, the session or the
        watcher itself: those fail on every host at once, and draining on them would take
        the whole fleet out of the load balancer while the app is fine."""
        _, details = self.check()
        problems = [p for p in details["problems"] if ": undecided in deploy " in p]
        return not problems, {
            "waiting_for_decision": details["waiting_for_decision"],
            "problems": problems,
        }


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9473"``, ``"[::1]:9473"``, ``"localhost:0"`` -> (host, port)."""
    text = listen.split("://", 1)[-1].rstrip("/")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError("daemon.listen", [f'must be "host:port", got "{listen}"'])
    return host, int(port_text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a burst of probes waits in the backlog, not in SYN retries

    def __init__(
        self,
        address: tuple[str, int],
        health_fn: HealthFn,
        metrics: Metrics,
        serving_fn: HealthFn | None = None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.health_fn = health_fn
        self.serving_fn = serving_fn or health_fn
        self.metrics = metrics
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Over the cap (slow clients holding every slot): no thread, a short answer.
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each allowed only what is left of one deadline for the request:
    a client sending a byte every few seconds is cut off, not served for minutes."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not complete within its deadline")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


PATHS = ("/health", "/health/serving", "/metrics")  # what the daemon's server answers


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_DEADLINE  # and the whole request within REQUEST_DEADLINE (setup)
    server_version = f"watcher/{__version__}"

    def setup(self) -> None:
        super().setup()
        deadline = time.monotonic() + REQUEST_DEADLINE
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._health(self.server.health_fn)
        elif path == "/health/serving":
            self._health(self.server.serving_fn)
        elif path == "/metrics":
            self._reply(200, CONTENT_TYPE_LATEST, self.server.metrics.render())
        else:
            self._reply(
                404,
                "text/plain; charset=utf-8",
                b"not found: try /health, /health/serving or /metrics\n",
            )

    def do_HEAD(self) -> None:
        self.do_GET()

    def _not_allowed(self) -> None:
        """A method HTTP knows that no path here takes: 405 with Allow (RFC 9110 15.5.6),
        not http.server's 501, which says the method is unknown; 404 for a path that is not
        here at all. Its body is not read, so the connection is closed after the answer."""
        known = self.path.split("?", 1)[0] in PATHS
        body = (
            f"{self.command} is not allowed here: GET or HEAD\n"
            if known
            else "not found: try /health, /health/serving or /metrics\n"
        ).encode()
        self.close_connection = True
        self.send_response(405 if known else 404)
        if known:
            self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _health(self, fn: HealthFn) -> None:
        try:
            healthy, details = fn()
        except Exception as exc:  # a broken health function must read as unhealthy
            get_logger(component="health").exception("health_check_crashed")
            healthy, details = False, {"problems": [f"health check crashed: {exc!r}"]}
        body = json.dumps({"healthy": healthy, **details}, sort_keys=True, default=str)
        self._reply(200 if healthy else 503, "application/json", body.encode() + b"\n")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        get_logger(component="health").debug(
            "http_request", client=self.client_address[0], request=format % args
        )


class HealthServer:
    """/health and /metrics on ``listen`` ("host:port"; port 0 picks a free one)."""

    def __init__(
        self,
        listen: str,
        health_fn: HealthFn,
        metrics: Metrics,
        serving_fn: HealthFn | None = None,
    ) -> None:
        self.listen = listen
        self._address = parse_listen(listen)
        self._health_fn = health_fn
        self._serving_fn = serving_fn
        self._metrics = metrics
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after start())."""
        if self._server is None:
            raise RuntimeError("HealthServer.port: not started")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return self._address[0]

    def start(self) -> None:
        """Bind and serve in a daemon thread; ConfigError when the address cannot be bound."""
        if self._server is not None:
            return
        try:
            server = _Server(self._address, self._health_fn, self._metrics, self._serving_fn)
        except OSError as exc:
            raise ConfigError(
                "daemon.listen", [f"cannot listen on {self.listen}: {exc.strerror or exc}"]
            ) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            # No timeout: the thread sleeps until a request comes (stop() wakes it), rather
            # than waking ten times a second for nothing.
            kwargs={"poll_interval": None},
            name="health-http",
            daemon=True,
        )
        self._thread.start()
        get_logger(component="health").info("health_listening", host=self.host, port=self.port)

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        # shutdown() waits for serve_forever to see its request, which it does only after
        # select() returns: connect until it has.
        stopper = threading.Thread(target=server.shutdown, name="health-http-stop", daemon=True)
        stopper.start()
        host, port = server.server_address[:2]
        for _ in range(50):
            with contextlib.suppress(OSError):
                socket.create_connection((str(host), int(port)), timeout=1).close()
            stopper.join(0.1)
            if not stopper.is_alive():
                break
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
