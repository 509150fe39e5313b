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
    snap[f"deploys/{deploy_id}"] = item(
        {"id": deploy_id, "release": release, "expected": sorted(states)}
    )
    for node, state in states.items():
        snap[f"deploys/{deploy_id}/nodes/{node}"] = item({"node": node, "state": state})
    if outcome:
        snap[f"deploys/{deploy_id}/decision"] = item({"outcome": outcome})


class TestCommittedDeploys:
    def test_a_commit_with_every_ack_counts(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d1", R1, {"a": "live", "b": "ready", "c": "failed_after_commit"}, "commit")
        assert inv.committed_deploys(snap) == {R1: "d1"}

    def test_a_commit_decision_without_every_ack_does_not(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d1", R1, {"a": "live", "b": "staging"}, "commit")
        deploy(snap, "d2", R2, {"a": "ready"}, "commit")
        del snap["deploys/d2/nodes/a"]
        assert inv.committed_deploys(snap) == {}

    def test_aborts_undecided_and_garbage_do_not(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d1", R1, {"a": "ready"}, "abort")
        deploy(snap, "d2", R2, {"a": "ready"}, "")
        snap["deploys/d3"] = item(b"{not json")
        snap["deploys/d3/decision"] = item({"outcome": "commit"})
        assert inv.committed_deploys(snap) == {}


class TestOverlap:
    def test_one_after_the_other_is_fine_and_overlap_is_not(self) -> None:
        snap: inv.KVSnapshot = {}
        deploy(snap, "d1", R1, {"a": "live"}, "commit")
        deploy(snap, "d2", R2, {"a": "live"}, "commit")
        snap["deploys/d1"] = item(json.loads(snap["deploys/d1"].value), create=10)
        snap["deploys/d1/outcome"] = item({"result": "committed"}, create=20)
        snap["deploys/d2"] = item(json.loads(snap["deploys/d2"].value), create=21)
        snap["deploys/d2/outcome"] = item({"result": "committed"}, create=30)
        assert inv.overlapping_deploys(snap) == []
        snap["deploys/d2"] = item(json.loads(snap["deploys/d2"].value), create=15)
        found = inv.overlapping_deploys(snap)
        assert [v.kind for v in found] == ["two_in_flight"] and "d2" in found[0].detail


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
        snap["deploys/d1/decision"] = item({"outcome": "commit"}, create=5, modify=9)
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
