"""The Consul boundary against a real cluster (no ACLs, plain HTTP): KV, txn, sessions,
events, error mapping."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support.cluster import Agent, ClusterSpec, ConsulCluster
from watcher.config import ConsulSettings
from watcher.consul_api import ConsulClient, TxnOp, request_counts
from watcher.errors import ConsulRequestError, ConsulUnavailable

CLUSTER = ClusterSpec(hosts=2)


def client_for(agent: Agent, **kwargs: float) -> ConsulClient:
    return ConsulClient(agent.consul_settings(), **kwargs)


@pytest.fixture(scope="module")
def c1(cluster: ConsulCluster) -> Iterator[ConsulClient]:
    """A client of the first host's agent."""
    client = client_for(cluster.hosts[0])
    yield client
    client.close()


@pytest.fixture(scope="module")
def c2(cluster: ConsulCluster) -> Iterator[ConsulClient]:
    """A client of the second host's agent."""
    client = client_for(cluster.hosts[1])
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    """A fresh KV prefix for one test, ending in "/"."""
    return f"rwtest/{uuid.uuid4().hex[:12]}/"


def later(delay: float, action: Callable[[], object]) -> threading.Thread:
    """Run ``action()`` in a thread after ``delay`` seconds."""

    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class TestAgent:
    def test_node_name(self, cluster: ConsulCluster, c1: ConsulClient) -> None:
        assert c1.agent_node_name() == cluster.hosts[0].name

    def test_leader(self, cluster: ConsulCluster, c1: ConsulClient) -> None:
        assert c1.leader() == f"{cluster.server.ip}:8300"

    def test_acl_token_self_without_acls_is_a_request_error(self, c1: ConsulClient) -> None:
        with pytest.raises(ConsulRequestError, match="acl token self"):
            c1.acl_token_self()


class TestKV:
    def test_put_get_bytes_across_agents(
        self, c1: ConsulClient, c2: ConsulClient, prefix: str
    ) -> None:
        value = b"\x00\xffbinary\n"
        assert c1.kv_put(prefix + "k", value) is True
        entry = c2.kv_get(prefix + "k")
        assert entry is not None
        assert (entry.key, entry.value, entry.session) == (prefix + "k", value, None)
        assert entry.modify_index >= entry.create_index > 0

    def test_missing_key_is_none(self, c1: ConsulClient, prefix: str) -> None:
        assert c1.kv_get(prefix + "nothing") is None

    def test_empty_value(self, c1: ConsulClient, prefix: str) -> None:
        c1.kv_put(prefix + "e", b"")
        entry = c1.kv_get(prefix + "e")
        assert entry is not None and entry.value in (b"", None)

    def test_cas(self, c1: ConsulClient, prefix: str) -> None:
        key = prefix + "cas"
        assert c1.kv_put(key, b"one", cas=0) is True
        assert c1.kv_put(key, b"two", cas=0) is False
        entry = c1.kv_get(key)
        assert entry is not None and entry.value == b"one"
        assert c1.kv_put(key, b"three", cas=entry.modify_index) is True
        assert c1.kv_put(key, b"four", cas=entry.modify_index) is False
        after = c1.kv_get(key)
        assert after is not None and after.value == b"three"

    def test_delete_cas_and_recurse(self, c1: ConsulClient, prefix: str) -> None:
        c1.kv_put(prefix + "a", b"1")
        c1.kv_put(prefix + "d/b", b"2")
        c1.kv_put(prefix + "d/c", b"3")
        entry = c1.kv_get(prefix + "a")
        assert entry is not None
        assert c1.kv_delete(prefix + "a", cas=entry.modify_index - 1) is False
        assert c1.kv_get(prefix + "a") is not None
        assert c1.kv_delete(prefix + "a", cas=entry.modify_index) is True
        assert c1.kv_get(prefix + "a") is None
        assert c1.kv_delete(prefix + "d/", recurse=True) is True
        assert c1.kv_list(prefix) == []

    def test_list_is_recursive_and_keys_collapse(self, c1: ConsulClient, prefix: str) -> None:
        for key in ("x", "y/1", "y/2/deep"):
            c1.kv_put(prefix + key, key.encode())
        entries = c1.kv_list(prefix)
        assert {e.key: e.value for e in entries} == {
            prefix + "x": b"x",
            prefix + "y/1": b"y/1",
            prefix + "y/2/deep": b"y/2/deep",
        }
        assert c1.kv_keys(prefix) == [prefix + "x", prefix + "y/"]
        assert c1.kv_keys(prefix, separator=None) == [
            prefix + "x",
            prefix + "y/1",
            prefix + "y/2/deep",
        ]
        assert c1.kv_list(prefix + "none/") == []
        assert c1.kv_keys(prefix + "none/") == []


class TestBlockingKV:
    def test_returns_on_change(self, c1: ConsulClient, c2: ConsulClient, prefix: str) -> None:
        key = prefix + "watched"
        c1.kv_put(key, b"v1")
        index, entry = c2.kv_get_blocking(key, 0, 1.0)
        assert entry is not None and entry.value == b"v1" and index > 0
        later(0.3, lambda: c1.kv_put(key, b"v2"))
        started = time.monotonic()
        new_index, entry = c2.kv_get_blocking(key, index, 10.0)
        assert time.monotonic() - started < 5.0
        assert new_index > index
        assert entry is not None and entry.value == b"v2"

    def test_times_out_with_the_same_index(self, c1: ConsulClient, prefix: str) -> None:
        key = prefix + "quiet"
        c1.kv_put(key, b"v1")
        index, _ = c1.kv_get_blocking(key, 0, 1.0)
        started = time.monotonic()
        same, entry = c1.kv_get_blocking(key, index, 1.0)
        took = time.monotonic() - started
        assert 0.9 <= took < 4.0  # the wait plus Consul's jitter (wait/16), under load
        assert same == index
        assert entry is not None and entry.value == b"v1"

    def test_missing_key_then_created(
        self, c1: ConsulClient, c2: ConsulClient, prefix: str
    ) -> None:
        key = prefix + "later"
        index, entry = c2.kv_get_blocking(key, 0, 1.0)
        assert entry is None and index >= 1
        later(0.3, lambda: c1.kv_put(key, b"born"))
        _, entry = c2.kv_get_blocking(key, index, 10.0)
        assert entry is not None and entry.value == b"born"

    def test_list_blocking_sees_a_new_key(
        self, c1: ConsulClient, c2: ConsulClient, prefix: str
    ) -> None:
        c1.kv_put(prefix + "a", b"1")
        index, entries = c2.kv_list_blocking(prefix, 0, 1.0)
        assert [e.key for e in entries] == [prefix + "a"]
        later(0.3, lambda: c1.kv_put(prefix + "b", b"2"))
        new_index, entries = c2.kv_list_blocking(prefix, index, 10.0)
        assert new_index > index
        assert sorted(e.key for e in entries) == [prefix + "a", prefix + "b"]

    def test_keys_watch_wakes_on_deep_writes_and_carries_one_level(
        self, c1: ConsulClient, c2: ConsulClient, prefix: str
    ) -> None:
        # The shape of progress/<node>/<deploy>[/request]: what the coordinator watches.
        for node in ("web-1", "web-2"):
            for deploy in ("d1", "d2"):
                c1.kv_put(f"{prefix}{node}/{deploy}", b"ack")
                c1.kv_put(f"{prefix}{node}/{deploy}/request", b"req")
        index, names = c2.kv_keys_blocking(prefix, 0, 1.0)
        assert names == [prefix + "web-1/", prefix + "web-2/"]
        later(0.3, lambda: c1.kv_put(prefix + "web-2/d2", b"ack again"))
        started = time.monotonic()
        rewritten, names = c2.kv_keys_blocking(prefix, index, 10.0)
        assert time.monotonic() - started < 5.0
        assert rewritten > index and names == [prefix + "web-1/", prefix + "web-2/"]
        later(0.3, lambda: c1.kv_delete(prefix + "web-1/d1/request"))
        started = time.monotonic()
        deleted, _ = c2.kv_keys_blocking(prefix, rewritten, 10.0)
        assert time.monotonic() - started < 5.0
        assert deleted > rewritten
        started = time.monotonic()
        same, _ = c2.kv_keys_blocking(prefix, deleted, 1.0)
        assert same == deleted and time.monotonic() - started >= 0.9


class TestTxn:
    def test_ok_writes_everything(self, c1: ConsulClient, prefix: str) -> None:
        result = c1.txn(
            [
                TxnOp.check_not_exists(prefix + "inflight"),
                TxnOp.cas(prefix + "inflight", b"d1", 0),
                TxnOp.set(prefix + "deploys/d1", b'{"id": "d1"}'),
            ]
        )
        assert result.ok and result.errors == []
        # check-* ops return no entry; writes return theirs (without the value)
        assert [e.key for e in result.entries] == [prefix + "inflight", prefix + "deploys/d1"]
        entry = c1.kv_get(prefix + "deploys/d1")
        assert entry is not None and entry.value == b'{"id": "d1"}'

    def test_get_returns_the_value(self, c1: ConsulClient, prefix: str) -> None:
        c1.kv_put(prefix + "g", b"value")
        result = c1.txn([TxnOp.get(prefix + "g")])
        assert result.ok and result.entries[0].value == b"value"

    def test_check_not_exists_rolls_back(self, c1: ConsulClient, prefix: str) -> None:
        c1.kv_put(prefix + "decision", b"commit")
        result = c1.txn(
            [
                TxnOp.set(prefix + "other", b"x"),
                TxnOp.check_not_exists(prefix + "decision"),
                TxnOp.set(prefix + "decision", b"abort"),
            ]
        )
        assert not result.ok and result.entries == []
        assert [i for i, _ in result.errors] == [1]
        assert prefix + "decision" in result.errors[0][1]
        assert c1.kv_get(prefix + "other") is None
        entry = c1.kv_get(prefix + "decision")
        assert entry is not None and entry.value == b"commit"

    def test_check_index_rolls_back_on_a_stale_index(self, c1: ConsulClient, prefix: str) -> None:
        c1.kv_put(prefix + "node", b"staging")
        stale = c1.kv_get(prefix + "node")
        assert stale is not None
        c1.kv_put(prefix + "node", b"ready")
        result = c1.txn(
            [
                TxnOp.check_index(prefix + "node", stale.modify_index),
                TxnOp.set(prefix + "current", b"r1"),
            ]
        )
        assert not result.ok and result.errors[0][0] == 0
        assert c1.kv_get(prefix + "current") is None
        fresh = c1.kv_get(prefix + "node")
        assert fresh is not None
        assert c1.txn(
            [
                TxnOp.check_index(prefix + "node", fresh.modify_index),
                TxnOp.set(prefix + "current", b"r1"),
            ]
        ).ok

    def test_check_session(self, c1: ConsulClient, prefix: str) -> None:
        mine = c1.session_create("rwtest-txn-mine", 10)
        theirs = c1.session_create("rwtest-txn-theirs", 10)
        try:
            assert c1.kv_put(prefix + "coordinator", b"me", acquire=mine)
            ok = c1.txn(
                [
                    TxnOp.check_session(prefix + "coordinator", mine),
                    TxnOp.set(prefix + "decision", b"commit"),
                ]
            )
            assert ok.ok
            refused = c1.txn(
                [
                    TxnOp.check_session(prefix + "coordinator", theirs),
                    TxnOp.delete(prefix + "decision"),
                ]
            )
            assert not refused.ok and refused.errors[0][0] == 0
            assert c1.kv_get(prefix + "decision") is not None
        finally:
            c1.session_destroy(mine)
            c1.session_destroy(theirs)

    def test_delete_cas_and_delete_tree(self, c1: ConsulClient, prefix: str) -> None:
        c1.kv_put(prefix + "inflight", b"d1")
        c1.kv_put(prefix + "tree/a", b"")
        entry = c1.kv_get(prefix + "inflight")
        assert entry is not None
        result = c1.txn(
            [
                TxnOp.delete_cas(prefix + "inflight", entry.modify_index),
                TxnOp.delete_tree(prefix + "tree/"),
            ]
        )
        assert result.ok
        assert c1.kv_list(prefix) == []

    def test_empty_txn_is_ok(self, c1: ConsulClient) -> None:
        assert c1.txn([]).ok


class TestSessions:
    def test_create_renew_info_destroy(self, cluster: ConsulCluster, c1: ConsulClient) -> None:
        sid = c1.session_create("rwtest-s", 2)
        info = c1.session_info(sid)
        assert info is not None
        assert (info["Name"], info["TTL"], info["Behavior"], info["Node"]) == (
            "rwtest-s",
            "2s",
            "delete",
            cluster.hosts[0].name,
        )
        assert info["LockDelay"] == 0
        assert c1.session_renew(sid) is True
        c1.session_destroy(sid)
        assert c1.session_info(sid) is None
        assert c1.session_renew(sid) is False

    def test_unknown_session(self, c1: ConsulClient) -> None:
        unknown = str(uuid.uuid4())
        assert c1.session_info(unknown) is None
        assert c1.session_renew(unknown) is False
        c1.session_destroy(unknown)

    def test_expires_when_not_renewed(self, c1: ConsulClient, prefix: str) -> None:
        sid = c1.session_create("rwtest-expire", 1)
        assert c1.kv_put(prefix + "members/n1", b"", acquire=sid)
        started = time.monotonic()
        while c1.session_info(sid) is not None:
            assert time.monotonic() - started < 2 * 1 + 3, "session outlived 2x its TTL + 3s"
            time.sleep(0.2)
        assert c1.kv_get(prefix + "members/n1") is None

    def test_lock_key_deleted_when_session_destroyed(
        self, c1: ConsulClient, c2: ConsulClient, prefix: str
    ) -> None:
        key = prefix + "members/host-1"
        sid = c1.session_create("rwtest-member", 10)
        other = c2.session_create("rwtest-other", 10, behavior="release")
        try:
            assert c1.kv_put(key, b"alive", acquire=sid) is True
            assert c2.kv_put(key, b"steal", acquire=other) is False
            entry = c2.kv_get(key)
            assert entry is not None and entry.session == sid and entry.lock_index == 1
            c1.session_destroy(sid)
            assert c2.kv_get(key) is None
        finally:
            c2.session_destroy(other)

    def test_release_keeps_the_key(self, c1: ConsulClient, prefix: str) -> None:
        key = prefix + "lock"
        sid = c1.session_create("rwtest-release", 10)
        try:
            assert c1.kv_put(key, b"v", acquire=sid)
            assert c1.kv_put(key, b"v", release=sid)
            entry = c1.kv_get(key)
            assert entry is not None and entry.session is None
        finally:
            c1.session_destroy(sid)

    def test_ttl_only_session_and_release_behavior(self, c1: ConsulClient) -> None:
        sid = c1.session_create("rwtest-ttl-only", 5, behavior="release", checks=[])
        try:
            info = c1.session_info(sid)
            assert info is not None and info["Behavior"] == "release"
            assert not info.get("NodeChecks") and not info.get("Checks")
        finally:
            c1.session_destroy(sid)

    def test_acquire_with_an_unknown_session_is_refused(
        self, c1: ConsulClient, prefix: str
    ) -> None:
        started = time.monotonic()
        with pytest.raises(ConsulRequestError, match=r"(?i)invalid session"):
            c1.kv_put(prefix + "x", b"", acquire=str(uuid.uuid4()))
        assert time.monotonic() - started < 2.0  # not retried as if it were transient


class TestEvents:
    def test_fire_and_list_across_agents(self, c1: ConsulClient, c2: ConsulClient) -> None:
        name = f"rwtest-{uuid.uuid4().hex[:8]}"
        index, events = c2.event_list(name)
        assert events == []
        payload = json.dumps({"app": "web", "artifact": "master-15eb13af"}).encode()
        event_id = c1.event_fire(name, payload)
        new_index, events = c2.event_list(name, index=index, wait=10.0)
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:  # the list may change for others
            new_index, events = c2.event_list(name, index=new_index, wait=5.0)
        assert new_index != index
        assert [(e.id, e.name, e.payload) for e in events] == [(event_id, name, payload)]
        assert events[0].ltime > 0

    def test_blocking_list_times_out_unchanged(self, c1: ConsulClient) -> None:
        # A name nobody fires: an event of an earlier test still gossiping to this agent
        # must not end the wait early (the agent re-blocks while the filtered list is the same).
        name = f"rwtest-quiet-{uuid.uuid4().hex[:8]}"
        index, _ = c1.event_list(name)
        started = time.monotonic()
        same, _ = c1.event_list(name, index=index, wait=1.0)
        assert 0.9 <= time.monotonic() - started < 4.0
        assert same == index

    def test_index_changes_with_each_event(self, c1: ConsulClient) -> None:
        name = f"rwtest-{uuid.uuid4().hex[:8]}"
        seen: set[str] = set()
        for i in range(3):
            c1.event_fire(name, str(i).encode())
            deadline = time.monotonic() + 5
            while True:
                index, events = c1.event_list(name)
                if len(events) == i + 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert len(events) == i + 1
            seen.add(index)
        assert len(seen) == 3  # compared for change only: the order of the values is arbitrary
        # Events a caller has handled are left out; the index still says the list changed.
        first, *rest = events
        same_index, unhandled = c1.event_list(name, skip={first.id})
        assert [e.id for e in unhandled] == [e.id for e in rest]
        assert same_index == index

    def test_empty_payload(self, c1: ConsulClient) -> None:
        name = f"rwtest-{uuid.uuid4().hex[:8]}"
        event_id = c1.event_fire(name, b"")
        deadline = time.monotonic() + 5
        events: list = []
        while not events and time.monotonic() < deadline:
            _, events = c1.event_list(name)
        assert [(e.id, e.payload) for e in events] in ([(event_id, None)], [(event_id, b"")])

    def test_firing_loads_no_second_http_stack(
        self, cluster: ConsulCluster, c2: ConsulClient
    ) -> None:
        # `watcherctl deploy` fires `deploy` while every daemon works on that deploy: the
        # fire goes through the transport, without py-consul, requests or urllib3.
        name = f"rwtest-{uuid.uuid4().hex[:8]}"
        host = cluster.hosts[0]
        address = f"{host.ip}:{host.port}"
        code = (
            "import sys\n"
            "from watcher.config import ConsulSettings\n"
            "from watcher.consul_api import ConsulClient\n"
            f"client = ConsulClient(ConsulSettings(address={address!r}))\n"
            f'print(client.event_fire({name!r}, b\'{{"app": "web"}}\'))\n'
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout.splitlines()
        event_id, loaded = out[0], set(out[1].split())
        assert "watcher" in loaded
        assert loaded.isdisjoint({"consul", "requests", "urllib3", "tenacity"})
        deadline = time.monotonic() + 10
        events: list = []
        while not events and time.monotonic() < deadline:
            _, events = c2.event_list(name, wait=1.0, index="0")
        assert [(e.id, e.payload) for e in events] == [(event_id, b'{"app": "web"}')]

    def test_oversized_payload_is_refused(self, c1: ConsulClient) -> None:
        started = time.monotonic()
        with pytest.raises(ConsulRequestError, match="size limit"):
            c1.event_fire("rwtest-big", b"x" * 2048)
        assert time.monotonic() - started < 2.0


class TestFailures:
    def test_unreachable_agent_fails_fast(self, loopback_base: str) -> None:
        settings = ConsulSettings(address=f"{loopback_base}.250:8599", timeout=2.0)
        client = ConsulClient(settings, retry_deadline=1.5)
        started = time.monotonic()
        with pytest.raises(
            ConsulUnavailable, match=rf"{loopback_base}\.250:8599.*is the agent running"
        ):
            client.kv_get("anything")
        assert time.monotonic() - started < 4.0


def counted(action: Callable[[], object]) -> dict[str, int]:
    """The Consul requests ``action`` made, by kind (the process-wide counter's delta)."""
    before = request_counts()
    action()
    after = request_counts()
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


class TestRequestCounter:
    def test_each_request_counted_once_by_kind(self, c1: ConsulClient, prefix: str) -> None:
        key = prefix + "k"

        def kv_and_txn() -> None:
            c1.kv_put(key, b"1")
            entry = c1.kv_get(key)
            assert entry is not None
            c1.kv_get_blocking(key, entry.modify_index, wait=0.2)
            c1.kv_list(prefix)
            c1.kv_list_blocking(prefix, entry.modify_index, wait=0.2)
            c1.kv_keys(prefix)
            assert c1.txn([TxnOp.get(key), TxnOp.set(key, b"2")]).ok
            c1.kv_delete(key)

        assert counted(kv_and_txn) == {
            "kv_put": 1,
            "kv_get": 1,
            "kv_get_blocking": 1,
            "kv_list": 1,
            "kv_list_blocking": 1,
            "kv_keys": 1,
            "txn": 1,
            "kv_delete": 1,
        }

        def sessions_and_events() -> None:
            session = c1.session_create("rwtest-count", 10)
            assert c1.session_renew(session)
            c1.session_destroy(session)
            name = f"rwtest-{uuid.uuid4().hex[:8]}"
            index, _ = c1.event_list(name)
            c1.event_fire(name, b"x")
            c1.event_list(name, index=index, wait=0.5)

        assert counted(sessions_and_events) == {
            "session_create": 1,
            "session_renew": 1,
            "session_destroy": 1,
            "event_list": 1,
            "event_fire": 1,
            "event_list_blocking": 1,
        }

    def test_every_retry_is_another_request(self) -> None:
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        client = ConsulClient(ConsulSettings(address=f"127.0.0.1:{port}"), retry_deadline=1.0)

        def refused() -> None:
            with pytest.raises(ConsulUnavailable):
                client.kv_get("rwtest/anything")

        delta = counted(refused)
        assert set(delta) == {"kv_get"}
        assert delta["kv_get"] >= 2  # the first attempt and at least one retry
        client.close()
