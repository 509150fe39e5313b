"""Bad Consul settings give one clear line naming what and where, and a non-zero exit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.cluster import Agent, ClusterSpec, ConsulCluster, make_ca
from watcher.consul_api import ConsulClient
from watcher.records import ArtifactRecord, HostRecord

CLUSTER = ClusterSpec(hosts=1, acl=True, tls=True)
BIN = Path(sys.executable).parent


def run_ctl(
    tmp_path: Path,
    consul: dict[str, object],
    *args: str,
    debug: bool = False,
    extra: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "watcher.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "consul": consul,
                "s3": {"bucket": "b"},
                "apps": {"web": {"root": str(tmp_path / "srv")}},
                **(extra or {}),
            }
        )
    )
    argv = [str(BIN / "watcherctl"), *args, "-c", str(config)]
    if debug:
        argv.append("--debug")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


class TestConsulErrors:
    def test_wrong_token(self, cluster: ConsulCluster, tmp_path: Path) -> None:
        agent = cluster.hosts[0]
        consul = {
            "address": agent.http_addr,
            "ca_file": cluster.ca_file,
            "token": "00000000-0000-0000-0000-000000000000",
        }
        result = run_ctl(tmp_path, consul, "history", "web")
        assert result.returncode == 3
        line, sent = result.stderr.strip().splitlines()
        assert "token" in line and agent.http_addr.split("://")[-1] in line
        assert "Traceback" not in result.stderr
        # Which token it was: an operator may hold several (theirs, the host's).
        config = tmp_path / "watcher.yaml"
        assert sent == f"watcherctl: the token sent: consul.token of {config}", sent

    def test_a_refused_token_is_named_by_where_it_came_from(
        self, cluster: ConsulCluster, tmp_path: Path
    ) -> None:
        """The careless-operator review: Consul's refusal did not say which token was sent,
        the one exported or the file's (watcherctl prefers the exported one)."""
        agent = cluster.hosts[0]
        made_up = "00000000-0000-0000-0000-000000000000"
        (tmp_path / "host-token").write_text(made_up + "\n")
        consul = {"address": agent.http_addr, "ca_file": cluster.ca_file}
        cases = [
            ({"token_file": str(tmp_path / "host-token")}, {}, "consul.token_file of "),
            ({"token": cluster.management_token}, {"CONSUL_HTTP_TOKEN": made_up}, ""),
            ({}, {}, ""),
        ]
        said = []
        for extra_consul, env, _ in cases:
            result = run_ctl(tmp_path, {**consul, **extra_consul}, "history", "web", env=env)
            assert result.returncode == 3, result
            said.append(result.stderr.strip().splitlines()[-1])
        config = tmp_path / "watcher.yaml"
        assert said == [
            f"watcherctl: the token sent: consul.token_file of {config} "
            f"({tmp_path / 'host-token'})",
            "watcherctl: the token sent: CONSUL_HTTP_TOKEN (from the environment)",
            "watcherctl: the token sent: none (Consul's anonymous token): export your own "
            "as CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE, or set consul.token_file in "
            f"{config}",
        ], said

    def test_wrong_ca(self, cluster: ConsulCluster, consul_bin: str, tmp_path: Path) -> None:
        other_ca, _ = make_ca(consul_bin, tmp_path / "other-ca")
        agent = cluster.hosts[0]
        consul = {
            "address": agent.http_addr,
            "ca_file": str(other_ca),
            "token": cluster.management_token,
        }
        result = run_ctl(tmp_path, consul, "history", "web")
        assert result.returncode == 3
        line = one_line_error(result)
        assert "TLS" in line or "certificate" in line, line

    def test_unreachable(self, tmp_path: Path) -> None:
        consul = {"address": "127.0.0.1:1", "timeout": "2s"}
        result = run_ctl(tmp_path, consul, "deploy", "web", "main-15eb13af", "--no-wait")
        assert result.returncode == 3
        # While it retries it says so, once (the retries take up to 10 s), then the error.
        retrying, error = result.stderr.strip().splitlines()
        assert retrying.startswith("watcherctl: cannot reach Consul at http://127.0.0.1:1 ")
        assert re.search(r"; retrying for up to \d+s$", retrying), retrying
        assert error.startswith("watcherctl: error: cannot reach Consul at http://127.0.0.1:1")
        assert "Traceback" not in result.stderr

    def test_status_names_a_refused_token_as_such(
        self, cluster: ConsulCluster, tmp_path: Path
    ) -> None:
        """A 403 is not "unreachable": `status` says what Consul answered, shows this host's
        part, and exits 3 without claiming that no deploy is in flight."""
        agent = cluster.hosts[0]
        consul = {
            "address": agent.http_addr,
            "ca_file": cluster.ca_file,
            "token": "00000000-0000-0000-0000-000000000000",
        }
        result = run_ctl(tmp_path, consul, "status")
        assert result.returncode == 3, result
        assert "UNREACHABLE" not in result.stdout, result.stdout
        assert f"consul REFUSED THE TOKEN at {agent.http_addr}" in result.stdout
        assert "  deploy      unknown (Consul refused the token)" in result.stdout
        assert "none in flight" not in result.stdout and "Traceback" not in result.stderr
        data = json.loads(run_ctl(tmp_path, consul, "status", "--json").stdout)
        assert data["consul"]["reachable"] is True
        assert data["apps"]["web"]["fleet_error"] == "Consul refused the token"

    def test_debug_shows_the_traceback(self, tmp_path: Path) -> None:
        consul = {"address": "127.0.0.1:1", "timeout": "2s"}
        result = run_ctl(tmp_path, consul, "history", "web", debug=True)
        assert result.returncode == 3  # as without --debug
        assert "Traceback" in result.stderr

    def test_bad_config_names_every_problem(self, tmp_path: Path) -> None:
        config = tmp_path / "watcher.yaml"
        config.write_text(
            "s3: {bucket: b}\napps:\n  web: {root: /srv, keep_releases: five}\n"
            "  api: {rooot: /srv}\n"
        )
        result = subprocess.run(
            [str(BIN / "watcherctl"), "status", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert 'apps.web.keep_releases: must be an integer >= 1, got "five"' in result.stderr
        assert "apps.api.rooot: unknown key" in result.stderr
        assert "apps.api.root: is required" in result.stderr
        assert "Traceback" not in result.stderr

    def test_a_ci_config_without_apps_says_what_it_is_for(self, tmp_path: Path) -> None:
        # A CI machine's config (consul and s3 only) given to a host's command: every
        # answer says what such a config serves and what to give instead; none sends the
        # user round in circles ("name an app" -> "no app 'web' (configured: none)").
        config = tmp_path / "ci.yaml"
        config.write_text("consul: {address: '127.0.0.1:1'}\ns3: {bucket: b}\n")

        def run(command: str, *args: str) -> subprocess.CompletedProcess[str]:
            argv = [str(BIN / command), *args, "-c", str(config)]
            return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

        for argv in (["status"], ["status", "web"]):
            result = run("watcherctl", *argv)
            assert result.returncode == 2, (argv, result)
            assert "serves `watcherctl publish" in result.stderr, (argv, result.stderr)
            assert "-c /etc/watcher/watcher.yaml" in result.stderr, result.stderr
            assert "name an app" not in result.stderr and "configured: none" not in result.stderr
        checked = run("watcher", "check-config")
        assert checked.returncode == 2, checked
        assert "only `watcherctl publish` reads" in checked.stderr, checked.stderr


def _acl_api(agent: Agent, path: str, body: dict[str, object]) -> dict[str, object]:
    status, raw = agent.request("PUT", path, json.dumps(body).encode())
    assert status == 200, f"PUT {path}: HTTP {status}: {raw[:300]!r}"
    data: dict[str, object] = json.loads(raw)
    return data


class TestEventNotFired:
    """A token that may write the deploy but not fire the doorbell event: the deploy starts,
    and the warning goes to stderr (stdout stays the command's output, JSON included)."""

    def test_the_warning_goes_to_stderr(self, cluster: ConsulCluster, tmp_path: Path) -> None:
        agent = cluster.hosts[0]
        admin = ConsulClient(agent.consul_settings())
        session = admin.session_create("test member", 30.0)
        try:
            for as_json in (False, True):
                prefix = f"ev{time.monotonic_ns()}"
                app = f"{prefix}/apps/web"
                name = f"no-events-{prefix}"
                _acl_api(
                    agent,
                    "/v1/acl/policy",
                    {"Name": name, "Rules": f'key_prefix "{app}/" {{ policy = "write" }}\n'},
                )
                token = _acl_api(agent, "/v1/acl/token", {"Policies": [{"Name": name}]})
                record = ArtifactRecord(
                    id="main-15eb13af",
                    url="s3://b/web/main-15eb13af.tar.gz",
                    sha256="0" * 64,
                    size=1,
                )
                admin.kv_put(f"{app}/artifacts/main-15eb13af", record.to_json())
                assert admin.kv_put(f"{app}/members/host-1", b"{}", acquire=session)
                consul = {
                    "address": agent.http_addr,
                    "ca_file": cluster.ca_file,
                    "token": token["SecretID"],
                }
                argv = ["deploy", "web", "main-15eb13af", "--no-wait"]
                result = run_ctl(
                    tmp_path,
                    consul,
                    *argv,
                    *(["--json"] if as_json else []),
                    extra={"kv_prefix": prefix},
                )
                assert result.returncode == 0, result.stderr
                [warning] = result.stderr.splitlines()
                assert warning.startswith("watcherctl: warning: event not fired"), warning
                # Consul's own answer is a bare "Permission denied": what it takes is said
                assert "it takes event write on 'deploy'" in warning, warning
                assert "watcherctl: warning" not in result.stdout
                assert "event not fired" not in result.stdout
                if as_json:
                    assert json.loads(result.stdout)["state"] == "started"
                assert admin.kv_get(f"{app}/inflight") is not None
        finally:
            admin.session_destroy(session)


class TestTokenThatMayNotReadMembers:
    """Consul filters `members/` out of a list for such a token, and says so in a header:
    watcherctl must say that, not "is any daemon running?" (and never deploy to a partial
    member list)."""

    @pytest.mark.parametrize("denied", ["members", "hosts"])
    def test_deploy_and_fleet_status_name_the_acl(
        self, cluster: ConsulCluster, tmp_path: Path, denied: str
    ) -> None:
        agent = cluster.hosts[0]
        prefix = f"acl{time.monotonic_ns()}"
        app = f"{prefix}/apps/web"
        rules = (
            f'key_prefix "{app}/" {{ policy = "read" }}\n'
            f'key_prefix "{app}/{denied}/" {{ policy = "deny" }}\n'
            f'key "{app}/inflight" {{ policy = "write" }}\n'
            f'key_prefix "{app}/deploys/" {{ policy = "write" }}\n'
        )
        _acl_api(agent, "/v1/acl/policy", {"Name": f"no-members-{prefix}", "Rules": rules})
        token = _acl_api(agent, "/v1/acl/token", {"Policies": [{"Name": f"no-members-{prefix}"}]})
        admin = ConsulClient(agent.consul_settings())
        record = ArtifactRecord(
            id="main-15eb13af", url="s3://b/web/main-15eb13af.tar.gz", sha256="0" * 64, size=1
        )
        admin.kv_put(f"{app}/artifacts/main-15eb13af", record.to_json())
        session = admin.session_create("test member", 30.0)
        assert admin.kv_put(f"{app}/members/host-1", b"{}", acquire=session)
        host = HostRecord(node="host-1", release=None, last_seen="2026-01-01T00:00:00.000Z")
        admin.kv_put(f"{app}/hosts/host-1", host.to_json())

        consul = {
            "address": agent.http_addr,
            "ca_file": cluster.ca_file,
            "token": token["SecretID"],
        }
        base = {"kv_prefix": prefix}
        result = run_ctl(
            tmp_path, consul, "deploy", "web", "main-15eb13af", "--no-wait", extra=base
        )
        line, sent = result.stderr.strip().splitlines()
        assert result.returncode == 3, result.stderr
        assert f"may not read {app}/{denied}/" in line, line
        assert sent == f"watcherctl: the token sent: consul.token of {tmp_path / 'watcher.yaml'}"
        assert "is any daemon running" not in line
        # `status --fleet` shows this host's part, as `status` does, then why the fleet's is not.
        result = run_ctl(tmp_path, consul, "status", "--fleet", extra=base)
        assert result.returncode == 3, result
        assert f"consul REFUSED THE TOKEN at {agent.http_addr}" in result.stdout, result.stdout
        assert f"may not read {app}/{denied}/" in result.stdout, result.stdout
        assert "  deploy      unknown (Consul refused the token)" in result.stdout
        assert "is any daemon running" not in result.stdout and result.stderr == ""
        assert admin.kv_get(f"{app}/inflight") is None  # no deploy was started
        assert admin.kv_list(f"{app}/deploys/") == []
        admin.session_destroy(session)
