"""`watcher web` behind nginx configured as docs/web.md says ("Behind a reverse proxy"): the
block is taken from the docs themselves, so the docs cannot drift from what works. A real
nginx (Debian's, installed by scripts/install-system-deps), a real cluster with ACLs on.

A review of the page with real clients followed the docs of the time (only
`X-Forwarded-For`) and every write through the proxy was refused as from another origin."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.test_deploy_acl import create_token, render, watcher_token_fleet
from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.nginx import Nginx, NginxFailed
from tests.support.s3server import S3Server
from tests.support.web import free_port, reader_web
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


class TestBehindNginx:
    def test_the_documented_proxy_serves_reads_writes_and_the_stream(
        self,
        cluster: ConsulCluster,
        s3_server: S3Server,
        tmp_path: Path,
    ) -> None:
        prefix = f"p{time.monotonic_ns()}"
        server = cluster.server
        reader, _ = create_token(server, f"reader-{prefix}", render("web", prefix, "web"))
        operator, _ = create_token(server, f"alice-{prefix}", render("operator", prefix, "web"))
        s3 = S3Settings("unused", "artifacts", "us-east-1", s3_server.endpoint_url)
        web = reader_web(watcher_token_fleet(cluster, s3, tmp_path, prefix), reader, tmp_path)
        web.start()
        location = documented_locations()[0].replace(DOCUMENTED_UPSTREAM, web.url)
        nginx = Nginx(tmp_path / "nginx", free_port(), server=location)
        try:
            nginx.start()
        except NginxFailed as exc:
            web.stop()
            pytest.fail(str(exc), pytrace=False)
        proxy = f"http://127.0.0.1:{nginx.port}"
        try:
            with httpx.Client(base_url=proxy, timeout=30) as c:
                # Its clients are not local: a read needs their token.
                r = c.get("/api/v1/apps/web/fleet")
                assert r.status_code == 401 and "through a proxy" in r.json()["error"], r.text
                auth = {"Authorization": f"Bearer {reader}"}
                assert c.get("/api/v1/apps/web/fleet", headers=auth).status_code == 200

                # A write from the page (its Origin is the proxy's name) passes the Origin
                # check and reaches Consul: an abort of a deploy that does not exist, 404.
                abort = f"/api/v1/apps/web/deploys/20261206T000000Z-{uuid.uuid4().hex[:8]}/abort"
                write = {"Authorization": f"Bearer {operator}", "Origin": proxy}
                r = c.post(abort, json={}, headers=write)
                assert r.status_code == 404, r.text
                # Another site's page is still refused, saying what was compared.
                r = c.post(abort, json={}, headers={**write, "Origin": "http://evil.example"})
                assert r.status_code == 403 and "another origin" in r.json()["error"], r.text
                assert (
                    f"this server was reached as '{web.url.removeprefix('http://')}' (Host) "
                    f"and '127.0.0.1:{nginx.port}' (X-Forwarded-Host)"
                ) in r.json()["error"], r.text

                # The live stream comes through at once, not held in nginx's buffers.
                started = time.monotonic()
                with c.stream("GET", "/api/v1/apps/web/live", headers=auth) as stream:
                    assert stream.status_code == 200
                    assert stream.headers["content-type"].startswith("text/event-stream")
                    seen = ""
                    for chunk in stream.iter_text():
                        seen += chunk
                        if "event: live" in seen and "\n\n" in seen.split("event: live", 1)[1]:
                            break
                took = time.monotonic() - started
                assert took < 5, f"the first event took {took:.1f} s through the proxy"
        except BaseException:
            print(web.log())
            print(nginx.error_log())
            raise
        finally:
            nginx.stop()
            web.stop()

    def test_under_a_path_with_root_path_the_page_its_writes_and_stream_stay_under_it(
        self,
        cluster: ConsulCluster,
        s3_server: S3Server,
        tmp_path: Path,
    ) -> None:
        """The proxy review: under `location /watcher/` the page named its style sheet,
        script, links and requests at the site's root (404s: an unstyled page without its
        script), and the slash's redirect left the path."""
        prefix = f"p{time.monotonic_ns()}"
        server = cluster.server
        reader, _ = create_token(server, f"reader-{prefix}", render("web", prefix, "web"))
        operator, _ = create_token(server, f"alice-{prefix}", render("operator", prefix, "web"))
        s3 = S3Settings("unused", "artifacts", "us-east-1", s3_server.endpoint_url)
        fleet = watcher_token_fleet(cluster, s3, tmp_path, prefix)
        web = reader_web(fleet, reader, tmp_path, args=("--root-path", "/watcher"))
        web.start()
        location = documented_locations()[1].replace(DOCUMENTED_UPSTREAM, web.url)
        nginx = Nginx(tmp_path / "nginx", free_port(), server=location)
        try:
            nginx.start()
        except NginxFailed as exc:
            web.stop()
            pytest.fail(str(exc), pytrace=False)
        proxy = f"http://127.0.0.1:{nginx.port}"
        auth = {"Authorization": f"Bearer {reader}"}
        try:
            with httpx.Client(base_url=proxy, timeout=30) as c:
                r = c.get("/watcher/apps/web", headers=auth)
                assert r.status_code == 200, r.text
                assert 'data-root="/watcher"' in r.text
                refs = re.findall(r'(?:href|src)="(/[^"]*)"', r.text)
                assert refs and all(ref.startswith("/watcher/") for ref in refs), refs
                for ref in refs:  # the style sheet, the script, the nav, the API's spec
                    assert c.get(ref, headers=auth).status_code == 200, ref
                r = c.get("/watcher/apps/web/", headers=auth)
                assert r.status_code == 308 and r.headers["location"] == "/watcher/apps/web"
                deploy = f"20261206T000000Z-{uuid.uuid4().hex[:8]}"
                abort = f"/watcher/api/v1/apps/web/deploys/{deploy}/abort"
                write = {"Authorization": f"Bearer {operator}", "Origin": proxy}
                r = c.post(abort, json={}, headers=write)
                assert r.status_code == 404, r.text
                started = time.monotonic()
                with c.stream("GET", "/watcher/api/v1/apps/web/live", headers=auth) as stream:
                    assert stream.status_code == 200
                    seen = ""
                    for chunk in stream.iter_text():
                        seen += chunk
                        if "event: live" in seen and "\n\n" in seen.split("event: live", 1)[1]:
                            break
                assert time.monotonic() - started < 5
        except BaseException:
            print(web.log())
            print(nginx.error_log())
            raise
        finally:
            nginx.stop()
            web.stop()
