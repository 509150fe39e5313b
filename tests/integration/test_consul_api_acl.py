"""The Consul boundary with ACLs on (default deny) and TLS on the HTTP API: the token goes
with every call (py-consul 1.8.0 drops it on event.list and txn), refusals map to
ConsulPermissionDenied, and a wrong CA to ConsulTLSError."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.cluster import ClusterSpec, ConsulCluster, make_ca
from watcher.consul_api import ConsulClient, TxnOp
from watcher.errors import ConsulPermissionDenied, ConsulRequestError, ConsulTLSError

# One cluster for both concerns: a production fleet runs ACLs and TLS together.
CLUSTER = ClusterSpec(hosts=2, acl=True, tls=True)


@pytest.fixture(scope="module")
def c1(cluster: ConsulCluster) -> Iterator[ConsulClient]:
    """The first host's agent, with the management token, over HTTPS with the test CA."""
    client = ConsulClient(cluster.hosts[0].consul_settings())
    yield client
    client.close()


@pytest.fixture(scope="module")
def c2(cluster: ConsulCluster) -> Iterator[ConsulClient]:
    """The second host's agent, with the management token."""
    client = ConsulClient(cluster.hosts[1].consul_settings())
    yield client
    client.close()


@pytest.fixture(scope="module")
def anonymous(cluster: ConsulCluster) -> Iterator[ConsulClient]:
    """The first host's agent without a token."""
    settings = dataclasses.replace(cluster.hosts[0].consul_settings(), token=None)
    client = ConsulClient(settings, retry_deadline=2.0)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    return f"rwtest/{uuid.uuid4().hex[:12]}/"


class TestWithTheManagementToken:
    def test_agent_and_token(self, cluster: ConsulCluster, c1: ConsulClient) -> None:
        assert c1.agent_node_name() == cluster.hosts[0].name
        assert c1.leader() == f"{cluster.server.ip}:8300"
        token = c1.acl_token_self()
        assert token["SecretID"] == cluster.management_token
        assert token["AccessorID"]
        assert any(p.get("Name") == "global-management" for p in token.get("Policies") or [])

    def test_kv(self, c1: ConsulClient, c2: ConsulClient, prefix: str) -> None:
        assert c1.kv_put(prefix + "k", b"v", cas=0)
        entry = c2.kv_get(prefix + "k")
        assert entry is not None and entry.value == b"v"
        index, _ = c2.kv_get_blocking(prefix + "k", 0, 1.0)
        assert index > 0
        assert [e.key for e in c2.kv_list(prefix)] == [prefix + "k"]
        assert c2.kv_keys(prefix) == [prefix + "k"]
        assert c1.kv_delete(prefix + "k")

    def test_txn_sends_the_token(self, c1: ConsulClient, prefix: str) -> None:
        result = c1.txn(
            [TxnOp.check_not_exists(prefix + "decision"), TxnOp.set(prefix + "decision", b"commit")]
        )
        assert result.ok, result.errors
        again = c1.txn(
            [TxnOp.check_not_exists(prefix + "decision"), TxnOp.set(prefix + "decision", b"abort")]
        )
        assert not again.ok and again.errors[0][0] == 0
        entry = c1.kv_get(prefix + "decision")
        assert entry is not None and entry.value == b"commit"

    def test_sessions(self, c1: ConsulClient, prefix: str) -> None:
        sid = c1.session_create("rwtest-acl", 2)
        assert c1.kv_put(prefix + "members/host-1", b"", acquire=sid)
        assert c1.session_renew(sid)
        info = c1.session_info(sid)
        assert info is not None and info["TTL"] == "2s"
        c1.session_destroy(sid)
        assert c1.session_info(sid) is None
        assert c1.kv_get(prefix + "members/host-1") is None

    def test_event_list_sends_the_token(self, c1: ConsulClient, c2: ConsulClient) -> None:
        name = f"rwtest-{uuid.uuid4().hex[:8]}"
        index, _ = c2.event_list(name)
        event_id = c1.event_fire(name, b'{"app": "web"}')
        deadline = time.monotonic() + 10
        events: list = []
        while not events and time.monotonic() < deadline:
            index, events = c2.event_list(name, index=index, wait=5.0)
        assert [(e.id, e.payload) for e in events] == [(event_id, b'{"app": "web"}')]

    def test_payload_over_the_acl_limit_is_refused(self, c1: ConsulClient) -> None:
        with pytest.raises(ConsulRequestError, match="size limit"):
            c1.event_fire("rwtest-big", b"x" * 400)


class TestWithoutAToken:
    def test_kv_read_and_write_are_denied(self, anonymous: ConsulClient, prefix: str) -> None:
        with pytest.raises(ConsulPermissionDenied, match=f"kv get {prefix}k.*lacks permission"):
            anonymous.kv_get(prefix + "k")
        with pytest.raises(
            ConsulPermissionDenied,
            match="no ACL token was sent \\(none configured\\), and Consul's anonymous token",
        ):
            anonymous.kv_get(prefix + "k")
        with pytest.raises(ConsulPermissionDenied, match=f"kv put {prefix}k"):
            anonymous.kv_put(prefix + "k", b"v")

    def test_txn_is_denied(self, anonymous: ConsulClient, prefix: str) -> None:
        with pytest.raises(ConsulPermissionDenied, match="txn of 1 ops"):
            anonymous.txn([TxnOp.set(prefix + "k", b"v")])

    def test_session_create_is_denied(self, anonymous: ConsulClient) -> None:
        with pytest.raises(ConsulPermissionDenied, match="session create"):
            anonymous.session_create("rwtest-anon", 5)

    def test_event_fire_is_denied(self, anonymous: ConsulClient) -> None:
        with pytest.raises(ConsulPermissionDenied, match="event fire"):
            anonymous.event_fire("rwtest-anon", b"")

    def test_unknown_token_is_denied(self, cluster: ConsulCluster) -> None:
        settings = dataclasses.replace(cluster.hosts[0].consul_settings(), token=str(uuid.uuid4()))
        client = ConsulClient(settings, retry_deadline=2.0)
        with pytest.raises(ConsulPermissionDenied, match="the ACL token is unknown to Consul"):
            client.acl_token_self()
        with pytest.raises(ConsulPermissionDenied):
            client.kv_get("rwtest/x")


class TestTls:
    def test_wrong_ca_is_a_tls_error(
        self, cluster: ConsulCluster, consul_bin: str, tmp_path: Path
    ) -> None:
        wrong_ca, _ = make_ca(consul_bin, tmp_path / "other-ca")
        settings = dataclasses.replace(cluster.hosts[0].consul_settings(), ca_file=str(wrong_ca))
        client = ConsulClient(settings, retry_deadline=2.0)
        started = time.monotonic()
        with pytest.raises(ConsulTLSError, match=rf"(?i){cluster.hosts[0].ip}:8501.*certificate"):
            client.kv_get("rwtest/x")
        assert time.monotonic() - started < 2.0  # a TLS failure is not retried

    def test_system_cas_do_not_trust_the_test_ca(self, cluster: ConsulCluster) -> None:
        settings = dataclasses.replace(
            cluster.hosts[0].consul_settings(), ca_file=requests.certs.where()
        )
        with pytest.raises(ConsulTLSError):
            ConsulClient(settings, retry_deadline=2.0).leader()

    def test_ca_bundle_variables_do_not_replace_system_verification(
        self, cluster: ConsulCluster, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # requests would take REQUESTS_CA_BUNDLE over verify=True if it trusted the env.
        assert cluster.ca_file is not None
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", cluster.ca_file)
        monkeypatch.setenv("CURL_CA_BUNDLE", cluster.ca_file)
        settings = dataclasses.replace(cluster.hosts[0].consul_settings(), ca_file=None)
        with pytest.raises(ConsulTLSError):
            ConsulClient(settings, retry_deadline=1.0).leader()

    @pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
    def test_verify_false_is_honoured(self, cluster: ConsulCluster) -> None:
        settings = dataclasses.replace(
            cluster.hosts[0].consul_settings(), ca_file=None, verify=False
        )
        assert ConsulClient(settings).leader() == f"{cluster.server.ip}:8300"

    def test_plain_http_to_an_https_port_is_refused(self, cluster: ConsulCluster) -> None:
        settings = dataclasses.replace(cluster.hosts[0].consul_settings(), scheme="http")
        with pytest.raises((ConsulRequestError, ConsulTLSError)):
            ConsulClient(settings, retry_deadline=1.0).leader()
