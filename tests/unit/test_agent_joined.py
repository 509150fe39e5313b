"""Since when a host is in an app's fleet (``AppAgent.first_index``, DESIGN.md 6.4.5): the
pure bookkeeping, with a small stand-in for the KV reads it makes (the integration test
``TestOneHostDeploys`` runs it against Consul)."""

from __future__ import annotations

import contextlib
import json
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from watcher import agent as agent_module
from watcher.agent import JOINED_FILE, AppAgent
from watcher.errors import ConsulUnavailable
from watcher.records import HostRecord, NodeProgress

SESSION = "11111111-2222-3333-4444-555555555555"
DAEMON_FIRST = 100  # the watcher's first session, in its days of other apps


@dataclass
class Entry:
    value: bytes | None = None
    create_index: int = 0
    session: str | None = None


class FakeKV:
    """The host record read ``first_index`` makes; ``fail`` makes the next reads fail."""

    def __init__(self, record_first_index: int | None = None) -> None:
        self.record = (
            None
            if record_first_index is None
            else HostRecord(
                node="host-2", release=None, last_seen="x", first_index=record_first_index
            ).to_json()
        )
        self.fail = 0

    def kv_get(self, _key: str) -> Entry | None:
        if self.fail:
            self.fail -= 1
            raise ConsulUnavailable("Consul at 127.0.0.1:8500 unreachable (test)")
        return Entry(self.record, 1) if self.record is not None else None


def make_agent(state_dir: Path, kv: FakeKV) -> AppAgent:
    agent = AppAgent.__new__(AppAgent)  # only what first_index's bookkeeping touches
    agent.node = "host-2"
    agent.store = types.SimpleNamespace(
        consul=kv, keys=types.SimpleNamespace(host=lambda node: f"hosts/{node}")
    )
    agent.engine = types.SimpleNamespace(layout=types.SimpleNamespace(state_dir=state_dir))
    agent.session = lambda: SESSION
    agent._daemon_first_index = lambda: DAEMON_FIRST
    agent._kv_first_index = None
    warnings: list[str] = []
    agent.warnings = warnings  # type: ignore[attr-defined]
    agent.log = types.SimpleNamespace(warning=lambda event, **_k: warnings.append(event))
    agent._reported = set()
    agent._host_lock = threading.Lock()
    agent._host_state = ("release", "", "")
    agent._joined_index = agent._read_joined_index()
    agent._joined_written = agent._joined_index
    return agent


def own_key(create_index: int) -> Entry:
    return Entry(b"{}", create_index, SESSION)


def journaled(state_dir: Path) -> Any:
    path = state_dir / JOINED_FILE
    return json.loads(path.read_text())["member_index"] if path.exists() else None


class TestFirstIndex:
    def test_a_new_app_counts_from_its_first_member_key(self, tmp_path: Path) -> None:
        agent = make_agent(tmp_path, FakeKV())
        assert agent.first_index() == DAEMON_FIRST  # before it joined: the cautious value
        assert agent._record_first_index() == 0  # readers: not a member yet
        agent._note_joined(own_key(5000))
        assert agent.first_index() == 5000 == journaled(tmp_path)
        assert agent._record_first_index() == 5000
        assert agent._host_state is None  # the host record says it at the next write
        # A restart reads it back; a later member key (a new session) changes nothing.
        again = make_agent(tmp_path, FakeKV(5000))
        again._note_joined(own_key(9000))
        assert again.first_index() == 5000 == journaled(tmp_path)

    def test_a_host_of_an_earlier_version_keeps_its_older_record(self, tmp_path: Path) -> None:
        """Its record holds the session's index (older than its member key): no host trusts
        more than before for an app it was already in."""
        agent = make_agent(tmp_path, FakeKV(record_first_index=40))
        assert agent.first_index() == 40  # the smaller of record and session
        agent._note_joined(own_key(5000))
        assert agent.first_index() == 40 == journaled(tmp_path)

    def test_before_joining_a_record_says_no_more_than_the_session(self, tmp_path: Path) -> None:
        # A record its own token rewrote to a huge index does not make it trust everything.
        agent = make_agent(tmp_path, FakeKV(record_first_index=10**12))
        assert agent.first_index() == DAEMON_FIRST

    def test_an_unreadable_record_is_never_written_back_as_zero(self, tmp_path: Path) -> None:
        """Upgraded host, record unreadable for a moment: nothing is noted, and the record
        it writes says the cautious index, not 0 (a 0 there erased the only trace of when
        it joined, and its next note took its newest member key)."""
        kv = FakeKV(record_first_index=40)
        agent = make_agent(tmp_path, kv)
        kv.fail = 2
        agent._note_joined(own_key(5000))
        assert agent._joined_index == 0 and journaled(tmp_path) is None
        assert agent._record_first_index() == DAEMON_FIRST
        agent._note_joined(own_key(5000))  # readable again
        assert agent.first_index() == 40

    def test_a_note_the_disk_refused_is_kept_and_written_later(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        agent = make_agent(tmp_path, FakeKV())
        real = agent_module.atomic_write_json

        def full(*_args: Any, **_kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(agent_module, "atomic_write_json", full)
        agent._note_joined(own_key(300))
        agent._note_joined(own_key(300))  # every step tries again; said once
        assert agent.first_index() == 300 and journaled(tmp_path) is None
        assert agent.warnings == ["joined_index_not_written"]  # type: ignore[attr-defined]
        monkeypatch.setattr(agent_module, "atomic_write_json", real)
        agent._note_joined(own_key(5000))  # a new session's key, the disk back
        assert agent.first_index() == 300 == journaled(tmp_path)

    def test_indexes_going_back_lower_it_other_sessions_keys_do_not(self, tmp_path: Path) -> None:
        """A cluster rebuilt from a snapshot hands out indexes below the noted one: the
        own key then lowers it (more cautious). A key its token wrote for another session
        is not this watcher's membership."""
        agent = make_agent(tmp_path, FakeKV())
        agent._note_joined(own_key(5000))
        agent._note_joined(Entry(b"{}", 20, "another-session"))
        assert agent.first_index() == 5000
        agent._note_joined(own_key(700))
        assert agent.first_index() == 700 == journaled(tmp_path)

    @pytest.mark.parametrize(
        "text",
        [
            '{"member_index": Infinity}',
            '{"member_index": 1e300}',
            '{"member_index": 18446744073709551616}',
            '{"member_index": true}',
            '{"member_index": -5}',
            '{"member_index": "12"}',
            "[" * 100_000,
            "[]",
            "",
        ],
    )
    def test_a_joined_file_that_is_not_a_sane_index_is_none(
        self, tmp_path: Path, text: str
    ) -> None:
        (tmp_path / JOINED_FILE).write_text(text)
        agent = make_agent(tmp_path, FakeKV())
        assert agent._joined_index == 0
        assert agent.first_index() == DAEMON_FIRST


class TestLeftOutAlarm:
    """The alarm a host raises for a one-host deploy it was left out of (DESIGN.md 6.4.5)
    is lifted once the host learns it joined after that deploy: it then follows it."""

    ACKED_AT = 60  # the one-host deploy's ack: after host-2 joined (40), before its session

    def make(self, tmp_path: Path, kv: FakeKV) -> tuple[AppAgent, list[str], list[str]]:
        agent = make_agent(tmp_path, kv)
        cleared: list[str] = []
        raised: list[str] = []
        started: list[str] = []
        joined = types.SimpleNamespace(
            id="d-solo", create_index=50, request=types.SimpleNamespace(release="r2")
        )

        def committed_or_why(deploy: str, *, node: str, first_index: int) -> Any:
            assert deploy == "d-solo" and node == "host-2"
            if first_index > self.ACKED_AT:
                return None, "only host-3 acked"
            return joined, ""

        agent.store.committed_or_why = committed_or_why  # type: ignore[attr-defined]
        agent.app = types.SimpleNamespace(name="web")
        agent.status = agent_module.AgentStatus()
        agent.health = types.SimpleNamespace(
            clear_alarm=cleared.append, alarm=lambda app, message: raised.append(app)
        )
        agent.raised = raised  # type: ignore[attr-defined]
        agent.log = types.SimpleNamespace(
            info=lambda *_a, **_k: None,
            error=lambda *_a, **_k: None,
            warning=lambda *_a, **_k: None,
        )
        agent._not_followed = None
        agent._contested_alarm, agent._contested_unplaced = "", None
        agent._start_hold_seen = False
        agent.journal = types.SimpleNamespace(read=lambda: None)  # type: ignore[assignment]
        agent.engine.current_release = lambda: "r1"  # type: ignore[attr-defined]
        agent._live_broken = lambda _release: False  # type: ignore[method-assign]
        agent.engine.held = lambda: None  # type: ignore[attr-defined]
        agent.converge_journal = types.SimpleNamespace(read=lambda: None)
        agent.busy = lambda: False  # type: ignore[method-assign]
        agent._converge_retry_at = 0.0
        agent._converge_failures = 0
        agent._apply_retry = None
        agent.metrics = None
        agent._acks_looked = None
        agent._moved_here = None
        # No later deploy by the acks (``newest_committed``, tested on a real Consul).
        agent._later_than_current = lambda _current, _local: None  # type: ignore[method-assign]
        agent._write_host = lambda *_a, **_k: None  # type: ignore[method-assign]
        agent._applied_index = lambda: 0  # type: ignore[method-assign]
        agent._check_pin_of = lambda _request: None  # type: ignore[method-assign]
        agent._start = lambda kind, deploy, _work: started.append(f"{kind} {deploy}") or kind  # type: ignore[method-assign]
        return agent, cleared, started

    def current(self) -> Any:
        return types.SimpleNamespace(deploy="d-solo", release="r2"), 0

    def test_lifted_once_the_host_learns_it_joined_before_the_deploy(self, tmp_path: Path) -> None:
        kv = FakeKV(record_first_index=40)
        agent, cleared, started = self.make(tmp_path, kv)
        kv.fail = 100  # its record unreadable at first: the cautious index, its session's
        assert agent.first_index() == DAEMON_FIRST
        said = agent._converge(self.current())
        assert "only host-3 acked: not followed" in said
        assert (
            agent.status.alarm
            == "current names deploy d-solo, which only host-3 acked: not followed"
        )
        assert started == [] and cleared == [] and agent.raised == ["web"]  # type: ignore[attr-defined]
        agent._converge(self.current())  # said once, not raised again at every step
        assert started == [] and cleared == [] and agent.raised == ["web"]  # type: ignore[attr-defined]

        kv.fail = 0
        agent._note_joined(own_key(5000))  # the record read: in the app since index 40
        assert agent.first_index() == 40
        assert agent._converge(self.current()) == "converge"
        assert started == ["converge d-solo"]
        assert agent.status.alarm == "" and cleared == ["web"]
        assert agent._not_followed is None

    def test_a_contested_alarm_raised_since_is_not_lifted_with_it(self, tmp_path: Path) -> None:
        kv = FakeKV(record_first_index=40)
        agent, cleared, _started = self.make(tmp_path, kv)
        kv.fail = 100
        agent._converge(self.current())
        assert agent.status.alarm.startswith("current names deploy d-solo")
        kv.fail = 0
        agent.status.alarm = "deploy d-9 is contested: host-3's ack was rewritten"
        agent._note_joined(own_key(5000))
        agent._converge(self.current())
        assert agent.status.alarm == "deploy d-9 is contested: host-3's ack was rewritten"
        assert cleared == [] and agent._not_followed is None

    def test_a_long_alarm_is_raised_once_and_lifted_when_current_moves(
        self, tmp_path: Path
    ) -> None:
        """The code review: cutting an alarm's text twice changed it, so a long one never
        equalled the one raised before: raised again at every cycle, and never lifted."""
        kv = FakeKV(record_first_index=40)
        agent, cleared, _started = self.make(tmp_path, kv)
        long_why = "host-2 flipped to, but " + "x" * 1500
        trusted = types.SimpleNamespace(
            id="d-next", create_index=50, request=types.SimpleNamespace(release="r3")
        )
        agent.store.committed_or_why = lambda deploy, **_k: (  # type: ignore[attr-defined]
            (None, long_why) if deploy == "d-solo" else (trusted, "")
        )
        for _ in range(3):
            agent._converge(self.current())
        assert agent.raised == ["web"], agent.raised  # type: ignore[attr-defined]
        assert len(agent.status.alarm) == agent_module.ALARM_MAX
        agent._converge((types.SimpleNamespace(deploy="d-next", release="r3"), 0))
        assert cleared == ["web"] and agent.status.alarm == ""

    def contested_without_its_hold(
        self, tmp_path: Path, kv: FakeKV, deploy: str = "d-9"
    ) -> tuple[AppAgent, list[str], list[Any], list[str]]:
        """An agent in ``deploy`` (its journal's) whose holds.json is ``holds[0]``; its writes
        fail while ``disk`` says so."""
        from watcher.releases import Hold

        agent, cleared, _started = self.make(tmp_path, kv)
        journal: dict[str, Any] = {"deploy": deploy}
        agent.journal = types.SimpleNamespace(  # type: ignore[assignment]
            update=journal.update, read=lambda: journal
        )
        holds: list[Any] = [None]
        disk = ["read-only file system"]

        def hold(reason: str, by: str) -> Hold:
            if disk[0]:
                raise OSError(disk[0])
            holds[0] = Hold(reason=reason, by=by, at="2026-12-06T12:00:00Z")
            return holds[0]  # type: ignore[no-any-return]

        agent.engine.hold = hold  # type: ignore[attr-defined]
        agent.engine.held = lambda: holds[0]  # type: ignore[attr-defined]
        agent.engine.lock = lambda **_k: contextlib.nullcontext()  # type: ignore[attr-defined]
        return agent, cleared, holds, disk

    def test_a_contested_alarm_whose_hold_failed_stays_until_its_hold_is_placed_and_released(
        self, tmp_path: Path
    ) -> None:
        """The code review: its hold's write failed, the contested alarm was lifted at the
        next cycle for "no hold now", and nothing said the deploy was contested. Then (the
        previous stop's note) it stayed until a restart: no hold to release."""
        kv = FakeKV(record_first_index=40)
        agent, cleared, holds, disk = self.contested_without_its_hold(tmp_path, kv)
        agent._contested(types.SimpleNamespace(id="d-9"), "host-3 ...")  # type: ignore[arg-type]
        alarm = "deploy d-9 is contested: host-3 ..."
        assert agent.status.alarm == alarm and holds == [None]
        assert agent.journal.read()["held"] is False
        agent._converge((None, 0))  # the disk still refuses: the alarm stays, no hold
        assert agent.status.alarm == alarm and cleared == [] and holds == [None]
        disk[0] = ""
        agent._converge((None, 0))  # placed at the next cycle that can
        assert holds[0].reason == alarm and holds[0].by == "watcher on host-2"
        assert agent.status.alarm == alarm and cleared == []
        assert agent.journal.read()["held"] is True
        holds[0] = None  # `release-hold`
        agent._converge((None, 0))
        assert agent.status.alarm == "" and cleared == ["web"]

    def test_a_contested_alarm_under_an_operators_hold_gets_its_own_hold_when_that_goes(
        self, tmp_path: Path
    ) -> None:
        """An operator's hold there before (the second attacker round): its release says
        nothing of this deploy, so it does not lift the alarm; the contested deploy's own
        hold is placed then, whose release does (it stayed until a restart before)."""
        from watcher.releases import Hold

        kv = FakeKV(record_first_index=40)
        agent, cleared, holds, disk = self.contested_without_its_hold(tmp_path, kv, "d-10")
        disk[0] = ""
        holds[0] = operators = Hold(reason="disk swap", by="alice@laptop", at="")
        agent._contested(types.SimpleNamespace(id="d-10"), "host-3 ...")  # type: ignore[arg-type]
        alarm = "deploy d-10 is contested: host-3 ..."
        assert agent.status.alarm == alarm and holds[0] is operators
        agent._converge((None, 0))
        assert agent.status.alarm == alarm and holds[0] is operators
        holds[0] = None  # the operator releases theirs
        agent._converge((None, 0))
        assert agent.status.alarm == alarm and cleared == []
        assert holds[0] is not None and holds[0].reason == alarm
        holds[0] = None  # and then the contested deploy's
        agent._converge((None, 0))
        assert agent.status.alarm == "" and cleared == ["web"]

    def test_a_contested_alarm_whose_hold_failed_is_raised_again_after_a_restart(
        self, tmp_path: Path
    ) -> None:
        kv = FakeKV(record_first_index=40)
        agent, _cleared, holds, _disk = self.contested_without_its_hold(tmp_path, kv)
        agent._contested(types.SimpleNamespace(id="d-9"), "host-3 ...")  # type: ignore[arg-type]
        journal = agent.journal.read()
        # A new process: the journal on disk, no alarm in memory, still no hold.
        again, _, _, disk = self.contested_without_its_hold(tmp_path / "b", kv)
        again.journal.read().update(journal, finished=True)
        again._converge(self.current())
        assert again.status.alarm == "deploy d-9 is contested: host-3 ..." and holds == [None]
        disk[0] = ""
        again._converge(self.current())
        assert again.engine.held().reason == again.status.alarm  # type: ignore[attr-defined]

    @staticmethod
    def stepping(agent: AppAgent, joined: Any) -> tuple[Callable[[], str], list[str]]:
        """A step of contested deploy ``joined`` (its outcome written, this host's part
        done), and the parts it counts."""
        agent.store.outcome = lambda _deploy: {"result": "contested"}  # type: ignore[attr-defined]
        agent._after_own_part = lambda *_a: "waiting"  # type: ignore[method-assign]
        counted: list[str] = []
        agent._count_part = lambda _joined, part: counted.append(part)  # type: ignore[method-assign]
        return lambda: agent._drive(joined, agent.journal.read(), None, 0), counted

    def test_a_contested_deploy_still_stepped_places_its_hold_once_it_can(
        self, tmp_path: Path
    ) -> None:
        """The deploy's own step: a hold that was never placed is not an operator's release
        ("no hold" once the deploy had its outcome ended this host's part, lifting the
        alarm); the hold is placed at the next step that can, and its release ends it."""
        from watcher.releases import Hold

        kv = FakeKV(record_first_index=40)
        agent, cleared, holds, disk = self.contested_without_its_hold(tmp_path, kv, "d-10")
        holds[0] = Hold(reason="disk swap", by="alice@laptop", at="")  # the operator's
        joined = types.SimpleNamespace(id="d-10", create_index=50, request=None)
        agent._contested(joined, "host-3 ...")  # type: ignore[arg-type]
        alarm = "deploy d-10 is contested: host-3 ..."
        step, counted = self.stepping(agent, joined)
        assert step() == "contested; held, waiting for an operator (waiting)"
        holds[0] = None  # the operator releases theirs
        disk[0] = "no space left on device"
        assert step().startswith("contested; held") and agent.status.alarm == alarm
        assert holds == [None] and counted == [] and cleared == []
        disk[0] = ""
        assert step().startswith("contested; held") and holds[0].reason == alarm
        assert agent.journal.read()["held"] is True
        holds[0] = None  # `release-hold` of the contested deploy's own hold
        assert step() == "contested deploy released by an operator"
        assert agent.status.alarm == "" and cleared == ["web"] and counted == ["contested"]

    def test_a_contested_deploy_looked_at_again_finds_its_own_hold_placed(
        self, tmp_path: Path
    ) -> None:
        """The code review: its journal write failed after the hold (a full disk), the next
        cycle judged the deploy again and found a hold "there": its own, taken as not
        placed, so `release-hold` placed it again and had to be run twice."""
        kv = FakeKV(record_first_index=40)
        agent, cleared, holds, disk = self.contested_without_its_hold(tmp_path, kv)
        disk[0] = ""
        joined = types.SimpleNamespace(id="d-9")
        agent._contested(joined, "host-3 ...")  # type: ignore[arg-type]
        agent._contested(joined, "host-3 ...")  # type: ignore[arg-type]
        assert agent._contested_unplaced is None and agent.journal.read()["held"] is True
        # and a journal that says not placed (its write deferred) next to its own hold
        agent.journal.read()["held"] = False
        step, _counted = self.stepping(agent, types.SimpleNamespace(id="d-9", create_index=50))
        assert step().startswith("contested; held")
        holds[0] = None  # one `release-hold`
        assert step() == "contested deploy released by an operator" and holds == [None]
        assert agent.status.alarm == "" and cleared == ["web"]

    def test_a_hold_not_placed_is_placed_after_another_alarm_took_the_slot(
        self, tmp_path: Path
    ) -> None:
        """The code review: the not-followed alarm (`current` naming the contested deploy)
        replaced the contested one, and the hold that could not be written was then never
        placed: only a restart placed it."""
        kv = FakeKV(record_first_index=40)
        agent, _cleared, holds, disk = self.contested_without_its_hold(tmp_path, kv)
        agent._contested(types.SimpleNamespace(id="d-9"), "host-3 ...")  # type: ignore[arg-type]
        kv.fail = 100
        agent._converge(self.current())  # `current` names d-solo: not followed
        assert agent.status.alarm.startswith("current names deploy d-solo"), agent.status.alarm
        assert holds == [None]
        disk[0] = ""
        agent._converge(self.current())
        assert holds[0] is not None and holds[0].reason == "deploy d-9 is contested: host-3 ..."
        # `current` moves on: the not-followed alarm goes, and the contested deploy's comes
        # back with its hold (the second code review: held, and no alarm said why).
        trusted = types.SimpleNamespace(id="d-next", create_index=60, request=None)
        agent.store.committed_or_why = lambda deploy, **_k: (trusted, "")  # type: ignore[attr-defined]
        agent._converge((types.SimpleNamespace(deploy="d-next", release="r3"), 0))
        assert agent.status.alarm == "deploy d-9 is contested: host-3 ..."

    def test_a_hold_written_though_its_write_raised_is_released_once(self, tmp_path: Path) -> None:
        """The second code review: the hold renamed into place, then its write raised (the
        directory's fsync): taken as not placed, so its release placed it again."""
        from watcher.releases import Hold

        kv = FakeKV(record_first_index=40)
        agent, cleared, holds, _disk = self.contested_without_its_hold(tmp_path, kv)

        def hold_then_raise(reason: str, by: str) -> Hold:
            holds[0] = Hold(reason=reason, by=by, at="")
            raise OSError("EIO on fsync")

        agent.engine.hold = hold_then_raise  # type: ignore[attr-defined]
        agent._contested(types.SimpleNamespace(id="d-9"), "host-3 ...")  # type: ignore[arg-type]
        assert agent._contested_unplaced is not None and holds[0] is not None
        agent._converge((None, 0))
        assert agent._contested_unplaced is None
        holds[0] = None  # one `release-hold`
        agent._converge((None, 0))
        assert holds == [None] and agent.status.alarm == "" and cleared == ["web"]

    def test_current_linked_by_hand_to_what_is_no_release_is_converged_not_raised_on(
        self, tmp_path: Path
    ) -> None:
        """The code review: `ln -sfn releases/hotfix current`, and every reconcile raised
        (InvalidName) on the look for a broken live tree: the host never converged."""
        from watcher.releases import AppLayout, _link_release

        kv = FakeKV(record_first_index=40)
        agent, _cleared, started = self.make(tmp_path, kv)
        del agent._live_broken  # the real look
        layout = AppLayout(tmp_path / "web")
        layout.app_dir.mkdir()
        layout.current.symlink_to("releases/hotfix")
        agent.engine.layout = layout  # type: ignore[attr-defined]
        agent.engine.current_release = lambda: _link_release(layout.current)  # type: ignore[attr-defined]
        agent._converge(self.current())
        assert started == ["converge d-solo"]

    def test_a_contested_hold_found_after_a_restart_raises_its_alarm_again(
        self, tmp_path: Path
    ) -> None:
        """The code review: a host that found a deploy contested after its own part, then
        restarted, kept the hold on disk but no alarm (/health 200, `status --fleet` 0)."""
        from watcher.releases import Hold

        kv = FakeKV(record_first_index=40)
        agent, _cleared, _started = self.make(tmp_path, kv)
        reason = "deploy d-9 is contested: acks contradict each other"
        own = Hold(reason=reason, by="watcher on host-2", at="2026-12-06T12:00:00Z")
        agent.engine.held = lambda: own  # type: ignore[attr-defined]
        agent._converge(self.current())
        assert agent.status.alarm == reason and agent._contested_alarm == reason
        # An operator's hold of the same words is not the watcher's: no alarm from it.
        agent2, _, _ = self.make(tmp_path / "b", kv)
        theirs = Hold(reason=reason, by="alice@laptop", at=own.at)
        agent2.engine.held = lambda: theirs  # type: ignore[attr-defined]
        agent2._converge(self.current())
        assert agent2.status.alarm == ""

    def test_a_released_contested_alarm_is_lifted_and_the_other_raised_again(
        self, tmp_path: Path
    ) -> None:
        """The attacker review: a host that found a deploy contested after its own part
        kept that alarm once an operator released the hold (/health 503, `status --fleet`
        exit 1, until a restart), and the not-followed alarm it had raised before never
        came back: it was "said already"."""
        kv = FakeKV(record_first_index=40)
        agent, cleared, _started = self.make(tmp_path, kv)
        kv.fail = 100
        agent._converge(self.current())
        followed = agent.status.alarm
        assert followed.startswith("current names deploy d-solo")
        held: list[Any] = [object()]
        agent.engine.held = lambda: held[0]  # type: ignore[attr-defined]
        agent._contested_alarm = agent.status.alarm = "deploy d-9 is contested: host-3 ..."
        agent._converge(self.current())  # held: stays
        assert agent.status.alarm == "deploy d-9 is contested: host-3 ..." and cleared == []
        held[0] = None  # `release-hold`
        agent._converge(self.current())
        assert cleared == ["web"] and agent._contested_alarm == ""
        assert agent.status.alarm == followed  # raised again, not left unsaid
        assert agent.raised == ["web", "web"]  # type: ignore[attr-defined]


def test_an_alarm_is_cut_and_names_are_counted_not_listed() -> None:
    """The attacker review: a forged request of 600 long names made each host store a 77 KB
    alarm, and write it into its host record at every raise."""
    from watcher.barrier import _changed_after_commit

    names = [f"n{i:04d}" + "x" * 120 for i in range(600)]
    why = _changed_after_commit(names, "no ready ack of " + ", ".join(names))
    assert len(why) < 2000 and "and 595 more" in why, len(why)
    alone = _changed_after_commit(["host-3"], "no ready ack of host-1")
    assert alone.endswith(
        "an ack changed after the commit (contested), or host-3's token forged it"
    )
    assert _changed_after_commit([], "anything") == ""
    cut = agent_module.alarm_text("a" * 5000)
    assert len(cut) == agent_module.ALARM_MAX and cut.endswith("[5000 characters, cut]")
    assert agent_module.alarm_text(cut) == cut  # compared with the alarm raised before
    assert agent_module.alarm_text("short") == "short"


def test_a_prune_keeps_what_the_fleets_current_names(tmp_path: Path) -> None:
    """The fleet's rollback target (`current.previous`) is kept like this host's own
    previous, from the `current` the loop last saw: no read of its own."""
    from watcher.records import CurrentRecord

    agent = AppAgent.__new__(AppAgent)
    asked: list[dict[str, str]] = []

    def plan_prune(*, in_flight: set[str], fleet: dict[str, str]) -> Any:
        asked.append(fleet)
        return types.SimpleNamespace(blocked=None, held_back=[])

    agent.engine = types.SimpleNamespace(plan_prune=plan_prune)
    agent.journal = types.SimpleNamespace(read=lambda: None)
    agent.status = agent_module.AgentStatus()
    agent.metrics = None
    agent.app = types.SimpleNamespace(name="web")
    agent._fleet_current = CurrentRecord(
        release="20260101T000004Z-b-4",
        artifact="b-4",
        sha256="a" * 64,
        deploy="20260101T000004Z-abcdef",
        previous={
            "release": "20260101T000001Z-b-1",
            "artifact": "b-1",
            "sha256": "a" * 64,
            "deploy": "20260101T000001Z-abcdef",
        },
    )
    agent._prune(dry_run=True)
    assert asked == [
        {
            "20260101T000004Z-b-4": "the fleet's release",
            "20260101T000001Z-b-1": "the fleet's previous release (rollback target)",
        }
    ]
    # Just applied a deploy whose end has not come yet: `current` will name it, and the
    # release `current` names now becomes its `previous` (the one before goes).
    agent._prune(dry_run=True, committed=("20260101T000005Z-abcdef", "20260101T000005Z-b-5"))
    assert asked[-1] == {
        "20260101T000005Z-b-5": "the fleet's release",
        "20260101T000004Z-b-4": "the fleet's previous release (rollback target)",
    }
    # ... and once `current` names it (the end came first), as it says.
    agent._prune(dry_run=True, committed=("20260101T000004Z-abcdef", "20260101T000004Z-b-4"))
    assert asked[-1] == asked[0]
    agent._fleet_current = None
    agent._prune(dry_run=True)
    assert asked[-1] == {}


class TestAnotherWatcherOfThisNode:
    """A deploy whose request names the session holding this node's member key, which is
    not this watcher's (`_join`)."""

    S1, S2 = "s1" * 18, "s2" * 18

    class Proceeded(Exception):
        pass

    def agent(self, calls: list[str], own: str | None = None) -> AppAgent:
        from watcher.barrier import JoinRead

        req = types.SimpleNamespace(
            expected=["host-1"], sessions={"host-1": self.S1}, digest=lambda: "d", as_dict=dict
        )
        entry = types.SimpleNamespace(create_index=10, modify_index=10, session=None)
        a = AppAgent.__new__(AppAgent)
        a.node, a.status = "host-1", agent_module.AgentStatus()
        a.store = types.SimpleNamespace(
            join_read=lambda d, n, artifact=None: JoinRead(
                req, entry, "", False, NodeProgress(node=n, state=own) if own else None, 7
            )
        )
        a._scope = "host-1 watcher/apps/web"
        a._last_prefetched = "x"
        a._prepared, a._own, a._known, a._request_index = {}, {}, {}, {}
        a.session = lambda: self.S2  # type: ignore[method-assign]
        a._bystander = lambda *_a, **_k: calls.append("bystander") or "not expected; waiting"  # type: ignore[method-assign]

        def begin(*_a: Any, **_k: Any) -> None:
            raise self.Proceeded

        a.journal = types.SimpleNamespace(begin=begin)
        return a

    def test_left_to_the_holder_while_it_holds_the_key_then_taken_up(self) -> None:
        """A one-host fleet's watcher restarted with .state/ wiped (a new session) while
        the request names its old one: left to that session while it lives, as a
        bystander; once it expired and this watcher holds the key, the deploy is this
        host's again (it refuses it: another session). It stayed 'left to it' for good,
        blocking every deploy behind its `inflight`."""
        calls: list[str] = []
        a = self.agent(calls)
        a._member_entries = {"host-1": types.SimpleNamespace(session=self.S1)}
        said = a._join("D", 5)
        assert said.startswith("deploy D: expects the other watcher of node host-1"), said
        assert calls == ["bystander"]
        a._member_entries = {"host-1": types.SimpleNamespace(session=self.S2)}
        with pytest.raises(self.Proceeded):
            a._join("D", 5)

    @pytest.mark.parametrize("own", ["staging", "ready"])
    def test_left_to_the_holder_whatever_the_nodes_ack_says(self, own: str) -> None:
        """The node's ack is the holder's, not this watcher's: a twin that read it first
        refused over a staging ack (aborting a good deploy: a CI run of 3817298) and took
        a ready one as its own (it would have staged, flipped and written that host's
        intent and live acks; the review of the fix)."""
        calls: list[str] = []
        a = self.agent(calls, own=own)
        a._member_entries = {"host-1": types.SimpleNamespace(session=self.S1)}
        said = a._join("D", 5)
        assert said.startswith("deploy D: expects the other watcher of node host-1"), said
        assert calls == ["bystander"]


def test_applied_json_counts_as_lost_only_when_missing_or_not_an_object(tmp_path: Path) -> None:
    """A wiped `.state/` gets applied.json written again from the host's own ack; a read
    error is no reason to: the file may name another release than the link, which is
    the evidence of a hand edit (the review of that change)."""
    fake: Any = types.SimpleNamespace(
        engine=types.SimpleNamespace(layout=types.SimpleNamespace(state_dir=tmp_path))
    )
    path = tmp_path / agent_module.APPLIED_NAME
    assert AppAgent._read_applied(fake) == {}  # missing
    for lost in ("not json", "[1, 2]", '"r1"', "\udcff"):
        path.write_text(lost, errors="surrogateescape")
        assert AppAgent._read_applied(fake) == {}, lost
    path.write_text('{"release": "r1", "deploy": "d1", "create_index": 7}')
    assert AppAgent._read_applied(fake) == {"release": "r1", "deploy": "d1", "create_index": 7}
    path.unlink()
    path.mkdir()  # cannot be read (EISDIR): nothing said of its content
    assert AppAgent._read_applied(fake) is None
