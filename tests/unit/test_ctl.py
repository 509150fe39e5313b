"""watcherctl's own plumbing: the operator's token, exit codes, tables."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from watcher.config import Config, parse_config
from watcher.ctl import (
    COMMANDS,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    build_parser,
    command_of,
    exit_code_for,
    main,
    operator_token,
)
from watcher.ctl import table as render_table
from watcher.ctl_fleet import _human_status, _progress
from watcher.errors import ConfigError, ConsulUnavailable, DeployInFlight


def config_with_token(token: str | None) -> Config:
    consul = {"token": token} if token else {}
    return parse_config(
        {"consul": consul, "s3": {"bucket": "b"}, "apps": {"web": {"root": "/srv"}}},
        env={},
    )


class TestOperatorToken:
    def test_exported_token_replaces_the_watchers(self) -> None:
        config = operator_token(
            config_with_token("watcher-token"), {"CONSUL_HTTP_TOKEN": "operator-token"}
        )
        assert config.consul.token == "operator-token"

    def test_token_file_wins_over_token_like_consul(self, tmp_path: Path) -> None:
        path = tmp_path / "token"
        path.write_text("from-file\n")
        env = {"CONSUL_HTTP_TOKEN": "from-env", "CONSUL_HTTP_TOKEN_FILE": str(path)}
        assert operator_token(config_with_token("watcher"), env).consul.token == "from-file"

    def test_without_an_exported_token_the_config_stands(self) -> None:
        config = config_with_token("watcher-token")
        assert operator_token(config, {}) is config

    def test_unreadable_token_file_is_a_config_error(self, tmp_path: Path) -> None:
        env = {"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "missing")}
        with pytest.raises(ConfigError, match="cannot read"):
            operator_token(config_with_token(None), env)


class TestExitCodes:
    def test_codes(self) -> None:
        assert exit_code_for(ConfigError("x", ["y"])) == EXIT_USAGE
        assert exit_code_for(ConsulUnavailable("down")) == EXIT_UNAVAILABLE
        assert exit_code_for(DeployInFlight("busy")) == EXIT_REFUSED


def test_table_aligns_columns() -> None:
    out = render_table([["a", None], ["longer", "x"]], ["NAME", "V"])
    assert out.splitlines() == ["NAME    V", "a", "longer  x"]


class TestDaemonStatusFile:
    """`status` reads the daemon's status.json: a damaged one is reported, never a crash."""

    @pytest.mark.parametrize(
        "text",
        [
            "[]",
            '"x"',
            "{}",
            '{"pid": "abc", "updated_at": "2026-01-01T00:00:00.000Z"}',
            '{"pid": 1, "updated_at": "yesterday"}',
            '{"pid": 1e400, "updated_at": "2026-01-01T00:00:00.000Z"}',
            '{"pid": 1, "updated_at": null}',
        ],
    )
    def test_unreadable(self, tmp_path: Path, text: str) -> None:
        from watcher.ctl_fleet import daemon_status

        (tmp_path / "status.json").write_text(text)
        status = daemon_status(str(tmp_path))
        assert status["running"] is False and "status" in status["reason"]

    @pytest.mark.parametrize("pid", [0, -1, 2**70])
    def test_a_pid_that_names_no_process(self, tmp_path: Path, pid: int) -> None:
        from watcher.ctl_fleet import daemon_status

        (tmp_path / "status.json").write_text(
            f'{{"pid": {pid}, "updated_at": "2026-01-01T00:00:00.000Z"}}'
        )
        status = daemon_status(str(tmp_path))
        assert status["running"] is False and status["reason"] == "process gone"


class TestCommandModules:
    def test_each_command_is_registered_by_the_module_named_for_it(self) -> None:
        parser = build_parser()
        [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        registered = {
            name: sub.get_default("func").__module__ for name, sub in commands.choices.items()
        }
        assert registered == COMMANDS

    def test_a_command_loads_only_its_module(self) -> None:
        code = (
            "import sys\n"
            "from watcher.ctl import build_parser\n"
            "args = build_parser('status').parse_args(['status', '--fleet'])\n"
            "assert args.fleet\n"
            "print(' '.join(sorted(sys.modules)))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        assert "watcher.ctl_fleet" in out
        loaded = {m for m in out if m.split(".")[0] in ("boto3", "botocore", "structlog")}
        assert loaded == set()
        assert {"watcher.ctl_local", "watcher.ctl_publish", "watcher.hooks"}.isdisjoint(out)

    def test_help_and_unknown_commands_still_see_every_command(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["no-such-command"]) == 2
        err = capsys.readouterr().err
        for command in COMMANDS:
            assert command in err

    @pytest.mark.parametrize(
        ("argv", "command"),
        [
            (["status", "--fleet"], "status"),
            (["-c", "/etc/w.yaml", "--json", "status"], "status"),
            (["--config", "deploy", "history", "web"], "history"),
            (["--json"], None),
        ],
    )
    def test_the_command_is_found_after_global_options(
        self, argv: list[str], command: str | None
    ) -> None:
        assert command_of(argv) == command


class TestDownloadProgress:
    @pytest.mark.parametrize(
        ("got", "text"),
        [
            ({"have": 12_000_000, "size": 256_000_000}, "12.0 of 256.0 MB (4%)"),
            ({"have": 0, "size": 0}, "0.0 of 0.0 MB"),
            ({"have": "x", "size": 1}, "in progress"),  # a status file is read, not trusted
            (None, "in progress"),
        ],
    )
    def test_progress(self, got: Any, text: str) -> None:
        assert _progress(got) == text

    def test_shown_only_while_the_daemon_runs(self) -> None:
        app = {
            "current": "r1",
            "previous": None,
            "backup": None,
            "staged": ["r1"],
            "hold": None,
            "prefetched": [],
            "daemon": {"downloading": {"main-15eb13af": {"have": 1_000_000, "size": 2_000_000}}},
        }
        data: dict[str, Any] = {
            "node": "h1",
            "daemon": {"running": True, "pid": 1},
            "consul": {"address": "http://127.0.0.1:8500", "reachable": True, "error": ""},
            "apps": {"web": app},
        }
        line = "  downloading main-15eb13af: 1.0 of 2.0 MB (50%)"
        assert line in _human_status(data).splitlines()
        data["daemon"] = {"running": False, "reason": "process gone"}
        assert "downloading" not in _human_status(data)


class TestConsoleScript:
    """`watcherctl` as installed: ``watcher.ctl_script.run``, which loads with the
    collector off and leaves through ``os._exit`` once stdout and stderr are flushed."""

    @staticmethod
    def script(argv: list[str], before: str = "") -> subprocess.CompletedProcess[str]:
        code = (
            "import sys\n"
            + before
            + f"sys.argv = ['watcherctl', *{argv!r}]\n"
            + "from watcher.ctl_script import run\n"
            + "run()\n"
            + "raise SystemExit('run() returned')\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )

    def test_a_buffered_pipe_gets_every_line_and_the_exit_code_is_kept(self) -> None:
        # stdout is a pipe, block-buffered: os._exit would drop what was not flushed.
        done = self.script(["--help"])
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: watcherctl")
        assert done.stdout.rstrip().endswith(build_parser().format_help().rstrip()[-40:])
        assert "run() returned" not in done.stderr
        bad = self.script(["status", "-c", "/nonexistent/watcher.yaml"])
        assert bad.returncode == EXIT_USAGE
        assert bad.stderr == "watcherctl: error: /nonexistent/watcher.yaml: no such file\n"

    def test_the_command_runs_with_the_collector_on_and_the_start_frozen(self) -> None:
        spy = (
            "import gc\n"
            "import watcher.ctl as ctl\n"
            "real = ctl.configure_logging\n"
            "def spy(**kw):\n"
            "    print('gc', gc.isenabled(), gc.get_freeze_count() > 1000)\n"
            "    real(**kw)\n"
            "ctl.configure_logging = spy\n"
        )
        done = self.script(["status", "-c", "/nonexistent/watcher.yaml"], before=spy)
        assert done.stdout == "gc True True\n", done.stderr
