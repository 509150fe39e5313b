"""`watcher web` as a command: its options, and that the daemon never loads the web stack."""

from __future__ import annotations

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

    def test_bad_config_exits_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = tmp_path / "w.yaml"
        config.write_text(CONFIG.replace("{root: /srv}", "{root: /srv, webhook: {url: 'ftp://x'}}"))
        assert main(["web", "-c", str(config)]) == 2
        assert "apps.web.webhook.url" in capsys.readouterr().err


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
