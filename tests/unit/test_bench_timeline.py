"""bench/timeline.py reads the hosts' logs right: the steps of each deploy, in ms after the
first host's prepare, only for deploys every host got through to its flip."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.timeline import timeline

T0 = datetime(2026, 12, 4, 19, 0, 0, tzinfo=UTC)


def line(ms: float, event: str, **fields: Any) -> str:
    at = (T0 + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")
    return json.dumps({"timestamp": at.replace("+00:00", "Z"), "event": event, **fields})


def host_log(
    root: Path, host: str, deploy: str, release: str, start: float, *, flip: bool = True
) -> None:
    """One host's part of ``deploy``: prepare from ``start`` ms, staged 10 ms later, ready
    at 20 (took 20), established at 40, flipped at 100 (unless ``flip`` is False)."""
    lines = [
        line(start + 5, "cycle", outcome=f"web: deploy {deploy}: prepare started"),
        line(start + 10, "release_staged", release=release),
        line(start + 20, "prepare_ready", deploy=deploy, release=release, took_ms=20),
        line(start + 40, "deploy_established", deploy=deploy, outcome="commit"),
    ]
    if flip:
        lines.append(line(start + 100, "release_flipped", release=release))
    log = root / host / "watcher.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write("not json: a traceback line\n" + "\n".join(lines) + "\n")


class TestTimeline:
    def test_the_last_and_first_host_of_each_step(self, tmp_path: Path) -> None:
        for host, start in (("host-1", 0.0), ("host-2", 30.0)):
            host_log(tmp_path, host, "d1", "r1", 1000 + start)
            host_log(tmp_path, host, "d2", "r2", 5000 + start * 2)
        rows = timeline(tmp_path, skip=0)
        assert [deploy for deploy, _ in rows] == ["d1", "d2"]
        d1 = {step: round(ms) for step, ms in rows[0][1].items()}
        assert d1["last prepare"] == 30  # host-2 began 30 ms after host-1
        assert d1["last staged"] == 40
        assert d1["last ready"] == 50
        assert (d1["first established"], d1["last established"]) == (40, 70)
        assert (d1["first flip"], d1["last flip"]) == (100, 130)
        assert round(rows[1][1]["last flip"]) == 160
        assert [deploy for deploy, _ in timeline(tmp_path)] == ["d2"]  # the warm-up skipped

    def test_a_deploy_one_host_never_flipped_is_left_out(self, tmp_path: Path) -> None:
        host_log(tmp_path, "host-1", "d1", "r1", 0)
        host_log(tmp_path, "host-2", "d1", "r1", 0, flip=False)
        host_log(tmp_path, "host-1", "d2", "r2", 2000)
        host_log(tmp_path, "host-2", "d2", "r2", 2000)
        assert [deploy for deploy, _ in timeline(tmp_path, skip=0)] == ["d2"]

    def test_a_host_without_the_deploy_leaves_it_out(self, tmp_path: Path) -> None:
        host_log(tmp_path, "host-1", "d1", "r1", 0)
        host_log(tmp_path, "host-2", "d2", "r2", 2000)
        host_log(tmp_path, "host-1", "d2", "r2", 2000)
        assert [deploy for deploy, _ in timeline(tmp_path, skip=0)] == ["d2"]

    def test_a_rollback_to_a_release_does_not_move_the_first_deploy_of_it(
        self, tmp_path: Path
    ) -> None:
        for host in ("host-1", "host-2"):
            host_log(tmp_path, host, "d1", "r1", 0)
            host_log(tmp_path, host, "d2", "r2", 2000)
            # d3 rolls back to r1, still on disk: nothing staged, r1 flipped again
            log = tmp_path / host / "watcher.log"
            with log.open("a") as fh:
                fh.write(line(4020, "prepare_ready", deploy="d3", release="r1", took_ms=20) + "\n")
                fh.write(line(4040, "deploy_established", deploy="d3", outcome="commit") + "\n")
                fh.write(line(4100, "release_flipped", release="r1") + "\n")
        rows = dict(timeline(tmp_path, skip=0))
        assert sorted(rows) == ["d1", "d2"]  # d3 staged nothing: no row
        assert round(rows["d1"]["last flip"]) == 100
