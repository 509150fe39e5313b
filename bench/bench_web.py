"""`watcher web`: how fast the live view follows Consul, with 1 and many SSE clients.

Starts a real Consul cluster (1 server + 3 client agents on loopback), three watchers, an
S3 server and `watcher web`. For each client count, connects that many SSE clients to
`/api/v1/apps/web/live`, starts a deploy through the API and measures, per client, the time
from the `inflight` write (the deploy's start) to the first snapshot naming the deploy.
Baseline, in the same run: a bare Consul blocking query on `inflight` started before the
write. Also the median latency of the read routes and of the deploy POST.

    .venv/bin/python bench/bench_web.py [--clients 1,25,100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import use_bench_s3_credentials  # noqa: E402
from tests.support.cluster import ClusterSpec, start_cluster  # noqa: E402
from tests.support.fleet import Fleet, consul_for  # noqa: E402
from tests.support.runner import stop_on_signals  # noqa: E402
from tests.support.s3server import S3Server, s3_client  # noqa: E402
from tests.support.web import WebServer  # noqa: E402
from watcher.config import S3Settings  # noqa: E402


def sse_client(url: str, token: str, ready: threading.Event, seen: dict[str, float]) -> None:
    """Read the live stream as the caller of ``token``; note when a snapshot first names a
    deploy in flight, under that deploy's id (a refused stream is noted under "refused").
    The fleet is idle when the clients connect, so that is the deploy the round starts; it
    may come before the POST has answered (the feed reads an app at once after a quiet
    spell, then at most every 0.25 s, so a later snapshot naming it may never come)."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=120) as c, c.stream("GET", url, headers=headers) as stream:
        if stream.status_code != 200:
            seen["refused"] = float(stream.status_code)
            ready.set()
            return
        for line in stream.iter_lines():
            if line.startswith("data: "):
                ready.set()
                snap = json.loads(line[6:])
                if snap.get("inflight"):
                    seen[str(snap["inflight"])] = time.monotonic()
                    return


def bare_watch(fleet: Fleet, index: int, out: list[float]) -> None:
    consul = consul_for(fleet.watchers[0].agent)
    consul.kv_get_blocking(fleet.keys.inflight, index, 30)
    out.append(time.monotonic())


def one_round(
    fleet: Fleet, web: WebServer, clients: int, artifact: str
) -> tuple[list[float], float, list[int]]:
    url = web.url + "/api/v1/apps/web/live"
    seen_by: list[dict[str, float]] = [{} for _ in range(clients)]
    readies = [threading.Event() for _ in range(clients)]
    # One caller each, as many people's pages would be: the web API holds at most
    # SSE_MAX_PER_CALLER streams per caller (per token; every token-less caller on the
    # host is one). With ACLs off, as here, Consul takes any token.
    threads = [
        threading.Thread(
            target=sse_client,
            args=(url, f"bench-reader-{i}", readies[i], seen_by[i]),
            daemon=True,
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for r in readies:
        r.wait(30)
    entry = fleet.kv.kv_get(fleet.keys.inflight)
    index = entry.modify_index if entry else fleet.kv.kv_get_blocking(fleet.keys.inflight, 0, 1)[0]
    bare: list[float] = []
    watcher = threading.Thread(target=bare_watch, args=(fleet, index, bare))
    watcher.start()
    time.sleep(0.3)
    started = time.monotonic()
    r = httpx.post(web.url + "/api/v1/apps/web/deploys", json={"artifact": artifact}, timeout=30)
    assert r.status_code == 202, r.text
    deploy = r.json()["deploy"]
    for t in threads:
        t.join(30)
    watcher.join(30)
    fleet.wait_outcome(deploy)
    fleet.wait_idle()
    # The API answers after its txn; measure from the POST's start (an upper bound).
    lat = [s[deploy] - started for s in seen_by if deploy in s]
    refused = [int(s["refused"]) for s in seen_by if "refused" in s]
    return lat, (bare[0] - started) if bare else float("nan"), refused


def median_ms(fn: object, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t = time.monotonic()
        fn()  # type: ignore[operator]
        times.append(time.monotonic() - t)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,25,100")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-web-"))
    use_bench_s3_credentials()
    consul_bin = os.environ["CONSUL_BIN"]
    cluster = start_cluster(
        ClusterSpec(hosts=3),
        workdir / "consul",
        consul_bin,
        os.environ.get("BENCH_LOOPBACK", "127.0.12"),
    )
    s3 = S3Server(workdir / "moto.log")
    fleet: Fleet | None = None
    web: WebServer | None = None
    try:
        s3.start()
        s3_client(s3.endpoint_url).create_bucket(Bucket="bench")
        settings = S3Settings("bench", "artifacts", "us-east-1", s3.endpoint_url)
        fleet = Fleet(cluster, settings, workdir / "hosts")
        fleet.start()
        config = workdir / "web.yaml"
        import yaml

        config.write_text(yaml.safe_dump(fleet.config_for(fleet.watchers[0])))
        web = WebServer(config, workdir / "web.log")
        web.start()
        artifacts = [fleet.publish(f"v{i}", announce=True).id for i in range(2)]
        time.sleep(2)  # prefetch
        n = 0
        print(f"{'clients':>8} {'bare p50':>9} {'SSE p50':>9} {'SSE max':>9}  (ms, start -> seen)")
        for clients in counts:
            all_lat: list[float] = []
            bares: list[float] = []
            for _ in range(args.rounds):
                # What is measured is a deploy after a quiet spell: the live feed reads an
                # app without pause only up to a burst (watcher/web/live.py), and back-to-
                # back rounds of quick deploys would measure its pacing instead.
                time.sleep(2.5)
                lat, bare, refused = one_round(fleet, web, clients, artifacts[n % 2])
                n += 1
                assert not refused, f"{len(refused)} of {clients} streams refused: {refused}"
                assert len(lat) == clients, f"only {len(lat)} of {clients} clients saw it"
                all_lat += lat
                bares.append(bare)
            print(
                f"{clients:>8} {statistics.median(bares) * 1000:>9.1f} "
                f"{statistics.median(all_lat) * 1000:>9.1f} {max(all_lat) * 1000:>9.1f}"
            )
        with httpx.Client(base_url=web.url, timeout=30) as c:
            for path in ("fleet", "builds", "deploys"):
                ms = median_ms(lambda p=path: c.get(f"/api/v1/apps/web/{p}").raise_for_status())
                print(f"GET /api/v1/apps/web/{path}: median {ms:.1f} ms")
            ms = median_ms(lambda: c.get("/apps/web").raise_for_status())
            print(f"GET /apps/web (page): median {ms:.1f} ms")
    finally:
        if web is not None:
            web.stop()
        if fleet is not None:
            fleet.stop()
        s3.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    stop_on_signals()
    sys.exit(main())
