"""HealthServer over real HTTP on 127.0.0.1, HealthState's rules, and the Metrics registry."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from watcher import health
from watcher.consul_api import request_kind
from watcher.errors import ConfigError
from watcher.health import (
    ConsulRequestsCollector,
    HealthServer,
    HealthState,
    Metrics,
    parse_listen,
)


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Switch:
    """A health function whose answer the test flips."""

    def __init__(self) -> None:
        self.answer: tuple[bool, dict[str, Any]] = (True, {"session": "abc"})
        self.crash = False

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        if self.crash:
            raise RuntimeError("boom")
        return self.answer


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def health_fn() -> Switch:
    return Switch()


@pytest.fixture
def server(metrics: Metrics, health_fn: Switch) -> Iterator[HealthServer]:
    """A started HealthServer on 127.0.0.1 with a free port."""
    srv = HealthServer("127.0.0.1:0", health_fn, metrics)
    srv.start()
    yield srv
    srv.stop()


class TestHealthServer:
    def test_healthy_is_200_with_json(self, server: HealthServer) -> None:
        assert server.port > 0
        status, headers, body = get(server.port, "/health")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {"healthy": True, "session": "abc"}

    def test_unhealthy_is_503(self, server: HealthServer, health_fn: Switch) -> None:
        health_fn.answer = (False, {"problems": ["session lost"]})
        status, _, body = get(server.port, "/health")
        assert status == 503
        assert json.loads(body) == {"healthy": False, "problems": ["session lost"]}

    def test_crashing_health_fn_is_503(self, server: HealthServer, health_fn: Switch) -> None:
        health_fn.crash = True
        status, _, body = get(server.port, "/health")
        assert status == 503
        assert "boom" in json.loads(body)["problems"][0]

    def test_head_has_no_body(self, server: HealthServer) -> None:
        status, headers, body = get(server.port, "/health", method="HEAD")
        assert status == 200
        assert int(headers["content-length"]) > 0
        assert body == b""

    def test_metrics_in_prometheus_text_format(
        self, server: HealthServer, metrics: Metrics
    ) -> None:
        metrics.deploys.labels(app="web", outcome="committed").inc()
        metrics.deploy_phase_seconds.labels(app="web", phase="prepare").observe(2.0)
        metrics.loop_cycles.inc(3)
        metrics.set_current_release("web", "20240101T000000Z-master-15eb13af")
        status, headers, body = get(server.port, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=")
        got = samples(body)
        assert got[("watcher_deploys_total", (("app", "web"), ("outcome", "committed")))] == 1
        assert got[("watcher_loop_cycles_total", ())] == 3
        assert (
            got[("watcher_deploy_phase_seconds_count", (("app", "web"), ("phase", "prepare")))] == 1
        )
        assert (
            got[
                (
                    "watcher_deploy_phase_seconds_bucket",
                    (("app", "web"), ("le", "2.5"), ("phase", "prepare")),
                )
            ]
            == 1
        )
        assert (
            got[
                (
                    "watcher_current_release_info",
                    (("app", "web"), ("release", "20240101T000000Z-master-15eb13af")),
                )
            ]
            == 1
        )

    def test_unknown_path_is_404(self, server: HealthServer) -> None:
        status, _, _ = get(server.port, "/nope")
        assert status == 404

    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
    def test_a_method_no_path_takes_is_405_with_allow(
        self, server: HealthServer, method: str
    ) -> None:
        # http.server answers 501 ("Unsupported method"), which says HTTP has no such one
        status, headers, body = get(server.port, "/health", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD", (status, headers)
        assert body == f"{method} is not allowed here: GET or HEAD\n".encode()
        assert get(server.port, "/health")[0] == 200  # the server still answers
        assert get(server.port, "/nope", method=method)[0] == 404  # not here: no Allow

    def test_stop_closes_the_port(self, metrics: Metrics, health_fn: Switch) -> None:
        srv = HealthServer("127.0.0.1:0", health_fn, metrics)
        srv.start()
        port = srv.port
        assert get(port, "/health")[0] == 200
        srv.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)

    def test_port_in_use_is_a_config_error(
        self, server: HealthServer, metrics: Metrics, health_fn: Switch
    ) -> None:
        other = HealthServer(f"127.0.0.1:{server.port}", health_fn, metrics)
        with pytest.raises(ConfigError, match=r"daemon.listen: cannot listen on 127.0.0.1:\d+"):
            other.start()


class TestWhatALoadBalancerAsks:
    def test_serving_fails_only_for_an_undecided_host(self, metrics: Metrics) -> None:
        clock = FakeClock()
        state = HealthState(undecided_after=30, metrics=metrics, clock=clock)
        srv = HealthServer("127.0.0.1:0", state.check, metrics, state.serving)
        srv.start()
        try:
            # Starting, then Consul gone: the watcher is unwell on every host at once, the
            # app is not; a load balancer must not drain the whole fleet for it.
            assert get(srv.port, "/health")[0] == 503
            assert get(srv.port, "/health/serving")[0] == 200
            state.session_ok("s")
            state.loop_cycle()
            state.session_lost("renewal failed: consul unreachable")
            clock.now += 500  # and the loop stalled
            assert get(srv.port, "/health")[0] == 503
            status, _, body = get(srv.port, "/health/serving")
            assert status == 200 and json.loads(body)["problems"] == []
            # Acked ready and cannot read the decision: this host may be the one left on
            # the old release, so it is drained.
            state.waiting_for_decision("web", "d-1")
            clock.now += 31
            status, _, body = get(srv.port, "/health/serving")
            assert status == 503, body
            assert json.loads(body)["problems"] == [
                "web: undecided in deploy d-1 for 31s (acked ready, cannot read the decision)"
            ]
            state.decision_read("web")
            assert get(srv.port, "/health/serving")[0] == 200
        finally:
            srv.stop()

    def test_a_slow_client_is_cut_off_at_the_request_deadline(
        self, metrics: Metrics, health_fn: Switch, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(health, "REQUEST_DEADLINE", 1.0)
        srv = HealthServer("127.0.0.1:0", health_fn, metrics)
        srv.start()
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                started = time.monotonic()
                closed = False
                for byte in b"GET /health HTTP/1.0\r\nX-Slow: " + b"a" * 40:
                    try:
                        sock.sendall(bytes([byte]))  # a byte every 0.2 s: each read is quick
                    except OSError:
                        closed = True
                        break
                    time.sleep(0.2)
                    if time.monotonic() - started > 4:
                        break
                if not closed:
                    sock.settimeout(3)
                    try:
                        closed = sock.recv(100) == b""
                    except OSError:
                        closed = True
                assert closed and time.monotonic() - started < 4
            assert get(srv.port, "/health")[0] == 200
        finally:
            srv.stop()

    def test_connections_over_the_cap_get_a_quick_503(
        self, metrics: Metrics, health_fn: Switch, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(health, "MAX_CONNECTIONS", 2)
        srv = HealthServer("127.0.0.1:0", health_fn, metrics)
        srv.start()
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.3)  # both accepted and holding a slot
            started = time.monotonic()
            assert get(srv.port, "/health")[0] == 503
            assert time.monotonic() - started < 1
            for sock in idle:
                sock.close()
            deadline = time.monotonic() + 10
            while get(srv.port, "/health")[0] != 200:  # slots freed as the handlers end
                assert time.monotonic() < deadline
                time.sleep(0.1)
        finally:
            for sock in idle:
                sock.close()
            srv.stop()


class TestParseListen:
    @pytest.mark.parametrize(
        ("listen", "expected"),
        [
            ("127.0.0.1:9473", ("127.0.0.1", 9473)),
            ("http://127.0.0.1:9473/", ("127.0.0.1", 9473)),
            ("[::1]:9473", ("::1", 9473)),
            ("localhost:0", ("localhost", 0)),
        ],
    )
    def test_valid(self, listen: str, expected: tuple[str, int]) -> None:
        assert parse_listen(listen) == expected

    @pytest.mark.parametrize("listen", ["127.0.0.1", ":9473", "host:port", "host:70000"])
    def test_invalid(self, listen: str) -> None:
        with pytest.raises(ConfigError, match=r"daemon\.listen: must be"):
            parse_listen(listen)


class TestHealthState:
    def make(self, metrics: Metrics | None = None) -> tuple[HealthState, FakeClock]:
        clock = FakeClock()
        state = HealthState(undecided_after=30, loop_stall_after=120, metrics=metrics, clock=clock)
        return state, clock

    def test_unhealthy_until_it_has_a_session(self) -> None:
        state, _ = self.make()
        healthy, details = state.check()
        assert not healthy
        assert details["problems"] == ["starting: no Consul session yet"]
        state.session_ok("sess-1")
        state.loop_cycle()
        assert state.check() == (
            True,
            {
                "session": "sess-1",
                "last_cycle_age_s": 0.0,
                "waiting_for_decision": {},
                "problems": [],
            },
        )

    def test_session_lost(self) -> None:
        state, _ = self.make()
        state.session_ok("sess-1")
        state.session_lost("session invalidated by Consul")
        healthy, details = state.check()
        assert not healthy
        assert details["problems"] == ["session invalidated by Consul"]

    def test_renewals_failing_past_the_ttl(self) -> None:
        # Its agent away: the session is not lost yet (Consul keeps it twice the TTL), but
        # nothing renews it; /health said healthy for the whole outage.
        state, clock = self.make()
        state.session_ok("s")
        state.loop_cycle()
        state.renewal_failed(clock.now, "cannot reach Consul", ttl=10)
        clock.now += 6
        state.renewal_failed(clock.now, "cannot reach Consul (again)", ttl=10)
        state.loop_cycle()
        assert state.check()[0]  # within the TTL: one failed renewal leaves time for more
        clock.now += 5
        state.loop_cycle()
        healthy, details = state.check()
        assert not healthy
        assert details["problems"] == [
            "Consul session s not renewed for 11s (its TTL is 10s; Consul drops it at twice "
            "that): cannot reach Consul (again)"
        ]
        state.session_ok("s")  # renewed
        assert state.check()[0]

    def test_stuck_loop(self) -> None:
        state, clock = self.make()
        state.session_ok("s")
        state.loop_cycle()
        clock.now += 119
        assert state.check()[0]
        clock.now += 2
        healthy, details = state.check()
        assert not healthy
        assert details["problems"] == ["main loop has not completed a cycle for 121s"]

    def test_undecided_after_the_threshold(self) -> None:
        metrics = Metrics()
        state, clock = self.make(metrics)
        state.session_ok("s")
        state.loop_cycle()
        state.waiting_for_decision("web", "d-1")
        assert metrics.undecided.labels(app="web")._value.get() == 1
        clock.now += 20
        state.loop_cycle()
        state.waiting_for_decision("web", "d-1")  # repeated: keeps the first time
        clock.now += 11
        state.loop_cycle()
        healthy, details = state.check()
        assert not healthy
        assert details["waiting_for_decision"] == {"web": {"deploy": "d-1", "waiting_s": 31.0}}
        assert details["problems"] == [
            "web: undecided in deploy d-1 for 31s (acked ready, cannot read the decision)"
        ]
        state.decision_read("web")
        assert state.check()[0]
        assert metrics.undecided.labels(app="web")._value.get() == 0

    def test_undecided_counts_from_the_failing_read_s_start_when_given(self) -> None:
        # The error came 17 s after the failing read began (a timeout): the host has not
        # been able to read the decision for 17 s, not for 0.
        state, clock = self.make()
        state.session_ok("s")
        state.loop_cycle()
        state.waiting_for_decision("web", "d-1", since=clock.now - 17)
        healthy, details = state.check()
        assert details["waiting_for_decision"]["web"]["waiting_s"] == 17.0
        assert healthy  # under the 30 s threshold
        clock.now += 14
        state.loop_cycle()
        assert not state.check()[0]
        state.decision_read("web")
        state.waiting_for_decision("web", "d-2", since=clock.now + 5)  # not in the future
        assert state.check()[1]["waiting_for_decision"]["web"]["waiting_s"] == 0.0

    def test_a_failing_renewal_makes_a_waiting_host_undecided(self) -> None:
        """A host that only waits does not read KV until its watches answer: the session
        renewals (every TTL/2) are the first to find its agent gone."""
        metrics = Metrics()
        state, clock = self.make(metrics)
        state.session_ok("s")
        state.loop_cycle()
        state.ready_waiting("web", "d-1", since=clock.now)
        clock.now += 40  # a long wait for a slow peer, Consul fine: healthy
        assert state.check()[0]
        # A renewal that began 5 s ago has just failed (a timeout): undecided from then.
        assert state.renewal_failed(clock.now - 5)  # True: a wait started
        assert metrics.undecided.labels(app="web")._value.get() == 1
        assert state.check()[1]["waiting_for_decision"]["web"]["waiting_s"] == 5.0
        clock.now += 26
        state.loop_cycle()
        state.decision_read("web")  # the loop's cycle without a read: still undecided
        healthy, details = state.check()
        assert not healthy and "undecided in deploy d-1 for 31s" in details["problems"][0]
        state.session_ok("s")  # a renewal went through: Consul answers again
        assert state.check()[0]
        assert metrics.undecided.labels(app="web")._value.get() == 0
        # Not before the host began to wait; and a decided deploy lifts it too.
        state.ready_waiting("web", "d-2", since=clock.now)
        assert state.renewal_failed(clock.now - 60)
        assert state.check()[1]["waiting_for_decision"]["web"]["waiting_s"] == 0.0
        state.ready_waiting("web", None)
        assert state.check()[1]["waiting_for_decision"] == {}
        assert not state.renewal_failed(clock.now)  # nothing waits: nothing starts


class TestMetrics:
    def test_own_registry_not_the_global_one(self) -> None:
        a, b = Metrics(), Metrics()  # a second instance must not clash on names
        a.loop_cycles.inc()
        assert samples(b.render())[("watcher_loop_cycles_total", ())] == 0
        assert REGISTRY.get_sample_value("watcher_loop_cycles_total") is None

    def test_every_daemon_metric_is_exported(self) -> None:
        m = Metrics()
        m.flip_timestamp_seconds.labels(app="web").set(1.7e9)
        m.session_renew_failures.inc()
        m.consul_errors.labels(op="kv_get").inc()
        m.artifact_download_bytes.labels(app="web").inc(1024)
        m.artifact_fetch_seconds.labels(app="web").observe(0.3)
        m.hook_runs.labels(app="web", phase="post_release", result="ok").inc()
        m.undecided.labels(app="web").set(0)
        m.events_handled.labels(name="deploy", result="acted").inc()
        names = {name for name, _ in samples(m.render())}
        assert {
            "watcher_build_info",
            "watcher_flip_timestamp_seconds",
            "watcher_session_renew_failures_total",
            "watcher_consul_errors_total",
            "watcher_artifact_download_bytes_total",
            "watcher_artifact_fetch_seconds_count",
            "watcher_hook_runs_total",
            "watcher_undecided",
            "watcher_events_handled_total",
        } <= names

    def test_current_release_replaces_the_previous_series(self) -> None:
        m = Metrics()
        m.set_current_release("web", "r1")
        m.set_current_release("api", "a1")
        m.set_current_release("web", "r2")
        got = samples(m.render())
        releases = {
            dict(labels)["release"]
            for name, labels in got
            if name == "watcher_current_release_info"
        }
        assert releases == {"r2", "a1"}
        m.set_current_release("web", None)
        got = samples(m.render())
        assert [dict(labels) for name, labels in got if name == "watcher_current_release_info"] == [
            {"app": "api", "release": "a1"}
        ]

    def test_the_loops_refresh_walks_the_series_only_when_the_release_moved(self) -> None:
        """The loop refreshes the release after every step; walking every series each time
        is work for nothing while it stays the same."""
        m = Metrics()
        walked: list[str] = []
        real = m._release_labels

        def counting(app: str) -> list[str]:
            walked.append(app)
            return real(app)

        m._release_labels = counting  # type: ignore[method-assign]
        for _ in range(5):
            m.read_current_release("web", lambda: "r1")
        m.read_current_release("web", lambda: "r2")
        m.read_current_release("web", lambda: None)
        m.read_current_release("web", lambda: None)
        assert walked == ["web", "web", "web"]
        assert not [s for s in samples(m.render()) if s[0] == "watcher_current_release_info"]

    def test_a_flip_never_loses_to_the_loop_reading_the_disk_before_it(self) -> None:
        """The loop reads `current` from disk after each step; the worker sets the new
        release right after its rename. A read from before the rename that is set after
        the worker's value would name the old release until the next step."""
        m = Metrics()
        m.set_current_release("web", "old")
        reading, renamed = threading.Event(), threading.Event()

        def read_before_the_rename() -> str:
            reading.set()
            renamed.wait(5)  # the worker renames meanwhile and sets its value
            return "old"

        loop = threading.Thread(target=m.read_current_release, args=("web", read_before_the_rename))
        loop.start()
        assert reading.wait(5)
        worker = threading.Thread(target=m.set_current_release, args=("web", "new"))
        worker.start()
        worker.join(0.2)
        assert worker.is_alive()  # the flip's set waits for the read under way
        renamed.set()
        loop.join(5)
        worker.join(5)
        got = samples(m.render())
        assert [
            dict(labels)["release"] for name, labels in got if name.endswith("release_info")
        ] == ["new"]


class TestConsulRequests:
    def test_exported_by_kind_at_scrape_time(self) -> None:
        counts = {"txn": 3}
        registry = CollectorRegistry()
        registry.register(ConsulRequestsCollector(lambda: counts))
        assert samples(generate_latest(registry)) == {
            ("watcher_consul_requests_total", (("kind", "txn"),)): 3.0
        }
        counts["session_renew"] = 2
        counts["txn"] = 5
        assert samples(generate_latest(registry)) == {
            ("watcher_consul_requests_total", (("kind", "session_renew"),)): 2.0,
            ("watcher_consul_requests_total", (("kind", "txn"),)): 5.0,
        }

    @pytest.mark.parametrize(
        ("method", "path", "params", "kind"),
        [
            ("GET", "/v1/kv/a/b", [], "kv_get"),
            ("GET", "/v1/kv/a/b", [("index", 5), ("wait", "1s")], "kv_get_blocking"),
            ("GET", "/v1/kv/a/", [("recurse", "1")], "kv_list"),
            ("GET", "/v1/kv/a/", [("index", 5), ("recurse", "1")], "kv_list_blocking"),
            ("GET", "/v1/kv/a/", [("keys", True), ("separator", "/")], "kv_keys"),
            ("PUT", "/v1/kv/a", [("cas", 3)], "kv_put"),
            ("DELETE", "/v1/kv/a", None, "kv_delete"),
            ("PUT", "/v1/txn", None, "txn"),
            ("PUT", "/v1/session/renew/abc", None, "session_renew"),
            ("PUT", "/v1/session/create", None, "session_create"),
            ("GET", "/v1/event/list", [("name", "deploy")], "event_list"),
            ("GET", "/v1/event/list", [("index", "x"), ("wait", "5s")], "event_list_blocking"),
            ("PUT", "/v1/event/fire/deploy", {"token": "t"}, "event_fire"),
            ("GET", "/v1/agent/self", None, "agent"),
            ("GET", "/v1/status/leader", None, "status"),
            ("GET", "/v1/acl/token/self", None, "acl"),
            ("GET", "/v1/catalog/nodes", None, "other"),
        ],
    )
    def test_request_kind(self, method: str, path: str, params: object, kind: str) -> None:
        assert request_kind(method, path, params) == kind
