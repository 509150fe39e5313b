"""`watcher web` against a Consul with ACLs off (the demo's set-up): loopback-only writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.fleet import Fleet
from tests.support.web import WebServer
from watcher.config import S3Settings, load_config
from watcher.web.app import create_app

CLUSTER = ClusterSpec(hosts=2)


@pytest.fixture
def fleet(cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(cluster, s3_settings, tmp_path)
    f.start()
    try:
        yield f
    finally:
        f.stop()


class TestAclsOff:
    def test_writes_only_on_loopback_and_the_server_says_so(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        config_path = tmp_path / "web.yaml"
        config_path.write_text(yaml.safe_dump(fleet.config_for(fleet.watchers[0])))
        config = load_config(config_path)
        v1 = fleet.publish("v1")

        with TestClient(create_app(config, listen_host="192.0.2.10")) as c:
            r = c.post(
                "/api/v1/apps/web/deploys",
                json={"artifact": v1.id},
                headers={"X-Consul-Token": "x"},
            )
            assert r.status_code == 403, r.text
            assert "ACLs disabled" in r.json()["error"] and "loopback" in r.json()["error"]
            # Without a token: the same 403, not a 401 asking for a token that cannot help.
            r = c.post("/api/v1/apps/web/deploys", json={"artifact": v1.id})
            assert r.status_code == 403, r.text
            assert "ACLs disabled" in r.json()["error"]
            # A made-up token reads nothing either: Consul would take any.
            for path in ("/api/v1/apps/web/deploys", "/api/v1/apps/web/fleet"):
                r = c.get(path, headers={"X-Consul-Token": "made-up"})
                assert r.status_code == 403, (path, r.text)
                assert "ACLs disabled, so a token proves nothing" in r.json()["error"]
                # Nor does none: the same 403, not a 401 asking for a token.
                r = c.get(path)
                assert r.status_code == 403, (path, r.text)
                assert "ACLs disabled, so a token proves nothing" in r.json()["error"]
            r = c.get("/apps/web")
            assert r.status_code == 403 and 'id="enter-token"' not in r.text, r.text
        assert fleet.inflight() is None

        # Nor does a page whose DNS name was rebound to a loopback bind (Host: its name).
        with TestClient(
            create_app(config, listen_host="127.0.0.1"), base_url="http://rebind.example:8710"
        ) as c:
            r = c.get("/api/v1/apps/web/deploys", headers={"X-Consul-Token": "made-up"})
            assert r.status_code == 403, r.text

        with TestClient(
            create_app(config, listen_host="127.0.0.1"), base_url="http://127.0.0.1:8710"
        ) as c:
            r = c.post("/api/v1/apps/web/deploys", json={"artifact": v1.id})
            assert r.status_code == 202, r.text
            assert r.json()["requested_by"].endswith("(web, ACLs off)")
            # The page asks for no token on a write: there is none to give.
            assert 'data-acls="off"' in c.get("/apps/web").text
        assert fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
        fleet.wait_idle()

        web = WebServer(config_path, tmp_path / "web.log")
        web.start()
        try:
            assert (
                "Consul has ACLs disabled: writes are accepted without a token because "
                "this server is bound to loopback" in web.log()
            )
        finally:
            web.stop()
