"""Debian's nginx in the foreground on a loopback port, with a config of its own (never the
package's service): the zero-downtime flip benchmark serves a file through `current` with
it, and the proxy test puts it in front of `watcher web`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

from tests.support.procs import die_with_parent

NGINX = "/usr/sbin/nginx"


class NginxFailed(Exception):
    """nginx is missing, exited, or did not listen."""


class Nginx:
    """``server`` (the lines inside ``server { listen ...; }``) on 127.0.0.1:``port``, its
    pid, logs and temporary files in ``work``; ``http``: lines for the ``http`` block."""

    def __init__(self, work: Path, port: int, server: str, http: str = "") -> None:
        self.work = work
        self.port = port
        self.server = server
        self.http = http
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        if not os.access(NGINX, os.X_OK):
            raise NginxFailed(f"{NGINX} is missing: run scripts/install-system-deps")
        self.work.mkdir(parents=True, exist_ok=True)
        w = self.work
        conf = w / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""  # workers write the temp paths
        conf.write_text(
            textwrap.dedent(
                f"""
                {user}
                worker_processes 1;
                pid {w}/nginx.pid;
                error_log {w}/error.log warn;
                events {{ worker_connections 256; }}
                http {{
                    access_log off;
                    client_body_temp_path {w}/body;
                    proxy_temp_path {w}/proxy;
                    fastcgi_temp_path {w}/fastcgi;
                    uwsgi_temp_path {w}/uwsgi;
                    scgi_temp_path {w}/scgi;
                """
            )
            + self.http
            + f"\nserver {{\nlisten 127.0.0.1:{self.port};\n{self.server}\n}}\n}}\n"
        )
        self.proc = subprocess.Popen(
            [NGINX, "-e", str(w / "error.log"), "-p", str(w), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise NginxFailed(f"nginx exited {self.proc.returncode}: {err.strip()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NginxFailed(f"nginx did not listen within {timeout:g} s")

    def error_log(self) -> str:
        path = self.work / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
