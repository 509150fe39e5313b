"""The deploy API of `watcher web` against a real Consul cluster with ACLs on and real daemons.

Each actor holds only the policy docs/acl publishes (or less): an operator token for app
`web`, one for app `api`, a read-only token; the server reads with the read-only token.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.integration.test_deploy_acl import api, create_token, render, watcher_tokens
from tests.support.cluster import ClusterSpec, ConsulCluster
from tests.support.deploys import start_deploy
from tests.support.fleet import BIN, Fleet, wait_for
from tests.support.s3server import S3Server, s3_client
from tests.support.web import WebServer
from watcher.barrier import DeployStore
from watcher.config import S3Settings, load_config
from watcher.consul_api import ConsulClient
from watcher.ctl_fleet import abort_deploy
from watcher.records import FAILED, LIVE, ArtifactRecord, HostRecord, Keys, NodeProgress
from watcher.web import app as web_app
from watcher.web.app import create_app, live_snapshot, sections_mark
from watcher.web.live import LiveFeed

CLUSTER = ClusterSpec(hosts=3, acl=True)


@dataclass
class Env:
    fleet: Fleet
    web: WebServer
    web_operator: str  # operator token for app web (description: "release-watcher test: ...")
    web_operator_who: str
    api_operator: str
    reader: str  # read on every app, no write
    gate: Path  # while it is missing, post_release waits: a deploy stays undecided
    operator_config: Path

    def keys(self, app: str = "web") -> Keys:
        return Keys(self.fleet.kv_prefix, app)

    def written(self, app: str = "web") -> dict[str, int]:
        """What a write of the API could have touched: inflight, history, requests/."""
        keys = self.keys(app)
        kv = self.fleet.kv
        out = {e.key: e.modify_index for e in kv.kv_list(keys.requests_prefix)}
        for key in (keys.inflight, f"{keys.base}/history"):
            entry = kv.kv_get(key)
            if entry is not None:
                out[key] = entry.modify_index
        return out

    def history(self) -> list[dict[str, Any]]:
        import subprocess

        result = subprocess.run(
            [str(BIN / "watcherctl"), "history", "web", "-c", str(self.operator_config), "--json"],
            capture_output=True,
            text=True,
            env=self.fleet.watchers[0].env(),
            timeout=60,
            check=True,
        )
        data: list[dict[str, Any]] = json.loads(result.stdout)
        return data


@pytest.fixture(scope="module")
def env(
    cluster: ConsulCluster, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("web-api")
    prefix = f"w{time.monotonic_ns()}"
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3_client(s3_server.endpoint_url).create_bucket(Bucket=bucket)
    s3 = S3Settings(
        bucket=bucket, prefix="artifacts", region="us-east-1", endpoint_url=s3_server.endpoint_url
    )
    server = cluster.server
    watchers = {
        n: secret for n, (secret, _) in watcher_tokens(server, cluster.hosts, prefix).items()
    }
    web_operator, _ = create_token(server, f"operator-{prefix}", render("operator", prefix, "web"))
    api_operator, _ = create_token(
        server, f"api-operator-{prefix}", render("operator", prefix, "api")
    )
    reader, _ = create_token(
        server, f"reader-{prefix}", f'key_prefix "{prefix}/apps/" {{ policy = "read" }}\n'
    )
    gate = workdir / "gate"
    gate.touch()
    hook = workdir / "post-release"
    hook.write_text(
        f"#!/bin/sh\nfor i in $(seq 300); do [ -e {gate} ] && exit 0; sleep 0.1; done\nexit 0\n"
    )
    hook.chmod(0o755)
    fleet = Fleet(
        cluster,
        s3,
        workdir,
        kv_prefix=prefix,
        consul_tokens=watchers,
        app_extra={"hooks": {"post_release": str(hook)}},
    )
    config = fleet.config_for(fleet.watchers[0])
    config["consul"]["token"] = reader
    config["apps"]["api"] = {"root": str(workdir / "api-root")}
    web_config = workdir / "web.yaml"
    web_config.write_text(yaml.safe_dump(config))
    config["consul"]["token"] = web_operator
    operator_config = workdir / "operator.yaml"
    operator_config.write_text(yaml.safe_dump(config))
    web = WebServer(web_config, workdir / "web.log")
    fleet.start()
    web.start()
    try:
        yield Env(
            fleet=fleet,
            web=web,
            web_operator=web_operator,
            web_operator_who=f"release-watcher test: operator-{prefix}",
            api_operator=api_operator,
            reader=reader,
            gate=gate,
            operator_config=operator_config,
        )
    finally:
        web.stop()
        fleet.stop()


def error_of(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"])


class TestDeployApiWithAcls:
    def test_no_token_unknown_token_and_read_only_change_nothing(self, env: Env) -> None:
        v1 = env.fleet.publish("v1")
        before = env.written()
        path = "/api/v1/apps/web/deploys"

        r = env.web.post(path, {"artifact": v1.id})
        assert r.status_code == 401 and "needs your Consul ACL token" in error_of(r)

        r = env.web.post(path, {"artifact": v1.id}, token=str(uuid.uuid4()))
        assert r.status_code == 401 and "ACL not found" in error_of(r), r.text
        assert r.headers["www-authenticate"].startswith("Bearer "), r.headers
        # a read with a token Consul does not know is the same 401, not Consul's 403
        r = env.web.get("/api/v1/apps/web/fleet", token=str(uuid.uuid4()))
        assert r.status_code == 401 and "does not know this token" in error_of(r), r.text
        assert r.headers["www-authenticate"].startswith("Bearer "), r.headers

        r = env.web.post(path, {"artifact": v1.id}, token=env.reader)
        assert r.status_code == 403, r.text
        assert "Permission denied" in error_of(r)  # Consul's own words, verbatim

        with env.web.client(**{"X-Consul-Token": env.reader}) as c:
            r = c.post(path, json={"artifact": v1.id})
        assert r.status_code == 403, r.text
        assert env.written() == before

    def test_a_token_for_web_cannot_deploy_api(self, env: Env) -> None:
        before = env.written("api")
        r = env.web.post("/api/v1/apps/api/deploys", {"artifact": "main-0000"}, env.web_operator)
        assert r.status_code == 403, r.text
        assert "Permission denied" in error_of(r)
        # The api operator gets past Consul's ACLs, and is refused for a stated reason.
        refused = 'watcher_web_writes_total{action="deploy",app="api",result="refused"}'

        def counted() -> float:
            line = [x for x in env.web.get("/metrics").text.splitlines() if x.startswith(refused)]
            return float(line[0].split()[-1]) if line else 0.0

        was = counted()
        r = env.web.post("/api/v1/apps/api/deploys", {"artifact": "main-0000"}, env.api_operator)
        assert r.status_code == 404, r.text
        assert "unknown artifact main-0000" in error_of(r)
        assert env.written("api") == before
        # counted as refused (only the start's own refusals were, not an unknown artifact)
        assert counted() == was + 1

    def test_deploy_shows_in_watcherctl_history_with_the_tokens_description(self, env: Env) -> None:
        v2 = env.fleet.publish("v2")
        started = time.time()
        r = env.web.post("/api/v1/apps/web/deploys", {"artifact": v2.id}, env.web_operator)
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["requested_by"] == env.web_operator_who
        outcome = env.fleet.wait_outcome(body["deploy"])
        assert outcome["result"] == "committed", outcome
        assert set(env.fleet.currents().values()) == {body["release"]}
        [entry] = [d for d in env.history() if d["deploy"] == body["deploy"]]
        assert entry["requested_by"] == env.web_operator_who
        assert entry["result"] == "committed"
        from watcher.records import parse_iso

        assert abs(parse_iso(entry["requested_at"]).timestamp() - started) < 60
        # Every host's record lists what it holds verified: the build list counts them.
        wait_for(
            lambda: any(
                b["id"] == v2.id and b["prefetched_on"] == 3
                for b in env.web.get("/api/v1/apps/web/builds").json()["builds"]
            ),
            40,
            "v2 counted as prefetched on 3 hosts",
        )
        # The API's own history says the same.
        [api_entry] = [
            d
            for d in env.web.get("/api/v1/apps/web/deploys").json()["deploys"]
            if d["deploy"] == body["deploy"]
        ]
        assert api_entry["requested_by"] == env.web_operator_who
        env.fleet.wait_idle()

    def test_read_only_token_cannot_abort_the_operator_can(self, env: Env) -> None:
        v3 = env.fleet.publish("v3")
        env.gate.unlink()
        try:
            r = env.web.post("/api/v1/apps/web/deploys", {"artifact": v3.id}, env.web_operator)
            assert r.status_code == 202, r.text
            deploy = r.json()["deploy"]
            # While it is in flight, history lists it first (it listed the deploy before,
            # whose id an operator passed to abort: "too late").
            listed = env.web.get("/api/v1/apps/web/deploys?limit=1", env.reader).json()
            assert [d["deploy"] for d in listed["deploys"]] == [deploy], listed
            assert listed["deploys"][0]["result"] is None, listed
            assert env.history()[0]["deploy"] == deploy
            abort = f"/api/v1/apps/web/deploys/{deploy}/abort"
            r = env.web.post(abort, {"reason": "no"}, env.reader)
            assert r.status_code == 403, r.text
            assert "Permission denied" in error_of(r)
            assert env.fleet.decision(deploy) is None
            r = env.web.post(abort, {}, None)
            assert r.status_code == 401
            assert env.fleet.decision(deploy) is None
            r = env.web.post(abort, {"reason": "wrong build"}, env.web_operator)
            assert r.status_code == 200, r.text
            assert r.json()["aborted"] is True, r.text  # what the acks establish
            # The decision record follows: written by the host that establishes it first.
            wait_for(lambda: env.fleet.decision(deploy) is not None, 10, "decision record")
            decision = env.fleet.decision(deploy)
            assert decision is not None and decision["outcome"] == "abort"
            assert (
                env.web_operator_who in decision["reason"] and "wrong build" in decision["reason"]
            )
            # Who asked, once: the request names them, its reason is the operator's text.
            assert decision["reason"].count(env.web_operator_who) == 1, decision["reason"]
            r = env.web.post(abort, {}, env.web_operator)
            assert r.status_code == 409 and "already decided" in error_of(r)
        finally:
            env.gate.touch()
        assert env.fleet.wait_outcome(deploy)["result"] == "aborted"
        env.fleet.wait_idle()

    def test_a_refusal_worded_for_watcherctl_names_the_apis_own_field(self, env: Env) -> None:
        # App api has no daemons: one live member (a session the test holds) and a known
        # host without one. The refusal said "pass --allow-missing", a CLI flag.
        kv = env.fleet.kv
        store = DeployStore(kv, env.fleet.kv_prefix, "api")
        artifact = ArtifactRecord(
            id="main-a11a11a1",
            url="s3://b/artifacts/api/main-a11a11a1.tar.gz",
            sha256="a" * 64,
            size=1,
        )
        session = kv.session_create("test h1", 30, checks=[])
        try:
            assert kv.kv_put(store.keys.artifact(artifact.id), artifact.to_json())
            assert kv.kv_put(store.keys.member("h1"), b"{}", acquire=session)
            ghost = HostRecord(node="ghost", release=None, last_seen="2026-12-01T00:00:00Z")
            assert kv.kv_put(store.keys.host("ghost"), ghost.to_json())
            r = env.web.post(
                "/api/v1/apps/api/deploys", {"artifact": artifact.id}, env.api_operator
            )
            assert r.status_code == 409, r.text
            assert "ghost have no member key" in r.json()["error"], r.text
            assert 'send "allow_missing": true' in r.json()["error"], r.text
            assert "--allow-missing" not in r.json()["error"], r.text
            # A held host: the deploy starts (it aborts on that host), with the warning
            # `watcherctl deploy` prints (the API's was empty).
            held = HostRecord(node="h1", release=None, last_seen=ghost.last_seen, hold="disk")
            assert kv.kv_put(store.keys.host("h1"), held.to_json())
            body = {"artifact": artifact.id, "allow_missing": True}
            r = env.web.post("/api/v1/apps/api/deploys", body, env.api_operator)
            assert r.status_code == 202, r.text
            warning = r.json()["warning"]
            assert "held, by their last records: h1: disk" in warning, r.text
            assert "`watcherctl release-hold api` on the host lifts it" in warning, r.text
        finally:
            kv.session_destroy(session)
            kv.kv_delete(store.keys.base + "/", recurse=True)

    def test_abort_of_a_contested_deploy_says_so_and_writes_nothing(self, env: Env) -> None:
        # App api has no daemons: the test writes a deploy whose acks contradict each
        # other (one host live, the other's ack rewritten to failed).
        kv = env.fleet.kv
        store = DeployStore(kv, env.fleet.kv_prefix, "api")
        artifact = ArtifactRecord(
            id="main-c0c0a0a0",
            url="s3://b/artifacts/api/main-c0c0a0a0.tar.gz",
            sha256="c" * 64,
            size=1,
        )
        joined = start_deploy(store, "20261202T000000Z-c0c0a0", {"h1": "", "h2": ""}, artifact)
        try:
            for node, state in (("h1", LIVE), ("h2", FAILED)):
                ack = NodeProgress(node=node, state=state, deploy=joined.id, digest=joined.digest)
                assert kv.kv_put(store.keys.progress(joined.id, node), ack.to_json())
            # The live view says contested, with no abort button (it said "undecided").
            shown = live_snapshot(store)["deploy"]
            assert shown["contested"] and not shown["undecided"], shown
            r = env.web.post(f"/api/v1/apps/api/deploys/{joined.id}/abort", {}, env.api_operator)
            assert r.status_code == 409, r.text
            assert f"deploy {joined.id} is contested" in r.json()["error"]
            # watcherctl abort goes through the same function: it leaves it alone too.
            assert abort_deploy(store, joined.id, "", by="tests", wait=1.0)[0] == "contested"
            assert kv.kv_get(store.keys.abort_request(joined.id)) is None
        finally:
            kv.kv_delete(store.keys.base + "/", recurse=True)

    def test_rollback_through_the_api(self, env: Env) -> None:
        # Two deploys of its own: run alone, the module's fleet has no previous release yet.
        for version in ("v6-before", "v6"):
            v6 = env.fleet.publish(version)
            r = env.web.post("/api/v1/apps/web/deploys", {"artifact": v6.id}, env.web_operator)
            assert r.status_code == 202, r.text
            assert env.fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
            env.fleet.wait_idle()
        current = env.fleet.kv.kv_get(env.keys().current)
        assert current is not None and current.value is not None
        previous = json.loads(current.value)["previous"]["release"]
        r = env.web.post("/api/v1/apps/web/rollbacks", {}, env.web_operator)
        assert r.status_code == 202, r.text
        assert r.json()["release"] == previous and r.json()["kind"] == "rollback"
        assert r.json()["warning"] == "", r.json()
        assert env.fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
        assert set(env.fleet.currents().values()) == {previous}
        env.fleet.wait_idle()
        # To the release the fleet is on: started (a host off `current` would converge
        # anyway), with a warning that says so.
        again = {"release": previous}
        r = env.web.post("/api/v1/apps/web/rollbacks", again, env.web_operator)
        assert r.status_code == 202, r.text
        assert f"the fleet is already on {previous}" in r.json()["warning"], r.json()
        assert env.fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
        env.fleet.wait_idle()
        # The page's previous-release button: a plain rollback (its checks apply), only to
        # the release the page showed; a deploy made since would be undone otherwise.
        now = json.loads(env.fleet.kv.kv_get(env.keys().current).value)["previous"]["release"]
        stale = {"previous": f"20200101T000000Z-{v6.id}"}
        r = env.web.post("/api/v1/apps/web/rollbacks", stale, env.web_operator)
        assert r.status_code == 409, r.text
        assert r.json()["error"] == (
            f"app web: the previous release is now {now}, not {stale['previous']}: the fleet "
            "moved since you looked; look again and choose"
        )
        both = {"previous": now, "release": now}
        r = env.web.post("/api/v1/apps/web/rollbacks", both, env.web_operator)
        assert r.status_code == 422 and "not both" in r.json()["error"], r.text
        assert env.fleet.inflight() is None
        r = env.web.post("/api/v1/apps/web/rollbacks", {"previous": now}, env.web_operator)
        assert r.status_code == 202 and r.json()["release"] == now, r.text
        assert env.fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
        env.fleet.wait_idle()

    def test_a_deploy_from_a_page_shown_before_another_deploy_ended_is_refused(
        self, env: Env
    ) -> None:
        """The page sends the release it shows the fleet on (`current`): a second tab that
        still shows the fleet on the release before another deploy must not replace that
        deploy's release unseen (a downgrade); the deploy starts while it still holds."""
        before = env.fleet.publish("v7-before")
        r = env.web.post("/api/v1/apps/web/deploys", {"artifact": before.id}, env.web_operator)
        assert r.status_code == 202, r.text
        assert env.fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
        env.fleet.wait_idle()
        seen = r.json()["release"]
        newer, older = env.fleet.publish("v7-newer"), env.fleet.publish("v7-older")
        # The first tab deploys, looking at the fleet on `seen`: started.
        first = {"artifact": newer.id, "current": seen}
        r = env.web.post("/api/v1/apps/web/deploys", first, env.web_operator)
        assert r.status_code == 202, r.text
        assert env.fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
        env.fleet.wait_idle()
        now = r.json()["release"]
        # The second tab was shown the fleet on `seen` too: refused, nothing started.
        stale = {"artifact": older.id, "current": seen}
        r = env.web.post("/api/v1/apps/web/deploys", stale, env.web_operator)
        assert r.status_code == 409, r.text
        assert r.json()["error"] == (
            f"app web: the fleet's release is now {now}, not {seen}: the fleet moved since "
            "you looked; look again and choose"
        )
        assert env.fleet.inflight() is None
        assert set(env.fleet.currents().values()) == {now}
        # A tab shown the fleet on no release yet (its first deploy), once one has ended:
        # refused alike, for a deploy and a rollback.
        for path, body in (
            ("deploys", {"artifact": older.id, "current": ""}),
            ("rollbacks", {"release": seen, "current": ""}),
        ):
            r = env.web.post(f"/api/v1/apps/web/{path}", body, env.web_operator)
            assert r.status_code == 409, r.text
            assert r.json()["error"] == (
                f"app web: the fleet's release is now {now}, not none yet: the fleet moved "
                "since you looked; look again and choose"
            )
        assert env.fleet.inflight() is None
        bad = {"artifact": older.id, "current": "../x"}
        r = env.web.post("/api/v1/apps/web/deploys", bad, env.web_operator)
        assert r.status_code == 422 and "current" in r.json()["error"], r.text
        # A rollback from that tab (the history's button, to a named release; the previous
        # release's): refused alike, though the release it names was committed.
        for body in ({"release": seen}, {"previous": seen}):
            r = env.web.post(
                "/api/v1/apps/web/rollbacks", {**body, "current": seen}, env.web_operator
            )
            assert r.status_code == 409, (body, r.text)
            assert f"the fleet's release is now {now}, not {seen}" in r.json()["error"], r.text
        assert env.fleet.inflight() is None
        assert set(env.fleet.currents().values()) == {now}
        # Looked again: started.
        r = env.web.post("/api/v1/apps/web/deploys", {**stale, "current": now}, env.web_operator)
        assert r.status_code == 202, r.text
        assert env.fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
        env.fleet.wait_idle()

    def test_a_rewritten_current_is_shown_as_not_trusted(self, env: Env) -> None:
        """Any host's token can rewrite `current`: the API and the page must not report
        the fleet on a release the acks of its deploy did not commit."""
        if env.fleet.kv.kv_get(env.keys().current) is None:
            v = env.fleet.publish("v-current")
            r = env.web.post("/api/v1/apps/web/deploys", {"artifact": v.id}, env.web_operator)
            assert env.fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
            env.fleet.wait_idle()
        entry = env.fleet.kv.kv_get(env.keys().current)
        assert entry is not None and entry.value is not None
        evil = "20990101T000000Z-evil-00000000"
        forged = {**json.loads(entry.value), "release": evil}
        assert env.fleet.kv.kv_put(env.keys().current, json.dumps(forged).encode())
        try:
            fleet = env.web.get("/api/v1/apps/web/fleet", env.reader).json()
            assert fleet["current"] is None, fleet
            assert evil in fleet["current_problems"]["current"], fleet
            page = env.web.get("/apps/web", env.reader).text
            assert 'Fleet release <strong class="release">unknown</strong>' in page
            assert "Not trusted: `current` names release " + evil in page
        finally:
            assert env.fleet.kv.kv_put(env.keys().current, entry.value)
        assert env.web.get("/api/v1/apps/web/fleet", env.reader).json()["current_problems"] == {}

    def test_bad_input_is_a_clear_4xx_and_writes_nothing(self, env: Env) -> None:
        before = env.written()
        tok = env.web_operator
        deploys = "/api/v1/apps/web/deploys"
        cases: list[tuple[str, Any, int, str]] = [
            ("malformed", {"content": b'{"artifact": '}, 400, "malformed JSON body"),
            ("not an object", {"content": b"[1, 2]"}, 422, "body"),
            ("missing field", {"json": {}}, 422, "artifact: Field required"),
            ("bad id", {"json": {"artifact": "../etc"}}, 422, "is not an artifact id"),
            ("unknown id", {"json": {"artifact": "main-deadbeef"}}, 404, "unknown artifact"),
            ("oversized", {"content": b'{"artifact": "' + b"a" * 20000 + b'"}'}, 413, "over"),
        ]
        with env.web.client(tok, **{"Content-Type": "application/json"}) as c:
            for what, kw, status, text in cases:
                r = c.post(deploys, **kw)
                assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
                assert text in error_of(r), f"{what}: {r.text}"
            r = c.post("/api/v1/apps/nope/deploys", json={"artifact": "main-1"})
            assert r.status_code == 404 and "apps.nope: no such app" in error_of(r)
            # A typo or a "yes" is refused, not read as a rollback to `previous` / true.
            r = c.post(
                "/api/v1/apps/web/rollbacks",
                json={"relase": "20261203T052701Z-main-3bfc2695", "x": 1},
            )
            assert r.status_code == 422 and "relase: unknown field" in error_of(r), r.text
            assert "x: unknown field" in error_of(r), r.text
            r = c.post("/api/v1/apps/web/rollbacks", json={"allow_missing": "yes"})
            assert r.status_code == 422 and "allow_missing:" in error_of(r), r.text
            r = c.post(deploys, json={"artifact": "main-1", "allow_missing": 1})
            assert r.status_code == 422 and "allow_missing:" in error_of(r), r.text
            r = c.post("/api/v1/apps/web/deploys/20261202T224412Z-abcdef/abort", json={"why": "x"})
            assert r.status_code == 422 and "why: unknown field" in error_of(r), r.text
            forged = {"reason": "\x1b[2Jfleet compromised\nhost-1: live"}
            r = c.post("/api/v1/apps/web/deploys/20261202T224412Z-abcdef/abort", json=forged)
            assert r.status_code == 422 and "control character '\\x1b'" in error_of(r), r.text
            r = c.post("/api/v1/apps/web/rollbacks", json={"release": "yesterday"})
            assert r.status_code == 422 and "is not a release name" in error_of(r)
            r = c.post("/api/v1/apps/web/rollbacks", json={"release": "20200101T000000Z-x"})
            assert r.status_code == 404 and "unknown release 20200101T000000Z-x" in error_of(r)
            r = c.post("/api/v1/apps/web/deploys/..%2Fx/abort", json={})
            assert r.status_code == 400 and "encoded slash (%2F)" in error_of(r), r.text
        # A token in the query string: refused before anything else, even a valid one.
        with env.web.client() as c:
            r = c.post(f"{deploys}?token={tok}", json={"artifact": "main-1"})
            assert r.status_code == 400 and "token in the URL is refused" in error_of(r)
            r = c.get(f"/api/v1/apps/web/fleet?X-Consul-Token={tok}")
            assert r.status_code == 400
        assert env.written() == before

    def test_every_route_is_in_the_served_openapi(self, env: Env) -> None:
        spec = env.web.get("/openapi.json").json()
        served = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
        expected = {
            ("/api/v1/apps", "GET"),
            ("/api/v1/apps/{app}/fleet", "GET"),
            ("/api/v1/apps/{app}/builds", "GET"),
            ("/api/v1/apps/{app}/deploys", "GET"),
            ("/api/v1/apps/{app}/deploys", "POST"),
            ("/api/v1/apps/{app}/deploys/{deploy_id}", "GET"),
            ("/api/v1/apps/{app}/deploys/{deploy_id}/abort", "POST"),
            ("/api/v1/apps/{app}/rollbacks", "POST"),
            ("/api/v1/apps/{app}/live", "GET"),
            ("/healthz", "GET"),
            ("/metrics", "GET"),
        }
        assert served == expected
        # HEAD answers too, as its own route out of the schema (one operationId each).
        with env.web.client() as c:
            assert c.head("/healthz").status_code == 200
        # Each documented GET answers (the page's own routes are not part of the API).
        deploy = env.web.get("/api/v1/apps/web/deploys").json()["deploys"][0]["deploy"]
        for path, method in sorted(served):
            if method != "GET" or path.endswith("/live"):
                continue
            url = path.replace("{app}", "web").replace("{deploy_id}", deploy)
            r = env.web.get(url)
            assert r.status_code == 200, f"{url}: {r.status_code} {r.text[:200]}"
        with env.web.client() as c:  # the real server answers HEAD with no body
            heads = [c.head(path) for path in ("/healthz", "/", "/apps/web")]
            heads += [
                c.head(path.replace("{app}", "web").replace("{deploy_id}", deploy))
                for path, method in sorted(served)
                if method == "GET" and not path.endswith("/live")
            ]
            live = c.head("/api/v1/apps/web/live")  # over uvicorn: answered, not streamed
        for head in heads:
            assert head.status_code == 200 and head.content == b"", (head.url, head)
        assert live.status_code == 200 and live.content == b"", live
        assert live.headers["content-type"].startswith("text/event-stream"), live.headers
        assert "content-length" not in live.headers, live.headers
        assert heads[1].headers["content-type"].startswith("text/html"), heads[1].headers
        # Each POST documents its JSON body.
        for path, method in served:
            if method == "POST" and not path.endswith("/abort"):
                op = spec["paths"][path]["post"]
                assert "application/json" in op["requestBody"]["content"], path
        # A record dated in the future (its `created_at` is CI's free text) written before
        # v4: newest first is by when Consul got the record, not by that date.
        v3 = env.fleet.publish("v3")
        future = replace(v3, id="future-1", created_at="9999-12-31T23:59:59Z")
        env.fleet.kv.kv_put(env.fleet.keys.artifact(future.id), future.to_json())
        v4 = env.fleet.publish("v4")
        builds = env.web.get("/api/v1/apps/web/builds").json()["builds"]
        ids = [b["id"] for b in builds]
        assert ids[:2] == [v4.id, future.id] and len(ids) >= 4, ids
        [b4] = [b for b in builds if b["id"] == v4.id]
        assert b4["size"] == v4.size and b4["commit"] == v4.commit and b4["branch"] == "main"
        assert b4["uploading"] is False
        # Its publish not finished: shown so, no deploy button, and a deploy refused (409).
        key = env.fleet.keys.artifact(v4.id)
        store = DeployStore(env.fleet.kv, env.fleet.kv_prefix, "web")
        mark = sections_mark(store)
        env.fleet.kv.kv_put(key, replace(v4, uploading=True).to_json())
        # The same builds, one record rewritten: open pages fetch the builds again.
        assert sections_mark(store) != mark
        try:
            [b4] = [
                b
                for b in env.web.get("/api/v1/apps/web/builds").json()["builds"]
                if b["id"] == v4.id
            ]
            assert b4["uploading"] is True
            page = env.web.get("/apps/web").text
            row = page.split(f'<tr data-artifact="{v4.id}">', 1)[1].split("</tr>", 1)[0]
            assert ">uploading</span>" in row and 'data-action="deploy"' not in row, row
            r = env.web.post("/api/v1/apps/web/deploys", {"artifact": v4.id}, env.web_operator)
            assert r.status_code == 409, r.text
            assert f"artifact {v4.id} is still being uploaded" in r.json()["error"], r.text
        finally:
            env.fleet.kv.kv_put(key, v4.to_json())

    def test_sse_pushes_the_deploy_in_flight(self, env: Env) -> None:
        v5 = env.fleet.publish("v5")
        seen: list[dict[str, Any]] = []
        with env.web.client() as c, c.stream("GET", "/api/v1/apps/web/live") as stream:
            assert stream.headers["cache-control"] == "no-store"  # fleet state, read with a token
            lines = stream.iter_lines()
            r = env.web.post("/api/v1/apps/web/deploys", {"artifact": v5.id}, env.web_operator)
            assert r.status_code == 202, r.text
            deploy = r.json()["deploy"]
            end = time.monotonic() + 60
            for line in lines:
                assert time.monotonic() < end, "no live state within 60s"
                if not line.startswith("data: "):
                    continue
                snap = json.loads(line[6:])
                seen.append(snap)
                d = snap.get("deploy")
                if d and d["deploy"] == deploy and d["result"] == "committed":
                    break
        states = {
            h["state"]
            for s in seen
            if (s.get("deploy") or {}).get("deploy") == deploy
            for h in s["deploy"]["hosts"].values()
        }
        assert "live" in states, seen[-3:]
        metrics = env.web.get("/metrics").text
        assert 'watcher_web_requests_total{method="POST",route="/api/v1/apps/{app}/deploys"' in (
            metrics
        )
        assert "watcher_web_sse_clients" in metrics
        env.fleet.wait_idle()

    def test_an_unreadable_request_in_the_history_is_named_not_fatal(self, env: Env) -> None:
        """Any host's token writes `history`: a request there that does not parse is named
        on the page, which shows the deploy before it (the page answered 502 before)."""
        kv, keys = env.fleet.kv, env.keys()
        if kv.kv_get(keys.history) is None:
            v = env.fleet.publish("v-history")
            r = env.web.post("/api/v1/apps/web/deploys", {"artifact": v.id}, env.web_operator)
            assert env.fleet.wait_outcome(r.json()["deploy"])["result"] == "committed"
        env.fleet.wait_idle()
        entry = kv.kv_get(keys.history)
        assert entry is not None and entry.value is not None
        before = json.loads(entry.value)
        bad = {"id": "zz1", "kind": "deploy", "requested_at": "not-a-date"}
        assert kv.kv_put(keys.request("zz1"), json.dumps(bad).encode())
        doc = {**before, "deploys": [*before["deploys"], "zz1"]}
        assert kv.kv_put(keys.history, json.dumps(doc).encode())
        try:
            page = env.web.get("/apps/web", env.reader)
            assert page.status_code == 200, page.text
            assert "Unreadable record: deploy zz1 cannot be read" in page.text
            assert f'data-deploy="{before["deploys"][-1]}"' in page.text
        finally:
            assert kv.kv_put(keys.history, entry.value)
            kv.kv_delete(keys.request("zz1"))

    def test_records_a_host_may_write_cannot_break_the_page_or_history(self, env: Env) -> None:
        """Any host's token writes `outcomes/` and its own acks: an outcome whose result is a
        list or whose reason is NaN, or an ack timing past year 9999 in UTC, answered 500 on
        the page, the history API and `watcherctl history` before."""
        kv, keys = env.fleet.kv, env.keys()
        v = env.fleet.publish("v-forged")
        r = env.web.post("/api/v1/apps/web/deploys", {"artifact": v.id}, env.web_operator)
        deploy = r.json()["deploy"]
        assert env.fleet.wait_outcome(deploy)["result"] == "committed"
        env.fleet.wait_idle()
        outcome = kv.kv_get(keys.outcome(deploy))
        host = env.fleet.watchers[1].name
        ack = kv.kv_get(keys.progress(deploy, host))
        assert outcome is not None and outcome.value and ack is not None and ack.value
        forged_ack = json.loads(ack.value)
        forged_ack["timings"] = {**forged_ack["timings"], "live_at": "9999-12-31T23:59:59-01:00"}
        for forged in (
            {**json.loads(outcome.value), "result": ["x"]},
            json.dumps({**json.loads(outcome.value), "reason": 0.5}).replace("0.5", "NaN"),
        ):
            raw = forged if isinstance(forged, str) else json.dumps(forged)
            assert kv.kv_put(keys.outcome(deploy), raw.encode())
            assert kv.kv_put(keys.progress(deploy, host), json.dumps(forged_ack).encode())
            try:
                for path in ("/api/v1/apps/web/deploys", f"/api/v1/apps/web/deploys/{deploy}"):
                    answer = env.web.get(path, env.reader)
                    assert answer.status_code == 200, (raw, path, answer.text)
                    assert "NaN" not in answer.text
                page = env.web.get("/apps/web", env.reader)
                assert page.status_code == 200, (raw, page.text)
                assert f'data-deploy="{deploy}"' in page.text
                assert any(d["deploy"] == deploy for d in env.history())
            finally:
                assert kv.kv_put(keys.outcome(deploy), outcome.value)
                assert kv.kv_put(keys.progress(deploy, host), ack.value)
        # Its own host record that does not parse: its row says so (it was a bare "-").
        record = kv.kv_get(keys.host(host))
        assert record is not None and record.value
        assert kv.kv_put(keys.host(host), b"\xff not json")
        try:
            rows = env.web.get("/api/v1/apps/web/fleet", env.reader).json()["hosts"]
            assert "not JSON" in rows[host]["record_problem"] and rows[host]["member"], rows
            page = env.web.get("/apps/web", env.reader)
            assert page.status_code == 200, page.text
            assert 'class="tag bad record-problem"' in page.text, page.text
            # A lone surrogate in its hold (and in its ack's error): no longer a 500.
            lone = json.loads(record.value)
            lone["hold"] = "HOLD-\ud800"
            assert kv.kv_put(keys.host(host), json.dumps(lone).encode())
            forged_ack = {**json.loads(ack.value), "error": "bad \udcff path"}
            # ... and timings named like the ack's own fields: they must not override them.
            forged_ack["timings"] = {**forged_ack["timings"], "state": "failed", "output_tail": "x"}
            assert kv.kv_put(keys.progress(deploy, host), json.dumps(forged_ack).encode())
            for path in (
                "/api/v1/apps/web/fleet",
                "/apps/web",
                f"/api/v1/apps/web/deploys/{deploy}",
            ):
                answer = env.web.get(path, env.reader)
                assert answer.status_code == 200, (path, answer.text)
            rows = env.web.get("/api/v1/apps/web/fleet", env.reader).json()["hosts"]
            assert rows[host]["hold"] == "HOLD-\ufffd", rows
            # Control and bidirectional characters are shown escaped, as watcherctl does.
            lone["hold"] = "by \u202eevil\x1b[31m red"
            assert kv.kv_put(keys.host(host), json.dumps(lone).encode())
            page = env.web.get("/apps/web", env.reader).text
            assert "by \\u202eevil\\x1b[31m red" in page, page
            assert "\u202e" not in page and "\x1b" not in page
            # A host's alarm (it stopped where it stands): its row shows it, escaped too.
            lone["alarm"] = "current names deploy X, <b>which</b> \u202e: not followed"
            assert kv.kv_put(keys.host(host), json.dumps(lone).encode())
            rows = env.web.get("/api/v1/apps/web/fleet", env.reader).json()["hosts"]
            assert rows[host]["alarm"] == lone["alarm"], rows
            page = env.web.get("/apps/web", env.reader).text
            assert '<span class="tag bad">alarm</span> current names deploy X, &lt;b&gt;' in page
            assert "which&lt;/b&gt; \\u202e: not followed" in page, page
            # Its live tree gone (it serves nothing): the API and its row say so, escaped.
            lone["broken"] = "live release r <i>2</i> is not complete here: gone"
            assert kv.kv_put(keys.host(host), json.dumps(lone).encode())
            rows = env.web.get("/api/v1/apps/web/fleet", env.reader).json()["hosts"]
            assert rows[host]["broken"] == lone["broken"], rows
            page = env.web.get("/apps/web", env.reader).text
            assert (
                '<span class="tag bad">serves nothing</span> live release r &lt;i&gt;2' in page
            ), page
            shown = env.web.get(f"/api/v1/apps/web/deploys/{deploy}", env.reader).json()
            assert shown["hosts"][host]["state"] == "live", shown["hosts"][host]
            assert shown["hosts"][host]["output_tail"] == "", shown["hosts"][host]
        finally:
            assert kv.kv_put(keys.host(host), record.value)
            assert kv.kv_put(keys.progress(deploy, host), ack.value)
        # A history that does not parse: said, not "no deploy recorded".
        history = kv.kv_get(keys.history)
        assert history is not None and history.value
        assert kv.kv_put(keys.history, b"not json")
        try:
            listed = env.web.get("/api/v1/apps/web/deploys", env.reader).json()
            # The deploys that ended are still shown, from their own records, marked.
            assert keys.history in listed["problem"], listed
            assert "is not a JSON object" in listed["problem"], listed
            assert listed["deploys"] and all(d["unlisted"] for d in listed["deploys"]), listed
            page = env.web.get("/apps/web", env.reader).text
            assert 'class="banner error history-problem"' in page, page
            assert "not in the history record: shown from its own records" in page
            argv = [str(BIN / "watcherctl"), "history", "web", "-c", str(env.operator_config)]
            ctl = subprocess.run(
                argv, capture_output=True, text=True, env=env.fleet.watchers[0].env(), timeout=60
            )
            assert ctl.returncode == 1, (ctl.stdout, ctl.stderr)
            assert "the history record of web is not to be trusted" in ctl.stderr, ctl.stderr
            assert "no deploys of web recorded" not in ctl.stdout, ctl.stdout
            assert "NOT IN THE HISTORY RECORD" in ctl.stdout, ctl.stdout
            # Parsed, but written by hand: two ended deploys left out, and made-up ids.
            data = json.loads(history.value)
            hidden = data["deploys"][-3:-1]
            made_up = [f"20260101T0000{n // 100:02d}Z-{n:06x}" for n in range(300)]
            data["deploys"] = [d for d in data["deploys"] if d not in hidden] + made_up
            assert kv.kv_put(keys.history, json.dumps(data).encode())
            listed = env.web.get("/api/v1/apps/web/deploys?limit=200", env.reader).json()
            rows = {d["deploy"]: d for d in listed["deploys"]}
            assert set(hidden) <= set(rows), (hidden, list(rows))
            assert all(rows[d]["unlisted"] for d in hidden)
            assert not any(rows[d].get("unlisted") for d in set(rows) - set(hidden)), rows
            assert "leaves out 2 deploy(s) that ended" in listed["problem"], listed
            # the made-up ids in the window asked for (200 rows), after the real ones
            found = re.search(r"(\d+) deploy\(s\) listed in \S+ have no record", listed["problem"])
            assert found and int(found[1]) == 200 - (len(rows) - len(hidden)), listed["problem"]
            ctl = subprocess.run(
                argv, capture_output=True, text=True, env=env.fleet.watchers[0].env(), timeout=60
            )
            assert ctl.returncode == 1 and "have no record in KV" in ctl.stderr, ctl.stderr
            assert ctl.stdout.count("NOT IN THE HISTORY RECORD") == 2, ctl.stdout
        finally:
            assert kv.kv_put(keys.history, history.value)
        assert env.web.get("/api/v1/apps/web/deploys", env.reader).json()["problem"] == ""


def app_with_token(env: Env, token: str) -> Any:
    """The web app of ``env``'s config, on loopback, reading with ``token``."""
    config = load_config(env.web.config)
    return create_app(
        replace(config, consul=replace(config.consul, token=token)), listen_host="127.0.0.1"
    )


class TestNotOnLoopback:
    """Bound to another address, every read needs a token with read on that app."""

    def test_reads_need_a_token_that_can_read_the_app(self, env: Env) -> None:
        app = create_app(load_config(env.web.config), listen_host="192.0.2.10")
        with TestClient(app) as c:
            r = c.get("/api/v1/apps/web/fleet")
            assert r.status_code == 401 and "not bound to loopback" in error_of(r)
            r = c.get("/api/v1/apps/web/live")
            assert r.status_code == 401
            r = c.get("/apps/web")
            assert r.status_code == 401 and "A token is needed" in r.text
            auth = {"Authorization": f"Bearer {env.reader}"}
            r = c.get("/api/v1/apps/web/fleet", headers=auth)
            assert r.status_code == 200, r.text
            assert sorted(r.json()["hosts"]) == sorted(w.name for w in env.fleet.watchers)
            r = c.get("/apps/web", headers=auth)
            assert r.status_code == 200 and 'id="fleet"' in r.text
            # A token that may read app api only: Consul refuses it for web.
            r = c.get("/api/v1/apps/web/deploys", headers={"X-Consul-Token": env.api_operator})
            assert r.status_code == 403 and "Permission denied" in error_of(r)
            r = c.get("/api/v1/apps/web/live", headers={"X-Consul-Token": env.api_operator})
            assert r.status_code == 403

    def test_the_page_takes_another_token_after_a_refused_one(self, env: Env) -> None:
        # The page answered 403 with an empty body for a token Consul does not know, and a
        # reload the same: nothing said what was wrong, nothing offered another token.
        app = create_app(load_config(env.web.config), listen_host="192.0.2.10")
        made_up = {"Authorization": f"Bearer {uuid.uuid4()}"}
        with TestClient(app) as c:
            for method in (c.get, c.head):
                r = method("/apps/web", headers=made_up)
                assert r.status_code == 401, r.text
                assert r.headers["www-authenticate"] == 'Bearer realm="release-watcher"'
            r = c.get("/apps/web", headers=made_up)
            assert "Consul does not know this token" in r.text
            assert 'id="enter-token"' in r.text and 'data-needs-token="yes"' in r.text
            # Known to Consul, without read on app web: Consul's refusal, and the button.
            r = c.get("/apps/web", headers={"X-Consul-Token": env.api_operator})
            assert r.status_code == 403 and "this Consul token may not read" in r.text, r.text
            assert "This token cannot read web" in r.text and 'id="enter-token"' in r.text
            # The list of apps reads no key, but a made-up token is not taken for one.
            r = c.get("/api/v1/apps", headers=made_up)
            assert r.status_code == 401, r.text
        # On a loopback page: a stale token of the browser's is said unknown (reads from
        # this host need none), and the server's own token refused is said to be its own.
        local = "http://127.0.0.1:8710"
        with TestClient(app_with_token(env, env.reader), base_url=local) as c:
            r = c.get("/apps/web", headers=made_up)
            assert r.status_code == 401 and "Consul does not know this token</h2>" in r.text
            assert "not bound to loopback" not in r.text
        with TestClient(app_with_token(env, env.api_operator), base_url=local) as c:
            r = c.get("/apps/web")
            assert r.status_code == 403, r.text
            assert "This server's token cannot read web" in r.text, r.text
        with TestClient(app, base_url="http://192.0.2.10:8710") as c:
            r = c.get("/api/v1/apps", headers=made_up)
            assert r.status_code == 401 and "does not know this token" in error_of(r)
            r = c.get("/api/v1/apps", headers={"X-Consul-Token": env.reader})
            assert r.status_code == 200 and r.json() == {"apps": ["api", "web"]}, r.text

    def test_a_stream_ends_once_its_token_may_no_longer_read(
        self, env: Env, cluster: ConsulCluster, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The commit review: the server asked Consul about a stream's token only when it
        opened, so a token revoked or stripped of its read went on getting every deploy's
        state for as long as its client kept the stream (the page let its own go, a raw
        client did not)."""
        monkeypatch.setattr(web_app, "SSE_TOKEN_RECHECK", 1.0)
        monkeypatch.setattr(web_app, "SSE_KEEPALIVE", 0.3)
        server = cluster.server
        rules = f'key_prefix "{env.fleet.kv_prefix}/apps/" {{ policy = "read" }}\n'
        made = {
            what: create_token(server, f"live-{what}-{uuid.uuid4().hex[:8]}", rules)
            for what in ("kept", "revoked", "stripped")
        }

        def revoke(accessor: str) -> None:
            status, raw = server.request("DELETE", f"/v1/acl/token/{accessor}", b"")
            assert status == 200, raw

        def strip(accessor: str) -> None:  # its one policy deleted: known, reads nothing
            token = api(server, "GET", f"/v1/acl/token/{accessor}", {})
            status, raw = server.request(
                "DELETE", f"/v1/acl/policy/{token['Policies'][0]['ID']}", b""
            )
            assert status == 200, raw

        changes = {"kept": None, "revoked": revoke, "stripped": strip}
        app = create_app(load_config(env.web.config), listen_host="192.0.2.10")
        with TestClient(app) as c:
            for what, (secret, accessor) in made.items():
                auth = {"Authorization": f"Bearer {secret}"}
                with c.stream("GET", "/api/v1/apps/web/live", headers=auth) as stream:
                    assert stream.status_code == 200, (what, stream.read())
                    lines = stream.iter_lines()
                    assert any(line == "event: live" for line in lines), what
                    change = changes[what]
                    if change is not None:
                        change(accessor)
                    events, end = [], time.monotonic() + (4 if change is None else 20)
                    for line in lines:
                        events.append(line)
                        if line == "event: refused" or time.monotonic() > end:
                            break
                    if change is None:  # three checks passed: the stream goes on
                        assert "event: refused" not in events, events
                        assert events.count(": keepalive") >= 5, events
                        continue
                    assert events[-1] == "event: refused", (what, events[-5:])
                    refused = json.loads(next(lines).removeprefix("data: "))
                    rest = list(lines)  # the server ends the stream after it
                assert rest == [""], (what, rest)
                if what == "revoked":
                    assert refused["status"] == 401, refused
                    assert "does not know this token" in refused["error"], refused
                else:
                    assert refused["status"] == 403, refused
                    assert "Permission denied" in refused["error"], refused
                # And a new stream with it is refused at once, as the page's reconnect is.
                r = c.get("/api/v1/apps/web/live", headers=auth)
                assert r.status_code == refused["status"], r.text


class TestLiveFeed:
    """One blocking-query watcher per app feeds every client; it does not poll."""

    def test_one_watcher_for_many_clients_and_no_polling(self, env: Env) -> None:
        config = load_config(env.web.config)
        store = DeployStore(ConsulClient(config.consul), config.kv_prefix, "web")
        feed = LiveFeed("web", store, live_snapshot, wait=20)
        v7 = env.fleet.publish("v7")

        async def scenario() -> tuple[list[Any], int, int]:
            queues = [feed.subscribe() for _ in range(8)]
            firsts = [(await asyncio.wait_for(q.get(), 20)).snapshot for q in queues]
            await asyncio.sleep(1.0)  # let the watcher settle into its blocking query
            idle_before = feed.wakeups
            await asyncio.sleep(3.0)  # nothing changes: a poller would wake up here
            idle_after = feed.wakeups
            r = await asyncio.to_thread(
                env.web.post, "/api/v1/apps/web/deploys", {"artifact": v7.id}, env.web_operator
            )
            assert r.status_code == 202, r.text
            deploy = r.json()["deploy"]

            async def until_committed(q: asyncio.Queue[Any]) -> Any:
                while True:
                    snap = (await asyncio.wait_for(q.get(), 60)).snapshot
                    d = snap.get("deploy") or {}
                    if d.get("deploy") == deploy and d.get("result") == "committed":
                        return snap

            lasts = await asyncio.gather(*(until_committed(q) for q in queues))
            assert all(f["app"] == "web" for f in firsts)
            return lasts, idle_before, idle_after

        try:
            lasts, idle_before, idle_after = asyncio.run(scenario())
            watchers = [t for t in threading.enumerate() if t.name == "live-web"]
        finally:
            feed.stop()
        assert len(lasts) == 8
        assert {h["state"] for h in lasts[0]["deploy"]["hosts"].values()} == {"live"}
        assert len(watchers) == 1  # one thread, one blocking query, for all 8 clients
        assert idle_after == idle_before, "the feed woke up with nothing changed (polling?)"
        env.fleet.wait_idle()
