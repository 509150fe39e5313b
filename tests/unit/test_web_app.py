"""`watcher web` without a Consul: what is refused before Consul is asked, and the helpers.

What needs Consul (tokens, writes, reads) is tested against a real cluster in
tests/integration/test_web_api.py; here Consul's address answers nothing.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from watcher.config import parse_config
from watcher.web.app import (
    MAX_BODY,
    _duration,
    _short_time,
    _timeline,
    create_app,
    is_loopback,
)


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: connection refused


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    config = parse_config(
        {
            "consul": {"address": dead_address(), "timeout": "1s"},
            "s3": {"bucket": "b"},
            "apps": {"web": {"root": "/srv"}},
        },
        env={},
    )
    with TestClient(create_app(config, listen_host="127.0.0.1")) as c:
        yield c


class TestRefusedBeforeConsul:
    @pytest.mark.parametrize(
        "path", ["/api/v1/apps/web/fleet", "/apps/web", "/metrics", "/nowhere"]
    )
    def test_a_token_in_the_url_is_refused_everywhere(self, client: TestClient, path: str) -> None:
        r = client.get(path, params={"consul_token": "secret"})
        assert r.status_code == 400
        assert "token in the URL is refused" in r.json()["error"]

    def test_oversized_bodies_with_or_without_a_length(self, client: TestClient) -> None:
        body = b'{"artifact": "' + b"a" * MAX_BODY + b'"}'
        r = client.post("/api/v1/apps/web/deploys", content=body)
        assert r.status_code == 413 and "over 16384 bytes" in r.json()["error"]

        def chunks() -> Iterator[bytes]:
            yield body[:1000]
            yield body[1000:]

        r = client.post("/api/v1/apps/web/deploys", content=chunks())
        assert r.status_code == 413

    def test_a_malformed_authorization_header(self, client: TestClient) -> None:
        r = client.get("/api/v1/apps/web/fleet", headers={"Authorization": "Basic dXNlcjpw"})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]

    def test_unknown_route_and_app(self, client: TestClient) -> None:
        assert client.get("/api/v1/nothing").status_code == 404
        r = client.get("/api/v1/apps/api/fleet")
        assert r.status_code == 404 and "apps.api: no such app" in r.json()["error"]

    def test_wrong_types_name_the_field(self, client: TestClient) -> None:
        r = client.post("/api/v1/apps/web/deploys", json={"artifact": 5, "allow_missing": "x"})
        assert r.status_code == 422
        assert "artifact:" in r.json()["error"] and "allow_missing:" in r.json()["error"]

    def test_consul_down_is_a_503_with_the_reason(self, client: TestClient) -> None:
        r = client.get("/api/v1/apps/web/fleet")
        assert r.status_code == 503 and "cannot reach Consul" in r.json()["error"]
        page = client.get("/apps/web")
        assert page.status_code == 503 and "cannot reach Consul" in page.text

    def test_the_openapi_lists_exactly_the_api_routes(self, client: TestClient) -> None:
        spec = client.get("/openapi.json").json()
        served = {(p, m.upper()) for p, ops in spec["paths"].items() for m in ops}
        routes = {
            (r.path, m)
            for r in client.app.routes  # type: ignore[attr-defined]
            if isinstance(r, APIRoute) and r.include_in_schema
            for m in r.methods
        }
        assert served == routes
        assert all(p.startswith(("/api/v1/", "/healthz", "/metrics")) for p, _ in served)


class TestHelpers:
    def test_is_loopback(self) -> None:
        assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
        assert is_loopback("127.0.13.2")
        assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.10")
        assert not is_loopback("web.example.com")

    def test_times(self) -> None:
        assert _short_time("2026-12-01T21:13:56.922Z") == "2026-12-01 21:13:56Z"
        assert _short_time(None) == "-"
        host = {
            "state": "live",
            "staged_at": "2026-12-01T21:13:57Z",
            "staging_at": "2026-12-01T21:13:55Z",
            "live_at": "2026-12-01T21:13:59Z",
        }
        assert _timeline(host) == [
            ("staging", "21:13:55"),
            ("staged", "21:13:57"),
            ("live", "21:13:59"),
        ]

    def test_duration_of_ended_deploys_only(self) -> None:
        deploy = {
            "requested_at": "2026-12-01T21:13:55Z",
            "hosts": {
                "h1": {"live_at": "2026-12-01T21:13:57.5Z"},
                "h2": {"live_at": "2026-12-01T21:13:56Z"},
            },
            "result": "committed",
        }
        assert _duration(deploy) == "2.5s"
        assert _duration({**deploy, "result": None}) == ""
