"""SIGHUP: what a reload takes over, and which changed settings it names as needing a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

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

    def test_a_setting_read_on_every_use_needs_no_restart(self, tmp_path: Path) -> None:
        logs = reload_with(tmp_path, {"history_keep": 10})
        assert restart_needed(logs) == []
        assert "config_reloaded" in [e["event"] for e in logs]
