"""The systemd unit passes `systemd-analyze verify`; its directives; the tmpfiles snippet."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "watcher.service"
TMPFILES = ROOT / "systemd" / "watcher.tmpfiles.conf"
ENV_EXAMPLE = ROOT / "systemd" / "watcher.env.example"
INSTALLED_BIN = "/usr/local/bin/watcher"


def systemd_tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(
            f"{name} not found: install systemd (Debian: apt-get install systemd) to "
            "check the unit file"
        )
    return path


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; repeated keys accumulate, as systemd's lists do."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def console_script() -> Path:
    """The venv's `watcher` script: an existing executable to stand in for the installed one."""
    script = Path(sys.executable).parent / "watcher"
    assert script.exists(), f"{script} missing: run `make venv` (pip install -e .)"
    return script


@pytest.fixture
def rendered_unit(tmp_path: Path) -> Path:
    """A copy of the unit, named watcher.service, whose ExecStart exists on this machine."""
    text = UNIT.read_text()
    assert INSTALLED_BIN in text
    path = tmp_path / "watcher.service"
    path.write_text(text.replace(INSTALLED_BIN, str(console_script())))
    return path


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_tool("systemd-analyze"), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
    )


class TestVerify:
    def test_rendered_unit_verifies_cleanly(self, rendered_unit: Path) -> None:
        result = verify(rendered_unit)
        # verify exits 0 on mere parse warnings ("Failed to parse ..., ignoring"), so any
        # line about our unit counts as a failure too.
        ours = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if "watcher.service" in line
        ]
        assert result.returncode == 0, result.stderr
        assert ours == []

    def test_verify_catches_a_missing_binary(self, tmp_path: Path) -> None:
        """The check above is meaningful: verify does look at ExecStart."""
        path = tmp_path / "watcher.service"
        path.write_text(UNIT.read_text().replace(INSTALLED_BIN, str(tmp_path / "no-such-bin")))
        result = verify(path)
        assert result.returncode != 0
        assert "no-such-bin" in result.stderr

    def test_security_exposure_is_low(self, rendered_unit: Path) -> None:
        result = subprocess.run(
            [
                systemd_tool("systemd-analyze"),
                "security",
                "--offline=true",
                "--no-pager",
                str(rendered_unit),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=rendered_unit.parent,
        )
        match = re.search(r"Overall exposure level for watcher\.service: (\d+\.\d)", result.stdout)
        assert match, result.stdout + result.stderr
        assert float(match.group(1)) <= 3.5, result.stdout


HUP_CATCHER = """
import pathlib, signal, sys, time
seen = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGHUP, lambda *_: seen.write_text("HUP"))
pathlib.Path(sys.argv[2]).write_text("up")
time.sleep(60)
"""


class TestReload:
    """`systemctl reload watcher` runs the unit's ExecReload lines one after the other and
    stops at the first that fails (systemd.service(5)). Run here the same way, with the
    unit's own command lines (the installed paths swapped for this checkout's), against a
    process standing in for the daemon that records a SIGHUP."""

    def reload(self, tmp_path: Path, config_text: str) -> tuple[list[int], str, bool]:
        config = tmp_path / "watcher.yaml"
        config.write_text(config_text)
        seen, up = tmp_path / "hup", tmp_path / "up"
        daemon = subprocess.Popen([sys.executable, "-c", HUP_CATCHER, str(seen), str(up)])
        try:
            for _ in range(200):
                if up.exists():
                    break
                time.sleep(0.05)
            codes, stderr = [], ""
            for line in TestDirectives.unit["Service"]["ExecReload"]:
                line = line.replace(INSTALLED_BIN, str(console_script()))
                line = line.replace("/etc/watcher/watcher.yaml", str(config))
                line = line.replace("$MAINPID", str(daemon.pid))
                result = subprocess.run(
                    shlex.split(line), capture_output=True, text=True, timeout=60, check=False
                )
                codes.append(result.returncode)
                stderr += result.stderr
                if result.returncode != 0:
                    break
            for _ in range(100):  # a signal is delivered, not waited for
                if seen.exists() or codes[-1] != 0:
                    break
                time.sleep(0.05)
            return codes, stderr, seen.exists()
        finally:
            daemon.kill()
            daemon.wait()

    def test_a_broken_file_fails_the_reload_and_the_daemon_is_not_signalled(
        self, tmp_path: Path
    ) -> None:
        """It used to be `kill -HUP` alone: systemctl reported success and the daemon,
        refusing the file, kept its old config, which only its log and `status` said."""
        codes, stderr, hup = self.reload(
            tmp_path, "s3:\n  bucket: b\napps:\n  web:\n    root: /srv/apps\n    keep: many\n"
        )
        assert codes == [2], (codes, stderr)
        assert str(tmp_path / "watcher.yaml") in stderr and "apps.web.keep" in stderr, stderr
        assert not hup

    def test_a_good_file_is_checked_then_signalled(self, tmp_path: Path) -> None:
        codes, stderr, hup = self.reload(
            tmp_path, "s3:\n  bucket: b\napps:\n  web:\n    root: /srv/apps\n"
        )
        assert codes == [0, 0], (codes, stderr)
        assert hup


class TestDirectives:
    unit = parse_unit(UNIT.read_text())

    def service(self, key: str) -> list[str]:
        return self.unit["Service"].get(key, [])

    def test_notify_watchdog_restart(self) -> None:
        assert self.service("Type") == ["notify"]
        assert self.service("NotifyAccess") == ["main"]
        assert self.service("WatchdogSec") == ["60"]
        assert self.service("Restart") == ["on-failure"]
        assert self.service("RestartSec") == ["5"]
        assert self.service("ExecStart") == [f"{INSTALLED_BIN} run -c /etc/watcher/watcher.yaml"]
        assert self.service("ExecReload") == [
            f"{INSTALLED_BIN} check-config -c /etc/watcher/watcher.yaml",
            "/bin/kill -HUP $MAINPID",
        ]
        assert self.service("EnvironmentFile") == ["-/etc/watcher/watcher.env"]
        assert self.service("StateDirectory") == ["watcher"]

    def test_config_errors_are_not_restarted(self) -> None:
        from watcher.daemon_cli import EXIT_CONFIG

        assert self.service("RestartPreventExitStatus") == [str(EXIT_CONFIG)]

    def test_a_hook_the_oom_killer_ends_does_not_stop_the_service(self) -> None:
        """Hooks share the cgroup: under OOMPolicy=stop (systemd's default) one hook
        killed for memory stopped the daemon, mid-step."""
        assert self.service("OOMPolicy") == ["continue"]
        assert self.service("Restart") == ["on-failure"]

    def test_stop_waits_for_a_hook_in_flight(self) -> None:
        """TimeoutStopSec covers the default hook timeout with a margin."""
        assert self.service("KillMode") == ["mixed"]
        from watcher.config import Timeouts

        assert int(self.service("TimeoutStopSec")[0]) >= Timeouts.hook + 30
        assert int(self.service("TimeoutStartSec")[0]) >= 60

    def test_sandbox(self) -> None:
        for key, value in {
            "ProtectSystem": "strict",
            "ProtectHome": "true",
            "PrivateTmp": "true",
            "PrivateDevices": "true",
            "NoNewPrivileges": "true",
            "ProtectKernelTunables": "true",
            "ProtectKernelModules": "true",
            "ProtectControlGroups": "true",
            "RestrictSUIDSGID": "true",
            "LockPersonality": "true",
            "RestrictRealtime": "true",
            "RestrictNamespaces": "true",
            "SystemCallArchitectures": "native",
        }.items():
            assert self.service(key) == [value], key
        assert "/srv" in self.service("ReadWritePaths")
        assert "-/etc/nginx/conf.d" in self.service("ReadWritePaths")

    def test_capabilities_are_the_documented_few(self) -> None:
        caps = {c for line in self.service("CapabilityBoundingSet") for c in line.split()}
        assert caps == {
            "CAP_SETUID",
            "CAP_SETGID",
            "CAP_CHOWN",
            "CAP_FOWNER",
            "CAP_KILL",
            "CAP_DAC_OVERRIDE",
            "CAP_SYS_PTRACE",
        }

    def test_every_capability_and_writable_path_has_a_comment(self) -> None:
        lines = UNIT.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith(("CapabilityBoundingSet=", "ReadWritePaths=")):
                assert lines[i - 1].startswith("#"), f"no comment above: {line}"


class TestTmpfiles:
    def test_creates_the_directories(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [systemd_tool("systemd-tmpfiles"), "--create", f"--root={tmp_path}", str(TMPFILES)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        modes = {
            p: (tmp_path / p).stat().st_mode & 0o7777
            for p in ("var/lib/watcher", "etc/watcher", "srv")
        }
        assert modes == {"var/lib/watcher": 0o750, "etc/watcher": 0o750, "srv": 0o755}


class TestEnvExample:
    def test_only_comments_and_key_value_lines(self) -> None:
        keys = []
        for line in ENV_EXAMPLE.read_text().splitlines():
            body = line.lstrip("#").strip() if line.startswith("#") else line
            if re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", body):
                keys.append(body.split("=", 1)[0])
            else:
                assert line.startswith("#") or not line.strip(), f"not KEY=VALUE: {line}"
        assert {
            "CONSUL_HTTP_ADDR",
            "CONSUL_HTTP_TOKEN_FILE",
            "CONSUL_CACERT",
            "AWS_ACCESS_KEY_ID",
            "AWS_REGION",
        } <= set(keys)


WEB_UNIT = ROOT / "systemd" / "watcher-web.service"


class TestWebUnit:
    """systemd/watcher-web.service: verifies, unprivileged, no capabilities, low exposure."""

    unit = parse_unit(WEB_UNIT.read_text())

    def rendered(self, tmp_path: Path) -> Path:
        path = tmp_path / "watcher-web.service"
        path.write_text(WEB_UNIT.read_text().replace(INSTALLED_BIN, str(console_script())))
        return path

    def test_verifies_cleanly(self, tmp_path: Path) -> None:
        result = verify(self.rendered(tmp_path))
        ours = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if "watcher-web.service" in line
        ]
        assert result.returncode == 0, result.stderr
        assert ours == []

    def test_security_exposure_is_lower_than_the_daemons(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [
                systemd_tool("systemd-analyze"),
                "security",
                "--offline=true",
                "--no-pager",
                str(self.rendered(tmp_path)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        match = re.search(
            r"Overall exposure level for watcher-web\.service: (\d+\.\d)", result.stdout
        )
        assert match, result.stdout + result.stderr
        assert float(match.group(1)) <= 2.5, result.stdout

    def test_unprivileged_and_no_capabilities(self) -> None:
        service = self.unit["Service"]
        assert service["DynamicUser"] == ["true"]
        assert service["CapabilityBoundingSet"] == [""]
        assert service["AmbientCapabilities"] == [""]
        assert service["NoNewPrivileges"] == ["true"]
        assert service["ProtectSystem"] == ["strict"]
        assert "User" not in service
        [start] = service["ExecStart"]
        assert start.split()[1:4] == ["web", "-c", "${CREDENTIALS_DIRECTORY}/web.yaml"]
        assert service["LoadCredential"] == ["web.yaml:/etc/watcher/web.yaml"]
        assert "--listen 127.0.0.1:" in start
        # Not the daemon's environment: it holds the host's token and S3 credentials.
        assert service["EnvironmentFile"] == ["-/etc/watcher/web.env"]
        # Half-open connections must not exhaust the default 1024 files.
        assert int(service["LimitNOFILE"][0]) >= 16384
