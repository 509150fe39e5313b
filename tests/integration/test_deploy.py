"""The deploy barrier end to end: real Consul agents, one `watcher run` per host, real S3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.fleet import (
    Fleet,
    WatcherProc,
    consul_requests,
    metrics_text,
    wait_for,
)
from tests.support.s3server import s3_client
from watcher.agent import read_journal
from watcher.config import S3Settings, load_config
from watcher.fsutil import AppLock, atomic_write_json
from watcher.releases import AppLayout
from watcher.web.app import create_app

CLUSTER = ClusterSpec(hosts=3)


def deploy_held_in_post_release(fleet: Fleet, slow: WatcherProc, gate: Path, artifact: str) -> str:
    """Start a deploy of ``artifact`` (--no-wait) with ``slow`` held in its post_release
    hook until ``gate`` exists; returns the deploy id once ``slow`` acks staging and its
    hook runs (the caller opens the gate). The staging ack alone comes after 0.5 s of
    preparing, which on a loaded runner can be before the tree is staged: a
    `setup-release` then found nothing to reuse (CI, 2026-12-06)."""
    fleet.give_gated_hook(slow, "post_release", gate)
    fleet.wait_members(3)
    deploy_id = str(fleet.watchers[0].ctl_json("deploy", "web", artifact, "--no-wait")["deploy"])
    started = Path(f"{gate}.started")
    try:
        wait_for(
            lambda: started.exists() and fleet.ack_states(deploy_id)[slow.name] == "staging",
            30,
            "the slow host in its post_release hook",
            fleet,
        )
    except BaseException:
        gate.touch()
        raise
    return deploy_id


def assert_refused_as_held(fleet: Fleet, deploy_id: str, slow: WatcherProc, live: str) -> None:
    """The deploy aborted on ``slow``'s hold ("stop here") and nobody left ``live``."""
    result = fleet.wait_outcome(deploy_id)
    assert result["result"] == "aborted", result
    ack = fleet.kv.kv_get(fleet.keys.progress(deploy_id, slow.name))
    assert ack is not None and b"held: stop here" in ack.value, ack
    fleet.wait_idle()
    assert set(fleet.currents().values()) == {live}  # nobody moved


@pytest.fixture
def fleet(cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path) -> Iterator[Fleet]:
    # Each test gets its own KV prefix, app roots and bucket on the module's cluster.
    f = Fleet(cluster, s3_settings, tmp_path, kv_prefix=f"w{time.monotonic_ns()}")
    f.start()
    try:
        yield f
    finally:
        f.stop()


class TestHappyPath:
    def test_prefetch_then_deploy_all_hosts_live_on_same_release(self, fleet: Fleet) -> None:
        record = fleet.publish("v1", announce=True)
        prefetched = [
            w.app_dir / "prefetched" / f"{record.id}-{record.sha256[:12]}" for w in fleet.watchers
        ]
        wait_for(lambda: all(p.is_dir() for p in prefetched), 30, "prefetch on every host", fleet)

        w0 = fleet.watchers[0]
        result = w0.ctl_json("deploy", "web", record.id)
        assert result["result"] == "committed", result
        release = result["release"]
        assert release.endswith("-" + record.id)
        assert fleet.currents() == {w.name: release for w in fleet.watchers}
        for w in fleet.watchers:
            assert (w.app_dir / "current" / "VERSION").read_text() == "v1\n"
        assert {h["state"] for h in result["hosts"].values()} == {"live"}
        fleet.wait_idle()

        status = w0.ctl_json("status", "--fleet")
        hosts = status["web"]["hosts"]
        assert status["web"]["current"] == release
        assert sorted(hosts) == sorted(w.name for w in fleet.watchers)
        wait_for(
            lambda: all(
                h["release"] == release
                for h in w0.ctl_json("status", "--fleet")["web"]["hosts"].values()
            ),
            10,
            "host records on the release",
            fleet,
        )
        # An honest deploy reports no record as forged: the intent txn's re-read carries
        # the decision record it found, and it says what the acks say.
        for w in fleet.watchers:
            assert not w.log_events("decision_not_obeyed"), w

    def test_a_failed_prefetch_shows_in_the_hosts_status(self, fleet: Fleet) -> None:
        """The install review's host with a wrong bucket: its prefetch failed in the
        journal only, and the next deploy of that build found out."""
        w = fleet.watchers[2]
        config = fleet.config_for(w)
        config["s3"]["bucket"] = "no-such-bucket-here"
        w.config_path.write_text(yaml.safe_dump(config))
        w.stop()
        w.start()
        fleet.wait_members(3)
        record = fleet.publish("v1", announce=True)

        def said() -> str:
            return w.ctl("status", "web", as_json=False, check=False).stdout

        wait_for(lambda: "prefetch    FAILED for " in said(), 30, "the failure in status", fleet)
        line = next(x for x in said().splitlines() if "prefetch    FAILED" in x)
        assert line.startswith(f"  prefetch    FAILED for {record.id}: "), line
        assert "no-such-bucket-here" in line or "not found" in line, line
        healthy = fleet.watchers[0].ctl("status", "web", as_json=False, check=False).stdout
        assert "FAILED" not in healthy, healthy

    def test_a_deploy_that_fetched_the_build_clears_its_failed_prefetch(self, fleet: Fleet) -> None:
        """A prefetch that failed while the object was away (a bucket being repaired) is
        no longer shown once a deploy downloaded that build after all."""
        record = fleet.publish("v1")
        s3 = s3_client(str(fleet.s3.endpoint_url))
        key = record.url.removeprefix(f"s3://{fleet.s3.bucket}/")
        body = s3.get_object(Bucket=fleet.s3.bucket, Key=key)["Body"].read()
        s3.delete_object(Bucket=fleet.s3.bucket, Key=key)
        fleet.kv.event_fire(
            "build-finished", json.dumps({"app": fleet.app, "artifact": record.id}).encode()
        )

        def said(w: WatcherProc) -> str:
            return w.ctl("status", "web", as_json=False, check=False).stdout

        for w in fleet.watchers:
            wait_for(
                lambda w=w: f"prefetch    FAILED for {record.id}: " in said(w),
                30,
                f"the failed prefetch in {w.name}'s status",
                fleet,
            )
        s3.put_object(Bucket=fleet.s3.bucket, Key=key, Body=body)
        fleet.watchers[0].ctl_json("deploy", "web", record.id)
        for w in fleet.watchers:
            assert (w.app_dir / "current" / "VERSION").read_text() == "v1\n", w
            wait_for(lambda w=w: "FAILED" not in said(w), 10, f"{w.name}'s status clear", fleet)

    def test_builds_lists_what_there_is_to_deploy(self, fleet: Fleet) -> None:
        w0 = fleet.watchers[0]
        empty = w0.ctl("builds", "web", as_json=False).stdout
        assert empty.startswith("no builds of web published"), empty
        v1 = fleet.publish("v1", announce=True)
        v2 = fleet.publish("v2")  # not announced: nobody prefetches it

        def rows() -> dict[str, dict[str, object]]:
            listed = w0.ctl_json("builds", "web")
            assert [b["id"] for b in listed] == [v2.id, v1.id], listed  # newest first
            return {b["id"]: b for b in listed}

        wait_for(lambda: rows()[v1.id]["prefetched_on"] == 3, 30, "v1 prefetched on 3", fleet)
        assert rows()[v2.id]["prefetched_on"] == 0 and rows()[v2.id]["fleet"] == ""
        w0.ctl_json("deploy", "web", v1.id)
        assert rows()[v1.id]["fleet"] == "current"
        w0.ctl_json("deploy", "web", v2.id)
        listed = rows()
        assert (listed[v2.id]["fleet"], listed[v1.id]["fleet"]) == ("current", "previous")
        text = w0.ctl("builds", "web", "--limit", "1", as_json=False).stdout.splitlines()
        assert text[0].split() == [
            "ARTIFACT", "BRANCH", "COMMIT", "BUILD", "PUBLISHED", "PREFETCHED", "NOTE"
        ]  # fmt: skip
        assert len(text) == 2 and text[1].startswith(v2.id), text
        assert text[1].endswith("fleet's release"), text

        # A record that does not read is left out, and said to be (it vanished silently)
        fleet.kv.kv_put(fleet.keys.artifact("broken-1"), b"\xff\xfe not json")
        said = w0.ctl("builds", "web", as_json=False)
        assert "1 artifact record(s) of web cannot be read" in said.stderr, said.stderr
        assert "broken-1" in said.stderr and "broken-1" not in said.stdout
        config_path = fleet.workdir / "builds.yaml"
        config_path.write_text(yaml.safe_dump(fleet.config_for(w0)))
        app = create_app(load_config(config_path), listen_host="127.0.0.1")
        with TestClient(app, base_url="http://127.0.0.1:8710") as client:
            got = client.get("/api/v1/apps/web/builds").json()
        assert [b["id"] for b in got["builds"]] == [v2.id, v1.id], got
        assert len(got["unreadable"]) == 1 and "broken-1" in got["unreadable"][0], got

    def test_hosts_on_a_committed_deploys_release_are_on_the_fleets(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        """`current` names a committed deploy's release only at its end, after every
        post-commit hook: meanwhile `status --fleet` starred every host already live on it
        as "not on the fleet's release", and their `status` said "this host differs"."""
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        rel1 = fleet.watchers[0].ctl_json("deploy", "web", v1.id)["release"]
        fleet.wait_idle()
        slow = fleet.watchers[1]
        gate = tmp_path / "validated"
        fleet.give_gated_hook(slow, "validate", gate)
        fleet.wait_members(3)
        started = fleet.watchers[0].ctl_json("deploy", "web", v2.id, "--no-wait")
        deploy_id, rel2 = started["deploy"], started["release"]
        try:
            wait_for(
                lambda: all(
                    s == "live" for n, s in fleet.ack_states(deploy_id).items() if n != slow.name
                ),
                30,
                "the other hosts live, the slow one validating",
                fleet,
            )
            data = fleet.watchers[0].ctl_json("status", "web", "--fleet")["web"]
            assert data["current"] == rel1 and data["deploy"]["decision"] == "commit", data
            for node, h in data["hosts"].items():
                assert h["release"] == rel2 and h["on_fleet_release"], (node, data)
            text = fleet.watchers[2].ctl("status", "web", as_json=False).stdout
            assert "this host differs" not in text, text
            assert fleet.inflight() == deploy_id  # still in flight: the check above meant it
            # An abort now is too late: refused (exit 4), nothing written.
            late = fleet.watchers[2].ctl("abort", deploy_id, as_json=False, check=False)
            assert late.returncode == 4 and late.stdout == "", late
            assert f"deploy {deploy_id} is committed: too late to abort" in late.stderr, late
            assert fleet.kv.kv_get(fleet.keys.abort_request(deploy_id)) is None
        finally:
            gate.touch()
        assert fleet.wait_outcome(deploy_id)["result"] == "committed"

    def test_a_hold_placed_while_the_host_stages_makes_it_refuse(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        """The race review: `hold` (and `rollback --local`) while this host ran its
        post_release hook said it was placed, then the host acked ready, the fleet committed
        and the host flipped past its own hold. The watcher looks again before its ack."""
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        rel1 = fleet.watchers[0].ctl_json("deploy", "web", v1.id)["release"]
        fleet.wait_idle()
        slow, gate = fleet.watchers[1], tmp_path / "staged"
        deploy_id = deploy_held_in_post_release(fleet, slow, gate, v2.id)
        try:
            placed = slow.ctl("hold", "web", "--reason", "stop here", as_json=False)
            assert "refuses that deploy (held)" in placed.stderr, placed.stderr
        finally:
            gate.touch()
        assert_refused_as_held(fleet, deploy_id, slow, rel1)

    def test_a_hold_written_under_the_lock_as_the_host_finishes_staging_is_seen(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        """The commit review: `hold` reads the journal and writes the hold under the app's
        lock; the host's look for a hold before its ack, made without that lock, could
        fall between the two (the journal read before post_release was journaled, the hold
        written after the look) and the host acked ready past the hold. Here the test is
        that `hold`: it holds the lock across the host's last step of staging."""
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        rel1 = fleet.watchers[0].ctl_json("deploy", "web", v1.id)["release"]
        fleet.wait_idle()
        slow, gate = fleet.watchers[1], tmp_path / "staged"
        deploy_id = deploy_held_in_post_release(fleet, slow, gate, v2.id)
        layout = AppLayout(slow.app_dir)

        def phases() -> list[str]:
            return list((read_journal(layout.state_dir) or {}).get("phases") or [])

        try:
            # staged (which takes the lock) and in the hook (which runs without it)
            wait_for(lambda: "staged" in phases(), 30, "the slow host in its hook", fleet)
            with AppLock(layout, timeout=10, owner="test as watcherctl hold"):
                assert "post_release" not in phases()
                gate.touch()
                wait_for(
                    lambda: "post_release" in phases(),
                    30,
                    "the slow host's post_release journaled",
                    fleet,
                )
                time.sleep(0.5)  # the host is at its look for a hold now, or past it
                hold = {"reason": "stop here", "by": "tests", "at": "2026-01-01T00:00:00Z"}
                atomic_write_json(layout.holds_file, {"version": 1, "hold": hold})
        finally:
            gate.touch()
        assert_refused_as_held(fleet, deploy_id, slow, rel1)

    def test_setup_release_of_the_build_a_deploy_stages_leaves_the_hook_to_it(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        """The race review: both ran post_release on the same tree at the same time."""
        v1 = fleet.publish("v1", announce=True)
        slow, gate = fleet.watchers[1], tmp_path / "staged"
        deploy_id = deploy_held_in_post_release(fleet, slow, gate, v1.id)
        try:
            # the gated hook would block this command until the gate opens
            got = json.loads(slow.ctl("setup-release", "web", v1.id, timeout=30).stdout)
            assert got["reused"] is True, got
            assert got["post_release"].startswith("left to this host's watcher"), got
            assert deploy_id in got["post_release"], got
            # and `releases` marks the deploy's release in flight (read from the real
            # journal: the request in it names the release)
            rows = {r["release"]: r for r in slow.ctl_json("releases", "web")}
            assert rows[got["release"]]["in_flight"] is True, rows
        finally:
            gate.touch()
        assert fleet.wait_outcome(deploy_id)["result"] == "committed"

    def test_every_host_goes_idle_when_the_end_lands(self, fleet: Fleet) -> None:
        """A host that does not coordinate does not wake itself after its apply: it
        finishes its part in the step the end's watches wake. When `inflight` is already
        gone in that step, it goes idle in the next one at once, not at the loop's next
        tick (1 s) with `status` saying "waiting for the end" meanwhile."""
        late: list[tuple[str, str, float]] = []
        for n in range(4):
            record = fleet.publish(f"v{n}")
            result = fleet.watchers[0].ctl_json("deploy", "web", record.id)
            assert result["result"] == "committed", result
            fleet.wait_idle()
            deploy_id = result["deploy"]
            time.sleep(1.5)  # past a tick: a host stuck until then has logged its idle line
            logs = {w.name: w.log_events() for w in fleet.watchers}
            outcome = fleet.outcome(deploy_id)
            assert outcome is not None
            end = _when(outcome["at"])  # taken just before the end's txn
            for name, events in logs.items():
                idle = [
                    _when(e["timestamp"])
                    for e in events
                    if e.get("event") == "cycle"
                    and "web: idle" in e.get("outcome", "")
                    and _when(e["timestamp"]) >= end
                ]
                assert idle, (name, deploy_id)
                # END_WATCH_GRACE (0.5 s) and a step at most; the tick (1 s) is too late.
                if idle[0] - end > 0.85:
                    late.append((name, deploy_id, idle[0] - end))
        # Waiting for the tick makes the hosts late in every deploy; a loaded runner's
        # stall makes them late in one.
        assert len({deploy for _, deploy, _ in late}) <= 1, late

    def test_second_deploy_while_one_in_flight_is_refused(self, fleet: Fleet) -> None:
        # The first deploy stays in flight until the gate opens after the second `deploy`
        # (a fixed slow hook could end before two `watcherctl` runs on a loaded runner).
        gate = fleet.workdir / "gate"
        gated_prepare(fleet, fleet.watchers[1], gate)
        v1 = fleet.publish("v1")
        first = fleet.watchers[0].ctl_json("deploy", "web", v1.id, "--no-wait")
        second = fleet.watchers[2].ctl("deploy", "web", v1.id, "--no-wait", check=False)
        gate.touch()
        assert second.returncode == 4, second
        assert first["deploy"] in second.stderr and "in flight" in second.stderr
        outcome = fleet.wait_outcome(first["deploy"])
        assert outcome["result"] == "committed"

    def test_waiting_hosts_hold_blocking_queries_and_wake_on_the_decided_mark(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
    ) -> None:
        """Hosts that acked ready wait for a slow one without re-reading the acks (no txn
        at all while nothing they watch changes), and the host that decides wakes them:
        its own member key names the commit, and every members watch answers."""
        f = Fleet(
            cluster,
            s3_settings,
            tmp_path,
            kv_prefix=f"w{time.monotonic_ns()}",
            daemon_extra={"listen": "127.0.0.1:0"},
        )
        f.start()
        try:
            slow = f.watchers[1]
            # The slow host stays in post_release until the gate opens after the window (a
            # fixed slow hook may end inside it on a loaded runner: a decision).
            gate = tmp_path / "gate"
            gated_prepare(f, slow, gate)
            v1 = f.publish("v1")
            deploy_id = f.watchers[0].ctl_json("deploy", "web", v1.id, "--no-wait")["deploy"]
            waiting = [f.watchers[0], f.watchers[2]]

            def states() -> dict[str, str]:
                return f.ack_states(deploy_id)

            # Every KV write this deploy makes before the wait is done: the slow host's
            # staging ack (0.5 s into its prepare) and both ready acks. A write answers the
            # waiting hosts' blocking queries on keys still missing (`current`, the
            # decision), which they ask again: counted, though nothing they watch changed.
            wait_for(
                lambda: states() == {slow.name: "staging", **{w.name: "ready" for w in waiting}},
                30,
                "two ready, the slow host staging",
                f,
            )
            ready = {w.name: requests_of(w) for w in waiting}
            before = quiet_requests(f, waiting)
            time.sleep(2.5)
            after = {w.name: requests_of(w) for w in waiting}
            assert states()[slow.name] == "staging", "the slow host is still preparing"
            gate.touch()
            for w in waiting:
                spent = {k: after[w.name][k] - before[w.name].get(k, 0) for k in after[w.name]}
                spent = {k: v for k, v in spent.items() if v}
                # No read of the acks while only waiting; the decision key's watch (its
                # first read and the blocking query), if it started only now (after a
                # second of waiting). Session renewals and the `deploy` event (gossip: it
                # may land in the window) are not KV reads.
                assert spent.get("txn", 0) == 0, (w.name, spent)
                # Nor since the acks (the settling included; well inside WAIT_RECHECK).
                assert after[w.name].get("txn", 0) == ready[w.name].get("txn", 0), w.name
                kv = sum(v for k, v in spent.items() if k.startswith("kv_"))
                assert kv <= 2, (w.name, spent)
            outcome = f.wait_outcome(deploy_id)
            assert outcome["result"] == "committed", outcome
            # The last to ack decided: its member key carries the decided mark.
            member = f.kv.kv_get(f.keys.member(slow.name))
            assert member is not None and member.value is not None
            decided = json.loads(member.value)["decided"]
            assert decided["deploy"] == deploy_id and decided["outcome"] == "commit", decided
            for w in f.watchers:
                assert not w.log_events("decision_not_obeyed")
        finally:
            f.stop()


class TestMetrics:
    def test_a_prefetched_deploy_with_hooks_shows_in_every_host_s_metrics(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
    ) -> None:
        """docs/metrics.md's promises after a prefetch and a deploy with a hook in each
        phase it runs: every host counts its hook runs, the bytes it downloaded once (at
        the prefetch; the deploy finds the tree) and that one fetch's time; and each host
        counts the deploy it took part in by how it ended there, the coordinator or not."""
        hook = tmp_path / "ok-hook"
        hook.write_text(f'#!/bin/sh\n[ -e "{tmp_path}/fail-$WATCHER_PHASE" ] && exit 3\nexit 0\n')
        hook.chmod(0o755)
        phases = ("post_release", "post_symlink", "validate")
        f = Fleet(
            cluster,
            s3_settings,
            tmp_path,
            kv_prefix=f"w{time.monotonic_ns()}",
            daemon_extra={"listen": "127.0.0.1:0"},
            app_extra={"hooks": {phase: str(hook) for phase in phases}},
        )
        f.start()
        try:
            record = f.publish("v1", announce=True)
            prefetched = [
                w.app_dir / "prefetched" / f"{record.id}-{record.sha256[:12]}" for w in f.watchers
            ]
            wait_for(lambda: all(p.is_dir() for p in prefetched), 30, "prefetch everywhere", f)
            result = f.watchers[0].ctl_json("deploy", "web", record.id)
            assert result["result"] == "committed", result
            f.wait_idle()
            for w in f.watchers:
                got = samples(metrics_text(w.health_port()))
                for phase in phases:
                    key = (
                        "watcher_hook_runs_total",
                        ("app", "web"),
                        ("phase", phase),
                        ("result", "ok"),
                    )
                    assert got.get(key) == 1, (w.name, phase, runs_of(got))
                assert not [
                    k for k in got if k[0] == "watcher_hook_runs_total" and k[3] != ("result", "ok")
                ]
                web = (("app", "web"),)
                assert got[("watcher_artifact_download_bytes_total", *web)] == record.size, w.name
                assert got[("watcher_artifact_fetch_seconds_count", *web)] == 1, w.name
                assert 0 < got[("watcher_artifact_fetch_seconds_sum", *web)] < 30, w.name
            # Every host counts its part (once it is done: a moment after the end).
            wait_for(
                lambda: all(deploys_of(w) == {"committed": 1} for w in f.watchers),
                10,
                "one committed deploy counted on every host",
                f,
            )

            (tmp_path / "fail-post_release").touch()  # every host's post_release fails
            v2 = f.publish("v2")
            result = f.watchers[0].ctl("deploy", "web", v2.id, check=False)
            assert json.loads(result.stdout)["result"] == "aborted", result
            f.wait_idle()
            wait_for(
                lambda: all(deploys_of(w) == {"committed": 1, "aborted": 1} for w in f.watchers),
                10,
                "the aborted deploy counted on every host",
                f,
            )
            for w in f.watchers:
                runs = runs_of(samples(metrics_text(w.health_port())))
                key = ("watcher_hook_runs_total", ("app", "web"), ("phase", "post_release"))
                assert runs[(*key, ("result", "failed"))] == 1, (w.name, runs)
                assert runs[(*key, ("result", "ok"))] == 1, (w.name, runs)
        finally:
            f.stop()


def samples(text: str) -> dict[tuple[Any, ...], float]:
    """A /metrics text's samples: (name, *sorted label pairs) -> value."""
    return {
        (s.name, *sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def deploys_of(w: WatcherProc) -> dict[str, float]:
    """``watcher_deploys_total{app="web"}`` of ``w``, by outcome."""
    got = samples(metrics_text(w.health_port()))
    return {
        dict(k[1:])["outcome"]: v
        for k, v in got.items()
        if k[0] == "watcher_deploys_total" and dict(k[1:])["app"] == "web"
    }


def runs_of(got: dict[tuple[Any, ...], float]) -> dict[tuple[Any, ...], float]:
    return {k: v for k, v in got.items() if k[0] == "watcher_hook_runs_total"}


def gated_prepare(fleet: Fleet, w: WatcherProc, gate: Path) -> None:
    """``w``'s post_release waits until ``gate`` exists."""
    fleet.give_gated_hook(w, "post_release", gate)
    fleet.wait_members(len(fleet.watchers))


def requests_of(w: WatcherProc) -> dict[str, float]:
    return consul_requests(metrics_text(w.health_port()))


def quiet_requests(fleet: Fleet, ws: list[WatcherProc], timeout: float = 8.0) -> dict[str, Any]:
    """Each of ``ws``'s Consul request counts once its KV reads and txns stopped moving:
    two looks more than DECISION_WATCH_AFTER (1 s) apart agree. What a host still does
    just after its ack (watches asked again after the last write they saw, the decision
    watch starting) is then not counted as what it does while it only waits."""

    def kv_and_txn(counts: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in counts.items() if k.startswith("kv_") or k == "txn"}

    deadline = time.monotonic() + timeout
    last = {w.name: requests_of(w) for w in ws}
    while True:
        time.sleep(1.5)
        now = {w.name: requests_of(w) for w in ws}
        if all(kv_and_txn(now[n]) == kv_and_txn(last[n]) for n in now):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"Consul requests still moving: {last} -> {now}\n{fleet.logs()}")
        last = now


class TestFailures:
    def test_failing_post_release_on_one_host_aborts_everywhere(self, fleet: Fleet) -> None:
        v1 = fleet.publish("v1")
        assert fleet.watchers[0].ctl_json("deploy", "web", v1.id)["result"] == "committed"
        before = fleet.currents()

        marker_dir = fleet.workdir / "markers"
        marker_dir.mkdir()
        for w in fleet.watchers:
            ok = w.root / "post-release-ok"
            ok.write_text(f"#!/bin/sh\ntouch {marker_dir}/release-{w.name}\n")
            ok.chmod(0o755)
            bad = w.root / "post-release-bad"
            bad.write_text(
                "#!/bin/sh\nsleep 1\necho 'migrations failed: table locked' >&2\nexit 3\n"
            )
            bad.chmod(0o755)
            abort = w.root / "post-abort"
            abort.write_text(f"#!/bin/sh\ntouch {marker_dir}/abort-{w.name}\n")
            abort.chmod(0o755)
            post = bad if w is fleet.watchers[2] else ok
            fleet.write_config(w, {"hooks": {"post_release": str(post), "post_abort": str(abort)}})
            w.stop()
            w.start()
        fleet.wait_members(3)

        v2 = fleet.publish("v2")
        result = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False)
        assert result.returncode == 1
        summary = json.loads(result.stdout)
        assert summary["result"] == "aborted"
        bad_host = fleet.watchers[2].name
        assert bad_host in summary["reason"] and "status 3" in summary["reason"]
        assert "migrations failed" in summary["hosts"][bad_host]["output_tail"]
        fleet.wait_idle()
        assert fleet.currents() == before
        fleet.wait_dropped(fleet.watchers[:2], summary["release"])  # after their post_abort
        for w in fleet.watchers[:2]:
            assert (marker_dir / f"abort-{w.name}").exists(), "post_abort where post_release ran"
        assert not (marker_dir / f"abort-{bad_host}").exists()
        states = {n: h["state"] for n, h in summary["hosts"].items()}
        assert states[bad_host] == "failed"
        assert all(s == "aborted" for n, s in states.items() if n != bad_host)

    def test_a_release_tree_gone_after_post_release_is_never_switched_to_unbuilt(
        self, fleet: Fleet
    ) -> None:
        """The attacker review: a tree removed by hand after its host acked ready was staged
        again at the flip and switched to without post_release (a virtualenv never built);
        and a post_release that removed its own release acked ready with nothing on disk."""
        gate = fleet.workdir / "host-2-post-release.gate"
        build = 'touch "$WATCHER_RELEASE_DIR/built"\n'
        for w in fleet.watchers:
            body = build
            if w is fleet.watchers[1]:  # holds the deploy undecided until the gate opens
                body += f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'
            hook = w.root / "post-release"
            hook.write_text(f"#!/bin/sh\n{body}")
            hook.chmod(0o755)
            fleet.write_config(w, {"hooks": {"post_release": str(hook)}})
            w.stop()
            w.start()
        fleet.wait_members(3)
        host1 = fleet.watchers[0]
        v1 = fleet.publish("v1")
        started = json.loads(host1.ctl("deploy", "web", v1.id, "--no-wait").stdout)
        deploy_id, release = started["deploy"], started["release"]
        wait_for(
            lambda: fleet.ack_states(deploy_id).get(host1.name) == "ready",
            30,
            "host-1 ready",
            fleet,
        )
        tree = host1.app_dir / "releases" / release
        assert (tree / "built").exists()
        shutil.rmtree(tree)  # by hand, while the others stage
        gate.touch()
        assert fleet.wait_outcome(deploy_id)["result"] == "committed"
        fleet.wait_idle()
        assert set(fleet.currents().values()) == {release}
        assert (host1.app_dir / "current" / "built").exists(), "switched to an unbuilt tree"
        assert host1.log_events("post_release_again"), host1.log_text()

        # A post_release that removes its own release: that host says no, nobody switches.
        hook = fleet.watchers[2].root / "post-release"
        hook.write_text('#!/bin/sh\nrm -rf "$WATCHER_RELEASE_DIR"\n')
        v2 = fleet.publish("v2")
        result = host1.ctl("deploy", "web", v2.id, check=False)
        assert result.returncode == 1, result.stderr
        summary = json.loads(result.stdout)
        assert summary["result"] == "aborted", summary
        said = summary["hosts"][fleet.watchers[2].name]
        assert said["state"] == "failed", summary
        assert "release directory is gone or incomplete after the hooks ran" in said["error"]
        fleet.wait_idle()
        assert set(fleet.currents().values()) == {release}

    def test_a_hook_that_switches_current_fails_its_step_instead_of_looping(
        self, fleet: Fleet
    ) -> None:
        """The attacker review: a post_symlink that points `current` back at the release
        before (a "roll myself back" habit) left its host off the release while its ack said
        live, and convergence, taking it back, ran the hook again: ~50 switches a second,
        the hook each time, with no pause."""
        host1 = fleet.watchers[0]
        v1 = fleet.publish("v1")
        assert host1.ctl_json("deploy", "web", v1.id)["result"] == "committed"
        fleet.wait_idle()
        back = (
            'prev="$WATCHER_PREVIOUS_RELEASE_DIR"; [ -n "$prev" ] && ln -sfn "$prev" '
            '"$WATCHER_CURRENT.x" && mv -T "$WATCHER_CURRENT.x" "$WATCHER_CURRENT"; exit 0\n'
        )
        hook = host1.root / "post-symlink"
        hook.write_text(f"#!/bin/sh\n{back}")
        hook.chmod(0o755)
        for w in fleet.watchers:  # no automatic rollback: the host's own steps are watched
            settings: dict[str, object] = {"on_validate_failure": "hold"}
            if w is host1:
                settings["hooks"] = {"post_symlink": str(hook)}
            fleet.write_config(w, settings)
            w.stop()
            w.start()
        fleet.wait_members(3)
        v2 = fleet.publish("v2")
        result = host1.ctl("deploy", "web", v2.id, check=False)
        summary = json.loads(result.stdout)
        assert summary["result"] == "failed_after_commit", summary
        said = summary["hosts"][host1.name]
        assert said["state"] == "failed_after_commit", summary
        assert "a hook must not switch current" in said["error"], said
        flips = len(host1.log_events("release_flipped"))
        time.sleep(4)  # convergence tries it again: after a pause, not in a loop
        again = len(host1.log_events("release_flipped")) - flips
        assert again <= 4, f"{again} switches in 4 s\n{host1.log_text()[-3000:]}"
        failed = host1.log_events("converge_failed")
        assert failed and "a hook must not switch current" in failed[-1]["error"], failed

    def test_a_post_release_that_switches_to_the_new_release_is_a_no(self, fleet: Fleet) -> None:
        """The attacker review: a post_release that points `current` at the release it
        built (a deploy tool's habit) acked ready while serving a release nobody had
        committed. It says no now: the deploy aborts, and that host goes back."""
        host2 = fleet.watchers[1]
        v1 = fleet.publish("v1")
        first = fleet.watchers[0].ctl_json("deploy", "web", v1.id)
        assert first["result"] == "committed"
        fleet.wait_idle()
        fleet.restart_with_hook(
            host2,
            "post_release",
            'ln -sfn "releases/$WATCHER_RELEASE" "$WATCHER_CURRENT.x" && '
            'mv -T "$WATCHER_CURRENT.x" "$WATCHER_CURRENT"\n',
        )
        fleet.wait_members(3)
        v2 = fleet.publish("v2")
        result = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False)
        summary = json.loads(result.stdout)
        assert summary["result"] == "aborted", summary
        said = summary["hosts"][host2.name]
        assert said["state"] == "failed" and "a hook must not switch current" in said["error"]
        wait_for(
            lambda: set(fleet.currents().values()) == {first["release"]},
            30,
            "every host on v1's release again",
            fleet,
        )

    def test_a_second_watcher_with_a_hosts_node_name_changes_nothing(self, fleet: Fleet) -> None:
        """A config copied from host-1, its `node` kept, run with another state_dir and
        root: that watcher cannot take host-1's member key. It overwrote host-1's record
        (`status --fleet` then showed host-1 on no release) and acked "failed: the request
        names another session" in every deploy, aborting the ones host-1 staged: also, once
        that was mended, each whose staging ack it read first (a CI run)."""
        host1 = fleet.watchers[0]
        gate = fleet.workdir / "host-1-post-release.gate"
        gate.touch()  # open: host-1's post_release waits only while it is gone
        fleet.give_gated_hook(host1, "post_release", gate)
        fleet.wait_members(3)
        v1 = fleet.publish("v1")
        first = fleet.watchers[0].ctl_json("deploy", "web", v1.id)
        assert first["result"] == "committed", first
        fleet.wait_idle()
        before = fleet.kv.kv_get(fleet.keys.host(host1.name))
        assert before is not None
        twin_root = fleet.workdir / "twin"
        twin_root.mkdir()
        twin = WatcherProc(
            host1.agent, twin_root, twin_root / "watcher.yaml", twin_root / "watcher.log", "web"
        )
        fleet.write_config(twin)
        twin.start()
        try:
            wait_for(
                lambda: bool(twin.log_events("member_key_not_acquired")),
                30,
                "the twin's warning",
                fleet,
            )
            said = twin.log_events("member_key_not_acquired")
            holder = fleet.kv.kv_get(fleet.keys.member(host1.name))
            assert holder is not None and said[0]["held_by"] == holder.session, said
            assert "another watcher runs with node host-1" in said[0]["note"], said
            # It converges its own root (its disk, nobody else's) and writes no record.
            wait_for(lambda: bool(twin.log_events("converged")), 30, "the twin converged", fleet)
            record = fleet.kv.kv_get(fleet.keys.host(host1.name))
            assert record is not None and record.modify_index == before.modify_index, record

            def first_read_when(
                version: str, acked: Callable[[str], bool], what: str
            ) -> dict[str, Any]:
                """A deploy the twin first reads once host-1's ack is ``what`` (it is
                stopped until then); it leaves it to host-1. What `deploy` printed."""
                record = fleet.publish(version)
                assert twin.proc is not None
                os.killpg(twin.proc.pid, signal.SIGSTOP)
                try:
                    deploy = fleet.watchers[1].ctl_json("deploy", "web", record.id, "--no-wait")
                    wait_for(
                        lambda: acked(fleet.ack_states(deploy["deploy"])[host1.name]),
                        30,
                        f"host-1's ack {what}",
                        fleet,
                    )
                finally:
                    os.killpg(twin.proc.pid, signal.SIGCONT)
                left = f"deploy {deploy['deploy']}: expects the other watcher of node {host1.name}"
                wait_for(
                    lambda: any(left in str(e.get("outcome")) for e in twin.log_events("cycle")),
                    30,
                    f"the twin leaving the deploy to host-1 (its ack {what})",
                    fleet,
                )
                return deploy

            # Read first while host-1's ack says staging (host-1 waits in its post_release
            # meanwhile): the twin acked "refused" for host-1 over it (a CI run).
            gate.unlink()
            second = first_read_when("v2", lambda s: s == "staging", "staging")
            gate.touch()
            assert fleet.wait_outcome(second["deploy"])["result"] == "committed"
            fleet.wait_idle()
            assert fleet.currents() == {w.name: second["release"] for w in fleet.watchers}
            assert len(twin.log_events("member_key_not_acquired")) == 1  # said once

            # Read first once host-1 acked past staging: it vetoed one over host-1's ack,
            # then (a fix later) took a ready ack for its own, to stage, flip and write
            # host-1's acks.
            third = first_read_when("v3", lambda s: s not in ("", "staging"), "past staging")
            assert fleet.wait_outcome(third["deploy"])["result"] == "committed"
        finally:
            twin.stop()
        record = fleet.kv.kv_get(fleet.keys.host(host1.name))
        assert record is not None and json.loads(record.value)["release"] == third["release"]

    def test_unknown_artifact_is_refused_before_anything_is_written(self, fleet: Fleet) -> None:
        result = fleet.watchers[0].ctl("deploy", "web", "main-00000000", check=False)
        assert result.returncode != 0
        assert "unknown artifact main-00000000" in result.stderr
        assert fleet.inflight() is None


def _when(stamp: str) -> float:
    """Seconds since the epoch of a log line's ISO timestamp."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


KIND_HOOK = '#!/bin/sh\necho "$WATCHER_PHASE $WATCHER_KIND $WATCHER_DEPLOY_ID" >> {log}\n'


def hooks_logging_kind(fleet: Fleet, w: WatcherProc) -> Path:
    """Give ``w`` post_release, post_symlink and validate hooks that append their phase,
    ``WATCHER_KIND`` and deploy id to a file (returned); the caller (re)starts it."""
    log = w.root / "hook-kinds.log"
    hook = w.root / "log-kind"
    hook.write_text(KIND_HOOK.format(log=log))
    hook.chmod(0o755)
    phases = ("post_release", "post_symlink", "validate")
    fleet.write_config(w, {"hooks": {phase: str(hook) for phase in phases}})
    return log


def two_releases(fleet: Fleet) -> tuple[str, str]:
    """v1 then v2 deployed (both committed), every host idle: their release names."""
    releases = []
    for version in ("v1", "v2"):
        result = fleet.watchers[0].ctl_json("deploy", "web", fleet.publish(version).id)
        assert result["result"] == "committed", result
        releases.append(result["release"])
    fleet.wait_idle()
    return releases[0], releases[1]


def logged_once(fleet: Fleet, w: WatcherProc, event: str) -> dict[str, Any]:
    """The one ``event`` its watcher logged since its last start, waited for (60 s)."""
    wait_for(lambda: bool(w.log_events(event, this_start=True)), 60, f"{w.name}: {event}", fleet)
    [logged] = w.log_events(event, this_start=True)
    return logged


class TestConverge:
    def test_a_host_that_missed_a_deploy_runs_its_hooks_as_converge(self, fleet: Fleet) -> None:
        """Hooks can tell a late catch-up from the live deploy: the hosts in the deploy
        run them with WATCHER_KIND=deploy, the host that was down and converges to the
        fleet's release afterwards with WATCHER_KIND=converge."""
        logs = {w.name: hooks_logging_kind(fleet, w) for w in fleet.watchers}
        for w in fleet.watchers:
            w.stop()
        late = fleet.watchers[2]
        live = fleet.watchers[:2]
        for w in live:
            w.start()
        fleet.wait_members(2)

        v1 = fleet.publish("v1")
        result = live[0].ctl_json("deploy", "web", v1.id, "--allow-missing")
        assert result["result"] == "committed", result
        deploy_id, release = result["deploy"], result["release"]
        phases = ["post_release", "post_symlink", "validate"]
        for w in live:
            lines = logs[w.name].read_text().splitlines()
            assert lines == [f"{p} deploy {deploy_id}" for p in phases], (w.name, lines)
        assert not logs[late.name].exists()
        # History says who it left out: nothing else records that it ran without them.
        [row] = [r for r in live[1].ctl_json("history", "web") if r["deploy"] == deploy_id]
        assert row["allow_missing"] is True and row["left_out"] == [late.name], row
        text = live[1].ctl("history", "web", as_json=False).stdout
        assert f"--allow-missing: {late.name} not expected" in text, text

        late.start()
        wait_for(lambda: late.current() == release, 60, "the late host converged", fleet)
        wait_for(
            lambda: (
                len(logs[late.name].read_text().splitlines()) == 3
                if logs[late.name].exists()
                else False
            ),
            20,
            "the late host's validate hook",
            fleet,
        )
        lines = logs[late.name].read_text().splitlines()
        assert lines == [f"{p} converge {deploy_id}" for p in phases], lines
        # Behind, not moved: nothing to explain.
        assert not late.log_events("current_moved_here")

    def test_a_current_moved_by_hand_is_put_back_and_the_log_says_why(self, fleet: Fleet) -> None:
        """The status review: `current` repointed by hand on one host was put back to the
        fleet's release, its hooks run again, and nothing said why it moved back."""
        old, new = two_releases(fleet)
        host = fleet.watchers[1]
        link = host.app_dir / "current.by-hand"
        link.symlink_to(Path("releases") / old)
        link.rename(host.app_dir / "current")
        wait_for(
            lambda: bool(host.log_events("converged")) and host.current() == new,
            60,
            "the fleet's release put back",
            fleet,
        )
        [moved] = host.log_events("current_moved_here")
        assert (moved["release"], moved["applied"], moved["fleet_release"]) == (old, new, new)
        assert "by hand" in moved["reason"] and "watcherctl hold" in moved["reason"], moved
        # Pointed at no release at all (a directory of the operator's own): said too.
        (host.app_dir / "hotfix").mkdir()
        link.symlink_to("hotfix")
        link.rename(host.app_dir / "current")
        wait_for(
            lambda: len(host.log_events("converged")) == 2 and host.current() == new,
            60,
            "the fleet's release put back again",
            fleet,
        )
        [_, moved] = host.log_events("current_moved_here")
        assert (moved["release"], moved["fleet_release"]) == (None, new), moved
        assert moved["reason"].startswith("`current` was removed or pointed at no release")
        for w in fleet.watchers:
            if w is not host:
                assert not w.log_events("current_moved_here"), w.name

    def test_a_wiped_state_dir_still_says_a_current_moved_by_hand(self, fleet: Fleet) -> None:
        """A host whose `.state/` was wiped (its watcher stopped) had no applied.json: a
        `current` moved by hand after that was put back with no word. It writes it again
        from its own live ack, once back."""
        old, new = two_releases(fleet)
        host = fleet.watchers[2]
        assert host.current() == new
        host.stop()
        shutil.rmtree(host.app_dir / ".state")
        host.start()
        fleet.wait_members(len(fleet.watchers))
        restored = logged_once(fleet, host, "applied_record_restored")
        assert restored["release"] == new, restored
        applied = json.loads((host.app_dir / ".state" / "applied.json").read_text())
        assert applied["release"] == new and applied["deploy"] == restored["deploy"], applied
        link = host.app_dir / "current.by-hand"
        link.symlink_to(Path("releases") / old)
        link.rename(host.app_dir / "current")
        moved = logged_once(fleet, host, "current_moved_here")
        assert (moved["release"], moved["applied"], moved["fleet_release"]) == (old, new, new)
        wait_for(lambda: host.current() == new, 60, "the fleet's release put back", fleet)


class TestRollbackHooks:
    def test_a_fleet_rollbacks_hooks_are_told_the_build_it_goes_back_to(self, fleet: Fleet) -> None:
        """The docs review: a rollback's hooks got WATCHER_BRANCH and WATCHER_COMMIT empty
        (its request had neither); the hosts take such a request and tell its hooks."""
        log = fleet.workdir / "build-hook.log"
        hook = fleet.workdir / "log-build"
        hook.write_text(
            f'#!/bin/sh\necho "$WATCHER_PHASE $WATCHER_KIND $WATCHER_BRANCH $WATCHER_COMMIT"'
            f' >> "{log}"\n'
        )
        hook.chmod(0o755)
        for w in fleet.watchers:
            w.stop()
            fleet.write_config(w, {"hooks": {"post_release": str(hook)}})
            w.start()
        fleet.wait_members(len(fleet.watchers))
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        for build in (v1, v2):
            result = fleet.watchers[0].ctl_json("deploy", "web", build.id)
            assert result["result"] == "committed", result
            fleet.wait_idle()
        result = fleet.watchers[1].ctl_json("rollback", "web")
        assert result["result"] == "committed", result
        lines = log.read_text().splitlines()
        hosts = len(fleet.watchers)
        assert lines[-hosts:] == [f"post_release rollback main {v1.commit}"] * hosts, lines
        assert lines[hosts : 2 * hosts] == [f"post_release deploy main {v2.commit}"] * hosts


class TestOneHostDeploys:
    """Deploys that expected one host: readers and rollbacks judge them as the hosts do."""

    def test_a_host_that_joined_during_one_is_not_called_left_out(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
    ) -> None:
        """host-2 starts for the first time while host-1, alone, runs its post_release:
        host-2 follows the deploy (its first session is newer than host-1's ack, 6.4.5).
        Readers measured the ack by its ModifyIndex (moved by the live write, after host-2
        joined) and showed the fleet's release as NOT TRUSTED, "host-2 was already in the
        fleet", while host-2 ran it."""
        fleet = Fleet(cluster, s3_settings, tmp_path, kv_prefix=f"w{time.monotonic_ns()}")
        first, joiner = fleet.watchers[0], fleet.watchers[1]
        gate, started = tmp_path / "gate", tmp_path / "hook-started"
        hook = tmp_path / "post-release-gated"
        hook.write_text(
            f"#!/bin/sh\ntouch {started}\n"
            f"for i in $(seq 600); do [ -e {gate} ] && exit 0; sleep 0.1; done\nexit 1\n"
        )
        hook.chmod(0o755)
        fleet.write_config(first, {"hooks": {"post_release": str(hook)}})
        try:
            first.start()
            fleet.wait_members(1)
            v1 = fleet.publish("v1")
            started_deploy = first.ctl_json("deploy", "web", v1.id, "--no-wait")
            wait_for(started.exists, 60, "host-1's post_release running", fleet)
            joiner.start()
            fleet.wait_members(2)
            gate.touch()
            outcome = fleet.wait_outcome(started_deploy["deploy"])
            assert outcome["result"] == "committed", outcome
            release = started_deploy["release"]
            wait_for(lambda: joiner.current() == release, 60, "host-2 followed it", fleet)
            status = first.ctl("status", "web", "--fleet", check=False)
            data = json.loads(status.stdout)["web"]
            assert data["current_problems"] == {} and data["current"] == release, data
            assert status.returncode == 0, status
        finally:
            fleet.stop()

    def test_a_host_that_adds_the_app_follows_the_one_host_fleet_it_joins(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
    ) -> None:
        """host-2's watcher has run another app for a while when web, deployed so far on
        host-1 alone, is added to it. It took the deploy of host-1 for a forgery ("only
        host-1 acked, while this host was already in the fleet": its first session, of
        the other app's days, was older) and raised the alarm instead of converging; the
        readers called the fleet's release NOT TRUSTED. What counts is when it joined web."""
        fleet = Fleet(cluster, s3_settings, tmp_path, kv_prefix=f"w{time.monotonic_ns()}")
        first, joiner = fleet.watchers[0], fleet.watchers[1]
        other_only = fleet.config_for(joiner)
        other_only["apps"] = {"other": {**other_only["apps"]["web"], "root": str(tmp_path / "o")}}
        joiner.config_path.write_text(yaml.safe_dump(other_only))
        try:
            joiner.start()
            wait_for(
                lambda: (joiner.state_dir / "first_index.json").exists(),
                30,
                "host-2's first session (app other)",
                fleet,
            )
            first.start()
            fleet.wait_members(1)
            deployed = first.ctl_json("deploy", "web", fleet.publish("v1").id)
            assert deployed["result"] == "committed", deployed
            joiner.stop()
            fleet.write_config(joiner)  # web added
            joiner.start()
            wait_for(lambda: joiner.current() == deployed["release"], 60, "host-2 converged", fleet)
            status = first.ctl("status", "web", "--fleet", check=False)
            data = json.loads(status.stdout)["web"]
            assert data["current_problems"] == {} and status.returncode == 0, data
            assert not joiner.log_events("alarm"), joiner.log_events("alarm")
        finally:
            fleet.stop()

    def test_a_rollback_to_one_is_not_refused_for_hosts_that_are_down(self, fleet: Fleet) -> None:
        """host-2 and host-3 are down; two deploys with --allow-missing ran on host-1 alone.
        A rollback to the first was refused ("host-2, host-3 were already in the fleet")
        although it expects host-1 only, which ran that deploy: the automatic rollback of a
        failed validate was refused the same way. Hosts that are down take no part; when
        back, they judge the target themselves."""
        v1 = fleet.watchers[0].ctl_json("deploy", "web", fleet.publish("v1").id)
        assert v1["result"] == "committed", v1
        for w in fleet.watchers[1:]:
            w.stop()
        fleet.wait_members(1)
        solo = fleet.watchers[0]
        first = solo.ctl_json("deploy", "web", fleet.publish("v2").id, "--allow-missing")
        assert first["result"] == "committed" and first["expected"] == [solo.name], first
        second = solo.ctl_json("deploy", "web", fleet.publish("v3").id, "--allow-missing")
        assert second["result"] == "committed", second

        back = solo.ctl("rollback", "web", "--to", first["release"], "--allow-missing", check=False)
        assert back.returncode == 0, (back.stdout, back.stderr)
        assert json.loads(back.stdout)["result"] == "committed", back.stdout
        assert solo.current() == first["release"]
        # History says each ran without the others, and names them.
        rows = {r["deploy"]: r for r in solo.ctl_json("history", "web")}
        left = [w.name for w in fleet.watchers[1:]]
        assert rows[first["deploy"]]["allow_missing"] is True, rows[first["deploy"]]
        assert rows[first["deploy"]]["left_out"] == left, rows[first["deploy"]]
        # The page's history row too.
        config_path = fleet.workdir / "web.yaml"
        config_path.write_text(yaml.safe_dump(fleet.config_for(solo)))
        app = create_app(load_config(config_path), listen_host="127.0.0.1")
        with TestClient(app, base_url="http://127.0.0.1:8710") as client:
            page = client.get("/apps/web").text
        said = f'<small class="allow-missing">--allow-missing: {", ".join(left)} not expected'
        assert said in page, page
