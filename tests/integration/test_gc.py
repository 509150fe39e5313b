"""`watcherctl gc`: retiring a host that is gone for good, on a real Consul cluster (ACLs on)
with one `watcher run` per host: the list, what is deleted and kept, the refusals, the
guards against a host coming back or a deploy starting, and the token it needs."""

# ruff: noqa: F811  (the shared fixtures are imported, then named as parameters)

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.integration.test_deploy_acl import AclFleet, acl_fleet, create_token  # noqa: F401
from tests.integration.test_deploy_ops import MakeFleet, make_fleet  # noqa: F401
from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.fleet import Fleet, WatcherProc, wait_for
from watcher import ctl_gc
from watcher.barrier import DeployStore
from watcher.records import READY

# ACLs on, so the operator's refusal is real; the other fleets act with the management token.
CLUSTER = ClusterSpec(hosts=3, acl=True)
DOCS = Path(__file__).resolve().parents[2] / "docs"


def store_of(fleet: Fleet) -> DeployStore:
    return DeployStore(fleet.kv, fleet.kv_prefix, fleet.app)


def deploy(fleet: Fleet, version: str, *extra: str) -> dict[str, Any]:
    """`watcherctl deploy` of a new artifact that must commit; every live host on it."""
    artifact = fleet.publish(version)
    result = fleet.watchers[0].ctl_json("deploy", "web", artifact.id, *extra)
    assert result["result"] == "committed", result
    fleet.wait_idle()
    live = [w for w in fleet.watchers if w.running()]
    wait_for(
        lambda: all(w.current() == result["release"] for w in live),
        10,
        "every live host on the release",
        fleet,
    )
    return dict(result)


def stop_host(fleet: Fleet, w: WatcherProc) -> None:
    w.stop()
    fleet.wait_members(sum(1 for x in fleet.watchers if x.running()))


def gc(w: WatcherProc, *args: str, human: bool = False) -> subprocess.CompletedProcess[str]:
    return w.ctl("gc", "web", *args, check=False, as_json=not human)


def progress_keys(fleet: Fleet, node: str) -> list[str]:
    return sorted(fleet.kv.kv_keys(fleet.keys.node_progress_prefix(node), separator=None))


def acked_deploys(fleet: Fleet, node: str) -> set[str]:
    prefix = fleet.keys.node_progress_prefix(node)
    return {k[len(prefix) :].split("/")[0] for k in progress_keys(fleet, node)}


def host_record(fleet: Fleet, node: str) -> bytes | None:
    entry = fleet.kv.kv_get(fleet.keys.host(node))
    return entry.value if entry else None


def ack_state(store: DeployStore, deploy_id: str, node: str) -> str:
    ack, _ = store.ack(deploy_id, node)
    return ack.state if ack else ""


def still_needed(fleet: Fleet) -> set[str]:
    """What readers check: the deploys in history, and those `current` names."""
    store = store_of(fleet)
    current, _ = store.current()
    assert current is not None and current.previous is not None
    return set(store.history()) | {current.deploy, current.previous["deploy"]}


def nothing_distrusted(fleet: Fleet) -> None:
    """`history` and `status --fleet` show no record the acks contradict."""
    for row in fleet.watchers[0].ctl_json("history", "web"):
        assert row["distrusted"] == [], row
        assert row["result"] == "committed", row
    status = fleet.watchers[0].ctl_json("status", "web", "--fleet")["web"]
    assert status["current_problems"] == {}, status


class TestRetiringAHost:
    def test_a_stopped_host_blocks_deploys_until_gc_forgets_it(self, make_fleet: MakeFleet) -> None:
        fleet = make_fleet()
        w0, gone = fleet.watchers[0], fleet.watchers[2]
        first = deploy(fleet, "v1")
        stop_host(fleet, gone)

        v2 = fleet.publish("v2")
        refused = w0.ctl("deploy", "web", v2.id, check=False)
        assert refused.returncode == 4, refused
        assert f"known host(s) {gone.name} have no member key" in refused.stderr

        listed = json.loads(gc(w0).stdout)
        assert [r["node"] for r in listed["gone"]] == [gone.name], listed
        [row] = listed["gone"]
        assert row["host_record"] is True
        assert row["last_seen"]
        assert row["release"] == first["release"]
        assert row["acks"] == 1  # its ack of the deploy `current` names: kept
        assert row["expected_in_flight"] is None
        command = ["watcherctl", "gc", "web", gone.name, "-c", str(w0.config_path)]
        assert listed["forget"] == shlex.join(command)
        human = gc(w0, human=True)
        assert human.returncode == 0, human
        assert gone.name in human.stdout
        assert f"`{shlex.join(command)}`" in human.stdout
        assert host_record(fleet, gone.name) is not None  # the list deletes nothing

        forgot = gc(w0, gone.name)
        assert forgot.returncode == 0, forgot
        report = json.loads(forgot.stdout)["nodes"][gone.name]
        assert report["deleted"] == [fleet.keys.host(gone.name)]
        assert report["kept"] == {"named by current": [first["deploy"]]}
        assert host_record(fleet, gone.name) is None
        assert acked_deploys(fleet, gone.name) == {first["deploy"]}
        after = json.loads(gc(w0).stdout)  # forgotten; only an ack still checked is left
        assert [(r["node"], r["host_record"]) for r in after["gone"]] == [(gone.name, False)]
        assert after["forget"] is None

        # The next deploy needs no --allow-missing, and expects the live hosts only.
        result = w0.ctl_json("deploy", "web", v2.id)
        assert result["result"] == "committed", result
        assert result["expected"] == [fleet.watchers[0].name, fleet.watchers[1].name]

    def test_acks_readers_check_are_kept_the_rest_deleted(self, make_fleet: MakeFleet) -> None:
        fleet = make_fleet(daemon_extra={"history_keep": 3})
        w0, gone = fleet.watchers[0], fleet.watchers[2]
        for version in ("v1", "v2", "v3", "v4"):
            deploy(fleet, version)
        stop_host(fleet, gone)
        for version in ("v5", "v6"):  # these trim deploys the stopped host acked
            deploy(fleet, version, "--allow-missing")
        history_before = w0.ctl_json("history", "web")
        acked = acked_deploys(fleet, gone.name)
        kept, stale = acked & still_needed(fleet), acked - still_needed(fleet)
        assert kept, f"the setup left no ack still needed: {acked}"
        assert stale, f"the setup left no stale ack: {acked}"

        keys_before = progress_keys(fleet, gone.name)
        dry = gc(w0, "--dry-run", gone.name)  # the flag before the node: README's "before or after"
        assert dry.returncode == 0, dry
        plan = json.loads(dry.stdout)["nodes"][gone.name]
        assert plan["deploys_deleted"] == sorted(stale)
        assert {d for ids in plan["kept"].values() for d in ids} == kept
        assert "deleted" not in plan
        assert progress_keys(fleet, gone.name) == keys_before
        assert host_record(fleet, gone.name) is not None
        human = gc(w0, gone.name, "--dry-run", human=True).stdout
        assert f"would forget {gone.name}" in human
        assert "removes the rest" in human

        forgot = gc(w0, gone.name)
        assert forgot.returncode == 0, forgot
        assert acked_deploys(fleet, gone.name) == kept
        assert host_record(fleet, gone.name) is None
        # Past deploys still show as they did: none of them NOT TRUSTED. But for whom the
        # --allow-missing ones left out, which comes from today's host records: a host
        # forgotten is not named any more.
        history_after = w0.ctl_json("history", "web")
        left_before = [row.pop("left_out", None) for row in history_before]
        left_after = [row.pop("left_out", None) for row in history_after]
        assert history_after == history_before
        assert left_before[:2] == [[gone.name]] * 2 and left_after[:2] == [[]] * 2, left_before
        nothing_distrusted(fleet)

        # Later deploys (no --allow-missing now) move the kept ones out of history; gc
        # again removes the rest.
        deploy(fleet, "v7")
        deploy(fleet, "v8")
        [row] = json.loads(gc(w0).stdout)["gone"]
        assert row["node"] == gone.name and row["host_record"] is False
        assert row["acks_removable"] == len(kept - still_needed(fleet)) > 0
        assert json.loads(gc(w0).stdout)["forget"] is not None
        assert gc(w0, gone.name).returncode == 0
        assert acked_deploys(fleet, gone.name) == kept & still_needed(fleet)
        nothing_distrusted(fleet)

    def test_a_forgotten_host_comes_back_and_converges(self, make_fleet: MakeFleet) -> None:
        fleet = make_fleet()
        w0, gone = fleet.watchers[0], fleet.watchers[2]
        deploy(fleet, "v1")
        stop_host(fleet, gone)
        assert gc(w0, gone.name).returncode == 0
        assert host_record(fleet, gone.name) is None
        second = deploy(fleet, "v2")

        gone.start()
        fleet.wait_members(3)
        wait_for(lambda: gone.current() == second["release"], 30, "the host converged", fleet)
        wait_for(lambda: host_record(fleet, gone.name) is not None, 10, "its host record", fleet)
        assert json.loads(gc(w0).stdout)["gone"] == []
        third = deploy(fleet, "v3")
        assert third["expected"] == sorted(w.name for w in fleet.watchers)
        assert gone.current() == third["release"]


class TestRefusals:
    def test_alive_unknown_and_invalid_nodes_delete_nothing(self, make_fleet: MakeFleet) -> None:
        fleet = make_fleet()
        w0, alive, gone = fleet.watchers[0], fleet.watchers[1], fleet.watchers[2]
        deploy(fleet, "v1")
        stop_host(fleet, gone)
        before = {
            w.name: (host_record(fleet, w.name), progress_keys(fleet, w.name))
            for w in [alive, gone]
        }

        refused = gc(w0, gone.name, alive.name)
        assert refused.returncode == 4, refused
        assert f"{alive.name} holds a member key" in refused.stderr
        assert "Stop it first" in refused.stderr
        assert "nothing was deleted" in refused.stderr

        unknown = gc(w0, "no-such-host")
        assert unknown.returncode == 2, unknown
        assert "no-such-host" in unknown.stderr
        assert all(w.name in unknown.stderr for w in fleet.watchers)  # the known hosts

        invalid = gc(w0, "bad/name")
        assert invalid.returncode == 2, invalid
        assert "invalid node name" in invalid.stderr

        after = {
            w.name: (host_record(fleet, w.name), progress_keys(fleet, w.name))
            for w in [alive, gone]
        }
        assert after == before

    def test_a_host_the_deploy_in_flight_expects_is_kept(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        # host-1 stays in post_release (until the abort below stops it); host-3 acks
        # ready, then dies: the deploy still expects it (its ready ack counts), and gc
        # must not pull it from under it.
        slow = tmp_path / "slow-post-release"
        slow.write_text("#!/bin/sh\nsleep 120\n")
        slow.chmod(0o755)
        fleet = make_fleet(hosts={0: {"hooks": {"post_release": str(slow)}}})
        w0, gone = fleet.watchers[0], fleet.watchers[2]
        v1 = fleet.publish("v1")
        started = w0.ctl_json("deploy", "web", v1.id, "--no-wait")
        deploy_id = started["deploy"]
        store = store_of(fleet)
        wait_for(lambda: ack_state(store, deploy_id, gone.name) == READY, 20, "ready", fleet)
        gone.kill()
        fleet.wait_members(2)
        assert fleet.inflight() == deploy_id
        before = (host_record(fleet, gone.name), progress_keys(fleet, gone.name))

        refused = gc(w0, gone.name)
        assert refused.returncode == 4, refused
        assert f"the deploy in flight, {deploy_id}, expects {gone.name}" in refused.stderr
        assert (host_record(fleet, gone.name), progress_keys(fleet, gone.name)) == before
        [row] = json.loads(gc(w0).stdout)["gone"]
        assert row["expected_in_flight"] == deploy_id
        assert json.loads(gc(w0).stdout)["forget"] is None

        w0.ctl("abort", "web", deploy_id)
        fleet.wait_idle(30)
        forgot = gc(w0, gone.name)
        assert forgot.returncode == 0, forgot
        assert host_record(fleet, gone.name) is None
        # The aborted deploy is in history: its ack stays.
        assert acked_deploys(fleet, gone.name) == {deploy_id}

    def test_a_host_a_committed_deploy_expects_is_kept_and_abort_is_not_offered(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        # host-1 and host-3 wait in post_symlink (after the commit, never interrupted);
        # host-3 dies there. gc used to send the operator to `abort`, which refuses a
        # committed deploy: the operator review found no way out offered at all.
        gate = tmp_path / "gate"
        hooks = {}
        for n in (0, 2):
            hook = tmp_path / f"post-symlink-{n}"
            hook.write_text(
                f'#!/bin/sh\ntouch "{gate}.started-{n}"\n'
                f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'
            )
            hook.chmod(0o755)
            hooks[n] = {"hooks": {"post_symlink": str(hook)}}
        fleet = make_fleet(hosts=hooks)
        w0, gone = fleet.watchers[0], fleet.watchers[2]
        try:
            v1 = fleet.publish("v1")
            deploy_id = w0.ctl_json("deploy", "web", v1.id, "--no-wait")["deploy"]
            started = tmp_path / "gate.started-2"
            wait_for(started.exists, 30, "host-3 in its post_symlink hook", fleet)
            gone.kill()
            fleet.wait_members(2)
            assert fleet.inflight() == deploy_id

            refused = gc(w0, gone.name)

            assert refused.returncode == 4, refused
            assert (
                f"the deploy in flight, {deploy_id}, expects {gone.name} and is committed: no "
                "abort can end it. It ends once the watchers of web that run on its hosts "
                "(host-1, host-2, host-3) have applied it, or past its apply deadline at any "
                "watcher of web that runs; then run gc again"
            ) in refused.stderr, refused.stderr
            assert "abort" not in refused.stderr.split("no abort can end it", 1)[1]
        finally:
            gate.touch()  # the killed host's hook outlives its watcher: let it end
        fleet.wait_idle(30)

    def test_a_host_coming_back_or_a_deploy_starting_stops_the_deletes(
        self, make_fleet: MakeFleet
    ) -> None:
        fleet = make_fleet()
        gone = fleet.watchers[2]
        deploy(fleet, "v1")
        deploy(fleet, "v2")
        stop_host(fleet, gone)
        store = store_of(fleet)

        # The host comes back between the plan and the deletes.
        plans, index = ctl_gc.plan_forget(store, [gone.name])
        gone.start()
        fleet.wait_members(3)
        done = ctl_gc.delete_node(store, plans[0], index)
        assert "came back" in done.reason, done
        assert done.deleted == []
        assert host_record(fleet, gone.name) is not None

        # A deploy starts between the plan and the deletes.
        stop_host(fleet, gone)
        before = progress_keys(fleet, gone.name)
        plans, index = ctl_gc.plan_forget(store, [gone.name])
        assert plans[0].deploys_deleted == [] and plans[0].host_index
        v3 = fleet.publish("v3")
        started = fleet.watchers[0].ctl_json("deploy", "web", v3.id, "--allow-missing", "--no-wait")
        done = ctl_gc.delete_node(store, plans[0], index)
        assert "started meanwhile" in done.reason or "changed meanwhile" in done.reason, done
        assert done.deleted == []
        assert host_record(fleet, gone.name) is not None
        assert progress_keys(fleet, gone.name) == before
        fleet.wait_outcome(started["deploy"])


class TestWithAcls:
    def test_an_operator_token_is_refused_a_management_token_forgets(
        self, acl_fleet: AclFleet, cluster: ConsulCluster
    ) -> None:
        fleet = acl_fleet.fleet
        gone = fleet.watchers[2]
        v1 = acl_fleet.publish("v1")
        assert json.loads(acl_fleet.operator("deploy", "web", v1["id"]).stdout)["result"] == (
            "committed"
        )
        fleet.wait_idle()
        stop_host(fleet, gone)
        before = (host_record(fleet, gone.name), progress_keys(fleet, gone.name))

        # The list is read-only: an operator's token may.
        listed = json.loads(acl_fleet.operator("gc", "web").stdout)
        assert [r["node"] for r in listed["gone"]] == [gone.name]

        refused = acl_fleet.operator("gc", "web", gone.name, check=False)
        assert refused.returncode == 3, refused
        assert f"write permission on {fleet.keys.host(gone.name)}" in refused.stderr
        assert "management token" in refused.stderr
        assert "Retiring a host" in refused.stderr
        assert (host_record(fleet, gone.name), progress_keys(fleet, gone.name)) == before

        admin = config_with_token(fleet, str(cluster.management_token), "admin.yaml")
        forgot = acl_fleet.ctl(admin, "gc", "web", gone.name)
        assert json.loads(forgot.stdout)["nodes"][gone.name]["deleted"] == [
            fleet.keys.host(gone.name)
        ]
        assert host_record(fleet, gone.name) is None

        v2 = acl_fleet.publish("v2")
        result = json.loads(acl_fleet.operator("deploy", "web", v2["id"]).stdout)
        assert result["result"] == "committed", result
        assert gone.name not in result["expected"]

    def test_the_policy_docs_acl_gives_for_gc_is_enough(
        self, acl_fleet: AclFleet, cluster: ConsulCluster
    ) -> None:
        fleet = acl_fleet.fleet
        gone = fleet.watchers[2]
        v1 = acl_fleet.publish("v1")
        assert json.loads(acl_fleet.operator("deploy", "web", v1["id"]).stdout)["result"] == (
            "committed"
        )
        fleet.wait_idle()
        stop_host(fleet, gone)
        token, _ = create_token(cluster.server, f"gc-{fleet.kv_prefix}", gc_policy(fleet))
        forgot = acl_fleet.ctl(config_with_token(fleet, token, "gc.yaml"), "gc", "web", gone.name)
        assert json.loads(forgot.stdout)["nodes"][gone.name]["deleted"] == [
            fleet.keys.host(gone.name)
        ]
        assert host_record(fleet, gone.name) is None
        acl_fleet.assert_no_denials()


def gc_policy(fleet: Fleet) -> str:
    """The policy docs/acl.md's "Retiring a host" gives, for this fleet's prefix."""
    section = (DOCS / "acl.md").read_text().split("## Retiring a host", 1)[1].split("\n## ", 1)[0]
    rules = section.split("```hcl\n", 1)[1].split("```", 1)[0]
    assert "watcher/apps/web/" in rules
    return rules.replace("watcher/apps/web/", f"{fleet.kv_prefix}/apps/web/")


def config_with_token(fleet: Fleet, token: str, name: str) -> Path:
    """host-1's config with another Consul token (watcherctl's -c)."""
    config = fleet.config_for(fleet.watchers[0])
    config["consul"]["token"] = token
    path = fleet.workdir / name
    path.write_text(yaml.safe_dump(config))
    return path
