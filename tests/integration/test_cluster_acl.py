"""The Consul test cluster with ACLs on (default deny): no token is refused, management works."""

from __future__ import annotations

import uuid

import requests

from tests.support.cluster import ClusterSpec, ConsulCluster

CLUSTER = ClusterSpec(hosts=2, acl=True)


class TestAclCluster:
    def test_request_without_token_is_refused(self, cluster: ConsulCluster) -> None:
        host = cluster.hosts[0]
        put = requests.put(f"{host.base_url}/v1/kv/rwtest/anon", data=b"x", timeout=5)
        get = requests.get(f"{host.base_url}/v1/kv/rwtest/anon", timeout=5)
        assert put.status_code == 403
        assert get.status_code == 403

    def test_unknown_token_is_refused(self, cluster: ConsulCluster) -> None:
        resp = requests.get(
            f"{cluster.hosts[0].base_url}/v1/kv/rwtest/x",
            timeout=5,
            headers={"X-Consul-Token": str(uuid.uuid4())},
        )
        assert resp.status_code == 403
        assert "ACL not found" in resp.text

    def test_management_token_is_accepted_through_every_agent(self, cluster: ConsulCluster) -> None:
        token = cluster.management_token
        assert token
        headers = {"X-Consul-Token": token}
        key = f"rwtest/acl/{uuid.uuid4().hex}"
        put = requests.put(
            f"{cluster.hosts[0].base_url}/v1/kv/{key}", data=b"ok", headers=headers, timeout=5
        )
        assert put.status_code == 200 and put.json() is True
        for agent in cluster.agents:
            assert agent.env()["CONSUL_HTTP_TOKEN"] == token
            assert agent.consul_settings().token == token
            resp = requests.get(
                f"{agent.base_url}/v1/kv/{key}", params={"raw": "1"}, headers=headers, timeout=5
            )
            assert resp.status_code == 200 and resp.content == b"ok"

    def test_session_through_a_client_agent_and_restart_with_acls(
        self, cluster: ConsulCluster
    ) -> None:
        host = cluster.hosts[1]
        headers = {"X-Consul-Token": cluster.management_token or ""}
        created = requests.put(
            f"{host.base_url}/v1/session/create",
            headers=headers,
            json={"Name": "rwtest", "TTL": "10s"},
            timeout=5,
        )
        assert created.status_code == 200, created.text

        cluster.restart(host)

        me = requests.get(f"{host.base_url}/v1/acl/token/self", headers=headers, timeout=5)
        assert me.status_code == 200
        assert me.json()["SecretID"] == cluster.management_token
