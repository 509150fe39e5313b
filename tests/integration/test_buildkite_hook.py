"""The Buildkite post-command hook, run for real (executed and sourced) against Consul and S3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import ClusterSpec, ConsulCluster
from watcher.artifacts import ArtifactCache
from watcher.config import S3Settings
from watcher.consul_api import ConsulClient
from watcher.records import ArtifactRecord, Keys
from watcher.s3 import S3Store

CLUSTER = ClusterSpec(hosts=1)
REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "hooks" / "buildkite" / "post-command"
WATCHERCTL = Path(sys.executable).parent / "watcherctl"
COMMIT = "abcdef0123456789abcdef0123456789abcdef01"


@pytest.fixture(params=["executed", "sourced"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def consul(cluster: ConsulCluster) -> Any:
    client = ConsulClient(cluster.hosts[0].consul_settings())
    yield client
    client.close()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "tests").mkdir(parents=True)
    (root / "index.html").write_text("<h1>hello</h1>\n")
    (root / "tests/test_page.py").write_text("def test(): pass\n")
    (root / ".watcher").mkdir()
    (root / ".watcher/manifest.yaml").write_text("exclude: ['tests/**']\n")
    return root


def config_file(tmp_path: Path, cluster: ConsulCluster, s3: S3Settings, **s3_over: Any) -> Path:
    data = {
        "consul": {"address": cluster.hosts[0].http_addr},
        "s3": {
            "bucket": s3.bucket,
            "prefix": s3.prefix,
            "region": s3.region,
            "endpoint_url": s3.endpoint_url,
            **s3_over,
        },
        "apps": {"web": {"root": str(tmp_path / "srv")}},
    }
    path = tmp_path / "watcher.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def run_hook(mode: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the hook like the agent would: as a program, or sourced from a bash wrapper."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BUILDKITE", "WATCHER_", "CONSUL_"))
    }
    clean.update(env)
    if mode == "executed":
        argv = ["bash", str(HOOK)]
    else:
        # $0 is the wrapper (as in the agent's wrapper script), the hook is sourced.
        script = 'source "$1"; status=$?; echo "hook_status=$status shell_opts=$-"; exit $status'
        argv = ["bash", "-c", script, "buildkite-wrapper", str(HOOK)]
    return subprocess.run(
        argv, cwd=cwd, env=clean, capture_output=True, text=True, timeout=120, check=False
    )


def buildkite_env(config: Path, **over: str) -> dict[str, str]:
    env = {
        "BUILDKITE": "true",
        "BUILDKITE_COMMAND_EXIT_STATUS": "0",
        "BUILDKITE_BRANCH": "main",
        "BUILDKITE_PULL_REQUEST": "false",  # what Buildkite sets for a build that is no PR
        "BUILDKITE_COMMIT": COMMIT,
        "BUILDKITE_BUILD_NUMBER": "99",
        "BUILDKITE_BUILD_URL": "https://buildkite.example/acme/web/builds/99",
        "BUILDKITE_PIPELINE_SLUG": "web",
        "WATCHER_APP": "web",
        "WATCHER_CONFIG": str(config),
        "WATCHER_CTL": str(WATCHERCTL),
        "WATCHER_PUBLISH_RETRY_FOR": "1s",
    }
    env.update(over)
    return env


def record(consul: ConsulClient, artifact: str) -> ArtifactRecord | None:
    entry = consul.kv_get(Keys("watcher", "web").artifact(artifact))
    return None if entry is None else ArtifactRecord.from_json(entry.value)


def check_sourced_shell(mode: str, result: subprocess.CompletedProcess[str]) -> None:
    """Sourcing must return to the wrapper (no exit) and leave its shell options alone."""
    if mode == "sourced":
        line = result.stdout.strip().splitlines()[-1]
        assert line.startswith(f"hook_status={result.returncode} "), result.stdout
        opts = line.split("shell_opts=", 1)[1]
        assert "e" not in opts and "u" not in opts


class TestBuildkitePostCommand:
    def test_green_step_on_an_allowed_branch_publishes(
        self,
        mode: str,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        checkout: Path,
        tmp_path: Path,
    ) -> None:
        commit = ("1" if mode == "executed" else "2") + COMMIT[1:]
        artifact = f"release-1.2-{commit[:8]}"
        env = buildkite_env(
            config_file(tmp_path, cluster, s3_settings),
            BUILDKITE_BRANCH="release/1.2",
            BUILDKITE_COMMIT=commit,
            WATCHER_PUBLISH_BRANCHES="main, release/*",
        )

        result = run_hook(mode, checkout, **env)

        assert result.returncode == 0, result.stdout + result.stderr
        assert f"published web artifact {artifact}" in result.stdout
        stored = record(consul, artifact)
        assert stored is not None
        assert stored.branch == "release/1.2" and stored.commit == commit
        assert stored.build_number == "99"
        assert stored.created_by == "buildkite:web#99"
        assert stored.url.startswith(f"s3://{s3_settings.bucket}/artifacts/web/{artifact}")
        check_sourced_shell(mode, result)

    def test_failed_step_does_nothing(
        self,
        mode: str,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        checkout: Path,
        tmp_path: Path,
    ) -> None:
        env = buildkite_env(
            config_file(tmp_path, cluster, s3_settings),
            BUILDKITE_COMMAND_EXIT_STATUS="1",
            BUILDKITE_COMMIT="3" + COMMIT[1:],
        )
        result = run_hook(mode, checkout, **env)

        assert result.returncode == 0, result.stderr
        assert "the command exited with status 1; not publishing" in result.stdout
        assert record(consul, f"main-3{COMMIT[1:8]}") is None
        check_sourced_shell(mode, result)

    def test_branch_not_allowed_does_nothing(
        self,
        mode: str,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        checkout: Path,
        tmp_path: Path,
    ) -> None:
        env = buildkite_env(
            config_file(tmp_path, cluster, s3_settings),
            BUILDKITE_BRANCH="feature/login",
            BUILDKITE_COMMIT="4" + COMMIT[1:],
        )
        result = run_hook(mode, checkout, **env)

        assert result.returncode == 0, result.stderr
        assert "branch 'feature/login' is not in WATCHER_PUBLISH_BRANCHES" in result.stdout
        assert record(consul, f"feature-login-4{COMMIT[1:8]}") is None
        check_sourced_shell(mode, result)

    @pytest.mark.parametrize(
        "allowed", ["main\nrelease/*", "main,\trelease/*\n", "x y\n\nrelease/*"]
    )
    def test_every_line_of_the_allow_list_counts(
        self, mode: str, checkout: Path, tmp_path: Path, allowed: str
    ) -> None:
        """Commas, spaces, tabs and newlines all separate entries: a YAML block scalar in the
        pipeline's env gives one entry a line. (A stub watcherctl: only the choice is tested.)"""
        stub = tmp_path / "watcherctl-stub"
        stub.write_text('#!/bin/sh\necho "stub watcherctl $*"\n')
        stub.chmod(0o755)
        env = buildkite_env(
            tmp_path / "unused.yaml",
            BUILDKITE_BRANCH="release/2.0",
            WATCHER_CTL=str(stub),
            WATCHER_PUBLISH_BRANCHES=allowed,
        )
        result = run_hook(mode, checkout, **env)
        assert result.returncode == 0, result.stderr
        assert "stub watcherctl publish web" in result.stdout, result.stdout
        check_sourced_shell(mode, result)

    @pytest.mark.parametrize("allowed", ["", " ", ",\n"])
    def test_an_emptied_allow_list_publishes_nothing(
        self, mode: str, checkout: Path, tmp_path: Path, allowed: str
    ) -> None:
        """Emptying the list is how an operator turns publishing off: never the default."""
        stub = tmp_path / "watcherctl-stub"
        stub.write_text('#!/bin/sh\necho "stub watcherctl $*"\n')
        stub.chmod(0o755)
        env = buildkite_env(
            tmp_path / "unused.yaml", WATCHER_CTL=str(stub), WATCHER_PUBLISH_BRANCHES=allowed
        )
        result = run_hook(mode, checkout, **env)
        assert result.returncode == 0, result.stderr
        assert "stub watcherctl" not in result.stdout, result.stdout
        assert "WATCHER_PUBLISH_BRANCHES is set but names no branch; not publishing" in (
            result.stdout
        )
        check_sourced_shell(mode, result)

    def test_pull_request_build_does_nothing(
        self,
        mode: str,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        checkout: Path,
        tmp_path: Path,
    ) -> None:
        # A fork's pull request from its own `main`: Buildkite's branch is the PR's head.
        commit = ("b" if mode == "executed" else "c") + COMMIT[1:]
        env = buildkite_env(
            config_file(tmp_path, cluster, s3_settings),
            BUILDKITE_COMMIT=commit,
            BUILDKITE_PULL_REQUEST="17",
            BUILDKITE_PULL_REQUEST_REPO="https://github.com/someone/web.git",
        )
        result = run_hook(mode, checkout, **env)

        assert result.returncode == 0, result.stdout + result.stderr
        assert (
            "release-watcher: this is a build of pull request #17 (branch 'main');"
            " not publishing (WATCHER_PUBLISH_PULL_REQUESTS is not true)"
        ) in result.stdout
        assert record(consul, f"main-{commit[:8]}") is None
        check_sourced_shell(mode, result)

    @pytest.mark.parametrize("opt_in", ["", "false", "yes"])
    def test_only_true_opts_pull_requests_in(
        self,
        opt_in: str,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        checkout: Path,
        tmp_path: Path,
    ) -> None:
        commit = hashlib.sha256(f"opt-in {opt_in}".encode()).hexdigest()[:40]
        env = buildkite_env(
            config_file(tmp_path, cluster, s3_settings),
            BUILDKITE_COMMIT=commit,
            BUILDKITE_PULL_REQUEST="18",
            WATCHER_PUBLISH_PULL_REQUESTS=opt_in,
        )
        result = run_hook("executed", checkout, **env)

        assert result.returncode == 0, result.stdout + result.stderr
        assert "pull request #18 (branch 'main'); not publishing" in result.stdout
        assert record(consul, f"main-{commit[:8]}") is None

    def test_pull_request_build_publishes_when_opted_in(
        self,
        mode: str,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        checkout: Path,
        tmp_path: Path,
    ) -> None:
        commit = ("e" if mode == "executed" else "f") + COMMIT[1:]
        env = buildkite_env(
            config_file(tmp_path, cluster, s3_settings),
            BUILDKITE_BRANCH="release/2.0",
            BUILDKITE_COMMIT=commit,
            BUILDKITE_PULL_REQUEST="19",
            WATCHER_PUBLISH_BRANCHES="release/*",
            WATCHER_PUBLISH_PULL_REQUESTS="true",
        )
        result = run_hook(mode, checkout, **env)

        assert result.returncode == 0, result.stdout + result.stderr
        assert f"published web artifact release-2.0-{commit[:8]}" in result.stdout
        assert record(consul, f"release-2.0-{commit[:8]}") is not None
        check_sourced_shell(mode, result)

    def test_commit_that_is_not_a_sha_is_refused(
        self, mode: str, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
    ) -> None:
        env = buildkite_env(config_file(tmp_path, cluster, s3_settings), BUILDKITE_COMMIT="HEAD")
        result = run_hook(mode, tmp_path, **env)

        assert result.returncode != 0
        assert "BUILDKITE_COMMIT 'HEAD' is not a hex commit SHA" in result.stderr
        check_sourced_shell(mode, result)

    def test_missing_app_fails_the_step(
        self, mode: str, cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path
    ) -> None:
        env = buildkite_env(config_file(tmp_path, cluster, s3_settings), WATCHER_APP="")
        result = run_hook(mode, tmp_path, **env)

        assert result.returncode != 0
        assert "WATCHER_APP is not set" in result.stderr
        check_sourced_shell(mode, result)

    def test_publish_failure_fails_the_step(
        self,
        mode: str,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        checkout: Path,
        tmp_path: Path,
    ) -> None:
        config = config_file(tmp_path, cluster, s3_settings, endpoint_url="http://127.0.0.1:9")
        commit = ("5" if mode == "executed" else "6") + COMMIT[1:]
        env = buildkite_env(config, BUILDKITE_COMMIT=commit)

        result = run_hook(mode, checkout, **env)

        assert result.returncode != 0
        assert "S3 unavailable" in result.stderr
        assert "publishing web failed (watcherctl exit status 3); failing the step" in (
            result.stderr
        )
        assert record(consul, f"main-{commit[:8]}") is None
        check_sourced_shell(mode, result)


class TestBuildkiteProvenance:
    """Issue 10 item 9: who built it, what was built, and only a full commit SHA."""

    def test_creator_checkout_path_and_no_ci_files(
        self,
        mode: str,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        tmp_path: Path,
    ) -> None:
        checkout = tmp_path / "builds" / "agent-1" / "acme" / "web"
        for rel, text in {
            "index.html": "<h1>hello</h1>\n",
            ".buildkite/pipeline.yml": "steps: []\n",
            ".buildkite/hooks/post-command": "#!/bin/sh\n",
            ".git/HEAD": "ref: refs/heads/main\n",
        }.items():
            (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
            (checkout / rel).write_text(text)
        elsewhere = tmp_path / "agent-cwd"  # the hook's working directory is not the checkout
        (elsewhere / "secrets").mkdir(parents=True)
        (elsewhere / "secrets" / "token").write_text("do not ship\n")
        commit = ("7" if mode == "executed" else "8") + COMMIT[1:]
        env = buildkite_env(
            config_file(tmp_path, cluster, s3_settings),
            BUILDKITE_COMMIT=commit,
            BUILDKITE_BUILD_CHECKOUT_PATH=str(checkout),
            BUILDKITE_BUILD_CREATOR="Jane  Doe",
            BUILDKITE_BUILD_CREATOR_EMAIL="jane@example.com",
        )

        result = run_hook(mode, elsewhere, **env)

        assert result.returncode == 0, result.stdout + result.stderr
        assert f"publishing web from {checkout}" in result.stdout
        stored = record(consul, f"main-{commit[:8]}")
        assert stored is not None
        assert stored.created_by == "Jane Doe <jane@example.com> via buildkite:web#99"
        store = S3Store(s3_settings)
        cache = ArtifactCache(tmp_path / "dl", store, max_bytes=1 << 30, timeout=30)
        with tarfile.open(cache.fetch(stored)) as tar:
            names = sorted(n.removeprefix("./") for n in tar.getnames())
        assert names == ["index.html"]
        check_sourced_shell(mode, result)

    def test_abbreviated_sha_is_too_short(
        self,
        mode: str,
        cluster: ConsulCluster,
        s3_settings: S3Settings,
        consul: ConsulClient,
        checkout: Path,
        tmp_path: Path,
    ) -> None:
        short = ("9" if mode == "executed" else "a") + COMMIT[1:7]
        env = buildkite_env(config_file(tmp_path, cluster, s3_settings), BUILDKITE_COMMIT=short)

        result = run_hook(mode, checkout, **env)

        assert result.returncode != 0
        assert f"BUILDKITE_COMMIT '{short}' is too short, need the full commit SHA" in (
            result.stderr
        )
        published = consul.kv_keys(Keys("watcher", "web").artifacts_prefix)
        assert not [k for k in published if short in k]
        check_sourced_shell(mode, result)
