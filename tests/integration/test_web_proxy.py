"""`watcher web` behind nginx configured as docs/web.md says ("Behind a reverse proxy"): the
block is taken from the docs themselves, so the docs cannot drift from what works. A real
nginx (Debian's, installed by scripts/install-system-deps), a real cluster with ACLs on.

A review of the page with real clients followed the docs of the time (only
`X-Forwarded-For`) and every write through the proxy was refused as from another origin."""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.test_deploy_acl import create_token, render, watcher_token_fleet
from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.nginx import Nginx, NginxFailed
from tests.support.s3server import S3Server
from tests.support.web import WebServer, free_port, reader_web
from watcher.config import S3Settings

CLUSTER = ClusterSpec(hosts=1, acl=True)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "web.md"
DOCUMENTED_UPSTREAM = "http://127.0.0.1:8710"


def documented_locations() -> list[str]:
    """The nginx blocks of docs/web.md's "Behind a reverse proxy": at the root of a site,
    then under a path (``/watcher/``)."""
    section = DOCS.read_text().split("## Behind a reverse proxy", 1)[1].split("\n## ", 1)[0]
    blocks = [str(b) for b in re.findall(r"```nginx\n(.*?)```", section, re.S)]
    assert len(blocks) == 2, "docs/web.md: two nginx blocks under 'Behind a reverse proxy'"
    assert blocks[0].startswith("location / {") and blocks[1].startswith("location /watcher/ {")
    assert all(DOCUMENTED_UPSTREAM in b for b in blocks)
    return blocks


@dataclass
class Proxied:
    """`watcher web` (reading with a web token) behind a real nginx; the tokens."""

    web: WebServer
    nginx: Nginx
    proxy: str  # the proxy's URL
    reader: str
    operator: str

    def first_event_within(self, c: httpx.Client, path: str, auth: dict[str, str]) -> float:
        """Seconds until the live stream at ``path`` gave its first `live` event."""
        started = time.monotonic()
        with c.stream("GET", path, headers=auth) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            seen = ""
            for chunk in stream.iter_text():
                seen += chunk
                if "event: live" in seen and "\n\n" in seen.split("event: live", 1)[1]:
                    break
        return time.monotonic() - started


@contextlib.contextmanager
def behind_nginx(
    cluster: ConsulCluster, s3_server: S3Server, tmp_path: Path, block: int, *args: str
) -> Iterator[Proxied]:
    """docs/web.md's nginx block number ``block`` in front of `watcher web ARGS`."""
    prefix = f"p{time.monotonic_ns()}"
    server = cluster.server
    reader, _ = create_token(server, f"reader-{prefix}", render("web", prefix, "web"))
    operator, _ = create_token(server, f"alice-{prefix}", render("operator", prefix, "web"))
    s3 = S3Settings("unused", "artifacts", "us-east-1", s3_server.endpoint_url)
    fleet = watcher_token_fleet(cluster, s3, tmp_path, prefix)
    web = reader_web(fleet, reader, tmp_path, args=args)
    web.start()
    location = documented_locations()[block].replace(DOCUMENTED_UPSTREAM, web.url)
    nginx = Nginx(tmp_path / "nginx", free_port(), server=location)
    try:
        nginx.start()
    except NginxFailed as exc:
        web.stop()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield Proxied(web, nginx, f"http://127.0.0.1:{nginx.port}", reader, operator)
    except BaseException:
        print(web.log())
        print(nginx.error_log())
        raise
    finally:
        nginx.stop()
        web.stop()


def abort_path(root: str = "") -> str:
    """The abort of a deploy that does not exist: a write that reaches Consul (404)."""
    return f"{root}/api/v1/apps/web/deploys/20261206T000000Z-{uuid.uuid4().hex[:8]}/abort"


class TestBehindNginx:
    def test_the_documented_proxy_serves_reads_writes_and_the_stream(
        self,
        cluster: ConsulCluster,
        s3_server: S3Server,
        tmp_path: Path,
    ) -> None:
        with (
            behind_nginx(cluster, s3_server, tmp_path, 0) as p,
            httpx.Client(base_url=p.proxy, timeout=30) as c,
        ):
            # Its clients are not local: a read needs their token.
            r = c.get("/api/v1/apps/web/fleet")
            assert r.status_code == 401 and "through a proxy" in r.json()["error"], r.text
            auth = {"Authorization": f"Bearer {p.reader}"}
            assert c.get("/api/v1/apps/web/fleet", headers=auth).status_code == 200

            # A write from the page (its Origin is the proxy's name) passes the Origin
            # check and reaches Consul: an abort of a deploy that does not exist, 404.
            abort = abort_path()
            write = {"Authorization": f"Bearer {p.operator}", "Origin": p.proxy}
            r = c.post(abort, json={}, headers=write)
            assert r.status_code == 404, r.text
            # Another site's page is still refused, saying what was compared.
            r = c.post(abort, json={}, headers={**write, "Origin": "http://evil.example"})
            assert r.status_code == 403 and "another origin" in r.json()["error"], r.text
            assert (
                f"this server was reached as '{p.web.url.removeprefix('http://')}' (Host) "
                f"and '127.0.0.1:{p.nginx.port}' (X-Forwarded-Host)"
            ) in r.json()["error"], r.text

            # The live stream comes through at once, not held in nginx's buffers.
            took = p.first_event_within(c, "/api/v1/apps/web/live", auth)
            assert took < 5, f"the first event took {took:.1f} s through the proxy"

    def test_under_a_path_with_root_path_the_page_its_writes_and_stream_stay_under_it(
        self,
        cluster: ConsulCluster,
        s3_server: S3Server,
        tmp_path: Path,
    ) -> None:
        """The proxy review: under `location /watcher/` the page named its style sheet,
        script, links and requests at the site's root (404s: an unstyled page without its
        script), and the slash's redirect left the path."""
        with (
            behind_nginx(cluster, s3_server, tmp_path, 1, "--root-path", "/watcher") as p,
            httpx.Client(base_url=p.proxy, timeout=30) as c,
        ):
            auth = {"Authorization": f"Bearer {p.reader}"}
            r = c.get("/watcher/apps/web", headers=auth)
            assert r.status_code == 200, r.text
            assert 'data-root="/watcher"' in r.text
            refs = re.findall(r'(?:href|src)="(/[^"]*)"', r.text)
            assert refs and all(ref.startswith("/watcher/") for ref in refs), refs
            for ref in refs:  # the style sheet, the script, the nav, the API's spec
                assert c.get(ref, headers=auth).status_code == 200, ref
            r = c.get("/watcher/apps/web/", headers=auth)
            assert r.status_code == 308 and r.headers["location"] == "/watcher/apps/web"
            write = {"Authorization": f"Bearer {p.operator}", "Origin": p.proxy}
            r = c.post(abort_path("/watcher"), json={}, headers=write)
            assert r.status_code == 404, r.text
            assert p.first_event_within(c, "/watcher/api/v1/apps/web/live", auth) < 5
