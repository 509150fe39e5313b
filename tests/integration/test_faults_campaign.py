"""A short fault campaign (CI's share of `make faults`), and proof that its checker does not lie."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import invariants as inv
from tests.faults.campaign import FAULTS, Campaign
from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.fleet import WatcherProc, wait_for
from tests.support.s3server import S3Server

pytestmark = pytest.mark.root

CLUSTER = ClusterSpec(hosts=5)
SHORT_CAMPAIGN = 20
SEED = int(os.environ.get("WATCHER_FAULTS_SEED", "0")) or int.from_bytes(os.urandom(4), "big")


@pytest.fixture(scope="module")
def campaign(
    cluster: ConsulCluster, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Campaign]:
    """A started 5-host fleet behind the faulty S3 proxy, on its baseline release."""
    if os.geteuid() != 0:
        pytest.fail("the fault campaign needs root (tmpfs, nftables); this machine runs as root")
    if not s3_server.running:
        s3_server.start()
    print(f"\nfault campaign seed {SEED} (set WATCHER_FAULTS_SEED={SEED} to replay)")
    # A 10 s prepare deadline (make faults: 20 s) bounds what a full disk or a persistent S3
    # error costs (they abort only at the deadline, see docs/reliability.md), so a seed that
    # draws several of them still ends in well under 5 minutes.
    c = Campaign(
        cluster,
        s3_server.endpoint_url,
        tmp_path_factory.mktemp("faults"),
        SEED,
        prepare_timeout=10.0,
    )
    try:
        c.start()
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def frozen(*ws: WatcherProc) -> Iterator[None]:
    """SIGSTOP the watchers (well inside their session TTL), so nothing repairs a tampered fleet."""
    for w in ws:
        assert w.proc is not None
        os.killpg(w.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for w in ws:
            assert w.proc is not None
            os.killpg(w.proc.pid, signal.SIGCONT)


def flip_by_hand(w: WatcherProc, release: str) -> None:
    link = w.app_dir / "current.tampered"
    link.symlink_to(Path("releases") / release)
    link.rename(w.app_dir / "current")


class TestShortCampaign:
    @pytest.mark.timeout(420)  # expected ~2 min; a seed heavy in deadline-bound faults ~4
    def test_twenty_fault_deploys_leave_no_violation(self, campaign: Campaign) -> None:
        report = campaign.run(range(1, SHORT_CAMPAIGN + 1))
        print("\n" + report.render())
        summary = report.summary()
        assert summary["deploys"] == SHORT_CAMPAIGN
        assert set(summary["faults"]) <= set(FAULTS)
        assert summary["commits"] + summary["aborts"] + summary["not_started"] == SHORT_CAMPAIGN
        assert not report.violations, report.render()


@pytest.fixture
def settled(campaign: Campaign) -> Iterator[Campaign]:
    """The campaign's fleet with a clean record: what its monitor saw of tampering is dropped."""
    campaign.monitor.take()
    assert campaign.check(status_wait=10) == [], "the fleet is not settled before tampering"
    yield campaign
    campaign.monitor.take()


class TestCheckerDoesNotLie:
    def test_a_host_flipped_to_an_uncommitted_release_is_reported(self, campaign: Campaign) -> None:
        assert campaign.check(status_wait=0) == []
        victim = campaign.watchers[1]
        on = victim.current()
        assert on is not None
        fake = "20990101T000000Z-main-deadbeef"  # a complete tree no deploy ever committed
        with frozen(victim):
            shutil.copytree(victim.app_dir / "releases" / on, victim.app_dir / "releases" / fake)
            flip_by_hand(victim, fake)
            campaign.monitor.sample()
            try:
                found = campaign.check(status_wait=0)
            finally:
                flip_by_hand(victim, on)
                shutil.rmtree(victim.app_dir / "releases" / fake)
        kinds = {(v.kind, v.node) for v in found}
        assert ("uncommitted_release", victim.name) in kinds, found
        assert ("not_converged", victim.name) in kinds, found
        assert ("status_disagrees", victim.name) in kinds, found  # its host record says `on`
        assert any(fake in v.detail for v in found if v.kind == "uncommitted_release")

    def test_a_flip_undone_before_the_check_is_still_reported(self, settled: Campaign) -> None:
        campaign = settled
        victim = campaign.watchers[2]
        on = victim.current()
        assert on is not None
        fake = "20990101T000001Z-main-feedface"
        with frozen(victim):
            shutil.copytree(victim.app_dir / "releases" / on, victim.app_dir / "releases" / fake)
            flip_by_hand(victim, fake)
            wait_for(  # the monitor's thread samples every 20 ms
                lambda: fake in campaign.monitor.seen.get(victim.name, set()),
                10,
                "the monitor saw the flip",
            )
            flip_by_hand(victim, on)
            shutil.rmtree(victim.app_dir / "releases" / fake)
        found = campaign.check(status_wait=0)
        assert [(v.kind, v.node) for v in found] == [("uncommitted_release", victim.name)], found

    def test_inflight_left_behind_is_reported(self, settled: Campaign) -> None:
        campaign = settled
        key = inv.app_base(campaign.prefix, "web") + "inflight"
        with frozen(*campaign.watchers):
            status, _ = campaign.cluster.server.request(
                "PUT", "/v1/kv/" + key, b"20990101T000000Z-abcdef"
            )
            assert status == 200
            try:
                found = campaign.check(status_wait=0)
            finally:
                campaign.cluster.server.request("DELETE", "/v1/kv/" + key)
        assert [v.kind for v in found] == ["inflight_left"], found
        assert "20990101T000000Z-abcdef" in found[0].detail

    def test_a_current_without_release_json_is_reported(self, settled: Campaign) -> None:
        campaign = settled
        victim = campaign.watchers[0]
        on = victim.current()
        assert on is not None
        marker = victim.app_dir / "releases" / on / ".watcher" / "release.json"
        with frozen(victim):
            saved = marker.read_bytes()
            marker.unlink()
            try:
                campaign.monitor.sample()
                found = campaign.check(status_wait=0)
            finally:
                marker.write_bytes(saved)
        assert {(v.kind, v.node) for v in found} == {("current_incomplete", victim.name)}, found
