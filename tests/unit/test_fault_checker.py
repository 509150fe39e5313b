"""The fault campaign's own reading of KV: what it calls committed, and what it flags."""

from __future__ import annotations

import json
from typing import Any

from tests.faults import invariants as inv

R1 = "20260101T000000Z-main-11111111"
R2 = "20260101T000100Z-main-22222222"


def item(doc: Any, create: int = 1, modify: int | None = None) -> inv.KVItem:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return inv.KVItem(raw, create, create if modify is None else modify)


def deploy(
    snap: inv.KVSnapshot, deploy_id: str, release: str, states: dict[str, str], outcome: str
) -> None:
    """A layout-2 deploy: its request and each node's ack naming the request's digest."""
    request = {"id": deploy_id, "release": release, "expected": sorted(states), "version": 2}
    snap[f"requests/{deploy_id}"] = item(request)
    for node, state in states.items():
        snap[f"progress/{node}/{deploy_id}"] = item(
            {"node": node, "state": state, "digest": inv._digest(request)}
        )
    if outcome:
        snap[f"decisions/{deploy_id}"] = item({"outcome": outcome})


class TestCommittedDeploys:
    def test_acks_for_another_request_do_not_count(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d1", R1, {"a": "live", "b": "ready"}, "commit")
        forged = json.loads(snap["progress/b/d1"].value) | {"digest": "0" * 64}
        snap["progress/b/d1"] = item(forged)
        assert inv.committed_deploys(snap) == {}

    def test_a_commit_with_every_ack_counts(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d1", R1, {"a": "live", "b": "ready", "c": "failed_after_commit"}, "")
        assert inv.committed_deploys(snap) == {R1: "d1"}

    def test_a_commit_decision_without_every_ack_does_not(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d1", R1, {"a": "live", "b": "staging"}, "commit")
        deploy(snap, "d2", R2, {"a": "ready"}, "commit")
        del snap["progress/a/d2"]
        assert inv.committed_deploys(snap) == {}

    def test_aborts_undecided_and_garbage_do_not(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d1", R1, {"a": "ready", "b": "failed"}, "abort")
        deploy(snap, "d2", R2, {"a": "ready", "b": "staging"}, "")
        snap["requests/d3"] = item(b"{not json")
        snap["decisions/d3"] = item({"outcome": "commit"})
        assert inv.committed_deploys(snap) == {}


class TestOverlap:
    def test_one_after_the_other_is_fine_and_overlap_is_not(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d1", R1, {"a": "live"}, "commit")
        deploy(snap, "d2", R2, {"a": "live"}, "commit")
        snap["requests/d1"] = item(json.loads(snap["requests/d1"].value), create=10)
        snap["outcomes/d1"] = item({"result": "committed"}, create=20)
        snap["requests/d2"] = item(json.loads(snap["requests/d2"].value), create=21)
        snap["outcomes/d2"] = item({"result": "committed"}, create=30)
        assert inv.overlapping_deploys(snap) == []
        snap["requests/d2"] = item(json.loads(snap["requests/d2"].value), create=15)
        found = inv.overlapping_deploys(snap)
        assert [v.kind for v in found] == ["two_in_flight"] and "d2" in found[0].detail

    def test_a_deploy_the_history_trimmed_is_not_taken_for_one_in_flight(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d0", R1, {"a": "live"}, "commit")
        # Trimmed: the request and outcome are gone, the host's own ack and the request it
        # carries stay until that host deletes them.
        snap["progress/a/d0/request"] = snap.pop("requests/d0")
        assert not inv.deploy_facts(snap)["d0"].kept
        deploy(snap, "d1", R2, {"a": "live"}, "commit")
        snap["outcomes/d1"] = item({"result": "committed"}, create=5)
        assert inv.overlapping_deploys(snap) == []


class TestChecks:
    def test_settled_fleet_passes(self) -> None:
        snap: inv.KVSnapshot = {"current": item({"release": R1})}
        disks = [inv.DiskView("a", R1, True, f"releases/{R1}")]
        assert inv.check_settled(snap, {R1: "d1"}, disks, {"a"}) == []

    def test_each_broken_invariant_is_named(self) -> None:
        snap: inv.KVSnapshot = {
            "current": item({"release": R2}),
            "inflight": item(b"d9"),
        }
        deploy(snap, "d1", R1, {"a": "live", "b": "live"}, "commit")
        snap["decisions/d1"] = item({"outcome": "commit"}, create=5, modify=9)
        deploy(snap, "d2", R2, {"a": "ready", "b": "staging"}, "")
        disks = [
            inv.DiskView("a", R2, False, f"releases/{R2}"),
            inv.DiskView("b", R1, True, f"releases/{R1}"),
        ]
        kinds = sorted(v.kind for v in inv.check_settled(snap, {R1: "d1"}, disks, {"a", "b"}))
        assert kinds == [
            "current_incomplete",
            "decision_rewritten",
            "fleet_current_uncommitted",
            "inflight_left",
            "not_converged",
            "two_in_flight",
            "uncommitted_release",
        ]

    def test_a_host_down_need_not_have_converged(self) -> None:
        snap: inv.KVSnapshot = {"current": item({"release": R2})}
        disks = [inv.DiskView("b", R1, True, f"releases/{R1}")]
        assert inv.check_settled(snap, {R1: "d1", R2: "d2"}, disks, set()) == []

    def test_status_that_disagrees_with_a_disk(self) -> None:
        status = {"web": {"current": R1, "hosts": {"a": {"release": R2, "member": True}}}}
        disks = [inv.DiskView("a", R1, True, f"releases/{R1}")]
        found = inv.check_status(status, "web", disks, R1)
        assert [(v.kind, v.node) for v in found] == [("status_disagrees", "a")]
        assert R2 in found[0].detail


class TestStatusInDoubt:
    """The campaign reports a settled fleet whose `status --fleet` still exited 1, naming
    what it did not trust (a healthy fleet never does that)."""

    def test_what_made_status_exit_1_is_named_and_reported(self) -> None:
        from tests.faults.campaign import APP, DeployResult, Plan, Report, _doubt_of

        data = {
            APP: {
                "current_problems": {"current": "current names d9, which no ack commits"},
                "deploy": {"id": "d2", "decision": "contested", "distrusted": ["the outcome"]},
            }
        }
        why = _doubt_of(data)
        assert why == "current names d9, which no ack commits; the outcome; deploy d2 contested"
        assert _doubt_of({APP: {"deploy": {"problem": "`inflight` holds no deploy id"}}}) == (
            "`inflight` holds no deploy id"
        )
        hosts = {
            "h1": {"alarm": "", "member": True},
            "h2": {"alarm": "current names deploy d9, which ...", "member": True},
            "h3": {"alarm": "its last record's, down", "member": False},  # not counted
        }
        assert _doubt_of({APP: {"deploy": None, "hosts": hosts}}) == (
            "alarm on h2: current names deploy d9, which ..."
        )
        report = Report(seed=7, hosts=5)
        plan = Plan(
            n=3, fault="none", victim=0, coordinator=False, delay=0, hold=0, starter=0, times=None
        )
        report.results.append(DeployResult(n=3, plan=plan, status_in_doubt=why))
        text = report.render()
        assert "status --fleet in doubt (exit 1) after settling: 1" in text
        assert f"  deploy 3: {why}" in text
