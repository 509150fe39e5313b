"""Operating the deploy barrier: auto-rollback, raw events, bad payloads, replays, abort races,
holds and status, on a real Consul cluster with one `watcher run` per host."""

from __future__ import annotations

import getpass
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from httpx import Response

from tests.support.cluster import Agent, ClusterSpec, ConsulCluster
from tests.support.deploys import start_deploy
from tests.support.fleet import BIN, SESSION_TTL, Fleet, WatcherProc, metrics_text, wait_for
from watcher import barrier
from watcher.barrier import DeployStore, new_deploy_id
from watcher.config import S3Settings, load_config
from watcher.ctl import main as ctl_main
from watcher.daemon import DOORBELL, TICK_IDLE
from watcher.events import MAX_PAYLOAD
from watcher.records import (
    READY,
    ArtifactRecord,
    DeployRecord,
    parse_iso,
    utcnow,
    watcher_session_name,
)
from watcher.web.app import create_app

CLUSTER = ClusterSpec(hosts=3)
CONSUL_EVENT_LIMIT = 300  # bytes: Consul 1.22 refuses a larger user event payload (HTTP 413)

MakeFleet = Callable[..., Fleet]


@pytest.fixture
def make_fleet(
    cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
) -> Iterator[MakeFleet]:
    """Builds a fleet on its own KV prefix; ``hosts`` maps a watcher index to app overrides."""
    fleets: list[Fleet] = []

    def make(
        *,
        app_extra: dict[str, Any] | None = None,
        daemon_extra: dict[str, Any] | None = None,
        hosts: dict[int, dict[str, Any]] | None = None,
    ) -> Fleet:
        f = Fleet(
            cluster,
            s3_settings,
            tmp_path / f"fleet{len(fleets)}",
            kv_prefix=f"ops{time.monotonic_ns()}",
            app_extra=app_extra or {},
            daemon_extra=daemon_extra or {},
        )
        for index, extra in (hosts or {}).items():
            f.write_config(f.watchers[index], extra)
        fleets.append(f)
        f.start()
        return f

    try:
        yield make
    finally:
        for f in fleets:
            f.stop()


def hook(path: Path, body: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def fire(consul_bin: str, agent: Agent, name: str, payload: str | None) -> str:
    """`consul event -name=NAME PAYLOAD` through the real CLI; returns the event ID."""
    argv = [consul_bin, "event", f"-http-addr={agent.http_addr}", f"-name={name}"]
    if payload is not None:
        argv.append(payload)
    env = {**os.environ, **agent.env()}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)
    assert result.returncode == 0, f"consul event failed: {result.stdout}{result.stderr}"
    match = re.search(r"Event ID: (\S+)", result.stdout)
    assert match, result.stdout
    return match.group(1)


def store_of(fleet: Fleet) -> DeployStore:
    return DeployStore(fleet.kv, fleet.kv_prefix, fleet.app)


def release_of(fleet: Fleet, deploy_id: str) -> str:
    record = store_of(fleet).deploy_record(deploy_id)
    assert record is not None, f"no deploy record {deploy_id}"
    return record.release


def fleet_current(fleet: Fleet) -> str | None:
    current, _ = store_of(fleet).current()
    return current.release if current else None


def all_on(fleet: Fleet, release: str | None) -> dict[str, str | None]:
    return {w.name: release for w in fleet.watchers}


def everyone_on(fleet: Fleet, release: str) -> Callable[[], bool]:
    return lambda: fleet.currents() == all_on(fleet, release)


def history(fleet: Fleet) -> dict[str, dict[str, Any]]:
    rows = fleet.watchers[0].ctl_json("history", "web")
    return {row["deploy"]: row for row in rows}


def events_named(w: WatcherProc, event: str) -> list[dict[str, Any]]:
    return w.log_events(event)


def deploy_ok(fleet: Fleet, artifact_id: str) -> str:
    """A `watcherctl deploy` that must commit; returns the release name."""
    result = fleet.watchers[0].ctl_json("deploy", "web", artifact_id)
    assert result["result"] == "committed", result
    fleet.wait_idle()
    release = str(result["release"])
    wait_for(everyone_on(fleet, release), 10, "every host on the release", fleet)
    return release


def raw_deploy_ok(fleet: Fleet, consul_bin: str, payload: dict[str, str], name: str) -> str:
    """A raw `consul event` that must commit; returns the deploy (= event) id."""
    event_id = fire(consul_bin, fleet.cluster.hosts[0], name, json.dumps(payload))
    outcome = fleet.wait_outcome(event_id)
    assert outcome["result"] == "committed", outcome
    assert {h["state"] for h in outcome["hosts"].values()} == {"live"}, outcome
    fleet.wait_idle()
    release = release_of(fleet, event_id)
    wait_for(everyone_on(fleet, release), 10, "every host on the release", fleet)
    return event_id


# --- 1. validate fails after the flip ---------------------------------------------------------


def validate_fails_on_v2(tmp_path: Path, *, and_on_rollback: bool = False) -> dict[str, Any]:
    """A validate hook that fails on v2 (and, with ``and_on_rollback``, in any rollback)."""
    rollback = ' || [ "$WATCHER_KIND" = rollback ]' if and_on_rollback else ""
    script = hook(
        tmp_path / "hooks" / "validate-host2",
        f'if grep -q v2 "$WATCHER_RELEASE_DIR/VERSION"{rollback}; then\n'
        '  echo "GET /healthz -> 502 Bad Gateway" >&2\n  exit 7\nfi\n',
    )
    return {"hooks": {"validate": script}}


def fleet_page(fleet: Fleet, tmp_path: Path) -> Response:
    """The app's page, as `watcher web` with the first host's config serves it."""
    config_path = tmp_path / "web.yaml"
    config_path.write_text(yaml.safe_dump(fleet.config_for(fleet.watchers[0])))
    app = create_app(load_config(config_path), listen_host="127.0.0.1")
    with TestClient(app, base_url="http://127.0.0.1:8710") as client:
        return client.get("/apps/web")


class TestValidateFailure:
    def test_validate_failure_on_one_host_rolls_the_fleet_back(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        fleet = make_fleet(hosts={1: validate_fails_on_v2(tmp_path)})
        bad = fleet.watchers[1].name
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        rel1 = deploy_ok(fleet, v1.id)

        result = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False)
        assert result.returncode == 1, result
        summary = json.loads(result.stdout)
        assert summary["result"] == "rolled_back", summary
        rel2 = summary["release"]
        rollback_id = summary["rollback_deploy"]
        assert rollback_id, summary
        # `deploy` waited for the rollback's own end, and says it.
        assert summary["rollback"] == {
            "deploy": rollback_id,
            "result": "committed",
            "note": f"every host is back on {rel1}",
        }, summary
        # Every host flipped to v2 (it was committed) before the fleet went back.
        assert summary["hosts"][bad]["state"] == "failed_after_commit"
        assert all(h["state"] == "live" for n, h in summary["hosts"].items() if n != bad)

        rollback = fleet.wait_outcome(rollback_id)
        assert rollback["result"] == "committed", rollback
        fleet.wait_idle()
        assert fleet.currents() == all_on(fleet, rel1)
        for w in fleet.watchers:
            assert (w.app_dir / "current" / "VERSION").read_text() == "v1\n"
        current, _ = store_of(fleet).current()
        assert current is not None and current.release == rel1 and current.deploy == rollback_id
        assert current.previous is not None and current.previous["release"] == rel2
        # Back on v1: nothing failed about the fleet's release any more.
        status = fleet.watchers[0].ctl("status", "web", "--fleet")
        assert json.loads(status.stdout)["web"]["current_failed"] is None, status.stdout

        rows = history(fleet)
        failed = rows[summary["deploy"]]
        assert failed["result"] == "rolled_back"
        assert bad in failed["reason"] and "validate" in failed["reason"]
        assert failed["hosts"][bad]["state"] == "failed_after_commit"
        assert "502 Bad Gateway" in failed["hosts"][bad]["output_tail"]
        assert failed["rollback_deploy"] == rollback_id
        back = rows[rollback_id]
        assert back["kind"] == "rollback" and back["result"] == "committed"
        assert back["release"] == rel1 and back["rollback_of"] == summary["deploy"]
        assert {h["state"] for h in back["hosts"].values()} == {"live"}
        # A rollback never triggers another one, and nothing else started.
        assert len(rows) == 3 and fleet.inflight() is None

        # `current.previous` is now the failed release: a plain "roll back" (the runbook's
        # first command) would put the fleet on it again. It is refused, naming it.
        again = fleet.watchers[0].ctl("rollback", "web", check=False, as_json=False)
        assert again.returncode == 4, again
        assert (
            f"the previous release {rel2} is the one deploy {summary['deploy']} ended "
            "rolled_back" in again.stderr
        ), again.stderr
        assert f"--to {rel2}" in again.stderr
        assert fleet.inflight() is None and len(history(fleet)) == 3
        assert fleet.currents() == all_on(fleet, rel1)
        # `--to` the release the fleet is on: a whole round for nothing, said as it starts.
        same = fleet.watchers[0].ctl("rollback", "web", "--to", rel1, as_json=False)
        assert f"warning: the fleet is already on {rel1}" in same.stderr, same.stderr
        assert ": committed" in same.stdout, same.stdout

    def test_an_automatic_rollback_that_aborts_is_said_where_the_deploy_is(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """host-2's validate fails on v2 and host-3's post_release refuses the rollback:
        the deploy said rolled_back and "fleet rollback started", and history kept saying
        rolled_back, while the fleet stayed on v2. Now `deploy` waits for the rollback's
        end and says where the fleet is left; history's row says the same."""
        refuses = hook(
            tmp_path / "hooks" / "post-release-no-rollback", 'test "$WATCHER_KIND" != rollback\n'
        )
        fleet = make_fleet(
            hosts={1: validate_fails_on_v2(tmp_path), 2: {"hooks": {"post_release": refuses}}}
        )
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        deploy_ok(fleet, v1.id)

        result = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False, as_json=False)
        assert result.returncode == 1, result
        rows = history(fleet)
        [deploy_id] = [d for d, r in rows.items() if r["result"] == "rolled_back"]
        rel2, rollback_id = rows[deploy_id]["release"], rows[deploy_id]["rollback_deploy"]
        # `deploy` reports the rollback once every host's ack is final; its end (which
        # writes its history entry) may come a moment later.
        fleet.wait_outcome(rollback_id)
        rows = history(fleet)
        assert rows[rollback_id]["result"] == "aborted", rows[rollback_id]
        said = f"the fleet stays on {rel2}, which failed after the commit"
        assert f"  fleet rollback {rollback_id}: aborted: " in result.stdout, result.stdout
        assert said in result.stdout, result.stdout
        assert rows[deploy_id]["rollback"]["result"] == "aborted", rows[deploy_id]
        assert said in rows[deploy_id]["rollback"]["note"]
        text = fleet.watchers[0].ctl("history", "web", as_json=False).stdout
        assert f"its fleet rollback {rollback_id}: aborted: " in text, text
        fleet.wait_idle()
        assert fleet.currents() == all_on(fleet, rel2)
        # `status --fleet`, the one command that says where every server stands, said
        # "fleet on <v2>" and exited 0: nothing of the failed validate or the rollback.
        bad = fleet.watchers[1].name
        status = fleet.watchers[0].ctl("status", "web", "--fleet", check=False, as_json=False)
        assert status.returncode == 1, status
        assert (
            f"  FAILED AFTER COMMIT: release {rel2} (deploy {deploy_id}) failed its validate "
            f"on {bad}: validate hook " in status.stdout
        ), status.stdout
        assert f"  its automatic rollback {rollback_id}: aborted: " in status.stdout
        # What to do, as a command that works: the previous release (v1) passed.
        assert "  the fleet stays on it: `watcherctl rollback web -c " in status.stdout
        data = json.loads(fleet.watchers[0].ctl("status", "web", "--fleet", check=False).stdout)
        failed = data["web"]["current_failed"]
        assert failed["deploy"] == deploy_id and list(failed["hosts"]) == [bad], failed
        assert failed["rollback"]["result"] == "aborted", failed
        assert failed["roll_back"] == "watcherctl rollback web", failed
        assert failed["plain_rollback_refused"] is False, failed
        # This host's own status says it too (host-3, whose post_release refused).
        here = fleet.watchers[2].ctl("status", "web", check=False, as_json=False)
        assert here.returncode == 1, here
        assert f"  FAILED AFTER COMMIT: release {rel2}" in here.stdout, here.stdout
        # And the page: a banner over the fleet, the rollback's note in its history row.
        page = fleet_page(fleet, tmp_path)
        assert page.status_code == 200, page.text
        banner = re.search(
            r'<p class="banner error failed-release"[^>]*>(.*?)</p>', page.text, re.S
        )
        assert banner, page.text
        assert f"Release {rel2} (deploy {deploy_id}) failed its validate" in banner[1]
        assert f"Its automatic rollback {rollback_id}: aborted: " in banner[1], banner[1]
        assert f'class="rollback-note">its fleet rollback {rollback_id}: aborted: ' in page.text

    def test_a_failed_release_s_banner_names_the_deploy_that_moves_the_fleet_off_it(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """v2 failed its validate on host-2 and the fleet holds on it
        (``on_validate_failure: hold``). While the next deploy (v3) prepares, `status
        --fleet` and the page told the operator to roll back, which is refused while a
        deploy is in flight: they now name that deploy as what moves the fleet."""
        gate = tmp_path / "gate"
        slow = hook(
            tmp_path / "hooks" / "post-release-v3",
            'grep -q v3 "$WATCHER_RELEASE_DIR/VERSION" || exit 0\n'
            f'for i in $(seq 600); do [ -e "{gate}" ] && break; sleep 0.1; done\n',
        )
        fleet = make_fleet(
            app_extra={"on_validate_failure": "hold"},
            hosts={1: validate_fails_on_v2(tmp_path), 2: {"hooks": {"post_release": slow}}},
        )
        v1, v2, v3 = fleet.publish("v1"), fleet.publish("v2"), fleet.publish("v3")
        deploy_ok(fleet, v1.id)
        failed = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False)
        assert json.loads(failed.stdout)["result"] == "failed_after_commit", failed.stdout
        fleet.wait_idle()
        status = fleet.watchers[0].ctl("status", "web", "--fleet", check=False, as_json=False)
        assert "  the fleet stays on it: `watcherctl rollback web -c " in status.stdout
        try:
            started = fleet.watchers[0].ctl_json("deploy", "web", v3.id, "--no-wait")
            deploy_id, rel3 = started["deploy"], started["release"]
            status = fleet.watchers[0].ctl("status", "web", "--fleet", check=False, as_json=False)
            assert status.returncode == 1, status  # still a failed release until then
            assert "  FAILED AFTER COMMIT: release " in status.stdout, status.stdout
            assert (
                f"  deploy {deploy_id} of {rel3} is in flight: once it commits, it moves the "
                "fleet off it" in status.stdout
            ), status.stdout
            assert "the fleet stays on it" not in status.stdout, status.stdout
            here = fleet.watchers[1].ctl("status", "web", check=False, as_json=False)
            assert f"  deploy {deploy_id} of {rel3} is in flight: " in here.stdout, here.stdout
            page = fleet_page(fleet, tmp_path)
            banner = re.search(
                r'<p class="banner error failed-release"[^>]*>(.*?)</p>', page.text, re.S
            )
            assert banner, page.text
            assert f"deploy {deploy_id} of {rel3} is in flight: once it commits" in banner[1]
            assert "The fleet stays on it" not in banner[1], banner[1]
        finally:
            gate.touch()
        assert fleet.wait_outcome(deploy_id)["result"] == "committed"
        fleet.wait_idle()
        status = fleet.watchers[0].ctl("status", "web", "--fleet", check=False, as_json=False)
        assert status.returncode == 0 and "FAILED AFTER COMMIT" not in status.stdout, status

    def test_an_automatic_rollback_whose_validate_fails_too_says_where_the_fleet_is(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """host-2's validate fails on v2 and on the rollback as well: the rollback
        committed (every host went back to v1), and `deploy` said "the fleet stays on v2,
        which failed after the commit: roll back by hand"."""
        fleet = make_fleet(hosts={1: validate_fails_on_v2(tmp_path, and_on_rollback=True)})
        bad = fleet.watchers[1].name
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        rel1 = deploy_ok(fleet, v1.id)

        result = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False)
        assert result.returncode == 1, result
        summary = json.loads(result.stdout)
        assert summary["rollback"]["result"] == "failed_after_commit", summary
        assert summary["rollback"]["note"] == (
            f"the fleet is back on {rel1}, whose validate failed too, on {bad}: look at those hosts"
        ), summary["rollback"]
        fleet.wait_idle()
        assert fleet.currents() == all_on(fleet, rel1)
        status = fleet.watchers[0].ctl("status", "web", "--fleet", check=False, as_json=False)
        assert status.returncode == 1, status
        assert f"  FAILED AFTER COMMIT: release {rel1} (deploy " in status.stdout, status.stdout
        # Its previous release is v2, the one rolled back from: a plain `rollback` is
        # refused (exit 4), so what status suggests names the release.
        assert "  the fleet stays on it: `watcherctl rollback web --to RELEASE" in status.stdout
        plain = fleet.watchers[0].ctl("rollback", "web", check=False, as_json=False)
        assert plain.returncode == 4, plain
        data = json.loads(fleet.watchers[0].ctl("status", "web", "--fleet", check=False).stdout)
        assert data["web"]["current_failed"]["plain_rollback_refused"] is True, data

    def test_on_validate_failure_hold_leaves_every_host_on_the_new_release(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        fleet = make_fleet(
            app_extra={"on_validate_failure": "hold"}, hosts={1: validate_fails_on_v2(tmp_path)}
        )
        bad = fleet.watchers[1].name
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        deploy_ok(fleet, v1.id)

        result = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False)
        assert result.returncode == 1, result
        summary = json.loads(result.stdout)
        assert summary["result"] == "failed_after_commit", summary
        assert summary["rollback_deploy"] is None
        assert bad in summary["reason"]
        rel2 = summary["release"]
        fleet.wait_idle()
        # Nothing moves back: give the fleet a moment to (wrongly) react, then look again.
        time.sleep(1.5)
        assert fleet.inflight() is None
        assert fleet.currents() == all_on(fleet, rel2)
        assert fleet_current(fleet) == rel2
        rows = history(fleet)
        assert len(rows) == 2
        assert rows[summary["deploy"]]["result"] == "failed_after_commit"
        assert "502 Bad Gateway" in rows[summary["deploy"]]["hosts"][bad]["output_tail"]
        status = fleet.watchers[0].ctl("status", "web", "--fleet", check=False, as_json=False)
        assert status.returncode == 1, status
        assert f"  FAILED AFTER COMMIT: release {rel2} " in status.stdout, status.stdout
        assert "  the fleet stays on it: `watcherctl rollback web " in status.stdout
        # While it waits, `deploy` shows why the hook failed, not only its exit status.
        again = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False, as_json=False)
        assert again.returncode == 1, again
        assert f"  {bad}: failed_after_commit: validate hook " in again.stdout, again.stdout
        assert "    | GET /healthz -> 502 Bad Gateway\n" in again.stdout, again.stdout

    def test_a_validate_that_fails_after_the_deploy_ended_says_no_rollback_was_started(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """host-2's validate of v2 is still running at the apply deadline: the deploy ends
        committed with host-2 not live, then the validate fails. The end is what starts an
        automatic rollback, so none starts; README said a validate failure rolls the fleet
        back. `status --fleet` and the page now say that none was started, and why."""
        gate = tmp_path / "gate"
        late = hook(
            tmp_path / "hooks" / "validate-late",
            'grep -q v2 "$WATCHER_RELEASE_DIR/VERSION" || exit 0\n'
            f'for i in $(seq 600); do [ -e "{gate}" ] && break; sleep 0.1; done\n'
            'echo "GET /healthz -> 502 Bad Gateway" >&2\nexit 7\n',
        )
        fleet = make_fleet(
            app_extra={"timeouts": {"prepare": 3, "apply": 3}},
            hosts={1: {"hooks": {"validate": late}}},
        )
        bad = fleet.watchers[1].name
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        deploy_ok(fleet, v1.id)
        started = fleet.watchers[0].ctl_json("deploy", "web", v2.id, "--no-wait")
        deploy_id, rel2 = started["deploy"], started["release"]
        outcome = fleet.wait_outcome(deploy_id, timeout=40)
        assert outcome["result"] == "committed", outcome
        assert f"still not live at the apply deadline: {bad}" in outcome["reason"], outcome
        # Between the end and the failure, `status --fleet` said nothing of host-2.
        shown = fleet.watchers[0].ctl("status", "web", "--fleet", as_json=False)
        assert (
            f"  NOT LIVE yet: {bad}: acked {rel2} but has not said live or failed" in shown.stdout
        ), shown.stdout
        assert "now starts no automatic rollback" in shown.stdout
        gate.touch()

        def failed_ack() -> bool:
            entry = fleet.kv.kv_get(fleet.keys.progress(deploy_id, bad))
            state = json.loads(entry.value or b"{}").get("state") if entry else None
            return state == "failed_after_commit"

        wait_for(failed_ack, 30, "host-2 acked failed_after_commit", fleet)
        fleet.wait_idle()
        time.sleep(1.5)  # nothing starts a rollback: give it a moment to (wrongly) do so
        assert fleet.inflight() is None and len(history(fleet)) == 2
        assert fleet.currents() == all_on(fleet, rel2)
        status = fleet.watchers[0].ctl("status", "web", "--fleet", check=False, as_json=False)
        assert status.returncode == 1, status
        assert f"  FAILED AFTER COMMIT: release {rel2} (deploy {deploy_id})" in status.stdout
        assert (
            "  no automatic rollback: the deploy had already ended (committed) when this "
            "validate failed" in status.stdout
        ), status.stdout
        assert "  the fleet stays on it: `watcherctl rollback web -c " in status.stdout
        data = json.loads(fleet.watchers[0].ctl("status", "web", "--fleet", check=False).stdout)
        failed = data["web"]["current_failed"]
        assert failed["after_end"] is True and list(failed["hosts"]) == [bad], failed
        assert data["web"]["current_not_live"] == [], data["web"]
        page = fleet_page(fleet, tmp_path)
        assert "No automatic rollback: the deploy had already ended" in page.text, page.text
        text = fleet.watchers[0].ctl("history", "web", as_json=False).stdout
        assert f"failed after its end on {bad}: no automatic rollback" in text, text
        # The next release passes; a plain `rollback` from it would go back to the one that
        # failed here after its end: refused like one that failed before it (the operator
        # review), naming why.
        deploy_ok(fleet, fleet.publish("v3").id)
        plain = fleet.watchers[0].ctl("rollback", "web", check=False, as_json=False)
        assert plain.returncode == 4, (plain.stdout, plain.stderr)
        assert (
            f"the previous release {rel2} is the one deploy {deploy_id} ended committed, and "
            f"failed after its commit on {bad} later" in plain.stderr
        ), plain.stderr

    def test_rollback_local_waits_for_a_convergence_s_hooks_after_the_switch(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """A host that missed a deploy converges to it when its watcher is back: flip, then
        validate. A local rollback then ran a second validate beside the convergence's,
        which logged "converged" with `current` already back (the operator review):
        refused while those hooks run. A convergence whose watcher was killed mid-try, the
        host held since (so no try follows), refused every local rollback for good; and
        one resumed after a local rollback and a release-hold validated the rolled-back
        tree and said converged (the second code review)."""
        gate, runs = tmp_path / "gate", tmp_path / "validate.log"
        fleet = make_fleet()
        victim = fleet.watchers[1]
        deploy_ok(fleet, fleet.publish("v1").id)
        victim.stop()
        fleet.wait_members(len(fleet.watchers) - 1)
        v2 = fleet.publish("v2")
        result = fleet.watchers[0].ctl_json("deploy", "web", v2.id, "--allow-missing")
        assert result["result"] == "committed", result
        release = result["release"]
        hooks = {}
        for phase, body in (
            (
                "post_symlink",
                'echo "post_symlink $WATCHER_KIND $(cat "$WATCHER_CURRENT/VERSION")"',
            ),
            ("validate", 'echo "$WATCHER_KIND $(cat "$WATCHER_CURRENT/VERSION")"'),
        ):
            hooks[phase] = str(victim.root / f"{phase}-hook")
            Path(hooks[phase]).write_text(f'#!/bin/sh\n{body} >> "{runs}"\n')
            Path(hooks[phase]).chmod(0o755)
        with open(hooks["validate"], "a") as hook:
            hook.write(f'touch "{gate}.started"\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\n')
        fleet.write_config(victim, {"hooks": hooks})
        victim.start()
        wait_for(gate.with_name("gate.started").exists, 30, "host-2 in its validate", fleet)
        refused = victim.ctl("rollback", "web", "--local", check=False, as_json=False)
        assert refused.returncode == 4, (refused.stdout, refused.stderr)
        assert f"is converging to {release} (deploy {result['deploy']})" in refused.stderr
        assert victim.current() == release
        # Killed mid-try, held while down: no try follows, and a local rollback goes through.
        victim.kill()
        victim.ctl_json("hold", "web", "--reason", "looking at it")
        victim.start()
        wait_for(
            lambda: victim.ctl("status", "web", check=False).returncode != 3,
            30,
            "host-2's watcher up again",
            fleet,
        )
        gate.touch()  # validates pass from now on
        back = victim.ctl_json("rollback", "web", "--local")
        assert back["flipped"] is True and back["to"] != release, back
        # Released: the convergence switches again before its hooks, and converges.
        victim.ctl_json("release-hold", "web")
        wait_for(lambda: victim.current() == release, 30, "host-2 on the release again", fleet)
        wait_for(lambda: bool(victim.log_events("converged")), 30, "host-2 converged", fleet)
        said = runs.read_text().splitlines()
        assert "converge v1" not in said and said[-1] == "converge v2", said
        # post_symlink ran after each switch to the release: before the kill, and again
        # after the switch back over the local rollback (its journal entry dropped).
        after_switch = [line for line in said if line.startswith("post_symlink converge")]
        assert after_switch == ["post_symlink converge v2"] * 2, said

    def test_rollback_local_is_the_way_out_of_a_convergence_whose_validate_fails(
        self, make_fleet: MakeFleet
    ) -> None:
        """Between two tries of a convergence whose validate fails here, a local rollback
        goes through (not refused as a convergence running its hooks), and holds the host
        so that no further try starts."""
        fleet = make_fleet()
        victim = fleet.watchers[1]
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        victim.stop()
        fleet.wait_members(len(fleet.watchers) - 1)
        result = fleet.watchers[0].ctl_json(
            "deploy", "web", fleet.publish("v2").id, "--allow-missing"
        )
        fleet.daemon_extra["listen"] = "127.0.0.1:0"  # its /metrics (the port from its log)
        fleet.restart_with_hook(
            victim, "validate", 'grep -q v2 "$WATCHER_RELEASE_DIR/VERSION" && exit 3\nexit 0\n'
        )
        wait_for(lambda: bool(victim.log_events("converge_failed")), 30, "a failed try", fleet)
        failing = "  converge    FAILED, retried with a growing pause"

        def status() -> str:
            return victim.ctl("status", "web", check=False, as_json=False).stdout

        def retrying() -> str:
            url = f"http://127.0.0.1:{victim.health_port()}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
            gauge = 'watcher_retrying{app="web",step="converge"}'
            return next((ln.split()[-1] for ln in text.splitlines() if ln.startswith(gauge)), "")

        wait_for(lambda: failing in status(), 20, "status shows the failing convergence", fleet)
        assert retrying() == "1.0"
        back = victim.ctl_json("rollback", "web", "--local")
        assert back["flipped"] is True and back["to"] == rel1, back
        tries = len(victim.log_events("converge_failed"))
        time.sleep(3)  # the next try was due within 2-4 s: held, none starts
        assert len(victim.log_events("converge_failed")) == tries
        # held: no longer retried, and no longer said to be (the hold is shown instead)
        wait_for(lambda: failing not in status(), 20, "the failure no longer shown", fleet)
        assert retrying() == "0.0"
        assert victim.current() == rel1 != result["release"]

    def test_a_host_rolled_back_by_hand_while_its_watcher_was_down_mid_validate_is_not_live(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """host-2's watcher is killed during its validate (after its switch); an operator
        rolls host-2 back by hand (`rollback --local`, allowed while no watcher runs) and
        starts the watcher again. It ran the deploy's validate against the rolled-back
        tree and acked live for a release it did not serve (the operator review). Now it
        acks failed after the commit, says why, and stays where the operator put it."""
        gate = tmp_path / "gate"
        fleet = make_fleet(app_extra={"on_validate_failure": "hold"})
        victim = fleet.watchers[1]
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        fleet.give_gated_hook(victim, "validate", gate)
        fleet.wait_members(len(fleet.watchers))
        started = fleet.watchers[0].ctl_json("deploy", "web", fleet.publish("v2").id, "--no-wait")
        deploy_id, rel2 = started["deploy"], started["release"]
        wait_for(gate.with_name("gate.started").exists, 30, "host-2 in its validate", fleet)
        victim.kill()
        gate.touch()  # validates pass from now on: the local rollback's, the deploy's
        back = victim.ctl_json("rollback", "web", "--local")
        assert back["flipped"] is True and back["to"] == rel1, back
        victim.start()
        outcome = fleet.wait_outcome(deploy_id, timeout=60)
        assert outcome["result"] == "failed_after_commit", outcome
        ack = outcome["hosts"][victim.name]
        assert ack["state"] == "failed_after_commit", outcome
        assert ack["error"].startswith(
            f"current was moved to {rel1} on this host after its switch to {rel2}, and it "
            "is held (local rollback to "
        ), ack
        assert victim.current() == rel1
        status = victim.ctl("status", "web", check=False)
        assert status.returncode == 1, status  # FAILED AFTER COMMIT: the fleet's release
        assert "local rollback to" in json.loads(status.stdout)["apps"]["web"]["hold"]["reason"]
        # The same, but the hold released before the watcher is back: it ran the hooks
        # against the rolled-back tree and acked live (the second code review). It says
        # it did not go live, runs no hook, and converges to the fleet's release (not
        # switched back by the deploy: the fleet may have moved on since, the third).
        victim.ctl_json("release-hold", "web")
        wait_for(lambda: victim.current() == rel2, 30, "host-2 converged to v2", fleet)
        wait_for(lambda: bool(victim.log_events("converged")), 30, "its hooks done", fleet)
        fleet.wait_idle()
        gate.unlink()
        gate.with_name("gate.started").unlink()
        started = fleet.watchers[0].ctl_json("deploy", "web", fleet.publish("v3").id, "--no-wait")
        wait_for(gate.with_name("gate.started").exists, 30, "host-2 in its validate", fleet)
        victim.kill()
        gate.touch()
        victim.ctl_json("rollback", "web", "--local")
        victim.ctl_json("release-hold", "web")
        victim.start()
        outcome = fleet.wait_outcome(started["deploy"], timeout=60)
        ack = outcome["hosts"][victim.name]
        assert ack["state"] == "failed_after_commit", outcome
        assert (
            "and the hold was released since: it converges to the fleet's release" in ack["error"]
        ), ack
        rel3 = started["release"]
        wait_for(lambda: victim.current() == rel3, 30, "host-2 converged to v3", fleet)

    def test_a_hook_after_the_commit_that_cannot_start_is_a_no_before_it(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """A typo in host-2's post_symlink path: the deploy used to commit, every host
        switched, host-2 failed after the commit and the fleet rolled back (whose own
        post_symlink failed the same way). Now host-2 says no before the commit, naming
        the hook; its log warned of the path at start."""
        typo = tmp_path / "hooks" / "restart-servce"
        fleet = make_fleet(hosts={1: {"hooks": {"post_symlink": [str(typo)]}}})
        bad = fleet.watchers[1]
        warned = [e for e in bad.log_events("config_warning") if str(typo) in e["warning"]]
        assert warned and "does not exist" in warned[0]["warning"], bad.log_text()[-2000:]
        result = fleet.watchers[0].ctl("deploy", "web", fleet.publish("v1").id, check=False)
        summary = json.loads(result.stdout)
        assert result.returncode != 0 and summary["result"] == "aborted", summary
        error = summary["hosts"][bad.name]["error"]
        assert f"post_symlink hook {typo}: does not exist" in error, error
        fleet.wait_idle()
        assert fleet.currents() == all_on(fleet, None)
        # Fixed (the hook exists now): the next deploy commits.
        hook(typo, "exit 0\n")
        deploy_ok(fleet, fleet.publish("v2").id)


# --- 2. raw events and rollback ----------------------------------------------------------------


class TestRawEventsAndRollback:
    def test_a_raw_rollback_takes_previous_as_it_is_when_it_starts(
        self, make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The commit review: a raw `rollback` event read `current`, and a deploy that
        ended before its txn (rewriting `current`, clearing `inflight`) left it going to
        the release before that deploy: two releases back. The txn now checks `current`
        and the next round reads it again."""
        fleet = make_fleet()
        v1, v2, v3 = fleet.publish("v1"), fleet.publish("v2"), fleet.publish("v3")
        deploy_ok(fleet, v1.id)
        rel2 = deploy_ok(fleet, v2.id)
        real = barrier.rollback_target
        ended: list[str] = []

        def a_deploy_ends_meanwhile(*args: Any, **kwargs: Any) -> Any:
            target = real(*args, **kwargs)
            if not ended:  # once: v3 is deployed and ends after the target was read
                ended.append(deploy_ok(fleet, v3.id))
            return target

        monkeypatch.setattr(barrier, "rollback_target", a_deploy_ends_meanwhile)
        event_id = "5f1c0b3e-1d2a-4c5b-8e7f-0a1b2c3d4e5f"
        started = store_of(fleet).start_from_event(
            event_id=event_id,
            ltime=10**6,
            kind="rollback",
            artifact_id=None,
            release=None,
            by=fleet.watchers[1].name,
            prepare_timeout=60,
            apply_timeout=60,
            history_keep=50,
        )
        assert started == "started" and ended, started
        # the previous release of v3's deploy (v2), not of v2's (v1)
        assert release_of(fleet, event_id) == rel2
        assert fleet.wait_outcome(event_id)["result"] == "committed"

    def test_a_redeploy_of_the_live_build_warns_and_so_does_the_rollback_after_it(
        self, make_fleet: MakeFleet
    ) -> None:
        """The careless-operator review: the live build deployed again (a "restart") made
        the release before it that same build, and `rollback` then said committed and
        changed no code, without a word. Both commands now say so as they start."""
        fleet = make_fleet()
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        deploy_ok(fleet, v1.id)
        rel2 = deploy_ok(fleet, v2.id)
        w = fleet.watchers[0]
        # A release is named by the second it was asked for: within the same second the
        # redeploy is the live release itself, and `previous` does not move.
        time.sleep(1.1)
        again = w.ctl("deploy", "web", v2.id, as_json=False)
        assert ": committed" in again.stdout, again.stdout
        assert f"warning: the fleet already runs {v2.id} (release {rel2})" in again.stderr
        assert "a plain `rollback` would bring back this code" in again.stderr, again.stderr
        fleet.wait_idle()
        back = w.ctl("rollback", "web", as_json=False)
        assert ": committed" in back.stdout, back.stdout
        assert f"{rel2} is of the build the fleet runs ({v2.id}, deployed again as" in back.stderr
        assert "`--to RELEASE`" in back.stderr, back.stderr
        fleet.wait_idle()
        # A deploy of another build says nothing of the kind.
        other = w.ctl("deploy", "web", v1.id, as_json=False)
        assert "already runs" not in other.stderr, other.stderr

    def test_raw_deploy_event_then_rollbacks(self, make_fleet: MakeFleet, consul_bin: str) -> None:
        fleet = make_fleet()
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")

        e1 = raw_deploy_ok(fleet, consul_bin, {"app": "web", "artifact": v1.id}, "deploy")
        rel1 = release_of(fleet, e1)
        record = store_of(fleet).deploy_record(e1)
        assert record is not None
        assert record.requested_by == f"consul event {e1}" and record.artifact == v1.id
        assert record.expected == sorted(w.name for w in fleet.watchers)
        e2 = raw_deploy_ok(fleet, consul_bin, {"app": "web", "artifact": v2.id}, "deploy")
        rel2 = release_of(fleet, e2)
        assert fleet.currents() == all_on(fleet, rel2)

        back = fleet.watchers[2].ctl_json("rollback", "web")
        assert back["result"] == "committed" and back["kind"] == "rollback", back
        assert back["release"] == rel1
        fleet.wait_idle()
        assert fleet.currents() == all_on(fleet, rel1)
        assert fleet_current(fleet) == rel1

        # A raw rollback event: back to the previous release, which is now rel2.
        e3 = raw_deploy_ok(fleet, consul_bin, {"app": "web"}, "rollback")
        view = store_of(fleet).view(e3)
        assert view is not None and view.record.kind == "rollback"
        assert view.record.release == rel2
        assert fleet.currents() == all_on(fleet, rel2)
        assert [r["deploy"] for r in reversed(list(history(fleet).values()))] == [
            e1,
            e2,
            back["deploy"],
            e3,
        ]

    def test_raw_events_off_start_nothing_and_watcherctl_still_deploys(
        self, make_fleet: MakeFleet, consul_bin: str
    ) -> None:
        """``raw_events: false``: Consul's event ACLs are not per app, so a token that may
        fire `deploy` for another app must not start one of this app; the doorbell of
        `watcherctl deploy`, which names a request written with KV permissions, is heard."""
        fleet = make_fleet(app_extra={"raw_events": False})
        v1 = fleet.publish("v1")
        before = history(fleet)
        for name, payload in (
            ("deploy", {"app": "web", "artifact": v1.id}),
            ("rollback", {"app": "web"}),
        ):
            event_id = fire(consul_bin, fleet.cluster.hosts[0], name, json.dumps(payload))
            wait_for(
                lambda event_id=event_id: all(  # type: ignore[misc]
                    any(e.get("event_id") == event_id for e in events_named(w, "raw_event_refused"))
                    for w in fleet.watchers
                ),
                20,
                f"every host refused raw {name} {event_id}",
                fleet,
            )
        assert fleet.inflight() is None and history(fleet) == before
        assert store_of(fleet).deploy_record(event_id) is None
        deploy_ok(fleet, v1.id)

    def test_a_build_that_does_not_exist_is_a_warning_not_an_error(
        self, make_fleet: MakeFleet, consul_bin: str
    ) -> None:
        """Anyone who may fire `build-finished` can name a build nobody published: every
        host says so once, as a warning, and nothing else happens."""
        fleet = make_fleet()
        payload = json.dumps({"app": "web", "artifact": "main-0badc0de"})
        fire(consul_bin, fleet.cluster.hosts[0], "build-finished", payload)
        wait_for(
            lambda: all(events_named(w, "prefetch_skipped") for w in fleet.watchers),
            30,
            "every host skipped the prefetch",
            fleet,
        )
        for w in fleet.watchers:
            [skipped] = events_named(w, "prefetch_skipped")
            assert skipped["level"] == "warning" and "main-0badc0de" in skipped["reason"]
            assert not events_named(w, "prefetch_failed")

    def test_a_build_still_uploading_is_neither_prefetched_nor_deployed(
        self, make_fleet: MakeFleet, consul_bin: str
    ) -> None:
        """A publish writes its record before it uploads, and marks it finished once the
        object is uploaded and verified. Announced or deployed before that, every host's
        download would fail (and the deploy abort): hosts skip it, `deploy` refuses it."""
        fleet = make_fleet()
        v1 = fleet.publish("v1")
        key = fleet.keys.artifact(v1.id)
        fleet.kv.kv_put(key, replace(v1, uploading=True, created_by="ci@build-7").to_json())
        fire(
            consul_bin,
            fleet.cluster.hosts[0],
            "build-finished",
            json.dumps({"app": "web", "artifact": v1.id}),
        )
        wait_for(
            lambda: all(events_named(w, "prefetch_skipped") for w in fleet.watchers),
            30,
            "every host skipped the prefetch",
            fleet,
        )
        said = f"artifact {v1.id} is still being uploaded (its publish by ci@build-7 since "
        for w in fleet.watchers:
            [skipped] = events_named(w, "prefetch_skipped")
            assert skipped["level"] == "warning" and said in skipped["reason"], skipped
            assert not events_named(w, "prefetched") and not events_named(w, "prefetch_failed")
        before = history(fleet)
        refused = fleet.watchers[1].ctl("deploy", "web", v1.id, as_json=False, check=False)
        assert refused.returncode == 4, refused.stderr
        assert said in refused.stderr and "publish it again" in refused.stderr, refused.stderr
        assert fleet.inflight() is None and history(fleet) == before
        fleet.kv.kv_put(key, v1.to_json())  # its publish finished
        release = deploy_ok(fleet, v1.id)
        assert fleet.currents() == all_on(fleet, release)

    def test_builds_that_do_not_exist_do_not_hold_up_a_real_one(
        self, make_fleet: MakeFleet, consul_bin: str
    ) -> None:
        """30 `build-finished` events naming builds nobody published, then a real one: each
        bogus id held one of the two prefetch workers for ~3 s of retries (a real build
        came ~43 s later); now it costs two reads."""
        fleet = make_fleet()
        for n in range(30):
            payload = json.dumps({"app": "web", "artifact": f"main-{n:08x}"})
            fire(consul_bin, fleet.cluster.hosts[0], "build-finished", payload)
        real = fleet.publish("v1", announce=True)
        t0 = time.monotonic()
        wait_for(
            lambda: all(
                any(e.get("artifact") == real.id for e in events_named(w, "prefetched"))
                for w in fleet.watchers
            ),
            30,  # 45 s of retries (30 x 3 s on two workers) before
            "every host prefetched the real build",
            fleet,
        )
        print(f"prefetched {time.monotonic() - t0:.1f} s after its event")
        for w in fleet.watchers:
            assert events_named(w, "prefetch_skipped"), w.name  # (gossip may drop some)


# --- 3. bad payloads ---------------------------------------------------------------------------

BAD_PAYLOADS: list[tuple[str, str | None, str]] = [
    ("deploy", '{"app": "web", "artifact": ', "not JSON"),
    ("deploy", '["web", "main-1"]', "JSON object"),
    ("deploy", '{"app": "web", "artifact": 5}', "JSON object of strings"),
    ("deploy", '{"app": "nope", "artifact": "main-12345678"}', "unknown app"),
    ("deploy", '{"app": "web", "artifactt": "main-12345678"}', "do not match"),
    ("deploy", '{"app": "web", "artifact": "main-1", "force": "yes"}', "do not match"),
    ("rollback", '{"app": "web", "artifact": "main-12345678"}', "do not match"),
    ("deploy", '{"app": "web", "artifact": "../../etc/passwd"}', "invalid artifact id"),
    ("build-finished", '{"app": "web", "artifact": "main 1"}', "invalid artifact id"),
    ("rollback", '{"app": "web", "release": "last-tuesday"}', "release"),
    ("deploy", '{"app": "web", "deploy": "$(reboot)"}', "invalid deploy id"),
    ("deploy", None, "empty payload"),
]


def wait_dropped(fleet: Fleet, event_ids: dict[str, str]) -> None:
    """Every watcher logged event_dropped, with the event ID and the expected reason."""

    def dropped(w: WatcherProc) -> dict[str, str]:
        return {e["event_id"]: str(e.get("error", "")) for e in events_named(w, "event_dropped")}

    wait_for(
        lambda: all(set(event_ids) <= set(dropped(w)) for w in fleet.watchers),
        20,
        "event_dropped for every bad event on every host",
        fleet,
    )
    for w in fleet.watchers:
        seen = dropped(w)
        for event_id, why in event_ids.items():
            assert why in seen[event_id], (w.name, event_id, seen[event_id], why)
        handled = {e.get("event_id") for e in events_named(w, "event_handled")}
        assert not handled & set(event_ids), (w.name, handled & set(event_ids))
        assert w.running(), f"{w.name} died"


class TestBadPayloads:
    def test_bad_payloads_are_logged_and_dropped_and_the_daemon_keeps_going(
        self, make_fleet: MakeFleet, consul_bin: str
    ) -> None:
        fleet = make_fleet()
        agent = fleet.cluster.hosts[1]
        fired = {fire(consul_bin, agent, name, body): why for name, body, why in BAD_PAYLOADS}
        wait_dropped(fleet, fired)
        assert fleet.inflight() is None
        assert history(fleet) == {}
        assert fleet.kv.kv_get(fleet.keys.events_seen) is None

        # A well-formed deploy of an artifact nobody published fails at once, on record.
        unknown = fire(consul_bin, agent, "deploy", '{"app":"web","artifact":"main-deadbeef"}')
        outcome = fleet.wait_outcome(unknown)
        assert outcome["result"] == "refused"
        assert "unknown artifact main-deadbeef" in outcome["reason"]
        assert fleet.inflight() is None
        # Readers trust the refusal: its records came in the request's own txn.
        view = store_of(fleet).view(unknown)
        assert view is not None and view.decision_index == view.create_index != 0, view
        shown = view.checked()
        assert shown.outcome is not None and shown.outcome.result == "refused", shown
        assert shown.distrusted == (), shown

        def says_why(w: WatcherProc) -> bool:  # every host logs the reason, not only the first
            # in the same words on every host (the writer said "unknown artifact" alone),
            # and as a warning: a refused event is something to look at
            return any(
                e.get("event") == "event_handled"
                and e.get("event_id") == unknown
                and e.get("result") == "refused: unknown artifact main-deadbeef"
                and e.get("level") == "warning"
                for e in w.log_events()
            )

        wait_for(
            lambda: all(says_why(w) for w in fleet.watchers),
            15,
            "every host logging why the deploy failed",
            fleet,
        )
        # A deploy id is a doorbell: nothing looks it up, and the log says so (it said
        # "woken" of an id no deploy has, as if that deploy had been acted on).
        bell = fire(consul_bin, agent, "deploy", '{"app":"web","deploy":"20261206T120000Z-ab12cd"}')

        def rang(w: WatcherProc) -> bool:
            return any(
                e.get("event") == "event_handled"
                and e.get("event_id") == bell
                and e.get("result") == DOORBELL
                for e in w.log_events()
            )

        wait_for(lambda: all(rang(w) for w in fleet.watchers), 15, "the doorbell logged", fleet)
        assert fleet.inflight() is None

        # The daemons kept running: a valid raw deploy still goes through.
        v1 = fleet.publish("v1")
        good = raw_deploy_ok(fleet, consul_bin, {"app": "web", "artifact": v1.id}, "deploy")
        assert {h["state"] for h in history(fleet)[good]["hosts"].values()} == {"live"}
        assert all(w.running() for w in fleet.watchers)
        # A release name pasted where the artifact goes: the refusal names the artifact.
        release = history(fleet)[good]["release"]
        pasted = fire(consul_bin, agent, "deploy", json.dumps({"app": "web", "artifact": release}))
        outcome = fleet.wait_outcome(pasted)
        assert outcome["result"] == "refused", outcome
        assert f"that is a release name; its artifact is {v1.id}" in outcome["reason"], outcome

    def test_oversized_payload_is_dropped(self, make_fleet: MakeFleet, consul_bin: str) -> None:
        # An otherwise valid deploy padded to just under what Consul still delivers: the
        # daemon's own limit must be below Consul's, or it can never apply.
        assert MAX_PAYLOAD < CONSUL_EVENT_LIMIT, (
            f"watcher.events.MAX_PAYLOAD={MAX_PAYLOAD} is above Consul's {CONSUL_EVENT_LIMIT}-"
            "byte user event limit: the daemon's size check can never trigger"
        )
        fleet = make_fleet()
        v1 = fleet.publish("v1")
        body = json.dumps({"app": "web", "artifact": v1.id})
        padded = body[:-1] + " " * (CONSUL_EVENT_LIMIT - 1 - len(body)) + "}"
        assert MAX_PAYLOAD < len(padded) < CONSUL_EVENT_LIMIT
        event_id = fire(consul_bin, fleet.cluster.hosts[0], "deploy", padded)
        wait_dropped(fleet, {event_id: f"over {MAX_PAYLOAD}"})
        assert fleet.inflight() is None and history(fleet) == {}


# --- 4. replays --------------------------------------------------------------------------------


class TestReplays:
    def test_host_with_wiped_state_does_not_replay_buffered_events(
        self, make_fleet: MakeFleet, consul_bin: str
    ) -> None:
        fleet = make_fleet()
        v1 = fleet.publish("v1")
        e1 = raw_deploy_ok(fleet, consul_bin, {"app": "web", "artifact": v1.id}, "deploy")
        rel1 = release_of(fleet, e1)

        w = fleet.watchers[2]
        w.stop()
        shutil.rmtree(w.state_dir)
        shutil.rmtree(w.app_dir / ".state", ignore_errors=True)
        # What earlier versions kept there, removed at start (HandledEvents).
        w.state_dir.mkdir()
        (w.state_dir / "events.json").write_text('{"version": 1, "ids": []}')
        # Its own agent still buffers the deploy event.
        _, buffered = fleet.kv.event_list()
        assert e1 in {e.id for e in buffered}
        mark = len(w.log_events())
        w.start()
        fleet.wait_members(3)

        def after_restart(event: str) -> list[dict[str, Any]]:
            return [e for e in w.log_events()[mark:] if e.get("event") == event]

        wait_for(lambda: bool(after_restart("events_primed")), 20, "events primed", fleet)
        assert after_restart("events_primed")[0]["buffered"] >= 1
        wait_for(
            lambda: any("idle" in str(e.get("outcome")) for e in after_restart("cycle")),
            20,
            "an idle cycle after the restart",
            fleet,
        )
        time.sleep(1.0)  # room for a (wrong) reaction to the buffered event
        assert not [e for e in after_restart("event_handled") if e.get("event_id") == e1]
        assert fleet.inflight() is None
        assert list(history(fleet)) == [e1]
        assert fleet.currents() == all_on(fleet, rel1)
        assert not (w.state_dir / "events.json").exists()

    def test_old_event_after_history_trim_starts_nothing(
        self, make_fleet: MakeFleet, consul_bin: str
    ) -> None:
        fleet = make_fleet(daemon_extra={"history_keep": 2})
        store = store_of(fleet)
        v1, v2, v3 = fleet.publish("v1"), fleet.publish("v2"), fleet.publish("v3")
        payload = {"app": "web", "artifact": v1.id}
        e1 = raw_deploy_ok(fleet, consul_bin, payload, "deploy")
        ltime = {e.id: e.ltime for e in fleet.kv.event_list()[1]}[e1]
        deploy_ok(fleet, v2.id)
        rel3 = deploy_ok(fleet, v3.id)
        assert e1 not in store.history() and store.deploy_record(e1) is None, "not trimmed"

        def replay(event_id: str, lt: int) -> str:
            return store.start_from_event(
                event_id=event_id,
                ltime=lt,
                kind="deploy",
                artifact_id=v1.id,
                release=None,
                by=fleet.watchers[1].name,
                prepare_timeout=60,
                apply_timeout=60,
                history_keep=2,
            )

        assert replay(e1, ltime) == "history"
        assert fleet.inflight() is None and store.deploy_record(e1) is None
        assert fleet.currents() == all_on(fleet, rel3)

        # The same payload fired again is a new event (new id, higher LTime): a new deploy.
        e4 = raw_deploy_ok(fleet, consul_bin, payload, "deploy")
        assert e4 != e1 and release_of(fleet, e4).endswith(v1.id)
        ltime4 = {e.id: e.ltime for e in fleet.kv.event_list()[1]}[e4]
        assert ltime4 > ltime
        assert replay(e4, ltime4) == "exists"
        assert replay(e1, ltime) == "history"
        assert fleet.inflight() is None
        assert store.history()[-1] == e4


# --- 5. abort racing the commit ----------------------------------------------------------------

CTL_SERVER = (
    "import sys\n"
    "from watcher.ctl import build_parser, main\n"
    "build_parser()\n"
    "print('armed', flush=True)\n"
    "argv = sys.stdin.readline().split()\n"
    "sys.exit(main(argv))\n"
)


class ArmedCtl:
    """A `watcherctl` process already started (imports done) waiting for its argv on stdin,
    so that the command itself runs within milliseconds of the trigger."""

    def __init__(self, w: WatcherProc) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CTL_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=w.env(),
        )
        self.config = str(w.config_path)

    def wait_armed(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "armed\n", self.proc.stderr

    def run(self, *args: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join([*args, "-c", self.config, "--json"]) + "\n")
        self.proc.stdin.flush()

    def result(self) -> tuple[int, Any, str]:
        out, err = self.proc.communicate(timeout=30)
        try:
            data = json.loads(out)
        except ValueError:
            data = None
        return self.proc.returncode, data, err


def wait_inflight(fleet: Fleet, timeout: float = 20.0) -> str:
    """The id of the deploy in flight, as soon as ``inflight`` shows one (blocking queries)."""
    end = time.monotonic() + timeout
    index = 0
    while time.monotonic() < end:
        index, entry = fleet.kv.kv_get_blocking(fleet.keys.inflight, index, 5.0)
        if entry is not None and entry.value:
            return entry.value.decode()
    raise AssertionError(f"no deploy in flight after {timeout}s")


def wait_all_ready(fleet: Fleet, deploy_id: str, timeout: float = 20.0) -> None:
    """Blocking queries on the acks (``progress/``) until every expected node acked ready."""
    expected = {w.name for w in fleet.watchers}
    prefix = fleet.keys.progress_prefix
    end = time.monotonic() + timeout
    index = 0
    while time.monotonic() < end:
        index, entries = fleet.kv.kv_list_blocking(prefix, index, 5.0)
        states = {
            e.key[len(prefix) :].split("/")[0]: json.loads(e.value or b"{}").get("state")
            for e in entries
            if e.key.endswith("/" + deploy_id)
        }
        if all(states.get(n) in (READY, "committed", "live") for n in expected):
            return
        if any(s not in (READY, "staging") for s in states.values()):
            return  # decided already: nothing left to race
    raise AssertionError(f"deploy {deploy_id}: not every node ready after {timeout}s")


def decisions_logged(fleet: Fleet, deploy_id: str) -> list[dict[str, Any]]:
    return [
        e
        for w in fleet.watchers
        for e in events_named(w, "deploy_decided")
        if e.get("deploy") == deploy_id
    ]


class TestAbortRace:
    ROUNDS = 15

    def test_abort_racing_the_commit_one_decision_every_host_follows(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        # Staging that takes a moment (0.3 s), as real ones do: with a prefetched artifact
        # and no hook, hosts are all ready ~70 ms after the deploy starts, sooner than an
        # abort command can land, and the race would never be run.
        staging = hook(tmp_path / "hooks" / "post-release", "sleep 0.3\n")
        fleet = make_fleet(app_extra={"hooks": {"post_release": staging}})
        store = store_of(fleet)
        rng = random.Random(20240605)
        seen: dict[str, int] = {"commit": 0, "abort": 0}
        ready_after: list[float] = []  # seconds from the deploy's start to the last ready
        results: dict[str, str] = {}
        odd = list(range(self.ROUNDS // 2))
        rng.shuffle(odd)

        def arm(i: int) -> tuple[ArmedCtl, ArmedCtl]:
            return ArmedCtl(fleet.watchers[0]), ArmedCtl(fleet.watchers[i % 3])

        armed = arm(0)
        for i in range(self.ROUNDS):
            artifact = fleet.publish(f"race-{i}")
            before, current_before = fleet.currents(), fleet_current(fleet)
            deployer, aborter = armed
            deployer.wait_armed()
            aborter.wait_armed()
            # Even rounds: abort the instant the last host is ready (what triggers the
            # coordinator too). Odd rounds: at delays spread from the deploy's start to past
            # the moment the hosts usually are all ready.
            typical = sorted(ready_after)[len(ready_after) // 2] if ready_after else 0.2
            delay = None
            if i % 2:
                step = odd.pop() / max(self.ROUNDS // 2 - 1, 1)
                delay = 1.5 * typical * step + rng.uniform(0.0, 0.02)
            deployer.run("deploy", "web", artifact.id, "--no-wait")
            deploy_id = wait_inflight(fleet)
            if delay is None:
                wait_all_ready(fleet, deploy_id)
            else:
                time.sleep(delay)
            aborter.run("abort", deploy_id, "--reason", f"race-{i}")
            code, answer, err = aborter.result()
            assert code in (0, 4) and answer, (code, answer, err)
            if i + 1 < self.ROUNDS:
                armed = arm(i + 1)  # their imports overlap this round's checks
            started_code, started, started_err = deployer.result()
            assert started_code == 0 and started, (started_code, started, started_err)
            assert started["deploy"] == deploy_id
            release = started["release"]

            outcome = fleet.wait_outcome(deploy_id)
            fleet.wait_idle()
            view = store.view(deploy_id)
            assert view is not None and view.decision is not None
            decision = view.decision
            seen[decision.outcome] += 1
            results[deploy_id] = outcome["result"]
            staged = [
                parse_iso(p.timings["staged_at"])
                for p in view.nodes.values()
                if "staged_at" in p.timings
            ]
            if len(staged) == len(fleet.watchers):
                ready_after.append(
                    (max(staged) - parse_iso(view.record.requested_at)).total_seconds()
                )
            where = f"round {i} (abort delay {delay}): {decision}, abort answered {answer}"
            logged = decisions_logged(fleet, deploy_id)
            if answer["aborted"]:
                assert code == 0, where
                assert decision.outcome == "abort" and f"race-{i}" in decision.reason, where
                # Hosts decide (layout 2): the host that vetoed it wrote the one record.
                assert [e["outcome"] for e in logged] == ["abort"], (where, logged)
            else:
                assert code == 4, where
                assert decision.outcome == "commit", where
                assert [e["outcome"] for e in logged] == ["commit"], (where, logged)
            states = {n: p.state for n, p in view.nodes.items()}
            if decision.outcome == "commit":
                assert outcome["result"] == "committed", (where, outcome)
                wait_for(
                    everyone_on(fleet, release),
                    10,
                    f"every host on {release} ({where})",
                    fleet,
                )
                assert set(states.values()) == {"live"}, (where, states)
                assert fleet_current(fleet) == release
            else:
                assert outcome["result"] == "aborted", (where, outcome)
                assert fleet.currents() == before, where
                assert fleet_current(fleet) == current_before, where
                assert "live" not in states.values(), (where, states)
                for w in fleet.watchers:
                    flips = [
                        e for e in events_named(w, "release_flipped") if e["release"] == release
                    ]
                    assert not flips, f"{w.name} flipped to aborted {release}: {where}"
        rows = history(fleet)
        assert {d: rows[d]["result"] for d in results} == results
        # Both sides of the race were exercised.
        assert seen["commit"] >= 1 and seen["abort"] >= 1, (seen, ready_after)

    def test_an_abort_stops_a_post_release_hook_still_running(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        # One host's post_release hook would run for a minute (its timeout is longer): the
        # abort ends the deploy at once, and the hook with it, not a minute later.
        marks = tmp_path / "marks"
        marks.mkdir()
        slow = hook(
            tmp_path / "hooks" / "post-release-slow",
            # Both pids are in place, whole, before child.pid appears (mv is atomic).
            f'echo $$ > "{marks}/hook.pid"\nsleep 120 &\n'
            f'echo $! > "{marks}/child.tmp"\nmv "{marks}/child.tmp" "{marks}/child.pid"\nwait\n',
        )
        timeouts = {"prepare": "60s", "apply": "60s", "hook": "90s"}
        fleet = make_fleet(hosts={1: {"hooks": {"post_release": slow}, "timeouts": timeouts}})
        slow_host = fleet.watchers[1]
        v1 = fleet.publish("v1")
        started = fleet.watchers[0].ctl_json("deploy", "web", v1.id, "--no-wait")
        deploy_id = started["deploy"]
        wait_for(lambda: (marks / "child.pid").exists(), 20, "the slow hook started", fleet)
        pids = [int((marks / n).read_text()) for n in ("hook.pid", "child.pid")]
        t0 = time.monotonic()
        answer = fleet.watchers[0].ctl_json("abort", deploy_id, "--reason", "wrong build")
        assert answer["aborted"], answer
        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "aborted", outcome
        # Asked again: said to be aborted already, by whom and why; nothing written.
        again = fleet.watchers[2].ctl("abort", deploy_id, as_json=False, check=False)
        assert again.returncode == 0, again.stderr
        assert f"deploy {deploy_id} was already aborted (by " in again.stdout, again.stdout
        assert "wrong build" in again.stdout and "nothing to do" in again.stdout, again.stdout
        assert f"(by {getpass.getuser()}@" in again.stdout, again.stdout  # who asked, not a host
        assert fleet.watchers[2].ctl_json("abort", deploy_id)["already"] is True
        # History says who asked and why (it named only the decision's reason, which is
        # another cause when one decided it first: a host gone; the CLI review).
        row = history(fleet)[deploy_id]
        assert row["abort_requested"]["reason"] == "wrong build", row
        assert row["abort_requested"]["by"].startswith(f"{getpass.getuser()}@"), row
        listed = fleet.watchers[2].ctl("history", "web", as_json=False).stdout
        assert f"abort requested by {getpass.getuser()}@" in listed, listed
        assert ": wrong build" in listed, listed

        def gone(pid: int) -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return True
            return state == "Z"

        wait_for(lambda: all(gone(p) for p in pids), 15, "the hook and its child stopped", fleet)
        assert time.monotonic() - t0 < 15
        fleet.wait_idle(timeout=20)
        stopped = [
            e for e in events_named(slow_host, "hook_cancelled") if e.get("phase") == "post_release"
        ]
        assert stopped, "the daemon did not say it stopped the hook"
        assert fleet.currents() == all_on(fleet, None)

    def test_a_dead_hosts_abort_does_not_wait_for_the_others_hooks(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """Every host runs a post_release hook that waits for a gate; host-3's watcher is
        killed meanwhile. Its session goes (about twice the TTL), the others see its member
        key go, establish the abort themselves and stop their hooks: the deploy used to
        stay undecided until the slowest hook ended (nobody else establishes while every
        live host is staging)."""
        marks, gate = tmp_path / "marks", tmp_path / "gate"
        marks.mkdir()
        gated = hook(
            tmp_path / "hooks" / "post-release-gated",
            f'touch "{marks}/$$"\n'
            f'for i in $(seq 1200); do [ -e "{gate}" ] && exit 0; sleep 0.1; done\n',
        )
        timeouts = {"prepare": "150s", "apply": "60s", "hook": "140s"}
        fleet = make_fleet(app_extra={"hooks": {"post_release": gated}, "timeouts": timeouts})
        v1 = fleet.publish("v1")
        started = fleet.watchers[0].ctl_json("deploy", "web", v1.id, "--no-wait")
        deploy_id = started["deploy"]
        wait_for(
            lambda: len(list(marks.iterdir())) == len(fleet.watchers),
            30,
            "every host in its post_release hook",
            fleet,
        )
        dead = fleet.watchers[2]
        dead.kill()
        t0 = time.monotonic()
        outcome = fleet.wait_outcome(deploy_id, timeout=60)  # the gate stays shut: 120 s
        took = time.monotonic() - t0
        assert outcome["result"] == "aborted", outcome
        assert dead.name in outcome["reason"] and "session" in outcome["reason"], outcome
        for w in fleet.watchers[:2]:  # its ack may come before the hook is reaped
            wait_for(
                lambda w=w: any(
                    e.get("phase") == "post_release" for e in events_named(w, "hook_cancelled")
                ),
                15,
                f"{w.name} stopped its hook",
                fleet,
            )
        gate.touch()
        fleet.wait_idle(timeout=30)
        assert fleet.currents() == all_on(fleet, None)
        print(f"aborted {took:.1f} s after the kill (session TTL {SESSION_TTL} s)")
        dead.start()
        fleet.wait_members(len(fleet.watchers))
        deploy_ok(fleet, fleet.publish("v2").id)  # the gate is open now

    def test_a_commit_with_a_host_that_died_after_its_ready_ack_is_not_reported_done(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """host-3 acks ready at once, its watcher is killed, the others finish later: the
        deploy commits (a ready ack is a yes, whoever dies after it) and host-3 stays on
        its old release until its watcher is back. `deploy` said "committed", exit 0."""
        gate = tmp_path / "gate"
        gated = hook(
            tmp_path / "hooks" / "post-release-gated",
            f'for i in $(seq 600); do [ -e "{gate}" ] && exit 0; sleep 0.1; done\nexit 1\n',
        )
        slow = {"hooks": {"post_release": gated}}
        fleet = make_fleet(hosts={0: slow, 1: slow})
        gate.touch()
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        gate.unlink()
        v2 = fleet.publish("v2")
        dead = fleet.watchers[2]
        proc = subprocess.Popen(
            [
                str(BIN / "watcherctl"),
                "deploy",
                "web",
                v2.id,
                "-c",
                str(fleet.watchers[0].config_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=fleet.watchers[0].env(),
        )
        wait_for(lambda: fleet.inflight() is not None, 20, "the deploy started", fleet)
        deploy_id = str(fleet.inflight())

        def dead_is_ready() -> bool:
            entry = fleet.kv.kv_get(fleet.keys.progress(deploy_id, dead.name))
            return entry is not None and json.loads(entry.value or b"{}").get("state") == READY

        wait_for(dead_is_ready, 20, "host-3 acked ready", fleet)
        dead.kill()
        gate.touch()
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 1, (out, err)
        assert f"{deploy_id}: committed" in out, out
        assert f"NOT LIVE: {dead.name}: acked ready but had not switched" in out, out
        row = history(fleet)[deploy_id]
        assert row["result"] == "committed" and row["not_live"] == [dead.name], row
        assert dead.current() == rel1
        not_live = fleet.watchers[0].ctl_json("status", "web", "--fleet")["web"]
        assert not_live["current_not_live"] == [dead.name], not_live
        # Once its session is gone the fleet's view says so, and what it may be: the status
        # review read "DOWN" with no reason for a watcher that ran, its token refused.
        wait_for(lambda: dead.name not in fleet.members(), 30, "host-3's session gone", fleet)
        text = fleet.watchers[0].ctl("status", "web", "--fleet", as_json=False, check=False)
        assert (
            f"  DOWN: {dead.name}: no Consul session (its watcher stopped or frozen, its "
            "Consul agent down or cut off, or its token refused: 'watcherctl status web' on "
            "that host, with its config, says which); its RELEASE and DEPLOY are what it last "
            "recorded"
        ) in text.stdout, text.stdout
        dead.start()
        fleet.wait_members(len(fleet.watchers))
        wait_for(everyone_on(fleet, release_of(fleet, deploy_id)), 30, "host-3 converged", fleet)
        # Back: it resumes the apply (or converges: its record says so) and is not listed.
        wait_for(
            lambda: (
                not fleet.watchers[0].ctl_json("status", "web", "--fleet")["web"][
                    "current_not_live"
                ]
            ),
            15,
            "host-3 no longer shown not live",
            fleet,
        )
        # History keeps what was so when it ended, whether host-3 resumed its apply (its
        # live ack written after the outcome) or converged (no ack): it lost host-3 once
        # its live ack came (here, a resumed apply: its ack says live).
        row = history(fleet)[deploy_id]
        assert row["hosts"][dead.name]["state"] == "live", row  # the case the index tells
        assert row["result"] == "committed" and row["not_live"] == [dead.name], row
        text = fleet.watchers[0].ctl("history", "web", as_json=False).stdout
        assert f"not live when it ended: {dead.name}" in text, text

    def test_status_fleet_names_the_new_release_while_validate_runs(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        """Every host's `validate` waits for a gate: the hosts have switched, and `status
        --fleet` says so (it showed the old release until each host's live ack)."""
        gate = tmp_path / "gate"
        gated = hook(
            tmp_path / "hooks" / "validate-gated",
            f'for i in $(seq 600); do [ -e "{gate}" ] && exit 0; sleep 0.1; done\nexit 1\n',
        )
        fleet = make_fleet(app_extra={"hooks": {"validate": gated}})
        gate.touch()
        deploy_ok(fleet, fleet.publish("v1").id)
        gate.unlink()
        started = fleet.watchers[0].ctl_json("deploy", "web", fleet.publish("v2").id, "--no-wait")
        release = started["release"]
        wait_for(everyone_on(fleet, release), 30, "every host switched", fleet)

        def rows() -> dict[str, Any]:
            return dict(fleet.watchers[0].ctl_json("status", "--fleet")["web"]["hosts"])

        wait_for(lambda: {r["release"] for r in rows().values()} == {release}, 10, "records", fleet)
        assert fleet.outcome(started["deploy"]) is None  # validate still waits
        # A local rollback now ran a second validate beside the deploy's, and the host
        # ended failed after commit (the operator review): refused while the watcher runs
        # its hooks after the switch; nothing changed.
        host = fleet.watchers[0]
        refused = host.ctl("rollback", "web", "--local", check=False, as_json=False)
        assert refused.returncode == 4, (refused.stdout, refused.stderr)
        assert "its watcher is running the hooks after the switch" in refused.stderr
        assert host.current() == release
        assert host.ctl_json("status", "web")["apps"]["web"]["hold"] is None
        gate.touch()
        assert fleet.wait_outcome(started["deploy"])["result"] == "committed"
        assert {h["state"] for h in history(fleet)[started["deploy"]]["hosts"].values()} == {"live"}
        # Once live, it goes through.
        back = host.ctl_json("rollback", "web", "--local")
        assert back["flipped"] is True and back["to"] != release, back


def silent_member(fleet: Fleet) -> str:
    """Member key ``silent-1`` held by a TTL-only session with no daemon behind it (what a
    host's token alone can make); returns the session."""
    name = watcher_session_name("silent-1", fleet.kv_prefix)
    session = fleet.kv.session_create(name, 60, checks=[])
    member = fleet.keys.member("silent-1")
    assert fleet.kv.kv_put(member, b'{"version": 2, "node": "silent-1"}', acquire=session)
    return session


def start_dated(
    fleet: Fleet, artifact: ArtifactRecord, expected: dict[str, str], ago: timedelta
) -> DeployRecord:
    """A deploy request made ``ago`` by the requester's clock (60 s to prepare, 60 to
    apply), written with `inflight` as `watcherctl deploy` writes them."""
    when = utcnow() - ago
    return start_deploy(store_of(fleet), new_deploy_id(), expected, artifact, now=when).request


class TestExpired:
    def test_a_member_that_never_acks_is_ended_past_the_apply_deadline_by_a_bystander(
        self, make_fleet: MakeFleet
    ) -> None:
        """A member key held by a session with no daemon behind it (a host's token alone
        can make one) never acks: the ready hosts stay undecided, and past the request's
        apply deadline a host that is not expected ends the deploy as expired, once
        (outcome, history, `inflight` cleared); nobody flips."""
        fleet = make_fleet(app_extra={"timeouts": {"prepare": 3, "apply": 6}})
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        bystander = fleet.watchers[2]
        bystander.stop()
        fleet.wait_members(2)
        session = silent_member(fleet)
        try:
            v2 = fleet.publish("v2")
            started = fleet.watchers[0].ctl_json(
                "deploy", "web", v2.id, "--allow-missing", "--no-wait"
            )
            deploy_id = started["deploy"]
            bystander.start()
            outcome = fleet.wait_outcome(deploy_id, timeout=40)
            assert (outcome["result"], outcome["by"]) == ("expired", bystander.name), outcome
            fleet.wait_idle(timeout=20)
            assert store_of(fleet).history().count(deploy_id) == 1
            row = history(fleet)[deploy_id]
            assert (row["result"], row["distrusted"]) == ("expired", []), row
            assert fleet.currents() == all_on(fleet, rel1)
            ended = [e for w in fleet.watchers for e in events_named(w, "deploy_ended")]
            assert [e["deploy"] for e in ended].count(deploy_id) == 1, ended
        finally:
            fleet.kv.session_destroy(session)

    def test_an_abort_only_the_sessions_show_is_reported_as_the_end(
        self, make_fleet: MakeFleet
    ) -> None:
        """The only expected member's session goes before it acked: no ack shows the abort,
        the host that ends it (not expected) establishes it on the session clause, and
        `history` must report "aborted" (its reader reads the sessions as hosts do), not a
        record it cannot trust."""
        fleet = make_fleet(app_extra={"timeouts": {"prepare": 3, "apply": 6}})
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        for w in fleet.watchers:
            w.stop()
        fleet.wait_members(0)
        session = silent_member(fleet)
        v2 = fleet.publish("v2")
        started = fleet.watchers[0].ctl_json("deploy", "web", v2.id, "--allow-missing", "--no-wait")
        deploy_id = started["deploy"]
        record = store_of(fleet).deploy_record(deploy_id)
        assert record is not None and record.expected == ["silent-1"], record
        fleet.kv.session_destroy(session)
        fleet.watchers[1].start()
        outcome = fleet.wait_outcome(deploy_id, timeout=40)
        assert outcome["result"] == "aborted", outcome
        row = fleet.watchers[1].ctl_json("history", "web")[0]
        assert row["deploy"] == deploy_id, row
        assert (row["result"], row["distrusted"]) == ("aborted", []), row
        assert "lost the session" in row["decision"]["reason"], row
        fleet.start()
        fleet.wait_idle()
        assert fleet.currents() == all_on(fleet, rel1)

    def test_a_requester_clock_behind_is_named_in_the_hosts_no(self, make_fleet: MakeFleet) -> None:
        """A requester whose clock is 200 s behind the hosts' writes a request whose
        prepare deadline (60 s) has passed by theirs: every host acked "prepare deadline
        passed before this host was ready" and nothing said why (the operator review).
        The no now names both times and the causes that look alike."""
        fleet = make_fleet()
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        members = {n: e.session or "" for n, e in store_of(fleet).members(consistent=True).items()}
        record = start_dated(fleet, fleet.publish("v2"), members, timedelta(seconds=200))
        assert fleet.wait_outcome(record.id)["result"] == "aborted"
        for w in fleet.watchers:
            entry = fleet.kv.kv_get(fleet.keys.progress(record.id, w.name))
            ack = json.loads(entry.value if entry and entry.value else b"{}")
            assert ack.get("state") == "failed", (w.name, ack)
            error = ack.get("error", "")
            assert error.startswith("prepare deadline passed before this host was ready; "), ack
            assert "s after its requested_at " + record.requested_at in error, error
            assert "one of the two clocks is off" in error, error
        fleet.wait_idle()
        assert fleet.currents() == all_on(fleet, rel1)

    def test_end_sessions_ends_a_stalled_member_named_other_than_its_agent(
        self, make_fleet: MakeFleet
    ) -> None:
        """A member whose `node` setting is not its agent's name (documented as allowed)
        holds its member key with a session on the agent's node. STALLED, the only way out
        is `abort --end-sessions`, which refused it as another node's session. It holds
        that member key and no other: ended now, and the deploy aborts."""
        fleet = make_fleet()
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        for w in fleet.watchers:
            w.stop()
        fleet.wait_members(0)
        session = silent_member(fleet)
        agent_node = (fleet.kv.session_info(session) or {}).get("Node")
        assert agent_node and agent_node != "silent-1"
        # A request made 10 minutes ago: its deadlines long past, stalled at once.
        record = start_dated(
            fleet, fleet.publish("v2"), {"silent-1": session}, timedelta(minutes=10)
        )
        shown = fleet.watchers[0].ctl("status", "web", "--fleet", check=False)
        status = json.loads(shown.stdout)
        assert status["web"]["deploy"]["stalled"] == {"silent-1": session}, status
        result = fleet.watchers[0].ctl("abort", "web", record.id, "--end-sessions", check=False)
        assert result.returncode == 0, (result.stdout, result.stderr)
        said = json.loads(result.stdout)
        assert said["ended_sessions"] == {"silent-1": session}, said
        assert fleet.kv.session_info(session) is None
        # No watcher runs to decide it yet; the first that starts does (the session clause).
        fleet.start()
        assert fleet.wait_outcome(record.id)["result"] == "aborted"
        fleet.wait_idle()
        assert fleet.currents() == all_on(fleet, rel1)


# --- 6. holds ----------------------------------------------------------------------------------


class TestHold:
    def test_deploy_and_rollback_read_thehost_records_once(
        self, make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The known-host check and the held-host warning share one read of `hosts/`: the
        command's reads come before the deploy record, in every deploy's latency."""
        fleet = make_fleet()
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        deploy_ok(fleet, v1.id)
        w = fleet.watchers[0]
        for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
            monkeypatch.delenv(var, raising=False)
        reads: list[str] = []
        real = DeployStore.hosts

        def counted(store: DeployStore) -> dict[str, Any]:
            reads.append(store.app)
            return real(store)

        monkeypatch.setattr(DeployStore, "hosts", counted)
        config = ["-c", str(w.config_path), "--json"]
        for argv in (["deploy", "web", v2.id], ["rollback", "web"]):
            reads.clear()
            assert ctl_main([*argv, *config]) == 0, argv
            assert reads == ["web"], (argv, reads)
            fleet.wait_idle()

    def test_a_hold_reaches_the_host_record_at_once_not_at_the_idle_tick(
        self, make_fleet: MakeFleet
    ) -> None:
        """`deploy` warns of a hold it reads in the host records, and `status --fleet` shows
        it: `hold` tells the running watcher (SIGUSR1), which writes its record now rather
        than at its next idle tick (TICK_IDLE, 15 s), and so does `release-hold`."""
        fleet = make_fleet()
        w = fleet.watchers[1]
        deploy_ok(fleet, fleet.publish("v1").id)
        fleet.wait_idle()
        pid = w.proc.pid
        placed = w.ctl_json("hold", "web", "--reason", "disk check")
        assert placed["watcher_told"] is True
        bound = TICK_IDLE / 3  # the tick would take up to 15 s

        def record_hold() -> str:
            return store_of(fleet).hosts()[w.name].hold

        wait_for(lambda: record_hold().startswith("disk check (by "), bound, "hold shown", fleet)
        released = w.ctl("release-hold", "web", as_json=False).stdout
        assert "told the running watcher" in released, released
        wait_for(lambda: record_hold() == "", bound, "hold gone from the record", fleet)
        assert w.proc.pid == pid and w.proc.poll() is None  # SIGUSR1 ended nothing
        assert len(w.log_events("woken_by_signal")) == 2
        # with no watcher running, `hold` still holds, and says that nobody was told
        w.stop()
        alone = w.ctl("hold", "web", "--reason", "later", as_json=False).stdout
        assert "no running watcher here could be told" in alone, alone
        assert w.ctl_json("release-hold", "web")["released"]["reason"] == "later"

    def test_held_host_aborts_the_deploy_and_hold_is_refused_while_ready_undecided(
        self, make_fleet: MakeFleet, tmp_path: Path
    ) -> None:
        flag, gate = tmp_path / "slow", tmp_path / "gate"
        slow = hook(  # with the flag, it waits for the gate: the window the checks below need
            tmp_path / "hooks" / "post-release-slow",
            f'if [ -e "{flag}" ]; then\n'
            f'  for i in $(seq 600); do [ -e "{gate}" ] && exit 0; sleep 0.1; done\n'
            "fi\n",
        )
        fleet = make_fleet(hosts={2: {"hooks": {"post_release": slow}}})
        held, slow_host = fleet.watchers[1], fleet.watchers[2]
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        rel1 = deploy_ok(fleet, v1.id)

        placed = held.ctl_json("hold", "web", "--reason", "disk maintenance")
        assert placed["hold"]["reason"] == "disk maintenance"
        wait_for(
            lambda: store_of(fleet).hosts()[held.name].hold.startswith("disk maintenance (by "),
            20,
            "the host record shows the hold",
            fleet,
        )
        result = fleet.watchers[0].ctl("deploy", "web", v2.id, check=False)
        assert result.returncode == 1, result
        # warned before it started: the held host refuses its part
        assert f"held, by their last records: {held.name}: disk maintenance (by " in result.stderr
        # to run on the held host: not with the -c of the host that deployed
        assert "(`watcherctl release-hold web` on the host lifts it)" in result.stderr
        # Run on another host, `release-hold` says where the hold is (it said "not held on
        # this host" only).
        wrong = fleet.watchers[0].ctl("release-hold", "web", as_json=False).stdout
        assert wrong.startswith(
            f"web was not held on this host; held, by their host records, on {held.name}: "
            "disk maintenance (by "
        ), wrong
        assert wrong.rstrip().endswith("(run it there)"), wrong
        summary = json.loads(result.stdout)
        assert summary["result"] == "aborted"
        assert held.name in summary["reason"] and "held" in summary["reason"], summary
        assert summary["hosts"][held.name]["state"] == "refused"
        fleet.wait_idle()
        assert fleet.currents() == all_on(fleet, rel1)
        # `history` names the host that said no and why, as for a failed one.
        text = held.ctl("history", "web", as_json=False).stdout
        assert f"node {held.name} refused: " in text and "held" in text, text
        status = held.ctl_json("status")
        assert status["apps"]["web"]["hold"]["reason"] == "disk maintenance"
        held.ctl_json("release-hold", "web")

        # Ready in an undecided deploy: `hold` is refused (exit 4), nothing is placed.
        flag.touch()
        started = fleet.watchers[0].ctl_json("deploy", "web", v2.id, "--resume", "--no-wait")
        deploy_id = started["deploy"]
        store = store_of(fleet)

        def host_ready() -> bool:
            view = store.view(deploy_id)
            mine = view.nodes.get(held.name) if view else None
            return bool(mine and mine.state == READY and view and view.decision is None)

        wait_for(host_ready, 20, f"{held.name} ready, deploy undecided", fleet)
        refused = held.ctl("hold", "web", "--reason", "too late", check=False)
        assert refused.returncode == 4, refused
        assert deploy_id in refused.stderr and "not decided" in refused.stderr
        here = held.ctl_json("status")["apps"]["web"]
        assert here["hold"] is None
        assert here["deploy"]["id"] == deploy_id and here["deploy"]["this_host"] == READY
        assert here["deploy"]["decision"] is None
        fleet_view = held.ctl_json("status", "--fleet")["web"]
        assert fleet_view["deploy"]["id"] == deploy_id
        assert fleet_view["hosts"][held.name]["deploy_state"] == READY
        assert fleet_view["hosts"][slow_host.name]["deploy_state"] == "staging"
        gate.touch()

        outcome = fleet.wait_outcome(deploy_id)
        assert outcome["result"] == "committed", outcome
        fleet.wait_idle()
        rel2 = release_of(fleet, deploy_id)
        assert rel2 == summary["release"], "a resume reuses the release name"
        # The last deploy of v2 committed: nothing to resume, and the refusal says why.
        again = fleet.watchers[0].ctl("deploy", "web", v2.id, "--resume", check=False)
        assert again.returncode == 4, again
        assert f"(deploy {deploy_id}) ended committed, not aborted" in again.stderr, again.stderr
        assert fleet.currents() == all_on(fleet, rel2)
        # Once decided, a hold is allowed again.
        assert held.ctl_json("hold", "web")["hold"] is not None
        held.ctl_json("release-hold", "web")


# --- 7. status -------------------------------------------------------------------------------


class TestPruneBlocked:
    def test_status_says_why_old_releases_stay(self, make_fleet: MakeFleet) -> None:
        # A daemon without CAP_SYS_PTRACE (a container that lacks it) cannot read the /proc
        # entries of a process with more capabilities (this test's own, root's): its prune
        # removes nothing, which `status` and the metric must say, not only the log.
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv(1) (util-linux) is needed"
        assert os.geteuid() == 0, "the suite runs as root"
        # /metrics on a port each daemon picks
        fleet = make_fleet(app_extra={"keep_releases": 1}, daemon_extra={"listen": "127.0.0.1:0"})
        w = fleet.watchers[1]
        w.stop()
        w.prefix = (setpriv, "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace", "--")
        w.start()
        fleet.wait_members(len(fleet.watchers))
        releases = [deploy_ok(fleet, fleet.publish(f"v{i}").id) for i in range(3)]

        def says_blocked() -> None:
            local = w.ctl_json("status")["apps"]["web"]
            blocked = local["daemon"]["prune_blocked"]
            assert "cannot read /proc entries of pid" in blocked, local
            assert "1 old release(s) kept that would go" in blocked, blocked
            assert releases[0] in local["staged"]  # the one that would have gone
            human = w.ctl("status", as_json=False).stdout
            assert "  prune       BLOCKED: cannot read /proc entries of pid" in human, human
            assert "to unblock: prune must read every process's /proc entries" in human, human
            assert f"`watcherctl prune web -c {w.config_path}` as root" in human, human
            text = metrics_text(w.health_port())
            assert 'watcher_prune_blocked{app="web"} 1.0' in text, text
            said = w.log_events("prune_blocked")  # the log line says what to do, too
            assert said and "give the watcher CAP_SYS_PTRACE" in said[-1]["remedy"], said

        # deploy_ok returns once the deploy ended and every host is on the release; host-2's
        # prune runs after its own live ack (the end may come first), and status.json says
        # what it found at the loop's next write: wait for that before looking at it all.
        def blocked_now() -> str:
            daemon = w.ctl_json("status")["apps"]["web"].get("daemon") or {}
            return str(daemon.get("prune_blocked") or "")

        wait_for(
            lambda: "1 old release(s) kept that would go" in blocked_now(),
            30,
            "status.json says the prune after the last deploy was blocked",
            fleet,
        )
        says_blocked()
        # A restarted daemon says so before any deploy: the releases still pile up.
        w.stop()
        w.start()
        fleet.wait_members(len(fleet.watchers))
        wait_for(lambda: w.ctl_json("status")["daemon"].get("running"), 20, "status.json", fleet)
        says_blocked()


class TestLiveTreeRemovedByHand:
    """The tree `current` names, removed or emptied by hand: the host served nothing,
    `status` said all was well, and every later deploy aborted on that host (its backup of
    the live release was refused)."""

    def test_status_says_so_and_the_watcher_stages_it_again(self, make_fleet: MakeFleet) -> None:
        fleet = make_fleet()
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        w = fleet.watchers[2]
        w.stop()
        shutil.rmtree(w.app_dir / "releases" / rel1)
        stopped = w.ctl("status", check=False)
        local = json.loads(stopped.stdout)["apps"]["web"]
        assert local["current"] == rel1 and "does not exist" in local["current_problem"], local
        human = w.ctl("status", as_json=False, check=False).stdout
        assert "BROKEN:" in human and "does not exist" in human, human
        w.start()
        fleet.wait_members(len(fleet.watchers))
        index = w.app_dir / "current" / "index.html"
        wait_for(index.exists, 30, "host-3's live tree staged again", fleet)
        assert w.current() == rel1
        assert w.log_events("live_release_broken"), w.log_text()[-3000:]
        healthy = w.ctl("status")  # exit 0 again
        assert json.loads(healthy.stdout)["apps"]["web"]["current_problem"] is None

        # Emptied while the watcher runs: found at the latest at the idle tick.
        (w.app_dir / "releases" / rel1 / ".watcher" / "release.json").unlink()
        wait_for(
            lambda: (w.app_dir / "releases" / rel1 / ".watcher" / "release.json").exists(),
            TICK_IDLE + 30,
            "host-3's emptied live tree staged again",
            fleet,
        )
        assert w.current() == rel1
        deploy_ok(fleet, fleet.publish("v2").id)

    def test_at_start_a_held_host_stays_and_none_goes_back_to_previous(
        self, make_fleet: MakeFleet
    ) -> None:
        """The operator review: removed while the watcher was stopped, with a `previous` on
        disk, its start pointed `current` back at that older release, held or not: the
        fleet split, and `status` said exit 0."""
        fleet = make_fleet()
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        rel2 = deploy_ok(fleet, fleet.publish("v2").id)
        w = fleet.watchers[2]
        w.ctl("hold", "web", "--reason", "debugging")
        w.stop()
        shutil.rmtree(w.app_dir / "releases" / rel2)
        w.start()
        fleet.wait_members(len(fleet.watchers))
        wait_for(
            lambda: json.loads(w.ctl("status", check=False).stdout)["daemon"].get("running"),
            20,
            "status.json",
            fleet,
        )
        status = w.ctl("status", check=False)
        assert status.returncode == 1, status
        local = json.loads(status.stdout)["apps"]["web"]
        assert local["current"] == rel2 and "does not exist" in local["current_problem"], local
        assert local["previous"] == rel1
        time.sleep(2)  # a few reconciles: still where it was, held
        assert w.current() == rel2 and not (w.app_dir / "current" / "index.html").exists()
        assert not w.log_events("release_flipped", this_start=True), w.log_text()[-3000:]
        # Every host's `status --fleet` says so (it showed host-3 on the fleet's release,
        # exit 0, while it served nothing).
        shown = fleet.watchers[0].ctl("status", "--fleet", as_json=False, check=False)
        assert shown.returncode == 1, shown
        assert (
            f"  BROKEN on {w.name}: live release {rel2} is not complete here: "
            f"{w.app_dir / 'releases' / rel2} does not exist (it serves nothing;"
        ) in shown.stdout, shown.stdout
        w.ctl("release-hold", "web")
        index = w.app_dir / "current" / "index.html"
        wait_for(index.exists, TICK_IDLE + 30, "host-3's live tree staged again", fleet)
        assert w.current() == rel2 and index.read_text() == "<h1>v2</h1>\n"
        wait_for(
            lambda: fleet.watchers[0].ctl("status", "--fleet", check=False).returncode == 0,
            20,
            "the record says it serves again (exit 0)",
            fleet,
        )
        # Not held: the same at start, without waiting for a hold's release.
        w.stop()
        shutil.rmtree(w.app_dir / "releases" / rel2)
        w.start()
        wait_for(index.exists, 30, "host-3's live tree staged again at start", fleet)
        assert w.current() == rel2
        # `current` already names it: the tree is served from its rename into place, a
        # moment before the flip's own rename is done and logged (a CI run read the log in
        # between).
        wait_for(lambda: w.log_events("release_flipped", this_start=True), 10, "the flip", fleet)
        flips = w.log_events("release_flipped", this_start=True)
        assert [f.get("release") for f in flips] == [rel2], flips

    def test_a_deploy_started_on_a_broken_live_tree_commits(self, make_fleet: MakeFleet) -> None:
        fleet = make_fleet()
        rel1 = deploy_ok(fleet, fleet.publish("v1").id)
        v2 = fleet.publish("v2")
        w = fleet.watchers[2]
        # Right before the deploy (the idle tick, up to 15 s away, would stage it again):
        # the deploy itself repairs this host.
        shutil.rmtree(w.app_dir / "releases" / rel1)
        rel2 = deploy_ok(fleet, v2.id)
        assert w.current() == rel2 and (w.app_dir / "current" / "index.html").exists()
        assert not (w.app_dir / "current_backup").exists()


class TestStatus:
    # How fast status answers is measured in bench/bench_deploy.py (20 hosts), not here.
    def test_status_and_fleet_status_are_right(self, make_fleet: MakeFleet) -> None:
        fleet = make_fleet()
        v1, v2 = fleet.publish("v1"), fleet.publish("v2")
        rel1 = deploy_ok(fleet, v1.id)
        rel2 = deploy_ok(fleet, v2.id)
        w = fleet.watchers[1]

        # An abort of a committed deploy: refused on stderr (exit 4), nothing written.
        history = fleet.kv.kv_get(fleet.keys.history)
        assert history is not None
        done = json.loads(history.value or b"{}")["deploys"][-1]
        late = w.ctl("abort", done, "--reason", "late", as_json=False, check=False)
        assert late.returncode == 4 and late.stdout == "", late
        assert f"deploy {done} is committed: too late to abort" in late.stderr
        assert fleet.kv.kv_get(fleet.keys.abort_request(done)) is None

        local = w.ctl_json("status")
        assert local["node"] == w.name
        assert local["daemon"]["running"] is True
        assert local["consul"]["reachable"] is True
        web = local["apps"]["web"]
        assert web["current"] == rel2 and web["previous"] == rel1
        assert web["fleet_current"] == rel2
        assert {rel1, rel2} <= set(web["staged"])
        assert web["hold"] is None and web["deploy"] is None

        wait_for(
            lambda: all(
                h["release"] == rel2
                for h in w.ctl_json("status", "--fleet")["web"]["hosts"].values()
            ),
            10,
            "host records on rel2",
            fleet,
        )
        whole = w.ctl_json("status", "--fleet")
        app = whole["web"]
        assert app["current"] == rel2 and app["previous"] == rel1 and app["deploy"] is None
        assert sorted(app["hosts"]) == sorted(x.name for x in fleet.watchers)
        for row in app["hosts"].values():
            assert row["member"] is True and row["on_fleet_release"] is True
            assert row["last_seen"]

        # A stopped watcher: its own status says so, and the fleet shows it down.
        down = fleet.watchers[2]
        down.stop()
        stopped = down.ctl("status", check=False)
        assert stopped.returncode == 3, stopped  # a monitoring check must not read "ok"
        local = json.loads(stopped.stdout)
        assert local["daemon"]["running"] is False
        assert local["apps"]["web"]["current"] == rel2
        rows = w.ctl_json("status", "--fleet")["web"]["hosts"]
        assert rows[down.name]["member"] is False and rows[down.name]["release"] == rel2
        assert all(rows[x.name]["member"] for x in fleet.watchers[:2])

        # A host rolled back alone (and so held): the table marks it off the fleet's release
        # and held, where the JSON says on_fleet_release false and its hold.
        alone = fleet.watchers[0]
        alone.ctl("rollback", "web", "--local", as_json=False)

        def alone_row() -> dict[str, Any]:
            return dict(w.ctl_json("status", "--fleet")["web"]["hosts"][alone.name])

        wait_for(lambda: alone_row()["release"] == rel1 and alone_row()["hold"], 15, "held", fleet)
        text = w.ctl("status", "--fleet", as_json=False).stdout
        row = next(line for line in text.splitlines() if line.startswith(alone.name + " "))
        assert f"{rel1} *" in row and "alive, held" in row, text
        others = [line for line in text.splitlines() if line.startswith(w.name + " ")]
        assert others and " *" not in others[0] and "held" not in others[0], text
        assert "  * not on the fleet's release" in text
