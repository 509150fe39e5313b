"""The daemon's session keeper against a scripted Consul (pure logic; the real agents are
in tests/integration/test_deploy_faults.py): a session is given up only on proof, and one
it gives up is never left holding the member key."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from watcher.daemon import REFUSED_RETRY, SESSION_FILE, SessionKeeper
from watcher.errors import ConsulPermissionDenied, ConsulRequestError
from watcher.health import HealthState, Metrics


class ScriptedConsul:
    """Sessions that exist, renewals that answer 404 regardless (a restarted server still
    replaying its log), and a record of every call."""

    def __init__(self, alive: set[str], renew_404: set[str] | None = None) -> None:
        self.alive = set(alive)
        self.renew_404 = set(renew_404 or ())
        self.calls: list[tuple[str, str]] = []
        self.created = 0
        self.renewed = threading.Event()

    def session_info(self, sid: str, *, consistent: bool = False) -> dict[str, Any] | None:
        self.calls.append(("info" + ("!" if consistent else ""), sid))
        return {"ID": sid, "Node": "agent-1", "CreateIndex": 5} if sid in self.alive else None

    def session_renew(self, sid: str) -> bool:
        self.calls.append(("renew", sid))
        if sid in self.renew_404:
            self.renew_404.discard(sid)  # once: the server has caught up afterwards
            return False
        self.renewed.set()
        return sid in self.alive

    def session_create(self, name: str, ttl: float, **_: Any) -> str:
        self.created += 1
        sid = f"new-{self.created}"
        self.alive.add(sid)
        self.calls.append(("create", sid))
        return sid

    def session_destroy(self, sid: str) -> None:
        self.calls.append(("destroy", sid))
        self.alive.discard(sid)


def keeper(
    consul: ScriptedConsul, state: Path, changes: list[str | None] | None = None
) -> SessionKeeper:
    k: SessionKeeper

    def changed() -> None:
        if changes is not None:
            changes.append(k.session_id)

    k = SessionKeeper(
        consul,  # type: ignore[arg-type]
        "host-1",
        1.0,
        state,
        HealthState(undecided_after=30, loop_stall_after=30),
        Metrics(),
        changed,
    )
    return k


def keep(state: Path, sid: str, consul_node: str = "agent-1") -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / SESSION_FILE).write_text(json.dumps({"id": sid, "consul_node": consul_node}))


def test_a_404_renewal_of_a_session_that_exists_keeps_it(tmp_path: Path) -> None:
    consul = ScriptedConsul({"s1"}, renew_404={"s1"})
    keep(tmp_path, "s1")
    changes: list[str | None] = []
    k = keeper(consul, tmp_path, changes)
    k._set("s1")  # as after obtain(): the loop below renews it
    k.start()
    try:
        assert consul.renewed.wait(5), consul.calls
    finally:
        k.stopping.set()
        k.join(5)
    assert k.session_id == "s1"
    assert consul.created == 0, consul.calls
    assert ("info!", "s1") in consul.calls  # the 404 was checked with a consistent read
    # Never given up, not even for a moment: the loop was not told of a change, and no
    # deploy in flight saw this host without its session.
    assert changes == [], changes


def test_a_session_gone_for_good_is_replaced(tmp_path: Path) -> None:
    consul = ScriptedConsul(set())
    keep(tmp_path, "s1")
    k = keeper(consul, tmp_path)
    k._set("s1")
    k.start()
    try:
        k.first_attempt.wait(5)
        assert consul.renewed.wait(5), consul.calls
    finally:
        k.stopping.set()
        k.join(5)
    assert k.session_id == "new-1", consul.calls


def test_a_kept_session_not_reused_is_destroyed_first(tmp_path: Path) -> None:
    """Saved for another Consul node (or not renewable): this daemon will not use it, so it
    must not keep holding the member key until its TTL runs out."""
    consul = ScriptedConsul({"s1"})
    keep(tmp_path, "s1", consul_node="another-agent")
    sid = keeper(consul, tmp_path).obtain()
    assert sid == "new-1"
    assert consul.calls.index(("destroy", "s1")) < consul.calls.index(("create", "new-1"))
    assert "s1" not in consul.alive


def test_a_kept_session_still_good_is_reused(tmp_path: Path) -> None:
    consul = ScriptedConsul({"s1"})
    keep(tmp_path, "s1")
    assert keeper(consul, tmp_path).obtain() == "s1"
    assert not [c for c in consul.calls if c[0] in ("destroy", "create")], consul.calls


def test_a_session_reused_from_an_older_file_is_marked_with_its_prefix(tmp_path: Path) -> None:
    """A session reused across the upgrade (an older session.json, no kv_prefix) may live
    on for many deploys: a later restart with another prefix must still see it is not
    this one's (the code review)."""
    consul = ScriptedConsul({"s1"})
    keep(tmp_path, "s1")
    k = keeper(consul, tmp_path)
    k.kv_prefix = "watcher"
    assert k.obtain() == "s1"
    assert json.loads((tmp_path / SESSION_FILE).read_text())["kv_prefix"] == "watcher"
    k.kv_prefix = "watcher2"
    assert k.obtain() == "new-1"


def test_a_reused_session_is_the_daemons_before_its_clean_up_runs_and_survives_it(
    tmp_path: Path,
) -> None:
    """The clean-up after a reuse (member keys of apps no longer run) makes Consul
    requests: the loop must not wait for them to get the session (a resumed deploy is
    refused without it), and a clean-up that raises must not cost the session."""
    consul = ScriptedConsul({"s1"})
    keep(tmp_path, "s1")
    seen: list[tuple[str, str | None, bool]] = []
    k = keeper(consul, tmp_path)

    def on_reused(sid: str) -> None:
        seen.append((sid, k.session_id, k.first_attempt.is_set()))
        raise RuntimeError("Consul said something odd")

    k.on_reused = on_reused
    k.start()
    try:
        assert consul.renewed.wait(5), consul.calls
        assert k.first_attempt.wait(5)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        k.stopping.set()
        k.join(5)
    assert seen == [("s1", "s1", True)]
    assert k.session_id == "s1" and consul.created == 0, consul.calls


@pytest.mark.parametrize(
    ("saved", "why"),
    [
        ({"node": "host-3"}, "node 'host-3'"),
        ({"node": "host-1", "kv_prefix": "watcher2"}, "kv_prefix 'watcher2'"),
    ],
    ids=["renamed", "other-prefix"],
)
def test_a_session_kept_for_another_node_or_prefix_is_not_reused(
    tmp_path: Path, saved: dict[str, str], why: str
) -> None:
    """The config's node or kv_prefix changed across a restart (the operator review): the
    old session holds the old identity's member keys and is named in its deploys; reused,
    the watcher stayed that identity too (both names 'alive', every deploy refused)."""
    consul = ScriptedConsul({"s1"})
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / SESSION_FILE).write_text(
        json.dumps({"id": "s1", "consul_node": "agent-1", **saved})
    )
    k = keeper(consul, tmp_path)
    k.kv_prefix = "watcher"
    with capture_logs() as logs:
        assert k.obtain() == "new-1"
    assert consul.calls.index(("destroy", "s1")) < consul.calls.index(("create", "new-1"))
    [said] = [e for e in logs if e["event"] == "session_not_reused"]
    assert why in said["reason"]
    written = json.loads((tmp_path / SESSION_FILE).read_text())
    assert (written["node"], written["kv_prefix"]) == ("host-1", "watcher")


def test_a_reused_session_is_renewed_as_often_as_its_own_ttl_needs(tmp_path: Path) -> None:
    """session_ttl raised from 10 s to 60 s across a quick restart: the session kept its
    10 s TTL, and renewed every 30 s it lapsed (the deploy the restart kept aborted)."""

    class WithTtl(ScriptedConsul):
        def session_info(self, sid: str, *, consistent: bool = False) -> dict[str, Any] | None:
            info = super().session_info(sid, consistent=consistent)
            return None if info is None else {**info, "TTL": "10s"}

    consul = WithTtl({"s1"})
    keep(tmp_path, "s1")
    k = keeper(consul, tmp_path)
    k.ttl = k.held_ttl = 60.0
    assert k.obtain() == "s1"
    assert k.held_ttl == 10.0
    assert k.obtain() == "s1"  # the saved file still names it: reused again
    consul.alive.clear()
    assert k.obtain() == "new-1" and k.held_ttl == 60.0


def test_a_session_consul_refuses_is_what_health_says(tmp_path: Path) -> None:
    """Consul refusing the session (a TTL below its session_ttl_min, a token for another
    node): /health and `watcherctl status` name Consul's reason, not "no session yet"."""

    class Refusing(ScriptedConsul):
        def session_create(self, name: str, ttl: float, **_: Any) -> str:
            self.calls.append(("create", "refused"))
            raise ConsulRequestError(
                "Invalid Session TTL '3000000000', must be between [10s=24h0m0s]"
            )

    consul = Refusing(set())
    k = keeper(consul, tmp_path)
    k.start()
    try:
        deadline = time.monotonic() + 10
        while ("create", "refused") not in consul.calls:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # The keeper thread says so after the refused call (before it, health says
        # "starting"): wait for health to name the refusal.
        healthy, details = k.health.check()
        while "Invalid Session TTL" not in str(details) and time.monotonic() < deadline:
            time.sleep(0.02)
            healthy, details = k.health.check()
    finally:
        k.stopping.set()
        k.join(5)
    assert not healthy
    assert details["problems"] == [
        "no Consul session: Invalid Session TTL '3000000000', must be between [10s=24h0m0s]"
    ]


DENIED = "Permission denied: token with AccessorID 'x' lacks permission 'session:write'"


class RecordedWaits(threading.Event):
    """The keeper's stop event, noting how long each wait between two asks was meant to be."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(-1.0 if timeout is None else timeout)
        return super().wait(min(timeout, 0.05) if timeout is not None else None)


def test_a_refused_create_is_asked_again_only_every_refused_retry(tmp_path: Path) -> None:
    """A token Consul refuses for a new session stays refused until someone changes it:
    the keeper does not ask every second."""

    class Refusing(ScriptedConsul):
        def session_create(self, name: str, ttl: float, **_: Any) -> str:
            self.calls.append(("create", "refused"))
            raise ConsulPermissionDenied(DENIED)

    consul = Refusing(set())
    k = keeper(consul, tmp_path)
    k.stopping = waits = RecordedWaits()
    k.start()
    try:
        deadline = time.monotonic() + 5
        while consul.calls.count(("create", "refused")) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        k.stopping.set()
        k.join(5)
    assert consul.calls.count(("create", "refused")) >= 3, consul.calls
    assert REFUSED_RETRY >= 5 and waits.waits[:2] == [REFUSED_RETRY] * 2, waits.waits


def test_a_refused_renewal_of_a_held_session_is_asked_again_soon(tmp_path: Path) -> None:
    """A refused renewal may pass (an agent cut off from its servers under ACL down_policy
    deny) and the session lapses at twice its TTL: asked again within a second, not in
    REFUSED_RETRY, and the session kept meanwhile."""

    class RefusingRenewals(ScriptedConsul):
        refusals = 2

        def session_renew(self, sid: str) -> bool:
            if self.refusals:
                self.refusals -= 1
                self.calls.append(("renew", "refused"))
                raise ConsulPermissionDenied(DENIED)
            return super().session_renew(sid)

    consul = RefusingRenewals({"s1"})
    keep(tmp_path, "s1")
    k = keeper(consul, tmp_path)
    k.stopping = waits = RecordedWaits()
    k._set("s1")
    with capture_logs() as logs:
        k.start()
        try:
            assert consul.renewed.wait(5), consul.calls
        finally:
            k.stopping.set()
            k.join(5)
    assert consul.calls.count(("renew", "refused")) == 2, consul.calls
    said = [e for e in logs if e["event"] == "session_renew_failed"]
    assert len(said) == 1, logs  # the same refusal again is not said again
    assert "asked again within a second" in said[0]["note"], said
    assert len(waits.waits) >= 2 and all(0 < w <= 1.0 for w in waits.waits[:2]), waits.waits
    assert k.session_id == "s1" and consul.created == 0, consul.calls
