"""The barrier's KV operations against a real Consul agent, without daemons."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.cluster import ClusterSpec, ConsulCluster
from watcher.barrier import DeployStore, evaluate, rollback_target
from watcher.consul_api import ConsulClient
from watcher.errors import DeployInFlight, DeployRefused
from watcher.records import (
    ABORT,
    COMMIT,
    READY,
    ArtifactRecord,
    CurrentRecord,
    Decision,
    DeployRecord,
    NodeProgress,
    iso,
    utcnow,
)

CLUSTER = ClusterSpec(hosts=1)
SHA = "a" * 64


@pytest.fixture
def store(cluster: ConsulCluster) -> Iterator[DeployStore]:
    consul = ConsulClient(cluster.hosts[0].consul_settings())
    yield DeployStore(consul, f"b{time.monotonic_ns()}", "web")
    consul.close()


def artifact(artifact_id: str = "main-15eb13af") -> ArtifactRecord:
    return ArtifactRecord(id=artifact_id, url="s3://b/a/web/x.tar.gz", sha256=SHA, size=1)


def start(
    store: DeployStore, deploy_id: str, expected: list[str], artifact_id: str = "main-15eb13af"
) -> DeployRecord:
    record = store.new_record(
        deploy_id=deploy_id,
        kind="deploy",
        artifact=artifact(artifact_id),
        release=None,
        requested_by="tests",
        expected=expected,
        prepare_timeout=60,
        apply_timeout=60,
    )
    assert store.start(record, history_keep=10)
    return record


class TestOneDecision:
    def test_second_decision_loses_and_second_deploy_is_refused(self, store: DeployStore) -> None:
        rec = start(store, "d1", ["n1"])
        with pytest.raises(DeployInFlight, match="d1"):
            start(store, "d2", ["n1"])
        view = store.view("d1")
        assert view is not None
        assert store.decide(view, ABORT, "first", by="a")
        assert not store.decide(view, ABORT, "second", by="b")
        view = store.view("d1")
        assert view is not None and view.decision is not None
        assert view.decision.reason == "first"
        assert rec.id == "d1"

    def test_commit_needs_the_coordinator_lock(self, store: DeployStore) -> None:
        start(store, "d1", ["n1"])
        session = store.consul.session_create("t", 10)
        try:
            store.write_progress("d1", "n1", "staging")
            store.write_progress("d1", "n1", READY)
            view = store.view("d1")
            assert view is not None
            # nobody holds the coordinator key: the check-session fails
            assert not store.decide(view, COMMIT, "x", by="n1", session=session)
            assert store.acquire_coordinator("d1", session, "n1")
            view = store.view("d1")
            assert view is not None
            assert store.decide(view, COMMIT, "x", by="n1", session=session)
            current, _ = store.current()
            assert current is not None and current.deploy == "d1"
        finally:
            store.consul.session_destroy(session)

    def test_no_expected_nodes_never_commits(self, store: DeployStore) -> None:
        start(store, "d1", [])
        view = store.view("d1")
        assert view is not None
        index = store.consul.kv_get(store.keys.inflight).modify_index  # type: ignore[union-attr]
        step = evaluate(
            store,
            view,
            node="n1",
            session=None,
            is_coordinator=True,
            inflight_index=index,
            members={"n1"},
            history_keep=10,
            on_validate_failure="rollback",
        )
        assert step.action == "aborted" and "no expected nodes" in step.detail


class TestRollbackTarget:
    def test_only_committed_releases_are_targets(self, store: DeployStore) -> None:
        rec = start(store, "d1", ["n1"], "main-aaaaaaaa")
        view = store.view("d1")
        assert view is not None and store.decide(view, ABORT, "failed", by="t")
        with pytest.raises(DeployRefused, match="not committed"):
            rollback_target(store, rec.release)
        # a committed one (the decision written as the coordinator's commit would be)
        rec2 = store.new_record(
            deploy_id="d2",
            kind="deploy",
            artifact=artifact("main-bbbbbbbb"),
            release=None,
            requested_by="t",
            expected=["n1"],
            prepare_timeout=60,
            apply_timeout=60,
        )
        store.consul.kv_delete(store.keys.inflight)
        assert store.start(rec2, history_keep=10)
        decision = Decision(outcome=COMMIT, reason="ok", by="t", at=iso(utcnow()))
        store.consul.kv_put(store.keys.decision("d2"), decision.to_json())
        assert rollback_target(store, rec2.release).deploy == "d2"

    def test_previous_of_current(self, store: DeployStore) -> None:
        current = CurrentRecord(
            release="20261126T000000Z-main-bbbbbbbb",
            artifact="main-bbbbbbbb",
            sha256=SHA,
            deploy="d2",
            previous={
                "release": "20261125T000000Z-main-aaaaaaaa",
                "artifact": "main-aaaaaaaa",
                "sha256": SHA,
                "deploy": "d1",
            },
        )
        store.consul.kv_put(store.keys.current, current.to_json())
        assert rollback_target(store, None).release == "20261125T000000Z-main-aaaaaaaa"


class TestBadDocuments:
    def test_unreadable_deploy_in_flight_can_be_aborted(self, store: DeployStore) -> None:
        store.consul.kv_put(store.keys.inflight, b"dx")
        store.consul.kv_put(store.keys.deploy("dx"), b"{not json")
        assert store.abort("dx", "operator", by="t")
        assert store.inflight() == (None, 0)
        outcome = store.consul.kv_get(store.keys.outcome("dx"))
        assert outcome is not None and b"record unreadable" in (outcome.value or b"")

    def test_garbled_events_seen_is_treated_as_none(self, store: DeployStore) -> None:
        store.consul.kv_put(store.keys.events_seen, "²".encode())
        store.consul.kv_put(store.keys.artifact("main-15eb13af"), artifact().to_json())
        store.consul.kv_put(store.keys.member("n1"), b"{}")  # no session: not a live member
        result = store.start_from_event(
            event_id="e1",
            ltime=5,
            kind="deploy",
            artifact_id="main-15eb13af",
            release=None,
            by="n1",
            prepare_timeout=60,
            apply_timeout=60,
            history_keep=10,
        )
        assert result.startswith("refused: ") and "no live members" in result
        seen = store.consul.kv_get(store.keys.events_seen)
        assert seen is not None and seen.value == b"5"

    def test_forward_only_progress(self, store: DeployStore) -> None:
        start(store, "d1", ["n1"])
        assert store.write_progress("d1", "n1", "staging")
        assert store.write_progress("d1", "n1", READY)
        assert not store.write_progress("d1", "n1", "staging")
        entry = store.consul.kv_get(store.keys.node_progress("d1", "n1"))
        assert entry is not None
        assert NodeProgress.from_json(entry.value).state == READY
