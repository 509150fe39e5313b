"""The Consul test cluster: agents share KV, events and sessions, and the fault helpers work."""

from __future__ import annotations

import base64
import time
import uuid

import pytest
import requests

from tests.support.cluster import Agent, ClusterSpec, ConsulCluster

CLUSTER = ClusterSpec(hosts=3)

# Session invalidation after a SIGKILL takes ~7 s with default gossip timings (DESIGN.md 5);
# this bound leaves room for a loaded 2-core machine.
SESSION_INVALIDATION_BOUND = 20.0


def url(agent: Agent, path: str) -> str:
    return agent.base_url + path


def put_key(agent: Agent, key: str, value: bytes, **params: str) -> bool:
    resp = requests.put(url(agent, f"/v1/kv/{key}"), data=value, params=params, timeout=5)
    resp.raise_for_status()
    return bool(resp.json())


def get_key(agent: Agent, key: str) -> bytes | None:
    resp = requests.get(url(agent, f"/v1/kv/{key}"), timeout=5)
    if resp.status_code == 404:
        return None
    resp.raise_for_status()
    return base64.b64decode(resp.json()[0]["Value"] or "")


def create_session(agent: Agent) -> str:
    resp = requests.put(
        url(agent, "/v1/session/create"),
        timeout=5,
        json={"Name": "rwtest", "Behavior": "delete", "LockDelay": "0s"},
    )
    resp.raise_for_status()
    return str(resp.json()["ID"])


def session_exists(agent: Agent, session_id: str) -> bool:
    resp = requests.get(url(agent, f"/v1/session/info/{session_id}"), timeout=5)
    resp.raise_for_status()
    return bool(resp.json())


class TestCluster:
    def test_cluster_has_a_leader_and_every_member_alive(self, cluster: ConsulCluster) -> None:
        print(
            f"cluster of 1 server + {len(cluster.hosts)} hosts started in {cluster.started_in:.1f}s"
        )
        leader = requests.get(url(cluster.server, "/v1/status/leader"), timeout=5).json()
        assert leader == f"{cluster.server.ip}:8300"
        members = requests.get(url(cluster.hosts[0], "/v1/agent/members"), timeout=5).json()
        assert {m["Name"]: m["Status"] for m in members} == {
            "consul-server": 1,
            "host-1": 1,
            "host-2": 1,
            "host-3": 1,
        }
        for agent in cluster.hosts:
            me = requests.get(url(agent, "/v1/agent/self"), timeout=5).json()
            assert me["Config"]["NodeName"] == agent.name
            assert agent.consul_settings().base_url == agent.base_url
            assert agent.env() == {"CONSUL_HTTP_ADDR": f"{agent.ip}:8500"}

    def test_key_written_through_one_agent_is_read_through_another(
        self, cluster: ConsulCluster
    ) -> None:
        key = f"rwtest/kv/{uuid.uuid4().hex}"
        first, last = cluster.hosts[0], cluster.hosts[-1]

        assert put_key(first, key, b"hello")

        assert get_key(last, key) == b"hello"
        assert get_key(cluster.server, key) == b"hello"

    def test_event_fired_on_one_agent_is_listed_on_the_others(self, cluster: ConsulCluster) -> None:
        name = f"rwtest-{uuid.uuid4().hex[:8]}"
        source, others = cluster.hosts[0], [cluster.server, *cluster.hosts[1:]]
        # The list index is derived from the newest event's ID: compare it for change only.
        indexes = {}
        for agent in others:
            resp = requests.get(url(agent, "/v1/event/list"), params={"name": name}, timeout=5)
            assert resp.json() == []
            indexes[agent.name] = resp.headers["X-Consul-Index"]

        t0 = time.monotonic()
        fired = requests.put(
            url(source, f"/v1/event/fire/{name}"), data=b'{"app":"web"}', timeout=5
        )
        fired.raise_for_status()
        event_id = fired.json()["ID"]

        took = {}
        for agent in others:
            deadline = time.monotonic() + 10
            while True:
                resp = requests.get(
                    url(agent, "/v1/event/list"),
                    timeout=10,
                    params={"name": name, "index": indexes[agent.name], "wait": "2s"},
                )
                events = {e["ID"]: e for e in resp.json()}
                if event_id in events:
                    took[agent.name] = time.monotonic() - t0
                    assert base64.b64decode(events[event_id]["Payload"]) == b'{"app":"web"}'
                    assert resp.headers["X-Consul-Index"] != indexes[agent.name]
                    break
                assert time.monotonic() < deadline, f"{agent.name} never listed {event_id}"
                indexes[agent.name] = resp.headers["X-Consul-Index"]
        print("event seen after: " + ", ".join(f"{n}={t * 1000:.0f}ms" for n, t in took.items()))

    def test_session_of_a_killed_agent_is_invalidated(self, cluster: ConsulCluster) -> None:
        victim = cluster.hosts[1]
        session = create_session(victim)
        key = f"rwtest/members/{uuid.uuid4().hex}"
        assert put_key(victim, key, b"me", acquire=session)

        cluster.kill(victim)
        t0 = time.monotonic()
        try:
            while session_exists(cluster.server, session):
                assert time.monotonic() - t0 < SESSION_INVALIDATION_BOUND, (
                    f"session still valid {SESSION_INVALIDATION_BOUND}s after SIGKILL"
                )
                time.sleep(0.1)
            took = time.monotonic() - t0
            print(f"session invalidated {took:.2f}s after SIGKILL of {victim.name}")
            assert get_key(cluster.server, key) is None  # behavior=delete removed the lock key
            assert cluster.member_status(victim) == "failed"
        finally:
            cluster.start(victim)

        assert cluster.member_status(victim) == "alive"
        assert put_key(victim, key, b"again", acquire=create_session(victim))

    def test_restart_brings_the_agent_back(self, cluster: ConsulCluster) -> None:
        agent = cluster.hosts[2]
        old_pid = agent.proc.pid if agent.proc else None

        cluster.restart(agent)

        assert agent.proc is not None and agent.proc.pid != old_pid
        assert cluster.member_status(agent) == "alive"
        key = f"rwtest/restart/{uuid.uuid4().hex}"
        assert put_key(agent, key, b"back")
        assert get_key(cluster.hosts[0], key) == b"back"

    def test_stop_is_graceful_but_does_not_leave(self, cluster: ConsulCluster) -> None:
        agent = cluster.hosts[0]
        cluster.stop(agent)
        try:
            assert agent.proc is None
            with pytest.raises(requests.ConnectionError):
                requests.get(url(agent, "/v1/agent/self"), timeout=2)
            # leave_on_terminate is off: the others see a failed node, not one that left.
            cluster.wait_member_status(agent, "failed")
        finally:
            cluster.start(agent)
        assert cluster.member_status(agent) == "alive"

    @pytest.mark.root
    def test_cut_off_host_fails_and_reconnect_restores_it(self, cluster: ConsulCluster) -> None:
        agent = cluster.hosts[0]
        cluster.cut_off(agent)
        try:
            took = cluster.wait_member_status(agent, "failed")
            print(f"{agent.name} seen failed {took:.1f}s after it was cut off")
            with pytest.raises(requests.ConnectionError):
                requests.get(url(agent, "/v1/agent/self"), timeout=1)
            assert agent.running  # the process lives on, only its network is gone
        finally:
            cluster.reconnect(agent)
        took = cluster.wait_member_status(agent, "alive")
        print(f"{agent.name} alive again {took:.1f}s after reconnect")
        key = f"rwtest/cut/{uuid.uuid4().hex}"
        assert put_key(agent, key, b"reachable")
        assert get_key(cluster.server, key) == b"reachable"
