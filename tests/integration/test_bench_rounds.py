"""The bench's rounds on a real cluster: every host flips, or the round fails (no sample)."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fleetbench import BenchFleet, NaivePeers
from bench.harness import Figure, RoundFailed, run_rounds
from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.fleet import Fleet
from watcher.config import S3Settings

CLUSTER = ClusterSpec(hosts=2)


@pytest.fixture
def naive(consul_bin: str, cluster: ConsulCluster, tmp_path: Path) -> Iterator[NaivePeers]:
    peers = NaivePeers(consul_bin, cluster.hosts, tmp_path / "naive")
    peers.start()
    try:
        yield peers
    finally:
        peers.stop()


class TestNaivePeerRound:
    def test_every_peer_flips_or_the_round_fails(self, naive: NaivePeers) -> None:
        flips = naive.round("r-first", timeout=20)
        assert len(flips) == 2
        assert all(0 <= f < 20 for f in flips)
        for agent in naive.agents:
            assert (naive.dir_of(agent) / "current").readlink() == Path("releases/r-first")

        # One peer is gone: its host keeps the old release, and the round has no sample.
        gone = naive.procs[1]
        os.killpg(gone.pid, signal.SIGKILL)
        gone.wait(10)
        latency = Figure("naive last flip", "ms")

        def one_round(i: int) -> list[float | None]:
            times = naive.round(f"r-{i}", timeout=5)
            return [max(times) * 1000]

        with pytest.raises(RoundFailed, match=r"1 of 2 hosts did not flip: host-2: current is"):
            run_rounds([latency], 3, one_round)
        assert latency.median() is None
        assert latency.failed.startswith("round 1:")
        assert (naive.dir_of(naive.agents[0]) / "current").readlink() == Path("releases/r-0")


class TestDeployRound:
    def test_a_deploy_that_does_not_commit_fails_the_round(
        self, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
    ) -> None:
        fleet = BenchFleet(
            cluster,
            Fleet(
                cluster,
                s3_settings,
                tmp_path / "hosts",
                kv_prefix="benchtest",
                daemon_extra={"listen": "127.0.0.1:0"},
            ),
        )
        fleet.start()
        try:
            record = fleet.publish_prefetched("v1")
            _, flips, result = fleet.deploy_flips(record)
            assert result["result"] == "committed"
            assert len(flips) == 2
            usage = fleet.usage()
            assert set(usage) == {"host-1", "host-2"}
            assert all(u.cpu_after_read > 0 and u.requests > 0 for u in usage.values())

            # an artifact id with no record in KV: watcherctl refuses the deploy
            missing = dataclasses.replace(record, id="main-00000000")
            with pytest.raises(RoundFailed, match="watcherctl deploy exited"):
                fleet.deploy_flips(missing)
        finally:
            fleet.stop()
