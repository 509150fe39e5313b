"""SystemdNotifier against a real AF_UNIX datagram socket, as systemd would listen on it."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from watcher.notify import SystemdNotifier


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        bind_to: str | bytes = address
        if address.startswith("@"):
            bind_to = b"\0" + address[1:].encode()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(2.0)

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def nothing_pending(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    """A listening notify socket: a filesystem path, or an abstract ``@name`` socket."""
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@watcher-test-{uuid.uuid4().hex}"
    sock = Listener(address)
    yield sock
    sock.close()


class TestSystemdNotifier:
    def test_ready_stopping_watchdog_status(self, listener: Listener) -> None:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value})
        assert notifier.enabled
        assert notifier.ready(status="serving 2 apps")
        assert listener.receive() == {"READY": "1", "STATUS": "serving 2 apps"}
        assert notifier.watchdog()
        assert listener.receive() == {"WATCHDOG": "1"}
        assert notifier.status("deploy web 20240101T000000Z-master-15eb13af: prepare")
        assert listener.receive() == {
            "STATUS": "deploy web 20240101T000000Z-master-15eb13af: prepare"
        }
        assert notifier.stopping()
        assert listener.receive() == {"STOPPING": "1"}
        notifier.close()

    def test_reloading_carries_monotonic_time(self, listener: Listener) -> None:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value})
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = listener.receive()
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= after

    def test_status_newlines_cannot_inject_fields(self, listener: Listener) -> None:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value})
        notifier.status("line one\nREADY=1")
        assert listener.receive() == {"STATUS": "line one READY=1"}

    def test_extend_timeout(self, listener: Listener) -> None:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value})
        notifier.extend_timeout(90.5)
        assert listener.receive() == {"EXTEND_TIMEOUT_USEC": "90500000"}

    def test_unset_environment_hides_the_socket_from_children(self, listener: Listener) -> None:
        env = {
            "NOTIFY_SOCKET": listener.env_value,
            "WATCHDOG_USEC": "60000000",
            "WATCHDOG_PID": str(os.getpid()),
            "PATH": "/usr/bin",
        }
        notifier = SystemdNotifier(env, unset_environment=True)
        assert env == {"PATH": "/usr/bin"}
        assert notifier.watchdog_interval() == 60.0
        assert notifier.ready()
        assert listener.receive() == {"READY": "1"}


class TestWithoutSystemd:
    def test_no_socket_is_a_silent_no_op(self) -> None:
        notifier = SystemdNotifier({})
        assert not notifier.enabled
        with capture_logs() as logs:
            assert notifier.ready() is False
            assert notifier.watchdog() is False
            assert notifier.stopping() is False
        assert logs == []
        assert notifier.watchdog_interval() is None

    def test_send_failure_is_logged_not_raised(self, tmp_path: Path) -> None:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
        with capture_logs() as logs:
            assert notifier.ready() is False
        assert [e["event"] for e in logs] == ["sd_notify_failed"]
        assert logs[0]["socket"] == str(tmp_path / "gone.sock")
        assert logs[0]["message"] == "READY=1"

    def test_a_listener_that_never_drains_does_not_block(self, tmp_path: Path) -> None:
        stuck = Listener(str(tmp_path / "stuck.sock"))  # never reads
        notifier = SystemdNotifier({"NOTIFY_SOCKET": stuck.env_value})
        try:
            started = time.monotonic()
            with capture_logs() as logs:
                results = [notifier.watchdog() for _ in range(2000)]
            assert time.monotonic() - started < 5
            assert results[0] is True and results[-1] is False  # the queue filled up
            assert any(e["event"] == "sd_notify_failed" for e in logs)
        finally:
            stuck.close()

    def test_recovers_when_the_listener_comes_back(self, tmp_path: Path) -> None:
        path = tmp_path / "late.sock"
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path)})
        with capture_logs():
            assert notifier.watchdog() is False
        late = Listener(str(path))
        try:
            assert notifier.watchdog() is True
            assert late.receive() == {"WATCHDOG": "1"}
            assert late.nothing_pending()
        finally:
            late.close()

    def test_unsupported_socket_kind_is_ignored(self) -> None:
        with capture_logs() as logs:
            notifier = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
        assert not notifier.enabled
        assert [e["event"] for e in logs] == ["sd_notify_unsupported_socket"]


class TestWatchdogInterval:
    @pytest.mark.parametrize(
        ("usec", "pid", "expected"),
        [
            ("60000000", None, 60.0),
            ("30000000", "self", 30.0),
            ("30000000", "other", None),
            ("0", None, None),
            ("soon", None, None),
            (None, None, None),
            ("5000000", "notapid", None),
        ],
    )
    def test_from_environment(
        self, usec: str | None, pid: str | None, expected: float | None
    ) -> None:
        env: dict[str, str] = {}
        if usec is not None:
            env["WATCHDOG_USEC"] = usec
        if pid == "self":
            env["WATCHDOG_PID"] = str(os.getpid())
        elif pid == "other":
            env["WATCHDOG_PID"] = str(os.getpid() + 1)
        elif pid is not None:
            env["WATCHDOG_PID"] = pid
        with capture_logs():
            assert SystemdNotifier(env).watchdog_interval() == expected
