"""The barrier's KV operations and predicates against a real Consul agent, without daemons."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from structlog.testing import capture_logs

from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.deploys import start_deploy
from watcher.barrier import (
    CONTESTED,
    UNDECIDED,
    AbortRequested,
    DeployStore,
    EndRead,
    Joined,
    resolve_artifact,
    rollback_target,
)
from watcher.config import parse_config
from watcher.consul_api import ConsulClient, TxnOp
from watcher.ctl_fleet import rollback_request
from watcher.errors import DeployInFlight, DeployRefused
from watcher.records import (
    ABORT,
    COMMIT,
    COMMITTED,
    FAILED,
    LIVE,
    MAX_EXPECTED,
    READY,
    STAGING,
    ArtifactRecord,
    DeployRecord,
    NodeProgress,
    PinRecord,
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


def member(store: DeployStore, node: str) -> str:
    """A live member: a session holding ``members/<node>``; returns the session id."""
    session = store.consul.session_create(f"t {node}", 30, checks=[])
    assert store.consul.kv_put(store.keys.member(node), b"{}", acquire=session)
    return session


def start(store: DeployStore, deploy_id: str, sessions: dict[str, str]) -> Joined:
    return start_deploy(store, deploy_id, sessions, artifact())


def ack(store: DeployStore, joined: Joined, node: str, state: str, session: str = "") -> bool:
    if state == READY:
        current, _ = store.ack(joined.id, node)
        if current is None:
            assert store.write_progress(joined.id, node, STAGING, joined=joined)
    written = store.write_progress(
        joined.id, node, state, joined=joined, session=session, sha256=SHA
    )
    return written is not None


def raw_ack(store: DeployStore, deploy_id: str, node: str, progress: NodeProgress) -> None:
    """What a host token can do to its own keys: write anything, skipping every check (a
    ``request`` given goes where ready acks carry it, beside the ack)."""
    if progress.request is not None:
        carried = DeployRecord.from_dict(progress.request).canonical()
        assert store.consul.kv_put(store.keys.carried_request(deploy_id, node), carried)
        progress = replace(progress, request=None)
    assert store.consul.kv_put(store.keys.progress(deploy_id, node), progress.to_json())


class TestStart:
    def test_a_second_deploy_is_refused_naming_the_one_in_flight(self, store: DeployStore) -> None:
        s = member(store, "n1")
        start(store, "d1", {"n1": s})
        with pytest.raises(DeployInFlight, match="d1"):
            start(store, "d2", {"n1": s})

    def test_more_members_than_a_request_may_name_are_refused_before_any_write(
        self, store: DeployStore
    ) -> None:
        session = store.consul.session_create("t many", 60, checks=[])
        ops = [
            TxnOp.lock(store.keys.member(f"n{i}"), b"{}", session) for i in range(MAX_EXPECTED + 1)
        ]
        for at in range(0, len(ops), 64):  # Consul's limit of ops per txn
            assert store.consul.txn(ops[at : at + 64]).ok
        with pytest.raises(DeployRefused, match=f"more than the {MAX_EXPECTED} hosts"):
            store.expected_members(allow_missing=True)
        assert store.inflight() == (None, 0)

    @pytest.mark.parametrize("current_before", [True, False])
    def test_a_rollback_made_from_a_current_that_changed_is_not_started(
        self, store: DeployStore, current_before: bool
    ) -> None:
        """The race review: a rollback asked for as a deploy ended took its target from
        `current` read before that deploy's end (which rewrites `current` and clears
        `inflight` in one txn) and took the fleet back two releases."""
        s = member(store, "n1")
        if current_before:
            assert store.consul.kv_put(store.keys.current, b'{"before": 1}')
        _, read_index = store.current()
        assert store.consul.kv_put(store.keys.current, b'{"a deploy": "ended"}')
        record = store.new_record(
            deploy_id="rb1",
            kind="rollback",
            artifact=artifact(),
            release=None,
            requested_by="tests",
            expected={"n1": s},
            prepare_timeout=60,
            apply_timeout=60,
        )
        with pytest.raises(DeployRefused, match="current release changed while this rollback"):
            store.start(record, current_index=read_index)
        assert store.inflight() == (None, 0)
        assert store.request("rb1", consistent=True)[0] is None  # nothing was written
        assert store.start(record, current_index=store.current()[1])  # read again: started
        assert store.inflight()[0] == "rb1"

    def test_garbage_inflight_is_cleared_and_recorded(self, store: DeployStore) -> None:
        assert store.consul.kv_put(store.keys.inflight, b"no-such-deploy")
        inflight, index = store.inflight(consistent=True)
        assert inflight == "no-such-deploy"
        assert store.clear_inflight(inflight, index, "inflight names no request", by="n1")
        assert store.inflight() == (None, 0)
        outcome = store.outcome("no-such-deploy")
        assert outcome is not None and outcome.result == "refused"


class TestRawEvents:
    def test_an_event_another_host_took_in_the_meantime_is_not_history(
        self, store: DeployStore
    ) -> None:
        """Two hosts handle one raw `deploy` event (of an artifact nobody published). Host
        B looks for the event's record, finds none, and before it reads `events_seen`, host
        A writes the record and moves `events_seen` past the event in one txn. B must say
        the event exists (and so why it failed), not that it is history."""
        member(store, "a")
        event_id = "0c7d3a32-5a3b-4a4e-9d3e-8b7c6a5f4e3d"

        def handle(host: DeployStore, by: str) -> str:
            return host.start_from_event(
                event_id=event_id,
                ltime=7,
                kind="deploy",
                artifact_id="main-deadbeef",
                release=None,
                by=by,
                prepare_timeout=60,
                apply_timeout=60,
                history_keep=10,
            )

        class LateLook(DeployStore):
            """Host B: its first look for the record happens before host A's txn."""

            looked = False

            def deploy_record(self, deploy_id: str) -> DeployRecord | None:
                if not self.looked:
                    self.looked = True
                    said = handle(store, "a")  # host A, in between
                    assert said.startswith("refused: unknown artifact "), said
                    return None
                return super().deploy_record(deploy_id)

        prefix = store.keys.base.rsplit("/apps/", 1)[0]
        b = LateLook(store.consul, prefix, store.app)
        assert handle(b, "b") == "exists"
        outcome = store.outcome(event_id)
        assert outcome is not None and "unknown artifact main-deadbeef" in outcome.reason

    def test_a_build_still_uploading_is_refused_for_what_it_is(self, store: DeployStore) -> None:
        """A publish writes its record before it uploads: a raw `deploy` event, or a
        `watcherctl deploy`, naming the build then is refused with that reason, and nothing
        is started (every host's download would fail, and the deploy abort)."""
        member(store, "a")
        uploading = replace(
            artifact("main-0ddba110"),
            created_by="ci@build-7",
            created_at="2026-12-05T09:00:00Z",
            uploading=True,
        )
        store.consul.kv_put(store.keys.artifact(uploading.id), uploading.to_json())
        event_id = "9d4f6c2a-1b3e-4f5a-8c7d-6e5f4a3b2c1d"
        result = store.start_from_event(
            event_id=event_id,
            ltime=5,
            kind="deploy",
            artifact_id=uploading.id,
            release=None,
            by="a",
            prepare_timeout=60,
            apply_timeout=60,
            history_keep=10,
        )
        said = (
            "artifact main-0ddba110 is still being uploaded (its publish by ci@build-7 since "
            "2026-12-05T09:00:00Z has not finished)"
        )
        assert result.startswith("refused: artifact refused: ") and said in result, result
        assert store.inflight() == (None, 0)
        outcome = store.outcome(event_id)
        assert outcome is not None and outcome.result == "refused", outcome
        assert said in outcome.reason and "publish it again" in outcome.reason
        with pytest.raises(DeployRefused, match=re.escape(said)):
            resolve_artifact(store, uploading.id)
        done = replace(uploading, uploading=False)  # what its publish writes once uploaded
        store.consul.kv_put(store.keys.artifact(done.id), done.to_json())
        assert resolve_artifact(store, done.id) == done

    def test_an_events_seen_that_is_no_number_is_said_and_written_over(
        self, store: DeployStore
    ) -> None:
        member(store, "a")
        store.consul.kv_put(store.keys.events_seen, b"abc")
        with capture_logs() as logs:
            result = store.start_from_event(
                event_id="5b1e0f6a-3c2d-4e5f-8a9b-0c1d2e3f4a5b",
                ltime=3,
                kind="deploy",
                artifact_id="main-deadbeef",
                release=None,
                by="a",
                prepare_timeout=60,
                apply_timeout=60,
                history_keep=10,
            )
        assert result == "refused: unknown artifact main-deadbeef"  # acted on, not history
        said = [e for e in logs if e["event"] == "events_seen_unreadable"]
        assert said and said[0]["value"] == "abc", logs
        entry = store.consul.kv_get(store.keys.events_seen)
        assert entry is not None and entry.value == b"3"


class TestAcks:
    def test_acks_only_move_forward(self, store: DeployStore) -> None:
        s = member(store, "n1")
        joined = start(store, "d1", {"n1": s})
        assert ack(store, joined, "n1", STAGING)
        assert ack(store, joined, "n1", READY, s)
        assert not ack(store, joined, "n1", STAGING)
        assert not ack(store, joined, "n1", FAILED)
        got, _ = store.ack("d1", "n1")
        assert got is not None and got.state == READY
        carried = store.consul.kv_get(store.keys.carried_request("d1", "n1"))
        assert carried is not None and got.request is None  # beside the ack, not inside
        assert got.digest == joined.digest
        assert got.embedded_request(carried.value) == joined.request

    def test_ready_needs_the_session_the_request_named(self, store: DeployStore) -> None:
        s = member(store, "n1")
        joined = start(store, "d1", {"n1": s})
        assert ack(store, joined, "n1", STAGING)
        # The watcher restarted with a new session and took the member key back.
        store.consul.session_destroy(s)
        successor = member(store, "n1")
        assert not ack(store, joined, "n1", READY, successor)
        got, _ = store.ack("d1", "n1")
        assert got is not None and got.state == STAGING
        assert ack(store, joined, "n1", FAILED)  # saying no needs no session

    def test_ready_with_the_named_session_once_it_lost_the_member_key(
        self, store: DeployStore
    ) -> None:
        """The named session itself, but no longer holding the member key (destroyed, as
        by a stale process's deadline; or alive while the key was deleted and taken by
        another): the check rides in the ack's txn (DESIGN.md 6.4.1), not only in Python
        before it, where the session given is compared with the one named."""
        s = member(store, "n1")
        joined = start(store, "d1", {"n1": s})
        assert ack(store, joined, "n1", STAGING)
        store.consul.session_destroy(s)
        assert not ack(store, joined, "n1", READY, s)
        got, _ = store.ack("d1", "n1")
        assert got is not None and got.state == STAGING

        alive = member(store, "n2")
        joined = start_other(store, "d2", {"n2": alive})
        assert ack(store, joined, "n2", STAGING)
        assert store.consul.kv_delete(store.keys.member("n2"))
        member(store, "n2")  # another session takes the key while ``alive`` lives on
        assert not ack(store, joined, "n2", READY, alive)
        got, _ = store.ack("d2", "n2")
        assert got is not None and got.state == STAGING

    def test_a_live_ack_written_again_keeps_its_index(self, store: DeployStore) -> None:
        """The coordinator's live ack, retried after Consul's answer was lost, rewrote the
        ack with new timings when it asked for the verdict too: its index then came after
        an outcome written meanwhile, and history read that host as not live when the
        deploy ended (the diff review)."""
        s = member(store, "n1")
        joined = start(store, "d1", {"n1": s})
        for state in (READY, COMMITTED, LIVE):
            assert ack(store, joined, "n1", state, s)
        _, index = store.ack("d1", "n1")
        again = store.write_progress(
            "d1", "n1", LIVE, joined=joined, timings={"live_at": "later"}, establish=True
        )
        assert again is not None and again.index == index and again.ack.state == LIVE
        got, now = store.ack("d1", "n1")
        assert now == index and got is not None and got.timings.get("live_at") != "later"

    def test_a_ready_ack_cannot_land_beside_an_abort_request(self, store: DeployStore) -> None:
        """An abort request written before the ready ack wins, in the ack's own txn."""
        s = member(store, "n1")
        joined = start(store, "d1", {"n1": s})
        assert ack(store, joined, "n1", STAGING)
        assert store.request_abort("d1", "stop", by="op")
        with pytest.raises(AbortRequested):
            store.write_progress("d1", "n1", READY, joined=joined, session=s, sha256=SHA)
        got, _ = store.ack("d1", "n1")
        assert got is not None and got.state == STAGING


class TestEstablish:
    def test_commit_when_every_expected_node_acked_ready(self, store: DeployStore) -> None:
        sessions = {n: member(store, n) for n in ("n1", "n2")}
        joined = start(store, "d1", sessions)
        assert ack(store, joined, "n1", READY, sessions["n1"])
        assert store.establish(joined).outcome == UNDECIDED
        assert ack(store, joined, "n2", READY, sessions["n2"])
        verdict = store.establish(joined)
        assert verdict.outcome == COMMIT
        assert store.record_decision(joined, verdict, node="n2")
        assert not store.record_decision(joined, verdict, node="n1")  # one decision record

    def test_a_dead_named_session_before_its_ack_aborts(self, store: DeployStore) -> None:
        sessions = {n: member(store, n) for n in ("n1", "n2")}
        joined = start(store, "d1", sessions)
        assert ack(store, joined, "n1", READY, sessions["n1"])
        store.consul.session_destroy(sessions["n2"])
        verdict = store.establish(joined)
        assert verdict.outcome == ABORT
        assert "n2" in verdict.reason and "session" in verdict.reason

    def test_a_dead_session_after_its_ready_ack_changes_nothing(self, store: DeployStore) -> None:
        sessions = {n: member(store, n) for n in ("n1", "n2")}
        joined = start(store, "d1", sessions)
        assert ack(store, joined, "n1", READY, sessions["n1"])
        assert ack(store, joined, "n2", READY, sessions["n2"])
        store.consul.session_destroy(sessions["n2"])
        assert store.establish(joined).outcome == COMMIT

    def test_an_ack_rewritten_after_commit_makes_it_contested(self, store: DeployStore) -> None:
        sessions = {n: member(store, n) for n in ("n1", "n2")}
        joined = start(store, "d1", sessions)
        for n in sessions:
            assert ack(store, joined, n, READY, sessions[n])
        assert ack(store, joined, "n1", "committed")
        assert ack(store, joined, "n1", LIVE)
        raw_ack(store, "d1", "n2", NodeProgress(node="n2", state=FAILED, digest=joined.digest))
        assert store.establish(joined).outcome == CONTESTED


class TestTrust:
    def test_a_solo_deploy_forged_by_one_host_is_not_trusted(self, store: DeployStore) -> None:
        """One host writes a request naming only itself and a live ack for it: hosts that
        were alive at the time refuse it; it would have had to expect them."""
        x = member(store, "x")
        forged = start(store, "evil", {"x": x})
        raw_ack(
            store,
            "evil",
            "x",
            NodeProgress(
                node="x",
                state=LIVE,
                digest=forged.digest,
                create_index=forged.create_index,
                request=forged.request.as_dict(),
            ),
        )
        assert store.establish(forged).outcome == COMMIT  # x alone satisfies its own set
        assert store.committed("evil", node="n1", first_index=1) is None
        # A host that did not exist yet when the acks were written cannot tell: it trusts it.
        late = store.committed("evil", node="n9", first_index=10**12)
        assert late is not None and late.request.expected == ["x"]

    def test_the_newest_committed_deploy_is_found_from_the_acks_alone(
        self, store: DeployStore
    ) -> None:
        """What a host that was away follows when `current` (any host's word) points back:
        the committed deploy with the highest CreateIndex by its acks. A later deploy that
        aborted, and one that n2's token made for n2 alone, rank above it and are passed."""
        sessions = {n: member(store, n) for n in ("n1", "n2")}

        def deploy(deploy_id: str, states: dict[str, str]) -> Joined:
            joined = start(store, deploy_id, {n: sessions[n] for n in states})
            for node, state in states.items():
                assert ack(store, joined, node, state, sessions[node])
            assert store.consul.kv_delete(store.keys.inflight)
            return joined

        first = deploy("d1", {"n1": READY, "n2": READY})
        second = deploy("d2", {"n1": READY, "n2": READY})
        aborted = deploy("d3", {"n1": READY, "n2": FAILED})
        solo = deploy("d4", {"n2": READY})
        assert first.create_index < second.create_index < aborted.create_index
        assert set(store.acked_deploys()) == {"d1", "d2", "d3", "d4"}
        newest = store.newest_committed(0, node="n1", first_index=1)
        assert newest is not None and (newest.id, newest.create_index) == (
            "d2",
            second.create_index,
        )
        assert store.newest_committed(first.create_index, node="n1", first_index=1) == newest
        assert store.newest_committed(second.create_index, node="n1", first_index=1) is None
        # n2's own deploy is one it follows; readers (no node) pass it, as n1 does.
        mine = store.newest_committed(0, node="n2", first_index=1)
        assert mine is not None and (mine.id, mine.create_index) == ("d4", solo.create_index)
        assert store.newest_committed(0) == newest

    def test_an_ack_of_a_node_that_took_no_part_does_not_unmake_a_commit(
        self, store: DeployStore
    ) -> None:
        """The second attacker round: after d1 committed on n1 and n2, n3's token wrote a
        live ack of d1 carrying d1's request with n3 added to its expected set. Two
        requests for one id rebuilt nothing, so `committed(d1)` failed and a host that
        was away converged to the deploy before it. Only a request every node it expects
        carries is the deploy."""
        sessions = {n: member(store, n) for n in ("n1", "n2")}
        joined = start(store, "d1", sessions)
        for n in sessions:
            assert ack(store, joined, n, READY, sessions[n])
        forged = DeployRecord.from_dict(
            joined.request.as_dict()
            | {"expected": ["n1", "n2", "n3"], "sessions": {**sessions, "n3": "s-n3"}}
        )
        raw_ack(
            store,
            "d1",
            "n3",
            NodeProgress(
                node="n3",
                state=LIVE,
                digest=forged.digest(),
                create_index=joined.create_index,
                request=forged.as_dict(),
            ),
        )
        found = store.committed("d1", node="n9", first_index=1)
        assert found is not None and found.digest == joined.digest
        assert store.newest_committed(0) == found

    def test_two_requests_for_one_id_rebuild_nothing(self, store: DeployStore) -> None:
        sessions = {n: member(store, n) for n in ("n1", "n2")}
        joined = start(store, "d1", sessions)
        assert ack(store, joined, "n1", READY, sessions["n1"])
        other = DeployRecord.from_dict(joined.request.as_dict() | {"requested_by": "mallory"})
        raw_ack(
            store,
            "d1",
            "n2",
            NodeProgress(
                node="n2",
                state=READY,
                digest=other.digest(),
                create_index=joined.create_index,
                request=other.as_dict(),
            ),
        )
        assert store.rebuild_request("d1") is None
        assert store.committed("d1", node="n1", first_index=1) is None

    def test_an_index_claim_newer_than_the_acks_is_refused(self, store: DeployStore) -> None:
        s = member(store, "n1")
        joined = start(store, "d1", {"n1": s})
        raw_ack(
            store,
            "d1",
            "n1",
            NodeProgress(
                node="n1",
                state=LIVE,
                digest=joined.digest,
                create_index=10**9,
                request=joined.request.as_dict(),
            ),
        )
        assert store.committed("d1", node="n1", first_index=1) is None

    def test_a_phantom_node_with_a_borrowed_session_is_refused(self, store: DeployStore) -> None:
        s1 = member(store, "n1")
        joined = start(store, "d1", {"n1": s1, "ghost": s1})
        assert "shared session" in (store.check_sessions(joined) or "")
        s2 = member(store, "n2")
        joined = start_other(store, "d2", {"n1": s1, "ghost": s2})
        assert "ghost" in (store.check_sessions(joined) or "")

    def test_a_live_member_left_out_is_refused(self, store: DeployStore) -> None:
        s1 = member(store, "n1")
        member(store, "n2")
        joined = start(store, "d1", {"n1": s1})
        assert "n2" in (store.check_sessions(joined) or "")


def start_other(store: DeployStore, deploy_id: str, sessions: dict[str, str]) -> Joined:
    """``start`` after clearing ``inflight`` (the tests above leave one behind)."""
    store.consul.kv_delete(store.keys.inflight)
    return start(store, deploy_id, sessions)


def acked_deploys(store: DeployStore, node: str) -> set[str]:
    """The deploys ``node`` has keys of its own under (its acks and what they carry)."""
    prefix = store.keys.node_progress_prefix(node)
    return {k[len(prefix) :].split("/")[0] for k in store.consul.kv_keys(prefix, separator=None)}


class TestHistory:
    @staticmethod
    def deploy_n(
        store: DeployStore, n: int, *, keep: int, redeploy: bool = False, first: int = 0
    ) -> list[str]:
        """``n`` committed deploys by one member ``n1``, each of its own release (a release
        named like the live one does not move ``current.previous``); with ``redeploy``,
        every one after the second redeploys the second's release. ``first``: the number
        of the first (``d<first>``); past 0, ``n1`` is the member made by the first call."""
        if first:
            held = store.consul.kv_get(store.keys.member("n1"))
            assert held is not None and held.session
            s = held.session
        else:
            s = member(store, "n1")
        ids: list[str] = []
        over: dict[str, str] = {}
        for i in range(first, first + n):
            store.consul.kv_delete(store.keys.inflight)
            art = artifact(f"main-{min(i, 1) if redeploy else i:08x}")
            joined = start_deploy(store, f"d{i}", {"n1": s}, art, **over)
            if redeploy and i == 1:
                over = {"release": joined.request.release}
            assert ack(store, joined, "n1", READY, s)
            verdict = store.establish(joined)
            assert verdict.outcome == COMMIT
            ended, _, _ = store.end(
                joined, verdict, by="n1", history_keep=keep, on_validate_failure="rollback"
            )
            assert ended
            ids.append(joined.id)
        return ids

    def test_end_appends_trims_and_hosts_trim_only_their_trimmed_acks(
        self, store: DeployStore
    ) -> None:
        ids = self.deploy_n(store, 4, keep=2)
        assert store.history() == ids[-2:]
        doc = json.loads(store.consul.kv_get(store.keys.history).value or b"{}")  # type: ignore[union-attr]
        assert set(doc["trimmed"]) == {"d0", "d1"}
        assert store.consul.kv_get(store.keys.request("d0")) is None
        assert store.trim_own_progress("n1") >= 2
        assert acked_deploys(store, "n1") == {"d2", "d3"}
        assert store.ack("d0", "n1")[0] is None
        assert store.ack("d3", "n1")[0] is not None

    def test_an_ack_padded_by_its_own_host_does_not_keep_the_end_from_being_written(
        self, store: DeployStore
    ) -> None:
        """The attacker review: n2's token padded its own live ack's timings to 450 KB;
        the end copies every host's timings into the outcome, and its txn went past
        Consul's limit, so the deploy never ended. Timings are cut on read."""
        sessions = {n: member(store, n) for n in ("n1", "n2")}
        joined = start(store, "d1", sessions)
        for n in sessions:
            assert ack(store, joined, n, READY, sessions[n])
        verdict = store.establish(joined)
        assert verdict.outcome == COMMIT
        live, _ = store.ack("d1", "n2")
        assert live is not None
        padded = replace(live, timings={**live.timings, "pad": "x" * 450_000})
        assert store.consul.kv_put(store.keys.progress("d1", "n2"), padded.to_json())
        ended, _, _ = store.end(
            joined, store.establish(joined), by="n1", history_keep=5, on_validate_failure="rollback"
        )
        assert ended
        outcome = store.outcome("d1")
        assert outcome is not None and "pad" not in outcome.hosts["n2"]
        assert store.inflight()[0] is None

    def test_a_late_end_leaves_current_on_the_later_deploy(self, store: DeployStore) -> None:
        """Deploy A commits, someone deletes ``inflight`` before A's end, B commits and
        ends; A's end, written late, must not point ``current`` back at A (B is later by
        its acks), and a host done with A takes it for over."""
        s = member(store, "n1")
        store.consul.kv_delete(store.keys.inflight)
        a = start_deploy(store, "da", {"n1": s}, artifact("main-0000000a"))
        assert ack(store, a, "n1", READY, s)
        assert store.establish(a).outcome == COMMIT
        store.consul.kv_delete(store.keys.inflight)  # by hand, before A's end
        b = start_deploy(store, "db", {"n1": s}, artifact("main-0000000b"))
        assert b.create_index > a.create_index
        assert ack(store, b, "n1", READY, s)
        assert store.end(
            b, store.establish(b), by="n1", history_keep=10, on_validate_failure="rollback"
        )[0]
        ended, _, result = store.end(
            a, store.establish(a), by="n1", history_keep=10, on_validate_failure="rollback"
        )
        assert ended and result == "committed"
        current, _ = store.current()
        assert current is not None and current.deploy == "db", current
        assert store.check_current(current) == {}
        (_, _), over = store.end_seen("da", a.create_index, COMMIT, node="n1")
        assert over

    def test_acks_current_and_current_previous_name_are_never_trimmed(
        self, store: DeployStore
    ) -> None:
        """The ends keep both in the history; a history that lists them as trimmed all the
        same (an older end's, a hand-edited one) still does not make a host delete them."""
        self.deploy_n(store, 4, keep=1)
        current, _ = store.current()
        assert current is not None and current.deploy == "d3"
        assert (current.previous or {}).get("deploy") == "d2"
        assert store.history() == ["d2", "d3"]
        body = {"version": 2, "deploys": ["d3"], "trimmed": ["d0", "d1", "d2", "d3"]}
        assert store.consul.kv_put(store.keys.history, json.dumps(body).encode())
        assert store.trim_own_progress("n1") >= 2
        assert acked_deploys(store, "n1") == {"d2", "d3"}

    def test_acks_of_deploys_gone_from_the_history_and_from_trimmed_go_too(
        self, store: DeployStore
    ) -> None:
        """The soak review: `trimmed` keeps the last 64 ids, and a host trims at most every
        10 minutes: ids that left it before this host's trim (a host away, a busy hour)
        left their acks for ever (855 deploys' of 966 after 1,005 operations). Gone from a
        full history, without a request, and acked before the oldest deploy it holds
        began: over. A deploy in flight (its request there) keeps its acks."""
        self.deploy_n(store, 4, keep=1)
        assert acked_deploys(store, "n1") == {"d0", "d1", "d2", "d3"}
        body = {"version": 2, "deploys": ["d3"], "trimmed": []}  # d0, d1 fell out of it
        assert store.consul.kv_put(store.keys.history, json.dumps(body).encode())
        s = store.consul.kv_get(store.keys.member("n1")).session  # type: ignore[union-attr]
        flying = start_deploy(store, "d9", {"n1": s}, artifact("main-00000009"))
        assert ack(store, flying, "n1", READY, s)
        # a history shorter than history_keep says nothing of what ended before it
        assert store.trim_own_progress("n1", history_keep=2) == 0
        assert store.trim_own_progress("n1", history_keep=1) >= 2
        # d2: current.previous; d3: in the history; d9: in flight
        assert acked_deploys(store, "n1") == {"d2", "d3", "d9"}

    def test_a_deploy_whose_request_was_deleted_before_its_end_keeps_its_acks(
        self, store: DeployStore
    ) -> None:
        """The commit review: deleting `requests/<id>` changes nothing (DESIGN.md 6.4.2),
        and an operator's token may. n1's "no" is the only ack that establishes the abort
        of dx, where n2 is still staging: deleted, n2's ready ack would leave dx
        undecided for good. dx is not in the history (never ended) and was started after
        the oldest deploy it holds: kept, with or without `inflight` naming it."""
        self.deploy_n(store, 2, keep=10)
        s1 = store.consul.kv_get(store.keys.member("n1")).session  # type: ignore[union-attr]
        s2 = member(store, "n2")
        store.consul.kv_delete(store.keys.inflight)
        dx = start_deploy(store, "dx", {"n1": s1, "n2": s2}, artifact("main-000000aa"))
        assert store.write_progress("dx", "n2", STAGING, joined=dx)
        assert ack(store, dx, "n1", FAILED)
        assert store.consul.kv_delete(store.keys.request("dx"))
        for _ in ("inflight naming it", "inflight deleted too"):
            assert store.trim_own_progress("n1", keep=["dy"], history_keep=2) == 0
            assert "dx" in acked_deploys(store, "n1")
            store.consul.kv_delete(store.keys.inflight)
        assert ack(store, dx, "n2", READY, s2)
        assert store.establish(dx).outcome == ABORT

    def test_the_release_a_rollback_goes_to_stays_through_redeploys_of_the_live_one(
        self, store: DeployStore
    ) -> None:
        """d1 moves ``current.previous`` to d0; redeploys of d1's release (d2, d3) keep it
        there, so the ends keep d0 in the history and each host keeps its ack."""
        self.deploy_n(store, 4, keep=1, redeploy=True)
        current, _ = store.current()
        assert current is not None and current.deploy == "d3"
        assert (current.previous or {}).get("deploy") == "d0"
        assert "d0" in store.history()
        assert store.deploy_record("d0") is not None
        # and the deploy `current` named before d3's end (where an automatic rollback of a
        # d3 that failed validation would have gone) stays too
        assert "d2" in store.history()
        store.trim_own_progress("n1")
        assert "d0" in acked_deploys(store, "n1")
        assert rollback_target(store, None).deploy == "d0"

    def test_a_rollback_names_the_branch_and_commit_of_its_target(self, store: DeployStore) -> None:
        """The docs review: a rollback's hooks got WATCHER_BRANCH and WATCHER_COMMIT empty
        (its request had neither), though the deploy it goes back to named both."""
        s = member(store, "n1")
        commits = {"d0": "a" * 40, "d1": "b" * 40}
        for i, (deploy_id, sha) in enumerate(commits.items()):
            store.consul.kv_delete(store.keys.inflight)
            art = ArtifactRecord(
                id=f"main-{sha[:8]}",
                url="s3://b/a/web/x.tar.gz",
                sha256=SHA,
                size=1,
                branch=f"release/{i}",
                commit=sha,
            )
            joined = start_deploy(store, deploy_id, {"n1": s}, art)
            assert ack(store, joined, "n1", READY, s)
            verdict = store.establish(joined)
            assert verdict.outcome == COMMIT
            assert store.end(
                joined, verdict, by="n1", history_keep=10, on_validate_failure="rollback"
            )[0]
        first = store.deploy_record("d0")
        assert first is not None
        # current.previous, and the release named
        for target in (rollback_target(store, None), rollback_target(store, first.release)):
            assert (target.deploy, target.branch, target.commit) == ("d0", "release/0", "a" * 40)
            rb = store.new_record(
                deploy_id="d2",
                kind="rollback",
                artifact=target,
                release=target.release,
                requested_by="tests",
                expected={"n1": s},
                prepare_timeout=60,
                apply_timeout=60,
            )
            assert (rb.branch, rb.commit) == ("release/0", "a" * 40)

    def test_a_rollback_to_a_named_release_does_not_depend_on_current(
        self, store: DeployStore
    ) -> None:
        """A plain rollback's target is `current`'s previous, so its start checks that
        `current` is as read; one `--to` a release does not depend on `current` and is
        started whatever ended meanwhile."""
        app = parse_config({"s3": {"bucket": "b"}, "apps": {"web": {"root": "/srv"}}}).app("web")
        self.deploy_n(store, 3, keep=10)
        first = store.deploy_record("d0")
        assert first is not None
        plain, _, plain_index = rollback_request(
            store, app, None, requested_by="tests", allow_missing=False
        )
        named, _, named_index = rollback_request(
            store, app, first.release, requested_by="tests", allow_missing=False
        )
        assert plain_index == store.current()[1] and named_index is None
        self.deploy_n(store, 1, keep=10, first=3)  # one ends between the read and the start
        with pytest.raises(DeployRefused, match="current release changed"):
            store.start(plain, current_index=plain_index)
        store.start(named, current_index=named_index)
        inflight, _ = store.inflight()
        assert inflight == named.id and named.release == first.release

    def test_a_history_nested_thousands_deep_is_skipped_not_a_crash(
        self, store: DeployStore
    ) -> None:
        """Any host's token may write ``history``: arrays nested 100,000 deep made every
        host's join raise RecursionError, cycle after cycle, so no deploy could start."""
        deep = b'{"deploys":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        assert store.consul.kv_put(store.keys.history, deep)
        assert store.history() == []
        read = store.join_read("20261205T000000Z-abcdef", "n1")
        assert read.request is None and not read.ended

    def test_raw_events_of_unknown_artifacts_never_push_the_deploys_out(
        self, store: DeployStore
    ) -> None:
        """Anyone who may fire a `deploy` event writes a refusal into the history with an
        artifact nobody published, or one whose record differs from its pin; a flood of
        them must cost only the oldest refusals (their records deleted too), never the
        deploys `rollback --to` goes to."""
        keep = 12  # refusals may hold min(REFUSALS_KEPT, keep // 2) = 6 entries of it
        ids = self.deploy_n(store, 5, keep=keep)
        events = [f"0c7d3a32-5a3b-4a4e-9d3e-8b7c6a5f{i:04x}" for i in range(15)]
        for ltime, event_id in enumerate(events, start=1):
            artifact_id = f"junk-{ltime:04x}"
            if ltime % 2:  # published, then pinned to other bytes
                record = artifact(artifact_id)
                store.consul.kv_put(store.keys.artifact(artifact_id), record.to_json())
                pin = PinRecord(
                    artifact=artifact_id, url=record.url, size=record.size, sha256="f" * 64
                )
                store.consul.kv_put(store.keys.pin(artifact_id), pin.to_json())
            result = store.start_from_event(
                event_id=event_id,
                ltime=ltime,
                kind="deploy",
                artifact_id=artifact_id,
                release=None,
                by="n1",
                prepare_timeout=60,
                apply_timeout=60,
                history_keep=keep,
            )
            if ltime % 2:
                assert result.startswith("refused: artifact refused: "), result
            else:
                assert result.startswith("refused: unknown artifact "), result
        history = store.history()
        assert [i for i in history if i in ids] == ids  # every deploy is still listed
        assert [i for i in history if i in events] == events[-6:]
        assert len(history) == 11
        # the evicted refusals' records went with them, in the ends' batches of TRIM_PER_END
        assert store.consul.kv_get(store.keys.outcome(events[-7])) is None
        assert store.consul.kv_get(store.keys.request(events[-7])) is None
        assert store.outcome(events[-6]) is not None
        # no host has an ack of a refusal: none is listed for the hosts to trim theirs
        doc = json.loads(store.consul.kv_get(store.keys.history).value or b"{}")  # type: ignore[union-attr]
        assert not set(doc["trimmed"]) & set(events)
        first = store.deploy_record(ids[0])
        assert first is not None and first.release is not None
        assert rollback_target(store, first.release).deploy == ids[0]


class TestPageMark:
    def test_an_app_without_builds_keeps_its_mark_while_other_keys_change(
        self, store: DeployStore
    ) -> None:
        """The live page fetches its fleet and builds sections again when this mark
        changes. For an app with no builds Consul answers the artifacts' key list with the
        index of the whole store, so every write of any app moved it (every ack of every
        deploy refetched both sections)."""
        from watcher.web.app import sections_mark

        before = sections_mark(store)
        store.consul.kv_put(f"{store.keys.base}-elsewhere/other-app/ack", b"x")
        assert sections_mark(store) == before
        store.consul.kv_put(store.keys.artifact("main-15eb13af"), artifact().to_json())
        assert sections_mark(store) != before

    def test_current_rewritten_alone_moves_the_mark(self, store: DeployStore) -> None:
        """Any host's token can rewrite `current` (the fleet section then shows it NOT
        TRUSTED); no host record changes with it, and open pages kept the old section."""
        from watcher.web.app import sections_mark

        before = sections_mark(store)
        forged = {"version": 2, "deploy": "20261206T120000Z-ab12cd", "release": "r-forged"}
        store.consul.kv_put(store.keys.current, json.dumps(forged).encode())
        after = sections_mark(store)
        assert after != before
        assert sections_mark(store) == after  # a mark, not a counter


def test_trimming_a_deploy_leaves_the_requests_whose_ids_start_with_its(
    store: DeployStore,
) -> None:
    """The attacker review: the trim deleted `requests/<id>` as a tree without its slash,
    so trimming deploy-1 also deleted deploy-12's request (and its abort key)."""
    keys, kv = store.keys, store.consul
    for deploy_id in ("deploy-1", "deploy-12", "deploy-1x"):
        assert kv.kv_put(keys.request(deploy_id), b"{}")
        assert kv.kv_put(keys.abort_request(deploy_id), b"{}")
    pre = EndRead(None, 0, None, 0, ["deploy-1", "deploy-12", "deploy-1x"], [], 0)
    ops = store._history_ops(pre, [], keep=2, protected=set())
    assert kv.txn(ops).ok
    left = sorted(
        e.key.removeprefix(keys.requests_prefix) for e in kv.kv_list(keys.requests_prefix)
    )
    assert left == ["deploy-12", "deploy-12/abort", "deploy-1x", "deploy-1x/abort"], left
