"""A real `watcher web` process for tests: started on a free loopback port, stopped after."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.fleet import BIN, Fleet
from tests.support.procs import die_with_parent
from tests.support.s3server import free_port


class WebServer:
    """`watcher web -c CONFIG --listen HOST:PORT` as a subprocess."""

    def __init__(
        self, config: Path, log_path: Path, host: str = "127.0.0.1", args: tuple[str, ...] = ()
    ) -> None:
        self.config = config
        self.args = args  # more of `watcher web`'s options
        self.log_path = log_path
        self.host = host
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until it serves. Ready means *this* process said it serves
        (after binding): another process on the same port would answer /healthz too."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env["PYTHONUNBUFFERED"] = "1"
        serving = f"watcher web: serving {self.url}/".encode()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "watcher"),
                    "--log-format",
                    "json",
                    "web",
                    "-c",
                    str(self.config),
                    "--listen",
                    f"{self.host}:{self.port}",
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"watcher web exited {self.proc.returncode}:\n{self.log()}")
            try:
                ours = serving in self.log_path.read_bytes()[offset:]
                if ours and httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except (OSError, httpx.HTTPError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"watcher web did not answer in {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def client(self, token: str | None = None, **headers: str) -> httpx.Client:
        all_headers = dict(headers)
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.url, headers=all_headers, timeout=30)

    def get(self, path: str, token: str | None = None) -> httpx.Response:
        with self.client(token) as c:
            return c.get(path)

    def post(
        self, path: str, body: Any = None, token: str | None = None, **kw: Any
    ) -> httpx.Response:
        with self.client(token) as c:
            if body is None and "content" not in kw:
                return c.post(path, **kw)
            if "content" in kw:
                return c.post(path, **kw)
            return c.post(path, json=body)


def reader_web(fleet: Fleet, token: str, workdir: Path, args: tuple[str, ...] = ()) -> WebServer:
    """A `watcher web` (not started) with the config of ``fleet``'s first host, reading
    with ``token``; its config and log in ``workdir``; ``args``: more options."""
    config = fleet.config_for(fleet.watchers[0])
    config["consul"]["token"] = token
    (workdir / "web.yaml").write_text(yaml.safe_dump(config))
    return WebServer(workdir / "web.yaml", workdir / "web.log", args=args)
