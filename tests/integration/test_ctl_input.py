"""What a careless user or a hostile caller types at watcherctl, on a real cluster: bad ids
touch nothing, a broken `inflight` is shown with its cure, a closed stdout ends quietly."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from tests.support.cluster import Agent, ClusterSpec, ConsulCluster
from tests.support.fleet import BIN
from watcher.barrier import DeployStore
from watcher.config import S3Settings
from watcher.consul_api import ConsulClient, KVEntry
from watcher.ctl import build_parser
from watcher.ctl import main as ctl_main
from watcher.records import ArtifactRecord, Keys, NodeProgress

CLUSTER = ClusterSpec(hosts=1)
ARTIFACT = "main-15eb13af"
COMMIT = "15eb13af" * 5


@dataclass
class Site:
    """One host's watcherctl config on its own KV prefix, with a member key held for it."""

    agent: Agent
    kv: ConsulClient
    keys: Keys
    prefix: str
    config: Path
    root: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "WATCHER_"))}
        env["CONSUL_HTTP_ADDR"] = self.agent.http_addr
        return env

    def argv(self, *argv: str | bytes) -> list[bytes]:
        args = [os.fsencode(a) for a in argv]
        return [os.fsencode(BIN / "watcherctl"), *args, b"-c", os.fsencode(self.config)]

    def ctl(
        self, *argv: str | bytes, stdout: int | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*argv),
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**self.env(), **(env or {})},
            timeout=120,
            check=False,
        )

    def tree(self) -> list[tuple[str, bytes | None]]:
        entries: list[KVEntry] = self.kv.kv_list(f"{self.prefix}/")
        return sorted((e.key, e.value) for e in entries)


@pytest.fixture
def site(cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path) -> Iterator[Site]:
    agent = cluster.hosts[0]
    prefix = f"in{time.monotonic_ns()}"
    config = tmp_path / "watcher.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": agent.name,
                "kv_prefix": prefix,
                "consul": {"address": agent.http_addr},
                "s3": {
                    "bucket": s3_settings.bucket,
                    "prefix": s3_settings.prefix,
                    "region": s3_settings.region,
                    "endpoint_url": s3_settings.endpoint_url,
                },
                "daemon": {"state_dir": str(tmp_path / "state"), "listen": None},
                "apps": {"web": {"root": str(tmp_path / "srv")}},
            }
        )
    )
    (tmp_path / "srv").mkdir()  # a host of the app (its watcher made the tree)
    kv = ConsulClient(agent.consul_settings())
    keys = Keys(prefix, "web")
    session = kv.session_create("watcher stand-in", 30.0)
    assert kv.kv_put(keys.member(agent.name), b"{}", acquire=session)
    try:
        yield Site(agent, kv, keys, prefix, config, tmp_path)
    finally:
        kv.session_destroy(session)
        kv.close()


def plant_artifact(site: Site, key: str, artifact_id: str = ARTIFACT) -> None:
    record = ArtifactRecord(
        id=artifact_id, url=f"s3://b/web/{artifact_id}.tar.gz", sha256="0" * 64, size=1
    )
    site.kv.kv_put(key, record.to_json())


class TestBadIdsTouchNothing:
    def test_every_door_refuses_with_exit_2_and_writes_nothing(self, site: Site) -> None:
        # A record planted under a key that no valid id names, and a valid one.
        plant_artifact(site, f"{site.keys.base}/artifacts/a/b", "a-b")
        plant_artifact(site, site.keys.artifact(ARTIFACT))
        src = site.root / "src"
        src.mkdir()
        (src / "index.html").write_text("hi\n")
        before = site.tree()
        doors: list[tuple[list[str | bytes], str]] = [
            (["deploy", "web", "a/b"], "invalid artifact id 'a/b'"),
            (["deploy", "web", "../x"], "invalid artifact id '../x'"),
            (["deploy", "web", "x" * 300], "invalid artifact id"),
            (["deploy", "web", ""], "invalid artifact id '' (empty)"),
            (["deploy", "web", f"{ARTIFACT}\n"], "invalid artifact id"),
            (["deploy", "web", b"main-\xff\xfe"], "invalid artifact id"),
            (["deploy", "web", ARTIFACT, "--timeout", "nan"], "--timeout"),
            (["setup-release", "web", "a/b"], "invalid artifact id"),
            (["abort", "../x"], "invalid deploy id '../x'"),
            (["abort", "a/b", "--app", "web"], "invalid deploy id 'a/b'"),
            (["rollback", "web", "--to", "../x"], "invalid release name '../x'"),
            (["exec", "web", "--release", "../x", "--", "true"], "invalid release name"),
            (["publish", "web", str(src), "--artifact-id", "a/b"], "invalid artifact id"),
            (
                ["publish", "web", str(src), "--branch", "main", "--commit", "15eb13a"],
                "too short, need the full commit SHA",
            ),
        ]
        for argv, message in doors:
            result = site.ctl(*argv)
            assert result.returncode == 2, (argv, result.stderr)
            assert message in result.stderr, (argv, result.stderr)
            assert "Traceback" not in result.stderr
            # the rule comes with the refusal
            assert "must be" in result.stderr or "need the full" in result.stderr
        assert site.tree() == before  # no deploy record, no inflight, no artifact record

    def test_a_record_planted_under_another_id_is_refused(self, site: Site) -> None:
        plant_artifact(site, site.keys.artifact("main-aaaaaaaa"), "main-bbbbbbbb")
        before = site.tree()
        for argv in (["deploy", "web", "main-aaaaaaaa"], ["setup-release", "web", "main-aaaaaaaa"]):
            result = site.ctl(*argv)
            assert result.returncode == 1, result.stderr
            assert "the record there is for artifact main-bbbbbbbb" in result.stderr
            assert "Traceback" not in result.stderr
        assert site.tree() == before

    def test_a_release_name_where_an_artifact_goes_names_its_artifact(self, site: Site) -> None:
        """`deploy web <release>` (pasted from `history` or `releases`) says which artifact
        the release is of, when that one is known; exit 2 as for any unknown artifact."""
        plant_artifact(site, site.keys.artifact(ARTIFACT))
        before = site.tree()
        release = f"20261205T055803Z-{ARTIFACT}"
        for command in ("deploy", "setup-release"):
            result = site.ctl(command, "web", release)
            assert result.returncode == 2, result.stderr
            assert f"unknown artifact {release} (no record at" in result.stderr, result.stderr
            assert f"that is a release name; its artifact is {ARTIFACT}" in result.stderr
            assert "Traceback" not in result.stderr
        deploy = site.ctl("deploy", "web", release)
        assert f"roll back with --to {release})" in deploy.stderr, deploy.stderr
        # Not a release name, or one whose artifact is unknown too: the plain message.
        for given in ("20261205T055803Z-main-00000000", "main-00000000", "20261399T000000Z-x"):
            result = site.ctl("deploy", "web", given)
            assert result.returncode == 2, result.stderr
            assert f"unknown artifact {given} (no record at" in result.stderr, result.stderr
            assert "release name" not in result.stderr, result.stderr
        assert site.tree() == before

    def test_a_release_no_deploy_names_is_bad_input(self, site: Site) -> None:
        """Exit 2, like an unknown artifact: nothing in KV names it (a typo, usually)."""
        before = site.tree()
        result = site.ctl("rollback", "web", "--to", "20200101T000000Z-nope")
        assert result.returncode == 2, result.stderr
        assert "unknown release 20200101T000000Z-nope" in result.stderr
        # The command it suggests reads the config this one was given (-c).
        assert f"`watcherctl history web -c {site.config}`" in result.stderr, result.stderr
        assert site.tree() == before

    def test_a_valid_id_still_deploys_as_far_as_the_protocol(self, site: Site) -> None:
        """The same config and member key start a deploy for a good id (so the refusals
        above are the ids', not the set-up's)."""
        plant_artifact(site, site.keys.artifact(ARTIFACT))
        result = site.ctl("deploy", "web", ARTIFACT, "--no-wait", "--json")
        assert result.returncode == 0, result.stderr
        deploy = json.loads(result.stdout)["deploy"]
        entry = site.kv.kv_get(site.keys.inflight)
        assert entry is not None and entry.value == deploy.encode()


def test_garbage_in_history_names_no_keys(site: Site) -> None:
    """`history` is written by hosts; ids in it that break the rule are skipped, not turned
    into keys. Starting a deploy does not touch it (layout 2: only the host that ends a
    deploy writes the history, and then without them)."""
    plant_artifact(site, site.keys.artifact(ARTIFACT))
    garbage = {"version": 1, "deploys": ["../../x", "a/b", "ok\n", 7]}
    site.kv.kv_put(f"{site.keys.base}/history", json.dumps(garbage).encode())
    listed = site.ctl("history", "web")
    assert listed.returncode == 0 and "no deploys of web" in listed.stdout, listed.stderr
    started = site.ctl("deploy", "web", ARTIFACT, "--no-wait", "--json")
    assert started.returncode == 0, started.stderr
    deploy = json.loads(started.stdout)["deploy"]
    entry = site.kv.kv_get(f"{site.keys.base}/history")
    assert entry is not None and json.loads(entry.value or b"") == garbage
    assert site.kv.kv_get(site.keys.request(deploy)) is not None


class TestBrokenInflight:
    """`inflight` that names no readable deploy blocks every deploy: status must show it and
    how to clear it, and the command it prints must clear it."""

    def _status(self, site: Site) -> tuple[dict[str, object], str, str]:
        """`status` (JSON and text: exit 3, no watcher runs here) and `status --fleet`,
        which exits 1 while ``inflight`` is broken (a script must not read "ok"), 0 once
        it is not."""
        runs = [site.ctl(*argv) for argv in (("status", "--json"), ("status",))]
        assert [r.returncode for r in runs] == [3, 3], [(r.stdout, r.stderr) for r in runs]
        deploy = json.loads(runs[0].stdout)["apps"]["web"]["deploy"]
        fleet = site.ctl("status", "--fleet")
        broken = isinstance(deploy, dict) and "problem" in deploy
        assert fleet.returncode == (1 if broken else 0), (fleet.stdout, fleet.stderr)
        return deploy, runs[1].stdout, fleet.stdout

    def _run_cure(self, site: Site, consul_bin: str, cure: str) -> None:
        argv = shlex.split(cure)
        if argv[0] == "watcherctl":
            result = site.ctl(*argv[1:])
        else:
            assert argv[0] == "consul"
            result = subprocess.run(
                [consul_bin, *argv[1:]],
                capture_output=True,
                text=True,
                env=site.env(),
                timeout=30,
                check=False,
            )
        assert result.returncode == 0, (cure, result.stdout, result.stderr)

    @pytest.mark.parametrize(
        ("value", "record", "problem"),
        [
            ("20260101T000000Z-abc123", b"{not json", "does not parse"),
            ("20260101T000001Z-def456", None, "has no record"),
            ("../../x/y", None, "holds no deploy id"),
            ("x $(touch /tmp/rw-pwned) `id`", None, "holds no deploy id"),
        ],
        ids=["unparseable-record", "missing-record", "garbage", "shell"],
    )
    def test_status_shows_it_and_the_cure_works(
        self, site: Site, consul_bin: str, value: str, record: bytes | None, problem: str
    ) -> None:
        plant_artifact(site, site.keys.artifact(ARTIFACT))
        if record is not None:
            site.kv.kv_put(site.keys.request(value), record)
        site.kv.kv_put(site.keys.inflight, value.encode())

        refused = site.ctl("deploy", "web", ARTIFACT, "--no-wait")
        assert refused.returncode == 4, refused.stderr
        if problem == "holds no deploy id":
            # Free text any token can write goes into no command to paste: the cure is
            # Consul's, on our key, and the value shows no backquote of its own.
            suggested = re.findall(r"`([^`]*)`", refused.stderr)
            assert suggested == ["inflight", f"consul kv delete {site.keys.inflight}"], refused
        else:
            assert f"deploy {value!r} is in flight" in refused.stderr, refused.stderr

        deploy, human, fleet = self._status(site)
        assert isinstance(deploy, dict) and problem in str(deploy["problem"]), deploy
        cure = str(deploy["clear"])
        # As printed for a person, a watcherctl cure reads the config given with -c.
        shown = f"{cure} -c {site.config}" if cure.startswith("watcherctl ") else cure
        for text in (human, fleet):
            assert "none in flight" not in text
            assert "BROKEN" in text and f"`{shown}`" in text and problem in text, text

        self._run_cure(site, consul_bin, cure)
        assert site.kv.kv_get(site.keys.inflight) is None
        deploy, human, fleet = self._status(site)
        assert deploy is None and "none in flight" in human
        assert "app web: no release deployed yet" in fleet, fleet  # was "fleet on -"


def suggested(text: str, command: str) -> list[str]:
    """The argv of the one `watcherctl COMMAND ...` that ``text`` tells the user to run,
    checked with the real argument parser."""
    found = re.findall(rf"(?:`|: )(watcherctl {command}\b[^`\n]*)", text)
    assert len(set(found)) == 1, (command, text)
    argv = shlex.split(found[0])[1:]
    build_parser(argv[0]).parse_args(argv)  # exits 2 on a command argparse rejects
    return argv


def start_deploy(site: Site) -> str:
    plant_artifact(site, site.keys.artifact(ARTIFACT))
    started = site.ctl("deploy", "web", ARTIFACT, "--no-wait", "--json")
    assert started.returncode == 0, started.stderr
    deploy: str = json.loads(started.stdout)["deploy"]
    return deploy


class TestAbortOfAnUnreadableRequest:
    """`abort` of a deploy whose request nobody can read clears `inflight` itself, and only
    the `inflight` it read: a deploy started meanwhile is not cleared, nor reported so."""

    def plant(self, site: Site) -> str:
        deploy = "20261204T070000Z-0badba"
        assert site.kv.kv_put(site.keys.request(deploy), b"{not json")
        assert site.kv.kv_put(site.keys.inflight, deploy.encode())
        return deploy

    def test_it_is_cleared(self, site: Site) -> None:
        deploy = self.plant(site)
        result = site.ctl("abort", "web", deploy)
        assert result.returncode == 0, result.stderr
        assert "unreadable request, inflight cleared" in result.stdout
        assert site.kv.kv_get(site.keys.inflight) is None

    def test_a_deploy_started_meanwhile_is_left_alone(
        self, site: Site, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        deploy = self.plant(site)
        newer = "20261204T070001Z-c0ffee"
        read = DeployStore.inflight

        def then_another_deploy_starts(
            store: DeployStore, *, consistent: bool = False
        ) -> tuple[str | None, int]:
            seen = read(store, consistent=consistent)
            # between abort's read and its delete, the real KV moves on
            assert site.kv.kv_put(site.keys.inflight, newer.encode())
            return seen

        monkeypatch.setattr(DeployStore, "inflight", then_another_deploy_starts)
        code = ctl_main(["abort", "web", deploy, "-c", str(site.config)])
        out, err = capsys.readouterr()
        assert code == 4, (out, err)
        assert "inflight cleared" not in out
        assert "no longer held it when it was to be cleared" in err, err
        assert "nothing was deleted" in err, err
        entry = site.kv.kv_get(site.keys.inflight)
        assert entry is not None and entry.value == newer.encode()


class TestWhatTheMessagesSuggest:
    """Every command a message tells the user to run is one watcherctl accepts and does."""

    def test_the_in_flight_refusal_names_an_abort_that_works(self, site: Site) -> None:
        deploy = start_deploy(site)
        refused = site.ctl("deploy", "web", ARTIFACT, "--no-wait")
        assert refused.returncode == 4, refused.stderr
        argv = suggested(refused.stderr, "abort")
        assert deploy in argv and "web" in argv
        # with the -c given: pasted on a host whose config is elsewhere, it still works
        assert argv[argv.index("-c") + 1] == str(site.config), argv
        aborted = site.ctl(*argv)
        assert aborted.returncode == 0, aborted.stderr
        assert site.kv.kv_get(site.keys.abort_request(deploy)) is not None

    def test_a_deploy_started_without_waiting_names_how_to_follow_and_abort_it(
        self, site: Site
    ) -> None:
        plant_artifact(site, site.keys.artifact(ARTIFACT))
        started = site.ctl("deploy", "web", ARTIFACT, "--no-wait")
        assert started.returncode == 0, started.stderr
        deploy = site.kv.kv_get(site.keys.inflight)
        assert deploy is not None and deploy.value
        assert started.stdout.startswith(f"deploy {deploy.value.decode()}: "), started.stdout
        status = suggested(started.stdout, "status")
        assert site.ctl(*status).returncode in (0, 1), status  # 1: the stand-in member
        aborted = site.ctl(*suggested(started.stdout, "abort"))
        assert aborted.returncode == 0, aborted.stderr
        assert site.kv.kv_get(site.keys.abort_request(deploy.value.decode())) is not None

    def test_abort_of_an_app_names_its_deploy_in_flight(self, site: Site) -> None:
        # `abort web`: "web" is a valid deploy id, but it is the app; say so, and what to run.
        none = site.ctl("abort", "web")
        assert none.returncode == 2, none.stderr
        assert "web is an app, not a deploy" in none.stderr
        assert "no deploy of web is in flight" in none.stderr
        # not "no deploy web": that reads as if the command looked for a deploy named so
        assert "no deploy web" not in none.stderr, none.stderr
        deploy = start_deploy(site)
        result = site.ctl("abort", "web")
        assert result.returncode == 2, result.stderr
        argv = suggested(result.stderr, "abort")
        assert argv[:3] == ["abort", "web", deploy], argv
        aborted = site.ctl(*argv)  # `abort APP DEPLOY`, like every command that takes an app
        assert aborted.returncode == 0, aborted.stderr
        assert site.kv.kv_get(site.keys.abort_request(deploy)) is not None

    def test_a_name_that_does_not_exist_is_bad_input(self, site: Site) -> None:
        for argv, says in (
            (["abort", "20991231T000000Z-abcdef"], "no deploy 20991231T000000Z-abcdef"),
            (["abort", "web", "20991231T000000Z-abcdef"], "no deploy 20991231T000000Z-abcdef"),
            (["deploy", "web", "main-00000000"], "unknown artifact main-00000000"),
            (["abort", "api", "20991231T000000Z-abcdef"], "no app 'api'"),
            (["abort", "web", "20991231T000000Z-abcdef", "--app", "api"], "two apps given"),
        ):
            result = site.ctl(*argv)
            assert result.returncode == 2, (argv, result.stderr)
            assert says in result.stderr, (argv, result.stderr)
        assert site.kv.kv_get(site.keys.inflight) is None  # nothing was started

    def test_a_wait_that_runs_out_is_still_running_not_failed(self, site: Site) -> None:
        plant_artifact(site, site.keys.artifact(ARTIFACT))
        result = site.ctl("deploy", "web", ARTIFACT, "--timeout", "1")
        assert result.returncode == 5, (result.stdout, result.stderr)
        entry = site.kv.kv_get(site.keys.inflight)
        assert entry is not None and entry.value
        deploy = entry.value.decode()
        assert f"deploy {deploy}: still running" in result.stdout
        # The commands to follow or abort it are a hint, on stderr (as after a Ctrl-C):
        # stdout is the summary a script reads.
        assert "the wait ended" in result.stderr and "the wait ended" not in result.stdout
        assert deploy in suggested(result.stderr, "abort")
        follow = site.ctl(*suggested(result.stderr, "status"))
        assert follow.returncode == 0 and deploy in follow.stdout, follow.stderr

        site.kv.kv_delete(site.keys.inflight)
        as_json = site.ctl("deploy", "web", ARTIFACT, "--timeout", "1", "--json")
        assert as_json.returncode == 5, as_json.stderr
        data = json.loads(as_json.stdout)
        assert data["result"] is None and data["deploy"] in as_json.stderr
        assert "still running" in as_json.stderr

    @pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
    def test_ctrl_c_while_waiting_says_the_deploy_goes_on(self, site: Site, as_json: bool) -> None:
        plant_artifact(site, site.keys.artifact(ARTIFACT))
        proc = interruptible(site, "deploy", "web", ARTIFACT, *(["--json"] if as_json else []))
        try:
            # It says what it started (stderr with --json, else stdout), then waits: the
            # interrupt comes once it said so.
            said = (proc.stderr if as_json else proc.stdout).readline()  # type: ignore[union-attr]
            assert ARTIFACT in said, said
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            out, err = (out, said + err) if as_json else (said + out, err)
        finally:
            proc.kill()
        entry = site.kv.kv_get(site.keys.inflight)
        assert entry is not None and entry.value
        deploy = entry.value.decode()
        assert proc.returncode == 130, (out, err)
        assert "Traceback" not in err
        assert f"deploy {deploy} goes on" in err, err
        if as_json:
            assert out == ""
            assert err.index(deploy) < err.index("interrupted")  # said before the wait
        follow = site.ctl(*suggested(err, "status"))
        assert follow.returncode == 0 and deploy in follow.stdout, follow.stderr
        abort = suggested(err, "abort")
        assert deploy in abort and "web" in abort
        if as_json:  # the abort waits up to 10 s for hosts: run it once
            aborted = site.ctl(*abort)
            assert aborted.returncode == 0, aborted.stderr
            assert site.kv.kv_get(site.keys.abort_request(deploy)) is not None

    def test_ctrl_c_after_the_commit_says_it_cannot_be_aborted(self, site: Site) -> None:
        plant_artifact(site, site.keys.artifact(ARTIFACT))
        proc = interruptible(site, "deploy", "web", ARTIFACT)
        try:
            said = proc.stdout.readline()  # type: ignore[union-attr]
            assert ARTIFACT in said, said
            entry = site.kv.kv_get(site.keys.inflight)
            assert entry is not None and entry.value
            deploy = entry.value.decode()
            record = DeployStore(site.kv, site.prefix, "web").deploy_record(deploy)
            assert record is not None
            # Every expected host (the one member) acks ready: the acks say commit.
            for node in record.expected:
                ack = NodeProgress(node=node, state="ready", deploy=deploy, digest=record.digest())
                assert site.kv.kv_put(site.keys.progress(deploy, node), ack.to_json())
            wait_for_line = time.monotonic() + 10
            line = ""
            while "ready" not in line and time.monotonic() < wait_for_line:
                line = proc.stdout.readline()  # type: ignore[union-attr]
            assert "ready" in line, line  # the wait has read the acks
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 130, err
        assert f"deploy {deploy} is committed (every host acked ready)" in err, err
        assert "can no longer be aborted" in err and "abort" not in suggested_words(err)
        assert suggested(err, "rollback") == ["rollback", "web", "-c", str(site.config)]


def test_a_kv_prefix_nobody_uses_is_not_shown_as_an_empty_fleet(site: Site) -> None:
    data = yaml.safe_load(site.config.read_text())
    data["kv_prefix"] = "watchr"
    typo = site.root / "typo.yaml"
    typo.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [str(BIN / "watcherctl"), "-c", str(typo), "status", "--fleet"],
        capture_output=True,
        text=True,
        env=site.env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result  # a check running it must not read "ok"
    assert "no host under watchr/apps/web/" in result.stdout, result.stdout
    assert "kv_prefix 'watchr' (is it the one in the hosts' config?)" in result.stdout


def interruptible(site: Site, *argv: str) -> subprocess.Popen[str]:
    """watcherctl started with pipes, as a terminal would start it for a Ctrl-C."""
    return subprocess.Popen(
        site.argv(*argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=site.env(),
        # A suite started in the background inherits SIGINT ignored: give the child the
        # disposition a terminal gives it, or the interrupt never arrives.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def suggested_words(text: str) -> list[str]:
    """The watcherctl commands ``text`` names, by their first word."""
    return [m.split()[1] for m in re.findall(r"`(watcherctl [^`]*)`", text)]


class TestUnderSudo:
    """sudo drops CONSUL_HTTP_TOKEN(_FILE): a command that writes to Consul warns that it
    acts with the config's token, not the operator's."""

    def test_a_write_warns_a_read_does_not(self, site: Site) -> None:
        plant_artifact(site, site.keys.artifact(ARTIFACT))
        sudo = {"SUDO_USER": "alice"}
        started = site.ctl("deploy", "web", ARTIFACT, "--no-wait", "--json", env=sudo)
        assert started.returncode == 0, started.stderr
        [warning] = started.stderr.splitlines()
        assert warning.startswith("watcherctl: warning: ") and "alice" in warning
        assert "sudo --preserve-env=CONSUL_HTTP_TOKEN,CONSUL_HTTP_TOKEN_FILE" in warning
        deploy = json.loads(started.stdout)["deploy"]
        request = site.kv.kv_get(site.keys.request(deploy))
        assert request is not None and b'"alice@' in (request.value or b"")

        status = site.ctl("status", "web", "--fleet", env=sudo)
        assert status.returncode == 0 and status.stderr == "", status.stderr
        site.kv.kv_delete(site.keys.inflight)
        token = {**sudo, "CONSUL_HTTP_TOKEN": str(uuid.uuid4())}  # no ACLs here
        again = site.ctl("deploy", "web", ARTIFACT, "--no-wait", env=token)
        assert again.returncode == 0 and again.stderr == "", again.stderr


class TestClosedStdout:
    """`watcherctl ... | head -1`: when the reader goes away, every command ends quietly."""

    def _closed_pipe(self) -> int:
        read_end, write_end = os.pipe()
        os.close(read_end)
        return write_end

    def _assert_quiet(
        self, site: Site, *argv: str, codes: tuple[int, ...] = (141,)
    ) -> subprocess.CompletedProcess[str]:
        fd = self._closed_pipe()
        try:
            result = site.ctl(*argv, stdout=fd)
        finally:
            os.close(fd)
        for noise in ("Traceback", "BrokenPipe", "Exception ignored"):
            assert noise not in result.stderr, (argv, result.stderr)
        assert result.returncode in codes, (argv, result.returncode, result.stderr)
        return result

    def test_every_command(self, site: Site) -> None:
        src = site.root / "src"
        src.mkdir()
        (src / "index.html").write_text("hi\n")
        self._assert_quiet(site, "publish", "web", str(src), "--branch", "main", "--commit", COMMIT)
        assert site.kv.kv_get(site.keys.artifact(ARTIFACT)) is not None  # it did its work
        self._assert_quiet(site, "setup-release", "web", ARTIFACT, "--no-hooks")
        self._assert_quiet(site, "deploy", "web", ARTIFACT, "--no-wait")
        entry = site.kv.kv_get(site.keys.inflight)
        assert entry is not None and entry.value
        deploy = entry.value.decode()
        for argv in (
            ["status"],
            ["status", "--fleet"],
            ["status", "--json"],
            ["history", "web"],
            ["builds", "web"],
            ["releases", "web"],
            ["hold", "web"],
            ["release-hold", "web"],
            ["prune", "web", "--dry-run"],
            ["abort", deploy],
        ):
            self._assert_quiet(site, *argv)
        # argparse itself drops a help text it cannot write: 0 is as quiet as 141
        self._assert_quiet(site, "--help", codes=(0, 141))
        for command in [
            "status",
            "deploy",
            "rollback",
            "history",
            "builds",
            "abort",
            "releases",
            "hold",
            "release-hold",
            "setup-release",
            "exec",
            "prune",
            "publish",
        ]:
            self._assert_quiet(site, command, "--help", codes=(0, 141))

    def test_a_real_pipe_into_head(self, site: Site) -> None:
        cmd = (
            f"{shlex.quote(str(BIN / 'watcherctl'))} --help -c {shlex.quote(str(site.config))}"
            " | head -c 1 >/dev/null; echo ${PIPESTATUS[0]}"
        )
        for _ in range(3):
            result = subprocess.run(
                ["bash", "-c", cmd], capture_output=True, text=True, env=site.env(), timeout=60
            )
            assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
            assert result.stdout.strip() in ("0", "141"), result


class TestAnUnhealthyWatcher:
    def test_status_names_why_and_only_the_app_asked_about_counts(self, site: Site) -> None:
        """A running watcher whose /health fails: `status` says why on its first line and
        exits 1. `status APP` counts the daemon's problems (session, loop) and that app's
        own (alarm, undecided), not another app's alarm."""
        data = yaml.safe_load(site.config.read_text())
        data["apps"]["api"] = {"root": str(site.root / "srv-api")}
        site.config.write_text(yaml.safe_dump(data))
        state = site.root / "state"
        state.mkdir(exist_ok=True)

        def daemon_says(problems: list[str]) -> None:
            status = {
                "version": 1,
                "pid": os.getpid(),  # alive: this test's own process stands in for it
                "node": site.agent.name,
                "updated_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "session": None if problems and problems[0].startswith("no Consul") else "s",
                "healthy": not problems,
                "problems": problems,
                "apps": {},
            }
            (state / "status.json").write_text(json.dumps(status))

        daemon_says(["api: alarm: deploy d1 is contested"])
        web = site.ctl("status", "web")
        assert web.returncode == 0, (web.stdout, web.stderr)
        assert "UNHEALTHY" not in web.stdout and "contested" not in web.stdout
        api = site.ctl("status", "api")
        assert api.returncode == 1, (api.stdout, api.stderr)
        assert "but UNHEALTHY: api: alarm: deploy d1 is contested" in api.stdout.splitlines()[0]
        daemon_says(["no Consul session: Invalid Session TTL '3000000000'"])
        web = site.ctl("status", "web")
        assert web.returncode == 1 and "UNHEALTHY: no Consul session" in web.stdout

    def test_a_config_without_apps_is_told_to_name_one(self, site: Site) -> None:
        """A CI machine's config (no `apps:`): `status` and `abort` without an app have
        nothing to look at, and say so (exit 2) instead of printing nothing with 0."""
        data = yaml.safe_load(site.config.read_text())
        del data["apps"]
        site.config.write_text(yaml.safe_dump(data))
        for argv in (("status",), ("status", "--fleet"), ("abort", "20260101T000000Z-abc123")):
            result = site.ctl(*argv)
            assert result.returncode == 2, (argv, result.stdout, result.stderr)
            assert "lists no apps" in result.stderr and not result.stdout, (argv, result)
