"""Issue 9's fault tests: the acks stay the decision through faults and forged input.

A real 3-host cluster, ACLs off (as in the demo, where any client may write any key), real
`watcher run` processes steered through their hooks (the Rig of test_deploy_faults):
- the Consul server restarted mid-prepare, deploy after deploy: each is decided within
  seconds, none waits for its prepare deadline, every host ends on one release;
- a watcher SIGKILLed mid-deploy and restarted with its session kept, or with its state
  wiped: the deploy ends the same way on every host, and no host runs a release the acks
  did not commit;
- a forged commit decision and a forged ``current`` are reported, never obeyed;
- decisions, requests, pins and acks that do not parse, or name another app, another
  release or an unknown node: reported, never obeyed, and the daemons keep working.
"""

# ruff: noqa: F811  (the shared rig fixture is imported, then named as a parameter)
from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# The rig fixture and its helpers are shared with test_deploy_faults.
from tests.integration.test_deploy_faults import Rig, baseline, rig  # noqa: F401
from tests.support.cluster import ClusterSpec
from tests.support.fleet import WatcherProc, wait_for
from watcher.consul_api import TxnOp
from watcher.errors import ConsulError
from watcher.records import (
    ABORTED,
    COMMIT,
    FAILED,
    LIVE,
    REFUSED,
    ArtifactRecord,
    CurrentRecord,
    Decision,
    DeployRecord,
    NodeProgress,
    PinRecord,
    iso,
    utcnow,
)

CLUSTER = ClusterSpec(hosts=3)

#: The rig's prepare timeout is 60 s. A deploy decided well inside this did not wait for it.
DECIDED_WITHIN = 20.0


# --- helpers -------------------------------------------------------------------------------


def events(w: WatcherProc, name: str) -> list[dict[str, Any]]:
    return w.log_events(name)


def no_crash(rig: Rig) -> None:
    """Every daemon still runs and none of its tasks died of an exception."""
    for w in rig.watchers:
        assert w.running(), f"{w.name} exited\n{rig.fleet.logs()}"
        text = w.log_text()
        for bad in ("task_crashed", "task_failed", "Traceback"):
            assert bad not in text, f"{w.name}: {bad} in its log\n{rig.fleet.logs()}"


def next_deploy_works(rig: Rig, version: str) -> str:
    record = rig.fleet.publish(version)
    result = rig.watchers[0].ctl_json("deploy", "web", record.id)
    assert result["result"] == "committed", result
    rig.fleet.wait_idle()
    release = str(result["release"])
    assert rig.fleet.currents() == {w.name: release for w in rig.watchers}
    return release


def sessions(rig: Rig) -> dict[str, str]:
    return {n: e.session or "" for n, e in rig.store.members().items()}


def request_for(
    rig: Rig,
    deploy_id: str,
    artifact: ArtifactRecord,
    *,
    expected: dict[str, str] | None = None,
    release: str | None = None,
) -> DeployRecord:
    return rig.store.new_record(
        deploy_id=deploy_id,
        kind="deploy",
        artifact=artifact,
        release=release,
        requested_by="tests",
        expected=expected if expected is not None else sessions(rig),
        prepare_timeout=60,
        apply_timeout=60,
    )


def start_raw(rig: Rig, deploy_id: str, body: bytes) -> None:
    """What an operator's raw KV writes can do: ``inflight`` and a request, one txn."""
    keys = rig.fleet.keys
    ok = rig.fleet.kv.txn(
        [
            TxnOp.cas(keys.inflight, deploy_id.encode(), 0),
            TxnOp.cas(keys.request(deploy_id), body, 0),
        ]
    ).ok
    assert ok, "could not start the raw deploy"


@contextlib.contextmanager
def session_renewed(rig: Rig, session: str) -> Iterator[None]:
    """Renew ``session`` every 0.5 s for as long as the block runs."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.is_set():
            with contextlib.suppress(ConsulError):
                rig.fleet.kv.session_renew(session)
            stop.wait(0.5)

    renewer = threading.Thread(target=renew, name="session-renewer", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(10)


def final_states(rig: Rig, deploy_id: str) -> dict[str, str]:
    return rig.states(deploy_id)


def seen_releases(rig: Rig) -> set[str]:
    out: set[str] = set()
    for releases in rig.monitor.seen.values():
        out |= releases
    return out


# --- the Consul server restarted mid-prepare -----------------------------------------------


class TestServerRestart:
    def test_every_deploy_is_decided_in_seconds(self, rig: Rig) -> None:
        """Four deploys, each with a server restart while the hosts are staging."""
        fleet, cluster = rig.fleet, rig.cluster
        release1 = baseline(rig)
        allowed = {release1}
        figures: list[str] = []
        modes = (
            "all staging",
            "one host ready",
            "acks racing the restart",
            "acks while the server is down",
        )
        for n, mode in enumerate(modes):
            record = fleet.publish(f"restart-{n}")
            rig.hold(*rig.watchers)
            deploy_id, release = rig.deploy(rig.watchers[0], record)
            rig.wait_hook_started(rig.watchers, deploy_id)
            if mode == "one host ready":
                rig.release(rig.watchers[1])
                rig.wait_states(deploy_id, [rig.watchers[1]], "ready")
            elif mode == "acks racing the restart":
                rig.release(*rig.watchers)
            t0 = time.monotonic()
            if mode == "acks while the server is down":
                cluster.stop(cluster.server)
                rig.release(*rig.watchers)
                time.sleep(1.0)  # the hooks finish; the ready acks meet no server
                cluster.start(cluster.server)
            else:
                cluster.restart(cluster.server)
            back = time.monotonic()
            rig.release(*rig.watchers)
            outcome = fleet.wait_outcome(deploy_id, 60)
            took = time.monotonic() - back
            fleet.wait_idle(30)
            figures.append(
                f"{mode}: server down+up {back - t0:.1f}s, outcome {outcome['result']} "
                f"{took:.1f}s after the server was back"
            )
            assert took < DECIDED_WITHIN, f"{mode}: decided after {took:.1f}s: {outcome}"
            assert "deadline" not in outcome.get("reason", ""), outcome
            currents = set(fleet.currents().values())
            assert len(currents) == 1, f"{mode}: split fleet {fleet.currents()}"
            if outcome["result"] == "committed":
                allowed.add(release)
                assert currents == {release}, (mode, fleet.currents())
                assert set(final_states(rig, deploy_id).values()) == {LIVE}
            else:
                assert outcome["result"] == "aborted", outcome
                assert release not in currents, (mode, fleet.currents())
        print("\nserver restarts mid-prepare:\n  " + "\n  ".join(figures))
        assert seen_releases(rig) <= allowed, f"uncommitted release seen: {rig.monitor.seen}"
        no_crash(rig)
        next_deploy_works(rig, "after-restarts")


# --- a watcher SIGKILLed and restarted --------------------------------------------------------


def wipe_state(w: WatcherProc) -> None:
    """What a lost disk or a careless operator leaves: no session, no journal, no holds."""
    shutil.rmtree(w.state_dir, ignore_errors=True)
    shutil.rmtree(w.app_dir / ".state", ignore_errors=True)


class TestWatcherKilled:
    @pytest.mark.parametrize(
        ("case", "expected"),
        [
            ("staging, session kept", "committed"),
            ("staging, state wiped", "aborted"),
            ("ready, state wiped", "committed"),
        ],
    )
    def test_the_deploy_ends_the_same_way_on_every_host(
        self, rig: Rig, case: str, expected: str
    ) -> None:
        fleet = rig.fleet
        release1 = baseline(rig)
        record = fleet.publish("v2")
        rig.hold(*rig.watchers)
        deploy_id, release = rig.deploy(rig.watchers[0], record)
        rig.wait_hook_started(rig.watchers, deploy_id)
        victim = rig.watchers[2]
        named = json.loads((victim.state_dir / "session.json").read_text())["id"]
        if case.startswith("ready"):
            rig.release(victim)
            rig.wait_states(deploy_id, [victim], "ready")

        victim.kill()
        if "wiped" in case:
            wipe_state(victim)
            victim.start()
        else:
            # "Session kept" is a restart quick enough for Consul to still know the session
            # (2x the 3 s TTL from the last renewal). A restart on a loaded runner (a Python
            # start-up) can take longer, and then the session is gone: a new one, and an
            # abort. The test renews it in the dead watcher's stead until the new process
            # has looked for it, so it is there whatever the restart took.
            looked = len(events(victim, "session_reused")) + len(events(victim, "session_created"))
            with session_renewed(rig, named):
                victim.start()
                wait_for(
                    lambda: (
                        len(events(victim, "session_reused"))
                        + len(events(victim, "session_created"))
                        > looked
                    ),
                    60,
                    "the restarted watcher looked for its session",
                    fleet,
                )
        rig.release(*rig.watchers)
        outcome = fleet.wait_outcome(deploy_id, 60)
        fleet.wait_idle(30)
        assert outcome["result"] == expected, (case, outcome)
        # A wiped watcher has a new session; it holds its member key once the dead
        # process's session expired (~2x TTL). A deploy requested before that names the
        # old session for it, and the host rightly refuses it.
        wait_for(
            lambda: (
                (s := rig.store.members().get(victim.name)) is not None
                and s.session == json.loads((victim.state_dir / "session.json").read_text())["id"]
            ),
            30,
            "the restarted watcher holds its member key",
            fleet,
        )

        states = final_states(rig, deploy_id)
        if expected == "committed":
            wait_for(lambda: set(fleet.currents().values()) == {release}, 30, "all on v2", fleet)
            if "wiped" in case:
                # Its ready ack is the old session's: the new process writes no ack of that
                # deploy while that session holds the key (a second watcher of the node
                # would be indistinguishable, and wrote this host's acks). Once it holds the
                # key it follows that ack (live) or, the deploy ended meanwhile, converges.
                others = [w for w in rig.watchers if w is not victim]
                rig.wait_states(deploy_id, others, LIVE)
                wait_for(
                    lambda: (
                        final_states(rig, deploy_id)[victim.name] == LIVE
                        or bool(events(victim, "converged"))
                    ),
                    30,
                    "the wiped host live in the deploy or converged after it",
                    fleet,
                )
            else:
                rig.wait_states(deploy_id, rig.watchers, LIVE)
        else:
            wait_for(
                lambda: all(
                    final_states(rig, deploy_id).get(w.name) in (ABORTED, FAILED, REFUSED)
                    for w in rig.watchers
                ),
                30,
                "every host out of the deploy",
                fleet,
            )
            states = final_states(rig, deploy_id)
            assert states[victim.name] in (REFUSED, FAILED, ABORTED), states
            assert fleet.currents() == {w.name: release1 for w in rig.watchers}
            # Where post_release ran, the aborted tree is gone; the victim's post_release
            # never finished, so its tree is kept for a resume (DESIGN.md 6.3).
            fleet.wait_dropped([w for w in rig.watchers if w is not victim], release)
        session_now = json.loads((victim.state_dir / "session.json").read_text())["id"]
        assert (session_now == named) == ("kept" in case), (case, named, session_now)
        allowed = {release1} | ({release} if expected == "committed" else set())
        assert seen_releases(rig) <= allowed, f"uncommitted release seen: {rig.monitor.seen}"
        no_crash(rig)
        next_deploy_works(rig, "v3")


# --- ACLs off: forged records are not obeyed --------------------------------------------------


class TestForgedWithoutAcls:
    def test_forged_commit_and_current_move_nobody(self, rig: Rig) -> None:
        fleet = rig.fleet
        release1 = baseline(rig)
        record = fleet.publish("v2")
        rig.hold(*rig.watchers)
        deploy_id, release = rig.deploy(rig.watchers[0], record)
        rig.wait_hook_started(rig.watchers, deploy_id)
        view = rig.store.view(deploy_id)
        assert view is not None
        req = view.record
        # Anyone may write any key here: a commit "by host-1" and `current` naming the deploy.
        forged = Decision(
            outcome=COMMIT,
            reason="forged",
            by=rig.watchers[0].name,
            at=iso(utcnow()),
            digest=req.digest(),
            create_index=view.create_index,
            release=req.release,
            artifact=req.artifact,
            url=req.url,
            size=req.size,
            sha256=req.sha256,
            expected=list(req.expected),
        )
        assert fleet.kv.kv_put(fleet.keys.decision(deploy_id), forged.to_json(), cas=0)
        current = CurrentRecord(
            release=req.release,
            artifact=req.artifact,
            sha256=req.sha256,
            deploy=deploy_id,
            url=req.url,
            size=req.size,
            create_index=view.create_index,
            digest=req.digest(),
        )
        assert fleet.kv.kv_put(fleet.keys.current, current.to_json())
        # Two hosts get ready; the third is still staging: nobody may flip.
        rig.release(*rig.watchers[:2])
        rig.wait_states(deploy_id, rig.watchers[:2], "ready")
        time.sleep(2)
        assert fleet.currents() == {w.name: release1 for w in rig.watchers}
        # The third host is asked to abort before it is ready: the acks decide abort. Its
        # post_release hook, still held, is stopped by the abort (not left running).
        third = rig.watchers[2]
        rig.watchers[0].ctl("abort", deploy_id, "--app", "web", as_json=False)
        outcome = fleet.wait_outcome(deploy_id, 40)
        assert outcome["result"] == "aborted", outcome
        fleet.wait_idle(30)
        wait_for(lambda: bool(events(third, "hook_cancelled")), 20, "hook stopped", fleet)
        rig.release(third)  # for the deploys below
        # Idle hosts look at `current` (still the forged one) and refuse to follow it.
        wait_for(
            lambda: all(events(w, "current_not_obeyed") for w in rig.watchers),
            20,
            "current_not_obeyed on every host",
            fleet,
        )
        assert fleet.currents() == {w.name: release1 for w in rig.watchers}
        for w in rig.watchers[:2]:  # post_release done, then aborted: dropped
            assert not (w.app_dir / "releases" / release).exists(), w.name
        # A staging cut short before its post_release ended is kept for a resume (until
        # aborted_staging_max_age), never current.
        kept = {r["release"]: r for r in third.ctl_json("releases", "web")}
        assert kept[release]["kept_for_resume"] and not kept[release]["is_current"], kept
        # The forged commit record contradicts what the acks established: reported.
        assert any(events(w, "decision_not_obeyed") for w in rig.watchers), fleet.logs()
        assert seen_releases(rig) == {release1}, rig.monitor.seen

        # A `current` naming a deploy that never existed: reported, not obeyed.
        ghost = CurrentRecord(
            release="20200101T000000Z-main-00000000",
            artifact="main-00000000",
            sha256="0" * 64,
            deploy="no-such-deploy",
            url=record.url,
            size=1,
        )
        assert fleet.kv.kv_put(fleet.keys.current, ghost.to_json())
        wait_for(
            lambda: all(
                any(e.get("deploy") == "no-such-deploy" for e in events(w, "current_not_obeyed"))
                for w in rig.watchers
            ),
            20,
            "the ghost current reported on every host",
            fleet,
        )
        assert seen_releases(rig) == {release1}, rig.monitor.seen
        no_crash(rig)
        next_deploy_works(rig, "v3")


class TestTrimmedAcks:
    def test_a_forged_trim_list_deletes_no_ack_the_fleets_releases_need(self, rig: Rig) -> None:
        """The attack review's case: one host's token listed every deploy in `history` as
        trimmed and made `current` unreadable, and at their next trim every other host
        deleted its own acks of the fleet's `current` and `previous` deploys: `current`
        turned untrusted, `rollback` had no target, and a host that came back stayed on
        its old release. A host now spares the acks of what it applied and still has."""
        fleet = rig.fleet
        baseline(rig)
        next_deploy_works(rig, "v2")
        current, _ = rig.store.current()
        assert current is not None and current.previous is not None
        d2, d1 = current.deploy, str(current.previous["deploy"])
        ids, _, _ = rig.store._history_doc()
        assert {d1, d2} <= set(ids)
        # An old ack of each host no release or applied.json knows: the trim still takes it.
        old = "20200101T000000Z-0ld0ld"
        for w in rig.watchers:
            ack = NodeProgress(node=w.name, state=LIVE, deploy=old)
            assert fleet.kv.kv_put(fleet.keys.progress(old, w.name), ack.to_json())
        trimmed = [old, *ids]
        forged = json.dumps({"version": 2, "deploys": ids, "trimmed": trimmed}).encode()
        assert fleet.kv.kv_put(fleet.keys.history, forged)
        assert fleet.kv.kv_put(fleet.keys.current, b"not json")
        for w in rig.watchers:  # a host trims at the first end after its start
            w.stop()
            w.start()
        fleet.wait_members(3)
        next_deploy_works(rig, "v3")
        fleet.wait_idle()
        # The trim ran (each host's, at the end of its part: a moment after the deploy's).
        wait_for(
            lambda: all(
                fleet.kv.kv_get(fleet.keys.progress(old, w.name)) is None for w in rig.watchers
            ),
            20,
            "every host's trim of the old ack",
            fleet,
        )
        for deploy_id in (d1, d2):
            for w in rig.watchers:
                ack, _ = rig.store.ack(deploy_id, w.name)
                assert ack is not None and ack.state == LIVE, (deploy_id, w.name, ack)
        no_crash(rig)


# --- bad input --------------------------------------------------------------------------------


class TestBadInput:
    def test_garbage_around_a_deploy_is_reported_and_not_obeyed(self, rig: Rig) -> None:
        """A decision that does not parse and acks naming another or an unknown node, all
        written before the hosts join: the deploy commits on the real acks."""
        fleet = rig.fleet
        baseline(rig)
        v2 = fleet.publish("v2")
        rec = request_for(rig, "bad-garbage-1", v2)
        keys = fleet.keys
        assert fleet.kv.kv_put(keys.decision(rec.id), b"{not json")
        other = NodeProgress(node="host-3", state=LIVE, deploy=rec.id, digest=rec.digest())
        assert fleet.kv.kv_put(keys.progress(rec.id, "host-2"), other.to_json())
        ghost = NodeProgress(node="ghost", state=FAILED, deploy=rec.id, error="forged")
        assert fleet.kv.kv_put(keys.progress(rec.id, "ghost"), ghost.to_json())
        assert fleet.kv.kv_put(keys.progress(rec.id, "host-1"), b"\xff\xfe not json")
        assert rig.store.start(rec)
        outcome = fleet.wait_outcome(rec.id, 40)
        assert outcome["result"] == "committed", outcome
        fleet.wait_idle(30)
        assert set(fleet.currents().values()) == {rec.release}
        assert any(events(w, "decision_not_obeyed") for w in rig.watchers), fleet.logs()
        # Reported: each bad version of a key once per host, however often it was read.
        for w in rig.watchers:
            skipped = [(e["key"], e["index"]) for e in events(w, "document_skipped")]
            assert len(skipped) == len(set(skipped)), (w.name, skipped)
        reported = {e["key"] for w in rig.watchers for e in events(w, "document_skipped")}
        assert keys.progress(rec.id, "host-1") in reported, reported
        assert keys.progress(rec.id, "host-2") in reported, reported
        no_crash(rig)

    @pytest.mark.parametrize(
        "what",
        ["not json", "another app", "another release", "an unknown node", "another commit"],
    )
    def test_a_bad_request_is_never_obeyed(self, rig: Rig, what: str) -> None:
        fleet = rig.fleet
        release1 = baseline(rig)
        v2 = fleet.publish("v2")
        deploy_id = f"bad-request-{what.replace(' ', '-')}"
        if what == "not json":
            body = b'{"id": "' + deploy_id.encode() + b'", "app": '
        elif what == "another app":
            rec = request_for(rig, deploy_id, v2)
            body = json.dumps({**rec.as_dict(), "app": "api"}).encode()
        elif what == "another release":
            rec = request_for(rig, deploy_id, v2, release=f"20200101T000000Z-{v2.id}")
            body = rec.to_json()
        elif what == "another commit":
            # What hooks and history would say was deployed: not what CI recorded.
            rec = request_for(rig, deploy_id, v2)
            body = json.dumps({**rec.as_dict(), "branch": "hotfix;$(id)", "commit": "0" * 40})
            body = body.encode()
        else:
            live = sessions(rig)
            rec = request_for(rig, deploy_id, v2, expected={**live, "ghost": str(uuid.uuid4())})
            body = rec.to_json()
        start_raw(rig, deploy_id, body)
        outcome = fleet.wait_outcome(deploy_id, 40)
        fleet.wait_idle(30)
        assert outcome["result"] in ("refused", "aborted"), outcome
        if what in ("not json", "another app"):
            assert "does not parse" in outcome["reason"], outcome
            # The host logs it after its txn returns: under load, a moment after the outcome.
            wait_for(
                lambda: any(events(w, "inflight_cleared") for w in rig.watchers),
                10,
                "a host logged inflight_cleared",
            )
        elif what == "another release":
            assert "release" in outcome["reason"], outcome
        elif what == "another commit":
            assert "request says branch 'hotfix;$(id)' commit '0000" in outcome["reason"], outcome
            assert "but the record says branch 'main'" in outcome["reason"], outcome
        else:  # the hosts' own acks end as aborted; the decision record keeps why
            decision = fleet.decision(deploy_id)
            assert decision is not None and "ghost" in decision["reason"], decision
            assert "session" in decision["reason"], decision
        assert fleet.currents() == {w.name: release1 for w in rig.watchers}
        assert seen_releases(rig) == {release1}, rig.monitor.seen
        no_crash(rig)
        next_deploy_works(rig, "v3")

    def test_a_bad_pin_vetoes_and_never_changes_the_bytes(self, rig: Rig) -> None:
        fleet = rig.fleet
        release1 = baseline(rig)
        for n, pin in enumerate(
            (
                b"[not a pin",
                PinRecord(artifact="main-00000000", url="s3://x/y", size=1, sha256="f" * 64),
            )
        ):
            v = fleet.publish(f"pinned-{n}")
            body = pin if isinstance(pin, bytes) else pin.to_json()
            fleet.kv.kv_delete(fleet.keys.pin(v.id))
            assert fleet.kv.kv_put(fleet.keys.pin(v.id), body)
            refused = rig.watchers[0].ctl("deploy", "web", v.id, check=False)
            assert refused.returncode != 0, refused.stdout
            text = refused.stdout + refused.stderr
            if isinstance(pin, bytes):
                assert "pin does not parse" in text, text
            else:
                assert "f" * 64 in text and v.sha256 in text, text
            # A raw request past watcherctl's check: every host refuses to stage it.
            rec = request_for(rig, f"bad-pin-{n}", v)
            start_raw(rig, rec.id, rec.to_json())
            outcome = fleet.wait_outcome(rec.id, 40)
            fleet.wait_idle(30)
            assert outcome["result"] == "aborted", outcome
            assert "pin" in outcome["reason"], outcome
            assert fleet.currents() == {w.name: release1 for w in rig.watchers}
            assert fleet.kv.kv_delete(fleet.keys.pin(v.id))  # the admin repairs it
        assert seen_releases(rig) == {release1}, rig.monitor.seen
        no_crash(rig)
        next_deploy_works(rig, "v3")
