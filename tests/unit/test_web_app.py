"""`watcher web` without a Consul: what is refused before Consul is asked, and the helpers.

What needs Consul (tokens, writes, reads) is tested against a real cluster in
tests/integration/test_web_api.py; here Consul's address answers nothing.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import re
import socket
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from tests.unit.test_ctl import a_record
from watcher import ids
from watcher.barrier import DeployView
from watcher.config import parse_config
from watcher.ctl_fleet import fleet_still_on
from watcher.errors import ConsulUnavailable, DeployRefused
from watcher.records import NodeProgress
from watcher.web import app as web_app
from watcher.web.app import (
    MAX_BODY,
    MAX_QUERY,
    SECURITY_HEADERS,
    SSE_MAX_PER_CALLER,
    SSE_MAX_STREAMS,
    SSE_RETRY_AFTER,
    WebState,
    _duration,
    _short_time,
    _timeline,
    check_root_path,
    create_app,
    host_name,
    is_loopback,
    same_origin,
)
from watcher.web.live import READ_BURST, READ_RATE, LiveFeed

LOCAL = "http://127.0.0.1:8710"
FLEET = "/api/v1/apps/web/fleet"
STATIC = Path(web_app.__file__).parent / "static"
DEPLOYS = "/api/v1/apps/web/deploys"
ABORT = "/api/v1/apps/web/deploys/20261202T224412Z-abcdef/abort"


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: connection refused


def local_client(root_path: str = "") -> Iterator[TestClient]:
    """A client of the app on a loopback bind whose Consul is never there."""
    config = parse_config(
        {
            "consul": {"address": dead_address(), "timeout": "1s"},
            "s3": {"bucket": "b"},
            "apps": {"web": {"root": "/srv"}},
        },
        env={},
    )
    # Consul is never there: each 503 waited out the product's 5 s retry budget (3.5 s a
    # request, ~70 s of the file). 1 s still tells a 401 that waits for Consul (over
    # the 0.5 s its test allows) from one that does not.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(web_app, "WEB_CONSUL_TIMEOUT", 1.0)
        # As a browser on this host would ask: for a loopback name (TestClient's default
        # Host, "testserver", is not one, and a loopback bind trusts only requests for one).
        page = create_app(config, listen_host="127.0.0.1", root_path=root_path)
        with TestClient(page, base_url=LOCAL) as c:
            yield c


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield from local_client()


class TestUnderARootPath:
    """Behind a proxy that serves the page under a path (the proxy review: its style
    sheet, script, links, live stream, writes and the slash's redirect all left it)."""

    @pytest.fixture(scope="class")
    @classmethod
    def under(cls) -> Iterator[TestClient]:
        yield from local_client("/ops/watcher/")

    def test_every_link_of_the_page_carries_the_path(self, under: TestClient) -> None:
        # what the proxy sends: the path after the prefix
        r = under.get("/apps/web")
        assert r.status_code in (200, 503), r.text  # this client's Consul is down
        html = r.text
        assert 'data-root="/ops/watcher"' in html
        assert re.search(r'href="/ops/watcher/static/style\.css\?v=\w+"', html), html
        assert re.search(r'src="/ops/watcher/static/app\.js\?v=\w+"', html), html
        assert 'href="/ops/watcher/apps/web"' in html
        assert 'href="/ops/watcher/openapi.json"' in html
        assert not re.search(r'(?:href|src)="/(?!ops/watcher/)', html), html
        assert under.get("/static/app.js").status_code == 200
        spec = under.get("/openapi.json").json()
        assert spec["servers"] == [{"url": "/ops/watcher"}]
        r = under.get("/apps/web/", follow_redirects=False)
        assert r.status_code == 308 and r.headers["location"] == "/ops/watcher/apps/web"
        error = under.get("/nope").json()["error"]
        assert error == (
            "no such path: '/ops/watcher/nope' (the API is under /ops/watcher/api/v1/, "
            "described at /ops/watcher/openapi.json; the page is /ops/watcher/ and "
            "/ops/watcher/apps/<app>)"
        )

    def test_a_path_that_still_carries_it_is_no_second_address(self, under: TestClient) -> None:
        """One page at two addresses stepped around a proxy's rule written for one of them
        (`/watcher/watcher/metrics` past a `location = /watcher/metrics` deny, the review)."""
        for path in ("/ops/watcher/metrics", "/ops/watcher/apps/web", "/ops/watcher"):
            r = under.get(path, follow_redirects=False)
            assert r.status_code == 404, (path, r.status_code)

    def test_the_script_asks_under_it(self) -> None:
        script = (Path(web_app.__file__).parent / "static" / "app.js").read_text()
        assert 'const root = body.dataset.root || "";' in script
        # every request the script makes: under the root, or the page's own location
        assert re.findall(r'(?:fetch|streamWithFetch)\(\s*"/', script) == []
        assert re.findall(r'= "/api/', script) == []

    @pytest.mark.parametrize(
        ("given", "root"), [("", ""), ("/", ""), ("/watcher", "/watcher"), ("/w/x/", "/w/x")]
    )
    def test_the_root_path_given(self, given: str, root: str) -> None:
        assert check_root_path(given) == root

    @pytest.mark.parametrize(
        ("given", "said"),
        [
            ("watcher", "is not a URL path like /watcher"),
            ("/a b", "is not a URL path"),
            ("/w/../x", "no '.' or '..' part"),
            ("//evil.example", "is not a URL path"),
            ("/w?x=1", "is not a URL path"),
            ("/api/x", "starts like this server's own paths (/api/...)"),
            ("/apps", "starts like this server's own paths"),
        ],
    )
    def test_a_root_path_that_cannot_be_one_is_said(self, given: str, said: str) -> None:
        with pytest.raises(ValueError, match=re.escape(said)):
            check_root_path(given)


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
        # refused outside the guard that adds them: the headers every answer carries
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        # A GET's body too, on every path: and the description says so of each operation.
        assert client.request("GET", "/healthz", content=body).status_code == 413
        spec = client.get("/openapi.json").json()
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                assert "413" in operation["responses"], (method, path)

    def test_the_anonymous_token_names_nobody(self, client: TestClient) -> None:
        for header in ({"Authorization": "Bearer anonymous"}, {"X-Consul-Token": "anonymous"}):
            r = client.get("/api/v1/apps/web/fleet", headers=header)
            assert r.status_code == 401 and "anonymous token" in r.json()["error"], r.text

    def test_a_crash_is_a_json_500_with_the_headers(
        self, client: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(WebState, "store", broken)
        r = client.get("/api/v1/apps/web/fleet")
        assert r.status_code == 500
        assert r.json() == {"error": "internal error (RuntimeError); the server's log has it"}
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"

    def test_a_malformed_authorization_header(self, client: TestClient) -> None:
        r = client.get("/api/v1/apps/web/fleet", headers={"Authorization": "Basic dXNlcjpw"})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]

    def test_a_401_names_its_scheme(self, client: TestClient) -> None:
        # RFC 9110 15.5.2: a 401 must carry WWW-Authenticate
        r = client.get(FLEET, headers={"Authorization": "Basic dXNlcjpw"})
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Bearer realm="release-watcher"'

    @pytest.mark.parametrize(
        "headers",
        [
            [("Authorization", "Bearer a-token"), ("X-Consul-Token", "another")],
            [("Authorization", "Bearer a-token"), ("Authorization", "Bearer another")],
            [("X-Consul-Token", "a-token"), ("X-Consul-Token", "a-token")],
        ],
    )
    def test_two_tokens_are_refused(
        self, client: TestClient, headers: list[tuple[str, str]]
    ) -> None:
        """Consul takes X-Consul-Token over Authorization, other servers the other way:
        which token acts would be a guess."""
        for path in (FLEET, DEPLOYS):
            write = path == DEPLOYS
            r = client.request(
                "POST" if write else "GET",
                path,
                headers=headers,
                json={"artifact": "main-1"} if write else None,
            )
            assert r.status_code == 400, (path, r.text)
            assert "carries 2 tokens" in r.json()["error"], r.text

    @pytest.mark.parametrize(
        ("body", "said"),
        [
            (b'{"artifact": "main-\xff"}', "not UTF-8 (byte 0xff at offset 19)"),
            ('{"artifact": "main-1"}'.encode("utf-16"), "not UTF-8 (byte 0xff at offset 0)"),
            # Without a BOM, UTF-16 of ASCII is valid UTF-8, and json.loads read it as UTF-16:
            # past the check of keys given twice (the second artifact was deployed).
            (
                '{"artifact": "main-1", "artifact": "main-2"}'.encode("utf-16-le"),
                "not UTF-8 (a NUL byte at offset 1: UTF-16 or UTF-32 text? JSON is sent as UTF-8)",
            ),
            (
                '{"artifact": NaN}'.encode("utf-32-be"),
                "not UTF-8 (a NUL byte at offset 0: UTF-16 or UTF-32 text? JSON is sent as UTF-8)",
            ),
            # Where a body does not parse (the sentence was cut at "starting at").
            (
                b'{"artifact": "main-1',
                "Unterminated string starting at: line 1 column 14 (character 13)",
            ),
            (b'{"artifact": NaN}', "NaN is not a JSON value"),
            (b'{"artifact": ' + b"1" * 4301 + b"}", "a number of more than 4300 digits"),
            (
                b'{"artifact": "main-1", "allow_missing": -Infinity}',
                "-Infinity is not a JSON value",
            ),
        ],
    )
    def test_what_json_is_not_is_a_400(self, client: TestClient, body: bytes, said: str) -> None:
        # RFC 8259: JSON between systems is UTF-8, and has no NaN; Python's parser takes
        # both, which read as "nested too deeply?" or a 422 that showed "got NaN"
        r = client.post(DEPLOYS, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == f"malformed JSON body: {said}"
        # a BOM before UTF-8 is still taken (it reaches Consul, which is not there)
        r = client.post(DEPLOYS, content=b'\xef\xbb\xbf{"artifact": "main-1"}')
        assert r.status_code == 503, r.text

    @pytest.mark.parametrize(
        ("method", "headers"),
        [
            # RFC 9112 3.2: the first Host made it local (served), whatever the second said
            ("GET", [("Host", "localhost"), ("Host", "evil.example")]),
            ("POST", [("Origin", "http://testserver"), ("Origin", "http://evil.example")]),
            ("POST", [("Content-Type", "application/json"), ("Content-Type", "text/plain")]),
            ("POST", [("X-Forwarded-Host", "a"), ("X-Forwarded-Host", "b")]),
        ],
    )
    def test_a_header_a_check_reads_given_twice_is_a_400(
        self, client: TestClient, method: str, headers: list[tuple[str, str]]
    ) -> None:
        path = DEPLOYS if method == "POST" else FLEET
        r = client.request(method, path, headers=headers, content=b'{"artifact": "main-1"}')
        assert r.status_code == 400, r.text
        name = headers[0][0].lower()
        assert r.json()["error"] == f"header {name} given more than once: give it once"

    @pytest.mark.parametrize("path", ["/api/v1/apps/web%2Frollbacks", "/api/v1/apps/web%2ffleet"])
    def test_an_encoded_slash_is_refused_not_routed(self, client: TestClient, path: str) -> None:
        """Routing reads the path decoded: `web%2Frollbacks` started a rollback (202)."""
        r = client.post(path, json={}) if "rollbacks" in path else client.get(path)
        assert r.status_code == 400, r.text
        assert "an encoded slash (%2F) in the path is refused" in r.json()["error"]

    def test_a_charset_other_than_utf8_is_a_415(self, client: TestClient) -> None:
        utf16 = '{"artifact": "main-1"}'.encode("utf-16")
        for charset, body in (("utf-16", utf16), ('"latin1"', b'{"artifact": "main-1"}')):
            ctype = f"application/json; charset={charset}"
            r = client.post(DEPLOYS, content=body, headers={"Content-Type": ctype})
            assert r.status_code == 415, r.text  # (the body's own 400 would hide why)
            assert "a write's body is JSON in UTF-8, got charset" in r.json()["error"], r.text
        for charset in ("UTF-8", "us-ascii"):  # ASCII is UTF-8
            ctype = f"application/json; charset={charset}"
            r = client.post(
                DEPLOYS, content=b'{"artifact": "main-1"}', headers={"Content-Type": ctype}
            )
            assert r.status_code == 503, r.text  # taken: Consul is not there
            assert r.headers["Retry-After"] == "5"  # a write's 503 says when too
        # A proxy that adds its own X-Forwarded-Host to a read: only writes read it (a
        # forwarded read needs a token: the 401, not the 400 of a header given twice).
        xfh = [("X-Forwarded-Host", "a"), ("X-Forwarded-Host", "b")]
        assert client.get(FLEET, headers=xfh).status_code == 401

    @pytest.mark.parametrize(
        ("target", "status"),
        [
            (b"http://127.0.0.1:8710/healthz", 200),
            (b"http://evil.example/api/v1/apps/web/fleet", 401),
        ],
    )
    def test_an_absolute_form_target_is_its_path_and_its_host(
        self, client: TestClient, target: bytes, status: int
    ) -> None:
        """RFC 9112 3.2.2: a server MUST accept `GET http://host/path`; the HTTP parser
        passes the whole URL on as the path, which was a 404 for `/http://...`. Its
        authority is the Host (not a local read for another name)."""
        import asyncio

        sent: list[dict[str, Any]] = []
        app = client.app

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": target.decode(),
            "raw_path": target,
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"localhost")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8710),
            "state": {},
        }
        asyncio.run(app(scope, receive, send))  # type: ignore[operator]
        # 200: routed by its path; 401: the Host header said localhost, the target another
        # name (a read by that header would be local: a 503, this client's Consul is down)
        assert sent[0]["status"] == status, sent

    def test_a_trailing_slash_is_no_redirect_built_from_host(self, client: TestClient) -> None:
        """Starlette's default answered /fleet/ with a 307 to http://<Host>/fleet (another
        site's name when the Host said so) and a POST was sent again."""
        evil = {"Host": "evil.example"}
        r = client.get(FLEET + "/", headers=evil, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers, r.headers
        assert f"without the trailing slash: '{FLEET}'" in r.json()["error"]
        r = client.post(DEPLOYS + "/", json={"artifact": "main-1"}, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers
        # the page typed with a slash: sent to it, as a path of this server
        r = client.get("/apps/web/", headers=evil, follow_redirects=False)
        assert r.status_code == 308 and r.headers["location"] == "/apps/web", r.headers
        # Only an app's name is sent on: what no app can be named is a 404 (it was a 500 for
        # a name the header cannot hold; then `..` went to `/apps/..`, which a client reads
        # as `/`, an escaped name came back escaped twice, and CR LF were dropped).
        for path in (
            "/apps/%E6%97%A5/",
            "/apps/a%0d%0aSet-Cookie:%20x=1/",
            "/apps/%2e%2e/",
            "/apps/%5C%5Cevil.example/",
        ):
            r = client.get(path, follow_redirects=False)
            assert r.status_code == 404 and "location" not in r.headers, (path, r.headers)
            assert "without the trailing slash" in r.json()["error"], r.text
        for other in ("/metrics/", "/healthz/", "/openapi.json/"):  # not pages: a 404
            r = client.get(other, follow_redirects=False)
            assert r.status_code == 404 and "location" not in r.headers, (other, r.headers)

    def test_unknown_route_and_app(self, client: TestClient) -> None:
        r = client.get("/api/v1/nothing")
        assert r.status_code == 404
        assert "no such path: '/api/v1/nothing' (the API is under /api/v1/" in r.json()["error"]
        r = client.get("/api/v1/apps/api/fleet")
        assert r.status_code == 404 and "apps.api: no such app" in r.json()["error"]
        # a browser's typo gets the page, saying so, not a JSON document; nothing streams
        r = client.get("/apps/api")
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        assert "apps.api: no such app" in r.text and 'data-app=""' in r.text
        assert "<title>error · release-watcher</title>" in r.text  # a tab, not " · ..."

    def test_wrong_types_name_the_field(self, client: TestClient) -> None:
        r = client.post("/api/v1/apps/web/deploys", json={"artifact": 5, "allow_missing": "x"})
        assert r.status_code == 422
        assert "artifact:" in r.json()["error"] and "allow_missing:" in r.json()["error"]
        # what each was given, in JSON's words
        assert "artifact: Input should be a valid string, got 5" in r.json()["error"]
        assert "allow_missing: Input should be a valid boolean, got 'x'" in r.json()["error"]
        # numbers shown short, and as written (the API review: 4,000 digits echoed whole,
        # 1e400 shown as Infinity)
        body = b'{"artifact": ' + b"7" * 4000 + b', "allow_missing": 1e400}'
        r = client.post(
            "/api/v1/apps/web/deploys", content=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 422, r.text
        assert "artifact: Input should be a valid string, got a number of 4000 digits" in r.text
        assert "allow_missing: Input should be a valid boolean, got a number beyond a float" in (
            r.text
        )
        r = client.post("/api/v1/apps/web/deploys", json=[{"artifact": "main-1"}])
        assert r.status_code == 422
        assert r.json()["error"] == (
            "body: must be a JSON object (got an array) with the fields: allow_missing, "
            "artifact, current"
        )
        r = client.post("/api/v1/apps/web/deploys", json={"allow_missing": True})
        assert r.json()["error"] == "artifact: Field required", r.text  # no "got an object"
        r = client.get("/api/v1/apps/web/deploys?limit=ten")
        assert r.status_code == 422 and r.json()["error"].startswith("limit: "), r.text
        assert r.json()["error"].endswith(", got 'ten'"), r.text
        for given in ("5.0", "+5", " 5", "5e0", "\u0665"):  # an integer's other spellings
            r = client.get("/api/v1/apps/web/deploys", params={"limit": given})
            assert r.status_code == 422, (given, r.text)
            assert r.json()["error"].startswith("limit: "), r.text
        r = client.get("/api/v1/apps/web/deploys?limit=5.0")  # was read as 5
        assert r.json()["error"] == (
            "limit: must be a whole number of deploys in digits, got '5.0'"
        ), r.text

    @pytest.mark.parametrize(
        ("path", "body", "named"),
        [
            # The review's case: a typo must not roll the fleet back to "previous".
            (
                "/api/v1/apps/web/rollbacks",
                {"relase": "20261203T052701Z-main-3bfc2695", "x": 1},
                [
                    "relase: unknown field",
                    "x: unknown field",
                    "takes: allow_missing, current, previous, release",
                ],
            ),
            (
                DEPLOYS,
                {"artifact": "main-1", "allow-missing": True},
                ["allow-missing: unknown field", "takes: allow_missing, artifact, current"],
            ),
            (ABORT, {"reasn": "typo"}, ["reasn: unknown field", "takes: reason"]),
        ],
    )
    def test_an_unknown_field_is_a_422_naming_it(
        self, client: TestClient, path: str, body: dict[str, object], named: list[str]
    ) -> None:
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        assert set(r.json()) == {"error"}
        for text in named:
            assert text in r.json()["error"], r.text

    @pytest.mark.parametrize(
        ("path", "body", "field"),
        [
            ("/api/v1/apps/web/rollbacks", {"allow_missing": "yes"}, "allow_missing"),
            ("/api/v1/apps/web/rollbacks", {"allow_missing": 1}, "allow_missing"),
            ("/api/v1/apps/web/rollbacks", {"allow_missing": "false"}, "allow_missing"),
            ("/api/v1/apps/web/rollbacks", {"release": 20261203}, "release"),
            (DEPLOYS, {"artifact": "main-1", "allow_missing": 0}, "allow_missing"),
            (DEPLOYS, {"artifact": "main-1", "allow_missing": None}, "allow_missing"),
            (DEPLOYS, {"artifact": 123}, "artifact"),
            (ABORT, {"reason": 5}, "reason"),
            (ABORT, {"reason": ["a"]}, "reason"),
        ],
    )
    def test_values_are_not_coerced(
        self, client: TestClient, path: str, body: dict[str, object], field: str
    ) -> None:
        # "yes", 1, "false": a JSON boolean or nothing; 20261203 is not a release name string.
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"].startswith(f"{field}: Input should be a valid"), r.text

    @pytest.mark.parametrize("release", ["yesterday", "20261399T000000Z-main-1"])
    def test_a_rollback_target_that_no_deploy_can_have_named_is_a_422(
        self, client: TestClient, release: str
    ) -> None:
        # Before any read: this client's Consul is down, so a read would answer 503.
        r = client.post("/api/v1/apps/web/rollbacks", json={"release": release})
        assert r.status_code == 422, r.text
        assert r.json()["error"].startswith(f"release: '{release}' is not a release name")
        if release[0].isdigit():  # it looks right: the message says what is wrong
            assert ": 20261399T000000Z is not a date and time" in r.json()["error"], r.text

    def test_consul_down_is_a_503_with_the_reason(self, client: TestClient) -> None:
        r = client.get("/api/v1/apps/web/fleet")
        assert r.status_code == 503 and "cannot reach Consul" in r.json()["error"]
        page = client.get("/apps/web")
        assert page.status_code == 503 and "cannot reach Consul" in page.text
        # when to ask again (it had none: a probe asked again at once)
        assert r.headers["Retry-After"] == page.headers["Retry-After"] == "5"
        assert client.head("/apps/web").headers["Retry-After"] == "5"

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
        # OpenAPI wants each operationId once: client generators refuse a duplicate.
        ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
        assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
        # short, as a generated client names its calls by them
        assert sorted(ids) == [
            "get_builds",
            "get_deploy",
            "get_fleet",
            "get_history",
            "healthz",
            "list_apps",
            "live",
            "metrics",
            "post_abort",
            "post_deploy",
            "post_rollback",
        ]
        assert client.head("/healthz").status_code == 200

    def test_the_openapi_says_how_to_authenticate_and_what_a_body_may_hold(
        self, client: TestClient
    ) -> None:
        """The conformance review: no security scheme (a generated client or Swagger's
        Authorize cannot send the token), and two bodies schemathesis built from the
        description, valid there, that the server refuses (a control character in a
        reason; release and previous together)."""
        spec = client.get("/openapi.json").json()
        schemes = spec["components"]["securitySchemes"]
        assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
        assert (schemes["consulToken"]["in"], schemes["consulToken"]["name"]) == (
            "header",
            "X-Consul-Token",
        )
        for path, ops in spec["paths"].items():
            for op in ops.values():
                wanted = [{"bearer": []}, {"consulToken": []}, {}] if "/api/" in path else []
                assert op["security"] == wanted, path
        bodies = spec["components"]["schemas"]
        reason = bodies["AbortBody"]["properties"]["reason"]["pattern"]
        assert re.search(reason, "wrong build\tsee #ops") and not re.search(reason, "8\x07")
        both = {"release": "20261203T000000Z-main-1", "previous": "20261203T000000Z-main-2"}
        assert bodies["RollbackBody"]["not"]["required"] == sorted(both, reverse=True)
        r = client.post("/api/v1/apps/web/rollbacks", json=both)
        assert r.status_code == 422 and "not both" in r.json()["error"], r.text
        live = spec["paths"]["/api/v1/apps/{app}/live"]["get"]["responses"]
        assert list(live["200"]["content"]) == ["text/event-stream"] and "429" in live


LONG_QUERY = {f"n{i}": "1" for i in range(MAX_QUERY // 4)}  # over MAX_QUERY bytes


class TestTheDescriptionTellsTheTruth:
    """What /openapi.json promises is what the routes answer: every error a client can get
    is listed for its operation with its body ({"error": ...}), and the parameters carry the
    rules the routes apply. (A schemathesis run against the demo found each of these
    missing: docs/web.md.)"""

    # (method, path, operation, request keywords, status): answers that need no Consul.
    CASES = [
        ("GET", "/api/v1/apps/web/fleet?consul_token=x", "/api/v1/apps/{app}/fleet", {}, 400),
        ("GET", "/healthz?token=x", "/healthz", {}, 400),
        ("GET", "/metrics?token=x", "/metrics", {}, 400),
        ("GET", "/api/v1/apps/nope/fleet", "/api/v1/apps/{app}/fleet", {}, 404),
        ("GET", "/api/v1/apps/web/deploys?limit=0", "/api/v1/apps/{app}/deploys", {}, 422),
        ("GET", "/api/v1/apps/web/deploys?limit=5&limit=6", "/api/v1/apps/{app}/deploys", {}, 400),
        ("GET", "/api/v1/apps/web/deploys?limt=5", "/api/v1/apps/{app}/deploys", {}, 400),
        ("GET", "/api/v1/apps/web/deploys/-x", "/api/v1/apps/{app}/deploys/{deploy_id}", {}, 422),
        ("GET", "/api/v1/apps/web/fleet", "/api/v1/apps/{app}/fleet", {}, 503),
        ("GET", "/api/v1/apps/web/builds", "/api/v1/apps/{app}/builds", {}, 503),
        (
            "GET",
            "/api/v1/apps/web/fleet",
            "/api/v1/apps/{app}/fleet",
            {"headers": {"Authorization": "Basic eA=="}},
            401,
        ),
        (
            "POST",
            DEPLOYS,
            "/api/v1/apps/{app}/deploys",
            {"content": b"\x00", "headers": {"Content-Type": "application/json"}},
            400,
        ),
        ("POST", DEPLOYS, "/api/v1/apps/{app}/deploys", {"json": {"artifact": ""}}, 422),
        (
            "POST",
            DEPLOYS,
            "/api/v1/apps/{app}/deploys",
            {"json": {"artifact": "a"}, "headers": {"Origin": "https://evil.example"}},
            403,
        ),
        (
            "POST",
            DEPLOYS,
            "/api/v1/apps/{app}/deploys",
            {"content": b"artifact=a", "headers": {"Content-Type": "text/plain"}},
            415,
        ),
        (
            "POST",
            DEPLOYS,
            "/api/v1/apps/{app}/deploys",
            {"content": b" " * (MAX_BODY + 1)},
            413,
        ),
        ("POST", "/api/v1/apps/web/rollbacks", "/api/v1/apps/{app}/rollbacks", {"json": {}}, 503),
        ("POST", ABORT, "/api/v1/apps/{app}/deploys/{deploy_id}/abort", {"json": {}}, 503),
        ("GET", "/api/v1/apps/web/fleet", "/api/v1/apps/{app}/fleet", {"params": LONG_QUERY}, 414),
        ("POST", DEPLOYS, "/api/v1/apps/{app}/deploys", {"params": LONG_QUERY}, 414),
        ("GET", "/api/v1/apps", "/api/v1/apps", {"params": LONG_QUERY}, 414),
        ("GET", "/healthz", "/healthz", {"params": LONG_QUERY}, 414),
        ("GET", "/metrics", "/metrics", {"params": LONG_QUERY}, 414),
    ]

    def test_every_operation_lists_the_414_that_every_path_answers(
        self, client: TestClient
    ) -> None:
        # (the web review found /api/v1/apps, /healthz and /metrics without it)
        spec = client.get("/openapi.json").json()
        missing = [
            f"{method.upper()} {path}"
            for path, operations in spec["paths"].items()
            for method, operation in operations.items()
            if "414" not in operation["responses"]
        ]
        assert missing == []

    @pytest.mark.parametrize(("method", "url", "operation", "kw", "status"), CASES)
    def test_each_error_is_documented_for_its_operation(
        self,
        client: TestClient,
        method: str,
        url: str,
        operation: str,
        kw: dict[str, object],
        status: int,
    ) -> None:
        r = client.request(method, url, **kw)  # type: ignore[arg-type]
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and r.json()["error"]
        spec = client.get("/openapi.json").json()
        documented = spec["paths"][operation][method.lower()]["responses"]
        assert str(status) in documented, f"{method} {operation}: {status} not documented"
        schema = documented[str(status)]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}

    def test_a_query_parameter_twice_or_unknown_is_refused_by_name(
        self, client: TestClient
    ) -> None:
        # Either would otherwise answer as if read: one of the two limits, or the default.
        r = client.get("/api/v1/apps/web/deploys?limit=5&limit=500")
        assert r.status_code == 400
        assert r.json()["error"] == "query parameter 'limit' given more than once: give it once"
        r = client.get("/api/v1/apps/web/deploys?limt=5")
        assert r.status_code == 400
        assert r.json()["error"] == "unknown query parameter 'limt' (this endpoint takes limit)"
        # Nor elsewhere (`/builds?limit=5` answered 30 rows, as if read), HEAD included.
        for method in ("GET", "HEAD"):
            r = client.request(method, "/api/v1/apps/web/builds?limit=5")
            assert r.status_code == 400, r
        r = client.get("/api/v1/apps/web/builds?limit=5")
        said = "unknown query parameter 'limit' (this endpoint takes no query parameter)"
        assert r.json()["error"] == said
        r = client.post("/api/v1/apps/web/deploys?dry_run=1", json={"artifact": "main-1"})
        assert r.status_code == 400 and "'dry_run'" in r.json()["error"], r.text
        # The page and the plain endpoints are not the API: a cache-buster there is taken.
        assert client.get("/healthz?_=1").status_code == 200
        # A path no route has is its 404, naming the path (not "this endpoint takes").
        r = client.get("/api/v1/apps/web/deploys/?limit=5")
        assert r.status_code == 404 and "without the trailing slash" in r.json()["error"], r.text
        r = client.get("/api/v1/apps/web/fleet?x=1&x=2")
        assert r.status_code == 400 and "'x' given more than once" in r.json()["error"]
        # the second of many, each a distinct name but the last
        names = "&".join(f"n{i}=1" for i in range(150))
        r = client.get(f"/api/v1/apps/web/fleet?{names}&n7=2")
        assert r.status_code == 400 and "'n7' given more than once" in r.json()["error"]

    @pytest.mark.parametrize("path", ["/api/v1/apps/web/fleet", "/apps/web", "/nowhere"])
    def test_a_long_query_string_is_refused_before_it_is_read(
        self, client: TestClient, path: str
    ) -> None:
        """The DoS review: 33,000 names in 128 kB held the event loop for 13 s (the check
        for a name given twice was quadratic), on any path, before any token was asked."""
        r = client.get(f"{path}?{'a' * MAX_QUERY}")
        assert r.status_code != 414  # at the limit: read as usual
        r = client.get(f"{path}?{'&'.join(f'n{i}=1' for i in range(MAX_QUERY))}")
        assert r.status_code == 414
        assert r.json()["error"] == (
            f"a query string over {MAX_QUERY} bytes is refused (the API takes `limit`)"
        )

    def test_a_static_file_says_which_methods_it_takes(self, client: TestClient) -> None:
        for method in ("POST", "DELETE"):
            for path in ("/static/app.js", "/static/nope"):
                r = client.request(method, path)
                assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", r.headers
                assert r.json()["error"].endswith("(it takes: GET, HEAD)")

    def test_the_page_names_its_script_and_style_by_content(self, client: TestClient) -> None:
        # After an upgrade a browser that cached app.js (heuristically: no Cache-Control
        # there) ran the old script against the new page; a new file is a new URL.
        page = client.get("/apps/web", headers={"Host": "127.0.0.1:8710"}).text
        urls = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
        assert sorted(u.split("?")[0] for u in urls) == ["/static/app.js", "/static/style.css"]
        for url in urls:
            name = url.split("?")[0].rsplit("/", 1)[1]
            digest = hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:12]
            assert url.endswith(f"?v={digest}")
            assert client.get(url).status_code == 200

    def test_an_unknown_app_name_is_shown_escaped(self, client: TestClient) -> None:
        # The JSON carried a raw U+202E (right-to-left override) to terminals and logs.
        r = client.get("/api/v1/apps/%E2%80%AE/fleet")
        error = r.json()["error"]
        assert r.status_code == 404 and "\u202e" not in error, error
        assert error == "no such app: '\\u202e' (configured: web)"
        r = client.get("/api/v1/apps/nope/fleet")
        assert r.json()["error"].startswith("apps.nope: no such app")

    def test_two_tokens_are_named_as_they_came(self, client: TestClient) -> None:
        cases = [
            ([("Authorization", "Bearer a"), ("Authorization", "Bearer b")], "2 Authorization"),
            ([("X-Consul-Token", "a"), ("X-Consul-Token", "b")], "2 X-Consul-Token"),
            ([("Authorization", "Bearer a"), ("X-Consul-Token", "b")], "Authorization and X"),
        ]
        for headers, said in cases:
            r = client.get(FLEET, headers=headers)
            assert r.status_code == 400 and said in r.json()["error"], r.text

    def test_healthz_answers_head(self, client: TestClient) -> None:
        r = client.head("/healthz")
        assert r.status_code == 200 and r.content == b""

    def test_every_get_answers_head_as_a_get_would(self, client: TestClient) -> None:
        gets = [
            r.path
            for r in client.app.routes  # type: ignore[attr-defined]
            if isinstance(r, APIRoute) and "GET" in r.methods and r.include_in_schema
        ]  # the page's routes are tested in tests/integration/test_web_api.py
        assert "/api/v1/apps/{app}/fleet" in gets
        # An unknown app is answered before Consul is asked; the real cluster's 200s are
        # tests/integration/test_web_api.py's. Here Consul is dead: a GET's 503 is
        # test_consul_down_is_a_503_with_the_reason's, a HEAD's is below.
        urls = [p.replace("{deploy_id}", "20261202T224412Z-abcdef") for p in gets]
        urls = [u.replace("{app}", "nope") for u in urls]
        for url in sorted(set(urls)):
            head = client.head(url)
            got = client.get(url)
            assert head.status_code == got.status_code, (url, head, got)
            assert head.content == b"", url
        assert client.head("/api/v1/apps/web/fleet").status_code == 503

    def test_the_live_stream_answers_head_without_taking_a_slot(self, client: TestClient) -> None:
        """`curl -I` of the live stream was a 405. Its HEAD says what a GET would start
        (a stream), with no body, and takes none of the caller's stream slots: more HEADs
        than a caller may hold streams all answer."""
        for _ in range(SSE_MAX_PER_CALLER + 5):
            head = client.head("/api/v1/apps/web/live")
            assert head.status_code == 200, head.text
            assert head.headers["content-type"].startswith("text/event-stream")
            assert head.headers["cache-control"] == "no-store" and head.content == b""
            # a GET streams with no length: the HEAD does not claim an empty one
            assert "content-length" not in head.headers, head.headers
        assert client.head("/api/v1/apps/nope/live").status_code == 404

    @pytest.mark.parametrize(
        ("body", "status", "says"),
        [
            (b'{"artifact": "main-1"}', 503, "unreachable"),  # read as JSON, then Consul
            (b"{bad", 400, "malformed JSON body"),
            (
                b"",
                400,
                "malformed JSON body: empty; the body is a JSON object with the fields: "
                "allow_missing, artifact, current",
            ),
            (b'{"artifact": ""}', 422, "artifact: '' (empty) is not an artifact id"),
            # deeper than Python's json takes (RecursionError), within MAX_BODY
            (b"[" * 5000 + b"]" * 5000, 400, "malformed JSON body: it does not parse"),
            # JSON keeps the last of two: this deployed main-2. Ambiguous: refused.
            (
                b'{"artifact": "main-1", "artifact": "main-2"}',
                400,
                "malformed JSON body: 'artifact' given twice",
            ),
        ],
    )
    def test_a_write_without_a_content_type_is_read_as_json(
        self, client: TestClient, body: bytes, status: int, says: str
    ) -> None:
        r = client.post(DEPLOYS, content=body)
        assert "content-type" not in r.request.headers
        assert r.status_code == status, r.text
        assert says in r.json()["error"], r.text

    def test_the_parameters_carry_the_rules(self, client: TestClient) -> None:
        spec = client.get("/openapi.json").json()
        params = {
            (path, p["name"]): p["schema"]
            for path, ops in spec["paths"].items()
            for op in ops.values()
            for p in op.get("parameters", ())
        }
        apps = [
            p["schema"]
            for ops in spec["paths"].values()
            for op in ops.values()
            for p in op.get("parameters", ())
            if p["name"] == "app"
        ]
        assert len(apps) == 8 and all(s["enum"] == ["web"] for s in apps)
        deploy_id = params[("/api/v1/apps/{app}/deploys/{deploy_id}", "deploy_id")]
        assert deploy_id["pattern"] == f"^{ids.DEPLOY_ID_PATTERN}$"
        limit = params[("/api/v1/apps/{app}/deploys", "limit")]
        assert (limit["minimum"], limit["maximum"]) == (1, 200)
        bodies = spec["components"]["schemas"]
        assert bodies["DeployBody"]["properties"]["artifact"]["pattern"] == (
            f"^{ids.ARTIFACT_ID_PATTERN}$"
        )
        for field in ("release", "previous"):  # a time that exists (check_release_input)
            assert bodies["RollbackBody"]["properties"][field]["pattern"] == (
                f"^{ids.RELEASE_INPUT_PATTERN}$"
            )

    @pytest.mark.parametrize(
        ("method", "path", "allow"),
        [
            ("PUT", DEPLOYS, "GET, HEAD, POST"),
            ("DELETE", "/api/v1/apps/web/fleet", "GET, HEAD"),
            ("POST", "/api/v1/apps/web/live", "GET, HEAD"),
            ("GET", ABORT, "POST"),
            ("TRACE", "/healthz", "GET, HEAD"),
        ],
    )
    def test_a_method_the_path_does_not_take_names_those_it_does(
        self, client: TestClient, method: str, path: str, allow: str
    ) -> None:
        r = client.request(method, path)
        assert r.status_code == 405
        assert r.headers["allow"] == allow
        if method != "HEAD":
            assert r.json()["error"] == (
                f"{method} is not allowed on '{path}' (it takes: {allow})"
            ), r.text


class TestWhoIsLocal:
    """A loopback bind trusts a request only when it came straight from this host to a
    loopback name: what reaches Consul (here a 503: nothing answers) was trusted."""

    @pytest.mark.parametrize(
        "host", ["127.0.0.1:8710", "localhost:8710", "[::1]:8710", "127.0.0.1"]
    )
    def test_loopback_names_are_trusted(self, client: TestClient, host: str) -> None:
        # /api/v1/apps checks who may read, then answers without Consul.
        r = client.get("/api/v1/apps", headers={"Host": host})
        assert r.status_code == 200 and r.json() == {"apps": ["web"]}, r.text

    @pytest.mark.parametrize("host", ["attacker.example:8710", "attacker.example", "192.0.2.1"])
    def test_a_rebound_name_is_not(self, client: TestClient, host: str) -> None:
        # A page whose own name now resolves to 127.0.0.1 still sends its own name.
        assert client.get("/api/v1/apps", headers={"Host": host}).status_code == 401
        r = client.get(FLEET, headers={"Host": host})
        assert r.status_code == 401, r.text
        assert "not addressed to a loopback name" in r.json()["error"]
        page = client.get("/apps/web", headers={"Host": host})
        assert page.status_code == 401 and "A token is needed" in page.text
        assert page.headers["www-authenticate"] == 'Bearer realm="release-watcher"'
        assert 'data-needs-token="yes"' in page.text
        r = client.post(
            "/api/v1/apps/web/deploys", json={"artifact": "main-1"}, headers={"Host": host}
        )
        assert r.status_code == 401 and "needs your Consul ACL token" in r.json()["error"]
        assert client.get("/api/v1/apps/web/live", headers={"Host": host}).status_code == 401

    def test_without_a_token_the_401_does_not_wait_for_consul(self, client: TestClient) -> None:
        # Consul not answering since the start (ACLs unknown): a probe of them first made
        # each request from the network wait out Consul's retries (3.5 s) for the same 401.
        for method, path in (("GET", FLEET), ("HEAD", "/"), ("GET", "/apps/web")):
            started = time.monotonic()
            r = client.request(method, path, headers={"Host": "attacker.example"})
            assert r.status_code == 401, (path, r.text)
            # under the fixture's 1 s Consul timeout, which a 401 that asks Consul takes
            assert time.monotonic() - started < 0.9, path

    @pytest.mark.parametrize(
        "header", ["X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Host"]
    )
    def test_a_proxied_request_is_not(self, client: TestClient, header: str) -> None:
        r = client.get(FLEET, headers={header: "for=192.0.2.7"})
        assert r.status_code == 401 and "through a proxy" in r.json()["error"]

    def test_a_write_from_another_origin_is_refused_before_anything(
        self, client: TestClient
    ) -> None:
        for path, body in (
            ("/api/v1/apps/web/deploys", {"artifact": "main-1"}),
            ("/api/v1/apps/web/deploys/20261202T224412Z-abcdef/abort", None),
        ):
            r = client.post(path, json=body, headers={"Origin": "http://evil.example"})
            assert r.status_code == 403 and "another origin" in r.json()["error"], r.text
            r = client.post(path, json=body, headers={"Origin": "null"})
            assert r.status_code == 403
        # The page's own origin goes on (to Consul, which does not answer here).
        r = client.post(
            "/api/v1/apps/web/deploys",
            json={"artifact": "main-1"},
            headers={"Origin": "http://127.0.0.1:8710"},
        )
        assert r.status_code == 503, r.text

    def test_a_form_post_is_refused(self, client: TestClient) -> None:
        # A plain HTML form can post without CORS; the API takes JSON only.
        r = client.post(
            "/api/v1/apps/web/deploys/20261202T224412Z-abcdef/abort",
            content=b"",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 415 and "application/json" in r.json()["error"]

    def test_every_answer_refuses_framing(self, client: TestClient) -> None:
        for path in ("/healthz", "/api/v1/apps", FLEET, "/nowhere"):
            r = client.get(path, headers={"Host": "elsewhere.example"})
            for name, value in SECURITY_HEADERS.items():
                assert r.headers.get(name) == value, (path, name)

    def test_nothing_read_with_a_token_is_kept_in_a_cache(self, client: TestClient) -> None:
        for path in ("/apps/web", "/api/v1/apps", FLEET, "/healthz", "/nowhere"):
            r = client.get(path, headers={"Authorization": "Bearer x"})
            assert r.headers.get("cache-control") == "no-store", (path, r.headers)
        assert client.get("/static/app.js").headers.get("cache-control") != "no-store"
        csp = SECURITY_HEADERS["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp

    @pytest.mark.parametrize(
        ("token", "said"),
        [
            ("a\x01b", "holds the character '\\x01'"),
            ("tok en", "holds a space"),
            ("x" * 300, "is 300 characters, over 256"),
            ("caf\xe9", "holds the character"),
        ],
    )
    def test_a_malformed_token_is_the_callers_401(
        self, client: TestClient, token: str, said: str
    ) -> None:
        """Not Consul's 400 as a 502: the header never reaches Consul; the answer says what
        is wrong with it (a short token with a space is not "too long")."""
        for headers in ({"X-Consul-Token": token}, {"Authorization": f"Bearer {token}"}):
            try:
                r = client.get("/api/v1/apps", headers=headers)
            except UnicodeEncodeError:
                continue  # the client itself cannot send a non-ASCII header
            assert r.status_code == 401, (headers, r.text)
            assert said in r.json()["error"], r.json()

    def test_odd_methods_share_one_metric_label(self, client: TestClient) -> None:
        for i in range(5):
            client.request(f"FOO{i}", "/healthz")
        metrics = client.get("/metrics").text
        assert 'method="other"' in metrics and "FOO" not in metrics

    def test_a_refused_request_is_counted_under_its_route(self, client: TestClient) -> None:
        # Refused before routing (another origin, not JSON, a token in the URL): still the
        # route it was for, so a dashboard sees which door is being knocked on.
        client.post(DEPLOYS, content=b"{}", headers={"Origin": "http://evil.example"})
        client.post(ABORT, content=b"x", headers={"Content-Type": "text/plain"})
        client.get(FLEET, params={"token": "x"})
        client.get("/nowhere", params={"token": "x"})
        client.get("/openapi.json")  # answered, but no API route sets scope["route"]
        client.get("/static/app.js")  # the page's files: one label for the mount
        client.head("/static/style.css")
        client.get("/static/nope.js")
        metrics = client.get("/metrics").text
        for route, method, status in (
            ("/api/v1/apps/{app}/deploys", "POST", 403),
            ("/api/v1/apps/{app}/deploys/{deploy_id}/abort", "POST", 415),
            ("/api/v1/apps/{app}/fleet", "GET", 400),
            ("<unmatched>", "GET", 400),
            ("/openapi.json", "GET", 200),
            ("/static", "GET", 200),
            ("/static", "HEAD", 200),
            ("/static", "GET", 404),
        ):
            label = f'method="{method}",route="{route}",status="{status}"'
            assert f"watcher_web_requests_total{{{label}}}" in metrics, (label, metrics)

    def test_live_streams_are_capped(self, client: TestClient) -> None:
        state = client.app.state.web  # type: ignore[attr-defined]
        state.streams = SSE_MAX_STREAMS
        try:
            r = client.get("/api/v1/apps/web/live")
            assert r.status_code == 503 and "live streams are open" in r.json()["error"]
            assert r.headers["retry-after"] == str(SSE_RETRY_AFTER)
        finally:
            state.streams = 0

    def test_one_caller_cannot_take_every_live_stream(self, client: TestClient) -> None:
        """This host's callers without a token hold at most SSE_MAX_PER_CALLER streams,
        far fewer than the server's cap: one more is refused, saying whose they are."""
        state = client.app.state.web  # type: ignore[attr-defined]
        assert SSE_MAX_PER_CALLER < SSE_MAX_STREAMS
        state.streams_of["local"] = SSE_MAX_PER_CALLER
        try:
            r = client.get("/api/v1/apps/web/live")
            # 429: this caller's limit (RFC 6585), not the server's; told when to retry
            assert r.status_code == 429, r.text
            assert "live streams of this caller are open" in r.json()["error"]
            assert r.headers["retry-after"] == str(SSE_RETRY_AFTER)
            # Its HEAD says what the GET would get (it answered 200, the operator review).
            head = client.head("/api/v1/apps/web/live")
            assert head.status_code == 429 and head.headers["retry-after"] == str(SSE_RETRY_AFTER)
        finally:
            state.streams_of.clear()
        with client.stream("GET", "/api/v1/apps/web/live") as r:  # below it: served
            assert r.status_code == 200

    def test_a_proxy_that_rewrites_host_keeps_the_pages_own_writes(
        self, client: TestClient
    ) -> None:
        # nginx sends Host: <upstream> by default; the browser's name is X-Forwarded-Host.
        headers = {
            "Host": "127.0.0.1:8710",
            "X-Forwarded-Host": "deploy.example.com",
            "Origin": "https://deploy.example.com",
        }
        r = client.post("/api/v1/apps/web/deploys", json={"artifact": "main-1"}, headers=headers)
        assert r.status_code == 401, r.text  # past the origin check; proxied, so a token
        headers["Origin"] = "https://evil.example"
        r = client.post("/api/v1/apps/web/deploys", json={"artifact": "main-1"}, headers=headers)
        assert r.status_code == 403 and "another origin" in r.json()["error"]

    def test_a_closed_stream_gives_its_slot_back(self, client: TestClient) -> None:
        state = client.app.state.web  # type: ignore[attr-defined]
        assert state.streams == 0
        for _ in range(3):
            with client.stream("GET", "/api/v1/apps/web/live") as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(lines) == "retry: 2000"
                assert state.streams == 1
        for _ in range(100):
            if state.streams == 0:
                break
            gc.collect()
            time.sleep(0.05)
        assert state.streams == 0 and state.streams_of == {}

    def test_a_stopping_server_ends_its_streams_properly(self, client: TestClient) -> None:
        """The conformance review: on SIGTERM uvicorn waits 3 s for open connections, and
        a stream never ends by itself, so it was cut in the middle of its chunked body
        (httpx-sse: "incomplete chunked read"). Told to stop, each stream ends."""
        state = client.app.state.web  # type: ignore[attr-defined]
        rest: list[str] = []
        try:
            with client.stream("GET", "/api/v1/apps/web/live") as r:
                lines = r.iter_lines()
                assert next(lines) == "retry: 2000"
                reader = threading.Thread(target=lambda: rest.extend(lines), daemon=True)
                reader.start()
                time.sleep(0.2)
                assert reader.is_alive()  # an open stream: it would wait for the next event
                state.close_streams()
                reader.join(10)
                assert not reader.is_alive(), "the stream did not end"
        finally:
            state.closing = False

    def test_host_and_origin_parsing(self) -> None:
        assert host_name("[::1]:8710") == "::1" and host_name("LocalHost:80") == "localhost"
        assert host_name("127.0.0.1") == "127.0.0.1" and host_name("") == ""
        for odd in ("127.0.0.1:8710@evil.example", "127.0.0.1 x", "[::1", "127.0.0.1:80:80"):
            assert host_name(odd) == "", odd
        assert same_origin("http://127.0.0.1:8710", "127.0.0.1:8710")
        assert same_origin("https://web.example", "WEB.example")
        assert not same_origin("http://127.0.0.1:8711", "127.0.0.1:8710")
        assert not same_origin("null", "127.0.0.1:8710")
        assert not same_origin("file://x", "x")


class _Blocking:
    """A Consul whose blocking queries fail while reads answer (e.g. a token without list)."""

    def __init__(self) -> None:
        self.blocking_calls = 0

    def kv_keys_blocking(self, prefix: str, index: int, wait: float) -> tuple[int, None]:
        self.blocking_calls += 1
        raise ConsulUnavailable("blocking query refused")


class _Changing:
    """A Consul where something changes all the time (a host rewriting its own record)."""

    def __init__(self) -> None:
        self.index = 0

    def kv_keys_blocking(self, prefix: str, index: int, wait: float) -> tuple[int, None]:
        self.index += 1
        return self.index, None


class _Store:
    def __init__(self, consul: object | None = None) -> None:
        self.consul = consul or _Blocking()
        self.keys = type("Keys", (), {"inflight": "w/web/inflight", "base": "w/web"})()


class TestLiveFeed:
    def test_a_failing_blocking_query_backs_off(self) -> None:
        store = _Store()
        reads = []

        def read(_: object) -> dict[str, object]:
            reads.append(1)
            return {"app": "web", "inflight": None, "n": len(reads)}

        feed = LiveFeed("web", store, read)  # type: ignore[arg-type]

        async def watch() -> None:
            feed.subscribe()
            await asyncio.sleep(1.2)

        asyncio.run(watch())
        feed.stop()
        # 0.5 s then 1 s of back-off: 2 or 3 rounds, not a tight loop of reads.
        assert 1 <= store.consul.blocking_calls <= 3, store.consul.blocking_calls
        assert (
            len(reads) == store.consul.blocking_calls
            or len(reads) == store.consul.blocking_calls + 1
        )

    def test_changes_without_pause_are_read_at_a_bounded_rate(self) -> None:
        """Each read makes a snapshot, and a snapshot whose sections changed makes every
        open page fetch itself again: a key that changes without pause (any host's token
        can rewrite its own record) is read READ_BURST times at once, then at READ_RATE."""
        consul = _Changing()
        reads: list[float] = []

        def read(_: object) -> dict[str, object]:
            reads.append(time.monotonic())
            return {"app": "web", "inflight": None, "n": len(reads)}

        feed = LiveFeed("web", _Store(consul), read)  # type: ignore[arg-type]

        async def watch() -> float:
            started = time.monotonic()
            queue = feed.subscribe()
            await asyncio.wait_for(queue.get(), 5)
            await asyncio.sleep(1.5)
            return time.monotonic() - started

        took = asyncio.run(watch())
        feed.stop()
        paced = reads[READ_BURST:]
        assert len(paced) >= 3 and consul.index >= READ_BURST, reads
        # The rate, not each gap: a wait that overslept (a loaded machine) is made up by a
        # shorter next one, and the gaps' sum telescopes to the paced reads' count.
        mean = (paced[-1] - paced[0]) / (len(paced) - 1)
        assert mean >= 0.9 / READ_RATE, [b - a for a, b in itertools.pairwise(paced)]
        assert len(reads) <= READ_BURST + READ_RATE * took + 1, (len(reads), took)

    def test_a_failing_read_is_said_and_the_feed_recovers_by_itself(self) -> None:
        """A read that raises (a reader's bug, a record no parser refused) is told to the
        open pages and retried: once it reads again, the same subscription gets the
        snapshot (the feed used to end, leaving open pages on a dead feed)."""
        store = _Store()
        calls = []

        def read(_: object) -> dict[str, object]:
            calls.append(1)
            if len(calls) <= 2:
                raise ValueError("a bug in a template")
            return {"app": "web", "inflight": None, "consul": {"ok": True, "error": ""}}

        feed = LiveFeed("web", store, read)  # type: ignore[arg-type]

        async def watch() -> tuple[str, dict[str, object]]:
            queue = feed.subscribe()
            first = await asyncio.wait_for(queue.get(), 5)
            later = await asyncio.wait_for(queue.get(), 10)
            return str(first.snapshot["consul"]["error"]), later.snapshot

        error, later = asyncio.run(watch())
        feed.stop()
        assert "live view failed" in error and "a bug in a template" in error
        assert later["consul"] == {"ok": True, "error": ""}, later
        assert len(calls) >= 3


class TestHelpers:
    def test_the_fleets_release_as_the_caller_saw_it(self) -> None:
        """``current`` of a deploy or rollback: the release the page showed, ``""`` for
        none yet (a fleet's first deploy); what it is now decides, and only a release
        named is checked again in the start's txn (an operator's token may not ask
        Consul's check-not-exists of `current`)."""

        def store(release: str | None, index: int) -> Any:
            now = None if release is None else types.SimpleNamespace(release=release)
            return types.SimpleNamespace(app="web", current=lambda: (now, index))

        assert fleet_still_on(store(None, 0), "") is None
        assert fleet_still_on(store("r1", 7), "r1") == 7
        for (release, index), seen, said in (
            (("r1", 7), "", "now r1, not none yet"),
            ((None, 0), "r1", "now none yet, not r1"),
            ((None, 9), "", "now unreadable, not none yet"),  # there, and does not parse
            (("r2", 8), "r1", "now r2, not r1"),
        ):
            with pytest.raises(DeployRefused, match=f"the fleet's release is {said}: the fleet"):
                fleet_still_on(store(release, index), seen)

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

    def test_duration_of_an_abort_ends_at_its_decision(self) -> None:
        # Hosts that stopped staging for another host's failure have no later timing.
        deploy = {
            "requested_at": "2026-12-01T21:13:55Z",
            "hosts": {"h1": {"staging_at": "2026-12-01T21:13:55.1Z"}, "h2": {}},
            "decision": {"outcome": "abort", "at": "2026-12-01T21:14:00Z"},
            "result": "aborted",
        }
        assert _duration(deploy) == "5.0s"
        refused = {**deploy, "hosts": {}, "result": "refused"}
        assert _duration(refused) == "5.0s"


def test_a_committed_deploy_no_watcher_ends_is_said_on_the_page(client: TestClient) -> None:
    """The page says what `status --fleet` says (NOT ENDED): a committed deploy still in
    flight well past its apply deadline, and which watchers end it."""
    record = a_record(["host-1", "host-2"])  # apply deadline 2026-01-01 00:20
    ready = {
        n: NodeProgress(node=n, state="ready", digest=record.digest()) for n in record.expected
    }
    view = DeployView(record, None, ready, {}, None, None)
    store = types.SimpleNamespace(
        app="web", inflight=lambda: (record.id, 7), history=lambda: [], view=lambda _: view
    )

    snap = web_app.live_snapshot(store)  # type: ignore[arg-type]
    html = client.app.state.templates.get_template("_live.html").render(  # type: ignore[attr-defined]
        app="web", live=snap, loopback=True
    )

    assert snap["deploy"]["not_ended"] == ["host-1", "host-2"]
    assert (
        f"Deploy {record.id} is committed and still in flight past its apply deadline: no "
        "watcher of web has ended it"
    ) in html
    assert "that run on its hosts (host-1, host-2) have applied it" in html
    snap["deploy"]["not_ended"] = []
    html = client.app.state.templates.get_template("_live.html").render(  # type: ignore[attr-defined]
        app="web", live=snap, loopback=True
    )
    assert "still in flight past its apply deadline" not in html


def test_a_failed_release_s_banner_names_a_deploy_in_flight(client: TestClient) -> None:
    """The page says what `status --fleet` says of a failed release while another deploy
    is in flight: what moves the fleet, and no rollback advice unless it aborts."""
    failed = {
        "deploy": "d2",
        "release": "r2",
        "hosts": {"host-2": "validate hook exited 7"},
        "rollback": None,
        "after_end": False,
    }
    fleet = {"current": "r2", "previous": "r1", "current_problems": {}, "hosts": {}}

    def banner(deploy: dict[str, Any] | None) -> str:
        html = client.app.state.templates.get_template("app.html").render(  # type: ignore[attr-defined]
            app="web",
            fleet={**fleet, "current_failed": failed, "deploy": deploy},
            live={"deploy": None},
            builds=[],
            history=[],
        )
        found = re.search(r'<p class="banner error failed-release"[^>]*>(.*?)</p>', html, re.S)
        assert found, html
        return " ".join(re.sub(r"<[^>]+>", "", found[1]).split())

    nxt = {"id": "d4", "kind": "deploy", "release": "r4", "decision": None}
    said = banner(nxt)
    assert "deploy d4 of r4 is in flight: once it commits, it moves the fleet off it." in said
    assert "The fleet stays on it" not in said
    said = banner({**nxt, "decision": "commit"})
    assert "deploy d4 of r4 is in flight: committed, it moves the fleet off it." in said
    said = banner({**nxt, "decision": "abort"})
    assert (
        "deploy d4 of r4 is in flight: aborted; once it has ended: The fleet stays on it: "
        "roll back or deploy a fix." in said
    ), said
    said = banner({**nxt, "decision": "contested"})
    assert "in flight: contested (its acks contradict each other); once it has ended:" in said
    for none in (None, {**nxt, "id": "d2"}, {"id": "d5", "problem": "BROKEN"}):
        said = banner(none)
        assert "in flight" not in said and "The fleet stays on it: roll back" in said, said
