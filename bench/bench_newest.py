"""What finding the newest committed deploy from the acks costs (``newest_committed``,
docs/design.md: `current` is any host's word): a host does it once after its watcher
starts and whenever it is behind `current`; `status`, `status --fleet` and the page do it
at every read of the fleet's release. Against one real Consul agent, for H hosts and a
history of D deploys every host acked ready (the acks a fleet keeps: the history's).

Two cases, medians of ROUNDS:
- "nothing later": what a reader pays on a fleet left alone (`current` names the newest);
- "first look": a host with no deploy of its own to go by, which ranks every deploy and
  establishes the commit predicate of the newest.

Baseline in the same run: one plain ``kv_get`` of `current`, the read a reader makes
anyway. Prints one table; the figures also go to bench/results/newest.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cluster import ClusterSpec, loopback_from_env, start_cluster
from watcher.barrier import DeployStore, Joined
from watcher.consul_api import ConsulClient, TxnOp, request_counts
from watcher.records import READY, ArtifactRecord, NodeProgress

SIZES = ((5, 10), (20, 50), (60, 50))  # (hosts, deploys kept)
ROUNDS = 15
RESULTS = Path(__file__).resolve().parent / "results"
ARTIFACT = ArtifactRecord(id="main-15eb13af", url="s3://b/a/web/x.tar.gz", sha256="a" * 64, size=1)


def committed_history(consul: ConsulClient, hosts: int, deploys: int) -> tuple[DeployStore, int]:
    """A fresh app whose ``deploys`` deploys every one of ``hosts`` acked ready (written
    directly: no sessions here); returns it and the newest deploy's CreateIndex."""
    store = DeployStore(consul, f"bn{hosts}x{time.monotonic_ns()}", "web")
    nodes = [f"host-{i:03d}" for i in range(hosts)]
    sessions = {node: f"00000000-0000-0000-0000-{i:012d}" for i, node in enumerate(nodes)}
    newest = 0
    for d in range(deploys):
        deploy_id = f"20261206T{d:06d}Z-bench0"
        rec = store.new_record(
            deploy_id=deploy_id,
            kind="deploy",
            artifact=ARTIFACT,
            release=None,
            requested_by="bench",
            expected=sessions,
            prepare_timeout=600,
            apply_timeout=600,
        )
        assert consul.kv_put(store.keys.request(deploy_id), rec.to_json())
        entry = consul.kv_get(store.keys.request(deploy_id))
        assert entry is not None
        newest = entry.create_index
        joined = Joined(rec, rec.digest(), newest)
        ops = []
        for node in nodes:
            ack = NodeProgress(
                node=node,
                deploy=deploy_id,
                state=READY,
                digest=joined.digest,
                create_index=newest,
            )
            ops.append(TxnOp.set(store.keys.progress(deploy_id, node), ack.to_json()))
            ops.append(TxnOp.set(store.keys.carried_request(deploy_id, node), rec.canonical()))
        for start in range(0, len(ops), 16):
            assert consul.txn(ops[start : start + 16]).ok
    return store, newest


def timed(call: Callable[[], object]) -> tuple[float, int, object]:
    before = sum(request_counts().values())
    t = time.perf_counter()
    got = call()
    return (time.perf_counter() - t) * 1000, sum(request_counts().values()) - before, got


def main() -> int:
    consul_bin = os.environ.get("CONSUL_BIN") or "consul"
    loopback = loopback_from_env("bench")
    work = Path(tempfile.mkdtemp(prefix="bench-newest-"))
    cluster = start_cluster(ClusterSpec(hosts=1), work, consul_bin, loopback)
    rows = []
    try:
        consul = ConsulClient(cluster.hosts[0].consul_settings())
        for hosts, deploys in SIZES:
            store, newest = committed_history(consul, hosts, deploys)
            cases: dict[str, tuple[list[float], list[int]]] = {
                "nothing later": ([], []),
                "first look": ([], []),
                "kv_get": ([], []),
            }
            for _ in range(ROUNDS):
                ms, reqs, got = timed(lambda: store.newest_committed(newest))  # noqa: B023
                if got is not None:
                    print(f"FAILED: {hosts} hosts: a later deploy found where none is")
                    return 1
                cases["nothing later"][0].append(ms)
                cases["nothing later"][1].append(reqs)
                ms, reqs, got = timed(lambda: store.newest_committed(0))  # noqa: B023
                if not isinstance(got, Joined) or got.create_index != newest:
                    print(f"FAILED: {hosts} hosts: the newest deploy not found ({got})")
                    return 1
                cases["first look"][0].append(ms)
                cases["first look"][1].append(reqs)
                ms, reqs, _ = timed(lambda: consul.kv_get(store.keys.current))  # noqa: B023
                cases["kv_get"][0].append(ms)
                cases["kv_get"][1].append(reqs)
            base = statistics.median(cases["kv_get"][0])
            for case in ("nothing later", "first look"):
                times, reqs = cases[case]
                rows.append(
                    {
                        "hosts": hosts,
                        "deploys": deploys,
                        "case": case,
                        "ms_p50": round(statistics.median(times), 2),
                        "requests": max(reqs),
                        "kv_get_ms_p50": round(base, 2),
                        "ratio": round(statistics.median(times) / base, 1),
                    }
                )
        consul.close()
    finally:
        cluster.stop()
    print("newest committed deploy from the acks, median of", ROUNDS)
    print(
        f"{'hosts':>6} {'deploys':>8} {'case':>14} {'ms':>8} {'requests':>9} "
        f"{'kv_get ms':>10} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['hosts']:>6} {r['deploys']:>8} {r['case']:>14} {r['ms_p50']:>8} "
            f"{r['requests']:>9} {r['kv_get_ms_p50']:>10} {r['ratio']:>6}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "newest.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
