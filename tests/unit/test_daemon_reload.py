"""SIGHUP: what a reload takes over, and which changed settings it names as needing a restart."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from watcher import daemon as daemon_module
from watcher.config import load_config
from watcher.daemon import Daemon


def base(tmp_path: Path) -> dict[str, Any]:
    return {
        "daemon": {
            "state_dir": str(tmp_path / "state"),
            "session_ttl": "15s",
            "undecided_after": "30s",
            "handled_events_keep": 1024,
            "history_keep": 50,
        },
        "s3": {"bucket": "b"},
        "apps": {"web": {"root": str(tmp_path / "srv")}},
    }


def reload_with(tmp_path: Path, change: dict[str, Any]) -> list[dict[str, Any]]:
    """Start a daemon on the base config, rewrite it with ``change`` (daemon settings),
    reload, and return the reload's log events."""
    path = tmp_path / "watcher.yaml"
    data = base(tmp_path)
    path.write_text(yaml.safe_dump(data))
    daemon = Daemon(load_config(path), config_path=str(path))
    data["daemon"].update(change)
    path.write_text(yaml.safe_dump(data))
    with capture_logs() as logs:
        daemon._reload()
    return logs


def restart_needed(logs: list[dict[str, Any]]) -> list[str]:
    named = [e for e in logs if e["event"] == "reload_needs_restart"]
    assert all(e["log_level"] == "warning" for e in named), named
    return [s for e in named for s in e["settings"]]


class TestReload:
    @pytest.mark.parametrize(
        ("setting", "value"),
        [("session_ttl", "20s"), ("undecided_after", "10s"), ("handled_events_keep", 4096)],
    )
    def test_a_start_only_daemon_setting_is_named_as_needing_a_restart(
        self, tmp_path: Path, setting: str, value: Any
    ) -> None:
        logs = reload_with(tmp_path, {setting: value})
        assert restart_needed(logs) == [f"daemon.{setting}"]
        assert [e["event"] for e in logs][-1] == "config_reloaded"

    def test_what_needs_a_restart_is_held_against_what_runs_not_the_last_file(
        self, tmp_path: Path
    ) -> None:
        """A second reload said nothing of a setting still waiting for a restart, and a
        file put back to what was running got a warning."""
        path = tmp_path / "watcher.yaml"
        data = base(tmp_path)
        path.write_text(yaml.safe_dump(data))
        daemon = Daemon(load_config(path), config_path=str(path))
        data["daemon"]["undecided_after"] = "10s"
        path.write_text(yaml.safe_dump(data))
        for _ in range(2):  # said at every reload until the restart
            with capture_logs() as logs:
                daemon._reload()
            assert restart_needed(logs) == ["daemon.undecided_after"]
        data["daemon"]["undecided_after"] = "30s"  # what runs
        path.write_text(yaml.safe_dump(data))
        with capture_logs() as logs:
            daemon._reload()
        assert restart_needed(logs) == []

    def test_a_setting_read_on_every_use_needs_no_restart(self, tmp_path: Path) -> None:
        logs = reload_with(tmp_path, {"history_keep": 10})
        assert restart_needed(logs) == []
        assert "config_reloaded" in [e["event"] for e in logs]


class TestSignalRelay:
    """The handlers only write the signal's number to a pipe; a thread of the daemon sets
    the flags. Nothing may keep a SIGTERM from reaching the loop: not a log line that
    blocks (a stalled journal) or fails, not a pipe full of signals."""

    @staticmethod
    def daemon(tmp_path: Path) -> Daemon:
        path = tmp_path / "watcher.yaml"
        path.write_text(yaml.safe_dump(base(tmp_path)))
        return Daemon(load_config(path), config_path=str(path))

    def test_a_log_that_blocks_or_fails_does_not_deafen_the_daemon(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        daemon = self.daemon(tmp_path)
        stalled = threading.Event()

        class Stalled:
            """A logger whose first line blocks (a full journal pipe), the rest fail."""

            def __getattr__(self, _name: str) -> Any:
                def write(*_: Any, **__: Any) -> None:
                    if not stalled.is_set():
                        stalled.set()
                        threading.Event().wait(30)
                    raise BrokenPipeError(32, "the journal's pipe is gone")

                return write

        monkeypatch.setattr(daemon_module, "log", Stalled())
        read_fd, write_fd = os.pipe()
        relay = threading.Thread(target=daemon._relay_signals, args=(read_fd,), daemon=True)
        relay.start()
        try:
            os.write(write_fd, bytes([signal.SIGUSR1]))
            assert daemon.flags.wake.wait(5) and daemon._woken_by_signal
            os.write(write_fd, bytes([signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM]))
            assert daemon.flags.stop.wait(5) and daemon.flags.reload.is_set()
            assert relay.is_alive() and not stalled.is_set()  # the relay logs nothing
        finally:
            os.close(write_fd)
            relay.join(5)
            os.close(read_fd)
        assert not relay.is_alive()  # ends with the pipe

    def test_a_sigterm_into_a_full_pipe_still_stops_the_loop(self, tmp_path: Path) -> None:
        daemon = self.daemon(tmp_path)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        daemon._signal_fd = write_fd
        try:
            with contextlib.suppress(BlockingIOError):
                while True:  # nobody reads: a relay that is stuck, or a storm of signals
                    os.write(write_fd, bytes([signal.SIGUSR1]) * 4096)
            daemon._on_signal(signal.SIGTERM, None)  # the write fails: dropped
            assert daemon._stop_asked and not daemon.flags.stop.is_set()
        finally:
            os.close(write_fd)
            os.close(read_fd)
