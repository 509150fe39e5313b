"""Ids and names are checked at every door: the rules of DESIGN.md section 3, and the CLI."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from watcher import ctl, ids
from watcher.errors import PayloadError
from watcher.records import ARTIFACT_ID_RE, Keys, check_artifact_id

WATCHERCTL = Path(sys.executable).parent / "watcherctl"

BAD_IDS = [
    pytest.param("../x", id="dotdot"),
    pytest.param("a/b", id="slash"),
    pytest.param("x" * 300, id="300-chars"),
    pytest.param("", id="empty"),
    pytest.param("a\nb", id="newline"),
    pytest.param("master-15eb13af\n", id="trailing-newline"),
    pytest.param("ab\udcff\udcfe", id="non-utf8-argv"),
    pytest.param("-x", id="leading-dash"),
    pytest.param("a b", id="space"),
    pytest.param("a\x00b", id="nul"),
]


class TestRules:
    @pytest.mark.parametrize("value", BAD_IDS)
    def test_bad_artifact_ids(self, value: str) -> None:
        with pytest.raises(PayloadError, match="invalid artifact id") as caught:
            ids.check_artifact_id(value)
        message = str(caught.value)
        assert "1 to 128 characters" in message and "\n" not in message
        assert len(message) < 300

    @pytest.mark.parametrize("value", BAD_IDS)
    def test_bad_deploy_ids(self, value: str) -> None:
        with pytest.raises(PayloadError, match="invalid deploy id"):
            ids.check_deploy_id(value)

    def test_a_valid_deploy_id_seen_first_lets_no_variant_of_it_through(self) -> None:
        good = "20261126T143844Z-3f9a1c"
        assert ids.check_deploy_id(good) == good
        for value in [*(p.values[0] for p in BAD_IDS), good + "\n", good + "/x"]:
            with pytest.raises(PayloadError, match="invalid deploy id"):
                ids.check_deploy_id(value)
        assert ids.check_deploy_id(good) == good

    @pytest.mark.parametrize(
        "value",
        [
            "../x",
            "20261126T143844Z-a/b",
            "20261126T143844Z-x\n",
            "\u0662\u0660\u0662\u0666\u0661\u0661\u0662\u0666T143844Z-x",  # Arabic-Indic digits
        ],
    )
    def test_bad_release_names(self, value: str) -> None:
        with pytest.raises(PayloadError, match="invalid release name"):
            ids.check_release_name(value)

    @pytest.mark.parametrize(
        "value",
        ["20261399T000000Z-x", "20260229T000000Z-x", "20261126T250000Z-x", "00000101T000000Z-x"],
    )
    def test_a_typed_release_needs_a_time_that_exists(self, value: str) -> None:
        assert ids.check_release_name(value) == value  # the pattern alone, as records get
        with pytest.raises(PayloadError, match="is not a date and time"):
            ids.check_release_input(value)

    def test_good_names(self) -> None:
        assert ids.check_artifact_id("master-15eb13af") == "master-15eb13af"
        assert ids.check_artifact_id("a" * 128)
        assert ids.check_deploy_id("20261126T143844Z-3f9a1c")
        assert ids.check_release_name("20261126T143844Z-master-15eb13af")
        assert ids.check_release_input("20280229T235959Z-master-15eb13af")
        assert ids.check_commit("15eb13af" * 5) and ids.check_commit("ab" * 32)

    def test_free_text_takes_no_bidirectional_controls(self) -> None:
        # A reason shown on the page would read reordered after an override (U+202E).
        for char in ("\u202e", "\u2066", "\u202a"):
            with pytest.raises(PayloadError, match=f"U\\+{ord(char):04X}"):
                ids.check_free_text(f"wrong build {char}dliub")
        # Other format characters stay: an emoji's zero-width joiner, Arabic text.
        kept = "rollback \U0001f468\u200d\U0001f4bb \u0645\u0631\u062d\u0628\u0627\tok"
        assert ids.check_free_text(kept) == kept

    def test_the_release_input_pattern_says_which_times_exist(self) -> None:
        """The API's description of a rollback's release: a name it allows and the server
        refuses as "not a date and time" was schemathesis's failure (00000000T000000Z)."""
        pattern = re.compile(ids.RELEASE_INPUT_PATTERN)
        years = (0, 1, 4, 10, 100, 400, 1000, 1900, 1970, 2000, 2023, 2024, 2100, 2400, 9999)
        times = ("000000", "235959", "240000", "006000", "000060", "120000")
        for year, month, day, time in itertools.product(years, range(14), range(33), times):
            name = f"{year:04d}{month:02d}{day:02d}T{time}Z-main-1"
            try:
                taken = ids.check_release_input(name) == name
            except PayloadError:
                taken = False
            assert taken == bool(pattern.fullmatch(name)), name

    def test_the_free_text_pattern_says_what_the_check_takes(self) -> None:
        """The web API's description gives the rule as a pattern: a client generated from
        it (or schemathesis) must not send what the server refuses, nor be told a reason
        it may send is invalid."""
        pattern = re.compile(ids.FREE_TEXT_PATTERN)
        for code in (*range(0xD800), *range(0xE000, 0x110000)):  # surrogates: not text
            char = chr(code)
            try:
                taken = ids.check_free_text(char) == char
            except PayloadError:
                taken = False
            assert taken == bool(pattern.fullmatch(char)), hex(code)

    def test_commit(self) -> None:
        with pytest.raises(PayloadError, match="too short, need the full commit SHA"):
            ids.check_commit("15eb13a")
        for bad in ("HEAD", "g" * 40, "a" * 41, ""):
            with pytest.raises(PayloadError, match="invalid commit"):
                ids.check_commit(bad)

    def test_the_records_regex_no_longer_takes_a_trailing_newline(self) -> None:
        assert ARTIFACT_ID_RE.match("master-15eb13af\n") is None
        with pytest.raises(PayloadError):
            check_artifact_id("master-15eb13af\n")


class TestKeysRefuseBadIds:
    """No caller can build a KV key from a bad id (Consul would answer 400, or another key)."""

    @pytest.mark.parametrize("value", BAD_IDS)
    def test_artifact_key(self, value: str) -> None:
        with pytest.raises(PayloadError, match="invalid artifact id"):
            Keys("watcher", "web").artifact(value)

    @pytest.mark.parametrize(
        "builder", ["request", "abort_request", "coordinator", "decision", "outcome"]
    )
    def test_deploy_keys(self, builder: str) -> None:
        with pytest.raises(PayloadError, match="invalid deploy id"):
            getattr(Keys("watcher", "web"), builder)("../x")
        with pytest.raises(PayloadError, match="invalid deploy id"):
            Keys("watcher", "web").progress("a/b", "web-1")

    def test_good_keys_are_unchanged(self) -> None:
        keys = Keys("watcher", "web")
        assert keys.artifact("main-1") == "watcher/apps/web/artifacts/main-1"
        assert keys.decision("d-1") == "watcher/apps/web/decisions/d-1"
        assert keys.progress("d-1", "web-1") == "watcher/apps/web/progress/web-1/d-1"


def run_ctl(*argv: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """watcherctl with a config pointing at a Consul that is not there: any Consul call
    would exit 3, so exit 2 proves the id was refused first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "WATCHER_"))}
    env["CONSUL_HTTP_ADDR"] = "127.0.0.1:1"
    return subprocess.run(
        [os.fsencode(WATCHERCTL), *(os.fsencode(a) for a in argv)],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


class TestTheCliRefusesBadInputWithExit2:
    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["deploy", "web", "../x"], "invalid artifact id '../x'"),
            (["deploy", "web", "a/b"], "invalid artifact id 'a/b'"),
            (["deploy", "web", "x" * 300], "(300 characters)"),
            (["deploy", "web", ""], "invalid artifact id '' (empty)"),
            (["deploy", "web", "a\nb"], "invalid artifact id 'a\\nb'"),
            (["deploy", "web", b"ab\xff\xfe"], "invalid artifact id 'ab\\udcff\\udcfe'"),
            (["setup-release", "web", "a/b"], "invalid artifact id 'a/b'"),
            (["abort", "../x"], "invalid deploy id '../x'"),
            (["rollback", "web", "--to", "../x"], "invalid release name '../x'"),
            (["rollback", "web", "--local", "--to", "../x"], "invalid release name '../x'"),
            (
                ["rollback", "web", "--to", "20261399T256161Z-main-1"],
                "20261399T256161Z is not a date and time",
            ),
            (
                ["exec", "web", "--release", "20260230T000000Z-main-1", "--", "true"],
                "20260230T000000Z is not a date and time",
            ),
            (
                ["deploy", "web", "main-1", "--no-wait", "--timeout", "9"],
                "watcherctl deploy: error: --timeout is how long to wait for the outcome; "
                "with --no-wait nothing waits",
            ),
            (
                ["rollback", "web", "--timeout", "9", "--no-wait"],
                "watcherctl rollback: error: --timeout is how long",
            ),
            (["exec", "web", "--release", "../x", "--", "true"], "invalid release name"),
            (["exec", "--release", "a/b", "web", "--", "true"], "invalid release name"),
            (["publish", "web", ".", "--artifact-id", "../x"], "invalid artifact id '../x'"),
            (["publish", "web", ".", "--commit", "15eb13a"], "too short, need the full commit"),
            (["publish", "web", ".", "--commit", "HEAD"], "invalid commit 'HEAD'"),
            (
                ["publish", "web", ".", "--branch", "ma\x01in", "--commit", "15eb13af" * 5],
                "--branch: invalid branch 'ma\\x01in'",
            ),
            (["deploy", "web", "main-1", "--timeout", "0"], "above 0, got '0'"),
            (["deploy", "web", "main-1", "--timeout", "-5"], "above 0, got '-5'"),
            (["deploy", "web", "main-1", "--timeout", "nan"], "above 0, got 'nan'"),
            (["deploy", "web", "main-1", "--timeout", "inf"], "above 0, got 'inf'"),
            (["rollback", "web", "--timeout", "nan"], "above 0, got 'nan'"),
            (
                ["deploy", "web", "main-1", "--timeout", "soon"],
                'not a number of seconds nor a duration like "90s" or "5m": \'soon\'',
            ),
            (["deploy", "web", "main-1", "--timeout", "0s"], "above 0, got '0s'"),
            (["history", "web", "--limit", "0"], "must be 1 or more"),
            (["hold", "web", "--reason", "x" * 1001], "1001 characters, more than 1000"),
            (["abort", "20260101T000000Z-abc123", "--reason", "x" * 1001], "more than 1000"),
            (["setup-release", "web", "main-1", "--keep-days", "inf"], "at most 36525 days"),
            (["setup-release", "web", "main-1", "--keep-days", "nan"], "at most 36525 days"),
            # an extra word is the command's error, with its usage (not the top level's)
            (["history", "web", "extra"], "watcherctl history: error: unrecognized arguments"),
            (["status", "--lmit", "3"], "usage: watcherctl status"),
            # a command's own option before the command: said so, with the line to run
            (
                ["--fleet", "status", "-c", "F"],
                "watcherctl status: error: --fleet is an option of 'status': put it after "
                "the command (watcherctl status --fleet -c F)",
            ),
            (
                ["--json", "--limit", "5", "history", "web"],
                "--limit is an option of 'history': put it after the command "
                "(watcherctl --json history --limit 5 web)",
            ),
            (
                ["--dry-run", "-c", "F", "gc", "web", "host-1"],
                "--dry-run is an option of 'gc': put it after the command "
                "(watcherctl -c F gc --dry-run web host-1)",
            ),
            (
                ["--local", "--to=20260101T000000Z-x", "rollback", "web"],
                "--local, --to are options of 'rollback': put them after the command "
                "(watcherctl rollback --local --to=20260101T000000Z-x web)",
            ),
            # ... without its value: a placeholder, not the next option taken for it
            (
                ["--timeout", "--json", "deploy", "web", "main-1"],
                "--timeout is an option of 'deploy': put it after the command, with its value "
                "(watcherctl --json deploy --timeout TIMEOUT web main-1)",
            ),
            (
                ["--no-wait", "--timeout", "deploy", "web", "main-1"],
                "--no-wait, --timeout are options of 'deploy': put them after the command, "
                "with a value for --timeout (watcherctl deploy --no-wait --timeout TIMEOUT "
                "web main-1)",
            ),
            (["--bogus", "status"], "watcherctl status: error: unrecognized arguments: --bogus"),
        ],
    )
    def test_usage_errors(self, argv: list[str | bytes], message: str) -> None:
        result = run_ctl(*argv)
        err = result.stderr.decode()
        assert result.returncode == 2, err
        assert message in err, err
        assert "Traceback" not in err and result.stdout == b""

    @staticmethod
    def publish(tmp_path: Path, **buildkite: str) -> subprocess.CompletedProcess[str]:
        """`watcherctl publish web` of ``tmp_path`` with only ``buildkite``'s BUILDKITE_*
        variables (an S3 that is never reached: each run ends at its options)."""
        config = tmp_path / "w.yaml"
        config.write_text("s3: {bucket: b}\napps:\n  web: {root: /srv}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDKITE_")}
        return subprocess.run(
            [str(WATCHERCTL), "publish", "web", str(tmp_path), "-c", str(config)],
            capture_output=True,
            text=True,
            env={**env, **buildkite},
            timeout=60,
            check=False,
        )

    def test_publish_commit_from_the_environment_is_checked_too(self, tmp_path: Path) -> None:
        result = self.publish(tmp_path, BUILDKITE_BRANCH="main", BUILDKITE_COMMIT="15eb13a")
        assert result.returncode == 2, result.stderr
        assert "$BUILDKITE_COMMIT: invalid commit '15eb13a': too short" in result.stderr

    def test_publish_without_branch_or_commit_says_so_under_its_usage(self, tmp_path: Path) -> None:
        # What a newcomer gets when typing publish outside Buildkite: the options named, as
        # argparse's own errors come, with the usage that lists them.
        result = self.publish(tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert lines[0].startswith("usage: watcherctl publish "), result.stderr
        assert "[--branch BRANCH]" in result.stderr and "[--commit COMMIT]" in result.stderr
        assert lines[-2:] == [
            "watcherctl publish: error: --branch (or $BUILDKITE_BRANCH) is required without "
            "--artifact-id",
            "watcherctl publish: error: --commit (or $BUILDKITE_COMMIT) is required without "
            "--artifact-id",
        ], result.stderr


class TestGlobalOptions:
    """-c, --json and --debug before or after the command (`make demo` prints them before)."""

    @pytest.mark.parametrize(
        "argv",
        [
            ["-c", "F", "--json", "--debug", "status", "web"],
            ["status", "web", "-c", "F", "--json", "--debug"],
            ["--json", "status", "-c", "F", "web", "--debug"],
        ],
    )
    def test_anywhere(self, argv: list[str]) -> None:
        args = ctl.build_parser().parse_args(argv)
        assert (args.config, args.json, args.debug, args.app) == ("F", True, True, "web")

    def test_after_the_command_wins(self) -> None:
        args = ctl.build_parser().parse_args(["-c", "A", "status", "-c", "B"])
        assert args.config == "B"

    def test_defaults(self) -> None:
        args = ctl.build_parser().parse_args(["history", "web"])
        assert (args.config, args.json, args.debug) == (None, False, False)

    def test_exec_options_before_the_separator(self) -> None:
        args = ctl.build_parser().parse_args(["-c", "F", "exec", "web", "--", "ls", "-c", "x"])
        assert args.config == "F" and args.command[-3:] == ["ls", "-c", "x"]


class TestOptionsAmongPositionals:
    """A command's options go anywhere among its positionals (README: `gc APP [NODE ...]
    [--dry-run]`), not only after the last one: argparse alone leaves a NODE or DEPLOY
    that follows an option over as "unrecognized arguments"."""

    @pytest.mark.parametrize(
        ("argv", "expected"),
        [
            (["gc", "web", "--dry-run", "host-1"], {"nodes": ["host-1"], "dry_run": True}),
            (["gc", "web", "-c", "F", "host-9"], {"nodes": ["host-9"], "config": "F"}),
            (
                ["gc", "web", "host-1", "--dry-run", "host-2", "--json"],
                {"nodes": ["host-1", "host-2"], "dry_run": True, "json": True},
            ),
            (["gc", "--dry-run", "web"], {"app": "web", "nodes": [], "dry_run": True}),
            (["gc", "web", "--", "host-1"], {"nodes": ["host-1"], "dry_run": False}),
            (
                ["abort", "web", "--reason", "bad build", "d-1"],
                {"deploy": "web", "second": "d-1", "reason": "bad build"},
            ),
            (["abort", "web", "-c", "F", "d-1"], {"deploy": "web", "second": "d-1"}),
            (["abort", "--app", "web", "d-1"], {"deploy": "d-1", "second": None}),
            (["status", "--fleet", "web"], {"app": "web", "fleet": True}),
        ],
    )
    def test_options_between_positionals(self, argv: list[str], expected: dict[str, Any]) -> None:
        args = ctl.build_parser(argv[0]).parse_args(argv)
        assert {k: getattr(args, k) for k in expected} == expected

    def test_a_word_too_many_is_still_refused(self) -> None:
        result = run_ctl("gc", "web", "--dry-run", "host-1", "--bogus")
        assert result.returncode == 2
        assert b"unrecognized arguments: --bogus" in result.stderr
        result = run_ctl("history", "web", "--limit", "3", "extra")
        assert result.returncode == 2
        assert b"watcherctl history: error: unrecognized arguments: extra" in result.stderr

    def test_exec_keeps_its_command_as_given(self) -> None:
        args = ctl.build_parser().parse_args(["exec", "web", "--", "ls", "--json", "web"])
        assert args.app == "web" and args.command == ["ls", "--json", "web"]
        assert args.json is False


class TestArtifactOfRelease:
    @pytest.mark.parametrize(
        ("given", "artifact"),
        [
            ("20261205T055803Z-main-fb04dcb6", "main-fb04dcb6"),
            ("20261205T055803Z-20261205T055803Z-x", "20261205T055803Z-x"),
            ("main-fb04dcb6", None),
            ("20261399T000000Z-main-fb04dcb6", None),  # no such time: not a release name
            ("20261205T055803Z-", None),
        ],
    )
    def test_the_artifact_a_release_name_ends_with(self, given: str, artifact: str | None) -> None:
        assert ids.artifact_of_release(given) == artifact
