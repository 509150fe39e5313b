"""Test infrastructure fixtures: the Consul binary, a real Consul cluster, a real S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import (
    DEFAULT_LOOPBACK,
    LOOPBACK_RE,
    ClusterSpec,
    ConsulCluster,
    start_cluster,
)
from tests.support.s3server import S3Server, s3_client
from watcher import log as watcher_log
from watcher.config import S3Settings

REPO = Path(__file__).resolve().parent.parent
INSTALL_CONSUL = REPO / "scripts" / "install-consul"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Each test starts with structlog's defaults: a command run in-process by an earlier
    test (watcherctl logs at "error") filtered the warnings a later test's
    ``capture_logs`` looks for (a run of test_web_api.py, then test_barrier_store.py)."""
    # Set up before the test (a module's fixtures, torn down after the last test's own,
    # may run commands too); watcher.log holds a configuration back until structlog is
    # first used and drops calls below its level meanwhile: that too.
    watcher_log._pending = None
    if (structlog := sys.modules.get("structlog")) is not None:
        structlog.reset_defaults()
    yield


@pytest.fixture(scope="session")
def consul_bin() -> str:
    """Path of a Consul v1.22.7 binary: $CONSUL_BIN, else what scripts/install-consul prints."""
    path = os.environ.get("CONSUL_BIN")
    if path:
        if not os.access(path, os.X_OK):
            pytest.fail(f"CONSUL_BIN={path} is not an executable file", pytrace=False)
        return path
    result = subprocess.run(
        [str(INSTALL_CONSUL)], capture_output=True, text=True, check=False, timeout=1800
    )
    if result.returncode != 0:
        pytest.fail(
            f"scripts/install-consul failed ({result.returncode}): {result.stderr.strip()}",
            pytrace=False,
        )
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def loopback_base() -> str:
    """The first three octets of the cluster's addresses ($WATCHER_TEST_LOOPBACK, by
    default 127.0.20: not 127.0.0, whose server would answer on 127.0.0.1:8500, Consul's
    default address, which unit tests running beside it in another worker use as "no
    agent here", and where a developer's own agent may listen). Each pytest-xdist worker
    takes its own: worker N adds N to the second octet (127.0.7 is worker 0's, 127.1.7
    worker 1's), so two workers' clusters never share an address."""
    base = os.environ.get("WATCHER_TEST_LOOPBACK", DEFAULT_LOOPBACK["test"])
    if not LOOPBACK_RE.fullmatch(base) or any(int(o) > 255 for o in base.split(".")):
        pytest.fail(f'WATCHER_TEST_LOOPBACK must look like "127.0.0", got "{base}"', pytrace=False)
    return worker_loopback(base, os.environ.get("PYTEST_XDIST_WORKER", ""))


def worker_loopback(base: str, worker: str) -> str:
    """``base`` for the pytest-xdist worker named ``worker`` ("gw3"; "" without xdist)."""
    if not worker:
        return base
    _, second, third = base.split(".")
    octet = int(second) + int(worker.removeprefix("gw"))
    if octet > 255:
        pytest.fail(
            f"WATCHER_TEST_LOOPBACK={base} leaves no address for worker {worker} "
            "(it adds its number to the second octet): use a lower one",
            pytrace=False,
        )
    return f"127.{octet}.{third}"


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest,
    consul_bin: str,
    loopback_base: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ConsulCluster]:
    """A running cluster shaped by the module's ``CLUSTER = ClusterSpec(...)``; torn down after."""
    spec: ClusterSpec = getattr(request.module, "CLUSTER", ClusterSpec())
    workdir = tmp_path_factory.mktemp("consul-" + request.module.__name__.rsplit(".", 1)[-1])
    running = start_cluster(spec, workdir, consul_bin, loopback_base)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto_server on a free port of 127.0.0.1, with fake AWS credentials in the environment."""
    saved = {name: os.environ.get(name) for name in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_settings(s3_server: S3Server) -> S3Settings:
    """S3Settings for a fresh, empty bucket on the test server (prefix "artifacts")."""
    if not s3_server.running:
        s3_server.start()
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3_client(s3_server.endpoint_url).create_bucket(Bucket=bucket)
    return S3Settings(
        bucket=bucket, prefix="artifacts", region="us-east-1", endpoint_url=s3_server.endpoint_url
    )


_FUZZ_INPUTS: Counter[str] = Counter()
_FUZZ_PROFILES: set[str] = set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Sum what tests/unit/test_fuzz_parsers.py recorded of its inputs (from every worker)."""
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == "fuzz_inputs" and isinstance(value, dict):
            counts = dict(value)
            _FUZZ_PROFILES.add(str(counts.pop("profile", "?")))
            _FUZZ_INPUTS.update(counts)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FUZZ_INPUTS:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(_FUZZ_INPUTS.items()))
        terminalreporter.write_line(
            f"fuzz profile {'/'.join(sorted(_FUZZ_PROFILES))}: "
            f"{sum(_FUZZ_INPUTS.values())} inputs ran ({counts})"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a failed test, attach the tails of the cluster's agent logs and the S3 server log."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        running = funcargs.get("cluster")
        if isinstance(running, ConsulCluster):
            report.sections.append(("consul agent logs (tail)", running.log_tails()))
        server = funcargs.get("s3_server")
        if isinstance(server, S3Server):
            report.sections.append((f"moto_server log {server.log_path} (tail)", server.log_tail()))
    return report
