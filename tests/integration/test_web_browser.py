"""The page of `watcher web` in a real headless browser (Debian's chromium, driven by Playwright)
against a real cluster with ACLs on and real daemons. Writes docs/screenshots/*.png."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.integration.test_deploy_acl import create_token, render, watcher_token_fleet
from tests.support.cluster import Agent, ClusterSpec, ConsulCluster
from tests.support.fleet import Fleet, wait_for
from tests.support.s3server import S3Server, s3_client
from tests.support.web import WebServer, reader_web
from watcher.config import S3Settings
from watcher.records import parse_iso

CLUSTER = ClusterSpec(hosts=3, acl=True)
CHROMIUM = "/usr/bin/chromium"
# A name that is not loopback's, for this machine's loopback: the page is then read as from
# the network (a token needed), as behind a proxy or on another bind.
NETWORK_NAME = "watcher.test"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    f"--host-resolver-rules=MAP {NETWORK_NAME} 127.0.0.1",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@pytest.fixture
def browser_page() -> Iterator[Page]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: run scripts/install-system-deps (installs chromium)",
            pytrace=False,
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.set_default_timeout(60_000)
            # The page's actions wait 60 s; its assertions wait 5 s unless told: a deploy's
            # steps on a loaded 2-core machine can take longer than that.
            expect.set_options(timeout=30_000)
            yield page
        finally:
            browser.close()


def gated_hook(workdir: Path, name: str) -> tuple[Path, Path]:
    """A post_release hook that waits (up to 60 s) for its gate file: (hook, gate)."""
    gate = workdir / f"gate-{name}"
    hook = workdir / f"post-release-{name}"
    hook.write_text(
        f"#!/bin/sh\nfor i in $(seq 600); do [ -e {gate} ] && exit 0; sleep 0.1; done\nexit 0\n"
    )
    hook.chmod(0o755)
    return hook, gate


def confirm_write(page: Page, token: str | None) -> None:
    dialog = page.locator("#write-dialog")
    expect(dialog).to_be_visible()
    if token is not None:
        page.fill("#token-input", token)
    page.click("#write-confirm")
    expect(dialog).to_be_hidden()


class TestThePage:
    def test_deploy_watch_history_rollback_refusal_and_consul_outage(
        self,
        cluster: ConsulCluster,
        s3_server: S3Server,
        tmp_path: Path,
        browser_page: Page,
    ) -> None:
        page = browser_page
        prefix = f"w{time.monotonic_ns()}"
        bucket = f"test-{uuid.uuid4().hex[:16]}"
        s3_client(s3_server.endpoint_url).create_bucket(Bucket=bucket)
        s3 = S3Settings(bucket, "artifacts", "us-east-1", s3_server.endpoint_url)
        server = cluster.server
        operator, _ = create_token(server, f"alice-{prefix}", render("operator", prefix, "web"))
        operator_who = f"release-watcher test: alice-{prefix}"
        reader, _ = create_token(server, f"reader-{prefix}", render("web", prefix, "web"))
        fleet = watcher_token_fleet(cluster, s3, tmp_path, prefix)
        gates = {}
        for w in fleet.watchers:
            hook, gates[w.name] = gated_hook(tmp_path, w.name)
            fleet.write_config(w, {"hooks": {"post_release": str(hook)}})
        web = reader_web(fleet, reader, tmp_path)
        fleet.start()
        web.start()
        try:
            self._scenario(page, fleet, web, gates, operator, operator_who, cluster)
        except BaseException:
            print(web.log())
            raise
        finally:
            web.stop()
            fleet.stop()

    def _scenario(
        self,
        page: Page,
        fleet: Fleet,
        web: WebServer,
        gates: dict[str, Path],
        operator: str,
        operator_who: str,
        cluster: ConsulCluster,
    ) -> None:
        # Two builds, the first one live on the fleet (deployed through the API).
        builds = []
        for n, version in enumerate(("v1", "v2"), start=1):
            record = fleet.publish(version)
            record = type(record)(
                **{
                    **record.__dict__,
                    "build_number": str(400 + n),
                    "build_url": f"https://buildkite.example/acme/web/builds/{400 + n}",
                    "created_by": "ci (buildkite)",
                }
            )
            fleet.kv.kv_put(fleet.keys.artifact(record.id), record.to_json())
            builds.append(record)
        for gate in gates.values():
            gate.touch()
        r = web.post("/api/v1/apps/web/deploys", {"artifact": builds[0].id}, operator)
        assert r.status_code == 202, r.text
        first = r.json()
        assert fleet.wait_outcome(first["deploy"])["result"] == "committed"
        fleet.wait_idle()
        wait_for(
            lambda: all(
                h["release"] == first["release"]
                for h in web.get("/api/v1/apps/web/fleet").json()["hosts"].values()
            ),
            40,
            "every host record on v1",
            fleet,
        )

        # The fleet view. Its first live stream is refused as when the server's streams
        # are all taken: the page retries, and the live view below still follows the deploy.
        page.route(
            "**/api/v1/apps/web/live",
            lambda route: route.fulfill(
                status=503,
                content_type="application/json",
                body='{"error": "200 live streams already open; retry later"}',
            ),
            times=1,
        )
        page.goto(web.url + "/apps/web")
        expect(page.locator("#fleet tr.host")).to_have_count(3)
        expect(page.locator("#fleet")).to_contain_text(first["release"])
        expect(page.locator("#fleet .tag.ok")).to_have_count(3)
        build_row = page.locator(f'#builds tr[data-artifact="{builds[1].id}"]')
        expect(build_row.locator("a")).to_have_attribute("href", builds[1].build_url)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "fleet.png"))
        page.evaluate("window.__no_reload = 1")

        # A bad token: the page shows Consul's refusal, nothing starts.
        build_row.locator("button[data-action=deploy]").click()
        confirm_write(page, str(uuid.uuid4()))
        expect(page.locator("#message")).to_contain_text("ACL not found")
        assert fleet.inflight() is None

        # Deploy v2 from its button with the operator's token; hosts wait at their gates.
        for gate in gates.values():
            gate.unlink()
        build_row.locator("button[data-action=deploy]").click()
        confirm_write(page, operator)
        expect(page.locator("#message")).to_contain_text(f"started by {operator_who}")
        live_rows = page.locator("#live tr[data-node]")
        expect(live_rows).to_have_count(3)
        expect(page.locator("#live .state-staging")).to_have_count(3)
        names = sorted(gates)
        gates[names[0]].touch()
        expect(page.locator(f'#live tr[data-node="{names[0]}"] .state')).to_have_text("ready")
        page.locator("#live").scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "live-deploy.png"))
        for name in names[1:]:
            gates[name].touch()
        expect(page.locator("#live .state-live")).to_have_count(3)
        assert page.evaluate("window.__no_reload") == 1, "the page reloaded"

        # History: who and when, refreshed without a reload once the deploy ended.
        newest = page.locator("#history tr.deploy").first
        expect(newest.locator(".outcome")).to_contain_text("committed")
        expect(newest.locator(".who")).to_have_text(operator_who)
        assert newest.locator("td").nth(5).inner_text().endswith("s")  # how long it took
        when = parse_iso(str(newest.locator(".when").get_attribute("datetime")))
        assert abs(when.timestamp() - time.time()) < 120
        fleet.wait_idle()
        page.set_viewport_size({"width": 1150, "height": 640})
        page.locator("#history").scroll_into_view_if_needed()
        page.locator("#history").screenshot(path=str(SCREENSHOTS / "history.png"))
        page.set_viewport_size({"width": 1000, "height": 640})
        assert page.evaluate("window.__no_reload") == 1, "the page reloaded"

        # Roll back from the page (the token is kept for this browser session), with the
        # button that names the previous release: it sends that release, not "whatever is
        # previous when this lands" (a deploy made while the dialog is open would be undone).
        previous = page.locator("#history > p button[data-action=rollback]")
        expect(previous).to_contain_text(first["release"])
        previous.click()
        with page.expect_request(lambda r: r.method == "POST") as sent:
            confirm_write(page, None)
        (shown,) = set(fleet.currents().values())  # v2's: what the page shows it on
        sent_body = json.loads(sent.value.post_data or "")
        assert sent_body == {"previous": first["release"], "current": shown}, sent_body
        expect(page.locator("#message")).to_contain_text("rollback")
        expect(newest.locator(".kind")).to_have_text("rollback", timeout=60_000)
        expect(newest.locator(".outcome")).to_contain_text("committed", timeout=60_000)
        wait_for(
            lambda: set(fleet.currents().values()) == {first["release"]},
            30,
            "every host back on v1",
            fleet,
        )

        # Abort from the page while undecided: hosts wait at their gates again.
        fleet.wait_idle()
        for gate in gates.values():
            gate.unlink()
        build_row.locator("button[data-action=deploy]").click()
        confirm_write(page, None)
        expect(page.locator("#live .state-staging")).to_have_count(3)
        # An abort the API could not settle yet (a host that acked ready went silent) is
        # not shown as done: the answer is fed to the page once.
        page.route(
            "**/abort",
            lambda route: route.fulfill(
                status=200,
                content_type="application/json",
                body=json.dumps({"deploy": "x", "aborted": False, "result": "undecided"}),
            ),
            times=1,
        )
        page.locator("#live button[data-action=abort]").click()
        confirm_write(page, None)
        expect(page.locator("#message")).to_contain_text("not decided yet (undecided)")
        page.locator("#live button[data-action=abort]").click()
        confirm_write(page, None)
        expect(page.locator("#message")).to_contain_text("aborted")
        expect(page.locator("#live .decision")).to_contain_text("abort")
        for gate in gates.values():
            gate.touch()
        fleet.wait_idle()
        expect(newest.locator(".outcome")).to_contain_text("aborted", timeout=60_000)
        # Who asked, once (the request names them; the reason does not repeat it).
        expect(newest.locator(".outcome")).to_contain_text(f"abort requested by {operator_who}")
        outcome_text = newest.locator(".outcome").inner_text()
        assert outcome_text.count(operator_who) == 1, outcome_text
        assert set(fleet.currents().values()) == {first["release"]}

        # A deploy the API starts with a warning shows it; one refused for a host that is
        # down asks again, naming it, and sends allow_missing only then (answers fed).
        refused = (
            "app web: known host(s) host-9 have no member key (watcher down or cut off); "
            'start them or send "allow_missing": true to deploy to the 3 live member(s) only'
        )
        started = {
            "deploy": "d",
            "kind": "deploy",
            "release": "r",
            "requested_by": operator_who,
            "warning": "held, by their last records: host-2: maintenance",
        }
        answers = iter([(409, {"error": refused}), (202, started), (202, started)])
        bodies: list[object] = []

        def answer(route: object) -> None:
            status, doc = next(answers)
            bodies.append(json.loads(route.request.post_data or ""))  # type: ignore[attr-defined]
            route.fulfill(  # type: ignore[attr-defined]
                status=status, content_type="application/json", body=json.dumps(doc)
            )

        page.route("**/api/v1/apps/web/deploys", answer)
        build_row.locator("button[data-action=deploy]").click()
        expect(page.locator("#write-dialog")).to_be_visible()
        # Not confirm_write: the question comes back in the same dialog as soon as the
        # 409 is in, and a wait for the dialog to close after the click may look only then
        # (the CI failure of 57a8e31: "stayed open" was the second question, waiting).
        page.click("#write-confirm")
        expect(page.locator("#write-what")).to_contain_text(
            "known host(s) host-9 have no member key (watcher down or cut off). Deploy to "
            f"the live members only (the fleet on {first['release']})?"
        )
        confirm_write(page, None)
        expect(page.locator("#message")).to_contain_text(
            "Warning: held, by their last records: host-2: maintenance"
        )
        # Each names the release the page shows the fleet on: the API refuses the deploy
        # once the fleet has moved (another tab's deploy ended meanwhile).
        shown = {"artifact": builds[1].id, "current": first["release"]}
        assert bodies == [shown, {**shown, "allow_missing": True}], bodies
        page.unroute("**/api/v1/apps/web/deploys")

        # A hidden tab lets its live stream go (a browser holds about 6 connections per
        # server: a 7th tab would not load) and catches up once shown again.
        def streams() -> float:
            for line in web.get("/metrics").text.splitlines():
                if line.startswith('watcher_web_sse_clients{app="web"}'):
                    return float(line.split()[-1])
            return 0.0

        assert streams() == 1.0
        visibility = """(hidden) => {
            Object.defineProperty(document, "hidden", {value: hidden, configurable: true});
            document.dispatchEvent(new Event("visibilitychange"));
        }"""
        page.evaluate(visibility, True)
        wait_for(lambda: streams() == 0.0, 20, "the hidden tab's stream closed")
        host_key = fleet.keys.host(fleet.watchers[1].name)
        before = fleet.kv.kv_get(host_key)
        assert before is not None and before.value is not None
        held = {**json.loads(before.value), "hold": "changed while hidden"}
        fleet.kv.kv_put(host_key, json.dumps(held).encode())
        build_row.locator("button[data-action=deploy]").focus()  # a keyboard user's place
        page.evaluate(visibility, False)
        expect(page.locator("#fleet")).to_contain_text("changed while hidden")
        # the sections were swapped for fresh ones: the same button has the focus again
        assert page.evaluate("document.activeElement.dataset.artifact") == builds[1].id
        wait_for(lambda: streams() == 1.0, 20, "the stream back once shown")
        fleet.kv.kv_put(host_key, before.value)

        # A phone: nothing wider than the screen but the scrolling tables.
        page.set_viewport_size({"width": 390, "height": 800})
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, f"the page is {width}px wide on a 390px screen"

        # Consul goes away: the page says so, and recovers on its own when it returns.
        agent = fleet.watchers[0].agent
        cluster.stop(agent)
        expect(page.locator("#consul-status")).to_contain_text("unreachable", timeout=60_000)
        r = web.get("/api/v1/apps/web/fleet")
        assert r.status_code == 503 and "cannot reach Consul" in r.json()["error"]
        cluster.start(agent)
        expect(page.locator("#consul-status")).to_be_hidden(timeout=60_000)
        expect(page.locator("#fleet tr.host")).to_have_count(3)
        assert page.evaluate("window.__no_reload") == 1, "the page reloaded"

        # A watcher stops, and starts again: the fleet table follows, no deploy involved.
        fleet.wait_idle()
        stopped = fleet.watchers[2]
        expect(page.locator("#fleet .tag.ok")).to_have_count(3, timeout=60_000)
        stopped.stop()
        row = page.locator(f'#fleet tr.host[data-node="{stopped.name}"]')
        expect(row.locator(".tag.bad")).to_have_text("down", timeout=60_000)
        expect(page.locator("#fleet .tag.ok")).to_have_count(2)
        stopped.start()
        expect(row.locator(".tag.ok")).to_have_text("alive", timeout=60_000)
        assert page.evaluate("window.__no_reload") == 1, "the page reloaded"

        # A host's token rewrites its record without pause (40 times in ~2 s): the page
        # follows, fetching itself about once a second, not once per change.
        fleet.wait_idle()
        key = fleet.keys.host(stopped.name)
        entry = fleet.kv.kv_get(key)
        assert entry is not None and entry.value is not None
        record = json.loads(entry.value)
        since = page.evaluate("performance.now()")
        started = time.monotonic()
        for n in range(40):
            fleet.kv.kv_put(key, json.dumps({**record, "hold": f"rewritten {n}"}).encode())
            time.sleep(0.05)
        expect(row).to_contain_text("rewritten 39")
        time.sleep(1.5)  # the page's last fetch, if one was still due
        took = time.monotonic() - started
        fetches = page.evaluate(
            """(since) => performance.getEntriesByType("resource")
                .filter((e) => e.startTime > since && new URL(e.name).pathname === "/apps/web")
                .map((e) => Math.round(e.startTime - since))""",
            since,
        )
        print("page fetches (ms after the first rewrite):", fetches)
        assert 1 <= len(fetches) <= 2 + took, (fetches, took)
        fleet.kv.kv_put(key, entry.value)


def revoke(agent: Agent, accessor: str) -> None:
    """Delete the token with this AccessorID (with the management token)."""
    status, raw = agent.request("DELETE", f"/v1/acl/token/{accessor}", b"")
    assert status == 200, raw


class TestTheToken:
    def test_a_refused_token_is_dropped_and_another_one_taken(
        self,
        cluster: ConsulCluster,
        s3_server: S3Server,
        tmp_path: Path,
        browser_page: Page,
    ) -> None:
        """The web review: a token Consul does not know left the page empty, the button for
        another token gone and the bad token kept, so a reload was empty too."""
        page = browser_page
        prefix = f"t{time.monotonic_ns()}"
        server = cluster.server
        s3 = S3Settings("unused", "artifacts", "us-east-1", s3_server.endpoint_url)
        reader, _ = create_token(server, f"reader-{prefix}", render("web", prefix, "web"))
        api_only, _ = create_token(server, f"api-{prefix}", render("web", prefix, "api"))
        mine, mine_id = create_token(server, f"mine-{prefix}", render("web", prefix, "web"))
        web = reader_web(watcher_token_fleet(cluster, s3, tmp_path, prefix), reader, tmp_path)
        web.start()
        try:
            url = f"http://{NETWORK_NAME}:{web.port}/apps/web"
            self._scenario(page, url, reader, api_only)
            self._revoked_while_streaming(page, mine, lambda: revoke(server, mine_id))
            self._refused_on_the_stream(page, reader)
        except BaseException:
            print(web.log())
            raise
        finally:
            web.stop()

    def _scenario(self, page: Page, url: str, reader: str, api_only: str) -> None:
        stored = "() => sessionStorage.getItem('watcher-consul-token')"
        needed = page.locator("#token-needed h2")
        banner = page.locator("#consul-status")
        page.goto(url)
        expect(needed).to_have_text("A token is needed")

        page.click("#enter-token")
        confirm_write(page, str(uuid.uuid4()))  # made up: Consul does not know it
        expect(banner).to_contain_text("Consul does not know this token")
        expect(needed).to_have_text("A token is needed")
        expect(page.locator("#forget-token")).to_be_hidden()
        assert page.evaluate(stored) is None
        page.reload()
        expect(needed).to_have_text("A token is needed")

        page.click("#enter-token")
        confirm_write(page, api_only)  # known, but reads app api only
        expect(needed).to_have_text("This token cannot read web")
        expect(banner).to_contain_text("lacks permission")
        assert page.evaluate(stored) is None

        page.click("#enter-token")
        confirm_write(page, reader)
        expect(page.locator("#fleet")).to_be_visible()
        expect(banner).to_be_hidden()
        expect(page.locator("#forget-token")).to_be_visible()
        assert page.evaluate(stored) == reader
        # The live view streams with it (its connection stays open).
        page.wait_for_function("() => liveConnection !== null && liveLoop !== null")

        page.click("#forget-token")
        expect(needed).to_have_text("A token is needed")
        expect(page.locator("#fleet")).to_have_count(0)
        assert page.evaluate(stored) is None

    def _revoked_while_streaming(
        self, page: Page, token: str, revoke_it: Callable[[], None]
    ) -> None:
        """A token revoked while its stream is open: the server asks about it again only
        every 30 s, so the page lets the stream go at once when a refresh is refused (a
        review saw the page ask for a token while the stream went on with the old one)."""
        page.click("#enter-token")
        confirm_write(page, token)
        expect(page.locator("#fleet")).to_be_visible()
        page.wait_for_function("() => liveConnection !== null && liveLoop !== null")
        revoke_it()
        page.evaluate("refreshSections()")  # what a change of the fleet or builds starts
        expect(page.locator("#token-needed h2")).to_have_text("A token is needed")
        expect(page.locator("#consul-status")).to_contain_text("does not know this token")
        page.wait_for_function("() => liveLoop === null && liveConnection === null")

    def _refused_on_the_stream(self, page: Page, token: str) -> None:
        """The server asks Consul again about an open stream's token (every 30 s) and ends
        the stream with `event: refused` once Consul refuses it: the page drops the token
        and asks for another, as for a refused connect (the event is served here by the
        browser's route: the server's side is test_web_api's)."""
        page.click("#enter-token")
        confirm_write(page, token)
        expect(page.locator("#fleet")).to_be_visible()
        page.wait_for_function("() => liveConnection !== null && liveLoop !== null")
        refusal = {"status": 403, "error": "Permission denied: token lacks 'key:read'"}
        page.route(
            "**/api/v1/apps/web/live",
            lambda route: route.fulfill(
                status=200,
                headers={"Content-Type": "text/event-stream"},
                body=f"retry: 2000\n\nevent: refused\ndata: {json.dumps(refusal)}\n\n",
            ),
        )
        page.evaluate("connectLive()")  # its next connection gets the routed stream
        page.wait_for_function("() => liveLoop === null && liveConnection === null")
        assert page.evaluate("() => sessionStorage.getItem('watcher-consul-token')") is None
        # Without the token (the server would still take it), this name needs one.
        expect(page.locator("#token-needed h2")).to_have_text("A token is needed")
        page.unroute("**/api/v1/apps/web/live")
