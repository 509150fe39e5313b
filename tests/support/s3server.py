"""A real S3-compatible server for tests: moto's server mode as a separate process on loopback."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.procs import die_with_parent

START_TIMEOUT = 30.0

_LIVE: set[subprocess.Popen[bytes]] = set()


class S3ServerError(RuntimeError):
    """The S3 test server could not be started."""


def find_moto_server() -> str:
    """``moto_server`` next to this Python (the virtualenv), else on PATH."""
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("moto_server")
    if found:
        return found
    raise S3ServerError(
        f"moto_server not found next to {sys.executable} nor on PATH; "
        "install the test extras: .venv/bin/pip install -e '.[test]'"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` now (the tests' servers, nginx, the bench)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _kill_everything() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


atexit.register(_kill_everything)


class S3Server:
    """``moto_server -H host -p port``; keeps its port across ``stop()``/``start()``.

    moto keeps everything in memory: a restart starts with no buckets.
    """

    def __init__(
        self,
        log_path: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        moto_bin: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.moto_bin = moto_bin or find_moto_server()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers HTTP."""
        if self.running:
            raise S3ServerError(f"moto_server already running on {self.endpoint_url}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.moto_bin, "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        _LIVE.add(self.proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None:
                raise S3ServerError(
                    f"moto_server exited with {self.proc.returncode}; log {self.log_path}:\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise S3ServerError(
                    f"moto_server did not answer on {self.endpoint_url} within "
                    f"{START_TIMEOUT:.0f}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=2):  # noqa: S310
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is up
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and wait until it exited (its port is free again)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _LIVE.discard(proc)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def s3_client(endpoint_url: str) -> Any:
    """A boto3 S3 client for the test server (path-style addressing, fake credentials)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}),
    )
