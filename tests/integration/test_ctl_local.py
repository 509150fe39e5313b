"""`watcherctl` local commands (releases, rollback --local, hold, setup-release, exec, prune).

The real `watcherctl` runs as a subprocess against app directories in tmp_path; releases are
staged with the release engine from real tarballs. setup-release and the hold-vs-undecided
rule use the real Consul cluster and S3 server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.fleet import make_tarball
from tests.support.locks import hold_instance_lock
from tests.support.s3server import s3_client
from watcher.agent import CONVERGE_JOURNAL_NAME, JOURNAL_NAME
from watcher.config import AppConfig, ConsulSettings, S3Settings, parse_config
from watcher.consul_api import ConsulClient
from watcher.fsutil import INSTANCE_LOCK
from watcher.records import (
    ArtifactRecord,
    CurrentRecord,
    Decision,
    Keys,
    ReleaseRef,
    iso,
    parse_iso,
    utcnow,
)
from watcher.releases import LinuxProcReader, ReleaseEngine, scan_release_usage

CLUSTER = ClusterSpec(hosts=1)
WATCHERCTL = Path(sys.executable).parent / "watcherctl"
DEAD_CONSUL = ConsulSettings(address="127.0.0.1:9")  # nothing listens: refused at once
UNUSED_S3 = S3Settings(bucket="unused", prefix="artifacts")


@cache
def proc_prefix() -> tuple[str, ...]:
    """How to run a command whose prune must read every process of /proc.

    Where some process's /proc entries are unreadable (a sandbox's init), prune is blocked by
    design; the command then runs in its own PID namespace, where every process is its own.
    """
    _, blocker = scan_release_usage(LinuxProcReader(), "/nonexistent/releases")
    if blocker is None:
        return ()
    unshare = shutil.which("unshare")
    assert unshare, f"/proc is not fully readable ({blocker}) and unshare(1) is missing"
    return (unshare, "--pid", "--fork", "--mount-proc")


def release_of(i: int) -> str:
    return f"20260101T0000{i:02d}Z-build-{i}"


class Host:
    """One host's app `web` under tmp_path, its config file, and a `watcherctl` runner."""

    def __init__(
        self,
        root: Path,
        consul: ConsulSettings = DEAD_CONSUL,
        s3: S3Settings = UNUSED_S3,
        keep: int = 2,
    ) -> None:
        self.root = root
        data = {
            "kv_prefix": "watcher",
            "consul": {
                "address": f"{consul.scheme}://{consul.address}",
                **({"token": consul.token} if consul.token else {}),
                **({"ca_file": consul.ca_file} if consul.ca_file else {}),
            },
            "s3": {
                k: v
                for k, v in {
                    "bucket": s3.bucket,
                    "prefix": s3.prefix,
                    "region": s3.region,
                    "endpoint_url": s3.endpoint_url,
                }.items()
                if v
            },
            "daemon": {"state_dir": str(root / "state")},
            "apps": {"web": {"root": str(root / "srv"), "keep_releases": keep}},
        }
        self.config_path = root / "watcher.yaml"
        self.config_path.write_text(yaml.safe_dump(data))
        self.app: AppConfig = parse_config(data, env={}).app("web")
        self.engine = ReleaseEngine(self.app)
        self.engine.layout.ensure()
        (root / "tarballs").mkdir(exist_ok=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in (
            "CONSUL_HTTP_ADDR",
            "CONSUL_HTTP_TOKEN",
            "CONSUL_HTTP_TOKEN_FILE",
            "CONSUL_CACERT",
            "WATCHER_CONFIG",
        ):
            env.pop(var, None)
        return env

    def argv(self, *args: str, own_proc: bool = False) -> list[str]:
        prefix = proc_prefix() if own_proc else ()
        # the config option goes right after the command name: after APP, exec's -- ends it
        return [*prefix, str(WATCHERCTL), args[0], "-c", str(self.config_path), *args[1:]]

    def ctl(self, *args: str, own_proc: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args, own_proc=own_proc),
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=60,
            check=False,
        )

    def ctl_json(self, *args: str, own_proc: bool = False, code: int = 0) -> Any:
        result = self.ctl(*args, "--json", own_proc=own_proc)
        assert result.returncode == code, result
        return json.loads(result.stdout)

    def stage(
        self,
        i: int,
        *,
        post_release: bool = True,
        files: dict[str, str | bytes] | None = None,
        executable: tuple[str, ...] = ("bin/hello",),
        branch: str = "",
        commit: str = "",
    ) -> str:
        """Stage release ``i`` from a real tarball (as a deploy would, post_release done)."""
        release = release_of(i)
        data = make_tarball(
            files or {"VERSION": f"v{i}\n", "bin/hello": "#!/bin/sh\necho hello\n"},
            executable=executable,
        )
        path = self.root / "tarballs" / f"build-{i}.tar.gz"
        path.write_bytes(data)
        record = ArtifactRecord(
            id=f"build-{i}",
            url=f"s3://unused/artifacts/web/build-{i}.tar.gz",
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            branch=branch,
            commit=commit,
        )
        with self.engine.lock(owner="test"):
            self.engine.stage_from_file(path, record, release, f"deploy-{i}")
        if post_release:
            self.engine.mark_post_release_done(release)
        return release

    def flip(self, release: str) -> None:
        with self.engine.lock(owner="test"):
            self.engine.flip(release)

    def write_journal(self, deploy: str, release: str, phases: list[str], **more: Any) -> None:
        path = self.engine.layout.state_dir / JOURNAL_NAME
        # as the watcher writes it: the request whole, which names the release
        data = {"deploy": deploy, "request": {"release": release}, "phases": phases}
        path.write_text(json.dumps({**data, **more}))

    def names(self) -> list[str]:
        return self.engine.release_names()


@pytest.fixture
def host(tmp_path: Path) -> Host:
    """Releases 1..5 staged (post_release done); current 4, previous 3; 5 staged, not live."""
    h = Host(tmp_path)
    for i in range(1, 6):
        h.stage(i)
    for i in range(1, 5):
        h.flip(release_of(i))
    return h


class TestReleases:
    def test_table_and_json_show_every_marker(self, host: Host) -> None:
        r = [release_of(i) for i in range(6)]
        with host.engine.lock(owner="test"):
            host.engine.set_backup(r[2])
            host.engine.pin(r[1], utcnow() + timedelta(days=2))
        (host.engine.layout.releases_dir / r[0]).mkdir()  # half-staged: no release.json
        host.write_journal("20260101T000000Z-abc123", r[5], ["staged"])

        rows = {row["release"]: row for row in host.ctl_json("releases", "web")}
        assert rows[r[4]]["markers"] == ["current"]
        assert rows[r[3]]["markers"] == ["previous"]
        assert rows[r[2]]["markers"] == ["backup"]
        assert rows[r[1]]["markers"][0].startswith("pinned until ")
        assert rows[r[0]]["markers"] == ["incomplete"] and rows[r[0]]["complete"] is False
        assert rows[r[5]]["markers"] == ["in-flight"] and rows[r[5]]["in_flight"] is True
        assert rows[r[4]]["artifact"] == "build-4" and rows[r[4]]["size_bytes"] > 0
        assert rows[r[4]]["staged_at"]

        text = host.ctl("releases", "web")
        assert text.returncode == 0, text
        lines = text.stdout.splitlines()
        assert lines[0].split() == ["RELEASE", "ARTIFACT", "STAGED", "AT", "MARKERS", "SIZE"]
        line4 = next(line for line in lines if line.startswith(r[4]))
        assert "build-4" in line4 and "current" in line4 and re.search(r"\d+ B\b", line4)
        assert "incomplete" in next(line for line in lines if line.startswith(r[0]))

    def test_unknown_app_names_the_configured_apps(self, host: Host) -> None:
        for args in (("releases", "nope"), ("prune", "nope"), ("hold", "nope")):
            result = host.ctl(*args)
            assert result.returncode == 2, result
            assert "nope" in result.stderr and "configured: web" in result.stderr


class TestRollbackLocal:
    def test_flips_to_previous_and_holds(self, host: Host) -> None:
        result = host.ctl("rollback", "web", "--local")
        assert result.returncode == 0, result
        assert host.engine.current_release() == release_of(3)
        listing = host.ctl("releases", "web").stdout
        assert f"held on this host: local rollback to {release_of(3)}" in listing
        hold = host.engine.held()
        assert hold is not None and hold.reason == f"local rollback to {release_of(3)}"
        assert hold.by  # who, once: `status` shows "<reason> (by <who>)"
        assert "release-hold web" in result.stdout and release_of(4) in result.stdout

        # to an older one, explicitly; JSON says what happened
        data = host.ctl_json("rollback", "web", "--local", "--to", release_of(1))
        assert (data["from"], data["to"], data["flipped"]) == (release_of(3), release_of(1), True)
        assert host.engine.current_release() == release_of(1)

    def test_a_release_whose_post_release_never_ran_gets_it_before_the_flip(
        self, host: Host, tmp_path: Path
    ) -> None:
        """An aborted deploy's staging never ran its post_release hook here: `rollback
        --local --to` it flipped at once, to a tree never prepared (and the marker that
        said so was gone once it was live). Now the hook runs first; if it fails, nothing
        changes: no flip, no hold."""
        ran, fail = tmp_path / "ran.log", tmp_path / "fail"
        hook = (
            f'#!/bin/sh\necho "$WATCHER_KIND $(basename "$WATCHER_RELEASE_DIR")" >> "{ran}"\n'
            f'[ ! -e "{fail}" ]\n'
        )
        files: dict[str, str | bytes] = {"VERSION": "v6\n", ".watcher/hooks/post_release": hook}
        executable = (".watcher/hooks/post_release",)
        target = host.stage(6, post_release=False, files=files, executable=executable)
        fail.touch()
        refused = host.ctl("rollback", "web", "--local", "--to", target)
        assert refused.returncode == 1, refused
        assert "its post_release hook had never run on this host, and it failed now" in (
            refused.stderr
        ), refused.stderr
        assert "nothing changed (no flip, no hold)" in refused.stderr
        assert host.engine.current_release() == release_of(4) and host.engine.held() is None
        fail.unlink()
        data = host.ctl_json("rollback", "web", "--local", "--to", target)
        assert data["post_release"] == "ran before the flip (it had never run on this host)"
        assert host.engine.current_release() == target and host.engine.post_release_done(target)
        assert ran.read_text().splitlines() == [f"rollback-local {target}"] * 2
        # Back and forth again: it ran once, it does not run again.
        host.ctl_json("rollback", "web", "--local", "--to", release_of(4))
        assert host.ctl_json("rollback", "web", "--local", "--to", target)["post_release"] == (
            "done before"
        )
        assert len(ran.read_text().splitlines()) == 2

    def test_the_hooks_are_told_the_build_the_release_was_made_from(
        self, host: Host, tmp_path: Path
    ) -> None:
        """The docs review: WATCHER_BRANCH and WATCHER_COMMIT were empty here; release.json
        keeps them from the staging. It is in the tree the app's user owns: a value no
        environment can carry (a NUL) is left out, not a failed hook start."""
        told = tmp_path / "told"
        hook = f'#!/bin/sh\necho "$WATCHER_ARTIFACT|$WATCHER_BRANCH|$WATCHER_COMMIT" >> "{told}"\n'
        files: dict[str, str | bytes] = {"VERSION": "v6\n", ".watcher/hooks/post_symlink": hook}
        target = host.stage(
            6,
            files=files,
            executable=(".watcher/hooks/post_symlink",),
            branch="main",
            commit="c0ffee" * 6 + "0000",
        )
        assert host.ctl("rollback", "web", "--local", "--to", target).returncode == 0
        assert told.read_text() == f"build-6|main|{'c0ffee' * 6}0000\n"
        meta = host.engine.layout.release_dir(target) / ".watcher" / "release.json"
        data = json.loads(meta.read_text())
        for branch, commit in (
            ("main\u0000x", ["not", "text"]),
            ("\ud800", "x" * 200_000),  # no UTF-8, over what an environment takes
            ("m" * 501, "c0ffee"),  # over a record's branch, a short commit
        ):
            meta.write_text(json.dumps({**data, "branch": branch, "commit": commit}))
            assert host.ctl("rollback", "web", "--local", "--to", release_of(4)).returncode == 0
            done = host.ctl("rollback", "web", "--local", "--to", target)
            assert done.returncode == 0, done.stderr
            assert told.read_text().splitlines()[-1] == "build-6||", branch

    def test_not_while_this_host_prepares_a_deploy(self, host: Host, tmp_path: Path) -> None:
        """The hook runs under the app's lock, for up to the hook timeout; the deploy this
        host is staging waits for that lock, gives up after the lock timeout and fails
        everywhere. So refused, before anything runs."""
        ran = tmp_path / "ran.log"
        hook = f'#!/bin/sh\necho ran >> "{ran}"\n'
        files: dict[str, str | bytes] = {"VERSION": "v6\n", ".watcher/hooks/post_release": hook}
        target = host.stage(
            6, post_release=False, files=files, executable=(".watcher/hooks/post_release",)
        )
        host.write_journal("20260101T000000Z-dddddd", release_of(5), ["prefetched"])
        watcher = hold_instance_lock(host.engine.layout.state_dir / INSTANCE_LOCK)
        try:
            refused = host.ctl("rollback", "web", "--local", "--to", target)
            assert refused.returncode == 4, refused
            assert "is preparing deploy 20260101T000000Z-dddddd" in refused.stderr, refused.stderr
            assert not ran.exists()
            assert host.engine.current_release() == release_of(4) and host.engine.held() is None
            # A release whose post_release ran here is no lock-holding work: allowed.
            data = host.ctl_json("rollback", "web", "--local", "--to", release_of(3))
            assert data["to"] == release_of(3) and data["flipped"], data
        finally:
            watcher.kill()
            watcher.wait()
        # The watcher stopped (or crashed) while it prepared that deploy: its journal says
        # "preparing" until it starts again, and no deploy is being staged meanwhile. It
        # was refused, naming a deploy long ended, just when an operator needs --local.
        data = host.ctl_json("rollback", "web", "--local", "--to", target)
        assert data["to"] == target and data["flipped"], data
        assert ran.read_text() == "ran\n"

    def test_on_a_held_host_the_operators_reason_is_kept(self, host: Host) -> None:
        """A local rollback on a host already held used to replace the hold's reason with
        its own: `release-hold` then named only the rollback, and why the host was held
        was lost."""
        assert host.ctl("hold", "web", "--reason", "testing hold").returncode == 0
        first = host.engine.held()
        assert first is not None
        data = host.ctl_json("rollback", "web", "--local")
        assert data["flipped"] is True and host.engine.current_release() == release_of(3)
        expected = f"testing hold (by {first.by}); then local rollback to {release_of(3)}"
        assert data["hold"]["reason"] == expected
        assert data["previous_hold"]["reason"] == "testing hold"
        hold = host.engine.held()
        assert hold is not None and hold.reason == expected
        released = host.ctl("release-hold", "web")
        assert released.returncode == 0, released
        assert f"released ({expected}, by " in released.stdout, released.stdout

    def test_nothing_to_roll_back_to_says_so(self, tmp_path: Path) -> None:
        """The newcomer pass: on a host with no release but the live one (or none), it
        said "name one with --to (see `watcherctl releases web`)", a list with nothing in
        it to name."""
        h = Host(tmp_path)
        result = h.ctl("rollback", "web", "--local")
        assert result.returncode == 2, result
        assert "no release to roll back to on this host (none staged yet)" in result.stderr
        h.stage(1)
        h.flip(release_of(1))
        result = h.ctl("rollback", "web", "--local")
        assert result.returncode == 2, result
        assert f"(only {release_of(1)}, the live one)" in result.stderr, result.stderr
        assert "--to" not in result.stderr and h.engine.held() is None

    def test_missing_or_incomplete_target_is_refused(self, host: Host) -> None:
        missing = "20991231T235959Z-build-99"
        result = host.ctl("rollback", "web", "--local", "--to", missing)
        assert result.returncode == 2, result  # a name that does not exist: bad input
        assert f"no release {missing}" in result.stderr and release_of(3) in result.stderr
        (host.engine.layout.releases_dir / release_of(9)).mkdir()
        result = host.ctl("rollback", "web", "--local", "--to", release_of(9))
        assert result.returncode == 1 and "incomplete" in result.stderr, result
        result = host.ctl("rollback", "web", "--local", "--to", "../../etc")
        assert result.returncode == 2 and "invalid release name" in result.stderr, result
        for flag in (["--no-wait"], ["--timeout", "5"], ["--allow-missing"]):
            result = host.ctl("rollback", "web", "--local", *flag)
            assert result.returncode == 2 and "not to --local" in result.stderr, result
        assert host.engine.current_release() == release_of(4)
        assert host.engine.held() is None

    def test_ctrl_c_during_the_hooks_after_the_flip_says_where_the_host_was_left(
        self, host: Host, tmp_path: Path
    ) -> None:
        """Ctrl-C while the local rollback's validate ran said only "interrupted", of a
        host already flipped and held (the operator review)."""
        started = tmp_path / "validate.started"
        files: dict[str, str | bytes] = {
            "VERSION": "v6\n",
            ".watcher/hooks/validate": f'#!/bin/sh\ntouch "{started}"\nsleep 30\n',
        }
        target = host.stage(6, files=files, executable=(".watcher/hooks/validate",))
        proc = subprocess.Popen(
            host.argv("rollback", "web", "--local", "--to", target),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=host.env(),
            start_new_session=True,
            # A shell that starts jobs without job control (CI's) has them ignore SIGINT,
            # and Python keeps an ignored SIGINT ignored: a terminal's Ctrl-C is SIG_DFL.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 20
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert started.exists(), "the validate hook never started"
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 130, err
        assert f"this host is on {target} and held (local rollback to {target})" in err, err
        assert "`watcherctl release-hold web` gives it back to the fleet" in err, err
        assert host.engine.current_release() == target and host.engine.held() is not None

    def test_a_hook_that_switches_current_back_is_a_failure_said(self, host: Host) -> None:
        """As the watcher's own flips: a release's post_symlink that points `current`
        elsewhere left this command saying "rolled back to" a release not served."""
        files: dict[str, str | bytes] = {
            "VERSION": "v6\n",
            ".watcher/hooks/post_symlink": (
                '#!/bin/sh\nln -sfn "$WATCHER_PREVIOUS_RELEASE_DIR" "$WATCHER_CURRENT.x" && '
                'mv -T "$WATCHER_CURRENT.x" "$WATCHER_CURRENT"\n'
            ),
        }
        target = host.stage(6, files=files, executable=(".watcher/hooks/post_symlink",))
        result = host.ctl("rollback", "web", "--local", "--to", target)
        assert result.returncode == 1, result
        assert (
            f"hook FAILED after the flip: post_symlink hook (the app's hooks): current names "
            f"{release_of(4)} after the hooks ran, not {target}"
        ) in result.stdout, result.stdout

    def test_a_hold_over_a_local_rollback_keeps_saying_the_host_was_rolled_back(
        self, host: Host
    ) -> None:
        """`hold --reason` on a host a local rollback holds replaced the reason: `status`
        and `release-hold` no longer said the host runs an older release by hand (the
        operator review). The new reason comes first, the rollback's stays after it."""
        assert host.ctl("rollback", "web", "--local").returncode == 0
        first = host.engine.held()
        assert first is not None
        data = host.ctl_json("hold", "web", "--reason", "disk check")
        assert data["replaced"]["reason"] == first.reason
        assert data["hold"]["reason"] == (f"disk check; earlier: {first.reason} (by {first.by})"), (
            data
        )
        hold = host.engine.held()
        assert hold is not None and hold.reason == data["hold"]["reason"]
        # Once more: the local rollback's reason stays, once (it nested every earlier hold).
        again = host.ctl_json("hold", "web", "--reason", "still checking")["hold"]["reason"]
        assert again == f"still checking; earlier: {first.reason} (by {first.by})", again
        # A plain hold replaced by another is replaced, as before.
        host.ctl_json("release-hold", "web")
        host.ctl_json("hold", "web", "--reason", "one")
        assert host.ctl_json("hold", "web", "--reason", "two")["hold"]["reason"] == "two"

    def test_second_rollback_to_missing_release_keeps_the_first(self, host: Host) -> None:
        assert host.ctl("rollback", "web", "--local").returncode == 0
        result = host.ctl("rollback", "web", "--local", "--to", "20991231T235959Z-gone")
        assert result.returncode == 2 and "no release" in result.stderr, result
        assert host.engine.current_release() == release_of(3)
        hold = host.engine.held()
        assert hold is not None and release_of(3) in hold.reason


class TestHold:
    def test_hold_and_release_hold(self, host: Host) -> None:
        data = host.ctl_json("hold", "web", "--reason", "investigating a leak")
        assert data["hold"]["reason"] == "investigating a leak" and data["replaced"] is None
        hold = host.engine.held()
        assert hold is not None and hold.reason == "investigating a leak"
        assert re.fullmatch(r".+@.+", hold.by)

        data = host.ctl_json("hold", "web")
        assert data["replaced"]["reason"] == "investigating a leak"
        assert host.engine.held() is not None
        # The command it suggests reads the config this one was given (README).
        said = host.ctl("hold", "web")
        assert "until `watcherctl release-hold web -c " in said.stdout, said.stdout

        result = host.ctl("release-hold", "web")
        assert result.returncode == 0 and "released" in result.stdout, result
        assert host.engine.held() is None
        result = host.ctl("release-hold", "web")
        assert result.returncode == 0 and "was not held" in result.stdout, result

    def test_refused_while_the_watcher_works_on_another_root(self, host: Host) -> None:
        """`apps.web.root` changed and reloaded: the watcher keeps the root it started
        with until a restart, `watcherctl` reads the file. A hold was reported placed on
        the new root, never seen by the watcher, and the next deploy moved the host."""
        state = host.root / "state"
        state.mkdir(exist_ok=True)
        status = {"reload": {"at": "x", "error": "", "needs_restart": ["apps.web.root"]}}
        (state / "status.json").write_text(json.dumps(status))
        watcher = hold_instance_lock(state / INSTANCE_LOCK)
        try:
            for args in (
                ("hold", "web"),
                ("release-hold", "web"),
                ("rollback", "web", "--local"),
                ("prune", "web"),
                ("setup-release", "web", "main-abc12345"),
            ):
                refused = host.ctl(*args)
                assert refused.returncode == 4, (args, refused)
                assert "the running watcher still works on the root it started with" in (
                    refused.stderr
                ), refused.stderr
                assert "`systemctl restart watcher`" in refused.stderr
            assert host.engine.held() is None and host.engine.current_release() == release_of(4)
            shown = host.ctl("releases", "web")
            assert shown.returncode == 0 and "this shows the new root" in shown.stderr, shown
        finally:
            watcher.kill()
            watcher.wait()
        # Restarted (no watcher holds the lock now, the file is its last word): allowed.
        assert host.ctl("hold", "web").returncode == 0

    def test_hold_refused_when_ready_and_consul_unreachable(self, host: Host) -> None:
        host.write_journal("20260101T000000Z-aaaaaa", release_of(5), ["staged", "post_release"])
        result = host.ctl("hold", "web")
        assert result.returncode == 4, result
        assert "20260101T000000Z-aaaaaa" in result.stderr
        assert "cannot be checked" in result.stderr
        assert host.engine.held() is None

    def test_hold_while_only_staging_warns(self, host: Host) -> None:
        host.write_journal("20260101T000000Z-bbbbbb", release_of(5), ["staged"])
        result = host.ctl("hold", "web")
        assert result.returncode == 0, result
        assert "preparing deploy 20260101T000000Z-bbbbbb" in result.stderr
        assert host.engine.held() is not None

    @pytest.mark.parametrize("done", [{"finished": True}, {"ended": True}])
    def test_a_deploy_this_host_is_done_with_neither_warns_nor_refuses(
        self, host: Host, done: dict[str, bool]
    ) -> None:
        # Aborted while staging (no post_release), and ready then aborted: over either way.
        for phases in (["staged", "aborted"], ["staged", "post_release", "aborted"]):
            host.write_journal("20260101T000000Z-cccccc", release_of(5), phases, **done)
            result = host.ctl("hold", "web")
            assert result.returncode == 0, result
            assert "20260101T000000Z-cccccc" not in result.stderr, result.stderr
            assert host.engine.held() is not None
            host.ctl("release-hold", "web")


class TestExec:
    def test_runs_in_the_release_with_its_environment(self, host: Host) -> None:
        script = "pwd; cat VERSION; env | grep ^WATCHER_ | sort; exit 7"
        result = host.ctl("exec", "web", "--", "sh", "-c", script)
        assert result.returncode == 7, result
        lines = result.stdout.splitlines()
        assert lines[0] == str(host.engine.layout.release_dir(release_of(4)))
        assert lines[1] == "v4"
        env = dict(line.split("=", 1) for line in lines[2:])
        assert env["WATCHER_APP"] == "web"
        assert env["WATCHER_RELEASE"] == release_of(4)
        assert env["WATCHER_ARTIFACT"] == "build-4"
        assert env["WATCHER_PHASE"] == "exec"
        assert env["WATCHER_RELEASE_DIR"] == lines[0]
        assert env["WATCHER_CURRENT"] == str(host.engine.layout.current)

    def test_other_release_options_after_app_and_errors(self, host: Host) -> None:
        result = host.ctl("exec", "web", "--release", release_of(2), "--", "cat", "VERSION")
        assert result.returncode == 0 and result.stdout == "v2\n", result
        result = host.ctl("exec", "--release", release_of(1), "web", "--", "bin/hello")
        assert result.returncode == 0 and result.stdout == "hello\n", result
        result = host.ctl("exec", "web", "--", "no-such-command-xyz")
        assert result.returncode == 127 and "no-such-command-xyz" in result.stderr, result
        result = host.ctl("exec", "web", "--release", "20991231T235959Z-x", "--", "true")
        assert result.returncode == 2 and "no release" in result.stderr, result
        result = host.ctl("exec", "web")
        assert result.returncode == 2 and "no command" in result.stderr, result


class TestPrune:
    def test_dry_run_then_prune_keeps_protected(self, host: Host) -> None:
        r = [release_of(i) for i in range(7)]
        with host.engine.lock(owner="test"):
            host.engine.pin(r[1], utcnow() + timedelta(days=1))
        (host.engine.layout.releases_dir / r[6]).mkdir()  # a failed staging
        before = host.names()

        lock = host.engine.layout.lock_file
        lock.unlink()  # a dry run writes nothing, not even the lock file
        data = host.ctl_json("prune", "web", "--dry-run", own_proc=True)
        assert data["blocked"] is None and data["dry_run"] is True
        assert data["removed"] == [r[2], r[6]]
        assert host.names() == before
        assert not lock.exists()
        assert data["kept"][r[4]] == "current" and data["kept"][r[3]] == "previous"
        assert data["kept"][r[1]].startswith("pinned until")
        assert data["kept"][r[5]] == "among the newest 2"

        result = host.ctl("prune", "web", own_proc=True)
        assert result.returncode == 0, result
        assert f"removed: {r[2]}, {r[6]}" in result.stdout
        assert "previous" in result.stdout and "pinned until" in result.stdout
        assert host.names() == [r[1], r[3], r[4], r[5]]
        assert host.engine.current_release() == r[4]

    def test_a_blocked_dry_run_still_shows_what_would_go_and_why_the_rest_stays(
        self, host: Host
    ) -> None:
        # Without CAP_SYS_PTRACE, root cannot read the /proc entries of a process with more
        # capabilities (this test's own): any release might be in use, nothing goes (exit 4).
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv(1) (util-linux) is needed"
        assert os.geteuid() == 0, "the suite runs as root"
        capless = (setpriv, "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace", "--")
        r = [release_of(i) for i in range(6)]
        before = host.names()
        result = subprocess.run(
            [*capless, *host.argv("prune", "web", "--dry-run")],
            capture_output=True,
            text=True,
            env=host.env(),
            timeout=60,
        )
        assert result.returncode == 4, result
        lines = result.stdout.splitlines()
        assert lines[0].startswith("prune of web blocked, no release removed: cannot read"), lines
        assert lines[1] == f"held back (would go once every process can be read): {r[1]}, {r[2]}"
        # what to do about it, with the command to run (and the -c given)
        assert lines[2] == (
            "to unblock: prune must read every process's /proc entries: give the watcher "
            "CAP_SYS_PTRACE (systemd/watcher.service keeps it; a container needs --cap-add "
            f"SYS_PTRACE), and run `watcherctl prune web -c {host.config_path}` as root with "
            "that capability; a process even that cannot read (a VM's init here, another "
            "user namespace's) and that never uses the app's releases can be named in "
            "apps.web.prune_ignore"
        ), lines
        assert "kept:" in lines and "previous" in result.stdout, result.stdout
        data = json.loads(
            subprocess.run(
                [*capless, *host.argv("prune", "web", "--dry-run", "--json")],
                capture_output=True,
                text=True,
                env=host.env(),
                timeout=60,
            ).stdout
        )
        assert data["blocked"] and data["removed"] == [] and data["held_back"] == [r[1], r[2]]
        assert "CAP_SYS_PTRACE" in data["remedy"]
        assert data["kept"][r[4]] == "current" and data["kept"][r[3]] == "previous"
        assert host.names() == before

    def test_in_flight_release_of_the_journal_is_kept(self, host: Host) -> None:
        host.write_journal("20260101T000000Z-cccccc", release_of(2), ["staged"])
        data = host.ctl_json("prune", "web", own_proc=True)
        assert data["removed"] == [release_of(1)]
        assert data["kept"][release_of(2)] == "in flight"

    def test_the_release_of_a_finished_part_is_not_in_flight(self, host: Host) -> None:
        """The second soak: an idle host's `releases` marked its current release "in-flight"
        (the journal stays, marked finished, until the next deploy)."""
        phases = ["staged", "post_release", "flipped"]
        host.write_journal("20260101T000000Z-cccccc", release_of(4), phases, finished=True)
        rows = {r["release"]: r for r in host.ctl_json("releases", "web")}
        assert rows[release_of(4)]["in_flight"] is False, rows[release_of(4)]
        host.write_journal("20260101T000000Z-cccccc", release_of(2), ["staged"], finished=True)
        data = host.ctl_json("prune", "web", "--dry-run", own_proc=True)
        assert release_of(2) not in data["kept"], data

    def test_the_release_a_convergence_works_on_is_kept_and_marked(self, host: Host) -> None:
        """The commit review: only the deploy journal was read; a host catching up with a
        committed deploy journals to converge.json (its release at the top level)."""
        path = host.engine.layout.state_dir / CONVERGE_JOURNAL_NAME
        path.write_text(
            json.dumps(
                {"deploy": "20260101T000000Z-dddddd", "release": release_of(2), "phases": []}
            )
        )
        data = host.ctl_json("prune", "web", "--dry-run", own_proc=True)
        assert data["kept"][release_of(2)] == "in flight", data
        rows = {r["release"]: r for r in host.ctl_json("releases", "web")}
        assert (
            rows[release_of(2)]["in_flight"] is True
            and "in-flight" in rows[release_of(2)]["markers"]
        )

    def test_prune_waits_for_a_flip_holding_the_lock(self, host: Host) -> None:
        """The flip happens while prune waits for the lock: prune sees the new current."""
        r = [release_of(i) for i in range(6)]
        with host.engine.lock(owner="test flip"):
            proc = subprocess.Popen(
                host.argv("prune", "web", "--json", own_proc=True),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=host.env(),
            )
            time.sleep(1.5)
            assert proc.poll() is None, "prune ran while the lock was held"
            host.engine.flip(r[1])  # r1 would have been pruned before this flip
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        data = json.loads(out)
        assert data["removed"] == [r[2], r[3]]
        assert data["kept"][r[1]] == "current" and data["kept"][r[4]] == "previous"
        assert host.engine.current_release() == r[1] and host.engine.is_complete(r[1])


class NotFound(BaseHTTPRequestHandler):
    """A web server's answer to every request: 404, as a static file server gives."""

    def do_GET(self) -> None:
        self.send_error(404)

    do_PUT = do_GET

    def log_message(self, *args: Any) -> None:
        pass


class TestStatusWithoutConsul:
    """Consul down: `status` still shows this host, says the fleet part is unknown (never
    "none in flight") and exits 3."""

    def test_local_part_unknown_fleet_part_exit_3(self, host: Host) -> None:
        result = host.ctl("status")
        assert result.returncode == 3, result
        lines = result.stdout.splitlines()
        assert f"  current     {release_of(4)}" in lines
        assert f"  previous    {release_of(3)}" in lines
        assert "  deploy      unknown (Consul unreachable)" in lines, result.stdout
        assert "none in flight" not in result.stdout
        assert "consul UNREACHABLE at http://127.0.0.1:9" in result.stdout
        assert "Traceback" not in result.stderr

        data = host.ctl_json("status", code=3)
        web = data["apps"]["web"]
        assert web["current"] == release_of(4)
        assert web["deploy"] is None and web["fleet_current"] is None
        assert web["fleet_error"] == "Consul unreachable"
        assert data["consul"]["reachable"] is False and "127.0.0.1:9" in data["consul"]["error"]

    def test_fleet_status_shows_this_host_within_seconds(self, host: Host) -> None:
        started = time.monotonic()
        result = host.ctl("status", "--fleet")
        assert time.monotonic() - started < 8, "waited out the full retry deadline"
        assert result.returncode == 3, result
        lines = result.stdout.splitlines()
        assert f"  current     {release_of(4)}" in lines, result.stdout
        assert "  deploy      unknown (Consul unreachable)" in lines, result.stdout
        assert "consul UNREACHABLE at http://127.0.0.1:9" in result.stdout
        assert "Traceback" not in result.stderr
        # The JSON keeps the fleet's shape (a script reads the same keys), fleet unknown.
        data = host.ctl_json("status", "--fleet", code=3)
        assert set(data) == {"web"}
        web = data["web"]
        assert web["current"] is None and web["hosts"] is None and web["deploy"] is None
        assert web["fleet_error"] == "Consul unreachable"
        assert web["this_host"]["app"]["current"] == release_of(4)
        assert web["this_host"]["consul"]["reachable"] is False

    def test_an_address_that_answers_but_is_not_consul_shows_this_host_too(
        self, host: Host
    ) -> None:
        # A web server where Consul should be: it answers every request with a 404.
        server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        data = yaml.safe_load(host.config_path.read_text())
        data["consul"]["address"] = f"http://127.0.0.1:{server.server_address[1]}"
        config = host.root / "not-consul.yaml"
        config.write_text(yaml.safe_dump(data))
        argv = [str(WATCHERCTL), "status", "-c", str(config), "--fleet"]
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, env=host.env(), timeout=60
            )
            as_json = subprocess.run(
                [*argv, "--json"], capture_output=True, text=True, env=host.env(), timeout=60
            )
        finally:
            server.shutdown()
            server.server_close()
        assert result.returncode == 3, result
        lines = result.stdout.splitlines()
        assert f"  current     {release_of(4)}" in lines, result.stdout
        assert "  deploy      unknown (Consul refused the request)" in lines, result.stdout
        assert "is it a Consul agent's HTTP API address?" in result.stdout
        assert result.stderr == "", result.stderr
        assert as_json.returncode == 3, as_json
        web = json.loads(as_json.stdout)["web"]
        assert web["hosts"] is None and web["fleet_error"] == "Consul refused the request"
        assert web["this_host"]["app"]["current"] == release_of(4)
        assert web["this_host"]["consul"]["reachable"] is True

    def test_a_mistyped_app_names_the_configured_ones(self, host: Host) -> None:
        for argv in (("status", "webb"), ("releases", "webb")):
            result = host.ctl(*argv)
            assert result.returncode == 2, result
            assert result.stderr == (
                f"watcherctl: error: no app 'webb' in {host.config_path} (configured: web)\n"
            )


class TestHostileText:
    """Free text is checked on the way in, and output never crashes on encoding."""

    def test_a_surrogate_or_control_character_in_reason_is_refused(self, host: Host) -> None:
        for reason in (b"caf\xe9", b"\x1b[2Jgone", b"line\rover"):
            result = subprocess.run(
                [*map(os.fsencode, host.argv("hold", "web")), b"--reason", reason],
                capture_output=True,
                text=True,
                errors="replace",
                env=host.env(),
                timeout=60,
                check=False,
            )
            assert result.returncode == 2, result
            assert "argument --reason" in result.stderr and "Traceback" not in result.stderr
        assert host.engine.held() is None

    def test_an_ascii_terminal_gets_escapes_not_a_crash(self, host: Host) -> None:
        env = {**host.env(), "PYTHONIOENCODING": "ascii"}
        argv = host.argv("hold", "web", "--reason", "café")
        held = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert held.returncode == 0, held
        assert "caf\\xe9" in held.stdout
        for args, code in ((("releases", "web"), 0), (("status",), 3)):
            result = subprocess.run(
                host.argv(*args), capture_output=True, text=True, env=env, timeout=60
            )
            assert result.returncode == code, result
            assert "caf\\xe9" in result.stdout and "Traceback" not in result.stderr

    def test_a_surrogate_stored_before_is_shown_escaped(self, host: Host) -> None:
        with host.engine.lock(owner="test"):
            host.engine.hold("caf\udce9", "someone@host")
        # a UTF-8 locale's stdout is strict (only the C locale's escapes surrogates)
        env = {**host.env(), "PYTHONIOENCODING": "utf-8"}
        for args, code in ((("releases", "web"), 0), (("status",), 3)):
            result = subprocess.run(
                host.argv(*args), capture_output=True, text=True, env=env, timeout=60
            )
            assert result.returncode == code, result
            assert "caf\\udce9" in result.stdout and "Traceback" not in result.stderr


class TestUnusablePaths:
    """A path the command cannot use is one line naming it, exit 1, no traceback."""

    def test_releases_is_a_file(self, host: Host) -> None:
        releases = host.engine.layout.releases_dir
        shutil.rmtree(releases)
        releases.write_text("not a directory\n")
        result = host.ctl("releases", "web")
        assert result.returncode == 1, result
        assert result.stderr.startswith("watcherctl: error: ")
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
        assert str(releases) in result.stderr and "Not a directory" in result.stderr

    def test_status_json_is_a_directory(self, host: Host) -> None:
        status = host.root / "state" / "status.json"
        status.mkdir(parents=True)
        result = host.ctl("status")
        assert result.returncode == 3, result  # Consul is down; the local part is shown
        assert "Traceback" not in result.stderr
        assert f"watcher NOT running (cannot read {status}: Is a directory)" in result.stdout

    def test_a_directory_this_user_may_not_read(self, tmp_path: Path) -> None:
        """The operator forgot sudo: root's 0700 app directory."""
        with tempfile.TemporaryDirectory() as shared:
            base = Path(shared)
            base.chmod(0o755)
            h = Host(base)
            h.config_path.chmod(0o644)
            app_dir = base / "srv"
            if os.geteuid() == 0:  # run watcherctl as nobody
                prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
                app_dir.chmod(0o700)
            else:
                prefix = []
                app_dir.chmod(0o000)
            try:
                result = subprocess.run(
                    [*prefix, *h.argv("releases", "web")],
                    capture_output=True,
                    text=True,
                    env={**h.env(), "HOME": shared},
                    timeout=60,
                    check=False,
                )
            finally:
                app_dir.chmod(0o755)
        assert result.returncode == 1, result
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
        assert "Permission denied" in result.stderr and str(app_dir) in result.stderr


# --- with the real Consul cluster and S3 server ----------------------------------------


@pytest.fixture
def consul(cluster: ConsulCluster) -> Any:
    client = ConsulClient(cluster.hosts[0].consul_settings())
    yield client
    client.close()


class TestHoldUndecided:
    def test_refused_while_ready_and_undecided_allowed_once_decided(
        self, cluster: ConsulCluster, consul: ConsulClient, tmp_path: Path
    ) -> None:
        h = Host(tmp_path, consul=cluster.hosts[0].consul_settings())
        h.stage(1)
        h.stage(2)
        h.flip(release_of(1))
        h.flip(release_of(2))
        deploy = f"20260101T000000Z-{uuid.uuid4().hex[:6]}"
        h.write_journal(deploy, release_of(3), ["staged", "post_release"])

        for args in (("hold", "web"), ("rollback", "web", "--local")):
            result = h.ctl(*args)
            assert result.returncode == 4, result
            assert deploy in result.stderr and "not decided" in result.stderr
        assert h.engine.held() is None and h.engine.current_release() == release_of(2)

        decision = Decision(outcome="abort", reason="test", by="test", at=iso(utcnow()))
        assert consul.kv_put(Keys("watcher", "web").decision(deploy), decision.to_json())
        data = h.ctl_json("hold", "web", "--reason", "after the decision")
        assert data["hold"]["reason"] == "after the decision"
        assert h.engine.held() is not None


class TestPruneKeepsTheFleets:
    def test_the_fleets_rollback_target_is_kept(
        self, cluster: ConsulCluster, consul: ConsulClient, tmp_path: Path
    ) -> None:
        """This host's own previous is not where `watcherctl rollback` goes once it rolled
        back alone, or converged across two fleet changes: the fleet's `current.previous`
        was pruned, and a fleet rollback then had to fetch it again (aborting everywhere
        when S3 or the object was gone)."""
        h = Host(tmp_path, consul=cluster.hosts[0].consul_settings())
        for i in range(1, 6):
            h.stage(i)
        for i in range(1, 5):
            h.flip(release_of(i))  # this host: current 4, previous 3

        def ref(i: int) -> dict[str, Any]:
            deploy = f"20260101T0000{i:02d}Z-abcdef"
            return asdict(ReleaseRef(release_of(i), f"build-{i}", "a" * 64, deploy))

        # `current` is a ReleaseRef's fields but the build's (format, branch, commit)
        fields = {k: v for k, v in ref(4).items() if k not in ("format", "branch", "commit")}
        current = CurrentRecord(**fields, previous=ref(1))
        key = Keys("watcher", "web").current
        assert consul.kv_put(key, current.to_json())
        try:
            data = h.ctl_json("prune", "web", "--dry-run", own_proc=True)
            assert data["removed"] == [release_of(2)], data
            assert data["kept"][release_of(1)] == "the fleet's previous release (rollback target)"
            assert data["kept"][release_of(3)] == "previous"
        finally:
            consul.kv_delete(key)
        # Consul away: said, and the prune goes on with this host's own (a prune that frees
        # a full disk must not wait on it, nor fail for it).
        (tmp_path / "away").mkdir()
        away = Host(tmp_path / "away")
        for i in range(1, 6):
            away.stage(i)
        for i in range(1, 5):
            away.flip(release_of(i))
        result = away.ctl("prune", "web", "--dry-run", own_proc=True)
        assert result.returncode == 0, result
        assert "the fleet's release and rollback target could not be read" in result.stderr
        assert f"would remove: {release_of(1)}, {release_of(2)}" in result.stdout, result.stdout


def upload_hooked_build(s3_settings: S3Settings) -> ArtifactRecord:
    """A build whose post_release hook writes ``hooked`` (release and kind) into its tree,
    uploaded to S3; its record is not written."""
    artifact = f"master-{uuid.uuid4().hex[:8]}"
    hook = '#!/bin/sh\necho "$WATCHER_RELEASE $WATCHER_KIND" > "$WATCHER_RELEASE_DIR/hooked"\n'
    data = make_tarball(
        {"VERSION": "setup\n", ".watcher/hooks/post_release": hook},
        executable=(".watcher/hooks/post_release",),
    )
    sha = hashlib.sha256(data).hexdigest()
    key = f"{s3_settings.prefix}/web/{artifact}.tar.gz"
    s3_client(str(s3_settings.endpoint_url)).put_object(
        Bucket=s3_settings.bucket, Key=key, Body=data, Metadata={"sha256": sha}
    )
    return ArtifactRecord(
        id=artifact,
        url=f"s3://{s3_settings.bucket}/{key}",
        sha256=sha,
        size=len(data),
        branch="master",
    )


class TestSetupRelease:
    def test_stages_pins_and_survives_prune(
        self,
        cluster: ConsulCluster,
        consul: ConsulClient,
        s3_settings: S3Settings,
        tmp_path: Path,
    ) -> None:
        h = Host(tmp_path, consul=cluster.hosts[0].consul_settings(), s3=s3_settings, keep=1)
        h.stage(1)
        h.flip(release_of(1))
        record = upload_hooked_build(s3_settings)
        artifact, sha = record.id, record.sha256
        key = Keys("watcher", "web").artifact(artifact)
        # Its publish not finished yet: refused (exit 4), nothing fetched or staged.
        assert consul.kv_put(key, replace(record, uploading=True).to_json())
        early = h.ctl("setup-release", "web", artifact)
        assert early.returncode == 4, early
        assert f"artifact {artifact} is still being uploaded" in early.stderr, early.stderr
        assert [n for n in h.names() if artifact in n] == []
        assert consul.kv_put(key, record.to_json())

        started = datetime.now(UTC)
        out = h.ctl_json("setup-release", "web", artifact, "--keep-days", "3")
        release = out["release"]
        assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z-{artifact}", release)
        path = Path(out["path"])
        assert path == h.engine.layout.release_dir(release)
        assert (path / "VERSION").read_text() == "setup\n"
        assert (path / "hooked").read_text() == f"{release} setup-release\n"
        info = h.engine.release_info(release)
        assert info is not None and info["sha256"] == sha
        pinned = h.engine.pinned_until(release)
        assert pinned is not None
        assert abs(pinned - (started + timedelta(days=3))) < timedelta(minutes=1)
        assert parse_iso(out["pinned_until"]) == pinned
        assert h.engine.current_release() == release_of(1)  # not flipped

        assert out["reused"] is False and out["post_release"] == "ok"
        # The same artifact again: the staged copy is reused (no second copy on disk), its
        # pin extended to the later date, its post_release hook not run twice.
        (path / "hooked").unlink()
        again = h.ctl("setup-release", "web", artifact, "--keep-days", "5")
        assert again.returncode == 0, again
        assert Path(again.stdout.strip()) == path
        assert f"{release} already holds these bytes: reused" in again.stderr, again.stderr
        assert [n for n in h.names() if artifact in n] == [release]
        assert not (path / "hooked").exists()
        later = h.engine.pinned_until(release)
        assert later is not None and later - pinned > timedelta(days=1, hours=23)
        shorter = h.ctl_json("setup-release", "web", artifact, "--keep-days", "1", "--no-hooks")
        assert shorter["reused"] is True and shorter["release"] == release
        assert h.engine.pinned_until(release) == later  # never shortened

        # a newer build goes live twice; prune keeps the pinned setup release
        h.stage(2)
        h.stage(3)
        h.flip(release_of(2))
        h.flip(release_of(3))
        pruned = h.ctl_json("prune", "web", own_proc=True)
        assert pruned["removed"] == [release_of(1)]
        assert pruned["kept"][release].startswith("pinned until")
        assert path.is_dir()

        result = h.ctl("setup-release", "web", "master-deadbeef")
        assert result.returncode == 2 and "unknown artifact master-deadbeef" in result.stderr

    def test_leaves_the_hook_to_a_convergence_of_that_release(
        self,
        cluster: ConsulCluster,
        consul: ConsulClient,
        s3_settings: S3Settings,
        tmp_path: Path,
    ) -> None:
        """A host catching up with a committed deploy runs its post_release as a deploy
        does (``.state/converge.json``): setup-release of that build meanwhile leaves the
        hook to it, as it does for a deploy being prepared."""
        h = Host(tmp_path, consul=cluster.hosts[0].consul_settings(), s3=s3_settings)
        h.stage(1)
        h.flip(release_of(1))
        record = upload_hooked_build(s3_settings)
        assert consul.kv_put(Keys("watcher", "web").artifact(record.id), record.to_json())
        release = h.ctl_json("setup-release", "web", record.id, "--no-hooks")["release"]
        hooked = h.engine.layout.release_dir(release) / "hooked"
        journal = h.engine.layout.state_dir / CONVERGE_JOURNAL_NAME
        deploy = "20260101T000000Z-eeeeee"
        journal.write_text(json.dumps({"deploy": deploy, "release": release, "phases": []}))
        watcher = hold_instance_lock(h.engine.layout.state_dir / INSTANCE_LOCK)
        try:
            out = h.ctl_json("setup-release", "web", record.id)
            assert out["reused"] is True and out["release"] == release, out
            assert out["post_release"].startswith(
                f"left to this host's watcher, which is preparing deploy {deploy} (catching "
                "up with it) of this release"
            ), out
            assert not hooked.exists()
            # its hook journaled: nothing to leave to it
            phases = ["staged", "post_release"]
            journal.write_text(json.dumps({"deploy": deploy, "release": release, "phases": phases}))
            assert h.ctl_json("setup-release", "web", record.id)["post_release"] == "ok"
            assert hooked.read_text() == f"{release} setup-release\n"
        finally:
            watcher.kill()
            watcher.wait()
