"""watcherctl's own plumbing: the operator's token, exit codes, tables."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import yaml

from watcher import __version__, ctl_fleet
from watcher.barrier import DeployView, flipped_elsewhere
from watcher.config import Config, parse_config
from watcher.consul_api import KVEntry
from watcher.ctl import (
    COMMANDS,
    EXIT_FAILED,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CtlContext,
    build_parser,
    command_of,
    committed_end,
    exit_code_for,
    main,
    operator_token,
    sudo_token_warning,
)
from watcher.ctl import table as render_table
from watcher.ctl_fleet import (
    STALL_MARGIN,
    _human_status,
    _human_summary,
    _local_app,
    _progress,
    _tail_lines,
    abort_deploy,
    deploy_summary,
    end_stalled_sessions,
    not_ended,
    not_live_after_end,
    progress_lines,
    redeploy_warning,
    stalled_by,
)
from watcher.errors import (
    ConfigError,
    ConsulUnavailable,
    DeployInFlight,
    DeployRefused,
    ReleaseError,
    ReleaseNotFound,
)
from watcher.records import (
    AbortRequest,
    Decision,
    DeployRecord,
    HostRecord,
    Keys,
    NodeProgress,
    Outcome,
)


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


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

    def test_an_empty_exported_token_file_does_not_fall_back_to_the_hosts_token(
        self, tmp_path: Path
    ) -> None:
        # An operator's failed `... | jq -r .SecretID > alice.token`: acting with the
        # host's watcher token in their name would be the wrong identity, not no identity.
        empty = tmp_path / "alice.token"
        empty.write_text("\n")
        with pytest.raises(ConfigError, match=r"alice.token is empty \(it should hold"):
            operator_token(config_with_token("watcher"), {"CONSUL_HTTP_TOKEN_FILE": str(empty)})

    def test_an_exported_token_holding_more_than_the_secret_is_refused_unechoed(
        self, tmp_path: Path
    ) -> None:
        # The config has its own token, so only watcherctl reads the exported one.
        table = tmp_path / "token"
        table.write_text("AccessorID: abc\nSecretID:   0d1e-supersecret\n")
        with pytest.raises(ConfigError) as caught:
            operator_token(config_with_token("watcher"), {"CONSUL_HTTP_TOKEN_FILE": str(table)})
        assert str(caught.value).startswith(f"CONSUL_HTTP_TOKEN_FILE ({table}): the token holds")
        assert "supersecret" not in str(caught.value)
        with pytest.raises(ConfigError, match="the token holds spaces"):
            operator_token(config_with_token("watcher"), {"CONSUL_HTTP_TOKEN": "a b"})
        binary = tmp_path / "binary"
        binary.write_bytes(b"\xff\xfe")
        with pytest.raises(ConfigError, match="is not text"):
            operator_token(config_with_token("watcher"), {"CONSUL_HTTP_TOKEN_FILE": str(binary)})


class TestSudoWithoutAnExportedToken:
    """sudo's env_reset drops CONSUL_HTTP_TOKEN(_FILE): watcherctl then acts with the
    config's (the host's) token while ``requested_by`` names $SUDO_USER; it says so."""

    def test_warns_under_sudo_without_a_token(self) -> None:
        warning = sudo_token_warning(config_with_token("host-token"), {"SUDO_USER": "alice"})
        assert warning is not None and "\n" not in warning
        assert "alice" in warning and "<config>" in warning
        assert "sudo --preserve-env=CONSUL_HTTP_TOKEN,CONSUL_HTTP_TOKEN_FILE" in warning

    def test_says_anonymous_when_the_config_has_no_token(self) -> None:
        warning = sudo_token_warning(config_with_token(None), {"SUDO_USER": "alice"})
        assert warning is not None and "no token" in warning

    @pytest.mark.parametrize(
        "env",
        [
            {},
            {"SUDO_USER": "alice", "CONSUL_HTTP_TOKEN": "mine"},
            {"SUDO_USER": "alice", "CONSUL_HTTP_TOKEN_FILE": "/home/alice/.consul-token"},
        ],
    )
    def test_silent_without_sudo_or_with_a_token(self, env: dict[str, str]) -> None:
        assert sudo_token_warning(config_with_token("host-token"), env) is None

    @pytest.mark.parametrize(
        ("argv", "writes"),
        [
            (["deploy", "web", "main-15eb13af"], True),
            (["rollback", "web"], True),
            (["rollback", "web", "--local"], False),
            (["abort", "20260101T000000Z-abc123"], True),
            (["status", "--fleet"], False),
            (["history", "web"], False),
            (["hold", "web"], False),
        ],
    )
    def test_only_commands_that_write_to_consul(self, argv: list[str], writes: bool) -> None:
        args = build_parser(argv[0]).parse_args(argv)
        assert CtlContext(args).writes_consul is writes


def test_suggested_commands_read_the_config_given() -> None:
    """A hint pasted as printed must act on the same config: each `watcherctl ...` in a
    message gets the -c given (quoted for a shell), one that has a -c is left alone, and
    without -c nothing changes."""
    text = (
        "see `watcherctl history web`; or `watcherctl abort X --app web -c /a.yaml`; "
        "or `consul kv delete w/x`"
    )
    given = CtlContext(build_parser("status").parse_args(["status", "-c", "/etc/my w.yaml"]))
    assert given.with_config(text) == (
        "see `watcherctl history web -c '/etc/my w.yaml'`; or "
        "`watcherctl abort X --app web -c /a.yaml`; or `consul kv delete w/x`"
    )
    plain = CtlContext(build_parser("status").parse_args(["status"]))
    assert plain.with_config(text) == text


class TestFreeText:
    """--reason is stored and shown later: a surrogate (an undecodable byte of argv) or a
    control character is refused at once, naming the option."""

    @pytest.mark.parametrize(
        "reason", ["caf\udce9", "red \x1b[31malert", "two\nlines", "nul\x00", "bell\x07"]
    )
    @pytest.mark.parametrize("command", [["hold", "web"], ["abort", "20260101T000000Z-abc123"]])
    def test_refused_with_exit_2(
        self, capsys: pytest.CaptureFixture[str], command: list[str], reason: str
    ) -> None:
        assert main([*command, "--reason", reason, "-c", "/nonexistent/w.yaml"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "argument --reason" in err and "Traceback" not in err

    @pytest.mark.parametrize("reason", ["café ☕ deploy", "tabs\tare fine", ""])
    def test_accepted(self, reason: str) -> None:
        args = build_parser("hold").parse_args(["hold", "web", "--reason", reason])
        assert args.reason == reason


def test_a_hold_reason_from_a_host_record_is_shown_short_and_inert() -> None:
    """A host's token writes its record: a 500 KB reason (or an escape) in it must not
    become 500 KB of warning on the operator's terminal."""
    from types import SimpleNamespace

    from watcher.ctl_fleet import held_warning
    from watcher.records import HostRecord

    hosts = {
        "host-1": HostRecord(node="host-1", release=None, last_seen="", hold="x" * 500_000),
        "host-2": HostRecord(node="host-2", release=None, last_seen="", hold="\x1b[2Jdisk"),
    }
    record = SimpleNamespace(expected=["host-1", "host-2"], kind="deploy", app="web")
    warning = held_warning(hosts, record)  # type: ignore[arg-type]
    assert len(warning) < 1000, len(warning)
    assert f"host-1: {'x' * 200}... (500000 characters); host-2: \\x1b[2Jdisk" in warning
    # run on the held hosts: without the -c of the command that deploys (another host's)
    assert warning.endswith("(`watcherctl release-hold web` on the host lifts it)"), warning


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"watcherctl {__version__}\n"


@pytest.mark.parametrize("argv", [[], ["--json"], ["-c", "/etc/watcher/other.yaml"]])
def test_no_command_lists_the_commands(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    for command in COMMANDS:
        assert f"\n    {command} " in captured.err, command
    assert captured.err.endswith("watcherctl: error: name a COMMAND (above)\n")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["-c", "status", "--fleet"], "-c took 'status'"),
        (["--config", "deploy"], "--config took 'deploy'"),
        (["-c", "status", "web"], "-c took 'status'"),
        (["--json", "-c", "hold", "web"], "-c took 'hold'"),
        (["--config=history", "web"], "--config took 'history'"),
    ],
)
def test_a_command_taken_as_the_config_file_is_said(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    # `-c $CONFIG status` with CONFIG unset printed the whole help and "name a COMMAND",
    # with an app after it "invalid choice: 'web'".
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"watcherctl: error: {said} as the config file"), err
    assert "Commands:" not in err and "invalid choice" not in err


def test_unhold_is_taken_for_release_hold(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["unhold", "web"]) == EXIT_USAGE
    assert "no command 'unhold'; did you mean release-hold?" in capsys.readouterr().err


def watcherctl_of(
    tmp_path: Path, roots: dict[str, Path], *command: str
) -> subprocess.CompletedProcess[str]:
    """`watcherctl -c CONFIG COMMAND` with a config of ``roots`` (app -> root), Consul
    nowhere; in a process of its own: the command sets up logging on its stderr, which
    outlives a capsys stream and would break the tests after it."""
    config = tmp_path / "w.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "consul": {"address": "127.0.0.1:9"},
                "s3": {"bucket": "b"},
                "daemon": {"state_dir": str(tmp_path / "state")},
                "apps": {app: {"root": str(root)} for app, root in roots.items()},
            }
        )
    )
    return subprocess.run(
        [str(Path(sys.executable).parent / "watcherctl"), "-c", str(config), *command],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["hold", "web"],
        ["release-hold", "web"],
        ["prune", "web"],
        ["exec", "web", "--", "true"],
        ["rollback", "web", "--local"],
        ["setup-release", "web", "main-0123abcd"],
    ],
)
def test_a_tree_that_is_not_there_is_no_host_of_the_app(tmp_path: Path, command: list[str]) -> None:
    """A workstation's config (docs/acl.md's `root: /nonexistent`): `hold` made the tree
    under / and said the hold was placed, on a machine no watcher of the app runs on."""
    root = tmp_path / "nonexistent"
    said = watcherctl_of(tmp_path, {"web": root}, *command)
    assert said.returncode == EXIT_USAGE, said
    assert f"apps.web.root: {root} does not exist on this host" in said.stderr, said.stderr
    assert not root.exists()


def test_a_command_of_one_app_takes_the_only_app_when_none_is_named(tmp_path: Path) -> None:
    """The operator test: `releases` and `history` wanted APP where `status` did not, with
    one app configured. With two, the message names them (exit 2)."""
    (tmp_path / "srv").mkdir()

    def run(apps: list[str], *command: str) -> subprocess.CompletedProcess[str]:
        return watcherctl_of(tmp_path, dict.fromkeys(apps, tmp_path / "srv"), *command)

    one = run(["web"], "releases")
    assert one.returncode == 0 and "no releases of web under" in one.stdout, one
    two = run(["web", "api"], "releases")
    assert two.returncode == EXIT_USAGE, two
    assert "name the app: `watcherctl releases APP -c " in two.stderr, two.stderr
    assert "has api, web)" in two.stderr, two.stderr


def test_an_address_in_the_environment_the_file_overrides_is_warned_of(tmp_path: Path) -> None:
    """CONSUL_HTTP_ADDR naming another cluster than the file did nothing, silently; an
    exported token is taken over the file's, so it is not warned of."""
    config = tmp_path / "w.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "consul": {"address": "127.0.0.1:9", "token": "host-token"},
                "s3": {"bucket": "b"},
                "daemon": {"state_dir": str(tmp_path / "state")},
                "apps": {"web": {"root": str(tmp_path / "srv")}},
            }
        )
    )
    (tmp_path / "srv").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "CONSUL_HTTP_ADDR": "consul.prod.example:8500",
        "CONSUL_HTTP_TOKEN": "operator-token",
    }
    said = subprocess.run(
        [str(Path(sys.executable).parent / "watcherctl"), "-c", str(config), "hold", "web"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert said.returncode == 0, said
    warnings = [line for line in said.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"watcherctl: warning: {config}: consul.address: the file's value is used, not "
        "CONSUL_HTTP_ADDR of the environment, which names another address (unset it, or "
        "remove the key from the file to use it)"
    ], said.stderr


def test_a_failed_hooks_tail_is_shown_short_and_inert() -> None:
    tail = "starting\n\nGET /health\nHTTP 502 \x1b[31mBad Gateway\x1b[0m\n" + "x" * 500 + "\n"
    assert _tail_lines(tail) == [
        "GET /health",
        "HTTP 502 \\x1b[31mBad Gateway\\x1b[0m",  # an escape sequence cannot color a terminal
        "x" * 200,
    ]
    assert _tail_lines("") == [] and _tail_lines("\n \n") == []


def a_record(expected: list[str], **more: Any) -> DeployRecord:
    """A deploy request of app web from 2026-01-01 (prepare by 00:10, apply by 00:20)."""
    return DeployRecord(
        id="20260101T000000Z-abc123",
        app="web",
        kind="deploy",
        artifact="main-15eb13af",
        sha256="0" * 64,
        release="20260101T000000Z-main-15eb13af",
        requested_by="alice",
        requested_at="2026-01-01T00:00:00Z",
        expected=expected,
        prepare_deadline="2026-01-01T00:10:00Z",
        apply_deadline="2026-01-01T00:20:00Z",
        **more,
    )


def test_a_second_abort_is_told_that_the_first_one_stands() -> None:
    """Two aborts at once (two tabs, two operators): the request is written only where
    none is (CAS 0), so the first one's `by` and reason stand. The second was answered as
    if it had asked (`abort` said "deploy X aborted", the API logged its caller as the
    one who aborted)."""
    rec = a_record(["a", "b"])
    requests: dict[str, AbortRequest] = {}

    class Store:
        keys = Keys("w", "web")
        consul = None  # a wait of 0 s reads nothing more

        def view(self, deploy_id: str) -> DeployView:
            return DeployView(
                rec, None, {}, {}, None, None, abort_requested=requests.get(deploy_id)
            )

        def request_abort(self, deploy_id: str, reason: str, *, by: str) -> bool:
            if deploy_id in requests:
                return False
            requests[deploy_id] = AbortRequest(by=by, at="t", reason=reason)
            return True

    store: Any = Store()
    what, view, asked = abort_deploy(store, rec.id, "wrong build", by="alice", wait=0)
    assert (what, asked) == ("undecided", True)
    what, view, asked = abort_deploy(store, rec.id, "other", by="bob", wait=0)
    assert (what, asked) == ("undecided", False)
    assert view is not None and view.abort_requested == requests[rec.id]
    assert (requests[rec.id].by, requests[rec.id].reason) == ("alice", "wrong build")


def test_the_wait_shows_the_decision_before_the_intents_that_follow_it() -> None:
    """One read often brings the decision and the decider's commit intent (one txn): the
    decision line comes before every state that follows it, after those that led to it."""
    rec = a_record(["a", "b", "c"])

    def view(states: dict[str, str], decision: str | None) -> DeployView:
        nodes = {n: NodeProgress(node=n, state=s) for n, s in states.items()}
        dec = Decision(decision, "every host ready", "a", "t") if decision else None
        return DeployView(rec, dec, nodes, {}, None, None)

    seen: dict[str, str] = {}
    assert progress_lines(view({"a": "ready", "b": "staging"}, None), seen) == [
        "  a: ready",
        "  b: staging",
    ]
    shown = progress_lines(view({"a": "committed", "b": "ready", "c": "ready"}, "commit"), seen)
    assert shown == [
        "  b: ready",
        "  c: ready",
        "  decision: commit (every host ready)",
        "  a: committed",
    ]
    assert progress_lines(view({"a": "live", "b": "committed", "c": "ready"}, "commit"), seen) == [
        "  a: live",
        "  b: committed",
    ]
    # A host whose ready ack passed between two reads: its ready line all the same, first.
    seen = {}
    progress_lines(view({"a": "ready", "b": "staging", "c": "ready"}, None), seen)
    jumped = progress_lines(view({"a": "ready", "b": "committed", "c": "ready"}, "commit"), seen)
    assert jumped == ["  b: ready", "  decision: commit (every host ready)", "  b: committed"]
    seen = {}
    assert progress_lines(view({"a": "live", "b": "live", "c": "live"}, "commit"), seen)[:2] == [
        "  a: ready",
        "  b: ready",
    ]
    # An operator's abort request: the hosts' "no" (aborted, with the request) comes first.
    seen = {}
    asked = view({"a": "ready", "b": "staging", "c": "staging"}, None)
    asked.nodes["b"] = NodeProgress(node="b", state="aborted", error="abort requested by op")
    asked = DeployView(
        rec, Decision("abort", "node b aborted", "b", "t"), asked.nodes, {}, None, None
    )
    assert progress_lines(asked, seen) == [
        "  a: ready",
        "  b: aborted: abort requested by op",
        "  c: staging",
        "  decision: abort (node b aborted)",
    ]
    # An abort: the failure that caused it first, then the decision, then who followed it.
    seen = {}
    failed = progress_lines(view({"a": "failed", "b": "aborted", "c": "ready"}, "abort"), seen)
    assert failed == [
        "  a: failed",
        "  c: ready",
        "  decision: abort (every host ready)",
        "  b: aborted",
    ]


class TestExitCodes:
    def test_codes(self) -> None:
        assert exit_code_for(ConfigError("x", ["y"])) == EXIT_USAGE
        assert exit_code_for(ConsulUnavailable("down")) == EXIT_UNAVAILABLE
        assert exit_code_for(DeployInFlight("busy")) == EXIT_REFUSED
        # a release name that is not on this host is bad input, like an unknown artifact;
        # a release that is there but incomplete is not
        assert exit_code_for(ReleaseNotFound("no release r")) == EXIT_USAGE
        assert exit_code_for(ReleaseError("r is incomplete")) == EXIT_FAILED


def test_table_aligns_columns() -> None:
    out = render_table([["a", None], ["longer", "x"]], ["NAME", "V"])
    assert out.splitlines() == ["NAME    V", "a", "longer  x"]


def test_a_value_from_kv_cannot_forge_a_row_or_reorder_one() -> None:
    """A host's error is one cell: its newline and a right-to-left override are escaped."""
    forged = "boom\nhost-2   live\u202e"
    out = render_table([["host-1", forged]], ["HOST", "ERROR"])
    assert out.splitlines() == ["HOST    ERROR", "host-1  boom\\nhost-2   live\\u202e"]


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
            f'{{"pid": {pid}, "updated_at": "2026-01-01T00:00:00.000Z", "healthy": true}}'
        )
        status = daemon_status(str(tmp_path))
        assert status["running"] is False and status["reason"] == "process gone"
        # What a killed daemon's last write said of its health is not its health now.
        assert status["healthy"] is False

    def test_a_watcher_that_has_not_written_its_status_yet_is_starting(
        self, tmp_path: Path
    ) -> None:
        """A watcher whose token Consul refuses, or whose agent does not answer, runs and
        holds its instance lock before it writes status.json: `status` said "NOT running
        (no status at ...)" of a process an operator could see in `ps`."""
        from tests.support.locks import hold_instance_lock
        from watcher.ctl_fleet import daemon_status
        from watcher.fsutil import INSTANCE_LOCK

        assert daemon_status(str(tmp_path))["reason"].startswith("no status at ")
        watcher = hold_instance_lock(tmp_path / INSTANCE_LOCK)
        try:
            status = daemon_status(str(tmp_path))
            assert status["starting"] is True and status["pid"] == watcher.pid, status
            line = _human_status(
                {
                    "daemon": status,
                    "consul": {"reachable": True, "address": "http://127.0.0.1:8500"},
                    "node": "host-1",
                    "apps": {},
                }
            ).splitlines()[0]
            assert line.startswith(
                f"host host-1: watcher STARTING (pid {watcher.pid}), not ready: no status at "
            ), line
        finally:
            watcher.kill()
            watcher.wait()
        assert "starting" not in daemon_status(str(tmp_path))

    def test_a_killed_daemon_not_yet_reaped_is_gone(self, tmp_path: Path) -> None:
        """A SIGKILLed watcher whose parent has not reaped it (a zombie) still takes
        signal 0: `status` called it running until its status file aged (30 s)."""
        from watcher.ctl_fleet import daemon_status

        child = subprocess.Popen([sys.executable, "-c", "pass"])
        try:
            for _ in range(200):  # exited, not reaped: Popen.poll() would reap it
                if Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                    break
                time.sleep(0.02)
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            (tmp_path / "status.json").write_text(
                f'{{"pid": {child.pid}, "updated_at": "{now}", "healthy": true}}'
            )
            status = daemon_status(str(tmp_path))
            assert status["running"] is False and status["reason"] == "process gone", status
        finally:
            child.wait()

    def test_a_live_pid_with_an_old_status_is_not_responding_not_gone(self, tmp_path: Path) -> None:
        # A SIGSTOPped or stuck daemon: its process exists, its status.json is old.
        from watcher.ctl_fleet import daemon_status

        (tmp_path / "status.json").write_text(
            f'{{"pid": {os.getpid()}, "updated_at": "2026-01-01T00:00:00.000Z"}}'
        )
        status = daemon_status(str(tmp_path))
        assert status["running"] is False and status["stuck"] is True
        assert status["reason"].startswith(f"pid {os.getpid()} exists but has not updated")
        data = {
            "node": "h",
            "daemon": status,
            "consul": {"address": "x", "reachable": True, "error": "", "problem": ""},
            "apps": {},
        }
        assert _human_status(data).startswith("host h: watcher NOT RESPONDING (pid ")


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
        downloading = {"main-15eb13af": {"have": 1_000_000, "size": 2_000_000}}
        data = host_status(daemon={"downloading": downloading})
        data["daemon"] = {"running": True, "pid": 1}
        line = "  downloading main-15eb13af: 1.0 of 2.0 MB (50%)"
        assert line in _human_status(data).splitlines()
        data["daemon"] = {"running": False, "reason": "process gone"}
        assert "downloading" not in _human_status(data)


class TestRetriedFailures:
    @pytest.mark.parametrize(
        ("key", "label"), [("apply_error", "switch"), ("converge_error", "converge")]
    )
    def test_a_running_watcher_retrying_a_failure_says_it(self, key: str, label: str) -> None:
        """A switch or a convergence that keeps failing: `status` said only that the fleet
        is elsewhere, not why this host is not on it."""
        error = "r2: cannot point /srv/web/current at releases/r2: [Errno 21] Is a directory"
        data = host_status(daemon={key: error})
        data["daemon"] = {"running": True, "pid": 1}
        shown = [line for line in _human_status(data).splitlines() if "FAILED" in line]
        assert len(shown) == 1 and shown[0].startswith(f"  {label:<11} FAILED"), shown
        assert "Is a directory" in shown[0]
        data["daemon"] = {"running": False, "reason": "process gone"}  # history, not now
        assert "FAILED" not in _human_status(data)


def host_status(**app: Any) -> dict[str, Any]:
    """What `status --json` gives of host h1 with app web on r1 (``app``: more of it) and
    its watcher not running."""
    web = {
        "current": "r1",
        "previous": None,
        "backup": None,
        "staged": ["r1"],
        "hold": None,
        "prefetched": [],
        **app,
    }
    return {
        "node": "h1",
        "daemon": {"running": False, "reason": "process gone"},
        "consul": {"address": "http://127.0.0.1:8500", "reachable": True, "error": ""},
        "apps": {"web": web},
    }


def test_not_live_tells_a_host_that_took_the_commit_from_one_that_had_not_switched() -> None:
    """The operator review: a watcher killed during `validate` had flipped (its intent is
    written before the flip, its live ack after `validate`), and the deploy said it "had
    not switched", while it served the new release."""
    data = {
        "deploy": "d-1",
        "result": "committed",
        "not_live": ["host-2", "host-3"],
        "hosts": {"host-2": {"state": "committed"}, "host-3": {"state": "ready"}},
    }
    lines = _human_summary(data).splitlines()
    assert lines[1].startswith("  NOT LIVE: host-3: acked ready but had not switched when")
    assert lines[2].startswith("  NOT LIVE: host-2: had taken the commit but not reported live")
    assert "it may serve the new release before its `validate` passed" in lines[2]


class TestFleetRecordNotTrusted:
    def test_keeps_the_label_column(self) -> None:
        problems = {"current": "no ack of deploy d-1 commits it"}
        data = host_status(fleet_current=None, fleet_problems=problems)
        lines = _human_status(data).splitlines()
        shown = next(line for line in lines if "NOT TRUSTED" in line)
        assert shown == "  fleet       current NOT TRUSTED: no ack of deploy d-1 commits it"
        # the value starts where `current` and `previous` put theirs
        assert shown.index("current") == lines[lines.index("app web") + 1].index("r1")


class TestPrefetchedOnThisHost:
    def test_named_by_artifact_id_newest_first_extracted_marked(self, tmp_path: Path) -> None:
        config = parse_config(
            {"s3": {"bucket": "b"}, "apps": {"web": {"root": str(tmp_path)}}}, env={}
        )
        app_dir = tmp_path / "web"
        (app_dir / "artifacts").mkdir(parents=True)
        (app_dir / "prefetched").mkdir()
        files = [
            (app_dir / "artifacts" / "main-0a0a0a0a-09b84e234807.tar.gz", 100),
            (app_dir / "artifacts" / "main-1b1b1b1b-1cf7225bd4fc.tar.gz", 200),
            (app_dir / "prefetched" / "main-1b1b1b1b-1cf7225bd4fc", 300),
            (app_dir / "artifacts" / ".partial-main-2c2c2c2c", 400),  # not yet verified
        ]
        for path, mtime in files:
            path.mkdir() if path.parent.name == "prefetched" else path.write_bytes(b"x")
            os.utime(path, (mtime, mtime))
        local = _local_app(config.apps["web"], {})
        assert local["prefetched"] == ["main-1b1b1b1b", "main-0a0a0a0a"]
        assert local["pre_extracted"] == ["main-1b1b1b1b"]
        data: dict[str, Any] = {
            "node": "h1",
            "daemon": {"running": False, "reason": "not started"},
            "consul": {"address": "http://127.0.0.1:8500", "reachable": True, "error": ""},
            "apps": {"web": {**local, "fleet_current": None, "deploy": None}},
        }
        assert (
            "  prefetched  main-1b1b1b1b (extracted), main-0a0a0a0a"
            in _human_status(data).splitlines()
        )


class TestStatusWithoutTheFleet:
    """When the fleet part could not be read, `status` says it does not know: never "none in
    flight", never a fleet release."""

    def test_unknown_is_not_none(self) -> None:
        data = host_status(
            daemon=None, fleet_current=None, deploy=None, fleet_error="Consul unreachable"
        )
        data["consul"] = {
            "address": "http://127.0.0.1:8500",
            "reachable": False,
            "error": "connection refused",
            "problem": "Consul unreachable",
        }
        app = data["apps"]["web"]
        text = _human_status(data)
        assert "  deploy      unknown (Consul unreachable)" in text.splitlines()
        assert "consul UNREACHABLE at http://127.0.0.1:8500: connection refused" in text
        assert "none in flight" not in text and "fleet is on" not in text
        assert "  current     r1" in text.splitlines()
        # More than five staged: the newest five, and the command that lists all (as the
        # user can paste it, with their -c).
        app["staged"] = [f"r{i}" for i in range(1, 9)]
        ctx = CtlContext(build_parser("status").parse_args(["status", "-c", "w"]))
        text = ctx.with_config(_human_status(data))
        line = "  staged      8: r4, r5, r6, r7, r8 (the newest 5; `watcherctl releases web -c w`"
        assert any(x.startswith(line) for x in text.splitlines()), text

    def test_a_refusal_is_not_called_unreachable(self) -> None:
        data: dict[str, Any] = {
            "node": "h1",
            "daemon": {"running": False, "reason": "process gone"},
            "consul": {
                "address": "http://127.0.0.1:8500",
                "reachable": True,
                "error": "ACL not found",
                "problem": "Consul refused the token",
            },
            "apps": {},
        }
        text = _human_status(data)
        assert "UNREACHABLE" not in text
        assert "consul REFUSED THE TOKEN at http://127.0.0.1:8500: ACL not found" in text

    def test_a_running_daemon_that_is_unhealthy_says_why(self) -> None:
        """Running is not working: a daemon Consul refuses a session (a TTL below the
        server's minimum, a token for another node) never joins a deploy."""
        problem = (
            "no Consul session: Invalid Session TTL '3000000000', must be between [10s=24h0m0s]"
        )
        data: dict[str, Any] = {
            "node": "h1",
            "daemon": {"running": True, "pid": 42, "healthy": False, "problems": [problem]},
            "consul": {"address": "http://127.0.0.1:8500", "reachable": True, "error": ""},
            "apps": {},
        }
        first = _human_status(data).splitlines()[0]
        assert first.startswith(f"host h1: watcher running (pid 42) but UNHEALTHY: {problem};")
        data["daemon"] = {"running": True, "pid": 42, "healthy": True, "problems": []}
        assert _human_status(data).startswith("host h1: watcher running (pid 42); consul")


def default_sigint() -> None:
    """In the child: SIGINT as a terminal delivers it. A test suite started in the
    background (``cmd &`` in a script) inherits SIGINT ignored, and Python then leaves it
    ignored, so the interrupt a test sends would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            preexec_fn=default_sigint,
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

    def test_ctrl_c_while_loading_exits_130_quietly(self) -> None:
        # A real SIGINT, delivered while the command's modules are being imported.
        interrupt = (
            "import importlib.abc, os, signal\n"
            "class Interrupt(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'watcher.config':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "        return None\n"
            "sys.meta_path.insert(0, Interrupt())\n"
        )
        done = self.script(["status", "-c", "/nonexistent/watcher.yaml"], before=interrupt)
        assert done.returncode == 130, done.stderr
        assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr

    def test_an_ascii_stdout_does_not_crash(self) -> None:
        code = (
            "import sys\n"
            "from watcher.ctl import main\n"
            "import watcher.ctl_local as local\n"
            "local.cmd_releases = lambda ctx: print('caf\\xe9 caf\\udce9') or 0\n"
            "sys.exit(main(['releases', 'web', '-c', '/nonexistent/w.yaml']))\n"
        )
        env = {**os.environ, "PYTHONIOENCODING": "ascii"}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )
        assert "Traceback" not in done.stderr, done.stderr
        # Printed, escaped: not an error caught on the way out.
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "caf\\xe9 caf\\udce9", done.stdout


class TestUnexpectedErrors:
    """An OSError (or, last, any exception) is one line naming what failed, not a
    traceback; --debug shows the traceback."""

    @pytest.fixture(autouse=True)
    def _logging_untouched(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """main() points the logs at this test's captured stderr, which is closed after it:
        later tests in this process would log into a closed file."""
        monkeypatch.setattr("watcher.ctl.configure_logging", lambda **_: None)

    @staticmethod
    def failing(exc: BaseException) -> Any:
        def command(ctx: CtlContext) -> int:
            raise exc

        return command

    def test_os_error_names_the_path(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        import watcher.ctl_local as local

        exc = PermissionError(13, "Permission denied", "/var/lib/watcher/web")
        monkeypatch.setattr(local, "cmd_releases", self.failing(exc))
        assert main(["releases", "web"]) == 1
        err = capsys.readouterr().err
        assert err == "watcherctl: error: /var/lib/watcher/web: Permission denied\n"

    @pytest.mark.parametrize(
        ("exc", "code"),
        [
            (ReleaseNotFound("no release r here"), 2),
            (ConsulUnavailable("Consul at x: connection refused"), 3),
            (DeployRefused("held"), 4),
            (PermissionError(13, "Permission denied", "/var/lib/watcher/web"), 1),
        ],
    )
    def test_debug_adds_the_traceback_and_keeps_the_exit_code(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        exc: Exception,
        code: int,
    ) -> None:
        import watcher.ctl_local as local

        monkeypatch.setattr(local, "cmd_releases", self.failing(exc))
        assert main(["releases", "web"]) == code
        plain = capsys.readouterr().err
        assert main(["releases", "web", "--debug"]) == code
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and err.endswith(plain)

    def test_control_characters_from_kv_reach_no_terminal(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """What a host's token wrote (an error, a reason) is printed with its escape
        sequences escaped, on stdout and on stderr; newlines and tabs stay."""
        import watcher.ctl_local as local

        forged = "\x1b[2J\x1b[31mFLEET COMPROMISED\x1b[0m\rhost-1: live\tok\x9b"

        def command(ctx: CtlContext) -> int:
            print(forged)
            raise ReleaseError(forged)

        monkeypatch.setattr(local, "cmd_releases", command)
        assert main(["releases", "web"]) == 1
        out, err = capsys.readouterr()
        escaped = "\\x1b[2J\\x1b[31mFLEET COMPROMISED\\x1b[0m\\x0dhost-1: live\tok\\x9b"
        assert out == escaped + "\n"
        assert err == f"watcherctl: error: {escaped}\n"
        assert sys.stdout is not None and "_Printable" not in type(sys.stdout).__name__

    def test_publishs_progress_line_still_redraws_itself(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """watcherctl's own "\\r" (publish's upload progress on a terminal) is written raw,
        not escaped with what others wrote."""
        import watcher.publish as publish

        def fake_publish(*args: Any, progress: Any, **kw: Any) -> Any:
            assert progress is not None, "stderr is a terminal: progress is drawn"
            progress(50 * 2**20, 100 * 2**20)
            raise ReleaseError("stop here")

        monkeypatch.setattr(publish, "publish_artifact", fake_publish)
        err = TTY()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        config = tmp_path / "w.yaml"
        config.write_text(f"s3: {{bucket: b}}\napps: {{web: {{root: {tmp_path}}}}}\n")
        argv = ["publish", "web", str(tmp_path), "--artifact-id", "main-1", "-c", str(config)]
        assert main(argv) == 1
        assert err.getvalue().startswith("\rupload  50% (50.0/100.0 MiB)"), err.getvalue()

    def test_any_other_exception(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        import watcher.ctl_local as local

        monkeypatch.setattr(local, "cmd_releases", self.failing(RuntimeError("boom")))
        assert main(["releases", "web"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("watcherctl: error: unexpected RuntimeError: boom")
        assert "--debug" in err and len(err.splitlines()) == 1
        with pytest.raises(RuntimeError):
            main(["releases", "web", "--debug"])


@pytest.mark.parametrize(
    ("first", "said"),
    [
        ("src/sub", "'src/sub' is not an app name (letters, digits, "),
        ("src", "DIR 'web' does not exist and APP 'src' is a directory"),
    ],
)
def test_publish_with_dir_and_app_swapped_is_one_usage_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    first: str,
    said: str,
) -> None:
    """The newcomer test: `publish src/sym web` warned that it publishes to app
    'src/sym', then failed on the app name (exit 1); `publish src web` warned of app
    'src', then said "web: no such directory"."""
    (tmp_path / "src" / "sub").mkdir(parents=True)
    config = tmp_path / "w.yaml"
    config.write_text(f"s3: {{bucket: b}}\napps: {{web: {{root: {tmp_path}}}}}\n")
    monkeypatch.chdir(tmp_path)
    argv = ["publish", first, "web", "--artifact-id", "main-1", "-c", str(config)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"watcherctl publish: error: {said}" in err, err
    assert f"APP comes first (watcherctl publish web {first})" in err, err
    assert "warning" not in err, err
    # APP one of the config's apps, DIR missing (a failed build), a directory named as the
    # app beside it: no swap suggested (it would publish the sources as app 'dist').
    (tmp_path / "web").mkdir()
    assert main(["publish", "web", "dist", "--artifact-id", "main-1", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "comes first" not in err and "dist: no such directory" in err, err


def test_a_held_hosts_local_rollbacks_keep_its_hold_reason_bounded() -> None:
    """Each local rollback on a held host adds to the hold's reason: it grew without end."""
    from watcher.ctl_local import _local_rollback_reason
    from watcher.releases import Hold

    reason = "disk maintenance"
    for n in range(100):
        reason = _local_rollback_reason(Hold(reason, "alice@h1", ""), f"2026010{n % 10}-r{n}")
    assert reason.startswith("disk maintenance (by alice@h1); then local rollback to ")
    assert reason.endswith("; then local rollback to 20260109-r99")
    assert len(reason) < 1200 and " [cut] (by alice@h1)" in reason


class TestDeployWaitStopped:
    def test_only_an_unavailable_consul_is_called_lost(self) -> None:
        """Every Consul error in `deploy`'s wait was worded "lost Consul", a token that
        may write a deploy but not read its acks included."""
        from watcher.ctl_fleet import _wait_lost
        from watcher.errors import ConsulError, ConsulPermissionDenied, ConsulUnavailable

        assert _wait_lost(ConsulUnavailable("x")) == (
            "lost Consul while waiting (the commands named here need a Consul agent that "
            "answers: this host's once it is back, or another host's)"
        )
        denied = _wait_lost(ConsulPermissionDenied("x"))
        assert "lost" not in denied and "may not read" in denied
        deleted = ConsulPermissionDenied("x")
        deleted.unknown_token = True  # "ACL not found": the token was deleted since the start
        assert _wait_lost(deleted) == "Consul no longer knows this token, so the wait stopped"
        assert "lost" not in _wait_lost(ConsulError("x"))


class TestInterruptedWhileRollingBack:
    def test_an_interrupt_during_the_automatic_rollback_names_it(self) -> None:
        """`deploy` waits for the automatic rollback of a deploy whose validate failed; a
        Ctrl-C (or Consul lost) there said the deploy "is committed ... undo it afterwards
        with `watcherctl rollback`", while the rollback was running."""
        from types import SimpleNamespace

        from watcher.ctl_fleet import ROLLING_BACK, VERDICT, _interrupted_at

        ctx = SimpleNamespace(command_line=lambda *argv: "watcherctl " + " ".join(argv))
        record = SimpleNamespace(kind="deploy", id="20261205T120000Z-abcdef", app="web")
        said = _interrupted_at(
            ctx,  # type: ignore[arg-type]
            record,  # type: ignore[arg-type]
            {VERDICT: "commit", ROLLING_BACK: "20261205T120001Z-fedcba"},
        )
        assert "automatic rollback 20261205T120001Z-fedcba goes on" in said, said
        assert "undo it afterwards" not in said
        committed = _interrupted_at(ctx, record, {VERDICT: "commit"})  # type: ignore[arg-type]
        assert "undo it afterwards with `watcherctl rollback web`" in committed, committed


class TestFailedAfterCommitLines:
    """`status`'s FAILED AFTER COMMIT lines: how the automatic rollback stands and a
    command that works."""

    failed_record: Any = type("Failed", (), {"release": "r2"})()

    def failed(self, rollback: dict[str, Any] | None, roll_back: str | None) -> dict[str, Any]:
        return {
            "deploy": "d2",
            "release": "r2",
            "hosts": {"h2": "validate hook exited 1"},
            "rollback": rollback,
            "roll_back": roll_back,
        }

    def test_a_rollback_whose_request_is_gone_is_not_running(self) -> None:
        """History trimmed the rollback's request (deploys that moved nothing pushed it
        out) while `current` still names the failed deploy: it said "is running", for
        good."""
        from watcher.ctl_fleet import failed_release_lines, rollback_summary

        summary = rollback_summary(None, "d3", self.failed_record)
        assert summary["result"] == "unknown"
        lines = failed_release_lines(self.failed(summary, "watcherctl rollback web"), "web")
        assert not any("running" in line for line in lines), lines
        assert lines[1] == (
            "  its automatic rollback d3: unknown: its request is gone or cannot be read: how "
            "it ended is not known here"
        )
        assert lines[2].startswith("  the fleet stays on it: `watcherctl rollback web` or ")

    def test_the_command_names_a_release_when_the_previous_one_failed_too(self) -> None:
        from watcher.ctl_fleet import failed_release_lines

        lines = failed_release_lines(
            self.failed(None, "watcherctl rollback web --to RELEASE"), "web"
        )
        assert lines[1].startswith(
            "  the fleet stays on it: `watcherctl rollback web --to RELEASE` (its previous "
            "release failed too, or is not trusted"
        ), lines
        lines = failed_release_lines(self.failed(None, None), "web")
        assert lines[1].startswith("  the fleet stays on it: deploy a fix (no previous release")
        running = {"deploy": "d3", "result": None, "note": "still running"}
        assert failed_release_lines(self.failed(running, "watcherctl rollback web"), "web")[1:] == [
            "  its automatic rollback d3 is running"
        ]

    def test_a_deploy_in_flight_is_what_moves_the_fleet_not_a_rollback(self) -> None:
        """The banner told the operator to roll back while the next deploy, in flight,
        was moving the fleet off the failed release (a rollback would be refused then)."""
        from watcher.ctl_fleet import failed_release_lines

        failed = self.failed(None, "watcherctl rollback web")
        nxt = {"id": "d4", "kind": "deploy", "release": "r4", "decision": None}
        lines = failed_release_lines(failed, "web", nxt)
        assert lines[1:] == [
            "  deploy d4 of r4 is in flight: once it commits, it moves the fleet off it"
        ]
        lines = failed_release_lines(failed, "web", {**nxt, "decision": "commit"})
        assert lines[1:] == ["  deploy d4 of r4 is in flight: committed, it moves the fleet off it"]
        aborting = failed_release_lines(failed, "web", {**nxt, "decision": "abort"})
        assert aborting[1] == "  deploy d4 of r4 is in flight: aborted; once it has ended:"
        assert aborting[2].startswith("  the fleet stays on it: `watcherctl rollback web` or ")
        contested = failed_release_lines(failed, "web", {**nxt, "decision": "contested"})
        assert contested[1] == (
            "  deploy d4 of r4 is in flight: contested (its acks contradict each other); "
            "once it has ended:"
        )
        # The failed deploy itself, or an inflight record that does not parse: as before.
        for same in ({**nxt, "id": "d2"}, {"id": "d5", "problem": "BROKEN"}, None):
            lines = failed_release_lines(failed, "web", same)
            assert lines[1].startswith("  the fleet stays on it: `watcherctl rollback web`"), lines

    def test_without_consul_the_fleet_json_keeps_every_key(self) -> None:
        """A script reads the same keys whether Consul answered or not (README)."""
        from watcher.ctl_fleet import _unread_fleet

        app = {"fleet_error": "Consul unreachable", "current": "r1"}
        unread = _unread_fleet({"node": "h1", "apps": {"web": app}})["web"]
        assert unread["current_failed"] is None and unread["current_problems"] == {}
        assert {"current", "previous", "deploy", "hosts"} <= set(unread)


@pytest.mark.parametrize(
    "argv",
    [
        ["deploy", "main-fb04dcb6"],
        ["deploy", "--timeout", "30", "main-fb04dcb6"],  # an option's value is not taken
        ["deploy", "main-fb04dcb6", "--timeout=30"],
    ],
)
def test_a_missing_positional_says_which_word_was_taken_as_what(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """The operator test: `deploy main-fb04dcb6` (the app forgotten) said only "required:
    artifact", not that the build had been read as the app."""
    with pytest.raises(SystemExit):
        build_parser("deploy").parse_args(argv)
    err = capsys.readouterr().err.rstrip()
    assert err.endswith(
        "the following arguments are required: artifact (it took 'main-fb04dcb6' as APP; "
        "the command is `watcherctl deploy APP ARTIFACT`)"
    ), err


def test_gc_without_an_app_names_only_the_app_as_required(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """NODE is optional (`gc web` lists the hosts that are gone); Python 3.11's argparse
    named it required too."""
    with pytest.raises(SystemExit):
        build_parser("gc").parse_args(["gc"])
    assert capsys.readouterr().err.rstrip().endswith("the following arguments are required: app")
    assert build_parser("gc").parse_args(["gc", "web"]).nodes == []


@pytest.mark.parametrize(
    ("by", "left", "said"),
    [
        ("alice@host-1", ["host-3"], "--allow-missing: host-3 not expected"),
        # a raw `consul event` deploy expects the live members: nobody passed a flag
        ("consul event 7f3c9e2a", ["host-3"], "live members only: host-3 not expected"),
        ("consul event 7f3c9e2a", [], None),  # nobody left out: nothing to say
        ("alice@host-1", [], None),
    ],
)
def test_history_says_who_a_live_members_only_deploy_left_out(
    by: str, left: list[str], said: str | None
) -> None:
    from watcher.ctl_fleet import _detail

    row = {
        "result": "committed",
        "reason": "",
        "allow_missing": True,
        "requested_by": by,
        "distrusted": [],
    }
    detail = _detail({**row, "left_out": left})
    if said is None:
        assert "allow-missing" not in detail and "live members" not in detail, detail
    else:
        assert said in detail, detail


class TestWhatANewcomerTypesFirst:
    """`watcherctl` run as a process, as a newcomer types it: mistakes get a way on."""

    @staticmethod
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        repo = Path(__file__).resolve().parents[2]
        return subprocess.run(
            [str(Path(sys.executable).parent / "watcherctl"), *args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(repo)},
            timeout=60,
            check=False,
        )

    def test_a_misspelled_command_is_named_with_the_close_one(self) -> None:
        said = self.run("stauts", "--fleet")
        assert said.returncode == 2, said
        assert said.stderr.startswith(
            "watcherctl: error: no command 'stauts'; did you mean status? (the commands: "
        ), said.stderr
        far = self.run("frobnicate")
        assert far.returncode == 2 and "did you mean" not in far.stderr, far.stderr

    @pytest.mark.parametrize(
        ("argv", "hint"),
        [
            (["status", "--flet"], "--flet (did you mean --fleet?)"),
            (["history", "web", "--limt=5"], "--limt=5 (did you mean --limit?)"),
            (["deploy", "web", "main-1", "--allow-mising"], "(did you mean --allow-missing?)"),
        ],
    )
    def test_a_misspelled_option_is_named_with_the_close_one(
        self, argv: list[str], hint: str
    ) -> None:
        said = self.run(*argv)
        assert said.returncode == 2, said
        assert said.stderr.rstrip().endswith(hint), said.stderr
        far = self.run(argv[0], "--zzzzzz")
        assert far.returncode == 2 and "did you mean" not in far.stderr, far.stderr

    def test_help_command_is_the_commands_help(self) -> None:
        said = self.run("help", "deploy")
        assert said.returncode == 0, said
        assert said.stdout.startswith("usage: watcherctl deploy "), said.stdout

    def test_a_release_given_to_rollback_without_to(self) -> None:
        said = self.run("rollback", "web", "20261205T145949Z-main-3bfc2695")
        assert said.returncode == 2, said
        assert (
            "(a release goes with --to: `watcherctl rollback web --to "
            "20261205T145949Z-main-3bfc2695`)"
        ) in said.stderr, said.stderr
        # --local and -c kept: pasted, it must not become a fleet rollback of another config
        local = self.run("rollback", "web", "--local", "20261205T145949Z-main-3bfc2695", "-c", "F")
        assert (
            "`watcherctl rollback web --local --to 20261205T145949Z-main-3bfc2695 -c F`"
        ) in local.stderr, local.stderr


def test_created_by_names_no_empty_build_number() -> None:
    from watcher.ctl_publish import created_by

    env = {"BUILDKITE": "true", "BUILDKITE_PIPELINE_SLUG": "my-pipeline"}
    assert created_by({**env, "BUILDKITE_BUILD_NUMBER": "7"}) == "buildkite:my-pipeline#7"
    assert created_by({**env, "BUILDKITE_BUILD_NUMBER": ""}) == "buildkite:my-pipeline"
    assert created_by(env) == "buildkite:my-pipeline"


def test_a_stopped_watcher_is_not_shown_running(tmp_path: Path) -> None:
    """SIGSTOPped, a watcher's status file stays fresh for up to 30 s: `status` on its host
    said "watcher running" while `status --fleet` already showed it down (the CLI review)."""
    from watcher.ctl_fleet import daemon_status

    proc = subprocess.Popen(["sleep", "60"])
    try:
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        (tmp_path / "status.json").write_text(json.dumps({"pid": proc.pid, "updated_at": now}))
        assert daemon_status(str(tmp_path))["running"] is True
        proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while (data := daemon_status(str(tmp_path)))["running"] and time.monotonic() < deadline:
            time.sleep(0.01)  # the kernel stops it at its next return to user space
        assert data["running"] is False and data["stuck"] is True, data
        assert data["reason"] == (
            f"pid {proc.pid} is stopped (SIGSTOP, or a debugger): it does nothing until it is "
            f"continued (kill -CONT {proc.pid})"
        )
        proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 5
        while not (data := daemon_status(str(tmp_path)))["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert data["running"] is True, data
    finally:
        proc.kill()
        proc.wait()


def test_history_names_an_abort_request_that_did_not_decide_the_deploy() -> None:
    """A host gone decided the abort first: the operator's request and reason were
    nowhere in history (the CLI review). Where the request decided it, the reason already
    names it, and it is not said twice."""
    from watcher.ctl_fleet import _detail

    asked = {"by": "alice@ops", "at": "2026-12-06T03:00:00Z", "reason": "wrong build"}
    row: dict[str, Any] = {
        "result": "aborted",
        "reason": "expected node(s) host-3 lost the session",
        "abort_requested": asked,
        "distrusted": [],
    }
    assert _detail(row) == (
        "expected node(s) host-3 lost the session; abort requested by alice@ops: wrong build"
    )
    row["reason"] = "node host-1 aborted: abort requested by alice@ops: wrong build"
    assert _detail(row) == row["reason"]
    row["abort_requested"] = None
    assert _detail(row) == row["reason"]


def test_history_says_what_decided_an_abort_before_what_hosts_said_later() -> None:
    """The status review, on a real fleet: a host frozen (or its token revoked, or its
    agent stopped) lost its session and the abort was decided on that; back after the
    prepare deadline, the host acked "failed: prepare deadline passed", and history showed
    only that. An abort's reason comes first, the failing hosts after it but the one whose
    error it quotes; other results list every failing host, as before (the review of the
    first version: it dropped every host a reason named, host-2's own error from
    "failed after the commit on host-1, host-2: <host-1's>", and a node named `web` from
    a reason quoting /srv/web)."""
    from watcher.ctl_fleet import _detail

    def host(state: str, error: str = "") -> dict[str, str]:
        return {"state": state, "error": error, "output_tail": ""}

    late = "prepare deadline passed before this host was ready"
    row: dict[str, Any] = {
        "result": "aborted",
        "reason": "expected node(s) host-3 lost the session",
        "distrusted": [],
        "hosts": {
            "host-1": host("aborted", "aborted by the decision"),
            "host-3": host("failed", late),
        },
    }
    assert _detail(row) == f"expected node(s) host-3 lost the session; host-3: failed: {late}"
    row["reason"] = "node host-10 failed: prepare hook /srv/web/p: disk full (and 1 more)"
    row["hosts"]["host-10"] = host("failed", "prepare hook /srv/web/p: disk full")
    row["hosts"]["web"] = host("failed", "disk full")
    assert _detail(row) == (
        "node host-10 failed: prepare hook /srv/web/p: disk full (and 1 more); host-3: "
        f"failed: {late}; web: failed: disk full"
    )
    # In flight: the failing hosts.
    row.update(result=None, reason="")
    assert _detail(row).startswith(f"host-3: failed: {late}; host-10: failed: prepare hook")
    # After the commit, on two hosts: each host's own error, as before.
    row.update(
        result="rolled_back",
        reason="failed after the commit on host-1, host-2: validate: exited 1",
        hosts={
            "host-1": host("failed_after_commit", "validate: exited 1"),
            "host-2": host("failed_after_commit", "validate: timed out after 20s"),
        },
    )
    assert _detail(row) == (
        "host-1: failed_after_commit: validate: exited 1; host-2: failed_after_commit: "
        "validate: timed out after 20s"
    )
    row.update(result="committed", hosts={"host-2": host("failed_after_commit", "boom")})
    assert _detail(row) == (
        "host-2: failed_after_commit: boom; failed after its end on host-2: no automatic rollback"
    )


def test_stalled_names_only_a_node_that_holds_its_named_session_without_an_ack() -> None:
    """`stalled_by`: past the apply deadline plus its margin, and only while the acks
    decide nothing, a node is stalled when the session its request named still holds its
    member key and it has acked neither ready nor failed."""
    rec = a_record(["a", "b", "c", "d"], sessions={"a": "s-a", "b": "s-b", "c": "s-c", "d": "s-d"})
    digest = rec.digest()

    def member(node: str, session: str) -> KVEntry:
        return KVEntry(f"w/apps/web/members/{node}", b"{}", 1, 1, 1, session, 0)

    ready = NodeProgress(node="a", state="ready", digest=digest)
    staging = NodeProgress(node="b", state="staging")
    nodes = {"a": ready, "b": staging}
    view = DeployView(rec, None, nodes, {}, None, None)
    # c: no ack, its named session holds its key; d: its key held by another session.
    members = {n: member(n, f"s-{n}") for n in "abc"} | {"d": member("d", "s-new")}
    at = datetime(2026, 1, 1, 0, 20, 0, tzinfo=UTC)
    assert stalled_by(view, members, now=at + timedelta(seconds=STALL_MARGIN - 1)) == {}
    later = at + timedelta(seconds=STALL_MARGIN)
    assert stalled_by(view, members, now=later) == {"b": "s-b", "c": "s-c"}
    # An ack that says no decides it (abort): nobody is stalled then.
    failed = DeployView(
        rec, None, {**nodes, "c": NodeProgress(node="c", state="failed")}, {}, None, None
    )
    assert stalled_by(failed, members, now=later) == {}
    # d's named session alive without its key (``named_alive`` read it): stalled as well;
    # a's is not, whatever is said of it: it acked ready.
    assert stalled_by(view, members, now=later, alive={"s-d", "s-a"}) == {
        "b": "s-b",
        "c": "s-c",
        "d": "s-d",
    }


def test_a_committed_deploy_not_ended_past_its_margin_names_the_hosts_that_end_it() -> None:
    """Every running watcher of the app ends a committed deploy by its apply deadline: one
    still in flight past the margin has no watcher left (its only host removed the app
    while a stop kept its session, the operator review), and `status` must say which
    watchers end it, not show it as fine."""
    rec = a_record(["a", "b"], sessions={"a": "s-a", "b": "s-b"})
    digest = rec.digest()
    ready = {n: NodeProgress(node=n, state="ready", digest=digest) for n in "ab"}
    view = DeployView(rec, None, ready, {}, None, None)
    at = datetime(2026, 1, 1, 0, 20, 0, tzinfo=UTC)  # its apply deadline
    assert not_ended(view, now=at + timedelta(seconds=STALL_MARGIN - 1)) == []
    later = at + timedelta(seconds=STALL_MARGIN)
    assert not_ended(view, now=later) == ["a", "b"]
    undecided = DeployView(rec, None, {"a": ready["a"]}, {}, None, None)
    assert not_ended(undecided, now=later) == []  # STALLED's business, not this
    ended = replace(view, outcome=object())  # type: ignore[arg-type]
    assert not_ended(ended, now=later) == []
    assert committed_end("web", ["a", "b"]) == (
        "It ends once the watchers of web that run on its hosts (a, b) have applied it, or "
        "past its apply deadline at any watcher of web that runs"
    )


def test_a_request_whose_apply_deadline_precedes_its_prepare_deadline_stalls_nobody_early() -> None:
    """A request is anybody's word: with its apply deadline before its prepare deadline, a
    host still staging (honestly, before its prepare deadline) looked stalled."""
    rec = a_record(["a"], sessions={"a": "s-a"})
    rec = replace(rec, prepare_deadline="2026-01-01T01:00:00Z")  # apply by 00:20
    view = DeployView(rec, None, {}, {}, None, None)
    members = {"a": KVEntry("w/apps/web/members/a", b"{}", 1, 1, 1, "s-a", 0)}
    at = datetime(2026, 1, 1, 1, 0, 0, tzinfo=UTC)
    assert stalled_by(view, members, now=at + timedelta(seconds=STALL_MARGIN - 1)) == {}
    assert stalled_by(view, members, now=at + timedelta(seconds=STALL_MARGIN)) == {"a": "s-a"}


def test_a_session_of_another_node_is_never_ended_as_a_stalled_ones() -> None:
    """`end_stalled_sessions` destroys a session only on the node it is said to stall: a
    request any host's token can write may name another node's session (the attacker
    review ended host-1's session as host-3's)."""
    destroyed: list[str] = []
    infos = {
        "s-1": {"Node": "host-1", "Name": "watcher host-1 under w/"},
        "s-3": {"Node": "host-3", "Name": "watcher host-3 under w/"},
    }
    consul = types.SimpleNamespace(
        session_info=lambda sid, consistent=False: infos.get(sid),
        session_destroy=destroyed.append,
        kv_keys_checked=lambda prefix: (["w/apps/web/"], False),
    )
    store = types.SimpleNamespace(app="web", consul=consul, keys=Keys("w", "web"))
    members = {"host-1": a_member("host-1", "s-1"), "host-3": a_member("host-3", "s-3")}
    with pytest.raises(
        DeployRefused, match=r"named 'watcher host-1 under w/' \(Consul node host-1\)"
    ):
        end_stalled_sessions(store, "d1", {"host-3": "s-1"}, members)  # type: ignore[arg-type]
    # Another fleet's watcher of host-1 on host-1's own node (its session is named after
    # that fleet's prefix): not this fleet's, refused (the second code review ended it).
    infos["s-other"] = {"Node": "host-1", "Name": "watcher host-1 under otherfleet/"}
    with pytest.raises(DeployRefused, match="named 'watcher host-1 under otherfleet/'"):
        end_stalled_sessions(store, "d1", {"host-1": "s-other"}, members)  # type: ignore[arg-type]
    # An older watcher's "watcher <node>": only while it holds the node's key in this app.
    infos["s-old"] = {"Node": "host-1", "Name": "watcher host-1"}
    with pytest.raises(DeployRefused, match="named 'watcher host-1'"):
        end_stalled_sessions(store, "d1", {"host-1": "s-old"}, members)  # type: ignore[arg-type]
    held = {**members, "host-1": a_member("host-1", "s-old")}
    assert end_stalled_sessions(store, "d1", {"host-1": "s-old"}, held) == (  # type: ignore[arg-type]
        {"host-1": "s-old"},
        "",
    )
    assert destroyed == ["s-old"]
    destroyed.clear()
    # Another service's lock on host-3's own node, held by host-3's member key (its token
    # may acquire it with any session it can read): not a watcher's session, refused.
    infos["s-v"] = {"Node": "host-3", "Name": "vault-ha-lock"}
    members["host-3"] = a_member("host-3", "s-v")
    with pytest.raises(DeployRefused, match="named 'vault-ha-lock'"):
        end_stalled_sessions(store, "d1", {"host-3": "s-v"}, members)  # type: ignore[arg-type]
    assert destroyed == []


def a_member(node: str, session: str, app: str = "web") -> KVEntry:
    return KVEntry(f"w/apps/{app}/members/{node}", b"{}", 1, 1, 1, session, 0)


def test_a_stalled_watcher_named_other_than_its_agent_has_its_session_ended() -> None:
    """A watcher whose `node` setting is not its agent's name (allowed, documented) makes
    its session on the agent's node: `abort --end-sessions`, the only way out of STALLED,
    refused it as another node's (the operator review). Its session holds its own member
    key and no other node's: ended. One that also holds another node's key, in this app or
    another, may be that node's watcher's: refused, nothing ended."""
    destroyed: list[str] = []
    infos = {
        "s-3": {"Node": "ip-10-0-0-3", "Name": "watcher web-3 under w/"},
        "s-1": {"Node": "host-1", "Name": "watcher host-1 under w/"},
        "s-lock": {"Node": "ip-10-0-0-3", "Name": "consul lock"},
    }
    apps = {"web": {}, "api": {}}  # app -> members
    consul = types.SimpleNamespace(
        session_info=lambda sid, consistent=False: infos.get(sid),
        session_destroy=destroyed.append,
        kv_keys_checked=lambda prefix: ([f"w/apps/{a}/" for a in apps], False),
    )

    def members_of(app: str) -> Any:
        return lambda consistent=False: apps[app]

    store = types.SimpleNamespace(
        app="web", consul=consul, keys=Keys("w", "web"), members=members_of("web")
    )
    apps["web"] = {"web-3": a_member("web-3", "s-3"), "host-1": a_member("host-1", "s-1")}
    with patch.object(ctl_fleet, "DeployStore") as other:
        other.side_effect = lambda consul, prefix, app: types.SimpleNamespace(
            members=members_of(app), inflight=lambda consistent=False: (None, 0)
        )
        ended, refused = end_stalled_sessions(  # type: ignore[arg-type]
            store, "d1", {"web-3": "s-3"}, apps["web"]
        )
        assert (ended, refused, destroyed) == ({"web-3": "s-3"}, "", ["s-3"])
        destroyed.clear()
        # A session of that node that no watcher of web-3 made (a lock web-3's token
        # attached to its member key, say): refused.
        locked = {**apps["web"], "web-3": a_member("web-3", "s-lock")}
        with pytest.raises(DeployRefused, match="named 'consul lock'"):
            end_stalled_sessions(store, "d1", {"web-3": "s-lock"}, locked)  # type: ignore[arg-type]
        # Its member key held by another session: nothing says the session is web-3's.
        taken = {**apps["web"], "web-3": a_member("web-3", "s-other")}
        with pytest.raises(DeployRefused, match="does not hold web-3's member key"):
            end_stalled_sessions(store, "d1", {"web-3": "s-3"}, taken)  # type: ignore[arg-type]
        # The session also holds another node's key, here or in another app: refused.
        shared = {**apps["web"], "web-4": a_member("web-4", "s-3")}
        with pytest.raises(DeployRefused, match="also holds the member key of web-4"):
            end_stalled_sessions(store, "d1", {"web-3": "s-3"}, shared)  # type: ignore[arg-type]
        apps["api"] = {"api-9": a_member("api-9", "s-3", "api")}
        with pytest.raises(DeployRefused, match="holds app api's member key of api-9"):
            end_stalled_sessions(  # type: ignore[arg-type]
                store, "d1", {"web-3": "s-3"}, apps["web"]
            )
    assert destroyed == []


def test_previous_is_what_every_host_that_went_live_flipped_from() -> None:
    """`flipped_elsewhere`: the live acks (node-owned) against `current.previous` (any
    host's token rewrites it); acks without the field (older versions) say nothing."""
    rec = a_record(["a", "b", "c"])
    r1, r2 = "20251231T000000Z-main-aaaaaaaa", "20251231T120000Z-main-bbbbbbbb"

    def view(froms: dict[str, str]) -> DeployView:
        nodes = {n: NodeProgress(node=n, state="live", flipped_from=f) for n, f in froms.items()}
        return DeployView(rec, None, nodes, {}, None, None)

    assert flipped_elsewhere(view({"a": r2, "b": r2, "c": ""}), r2) == ""
    assert flipped_elsewhere(view({"a": "", "b": ""}), r1) == ""
    said = flipped_elsewhere(view({"a": r2, "b": r2, "c": r1}), r1)
    assert said == (
        f"the hosts that went live in deploy {rec.id} flipped from: {r1} (c); {r2} (a, b)"
    )
    # Most hosts agree with the record: the others may have been moved by hand (the status
    # review's `ln -sfn` on one host read as a rewritten record).
    said = flipped_elsewhere(view({"a": r2, "b": r2, "c": r1}), r2)
    assert said == (
        f"the hosts that went live in deploy {rec.id} flipped from: {r1} (c); {r2} (a, b) "
        "(c may have been on another release when it started: `current` changed by hand, "
        "or `rollback --local`)"
    )


def test_a_redeploy_warning_names_the_build_asked_for() -> None:
    """The newcomer pass: the demo's `publish` of the same tree under another commit made a
    second build with the same bytes; deploying it warned "the fleet already runs
    <the other build>", a build nobody had asked for."""
    current = types.SimpleNamespace(
        artifact="main-fb04dcb6", sha256="a" * 64, release="20261206T120000Z-main-fb04dcb6"
    )
    store = types.SimpleNamespace(current=lambda: (current, 7))
    twin = types.SimpleNamespace(
        artifact="main-574e1771", sha256="a" * 64, release="20261206T120100Z-main-574e1771"
    )
    said = redeploy_warning(store, twin)  # type: ignore[arg-type]
    assert said.startswith(
        "main-574e1771 has the same contents (sha256) as main-fb04dcb6, which the fleet runs "
        "(release 20261206T120000Z-main-fb04dcb6): deployed again"
    ), said
    again = types.SimpleNamespace(
        artifact="main-fb04dcb6", sha256="a" * 64, release="20261206T120100Z-main-fb04dcb6"
    )
    said = redeploy_warning(store, again)  # type: ignore[arg-type]
    assert said.startswith("the fleet already runs main-fb04dcb6 (release "), said
    other = types.SimpleNamespace(artifact="main-1", sha256="b" * 64, release="r-other")
    assert redeploy_warning(store, other) == ""  # type: ignore[arg-type]


def test_history_keeps_a_host_that_said_live_only_after_the_end_as_not_live() -> None:
    """A host still applying at the apply deadline (or whose watcher came back later)
    writes its live ack after the end: history listed it "not live when it ended" only
    until then. Consul's index of its ack against the outcome's keeps it listed; an ack
    written before the outcome, or an outcome rebuilt from the acks, lists nobody."""
    rec = a_record(["a", "b", "c"])
    digest = rec.digest()
    states = {"a": "live", "b": "live", "c": "ready"}
    nodes = {n: NodeProgress(node=n, state=st, digest=digest) for n, st in states.items()}
    end = Outcome(result="committed", at="2026-01-01T00:20:01Z", by="a", reason="ok")
    view = DeployView(
        rec, None, nodes, {}, end, None, ack_indexes={"a": 10, "b": 30, "c": 12}, outcome_index=20
    )
    assert view.live_after_end() == ["b"]
    data = deploy_summary(view.checked())
    assert data["not_live"] == ["b", "c"]
    lines = _human_summary(data).splitlines()
    assert any(line.startswith("  NOT LIVE: c: acked ready but had not switched") for line in lines)
    assert "  NOT LIVE when it ended: b: acked live only after the deploy ended" in (
        "\n".join(lines)
    )
    # b's live ack before the end (index 15 < 20): live when it ended.
    early = replace(view, ack_indexes={"a": 10, "b": 15, "c": 12})
    assert deploy_summary(early.checked())["not_live"] == ["c"]
    # No outcome record (readers rebuild it from the acks): no index to hold them against.
    rebuilt = replace(view, outcome=None, outcome_index=0, nodes={**nodes, "c": nodes["a"]})
    checked = rebuilt.checked()
    assert checked.outcome is not None and checked.outcome.result == "committed"
    assert deploy_summary(checked)["not_live"] == []
    # An outcome record the acks contradict is dropped with its index.
    forged = replace(view, outcome=replace(end, result="aborted")).checked()
    assert forged.outcome_index == 0 and forged.live_after_end() == []


def test_not_live_after_the_end_names_only_hosts_still_applying_or_stopped() -> None:
    """`current_not_live`: the hosts of the deploy `current` names that acked it and have
    not said live or failed. Not one whose record says it converged since (a convergence
    writes no ack), nor one retired by `gc` (its record deleted, its acks kept: the second
    code review saw it listed though the table no longer showed it)."""
    rec = a_record(["a", "b", "c", "d", "e", "f"])
    states = {"a": "live", "b": "committed", "c": "ready", "d": "committed", "e": "ready"}
    nodes = {n: NodeProgress(node=n, state=st) for n, st in states.items()}
    view = DeployView(rec, None, nodes, {}, None, None)
    old, new = "20251231T000000Z-main-0000aaaa", rec.release

    def host(node: str, release: str, state: str = "") -> HostRecord:
        return HostRecord(node=node, release=release, last_seen="2026-01-01T00:30:00Z", state=state)

    hosts = {
        "a": host("a", new, "live"),
        "b": host("b", new, "committed"),  # switched, its validate still running
        "c": host("c", old),  # stopped after its ready ack
        "d": host("d", new),  # converged since its watcher came back: state ""
        "f": host("f", old),  # no ack at all (left out, or never acked)
    }  # e: retired with `gc`, no record
    assert not_live_after_end(view, hosts) == ["b", "c"]
