"""Deploy latency and flip skew of the barrier, against a no-barrier event handler baseline.

Starts a real Consul cluster (1 server + N client agents on loopback), one watcher per
host, and an S3 server. Baseline, measured in the same run: a handler that flips as soon
as its agent delivers a user event (the time for an event fired on one agent to reach
each agent's blocking /v1/event/list; the flip itself is a rename, ~0.1 ms). Barrier: from
`watcherctl deploy` starting the deploy to each host's `flipped_at`, prefetched artifact,
no hooks. Prints both per round and the medians.

    .venv/bin/python bench/bench_deploy.py [--hosts 10] [--rounds 5]

Also times `watcherctl status --fleet` on that fleet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.cluster import ClusterSpec, start_cluster  # noqa: E402
from tests.support.fleet import Fleet, consul_for, wait_for  # noqa: E402
from tests.support.s3server import S3Server, s3_client  # noqa: E402
from watcher.config import S3Settings  # noqa: E402
from watcher.records import parse_iso  # noqa: E402


def event_baseline(fleet: Fleet) -> tuple[float, float]:
    """(first, last) seconds for one event to reach every agent's blocking event list."""
    clients = [consul_for(w.agent) for w in fleet.watchers]
    indexes = [c.event_list(name="bench")[0] for c in clients]
    arrived: list[float] = []
    lock = threading.Lock()

    def watch(i: int) -> None:
        index = indexes[i]
        while True:
            new, _ = clients[i].event_list(name="bench", index=index, wait=10)
            if new != index:
                with lock:
                    arrived.append(time.monotonic())
                return

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    time.sleep(0.3)  # every watcher is blocked in its query
    fired = time.monotonic()
    clients[0].event_fire("bench", b"{}")
    for t in threads:
        t.join(15)
    return min(arrived) - fired, max(arrived) - fired


def barrier_round(fleet: Fleet, version: str) -> tuple[float, float, float]:
    """(to first flip, to last flip, skew) in seconds for one deploy."""
    record = fleet.publish(version, announce=True)
    prefetched = [
        w.app_dir / "prefetched" / f"{record.id}-{record.sha256[:12]}" for w in fleet.watchers
    ]
    wait_for(lambda: all(p.is_dir() for p in prefetched), 60, "prefetch", fleet)
    w0 = fleet.watchers[0]
    result = w0.ctl_json("deploy", "web", record.id)
    assert result["result"] == "committed", result
    start = parse_iso(result["requested_at"])
    flips = sorted(parse_iso(h["flipped_at"]) for h in result["hosts"].values())
    first = (flips[0] - start).total_seconds()
    last = (flips[-1] - start).total_seconds()
    return first, last, last - first


def help_time() -> float:
    """How long starting watcherctl takes at all (imports): the floor under any command."""
    started = time.monotonic()
    subprocess.run(
        [str(Path(sys.executable).parent / "watcherctl"), "--help"], capture_output=True, check=True
    )
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    consul_bin = (
        os.environ.get("CONSUL_BIN")
        or subprocess.run(
            [str(REPO / "scripts" / "install-consul")], check=True, capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    cluster = start_cluster(
        ClusterSpec(hosts=args.hosts),
        work / "consul",
        consul_bin,
        os.environ.get("BENCH_LOOPBACK", "127.0.12"),
    )
    s3 = S3Server(work / "moto.log")
    fleet = None
    try:
        s3.start()
        s3_client(s3.endpoint_url).create_bucket(Bucket="bench")
        settings = S3Settings(
            bucket="bench", prefix="a", region="us-east-1", endpoint_url=s3.endpoint_url
        )
        fleet = Fleet(cluster, settings, work / "hosts", kv_prefix="bench")
        fleet.start()
        base, barrier = [], []
        for i in range(args.rounds):
            base.append(event_baseline(fleet))
            barrier.append(barrier_round(fleet, f"v{i}"))
            print(
                json.dumps(
                    {
                        "round": i,
                        "event_first_ms": round(base[-1][0] * 1000, 1),
                        "event_last_ms": round(base[-1][1] * 1000, 1),
                        "barrier_first_flip_ms": round(barrier[-1][0] * 1000, 1),
                        "barrier_last_flip_ms": round(barrier[-1][1] * 1000, 1),
                        "barrier_skew_ms": round(barrier[-1][2] * 1000, 1),
                    }
                ),
                flush=True,
            )
        status_s = []
        for _ in range(5):
            started = time.monotonic()
            fleet.watchers[0].ctl("status", "--fleet")
            status_s.append(time.monotonic() - started)
        med = statistics.median
        print(f"\n{args.hosts} hosts, {args.rounds} rounds (medians):")
        print(
            f"  no-barrier event handler: last host flips after "
            f"{med(b[1] for b in base) * 1000:.0f} ms, skew "
            f"{med(b[1] - b[0] for b in base) * 1000:.0f} ms"
        )
        print(
            f"  barrier (KV path):        last host flips after "
            f"{med(b[1] for b in barrier) * 1000:.0f} ms, skew "
            f"{med(b[2] for b in barrier) * 1000:.0f} ms"
        )
        print(
            f"  watcherctl status --fleet: {med(status_s) * 1000:.0f} ms (median of 5, "
            f"whole process; baseline `watcherctl --help`: {help_time() * 1000:.0f} ms)"
        )
        return 0
    finally:
        if fleet is not None:
            fleet.stop()
        s3.stop()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
