"""`watcher check-config`, the `watcher` entry point, and the example config it validates."""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from watcher import daemon_cli
from watcher.config import (
    DEFAULT_PATH,
    AppConfig,
    Config,
    ConsulSettings,
    DaemonSettings,
    Limits,
    Timeouts,
    load_config,
    parse_config,
)
from watcher.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "systemd" / "watcher.example.yaml"
WATCHER = Path(sys.executable).parent / "watcher"

MINIMAL = "s3:\n  bucket: b\napps:\n  web:\n    root: /srv/apps\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "WATCHER_"))}
    env.update(extra)
    return env


def run_watcher(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real console script, as an operator runs it."""
    return subprocess.run(
        [str(WATCHER), *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=60,
        check=False,
    )


@pytest.fixture(autouse=True)
def _no_consul_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in list(os.environ):
        if name.startswith(("CONSUL_", "WATCHER_")):
            monkeypatch.delenv(name)
    yield
    structlog.reset_defaults()


class TestExample:
    def test_the_console_script_accepts_the_example(self) -> None:
        proc = run_watcher("check-config", "-c", str(EXAMPLE))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"{EXAMPLE}: OK (2 apps: api, web)\n"
        assert "Traceback" not in proc.stderr
        # Only warnings about this machine (no /srv/apps, no hook scripts), never errors.
        for line in proc.stderr.splitlines():
            assert line.startswith(f"{EXAMPLE}: warning: "), line

    def test_the_example_shows_every_key_the_parser_knows(self) -> None:
        example = yaml.safe_load(EXAMPLE.read_text())
        assert example_keys(example) == parser_keys(example)

    def test_values_shown_as_defaults_are_the_defaults(self) -> None:
        config = load_config(EXAMPLE, env={})
        assert config.consul == ConsulSettings()
        assert config.daemon == DaemonSettings()
        assert config.node is None
        assert config.kv_prefix == "watcher"
        web, api = config.apps["web"], config.apps["api"]
        assert api == AppConfig(name="api", root="/srv/apps", hooks=api.hooks)
        assert all(commands == () for commands in api.hooks.values())
        assert web.timeouts == Timeouts()
        assert web.limits == Limits()
        for name in (
            "keep_releases",
            "umask",
            "prefetch",
            "on_validate_failure",
            "artifact_cache_bytes",
            "aborted_staging_max_age",
        ):
            assert getattr(web, name) == getattr(api, name), name
        # The hooks README's step 5 installs, from hooks/examples/.
        assert web.hooks["post_release"] == (("/usr/local/lib/watcher/hooks/python-venv",),)
        for phase in ("post_release", "post_symlink", "validate"):
            for argv in web.hooks[phase]:
                assert argv[0].startswith("/usr/local/lib/watcher/hooks/"), argv
                assert (REPO / "hooks" / "examples" / Path(argv[0]).name).is_file(), argv
        assert web.hooks["post_abort"] == ()
        assert web.user == "www-data"
        assert web.shared == ("log", "public/uploads")


def example_keys(data: Any, path: str = "") -> set[str]:
    """Every key path of the YAML, with app names replaced by ``*``."""
    keys: set[str] = set()
    if not isinstance(data, dict):
        return keys
    for key, value in data.items():
        here = "apps.*" if path == "apps" else f"{path}.{key}" if path else key
        keys.add(here)
        keys |= example_keys(value, here)
    return keys


def _with_probes(data: Any) -> Any:
    """A copy of ``data`` with an unknown key added to every mapping."""
    if isinstance(data, dict):
        probed = {k: _with_probes(v) for k, v in data.items()}
        probed["zz_probe"] = 1
        return probed
    return data


def parser_keys(example: dict[str, Any]) -> set[str]:
    """The keys config.py accepts, read from its own "unknown key (known: ...)" errors.

    Every mapping of the example gets an unknown key; the parser then names, for each of
    them, the keys it knows at that level. Levels the example lacks show up as missing keys
    one level up, so the two sets differ whichever side grows.
    """
    probed = _with_probes(example)
    probed["apps"].pop("zz_probe")  # app names are free-form, not keys
    with pytest.raises(ConfigError) as info:
        parse_config(probed, source="probe", env={})
    keys: set[str] = set()
    levels = 0
    for problem in info.value.problems:
        match = re.fullmatch(r"(.*)zz_probe: unknown key \(known: (.*)\)", problem)
        assert match, f"unexpected problem while probing: {problem}"
        parent = re.sub(r"^apps\.[^.]+", "apps.*", match.group(1).rstrip("."))
        levels += 1
        for key in match.group(2).split(", "):
            keys.add(f"{parent}.{key}" if parent else key)
    assert levels == len(_mapping_paths(example)), "a mapping of the example was not probed"
    keys.add("apps.*")
    return keys


def _mapping_paths(data: Any, path: str = "") -> list[str]:
    out = [path] if isinstance(data, dict) and path != "apps" else []
    if isinstance(data, dict):
        for key, value in data.items():
            out += _mapping_paths(value, f"{path}.{key}" if path else str(key))
    return out


class TestCheckConfig:
    def test_every_problem_is_listed_with_its_path(self, tmp_path: Path) -> None:
        bad = tmp_path / "watcher.yaml"
        bad.write_text(
            "s3:\n  bucket: b\n  bukcet: c\n"
            "apps:\n  web:\n    root: /srv/apps\n    keep_releases: five\n"
            "    timeouts:\n      hook: soon\n"
        )
        proc = run_watcher("check-config", "-c", str(bad))
        assert proc.returncode == 2
        assert proc.stdout == ""
        assert proc.stderr.splitlines() == [
            f"{bad}: s3.bukcet: unknown key (known: bucket, endpoint_url, prefix, region)",
            f'{bad}: apps.web.timeouts.hook: must be a duration of at least 1 s (like "30s", '
            '"5m"; "ms" is milliseconds), got "soon"',
            f'{bad}: apps.web.keep_releases: must be an integer >= 1, got "five"',
        ]

    def test_a_file_where_a_directory_must_be_fails_the_check(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The newcomer test: such a config passed with a warning (exit 0), and `watcher
        run` (or the `reload` that trusts the check) then failed at every start; and a
        root that is a file was also said not to exist."""
        (tmp_path / "a-file").write_text("")
        config = tmp_path / "watcher.yaml"
        config.write_text(
            f"s3: {{bucket: b}}\ndaemon: {{state_dir: {tmp_path}/a-file/state}}\n"
            f"apps:\n  web: {{root: {tmp_path}/a-file, user: nobody}}\n"
            f"  api: {{root: {tmp_path}/srv, user: nobody}}\n"
            f"  db: {{root: {tmp_path}/a-file/db, user: nobody}}\n"
        )
        assert daemon_cli.main(["check-config", "-c", str(config)]) == 2
        err = capsys.readouterr().err
        assert (
            f"{config}: daemon.state_dir: {tmp_path}/a-file (where {tmp_path}/a-file/state would "
            "be made) is not a directory\n"
        ) in err, err
        assert f"{config}: apps.web.root: {tmp_path}/a-file is not a directory\n" in err, err
        assert "apps.web.root" not in err.replace(f"apps.web.root: {tmp_path}/a-file is not", ""), (
            err
        )
        assert f"warning: apps.api.root: {tmp_path}/srv does not exist (yet)" in err, err
        assert (
            f"{config}: apps.db.root: {tmp_path}/a-file (where {tmp_path}/a-file/db would be "
            "made) is not a directory\n"
        ) in err, err
        assert "apps.db.root: " + f"{tmp_path}/a-file/db does not exist" not in err, err
        # Without the file in the way the same config passes (the rest are warnings).
        config.write_text(config.read_text().replace("a-file", "dir"))
        assert daemon_cli.main(["check-config", "-c", str(config)]) == 0, capsys.readouterr().err

    def test_malformed_yaml_names_line_and_column(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        bad = tmp_path / "watcher.yaml"
        bad.write_text("s3:\n  bucket: b\napps:\n  web: {root: /srv\n")
        assert daemon_cli.main(["check-config", "-c", str(bad)]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(
            rf"{re.escape(str(bad))}: line \d+, column \d+: invalid YAML: .+\n", err
        )

    @pytest.mark.parametrize("argv", [[], ["--debug"], ["-c", "/etc/watcher/other.yaml"]])
    def test_no_command_lists_the_commands(
        self, capsys: pytest.CaptureFixture[str], argv: list[str]
    ) -> None:
        assert daemon_cli.main(argv) == 2
        err = capsys.readouterr().err
        for command in ("run", "check-config", "web"):
            assert f"\n    {command} " in err, err
        assert err.endswith("watcher: error: name a COMMAND (above)\n")

    @pytest.mark.parametrize("argv", [["chek-config"], ["-c", "/x.yaml", "rn"]])
    def test_a_mistyped_command_is_named(
        self, capsys: pytest.CaptureFixture[str], argv: list[str]
    ) -> None:
        with pytest.raises(SystemExit) as exited:
            daemon_cli.main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"invalid choice: '{argv[-1]}'" in err and "name a COMMAND" not in err

    def test_missing_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        missing = tmp_path / "nope.yaml"
        assert daemon_cli.main(["check-config", "-c", str(missing)]) == 2
        assert capsys.readouterr().err == f"{missing}: no such file\n"

    def test_unreadable_file_without_traceback(self, tmp_path: Path) -> None:
        proc = run_watcher("check-config", "-c", str(tmp_path))  # a directory
        assert proc.returncode == 2
        assert proc.stderr == f"{tmp_path}: cannot read: Is a directory\n"

    def test_config_path_before_or_after_the_command_and_from_the_environment(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        good = tmp_path / "w.yaml"
        good.write_text(MINIMAL)
        assert daemon_cli.main(["-c", str(good), "check-config"]) == 0
        assert daemon_cli.main(["check-config", "--config", str(good)]) == 0
        monkeypatch.setenv("WATCHER_CONFIG", str(good))
        assert daemon_cli.main(["check-config"]) == 0
        out = capsys.readouterr().out
        assert out == f"{good}: OK (1 app: web)\n" * 3

    def test_default_path_is_etc(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        args = daemon_cli.build_parser().parse_args(["check-config"])
        assert args.config is None
        assert str(DEFAULT_PATH) == "/etc/watcher/watcher.yaml"
        monkeypatch.delenv("WATCHER_CONFIG", raising=False)
        monkeypatch.setattr("watcher.config.DEFAULT_PATH", Path("/nonexistent/watcher.yaml"))
        assert daemon_cli.main(["check-config"]) == 2
        assert capsys.readouterr().err == (
            "/nonexistent/watcher.yaml: no such file (the default; give a config with "
            "-c FILE or $WATCHER_CONFIG)\n"
        )

    def test_warnings_do_not_fail(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # No agent to ask (whatever listens on this machine): the default's warning.
        monkeypatch.setattr(daemon_cli, "agent_session_ttl_min", lambda _config: None)
        monkeypatch.setattr(daemon_cli, "token_problems", lambda _config: ([], []))  # idem
        (tmp_path / "hook").write_text("#!/bin/sh\n")  # not executable
        (tmp_path / "hooks.d").mkdir()  # a directory
        good = tmp_path / "w.yaml"
        good.write_text(
            f"s3: {{bucket: b}}\ndaemon: {{session_ttl: 5s}}\n"
            f"apps:\n  web:\n    root: {tmp_path}/missing\n"
            f"    user: no-such-user-xyz\n    group: no-such-group-xyz\n"
            f"    hooks:\n      validate: [{tmp_path}/hook]\n"
            f"      post_symlink: {tmp_path}/hooks.d\n"
        )
        assert daemon_cli.main(["check-config", "-c", str(good)]) == 0
        captured = capsys.readouterr()
        assert captured.out == f"{good}: OK (1 app: web)\n"
        assert captured.err.splitlines() == [
            f"{good}: warning: daemon.session_ttl: 5s is below Consul's default "
            'session_ttl_min (10s): Consul refuses such a session ("Invalid Session TTL") '
            "unless its servers set session_ttl_min lower",
            f"{good}: warning: apps.web.root: {tmp_path}/missing does not exist (yet)",
            f'{good}: warning: apps.web.user: no user "no-such-user-xyz" on this host',
            f'{good}: warning: apps.web.group: no group "no-such-group-xyz" on this host',
            f"{good}: warning: apps.web.hooks.post_symlink[0]: {tmp_path}/hooks.d is a "
            "directory, not an executable file",
            f"{good}: warning: apps.web.hooks.validate[0]: {tmp_path}/hook is not executable",
        ]

    def test_a_token_that_could_not_be_checked_is_said_so(self, tmp_path: Path) -> None:
        # (What Consul answers is tests/integration/test_deploy_acl.py's.)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # nothing listens there now
        config = parse_config(
            {
                "consul": {"address": f"127.0.0.1:{port}"},
                "s3": {"bucket": "b"},
                "apps": {"web": {"root": str(tmp_path)}},
            },
            env={},
        )
        # Not an error: the agent may answer at the daemon's start, or the next minute.
        errors, (said,) = daemon_cli.token_problems(config)
        assert errors == []
        assert said.startswith("consul: the token's permissions were not checked: cannot "), said
        assert daemon_cli.token_problems(replace(config, apps={})) == ([], [])  # CI's config

    @pytest.mark.parametrize(
        ("status", "body", "unknown"),
        [
            (403, "ACL not found", True),
            (403, "Forbidden", False),
            (403, "Permission denied", False),
        ],
    )
    def test_only_consuls_acl_not_found_makes_an_unknown_token(
        self, tmp_path: Path, status: int, body: str, unknown: bool
    ) -> None:
        """A token Consul does not know fails the check (a reload would take a token with
        which the host joins no deploy); any other refusal of /v1/acl/token/self (a proxy
        that keeps /v1/acl/ to itself answered 403 "Forbidden") is not Consul saying so:
        the review of the first version, which failed the check, and so `systemctl reload`,
        for a working token behind such a proxy."""
        import http.server
        import threading

        class FakeConsul(http.server.BaseHTTPRequestHandler):
            def answer(self, code: int, text: str) -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith("/v1/acl/token/self"):
                    self.answer(status, body)
                else:
                    self.answer(404, "")  # no `current` yet: read, not refused

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer(200, "false")  # the CAS that never applies

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeConsul)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            config = parse_config(
                {
                    "node": "host-1",
                    "consul": {"address": f"127.0.0.1:{server.server_port}", "token": "t"},
                    "s3": {"bucket": "b"},
                    "apps": {"web": {"root": str(tmp_path)}},
                },
                env={},
            )
            errors, warnings = daemon_cli.token_problems(config)
        finally:
            server.shutdown()
            server.server_close()
        if unknown:
            assert errors == [
                "consul.token: Consul does not know this token (Consul at "
                f"http://127.0.0.1:{server.server_port} refused acl token self: the ACL token "
                "is unknown to Consul (ACL not found)); give the SecretID of the host's "
                "watcher token (docs/acl.md)"
            ], errors
            assert warnings == []
        else:
            assert errors == []
            (said,) = warnings
            assert said.startswith("consul: the token's permissions were not checked: "), said

    def test_the_ttl_is_checked_against_the_agents_minimum_when_known(self) -> None:
        config = parse_config(
            {
                "s3": {"bucket": "b"},
                "daemon": {"session_ttl": "3s"},
                "apps": {"web": {"root": "/"}},
            },
            env={},
        )
        assert daemon_cli.config_warnings(config, agent_ttl_min=1.0, advice=False) == []
        assert daemon_cli.config_warnings(config, agent_ttl_min=5.0, advice=False) == [
            "daemon.session_ttl: 3s is below the session_ttl_min the Consul agent at "
            "http://127.0.0.1:8500 is set to (5s): Consul refuses such a session "
            '("Invalid Session TTL")'
        ]
        assert "Consul's default session_ttl_min (10s)" in daemon_cli.config_warnings(config)[0]

    def test_hooks_as_root_and_a_umask_that_leaves_files_writable_are_advised_against(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The artifact review: without `user` the release's own hooks, whatever CI
        packed, ran as root; `umask: "0000"` made the archive's 0777 files writable by all;
        check-config said OK to both. Advice of check-config, not the daemon's log."""

        def config(**app: Any) -> Config:
            return parse_config(
                {"s3": {"bucket": "b"}, "apps": {"web": {"root": "/", **app}}}, env={}
            )

        monkeypatch.setattr(daemon_cli.os, "geteuid", lambda: 0)
        said = daemon_cli.config_warnings(config(umask="0000"), agent_ttl_min=1.0)
        assert any(w.startswith("apps.web.user: not set, so hooks run as root") for w in said)
        assert any(w.startswith("apps.web.umask: 0000 leaves files") for w in said), said
        assert daemon_cli.config_warnings(config(umask="0000"), advice=False, agent_ttl_min=1) == []
        user = pwd.getpwuid(os.getuid()).pw_name
        assert daemon_cli.config_warnings(config(user=user, umask="0002"), agent_ttl_min=1) == []

    def test_a_root_hook_another_user_may_change_is_warned_of(self, tmp_path: Path) -> None:
        """The attacker review: a hook of mode 0777 run as root passed check-config: any
        user of the host could write it and be root at the next deploy."""
        if os.geteuid() != 0:
            pytest.fail("this test needs root (chown to another user)")
        hooks = tmp_path / "hooks"
        hooks.mkdir()
        hook = hooks / "reload"
        hook.write_text("#!/bin/sh\n")
        hook.chmod(0o755)

        def said(**app: Any) -> list[str]:
            config = parse_config(
                {
                    "s3": {"bucket": "b"},
                    "apps": {"web": {"root": "/", "hooks": {"post_symlink": str(hook)}, **app}},
                },
                env={},
            )
            return [w for w in daemon_cli.config_warnings(config, advice=False) if "hooks" in w]

        assert said() == []
        hook.chmod(0o777)
        where = "apps.web.hooks.post_symlink[0]"
        assert said() == [
            f"{where}: {hook} is mode 0777: writable by every user: the hook runs as root "
            "at every deploy, so who may change it is root on this host; make it and the "
            "directories above it root's and writable by root only"
        ]
        assert said(user="nobody") == []  # run as that user: no one gains root by it
        hook.chmod(0o755)
        nobody = pwd.getpwnam("nobody")
        os.chown(hooks, nobody.pw_uid, nobody.pw_gid)  # may swap the file for its own
        assert said()[0].startswith(f"{where}: {hooks} is owned by nobody"), said()
        os.chown(hooks, 0, 0)
        # A script given to an interpreter is what runs: checked as the program is.
        script = hooks / "reload.sh"
        script.write_text("nginx -s reload\n")
        script.chmod(0o666)
        config = parse_config(
            {
                "s3": {"bucket": "b"},
                "apps": {"web": {"root": "/", "hooks": {"validate": [["/bin/sh", str(script)]]}}},
            },
            env={},
        )
        warned = [w for w in daemon_cli.config_warnings(config, advice=False) if "hooks" in w]
        assert warned == [
            f"apps.web.hooks.validate[0]: {script} is mode 0666: writable by every user: the "
            "hook runs as root at every deploy, so who may change it is root on this host; "
            "make it and the directories above it root's and writable by root only"
        ], warned

    def test_places_the_watcher_cannot_write_and_a_hook_with_its_arguments_in_one_string(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """check-config said OK where `watcher run` then failed on a lock it could not
        create; and a hook written "/bin/true --quiet" was only "does not exist"."""
        (tmp_path / "a-file").write_text("")
        (tmp_path / "ro").mkdir()
        config = parse_config(
            {
                "s3": {"bucket": "b"},
                "daemon": {"state_dir": str(tmp_path / "a-file" / "state")},
                "apps": {
                    "web": {
                        "root": str(tmp_path / "ro" / "srv"),
                        "hooks": {"validate": "/bin/true --quiet"},
                    }
                },
            },
            env={},
        )
        real_access = os.access
        read_only = str(tmp_path / "ro")  # root may write anywhere: this user may not here
        monkeypatch.setattr(
            daemon_cli.os,
            "access",
            lambda path, mode: False if str(path) == read_only else real_access(path, mode),
        )
        said = daemon_cli.config_warnings(config, session_ttl=False)
        assert (
            f"daemon.state_dir: {tmp_path}/a-file (where {tmp_path}/a-file/state would be made) "
            "is not a directory"
        ) in said, said
        assert (
            f"apps.web.root: {tmp_path}/ro (where {tmp_path}/ro/srv would be made) is not "
            f"writable by this user (uid {os.geteuid()})"
        ) in " ".join(said), said
        assert (
            "apps.web.hooks.validate[0]: /bin/true --quiet does not exist (if '--quiet' is an "
            "argument, write the hook as a list: [/bin/true, ...])"
        ) in said, said

    def test_a_state_dir_other_users_may_write_is_warned_of(self, tmp_path: Path) -> None:
        """The watcher takes up the Consul session named in its state_dir again at a start,
        and `watcherctl status` shows the status kept there: another user who may write
        there could replace both. Warned of (check-config, the daemon's log), as the app
        directories' check would refuse it; a fine one says nothing."""
        state = tmp_path / "state"
        state.mkdir()
        state.chmod(0o777)
        config = parse_config(
            {
                "s3": {"bucket": "b"},
                "daemon": {"state_dir": str(state)},
                "apps": {"web": {"root": str(tmp_path / "srv")}},
            },
            env={},
        )
        said = [w for w in daemon_cli.config_warnings(config) if w.startswith("daemon.state_dir")]
        assert said == [
            f"daemon.state_dir: {state} is mode 0777: writable by every user: another user "
            "could replace the files the watcher keeps there (the Consul session it takes up "
            "again at a restart, the status `watcherctl status` shows); make it and the "
            "directories above it root's (or the daemon's user's) and writable by that user "
            "only"
        ], said
        state.chmod(0o755)
        assert not [
            w for w in daemon_cli.config_warnings(config) if w.startswith("daemon.state_dir")
        ]
        if os.geteuid() == 0:
            # Another user's, as with `User=`: said how to check it as that user.
            os.chown(state, 65534, 65534)
            [said_owned] = [
                w for w in daemon_cli.config_warnings(config) if w.startswith("daemon.state_dir")
            ]
            assert f"{state} is owned by " in said_owned, said_owned
            user = pwd.getpwuid(65534).pw_name
            assert said_owned.endswith(
                f"(if the watcher runs as {user}, `User=`, that is its own: run check-config "
                f"as that user, `sudo -u {user} watcher check-config`)"
            ), said_owned
            # A directory above it another user's: a problem whoever runs it, no such hint.
            os.chown(state, 0, 0)
            os.chown(tmp_path, 65534, 65534)
            try:
                [said_above] = [
                    w
                    for w in daemon_cli.config_warnings(config)
                    if w.startswith("daemon.state_dir")
                ]
            finally:
                os.chown(tmp_path, 0, 0)
            assert f"{tmp_path} is owned by " in said_above, said_above
            assert "sudo -u" not in said_above, said_above
        missing = replace(config, daemon=replace(config.daemon, state_dir=str(tmp_path / "x")))
        assert not [
            w for w in daemon_cli.config_warnings(missing) if w.startswith("daemon.state_dir")
        ]

    def test_a_token_other_users_may_read_is_warned_of(self, tmp_path: Path) -> None:
        """The newcomer test: a token_file of mode 0644 passed without a word, while the
        README says whoever reads it acts as this host."""
        token = tmp_path / "token"
        token.write_text("tok-1\n")
        base = {"s3": {"bucket": "b"}, "apps": {"web": {"root": str(tmp_path)}}}
        for mode, warned in ((0o644, True), (0o604, True), (0o640, False), (0o600, False)):
            token.chmod(mode)
            config = parse_config({**base, "consul": {"token_file": str(token)}}, env={})
            said = daemon_cli.config_warnings(config, session_ttl=False)
            line = (
                f"consul.token_file: {token} is mode {mode:04o}: every user of this host can "
                "read the token and act as this host with it (chmod 0600, or 0640 for a group)"
            )
            assert (line in said) is warned, (mode, said)
        token.chmod(0o644)  # named by the environment: said so
        config = parse_config({**base}, env={"CONSUL_HTTP_TOKEN_FILE": str(token)})
        said = daemon_cli.config_warnings(config, session_ttl=False)
        assert any(w.startswith(f"CONSUL_HTTP_TOKEN_FILE: {token} is mode 0644") for w in said)
        # A token written in the config file itself: the config file's mode counts.
        path = tmp_path / "watcher.yaml"
        path.write_text(yaml.safe_dump({**base, "consul": {"token": "tok-1"}}))
        path.chmod(0o644)
        said = daemon_cli.config_warnings(load_config(path, env={}), session_ttl=False)
        assert any(w.startswith(f"consul.token: {path} is mode 0644") for w in said), said
        # ... and not when the token comes from the environment.
        path.write_text(yaml.safe_dump(base))
        said = daemon_cli.config_warnings(
            load_config(path, env={"CONSUL_HTTP_TOKEN": "tok-2"}), session_ttl=False
        )
        assert not any("is mode 0" in w for w in said), said

    def test_a_parent_this_user_may_not_enter_is_a_warning_not_a_crash(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A non-root check-config of a state_dir under a root-only 0700 directory: the
        look up the tree raised PermissionError (exit 1, "unexpected")."""
        locked = tmp_path / "root-only"
        real_exists = Path.exists

        def exists(self: Path) -> bool:
            if self.is_relative_to(locked) and self != locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real_exists(self)

        monkeypatch.setattr(Path, "exists", exists)
        said = daemon_cli._not_writable(locked / "state")
        assert said.startswith(f"{locked}/state cannot be looked into by this user"), said

    def test_an_app_directory_another_user_owns_fails_the_check_and_the_start(
        self, tmp_path: Path
    ) -> None:
        """The attacker review: the app's user, owning the app directory (as an example of
        the tmpfiles file suggested), put a symlink where the daemon, as root, chowned a
        staged tree, and got a root directory. Refused before anything is written there."""
        if os.geteuid() != 0:
            pytest.fail("this test needs root (chown to another user)")
        nobody = pwd.getpwnam("nobody")
        app_dir = tmp_path / "srv" / "web"
        app_dir.mkdir(parents=True)
        config = tmp_path / "w.yaml"
        config.write_text(
            f"s3: {{bucket: b}}\ndaemon: {{state_dir: {tmp_path}/state}}\n"
            f"apps: {{web: {{root: {tmp_path}/srv, user: nobody}}}}\n"
        )
        assert daemon_cli.untrusted_app_dirs(load_config(str(config))) == []
        os.chown(app_dir, nobody.pw_uid, nobody.pw_gid)
        said = f"{config}: apps.web.root: {app_dir} is owned by nobody (uid {nobody.pw_uid}): "
        check = run_watcher("check-config", "-c", str(config))
        assert check.returncode == 2, check.stderr
        assert said in check.stderr and "chmod go-w" in check.stderr, check.stderr
        run = run_watcher("run", "-c", str(config))  # before Consul is asked anything
        assert run.returncode == 2 and said in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
        # And watcherctl's commands that write there, as root (a hold, rollback --local).
        ctl = subprocess.run(
            [str(WATCHER.parent / "watcherctl"), "hold", "web", "-c", str(config)],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
            check=False,
        )
        assert ctl.returncode == 2 and said in ctl.stderr, ctl.stderr
        assert list(app_dir.iterdir()) == [], "written under the app directory"
        nogroup = grp.getgrnam("nogroup").gr_gid
        os.chown(app_dir, 0, nogroup)
        app_dir.chmod(0o775)  # its group may write
        check = run_watcher("check-config", "-c", str(config))
        assert f"{app_dir} is mode 0775: writable by group nogroup (gid {nogroup})" in (
            check.stderr
        )

    def test_run_refuses_a_bad_config_before_anything_else(self, tmp_path: Path) -> None:
        bad = tmp_path / "w.yaml"
        bad.write_text("apps: {}\n")
        proc = run_watcher("run", "-c", str(bad))
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert f"{bad}: apps: must be a mapping with at least one app" in proc.stderr.splitlines()

    def test_unexpected_errors_are_one_line_unless_debug(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def explode(_path: Any) -> Any:
            raise RuntimeError("boom")

        monkeypatch.setattr(daemon_cli, "load_config", explode)
        assert daemon_cli.main(["check-config", "-c", str(tmp_path / "x")]) == 1
        err = capsys.readouterr().err
        assert err == (
            "watcher: error: unexpected RuntimeError: boom (run with --debug for the traceback)\n"
        )
        with pytest.raises(RuntimeError, match="boom"):
            daemon_cli.main(["--debug", "check-config", "-c", str(tmp_path / "x")])

    def test_log_format_option(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        good = tmp_path / "w.yaml"
        good.write_text(MINIMAL)
        from watcher.log import get_logger

        assert daemon_cli.main(["--log-format", "console", "check-config", "-c", str(good)]) == 0
        capsys.readouterr()
        get_logger(app="web").info("config_checked", ok=True)
        line = capsys.readouterr().out
        assert "config_checked" in line and "app=web" in line and not line.startswith("{")

        assert daemon_cli.main(["check-config", "--log-format", "json", "-c", str(good)]) == 0
        capsys.readouterr()
        get_logger(app="web").debug("hidden")
        get_logger(app="web").info("config_checked", ok=True)
        assert '"event": "config_checked"' in capsys.readouterr().out

        assert daemon_cli.main(["--debug", "check-config", "-c", str(good)]) == 0
        capsys.readouterr()
        get_logger().debug("shown_in_debug")
        assert "shown_in_debug" in capsys.readouterr().out


WATCHERCTL = Path(sys.executable).parent / "watcherctl"
DEEP = 5000  # far past Python's recursion limit: PyYAML's composer raised RecursionError


def _with(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "w.yaml"
    path.write_text(body)
    return path


# Configs `run` used to fail on after check-config said OK, or that crashed check-config:
# (config text, the one problem reported, starting with the key's path).
RUN_WOULD_FAIL = [
    pytest.param(
        's3: {bucket: b}\napps:\n  web: {root: "/srv/a\\0b"}\n',
        "apps.web.root: contains a NUL byte",
        id="nul-in-root",
    ),
    pytest.param(
        's3: {bucket: b}\nconsul: {ca_file: "/etc/ca\\0.pem"}\napps:\n  web: {root: /srv}\n',
        "consul.ca_file: contains a NUL byte",
        id="nul-in-ca-file",
    ),
    pytest.param(
        's3: {bucket: b}\nconsul: {address: "http://[::1:8500"}\napps:\n  web: {root: /srv}\n',
        'consul.address: must be an address like "127.0.0.1:8500" or "https://host:8501", '
        'got "http://[::1:8500"',
        id="unclosed-ipv6-bracket",
    ),
    pytest.param(
        "s3: {bucket: b}\nconsul: {address: 'consul:99999'}\napps:\n  web: {root: /srv}\n",
        'consul.address: must be an address like "127.0.0.1:8500" or "https://host:8501", '
        'got "consul:99999"',
        id="port-out-of-range",
    ),
    pytest.param(
        "s3: {bucket: b}\nconsul: {address: 'http://consul:85o0'}\napps:\n  web: {root: /srv}\n",
        'consul.address: must be an address like "127.0.0.1:8500" or "https://host:8501", '
        'got "http://consul:85o0"',
        id="port-not-a-number",
    ),
    pytest.param(
        "s3: {bucket: b, prefix: artifacts/../other}\napps:\n  web: {root: /srv}\n",
        's3.prefix: must be a key prefix without "." or ".." parts, got "artifacts/../other"',
        id="s3-prefix-dotdot",
    ),
    pytest.param(
        "s3: {bucket: b, endpoint_url: 'minio:9000'}\napps:\n  web: {root: /srv}\n",
        's3.endpoint_url: must be a URL like "https://host:9000", got "minio:9000"',
        id="s3-endpoint-without-scheme",
    ),
    pytest.param(
        "s3: {bucket: b}\ndaemon: {state_dir: var/lib/watcher}\napps:\n  web: {root: /srv}\n",
        'daemon.state_dir: must be an absolute directory path, got "var/lib/watcher"',
        id="relative-state-dir",
    ),
    pytest.param(
        "s3: {bucket: b}\napps:\n  web:\n    root: /srv\n    hooks:\n      validate: "
        + "[" * DEEP
        + "]" * DEEP
        + "\n",
        "apps.web.hooks.validate" + "[0]" * 28 + ": nested more than 32 levels deep (line 6)",
        id="deeply-nested-yaml",
    ),
    pytest.param(
        "s3: {bucket: b}\napps:\n  web:\n    root: /srv\n    hooks:\n"
        "      validate: [/bin/true, TMP/site.conf]\n",
        'apps.web.hooks.validate[1]: "TMP/site.conf" is not an executable file; if it is an '
        "argument of apps.web.hooks.validate[0], write the hook as one list: "
        "[[/bin/true, TMP/site.conf]]",
        id="hook-list-for-hook-with-argument",
    ),
]


class TestWhatRunWouldFailOn:
    """check-config refuses (exit 2, the key's path) what `run` would fail on, and `run` and
    `watcherctl status` say the same in one line, never a traceback."""

    @pytest.mark.parametrize(("body", "problem"), RUN_WOULD_FAIL)
    def test_check_config_run_and_status_agree(
        self, tmp_path: Path, body: str, problem: str
    ) -> None:
        (tmp_path / "site.conf").write_text("a file, not a program\n")
        body, problem = body.replace("TMP", str(tmp_path)), problem.replace("TMP", str(tmp_path))
        config = _with(tmp_path, body)
        for argv, prefix in (
            ([str(WATCHER), "check-config", "-c", str(config)], ""),
            ([str(WATCHER), "run", "-c", str(config)], ""),
            ([str(WATCHERCTL), "status", "-c", str(config)], "watcherctl: error: "),
        ):
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=clean_env(), timeout=60, check=False
            )
            assert proc.returncode == 2, (argv, proc.stderr)
            assert proc.stderr.splitlines() == [f"{prefix}{config}: {problem}"], argv
            assert proc.stdout == ""

    def test_hook_with_its_argument_in_one_list_is_fine(self, tmp_path: Path) -> None:
        ok = "s3: {bucket: b}\napps:\n  web:\n    root: /srv\n    hooks:\n"
        config = load_config(_with(tmp_path, ok + "      validate: [[/bin/true, /etc/x.conf]]\n"))
        assert config.apps["web"].hooks["validate"] == (("/bin/true", "/etc/x.conf"),)
        two = load_config(_with(tmp_path, ok + "      validate: [/bin/true, /bin/false]\n"))
        assert two.apps["web"].hooks["validate"] == (("/bin/true",), ("/bin/false",))

    def test_nesting_at_the_limit_is_only_a_type_error(self, tmp_path: Path) -> None:
        body = "s3: {bucket: b}\napps:\n  web: {root: /srv}\nnode: " + "[" * 31 + "]" * 31
        with pytest.raises(ConfigError) as caught:
            load_config(_with(tmp_path, body + "\n"))
        assert caught.value.problems == ["node: must be a node name, got a list"]

    def test_aliases_are_not_expanded_exponentially(self, tmp_path: Path) -> None:
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
        with pytest.raises(ConfigError) as caught:
            load_config(_with(tmp_path, "\n".join(lines) + "\n"))
        assert "a8: unknown key" in "\n".join(caught.value.problems)

    def test_garbage_never_escapes_as_anything_but_config_error(self, tmp_path: Path) -> None:
        """A small seeded fuzz of the loader (the fuzz suite goes further)."""
        import random

        rng = random.Random(10)
        alphabet = "ab: -[]{}&*!|>'\"\\0\n\t#%@`,?~.\x00\u00e9/"
        base = MINIMAL
        for _ in range(300):
            chars = list(base)
            for _ in range(rng.randint(1, 6)):
                chars.insert(rng.randrange(len(chars) + 1), rng.choice(alphabet))
            path = _with(tmp_path, "".join(chars))
            try:
                load_config(path)
            except ConfigError as exc:
                assert exc.problems and all(isinstance(p, str) for p in exc.problems)


def test_an_empty_config_path_is_an_error_not_the_default() -> None:
    """`-c "$CONFIG"` with the variable unset read /etc/watcher/watcher.yaml, which may be
    another fleet's."""
    from watcher.config import load_config

    with pytest.raises(ConfigError) as raised:
        load_config("", env={"WATCHER_CONFIG": "/nonexistent/other.yaml"})
    assert raised.value.problems == ["an empty path was given (an unset variable?)"]
    assert raised.value.source == "-c"
