"""The bench's runner does not lie: a round whose hosts do not all flip gives no median."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from bench.harness import (
    Figure,
    Results,
    RoundFailed,
    compile_package,
    flip_times,
    run_rounds,
    thread_cpu_ns,
)
from tests.support.cluster import loopback_from_env

HOSTS = ["host-1", "host-2", "host-3"]


class TestFlipTimes:
    def test_every_host_on_the_release_gives_its_delay(self) -> None:
        times = flip_times(
            "r1",
            HOSTS,
            dict.fromkeys(HOSTS, "r1"),
            {"host-1": 100.2, "host-2": 100.5, "host-3": 100.25},
            100.0,
        )
        assert times == pytest.approx([0.2, 0.5, 0.25])

    def test_a_host_still_on_the_old_release_fails_the_round(self) -> None:
        currents = {"host-1": "r1", "host-2": "r0", "host-3": "r1"}
        with pytest.raises(
            RoundFailed, match=r"1 of 3 hosts did not flip: host-2: current is 'r0'"
        ):
            flip_times("r1", HOSTS, currents, dict.fromkeys(HOSTS, 100.1), 100.0)

    def test_a_host_that_reports_no_flip_fails_the_round(self) -> None:
        flipped: dict[str, float | None] = {"host-1": 100.1, "host-2": 100.1, "host-3": None}
        with pytest.raises(RoundFailed, match="host-3: no flip time"):
            flip_times("r1", HOSTS, dict.fromkeys(HOSTS, "r1"), flipped, 100.0)

    def test_a_host_missing_from_the_report_fails_the_round(self) -> None:
        with pytest.raises(RoundFailed, match="host-3"):
            flip_times("r1", HOSTS, {"host-1": "r1", "host-2": "r1"}, {}, 100.0)

    def test_a_flip_from_before_the_round_is_not_this_rounds(self) -> None:
        with pytest.raises(RoundFailed, match="host-1: flipped before the round started"):
            flip_times(
                "r1",
                HOSTS,
                dict.fromkeys(HOSTS, "r1"),
                {**dict.fromkeys(HOSTS, 100.1), "host-1": 99.0},
                100.0,
            )


class TestRounds:
    def test_medians_of_the_rounds(self) -> None:
        fig = Figure("latency", "ms")
        run_rounds([fig], 3, lambda i: [[30.0, 10.0, 20.0][i]])
        assert fig.median() == 20.0
        assert fig.ours == [30.0, 10.0, 20.0]

    def test_a_failed_round_leaves_no_median_even_of_the_good_rounds(self, tmp_path: Path) -> None:
        latency, skew = Figure("latency", "ms"), Figure("skew", "ms")
        latency.baseline = [100.0, 100.0]

        def one_round(i: int) -> list[float | None]:
            if i == 2:
                flip_times("r2", HOSTS, {"host-1": "r2"}, {"host-1": 1.0}, 0.0)
            return [10.0, 1.0]

        with pytest.raises(RoundFailed):
            run_rounds([latency, skew], 5, one_round)
        assert latency.ours == [10.0, 10.0]  # kept for the record, never summarized
        for fig in (latency, skew):
            assert fig.failed.startswith("round 3: 2 of 3 hosts did not flip")
            assert fig.median() is None
            assert fig.baseline_median() is None
            assert fig.ratio() is None

        results = Results(figures=[latency, skew, Figure("other", "ms", ours=[5.0])])
        table = results.table()
        [latency_row] = [line for line in table.splitlines() if line.startswith("latency")]
        assert "FAILED" in latency_row
        assert "10" not in latency_row.split("FAILED")[0]
        assert results.failed == [latency, skew]
        path = results.write(tmp_path)
        doc = json.loads(path.read_text())
        medians = {f["name"]: f["median"] for f in doc["figures"]}
        assert medians == {"latency": None, "skew": None, "other": 5.0}
        assert json.loads((tmp_path / "latest.json").read_text()) == doc

    def test_ratio_against_the_baseline(self) -> None:
        fig = Figure("x", "ms", ours=[10.0, 30.0, 20.0], baseline=[40.0, 80.0, 90.0])
        assert fig.ratio() == pytest.approx(0.25)
        assert "0.25x" in Results(figures=[fig]).table()


class TestMixedFleetHalves:
    """bench/bench_mixed.py: which hosts run the other revision."""

    def test_the_first_host_runs_this_checkout_and_the_rest_alternate(self) -> None:
        from bench.bench_mixed import BASE, THIS, assign

        names = [f"host-{i}" for i in range(1, 8)]
        plain, swapped = assign(names, False), assign(names, True)
        assert plain["host-1"] == swapped["host-1"] == THIS
        measured = names[1:]
        assert [plain[n] for n in measured].count(BASE) == 3
        assert [plain[n] for n in measured].count(THIS) == 3
        # swapping gives every measured host the other half
        assert all(plain[n] != swapped[n] for n in measured)


def test_the_package_is_compiled_before_anything_is_timed(tmp_path: Path) -> None:
    """Each process the bench starts must find the bytecode written (else it compiles
    what it imports, with PYTHONDONTWRITEBYTECODE, inside the figures); a module that
    does not compile stops the bench instead of being timed half-loaded."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("X = 1\n")
    compile_package(package)
    assert sorted(p.name.split(".")[0] for p in (package / "__pycache__").iterdir()) == [
        "__init__",
        "mod",
    ]
    (package / "bad.py").write_text("def (:\n")
    with pytest.raises(RuntimeError, match="compiling"):
        compile_package(package)


def test_thread_cpu_counts_every_live_thread_to_the_nanosecond() -> None:
    """4 ms of CPU in a thread other than the main one is counted: less than one tick of
    /proc/<pid>/stat, the figure the bench reads beside it."""
    done, stop = threading.Event(), threading.Event()

    def spin_then_wait() -> None:
        end = time.thread_time() + 0.004
        while time.thread_time() < end:
            pass
        done.set()
        stop.wait(10)  # alive while read: an ended thread's time is not counted

    start = thread_cpu_ns(os.getpid())
    worker = threading.Thread(target=spin_then_wait)
    worker.start()
    try:
        assert done.wait(10)
        assert thread_cpu_ns(os.getpid()) - start >= 4_000_000
    finally:
        stop.set()
        worker.join()


class TestLoopbackFromEnv:
    """`make bench` and `make faults` take their own default addresses, apart from the
    tests', the demo's and Consul's default (127.0.0.1:8500), and refuse a bad one."""

    def test_each_runner_has_its_own_default_base(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("WATCHER_TEST_LOOPBACK", raising=False)
        bases = {runner: loopback_from_env(runner) for runner in ("test", "bench", "faults")}
        assert len(set(bases.values()) | {"127.0.0", "127.0.10"}) == 5, bases

    def test_the_environment_moves_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WATCHER_TEST_LOOPBACK", "127.3.7")
        assert loopback_from_env("bench") == "127.3.7"

    @pytest.mark.parametrize(
        "bad", ["10.0.0", "127.0.300", "127.0.0.1", "127.0", " 127.0.4", "127.0.40\n"]
    )
    def test_a_bad_base_is_refused_before_anything_starts(
        self,
        bad: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setenv("WATCHER_TEST_LOOPBACK", bad)
        with pytest.raises(SystemExit) as exc:
            loopback_from_env("faults")
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f'got "{bad}"' in err and "make faults: WATCHER_TEST_LOOPBACK" in err
