"""Logging set-up: JSON lines for journald by default, a console format on a TTY."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from watcher.log import configure_logging, get_logger


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


class TestJSON:
    def test_json_lines_by_default_on_a_non_tty(self) -> None:
        out = io.StringIO()
        configure_logging(stream=out)
        get_logger(app="web").info("release_flipped", release="20260102T030405Z-master-15eb13af")
        [line] = lines(out)
        doc = json.loads(line)
        assert doc["event"] == "release_flipped"
        assert doc["app"] == "web"
        assert doc["release"] == "20260102T030405Z-master-15eb13af"
        assert doc["level"] == "info"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", doc["timestamp"])

    def test_one_line_per_event_even_with_newlines_and_odd_values(self) -> None:
        out = io.StringIO()
        configure_logging(stream=out, json=True)
        log = get_logger(app="web")
        log.warning("hook_failed", output_tail="line 1\nline 2", path=Path("/srv"), n=3)
        log.error("second_event")
        first, second = (json.loads(line) for line in lines(out))
        assert first["output_tail"] == "line 1\nline 2"
        assert first["path"] in ("/srv", "PosixPath('/srv')")
        assert (first["level"], second["level"]) == ("warning", "error")

    def test_each_line_is_one_write(self) -> None:
        """Under the unit (PYTHONUNBUFFERED) each write is a system call: a line and its
        newline go out together, one call a line."""
        writes: list[str] = []

        class Unbuffered(io.StringIO):
            def write(self, text: str) -> int:
                writes.append(text)
                return super().write(text)

        out = Unbuffered()
        configure_logging(stream=out, json=True)
        log = get_logger(app="web")
        log.info("first")
        log.warning("second", n=2)
        assert len(writes) == 2 and all(w.endswith("}\n") for w in writes), writes
        assert [json.loads(w)["event"] for w in writes] == ["first", "second"]

    def test_exceptions_are_rendered_into_the_line(self) -> None:
        out = io.StringIO()
        configure_logging(stream=out, json=True)
        try:
            raise RuntimeError("disk on fire")
        except RuntimeError:
            get_logger().exception("staging_failed", app="web")
        [line] = lines(out)
        doc = json.loads(line)
        assert doc["event"] == "staging_failed"
        assert "RuntimeError: disk on fire" in doc["exception"]

    def test_context_variables_are_merged(self) -> None:
        out = io.StringIO()
        configure_logging(stream=out, json=True)
        structlog.contextvars.bind_contextvars(deploy_id="d-1")
        get_logger(app="web").info("node_ready")
        assert json.loads(lines(out)[0])["deploy_id"] == "d-1"

    def test_a_final_configuration_binds_each_logger_once(self) -> None:
        """The daemon's: context variables still reach every line, and a later configuration
        no longer reaches a logger already used (it was bound once, not on every call)."""
        out = io.StringIO()
        configure_logging(stream=out, json=True, final=True)
        log = get_logger(app="web")
        log.info("first")
        structlog.contextvars.bind_contextvars(deploy_id="d-2")
        log.info("second")
        other = io.StringIO()
        configure_logging(stream=other, json=True)
        log.info("third")
        docs = [json.loads(line) for line in lines(out)]
        assert [d["event"] for d in docs] == ["first", "second", "third"]
        assert "deploy_id" not in docs[0] and docs[1]["deploy_id"] == "d-2"
        assert other.getvalue() == ""

    def test_default_stream_is_stdout(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging()
        get_logger().info("daemon_started", version="0.1.0")
        assert json.loads(capsys.readouterr().out)["event"] == "daemon_started"

    def test_configuring_again_replaces_the_set_up(self) -> None:
        first, second = io.StringIO(), io.StringIO()
        configure_logging(stream=first, json=True)
        configure_logging(stream=second, json=True)
        get_logger().info("once")
        assert first.getvalue() == ""
        assert len(lines(second)) == 1


class TestConsole:
    def test_console_when_asked(self) -> None:
        out = io.StringIO()
        configure_logging(stream=out, json=False)
        get_logger(app="web").info("release_flipped", release="r1")
        [line] = lines(out)
        assert "release_flipped" in line
        assert "app=web" in line and "release=r1" in line
        assert "[info" in line
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
        assert "\x1b[" not in line  # no colour codes in a file or the journal

    def test_console_by_default_on_a_tty(self) -> None:
        out = TTY()
        configure_logging(stream=out)
        get_logger().info("daemon_started", node="host-1")
        assert not out.getvalue().startswith("{")
        assert "daemon_started" in out.getvalue() and "node=host-1" in out.getvalue()

    def test_json_forced_on_a_tty(self) -> None:
        out = TTY()
        configure_logging(stream=out, json=True)
        get_logger().info("daemon_started")
        assert json.loads(out.getvalue())["event"] == "daemon_started"


class TestLevels:
    def test_debug_is_hidden_at_info(self) -> None:
        out = io.StringIO()
        configure_logging(stream=out, json=True)
        log = get_logger()
        log.debug("noise")
        log.info("signal")
        assert [json.loads(line)["event"] for line in lines(out)] == ["signal"]

    def test_debug_level_shows_debug(self) -> None:
        out = io.StringIO()
        configure_logging(stream=out, json=True, level="debug")
        get_logger().debug("noise")
        assert json.loads(lines(out)[0])["level"] == "debug"

    def test_warning_level_hides_info(self) -> None:
        out = io.StringIO()
        configure_logging(stream=out, json=True, level="warning")
        log = get_logger()
        log.info("quiet")
        log.warning("loud")
        assert [json.loads(line)["event"] for line in lines(out)] == ["loud"]


class TestLoadedOnFirstUse:
    def test_configuration_waits_for_the_first_log_call(self) -> None:
        # A fresh process: nothing has imported structlog yet.
        code = (
            "import io, json, sys\n"
            "from watcher.log import configure_logging, get_logger\n"
            "out = io.StringIO()\n"
            "configure_logging(level='warning', json=True, stream=out)\n"
            "log = get_logger(component='x')\n"
            "log.info('dropped_below_level')\n"
            "log.debug('dropped_too', n=2)\n"
            "print('structlog' in sys.modules)\n"
            "log.warning('kept', n=1)\n"
            "print('structlog' in sys.modules)\n"
            "print(out.getvalue().strip())\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        before, after, line = result.stdout.splitlines()
        # The call below the level did not load structlog; the one above it did.
        assert (before, after) == ("False", "True")
        doc = json.loads(line)
        assert (doc["event"], doc["level"], doc["component"], doc["n"]) == (
            "kept",
            "warning",
            "x",
            1,
        )
