"""What the daemon loads before it needs it: boto3/botocore only with the first S3 call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Fake credentials, and no instance metadata lookup: the request must fail fast on its own.
ENV = {
    **os.environ,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def full_modules_after(code: str) -> set[str]:
    """Every module (dotted names included) a fresh interpreter has loaded after ``code``."""
    script = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=ENV
    ).stdout
    return set(out.split())


def modules_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter has loaded after running ``code``."""
    return {name.split(".")[0] for name in full_modules_after(code)}


class TestBoto3OnlyWhenNeeded:
    def test_daemon_and_an_s3_store_without_a_request(self) -> None:
        loaded = modules_after(
            "import watcher.daemon, watcher.daemon_cli, watcher.artifacts, watcher.publish\n"
            "from watcher.config import S3Settings\n"
            "from watcher.s3 import S3Store\n"
            "store = S3Store(S3Settings(bucket='artifacts', endpoint_url='http://127.0.0.1:1'))\n"
            "store.key_for('web', 'main-15eb13af', 'tar.gz')\n"
        )
        assert "watcher" in loaded
        assert loaded.isdisjoint({"boto3", "botocore", "s3transfer"})

    def test_the_first_request_loads_it(self) -> None:
        # A request to a port nothing listens on: it fails, but boto3 had to be loaded.
        loaded = modules_after(
            "from watcher.config import S3Settings\n"
            "from watcher.errors import S3Error\n"
            "from watcher.s3 import S3Store\n"
            "store = S3Store(\n"
            "    S3Settings(bucket='artifacts', endpoint_url='http://127.0.0.1:1'),\n"
            "    connect_timeout=0.2, retry_deadline=0.1,\n"
            ")\n"
            "try:\n"
            "    store.head('web/x.tar.gz')\n"
            "except S3Error:\n"
            "    pass\n"
            "else:\n"
            "    raise SystemExit('expected an S3Error')\n"
        )
        assert {"boto3", "botocore"} <= loaded


class TestReadOnlyCommandsLoadNoHttpStack:
    def test_status_fleet_path_loads_neither_requests_nor_py_consul(self) -> None:
        # `watcherctl status --fleet` reads KV through the transport: py-consul (which
        # imports requests) and tenacity (only after a failed attempt) stay unloaded.
        loaded = modules_after(
            "import watcher.ctl, watcher.ctl_fleet\n"
            "from watcher.config import ConsulSettings\n"
            "from watcher.consul_api import ConsulClient\n"
            "ConsulClient(ConsulSettings(address='127.0.0.1:1'))\n"
        )
        assert "watcher" in loaded
        assert loaded.isdisjoint({"requests", "urllib3", "consul", "tenacity", "boto3"})

    def test_plain_http_loads_no_ssl_and_no_email_parser(self) -> None:
        # A request over plain HTTP (here refused) needs neither ssl (~7-12 ms of a start
        # here) nor http.client and its email parser: the transport frames answers itself.
        request = (
            "from watcher.consul_http import Transport, TransportError\n"
            "try:\n"
            "    Transport('127.0.0.1', 1).request('GET', '/', connect_timeout=1, read_timeout=1)\n"
            "except TransportError:\n"
            "    pass\n"
        )
        loaded = full_modules_after(request)
        assert "watcher.consul_http" in loaded
        assert loaded.isdisjoint({"ssl", "http.client", "email.parser"})
        tls = full_modules_after(
            request.replace("Transport('127.0.0.1', 1)", "Transport('127.0.0.1', 1, 'https')")
        )
        assert "ssl" in tls

    def test_a_write_loads_py_consul_on_first_use(self) -> None:
        loaded = modules_after(
            "from watcher.config import ConsulSettings\n"
            "from watcher.consul_api import ConsulClient\n"
            "ConsulClient(ConsulSettings(address='127.0.0.1:1'))._consul\n"
        )
        assert "consul" in loaded


class TestFleetCommandsLoadNoHostCode:
    def test_deploy_and_status_fleet_load_no_release_engine(self) -> None:
        # What `watcherctl deploy` and `status --fleet` import before they run: the
        # release engine and its archive code are this host's status and rollback --local
        # only; `logging` and `secrets` were loaded for a few constants and one token.
        loaded = full_modules_after(
            "import watcher.ctl, watcher.ctl_fleet\n"
            "from watcher.barrier import new_deploy_id\n"
            "from watcher.log import configure_logging, get_logger\n"
            "configure_logging(level='error')  # as watcherctl does\n"
            "assert len(new_deploy_id()) == 23\n"
            "get_logger().info('dropped', x=1)\n"
        )
        assert "watcher.ctl_fleet" in loaded
        absent = {"watcher.releases", "watcher.archive", "tarfile", "logging", "secrets"}
        assert loaded.isdisjoint(absent), sorted(loaded & absent)

    def test_local_status_loads_it_when_it_reads_the_disk(self, tmp_path: Path) -> None:
        loaded = full_modules_after(
            "from watcher.config import AppConfig\n"
            "from watcher.ctl_fleet import _local_app\n"
            f"_local_app(AppConfig(name='web', root={str(tmp_path)!r}), {{}})\n"
        )
        assert "watcher.releases" in loaded
