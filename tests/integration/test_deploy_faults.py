"""The deploy barrier under faults: killed watchers and coordinators, stopped and cut-off agents."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.fleet import BIN, SESSION_TTL, Fleet, WatcherProc, consul_for, wait_for
from tests.support.procs import reaped
from watcher.barrier import DeployStore
from watcher.config import S3Settings
from watcher.records import ArtifactRecord

CLUSTER = ClusterSpec(hosts=3)

#: What a dead watcher may add to Consul's own grace (2x the session TTL) before the deploy
#: is aborted: the members watch waking the loop, the coordinator's abort txn, a loaded CI box.
REACTION = 3.0
ABORT_BOUND = 2 * SESSION_TTL + REACTION

HOOK = """#!/bin/sh
# Test hook: $1 = node, $2 = phase. Logs to <ctl>/<node>.log; post_release waits while
# <ctl>/hold-<node> exists, post_symlink while <ctl>/hold-post_symlink-<node> does, giving
# up when the watcher that started it is gone (a SIGKILL leaves it orphaned).
ctl={ctl}
node=$1
phase=$2
echo "$phase start $WATCHER_DEPLOY_ID $WATCHER_RELEASE" >> "$ctl/$node.log"
case "$phase" in
  post_release) hold="$ctl/hold-$node" ;;
  post_symlink) hold="$ctl/hold-post_symlink-$node" ;;
  *) hold="" ;;
esac
while [ -n "$hold" ] && [ -e "$hold" ]; do
  kill -0 "$PPID" 2>/dev/null || exit 70
  sleep 0.05
done
echo "$phase end $WATCHER_DEPLOY_ID $WATCHER_RELEASE" >> "$ctl/$node.log"
"""


class CurrentMonitor(threading.Thread):
    """Samples every host's ``current`` symlink every few ms; records each release seen."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(name="current-monitor", daemon=True)
        self.fleet = fleet
        self.seen: dict[str, set[str]] = {w.name: set() for w in fleet.watchers}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for w in self.fleet.watchers:
                release = w.current()
                if release is not None:
                    self.seen[w.name].add(release)
            self.stopping.wait(0.01)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


@dataclass
class Rig:
    """A started fleet whose hooks the test steers through files in ``ctl``."""

    cluster: ConsulCluster
    fleet: Fleet
    ctl: Path
    monitor: CurrentMonitor = field(init=False)

    def __post_init__(self) -> None:
        self.monitor = CurrentMonitor(self.fleet)
        self.store = DeployStore(self.fleet.kv, self.fleet.kv_prefix, self.fleet.app)

    @property
    def watchers(self) -> list[WatcherProc]:
        return self.fleet.watchers

    def by_name(self, node: str) -> WatcherProc:
        return next(w for w in self.watchers if w.name == node)

    # --- steering hooks ---------------------------------------------------------------

    def hold(self, *ws: WatcherProc) -> None:
        for w in ws:
            (self.ctl / f"hold-{w.name}").touch()

    def release(self, *ws: WatcherProc) -> None:
        for w in ws:
            (self.ctl / f"hold-{w.name}").unlink(missing_ok=True)

    def hold_after_flip(self, *ws: WatcherProc) -> None:
        """Hold ``ws`` in post_symlink: after their flip, before their live ack."""
        for w in ws:
            (self.ctl / f"hold-post_symlink-{w.name}").touch()

    def release_after_flip(self, *ws: WatcherProc) -> None:
        for w in ws:
            (self.ctl / f"hold-post_symlink-{w.name}").unlink(missing_ok=True)

    def hook_lines(self, w: WatcherProc, phase: str, deploy_id: str) -> list[str]:
        try:
            text = (self.ctl / f"{w.name}.log").read_text()
        except FileNotFoundError:
            return []
        return [
            line for line in text.splitlines() if line.startswith(f"{phase} ") and deploy_id in line
        ]

    def wait_hook_started(self, ws: list[WatcherProc], deploy_id: str) -> None:
        wait_for(
            lambda: all(self.hook_lines(w, "post_release", deploy_id) for w in ws),
            30,
            f"post_release started on {[w.name for w in ws]}",
            self.fleet,
        )

    # --- reading KV -------------------------------------------------------------------

    def deploy(self, w: WatcherProc, record: ArtifactRecord, *extra: str) -> tuple[str, str]:
        """Start a deploy without waiting; (deploy id, release)."""
        started = w.ctl_json("deploy", "web", record.id, "--no-wait", *extra)
        return str(started["deploy"]), str(started["release"])

    def states(self, deploy_id: str) -> dict[str, str]:
        view = self.store.view(deploy_id)
        return {} if view is None else {n: p.state for n, p in view.nodes.items()}

    def wait_states(self, deploy_id: str, ws: list[WatcherProc], state: str) -> None:
        wait_for(
            lambda: all(self.states(deploy_id).get(w.name) == state for w in ws),
            30,
            f"{[w.name for w in ws]} {state} in {deploy_id}",
            self.fleet,
        )

    def first(self, deploy_id: str) -> WatcherProc:
        """The host a test acts on first. Layout 2 elects no coordinator before the acks
        (the lock only picks who writes the outcome), so this is simply host-1."""
        assert self.fleet.inflight() == deploy_id
        return self.watchers[0]

    def health(self, w: WatcherProc) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{w.health_port()}/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    # --- invariants -------------------------------------------------------------------

    def check_invariants(self) -> dict[str, dict[str, Any]]:
        """DESIGN.md 6 invariants over every deploy made; returns {deploy id: summary}."""
        deploys: dict[str, dict[str, Any]] = {}
        committed: set[str] = set()
        for deploy_id in self.store.history():
            view = self.store.view(deploy_id)
            assert view is not None, f"deploy {deploy_id} in history has no record"
            entry = self.fleet.kv.kv_get(self.fleet.keys.decision(deploy_id))
            assert entry is not None and view.decision is not None, f"{deploy_id}: no decision"
            assert entry.create_index == entry.modify_index, (
                f"{deploy_id}: decision key written more than once "
                f"(create {entry.create_index}, modify {entry.modify_index})"
            )
            # What counts is the acks (DESIGN.md 6.4); the decision record must agree.
            verdict = view.verdict()
            assert verdict in ("commit", "abort"), f"{deploy_id}: acks say {verdict}"
            assert view.decision.outcome == verdict, f"{deploy_id}: record says otherwise"
            if verdict == "commit":
                committed.add(view.record.release)
            deploys[deploy_id] = {
                "release": view.record.release,
                "decision": view.decision,
                "outcome": view.outcome,
                "states": {n: p.state for n, p in view.nodes.items()},
            }
        for node, releases in self.monitor.seen.items():
            uncommitted = releases - committed
            assert not uncommitted, f"{node} pointed current at uncommitted {sorted(uncommitted)}"
        return deploys


def write_config(fleet: Fleet, w: WatcherProc, ctl: Path) -> None:
    hook = str(ctl / "hook")
    hooks = {
        phase: [[hook, w.name, phase]]
        for phase in ("post_release", "post_symlink", "post_abort", "validate")
    }
    config = fleet.config_for(
        w,
        {
            "hooks": hooks,
            "timeouts": {"prepare": "60s", "apply": "60s", "hook": "45s"},
        },
    )
    config["daemon"]["listen"] = "127.0.0.1:0"  # the port is read from the log
    w.config_path.write_text(yaml.safe_dump(config))


@pytest.fixture
def rig(
    cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Rig]:
    """The fleet with its hook; an indirect parameter is the watchers' extra ``daemon``
    settings."""
    fleet = Fleet(
        cluster,
        s3_settings,
        tmp_path,
        kv_prefix=f"f{time.monotonic_ns()}",
        daemon_extra=getattr(request, "param", {}),
    )
    # Read KV through the server: the tests stop and cut off client agents.
    fleet.kv = consul_for(cluster.server)
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    (ctl / "hook").write_text(HOOK.format(ctl=ctl))
    (ctl / "hook").chmod(0o755)
    for w in fleet.watchers:
        write_config(fleet, w, ctl)
    r = Rig(cluster, fleet, ctl)
    fleet.start()
    r.monitor.start()
    try:
        yield r
    finally:
        r.monitor.stop()
        for path in ctl.glob("hold-*"):
            path.unlink()
        try:
            for agent in cluster.hosts:  # leave the module's cluster whole for the next test
                cluster.reconnect(agent)
                if not agent.running:
                    cluster.start(agent)
        finally:
            fleet.stop()


def baseline(rig: Rig, version: str = "v1") -> str:
    """Deploy ``version`` to every host; returns its release."""
    record = rig.fleet.publish(version)
    result = rig.watchers[0].ctl_json("deploy", "web", record.id)
    assert result["result"] == "committed", result
    rig.fleet.wait_idle()
    release = str(result["release"])
    assert set(rig.fleet.currents().values()) == {release}
    return release


class TestDeadWatcher:
    def test_sigkill_during_prepare_aborts_within_bound(self, rig: Rig) -> None:
        fleet = rig.fleet
        v1 = baseline(rig)
        v2 = fleet.publish("v2")
        rig.hold(*rig.watchers)
        deploy_id, release = rig.deploy(rig.watchers[0], v2)
        rig.wait_hook_started(rig.watchers, deploy_id)
        coordinator = rig.first(deploy_id)
        victim = next(w for w in rig.watchers if w is not coordinator)
        others = [w for w in rig.watchers if w is not victim]
        rig.release(*others)
        rig.wait_states(deploy_id, others, "ready")

        killed = time.monotonic()
        victim.kill()
        member_gone = wait_for(
            lambda: victim.name not in fleet.members(), 30, "member key gone", fleet
        )
        wait_for(
            lambda: fleet.decision(deploy_id) is not None, 30, "a decision", fleet, interval=0.01
        )
        took = time.monotonic() - killed
        print(
            f"\nSIGKILLed watcher {victim.name}: member key gone after {member_gone:.2f}s, "
            f"deploy aborted after {took:.2f}s (bound {ABORT_BOUND:.1f}s = 2x TTL "
            f"{SESSION_TTL:.0f}s + {REACTION:.0f}s)"
        )
        decision = fleet.decision(deploy_id)
        assert decision is not None and decision["outcome"] == "abort", decision
        assert victim.name in decision["reason"] and "session" in decision["reason"]
        assert took <= ABORT_BOUND, f"abort took {took:.2f}s > {ABORT_BOUND}s"

        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "aborted" and victim.name in outcome["reason"], outcome
        # The outcome names the host the decision named (the decider's intent), not the
        # first host by name, which only quoted it.
        decided = (decision["reason"], f"node {decision['by']} aborted: {decision['reason']}")
        assert outcome["reason"] in decided, (outcome, decision)
        fleet.wait_idle()
        assert fleet.currents() == {w.name: v1 for w in rig.watchers}
        for w in others:  # post_release ran there, so post_abort did too
            # It runs after the host's `aborted` ack, which may be what ended the deploy.
            wait_for(
                lambda w=w: bool(rig.hook_lines(w, "post_abort", deploy_id)),
                10,
                f"{w.name} ran post_abort",
                fleet,
            )
            # The `aborted` intent is in the ack before the cleanup runs (docs/design.md
            # R4), so the deploy may end while a host still removes its tree.
            tree = w.app_dir / "releases" / release
            wait_for(lambda t=tree: not t.exists(), 10, f"{w.name} removed {release}", fleet)

        # The victim comes back: it finishes its part as aborted and never flips.
        rig.release(victim)
        victim.start()
        rig.wait_states(deploy_id, [victim], "aborted")
        wait_for(lambda: fleet.members() == {w.name for w in rig.watchers}, 30, "members", fleet)
        assert fleet.currents() == {w.name: v1 for w in rig.watchers}
        deploys = rig.check_invariants()
        assert deploys[deploy_id]["states"][victim.name] == "aborted"


class TestCoordinatorKilled:
    def test_a_host_killed_after_its_ready_ack_does_not_hold_the_fleet(self, rig: Rig) -> None:
        """Its ack stands: the others commit without it, and it applies the commit when it
        comes back (a ready fleet never waits for any particular host)."""
        fleet = rig.fleet
        baseline(rig)
        v2 = fleet.publish("v2")
        rig.hold(*rig.watchers)
        deploy_id, release = rig.deploy(rig.watchers[0], v2)
        rig.wait_hook_started(rig.watchers, deploy_id)
        victim = rig.first(deploy_id)
        slow, fast = [w for w in rig.watchers if w is not victim]
        rig.release(victim, fast)
        rig.wait_states(deploy_id, [victim, fast], "ready")
        assert fleet.decision(deploy_id) is None
        victim.kill()

        rig.release(slow)
        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "committed", outcome
        assert outcome["by"] != victim.name
        for w in (slow, fast):
            assert w.current() == release, w.name
        victim.start()
        wait_for(lambda: victim.current() == release, 30, "the killed host applied it", fleet)
        rig.wait_states(deploy_id, rig.watchers, "live")
        rig.check_invariants()

    def test_after_the_decision_another_host_ends_the_deploy(self, rig: Rig) -> None:
        fleet = rig.fleet
        baseline(rig)
        v2 = fleet.publish("v2")
        rig.hold(*rig.watchers)
        deploy_id, release = rig.deploy(rig.watchers[0], v2)
        rig.wait_hook_started(rig.watchers, deploy_id)
        coordinator = rig.first(deploy_id)
        others = [w for w in rig.watchers if w is not coordinator]
        rig.release(*others)
        rig.wait_states(deploy_id, others, "ready")

        # Once the decision is written the coordinator goes on: it flips, acks live and,
        # the others live too, writes the end itself. Between the decision and the SIGKILL
        # below (the blocking query's answer, this process scheduled) a loaded runner can
        # let it get that far, and then no other host ends anything. Held in post_symlink
        # (after its flip, before its live ack), it cannot end the deploy before it dies.
        rig.hold_after_flip(coordinator)
        decision_key = fleet.keys.decision(deploy_id)
        index, _ = fleet.kv.kv_get_blocking(decision_key, 0, 0.1)
        rig.release(coordinator)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            index, entry = fleet.kv.kv_get_blocking(decision_key, index, 5)
            if entry is not None:
                coordinator.kill()
                break
        else:
            raise AssertionError(f"no decision in {deploy_id}\n{fleet.logs()}")
        decision = json.loads(entry.value or b"{}")
        assert decision["outcome"] == "commit"

        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "committed", outcome
        assert outcome["by"] != coordinator.name, "another host ended the deploy"
        for w in others:
            assert w.current() == release, w.name
        assert rig.states(deploy_id)[others[0].name] == "live"
        # The coordinator comes back and applies the commit it wrote.
        rig.release_after_flip(coordinator)
        coordinator.start()
        wait_for(lambda: coordinator.current() == release, 30, "old coordinator converged", fleet)
        assert fleet.currents() == {w.name: release for w in rig.watchers}
        rig.wait_states(deploy_id, rig.watchers, "live")
        rig.check_invariants()


class TestAgentAway:
    def test_stopped_agent_converges_after_commit_and_never_to_an_abort(self, rig: Rig) -> None:
        fleet, cluster = rig.fleet, rig.cluster
        baseline(rig)
        away = rig.watchers[2]
        cluster.stop(away.agent)
        gone = wait_for(lambda: away.name not in fleet.members(), 30, "member key gone", fleet)
        print(f"\nstopped agent {away.name}: its member key went after {gone:.1f}s")
        # Its /health says so (it said healthy for the whole outage): the renewals fail.
        wait_for(lambda: rig.health(away)[0] == 503, 30, "unhealthy without its agent", fleet)
        assert "not renewed for" in json.dumps(rig.health(away)[1]["problems"])

        v2 = fleet.publish("v2")
        refused = rig.watchers[0].ctl("deploy", "web", v2.id, "--no-wait", check=False)
        assert refused.returncode != 0 and away.name in refused.stderr, refused
        assert "--allow-missing" in refused.stderr
        result = rig.watchers[0].ctl_json("deploy", "web", v2.id, "--allow-missing")
        assert result["result"] == "committed", result
        committed = result["release"]
        assert result["expected"] == sorted(w.name for w in rig.watchers if w is not away)
        assert away.current() != committed
        assert away.running(), "the watcher survives its agent being away"

        cluster.start(away.agent)
        wait_for(lambda: away.current() == committed, 60, "the returning host converged", fleet)
        assert away.running()
        fleet.wait_members(3)
        wait_for(lambda: rig.health(away)[0] == 200, 30, "healthy again", fleet)

        # Now the reverse: the host acks ready and its agent stops. Its ready ack stands
        # (the acks are the decision), so the others commit, and it flips when it is back.
        v3 = fleet.publish("v3")
        rig.hold(*rig.watchers)
        deploy_id, release = rig.deploy(rig.watchers[0], v3)
        rig.wait_hook_started(rig.watchers, deploy_id)
        waiting = rig.watchers[0]  # held back until the agent is gone
        rig.release(*(w for w in rig.watchers if w is not waiting))
        rig.wait_states(deploy_id, [away], "ready")
        cluster.stop(away.agent)
        rig.release(waiting)
        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "committed", outcome
        live = [w for w in rig.watchers if w is not away]
        for w in live:
            assert w.current() == release, w.name
        assert away.current() == committed, "cut off before it could read the acks"
        assert away.running()
        cluster.start(away.agent)
        wait_for(lambda: away.current() == release, 60, "the returning host applied it", fleet)
        rig.wait_states(deploy_id, [away], "live")
        assert fleet.currents() == {w.name: release for w in rig.watchers}
        rig.check_invariants()

    def test_deploy_that_loses_its_agent_while_waiting_says_the_deploy_goes_on(
        self, rig: Rig
    ) -> None:
        """`watcherctl deploy` on host-3, whose Consul agent stops while it waits: it used
        to end with Consul's error alone. The deploy goes on without the command, which
        says so, with how to follow and abort it."""
        fleet, cluster = rig.fleet, rig.cluster
        baseline(rig)
        v2 = fleet.publish("v2")
        asking = rig.watchers[2]
        rig.hold(*rig.watchers)
        argv = [str(BIN / "watcherctl"), "deploy", "web", v2.id, "-c", str(asking.config_path)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with reaped(proc):
            wait_for(lambda: rig.store.inflight()[0] is not None, 30, "the deploy started", fleet)
            deploy_id = str(rig.store.inflight()[0])
            rig.wait_hook_started(rig.watchers, deploy_id)
            cluster.stop(asking.agent)
            _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err
        assert "watcherctl: lost Consul while waiting (the commands named here need " in err, err
        assert f"deploy {deploy_id} goes on across the fleet" in err, err
        assert f"abort {deploy_id} --app web" in err, err
        cluster.start(asking.agent)
        rig.release(*rig.watchers)
        fleet.wait_outcome(deploy_id, 90)
        fleet.wait_idle(60)
        rig.check_invariants()


class TestSwitchFails:
    def test_a_switch_that_keeps_failing_pauses_between_tries_and_says_why(self, rig: Rig) -> None:
        """A committed deploy's switch that fails before `current` moved (here a directory
        an operator made where the symlink was: the rename cannot replace it) is retried
        after 1, 2, 4... s, not at once by every cycle; `status` says why; once the
        directory is gone the next try switches and the host goes live."""
        fleet = rig.fleet
        baseline(rig)
        v2 = fleet.publish("v2")
        victim = rig.watchers[1]
        others = [w for w in rig.watchers if w is not victim]
        rig.hold(victim)
        deploy_id, release = rig.deploy(rig.watchers[0], v2)
        rig.wait_hook_started([victim], deploy_id)
        current = victim.app_dir / "current"
        current.unlink()
        current.mkdir()
        (current / "index.html").write_text("copied by hand\n")
        rig.release(victim)

        wait_for(lambda: all(w.current() == release for w in others), 30, "others flip", fleet)
        wait_for(lambda: bool(victim.log_events("flip_failed")), 30, f"{victim.name} fails", fleet)
        time.sleep(6.0)
        failed = victim.log_events("flip_failed")
        # Tries at +0, +1, +3 (+7) s: a retry by every cycle made hundreds here.
        assert 2 <= len(failed) <= 4, [e.get("retry_in_s") for e in failed]
        assert [e["retry_in_s"] for e in failed[:3]] == [1.0, 2.0, 4.0][: len(failed[:3])]
        assert "Is a directory" in failed[0]["error"], failed[0]

        def says_why() -> bool:
            shown = victim.ctl("status", as_json=False, check=False).stdout
            return "switch      FAILED, retried with a growing pause" in shown and (
                "Is a directory" in shown
            )

        wait_for(says_why, 20, f"{victim.name}'s status names the failed switch", fleet)
        gauge = 'watcher_retrying{app="web",step="switch"}'

        def retrying() -> str:
            url = f"http://127.0.0.1:{victim.health_port()}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
            return next(
                (line.split()[-1] for line in text.splitlines() if line.startswith(gauge)), ""
            )

        assert retrying() == "1.0"
        assert rig.states(deploy_id)[victim.name] == "committed"  # its intent; not live

        shutil.rmtree(current)  # the operator mends it
        wait_for(lambda: victim.current() == release, 40, f"{victim.name} switches", fleet)
        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "committed", outcome
        assert rig.states(deploy_id) == {w.name: "live" for w in rig.watchers}
        wait_for(lambda: not says_why(), 20, "the failed switch no longer shown", fleet)
        assert retrying() == "0.0"
        rig.check_invariants()


class TestRestart:
    def test_restart_replays_no_buffered_event(self, rig: Rig) -> None:
        fleet = rig.fleet
        v1 = fleet.publish("v1")
        payload = json.dumps({"app": "web", "artifact": v1.id}).encode()
        event_id = consul_for(rig.watchers[1].agent).event_fire("deploy", payload)
        outcome = fleet.wait_outcome(event_id)
        assert outcome["result"] == "committed", outcome
        fleet.wait_idle()
        assert rig.store.history() == [event_id]

        for w in rig.watchers:
            w.stop()
            w.start()
        fleet.wait_members(3)

        def primed(w: WatcherProc) -> list[dict[str, Any]]:
            return w.log_events("events_primed")

        wait_for(
            lambda: all(len(primed(w)) == 2 for w in rig.watchers),
            30,
            "every restarted watcher primed its events",
            fleet,
        )
        for w in rig.watchers:  # the deploy's events were buffered: history, not commands
            assert primed(w)[-1]["buffered"] >= 1, primed(w)
        time.sleep(2.0)  # a couple of loop ticks: long enough for a replay to show
        assert rig.store.history() == [event_id]
        assert fleet.inflight() is None
        handled = [
            (w.name, e["result"])
            for w in rig.watchers
            for e in w.log_events()
            if e.get("event") == "event_handled" and e.get("event_id") == event_id
        ]
        # Handled once by each host before the restarts (one started it), never after them.
        assert sorted(n for n, _ in handled) == [w.name for w in rig.watchers], handled
        assert [r for _, r in handled].count("started") == 1, handled
        rig.check_invariants()

    def test_a_host_renamed_while_ready_comes_back_as_a_new_host_and_follows_the_commit(
        self, rig: Rig
    ) -> None:
        """The operator review: a host stopped while ready in a deploy and started with
        another `node` reused its session (both names alive) and resumed the old name's
        journal, refused every step and gave its session up at every prepare deadline; the
        fleet flipped without it. The old identity's session and journal stay behind now:
        its ready ack still counts, and the new name follows the commit as a new host."""
        fleet = rig.fleet
        baseline(rig)
        v2 = fleet.publish("v2")
        renamed = rig.watchers[1]
        others = [w for w in rig.watchers if w is not renamed]
        rig.hold(*others)
        deploy_id, release = rig.deploy(rig.watchers[0], v2)
        wait_for(lambda: rig.states(deploy_id).get(renamed.name) == "ready", 30, "ready", fleet)
        assert renamed.stop(60) == 0
        data = yaml.safe_load(renamed.config_path.read_text())
        data["node"] = "host-9"
        renamed.config_path.write_text(yaml.safe_dump(data))
        renamed.start()
        wait_for(
            lambda: bool(renamed.log_events("watcher_ready", this_start=True)), 20, "ready", fleet
        )
        assert renamed.log_events("session_not_reused", this_start=True)
        [aside] = renamed.log_events("journal_set_aside", this_start=True)
        assert aside["deploy"] == deploy_id
        rig.release(*others)

        assert fleet.wait_outcome(deploy_id)["result"] == "committed"
        wait_for(lambda: renamed.current() == release, 30, "the renamed host on it", fleet)
        assert set(fleet.currents().values()) == {release}
        members = fleet.kv.kv_list(fleet.keys.members_prefix)
        assert sorted(e.key.rsplit("/", 1)[1] for e in members) == ["host-1", "host-3", "host-9"]

    def test_sigterm_during_prepare_then_start_resumes_the_deploy(self, rig: Rig) -> None:
        fleet = rig.fleet
        baseline(rig)
        v2 = fleet.publish("v2")
        rig.hold(*rig.watchers)
        deploy_id, release = rig.deploy(rig.watchers[0], v2)
        rig.wait_hook_started(rig.watchers, deploy_id)
        victim = rig.first(deploy_id)
        session = json.loads((victim.state_dir / "session.json").read_text())["id"]

        codes: list[int | None] = []
        stopper = threading.Thread(target=lambda: codes.append(victim.stop(60)))
        signalled = time.monotonic()
        stopper.start()
        wait_for(
            lambda: bool(victim.log_events("waiting_for_task")),
            10,
            "SIGTERM waiting for the step in progress",
            fleet,
        )
        time.sleep(0.5)
        assert stopper.is_alive(), "SIGTERM must wait for the hook in progress"
        rig.release(victim)
        stopper.join(30)
        assert codes == [0], codes
        assert time.monotonic() - signalled >= 0.5
        events = [e.get("event") for e in victim.log_events()]
        assert "session_kept" in events and "session_destroyed" not in events
        # Staged, its hook done, but a stopping watcher does not ack ready: the fleet must
        # not commit on a host that is not running to apply it (the operator review).
        its = [e.get("event") for e in victim.log_events() if e.get("deploy") == deploy_id]
        assert "prepare_paused" in its and "prepare_ready" not in its, its
        assert rig.states(deploy_id).get(victim.name) != "ready"

        victim.start()
        wait_for(
            lambda: len(victim.log_events("session_reused")) == 1,
            10,
            "session reused",
            fleet,
        )
        wait_for(
            lambda: rig.states(deploy_id).get(victim.name) == "ready",
            20,
            "the restarted host acks ready",
            fleet,
        )
        # Resumed from its journal: the hook that finished before the stop did not run again.
        assert len(rig.hook_lines(victim, "post_release start", deploy_id)) == 1
        rig.release(*rig.watchers)
        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "committed", outcome
        fleet.wait_idle()
        assert fleet.currents() == {w.name: release for w in rig.watchers}
        assert json.loads((victim.state_dir / "session.json").read_text())["id"] == session
        rig.check_invariants()

    # The restarted watcher must renew before Consul drops the session: with a 3 s TTL
    # that is 4.5-6 s after its last renewal, close to a loaded runner's start-up.
    @pytest.mark.parametrize("rig", [{"session_ttl": "10s"}], indirect=True, ids=["ttl10"])
    def test_sigkill_and_immediate_restart_reuses_the_session(self, rig: Rig) -> None:
        fleet = rig.fleet
        baseline(rig)
        v2 = fleet.publish("v2")
        rig.hold(*rig.watchers)
        deploy_id, release = rig.deploy(rig.watchers[0], v2)
        rig.wait_hook_started(rig.watchers, deploy_id)
        coordinator = rig.first(deploy_id)
        victim = next(w for w in rig.watchers if w is not coordinator)
        session = json.loads((victim.state_dir / "session.json").read_text())["id"]

        victim.kill()
        victim.start()
        wait_for(
            lambda: bool(victim.log_events("session_reused")),
            10,
            "session reused",
            fleet,
        )
        assert json.loads((victim.state_dir / "session.json").read_text())["id"] == session
        wait_for(
            lambda: len(rig.hook_lines(victim, "post_release start", deploy_id)) == 2,
            20,
            "post_release run again after the crash",
            fleet,
        )
        rig.release(*rig.watchers)
        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "committed", outcome
        decision = fleet.decision(deploy_id)
        assert decision is not None and decision["outcome"] == "commit"
        fleet.wait_idle()
        assert fleet.currents() == {w.name: release for w in rig.watchers}
        assert victim.name in fleet.members()
        rig.check_invariants()


class TestPartition:
    def test_cut_off_after_ready_is_undecided_then_converges(self, rig: Rig) -> None:
        fleet, cluster = rig.fleet, rig.cluster
        baseline(rig)
        v2 = fleet.publish("v2")
        rig.hold(*rig.watchers)
        deploy_id, release = rig.deploy(rig.watchers[0], v2)
        rig.wait_hook_started(rig.watchers, deploy_id)
        coordinator = rig.first(deploy_id)
        victim = next(w for w in rig.watchers[1:] if w is not coordinator)
        others = [w for w in rig.watchers if w is not victim]
        rig.release(victim)
        rig.wait_states(deploy_id, [victim], "ready")
        assert rig.health(victim)[0] == 200

        cut = time.monotonic()
        cluster.cut_off(victim.agent)
        rig.release(*others)
        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "committed", outcome
        for w in others:
            assert w.current() == release
        assert victim.current() != release

        wait_for(lambda: rig.health(victim)[0] == 503, 60, "victim unhealthy", fleet)
        unhealthy_after = time.monotonic() - cut
        code, health = rig.health(victim)
        assert code == 503 and deploy_id in json.dumps(health["problems"]), health
        # Undecided since the first failing renewal began (every TTL/2), not since the
        # loop's next read failed: a host that only waits reads again when its watches
        # answer or after WAIT_RECHECK, and then waits out consul.timeout and retries,
        # which came on top of undecided_after (17-20 s here before).
        waited = health["waiting_for_decision"]["web"]["waiting_s"]
        assert waited >= unhealthy_after - 3, (waited, unhealthy_after)
        assert unhealthy_after < 12, unhealthy_after  # undecided_after is 3 s
        print(
            f"\ncut-off {victim.name}: /health 503 after {unhealthy_after:.1f}s "
            f"(undecided for {waited:.1f}s by then)"
        )

        def status() -> dict[str, Any]:
            answer = victim.ctl("status", check=False)
            assert answer.returncode == 3, answer  # Consul unreachable, said by the exit code
            return dict(json.loads(answer.stdout))

        def said_undecided() -> bool:  # what `status` reads, without its own Consul look
            with contextlib.suppress(FileNotFoundError, ValueError):
                return bool(
                    json.loads((victim.state_dir / "status.json").read_text())["apps"]["web"][
                        "undecided"
                    ]
                )
            return False

        # status.json is the loop's, which may still wait out a call to its agent (4.6 and
        # ~6.4 s after /health here, before): the session keeper rewrites it after each
        # failed renewal, and the wait starts with the first, before /health says 503.
        lag = wait_for(said_undecided, 30, "status.json says undecided")
        print(f"status.json said undecided {lag:.1f}s after /health did")
        assert lag < 2, lag
        asked = time.monotonic()
        said = status()
        print(f"`status` answered in {time.monotonic() - asked:.1f}s without its agent")
        assert said["consul"]["reachable"] is False, said["consul"]
        web = said["apps"]["web"]
        assert web["undecided"]["deploy"] == deploy_id, web
        assert web["current"] != release
        human = victim.ctl("status", as_json=False, check=False).stdout
        assert f"  deploy      {deploy_id}: this host UNDECIDED (acked ready" in human, human

        cluster.reconnect(victim.agent)
        wait_for(lambda: victim.current() == release, 60, "victim converged", fleet)
        wait_for(lambda: rig.health(victim)[0] == 200, 60, "victim healthy again", fleet)
        rig.wait_states(deploy_id, [victim], "live")
        assert fleet.currents() == {w.name: release for w in rig.watchers}
        rig.check_invariants()
