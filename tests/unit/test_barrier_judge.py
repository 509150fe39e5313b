"""The commit / abort / contested predicate over one read of the acks (pure logic)."""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from watcher import agent as agent_module
from watcher.agent import JOURNAL_NAME, Journal, decided_by, parse_journal
from watcher.barrier import CONTESTED, UNDECIDED, DeployStore, DeployView, EndRead, Joined, judge
from watcher.config import HISTORY_MAX, Timeouts
from watcher.consul_api import KVEntry
from watcher.errors import PayloadError
from watcher.fsutil import append_bytes, atomic_write_json
from watcher.records import (
    ABORT,
    ABORTED,
    COMMIT,
    COMMITTED,
    FAILED,
    FAILED_AFTER_COMMIT,
    LIVE,
    READY,
    REFUSED,
    STAGING,
    Decision,
    DeployRecord,
    MemberRecord,
    NodeProgress,
    Outcome,
    ReleaseRef,
    parse_iso,
)

SHA = "b" * 64


def request(expected: list[str], **over: Any) -> DeployRecord:
    fields: dict[str, Any] = {
        "id": "d1",
        "app": "web",
        "kind": "deploy",
        "artifact": "main-15eb13af",
        "sha256": SHA,
        "url": "s3://b/a/web/main-15eb13af.tar.gz",
        "size": 10,
        "release": "20261201T000000Z-main-15eb13af",
        "requested_by": "tests",
        "requested_at": "2026-12-01T00:00:00.000Z",
        "expected": expected,
        "sessions": {n: f"s-{n}" for n in expected},
        "prepare_deadline": "2026-12-01T00:10:00.000Z",
        "apply_deadline": "2026-12-01T00:20:00.000Z",
    }
    fields.update(over)
    return DeployRecord(**fields)


def ack(node: str, state: str, digest: str) -> NodeProgress:
    return NodeProgress(node=node, state=state, deploy="d1", digest=digest, create_index=5)


class TestJudge:
    def test_commit_needs_every_expected_node_ready_for_the_same_digest(self) -> None:
        req = request(["a", "b", "c"])
        d = req.digest()
        acks = {n: ack(n, READY, d) for n in ("a", "b")}
        assert judge(req, d, acks).outcome == UNDECIDED
        acks["c"] = ack("c", READY, d)
        assert judge(req, d, acks).outcome == COMMIT

    @pytest.mark.parametrize("later", [COMMITTED, LIVE, FAILED_AFTER_COMMIT])
    def test_later_states_keep_the_ready_ack(self, later: str) -> None:
        req = request(["a", "b"])
        d = req.digest()
        assert judge(req, d, {"a": ack("a", later, d), "b": ack("b", READY, d)}).outcome == COMMIT

    @pytest.mark.parametrize("veto", [FAILED, REFUSED, ABORTED])
    def test_a_veto_aborts(self, veto: str) -> None:
        req = request(["a", "b"])
        d = req.digest()
        verdict = judge(req, d, {"a": ack("a", READY, d), "b": ack("b", veto, d)})
        assert verdict.outcome == ABORT
        assert "node b" in verdict.reason

    def test_the_failing_node_is_named_before_the_abort_intents(self) -> None:
        req = request(["a", "b", "c"])
        d = req.digest()
        acks = {"a": ack("a", ABORTED, d), "b": ack("b", ABORTED, d), "c": ack("c", FAILED, d)}
        assert judge(req, d, acks).reason.startswith("node c failed")
        # ... and the hosts that only followed are not counted as more that said no.
        assert "more" not in judge(req, d, acks).reason
        acks["b"] = ack("b", REFUSED, d)
        assert judge(req, d, acks).reason.endswith("(and 1 more)")

    def test_of_abort_intents_alone_the_first_written_is_named(self) -> None:
        """The decision named the host that established the abort first; the outcome,
        judged later from all the acks, named the first by name, which only quoted it."""
        req = request(["host-0", "host-1", "host-2", "host-3"])
        d = req.digest()
        first = dataclasses.replace(
            ack("host-2", ABORTED, d),
            error="host-3's session ended",
            timings={"aborted_at": "2026-12-01T00:00:01.000Z"},
        )
        follower = dataclasses.replace(
            ack("host-1", ABORTED, d),
            error="node host-2 aborted: host-3's session ended",
            timings={"aborted_at": "2026-12-01T00:00:01.040Z"},
        )
        acks = {"host-1": follower, "host-2": first}
        assert judge(req, d, acks).reason == "node host-2 aborted: host-3's session ended"
        # an intent that says no time (an older version's) comes after those that do
        acks["host-0"] = ack("host-0", ABORTED, d)
        assert judge(req, d, acks).reason.startswith("node host-2 aborted")
        # Read with their ModifyIndexes (the establish's read), Consul's order counts, not
        # the hosts' clocks (a follower's clock behind the decider's).
        acks["host-1"] = dataclasses.replace(
            follower, timings={"aborted_at": "2026-12-01T00:00:00.500Z"}
        )
        assert judge(req, d, acks).reason.startswith("node host-1 aborted")
        indexes = {"host-0": 0, "host-1": 120, "host-2": 117}
        assert judge(req, d, acks, indexes).reason == "node host-2 aborted: host-3's session ended"

    def test_an_ack_for_another_digest_aborts(self) -> None:
        req = request(["a", "b"])
        d = req.digest()
        verdict = judge(req, d, {"a": ack("a", READY, d), "b": ack("b", READY, "f" * 64)})
        assert verdict.outcome == ABORT
        assert "another request" in verdict.reason

    def test_a_complete_ready_set_beside_a_veto_is_contested(self) -> None:
        # Impossible with honest acks (forward-only): a rewritten ack.
        req = request(["a", "b"])
        d = req.digest()
        acks = {"a": ack("a", LIVE, d), "b": ack("b", FAILED, d)}
        verdict = judge(req, d, acks)
        assert verdict.outcome == CONTESTED
        assert "b" in verdict.reason

    def test_a_commit_intent_beside_an_abort_intent_is_contested(self) -> None:
        req = request(["a", "b", "c"])
        d = req.digest()
        acks = {"a": ack("a", COMMITTED, d), "b": ack("b", ABORTED, d), "c": ack("c", READY, d)}
        assert judge(req, d, acks).outcome == CONTESTED

    def test_acks_of_nodes_not_expected_count_for_nothing(self) -> None:
        req = request(["a"])
        d = req.digest()
        acks = {"a": ack("a", STAGING, d), "x": ack("x", FAILED, d)}
        assert judge(req, d, acks).outcome == UNDECIDED

    def test_no_expected_nodes_aborts(self) -> None:
        req = request([])
        assert judge(req, req.digest(), {}).outcome == ABORT


def view(
    req: DeployRecord,
    acks: dict[str, NodeProgress],
    *,
    decision: str | None = None,
    outcome: str | None = None,
    decision_index: int = 0,
) -> DeployView:
    return DeployView(
        record=req,
        decision=Decision(outcome=decision, reason="r", by="host-x", at="t") if decision else None,
        nodes=acks,
        node_indexes={},
        outcome=Outcome(result=outcome, at="t", by="host-x") if outcome else None,
        coordinator_session=None,
        create_index=40,
        decision_index=decision_index,
    )


class TestCheckedView:
    """What readers report (status, history, the web page, abort, deploy's result): the
    decision and outcome records as far as the acks back them."""

    def test_records_the_acks_back_are_shown_as_written(self) -> None:
        req = request(["a", "b"])
        d = req.digest()
        v = view(req, {n: ack(n, LIVE, d) for n in "ab"}, decision=COMMIT, outcome="committed")
        assert v.checked() is v

    def test_a_commit_no_ack_backs_is_dropped_and_reported(self) -> None:
        req = request(["a", "b"])
        d = req.digest()
        v = view(req, {"a": ack("a", READY, d)}, decision=COMMIT, outcome="committed").checked()
        assert v.decision is None and v.outcome is None
        assert len(v.distrusted) == 2 and all("not trusted" in n for n in v.distrusted)

    def test_final_acks_are_the_result_whatever_the_record_says(self) -> None:
        req = request(["a", "b"])
        d = req.digest()
        acks = {"a": ack("a", FAILED, d), "b": ack("b", ABORTED, d)}
        v = view(req, acks, decision=COMMIT, outcome="committed").checked()
        assert v.outcome is not None and v.outcome.result == "aborted"
        assert v.decision is not None and v.decision.outcome == ABORT
        assert "contradicts" in v.outcome.reason

    def test_final_acks_without_an_outcome_record_are_the_result(self) -> None:
        req = request(["a", "b"])
        d = req.digest()
        acks = {"a": ack("a", LIVE, d), "b": ack("b", FAILED_AFTER_COMMIT, d)}
        v = view(req, acks).checked()
        assert v.outcome is not None and v.outcome.result == "failed_after_commit"
        assert v.distrusted == ()

    def test_an_abort_no_ack_shows_is_kept_when_a_named_session_is_gone(self) -> None:
        """The only expected host died before acking; a host not expected ended the deploy
        "aborted" on the session clause. DeployStore.view reads the sessions for such a
        record (session_abort); without that, the record is not trusted."""
        req = request(["a"])
        v = view(req, {}, decision=ABORT, outcome="aborted")
        lost = dataclasses.replace(v, session_abort="expected node(s) a lost the session")
        assert lost.checked().distrusted == ()
        assert lost.checked().outcome == v.outcome and lost.checked().decision == v.decision
        staging = dataclasses.replace(v, nodes={"a": ack("a", STAGING, req.digest())})
        assert staging.checked().outcome is None and len(staging.checked().distrusted) == 2

    def test_a_refused_start_keeps_its_abort_records_until_a_host_acks(self) -> None:
        """Written in the request's own txn (the same CreateIndex, 40 here)."""
        req = request(["a", "b"])
        v = view(req, {}, decision=ABORT, outcome="refused", decision_index=40)
        assert v.checked() is v
        acked = dataclasses.replace(v, nodes={"a": ack("a", READY, req.digest())}).checked()
        assert acked.outcome is None and acked.decision is None
        assert len(acked.distrusted) == 2

    def test_an_abort_written_after_the_start_is_no_refusal_even_before_any_ack(self) -> None:
        """A host's token writes an abort decision (and a "refused" outcome) while every
        host still prepares: readers must not report the deploy refused or aborted, which
        `deploy`'s wait would print and exit 1 on, while the acks go on to commit."""
        req = request(["a", "b"])
        for index in (41, 0):  # after the request's txn; or not known
            v = view(req, {}, decision=ABORT, outcome="refused", decision_index=index).checked()
            assert v.decision is None and v.outcome is None, index
            assert len(v.distrusted) == 2 and all("not trusted" in n for n in v.distrusted)

    def test_expired_before_the_apply_deadline_is_not_trusted(self) -> None:
        far = "2999-01-01T00:00:00.000Z"
        req = request(["a", "b"], apply_deadline=far)
        d = req.digest()
        acks = {"a": ack("a", READY, d), "b": ack("b", STAGING, d)}
        v = view(req, acks, outcome="expired").checked()
        assert v.outcome is None and "expired" in v.distrusted[0]
        past = view(request(["a", "b"]), acks, outcome="expired")  # its deadline passed
        assert past.checked().outcome == past.outcome

    def test_a_decision_for_another_request_is_not_this_deploys(self) -> None:
        req = request(["a", "b"])
        other = request(["a"]).digest()
        decision = Decision(outcome=ABORT, reason="r", by="host-x", at="t", digest=other)
        forged = dataclasses.replace(view(req, {}), decision=decision)
        assert forged.checked().decision is None

    def test_contested_acks_are_contested_whatever_the_records_say(self) -> None:
        req = request(["a", "b"])
        d = req.digest()
        acks = {"a": ack("a", LIVE, d), "b": ack("b", FAILED, d)}
        v = view(req, acks, decision=COMMIT, outcome="committed").checked()
        assert v.outcome is not None and v.outcome.result == CONTESTED
        assert v.decision is None

    def test_an_honest_contested_deploy_distrusts_no_record(self) -> None:
        """The first host's commit record was true when written; the contested verdict
        says what changed, not that the record was forged."""
        req = request(["a", "b"])
        d = req.digest()
        acks = {"a": ack("a", LIVE, d), "b": ack("b", FAILED, d)}
        v = view(req, acks, decision=COMMIT, outcome="contested").checked()
        assert v.distrusted == () and v.decision is None
        assert v.outcome is not None and v.outcome.result == CONTESTED


class TestRequest:
    def test_digest_is_stable_and_changes_with_any_field(self) -> None:
        a = request(["a", "b"])
        assert a.digest() == request(["a", "b"]).digest()
        assert a.digest() != request(["a", "b"], requested_by="mallory").digest()
        assert a.digest() != request(["a"]).digest()

    def test_canonical_bytes_are_made_once_per_record(self) -> None:
        a = request(["a", "b"])
        first = a.canonical()
        assert a.canonical() is first  # not serialised again
        assert first == a.to_json() and json.loads(first)["expected"] == ["a", "b"]
        # A changed copy is another record, with its own bytes and digest.
        b = dataclasses.replace(a, requested_by="mallory")
        assert json.loads(b.canonical())["requested_by"] == "mallory"
        assert b.digest() != a.digest()
        assert a == request(["a", "b"])  # the cached bytes are no field of the record

    def test_a_node_listed_twice_is_refused(self) -> None:
        with pytest.raises(PayloadError, match="twice"):
            DeployRecord.from_dict(request(["a", "a"]).as_dict())

    def test_embedded_request_must_match_the_acks_digest(self) -> None:
        req = request(["a"])
        good = NodeProgress(
            node="a", state=READY, digest=req.digest(), create_index=3, request=req.as_dict()
        )
        assert good.embedded_request() == req
        forged = NodeProgress(
            node="a", state=READY, digest="e" * 64, create_index=3, request=req.as_dict()
        )
        assert forged.embedded_request() is None

    @pytest.mark.parametrize(
        "bad",
        [
            {"expected": "a"},
            {"sessions": {"a": 1}},
            {"id": "../x"},
            {"artifact": "a/b"},
            {"size": -1},
            {"min_protocol": "2"},
            {"target_deploy": "x y"},
            {"prepare_deadline": "soon"},
            {"format": "zip"},
            {"format": None},
        ],
    )
    def test_malformed_requests_are_refused_with_the_field(self, bad: dict[str, Any]) -> None:
        data = request(["a"]).as_dict() | bad
        with pytest.raises(PayloadError, match=next(iter(bad))):
            DeployRecord.from_dict(data)

    def test_a_rollback_request_carries_its_targets_format(self) -> None:
        # Rolling back to a rollback of a plain-tar artifact must still read it as tar.
        store = DeployStore(None, "w", "web")  # type: ignore[arg-type]  # no call to Consul
        target = ReleaseRef(
            release="20261201T000000Z-main-15eb13af",
            artifact="main-15eb13af",
            sha256=SHA,
            deploy="d0",
            url="s3://b/a/web/main-15eb13af.tar",
            size=10,
            format="tar",
        )
        rb = store.new_record(
            deploy_id="d2",
            kind="rollback",
            artifact=target,
            release=target.release,
            requested_by="tests",
            expected=["a"],
            prepare_timeout=60,
            apply_timeout=60,
        )
        assert rb.format == "tar"
        assert DeployRecord.from_json(rb.to_json()).format == "tar"
        with pytest.raises(PayloadError, match="format"):
            ReleaseRef.from_dict({**json.loads(target.to_json()), "format": "zip"})

    def test_deadlines_are_clamped_to_the_hosts_timeouts(self) -> None:
        rec = request(["a"])  # requested 00:00, prepare by 00:10, apply by 00:20
        short = Timeouts(prepare=60, apply=120)
        assert agent_module.clamped_deadlines(
            rec.requested_at, rec.prepare_deadline, rec.apply_deadline, short
        ) == (parse_iso("2026-12-01T00:01:00Z"), parse_iso("2026-12-01T00:03:00Z"))
        # Deadlines within the host's maxima are the request's own.
        assert agent_module.clamped_deadlines(
            rec.requested_at, rec.prepare_deadline, rec.apply_deadline, Timeouts()
        ) == (parse_iso(rec.prepare_deadline), parse_iso(rec.apply_deadline))
        far = request(
            ["a"], prepare_deadline="9999-12-31T00:00:00Z", apply_deadline="9999-12-31T00:00:00Z"
        )
        assert agent_module.clamped_deadlines(
            far.requested_at, far.prepare_deadline, far.apply_deadline, Timeouts()
        ) == (parse_iso("2026-12-01T00:10:00Z"), parse_iso("2026-12-01T00:20:00Z"))
        # A date at the end of the calendar: no overflow, the request's own deadlines (the
        # host refuses such a request as dated ahead of its clock).
        end = "9999-12-31T23:59:00Z"
        assert agent_module.clamped_deadlines(end, end, end, Timeouts()) == (
            parse_iso(end),
            parse_iso(end),
        )

    def test_a_request_first_seen_late_names_both_clocks(self) -> None:
        """A "prepare deadline passed" of a request this host first saw more than 30 s
        after its `requested_at`: a requester's clock behind reads exactly like a deadline
        that ran out, so the no names both times."""
        rec = request(["a"])  # requested 00:00
        note = agent_module.late_sight_note
        assert note({"started_at": "2026-12-01T00:00:30Z"}, rec) == ""
        said = note({"started_at": "2026-12-01T00:03:20Z"}, rec)
        assert said == (
            "; this host first saw the request at 2026-12-01T00:03:20.000Z by its clock, "
            f"200 s after its requested_at {rec.requested_at} by the requester's clock: one "
            "of the two clocks is off (hosts and the machines that deploy need NTP), or this "
            "host's watcher was not running when the deploy started"
        )
        # A journal that does not say (an older one, garbage): nothing added.
        assert note({}, rec) == "" and note({"started_at": "yesterday"}, rec) == ""


class TestDecidedMark:
    """The decider's mark on its own member key (docs/design.md R5): what it writes, when
    it cannot, and how a reader takes it (pure logic; the real cluster is in
    tests/integration/test_deploy.py and test_attacks.py)."""

    def store(self) -> DeployStore:
        return DeployStore(None, "w", "web")  # type: ignore[arg-type]

    def joined(self) -> Joined:
        req = request(["a", "b"])
        return Joined(req, req.digest(), 7)

    def member(self, session: str, value: bytes, index: int = 9) -> KVEntry:
        return KVEntry("w/apps/web/members/a", value, index, 3, 0, session, 0)

    def test_the_mark_keeps_the_member_record_and_names_the_verdict(self) -> None:
        j = self.joined()
        base = MemberRecord("a", "0.1.0", "2026-12-01T00:00:00.000Z").to_json()
        op = self.store().decided_mark_op(
            j, COMMIT, node="a", session="s-a", member=self.member("s-a", base)
        )
        assert op["KV"]["Verb"] == "lock" and op["KV"]["Session"] == "s-a"
        assert op["KV"]["Key"] == "w/apps/web/members/a"
        written = json.loads(base64.b64decode(op["KV"]["Value"]))
        assert written["since"] == "2026-12-01T00:00:00.000Z" and written["watcher"] == "0.1.0"
        assert written["decided"] == {"deploy": "d1", "outcome": COMMIT, "digest": j.digest}

    @pytest.mark.parametrize("session", [None, "", "s-other"])
    def test_no_mark_unless_this_session_holds_the_key(self, session: str | None) -> None:
        entry = self.member("s-a", b"{}")
        op = self.store().decided_mark_op(
            self.joined(), COMMIT, node="a", session=session, member=entry
        )
        assert op is None

    def test_a_garbage_member_value_still_gets_a_clean_mark(self) -> None:
        op = self.store().decided_mark_op(
            self.joined(), ABORT, node="a", session="s-a", member=self.member("s-a", b"\xff[")
        )
        assert op is not None
        written = json.loads(base64.b64decode(op["KV"]["Value"]))
        assert written["node"] == "a" and written["decided"]["outcome"] == ABORT

    def test_a_reader_parses_each_version_of_a_key_once(self) -> None:
        mark = {"deploy": "d1", "outcome": COMMIT, "digest": "x"}
        v1 = MemberRecord("a", decided=mark).to_json()
        assert decided_by(self.member("s-a", v1, index=11)) == mark
        # Same ModifyIndex, other bytes: the parse of that version is reused.
        assert decided_by(self.member("s-a", b"not json", index=11)) == mark
        # A new version is parsed again; one that does not parse marks nothing.
        assert decided_by(self.member("s-a", b"not json", index=12)) == {}
        with pytest.raises(PayloadError):
            MemberRecord.from_json(b'{"node": "a", "decided": {"deploy": 5}}')


class TestJournaledRequest:
    def test_parsed_once_while_the_journal_names_it(self, tmp_path: Path) -> None:
        journal = Journal(tmp_path)
        req = request(["a", "b"])
        journal.begin("d1", **Joined(req, req.digest(), 7).to_journal())
        joined = journal.joined()
        assert (joined.request, joined.digest, joined.create_index) == (req, req.digest(), 7)
        journal.update(established=COMMIT)  # other fields change: the same request
        journal.done("staged")
        assert journal.joined() is joined
        # Read back from the file by a new process: parsed again, equal.
        again = Journal(tmp_path).joined()
        assert again is not joined and again == joined

    def test_another_request_or_a_bad_journal_is_parsed_again(self, tmp_path: Path) -> None:
        journal = Journal(tmp_path)
        first = request(["a"])
        journal.begin("d1", **Joined(first, first.digest(), 7).to_journal())
        joined = journal.joined()
        journal.clear("d1")
        with pytest.raises(KeyError):
            journal.joined()
        second = request(["a"], id="d2")
        journal.begin("d2", **Joined(second, second.digest(), 9).to_journal())
        assert journal.joined() is not joined and journal.joined().id == "d2"
        # A journal whose request does not match its digest is refused every time.
        bad = Journal(tmp_path / "other")
        bad.begin("d3", **Joined(first, "e" * 64, 7).to_journal())
        for _ in range(2):
            with pytest.raises(PayloadError, match="digest"):
                bad.joined()


class TestJournalFile:
    """The journal is written whole at ``begin`` and then appended to, a line per write."""

    def started(self, tmp_path: Path) -> Journal:
        journal = Journal(tmp_path)
        req = request(["a", "b"])
        journal.begin("d1", **Joined(req, req.digest(), 7).to_journal())
        return journal

    def test_each_write_appends_what_changed_and_a_reader_merges_the_lines(
        self, tmp_path: Path
    ) -> None:
        journal = self.started(tmp_path)
        journal.done("staged")
        journal.update(established=COMMIT)
        journal.done("flipped", "applied")
        journal.update(established=COMMIT)  # no change: nothing written
        lines = (tmp_path / JOURNAL_NAME).read_bytes().splitlines()
        assert len(lines) == 4
        # What changed and the deploy, not the request again.
        assert json.loads(lines[2]) == {"deploy": "d1", "established": COMMIT}
        assert json.loads(lines[3]) == {"deploy": "d1", "phases": ["staged", "flipped", "applied"]}
        again = Journal(tmp_path)
        assert again.read() == journal.read()
        assert again.joined() == journal.joined()

    def test_a_new_process_and_a_new_deploy_write_the_file_whole(self, tmp_path: Path) -> None:
        self.started(tmp_path).done("staged")
        restarted = Journal(tmp_path)
        restarted.done("flipped")  # its first write: it does not know what the file holds
        assert (tmp_path / JOURNAL_NAME).read_bytes().count(b"\n") == 1
        restarted.done("applied")
        assert (tmp_path / JOURNAL_NAME).read_bytes().count(b"\n") == 2
        second = request(["a"], id="d2")
        restarted.begin("d2", **Joined(second, second.digest(), 9).to_journal())
        raw = (tmp_path / JOURNAL_NAME).read_bytes()
        assert raw.count(b"\n") == 1 and (parse_journal(raw) or {})["phases"] == []

    def test_a_long_journal_is_written_whole_again(self, tmp_path: Path) -> None:
        journal = self.started(tmp_path)
        for i in range(Journal.APPENDS_BEFORE_REWRITE + 3):
            journal.update(attempt=i)
        # APPENDS_BEFORE_REWRITE appends, the next write whole, then two appends.
        assert (tmp_path / JOURNAL_NAME).read_bytes().count(b"\n") == 3
        assert (Journal(tmp_path).read() or {})["attempt"] == Journal.APPENDS_BEFORE_REWRITE + 2

    def test_a_journal_removed_behind_its_back_is_written_whole(self, tmp_path: Path) -> None:
        journal = self.started(tmp_path)
        (tmp_path / JOURNAL_NAME).unlink()
        journal.update(established=COMMIT)
        on_disk = Journal(tmp_path).read() or {}
        assert on_disk["established"] == COMMIT and on_disk["request"]

    def test_a_line_cut_short_counts_as_never_written(self) -> None:
        whole = b'{"deploy": "d1", "phases": []}\n{"deploy": "d1", "phases": ["staged"]}\n'
        assert parse_journal(whole) == {"deploy": "d1", "phases": ["staged"]}
        for cut in (
            whole + b'{"deploy": "d1", "phases": ["staged", "fl',
            whole + b'{"deploy": "d1", "finished": true}',
        ):
            assert parse_journal(cut) == {"deploy": "d1", "phases": ["staged"]}
        # A line that does not parse, or is another deploy's (an old journal's block after
        # a crash), ends the journal there, whatever follows it.
        later = b'{"deploy": "d1", "finished": true}\n'
        for bad in (b"\0\0\n", b'{"deploy": "d0", "established": "abort"}\n', b'{"x": 1}\n'):
            assert parse_journal(whole + bad + later) == {"deploy": "d1", "phases": ["staged"]}

    def test_a_durable_write_is_synced_and_bookkeeping_is_not(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        journal = self.started(tmp_path)
        synced: list[int] = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
        journal.done("staged")  # not durable: a restart stages again
        assert synced == []
        journal.update(established=COMMIT)
        journal.done("post_release")
        assert len(synced) == 2

    def test_the_loop_and_the_worker_writing_at_once_lose_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """One thread's change is built while the other's write is on its way to the disk:
        each must see the other's (a durable phase reported written, then lost, would skip
        a post_abort)."""
        journal = self.started(tmp_path)
        writing, go_on = threading.Event(), threading.Event()
        real = agent_module.append_bytes

        def slow(*args: Any, **kwargs: Any) -> None:
            real(*args, **kwargs)
            if threading.current_thread().name == "worker":
                writing.set()
                go_on.wait(5)  # written, and not yet known to be

        monkeypatch.setattr(agent_module, "append_bytes", slow)
        worker = threading.Thread(target=journal.done, args=("post_release",), name="worker")
        worker.start()
        assert writing.wait(5)
        loop = threading.Thread(target=journal.update, kwargs={"established": "abort"})
        loop.start()
        time.sleep(0.1)  # the loop's change waits for the worker's
        go_on.set()
        worker.join(5)
        loop.join(5)
        for seen in (journal.read() or {}, Journal(tmp_path).read() or {}):
            assert "post_release" in seen["phases"] and seen["established"] == "abort"

    @pytest.mark.parametrize(
        "raw",
        [b"", b"\n", b'{"deploy": "d1"', b"[1]\n", b'{"phases": []}\n', b"\xff\n", b'"x"\n'],
    )
    def test_no_journal(self, raw: bytes) -> None:
        assert parse_journal(raw) is None

    @pytest.mark.parametrize("indent", [None, 2])
    @pytest.mark.parametrize("end", ["\n", ""])
    def test_a_single_document_is_read(self, tmp_path: Path, indent: int | None, end: str) -> None:
        """An older version's journal, or one written by hand."""
        data = {"deploy": "d1", "phases": ["staged"], "established": COMMIT}
        (tmp_path / JOURNAL_NAME).write_text(json.dumps(data, indent=indent) + end)
        assert Journal(tmp_path).read() == data


class TestJournalOnAFullDisk:
    """A write the disk refuses (ENOSPC), faked here: the campaign's `disk_full` does it
    for real (docs/reliability.md)."""

    @pytest.fixture
    def journal(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Journal:
        journal = Journal(tmp_path)
        req = request(["a", "b"])
        journal.begin("d1", **Joined(req, req.digest(), 7).to_journal())
        journal.update(established=COMMIT)

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(agent_module, "atomic_write_json", full)
        monkeypatch.setattr(agent_module, "append_bytes", full)
        return journal

    def test_bookkeeping_is_kept_in_memory_and_written_with_the_next_write(
        self, journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        journal.done("flipped", "applied")
        journal.update(finished=True)  # this host's part is done: the next deploy may come
        assert journal.has("applied") and (journal.read() or {}).get("finished")
        on_disk = Journal(tmp_path).read() or {}
        assert "applied" not in on_disk["phases"] and "finished" not in on_disk
        monkeypatch.setattr(agent_module, "atomic_write_json", atomic_write_json)
        monkeypatch.setattr(agent_module, "append_bytes", append_bytes)
        journal.update(ended=True)  # the disk has room again
        on_disk = Journal(tmp_path).read() or {}
        assert on_disk["finished"] and on_disk["ended"] and "applied" in on_disk["phases"]
        # After a refused write the file is written whole again: nothing refers to a line
        # the disk may have cut short.
        assert (tmp_path / agent_module.JOURNAL_NAME).read_bytes().count(b"\n") == 1

    def test_what_must_be_durable_still_fails(self, journal: Journal) -> None:
        with pytest.raises(OSError):
            journal.done("post_symlink")
        with pytest.raises(OSError):
            journal.begin("d2")
        assert journal.read() is not None and journal.read()["deploy"] == "d1"


def test_the_newest_committed_deploy_is_the_highest_established_not_the_highest_claimed() -> None:
    """`newest_committed` ranks deploys by what two of their acks claim, and one token can
    raise the claim of its own ack of an older deploy it took no part in (that ack is not
    among those the commit counts): the code review's D8 ranked above D9 and was taken.
    Every deploy ranked above the best established so far is still established."""
    store = DeployStore(None, "w", "web")  # type: ignore[arg-type]  # no call to Consul
    claims = {"d8": 900, "d9": 90, "d7": 70}  # d8's rank: the forged claim of h3's ack
    established = {"d8": 80, "d9": 90, "d7": 70}
    asked: list[str] = []

    def read_txn(ops: list[dict[str, Any]], *, consistent: bool = False) -> list[KVEntry]:
        out = []
        for op in ops:
            key = op["KV"]["Key"]
            deploy_id = key.rsplit("/", 1)[1]
            node = key.rsplit("/", 2)[1]
            ack = NodeProgress(node=node, state=LIVE, create_index=claims[deploy_id])
            out.append(KVEntry(key, ack.to_json(), 10**6, 10**6, 0, None, 0))  # key at 10**6
        return out

    def committed(deploy_id: str, **_: Any) -> Joined:
        asked.append(deploy_id)
        rec = dataclasses.replace(request(["h1", "h3"]), id=deploy_id)
        return Joined(rec, rec.digest(), established[deploy_id])

    store.acked_deploys = lambda: {d: ["h1", "h3"] for d in claims}  # type: ignore[method-assign]
    store._read_txn = read_txn  # type: ignore[method-assign]
    store.committed = committed  # type: ignore[method-assign]
    newest = store.newest_committed(0)
    assert newest is not None and newest.id == "d9", newest
    assert asked == ["d8", "d9"]  # d7 ranks below d9's established index: not read
    assert store.newest_committed(90) is None


def written_history(ops: list[dict[str, Any]]) -> list[str]:
    """The ``deploys`` of the history an end's ops write (the first op, a CAS)."""
    return list(json.loads(base64.b64decode(ops[0]["KV"]["Value"]))["deploys"])


@pytest.mark.parametrize("protected_back", [1, 2])
def test_an_end_never_writes_a_history_longer_than_a_read_takes(protected_back: int) -> None:
    """The code review: with `history_keep` at HISTORY_MAX, the end kept the protected
    ids (the deploys `current` and `previous` name) at the front of a full list, and wrote
    HISTORY_MAX + 1 or + 2 ids: every read then cut it and warned of padding. The oldest
    other ids make room, and are trimmed now."""
    store = DeployStore(None, "w", "web")  # type: ignore[arg-type]  # no call to Consul
    ids = [f"d-{n:04d}" for n in range(HISTORY_MAX)]
    protected = set(ids[:protected_back])
    pre = EndRead(None, 0, None, 0, ids, [], 7)
    ops = store._history_ops(pre, ["d-new"], keep=HISTORY_MAX, protected=protected)
    written = written_history(ops)
    assert len(written) == HISTORY_MAX, len(written)
    assert written[:protected_back] == ids[:protected_back] and written[-1] == "d-new"
    gone = sorted(set(ids) - set(written))
    assert gone == [ids[protected_back]], gone  # the oldest id not protected
    deleted = {op["KV"]["Key"] for op in ops[1:]}
    assert {store.keys.request(g) for g in gone} <= deleted, deleted
