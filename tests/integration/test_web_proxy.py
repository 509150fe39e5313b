"""`watcher web` behind nginx configured as docs/web.md says ("Behind a reverse proxy"): the
block is taken from the docs themselves, so the docs cannot drift from what works. A real
nginx (Debian's, installed by scripts/install-system-deps), a real cluster with ACLs on.

A review of the page with real clients followed the docs of the time (only
`X-Forwarded-For`) and every write through the proxy was refused as from another origin."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.test_deploy_acl import create_token, render, watcher_tokens
from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.fleet import Fleet
from tests.support.s3server import S3Server
from tests.support.web import WebServer, free_port
from watcher.config import S3Settings

CLUSTER = ClusterSpec(hosts=1, acl=True)
NGINX = "/usr/sbin/nginx"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "web.md"
DOCUMENTED_UPSTREAM = "http://127.0.0.1:8710"


def documented_location() -> str:
    """The nginx block of docs/web.md's "Behind a reverse proxy"."""
    section = DOCS.read_text().split("## Behind a reverse proxy", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```nginx\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "docs/web.md: one nginx block under 'Behind a reverse proxy'"
    assert DOCUMENTED_UPSTREAM in blocks[0]
    return str(blocks[0])


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """(its work directory, its port); the upstream written into ``upstream.conf`` by the
    test before ``start``."""
    if not os.access(NGINX, os.X_OK):
        pytest.fail(f"{NGINX} is missing: run scripts/install-system-deps", pytrace=False)
    work = tmp_path / "nginx"
    work.mkdir()
    yield work, free_port()


def start_nginx(work: Path, port: int, upstream: str) -> subprocess.Popen[bytes]:
    location = documented_location().replace(DOCUMENTED_UPSTREAM, upstream)
    user = "user root;" if os.geteuid() == 0 else ""
    conf = work / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            {user}
            worker_processes 1;
            pid {work}/nginx.pid;
            error_log {work}/error.log warn;
            events {{ worker_connections 64; }}
            http {{
                access_log off;
                client_body_temp_path {work}/body;
                proxy_temp_path {work}/proxy;
                fastcgi_temp_path {work}/fastcgi;
                uwsgi_temp_path {work}/uwsgi;
                scgi_temp_path {work}/scgi;
                server {{
                    listen 127.0.0.1:{port};
            """
        )
        + location
        + "\n    }\n}\n"
    )
    proc = subprocess.Popen(
        [
            NGINX,
            "-e",
            str(work / "error.log"),
            "-p",
            str(work),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"nginx exited {proc.returncode}: {err.strip()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("nginx did not listen within 10 s")


class TestBehindNginx:
    def test_the_documented_proxy_serves_reads_writes_and_the_stream(
        self,
        cluster: ConsulCluster,
        s3_server: S3Server,
        tmp_path: Path,
        nginx_in_front: tuple[Path, int],
    ) -> None:
        prefix = f"p{time.monotonic_ns()}"
        server = cluster.server
        watchers = {n: s for n, (s, _) in watcher_tokens(server, cluster.hosts, prefix).items()}
        reader, _ = create_token(server, f"reader-{prefix}", render("web", prefix, "web"))
        operator, _ = create_token(server, f"alice-{prefix}", render("operator", prefix, "web"))
        s3 = S3Settings("unused", "artifacts", "us-east-1", s3_server.endpoint_url)
        fleet = Fleet(cluster, s3, tmp_path, kv_prefix=prefix, consul_tokens=watchers)
        config = fleet.config_for(fleet.watchers[0])
        config["consul"]["token"] = reader
        (tmp_path / "web.yaml").write_text(yaml.safe_dump(config))
        web = WebServer(tmp_path / "web.yaml", tmp_path / "web.log")
        work, port = nginx_in_front
        web.start()
        nginx = start_nginx(work, port, web.url)
        proxy = f"http://127.0.0.1:{port}"
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
                # Another site's page is still refused.
                r = c.post(abort, json={}, headers={**write, "Origin": "http://evil.example"})
                assert r.status_code == 403 and "another origin" in r.json()["error"], r.text

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
            print((work / "error.log").read_text() if (work / "error.log").exists() else "")
            raise
        finally:
            nginx.terminate()
            try:
                nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                nginx.kill()
            web.stop()
