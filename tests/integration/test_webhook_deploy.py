"""Deploy notifications from real daemons on a real cluster to a local webhook receiver."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.fleet import Fleet, wait_for
from tests.support.receiver import Receiver
from watcher.config import S3Settings
from watcher.webhook import DRAIN_AT_STOP

CLUSTER = ClusterSpec(hosts=3)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.stop()


def make_fleet(
    cluster: ConsulCluster, s3: S3Settings, workdir: Path, receiver: Receiver, timeout: str
) -> Fleet:
    return Fleet(
        cluster,
        s3,
        workdir,
        kv_prefix=f"w{time.monotonic_ns()}",
        app_extra={"webhook": {"url": receiver.url, "timeout": timeout, "retries": 0}},
    )


def events(receiver: Receiver, deploy: str) -> list[str]:
    return [b["event"] for b in receiver.bodies if b["deploy"] == deploy]


class TestWebhookFromTheCoordinator:
    def test_one_message_per_outcome(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path, receiver: Receiver
    ) -> None:
        fleet = make_fleet(cluster, s3_settings, tmp_path, receiver, "5s")
        bad = fleet.watchers[2]
        fleet.start()
        try:
            v1 = fleet.publish("v1")
            ok = fleet.watchers[0].ctl_json("deploy", "web", v1.id)
            assert ok["result"] == "committed", ok
            fleet.wait_idle()
            wait_for(lambda: len(events(receiver, ok["deploy"])) >= 2, 20, "two messages")
            time.sleep(2)  # anything extra (a duplicate) would arrive by now
            assert events(receiver, ok["deploy"]) == ["started", "committed"]
            msgs = [b for b in receiver.bodies if b["deploy"] == ok["deploy"]]
            assert len({m["by"] for m in msgs}) == 1  # the coordinator, and only it
            assert all(m["release"] == ok["release"] and "text" in m for m in msgs)
            assert ok["release"] in msgs[1]["text"]

            # A host whose post_release fails: one "aborted" naming it and the reason.
            hook = tmp_path / "fail"
            hook.write_text("#!/bin/sh\necho 'migrations failed: table locked' >&2\nexit 3\n")
            hook.chmod(0o755)
            fleet.write_config(bad, {"hooks": {"post_release": str(hook)}})
            bad.stop()
            bad.start()
            fleet.wait_members(3)
            v2 = fleet.publish("v2")
            result = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False)
            failed: dict[str, Any] = json.loads(result.stdout)
            assert failed["result"] == "aborted", failed
            fleet.wait_idle()
            wait_for(lambda: "aborted" in events(receiver, failed["deploy"]), 20, "aborted")
            time.sleep(2)
            assert events(receiver, failed["deploy"]) == ["started", "aborted"]
            [aborted] = [
                b
                for b in receiver.bodies
                if b["deploy"] == failed["deploy"] and b["event"] == "aborted"
            ]
            assert list(aborted["failing_hosts"]) == [bad.name]
            assert "status 3" in aborted["failing_hosts"][bad.name]
            assert bad.name in aborted["text"] and "status 3" in aborted["text"]

            # A fleet rollback: "started", then one "rolled_back".
            fleet.write_config(bad)
            bad.stop()
            bad.start()
            fleet.wait_members(3)
            again = fleet.watchers[1].ctl_json("deploy", "web", v2.id)
            assert again["result"] == "committed", again
            fleet.wait_idle()
            back = fleet.watchers[1].ctl_json("rollback", "web")
            assert back["result"] == "committed", back
            fleet.wait_idle()
            wait_for(lambda: len(events(receiver, back["deploy"])) >= 2, 20, "rollback messages")
            time.sleep(2)
            assert events(receiver, back["deploy"]) == ["started", "rolled_back"]
            assert events(receiver, again["deploy"]) == ["started", "committed"]
        finally:
            fleet.stop()

    def test_hosts_the_abort_stopped_are_not_named_failing(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path, receiver: Receiver
    ) -> None:
        """One host fails at once while the others are still in a slow post_release: those
        stop because the deploy was aborted, and say so (``aborted``); the message names
        only the host that failed."""
        fleet = make_fleet(cluster, s3_settings, tmp_path, receiver, "5s")
        bad, slow = fleet.watchers[2], fleet.watchers[:2]
        fleet.give_hook(bad, "post_release", 0, exit_code=3)
        for w in slow:
            fleet.give_hook(w, "post_release", 6)
        fleet.start()
        try:
            v1 = fleet.publish("v1")
            result = fleet.watchers[0].ctl("deploy", "web", v1.id, check=False)
            done: dict[str, Any] = json.loads(result.stdout)
            assert done["result"] == "aborted", done
            fleet.wait_idle()
            states = {
                w.name: json.loads(entry.value)["state"]
                for w in fleet.watchers
                if (entry := fleet.kv.kv_get(fleet.keys.progress(done["deploy"], w.name)))
            }
            assert states == {bad.name: "failed", **{w.name: "aborted" for w in slow}}, states
            wait_for(lambda: "aborted" in events(receiver, done["deploy"]), 20, "aborted")
            [body] = [
                b
                for b in receiver.bodies
                if b["deploy"] == done["deploy"] and b["event"] == "aborted"
            ]
            assert list(body["failing_hosts"]) == [bad.name], body
            assert all(body["hosts"][w.name] == "aborted" for w in slow), body
        finally:
            fleet.stop()

    def test_an_operators_abort_names_no_host_failing(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path, receiver: Receiver
    ) -> None:
        """`watcherctl abort` while every host is in a slow post_release: no host failed,
        so each acks ``aborted`` with the operator's reason, and the message names no
        failing host (an alert on failing hosts must not page for a deliberate abort)."""
        fleet = make_fleet(cluster, s3_settings, tmp_path, receiver, "5s")
        # Never opened: every host stays in post_release until the abort stops its hook (a
        # fixed slow hook could end before `abort` ran on a loaded runner: a commit).
        gate = tmp_path / "gate"
        for w in fleet.watchers:
            fleet.give_gated_hook(w, "post_release", gate)
        fleet.start()
        try:
            v1 = fleet.publish("v1")
            started = fleet.watchers[0].ctl_json("deploy", "web", v1.id, "--no-wait")
            deploy_id = started["deploy"]
            wait_for(lambda: "started" in events(receiver, deploy_id), 20, "started")
            answer = fleet.watchers[0].ctl_json("abort", deploy_id, "--reason", "wrong build")
            assert answer["aborted"], answer
            assert fleet.wait_outcome(deploy_id)["result"] == "aborted"
            fleet.wait_idle()
            acks = [
                json.loads(entry.value)
                for w in fleet.watchers
                if (entry := fleet.kv.kv_get(fleet.keys.progress(deploy_id, w.name)))
            ]
            assert len(acks) == 3 and {a["state"] for a in acks} == {"aborted"}, acks
            assert all("abort requested by" in a["error"] for a in acks), acks
            assert all(a["error"].endswith("wrong build") for a in acks), acks
            wait_for(lambda: "aborted" in events(receiver, deploy_id), 20, "aborted")
            [body] = [
                b for b in receiver.bodies if b["deploy"] == deploy_id and b["event"] == "aborted"
            ]
            assert body["failing_hosts"] == {}, body
            assert "wrong build" in body["reason"] and "(and" not in body["reason"], body
        finally:
            fleet.stop()

    def test_a_hanging_receiver_does_not_delay_the_deploy(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path, receiver: Receiver
    ) -> None:
        receiver.hang.set()  # every POST waits until the test releases it
        fleet = make_fleet(cluster, s3_settings, tmp_path, receiver, "50s")
        fleet.start()
        try:
            v1 = fleet.publish("v1")
            started = time.monotonic()
            result = fleet.watchers[0].ctl_json("deploy", "web", v1.id, "--timeout", "40")
            took = time.monotonic() - started
            assert result["result"] == "committed", result
            # The coordinator's "started" POST is still hanging (timeout 50 s), and the
            # deploy did not wait for it.
            assert receiver.arrived.acquire(timeout=1)
            assert receiver.bodies == []
            assert took < 40, f"deploy took {took:.1f}s"
            fleet.wait_idle()
        finally:
            receiver.release.set()
            fleet.stop()
        # A stopping daemon gives what it has queued a few seconds: both were posted
        # before the coordinator's process exited, the "committed" one included.
        assert sorted(b["event"] for b in receiver.bodies) == ["committed", "started"]

    def test_a_stop_gives_a_hanging_receiver_a_bounded_wait(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path, receiver: Receiver
    ) -> None:
        receiver.hang.set()
        fleet = make_fleet(cluster, s3_settings, tmp_path, receiver, "50s")
        fleet.start()
        try:
            v1 = fleet.publish("v1")
            result = fleet.watchers[0].ctl_json("deploy", "web", v1.id, "--timeout", "40")
            assert result["result"] == "committed", result
            fleet.wait_idle()
            assert receiver.arrived.acquire(timeout=5)
            started = time.monotonic()
            fleet.stop()
            took = time.monotonic() - started
        finally:
            receiver.release.set()
            fleet.stop()
        # The coordinator waited for its two messages, then gave up; nobody waited 50 s.
        assert DRAIN_AT_STOP - 0.5 < took < DRAIN_AT_STOP + 15, f"stopping took {took:.1f}s"
        unsent = [e for w in fleet.watchers for e in w.log_events("webhook_unsent_at_stop")]
        assert len(unsent) == 1 and unsent[0]["messages"] == 2, unsent


class TestReload:
    def test_a_reload_moves_notifications_to_the_new_webhook(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path, receiver: Receiver
    ) -> None:
        """`systemctl reload watcher` (SIGHUP) after the webhook URL changed: the next
        deploy's messages go to the new receiver, none to the old one."""
        fleet = make_fleet(cluster, s3_settings, tmp_path, receiver, "5s")
        fleet.start()
        moved = Receiver()
        try:
            fleet.app_extra = {"webhook": {"url": moved.url, "timeout": "5s", "retries": 0}}
            for w in fleet.watchers:
                fleet.write_config(w)
                w.proc.send_signal(signal.SIGHUP)
            for w in fleet.watchers:
                wait_for(
                    lambda w=w: bool(w.log_events("config_reloaded")),
                    20,
                    f"{w.name} reloaded",
                )
            v1 = fleet.publish("v1")
            ok = fleet.watchers[0].ctl_json("deploy", "web", v1.id)
            assert ok["result"] == "committed", ok
            wait_for(lambda: len(events(moved, ok["deploy"])) >= 2, 20, "two messages")
            time.sleep(1)
            assert events(moved, ok["deploy"]) == ["started", "committed"]
            assert events(receiver, ok["deploy"]) == []
        finally:
            fleet.stop()
            moved.stop()

    def test_a_stop_after_a_reload_still_sends_what_the_old_webhook_had_queued(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path, receiver: Receiver
    ) -> None:
        """A reload replaces the sender while the deploy's messages wait behind a slow
        receiver; a stop right after gives them its bounded wait too, not only the new
        sender's (which has nothing queued)."""
        receiver.hang.set()
        fleet = make_fleet(cluster, s3_settings, tmp_path, receiver, "50s")
        fleet.start()
        moved = Receiver()
        try:
            v1 = fleet.publish("v1")
            ok = fleet.watchers[0].ctl_json("deploy", "web", v1.id, "--timeout", "40")
            assert ok["result"] == "committed", ok
            fleet.wait_idle()
            assert receiver.arrived.acquire(timeout=5)  # "started" hangs, "committed" waits
            fleet.app_extra = {"webhook": {"url": moved.url, "timeout": "5s", "retries": 0}}
            for w in fleet.watchers:
                fleet.write_config(w)
                w.proc.send_signal(signal.SIGHUP)
            for w in fleet.watchers:
                wait_for(lambda w=w: bool(w.log_events("webhook_reloaded")), 20, f"{w.name}")
            # The slow receiver answers 2 s into the stop, within the stop's wait.
            threading.Timer(2.0, receiver.release.set).start()
            fleet.stop()
        finally:
            receiver.release.set()
            fleet.stop()
            moved.stop()
        assert events(receiver, ok["deploy"]) == ["started", "committed"]
        assert moved.bodies == []
        assert not [e for w in fleet.watchers for e in w.log_events("webhook_unsent_at_stop")]
