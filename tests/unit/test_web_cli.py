"""`watcher web` as a command: its options, and that the daemon never loads the web stack."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from watcher.daemon_cli import main
from watcher.web.server import parse_listen

CONFIG = """\
consul: {address: "127.0.0.1:1"}
s3: {bucket: b}
apps:
  web: {root: /srv}
"""


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """main() points structlog at this test's captured stdout; undo that afterwards."""
    yield
    structlog.reset_defaults()


class TestListen:
    def test_host_and_port(self) -> None:
        assert parse_listen("127.0.0.1:8710") == ("127.0.0.1", 8710)
        assert parse_listen("[::1]:80") == ("::1", 80)

    @pytest.mark.parametrize("bad", ["8710", "host:", ":80", "h:0", "h:70000", "h:http"])
    def test_bad_values_say_what_is_expected(self, bad: str) -> None:
        with pytest.raises(ValueError, match="--listen must be HOST:PORT"):
            parse_listen(bad)

    def test_bad_listen_exits_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = tmp_path / "w.yaml"
        config.write_text(CONFIG)
        assert main(["web", "-c", str(config), "--listen", "nope"]) == 2
        assert "--listen must be HOST:PORT" in capsys.readouterr().err

    def test_a_bad_root_path_exits_2_saying_why(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = tmp_path / "w.yaml"
        config.write_text(CONFIG)
        assert main(["web", "-c", str(config), "--root-path", "watcher"]) == 2
        assert capsys.readouterr().err == (
            "watcher web: error: --root-path: 'watcher' is not a URL path like /watcher or "
            "/ops/deploys (letters, digits, '.', '_', '~' and '-' between slashes, no '.' or "
            "'..' part)\n"
        )

    def test_bad_config_exits_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = tmp_path / "w.yaml"
        config.write_text(CONFIG.replace("{root: /srv}", "{root: /srv, webhook: {url: 'ftp://x'}}"))
        assert main(["web", "-c", str(config)]) == 2
        assert "apps.web.webhook.url" in capsys.readouterr().err


class TestCannotListen:
    """A port in use or an address not on this host: one line saying so, exit 2 (as
    `watcher run` with its daemon.listen), and never "serving" first."""

    @pytest.fixture
    def config(self, tmp_path: Path) -> str:
        path = tmp_path / "w.yaml"
        path.write_text(CONFIG)
        return str(path)

    def test_a_port_in_use(self, config: str, capsys: pytest.CaptureFixture[str]) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            listen = f"127.0.0.1:{taken.getsockname()[1]}"
            assert main(["web", "-c", config, "--listen", listen]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"watcher web: error: cannot listen on {listen}: address already in use "
            "(choose another with --listen)\n"
        )

    def test_an_address_not_on_this_host(
        self, config: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["web", "-c", config, "--listen", "192.0.2.1:8719"]) == 2  # TEST-NET-1
        err = capsys.readouterr().err
        assert err.startswith("watcher web: error: cannot listen on 192.0.2.1:8719: "), err
        assert "serving" not in err and err.count("\n") == 1, err

    def test_the_bound_socket_is_the_one_served(self) -> None:
        from watcher.web.server import bind_listen

        sockets = bind_listen("127.0.0.1", 0)
        try:
            assert len(sockets) == 1
            port = sockets[0].getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass  # it listens already: nothing else can take the port meanwhile
        finally:
            for sock in sockets:
                sock.close()


def test_the_daemon_does_not_import_the_web_stack() -> None:
    code = (
        "import sys, watcher.daemon, watcher.daemon_cli, watcher.agent, watcher.ctl_fleet;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'starlette', 'uvicorn', 'jinja2')"
        " or m.startswith('watcher.web.') or m == 'watcher.web');"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class TestTheTestsOwnServer:
    """tests/support/web.py (the demo's and the integration tests' `watcher web`) must not
    take another server on its port for its own: the demo printed another fleet's page as
    its own when two demos started at once."""

    def test_another_server_on_the_port_is_not_taken_for_it(self, tmp_path: Path) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from threading import Thread

        from tests.support.web import WebServer

        class Healthy(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        impostor = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
        Thread(target=impostor.serve_forever, daemon=True).start()
        config = tmp_path / "w.yaml"
        config.write_text(CONFIG)
        server = WebServer(config, tmp_path / "web.log")
        server.port = impostor.server_address[1]
        server.url = f"http://127.0.0.1:{server.port}"
        try:
            with pytest.raises(AssertionError, match="address already in use"):
                server.start(timeout=20)
        finally:
            server.stop()
            impostor.shutdown()
            impostor.server_close()
