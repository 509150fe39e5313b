"""The moto S3 test server: objects round-trip through boto3 with path-style addressing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.s3server import S3Server, s3_client
from watcher.config import S3Settings

REPO = Path(__file__).resolve().parents[2]


class TestS3Server:
    def test_put_then_get_an_object_with_path_style_addressing(
        self, s3_server: S3Server, s3_settings: S3Settings
    ) -> None:
        client = s3_client(s3_server.endpoint_url)
        key = f"{s3_settings.prefix}/web/master-15eb13af.tar.gz"
        body = b"\x1f\x8b" + bytes(range(256)) * 64
        client.put_object(Bucket=s3_settings.bucket, Key=key, Body=body, Metadata={"sha256": "abc"})

        got = client.get_object(Bucket=s3_settings.bucket, Key=key)

        assert got["Body"].read() == body
        assert got["Metadata"] == {"sha256": "abc"}
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": s3_settings.bucket, "Key": key}
        )
        assert url.startswith(f"{s3_server.endpoint_url}/{s3_settings.bucket}/{key}?")

    def test_each_s3_settings_gets_its_own_empty_bucket(
        self, s3_server: S3Server, s3_settings: S3Settings
    ) -> None:
        client = s3_client(s3_server.endpoint_url)
        listed = client.list_objects_v2(Bucket=s3_settings.bucket)
        assert listed["KeyCount"] == 0
        assert s3_settings.endpoint_url == s3_server.endpoint_url
        assert s3_settings.prefix == "artifacts"

    def test_server_restart_keeps_its_endpoint_and_serves_again(self, s3_server: S3Server) -> None:
        endpoint = s3_server.endpoint_url
        s3_server.stop()
        try:
            with pytest.raises(OSError):
                urllib.request.urlopen(endpoint + "/", timeout=2)  # noqa: S310
        finally:
            s3_server.start()

        assert s3_server.endpoint_url == endpoint
        client = s3_client(endpoint)
        client.create_bucket(Bucket="after-restart")
        client.put_object(Bucket="after-restart", Key="k", Body=b"v")
        assert client.get_object(Bucket="after-restart", Key="k")["Body"].read() == b"v"


RUNNER = """
import sys, time
from pathlib import Path
from tests.support.runner import stop_on_signals
from tests.support.s3server import S3Server
if sys.argv[2] == "stop":
    stop_on_signals()
server = S3Server(Path(sys.argv[1]))
try:
    server.start()
    print(server.proc.pid, flush=True)
    time.sleep(60)
finally:
    print("cleaned up", flush=True)
"""


class TestRunnerStoppedBySignal:
    """A bench or fault campaign ended by `timeout` (SIGTERM) or a closed terminal
    (SIGHUP) stops the servers it started, as on Ctrl-C."""

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
    def test_its_s3_server_is_stopped(self, tmp_path: Path, signum: signal.Signals) -> None:
        moto = self.run_and_signal(tmp_path, "stop", signum)
        assert moto.poll_gone(), f"moto_server {moto.pid} outlived the runner"

    @pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
    def test_a_runner_killed_without_a_handler_leaves_no_server(
        self, tmp_path: Path, signum: signal.Signals
    ) -> None:
        # No handler can run on SIGKILL (a `make demo` or pytest killed hard): the kernel's
        # parent-death signal stops the server, which runs in its own session.
        moto = self.run_and_signal(tmp_path, "default", signum)
        try:
            assert moto.poll_gone(), f"moto_server {moto.pid} outlived the killed runner"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(moto.pid, signal.SIGKILL)

    @staticmethod
    def run_and_signal(tmp_path: Path, mode: str, signum: signal.Signals) -> _Pid:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(tmp_path / "moto.log"), mode],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            pid = _Pid(int(proc.stdout.readline()))
            proc.send_signal(signum)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if mode == "stop":
            assert "cleaned up" in out and proc.returncode != 0, (proc.returncode, out)
        else:
            assert proc.returncode == -signum, proc.returncode
        return pid


class _Pid:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll_gone(self, timeout: float = 10.0) -> bool:
        """Whether the process is gone (or a zombie) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                return True
            if state == "Z":
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
