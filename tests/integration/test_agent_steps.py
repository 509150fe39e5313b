"""One host's agent in this process, its steps taken by the test, against a real Consul and
S3: the orders of wake-ups a busy fleet produces, made to happen on purpose."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.deploys import start_deploy
from tests.support.fleet import make_tarball, wait_for
from tests.support.s3server import s3_client
from watcher import PROTOCOL_VERSION
from watcher.agent import AppAgent
from watcher.artifacts import ArtifactCache
from watcher.barrier import DeployStore, Joined, Verdict
from watcher.config import S3Settings, parse_config
from watcher.consul_api import ConsulClient
from watcher.records import (
    ABORT,
    COMMIT,
    COMMITTED,
    FAILED,
    LIVE,
    READY,
    REFUSED,
    STAGING,
    ArtifactRecord,
    MemberRecord,
    NodeProgress,
    iso,
    parse_iso,
    utcnow,
)
from watcher.releases import ReleaseEngine
from watcher.s3 import S3Store

CLUSTER = ClusterSpec(hosts=1)
HOSTS = ("host-a", "host-b")


@pytest.fixture
def consul(cluster: ConsulCluster) -> Iterator[ConsulClient]:
    client = ConsulClient(cluster.hosts[0].consul_settings())
    yield client
    client.close()


@dataclass
class Rig:
    """host-a's agent in this process; host-b is played by the test through the store."""

    store: DeployStore
    agent: AppAgent
    sessions: dict[str, str]
    artifact: ArtifactRecord
    woke: threading.Event  # set whenever host-a's agent wakes its (absent) daemon loop

    def ready_b(self, joined: Joined, **extra: Any) -> None:
        """host-b, played by the test, acks ready (``extra``: e.g. its timings)."""
        assert self.store.write_progress(
            joined.id,
            "host-b",
            READY,
            joined=joined,
            session=self.sessions["host-b"],
            sha256=self.artifact.sha256,
            **extra,
        )

    def prepare_and_apply(self, joined: Joined) -> NodeProgress:
        """host-a's steps once host-b acked ready: its prepare, whose ready txn reads
        host-b's ack and establishes the commit, then its apply; its live ack."""
        assert "prepare started" in self.step()
        wait_for(lambda: not self.agent.busy(), 30, "host-a's prepare")
        outcome = self.step()
        assert "apply started" in outcome, outcome
        wait_for(lambda: not self.agent.busy(), 30, "host-a's apply")
        assert self.agent.engine.current_release() == joined.request.release
        ack, _ = self.store.ack(joined.id, "host-a")
        assert ack is not None and ack.state == LIVE, ack
        return ack

    def step(self) -> str:
        inflight = self.store.inflight()
        return self.agent.reconcile(
            self.store.members(), inflight=inflight, current=self.store.current()
        )


@pytest.fixture
def rig(
    cluster: ConsulCluster, consul: ConsulClient, s3_settings: S3Settings, tmp_path: Path
) -> Iterator[Rig]:
    prefix = f"s{time.monotonic_ns()}"
    store = DeployStore(consul, prefix, "web")
    body = make_tarball({"index.html": "<h1>v1</h1>\n"})
    key = f"{s3_settings.prefix}/web/main-0a1b2c3d.tar.gz"
    s3_client(str(s3_settings.endpoint_url)).put_object(
        Bucket=s3_settings.bucket, Key=key, Body=body
    )
    artifact = ArtifactRecord(
        id="main-0a1b2c3d",
        url=f"s3://{s3_settings.bucket}/{key}",
        sha256=hashlib.sha256(body).hexdigest(),
        size=len(body),
    )
    assert consul.kv_put(store.keys.artifact(artifact.id), artifact.to_json())
    sessions = {}
    for node in HOSTS:
        sessions[node] = consul.session_create(f"test {node}", 30, checks=[])
        member = MemberRecord(node, "test", "2026-12-02T00:00:00.000Z").to_json()
        assert consul.kv_put(store.keys.member(node), member, acquire=sessions[node])

    config = parse_config(
        {
            "node": "host-a",
            "kv_prefix": prefix,
            "consul": {"address": f"http://{cluster.hosts[0].consul_settings().address}"},
            "s3": {
                "bucket": s3_settings.bucket,
                "prefix": s3_settings.prefix,
                "region": s3_settings.region,
                "endpoint_url": s3_settings.endpoint_url,
            },
            "daemon": {"state_dir": str(tmp_path / "state")},
            "apps": {"web": {"root": str(tmp_path / "srv")}},
        },
        source="test",
        env={},
    )
    app = config.apps["web"]
    cache = ArtifactCache(
        app.app_dir,
        S3Store(config.s3),
        max_bytes=app.artifact_cache_bytes,
        timeout=app.timeouts.download,
    )
    woke = threading.Event()
    agent = AppAgent(
        config,
        app,
        ReleaseEngine(app, cache),
        store,
        "host-a",
        session=lambda: sessions["host-a"],
        wake=woke.set,
    )

    yield Rig(store, agent, sessions, artifact, woke)
    agent.shutdown(wait=True)


def test_a_decided_mark_that_lands_before_the_step_after_the_ready_ack_is_acted_on(
    rig: Rig,
) -> None:
    """host-a acks ready while host-b still stages; host-b then acks, establishes the
    commit and marks its member key, all before host-a's loop takes its next step. That
    one step sees both the end of host-a's prepare (whose txn read "1 of 2 ready") and the
    mark: host-a must write its intent at once, not wait for a later wake-up (in the
    20-host bench, one round in five to eight had a host flip ~1.3 s after the others)."""
    store, agent, step = rig.store, rig.agent, rig.step
    sessions, artifact = rig.sessions, rig.artifact
    joined = start_deploy(store, "20261202T000000Z-a1b2c3", sessions, artifact)
    assert store.write_progress(joined.id, "host-b", STAGING, joined=joined)

    assert "prepare started" in step()
    wait_for(lambda: not agent.busy(), 30, "host-a's prepare")
    ack, _ = store.ack(joined.id, "host-a")
    assert ack is not None and ack.state == READY

    # host-b: ready, then the commit it establishes, with its decided mark.
    session_b = sessions["host-b"]
    assert store.write_progress(
        joined.id, "host-b", READY, joined=joined, session=session_b, sha256=artifact.sha256
    )
    verdict = store.establish(joined)
    assert verdict.outcome == COMMIT, verdict
    mark = store.decided_mark_op(
        joined,
        COMMIT,
        node="host-b",
        session=session_b,
        member=store.members()["host-b"],
    )
    assert mark is not None
    assert store.write_progress(
        joined.id, "host-b", COMMITTED, joined=joined, session=session_b, extra_ops=[mark]
    )

    # host-a's next step: its prepare's end and the mark together.
    outcome = step()
    assert "apply started" in outcome, outcome
    ack, _ = store.ack(joined.id, "host-a")
    assert ack is not None and ack.state == COMMITTED
    wait_for(lambda: not agent.busy(), 30, "host-a's apply")
    assert agent.engine.current_release() == joined.request.release


def test_the_flip_time_is_when_current_moved_not_after_the_bookkeeping(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flipped_at`` (what `status`, the bench and history read as the flip) is taken
    when `current` was renamed, not after applied.json is written behind it."""
    store, agent = rig.store, rig.agent
    joined = start_deploy(store, "20261202T000000Z-d4e5f6", rig.sessions, rig.artifact)
    rig.ready_b(joined)
    write_applied = agent._write_applied
    slow = 0.5

    def slow_write_applied(j: Joined) -> None:
        time.sleep(slow)  # a disk that is slow to sync, after the rename
        write_applied(j)

    monkeypatch.setattr(agent, "_write_applied", slow_write_applied)
    ack = rig.prepare_and_apply(joined)
    flipped, live = parse_iso(ack.timings["flipped_at"]), parse_iso(ack.timings["live_at"])
    assert (live - flipped).total_seconds() >= slow - 0.05, ack.timings


def test_a_request_for_a_newer_protocol_is_refused_and_nothing_moves(rig: Rig) -> None:
    """A fleet mid-upgrade: a newer watcherctl writes a request this watcher's protocol
    does not speak (``min_protocol``). This host acks refused with both versions named,
    the deploy aborts, and `current` stays where it was."""
    store, agent = rig.store, rig.agent
    newer = PROTOCOL_VERSION + 1
    joined = start_deploy(
        store, "20261202T000000Z-0f1e2d", rig.sessions, rig.artifact, min_protocol=newer
    )
    assert joined.request.min_protocol == newer
    assert "prepare started" in rig.step()
    wait_for(lambda: not agent.busy(), 30, "host-a's prepare")
    ack, _ = store.ack(joined.id, "host-a")
    assert ack is not None and ack.state == REFUSED, ack
    assert f"speaks protocol {PROTOCOL_VERSION}, the deploy needs {newer}" in ack.error
    assert store.establish(joined).outcome == ABORT
    rig.step()
    wait_for(lambda: not agent.busy(), 30, "host-a's abort")
    assert agent.engine.current_release() is None
    assert not agent.engine.layout.release_dir(joined.request.release).exists()


def _flip_with_delay(rig: Rig, delay: float, staged_b: str) -> dict[str, str]:
    """host-b (the test) acks ready with ``staged_b`` as its staged_at; host-a prepares,
    establishes the commit in its ready txn and flips with ``flip_delay`` = ``delay``.
    Returns host-a's live ack's timings."""
    store, agent = rig.store, rig.agent
    agent.app = dataclasses.replace(agent.app, flip_delay=delay)
    joined = start_deploy(store, "20261202T000000Z-ab12cd", rig.sessions, rig.artifact)
    rig.ready_b(joined, timings={"staged_at": staged_b})
    return rig.prepare_and_apply(joined).timings


def test_hosts_flip_at_the_last_ready_ack_plus_the_flip_delay(rig: Rig) -> None:
    """The fleet flips together: each host renames `current` at the newest staged_at of
    the expected hosts' acks plus ``flip_delay`` (the same moment on every host), however
    soon it established the commit itself."""
    timings = _flip_with_delay(rig, 2.0, iso(utcnow()))
    staged, decided = parse_iso(timings["staged_at"]), parse_iso(timings["decided_at"])
    flipped = parse_iso(timings["flipped_at"])
    assert (flipped - staged).total_seconds() >= 2.0 - 0.002, timings  # ms stamps
    # It waited after deciding (deciding took host-a's ready txn and one step after it).
    assert (flipped - decided).total_seconds() >= 1.0, timings


def test_an_ack_staged_in_the_future_holds_the_flip_back_by_the_delay_at_most(
    rig: Rig,
) -> None:
    """A host whose clock runs an hour ahead (or whose ack lies about it) cannot hold the
    fleet: the flip comes ``flip_delay`` after this host established the commit."""
    ahead = iso(utcnow() + timedelta(hours=1))
    timings = _flip_with_delay(rig, 1.0, ahead)
    decided, flipped = parse_iso(timings["decided_at"]), parse_iso(timings["flipped_at"])
    assert 0.8 <= (flipped - decided).total_seconds() <= 2.5, timings


def test_the_flip_moment_reads_only_the_expected_hosts_stamps(rig: Rig) -> None:
    """What every host computes alike from the acks: an unreadable stamp or one of a
    host that is not expected moves nothing; no stamp, or a delay of 0: flip at once."""
    agent = rig.agent
    joined = start_deploy(rig.store, "20261202T000000Z-ef3456", rig.sessions, rig.artifact)
    agent.app = dataclasses.replace(agent.app, flip_delay=0.25)
    base = utcnow() - timedelta(seconds=30)

    def moment(stamps: dict[str, str]) -> float | None:
        acks = {n: NodeProgress(n, READY, timings={"staged_at": t}) for n, t in stamps.items()}
        return agent._flip_moment(joined, Verdict(COMMIT, "", acks))

    newest = base + timedelta(seconds=2)
    assert moment({"host-a": iso(base), "host-b": iso(newest)}) == pytest.approx(
        newest.timestamp() + 0.25
    )
    stray = iso(base + timedelta(seconds=9))  # a host outside the request
    assert moment({"host-a": iso(base), "host-b": "soon", "host-z": stray}) == pytest.approx(
        base.timestamp() + 0.25
    )
    assert moment({"host-b": ""}) is None
    assert moment({}) is None
    agent.app = dataclasses.replace(agent.app, flip_delay=0.0)
    assert moment({"host-a": iso(base), "host-b": iso(newest)}) is None


def test_a_step_that_finds_the_apply_still_running_is_taken_again_when_it_ends(
    rig: Rig, consul: ConsulClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """host-a does not coordinate (host-0 does): after its live ack its apply task ends
    without waking the loop. If the end of the deploy wakes the loop while that task is
    still in its bookkeeping (pruning old releases on a slow disk), the step finds it
    running and does nothing; the task's end must wake the loop again, or host-a says
    "waiting for the end" until the loop's next tick (seen: a host idle 1.0 s late)."""
    store, agent = rig.store, rig.agent
    session = consul.session_create("test host-0", 30, checks=[])
    member = MemberRecord("host-0", "test", "2026-12-02T00:00:00.000Z").to_json()
    assert consul.kv_put(store.keys.member("host-0"), member, acquire=session)
    sessions = {**rig.sessions, "host-0": session}
    joined = start_deploy(store, "20261202T000000Z-5a6b7c", sessions, rig.artifact)
    for node in ("host-0", "host-b"):
        assert store.write_progress(
            joined.id,
            node,
            READY,
            joined=joined,
            session=sessions[node],
            sha256=rig.artifact.sha256,
        )
    pruning, go_on = threading.Event(), threading.Event()
    prune = agent._prune

    def slow_prune(**kwargs: Any) -> None:
        pruning.set()
        go_on.wait(30)
        prune(**kwargs)

    monkeypatch.setattr(agent, "_prune", slow_prune)
    assert "prepare started" in rig.step()
    wait_for(lambda: not agent.busy(), 30, "host-a's prepare")
    assert "apply started" in rig.step()
    assert pruning.wait(30), "host-a's apply never reached its prune"
    ack, _ = store.ack(joined.id, "host-a")
    assert ack is not None and ack.state == LIVE, ack
    rig.woke.clear()
    rig.step()  # as if the end's watch woke the loop now
    assert agent.busy() and not rig.woke.is_set()  # the task is still in its prune
    go_on.set()
    wait_for(lambda: not agent.busy(), 30, "host-a's apply")
    assert rig.woke.wait(5), "the apply's end did not wake the loop"


def test_a_crash_in_the_prepare_is_a_failed_ack_not_a_retry_loop(rig: Rig) -> None:
    """A bug in staging (here the engine raising what no handler expects) must still end
    in this host's "no": acked failed with the error, once, and the deploy aborts, rather
    than the loop starting the same prepare again and again until the deadline."""
    store, agent = rig.store, rig.agent
    calls = []

    def crash(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise RuntimeError("boom")

    agent.engine.stage = crash  # type: ignore[method-assign]
    joined = start_deploy(store, "20261202T000000Z-c0ffee", rig.sessions, rig.artifact)
    assert "prepare started" in rig.step()
    wait_for(lambda: not agent.busy(), 30, "host-a's prepare")
    ack, _ = store.ack(joined.id, "host-a")
    assert ack is not None and ack.state == FAILED, ack
    assert "internal error while staging: RuntimeError('boom')" in ack.error
    assert "prepare started" not in rig.step()
    assert calls == [1]
    assert store.establish(joined).outcome == ABORT
    assert agent.engine.current_release() is None


def test_a_crash_in_a_prefetch_is_logged(rig: Rig) -> None:
    """Prefetches run in a pool whose futures nobody reads: a bug must still be said."""

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    rig.agent.engine.prefetch = crash  # type: ignore[method-assign]
    with capture_logs() as logs:
        rig.agent.prefetch(rig.artifact.id)
    crashed = [e for e in logs if e["event"] == "prefetch_crashed"]
    assert crashed and crashed[0]["error"] == "RuntimeError('boom')", logs


def test_an_abort_request_seen_after_the_own_ready_ack_leaves_it_ready(rig: Rig) -> None:
    """The loop sees an operator's abort request while the worker's ready ack has just
    landed (before the worker noted it): the loop's "no" loses its CAS to that ready ack
    and must not replace it. `ready -> aborted` is allowed for the intent of an
    established abort; here nothing was established, the commit predicate already held,
    and host-b, which read it, has flipped. Replacing the ready ack made the deploy
    contested (found by a review)."""
    joined = start_deploy(rig.store, "d1", rig.sessions, rig.artifact)
    rig.ready_b(joined)
    gate = threading.Event()
    real_stage = rig.agent.engine.stage

    def held_stage(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return real_stage(*args, **kwargs)

    rig.agent.engine.stage = held_stage  # type: ignore[method-assign]
    try:
        assert "prepare started" in rig.step()
        time.sleep(1.2)  # staging "takes a while": the loop now looks for abort requests
        rig.step()
        # host-a's ready ack lands, as the worker's txn would write it ...
        assert rig.store.write_progress(
            joined.id,
            "host-a",
            READY,
            joined=joined,
            session=rig.sessions["host-a"],
            sha256=rig.artifact.sha256,
        )
        # ... host-b reads every ack ready and writes its commit intent ...
        intent = rig.store.write_progress(
            joined.id, "host-b", COMMITTED, joined=joined, establish=True
        )
        assert intent is not None and intent.verdict is not None
        assert intent.verdict.outcome == COMMIT
        # ... and an operator's abort request comes a moment too late.
        assert rig.store.request_abort(joined.id, "stop it", by="op@laptop")
        with capture_logs() as logs:
            rig.step()
        ack, _ = rig.store.ack(joined.id, "host-a")
        # Still ready, or already its own commit intent (the same step may follow host-b's
        # decided mark): never a "no".
        assert ack is not None and ack.state in (READY, COMMITTED), ack
        assert any(e["event"] == "progress_veto_too_late" for e in logs), logs
        assert rig.store.establish(joined).outcome == COMMIT
    finally:
        gate.set()
        wait_for(lambda: not rig.agent.busy(), 30, "host-a's prepare")
