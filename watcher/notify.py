"""The sd_notify protocol: tell systemd READY, STOPPING, WATCHDOG, STATUS and RELOADING."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import MutableMapping

from watcher.log import get_logger

#: The variables systemd hands to a Type=notify service; hooks must not inherit them.
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SystemdNotifier:
    """Tells systemd how the daemon is doing; a no-op when $NOTIFY_SOCKET is not set.

    Sending never raises: a lost notification is logged once per failure and the daemon goes
    on (systemd's watchdog is what catches a daemon that really stopped talking).

    ``unset_environment=True`` removes NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from
    ``env`` after reading them (like ``sd_notify(unset_environment=1)``), so hooks and other
    children never talk to systemd on the daemon's behalf.
    """

    def __init__(
        self,
        env: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog = _watchdog_seconds(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        if unset_environment:
            for name in NOTIFY_ENV_VARS:
                env.pop(name, None)

    @property
    def enabled(self) -> bool:
        """True when systemd (or a test) listens on $NOTIFY_SOCKET."""
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Start-up finished (or a reload finished): ``READY=1``."""
        return self._send("READY=1", status)

    def stopping(self, status: str | None = None) -> bool:
        """Shutting down: ``STOPPING=1``."""
        return self._send("STOPPING=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """Reloading the configuration: ``RELOADING=1`` + ``MONOTONIC_USEC``; then ready()."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}", status)

    def watchdog(self) -> bool:
        """Keep-alive ping: ``WATCHDOG=1``; send at least every ``watchdog_interval() / 2``."""
        return self._send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``: ``STATUS=...``."""
        return self._send(None, text)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (``EXTEND_TIMEOUT_USEC``), e.g. a hook in flight."""
        return self._send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when systemd does not watch this process."""
        return self._watchdog

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send(self, fields: str | None, status: str | None = None) -> bool:
        if self._address is None:
            return False
        lines = [fields] if fields else []
        if status is not None:
            # One assignment per line: a newline in the text would start a bogus field.
            lines.append("STATUS=" + " ".join(status.splitlines()))
        message = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    # Non-blocking: a listener that does not drain its queue must never
                    # stall the daemon's loop (a full queue drops this one message).
                    self._sock = socket.socket(
                        socket.AF_UNIX,
                        socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                    )
                self._sock.sendto(message, self._address)
            except OSError as exc:
                get_logger(component="notify").warning(
                    "sd_notify_failed",
                    socket=_show_address(self._address),
                    message=message.decode("utf-8", "replace").split("\n", 1)[0],
                    error=exc.strerror or str(exc),
                )
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                return False
        return True


def _socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET: a path, or ``@name`` for an abstract socket; anything else is ignored."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value:
        get_logger(component="notify").warning("sd_notify_unsupported_socket", socket=value)
    return None


def _watchdog_seconds(usec: str | None, pid: str | None) -> float | None:
    """WATCHDOG_USEC in seconds, when set, positive, and WATCHDOG_PID is unset or this process."""
    if not usec:
        return None
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            get_logger(component="notify").warning("sd_notify_bad_watchdog_pid", value=pid)
            return None
    try:
        value = int(usec)
    except ValueError:
        get_logger(component="notify").warning("sd_notify_bad_watchdog_usec", value=usec)
        return None
    return value / 1_000_000 if value > 0 else None


def _show_address(address: str | bytes) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode("utf-8", "replace")
    return address
