"""The Consul test cluster with TLS on the HTTP API (and ACLs): the test CA works, others fail."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from tests.support.cluster import ClusterSpec, ConsulCluster, make_ca

CLUSTER = ClusterSpec(hosts=2, tls=True, acl=True)


class TestTlsCluster:
    def test_https_with_the_test_ca_works(self, cluster: ConsulCluster) -> None:
        for agent in cluster.agents:
            assert agent.http_addr == f"https://{agent.ip}:8501"
            resp = requests.get(
                f"{agent.http_addr}/v1/status/leader", timeout=5, verify=cluster.ca_file
            )
            assert resp.status_code == 200
            assert resp.json() == f"{cluster.server.ip}:8300"

    def test_a_wrong_ca_is_refused(
        self, cluster: ConsulCluster, consul_bin: str, tmp_path: Path
    ) -> None:
        wrong_ca, _ = make_ca(consul_bin, tmp_path / "other-ca")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(
                f"{cluster.hosts[0].http_addr}/v1/status/leader", timeout=5, verify=str(wrong_ca)
            )

    def test_plain_http_is_off(self, cluster: ConsulCluster) -> None:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{cluster.hosts[0].ip}:8500/v1/status/leader", timeout=5)

    def test_consul_cli_works_with_the_agent_env(
        self, cluster: ConsulCluster, consul_bin: str
    ) -> None:
        host = cluster.hosts[0]
        env = host.env()
        assert env["CONSUL_CACERT"] == cluster.ca_file
        key = f"rwtest/tls/{uuid.uuid4().hex}"
        subprocess.run(
            [consul_bin, "kv", "put", key, "via-cli"],
            env=env,
            check=True,
            capture_output=True,
            timeout=30,
        )
        got = subprocess.run(
            [consul_bin, "kv", "get", key],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert got.stdout.strip() == "via-cli"
        settings = cluster.hosts[1].consul_settings()
        assert (settings.scheme, settings.ca_file) == ("https", cluster.ca_file)
        resp = requests.get(
            f"{settings.base_url}/v1/kv/{key}",
            params={"raw": "1"},
            headers={"X-Consul-Token": settings.token or ""},
            verify=settings.ca_file,
            timeout=5,
        )
        assert resp.content == b"via-cli"
