"""The example hooks in hooks/examples/, run as real processes on real files and servers."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HOOKS = Path(__file__).resolve().parents[2] / "hooks" / "examples"
EXAMPLES = ("nginx-current-backup", "python-venv", "restart-service", "http-health-check")


def run_hook(
    name: str, env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WATCHER_", "NGINX_", "HEALTH_", "PIP_"))
        and k not in ("SERVICE", "PROGRAM", "ACTION", "REQUIREMENTS", "PYTHON")
    }
    full.update(env)
    return subprocess.run(
        [str(HOOKS / name), *args], env=full, capture_output=True, text=True, timeout=timeout
    )


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\nset -eu\n" + body)
    path.chmod(0o755)
    return path


class AppTree:
    """<root>/<app> with two releases: current -> r2 (just flipped), current_backup -> r1."""

    def __init__(self, root: Path, app: str = "web") -> None:
        self.app = app
        self.app_dir = root / app
        for r in ("r1", "r2"):
            (self.app_dir / "releases" / r).mkdir(parents=True)
        self.current = self.app_dir / "current"
        self.backup = self.app_dir / "current_backup"
        self.current.symlink_to("releases/r1")
        self.backup.symlink_to("releases/r1")

    def env(self, phase: str) -> dict[str, str]:
        return {
            "WATCHER_APP": self.app,
            "WATCHER_PHASE": phase,
            "WATCHER_DEPLOY_ID": "d-1",
            "WATCHER_RELEASE": "r2",
            "WATCHER_RELEASE_DIR": str(self.app_dir / "releases" / "r2"),
            "WATCHER_CURRENT": str(self.current),
            "WATCHER_CURRENT_BACKUP": str(self.backup),
        }


class TestAllExamples:
    @pytest.mark.parametrize("name", EXAMPLES)
    def test_executable_with_a_header_saying_phase_needs_idempotence(self, name: str) -> None:
        path = HOOKS / name
        assert path.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
        header = path.read_text()[:3000]
        assert header.startswith("#!/usr/bin/env ")
        assert "Phase" in header
        assert "Needs:" in header
        assert "Hooks must be idempotent" in header


class TestNginxCurrentBackup:
    @pytest.fixture
    def nginx(self, tmp_path: Path) -> dict[str, Path]:
        """A conf.d directory and a reload command that records the snippet it reloaded."""
        conf_d = tmp_path / "conf.d"
        conf_d.mkdir()
        log = tmp_path / "reloads.log"
        reload = write_script(
            tmp_path / "fake-nginx",
            f"""
echo "reload $* :: $(grep -v '^#' "{conf_d}/web-root.conf")" >> "{log}"
""",
        )
        return {"conf_d": conf_d, "log": log, "reload": reload}

    def settings(self, nginx: dict[str, Path]) -> dict[str, str]:
        return {
            "NGINX_SNIPPET": str(nginx["conf_d"] / "web-root.conf"),
            "NGINX_RELOAD": f"{nginx['reload']} -s reload",
        }

    def reloads(self, nginx: dict[str, Path]) -> list[str]:
        return nginx["log"].read_text().splitlines() if nginx["log"].exists() else []

    def test_the_dance(self, tmp_path: Path, nginx: dict[str, Path]) -> None:
        tree = AppTree(tmp_path / "srv")
        snippet = nginx["conf_d"] / "web-root.conf"
        env = {**tree.env("post_release"), **self.settings(nginx)}

        result = run_hook("nginx-current-backup", env)
        assert result.returncode == 0, result.stderr
        backup_line = f'map $host $watcher_web_root {{ default "{tree.backup}"; }}'
        assert snippet.read_text().splitlines()[1:] == [backup_line]
        assert self.reloads(nginx) == [f"reload -s reload :: {backup_line}"]

        # the flip happens between the phases
        (tree.app_dir / "tmp-link").symlink_to("releases/r2")
        (tree.app_dir / "tmp-link").rename(tree.current)
        env["WATCHER_PHASE"] = "post_symlink"
        result = run_hook("nginx-current-backup", env)
        assert result.returncode == 0, result.stderr
        current_line = f'map $host $watcher_web_root {{ default "{tree.current}"; }}'
        assert snippet.read_text().splitlines()[1:] == [current_line]
        assert self.reloads(nginx)[1:] == [f"reload -s reload :: {current_line}"]
        assert stat.S_IMODE(snippet.stat().st_mode) == 0o644
        assert sorted(p.name for p in nginx["conf_d"].iterdir()) == ["web-root.conf"]

    def test_abort_points_back_at_current(self, tmp_path: Path, nginx: dict[str, Path]) -> None:
        tree = AppTree(tmp_path / "srv")
        env = {**tree.env("post_release"), **self.settings(nginx)}
        assert run_hook("nginx-current-backup", env).returncode == 0
        env["WATCHER_PHASE"] = "post_abort"
        assert run_hook("nginx-current-backup", env).returncode == 0
        text = (nginx["conf_d"] / "web-root.conf").read_text()
        assert f'default "{tree.current}";' in text
        assert "(post_abort of deploy d-1)" in text

    def test_rerun_is_idempotent(self, tmp_path: Path, nginx: dict[str, Path]) -> None:
        tree = AppTree(tmp_path / "srv")
        env = {**tree.env("post_release"), **self.settings(nginx)}
        assert run_hook("nginx-current-backup", env).returncode == 0
        first = (nginx["conf_d"] / "web-root.conf").read_text()
        assert run_hook("nginx-current-backup", env).returncode == 0
        assert (nginx["conf_d"] / "web-root.conf").read_text() == first
        assert len(set(self.reloads(nginx))) == 1

    def test_settings_as_arguments_and_default_path(
        self, tmp_path: Path, nginx: dict[str, Path]
    ) -> None:
        tree = AppTree(tmp_path / "srv", app="my-app")
        other = tmp_path / "other.conf"
        log = tmp_path / "args.log"
        reload = write_script(tmp_path / "rl", f'echo "$*" >> "{log}"\n')
        result = run_hook(
            "nginx-current-backup",
            tree.env("post_symlink"),
            f"NGINX_SNIPPET={other}",
            f"NGINX_RELOAD={reload} one two",
        )
        assert result.returncode == 0, result.stderr
        assert "map $host $watcher_my_app_root" in other.read_text()
        assert log.read_text() == "one two\n"

    def test_first_deploy_has_nothing_to_hold(self, tmp_path: Path, nginx: dict[str, Path]) -> None:
        tree = AppTree(tmp_path / "srv")
        env = {**tree.env("post_release"), **self.settings(nginx), "WATCHER_CURRENT_BACKUP": ""}
        result = run_hook("nginx-current-backup", env)
        assert result.returncode == 0, result.stderr
        assert "nothing to do" in result.stdout
        assert not (nginx["conf_d"] / "web-root.conf").exists()
        assert self.reloads(nginx) == []

    def test_failed_reload_fails_the_hook(self, tmp_path: Path, nginx: dict[str, Path]) -> None:
        tree = AppTree(tmp_path / "srv")
        env = {
            **tree.env("post_release"),
            **self.settings(nginx),
            "NGINX_RELOAD": str(write_script(tmp_path / "broken", "exit 3\n")),
        }
        result = run_hook("nginx-current-backup", env)
        assert result.returncode == 1
        assert "nginx-current-backup: reload failed" in result.stderr

    def test_wrong_phase_and_missing_dir(self, tmp_path: Path, nginx: dict[str, Path]) -> None:
        tree = AppTree(tmp_path / "srv")
        result = run_hook("nginx-current-backup", {**tree.env("validate"), **self.settings(nginx)})
        assert result.returncode == 1
        assert "not validate" in result.stderr
        result = run_hook(
            "nginx-current-backup",
            {
                **tree.env("post_symlink"),
                **self.settings(nginx),
                "NGINX_SNIPPET": str(tmp_path / "nope" / "x.conf"),
            },
        )
        assert result.returncode == 1
        assert "does not exist" in result.stderr
        assert self.reloads(nginx) == []

    @pytest.mark.parametrize("bad", ["/srv/a b/current", "/srv/x;y/current", '/srv/"q"/c'])
    def test_refuses_paths_nginx_would_misparse(
        self, tmp_path: Path, nginx: dict[str, Path], bad: str
    ) -> None:
        tree = AppTree(tmp_path / "srv")
        env = {**tree.env("post_symlink"), **self.settings(nginx), "WATCHER_CURRENT": bad}
        result = run_hook("nginx-current-backup", env)
        assert result.returncode == 1
        assert "refusing a root path nginx would misparse" in result.stderr
        assert not (nginx["conf_d"] / "web-root.conf").exists()


class TestRestartService:
    @pytest.fixture
    def fake_bin(self, tmp_path: Path) -> Path:
        """A PATH directory with systemctl and supervisorctl that record their arguments."""
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in ("systemctl", "supervisorctl"):
            write_script(
                bin_dir / tool,
                f"""
echo "{tool} $*" >> "{tmp_path}/calls.log"
exit "${{FAKE_EXIT:-0}}"
""",
            )
        return bin_dir

    def run(self, fake_bin: Path, **env: str) -> subprocess.CompletedProcess[str]:
        path = f"{fake_bin}:{os.environ['PATH']}"
        return run_hook("restart-service", {"PATH": path, "WATCHER_PHASE": "post_symlink", **env})

    def calls(self, fake_bin: Path) -> list[str]:
        log = fake_bin.parent / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def test_systemd_units(self, fake_bin: Path) -> None:
        result = self.run(fake_bin, SERVICE="web.service worker.service")
        assert result.returncode == 0, result.stderr
        assert self.calls(fake_bin) == ["systemctl restart -- web.service worker.service"]

    def test_systemd_reload_action(self, fake_bin: Path) -> None:
        assert self.run(fake_bin, SERVICE="web", ACTION="reload").returncode == 0
        assert self.calls(fake_bin) == ["systemctl reload -- web"]
        result = self.run(fake_bin, SERVICE="web", ACTION="stop")
        assert result.returncode == 1
        assert "ACTION must be" in result.stderr

    def test_supervisor_program(self, fake_bin: Path) -> None:
        result = self.run(fake_bin, PROGRAM="web:*")
        assert result.returncode == 0, result.stderr
        assert self.calls(fake_bin) == ["supervisorctl restart web:*"]

    def test_settings_as_arguments(self, fake_bin: Path) -> None:
        result = run_hook(
            "restart-service",
            {"PATH": f"{fake_bin}:{os.environ['PATH']}"},
            "SERVICE=app.service",
            "ACTION=try-restart",
        )
        assert result.returncode == 0, result.stderr
        assert self.calls(fake_bin) == ["systemctl try-restart -- app.service"]

    def test_failure_is_reported(self, fake_bin: Path) -> None:
        result = self.run(fake_bin, SERVICE="web.service", FAKE_EXIT="1")
        assert result.returncode == 1
        assert "systemctl restart web.service failed" in result.stderr

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({}, "set SERVICE (a systemd unit) or PROGRAM"),
            ({"SERVICE": "a", "PROGRAM": "b"}, "not both"),
            ({"SERVICE": "a", "WATCHER_PHASE": "post_release"}, "meant for post_symlink"),
        ],
    )
    def test_refusals(self, fake_bin: Path, env: dict[str, str], message: str) -> None:
        result = self.run(fake_bin, **env)
        assert result.returncode == 1
        assert message in result.stderr
        assert self.calls(fake_bin) == []


def make_wheel(dest: Path, release: str) -> Path:
    """A minimal pure-Python wheel, so pip installs something without a network."""
    files = {
        "hello_watcher/__init__.py": f"RELEASE = {release!r}\n",
        "hello_watcher-1.0.dist-info/METADATA": (
            "Metadata-Version: 2.1\nName: hello-watcher\nVersion: 1.0\n"
        ),
        "hello_watcher-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append("hello_watcher-1.0.dist-info/RECORD,,")
    files["hello_watcher-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = dest / "hello_watcher-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


class TestPythonVenv:
    def env(self, release_dir: Path) -> dict[str, str]:
        return {
            "WATCHER_PHASE": "post_release",
            "WATCHER_RELEASE_DIR": str(release_dir),
            "PIP_ARGS": "--no-index",
        }

    def test_builds_installs_and_skips_when_unchanged(self, tmp_path: Path) -> None:
        release = tmp_path / "releases" / "r1"
        release.mkdir(parents=True)
        make_wheel(release, "r1")
        (release / "requirements.txt").write_text("./hello_watcher-1.0-py3-none-any.whl\n")

        result = run_hook("python-venv", self.env(release))
        assert result.returncode == 0, result.stdout + result.stderr
        python = release / ".venv" / "bin" / "python"
        out = subprocess.run(
            [
                str(python),
                "-c",
                "import hello_watcher, sys; print(hello_watcher.RELEASE, sys.prefix)",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert out.stdout.split() == ["r1", str(release / ".venv")]
        marker = release / ".venv" / ".watcher-requirements.sha256"
        stamp = marker.stat().st_mtime_ns

        again = run_hook("python-venv", self.env(release))
        assert again.returncode == 0, again.stderr
        assert "up to date" in again.stdout
        assert marker.stat().st_mtime_ns == stamp

        # a crash mid-build leaves no marker: the next run starts over
        marker.unlink()
        (release / ".venv" / "junk").write_text("half-built")
        (release / "requirements.txt").write_text("# nothing any more\n")
        rebuilt = run_hook("python-venv", self.env(release))
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert "lists no requirements" in rebuilt.stdout
        assert not (release / ".venv" / "junk").exists()
        assert marker.exists()
        gone = subprocess.run(
            [str(python), "-c", "import hello_watcher"], capture_output=True, text=True, timeout=30
        )
        assert gone.returncode == 1
        ran = subprocess.run(
            [str(python), "-c", "print('venv ok')"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert ran.stdout == "venv ok\n"

    def test_no_requirements_file_does_nothing(self, tmp_path: Path) -> None:
        result = run_hook("python-venv", self.env(tmp_path))
        assert result.returncode == 0, result.stderr
        assert "nothing to do" in result.stdout
        assert not (tmp_path / ".venv").exists()

    def test_pip_failure_fails_the_hook(self, tmp_path: Path) -> None:
        (tmp_path / "requirements.txt").write_text("package-that-does-not-exist-watcher==1\n")
        result = run_hook("python-venv", self.env(tmp_path))
        assert result.returncode == 1
        assert "pip install -r requirements.txt failed" in result.stderr
        assert not (tmp_path / ".venv" / ".watcher-requirements.sha256").exists()

    def test_refuses_a_live_phase(self, tmp_path: Path) -> None:
        result = run_hook("python-venv", {**self.env(tmp_path), "WATCHER_PHASE": "validate"})
        assert result.returncode == 1
        assert "meant for post_release" in result.stderr


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 answering from a script of (status, body) replies."""

    def __init__(self, replies: list[tuple[int, str]]) -> None:
        self.replies = list(replies)
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                status, body = outer.replies[min(outer.requests, len(outer.replies)) - 1]
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/health"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server() -> Iterator[list[ScriptedServer]]:
    servers: list[ScriptedServer] = []
    yield servers
    for s in servers:
        s.close()


class TestHttpHealthCheck:
    def serve(self, servers: list[ScriptedServer], *replies: tuple[int, str]) -> ScriptedServer:
        server = ScriptedServer(list(replies))
        servers.append(server)
        return server

    def test_healthy_with_the_release_in_the_body(self, http_server: list[ScriptedServer]) -> None:
        server = self.serve(http_server, (200, '{"release": "20240101T000000Z-master-1"}'))
        result = run_hook(
            "http-health-check",
            {
                "HEALTH_URL": server.url,
                "HEALTH_EXPECT_RELEASE": "1",
                "WATCHER_RELEASE": "20240101T000000Z-master-1",
                "WATCHER_PHASE": "validate",
                "http_proxy": "http://127.0.0.1:9/",
                "HTTP_PROXY": "http://127.0.0.1:9/",
            },
        )
        assert result.returncode == 0, result.stderr
        assert f"{server.url} healthy after 1 attempt(s)" in result.stdout

    def test_retries_until_healthy(self, http_server: list[ScriptedServer]) -> None:
        server = self.serve(http_server, (503, "starting"), (503, "starting"), (200, "ok"))
        result = run_hook("http-health-check", {"HEALTH_URL": server.url, "HEALTH_INTERVAL": "0.1"})
        assert result.returncode == 0, result.stderr
        assert "healthy after 3 attempt(s)" in result.stdout
        assert server.requests == 3

    def test_fails_at_the_deadline(self, http_server: list[ScriptedServer]) -> None:
        server = self.serve(http_server, (503, "down"))
        start = time.monotonic()
        result = run_hook(
            "http-health-check",
            {"HEALTH_URL": server.url, "HEALTH_TIMEOUT": "1", "HEALTH_INTERVAL": "0.2"},
        )
        took = time.monotonic() - start
        assert result.returncode == 1
        assert f"FAILED: {server.url} not healthy within 1s" in result.stderr
        assert "last: HTTP 503" in result.stderr
        assert server.requests >= 3
        assert took < 5

    def test_wrong_release_in_the_body_fails(self, http_server: list[ScriptedServer]) -> None:
        server = self.serve(http_server, (200, "release r1"))
        result = run_hook(
            "http-health-check",
            {
                "HEALTH_URL": server.url,
                "HEALTH_TIMEOUT": "0.5",
                "HEALTH_INTERVAL": "0.2",
                "HEALTH_EXPECT_RELEASE": "1",
                "WATCHER_RELEASE": "r2",
            },
        )
        assert result.returncode == 1
        assert "the body does not mention release r2" in result.stderr

    def test_nothing_listening_fails(self, http_server: list[ScriptedServer]) -> None:
        server = self.serve(http_server, (200, "ok"))
        url = server.url
        server.close()
        http_server.clear()
        result = run_hook(
            "http-health-check",
            {},
            f"HEALTH_URL={url}",
            "HEALTH_TIMEOUT=0.5",
            "HEALTH_INTERVAL=0.2",
        )
        assert result.returncode == 1
        assert "no answer" in result.stderr

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["HEALTH_TIMEOUT=soon"], "HEALTH_TIMEOUT must be a number of seconds"),
            (["HEALTH_URL=ftp://x/"], "must be an http:// or https:// URL"),
            (["BOGUS=1"], "unknown argument 'BOGUS=1'"),
            (["HEALTH_EXPECT_RELEASE=1"], "WATCHER_RELEASE is not set"),
        ],
    )
    def test_bad_settings(self, args: list[str], message: str) -> None:
        result = run_hook("http-health-check", {}, *args)
        assert result.returncode == 2
        assert message in result.stderr
