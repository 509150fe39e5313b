"""Deploys with ACLs on (default deny), each actor holding only the policy docs/acl publishes:
watchers their per-host watcher token, CI its publish token, watcherctl an operator token."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import Agent, ClusterSpec, ConsulCluster
from tests.support.fleet import BIN, Fleet, WatcherProc, wait_for
from tests.support.procs import reaped
from watcher.config import ConsulSettings, S3Settings
from watcher.consul_api import ConsulClient, TxnOp
from watcher.errors import ConsulPermissionDenied

CLUSTER = ClusterSpec(hosts=3, acl=True)

ACL_DIR = Path(__file__).resolve().parents[2] / "docs" / "acl"
RENDER = ACL_DIR / "render-policy"
# What a watcher logs when Consul refuses it something (ConsulPermissionDenied's message).
DENIED = re.compile(
    r"ACL token lacks|ACL token is unknown|ACL not found|permission denied", re.IGNORECASE
)


def render(
    role: str, kv_prefix: str, *apps: str, node: str | None = None, agents: tuple[str, ...] = ()
) -> str:
    argv = [str(RENDER), role, "--kv-prefix", kv_prefix]
    if node:
        argv += ["--node", node]
    for agent in agents:
        argv += ["--agent", agent]
    return subprocess.run(
        [*argv, *apps], capture_output=True, text=True, check=True, timeout=10
    ).stdout


def api(agent: Agent, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A call to Consul's ACL HTTP API with the management token."""
    status, raw = agent.request(method, path, json.dumps(body).encode())
    assert status == 200, f"{method} {path}: HTTP {status}: {raw[:300]!r}"
    data: dict[str, Any] = json.loads(raw)
    return data


def create_token(agent: Agent, name: str, rules: str) -> tuple[str, str]:
    """A policy named ``name`` with ``rules`` and a token holding only it: (secret, accessor)."""
    api(agent, "PUT", "/v1/acl/policy", {"Name": name, "Rules": rules})
    token = api(
        agent,
        "PUT",
        "/v1/acl/token",
        {"Description": f"release-watcher test: {name}", "Policies": [{"Name": name}]},
    )
    return str(token["SecretID"]), str(token["AccessorID"])


def watcher_tokens(server: Agent, hosts: list[Agent], prefix: str) -> dict[str, tuple[str, str]]:
    """Per host, a token of the watcher policy of docs/acl.md for app web: (secret, accessor)."""
    return {
        a.name: create_token(
            server, f"watcher-{prefix}-{a.name}", render("watcher", prefix, "web", node=a.name)
        )
        for a in hosts
    }


def watcher_token_fleet(
    cluster: ConsulCluster, s3: S3Settings, workdir: Path, prefix: str, **kw: Any
) -> Fleet:
    """A fleet under ``prefix`` whose hosts each hold a token of the watcher policy."""
    made = watcher_tokens(cluster.server, cluster.hosts, prefix)
    watchers = {n: secret for n, (secret, _) in made.items()}
    return Fleet(cluster, s3, workdir, kv_prefix=prefix, consul_tokens=watchers, **kw)


@dataclass
class Tokens:
    watchers: dict[str, str]  # node -> its watcher token
    operator: str
    ci: str
    accessors: dict[str, str]  # AccessorID -> who holds it (Consul logs refusals by it)


def client(agent: Agent, token: str) -> ConsulClient:
    base = agent.consul_settings()
    settings = ConsulSettings(
        address=base.address, scheme=base.scheme, token=token, ca_file=base.ca_file
    )
    return ConsulClient(settings, retry_deadline=2.0)


class AclFleet:
    """A Fleet whose watchers, operator and CI each use their least-privilege token."""

    def __init__(self, fleet: Fleet, tokens: Tokens) -> None:
        self.fleet = fleet
        self.tokens = tokens
        w0 = fleet.watchers[0]
        # watcherctl for people and CI: host-1's config with another token.
        self.operator_config = self._config_with(w0, tokens.operator, "operator.yaml")
        self.ci_config = self._config_with(w0, tokens.ci, "ci.yaml")

    def _config_with(self, w: WatcherProc, token: str, name: str) -> Path:
        config = self.fleet.config_for(w)
        config["consul"]["token"] = token
        path = self.fleet.workdir / name
        path.write_text(yaml.safe_dump(config))
        return path

    def ctl(self, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "watcherctl"), *args, "-c", str(config), "--json"]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=self.fleet.watchers[0].env(),
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"watcherctl {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}\n{self.fleet.logs()}"
            )
        return result

    def operator(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ctl(self.operator_config, *args, check=check)

    def raw_deploy(self, artifact_id: str) -> str:
        """`consul event -name=deploy '{...}'` with the operator token; the event's ID."""
        payload = json.dumps({"app": "web", "artifact": artifact_id})
        raw = subprocess.run(
            [str(self.fleet.cluster.consul_bin), "event", "-name=deploy", payload],
            capture_output=True,
            text=True,
            env={
                "PATH": "/usr/bin:/bin",
                **self.fleet.cluster.hosts[1].env(),
                "CONSUL_HTTP_TOKEN": self.tokens.operator,
            },
            timeout=10,
            check=True,
        )
        event_id = re.search(r"Event ID: (\S+)", raw.stdout)
        assert event_id, raw.stdout
        return event_id.group(1)

    def publish(self, version: str) -> dict[str, Any]:
        """`watcherctl publish` with the CI token: upload, artifact record, build-finished."""
        src = self.fleet.workdir / f"checkout-{version}"
        src.mkdir()
        (src / "index.html").write_text(f"<h1>{version}</h1>\n")
        (src / "VERSION").write_text(version + "\n")
        commit = uuid.uuid5(uuid.NAMESPACE_URL, version).hex + "01234567"
        result = self.ctl(
            self.ci_config, "publish", "web", str(src), "--branch", "main", "--commit", commit
        )
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def assert_no_denials(self) -> None:
        """Nothing any actor did was refused: not by the watchers' logs, and not by Consul's,
        which logs every refusal with the token's AccessorID (even ones a client retries)."""
        for w in self.fleet.watchers:
            denied = [line for line in w.log_text().splitlines() if DENIED.search(line)]
            assert not denied, f"{w.name} was refused something:\n" + "\n".join(denied[:5])
        for agent in self.fleet.cluster.agents:
            text = agent.log_path.read_text(errors="replace")
            refused = [
                f"{who}: {line}"
                for line in text.splitlines()
                if "Permission denied" in line
                for accessor, who in self.tokens.accessors.items()
                if accessor in line
            ]
            assert not refused, f"{agent.name} refused:\n" + "\n".join(refused[:5])


@pytest.fixture
def acl_fleet(
    cluster: ConsulCluster, s3_settings: S3Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[AclFleet]:
    """The fleet with least-privilege tokens; an indirect parameter is the watchers' extra
    ``daemon`` settings."""
    # Each test gets its own KV prefix, so its own policies (they name the prefix).
    prefix = f"w{time.monotonic_ns()}"
    server = cluster.server
    made = watcher_tokens(server, cluster.hosts, prefix)
    # Read on the agent raw_deploy fires through (the raw `consul event` CLI reads it).
    operator_rules = render("operator", prefix, "web", agents=(cluster.hosts[1].name,))
    made["operator"] = create_token(server, f"operator-{prefix}", operator_rules)
    made["ci"] = create_token(server, f"ci-{prefix}", render("ci", prefix, "web"))
    tokens = Tokens(
        watchers={a.name: made[a.name][0] for a in cluster.hosts},
        operator=made["operator"][0],
        ci=made["ci"][0],
        accessors={accessor: who for who, (_, accessor) in made.items()},
    )
    fleet = Fleet(
        cluster,
        s3_settings,
        tmp_path,
        kv_prefix=prefix,
        consul_tokens=tokens.watchers,
        daemon_extra=getattr(request, "param", {}),
    )
    for w in fleet.watchers:
        assert (
            yaml.safe_load(w.config_path.read_text())["consul"]["token"] == tokens.watchers[w.name]
        )
    fleet.start()
    try:
        yield AclFleet(fleet, tokens)
    finally:
        fleet.stop()


def prefetched(w: WatcherProc, artifact: dict[str, Any]) -> Path:
    return w.app_dir / "prefetched" / f"{artifact['id']}-{artifact['sha256'][:12]}"


class TestWithLeastPrivilege:
    def test_publish_prefetch_deploy_rollback(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        # CI: upload, record and build-finished with the CI token; every watcher, listing
        # events with its own token, prefetches.
        v1 = acl_fleet.publish("v1")
        wait_for(
            lambda: all(prefetched(w, v1).is_dir() for w in fleet.watchers),
            30,
            "prefetch of v1 on every host",
            fleet,
        )

        # Operator: deploy with the operator token; the hosts coordinate, decide and flip
        # `current` with theirs.
        result = json.loads(acl_fleet.operator("deploy", "web", v1["id"]).stdout)
        assert result["result"] == "committed", result
        release1 = result["release"]
        assert fleet.currents() == {w.name: release1 for w in fleet.watchers}
        assert {h["state"] for h in result["hosts"].values()} == {"live"}
        fleet.wait_idle()
        wait_for(
            lambda: (
                {
                    h["release"]
                    for h in json.loads(acl_fleet.operator("status", "--fleet").stdout)["web"][
                        "hosts"
                    ].values()
                }
                == {release1}
            ),
            10,
            "status --fleet (operator token) shows every host on v1",
            fleet,
        )
        status = json.loads(acl_fleet.operator("status", "--fleet").stdout)["web"]
        assert status["current"] == release1
        assert sorted(status["hosts"]) == sorted(w.name for w in fleet.watchers)

        # A raw `consul event` with the operator token: a watcher creates the deploy record
        # (and advances events_seen) with its own token.
        v2 = acl_fleet.publish("v2")
        outcome = fleet.wait_outcome(acl_fleet.raw_deploy(v2["id"]))
        assert outcome["result"] == "committed", outcome
        release2 = fleet.currents()[fleet.watchers[0].name]
        assert release2 and release2.endswith("-" + v2["id"])
        assert set(fleet.currents().values()) == {release2}
        fleet.wait_idle()

        # A raw `deploy` of an artifact nobody published: a watcher writes the refusal
        # (request, decision, outcome, history) with its own token, and nobody moves.
        refused = fleet.wait_outcome(acl_fleet.raw_deploy("main-deadbeef"))
        assert refused["result"] == "refused", refused
        assert "unknown artifact main-deadbeef" in refused["reason"]
        assert set(fleet.currents().values()) == {release2}
        fleet.wait_idle()

        # Rollback with the operator token: back to v1 everywhere.
        back = json.loads(acl_fleet.operator("rollback", "web").stdout)
        assert back["result"] == "committed", back
        assert back["release"] == release1
        assert fleet.currents() == {w.name: release1 for w in fleet.watchers}
        fleet.wait_idle()

        # SIGTERM: each watcher destroys its own session with its token, so its member key
        # goes at once (well before the 2x TTL a dead session takes).
        fleet.stop()
        assert fleet.members() == set()
        acl_fleet.assert_no_denials()

    @pytest.mark.parametrize("acl_fleet", [{"history_keep": 4}], indirect=True)
    def test_refusals_past_the_cap_are_evicted_with_host_tokens(self, acl_fleet: AclFleet) -> None:
        """Raw `deploy` events of unknown artifacts: the refusal cap (history_keep 4 lets
        refusals hold min(REFUSALS_KEPT, 4 // 2) = 2 entries) deletes the oldest refusal's
        request, decision and outcome in the txn that writes the newest, with the token of
        whichever watcher heard the event."""
        fleet = acl_fleet.fleet
        refusals = []
        for n in range(3):
            event_id = acl_fleet.raw_deploy(f"main-dead{n:04x}")
            refused = fleet.wait_outcome(event_id)
            assert refused["result"] == "refused", refused
            fleet.wait_idle()
            refusals.append(event_id)
        entry = fleet.kv.kv_get(fleet.keys.history)
        assert entry is not None and entry.value is not None
        listed = json.loads(entry.value)["deploys"]
        assert [i for i in listed if i in refusals] == refusals[1:], listed
        first = refusals[0]
        for key in (
            fleet.keys.request(first),
            fleet.keys.decision(first),
            fleet.keys.outcome(first),
        ):
            assert fleet.kv.kv_get(key) is None, f"{key} outlived its eviction"
        assert fleet.outcome(refusals[1]) is not None
        assert fleet.currents() == {w.name: None for w in fleet.watchers}
        fleet.stop()
        acl_fleet.assert_no_denials()

    def test_failing_post_release_aborts_everywhere(self, acl_fleet: AclFleet) -> None:
        fleet = acl_fleet.fleet
        v1 = acl_fleet.publish("v1")
        assert json.loads(acl_fleet.operator("deploy", "web", v1["id"]).stdout)["result"] == (
            "committed"
        )
        fleet.wait_idle()
        before = fleet.currents()

        markers = fleet.workdir / "markers"
        markers.mkdir()
        bad_host = fleet.watchers[2]
        for w in fleet.watchers:
            post = w.root / "post-release"
            if w is bad_host:
                post.write_text(
                    "#!/bin/sh\nsleep 1\necho 'migrations failed: table locked' >&2\nexit 3\n"
                )
            else:
                post.write_text(f"#!/bin/sh\ntouch {markers}/release-{w.name}\n")
            post.chmod(0o755)
            abort = w.root / "post-abort"
            abort.write_text(f"#!/bin/sh\ntouch {markers}/abort-{w.name}\n")
            abort.chmod(0o755)
            fleet.write_config(w, {"hooks": {"post_release": str(post), "post_abort": str(abort)}})
            w.stop()
            w.start()
        fleet.wait_members(3)

        v2 = acl_fleet.publish("v2")
        result = acl_fleet.operator("deploy", "web", v2["id"], check=False)
        assert result.returncode == 1, result
        summary = json.loads(result.stdout)
        assert summary["result"] == "aborted"
        assert bad_host.name in summary["reason"] and "status 3" in summary["reason"]
        fleet.wait_idle()
        assert fleet.currents() == before
        current = fleet.kv.kv_get(fleet.keys.current)
        assert current is not None and current.value is not None
        assert json.loads(current.value)["release"] == before[bad_host.name]
        states = {n: h["state"] for n, h in summary["hosts"].items()}
        assert states == {w.name: "failed" if w is bad_host else "aborted" for w in fleet.watchers}
        good = [w for w in fleet.watchers if w is not bad_host]
        fleet.wait_dropped(good, summary["release"])  # after their post_abort hooks
        ran = {w.name for w in good if (markers / f"release-{w.name}").exists()}
        assert ran, "no healthy host got to post_release within the bad hook's 1 s"
        assert {w.name for w in good if (markers / f"abort-{w.name}").exists()} == ran
        assert not (markers / f"abort-{bad_host.name}").exists()
        fleet.stop()
        acl_fleet.assert_no_denials()


class TestATokenDeletedWhileDeployWaits:
    def test_the_wait_stops_saying_the_token_is_gone_and_which_was_sent(
        self, acl_fleet: AclFleet, cluster: ConsulCluster
    ) -> None:
        """The ACL review: an operator's token deleted while `deploy` waited stopped the
        wait as "this token may not read the deploy's records" (it could, until deleted)
        and, unlike every other refusal, did not say which token was sent. The deploy goes
        on without the command and commits."""
        fleet = acl_fleet.fleet
        v1 = acl_fleet.publish("v1")
        gate = fleet.workdir / "validate-gate"
        for w in fleet.watchers:
            fleet.give_gated_hook(w, "validate", gate)
        fleet.wait_members(3)
        # A token of its own, deleted below; on the server's agent, which resolves tokens
        # itself (a client agent keeps a deleted one for its token_ttl, 30 s by default).
        rules = render("operator", fleet.kv_prefix, "web", agents=(cluster.hosts[1].name,))
        secret, accessor = create_token(cluster.server, f"doomed-{fleet.kv_prefix}", rules)
        config = fleet.config_for(fleet.watchers[0])
        config["consul"] = {"address": cluster.server.http_addr, "token": secret}
        path = fleet.workdir / "doomed.yaml"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        deploy = subprocess.Popen(
            [str(BIN / "watcherctl"), "deploy", "web", v1["id"], "-c", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=fleet.watchers[0].env(),
        )
        with reaped(deploy):
            try:
                wait_for(lambda: Path(f"{gate}.started").exists(), 30, "a host in validate", fleet)
                status, body = cluster.server.request("DELETE", f"/v1/acl/token/{accessor}")
                assert status == 200, (status, body[:200])
            finally:
                gate.touch()  # the hosts go on: the acks change and the wait reads again
            out, err = deploy.communicate(timeout=60)
        assert deploy.returncode == 3, (deploy.returncode, out, err)
        lines = err.splitlines()
        assert "the ACL token is unknown to Consul (ACL not found)" in lines[0], err
        assert lines[1].startswith(
            "watcherctl: Consul no longer knows this token, so the wait stopped; "
        ), err
        assert lines[-1] == f"watcherctl: the token sent: consul.token of {path}", err
        fleet.wait_idle()  # the deploy went on without the command, and committed
        current = fleet.kv.kv_get(fleet.keys.current)
        assert current is not None and current.value is not None
        assert json.loads(current.value)["artifact"] == v1["id"]
        assert len(set(fleet.currents().values())) == 1, fleet.currents()


class TestPrivilegeIsLeast:
    def test_watcher_token_stays_inside_its_app_and_node(
        self, acl_fleet: AclFleet, cluster: ConsulCluster
    ) -> None:
        fleet = acl_fleet.fleet
        keys = fleet.keys
        host1, host2 = cluster.hosts[0], cluster.hosts[1]
        with client(host1, acl_fleet.tokens.watchers[host1.name]) as mine:
            # Its own agent (the node name when the config sets none) and app keys: yes.
            assert mine.agent_node_name() == host1.name
            # Its own acks, and what only hosts write (layout 2): yes.
            for key in (
                keys.progress("probe", host1.name),
                keys.decision("probe"),
                keys.outcome("probe"),
                keys.coordinator("probe"),
                keys.pin("main-00000000"),
                keys.request("probe"),
                keys.events_seen,
                keys.history,
            ):
                assert mine.kv_put(key, b"{}"), key
                mine.kv_delete(key)
            # Outside the prefix, another app, CI's artifact records, other hosts' keys
            # (another node's acks included, also one whose name starts like its own): no.
            for key in (
                "elsewhere/x",
                f"{fleet.kv_prefix}/apps/api/current",
                f"{fleet.kv_prefix}/apps/web2/current",
                keys.artifact("main-00000000"),
                keys.member(host2.name),
                keys.host(host2.name),
                keys.progress("probe", host2.name),
                keys.progress("probe", host1.name + "0"),
                f"{keys.base}/deploys/probe",
            ):
                with pytest.raises(ConsulPermissionDenied):
                    mine.kv_put(key, b"{}")
            with pytest.raises(ConsulPermissionDenied):
                mine.kv_get("elsewhere/x")
            with pytest.raises(ConsulPermissionDenied):
                mine.txn([TxnOp.set(keys.inflight, b"x"), TxnOp.set("elsewhere/x", b"x")])
            with pytest.raises(ConsulPermissionDenied):
                mine.kv_delete(keys.members_prefix, recurse=True)
            # Watchers only listen to events.
            for name in ("deploy", "rollback", "build-finished"):
                with pytest.raises(ConsulPermissionDenied):
                    mine.event_fire(name, b'{"app": "web"}')
        # No session on another node (through that node's agent), nor its agent's config.
        with client(host2, acl_fleet.tokens.watchers[host1.name]) as foreign:
            with pytest.raises(ConsulPermissionDenied):
                foreign.session_create("impostor", 5)
            with pytest.raises(ConsulPermissionDenied):
                foreign.agent_node_name()
        # Nor destroy another host's session (which would drop its member key).
        member = fleet.kv.kv_get(keys.member(host2.name))
        assert member is not None and member.session
        with (
            client(host1, acl_fleet.tokens.watchers[host1.name]) as mine,
            pytest.raises(ConsulPermissionDenied),
        ):
            mine.session_destroy(member.session)
        assert fleet.members() == {w.name for w in fleet.watchers}

    def test_ci_token_only_publishes(self, acl_fleet: AclFleet, cluster: ConsulCluster) -> None:
        keys = acl_fleet.fleet.keys
        with client(cluster.hosts[0], acl_fleet.tokens.ci) as ci:
            assert ci.kv_put(keys.artifact("main-11111111"), b"{}", cas=0)
            assert ci.event_fire("build-finished", b'{"app": "web", "artifact": "x"}')
            for key in (
                keys.inflight,
                keys.current,
                keys.request("d1"),
                keys.progress("d1", "host-1"),
                keys.decision("d1"),
                keys.pin("main-11111111"),
                keys.member("host-9"),
            ):
                with pytest.raises(ConsulPermissionDenied):
                    ci.kv_put(key, b"{}")
            with pytest.raises(ConsulPermissionDenied):
                ci.txn([TxnOp.cas(keys.inflight, b"d1", 0), TxnOp.set(keys.request("d1"), b"{}")])
            assert ci.kv_get(keys.pin("main-11111111")) is None  # it may read the pins
            with pytest.raises(ConsulPermissionDenied):
                ci.kv_get(keys.current)
            for name in ("deploy", "rollback"):
                with pytest.raises(ConsulPermissionDenied):
                    ci.event_fire(name, b'{"app": "web"}')
        assert acl_fleet.fleet.inflight() is None

    def test_a_ci_token_without_the_event_rule_is_told_the_artifact_is_complete(
        self, acl_fleet: AclFleet, cluster: ConsulCluster
    ) -> None:
        """Consul refuses the announcement: the step fails (exit 3), and says the record and
        the object are there and the build can be deployed (it only said "refused")."""
        prefix = acl_fleet.fleet.kv_prefix
        rules = render("ci", prefix, "web").split('event "build-finished"')[0]
        token, _ = create_token(cluster.server, f"ci-no-event-{prefix}", rules)
        config = acl_fleet._config_with(acl_fleet.fleet.watchers[0], token, "ci-no-event.yaml")
        src = acl_fleet.fleet.workdir / "checkout-no-event"
        src.mkdir()
        (src / "index.html").write_text("<h1>no event</h1>\n")
        result = acl_fleet.ctl(
            config,
            "publish",
            "web",
            str(src),
            "--branch",
            "main",
            "--commit",
            "c" * 40,
            check=False,
        )
        assert result.returncode == 3, result
        assert "the artifact itself is complete" in result.stderr, result.stderr
        assert acl_fleet.fleet.kv.kv_get(acl_fleet.fleet.keys.artifact("main-cccccccc"))

    def test_operator_token_cannot_flip_or_forge(
        self, acl_fleet: AclFleet, cluster: ConsulCluster
    ) -> None:
        keys = acl_fleet.fleet.keys
        with client(cluster.hosts[0], acl_fleet.tokens.operator) as op:
            assert op.kv_list(keys.members_prefix)  # reads the fleet
            for key in (
                keys.current,
                keys.artifact("main-22222222"),
                keys.member("host-9"),
                keys.decision("d1"),
                keys.outcome("d1"),
                keys.progress("d1", "host-1"),
                keys.pin("main-22222222"),
                keys.history,
                keys.events_seen,
                keys.coordinator("d1"),
            ):
                with pytest.raises(ConsulPermissionDenied):
                    op.kv_put(key, b"{}")
            # What operators do: a request (and its abort request) and inflight.
            assert op.kv_put(keys.request("d1"), b"{}", cas=0)
            assert op.kv_put(keys.abort_request("d1"), b"{}", cas=0)
            op.kv_delete(keys.request("d1"), recurse=True)
            with pytest.raises(ConsulPermissionDenied):
                op.event_fire("build-finished", b'{"app": "web", "artifact": "x"}')
            with pytest.raises(ConsulPermissionDenied):
                op.session_create("operator", 5)
        # Read on the agent it fires raw events through (--agent), on no other: agent read
        # also streams an agent's log, and the server's holds a token it refused, whole
        # (the attacker review: with `agent_prefix ""` any operator read them).
        for agent, allowed in ((cluster.hosts[1], True), (cluster.server, False)):
            status, body = agent.request("GET", "/v1/agent/self", token=acl_fleet.tokens.operator)
            assert (status == 200) is allowed, (agent.name, status, body[:200])
        status, body = cluster.server.request(
            "GET", "/v1/agent/monitor?loglevel=debug", token=acl_fleet.tokens.operator
        )
        assert status == 403, (status, body[:200])

    def test_a_token_rendered_for_another_app_or_node_is_said_everywhere(
        self, acl_fleet: AclFleet, cluster: ConsulCluster
    ) -> None:
        """The install review's case: a host whose token was rendered for a misspelt app
        said it was healthy and logged nothing above info, while no deploy expected it and
        the fleet did not list it. check-config, the watcher's log and /health (through
        `watcherctl status`) now each say so; the watcher's own token passes all three."""
        fleet = acl_fleet.fleet
        w = fleet.watchers[2]

        def check_config(exit_code: int = 0) -> str:
            done = subprocess.run(
                [str(BIN / "watcher"), "check-config", "-c", str(w.config_path)],
                capture_output=True,
                text=True,
                env=w.env(),
                timeout=60,
            )
            assert done.returncode == exit_code, (done.returncode, done.stderr)
            return done.stderr

        # its own token may do all it needs (the advice against hooks as root aside: the
        # test's apps have no user)
        said = [line for line in check_config().splitlines() if "apps.web.user:" not in line]
        assert not [line for line in said if "token" in line], said
        base = f"{fleet.kv_prefix}/apps/web/"
        refused = "Consul refused this watcher's token, so it takes part in no deploy of web"
        cases = [
            # (the policy's app and node, or None: a token Consul does not know; what
            # check-config says; what `status` says; the log event said once, as an error)
            (("wbe", w.name), f"apps.web: the token may not read {base}:", refused, None),
            (
                ("web", fleet.watchers[0].name),  # another host's: reads, writes its own keys
                f"apps.web: the token may not write members/{w.name}, hosts/{w.name}, "
                f"progress/{w.name}/check-config-probe under {base}: no deploy would expect "
                "this host",
                "no Consul session: ",
                "session_create_failed",
            ),
            (
                None,
                "consul.token: Consul does not know this token",
                "no Consul session: ",
                "session_create_failed",
            ),
        ]
        for policy, checked, said, event in cases:
            if policy is None:
                secret = str(uuid.uuid4())
            else:
                app, node = policy
                secret, _ = create_token(
                    cluster.server,
                    f"wrong-{fleet.kv_prefix}-{app}-{node}",
                    render("watcher", fleet.kv_prefix, app, node=node),
                )
            w.stop()
            config = yaml.safe_load(w.config_path.read_text())
            config["consul"]["token"] = secret
            w.config_path.write_text(yaml.safe_dump(config))
            # A token Consul does not know fails the check (a reload would not take it); a
            # permission that is missing is a warning (exit 0), as it may be granted later.
            assert checked in check_config(2 if policy is None else 0), policy
            w.start()

            def told(said: str = said) -> bool:
                # 1 for the unhealthy watcher; 3 when its token cannot read `status`'s keys
                status = w.ctl("status", "web", as_json=False, check=False)
                return status.returncode in (1, 3) and said in status.stdout.split("\n")[0]

            wait_for(told, 30, f"status names the refusal ({policy})", fleet)
            time.sleep(3)  # cycles and retries go on: the refusal is logged once, not at each
            errors = [e for e in w.log_events(this_start=True) if e.get("level") == "error"]
            assert len(errors) == 1, errors
            if event is None:
                assert errors[0]["event"] == "consul_token_refused", errors
                assert f"{base}members/{w.name}" in errors[0]["error"], errors
            else:
                assert errors[0]["event"] == event, errors
            if policy is None:
                assert "ACL not found" in errors[0]["error"], errors


class TestCheckConfigWithoutNode:
    def test_an_operators_token_in_a_watcher_config_without_node_is_said(
        self, acl_fleet: AclFleet
    ) -> None:
        """The ACL review: with `node:` left unset (the example's), check-config stopped at
        the agent's name and said only to give the token agent read; for an operator's
        token put in a host's config that was the wrong fix. The app's keys are still
        checked, and the watcher's work it may not do is said."""
        fleet = acl_fleet.fleet
        w = fleet.watchers[2]  # the operator's token reads no agent but host-2's
        config = fleet.config_for(w)
        config["consul"]["token"] = acl_fleet.tokens.operator
        config.pop("node", None)
        path = fleet.workdir / "no-node.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [str(BIN / "watcher"), "check-config", "-c", str(path)],
            capture_output=True,
            text=True,
            env=w.env(),
            timeout=60,
            check=True,
        )
        said = result.stderr
        assert "node: not set, and the token may not read its Consul agent's name" in said
        assert "The keys of this node were not checked" in said
        base = f"{fleet.kv_prefix}/apps/web/"
        assert (
            "apps.web: the token may not write pins/check-config-probe, "
            "coordinator/check-config-probe, decisions/check-config-probe, "
            f"outcomes/check-config-probe, current, events_seen, history under {base}: its "
            "deploys would fail; give it a watcher policy rendered for node <this host>"
        ) in said, said


class TestDocumentedCommands:
    def test_cli_creates_and_updates_a_watcher_token(self, cluster: ConsulCluster) -> None:
        # The commands docs/acl.md gives (render | consul acl policy create, token create,
        # then policy update for a second app), run as written but for jq.
        node = cluster.hosts[0].name
        prefix = f"cli{time.monotonic_ns()}"
        env = {"PATH": "/usr/bin:/bin", **cluster.server.env()}
        policy = f"release-watcher-{prefix}-{node}"

        def consul(*args: str, rules: str | None = None) -> str:
            return subprocess.run(
                [str(cluster.consul_bin), "acl", *args],
                input=rules,
                capture_output=True,
                text=True,
                env=env,
                check=True,
                timeout=10,
            ).stdout

        consul(
            "policy",
            "create",
            "-name",
            policy,
            "-rules",
            "-",
            rules=render("watcher", prefix, "web", node=node),
        )
        secret = json.loads(consul("token", "create", "-policy-name", policy, "-format", "json"))[
            "SecretID"
        ]
        with client(cluster.hosts[0], secret) as mine, pytest.raises(ConsulPermissionDenied):
            mine.kv_put(f"{prefix}/apps/api/inflight", b"d1")
        policy_id = json.loads(consul("policy", "read", "-name", policy, "-format", "json"))["ID"]
        consul(
            "policy",
            "update",
            "-id",
            policy_id,
            "-rules",
            "-",
            rules=render("watcher", prefix, "web", "api", node=node),
        )
        with client(cluster.hosts[0], secret) as mine:
            for app in ("web", "api"):
                assert mine.kv_put(f"{prefix}/apps/{app}/inflight", b"d1", cas=0)
                with pytest.raises(ConsulPermissionDenied):
                    mine.kv_put(f"{prefix}/apps/{app}/artifacts/x", b"{}")
            with pytest.raises(ConsulPermissionDenied):
                mine.kv_put(f"{prefix}/apps/db/inflight", b"d1")

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["watcher", "web"], "needs --node"),
            (["watcher", "--node", "host-1"], "at least one app"),
            (["ci", "--kv-prefix", 'a"b', "web"], "--kv-prefix"),
            (["operator", "web", "we/b"], 'app "we/b"'),
            (["watcher", "--node", "host-1;x", "web"], "--node"),
            (["admin", "web"], "usage"),
            (["ci", "--agent", "host-1", "web"], "--agent is for the operator role only"),
            (["operator", "--node", "host-1", "web"], "--node is for the watcher role only"),
            (["operator", "--agent", "host 1", "web"], '--agent "host 1"'),
        ],
    )
    def test_render_refuses_bad_input(self, argv: list[str], message: str) -> None:
        result = subprocess.run([str(RENDER), *argv], capture_output=True, text=True, check=False)
        assert result.returncode == 2
        assert message in result.stderr and not result.stdout

    def test_a_rendered_policy_says_what_it_was_rendered_for(self) -> None:
        """The ACL review: the template's "or replace ${APP} ... by hand" was rendered too,
        into "or replace prod, web and host-1 by hand". Comments keep the placeholders; the
        second line names what the rules were rendered for, once per app."""
        policy = render("watcher", "prod", "web", "api", node="host-1")
        comments = [line for line in policy.splitlines() if line.lstrip().startswith("#")]
        rules = [line for line in policy.splitlines() if not line.lstrip().startswith("#")]
        assert "# Rendered for kv_prefix prod, app web, node host-1." in comments
        assert "# Rendered for kv_prefix prod, app api, node host-1." in comments
        assert any("${KV_PREFIX}" in line for line in comments), comments
        assert not any("$" in line for line in rules), rules
        assert 'key "prod/apps/api/members/host-1" {' in rules
        (line,) = [x for x in render("ci", "w", "web").splitlines() if "Rendered" in x]
        assert line == "# Rendered for kv_prefix w, app web."

    @pytest.mark.parametrize("flag", ["-h", "--help"])
    def test_render_help_shows_every_role(self, flag: str) -> None:
        result = subprocess.run([str(RENDER), flag], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result
        for role in ("watcher", "operator", "ci", "web"):
            assert f"render-policy {role} " in result.stdout, result.stdout
        assert "consul acl policy create -rules -" in result.stdout
        assert "set -euo" not in result.stdout and "#" not in result.stdout
